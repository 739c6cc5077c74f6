//! The one error type that reaches clients.
//!
//! Every failure a client can see has a stable snake_case code; `status()` is the single place
//! that maps codes to HTTP statuses. Causes (database errors, panics) are logged where they
//! happen and never sent to clients.

use actix_web::http::StatusCode;
use actix_web::{HttpResponse, ResponseError};
use serde::Serialize;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    BadRequest(String),
    #[error("{}", .0.message())]
    InvalidInput(crate::db::models::message::InvalidInput),
    #[error("{0}")]
    InvalidJson(String),
    #[error("request body is larger than {0} bytes")]
    PayloadTooLarge(usize),
    #[error("send the body as JSON with Content-Type: application/json")]
    UnsupportedMediaType,
    #[error("{0}")]
    Unauthorized(&'static str),
    #[error("the token has expired; refresh it or sign in again")]
    TokenExpired,
    #[error("this account is disabled")]
    AccountDisabled,
    #[error("email or password is wrong")]
    InvalidCredentials,
    #[error("{0}")]
    Forbidden(&'static str),
    #[error("{0} not found")]
    NotFound(&'static str),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    OwnAccount(&'static str),
    #[error("the conversation is {0}")]
    SessionNotActive(String),
    #[error("{0} is unavailable")]
    Unavailable(&'static str),
    #[error("{0}")]
    AiUnavailable(String),
    #[error("{0}")]
    AiFailed(String),
    #[error("{0}")]
    ShuttingDown(&'static str),
    #[error("too many requests; retry in {} s", .0.retry_after.as_secs().max(1))]
    RateLimited(crate::ratelimit::Verdict),
    #[error("internal error; the cause is in the server log")]
    Internal,
}

impl ApiError {
    /// The stable code clients match on.
    pub fn code(&self) -> &'static str {
        match self {
            ApiError::BadRequest(_) => "bad_request",
            ApiError::InvalidInput(e) => e.code(),
            ApiError::InvalidJson(_) => "invalid_json",
            ApiError::PayloadTooLarge(_) => "payload_too_large",
            ApiError::UnsupportedMediaType => "unsupported_media_type",
            ApiError::Unauthorized(_) => "unauthorized",
            ApiError::TokenExpired => "token_expired",
            ApiError::AccountDisabled => "account_disabled",
            ApiError::InvalidCredentials => "invalid_credentials",
            ApiError::Forbidden(_) => "forbidden",
            ApiError::NotFound(_) => "not_found",
            ApiError::Conflict(_) => "conflict",
            ApiError::OwnAccount(_) => "own_account",
            ApiError::SessionNotActive(_) => "session_not_active",
            ApiError::Unavailable(_) => "unavailable",
            ApiError::AiUnavailable(_) => "ai_unavailable",
            ApiError::AiFailed(_) => "ai_failed",
            ApiError::ShuttingDown(_) => "shutting_down",
            ApiError::RateLimited(_) => "rate_limited",
            ApiError::Internal => "internal",
        }
    }

    /// Logs the cause and returns the error a client may see.
    pub fn internal(cause: impl std::fmt::Display) -> ApiError {
        log::error!("{cause}");
        ApiError::Internal
    }
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    error: &'a str,
    message: String,
}

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        match self {
            ApiError::InvalidInput(crate::db::models::message::InvalidInput::TooLarge(_)) => {
                StatusCode::PAYLOAD_TOO_LARGE
            }
            ApiError::BadRequest(_)
            | ApiError::InvalidJson(_)
            | ApiError::InvalidInput(_)
            | ApiError::OwnAccount(_) => StatusCode::BAD_REQUEST,
            ApiError::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::Unauthorized(_)
            | ApiError::TokenExpired
            | ApiError::AccountDisabled
            | ApiError::InvalidCredentials => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::Conflict(_) | ApiError::SessionNotActive(_) => StatusCode::CONFLICT,
            ApiError::Unavailable(_) | ApiError::AiUnavailable(_) | ApiError::ShuttingDown(_) => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            ApiError::AiFailed(_) => StatusCode::BAD_GATEWAY,
            ApiError::RateLimited(_) => StatusCode::TOO_MANY_REQUESTS,
            ApiError::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn error_response(&self) -> HttpResponse {
        let mut res = HttpResponse::build(self.status_code());
        if self.status_code() == StatusCode::UNAUTHORIZED {
            res.insert_header(("WWW-Authenticate", "Bearer"));
        }
        if let ApiError::RateLimited(verdict) = self {
            crate::ratelimit::http::too_many(verdict, &mut res);
        }
        res.json(ErrorBody {
            error: self.code(),
            message: self.to_string(),
        })
    }
}
