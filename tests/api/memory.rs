//! The node's memory while clients stop reading: a measurement, not a check of the suite.
//! Run it on purpose and read the numbers it prints:
//!
//! ```text
//! cargo test --test api -- --ignored --nocapture slow_consumers_do_not_grow
//! ```
//!
//! `MEASURE_OUTBOUND_QUEUE=100000` runs the same with a queue large enough to hold the whole
//! stream, to see what the bound saves.

use std::time::{Duration, Instant};

use tokio_tungstenite::tungstenite::client::IntoClientRequest;

use crate::helpers::TestDatabase;
use crate::shutdown::{guest_with_session, start_server};
use crate::ws::{try_connect, WsClient, CUSTOMER_PATH};

/// Resident memory of a process, in KiB, from `/proc`.
fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|n| n.parse().ok())
        })
        .unwrap_or(0)
}

async fn connect(port: u16, token: &str) -> WsClient {
    let url = format!("ws://127.0.0.1:{port}{CUSTOMER_PATH}?token={token}");
    try_connect(url.into_client_request().unwrap())
        .await
        .expect("connecting")
        .0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement: run by hand with --ignored --nocapture"]
async fn slow_consumers_do_not_grow_the_nodes_memory() {
    const STALLED: usize = 20;
    const MESSAGES: usize = 2000;
    let queue = std::env::var("MEASURE_OUTBOUND_QUEUE").unwrap_or_else(|_| "256".into());
    let db = TestDatabase::new();
    let server = start_server(
        &db.url,
        &[
            ("WS_OUTBOUND_QUEUE", queue.as_str()),
            ("LOG_LEVEL", "warn,switchboard::startup=info"),
            ("AI_DEMO_TOKEN_DELAY", "0ms"),
            ("RATE_LIMIT_MESSAGES_PER_MINUTE", "0"),
            ("RATE_LIMIT_WS_FRAMES_PER_SECOND", "0"),
        ],
    );
    let pid = server.child.id();
    let base = format!("http://127.0.0.1:{}", server.port);
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    let (token, sid) = guest_with_session(&http, &base).await;

    // Clients that subscribe and then never read another byte.
    let mut stalled = Vec::new();
    for _ in 0..STALLED {
        let mut ws = connect(server.port, &token).await;
        ws.resume(&sid, 0).await;
        stalled.push(ws);
    }
    let mut writer = connect(server.port, &token).await;
    writer.next_of("hello").await;
    let before = rss_kib(pid);
    let filler = "x".repeat(8000);
    let started = Instant::now();
    let mut samples = vec![before];
    let mut last_sample = Instant::now();
    for i in 0..MESSAGES {
        let client_id = format!("big-{i}");
        writer.send_message(&sid, &client_id, &filler).await;
        writer
            .until(|f| f["type"] == "ack" && f["client_id"] == client_id.as_str())
            .await;
        if last_sample.elapsed() > Duration::from_millis(200) {
            samples.push(rss_kib(pid));
            last_sample = Instant::now();
        }
    }
    let after = rss_kib(pid);
    let bounded = queue == "256";
    let mut kicked = 0;
    for mut ws in stalled {
        let wait = Duration::from_secs(if bounded { 20 } else { 1 });
        if ws.drain(wait).await.is_ok() {
            kicked += 1;
        }
    }
    let max = samples.iter().copied().max().unwrap_or(0);
    let sent_mib = (MESSAGES * filler.len()) as f64 / (1024.0 * 1024.0);
    eprintln!(
        "slow consumers: outbound queue {queue}, {STALLED} stalled sockets, {MESSAGES} \
         messages of {} bytes ({sent_mib:.0} MiB written, each routed to every member) in \
         {:?}; server RSS before {before} KiB, peak {max} KiB, after {after} KiB; stalled \
         sockets closed: {kicked}/{STALLED}",
        filler.len(),
        started.elapsed()
    );
    eprintln!("RSS samples (KiB, every ~200 ms): {samples:?}");
    if bounded {
        assert_eq!(kicked, STALLED, "every stalled socket was cut off");
    }
}
