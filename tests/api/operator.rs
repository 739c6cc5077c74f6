//! SQL from the operators' troubleshooting guides, run as written against a live database on
//! either backend: it must run, and what it changes the server must honour.

use diesel::connection::SimpleConnection;
use diesel::sql_types::{BigInt, Text};
use diesel::{QueryableByName, RunQueryDsl};
use serde_json::json;
use switchboard::db::models::Role;
use switchboard::db::DbConnection;

use crate::helpers::{assert_error, expect_json, id_of, spawn_app};

#[derive(QueryableByName, Debug)]
struct SeqRow {
    #[diesel(sql_type = BigInt)]
    seq: i64,
}

#[derive(QueryableByName, Debug)]
struct UserRow {
    #[diesel(sql_type = Text)]
    role: String,
}

fn load<T: QueryableByName<diesel::pg::Pg> + QueryableByName<diesel::sqlite::Sqlite> + 'static>(
    c: &mut DbConnection,
    sql: &str,
) -> Vec<T> {
    match c {
        DbConnection::Pg(c) => diesel::sql_query(sql).load(c),
        DbConnection::Sqlite(c) => diesel::sql_query(sql).load(c),
    }
    .unwrap_or_else(|e| panic!("{sql}: {e}"))
}

#[tokio::test]
async fn the_guides_sql_runs_as_written() {
    let app = spawn_app().await;
    let customer = app.guest().await;
    let agent = app.user("user@example.com", Role::Agent).await;
    let id = id_of(
        &app.create_session(&customer.access_token, "Test Session")
            .await,
    );
    for i in 1..=3 {
        let res = app
            .post_message(&agent.access_token, &id, &format!("m{i}"), None)
            .await;
        expect_json(res, 201).await;
    }

    let session_id = id.clone();
    let (newest_first, roles) = app
        .with_db(move |c| {
            // Read-only diagnostics from both guides.
            for sql in [
                "SELECT COUNT(*) FROM chat_messages;",
                "SELECT COUNT(*) as session_count FROM chat_sessions;",
                "SELECT * FROM chat_sessions LIMIT 5;",
                &format!("SELECT user_id FROM chat_sessions WHERE id = '{session_id}';"),
                "SELECT id, email, role, is_active FROM users WHERE email = 'user@example.com';",
                "SELECT id, user_id, created_at, status FROM chat_sessions \
                 WHERE status != 'deleted' ORDER BY created_at DESC;",
                "SELECT session_id, COUNT(*) as message_count FROM chat_messages \
                 GROUP BY session_id HAVING COUNT(*) = 0;",
                &format!(
                    "SELECT * FROM chat_messages WHERE session_id = '{session_id}' \
                     AND created_at < CURRENT_TIMESTAMP ORDER BY created_at DESC LIMIT 50;"
                ),
                "SELECT * FROM chat_messages ORDER BY timestamp DESC LIMIT 5;",
            ] {
                c.batch_execute(sql)
                    .unwrap_or_else(|e| panic!("{sql}: {e}"));
            }
            let newest_first: Vec<i64> = load::<SeqRow>(
                c,
                "SELECT seq FROM chat_messages ORDER BY timestamp DESC LIMIT 5;",
            )
            .into_iter()
            .map(|r| r.seq)
            .collect();
            // Fixes an operator applies by hand.
            c.batch_execute("UPDATE users SET role = 'admin' WHERE email = 'user@example.com';")
                .unwrap();
            let roles: Vec<String> = load::<UserRow>(
                c,
                "SELECT role FROM users WHERE email = 'user@example.com';",
            )
            .into_iter()
            .map(|r| r.role)
            .collect();
            (newest_first, roles)
        })
        .await;
    assert_eq!(newest_first, vec![3, 2, 1]);
    assert_eq!(roles, vec!["admin"]);
    let me = expect_json(app.get("/api/v1/users/me", &agent.access_token).await, 200).await;
    assert_eq!(me["role"], "admin");

    // Locking a user out in SQL applies at once, to tokens already handed out.
    app.with_db(|c| {
        c.batch_execute("UPDATE users SET is_active = false WHERE email = 'user@example.com';")
            .unwrap()
    })
    .await;
    assert_error(
        app.get("/api/v1/users/me", &agent.access_token).await,
        401,
        "account_disabled",
    )
    .await;
    app.with_db(|c| {
        c.batch_execute("UPDATE users SET is_active = true WHERE email = 'user@example.com';")
            .unwrap()
    })
    .await;
    expect_json(app.get("/api/v1/users/me", &agent.access_token).await, 200).await;

    // New messages keep the alias column in step.
    let res = app
        .post_json(
            &format!("/api/chat/sessions/{id}/messages"),
            &agent.access_token,
            &json!({"content": "m4"}),
        )
        .await;
    expect_json(res, 201).await;
    let newest = app
        .with_db(|c| {
            load::<SeqRow>(
                c,
                "SELECT seq FROM chat_messages ORDER BY timestamp DESC LIMIT 1;",
            )
        })
        .await;
    assert_eq!(newest[0].seq, 4);
}
