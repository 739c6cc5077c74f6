//! The coordinating process: sets up accounts and conversations over HTTP, starts worker
//! processes (each holds a share of the connections), runs rounds and merges what they saw.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::process::Stdio;

use anyhow::{anyhow, bail, Context as _};
use futures_util::{stream, StreamExt};
use hdrhistogram::Histogram;
use serde::de::DeserializeOwned;
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};

use crate::plan::{histogram, ConnSpec, Finish, Plan, Ready, Round, RoundResult};

/// Connection attempts in flight per worker: enough to ramp quickly without overflowing the
/// server's accept backlog.
const CONNECT_PARALLEL: usize = 64;
/// HTTP set-up requests in flight at once.
const SETUP_PARALLEL: usize = 16;

struct WorkerProc {
    child: Child,
    stdin: ChildStdin,
    lines: Lines<BufReader<ChildStdout>>,
}

impl WorkerProc {
    async fn command(&mut self, line: &str) -> anyhow::Result<()> {
        self.stdin.write_all(line.as_bytes()).await?;
        self.stdin.write_all(b"\n").await?;
        self.stdin.flush().await?;
        Ok(())
    }

    async fn answer<T: DeserializeOwned>(&mut self, what: &str) -> anyhow::Result<T> {
        while let Some(line) = self.lines.next_line().await? {
            if let Some(body) = line.strip_prefix(what).and_then(|l| l.strip_prefix(' ')) {
                return serde_json::from_str(body).with_context(|| format!("reading `{what}`"));
            }
        }
        let status = self.child.wait().await?;
        bail!("a worker ended before answering `{what}` ({status})")
    }
}

/// The worker processes of one run.
#[derive(Default)]
pub struct Workers {
    procs: Vec<WorkerProc>,
}

impl Workers {
    /// Starts workers holding `conns`, at most `per_worker` each but in at least `min_workers`
    /// processes (one per core keeps a single-threaded worker from being the bottleneck), and
    /// waits until every connection is open and joined (or failed).
    pub async fn add(
        &mut self,
        server: SocketAddr,
        conns: Vec<ConnSpec>,
        per_worker: usize,
        min_workers: usize,
    ) -> anyhow::Result<Ready> {
        let exe = std::env::current_exe().context("finding the loadgen executable")?;
        let per_worker = per_worker.max(1);
        let count = conns
            .len()
            .div_ceil(per_worker)
            .max(min_workers)
            .min(conns.len())
            .max(1);
        // Deal the connections out in turn so every worker gets a like share of each role.
        let mut shares: Vec<Vec<ConnSpec>> = vec![Vec::new(); count];
        for (i, c) in conns.into_iter().enumerate() {
            shares[i % count].push(c);
        }
        let first = self.procs.len();
        let mut started = Vec::new();
        for (i, share) in shares.into_iter().enumerate() {
            let mut child = Command::new(&exe)
                .arg("worker")
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .kill_on_drop(true)
                .spawn()
                .context("starting a worker process")?;
            let stdin = child
                .stdin
                .take()
                .ok_or_else(|| anyhow!("no worker stdin"))?;
            let stdout = child
                .stdout
                .take()
                .ok_or_else(|| anyhow!("no worker stdout"))?;
            let mut proc = WorkerProc {
                child,
                stdin,
                lines: BufReader::new(stdout).lines(),
            };
            let plan = Plan {
                server,
                conns: share,
                worker: first + i,
                connect_parallel: CONNECT_PARALLEL,
            };
            proc.command(&serde_json::to_string(&plan)?).await?;
            started.push(proc);
        }
        let answers =
            futures_util::future::join_all(started.iter_mut().map(|p| p.answer::<Ready>("ready")))
                .await;
        let mut ready = Ready::default();
        for answer in answers {
            let r = answer?;
            ready.connected += r.connected;
            ready.failed += r.failed;
            ready.failures.extend(r.failures);
        }
        self.procs.extend(started);
        Ok(ready)
    }

    /// Runs one round on every worker and merges their results.
    pub async fn round(&mut self, round: Round) -> anyhow::Result<Merged> {
        let line = format!("go {}", serde_json::to_string(&round)?);
        for p in &mut self.procs {
            p.command(&line).await?;
        }
        let answers = futures_util::future::join_all(
            self.procs
                .iter_mut()
                .map(|p| p.answer::<RoundResult>("result")),
        )
        .await;
        let mut merged = Merged::new();
        for answer in answers {
            merged.add(&answer?);
        }
        Ok(merged)
    }

    /// Asks what became of stalled connections and how many closed unexpectedly.
    pub async fn finish(&mut self) -> anyhow::Result<Finish> {
        for p in &mut self.procs {
            p.command("finish").await?;
        }
        let answers = futures_util::future::join_all(
            self.procs.iter_mut().map(|p| p.answer::<Finish>("finish")),
        )
        .await;
        let mut total = Finish::default();
        for answer in answers {
            let f = answer?;
            total.stalled_closed += f.stalled_closed;
            total.stalled_open += f.stalled_open;
            total.closed_total += f.closed_total;
        }
        Ok(total)
    }

    pub async fn exit(mut self) {
        for p in &mut self.procs {
            let _ = p.command("exit").await;
        }
        for p in &mut self.procs {
            let _ = p.child.wait().await;
        }
    }
}

/// Every worker's round, added up.
pub struct Merged {
    pub sent: u64,
    pub received: u64,
    pub late: u64,
    pub acked: u64,
    pub tokens: u64,
    pub replies: u64,
    pub unanswered: u64,
    pub closed: u64,
    pub errors: BTreeMap<String, u64>,
    pub cpu_ticks: u64,
    pub latency: Histogram<u64>,
    pub ack_latency: Histogram<u64>,
    pub send_lag: Histogram<u64>,
    pub token_lag: Histogram<u64>,
    pub token_gap: Histogram<u64>,
    pub first_token: Histogram<u64>,
}

impl Merged {
    fn new() -> Merged {
        Merged {
            sent: 0,
            received: 0,
            late: 0,
            acked: 0,
            tokens: 0,
            replies: 0,
            unanswered: 0,
            closed: 0,
            errors: BTreeMap::new(),
            cpu_ticks: 0,
            latency: histogram(),
            ack_latency: histogram(),
            send_lag: histogram(),
            token_lag: histogram(),
            token_gap: histogram(),
            first_token: histogram(),
        }
    }

    fn add(&mut self, r: &RoundResult) {
        self.sent += r.sent;
        self.received += r.received;
        self.late += r.late;
        self.acked += r.acked;
        self.tokens += r.tokens;
        self.replies += r.replies;
        self.unanswered += r.unanswered;
        self.closed += r.closed;
        self.cpu_ticks += r.cpu_ticks;
        for (code, n) in &r.errors {
            *self.errors.entry(code.clone()).or_default() += n;
        }
        r.latency.add_to(&mut self.latency);
        r.ack_latency.add_to(&mut self.ack_latency);
        r.send_lag.add_to(&mut self.send_lag);
        r.token_lag.add_to(&mut self.token_lag);
        r.token_gap.add_to(&mut self.token_gap);
        r.first_token.add_to(&mut self.first_token);
    }

    pub fn error_count(&self) -> u64 {
        self.errors.values().sum()
    }

    /// `code×n, …`, or `0`.
    pub fn errors_text(&self) -> String {
        if self.errors.is_empty() {
            return "0".into();
        }
        self.errors
            .iter()
            .map(|(c, n)| format!("{c}×{n}"))
            .collect::<Vec<_>>()
            .join(" ")
    }
}

/// Switchboard's HTTP API, for setting up a run.
#[derive(Clone)]
pub struct Api {
    base: String,
    client: reqwest::Client,
}

impl Api {
    pub fn new(server: SocketAddr) -> anyhow::Result<Api> {
        Ok(Api {
            base: format!("http://{server}"),
            client: reqwest::Client::builder().no_proxy().build()?,
        })
    }

    async fn post(&self, path: &str, token: Option<&str>, body: Value) -> anyhow::Result<Value> {
        let mut req = self.client.post(format!("{}{path}", self.base)).json(&body);
        if let Some(token) = token {
            req = req.bearer_auth(token);
        }
        let res = req.send().await.with_context(|| format!("POST {path}"))?;
        let status = res.status();
        let body: Value = res
            .json()
            .await
            .with_context(|| format!("POST {path}: reading"))?;
        if !status.is_success() {
            bail!("POST {path}: {status}: {body}");
        }
        Ok(body)
    }

    fn token(body: &Value) -> anyhow::Result<String> {
        body["access_token"]
            .as_str()
            .map(str::to_string)
            .ok_or_else(|| anyhow!("no access_token in {body}"))
    }

    pub async fn guest(&self) -> anyhow::Result<String> {
        Api::token(&self.post("/api/v1/auth/guest", None, json!({})).await?)
    }

    pub async fn login(&self, email: &str, password: &str) -> anyhow::Result<String> {
        let body = json!({ "email": email, "password": password });
        Api::token(&self.post("/api/v1/auth/login", None, body).await?)
    }

    pub async fn create_session(&self, token: &str) -> anyhow::Result<String> {
        let body = self
            .post(
                "/api/v1/chat/sessions",
                Some(token),
                json!({ "title": "load" }),
            )
            .await?;
        body["id"]
            .as_str()
            .map(str::to_string)
            .ok_or_else(|| anyhow!("no id in {body}"))
    }

    /// `n` guests, each with a conversation of their own: `(token, session id)`.
    pub async fn guests_with_sessions(&self, n: usize) -> anyhow::Result<Vec<(String, String)>> {
        stream::iter(0..n)
            .map(|_| async {
                let token = self.guest().await?;
                let session = self.create_session(&token).await?;
                Ok((token, session))
            })
            .buffer_unordered(SETUP_PARALLEL)
            .collect::<Vec<anyhow::Result<_>>>()
            .await
            .into_iter()
            .collect()
    }

    /// `n` conversations opened by `token`.
    pub async fn sessions(&self, token: &str, n: usize) -> anyhow::Result<Vec<String>> {
        stream::iter(0..n)
            .map(|_| self.create_session(token))
            .buffer_unordered(SETUP_PARALLEL)
            .collect::<Vec<_>>()
            .await
            .into_iter()
            .collect()
    }
}
