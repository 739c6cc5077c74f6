//! Conversations and their history over HTTP, under `/api/v1/chat/…` and the `/api/chat/…`
//! aliases: who sees what, paging, and the staff actions close, delete and restore.
//!
//! Staff post the messages that tests page through: a customer's message also starts an AI
//! answer, which would add messages while the test reads.

use std::collections::HashSet;

use reqwest::Method;
use serde_json::{json, Value};
use switchboard::db::models::Role;

use crate::helpers::{assert_error, expect_json, id_of, spawn_app, spawn_app_with, TestApp};

/// Staff post `n` messages numbered from 1 to a conversation.
async fn post_numbered(app: &TestApp, staff_token: &str, session_id: &str, n: usize) {
    for i in 1..=n {
        let res = app
            .post_message(staff_token, session_id, &format!("message {i}"), None)
            .await;
        let body = expect_json(res, 201).await;
        assert_eq!(body["seq"], i as i64, "{body}");
        assert_eq!(body["role"], "agent", "{body}");
    }
}

/// Every page of `path` (which takes `cursor=`), following `next_cursor`; seqs per page.
async fn pages(app: &TestApp, token: &str, path: &str) -> Vec<Vec<i64>> {
    let mut out = Vec::new();
    let mut cursor: Option<i64> = None;
    loop {
        let url = match cursor {
            Some(c) => format!("{path}&cursor={c}"),
            None => path.to_string(),
        };
        let page = expect_json(app.get(&url, token).await, 200).await;
        let seqs: Vec<i64> = page["messages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["seq"].as_i64().unwrap())
            .collect();
        out.push(seqs);
        match page["next_cursor"].as_i64() {
            Some(c) => cursor = Some(c),
            None => return out,
        }
        assert!(out.len() < 100, "paging does not end: {out:?}");
    }
}

/// Ids of every conversation in an admin or own list, following `next_cursor`.
async fn list_all(app: &TestApp, token: &str, path: &str) -> Vec<Value> {
    let mut out = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let sep = if path.contains('?') { '&' } else { '?' };
        let url = match &cursor {
            Some(c) => format!("{path}{sep}cursor={c}"),
            None => path.to_string(),
        };
        let page = expect_json(app.get(&url, token).await, 200).await;
        out.extend(page["sessions"].as_array().unwrap().iter().cloned());
        match page["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_string()),
            None => return out,
        }
        assert!(out.len() < 1000, "paging does not end");
    }
}

#[tokio::test]
async fn customers_create_list_and_read_their_conversations() {
    let app = spawn_app().await;
    let guest = app.guest().await;
    let token = guest.access_token.as_str();

    let titled = app.create_session(token, "  Order 1234  ").await;
    assert_eq!(
        titled["title"], "Order 1234",
        "titles are trimmed: {titled}"
    );
    assert_eq!(titled["user_id"], guest.user_id.as_str());
    assert_eq!(titled["status"], "active");
    assert_eq!(titled["mode"], "ai");
    assert_eq!(titled["last_seq"], 0);
    assert_eq!(titled["deleted_at"], Value::Null);
    // No body at all, and an empty object: untitled.
    let bare = expect_json(app.post("/api/v1/chat/sessions", token).await, 201).await;
    assert_eq!(bare["title"], "");
    let empty = expect_json(
        app.post_json("/api/v1/chat/sessions", token, &json!({}))
            .await,
        201,
    )
    .await;
    // The alias creates the same thing.
    let aliased = expect_json(
        app.post_json("/api/chat/sessions", token, &json!({"title": "alias"}))
            .await,
        201,
    )
    .await;
    assert_eq!(aliased["title"], "alias");

    let expected: Vec<String> = [&aliased, &empty, &bare, &titled]
        .iter()
        .map(|s| id_of(s))
        .collect();
    for path in ["/api/v1/chat/sessions", "/api/chat/sessions"] {
        let list = expect_json(app.get(path, token).await, 200).await;
        let ids: Vec<String> = list["sessions"]
            .as_array()
            .unwrap()
            .iter()
            .map(id_of)
            .collect();
        assert_eq!(ids, expected, "{path}: newest first");
        assert_eq!(list["next_cursor"], Value::Null);
    }
    for session in [&titled, &bare, &empty, &aliased] {
        let id = id_of(session);
        for path in [
            format!("/api/v1/chat/sessions/{id}"),
            format!("/api/chat/sessions/{id}"),
        ] {
            assert_eq!(
                &expect_json(app.get(&path, token).await, 200).await,
                session
            );
        }
    }
    // Another customer's list is their own.
    let other = app.guest().await;
    let list = expect_json(
        app.get("/api/v1/chat/sessions", &other.access_token).await,
        200,
    )
    .await;
    assert_eq!(list["sessions"], json!([]));
}

#[tokio::test]
async fn own_list_pages_with_a_cursor() {
    let app = spawn_app().await;
    let guest = app.guest().await;
    let mut created = Vec::new();
    for i in 0..7 {
        created.push(id_of(
            &app.create_session(&guest.access_token, &format!("s{i}"))
                .await,
        ));
    }
    created.reverse();
    let listed: Vec<String> = list_all(&app, &guest.access_token, "/api/v1/chat/sessions?limit=3")
        .await
        .iter()
        .map(id_of)
        .collect();
    assert_eq!(listed, created);
    let listed: Vec<String> = list_all(&app, &guest.access_token, "/api/chat/sessions?limit=2")
        .await
        .iter()
        .map(id_of)
        .collect();
    assert_eq!(listed, created);
}

#[tokio::test]
async fn messages_page_by_seq_both_ways() {
    let app = spawn_app_with(|s| {
        s.chat.page_size = 4;
        s.chat.max_page_size = 5;
    })
    .await;
    let guest = app.guest().await;
    let agent = app.user("agent@example.com", Role::Agent).await;
    let id = id_of(&app.create_session(&guest.access_token, "history").await);
    post_numbered(&app, &agent.access_token, &id, 7).await;

    for base in ["/api/v1/chat/sessions", "/api/chat/sessions"] {
        let path = format!("{base}/{id}/messages");
        let token = guest.access_token.as_str();
        assert_eq!(
            pages(&app, token, &format!("{path}?limit=3")).await,
            vec![vec![1, 2, 3], vec![4, 5, 6], vec![7]]
        );
        assert_eq!(
            pages(&app, token, &format!("{path}?order=asc&limit=3")).await,
            vec![vec![1, 2, 3], vec![4, 5, 6], vec![7]]
        );
        assert_eq!(
            pages(&app, token, &format!("{path}?order=desc&limit=3")).await,
            vec![vec![7, 6, 5], vec![4, 3, 2], vec![1]]
        );
        // Default page size 4; asking for more than the cap of 5 gets 5.
        assert_eq!(
            pages(&app, token, &format!("{path}?order=asc")).await,
            vec![vec![1, 2, 3, 4], vec![5, 6, 7]]
        );
        assert_eq!(
            pages(&app, token, &format!("{path}?order=desc&limit=1000")).await,
            vec![vec![7, 6, 5, 4, 3], vec![2, 1]]
        );
        // A cursor in the middle, both ways.
        let page = expect_json(app.get(&format!("{path}?cursor=5"), token).await, 200).await;
        let seqs: Vec<i64> = page["messages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["seq"].as_i64().unwrap())
            .collect();
        assert_eq!(seqs, vec![6, 7]);
        let page = expect_json(
            app.get(&format!("{path}?order=desc&cursor=3"), token).await,
            200,
        )
        .await;
        assert_eq!(page["messages"].as_array().unwrap().len(), 2);
        assert_eq!(page["next_cursor"], Value::Null);
    }

    let page = expect_json(
        app.get(
            &format!("/api/v1/chat/sessions/{id}/messages?limit=1"),
            &guest.access_token,
        )
        .await,
        200,
    )
    .await;
    let first = &page["messages"][0];
    assert_eq!(first["session_id"], id.as_str());
    assert_eq!(first["content"], "message 1");
    assert_eq!(first["role"], "agent");
    assert_eq!(first["author_id"], agent.user_id.as_str());
    assert_eq!(first["interrupted"], false);
    assert!(first.get("id").is_none(), "the row id is internal: {first}");
    let session = expect_json(
        app.get(&format!("/api/v1/chat/sessions/{id}"), &guest.access_token)
            .await,
        200,
    )
    .await;
    assert_eq!(session["last_seq"], 7);
}

#[tokio::test]
async fn posting_stores_once_per_client_id() {
    let app = spawn_app().await;
    let guest = app.guest().await;
    let agent = app.user("agent@example.com", Role::Agent).await;
    let id = id_of(&app.create_session(&guest.access_token, "post").await);
    let first = expect_json(
        app.post_message(&agent.access_token, &id, "hello", Some("c-1"))
            .await,
        201,
    )
    .await;
    assert_eq!(first["seq"], 1);
    assert_eq!(first["client_id"], "c-1");
    // The same client id again: 200 with the message already stored, not a second one.
    let again = expect_json(
        app.post_message(&agent.access_token, &id, "hello again", Some("c-1"))
            .await,
        200,
    )
    .await;
    assert_eq!(again, first);
    assert_eq!(app.message_count(&id).await, 1);
    // The customer posts through the alias; stored with role `user`.
    let res = app
        .post_json(
            &format!("/api/chat/sessions/{id}/messages"),
            &guest.access_token,
            &json!({"role": "user", "content": "test message", "client_id": "c-2"}),
        )
        .await;
    let mine = expect_json(res, 201).await;
    assert_eq!(mine["role"], "user");
    assert_eq!(mine["seq"], 2);
    assert_eq!(mine["author_id"], guest.user_id.as_str());
}

#[tokio::test]
async fn a_customer_sees_only_their_own_conversations() {
    let app = spawn_app().await;
    let alice = app.guest().await;
    let bob = app.user("bob@example.com", Role::Customer).await;
    let agent = app.user("agent@example.com", Role::Agent).await;
    let id = id_of(&app.create_session(&alice.access_token, "alice's").await);
    post_numbered(&app, &agent.access_token, &id, 1).await;
    let before = app.counts().await;

    for base in ["/api/v1/chat/sessions", "/api/chat/sessions"] {
        for path in [format!("{base}/{id}"), format!("{base}/{id}/messages")] {
            let body =
                assert_error(app.get(&path, &bob.access_token).await, 404, "not_found").await;
            // Exactly what an unknown id gets.
            let unknown = path.replace(&id, &uuid::Uuid::new_v4().to_string());
            assert_eq!(
                assert_error(app.get(&unknown, &bob.access_token).await, 404, "not_found").await,
                body
            );
        }
        let res = app
            .post_json(
                &format!("{base}/{id}/messages"),
                &bob.access_token,
                &json!({"content": "let me in"}),
            )
            .await;
        assert_error(res, 404, "not_found").await;
        let list = expect_json(app.get(base, &bob.access_token).await, 200).await;
        assert_eq!(list["sessions"], json!([]));
    }
    assert_eq!(app.counts().await, before);
    // Staff see it, through the customer paths and the admin path.
    for path in [
        format!("/api/v1/chat/sessions/{id}"),
        format!("/api/v1/admin/chat/sessions/{id}"),
    ] {
        let body = expect_json(app.get(&path, &agent.access_token).await, 200).await;
        assert_eq!(body["user_id"], alice.user_id.as_str());
    }
}

#[tokio::test]
async fn staff_list_every_conversation_by_status_in_pages() {
    let app = spawn_app().await;
    let admin = app.user("admin@example.com", Role::Admin).await;
    let agent = app.user("agent@example.com", Role::Agent).await;
    let (a, b) = (app.guest().await, app.guest().await);
    let mut all = Vec::new();
    for (i, customer) in [&a, &b, &a, &b, &a, &b, &a].iter().enumerate() {
        all.push(id_of(
            &app.create_session(&customer.access_token, &format!("s{i}"))
                .await,
        ));
    }
    let closed = all[1].clone();
    let deleted = all[4].clone();
    let staff = admin.access_token.as_str();
    expect_json(
        app.post(
            &format!("/api/v1/admin/chat/sessions/{closed}/close"),
            staff,
        )
        .await,
        200,
    )
    .await;
    expect_json(
        app.delete(&format!("/api/v1/admin/chat/sessions/{deleted}"), staff)
            .await,
        200,
    )
    .await;

    let ids = |list: &[Value]| list.iter().map(id_of).collect::<Vec<String>>();
    let newest_first: Vec<String> = all.iter().rev().cloned().collect();
    for token in [&admin.access_token, &agent.access_token] {
        for path in [
            "/api/v1/admin/chat/sessions",
            "/api/v1/admin/chat/sessions?status=all",
            "/api/v1/admin/chat/sessions?limit=2",
            "/api/v1/admin/chat/sessions?status=all&limit=3",
        ] {
            assert_eq!(
                ids(&list_all(&app, token, path).await),
                newest_first,
                "{path}"
            );
        }
    }
    let active: Vec<String> = newest_first
        .iter()
        .filter(|id| **id != closed && **id != deleted)
        .cloned()
        .collect();
    assert_eq!(
        ids(&list_all(
            &app,
            staff,
            "/api/v1/admin/chat/sessions?status=active&limit=2"
        )
        .await),
        active
    );
    let closed_list = list_all(&app, staff, "/api/v1/admin/chat/sessions?status=closed").await;
    assert_eq!(ids(&closed_list), vec![closed.clone()]);
    assert_eq!(closed_list[0]["status"], "closed");
    let deleted_list = list_all(&app, staff, "/api/v1/admin/chat/sessions?status=deleted").await;
    assert_eq!(ids(&deleted_list), vec![deleted.clone()]);
    assert!(deleted_list[0]["deleted_at"].is_string());
    // The customers' own lists: their conversations, not the deleted one.
    let own: HashSet<String> = ids(&list_all(&app, &b.access_token, "/api/v1/chat/sessions").await)
        .into_iter()
        .collect();
    let expected: HashSet<String> = [&all[1], &all[3], &all[5]].into_iter().cloned().collect();
    assert_eq!(own, expected);
    let own_a = ids(&list_all(&app, &a.access_token, "/api/v1/chat/sessions?limit=1").await);
    assert!(!own_a.contains(&deleted));
    assert_eq!(own_a.len(), 3);
    // Customers are not staff.
    assert_error(
        app.get("/api/v1/admin/chat/sessions", &a.access_token)
            .await,
        403,
        "forbidden",
    )
    .await;
}

#[tokio::test]
async fn staff_close_delete_and_restore() {
    let app = spawn_app().await;
    let admin = app.user("admin@example.com", Role::Admin).await;
    let agent = app.user("agent@example.com", Role::Agent).await;
    let customer = app.guest().await;
    let id = id_of(
        &app.create_session(&customer.access_token, "lifecycle")
            .await,
    );
    let admin_path = format!("/api/v1/admin/chat/sessions/{id}");
    let own_path = format!("/api/v1/chat/sessions/{id}");

    // The customer may do none of it, and nothing changes.
    for (method, path) in [
        (Method::POST, format!("{admin_path}/close")),
        (Method::DELETE, admin_path.clone()),
        (Method::POST, format!("{admin_path}/restore")),
        (Method::GET, admin_path.clone()),
    ] {
        let res = app
            .request(method, &path, Some(&customer.access_token))
            .send()
            .await
            .unwrap();
        assert_error(res, 403, "forbidden").await;
    }
    assert_eq!(
        app.session_as_staff(&admin.access_token, &id).await["status"],
        "active"
    );

    // An agent closes it: the customer still sees it, but nobody can post to it.
    let closed = expect_json(
        app.post(&format!("{admin_path}/close"), &agent.access_token)
            .await,
        200,
    )
    .await;
    assert_eq!(closed["status"], "closed");
    assert_eq!(
        expect_json(app.get(&own_path, &customer.access_token).await, 200).await["status"],
        "closed"
    );
    for token in [&customer.access_token, &agent.access_token] {
        let res = app.post_message(token, &id, "anyone there?", None).await;
        let body = assert_error(res, 409, "session_not_active").await;
        assert!(
            body["message"].as_str().unwrap().contains("closed"),
            "{body}"
        );
    }
    assert_eq!(app.message_count(&id).await, 0);

    // A closed conversation cannot be restored: only a deleted one can.
    assert_error(
        app.post(&format!("{admin_path}/restore"), &admin.access_token)
            .await,
        409,
        "conflict",
    )
    .await;

    // An agent deletes it (soft): gone for the customer, kept for staff.
    let deleted = expect_json(app.delete(&admin_path, &agent.access_token).await, 200).await;
    assert_eq!(deleted["status"], "deleted");
    assert!(deleted["deleted_at"].is_string(), "{deleted}");
    assert_error(
        app.get(&own_path, &customer.access_token).await,
        404,
        "not_found",
    )
    .await;
    assert_error(
        app.get(&format!("{own_path}/messages"), &customer.access_token)
            .await,
        404,
        "not_found",
    )
    .await;
    let list = expect_json(
        app.get("/api/v1/chat/sessions", &customer.access_token)
            .await,
        200,
    )
    .await;
    assert_eq!(list["sessions"], json!([]));
    assert_eq!(
        app.session_as_staff(&agent.access_token, &id).await["status"],
        "deleted"
    );

    // An admin restores it within the window: active again, for everyone.
    let restored = expect_json(
        app.post(&format!("{admin_path}/restore"), &admin.access_token)
            .await,
        200,
    )
    .await;
    assert_eq!(restored["status"], "active");
    assert_eq!(restored["deleted_at"], Value::Null);
    expect_json(app.get(&own_path, &customer.access_token).await, 200).await;
    expect_json(
        app.post_message(&agent.access_token, &id, "welcome back", None)
            .await,
        201,
    )
    .await;
    // Restoring an active conversation is refused.
    assert_error(
        app.post(&format!("{admin_path}/restore"), &agent.access_token)
            .await,
        409,
        "conflict",
    )
    .await;

    // Deleted longer ago than the restore window (7 days by default): too late.
    expect_json(app.delete(&admin_path, &admin.access_token).await, 200).await;
    let long_ago = switchboard::db::models::now() - chrono::Duration::days(8);
    let target = id.clone();
    app.with_db(move |c| {
        use diesel::prelude::*;
        use switchboard::db::schema::chat_sessions;
        diesel::update(chat_sessions::table.find(target))
            .set(chat_sessions::deleted_at.eq(Some(long_ago)))
            .execute(c)
            .unwrap();
    })
    .await;
    let body = assert_error(
        app.post(&format!("{admin_path}/restore"), &admin.access_token)
            .await,
        409,
        "conflict",
    )
    .await;
    assert!(
        body["message"].as_str().unwrap().contains("restore window"),
        "{body}"
    );
    assert_eq!(
        app.session_as_staff(&admin.access_token, &id).await["status"],
        "deleted"
    );

    // Unknown conversations.
    let unknown = format!("/api/v1/admin/chat/sessions/{}", uuid::Uuid::new_v4());
    for (method, path) in [
        (Method::GET, unknown.clone()),
        (Method::DELETE, unknown.clone()),
        (Method::POST, format!("{unknown}/close")),
        (Method::POST, format!("{unknown}/restore")),
    ] {
        let res = app
            .request(method, &path, Some(&admin.access_token))
            .send()
            .await
            .unwrap();
        assert_error(res, 404, "not_found").await;
    }
}

/// A short restore window set in the configuration is the one applied.
#[tokio::test]
async fn the_restore_window_comes_from_the_configuration() {
    let app = spawn_app_with(|s| {
        s.chat.restore_window = switchboard::config::HumanDuration::from_secs(0);
    })
    .await;
    let admin = app.user("admin@example.com", Role::Admin).await;
    let customer = app.guest().await;
    let id = id_of(&app.create_session(&customer.access_token, "gone").await);
    let path = format!("/api/v1/admin/chat/sessions/{id}");
    expect_json(app.delete(&path, &admin.access_token).await, 200).await;
    assert_error(
        app.post(&format!("{path}/restore"), &admin.access_token)
            .await,
        409,
        "conflict",
    )
    .await;
    assert_eq!(
        app.session_as_staff(&admin.access_token, &id).await["status"],
        "deleted"
    );
}
