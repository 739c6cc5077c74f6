//! The agent desk's queries: conversation summaries for the dashboard, takeover and release
//! (conditional updates, so that concurrent agents on any node cannot both win), and the
//! human queue (`chat_sessions.human_requested_at`).

use std::collections::HashMap;

use chrono::NaiveDateTime;
use diesel::prelude::*;

use super::session::{ChatSession, ACTIVE, MODE_AI, MODE_HUMAN};
use crate::db::schema::{chat_messages, chat_sessions, users};
use crate::db::DbConnection;

/// Characters of the last message shown in a summary.
pub const PREVIEW_CHARS: usize = 200;

/// A conversation as the dashboard lists it, read from the database. Whether its customer is
/// online is live state, added by the caller.
#[derive(Debug, Clone)]
pub struct Summary {
    pub session: ChatSession,
    pub customer_email: Option<String>,
    pub agent_email: Option<String>,
    pub last_message: Option<LastMessage>,
    /// The oldest customer message not answered by anyone since.
    pub waiting_since: Option<NaiveDateTime>,
}

#[derive(Debug, Clone)]
pub struct LastMessage {
    pub seq: i64,
    pub role: String,
    /// At most [`PREVIEW_CHARS`] characters.
    pub content: String,
    pub created_at: NaiveDateTime,
}

/// Summaries of the conversations with these ids, in the order given (unknown ids left out).
pub fn summaries(conn: &mut DbConnection, ids: &[String]) -> QueryResult<Vec<Summary>> {
    let sessions: Vec<ChatSession> = chat_sessions::table
        .filter(chat_sessions::id.eq_any(ids))
        .select(ChatSession::as_select())
        .load(conn)?;
    let mut by_id: HashMap<String, ChatSession> =
        sessions.into_iter().map(|s| (s.id.clone(), s)).collect();
    let mut user_ids: Vec<String> = by_id
        .values()
        .flat_map(|s| std::iter::once(s.user_id.clone()).chain(s.assigned_agent_id.clone()))
        .collect();
    user_ids.sort_unstable();
    user_ids.dedup();
    let emails: HashMap<String, String> = users::table
        .filter(users::id.eq_any(&user_ids))
        .select((users::id, users::email))
        .load::<(String, String)>(conn)?
        .into_iter()
        .collect();
    let mut out = Vec::with_capacity(ids.len());
    for id in ids {
        let Some(session) = by_id.remove(id) else {
            continue;
        };
        let last_message = last_message(conn, &session)?;
        let waiting_since = waiting_since(conn, &session.id)?;
        out.push(Summary {
            customer_email: emails.get(&session.user_id).cloned(),
            agent_email: session
                .assigned_agent_id
                .as_ref()
                .and_then(|a| emails.get(a).cloned()),
            session,
            last_message,
            waiting_since,
        });
    }
    Ok(out)
}

fn last_message(conn: &mut DbConnection, s: &ChatSession) -> QueryResult<Option<LastMessage>> {
    let found = chat_messages::table
        .filter(chat_messages::session_id.eq(&s.id))
        .filter(chat_messages::seq.eq(s.last_seq))
        .select((
            chat_messages::seq,
            chat_messages::role,
            chat_messages::content,
            chat_messages::created_at,
        ))
        .first::<(i64, String, String, NaiveDateTime)>(conn)
        .optional()?;
    Ok(found.map(|(seq, role, content, created_at)| LastMessage {
        seq,
        role,
        content: content.chars().take(PREVIEW_CHARS).collect(),
        created_at,
    }))
}

fn waiting_since(conn: &mut DbConnection, session_id: &str) -> QueryResult<Option<NaiveDateTime>> {
    let answered: Option<i64> = chat_messages::table
        .filter(chat_messages::session_id.eq(session_id))
        .filter(chat_messages::role.eq_any(["assistant", "agent"]))
        .select(diesel::dsl::max(chat_messages::seq))
        .first(conn)?;
    chat_messages::table
        .filter(chat_messages::session_id.eq(session_id))
        .filter(chat_messages::role.eq("user"))
        .filter(chat_messages::seq.gt(answered.unwrap_or(0)))
        .select(diesel::dsl::min(chat_messages::created_at))
        .first(conn)
}

/// Ids of the active conversations, most recently changed first, at most `limit`.
pub fn active_ids(conn: &mut DbConnection, limit: i64) -> QueryResult<Vec<String>> {
    chat_sessions::table
        .filter(chat_sessions::status.eq(ACTIVE))
        .order((chat_sessions::updated_at.desc(), chat_sessions::id.desc()))
        .select(chat_sessions::id)
        .limit(limit)
        .load(conn)
}

/// Ids of the conversations waiting for a human, oldest request first, at most `limit`.
pub fn queue_ids(conn: &mut DbConnection, limit: i64) -> QueryResult<Vec<String>> {
    chat_sessions::table
        .filter(chat_sessions::human_requested_at.is_not_null())
        .filter(chat_sessions::status.eq(ACTIVE))
        .order((
            chat_sessions::human_requested_at.asc(),
            chat_sessions::id.asc(),
        ))
        .select(chat_sessions::id)
        .limit(limit)
        .load(conn)
}

/// Conversations in which the AI must not answer now: taken over, or waiting for a human.
/// Read when a node starts, so that a restart does not wake the AI in them.
pub fn held(conn: &mut DbConnection) -> QueryResult<Vec<ChatSession>> {
    chat_sessions::table
        .filter(chat_sessions::status.eq(ACTIVE))
        .filter(
            chat_sessions::mode
                .eq(MODE_HUMAN)
                .or(chat_sessions::human_requested_at.is_not_null()),
        )
        .select(ChatSession::as_select())
        .load(conn)
}

/// Why a desk change was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refused {
    NotFound,
    /// The conversation is closed or deleted.
    NotActive,
    /// Another agent holds it (takeover).
    AlreadyAssigned,
    /// The caller does not hold it (release).
    NotAssigned,
}

/// Assigns the conversation to `agent_id` in human mode, unless another agent holds it. One
/// conditional UPDATE: of several agents on any number of nodes, exactly one changes the row.
/// Taking over again what one already holds succeeds. Clears a pending request for a human.
pub fn take_over(
    conn: &mut DbConnection,
    session_id: &str,
    agent_id: &str,
) -> QueryResult<Result<ChatSession, Refused>> {
    let now = super::now();
    let changed = diesel::update(
        chat_sessions::table
            .find(session_id)
            .filter(chat_sessions::status.eq(ACTIVE))
            .filter(
                chat_sessions::assigned_agent_id
                    .is_null()
                    .or(chat_sessions::assigned_agent_id.eq(agent_id)),
            ),
    )
    .set((
        chat_sessions::mode.eq(MODE_HUMAN),
        chat_sessions::assigned_agent_id.eq(Some(agent_id)),
        chat_sessions::human_requested_at.eq(None::<NaiveDateTime>),
        chat_sessions::updated_at.eq(now),
    ))
    .execute(conn)?;
    let found = super::session::find(conn, session_id)?;
    Ok(match found {
        None => Err(Refused::NotFound),
        Some(s) if changed == 1 => Ok(s),
        Some(s) if s.status != ACTIVE => Err(Refused::NotActive),
        Some(_) => Err(Refused::AlreadyAssigned),
    })
}

/// Hands the conversation back to the AI. Only the assigned agent may, or anyone when
/// `any_agent` (admins).
pub fn release(
    conn: &mut DbConnection,
    session_id: &str,
    agent_id: &str,
    any_agent: bool,
) -> QueryResult<Result<ChatSession, Refused>> {
    let now = super::now();
    let values = (
        chat_sessions::mode.eq(MODE_AI),
        chat_sessions::assigned_agent_id.eq(None::<String>),
        chat_sessions::updated_at.eq(now),
    );
    let held = chat_sessions::table
        .find(session_id)
        .filter(chat_sessions::mode.eq(MODE_HUMAN));
    let changed = if any_agent {
        diesel::update(held).set(values).execute(conn)?
    } else {
        diesel::update(held.filter(chat_sessions::assigned_agent_id.eq(agent_id)))
            .set(values)
            .execute(conn)?
    };
    Ok(match super::session::find(conn, session_id)? {
        None => Err(Refused::NotFound),
        Some(s) if changed == 1 => Ok(s),
        Some(_) => Err(Refused::NotAssigned),
    })
}

/// Puts the conversation in the human queue. Asking again while waiting keeps the first time;
/// a conversation an agent already holds is not queued (the answer is its current state).
pub fn request_human(
    conn: &mut DbConnection,
    session_id: &str,
) -> QueryResult<Result<ChatSession, Refused>> {
    let now = super::now();
    diesel::update(
        chat_sessions::table
            .find(session_id)
            .filter(chat_sessions::status.eq(ACTIVE))
            .filter(chat_sessions::mode.eq(MODE_AI))
            .filter(chat_sessions::human_requested_at.is_null()),
    )
    .set((
        chat_sessions::human_requested_at.eq(Some(now)),
        chat_sessions::updated_at.eq(now),
    ))
    .execute(conn)?;
    Ok(match super::session::find(conn, session_id)? {
        None => Err(Refused::NotFound),
        Some(s) if s.status != ACTIVE => Err(Refused::NotActive),
        Some(s) => Ok(s),
    })
}

/// Takes the conversation out of the human queue when it asked at `requested_at` and nobody
/// took it; true when it was still waiting (a takeover or a newer request leaves it alone).
pub fn human_wait_over(
    conn: &mut DbConnection,
    session_id: &str,
    requested_at: NaiveDateTime,
) -> QueryResult<bool> {
    let changed = diesel::update(
        chat_sessions::table
            .find(session_id)
            .filter(chat_sessions::human_requested_at.eq(requested_at)),
    )
    .set((
        chat_sessions::human_requested_at.eq(None::<NaiveDateTime>),
        chat_sessions::updated_at.eq(super::now()),
    ))
    .execute(conn)?;
    Ok(changed == 1)
}

/// Leaves the human queue when the conversation is closed or deleted.
pub fn clear_request(conn: &mut DbConnection, session_id: &str) -> QueryResult<()> {
    diesel::update(chat_sessions::table.find(session_id))
        .set(chat_sessions::human_requested_at.eq(None::<NaiveDateTime>))
        .execute(conn)?;
    Ok(())
}

/// Active flag and role of each user, for the check of live sockets.
pub fn accounts(
    conn: &mut DbConnection,
    ids: &[String],
) -> QueryResult<HashMap<String, (bool, String)>> {
    Ok(users::table
        .filter(users::id.eq_any(ids))
        .select((users::id, users::is_active, users::role))
        .load::<(String, bool, String)>(conn)?
        .into_iter()
        .map(|(id, active, role)| (id, (active, role)))
        .collect())
}
