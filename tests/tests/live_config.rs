//! The configuration changed while traffic flows, through the admin API and the `sluice`
//! CLI: every controller and every Envoy worker follows within 2 s (the denial cache too),
//! list entries expire on time, and nothing the API acknowledged is lost when the controller
//! and Redis are killed.

use std::time::{Duration, Instant};

use serde_json::{json, Value};
use sluice_e2e::controller::ControllerOptions;
use sluice_e2e::envoy::{sluice_plugin_config, with_fields, EnvoyOptions, Filter};
use sluice_e2e::http::{self, Response};
use sluice_e2e::{wait_until, Controller, Envoy, RedisServer, Upstream};

/// How soon a change must show everywhere.
const PROPAGATION: Duration = Duration::from_secs(2);

/// Clients without a tier: 2 an hour; clients of a tier: the tier's limit.
const BASE: &str = r#"
[[rules]]
name = "per-client"
limit = 2
window = "1h"
tier_limits = true
"#;

/// Runs `sluice args…` against `controller`'s admin API; the output, or the error.
fn cli(controller: &Controller, args: &[&str]) -> Result<String, String> {
    sluice_e2e::cli::run(controller, args)
}

fn envoy(controllers: &[&Controller], upstream: &Upstream, concurrency: u32) -> Envoy {
    let plugin = with_fields(
        sluice_plugin_config("deny", 2_000),
        json!({ "identity": { "api_key_header": "x-api-key" } }),
    );
    Envoy::start(&EnvoyOptions {
        filter: Filter::sluice_with(&plugin),
        upstream_port: upstream.port(),
        controller_ports: controllers.iter().map(|c| c.port).collect(),
        concurrency,
        controller_http2: false,
    })
}

fn get_with_key(envoy: &Envoy, key: &str) -> Response {
    http::get_with(&envoy.url("/items"), &[("x-api-key", key)]).expect("request through envoy")
}

/// Polls `done` every 50 ms for at most `PROPAGATION`; how long it took.
fn within_propagation(what: &str, mut done: impl FnMut() -> bool) -> Duration {
    let began = Instant::now();
    while !done() {
        assert!(
            began.elapsed() < PROPAGATION,
            "{what}: not within {PROPAGATION:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    began.elapsed()
}

fn admin_json(controller: &Controller, method: &str, path: &str, body: Value) -> Value {
    let response = controller.admin(method, path, Some(&body));
    assert!(
        (200..300).contains(&response.status),
        "{method} {path}: {response:?}"
    );
    response.json()
}

#[test]
fn changes_reach_every_controller_and_worker_within_two_seconds() {
    let redis = RedisServer::start_durable();
    let url = redis.url();
    // The controllers' own default poll (500 ms): the README's "every controller within 1 s".
    let default_poll = || {
        Controller::start_with(&ControllerOptions {
            config_poll_ms: 500,
            ..ControllerOptions::new(BASE, Some(&url))
        })
    };
    let (first, second) = (default_poll(), default_poll());
    let upstream = Upstream::start();
    let envoy = envoy(&[&first, &second], &upstream, 2);
    envoy.wait_until_vms_read_the_configuration(3);

    // A tier and a key of it, made on different controllers.
    admin_json(
        &first,
        "POST",
        "/v1/admin/tiers",
        json!({ "name": "gold", "limit": 5 }),
    );
    let created = admin_json(
        &second,
        "POST",
        "/v1/admin/api-keys",
        json!({ "user": "acme", "tier": "gold", "name": "acme production" }),
    );
    let key = created["key"]
        .as_str()
        .expect("the new key, shown once")
        .to_owned();
    let version = second.config_version();
    assert_eq!(version, 3, "the file, the tier, the key");
    let took = within_propagation("both controllers run the new version", || {
        first.config_version() >= version && second.config_version() >= version
    });
    println!("both controllers on version {version} after {took:?}");
    assert!(
        took <= Duration::from_secs(1),
        "every controller within 1 s: {took:?}"
    );
    // Every Envoy VM (the main thread's and both workers') reads it within 2 s.
    let read = format!("read configuration version {version} from the controller");
    let took = within_propagation("every Envoy VM reads the new version", || {
        envoy.threads_that_logged(&read) >= 3
    });
    println!("every Envoy VM on version {version} after {took:?}");
    // Through Envoy (both workers, both controllers by round robin): exactly the tier's 5.
    let statuses: Vec<u16> = (0..8).map(|_| get_with_key(&envoy, &key).status).collect();
    assert_eq!(
        statuses,
        [200, 200, 200, 200, 200, 429, 429, 429],
        "the key counts under gold (5), not the default (2)"
    );
    let limited = get_with_key(&envoy, &key);
    assert_eq!(limited.number("x-ratelimit-limit"), 5, "{limited:?}");

    // A client being denied (and remembered in the denial cache) is admitted within 2 s of
    // its limit being raised.
    let anonymous = || http::get(&envoy.url("/items")).expect("request").status;
    let before: Vec<u16> = (0..4).map(|_| anonymous()).collect();
    assert_eq!(before, [200, 200, 429, 429]);
    assert!(
        envoy
            .stat("wasmcustom.sluice_denial_cache_hits")
            .unwrap_or(0)
            >= 1
    );
    let raised = first.admin(
        "PUT",
        "/v1/admin/rules/per-client",
        Some(&json!({ "name": "per-client", "limit": 4, "window": "1h", "tier_limits": true })),
    );
    assert_eq!(raised.status, 200, "{raised:?}");
    let took = within_propagation("the raised limit admits the client", || anonymous() == 200);
    println!("a denied client admitted {took:?} after its limit was raised");

    // A denylist entry added with the CLI: the key gets 403 within 2 s.
    let added = cli(
        &first,
        &["deny", "add", "api-key", &key, "--reason", "abuse"],
    )
    .expect("sluice deny add");
    assert!(added.contains("api_key"), "{added}");
    let took = within_propagation("the denylisted key gets 403", || {
        get_with_key(&envoy, &key).status == 403
    });
    println!("a denylisted key refused {took:?} after the CLI added it");
    let listed = cli(&second, &["--json", "deny", "list"]).expect("sluice deny list");
    let entries: Value = serde_json::from_str(&listed).expect("JSON");
    let id = entries[0]["id"].as_str().expect("an id").to_owned();
    cli(&second, &["deny", "remove", &id]).expect("sluice deny remove");
    let took = within_propagation("the removed entry stops applying", || {
        get_with_key(&envoy, &key).status == 429
    });
    println!("the key back to its limit {took:?} after the entry was removed");
    // The kernel spreads new connections over the workers at random: over the test's
    // requests (each on a connection of its own) both served, so the counts above held
    // across workers. Checked at the end, over 16 requests or more: after the 9 keyed ones
    // alone, one worker took them all once in a CI run (a 1-in-256 chance).
    let per_worker = envoy.connections_per_worker(2);
    assert!(
        per_worker.iter().all(|n| *n > 0),
        "both workers served: {per_worker:?}"
    );
}

#[test]
fn a_list_entry_stops_applying_when_it_expires() {
    let controller = Controller::start(BASE, None);
    let upstream = Upstream::start();
    let envoy = envoy(&[&controller], &upstream, 1);
    envoy.wait_until_vms_read_the_configuration(2);
    let key = "temporarily-banned";
    let entry = admin_json(
        &controller,
        "POST",
        "/v1/admin/lists/denylist",
        json!({ "kind": "api_key", "value": sluice_filter::identity::api_key_digest(key),
                "expires_in": "3s", "reason": "cooling off" }),
    );
    let expires_at = entry["entry"]["expires_at"]
        .as_str()
        .expect("an expiry")
        .to_owned();
    // Every VM has read the entry (waiting on their log lines sends no request that the
    // limit would count).
    wait_until("every VM read the entry", PROPAGATION, || {
        envoy.threads_that_logged("1 denylist entries") >= 2
    });
    assert_eq!(get_with_key(&envoy, key).status, 403);
    // It stops at its expiry by the filter's own clock: the entry is still in the
    // configuration the filter holds (nobody removed it).
    wait_until("the entry expires", Duration::from_secs(10), || {
        get_with_key(&envoy, key).status != 403
    });
    assert_eq!(
        get_with_key(&envoy, key).status,
        200,
        "the second request after the expiry, within the client's limit of 2"
    );
    let now = std::time::SystemTime::now();
    let expiry = humantime::parse_rfc3339(&expires_at).expect("an RFC 3339 expiry");
    assert!(
        now + Duration::from_millis(100) >= expiry,
        "it stopped before {expires_at}"
    );
    // And on time: the filter checks the entry's expiry on each request, by its own clock
    // (a second of margin for a loaded machine).
    assert!(
        now <= expiry + Duration::from_millis(1_000),
        "it stopped only {:?} after {expires_at}",
        now.duration_since(expiry).unwrap_or_default()
    );
    let config = controller.admin("GET", "/v1/admin/lists/denylist", None);
    assert_eq!(
        config.json().as_array().map(Vec::len),
        Some(1),
        "still listed, expired"
    );
}

/// Every change made through the API, the document exported before the crash.
fn make_changes(controller: &Controller) -> (u64, String) {
    admin_json(
        controller,
        "POST",
        "/v1/admin/tiers",
        json!({ "name": "pro", "limit": 100, "window": "1m" }),
    );
    admin_json(
        controller,
        "POST",
        "/v1/admin/api-keys",
        json!({ "user": "acme", "tier": "pro" }),
    );
    admin_json(
        controller,
        "POST",
        "/v1/admin/rules",
        json!({ "name": "login", "scope": "ip", "limit": 5, "window": "1m",
                "match": { "path": "/login", "methods": ["POST"] } }),
    );
    admin_json(
        controller,
        "POST",
        "/v1/admin/lists/safelist",
        json!({ "kind": "ip", "value": "10.0.0.0/8", "reason": "office" }),
    );
    admin_json(
        controller,
        "PUT",
        "/v1/admin/state",
        json!({ "state": "DEGRADED" }),
    );
    let export = controller.admin("GET", "/v1/admin/config?format=toml", None);
    assert_eq!(export.status, 200);
    (controller.config_version(), export.body)
}

fn assert_kept(controller: &Controller, version: u64, export: &str) {
    assert_eq!(controller.config_version(), version, "{}", controller.log());
    let again = controller.admin("GET", "/v1/admin/config?format=toml", None);
    assert_eq!(again.body, export, "the configuration after the crash");
    let state = controller.admin("GET", "/v1/admin/state", None);
    assert_eq!(state.json()["state"], "DEGRADED");
    let audit = controller.admin("GET", "/v1/admin/audit", None).json();
    let actions: Vec<&str> = audit["entries"]
        .as_array()
        .map(|entries| {
            entries
                .iter()
                .filter_map(|e| e["action"].as_str())
                .collect()
        })
        .unwrap_or_default();
    assert_eq!(
        actions,
        [
            "state.set",
            "list.add",
            "rule.create",
            "api_key.create",
            "tier.create",
            "config.import"
        ],
        "the audit log survives too"
    );
}

#[test]
fn nothing_acknowledged_is_lost_when_controller_and_redis_are_killed() {
    let redis = RedisServer::start_durable();
    let url = redis.url();
    let mut controller = Controller::start(BASE, Some(&url));
    let (version, export) = make_changes(&controller);
    assert_eq!(version, 6, "the file and five changes");
    controller.stop();
    let redis = redis.crash_and_restart();
    let restarted = Controller::start(BASE, Some(&redis.url()));
    assert_kept(&restarted, version, &export);
    assert!(
        restarted.log().contains("the store holds a configuration"),
        "the store wins over the file at start: {}",
        restarted.log()
    );
}

#[test]
fn nothing_acknowledged_is_lost_by_the_embedded_store_either() {
    let dir = tempfile::tempdir().expect("temp dir");
    let state = dir.path().join("state.json");
    let options = ControllerOptions {
        state_file: Some(&state),
        ..ControllerOptions::new(BASE, None)
    };
    let mut controller = Controller::start_with(&options);
    let (version, export) = make_changes(&controller);
    controller.stop();
    let restarted = Controller::start_with(&options);
    assert_kept(&restarted, version, &export);
}

/// An import with one bad entry among good ones changes nothing, and says which entry.
#[test]
fn an_import_with_one_bad_entry_changes_nothing_and_names_it() {
    let controller = Controller::start(BASE, None);
    let before = controller
        .admin("GET", "/v1/admin/config?format=toml", None)
        .body;
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("import.toml");
    std::fs::write(
        &file,
        r#"
[[rules]]
name = "a"
limit = 1
window = "1m"

[[rules]]
name = "b"
limit = 2
window = "1m"

[[rules]]
name = "c"
limit = 3
window = "1 minute"

[[denylist]]
kind = "ip"
value = "192.0.2.0/24"
"#,
    )
    .expect("write");
    let refused = cli(
        &controller,
        &["config", "import", file.to_str().expect("path")],
    )
    .expect_err("the import is refused");
    assert!(refused.contains("rules[2].window"), "{refused}");
    let after = controller
        .admin("GET", "/v1/admin/config?format=toml", None)
        .body;
    assert_eq!(after, before, "nothing was applied");
    assert_eq!(controller.config_version(), 1);
    // The same file with the entry fixed applies as one version.
    let fixed = std::fs::read_to_string(&file)
        .expect("read")
        .replace("1 minute", "1m");
    std::fs::write(&file, fixed).expect("write");
    let applied = cli(
        &controller,
        &["config", "import", file.to_str().expect("path")],
    )
    .expect("the import applies");
    assert!(applied.contains("imported as version 2"), "{applied}");
    let rules = cli(&controller, &["rules", "list"]).expect("sluice rules list");
    for name in ["a ", "b ", "c "] {
        assert!(rules.contains(name), "{rules}");
    }
}
