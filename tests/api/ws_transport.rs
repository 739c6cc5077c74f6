//! The WebSocket below the protocol: the upgrade, frames split in pieces or sent with the
//! handshake, broken frames, and refused upgrades, driven over a raw TCP socket so that each
//! byte is the test's choice.

use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::helpers::{spawn_app, spawn_app_with, TestApp};
use crate::ws::CUSTOMER_PATH;

const READ_TIMEOUT: Duration = Duration::from_secs(10);
const OP_CONTINUATION: u8 = 0x0;
const OP_TEXT: u8 = 0x1;
const OP_CLOSE: u8 = 0x8;
const OP_PING: u8 = 0x9;
const OP_PONG: u8 = 0xA;

/// One client frame, masked as a client must.
fn frame(opcode: u8, fin: bool, payload: &[u8]) -> Vec<u8> {
    let mask = [0x37, 0xfa, 0x21, 0x3d];
    let mut out = vec![(if fin { 0x80 } else { 0 }) | opcode];
    match payload.len() {
        n if n < 126 => out.push(0x80 | n as u8),
        n if n <= u16::MAX as usize => {
            out.push(0x80 | 126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(0x80 | 127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    out.extend_from_slice(&mask);
    out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    out
}

fn upgrade_request(app: &TestApp, path: &str, token: Option<&str>) -> String {
    let query = token.map(|t| format!("?token={t}")).unwrap_or_default();
    format!(
        "GET {path}{query} HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nUpgrade: websocket\r\n\
         Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
        app.port
    )
}

/// A frame from the server: opcode and payload (servers do not mask).
#[derive(Debug)]
struct ServerFrame {
    opcode: u8,
    payload: Vec<u8>,
}

impl ServerFrame {
    fn json(&self) -> Value {
        assert_eq!(self.opcode, OP_TEXT, "not a text frame: {self:?}");
        serde_json::from_slice(&self.payload).expect("a JSON text frame")
    }

    fn close_code(&self) -> u16 {
        assert_eq!(self.opcode, OP_CLOSE, "not a close frame: {self:?}");
        u16::from_be_bytes([self.payload[0], self.payload[1]])
    }
}

/// A raw client: writes bytes, reads an HTTP head, then server frames.
struct Raw {
    tcp: TcpStream,
    buf: Vec<u8>,
}

impl Raw {
    async fn connect(app: &TestApp) -> Raw {
        let tcp = TcpStream::connect(("127.0.0.1", app.port))
            .await
            .expect("connecting");
        Raw {
            tcp,
            buf: Vec::new(),
        }
    }

    async fn write(&mut self, bytes: &[u8]) {
        self.tcp.write_all(bytes).await.expect("writing");
    }

    /// Reads at least one more byte into the buffer; false at EOF.
    async fn fill(&mut self) -> bool {
        let mut chunk = [0u8; 4096];
        let n = tokio::time::timeout(READ_TIMEOUT, self.tcp.read(&mut chunk))
            .await
            .expect("the server said nothing in time")
            .unwrap_or(0);
        self.buf.extend_from_slice(&chunk[..n]);
        n > 0
    }

    /// The HTTP response head, lower-cased, and (when it has a Content-Length) its body.
    async fn http_response(&mut self) -> (String, Vec<u8>) {
        let end = loop {
            if let Some(i) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            assert!(self.fill().await, "EOF before the response head");
        };
        let head = String::from_utf8_lossy(&self.buf[..end]).to_lowercase();
        self.buf.drain(..end);
        let length = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .map(|v| v.trim().parse::<usize>().expect("a content length"))
            .unwrap_or(0);
        while self.buf.len() < length {
            assert!(self.fill().await, "EOF inside the body");
        }
        let body = self.buf.drain(..length).collect();
        (head, body)
    }

    /// The next server frame, or None at EOF.
    async fn frame(&mut self) -> Option<ServerFrame> {
        loop {
            if self.buf.len() >= 2 {
                let opcode = self.buf[0] & 0x0f;
                assert_eq!(self.buf[1] & 0x80, 0, "server frames are not masked");
                let (len, start) = match self.buf[1] & 0x7f {
                    126 if self.buf.len() >= 4 => {
                        (u16::from_be_bytes([self.buf[2], self.buf[3]]) as usize, 4)
                    }
                    127 if self.buf.len() >= 10 => (
                        u64::from_be_bytes(self.buf[2..10].try_into().unwrap()) as usize,
                        10,
                    ),
                    n @ 0..=125 => (n as usize, 2),
                    _ => (usize::MAX, 0),
                };
                if start > 0 && self.buf.len() >= start + len {
                    let payload = self.buf[start..start + len].to_vec();
                    self.buf.drain(..start + len);
                    return Some(ServerFrame { opcode, payload });
                }
            }
            if !self.fill().await {
                return None;
            }
        }
    }

    /// The next text frame as JSON, skipping pings.
    async fn next_json(&mut self) -> Value {
        loop {
            let f = self.frame().await.expect("EOF while waiting for a frame");
            if f.opcode != OP_PING {
                return f.json();
            }
        }
    }

    /// Upgrades with `token` and reads `hello`.
    async fn open(app: &TestApp, token: &str) -> Raw {
        let mut raw = Raw::connect(app).await;
        raw.write(upgrade_request(app, CUSTOMER_PATH, Some(token)).as_bytes())
            .await;
        let (head, _) = raw.http_response().await;
        assert!(head.starts_with("http/1.1 101"), "{head}");
        let hello = raw.next_json().await;
        assert_eq!(hello["type"], "hello", "{hello}");
        raw
    }
}

/// Opens a socket, writes `bytes` on it, and checks the `error` code and the close code that
/// end the connection.
async fn ends_with(app: &TestApp, token: &str, bytes: &[u8], code: &str, close: u16) {
    let mut raw = Raw::open(app, token).await;
    raw.write(bytes).await;
    let error = raw.next_json().await;
    assert_eq!(error["code"], code, "{error}");
    assert_eq!(raw.frame().await.expect("a close").close_code(), close);
}

#[tokio::test]
async fn frames_sent_with_the_upgrade_request_are_read() {
    let app = spawn_app().await;
    let guest = app.guest().await;
    let mut raw = Raw::connect(&app).await;
    // The handshake and a ping frame in one write: the frame sits behind the request head.
    let mut bytes = upgrade_request(&app, CUSTOMER_PATH, Some(&guest.access_token)).into_bytes();
    bytes.extend(frame(OP_TEXT, true, br#"{"type":"ping","nonce":"early"}"#));
    raw.write(&bytes).await;
    let (head, _) = raw.http_response().await;
    assert!(head.starts_with("http/1.1 101"), "{head}");
    assert!(head.contains("upgrade: websocket"), "{head}");
    assert!(
        head.contains("sec-websocket-accept: s3pplmbitxaq9kygzzhzrbk+xoo="),
        "{head}"
    );
    assert_eq!(raw.next_json().await["type"], "hello");
    let pong = raw.next_json().await;
    assert_eq!(pong, json!({"type": "pong", "nonce": "early"}));
}

#[tokio::test]
async fn a_message_split_into_fragments_is_joined() {
    let app = spawn_app().await;
    let guest = app.guest().await;
    let mut raw = Raw::open(&app, &guest.access_token).await;
    let text = br#"{"type":"ping","nonce":"in three pieces"}"#;
    let mut bytes = frame(OP_TEXT, false, &text[..10]);
    // A control frame may come between the pieces of a message.
    bytes.extend(frame(OP_PING, true, b"between"));
    bytes.extend(frame(OP_CONTINUATION, false, &text[10..20]));
    bytes.extend(frame(OP_CONTINUATION, true, &text[20..]));
    raw.write(&bytes).await;

    let pong = loop {
        let f = raw.frame().await.expect("the pong of the ping frame");
        if f.opcode != OP_PING {
            break f;
        }
    };
    assert_eq!(pong.opcode, OP_PONG, "{pong:?}");
    assert_eq!(pong.payload, b"between");
    let answer = raw.next_json().await;
    assert_eq!(answer, json!({"type": "pong", "nonce": "in three pieces"}));

    // One byte at a time works too.
    for byte in frame(OP_TEXT, true, br#"{"type":"ping","nonce":"slowly"}"#) {
        raw.write(&[byte]).await;
    }
    assert_eq!(raw.next_json().await["nonce"], "slowly");
}

#[tokio::test]
async fn text_that_is_not_utf8_closes_with_1007() {
    let app = spawn_app().await;
    let guest = app.guest().await;
    let mut raw = Raw::open(&app, &guest.access_token).await;
    raw.write(&frame(
        OP_TEXT,
        true,
        b"{\"type\":\"ping\",\"nonce\":\"\xff\xfe\"}",
    ))
    .await;
    let error = raw.next_json().await;
    assert_eq!(error["type"], "error", "{error}");
    assert_eq!(error["code"], "invalid_utf8", "{error}");
    let close = raw.frame().await.expect("a close frame");
    assert_eq!(close.close_code(), 1007);
    assert!(raw.frame().await.is_none(), "the socket stays open");
}

#[tokio::test]
async fn a_message_over_the_limit_closes_with_1009_even_in_fragments() {
    let app = spawn_app_with(|s| s.realtime.max_frame_bytes = 1024).await;
    let guest = app.guest().await;

    let token = &guest.access_token;
    // One frame over the limit.
    let one = frame(OP_TEXT, true, &[b'a'; 1025]);
    ends_with(&app, token, &one, "frame_too_large", 1009).await;

    // Fragments each under the limit, together over it.
    let mut pieces = frame(OP_TEXT, false, &[b'a'; 600]);
    pieces.extend(frame(OP_CONTINUATION, true, &[b'a'; 600]));
    ends_with(&app, token, &pieces, "frame_too_large", 1009).await;
}

#[tokio::test]
async fn broken_framing_closes_with_1002() {
    let app = spawn_app().await;
    let guest = app.guest().await;
    let token = &guest.access_token;
    // A continuation with no message begun.
    let orphan = frame(OP_CONTINUATION, true, b"orphan");
    ends_with(&app, token, &orphan, "protocol_error", 1002).await;

    // An unmasked client frame.
    ends_with(
        &app,
        token,
        &[0x81, 0x02, b'h', b'i'],
        "protocol_error",
        1002,
    )
    .await;
}

#[tokio::test]
async fn a_close_from_the_client_is_answered_and_the_socket_ends() {
    let app = spawn_app().await;
    let guest = app.guest().await;
    let mut raw = Raw::open(&app, &guest.access_token).await;
    raw.write(&frame(OP_CLOSE, true, &1000u16.to_be_bytes()))
        .await;
    let close = raw.frame().await.expect("the server's close");
    assert_eq!(close.close_code(), 1000);
    assert!(raw.frame().await.is_none(), "the socket stays open");
}

#[tokio::test]
async fn a_refused_upgrade_says_why_in_json_and_closes() {
    let app = spawn_app().await;
    // No token.
    let mut raw = Raw::connect(&app).await;
    raw.write(upgrade_request(&app, CUSTOMER_PATH, None).as_bytes())
        .await;
    let (head, body) = raw.http_response().await;
    assert!(head.starts_with("http/1.1 401"), "{head}");
    assert!(head.contains("connection: close"), "{head}");
    let body: Value = serde_json::from_slice(&body).expect("a JSON body");
    assert_eq!(body["error"], "unauthorized", "{body}");
    assert!(
        !raw.fill().await,
        "the connection stays open after a refusal"
    );

    // A valid token but no Sec-WebSocket-Key: not a WebSocket handshake.
    let guest = app.guest().await;
    let mut raw = Raw::connect(&app).await;
    let request = upgrade_request(&app, CUSTOMER_PATH, Some(&guest.access_token))
        .replace("Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n", "");
    raw.write(request.as_bytes()).await;
    let (head, body) = raw.http_response().await;
    assert!(head.starts_with("http/1.1 400"), "{head}");
    let body: Value = serde_json::from_slice(&body).expect("a JSON body");
    assert!(
        body["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{body}"
    );

    // An upgrade asked of an ordinary endpoint gets its ordinary answer.
    let mut raw = Raw::connect(&app).await;
    raw.write(upgrade_request(&app, "/health", None).as_bytes())
        .await;
    let (head, body) = raw.http_response().await;
    assert!(head.starts_with("http/1.1 200"), "{head}");
    let body: Value = serde_json::from_slice(&body).expect("a JSON body");
    assert_eq!(body["status"], "ok", "{body}");
}
