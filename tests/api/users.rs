//! An admin changing accounts over HTTP (`PATCH /api/v1/admin/users/{id}`): the answer, the
//! effect on the account's requests and live sockets, and everything that must be refused.

use std::time::Duration;

use reqwest::header::CONTENT_TYPE;
use reqwest::Method;
use serde_json::{json, Value};
use switchboard::config::HumanDuration;
use switchboard::db::models::{user, Role};

use crate::helpers::{assert_error, expect_json, spawn_app_with, Signed, TestApp};
use crate::ws::{Drained, WsClient};

/// A server whose periodic account check never runs during a test: a socket closed here was
/// closed by the change itself.
async fn app() -> TestApp {
    spawn_app_with(|s| s.realtime.account_check_interval = HumanDuration::from_secs(3600)).await
}

fn path(id: &str) -> String {
    format!("/api/v1/admin/users/{id}")
}

async fn patch(app: &TestApp, token: &str, id: &str, body: &Value) -> reqwest::Response {
    app.request(Method::PATCH, &path(id), Some(token))
        .json(body)
        .send()
        .await
        .unwrap()
}

/// The stored (role, is_active) of a user.
async fn stored(app: &TestApp, id: &str) -> (String, bool) {
    let id = id.to_string();
    app.with_db(move |c| {
        let u = user::find(c, &id).unwrap().expect("the user exists");
        (u.role, u.is_active)
    })
    .await
}

/// Reads the socket until it closes; returns what it said last before closing.
async fn closed_with(ws: &mut WsClient) -> (Drained, String) {
    let drained = ws
        .drain(Duration::from_secs(15))
        .await
        .unwrap_or_else(|d| panic!("the socket is still open: {:?}", d.frames));
    let code = drained
        .frames
        .iter()
        .rev()
        .find(|f| f["type"] == "error")
        .unwrap_or_else(|| panic!("not told why: {drained:?}"))["code"]
        .as_str()
        .unwrap()
        .to_string();
    (drained, code)
}

struct People {
    admin: Signed,
    agent: Signed,
    carol: Signed,
}

async fn people(app: &TestApp) -> People {
    People {
        admin: app.user("admin@example.com", Role::Admin).await,
        agent: app.user("agent@example.com", Role::Agent).await,
        carol: app.user("carol@example.com", Role::Customer).await,
    }
}

#[tokio::test]
async fn deactivating_an_account_closes_its_sockets_at_once_and_locks_it_out() {
    let app = app().await;
    let p = people(&app).await;
    let mut first = WsClient::customer(&app, &p.carol.access_token).await;
    let mut second = WsClient::customer(&app, &p.carol.access_token).await;
    let mut bystander = WsClient::customer(&app, &p.agent.access_token).await;
    first.ping("live").await;
    second.ping("live").await;

    let res = patch(
        &app,
        &p.admin.access_token,
        &p.carol.user_id,
        &json!({"is_active": false}),
    )
    .await;
    let body = expect_json(res, 200).await;
    assert_eq!(body["id"], p.carol.user_id.as_str(), "{body}");
    assert_eq!(body["is_active"], false, "{body}");
    assert_eq!(body["role"], "customer", "{body}");

    for ws in [&mut first, &mut second] {
        let (drained, code) = closed_with(ws).await;
        assert_eq!(code, "account_disabled", "{drained:?}");
        assert_eq!(drained.close_code, Some(1008), "{drained:?}");
    }
    // Another account's socket is untouched.
    bystander.ping("still here").await;
    assert_error(
        app.get("/api/v1/users/me", &p.carol.access_token).await,
        401,
        "account_disabled",
    )
    .await;
    assert_eq!(
        stored(&app, &p.carol.user_id).await,
        ("customer".into(), false)
    );

    // Turned back on, the same account signs in and connects again.
    let res = patch(
        &app,
        &p.admin.access_token,
        &p.carol.user_id,
        &json!({"is_active": true}),
    )
    .await;
    assert_eq!(expect_json(res, 200).await["is_active"], true);
    let again = app
        .login("carol@example.com", "correct horse battery")
        .await;
    WsClient::customer(&app, &again.access_token)
        .await
        .ping("back")
        .await;
}

#[tokio::test]
async fn a_role_change_closes_the_dashboard_and_takes_effect_on_the_next_request() {
    let app = app().await;
    let p = people(&app).await;
    let mut desk = WsClient::staff(&app, &p.agent.access_token).await;
    desk.next_of("snapshot").await;

    let res = patch(
        &app,
        &p.admin.access_token,
        &p.agent.user_id,
        &json!({"role": "customer"}),
    )
    .await;
    let body = expect_json(res, 200).await;
    assert_eq!(body["role"], "customer", "{body}");
    assert_eq!(body["is_active"], true, "{body}");
    let (drained, code) = closed_with(&mut desk).await;
    assert_eq!(code, "role_changed", "{drained:?}");
    assert_eq!(drained.close_code, Some(1008), "{drained:?}");
    assert_error(
        app.get("/api/v1/admin/chat/sessions", &p.agent.access_token)
            .await,
        403,
        "forbidden",
    )
    .await;

    // Promoted, a customer reaches the staff paths with the token they already hold.
    let res = patch(
        &app,
        &p.admin.access_token,
        &p.carol.user_id,
        &json!({"role": "agent"}),
    )
    .await;
    expect_json(res, 200).await;
    expect_json(
        app.get("/api/v1/admin/chat/sessions", &p.carol.access_token)
            .await,
        200,
    )
    .await;

    // Both fields at once; a change that changes nothing closes nothing.
    let mut carol_ws = WsClient::staff(&app, &p.carol.access_token).await;
    carol_ws.next_of("snapshot").await;
    let res = patch(
        &app,
        &p.admin.access_token,
        &p.carol.user_id,
        &json!({"role": "agent", "is_active": true}),
    )
    .await;
    expect_json(res, 200).await;
    carol_ws.ping("unchanged").await;
    let res = patch(
        &app,
        &p.admin.access_token,
        &p.carol.user_id,
        &json!({"role": "admin", "is_active": false}),
    )
    .await;
    let body = expect_json(res, 200).await;
    assert_eq!(
        (&body["role"], &body["is_active"]),
        (&json!("admin"), &json!(false))
    );
    let (drained, code) = closed_with(&mut carol_ws).await;
    assert_eq!(code, "account_disabled", "{drained:?}");
}

#[tokio::test]
async fn only_admins_change_accounts() {
    let app = app().await;
    let p = people(&app).await;
    let mut carol_ws = WsClient::customer(&app, &p.carol.access_token).await;
    let change = json!({"is_active": false});
    for token in [&p.agent.access_token, &p.carol.access_token] {
        assert_error(
            patch(&app, token, &p.carol.user_id, &change).await,
            403,
            "forbidden",
        )
        .await;
    }
    let res = app
        .request(Method::PATCH, &path(&p.carol.user_id), None)
        .json(&change)
        .send()
        .await
        .unwrap();
    assert_error(res, 401, "unauthorized").await;
    // An agent may not promote themselves either.
    let res = patch(
        &app,
        &p.agent.access_token,
        &p.agent.user_id,
        &json!({"role": "admin"}),
    )
    .await;
    assert_error(res, 403, "forbidden").await;

    assert_eq!(
        stored(&app, &p.carol.user_id).await,
        ("customer".into(), true)
    );
    assert_eq!(stored(&app, &p.agent.user_id).await, ("agent".into(), true));
    carol_ws.ping("untouched").await;
    // Other methods on the path are 405, not a way around the check.
    let res = app
        .request(
            Method::PUT,
            &path(&p.carol.user_id),
            Some(&p.admin.access_token),
        )
        .json(&change)
        .send()
        .await
        .unwrap();
    assert_error(res, 405, "method_not_allowed").await;
}

#[tokio::test]
async fn an_admin_cannot_lock_themselves_out() {
    let app = app().await;
    let p = people(&app).await;
    let mut desk = WsClient::staff(&app, &p.admin.access_token).await;
    desk.next_of("snapshot").await;
    for change in [
        json!({"is_active": false}),
        json!({"role": "agent"}),
        json!({"role": "customer"}),
        json!({"role": "admin", "is_active": false}),
        json!({"role": "customer", "is_active": true}),
    ] {
        let res = patch(&app, &p.admin.access_token, &p.admin.user_id, &change).await;
        let err = assert_error(res, 400, "own_account").await;
        assert!(
            err["message"].as_str().unwrap().contains("another admin"),
            "{err}"
        );
    }
    assert_eq!(stored(&app, &p.admin.user_id).await, ("admin".into(), true));
    desk.ping("still connected").await;
    // Changing nothing about oneself is allowed.
    let res = patch(
        &app,
        &p.admin.access_token,
        &p.admin.user_id,
        &json!({"role": "admin", "is_active": true}),
    )
    .await;
    expect_json(res, 200).await;
    desk.ping("still connected").await;
    // Another admin may.
    let other = app.user("other-admin@example.com", Role::Admin).await;
    let res = patch(
        &app,
        &other.access_token,
        &p.admin.user_id,
        &json!({"role": "agent"}),
    )
    .await;
    expect_json(res, 200).await;
    let (_, code) = closed_with(&mut desk).await;
    assert_eq!(code, "role_changed");
}

#[tokio::test]
async fn bad_changes_are_refused_and_change_nothing() {
    let app = app().await;
    let p = people(&app).await;
    let guest = app.guest().await;
    let mut carol_ws = WsClient::customer(&app, &p.carol.access_token).await;
    let admin = &p.admin.access_token;
    let carol = &p.carol.user_id;
    let before = app.counts().await;

    // No body at all says nothing to change either.
    let res = app
        .request(Method::PATCH, &path(carol), Some(admin))
        .send()
        .await
        .unwrap();
    assert_error(res, 400, "bad_request").await;
    for body in [
        json!({}),
        json!({"is_active": null}),
        json!({"role": null, "is_active": null}),
    ] {
        let err = assert_error(patch(&app, admin, carol, &body).await, 400, "bad_request").await;
        assert!(
            err["message"].as_str().unwrap().contains("is_active"),
            "{err}"
        );
    }
    for body in [
        json!({"role": "superuser"}),
        json!({"role": "Admin"}),
        json!({"role": ""}),
        json!({"role": 1}),
        json!({"is_active": "false"}),
        json!({"is_active": 0}),
        json!({"is_active": false, "email": "x@example.com"}),
        json!({"password": "new password"}),
        json!([{"is_active": false}]),
        json!("is_active"),
        json!(null),
    ] {
        let res = patch(&app, admin, carol, &body).await;
        assert_error(res, 400, "invalid_json").await;
    }
    for raw in ["{\"is_active\": false", "{not json}", "\u{feff}{}"] {
        let res = app
            .request(Method::PATCH, &path(carol), Some(admin))
            .header(CONTENT_TYPE, "application/json")
            .body(raw)
            .send()
            .await
            .unwrap();
        assert_error(res, 400, "invalid_json").await;
    }
    for content_type in [
        Some("text/plain"),
        Some("application/x-www-form-urlencoded"),
        None,
    ] {
        let mut req = app
            .request(Method::PATCH, &path(carol), Some(admin))
            .body("{\"is_active\": false}");
        if let Some(ct) = content_type {
            req = req.header(CONTENT_TYPE, ct);
        }
        let res = req.send().await.unwrap();
        assert_error(res, 415, "unsupported_media_type").await;
    }
    let huge = json!({"is_active": false, "pad": "x".repeat(200_000)}).to_string();
    let res = app
        .request(Method::PATCH, &path(carol), Some(admin))
        .header(CONTENT_TYPE, "application/json")
        .header("connection", "close")
        .body(huge)
        .send()
        .await
        .unwrap();
    assert_error(res, 413, "payload_too_large").await;

    // A guest's token is handed to anyone with the chat widget: it never becomes staff.
    for role in ["agent", "admin"] {
        let res = patch(&app, admin, &guest.user_id, &json!({"role": role})).await;
        let err = assert_error(res, 400, "bad_request").await;
        assert!(err["message"].as_str().unwrap().contains("guest"), "{err}");
    }
    assert_eq!(
        stored(&app, &guest.user_id).await,
        ("customer".into(), true)
    );

    // Unknown and hostile ids are simply not found.
    let long = "a".repeat(5000);
    let random = uuid::Uuid::new_v4().to_string();
    for id in [
        random.as_str(),
        "not-a-uuid",
        "%00",
        "abc%00def",
        "%27%20OR%20%271%27%3D%271",
        "%F0%9F%92%A5",
        "%FF%FE",
        "%20",
        long.as_str(),
    ] {
        let res = patch(&app, admin, id, &json!({"is_active": false})).await;
        assert_error(res, 404, "not_found").await;
    }

    assert_eq!(app.counts().await, before);
    assert_eq!(stored(&app, carol).await, ("customer".into(), true));
    carol_ws.ping("untouched").await;
}
