//! Operating the limiter through real Envoy with the real `.wasm`, controllers and Redis:
//! tiers that follow the system state (exact admissions), the state switching by itself on
//! the upstream's 5xx share the filters report (hysteresis, dwell), the emergency switch and
//! "block this client now" through the CLI, and brute-force protection.

use std::time::{Duration, Instant, SystemTime};

use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use sluice_e2e::controller::ControllerOptions;
use sluice_e2e::envoy::{sluice_plugin_config, with_fields, EnvoyOptions, Filter};
use sluice_e2e::http::{self, Response};
use sluice_e2e::{cli, Controller, Envoy, RedisServer, Upstream};

/// How soon a change must show everywhere.
const PROPAGATION: Duration = Duration::from_secs(2);

fn digest(key: &str) -> String {
    Sha256::digest(key.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn envoy_with(controllers: &[&Controller], upstream: &Upstream, plugin: Value) -> Envoy {
    let envoy = Envoy::start(&EnvoyOptions {
        filter: Filter::sluice_with(&with_fields(sluice_plugin_config("deny", 2_000), plugin)),
        upstream_port: upstream.port(),
        controller_ports: controllers.iter().map(|c| c.port).collect(),
        concurrency: 2,
        controller_http2: false,
    });
    envoy.wait_until_vms_read_the_configuration(3);
    envoy
}

fn get(envoy: &Envoy, path: &str, headers: &[(&str, &str)]) -> Response {
    http::get_with(&envoy.url(path), headers).expect("request through envoy")
}

/// How many of `n` requests with API key `key` pass.
fn admitted(envoy: &Envoy, key: &str, n: usize) -> usize {
    (0..n)
        .filter(|_| {
            let response = get(envoy, "/items", &[("x-api-key", key)]);
            assert!(matches!(response.status, 200 | 429), "{key}: {response:?}");
            response.status == 200
        })
        .count()
}

/// Polls `done` every 50 ms for at most `limit`; how long it took.
fn within(limit: Duration, what: &str, mut done: impl FnMut() -> bool) -> Duration {
    let began = Instant::now();
    while !done() {
        assert!(began.elapsed() < limit, "{what}: not within {limit:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
    began.elapsed()
}

fn audit(controller: &Controller) -> Vec<Value> {
    controller
        .admin("GET", "/v1/admin/audit?limit=1000", None)
        .json()["entries"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

// ----- tiers per system state ----------------------------------------------------------------

/// The demo's tiers, per hour so that nothing refills while a test counts: free 10 bursting
/// to 20, 2 when DEGRADED; pro 100 bursting to 150, 100 when DEGRADED; enterprise 1000.
fn tiers_config(keys: &[(&str, &str)]) -> String {
    let mut config = String::from(
        r#"
[[tiers]]
name = "free"
limit = 10
window = "1h"
burst = 20
degraded = { limit = 2, window = "1h" }

[[tiers]]
name = "pro"
limit = 100
window = "1h"
burst = 150
degraded = { limit = 100, window = "1h" }

[[tiers]]
name = "enterprise"
limit = 1000
window = "1h"

[[rules]]
name = "per-tier"
strategy = "token_bucket"
limit = 10
window = "1h"
tier_limits = true
"#,
    );
    for (key, tier) in keys {
        config.push_str(&format!(
            "\n[[api_keys]]\nsha256 = \"{}\"\nuser = \"{key}\"\ntier = \"{tier}\"\n",
            digest(key)
        ));
    }
    config
}

/// Waits until every controller runs on the version of the change just made on the first
/// of them and `shows` holds (a request through Envoy shows the change), within 2 s; how
/// long it took.
fn everywhere(controllers: &[&Controller], mut shows: impl FnMut() -> bool) -> Duration {
    let newest = controllers[0]
        .admin("GET", "/v1/admin/version", None)
        .json()["version"]
        .as_u64()
        .expect("a version");
    within(PROPAGATION, "every controller and Envoy", || {
        controllers.iter().all(|c| c.config_version() >= newest) && shows()
    })
}

#[test]
fn free_traffic_is_shed_when_degraded_while_paid_tiers_keep_their_limits_exactly() {
    let keys = [
        ("free-1", "free"),
        ("free-2", "free"),
        ("free-3", "free"),
        ("free-probe", "free"),
        ("free-back", "free"),
        ("pro-1", "pro"),
        ("pro-2", "pro"),
        ("ent-1", "enterprise"),
    ];
    let config = tiers_config(&keys);
    let redis = RedisServer::start();
    let first = Controller::start(&config, Some(&redis.url()));
    let second = Controller::start(&config, Some(&redis.url()));
    let upstream = Upstream::start();
    let envoy = envoy_with(
        &[&first, &second],
        &upstream,
        json!({ "identity": { "api_key_header": "x-api-key" } }),
    );

    // NORMAL: free bursts to 20, pro to 150; the headers show the limit in force.
    assert_eq!(admitted(&envoy, "free-1", 25), 20);
    assert_eq!(admitted(&envoy, "pro-1", 160), 150);
    let limit_of = |key: &str| {
        get(&envoy, "/items", &[("x-api-key", key)])
            .header("x-ratelimit-limit")
            .map(str::to_owned)
    };
    assert_eq!(limit_of("free-probe").as_deref(), Some("20"));

    // DEGRADED, set through the CLI on one controller: every check, whichever controller
    // Envoy asks, has free's DEGRADED limit within 2 s.
    let said = cli::run(&first, &["state", "set", "DEGRADED"]).expect("sluice state set");
    assert!(said.starts_with("DEGRADED"), "{said}");
    let took = everywhere(&[&first, &second], || {
        limit_of("free-probe").as_deref() == Some("2")
    });
    eprintln!("DEGRADED reached every controller and the headers in {took:?}");
    assert_eq!(admitted(&envoy, "free-2", 10), 2, "free is shed to 2");
    assert_eq!(admitted(&envoy, "pro-2", 110), 100, "pro keeps its 100");
    assert_eq!(
        admitted(&envoy, "ent-1", 20),
        20,
        "enterprise is not touched"
    );

    // Back to NORMAL: free may burst again.
    cli::run(&second, &["state", "set", "NORMAL"]).expect("sluice state set");
    everywhere(&[&second, &first], || {
        limit_of("free-probe").as_deref() == Some("20")
    });
    assert_eq!(admitted(&envoy, "free-3", 25), 20, "bursts again");
    assert_eq!(
        admitted(&envoy, "free-back", 25),
        20,
        "and so does every free client"
    );
}

// ----- the automatic state -------------------------------------------------------------------

const AUTOMATIC: &str = r#"
[automatic_state]
enter_share = 0.5
leave_share = 0.1
window = "3s"
dwell = "5s"
min_responses = 20

[[rules]]
name = "generous"
limit = 1000000
window = "1h"
"#;

fn state_of(controller: &Controller) -> String {
    controller.admin("GET", "/v1/admin/state", None).json()["state"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

/// Sends `n` requests, `failing` of them to an upstream path that answers 503.
fn traffic(envoy: &Envoy, n: usize, failing: usize) {
    for i in 0..n {
        let path = if i < failing { "/status/503" } else { "/items" };
        let response = get(envoy, path, &[]);
        assert_eq!(
            response.status,
            if i < failing { 503 } else { 200 },
            "{response:?}"
        );
    }
}

/// Keeps `share_failing` (in tenths) of the traffic failing for `for_how_long`, asserting
/// after each round that the state is still `state`.
fn hold(
    envoy: &Envoy,
    controller: &Controller,
    tenths: usize,
    for_how_long: Duration,
    state: &str,
) {
    let began = Instant::now();
    while began.elapsed() < for_how_long {
        traffic(envoy, 10, tenths);
        assert_eq!(state_of(controller), state, "after {:?}", began.elapsed());
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn automatic_transitions(controller: &Controller) -> Vec<String> {
    audit(controller)
        .iter()
        .filter(|entry| entry["action"] == "state.auto")
        .map(|entry| entry["target"].as_str().unwrap_or_default().to_owned())
        .rev()
        .collect()
}

#[test]
fn the_state_follows_the_upstreams_5xx_share_once_each_way_with_hysteresis_and_dwell() {
    let redis = RedisServer::start();
    let controller = Controller::start(AUTOMATIC, Some(&redis.url()));
    let upstream = Upstream::start();
    let envoy = envoy_with(&[&controller], &upstream, json!({}));

    // 30 % of answers are 5xx: below enter_share (and above leave_share): nothing happens.
    hold(&envoy, &controller, 3, Duration::from_secs(5), "NORMAL");
    // All of them: DEGRADED, from the filters' reports, within a few seconds.
    let began = Instant::now();
    within(Duration::from_secs(6), "DEGRADED", || {
        traffic(&envoy, 10, 10);
        state_of(&controller) == "DEGRADED"
    });
    let degraded_at = Instant::now();
    eprintln!("DEGRADED after {:?} of failures", began.elapsed());
    // Healthy at once: the failures leave the 3 s window, but the state holds for the
    // 5 s dwell.
    let dwell = Duration::from_secs(5);
    hold(
        &envoy,
        &controller,
        0,
        (dwell - Duration::from_millis(500)).saturating_sub(degraded_at.elapsed()),
        "DEGRADED",
    );
    within(Duration::from_secs(4), "NORMAL after the dwell", || {
        traffic(&envoy, 10, 0);
        state_of(&controller) == "NORMAL"
    });
    eprintln!("NORMAL {:?} after DEGRADED", degraded_at.elapsed());
    hold(&envoy, &controller, 0, Duration::from_secs(2), "NORMAL");
    assert_eq!(
        automatic_transitions(&controller),
        ["DEGRADED", "NORMAL"],
        "one transition each way, logged and audited"
    );
    let scraped = http::get(&controller.admin_url("/metrics"))
        .expect("scrape")
        .body;
    for line in [
        r#"sluice_state_transitions_total{to="DEGRADED",by="automatic"} 1"#,
        r#"sluice_state_transitions_total{to="NORMAL",by="automatic"} 1"#,
    ] {
        assert!(scraped.contains(line), "{line} in\n{scraped}");
    }
    let log = controller.log();
    assert_eq!(
        log.matches("the system state changed by itself").count(),
        2,
        "{log}"
    );
}

// ----- the emergency switch and blocking now -------------------------------------------------

const LOGIN: &str = r#"
[[rules]]
name = "login"
scope = "ip"
limit = 2
window = "1h"
match = { path_prefix = "/login" }
"#;

fn from(envoy: &Envoy, ip: &str, path: &str) -> u16 {
    get(envoy, path, &[("x-forwarded-for", ip)]).status
}

#[test]
fn switched_off_everything_passes_and_is_still_counted_then_enforced_again() {
    let redis = RedisServer::start();
    let controller = Controller::start(LOGIN, Some(&redis.url()));
    let upstream = Upstream::start();
    let envoy = envoy_with(
        &[&controller],
        &upstream,
        json!({ "identity": { "ip": { "trusted_hops": 1 } } }),
    );
    let statuses: Vec<u16> = (0..3)
        .map(|_| from(&envoy, "198.51.100.1", "/login"))
        .collect();
    assert_eq!(statuses, [200, 200, 429]);

    let said = cli::run(&controller, &["enforce", "off"]).expect("sluice enforce off");
    assert!(said.starts_with("OFF"), "{said}");
    within(PROPAGATION, "everything passes", || {
        (0..4).all(|_| from(&envoy, "198.51.100.1", "/login") == 200)
    });
    let shadow_before = envoy.stat("wasmcustom.sluice_shadow_limited").unwrap_or(0);
    let statuses: Vec<u16> = (0..5)
        .map(|_| from(&envoy, "198.51.100.1", "/login"))
        .collect();
    assert_eq!(statuses, [200; 5], "nothing is refused");
    let shadow_after = envoy.stat("wasmcustom.sluice_shadow_limited").unwrap_or(0);
    assert_eq!(
        shadow_after - shadow_before,
        5,
        "each counted as would-be-limited"
    );
    // Counting goes on: a new client has its own counter, which runs out as before.
    let fresh: Vec<u16> = (0..3)
        .map(|_| from(&envoy, "198.51.100.2", "/login"))
        .collect();
    assert_eq!(fresh, [200; 3]);

    cli::run(&controller, &["enforce", "on"]).expect("sluice enforce on");
    within(PROPAGATION, "enforced again", || {
        from(&envoy, "198.51.100.2", "/login") == 429
    });
    assert_eq!(from(&envoy, "198.51.100.3", "/login"), 200);
}

#[test]
fn a_client_blocked_now_gets_403_within_2_s_and_is_let_back_on_time() {
    let redis = RedisServer::start();
    let controller = Controller::start(LOGIN, Some(&redis.url()));
    let upstream = Upstream::start();
    let envoy = envoy_with(
        &[&controller],
        &upstream,
        json!({ "identity": { "ip": { "trusted_hops": 1 } } }),
    );
    assert_eq!(from(&envoy, "198.51.100.7", "/items"), 200);
    // The controller makes the block (and starts its 4 s) somewhere between the CLI's start
    // and its return: the earliest bounds "not before its end", the latest "within 2 s"
    // and "let back on time".
    let asked_at = Instant::now();
    cli::run(
        &controller,
        &[
            "block",
            "ip",
            "198.51.100.7",
            "--for",
            "4s",
            "--reason",
            "incident 42",
        ],
    )
    .expect("sluice block");
    let blocked_at = Instant::now();
    eprintln!("the CLI took {:?}", blocked_at - asked_at);
    // 403 within 2 s of the block: a request sent by then is refused.
    let (sent, answered) = loop {
        let sent = blocked_at.elapsed();
        let status = from(&envoy, "198.51.100.7", "/items");
        if status == 403 {
            break (sent, blocked_at.elapsed());
        }
        assert!(
            sent < PROPAGATION,
            "403 for the blocked client: not within {PROPAGATION:?} ({status} to a request \
             sent {sent:?} after the block)"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    eprintln!("blocked: a request sent {sent:?} after the block refused {answered:?} after it");
    assert!(
        sent < PROPAGATION,
        "the first request refused was sent {sent:?} after the block"
    );
    assert_eq!(
        from(&envoy, "198.51.100.8", "/items"),
        200,
        "its neighbour passes"
    );
    // Let back at the block's end, not before (the filter holds the expiry: no read needed):
    // a request sent 600 ms after the latest possible end is admitted, and no admission
    // comes before the earliest possible end (100 ms for the clocks of Envoy and the
    // controller).
    let released = loop {
        let sent = blocked_at.elapsed();
        let status = from(&envoy, "198.51.100.7", "/items");
        if status != 403 {
            assert_eq!(status, 200, "let back");
            break asked_at.elapsed();
        }
        assert!(
            sent < Duration::from_millis(4_600),
            "still blocked {sent:?} after the block"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(
        released >= Duration::from_millis(3_900),
        "released early: {released:?} after the CLI was started"
    );
}

// ----- brute-force protection ----------------------------------------------------------------

const SECRET: &str = "e2e-operations-secret";

/// Valid tokens and one known key; past 5 invalid credentials a minute an address is
/// blocked for 4 s; unknown keys are refused.
fn protected() -> String {
    format!(
        r#"
[[rules]]
name = "per-client"
limit = 1000
window = "1h"

[[api_keys]]
sha256 = "{}"
user = "known"
{PROTECTION}"#,
        digest("known-key")
    )
}

const PROTECTION: &str = r#"
[protection]
invalid_credentials = 5
window = "1m"
block = "4s"
unknown_api_keys = "reject"
"#;

fn token(subject: &str) -> String {
    encode(
        &Header::new(Algorithm::HS256),
        &json!({ "sub": subject, "exp": 4_000_000_000u64 }),
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .expect("sign")
}

#[test]
fn an_address_guessing_credentials_is_blocked_then_released_and_its_neighbour_never() {
    let redis = RedisServer::start();
    let config = protected();
    let controller = Controller::start_with(&ControllerOptions::new(&config, Some(&redis.url())));
    let version_before = controller.config_version();
    let upstream = Upstream::start();
    let envoy = envoy_with(
        &[&controller],
        &upstream,
        json!({ "identity": {
            "ip": { "trusted_hops": 1 },
            "api_key_header": "x-api-key",
            "jwt": { "keys": [{ "alg": "HS256", "secret": SECRET }], "on_invalid": "reject" },
        } }),
    );
    let good = format!("Bearer {}", token("alice"));
    let as_good = |ip: &str| {
        get(
            &envoy,
            "/items",
            &[("x-forwarded-for", ip), ("authorization", &good)],
        )
        .status
    };
    assert_eq!(as_good("203.0.113.5"), 200);
    // Forged tokens and guessed keys from one address; its neighbour behaves throughout.
    let forged = format!("Bearer {}", token("alice").replace('.', "x."));
    for i in 0..6 {
        let attempt = if i % 2 == 0 {
            get(
                &envoy,
                "/items",
                &[
                    ("x-forwarded-for", "203.0.113.5"),
                    ("authorization", &forged),
                ],
            )
        } else {
            get(
                &envoy,
                "/items",
                &[
                    ("x-forwarded-for", "203.0.113.5"),
                    ("x-api-key", &format!("guess-{i}")),
                ],
            )
        };
        assert_eq!(attempt.status, 401, "{attempt:?}");
        assert_eq!(as_good("203.0.113.6"), 200);
    }
    within(
        Duration::from_secs(4),
        "the guessing address blocked",
        || {
            assert_eq!(
                as_good("203.0.113.6"),
                200,
                "the neighbour is never blocked"
            );
            as_good("203.0.113.5") == 403
        },
    );
    // Blocks live beside the configuration: no audit entry, no new version; the filters
    // read them with the lists (the view, as a filter reads it, with the check token).
    assert!(
        audit(&controller)
            .iter()
            .all(|entry| entry["actor"] != "protection"),
        "no audit entry"
    );
    assert_eq!(controller.config_version(), version_before);
    let scraped = http::get(&controller.admin_url("/metrics"))
        .expect("scrape")
        .body;
    assert!(
        scraped.contains("sluice_protection_blocks_total 1"),
        "{scraped}"
    );
    // Operators see it through the CLI (the admin API reads it from Redis).
    let listed =
        cli::run(&controller, &["protection", "blocks"]).expect("sluice protection blocks");
    assert!(listed.contains("203.0.113.5/32"), "{listed}");
    let view = filter_view(&controller);
    let block = view["denylist"]
        .as_array()
        .and_then(|list| list.iter().find(|e| e["value"] == "203.0.113.5/32"))
        .unwrap_or_else(|| panic!("the block in the filters' view: {view}"))
        .clone();
    // Released when the block ends, not before. The block may have begun while the last
    // attempts were still answered (the filter learns of it up to a poll later), so the
    // block's own end is the reference, not the moment the test first saw a 403.
    let ends_ms = block["expires_at_ms"]
        .as_u64()
        .unwrap_or_else(|| panic!("a block with an end: {block}"));
    let expires_at = std::time::UNIX_EPOCH + Duration::from_millis(ends_ms);
    let until_expiry = expires_at
        .duration_since(SystemTime::now())
        .unwrap_or_default();
    assert!(
        until_expiry <= Duration::from_secs(4),
        "blocked for at most the configured 4 s: {until_expiry:?} left"
    );
    within(Duration::from_secs(6), "released", || {
        assert_eq!(as_good("203.0.113.6"), 200);
        as_good("203.0.113.5") == 200
    });
    let early = expires_at
        .duration_since(SystemTime::now())
        .unwrap_or_default();
    assert!(
        early <= Duration::from_millis(100),
        "released {early:?} before the block's expiry"
    );
    // The ended block is gone from the view.
    within(
        Duration::from_secs(3),
        "the block gone from the view",
        || filter_view(&controller)["denylist"] == json!([]),
    );
    assert_eq!(controller.config_version(), version_before);
}

/// `GET /v1/config` as a filter reads it.
fn filter_view(controller: &Controller) -> Value {
    let credential = format!("Bearer {}", sluice_e2e::controller::CHECK_TOKEN);
    http::request(
        "GET",
        &controller.url("/v1/config"),
        &[("authorization", credential.as_str())],
        None,
    )
    .expect("the view")
    .json()
}
