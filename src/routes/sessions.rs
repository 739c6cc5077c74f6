//! Conversations and their history over HTTP.
//!
//! A customer sees only their own conversations: anyone else's answers 404, exactly as an
//! unknown id does. Agents and admins see every conversation and manage them under
//! `/admin/chat/sessions`.

use actix_web::{web, HttpRequest, HttpResponse};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use serde::{Deserialize, Serialize};

use super::{check_field, page_limit};
use crate::actors::session_manager::messages::{
    AppendFailure, ConversationCreated, Origin, PostMessage, StatusChanged,
};
use crate::auth::{AuthUser, Staff};
use crate::db::models::message::{self, Order, Rejected};
use crate::db::models::session::{self, Cursor, StatusChange};
use crate::db::models::{ChatMessage, ChatSession, Role};
use crate::error::ApiError;
use crate::startup::AppState;

const MAX_TITLE_BYTES: usize = 200;

pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.service(web::resource("/chat/sessions").post(create).get(list_own))
        .service(web::resource("/chat/sessions/{id}").get(get))
        .service(
            web::resource("/chat/sessions/{id}/messages")
                .get(messages)
                .post(post_message),
        );
}

pub fn admin_routes(cfg: &mut web::ServiceConfig) {
    cfg.service(web::resource("/admin/chat/sessions").get(list_all))
        .service(
            web::resource("/admin/chat/sessions/{id}")
                .get(admin_get)
                .delete(delete),
        )
        .service(web::resource("/admin/chat/sessions/{id}/close").post(close))
        .service(web::resource("/admin/chat/sessions/{id}/restore").post(restore));
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct CreateSession {
    #[serde(default)]
    title: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SessionPage {
    cursor: Option<String>,
    limit: Option<i64>,
    status: Option<String>,
}

#[derive(Serialize)]
struct SessionList {
    sessions: Vec<ChatSession>,
    next_cursor: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MessagePage {
    /// `asc` (oldest first, the default) or `desc` (newest first).
    order: Option<String>,
    /// A seq: ascending pages start after it, descending pages before it.
    cursor: Option<i64>,
    limit: Option<i64>,
}

#[derive(Serialize)]
struct MessageList {
    messages: Vec<ChatMessage>,
    next_cursor: Option<i64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewPost {
    content: String,
    client_id: Option<String>,
    /// Optional; when given it must be the caller's own role (`user` for customers, `agent`).
    role: Option<String>,
}

async fn create(
    state: web::Data<AppState>,
    caller: AuthUser,
    req: HttpRequest,
    body: web::Bytes,
) -> Result<HttpResponse, ApiError> {
    // The body is optional: no body means an untitled conversation.
    let body: CreateSession = super::optional_json(&req, &body)?.unwrap_or_default();
    let title = body.title.unwrap_or_default();
    check_field("title", &title, MAX_TITLE_BYTES)?;
    let id = uuid::Uuid::new_v4().to_string();
    let created = state
        .db
        .run(move |c| Ok(session::create(c, &id, &caller.id, title.trim())?))
        .await?;
    state.manager.do_send(ConversationCreated {
        session_id: created.id.clone(),
    });
    Ok(super::created(&created))
}

async fn list_own(
    state: web::Data<AppState>,
    caller: AuthUser,
    query: web::Query<SessionPage>,
) -> Result<HttpResponse, ApiError> {
    let q = query.into_inner();
    if q.status.is_some() {
        return Err(ApiError::BadRequest(
            "`status` filters the admin list, /api/v1/admin/chat/sessions".into(),
        ));
    }
    list(&state, Some(caller.id), None, q).await
}

async fn list_all(
    state: web::Data<AppState>,
    _: Staff,
    query: web::Query<SessionPage>,
) -> Result<HttpResponse, ApiError> {
    let q = query.into_inner();
    let status = match q.status.as_deref() {
        None | Some("all") => None,
        Some(s @ (session::ACTIVE | session::CLOSED | session::DELETED)) => Some(s.to_string()),
        Some(other) => {
            return Err(ApiError::BadRequest(format!(
                "`status` must be active, closed, deleted or all, not `{other}`"
            )))
        }
    };
    list(&state, None, status, q).await
}

async fn list(
    state: &AppState,
    owner: Option<String>,
    status: Option<String>,
    q: SessionPage,
) -> Result<HttpResponse, ApiError> {
    let limit = page_limit(q.limit, &state.settings)?;
    let cursor = q.cursor.as_deref().map(decode_cursor).transpose()?;
    let sessions = state
        .db
        .run(move |c| {
            Ok(session::list(
                c,
                owner.as_deref(),
                status.as_deref(),
                cursor.as_ref(),
                limit,
            )?)
        })
        .await?;
    let next_cursor = (sessions.len() as i64 == limit)
        .then(|| sessions.last().map(encode_cursor))
        .flatten();
    Ok(HttpResponse::Ok().json(SessionList {
        sessions,
        next_cursor,
    }))
}

async fn get(
    state: web::Data<AppState>,
    caller: AuthUser,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let found = visible_session(&state, &caller, path.into_inner()).await?;
    Ok(HttpResponse::Ok().json(found))
}

async fn admin_get(
    state: web::Data<AppState>,
    Staff(caller): Staff,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let found = visible_session(&state, &caller, path.into_inner()).await?;
    Ok(HttpResponse::Ok().json(found))
}

async fn messages(
    state: web::Data<AppState>,
    caller: AuthUser,
    path: web::Path<String>,
    query: web::Query<MessagePage>,
) -> Result<HttpResponse, ApiError> {
    let found = visible_session(&state, &caller, path.into_inner()).await?;
    let q = query.into_inner();
    let order = match q.order.as_deref() {
        None | Some("asc") => Order::Asc,
        Some("desc") => Order::Desc,
        Some(other) => {
            return Err(ApiError::BadRequest(format!(
                "`order` must be asc or desc, not `{other}`"
            )))
        }
    };
    let limit = page_limit(q.limit, &state.settings)?;
    let cursor = q.cursor;
    let messages = state
        .db
        .run(move |c| Ok(message::page(c, &found.id, order, cursor, limit)?))
        .await?;
    let next_cursor = (messages.len() as i64 == limit)
        .then(|| messages.last().map(|m| m.seq))
        .flatten();
    Ok(HttpResponse::Ok().json(MessageList {
        messages,
        next_cursor,
    }))
}

async fn post_message(
    state: web::Data<AppState>,
    caller: AuthUser,
    path: web::Path<String>,
    body: web::Json<NewPost>,
) -> Result<HttpResponse, ApiError> {
    crate::ratelimit::http::enforce(state.limits.messages.check(&caller.id))?;
    let found = visible_session(&state, &caller, path.into_inner()).await?;
    let NewPost {
        content,
        client_id,
        role,
    } = body.into_inner();
    let own_role = if caller.is_staff() { "agent" } else { "user" };
    if let Some(role) = role.as_deref() {
        if role != own_role {
            return Err(ApiError::Forbidden(
                "messages are posted under the caller's own role",
            ));
        }
    }
    message::check_content(&content, state.settings.chat.max_message_bytes)
        .map_err(ApiError::InvalidInput)?;
    if let Some(id) = client_id.as_deref() {
        message::check_client_id(id).map_err(ApiError::InvalidInput)?;
    }
    // Through the SessionManager like a socket's message: stored with the next seq, shown
    // live to everyone in the conversation, and answered by the AI when a customer wrote it.
    let (tx, rx) = tokio::sync::oneshot::channel();
    state.manager.do_send(PostMessage {
        session_id: found.id,
        author_id: caller.id,
        role: caller.role,
        client_id,
        content,
        origin: Origin::Http(tx),
    });
    match rx
        .await
        .map_err(|_| ApiError::Unavailable("the message store"))?
    {
        Ok(appended) if appended.duplicate => Ok(HttpResponse::Ok().json(appended.message)),
        Ok(appended) => Ok(super::created(&appended.message)),
        Err(AppendFailure::Rejected(Rejected::SessionNotActive(status))) => {
            Err(ApiError::SessionNotActive(status))
        }
        Err(AppendFailure::Rejected(Rejected::SessionNotFound)) => {
            Err(ApiError::NotFound("conversation"))
        }
        Err(AppendFailure::Store) => Err(ApiError::Unavailable("the message store")),
        Err(AppendFailure::ShuttingDown) => Err(ApiError::ShuttingDown(super::chat::NOT_STORED)),
    }
}

async fn close(
    state: web::Data<AppState>,
    _: Staff,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    change_status(&state, path.into_inner(), session::CLOSED).await
}

async fn delete(
    state: web::Data<AppState>,
    _: Staff,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    change_status(&state, path.into_inner(), session::DELETED).await
}

async fn restore(
    state: web::Data<AppState>,
    _: Staff,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    change_status(&state, path.into_inner(), session::ACTIVE).await
}

async fn change_status(
    state: &AppState,
    id: String,
    status: &'static str,
) -> Result<HttpResponse, ApiError> {
    let id = plausible_id(id)?;
    let window = chrono::Duration::from_std(state.settings.chat.restore_window.get())
        .unwrap_or_else(|_| chrono::Duration::days(7));
    match state
        .db
        .run(move |c| Ok(session::set_status(c, &id, status, window)?))
        .await?
    {
        StatusChange::Done(s) => {
            state.manager.do_send(StatusChanged {
                session_id: s.id.clone(),
                status: s.status.clone(),
            });
            Ok(HttpResponse::Ok().json(s))
        }
        StatusChange::NotFound => Err(ApiError::NotFound("conversation")),
        StatusChange::NotRestorable => Err(ApiError::Conflict(
            "only a conversation deleted within the restore window can be restored".into(),
        )),
    }
}

/// A conversation id from a path, or "not found" for one no conversation can have: longer than
/// any id this server makes, or holding NUL, which PostgreSQL refuses in a query.
fn plausible_id(id: String) -> Result<String, ApiError> {
    if id.len() > 64 || id.contains('\0') {
        return Err(ApiError::NotFound("conversation"));
    }
    Ok(id)
}

/// The conversation, if the caller may see it: its owner (unless deleted), or staff.
/// Anything else is "not found", so that ids cannot be probed.
pub async fn visible_session(
    state: &AppState,
    caller: &AuthUser,
    id: String,
) -> Result<ChatSession, ApiError> {
    let id = plausible_id(id)?;
    let found = state
        .db
        .run(move |c| Ok(session::find(c, &id)?))
        .await?
        .ok_or(ApiError::NotFound("conversation"))?;
    let visible = caller.role.is_staff()
        || (caller.role == Role::Customer
            && found.user_id == caller.id
            && found.status != session::DELETED);
    if visible {
        Ok(found)
    } else {
        Err(ApiError::NotFound("conversation"))
    }
}

fn encode_cursor(s: &ChatSession) -> String {
    URL_SAFE_NO_PAD.encode(format!(
        "{}|{}",
        s.created_at.and_utc().timestamp_micros(),
        s.id
    ))
}

fn decode_cursor(raw: &str) -> Result<Cursor, ApiError> {
    let bad = || ApiError::BadRequest("`cursor` is not one this server gave out".into());
    let bytes = URL_SAFE_NO_PAD.decode(raw).map_err(|_| bad())?;
    let text = String::from_utf8(bytes).map_err(|_| bad())?;
    let (micros, id) = text.split_once('|').ok_or_else(bad)?;
    if id.contains('\0') {
        return Err(bad());
    }
    let micros: i64 = micros.parse().map_err(|_| bad())?;
    let created_at = chrono::DateTime::from_timestamp_micros(micros)
        .ok_or_else(bad)?
        .naive_utc();
    Ok(Cursor {
        created_at,
        id: id.to_string(),
    })
}
