//! The AI consultant over plain HTTP (`/chat/send`, `/chat/stream` and their twins), the
//! model and provider endpoints, and the AI metrics.

use serde_json::{json, Value};
use switchboard::config::HumanDuration;
use switchboard::db::models::Role;

use crate::fake_http::{openai_error, openai_sse, FakeServer, Reply};
use crate::helpers::{
    assert_error, customer_with_session, expect_json, numeric_header, spawn_app_with,
    stored_messages, tokens_text,
};
use crate::providers::use_openai;
use crate::ws::WsClient;

fn fast_demo(s: &mut switchboard::config::Settings) {
    s.ai.demo_token_delay = HumanDuration::from_millis(1);
}

/// The events of an SSE body: (event name, data as JSON).
pub fn sse_events(body: &str) -> Vec<(String, Value)> {
    body.split("\n\n")
        .filter(|block| !block.trim().is_empty())
        .map(|block| {
            let mut name = String::new();
            let mut data = String::new();
            for line in block.lines() {
                if let Some(n) = line.strip_prefix("event: ") {
                    name = n.to_string();
                } else if let Some(d) = line.strip_prefix("data: ") {
                    data.push_str(d);
                }
            }
            let data = serde_json::from_str(&data)
                .unwrap_or_else(|e| panic!("SSE data is not JSON ({e}): {block}"));
            (name, data)
        })
        .collect()
}

/// Reads an SSE response until `done` holds for the text so far, or it ends; returns the
/// text read.
pub async fn read_sse_until(res: &mut reqwest::Response, done: impl Fn(&str) -> bool) -> String {
    let mut text = String::new();
    while !done(&text) {
        let chunk = tokio::time::timeout(std::time::Duration::from_secs(30), res.chunk())
            .await
            .unwrap_or_else(|_| panic!("no SSE event within 30 s; so far: {text}"))
            .expect("reading the stream");
        match chunk {
            Some(bytes) => text.push_str(std::str::from_utf8(&bytes).expect("UTF-8")),
            None => break,
        }
    }
    text
}

#[tokio::test]
async fn send_stores_the_question_and_the_whole_answer_and_shows_both_live() {
    let app = spawn_app_with(fast_demo).await;
    let (token, sid) = customer_with_session(&app).await;
    let mut ws = WsClient::customer(&app, &token).await;
    ws.resume(&sid, 0).await;
    ws.until(|f| f["type"] == "resumed").await;

    for (path, n) in [("/api/chat/send", 1), ("/api/v1/chat/send", 3)] {
        let res = app
            .post_json(
                path,
                &token,
                &json!({"session_id": sid, "message": format!("question {n}")}),
            )
            .await;
        let body = expect_json(res, 200).await;
        assert_eq!(body["message"]["seq"], n, "{body}");
        assert_eq!(body["message"]["role"], "user");
        assert_eq!(body["message"]["content"], format!("question {n}"));
        assert_eq!(body["answer"]["seq"], n + 1, "{body}");
        assert_eq!(body["answer"]["role"], "assistant");
        assert_eq!(body["answer"]["interrupted"], false);
        let answer = body["answer"]["content"].as_str().unwrap();
        assert!(answer.starts_with("[Demo consultant]"), "{answer}");
        assert!(answer.contains(&format!("question {n}")), "{answer}");

        // A socket in the conversation saw the same, live.
        let frames = ws.until(|f| f["type"] == "reply_done").await;
        let shown = frames
            .iter()
            .find(|f| f["type"] == "message")
            .expect("message");
        assert_eq!(shown["content"], format!("question {n}"));
        assert_eq!(tokens_text(&frames), answer);
        assert_eq!(frames.last().unwrap()["seq"], n + 1);
    }
    assert_eq!(app.message_count(&sid).await, 4);
}

#[tokio::test]
async fn stream_sends_server_sent_events_and_stores_the_answer() {
    let app = spawn_app_with(fast_demo).await;
    let (token, sid) = customer_with_session(&app).await;
    for path in ["/api/chat/stream", "/api/v1/chat/stream"] {
        let res = app
            .post_json(
                path,
                &token,
                &json!({"session_id": sid, "message": "stream it"}),
            )
            .await;
        assert_eq!(res.status(), 200);
        let content_type = res.headers()["content-type"].to_str().unwrap().to_string();
        assert!(
            content_type.starts_with("text/event-stream"),
            "{content_type}"
        );
        let events = sse_events(&res.text().await.unwrap());
        assert_eq!(events[0].0, "message", "{events:?}");
        assert_eq!(events[0].1["content"], "stream it");
        let streamed: String = events
            .iter()
            .filter(|(name, _)| name == "token")
            .map(|(_, d)| d["delta"].as_str().unwrap())
            .collect();
        assert!(streamed.starts_with("[Demo consultant]"), "{streamed}");
        let (name, done) = events.last().unwrap();
        assert_eq!(name, "done", "{events:?}");
        assert_eq!(done["interrupted"], false);
        let seq = done["seq"].as_i64().unwrap();
        let stored = stored_messages(&app, &token, &sid).await;
        let answer = stored
            .iter()
            .find(|m| m["seq"] == seq)
            .expect("stored answer");
        assert_eq!(answer["content"], streamed.as_str());
    }
}

#[tokio::test]
async fn send_and_stream_refuse_bad_input_and_change_nothing() {
    let app = spawn_app_with(fast_demo).await;
    let (token, sid) = customer_with_session(&app).await;
    let (other_token, _) = customer_with_session(&app).await;
    let agent = app.user("agent@example.com", Role::Agent).await;
    let cases = [
        (
            json!({"session_id": sid}),
            token.as_str(),
            400,
            "invalid_json",
        ),
        (
            json!({"session_id": sid, "message": "hi", "extra": 1}),
            &token,
            400,
            "invalid_json",
        ),
        (
            json!({"session_id": sid, "message": 42}),
            &token,
            400,
            "invalid_json",
        ),
        (
            json!({"session_id": sid, "message": "   "}),
            &token,
            400,
            "empty_message",
        ),
        (
            json!({"session_id": sid, "message": "x".repeat(9000)}),
            &token,
            413,
            "message_too_large",
        ),
        (
            json!({"session_id": sid, "message": "a\u{0}b"}),
            &token,
            400,
            "invalid_content",
        ),
        // Someone else's conversation looks exactly like a missing one.
        (
            json!({"session_id": sid, "message": "hi"}),
            &other_token,
            404,
            "not_found",
        ),
        (
            json!({"session_id": "nope", "message": "hi"}),
            &token,
            404,
            "not_found",
        ),
        (
            json!({"session_id": sid, "message": "hi"}),
            &agent.access_token,
            403,
            "forbidden",
        ),
        (
            json!({"session_id": sid, "message": "hi"}),
            "not-a-token",
            401,
            "unauthorized",
        ),
    ];
    for path in [
        "/api/chat/send",
        "/api/v1/chat/send",
        "/api/chat/stream",
        "/api/v1/chat/stream",
    ] {
        for (body, who, status, code) in &cases {
            assert_error(app.post_json(path, who, body).await, *status, code).await;
        }
        let res = app
            .client
            .post(app.url(path))
            .bearer_auth(&token)
            .header("content-type", "application/json")
            .body("{not json")
            .send()
            .await
            .unwrap();
        assert_error(res, 400, "invalid_json").await;
    }
    assert_eq!(app.message_count(&sid).await, 0);

    // A closed conversation takes no more questions.
    let admin = app.user("admin@example.com", Role::Admin).await;
    let res = app
        .post(
            &format!("/api/v1/admin/chat/sessions/{sid}/close"),
            &admin.access_token,
        )
        .await;
    assert!(res.status().is_success(), "{}", res.status());
    let res = app
        .post_json(
            "/api/chat/send",
            &token,
            &json!({"session_id": sid, "message": "hi"}),
        )
        .await;
    assert_error(res, 409, "session_not_active").await;
    assert_eq!(app.message_count(&sid).await, 0);
}

#[tokio::test]
async fn send_and_stream_answer_503_when_no_provider_can_answer() {
    let fake = FakeServer::start(vec![openai_error(500)]).await;
    let fake_for_app = fake.clone();
    let app = spawn_app_with(move |s| {
        use_openai(s, &fake_for_app);
        s.ai.retry_attempts = 2;
        s.ai.retry_delay = HumanDuration::from_millis(5);
    })
    .await;
    // One conversation each: the first question sends its conversation to the human queue,
    // where the next would get no AI turn at all (see ai_desk).
    for path in ["/api/chat/send", "/api/v1/chat/stream"] {
        let (token, sid) = customer_with_session(&app).await;
        let res = app
            .post_json(
                path,
                &token,
                &json!({"session_id": sid, "message": "anyone?"}),
            )
            .await;
        assert_error(res, 503, "ai_unavailable").await;
        // The question is stored: a human can pick the conversation up.
        let stored = stored_messages(&app, &token, &sid).await;
        assert_eq!(stored.len(), 1, "{stored:?}");
        assert_eq!(stored[0]["role"], "user");
    }
    assert_eq!(fake.request_count(), 4);
}

#[tokio::test]
async fn the_demo_says_it_is_a_demo() {
    let app = spawn_app_with(fast_demo).await;
    let guest = app.guest().await;
    for prefix in ["/api", "/api/v1"] {
        let body = expect_json(
            app.get(&format!("{prefix}/llm/providers"), &guest.access_token)
                .await,
            200,
        )
        .await;
        let p = &body["providers"][0];
        assert_eq!(p["name"], "demo", "{body}");
        assert_eq!(p["demo"], true);
        assert_eq!(p["configured"], true);
        assert_eq!(p["healthy"], true);
        assert_eq!(p["breaker"], "closed");
        assert!(p["note"].as_str().unwrap().contains("demo"), "{p}");

        let body = expect_json(
            app.get(&format!("{prefix}/llm/models"), &guest.access_token)
                .await,
            200,
        )
        .await;
        assert_eq!(body["active_model"], "switchboard-demo", "{body}");
        assert_eq!(body["models"][0]["demo"], true);
        assert_eq!(body["models"][0]["active"], true);

        let res = app
            .client
            .get(app.url(&format!("{prefix}/llm/models")))
            .send()
            .await
            .unwrap();
        assert_error(res, 401, "unauthorized").await;
    }
}

#[tokio::test]
async fn an_admin_switches_the_active_model_and_answers_use_it() {
    let fake = FakeServer::start(vec![Reply::stream(
        "text/event-stream",
        openai_sse(&["ok"], None),
    )])
    .await;
    let fake_for_app = fake.clone();
    let app = spawn_app_with(move |s| {
        use_openai(s, &fake_for_app);
        s.ai.models = vec!["bigger-model".into()];
    })
    .await;
    let admin = app.user("admin@example.com", Role::Admin).await;
    let agent = app.user("agent@example.com", Role::Agent).await;
    let (token, sid) = customer_with_session(&app).await;

    let body = expect_json(app.get("/api/llm/models", &token).await, 200).await;
    let ids: Vec<&str> = body["models"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["test-model", "bigger-model"]);

    for (who, status, code) in [
        (&token, 403, "forbidden"),
        (&agent.access_token, 403, "forbidden"),
    ] {
        let res = app
            .post_json(
                "/api/v1/llm/active-model",
                who,
                &json!({"model_id": "bigger-model"}),
            )
            .await;
        assert_error(res, status, code).await;
    }
    for bad in [
        json!({"model_id": "no-such-model"}),
        json!({"model_id": 5}),
        json!({}),
        json!({"model_id": "x", "y": 1}),
    ] {
        let res = app
            .post_json("/api/llm/active-model", &admin.access_token, &bad)
            .await;
        let code = if bad.get("model_id").is_some_and(Value::is_string) && bad.get("y").is_none() {
            "bad_request"
        } else {
            "invalid_json"
        };
        assert_error(res, 400, code).await;
    }
    let body = expect_json(app.get("/api/llm/models", &token).await, 200).await;
    assert_eq!(
        body["active_model"], "test-model",
        "a refused switch changed the model"
    );

    let res = app
        .post_json(
            "/api/llm/active-model",
            &admin.access_token,
            &json!({"model_id": "bigger-model"}),
        )
        .await;
    assert_eq!(expect_json(res, 200).await["active_model"], "bigger-model");
    let res = app
        .post_json(
            "/api/v1/chat/send",
            &token,
            &json!({"session_id": sid, "message": "hi"}),
        )
        .await;
    let body = expect_json(res, 200).await;
    assert_eq!(body["answer"]["model"], "bigger-model", "{body}");
    assert_eq!(fake.requests()[0].json()["model"], "bigger-model");
}

#[tokio::test]
async fn ai_metrics_count_requests_retries_errors_latency_and_tokens() {
    let fake = FakeServer::start(vec![
        Reply::json(429, &json!({"error": {"message": "slow down"}})),
        Reply::stream(
            "text/event-stream",
            openai_sse(&["Fine", " thanks"], Some((12, 2))),
        ),
    ])
    .await;
    let fake_for_app = fake.clone();
    let app = spawn_app_with(move |s| {
        use_openai(s, &fake_for_app);
        s.ai.retry_delay = HumanDuration::from_millis(5);
    })
    .await;
    let (token, sid) = customer_with_session(&app).await;
    let admin = app.user("admin@example.com", Role::Admin).await;
    let res = app
        .post_json(
            "/api/chat/send",
            &token,
            &json!({"session_id": sid, "message": "how are you"}),
        )
        .await;
    assert_eq!(
        expect_json(res, 200).await["answer"]["content"],
        "Fine thanks"
    );

    let body = expect_json(
        app.get("/api/v1/admin/chat/metrics/ai", &admin.access_token)
            .await,
        200,
    )
    .await;
    let m = &body["models"][0];
    assert_eq!(m["provider"], "openai", "{body}");
    assert_eq!(m["model"], "test-model");
    assert_eq!(m["requests"], 2);
    assert_eq!(m["retries"], 1);
    assert_eq!(m["errors"]["throttled"], 1);
    assert_eq!(m["tokens_in"], 12);
    assert_eq!(m["tokens_out"], 2);
    assert_eq!(m["time_to_first_token_ms"]["samples"], 1);
    assert_eq!(m["total_latency_ms"]["samples"], 1);
    assert!(m["total_latency_ms"]["p50"].is_u64(), "{m}");

    let res = app.get("/api/v1/admin/chat/metrics/ai", &token).await;
    assert_error(res, 403, "forbidden").await;
    let res = app
        .client
        .get(app.url("/api/v1/admin/chat/metrics/ai"))
        .send()
        .await
        .unwrap();
    assert_error(res, 401, "unauthorized").await;
}

#[tokio::test]
async fn the_providers_endpoint_shows_an_open_breaker() {
    let fake = FakeServer::start(vec![openai_error(500)]).await;
    let fake_for_app = fake.clone();
    let app = spawn_app_with(move |s| {
        use_openai(s, &fake_for_app);
        s.ai.retry_attempts = 1;
        s.ai.breaker_failures = 1;
        s.ai.breaker_cooldown = HumanDuration::from_secs(600);
        s.ai.fallback_provider = "demo".into();
        s.ai.demo_token_delay = HumanDuration::from_millis(1);
    })
    .await;
    let (token, sid) = customer_with_session(&app).await;
    let res = app
        .post_json(
            "/api/chat/send",
            &token,
            &json!({"session_id": sid, "message": "hi"}),
        )
        .await;
    let body = expect_json(res, 200).await;
    assert_eq!(body["answer"]["model"], "switchboard-demo", "{body}");

    let body = expect_json(app.get("/api/llm/providers", &token).await, 200).await;
    let providers = body["providers"].as_array().unwrap();
    assert_eq!(providers[0]["name"], "openai");
    assert_eq!(providers[0]["breaker"], "open", "{body}");
    assert_eq!(providers[0]["healthy"], false);
    assert_eq!(providers[1]["name"], "demo");
    assert_eq!(providers[1]["role"], "fallback");
    assert_eq!(providers[1]["healthy"], true);
}

#[tokio::test]
async fn send_while_an_answer_is_being_written_returns_the_answer_to_its_own_message() {
    let app = spawn_app_with(|s| s.ai.demo_token_delay = HumanDuration::from_millis(20)).await;
    let (token, sid) = customer_with_session(&app).await;
    let mut ws = WsClient::customer(&app, &token).await;
    ws.send_message(&sid, "c-1", "first question").await;
    ws.until(|f| f["type"] == "token").await;

    let res = app
        .post_json(
            "/api/chat/send",
            &token,
            &json!({"session_id": sid, "message": "second question"}),
        )
        .await;
    let body = expect_json(res, 200).await;
    assert_eq!(body["message"]["seq"], 2, "{body}");
    assert_eq!(body["answer"]["seq"], 4, "{body}");
    let answer = body["answer"]["content"].as_str().unwrap();
    assert!(answer.contains("second question"), "{answer}");
    let stored = stored_messages(&app, &token, &sid).await;
    assert!(
        stored[2]["content"]
            .as_str()
            .unwrap()
            .contains("first question"),
        "{stored:?}"
    );
}

#[tokio::test]
async fn questions_take_the_users_message_budget_and_get_429_past_it() {
    let app = spawn_app_with(|s| {
        fast_demo(s);
        s.rate_limit.messages_per_minute = 1;
        s.rate_limit.message_burst = 2;
    })
    .await;
    let (token, sid) = customer_with_session(&app).await;
    let ask = json!({"session_id": sid, "message": "one more question"});
    expect_json(app.post_json("/api/chat/send", &token, &ask).await, 200).await;
    let res = app.post_json("/api/v1/chat/stream", &token, &ask).await;
    assert_eq!(res.status(), 200);
    let events = sse_events(&res.text().await.unwrap());
    assert_eq!(events.last().unwrap().0, "done", "{events:?}");

    // The budget of two is spent: every way of asking or posting is refused alike.
    for path in [
        "/api/chat/send",
        "/api/v1/chat/send",
        "/api/chat/stream",
        "/api/v1/chat/stream",
    ] {
        let res = app.post_json(path, &token, &ask).await;
        assert_eq!(numeric_header(&res, "X-RateLimit-Limit"), 2, "{path}");
        assert_eq!(numeric_header(&res, "X-RateLimit-Remaining"), 0, "{path}");
        let retry = numeric_header(&res, "Retry-After");
        assert!((1..=60).contains(&retry), "{path}: Retry-After {retry}");
        assert!(numeric_header(&res, "X-RateLimit-Reset") >= retry, "{path}");
        assert_error(res, 429, "rate_limited").await;
    }
    let res = app.post_message(&token, &sid, "posted", None).await;
    assert_error(res, 429, "rate_limited").await;
    let stored = stored_messages(&app, &token, &sid).await;
    let asked: Vec<&Value> = stored.iter().filter(|m| m["role"] == "user").collect();
    assert_eq!(asked.len(), 2, "{stored:?}");
    assert_eq!(
        stored.len(),
        4,
        "two questions and their answers: {stored:?}"
    );

    // Another customer has a budget of their own.
    let (other, other_sid) = customer_with_session(&app).await;
    let res = app
        .post_json(
            "/api/chat/send",
            &other,
            &json!({"session_id": other_sid, "message": "mine"}),
        )
        .await;
    expect_json(res, 200).await;
}
