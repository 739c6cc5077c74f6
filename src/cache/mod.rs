//! Caches behind interfaces that a shared store (Redis) can implement later.
//!
//! [`AnswerCache`] keeps AI answers by the exact context they answered, so an identical
//! conversation is answered again without calling a provider. [`MemoryCache`] is the
//! in-process implementation: bounded, with a time to live.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use futures_util::future::BoxFuture;
use sha2::{Digest, Sha256};

use crate::providers::Turn;

/// Most answers the in-memory cache holds; the oldest go first when it is full.
pub const MEMORY_CACHE_ENTRIES: usize = 10_000;

/// An answer as it was given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CachedAnswer {
    pub text: String,
    pub provider: String,
    pub model: String,
}

/// Where AI answers are kept. Async, so a networked store fits behind it.
pub trait AnswerCache: Send + Sync {
    fn get(&self, key: &str) -> BoxFuture<'_, Option<CachedAnswer>>;
    fn put(&self, key: String, answer: CachedAnswer) -> BoxFuture<'_, ()>;
}

/// The key of a context: who would answer (provider and model) and everything the model is
/// shown. Hashed, so the key is short whatever the conversation's length.
pub fn context_key(provider: &str, model: &str, system_prompt: &str, history: &[Turn]) -> String {
    let mut h = Sha256::new();
    for part in [provider, model, system_prompt] {
        h.update((part.len() as u64).to_le_bytes());
        h.update(part.as_bytes());
    }
    for turn in history {
        for part in [&turn.role, &turn.content] {
            h.update((part.len() as u64).to_le_bytes());
            h.update(part.as_bytes());
        }
    }
    let digest = h.finalize();
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    format!("ai-answer:{hex}")
}

pub struct MemoryCache {
    ttl: Duration,
    capacity: usize,
    entries: Mutex<HashMap<String, (Instant, CachedAnswer)>>,
}

impl MemoryCache {
    pub fn new(ttl: Duration, capacity: usize) -> MemoryCache {
        MemoryCache {
            ttl,
            capacity: capacity.max(1),
            entries: Mutex::new(HashMap::new()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, (Instant, CachedAnswer)>> {
        // Entries are whole values: a panic elsewhere cannot leave one half-written.
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl AnswerCache for MemoryCache {
    fn get(&self, key: &str) -> BoxFuture<'_, Option<CachedAnswer>> {
        let mut entries = self.lock();
        let found = match entries.get(key) {
            Some((at, answer)) if at.elapsed() < self.ttl => Some(answer.clone()),
            Some(_) => {
                entries.remove(key);
                None
            }
            None => None,
        };
        Box::pin(async move { found })
    }

    fn put(&self, key: String, answer: CachedAnswer) -> BoxFuture<'_, ()> {
        let mut entries = self.lock();
        if entries.len() >= self.capacity && !entries.contains_key(&key) {
            let ttl = self.ttl;
            entries.retain(|_, (at, _)| at.elapsed() < ttl);
            if entries.len() >= self.capacity {
                if let Some(oldest) = entries
                    .iter()
                    .min_by_key(|(_, (at, _))| *at)
                    .map(|(k, _)| k.clone())
                {
                    entries.remove(&oldest);
                }
            }
        }
        entries.insert(key, (Instant::now(), answer));
        Box::pin(async {})
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(text: &str) -> CachedAnswer {
        CachedAnswer {
            text: text.into(),
            provider: "p".into(),
            model: "m".into(),
        }
    }

    #[tokio::test]
    async fn entries_expire_and_the_oldest_leave_first() {
        let cache = MemoryCache::new(Duration::from_secs(60), 2);
        cache.put("a".into(), answer("1")).await;
        cache.put("b".into(), answer("2")).await;
        cache.put("c".into(), answer("3")).await;
        assert_eq!(cache.get("a").await, None);
        assert_eq!(cache.get("c").await, Some(answer("3")));

        let expired = MemoryCache::new(Duration::ZERO, 2);
        expired.put("a".into(), answer("1")).await;
        assert_eq!(expired.get("a").await, None);
    }

    #[test]
    fn keys_tell_contexts_apart() {
        let t = |r: &str, c: &str| Turn {
            role: r.into(),
            content: c.into(),
        };
        let a = context_key("p", "m", "s", &[t("user", "ab")]);
        assert_eq!(a, context_key("p", "m", "s", &[t("user", "ab")]));
        assert_ne!(
            a,
            context_key("p", "m", "s", &[t("user", "a"), t("user", "b")])
        );
        assert_ne!(a, context_key("p", "m2", "s", &[t("user", "ab")]));
    }
}
