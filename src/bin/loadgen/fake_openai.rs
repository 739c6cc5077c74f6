//! A stand-in for an OpenAI-compatible model server: `POST …/chat/completions` answers with
//! `tokens` tokens at `rate` tokens per second, as Server-Sent Events when `"stream": true`.
//! Each token carries its emit time (`@<unix µs>`), so the load generator can measure how late
//! the hub delivers it.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context as _;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::clock::Clock;

const MAX_REQUEST_BYTES: usize = 1 << 20;

pub async fn serve(listen: SocketAddr, rate: f64, tokens: usize) -> anyhow::Result<()> {
    let listener = TcpListener::bind(listen)
        .await
        .with_context(|| format!("binding {listen}"))?;
    println!("listening on {}", listener.local_addr()?);
    let clock = Clock::new();
    let gap = Duration::from_secs_f64(1.0 / rate.max(0.001));
    loop {
        let (socket, _) = listener.accept().await?;
        tokio::spawn(async move {
            if let Err(e) = answer(socket, clock, gap, tokens).await {
                eprintln!("fake-openai: {e:#}");
            }
        });
    }
}

async fn answer(
    mut socket: TcpStream,
    clock: Clock,
    gap: Duration,
    tokens: usize,
) -> anyhow::Result<()> {
    let (head, body) = read_request(&mut socket).await?;
    let request_line = head.lines().next().unwrap_or("");
    if !request_line.starts_with("POST ") || !request_line.contains("/chat/completions") {
        let msg = r#"{"error":{"message":"not found"}}"#;
        let reply = format!(
            "HTTP/1.1 404 Not Found\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{msg}",
            msg.len()
        );
        socket.write_all(reply.as_bytes()).await?;
        return Ok(());
    }
    let request: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
    let model = request["model"].as_str().unwrap_or("fake").to_string();
    if request["stream"].as_bool() != Some(true) {
        let text: String = (0..tokens)
            .map(|_| format!(" w@{}", clock.now_us()))
            .collect();
        let reply = serde_json::json!({
            "id": "fake", "object": "chat.completion", "created": 0, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 10, "completion_tokens": tokens, "total_tokens": tokens + 10}
        })
        .to_string();
        let head = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
            reply.len()
        );
        socket.write_all(head.as_bytes()).await?;
        socket.write_all(reply.as_bytes()).await?;
        return Ok(());
    }
    socket
        .write_all(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\nconnection: close\r\n\r\n")
        .await?;
    let start = tokio::time::Instant::now();
    for i in 0..tokens {
        tokio::time::sleep_until(start + gap * i as u32).await;
        let chunk = serde_json::json!({
            "id": "fake", "object": "chat.completion.chunk", "created": 0, "model": model,
            "choices": [{"index": 0, "delta": {"content": format!(" w@{}", clock.now_us())}, "finish_reason": null}]
        });
        socket
            .write_all(format!("data: {chunk}\n\n").as_bytes())
            .await?;
    }
    let last = serde_json::json!({
        "id": "fake", "object": "chat.completion.chunk", "created": 0, "model": model,
        "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]
    });
    socket
        .write_all(format!("data: {last}\n\ndata: [DONE]\n\n").as_bytes())
        .await?;
    socket.shutdown().await?;
    Ok(())
}

/// The request head and its body (by `content-length`).
async fn read_request(socket: &mut TcpStream) -> anyhow::Result<(String, Vec<u8>)> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        anyhow::ensure!(buf.len() < MAX_REQUEST_BYTES, "request head too large");
        let n = socket.read(&mut chunk).await?;
        anyhow::ensure!(n > 0, "the client closed before sending a request");
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
    let length: usize = head
        .lines()
        .find_map(|l| {
            let (name, value) = l.split_once(':')?;
            name.eq_ignore_ascii_case("content-length")
                .then(|| value.trim().parse().ok())
                .flatten()
        })
        .unwrap_or(0)
        .min(MAX_REQUEST_BYTES);
    let mut body = buf[head_end..].to_vec();
    while body.len() < length {
        let n = socket.read(&mut chunk).await?;
        anyhow::ensure!(n > 0, "the client closed mid-body");
        body.extend_from_slice(&chunk[..n]);
    }
    Ok((head, body))
}
