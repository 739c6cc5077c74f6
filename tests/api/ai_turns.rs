//! How customer messages become AI turns: identical contexts answered from the cache, and
//! bursts of messages gathered into one turn.

use switchboard::config::HumanDuration;
use switchboard::db::models::Role;

use crate::fake_http::{openai_error, openai_sse, FakeServer, Reply};
use crate::helpers::{
    customer_with_session, expect_json, spawn_app_with, stored_messages, tokens_text,
};
use crate::providers::{ask, use_openai};
use crate::ws::WsClient;

fn answer(text: &str) -> Reply {
    Reply::stream("text/event-stream", openai_sse(&[text], None))
}

#[tokio::test]
async fn an_identical_context_is_answered_from_the_cache_the_same_way() {
    let fake = FakeServer::start(vec![
        Reply::stream(
            "text/event-stream",
            openai_sse(&["We open", " at nine."], None),
        ),
        openai_error(500),
    ])
    .await;
    let fake_for_app = fake.clone();
    let app = spawn_app_with(move |s| {
        use_openai(s, &fake_for_app);
        s.ai.enable_cache = true;
        s.ai.retry_attempts = 1;
    })
    .await;

    let (token_a, sid_a) = customer_with_session(&app).await;
    let mut a = WsClient::customer(&app, &token_a).await;
    let first = ask(&mut a, &sid_a, "a-1", "When do you open?").await;
    assert_eq!(tokens_text(&first), "We open at nine.");

    // Another customer, the same question in a new conversation: the same context.
    let (token_b, sid_b) = customer_with_session(&app).await;
    let mut b = WsClient::customer(&app, &token_b).await;
    let second = ask(&mut b, &sid_b, "b-1", "When do you open?").await;
    assert_eq!(tokens_text(&second), "We open at nine.");
    assert!(
        second.iter().filter(|f| f["type"] == "token").count() > 1,
        "not streamed: {second:?}"
    );
    assert_eq!(second.last().unwrap()["interrupted"], false);
    assert_eq!(fake.request_count(), 1, "the provider was asked again");
    let stored = stored_messages(&app, &token_b, &sid_b).await;
    assert_eq!(stored[1]["content"], "We open at nine.");
    assert_eq!(stored[1]["model"], "test-model");

    let admin = app.user("admin@example.com", Role::Admin).await;
    let body = expect_json(
        app.get("/api/v1/admin/chat/metrics/ai", &admin.access_token)
            .await,
        200,
    )
    .await;
    assert_eq!(body["models"][0]["cache_hits"], 1, "{body}");
    assert_eq!(body["models"][0]["requests"], 1, "{body}");

    // A different context goes to the provider (which now fails).
    b.send_message(&sid_b, "b-2", "And when do you close?")
        .await;
    let frames = b.until(|f| f["type"] == "human_requested").await;
    assert!(
        frames.iter().any(|f| f["code"] == "ai_unavailable"),
        "{frames:?}"
    );
    assert_eq!(fake.request_count(), 2);
}

#[tokio::test]
async fn without_the_cache_every_question_goes_to_the_provider() {
    let fake = FakeServer::start(vec![answer("Fresh.")]).await;
    let fake_for_app = fake.clone();
    let app = spawn_app_with(move |s| use_openai(s, &fake_for_app)).await;
    for n in 0..2 {
        let (token, sid) = customer_with_session(&app).await;
        let mut ws = WsClient::customer(&app, &token).await;
        ask(&mut ws, &sid, &format!("c-{n}"), "When do you open?").await;
    }
    assert_eq!(fake.request_count(), 2);
}

#[tokio::test]
async fn a_burst_of_messages_becomes_one_ai_turn() {
    let fake = FakeServer::start(vec![answer("One answer for all three.")]).await;
    let fake_for_app = fake.clone();
    let app = spawn_app_with(move |s| {
        use_openai(s, &fake_for_app);
        s.ai.batch_timeout = HumanDuration::from_secs(2);
        s.ai.batch_size = 10;
    })
    .await;
    let (token, sid) = customer_with_session(&app).await;
    let mut ws = WsClient::customer(&app, &token).await;
    for (i, text) in ["hi", "my order is late", "order 1234"].iter().enumerate() {
        ws.send_message(&sid, &format!("c-{i}"), text).await;
    }
    let frames = ws.until(|f| f["type"] == "reply_done").await;
    assert_eq!(
        frames.iter().filter(|f| f["type"] == "ack").count(),
        3,
        "{frames:?}"
    );
    assert_eq!(tokens_text(&frames), "One answer for all three.");
    assert_eq!(frames.last().unwrap()["seq"], 4);

    let requests = fake.requests();
    assert_eq!(requests.len(), 1);
    let messages = requests[0].json()["messages"].clone();
    let users: Vec<&str> = messages
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["role"] == "user")
        .map(|m| m["content"].as_str().unwrap())
        .collect();
    assert_eq!(users, ["hi", "my order is late", "order 1234"]);
    assert_eq!(app.message_count(&sid).await, 4);
}

#[tokio::test]
async fn a_full_burst_is_answered_without_waiting_for_the_pause() {
    let fake = FakeServer::start(vec![answer("Both seen.")]).await;
    let fake_for_app = fake.clone();
    let app = spawn_app_with(move |s| {
        use_openai(s, &fake_for_app);
        // Far longer than a test waits for a frame: only the size can start this turn.
        s.ai.batch_timeout = HumanDuration::from_secs(600);
        s.ai.batch_size = 2;
    })
    .await;
    let (token, sid) = customer_with_session(&app).await;
    let mut ws = WsClient::customer(&app, &token).await;
    ws.send_message(&sid, "c-1", "first").await;
    ws.send_message(&sid, "c-2", "second").await;
    let frames = ws.until(|f| f["type"] == "reply_done").await;
    assert_eq!(tokens_text(&frames), "Both seen.");
    assert_eq!(fake.request_count(), 1);
}
