//! One behaviour suite, every store: each scenario runs against the embedded store and
//! against a real `redis-server`, both on one injected clock (the Redis scripts take the
//! time as an argument instead of `TIME` when a test asks them to), and against a
//! three-master Redis Cluster (one cluster for every scenario, run in turn by one test: a
//! cluster takes seconds to form). A few Redis-only tests at the end run on Redis's own clock.

use std::sync::Arc;
use std::time::Duration;

use sluice_controller::store::{
    Charge, CheckSpec, LimitSpec, ManualClock, MemoryStore, Outcome, RedisStore, RedisTarget,
    Refund, Reservation, Store,
};
use sluice_controller::strategy::{Params, PenaltyParams, Verdict};
use sluice_e2e::{unique_name, RedisCluster, RedisServer};
use sluice_protocol::Strategy::{self, *};

const HOUR: u64 = 3_600_000;
/// Somewhere inside a minute, as real time would be: 1800000000000 is a whole minute.
const START: u64 = 1_800_000_000_000 + 250;

struct Subject {
    store: Arc<dyn Store>,
    clock: Arc<ManualClock>,
    /// The server of a Redis subject, running for as long as the scenario.
    redis: Option<RedisServer>,
    /// The cluster of a Redis Cluster subject, shared by the scenarios.
    _cluster: Option<Arc<RedisCluster>>,
}

impl Subject {
    fn memory() -> Subject {
        let clock = ManualClock::starting_at(START);
        Subject {
            store: Arc::new(MemoryStore::new(clock.clone())),
            clock,
            redis: None,
            _cluster: None,
        }
    }

    fn cluster(cluster: &Arc<RedisCluster>) -> Subject {
        let clock = ManualClock::starting_at(START);
        let store = RedisStore::open(
            &RedisTarget::Cluster(cluster.urls()),
            Duration::from_secs(2),
        )
        .expect("cluster store")
        .with_clock(clock.clone());
        Subject {
            store: Arc::new(store),
            clock,
            redis: None,
            _cluster: Some(Arc::clone(cluster)),
        }
    }

    fn redis() -> Subject {
        let redis = RedisServer::start();
        let clock = ManualClock::starting_at(START);
        let store = RedisStore::new(&redis.url(), Duration::from_secs(2))
            .expect("redis store")
            .with_clock(clock.clone());
        Subject {
            store: Arc::new(store),
            clock,
            redis: Some(redis),
            _cluster: None,
        }
    }

    fn advance(&self, ms: u64) {
        self.clock.advance(ms);
    }

    async fn check(&self, limits: &[LimitSpec]) -> Outcome {
        let outcome = self
            .store
            .check(limits, &lease_id())
            .await
            .expect("store answers");
        assert_eq!(outcome.verdicts.len(), limits.len(), "{outcome:?}");
        outcome
    }

    async fn one(&self, limit: &LimitSpec) -> Verdict {
        let outcome = self.check(std::slice::from_ref(limit)).await;
        assert_eq!(outcome.allowed(), outcome.verdicts[0].ok);
        outcome.verdicts[0]
    }

    /// Checks `limit` `times` times and returns whether each was admitted.
    async fn admitted(&self, limit: &LimitSpec, times: usize) -> Vec<bool> {
        let mut admitted = Vec::with_capacity(times);
        for _ in 0..times {
            admitted.push(self.one(limit).await.ok);
        }
        admitted
    }
}

fn lease_id() -> String {
    format!("{:032x}", rand_u128())
}

fn rand_u128() -> u128 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(1);
    u128::from(NEXT.fetch_add(1, Ordering::Relaxed)) * 0x9e37_79b9_7f4a_7c15
}

fn limit(strategy: Strategy, limit: u64, period_ms: u64, extra: u64) -> LimitSpec {
    LimitSpec {
        key: unique_name(&format!("sluice:{{conformance}}:{}:r", strategy.as_str())),
        params: Params {
            strategy,
            limit,
            period_ms,
            extra,
            penalty: None,
        },
        cost: 1,
    }
}

fn costing(mut spec: LimitSpec, cost: u64) -> LimitSpec {
    spec.cost = cost;
    spec
}

fn verdict(ok: bool, remaining: u64, reset_ms: u64, retry_after_ms: u64) -> Verdict {
    Verdict {
        ok,
        remaining,
        reset_ms,
        retry_after_ms,
        ..Verdict::default()
    }
}

// ---- fixed window ----------------------------------------------------------------------

async fn fixed_window_counts_down_and_denies_until_the_boundary(s: Subject) {
    let spec = limit(FixedWindow, 3, 60_000, 0);
    assert_eq!(s.one(&spec).await, verdict(true, 2, 59_750, 0));
    assert_eq!(s.one(&spec).await, verdict(true, 1, 59_750, 0));
    assert_eq!(s.one(&spec).await, verdict(true, 0, 59_750, 0));
    assert_eq!(s.one(&spec).await, verdict(false, 0, 59_750, 59_750));
    s.advance(59_749);
    assert!(!s.one(&spec).await.ok);
    s.advance(1);
    assert_eq!(s.one(&spec).await, verdict(true, 2, 60_000, 0));
}

async fn fixed_window_lets_twice_the_limit_through_across_a_boundary(s: Subject) {
    let spec = limit(FixedWindow, 3, 60_000, 0);
    s.advance(59_000);
    assert_eq!(s.admitted(&spec, 4).await, [true, true, true, false]);
    s.advance(1_000);
    assert_eq!(s.admitted(&spec, 4).await, [true, true, true, false]);
}

// ---- sliding window log ------------------------------------------------------------------

async fn sliding_log_counts_each_request_for_one_window(s: Subject) {
    let spec = limit(SlidingWindowLog, 3, 60_000, 0);
    s.advance(59_000);
    assert_eq!(s.admitted(&spec, 2).await, [true, true]);
    s.advance(1_000);
    // A fixed window would have reset here; the log still holds the two requests.
    assert_eq!(s.one(&spec).await, verdict(true, 0, 60_000, 0));
    let denied = s.one(&spec).await;
    assert_eq!(denied, verdict(false, 0, 60_000, 59_000));
    s.advance(58_999);
    assert!(!s.one(&spec).await.ok);
    s.advance(1);
    // The two oldest left together: two places, the last one's request stays.
    assert_eq!(s.one(&spec).await, verdict(true, 1, 60_000, 0));
}

async fn sliding_log_retry_waits_for_enough_requests_to_leave(s: Subject) {
    let spec = limit(SlidingWindowLog, 3, 10_000, 0);
    for _ in 0..3 {
        assert!(s.one(&spec).await.ok);
        s.advance(1_000);
    }
    // Entries at 0, 1000, 2000 (relative); now 3000. Cost 2 needs the two oldest gone.
    let two = costing(spec.clone(), 2);
    assert_eq!(s.one(&two).await, verdict(false, 0, 9_000, 8_000));
    s.advance(8_000);
    assert_eq!(s.one(&two).await, verdict(true, 0, 10_000, 0));
}

// ---- sliding window counter --------------------------------------------------------------

async fn sliding_counter_weights_the_previous_window(s: Subject) {
    let spec = limit(SlidingWindowCounter, 10, 10_000, 0);
    s.advance(9_250); // 9500 ms into a window
    assert_eq!(
        s.admitted(&spec, 11).await.iter().filter(|ok| **ok).count(),
        10
    );
    s.advance(500 + 5_000); // next window, half way: the previous counts for 5
    assert_eq!(s.admitted(&spec, 5).await, [true; 5]);
    let denied = s.one(&spec).await;
    // 10 × (10000 − e) + 5 × 10000 + 10000 ≤ 100000 first holds at e = 6000.
    assert_eq!(denied, verdict(false, 0, 15_000, 1_000));
    s.advance(999);
    assert!(!s.one(&spec).await.ok);
    s.advance(1);
    assert!(s.one(&spec).await.ok);
}

// ---- token bucket ------------------------------------------------------------------------

async fn token_bucket_bursts_then_refills_at_the_rate(s: Subject) {
    let spec = limit(TokenBucket, 10, 10_000, 5); // 1 token per second, 5 at once
    assert_eq!(
        s.admitted(&spec, 6).await,
        [true, true, true, true, true, false]
    );
    assert_eq!(s.one(&spec).await, verdict(false, 0, 5_000, 1_000));
    s.advance(500);
    assert_eq!(s.one(&spec).await, verdict(false, 0, 4_500, 500));
    s.advance(500);
    assert_eq!(s.one(&spec).await, verdict(true, 0, 5_000, 0));
    s.advance(60_000);
    assert_eq!(s.one(&spec).await, verdict(true, 4, 1_000, 0));
}

async fn token_bucket_refills_fractions_exactly(s: Subject) {
    let spec = limit(TokenBucket, 3, 10_000, 1); // one token every 3333⅓ ms
    assert!(s.one(&spec).await.ok);
    s.advance(3_333);
    assert_eq!(s.one(&spec).await, verdict(false, 0, 1, 1));
    s.advance(1);
    assert!(s.one(&spec).await.ok);
    // Three tokens take exactly 10 s, however the time is cut.
    for _ in 0..9 {
        s.advance(1_111);
    }
    s.advance(1);
    assert!(s.one(&spec).await.ok);
    for _ in 0..2 {
        s.advance(3_333);
        assert!(!s.one(&spec).await.ok);
        s.advance(1);
        assert!(s.one(&spec).await.ok);
    }
}

// ---- GCRA ---------------------------------------------------------------------------------

async fn gcra_spaces_requests_evenly(s: Subject) {
    let spec = limit(Gcra, 10, 1_000, 1); // one every 100 ms
    assert_eq!(s.one(&spec).await, verdict(true, 0, 100, 0));
    assert_eq!(s.one(&spec).await, verdict(false, 0, 100, 100));
    s.advance(99);
    assert_eq!(s.one(&spec).await, verdict(false, 0, 1, 1));
    s.advance(1);
    assert!(s.one(&spec).await.ok);
}

async fn gcra_allows_its_burst_early(s: Subject) {
    let spec = limit(Gcra, 10, 1_000, 3);
    assert_eq!(s.admitted(&spec, 4).await, [true, true, true, false]);
    s.advance(100);
    assert_eq!(s.admitted(&spec, 2).await, [true, false]);
}

// ---- leaky bucket -------------------------------------------------------------------------

async fn leaky_bucket_delays_until_the_slot_then_denies(s: Subject) {
    let spec = limit(LeakyBucket, 2, 1_000, 1_000); // one every 500 ms, wait ≤ 1 s
    let delays: Vec<(bool, u64)> = {
        let mut out = Vec::new();
        for _ in 0..4 {
            let v = s.one(&spec).await;
            out.push((v.ok, v.delay_ms));
        }
        out
    };
    assert_eq!(delays, [(true, 0), (true, 500), (true, 1_000), (false, 0)]);
    let denied = s.one(&spec).await;
    assert_eq!((denied.retry_after_ms, denied.reset_ms), (500, 1_500));
    s.advance(500);
    let v = s.one(&spec).await;
    assert_eq!((v.ok, v.delay_ms), (true, 1_000));
}

async fn leaky_bucket_without_delay_is_a_plain_rate(s: Subject) {
    let spec = limit(LeakyBucket, 2, 1_000, 0);
    assert_eq!(s.admitted(&spec, 2).await, [true, false]);
    s.advance(500);
    assert_eq!(s.admitted(&spec, 2).await, [true, false]);
}

// ---- concurrency ---------------------------------------------------------------------------

async fn concurrency_holds_slots_until_released_or_expired(s: Subject) {
    let spec = limit(Concurrency, 2, 30_000, 0);
    let first = lease_id();
    let outcome = s
        .store
        .check(std::slice::from_ref(&spec), &first)
        .await
        .unwrap();
    assert_eq!(outcome.verdicts[0], verdict(true, 1, 30_000, 0));
    s.advance(1_000);
    assert_eq!(s.one(&spec).await, verdict(true, 0, 29_000, 0));
    assert_eq!(s.one(&spec).await, verdict(false, 0, 29_000, 1_000));
    assert_eq!(s.store.release(&spec.key, &first, 1).await.unwrap(), 1);
    assert_eq!(
        s.store.release(&spec.key, &first, 1).await.unwrap(),
        0,
        "released twice"
    );
    assert_eq!(s.one(&spec).await, verdict(true, 0, 30_000, 0));
    assert!(!s.one(&spec).await.ok);
    // Leases that are never given back expire: both were taken 1 s after the start.
    s.advance(29_999);
    assert_eq!(s.one(&spec).await, verdict(false, 0, 1, 1));
    s.advance(1);
    assert_eq!(s.one(&spec).await, verdict(true, 1, 30_000, 0));
}

/// Calls of `command` (lower case) the server has run since its stats were last reset,
/// counting those a script made (`INFO commandstats`).
fn command_calls(connection: &mut ::redis::Connection, command: &str) -> u64 {
    let info: String = ::redis::cmd("INFO")
        .arg("commandstats")
        .query(connection)
        .unwrap();
    let prefix = format!("cmdstat_{command}:calls=");
    info.lines()
        .find_map(|line| line.strip_prefix(prefix.as_str()))
        .and_then(|rest| rest.split(',').next())
        .map_or(0, |calls| calls.parse().unwrap())
}

fn reset_command_stats(connection: &mut ::redis::Connection) {
    let _: () = ::redis::cmd("CONFIG")
        .arg("RESETSTAT")
        .query(connection)
        .unwrap();
}

/// The members of a concurrency limit's sorted set, and its units hash.
fn concurrency_state(
    connection: &mut ::redis::Connection,
    spec: &LimitSpec,
) -> (Vec<String>, std::collections::BTreeMap<String, String>) {
    let members: Vec<String> = ::redis::cmd("ZRANGE")
        .arg(&spec.key)
        .arg(0)
        .arg(-1)
        .query(connection)
        .unwrap();
    let units: std::collections::BTreeMap<String, String> = ::redis::cmd("HGETALL")
        .arg(sluice_controller::keys::concurrency_units_key(&spec.key))
        .query(connection)
        .unwrap();
    (members, units)
}

fn units_hash(units: u64, leases: u64) -> std::collections::BTreeMap<String, String> {
    [("units", units), ("leases", leases)]
        .into_iter()
        .map(|(field, value)| (field.to_owned(), value.to_string()))
        .collect()
}

/// A lease is one member whatever its cost: a grant of a million units is one ZADD, and its
/// release one ZREM, not a loop over the million (the loop held Redis about a second, timed
/// out the controller's store calls and opened its circuit breaker). On Redis the structure
/// and the commands run are looked at; every store must answer the same.
async fn concurrency_a_lease_of_a_million_is_one_lease(s: Subject) {
    let spec = costing(limit(Concurrency, 2_000_000, 30_000, 0), 1_000_000);
    let read = costing(spec.clone(), 0);
    let lease = lease_id();
    let mut redis = s.redis.as_ref().map(RedisServer::connection);
    if let Some(connection) = redis.as_mut() {
        reset_command_stats(connection);
    }
    let granted_at = std::time::Instant::now();
    let granted = s
        .store
        .check(std::slice::from_ref(&spec), &lease)
        .await
        .unwrap();
    assert_eq!(granted.verdicts[0], verdict(true, 1_000_000, 30_000, 0));
    if let Some(connection) = redis.as_mut() {
        assert_eq!(command_calls(connection, "zadd"), 1, "the grant: one ZADD");
        let members: u64 = ::redis::cmd("ZCARD")
            .arg(&spec.key)
            .query(connection)
            .unwrap();
        assert_eq!(members, 1, "one member for the lease");
        assert_eq!(
            concurrency_state(connection, &spec),
            (vec![format!("{lease}=1000000")], units_hash(1_000_000, 1)),
            "one member for the lease, its cost in the units hash"
        );
        // The units hash expires with the set: at the lease's end (plus the injected
        // time's minute).
        let units = LimitSpec {
            key: sluice_controller::keys::concurrency_units_key(&spec.key),
            ..spec.clone()
        };
        for (key, what) in [(&spec, "the set of leases"), (&units, "the units hash")] {
            let ttl = 30_000 + INJECTED_TIME_TTL_EXTRA;
            assert_pttl(connection, key, ttl, granted_at, what);
        }
    }
    assert_eq!(s.one(&read).await, verdict(true, 1_000_000, 30_000, 0));
    assert!(!s.one(&costing(spec.clone(), 1_000_001)).await.ok);

    if let Some(connection) = redis.as_mut() {
        reset_command_stats(connection);
    }
    assert_eq!(
        s.store.release(&spec.key, &lease, 1_000_000).await.unwrap(),
        1_000_000
    );
    if let Some(connection) = redis.as_mut() {
        let scripts = command_calls(connection, "evalsha") + command_calls(connection, "eval");
        assert!(scripts >= 1, "the release ran as a script");
        assert_eq!(
            command_calls(connection, "zrem"),
            1,
            "the release: one ZREM"
        );
        let exists: u64 = ::redis::cmd("EXISTS")
            .arg(&spec.key)
            .arg(sluice_controller::keys::concurrency_units_key(&spec.key))
            .query(connection)
            .unwrap();
        assert_eq!(exists, 0, "nothing held, nothing kept");
    }
    assert_eq!(s.one(&read).await, verdict(true, 2_000_000, 0, 0));
    assert_eq!(
        s.store.release(&spec.key, &lease, 1_000_000).await.unwrap(),
        0,
        "a replayed release frees nothing"
    );
    assert_eq!(s.one(&read).await.remaining, 2_000_000);
}

/// A release frees its own lease once; replayed, or naming a cost its lease was not granted
/// with, it frees nothing, and the other leases stay held.
async fn concurrency_a_replayed_release_frees_nothing(s: Subject) {
    let spec = limit(Concurrency, 10, 30_000, 0);
    let read = costing(spec.clone(), 0);
    let (a, b) = (lease_id(), lease_id());
    for (lease, cost) in [(&a, 3), (&b, 4)] {
        let granted = s
            .store
            .check(std::slice::from_ref(&costing(spec.clone(), cost)), lease)
            .await
            .unwrap();
        assert!(granted.allowed());
    }
    assert_eq!(s.one(&read).await.remaining, 3);
    for wrong in [1, 2, 4, 1_000_000] {
        assert_eq!(
            s.store.release(&spec.key, &a, wrong).await.unwrap(),
            0,
            "a's lease named with cost {wrong}"
        );
    }
    assert_eq!(s.store.release(&spec.key, &a, 3).await.unwrap(), 3);
    assert_eq!(s.one(&read).await.remaining, 6);
    for _ in 0..3 {
        assert_eq!(
            s.store.release(&spec.key, &a, 3).await.unwrap(),
            0,
            "replayed"
        );
    }
    assert_eq!(s.one(&read).await.remaining, 6, "b still holds its 4");
    assert_eq!(s.store.release(&spec.key, &b, 4).await.unwrap(), 4);
    assert_eq!(s.one(&read).await.remaining, 10);
}

/// A lease that is never given back expires, and its units come back, once: its late
/// release frees nothing more, before and after a check has swept it.
async fn concurrency_an_expired_leases_units_come_back(s: Subject) {
    let spec = limit(Concurrency, 5, 10_000, 0);
    let read = costing(spec.clone(), 0);
    let (a, b, c) = (lease_id(), lease_id(), lease_id());
    let take = |lease: &str, cost| {
        let spec = costing(spec.clone(), cost);
        let store = Arc::clone(&s.store);
        let lease = lease.to_owned();
        async move {
            store
                .check(std::slice::from_ref(&spec), &lease)
                .await
                .unwrap()
                .verdicts[0]
        }
    };
    assert_eq!(take(&a, 3).await, verdict(true, 2, 10_000, 0));
    s.advance(4_000);
    assert_eq!(take(&b, 2).await, verdict(true, 0, 6_000, 0));
    assert_eq!(take(&c, 1).await, verdict(false, 0, 6_000, 1_000));
    s.advance(6_000);
    // a expired, unreleased: its 3 units are back; b's 2 are held for 4 s more.
    assert_eq!(
        s.store.release(&spec.key, &a, 3).await.unwrap(),
        0,
        "released after it expired, before any check swept it"
    );
    assert_eq!(s.one(&read).await, verdict(true, 3, 4_000, 0));
    assert_eq!(
        s.store.release(&spec.key, &a, 3).await.unwrap(),
        0,
        "released after a check swept it"
    );
    assert_eq!(take(&c, 3).await, verdict(true, 0, 4_000, 0));
    assert!(!take(&lease_id(), 1).await.ok);
    s.advance(4_000);
    assert_eq!(s.one(&read).await, verdict(true, 2, 6_000, 0));
    s.advance(6_000);
    assert_eq!(s.one(&read).await, verdict(true, 5, 0, 0));
    assert_eq!(s.store.release(&spec.key, &c, 3).await.unwrap(), 0);
    assert_eq!(s.one(&read).await.remaining, 5);
}

// ---- every strategy -------------------------------------------------------------------------

/// One limit of each strategy, each admitting `limit_value` requests at once (with the
/// leaky bucket's max delay chosen for that at the limits used here: 0, 1, 3 and 5).
fn one_of_each(limit_value: u64) -> Vec<LimitSpec> {
    vec![
        limit(FixedWindow, limit_value, HOUR, 0),
        limit(SlidingWindowLog, limit_value, HOUR, 0),
        limit(SlidingWindowCounter, limit_value, HOUR, 0),
        limit(TokenBucket, limit_value, HOUR, limit_value),
        limit(Gcra, limit_value, HOUR, limit_value),
        // A queue of `limit`: the last place waits (limit − 1) / limit of the window.
        limit(LeakyBucket, limit_value, HOUR, HOUR / 5 * 4),
        limit(Concurrency, limit_value, HOUR, 0),
    ]
}

async fn several_limits_are_all_or_nothing(s: Subject) {
    for roomy in one_of_each(5) {
        let tight = limit(FixedWindow, 1, HOUR, 0);
        let both = [roomy.clone(), tight];
        assert!(s.check(&both).await.allowed());
        let denied = s.check(&both).await;
        assert_eq!(denied.denied_by, Some(1), "{:?}", roomy.params.strategy);
        assert!(denied.verdicts[0].ok);
        assert_eq!(
            denied.verdicts[0].remaining, 4,
            "{:?}: {denied:?}",
            roomy.params.strategy
        );
        assert_eq!(
            s.one(&roomy).await.remaining,
            3,
            "{:?}",
            roomy.params.strategy
        );
    }
}

async fn cost_counts_and_zero_cost_only_reads(s: Subject) {
    for spec in one_of_each(5) {
        let strategy = spec.params.strategy;
        assert_eq!(
            s.one(&costing(spec.clone(), 4)).await.remaining,
            1,
            "{strategy:?}"
        );
        for _ in 0..2 {
            let read = s.one(&costing(spec.clone(), 0)).await;
            assert!(read.ok, "{strategy:?}");
            assert_eq!(read.remaining, 1, "{strategy:?}");
        }
        if strategy != LeakyBucket {
            assert!(!s.one(&costing(spec.clone(), 2)).await.ok, "{strategy:?}");
        }
        assert_eq!(s.one(&spec).await.remaining, 0, "{strategy:?}");
    }
}

async fn cost_above_capacity_is_denied_and_consumes_nothing(s: Subject) {
    for spec in one_of_each(3)
        .into_iter()
        .filter(|l| l.params.strategy != LeakyBucket)
    {
        let strategy = spec.params.strategy;
        assert!(!s.one(&costing(spec.clone(), 4)).await.ok, "{strategy:?}");
        assert_eq!(
            s.admitted(&spec, 4).await,
            [true, true, true, false],
            "{strategy:?}"
        );
    }
}

async fn limit_zero_blocks_everything(s: Subject) {
    for spec in one_of_each(0) {
        let strategy = spec.params.strategy;
        for _ in 0..3 {
            let v = s.one(&spec).await;
            assert!(!v.ok, "{strategy:?}");
            assert!(v.retry_after_ms > 0, "{strategy:?}");
        }
        assert!(s.one(&costing(spec, 0)).await.ok, "{strategy:?}");
    }
}

async fn huge_limits_count_without_overflow(s: Subject) {
    let huge = [
        // Every limit is capped at 2^53, where Redis's Lua numbers stop being exact.
        limit(FixedWindow, 1 << 53, HOUR, 0),
        limit(Concurrency, 1_000_000_000_000_000, HOUR, 0),
        // Rate strategies are capped at limit × window < 2^53 (checked in the rules).
        limit(SlidingWindowCounter, 2_000_000_000, HOUR, 0),
        limit(TokenBucket, 2_000_000_000, HOUR, 2_000_000_000),
        limit(Gcra, 2_000_000_000, HOUR, 2_000_000_000),
    ];
    for spec in huge {
        let strategy = spec.params.strategy;
        let v = s.one(&costing(spec.clone(), 1_000)).await;
        assert!(v.ok, "{strategy:?}");
        assert_eq!(
            v.remaining,
            spec.params.limit - 1_000,
            "{strategy:?}: {v:?}"
        );
    }
}

/// Every strategy but the leaky bucket, whose queue has a scenario of its own
/// (`leaky_bucket_admits_nothing_extra_when_the_clock_goes_back`).
async fn a_clock_going_back_admits_nothing_extra(s: Subject) {
    for spec in one_of_each(3)
        .into_iter()
        .filter(|l| l.params.strategy != LeakyBucket)
    {
        let strategy = spec.params.strategy;
        assert_eq!(
            s.admitted(&spec, 4).await,
            [true, true, true, false],
            "{strategy:?}"
        );
        s.clock.set(START - 2 * HOUR);
        assert!(
            !s.one(&spec).await.ok,
            "{strategy:?} admitted after the clock went back"
        );
        s.clock.set(START);
    }
}

/// The leaky bucket's queue is kept as a lead over the latest time it has seen: a clock that
/// goes back neither drains the queue nor gives a request an earlier slot than it had.
async fn leaky_bucket_admits_nothing_extra_when_the_clock_goes_back(s: Subject) {
    // One every 500 ms, waiting at most 1 s: three places (now, +500 ms, +1000 ms).
    let full = limit(LeakyBucket, 2, 1_000, 1_000);
    let mut slots = Vec::new();
    for _ in 0..3 {
        let v = s.one(&full).await;
        slots.push((v.ok, v.delay_ms));
    }
    assert_eq!(slots, [(true, 0), (true, 500), (true, 1_000)]);
    let denied = s.one(&full).await;
    assert_eq!(denied, verdict(false, 0, 1_500, 500));
    s.clock.set(START - HOUR);
    assert_eq!(
        s.one(&full).await,
        denied,
        "admitted after the clock went back"
    );
    s.clock.set(START);
    assert_eq!(
        s.one(&full).await,
        denied,
        "the queue drained while the clock was back"
    );
    // Time that really passes still drains it.
    s.advance(500);
    let v = s.one(&full).await;
    assert_eq!((v.ok, v.delay_ms), (true, 1_000));

    // A queue with a place left: after the clock went back, the place is still the last
    // one (the full wait), and there is no other.
    let half = limit(LeakyBucket, 2, 1_000, 1_000);
    assert_eq!(s.admitted(&half, 2).await, [true, true]);
    s.clock.set(START + 500 - HOUR);
    let last = s.one(&half).await;
    assert_eq!((last.ok, last.delay_ms), (true, 1_000), "{last:?}");
    assert!(
        !s.one(&half).await.ok,
        "admitted a fourth after the clock went back"
    );
}

async fn keys_count_independently(s: Subject) {
    for (a, b) in one_of_each(1).into_iter().zip(one_of_each(1)) {
        assert!(s.one(&a).await.ok);
        assert!(!s.one(&a).await.ok);
        assert!(s.one(&b).await.ok, "{:?}", b.params.strategy);
    }
}

async fn a_batch_is_decided_in_order(s: Subject) {
    let shared = [limit(FixedWindow, 2, HOUR, 0)];
    let bucket = [limit(TokenBucket, 1, HOUR, 3)];
    let both = [shared[0].clone(), bucket[0].clone()];
    let leases: Vec<String> = (0..5).map(|_| lease_id()).collect();
    let checks = [
        CheckSpec {
            limits: &shared,
            lease_id: &leases[0],
        },
        CheckSpec {
            limits: &bucket,
            lease_id: &leases[1],
        },
        CheckSpec {
            limits: &shared,
            lease_id: &leases[2],
        },
        // Denied by the fixed window, so the bucket must not count it either.
        CheckSpec {
            limits: &both,
            lease_id: &leases[3],
        },
        CheckSpec {
            limits: &bucket,
            lease_id: &leases[4],
        },
    ];
    let outcomes = s.store.check_batch(&checks).await.expect("store answers");
    let summary: Vec<(Option<usize>, Vec<u64>)> = outcomes
        .iter()
        .map(|o| {
            (
                o.denied_by,
                o.verdicts.iter().map(|v| v.remaining).collect(),
            )
        })
        .collect();
    assert_eq!(
        summary,
        [
            (None, vec![1]),
            (None, vec![2]),
            (None, vec![0]),
            (Some(0), vec![0, 2]),
            (None, vec![1]),
        ]
    );
}

// ---- progressive penalties ---------------------------------------------------------------

fn with_penalty(mut spec: LimitSpec, base_ms: u64, max_ms: u64, decay_ms: u64) -> LimitSpec {
    spec.params.penalty = Some(PenaltyParams {
        base_ms,
        max_ms,
        decay_ms,
    });
    spec
}

fn cooling(remaining: u64, cool_down_ms: u64) -> Verdict {
    Verdict {
        cooling: true,
        ..verdict(false, remaining, cool_down_ms, cool_down_ms)
    }
}

async fn a_penalty_doubles_while_the_limit_is_hit_and_decays_after(s: Subject) {
    // One request per second (windows start 750 ms after START); cool-downs of 2 s doubling
    // to 8 s; one strike forgiven per 10 s without a denial.
    let spec = with_penalty(limit(FixedWindow, 1, 1_000, 0), 2_000, 8_000, 10_000);
    assert_eq!(s.one(&spec).await, verdict(true, 0, 750, 0));
    // The window denies (750 ms to go): the first strike's cool-down is longer, and is
    // what the client is told.
    assert_eq!(s.one(&spec).await, cooling(0, 2_000));
    s.advance(1_000);
    // A new window, but the client cools down: denied without counting, no new strike.
    assert_eq!(s.one(&spec).await, cooling(0, 1_000));
    s.advance(1_000);
    assert!(s.one(&spec).await.ok, "the cool-down is over");
    assert_eq!(s.one(&spec).await, cooling(0, 4_000), "strike 2");
    s.advance(4_000);
    assert!(s.one(&spec).await.ok);
    assert_eq!(s.one(&spec).await, cooling(0, 8_000), "strike 3");
    s.advance(8_000);
    assert!(s.one(&spec).await.ok);
    assert_eq!(
        s.one(&spec).await,
        cooling(0, 8_000),
        "strike 4: at the maximum"
    );
    s.advance(7_999);
    assert_eq!(s.one(&spec).await, cooling(0, 1));
    s.advance(1);
    assert!(
        s.one(&spec).await.ok,
        "at the end of the cool-down to the ms"
    );
    // Behaving for 30 s forgives three of the four strikes: the next is strike 2.
    s.advance(30_000);
    assert!(s.one(&spec).await.ok);
    assert_eq!(s.one(&spec).await, cooling(0, 4_000), "decayed");
    // Long enough and every strike is forgiven: back to the base.
    s.advance(60_000);
    assert!(s.one(&spec).await.ok);
    assert_eq!(s.one(&spec).await, cooling(0, 2_000), "forgiven");
}

/// A cool-down is time with denials: a client that strikes again as soon as it ends is not
/// forgiven for it, even when it is longer than the decay (it used to be, and the
/// cool-downs never grew past a few times the decay).
async fn a_client_struck_at_the_end_of_each_cool_down_is_not_forgiven_for_it(s: Subject) {
    // Cool-downs of 2 s doubling to 32 s; one strike forgiven per 3 s without a denial.
    let spec = with_penalty(limit(FixedWindow, 1, 1_000, 0), 2_000, 32_000, 3_000);
    assert!(s.one(&spec).await.ok);
    let mut cool = 2_000;
    assert_eq!(s.one(&spec).await, cooling(0, cool));
    for _ in 0..4 {
        s.advance(cool);
        assert!(s.one(&spec).await.ok, "the cool-down is over");
        cool = (cool * 2).min(32_000);
        assert_eq!(s.one(&spec).await, cooling(0, cool), "not forgiven");
    }
}

async fn a_penalty_strikes_only_the_limit_that_denied(s: Subject) {
    let penalised = with_penalty(limit(FixedWindow, 5, 60_000, 0), 10_000, 60_000, 60_000);
    let strict = limit(FixedWindow, 1, 60_000, 0);
    let both = [penalised.clone(), strict.clone()];
    assert!(s.check(&both).await.allowed());
    let outcome = s.check(&both).await;
    assert_eq!(outcome.denied_by, Some(1), "{outcome:?}");
    assert!(!outcome.verdicts[0].cooling, "{outcome:?}");
    // The penalised limit was not struck: alone, it admits (and counts) the request.
    assert_eq!(s.one(&penalised).await, verdict(true, 3, 59_750, 0));
    // While one limit cools down, the others count nothing.
    let tight = with_penalty(limit(FixedWindow, 1, 60_000, 0), 10_000, 60_000, 60_000);
    assert!(s.one(&tight).await.ok);
    assert_eq!(s.one(&tight).await, cooling(0, 59_750));
    let cooling_first = [tight.clone(), strict.clone()];
    let outcome = s.check(&cooling_first).await;
    assert_eq!(outcome.denied_by, Some(0), "{outcome:?}");
    assert!(outcome.verdicts[0].cooling);
    assert_eq!(
        s.one(&penalised).await,
        verdict(true, 2, 59_750, 0),
        "not counted"
    );
}

async fn a_read_during_a_cool_down_reports_the_limit_as_it_is(s: Subject) {
    let spec = with_penalty(limit(FixedWindow, 1, 1_000, 0), 5_000, 5_000, 5_000);
    assert!(s.one(&spec).await.ok);
    assert!(s.one(&spec).await.cooling);
    s.advance(1_000);
    let read = s.one(&costing(spec.clone(), 0)).await;
    assert_eq!(
        read,
        verdict(true, 1, 750, 0),
        "cost 0 reads, and is not cooled"
    );
}

/// An operator lowers a limit below what its key has counted already (a live change): the
/// key denies, with nothing remaining, until it has room under the new limit (a token
/// bucket shrinks to its new burst). Both stores once answered this with a negative
/// remaining count (Redis: a reply the controller refused, so the failure mode answered).
async fn a_limit_lowered_below_the_count_denies_with_nothing_remaining(s: Subject) {
    for (strategy, period, extra) in [
        (FixedWindow, 10_000, 0),
        (SlidingWindowLog, 10_000, 0),
        (SlidingWindowCounter, 10_000, 0),
        (TokenBucket, 10_000, 10),
        (Gcra, 10_000, 10),
        (LeakyBucket, 10_000, 10_000),
        (Concurrency, 10_000, 0),
    ] {
        let generous = limit(strategy, 10, period, extra);
        assert_eq!(s.admitted(&generous, 6).await, [true; 6], "{strategy:?}");
        let lowered = LimitSpec {
            params: Params {
                limit: 2,
                extra: extra.min(2),
                ..generous.params
            },
            ..generous.clone()
        };
        if strategy == TokenBucket {
            // The bucket is smaller now: its 4 tokens left are the new burst, 2.
            assert_eq!(s.admitted(&lowered, 2).await, [true; 2]);
        }
        let verdict = s.one(&lowered).await;
        assert!(!verdict.ok, "{strategy:?}: {verdict:?}");
        assert_eq!(verdict.remaining, 0, "{strategy:?}: {verdict:?}");
    }
}

fn reservation(key: &str, holder: &str, ttl_ms: u64, quota: u64) -> Reservation {
    Reservation {
        key: key.to_owned(),
        holder: holder.to_owned(),
        ttl_ms,
        quota,
    }
}

impl Subject {
    async fn reserve(&self, asked: &[Reservation]) -> Vec<u64> {
        self.store
            .reserve_leases(asked)
            .await
            .expect("store answers")
    }
}

async fn lease_reservations_split_the_quota_and_never_exceed_it(s: Subject) {
    let key = sluice_controller::keys::lease_holders_key(&limit(FixedWindow, 100, 1_000, 0).key);
    let one = |holder: &str| reservation(&key, holder, 1_000, 12);
    assert_eq!(s.reserve(&[one("a")]).await, [12], "alone: the whole quota");
    // A second holder would get half, but only what the first leaves: nothing yet. It
    // counts as a holder all the same, so the first gets half when it asks again.
    assert_eq!(s.reserve(&[one("b")]).await, [0]);
    let mut taken = Vec::new();
    for holder in ["a", "b", "c", "a", "b", "c", "d"] {
        taken.push(s.reserve(&[one(holder)]).await[0]);
    }
    // a 12/2, b what a leaves, c nothing left; then thirds; d nothing left. Each holder's
    // latest reservation adds up to the quota (4 + 4 + 4 + 0), never beyond it.
    assert_eq!(taken, [6, 6, 0, 4, 4, 4, 0]);
}

async fn a_lease_is_sized_by_its_holders_traffic(s: Subject) {
    let key =
        sluice_controller::keys::lease_holders_key(&limit(FixedWindow, 100_000, 60_000, 0).key);
    let one = |holder: &str| reservation(&key, holder, 60_000, 1_000);
    assert_eq!(s.reserve(&[one("a")]).await, [16], "a first lease");
    s.advance(100);
    assert_eq!(
        s.reserve(&[one("a")]).await,
        [160],
        "16 in 100 ms: a second of that"
    );
    s.advance(400);
    assert_eq!(s.reserve(&[one("a")]).await, [400], "160 in 400 ms");
    s.advance(2_000);
    assert_eq!(
        s.reserve(&[one("a")]).await,
        [200],
        "400 in 2 s: slower, smaller"
    );
    assert_eq!(s.reserve(&[one("b")]).await, [16], "b's first");
    s.advance(1);
    assert_eq!(
        s.reserve(&[one("a")]).await,
        [500],
        "however fast, no more than its even share of the two"
    );
}

async fn lease_reservations_end_with_their_lease(s: Subject) {
    let key = sluice_controller::keys::lease_holders_key(&limit(TokenBucket, 100, 1_000, 100).key);
    assert_eq!(s.reserve(&[reservation(&key, "a", 500, 10)]).await, [10]);
    assert_eq!(s.reserve(&[reservation(&key, "b", 500, 10)]).await, [0]);
    s.advance(500);
    assert_eq!(
        s.reserve(&[reservation(&key, "b", 500, 10)]).await,
        [10],
        "a's lease ended: b holds the quota alone"
    );
    // Several limits in one call, each on its own.
    let other = sluice_controller::keys::lease_holders_key(&limit(Gcra, 100, 1_000, 40).key);
    assert_eq!(
        s.reserve(&[
            reservation(&key, "c", 500, 10),
            reservation(&other, "c", 500, 4)
        ])
        .await,
        [0, 4]
    );
}

fn refund_of(spec: &LimitSpec, units: u64, counted_in: u64, grant: &str, holder: &str) -> Refund {
    Refund {
        key: spec.key.clone(),
        params: spec.params,
        units,
        counted_in,
        grant: grant.to_owned(),
        remember_ms: 60_000,
        holder: holder.to_owned(),
    }
}

impl Subject {
    async fn refund(&self, refunds: &[Refund]) -> Vec<u64> {
        self.store.refund(refunds).await.expect("store answers")
    }

    async fn remaining(&self, spec: &LimitSpec) -> u64 {
        self.check(&[costing(spec.clone(), 0)]).await.verdicts[0].remaining
    }
}

async fn a_returned_lease_gives_its_unused_quota_back_once_and_only_in_its_window(s: Subject) {
    let spec = limit(FixedWindow, 100, 60_000, 0);
    let window = START - START % 60_000;
    assert!(
        s.check(&[costing(spec.clone(), 40)]).await.allowed(),
        "a lease of 40"
    );
    assert_eq!(
        s.refund(&[refund_of(&spec, 30, window, "g1", "w")]).await,
        [30]
    );
    assert_eq!(s.remaining(&spec).await, 90, "30 of the 40 back");
    assert_eq!(
        s.refund(&[refund_of(&spec, 30, window, "g1", "w")]).await,
        [0],
        "a replayed return gives nothing"
    );
    assert_eq!(s.remaining(&spec).await, 90);
    assert_eq!(
        s.refund(&[refund_of(&spec, 1_000, window, "g2", "w")])
            .await,
        [10],
        "never more than the window counted"
    );
    assert_eq!(s.remaining(&spec).await, 100);
    assert_eq!(
        s.refund(&[refund_of(&spec, 5, window - 60_000, "g3", "w")])
            .await,
        [0],
        "a lease counted in another window gives nothing to this one"
    );
    assert!(s.check(&[costing(spec.clone(), 50)]).await.allowed());
    s.advance(60_000);
    assert!(
        s.check(&[costing(spec.clone(), 20)]).await.allowed(),
        "the next window"
    );
    assert_eq!(
        s.refund(&[refund_of(&spec, 50, window, "g4", "w")]).await,
        [0],
        "the window the lease was counted in has ended: its quota went with it"
    );
    assert_eq!(s.remaining(&spec).await, 80);
}

async fn a_returned_lease_fills_a_bucket_no_further_than_it_was(s: Subject) {
    let bucket = limit(TokenBucket, 10, 1_000, 20);
    assert!(s.check(&[costing(bucket.clone(), 15)]).await.allowed());
    assert_eq!(
        s.refund(&[refund_of(&bucket, 10, 0, "b1", "w")]).await,
        [10]
    );
    assert_eq!(s.remaining(&bucket).await, 15);
    s.advance(200);
    assert_eq!(
        s.refund(&[refund_of(&bucket, 100, 0, "b2", "w")]).await,
        [3],
        "17 after 200 ms of refill: 3 to full"
    );
    assert_eq!(s.remaining(&bucket).await, 20);

    let gcra = limit(Gcra, 10, 1_000, 5);
    assert!(s.check(&[costing(gcra.clone(), 5)]).await.allowed());
    assert_eq!(s.remaining(&gcra).await, 0);
    assert_eq!(s.refund(&[refund_of(&gcra, 3, 0, "c1", "w")]).await, [3]);
    assert_eq!(s.remaining(&gcra).await, 3);
    assert_eq!(
        s.refund(&[refund_of(&gcra, 3, 0, "c1", "w")]).await,
        [0],
        "a replay"
    );
    assert_eq!(
        s.refund(&[refund_of(&gcra, 10, 0, "c2", "w")]).await,
        [2],
        "down to no debt, no further"
    );
    assert_eq!(s.remaining(&gcra).await, 5);
    let untouched = limit(Gcra, 10, 1_000, 5);
    assert_eq!(
        s.refund(&[refund_of(&untouched, 3, 0, "c3", "w")]).await,
        [0],
        "nothing taken, nothing to give back"
    );
    assert_eq!(s.remaining(&untouched).await, 5);
}

async fn a_returned_lease_ends_its_holders_reservation(s: Subject) {
    let spec = limit(FixedWindow, 100, 60_000, 0);
    let holders = sluice_controller::keys::lease_holders_key(&spec.key);
    assert_eq!(
        s.reserve(&[reservation(&holders, "a", 60_000, 10)]).await,
        [10]
    );
    assert_eq!(
        s.reserve(&[reservation(&holders, "b", 60_000, 10)]).await,
        [0]
    );
    s.refund(&[refund_of(&spec, 0, 0, "r1", "a")]).await;
    assert_eq!(
        s.reserve(&[reservation(&holders, "b", 60_000, 10)]).await,
        [10],
        "a gave its lease back: b may hold the whole quota"
    );
}

fn charge_of(spec: &LimitSpec, units: u64, reservation: &str) -> Charge {
    Charge {
        key: spec.key.clone(),
        params: spec.params,
        units,
        reservation: reservation.to_owned(),
        remember_ms: 60_000,
    }
}

impl Subject {
    async fn charge(&self, charges: &[Charge]) -> Vec<u64> {
        self.store.charge(charges).await.expect("store answers")
    }
}

async fn usage_beyond_a_reservation_is_charged_in_full_once_in_the_current_window(s: Subject) {
    let spec = limit(FixedWindow, 100, 60_000, 0);
    assert!(
        s.check(&[costing(spec.clone(), 60)]).await.allowed(),
        "reserved 60"
    );
    assert_eq!(
        s.charge(&[charge_of(&spec, 70, "r1")]).await,
        [70],
        "used 130"
    );
    assert_eq!(s.remaining(&spec).await, 0, "130 counted of 100");
    assert!(!s.one(&costing(spec.clone(), 1)).await.ok, "overdrawn");
    assert_eq!(
        s.charge(&[charge_of(&spec, 70, "r1")]).await,
        [0],
        "a replayed settlement charges nothing"
    );
    assert_eq!(
        s.refund(&[refund_of(&spec, 10, START - START % 60_000, "r1", "")])
            .await,
        [0],
        "nor gives back: a reservation settles once, as a charge or as a refund"
    );
    s.advance(60_000);
    assert_eq!(
        s.remaining(&spec).await,
        100,
        "the next window starts afresh"
    );
    assert_eq!(
        s.charge(&[charge_of(&spec, 30, "r2")]).await,
        [30],
        "settled after its window ended: charged to the current one"
    );
    assert_eq!(s.remaining(&spec).await, 70);
}

async fn usage_beyond_a_reservation_puts_a_bucket_in_debt(s: Subject) {
    let bucket = limit(TokenBucket, 10, 1_000, 20);
    assert!(s.check(&[costing(bucket.clone(), 15)]).await.allowed());
    assert_eq!(s.charge(&[charge_of(&bucket, 10, "b1")]).await, [10]);
    assert_eq!(
        s.remaining(&bucket).await,
        0,
        "5 left, 10 more used: 5 owed"
    );
    let owing = s.one(&costing(bucket.clone(), 1)).await;
    assert!(!owing.ok);
    assert_eq!(
        owing.retry_after_ms, 600,
        "the 5 owed, then one token, at 10 a second"
    );
    s.advance(599);
    assert!(
        !s.one(&costing(bucket.clone(), 1)).await.ok,
        "the 5 owed first"
    );
    s.advance(1);
    assert!(
        s.one(&costing(bucket.clone(), 1)).await.ok,
        "then one refilled"
    );

    let gcra = limit(Gcra, 10, 1_000, 5);
    assert_eq!(
        s.charge(&[charge_of(&gcra, 8, "c1")]).await,
        [8],
        "a charge on a limit with nothing taken yet"
    );
    assert_eq!(s.remaining(&gcra).await, 0, "3 past the burst of 5");
    s.advance(399);
    assert!(!s.one(&costing(gcra.clone(), 1)).await.ok);
    s.advance(1);
    assert!(s.one(&costing(gcra.clone(), 1)).await.ok);
    assert_eq!(
        s.charge(&[charge_of(&gcra, 8, "c1")]).await,
        [0],
        "a replay"
    );
}

async fn a_bucket_in_debt_stays_in_debt_whatever_is_given_back_meanwhile(s: Subject) {
    let bucket = limit(TokenBucket, 10, 1_000, 20);
    assert!(s.check(&[costing(bucket.clone(), 15)]).await.allowed());
    assert_eq!(s.charge(&[charge_of(&bucket, 100, "d1")]).await, [100]);
    // 95 tokens owed: 9.5 s at 10 a second. Another request gives back 1 meanwhile.
    assert_eq!(s.refund(&[refund_of(&bucket, 1, 0, "d2", "")]).await, [1]);
    assert!(
        s.one(&costing(bucket.clone(), 1)).await.ok,
        "the one given back"
    );
    s.advance(3_000);
    assert!(
        !s.one(&costing(bucket.clone(), 1)).await.ok,
        "still in debt: the state outlives the refund's own refill time"
    );
    s.advance(6_600);
    assert!(
        s.one(&costing(bucket.clone(), 1)).await.ok,
        "paid off, one refilled"
    );
}

macro_rules! every_store {
    ($($scenario:ident),* $(,)?) => {
        mod memory {
            $(#[tokio::test]
            async fn $scenario() {
                super::$scenario(super::Subject::memory()).await;
            })*
        }
        mod redis {
            $(#[tokio::test]
            async fn $scenario() {
                super::$scenario(super::Subject::redis()).await;
            })*
        }
        mod cluster {
            /// Every scenario on one three-master cluster, in turn (keys are unique per
            /// scenario); a failing scenario names itself.
            #[tokio::test]
            async fn every_scenario() {
                let cluster = std::sync::Arc::new(sluice_e2e::RedisCluster::start(3));
                $(
                    println!("cluster: {}", stringify!($scenario));
                    super::$scenario(super::Subject::cluster(&cluster)).await;
                )*
            }
        }
    };
}

every_store!(
    a_bucket_in_debt_stays_in_debt_whatever_is_given_back_meanwhile,
    usage_beyond_a_reservation_is_charged_in_full_once_in_the_current_window,
    usage_beyond_a_reservation_puts_a_bucket_in_debt,
    fixed_window_counts_down_and_denies_until_the_boundary,
    fixed_window_lets_twice_the_limit_through_across_a_boundary,
    sliding_log_counts_each_request_for_one_window,
    sliding_log_retry_waits_for_enough_requests_to_leave,
    sliding_counter_weights_the_previous_window,
    token_bucket_bursts_then_refills_at_the_rate,
    token_bucket_refills_fractions_exactly,
    gcra_spaces_requests_evenly,
    gcra_allows_its_burst_early,
    leaky_bucket_delays_until_the_slot_then_denies,
    leaky_bucket_without_delay_is_a_plain_rate,
    concurrency_holds_slots_until_released_or_expired,
    concurrency_a_lease_of_a_million_is_one_lease,
    concurrency_a_replayed_release_frees_nothing,
    concurrency_an_expired_leases_units_come_back,
    several_limits_are_all_or_nothing,
    cost_counts_and_zero_cost_only_reads,
    cost_above_capacity_is_denied_and_consumes_nothing,
    limit_zero_blocks_everything,
    huge_limits_count_without_overflow,
    a_clock_going_back_admits_nothing_extra,
    leaky_bucket_admits_nothing_extra_when_the_clock_goes_back,
    keys_count_independently,
    a_batch_is_decided_in_order,
    a_penalty_doubles_while_the_limit_is_hit_and_decays_after,
    a_penalty_strikes_only_the_limit_that_denied,
    a_client_struck_at_the_end_of_each_cool_down_is_not_forgiven_for_it,
    a_read_during_a_cool_down_reports_the_limit_as_it_is,
    a_limit_lowered_below_the_count_denies_with_nothing_remaining,
    lease_reservations_split_the_quota_and_never_exceed_it,
    lease_reservations_end_with_their_lease,
    a_lease_is_sized_by_its_holders_traffic,
    a_returned_lease_gives_its_unused_quota_back_once_and_only_in_its_window,
    a_returned_lease_fills_a_bucket_no_further_than_it_was,
    a_returned_lease_ends_its_holders_reservation,
);

// ---- Redis on its own clock ------------------------------------------------------------------

fn redis_on_server_time() -> (RedisServer, RedisStore) {
    let redis = RedisServer::start();
    let store = RedisStore::new(&redis.url(), Duration::from_secs(2)).expect("redis store");
    (redis, store)
}

/// What `lua/check.lua` adds to every TTL when the time is injected: Redis expires keys on
/// its own clock, which the injected one does not move.
const INJECTED_TIME_TTL_EXTRA: u64 = 60_000;

/// A key's `PTTL` now, after its TTL was set to at most `set_to` ms no earlier than
/// `checked_at`: the server's clock has run since then, never more than this process's.
fn assert_pttl(
    connection: &mut ::redis::Connection,
    spec: &LimitSpec,
    set_to: u64,
    checked_at: std::time::Instant,
    what: &str,
) {
    let ttl: i64 = ::redis::cmd("PTTL")
        .arg(&spec.key)
        .query(connection)
        .unwrap();
    let ran = u64::try_from(checked_at.elapsed().as_millis()).unwrap_or(u64::MAX);
    let lowest = set_to.saturating_sub(ran + 2);
    // The script's `TIME` reads the real clock; `PTTL` answers on the server's cached clock,
    // refreshed once per pass of its event loop, which on a loaded two-core machine lags the
    // real one by a few milliseconds (seen: 9). A TTL set too long (twice the window, or
    // re-set on every check) is off by seconds, not milliseconds.
    let highest = set_to + 25;
    assert!(
        u64::try_from(ttl).is_ok_and(|ttl| (lowest..=highest).contains(&ttl)),
        "{:?} {what}: PTTL {ttl}, expected {lowest}..={highest}",
        spec.params.strategy
    );
}

/// Every key a strategy writes carries a TTL of exactly as long as its state matters, as
/// the scripts set it: the end of the window (fixed window, set when the window opens), the
/// newest entry's window (log), the end of the next window (counter, whose current window
/// still weighs there), the time to refill or pay the debt (token bucket, GCRA, leaky
/// bucket), the last lease (concurrency). On injected time, plus the extra minute.
#[tokio::test]
async fn redis_keys_expire_when_their_state_no_longer_matters() {
    let s = Subject::redis();
    let redis = s.redis.as_ref().expect("a redis subject");
    let mut connection = redis.connection();
    // START is 250 ms into a minute. Both checks at START; the second one's TTL is what
    // the key holds after two admitted requests.
    let cases = [
        (limit(FixedWindow, 10, 60_000, 0), [59_750, 59_750]),
        (limit(SlidingWindowLog, 10, 60_000, 0), [60_000, 60_000]),
        (
            limit(SlidingWindowCounter, 10, 60_000, 0),
            [119_750, 119_750],
        ),
        // A token (6 s) per request to refill, a request's debt to pay off or queue to drain.
        (limit(TokenBucket, 10, 60_000, 10), [6_000, 12_000]),
        (limit(Gcra, 10, 60_000, 2), [6_000, 12_000]),
        (limit(LeakyBucket, 10, 60_000, 10_000), [6_000, 12_000]),
        (limit(Concurrency, 10, 60_000, 0), [60_000, 60_000]),
    ];
    for (spec, ttls) in cases {
        let first_at = std::time::Instant::now();
        for (check, ttl) in ["first", "second"].into_iter().zip(ttls) {
            assert!(s.one(&spec).await.ok, "{:?} {check}", spec.params.strategy);
            // The fixed window's second check leaves the TTL its first one set: count the
            // server's time from the first.
            let what = format!("after the {check} check");
            assert_pttl(
                &mut connection,
                &spec,
                ttl + INJECTED_TIME_TTL_EXTRA,
                first_at,
                &what,
            );
        }
    }
}

/// Upgrade: a set of the layout before this one (one member `<lease id>:<n>` per unit, no
/// units hash) counts one unit a member; a release of such a lease of cost 1 frees it, a
/// costlier one is left to expire; new leases go beside the old members.
#[tokio::test]
async fn redis_concurrency_reads_the_layout_of_one_member_per_unit() {
    let s = Subject::redis();
    let mut connection = s.redis.as_ref().expect("a redis subject").connection();
    let spec = limit(Concurrency, 10, 30_000, 0);
    let read = costing(spec.clone(), 0);
    let (a, b) = (lease_id(), lease_id());
    // What the scripts before left: a of cost 3 and b of cost 1, taken at START for 30 s.
    let expiry = START + 30_000;
    let _: () = ::redis::pipe()
        .cmd("ZADD")
        .arg(&spec.key)
        .arg(&[
            (expiry, format!("{a}:1")),
            (expiry, format!("{a}:2")),
            (expiry, format!("{a}:3")),
            (expiry, format!("{b}:1")),
        ])
        .ignore()
        .cmd("PEXPIRE")
        .arg(&spec.key)
        .arg(30_000 + INJECTED_TIME_TTL_EXTRA)
        .ignore()
        .query(&mut connection)
        .unwrap();
    assert_eq!(s.one(&read).await, verdict(true, 6, 30_000, 0));
    assert_eq!(
        concurrency_state(&mut connection, &spec).1,
        units_hash(4, 4)
    );
    assert_eq!(s.store.release(&spec.key, &b, 1).await.unwrap(), 1, "b");
    assert_eq!(
        s.store.release(&spec.key, &b, 1).await.unwrap(),
        0,
        "b again"
    );
    assert_eq!(
        s.store.release(&spec.key, &a, 3).await.unwrap(),
        0,
        "a costlier lease of the old layout is left to expire"
    );
    assert_eq!(s.one(&read).await.remaining, 7);
    s.advance(1_000);
    let c = lease_id();
    let granted = s
        .store
        .check(std::slice::from_ref(&costing(spec.clone(), 2)), &c)
        .await
        .unwrap();
    assert_eq!(granted.verdicts[0], verdict(true, 5, 29_000, 0));
    assert_eq!(
        concurrency_state(&mut connection, &spec),
        (
            vec![
                format!("{a}:1"),
                format!("{a}:2"),
                format!("{a}:3"),
                format!("{c}=2")
            ],
            units_hash(5, 4)
        )
    );
    s.advance(29_000);
    assert_eq!(s.one(&read).await, verdict(true, 8, 1_000, 0), "a expired");
    assert_eq!(
        concurrency_state(&mut connection, &spec),
        (vec![format!("{c}=2")], units_hash(2, 1))
    );
}

/// The units hash follows changes to the set that the scripts did not make: a reset deletes
/// the set and leaves the hash (which must then count nothing), a controller of the old
/// layout adds members while old and new controllers run side by side, the hash is lost.
#[tokio::test]
async fn redis_concurrency_units_follow_changes_made_outside_the_scripts() {
    let s = Subject::redis();
    let mut connection = s.redis.as_ref().expect("a redis subject").connection();
    let spec = limit(Concurrency, 10, 30_000, 0);
    let read = costing(spec.clone(), 0);
    let take = |lease: &str, cost| {
        let spec = costing(spec.clone(), cost);
        let store = Arc::clone(&s.store);
        let lease = lease.to_owned();
        async move {
            store
                .check(std::slice::from_ref(&spec), &lease)
                .await
                .unwrap()
                .allowed()
        }
    };
    let a = lease_id();
    assert!(take(&a, 4).await);
    let reset = s.store.delete_keys(std::slice::from_ref(&spec.key)).await;
    assert_eq!(reset.unwrap(), 1);
    assert_eq!(s.one(&read).await, verdict(true, 10, 0, 0), "after a reset");
    assert_eq!(
        concurrency_state(&mut connection, &spec),
        (Vec::new(), std::collections::BTreeMap::new()),
        "the units hash left by the reset is gone"
    );
    assert_eq!(s.store.release(&spec.key, &a, 4).await.unwrap(), 0);

    let b = lease_id();
    assert!(take(&b, 3).await);
    // An old controller's lease of cost 2.
    let _: () = ::redis::cmd("ZADD")
        .arg(&spec.key)
        .arg(&[(START + 30_000, "old:1"), (START + 30_000, "old:2")])
        .query(&mut connection)
        .unwrap();
    assert_eq!(s.one(&read).await.remaining, 5, "3 new and 2 old units");
    assert_eq!(
        concurrency_state(&mut connection, &spec).1,
        units_hash(5, 3)
    );
    let _: () = ::redis::cmd("DEL")
        .arg(sluice_controller::keys::concurrency_units_key(&spec.key))
        .query(&mut connection)
        .unwrap();
    assert_eq!(s.one(&read).await.remaining, 5, "the lost hash rebuilt");
    assert_eq!(s.store.release(&spec.key, &b, 3).await.unwrap(), 3);
    assert_eq!(
        concurrency_state(&mut connection, &spec).1,
        units_hash(2, 2),
        "the release kept the hash"
    );
    assert_eq!(s.one(&read).await.remaining, 8);
}

/// On the server's `TIME` (production), a key's TTL is the state's own horizon, without
/// the injected time's extra minute: the `reset_ms` the script reports (how long until the
/// limit is whole again), or the last lease for concurrency.
#[tokio::test]
async fn redis_keys_on_server_time_expire_with_their_state() {
    let (redis, store) = redis_on_server_time();
    let mut connection = redis.connection();
    let cases = [
        limit(FixedWindow, 10, 60_000, 0),
        limit(SlidingWindowLog, 10, 60_000, 0),
        limit(SlidingWindowCounter, 10, 60_000, 0),
        limit(TokenBucket, 10, 60_000, 10),
        limit(Gcra, 10, 60_000, 2),
        limit(LeakyBucket, 10, 60_000, 10_000),
        limit(Concurrency, 10, 60_000, 0),
    ];
    for spec in cases {
        for check in ["first", "second"] {
            let checked_at = std::time::Instant::now();
            let outcome = store
                .check(std::slice::from_ref(&spec), &lease_id())
                .await
                .unwrap();
            assert!(outcome.allowed(), "{:?} {check}", spec.params.strategy);
            let horizon = if spec.params.strategy == Concurrency {
                spec.params.period_ms
            } else {
                outcome.verdicts[0].reset_ms
            };
            let what = format!("after the {check} check");
            assert_pttl(&mut connection, &spec, horizon, checked_at, &what);
        }
    }
}

/// On `TIME`, a short window really ends.
#[tokio::test]
async fn redis_server_time_moves_windows() {
    let (_redis, store) = redis_on_server_time();
    let spec = limit(FixedWindow, 1, 300, 0);
    let first = store.check(std::slice::from_ref(&spec), "").await.unwrap();
    let wait = if first.allowed() {
        let denied = store.check(std::slice::from_ref(&spec), "").await.unwrap();
        if denied.allowed() {
            // The first request was the last of its window; this one opened a new one.
            store
                .check(std::slice::from_ref(&spec), "")
                .await
                .unwrap()
                .verdicts[0]
                .retry_after_ms
        } else {
            denied.verdicts[0].retry_after_ms
        }
    } else {
        first.verdicts[0].retry_after_ms
    };
    assert!((1..=300).contains(&wait), "{wait}");
    tokio::time::sleep(Duration::from_millis(wait + 5)).await;
    assert!(store
        .check(std::slice::from_ref(&spec), "")
        .await
        .unwrap()
        .allowed());
}

/// A script flushed from the server's cache (restart, failover) is loaded again.
#[tokio::test]
async fn redis_reloads_a_flushed_script() {
    let (redis, store) = redis_on_server_time();
    let spec = limit(FixedWindow, 10, HOUR, 0);
    store.check(std::slice::from_ref(&spec), "").await.unwrap();
    let mut connection = redis.connection();
    let _: () = ::redis::cmd("SCRIPT")
        .arg("FLUSH")
        .query(&mut connection)
        .unwrap();
    let v = store.check(std::slice::from_ref(&spec), "").await.unwrap();
    assert_eq!(v.verdicts[0].remaining, 8);
}
