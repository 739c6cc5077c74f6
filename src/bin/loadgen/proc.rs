//! CPU time, memory and file writes of a process, from `/proc/<pid>/stat`, `/proc/<pid>/status`
//! and `/proc/<pid>/io`, and how long its threads waited for a core and how often they were put
//! on one, from `/proc/<pid>/task/*/schedstat`.

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

/// What the scheduler counted for the threads of a process, summed over the threads alive now.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Sched {
    /// Nanoseconds spent ready to run but waiting for a core.
    pub run_delay_ns: u64,
    /// Times a thread was put on a core: each wake-up, and each return after being preempted.
    pub slices: u64,
}

/// The scheduler's counts for the threads of `pid` (each thread's `schedstat`). `None` where
/// the kernel keeps no such count or the process is gone.
pub fn sched(pid: &str) -> Option<Sched> {
    let mut total = None;
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))
        .ok()?
        .flatten()
    {
        let Ok(stat) = std::fs::read_to_string(task.path().join("schedstat")) else {
            // The thread ended after the folder was listed.
            continue;
        };
        if let Some(thread) = parse_schedstat(&stat) {
            let sum: &mut Sched = total.get_or_insert_with(Sched::default);
            sum.run_delay_ns += thread.run_delay_ns;
            sum.slices += thread.slices;
        }
    }
    total
}

/// `schedstat` is "time run (ns), time waited for a core (ns), slices run".
fn parse_schedstat(schedstat: &str) -> Option<Sched> {
    let mut fields = schedstat.split_whitespace().skip(1);
    Some(Sched {
        run_delay_ns: fields.next()?.parse().ok()?,
        slices: fields.next()?.parse().ok()?,
    })
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
    pub sched: Option<Sched>,
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
                        sched: sched(&id),
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
            sched: sched(&self.pid),
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
    /// fast it wrote to files, how long its threads waited for a core and how often they were
    /// put on one.
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
        wait_percent: per_second(
            first.sched.map(|s| s.run_delay_ns),
            last.sched.map(|s| s.run_delay_ns),
        )
        .map(|ns| ns / 1e9 * 100.0),
        switches_per_s: per_second(first.sched.map(|s| s.slices), last.sched.map(|s| s.slices)),
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
    /// Times a second the threads were put on a core (woken, or back after a preemption): each
    /// is a switch between threads; `None` where it cannot be read.
    pub switches_per_s: Option<f64>,
}

impl Usage {
    /// The write rate as a table cell: one decimal, or "-" where it is not known.
    pub fn writes_cell(&self) -> String {
        cell(self.write_mb_per_s, 1)
    }

    /// The wait for a core as a table cell: whole percent, or "-" where it is not known.
    pub fn wait_cell(&self) -> String {
        cell(self.wait_percent, 0)
    }

    /// The switches a second as a table cell: a whole number, or "-" where it is not known.
    pub fn switches_cell(&self) -> String {
        cell(self.switches_per_s, 0)
    }
}

/// A reading as a table cell with `decimals` decimals, or "-" where it could not be read.
fn cell(value: Option<f64>, decimals: usize) -> String {
    value.map_or_else(|| "-".into(), |v| format!("{v:.decimals$}"))
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
    fn the_wait_and_the_slices_are_the_second_and_third_schedstat_fields() {
        assert_eq!(
            parse_schedstat("812345 67890 12\n"),
            Some(Sched {
                run_delay_ns: 67890,
                slices: 12
            })
        );
        assert_eq!(parse_schedstat("812345 67890\n"), None);
        assert_eq!(parse_schedstat("812345 soon 12\n"), None);
    }

    #[test]
    fn the_own_process_is_counted_by_the_scheduler() {
        let counted = sched("self").expect("schedstat is kept");
        assert!(counted.slices > 0, "{counted:?}");
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
                sched: None,
            };
            usage_of(&[sample(0, a), sample(1_000_000, None), sample(2_000_000, b)])
        };
        assert_eq!(usage(Some(1_000_000), Some(9_000_000)).writes_cell(), "4.0");
        assert_eq!(usage(None, Some(9_000_000)).writes_cell(), "-");
    }

    #[test]
    fn the_wait_for_a_core_and_the_switches_span_the_first_and_last_samples() {
        let sample = |at_us, counts: Option<(u64, u64)>| Sample {
            at_us,
            cpu_ticks: 0,
            rss_kib: 1,
            write_bytes: None,
            sched: counts.map(|(run_delay_ns, slices)| Sched {
                run_delay_ns,
                slices,
            }),
        };
        let usage = |a, b| {
            let u = usage_of(&[sample(0, a), sample(2_000_000, b)]);
            (u.wait_cell(), u.switches_cell())
        };
        // 3 s of waiting in 2 s: one and a half cores' worth; 9,000 slices in 2 s.
        assert_eq!(
            usage(Some((1_000_000_000, 1_000)), Some((4_000_000_000, 10_000))),
            ("150".into(), "4500".into())
        );
        // A thread that ended took its counts along.
        assert_eq!(
            usage(Some((4_000_000_000, 10_000)), Some((1_000_000_000, 1_000))),
            ("0".into(), "0".into())
        );
        assert_eq!(usage(None, Some((1, 1))), ("-".into(), "-".into()));
    }
}
