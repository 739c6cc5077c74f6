//! A scripted HTTP/1.1 server on 127.0.0.1: the far side of a provider call.
//!
//! Each request takes the next [`Reply`] from the script (the last one repeats when the script
//! runs out) and is recorded, so a test can check what the server was sent. Streamed replies
//! use chunked transfer encoding; [`Part::Cut`] closes the connection without the final chunk,
//! which a client sees as a broken stream, and [`Reply::hang`] never answers.

#![allow(dead_code)] // Not every test uses every helper.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// One piece of a streamed body.
#[derive(Clone, Debug)]
pub enum Part {
    Bytes(Vec<u8>),
    Pause(Duration),
    /// Close the connection here, without ending the body.
    Cut,
}

#[derive(Clone, Debug)]
enum Body {
    Whole(Vec<u8>),
    Chunked(Vec<Part>),
    Hang,
}

/// What the server answers to one request.
#[derive(Clone, Debug)]
pub struct Reply {
    status: u16,
    headers: Vec<(String, String)>,
    body: Body,
}

impl Reply {
    /// A JSON body with `status`.
    pub fn json(status: u16, body: &Value) -> Reply {
        Reply {
            status,
            headers: vec![("content-type".into(), "application/json".into())],
            body: Body::Whole(body.to_string().into_bytes()),
        }
    }

    /// A streamed body of `content_type`, one chunk per part.
    pub fn stream(content_type: &str, parts: Vec<Part>) -> Reply {
        Reply {
            status: 200,
            headers: vec![("content-type".into(), content_type.into())],
            body: Body::Chunked(parts),
        }
    }

    /// Reads the request and never answers.
    pub fn hang() -> Reply {
        Reply {
            status: 200,
            headers: Vec::new(),
            body: Body::Hang,
        }
    }

    pub fn header(mut self, name: &str, value: &str) -> Reply {
        self.headers.push((name.into(), value.into()));
        self
    }
}

/// A request the server received.
#[derive(Clone, Debug)]
pub struct Recorded {
    pub method: String,
    pub path: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Recorded {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "request body is not JSON ({e}): {}",
                String::from_utf8_lossy(&self.body)
            )
        })
    }
}

#[derive(Default)]
struct State {
    script: VecDeque<Reply>,
    last: Option<Reply>,
    requests: Vec<Recorded>,
}

#[derive(Clone)]
pub struct FakeServer {
    /// `http://127.0.0.1:<port>`
    pub url: String,
    state: Arc<Mutex<State>>,
}

impl FakeServer {
    /// Starts a server that answers with `script`, in order; the last reply repeats.
    pub async fn start(script: Vec<Reply>) -> FakeServer {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("binding the fake server");
        let url = format!("http://{}", listener.local_addr().unwrap());
        let state = Arc::new(Mutex::new(State {
            script: script.into(),
            ..State::default()
        }));
        let shared = state.clone();
        tokio::spawn(async move {
            while let Ok((socket, _)) = listener.accept().await {
                tokio::spawn(serve(socket, shared.clone()));
            }
        });
        FakeServer { url, state }
    }

    /// Replaces what is left of the script.
    pub fn script(&self, replies: Vec<Reply>) {
        let mut state = self.state.lock().unwrap();
        state.script = replies.into();
        state.last = None;
    }

    /// Every request so far, in the order received.
    pub fn requests(&self) -> Vec<Recorded> {
        self.state.lock().unwrap().requests.clone()
    }

    pub fn request_count(&self) -> usize {
        self.state.lock().unwrap().requests.len()
    }
}

async fn serve(mut socket: TcpStream, state: Arc<Mutex<State>>) {
    let Some(request) = read_request(&mut socket).await else {
        return;
    };
    let reply = {
        let mut s = state.lock().unwrap();
        s.requests.push(request);
        let next = s.script.pop_front();
        if let Some(r) = &next {
            s.last = Some(r.clone());
        }
        next.or_else(|| s.last.clone())
            .unwrap_or_else(|| Reply::json(500, &serde_json::json!({"error": "no script"})))
    };
    let mut head = format!("HTTP/1.1 {} Fake\r\nconnection: close\r\n", reply.status);
    for (k, v) in &reply.headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    match reply.body {
        Body::Hang => {
            // Hold the connection open until the client gives up.
            let mut sink = [0u8; 1024];
            while let Ok(n) = socket.read(&mut sink).await {
                if n == 0 {
                    return;
                }
            }
        }
        Body::Whole(bytes) => {
            head.push_str(&format!("content-length: {}\r\n\r\n", bytes.len()));
            let _ = socket.write_all(head.as_bytes()).await;
            let _ = socket.write_all(&bytes).await;
            let _ = socket.shutdown().await;
        }
        Body::Chunked(parts) => {
            head.push_str("transfer-encoding: chunked\r\n\r\n");
            if socket.write_all(head.as_bytes()).await.is_err() {
                return;
            }
            for part in parts {
                match part {
                    Part::Bytes(bytes) => {
                        let mut chunk = format!("{:x}\r\n", bytes.len()).into_bytes();
                        chunk.extend_from_slice(&bytes);
                        chunk.extend_from_slice(b"\r\n");
                        if socket.write_all(&chunk).await.is_err() {
                            return;
                        }
                        let _ = socket.flush().await;
                    }
                    Part::Pause(d) => tokio::time::sleep(d).await,
                    Part::Cut => return,
                }
            }
            let _ = socket.write_all(b"0\r\n\r\n").await;
            let _ = socket.shutdown().await;
        }
    }
}

async fn read_request(socket: &mut TcpStream) -> Option<Recorded> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i;
        }
        let n = socket.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let mut lines = head.split("\r\n");
    let mut first = lines.next()?.split(' ');
    let method = first.next()?.to_string();
    let path = first.next()?.to_string();
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let length: usize = headers
        .iter()
        .find(|(k, _)| k == "content-length")
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0);
    let mut body = buf[head_end + 4..].to_vec();
    while body.len() < length {
        let n = socket.read(&mut chunk).await.ok()?;
        if n == 0 {
            break;
        }
        body.extend_from_slice(&chunk[..n]);
    }
    Some(Recorded {
        method,
        path,
        headers,
        body,
    })
}

/// An OpenAI SSE stream: one `data:` event per delta, a usage event, then `[DONE]`.
pub fn openai_sse(deltas: &[&str], usage: Option<(u64, u64)>) -> Vec<Part> {
    let mut parts: Vec<Part> = deltas.iter().map(|d| openai_delta(d)).collect();
    if let Some((input, output)) = usage {
        parts.push(sse(&serde_json::json!({
            "choices": [],
            "usage": {"prompt_tokens": input, "completion_tokens": output}
        })));
    }
    parts.push(Part::Bytes(b"data: [DONE]\n\n".to_vec()));
    parts
}

/// One `data:` event carrying a content delta.
pub fn openai_delta(text: &str) -> Part {
    sse(&serde_json::json!({
        "id": "chatcmpl-test",
        "object": "chat.completion.chunk",
        "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": null}]
    }))
}

fn sse(v: &Value) -> Part {
    Part::Bytes(format!("data: {v}\n\n").into_bytes())
}

/// An OpenAI error answer with `status`.
pub fn openai_error(status: u16) -> Reply {
    Reply::json(
        status,
        &serde_json::json!({"error": {"message": format!("status {status}")}}),
    )
}

/// A whole (non-streamed) OpenAI chat completion.
pub fn openai_completion(text: &str) -> Value {
    serde_json::json!({
        "id": "chatcmpl-test",
        "object": "chat.completion",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 11, "completion_tokens": 3, "total_tokens": 14}
    })
}

/// One AWS event-stream frame carrying a Bedrock ConverseStream event.
pub fn bedrock_event(event_type: &str, payload: &Value) -> Part {
    use aws_smithy_types::event_stream::{Header, HeaderValue, Message};
    let message = Message::new(payload.to_string().into_bytes())
        .add_header(Header::new(
            ":event-type",
            HeaderValue::String(event_type.to_string().into()),
        ))
        .add_header(Header::new(
            ":content-type",
            HeaderValue::String("application/json".into()),
        ))
        .add_header(Header::new(
            ":message-type",
            HeaderValue::String("event".into()),
        ));
    let mut frame = Vec::new();
    aws_smithy_eventstream::frame::write_message_to(&message, &mut frame)
        .expect("encoding an event-stream frame");
    Part::Bytes(frame)
}

/// An exception frame inside a ConverseStream (`throttlingException`, …).
pub fn bedrock_exception(exception_type: &str, message: &str) -> Part {
    use aws_smithy_types::event_stream::{Header, HeaderValue, Message};
    let payload = serde_json::json!({ "message": message }).to_string();
    let message = Message::new(payload.into_bytes())
        .add_header(Header::new(
            ":exception-type",
            HeaderValue::String(exception_type.to_string().into()),
        ))
        .add_header(Header::new(
            ":content-type",
            HeaderValue::String("application/json".into()),
        ))
        .add_header(Header::new(
            ":message-type",
            HeaderValue::String("exception".into()),
        ));
    let mut frame = Vec::new();
    aws_smithy_eventstream::frame::write_message_to(&message, &mut frame)
        .expect("encoding an event-stream frame");
    Part::Bytes(frame)
}

/// A whole ConverseStream answer: messageStart, one contentBlockDelta per delta,
/// contentBlockStop, messageStop and metadata with the usage.
pub fn bedrock_stream(deltas: &[&str], usage: (u64, u64)) -> Vec<Part> {
    let mut parts = vec![bedrock_event(
        "messageStart",
        &serde_json::json!({"role": "assistant"}),
    )];
    parts.extend(deltas.iter().map(|d| bedrock_delta(d)));
    parts.push(bedrock_event(
        "contentBlockStop",
        &serde_json::json!({"contentBlockIndex": 0}),
    ));
    parts.push(bedrock_event(
        "messageStop",
        &serde_json::json!({"stopReason": "end_turn"}),
    ));
    parts.push(bedrock_event(
        "metadata",
        &serde_json::json!({
            "usage": {"inputTokens": usage.0, "outputTokens": usage.1, "totalTokens": usage.0 + usage.1},
            "metrics": {"latencyMs": 12}
        }),
    ));
    parts
}

/// One contentBlockDelta frame with text.
pub fn bedrock_delta(text: &str) -> Part {
    bedrock_event(
        "contentBlockDelta",
        &serde_json::json!({"contentBlockIndex": 0, "delta": {"text": text}}),
    )
}

/// A ConverseStream reply, as Bedrock sends it.
pub fn bedrock_stream_reply(parts: Vec<Part>) -> Reply {
    Reply::stream("application/vnd.amazon.eventstream", parts)
}

/// A whole Converse answer.
pub fn bedrock_converse(text: &str) -> Value {
    serde_json::json!({
        "output": {"message": {"role": "assistant", "content": [{"text": text}]}},
        "stopReason": "end_turn",
        "usage": {"inputTokens": 9, "outputTokens": 4, "totalTokens": 13},
        "metrics": {"latencyMs": 20}
    })
}

/// A Bedrock error response (`ThrottlingException`, `ValidationException`, …).
pub fn bedrock_error(status: u16, error_type: &str, message: &str) -> Reply {
    Reply::json(status, &serde_json::json!({ "message": message })).header(
        "x-amzn-errortype",
        &format!("{error_type}:http://internal.amazon.com/coral/com.amazon.bedrock/"),
    )
}
