//! Lease mode through real Envoys with the real `.wasm`, two controllers and one Redis:
//! the bound holds per window under far more demand than the limit, an exact rule beside
//! the leased one stays exact, a killed Envoy strands no more than its leases, a lowered
//! limit takes the leases back within 2 s, and a request is served from a lease only when
//! every enforced rule that applies to it is leased and no shadow rule applies.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::json;
use sluice_e2e::envoy::{sluice_plugin_config, with_fields, EnvoyOptions, Filter};
use sluice_e2e::{http, wait_until, Controller, Envoy, RedisServer, Upstream};

const WINDOW_MS: u64 = 10_000;
const LIMIT: u64 = 1_000;
/// 5 % of the limit: what all leases on the key may hold unused at once, so what a window
/// may admit less than its limit when demand is there. Leases are taken from the limit when
/// granted, so a window never admits more than it.
const BOUND: u64 = LIMIT * 5 / 100;

fn rules(hot_limit: u64) -> String {
    format!(
        r#"
[[rules]]
name = "hot"
limit = {hot_limit}
window = "10s"
match = {{ path = "/hot" }}
leased = {{ share_percent = 5 }}

[[rules]]
name = "exact"
limit = {LIMIT}
window = "10s"
match = {{ path = "/exact" }}
"#
    )
}

fn envoy(controllers: &[&Controller], upstream: &Upstream) -> Envoy {
    let envoy = Envoy::start(&EnvoyOptions {
        filter: Filter::sluice_with(&with_fields(sluice_plugin_config("deny", 2_000), json!({}))),
        upstream_port: upstream.port(),
        controller_ports: controllers.iter().map(|c| c.port).collect(),
        concurrency: 2,
        controller_http2: false,
    });
    envoy.wait_until_vms_read_the_configuration(3);
    envoy
}

struct Setup {
    redis: RedisServer,
    controllers: Vec<Controller>,
    upstream: Upstream,
}

fn setup(hot_limit: u64) -> Setup {
    let redis = RedisServer::start();
    let config = rules(hot_limit);
    let controllers: Vec<Controller> = (0..2)
        .map(|_| Controller::start(&config, Some(&redis.url())))
        .collect();
    Setup {
        redis,
        controllers,
        upstream: Upstream::start(),
    }
}

impl Setup {
    fn envoy(&self) -> Envoy {
        let controllers: Vec<&Controller> = self.controllers.iter().collect();
        envoy(&controllers, &self.upstream)
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Sleeps until 100 ms into the next window; returns its start (ms since the epoch).
fn next_window() -> u64 {
    let start = (now_ms() / WINDOW_MS + 1) * WINDOW_MS;
    // A stall past the boundary must not underflow: then there is nothing to wait for.
    std::thread::sleep(Duration::from_millis(
        (start + 100).saturating_sub(now_ms()),
    ));
    start
}

fn sleep_until(epoch_ms: u64) {
    let now = now_ms();
    if epoch_ms > now {
        std::thread::sleep(Duration::from_millis(epoch_ms - now));
    }
}

/// The tests saturate the machine and count by the window: one at a time.
fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    static TURN: Mutex<()> = Mutex::new(());
    TURN.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Admitted requests per path, sent from two threads per Envoy (new connections, so both
/// workers of each Envoy get some) until `until_ms`. Every answer is a 200 or a 429; a 429
/// is counted under the path with `!` before it (the demand was there).
fn blast(envoys: &[&Envoy], paths: &[&str], until_ms: u64) -> HashMap<String, u64> {
    let admitted = Arc::new(Mutex::new(HashMap::<String, u64>::new()));
    std::thread::scope(|scope| {
        for (index, envoy) in envoys.iter().flat_map(|e| [e, e]).enumerate() {
            let admitted = Arc::clone(&admitted);
            let paths: Vec<String> = paths.iter().map(|p| (*p).to_owned()).collect();
            scope.spawn(move || {
                let mut n = index;
                while now_ms() < until_ms {
                    let path = &paths[n % paths.len()];
                    n += 1;
                    let response = http::get(&envoy.url(path)).expect("through envoy");
                    if !matches!(response.status, 200 | 429) {
                        let log = envoy.log();
                        let tail: Vec<&str> = log.lines().rev().take(30).collect();
                        panic!("{path}: {response:?}\n{}", tail.join("\n"));
                    }
                    let counted = if response.status == 200 {
                        path.clone()
                    } else {
                        format!("!{path}")
                    };
                    *admitted
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .entry(counted)
                        .or_default() += 1;
                }
            });
        }
    });
    let admitted = admitted.lock().unwrap_or_else(|e| e.into_inner()).clone();
    admitted
}

fn leased_admissions(envoy: &Envoy) -> u64 {
    envoy
        .stat("wasmcustom.sluice_leased_admissions")
        .unwrap_or(0)
}

#[test]
fn a_leased_rule_admits_within_its_bound_every_window_and_an_exact_one_exactly() {
    let _turn = one_at_a_time();
    let setup = setup(LIMIT);
    let (a, b) = (setup.envoy(), setup.envoy());
    for round in 0..3 {
        let start = next_window();
        // Stop well before the window ends: every admission counted is this window's.
        let admitted = blast(&[&a, &b], &["/hot", "/exact"], start + 7_000);
        let hot = admitted.get("/hot").copied().unwrap_or(0);
        let exact = admitted.get("/exact").copied().unwrap_or(0);
        eprintln!("window {round}: leased {hot}, exact {exact}: {admitted:?}");
        assert!(
            admitted.contains_key("!/hot") && admitted.contains_key("!/exact"),
            "window {round}: the demand was not there (nothing refused): {admitted:?}"
        );
        assert_eq!(
            exact, LIMIT,
            "window {round}: the exact rule admits its limit"
        );
        assert!(
            hot <= LIMIT && hot + BOUND >= LIMIT,
            "window {round}: leased admitted {hot}, not within {LIMIT} - {BOUND} ..= {LIMIT}"
        );
    }
    // Both Envoys decided requests from leases; the controllers granted them and heard of
    // what they admitted.
    let (from_a, from_b) = (leased_admissions(&a), leased_admissions(&b));
    eprintln!("admitted from leases: {from_a} and {from_b}");
    assert!(from_a > 0 && from_b > 0, "{from_a} {from_b}");
    let granted: u64 = setup
        .controllers
        .iter()
        .map(|c| metric(c, r#"sluice_leased_requests_granted_total{rule="hot"}"#))
        .sum();
    assert!(
        granted >= from_a + from_b,
        "{granted} granted, {from_a} + {from_b} used"
    );
    wait_until("the reports arrive", Duration::from_secs(3), || {
        let reported: u64 = setup
            .controllers
            .iter()
            .map(|c| metric(c, r#"sluice_leased_admissions_total{rule="hot"}"#))
            .sum();
        reported == leased_admissions(&a) + leased_admissions(&b)
    });
    drop(setup.redis);
}

#[test]
fn a_killed_envoy_strands_at_most_its_leases_and_the_key_recovers_next_window() {
    let _turn = one_at_a_time();
    let setup = setup(LIMIT);
    let (a, b) = (setup.envoy(), setup.envoy());
    let start = next_window();
    // a takes leases (its first requests ask, the next are admitted from what it got),
    // then dies holding whatever it has not used.
    let by_a = blast(&[&a], &["/hot"], start + 1_000)
        .get("/hot")
        .copied()
        .unwrap_or(0);
    assert!(leased_admissions(&a) > 0, "a admitted from leases");
    drop(a);
    let after_a = blast(&[&b], &["/hot"], start + 8_000);
    let by_b = after_a.get("/hot").copied().unwrap_or(0);
    eprintln!("a admitted {by_a} and was killed; b admitted {by_b}: {after_a:?}");
    assert!(
        after_a.contains_key("!/hot"),
        "the demand was not there (nothing refused): {after_a:?}"
    );
    assert!(by_a + by_b <= LIMIT, "{by_a} + {by_b}");
    assert!(
        by_a + by_b + BOUND >= LIMIT,
        "more than the leases a held was lost: {by_a} + {by_b} of {LIMIT}"
    );
    let start = next_window();
    let next_counts = blast(&[&b], &["/hot"], start + 8_000);
    let next = next_counts.get("/hot").copied().unwrap_or(0);
    assert!(
        next_counts.contains_key("!/hot") && next <= LIMIT && next + BOUND >= LIMIT,
        "the next window: {next_counts:?}"
    );
}

#[test]
fn a_lowered_limit_takes_the_leases_back_within_2_s() {
    let _turn = one_at_a_time();
    let setup = setup(LIMIT);
    let (a, b) = (setup.envoy(), setup.envoy());
    let start = next_window();
    let lowered_at = std::thread::scope(|scope| {
        // Traffic flows while the limit is lowered to 100 (the window has admitted more
        // than that by then).
        let traffic = scope.spawn(|| blast(&[&a, &b], &["/hot"], start + 1_500));
        sleep_until(start + 1_000);
        let rule = json!({
            "name": "hot", "limit": 100, "window": "10s",
            "match": { "path": "/hot" }, "leased": { "share_percent": 5 },
        });
        let reply = setup.controllers[0].admin("PUT", "/v1/admin/rules/hot", Some(&rule));
        assert_eq!(reply.status, 200, "{}", reply.body);
        let lowered_at = now_ms();
        let before = traffic.join().expect("traffic").get("/hot").copied();
        assert!(before.unwrap_or(0) > 100, "{before:?}");
        lowered_at
    });
    // From 2 s after the change to the window's end nothing passes: the leases granted
    // under the old limit are gone, and the counter is past the new one.
    sleep_until(lowered_at + 2_000);
    let late = blast(&[&a, &b], &["/hot"], start + 7_000)
        .get("/hot")
        .copied()
        .unwrap_or(0);
    assert_eq!(late, 0, "admitted 2 s after the limit was lowered");
    // The next window admits the new limit, within the new bound.
    let start = next_window();
    let next_counts = blast(&[&a, &b], &["/hot"], start + 7_000);
    let next = next_counts.get("/hot").copied().unwrap_or(0);
    assert!(
        next_counts.contains_key("!/hot") && next <= 100 && next + 5 >= 100,
        "the next window: {next_counts:?}"
    );
}

fn metric(controller: &Controller, series: &str) -> u64 {
    let scraped = http::get(&controller.admin_url("/metrics"))
        .expect("scrape")
        .body;
    scraped
        .lines()
        .find_map(|line| line.strip_prefix(series))
        .and_then(|value| value.trim().parse::<f64>().ok())
        .map_or(0, |value| value as u64)
}

/// One request matching several rules: a leased one beside an exact one (`/mixed`), beside a
/// shadow one (`/shadowed`), and two leased ones (`/double`). The limit that binds is 10 on
/// each path; the other rule's is higher (or in shadow), so the one that binds is known.
const ONE_REQUEST_MANY_RULES: &str = r#"
[[rules]]
name = "mixed-leased"
limit = 40
window = "1h"
match = { path = "/mixed" }
leased = { share_percent = 50 }

[[rules]]
name = "mixed-exact"
limit = 10
window = "1h"
match = { path = "/mixed" }

[[rules]]
name = "shadowed-leased"
limit = 10
window = "1h"
match = { path = "/shadowed" }
leased = { share_percent = 50 }

[[rules]]
name = "shadowed-watch"
limit = 3
window = "1h"
shadow = true
match = { path = "/shadowed" }

[[rules]]
name = "double-wide"
limit = 40
window = "1h"
match = { path = "/double" }
leased = { share_percent = 50 }

[[rules]]
name = "double-narrow"
limit = 10
window = "1h"
match = { path = "/double" }
leased = { share_percent = 50 }
"#;

/// The sum of a controller's series `name` whose labels include every pair of `labels`
/// (over the others, such as the tier).
fn metric_sum(controller: &Controller, name: &str, labels: &[(&str, &str)]) -> f64 {
    let scraped = http::get(&controller.admin_url("/metrics"))
        .expect("scrape")
        .body;
    scraped
        .lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| line.rsplit_once(' '))
        .filter(|(series, _)| {
            let (series_name, series_labels) = series.split_once('{').unwrap_or((series, ""));
            series_name == name
                && labels
                    .iter()
                    .all(|(label, value)| series_labels.contains(&format!("{label}=\"{value}\"")))
        })
        .filter_map(|(_, value)| value.trim().parse::<f64>().ok())
        .sum()
}

/// The checks the controller has received (its batch-size histogram's sum), whether one
/// call carried them or many.
fn checks_received(controller: &Controller) -> u64 {
    metric_sum(controller, "sluice_check_call_checks_sum", &[]) as u64
}

fn leases_granted(controller: &Controller) -> u64 {
    metric_sum(controller, "sluice_leases_granted_total", &[]) as u64
}

/// `n` requests to `path`, one after the other: their statuses.
fn statuses(envoy: &Envoy, path: &str, n: usize) -> Vec<u16> {
    (0..n)
        .map(|_| http::get(&envoy.url(path)).expect("through envoy").status)
        .collect()
}

/// A request is served from a lease only when every enforced rule that applies to it is
/// leased and no shadow rule applies: seen from the controller, which receives a check for
/// every request of `/mixed` (leased + exact) and `/shadowed` (leased + shadow) and grants
/// no lease for them, and fewer checks than requests for `/double` (two leased rules),
/// whose other requests the worker admitted from leases. Every path admits exactly its
/// limit, one request after another through one worker.
#[test]
fn a_request_is_leased_only_when_every_enforced_rule_is_leased_and_no_shadow_rule_applies() {
    let _turn = one_at_a_time();
    // The windows are hours, aligned to the clock: none may end during the test.
    const HOUR_MS: u64 = 3_600_000;
    if HOUR_MS - now_ms() % HOUR_MS < 60_000 {
        sleep_until((now_ms() / HOUR_MS + 1) * HOUR_MS + 100);
    }
    let redis = RedisServer::start();
    let controller = Controller::start(ONE_REQUEST_MANY_RULES, Some(&redis.url()));
    let upstream = Upstream::start();
    let envoy = Envoy::start(&EnvoyOptions {
        filter: Filter::sluice_with(&sluice_plugin_config("deny", 2_000)),
        upstream_port: upstream.port(),
        controller_ports: vec![controller.port],
        concurrency: 1,
        controller_http2: false,
    });
    // The main thread's VM and the worker's.
    envoy.wait_until_vms_read_the_configuration(2);
    let window_at_start = now_ms() / HOUR_MS;

    // (a) A leased rule and an exact one: every request is checked, no lease is granted,
    // and the exact rule's limit holds exactly.
    let before = checks_received(&controller);
    assert_eq!(statuses(&envoy, "/mixed", 10), vec![200; 10], "/mixed");
    assert_eq!(
        checks_received(&controller) - before,
        10,
        "/mixed: a check for every request"
    );
    assert_eq!(statuses(&envoy, "/mixed", 1), vec![429], "/mixed: the 11th");

    // (b) A leased rule and a shadow one: every request is checked (the shadow rule counts
    // each), no lease is granted, and the leased rule's limit holds exactly.
    let before = checks_received(&controller);
    assert_eq!(
        statuses(&envoy, "/shadowed", 10),
        vec![200; 10],
        "/shadowed"
    );
    assert_eq!(
        checks_received(&controller) - before,
        10,
        "/shadowed: a check for every request"
    );
    let watched = |outcome: &str| {
        metric_sum(
            &controller,
            "sluice_decisions_total",
            &[("rule", "shadowed-watch"), ("outcome", outcome)],
        ) as u64
    };
    // The decisions' metrics are brought up to date once a second.
    wait_until(
        "the shadow rule's decisions are counted",
        Duration::from_secs(5),
        || watched("allowed") + watched("shadow_limited") >= 10,
    );
    assert_eq!(
        (watched("allowed"), watched("shadow_limited")),
        (3, 7),
        "the shadow rule judged every request"
    );
    assert_eq!(
        statuses(&envoy, "/shadowed", 1),
        vec![429],
        "/shadowed: the 11th"
    );
    assert_eq!(
        leases_granted(&controller),
        0,
        "no lease for /mixed or /shadowed"
    );
    assert_eq!(
        leased_admissions(&envoy),
        0,
        "nothing admitted from a lease"
    );

    // (c) Two leased rules: the worker asks, is granted a lease, and admits from it
    // without a check; what it admits from leases and what the controller decided add up
    // to the requests, and the narrower limit holds exactly.
    let before = checks_received(&controller);
    assert_eq!(statuses(&envoy, "/double", 10), vec![200; 10], "/double");
    let checked = checks_received(&controller) - before;
    assert!(leases_granted(&controller) > 0, "a lease for /double");
    assert!(checked < 10, "/double: {checked} checks for 10 requests");
    // The lease is spent: the 11th is checked, and refused.
    assert_eq!(
        statuses(&envoy, "/double", 1),
        vec![429],
        "/double: the 11th"
    );
    assert_eq!(
        checks_received(&controller) - before,
        checked + 1,
        "/double: the 11th was checked"
    );
    // The worker counts what its leases admitted when it next sends a batch or ticks.
    wait_until(
        "the worker counts what its leases admitted",
        Duration::from_secs(5),
        || checked + leased_admissions(&envoy) >= 10,
    );
    let from_leases = leased_admissions(&envoy);
    eprintln!("/double: {checked} checked, {from_leases} admitted from leases");
    assert_eq!(checked + from_leases, 10, "every request checked or leased");
    assert_eq!(
        metric_sum(
            &controller,
            "sluice_leased_requests_granted_total",
            &[("rule", "double-narrow")]
        ) as u64
            + metric_sum(
                &controller,
                "sluice_leased_requests_granted_total",
                &[("rule", "double-wide")]
            ) as u64,
        from_leases,
        "the leases held what the worker admitted from them, no more"
    );
    assert_eq!(
        now_ms() / HOUR_MS,
        window_at_start,
        "the window did not end"
    );
}

/// What the fixed window of the global rule `rule` has counted, read from Redis.
fn counted_in_redis(redis: &RedisServer, rule: &str) -> u64 {
    let mut connection = redis.connection();
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("sluice:*:fixed_window:{rule}:*"))
        .query(&mut connection)
        .expect("keys");
    keys.iter()
        .map(|key| {
            let count: Option<u64> = redis::cmd("HGET")
                .arg(key)
                .arg("c")
                .query(&mut connection)
                .expect("hget");
            count.unwrap_or(0)
        })
        .sum()
}

/// Quota a worker holds unused comes back to the key: a lease not spent 2 s after its grant
/// is given back at the worker's next tick (its demand dropped: here, to nothing), and a
/// configuration change gives back every lease the worker holds as soon as it reads it.
#[test]
fn unused_lease_quota_returns_to_the_key_when_demand_drops_or_the_configuration_changes() {
    let _turn = one_at_a_time();
    let redis = RedisServer::start();
    let config = r#"
[[rules]]
name = "idle"
limit = 1000
window = "1h"
scope = "global"
match = { path = "/idle" }
leased = { share_percent = 50 }
"#;
    let controller = Controller::start(config, Some(&redis.url()));
    let upstream = Upstream::start();
    // The configuration read every 200 ms: a change reaches the workers well before the
    // 2 s a lease is kept for its traffic, so the two ways back are told apart.
    let envoy = Envoy::start(&EnvoyOptions {
        filter: Filter::sluice_with(&{
            let mut plugin = sluice_plugin_config("deny", 2_000);
            plugin["controller"]["config_poll_ms"] = json!(200);
            plugin
        }),
        upstream_port: upstream.port(),
        controller_ports: vec![controller.port],
        concurrency: 2,
        controller_http2: false,
    });
    envoy.wait_until_vms_read_the_configuration(3);

    assert_eq!(statuses(&envoy, "/idle", 1), [200]);
    let granted_at = std::time::Instant::now();
    assert_eq!(
        counted_in_redis(&redis, "idle"),
        17,
        "the request and its worker's first lease of 16"
    );
    wait_until(
        "the unused lease given back",
        Duration::from_secs(6),
        || counted_in_redis(&redis, "idle") == 1,
    );
    assert!(
        granted_at.elapsed() >= Duration::from_millis(1_500),
        "given back {:?} after the grant: a lease is kept 2 s for its traffic",
        granted_at.elapsed()
    );
    assert_eq!(
        metric(
            &controller,
            "sluice_leased_requests_returned_total{rule=\"idle\"}"
        ),
        16
    );

    assert_eq!(statuses(&envoy, "/idle", 1), [200]);
    let granted_at = std::time::Instant::now();
    assert_eq!(counted_in_redis(&redis, "idle"), 18, "a new lease of 16");
    let rule = json!({
        "name": "other", "limit": 5, "window": "1m", "match": { "path": "/other" },
    });
    let reply = controller.admin("POST", "/v1/admin/rules", Some(&rule));
    assert_eq!(reply.status, 201, "{}", reply.body);
    wait_until(
        "the lease given back after the change",
        Duration::from_secs(4),
        || counted_in_redis(&redis, "idle") == 2,
    );
    let log = envoy.log();
    assert!(
        log.contains("drops this worker's leases: giving back 16 requests' worth unused"),
        "the change, not the 2 s rule, gave the lease back ({:?} after its grant)",
        granted_at.elapsed()
    );
    assert_eq!(
        metric(
            &controller,
            "sluice_leased_requests_returned_total{rule=\"idle\"}"
        ),
        32
    );
}
