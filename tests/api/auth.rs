//! Sign-in, refresh, guests, `me`, and every way a token can be wrong.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use reqwest::Method;
use serde_json::{json, Value};
use switchboard::db::models::Role;

use crate::helpers::{assert_error, expect_json, sign_with, spawn_app, Signed, TestApp};

const PASSWORD: &str = "correct horse battery";

async fn login_raw(app: &TestApp, email: &str, password: &str) -> reqwest::Response {
    app.client
        .post(app.url("/api/v1/auth/login"))
        .json(&json!({ "email": email, "password": password }))
        .send()
        .await
        .unwrap()
}

async fn refresh_raw(app: &TestApp, refresh_token: &str) -> reqwest::Response {
    app.client
        .post(app.url("/api/v1/auth/refresh"))
        .json(&json!({ "refresh_token": refresh_token }))
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn login_returns_tokens_and_the_user() {
    let app = spawn_app().await;
    let id = app
        .create_user("ops@example.com", Role::Agent, PASSWORD)
        .await;
    // Emails are matched without regard to case or surrounding blanks.
    let body = expect_json(login_raw(&app, "  Ops@Example.COM ", PASSWORD).await, 200).await;
    assert_eq!(body["token_type"], "Bearer", "{body}");
    assert_eq!(
        body["expires_in"].as_u64(),
        Some(app.settings.auth.jwt_expiry.get().as_secs()),
        "{body}"
    );
    assert!(body["access_token"]
        .as_str()
        .is_some_and(|t| t.split('.').count() == 3));
    assert!(body["refresh_token"]
        .as_str()
        .is_some_and(|t| !t.is_empty()));
    assert_eq!(
        body["user"],
        json!({
            "id": id,
            "email": "ops@example.com",
            "role": "agent",
            "is_active": true,
            "is_guest": false,
        })
    );
    assert!(
        !body.to_string().contains("argon2"),
        "a hash leaked: {body}"
    );
    let me = expect_json(
        app.get("/api/v1/users/me", body["access_token"].as_str().unwrap())
            .await,
        200,
    )
    .await;
    assert_eq!(me["id"], id);
}

/// A wrong password and an unknown email look the same, so emails cannot be probed.
#[tokio::test]
async fn wrong_password_and_unknown_email_are_the_same_401() {
    let app = spawn_app().await;
    app.create_user("known@example.com", Role::Customer, PASSWORD)
        .await;
    let guest = app.guest().await;
    let guest_email = expect_json(app.get("/api/v1/users/me", &guest.access_token).await, 200)
        .await["email"]
        .as_str()
        .unwrap()
        .to_string();
    let mut answers = Vec::new();
    for (email, password) in [
        ("known@example.com", "wrong horse battery"),
        ("unknown@example.com", PASSWORD),
        ("known@example.com", ""),
        ("", PASSWORD),
        // A guest has no password: no password signs it in.
        (guest_email.as_str(), ""),
        (guest_email.as_str(), PASSWORD),
    ] {
        let res = login_raw(&app, email, password).await;
        assert_eq!(res.headers()["www-authenticate"], "Bearer");
        let body = assert_error(res, 401, "invalid_credentials").await;
        answers.push(body);
    }
    assert!(answers.windows(2).all(|w| w[0] == w[1]), "{answers:?}");
}

#[tokio::test]
async fn a_deactivated_user_cannot_sign_in() {
    let app = spawn_app().await;
    app.create_user("gone@example.com", Role::Agent, PASSWORD)
        .await;
    app.set_user("gone@example.com", None, Some(false)).await;
    assert_error(
        login_raw(&app, "gone@example.com", PASSWORD).await,
        401,
        "account_disabled",
    )
    .await;
    // The wrong password still says only that the credentials are wrong.
    assert_error(
        login_raw(&app, "gone@example.com", "wrong horse battery").await,
        401,
        "invalid_credentials",
    )
    .await;
}

#[tokio::test]
async fn refresh_rotates_and_a_reused_token_revokes_its_family() {
    let app = spawn_app().await;
    let first = app.user("cust@example.com", Role::Customer).await;
    let other_sign_in = app.login("cust@example.com", PASSWORD).await;

    let second =
        Signed::from_body(&expect_json(refresh_raw(&app, &first.refresh_token).await, 200).await);
    assert_ne!(second.refresh_token, first.refresh_token);
    assert_ne!(second.access_token, first.access_token);
    assert_eq!(second.user_id, first.user_id);
    expect_json(app.get("/api/v1/users/me", &second.access_token).await, 200).await;

    // The spent token is refused, and its whole family with it: the token it was exchanged
    // for no longer works either (whoever holds a stolen copy is shut out too).
    let body = assert_error(
        refresh_raw(&app, &first.refresh_token).await,
        401,
        "unauthorized",
    )
    .await;
    assert!(
        body["message"].as_str().unwrap().contains("already used"),
        "{body}"
    );
    assert_error(
        refresh_raw(&app, &second.refresh_token).await,
        401,
        "unauthorized",
    )
    .await;
    // Another sign-in of the same user is another family and still works.
    expect_json(refresh_raw(&app, &other_sign_in.refresh_token).await, 200).await;
}

#[tokio::test]
async fn refresh_takes_the_token_as_bearer_and_only_a_refresh_token() {
    let app = spawn_app().await;
    let signed = app.user("cust@example.com", Role::Customer).await;
    // With no body, the refresh token may come as `Authorization: Bearer`.
    let res = app
        .request(
            Method::POST,
            "/api/v1/auth/refresh",
            Some(&signed.refresh_token),
        )
        .send()
        .await
        .unwrap();
    let renewed = Signed::from_body(&expect_json(res, 200).await);
    // An access token is not a refresh token, and the other way round.
    assert_error(
        refresh_raw(&app, &renewed.access_token).await,
        401,
        "unauthorized",
    )
    .await;
    assert_error(
        app.get("/api/v1/users/me", &renewed.refresh_token).await,
        401,
        "unauthorized",
    )
    .await;
    // Neither a body nor a header.
    let res = app
        .request(Method::POST, "/api/v1/auth/refresh", None)
        .send()
        .await
        .unwrap();
    assert_error(res, 401, "unauthorized").await;
    // A deactivated user cannot refresh.
    app.set_user("cust@example.com", None, Some(false)).await;
    assert_error(
        refresh_raw(&app, &renewed.refresh_token).await,
        401,
        "account_disabled",
    )
    .await;
}

#[tokio::test]
async fn guests_are_customers_with_tokens() {
    let app = spawn_app().await;
    let a = app.guest().await;
    let b = app.guest().await;
    assert_ne!(a.user_id, b.user_id);
    let me = expect_json(app.get("/api/v1/users/me", &a.access_token).await, 200).await;
    assert_eq!(me["id"], a.user_id.as_str());
    assert_eq!(me["role"], "customer");
    assert_eq!(me["is_guest"], true);
    assert_error(
        app.get("/api/v1/admin/users/me", &a.access_token).await,
        403,
        "forbidden",
    )
    .await;
    // A guest's refresh token works like anyone's.
    expect_json(refresh_raw(&app, &a.refresh_token).await, 200).await;
}

#[tokio::test]
async fn me_for_everyone_admin_me_for_staff() {
    let app = spawn_app().await;
    for (email, role, staff) in [
        ("c@example.com", Role::Customer, false),
        ("a@example.com", Role::Agent, true),
        ("d@example.com", Role::Admin, true),
    ] {
        let signed = app.user(email, role).await;
        let me = expect_json(app.get("/api/v1/users/me", &signed.access_token).await, 200).await;
        assert_eq!(me["email"], email);
        assert_eq!(me["role"], role.as_str());
        let res = app
            .get("/api/v1/admin/users/me", &signed.access_token)
            .await;
        if staff {
            assert_eq!(expect_json(res, 200).await, me);
        } else {
            assert_error(res, 403, "forbidden").await;
        }
    }
}

/// Every request reloads its caller: a role change or a lock-out applies to tokens already
/// handed out.
#[tokio::test]
async fn role_changes_and_lock_outs_apply_to_existing_tokens() {
    let app = spawn_app().await;
    let signed = app.user("x@example.com", Role::Customer).await;
    let admin_me = "/api/v1/admin/users/me";
    assert_error(
        app.get(admin_me, &signed.access_token).await,
        403,
        "forbidden",
    )
    .await;
    app.set_user("x@example.com", Some(Role::Agent), None).await;
    expect_json(app.get(admin_me, &signed.access_token).await, 200).await;
    app.set_user("x@example.com", None, Some(false)).await;
    assert_error(
        app.get("/api/v1/users/me", &signed.access_token).await,
        401,
        "account_disabled",
    )
    .await;
}

fn b64(value: &Value) -> String {
    URL_SAFE_NO_PAD.encode(value.to_string())
}

/// Tokens that must all be refused, each with the error code it gets.
fn bad_tokens(app: &TestApp, user_id: &str) -> Vec<(&'static str, String, &'static str)> {
    let good = app.access_claims(user_id, "customer");
    let with = |field: &str, value: Value| {
        let mut claims = good.clone();
        claims[field] = value;
        claims
    };
    let without = |field: &str| {
        let mut claims = good.clone();
        claims.as_object_mut().unwrap().remove(field);
        claims
    };
    let now = chrono::Utc::now().timestamp();
    let hs512 = {
        use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
        encode(
            &Header::new(Algorithm::HS512),
            &good,
            &EncodingKey::from_secret(app.jwt_secret.as_bytes()),
        )
        .unwrap()
    };
    let signed = app.sign(&good);
    let mut parts = signed.split('.');
    let (header, payload) = (parts.next().unwrap(), parts.next().unwrap());
    vec![
        (
            "alg none",
            format!(
                "{}.{}.",
                b64(&json!({"alg": "none", "typ": "JWT"})),
                b64(&good)
            ),
            "unauthorized",
        ),
        (
            "alg none, signature kept",
            format!(
                "{}.{}.{}",
                b64(&json!({"alg": "none", "typ": "JWT"})),
                b64(&good),
                signed.rsplit('.').next().unwrap()
            ),
            "unauthorized",
        ),
        (
            "foreign signature",
            sign_with(&good, "someone-elses-secret-0123456789abcdef-0123"),
            "unauthorized",
        ),
        (
            "claims changed after signing",
            format!(
                "{header}.{}.{}",
                b64(&with("role", json!("admin"))),
                signed.rsplit('.').next().unwrap()
            ),
            "unauthorized",
        ),
        ("another algorithm (HS512)", hs512, "unauthorized"),
        (
            "expired",
            app.sign(&with("exp", json!(now - 3600))),
            "token_expired",
        ),
        ("no exp", app.sign(&without("exp")), "unauthorized"),
        (
            "wrong iss",
            app.sign(&with("iss", json!("elsewhere"))),
            "unauthorized",
        ),
        ("no iss", app.sign(&without("iss")), "unauthorized"),
        (
            "wrong aud",
            app.sign(&with("aud", json!("elsewhere"))),
            "unauthorized",
        ),
        ("no aud", app.sign(&without("aud")), "unauthorized"),
        (
            "refresh kind",
            app.sign(&with("typ", json!("refresh"))),
            "unauthorized",
        ),
        (
            "unknown user",
            app.sign(&with("sub", json!(uuid::Uuid::new_v4().to_string()))),
            "unauthorized",
        ),
        ("garbage", "not-a-token".into(), "unauthorized"),
        ("three garbage parts", "a.b.c".into(), "unauthorized"),
        (
            "header and payload only",
            format!("{header}.{payload}"),
            "unauthorized",
        ),
        ("empty", String::new(), "unauthorized"),
        ("very long", "a".repeat(6000), "unauthorized"),
    ]
}

#[tokio::test]
async fn bad_tokens_are_401() {
    let app = spawn_app().await;
    let guest = app.guest().await;
    // The forged tokens name a real, active user: only the token is wrong.
    expect_json(app.get("/api/v1/users/me", &guest.access_token).await, 200).await;
    for (what, token, code) in bad_tokens(&app, &guest.user_id) {
        let res = app.get("/api/v1/users/me", &token).await;
        assert_eq!(res.status(), 401, "{what}");
        let body = assert_error(res, 401, code).await;
        assert!(!body.to_string().contains(&guest.user_id), "{what}: {body}");
    }
    // The properly signed token of a deactivated user.
    let agent = app.user("agent@example.com", Role::Agent).await;
    app.set_user("agent@example.com", None, Some(false)).await;
    assert_error(
        app.get("/api/v1/admin/users/me", &agent.access_token).await,
        401,
        "account_disabled",
    )
    .await;
}

#[tokio::test]
async fn missing_or_malformed_authorization_is_401() {
    let app = spawn_app().await;
    let guest = app.guest().await;
    let url = app.url("/api/v1/users/me");
    let res = app.client.get(&url).send().await.unwrap();
    assert_eq!(res.headers()["www-authenticate"], "Bearer");
    assert_error(res, 401, "unauthorized").await;
    for header in [
        String::new(),
        "Bearer".into(),
        "Bearer ".into(),
        format!("Basic {}", guest.access_token),
        format!("Token {}", guest.access_token),
        guest.access_token.clone(),
    ] {
        let res = app
            .client
            .get(&url)
            .header("authorization", header.as_str())
            .send()
            .await
            .unwrap();
        assert_error(res, 401, "unauthorized").await;
    }
    // The scheme is case-insensitive, as HTTP says.
    let res = app
        .client
        .get(&url)
        .header("authorization", format!("bearer {}", guest.access_token))
        .send()
        .await
        .unwrap();
    expect_json(res, 200).await;
    // A token in the query string is for WebSockets only.
    let res = app
        .client
        .get(format!("{url}?token={}", guest.access_token))
        .send()
        .await
        .unwrap();
    assert_error(res, 401, "unauthorized").await;
}

/// The same refresh token sent many times at once: exactly one exchange succeeds.
#[tokio::test]
async fn concurrent_refreshes_of_one_token_succeed_once() {
    let app = spawn_app().await;
    let signed = app.user("race@example.com", Role::Customer).await;
    let attempts = (0..6).map(|_| refresh_raw(&app, &signed.refresh_token));
    let statuses: Vec<u16> = futures_util::future::join_all(attempts)
        .await
        .iter()
        .map(|res| res.status().as_u16())
        .collect();
    assert_eq!(
        statuses.iter().filter(|s| **s == 200).count(),
        1,
        "{statuses:?}"
    );
    assert!(
        statuses.iter().all(|s| *s == 200 || *s == 401),
        "{statuses:?}"
    );
}
