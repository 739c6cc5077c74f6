//! CPU time and memory of a process, from `/proc/<pid>/stat` and `/proc/<pid>/status`.

use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Clock ticks per second (`sysconf(_SC_CLK_TCK)`), for the times in `/proc/<pid>/stat`.
pub fn ticks_per_second() -> f64 {
    // SAFETY: sysconf reads a constant of the running system and has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if ticks > 0 {
        ticks as f64
    } else {
        100.0
    }
}

/// User plus system CPU time of `pid`, in clock ticks.
pub fn cpu_ticks(pid: &str) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces; the fields after it are space separated.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split(' ').collect();
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after the name.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

pub fn self_cpu_ticks() -> u64 {
    cpu_ticks("self").unwrap_or(0)
}

/// Resident memory of `pid`, in KiB (`VmRSS`).
pub fn rss_kib(pid: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// The one-minute load average.
pub fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().map(str::to_string))
        .unwrap_or_else(|| "?".into())
}

#[derive(Debug, Clone, Copy)]
pub struct Sample {
    pub at_us: u64,
    pub cpu_ticks: u64,
    pub rss_kib: u64,
}

/// Samples a process every `every` until dropped.
pub struct Sampler {
    samples: Arc<Mutex<Vec<Sample>>>,
    task: tokio::task::JoinHandle<()>,
    pid: String,
}

impl Sampler {
    pub fn start(pid: u32, clock: crate::clock::Clock, every: Duration) -> Sampler {
        let samples = Arc::new(Mutex::new(Vec::new()));
        let pid = pid.to_string();
        let (into, id) = (samples.clone(), pid.clone());
        let task = tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            loop {
                tick.tick().await;
                let (Some(cpu_ticks), Some(rss_kib)) = (cpu_ticks(&id), rss_kib(&id)) else {
                    continue;
                };
                if let Ok(mut s) = into.lock() {
                    s.push(Sample {
                        at_us: clock.now_us(),
                        cpu_ticks,
                        rss_kib,
                    });
                }
            }
        });
        Sampler { samples, task, pid }
    }

    /// A reading taken now.
    pub fn now(&self, clock: &crate::clock::Clock) -> Sample {
        Sample {
            at_us: clock.now_us(),
            cpu_ticks: cpu_ticks(&self.pid).unwrap_or(0),
            rss_kib: rss_kib(&self.pid).unwrap_or(0),
        }
    }

    /// Samples taken within `[from, to]`.
    pub fn between(&self, from_us: u64, to_us: u64) -> Vec<Sample> {
        self.samples
            .lock()
            .map(|s| {
                s.iter()
                    .filter(|x| x.at_us >= from_us && x.at_us <= to_us)
                    .copied()
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Server CPU use within `[from, to]`, in percent of one core, and the largest RSS seen.
    pub fn usage(&self, from_us: u64, to_us: u64) -> Usage {
        let s = self.between(from_us, to_us);
        let (Some(first), Some(last)) = (s.first(), s.last()) else {
            return Usage::default();
        };
        let seconds = (last.at_us - first.at_us) as f64 / 1e6;
        let cpu = if seconds > 0.0 {
            (last.cpu_ticks - first.cpu_ticks) as f64 / ticks_per_second() / seconds * 100.0
        } else {
            0.0
        };
        Usage {
            cpu_percent: cpu,
            rss_max_kib: s.iter().map(|x| x.rss_kib).max().unwrap_or(0),
        }
    }
}

impl Drop for Sampler {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[derive(Debug, Default, Clone, Copy)]
pub struct Usage {
    pub cpu_percent: f64,
    pub rss_max_kib: u64,
}
