use std::time::{Duration, Instant};

use actix_web::{web, HttpResponse};
use serde_json::json;

use crate::startup::AppState;

const DB_CHECK_TIMEOUT: Duration = Duration::from_secs(2);

/// `GET /health`: 200 when every component answers, else 503 naming what is down; also how
/// many WebSockets this node holds open.
pub async fn health(state: web::Data<AppState>) -> HttpResponse {
    let started = Instant::now();
    let check = state.db.run(|c| {
        use diesel::connection::SimpleConnection;
        c.batch_execute("SELECT 1")?;
        Ok(())
    });
    let (open, max) = state.db.pool_state();
    let database = match tokio::time::timeout(DB_CHECK_TIMEOUT, check).await {
        Ok(Ok(())) => json!({
            "status": "up",
            "backend": state.db.backend().as_str(),
            "latency_ms": started.elapsed().as_secs_f64() * 1000.0,
            "pool": {"open": open, "max": max},
        }),
        Ok(Err(e)) => {
            log::warn!("health: database check failed: {e}");
            json!({"status": "down", "backend": state.db.backend().as_str(), "pool": {"open": open, "max": max}})
        }
        Err(_) => {
            log::warn!("health: database did not answer within {DB_CHECK_TIMEOUT:?}");
            json!({"status": "down", "backend": state.db.backend().as_str(), "reason": "timeout"})
        }
    };
    let components = json!({ "database": database });
    let down: Vec<&str> = components
        .as_object()
        .into_iter()
        .flatten()
        .filter(|(_, c)| c["status"] != "up")
        .map(|(name, _)| name.as_str())
        .collect();
    let websockets = json!({ "open": state.sockets.count() });
    if down.is_empty() {
        HttpResponse::Ok().json(json!({
            "status": "ok",
            "version": env!("CARGO_PKG_VERSION"),
            "components": components,
            "websockets": websockets,
        }))
    } else {
        HttpResponse::ServiceUnavailable().json(json!({
            "status": "unavailable",
            "error": "unavailable",
            "message": format!("down: {}", down.join(", ")),
            "version": env!("CARGO_PKG_VERSION"),
            "components": components,
            "websockets": websockets,
        }))
    }
}
