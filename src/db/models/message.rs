use std::collections::HashMap;

use chrono::NaiveDateTime;
use diesel::pg::Pg;
use diesel::prelude::*;
use diesel::sql_types::{Array, BigInt, Bool, Integer, Nullable, Text, Timestamp};
use diesel::sqlite::Sqlite;
use serde::Serialize;

use super::session::ACTIVE;
use crate::db::kept::{BindTo, Kept, Statement, Values};
use crate::db::schema::chat_messages;
use crate::db::DbConnection;

#[derive(Debug, Clone, Queryable, Selectable, Serialize, PartialEq)]
#[diesel(table_name = chat_messages)]
pub struct ChatMessage {
    #[serde(skip)]
    pub id: i64,
    pub session_id: String,
    pub seq: i64,
    pub role: String,
    pub author_id: Option<String>,
    pub content: String,
    pub client_id: Option<String>,
    pub interrupted: bool,
    pub model: Option<String>,
    pub tokens: Option<i32>,
    #[serde(serialize_with = "crate::db::models::serialize_time")]
    pub created_at: NaiveDateTime,
}

/// A message to store; `seq` is given by the store.
#[derive(Debug, Clone)]
pub struct NewMessage {
    pub session_id: String,
    pub role: &'static str,
    pub author_id: Option<String>,
    pub content: String,
    pub client_id: Option<String>,
    pub interrupted: bool,
    pub model: Option<String>,
    pub tokens: Option<i32>,
}

impl NewMessage {
    /// The row this message becomes when stored as `seq` at `at` (its id is not read back).
    fn stored_as(&self, seq: i64, at: NaiveDateTime) -> ChatMessage {
        ChatMessage {
            id: 0,
            session_id: self.session_id.clone(),
            seq,
            role: self.role.to_string(),
            author_id: self.author_id.clone(),
            content: self.content.clone(),
            client_id: self.client_id.clone(),
            interrupted: self.interrupted,
            model: self.model.clone(),
            tokens: self.tokens,
            created_at: at,
        }
    }
}

/// Longest client id accepted, in bytes.
pub const MAX_CLIENT_ID_BYTES: usize = 64;

/// Why text a user typed cannot be stored. One set of rules for HTTP and WebSocket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InvalidInput {
    Empty,
    TooLarge(usize),
    /// PostgreSQL cannot store NUL in text.
    Nul,
    ClientId,
}

impl InvalidInput {
    pub fn code(&self) -> &'static str {
        match self {
            InvalidInput::Empty => "empty_message",
            InvalidInput::TooLarge(_) => "message_too_large",
            InvalidInput::Nul => "invalid_content",
            InvalidInput::ClientId => "invalid_client_id",
        }
    }

    pub fn message(&self) -> String {
        match self {
            InvalidInput::Empty => "`content` must not be empty".into(),
            InvalidInput::TooLarge(max) => format!("`content` must be at most {max} bytes"),
            InvalidInput::Nul => "`content` must not contain NUL characters".into(),
            InvalidInput::ClientId => {
                format!("`client_id` must be 1 to {MAX_CLIENT_ID_BYTES} printable ASCII characters")
            }
        }
    }
}

/// Checks a message as typed: not blank, at most `max` bytes, no NUL. It is stored as is.
pub fn check_content(content: &str, max: usize) -> Result<(), InvalidInput> {
    if content.trim().is_empty() {
        return Err(InvalidInput::Empty);
    }
    if content.len() > max {
        return Err(InvalidInput::TooLarge(max));
    }
    if content.contains('\0') {
        return Err(InvalidInput::Nul);
    }
    Ok(())
}

/// A client id is 1 to 64 printable ASCII characters.
pub fn check_client_id(id: &str) -> Result<(), InvalidInput> {
    if id.is_empty() || id.len() > MAX_CLIENT_ID_BYTES || !id.bytes().all(|b| b.is_ascii_graphic())
    {
        return Err(InvalidInput::ClientId);
    }
    Ok(())
}

/// A stored message, and whether it had been stored before under the same client id.
#[derive(Debug, Clone)]
pub struct Appended {
    pub message: ChatMessage,
    pub duplicate: bool,
}

/// Why one message of a batch was not stored. The rest of the batch is unaffected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rejected {
    SessionNotFound,
    SessionNotActive(String),
}

/// Stores a batch of messages in one transaction and returns one outcome per message, in order.
///
/// Each conversation's `last_seq` is read once, advanced for every message of the batch, and
/// written back once, so seq has no gaps. A message whose client id is already stored in its
/// conversation is not stored again: its outcome is the first copy. The caller must not run
/// two batches for the same conversation at once (the committer gives a conversation to one
/// transaction at a time).
pub fn append_batch(
    conn: &mut DbConnection,
    batch: &[NewMessage],
) -> QueryResult<Vec<Result<Appended, Rejected>>> {
    match conn {
        DbConnection::Pg(pg) => append_batch_pg(pg, batch),
        DbConnection::Sqlite(sqlite) => append_batch_sqlite(sqlite, batch),
    }
}

/// PostgreSQL: the whole batch is one call of `switchboard_append` (its migration holds the
/// rules, the same as SQLite's below), so a batch costs one round trip to the server instead
/// of BEGIN, five statements and COMMIT. A single statement is its own transaction. The call is
/// kept prepared, so the server does not parse and plan it again for every batch.
fn append_batch_pg(
    pg: &mut PgConnection,
    batch: &[NewMessage],
) -> QueryResult<Vec<Result<Appended, Rejected>>> {
    if batch.is_empty() {
        return Ok(Vec::new());
    }
    let now = super::now();
    let rows: Vec<AppendRow> = Kept(AppendPg {
        sessions: batch.iter().map(|m| m.session_id.as_str()).collect(),
        roles: batch.iter().map(|m| m.role).collect(),
        authors: batch.iter().map(|m| m.author_id.as_deref()).collect(),
        contents: batch.iter().map(|m| m.content.as_str()).collect(),
        clients: batch.iter().map(|m| m.client_id.as_deref()).collect(),
        interrupted: batch.iter().map(|m| m.interrupted).collect(),
        models: batch.iter().map(|m| m.model.as_deref()).collect(),
        tokens: batch.iter().map(|m| m.tokens).collect(),
        now,
    })
    .load(pg)?;
    if rows.len() != batch.len() {
        return Err(unexpected(format!(
            "switchboard_append answered {} rows for {} messages",
            rows.len(),
            batch.len()
        )));
    }
    let mut outcomes: Vec<Result<Appended, Rejected>> = Vec::with_capacity(batch.len());
    for (row, m) in rows.into_iter().zip(batch) {
        let outcome = match row.outcome.as_str() {
            "stored" => Ok(Appended {
                message: m.stored_as(
                    row.seq
                        .ok_or_else(|| unexpected("a stored message without seq"))?,
                    now,
                ),
                duplicate: false,
            }),
            "duplicate" => Ok(Appended {
                message: row.stored_copy(&m.session_id)?,
                duplicate: true,
            }),
            "repeat" => {
                // The first copy is earlier in this batch, so already decided.
                let first = usize::try_from(row.first_ord - 1)
                    .ok()
                    .and_then(|i| outcomes.get(i))
                    .ok_or_else(|| unexpected("a repeat of no earlier message"))?;
                repeat_of(first)
            }
            "not_found" => Err(Rejected::SessionNotFound),
            "not_active" => Err(Rejected::SessionNotActive(row.status.unwrap_or_default())),
            other => return Err(unexpected(format!("switchboard_append answered `{other}`"))),
        };
        outcomes.push(outcome);
    }
    Ok(outcomes)
}

/// One outcome of `switchboard_append`; the message's columns only for a `duplicate`.
#[derive(QueryableByName)]
struct AppendRow {
    #[diesel(sql_type = Text)]
    outcome: String,
    #[diesel(sql_type = Nullable<BigInt>)]
    seq: Option<i64>,
    #[diesel(sql_type = Nullable<Text>)]
    status: Option<String>,
    #[diesel(sql_type = Integer)]
    first_ord: i32,
    #[diesel(sql_type = Nullable<BigInt>)]
    id: Option<i64>,
    #[diesel(sql_type = Nullable<Text>)]
    role: Option<String>,
    #[diesel(sql_type = Nullable<Text>)]
    author_id: Option<String>,
    #[diesel(sql_type = Nullable<Text>)]
    content: Option<String>,
    #[diesel(sql_type = Nullable<Text>)]
    client_id: Option<String>,
    #[diesel(sql_type = Nullable<Bool>)]
    interrupted: Option<bool>,
    #[diesel(sql_type = Nullable<Text>)]
    model: Option<String>,
    #[diesel(sql_type = Nullable<Integer>)]
    tokens: Option<i32>,
    #[diesel(sql_type = Nullable<Timestamp>)]
    created_at: Option<NaiveDateTime>,
}

impl AppendRow {
    /// The stored message a `duplicate` row carries.
    fn stored_copy(self, session_id: &str) -> QueryResult<ChatMessage> {
        let missing = || unexpected("a duplicate without its stored message");
        Ok(ChatMessage {
            id: self.id.ok_or_else(missing)?,
            session_id: session_id.to_string(),
            seq: self.seq.ok_or_else(missing)?,
            role: self.role.ok_or_else(missing)?,
            author_id: self.author_id,
            content: self.content.ok_or_else(missing)?,
            client_id: self.client_id,
            interrupted: self.interrupted.ok_or_else(missing)?,
            model: self.model,
            tokens: self.tokens,
            created_at: self.created_at.ok_or_else(missing)?,
        })
    }
}

/// The outcome of a client id repeated within a batch: its first copy's, as a duplicate.
fn repeat_of(first: &Result<Appended, Rejected>) -> Result<Appended, Rejected> {
    first.clone().map(|a| Appended {
        duplicate: true,
        ..a
    })
}

/// An answer from the database that breaks `switchboard_append`'s contract.
fn unexpected(what: impl Into<String>) -> diesel::result::Error {
    diesel::result::Error::DeserializationError(what.into().into())
}

/// SQLite: the same rules in this process, a statement at a time (in-process, a statement
/// costs little), in one transaction.
fn append_batch_sqlite(
    sqlite: &mut SqliteConnection,
    batch: &[NewMessage],
) -> QueryResult<Vec<Result<Appended, Rejected>>> {
    sqlite.transaction(|conn| {
        let now = super::now();
        let mut ids: Vec<&str> = batch.iter().map(|m| m.session_id.as_str()).collect();
        ids.sort_unstable();
        ids.dedup();
        // The conversations' rows first: an UPDATE that changes nothing takes the write lock
        // at the start of the transaction, so a reader cannot be refused the upgrade
        // half-way. Each row is written once, at the end, and only where a message was stored.
        let sessions: HashMap<String, (String, i64)> = Kept(LockSessions {
            ids: &to_json(&ids)?,
        })
        .load::<SessionSeq>(conn)?
        .into_iter()
        .map(|s| (s.id, (s.status, s.last_seq)))
        .collect();
        // Messages of this batch whose client id is already stored, found in one query.
        let pairs: Vec<(&str, &str)> = batch
            .iter()
            .filter_map(|m| Some((m.session_id.as_str(), m.client_id.as_deref()?)))
            .collect();
        let mut stored: HashMap<(String, String), ChatMessage> = HashMap::new();
        let found = stored_ids(conn, &pairs)?;
        if !found.is_empty() {
            let found = chat_messages::table
                .filter(chat_messages::id.eq_any(&found))
                .select(ChatMessage::as_select())
                .load(conn)?;
            for m in found {
                if let Some(client_id) = m.client_id.clone() {
                    stored.insert((m.session_id.clone(), client_id), m);
                }
            }
        }
        let mut next: HashMap<&str, i64> = HashMap::new();
        let mut seen: HashMap<(&str, &str), usize> = HashMap::new();
        let mut outcomes: Vec<Result<Appended, Rejected>> = Vec::with_capacity(batch.len());
        // Indexes into `outcomes` of the messages to insert.
        let mut inserts: Vec<usize> = Vec::with_capacity(batch.len());

        for (i, m) in batch.iter().enumerate() {
            let Some((status, last_seq)) = sessions.get(&m.session_id) else {
                outcomes.push(Err(Rejected::SessionNotFound));
                continue;
            };
            if let Some(client_id) = m.client_id.as_deref() {
                if let Some(&first) = seen.get(&(m.session_id.as_str(), client_id)) {
                    outcomes.push(repeat_of(&outcomes[first]));
                    continue;
                }
                seen.insert((m.session_id.as_str(), client_id), i);
                let key = (m.session_id.clone(), client_id.to_string());
                if let Some(message) = stored.remove(&key) {
                    outcomes.push(Ok(Appended {
                        message,
                        duplicate: true,
                    }));
                    continue;
                }
            }
            if status != ACTIVE {
                outcomes.push(Err(Rejected::SessionNotActive(status.clone())));
                continue;
            }
            let seq = next.entry(m.session_id.as_str()).or_insert(*last_seq);
            *seq += 1;
            let message = m.stored_as(*seq, now);
            inserts.push(outcomes.len());
            outcomes.push(Ok(Appended {
                message,
                duplicate: false,
            }));
        }
        for &i in &inserts {
            if let Ok(a) = &outcomes[i] {
                diesel::insert_into(chat_messages::table)
                    .values(insert_row(&a.message))
                    .execute(conn)?;
            }
        }
        for (id, seq) in next {
            Kept(SetLastSeq { id, seq, at: now }).execute(conn)?;
        }
        Ok(outcomes)
    })
}

#[derive(QueryableByName)]
struct FoundId {
    #[diesel(sql_type = BigInt)]
    id: i64,
}

/// Ids of the stored messages with any of these (conversation, client id) pairs: one lookup
/// in the `(session_id, client_id)` index per pair. (Two IN lists, one of conversations and
/// one of client ids, made SQLite probe every combination: 65,536 probes for a batch of 256
/// messages in 256 conversations.)
fn stored_ids(conn: &mut SqliteConnection, pairs: &[(&str, &str)]) -> QueryResult<Vec<i64>> {
    if pairs.is_empty() {
        return Ok(Vec::new());
    }
    let found: Vec<FoundId> = Kept(StoredIdsSqlite {
        pairs: &to_json(pairs)?,
    })
    .load(conn)?;
    Ok(found.into_iter().map(|f| f.id).collect())
}

fn to_json<T: Serialize + ?Sized>(value: &T) -> QueryResult<String> {
    serde_json::to_string(value).map_err(|e| diesel::result::Error::SerializationError(Box::new(e)))
}

/// PostgreSQL: a batch, one array per column, in the batch's order.
struct AppendPg<'a> {
    sessions: Vec<&'a str>,
    roles: Vec<&'a str>,
    authors: Vec<Option<&'a str>>,
    contents: Vec<&'a str>,
    clients: Vec<Option<&'a str>>,
    interrupted: Vec<bool>,
    models: Vec<Option<&'a str>>,
    tokens: Vec<Option<i32>>,
    now: NaiveDateTime,
}

impl Statement for AppendPg<'_> {
    const SQL: &'static str = "SELECT * FROM switchboard_append(?, ?, ?, ?, ?, ?, ?, ?, ?)";
    type Key = AppendPg<'static>;
}

impl BindTo<Pg> for AppendPg<'_> {
    fn bind<'b>(&'b self, values: &mut Values<'_, '_, 'b, Pg>) -> QueryResult<()> {
        values.push::<Array<Text>, _>(&self.sessions)?;
        values.push::<Array<Text>, _>(&self.roles)?;
        values.push::<Array<Nullable<Text>>, _>(&self.authors)?;
        values.push::<Array<Text>, _>(&self.contents)?;
        values.push::<Array<Nullable<Text>>, _>(&self.clients)?;
        values.push::<Array<Bool>, _>(&self.interrupted)?;
        values.push::<Array<Nullable<Text>>, _>(&self.models)?;
        values.push::<Array<Nullable<Integer>>, _>(&self.tokens)?;
        values.push::<Timestamp, _>(&self.now)
    }
}

// SQLite: the group commit's own statements, kept prepared (see `crate::db::kept`).

/// SQLite: the conversations of a batch (a JSON array of ids), with the write lock taken by an
/// UPDATE that changes nothing.
struct LockSessions<'a> {
    ids: &'a str,
}

impl Statement for LockSessions<'_> {
    const SQL: &'static str = "UPDATE chat_sessions SET updated_at = updated_at \
         WHERE id IN (SELECT value FROM json_each(?)) RETURNING id, status, last_seq";
    type Key = LockSessions<'static>;
}

impl BindTo<Sqlite> for LockSessions<'_> {
    fn bind<'b>(&'b self, values: &mut Values<'_, '_, 'b, Sqlite>) -> QueryResult<()> {
        values.push::<Text, _>(self.ids)
    }
}

#[derive(QueryableByName)]
struct SessionSeq {
    #[diesel(sql_type = Text)]
    id: String,
    #[diesel(sql_type = Text)]
    status: String,
    #[diesel(sql_type = BigInt)]
    last_seq: i64,
}

/// SQLite: the pairs are a JSON array of `[session_id, client_id]`; CROSS JOIN keeps them as
/// the outer loop.
struct StoredIdsSqlite<'a> {
    pairs: &'a str,
}

impl Statement for StoredIdsSqlite<'_> {
    const SQL: &'static str = "SELECT m.id FROM json_each(?) AS p CROSS JOIN chat_messages m \
         ON m.session_id = json_extract(p.value, '$[0]') \
         AND m.client_id = json_extract(p.value, '$[1]')";
    type Key = StoredIdsSqlite<'static>;
}

impl BindTo<Sqlite> for StoredIdsSqlite<'_> {
    fn bind<'b>(&'b self, values: &mut Values<'_, '_, 'b, Sqlite>) -> QueryResult<()> {
        values.push::<Text, _>(self.pairs)
    }
}

/// SQLite: one conversation's newest seq, a statement each (in-process, that costs little).
struct SetLastSeq<'a> {
    id: &'a str,
    seq: i64,
    at: NaiveDateTime,
}

impl Statement for SetLastSeq<'_> {
    const SQL: &'static str = "UPDATE chat_sessions SET last_seq = ?, updated_at = ? WHERE id = ?";
    type Key = SetLastSeq<'static>;
}

impl BindTo<Sqlite> for SetLastSeq<'_> {
    fn bind<'b>(&'b self, values: &mut Values<'_, '_, 'b, Sqlite>) -> QueryResult<()> {
        values.push::<BigInt, _>(&self.seq)?;
        values.push::<Timestamp, _>(&self.at)?;
        values.push::<Text, _>(self.id)
    }
}

/// The columns of one new `chat_messages` row.
#[allow(clippy::type_complexity)]
fn insert_row(
    m: &ChatMessage,
) -> (
    diesel::dsl::Eq<chat_messages::session_id, &String>,
    diesel::dsl::Eq<chat_messages::seq, i64>,
    diesel::dsl::Eq<chat_messages::role, &String>,
    diesel::dsl::Eq<chat_messages::author_id, &Option<String>>,
    diesel::dsl::Eq<chat_messages::content, &String>,
    diesel::dsl::Eq<chat_messages::client_id, &Option<String>>,
    diesel::dsl::Eq<chat_messages::interrupted, bool>,
    diesel::dsl::Eq<chat_messages::model, &Option<String>>,
    diesel::dsl::Eq<chat_messages::tokens, Option<i32>>,
    diesel::dsl::Eq<chat_messages::created_at, NaiveDateTime>,
) {
    (
        chat_messages::session_id.eq(&m.session_id),
        chat_messages::seq.eq(m.seq),
        chat_messages::role.eq(&m.role),
        chat_messages::author_id.eq(&m.author_id),
        chat_messages::content.eq(&m.content),
        chat_messages::client_id.eq(&m.client_id),
        chat_messages::interrupted.eq(m.interrupted),
        chat_messages::model.eq(&m.model),
        chat_messages::tokens.eq(m.tokens),
        chat_messages::created_at.eq(m.created_at),
    )
}

/// Oldest first or newest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Order {
    Asc,
    Desc,
}

/// A page of history. Ascending pages start after `cursor`, descending pages before it.
pub fn page(
    conn: &mut DbConnection,
    session_id: &str,
    order: Order,
    cursor: Option<i64>,
    limit: i64,
) -> QueryResult<Vec<ChatMessage>> {
    let mut query = chat_messages::table
        .filter(chat_messages::session_id.eq(session_id.to_string()))
        .select(ChatMessage::as_select())
        .limit(limit)
        .into_boxed();
    query = match order {
        Order::Asc => query.order(chat_messages::seq.asc()),
        Order::Desc => query.order(chat_messages::seq.desc()),
    };
    if let Some(c) = cursor {
        query = match order {
            Order::Asc => query.filter(chat_messages::seq.gt(c)),
            Order::Desc => query.filter(chat_messages::seq.lt(c)),
        };
    }
    query.load(conn)
}

/// Every message and its row count for a conversation (tests and check tools).
pub fn count(conn: &mut DbConnection, session_id: &str) -> QueryResult<i64> {
    chat_messages::table
        .filter(chat_messages::session_id.eq(session_id))
        .count()
        .get_result(conn)
}
