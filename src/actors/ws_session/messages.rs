use actix::Message;

/// Close this connection now, telling the client `code` and why (slow consumer, shutdown,
/// account disabled).
#[derive(Message, Clone, Debug)]
#[rtype(result = "()")]
pub struct Kick {
    pub code: &'static str,
    pub message: String,
}
