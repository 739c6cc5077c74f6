//! Full-text search of message history: staff search every conversation, a customer their own.

use actix_web::{web, HttpResponse};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use serde::{Deserialize, Serialize};

use super::page_limit;
use crate::auth::{AuthUser, Staff};
use crate::db::models::search::{self, Cursor, Hit};
use crate::db::models::serialize_time_string;
use crate::error::ApiError;
use crate::startup::AppState;

/// Longest search text accepted, in bytes.
const MAX_QUERY_BYTES: usize = 500;

pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.service(web::resource("/chat/search").get(own));
}

pub fn admin_routes(cfg: &mut web::ServiceConfig) {
    cfg.service(web::resource("/admin/chat/search").get(all));
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SearchQuery {
    q: Option<String>,
    cursor: Option<String>,
    limit: Option<i64>,
}

#[derive(Serialize)]
struct SearchPage {
    results: Vec<Result>,
    next_cursor: Option<String>,
}

#[derive(Serialize)]
struct Result {
    session_id: String,
    seq: i64,
    role: String,
    snippet: String,
    rank: f64,
    created_at: String,
    session_title: String,
}

#[derive(Serialize, Deserialize)]
struct CursorToken {
    r: f64,
    i: i64,
}

async fn own(
    state: web::Data<AppState>,
    caller: AuthUser,
    query: web::Query<SearchQuery>,
) -> std::result::Result<HttpResponse, ApiError> {
    run(&state, Some(caller.id), query.into_inner()).await
}

async fn all(
    state: web::Data<AppState>,
    _: Staff,
    query: web::Query<SearchQuery>,
) -> std::result::Result<HttpResponse, ApiError> {
    run(&state, None, query.into_inner()).await
}

async fn run(
    state: &AppState,
    owner: Option<String>,
    query: SearchQuery,
) -> std::result::Result<HttpResponse, ApiError> {
    let text = query.q.unwrap_or_default();
    if text.trim().is_empty() {
        return Err(ApiError::BadRequest(
            "say what to search for: `q` must not be empty".into(),
        ));
    }
    if text.len() > MAX_QUERY_BYTES {
        return Err(ApiError::BadRequest(format!(
            "`q` must be at most {MAX_QUERY_BYTES} bytes"
        )));
    }
    let limit = page_limit(query.limit, &state.settings)?;
    let after = query.cursor.as_deref().map(decode_cursor).transpose()?;
    // What was acknowledged before the search is found by it.
    state.db.index_for_search().await?;
    let hits: Vec<Hit> = state
        .db
        .run(move |c| Ok(search::search(c, &text, owner.as_deref(), after, limit)?))
        .await?;
    let next_cursor = match hits.last() {
        Some(last) if hits.len() as i64 == limit => Some(encode_cursor(Cursor {
            rank: last.rank,
            id: last.id,
        })),
        _ => None,
    };
    let results = hits
        .into_iter()
        .map(|h| Result {
            session_id: h.session_id,
            seq: h.seq,
            role: h.role,
            snippet: h.snippet,
            rank: h.rank,
            created_at: serialize_time_string(&h.created_at),
            session_title: h.session_title,
        })
        .collect();
    Ok(HttpResponse::Ok().json(SearchPage {
        results,
        next_cursor,
    }))
}

fn encode_cursor(c: Cursor) -> String {
    let token = CursorToken { r: c.rank, i: c.id };
    // A struct of two numbers always serialises.
    URL_SAFE_NO_PAD.encode(serde_json::to_vec(&token).unwrap_or_default())
}

fn decode_cursor(text: &str) -> std::result::Result<Cursor, ApiError> {
    let bad = || ApiError::BadRequest("`cursor` is not one this server gave out".into());
    let bytes = URL_SAFE_NO_PAD.decode(text).map_err(|_| bad())?;
    let token: CursorToken = serde_json::from_slice(&bytes).map_err(|_| bad())?;
    if !token.r.is_finite() {
        return Err(bad());
    }
    Ok(Cursor {
        rank: token.r,
        id: token.i,
    })
}
