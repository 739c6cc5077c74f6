//! WebSocket endpoints: `/chat/ws` for customers, `/admin/chat/ws` for agents and admins.
//!
//! The token is checked before the upgrade: a missing or bad one is refused with 401, a
//! customer on the admin endpoint with 403. It may come as `?token=`, as
//! `Authorization: Bearer`, or as the sub-protocol `bearer.<token>` next to `switchboard.v1`.
//!
//! An accepted upgrade is answered `101` with an [`Accepted`] attached; the server
//! (`crate::server`) sends the answer and hands the socket to it.

use actix_web::http::header;
use actix_web::{web, HttpRequest, HttpResponse};

use crate::actors::ws_session::{Accepted, Limits};
use crate::auth::{authenticate, bearer_token};
use crate::error::ApiError;
use crate::protocol::{SUBPROTOCOL, TOKEN_SUBPROTOCOL_PREFIX};
use crate::startup::AppState;

pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.service(web::resource("/chat/ws").get(customer))
        .service(web::resource("/admin/chat/ws").get(staff));
}

async fn customer(req: HttpRequest, state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    upgrade(req, state, false).await
}

async fn staff(req: HttpRequest, state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    upgrade(req, state, true).await
}

async fn upgrade(
    req: HttpRequest,
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
    let mut res = actix_http::ws::handshake(req.head())
        .map_err(|e| ApiError::BadRequest(format!("not a WebSocket upgrade: {e}")))?;
    if offered_protocols(&req).any(|p| p == SUBPROTOCOL) {
        res.insert_header((header::SEC_WEBSOCKET_PROTOCOL, SUBPROTOCOL));
    }
    let realtime = &state.settings.realtime;
    let limits = Limits {
        heartbeat_interval: realtime.heartbeat_interval.get(),
        client_timeout: realtime.client_timeout.get(),
        max_message_bytes: state.settings.chat.max_message_bytes,
        max_frame_bytes: realtime.max_frame_bytes,
        outbound_queue: realtime.outbound_queue,
        max_pending_acks: realtime.max_pending_acks,
        rates: state.limits.clone(),
    };
    log::info!(
        "{} {} connected over WebSocket",
        user.role.as_str(),
        user.id
    );
    let mut res = HttpResponse::from(res.finish()).map_into_boxed_body();
    res.extensions_mut().insert(Accepted {
        user,
        manager: state.manager.clone(),
        writes: state.writes.clone(),
        db: state.db.clone(),
        limits,
        desk: staff_only,
        open: state.sockets.clone(),
    });
    Ok(res)
}

/// The sub-protocols the client offered, in its order.
fn offered_protocols(req: &HttpRequest) -> impl Iterator<Item = &str> {
    req.headers()
        .get_all(header::SEC_WEBSOCKET_PROTOCOL)
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
}

/// A token offered as the sub-protocol `bearer.<token>`.
fn subprotocol_token(req: &HttpRequest) -> Option<String> {
    offered_protocols(req)
        .find_map(|p| p.strip_prefix(TOKEN_SUBPROTOCOL_PREFIX))
        .map(str::to_string)
}
