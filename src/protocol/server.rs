//! Frames the server sends.

use serde::Serialize;

#[derive(Debug, Clone, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerFrame {
    /// First frame on every connection.
    Hello {
        protocol: u32,
        user_id: String,
        role: String,
        heartbeat_ms: u64,
    },
    /// The message with this client id is stored as `seq`.
    Ack {
        session_id: String,
        client_id: String,
        seq: i64,
        /// True when this client id had been stored before (a resend).
        duplicate: bool,
    },
    /// A stored message: live, or replayed after `resume`.
    Message(MessageView),
    /// A piece of the AI answer `reply_id` as it is written.
    Token {
        session_id: String,
        reply_id: String,
        delta: String,
    },
    /// The AI answer `reply_id` is stored as `seq`; `interrupted` when cut short.
    ReplyDone {
        session_id: String,
        reply_id: String,
        seq: i64,
        interrupted: bool,
    },
    /// Replay after `resume` is complete up to `last_seq`; live events follow.
    Resumed { session_id: String, last_seq: i64 },
    /// Who is in the conversation now.
    Presence {
        session_id: String,
        members: Vec<Peer>,
    },
    /// Someone in the conversation started or stopped typing.
    Typing {
        session_id: String,
        user_id: String,
        role: String,
        active: bool,
    },
    /// Something the client sent was refused; nothing else changed.
    Error {
        code: String,
        message: String,
        #[serde(skip_serializing_if = "Option::is_none")]
        session_id: Option<String>,
        #[serde(skip_serializing_if = "Option::is_none")]
        client_id: Option<String>,
    },
    /// Answer to `ping`.
    Pong {
        #[serde(skip_serializing_if = "Option::is_none")]
        nonce: Option<serde_json::Value>,
    },
    /// Staff: right after `hello`, the live conversations, the human queue, the agents online,
    /// and how many live conversations a dashboard lists (`session_updates` keeps that many of
    /// the newest up to date).
    Snapshot {
        sessions: Vec<SessionSummary>,
        queue: Vec<SessionSummary>,
        agents_online: Vec<AgentView>,
        list_max: i64,
    },
    /// Staff: the conversations that changed since the last such frame, each once, with its
    /// latest state.
    SessionUpdates { sessions: Vec<SessionSummary> },
    /// Staff: the human queue, oldest request first.
    Queue { sessions: Vec<SessionSummary> },
    /// Staff: the agents and admins connected now.
    AgentsOnline { agents: Vec<AgentView> },
    /// Staff: the history after `watch` is delivered; live events follow.
    Watching { session_id: String, last_seq: i64 },
    /// Staff: `unwatch` done.
    Unwatched { session_id: String },
    /// The conversation was taken over by an agent or handed back to the AI.
    Mode {
        session_id: String,
        mode: String,
        agent: Option<AgentView>,
    },
    /// The request for a human is queued.
    HumanRequested { session_id: String },
    /// No agent took the conversation in time; the AI answers.
    HumanUnavailable { session_id: String },
    /// The conversation was closed, deleted or restored.
    Status { session_id: String, status: String },
}

impl ServerFrame {
    pub fn error(code: &str, message: impl Into<String>) -> ServerFrame {
        ServerFrame::Error {
            code: code.to_string(),
            message: message.into(),
            session_id: None,
            client_id: None,
        }
    }

    /// Serialises once; the text is shared by every recipient.
    pub fn to_text(&self) -> String {
        // Serialising these plain structs cannot fail: no maps with non-string keys.
        serde_json::to_string(self).unwrap_or_else(|e| {
            log::error!("serialising a frame failed: {e}");
            r#"{"type":"error","code":"internal","message":"frame could not be encoded"}"#.into()
        })
    }
}

/// A stored message as clients see it.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct MessageView {
    pub session_id: String,
    pub seq: i64,
    pub role: String,
    pub author_id: Option<String>,
    pub content: String,
    pub client_id: Option<String>,
    pub interrupted: bool,
    pub created_at: String,
}

/// One member of a conversation, for `presence`.
#[derive(Debug, Clone, Serialize, PartialEq, Eq, PartialOrd, Ord)]
pub struct Peer {
    pub user_id: String,
    pub role: String,
}

/// An agent or admin, as the desk shows them.
#[derive(Debug, Clone, Serialize, PartialEq, Eq, PartialOrd, Ord)]
pub struct AgentView {
    pub user_id: String,
    pub email: String,
}

/// The customer of a conversation.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct CustomerView {
    pub user_id: String,
    pub email: Option<String>,
    pub online: bool,
}

/// The newest message of a conversation, cut to a preview.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct LastMessageView {
    pub seq: i64,
    pub role: String,
    pub content: String,
    pub created_at: String,
}

/// A conversation as the desk lists it.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct SessionSummary {
    pub session_id: String,
    pub title: String,
    pub customer: CustomerView,
    pub status: String,
    pub mode: String,
    pub assigned_agent: Option<AgentView>,
    pub human_requested_at: Option<String>,
    pub waiting_since: Option<String>,
    pub last_message: Option<LastMessageView>,
    pub last_seq: i64,
    pub updated_at: String,
}
