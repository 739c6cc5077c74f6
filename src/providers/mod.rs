//! AI providers: the trait every model backend implements, and its errors.
//!
//! A provider turns a conversation into a stream of text deltas. Providers know nothing of
//! actors or sockets; the inference workers (`crate::actors::inference`) drive them.

pub mod demo;

use futures_util::stream::BoxStream;

/// One turn of the conversation given to the model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Turn {
    /// `user`, `assistant`, `agent` or `system`.
    pub role: String,
    pub content: String,
}

/// What the model is asked to continue.
#[derive(Debug, Clone)]
pub struct ChatRequest {
    pub session_id: String,
    /// Oldest first; the last turn is the customer's newest message.
    pub history: Vec<Turn>,
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum ProviderError {
    #[error("the provider failed: {0}")]
    Failed(String),
}

/// A stream of text deltas; it ends when the answer is complete.
pub type TokenStream = BoxStream<'static, Result<String, ProviderError>>;

pub trait Provider: Send + Sync {
    /// `demo`, `bedrock`, `openai`.
    fn name(&self) -> &str;
    /// The model id answers are attributed to.
    fn model(&self) -> &str;
    /// Starts an answer.
    fn stream(&self, request: ChatRequest) -> TokenStream;
}
