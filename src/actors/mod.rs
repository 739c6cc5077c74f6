//! The actors of a node. Each folder holds one actor (`mod.rs`) and what it receives
//! (`messages.rs`).

pub mod account_watch;
pub mod inference;
pub mod persistence;
pub mod session_manager;
pub mod ws_session;
