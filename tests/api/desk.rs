//! The agent desk as agents, admins and customers see it over real sockets: the snapshot and
//! live updates, watching, takeover and hand-back, the human queue, status changes, rights,
//! and sockets closed when an account is disabled.

use std::time::Duration;

use serde_json::{json, Value};
use switchboard::config::HumanDuration;
use switchboard::db::models::Role;

use crate::helpers::{
    spawn_app, spawn_app_with, stored_messages, summary_in, tokens_text, updated, Signed, TestApp,
};
use crate::ws::WsClient;

fn millis(ms: u64) -> HumanDuration {
    HumanDuration::from_millis(ms)
}

/// A guest with a conversation: (sign-in, session id).
async fn customer(app: &TestApp) -> (Signed, String) {
    let guest = app.guest().await;
    let session = app.create_session(&guest.access_token, "help").await;
    let id = session["id"].as_str().expect("session id").to_string();
    (guest, id)
}

/// Sends a desk frame.
async fn ask(ws: &mut WsClient, kind: &str, sid: &str) {
    ws.send(&json!({"type": kind, "session_id": sid})).await;
}

/// Reads until an `error` about `sid`; returns its code.
async fn error_code(ws: &mut WsClient, sid: Option<&str>) -> String {
    let frames = ws
        .until(|f| f["type"] == "error" && sid.is_none_or(|s| f["session_id"] == s))
        .await;
    frames.last().unwrap()["code"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

/// Reads until a `session_updates` frame holds a summary of `sid` that satisfies `check`.
async fn update_where(ws: &mut WsClient, sid: &str, check: impl Fn(&Value) -> bool) -> Value {
    let frames = ws.until(|f| updated(f, sid).is_some_and(&check)).await;
    updated(frames.last().unwrap(), sid).unwrap().clone()
}

#[tokio::test]
async fn a_dashboard_gets_a_snapshot_then_every_change_live() {
    let app = spawn_app_with(|s| s.ai.demo_token_delay = millis(0)).await;
    let (guest, sid) = customer(&app).await;
    let mut cust = WsClient::customer(&app, &guest.access_token).await;
    cust.send_message(&sid, "c-1", "alpha bravo charlie").await;
    cust.until(|f| f["type"] == "reply_done").await;

    let agent = app.user("agent@example.com", Role::Agent).await;
    let mut desk_ws = WsClient::staff(&app, &agent.access_token).await;
    let snapshot = desk_ws.next().await;
    assert_eq!(
        snapshot["type"], "snapshot",
        "right after hello: {snapshot}"
    );
    let summary = summary_in(&snapshot, "snapshot", &sid)
        .unwrap_or_else(|| panic!("the conversation is in the snapshot: {snapshot}"));
    assert_eq!(summary["customer"]["user_id"], guest.user_id.as_str());
    assert_eq!(summary["customer"]["online"], true, "{summary}");
    assert_eq!(summary["status"], "active");
    assert_eq!(summary["mode"], "ai");
    assert_eq!(summary["assigned_agent"], Value::Null);
    assert_eq!(summary["last_seq"], 2);
    assert_eq!(summary["last_message"]["seq"], 2);
    assert_eq!(summary["last_message"]["role"], "assistant");
    assert_eq!(summary["waiting_since"], Value::Null, "answered: {summary}");
    assert_eq!(summary["title"], "help");
    assert_eq!(snapshot["queue"], json!([]));
    assert_eq!(snapshot["list_max"], 200, "the default");
    assert_eq!(
        snapshot["agents_online"],
        json!([{"user_id": agent.user_id, "email": "agent@example.com"}])
    );

    // A new message shows as the last message, cut to a preview (an agent's, so that no AI
    // answer follows it).
    let long = "x".repeat(300);
    let res = app
        .post_message(&agent.access_token, &sid, &long, None)
        .await;
    assert_eq!(res.status(), 201);
    let s = update_where(&mut desk_ws, &sid, |s| s["last_seq"] == 3).await;
    assert_eq!(s["last_message"]["seq"], 3, "{s}");
    assert_eq!(s["last_message"]["role"], "agent", "{s}");
    assert_eq!(
        s["last_message"]["content"]
            .as_str()
            .unwrap()
            .chars()
            .count(),
        200,
        "a preview: {s}"
    );

    // A new conversation appears as it is opened.
    let (newcomer, new_sid) = customer(&app).await;
    let s = update_where(&mut desk_ws, &new_sid, |_| true).await;
    assert_eq!(s["customer"]["user_id"], newcomer.user_id.as_str(), "{s}");
    assert_eq!(s["last_seq"], 0, "{s}");
    assert_eq!(s["last_message"], Value::Null, "{s}");

    // The same agent opens a second dashboard: already online, so nobody is told.
    let mut again = WsClient::staff(&app, &agent.access_token).await;
    let snap = again.next_of("snapshot").await;
    assert_eq!(snap["agents_online"].as_array().unwrap().len(), 1, "{snap}");
    let seen = desk_ws.ping("after-a-second-dashboard").await;
    assert!(
        seen.iter().all(|f| f["type"] != "agents_online"),
        "{seen:?}"
    );
    again.close().await;

    // A second agent comes online, then the customer goes offline.
    let other = app.user("other@example.com", Role::Admin).await;
    let other_ws = WsClient::staff(&app, &other.access_token).await;
    let online = desk_ws
        .until(|f| f["type"] == "agents_online" && f["agents"].as_array().unwrap().len() == 2)
        .await;
    let agents = online.last().unwrap()["agents"].clone();
    assert!(agents.to_string().contains("other@example.com"), "{agents}");
    other_ws.close().await;
    desk_ws
        .until(|f| f["type"] == "agents_online" && f["agents"].as_array().unwrap().len() == 1)
        .await;
    cust.close().await;
    update_where(&mut desk_ws, &sid, |s| s["customer"]["online"] == false).await;
}

#[tokio::test]
async fn watching_gives_the_history_then_the_answer_as_the_customer_sees_it() {
    let app = spawn_app_with(|s| s.ai.demo_token_delay = millis(40)).await;
    let (guest, sid) = customer(&app).await;
    let mut cust = WsClient::customer(&app, &guest.access_token).await;
    cust.send_message(&sid, "c-1", "how do refunds work").await;
    // The answer is being written when the agent starts watching.
    let mut cust_frames = cust
        .until(|f| f["type"] == "token" && f["delta"].as_str().is_some_and(|d| !d.is_empty()))
        .await;
    cust_frames.extend(cust.until(|f| f["type"] == "token").await);

    let agent = app.user("agent@example.com", Role::Agent).await;
    let mut desk_ws = WsClient::staff(&app, &agent.access_token).await;
    desk_ws.next_of("snapshot").await;
    ask(&mut desk_ws, "watch", &sid).await;
    let watched = desk_ws
        .until(|f| f["type"] == "reply_done" && f["session_id"] == sid)
        .await;
    cust_frames.extend(cust.until(|f| f["type"] == "reply_done").await);

    let mine: Vec<&Value> = watched
        .iter()
        .filter(|f| f["session_id"] == sid && f["type"] != "session_updates")
        .collect();
    assert_eq!(mine[0]["type"], "message", "{mine:?}");
    assert_eq!(mine[0]["seq"], 1);
    assert_eq!(mine[0]["content"], "how do refunds work");
    let watching = watched
        .iter()
        .position(|f| f["type"] == "watching")
        .expect("watching");
    assert_eq!(watched[watching]["last_seq"], 1);
    assert!(
        watched[..watching].iter().all(|f| f["type"] != "token"),
        "history first"
    );

    let stored = stored_messages(&app, &guest.access_token, &sid).await;
    let answer = stored[1]["content"].as_str().unwrap();
    assert_eq!(
        tokens_text(&watched),
        answer,
        "the agent saw the whole answer"
    );
    assert_eq!(tokens_text(&cust_frames), answer, "so did the customer");
    let done = watched.last().unwrap();
    assert_eq!(done["seq"], 2);
    assert_eq!(done["interrupted"], false);

    ask(&mut desk_ws, "unwatch", &sid).await;
    desk_ws
        .until(|f| f["type"] == "unwatched" && f["session_id"] == sid)
        .await;
}

#[tokio::test]
async fn takeover_cuts_the_answer_and_the_ai_stays_silent_until_release() {
    let app = spawn_app_with(|s| s.ai.demo_token_delay = millis(40)).await;
    let (guest, sid) = customer(&app).await;
    let mut cust = WsClient::customer(&app, &guest.access_token).await;
    let agent = app.user("agent@example.com", Role::Agent).await;
    let mut desk_ws = WsClient::staff(&app, &agent.access_token).await;
    desk_ws.next_of("snapshot").await;

    cust.send_message(&sid, "c-1", "tell me a long story").await;
    let mut streamed = Vec::new();
    while streamed
        .iter()
        .filter(|f: &&Value| f["type"] == "token")
        .count()
        < 3
    {
        streamed.push(cust.next().await);
    }
    ask(&mut desk_ws, "takeover", &sid).await;

    // The customer sees the answer cut and the agent arrive, in whichever order.
    let mut saw_mode = false;
    let mut done = Value::Null;
    while !saw_mode || done.is_null() {
        let f = cust.next().await;
        match f["type"].as_str() {
            Some("mode") => {
                assert_eq!(f["mode"], "human", "{f}");
                assert_eq!(f["agent"]["user_id"], agent.user_id.as_str(), "{f}");
                assert_eq!(f["agent"]["email"], "agent@example.com", "{f}");
                saw_mode = true;
            }
            Some("reply_done") => done = f,
            _ => streamed.push(f),
        }
    }
    assert_eq!(done["interrupted"], true, "{done}");
    let stored = stored_messages(&app, &guest.access_token, &sid).await;
    assert_eq!(stored[1]["role"], "assistant");
    assert_eq!(stored[1]["interrupted"], true);
    assert_eq!(
        stored[1]["content"].as_str().unwrap(),
        tokens_text(&streamed)
    );

    // The winner watches: history, then live.
    desk_ws
        .until(|f| f["type"] == "watching" && f["session_id"] == sid)
        .await;
    let s = update_where(&mut desk_ws, &sid, |s| s["mode"] == "human").await;
    assert_eq!(
        s["assigned_agent"]["user_id"],
        agent.user_id.as_str(),
        "{s}"
    );

    // In human mode the customer's message gets no AI answer; the agent's reaches them.
    cust.send_message(&sid, "c-2", "are you a person?").await;
    cust.until(|f| f["type"] == "ack" && f["client_id"] == "c-2")
        .await;
    desk_ws
        .until(|f| f["type"] == "message" && f["seq"] == 3)
        .await;
    desk_ws.send_message(&sid, "a-1", "Yes, I am Ann.").await;
    let ack = desk_ws
        .until(|f| f["type"] == "ack" && f["client_id"] == "a-1")
        .await;
    assert_eq!(ack.last().unwrap()["seq"], 4);
    let seen = cust
        .until(|f| f["type"] == "message" && f["seq"] == 4)
        .await;
    assert!(seen.iter().all(|f| f["type"] != "token"), "{seen:?}");
    let msg = seen.last().unwrap();
    assert_eq!(msg["role"], "agent");
    assert_eq!(msg["author_id"], agent.user_id.as_str());
    assert_eq!(msg["content"], "Yes, I am Ann.");

    // Only the assigned agent (or an admin) hands back.
    let other = app.user("other@example.com", Role::Agent).await;
    let mut other_ws = WsClient::staff(&app, &other.access_token).await;
    ask(&mut other_ws, "release", &sid).await;
    assert_eq!(error_code(&mut other_ws, Some(&sid)).await, "not_assigned");
    ask(&mut other_ws, "takeover", &sid).await;
    assert_eq!(
        error_code(&mut other_ws, Some(&sid)).await,
        "already_assigned"
    );

    ask(&mut desk_ws, "release", &sid).await;
    let mode = cust.next_of("mode").await;
    assert_eq!(mode["mode"], "ai");
    assert_eq!(mode["agent"], Value::Null);
    cust.send_message(&sid, "c-3", "thanks, and the AI?").await;
    let done = cust
        .until(|f| f["type"] == "reply_done")
        .await
        .pop()
        .unwrap();
    assert_eq!(done["seq"], 6, "{done}");
    assert_eq!(done["interrupted"], false);
    let roles: Vec<String> = stored_messages(&app, &guest.access_token, &sid)
        .await
        .iter()
        .map(|m| m["role"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        roles,
        ["user", "assistant", "user", "agent", "user", "assistant"],
        "the AI said nothing while the agent had the conversation"
    );
}

#[tokio::test]
async fn two_agents_taking_over_at_once_exactly_one_wins() {
    let app = spawn_app().await;
    let ann = app.user("ann@example.com", Role::Agent).await;
    let bob = app.user("bob@example.com", Role::Agent).await;
    let mut ann_ws = WsClient::staff(&app, &ann.access_token).await;
    let mut bob_ws = WsClient::staff(&app, &bob.access_token).await;
    for round in 0..5 {
        let (_, sid) = customer(&app).await;
        let takeover = json!({"type": "takeover", "session_id": sid});
        tokio::join!(ann_ws.send(&takeover), bob_ws.send(&takeover));
        let outcome = |f: &Value| {
            f["session_id"] == sid.as_str() && (f["type"] == "mode" || f["type"] == "error")
        };
        let (a, b) = tokio::join!(ann_ws.until(outcome), bob_ws.until(outcome));
        let (a, b) = (a.last().unwrap().clone(), b.last().unwrap().clone());
        let winners: Vec<&Value> = [&a, &b]
            .into_iter()
            .filter(|f| f["type"] == "mode")
            .collect();
        assert_eq!(winners.len(), 1, "round {round}: {a} / {b}");
        let loser = if a["type"] == "mode" { &b } else { &a };
        assert_eq!(loser["code"], "already_assigned", "round {round}: {loser}");
        let winner_id = &winners[0]["agent"]["user_id"];
        let id = sid.clone();
        let assigned = app
            .with_db(move |c| {
                switchboard::db::models::session::find(c, &id)
                    .unwrap()
                    .unwrap()
                    .assigned_agent_id
            })
            .await;
        assert_eq!(Some(winner_id.as_str().unwrap().to_string()), assigned);
    }
}

#[tokio::test]
async fn the_human_queue_is_oldest_first_and_a_takeover_leaves_it() {
    let app = spawn_app_with(|s| s.chat.human_wait = HumanDuration::from_secs(600)).await;
    let agent = app.user("agent@example.com", Role::Agent).await;
    let mut desk_ws = WsClient::staff(&app, &agent.access_token).await;
    desk_ws.next_of("snapshot").await;

    let (first, s1) = customer(&app).await;
    let (second, s2) = customer(&app).await;
    let mut c1 = WsClient::customer(&app, &first.access_token).await;
    let mut c2 = WsClient::customer(&app, &second.access_token).await;
    ask(&mut c1, "request_human", &s1).await;
    let got = c1.next_of("human_requested").await;
    assert_eq!(got["session_id"], s1.as_str());
    ask(&mut c2, "request_human", &s2).await;
    c2.next_of("human_requested").await;

    let queue = desk_ws
        .until(|f| f["type"] == "queue" && f["sessions"].as_array().unwrap().len() == 2)
        .await;
    let ids: Vec<&Value> = queue.last().unwrap()["sessions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| &s["session_id"])
        .collect();
    assert_eq!(ids, [&json!(s1), &json!(s2)], "oldest request first");
    let s = &queue.last().unwrap()["sessions"][0];
    assert!(s["human_requested_at"].is_string(), "{s}");

    // While waiting, the AI does not answer.
    c1.send_message(&s1, "c-1", "hello? anyone?").await;
    c1.until(|f| f["type"] == "ack").await;

    // A dashboard connecting now sees the same queue.
    let late = app.user("late@example.com", Role::Admin).await;
    let mut late_ws = WsClient::staff(&app, &late.access_token).await;
    let snapshot = late_ws.next_of("snapshot").await;
    assert_eq!(snapshot["queue"][0]["session_id"], s1.as_str());
    assert_eq!(snapshot["queue"][1]["session_id"], s2.as_str());
    assert!(
        snapshot["queue"][0]["waiting_since"].is_string(),
        "{snapshot}"
    );

    ask(&mut desk_ws, "takeover", &s1).await;
    let queue = desk_ws
        .until(|f| f["type"] == "queue" && f["sessions"].as_array().unwrap().len() == 1)
        .await;
    assert_eq!(
        queue.last().unwrap()["sessions"][0]["session_id"],
        s2.as_str()
    );
    let frames = c1.until(|f| f["type"] == "mode").await;
    assert!(frames.iter().all(|f| f["type"] != "token"), "{frames:?}");
    assert_eq!(app.message_count(&s1).await, 1, "no AI answer was stored");

    // Asking for a human in someone else's conversation is refused like an unknown one.
    ask(&mut c2, "request_human", &s1).await;
    assert_eq!(error_code(&mut c2, Some(&s1)).await, "not_found");
}

#[tokio::test]
async fn nobody_taking_the_request_in_time_tells_the_customer_and_the_ai_answers() {
    let app = spawn_app_with(|s| {
        s.chat.human_wait = millis(500);
        s.ai.demo_token_delay = millis(0);
    })
    .await;
    let agent = app.user("agent@example.com", Role::Agent).await;
    let mut desk_ws = WsClient::staff(&app, &agent.access_token).await;
    desk_ws.next_of("snapshot").await;
    let (guest, sid) = customer(&app).await;
    let mut cust = WsClient::customer(&app, &guest.access_token).await;
    ask(&mut cust, "request_human", &sid).await;
    cust.next_of("human_requested").await;
    cust.send_message(&sid, "c-1", "is a person there?").await;

    let before = cust.until(|f| f["type"] == "human_unavailable").await;
    assert!(
        before.iter().all(|f| f["type"] != "token"),
        "the AI waited: {before:?}"
    );
    assert_eq!(before.last().unwrap()["session_id"], sid.as_str());
    let done = cust.until(|f| f["type"] == "reply_done").await;
    assert_eq!(
        done.last().unwrap()["seq"],
        2,
        "the AI answered the waiting message"
    );

    // The queue empties on the dashboard too.
    desk_ws
        .until(|f| f["type"] == "queue" && f["sessions"] == json!([]))
        .await;
}

#[tokio::test]
async fn staff_close_delete_and_restore_over_the_socket_as_over_http() {
    let app = spawn_app().await;
    let (guest, sid) = customer(&app).await;
    let mut cust = WsClient::customer(&app, &guest.access_token).await;
    cust.resume(&sid, 0).await;
    cust.next_of("resumed").await;

    // Customers may not use staff frames at all.
    for kind in [
        "watch", "takeover", "release", "close", "delete", "restore", "unwatch",
    ] {
        ask(&mut cust, kind, &sid).await;
        assert_eq!(error_code(&mut cust, None).await, "forbidden", "{kind}");
    }

    let agent = app.user("agent@example.com", Role::Agent).await;
    let admin = app.user("admin@example.com", Role::Admin).await;
    let mut agent_ws = WsClient::staff(&app, &agent.access_token).await;
    let mut admin_ws = WsClient::staff(&app, &admin.access_token).await;
    agent_ws.next_of("snapshot").await;
    admin_ws.next_of("snapshot").await;

    ask(&mut agent_ws, "takeover", "no-such-conversation").await;
    assert_eq!(
        error_code(&mut agent_ws, Some("no-such-conversation")).await,
        "not_found"
    );

    ask(&mut agent_ws, "close", &sid).await;
    let status = cust.next_of("status").await;
    assert_eq!(status["status"], "closed");
    update_where(&mut admin_ws, &sid, |s| s["status"] == "closed").await;
    ask(&mut agent_ws, "takeover", &sid).await;
    assert_eq!(
        error_code(&mut agent_ws, Some(&sid)).await,
        "session_closed"
    );

    // An agent may delete and restore, as the REST admin routes allow any staff.
    ask(&mut agent_ws, "delete", &sid).await;
    assert_eq!(cust.next_of("status").await["status"], "deleted");
    update_where(&mut admin_ws, &sid, |s| s["status"] == "deleted").await;
    let res = app
        .get(&format!("/api/v1/chat/sessions/{sid}"), &guest.access_token)
        .await;
    assert_eq!(
        res.status(),
        404,
        "a deleted conversation is gone for its customer"
    );

    ask(&mut agent_ws, "restore", &sid).await;
    assert_eq!(cust.next_of("status").await["status"], "active");
    update_where(&mut admin_ws, &sid, |s| s["status"] == "active").await;
    ask(&mut admin_ws, "restore", &sid).await;
    assert_eq!(
        error_code(&mut admin_ws, Some(&sid)).await,
        "not_restorable"
    );

    // The REST admin route tells the sockets too.
    let res = app
        .post(
            &format!("/api/v1/admin/chat/sessions/{sid}/close"),
            &agent.access_token,
        )
        .await;
    assert_eq!(res.status(), 200);
    assert_eq!(cust.next_of("status").await["status"], "closed");
}

#[tokio::test]
async fn a_disabled_account_or_a_removed_role_loses_its_sockets() {
    let app = spawn_app_with(|s| s.realtime.account_check_interval = millis(200)).await;
    let cust = app.user("carol@example.com", Role::Customer).await;
    let agent = app.user("agent@example.com", Role::Agent).await;
    let mut cust_ws = WsClient::customer(&app, &cust.access_token).await;
    let mut agent_ws = WsClient::staff(&app, &agent.access_token).await;
    agent_ws.next_of("snapshot").await;
    // Both sockets are live and answering.
    cust_ws.ping("before").await;
    agent_ws.ping("before").await;

    app.set_user("carol@example.com", None, Some(false)).await;
    let drained = cust_ws
        .drain(Duration::from_secs(15))
        .await
        .expect("the customer's socket was closed");
    let error = drained
        .frames
        .iter()
        .find(|f| f["type"] == "error")
        .unwrap_or_else(|| panic!("told why: {drained:?}"));
    assert_eq!(error["code"], "account_disabled");
    assert_eq!(drained.close_code, Some(1008));
    let res = app.get("/api/v1/users/me", &cust.access_token).await;
    assert_eq!(res.status(), 401);

    app.set_user("agent@example.com", Some(Role::Customer), None)
        .await;
    let drained = agent_ws
        .drain(Duration::from_secs(15))
        .await
        .expect("the agent's socket was closed");
    let error = drained
        .frames
        .iter()
        .find(|f| f["type"] == "error")
        .unwrap_or_else(|| panic!("told why: {drained:?}"));
    assert_eq!(error["code"], "role_changed");
}

#[tokio::test]
async fn desk_frames_with_bad_fields_are_refused() {
    let app = spawn_app().await;
    let agent = app.user("agent@example.com", Role::Agent).await;
    let mut ws = WsClient::staff(&app, &agent.access_token).await;
    ws.next_of("snapshot").await;
    ws.send(&json!({"type": "takeover"})).await;
    assert_eq!(error_code(&mut ws, None).await, "invalid_frame");
    ws.send(&json!({"type": "watch", "session_id": 7})).await;
    assert_eq!(error_code(&mut ws, None).await, "invalid_frame");
    ws.send(&json!({"type": "release", "session_id": "s", "force": true}))
        .await;
    assert_eq!(error_code(&mut ws, None).await, "invalid_frame");
    let long = "x".repeat(5000);
    ask(&mut ws, "watch", &long).await;
    assert_eq!(error_code(&mut ws, None).await, "not_found");
    // NUL is in no id, on either backend.
    for kind in ["watch", "takeover", "close"] {
        ask(&mut ws, kind, "abc\u{0}def").await;
        assert_eq!(error_code(&mut ws, None).await, "not_found", "{kind}");
    }
    // Still usable.
    ws.ping("after").await;
}

#[tokio::test]
async fn typing_and_presence_reach_both_sides() {
    let app = spawn_app().await;
    let (guest, sid) = customer(&app).await;
    let mut cust = WsClient::customer(&app, &guest.access_token).await;
    cust.resume(&sid, 0).await;
    cust.next_of("resumed").await;
    let agent = app.user("agent@example.com", Role::Agent).await;
    let mut desk_ws = WsClient::staff(&app, &agent.access_token).await;
    desk_ws.next_of("snapshot").await;
    ask(&mut desk_ws, "watch", &sid).await;
    desk_ws
        .until(|f| f["type"] == "watching" && f["session_id"] == sid)
        .await;

    // The customer sees the agent join the conversation.
    cust.until(|f| {
        f["type"] == "presence"
            && f["members"]
                .as_array()
                .unwrap()
                .iter()
                .any(|m| m["role"] == "agent" && m["user_id"] == agent.user_id.as_str())
    })
    .await;

    cust.send(&json!({"type": "typing", "session_id": sid, "active": true}))
        .await;
    let typing = desk_ws
        .until(|f| f["type"] == "typing" && f["session_id"] == sid)
        .await
        .pop()
        .unwrap();
    assert_eq!(typing["user_id"], guest.user_id.as_str());
    assert_eq!(typing["role"], "customer");
    assert_eq!(typing["active"], true);

    desk_ws
        .send(&json!({"type": "typing", "session_id": sid, "active": false}))
        .await;
    let typing = cust.next_of("typing").await;
    assert_eq!(typing["user_id"], agent.user_id.as_str());
    assert_eq!(typing["role"], "agent");
    assert_eq!(typing["active"], false);
}

/// Two servers on one database, as two nodes behind a load balancer.
async fn second_node(app: &TestApp) -> TestApp {
    let url = app.db_url.clone();
    spawn_app_with(move |s| {
        s.database.url = switchboard::config::Secret::new(url);
        s.ai.demo_token_delay = millis(0);
    })
    .await
}

#[tokio::test]
async fn takeover_is_decided_by_the_database_across_nodes_and_survives_a_new_node() {
    let node_a = spawn_app_with(|s| s.ai.demo_token_delay = millis(0)).await;
    let node_b = second_node(&node_a).await;
    let ann = node_a.user("ann@example.com", Role::Agent).await;
    let bob = node_a.user("bob@example.com", Role::Admin).await;
    let mut ann_ws = WsClient::staff(&node_a, &ann.access_token).await;
    let mut bob_ws = WsClient::staff(&node_b, &bob.access_token).await;
    let mut last = None;
    for round in 0..3 {
        let (guest, sid) = customer(&node_a).await;
        let takeover = json!({"type": "takeover", "session_id": sid});
        tokio::join!(ann_ws.send(&takeover), bob_ws.send(&takeover));
        let outcome = |f: &Value| {
            f["session_id"] == sid.as_str() && (f["type"] == "mode" || f["type"] == "error")
        };
        let (a, b) = tokio::join!(ann_ws.until(outcome), bob_ws.until(outcome));
        let (a, b) = (a.last().unwrap().clone(), b.last().unwrap().clone());
        let wins = [&a, &b].iter().filter(|f| f["type"] == "mode").count();
        assert_eq!(wins, 1, "round {round}: {a} / {b}");
        let loser = if a["type"] == "mode" { &b } else { &a };
        assert_eq!(loser["code"], "already_assigned", "round {round}: {loser}");
        last = Some((guest, sid));
    }

    // A node started later knows the conversation is with an agent: its AI keeps silent.
    let (guest, sid) = last.expect("three rounds ran");
    let node_c = second_node(&node_a).await;
    let mut cust = WsClient::customer(&node_c, &guest.access_token).await;
    cust.send_message(&sid, "c-1", "hello from node c").await;
    cust.until(|f| f["type"] == "ack").await;
    let mut admin_c = WsClient::staff(&node_c, &bob.access_token).await;
    ask(&mut admin_c, "release", &sid).await;
    cust.next_of("mode").await;
    cust.send_message(&sid, "c-2", "and now?").await;
    let done = cust.until(|f| f["type"] == "reply_done").await;
    assert_eq!(done.last().unwrap()["seq"], 3, "{done:?}");
    let roles: Vec<String> = stored_messages(&node_c, &guest.access_token, &sid)
        .await
        .iter()
        .map(|m| m["role"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(roles, ["user", "user", "assistant"]);
}

#[tokio::test]
async fn desk_frames_count_against_the_sockets_frame_budget() {
    let app = spawn_app_with(|s| {
        s.rate_limit.ws_frames_per_second = 1;
        s.rate_limit.ws_frame_burst = 3;
        s.rate_limit.ws_flood_close_after = 10;
    })
    .await;
    let (_, sid) = customer(&app).await;
    let agent = app.user("agent@example.com", Role::Agent).await;
    let mut desk_ws = WsClient::staff(&app, &agent.access_token).await;
    desk_ws.next_of("snapshot").await;

    // Three frames are the burst; the fourth, a takeover, is refused and not acted on.
    for i in 0..3 {
        desk_ws.feed(&json!({"type": "ping", "nonce": i})).await;
    }
    desk_ws
        .feed(&json!({"type": "takeover", "session_id": sid}))
        .await;
    desk_ws.flush().await;
    let frames = desk_ws.until(|f| f["type"] == "error").await;
    assert_eq!(frames.iter().filter(|f| f["type"] == "pong").count(), 3);
    let refused = frames.last().unwrap();
    assert_eq!(refused["code"], "rate_limited", "{refused}");
    assert!(
        !frames
            .iter()
            .any(|f| f["type"] == "mode" || f["type"] == "watching"),
        "{frames:?}"
    );
    let session = app.session_as_staff(&agent.access_token, &sid).await;
    assert_eq!(session["mode"], "ai", "{session}");

    // Once the budget refills (one frame a second), the same takeover goes through.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    ask(&mut desk_ws, "takeover", &sid).await;
    desk_ws
        .until(|f| f["type"] == "mode" && f["session_id"] == sid.as_str())
        .await;
    let session = app.session_as_staff(&agent.access_token, &sid).await;
    assert_eq!(session["mode"], "human", "{session}");

    // A dashboard that keeps flooding desk frames regardless is cut off like any socket.
    for _ in 0..40 {
        desk_ws
            .feed(&json!({"type": "watch", "session_id": sid}))
            .await;
    }
    desk_ws.flush().await;
    let drained = desk_ws
        .drain(Duration::from_secs(10))
        .await
        .unwrap_or_else(|d| panic!("the flooding dashboard is still open: {:?}", d.frames));
    assert_eq!(drained.close_code, Some(1008), "{drained:?}");
    let last_error = drained
        .frames
        .iter()
        .rev()
        .find(|f| f["type"] == "error")
        .unwrap_or_else(|| panic!("no error before the close: {drained:?}"));
    assert_eq!(last_error["code"], "rate_limited", "{last_error}");
}

#[tokio::test]
async fn conversations_that_change_together_reach_a_dashboard_in_one_frame() {
    let app = spawn_app().await;
    let agent = app.user("agent@example.com", Role::Agent).await;
    let mut sids = Vec::new();
    for _ in 0..20 {
        sids.push(customer(&app).await.1);
    }
    let mut desk_ws = WsClient::staff(&app, &agent.access_token).await;
    desk_ws.next_of("snapshot").await;

    // One message into each conversation at once (an agent's, so that no AI answer follows).
    let posts = sids
        .iter()
        .map(|sid| app.post_message(&agent.access_token, sid, "on my way", None));
    for res in futures_util::future::join_all(posts).await {
        assert_eq!(res.status(), 201);
    }

    let mut waiting: Vec<&String> = sids.iter().collect();
    let mut frames = 0;
    while !waiting.is_empty() {
        let frame = desk_ws.next().await;
        let before = waiting.len();
        waiting.retain(|sid| updated(&frame, sid).is_none_or(|s| s["last_seq"] != 1));
        if waiting.len() < before {
            frames += 1;
            let ids: Vec<&str> = frame["sessions"]
                .as_array()
                .unwrap()
                .iter()
                .map(|s| s["session_id"].as_str().unwrap())
                .collect();
            let mut unique = ids.clone();
            unique.sort_unstable();
            unique.dedup();
            assert_eq!(unique.len(), ids.len(), "each conversation once: {frame}");
        }
    }
    // Gathered every 200 ms: unless the burst took seconds, some frame held several.
    assert!(
        frames < sids.len(),
        "20 conversations changed at once came in {frames} frames"
    );
}

/// The snapshot a dashboard opened now gets: read from the database.
async fn fresh_snapshot(app: &TestApp, token: &str) -> Value {
    let mut ws = WsClient::staff(app, token).await;
    ws.next_of("snapshot").await
}

/// The conversation's summary as a dashboard opened now reads it: from the database.
async fn fresh_summary(app: &TestApp, token: &str, sid: &str) -> Value {
    let snapshot = fresh_snapshot(app, token).await;
    summary_in(&snapshot, "snapshot", sid)
        .unwrap_or_else(|| panic!("{sid} in the snapshot: {snapshot}"))
        .clone()
}

#[tokio::test]
async fn the_summaries_of_new_messages_match_what_the_database_holds() {
    let app = spawn_app().await;
    let (guest, sid) = customer(&app).await;
    let mut cust = WsClient::customer(&app, &guest.access_token).await;
    let agent = app.user("agent@example.com", Role::Agent).await;
    let mut desk_ws = WsClient::staff(&app, &agent.access_token).await;
    desk_ws.next_of("snapshot").await;
    // Taken over, so that no AI answer follows the customer's messages.
    ask(&mut desk_ws, "takeover", &sid).await;
    update_where(&mut desk_ws, &sid, |s| s["mode"] == "human").await;

    let is_last = |content: &'static str| move |s: &Value| s["last_message"]["content"] == content;
    let steps = [
        ("customer", "first question"),
        ("customer", "second question"),
        ("agent", "an answer"),
        ("customer", "a follow-up"),
    ];
    for (i, (who, content)) in steps.into_iter().enumerate() {
        if who == "customer" {
            cust.send_message(&sid, &format!("c-{i}"), content).await;
        } else {
            let res = app
                .post_message(&agent.access_token, &sid, content, None)
                .await;
            assert_eq!(res.status(), 201);
        }
        let live = update_where(&mut desk_ws, &sid, is_last(content)).await;
        let stored = fresh_summary(&app, &agent.access_token, &sid).await;
        assert_eq!(live, stored, "after the {who}'s {content:?}");
    }
    // What the steps went through: waiting since the first unanswered question, then not.
    let last = fresh_summary(&app, &agent.access_token, &sid).await;
    assert_eq!(last["last_message"]["role"], "user", "{last}");
    assert_eq!(
        last["waiting_since"], last["last_message"]["created_at"],
        "{last}"
    );
}

/// What a dashboard holds: every summary sent to it live, by conversation.
type Held = std::collections::HashMap<String, Value>;

fn apply(held: &mut Held, frame: &Value) {
    if frame["type"] == "session_updates" {
        for s in frame["sessions"].as_array().unwrap() {
            held.insert(s["session_id"].as_str().unwrap().to_string(), s.clone());
        }
    }
}

/// An agent's message into each of `others` in turn, then the dashboard's frames (see
/// [`no_more_than_the_newest`]).
async fn burst(
    app: &TestApp,
    agent: &Signed,
    others: &[String],
    desk_ws: &mut WsClient,
    held: &mut Held,
    list: usize,
) {
    for sid in others {
        let res = app
            .post_message(&agent.access_token, sid, "on my way", None)
            .await;
        assert_eq!(res.status(), 201);
    }
    no_more_than_the_newest(others, desk_ws, held, list).await;
}

/// Three flushes' worth of the dashboard's frames, none of which may hold more than `list` of
/// `others`.
async fn no_more_than_the_newest(
    others: &[String],
    desk_ws: &mut WsClient,
    held: &mut Held,
    list: usize,
) {
    let deadline = tokio::time::Instant::now() + Duration::from_millis(800);
    while let Ok(frame) = desk_ws
        .next_within(deadline.saturating_duration_since(tokio::time::Instant::now()))
        .await
    {
        if frame["type"] == "session_updates" {
            let of_others = frame["sessions"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|s| others.iter().any(|sid| s["session_id"] == sid.as_str()))
                .count();
            assert!(of_others <= list, "at most the {list} newest: {frame}");
        }
        apply(held, &frame);
    }
}

/// The newest `list` of the conversations a dashboard holds, besides `except`, are what a
/// dashboard opened now lists, as it lists them; returns them.
async fn lists_as_stored(
    app: &TestApp,
    agent: &Signed,
    held: &Held,
    except: &str,
    list: usize,
) -> Vec<Value> {
    let mut newest: Vec<&Value> = held
        .values()
        .filter(|s| s["session_id"] != except)
        .collect();
    newest.sort_by(|a, b| {
        (b["updated_at"].as_str(), b["session_id"].as_str())
            .cmp(&(a["updated_at"].as_str(), a["session_id"].as_str()))
    });
    let fresh = fresh_snapshot(app, &agent.access_token).await;
    let listed: Vec<Value> = fresh["sessions"].as_array().unwrap().clone();
    assert_eq!(listed.len(), list, "{fresh}");
    let live: Vec<Value> = newest[..list].iter().map(|s| (*s).clone()).collect();
    assert_eq!(live, listed, "live against stored");
    listed
}

/// The newest two conversations a dashboard lists, as [`lists_as_stored`] checks them: the
/// last two of `others`, newest first.
async fn lists_the_last_two(
    app: &TestApp,
    agent: &Signed,
    held: &Held,
    except: &str,
    others: &[String],
) -> Vec<Value> {
    let listed = lists_as_stored(app, agent, held, except, 2).await;
    assert_eq!(listed[0]["session_id"], others[4].as_str());
    assert_eq!(listed[1]["session_id"], others[3].as_str());
    listed
}

/// A server whose dashboards list two conversations and whose customers wait long for a
/// human, and an agent of it.
async fn desk_of_two() -> (TestApp, Signed) {
    let app = spawn_app_with(|s| {
        s.chat.desk_snapshot_max = 2;
        s.chat.human_wait = HumanDuration::from_secs(600);
    })
    .await;
    let agent = app.user("agent@example.com", Role::Agent).await;
    (app, agent)
}

/// The customer waiting for a human writes, then an agent in each of `others` ([`burst`]):
/// the waiting conversation, held, shows the new message whatever its place.
async fn waiting_writes_then_burst(
    app: &TestApp,
    agent: &Signed,
    cust: &mut WsClient,
    waiting: &str,
    others: &[String],
    desk_ws: &mut WsClient,
    held: &mut Held,
) {
    cust.send_message(waiting, "c-1", "still there?").await;
    cust.until(|f| f["type"] == "ack").await;
    burst(app, agent, others, desk_ws, held, 2).await;
    assert_eq!(
        held[waiting]["last_message"]["content"], "still there?",
        "{}",
        held[waiting]
    );
}

/// A conversation whose customer (connected: the socket returned) waits for a human, then
/// five more opened after it, each with its customer.
async fn waiting_then_five(app: &TestApp) -> (WsClient, String, Vec<(Signed, String)>) {
    let (guest, waiting) = customer(app).await;
    let mut cust = WsClient::customer(app, &guest.access_token).await;
    ask(&mut cust, "request_human", &waiting).await;
    cust.next_of("human_requested").await;
    let mut others = Vec::new();
    for _ in 0..5 {
        others.push(customer(app).await);
    }
    (cust, waiting, others)
}

fn ids(guests: &[(Signed, String)]) -> Vec<String> {
    guests.iter().map(|(_, sid)| sid.clone()).collect()
}

/// Applies the dashboard's frames to `held` until `done`.
async fn apply_until(desk_ws: &mut WsClient, held: &mut Held, done: impl Fn(&Held) -> bool) {
    while !done(held) {
        let frame = desk_ws.next().await;
        apply(held, &frame);
    }
}

#[tokio::test]
async fn a_burst_of_messages_reaches_a_dashboard_as_the_newest_conversations_and_the_queue() {
    // A dashboard lists the newest `desk_snapshot_max` conversations: here two.
    let (app, agent) = desk_of_two().await;
    let mut desk_ws = WsClient::staff(&app, &agent.access_token).await;
    let snapshot = desk_ws.next_of("snapshot").await;
    assert_eq!(snapshot["list_max"], 2, "{snapshot}");
    let mut held = Held::new();

    // Six conversations opened while the dashboard is open; the first waits for a human.
    // The dashboard is sent the two newest of the five.
    let (mut cust, waiting, guests) = waiting_then_five(&app).await;
    let others = ids(&guests);
    apply_until(&mut desk_ws, &mut held, |held| {
        others[3..].iter().all(|sid| held.contains_key(sid))
            && held
                .get(&waiting)
                .is_some_and(|s| !s["human_requested_at"].is_null())
    })
    .await;

    // The waiting customer writes first, then an agent in each of the five others.
    waiting_writes_then_burst(
        &app,
        &agent,
        &mut cust,
        &waiting,
        &others,
        &mut desk_ws,
        &mut held,
    )
    .await;
    lists_the_last_two(&app, &agent, &held, &waiting, &others).await;

    // Ten seconds on, a summary held is read again before it is sent: the same again.
    tokio::time::sleep(Duration::from_millis(10_500)).await;
    burst(&app, &agent, &others, &mut desk_ws, &mut held, 2).await;
    let listed = lists_the_last_two(&app, &agent, &held, &waiting, &others).await;
    assert_eq!(listed[0]["last_seq"], 2, "{}", listed[0]);
}

#[tokio::test]
async fn messages_into_conversations_the_desk_has_not_read_reach_a_dashboard_as_the_newest() {
    let (app, agent) = desk_of_two().await;
    // Six conversations opened before any dashboard, the first waiting for a human: the desk
    // holds no summary of them, so it reads each at its first new message.
    let (mut cust, waiting, guests) = waiting_then_five(&app).await;
    let others = ids(&guests);
    let mut desk_ws = WsClient::staff(&app, &agent.access_token).await;
    let snapshot = desk_ws.next_of("snapshot").await;
    let mut held = Held::new();
    for list in ["sessions", "queue"] {
        for s in snapshot[list].as_array().unwrap() {
            held.insert(s["session_id"].as_str().unwrap().to_string(), s.clone());
        }
    }
    assert!(held.contains_key(&waiting), "{snapshot}");

    // The waiting customer writes first, then an agent in each of the five others.
    waiting_writes_then_burst(
        &app,
        &agent,
        &mut cust,
        &waiting,
        &others,
        &mut desk_ws,
        &mut held,
    )
    .await;
    let listed = lists_the_last_two(&app, &agent, &held, &waiting, &others).await;
    assert_eq!(listed[0]["last_seq"], 1, "{}", listed[0]);
}

#[tokio::test]
async fn customers_coming_and_going_reach_a_dashboard_as_the_newest_conversations() {
    let (app, agent) = desk_of_two().await;
    let mut desk_ws = WsClient::staff(&app, &agent.access_token).await;
    desk_ws.next_of("snapshot").await;
    let mut held = Held::new();

    // Six conversations opened while the dashboard is open; the first waits for a human.
    // The dashboard is sent the two newest of the five.
    let (cust, waiting, guests) = waiting_then_five(&app).await;
    let others = ids(&guests);
    apply_until(&mut desk_ws, &mut held, |held| {
        others[3..].iter().all(|sid| held.contains_key(sid))
            && held
                .get(&waiting)
                .is_some_and(|s| s["customer"]["online"] == true)
    })
    .await;

    // The waiting customer leaves and the five others come into their conversations.
    cust.close().await;
    let mut sockets = Vec::new();
    for (guest, sid) in &guests {
        let mut ws = WsClient::customer(&app, &guest.access_token).await;
        ws.resume(sid, 0).await;
        ws.next_of("resumed").await;
        sockets.push(ws);
    }
    no_more_than_the_newest(&others, &mut desk_ws, &mut held, 2).await;
    assert_eq!(
        held[&waiting]["customer"]["online"], false,
        "{}",
        held[&waiting]
    );
    let listed = lists_the_last_two(&app, &agent, &held, &waiting, &others).await;
    assert_eq!(listed[0]["customer"]["online"], true, "{}", listed[0]);
    assert_eq!(listed[1]["customer"]["online"], true, "{}", listed[1]);
}

#[tokio::test]
async fn new_conversations_reach_a_dashboard_as_the_newest() {
    let app = spawn_app_with(|s| s.chat.desk_snapshot_max = 2).await;
    let agent = app.user("agent@example.com", Role::Agent).await;
    let mut desk_ws = WsClient::staff(&app, &agent.access_token).await;
    desk_ws.next_of("snapshot").await;
    let mut held = Held::new();

    // Five conversations opened at once: no frame holds more than the two newest.
    let mut others = Vec::new();
    for _ in 0..5 {
        others.push(customer(&app).await.1);
    }
    no_more_than_the_newest(&others, &mut desk_ws, &mut held, 2).await;
    lists_the_last_two(&app, &agent, &held, "", &others).await;
}
