//! The customer widget and the agent desk in a real browser (headless Chromium over
//! WebDriver, see `webdriver.rs`): what a customer and an agent see, through a server restart,
//! and with hostile messages. Each test saves screenshots under `<target>/screenshots/`.

use serde_json::{json, Value};
use switchboard::config::HumanDuration;
use switchboard::db::models::message::{self, NewMessage};
use switchboard::db::models::Role;
use switchboard::providers::demo;

use crate::helpers::{expect_json, spawn_app_with, TestApp};
use crate::webdriver::Browser;
use crate::ws::WsClient;

/// The seqs of the stored messages the page shows, in page order.
const SHOWN_SEQS: &str = "Array.from(document.querySelectorAll('#messages .msg[data-seq]'))\
     .map(e => Number(e.dataset.seq))";

/// A JS expression: the text of the stored messages of `role` the page shows.
fn bodies(role: &str) -> String {
    format!(
        "Array.from(document.querySelectorAll('#messages .msg.role-{role}[data-seq] .body'))\
         .map(e => e.textContent)"
    )
}

/// A JS expression: true once a stored message of `role` reads exactly `text`.
fn shows(role: &str, text: &str) -> String {
    format!("{}.includes({})", bodies(role), json!(text))
}

fn conn_state_is(state: &str) -> String {
    format!(
        "document.getElementById('conn').dataset.state === {}",
        json!(state)
    )
}

/// A server whose demo model writes slowly enough that a test can watch an answer grow.
async fn slow_demo_app() -> TestApp {
    spawn_app_with(|s| s.ai.demo_token_delay = HumanDuration::from_millis(150)).await
}

async fn open_widget(app: &TestApp, browser: &Browser) {
    browser.goto(&app.url("/chat")).await;
    browser
        .wait_for("the widget to connect", &conn_state_is("connected"))
        .await;
}

/// The conversation the widget keeps in localStorage.
async fn widget_session(browser: &Browser) -> String {
    let id = browser
        .wait_for(
            "the widget to open a conversation",
            "(JSON.parse(localStorage.getItem('switchboard.widget') || '{}') || {}).session_id",
        )
        .await;
    id.as_str().expect("a session id").to_string()
}

async fn say(browser: &Browser, text: &str) {
    browser.type_into("#input", text).await;
    browser.click("#send").await;
}

/// Waits until the page shows every stored message of the conversation exactly once, in
/// order: seqs 1..=n, n being what the database holds.
async fn assert_shows_history_once(app: &TestApp, browser: &Browser, session_id: &str) {
    let stored = app.message_count(session_id).await;
    browser
        .wait_for(
            &format!("seqs 1..={stored}, each once, with nothing left pending"),
            &format!(
                "(() => {{ const s = {SHOWN_SEQS}; return s.length === {stored} \
                 && s.every((v, i) => v === i + 1) \
                 && !document.querySelector('#messages .pending'); }})()"
            ),
        )
        .await;
}

#[tokio::test]
async fn a_customer_sees_the_demo_answer_stream_in_and_can_stop_one() {
    let app = slow_demo_app().await;
    let browser = Browser::start("widget").await;
    open_widget(&app, &browser).await;
    let session_id = widget_session(&browser).await;
    browser
        .wait_for(
            "the page to say its answers come from the demo model",
            "!document.getElementById('demo').hidden",
        )
        .await;

    let question = "How do I reset my password?";
    say(&browser, question).await;
    browser
        .wait_for("the question to be stored", &shows("user", question))
        .await;

    // The answer shows while it is being written, then as the stored message.
    let answer = demo::answer(question);
    let partial = browser
        .wait_for(
            "part of the answer while it is written",
            "(() => { const e = document.querySelector('#messages .msg.streaming .body'); \
             return e && e.textContent.length > 0 ? e.textContent : null; })()",
        )
        .await;
    let partial = partial.as_str().expect("text");
    assert!(
        answer.starts_with(partial) && partial.len() < answer.len(),
        "while streaming the page showed {partial:?}, which is not the start of {answer:?}"
    );
    browser
        .wait_for("the whole answer, stored", &shows("assistant", &answer))
        .await;
    assert_eq!(
        browser
            .eval("document.querySelectorAll('#messages .msg.streaming').length")
            .await,
        0
    );

    // The stop button cuts an answer short; it is kept as interrupted.
    say(&browser, "Tell me everything about invoices").await;
    browser
        .wait_for(
            "the second answer to start",
            "!!document.querySelector('#messages .msg.streaming')",
        )
        .await;
    browser.click("#stop").await;
    browser
        .wait_for(
            "the interrupted answer",
            "!!document.querySelector('#messages .msg.role-assistant.interrupted[data-seq]')",
        )
        .await;
    assert_shows_history_once(&app, &browser, &session_id).await;
    browser
        .screenshot(&format!("widget-{}", crate::helpers::backend_name()))
        .await;

    // A reload keeps the conversation: same guest, same history, nothing twice.
    browser.goto(&app.url("/chat")).await;
    browser
        .wait_for("the widget to reconnect", &conn_state_is("connected"))
        .await;
    assert_eq!(widget_session(&browser).await, session_id);
    assert_shows_history_once(&app, &browser, &session_id).await;
    assert_eq!(app.message_count(&session_id).await, 4);
    browser.close().await;
}

#[tokio::test]
async fn the_widget_reconnects_after_a_server_restart_and_catches_up() {
    let mut app = slow_demo_app().await;
    let browser = Browser::start("widget").await;
    open_widget(&app, &browser).await;
    let session_id = widget_session(&browser).await;

    say(&browser, "First question").await;
    browser
        .wait_for(
            "the first answer",
            &shows("assistant", &demo::answer("First question")),
        )
        .await;

    app.stop_server().await;
    browser
        .wait_for(
            "the widget to notice the server is gone",
            &format!(
                "{} || {}",
                conn_state_is("reconnecting"),
                conn_state_is("offline")
            ),
        )
        .await;
    // Written while the server is down: kept on the page, sent once it is back.
    let offline = "Written while you were away";
    say(&browser, offline).await;
    browser
        .wait_for(
            "the offline message shown as pending",
            "!!document.querySelector('#messages .msg.pending')",
        )
        .await;

    app.start_server_again().await;
    browser
        .wait_for("the widget to reconnect", &conn_state_is("connected"))
        .await;
    browser
        .wait_for("the offline message, stored", &shows("user", offline))
        .await;
    browser
        .wait_for(
            "the answer to the offline message",
            &shows("assistant", &demo::answer(offline)),
        )
        .await;

    // A message stored by someone else after the restart arrives too.
    let agent = app.user("agent@example.com", Role::Agent).await;
    let res = app
        .post_message(&agent.access_token, &session_id, "An agent here", None)
        .await;
    expect_json(res, 201).await;
    browser
        .wait_for("the agent's message", &shows("agent", "An agent here"))
        .await;
    assert_shows_history_once(&app, &browser, &session_id).await;
    assert_eq!(app.message_count(&session_id).await, 5);

    // Twice more, quickly: still nothing lost or repeated.
    app.restart().await;
    browser
        .wait_for("the widget to reconnect", &conn_state_is("connected"))
        .await;
    say(&browser, "After the second restart").await;
    browser
        .wait_for(
            "the answer after the second restart",
            &shows("assistant", &demo::answer("After the second restart")),
        )
        .await;
    assert_shows_history_once(&app, &browser, &session_id).await;
    browser.close().await;
}

/// Text that would run script if it were ever treated as HTML.
const HOSTILE: [&str; 3] = [
    "<img src=x onerror=alert(1)>",
    "<script>alert(2)</script>",
    "<b>bold?</b><img src=y onerror=\"document.title='pwned'\">",
];

#[tokio::test]
async fn hostile_messages_show_as_text_in_the_widget() {
    let app = spawn_app_with(|s| s.ai.demo_token_delay = HumanDuration::from_millis(5)).await;
    let browser = Browser::start("widget").await;
    open_widget(&app, &browser).await;
    let session_id = widget_session(&browser).await;
    let title = browser.eval("document.title").await;

    say(&browser, HOSTILE[0]).await;
    browser
        .wait_for("the first hostile message", &shows("user", HOSTILE[0]))
        .await;
    browser
        .wait_for(
            "the answer quoting it",
            &shows("assistant", &demo::answer(HOSTILE[0])),
        )
        .await;
    say(&browser, HOSTILE[1]).await;
    browser
        .wait_for("the second hostile message", &shows("user", HOSTILE[1]))
        .await;
    // An agent's message takes the same path to the page.
    let agent = app.user("agent@example.com", Role::Agent).await;
    let res = app
        .post_message(&agent.access_token, &session_id, HOSTILE[2], None)
        .await;
    expect_json(res, 201).await;
    browser
        .wait_for("the agent's hostile message", &shows("agent", HOSTILE[2]))
        .await;
    browser
        .wait_for(
            "every answer to be stored",
            "document.querySelectorAll('#messages .msg.role-assistant[data-seq]').length === 2",
        )
        .await;

    browser.assert_no_dialog().await;
    assert_eq!(
        browser
            .eval(
                "document.querySelectorAll('#messages img, #messages script, #messages b').length"
            )
            .await,
        0,
        "message text became elements"
    );
    assert_eq!(browser.eval("document.title").await, title);
    // After a reload the history is replayed from the server: still text.
    open_widget(&app, &browser).await;
    assert_shows_history_once(&app, &browser, &session_id).await;
    browser.assert_no_dialog().await;
    let users: Value = browser.eval(&bodies("user")).await;
    assert_eq!(users, json!([HOSTILE[0], HOSTILE[1]]));
    assert_eq!(browser.eval(&bodies("agent")).await, json!([HOSTILE[2]]));
    assert_eq!(
        browser
            .eval(
                "document.querySelectorAll('#messages img, #messages script, #messages b').length"
            )
            .await,
        0
    );
    browser
        .screenshot(&format!(
            "widget-hostile-{}",
            crate::helpers::backend_name()
        ))
        .await;
    browser.close().await;
}

/// The most stored messages the pages keep (`MessageList` in `src/web/common.js`).
const KEPT_IN_PAGE: i64 = 500;

#[tokio::test]
async fn a_long_conversation_keeps_only_its_latest_messages_in_the_page() {
    let app = spawn_app_with(|s| s.ai.demo_token_delay = HumanDuration::from_millis(5)).await;
    let guest = app.guest().await;
    let session = app.create_session(&guest.access_token, "long").await;
    let session_id = session["id"].as_str().expect("session id").to_string();
    // Stored straight into the database: the API's rate limits are not what this is about.
    let agent_id = app
        .create_user("agent@example.com", Role::Agent, "correct horse battery")
        .await;
    let total = KEPT_IN_PAGE + 120;
    let lines: Vec<NewMessage> = (1..=total)
        .map(|i| NewMessage {
            session_id: session_id.clone(),
            role: "agent",
            author_id: Some(agent_id.clone()),
            content: format!("line {i}"),
            client_id: None,
            interrupted: false,
            model: None,
            tokens: None,
        })
        .collect();
    app.with_db(move |c| {
        for outcome in message::append_batch(c, &lines).expect("storing the conversation") {
            outcome.expect("a stored line");
        }
    })
    .await;
    assert_eq!(app.message_count(&session_id).await, total);

    // The widget opens as this guest, in this conversation.
    let browser = Browser::start("widget").await;
    browser.goto(&app.url("/static/style.css")).await;
    let saved = json!({
        "access_token": guest.access_token,
        "refresh_token": guest.refresh_token,
        "session_id": session_id,
    });
    browser
        .eval(&format!(
            "localStorage.setItem('switchboard.widget', {})",
            json!(saved.to_string())
        ))
        .await;
    open_widget(&app, &browser).await;
    let first_kept = total - KEPT_IN_PAGE + 1;
    browser
        .wait_for(
            &format!("seqs {first_kept}..={total} in the page, and a note about the rest"),
            &format!(
                "(() => {{ const s = {SHOWN_SEQS}; return s.length === {KEPT_IN_PAGE} \
                 && s[0] === {first_kept} && s[s.length - 1] === {total} \
                 && !!document.querySelector('#messages .trimmed'); }})()"
            ),
        )
        .await;

    // New messages still arrive, and the oldest make room for them.
    say(&browser, "Still there?").await;
    browser
        .wait_for(
            "the answer to a new question",
            &shows("assistant", &demo::answer("Still there?")),
        )
        .await;
    let after = total + 2;
    browser
        .wait_for(
            &format!("{KEPT_IN_PAGE} messages ending at seq {after}"),
            &format!(
                "(() => {{ const s = {SHOWN_SEQS}; return s.length === {KEPT_IN_PAGE} \
                 && s[s.length - 1] === {after} && s.every((v, i) => i === 0 || v === s[i - 1] + 1); }})()"
            ),
        )
        .await;
    browser.close().await;
}

// ---- the agent desk ----------------------------------------------------------------------

const AGENT_EMAIL: &str = "desk-agent@example.com";
const AGENT_PASSWORD: &str = "correct horse battery";

/// An agent signed in on the desk, connected.
async fn open_desk(app: &TestApp) -> Browser {
    app.create_user(AGENT_EMAIL, Role::Agent, AGENT_PASSWORD)
        .await;
    let desk = Browser::start("desk").await;
    desk.goto(&app.url("/admin")).await;
    desk.type_into("#email", AGENT_EMAIL).await;
    desk.type_into("#password", AGENT_PASSWORD).await;
    desk.click("#login-button").await;
    desk.wait_for("the desk to connect", &conn_state_is("connected"))
        .await;
    desk
}

fn row(session_id: &str) -> String {
    format!("#sessions li[data-session-id={}]", json!(session_id))
}

async fn desk_follows(desk: &Browser, session_id: &str) {
    let row = row(session_id);
    desk.wait_for(
        "the conversation in the live list",
        &format!("!!document.querySelector({})", json!(row)),
    )
    .await;
    desk.click(&row).await;
    desk.wait_for(
        "the conversation to open",
        &format!(
            "document.getElementById('conversation').dataset.sessionId === {} \
             && document.getElementById('messages').dataset.loaded === 'true'",
            json!(session_id)
        ),
    )
    .await;
}

/// An agent's desk following the conversation of a customer in the widget who wrote `text`,
/// once the demo answer shows on the desk: (desk, widget, session id).
async fn desk_following_widget(app: &TestApp, text: &str) -> (Browser, Browser, String) {
    let desk = open_desk(app).await;
    let widget = Browser::start("widget").await;
    open_widget(app, &widget).await;
    let session_id = widget_session(&widget).await;
    say(&widget, text).await;
    desk_follows(&desk, &session_id).await;
    desk.wait_for(
        "the answer on the desk",
        &shows("assistant", &demo::answer(text)),
    )
    .await;
    (desk, widget, session_id)
}

#[tokio::test]
async fn an_agent_follows_live_takes_over_and_the_customer_sees_the_agent() {
    let app = slow_demo_app().await;
    let desk = open_desk(&app).await;
    let widget = Browser::start("widget").await;
    open_widget(&app, &widget).await;
    let session_id = widget_session(&widget).await;

    say(&widget, "Hello, is anyone there?").await;
    widget
        .wait_for(
            "the answer in the widget",
            &shows("assistant", &demo::answer("Hello, is anyone there?")),
        )
        .await;
    desk_follows(&desk, &session_id).await;
    desk.wait_for(
        "the customer's message on the desk",
        &shows("user", "Hello, is anyone there?"),
    )
    .await;
    let answer = demo::answer("Hello, is anyone there?");
    desk.wait_for(
        "the stored answer on the desk",
        &shows("assistant", &answer),
    )
    .await;

    // The customer asks for a human: the desk shows the conversation in the queue.
    widget.click("#human").await;
    widget
        .wait_for(
            "the widget to say an agent is being found",
            "document.getElementById('notice').textContent.includes('finding a support agent')",
        )
        .await;
    desk.wait_for(
        "the conversation in the human queue",
        &format!(
            "!!document.querySelector({})",
            json!(format!("#queue li[data-session-id=\"{session_id}\"]"))
        ),
    )
    .await;
    desk.wait_for(
        "the waiting time to count up",
        "Array.from(document.querySelectorAll('#queue .wait'))\
         .some(e => /waiting ([2-9]|[1-9][0-9]+)s|waiting [0-9]+m/.test(e.textContent))",
    )
    .await;

    // Hostile text from the customer shows literally on the desk, in the list and the view.
    say(&widget, HOSTILE[0]).await;
    desk.wait_for(
        "the hostile message on the desk",
        &shows("user", HOSTILE[0]),
    )
    .await;

    desk.click("#takeover").await;
    desk.wait_for(
        "human mode on the desk",
        "document.getElementById('conv-mode').textContent === 'Human'",
    )
    .await;
    widget
        .wait_for(
            "the widget to show the agent took over",
            "document.getElementById('mode').classList.contains('mode-human')",
        )
        .await;
    desk.wait_for(
        "the queue to empty once an agent took the conversation",
        "document.querySelectorAll('#queue li').length === 0",
    )
    .await;
    let words = "Hi, I am Dana from support. Let me look at that.";
    desk.type_into("#reply", words).await;
    desk.click("#reply-send").await;
    widget
        .wait_for("the agent's words in the widget", &shows("agent", words))
        .await;
    desk.wait_for("the agent's words on the desk", &shows("agent", words))
        .await;
    desk.assert_no_dialog().await;
    assert_eq!(
        desk.eval("document.querySelectorAll('#desk img, #desk script').length")
            .await,
        0
    );

    // Search finds the hostile message and shows its snippet as text, the match highlighted.
    desk.type_into("#search", "onerror").await;
    desk.click("#search-form button").await;
    desk.wait_for(
        "a search result",
        "!!document.querySelector('#results li.result mark')",
    )
    .await;
    let snippet = desk
        .eval("document.querySelector('#results li.result .row-last').textContent")
        .await;
    assert!(
        snippet
            .as_str()
            .is_some_and(|s| s.contains("<img src=x onerror=alert(1)>")),
        "the snippet is not the literal message: {snippet}"
    );
    assert_eq!(
        desk.eval("document.querySelectorAll('#results img, #results script').length")
            .await,
        0
    );
    desk.assert_no_dialog().await;
    desk.screenshot(&format!("desk-{}", crate::helpers::backend_name()))
        .await;

    desk.click("#release").await;
    widget
        .wait_for(
            "the widget back in AI mode",
            "document.getElementById('mode').classList.contains('mode-ai')",
        )
        .await;
    assert_shows_history_once(&app, &widget, &session_id).await;
    assert_shows_history_once(&app, &desk, &session_id).await;
    widget.close().await;
    desk.close().await;
}

#[tokio::test]
async fn the_desk_shows_the_customer_of_its_open_conversation_come_and_go_below_its_list() {
    // A desk that lists one conversation, so the one it has open falls below its list.
    let app = spawn_app_with(|s| {
        s.chat.desk_snapshot_max = 1;
        s.ai.demo_token_delay = HumanDuration::from_millis(0);
        s.rate_limit.messages_per_minute = 0;
        s.rate_limit.ws_frames_per_second = 0;
    })
    .await;
    let (desk, widget, _) = desk_following_widget(&app, "Are you there?").await;
    let presence = "document.getElementById('conv-meta').textContent.split(' · ')[1]";
    desk.wait_for("the customer online", &format!("{presence} === 'online'"))
        .await;

    // Another customer writes: that conversation is the newest, the only one listed.
    let other = app.guest().await;
    let other_id = app.create_session(&other.access_token, "other").await["id"]
        .as_str()
        .expect("session id")
        .to_string();
    let mut ws = WsClient::customer(&app, &other.access_token).await;
    ws.send_message(&other_id, "o-1", "Hello").await;
    ws.until(|f| f["type"] == "reply_done").await;
    desk.wait_for(
        "the other conversation alone in the list",
        &format!(
            "document.querySelectorAll('#sessions li').length === 1 && !!document.querySelector({})",
            json!(row(&other_id))
        ),
    )
    .await;

    // The first customer leaves while an agent keeps writing in the other conversation, so
    // that every update of the list holds only that one: the desk still shows the first
    // customer gone, on the conversation it has open.
    let writer = app.user("writer@example.com", Role::Agent).await;
    let keep_writing = async {
        for _ in 0..60 {
            let res = app
                .post_message(&writer.access_token, &other_id, "and another thing", None)
                .await;
            assert_eq!(res.status(), 201);
            tokio::time::sleep(std::time::Duration::from_millis(25)).await;
        }
    };
    let leave = async {
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        widget.close().await;
    };
    tokio::join!(keep_writing, leave);
    desk.wait_for("the customer away", &format!("{presence} === 'away'"))
        .await;
    desk.assert_no_dialog().await;
    desk.close().await;
}

#[tokio::test]
async fn the_desk_reconnects_after_a_server_restart_and_catches_up() {
    let mut app = slow_demo_app().await;
    let (desk, widget, session_id) = desk_following_widget(&app, "Before the restart").await;

    app.stop_server().await;
    desk.wait_for(
        "the desk to notice the server is gone",
        &format!("!({})", conn_state_is("connected")),
    )
    .await;
    app.start_server_again().await;
    desk.wait_for("the desk to reconnect", &conn_state_is("connected"))
        .await;
    widget
        .wait_for("the widget to reconnect", &conn_state_is("connected"))
        .await;
    say(&widget, "After the restart").await;
    desk.wait_for(
        "the new answer on the desk",
        &shows("assistant", &demo::answer("After the restart")),
    )
    .await;
    assert_shows_history_once(&app, &desk, &session_id).await;
    assert_shows_history_once(&app, &widget, &session_id).await;
    widget.close().await;
    desk.close().await;
}
