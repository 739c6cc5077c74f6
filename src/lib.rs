//! Switchboard: a realtime chat hub where customers talk to an AI consultant and human agents
//! watch, take over and hand back. See `README.md` for the tour and `docs/protocol.md` for the
//! wire protocol.

pub mod actors;
pub mod auth;
pub mod cache;
pub mod cli;
pub mod config;
pub mod db;
pub mod error;
pub mod protocol;
pub mod providers;
pub mod ratelimit;
pub mod routes;
pub mod server;
pub mod startup;
pub mod telemetry;
