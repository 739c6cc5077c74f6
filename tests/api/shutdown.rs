//! SIGTERM drains the real binary: answers in flight are stored as interrupted, sockets are
//! closed with a reason, and the process exits 0. SIGKILL loses nothing that was acknowledged.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use futures_util::SinkExt;
use serde_json::{json, Value};
use switchboard::db::models::message::{self, Order};
use switchboard::db::models::ChatMessage;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

use switchboard::db::models::Role;

use crate::ai_http::{read_sse_until, sse_events};
use crate::helpers::{connect, insert_user, TestDatabase, CONFIG_DIR, JWT_SECRET};
use crate::realtime::hold_write_lock;
use crate::ws::{drain_stream, send_frame, try_connect, WsClient, CUSTOMER_PATH, STAFF_PATH};

/// The server process; killed if the test ends before it exits.
pub struct Server {
    pub child: Child,
    pub port: u16,
    /// The server's log lines, as they come.
    pub log: std::sync::mpsc::Receiver<String>,
}

impl Server {
    /// Waits for a log line containing `needle`.
    pub fn wait_for_log(&self, needle: &str) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.log.recv_timeout(left) {
                Ok(line) if line.contains(needle) => return,
                Ok(_) => {}
                Err(e) => panic!("no log line with {needle:?} within 30 s: {e}"),
            }
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `switchboard serve` on a free port and waits for it to say where it listens;
/// `env` adds to (or overrides) the variables set here.
pub fn start_server(db_url: &str, env: &[(&str, &str)]) -> Server {
    let mut command = Command::new(env!("CARGO_BIN_EXE_switchboard"));
    command
        .arg("serve")
        .env("CONFIG_DIR", CONFIG_DIR)
        .env("DATABASE_URL", db_url)
        .env("JWT_SECRET", JWT_SECRET)
        .env("PORT", "0")
        .env("HTTP_WORKERS", "1")
        .env("LOG_LEVEL", "info")
        .env("AI_DEMO_TOKEN_DELAY", "150ms")
        .env("SHUTDOWN_TIMEOUT", "20s")
        .envs(env.iter().copied())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut child = command.spawn().expect("starting the switchboard binary");
    let stderr = child.stderr.take().expect("stderr");
    let (tx, rx) = std::sync::mpsc::channel();
    let (log_tx, log) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut told = false;
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            if !line.contains("switchboard::http") {
                eprintln!("server: {line}");
            }
            let _ = log_tx.send(line.clone());
            if !told {
                if let Some(port) = line
                    .split("(port ")
                    .nth(1)
                    .and_then(|rest| rest.split(')').next())
                    .and_then(|p| p.parse::<u16>().ok())
                {
                    let _ = tx.send(port);
                    told = true;
                }
            }
        }
    });
    let port = rx
        .recv_timeout(Duration::from_secs(60))
        .expect("the server did not log its port within 60 s");
    Server { child, port, log }
}

/// A new guest and a conversation of theirs: (token, session id).
pub async fn guest_with_session(http: &reqwest::Client, base: &str) -> (String, String) {
    let guest: Value = http
        .post(format!("{base}/api/v1/auth/guest"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let token = guest["access_token"].as_str().expect("a guest token");
    let session: Value = http
        .post(format!("{base}/api/v1/chat/sessions"))
        .bearer_auth(token)
        .json(&json!({"title": "drain"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let sid = session["id"].as_str().expect("a session id");
    (token.to_string(), sid.to_string())
}

async fn connect_customer(server: &Server, token: &str) -> WsClient {
    connect_to(server, CUSTOMER_PATH, token).await
}

async fn connect_to(server: &Server, path: &str, token: &str) -> WsClient {
    let url = format!("ws://127.0.0.1:{}{path}?token={token}", server.port);
    let (mut ws, _) = try_connect(url.into_client_request().unwrap())
        .await
        .expect("connecting");
    assert_eq!(ws.next().await["type"], "hello");
    ws
}

/// An agent, inserted into the database and signed in over HTTP: their access token.
async fn agent_token(db_url: &str, http: &reqwest::Client, base: &str) -> String {
    let url = db_url.to_string();
    tokio::task::spawn_blocking(move || {
        insert_user(
            &mut connect(&url),
            "agent@example.com",
            Role::Agent,
            "correct horse battery",
        )
    })
    .await
    .unwrap();
    let signed: Value = http
        .post(format!("{base}/api/v1/auth/login"))
        .json(&json!({"email": "agent@example.com", "password": "correct horse battery"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    signed["access_token"]
        .as_str()
        .unwrap_or_else(|| panic!("no access token: {signed}"))
        .to_string()
}

/// Waits up to 30 s for the server process to exit; panics unless it exits with 0.
async fn expect_clean_exit(server: &mut Server) {
    let deadline = Instant::now() + Duration::from_secs(30);
    let exit = loop {
        if let Some(exit) = server.child.try_wait().expect("waiting for the server") {
            break exit;
        }
        assert!(
            Instant::now() < deadline,
            "the server did not exit within 30 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(exit.success(), "the server exited with {exit}");
}

fn sigterm(server: &Server) {
    let status = Command::new("kill")
        .args(["-TERM", &server.child.id().to_string()])
        .status()
        .expect("running kill");
    assert!(status.success());
}

fn stored(db_url: &str, session_id: &str) -> Vec<ChatMessage> {
    message::page(&mut connect(db_url), session_id, Order::Asc, None, 10).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_interrupts_answers_stores_them_and_closes_sockets_with_a_reason() {
    let db = TestDatabase::new();
    let mut server = start_server(&db.url, &[]);
    let base = format!("http://127.0.0.1:{}", server.port);
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    let (token, sid) = guest_with_session(&http, &base).await;
    let mut ws = connect_customer(&server, &token).await;

    // A second customer whose message is still being stored when the signal comes.
    let (other_token, other_sid) = guest_with_session(&http, &base).await;
    let mut other = connect_customer(&server, &other_token).await;
    other.send_message(&other_sid, "o-0", "hello").await;
    other.next_of("ack").await;
    other.until(|f| f["type"] == "reply_done").await;

    ws.send_message(&sid, "d-1", "a question before the restart")
        .await;
    let mut frames = Vec::new();
    while frames
        .iter()
        .filter(|f: &&Value| f["type"] == "token")
        .count()
        < 2
    {
        frames.push(ws.next().await);
    }
    let release = hold_write_lock(&db.url);
    other
        .send_message(&other_sid, "o-1", "stored during the drain")
        .await;
    // Frames of one socket are handled in order: once the pong is back, the message was handed
    // on before the signal can be.
    other.ping("o-1 handed on").await;

    sigterm(&server);
    server.wait_for_log("shutting down: interrupting");
    // Nothing new is taken once the drain began, and the sender is told so.
    other.send_message(&other_sid, "o-2", "too late").await;
    let refused = other.next_of("error").await;
    assert_eq!(refused["code"], "shutting_down", "{refused}");
    assert_eq!(refused["client_id"], "o-2", "{refused}");
    release.send(()).unwrap();

    // The message pending at the signal is stored and acked before its socket closes.
    let drained = other
        .drain(Duration::from_secs(30))
        .await
        .unwrap_or_else(|d| panic!("the other socket was not closed: {:?}", d.frames));
    let ack = drained
        .frames
        .iter()
        .find(|f| f["type"] == "ack")
        .unwrap_or_else(|| panic!("no ack for the pending message: {drained:?}"));
    assert_eq!(ack["client_id"], "o-1", "{ack}");
    assert_eq!(ack["seq"], 3, "{ack}");
    assert_eq!(drained.close_code, Some(1012), "{drained:?}");

    // The answer in flight is stored as interrupted, then the socket closes with a reason.
    let drained = ws
        .drain(Duration::from_secs(30))
        .await
        .unwrap_or_else(|d| panic!("the socket was not closed: {:?}", d.frames));
    frames.extend(drained.frames.iter().cloned());
    assert_eq!(
        drained.close_code,
        Some(1012),
        "closed with 1012 (service restart): {drained:?}"
    );
    let done = frames
        .iter()
        .find(|f| f["type"] == "reply_done")
        .unwrap_or_else(|| panic!("no reply_done before the close: {frames:?}"));
    assert_eq!(done["interrupted"], true, "{done}");
    assert_eq!(done["seq"], 2, "{done}");
    let goodbye = frames.last().unwrap();
    assert_eq!(goodbye["type"], "error", "{frames:?}");
    assert_eq!(goodbye["code"], "shutdown", "{goodbye}");
    let streamed: String = frames
        .iter()
        .filter(|f| f["type"] == "token")
        .map(|f| f["delta"].as_str().unwrap())
        .collect();

    expect_clean_exit(&mut server).await;

    // Nobody is listening any more.
    let url = format!(
        "ws://127.0.0.1:{}{CUSTOMER_PATH}?token={token}",
        server.port
    );
    assert!(try_connect(url.into_client_request().unwrap())
        .await
        .is_err());

    let url = db.url.clone();
    let (rows, other_rows) =
        tokio::task::spawn_blocking(move || (stored(&url, &sid), stored(&url, &other_sid)))
            .await
            .unwrap();
    assert_eq!(rows.len(), 2, "{rows:?}");
    assert_eq!(rows[0].content, "a question before the restart");
    assert_eq!(rows[1].role, "assistant");
    assert!(rows[1].interrupted, "{:?}", rows[1]);
    assert_eq!(rows[1].content, streamed, "stored what was streamed");
    assert!(!streamed.is_empty());
    let ids: Vec<Option<&str>> = other_rows.iter().map(|m| m.client_id.as_deref()).collect();
    assert_eq!(ids, [Some("o-0"), None, Some("o-1")], "{other_rows:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_ends_ai_requests_in_flight_and_refuses_new_ones_with_shutting_down() {
    let db = TestDatabase::new();
    // Slow tokens: the answers are still being written when the signal comes.
    let mut server = start_server(&db.url, &[("AI_DEMO_TOKEN_DELAY", "400ms")]);
    let base = format!("http://127.0.0.1:{}", server.port);
    let http = reqwest::Client::builder().no_proxy().build().unwrap();

    // A streams its answer.
    let (a_token, a_sid) = guest_with_session(&http, &base).await;
    let mut a = http
        .post(format!("{base}/api/v1/chat/stream"))
        .bearer_auth(&a_token)
        .json(&json!({"session_id": a_sid, "message": "streamed before the restart"}))
        .send()
        .await
        .unwrap();
    assert_eq!(a.status(), 200);
    let mut a_text = read_sse_until(&mut a, |t| t.matches("event: token").count() >= 2).await;

    // B waits for a whole answer; a socket in B's conversation shows it has begun.
    let (b_token, b_sid) = guest_with_session(&http, &base).await;
    let mut b_ws = connect_customer(&server, &b_token).await;
    b_ws.resume(&b_sid, 0).await;
    b_ws.until(|f| f["type"] == "resumed").await;
    let b = tokio::spawn({
        let (http, base, b_token, b_sid) =
            (http.clone(), base.clone(), b_token.clone(), b_sid.clone());
        async move {
            http.post(format!("{base}/api/chat/send"))
                .bearer_auth(&b_token)
                .json(&json!({"session_id": b_sid, "message": "sent before the restart"}))
                .send()
                .await
                .unwrap()
        }
    });
    b_ws.next_of("token").await;

    // C's question is on its way: the connection is open, the body not all sent.
    let (c_token, c_sid) = guest_with_session(&http, &base).await;
    let c_client = reqwest::Client::builder().no_proxy().build().unwrap();
    c_client
        .get(format!("{base}/health"))
        .send()
        .await
        .unwrap()
        .error_for_status()
        .unwrap();
    let (body_tx, mut body_rx) = tokio::sync::mpsc::channel::<String>(4);
    let body = reqwest::Body::wrap_stream(futures_util::stream::poll_fn(move |cx| {
        body_rx
            .poll_recv(cx)
            .map(|chunk| chunk.map(Ok::<_, std::io::Error>))
    }));
    let c = tokio::spawn({
        let (base, c_token) = (base.clone(), c_token.clone());
        async move {
            c_client
                .post(format!("{base}/api/v1/chat/send"))
                .bearer_auth(&c_token)
                .header("content-type", "application/json")
                .body(body)
                .send()
                .await
                .unwrap()
        }
    });
    body_tx
        .send(format!("{{\"session_id\":\"{c_sid}\","))
        .await
        .unwrap();

    // The interrupted answers wait on the database until C has been answered.
    let release = hold_write_lock(&db.url);
    sigterm(&server);
    server.wait_for_log("shutting down: interrupting");
    body_tx
        .send("\"message\":\"asked during the restart\"}".into())
        .await
        .unwrap();
    drop(body_tx);
    let refused = c.await.unwrap();
    assert_eq!(refused.status(), 503);
    let refused: Value = refused.json().await.unwrap();
    assert_eq!(refused["error"], "shutting_down", "{refused}");
    release.send(()).unwrap();

    // The stream ends with its answer, stored as interrupted.
    a_text.push_str(&read_sse_until(&mut a, |_| false).await);
    let events = sse_events(&a_text);
    let (name, done) = events.last().unwrap();
    assert_eq!(name, "done", "{events:?}");
    assert_eq!(done["interrupted"], true, "{done}");
    assert_eq!(done["seq"], 2, "{done}");
    let streamed: String = events
        .iter()
        .filter(|(name, _)| name == "token")
        .map(|(_, d)| d["delta"].as_str().unwrap())
        .collect();

    // The waiting request gets the answer as far as it was written.
    let b = b.await.unwrap();
    assert_eq!(b.status(), 200);
    let b: Value = b.json().await.unwrap();
    assert_eq!(b["answer"]["interrupted"], true, "{b}");
    assert_eq!(b["answer"]["seq"], 2, "{b}");
    assert!(!b["answer"]["content"].as_str().unwrap().is_empty(), "{b}");

    expect_clean_exit(&mut server).await;

    let url = db.url.clone();
    let (a_rows, b_rows, c_rows) = tokio::task::spawn_blocking(move || {
        (
            stored(&url, &a_sid),
            stored(&url, &b_sid),
            stored(&url, &c_sid),
        )
    })
    .await
    .unwrap();
    assert_eq!(a_rows.len(), 2, "{a_rows:?}");
    assert!(a_rows[1].interrupted, "{:?}", a_rows[1]);
    assert_eq!(a_rows[1].content, streamed, "stored what was streamed");
    assert_eq!(b_rows.len(), 2, "{b_rows:?}");
    assert_eq!(b_rows[1].content, b["answer"]["content"].as_str().unwrap());
    assert!(
        c_rows.is_empty(),
        "nothing stored for a refused question: {c_rows:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_closes_dashboards_too_and_the_human_queue_outlives_the_node() {
    let db = TestDatabase::new();
    // A wait for a human far longer than the test: its timer must not hold the drain up.
    let env = [("HUMAN_WAIT", "10m")];
    let mut server = start_server(&db.url, &env);
    let base = format!("http://127.0.0.1:{}", server.port);
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    let (token, sid) = guest_with_session(&http, &base).await;
    let mut cust = connect_customer(&server, &token).await;
    cust.send(&json!({"type": "request_human", "session_id": sid}))
        .await;
    cust.next_of("human_requested").await;

    let agent = agent_token(&db.url, &http, &base).await;
    let mut desk = connect_to(&server, STAFF_PATH, &agent).await;
    let snapshot = desk.next_of("snapshot").await;
    assert_eq!(
        snapshot["queue"][0]["session_id"],
        sid.as_str(),
        "{snapshot}"
    );

    // A message still being stored keeps the drain open while the dashboard asks for a change.
    let release = hold_write_lock(&db.url);
    cust.send_message(&sid, "c-1", "is anybody there?").await;
    cust.ping("c-1 handed on").await;
    sigterm(&server);
    server.wait_for_log("shutting down: interrupting");
    desk.send(&json!({"type": "takeover", "session_id": sid}))
        .await;
    let refused = desk.until(|f| f["type"] == "error").await;
    let refused = refused.last().unwrap();
    assert_eq!(refused["code"], "shutting_down", "{refused}");
    assert_eq!(refused["session_id"], sid.as_str(), "{refused}");
    release.send(()).unwrap();

    // The dashboard is closed with the customer's socket, with the same reason.
    let drained = desk
        .drain(Duration::from_secs(30))
        .await
        .unwrap_or_else(|d| panic!("the dashboard was not closed: {:?}", d.frames));
    assert_eq!(drained.close_code, Some(1012), "{drained:?}");
    let goodbye = drained.frames.last().unwrap();
    assert_eq!(goodbye["code"], "shutdown", "{drained:?}");
    let drained = cust
        .drain(Duration::from_secs(30))
        .await
        .unwrap_or_else(|d| panic!("the customer's socket was not closed: {:?}", d.frames));
    assert!(
        drained
            .frames
            .iter()
            .any(|f| f["type"] == "ack" && f["client_id"] == "c-1"),
        "{drained:?}"
    );
    assert_eq!(drained.close_code, Some(1012), "{drained:?}");
    expect_clean_exit(&mut server).await;

    // The refused takeover changed nothing; the next node still has the customer waiting.
    let server = start_server(&db.url, &env);
    let mut desk = connect_to(&server, STAFF_PATH, &agent).await;
    let snapshot = desk.next_of("snapshot").await;
    let queued = &snapshot["queue"][0];
    assert_eq!(queued["session_id"], sid.as_str(), "{snapshot}");
    assert_eq!(queued["mode"], "ai", "{snapshot}");
    assert!(queued["assigned_agent"].is_null(), "{snapshot}");
}

/// Killed without warning (SIGKILL) while messages are still arriving, the server keeps every
/// message it acknowledged, with the seq the ack gave: an ack leaves only once its commit is in
/// the store's files.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_server_keeps_every_message_it_acknowledged() {
    let db = TestDatabase::new();
    let mut server = start_server(
        &db.url,
        &[
            ("RATE_LIMIT_WS_FRAMES_PER_SECOND", "0"),
            ("RATE_LIMIT_MESSAGES_PER_MINUTE", "0"),
        ],
    );
    let base = format!("http://127.0.0.1:{}", server.port);
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    let content = |sid: &str, i: usize| format!("message {i} in {sid}");
    // Each client reads while it sends, as a real one does.
    let (fifty_acks, mut first_has_fifty) = tokio::sync::watch::channel(false);
    let mut fifty_acks = Some(fifty_acks);
    let mut conversations = Vec::new();
    for _ in 0..4 {
        let (token, sid) = guest_with_session(&http, &base).await;
        let (mut sink, mut stream) = connect_customer(&server, &token).await.split();
        // The first conversation's reader says when it has 50 acks.
        let fifty_acks = fifty_acks.take();
        let reader = tokio::spawn(async move {
            let mut acks = 0;
            drain_stream(&mut stream, Duration::from_secs(20), |frame| {
                acks += usize::from(frame["type"] == "ack");
                if let Some(tell) = fifty_acks.as_ref().filter(|_| acks == 50) {
                    let _ = tell.send(true);
                }
            })
            .await
        });
        let texts: Vec<String> = (0..300)
            .map(|i| send_frame(&sid, &format!("k-{i}"), &content(&sid, i)).to_string())
            .collect();
        // Sending stops at the first error: the server is gone.
        let writer = tokio::spawn(async move {
            for text in texts {
                if sink.send(Message::Text(text)).await.is_err() {
                    return;
                }
            }
        });
        conversations.push((sid, reader, writer));
    }
    // Kill it once the first conversation has 50 acks, with most messages still to store.
    tokio::time::timeout(
        Duration::from_secs(10),
        first_has_fifty.wait_for(|&has| has),
    )
    .await
    .expect("50 acks within 10 s")
    .expect("the first conversation's reader ended early");
    server.child.kill().expect("killing the server");
    server.child.wait().unwrap();

    let mut acked = 0;
    for (sid, reader, writer) in conversations {
        writer.await.unwrap();
        let frames = reader
            .await
            .unwrap()
            .unwrap_or_else(|d| panic!("the socket outlived the server: {:?}", d.frames))
            .frames;
        // Sends past the pending limit are refused; nothing else may be.
        for error in frames.iter().filter(|f| f["type"] == "error") {
            assert_eq!(error["code"], "too_many_pending", "{error}");
        }
        let acks: Vec<&Value> = frames.iter().filter(|f| f["type"] == "ack").collect();
        acked += acks.len();
        let url = db.url.clone();
        let id = sid.clone();
        let rows = tokio::task::spawn_blocking(move || {
            message::page(&mut connect(&url), &id, Order::Asc, None, 1000).unwrap()
        })
        .await
        .unwrap();
        for ack in acks {
            let client_id = ack["client_id"].as_str().unwrap();
            let row = rows
                .iter()
                .find(|m| m.client_id.as_deref() == Some(client_id))
                .unwrap_or_else(|| panic!("acknowledged but not stored: {ack}"));
            assert_eq!(Some(row.seq), ack["seq"].as_i64(), "{ack}");
            let i: usize = client_id["k-".len()..].parse().unwrap();
            assert_eq!(row.content, content(&sid, i));
        }
    }
    assert!(acked >= 50, "only {acked} acks before the kill");
}
