//! The built-in demo model: needs nothing, streams a clearly labelled canned consultant answer
//! word by word at a configurable pace, so a new machine shows the whole flow.

use std::time::Duration;

use futures_util::stream;

use futures_util::future::BoxFuture;

use super::{Answer, ChatRequest, Chunk, Provider, ProviderError, TokenStream};

pub const MODEL: &str = "switchboard-demo";

pub struct DemoProvider {
    delay: Duration,
    /// Fault injection for tests: a customer message containing this panics the stream.
    panic_trigger: Option<String>,
}

impl DemoProvider {
    pub fn new(delay: Duration, panic_trigger: &str) -> DemoProvider {
        DemoProvider {
            delay,
            panic_trigger: (!panic_trigger.is_empty()).then(|| panic_trigger.to_string()),
        }
    }
}

/// The answer the demo model gives to `question`.
pub fn answer(question: &str) -> String {
    let topic: String = question
        .split_whitespace()
        .take(8)
        .collect::<Vec<_>>()
        .join(" ");
    format!(
        "[Demo consultant] Thanks for your message about \"{topic}\". \
         I am the built-in demo model, so this answer is canned: connect a real provider \
         (Bedrock or an OpenAI-compatible server) for real advice. A human agent can take \
         over this conversation from the dashboard at any time."
    )
}

fn last_question(request: &ChatRequest) -> String {
    request
        .history
        .iter()
        .rev()
        .find(|t| t.role == "user")
        .map(|t| t.content.clone())
        .unwrap_or_default()
}

/// Splits text into word-sized deltas that join back to the text exactly.
pub fn tokens(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut current = String::new();
    for ch in text.chars() {
        if ch == ' ' && !current.is_empty() && !current.ends_with(' ') {
            out.push(std::mem::take(&mut current));
        }
        current.push(ch);
    }
    if !current.is_empty() {
        out.push(current);
    }
    out
}

impl Provider for DemoProvider {
    fn name(&self) -> &str {
        "demo"
    }

    fn model(&self) -> &str {
        MODEL
    }

    fn is_demo(&self) -> bool {
        true
    }

    fn complete(&self, request: ChatRequest) -> BoxFuture<'static, Result<Answer, ProviderError>> {
        let text = answer(&last_question(&request));
        Box::pin(async move { Ok(Answer { text, usage: None }) })
    }

    fn stream(&self, request: ChatRequest) -> TokenStream {
        let question = last_question(&request);
        let panics = self
            .panic_trigger
            .as_deref()
            .is_some_and(|trigger| question.contains(trigger));
        let delay = self.delay;
        let pieces = tokens(&answer(&question));
        Box::pin(stream::unfold(
            (pieces.into_iter(), true),
            move |(mut rest, first)| async move {
                if !first && !delay.is_zero() {
                    tokio::time::sleep(delay).await;
                }
                let next = rest.next()?;
                if panics {
                    panic!("demo model fault injection: the message asked the demo model to panic");
                }
                Some((Ok(Chunk::Text(next)), (rest, false)))
            },
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_join_back_to_the_text() {
        let text = answer("How do I reset my password?");
        assert!(text.starts_with("[Demo consultant]"));
        let pieces = tokens(&text);
        assert!(pieces.len() > 10);
        assert_eq!(pieces.concat(), text);
    }
}
