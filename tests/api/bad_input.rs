//! Bad input on every endpoint: each gets its JSON error with the right status, and nothing
//! is stored (table counts are compared before and after).

use reqwest::header::CONTENT_TYPE;
use reqwest::Method;
use serde_json::{json, Value};
use switchboard::db::models::Role;

use crate::helpers::{
    assert_error, expect_json, id_of, sign_with, spawn_app, spawn_app_with, Signed, TestApp,
};

/// A customer with a conversation holding one message (posted by staff, so no AI answer is
/// on its way to change the counts), and an agent.
struct World {
    customer: Signed,
    agent: Signed,
    session: String,
}

async fn world(app: &TestApp) -> World {
    let customer = app.guest().await;
    let agent = app.user("agent@example.com", Role::Agent).await;
    let session = id_of(&app.create_session(&customer.access_token, "mine").await);
    let res = app
        .post_message(&agent.access_token, &session, "hello", Some("c-1"))
        .await;
    expect_json(res, 201).await;
    World {
        customer,
        agent,
        session,
    }
}

/// Endpoints that read a JSON body, with a body each accepts.
fn json_endpoints(session: &str) -> Vec<(String, Value)> {
    vec![
        (
            "/api/v1/auth/login".into(),
            json!({"email": "agent@example.com", "password": "correct horse battery"}),
        ),
        ("/api/v1/auth/refresh".into(), json!({"refresh_token": "x"})),
        ("/api/v1/chat/sessions".into(), json!({"title": "t"})),
        ("/api/chat/sessions".into(), json!({"title": "t"})),
        (
            format!("/api/v1/chat/sessions/{session}/messages"),
            json!({"content": "hi"}),
        ),
        (
            format!("/api/chat/sessions/{session}/messages"),
            json!({"content": "hi"}),
        ),
        (
            "/api/v1/chat/send".into(),
            json!({"session_id": session, "message": "hi"}),
        ),
        (
            "/api/chat/send".into(),
            json!({"session_id": session, "message": "hi"}),
        ),
        (
            "/api/v1/chat/stream".into(),
            json!({"session_id": session, "message": "hi"}),
        ),
        (
            "/api/chat/stream".into(),
            json!({"session_id": session, "message": "hi"}),
        ),
        ("/api/v1/llm/active-model".into(), json!({"model_id": "x"})),
        ("/api/llm/active-model".into(), json!({"model_id": "x"})),
    ]
}

/// Every endpoint that needs a signed-in caller.
fn authenticated_endpoints(session: &str) -> Vec<(Method, String)> {
    let mut out = vec![
        (Method::GET, "/api/v1/users/me".to_string()),
        (Method::GET, "/api/v1/admin/users/me".into()),
        (Method::GET, "/api/v1/admin/chat/sessions".into()),
        (
            Method::GET,
            format!("/api/v1/admin/chat/sessions/{session}"),
        ),
        (
            Method::DELETE,
            format!("/api/v1/admin/chat/sessions/{session}"),
        ),
        (
            Method::POST,
            format!("/api/v1/admin/chat/sessions/{session}/close"),
        ),
        (
            Method::POST,
            format!("/api/v1/admin/chat/sessions/{session}/restore"),
        ),
        (Method::GET, "/api/v1/admin/chat/metrics/ai".into()),
        // Refused before the id is looked up, so any id does.
        (
            Method::PATCH,
            format!("/api/v1/admin/users/{}", uuid::Uuid::nil()),
        ),
    ];
    for base in ["/api/v1", "/api"] {
        out.push((Method::POST, format!("{base}/chat/send")));
        out.push((Method::POST, format!("{base}/chat/stream")));
        out.push((Method::GET, format!("{base}/llm/models")));
        out.push((Method::GET, format!("{base}/llm/providers")));
        out.push((Method::POST, format!("{base}/llm/active-model")));
    }
    for base in ["/api/v1/chat/sessions", "/api/chat/sessions"] {
        out.push((Method::GET, base.to_string()));
        out.push((Method::POST, base.to_string()));
        out.push((Method::GET, format!("{base}/{session}")));
        out.push((Method::GET, format!("{base}/{session}/messages")));
        out.push((Method::POST, format!("{base}/{session}/messages")));
    }
    out
}

/// Paths that take a conversation id, with `{id}` where it goes.
fn id_endpoints() -> Vec<(Method, &'static str)> {
    vec![
        (Method::GET, "/api/v1/chat/sessions/{id}"),
        (Method::GET, "/api/chat/sessions/{id}"),
        (Method::GET, "/api/v1/chat/sessions/{id}/messages"),
        (Method::GET, "/api/chat/sessions/{id}/messages"),
        (Method::POST, "/api/v1/chat/sessions/{id}/messages"),
        (Method::POST, "/api/chat/sessions/{id}/messages"),
        (Method::GET, "/api/v1/admin/chat/sessions/{id}"),
        (Method::DELETE, "/api/v1/admin/chat/sessions/{id}"),
        (Method::POST, "/api/v1/admin/chat/sessions/{id}/close"),
        (Method::POST, "/api/v1/admin/chat/sessions/{id}/restore"),
    ]
}

async fn send_body(
    app: &TestApp,
    path: &str,
    token: &str,
    content_type: Option<&str>,
    body: impl Into<reqwest::Body>,
) -> reqwest::Response {
    let mut req = app.request(Method::POST, path, Some(token)).body(body);
    if let Some(ct) = content_type {
        req = req.header(CONTENT_TYPE, ct);
    }
    req.send().await.unwrap()
}

#[tokio::test]
async fn malformed_json_is_400_saying_what_is_wrong() {
    let app = spawn_app().await;
    let w = world(&app).await;
    let before = app.counts().await;
    for (path, _) in json_endpoints(&w.session) {
        for body in [
            "{\"content\":",
            "{not json}",
            "[1, 2",
            "{\"title\": \"x\",}",
            "\u{feff}{}",
            "\"just a string\"",
            "null",
            "42",
        ] {
            let res = send_body(
                &app,
                &path,
                &w.agent.access_token,
                Some("application/json"),
                body,
            )
            .await;
            let err = assert_error(res, 400, "invalid_json").await;
            let message = err["message"].as_str().unwrap();
            assert!(
                message.contains("line")
                    || message.contains("expected")
                    || message.contains("invalid"),
                "{path} {body:?}: the message does not say what is wrong: {message}"
            );
        }
    }
    assert_eq!(app.counts().await, before);
}

#[tokio::test]
async fn oversized_bodies_are_413() {
    let app = spawn_app_with(|s| {
        s.server.max_body_bytes = 1024;
        s.chat.max_message_bytes = 100;
    })
    .await;
    let w = world(&app).await;
    let before = app.counts().await;
    let big = json!({"content": "x".repeat(2000), "title": "x".repeat(2000)}).to_string();
    for (path, _) in json_endpoints(&w.session) {
        // The server answers before reading such a body; a fresh connection for each keeps
        // the unread rest from meeting the next request.
        let res = app
            .request(Method::POST, &path, Some(&w.agent.access_token))
            .header(CONTENT_TYPE, "application/json")
            .header("connection", "close")
            .body(big.clone())
            .send()
            .await
            .unwrap();
        assert_error(res, 413, "payload_too_large").await;
    }
    // Within the body limit but over the message limit.
    let res = app
        .post_message(&w.agent.access_token, &w.session, &"é".repeat(51), None)
        .await;
    let err = assert_error(res, 413, "message_too_large").await;
    assert!(err["message"].as_str().unwrap().contains("100"), "{err}");
    // Exactly at the limit is fine.
    let res = app
        .post_message(&w.agent.access_token, &w.session, &"é".repeat(50), None)
        .await;
    expect_json(res, 201).await;
    let after = app.counts().await;
    assert_eq!(after.messages, before.messages + 1);
    assert_eq!(
        (after.users, after.sessions),
        (before.users, before.sessions)
    );
}

#[tokio::test]
async fn a_body_that_is_not_json_typed_is_415() {
    let app = spawn_app().await;
    let w = world(&app).await;
    let before = app.counts().await;
    for (path, body) in json_endpoints(&w.session) {
        for content_type in [
            Some("text/plain"),
            Some("application/x-www-form-urlencoded"),
            Some("multipart/form-data; boundary=x"),
            Some("not a mime type"),
            None,
        ] {
            let res = send_body(
                &app,
                &path,
                &w.agent.access_token,
                content_type,
                body.to_string(),
            )
            .await;
            let err = assert_error(res, 415, "unsupported_media_type").await;
            assert!(
                err["message"]
                    .as_str()
                    .unwrap()
                    .contains("application/json"),
                "{err}"
            );
        }
    }
    assert_eq!(app.counts().await, before);
    // JSON with a charset, or a +json type, is JSON.
    for content_type in [
        "application/json; charset=utf-8",
        "application/vnd.switchboard+json",
    ] {
        let res = send_body(
            &app,
            "/api/v1/chat/sessions",
            &w.customer.access_token,
            Some(content_type),
            "{\"title\":\"ok\"}",
        )
        .await;
        expect_json(res, 201).await;
    }
    // No body at all needs no content type.
    expect_json(
        app.post("/api/v1/chat/sessions", &w.customer.access_token)
            .await,
        201,
    )
    .await;
}

#[tokio::test]
async fn missing_fields_and_wrong_types_are_400() {
    let app = spawn_app().await;
    let w = world(&app).await;
    let before = app.counts().await;
    let messages = format!("/api/v1/chat/sessions/{}/messages", w.session);
    let cases: Vec<(&str, Value, &str)> = vec![
        (
            "/api/v1/auth/login",
            json!({"email": "agent@example.com"}),
            "invalid_json",
        ),
        (
            "/api/v1/auth/login",
            json!({"password": "correct horse battery"}),
            "invalid_json",
        ),
        (
            "/api/v1/auth/login",
            json!({"email": 1, "password": "x"}),
            "invalid_json",
        ),
        (
            "/api/v1/auth/login",
            json!({"email": ["a"], "password": {}}),
            "invalid_json",
        ),
        (
            "/api/v1/auth/login",
            json!({"email": "agent@example.com", "password": "correct horse battery", "role": "admin"}),
            "invalid_json",
        ),
        ("/api/v1/auth/login", json!({}), "invalid_json"),
        ("/api/v1/auth/refresh", json!({}), "invalid_json"),
        (
            "/api/v1/auth/refresh",
            json!({"refresh_token": null}),
            "invalid_json",
        ),
        (
            "/api/v1/auth/refresh",
            json!({"refresh_token": 12}),
            "invalid_json",
        ),
        ("/api/v1/chat/sessions", json!({"title": 5}), "invalid_json"),
        (
            "/api/v1/chat/sessions",
            json!({"title": "x", "user_id": "someone"}),
            "invalid_json",
        ),
        (
            "/api/v1/chat/sessions",
            json!({"title": "a\u{0}b"}),
            "bad_request",
        ),
        (
            "/api/v1/chat/sessions",
            json!({"title": "x".repeat(201)}),
            "bad_request",
        ),
        (&messages, json!({}), "invalid_json"),
        (&messages, json!({"content": 5}), "invalid_json"),
        (&messages, json!({"content": null}), "invalid_json"),
        (
            &messages,
            json!({"content": "hi", "client_id": 7}),
            "invalid_json",
        ),
        (
            &messages,
            json!({"content": "hi", "seq": 99}),
            "invalid_json",
        ),
        (&messages, json!({"content": ""}), "empty_message"),
        (&messages, json!({"content": " \n\t "}), "empty_message"),
        (&messages, json!({"content": "a\u{0}b"}), "invalid_content"),
        (
            &messages,
            json!({"content": "hi", "client_id": ""}),
            "invalid_client_id",
        ),
        (
            &messages,
            json!({"content": "hi", "client_id": "has space"}),
            "invalid_client_id",
        ),
        (
            &messages,
            json!({"content": "hi", "client_id": "x".repeat(65)}),
            "invalid_client_id",
        ),
        (
            &messages,
            json!({"content": "hi", "client_id": "nul\u{0}"}),
            "invalid_client_id",
        ),
        (
            &messages,
            json!({"content": "hi", "client_id": "ünï"}),
            "invalid_client_id",
        ),
    ];
    let mut cases: Vec<(&str, Value, &str)> = cases;
    for ask in ["/api/v1/chat/send", "/api/chat/stream"] {
        let sid = w.session.as_str();
        cases.extend([
            (ask, json!({}), "invalid_json"),
            (ask, json!({"session_id": sid}), "invalid_json"),
            (ask, json!({"message": "hi"}), "invalid_json"),
            (
                ask,
                json!({"session_id": 7, "message": "hi"}),
                "invalid_json",
            ),
            (
                ask,
                json!({"session_id": sid, "message": null}),
                "invalid_json",
            ),
            (
                ask,
                json!({"session_id": sid, "message": "hi", "model": "x"}),
                "invalid_json",
            ),
            (
                ask,
                json!({"session_id": sid, "message": ""}),
                "empty_message",
            ),
            (
                ask,
                json!({"session_id": sid, "message": "a\u{0}b"}),
                "invalid_content",
            ),
        ]);
    }
    for (path, body, code) in cases {
        let res = app.post_json(path, &w.customer.access_token, &body).await;
        let err = assert_error(res, 400, code).await;
        if code == "invalid_json" {
            // serde names the field or the type it wanted.
            let message = err["message"].as_str().unwrap();
            assert!(
                message.contains('`')
                    || message.contains("expected")
                    || message.contains("missing"),
                "{path} {body}: {message}"
            );
        }
    }
    assert_eq!(app.counts().await, before);
}

#[tokio::test]
async fn missing_and_forged_tokens_are_401_everywhere() {
    let app = spawn_app().await;
    let w = world(&app).await;
    let before = app.counts().await;
    let forged = sign_with(
        &app.access_claims(&w.agent.user_id, "admin"),
        "a-secret-that-is-not-the-servers-0123456789",
    );
    for (method, path) in authenticated_endpoints(&w.session) {
        for token in [
            None,
            Some(forged.as_str()),
            Some("garbage"),
            Some(w.agent.refresh_token.as_str()),
        ] {
            let mut req = app.request(method.clone(), &path, token);
            if method == Method::POST {
                req = req.json(&json!({"content": "x", "title": "x"}));
            }
            let res = req.send().await.unwrap();
            assert_eq!(res.status(), 401, "{method} {path} with {token:?}");
            assert_error(res, 401, "unauthorized").await;
        }
    }
    assert_eq!(app.counts().await, before);
    assert_eq!(
        app.session_as_staff(&w.agent.access_token, &w.session)
            .await["status"],
        "active"
    );
}

#[tokio::test]
async fn customers_get_403_on_staff_paths() {
    let app = spawn_app().await;
    let w = world(&app).await;
    let before = app.counts().await;
    for (method, path) in authenticated_endpoints(&w.session) {
        if !path.contains("/admin/") {
            continue;
        }
        let res = app
            .request(method.clone(), &path, Some(&w.customer.access_token))
            .send()
            .await
            .unwrap();
        assert_error(res, 403, "forbidden").await;
    }
    assert_eq!(app.counts().await, before);
    assert_eq!(
        app.session_as_staff(&w.agent.access_token, &w.session)
            .await["status"],
        "active"
    );
}

#[tokio::test]
async fn nobody_posts_under_another_role() {
    let app = spawn_app().await;
    let w = world(&app).await;
    let before = app.counts().await;
    let path = format!("/api/v1/chat/sessions/{}/messages", w.session);
    for (token, role) in [
        (&w.customer.access_token, "agent"),
        (&w.customer.access_token, "assistant"),
        (&w.customer.access_token, "system"),
        (&w.agent.access_token, "user"),
        (&w.agent.access_token, "assistant"),
        (&w.agent.access_token, "admin"),
    ] {
        let res = app
            .post_json(&path, token, &json!({"content": "trust me", "role": role}))
            .await;
        assert_error(res, 403, "forbidden").await;
    }
    assert_eq!(app.counts().await, before);
}

/// Ids that no conversation has, percent-encoded for the path.
const HOSTILE_IDS: &[&str] = &[
    "not-a-uuid",
    "00000000-0000-0000-0000-000000000000",
    "%00",
    "abc%00def",
    "%27%20OR%20%271%27%3D%271",
    "1%3B%20DROP%20TABLE%20chat_sessions%3B%20--",
    "%E6%97%A5%E6%9C%AC%E8%AA%9E",
    "%F0%9F%92%A5",
    "%FF%FE",
    "..%2F..%2Fetc%2Fpasswd",
    "%25",
    "%20",
];

#[tokio::test]
async fn unknown_and_hostile_ids_are_404() {
    let app = spawn_app().await;
    let w = world(&app).await;
    let before = app.counts().await;
    let long = "a".repeat(5000);
    let random = uuid::Uuid::new_v4().to_string();
    let ids: Vec<&str> = HOSTILE_IDS
        .iter()
        .copied()
        .chain([long.as_str(), &random])
        .collect();
    for (method, template) in id_endpoints() {
        for id in &ids {
            let path = template.replace("{id}", id);
            for token in [&w.customer.access_token, &w.agent.access_token] {
                let mut req = app.request(method.clone(), &path, Some(token));
                if method == Method::POST {
                    req = req.json(&json!({"content": "x"}));
                }
                let res = req.send().await.unwrap();
                let status = res.status().as_u16();
                // A customer is refused staff paths before any lookup.
                if template.contains("/admin/") && token == &w.customer.access_token {
                    assert_error(res, 403, "forbidden").await;
                } else {
                    assert_eq!(status, 404, "{method} {path}");
                    assert_error(res, 404, "not_found").await;
                }
            }
        }
    }
    assert_eq!(app.counts().await, before);
}

/// A question to the AI names its conversation in the body; the same ids, as typed.
#[tokio::test]
async fn unknown_and_hostile_ids_in_a_question_are_404() {
    let app = spawn_app().await;
    let w = world(&app).await;
    let before = app.counts().await;
    let long = "a".repeat(5000);
    for path in ["/api/v1/chat/send", "/api/chat/stream"] {
        for id in [
            "not-a-uuid",
            "00000000-0000-0000-0000-000000000000",
            "\u{0}",
            "abc\u{0}def",
            "' OR '1'='1",
            "1; DROP TABLE chat_sessions; --",
            "日本語",
            "../../etc/passwd",
            "",
            long.as_str(),
        ] {
            let res = app
                .post_json(
                    path,
                    &w.customer.access_token,
                    &json!({"session_id": id, "message": "hi"}),
                )
                .await;
            assert_eq!(res.status(), 404, "{path} {id:?}");
            assert_error(res, 404, "not_found").await;
        }
    }
    assert_eq!(app.counts().await, before);
}

#[tokio::test]
async fn hostile_query_strings_and_cursors_are_400() {
    let app = spawn_app().await;
    let w = world(&app).await;
    let before = app.counts().await;
    use base64::Engine;
    let b64 = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
    let nul_cursor = b64("1700000000000000|ab\0cd");
    let messages = format!("/api/v1/chat/sessions/{}/messages", w.session);
    let mut cases: Vec<String> = Vec::new();
    for list in [
        "/api/v1/chat/sessions",
        "/api/chat/sessions",
        "/api/v1/admin/chat/sessions",
    ] {
        for query in [
            "cursor=%00".to_string(),
            "cursor=not%20base64!".into(),
            format!("cursor={nul_cursor}"),
            format!("cursor={}", b64("x|y")),
            format!("cursor={}", b64("99999999999999999999999|y")),
            format!("cursor={}", "A".repeat(10_000)),
            "limit=0".into(),
            "limit=-1".into(),
            "limit=1%3B%20DROP%20TABLE%20users".into(),
            "limit=99999999999999999999999".into(),
            "limit=%00".into(),
            "unknown=1".into(),
        ] {
            cases.push(format!("{list}?{query}"));
        }
    }
    for query in [
        "status=bogus",
        "status=active%27%20OR%20%271%27%3D%271",
        "status=%00",
    ] {
        cases.push(format!("/api/v1/admin/chat/sessions?{query}"));
    }
    // The customer list takes no status filter.
    cases.push("/api/v1/chat/sessions?status=active".into());
    for base in [messages.clone(), messages.replace("/api/v1/", "/api/")] {
        for query in [
            "cursor=abc",
            "cursor=%00",
            "cursor=1e3",
            "cursor=1.5",
            "cursor=99999999999999999999",
            "cursor=1%20OR%201%3D1",
            "order=sideways",
            "order=%00",
            "order=asc%3B%20DROP%20TABLE%20chat_messages",
            "limit=0",
            "limit=x",
            "unknown=1",
        ] {
            cases.push(format!("{base}?{query}"));
        }
    }
    for path in cases {
        let res = app.get(&path, &w.agent.access_token).await;
        assert_eq!(res.status(), 400, "{path}");
        assert_error(res, 400, "bad_request").await;
    }
    assert_eq!(app.counts().await, before);
    // A cursor of the right form whose id is hostile is only a position: a normal page.
    for id in ["' OR '1'='1", "日本語", "x".repeat(300).as_str()] {
        let cursor = b64(&format!("1900000000000000|{id}"));
        let res = app
            .get(
                &format!("/api/v1/admin/chat/sessions?cursor={cursor}"),
                &w.agent.access_token,
            )
            .await;
        expect_json(res, 200).await;
    }
}

#[tokio::test]
async fn hostile_text_is_stored_exactly_as_typed() {
    let app = spawn_app().await;
    let w = world(&app).await;
    let texts = [
        "'); DROP TABLE chat_messages; --",
        "\" OR 1=1; SELECT * FROM users WHERE ''='",
        "<script>alert('x')</script><img src=x onerror=alert(1)>",
        "Ünïcödé — 日本語 — العربية — 👩‍👩‍👧‍👦 — e\u{301}",
        "\u{202e}reversed\u{202c} and zero\u{200b}width",
        "line one\r\nline two\ttabbed \\ backslash %00 %s {{template}}",
        "\u{1}\u{7f}\u{fffd}",
    ];
    for (i, text) in texts.iter().enumerate() {
        let res = app
            .post_message(&w.agent.access_token, &w.session, text, None)
            .await;
        let stored = expect_json(res, 201).await;
        assert_eq!(stored["content"], *text);
        let page = expect_json(
            app.get(
                &format!(
                    "/api/v1/chat/sessions/{}/messages?cursor={}&limit=1",
                    w.session,
                    i + 1
                ),
                &w.customer.access_token,
            )
            .await,
            200,
        )
        .await;
        assert_eq!(page["messages"][0]["content"], *text);
        let session = app.create_session(&w.customer.access_token, text).await;
        assert_eq!(session["title"], text.trim());
    }
    // The tables are still there and hold what they should.
    let counts = app.counts().await;
    assert_eq!(counts.messages, 1 + texts.len() as i64);
    assert_eq!(counts.sessions, 1 + texts.len() as i64);
}

#[tokio::test]
async fn hostile_sign_ins_are_401() {
    let app = spawn_app().await;
    let _agent_and_customer = world(&app).await;
    let before = app.counts().await;
    for (email, password) in [
        ("a\u{0}b@example.com", "correct horse battery"),
        ("agent@example.com\u{0}", "correct horse battery"),
        ("' OR '1'='1", "' OR '1'='1"),
        ("agent@example.com' --", "x"),
        ("日本語@例え.テスト", "パスワード"),
        (&"a".repeat(10_000), "x"),
        ("agent@example.com", &"p".repeat(5000)),
        ("agent@example.com", "correct horse battery\u{0}"),
    ] {
        let res = app
            .client
            .post(app.url("/api/v1/auth/login"))
            .json(&json!({"email": email, "password": password}))
            .send()
            .await
            .unwrap();
        assert_error(res, 401, "invalid_credentials").await;
    }
    for token in ["\u{0}", "a.b.c\u{0}", &"x".repeat(50_000)] {
        let res = app
            .client
            .post(app.url("/api/v1/auth/refresh"))
            .json(&json!({"refresh_token": token}))
            .send()
            .await
            .unwrap();
        assert_error(res, 401, "unauthorized").await;
    }
    assert_eq!(app.counts().await, before);
    // The real password still works.
    app.login("agent@example.com", "correct horse battery")
        .await;
}
