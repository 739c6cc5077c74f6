//! Counters and latency samples per provider and model, for `/admin/chat/metrics/ai`.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Mutex;
use std::time::Duration;

use serde::Serialize;

/// Latency samples kept per model; older ones are dropped, so memory stays bounded.
const SAMPLES: usize = 1024;

#[derive(Default)]
struct ModelStats {
    requests: u64,
    errors: BTreeMap<&'static str, u64>,
    retries: u64,
    fallbacks: u64,
    cache_hits: u64,
    first_token_ms: VecDeque<u64>,
    total_ms: VecDeque<u64>,
    tokens_in: u64,
    tokens_out: u64,
}

/// One provider and model as the metrics endpoint shows it.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ModelReport {
    pub provider: String,
    pub model: String,
    pub requests: u64,
    /// Failures by kind: `throttled`, `timeout`, `server_error`, `rejected`, `connect`,
    /// `malformed`, `circuit_open`.
    pub errors: BTreeMap<&'static str, u64>,
    pub retries: u64,
    /// Answers this model gave as the fallback provider.
    pub fallbacks: u64,
    pub cache_hits: u64,
    pub time_to_first_token_ms: Percentiles,
    pub total_latency_ms: Percentiles,
    pub tokens_in: u64,
    pub tokens_out: u64,
}

#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct Percentiles {
    pub samples: usize,
    pub p50: Option<u64>,
    pub p90: Option<u64>,
    pub p99: Option<u64>,
}

#[derive(Default)]
pub struct AiMetrics {
    models: Mutex<HashMap<(String, String), ModelStats>>,
}

impl AiMetrics {
    fn with(&self, provider: &str, model: &str, f: impl FnOnce(&mut ModelStats)) {
        // A poisoned lock only means a panic elsewhere while counting; the counts stay usable.
        let mut models = self.models.lock().unwrap_or_else(|p| p.into_inner());
        f(models
            .entry((provider.to_string(), model.to_string()))
            .or_default());
    }

    pub fn request(&self, provider: &str, model: &str) {
        self.with(provider, model, |s| s.requests += 1);
    }

    pub fn error(&self, provider: &str, model: &str, kind: &'static str) {
        self.with(provider, model, |s| *s.errors.entry(kind).or_default() += 1);
    }

    pub fn retry(&self, provider: &str, model: &str) {
        self.with(provider, model, |s| s.retries += 1);
    }

    pub fn fallback(&self, provider: &str, model: &str) {
        self.with(provider, model, |s| s.fallbacks += 1);
    }

    pub fn cache_hit(&self, provider: &str, model: &str) {
        self.with(provider, model, |s| s.cache_hits += 1);
    }

    pub fn first_token(&self, provider: &str, model: &str, after: Duration) {
        self.with(provider, model, |s| push(&mut s.first_token_ms, after));
    }

    pub fn finished(
        &self,
        provider: &str,
        model: &str,
        after: Duration,
        usage: Option<(u64, u64)>,
    ) {
        self.with(provider, model, |s| {
            push(&mut s.total_ms, after);
            if let Some((input, output)) = usage {
                s.tokens_in += input;
                s.tokens_out += output;
            }
        });
    }

    /// Every provider and model seen so far, sorted.
    pub fn report(&self) -> Vec<ModelReport> {
        let models = self.models.lock().unwrap_or_else(|p| p.into_inner());
        let mut out: Vec<ModelReport> = models
            .iter()
            .map(|((provider, model), s)| ModelReport {
                provider: provider.clone(),
                model: model.clone(),
                requests: s.requests,
                errors: s.errors.clone(),
                retries: s.retries,
                fallbacks: s.fallbacks,
                cache_hits: s.cache_hits,
                time_to_first_token_ms: percentiles(&s.first_token_ms),
                total_latency_ms: percentiles(&s.total_ms),
                tokens_in: s.tokens_in,
                tokens_out: s.tokens_out,
            })
            .collect();
        out.sort_by(|a, b| (&a.provider, &a.model).cmp(&(&b.provider, &b.model)));
        out
    }
}

fn push(samples: &mut VecDeque<u64>, d: Duration) {
    if samples.len() == SAMPLES {
        samples.pop_front();
    }
    samples.push_back(u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
}

fn percentiles(samples: &VecDeque<u64>) -> Percentiles {
    let mut sorted: Vec<u64> = samples.iter().copied().collect();
    sorted.sort_unstable();
    let at = |q: f64| -> Option<u64> {
        if sorted.is_empty() {
            return None;
        }
        let i = ((sorted.len() as f64 * q).ceil() as usize).clamp(1, sorted.len()) - 1;
        Some(sorted[i])
    };
    Percentiles {
        samples: sorted.len(),
        p50: at(0.5),
        p90: at(0.9),
        p99: at(0.99),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_pick_ranks() {
        let samples: VecDeque<u64> = (1..=100).collect();
        let p = percentiles(&samples);
        assert_eq!((p.p50, p.p90, p.p99), (Some(50), Some(90), Some(99)));
        assert_eq!(percentiles(&VecDeque::new()).p50, None);
    }
}
