//! Flood protection: token buckets.
//!
//! A bucket holds up to `burst` tokens and refills at a steady rate; each request or frame
//! takes one. [`KeyedLimiter`] keeps one bucket per key (a user id, an IP address) behind a
//! lock and is shared by every worker; a WebSocket owns a plain [`Bucket`] for its frames.
//! Over the limit, HTTP answers 429 with `X-RateLimit-*` headers ([`http`]) and a socket gets
//! `error {code: "rate_limited"}`.

pub mod http;

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::config::RateLimitSettings;

/// Most keys one limiter tracks; past it, buckets that are full again are forgotten.
const MAX_KEYS: usize = 100_000;

/// How fast a bucket refills and how much it holds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rate {
    /// Tokens added per second; 0 turns the limit off.
    per_second: f64,
    burst: u32,
}

impl Rate {
    pub fn per_second(n: u32, burst: u32) -> Rate {
        Rate {
            per_second: f64::from(n),
            burst: burst.max(1),
        }
    }

    pub fn per_minute(n: u32, burst: u32) -> Rate {
        Rate {
            per_second: f64::from(n) / 60.0,
            burst: burst.max(1),
        }
    }

    pub fn is_off(&self) -> bool {
        self.per_second <= 0.0
    }

    /// How long refilling `tokens` takes.
    fn time_for(&self, tokens: f64) -> Duration {
        if tokens <= 0.0 {
            return Duration::ZERO;
        }
        Duration::from_secs_f64(tokens / self.per_second)
    }
}

/// What a bucket said about one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Verdict {
    pub allowed: bool,
    /// The bucket's size (`X-RateLimit-Limit`).
    pub limit: u32,
    /// Whole tokens left after this request (`X-RateLimit-Remaining`).
    pub remaining: u32,
    /// Until the bucket is full again (`X-RateLimit-Reset`, in seconds).
    pub reset: Duration,
    /// Until one more request is allowed (`Retry-After`); zero when allowed.
    pub retry_after: Duration,
}

impl Verdict {
    fn unlimited() -> Verdict {
        Verdict {
            allowed: true,
            limit: u32::MAX,
            remaining: u32::MAX,
            reset: Duration::ZERO,
            retry_after: Duration::ZERO,
        }
    }
}

/// One token bucket.
#[derive(Debug, Clone)]
pub struct Bucket {
    tokens: f64,
    updated: Instant,
}

impl Bucket {
    /// A full bucket.
    pub fn new(rate: Rate) -> Bucket {
        Bucket {
            tokens: f64::from(rate.burst),
            updated: Instant::now(),
        }
    }

    /// Takes one token if there is one.
    pub fn take(&mut self, rate: Rate) -> Verdict {
        self.take_at(rate, Instant::now())
    }

    fn take_at(&mut self, rate: Rate, now: Instant) -> Verdict {
        if rate.is_off() {
            return Verdict::unlimited();
        }
        let burst = f64::from(rate.burst);
        let elapsed = now.saturating_duration_since(self.updated).as_secs_f64();
        self.tokens = (self.tokens + elapsed * rate.per_second).min(burst);
        self.updated = now;
        let allowed = self.tokens >= 1.0;
        if allowed {
            self.tokens -= 1.0;
        }
        Verdict {
            allowed,
            limit: rate.burst,
            remaining: self.tokens.floor() as u32,
            reset: rate.time_for(burst - self.tokens),
            retry_after: if allowed {
                Duration::ZERO
            } else {
                rate.time_for(1.0 - self.tokens)
            },
        }
    }

    /// Whether the bucket would be full by `now` (nothing to remember about its key).
    fn is_full_at(&self, rate: Rate, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.updated).as_secs_f64();
        self.tokens + elapsed * rate.per_second >= f64::from(rate.burst)
    }
}

/// One bucket per key, shared across threads.
pub struct KeyedLimiter {
    rate: Rate,
    buckets: Mutex<HashMap<String, Bucket>>,
}

impl KeyedLimiter {
    pub fn new(rate: Rate) -> KeyedLimiter {
        KeyedLimiter {
            rate,
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// Takes one token from `key`'s bucket.
    pub fn check(&self, key: &str) -> Verdict {
        if self.rate.is_off() {
            return Verdict::unlimited();
        }
        let now = Instant::now();
        // A poisoned lock only means another thread panicked mid-update of plain numbers.
        let mut buckets = self
            .buckets
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if buckets.len() >= MAX_KEYS && !buckets.contains_key(key) {
            let rate = self.rate;
            buckets.retain(|_, b| !b.is_full_at(rate, now));
            if buckets.len() >= MAX_KEYS {
                // So many keys at once are themselves a flood: forget them all rather than
                // grow without bound (each starts over with a full bucket).
                log::warn!(
                    "rate limiter tracking {} keys; starting over",
                    buckets.len()
                );
                buckets.clear();
            }
        }
        buckets
            .entry(key.to_string())
            .or_insert_with(|| Bucket::new(self.rate))
            .take_at(self.rate, now)
    }
}

/// Every limit of the node, built once from the settings.
pub struct RateLimits {
    /// Messages posted, per user id, over WebSocket and HTTP together.
    pub messages: KeyedLimiter,
    /// Sign-in requests per IP address.
    pub sign_in: KeyedLimiter,
    /// Frames per WebSocket (each socket keeps its own bucket).
    pub ws_frames: Rate,
    /// Refused frames in a row after which a socket is closed.
    pub ws_flood_close_after: u32,
}

impl RateLimits {
    pub fn new(settings: &RateLimitSettings) -> RateLimits {
        RateLimits {
            messages: KeyedLimiter::new(Rate::per_minute(
                settings.messages_per_minute,
                settings.message_burst,
            )),
            sign_in: KeyedLimiter::new(Rate::per_minute(
                settings.auth_per_minute,
                settings.auth_burst,
            )),
            ws_frames: Rate::per_second(settings.ws_frames_per_second, settings.ws_frame_burst),
            ws_flood_close_after: settings.ws_flood_close_after.max(1),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bucket_allows_its_burst_then_refills_at_its_rate() {
        let rate = Rate::per_second(2, 3);
        let start = Instant::now();
        let mut b = Bucket::new(rate);
        b.updated = start;
        for left in [2, 1, 0] {
            let v = b.take_at(rate, start);
            assert!(v.allowed);
            assert_eq!(v.remaining, left);
        }
        let refused = b.take_at(rate, start);
        assert!(!refused.allowed);
        assert_eq!(refused.limit, 3);
        assert_eq!(refused.retry_after, Duration::from_millis(500));
        assert_eq!(refused.reset, Duration::from_millis(1500));
        // Half a second later one token is back.
        assert!(b.take_at(rate, start + Duration::from_millis(500)).allowed);
        assert!(!b.take_at(rate, start + Duration::from_millis(500)).allowed);
        // A long pause refills only up to the burst.
        let later = start + Duration::from_secs(60);
        let v = b.take_at(rate, later);
        assert_eq!(v.remaining, 2);
    }

    #[test]
    fn a_zero_rate_is_no_limit() {
        let limiter = KeyedLimiter::new(Rate::per_minute(0, 1));
        for _ in 0..1000 {
            assert!(limiter.check("k").allowed);
        }
        assert!(limiter.buckets.lock().unwrap().is_empty());
    }

    #[test]
    fn keys_have_their_own_buckets() {
        let limiter = KeyedLimiter::new(Rate::per_minute(1, 1));
        assert!(limiter.check("a").allowed);
        assert!(!limiter.check("a").allowed);
        assert!(limiter.check("b").allowed);
    }
}
