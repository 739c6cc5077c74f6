//! Logging: `env_logger` in text or JSON lines, and a request id on every line written while
//! a request is handled.
//!
//! The request-id middleware runs each request inside a task-local scope; the log formatter
//! reads it from there, so a handler logs as usual and the id comes along.

use std::future::{ready, Future, Ready};
use std::io::Write;
use std::pin::Pin;
use std::rc::Rc;
use std::time::Instant;

use actix_web::dev::{Service, ServiceRequest, ServiceResponse, Transform};
use actix_web::http::header::{HeaderName, HeaderValue};
use serde_json::json;

use crate::config::LogSettings;

tokio::task_local! {
    static REQUEST_ID: String;
}

pub const REQUEST_ID_HEADER: &str = "x-request-id";

/// The id of the request being handled on this task, if any.
pub fn current_request_id() -> Option<String> {
    REQUEST_ID.try_with(|id| id.clone()).ok()
}

/// Installs the global logger. Safe to call more than once (later calls do nothing).
pub fn init(settings: &LogSettings) {
    let mut builder = env_logger::Builder::new();
    // A plain level (`info`) or a full env_logger filter (`info,switchboard=debug`).
    builder.parse_filters(&settings.level);
    if settings.format == "json" {
        builder.format(|buf, record| {
            let mut line = json!({
                "timestamp": chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
                "level": record.level().as_str(),
                "target": record.target(),
                "message": record.args().to_string(),
            });
            if let Some(id) = current_request_id() {
                line["request_id"] = json!(id);
            }
            writeln!(buf, "{line}")
        });
    } else {
        builder.format(|buf, record| {
            let ts = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
            match current_request_id() {
                Some(id) => writeln!(
                    buf,
                    "{ts} {:5} {} [{id}] {}",
                    record.level(),
                    record.target(),
                    record.args()
                ),
                None => writeln!(
                    buf,
                    "{ts} {:5} {} {}",
                    record.level(),
                    record.target(),
                    record.args()
                ),
            }
        });
    }
    let _ = builder.try_init();
}

/// Gives every request an id (the caller's `X-Request-Id` when it is sane, else a new one),
/// echoes it in the response, and logs one access line per request.
pub struct RequestId;

impl<S, B> Transform<S, ServiceRequest> for RequestId
where
    S: Service<ServiceRequest, Response = ServiceResponse<B>, Error = actix_web::Error> + 'static,
    B: 'static,
{
    type Response = ServiceResponse<B>;
    type Error = actix_web::Error;
    type Transform = RequestIdMiddleware<S>;
    type InitError = ();
    type Future = Ready<Result<Self::Transform, ()>>;

    fn new_transform(&self, service: S) -> Self::Future {
        ready(Ok(RequestIdMiddleware {
            service: Rc::new(service),
        }))
    }
}

pub struct RequestIdMiddleware<S> {
    service: Rc<S>,
}

impl<S, B> Service<ServiceRequest> for RequestIdMiddleware<S>
where
    S: Service<ServiceRequest, Response = ServiceResponse<B>, Error = actix_web::Error> + 'static,
    B: 'static,
{
    type Response = ServiceResponse<B>;
    type Error = actix_web::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>>>>;

    actix_web::dev::forward_ready!(service);

    fn call(&self, req: ServiceRequest) -> Self::Future {
        let id = req
            .headers()
            .get(REQUEST_ID_HEADER)
            .and_then(|v| v.to_str().ok())
            .filter(|v| !v.is_empty() && v.len() <= 64 && v.bytes().all(|b| b.is_ascii_graphic()))
            .map(str::to_string)
            .unwrap_or_else(|| uuid::Uuid::new_v4().simple().to_string());
        let service = self.service.clone();
        let started = Instant::now();
        let method = req.method().to_string();
        let path = req.path().to_string();
        Box::pin(REQUEST_ID.scope(id.clone(), async move {
            let result = service.call(req).await;
            let status = match &result {
                Ok(res) => res.status().as_u16(),
                Err(e) => e.as_response_error().status_code().as_u16(),
            };
            log::info!(
                target: "switchboard::http",
                "{method} {path} {status} {:.1}ms",
                started.elapsed().as_secs_f64() * 1000.0
            );
            let mut res = result?;
            if let Ok(value) = HeaderValue::from_str(&id) {
                res.headers_mut()
                    .insert(HeaderName::from_static(REQUEST_ID_HEADER), value);
            }
            Ok(res)
        }))
    }
}
