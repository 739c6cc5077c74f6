//! The five scenarios. Each sets up its connections, runs its rounds, prints one table and
//! returns the problems it saw (connections that failed, messages lost, error frames), which
//! `--check` turns into a failing exit status.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{anyhow, Context as _};

use crate::clock::Clock;
use crate::coordinator::{Api, Merged, Workers};
use crate::plan::{ConnSpec, Proto, Role, Round};
use crate::proc::{load_average, Sampler, Usage};
use crate::table::{mib, ms, rate, Table};

/// How often the server's CPU time and memory are read.
const SAMPLE_EVERY: Duration = Duration::from_millis(250);
/// Rounds start this far ahead, so every worker has the `go` before the first send.
const LEAD: Duration = Duration::from_millis(500);

pub struct Ctx {
    pub proto: Proto,
    pub server: SocketAddr,
    pub pid: Option<u32>,
    pub label: String,
    pub staff: Option<(String, String)>,
    pub per_worker: usize,
    pub min_workers: usize,
    pub json: bool,
    pub notes: Vec<String>,
    pub clock: Clock,
}

impl Ctx {
    fn sampler(&self) -> Option<Sampler> {
        self.pid
            .map(|pid| Sampler::start(pid, self.clock, SAMPLE_EVERY))
    }

    fn usage(&self, sampler: &Option<Sampler>, from: u64, to: u64) -> Usage {
        sampler
            .as_ref()
            .map(|s| s.usage(from, to))
            .unwrap_or_default()
    }

    fn rss_now(&self, sampler: &Option<Sampler>) -> u64 {
        sampler
            .as_ref()
            .map(|s| s.now(&self.clock).rss_kib)
            .unwrap_or(0)
    }

    fn api(&self) -> anyhow::Result<Api> {
        Api::new(self.server)
    }

    async fn staff_token(&self, api: &Api) -> anyhow::Result<String> {
        let (email, password) = self.staff.as_ref().ok_or_else(|| {
            anyhow!("this scenario needs an agent account: pass --staff-email and --staff-password")
        })?;
        api.login(email, password)
            .await
            .context("signing the agent in")
    }

    /// A connection of this target. On switchboard, `dashboard` picks the staff endpoint,
    /// which also streams the desk feed (every conversation's updates); agents working in
    /// conversations use the chat endpoint with their own token.
    fn conn(&self, token: &str, dashboard: bool, room: Option<String>, role: Role) -> ConnSpec {
        let path = match self.proto {
            Proto::Switchboard if dashboard => format!("/api/v1/admin/chat/ws?token={token}"),
            Proto::Switchboard => format!("/api/v1/chat/ws?token={token}"),
            Proto::Plain => "/".into(),
            Proto::SocketIo => "/socket.io/?EIO=4&transport=websocket".into(),
        };
        ConnSpec {
            proto: self.proto,
            path,
            room,
            role,
        }
    }

    fn table(&self, title: &str, headers: &[&str]) -> Table {
        let mut t = Table::new(format!("{title} — {}", self.label), headers);
        for note in &self.notes {
            t.note(note.clone());
        }
        t
    }

    fn finish_table(&self, mut t: Table, load_before: &str) {
        t.note(format!(
            "load average (1 min) before / after: {load_before} / {}",
            load_average()
        ));
        t.print(self.json);
    }

    async fn round(
        &self,
        workers: &mut Workers,
        duration: Duration,
        drain: Duration,
        rate: f64,
    ) -> anyhow::Result<(Round, Merged)> {
        let round = Round {
            t0_us: self.clock.now_us() + LEAD.as_micros() as u64,
            duration_us: duration.as_micros() as u64,
            drain_us: drain.as_micros() as u64,
            rate,
        };
        let merged = workers.round(round).await?;
        Ok((round, merged))
    }
}

fn check_ready(ready: &crate::plan::Ready, problems: &mut Vec<String>) {
    if ready.failed > 0 {
        problems.push(format!(
            "{} connections failed: {}",
            ready.failed,
            ready.failures.join("; ")
        ));
    }
}

fn cpu_of(ticks: u64, seconds: f64) -> f64 {
    ticks as f64 / crate::proc::ticks_per_second() / seconds * 100.0
}

/// 1. Idle connections: memory per connection and idle CPU at each step.
pub async fn idle(
    ctx: &Ctx,
    steps: &[usize],
    settle: Duration,
    window: Duration,
) -> anyhow::Result<Vec<String>> {
    let load_before = load_average();
    let mut problems = Vec::new();
    let token = match ctx.proto {
        Proto::Switchboard => ctx.api()?.guest().await.context("getting a guest token")?,
        _ => String::new(),
    };
    let sampler = ctx.sampler();
    tokio::time::sleep(settle).await;
    let base = ctx.rss_now(&sampler);
    let mut t = ctx.table(
        "Idle connections",
        &[
            "connections",
            "open",
            "failed",
            "server RSS MiB",
            "KiB / connection",
            "idle CPU %",
        ],
    );
    let mut workers = Workers::default();
    let mut have = 0usize;
    let mut connected = 0u64;
    let mut points = vec![(0f64, base as f64)];
    for &step in steps {
        let add = step.saturating_sub(have);
        let conns = (0..add)
            .map(|_| ctx.conn(&token, false, None, Role::Idle))
            .collect();
        let ready = workers
            .add(ctx.server, conns, ctx.per_worker, ctx.min_workers)
            .await?;
        check_ready(&ready, &mut problems);
        connected += ready.connected;
        have = step;
        tokio::time::sleep(settle).await;
        let from = ctx.clock.now_us();
        tokio::time::sleep(window).await;
        let usage = ctx.usage(&sampler, from, ctx.clock.now_us());
        let rss = ctx.rss_now(&sampler);
        points.push((step as f64, rss as f64));
        t.row(vec![
            step.to_string(),
            connected.to_string(),
            ready.failed.to_string(),
            mib(rss),
            format!(
                "{:.1}",
                rss.saturating_sub(base) as f64 / step.max(1) as f64
            ),
            format!("{:.1}", usage.cpu_percent),
        ]);
    }
    let finish = workers.finish().await?;
    workers.exit().await;
    if finish.closed_total > 0 {
        problems.push(format!(
            "{} idle connections were closed",
            finish.closed_total
        ));
    }
    t.note(format!(
        "server RSS before any connection: {} MiB",
        mib(base)
    ));
    t.note(format!(
        "RSS slope (least squares over the steps): {:.1} KiB per connection",
        slope(&points)
    ));
    t.note(format!(
        "idle CPU measured over {} s after {} s of settling; connections closed during the run: {}",
        window.as_secs(),
        settle.as_secs(),
        finish.closed_total
    ));
    ctx.finish_table(t, &load_before);
    Ok(problems)
}

fn slope(points: &[(f64, f64)]) -> f64 {
    let n = points.len() as f64;
    let (sx, sy) = points
        .iter()
        .fold((0.0, 0.0), |(a, b), p| (a + p.0, b + p.1));
    let (mx, my) = (sx / n, sy / n);
    let num: f64 = points.iter().map(|p| (p.0 - mx) * (p.1 - my)).sum();
    let den: f64 = points.iter().map(|p| (p.0 - mx).powi(2)).sum();
    if den == 0.0 {
        0.0
    } else {
        num / den
    }
}

pub struct Fanout {
    pub subscribers: usize,
    pub rates: Vec<f64>,
    pub step: Duration,
    pub gap: Duration,
    pub drain: Duration,
    pub p99_limit: Duration,
    pub stall: bool,
}

/// 2. Fan-out: one room, one sender, rising rates until p99 passes the limit or a message is lost.
pub async fn fanout(ctx: &Ctx, f: &Fanout) -> anyhow::Result<Vec<String>> {
    let load_before = load_average();
    let mut problems = Vec::new();
    let (token, room) = match ctx.proto {
        Proto::Switchboard => {
            let api = ctx.api()?;
            let token = ctx.staff_token(&api).await?;
            let room = api.create_session(&token).await?;
            (token, room)
        }
        _ => (String::new(), "fan".to_string()),
    };
    let sampler = ctx.sampler();
    let rss_before = ctx.rss_now(&sampler);
    let mut workers = Workers::default();
    let listeners = (0..f.subscribers)
        .map(|_| ctx.conn(&token, false, Some(room.clone()), Role::Listen))
        .collect();
    let ready = workers
        .add(ctx.server, listeners, ctx.per_worker, ctx.min_workers)
        .await?;
    check_ready(&ready, &mut problems);
    // The sender gets a process of its own so that its clock is not held up by deliveries.
    let mut own = vec![ctx.conn(
        &token,
        false,
        Some(room.clone()),
        Role::Send { weight: 1.0 },
    )];
    if f.stall {
        own.push(ctx.conn(&token, false, Some(room.clone()), Role::Stall));
    }
    let ready_own = workers.add(ctx.server, own, usize::MAX, 1).await?;
    check_ready(&ready_own, &mut problems);
    let recipients = ready.connected;
    let rss_joined = ctx.rss_now(&sampler);
    let mut t = ctx.table(
        &format!("Fan-out, one room of {} subscribers", f.subscribers),
        &[
            "msg/s",
            "deliveries/s offered",
            "deliveries/s",
            "p50 ms",
            "p99 ms",
            "p99.9 ms",
            "max ms",
            "lost",
            "errors",
            "server CPU %",
            "server RSS MiB",
            "loadgen CPU %",
        ],
    );
    let mut best: Option<f64> = None;
    for (i, &r) in f.rates.iter().enumerate() {
        let (round, m) = ctx.round(&mut workers, f.step, f.drain, r).await?;
        let seconds = f.step.as_secs_f64();
        let usage = ctx.usage(&sampler, round.t0_us, round.t0_us + round.duration_us);
        let expected = m.sent * recipients;
        let lost = expected.saturating_sub(m.received);
        let p99 = m.latency.value_at_quantile(0.99);
        t.row(vec![
            rate(r),
            rate(r * recipients as f64),
            rate(m.received as f64 / seconds),
            ms(m.latency.value_at_quantile(0.5)),
            ms(p99),
            ms(m.latency.value_at_quantile(0.999)),
            ms(m.latency.max()),
            lost.to_string(),
            m.errors_text(),
            format!("{:.0}", usage.cpu_percent),
            mib(usage.rss_max_kib),
            format!(
                "{:.0}",
                cpu_of(m.cpu_ticks, seconds + f.drain.as_secs_f64())
            ),
        ]);
        if i == 0 && (lost > 0 || m.received == 0 || m.error_count() > 0) {
            problems.push(format!(
                "fan-out at the first rate ({r} msg/s): {lost} of {expected} deliveries lost, errors {}",
                m.errors_text()
            ));
        }
        if lost > 0 || p99 > f.p99_limit.as_micros() as u64 || m.received == 0 {
            break;
        }
        best = Some(r * recipients as f64);
        tokio::time::sleep(f.gap).await;
    }
    let finish = workers.finish().await?;
    workers.exit().await;
    t.note(match best {
        Some(b) => format!(
            "highest rate held (p99 ≤ {} ms, nothing lost): {} deliveries/s",
            f.p99_limit.as_millis(),
            rate(b)
        ),
        None => "no rate was held".into(),
    });
    t.note(format!(
        "server RSS: {} MiB before the room, {} MiB with it joined",
        mib(rss_before),
        mib(rss_joined)
    ));
    if f.stall {
        t.note(format!(
            "one more subscriber stopped reading at the first round: {}",
            if finish.stalled_closed > 0 {
                "the server dropped it (slow consumer)"
            } else {
                "still open at the end: its backlog fitted in the socket buffers and the outbound queue, or the server buffers without bound"
            }
        ));
    }
    t.note(format!(
        "latency from the scheduled send time; each round {} s, then {} s to drain",
        f.step.as_secs(),
        f.drain.as_secs()
    ));
    ctx.finish_table(t, &load_before);
    Ok(problems)
}

pub struct Rooms {
    pub rooms: usize,
    /// switchboard: idle dashboards on the desk feed.
    pub dashboards: usize,
    pub loads: Vec<f64>,
    pub step: Duration,
    pub drain: Duration,
    pub gap: Duration,
}

/// 3. Small rooms: customer, agent and watcher per conversation; the agent writes.
pub async fn rooms(ctx: &Ctx, r: &Rooms) -> anyhow::Result<Vec<String>> {
    let load_before = load_average();
    let mut problems = Vec::new();
    let mut conns = Vec::with_capacity(r.rooms * 3);
    match ctx.proto {
        Proto::Switchboard => {
            let api = ctx.api()?;
            let staff = ctx.staff_token(&api).await?;
            for (customer, room) in api
                .guests_with_sessions(r.rooms)
                .await
                .context("opening conversations")?
            {
                conns.push(ctx.conn(&customer, false, Some(room.clone()), Role::Listen));
                conns.push(ctx.conn(
                    &staff,
                    false,
                    Some(room.clone()),
                    Role::Send { weight: 1.0 },
                ));
                conns.push(ctx.conn(&staff, false, Some(room), Role::Listen));
            }
            conns.extend((0..r.dashboards).map(|_| ctx.conn(&staff, true, None, Role::Idle)));
        }
        _ => {
            for i in 0..r.rooms {
                let room = format!("room-{i}");
                conns.push(ctx.conn("", false, Some(room.clone()), Role::Listen));
                conns.push(ctx.conn("", false, Some(room.clone()), Role::Send { weight: 1.0 }));
                conns.push(ctx.conn("", false, Some(room), Role::Listen));
            }
        }
    }
    let sampler = ctx.sampler();
    let mut workers = Workers::default();
    let ready = workers
        .add(ctx.server, conns, ctx.per_worker, ctx.min_workers)
        .await?;
    check_ready(&ready, &mut problems);
    let mut t = ctx.table(
        &format!("Small rooms, {} conversations of 3", r.rooms),
        &[
            "deliveries/s offered",
            "deliveries/s",
            "p50 ms",
            "p99 ms",
            "p99.9 ms",
            "max ms",
            "ack p99 ms",
            "send lag p99 ms",
            "lost",
            "errors",
            "server CPU %",
            "server waits for CPU %",
            "server switches/s",
            "server RSS MiB",
            "server writes MB/s",
            "loadgen CPU %",
        ],
    );
    for &load in &r.loads {
        // Two recipients per message: the customer and the watcher (the writer's echo is not counted).
        let per_room = load / 2.0 / r.rooms as f64;
        let (round, m) = ctx.round(&mut workers, r.step, r.drain, per_room).await?;
        let seconds = r.step.as_secs_f64();
        let usage = ctx.usage(&sampler, round.t0_us, round.t0_us + round.duration_us);
        let expected = m.sent * 2;
        let lost = expected.saturating_sub(m.received);
        t.row(vec![
            rate(load),
            rate(m.received as f64 / seconds),
            ms(m.latency.value_at_quantile(0.5)),
            ms(m.latency.value_at_quantile(0.99)),
            ms(m.latency.value_at_quantile(0.999)),
            ms(m.latency.max()),
            ms(m.ack_latency.value_at_quantile(0.99)),
            ms(m.send_lag.value_at_quantile(0.99)),
            lost.to_string(),
            m.errors_text(),
            format!("{:.0}", usage.cpu_percent),
            usage.wait_cell(),
            usage.switches_cell(),
            mib(usage.rss_max_kib),
            usage.writes_cell(),
            format!(
                "{:.0}",
                cpu_of(m.cpu_ticks, seconds + r.drain.as_secs_f64())
            ),
        ]);
        if lost > 0 || m.error_count() > 0 || m.received == 0 {
            problems.push(format!(
                "small rooms at {load} deliveries/s: {lost} of {expected} lost, errors {}",
                m.errors_text()
            ));
        }
        tokio::time::sleep(r.gap).await;
    }
    workers.finish().await?;
    workers.exit().await;
    let dashboards = if ctx.proto == Proto::Switchboard {
        r.dashboards
    } else {
        0
    };
    t.note(format!(
        "{} connections open of {} ({} of them dashboards on the desk feed); latency from the scheduled send time to each recipient; send lag: how late the load generator itself sent; rounds of {} s",
        ready.connected,
        r.rooms * 3 + dashboards,
        dashboards,
        r.step.as_secs()
    ));
    ctx.finish_table(t, &load_before);
    Ok(problems)
}

pub struct Ai {
    pub streams: usize,
    pub duration: Duration,
    pub drain: Duration,
}

/// 4. AI answers: S customers each asking again as soon as an answer ends.
pub async fn ai(ctx: &Ctx, a: &Ai) -> anyhow::Result<Vec<String>> {
    let load_before = load_average();
    let mut problems = Vec::new();
    if ctx.proto != Proto::Switchboard {
        anyhow::bail!("the AI scenario needs switchboard");
    }
    let api = ctx.api()?;
    let conns = api
        .guests_with_sessions(a.streams)
        .await
        .context("opening conversations")?
        .into_iter()
        .map(|(token, room)| ctx.conn(&token, false, Some(room), Role::Ask))
        .collect();
    let sampler = ctx.sampler();
    let mut workers = Workers::default();
    let ready = workers
        .add(ctx.server, conns, ctx.per_worker, ctx.min_workers)
        .await?;
    check_ready(&ready, &mut problems);
    let rss_before = ctx.rss_now(&sampler);
    let (round, m) = ctx.round(&mut workers, a.duration, a.drain, 0.0).await?;
    // Measure once every stream has started (they start within the first second).
    let from = round.t0_us + (round.duration_us / 4).min(2_000_000);
    let usage = ctx.usage(&sampler, from, round.t0_us + round.duration_us);
    let seconds = a.duration.as_secs_f64();
    let streams = a.streams as f64;
    let mut t = ctx.table(
        &format!("AI answers, {} streaming at once", a.streams),
        &[
            "streams",
            "answers",
            "tokens/s",
            "token lag p50 ms",
            "token lag p99 ms",
            "token gap p50 ms",
            "token gap p99 ms",
            "first token p99 ms",
            "unfinished",
            "errors",
            "server CPU %",
            "CPU % / stream",
            "RSS KiB / stream",
        ],
    );
    let lag = |q: f64| {
        if m.token_lag.is_empty() {
            "n/a".to_string()
        } else {
            ms(m.token_lag.value_at_quantile(q))
        }
    };
    t.row(vec![
        a.streams.to_string(),
        m.replies.to_string(),
        rate(m.tokens as f64 / (seconds + a.drain.as_secs_f64())),
        lag(0.5),
        lag(0.99),
        ms(m.token_gap.value_at_quantile(0.5)),
        ms(m.token_gap.value_at_quantile(0.99)),
        ms(m.first_token.value_at_quantile(0.99)),
        m.unanswered.to_string(),
        m.errors_text(),
        format!("{:.0}", usage.cpu_percent),
        format!("{:.3}", usage.cpu_percent / streams),
        format!(
            "{:.1}",
            usage.rss_max_kib.saturating_sub(rss_before) as f64 / streams
        ),
    ]);
    if m.replies == 0 || m.unanswered > 0 || m.error_count() > 0 {
        problems.push(format!(
            "AI answers: {} finished, {} unfinished, errors {}",
            m.replies,
            m.unanswered,
            m.errors_text()
        ));
    }
    workers.finish().await?;
    workers.exit().await;
    t.note(format!(
        "customers ask again as soon as an answer ends, for {} s; CPU and RSS from 2 s in to the end of asking; RSS before {} MiB",
        a.duration.as_secs(),
        mib(rss_before)
    ));
    t.note("token lag: receive time minus the provider's emit time stamped in each token (n/a when the provider does not stamp them); token gap: time between two tokens of one answer");
    ctx.finish_table(t, &load_before);
    Ok(problems)
}

pub struct Persist {
    pub senders: usize,
    pub window: usize,
    pub duration: Duration,
    pub drain: Duration,
}

/// 5. Persistence: acknowledged messages per second, closed loop.
pub async fn persist(ctx: &Ctx, p: &Persist) -> anyhow::Result<Vec<String>> {
    let load_before = load_average();
    let mut problems = Vec::new();
    if ctx.proto != Proto::Switchboard {
        anyhow::bail!("the persistence scenario needs switchboard");
    }
    let api = ctx.api()?;
    let staff = ctx.staff_token(&api).await?;
    let conns = api
        .sessions(&staff, p.senders)
        .await
        .context("opening conversations")?
        .into_iter()
        .map(|room| ctx.conn(&staff, false, Some(room), Role::Pump { window: p.window }))
        .collect();
    let sampler = ctx.sampler();
    let mut workers = Workers::default();
    let ready = workers
        .add(ctx.server, conns, ctx.per_worker, ctx.min_workers)
        .await?;
    check_ready(&ready, &mut problems);
    let (round, m) = ctx.round(&mut workers, p.duration, p.drain, 0.0).await?;
    let usage = ctx.usage(&sampler, round.t0_us, round.t0_us + round.duration_us);
    let seconds = p.duration.as_secs_f64();
    let mut t = ctx.table(
        "Persistence, acknowledged messages",
        &[
            "senders × window",
            "acked msg/s",
            "ack p50 ms",
            "ack p99 ms",
            "ack max ms",
            "errors",
            "server CPU %",
            "server RSS MiB",
            "server writes MB/s",
        ],
    );
    t.row(vec![
        format!("{} × {}", p.senders, p.window),
        rate(m.acked as f64 / seconds),
        ms(m.ack_latency.value_at_quantile(0.5)),
        ms(m.ack_latency.value_at_quantile(0.99)),
        ms(m.ack_latency.max()),
        m.errors_text(),
        format!("{:.0}", usage.cpu_percent),
        mib(usage.rss_max_kib),
        usage.writes_cell(),
    ]);
    if m.acked == 0 || m.error_count() > 0 {
        problems.push(format!(
            "persistence: {} acked, errors {}",
            m.acked,
            m.errors_text()
        ));
    }
    workers.finish().await?;
    workers.exit().await;
    t.note(format!(
        "closed loop for {} s: each sender keeps {} messages awaiting their ack, each in a conversation of its own",
        p.duration.as_secs(),
        p.window
    ));
    ctx.finish_table(t, &load_before);
    Ok(problems)
}
