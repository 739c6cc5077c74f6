//! Every HTTP route, wired in one place.
//!
//! The canonical API lives under `/api/v1/`; the chat-studio paths under `/api/` are thin
//! aliases onto the same handlers.
//!
//! Each path is one `web::resource` holding all its methods, so that a known path asked with
//! another method answers 405 with `Allow` instead of falling through to 404.

mod auth;
mod chat;
mod health;
mod llm;
mod pages;
mod search;
mod sessions;
mod users;
mod ws;

use actix_web::dev::ServiceResponse;
use actix_web::error::{JsonPayloadError, PathError, QueryPayloadError};
use actix_web::http::header;
use actix_web::middleware::{ErrorHandlerResponse, ErrorHandlers};
use actix_web::mime;
use actix_web::{web, HttpMessage, HttpRequest, HttpResponse};

use crate::config::Settings;
use crate::error::ApiError;

pub fn configure(cfg: &mut web::ServiceConfig, settings: &Settings) {
    let limit = settings.server.max_body_bytes;
    cfg.app_data(
        web::JsonConfig::default()
            .limit(limit)
            .error_handler(move |e, _| json_error(e, limit).into()),
    )
    .app_data(web::PayloadConfig::default().limit(limit))
    .app_data(web::QueryConfig::default().error_handler(|e, _| query_error(e).into()))
    .app_data(web::PathConfig::default().error_handler(|e, _| path_error(e).into()))
    .service(web::resource("/health").get(health::health))
    .service(
        web::scope("/api/v1")
            .configure(auth::routes)
            .configure(users::routes)
            .configure(sessions::routes)
            .configure(sessions::admin_routes)
            .configure(chat::routes)
            .configure(llm::routes)
            .configure(llm::admin_routes)
            .configure(search::routes)
            .configure(search::admin_routes)
            .configure(ws::routes),
    )
    .service(
        web::scope("/api")
            .service(web::resource("/health").get(health::health))
            .configure(sessions::routes)
            .configure(chat::routes)
            .configure(llm::routes)
            .configure(search::routes),
    )
    .configure(pages::routes)
    .default_service(web::to(not_found));
}

async fn not_found(req: HttpRequest) -> Result<HttpResponse, ApiError> {
    log::debug!("no route for {} {}", req.method(), req.path());
    Err(ApiError::NotFound("route"))
}

/// Rewrites error responses that actix produced itself (a body over the payload limit, a method
/// a route does not take) into the same JSON shape as every other error, keeping their headers
/// (`Allow` on a 405).
pub fn json_errors<B: 'static>() -> ErrorHandlers<B> {
    ErrorHandlers::new().default_handler(|res: ServiceResponse<B>| {
        let is_json = res
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("application/json"));
        if is_json {
            return Ok(ErrorHandlerResponse::Response(res.map_into_left_body()));
        }
        let status = res.status();
        let code = match status.as_u16() {
            400 => "bad_request",
            401 => "unauthorized",
            403 => "forbidden",
            404 => "not_found",
            405 => "method_not_allowed",
            413 => "payload_too_large",
            415 => "unsupported_media_type",
            s if s >= 500 => "internal",
            _ => "error",
        };
        let allowed = res
            .headers()
            .get(header::ALLOW)
            .and_then(|v| v.to_str().ok())
            .filter(|v| !v.is_empty());
        let message = match allowed {
            Some(allowed) if status.as_u16() == 405 => format!(
                "{} is not allowed on this path; it takes {allowed}",
                res.request().method()
            ),
            _ => status.canonical_reason().unwrap_or("error").to_string(),
        };
        let (req, original) = res.into_parts();
        let mut body = HttpResponse::build(status);
        for (name, value) in original.headers() {
            if name != header::CONTENT_TYPE && name != header::CONTENT_LENGTH {
                body.append_header((name.clone(), value.clone()));
            }
        }
        let body = body.json(serde_json::json!({ "error": code, "message": message }));
        Ok(ErrorHandlerResponse::Response(
            ServiceResponse::new(req, body).map_into_right_body(),
        ))
    })
}

fn json_error(e: JsonPayloadError, limit: usize) -> ApiError {
    match e {
        JsonPayloadError::Overflow { .. } | JsonPayloadError::OverflowKnownLength { .. } => {
            ApiError::PayloadTooLarge(limit)
        }
        JsonPayloadError::ContentType => ApiError::UnsupportedMediaType,
        JsonPayloadError::Deserialize(e) => {
            ApiError::InvalidJson(format!("the body is not valid: {e}"))
        }
        other => ApiError::InvalidJson(format!("could not read the body: {other}")),
    }
}

fn query_error(e: QueryPayloadError) -> ApiError {
    ApiError::BadRequest(format!("bad query string: {e}"))
}

fn path_error(e: PathError) -> ApiError {
    ApiError::BadRequest(format!("bad path: {e}"))
}

/// Checks a short text field (a title): at most `max` bytes, no NUL (PostgreSQL cannot
/// store it). Message content has its own rules in `message::check_content`.
pub fn check_field(field: &str, value: &str, max: usize) -> Result<(), ApiError> {
    if value.len() > max {
        return Err(ApiError::BadRequest(format!(
            "`{field}` must be at most {max} bytes"
        )));
    }
    if value.contains('\0') {
        return Err(ApiError::BadRequest(format!(
            "`{field}` must not contain NUL characters"
        )));
    }
    Ok(())
}

/// `limit` as asked, defaulted and capped by the settings.
pub fn page_limit(asked: Option<i64>, settings: &Settings) -> Result<i64, ApiError> {
    match asked {
        None => Ok(settings.chat.page_size),
        Some(n) if n >= 1 => Ok(n.min(settings.chat.max_page_size)),
        Some(_) => Err(ApiError::BadRequest("`limit` must be at least 1".into())),
    }
}

/// A JSON body that may be left out: `None` when empty, else it must be sent as JSON (the same
/// content types `web::Json` takes) and parse.
pub fn optional_json<T: serde::de::DeserializeOwned>(
    req: &HttpRequest,
    body: &[u8],
) -> Result<Option<T>, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(None);
    }
    let is_json = req
        .mime_type()
        .ok()
        .flatten()
        .is_some_and(|mime| mime.subtype() == mime::JSON || mime.suffix() == Some(mime::JSON));
    if !is_json {
        return Err(ApiError::UnsupportedMediaType);
    }
    serde_json::from_slice(body)
        .map(Some)
        .map_err(|e| ApiError::InvalidJson(format!("the body is not valid: {e}")))
}

pub fn created<T: serde::Serialize>(body: &T) -> HttpResponse {
    HttpResponse::Created().json(body)
}
