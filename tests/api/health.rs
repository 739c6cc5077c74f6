//! `/health`, unknown routes and wrong methods: what a monitor or a confused client sees.

use reqwest::Method;

use std::time::{Duration, Instant};

use serde_json::Value;

use crate::helpers::{
    assert_error, backend_name, customer_with_session, drop_pg_database, expect_json, spawn_app,
    TestApp,
};
use crate::ws::WsClient;

#[tokio::test]
async fn health_reports_each_component() {
    let app = spawn_app().await;
    for path in ["/health", "/api/health"] {
        let res = app.client.get(app.url(path)).send().await.unwrap();
        assert!(
            res.headers().contains_key("x-request-id"),
            "{path}: no request id"
        );
        let content_type = res.headers()["content-type"].to_str().unwrap().to_string();
        assert!(
            content_type.starts_with("application/json"),
            "{content_type}"
        );
        let body = expect_json(res, 200).await;
        assert_eq!(body["status"], "ok", "{path}: {body}");
        assert_eq!(body["version"], env!("CARGO_PKG_VERSION"), "{body}");
        let db = &body["components"]["database"];
        assert_eq!(db["status"], "up", "{body}");
        assert_eq!(db["backend"], backend_name(), "{body}");
        assert!(
            db["latency_ms"].as_f64().is_some_and(|ms| ms >= 0.0),
            "{body}"
        );
        let max = db["pool"]["max"].as_u64().expect("pool.max");
        assert_eq!(max, u64::from(app.settings.database.max_open_conns));
        assert!(db["pool"]["open"].as_u64().is_some_and(|open| open <= max));
    }
}

async fn health(app: &TestApp) -> Value {
    expect_json(
        app.client.get(app.url("/health")).send().await.unwrap(),
        200,
    )
    .await
}

/// Waits (up to 10 s) for `/health` to count `n` open WebSockets; the count as last seen.
async fn open_websockets(app: &TestApp, n: u64) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let open = health(app).await["websockets"]["open"]
            .as_u64()
            .expect("websockets.open");
        if open == n || Instant::now() > deadline {
            return open;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// `/health` counts the WebSockets open on this node: each from its `hello` until it closes,
/// whoever closes it. Shutdown waits on the same count for every socket's close frame.
#[tokio::test]
async fn health_counts_the_open_websockets() {
    let app = spawn_app().await;
    assert_eq!(open_websockets(&app, 0).await, 0);
    let (token, _) = customer_with_session(&app).await;
    let first = WsClient::customer(&app, &token).await;
    let mut second = WsClient::customer(&app, &token).await;
    assert_eq!(open_websockets(&app, 2).await, 2);
    first.close().await;
    assert_eq!(open_websockets(&app, 1).await, 1);
    // Refused upgrades are never counted.
    let refused = app
        .client
        .get(app.url("/api/v1/chat/ws?token=not-a-token"))
        .header("connection", "upgrade")
        .header("upgrade", "websocket")
        .header("sec-websocket-version", "13")
        .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==")
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 401);
    assert_eq!(open_websockets(&app, 1).await, 1);
    // A socket the server closes (a frame over the size limit) is uncounted too.
    second
        .send_text(&"x".repeat(app.settings.realtime.max_frame_bytes + 1))
        .await;
    assert_eq!(open_websockets(&app, 0).await, 0);
}

/// A database that disappears under a running server: `/health` answers 503 and names it.
/// Only PostgreSQL can lose its database under open connections; SQLite keeps an open file.
#[tokio::test]
async fn health_names_the_database_when_it_is_down() {
    let app = spawn_app().await;
    let Some(name) = app.pg_database.clone() else {
        eprintln!("SQLite: the database cannot be taken away from an open connection; skipped");
        return;
    };
    expect_json(
        app.client.get(app.url("/health")).send().await.unwrap(),
        200,
    )
    .await;
    drop_pg_database(&name).expect("dropping the test database");
    let res = app.client.get(app.url("/health")).send().await.unwrap();
    let body = assert_error(res, 503, "unavailable").await;
    assert_eq!(body["status"], "unavailable", "{body}");
    assert_eq!(body["components"]["database"]["status"], "down", "{body}");
    assert!(
        body["message"].as_str().unwrap().contains("database"),
        "{body}"
    );
}

#[tokio::test]
async fn unknown_routes_are_404_json() {
    let app = spawn_app().await;
    let guest = app.guest().await;
    for (method, path) in [
        (Method::GET, "/nope"),
        (Method::GET, "/api/v1/nope"),
        (Method::POST, "/api/v1/chat/nope"),
        (Method::GET, "/api/v2/chat/sessions"),
        (Method::GET, "/api/v1/chat/sessions/x/y/z"),
        (Method::DELETE, "/api/chat/nope"),
    ] {
        let res = app
            .request(method.clone(), path, Some(&guest.access_token))
            .send()
            .await
            .unwrap();
        let body = assert_error(res, 404, "not_found").await;
        assert!(
            body["message"].as_str().unwrap().contains("route"),
            "{method} {path}: {body}"
        );
    }
}

#[tokio::test]
async fn a_known_path_with_another_method_is_405_with_allow() {
    let app = spawn_app().await;
    let guest = app.guest().await;
    for (method, path, allowed) in [
        (Method::DELETE, "/api/v1/auth/login", "POST"),
        (Method::GET, "/api/v1/auth/login", "POST"),
        (Method::GET, "/api/v1/auth/refresh", "POST"),
        (Method::PUT, "/api/v1/auth/guest", "POST"),
        (Method::POST, "/health", "GET"),
        (Method::DELETE, "/api/v1/users/me", "GET"),
        (Method::PUT, "/api/v1/chat/sessions", "GET, POST"),
        (Method::PATCH, "/api/chat/sessions", "GET, POST"),
        (Method::DELETE, "/api/v1/chat/sessions/some-id", "GET"),
        (
            Method::PUT,
            "/api/chat/sessions/some-id/messages",
            "GET, POST",
        ),
        (Method::POST, "/api/v1/admin/chat/sessions", "GET"),
        (
            Method::PATCH,
            "/api/v1/admin/chat/sessions/some-id",
            "DELETE, GET",
        ),
        (
            Method::GET,
            "/api/v1/admin/chat/sessions/some-id/close",
            "POST",
        ),
        (
            Method::DELETE,
            "/api/v1/admin/chat/sessions/some-id/restore",
            "POST",
        ),
        (Method::GET, "/api/v1/chat/send", "POST"),
        (Method::PUT, "/api/chat/send", "POST"),
        (Method::GET, "/api/v1/chat/stream", "POST"),
        (Method::DELETE, "/api/chat/stream", "POST"),
        (Method::POST, "/api/v1/llm/models", "GET"),
        (Method::DELETE, "/api/llm/providers", "GET"),
        (Method::GET, "/api/v1/llm/active-model", "POST"),
        (Method::POST, "/api/v1/admin/chat/metrics/ai", "GET"),
    ] {
        let res = app
            .request(method.clone(), path, Some(&guest.access_token))
            .send()
            .await
            .unwrap();
        let mut allow: Vec<String> = res
            .headers()
            .get_all("allow")
            .iter()
            .flat_map(|v| v.to_str().unwrap().split(','))
            .map(|m| m.trim().to_string())
            .collect();
        allow.sort();
        let body = assert_error(res, 405, "method_not_allowed").await;
        assert_eq!(allow.join(", "), allowed, "{method} {path}: {body}");
        let message = body["message"].as_str().unwrap();
        assert!(message.starts_with(method.as_str()), "{message}");
    }
}

#[tokio::test]
async fn a_sane_request_id_is_echoed() {
    let app = spawn_app().await;
    let res = app
        .client
        .get(app.url("/health"))
        .header("x-request-id", "probe-123")
        .send()
        .await
        .unwrap();
    assert_eq!(res.headers()["x-request-id"], "probe-123");
    // A header that would corrupt a log line is replaced by a fresh id.
    let res = app
        .client
        .get(app.url("/health"))
        .header("x-request-id", "a b\"c")
        .send()
        .await
        .unwrap();
    let id = res.headers()["x-request-id"].to_str().unwrap().to_string();
    assert!(!id.contains(' ') && !id.is_empty(), "{id}");
}
