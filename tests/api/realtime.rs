//! The realtime core as a client sees it: frames over the WebSocket, checked against what
//! the REST history and the database hold.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use switchboard::config::HumanDuration;
use switchboard::db::models::message::{self, NewMessage, Rejected};
use switchboard::db::models::Role;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::Message;

use crate::helpers::{expect_json, spawn_app, spawn_app_with, tokens_text, TestApp};
use crate::ws::{
    read_until, refused_status, request, send_frame, try_connect, WsClient, STAFF_PATH,
};

/// A conversation's whole history through the REST API, following `next_cursor`.
async fn history(app: &TestApp, token: &str, session_id: &str) -> Vec<Value> {
    let mut all = Vec::new();
    let mut cursor: Option<i64> = None;
    loop {
        let mut path = format!("/api/v1/chat/sessions/{session_id}/messages?limit=200");
        if let Some(c) = cursor {
            path.push_str(&format!("&cursor={c}"));
        }
        let page = expect_json(app.get(&path, token).await, 200).await;
        all.extend(
            page["messages"]
                .as_array()
                .expect("messages")
                .iter()
                .cloned(),
        );
        match page["next_cursor"].as_i64() {
            Some(c) => cursor = Some(c),
            None => return all,
        }
    }
}

/// The stored message with `seq`, from the REST history.
async fn stored(app: &TestApp, token: &str, session_id: &str, seq: i64) -> Value {
    history(app, token, session_id)
        .await
        .into_iter()
        .find(|m| m["seq"] == seq)
        .unwrap_or_else(|| panic!("no stored message with seq {seq} in {session_id}"))
}

/// A new guest with a new conversation: (token, user id, session id).
async fn customer_with_session(app: &TestApp) -> (String, String, String) {
    let guest = app.guest().await;
    let session = app.create_session(&guest.access_token, "help").await;
    let id = session["id"].as_str().expect("session id").to_string();
    (guest.access_token, guest.user_id, id)
}

fn millis(ms: u64) -> HumanDuration {
    HumanDuration::from_millis(ms)
}

#[tokio::test]
async fn a_message_is_acked_after_commit_and_answered_token_by_token() {
    let app = spawn_app().await;
    let (token, user_id, sid) = customer_with_session(&app).await;

    let mut ws = WsClient::connect_raw(&app, "/api/v1/chat/ws", &token).await;
    let hello = ws.next().await;
    assert_eq!(hello["type"], "hello", "{hello}");
    assert_eq!(hello["protocol"], 1, "{hello}");
    assert_eq!(hello["user_id"], user_id.as_str(), "{hello}");
    assert_eq!(hello["role"], "customer", "{hello}");

    ws.resume(&sid, 0).await;
    let resumed = ws.next_of("resumed").await;
    assert_eq!(resumed["last_seq"], 0, "{resumed}");

    ws.send_message(&sid, "c-1", "How do I reset my password?")
        .await;
    let before_ack = ws.until(|f| f["type"] == "ack").await;
    let ack = before_ack.last().unwrap().clone();
    assert!(
        before_ack.iter().all(|f| f["type"] != "error"),
        "{before_ack:?}"
    );
    assert_eq!(ack["client_id"], "c-1", "{ack}");
    assert_eq!(ack["seq"], 1, "{ack}");
    assert_eq!(ack["session_id"], sid.as_str(), "{ack}");
    assert_eq!(ack["duplicate"], false, "{ack}");

    // The ack comes after the commit: the history already holds the message.
    let first = stored(&app, &token, &sid, 1).await;
    assert_eq!(first["role"], "user", "{first}");
    assert_eq!(first["content"], "How do I reset my password?", "{first}");
    assert_eq!(first["client_id"], "c-1", "{first}");

    let message = ws.next().await;
    assert_eq!(message["type"], "message", "{message}");
    assert_eq!(message["seq"], 1, "{message}");
    assert_eq!(message["role"], "user", "{message}");
    assert_eq!(message["content"], "How do I reset my password?");
    // The time sent live is the time stored, to the microsecond.
    assert_eq!(
        message["created_at"], first["created_at"],
        "{message} {first}"
    );
    assert!(
        message["created_at"]
            .as_str()
            .is_some_and(|t| t.len() == "2026-11-22T10:00:00.123456Z".len()),
        "{message}"
    );

    let frames = ws.until(|f| f["type"] == "reply_done").await;
    let done = frames.last().unwrap();
    assert_eq!(done["seq"], 2, "{done}");
    assert_eq!(done["interrupted"], false, "{done}");
    let streamed = tokens_text(&frames);
    assert!(
        frames.iter().filter(|f| f["type"] == "token").count() > 5,
        "the answer should come in many tokens: {frames:?}"
    );
    assert!(
        frames
            .iter()
            .all(|f| f["type"] == "token" || f["type"] == "reply_done"),
        "unexpected frames while answering: {frames:?}"
    );

    let answer = stored(&app, &token, &sid, 2).await;
    assert_eq!(answer["role"], "assistant", "{answer}");
    assert_eq!(answer["interrupted"], false, "{answer}");
    assert_eq!(answer["content"].as_str().unwrap(), streamed);
    assert!(streamed.starts_with("[Demo consultant]"), "{streamed}");
}

#[tokio::test]
async fn the_token_is_checked_before_the_upgrade() {
    let app = spawn_app().await;
    let customer = app.guest().await;
    let agent = app.user("agent@example.com", Role::Agent).await;

    // No token, a bad token.
    assert_eq!(refused_status(request(&app, "/api/v1/chat/ws")).await, 401);
    let bad = format!(
        "ws://127.0.0.1:{}/api/v1/chat/ws?token=not.a.token",
        app.port
    );
    assert_eq!(refused_status(bad.as_str().into_req()).await, 401);
    assert_eq!(refused_status(request(&app, STAFF_PATH)).await, 401);

    // A customer on the staff endpoint.
    let url = format!(
        "ws://127.0.0.1:{}{STAFF_PATH}?token={}",
        app.port, customer.access_token
    );
    assert_eq!(refused_status(url.as_str().into_req()).await, 403);

    // An agent on the staff endpoint.
    let mut staff = WsClient::staff(&app, &agent.access_token).await;
    staff.ping("a").await;

    // Authorization: Bearer.
    let mut req = request(&app, "/api/v1/chat/ws");
    req.headers_mut().insert(
        "authorization",
        HeaderValue::from_str(&format!("Bearer {}", customer.access_token)).unwrap(),
    );
    let (mut ws, _) = try_connect(req)
        .await
        .expect("connecting with a bearer header");
    let hello = ws.next().await;
    assert_eq!(hello["type"], "hello", "{hello}");
    assert_eq!(hello["user_id"], customer.user_id.as_str(), "{hello}");

    // The sub-protocol pair; the server must pick switchboard.v1, never echo the token.
    let mut req = request(&app, "/api/v1/chat/ws");
    req.headers_mut().insert(
        "sec-websocket-protocol",
        HeaderValue::from_str(&format!("switchboard.v1, bearer.{}", customer.access_token))
            .unwrap(),
    );
    let (mut ws, response) = try_connect(req)
        .await
        .expect("connecting with sub-protocols");
    assert_eq!(
        response
            .headers()
            .get("sec-websocket-protocol")
            .map(|v| v.to_str().unwrap()),
        Some("switchboard.v1")
    );
    let hello = ws.next().await;
    assert_eq!(hello["user_id"], customer.user_id.as_str(), "{hello}");
}

trait IntoReq {
    fn into_req(self) -> tokio_tungstenite::tungstenite::handshake::client::Request;
}

impl IntoReq for &str {
    fn into_req(self) -> tokio_tungstenite::tungstenite::handshake::client::Request {
        use tokio_tungstenite::tungstenite::client::IntoClientRequest;
        self.into_client_request().expect("building the request")
    }
}

/// Sends `frame`, expects an `error` with `code` (returned), then checks the connection
/// still answers a ping.
async fn refused(ws: &mut WsClient, frame: Message, code: &str) -> Value {
    match frame {
        Message::Text(text) => ws.send_text(&text).await,
        Message::Binary(bytes) => ws.send_binary(&bytes).await,
        other => panic!("cannot send {other:?}"),
    }
    let error = ws.next_of("error").await;
    assert_eq!(error["code"], code, "{error}");
    assert!(
        error["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{error}"
    );
    let nonce = format!("after-{code}");
    let frames = ws.ping(&nonce).await;
    assert_eq!(frames.len(), 1, "only the pong was expected: {frames:?}");
    error
}

/// A conversation of the customer with `token`, closed by an admin.
async fn closed_session(app: &TestApp, token: &str) -> String {
    let closed = app.create_session(token, "closed").await["id"]
        .as_str()
        .unwrap()
        .to_string();
    let admin = app.user("admin@example.com", Role::Admin).await;
    let res = app
        .post(
            &format!("/api/v1/admin/chat/sessions/{closed}/close"),
            &admin.access_token,
        )
        .await;
    assert!(res.status().is_success(), "closing: {}", res.status());
    closed
}

fn text(value: Value) -> Message {
    Message::Text(value.to_string())
}

#[tokio::test]
async fn bad_frames_are_refused_and_the_connection_stays_usable() {
    let app = spawn_app().await;
    let (token, _, sid) = customer_with_session(&app).await;
    let (_, _, other_sid) = customer_with_session(&app).await;
    let closed = closed_session(&app, &token).await;

    let mut ws = WsClient::customer(&app, &token).await;
    let max = app.settings.chat.max_message_bytes;
    let send = |client_id: &str, content: &str| {
        text(json!({"type": "send", "session_id": sid, "client_id": client_id, "content": content}))
    };

    refused(&mut ws, Message::Text("{not json".into()), "invalid_json").await;
    refused(&mut ws, text(json!({"type": "dance"})), "unknown_type").await;
    refused(
        &mut ws,
        text(json!({"type": "send", "session_id": sid})),
        "invalid_frame",
    )
    .await;
    refused(
        &mut ws,
        text(json!({"type": "send", "session_id": sid, "client_id": "x", "content": "hi", "admin": true})),
        "invalid_frame",
    )
    .await;
    let e = refused(
        &mut ws,
        send("big", &"a".repeat(max + 1)),
        "message_too_large",
    )
    .await;
    assert_eq!(e["client_id"], "big", "{e}");
    refused(&mut ws, send("blank", " \n\t "), "empty_message").await;
    refused(&mut ws, send("nul", "hello\0world"), "invalid_content").await;
    refused(&mut ws, send("has spaces", "hello"), "invalid_client_id").await;
    refused(&mut ws, send(&"x".repeat(65), "hello"), "invalid_client_id").await;
    refused(
        &mut ws,
        Message::Binary(vec![1, 2, 3]),
        "binary_not_supported",
    )
    .await;

    // Someone else's conversation looks like no conversation at all.
    let e = refused(
        &mut ws,
        text(json!({"type": "send", "session_id": other_sid, "client_id": "o1", "content": "hi"})),
        "not_found",
    )
    .await;
    assert_eq!(e["session_id"], other_sid.as_str(), "{e}");
    refused(
        &mut ws,
        text(json!({"type": "resume", "session_id": other_sid, "after_seq": 0})),
        "not_found",
    )
    .await;

    // A conversation an admin closed takes no more messages.
    let e = refused(
        &mut ws,
        text(json!({"type": "send", "session_id": closed, "client_id": "late-1", "content": "hi"})),
        "session_not_active",
    )
    .await;
    assert_eq!(e["client_id"], "late-1", "{e}");
    assert_eq!(e["session_id"], closed.as_str(), "{e}");

    for id in [&sid, &other_sid, &closed] {
        assert_eq!(app.message_count(id).await, 0, "rows stored in {id}");
    }

    // And the connection still does real work.
    ws.send_message(&sid, "ok-1", "now a real one").await;
    let ack = ws.next_of("ack").await;
    assert_eq!(ack["seq"], 1, "{ack}");
    assert_eq!(app.message_count(&sid).await, 1);
}

#[tokio::test]
async fn a_resent_client_id_is_acked_again_and_stored_once() {
    let app = spawn_app().await;
    let (token, _, sid) = customer_with_session(&app).await;
    let mut ws = WsClient::customer(&app, &token).await;

    // Sent back to back, so both may land in one batch.
    ws.send_message(&sid, "same-1", "first copy").await;
    ws.send_message(&sid, "same-1", "second copy").await;
    let first = ws.next_of("ack").await;
    let second = ws.next_of("ack").await;
    assert_eq!(first["client_id"], "same-1");
    assert_eq!(second["client_id"], "same-1");
    assert_eq!(first["seq"], 1, "{first}");
    assert_eq!(second["seq"], first["seq"], "{second}");
    assert_eq!(first["duplicate"], false, "{first}");
    assert_eq!(second["duplicate"], true, "{second}");

    // And once more later, in a batch of its own.
    ws.until(|f| f["type"] == "reply_done").await;
    ws.send_message(&sid, "same-1", "third copy").await;
    let third = ws.next_of("ack").await;
    assert_eq!(third["seq"], 1, "{third}");
    assert_eq!(third["duplicate"], true, "{third}");

    let rows: Vec<Value> = history(&app, &token, &sid)
        .await
        .into_iter()
        .filter(|m| m["client_id"] == "same-1")
        .collect();
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(rows[0]["content"], "first copy");
    let users = history(&app, &token, &sid)
        .await
        .into_iter()
        .filter(|m| m["role"] == "user")
        .count();
    assert_eq!(users, 1);
}

/// Every case the group commit meets, in one batch handed straight to the store, as the
/// committer hands it (the suite runs this on SQLite and on PostgreSQL).
#[tokio::test]
async fn one_batch_of_every_kind_of_message_is_stored_by_the_delivery_contract() {
    let app = spawn_app().await;
    let (token, _, sid) = customer_with_session(&app).await;
    let (other_token, _, other) = customer_with_session(&app).await;
    let closed = closed_session(&app, &token).await;

    let msg = |session: &str, client_id: Option<&str>, content: &str| NewMessage {
        session_id: session.to_string(),
        role: "user",
        author_id: None,
        content: content.to_string(),
        client_id: client_id.map(str::to_string),
        interrupted: false,
        model: None,
        tokens: None,
    };
    let before = vec![msg(&sid, Some("a"), "first a")];
    let stored = app
        .with_db(move |c| message::append_batch(c, &before))
        .await
        .expect("the first batch");
    assert_eq!(stored[0].as_ref().unwrap().message.seq, 1);

    let batch = vec![
        msg(&sid, Some("b"), "b"),
        msg(&sid, Some("a"), "a again"),
        msg(&other, Some("a"), "a elsewhere"),
        msg(&sid, Some("b"), "b again"),
        msg("no-such-conversation", Some("x"), "nowhere"),
        msg(&closed, Some("c"), "too late"),
        msg(&sid, None, "no client id"),
        msg(&sid, None, "no client id"),
    ];
    let outcomes = app
        .with_db(move |c| message::append_batch(c, &batch))
        .await
        .expect("the batch");
    let summary: Vec<String> = outcomes
        .iter()
        .map(|o| match o {
            Ok(a) => format!(
                "{} {} {} {}",
                if a.message.session_id == sid {
                    "sid"
                } else {
                    "other"
                },
                a.message.seq,
                a.message.content,
                if a.duplicate { "duplicate" } else { "new" }
            ),
            Err(Rejected::SessionNotFound) => "not found".into(),
            Err(Rejected::SessionNotActive(status)) => format!("not active: {status}"),
        })
        .collect();
    assert_eq!(
        summary,
        [
            "sid 2 b new",
            "sid 1 first a duplicate",
            "other 1 a elsewhere new",
            "sid 2 b duplicate",
            "not found",
            "not active: closed",
            "sid 3 no client id new",
            "sid 4 no client id new",
        ]
    );

    // What a reader sees: each stored once, in seq order; nothing in the closed conversation.
    let contents = |rows: Vec<Value>| -> Vec<(i64, String)> {
        rows.iter()
            .map(|m| {
                (
                    m["seq"].as_i64().unwrap(),
                    m["content"].as_str().unwrap().to_string(),
                )
            })
            .collect()
    };
    assert_eq!(
        contents(history(&app, &token, &sid).await),
        [
            (1, "first a".to_string()),
            (2, "b".to_string()),
            (3, "no client id".to_string()),
            (4, "no client id".to_string()),
        ]
    );
    assert_eq!(
        contents(history(&app, &other_token, &other).await),
        [(1, "a elsewhere".to_string())]
    );
    assert_eq!(app.message_count(&closed).await, 0);

    // The conversations' newest seq moved on with the batch: the next message over the
    // socket follows it.
    let mut ws = WsClient::customer(&app, &token).await;
    ws.send_message(&sid, "after", "after the batch").await;
    assert_eq!(ws.next_of("ack").await["seq"], 5);
}

/// The seqs a client saw stored messages under: `message` and `reply_done` frames.
fn seqs(frames: &[Value]) -> Vec<i64> {
    frames
        .iter()
        .filter(|f| f["type"] == "message" || f["type"] == "reply_done")
        .map(|f| f["seq"].as_i64().expect("seq"))
        .collect()
}

#[tokio::test]
async fn a_reconnecting_client_resumes_an_answer_in_progress() {
    let app = spawn_app_with(|s| s.ai.demo_token_delay = millis(40)).await;
    let (token, _, sid) = customer_with_session(&app).await;

    let mut first = WsClient::customer(&app, &token).await;
    first.resume(&sid, 0).await;
    first.next_of("resumed").await;
    first
        .send_message(&sid, "r-1", "Tell me about your refund policy")
        .await;
    let mut seen_first = Vec::new();
    let mut tokens = 0;
    while tokens < 3 {
        let f = first.next().await;
        if f["type"] == "token" {
            tokens += 1;
        }
        assert_ne!(f["type"], "reply_done", "the answer ended too soon: {f}");
        seen_first.push(f);
    }
    let last_seq = *seqs(&seen_first).last().expect("the message frame");
    assert_eq!(last_seq, 1);
    drop(first);

    let mut second = WsClient::customer(&app, &token).await;
    second.resume(&sid, last_seq).await;
    let frames = second.until(|f| f["type"] == "reply_done").await;
    let resumed_at = frames
        .iter()
        .position(|f| f["type"] == "resumed")
        .unwrap_or_else(|| panic!("no resumed: {frames:?}"));
    assert_eq!(frames[resumed_at]["last_seq"], 1, "{frames:?}");
    let after: Vec<&Value> = frames[resumed_at + 1..]
        .iter()
        .filter(|f| f["type"] != "presence")
        .collect();
    assert_eq!(after[0]["type"], "token", "{frames:?}");
    // The first token carries everything written so far: more than the 3 we saw.
    let catch_up = after[0]["delta"].as_str().unwrap();
    assert!(
        catch_up.starts_with(&tokens_text(&seen_first)),
        "{catch_up:?} vs {seen_first:?}"
    );
    let done = frames.last().unwrap();
    assert_eq!(done["interrupted"], false, "{done}");

    let answer = stored(&app, &token, &sid, 2).await;
    assert_eq!(answer["content"].as_str().unwrap(), tokens_text(&frames));

    let mut all = seqs(&seen_first);
    all.extend(seqs(&frames));
    assert_eq!(all, vec![1, 2], "each seq once, in order");
}

#[tokio::test]
async fn messages_posted_while_away_are_replayed_in_order_then_live() {
    let app = spawn_app_with(|s| s.ai.demo_token_delay = millis(0)).await;
    let (token, _, sid) = customer_with_session(&app).await;

    let mut ws = WsClient::customer(&app, &token).await;
    ws.resume(&sid, 0).await;
    ws.send_message(&sid, "w-1", "hello").await;
    let seen = ws.until(|f| f["type"] == "reply_done").await;
    assert_eq!(seqs(&seen), vec![1, 2]);
    drop(ws);

    for i in 0..5 {
        let res = app
            .post_message(&token, &sid, &format!("while away {i}"), None)
            .await;
        expect_json(res, 201).await;
    }
    // Let every answer to them finish, so the count is final.
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut stable = 0;
    let mut last = 0;
    while stable < 5 {
        assert!(Instant::now() < deadline, "the history never settled");
        tokio::time::sleep(Duration::from_millis(100)).await;
        let n = app.message_count(&sid).await;
        stable = if n == last { stable + 1 } else { 0 };
        last = n;
    }
    assert!(last >= 8, "5 posts and at least one answer: {last}");

    let mut ws = WsClient::customer(&app, &token).await;
    ws.resume(&sid, 2).await;
    let replay = ws.until(|f| f["type"] == "resumed").await;
    let replayed: Vec<i64> = seqs(&replay);
    assert_eq!(replayed, (3..=last).collect::<Vec<_>>(), "{replay:?}");
    assert_eq!(replay.last().unwrap()["last_seq"], last);
    let stored_all = history(&app, &token, &sid).await;
    for f in replay.iter().filter(|f| f["type"] == "message") {
        let m = &stored_all[(f["seq"].as_i64().unwrap() - 1) as usize];
        assert_eq!(f["content"], m["content"]);
        assert_eq!(f["role"], m["role"]);
    }

    // Live from here on: a new post and its answer, with no seq seen twice.
    let res = app
        .post_message(&token, &sid, "back again", Some("live-1"))
        .await;
    let posted = expect_json(res, 201).await;
    assert_eq!(posted["seq"], last + 1, "{posted}");
    let live = ws.until(|f| f["type"] == "reply_done").await;
    assert_eq!(seqs(&live), vec![last + 1, last + 2], "{live:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_customers_at_once_get_every_message_acked_and_stored_in_order() {
    const CLIENTS: usize = 200;
    const PER_CLIENT: usize = 20;
    let app = spawn_app_with(|s| s.ai.demo_token_delay = millis(0)).await;

    let mut customers = Vec::new();
    for _ in 0..CLIENTS {
        customers.push(customer_with_session(&app).await);
    }

    let port = app.port;
    let work = customers.iter().enumerate().map(|(n, (token, _, sid))| {
        let (token, sid) = (token.clone(), sid.clone());
        async move {
            let url = format!("ws://127.0.0.1:{port}/api/v1/chat/ws?token={token}");
            let (socket, _) = tokio_tungstenite::connect_async(url)
                .await
                .unwrap_or_else(|e| panic!("client {n} connecting: {e}"));
            let (mut sink, mut stream) = socket.split();
            for i in 0..PER_CLIENT {
                let frame = send_frame(
                    &sid,
                    &format!("c{n}-m{i}"),
                    &format!("message {i} from {n}"),
                );
                sink.feed(Message::Text(frame.to_string())).await.unwrap();
            }
            sink.flush().await.unwrap();
            let mut acks: HashMap<String, i64> = HashMap::new();
            let mut ack_count = 0;
            read_until(&mut stream, Duration::from_secs(60), |f| {
                assert_ne!(f["type"], "error", "client {n}: {f}");
                if f["type"] == "ack" {
                    ack_count += 1;
                    let previous = acks.insert(
                        f["client_id"].as_str().unwrap().to_string(),
                        f["seq"].as_i64().unwrap(),
                    );
                    assert!(previous.is_none(), "client {n}: acked twice: {f}");
                }
                ack_count == PER_CLIENT
            })
            .await;
            let expected: HashSet<String> = (0..PER_CLIENT).map(|i| format!("c{n}-m{i}")).collect();
            assert_eq!(acks.keys().cloned().collect::<HashSet<_>>(), expected);
            (sid, acks)
        }
    });
    let results = tokio::time::timeout(
        Duration::from_secs(120),
        futures_util::future::join_all(work),
    )
    .await
    .expect("200 clients did not finish within 120 s");

    let mut user_rows = 0;
    for ((token, _, _), (sid, acks)) in customers.iter().zip(results) {
        let messages = history(&app, token, &sid).await;
        let got: Vec<i64> = messages
            .iter()
            .map(|m| m["seq"].as_i64().unwrap())
            .collect();
        assert_eq!(
            got,
            (1..=messages.len() as i64).collect::<Vec<_>>(),
            "gaps in {sid}"
        );
        let mut sent_order = Vec::new();
        for m in messages.iter().filter(|m| m["role"] == "user") {
            user_rows += 1;
            let client_id = m["client_id"].as_str().unwrap();
            assert_eq!(acks.get(client_id), m["seq"].as_i64().as_ref(), "{m}");
            sent_order.push(
                client_id
                    .split_once("-m")
                    .unwrap()
                    .1
                    .parse::<usize>()
                    .unwrap(),
            );
        }
        // On PostgreSQL a burst this size has more than one writer storing at once.
        assert_eq!(
            sent_order,
            (0..PER_CLIENT).collect::<Vec<_>>(),
            "{sid}: stored in another order than sent"
        );
    }
    assert_eq!(user_rows, CLIENTS * PER_CLIENT);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_does_not_read_is_dropped_without_slowing_others() {
    const SENT: usize = 1500;
    let app = spawn_app_with(|s| {
        s.realtime.outbound_queue = 8;
        // One user writing 1500 messages as fast as they are acked is a flood by default.
        s.rate_limit.messages_per_minute = 0;
        s.rate_limit.ws_frames_per_second = 0;
    })
    .await;
    let (token_a, _, sid_a) = customer_with_session(&app).await;
    let (token_b, _, sid_b) = customer_with_session(&app).await;

    let mut stalled = WsClient::customer(&app, &token_a).await;
    stalled.resume(&sid_a, 0).await;
    let mut b = WsClient::customer(&app, &token_b).await;
    b.resume(&sid_b, 0).await;
    b.next_of("resumed").await;
    // The writer waits for each ack before the next send: with a queue of 8 a pipelined
    // burst would (rightly) make the writer itself a slow consumer, since one group commit
    // answers many sends at once.
    let mut writer = WsClient::customer(&app, &token_a).await;
    let filler = "x".repeat(8000);
    let sid = sid_a.clone();
    let writing = tokio::spawn(async move {
        for i in 0..SENT {
            let client_id = format!("big-{i}");
            writer.send_message(&sid, &client_id, &filler).await;
            let frames = writer
                .until(|f| {
                    f["type"] == "error"
                        || (f["type"] == "ack" && f["client_id"] == client_id.as_str())
                })
                .await;
            let last = frames.last().unwrap();
            assert_eq!(last["type"], "ack", "writer, message {i}: {last}");
        }
        writer
    });
    let reader = &writing;
    let mut worst = Duration::ZERO;
    let mut rounds = 0;
    while !reader.is_finished() {
        let started = Instant::now();
        b.ping(&format!("b-{rounds}")).await;
        worst = worst.max(started.elapsed());
        rounds += 1;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let _writer = writing.await.unwrap();
    assert!(rounds >= 3, "only {rounds} ping rounds ran");
    assert!(worst < Duration::from_secs(1), "worst ping took {worst:?}");

    let drained = stalled
        .drain(Duration::from_secs(30))
        .await
        .unwrap_or_else(|d| {
            panic!(
                "the stalled socket was still open after draining {} frames",
                d.frames.len()
            )
        });
    let messages = drained.count("message");
    eprintln!(
        "slow consumer: {messages} of {SENT} messages reached the stalled socket; \
         ping rounds {rounds}, worst {worst:?}"
    );
    assert!(
        messages < SENT / 2,
        "the stalled socket got {messages} of {SENT} messages: buffered without limit?"
    );
    for e in drained.frames.iter().filter(|f| f["type"] == "error") {
        assert_eq!(e["code"], "slow_consumer", "{e}");
    }
}

/// A client that sends faster than it reads what comes back is slowed down, not dropped:
/// the server stops reading it while its outbound queue is low on room. Here the `pong`s of
/// 10,000 `ping`s of 1 KB (10 MB) would outgrow the queue and the sockets' buffers while the
/// client is not reading.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_sends_faster_than_it_reads_is_slowed_not_dropped() {
    const PINGS: usize = 10_000;
    let app = spawn_app_with(|s| s.rate_limit.ws_frames_per_second = 0).await;
    let (token, _, _) = customer_with_session(&app).await;
    let (mut sink, mut stream) = WsClient::customer(&app, &token).await.split();
    let nonce = |i: usize| format!("p-{i}-{}", "x".repeat(1000));
    let sending = tokio::spawn(async move {
        for i in 0..PINGS {
            let ping = json!({"type": "ping", "nonce": nonce(i)}).to_string();
            sink.feed(Message::Text(ping)).await.unwrap();
        }
        sink.flush().await.unwrap();
        sink
    });
    // Not reading for a second, while the pings go out.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut next = 0;
    let frames = read_until(&mut stream, Duration::from_secs(10), |f| {
        assert_eq!(f["type"], "pong", "frame {next}: {f}");
        assert_eq!(f["nonce"], nonce(next), "frame {next}: {f}");
        next += 1;
        next == PINGS
    })
    .await;
    assert_eq!(frames.len(), PINGS);
    let _sink = sending.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_provider_costs_only_its_own_answer() {
    let app = spawn_app_with(|s| {
        s.ai.demo_panic_trigger = "PANIC-NOW".into();
        s.ai.workers = 1;
        s.ai.demo_token_delay = millis(20);
    })
    .await;
    let (token_a, _, sid_a) = customer_with_session(&app).await;
    let (token_b, _, sid_b) = customer_with_session(&app).await;
    let mut a = WsClient::customer(&app, &token_a).await;
    let mut b = WsClient::customer(&app, &token_b).await;

    a.send_message(&sid_a, "a-1", "a normal question").await;
    let mut a_frames = a.until(|f| f["type"] == "token").await;

    b.send_message(&sid_b, "b-1", "please PANIC-NOW").await;
    let b_frames = b
        .until(|f| f["type"] == "error" || f["type"] == "reply_done")
        .await;
    let e = b_frames.last().unwrap();
    assert_eq!(e["type"], "error", "{b_frames:?}");
    assert_eq!(e["code"], "ai_failed", "{e}");
    assert_eq!(e["session_id"], sid_b.as_str(), "{e}");

    a_frames.extend(a.until(|f| f["type"] == "reply_done").await);
    assert!(
        a_frames.iter().all(|f| f["type"] != "error"),
        "{a_frames:?}"
    );
    let done = a_frames.last().unwrap();
    assert_eq!(done["interrupted"], false, "{done}");
    let stored_a = stored(&app, &token_a, &sid_a, done["seq"].as_i64().unwrap()).await;
    assert_eq!(
        stored_a["content"].as_str().unwrap(),
        tokens_text(&a_frames)
    );
    assert!(tokens_text(&a_frames).ends_with("at any time."));

    b.send_message(&sid_b, "b-2", "a calm question").await;
    let frames = b
        .until(|f| f["type"] == "reply_done" || f["type"] == "error")
        .await;
    let done = frames.last().unwrap();
    assert_eq!(done["type"], "reply_done", "{frames:?}");
    assert_eq!(done["interrupted"], false, "{done}");
    let stored_b = stored(&app, &token_b, &sid_b, done["seq"].as_i64().unwrap()).await;
    assert_eq!(stored_b["content"].as_str().unwrap(), tokens_text(&frames));
    assert!(tokens_text(&frames).contains("a calm question"));
}

#[tokio::test]
async fn stop_cuts_the_answer_and_stores_what_was_streamed() {
    let app = spawn_app_with(|s| s.ai.demo_token_delay = millis(40)).await;
    let (token, _, sid) = customer_with_session(&app).await;
    let mut ws = WsClient::customer(&app, &token).await;
    ws.send_message(&sid, "s-1", "tell me a long story").await;
    let mut frames = Vec::new();
    while frames
        .iter()
        .filter(|f: &&Value| f["type"] == "token")
        .count()
        < 3
    {
        frames.push(ws.next().await);
    }
    ws.send(&json!({"type": "stop", "session_id": sid})).await;
    frames.extend(ws.until(|f| f["type"] == "reply_done").await);
    let done = frames.last().unwrap();
    assert_eq!(done["interrupted"], true, "{done}");
    assert_eq!(done["seq"], 2, "{done}");

    let answer = stored(&app, &token, &sid, 2).await;
    assert_eq!(answer["interrupted"], true, "{answer}");
    let streamed = tokens_text(&frames);
    assert_eq!(answer["content"].as_str().unwrap(), streamed);
    assert!(
        !streamed.ends_with("at any time."),
        "the whole answer was written: {streamed}"
    );
}

#[tokio::test]
async fn silent_clients_are_dropped_and_listening_ones_kept() {
    let app = spawn_app_with(|s| {
        s.realtime.heartbeat_interval = millis(200);
        s.realtime.client_timeout = millis(1000);
    })
    .await;
    let token = app.guest().await.access_token;

    let mut silent = WsClient::connect_raw(&app, "/api/v1/chat/ws", &token).await;
    let mut listening = WsClient::customer(&app, &token).await;

    // The listening client reads (so its library answers the pings) for 2.5 s.
    let started = Instant::now();
    while started.elapsed() < Duration::from_millis(2500) {
        if let Ok(f) = listening.next_within(Duration::from_millis(100)).await {
            panic!("unexpected frame: {f}");
        }
    }
    let frames = listening.ping("still-here").await;
    assert_eq!(frames.len(), 1, "{frames:?}");

    // The silent one has read nothing and answered no ping: it must be gone by now.
    let drained = silent
        .drain(Duration::from_secs(3))
        .await
        .unwrap_or_else(|d| panic!("the silent client is still connected: {:?}", d.frames));
    for e in drained.frames.iter().filter(|f| f["type"] == "error") {
        assert_eq!(e["code"], "timeout", "{e}");
    }
}

fn members(presence: &Value) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = presence["members"]
        .as_array()
        .expect("members")
        .iter()
        .map(|m| {
            (
                m["user_id"].as_str().unwrap().to_string(),
                m["role"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    out.sort();
    out
}

#[tokio::test]
async fn presence_and_typing_reach_the_other_members() {
    let app = spawn_app().await;
    let (token, customer_id, sid) = customer_with_session(&app).await;
    let agent = app.user("agent@example.com", Role::Agent).await;

    let mut customer = WsClient::customer(&app, &token).await;
    customer.resume(&sid, 0).await;
    let p = customer.next_of("presence").await;
    let only_customer = vec![(customer_id.clone(), "customer".to_string())];
    assert_eq!(members(&p), only_customer);

    let mut staff = WsClient::staff(&app, &agent.access_token).await;
    staff.resume(&sid, 0).await;
    staff.next_of("resumed").await;
    let p = customer.next_of("presence").await;
    let mut both = vec![
        (customer_id.clone(), "customer".to_string()),
        (agent.user_id.clone(), "agent".to_string()),
    ];
    both.sort();
    assert_eq!(members(&p), both, "{p}");

    customer
        .send(&json!({"type": "typing", "session_id": sid}))
        .await;
    let t = staff.next_of("typing").await;
    assert_eq!(t["user_id"], customer_id.as_str(), "{t}");
    assert_eq!(t["role"], "customer", "{t}");
    assert_eq!(t["active"], true, "{t}");
    assert_eq!(t["session_id"], sid.as_str(), "{t}");

    staff
        .send(&json!({"type": "typing", "session_id": sid}))
        .await;
    let t = customer.next_of("typing").await;
    assert_eq!(t["user_id"], agent.user_id.as_str(), "{t}");
    assert_eq!(t["role"], "agent", "{t}");
    // The typist does not hear itself.
    let echo = staff.ping("after-typing").await;
    assert!(echo.iter().all(|f| f["type"] != "typing"), "{echo:?}");

    // Leaving, then disconnecting, each update the customer's view.
    staff
        .send(&json!({"type": "leave", "session_id": sid}))
        .await;
    let p = customer.next_of("presence").await;
    assert_eq!(members(&p), only_customer, "{p}");

    staff.resume(&sid, 0).await;
    let p = customer.next_of("presence").await;
    assert_eq!(members(&p), both, "{p}");
    staff.close().await;
    let p = customer.next_of("presence").await;
    assert_eq!(members(&p), only_customer, "{p}");
}

#[tokio::test]
async fn a_second_connection_of_someone_present_is_not_announced() {
    let app = spawn_app().await;
    let (token, customer_id, sid) = customer_with_session(&app).await;
    let agent = app.user("agent@example.com", Role::Agent).await;
    let mut customer = WsClient::customer(&app, &token).await;
    customer.resume(&sid, 0).await;
    customer.next_of("presence").await;
    let mut first = WsClient::staff(&app, &agent.access_token).await;
    first.resume(&sid, 0).await;
    let mut both = vec![
        (customer_id.clone(), "customer".to_string()),
        (agent.user_id.clone(), "agent".to_string()),
    ];
    both.sort();
    assert_eq!(members(&customer.next_of("presence").await), both);

    // A second tab of the agent gets the list itself; the customer hears nothing.
    let mut second = WsClient::staff(&app, &agent.access_token).await;
    second.resume(&sid, 0).await;
    let p = second.next_of("presence").await;
    assert_eq!(members(&p), both, "{p}");
    let seen = customer.ping("after-the-second-tab").await;
    assert!(seen.iter().all(|f| f["type"] != "presence"), "{seen:?}");

    // Closing one tab leaves the agent present; closing the last one is announced. Had the
    // first close been announced, the next presence would still list the agent.
    second.close().await;
    first.close().await;
    let p = customer.next_of("presence").await;
    assert_eq!(
        members(&p),
        vec![(customer_id, "customer".to_string())],
        "{p}"
    );
}

/// A socket that left a conversation (`leave`, or `unwatch` on the desk) and sends there again
/// is a member again: it gets its own message back and what others say after it, and nothing
/// said while it was away.
#[tokio::test]
async fn a_socket_that_left_is_a_member_again_once_it_sends_there() {
    let app = spawn_app().await;
    let (_, _, sid) = customer_with_session(&app).await;
    // Agents write, so that no AI answer is started.
    let agent = app.user("agent@example.com", Role::Agent).await;
    let mut other = WsClient::customer(&app, &agent.access_token).await;
    other.resume(&sid, 0).await;
    other.next_of("resumed").await;
    let heard = |frames: &[Value], content: &str| {
        frames
            .iter()
            .any(|f| f["type"] == "message" && f["content"] == content)
    };

    for leaving in ["leave", "unwatch"] {
        let mut ws = WsClient::customer(&app, &agent.access_token).await;
        let first = format!("{leaving}: before");
        ws.send_message(&sid, &format!("{leaving}-1"), &first).await;
        ws.until(|f| f["type"] == "message" && f["content"] == first.as_str())
            .await;

        ws.send(&json!({"type": leaving, "session_id": sid})).await;
        if leaving == "unwatch" {
            ws.next_of("unwatched").await;
        }
        let away = format!("{leaving}: while away");
        other
            .send_message(&sid, &format!("{leaving}-away"), &away)
            .await;
        other
            .until(|f| f["type"] == "message" && f["content"] == away.as_str())
            .await;
        let seen = ws.ping(&format!("{leaving}-after-away")).await;
        assert!(
            !heard(&seen, &away),
            "{leaving}: heard after leaving: {seen:?}"
        );

        let again = format!("{leaving}: again");
        ws.send_message(&sid, &format!("{leaving}-2"), &again).await;
        let echo = ws
            .until(|f| f["type"] == "message" && f["content"] == again.as_str())
            .await;
        assert!(
            !heard(&echo, &away),
            "{leaving}: what was said while away came live: {echo:?}"
        );
        let after = format!("{leaving}: after");
        other
            .send_message(&sid, &format!("{leaving}-after"), &after)
            .await;
        ws.until(|f| f["type"] == "message" && f["content"] == after.as_str())
            .await;
        ws.close().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resuming_while_an_answer_is_being_stored_repeats_no_seq() {
    // Resume lands at every point of an answer's life (streaming, being stored, stored) in
    // turn; whatever the timing, the client must see each stored seq once.
    let app = spawn_app_with(|s| s.ai.demo_token_delay = millis(1)).await;
    let (token, _, sid) = customer_with_session(&app).await;
    let mut ws = WsClient::customer(&app, &token).await;
    let mut all: Vec<i64> = Vec::new();
    for round in 0..40u64 {
        let res = app
            .post_message(&token, &sid, &format!("question {round}"), None)
            .await;
        let posted = expect_json(res, 201).await;
        let user_seq = posted["seq"].as_i64().unwrap();
        tokio::time::sleep(Duration::from_millis(round % 20 * 4)).await;
        ws.resume(&sid, user_seq).await;
        let mut frames = ws.until(|f| f["type"] == "resumed").await;
        // A fence: everything queued with the replay is in before the pong.
        frames.extend(ws.ping(&format!("fence-{round}")).await);
        if !seqs(&frames).contains(&(user_seq + 1)) {
            frames.extend(ws.until(|f| f["type"] == "reply_done").await);
        }
        all.extend(seqs(&frames));
        let expected: Vec<i64> = (all[0]..all[0] + all.len() as i64).collect();
        assert_eq!(all, expected, "round {round}: {frames:?}");
        assert_eq!(
            *all.last().unwrap(),
            user_seq + 1,
            "round {round}: {frames:?}"
        );
    }
}

/// Holds the write lock on the conversation table from outside the server until the returned
/// sender is dropped or sent to: stores wait, reads go on.
pub(crate) fn hold_write_lock(db_url: &str) -> std::sync::mpsc::Sender<()> {
    use diesel::connection::SimpleConnection;
    let mut conn = crate::helpers::connect(db_url);
    let (release, released) = std::sync::mpsc::channel::<()>();
    let (locked, is_locked) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let lock = match crate::helpers::backend_name() {
            // Blocks the UPDATE every store starts with; SELECT still runs.
            "postgres" => "BEGIN; LOCK TABLE chat_sessions IN EXCLUSIVE MODE;",
            // WAL mode: one writer at a time, readers go on.
            _ => "BEGIN IMMEDIATE;",
        };
        conn.batch_execute(lock).expect("taking the write lock");
        locked.send(()).unwrap();
        let _ = released.recv_timeout(Duration::from_secs(30));
        conn.batch_execute("COMMIT;")
            .expect("releasing the write lock");
    });
    is_locked
        .recv_timeout(Duration::from_secs(10))
        .expect("the write lock was not taken");
    release
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resuming_while_the_answer_is_committing_delivers_it_once() {
    // One database thread: the replay's read queues behind the held-up store of the answer,
    // so the replay reads the answer as a stored message while the live `token` catch-up and
    // `reply_done` for the same answer wait in the resume's hold queue.
    let app = spawn_app_with(|s| {
        s.ai.demo_token_delay = millis(2);
        s.database.max_open_conns = 1;
        s.database.max_idle_conns = 1;
        s.database.busy_timeout = HumanDuration::from_secs(20);
    })
    .await;
    let (token, _, sid) = customer_with_session(&app).await;
    let mut ws = WsClient::customer(&app, &token).await;
    ws.send_message(&sid, "c-1", "what are your opening hours?")
        .await;
    let ack = ws.next_of("ack").await;
    assert_eq!(ack["seq"], 1, "{ack}");

    let release = hold_write_lock(&app.db_url);
    let mut so_far = String::new();
    let streamed = ws
        .until(|f| {
            so_far.push_str(f["delta"].as_str().unwrap_or(""));
            so_far.ends_with("at any time.")
        })
        .await;
    let answer = tokens_text(&streamed);
    // The provider ends its stream a moment after the last token; the answer then waits on
    // the lock to be stored. Resume only once it is waiting (a resume that lands earlier
    // makes this test pass without proving anything, never fail).
    tokio::time::sleep(Duration::from_millis(300)).await;
    ws.resume(&sid, 1).await;
    // Let the finished answer's store and the replay's read queue up behind the lock.
    tokio::time::sleep(Duration::from_millis(500)).await;
    release.send(()).unwrap();

    let mut frames = ws.until(|f| f["type"] == "resumed").await;
    frames.extend(ws.ping("fence").await);
    if !seqs(&frames).contains(&2) {
        frames.extend(ws.until(|f| f["type"] == "reply_done").await);
    }
    assert_eq!(seqs(&frames), vec![2], "the answer once: {frames:?}");
    if let Some(at) = frames.iter().position(|f| f["type"] == "message") {
        assert_eq!(frames[at]["content"].as_str().unwrap(), answer);
        let repeated: Vec<&Value> = frames[at..]
            .iter()
            .filter(|f| f["type"] == "token")
            .collect();
        assert!(
            repeated.is_empty(),
            "tokens after the stored answer: {frames:?}"
        );
    } else {
        assert_eq!(tokens_text(&frames), answer, "{frames:?}");
    }
    assert_eq!(
        stored(&app, &token, &sid, 2).await["content"],
        answer.as_str()
    );
}

#[tokio::test]
async fn a_resume_past_the_end_or_twice_still_gets_every_event_once() {
    let app = spawn_app_with(|s| s.ai.demo_token_delay = millis(0)).await;
    let (token, _, sid) = customer_with_session(&app).await;
    let mut ws = WsClient::customer(&app, &token).await;
    ws.send_message(&sid, "p-1", "hello").await;
    let frames = ws.until(|f| f["type"] == "reply_done").await;
    assert_eq!(seqs(&frames), vec![1, 2]);
    drop(ws);

    // A client that claims more than exists is told where the history ends, and what is
    // stored from there on reaches it.
    let mut ws = WsClient::customer(&app, &token).await;
    ws.resume(&sid, 50).await;
    let resumed = ws.next_of("resumed").await;
    assert_eq!(resumed["last_seq"], 2, "{resumed}");
    let res = app.post_message(&token, &sid, "still there?", None).await;
    expect_json(res, 201).await;
    let live = ws.until(|f| f["type"] == "reply_done").await;
    assert_eq!(seqs(&live), vec![3, 4], "{live:?}");

    // Many resumes back to back, then a live message: whichever way the replays interleave,
    // the last one runs from its own `after_seq` to the live events without a gap or a
    // repeat.
    for _ in 0..30 {
        ws.feed(&json!({"type": "resume", "session_id": sid, "after_seq": 0}))
            .await;
    }
    ws.feed(&json!({"type": "resume", "session_id": sid, "after_seq": 2}))
        .await;
    ws.flush().await;
    let res = app.post_message(&token, &sid, "and now?", None).await;
    expect_json(res, 201).await;
    // The last replay starts at seq 3. It ends with `resumed`, and the answer (seq 6) comes
    // either live after it or, when stored before the replay read the history, inside it.
    let (mut replayed, mut answered) = (false, false);
    let frames = ws
        .until(|f| {
            if f["type"] == "message" && f["seq"] == 3 {
                (replayed, answered) = (false, false);
            }
            replayed |= f["type"] == "resumed";
            answered |= (f["type"] == "message" || f["type"] == "reply_done") && f["seq"] == 6;
            replayed && answered
        })
        .await;
    let all = seqs(&frames);
    let from = all
        .iter()
        .rposition(|s| *s == 3)
        .unwrap_or_else(|| panic!("the second replay is missing: {frames:?}"));
    assert_eq!(all[from..], [3, 4, 5, 6], "{frames:?}");
    let resumed: Vec<&Value> = frames.iter().filter(|f| f["type"] == "resumed").collect();
    assert!((1..=31).contains(&resumed.len()), "{frames:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sends_past_the_pending_ack_limit_are_refused_until_acks_come_back() {
    let app = spawn_app_with(|s| {
        s.realtime.max_pending_acks = 2;
        s.database.busy_timeout = HumanDuration::from_secs(20);
    })
    .await;
    let (token, _, sid) = customer_with_session(&app).await;
    let mut ws = WsClient::customer(&app, &token).await;
    // The access check is done once, before the store is held up.
    ws.send_message(&sid, "first", "hello").await;
    ws.next_of("ack").await;
    ws.until(|f| f["type"] == "reply_done").await;

    let release = hold_write_lock(&app.db_url);
    for i in 0..3 {
        ws.feed(&send_frame(&sid, &format!("p-{i}"), "more")).await;
    }
    ws.flush().await;
    let refused = ws.next_of("error").await;
    assert_eq!(refused["code"], "too_many_pending", "{refused}");
    assert_eq!(refused["client_id"], "p-2", "{refused}");
    release.send(()).unwrap();
    let mut acked = Vec::new();
    while acked.len() < 2 {
        let f = ws.next().await;
        assert_ne!(f["type"], "error", "{f}");
        if f["type"] == "ack" {
            acked.push(f["client_id"].as_str().unwrap().to_string());
        }
    }
    assert_eq!(acked, ["p-0", "p-1"]);
    // With the acks back, sending works again.
    ws.send_message(&sid, "p-2", "more").await;
    let ack = ws.next_of("ack").await;
    assert_eq!(ack["client_id"], "p-2", "{ack}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_that_fails_is_reported_to_the_sender_and_nothing_is_acked() {
    let app = spawn_app_with(|s| {
        // The held lock makes the store fail fast instead of waiting for it.
        s.database.busy_timeout = HumanDuration::from_millis(200);
        let url = s.database.url.expose().to_string();
        if url.starts_with("postgres") {
            let sep = if url.contains('?') { '&' } else { '?' };
            s.database.url = switchboard::config::Secret::new(format!(
                "{url}{sep}options=-c%20lock_timeout%3D200"
            ));
        }
    })
    .await;
    let (token, _, sid) = customer_with_session(&app).await;
    let mut ws = WsClient::customer(&app, &token).await;
    ws.send_message(&sid, "warm-up", "hello").await;
    ws.next_of("ack").await;
    ws.until(|f| f["type"] == "reply_done").await;

    let release = hold_write_lock(&app.db_url);
    ws.send_message(&sid, "lost-1", "this one cannot be stored")
        .await;
    let frames = ws
        .until(|f| f["type"] == "error" || f["type"] == "ack")
        .await;
    release.send(()).unwrap();
    let e = frames.last().unwrap();
    assert_eq!(e["type"], "error", "{frames:?}");
    assert_eq!(e["code"], "store_failed", "{e}");
    assert_eq!(e["client_id"], "lost-1", "{e}");
    assert!(frames.iter().all(|f| f["type"] != "message"), "{frames:?}");
    assert_eq!(
        app.message_count(&sid).await,
        2,
        "only the warm-up and its answer"
    );

    // Once the database is back, the same message goes through with the next seq.
    ws.send_message(&sid, "lost-1", "this one cannot be stored")
        .await;
    let ack = ws.next_of("ack").await;
    assert_eq!(ack["seq"], 3, "{ack}");
    assert_eq!(ack["duplicate"], false, "{ack}");
}

/// The committer keeps its connection between batches; when PostgreSQL drops it, the next
/// batch fails (the sender is told, nothing is acked) and the one after runs on a new one.
#[tokio::test]
async fn the_store_recovers_when_postgresql_drops_its_connections() {
    let app = spawn_app().await;
    let Some(name) = app.pg_database.clone() else {
        eprintln!("SQLite: no server to drop the connections; skipped");
        return;
    };
    let (_, _, sid) = customer_with_session(&app).await;
    // An agent writes: no AI answer is started to store alongside.
    let agent = app.user("agent@example.com", Role::Agent).await;
    let mut ws = WsClient::staff(&app, &agent.access_token).await;
    ws.resume(&sid, 0).await;
    ws.next_of("resumed").await;
    ws.send_message(&sid, "before", "stored on the first connection")
        .await;
    assert_eq!(ws.next_of("ack").await["seq"], 1);

    let server = crate::helpers::postgres_url().expect("a PostgreSQL test run");
    let mut admin = crate::helpers::connect(&server);
    use diesel::RunQueryDsl;
    let killed = diesel::sql_query(format!(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
         WHERE datname = '{name}' AND pid <> pg_backend_pid()"
    ))
    .execute(&mut admin)
    .expect("terminating the server's connections");
    assert!(killed > 0, "the server had no connection to drop");

    // Resent with the same client id until acked, as a client does after `store_failed`.
    let mut refusals = 0;
    let ack = loop {
        ws.send_message(&sid, "after", "stored on a new connection")
            .await;
        let frames = ws
            .until(|f| f["type"] == "ack" || f["type"] == "error")
            .await;
        let last = frames.last().unwrap().clone();
        if last["type"] == "ack" {
            break last;
        }
        assert_eq!(last["code"], "store_failed", "{last}");
        refusals += 1;
        assert!(refusals < 5, "the store did not recover: {frames:?}");
    };
    eprintln!("the store refused {refusals} time(s) before it recovered");
    assert_eq!(ack["seq"], 2, "{ack}");
    assert_eq!(ack["duplicate"], false, "{ack}");
    assert_eq!(app.message_count(&sid).await, 2);
}
