//! Full-text search over HTTP: ranking, highlighted snippets, cursor pages, each customer
//! seeing only their own conversations, and hostile input treated as text.
//!
//! Messages are written by an agent into customers' conversations, so that no AI answer
//! (which quotes the question) adds matches while a test runs.

use std::collections::HashSet;

use serde_json::Value;
use switchboard::db::models::Role;

use crate::helpers::{assert_error, expect_json, spawn_app, Signed, TestApp};

struct World {
    app: TestApp,
    agent: Signed,
    alice: Signed,
    bob: Signed,
    alice_s1: String,
    alice_s2: String,
    bob_s1: String,
}

async fn post(app: &TestApp, token: &str, sid: &str, content: &str) {
    let res = app.post_message(token, sid, content, None).await;
    assert_eq!(res.status(), 201, "{:?}", res.text().await);
}

async fn world() -> World {
    let app = spawn_app().await;
    let agent = app.user("agent@example.com", Role::Agent).await;
    let alice = app.user("alice@example.com", Role::Customer).await;
    let bob = app.user("bob@example.com", Role::Customer).await;
    let id = |v: Value| v["id"].as_str().unwrap().to_string();
    let alice_s1 = id(app.create_session(&alice.access_token, "Billing").await);
    let alice_s2 = id(app.create_session(&alice.access_token, "Shipping").await);
    let bob_s1 = id(app.create_session(&bob.access_token, "Bob's").await);
    let t = agent.access_token.clone();
    post(&app, &t, &alice_s1, "zebra zebra zebra stripes").await;
    post(
        &app,
        &t,
        &alice_s1,
        "a long note about many unrelated matters that mentions one zebra among lots of other words",
    )
    .await;
    post(
        &app,
        &t,
        &alice_s2,
        "<img src=x onerror=alert(1)> the zebra & the <script>lion</script>",
    )
    .await;
    post(&app, &t, &bob_s1, "bob has a private zebra and a walrus").await;
    World {
        app,
        agent,
        alice,
        bob,
        alice_s1,
        alice_s2,
        bob_s1,
    }
}

/// Percent-encodes every byte that is not a letter or digit.
fn q(text: &str) -> String {
    text.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

async fn search(app: &TestApp, path: &str, token: &str, text: &str) -> Value {
    expect_json(app.get(&format!("{path}?q={}", q(text)), token).await, 200).await
}

fn results(page: &Value) -> &Vec<Value> {
    page["results"].as_array().expect("results")
}

#[tokio::test]
async fn results_are_ranked_with_their_conversation_and_a_highlighted_snippet() {
    let w = world().await;
    let page = search(
        &w.app,
        "/api/v1/admin/chat/search",
        &w.agent.access_token,
        "zebra",
    )
    .await;
    let hits = results(&page);
    assert_eq!(hits.len(), 4, "{page}");
    assert_eq!(page["next_cursor"], Value::Null);
    // The message that is almost only the word ranks first.
    assert_eq!(hits[0]["session_id"], w.alice_s1.as_str(), "{page}");
    assert_eq!(hits[0]["seq"], 1, "{page}");
    assert_eq!(hits[0]["session_title"], "Billing");
    assert_eq!(hits[0]["role"], "agent");
    assert!(hits[0]["created_at"].is_string());
    let ranks: Vec<f64> = hits.iter().map(|h| h["rank"].as_f64().unwrap()).collect();
    assert!(
        ranks.windows(2).all(|p| p[0] >= p[1]),
        "best first: {ranks:?}"
    );
    assert!(ranks[0] > ranks[ranks.len() - 1], "{ranks:?}");
    for hit in hits {
        let snippet = hit["snippet"].as_str().unwrap();
        assert!(snippet.contains("<mark>zebra</mark>"), "{snippet}");
    }

    // Message text in a snippet is escaped: only <mark> is markup.
    let hostile = hits
        .iter()
        .find(|h| h["session_id"] == w.alice_s2.as_str())
        .expect("the hostile message matched");
    let snippet = hostile["snippet"].as_str().unwrap();
    assert!(
        snippet.contains("&lt;img src=x onerror=alert(1)&gt;"),
        "{snippet}"
    );
    assert!(snippet.contains("&lt;script&gt;"), "{snippet}");
    assert!(snippet.contains("&amp;"), "{snippet}");
    let stripped = snippet.replace("<mark>", "").replace("</mark>", "");
    assert!(!stripped.contains('<'), "{snippet}");
}

#[tokio::test]
async fn customers_search_only_their_own_live_conversations() {
    let w = world().await;
    for path in ["/api/v1/chat/search", "/api/chat/search"] {
        let page = search(&w.app, path, &w.alice.access_token, "zebra").await;
        let sessions: HashSet<&str> = results(&page)
            .iter()
            .map(|h| h["session_id"].as_str().unwrap())
            .collect();
        assert_eq!(
            sessions,
            HashSet::from([w.alice_s1.as_str(), w.alice_s2.as_str()]),
            "{path}: {page}"
        );
    }
    let page = search(
        &w.app,
        "/api/v1/chat/search",
        &w.alice.access_token,
        "walrus",
    )
    .await;
    assert_eq!(results(&page).len(), 0, "bob's words stay bob's: {page}");
    let page = search(&w.app, "/api/v1/chat/search", &w.bob.access_token, "walrus").await;
    assert_eq!(results(&page)[0]["session_id"], w.bob_s1.as_str());

    // A deleted conversation drops out of its customer's search, not out of the admin's.
    let res = w
        .app
        .delete(
            &format!("/api/v1/admin/chat/sessions/{}", w.alice_s2),
            &w.agent.access_token,
        )
        .await;
    assert_eq!(res.status(), 200);
    let page = search(&w.app, "/api/v1/chat/search", &w.alice.access_token, "lion").await;
    assert_eq!(results(&page).len(), 0, "{page}");
    let page = search(
        &w.app,
        "/api/v1/admin/chat/search",
        &w.agent.access_token,
        "lion",
    )
    .await;
    assert_eq!(results(&page).len(), 1, "{page}");

    // The admin search is for staff only; every search needs a sign-in.
    let res = w
        .app
        .get("/api/v1/admin/chat/search?q=zebra", &w.alice.access_token)
        .await;
    assert_error(res, 403, "forbidden").await;
    let res = w
        .app
        .client
        .get(w.app.url("/api/v1/chat/search?q=zebra"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 401);
}

#[tokio::test]
async fn pages_follow_the_cursor_without_repeating_or_losing_a_result() {
    let app = spawn_app().await;
    let agent = app.user("agent@example.com", Role::Agent).await;
    let guest = app.guest().await;
    let sid = app.create_session(&guest.access_token, "t").await["id"]
        .as_str()
        .unwrap()
        .to_string();
    // Equal texts rank equal: the cursor must still move past each exactly once.
    for i in 0..4 {
        post(&app, &agent.access_token, &sid, "quokka").await;
        post(
            &app,
            &agent.access_token,
            &sid,
            &format!("the quokka number {i} with more words around it"),
        )
        .await;
    }
    let mut seen = Vec::new();
    let mut ranks = Vec::new();
    let mut cursor: Option<String> = None;
    let mut pages = 0;
    loop {
        let mut path = "/api/v1/admin/chat/search?q=quokka&limit=3".to_string();
        if let Some(c) = &cursor {
            path.push_str(&format!("&cursor={c}"));
        }
        let page = expect_json(app.get(&path, &agent.access_token).await, 200).await;
        pages += 1;
        for hit in results(&page) {
            seen.push(hit["seq"].as_i64().unwrap());
            ranks.push(hit["rank"].as_f64().unwrap());
        }
        match page["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_string()),
            None => break,
        }
        assert!(pages < 10, "the cursor does not advance");
    }
    let mut sorted = seen.clone();
    sorted.sort();
    assert_eq!(sorted, (1..=8).collect::<Vec<i64>>(), "each once: {seen:?}");
    assert!(ranks.windows(2).all(|p| p[0] >= p[1]), "{ranks:?}");
    assert!(pages >= 3, "{pages} pages");

    let res = app
        .get(
            "/api/v1/admin/chat/search?q=quokka&cursor=not-a-cursor",
            &agent.access_token,
        )
        .await;
    assert_error(res, 400, "bad_request").await;
    let res = app
        .get(
            "/api/v1/admin/chat/search?q=quokka&limit=0",
            &agent.access_token,
        )
        .await;
    assert_error(res, 400, "bad_request").await;
}

#[tokio::test]
async fn search_text_is_only_ever_text() {
    let w = world().await;
    let token = &w.agent.access_token;
    let hostile = [
        "\"",
        "\"zebra",
        "zebra\"",
        "zebra AND",
        "OR zebra",
        "NOT",
        "zebra NEAR(stripes",
        "NEAR(zebra stripes, 2)",
        "*",
        "zeb*",
        "^zebra",
        "content:zebra",
        "(((zebra",
        ")",
        "zebra' OR 1=1 --",
        "'; DROP TABLE chat_messages; --",
        "\\",
        "%",
        "_",
        "!@#$%^&*()",
        "zebra\u{0}stripes",
        "zebra\u{7}",
        "&lt;mark&gt;",
        "ünïcödé 日本語 zebra",
    ];
    for text in hostile {
        let page = search(&w.app, "/api/v1/admin/chat/search", token, text).await;
        assert!(page["results"].is_array(), "{text:?}: {page}");
    }
    // Quoted words are still found as words.
    let page = search(&w.app, "/api/v1/admin/chat/search", token, "\"stripes\"").await;
    assert_eq!(results(&page).len(), 1, "{page}");
    let page = search(&w.app, "/api/v1/admin/chat/search", token, "zebra OR").await;
    assert!(page["results"].is_array());

    // Nothing was harmed.
    let page = search(&w.app, "/api/v1/admin/chat/search", token, "zebra").await;
    assert_eq!(results(&page).len(), 4);

    for bad in ["", "q=", "q=%20%20", &format!("q={}", "a".repeat(501))] {
        let path = if bad.is_empty() {
            "/api/v1/admin/chat/search".to_string()
        } else {
            format!("/api/v1/admin/chat/search?{bad}")
        };
        let res = w.app.get(&path, token).await;
        assert_error(res, 400, "bad_request").await;
    }
    let res = w
        .app
        .get("/api/v1/admin/chat/search?q=zebra&sort=sideways", token)
        .await;
    assert_error(res, 400, "bad_request").await;
}

/// What a group commit leaves for later in the full-text index is done in the background: on
/// PostgreSQL the GIN index's pending list is merged within seconds, where without it the list
/// would wait for a commit that takes it past 4 MB (and that commit would do the merge); on
/// SQLite messages are indexed between commits. Either way a search finds them.
#[actix_rt::test]
async fn the_search_index_catches_up_in_the_background() {
    use diesel::connection::SimpleConnection;
    use diesel::RunQueryDsl;
    use switchboard::db::DbConnection;

    #[derive(diesel::QueryableByName)]
    struct Pending {
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        pending: i64,
    }
    /// PostgreSQL: pages in the GIN index's pending list; SQLite: messages not yet indexed.
    fn pending(c: &mut DbConnection) -> i64 {
        let sql = match c {
            DbConnection::Pg(_) => {
                "SELECT pending_pages::bigint AS pending FROM pgstatginindex('idx_chat_messages_fts')"
            }
            DbConnection::Sqlite(_) => {
                "SELECT count(*) AS pending FROM chat_messages \
                 WHERE id > (SELECT indexed_to FROM chat_messages_fts_progress)"
            }
        };
        diesel::sql_query(sql)
            .get_result::<Pending>(c)
            .unwrap()
            .pending
    }

    let w = world().await;
    let sid = w.alice_s1.clone();
    let before = w
        .app
        .with_db(move |c| {
            if let DbConnection::Pg(_) = c {
                c.batch_execute("CREATE EXTENSION IF NOT EXISTS pgstattuple")
                    .unwrap();
            }
            // As a group commit stores them, in one statement (the same SQL on both backends);
            // then, before anything else can run, what is left for later.
            c.batch_execute(&format!(
                "WITH RECURSIVE k(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM k WHERE i < 300)
                 INSERT INTO chat_messages (session_id, seq, role, content, created_at)
                 SELECT '{sid}', 100 + i, 'agent', 'okapi number ' || i, CURRENT_TIMESTAMP
                 FROM k"
            ))
            .unwrap();
            pending(c)
        })
        .await;
    assert!(before > 0, "the insert left nothing pending ({before})");

    let started = std::time::Instant::now();
    loop {
        let now = w.app.with_db(pending).await;
        if now == 0 {
            break;
        }
        assert!(
            started.elapsed() < std::time::Duration::from_secs(10),
            "still {now} pending after 10 s (from {before})"
        );
        // SQLite indexes between the writer's units of work: give it one.
        w.app
            .post_message(&w.agent.access_token, &w.bob_s1, "a walrus", None)
            .await;
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    let page = expect_json(
        w.app
            .get(
                "/api/v1/admin/chat/search?q=okapi&limit=200",
                &w.agent.access_token,
            )
            .await,
        200,
    )
    .await;
    assert_eq!(results(&page).len(), 200, "every one is found");
}
