//! Retries, timeouts, the circuit breaker and the fallback provider, as a customer on the
//! socket sees them, against fake providers that throttle, fail, hang or break mid-answer.

use std::time::Duration;

use serde_json::Value;
use switchboard::config::{HumanDuration, Settings};

use crate::fake_http::{
    bedrock_delta, bedrock_error, bedrock_exception, bedrock_stream, bedrock_stream_reply,
    openai_delta, openai_error, openai_sse, FakeServer, Part, Reply,
};
use crate::helpers::{
    customer_with_session, spawn_app_with, stored_messages, tokens_text, TestApp,
};
use crate::providers::{ask, use_bedrock, use_openai};
use crate::ws::WsClient;

fn sse_ok(text: &str) -> Reply {
    Reply::stream("text/event-stream", openai_sse(&[text], Some((5, 1))))
}

/// Quick retries, so the tests do not wait on production pauses.
fn quick(s: &mut Settings) {
    s.ai.retry_attempts = 3;
    s.ai.retry_delay = HumanDuration::from_millis(10);
}

/// Opens a conversation, sends a message in it and reads until the conversation goes to the
/// human queue; checks that the customer was told `ai_unavailable` first. Each call takes a
/// new conversation: one in the queue gets no AI turn until the wait for a human is over.
async fn ask_unavailable(
    app: &TestApp,
    ws: &mut WsClient,
    token: &str,
    client_id: &str,
) -> (String, Vec<Value>) {
    let session = app.create_session(token, "help").await;
    let sid = session["id"].as_str().expect("session id").to_string();
    let sid = sid.as_str();
    ws.send_message(sid, client_id, "is anyone there?").await;
    let frames = ws.until(|f| f["type"] == "human_requested").await;
    let error = frames
        .iter()
        .find(|f| f["type"] == "error")
        .unwrap_or_else(|| panic!("no error frame in {frames:?}"));
    assert_eq!(error["code"], "ai_unavailable", "{error}");
    assert_eq!(error["session_id"], sid, "{error}");
    assert!(error["message"].as_str().is_some_and(|m| !m.is_empty()));
    let queued = frames.last().unwrap();
    assert_eq!(queued["session_id"], sid, "{queued}");
    assert!(
        frames.iter().all(|f| f["type"] != "token"),
        "tokens from a failed answer: {frames:?}"
    );
    (sid.to_string(), frames)
}

async fn app_with_openai(
    fake: &FakeServer,
    more: impl FnOnce(&mut Settings) + Send + 'static,
) -> TestApp {
    let fake = fake.clone();
    spawn_app_with(move |s| {
        use_openai(s, &fake);
        quick(s);
        more(s);
    })
    .await
}

#[tokio::test]
async fn throttling_is_retried_until_the_provider_answers() {
    let fake = FakeServer::start(vec![
        openai_error(429),
        openai_error(429),
        sse_ok("Sorry for the wait."),
    ])
    .await;
    let app = app_with_openai(&fake, |_| {}).await;
    let (token, sid) = customer_with_session(&app).await;
    let mut ws = WsClient::customer(&app, &token).await;

    let frames = ask(&mut ws, &sid, "c-1", "hello").await;
    assert_eq!(tokens_text(&frames), "Sorry for the wait.");
    assert!(frames.iter().all(|f| f["type"] != "error"), "{frames:?}");
    assert_eq!(frames.last().unwrap()["interrupted"], false);
    assert_eq!(fake.request_count(), 3);
}

#[tokio::test]
async fn bedrock_throttling_is_retried_by_our_policy_not_the_sdk() {
    let fake = FakeServer::start(vec![
        bedrock_error(429, "ThrottlingException", "Too many requests, please wait"),
        bedrock_stream_reply(bedrock_stream(&["Here", " you go."], (3, 2))),
    ])
    .await;
    let fake_for_app = fake.clone();
    let app = spawn_app_with(move |s| {
        use_bedrock(s, &fake_for_app);
        quick(s);
    })
    .await;
    let (token, sid) = customer_with_session(&app).await;
    let mut ws = WsClient::customer(&app, &token).await;
    let frames = ask(&mut ws, &sid, "c-1", "hello").await;
    assert_eq!(tokens_text(&frames), "Here you go.");
    assert_eq!(fake.request_count(), 2);
}

#[tokio::test]
async fn bedrock_exceptions_inside_the_stream_are_retried_before_the_first_token_only() {
    let fake = FakeServer::start(vec![
        bedrock_stream_reply(vec![bedrock_exception("throttlingException", "slow down")]),
        bedrock_stream_reply(vec![
            bedrock_delta("Half an"),
            bedrock_exception("modelStreamErrorException", "the model broke"),
        ]),
    ])
    .await;
    let fake_for_app = fake.clone();
    let app = spawn_app_with(move |s| {
        use_bedrock(s, &fake_for_app);
        quick(s);
    })
    .await;
    let (token, sid) = customer_with_session(&app).await;
    let mut ws = WsClient::customer(&app, &token).await;
    let frames = ask(&mut ws, &sid, "c-1", "hello").await;
    // Throttled before any text: tried again. Broken after text: the answer ends there.
    assert_eq!(fake.request_count(), 2);
    assert_eq!(tokens_text(&frames), "Half an");
    let error = frames
        .iter()
        .find(|f| f["type"] == "error")
        .expect("an error frame");
    assert_eq!(error["code"], "ai_failed", "{error}");
    assert_eq!(frames.last().unwrap()["interrupted"], true);
    let messages = stored_messages(&app, &token, &sid).await;
    assert_eq!(messages[1]["content"], "Half an");
    assert_eq!(messages[1]["interrupted"], true);
}

#[tokio::test]
async fn server_errors_exhaust_the_retries_and_offer_the_conversation_to_a_human() {
    let fake = FakeServer::start(vec![openai_error(502)]).await;
    let app = app_with_openai(&fake, |_| {}).await;
    let (token, _) = customer_with_session(&app).await;
    let mut ws = WsClient::customer(&app, &token).await;

    let (sid, _) = ask_unavailable(&app, &mut ws, &token, "c-1").await;
    assert_eq!(fake.request_count(), 3, "AI_RETRY_ATTEMPTS is 3");
    // Only the customer's message is stored: there was no answer.
    let messages = stored_messages(&app, &token, &sid).await;
    assert_eq!(messages.len(), 1, "{messages:?}");
    assert_eq!(messages[0]["role"], "user");
}

#[tokio::test]
async fn a_refused_request_is_not_retried() {
    let fake = FakeServer::start(vec![openai_error(400)]).await;
    let app = app_with_openai(&fake, |_| {}).await;
    let (token, _) = customer_with_session(&app).await;
    let mut ws = WsClient::customer(&app, &token).await;

    ask_unavailable(&app, &mut ws, &token, "c-1").await;
    assert_eq!(fake.request_count(), 1);
}

#[tokio::test]
async fn a_provider_that_never_answers_times_out_and_is_retried() {
    let fake = FakeServer::start(vec![Reply::hang()]).await;
    let app = app_with_openai(&fake, |s| {
        s.ai.retry_attempts = 2;
        s.ai.first_token_timeout = HumanDuration::from_millis(300);
    })
    .await;
    let (token, _) = customer_with_session(&app).await;
    let mut ws = WsClient::customer(&app, &token).await;

    ask_unavailable(&app, &mut ws, &token, "c-1").await;
    assert_eq!(fake.request_count(), 2);
}

#[tokio::test]
async fn an_answer_over_its_time_is_cut_and_stored_as_interrupted() {
    let fake = FakeServer::start(vec![Reply::stream(
        "text/event-stream",
        vec![
            openai_delta("Started"),
            Part::Pause(Duration::from_secs(60)),
            openai_delta(" never"),
        ],
    )])
    .await;
    let app = app_with_openai(&fake, |s| {
        s.ai.answer_timeout = HumanDuration::from_millis(500);
    })
    .await;
    let (token, sid) = customer_with_session(&app).await;
    let mut ws = WsClient::customer(&app, &token).await;

    let frames = ask(&mut ws, &sid, "c-1", "hello").await;
    let error = frames
        .iter()
        .find(|f| f["type"] == "error")
        .expect("an error frame");
    assert_eq!(error["code"], "ai_failed", "{error}");
    assert_eq!(frames.last().unwrap()["interrupted"], true);
    let messages = stored_messages(&app, &token, &sid).await;
    assert_eq!(messages[1]["content"], "Started");
    assert_eq!(messages[1]["interrupted"], true);
    assert_eq!(fake.request_count(), 1, "retried after the first token");
}

#[tokio::test]
async fn the_breaker_opens_after_repeated_failures_and_half_opens_after_the_cooldown() {
    let fake = FakeServer::start(vec![openai_error(500)]).await;
    let app = app_with_openai(&fake, |s| {
        s.ai.retry_attempts = 1;
        s.ai.breaker_failures = 2;
        s.ai.breaker_cooldown = HumanDuration::from_secs(1);
    })
    .await;
    let (token, _) = customer_with_session(&app).await;
    let mut ws = WsClient::customer(&app, &token).await;

    ask_unavailable(&app, &mut ws, &token, "c-1").await;
    ask_unavailable(&app, &mut ws, &token, "c-2").await;
    assert_eq!(fake.request_count(), 2);
    // Open: the provider is not called at all.
    ask_unavailable(&app, &mut ws, &token, "c-3").await;
    assert_eq!(fake.request_count(), 2, "called through an open breaker");

    // After the cooldown one trial goes through; it succeeds and closes the breaker.
    fake.script(vec![sse_ok("Back again.")]);
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let (token, sid) = customer_with_session(&app).await;
    let mut ws = WsClient::customer(&app, &token).await;
    let frames = ask(&mut ws, &sid, "c-4", "hello?").await;
    assert_eq!(tokens_text(&frames), "Back again.");
    assert_eq!(fake.request_count(), 3);
    let frames = ask(&mut ws, &sid, "c-5", "and now?").await;
    assert_eq!(tokens_text(&frames), "Back again.");
}

#[tokio::test]
async fn a_failed_half_open_trial_opens_the_breaker_again() {
    let fake = FakeServer::start(vec![openai_error(503)]).await;
    let app = app_with_openai(&fake, |s| {
        s.ai.retry_attempts = 1;
        s.ai.breaker_failures = 1;
        s.ai.breaker_cooldown = HumanDuration::from_secs(1);
    })
    .await;
    let (token, _) = customer_with_session(&app).await;
    let mut ws = WsClient::customer(&app, &token).await;

    ask_unavailable(&app, &mut ws, &token, "c-1").await;
    assert_eq!(fake.request_count(), 1);
    tokio::time::sleep(Duration::from_millis(1200)).await;
    // The trial fails: open again, so the next message does not reach the provider.
    ask_unavailable(&app, &mut ws, &token, "c-2").await;
    assert_eq!(fake.request_count(), 2);
    ask_unavailable(&app, &mut ws, &token, "c-3").await;
    assert_eq!(fake.request_count(), 2);
}

#[tokio::test]
async fn the_fallback_provider_answers_when_the_primary_cannot() {
    let fake = FakeServer::start(vec![openai_error(503)]).await;
    let app = app_with_openai(&fake, |s| {
        s.ai.retry_attempts = 2;
        s.ai.fallback_provider = "demo".into();
        s.ai.demo_token_delay = HumanDuration::from_millis(1);
    })
    .await;
    let (token, sid) = customer_with_session(&app).await;
    let mut ws = WsClient::customer(&app, &token).await;

    let frames = ask(&mut ws, &sid, "c-1", "where is my order").await;
    assert!(frames.iter().all(|f| f["type"] != "error"), "{frames:?}");
    let text = tokens_text(&frames);
    assert!(text.starts_with("[Demo consultant]"), "{text}");
    assert_eq!(fake.request_count(), 2);
    let messages = stored_messages(&app, &token, &sid).await;
    assert_eq!(messages[1]["content"], text.as_str());
    assert_eq!(messages[1]["model"], "switchboard-demo");
}
