//! Row types and the queries on them: plain functions over `&mut DbConnection`, run by the
//! persistence actor. Each file owns one table.

pub mod desk;
pub mod message;
pub mod search;
pub mod session;
pub mod token;
pub mod user;

pub use message::{Appended, ChatMessage, NewMessage};
pub use session::ChatSession;
pub use user::{Role, User};

/// The current time as stored: UTC, microsecond precision (what both backends keep).
pub fn now() -> chrono::NaiveDateTime {
    use chrono::Timelike;
    let now = chrono::Utc::now().naive_utc();
    now.with_nanosecond(now.nanosecond() / 1_000 * 1_000)
        .unwrap_or(now)
}

/// Timestamps go over the wire as RFC 3339 in UTC (`2026-11-22T10:00:00.123456Z`).
pub fn serialize_time_string(t: &chrono::NaiveDateTime) -> String {
    t.and_utc()
        .to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
}

pub fn serialize_time<S: serde::Serializer>(
    t: &chrono::NaiveDateTime,
    s: S,
) -> Result<S::Ok, S::Error> {
    s.serialize_str(&serialize_time_string(t))
}

pub fn serialize_opt_time<S: serde::Serializer>(
    t: &Option<chrono::NaiveDateTime>,
    s: S,
) -> Result<S::Ok, S::Error> {
    match t {
        Some(t) => serialize_time(t, s),
        None => s.serialize_none(),
    }
}
