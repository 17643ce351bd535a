//! A circuit breaker around the counters' store, so that a dead or stalled Redis costs one
//! timeout per probe, not one per check.
//!
//! Closed, every call goes to the store. After `failures` consecutive failed calls the
//! breaker opens: calls are answered at once by the fallback, without touching the store.
//! Every `open_ms` one call is let through as a probe (half-open): its success closes the
//! breaker, its failure keeps it open for another `open_ms`. A probe whose caller went away
//! never reports; the next one is let through `open_ms` later all the same.
//!
//! While the store cannot answer, the fallback decides:
//! - `fail`: the call fails (the check API answers 503 at once) and the filter applies its
//!   failure mode, as it does for a controller it cannot reach;
//! - `allow` / `deny`: every request is admitted / refused here;
//! - `local`: counted in this controller's embedded store, on this controller's own: with N
//!   controllers a client gets at most N times its limit (each counts it from zero when the
//!   breaker opens).
//!
//! A failed call while the breaker is closed is answered by the fallback too (a timed-out
//! command may still have counted in Redis: exactness is lost for that call either way).

use std::sync::atomic::{AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use serde::Deserialize;

use super::{
    now_ms, Charge, CheckSpec, MemoryStore, Outcome, Refund, Reservation, Store, StoreError,
    SystemClock,
};
use crate::metrics::Metrics;
use crate::strategy::Verdict;

/// What answers while the counters' store cannot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum Fallback {
    /// The check fails: the filter applies its failure mode.
    #[default]
    Fail,
    /// Every request is admitted.
    Allow,
    /// Every request is refused.
    Deny,
    /// Counted in this controller's embedded store (at most N controllers × the limit).
    Local,
}

impl Fallback {
    pub fn as_str(self) -> &'static str {
        match self {
            Fallback::Fail => "fail",
            Fallback::Allow => "allow",
            Fallback::Deny => "deny",
            Fallback::Local => "local",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BreakerSettings {
    /// Consecutive failed calls that open the breaker.
    pub failures: u32,
    /// How long the breaker stays open before a probe.
    pub open_ms: u64,
    pub fallback: Fallback,
}

impl Default for BreakerSettings {
    fn default() -> Self {
        BreakerSettings {
            failures: 3,
            open_ms: 1_000,
            fallback: Fallback::Fail,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Position {
    Closed,
    Open,
    HalfOpen,
}

impl Position {
    pub fn as_str(self) -> &'static str {
        match self {
            Position::Closed => "closed",
            Position::Open => "open",
            Position::HalfOpen => "half_open",
        }
    }

    fn from_u8(value: u8) -> Position {
        match value {
            1 => Position::Open,
            2 => Position::HalfOpen,
            _ => Position::Closed,
        }
    }
}

/// Whether a call may go to the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    Store,
    /// Goes to the store as the half-open breaker's probe.
    Probe,
    /// Answered by the fallback.
    Fallback,
}

/// The breaker's state machine, on the time its caller gives. Closed with no recent
/// failure, admitting a call is one atomic load.
#[derive(Debug)]
pub struct Breaker {
    failures: u32,
    open_ms: u64,
    position: AtomicU8,
    consecutive: AtomicU32,
    /// When the breaker opened, or its last probe left.
    since_ms: AtomicU64,
}

impl Breaker {
    pub fn new(failures: u32, open_ms: u64) -> Breaker {
        Breaker {
            failures: failures.max(1),
            open_ms,
            position: AtomicU8::new(Position::Closed as u8),
            consecutive: AtomicU32::new(0),
            since_ms: AtomicU64::new(0),
        }
    }

    pub fn position(&self) -> Position {
        Position::from_u8(self.position.load(Ordering::Acquire))
    }

    pub fn admit(&self, now_ms: u64) -> Admission {
        if self.position() == Position::Closed {
            return Admission::Store;
        }
        let since = self.since_ms.load(Ordering::Acquire);
        if now_ms.saturating_sub(since) < self.open_ms {
            return Admission::Fallback;
        }
        // One caller wins the probe; the others keep to the fallback.
        match self
            .since_ms
            .compare_exchange(since, now_ms, Ordering::AcqRel, Ordering::Acquire)
        {
            Ok(_) => {
                self.position
                    .store(Position::HalfOpen as u8, Ordering::Release);
                Admission::Probe
            }
            Err(_) => Admission::Fallback,
        }
    }

    /// A call the store answered; returns the position entered, if it changed.
    pub fn succeeded(&self, admission: Admission) -> Option<Position> {
        if self.consecutive.load(Ordering::Relaxed) != 0 {
            self.consecutive.store(0, Ordering::Relaxed);
        }
        // Only a probe closes the breaker: a call that left before it opened says nothing
        // about the store now.
        (admission == Admission::Probe
            && self.position.swap(Position::Closed as u8, Ordering::AcqRel)
                != Position::Closed as u8)
            .then_some(Position::Closed)
    }

    /// A call the store did not answer; returns the position entered, if it changed.
    pub fn failed(&self, admission: Admission, now_ms: u64) -> Option<Position> {
        if admission == Admission::Probe {
            self.since_ms.store(now_ms, Ordering::Release);
            self.position.store(Position::Open as u8, Ordering::Release);
            return Some(Position::Open);
        }
        let failures = self
            .consecutive
            .fetch_add(1, Ordering::AcqRel)
            .saturating_add(1);
        if failures < self.failures {
            return None;
        }
        self.since_ms.store(now_ms, Ordering::Release);
        (self
            .position
            .compare_exchange(
                Position::Closed as u8,
                Position::Open as u8,
                Ordering::AcqRel,
                Ordering::Acquire,
            )
            .is_ok())
        .then_some(Position::Open)
    }
}

/// The counters' store behind a breaker, with its fallback.
pub struct GuardedStore {
    store: Arc<dyn Store>,
    breaker: Breaker,
    settings: BreakerSettings,
    local: Option<MemoryStore>,
    metrics: Arc<Metrics>,
}

impl GuardedStore {
    pub fn new(store: Arc<dyn Store>, settings: BreakerSettings, metrics: Arc<Metrics>) -> Self {
        metrics.breaker_position(Position::Closed);
        GuardedStore {
            store,
            breaker: Breaker::new(settings.failures, settings.open_ms),
            local: (settings.fallback == Fallback::Local)
                .then(|| MemoryStore::new(Arc::new(SystemClock))),
            settings,
            metrics,
        }
    }

    fn moved(&self, to: Option<Position>, error: Option<&StoreError>) {
        let Some(to) = to else {
            return;
        };
        self.metrics.breaker_moved(to);
        let store = self.store.describe();
        let fallback = self.settings.fallback.as_str();
        match (to, error) {
            (Position::Open, Some(error)) => tracing::warn!(
                %store, fallback, %error, retry_in_ms = self.settings.open_ms,
                "store circuit open: answering by the fallback"
            ),
            (Position::Closed, _) => {
                tracing::info!(%store, "store circuit closed: the store answers again");
            }
            // Once per `open_ms` for as long as the store is down.
            _ => tracing::debug!(%store, position = to.as_str(), "store circuit moved"),
        }
    }

    /// Runs `call` on the store if the breaker lets it through, else (or if it fails)
    /// answers by `fallback`.
    async fn guarded<T, C, F>(
        &self,
        call: C,
        fallback: impl FnOnce(StoreError) -> F,
    ) -> Result<T, StoreError>
    where
        C: std::future::Future<Output = Result<T, StoreError>>,
        F: std::future::Future<Output = Result<T, StoreError>>,
    {
        let admission = self.breaker.admit(now_ms());
        match admission {
            Admission::Fallback => {
                return fallback(StoreError::CircuitOpen(self.store.describe())).await;
            }
            Admission::Probe => self.moved(Some(Position::HalfOpen), None),
            Admission::Store => {}
        }
        match call.await {
            Ok(value) => {
                let moved = self.breaker.succeeded(admission);
                self.moved(moved, None);
                Ok(value)
            }
            Err(error) => {
                let moved = self.breaker.failed(admission, now_ms());
                self.moved(moved, Some(&error));
                fallback(error).await
            }
        }
    }

    async fn fallback_check(
        &self,
        checks: &[CheckSpec<'_>],
        error: StoreError,
    ) -> Result<Vec<Outcome>, StoreError> {
        let answered = match self.settings.fallback {
            Fallback::Fail => return Err(error),
            Fallback::Local => match &self.local {
                Some(local) => local.check_batch(checks).await?,
                None => return Err(error),
            },
            Fallback::Allow => checks.iter().map(|check| admitted(check)).collect(),
            Fallback::Deny => checks
                .iter()
                .map(|check| refused(check, self.settings.open_ms))
                .collect(),
        };
        self.metrics
            .fallback_checks(self.settings.fallback, checks.len() as u64);
        Ok(answered
            .into_iter()
            .map(|outcome| Outcome {
                in_fallback: true,
                ..outcome
            })
            .collect())
    }
}

fn admitted(check: &CheckSpec<'_>) -> Outcome {
    Outcome {
        in_fallback: true,
        denied_by: None,
        verdicts: check
            .limits
            .iter()
            .map(|limit| Verdict {
                ok: true,
                remaining: limit.params.limit.saturating_sub(limit.cost),
                reset_ms: limit.params.period_ms,
                retry_after_ms: 0,
                delay_ms: 0,
                cooling: false,
            })
            .collect(),
    }
}

fn refused(check: &CheckSpec<'_>, retry_after_ms: u64) -> Outcome {
    Outcome {
        in_fallback: true,
        denied_by: (!check.limits.is_empty()).then_some(0),
        verdicts: check
            .limits
            .iter()
            .map(|_| Verdict {
                ok: false,
                remaining: 0,
                reset_ms: retry_after_ms,
                retry_after_ms,
                delay_ms: 0,
                cooling: false,
            })
            .collect(),
    }
}

#[async_trait]
impl Store for GuardedStore {
    fn describe(&self) -> String {
        self.store.describe()
    }

    fn circuit(&self) -> Option<String> {
        match self.breaker.position() {
            Position::Closed => None,
            position => Some(format!(
                "the circuit to {} is {} (answering by the fallback: {})",
                self.store.describe(),
                position.as_str().replace('_', "-"),
                self.settings.fallback.as_str()
            )),
        }
    }

    async fn check_batch(&self, checks: &[CheckSpec<'_>]) -> Result<Vec<Outcome>, StoreError> {
        self.guarded(self.store.check_batch(checks), |error| {
            self.fallback_check(checks, error)
        })
        .await
    }

    async fn release(&self, key: &str, lease_id: &str, count: u64) -> Result<u64, StoreError> {
        self.guarded(
            self.store.release(key, lease_id, count),
            |error| async move {
                match (self.settings.fallback, &self.local) {
                    (Fallback::Fail, _) => Err(error),
                    (Fallback::Local, Some(local)) => local.release(key, lease_id, count).await,
                    // Nothing was taken where nothing was counted.
                    _ => Ok(0),
                }
            },
        )
        .await
    }

    async fn reserve_leases(&self, asked: &[Reservation]) -> Result<Vec<u64>, StoreError> {
        // Without the store no lease is granted: each request is then decided as it comes.
        self.guarded(self.store.reserve_leases(asked), |error| async move {
            Err(error)
        })
        .await
    }

    async fn refund(&self, refunds: &[Refund]) -> Result<Vec<u64>, StoreError> {
        // Leases are granted by the store only, so only the store can take them back.
        self.guarded(
            self.store.refund(refunds),
            |error| async move { Err(error) },
        )
        .await
    }

    async fn charge(&self, charges: &[Charge]) -> Result<Vec<u64>, StoreError> {
        // Reservations are the store's too: a fallback never held them.
        self.guarded(
            self.store.charge(charges),
            |error| async move { Err(error) },
        )
        .await
    }

    fn now_ms(&self) -> u64 {
        self.store.now_ms()
    }

    /// A readiness check probes an open circuit too, so that it closes without traffic.
    async fn ping(&self) -> Result<(), StoreError> {
        self.guarded(self.store.ping(), |error| async move { Err(error) })
            .await
    }

    async fn delete_keys(&self, keys: &[String]) -> Result<u64, StoreError> {
        self.store.delete_keys(keys).await
    }

    async fn delete_counters(&self, rule: Option<&str>) -> Result<u64, StoreError> {
        self.store.delete_counters(rule).await
    }

    async fn publish_stats(
        &self,
        controller: &str,
        resolution_ms: u64,
        start_ms: u64,
        payload: Vec<u8>,
        ttl_ms: u64,
    ) -> Result<(), StoreError> {
        if self.breaker.position() != Position::Closed {
            return Err(StoreError::CircuitOpen(self.store.describe()));
        }
        self.store
            .publish_stats(controller, resolution_ms, start_ms, payload, ttl_ms)
            .await
    }

    async fn read_stats(
        &self,
        resolution_ms: u64,
        starts: &[u64],
        except: &str,
    ) -> Result<Vec<Vec<u8>>, StoreError> {
        self.store.read_stats(resolution_ms, starts, except).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opens_after_consecutive_failures_only() {
        let breaker = Breaker::new(3, 1_000);
        assert_eq!(breaker.failed(Admission::Store, 0), None);
        assert_eq!(breaker.failed(Admission::Store, 0), None);
        assert_eq!(
            breaker.succeeded(Admission::Store),
            None,
            "a success resets"
        );
        assert_eq!(breaker.failed(Admission::Store, 0), None);
        assert_eq!(breaker.failed(Admission::Store, 0), None);
        assert_eq!(breaker.position(), Position::Closed);
        assert_eq!(breaker.failed(Admission::Store, 10), Some(Position::Open));
        assert_eq!(breaker.failed(Admission::Store, 11), None, "opened once");
        assert_eq!(breaker.position(), Position::Open);
    }

    #[test]
    fn open_answers_by_the_fallback_then_lets_one_probe_through() {
        let breaker = Breaker::new(1, 1_000);
        assert_eq!(breaker.admit(0), Admission::Store);
        breaker.failed(Admission::Store, 100);
        assert_eq!(breaker.admit(500), Admission::Fallback);
        assert_eq!(breaker.admit(1_099), Admission::Fallback);
        assert_eq!(breaker.admit(1_100), Admission::Probe);
        assert_eq!(breaker.position(), Position::HalfOpen);
        assert_eq!(
            breaker.admit(1_100),
            Admission::Fallback,
            "one probe at a time"
        );
        assert_eq!(breaker.admit(1_500), Admission::Fallback);
    }

    #[test]
    fn a_probe_closes_or_reopens() {
        let breaker = Breaker::new(1, 1_000);
        breaker.failed(Admission::Store, 0);
        assert_eq!(breaker.admit(1_000), Admission::Probe);
        assert_eq!(
            breaker.failed(Admission::Probe, 1_200),
            Some(Position::Open)
        );
        assert_eq!(
            breaker.admit(2_100),
            Admission::Fallback,
            "open from the failure"
        );
        assert_eq!(breaker.admit(2_200), Admission::Probe);
        assert_eq!(breaker.succeeded(Admission::Probe), Some(Position::Closed));
        assert_eq!(breaker.admit(2_201), Admission::Store);
    }

    #[test]
    fn a_late_success_of_an_earlier_call_does_not_close_it() {
        let breaker = Breaker::new(1, 1_000);
        breaker.failed(Admission::Store, 0);
        assert_eq!(breaker.succeeded(Admission::Store), None);
        assert_eq!(breaker.position(), Position::Open);
    }

    #[test]
    fn a_probe_that_never_reports_does_not_hold_the_breaker_open_forever() {
        let breaker = Breaker::new(1, 1_000);
        breaker.failed(Admission::Store, 0);
        assert_eq!(breaker.admit(1_000), Admission::Probe);
        // Its caller went away.
        assert_eq!(breaker.admit(1_999), Admission::Fallback);
        assert_eq!(breaker.admit(2_000), Admission::Probe);
    }
}
