//! CPU time, memory and file writes of a process, from `/proc/<pid>/stat`, `/proc/<pid>/status`
//! and `/proc/<pid>/io`, and how long its threads waited for a core, from
//! `/proc/<pid>/task/*/schedstat`.

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

/// Bytes `pid` has written to files (`write_bytes` of `/proc/<pid>/io`), counted as they enter
/// the page cache on their way to the disk; a file in memory (tmpfs) counts nothing. `None`
/// where the file cannot be read (another user's process).
pub fn write_bytes(pid: &str) -> Option<u64> {
    parse_write_bytes(&std::fs::read_to_string(format!("/proc/{pid}/io")).ok()?)
}

fn parse_write_bytes(io: &str) -> Option<u64> {
    io.lines()
        .find_map(|l| l.strip_prefix("write_bytes:"))?
        .trim()
        .parse()
        .ok()
}

/// Nanoseconds the threads of `pid` have spent ready to run but waiting for a core (the second
/// field of each thread's `schedstat`), summed over the threads alive now. `None` where the
/// kernel keeps no such count or the process is gone.
pub fn run_delay_ns(pid: &str) -> Option<u64> {
    let mut total = None;
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))
        .ok()?
        .flatten()
    {
        let Ok(stat) = std::fs::read_to_string(task.path().join("schedstat")) else {
            // The thread ended after the folder was listed.
            continue;
        };
        if let Some(delay) = parse_run_delay(&stat) {
            total = Some(total.unwrap_or(0) + delay);
        }
    }
    total
}

/// `schedstat` is "time run, time waited, slices", in nanoseconds.
fn parse_run_delay(schedstat: &str) -> Option<u64> {
    schedstat.split_whitespace().nth(1)?.parse().ok()
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
    pub write_bytes: Option<u64>,
    pub run_delay_ns: Option<u64>,
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
                        write_bytes: write_bytes(&id),
                        run_delay_ns: run_delay_ns(&id),
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
            write_bytes: write_bytes(&self.pid),
            run_delay_ns: run_delay_ns(&self.pid),
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

    /// Server CPU use within `[from, to]`, in percent of one core, the largest RSS seen, how
    /// fast it wrote to files, and how long its threads waited for a core.
    pub fn usage(&self, from_us: u64, to_us: u64) -> Usage {
        usage_of(&self.between(from_us, to_us))
    }
}

/// What `s`, samples in time order, show: see [`Sampler::usage`].
fn usage_of(s: &[Sample]) -> Usage {
    let (Some(first), Some(last)) = (s.first(), s.last()) else {
        return Usage::default();
    };
    let seconds = (last.at_us - first.at_us) as f64 / 1e6;
    let cpu = if seconds > 0.0 {
        (last.cpu_ticks - first.cpu_ticks) as f64 / ticks_per_second() / seconds * 100.0
    } else {
        0.0
    };
    let per_second = |a: Option<u64>, b: Option<u64>| growth_per_second(a, b, seconds);
    Usage {
        cpu_percent: cpu,
        rss_max_kib: s.iter().map(|x| x.rss_kib).max().unwrap_or(0),
        write_mb_per_s: per_second(first.write_bytes, last.write_bytes).map(|b| b / 1e6),
        wait_percent: per_second(first.run_delay_ns, last.run_delay_ns).map(|ns| ns / 1e9 * 100.0),
    }
}

/// How fast a counter grew from `a` to `b` over `seconds`; `None` where either reading is
/// missing or no time passed. Never below zero: a thread that ended within the window takes
/// its part of a summed count with it.
fn growth_per_second(a: Option<u64>, b: Option<u64>, seconds: f64) -> Option<f64> {
    match (a, b) {
        (Some(a), Some(b)) if seconds > 0.0 => Some(b.saturating_sub(a) as f64 / seconds),
        _ => None,
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
    /// Megabytes (10^6 bytes) written to files per second; `None` where `/proc/<pid>/io` could
    /// not be read.
    pub write_mb_per_s: Option<f64>,
    /// Time the threads spent ready to run but waiting for a core, in percent of one core's
    /// time (200 means two threads waited all along); `None` where it cannot be read.
    pub wait_percent: Option<f64>,
}

impl Usage {
    /// The write rate as a table cell: one decimal, or "-" where it is not known.
    pub fn writes_cell(&self) -> String {
        self.write_mb_per_s
            .map_or_else(|| "-".into(), |v| format!("{v:.1}"))
    }

    /// The wait for a core as a table cell: whole percent, or "-" where it is not known.
    pub fn wait_cell(&self) -> String {
        self.wait_percent
            .map_or_else(|| "-".into(), |v| format!("{v:.0}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_bytes_is_read_from_its_own_line() {
        let io = "rchar: 10\nwchar: 20\nsyscr: 1\nsyscw: 2\nread_bytes: 4096\n\
                  write_bytes: 123456\ncancelled_write_bytes: 789\n";
        assert_eq!(parse_write_bytes(io), Some(123456));
        assert_eq!(parse_write_bytes("cancelled_write_bytes: 789\n"), None);
        assert_eq!(parse_write_bytes("write_bytes: many\n"), None);
    }

    #[test]
    fn run_delay_is_the_second_schedstat_field() {
        assert_eq!(parse_run_delay("812345 67890 12\n"), Some(67890));
        assert_eq!(parse_run_delay("812345\n"), None);
        assert_eq!(parse_run_delay("812345 soon 12\n"), None);
    }

    #[test]
    fn the_own_process_has_a_write_count() {
        assert!(write_bytes("self").is_some());
    }

    #[test]
    fn the_write_rate_spans_the_first_and_last_samples() {
        let usage = |a, b| {
            let sample = |at_us, write_bytes| Sample {
                at_us,
                cpu_ticks: 0,
                rss_kib: 1,
                write_bytes,
                run_delay_ns: None,
            };
            usage_of(&[sample(0, a), sample(1_000_000, None), sample(2_000_000, b)])
        };
        assert_eq!(usage(Some(1_000_000), Some(9_000_000)).writes_cell(), "4.0");
        assert_eq!(usage(None, Some(9_000_000)).writes_cell(), "-");
    }

    #[test]
    fn the_wait_for_a_core_spans_the_first_and_last_samples() {
        let sample = |at_us, run_delay_ns| Sample {
            at_us,
            cpu_ticks: 0,
            rss_kib: 1,
            write_bytes: None,
            run_delay_ns,
        };
        let usage = |a, b| usage_of(&[sample(0, a), sample(2_000_000, b)]).wait_cell();
        // 3 s of waiting in 2 s: one and a half cores' worth.
        assert_eq!(usage(Some(1_000_000_000), Some(4_000_000_000)), "150");
        // A thread that ended took its count along.
        assert_eq!(usage(Some(4_000_000_000), Some(1_000_000_000)), "0");
        assert_eq!(usage(None, Some(1)), "-");
    }
}
