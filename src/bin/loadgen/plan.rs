//! What the coordinator tells a worker process, and what the worker answers: one JSON object
//! per line on the worker's stdin and stdout.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

/// The wire protocol a connection speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Proto {
    /// Switchboard protocol v1.
    Switchboard,
    /// The minimal hub's JSON: `join {room}`, `send {room, content}`, `message {room, content}`.
    Plain,
    /// Socket.IO 4 (engine.io v4 framing) over WebSocket.
    SocketIo,
}

/// What one connection does.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Connects, answers heartbeats, nothing else.
    Idle,
    /// Joins its room and records every marked message it receives.
    Listen,
    /// Joins its room and sends marked messages on a fixed schedule (the round's rate, times
    /// `weight`); does not record its own echo.
    Send { weight: f64 },
    /// Joins its room, then stops reading for good once the first round starts.
    Stall,
    /// Joins its room and keeps `window` messages awaiting their `ack` (closed loop).
    Pump { window: usize },
    /// A customer that asks, reads the streamed answer to its end, and asks again.
    Ask,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ConnSpec {
    pub proto: Proto,
    /// Path and query of the WebSocket URL.
    pub path: String,
    /// The conversation (switchboard) or room (peers) to join.
    pub room: Option<String>,
    pub role: Role,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Plan {
    pub server: SocketAddr,
    pub conns: Vec<ConnSpec>,
    /// Index of this worker; picks the first source address.
    pub worker: usize,
    /// Connection attempts in flight at once.
    pub connect_parallel: usize,
}

/// One measured round, started by a `go` line.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct Round {
    /// Unix time of the first scheduled send, in µs.
    pub t0_us: u64,
    /// Sends are scheduled in `[t0, t0 + duration)`.
    pub duration_us: u64,
    /// After the last send, how long to wait for deliveries before reporting.
    pub drain_us: u64,
    /// Messages per second for each `Send` connection of weight 1.
    pub rate: f64,
}

/// A histogram as `(value, count)` pairs, mergeable across processes.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct Hist(pub Vec<(u64, u64)>);

impl Hist {
    pub fn from_histogram(h: &Histogram<u64>) -> Hist {
        Hist(
            h.iter_recorded()
                .map(|v| (v.value_iterated_to(), v.count_at_value()))
                .collect(),
        )
    }

    pub fn add_to(&self, h: &mut Histogram<u64>) {
        for &(value, count) in &self.0 {
            let _ = h.record_n(value, count);
        }
    }
}

/// New empty latency histogram, in µs, up to an hour, three significant digits.
pub fn histogram() -> Histogram<u64> {
    // The bounds are constants that `new_with_bounds` accepts; it cannot fail with them.
    Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("valid histogram bounds")
}

/// What a worker saw in one round.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct RoundResult {
    /// Messages sent by `Send`, `Pump` and `Ask` connections.
    pub sent: u64,
    /// Marked messages received by `Listen` connections, scheduled in this round.
    pub received: u64,
    /// Marked messages from an earlier round that arrived during this one.
    pub late: u64,
    /// `ack` frames received.
    pub acked: u64,
    /// Delivery latency from the scheduled send time.
    pub latency: Hist,
    /// `ack` latency from the send (switchboard only).
    pub ack_latency: Hist,
    /// How late each scheduled send left this process: the load generator's own share of
    /// every latency.
    pub send_lag: Hist,
    /// AI answers: tokens received, answers finished.
    pub tokens: u64,
    pub replies: u64,
    /// Questions that had no finished answer when the round ended.
    pub unanswered: u64,
    /// Token lag: receive time minus the provider's emit time (when tokens carry it).
    pub token_lag: Hist,
    /// Time between consecutive tokens of one answer.
    pub token_gap: Hist,
    /// From a question to the first token of its answer.
    pub first_token: Hist,
    /// Connections that closed unexpectedly during the round.
    pub closed: u64,
    /// `error` frames by code.
    pub errors: BTreeMap<String, u64>,
    /// This worker's CPU time in this round, in clock ticks.
    pub cpu_ticks: u64,
}

/// The worker's first line: how connecting went.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct Ready {
    pub connected: u64,
    pub failed: u64,
    /// The first few connection errors, for the operator.
    pub failures: Vec<String>,
}

/// The worker's answer to `finish`: what became of the connections that stopped reading.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct Finish {
    /// Stalled connections the server closed (or told `slow_consumer`).
    pub stalled_closed: u64,
    /// Stalled connections still open.
    pub stalled_open: u64,
    /// Connections that closed unexpectedly since they were opened.
    pub closed_total: u64,
}
