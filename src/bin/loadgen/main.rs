//! `switchboard-loadgen`: opens many WebSocket connections to switchboard, to the minimal hub
//! (`switchboard-plain-hub`) or to a Socket.IO server, sends on a fixed schedule and reports
//! latency (from the scheduled send time, so a slow server cannot hide its queueing), delivery
//! rate, errors, and the server's CPU, memory and file writes read from `/proc/<pid>`.
//!
//! The process that is started coordinates: it sets up accounts and conversations, then starts
//! worker processes of its own binary (`worker`), each holding a share of the connections on one
//! thread, bound to source addresses 127.0.0.2 … 127.0.0.9 in turn. `scripts/bench` runs every
//! scenario against every server; see `docs/benchmarks.md`.

mod clock;
mod coordinator;
mod fake_openai;
mod pacer;
mod plan;
mod proc;
mod scenarios;
mod table;
mod worker;

use std::net::SocketAddr;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};

use crate::plan::Proto;
use crate::scenarios::Ctx;

#[derive(Parser)]
#[command(
    name = "switchboard-loadgen",
    about = "Load generator for switchboard and its peers"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum Target {
    Switchboard,
    Plain,
    Socketio,
}

#[derive(clap::Args)]
struct Common {
    /// The server under load.
    #[arg(long, value_enum, default_value = "switchboard")]
    target: Target,
    /// Its address.
    #[arg(long, default_value = "127.0.0.1:8080")]
    addr: SocketAddr,
    /// Its process id, to read CPU time, memory and file writes from /proc.
    #[arg(long)]
    pid: Option<u32>,
    /// Name of the run in the table title (e.g. "switchboard, PostgreSQL").
    #[arg(long)]
    label: Option<String>,
    /// An agent account (switchboard: fan-out, small rooms and persistence write as an agent).
    #[arg(long, env = "LOADGEN_STAFF_EMAIL")]
    staff_email: Option<String>,
    #[arg(long, env = "LOADGEN_STAFF_PASSWORD")]
    staff_password: Option<String>,
    /// Most connections per worker process (a process may hold about 20,000 open files).
    #[arg(long, default_value_t = 4000)]
    per_worker: usize,
    /// Fewest worker processes for the connections that receive (default: one per core).
    #[arg(long)]
    min_workers: Option<usize>,
    /// Also print each table as one JSON line.
    #[arg(long)]
    json: bool,
    /// Exit with status 1 when a scenario saw failed connections, losses or error frames.
    #[arg(long)]
    check: bool,
    /// A line added under the table.
    #[arg(long)]
    note: Vec<String>,
}

#[derive(Subcommand)]
enum Command {
    /// 1. Idle connections: memory per connection and idle CPU.
    Idle {
        #[command(flatten)]
        common: Common,
        /// Connection counts to ramp through.
        #[arg(long, value_delimiter = ',', default_value = "5000,10000,19000")]
        steps: Vec<usize>,
        /// Seconds to wait after each ramp before measuring.
        #[arg(long, default_value_t = 3.0)]
        settle: f64,
        /// Seconds over which idle CPU is measured.
        #[arg(long, default_value_t = 10.0)]
        window: f64,
    },
    /// 2. Fan-out: one room, one sender at rising rates.
    Fanout {
        #[command(flatten)]
        common: Common,
        #[arg(long, default_value_t = 1000)]
        subscribers: usize,
        /// Messages per second, one round each, until p99 passes the limit or a message is lost.
        #[arg(
            long,
            value_delimiter = ',',
            default_value = "10,25,50,100,200,400,800"
        )]
        rates: Vec<f64>,
        #[arg(long, default_value_t = 5.0)]
        step: f64,
        #[arg(long, default_value_t = 2.0)]
        gap: f64,
        #[arg(long, default_value_t = 2.0)]
        drain: f64,
        #[arg(long, default_value_t = 250.0)]
        p99_limit_ms: f64,
        /// Leave out the subscriber that stops reading.
        #[arg(long)]
        no_stall: bool,
    },
    /// 3. Small rooms: conversations of customer, agent and watcher at fixed offered loads.
    Rooms {
        #[command(flatten)]
        common: Common,
        #[arg(long, default_value_t = 6000)]
        rooms: usize,
        /// Offered deliveries per second, one round each.
        #[arg(long, value_delimiter = ',', default_value = "2000,10000,20000")]
        loads: Vec<f64>,
        #[arg(long, default_value_t = 10.0)]
        step: f64,
        #[arg(long, default_value_t = 2.0)]
        drain: f64,
        /// switchboard: agent dashboards open on the desk feed besides the rooms (they get
        /// every conversation's updates; none by default, as the peers have no desk).
        #[arg(long, default_value_t = 0)]
        dashboards: usize,
        #[arg(long, default_value_t = 2.0)]
        gap: f64,
    },
    /// 4. AI answers streaming at once.
    Ai {
        #[command(flatten)]
        common: Common,
        #[arg(long, default_value_t = 100)]
        streams: usize,
        /// Seconds during which customers keep asking.
        #[arg(long, default_value_t = 20.0)]
        duration: f64,
        /// Seconds to wait for the answers in flight to end.
        #[arg(long, default_value_t = 15.0)]
        drain: f64,
    },
    /// 5. Persistence: acknowledged messages per second.
    Persist {
        #[command(flatten)]
        common: Common,
        #[arg(long, default_value_t = 64)]
        senders: usize,
        #[arg(long, default_value_t = 16)]
        window: usize,
        #[arg(long, default_value_t = 10.0)]
        duration: f64,
        #[arg(long, default_value_t = 3.0)]
        drain: f64,
    },
    /// An OpenAI-compatible model server that streams stamped tokens at a fixed pace.
    FakeOpenai {
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: SocketAddr,
        /// Tokens per second of each answer.
        #[arg(long, default_value_t = 30.0)]
        rate: f64,
        /// Tokens per answer.
        #[arg(long, default_value_t = 300)]
        tokens: usize,
    },
    /// (internal) A worker process; reads its plan on stdin.
    Worker,
}

fn secs(s: f64) -> Duration {
    Duration::from_secs_f64(s.max(0.0))
}

fn main() {
    let cli = Cli::parse();
    let outcome = match cli.command {
        Command::Worker => worker::run().map(|()| true),
        command => coordinate(command),
    };
    match outcome {
        Ok(true) => {}
        Ok(false) => std::process::exit(1),
        Err(e) => {
            eprintln!("switchboard-loadgen: {e:#}");
            std::process::exit(2);
        }
    }
}

/// Runs a scenario (or the fake provider); `Ok(false)` when `--check` found problems.
fn coordinate(command: Command) -> anyhow::Result<bool> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let (common, problems) = match command {
            Command::FakeOpenai {
                listen,
                rate,
                tokens,
            } => {
                fake_openai::serve(listen, rate, tokens).await?;
                return Ok(true);
            }
            Command::Worker => unreachable!("handled in main"),
            Command::Idle {
                common,
                steps,
                settle,
                window,
            } => {
                let ctx = context(&common);
                let p = scenarios::idle(&ctx, &steps, secs(settle), secs(window)).await?;
                (common, p)
            }
            Command::Fanout {
                common,
                subscribers,
                rates,
                step,
                gap,
                drain,
                p99_limit_ms,
                no_stall,
            } => {
                let ctx = context(&common);
                let f = scenarios::Fanout {
                    subscribers,
                    rates,
                    step: secs(step),
                    gap: secs(gap),
                    drain: secs(drain),
                    p99_limit: Duration::from_secs_f64(p99_limit_ms / 1000.0),
                    stall: !no_stall,
                };
                let p = scenarios::fanout(&ctx, &f).await?;
                (common, p)
            }
            Command::Rooms {
                common,
                rooms,
                loads,
                step,
                drain,
                dashboards,
                gap,
            } => {
                let ctx = context(&common);
                let r = scenarios::Rooms {
                    rooms,
                    dashboards,
                    loads,
                    step: secs(step),
                    drain: secs(drain),
                    gap: secs(gap),
                };
                let p = scenarios::rooms(&ctx, &r).await?;
                (common, p)
            }
            Command::Ai {
                common,
                streams,
                duration,
                drain,
            } => {
                let ctx = context(&common);
                let a = scenarios::Ai {
                    streams,
                    duration: secs(duration),
                    drain: secs(drain),
                };
                let p = scenarios::ai(&ctx, &a).await?;
                (common, p)
            }
            Command::Persist {
                common,
                senders,
                window,
                duration,
                drain,
            } => {
                let ctx = context(&common);
                let p = scenarios::Persist {
                    senders,
                    window,
                    duration: secs(duration),
                    drain: secs(drain),
                };
                let problems = scenarios::persist(&ctx, &p).await?;
                (common, problems)
            }
        };
        for p in &problems {
            eprintln!("problem: {p}");
        }
        Ok(!common.check || problems.is_empty())
    })
}

fn context(common: &Common) -> Ctx {
    let proto = match common.target {
        Target::Switchboard => Proto::Switchboard,
        Target::Plain => Proto::Plain,
        Target::Socketio => Proto::SocketIo,
    };
    let label = common.label.clone().unwrap_or_else(|| {
        match common.target {
            Target::Switchboard => "switchboard",
            Target::Plain => "minimal Rust hub",
            Target::Socketio => "Socket.IO 4",
        }
        .to_string()
    });
    Ctx {
        proto,
        server: common.addr,
        pid: common.pid,
        label,
        staff: common
            .staff_email
            .clone()
            .zip(common.staff_password.clone()),
        per_worker: common.per_worker,
        min_workers: common
            .min_workers
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get())),
        json: common.json,
        notes: common.note.clone(),
        clock: clock::Clock::new(),
    }
}
