//! Where counters live. Both stores answer with the same semantics; the conformance suite in
//! `tests/` runs the same scenarios against each.

pub mod breaker;
mod connection;
mod memory;
mod redis;

use async_trait::async_trait;

use crate::strategy::{Params, Verdict};

pub(crate) use self::connection::redact_password;
pub use self::connection::{RedisConnection, RedisTarget};
pub use self::memory::{now_ms, Clock, ManualClock, MemoryStore, SystemClock};
pub use self::redis::RedisStore;

/// One limit to check for a request: where its state lives, what it is, what the request
/// costs under it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LimitSpec {
    pub key: String,
    pub params: Params,
    pub cost: u64,
}

/// A lease holder's reservation of part of a leased limit's lease quota.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reservation {
    /// Where the limit's reservations are ([`crate::keys::lease_holders_key`]).
    pub key: String,
    /// A filter worker and the kind of request the lease is for.
    pub holder: String,
    /// How long the reservation lasts: the lease's time.
    pub ttl_ms: u64,
    /// What all leases on the limit may hold at once.
    pub quota: u64,
}

/// Quota a lease took from one limit and gives back unused (see [`crate::strategy::refund`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refund {
    /// The limit's key.
    pub key: String,
    pub params: Params,
    /// What to give back, in request costs.
    pub units: u64,
    /// A fixed window's start when the lease was counted in it (0 for the buckets).
    pub counted_in: u64,
    /// The grant this comes from: each key takes one refund per grant, so a replayed return
    /// gives nothing back.
    pub grant: String,
    /// How long a replay of the grant must be refused: until its token ends.
    pub remember_ms: u64,
    /// The holder whose reservation on the key ends with the return
    /// ([`crate::keys::lease_holders_key`]).
    pub holder: String,
}

/// Usage a request reported beyond its reservation, charged in full
/// ([`crate::strategy::charge`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Charge {
    /// The limit's key.
    pub key: String,
    pub params: Params,
    /// What to charge, in request costs.
    pub units: u64,
    /// The reservation this settles: a key takes one settlement per reservation (a refund,
    /// under [`Refund::grant`], or a charge), so a replayed settlement charges nothing.
    pub reservation: String,
    /// How long a replay must be refused.
    pub remember_ms: u64,
}

/// One request's limits, as a store checks them within a batch.
#[derive(Debug, Clone, Copy)]
pub struct CheckSpec<'a> {
    pub limits: &'a [LimitSpec],
    /// Names the slots the request takes in `concurrency` limits.
    pub lease_id: &'a str,
}

/// The result of checking several limits at once: all of them admit the request (and each
/// counts it), or the first one that cannot denies it and none counts it. The verdicts of
/// the limits that did not deny then describe their state as it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// Index (into the checked limits) of the first limit that denied, if any.
    pub denied_by: Option<usize>,
    /// One verdict per checked limit, in order.
    pub verdicts: Vec<Verdict>,
    /// Answered by the breaker's fallback, not by the store: nothing the store holds was
    /// taken (so nothing may later be given back to it).
    pub in_fallback: bool,
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
    #[error(
        "the circuit to {0} is open: the store failed and is not asked until a probe succeeds"
    )]
    CircuitOpen(String),
}

#[async_trait]
pub trait Store: Send + Sync {
    /// A short name for logs and `/readyz`.
    fn describe(&self) -> String;

    /// Why calls are not going to the store, if they are not (its circuit is open).
    fn circuit(&self) -> Option<String> {
        None
    }

    /// Checks a batch of requests in order, each atomically: a later request sees what an
    /// earlier one consumed, exactly as if they had come one by one. One outcome per request.
    async fn check_batch(&self, checks: &[CheckSpec<'_>]) -> Result<Vec<Outcome>, StoreError>;

    /// Checks `limits` for one request, atomically. `lease_id` names the slots the request
    /// takes in `concurrency` limits.
    async fn check(&self, limits: &[LimitSpec], lease_id: &str) -> Result<Outcome, StoreError> {
        let mut outcomes = self.check_batch(&[CheckSpec { limits, lease_id }]).await?;
        match (outcomes.pop(), outcomes.is_empty()) {
            (Some(outcome), true) => Ok(outcome),
            _ => Err(StoreError::Reply(
                "expected one outcome for one check".into(),
            )),
        }
    }

    /// Checks each of `limits` as a request of its own (without leases), in one batch: one
    /// verdict per limit.
    async fn check_each(&self, limits: &[LimitSpec]) -> Result<Vec<Verdict>, StoreError> {
        let batch: Vec<CheckSpec<'_>> = limits
            .iter()
            .map(|limit| CheckSpec {
                limits: std::slice::from_ref(limit),
                lease_id: "",
            })
            .collect();
        let outcomes = self.check_batch(&batch).await?;
        let verdicts: Vec<Verdict> = outcomes
            .into_iter()
            .filter_map(|outcome| outcome.verdicts.first().copied())
            .collect();
        if verdicts.len() != limits.len() {
            return Err(StoreError::Reply(format!(
                "{} verdicts for {} limits",
                verdicts.len(),
                limits.len()
            )));
        }
        Ok(verdicts)
    }

    /// Gives back the `count` concurrency slots of `lease_id` in `key`; returns how many
    /// were still held.
    async fn release(&self, key: &str, lease_id: &str, count: u64) -> Result<u64, StoreError>;

    /// Reserves for each holder its part of a leased limit's lease quota: the units
    /// reserved, one per reservation asked. The quota is split evenly between the holders
    /// with a live reservation on the key, and no holder gets more than the others leave
    /// (`lua/lease_reserve.lua`).
    async fn reserve_leases(&self, asked: &[Reservation]) -> Result<Vec<u64>, StoreError>;

    /// Gives back what leases took and did not use, one answer per refund: the units given
    /// back (0 for a grant already returned to that key, or a window that ended). Each
    /// refund also ends its holder's reservation on the key.
    async fn refund(&self, refunds: &[Refund]) -> Result<Vec<u64>, StoreError>;

    /// Charges usage beyond reservations, one answer per charge: the units charged (0 for
    /// a reservation already settled on that key, or a strategy that cannot settle usage).
    async fn charge(&self, charges: &[Charge]) -> Result<Vec<u64>, StoreError>;

    /// Now, by the clock the store's scripts count time on, as well as the controller can
    /// tell (the Redis server's clock is this machine's, within what NTP keeps them apart).
    fn now_ms(&self) -> u64 {
        now_ms()
    }

    /// Whether the store answers.
    async fn ping(&self) -> Result<(), StoreError>;

    /// Deletes these counters; returns how many there were.
    async fn delete_keys(&self, keys: &[String]) -> Result<u64, StoreError>;

    /// Deletes every counter of `rule` (every client's), or every counter of every rule;
    /// returns how many there were. Nothing but counters is touched.
    async fn delete_counters(&self, rule: Option<&str>) -> Result<u64, StoreError>;

    /// Keeps `controller`'s stats of the bucket starting at `start_ms` (of `resolution_ms`)
    /// for `ttl_ms`, where every controller's stats API can read them, and notes that the
    /// controller was alive now.
    async fn publish_stats(
        &self,
        controller: &str,
        resolution_ms: u64,
        start_ms: u64,
        payload: Vec<u8>,
        ttl_ms: u64,
    ) -> Result<(), StoreError>;

    /// Every live controller's stats of the buckets of `resolution_ms` starting at
    /// `starts`, but `except`'s (the caller's own, which it holds itself).
    async fn read_stats(
        &self,
        resolution_ms: u64,
        starts: &[u64],
        except: &str,
    ) -> Result<Vec<Vec<u8>>, StoreError>;
}
