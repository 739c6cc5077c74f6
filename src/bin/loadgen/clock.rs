//! Unix time in µs, read from the monotonic clock after one reading of the wall clock, so that
//! every process measures against the same time line cheaply.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

#[derive(Clone, Copy)]
pub struct Clock {
    base: Instant,
    base_us: u64,
}

impl Clock {
    pub fn new() -> Clock {
        let since_epoch = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        Clock {
            base: Instant::now(),
            base_us: since_epoch.as_micros() as u64,
        }
    }

    pub fn now_us(&self) -> u64 {
        self.base_us + self.base.elapsed().as_micros() as u64
    }

    /// The instant at unix time `us` (now, when that is in the past).
    pub fn instant_at(&self, us: u64) -> tokio::time::Instant {
        let ahead = us.saturating_sub(self.base_us);
        tokio::time::Instant::from_std(self.base + Duration::from_micros(ahead))
    }
}
