//! Wire protocol v1: JSON text frames over WebSocket, one frame per message, tagged by `type`.
//! Serde only: no actix here. `docs/protocol.md` documents every frame with an example.

pub mod client;
pub mod server;

pub use client::{parse, ClientFrame, FrameError};
pub use server::{
    AgentView, CustomerView, LastMessageView, MessageView, Peer, ServerFrame, SessionSummary,
};

/// The protocol version this server speaks; sent in `hello`.
pub const VERSION: u32 = 1;

/// The WebSocket sub-protocol a client may offer, and the prefix that carries a token there.
pub const SUBPROTOCOL: &str = "switchboard.v1";
pub const TOKEN_SUBPROTOCOL_PREFIX: &str = "bearer.";
