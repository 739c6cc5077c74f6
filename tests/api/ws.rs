//! A small WebSocket client for the realtime tests: JSON frames in and out, with timeouts
//! that fail the test with a clear message instead of hanging it.

#![allow(dead_code)] // Not every test uses every helper.

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::handshake::client::{Request, Response};
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use crate::helpers::TestApp;

/// How long [`WsClient::next`] waits for a frame.
pub const FRAME_TIMEOUT: Duration = Duration::from_secs(10);

pub const CUSTOMER_PATH: &str = "/api/v1/chat/ws";
pub const STAFF_PATH: &str = "/api/v1/admin/chat/ws";

type Socket = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// How a connection ended, as seen by [`WsClient::drain`].
#[derive(Debug, Default)]
pub struct Drained {
    /// Every JSON frame read before the end.
    pub frames: Vec<Value>,
    /// The close frame's code, if the server sent one.
    pub close_code: Option<u16>,
    /// True when the end came as EOF or a transport error rather than a close frame.
    pub eof: bool,
}

impl Drained {
    /// How many frames of `kind` were read.
    pub fn count(&self, kind: &str) -> usize {
        self.frames.iter().filter(|f| f["type"] == kind).count()
    }
}

pub struct WsClient {
    socket: Socket,
    /// What the client has read, in order (for failure messages).
    seen: Vec<Value>,
}

/// `ws://127.0.0.1:<port><path>` for the app.
pub fn ws_url(app: &TestApp, path: &str) -> String {
    format!("ws://127.0.0.1:{}{}", app.port, path)
}

/// A handshake request for `path` with no credentials; callers add headers.
pub fn request(app: &TestApp, path: &str) -> Request {
    ws_url(app, path)
        .into_client_request()
        .expect("building the WebSocket request")
}

/// Tries a handshake; the error carries the HTTP response when the server refused it.
pub async fn try_connect(request: Request) -> Result<(WsClient, Response), tungstenite::Error> {
    let (socket, response) =
        tokio::time::timeout(FRAME_TIMEOUT, tokio_tungstenite::connect_async(request))
            .await
            .expect("the WebSocket handshake timed out")?;
    Ok((
        WsClient {
            socket,
            seen: Vec::new(),
        },
        response,
    ))
}

/// The HTTP status a refused handshake was answered with; panics if it was accepted.
pub async fn refused_status(request: Request) -> u16 {
    match try_connect(request).await {
        Ok(_) => panic!("the handshake was accepted"),
        Err(tungstenite::Error::Http(response)) => response.status().as_u16(),
        Err(e) => panic!("the handshake failed without an HTTP answer: {e}"),
    }
}

impl WsClient {
    /// Connects to `path` with `?token=`; does not read anything.
    pub async fn connect_raw(app: &TestApp, path: &str, token: &str) -> WsClient {
        let url = format!("{}?token={token}", ws_url(app, path));
        let req = url.into_client_request().expect("building the request");
        match try_connect(req).await {
            Ok((client, _)) => client,
            Err(e) => panic!("connecting to {path}: {e}"),
        }
    }

    /// Connects to `path`, reads the `hello` frame and checks it; returns the client.
    pub async fn connect_at(app: &TestApp, path: &str, token: &str) -> WsClient {
        let mut client = WsClient::connect_raw(app, path, token).await;
        let hello = client.next().await;
        assert_eq!(hello["type"], "hello", "first frame: {hello}");
        assert_eq!(hello["protocol"], 1, "{hello}");
        client
    }

    /// A customer connection (`/api/v1/chat/ws`), past its `hello`.
    pub async fn customer(app: &TestApp, token: &str) -> WsClient {
        WsClient::connect_at(app, CUSTOMER_PATH, token).await
    }

    /// An agent or admin connection (`/api/v1/admin/chat/ws`), past its `hello`.
    pub async fn staff(app: &TestApp, token: &str) -> WsClient {
        WsClient::connect_at(app, STAFF_PATH, token).await
    }

    pub async fn send(&mut self, frame: &Value) {
        self.send_text(&frame.to_string()).await;
    }

    pub async fn send_text(&mut self, text: &str) {
        tokio::time::timeout(FRAME_TIMEOUT, self.socket.send(Message::Text(text.into())))
            .await
            .expect("sending a frame timed out")
            .expect("sending a frame");
    }

    pub async fn send_binary(&mut self, bytes: &[u8]) {
        tokio::time::timeout(
            FRAME_TIMEOUT,
            self.socket.send(Message::Binary(bytes.to_vec())),
        )
        .await
        .expect("sending a frame timed out")
        .expect("sending a binary frame");
    }

    /// Queues a frame without flushing (for pipelining many sends); call [`flush`] after.
    pub async fn feed(&mut self, frame: &Value) {
        tokio::time::timeout(
            FRAME_TIMEOUT,
            self.socket.feed(Message::Text(frame.to_string())),
        )
        .await
        .expect("queueing a frame timed out")
        .expect("queueing a frame");
    }

    pub async fn flush(&mut self) {
        tokio::time::timeout(FRAME_TIMEOUT, self.socket.flush())
            .await
            .expect("flushing timed out")
            .expect("flushing");
    }

    /// `send {session_id, client_id, content}`.
    pub async fn send_message(&mut self, session_id: &str, client_id: &str, content: &str) {
        self.send(&send_frame(session_id, client_id, content)).await;
    }

    /// `resume {session_id, after_seq}`.
    pub async fn resume(&mut self, session_id: &str, after_seq: i64) {
        self.send(&json!({"type": "resume", "session_id": session_id, "after_seq": after_seq}))
            .await;
    }

    /// The next JSON frame, or `None` if the connection ended or nothing came within `wait`.
    /// Ping and pong control frames are skipped.
    pub async fn next_within(&mut self, wait: Duration) -> Result<Value, String> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let item = match tokio::time::timeout_at(deadline, self.socket.next()).await {
                Err(_) => return Err(format!("no frame within {wait:?}")),
                Ok(item) => item,
            };
            match item {
                None => return Err("the connection ended (EOF)".into()),
                Some(Err(e)) => return Err(format!("the connection failed: {e}")),
                Some(Ok(Message::Text(text))) => {
                    let value: Value = serde_json::from_str(&text)
                        .unwrap_or_else(|e| panic!("server sent non-JSON text ({e}): {text}"));
                    self.seen.push(value.clone());
                    return Ok(value);
                }
                Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => continue,
                Some(Ok(Message::Close(close))) => {
                    return Err(format!("the server closed the connection: {close:?}"))
                }
                Some(Ok(Message::Binary(b))) => {
                    panic!("the server sent a binary frame of {} bytes", b.len())
                }
            }
        }
    }

    /// The next JSON frame (10 s timeout); panics on timeout or when the connection ends.
    pub async fn next(&mut self) -> Value {
        match self.next_within(FRAME_TIMEOUT).await {
            Ok(v) => v,
            Err(e) => panic!("{e}; frames read so far: {}", self.recent()),
        }
    }

    /// The next frame of type `kind`, skipping others.
    pub async fn next_of(&mut self, kind: &str) -> Value {
        loop {
            let frame = self.next().await;
            if frame["type"] == kind {
                return frame;
            }
        }
    }

    /// Reads frames until one satisfies `done`; returns all of them, that one last.
    pub async fn until(&mut self, mut done: impl FnMut(&Value) -> bool) -> Vec<Value> {
        let mut out = Vec::new();
        loop {
            let frame = self.next().await;
            let stop = done(&frame);
            out.push(frame);
            if stop {
                return out;
            }
        }
    }

    /// `ping {nonce}` and waits for its `pong`, skipping other frames; returns them.
    pub async fn ping(&mut self, nonce: &str) -> Vec<Value> {
        self.send(&json!({"type": "ping", "nonce": nonce})).await;
        self.until(|f| f["type"] == "pong" && f["nonce"] == nonce)
            .await
    }

    /// Reads until the connection ends (close frame, EOF or transport error), for at most
    /// `wait`; `Err` with what was read if it was still open then.
    pub async fn drain(&mut self, wait: Duration) -> Result<Drained, Drained> {
        drain_stream(&mut self.socket, wait, |_| {}).await
    }

    /// Closes the connection politely (a close frame), without waiting for the answer.
    pub async fn close(mut self) {
        let _ = tokio::time::timeout(Duration::from_secs(2), self.socket.close(None)).await;
    }

    /// Splits into a sending half and a receiving half, for reading while writing.
    pub fn split(
        self,
    ) -> (
        futures_util::stream::SplitSink<Socket, Message>,
        futures_util::stream::SplitStream<Socket>,
    ) {
        self.socket.split()
    }

    /// The last frames read, for failure messages.
    fn recent(&self) -> String {
        let start = self.seen.len().saturating_sub(8);
        self.seen[start..]
            .iter()
            .map(Value::to_string)
            .collect::<Vec<_>>()
            .join("\n  ")
    }
}

/// A `send` frame: store `content` in `session_id` under the client's id `client_id`.
pub fn send_frame(session_id: &str, client_id: &str, content: &str) -> Value {
    json!({"type": "send", "session_id": session_id, "client_id": client_id, "content": content})
}

/// [`WsClient::drain`] for any receiving half (a split one too), calling `each` with every
/// JSON frame as it comes.
pub async fn drain_stream<S>(
    stream: &mut S,
    wait: Duration,
    mut each: impl FnMut(&Value),
) -> Result<Drained, Drained>
where
    S: futures_util::Stream<Item = Result<Message, tungstenite::Error>> + Unpin,
{
    let deadline = tokio::time::Instant::now() + wait;
    let mut drained = Drained::default();
    loop {
        let item = match tokio::time::timeout_at(deadline, stream.next()).await {
            Err(_) => return Err(drained),
            Ok(item) => item,
        };
        match item {
            None | Some(Err(_)) => {
                drained.eof = true;
                return Ok(drained);
            }
            Some(Ok(Message::Close(close))) => {
                drained.close_code = close.map(|c| u16::from(c.code));
                return Ok(drained);
            }
            Some(Ok(Message::Text(text))) => {
                let value: Value = serde_json::from_str(&text)
                    .unwrap_or_else(|e| panic!("server sent non-JSON text ({e}): {text}"));
                each(&value);
                drained.frames.push(value);
            }
            Some(Ok(_)) => {}
        }
    }
}

/// The JSON frames read from a split receiving half until `done`, with a timeout per frame.
pub async fn read_until(
    stream: &mut futures_util::stream::SplitStream<Socket>,
    wait: Duration,
    mut done: impl FnMut(&Value) -> bool,
) -> Vec<Value> {
    let mut out = Vec::new();
    loop {
        let item = tokio::time::timeout(wait, stream.next())
            .await
            .unwrap_or_else(|_| panic!("no frame within {wait:?}; read {} so far", out.len()));
        match item {
            Some(Ok(Message::Text(text))) => {
                let value: Value = serde_json::from_str(&text).expect("server sent non-JSON");
                let stop = done(&value);
                out.push(value);
                if stop {
                    return out;
                }
            }
            Some(Ok(Message::Close(c))) => panic!("closed by the server: {c:?}; read {out:?}"),
            Some(Ok(_)) => {}
            Some(Err(e)) => panic!("the connection failed: {e}"),
            None => panic!("the connection ended (EOF)"),
        }
    }
}
