//! Counters in Redis, one Lua script per strategy (see `lua/`), run with EVALSHA (the
//! `redis` crate reloads a script that the server does not know). Time comes from Redis
//! `TIME` inside the scripts, so controllers with skewed clocks agree.
//!
//! On a single Redis (or the master Sentinel names) a batch of checks is one script call.
//! On a Redis Cluster one script may only touch keys of one slot, so a batch whose keys span
//! slots is split: one script call per slot, carrying that slot's part of every request in
//! batch order, sent in parallel, the outcomes merged back in order (see
//! [`RedisStore::check_across_slots`] for what that means for all-or-nothing).

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use redis::{Script, ScriptInvocation};

use super::connection::{RedisConnection, RedisTarget};
use super::{Charge, CheckSpec, Clock, LimitSpec, Outcome, Refund, Reservation, Store, StoreError};
use crate::strategy::Verdict;

/// `lua/check.lua` after the prelude, the penalty and every strategy it dispatches to.
const CHECK: &str = concat!(
    include_str!("../../../lua/prelude.lua"),
    include_str!("../../../lua/penalty.lua"),
    include_str!("../../../lua/fixed_window.lua"),
    include_str!("../../../lua/sliding_window_log.lua"),
    include_str!("../../../lua/sliding_window_counter.lua"),
    include_str!("../../../lua/token_bucket.lua"),
    include_str!("../../../lua/gcra.lua"),
    include_str!("../../../lua/leaky_bucket.lua"),
    include_str!("../../../lua/concurrency.lua"),
    include_str!("../../../lua/check.lua"),
);
const RELEASE: &str = include_str!("../../../lua/release.lua");
const LEASE_RESERVE: &str = include_str!("../../../lua/lease_reserve.lua");
/// `lua/lease_return.lua` after the prelude and the strategies that can be leased.
const LEASE_RETURN: &str = concat!(
    include_str!("../../../lua/prelude.lua"),
    include_str!("../../../lua/fixed_window.lua"),
    include_str!("../../../lua/token_bucket.lua"),
    include_str!("../../../lua/gcra.lua"),
    include_str!("../../../lua/lease_return.lua"),
);

/// `lua/charge.lua` after the prelude and the strategies that can settle usage.
const CHARGE: &str = concat!(
    include_str!("../../../lua/prelude.lua"),
    include_str!("../../../lua/fixed_window.lua"),
    include_str!("../../../lua/token_bucket.lua"),
    include_str!("../../../lua/gcra.lua"),
    include_str!("../../../lua/charge.lua"),
);

pub struct RedisStore {
    /// A multiplexed connection that reconnects by itself; cloning shares it.
    connection: RedisConnection,
    target_for_logs: String,
    check: Script,
    release: Script,
    lease_reserve: Script,
    lease_return: Script,
    charge: Script,
    /// Tests only: a clock whose time replaces Redis `TIME`.
    clock: Option<Arc<dyn Clock>>,
}

impl RedisStore {
    /// Prepares a store for the single Redis at `url`, on the Redis server's clock. The
    /// connection is made on first use, so the controller starts (and reports not ready)
    /// while Redis comes up.
    pub fn new(url: &str, response_timeout: Duration) -> Result<Self, StoreError> {
        RedisStore::open(&RedisTarget::Single(url.to_owned()), response_timeout)
    }

    /// Prepares a store for `target` (a single Redis, a Cluster, or a Sentinel's master).
    pub fn open(target: &RedisTarget, response_timeout: Duration) -> Result<Self, StoreError> {
        Ok(RedisStore {
            connection: RedisConnection::open(target, response_timeout)?,
            target_for_logs: target.describe(),
            check: Script::new(CHECK),
            release: Script::new(RELEASE),
            lease_reserve: Script::new(LEASE_RESERVE),
            lease_return: Script::new(LEASE_RETURN),
            charge: Script::new(CHARGE),
            clock: None,
        })
    }

    /// The connection, for another user of the same Redis (the configuration's store), so
    /// that one controller keeps one connection to one Redis.
    pub fn connection(&self) -> RedisConnection {
        self.connection.clone()
    }

    /// For tests: the scripts take the time from `clock` instead of Redis `TIME` (and keep
    /// keys a minute longer, since Redis expires them on its own clock).
    pub fn with_clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = Some(clock);
        self
    }

    /// Runs `script` for `items` whose keys are each in one slot (a limit's key and those
    /// beside it): all in one call on a single Redis, one call per item on a Cluster. The
    /// time goes first (see `lua/prelude.lua`'s `U.clock`), then what `add` puts in for each
    /// item. One number per item, in order.
    async fn per_slot<T: Sync>(
        &self,
        script: &Script,
        items: &[T],
        what: &str,
        add: impl Fn(&mut ScriptInvocation<'_>, &T),
    ) -> Result<Vec<u64>, StoreError> {
        let now = self
            .clock
            .as_ref()
            .map_or_else(String::new, |c| c.now_ms().to_string());
        let groups: Vec<&[T]> = if self.connection.is_cluster() {
            items.chunks(1).collect()
        } else {
            vec![items]
        };
        let mut replies = Vec::with_capacity(items.len());
        for group in groups.into_iter().filter(|group| !group.is_empty()) {
            let mut invocation = script.prepare_invoke();
            invocation.arg(&now);
            for item in group {
                add(&mut invocation, item);
            }
            let reply: Vec<u64> = invocation
                .invoke_async(&mut self.connection.clone())
                .await?;
            if reply.len() != group.len() {
                return Err(StoreError::Reply(format!(
                    "{} {what} answered for {} asked",
                    reply.len(),
                    group.len()
                )));
            }
            replies.extend(reply);
        }
        Ok(replies)
    }

    /// One call of `lua/check.lua` for `checks`.
    fn invocation(&self, checks: &[CheckSpec<'_>]) -> ScriptInvocation<'_> {
        let mut invocation = self.check.prepare_invoke();
        invocation
            .arg(
                self.clock
                    .as_ref()
                    .map_or_else(String::new, |c| c.now_ms().to_string()),
            )
            .arg(checks.len());
        for check in checks {
            invocation.arg(check.limits.len()).arg(check.lease_id);
            for limit in check.limits {
                let params = &limit.params;
                let penalty = params.penalty.unwrap_or_default();
                invocation
                    .key(&limit.key)
                    .arg(params.strategy.as_str())
                    .arg(limit.cost)
                    .arg(params.limit)
                    .arg(params.period_ms)
                    .arg(params.extra)
                    .arg(penalty.base_ms)
                    .arg(penalty.max_ms)
                    .arg(penalty.decay_ms);
                if params.penalty.is_some() {
                    invocation.key(crate::keys::penalty_key(&limit.key));
                }
            }
        }
        invocation
    }

    /// A batch on a Redis Cluster whose keys span slots. Each request is cut into its
    /// parts per slot (its limits in that slot, in their order); each slot gets one script
    /// call with its parts in batch order, so within a slot later requests still see what
    /// earlier ones consumed. The calls go out in parallel.
    ///
    /// All-or-nothing then holds per part, not per request: a part whose limits all admit
    /// counts even when a part in another slot denies the request (the request is denied,
    /// and the admitting part has counted it: an over-count, never an under-count). A
    /// client's own limits share a slot (keys.rs), so this only happens to a request whose
    /// limits count against different identities (a per-client rule and a `global` one,
    /// say).
    async fn check_across_slots(
        &self,
        checks: &[CheckSpec<'_>],
        slots: &[u16],
    ) -> Result<Vec<Outcome>, StoreError> {
        struct Part {
            check: usize,
            /// Indices of the part's limits among its request's.
            indices: Vec<usize>,
            limits: Vec<LimitSpec>,
        }
        let mut by_slot: Vec<(u16, Vec<Part>)> = Vec::new();
        let mut next = 0;
        for (index, check) in checks.iter().enumerate() {
            let of_check = &slots[next..next + check.limits.len()];
            next += check.limits.len();
            for (position, (limit, slot)) in check.limits.iter().zip(of_check).enumerate() {
                let parts = match by_slot.iter_mut().find(|(s, _)| s == slot) {
                    Some((_, parts)) => parts,
                    None => {
                        by_slot.push((*slot, Vec::new()));
                        let last = by_slot.len() - 1;
                        &mut by_slot[last].1
                    }
                };
                match parts.last_mut() {
                    Some(part) if part.check == index => {
                        part.indices.push(position);
                        part.limits.push(limit.clone());
                    }
                    _ => parts.push(Part {
                        check: index,
                        indices: vec![position],
                        limits: vec![limit.clone()],
                    }),
                }
            }
        }
        let specs: Vec<Vec<CheckSpec<'_>>> = by_slot
            .iter()
            .map(|(_, parts)| {
                parts
                    .iter()
                    .map(|part| CheckSpec {
                        limits: &part.limits,
                        lease_id: checks[part.check].lease_id,
                    })
                    .collect()
            })
            .collect();
        let mut calls: Vec<(ScriptInvocation<'_>, RedisConnection)> = specs
            .iter()
            .map(|specs| (self.invocation(specs), self.connection.clone()))
            .collect();
        let replies = join_all(
            calls
                .iter_mut()
                .map(|(invocation, connection)| {
                    Box::pin(async move { invocation.invoke_async::<Vec<i64>>(connection).await })
                })
                .collect(),
        )
        .await;
        let mut outcomes: Vec<Outcome> = checks
            .iter()
            .map(|check| Outcome {
                denied_by: None,
                verdicts: vec![Verdict::default(); check.limits.len()],
                in_fallback: false,
            })
            .collect();
        for (((_, parts), specs), reply) in by_slot.iter().zip(&specs).zip(replies) {
            let decoded = decode_check(&reply?, specs)?;
            for (part, outcome) in parts.iter().zip(decoded) {
                let merged = &mut outcomes[part.check];
                for (index, verdict) in part.indices.iter().zip(outcome.verdicts) {
                    merged.verdicts[*index] = verdict;
                }
                if let Some(denier) = outcome.denied_by.map(|d| part.indices[d]) {
                    merged.denied_by = Some(merged.denied_by.map_or(denier, |d| d.min(denier)));
                }
            }
        }
        Ok(outcomes)
    }
}

/// Runs `futures` concurrently and returns their outputs in order (the controller has no
/// `futures` crate; this is its `join_all`).
async fn join_all<F: std::future::Future + Unpin>(mut futures: Vec<F>) -> Vec<F::Output> {
    use std::task::Poll;
    let mut outputs: Vec<Option<F::Output>> = futures.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (future, output) in futures.iter_mut().zip(outputs.iter_mut()) {
            if output.is_none() {
                match std::pin::Pin::new(future).poll(cx) {
                    Poll::Ready(value) => *output = Some(value),
                    Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            Poll::Pending
        } else {
            Poll::Ready(())
        }
    })
    .await;
    outputs.into_iter().flatten().collect()
}

#[async_trait]
impl Store for RedisStore {
    fn describe(&self) -> String {
        format!("redis at {}", self.target_for_logs)
    }

    async fn check_batch(&self, checks: &[CheckSpec<'_>]) -> Result<Vec<Outcome>, StoreError> {
        if self.connection.is_cluster() {
            let slots: Vec<u16> = checks
                .iter()
                .flat_map(|check| check.limits.iter())
                .map(|limit| crate::keys::slot(&limit.key))
                .collect();
            if slots.iter().any(|slot| *slot != slots[0]) {
                return self.check_across_slots(checks, &slots).await;
            }
        }
        let reply: Vec<i64> = self
            .invocation(checks)
            .invoke_async(&mut self.connection.clone())
            .await?;
        decode_check(&reply, checks)
    }

    async fn release(&self, key: &str, lease_id: &str, count: u64) -> Result<u64, StoreError> {
        let freed: i64 = self
            .release
            .key(key)
            .key(crate::keys::concurrency_units_key(key))
            .arg(lease_id)
            .arg(count)
            .arg(
                self.clock
                    .as_ref()
                    .map_or_else(String::new, |c| c.now_ms().to_string()),
            )
            .invoke_async(&mut self.connection.clone())
            .await?;
        Ok(freed.max(0) as u64)
    }

    async fn reserve_leases(&self, asked: &[Reservation]) -> Result<Vec<u64>, StoreError> {
        // A lease is granted for many requests, so this runs rarely.
        self.per_slot(
            &self.lease_reserve,
            asked,
            "reservations",
            |invocation, reservation| {
                invocation
                    .key(&reservation.key)
                    .arg(&reservation.holder)
                    .arg(reservation.ttl_ms)
                    .arg(reservation.quota);
            },
        )
        .await
    }

    async fn refund(&self, refunds: &[Refund]) -> Result<Vec<u64>, StoreError> {
        // Returns are rarer still: one per lease at most.
        self.per_slot(
            &self.lease_return,
            refunds,
            "refunds",
            |invocation, refund| {
                invocation
                    .key(&refund.key)
                    .key(crate::keys::lease_refunds_key(&refund.key))
                    .key(crate::keys::lease_holders_key(&refund.key))
                    .arg(refund.params.strategy.as_str())
                    .arg(refund.units)
                    .arg(refund.params.limit)
                    .arg(refund.params.period_ms)
                    .arg(refund.params.extra)
                    .arg(refund.counted_in)
                    .arg(&refund.grant)
                    .arg(refund.remember_ms)
                    .arg(&refund.holder);
            },
        )
        .await
    }

    async fn charge(&self, charges: &[Charge]) -> Result<Vec<u64>, StoreError> {
        self.per_slot(&self.charge, charges, "charges", |invocation, charge| {
            invocation
                .key(&charge.key)
                .key(crate::keys::lease_refunds_key(&charge.key))
                .arg(charge.params.strategy.as_str())
                .arg(charge.units)
                .arg(charge.params.limit)
                .arg(charge.params.period_ms)
                .arg(charge.params.extra)
                .arg(&charge.reservation)
                .arg(charge.remember_ms);
        })
        .await
    }

    fn now_ms(&self) -> u64 {
        self.clock
            .as_ref()
            .map_or_else(super::now_ms, |clock| clock.now_ms())
    }

    async fn delete_keys(&self, keys: &[String]) -> Result<u64, StoreError> {
        if keys.is_empty() {
            return Ok(0);
        }
        let deleted: u64 = redis::cmd("DEL")
            .arg(keys)
            .query_async(&mut self.connection.clone())
            .await?;
        Ok(deleted)
    }

    async fn delete_counters(&self, rule: Option<&str>) -> Result<u64, StoreError> {
        let pattern = crate::keys::counters_pattern(rule);
        let mut deleted = 0;
        // A SCAN cursor is one server's: on a cluster every master is scanned apart.
        for mut node in self.connection.masters().await? {
            let mut cursor: u64 = 0;
            loop {
                let (next, found): (u64, Vec<String>) = node
                    .query(
                        redis::cmd("SCAN")
                            .arg(cursor)
                            .arg("MATCH")
                            .arg(&pattern)
                            .arg("COUNT")
                            .arg(1_000),
                    )
                    .await?;
                let counters: Vec<String> = found
                    .into_iter()
                    .filter(|key| {
                        crate::keys::rule_of(key)
                            .is_some_and(|of| rule.is_none_or(|rule| rule == of))
                    })
                    .collect();
                deleted += self.delete_keys(&counters).await?;
                cursor = next;
                if cursor == 0 {
                    break;
                }
            }
        }
        Ok(deleted)
    }

    async fn publish_stats(
        &self,
        controller: &str,
        resolution_ms: u64,
        start_ms: u64,
        payload: Vec<u8>,
        ttl_ms: u64,
    ) -> Result<(), StoreError> {
        let now = super::now_ms();
        let controllers = crate::keys::stats_controllers_key();
        redis::pipe()
            .cmd("SET")
            .arg(crate::keys::stats_key(resolution_ms, start_ms, controller))
            .arg(payload)
            .arg("PX")
            .arg(ttl_ms.max(1))
            .ignore()
            .cmd("ZADD")
            .arg(&controllers)
            .arg(now)
            .arg(controller)
            .ignore()
            // Controllers gone for longer than any bucket is kept are forgotten.
            .cmd("ZREMRANGEBYSCORE")
            .arg(&controllers)
            .arg("-inf")
            .arg(now.saturating_sub(ttl_ms))
            .ignore()
            .cmd("PEXPIRE")
            .arg(&controllers)
            .arg(ttl_ms.max(1))
            .ignore()
            .query_async::<()>(&mut self.connection.clone())
            .await?;
        Ok(())
    }

    async fn read_stats(
        &self,
        resolution_ms: u64,
        starts: &[u64],
        except: &str,
    ) -> Result<Vec<Vec<u8>>, StoreError> {
        let mut connection = self.connection.clone();
        let controllers: Vec<String> = redis::cmd("ZRANGE")
            .arg(crate::keys::stats_controllers_key())
            .arg(0)
            .arg(-1)
            .query_async(&mut connection)
            .await?;
        let keys: Vec<String> = controllers
            .iter()
            .filter(|id| id.as_str() != except)
            .flat_map(|id| {
                starts
                    .iter()
                    .map(move |start| crate::keys::stats_key(resolution_ms, *start, id))
            })
            .collect();
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        // Every stats key has the `{stats}` hash tag: one slot, so one MGET on a cluster too.
        let found: Vec<Option<Vec<u8>>> = redis::cmd("MGET")
            .arg(&keys)
            .query_async(&mut connection)
            .await?;
        Ok(found.into_iter().flatten().collect())
    }

    async fn ping(&self) -> Result<(), StoreError> {
        let pong: String = redis::cmd("PING")
            .query_async(&mut self.connection.clone())
            .await?;
        if pong == "PONG" {
            Ok(())
        } else {
            Err(StoreError::Reply(format!("PING answered {pong:?}")))
        }
    }
}

/// Decodes the reply of `lua/check.lua` for `checks`.
fn decode_check(reply: &[i64], checks: &[CheckSpec<'_>]) -> Result<Vec<Outcome>, StoreError> {
    let malformed = || StoreError::Reply(format!("check returned {reply:?}"));
    const PER_LIMIT: usize = 5;
    let expected: usize = checks
        .iter()
        .map(|check| 1 + PER_LIMIT * check.limits.len())
        .sum();
    if reply.len() != expected || reply.iter().any(|&n| n < 0) {
        return Err(malformed());
    }
    let mut rest = reply;
    let mut outcomes = Vec::with_capacity(checks.len());
    for check in checks {
        let limits = check.limits.len();
        let (head, tail) = rest.split_at(1 + PER_LIMIT * limits);
        rest = tail;
        let denied_by = match usize::try_from(head[0]) {
            Ok(0) => None,
            Ok(index) if index <= limits => Some(index - 1),
            _ => return Err(malformed()),
        };
        let verdicts = head[1..]
            .chunks_exact(PER_LIMIT)
            .enumerate()
            .map(|(index, n)| Verdict {
                ok: denied_by.is_none_or(|denier| denier != index),
                remaining: n[0] as u64,
                reset_ms: n[1] as u64,
                retry_after_ms: n[2] as u64,
                delay_ms: n[3] as u64,
                cooling: n[4] == 1,
            })
            .collect();
        outcomes.push(Outcome {
            denied_by,
            verdicts,
            in_fallback: false,
        });
    }
    Ok(outcomes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::redact_password;

    fn spec(strategy: sluice_protocol::Strategy) -> super::super::LimitSpec {
        super::super::LimitSpec {
            key: "k".into(),
            params: crate::strategy::Params {
                strategy,
                limit: 1,
                period_ms: 1,
                extra: 0,
                penalty: None,
            },
            cost: 1,
        }
    }

    #[test]
    fn decodes_admitted_and_denied_replies() {
        let two = [
            spec(sluice_protocol::Strategy::FixedWindow),
            spec(sluice_protocol::Strategy::Gcra),
        ];
        let one = [spec(sluice_protocol::Strategy::FixedWindow)];
        let checks = [
            CheckSpec {
                limits: &two,
                lease_id: "",
            },
            CheckSpec {
                limits: &one,
                lease_id: "",
            },
        ];
        let reply = [0, 3, 900, 0, 0, 0, 7, 50_000, 0, 250, 0, 1, 0, 10, 10, 0, 1];
        let outcomes = decode_check(&reply, &checks).unwrap();
        assert_eq!(outcomes[0].denied_by, None);
        assert_eq!(
            outcomes[0].verdicts[1],
            Verdict {
                ok: true,
                remaining: 7,
                reset_ms: 50_000,
                retry_after_ms: 0,
                delay_ms: 250,
                cooling: false,
            }
        );
        assert_eq!(outcomes[1].denied_by, Some(0));
        assert!(!outcomes[1].verdicts[0].ok);
        assert!(outcomes[1].verdicts[0].cooling);
    }

    #[test]
    fn refuses_malformed_replies() {
        let one = [spec(sluice_protocol::Strategy::FixedWindow)];
        let checks = [CheckSpec {
            limits: &one,
            lease_id: "",
        }];
        let replies: [&[i64]; 6] = [
            &[],
            &[0],
            &[0, 1, 2, 3, 0],
            &[2, 1, 1, 1, 0, 0],
            &[-1, 1, 1, 1, 0, 0],
            &[0, -1, 1, 1, 0, 0],
        ];
        for reply in replies {
            assert!(decode_check(reply, &checks).is_err(), "{reply:?}");
        }
    }

    #[test]
    fn passwords_stay_out_of_logs() {
        assert_eq!(
            redact_password("redis://:hunter2@db:6379/0"),
            "redis://***@db:6379/0"
        );
        assert_eq!(
            redact_password("redis://127.0.0.1:6379"),
            "redis://127.0.0.1:6379"
        );
    }
}
