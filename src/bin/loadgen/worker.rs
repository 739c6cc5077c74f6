//! A worker process: holds its share of the connections on one thread, runs the rounds the
//! coordinator starts, and reports what it measured. Reads commands on stdin (the plan, then
//! `go <round>`, `finish`, `exit`), answers on stdout (`ready`, `result`, `finish`).

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::rc::Rc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context as _};
use futures_util::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::mpsc::UnboundedReceiver;
use tokio::sync::{mpsc, watch, Semaphore};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

use crate::clock::Clock;
use crate::pacer;
use crate::plan::{
    histogram, ConnSpec, Finish, Hist, Plan, Proto, Ready, Role, Round, RoundResult,
};

type Ws = WebSocketStream<TcpStream>;

/// How long one connection may take to connect and join before it counts as failed.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a stalled connection is read at `finish` to see whether the server closed it: the
/// backlog in the socket buffers (megabytes) comes first.
const STALL_PROBE: Duration = Duration::from_secs(10);
/// Source addresses the connections are spread over (127.0.0.2 …): each gives its own range
/// of ephemeral ports.
const SOURCE_ADDRESSES: u8 = 8;
/// Connection errors repeated in the `ready` line.
const FAILURES_SHOWN: usize = 5;

/// Live counters of the current round.
struct Stats {
    sent: u64,
    received: u64,
    late: u64,
    acked: u64,
    latency: Histogram<u64>,
    ack_latency: Histogram<u64>,
    send_lag: Histogram<u64>,
    tokens: u64,
    replies: u64,
    token_lag: Histogram<u64>,
    token_gap: Histogram<u64>,
    first_token: Histogram<u64>,
    closed: u64,
    errors: BTreeMap<String, u64>,
}

impl Stats {
    fn new() -> Stats {
        Stats {
            sent: 0,
            received: 0,
            late: 0,
            acked: 0,
            latency: histogram(),
            ack_latency: histogram(),
            send_lag: histogram(),
            tokens: 0,
            replies: 0,
            token_lag: histogram(),
            token_gap: histogram(),
            first_token: histogram(),
            closed: 0,
            errors: BTreeMap::new(),
        }
    }

    fn result(&self, unanswered: u64, cpu_ticks: u64) -> RoundResult {
        RoundResult {
            sent: self.sent,
            received: self.received,
            late: self.late,
            acked: self.acked,
            latency: Hist::from_histogram(&self.latency),
            ack_latency: Hist::from_histogram(&self.ack_latency),
            send_lag: Hist::from_histogram(&self.send_lag),
            tokens: self.tokens,
            replies: self.replies,
            unanswered,
            token_lag: Hist::from_histogram(&self.token_lag),
            token_gap: Hist::from_histogram(&self.token_gap),
            first_token: Hist::from_histogram(&self.first_token),
            closed: self.closed,
            errors: self.errors.clone(),
            cpu_ticks,
        }
    }
}

struct Shared {
    clock: Clock,
    stats: RefCell<Stats>,
    /// The round under way (its scheduled sends may be over; deliveries still count).
    round: Cell<Option<Round>>,
    /// Questions without a finished answer.
    asking: Cell<u64>,
    /// Connections closed unexpectedly since the start (never reset).
    closed_total: Cell<u64>,
}

impl Shared {
    fn error(&self, code: &str) {
        *self
            .stats
            .borrow_mut()
            .errors
            .entry(code.to_string())
            .or_default() += 1;
    }
}

pub fn run() -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the worker's runtime")?;
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, work())
}

async fn work() -> anyhow::Result<()> {
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    let first = lines
        .next_line()
        .await?
        .ok_or_else(|| anyhow!("no plan on stdin"))?;
    let plan: Plan = serde_json::from_str(&first).context("reading the plan")?;
    let shared = Rc::new(Shared {
        clock: Clock::new(),
        stats: RefCell::new(Stats::new()),
        round: Cell::new(None),
        asking: Cell::new(0),
        closed_total: Cell::new(0),
    });
    let (round_tx, round_rx) = watch::channel::<Option<Round>>(None);
    let (finish_tx, finish_rx) = watch::channel(false);
    let (ready_tx, mut ready_rx) = mpsc::channel::<Result<(), String>>(plan.conns.len().max(1));
    let (stall_tx, mut stall_rx) = mpsc::channel::<bool>(plan.conns.len().max(1));
    let gate = Rc::new(Semaphore::new(plan.connect_parallel.max(1)));
    let total = plan.conns.len();
    let stalls = plan.conns.iter().filter(|c| c.role == Role::Stall).count();
    // The sending connections' hand-offs from the pacer, by weight.
    let mut senders: Vec<pacer::Sender> = Vec::new();
    for (index, spec) in plan.conns.into_iter().enumerate() {
        let sends = match spec.role {
            Role::Send { weight } => {
                let (tx, rx) = mpsc::unbounded_channel();
                senders.push(pacer::Sender { tx, weight });
                Some(rx)
            }
            _ => None,
        };
        let octet = 2 + ((plan.worker + index) % SOURCE_ADDRESSES as usize) as u8;
        let conn = Conn {
            index: plan.worker * 1_000_000 + index,
            spec,
            server: plan.server,
            source: IpAddr::V4(Ipv4Addr::new(127, 0, 0, octet)),
            shared: shared.clone(),
        };
        let gate = gate.clone();
        let ready_tx = ready_tx.clone();
        let (round_rx, finish_rx, stall_tx) =
            (round_rx.clone(), finish_rx.clone(), stall_tx.clone());
        tokio::task::spawn_local(async move {
            let permit = gate.acquire().await;
            let opened = tokio::time::timeout(CONNECT_TIMEOUT, conn.open()).await;
            drop(permit);
            match opened {
                Ok(Ok(ws)) => {
                    let _ = ready_tx.send(Ok(())).await;
                    conn.run(ws, round_rx, finish_rx, stall_tx, sends).await;
                }
                Ok(Err(e)) => {
                    let _ = ready_tx.send(Err(format!("{e:#}"))).await;
                }
                Err(_) => {
                    let _ = ready_tx.send(Err("timed out connecting".into())).await;
                }
            }
        });
    }
    drop(ready_tx);
    let mut ready = Ready::default();
    for _ in 0..total {
        match ready_rx.recv().await {
            Some(Ok(())) => ready.connected += 1,
            Some(Err(e)) => {
                ready.failed += 1;
                if ready.failures.len() < FAILURES_SHOWN {
                    ready.failures.push(e);
                }
            }
            None => break,
        }
    }
    say("ready", &ready)?;

    while let Some(line) = lines.next_line().await? {
        let (command, arg) = line.split_once(' ').unwrap_or((line.as_str(), ""));
        match command {
            "go" => {
                let round: Round = serde_json::from_str(arg).context("reading a round")?;
                *shared.stats.borrow_mut() = Stats::new();
                shared.asking.set(0);
                let cpu_before = crate::proc::self_cpu_ticks();
                shared.round.set(Some(round));
                let _ = round_tx.send(Some(round));
                let round_senders = senders.clone();
                let clock = shared.clock;
                tokio::task::spawn_local(async move {
                    if let Err(e) = pacer::run(round_senders, round, clock).await {
                        eprintln!("switchboard-loadgen: timing the sends failed: {e}");
                    }
                });
                let end = round.t0_us + round.duration_us + round.drain_us;
                tokio::time::sleep_until(shared.clock.instant_at(end)).await;
                let cpu = crate::proc::self_cpu_ticks().saturating_sub(cpu_before);
                let result = shared.stats.borrow().result(shared.asking.get(), cpu);
                say("result", &result)?;
            }
            "finish" => {
                let _ = finish_tx.send(true);
                let mut finish = Finish {
                    closed_total: shared.closed_total.get(),
                    ..Finish::default()
                };
                for _ in 0..stalls {
                    match stall_rx.recv().await {
                        Some(true) => finish.stalled_closed += 1,
                        Some(false) => finish.stalled_open += 1,
                        None => break,
                    }
                }
                say("finish", &finish)?;
            }
            "exit" => break,
            other => bail!("unknown command `{other}`"),
        }
    }
    // Thousands of sockets: let the kernel close them all at once.
    std::process::exit(0);
}

fn say<T: serde::Serialize>(what: &str, value: &T) -> anyhow::Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    writeln!(out, "{what} {}", serde_json::to_string(value)?)?;
    out.flush()?;
    Ok(())
}

struct Conn {
    index: usize,
    spec: ConnSpec,
    server: SocketAddr,
    source: IpAddr,
    shared: Rc<Shared>,
}

impl Conn {
    /// Connects from this connection's source address and joins its room.
    async fn open(&self) -> anyhow::Result<Ws> {
        let socket = TcpSocket::new_v4()?;
        socket
            .bind(SocketAddr::new(self.source, 0))
            .with_context(|| format!("binding {}", self.source))?;
        let stream = socket
            .connect(self.server)
            .await
            .with_context(|| format!("connecting to {}", self.server))?;
        stream.set_nodelay(true)?;
        let url = format!("ws://{}{}", self.server, self.spec.path);
        let config = WebSocketConfig {
            write_buffer_size: 0,
            ..WebSocketConfig::default()
        };
        let (mut ws, _) = tokio_tungstenite::client_async_with_config(url, stream, Some(config))
            .await
            .context("WebSocket handshake")?;
        let room = self.spec.room.as_deref();
        match self.spec.proto {
            Proto::Switchboard => {
                if let (Some(room), true) = (room, self.spec.role != Role::Idle) {
                    let resume =
                        format!(r#"{{"type":"resume","session_id":"{room}","after_seq":0}}"#);
                    ws.send(Message::text(resume)).await?;
                    wait_for(&mut ws, Proto::Switchboard, |t| {
                        t.starts_with(r#"{"type":"resumed""#)
                    })
                    .await?;
                }
            }
            Proto::Plain => {
                if let (Some(room), true) = (room, self.spec.role != Role::Idle) {
                    ws.send(Message::text(format!(
                        r#"{{"type":"join","room":"{room}"}}"#
                    )))
                    .await?;
                    wait_for(&mut ws, Proto::Plain, |t| {
                        t.starts_with(r#"{"type":"joined""#)
                    })
                    .await?;
                }
            }
            Proto::SocketIo => {
                wait_for(&mut ws, Proto::SocketIo, |t| t.starts_with('0')).await?;
                ws.send(Message::text("40")).await?;
                wait_for(&mut ws, Proto::SocketIo, |t| t.starts_with("40")).await?;
                if let (Some(room), true) = (room, self.spec.role != Role::Idle) {
                    ws.send(Message::text(format!(r#"42["join","{room}"]"#)))
                        .await?;
                    wait_for(&mut ws, Proto::SocketIo, |t| {
                        t.starts_with(r#"42["joined""#)
                    })
                    .await?;
                }
            }
        }
        Ok(ws)
    }

    async fn run(
        self,
        mut ws: Ws,
        mut round_rx: watch::Receiver<Option<Round>>,
        mut finish_rx: watch::Receiver<bool>,
        stall_tx: mpsc::Sender<bool>,
        mut sends: Option<UnboundedReceiver<u64>>,
    ) {
        let clock = self.shared.clock;
        let mut stalled = false;
        let mut n: u64 = 0;
        // Pump and Ask: what is in flight.
        let mut in_flight: usize = 0;
        let mut ask = AskState::default();
        let mut open = true;
        loop {
            tokio::select! {
                biased;
                changed = round_rx.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    let Some(round) = *round_rx.borrow_and_update() else { continue };
                    match self.spec.role {
                        Role::Stall => stalled = true,
                        Role::Pump { window } if open => {
                            tokio::time::sleep_until(clock.instant_at(round.t0_us)).await;
                            while in_flight < window {
                                if self.send_marked(&mut ws, clock.now_us(), &mut n).await.is_err() {
                                    break;
                                }
                                in_flight += 1;
                            }
                        }
                        Role::Ask if open => {
                            // Spread the first questions over the first second.
                            let start = round.t0_us + (rand::random::<f64>() * 1e6) as u64;
                            tokio::time::sleep_until(clock.instant_at(start)).await;
                            if self.ask(&mut ws, &mut ask).await.is_err() {
                                open = false;
                            }
                        }
                        _ => {}
                    }
                }
                _ = finish_rx.changed(), if stalled => {
                    let closed = probe_closed(&mut ws).await;
                    let _ = stall_tx.send(closed).await;
                    return;
                }
                frame = ws.next(), if !stalled && open => {
                    let text = match frame {
                        Some(Ok(Message::Text(text))) => text,
                        Some(Ok(Message::Close(_))) | None | Some(Err(_)) => {
                            self.shared.stats.borrow_mut().closed += 1;
                            self.shared.closed_total.set(self.shared.closed_total.get() + 1);
                            open = false;
                            // The pacer stops timing this connection's sends.
                            sends = None;
                            continue;
                        }
                        Some(Ok(_)) => continue,
                    };
                    if self.spec.proto == Proto::SocketIo && text == "2" {
                        let _ = ws.send(Message::text("3")).await;
                        continue;
                    }
                    self.on_text(&text, &mut ws, &mut in_flight, &mut n, &mut ask).await;
                }
                Some(sched) = next_send(&mut sends), if open => {
                    let lag = clock.now_us().saturating_sub(sched);
                    let _ = self.shared.stats.borrow_mut().send_lag.record(lag.max(1));
                    if self.send_marked(&mut ws, sched, &mut n).await.is_err() {
                        open = false;
                        sends = None;
                    }
                }
            }
        }
    }

    /// Sends one marked message stamped with `sched`, its scheduled send time.
    async fn send_marked(&self, ws: &mut Ws, sched: u64, n: &mut u64) -> anyhow::Result<()> {
        *n += 1;
        let room = self.spec.room.as_deref().unwrap_or("");
        let text = match self.spec.proto {
            Proto::Switchboard => format!(
                r#"{{"type":"send","session_id":"{room}","client_id":"lg{sched}-{}-{n}","content":"lg {sched} {n}"}}"#,
                self.index
            ),
            Proto::Plain => {
                format!(r#"{{"type":"send","room":"{room}","content":"lg {sched} {n}"}}"#)
            }
            Proto::SocketIo => format!(r#"42["send","{room}","lg {sched} {n}"]"#),
        };
        self.shared.stats.borrow_mut().sent += 1;
        ws.send(Message::text(text)).await?;
        Ok(())
    }

    async fn ask(&self, ws: &mut Ws, ask: &mut AskState) -> anyhow::Result<()> {
        let room = self.spec.room.as_deref().unwrap_or("");
        ask.asked += 1;
        let text = format!(
            r#"{{"type":"send","session_id":"{room}","client_id":"q-{}-{}","content":"How do I reset my password? (question {})"}}"#,
            self.index, ask.asked, ask.asked
        );
        ask.asked_at = self.shared.clock.now_us();
        ask.last_token = None;
        ask.waiting = true;
        self.shared.stats.borrow_mut().sent += 1;
        self.shared.asking.set(self.shared.asking.get() + 1);
        ws.send(Message::text(text)).await?;
        Ok(())
    }

    async fn on_text(
        &self,
        text: &str,
        ws: &mut Ws,
        in_flight: &mut usize,
        n: &mut u64,
        ask: &mut AskState,
    ) {
        let now = self.shared.clock.now_us();
        let round = self.shared.round.get();
        if self.spec.proto == Proto::Switchboard {
            if text.starts_with(r#"{"type":"error""#) {
                let code = field(text, "code").unwrap_or("unknown");
                self.shared.error(code);
                return;
            }
            if text.starts_with(r#"{"type":"ack""#) {
                if let Some(sent) = text
                    .find(r#""client_id":"lg"#)
                    .and_then(|i| number_at(&text[i + 15..]))
                {
                    let mut stats = self.shared.stats.borrow_mut();
                    // Throughput counts acks within the sending window only.
                    if round.is_some_and(|r| now <= r.t0_us + r.duration_us) {
                        stats.acked += 1;
                    }
                    let _ = stats.ack_latency.record(now.saturating_sub(sent).max(1));
                }
                if let (Role::Pump { .. }, Some(round)) = (self.spec.role, round) {
                    *in_flight = in_flight.saturating_sub(1);
                    if now < round.t0_us + round.duration_us
                        && self.send_marked(ws, now, n).await.is_ok()
                    {
                        *in_flight += 1;
                    }
                }
                return;
            }
            if self.spec.role == Role::Ask {
                self.on_answer(text, now, ws, ask, round).await;
                return;
            }
            // Only the `message` frame is a delivery. Staff sockets also get the dashboard's
            // `session_updates`, whose `last_message` repeats the marked text a flush later:
            // counting it would count a message twice and hide one that never came.
            if !text.starts_with(r#"{"type":"message""#) {
                return;
            }
        }
        if self.spec.role != Role::Listen {
            return;
        }
        let Some(sched) = text.find("\"lg ").and_then(|i| number_at(&text[i + 4..])) else {
            return;
        };
        let mut stats = self.shared.stats.borrow_mut();
        match round {
            Some(r) if sched >= r.t0_us => {
                stats.received += 1;
                let _ = stats.latency.record(now.saturating_sub(sched).max(1));
            }
            _ => stats.late += 1,
        }
    }

    async fn on_answer(
        &self,
        text: &str,
        now: u64,
        ws: &mut Ws,
        ask: &mut AskState,
        round: Option<Round>,
    ) {
        if text.starts_with(r#"{"type":"token""#) {
            let mut stats = self.shared.stats.borrow_mut();
            stats.tokens += 1;
            match ask.last_token {
                None if ask.waiting => {
                    let _ = stats
                        .first_token
                        .record(now.saturating_sub(ask.asked_at).max(1));
                }
                Some(last) => {
                    let _ = stats.token_gap.record(now.saturating_sub(last).max(1));
                }
                None => {}
            }
            ask.last_token = Some(now);
            // The fake provider stamps each token with its emit time: `@<µs>`.
            if let Some(emitted) = text
                .find("\"delta\":\"")
                .and_then(|i| text[i..].find('@').map(|j| i + j + 1))
                .and_then(|i| number_at(&text[i..]))
            {
                let _ = stats.token_lag.record(now.saturating_sub(emitted).max(1));
            }
        } else if text.starts_with(r#"{"type":"reply_done""#) && ask.waiting {
            ask.waiting = false;
            self.shared.stats.borrow_mut().replies += 1;
            self.shared
                .asking
                .set(self.shared.asking.get().saturating_sub(1));
            if round.is_some_and(|r| now < r.t0_us + r.duration_us)
                && self.ask(ws, ask).await.is_err()
            {
                self.shared.stats.borrow_mut().closed += 1;
            }
        }
    }
}

#[derive(Default)]
struct AskState {
    asked: u64,
    asked_at: u64,
    last_token: Option<u64>,
    waiting: bool,
}

/// The next send the pacer hands this connection; never, for a connection that does not send.
async fn next_send(sends: &mut Option<UnboundedReceiver<u64>>) -> Option<u64> {
    match sends {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

/// Reads frames until one satisfies `done`, answering engine.io pings on the way.
async fn wait_for(ws: &mut Ws, proto: Proto, done: impl Fn(&str) -> bool) -> anyhow::Result<()> {
    while let Some(frame) = ws.next().await {
        let Message::Text(text) = frame? else {
            continue;
        };
        if done(&text) {
            return Ok(());
        }
        if proto == Proto::SocketIo && text == "2" {
            ws.send(Message::text("3")).await?;
        }
        if proto == Proto::Switchboard && text.starts_with(r#"{"type":"error""#) {
            bail!("the server refused: {text}");
        }
    }
    bail!("the server closed the connection while joining")
}

/// Whether the server has closed (or is closing) a connection that stopped reading.
async fn probe_closed(ws: &mut Ws) -> bool {
    let probe = async {
        loop {
            match ws.next().await {
                None | Some(Err(_)) | Some(Ok(Message::Close(_))) => return true,
                Some(Ok(Message::Text(t))) if t.contains("slow_consumer") => return true,
                Some(Ok(_)) => {}
            }
        }
    };
    tokio::time::timeout(STALL_PROBE, probe)
        .await
        .unwrap_or(false)
}

/// The string value of `"name":"…"` in a flat JSON text, without unescaping.
fn field<'a>(text: &'a str, name: &str) -> Option<&'a str> {
    let key = format!("\"{name}\":\"");
    let start = text.find(&key)? + key.len();
    let len = text[start..].find('"')?;
    Some(&text[start..start + len])
}

/// The decimal number at the start of `text`.
fn number_at(text: &str) -> Option<u64> {
    let digits = text.bytes().take_while(u8::is_ascii_digit).count();
    text[..digits].parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_are_found_in_each_protocol() {
        let sb = r#"{"type":"message","session_id":"s","seq":3,"role":"agent","author_id":"a","content":"lg 1700000000123456 7","client_id":"lg1700000000123456-1-7"}"#;
        let at = sb.find("\"lg ").unwrap();
        assert_eq!(number_at(&sb[at + 4..]), Some(1_700_000_000_123_456));
        let sio = r#"42["message","lg 42 1"]"#;
        let at = sio.find("\"lg ").unwrap();
        assert_eq!(number_at(&sio[at + 4..]), Some(42));
        assert_eq!(
            field(r#"{"type":"error","code":"slow_consumer"}"#, "code"),
            Some("slow_consumer")
        );
    }
}
