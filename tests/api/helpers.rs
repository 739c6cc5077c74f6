//! The test harness: one server and one fresh database per test, and short helpers for the
//! requests most tests make.
//!
//! - [`spawn_app`] / [`spawn_app_with`] start the real application (the same
//!   `Application::build` that `switchboard serve` uses) on `127.0.0.1`, port 0, with one
//!   worker, on its own thread and actix `System`.
//! - Every test gets a database of its own: a temporary SQLite file by default; when
//!   `TEST_DATABASE_URL` names a PostgreSQL server (its maintenance database, e.g.
//!   `postgres://postgres@127.0.0.1:5432/postgres`), a new database
//!   `switchboard_test_<uuid>` is created on it and dropped when the test ends.
//! - Dropping the [`TestApp`] stops its server and removes its database.
//!
//! Helpers that check a response panic with the status and body when the answer is not the
//! expected one, so a failing test says what the server said.

#![allow(dead_code)] // Not every test file uses every helper.

use std::time::Duration;

use diesel::{Connection, PgConnection, RunQueryDsl};
use reqwest::Response;
use serde_json::{json, Value};
use switchboard::auth::password;
use switchboard::config::{Secret, Settings};
use switchboard::db::models::{now, user, Role};
use switchboard::db::{ConnectionManager, DbConnection, DbUrl};
use switchboard::startup::Application;

/// The repository's `config/` folder, so tests read the same defaults as the binary.
pub const CONFIG_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/config");

/// The signing key of every test server: 32+ bytes, as outside development.
pub const JWT_SECRET: &str = "switchboard-integration-tests-secret-0123456789abcdef";

/// The PostgreSQL server to test against, from `TEST_DATABASE_URL`; `None` means SQLite.
pub fn postgres_url() -> Option<String> {
    std::env::var("TEST_DATABASE_URL")
        .ok()
        .filter(|url| !url.trim().is_empty())
}

/// The backend the tests run against: `"postgres"` or `"sqlite"`.
pub fn backend_name() -> &'static str {
    if postgres_url().is_some() {
        "postgres"
    } else {
        "sqlite"
    }
}

/// A database made for one test and removed when it is dropped.
pub struct TestDatabase {
    /// The `DATABASE_URL` of this database.
    pub url: String,
    /// PostgreSQL only: the name of the database created for this test.
    pub pg_name: Option<String>,
    /// SQLite only: the folder holding the file, deleted on drop.
    dir: Option<tempfile::TempDir>,
}

impl TestDatabase {
    /// A fresh, empty database on the backend under test (see [`postgres_url`]).
    pub fn new() -> TestDatabase {
        match postgres_url() {
            Some(server) => TestDatabase::postgres(&server),
            None => TestDatabase::sqlite(),
        }
    }

    /// A fresh SQLite file in a temporary folder, whatever the backend under test.
    pub fn sqlite() -> TestDatabase {
        let dir = tempfile::tempdir().expect("creating a temporary folder");
        let url = format!("sqlite://{}", dir.path().join("switchboard.db").display());
        TestDatabase {
            url,
            pg_name: None,
            dir: Some(dir),
        }
    }

    fn postgres(server: &str) -> TestDatabase {
        let name = format!("switchboard_test_{}", uuid::Uuid::new_v4().simple());
        let mut conn = PgConnection::establish(server)
            .unwrap_or_else(|e| panic!("connecting to TEST_DATABASE_URL: {e}"));
        diesel::sql_query(format!("CREATE DATABASE {name}"))
            .execute(&mut conn)
            .unwrap_or_else(|e| panic!("creating database {name}: {e}"));
        TestDatabase {
            url: with_database(server, &name),
            pg_name: Some(name),
            dir: None,
        }
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        if let Some(name) = &self.pg_name {
            // Best effort: a failure here must not hide the test's own outcome.
            if let Err(e) = drop_pg_database(name) {
                eprintln!("could not drop test database {name}: {e:#}");
            }
        }
    }
}

/// Drops a PostgreSQL database on the `TEST_DATABASE_URL` server, closing its connections.
pub fn drop_pg_database(name: &str) -> anyhow::Result<()> {
    let server = postgres_url().ok_or_else(|| anyhow::anyhow!("TEST_DATABASE_URL is not set"))?;
    let mut conn = PgConnection::establish(&server)?;
    diesel::sql_query(format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)")).execute(&mut conn)?;
    Ok(())
}

/// `url` with its database name replaced by `name` (query parameters are kept).
fn with_database(url: &str, name: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((base, query)) => (base, Some(query)),
        None => (url, None),
    };
    let host_start = base.find("://").map_or(0, |i| i + 3);
    let base = match base[host_start..].find('/') {
        Some(slash) => &base[..host_start + slash],
        None => base,
    };
    match query {
        Some(query) => format!("{base}/{name}?{query}"),
        None => format!("{base}/{name}"),
    }
}

/// The settings every test server starts from: repository defaults, a fresh database,
/// 127.0.0.1 on a free port, one worker, [`JWT_SECRET`].
pub fn test_settings(db_url: &str) -> Settings {
    let mut settings = Settings::load_from(&[("CONFIG_DIR".to_string(), CONFIG_DIR.to_string())])
        .expect("loading config/ for the tests");
    settings.server.host = "127.0.0.1".into();
    settings.server.port = 0;
    settings.server.workers = 1;
    settings.database.url = Secret::new(db_url);
    settings.auth.jwt_secret = Secret::new(JWT_SECRET);
    settings
}

/// A running server and what a test needs to talk to it.
pub struct TestApp {
    /// `http://127.0.0.1:<port>`
    pub address: String,
    pub port: u16,
    pub client: reqwest::Client,
    /// The `DATABASE_URL` the server uses (CLI tests point the binary at it).
    pub db_url: String,
    /// PostgreSQL only: the name of this test's database.
    pub pg_database: Option<String>,
    /// The key the server signs and checks tokens with (tests forge tokens with it).
    pub jwt_secret: String,
    /// The settings the server was started with.
    pub settings: Settings,
    /// `None` while stopped by [`TestApp::stop_server`].
    server: Option<RunningServer>,
    // Dropped after the server is told to stop (fields drop after `Drop::drop`).
    _db: TestDatabase,
}

impl Drop for TestApp {
    fn drop(&mut self) {
        // The stop command is sent when `stop` is called; the returned future only waits for
        // the server to finish, which nothing here needs.
        if let Some(server) = &self.server {
            std::mem::drop(server.handle.stop(false));
        }
    }
}

/// Starts a server with the test settings.
pub async fn spawn_app() -> TestApp {
    spawn_app_with(|_| {}).await
}

/// Starts a server with the test settings, changed by `customize` first.
pub async fn spawn_app_with(customize: impl FnOnce(&mut Settings) + Send + 'static) -> TestApp {
    let db = TestDatabase::new();
    let mut settings = test_settings(&db.url);
    customize(&mut settings);
    let db_url = settings.database.url.expose().to_string();
    let jwt_secret = settings.auth.jwt_secret.expose().to_string();

    let server = start_server(settings.clone()).await;

    let client = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(30))
        .build()
        .expect("building the HTTP client");
    TestApp {
        address: format!("http://127.0.0.1:{}", server.port),
        port: server.port,
        client,
        db_url,
        pg_database: db.pg_name.clone(),
        jwt_secret,
        settings,
        server: Some(server),
        _db: db,
    }
}

/// One run of the application on its own thread and actix `System`.
struct RunningServer {
    port: u16,
    handle: actix_web::dev::ServerHandle,
    thread: std::thread::JoinHandle<()>,
}

/// How long a restart keeps trying to bind the port the stopped server let go of.
const REBIND_TIMEOUT: Duration = Duration::from_secs(30);

/// Builds and starts the application with `settings`; panics if it cannot start.
async fn start_server(settings: Settings) -> RunningServer {
    try_start_server(settings)
        .await
        .unwrap_or_else(|e| panic!("building the application: {e}"))
}

async fn try_start_server(settings: Settings) -> Result<RunningServer, String> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    let thread = std::thread::Builder::new()
        .name("test-server".into())
        .spawn(move || {
            actix_rt::System::new().block_on(async move {
                match Application::build(settings).await {
                    Ok(app) => {
                        let _ = tx.send(Ok((app.port(), app.handle())));
                        let _ = app.run_until_stopped().await;
                    }
                    Err(e) => {
                        let _ = tx.send(Err(format!("{e:#}")));
                    }
                }
                // Stops the actors too, so the sockets they hold close as on a real shutdown.
                actix_rt::System::current().stop();
            })
        })
        .expect("starting the server thread");
    let (port, handle) = rx
        .await
        .expect("the server thread ended before it started the server")?;
    Ok(RunningServer {
        port,
        handle,
        thread,
    })
}

/// Tokens and user id from a sign-in (login, guest or refresh).
#[derive(Debug, Clone)]
pub struct Signed {
    pub access_token: String,
    pub refresh_token: String,
    pub user_id: String,
}

impl Signed {
    /// Reads a sign-in answer (`access_token`, `refresh_token`, `user.id`).
    pub fn from_body(body: &Value) -> Signed {
        let text = |v: &Value| v.as_str().unwrap_or_else(|| panic!("{body}")).to_string();
        Signed {
            access_token: text(&body["access_token"]),
            refresh_token: text(&body["refresh_token"]),
            user_id: text(&body["user"]["id"]),
        }
    }
}

impl TestApp {
    /// Stops the server at once, as a crash would: open connections are dropped, the database
    /// stays. Returns when the port is free again.
    pub async fn stop_server(&mut self) {
        let server = self.server.take().expect("the server is already stopped");
        server.handle.stop(false).await;
        tokio::task::spawn_blocking(move || server.thread.join())
            .await
            .expect("waiting for the server thread")
            .expect("the server thread panicked");
    }

    /// Starts the server again on the same port and the same database, after
    /// [`TestApp::stop_server`].
    pub async fn start_server_again(&mut self) {
        assert!(self.server.is_none(), "the server is still running");
        let mut settings = self.settings.clone();
        settings.server.port = self.port;
        let deadline = std::time::Instant::now() + REBIND_TIMEOUT;
        loop {
            match try_start_server(settings.clone()).await {
                Ok(server) => {
                    self.server = Some(server);
                    return;
                }
                // The old listener may take a moment to be released.
                Err(e) if e.contains("binding") && std::time::Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(e) => panic!("restarting the application on port {}: {e}", self.port),
            }
        }
    }

    /// Stops the server and starts a new one on the same port and database.
    pub async fn restart(&mut self) {
        self.stop_server().await;
        self.start_server_again().await;
    }

    /// `path` on this server: `app.url("/health")`.
    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.address, path)
    }

    /// `GET path` with `Authorization: Bearer <token>`.
    pub async fn get(&self, path: &str, token: &str) -> Response {
        self.client
            .get(self.url(path))
            .bearer_auth(token)
            .send()
            .await
            .expect("sending GET")
    }

    /// `POST path` with a JSON body and `Authorization: Bearer <token>`.
    pub async fn post_json(&self, path: &str, token: &str, body: &Value) -> Response {
        self.client
            .post(self.url(path))
            .bearer_auth(token)
            .json(body)
            .send()
            .await
            .expect("sending POST")
    }

    /// Starts `POST path` with a JSON body in its own task, for a request that is answered
    /// only after something the test does next.
    pub fn spawn_post_json(
        &self,
        path: &str,
        token: &str,
        body: &Value,
    ) -> tokio::task::JoinHandle<Response> {
        let request = self
            .client
            .post(self.url(path))
            .bearer_auth(token)
            .json(body);
        tokio::spawn(async move { request.send().await.expect("sending POST") })
    }

    /// `POST path` without a body, with `Authorization: Bearer <token>`.
    pub async fn post(&self, path: &str, token: &str) -> Response {
        self.client
            .post(self.url(path))
            .bearer_auth(token)
            .send()
            .await
            .expect("sending POST")
    }

    /// `DELETE path` with `Authorization: Bearer <token>`.
    pub async fn delete(&self, path: &str, token: &str) -> Response {
        self.client
            .delete(self.url(path))
            .bearer_auth(token)
            .send()
            .await
            .expect("sending DELETE")
    }

    /// A new guest (a customer without email or password), through `POST /auth/guest`.
    pub async fn guest(&self) -> Signed {
        let res = self
            .client
            .post(self.url("/api/v1/auth/guest"))
            .send()
            .await
            .expect("sending POST /auth/guest");
        Signed::from_body(&expect_json(res, 201).await)
    }

    /// Inserts an active user straight into the database; returns their id.
    pub async fn create_user(&self, email: &str, role: Role, password: &str) -> String {
        let (email, password) = (email.to_string(), password.to_string());
        self.with_db(move |c| insert_user(c, &email, role, &password))
            .await
    }

    /// Signs in through `POST /auth/login`; panics unless the answer is 200.
    pub async fn login(&self, email: &str, password: &str) -> Signed {
        let res = self
            .client
            .post(self.url("/api/v1/auth/login"))
            .json(&json!({ "email": email, "password": password }))
            .send()
            .await
            .expect("sending POST /auth/login");
        Signed::from_body(&expect_json(res, 200).await)
    }

    /// A user with `role` created (password `correct horse battery`) and signed in.
    pub async fn user(&self, email: &str, role: Role) -> Signed {
        self.create_user(email, role, "correct horse battery").await;
        self.login(email, "correct horse battery").await
    }

    /// Changes a user's role and/or active flag straight in the database.
    pub async fn set_user(&self, email: &str, role: Option<Role>, active: Option<bool>) {
        let email = email.to_string();
        self.with_db(move |c| {
            user::update(c, &email, role, active)
                .expect("updating the user")
                .unwrap_or_else(|| panic!("no user {email}"));
        })
        .await
    }

    /// Creates a conversation through `POST /api/v1/chat/sessions`; panics unless 201.
    pub async fn create_session(&self, token: &str, title: &str) -> Value {
        let res = self
            .post_json("/api/v1/chat/sessions", token, &json!({ "title": title }))
            .await;
        expect_json(res, 201).await
    }

    /// Posts a message to a conversation; the caller checks the answer.
    pub async fn post_message(
        &self,
        token: &str,
        session_id: &str,
        content: &str,
        client_id: Option<&str>,
    ) -> Response {
        let mut body = json!({ "content": content });
        if let Some(client_id) = client_id {
            body["client_id"] = json!(client_id);
        }
        self.post_json(
            &format!("/api/v1/chat/sessions/{session_id}/messages"),
            token,
            &body,
        )
        .await
    }

    /// Runs `work` on a new connection to this test's database, off the async thread.
    pub async fn with_db<T, F>(&self, work: F) -> T
    where
        T: Send + 'static,
        F: FnOnce(&mut DbConnection) -> T + Send + 'static,
    {
        let url = self.db_url.clone();
        tokio::task::spawn_blocking(move || {
            let mut conn = connect(&url);
            work(&mut conn)
        })
        .await
        .expect("database work panicked")
    }

    /// How many messages are stored for a conversation, read from the database.
    pub async fn message_count(&self, session_id: &str) -> i64 {
        let id = session_id.to_string();
        self.with_db(move |c| switchboard::db::models::message::count(c, &id).unwrap())
            .await
    }

    /// Claims of a valid access token for `user_id`; change fields to forge bad ones.
    pub fn access_claims(&self, user_id: &str, role: &str) -> Value {
        let now = chrono::Utc::now().timestamp();
        json!({
            "sub": user_id,
            "role": role,
            "typ": "access",
            "iat": now,
            "exp": now + 3600,
            "iss": self.settings.auth.issuer,
            "aud": self.settings.auth.audience,
            "jti": uuid::Uuid::new_v4().to_string(),
        })
    }

    /// A JWT over `claims`, signed HS256 with the server's own secret.
    pub fn sign(&self, claims: &Value) -> String {
        sign_with(claims, &self.jwt_secret)
    }
}

/// A JWT over `claims`, signed HS256 with `secret`.
pub fn sign_with(claims: &Value, secret: &str) -> String {
    use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
    encode(
        &Header::new(Algorithm::HS256),
        claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .expect("signing a token")
}

/// Inserts an active user; returns their id.
pub fn insert_user(c: &mut DbConnection, email: &str, role: Role, password: &str) -> String {
    let hash = password::hash(password).expect("hashing the password");
    let id = uuid::Uuid::new_v4().to_string();
    let t = now();
    user::insert(
        c,
        &user::NewUser {
            id: &id,
            email,
            password_hash: Some(&hash),
            role: role.as_str(),
            is_active: true,
            is_guest: false,
            created_at: t,
            updated_at: t,
        },
    )
    .unwrap_or_else(|e| panic!("inserting user {email}: {e}"));
    id
}

/// A connection to `url`, prepared as the server prepares its own.
pub fn connect(url: &str) -> DbConnection {
    let url = DbUrl::parse(url).expect("parsing the database URL");
    ConnectionManager::new(url, Duration::from_secs(5))
        .establish()
        .expect("connecting to the test database")
}

/// The JSON body of `res`; panics with the body unless the status is `status`.
pub async fn expect_json(res: Response, status: u16) -> Value {
    let got = res.status().as_u16();
    let text = res.text().await.expect("reading the body");
    assert_eq!(got, status, "expected {status}, got {got}: {text}");
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("body is not JSON ({e}): {text}"))
}

/// Checks that `res` is the error `code` with `status`, in the API's JSON error shape
/// (`{"error": code, "message": "..."}` with a JSON content type); returns the body.
pub async fn assert_error(res: Response, status: u16, code: &str) -> Value {
    let content_type = res
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let body = expect_json(res, status).await;
    assert!(
        content_type.starts_with("application/json"),
        "content type {content_type:?} for {body}"
    );
    assert_eq!(body["error"], code, "{body}");
    assert!(
        body["message"].as_str().is_some_and(|m| !m.is_empty()),
        "no message in {body}"
    );
    body
}

/// A new guest with a new conversation: (token, session id).
pub async fn customer_with_session(app: &TestApp) -> (String, String) {
    let guest = app.guest().await;
    let session = app.create_session(&guest.access_token, "help").await;
    let id = session["id"].as_str().expect("session id").to_string();
    (guest.access_token, id)
}

/// The concatenated `delta`s of the `token` frames in `frames`.
pub fn tokens_text(frames: &[Value]) -> String {
    frames
        .iter()
        .filter(|f| f["type"] == "token")
        .map(|f| f["delta"].as_str().expect("delta"))
        .collect()
}

/// The summary of conversation `sid` in a dashboard frame of type `kind` (`snapshot`,
/// `session_updates`), if the frame is one and holds it.
pub fn summary_in<'a>(frame: &'a Value, kind: &str, sid: &str) -> Option<&'a Value> {
    if frame["type"] != kind {
        return None;
    }
    frame["sessions"]
        .as_array()?
        .iter()
        .find(|s| s["session_id"] == sid)
}

/// The summary of conversation `sid` in a dashboard's `session_updates` frame, if it holds one.
pub fn updated<'a>(frame: &'a Value, sid: &str) -> Option<&'a Value> {
    summary_in(frame, "session_updates", sid)
}

/// The stored messages of a conversation, oldest first, through the REST API.
pub async fn stored_messages(app: &TestApp, token: &str, session_id: &str) -> Vec<Value> {
    let page = expect_json(
        app.get(
            &format!("/api/v1/chat/sessions/{session_id}/messages?limit=200"),
            token,
        )
        .await,
        200,
    )
    .await;
    page["messages"].as_array().expect("messages").clone()
}

/// A response header that holds a number, such as `Retry-After`.
pub fn numeric_header(res: &Response, name: &str) -> u64 {
    res.headers()
        .get(name)
        .unwrap_or_else(|| panic!("no {name} header: {:?}", res.headers()))
        .to_str()
        .unwrap()
        .parse()
        .unwrap_or_else(|e| panic!("{name}: {e}"))
}

/// Rows in each table, to check that refused input changed nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Counts {
    pub users: i64,
    pub sessions: i64,
    pub messages: i64,
    pub refresh_tokens: i64,
}

impl TestApp {
    /// A request to `path` with `Authorization: Bearer <token>` when a token is given; the
    /// caller adds a body or headers and sends it.
    pub fn request(
        &self,
        method: reqwest::Method,
        path: &str,
        token: Option<&str>,
    ) -> reqwest::RequestBuilder {
        let builder = self.client.request(method, self.url(path));
        match token {
            Some(token) => builder.bearer_auth(token),
            None => builder,
        }
    }

    /// How many rows each table holds, read from the database.
    pub async fn counts(&self) -> Counts {
        use switchboard::db::schema::{chat_messages, chat_sessions, refresh_tokens, users};
        self.with_db(|c| {
            use diesel::QueryDsl;
            Counts {
                users: users::table.count().get_result(c).expect("counting users"),
                sessions: chat_sessions::table
                    .count()
                    .get_result(c)
                    .expect("counting conversations"),
                messages: chat_messages::table
                    .count()
                    .get_result(c)
                    .expect("counting messages"),
                refresh_tokens: refresh_tokens::table
                    .count()
                    .get_result(c)
                    .expect("counting refresh tokens"),
            }
        })
        .await
    }

    /// A customer's conversation as staff see it (`GET /admin/chat/sessions/{id}`).
    pub async fn session_as_staff(&self, staff_token: &str, session_id: &str) -> Value {
        let res = self
            .get(
                &format!("/api/v1/admin/chat/sessions/{session_id}"),
                staff_token,
            )
            .await;
        expect_json(res, 200).await
    }
}

/// The `id` field of a JSON object, as text.
pub fn id_of(value: &Value) -> String {
    value["id"]
        .as_str()
        .unwrap_or_else(|| panic!("no id in {value}"))
        .to_string()
}
