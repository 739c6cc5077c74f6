//! AI providers: the trait every model backend implements, and its errors.
//!
//! A provider turns a conversation into a stream of text deltas (or one whole answer).
//! Providers know nothing of actors or sockets; the inference workers
//! (`crate::actors::inference`) drive them. Retries, timeouts and the circuit breaker wrap a
//! provider from outside, so each provider only says what kind of failure it met.

pub mod bedrock;
pub mod demo;
pub mod metrics;
pub mod openai;
pub mod resilient;

use std::sync::Arc;

use anyhow::bail;
use futures_util::future::BoxFuture;
use futures_util::stream::BoxStream;

use crate::config::AiSettings;

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
    /// A model to use instead of the provider's configured one (the active model an admin
    /// chose); the demo ignores it.
    pub model: Option<String>,
}

impl ChatRequest {
    /// The model this request asks `provider` for.
    pub fn model_for<'a>(&'a self, provider: &'a dyn Provider) -> &'a str {
        self.model.as_deref().unwrap_or(provider.model())
    }
}

/// Tokens the provider counted for one answer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub input_tokens: u64,
    pub output_tokens: u64,
}

/// One item of a streamed answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Chunk {
    /// The next piece of text.
    Text(String),
    /// The token counts, when the provider reports them (usually last).
    Usage(Usage),
}

/// A whole answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    pub text: String,
    pub usage: Option<Usage>,
}

/// Why a provider did not answer. The kind decides whether a retry can help.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProviderError {
    #[error("the provider is throttling requests: {0}")]
    Throttled(String),
    #[error("the provider did not answer in time: {0}")]
    Timeout(String),
    #[error("the provider failed with status {status}: {message}")]
    Server { status: u16, message: String },
    #[error("the provider refused the request with status {status}: {message}")]
    Rejected { status: u16, message: String },
    #[error("the provider could not be reached: {0}")]
    Connect(String),
    #[error("the provider's answer was malformed or cut off: {0}")]
    Failed(String),
    #[error("the provider is switched off by its circuit breaker after repeated failures")]
    CircuitOpen,
}

impl ProviderError {
    /// Throttling, timeouts, 5xx and an unreachable endpoint may pass; a refused request
    /// (4xx) or a malformed answer would only fail again.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            ProviderError::Throttled(_)
                | ProviderError::Timeout(_)
                | ProviderError::Server { .. }
                | ProviderError::Connect(_)
        )
    }

    /// A short label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            ProviderError::Throttled(_) => "throttled",
            ProviderError::Timeout(_) => "timeout",
            ProviderError::Server { .. } => "server_error",
            ProviderError::Rejected { .. } => "rejected",
            ProviderError::Connect(_) => "connect",
            ProviderError::Failed(_) => "malformed",
            ProviderError::CircuitOpen => "circuit_open",
        }
    }

    /// The error an HTTP status stands for.
    pub fn from_status(status: u16, message: impl Into<String>) -> ProviderError {
        let message = message.into();
        match status {
            429 => ProviderError::Throttled(message),
            408 => ProviderError::Timeout(message),
            s if s >= 500 => ProviderError::Server { status, message },
            _ => ProviderError::Rejected { status, message },
        }
    }
}

/// A stream of answer pieces; it ends when the answer is complete.
pub type TokenStream = BoxStream<'static, Result<Chunk, ProviderError>>;

pub trait Provider: Send + Sync {
    /// `demo`, `bedrock`, `openai`.
    fn name(&self) -> &str;
    /// The model id answers are attributed to.
    fn model(&self) -> &str;
    /// Starts a streamed answer.
    fn stream(&self, request: ChatRequest) -> TokenStream;
    /// Asks for the whole answer at once.
    fn complete(&self, request: ChatRequest) -> BoxFuture<'static, Result<Answer, ProviderError>>;
    /// True for the built-in demo model, which gives canned answers.
    fn is_demo(&self) -> bool {
        false
    }
}

/// What every real provider puts around the conversation.
#[derive(Debug, Clone)]
pub struct Prompt {
    /// Sent first, as the system prompt; empty sends none.
    pub system: String,
    /// Most characters of conversation sent; older turns are left out first.
    pub history_chars: usize,
}

impl Prompt {
    pub fn from_settings(ai: &AiSettings) -> Prompt {
        Prompt {
            system: ai.system_prompt.clone(),
            history_chars: ai.history_chars,
        }
    }

    /// The newest turns that fit the budget, oldest first. The newest turn is always kept;
    /// when it alone is over the budget, its end is kept (the question is usually last).
    pub fn trim(&self, history: &[Turn]) -> Vec<Turn> {
        let mut kept = Vec::new();
        let mut used = 0usize;
        for turn in history.iter().rev() {
            let len = turn.content.chars().count();
            if used + len > self.history_chars {
                if kept.is_empty() {
                    let skip = len - self.history_chars;
                    kept.push(Turn {
                        role: turn.role.clone(),
                        content: turn.content.chars().skip(skip).collect(),
                    });
                }
                break;
            }
            used += len;
            kept.push(turn.clone());
        }
        kept.reverse();
        kept
    }
}

/// The role a stored message takes in a model request: the human agent speaks for the
/// business, as the assistant does.
pub fn model_role(role: &str) -> &'static str {
    match role {
        "user" => "user",
        "system" => "system",
        _ => "assistant",
    }
}

/// The provider called `name`, built from the settings.
pub async fn build(name: &str, ai: &AiSettings) -> anyhow::Result<Arc<dyn Provider>> {
    Ok(match name {
        "demo" => Arc::new(demo::DemoProvider::new(
            ai.demo_token_delay.get(),
            &ai.demo_panic_trigger,
        )),
        "openai" => Arc::new(openai::OpenAiProvider::new(ai)?),
        "bedrock" => Arc::new(bedrock::BedrockProvider::new(ai).await?),
        other => bail!("AI_PROVIDER must be bedrock, openai or demo, got `{other}`"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn turn(role: &str, content: &str) -> Turn {
        Turn {
            role: role.into(),
            content: content.into(),
        }
    }

    #[test]
    fn trimming_keeps_the_newest_turns() {
        let prompt = Prompt {
            system: String::new(),
            history_chars: 10,
        };
        let history = vec![
            turn("user", "aaaaa"),
            turn("assistant", "bbbb"),
            turn("user", "cccc"),
        ];
        assert_eq!(prompt.trim(&history), history[1..].to_vec());
        let long = vec![turn("user", "0123456789abc")];
        assert_eq!(prompt.trim(&long), vec![turn("user", "3456789abc")]);
    }

    #[test]
    fn statuses_map_to_kinds() {
        assert!(ProviderError::from_status(429, "x").is_retryable());
        assert!(ProviderError::from_status(503, "x").is_retryable());
        assert!(!ProviderError::from_status(400, "x").is_retryable());
        assert!(!ProviderError::from_status(404, "x").is_retryable());
    }
}
