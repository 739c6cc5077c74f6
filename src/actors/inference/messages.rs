use actix::prelude::*;
use tokio::sync::oneshot;

use crate::actors::session_manager::messages::{ReplyFinished, TokenChunk};

/// Write the AI answer `reply_id` for a conversation. Tokens and the end go to `tokens` and
/// `finished`; the answer stops early when `cancel` fires or is dropped.
#[derive(Message)]
#[rtype(result = "()")]
pub struct StartReply {
    pub session_id: String,
    pub reply_id: String,
    pub cancel: oneshot::Receiver<()>,
    pub tokens: Recipient<TokenChunk>,
    pub finished: Recipient<ReplyFinished>,
}

/// A provider call panicked on this worker: replace the worker.
#[derive(Message)]
#[rtype(result = "()")]
pub(super) struct ProviderPanicked;
