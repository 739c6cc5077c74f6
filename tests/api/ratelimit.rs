//! Flood protection as a client meets it: `rate_limited` on the socket, 429 over HTTP.

use std::time::Duration;

use serde_json::{json, Value};
use switchboard::config::Settings;

use crate::helpers::{
    assert_error, customer_with_session, expect_json, numeric_header, spawn_app_with,
};
use crate::ws::{send_frame, WsClient};

#[tokio::test]
async fn a_socket_over_its_frame_limit_is_told_then_closed_if_it_keeps_on() {
    let app = spawn_app_with(|s: &mut Settings| {
        s.rate_limit.ws_frames_per_second = 1;
        s.rate_limit.ws_frame_burst = 5;
        s.rate_limit.ws_flood_close_after = 10;
    })
    .await;
    let (token, sid) = customer_with_session(&app).await;
    let mut ws = WsClient::customer(&app, &token).await;

    // Five frames at once are the burst; the sixth, a message, is refused and not stored.
    for i in 0..5 {
        ws.feed(&json!({"type": "ping", "nonce": i})).await;
    }
    ws.feed(&json!({"type": "send", "session_id": sid, "client_id": "over", "content": "hi"}))
        .await;
    ws.flush().await;
    let mut pongs = 0;
    let refused = loop {
        let f = ws.next().await;
        match f["type"].as_str() {
            Some("pong") => pongs += 1,
            Some("error") => break f,
            _ => panic!("unexpected frame {f}"),
        }
    };
    assert_eq!(pongs, 5);
    assert_eq!(refused["code"], "rate_limited", "{refused}");
    assert!(
        refused["message"].as_str().unwrap().contains("Retry"),
        "{refused}"
    );
    assert_eq!(
        app.message_count(&sid).await,
        0,
        "a refused send stored a row"
    );

    // The connection stays usable once the budget refills (one frame a second).
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let frames = ws.ping("after-the-pause").await;
    assert_eq!(frames.len(), 1, "{frames:?}");

    // A client that keeps flooding regardless is cut off with a reason.
    for i in 0..40 {
        ws.feed(&json!({"type": "ping", "nonce": format!("flood-{i}")}))
            .await;
    }
    ws.flush().await;
    let drained = ws
        .drain(Duration::from_secs(10))
        .await
        .unwrap_or_else(|d| panic!("the flooding socket is still open: {:?}", d.frames));
    assert_eq!(drained.close_code, Some(1008), "{drained:?}");
    let errors: Vec<&Value> = drained
        .frames
        .iter()
        .filter(|f| f["type"] == "error")
        .collect();
    // The goodbye at least (the refusals queued before it may be cut short by the close).
    assert!(!errors.is_empty(), "{drained:?}");
    assert!(
        errors.iter().all(|e| e["code"] == "rate_limited"),
        "{errors:?}"
    );
}

#[tokio::test]
async fn messages_over_the_users_rate_are_refused_on_the_socket_and_over_http() {
    let app = spawn_app_with(|s: &mut Settings| {
        s.rate_limit.messages_per_minute = 1;
        s.rate_limit.message_burst = 2;
    })
    .await;
    let (token, sid) = customer_with_session(&app).await;
    let mut ws = WsClient::customer(&app, &token).await;
    for i in 0..3 {
        ws.feed(&send_frame(&sid, &format!("m-{i}"), "hello")).await;
    }
    ws.flush().await;
    let mut acks = Vec::new();
    let mut refused = Vec::new();
    while acks.len() + refused.len() < 3 {
        let f = ws.next().await;
        match f["type"].as_str() {
            Some("ack") => acks.push(f["client_id"].as_str().unwrap().to_string()),
            Some("error") => refused.push(f),
            _ => {}
        }
    }
    assert_eq!(acks, ["m-0", "m-1"]);
    assert_eq!(refused[0]["code"], "rate_limited", "{:?}", refused[0]);
    assert_eq!(refused[0]["client_id"], "m-2", "{:?}", refused[0]);
    assert_eq!(refused[0]["session_id"], sid.as_str(), "{:?}", refused[0]);

    // HTTP shares the user's budget: 429 with the rate limit headers, nothing stored.
    let res = app.post_message(&token, &sid, "over http", None).await;
    assert_eq!(numeric_header(&res, "X-RateLimit-Limit"), 2);
    assert_eq!(numeric_header(&res, "X-RateLimit-Remaining"), 0);
    let retry = numeric_header(&res, "Retry-After");
    assert!((1..=60).contains(&retry), "Retry-After {retry}");
    assert!(numeric_header(&res, "X-RateLimit-Reset") >= retry);
    assert_error(res, 429, "rate_limited").await;
    let users_rows = app.message_count(&sid).await;
    // Two customer messages, plus whatever AI answers were stored meanwhile.
    let history = expect_json(
        app.get(&format!("/api/v1/chat/sessions/{sid}/messages"), &token)
            .await,
        200,
    )
    .await;
    let from_user = history["messages"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["role"] == "user")
        .count();
    assert_eq!(from_user, 2, "{history}");
    assert!(users_rows >= 2);

    // Another user has a budget of their own.
    let (other, other_sid) = customer_with_session(&app).await;
    let res = app.post_message(&other, &other_sid, "mine", None).await;
    expect_json(res, 201).await;
}

#[tokio::test]
async fn sign_in_endpoints_answer_429_past_the_limit_per_address() {
    let app = spawn_app_with(|s: &mut Settings| {
        s.rate_limit.auth_per_minute = 1;
        s.rate_limit.auth_burst = 3;
    })
    .await;
    for _ in 0..3 {
        app.guest().await;
    }
    let res = app
        .client
        .post(app.url("/api/v1/auth/guest"))
        .send()
        .await
        .unwrap();
    assert_eq!(numeric_header(&res, "X-RateLimit-Limit"), 3);
    assert_eq!(numeric_header(&res, "X-RateLimit-Remaining"), 0);
    assert!(numeric_header(&res, "Retry-After") >= 1);
    let body = assert_error(res, 429, "rate_limited").await;
    assert!(
        body["message"].as_str().unwrap().contains("retry"),
        "{body}"
    );

    // Login is a sign-in endpoint too, on the alias paths as well; other routes are not.
    let res = app
        .client
        .post(app.url("/api/v1/auth/login"))
        .json(&json!({"email": "a@example.com", "password": "whatever-123"}))
        .send()
        .await
        .unwrap();
    assert_error(res, 429, "rate_limited").await;
    let res = app.client.get(app.url("/health")).send().await.unwrap();
    assert_eq!(res.status(), 200);
}
