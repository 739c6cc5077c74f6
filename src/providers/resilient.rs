//! The policy around every provider: a timeout for the first token and for the whole answer,
//! retries with exponential backoff and jitter, a circuit breaker per provider, an optional
//! fallback provider, and the metrics of it all.
//!
//! Only failures before the first token are retried (or handed to the fallback): once text
//! has reached the customer, a failure ends the answer, which is stored as interrupted. Only
//! throttling, timeouts, 5xx and unreachable endpoints are retried; a refused request (4xx)
//! goes straight to the fallback, if any.

use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use futures_util::stream::{self, StreamExt};
use rand::Rng;

use super::metrics::AiMetrics;
use super::{ChatRequest, Chunk, Provider, ProviderError, TokenStream};
use crate::config::AiSettings;

/// Longest pause between two tries, whatever `AI_RETRY_DELAY` and the attempt count say.
const MAX_RETRY_DELAY: Duration = Duration::from_secs(30);

/// How tries are made and when they give up.
#[derive(Debug, Clone)]
pub struct Policy {
    /// Tries per provider, the first included.
    pub attempts: u32,
    /// The pause before the first retry; it doubles for each one after.
    pub retry_delay: Duration,
    pub first_token_timeout: Duration,
    pub answer_timeout: Duration,
}

impl Policy {
    pub fn from_settings(ai: &AiSettings) -> Policy {
        Policy {
            attempts: ai.retry_attempts.max(1),
            retry_delay: ai.retry_delay.get(),
            first_token_timeout: ai.first_token_timeout.get(),
            answer_timeout: ai.answer_timeout.get(),
        }
    }

    /// The pause before retry `n` (1 for the first retry): exponential, with "equal jitter"
    /// (half fixed, half random) so that many clients throttled at once do not return at once.
    fn backoff(&self, n: u32) -> Duration {
        let full = self
            .retry_delay
            .saturating_mul(1u32 << (n - 1).min(16))
            .min(MAX_RETRY_DELAY);
        let half = full / 2;
        half + half.mul_f64(rand::thread_rng().gen::<f64>())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BreakerState {
    Closed {
        failures: u32,
    },
    Open {
        until: Instant,
    },
    /// One trial call is allowed through; its outcome closes or reopens the breaker.
    HalfOpen {
        trial_running: bool,
    },
}

/// Stops calling a provider that keeps failing, and lets one trial through after a pause.
pub struct Breaker {
    threshold: u32,
    cooldown: Duration,
    state: Mutex<BreakerState>,
}

impl Breaker {
    pub fn new(threshold: u32, cooldown: Duration) -> Breaker {
        Breaker {
            threshold: threshold.max(1),
            cooldown,
            state: Mutex::new(BreakerState::Closed { failures: 0 }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BreakerState> {
        // The state is a plain value: a panic while it was held cannot leave it half-written.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// May a call go through now? In half-open state only one may.
    fn allow(&self) -> bool {
        let mut state = self.lock();
        match *state {
            BreakerState::Closed { .. } => true,
            BreakerState::Open { until } if Instant::now() >= until => {
                *state = BreakerState::HalfOpen {
                    trial_running: true,
                };
                true
            }
            BreakerState::Open { .. } => false,
            BreakerState::HalfOpen { trial_running } => {
                if trial_running {
                    false
                } else {
                    *state = BreakerState::HalfOpen {
                        trial_running: true,
                    };
                    true
                }
            }
        }
    }

    fn success(&self) {
        *self.lock() = BreakerState::Closed { failures: 0 };
    }

    fn failure(&self) {
        let mut state = self.lock();
        let open = BreakerState::Open {
            until: Instant::now() + self.cooldown,
        };
        *state = match *state {
            BreakerState::Closed { failures } if failures + 1 >= self.threshold => open,
            BreakerState::Closed { failures } => BreakerState::Closed {
                failures: failures + 1,
            },
            BreakerState::HalfOpen { .. } | BreakerState::Open { .. } => open,
        };
    }

    /// A call ended without saying anything of the provider's health (it was cancelled).
    fn abandon(&self) {
        let mut state = self.lock();
        if let BreakerState::HalfOpen { .. } = *state {
            *state = BreakerState::HalfOpen {
                trial_running: false,
            };
        }
    }

    /// `closed`, `open` or `half_open`, as an operator reads it.
    pub fn state(&self) -> &'static str {
        match *self.lock() {
            BreakerState::Closed { .. } => "closed",
            BreakerState::Open { until } if Instant::now() >= until => "half_open",
            BreakerState::Open { .. } => "open",
            BreakerState::HalfOpen { .. } => "half_open",
        }
    }
}

/// A provider with its breaker.
pub struct Guarded {
    pub provider: Arc<dyn Provider>,
    pub breaker: Breaker,
}

/// Records a call's outcome on its breaker exactly once; a call dropped before it ended
/// (cancelled) leaves the breaker as it was.
struct Outcome {
    guarded: Arc<Guarded>,
    settled: bool,
}

impl Outcome {
    fn settle(&mut self, result: Result<(), &ProviderError>) {
        if self.settled {
            return;
        }
        self.settled = true;
        match result {
            Ok(()) => self.guarded.breaker.success(),
            // The provider answered, only not with what we wanted: it is up.
            Err(e) if !e.is_retryable() => self.guarded.breaker.success(),
            Err(_) => self.guarded.breaker.failure(),
        }
    }
}

impl Drop for Outcome {
    fn drop(&mut self) {
        if !self.settled {
            self.guarded.breaker.abandon();
        }
    }
}

/// A started answer: who is giving it, and the stream of it.
pub struct Opened {
    pub provider: String,
    pub model: String,
    /// True when the primary provider could not answer and the fallback did.
    pub is_fallback: bool,
    /// The answer from its first piece on; a failure in it is final.
    pub stream: TokenStream,
}

/// The providers, primary first, behind the policy.
pub struct Resilient {
    providers: Vec<Arc<Guarded>>,
    policy: Policy,
    metrics: Arc<AiMetrics>,
    /// Models the primary provider may be switched to, its configured one first.
    models: Vec<String>,
    /// The primary provider's model now.
    active_model: RwLock<String>,
}

impl Resilient {
    pub fn new(
        primary: Arc<dyn Provider>,
        fallback: Option<Arc<dyn Provider>>,
        policy: Policy,
        breaker_failures: u32,
        breaker_cooldown: Duration,
        metrics: Arc<AiMetrics>,
        extra_models: &[String],
    ) -> Resilient {
        let mut models = vec![primary.model().to_string()];
        if !primary.is_demo() {
            for m in extra_models {
                if !m.is_empty() && !models.contains(m) {
                    models.push(m.clone());
                }
            }
        }
        let active_model = RwLock::new(models[0].clone());
        let providers = std::iter::once(primary)
            .chain(fallback)
            .map(|provider| {
                Arc::new(Guarded {
                    provider,
                    breaker: Breaker::new(breaker_failures, breaker_cooldown),
                })
            })
            .collect();
        Resilient {
            providers,
            policy,
            metrics,
            models,
            active_model,
        }
    }

    /// Models the primary provider may be switched to.
    pub fn models(&self) -> &[String] {
        &self.models
    }

    /// The primary provider's model now.
    pub fn active_model(&self) -> String {
        self.active_model
            .read()
            .map(|m| m.clone())
            .unwrap_or_else(|p| p.into_inner().clone())
    }

    /// Switches the primary provider to one of [`Self::models`]; false for any other id.
    pub fn set_active_model(&self, id: &str) -> bool {
        if !self.models.iter().any(|m| m == id) {
            return false;
        }
        let mut active = self.active_model.write().unwrap_or_else(|p| p.into_inner());
        *active = id.to_string();
        true
    }

    /// The providers, primary first.
    pub fn providers(&self) -> &[Arc<Guarded>] {
        &self.providers
    }

    pub fn metrics(&self) -> &Arc<AiMetrics> {
        &self.metrics
    }

    /// The primary provider.
    pub fn primary(&self) -> &Arc<dyn Provider> {
        &self.providers[0].provider
    }

    /// Starts an answer: tries each provider in turn, each up to `attempts` times, until one
    /// gives a first piece within the first-token timeout. The error is the last failure.
    pub async fn open(&self, request: &ChatRequest) -> Result<Opened, ProviderError> {
        let mut last = ProviderError::CircuitOpen;
        for (i, guarded) in self.providers.iter().enumerate() {
            let mut request = request.clone();
            let active = self.active_model();
            if i == 0 && active != guarded.provider.model() {
                request.model = Some(active);
            }
            let request = &request;
            let name = guarded.provider.name();
            let model = request.model_for(guarded.provider.as_ref());
            for attempt in 1..=self.policy.attempts {
                if !guarded.breaker.allow() {
                    self.metrics.error(name, model, "circuit_open");
                    last = ProviderError::CircuitOpen;
                    break;
                }
                if attempt > 1 {
                    self.metrics.retry(name, model);
                    tokio::time::sleep(self.policy.backoff(attempt - 1)).await;
                }
                self.metrics.request(name, model);
                match self.try_open(guarded, request).await {
                    Ok(mut opened) => {
                        opened.is_fallback = i > 0;
                        if i > 0 {
                            self.metrics.fallback(name, model);
                        }
                        return Ok(opened);
                    }
                    Err(e) => {
                        log::warn!(
                            "{name} ({model}) failed before answering (try {attempt} of {}): {e}",
                            self.policy.attempts
                        );
                        self.metrics.error(name, model, e.kind());
                        let retry = e.is_retryable();
                        last = e;
                        if !retry {
                            break;
                        }
                    }
                }
            }
        }
        Err(last)
    }

    async fn try_open(
        &self,
        guarded: &Arc<Guarded>,
        request: &ChatRequest,
    ) -> Result<Opened, ProviderError> {
        let mut outcome = Outcome {
            guarded: guarded.clone(),
            settled: false,
        };
        let started = Instant::now();
        let deadline = started + self.policy.answer_timeout;
        let provider = &guarded.provider;
        let name = provider.name().to_string();
        let model = request.model_for(provider.as_ref()).to_string();
        let mut inner = provider.stream(request.clone());
        let first = match tokio::time::timeout(self.policy.first_token_timeout, inner.next()).await
        {
            Err(_) => Err(ProviderError::Timeout(format!(
                "no first token within {:?}",
                self.policy.first_token_timeout
            ))),
            Ok(Some(Err(e))) => Err(e),
            Ok(Some(Ok(chunk))) => Ok(Some(chunk)),
            Ok(None) => Ok(None),
        };
        let first = match first {
            Ok(first) => first,
            Err(e) => {
                outcome.settle(Err(&e));
                return Err(e);
            }
        };
        self.metrics.first_token(&name, &model, started.elapsed());
        let metrics = self.metrics.clone();
        let answer_timeout = self.policy.answer_timeout;
        let state = Watch {
            inner,
            first,
            deadline,
            started,
            outcome,
            metrics,
            name: name.clone(),
            model: model.clone(),
            usage: None,
            answer_timeout,
            ended: false,
        };
        Ok(Opened {
            provider: name,
            model,
            is_fallback: false,
            stream: Box::pin(stream::unfold(state, Watch::step)),
        })
    }
}

/// Follows a started answer: enforces the whole-answer deadline and records how it ended.
struct Watch {
    inner: TokenStream,
    first: Option<Chunk>,
    deadline: Instant,
    started: Instant,
    outcome: Outcome,
    metrics: Arc<AiMetrics>,
    name: String,
    model: String,
    usage: Option<(u64, u64)>,
    answer_timeout: Duration,
    ended: bool,
}

impl Watch {
    async fn step(mut self) -> Option<(Result<Chunk, ProviderError>, Watch)> {
        if self.ended {
            return None;
        }
        let next = match self.first.take() {
            Some(first) => Some(Ok(first)),
            None => {
                let deadline = tokio::time::Instant::from_std(self.deadline);
                match tokio::time::timeout_at(deadline, self.inner.next()).await {
                    Ok(next) => next,
                    Err(_) => Some(Err(ProviderError::Timeout(format!(
                        "the answer took longer than {:?}",
                        self.answer_timeout
                    )))),
                }
            }
        };
        match next {
            Some(Ok(chunk)) => {
                if let Chunk::Usage(u) = &chunk {
                    self.usage = Some((u.input_tokens, u.output_tokens));
                }
                Some((Ok(chunk), self))
            }
            Some(Err(e)) => {
                log::warn!("{} ({}) failed mid-answer: {e}", self.name, self.model);
                self.metrics.error(&self.name, &self.model, e.kind());
                self.outcome.settle(Err(&e));
                self.ended = true;
                Some((Err(e), self))
            }
            None => {
                self.outcome.settle(Ok(()));
                self.metrics
                    .finished(&self.name, &self.model, self.started.elapsed(), self.usage);
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_breaker_opens_then_lets_one_trial_through() {
        let b = Breaker::new(2, Duration::from_millis(0));
        assert!(b.allow());
        b.failure();
        assert_eq!(b.state(), "closed");
        b.failure();
        // Cooled down at once: the next call is the one trial.
        assert!(b.allow());
        assert!(!b.allow(), "a second call during the trial");
        b.failure();
        assert!(b.allow());
        b.success();
        assert_eq!(b.state(), "closed");
        assert!(b.allow() && b.allow());
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        let p = Policy {
            attempts: 5,
            retry_delay: Duration::from_millis(100),
            first_token_timeout: Duration::from_secs(1),
            answer_timeout: Duration::from_secs(1),
        };
        let d1 = p.backoff(1);
        assert!(d1 >= Duration::from_millis(50) && d1 <= Duration::from_millis(100));
        let d3 = p.backoff(3);
        assert!(d3 >= Duration::from_millis(200) && d3 <= Duration::from_millis(400));
        assert!(p.backoff(40) <= MAX_RETRY_DELAY);
    }
}
