//! The AI consultant and the agent desk together: a conversation no provider can answer goes
//! to the human queue, and the AI endpoints answer at once where a human has the
//! conversation, or as soon as one takes it.

use serde_json::{json, Value};
use switchboard::config::HumanDuration;
use switchboard::db::models::Role;

use crate::ai_http::{read_sse_until, sse_events};
use crate::fake_http::{openai_error, FakeServer};
use crate::helpers::{
    assert_error, customer_with_session, expect_json, spawn_app_with, stored_messages, updated,
    TestApp,
};
use crate::providers::use_openai;
use crate::ws::WsClient;

/// A dashboard, read past its snapshot.
async fn dashboard(app: &TestApp, email: &str) -> WsClient {
    let agent = app.user(email, Role::Agent).await;
    let mut ws = WsClient::staff(app, &agent.access_token).await;
    ws.next_of("snapshot").await;
    ws
}

async fn takeover(desk: &mut WsClient, customer: &mut WsClient, sid: &str) {
    desk.send(&json!({"type": "takeover", "session_id": sid}))
        .await;
    let frames = customer
        .until(|f| f["type"] == "mode" && f["session_id"] == sid)
        .await;
    assert_eq!(frames.last().unwrap()["mode"], "human", "{frames:?}");
}

#[tokio::test]
async fn a_conversation_no_provider_can_answer_is_queued_and_questions_there_return_at_once() {
    let fake = FakeServer::start(vec![openai_error(500)]).await;
    let fake_for_app = fake.clone();
    let app = spawn_app_with(move |s| {
        use_openai(s, &fake_for_app);
        s.ai.retry_attempts = 2;
        s.ai.retry_delay = HumanDuration::from_millis(5);
        // Longer than the test: the queue keeps the conversation throughout.
        s.chat.human_wait = HumanDuration::from_secs(600);
    })
    .await;
    let mut desk = dashboard(&app, "agent@example.com").await;
    let (token, sid) = customer_with_session(&app).await;
    let mut cust = WsClient::customer(&app, &token).await;
    cust.resume(&sid, 0).await;
    cust.until(|f| f["type"] == "resumed").await;

    let ask = |text: &str| json!({"session_id": sid, "message": text});
    let res = app
        .post_json("/api/chat/send", &token, &ask("anyone there?"))
        .await;
    assert_error(res, 503, "ai_unavailable").await;
    assert_eq!(fake.request_count(), 2);

    // The server queued the conversation as if the customer had asked for a human.
    let frames = cust.until(|f| f["type"] == "human_requested").await;
    let error = frames
        .iter()
        .find(|f| f["type"] == "error")
        .unwrap_or_else(|| panic!("no error before the queue: {frames:?}"));
    assert_eq!(error["code"], "ai_unavailable", "{error}");
    assert!(
        frames.iter().all(|f| f["type"] != "human_offered"),
        "{frames:?}"
    );
    let queue = desk
        .until(|f| {
            f["type"] == "queue"
                && f["sessions"]
                    .as_array()
                    .is_some_and(|q| q.iter().any(|s| s["session_id"] == sid))
        })
        .await;
    let queued = &queue.last().unwrap()["sessions"][0];
    assert_eq!(queued["mode"], "ai", "{queued}");
    assert!(queued["human_requested_at"].is_string(), "{queued}");

    // Waiting for a human: the question is stored, the request answers at once.
    let res = app
        .post_json("/api/chat/send", &token, &ask("still waiting"))
        .await;
    let body = expect_json(res, 200).await;
    assert_eq!(body["message"]["seq"], 2, "{body}");
    assert_eq!(body["message"]["content"], "still waiting");
    assert_eq!(body["answer"], Value::Null, "{body}");
    assert_eq!(body["human"], "queued", "{body}");
    let res = app
        .post_json("/api/v1/chat/stream", &token, &ask("hello?"))
        .await;
    assert_eq!(res.status(), 200);
    let events = sse_events(&res.text().await.unwrap());
    let names: Vec<&str> = events.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["message", "done"], "{events:?}");
    assert_eq!(events[0].1["seq"], 3);
    assert_eq!(events[1].1["seq"], Value::Null, "{events:?}");
    assert_eq!(events[1].1["human"], "queued", "{events:?}");
    assert_eq!(fake.request_count(), 2, "the AI was asked again");

    // An agent takes it over: the same, now with the agent.
    desk.send(&json!({"type": "watch", "session_id": sid}))
        .await;
    desk.until(|f| f["type"] == "watching").await;
    takeover(&mut desk, &mut cust, &sid).await;
    let res = app
        .post_json("/api/v1/chat/send", &token, &ask("thank you, agent"))
        .await;
    let body = expect_json(res, 200).await;
    assert_eq!(body["answer"], Value::Null, "{body}");
    assert_eq!(body["human"], "taken_over", "{body}");
    let seen = desk
        .until(|f| f["type"] == "message" && f["content"] == "thank you, agent")
        .await;
    assert_eq!(seen.last().unwrap()["seq"], 4);

    let stored = stored_messages(&app, &token, &sid).await;
    assert_eq!(stored.len(), 4, "{stored:?}");
    assert!(stored.iter().all(|m| m["role"] == "user"), "{stored:?}");
    assert_eq!(fake.request_count(), 2);
}

#[tokio::test]
async fn a_takeover_ends_a_question_awaiting_its_answer() {
    let app = spawn_app_with(|s| {
        // Slow enough that the answer is still being written at the takeover.
        s.ai.demo_token_delay = HumanDuration::from_millis(200);
    })
    .await;
    let mut desk = dashboard(&app, "agent@example.com").await;
    let (token, sid) = customer_with_session(&app).await;
    let mut cust = WsClient::customer(&app, &token).await;
    cust.resume(&sid, 0).await;
    cust.until(|f| f["type"] == "resumed").await;

    let mut res = app
        .post_json(
            "/api/chat/stream",
            &token,
            &json!({"session_id": sid, "message": "a long question"}),
        )
        .await;
    assert_eq!(res.status(), 200);
    let mut text = read_sse_until(&mut res, |t| t.matches("event: token").count() >= 2).await;
    takeover(&mut desk, &mut cust, &sid).await;
    text.push_str(&read_sse_until(&mut res, |_| false).await);
    let events = sse_events(&text);
    let (name, done) = events.last().unwrap();
    assert_eq!(name, "done", "{events:?}");
    assert_eq!(done["interrupted"], true, "{done}");
    assert_eq!(done["human"], "taken_over", "{done}");
    let streamed: String = events
        .iter()
        .filter(|(n, _)| n == "token")
        .map(|(_, d)| d["delta"].as_str().unwrap())
        .collect();
    let stored = stored_messages(&app, &token, &sid).await;
    assert_eq!(stored.len(), 2, "{stored:?}");
    assert_eq!(stored[1]["seq"], done["seq"]);
    assert_eq!(stored[1]["content"], streamed.as_str());
    assert_eq!(stored[1]["interrupted"], true);
}

#[tokio::test]
async fn a_takeover_drops_a_burst_waiting_for_its_turn_and_ends_its_question() {
    let app = spawn_app_with(|s| {
        s.ai.demo_token_delay = HumanDuration::from_millis(1);
        // The burst waits far longer than the test for the customer to pause.
        s.ai.batch_timeout = HumanDuration::from_secs(600);
    })
    .await;
    let mut desk = dashboard(&app, "agent@example.com").await;
    let (token, sid) = customer_with_session(&app).await;
    let mut cust = WsClient::customer(&app, &token).await;
    cust.resume(&sid, 0).await;
    cust.until(|f| f["type"] == "resumed").await;

    let waiting = app.spawn_post_json(
        "/api/v1/chat/send",
        &token,
        &json!({"session_id": sid, "message": "part one"}),
    );
    cust.until(|f| f["type"] == "message" && f["content"] == "part one")
        .await;
    takeover(&mut desk, &mut cust, &sid).await;
    let body = expect_json(waiting.await.unwrap(), 200).await;
    assert_eq!(body["message"]["seq"], 1, "{body}");
    assert_eq!(body["answer"], Value::Null, "{body}");
    assert_eq!(body["human"], "taken_over", "{body}");

    let stored = stored_messages(&app, &token, &sid).await;
    assert_eq!(stored.len(), 1, "{stored:?}");

    // Closing the conversation ends a question waiting for its burst with 409.
    let (token, sid) = customer_with_session(&app).await;
    let waiting = app.spawn_post_json(
        "/api/chat/stream",
        &token,
        &json!({"session_id": sid, "message": "hello"}),
    );
    // Stored (the dashboards see it), its answer waiting for the burst to end.
    desk.until(|f| updated(f, &sid).is_some_and(|s| s["last_seq"] == 1))
        .await;
    desk.send(&json!({"type": "close", "session_id": sid}))
        .await;
    assert_error(waiting.await.unwrap(), 409, "session_not_active").await;
}
