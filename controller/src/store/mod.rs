//! Where counters live. Both stores answer with the same semantics; the conformance suite in
//! `tests/` runs the same scenarios against each.

mod memory;
mod redis;

use async_trait::async_trait;

pub use self::memory::{Clock, ManualClock, MemoryStore, SystemClock};
pub use self::redis::RedisStore;

/// One limit to check: a counter key, how many requests it admits, per how long.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LimitSpec {
    pub key: String,
    pub limit: u64,
    pub window_ms: u64,
}

/// A limit's state after the check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LimitState {
    /// Requests counted in the current window, including this one when it was admitted.
    pub count: u64,
    /// Milliseconds until the current window ends.
    pub reset_ms: u64,
}

/// The result of checking several limits at once: all of them admit the request (and each
/// counts it), or the first one that cannot admits it and none counts it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// Index (into the checked limits) of the first limit that denied, if any.
    pub denied_by: Option<usize>,
    /// One state per checked limit, in order.
    pub states: Vec<LimitState>,
}

impl Outcome {
    pub fn allowed(&self) -> bool {
        self.denied_by.is_none()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("redis: {0}")]
    Redis(#[from] ::redis::RedisError),
    #[error("unexpected reply from the store: {0}")]
    Reply(String),
}

#[async_trait]
pub trait Store: Send + Sync {
    /// A short name for logs and `/readyz`.
    fn describe(&self) -> String;

    /// Fixed-window check of `limits` for one request costing `cost`, atomically.
    async fn fixed_window(&self, limits: &[LimitSpec], cost: u64) -> Result<Outcome, StoreError>;

    /// Whether the store answers.
    async fn ping(&self) -> Result<(), StoreError>;
}
