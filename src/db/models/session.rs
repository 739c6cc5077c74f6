use chrono::NaiveDateTime;
use diesel::prelude::*;
use serde::Serialize;

use crate::db::schema::chat_sessions;
use crate::db::DbConnection;

pub const ACTIVE: &str = "active";
pub const CLOSED: &str = "closed";
pub const DELETED: &str = "deleted";
pub const MODE_AI: &str = "ai";
pub const MODE_HUMAN: &str = "human";

#[derive(Debug, Clone, Queryable, Selectable, Serialize)]
#[diesel(table_name = chat_sessions)]
pub struct ChatSession {
    pub id: String,
    pub user_id: String,
    pub title: String,
    pub status: String,
    pub mode: String,
    pub assigned_agent_id: Option<String>,
    pub last_seq: i64,
    #[serde(serialize_with = "crate::db::models::serialize_time")]
    pub created_at: NaiveDateTime,
    #[serde(serialize_with = "crate::db::models::serialize_time")]
    pub updated_at: NaiveDateTime,
    #[serde(serialize_with = "crate::db::models::serialize_opt_time")]
    pub deleted_at: Option<NaiveDateTime>,
    /// When the customer asked for a human and is still waiting; `None` otherwise.
    #[serde(serialize_with = "crate::db::models::serialize_opt_time")]
    pub human_requested_at: Option<NaiveDateTime>,
}

/// Where a page of conversations starts: strictly older than this (created_at, id).
#[derive(Debug, Clone, PartialEq)]
pub struct Cursor {
    pub created_at: NaiveDateTime,
    pub id: String,
}

pub fn create(
    conn: &mut DbConnection,
    id: &str,
    user_id: &str,
    title: &str,
) -> QueryResult<ChatSession> {
    let now = super::now();
    diesel::insert_into(chat_sessions::table)
        .values((
            chat_sessions::id.eq(id),
            chat_sessions::user_id.eq(user_id),
            chat_sessions::title.eq(title),
            chat_sessions::status.eq(ACTIVE),
            chat_sessions::mode.eq(MODE_AI),
            chat_sessions::last_seq.eq(0i64),
            chat_sessions::created_at.eq(now),
            chat_sessions::updated_at.eq(now),
        ))
        .execute(conn)?;
    chat_sessions::table
        .find(id)
        .select(ChatSession::as_select())
        .first(conn)
}

pub fn find(conn: &mut DbConnection, id: &str) -> QueryResult<Option<ChatSession>> {
    chat_sessions::table
        .find(id)
        .select(ChatSession::as_select())
        .first(conn)
        .optional()
}

/// One page, newest first. `owner` limits to one user's conversations (deleted ones hidden);
/// `status` filters by status (for the admin list).
pub fn list(
    conn: &mut DbConnection,
    owner: Option<&str>,
    status: Option<&str>,
    cursor: Option<&Cursor>,
    limit: i64,
) -> QueryResult<Vec<ChatSession>> {
    let mut query = chat_sessions::table
        .select(ChatSession::as_select())
        .order((chat_sessions::created_at.desc(), chat_sessions::id.desc()))
        .limit(limit)
        .into_boxed();
    if let Some(owner) = owner {
        query = query
            .filter(chat_sessions::user_id.eq(owner.to_string()))
            .filter(chat_sessions::status.ne(DELETED));
    }
    if let Some(status) = status {
        query = query.filter(chat_sessions::status.eq(status.to_string()));
    }
    if let Some(c) = cursor {
        query = query.filter(
            chat_sessions::created_at
                .lt(c.created_at)
                .or(chat_sessions::created_at
                    .eq(c.created_at)
                    .and(chat_sessions::id.lt(c.id.clone()))),
        );
    }
    query.load(conn)
}

/// Why a status change was refused.
#[derive(Debug)]
pub enum StatusChange {
    Done(Box<ChatSession>),
    NotFound,
    /// Restore asked for a conversation deleted longer ago than the window allows,
    /// or one that is not deleted.
    NotRestorable,
}

/// Closes, soft-deletes or restores. Restore brings a deleted conversation back to `active`
/// when it was deleted less than `restore_window` ago.
pub fn set_status(
    conn: &mut DbConnection,
    id: &str,
    status: &str,
    restore_window: chrono::Duration,
) -> QueryResult<StatusChange> {
    let now = super::now();
    let target = chat_sessions::table.find(id);
    let changed = match status {
        DELETED => diesel::update(target.filter(chat_sessions::status.ne(DELETED)))
            .set((
                chat_sessions::status.eq(DELETED),
                chat_sessions::deleted_at.eq(Some(now)),
                chat_sessions::human_requested_at.eq(None::<NaiveDateTime>),
                chat_sessions::updated_at.eq(now),
            ))
            .execute(conn)?,
        ACTIVE => diesel::update(
            target
                .filter(chat_sessions::status.eq(DELETED))
                .filter(chat_sessions::deleted_at.gt(now - restore_window)),
        )
        .set((
            chat_sessions::status.eq(ACTIVE),
            chat_sessions::deleted_at.eq(None::<NaiveDateTime>),
            chat_sessions::updated_at.eq(now),
        ))
        .execute(conn)?,
        _ => diesel::update(target.filter(chat_sessions::status.eq(ACTIVE)))
            .set((
                chat_sessions::status.eq(status),
                // A closed conversation leaves the human queue.
                chat_sessions::human_requested_at.eq(None::<NaiveDateTime>),
                chat_sessions::updated_at.eq(now),
            ))
            .execute(conn)?,
    };
    match find(conn, id)? {
        None => Ok(StatusChange::NotFound),
        Some(_) if changed == 0 && status == ACTIVE => Ok(StatusChange::NotRestorable),
        Some(s) => Ok(StatusChange::Done(Box::new(s))),
    }
}
