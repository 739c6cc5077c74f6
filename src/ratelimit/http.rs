//! Rate limits on HTTP: the sign-in endpoints by client IP address (a middleware), message
//! posting by user id (called from the handler). Over the limit: 429 `rate_limited` with
//! `X-RateLimit-Limit`, `X-RateLimit-Remaining`, `X-RateLimit-Reset` (seconds until the
//! bucket is full) and `Retry-After` (seconds until the next request is allowed).

use actix_web::body::MessageBody;
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::http::Method;
use actix_web::middleware::Next;
use actix_web::{web, HttpResponse, ResponseError};

use super::Verdict;
use crate::error::ApiError;
use crate::startup::AppState;

/// Whole seconds, rounded up, so that a client waiting that long is allowed.
fn seconds(d: std::time::Duration) -> u64 {
    d.as_secs() + u64::from(d.subsec_nanos() > 0)
}

/// Adds the `X-RateLimit-*` and `Retry-After` headers of `verdict` to a 429 response.
pub fn too_many(verdict: &Verdict, res: &mut actix_web::HttpResponseBuilder) {
    res.insert_header(("X-RateLimit-Limit", verdict.limit.to_string()))
        .insert_header(("X-RateLimit-Remaining", verdict.remaining.to_string()))
        .insert_header(("X-RateLimit-Reset", seconds(verdict.reset).to_string()))
        .insert_header((
            "Retry-After",
            seconds(verdict.retry_after).max(1).to_string(),
        ));
}

/// `Err(rate_limited)` when `verdict` refused the request.
pub fn enforce(verdict: Verdict) -> Result<(), ApiError> {
    if verdict.allowed {
        Ok(())
    } else {
        Err(ApiError::RateLimited(verdict))
    }
}

/// True for the sign-in endpoints (`POST …/auth/…` under `/api/v1` or `/api`).
fn is_sign_in(req: &ServiceRequest) -> bool {
    let path = req.path();
    let rest = path
        .strip_prefix("/api/v1")
        .or_else(|| path.strip_prefix("/api"));
    req.method() == Method::POST && rest.is_some_and(|r| r.starts_with("/auth/"))
}

/// Middleware: limits the sign-in endpoints per client IP address (the TCP peer; a
/// forwarded-for header is not trusted, since any client can set it).
pub async fn limit_sign_in(
    req: ServiceRequest,
    next: Next<impl MessageBody + 'static>,
) -> Result<ServiceResponse<actix_web::body::EitherBody<impl MessageBody>>, actix_web::Error> {
    if is_sign_in(&req) {
        let ip = req
            .peer_addr()
            .map_or_else(|| "unknown".to_string(), |a| a.ip().to_string());
        if let Some(state) = req.app_data::<web::Data<AppState>>() {
            let verdict = state.limits.sign_in.check(&ip);
            if !verdict.allowed {
                log::info!("sign-in rate limit reached by {ip}");
                let res: HttpResponse = ApiError::RateLimited(verdict).error_response();
                return Ok(req.into_response(res).map_into_right_body());
            }
        }
    }
    next.call(req).await.map(|res| res.map_into_left_body())
}
