//! What the README promises about the controller, checked against the real binary (on its
//! embedded store and on a real `redis-server`): requests that can never pass are denied
//! without the store, a rule's own cost, a concurrency rule in shadow, held leaky-bucket
//! answers, and one Redis connection for every check.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Barrier;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use sluice_e2e::controller::ControllerOptions;
use sluice_e2e::http::{get, post_check};
use sluice_e2e::{Controller, RedisServer};
use sluice_protocol::headers::denied_body;
use sluice_protocol::{CheckResponse, Decision, DenyReason};

/// A controller on Redis when `redis` is given, else on its embedded store.
fn controller(rules: &str, redis: Option<&RedisServer>) -> Controller {
    let url = redis.map(RedisServer::url);
    Controller::start_with(&ControllerOptions::new(rules, url.as_deref()))
}

/// One check of `path` at `cost` for one client.
fn check(path: &str, cost: u64) -> Value {
    json!({ "client": { "kind": "ip", "value": "198.51.100.7" }, "path": path, "cost": cost })
}

/// `POST /v1/check` with `body`; the call must succeed.
fn call(controller: &Controller, body: &Value) -> Vec<Decision> {
    let response = post_check(&controller.url("/v1/check"), body).expect("check call");
    assert_eq!(response.status, 200, "{response:?}");
    let parsed: CheckResponse = serde_json::from_value(response.json()).expect("a check reply");
    parsed.decisions
}

/// The decisions for `checks`, in one call.
fn decide(controller: &Controller, checks: &[Value]) -> Vec<Decision> {
    let decisions = call(controller, &json!({ "checks": checks }));
    assert_eq!(decisions.len(), checks.len(), "{decisions:?}");
    decisions
}

fn decide_one(controller: &Controller, path: &str, cost: u64) -> Decision {
    decide(controller, &[check(path, cost)]).remove(0)
}

/// Keys in the Redis database.
/// Counters in the Redis database (the configuration's own keys left out).
fn dbsize(redis: &RedisServer) -> u64 {
    let keys: Vec<String> = ::redis::cmd("KEYS")
        .arg("sluice:*")
        .query(&mut redis.connection())
        .expect("KEYS");
    keys.iter()
        .filter(|key| sluice_controller::keys::counter_of(key).is_some())
        .count() as u64
}

/// Scripts Redis has run (`EVALSHA`, and `EVAL` should the controller ever send the body).
fn script_calls(redis: &RedisServer) -> u64 {
    redis.calls("evalsha") + redis.calls("eval")
}

/// Runs a scenario on the embedded store and on Redis, as a test each.
macro_rules! on_both_stores {
    ($($scenario:ident),* $(,)?) => {
        mod embedded {
            $(#[test]
            fn $scenario() {
                super::$scenario(None);
            })*
        }
        mod redis {
            $(#[test]
            fn $scenario() {
                let redis = sluice_e2e::RedisServer::start();
                super::$scenario(Some(&redis));
            })*
        }
    };
}

// ---- never admitted: limit 0, a cost above capacity -----------------------------------------

const NEVER_RULES: &str = r#"
[[rules]]
name = "closed"
limit = 0
window = "1m"
match = { path_prefix = "/closed" }

[[rules]]
name = "small"
limit = 5
window = "1h"
match = { path_prefix = "/small" }

[[rules]]
name = "bucket"
strategy = "token_bucket"
limit = 5
window = "1h"
burst = 3
match = { path_prefix = "/bucket" }

# A queue of 3: one at once, then one every 500 ms for up to 1 s.
[[rules]]
name = "queue"
strategy = "leaky_bucket"
limit = 2
window = "1s"
max_delay = "1s"
match = { path_prefix = "/queue" }
"#;

#[test]
fn requests_that_can_never_pass_are_denied_without_touching_the_store() {
    let redis = RedisServer::start();
    let controller = controller(NEVER_RULES, Some(&redis));
    let scripts_before = script_calls(&redis);
    let never = [
        check("/closed", 1),
        check("/small", 6),
        // Within the bucket's rate (5) but above its burst (3): the burst is what it holds.
        check("/bucket", 4),
        // More places than the queue has: admitting it with no wait would hold everyone
        // behind it far longer than max_delay.
        check("/queue", 4),
    ];
    // Each on its own call, and all in one: no call reaches the store.
    let mut decisions: Vec<Decision> = never
        .iter()
        .map(|one| decide(&controller, std::slice::from_ref(one)).remove(0))
        .collect();
    decisions.extend(decide(&controller, &never));
    let expected = [
        (
            "closed",
            DenyReason::LimitZero,
            "Rate limit `closed` admits no requests at the moment.",
        ),
        (
            "small",
            DenyReason::CostExceedsCapacity,
            "This request costs more than rate limit `small` can ever admit (5); it will not pass.",
        ),
        (
            "bucket",
            DenyReason::CostExceedsCapacity,
            "This request costs more than rate limit `bucket` can ever admit (3); it will not pass.",
        ),
        (
            "queue",
            DenyReason::CostExceedsCapacity,
            "This request costs more than rate limit `queue` can ever admit (3); it will not pass.",
        ),
    ];
    for (decision, (rule, reason, message)) in decisions.iter().zip(expected.iter().cycle()) {
        assert!(!decision.allowed, "{decision:?}");
        let policy = decision.policy.as_ref().expect("the rule that denied");
        assert_eq!(
            (policy.rule.as_str(), policy.reason),
            (*rule, Some(*reason)),
            "{decision:?}"
        );
        assert_eq!(denied_body(policy, None).message, *message);
    }
    assert_eq!(
        script_calls(&redis),
        scripts_before,
        "a check that can never pass ran a script"
    );
    assert_eq!(dbsize(&redis), 0, "a check that can never pass wrote a key");

    // The same checks at a cost they can pass do reach the store.
    let allowed = decide(
        &controller,
        &[check("/small", 5), check("/bucket", 3), check("/queue", 3)],
    );
    assert!(allowed.iter().all(|d| d.allowed), "{allowed:?}");
    assert!(allowed
        .iter()
        .all(|d| d.policy.as_ref().unwrap().reason.is_none()));
    assert!(
        script_calls(&redis) > scripts_before,
        "admitted checks ran no script"
    );
    assert_eq!(dbsize(&redis), 3);
}

// ---- a rule's own cost ----------------------------------------------------------------------

/// A sliding log, so that no window boundary can fall between the checks.
const COST_RULES: &str = r#"
[[rules]]
name = "priced"
strategy = "sliding_window_log"
limit = 10
window = "1h"
cost = 4
match = { path_prefix = "/priced" }

[[rules]]
name = "by-request"
strategy = "sliding_window_log"
limit = 10
window = "1h"
match = { path_prefix = "/by-request" }
"#;

fn a_rules_cost_replaces_the_cost_the_request_sends(redis: Option<&RedisServer>) {
    let controller = controller(COST_RULES, redis);
    let counted: Vec<(bool, u64)> = [1, 100, 1]
        .into_iter()
        .map(|cost| {
            let decision = decide_one(&controller, "/priced", cost);
            let policy = decision.policy.expect("the rule");
            assert_eq!(policy.reason, None, "cost {cost} was not the rule's");
            (decision.allowed, policy.remaining)
        })
        .collect();
    assert_eq!(counted, [(true, 6), (true, 2), (false, 2)]);
    // Without a cost of its own, a rule counts what the request sends.
    let decision = decide_one(&controller, "/by-request", 3);
    assert_eq!(
        (
            decision.allowed,
            decision.policy.expect("the rule").remaining
        ),
        (true, 7)
    );
}

// ---- a concurrency rule in shadow -----------------------------------------------------------

const SHADOW_SLOT_RULES: &str = r#"
[[rules]]
name = "tried-out"
strategy = "concurrency"
limit = 1
lease = "1h"
shadow = true
match = { path_prefix = "/shadow" }

[[rules]]
name = "enforced"
strategy = "concurrency"
limit = 1
lease = "1h"
match = { path_prefix = "/enforced" }
"#;

fn a_concurrency_rule_in_shadow_takes_no_slot(redis: Option<&RedisServer>) {
    let controller = controller(SHADOW_SLOT_RULES, redis);
    for n in 0..3 {
        let decision = decide_one(&controller, "/shadow", 1);
        assert!(decision.allowed, "check {n}: {decision:?}");
        assert!(!decision.shadow_denied, "check {n}: {decision:?}");
        assert!(decision.leases.is_empty(), "check {n}: {decision:?}");
        let policy = decision.policy.expect("the shadow rule reports");
        assert_eq!(
            (policy.rule.as_str(), policy.remaining),
            ("tried-out", 1),
            "check {n}"
        );
    }
    if let Some(redis) = redis {
        assert_eq!(dbsize(redis), 0, "a shadow concurrency rule wrote a key");
    }

    // The same rule enforced: the first check holds the slot, the second finds none.
    let first = decide_one(&controller, "/enforced", 1);
    assert!(first.allowed, "{first:?}");
    assert_eq!(first.leases.len(), 1, "{first:?}");
    assert_eq!(first.policy.expect("the rule").remaining, 0);
    let second = decide_one(&controller, "/enforced", 1);
    assert!(!second.allowed, "{second:?}");
    assert!(second.leases.is_empty(), "{second:?}");
    if let Some(redis) = redis {
        assert_eq!(dbsize(redis), 1, "the enforced slot is a key");
    }
}

// ---- leaky bucket: the answer waits for the slot ----------------------------------------------

const QUEUE_RULES: &str = r#"
[[rules]]
name = "queue"
strategy = "leaky_bucket"
limit = 1
window = "2s"
max_delay = "10s"
"#;

/// A few milliseconds for the rounding of timers: the held answer comes no sooner than
/// its delay, less this.
const TIMER_SLACK: Duration = Duration::from_millis(5);

/// Decides one check for `client` (`hold_delays` as given, or left to its default), and
/// how long the answer took.
fn timed_check(
    controller: &Controller,
    client: &str,
    hold_delays: Option<bool>,
) -> (u64, Duration) {
    let mut body = json!({ "checks": [{ "client": { "kind": "ip", "value": client } }] });
    if let Some(hold) = hold_delays {
        body["hold_delays"] = json!(hold);
    }
    let started = Instant::now();
    let decisions = call(controller, &body);
    let took = started.elapsed();
    let decision = &decisions[0];
    assert!(decision.allowed, "{decision:?}");
    (decision.policy.as_ref().expect("the rule").delay_ms, took)
}

fn leaky_bucket_answers_wait_for_the_slot_unless_the_call_holds_them_itself(
    redis: Option<&RedisServer>,
) {
    let controller = controller(QUEUE_RULES, redis);

    // Held (the default): the first request's slot is now, the second's one slot later.
    let (delay, _) = timed_check(&controller, "192.0.2.1", None);
    assert_eq!(delay, 0);
    let (delay, took) = timed_check(&controller, "192.0.2.1", None);
    assert!(delay > 1_000, "the second slot is {delay} ms away");
    assert!(
        took + TIMER_SLACK >= Duration::from_millis(delay),
        "answered after {took:?}, before its slot {delay} ms away"
    );

    // Not held: the answer comes at once and says how long the request must wait.
    let (delay, _) = timed_check(&controller, "192.0.2.2", Some(false));
    assert_eq!(delay, 0);
    let (delay, took) = timed_check(&controller, "192.0.2.2", Some(false));
    assert!(delay > 1_000, "the second slot is {delay} ms away");
    assert!(
        took < Duration::from_millis(delay),
        "held for {took:?} although the call holds delays itself ({delay} ms)"
    );
}

on_both_stores!(
    a_rules_cost_replaces_the_cost_the_request_sends,
    a_concurrency_rule_in_shadow_takes_no_slot,
    leaky_bucket_answers_wait_for_the_slot_unless_the_call_holds_them_itself,
);

// ---- one Redis connection ---------------------------------------------------------------------

const BURST: usize = 64;

/// Redis's clients other than the inspecting connections: the controller's.
fn controller_connections(redis: &RedisServer) -> Vec<String> {
    redis
        .other_clients()
        .into_iter()
        // Left over from an earlier inspection, not yet closed on the server's side.
        .filter(|client| !client.contains(" cmd=info") && !client.contains(" cmd=dbsize"))
        .collect()
}

#[test]
fn concurrent_checks_share_one_redis_connection() {
    let redis = RedisServer::start();
    let controller = controller(
        "[[rules]]\nname = \"per-client\"\nlimit = 1000\nwindow = \"1h\"\n",
        Some(&redis),
    );
    let ready = get(&controller.url("/readyz")).expect("readyz");
    assert_eq!(ready.status, 200, "{ready:?}");
    assert_eq!(controller_connections(&redis).len(), 1, "before the burst");

    let url = controller.url("/v1/check");
    // One check first, so that the script is loaded (a first EVALSHA may be refused with
    // NOSCRIPT and sent again): from then on, one script call per check call.
    let warm_up = post_check(&url, &json!({ "checks": [check("/warm-up", 1)] })).expect("a check");
    assert_eq!(warm_up.status, 200, "{warm_up:?}");
    let scripts_before = script_calls(&redis);
    let start = Barrier::new(BURST + 1);
    let finished = AtomicUsize::new(0);
    let (statuses, most, looks) = std::thread::scope(|scope| {
        let clients: Vec<_> = (0..BURST)
            .map(|n| {
                let (url, start, finished) = (&url, &start, &finished);
                scope.spawn(move || {
                    let body = json!({ "checks": [check(&format!("/burst/{n}"), 1)] });
                    start.wait();
                    let response = post_check(url, &body);
                    finished.fetch_add(1, Ordering::SeqCst);
                    response.expect("check call").status
                })
            })
            .collect();
        // Watch the server's clients for as long as the burst lasts.
        start.wait();
        let deadline = Instant::now() + Duration::from_secs(30);
        let (mut most, mut looks) = (0, 0);
        while finished.load(Ordering::SeqCst) < BURST {
            assert!(Instant::now() < deadline, "the burst did not end");
            most = most.max(controller_connections(&redis).len());
            looks += 1;
        }
        let statuses: Vec<u16> = clients.into_iter().map(|c| c.join().unwrap()).collect();
        (statuses, most, looks)
    });
    assert!(statuses.iter().all(|&s| s == 200), "{statuses:?}");
    assert!(looks > 0, "the burst was never watched");
    assert_eq!(
        most, 1,
        "connections from the controller during the burst ({looks} looks)"
    );
    let after = controller_connections(&redis);
    assert_eq!(after.len(), 1, "after the burst: {after:?}");
    // Every check went through that one connection, one script call each.
    assert_eq!(script_calls(&redis) - scripts_before, BURST as u64);
    assert_eq!(dbsize(&redis), 1);
}
