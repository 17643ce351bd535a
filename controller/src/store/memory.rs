//! The embedded store: counters in this process's memory, for development and single
//! instances. Same semantics as the Redis scripts, with an injectable clock.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{SystemTime, UNIX_EPOCH};

use async_trait::async_trait;

use super::{LimitSpec, LimitState, Outcome, Store, StoreError};

/// Milliseconds since the Unix epoch.
pub trait Clock: Send + Sync {
    fn now_ms(&self) -> u64;
}

#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> u64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64)
    }
}

/// A clock that moves only when told to, for tests.
#[derive(Debug, Default)]
pub struct ManualClock(AtomicU64);

impl ManualClock {
    pub fn starting_at(ms: u64) -> Arc<Self> {
        Arc::new(ManualClock(AtomicU64::new(ms)))
    }

    pub fn advance(&self, ms: u64) {
        self.0.fetch_add(ms, Ordering::SeqCst);
    }

    pub fn set(&self, ms: u64) {
        self.0.store(ms, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now_ms(&self) -> u64 {
        self.0.load(Ordering::SeqCst)
    }
}

#[derive(Debug, Clone, Copy)]
struct Window {
    start: u64,
    count: u64,
    /// When the entry may be forgotten (the end of its window): the twin of the Redis TTL.
    expires_at: u64,
}

struct Counters {
    windows: HashMap<String, Window>,
    next_sweep_at: u64,
}

/// How often expired counters are swept, at most.
const SWEEP_EVERY_MS: u64 = 1_000;

pub struct MemoryStore {
    clock: Arc<dyn Clock>,
    counters: Mutex<Counters>,
}

impl MemoryStore {
    pub fn new(clock: Arc<dyn Clock>) -> Self {
        MemoryStore {
            clock,
            counters: Mutex::new(Counters {
                windows: HashMap::new(),
                next_sweep_at: 0,
            }),
        }
    }

    /// Number of counters held; expired ones are dropped at most a second after they expire.
    pub fn len(&self) -> usize {
        self.counters
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .windows
            .len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn check(&self, limits: &[LimitSpec], cost: u64) -> Outcome {
        let now = self.clock.now_ms();
        let mut counters = self.counters.lock().unwrap_or_else(PoisonError::into_inner);
        if now >= counters.next_sweep_at {
            counters.windows.retain(|_, window| window.expires_at > now);
            counters.next_sweep_at = now.saturating_add(SWEEP_EVERY_MS);
        }

        let mut current = Vec::with_capacity(limits.len());
        let mut denied_by = None;
        for (index, spec) in limits.iter().enumerate() {
            let aligned_start = now - now % spec.window_ms;
            let window = match counters.windows.get(&spec.key) {
                // The current window, or (when the clock went back) a later one: keep counting
                // in it rather than admit a fresh window's worth again.
                Some(stored) if stored.start >= aligned_start => *stored,
                _ => Window {
                    start: aligned_start,
                    count: 0,
                    expires_at: aligned_start + spec.window_ms,
                },
            };
            if denied_by.is_none() && window.count.saturating_add(cost) > spec.limit {
                denied_by = Some(index);
            }
            current.push(window);
        }

        if denied_by.is_none() && cost > 0 {
            for (spec, window) in limits.iter().zip(current.iter_mut()) {
                window.count = window.count.saturating_add(cost);
                counters.windows.insert(spec.key.clone(), *window);
            }
        }
        let states = current
            .iter()
            .map(|w| LimitState {
                count: w.count,
                reset_ms: w.expires_at.saturating_sub(now),
            })
            .collect();
        Outcome { denied_by, states }
    }
}

#[async_trait]
impl Store for MemoryStore {
    fn describe(&self) -> String {
        "embedded in-memory store".to_owned()
    }

    async fn fixed_window(&self, limits: &[LimitSpec], cost: u64) -> Result<Outcome, StoreError> {
        Ok(self.check(limits, cost))
    }

    async fn ping(&self) -> Result<(), StoreError> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(key: &str, limit: u64, window_ms: u64) -> LimitSpec {
        LimitSpec {
            key: key.into(),
            limit,
            window_ms,
        }
    }

    #[test]
    fn expired_counters_are_swept() {
        let clock = ManualClock::starting_at(10_000);
        let store = MemoryStore::new(clock.clone());
        for n in 0..100 {
            store.check(&[spec(&format!("k{n}"), 5, 1_000)], 1);
        }
        assert_eq!(store.len(), 100);
        clock.advance(2_000);
        store.check(&[spec("other", 5, 1_000)], 1);
        assert_eq!(store.len(), 1);
    }

    #[test]
    fn clock_going_back_admits_nothing_extra() {
        let clock = ManualClock::starting_at(120_500);
        let store = MemoryStore::new(clock.clone());
        let limits = [spec("k", 3, 1_000)];
        for _ in 0..3 {
            assert!(store.check(&limits, 1).allowed());
        }
        assert!(!store.check(&limits, 1).allowed());
        // Back into the previous window: that window was never used, but the requests
        // just admitted were, and must still count.
        clock.set(119_900);
        assert!(!store.check(&limits, 1).allowed());
        clock.set(121_000);
        assert!(store.check(&limits, 1).allowed());
    }
}
