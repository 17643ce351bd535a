//! Property test: random sequences of (time step, key, cost) go to the embedded store, to
//! a real Redis (both on one injected clock) and to a small reference model of each
//! algorithm. Both stores must give identical verdicts, and the model's admit/deny must
//! match theirs.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use sluice_controller::store::{LimitSpec, ManualClock, MemoryStore, RedisStore, Store};
use sluice_controller::strategy::Params;
use sluice_e2e::{unique_name, RedisServer};
use sluice_protocol::Strategy as Algorithm;

const START: u64 = 1_800_000_000_000 + 250;

/// A reference model: the textbook form of each algorithm, one instance per key.
#[derive(Debug, Default)]
struct Model {
    /// Fixed and sliding counters: count per window index.
    windows: HashMap<u64, u64>,
    /// Sliding log: time of each admitted unit. Concurrency: expiry of each slot.
    times: Vec<u64>,
    /// Token bucket: tokens × window, and the time they were counted at.
    bucket: Option<(u128, u64)>,
    /// GCRA and leaky bucket: theoretical arrival time / next free slot, in ms × limit.
    tat: u128,
}

impl Model {
    fn admits(&mut self, p: &Params, now: u64, cost: u64) -> bool {
        let (limit, period, extra) = (p.limit, p.period_ms, p.extra);
        let (l, w, c) = (u128::from(limit), u128::from(period), u128::from(cost));
        let now_scaled = u128::from(now) * l;
        match p.strategy {
            Algorithm::FixedWindow => {
                let count = self.windows.entry(now / period).or_default();
                let ok = *count + cost <= limit;
                if ok {
                    *count += cost;
                }
                ok
            }
            Algorithm::SlidingWindowLog => {
                let live = self.times.iter().filter(|&&t| now - t < period).count() as u64;
                let ok = live + cost <= limit;
                if ok {
                    self.times.extend(std::iter::repeat_n(now, cost as usize));
                }
                ok
            }
            Algorithm::SlidingWindowCounter => {
                let index = now / period;
                let previous = u128::from(*self.windows.get(&(index - 1)).unwrap_or(&0));
                let current = u128::from(*self.windows.get(&index).unwrap_or(&0));
                let elapsed = u128::from(now % period);
                let ok = previous * (w - elapsed) + current * w + c * w <= l * w;
                if ok {
                    *self.windows.entry(index).or_default() += cost;
                }
                ok
            }
            Algorithm::TokenBucket => {
                let capacity = u128::from(extra) * w;
                let (units, last) = self.bucket.unwrap_or((capacity, now));
                let units = (units + u128::from(now - last) * l).min(capacity);
                let ok = units >= c * w;
                self.bucket = Some((if ok { units - c * w } else { units }, now));
                ok
            }
            Algorithm::Gcra => {
                let tat = self.tat.max(now_scaled);
                let ok = tat + c * w - now_scaled <= u128::from(extra) * w;
                if ok {
                    self.tat = tat + c * w;
                }
                ok
            }
            Algorithm::LeakyBucket => {
                let slot = self.tat.max(now_scaled);
                let delay = (slot - now_scaled).div_ceil(l);
                let ok = delay <= u128::from(extra);
                if ok {
                    self.tat = slot + c * w;
                }
                ok
            }
            Algorithm::Concurrency => {
                let live = self.times.iter().filter(|&&expiry| expiry > now).count() as u64;
                let ok = live + cost <= limit;
                if ok {
                    self.times
                        .extend(std::iter::repeat_n(now + period, cost as usize));
                }
                ok
            }
        }
    }
}

fn params_for(strategy: Algorithm) -> impl proptest::strategy::Strategy<Value = Params> {
    let extra = match strategy {
        Algorithm::TokenBucket => (1u64..=6).boxed(),
        Algorithm::Gcra => (1u64..=4).boxed(),
        Algorithm::LeakyBucket => prop_oneof![Just(0u64), Just(500), Just(2_000)].boxed(),
        _ => Just(0u64).boxed(),
    };
    (
        1u64..=6,
        prop_oneof![Just(1_000u64), Just(3_000), Just(10_000)],
        extra,
    )
        .prop_map(move |(limit, period_ms, extra)| Params {
            strategy,
            limit,
            period_ms,
            extra,
            penalty: None,
        })
}

/// (ms to advance, which of two keys, cost)
fn operations() -> impl proptest::strategy::Strategy<Value = Vec<(u64, usize, u64)>> {
    prop::collection::vec(
        (
            prop_oneof![Just(0u64), 0u64..50, 0u64..2_500],
            0usize..2,
            prop_oneof![Just(0u64), Just(1), Just(1), Just(1), Just(2), Just(3)],
        ),
        1..50,
    )
}

fn stores_and_model_agree(strategy: Algorithm) {
    let redis = RedisServer::start();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let _in_runtime = runtime.enter();
    let clock = ManualClock::starting_at(START);
    let on_redis: Arc<dyn Store> = Arc::new(
        RedisStore::new(&redis.url(), Duration::from_secs(2))
            .unwrap()
            .with_clock(clock.clone()),
    );
    let mut runner = TestRunner::new(Config {
        cases: 40,
        failure_persistence: None,
        ..Config::default()
    });
    let result = runner.run(
        &(params_for(strategy), operations()),
        |(params, operations)| {
            clock.set(START);
            let in_memory = MemoryStore::new(clock.clone());
            let keys = [
                unique_name("sluice:{model}:a"),
                unique_name("sluice:{model}:b"),
            ];
            let mut models = [Model::default(), Model::default()];
            for (step, (advance, key, cost)) in operations.into_iter().enumerate() {
                clock.advance(advance);
                let spec = LimitSpec {
                    key: keys[key].clone(),
                    params,
                    cost,
                };
                let lease = format!("{step:032x}");
                let (memory, redis) = runtime.block_on(async {
                    let limits = std::slice::from_ref(&spec);
                    (
                        in_memory.check(limits, &lease).await,
                        on_redis.check(limits, &lease).await,
                    )
                });
                let (memory, redis) = (memory.unwrap(), redis.unwrap());
                prop_assert_eq!(&memory, &redis, "stores differ at step {}", step);
                let expected = models[key].admits(&params, clock_now(&clock), cost);
                prop_assert_eq!(memory.allowed(), expected, "model differs at step {}", step);
            }
            Ok::<(), TestCaseError>(())
        },
    );
    if let Err(failure) = result {
        panic!("{strategy:?}: {failure}");
    }
}

fn clock_now(clock: &ManualClock) -> u64 {
    use sluice_controller::store::Clock;
    clock.now_ms()
}

#[test]
fn fixed_window_matches_the_model() {
    stores_and_model_agree(Algorithm::FixedWindow);
}

#[test]
fn sliding_window_log_matches_the_model() {
    stores_and_model_agree(Algorithm::SlidingWindowLog);
}

#[test]
fn sliding_window_counter_matches_the_model() {
    stores_and_model_agree(Algorithm::SlidingWindowCounter);
}

#[test]
fn token_bucket_matches_the_model() {
    stores_and_model_agree(Algorithm::TokenBucket);
}

#[test]
fn gcra_matches_the_model() {
    stores_and_model_agree(Algorithm::Gcra);
}

#[test]
fn leaky_bucket_matches_the_model() {
    stores_and_model_agree(Algorithm::LeakyBucket);
}

#[test]
fn concurrency_matches_the_model() {
    stores_and_model_agree(Algorithm::Concurrency);
}

/// A concurrency lease as the model keeps it: (lease id, cost, expiry ms).
type ModelLease = (String, u64, u64);

/// Concurrency with releases: random checks, each possibly after the release of the lease an
/// earlier step asked for (as its signed token names it: key, lease id, cost), some of them
/// released again. Both stores must free what the model frees (a held lease's cost; nothing
/// once it expired or was released) and give the same verdicts.
#[test]
fn concurrency_with_releases_matches_the_model() {
    let redis = RedisServer::start();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let _in_runtime = runtime.enter();
    let clock = ManualClock::starting_at(START);
    let on_redis: Arc<dyn Store> = Arc::new(
        RedisStore::new(&redis.url(), Duration::from_secs(2))
            .unwrap()
            .with_clock(clock.clone()),
    );
    let mut runner = TestRunner::new(Config {
        cases: 40,
        failure_persistence: None,
        ..Config::default()
    });
    // (ms to advance, which of two keys, cost, the step whose lease to release first)
    let operations = prop::collection::vec(
        (
            prop_oneof![Just(0u64), 0u64..50, 0u64..2_500],
            0usize..2,
            prop_oneof![Just(0u64), Just(1), Just(1), Just(2), Just(3), Just(5)],
            prop::option::weighted(0.6, 0usize..50),
        ),
        1..50,
    );
    let result = runner.run(
        &(params_for(Algorithm::Concurrency), operations),
        |(params, operations)| {
            clock.set(START);
            let in_memory = MemoryStore::new(clock.clone());
            let keys = [
                unique_name("sluice:{model}:concurrency:a"),
                unique_name("sluice:{model}:concurrency:b"),
            ];
            let mut models: [Vec<ModelLease>; 2] = [Vec::new(), Vec::new()];
            let mut asked: Vec<(usize, String, u64)> = Vec::new();
            for (step, (advance, key, cost, release)) in operations.into_iter().enumerate() {
                clock.advance(advance);
                let now = clock_now(&clock);
                if let Some((of, lease, granted)) = release.and_then(|r| asked.get(r)).cloned() {
                    let expected = models[of]
                        .iter()
                        .position(|(id, c, expiry)| *id == lease && *c == granted && *expiry > now)
                        .map_or(0, |held| models[of].remove(held).1);
                    let (memory, redis) = runtime.block_on(async {
                        (
                            in_memory.release(&keys[of], &lease, granted).await,
                            on_redis.release(&keys[of], &lease, granted).await,
                        )
                    });
                    let (memory, redis) = (memory.unwrap(), redis.unwrap());
                    prop_assert_eq!(memory, redis, "stores free differently at step {}", step);
                    prop_assert_eq!(memory, expected, "model frees differently at step {}", step);
                }
                let spec = LimitSpec {
                    key: keys[key].clone(),
                    params,
                    cost,
                };
                let lease = format!("{step:032x}");
                let (memory, redis) = runtime.block_on(async {
                    let limits = std::slice::from_ref(&spec);
                    (
                        in_memory.check(limits, &lease).await,
                        on_redis.check(limits, &lease).await,
                    )
                });
                let (memory, redis) = (memory.unwrap(), redis.unwrap());
                prop_assert_eq!(&memory, &redis, "stores differ at step {}", step);
                let model = &mut models[key];
                model.retain(|(_, _, expiry)| *expiry > now);
                let held: u64 = model.iter().map(|(_, cost, _)| cost).sum();
                let admitted = held + cost <= params.limit;
                prop_assert_eq!(memory.allowed(), admitted, "model differs at step {}", step);
                prop_assert_eq!(
                    memory.verdicts[0].remaining,
                    params.limit - if admitted { held + cost } else { held },
                    "remaining differs from the model at step {}",
                    step
                );
                if admitted && cost > 0 {
                    model.push((lease.clone(), cost, now + params.period_ms));
                }
                asked.push((key, lease, cost));
            }
            Ok::<(), TestCaseError>(())
        },
    );
    if let Err(failure) = result {
        panic!("concurrency with releases: {failure}");
    }
}
