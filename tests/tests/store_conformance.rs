//! One behaviour suite, every store: each scenario runs against the embedded store (with a
//! manual clock) and against a real `redis-server` (on Redis's own clock, waiting out short
//! windows for real).

use std::sync::Arc;
use std::time::Duration;

use sluice_controller::store::{LimitSpec, ManualClock, MemoryStore, Outcome, RedisStore, Store};
use sluice_e2e::{unique_name, RedisServer};

const HOUR_MS: u64 = 3_600_000;

struct Subject {
    store: Arc<dyn Store>,
    clock: Option<Arc<ManualClock>>,
    redis: Option<RedisServer>,
}

impl Subject {
    fn memory() -> Subject {
        // Somewhere inside a window, as real time would be.
        let clock = ManualClock::starting_at(1_800_000_000_250);
        Subject {
            store: Arc::new(MemoryStore::new(clock.clone())),
            clock: Some(clock),
            redis: None,
        }
    }

    fn redis() -> Subject {
        let redis = RedisServer::start();
        let store = RedisStore::new(&redis.url(), Duration::from_secs(2)).expect("redis store");
        Subject {
            store: Arc::new(store),
            clock: None,
            redis: Some(redis),
        }
    }

    async fn advance(&self, ms: u64) {
        match &self.clock {
            Some(clock) => clock.advance(ms),
            None => tokio::time::sleep(Duration::from_millis(ms)).await,
        }
    }

    async fn check(&self, limits: &[LimitSpec], cost: u64) -> Outcome {
        let outcome = self
            .store
            .fixed_window(limits, cost)
            .await
            .expect("store answers");
        assert_eq!(outcome.states.len(), limits.len(), "{outcome:?}");
        outcome
    }

    async fn check_one(&self, limit: &LimitSpec, cost: u64) -> Outcome {
        self.check(std::slice::from_ref(limit), cost).await
    }
}

fn limit(limit: u64, window_ms: u64) -> LimitSpec {
    LimitSpec {
        key: unique_name("sluice:{conformance}:fixed_window:r"),
        limit,
        window_ms,
    }
}

async fn admits_up_to_the_limit_then_denies(subject: Subject) {
    let spec = limit(3, HOUR_MS);
    for expected in 1..=3 {
        let outcome = subject.check_one(&spec, 1).await;
        assert!(outcome.allowed(), "{outcome:?}");
        assert_eq!(outcome.states[0].count, expected);
        assert!(
            (1..=HOUR_MS).contains(&outcome.states[0].reset_ms),
            "{outcome:?}"
        );
    }
    let outcome = subject.check_one(&spec, 1).await;
    assert_eq!(outcome.denied_by, Some(0));
    assert_eq!(
        outcome.states[0].count, 3,
        "a denied request is not counted"
    );
}

async fn the_next_window_starts_afresh(subject: Subject) {
    let spec = limit(2, 400);
    let mut first = subject.check_one(&spec, 0).await;
    if first.states[0].reset_ms < 150 {
        // Too close to a boundary to use two requests' worth of this window: wait it out.
        subject.advance(first.states[0].reset_ms + 10).await;
        first = subject.check_one(&spec, 0).await;
    }
    assert!(first.states[0].reset_ms <= 400, "{first:?}");
    assert!(subject.check_one(&spec, 1).await.allowed());
    assert!(subject.check_one(&spec, 1).await.allowed());
    let denied = subject.check_one(&spec, 1).await;
    assert_eq!(denied.denied_by, Some(0));
    subject.advance(denied.states[0].reset_ms + 10).await;
    let reopened = subject.check_one(&spec, 1).await;
    assert!(reopened.allowed(), "{reopened:?}");
    assert_eq!(reopened.states[0].count, 1);
}

async fn a_denied_request_consumes_from_no_limit(subject: Subject) {
    let (roomy, tight) = (limit(5, HOUR_MS), limit(1, HOUR_MS));
    let both = [roomy.clone(), tight.clone()];
    assert!(subject.check(&both, 1).await.allowed());
    let denied = subject.check(&both, 1).await;
    assert_eq!(denied.denied_by, Some(1), "{denied:?}");
    assert_eq!(
        denied.states[0].count, 1,
        "the roomy limit must not count a denied request"
    );
    let roomy_alone = subject.check_one(&roomy, 1).await;
    assert_eq!(roomy_alone.states[0].count, 2);
}

async fn cost_counts_and_zero_cost_only_reads(subject: Subject) {
    let spec = limit(5, HOUR_MS);
    assert_eq!(subject.check_one(&spec, 4).await.states[0].count, 4);
    let read = subject.check_one(&spec, 0).await;
    assert!(read.allowed());
    assert_eq!(read.states[0].count, 4);
    let too_costly = subject.check_one(&spec, 2).await;
    assert_eq!(too_costly.denied_by, Some(0));
    assert_eq!(too_costly.states[0].count, 4);
    let fits = subject.check_one(&spec, 1).await;
    assert!(fits.allowed());
    assert_eq!(fits.states[0].count, 5);
    let above_capacity = subject.check(&[limit(3, HOUR_MS)], 4).await;
    assert_eq!(above_capacity.denied_by, Some(0));
}

async fn limit_zero_blocks_everything(subject: Subject) {
    let spec = limit(0, HOUR_MS);
    for _ in 0..3 {
        let outcome = subject.check_one(&spec, 1).await;
        assert_eq!(outcome.denied_by, Some(0));
        assert_eq!(outcome.states[0].count, 0);
    }
}

async fn huge_limits_count_without_overflow(subject: Subject) {
    let spec = limit(1_000_000_000_000_000, HOUR_MS);
    let outcome = subject.check_one(&spec, 1_000_000).await;
    assert!(outcome.allowed());
    assert_eq!(outcome.states[0].count, 1_000_000);
    let outcome = subject.check_one(&spec, 1).await;
    assert_eq!(outcome.states[0].count, 1_000_001);
}

async fn keys_count_independently(subject: Subject) {
    let (a, b) = (limit(1, HOUR_MS), limit(1, HOUR_MS));
    assert!(subject.check_one(&a, 1).await.allowed());
    assert!(!subject.check_one(&a, 1).await.allowed());
    assert!(subject.check_one(&b, 1).await.allowed());
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
    };
}

every_store!(
    admits_up_to_the_limit_then_denies,
    the_next_window_starts_afresh,
    a_denied_request_consumes_from_no_limit,
    cost_counts_and_zero_cost_only_reads,
    limit_zero_blocks_everything,
    huge_limits_count_without_overflow,
    keys_count_independently,
);

/// Redis-only: every key written carries a TTL no longer than its window.
#[tokio::test]
async fn redis_keys_expire_with_their_window() {
    let subject = Subject::redis();
    let spec = limit(10, 60_000);
    subject.check_one(&spec, 1).await;
    let mut connection = subject.redis.as_ref().expect("redis subject").connection();
    let ttl: i64 = ::redis::cmd("PTTL")
        .arg(&spec.key)
        .query(&mut connection)
        .expect("PTTL");
    assert!(ttl > 0 && ttl <= 60_000, "PTTL {ttl}");
}

/// Redis-only: a script flushed from the server's cache (restart, failover) is reloaded.
#[tokio::test]
async fn redis_reloads_a_flushed_script() {
    let subject = Subject::redis();
    let spec = limit(10, HOUR_MS);
    subject.check_one(&spec, 1).await;
    let mut connection = subject.redis.as_ref().expect("redis subject").connection();
    let _: () = ::redis::cmd("SCRIPT")
        .arg("FLUSH")
        .query(&mut connection)
        .expect("SCRIPT FLUSH");
    assert_eq!(subject.check_one(&spec, 1).await.states[0].count, 2);
}
