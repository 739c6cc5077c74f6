//! Every benchmark scenario at tiny scale, so that the load generator keeps working: it runs
//! `switchboard-loadgen --check` against a test server (and the minimal hub where the scenario
//! compares with it), which exits non-zero when a connection fails, a message is lost or an
//! error frame arrives. The full benchmarks are `scripts/bench`; nothing here is timed.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};

use switchboard::config::HumanDuration;
use switchboard::db::models::Role;

use crate::helpers::{spawn_app_with, TestApp};

const LOADGEN: &str = env!("CARGO_BIN_EXE_switchboard-loadgen");
const HUB: &str = env!("CARGO_BIN_EXE_switchboard-plain-hub");
const AGENT_EMAIL: &str = "load-agent@example.com";
const AGENT_PASSWORD: &str = "load agent password";

/// Runs the loadgen with `--check`; panics with its output unless it succeeds.
async fn loadgen(args: Vec<String>) -> String {
    tokio::task::spawn_blocking(move || {
        let out = Command::new(LOADGEN)
            .args(&args)
            .arg("--check")
            .output()
            .expect("running switchboard-loadgen");
        let stdout = String::from_utf8_lossy(&out.stdout).to_string();
        assert!(
            out.status.success(),
            "switchboard-loadgen {args:?} failed ({}):\n{stdout}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        stdout
    })
    .await
    .expect("the loadgen thread panicked")
}

/// A test server with an agent account, and the loadgen arguments that reach it.
async fn server(
    customize: impl FnOnce(&mut switchboard::config::Settings) + Send + 'static,
) -> (TestApp, Vec<String>) {
    // The load generator floods on purpose: the rate limits would refuse it.
    let app = spawn_app_with(move |s| {
        s.rate_limit.ws_frames_per_second = 0;
        s.rate_limit.messages_per_minute = 0;
        s.rate_limit.auth_per_minute = 0;
        customize(s);
    })
    .await;
    app.create_user(AGENT_EMAIL, Role::Agent, AGENT_PASSWORD)
        .await;
    let args = vec![
        "--addr".into(),
        format!("127.0.0.1:{}", app.port),
        // The server runs inside this test process.
        "--pid".into(),
        std::process::id().to_string(),
        "--staff-email".into(),
        AGENT_EMAIL.into(),
        "--staff-password".into(),
        AGENT_PASSWORD.into(),
    ];
    (app, args)
}

/// The minimal hub on a free port; killed when dropped.
struct Hub {
    child: Child,
    args: Vec<String>,
}

impl Hub {
    fn start() -> Hub {
        let mut child = Command::new(HUB)
            .arg("127.0.0.1:0")
            .stdout(Stdio::piped())
            .spawn()
            .expect("starting switchboard-plain-hub");
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("the hub's stdout"))
            .read_line(&mut line)
            .expect("reading the hub's address");
        let addr = line
            .trim()
            .strip_prefix("listening on ")
            .unwrap_or_else(|| panic!("the hub said {line:?}"))
            .to_string();
        let args = vec![
            "--target".into(),
            "plain".into(),
            "--addr".into(),
            addr,
            "--pid".into(),
            child.id().to_string(),
        ];
        Hub { child, args }
    }
}

impl Drop for Hub {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Every row of every table in `out` (the loadgen's `--json` lines) shows `column` as a number
/// of at least 0. The server's `/proc/<pid>` files are readable: it is this test's own process.
fn assert_shown(out: &str, column: &str) {
    let rows: Vec<serde_json::Value> = out
        .lines()
        .filter_map(|l| l.strip_prefix("json "))
        .flat_map(|doc| {
            let doc: serde_json::Value = serde_json::from_str(doc).expect("a json line");
            doc["rows"].as_array().cloned().unwrap_or_default()
        })
        .collect();
    assert!(!rows.is_empty(), "no table rows:\n{out}");
    for row in &rows {
        let cell = row[column].as_str().unwrap_or_default();
        let value: f64 = cell
            .parse()
            .unwrap_or_else(|_| panic!("{column}: {cell:?}:\n{out}"));
        assert!(value >= 0.0, "{column}:\n{out}");
    }
}

fn with(base: &[String], more: &[&str]) -> Vec<String> {
    more.iter()
        .map(|s| s.to_string())
        .chain(base.iter().cloned())
        .collect()
}

#[tokio::test]
async fn idle_connections_are_held_over_several_worker_processes() {
    let (_app, args) = server(|_| {}).await;
    let scenario = [
        "idle",
        "--steps",
        "10,30",
        "--settle",
        "0.2",
        "--window",
        "0.3",
        "--per-worker",
        "12",
    ];
    let out = loadgen(with(&args, &scenario)).await;
    assert!(out.contains("Idle connections"), "{out}");
    let hub = Hub::start();
    loadgen(with(&hub.args, &scenario)).await;
}

#[tokio::test]
async fn fanout_delivers_every_message_to_every_subscriber() {
    let (_app, args) = server(|_| {}).await;
    let scenario = [
        "fanout",
        "--subscribers",
        "12",
        "--rates",
        "5,20",
        "--step",
        "1",
        "--gap",
        "0.1",
        "--drain",
        "1",
        "--per-worker",
        "5",
    ];
    let out = loadgen(with(&args, &scenario)).await;
    assert!(out.contains("highest rate held"), "{out}");
    let hub = Hub::start();
    loadgen(with(&hub.args, &scenario)).await;
}

#[tokio::test]
async fn small_rooms_deliver_to_customer_and_watcher() {
    let (_app, args) = server(|_| {}).await;
    let scenario = [
        "rooms",
        "--rooms",
        "6",
        "--loads",
        "24",
        "--step",
        "1",
        "--drain",
        "1",
        "--gap",
        "0",
        "--per-worker",
        "10",
        "--json",
    ];
    let out = loadgen(with(&args, &scenario)).await;
    assert!(out.contains("Small rooms"), "{out}");
    assert_shown(&out, "server writes MB/s");
    // The share of time the server's threads waited for a core, next to its CPU.
    assert_shown(&out, "server waits for CPU %");
    // How often its threads were put on a core: the hand-offs between them.
    assert_shown(&out, "server switches/s");
    let hub = Hub::start();
    loadgen(with(&hub.args, &scenario)).await;
}

#[tokio::test]
async fn ai_answers_stream_to_every_asking_customer() {
    let (_app, args) = server(|s| s.ai.demo_token_delay = HumanDuration::from_millis(5)).await;
    let scenario = ["ai", "--streams", "3", "--duration", "1", "--drain", "5"];
    let out = loadgen(with(&args, &scenario)).await;
    assert!(out.contains("AI answers"), "{out}");
}

#[tokio::test]
async fn acknowledged_messages_are_counted_with_and_without_group_commit() {
    for group in [256, 1] {
        let (_app, args) = server(move |s| s.database.group_commit_max = group).await;
        let scenario = [
            "persist",
            "--senders",
            "3",
            "--window",
            "4",
            "--duration",
            "1",
            "--drain",
            "1",
            "--json",
        ];
        let out = loadgen(with(&args, &scenario)).await;
        assert!(out.contains("Persistence"), "{out}");
        assert_shown(&out, "server writes MB/s");
    }
}
