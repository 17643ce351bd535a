//! The embedded store: counters in this process's memory, for development and single
//! instances. Same semantics as the Redis scripts, with an injectable clock.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use sluice_protocol::Strategy;

use super::{Charge, CheckSpec, LimitSpec, Outcome, Refund, Reservation, Store, StoreError};
use crate::keys;
use crate::strategy::{self, State};

/// Milliseconds since the Unix epoch.
pub trait Clock: Send + Sync {
    fn now_ms(&self) -> u64;
}

#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> u64 {
        now_ms()
    }
}

/// Milliseconds since the epoch by this machine's clock (0 before 1970).
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
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

struct Entry {
    state: Option<State>,
    /// When the entry may be forgotten: the twin of the Redis key's TTL.
    expires_at: u64,
}

struct Entries {
    by_key: HashMap<String, Entry>,
    next_sweep_at: u64,
}

impl Entries {
    fn state(&self, key: &str, now: u64) -> Option<&State> {
        self.by_key
            .get(key)
            .filter(|entry| entry.expires_at > now)
            .and_then(|e| e.state.as_ref())
    }
}

/// How often expired entries are swept, at most.
const SWEEP_EVERY_MS: u64 = 1_000;

pub struct MemoryStore {
    clock: Arc<dyn Clock>,
    entries: Mutex<Entries>,
    /// The twin of `lua/lease_reserve.lua`: per reservations key, each holder's last.
    reservations: Mutex<Reservations>,
}

/// The twins of `lua/lease_reserve.lua`'s constants: a first lease's size, and the
/// traffic a lease is sized to hold (a second of it).
const FIRST_LEASE: u64 = 16;
const LEASE_RATE_PERIOD_MS: u64 = 1_000;

/// A holder's last reservation on a key.
struct Reserved {
    ends: u64,
    units: u64,
    at: u64,
}

#[derive(Default)]
struct Reservations {
    by_key: HashMap<String, HashMap<String, Reserved>>,
    /// The twin of the `refunded` sets of `lua/lease_return.lua`: (limit key, grant) →
    /// until when a replay of that grant's return is refused.
    refunded: HashMap<(String, String), u64>,
    next_sweep_at: u64,
}

impl Reservations {
    /// Forgets ended reservations and settlements past their memory, at most every
    /// [`SWEEP_EVERY_MS`]: every call that adds to them sweeps.
    fn sweep(&mut self, now: u64) {
        if now < self.next_sweep_at {
            return;
        }
        self.by_key.retain(|_, held| {
            held.retain(|_, held| held.ends > now);
            !held.is_empty()
        });
        self.refunded.retain(|_, until| *until > now);
        self.next_sweep_at = now.saturating_add(SWEEP_EVERY_MS);
    }
}

impl MemoryStore {
    pub fn new(clock: Arc<dyn Clock>) -> Self {
        MemoryStore {
            clock,
            entries: Mutex::new(Entries {
                by_key: HashMap::new(),
                next_sweep_at: 0,
            }),
            reservations: Mutex::new(Reservations::default()),
        }
    }

    /// Number of entries held; expired ones are dropped at most a second after they expire.
    pub fn len(&self) -> usize {
        self.lock().by_key.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Entries> {
        self.entries.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn check_now(&self, limits: &[LimitSpec], lease_id: &str) -> Outcome {
        let now = self.clock.now_ms();
        let mut entries = self.lock();
        if now >= entries.next_sweep_at {
            entries.by_key.retain(|_, entry| entry.expires_at > now);
            entries.next_sweep_at = now.saturating_add(SWEEP_EVERY_MS);
        }
        // As the script does first: a concurrency limit forgets its expired leases, each
        // once, so that no later check counts them again.
        for limit in limits
            .iter()
            .filter(|limit| limit.params.strategy == Strategy::Concurrency)
        {
            if let Some(entry) = entries.by_key.get_mut(&limit.key) {
                strategy::forget_expired(&mut entry.state, now);
            }
        }
        // No allocation for the common case of limits without a penalty.
        let penalty_keys: Vec<Option<String>> =
            if limits.iter().any(|limit| limit.params.penalty.is_some()) {
                limits
                    .iter()
                    .map(|limit| limit.params.penalty.map(|_| keys::penalty_key(&limit.key)))
                    .collect()
            } else {
                Vec::new()
            };
        let peeked: Vec<_> = limits
            .iter()
            .enumerate()
            .map(|(index, limit)| {
                let cooling = match penalty_keys.get(index).and_then(Option::as_ref) {
                    Some(key) if limit.cost > 0 => strategy::cooling(entries.state(key, now), now),
                    _ => 0,
                };
                if cooling > 0 {
                    return strategy::Peeked {
                        verdict: strategy::Verdict {
                            ok: false,
                            reset_ms: cooling,
                            retry_after_ms: cooling,
                            cooling: true,
                            ..strategy::Verdict::default()
                        },
                        commit: None,
                    };
                }
                strategy::peek(
                    &limit.params,
                    entries.state(&limit.key, now),
                    now,
                    limit.cost,
                )
            })
            .collect();
        let denied_by = peeked.iter().position(|p| !p.verdict.ok);
        let mut verdicts: Vec<_> = peeked.iter().map(|p| p.verdict).collect();
        match denied_by {
            None => {
                for (limit, peeked) in limits.iter().zip(peeked) {
                    let Some((commit, ttl)) = peeked.commit else {
                        continue;
                    };
                    if limit.cost == 0 || limit.params.limit == 0 {
                        continue;
                    }
                    let expires_at = now.saturating_add(ttl.max(1));
                    let entry = entries.by_key.entry(limit.key.clone()).or_insert(Entry {
                        state: None,
                        expires_at,
                    });
                    if entry.expires_at <= now {
                        entry.state = None;
                    }
                    strategy::apply(commit, &mut entry.state, lease_id);
                    entry.expires_at = expires_at;
                }
            }
            Some(denier) => {
                for (index, limit) in limits.iter().enumerate().filter(|(i, _)| *i != denier) {
                    let state = entries.state(&limit.key, now);
                    verdicts[index] = strategy::peek(&limit.params, state, now, 0).verdict;
                }
                // The limit that denied, outside a cool-down: one more strike.
                let struck = limits.get(denier).zip(penalty_keys.get(denier));
                if let (Some((limit, Some(key))), Some(verdict)) =
                    (struck, verdicts.get_mut(denier))
                {
                    if let (Some(penalty), false, true) =
                        (limit.params.penalty, verdict.cooling, limit.cost > 0)
                    {
                        let (state, cooldown, ttl) =
                            strategy::strike(&penalty, entries.state(key, now), now);
                        entries.by_key.insert(
                            key.clone(),
                            Entry {
                                state: Some(state),
                                expires_at: now.saturating_add(ttl.max(1)),
                            },
                        );
                        verdict.retry_after_ms = verdict.retry_after_ms.max(cooldown);
                        verdict.reset_ms = verdict.reset_ms.max(cooldown);
                        verdict.cooling = true;
                    }
                }
            }
        }
        Outcome {
            denied_by,
            verdicts,
            in_fallback: false,
        }
    }
}

#[async_trait]
impl Store for MemoryStore {
    fn describe(&self) -> String {
        "embedded in-memory store".to_owned()
    }

    async fn check_batch(&self, checks: &[CheckSpec<'_>]) -> Result<Vec<Outcome>, StoreError> {
        Ok(checks
            .iter()
            .map(|check| self.check_now(check.limits, check.lease_id))
            .collect())
    }

    async fn release(&self, key: &str, lease_id: &str, count: u64) -> Result<u64, StoreError> {
        let now = self.clock.now_ms();
        let mut entries = self.lock();
        Ok(match entries.by_key.get_mut(key) {
            Some(entry) if entry.expires_at > now => {
                strategy::release(&mut entry.state, lease_id, count, now)
            }
            _ => 0,
        })
    }

    async fn reserve_leases(&self, asked: &[Reservation]) -> Result<Vec<u64>, StoreError> {
        let now = self.clock.now_ms();
        let mut reservations = self
            .reservations
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let reservations = &mut *reservations;
        reservations.sweep(now);
        Ok(asked
            .iter()
            .map(|reservation| {
                let held = reservations
                    .by_key
                    .entry(reservation.key.clone())
                    .or_default();
                let wanted = match held.get(&reservation.holder) {
                    Some(last) if last.ends > now && last.units > 0 => {
                        let elapsed = now.saturating_sub(last.at).max(1);
                        last.units
                            .saturating_mul(LEASE_RATE_PERIOD_MS)
                            .div_ceil(elapsed)
                    }
                    _ => FIRST_LEASE,
                };
                held.retain(|name, held| held.ends > now && *name != reservation.holder);
                let others: u64 = held.values().map(|held| held.units).sum();
                let holders = held.len() as u64 + 1;
                let quota = reservation.quota;
                let units = (quota / holders)
                    .min(quota.saturating_sub(others))
                    .min(wanted);
                held.insert(
                    reservation.holder.clone(),
                    Reserved {
                        ends: now.saturating_add(reservation.ttl_ms),
                        units,
                        at: now,
                    },
                );
                units
            })
            .collect())
    }

    async fn charge(&self, charges: &[Charge]) -> Result<Vec<u64>, StoreError> {
        let now = self.clock.now_ms();
        let mut entries = self.lock();
        let mut reservations = self
            .reservations
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        reservations.sweep(now);
        Ok(charges
            .iter()
            .map(|charge| {
                let marker = (charge.key.clone(), charge.reservation.clone());
                if reservations
                    .refunded
                    .get(&marker)
                    .is_some_and(|&until| until > now)
                {
                    return 0;
                }
                reservations
                    .refunded
                    .insert(marker, now.saturating_add(charge.remember_ms.max(1)));
                let live = entries
                    .by_key
                    .get(&charge.key)
                    .filter(|entry| entry.expires_at > now)
                    .and_then(|entry| entry.state.as_ref());
                match strategy::charge(&charge.params, live, now, charge.units) {
                    Some(charged) => {
                        entries.by_key.insert(
                            charge.key.clone(),
                            Entry {
                                state: Some(charged.state),
                                expires_at: now.saturating_add(charged.ttl_ms.max(1)),
                            },
                        );
                        charge.units
                    }
                    None => 0,
                }
            })
            .collect())
    }

    async fn refund(&self, refunds: &[Refund]) -> Result<Vec<u64>, StoreError> {
        let now = self.clock.now_ms();
        let mut entries = self.lock();
        let mut reservations = self
            .reservations
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        reservations.sweep(now);
        Ok(refunds
            .iter()
            .map(|refund| {
                if let Some(held) = reservations
                    .by_key
                    .get_mut(&keys::lease_holders_key(&refund.key))
                {
                    held.remove(&refund.holder);
                }
                let marker = (refund.key.clone(), refund.grant.clone());
                if reservations
                    .refunded
                    .get(&marker)
                    .is_some_and(|&until| until > now)
                {
                    return 0;
                }
                reservations
                    .refunded
                    .insert(marker, now.saturating_add(refund.remember_ms.max(1)));
                let Some(entry) = entries
                    .by_key
                    .get_mut(&refund.key)
                    .filter(|entry| entry.expires_at > now)
                else {
                    return 0;
                };
                match strategy::refund(
                    &refund.params,
                    entry.state.as_ref(),
                    now,
                    refund.units,
                    refund.counted_in,
                ) {
                    Some(refunded) => {
                        entry.state = Some(refunded.state);
                        entry.expires_at = now.saturating_add(refunded.ttl_ms.max(1));
                        refunded.given
                    }
                    None => 0,
                }
            })
            .collect())
    }

    fn now_ms(&self) -> u64 {
        self.clock.now_ms()
    }

    async fn ping(&self) -> Result<(), StoreError> {
        Ok(())
    }

    /// One embedded store serves one controller: there is nobody to share stats with.
    async fn publish_stats(
        &self,
        _controller: &str,
        _resolution_ms: u64,
        _start_ms: u64,
        _payload: Vec<u8>,
        _ttl_ms: u64,
    ) -> Result<(), StoreError> {
        Ok(())
    }

    async fn read_stats(
        &self,
        _resolution_ms: u64,
        _starts: &[u64],
        _except: &str,
    ) -> Result<Vec<Vec<u8>>, StoreError> {
        Ok(Vec::new())
    }

    async fn delete_keys(&self, keys: &[String]) -> Result<u64, StoreError> {
        let now = self.clock.now_ms();
        let mut entries = self.lock();
        let deleted = keys
            .iter()
            .filter_map(|key| entries.by_key.remove(key))
            .filter(|entry| entry.expires_at > now)
            .count();
        Ok(deleted as u64)
    }

    async fn delete_counters(&self, rule: Option<&str>) -> Result<u64, StoreError> {
        let now = self.clock.now_ms();
        let mut entries = self.lock();
        let before = entries.by_key.len();
        let mut expired = 0;
        entries.by_key.retain(|key, entry| {
            let counter =
                crate::keys::rule_of(key).is_some_and(|of| rule.is_none_or(|rule| rule == of));
            if counter && entry.expires_at <= now {
                expired += 1;
            }
            !counter
        });
        Ok((before - entries.by_key.len() - expired) as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::strategy::Params;
    use sluice_protocol::Strategy;

    fn fixed(key: &str, limit: u64, window_ms: u64) -> LimitSpec {
        LimitSpec {
            key: key.into(),
            params: Params {
                strategy: Strategy::FixedWindow,
                limit,
                period_ms: window_ms,
                extra: 0,
                penalty: None,
            },
            cost: 1,
        }
    }

    #[test]
    fn expired_entries_are_swept() {
        let clock = ManualClock::starting_at(10_000);
        let store = MemoryStore::new(clock.clone());
        for n in 0..100 {
            store.check_now(&[fixed(&format!("k{n}"), 5, 1_000)], "l");
        }
        assert_eq!(store.len(), 100);
        clock.advance(2_000);
        store.check_now(&[fixed("other", 5, 1_000)], "l");
        assert_eq!(store.len(), 1);
    }

    #[test]
    fn clock_going_back_admits_nothing_extra() {
        let clock = ManualClock::starting_at(120_500);
        let store = MemoryStore::new(clock.clone());
        let limits = [fixed("k", 3, 1_000)];
        for _ in 0..3 {
            assert!(store.check_now(&limits, "l").allowed());
        }
        assert!(!store.check_now(&limits, "l").allowed());
        // Back into the previous window: that window was never used, but the requests
        // just admitted were, and must still count.
        clock.set(119_900);
        assert!(!store.check_now(&limits, "l").allowed());
        clock.set(121_000);
        assert!(store.check_now(&limits, "l").allowed());
    }
}
