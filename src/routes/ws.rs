//! WebSocket endpoints: `/chat/ws` for customers, `/admin/chat/ws` for agents and admins.
//!
//! The token is checked before the upgrade: a missing or bad one is refused with 401, a
//! customer on the admin endpoint with 403. It may come as `?token=`, as
//! `Authorization: Bearer`, or as the sub-protocol `bearer.<token>` next to `switchboard.v1`.

use actix_web::http::header;
use actix_web::{web, HttpRequest, HttpResponse};

use crate::actors::ws_session::{Limits, WsSession};
use crate::auth::{authenticate, bearer_token};
use crate::error::ApiError;
use crate::protocol::{SUBPROTOCOL, TOKEN_SUBPROTOCOL_PREFIX};
use crate::startup::AppState;

pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.service(web::resource("/chat/ws").get(customer))
        .service(web::resource("/admin/chat/ws").get(staff));
}

async fn customer(
    req: HttpRequest,
    body: web::Payload,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    upgrade(req, body, state, false).await
}

async fn staff(
    req: HttpRequest,
    body: web::Payload,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    upgrade(req, body, state, true).await
}

async fn upgrade(
    req: HttpRequest,
    body: web::Payload,
    state: web::Data<AppState>,
    staff_only: bool,
) -> Result<HttpResponse, ApiError> {
    let token = bearer_token(&req, true)
        .or_else(|| subprotocol_token(&req))
        .ok_or(ApiError::Unauthorized(
            "sign in first: pass the access token as ?token=, Authorization: Bearer, or sub-protocol bearer.<token>",
        ))?;
    let user = authenticate(&state, &token).await?;
    if staff_only && !user.is_staff() {
        return Err(ApiError::Forbidden(
            "this endpoint is for agents and admins",
        ));
    }
    let (res, socket, stream) = actix_ws::handle_with_protocols(&req, body, &[SUBPROTOCOL])
        .map_err(|e| ApiError::BadRequest(format!("not a WebSocket upgrade: {e}")))?;
    let realtime = &state.settings.realtime;
    let stream = stream
        .max_frame_size(realtime.max_frame_bytes)
        .aggregate_continuations()
        .max_continuation_size(realtime.max_frame_bytes);
    let limits = Limits {
        heartbeat_interval: realtime.heartbeat_interval.get(),
        client_timeout: realtime.client_timeout.get(),
        max_message_bytes: state.settings.chat.max_message_bytes,
        outbound_queue: realtime.outbound_queue,
        max_pending_acks: realtime.max_pending_acks,
        rates: state.limits.clone(),
    };
    log::info!(
        "{} {} connected over WebSocket",
        user.role.as_str(),
        user.id
    );
    WsSession::start(
        user,
        state.manager.clone(),
        state.db.clone(),
        socket,
        stream,
        limits,
        staff_only,
    );
    Ok(res)
}

/// A token offered as the sub-protocol `bearer.<token>`.
fn subprotocol_token(req: &HttpRequest) -> Option<String> {
    req.headers()
        .get_all(header::SEC_WEBSOCKET_PROTOCOL)
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .find_map(|p| p.strip_prefix(TOKEN_SUBPROTOCOL_PREFIX))
        .map(str::to_string)
}
