//! Running the limiter, in process on the embedded stores: tiers' limits per system state,
//! the state set by an operator or by the automatic signal (hysteresis, dwell, pinning),
//! the emergency switch (global and per rule), unknown API keys refused, the filters'
//! reports, and brute-force protection's blocks and releases.

mod support;

use std::collections::HashMap;

use axum::http::StatusCode;
use serde_json::{json, Value};
use sluice_controller::automatic::{self, Signals};
use sluice_controller::protection;
use support::{call, post, world, World, ADMIN_TOKEN};

const DIGEST: &str = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";
const UNKNOWN_DIGEST: &str = "2c26b46b68ffc68ff99b453c1d30413413422d706483bfa0f98a5e886266e7ae";

/// The demo's shape: free bursts to 20 over 10/min and gets 2/min when DEGRADED; pro keeps
/// 100 (bursting to 150 when NORMAL); enterprise has 1000 in every state.
const TIERS: &str = r#"
[[tiers]]
name = "free"
limit = 10
window = "1m"
burst = 20
degraded = { limit = 2, window = "1m" }

[[tiers]]
name = "pro"
limit = 100
window = "1m"
burst = 150
degraded = { limit = 100, window = "1m" }

[[tiers]]
name = "enterprise"
limit = 1000
window = "1m"

[[rules]]
name = "per-tier"
strategy = "token_bucket"
limit = 10
window = "1m"
tier_limits = true

[[rules]]
name = "login"
limit = 2
window = "1m"
match = { path_prefix = "/login" }
"#;

async fn admin(world: &World, method: &str, path: &str, body: Value) -> (StatusCode, Value) {
    let reply = call(
        &world.admin,
        method,
        path,
        Some(ADMIN_TOKEN),
        &[],
        Some(&body.to_string()),
    )
    .await;
    (reply.status, reply.json())
}

async fn get(world: &World, path: &str) -> Value {
    let reply = call(&world.admin, "GET", path, Some(ADMIN_TOKEN), &[], None).await;
    assert_eq!(reply.status, StatusCode::OK, "{path}: {}", reply.text);
    reply.json()
}

async fn check(world: &World, one: Value) -> Value {
    let (status, body) = post(
        &world.check,
        "/v1/check",
        json!({ "checks": [one], "hold_delays": false }),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    body["decisions"][0].clone()
}

fn of_tier(user: &str, tier: &str) -> Value {
    json!({ "client": { "kind": "user", "value": user }, "user": user, "tier": tier,
            "ip": "10.0.0.1", "path": "/api" })
}

/// How many of `n` checks are admitted.
async fn admitted(world: &World, one: &Value, n: usize) -> usize {
    let mut admitted = 0;
    for _ in 0..n {
        if check(world, one.clone()).await["allowed"] == true {
            admitted += 1;
        }
    }
    admitted
}

async fn set_state(world: &World, state: &str) -> Value {
    let (status, body) = admin(world, "PUT", "/v1/admin/state", json!({ "state": state })).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    body
}

async fn audit_newest(world: &World) -> Value {
    get(world, "/v1/admin/audit?limit=1").await["entries"][0].clone()
}

// ----- tiers per system state ----------------------------------------------------------------

#[tokio::test]
async fn each_tier_gets_its_limits_of_the_state_in_force() {
    let world = world(TIERS).await;
    // NORMAL: free bursts to 20, pro to 150.
    assert_eq!(admitted(&world, &of_tier("f1", "free"), 25).await, 20);
    assert_eq!(admitted(&world, &of_tier("p1", "pro"), 160).await, 150);
    let decision = check(&world, of_tier("f2", "free")).await;
    assert_eq!(
        decision["policy"]["limit"], 20,
        "the headers' limit: {decision}"
    );

    set_state(&world, "DEGRADED").await;
    let decision = check(&world, of_tier("f3", "free")).await;
    assert_eq!(decision["policy"]["limit"], 2, "free is shed: {decision}");
    assert_eq!(admitted(&world, &of_tier("f4", "free"), 10).await, 2);
    assert_eq!(
        admitted(&world, &of_tier("p2", "pro"), 110).await,
        100,
        "pro keeps 100"
    );
    assert_eq!(
        admitted(&world, &of_tier("e1", "enterprise"), 1001).await,
        1000,
        "enterprise has no DEGRADED limits of its own: the same in every state"
    );

    set_state(&world, "NORMAL").await;
    assert_eq!(
        admitted(&world, &of_tier("f5", "free"), 25).await,
        20,
        "bursts again"
    );
    // The config view the filters read names the version of the state change.
    let view = call(&world.check, "GET", "/v1/config", None, &[], None).await;
    assert_eq!(view.etag.as_deref(), Some("\"3\""));
}

// ----- the automatic state -------------------------------------------------------------------

const AUTOMATIC: &str = r#"
[automatic_state]
enter_share = 0.2
leave_share = 0.05
window = "10s"
dwell = "30s"
min_responses = 50
"#;

fn now_ms() -> u64 {
    sluice_controller::store::now_ms()
}

async fn state(world: &World) -> Value {
    get(world, "/v1/admin/state").await
}

#[tokio::test]
async fn the_signal_changes_the_state_once_each_way_with_hysteresis_and_dwell() {
    let world = world(&format!("{TIERS}{AUTOMATIC}")).await;
    let (live, signals, metrics) = (&world.live, &world.signals, &world.metrics);
    let start = now_ms();
    // 10 % errors: between the thresholds, nothing happens.
    signals.report(start, 100, 10);
    automatic::decide(live, signals, metrics, start).await;
    assert_eq!(state(&world).await["state"], "NORMAL");
    // Too few answers decide nothing, whatever their share.
    let quiet = Signals::default();
    quiet.report(start, 49, 49);
    automatic::decide(live, &quiet, metrics, start).await;
    assert_eq!(state(&world).await["state"], "NORMAL");
    // 30 % over the window: DEGRADED, once.
    signals.report(start + 1_000, 100, 50);
    automatic::decide(live, signals, metrics, start + 1_000).await;
    let after = state(&world).await;
    assert_eq!(after["state"], "DEGRADED", "{after}");
    assert_eq!(after["automatic"], true);
    let entry = audit_newest(&world).await;
    assert_eq!(entry["actor"], "automatic", "{entry}");
    assert_eq!(entry["action"], "state.auto");
    assert_eq!(entry["change"]["to"], "DEGRADED");
    assert_eq!(entry["change"]["responses"], 200);
    assert_eq!(entry["change"]["server_errors"], 60);
    let version = get(&world, "/v1/admin/version").await["version"].clone();
    automatic::decide(live, signals, metrics, start + 2_000).await;
    assert_eq!(
        get(&world, "/v1/admin/version").await["version"],
        version,
        "no second transition"
    );
    // Healthy again (0 %), but within the dwell: it stays.
    let healthy = Signals::default();
    healthy.report(start + 20_000, 500, 0);
    automatic::decide(live, &healthy, metrics, start + 20_000).await;
    assert_eq!(state(&world).await["state"], "DEGRADED", "within the dwell");
    // 10 %, past the dwell: between the thresholds, it stays.
    let middling = Signals::default();
    middling.report(start + 40_000, 100, 10);
    automatic::decide(live, &middling, metrics, start + 40_000).await;
    assert_eq!(
        state(&world).await["state"],
        "DEGRADED",
        "above leave_share"
    );
    // 4 %, past the dwell: NORMAL.
    let better = Signals::default();
    better.report(start + 41_000, 100, 4);
    automatic::decide(live, &better, metrics, start + 41_000).await;
    assert_eq!(state(&world).await["state"], "NORMAL");
    let scraped = call(&world.admin, "GET", "/metrics", None, &[], None).await;
    for line in [
        r#"sluice_state_transitions_total{to="DEGRADED",by="automatic"} 1"#,
        r#"sluice_state_transitions_total{to="NORMAL",by="automatic"} 1"#,
    ] {
        assert!(scraped.text.contains(line), "{line} in\n{}", scraped.text);
    }
}

#[tokio::test]
async fn an_operator_pins_the_state_until_handing_it_back() {
    let world = world(&format!("{TIERS}{AUTOMATIC}")).await;
    let (live, metrics) = (&world.live, &world.metrics);
    set_state(&world, "NORMAL").await;
    let start = now_ms();
    let failing = Signals::default();
    failing.report(start + 31_000, 100, 90);
    automatic::decide(live, &failing, metrics, start + 31_000).await;
    assert_eq!(state(&world).await["state"], "NORMAL", "pinned");
    let (status, body) = admin(
        &world,
        "PUT",
        "/v1/admin/state",
        json!({ "automatic": true }),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    automatic::decide(live, &failing, metrics, start + 31_000).await;
    assert_eq!(state(&world).await["state"], "DEGRADED", "handed back");
}

#[tokio::test]
async fn reports_feed_the_signal_and_bad_ones_are_refused_naming_the_field() {
    let world = world(AUTOMATIC).await;
    let (status, _) = post_report(&world, json!({ "responses": 10, "server_errors": 3 })).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    assert_eq!(world.signals.over(now_ms(), 10_000), (10, 3));
    // At most 256 addresses a report: 256 are taken, 257 refused whole.
    let addresses = |n: usize| -> Vec<Value> {
        (0..n)
            .map(|i| json!({ "ip": format!("10.0.{}.{}", i / 256, i % 256), "count": 1 }))
            .collect()
    };
    let (status, body) = post_report_as(
        &world,
        Some("another-worker"),
        json!({ "invalid_tokens": addresses(256) }),
    )
    .await;
    assert_eq!(status, StatusCode::NO_CONTENT, "{body}");
    let (status, body) = post_report(&world, json!({ "invalid_tokens": addresses(257) })).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(body["field"], "invalid_tokens", "{body}");
    let (status, body) = post_report(&world, json!({ "responses": -1 })).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(body["field"], "responses", "{body}");
}

/// One reporter (one filter worker) is counted once a second, and at most what one worker
/// can see: a flood of reports from it, or one report past the bound, cannot make the signal
/// say more than its own traffic did.
#[tokio::test]
async fn one_reporter_is_counted_once_a_second_and_at_most_what_it_can_see() {
    let world = world(AUTOMATIC).await;
    // Within one wall-clock second, if the second turns meanwhile the first report of the
    // next one counts too: at most two seconds' worth.
    for _ in 0..50 {
        let (status, _) = post_report_as(
            &world,
            Some("worker-a"),
            json!({ "responses": 1_000, "server_errors": 1_000 }),
        )
        .await;
        assert_eq!(status, StatusCode::NO_CONTENT);
    }
    let (responses, errors) = world.signals.over(now_ms(), 10_000);
    assert!(
        (1_000..=2_000).contains(&responses) && errors == responses,
        "one worker's flood counted as {responses} answers"
    );
    // Another worker counts for its own share.
    let (status, _) = post_report_as(&world, Some("worker-b"), json!({ "responses": 500 })).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    assert_eq!(world.signals.over(now_ms(), 10_000).0, responses + 500);
    // One report past what one worker can see is refused whole.
    let (status, body) = post_report_as(
        &world,
        Some("worker-c"),
        json!({ "responses": 1_000_000, "server_errors": 1_000_000 }),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(body["field"], "responses", "{body}");
    assert_eq!(world.signals.over(now_ms(), 10_000).0, responses + 500);
}

async fn post_report(world: &World, body: Value) -> (StatusCode, Value) {
    post_report_as(world, None, body).await
}

async fn post_report_as(world: &World, reporter: Option<&str>, body: Value) -> (StatusCode, Value) {
    let headers: Vec<(&str, &str)> = reporter
        .map(|name| ("x-sluice-reporter", name))
        .into_iter()
        .collect();
    let reply = call(
        &world.check,
        "POST",
        "/v1/report",
        None,
        &headers,
        Some(&body.to_string()),
    )
    .await;
    let json = if reply.text.is_empty() {
        Value::Null
    } else {
        reply.json()
    };
    (reply.status, json)
}

// ----- the emergency switch ------------------------------------------------------------------

fn login(ip: &str) -> Value {
    json!({ "client": { "kind": "ip", "value": ip }, "ip": ip, "path": "/login" })
}

#[tokio::test]
async fn switched_off_nothing_is_refused_but_would_be_limits_still_show() {
    let world = world(TIERS).await;
    assert_eq!(admitted(&world, &login("10.1.0.1"), 3).await, 2);
    let (status, body) = admin(
        &world,
        "PUT",
        "/v1/admin/enforcement",
        json!({ "enforce": false }),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body, json!({ "enforce": false, "unenforced_rules": [] }));
    let decision = check(&world, login("10.1.0.1")).await;
    assert_eq!(decision["allowed"], true, "{decision}");
    assert_eq!(
        decision["shadow_denied"], true,
        "would have been limited: {decision}"
    );
    // Still counted: a fresh client's counter goes down as before.
    check(&world, login("10.1.0.2")).await;
    let decision = check(&world, login("10.1.0.2")).await;
    assert_eq!(decision["policy"]["remaining"], 0, "{decision}");
    let view = call(&world.check, "GET", "/v1/config", None, &[], None)
        .await
        .json();
    assert_eq!(view["enforce"], false, "the filters fail open too");
    assert!(
        view["rules"]
            .as_array()
            .unwrap()
            .iter()
            .all(|r| r["shadow"] == true),
        "{view}"
    );
    let (status, _) = admin(
        &world,
        "PUT",
        "/v1/admin/enforcement",
        json!({ "enforce": true }),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        check(&world, login("10.1.0.1")).await["allowed"],
        false,
        "enforced again"
    );
    let view = call(&world.check, "GET", "/v1/config", None, &[], None)
        .await
        .json();
    assert_eq!(view["enforce"], true);
}

#[tokio::test]
async fn one_rule_can_be_switched_off_alone() {
    let world = world(TIERS).await;
    let (status, body) = admin(
        &world,
        "PUT",
        "/v1/admin/enforcement",
        json!({ "enforce": false, "rule": "login" }),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["unenforced_rules"], json!(["login"]));
    let entry = audit_newest(&world).await;
    assert_eq!(entry["action"], "enforcement.set");
    assert_eq!(entry["target"], "login off");
    assert_eq!(
        admitted(&world, &login("10.2.0.1"), 5).await,
        5,
        "login is not enforced"
    );
    // Another rule still is.
    assert_eq!(admitted(&world, &of_tier("f1", "free"), 25).await, 20);
    let (status, body) = admin(
        &world,
        "PUT",
        "/v1/admin/enforcement",
        json!({ "enforce": false, "rule": "nope" }),
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    admin(
        &world,
        "PUT",
        "/v1/admin/enforcement",
        json!({ "enforce": true, "rule": "login" }),
    )
    .await;
    assert_eq!(
        get(&world, "/v1/admin/enforcement").await["unenforced_rules"],
        json!([])
    );
    assert_eq!(admitted(&world, &login("10.2.0.2"), 3).await, 2);
}

// ----- unknown API keys and brute-force protection -------------------------------------------

const PROTECTED: &str = r#"
[[rules]]
name = "per-client"
limit = 100
window = "1m"

[[api_keys]]
sha256 = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
user = "acme"

[protection]
invalid_credentials = 3
window = "1m"
block = "10m"
unknown_api_keys = "reject"
"#;

fn by_key(digest: &str, ip: &str) -> Value {
    json!({ "client": { "kind": "api_key", "value": digest }, "api_key": digest, "ip": ip,
            "path": "/" })
}

#[tokio::test]
async fn unknown_api_keys_are_refused_only_where_configured() {
    let world = world(PROTECTED).await;
    let known = check(&world, by_key(DIGEST, "10.3.0.1")).await;
    assert_eq!(known["allowed"], true, "{known}");
    let unknown = check(&world, by_key(UNKNOWN_DIGEST, "10.3.0.1")).await;
    assert_eq!(unknown["allowed"], false, "{unknown}");
    assert_eq!(unknown["refused"], "unknown_api_key");
    assert!(
        unknown.get("policy").is_none(),
        "no limit speaks: {unknown}"
    );
    // Switched off, nothing is refused.
    admin(
        &world,
        "PUT",
        "/v1/admin/enforcement",
        json!({ "enforce": false }),
    )
    .await;
    assert_eq!(
        check(&world, by_key(UNKNOWN_DIGEST, "10.3.0.1")).await["allowed"],
        true
    );
    // Without protection an unknown key is a client like any other.
    let open = world_without_protection().await;
    assert_eq!(
        check(&open, by_key(UNKNOWN_DIGEST, "10.3.0.1")).await["allowed"],
        true
    );
}

async fn world_without_protection() -> World {
    world(&PROTECTED.replace("unknown_api_keys = \"reject\"", "")).await
}

fn denylisted(view: &Value) -> Vec<String> {
    view["denylist"]
        .as_array()
        .unwrap()
        .iter()
        .map(|item| item["value"].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test]
async fn an_address_over_the_threshold_is_blocked_then_released_and_its_neighbour_never() {
    let world = world(PROTECTED).await;
    let (live, counters, metrics) = (&world.live, world.counters.as_ref(), &world.metrics);
    let guard = world.guard.as_ref();
    let now = now_ms();
    let strikes = |pairs: &[(&str, u64)]| -> HashMap<String, u64> {
        pairs.iter().map(|(ip, n)| ((*ip).to_owned(), *n)).collect()
    };
    let version = get(&world, "/v1/admin/version").await["version"].clone();
    let audit_before = audit_newest(&world).await;
    // Three invalid credentials are allowed within the window (the neighbour sends three).
    protection::round(
        guard,
        live,
        counters,
        metrics,
        strikes(&[("192.0.2.7/32", 2), ("192.0.2.8/32", 3)]),
        now,
    )
    .await;
    let first = call(&world.check, "GET", "/v1/config", None, &[], None).await;
    assert_eq!(denylisted(&first.json()), Vec::<String>::new());
    let unblocked_tag = first.etag.clone().expect("an etag");
    protection::round(
        guard,
        live,
        counters,
        metrics,
        strikes(&[("192.0.2.7/32", 2)]),
        now + 1_000,
    )
    .await;
    // The filter holding the view without the block reads it again: the tag names blocks.
    let reread = call(
        &world.check,
        "GET",
        "/v1/config",
        None,
        &[("if-none-match", unblocked_tag.as_str())],
        None,
    )
    .await;
    assert_eq!(reread.status, StatusCode::OK);
    let view = reread.json();
    assert_eq!(denylisted(&view), ["192.0.2.7/32"], "{view}");
    let expires = view["denylist"][0]["expires_at_ms"].as_u64().unwrap();
    assert_eq!(expires, now + 1_000 + 600_000);
    // Blocks live beside the configuration: no version, no audit entry, and the view says
    // the version the denial caches and leases are keyed by is the same.
    assert_eq!(view["version"], version);
    assert_eq!(get(&world, "/v1/admin/version").await["version"], version);
    assert_eq!(audit_newest(&world).await, audit_before, "no audit entry");
    let blocked_tag = reread.etag.clone().expect("an etag");
    assert_ne!(blocked_tag, unblocked_tag);
    let again = call(
        &world.check,
        "GET",
        "/v1/config",
        None,
        &[("if-none-match", blocked_tag.as_str())],
        None,
    )
    .await;
    assert_eq!(again.status, StatusCode::NOT_MODIFIED);
    let scraped = call(&world.admin, "GET", "/metrics", None, &[], None)
        .await
        .text;
    assert!(
        scraped.contains("sluice_protection_blocks_total 1"),
        "{scraped}"
    );
    // Still blocked, more strikes change nothing.
    protection::round(
        guard,
        live,
        counters,
        metrics,
        strikes(&[("192.0.2.7/32", 5)]),
        now + 2_000,
    )
    .await;
    let view = call(&world.check, "GET", "/v1/config", None, &[], None)
        .await
        .json();
    assert_eq!(denylisted(&view), ["192.0.2.7/32"], "{view}");
    assert_eq!(
        view["denylist"][0]["expires_at_ms"], expires,
        "not extended"
    );
    // Operators see it, with its end.
    let listed = get(&world, "/v1/admin/protection/blocks").await;
    assert_eq!(listed["blocks"][0]["ip"], "192.0.2.7/32", "{listed}");
    assert!(listed["blocks"][0]["until"].is_string(), "{listed}");
    // The block's end: it is gone from the view, still with no change of version.
    protection::round(guard, live, counters, metrics, HashMap::new(), expires).await;
    let view = call(&world.check, "GET", "/v1/config", None, &[], None)
        .await
        .json();
    assert_eq!(denylisted(&view), Vec::<String>::new(), "released");
    assert_eq!(get(&world, "/v1/admin/version").await["version"], version);
}

/// An operator lifts a block at once (recorded in the audit log); a reader may not, and an
/// address that is not blocked is a 404.
#[tokio::test]
async fn an_operator_lifts_a_block() {
    let world = world(PROTECTED).await;
    let now = now_ms();
    let strikes: HashMap<String, u64> = [("198.51.100.20/32".to_owned(), 4)].into();
    protection::round(
        &world.guard,
        &world.live,
        world.counters.as_ref(),
        &world.metrics,
        strikes,
        now,
    )
    .await;
    let view = call(&world.check, "GET", "/v1/config", None, &[], None)
        .await
        .json();
    assert_eq!(denylisted(&view), ["198.51.100.20/32"], "{view}");
    let as_reader = call(
        &world.admin,
        "DELETE",
        "/v1/admin/protection/blocks/198.51.100.20",
        Some(support::READ_TOKEN),
        &[],
        None,
    )
    .await;
    assert_eq!(as_reader.status, StatusCode::FORBIDDEN);
    let lifted = call(
        &world.admin,
        "DELETE",
        "/v1/admin/protection/blocks/198.51.100.20",
        Some(ADMIN_TOKEN),
        &[],
        None,
    )
    .await;
    assert_eq!(lifted.status, StatusCode::NO_CONTENT, "{}", lifted.text);
    let entry = audit_newest(&world).await;
    assert_eq!(entry["action"], "protection.lift", "{entry}");
    assert_eq!(entry["change"]["ip"], "198.51.100.20/32", "{entry}");
    // Every controller reads the blocks once a second; this one at its next round.
    protection::round(
        &world.guard,
        &world.live,
        world.counters.as_ref(),
        &world.metrics,
        HashMap::new(),
        now + 1_000,
    )
    .await;
    let view = call(&world.check, "GET", "/v1/config", None, &[], None)
        .await
        .json();
    assert_eq!(denylisted(&view), Vec::<String>::new(), "{view}");
    let again = call(
        &world.admin,
        "DELETE",
        "/v1/admin/protection/blocks/198.51.100.20",
        Some(ADMIN_TOKEN),
        &[],
        None,
    )
    .await;
    assert_eq!(again.status, StatusCode::NOT_FOUND);
    let bad = call(
        &world.admin,
        "DELETE",
        "/v1/admin/protection/blocks/not-an-address",
        Some(ADMIN_TOKEN),
        &[],
        None,
    )
    .await;
    assert_eq!(bad.status, StatusCode::BAD_REQUEST);
    assert_eq!(bad.json()["field"], "ip");
}

/// A flood of blocks (thousands of distinct addresses, IPv6 included) stays within its
/// bound, changes no version, writes nothing to the audit log, and the view stays bounded.
#[tokio::test]
async fn a_flood_of_blocks_stays_within_its_bound_and_leaves_the_configuration_alone() {
    let world = world(PROTECTED).await;
    let version = get(&world, "/v1/admin/version").await["version"].clone();
    let audit_before = audit_newest(&world).await;
    let now = now_ms();
    let flood: HashMap<String, u64> = (0..3_000u32)
        .map(|n| {
            (
                format!("10.{}.{}.{}/32", n >> 16, (n >> 8) & 255, n & 255),
                4,
            )
        })
        .chain((0..3_000u32).map(|n| (format!("2001:db8:{n:x}::/64"), 4)))
        .collect();
    protection::round(
        &world.guard,
        &world.live,
        world.counters.as_ref(),
        &world.metrics,
        flood,
        now,
    )
    .await;
    let view = call(&world.check, "GET", "/v1/config", None, &[], None)
        .await
        .json();
    let blocked = denylisted(&view);
    assert_eq!(blocked.len(), protection::MAX_BLOCKS, "bounded");
    assert!(
        blocked.iter().any(|ip| ip.contains(':')),
        "IPv6 blocked too"
    );
    assert_eq!(view["version"], version);
    assert_eq!(get(&world, "/v1/admin/version").await["version"], version);
    assert_eq!(audit_newest(&world).await, audit_before, "no audit entry");
    let scraped = call(&world.admin, "GET", "/metrics", None, &[], None)
        .await
        .text;
    assert!(
        scraped.contains(&format!(
            "sluice_protection_blocks_total {}",
            protection::MAX_BLOCKS
        )),
        "{scraped}"
    );
}

#[tokio::test]
async fn unknown_keys_from_one_address_block_it_through_the_check_path() {
    let world = world(PROTECTED).await;
    for _ in 0..4 {
        check(&world, by_key(UNKNOWN_DIGEST, "198.51.100.4")).await;
    }
    // A known key next door, as often, is never counted.
    for _ in 0..10 {
        check(&world, by_key(DIGEST, "198.51.100.5")).await;
    }
    // The guard's task counts once a second.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        let view = call(&world.check, "GET", "/v1/config", None, &[], None)
            .await
            .json();
        let listed = denylisted(&view);
        if !listed.is_empty() {
            assert_eq!(listed, ["198.51.100.4/32"]);
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "not blocked within 5 s"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}
