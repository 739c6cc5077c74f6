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
    // IMMEDIATE takes the write lock at BEGIN, so a reader cannot be refused the upgrade
    // half-way. Each conversation's row is written once, at the end, and only where a message
    // was stored.
    sqlite.immediate_transaction(|conn| {
        let now = super::now();
        // Every timestamp of the batch is `now`: formatted once, as Diesel stores one.
        let at = now.format(SQLITE_TIME).to_string();
        let mut ids: Vec<&str> = batch.iter().map(|m| m.session_id.as_str()).collect();
        ids.sort_unstable();
        ids.dedup();
        let mut sessions: HashMap<&str, (String, i64)> = HashMap::with_capacity(ids.len());
        for id in ids {
            // One prepared lookup by primary key each: a batch holds few conversations.
            if let Some(s) = Kept(SessionSeqOf { id }).load::<SessionSeq>(conn)?.pop() {
                sessions.insert(id, (s.status, s.last_seq));
            }
        }
        // Messages of this batch whose client id is already stored.
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
            let Some((status, last_seq)) = sessions.get(m.session_id.as_str()) else {
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
                Kept(InsertMessage {
                    message: &a.message,
                    at: &at,
                })
                .execute(conn)?;
            }
        }
        for (id, seq) in next {
            Kept(SetLastSeq { id, seq, at: &at }).execute(conn)?;
        }
        Ok(outcomes)
    })
}

#[derive(QueryableByName)]
struct FoundId {
    #[diesel(sql_type = BigInt)]
    id: i64,
}

/// Ids of the stored messages with any of these (conversation, client id) pairs: one prepared
/// lookup in the `(session_id, client_id)` index per pair.
fn stored_ids(conn: &mut SqliteConnection, pairs: &[(&str, &str)]) -> QueryResult<Vec<i64>> {
    let mut ids = Vec::new();
    for &(session_id, client_id) in pairs {
        let found: Vec<FoundId> = Kept(StoredIdOf {
            session_id,
            client_id,
        })
        .load(conn)?;
        ids.extend(found.into_iter().map(|f| f.id));
    }
    Ok(ids)
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

/// How Diesel writes a timestamp into SQLite (as text), for values bound as text.
const SQLITE_TIME: &str = "%F %T%.f";

/// SQLite: one conversation's status and newest seq.
struct SessionSeqOf<'a> {
    id: &'a str,
}

impl Statement for SessionSeqOf<'_> {
    const SQL: &'static str = "SELECT status, last_seq FROM chat_sessions WHERE id = ?";
    type Key = SessionSeqOf<'static>;
}

impl BindTo<Sqlite> for SessionSeqOf<'_> {
    fn bind<'b>(&'b self, values: &mut Values<'_, '_, 'b, Sqlite>) -> QueryResult<()> {
        values.push::<Text, _>(self.id)
    }
}

#[derive(QueryableByName)]
struct SessionSeq {
    #[diesel(sql_type = Text)]
    status: String,
    #[diesel(sql_type = BigInt)]
    last_seq: i64,
}

/// SQLite: the stored message with this client id in this conversation, if any.
struct StoredIdOf<'a> {
    session_id: &'a str,
    client_id: &'a str,
}

impl Statement for StoredIdOf<'_> {
    const SQL: &'static str = "SELECT id FROM chat_messages WHERE session_id = ? AND client_id = ?";
    type Key = StoredIdOf<'static>;
}

impl BindTo<Sqlite> for StoredIdOf<'_> {
    fn bind<'b>(&'b self, values: &mut Values<'_, '_, 'b, Sqlite>) -> QueryResult<()> {
        values.push::<Text, _>(self.session_id)?;
        values.push::<Text, _>(self.client_id)
    }
}

/// SQLite: one conversation's newest seq, a statement each (in-process, that costs little).
struct SetLastSeq<'a> {
    id: &'a str,
    seq: i64,
    /// The batch's time as [`SQLITE_TIME`].
    at: &'a str,
}

impl Statement for SetLastSeq<'_> {
    const SQL: &'static str = "UPDATE chat_sessions SET last_seq = ?, updated_at = ? WHERE id = ?";
    type Key = SetLastSeq<'static>;
}

impl BindTo<Sqlite> for SetLastSeq<'_> {
    fn bind<'b>(&'b self, values: &mut Values<'_, '_, 'b, Sqlite>) -> QueryResult<()> {
        values.push::<BigInt, _>(&self.seq)?;
        values.push::<Text, _>(self.at)?;
        values.push::<Text, _>(self.id)
    }
}

/// SQLite: one new `chat_messages` row.
struct InsertMessage<'a> {
    message: &'a ChatMessage,
    /// `message.created_at` as [`SQLITE_TIME`].
    at: &'a str,
}

impl Statement for InsertMessage<'_> {
    const SQL: &'static str = "INSERT INTO chat_messages (session_id, seq, role, author_id, \
         content, client_id, interrupted, model, tokens, created_at) \
         VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)";
    type Key = InsertMessage<'static>;
}

impl BindTo<Sqlite> for InsertMessage<'_> {
    fn bind<'b>(&'b self, values: &mut Values<'_, '_, 'b, Sqlite>) -> QueryResult<()> {
        let m = self.message;
        values.push::<Text, _>(&m.session_id)?;
        values.push::<BigInt, _>(&m.seq)?;
        values.push::<Text, _>(&m.role)?;
        values.push::<Nullable<Text>, _>(&m.author_id)?;
        values.push::<Text, _>(&m.content)?;
        values.push::<Nullable<Text>, _>(&m.client_id)?;
        values.push::<Bool, _>(&m.interrupted)?;
        values.push::<Nullable<Text>, _>(&m.model)?;
        values.push::<Nullable<Integer>, _>(&m.tokens)?;
        values.push::<Text, _>(self.at)
    }
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
