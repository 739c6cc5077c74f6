use std::sync::atomic::AtomicUsize;
use std::sync::Arc;

use actix::prelude::*;
use bytestring::ByteString;
use tokio::sync::{mpsc, oneshot};

use super::desk::HumanHold;
use crate::db::models::message::Rejected;
use crate::db::models::{Appended, ChatMessage, Role};
use crate::protocol::AgentView;

pub use crate::actors::ws_session::messages::Kick;

/// Identifies one WebSocket connection on this node.
pub type ConnId = u64;

/// What a connection's writer sends to its socket. One item is one slot of the bounded queue.
#[derive(Debug)]
pub enum Out {
    Frame(ByteString),
    /// A replay: many frames in one slot, so a resume cannot overflow the queue by itself.
    Batch(Vec<ByteString>),
    Ping,
    Pong(actix_web::web::Bytes),
    /// Say why and close the socket, after whatever was queued before.
    Close(Kick),
}

/// The sending half of a connection's bounded outbound queue.
pub type Outbox = mpsc::Sender<Out>;

/// A connection opened: start routing to it.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Connect {
    pub conn_id: ConnId,
    pub user_id: String,
    pub role: Role,
    pub outbox: Outbox,
    pub kick: Recipient<Kick>,
    /// The connection's sends not yet settled; counted down as each ack or error is queued.
    pub pending_acks: Arc<AtomicUsize>,
}

/// A connection closed: forget it everywhere.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Disconnect {
    pub conn_id: ConnId,
}

/// Subscribe a connection to a conversation. With `after_seq`, first replay every stored
/// message after it; without, only live events (a `send` into a conversation joins it so).
#[derive(Message)]
#[rtype(result = "()")]
pub struct Join {
    pub conn_id: ConnId,
    pub session_id: String,
    pub after_seq: Option<i64>,
}

/// Unsubscribe a connection from a conversation.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Leave {
    pub conn_id: ConnId,
    pub session_id: String,
}

/// A message to store and route, from a socket or from HTTP.
#[derive(Message)]
#[rtype(result = "()")]
pub struct PostMessage {
    pub session_id: String,
    pub author_id: String,
    pub role: Role,
    pub client_id: Option<String>,
    pub content: String,
    pub origin: Origin,
}

/// Someone started or stopped typing.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Typing {
    pub conn_id: ConnId,
    pub session_id: String,
    pub active: bool,
}

/// Cancel the AI answer in flight in a conversation.
#[derive(Message)]
#[rtype(result = "()")]
pub struct StopReply {
    pub session_id: String,
}

/// Who asked for a write, so the outcome goes back to them.
#[derive(Debug)]
pub enum Origin {
    Socket {
        conn_id: ConnId,
        session_id: String,
        client_id: String,
    },
    Http(oneshot::Sender<Result<Appended, AppendFailure>>),
    /// A customer's question over HTTP, whose asker waits for the answer.
    Ask(oneshot::Sender<Result<Asked, AppendFailure>>),
    Reply {
        session_id: String,
        reply_id: String,
    },
}

/// A question stored, and the answer that was already being written when it was (so not
/// its answer: answers in a conversation come one after another).
#[derive(Debug)]
pub struct Asked {
    pub appended: Appended,
    pub earlier_reply: Option<String>,
    /// Set when an agent or the human queue has the conversation: no AI answer will come.
    pub human: Option<HumanHold>,
}

/// Why a message was not stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AppendFailure {
    Rejected(Rejected),
    /// The database failed; nothing was stored.
    Store,
    /// The server is shutting down and takes no new messages.
    ShuttingDown,
}

/// A batch was committed (or failed); outcomes in the order the messages were posted.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Committed {
    pub outcomes: Vec<(Origin, Result<Appended, AppendFailure>)>,
}

/// Stored messages for a resuming connection.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Replayed {
    pub conn_id: ConnId,
    pub session_id: String,
    /// Which `resume` this page was read for; a page for an earlier one is stale.
    pub replay: u64,
    pub page: Result<ReplayPage, ()>,
}

/// One page of a replay.
#[derive(Debug)]
pub struct ReplayPage {
    /// Stored messages after the requested seq, oldest first.
    pub messages: Vec<ChatMessage>,
    /// The conversation's last seq when the page was read.
    pub last_seq: i64,
}

/// A piece of an AI answer.
#[derive(Message)]
#[rtype(result = "()")]
pub struct TokenChunk {
    pub session_id: String,
    pub reply_id: String,
    pub delta: String,
}

/// How an AI answer ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReplyOutcome {
    Complete,
    /// Cancelled by `stop`, takeover or shutdown.
    Cancelled,
    /// The provider failed or panicked; `code` is sent to the customer.
    Failed {
        code: &'static str,
        message: String,
    },
}

/// An AI answer ended.
#[derive(Message)]
#[rtype(result = "()")]
pub struct ReplyFinished {
    pub session_id: String,
    pub reply_id: String,
    pub outcome: ReplyOutcome,
    pub model: Option<String>,
    /// Output tokens, when the provider counted them.
    pub tokens: Option<i32>,
}

/// A staff socket on the desk endpoint: send it the snapshot and every desk update.
#[derive(Message)]
#[rtype(result = "()")]
pub struct JoinDesk {
    pub conn_id: ConnId,
    pub agent: AgentView,
}

/// What a desk frame asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeskOp {
    Watch,
    Unwatch,
    Takeover,
    Release,
    /// Close, delete or restore: the status to set (`closed`, `deleted`, `active`).
    SetStatus(&'static str),
    RequestHuman,
}

/// A desk frame from a socket whose rights to it were checked.
#[derive(Message)]
#[rtype(result = "()")]
pub struct DeskCommand {
    pub conn_id: ConnId,
    pub user: AgentView,
    pub role: Role,
    pub session_id: String,
    pub op: DeskOp,
}

/// A conversation's status was changed elsewhere (over HTTP): tell its members and the desk.
#[derive(Message)]
#[rtype(result = "()")]
pub struct StatusChanged {
    pub session_id: String,
    pub status: String,
}

/// A conversation was created over HTTP: the dashboards get its summary.
#[derive(Message)]
#[rtype(result = "()")]
pub struct ConversationCreated {
    pub session_id: String,
}

/// The accounts behind the live connections of this node.
#[derive(Message)]
#[rtype(result = "Vec<(ConnId, String, Role)>")]
pub struct ConnectedAccounts;

/// Close these connections now, telling each why.
#[derive(Message)]
#[rtype(result = "()")]
pub struct KickConnections {
    pub kicks: Vec<(ConnId, Kick)>,
}

/// Close every connection of this account on this node now (it was deactivated or its role
/// changed); returns how many were closed.
#[derive(Message)]
#[rtype(result = "usize")]
pub struct KickAccount {
    pub user_id: String,
    pub kick: Kick,
}

/// Shut down: take no new messages, interrupt the answers in flight, store everything
/// pending, then close every socket with a reason. `done` fires when all that is over, or
/// after `grace` whatever is left.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Drain {
    pub grace: std::time::Duration,
    pub done: oneshot::Sender<()>,
}
