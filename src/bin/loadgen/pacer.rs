//! Sends on time. A worker's runtime counts its timers in whole milliseconds: a send waited for
//! the next tick, on average half a millisecond after its scheduled time and up to a millisecond
//! and more with the wake-up, and that wait was counted in every latency measured, whichever
//! server was under test. So each round's sends are timed by one task of the worker's, on a
//! kernel timer that wakes the runtime at each send's time; it hands each send to its
//! connection's task.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::Duration;

use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tokio::sync::mpsc::UnboundedSender;

use crate::clock::Clock;
use crate::plan::Round;

/// One sending connection: where to hand its sends, and its share of the round's rate.
#[derive(Clone)]
pub struct Sender {
    pub tx: UnboundedSender<u64>,
    pub weight: f64,
}

/// Every send of a round, in time order.
pub struct Timetable {
    /// `(time, sender, n)` of each sender's next send.
    next: BinaryHeap<Reverse<(u64, usize, u64)>>,
    /// Per sender: its first send and the time between two, in µs.
    lines: Vec<(f64, f64)>,
    end_us: u64,
}

impl Timetable {
    /// Sender `i` sends `round.rate * weights[i]` messages a second from
    /// `round.t0_us + phases[i] * period` on, until `round.t0_us + round.duration_us`.
    /// `phases` are in `[0, 1)`: they spread the senders over a period.
    pub fn new(weights: &[f64], phases: &[f64], round: &Round) -> Timetable {
        let end_us = round.t0_us + round.duration_us;
        let mut next = BinaryHeap::new();
        let mut lines = Vec::with_capacity(weights.len());
        for (i, (&weight, &phase)) in weights.iter().zip(phases).enumerate() {
            let rate = round.rate * weight;
            if rate <= 0.0 {
                lines.push((0.0, 0.0));
                continue;
            }
            let period = 1e6 / rate;
            let first = round.t0_us as f64 + phase * period;
            lines.push((first, period));
            if (first as u64) < end_us {
                next.push(Reverse((first as u64, i, 0)));
            }
        }
        Timetable {
            next,
            lines,
            end_us,
        }
    }

    /// The next send's time and sender.
    pub fn peek(&self) -> Option<(u64, usize)> {
        self.next.peek().map(|Reverse((at, i, _))| (*at, *i))
    }

    /// Takes the next send; its sender's following one takes its place.
    pub fn pop(&mut self) -> Option<(u64, usize)> {
        let Reverse((at, i, n)) = self.next.pop()?;
        let (first, period) = self.lines[i];
        let following = (first + (n + 1) as f64 * period) as u64;
        if following < self.end_us {
            self.next.push(Reverse((following, i, n + 1)));
        }
        Some((at, i))
    }

    /// No more sends from sender `i` (its connection is gone).
    fn drop_sender(&mut self, i: usize) {
        self.next.retain(|Reverse((_, s, _))| *s != i);
    }
}

/// Times `round`'s sends until the last one, on the worker's runtime. A timer of the kernel's
/// (`timerfd`, to the microsecond) wakes the runtime at each send's time, where the runtime's
/// own timers would wait for the next whole millisecond.
pub async fn run(senders: Vec<Sender>, round: Round, clock: Clock) -> std::io::Result<()> {
    let weights: Vec<f64> = senders.iter().map(|s| s.weight).collect();
    let phases: Vec<f64> = senders.iter().map(|_| rand::random::<f64>()).collect();
    let mut table = Timetable::new(&weights, &phases, &round);
    let timer = Timer::new()?;
    while let Some((at, _)) = table.peek() {
        let now = clock.now_us();
        if at > now {
            timer.sleep(Duration::from_micros(at - now)).await?;
            continue;
        }
        // Everything due goes now, each with its own scheduled time: a send this task was
        // late for counts its lateness.
        while let Some((at, i)) = table.peek() {
            if at > now {
                break;
            }
            table.pop();
            if senders[i].tx.send(at).is_err() {
                table.drop_sender(i);
            }
        }
    }
    Ok(())
}

/// A one-shot `timerfd` on the runtime's reactor.
struct Timer(AsyncFd<OwnedFd>);

impl Timer {
    fn new() -> std::io::Result<Timer> {
        let fd = unsafe {
            libc::timerfd_create(
                libc::CLOCK_MONOTONIC,
                libc::TFD_NONBLOCK | libc::TFD_CLOEXEC,
            )
        };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: `fd` was just opened and is owned by nothing else; the `AsyncFd` owns it
        // from here on and closes it last.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let fd = unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE)? };
        Ok(Timer(fd))
    }

    /// Waits `d` (more than zero).
    async fn sleep(&self, d: Duration) -> std::io::Result<()> {
        let spec = libc::itimerspec {
            it_interval: libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            },
            it_value: libc::timespec {
                tv_sec: d.as_secs() as libc::time_t,
                tv_nsec: d.subsec_nanos().max(1) as libc::c_long,
            },
        };
        let fd = self.0.get_ref().as_raw_fd();
        if unsafe { libc::timerfd_settime(fd, 0, &spec, std::ptr::null_mut()) } < 0 {
            return Err(std::io::Error::last_os_error());
        }
        loop {
            let mut ready = self.0.readable().await?;
            let mut expirations = 0u64;
            let n = unsafe {
                libc::read(
                    fd,
                    (&mut expirations as *mut u64).cast(),
                    std::mem::size_of::<u64>(),
                )
            };
            if n == std::mem::size_of::<u64>() as isize {
                return Ok(());
            }
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::WouldBlock {
                return Err(e);
            }
            ready.clear_ready();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round(rate: f64) -> Round {
        Round {
            t0_us: 1_000_000,
            duration_us: 1_000_000,
            drain_us: 0,
            rate,
        }
    }

    fn all(mut table: Timetable) -> Vec<(u64, usize)> {
        std::iter::from_fn(|| table.pop()).collect()
    }

    #[test]
    fn each_sender_keeps_its_rate_and_phase_and_the_sends_come_in_time_order() {
        // 10 a second for weight 1: every 100 ms.
        let sends = all(Timetable::new(
            &[1.0, 2.0, 0.0],
            &[0.5, 0.0, 0.3],
            &round(10.0),
        ));
        let times = |s: usize| -> Vec<u64> {
            sends
                .iter()
                .filter(|(_, i)| *i == s)
                .map(|(at, _)| *at)
                .collect()
        };
        assert_eq!(
            times(0),
            (0..10).map(|n| 1_050_000 + n * 100_000).collect::<Vec<_>>()
        );
        assert_eq!(
            times(1),
            (0..20).map(|n| 1_000_000 + n * 50_000).collect::<Vec<_>>()
        );
        assert!(times(2).is_empty(), "weight 0 sends nothing");
        assert!(sends.windows(2).all(|w| w[0].0 <= w[1].0), "{sends:?}");
    }

    #[test]
    fn a_dropped_sender_gets_no_more_sends() {
        let mut table = Timetable::new(&[1.0, 1.0], &[0.0, 0.5], &round(10.0));
        assert_eq!(table.pop(), Some((1_000_000, 0)));
        table.drop_sender(0);
        let rest = all(table);
        assert_eq!(rest.len(), 10);
        assert!(rest.iter().all(|(_, i)| *i == 1));
    }
}
