//! Any OpenAI-compatible chat-completions endpoint: OpenAI itself, Ollama, llama.cpp server,
//! vLLM, LM Studio. Streams with Server-Sent Events (`data: {...}` chunks, then
//! `data: [DONE]`); whole answers use the same endpoint without streaming.

use std::collections::VecDeque;
use std::time::Duration;

use anyhow::{bail, Context};
use futures_util::future::BoxFuture;
use futures_util::stream::{self, BoxStream};
use futures_util::{StreamExt, TryStreamExt};
use serde_json::{json, Value};

use super::{
    model_role, Answer, ChatRequest, Chunk, Prompt, Provider, ProviderError, TokenStream, Usage,
};
use crate::config::{AiSettings, Secret};

/// Connecting longer than this is a failure of its own; answers are timed by the caller.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Most bytes of an error body quoted in the log.
const ERROR_BODY_CHARS: usize = 500;
/// One SSE event larger than this is not a chat chunk: the stream is refused.
const MAX_EVENT_BYTES: usize = 1024 * 1024;

pub struct OpenAiProvider {
    client: reqwest::Client,
    /// `<base>/chat/completions`
    url: String,
    api_key: Option<Secret>,
    model: String,
    prompt: Prompt,
}

impl OpenAiProvider {
    pub fn new(ai: &AiSettings) -> anyhow::Result<OpenAiProvider> {
        if ai.model.trim().is_empty() {
            bail!("AI_PROVIDER=openai needs AI_MODEL (for Ollama e.g. `llama3.2`)");
        }
        let base = ai.openai_base_url.trim_end_matches('/');
        if !(base.starts_with("http://") || base.starts_with("https://")) {
            bail!("OPENAI_BASE_URL must start with http:// or https://, got `{base}`");
        }
        let client = reqwest::Client::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            .build()
            .context("building the HTTP client for the OpenAI-compatible provider")?;
        let key = ai.openai_api_key.expose().trim();
        Ok(OpenAiProvider {
            client,
            url: format!("{base}/chat/completions"),
            api_key: (!key.is_empty()).then(|| Secret::new(key)),
            model: ai.model.trim().to_string(),
            prompt: Prompt::from_settings(ai),
        })
    }

    fn body(&self, request: &ChatRequest, stream: bool) -> Value {
        let mut messages = Vec::new();
        if !self.prompt.system.is_empty() {
            messages.push(json!({"role": "system", "content": self.prompt.system}));
        }
        for turn in self.prompt.trim(&request.history) {
            messages.push(json!({"role": model_role(&turn.role), "content": turn.content}));
        }
        let model = request.model.as_deref().unwrap_or(&self.model);
        let mut body = json!({"model": model, "messages": messages, "stream": stream});
        if stream {
            body["stream_options"] = json!({"include_usage": true});
        }
        body
    }

    /// Sends the request; a status other than 2xx becomes the matching error.
    fn send(&self, body: Value) -> BoxFuture<'static, Result<reqwest::Response, ProviderError>> {
        let mut req = self.client.post(&self.url).json(&body);
        if let Some(key) = &self.api_key {
            req = req.bearer_auth(key.expose());
        }
        Box::pin(async move {
            let res = req.send().await.map_err(transport_error)?;
            let status = res.status();
            if status.is_success() {
                return Ok(res);
            }
            let text = res.text().await.unwrap_or_default();
            Err(ProviderError::from_status(
                status.as_u16(),
                error_message(&text),
            ))
        })
    }
}

impl Provider for OpenAiProvider {
    fn name(&self) -> &str {
        "openai"
    }

    fn model(&self) -> &str {
        &self.model
    }

    fn stream(&self, request: ChatRequest) -> TokenStream {
        let sent = self.send(self.body(&request, true));
        let body = async move {
            let res = sent.await?;
            Ok::<_, ProviderError>(sse_chunks(res.bytes_stream().boxed()))
        };
        Box::pin(stream::once(body).try_flatten())
    }

    fn complete(&self, request: ChatRequest) -> BoxFuture<'static, Result<Answer, ProviderError>> {
        let sent = self.send(self.body(&request, false));
        Box::pin(async move {
            let res = sent.await?;
            let body: Value = res
                .json()
                .await
                .map_err(|e| ProviderError::Failed(format!("the answer is not JSON: {e}")))?;
            let text = body["choices"][0]["message"]["content"]
                .as_str()
                .ok_or_else(|| {
                    ProviderError::Failed("the answer has no choices[0].message.content".into())
                })?
                .to_string();
            Ok(Answer {
                text,
                usage: usage(&body["usage"]),
            })
        })
    }
}

fn transport_error(e: reqwest::Error) -> ProviderError {
    if e.is_timeout() {
        ProviderError::Timeout(e.to_string())
    } else if e.is_connect() {
        ProviderError::Connect(e.to_string())
    } else {
        ProviderError::Failed(e.to_string())
    }
}

/// The `error.message` of an OpenAI error body, or the start of the body.
fn error_message(body: &str) -> String {
    serde_json::from_str::<Value>(body)
        .ok()
        .and_then(|v| v["error"]["message"].as_str().map(str::to_string))
        .unwrap_or_else(|| body.chars().take(ERROR_BODY_CHARS).collect())
}

fn usage(v: &Value) -> Option<Usage> {
    let input = v["prompt_tokens"].as_u64();
    let output = v["completion_tokens"].as_u64();
    (input.is_some() || output.is_some()).then(|| Usage {
        input_tokens: input.unwrap_or(0),
        output_tokens: output.unwrap_or(0),
    })
}

struct SseReader {
    body: BoxStream<'static, reqwest::Result<bytes::Bytes>>,
    buf: Vec<u8>,
    ready: VecDeque<Result<Chunk, ProviderError>>,
    /// `[DONE]` or a `finish_reason` was seen: the answer is whole.
    finished: bool,
    /// Nothing more will be read.
    ended: bool,
}

/// Turns an SSE body into answer pieces. A body that ends before `[DONE]` (or a
/// `finish_reason`) was cut off and ends with an error.
fn sse_chunks(body: BoxStream<'static, reqwest::Result<bytes::Bytes>>) -> TokenStream {
    let reader = SseReader {
        body,
        buf: Vec::new(),
        ready: VecDeque::new(),
        finished: false,
        ended: false,
    };
    Box::pin(stream::unfold(reader, |mut r| async move {
        loop {
            if let Some(item) = r.ready.pop_front() {
                return Some((item, r));
            }
            if r.ended {
                return None;
            }
            if let Some(event) = take_event(&mut r.buf) {
                r.read_event(&event);
                continue;
            }
            if r.buf.len() > MAX_EVENT_BYTES {
                r.fail("an SSE event is larger than 1 MiB".into());
                continue;
            }
            match r.body.next().await {
                Some(Ok(bytes)) => r.buf.extend(bytes.iter().filter(|b| **b != b'\r')),
                Some(Err(e)) => r.fail(format!("the stream broke: {e}")),
                None if r.finished => r.ended = true,
                None => {
                    // A last event may lack its blank line.
                    let rest = std::mem::take(&mut r.buf);
                    r.read_event(&String::from_utf8_lossy(&rest));
                    if !r.finished {
                        r.fail("the stream ended before [DONE]".into());
                    }
                    r.ended = true;
                }
            }
        }
    }))
}

impl SseReader {
    fn fail(&mut self, why: String) {
        self.ready.push_back(Err(ProviderError::Failed(why)));
        self.ended = true;
    }

    fn read_event(&mut self, event: &str) {
        let data: Vec<&str> = event
            .lines()
            .filter_map(|l| l.strip_prefix("data:"))
            .map(|d| d.strip_prefix(' ').unwrap_or(d))
            .collect();
        if data.is_empty() {
            return; // a comment or keep-alive
        }
        let data = data.join("\n");
        if data.trim() == "[DONE]" {
            self.finished = true;
            self.ended = true;
            return;
        }
        let v: Value = match serde_json::from_str(&data) {
            Ok(v) => v,
            Err(e) => return self.fail(format!("an SSE chunk is not JSON: {e}")),
        };
        if let Some(err) = v.get("error").filter(|e| !e.is_null()) {
            let message = err["message"].as_str().unwrap_or("error in the stream");
            let status = err["code"]
                .as_u64()
                .and_then(|c| u16::try_from(c).ok())
                .unwrap_or(500);
            self.ready
                .push_back(Err(ProviderError::from_status(status, message)));
            self.ended = true;
            return;
        }
        let choice = &v["choices"][0];
        if let Some(text) = choice["delta"]["content"].as_str() {
            if !text.is_empty() {
                self.ready.push_back(Ok(Chunk::Text(text.to_string())));
            }
        }
        if !choice["finish_reason"].is_null() {
            self.finished = true;
        }
        if let Some(u) = usage(&v["usage"]) {
            self.ready.push_back(Ok(Chunk::Usage(u)));
        }
    }
}

/// Removes the first complete event (up to a blank line) from `buf`.
fn take_event(buf: &mut Vec<u8>) -> Option<String> {
    let end = buf.windows(2).position(|w| w == b"\n\n")?;
    let event: Vec<u8> = buf.drain(..end + 2).collect();
    Some(String::from_utf8_lossy(&event[..end]).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body_of(parts: &[&str]) -> BoxStream<'static, reqwest::Result<bytes::Bytes>> {
        let parts: Vec<reqwest::Result<bytes::Bytes>> = parts
            .iter()
            .map(|p| Ok(bytes::Bytes::from(p.to_string())))
            .collect();
        stream::iter(parts).boxed()
    }

    async fn collect(parts: &[&str]) -> Vec<Result<Chunk, ProviderError>> {
        sse_chunks(body_of(parts)).collect().await
    }

    #[tokio::test]
    async fn events_split_across_reads_are_joined() {
        let got = collect(&[
            "data: {\"choices\":[{\"delta\":{\"content\":\"Hel",
            "lo\"}}]}\r\n\r\n: keep-alive\n\ndata: {\"choices\":[{\"delta\":{\"content\":\" you\"},\"finish_reason\":\"stop\"}]}\n\n",
            "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":7,\"completion_tokens\":2}}\n\ndata: [DONE]\n\n",
        ])
        .await;
        assert_eq!(
            got,
            vec![
                Ok(Chunk::Text("Hello".into())),
                Ok(Chunk::Text(" you".into())),
                Ok(Chunk::Usage(Usage {
                    input_tokens: 7,
                    output_tokens: 2
                })),
            ]
        );
    }

    #[tokio::test]
    async fn a_stream_cut_short_is_an_error() {
        let got = collect(&["data: {\"choices\":[{\"delta\":{\"content\":\"Hi\"}}]}\n\n"]).await;
        assert_eq!(got[0], Ok(Chunk::Text("Hi".into())));
        assert!(matches!(got[1], Err(ProviderError::Failed(_))), "{got:?}");
    }
}
