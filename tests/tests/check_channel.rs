//! The check channel trusts nobody: through the real controller (and real Envoy with the
//! real `.wasm` where the path goes through the filter), a call without the deployment's
//! check token changes nothing and costs the store nothing, and what an authenticated
//! proxy sends is bounded as if hostile.

use std::time::Duration;

use serde_json::{json, Value};
use sluice_e2e::controller::{ControllerOptions, CHECK_TOKEN, CHECK_TOKEN_ENV};
use sluice_e2e::envoy::{self, sluice_plugin_config, Filter};
use sluice_e2e::{http, Controller, Envoy, EnvoyOptions, Upstream};

/// Every address protection sees past one invalid token a minute is blocked: one report the
/// controller took would show in the denylist. A concurrency rule hands out lease tokens.
const RULES: &str = r#"
[[rules]]
name = "per-client"
limit = 5
window = "1h"
match = { path_prefix = "/api" }

[[rules]]
name = "slots"
strategy = "concurrency"
limit = 2
lease = "1h"
match = { path_prefix = "/slots" }

[protection]
invalid_credentials = 1
window = "1m"
block = "1m"
"#;

fn check_body(path: &str) -> Value {
    json!({ "checks": [{ "client": { "kind": "ip", "value": "198.51.100.9" }, "path": path }] })
}

/// `method path` on the check address with `credential` as the `authorization` header.
fn call(
    controller: &Controller,
    method: &str,
    path: &str,
    credential: Option<&str>,
    body: Option<&Value>,
) -> http::Response {
    let headers: Vec<(&str, &str)> = credential
        .map(|c| ("authorization", c))
        .into_iter()
        .collect();
    http::request(
        method,
        &controller.url(path),
        &headers,
        body.map(Value::to_string),
    )
    .expect("an answer")
}

fn good() -> String {
    format!("Bearer {CHECK_TOKEN}")
}

/// `GET /v1/config` as a filter reads it, with the check token.
fn filter_view(controller: &Controller) -> Value {
    let view = call(controller, "GET", "/v1/config", Some(&good()), None);
    assert_eq!(view.status, 200, "{view:?}");
    view.json()
}

fn metric(controller: &Controller, series: &str) -> f64 {
    let scraped = http::get(&controller.admin_url("/metrics"))
        .expect("scrape")
        .body;
    scraped
        .lines()
        .find_map(|line| line.strip_prefix(series))
        .and_then(|value| value.trim().parse::<f64>().ok())
        .unwrap_or(0.0)
}

/// What a forged call could have changed: the configuration (its version and denylist),
/// the counters of the client the forged calls name, and the store's release calls.
#[derive(Debug, PartialEq)]
struct Observed {
    config_version: u64,
    denylist: Value,
    /// The denylist the filters read: the configuration's and protection's blocks.
    filters_denylist: Value,
    remaining: u64,
    store_releases: u64,
    reports: u64,
}

fn observe(controller: &Controller) -> Observed {
    let config = controller.admin("GET", "/v1/admin/config", None).json();
    let remaining = {
        let inspected = controller
            .admin("GET", "/v1/admin/counters?kind=ip&value=198.51.100.9", None)
            .json();
        inspected["counters"]
            .as_array()
            .and_then(|counters| counters.iter().find(|c| c["rule"] == "per-client"))
            .and_then(|counter| counter["remaining"].as_u64())
            .unwrap_or_else(|| panic!("the per-client counter: {inspected}"))
    };
    Observed {
        config_version: controller.config_version(),
        denylist: config["denylist"].clone(),
        filters_denylist: filter_view(controller)["denylist"].clone(),
        remaining,
        store_releases: metric(
            controller,
            "sluice_store_command_duration_seconds_count{command=\"release\"} ",
        ) as u64,
        reports: metric(controller, "sluice_filter_reports_total ") as u64,
    }
}

/// Every call on the check address without the token, or with a wrong one, is a 401 in the
/// one error shape, counted, and changes nothing: not the configuration, not a counter, not
/// the denylist (even a report that would block the whole internet), and no release reaches
/// the store.
#[test]
fn calls_without_the_check_token_are_refused_and_change_nothing() {
    let controller = Controller::start(RULES, None);
    // One real check so that the counter exists, and one real lease to try to release.
    let first = call(
        &controller,
        "POST",
        "/v1/check",
        Some(&good()),
        Some(&check_body("/api/x")),
    );
    assert_eq!(first.status, 200, "{first:?}");
    let slot = call(
        &controller,
        "POST",
        "/v1/check",
        Some(&good()),
        Some(&check_body("/slots/a")),
    );
    let lease = slot.json()["decisions"][0]["leases"][0]
        .as_str()
        .unwrap_or_else(|| panic!("a lease token: {slot:?}"))
        .to_owned();
    let before = observe(&controller);
    assert_eq!(before.remaining, 4, "{before:?}");

    let whole_internet = json!({ "invalid_tokens": [
        { "ip": "0.0.0.0/0", "count": 1_000_000_000u64 },
        { "ip": "::/0", "count": 1_000_000_000u64 },
    ]});
    let forged_release = json!({ "leases": [lease] });
    let calls: [(&str, &str, Option<&Value>); 4] = [
        ("POST", "/v1/check", Some(&check_body("/api/x"))),
        ("POST", "/v1/report", Some(&whole_internet)),
        ("POST", "/v1/release", Some(&forged_release)),
        ("GET", "/v1/config", None),
    ];
    let wrong = "Bearer not-the-check-token-0123456789".to_owned();
    let mut refused = 0;
    for (method, path, body) in calls {
        for credential in [None, Some(wrong.as_str()), Some("Basic dGVzdDp0ZXN0")] {
            let response = call(&controller, method, path, credential, body);
            assert_eq!(
                response.status, 401,
                "{method} {path} {credential:?}: {response:?}"
            );
            assert_eq!(response.json()["error"], "unauthorized", "{response:?}");
            assert!(
                response.header("www-authenticate").is_some(),
                "{response:?}"
            );
            refused += 1;
        }
    }
    assert_eq!(
        metric(
            &controller,
            "sluice_unauthenticated_calls_total{listener=\"check\"} "
        ) as u64,
        refused
    );
    // Protection counts once a second: give a round the chance to block what it was told.
    std::thread::sleep(Duration::from_millis(2_500));
    assert_eq!(observe(&controller), before, "nothing changed");
    // Health and readiness stay open for probes.
    assert_eq!(call(&controller, "GET", "/readyz", None, None).status, 200);
    // And the real token still works.
    let after = call(
        &controller,
        "POST",
        "/v1/check",
        Some(&good()),
        Some(&check_body("/api/x")),
    );
    assert_eq!(after.status, 200, "{after:?}");
}

/// An authenticated proxy's report is still bounded: networks, counts past what one worker
/// sees, over-long lists and megabyte identities get a 400 naming the field, and change
/// nothing.
#[test]
fn an_authenticated_report_is_bounded_as_if_hostile() {
    let controller = Controller::start(RULES, None);
    let first = call(
        &controller,
        "POST",
        "/v1/check",
        Some(&good()),
        Some(&check_body("/api/x")),
    );
    assert_eq!(first.status, 200, "{first:?}");
    let before = observe(&controller);
    // Past the identity bound, within the body limit; a body past the limit is a 413.
    let huge = "x".repeat(64 * 1024);
    let too_many: Vec<Value> = (0..300)
        .map(|n| json!({ "ip": format!("192.0.2.{}", n % 250), "count": 1 }))
        .collect();
    let cases = [
        (
            json!({ "invalid_tokens": [{ "ip": "0.0.0.0/0", "count": 5 }] }),
            "invalid_tokens[0].ip",
        ),
        (
            json!({ "invalid_tokens": [{ "ip": "192.0.2.1", "count": 1_000_000_000u64 }] }),
            "invalid_tokens[0].count",
        ),
        (
            json!({ "invalid_tokens": [{ "ip": "2001:db8::/32", "count": 5 }] }),
            "invalid_tokens[0].ip",
        ),
        (json!({ "invalid_tokens": too_many }), "invalid_tokens"),
        (
            json!({ "responses": 1_000_000, "server_errors": 1_000_000 }),
            "responses",
        ),
        (
            json!({ "cached_denials": [{ "client": { "kind": "header", "value": huge },
                    "rule": "per-client", "count": 1 }] }),
            "cached_denials[0].client.value",
        ),
    ];
    for (report, field) in cases {
        let response = call(
            &controller,
            "POST",
            "/v1/report",
            Some(&good()),
            Some(&report),
        );
        assert_eq!(response.status, 400, "{field}: {response:?}");
        assert_eq!(response.json()["field"], field, "{response:?}");
    }
    // Just past the limit: a body much larger than the socket's buffers could be cut off by
    // the refusal while still being written (a broken pipe instead of the answer).
    let megabyte = json!({ "responses": 1, "padding": "x".repeat(1 << 20) });
    let response = call(
        &controller,
        "POST",
        "/v1/report",
        Some(&good()),
        Some(&megabyte),
    );
    assert_eq!(response.status, 413, "{response:?}");
    assert_eq!(response.json()["error"], "too_large", "{response:?}");
    // A check whose identity is too long is refused the same way.
    let long_client = json!({ "checks": [{ "client": { "kind": "header", "value": huge },
                                           "path": "/api/x" }] });
    let response = call(
        &controller,
        "POST",
        "/v1/check",
        Some(&good()),
        Some(&long_client),
    );
    assert_eq!(response.status, 400, "{response:?}");
    assert_eq!(response.json()["field"], "checks[0].client.value");
    std::thread::sleep(Duration::from_millis(2_500));
    assert_eq!(observe(&controller), before, "nothing changed");

    // One reporter counts once a period: a second report in the same second is ignored.
    // More than the threshold (one) in one report.
    let strike = json!({ "invalid_tokens": [{ "ip": "203.0.113.77", "count": 2 }] });
    let reporter = [
        ("authorization", good()),
        ("x-sluice-reporter", "w1".to_owned()),
    ];
    let headers: Vec<(&str, &str)> = reporter.iter().map(|(n, v)| (*n, v.as_str())).collect();
    let ignored_before = metric(&controller, "sluice_filter_reports_ignored_total ");
    for _ in 0..2 {
        let response = http::request(
            "POST",
            &controller.url("/v1/report"),
            &headers,
            Some(strike.to_string()),
        )
        .expect("an answer");
        assert_eq!(response.status, 204, "{response:?}");
    }
    // Two reports inside one second of the clock are one period unless the second turned
    // between them: at least zero, at most one ignored; the bound itself is unit-tested.
    let ignored = metric(&controller, "sluice_filter_reports_ignored_total ") - ignored_before;
    assert!(ignored <= 1.0, "{ignored}");
    // A single address reported by an authenticated proxy is blocked, as before.
    sluice_e2e::wait_until(
        "the reported address is blocked",
        Duration::from_secs(5),
        || {
            filter_view(&controller)["denylist"]
                .as_array()
                .is_some_and(|list| list.iter().any(|e| e["value"] == "203.0.113.77/32"))
        },
    );
}

/// A release names only leases a controller of the deployment signed, for the count
/// granted: a forged or altered token is refused before the store is asked, and a replayed
/// one frees nothing twice.
#[test]
fn a_forged_release_is_refused_without_touching_the_store() {
    let controller = Controller::start(RULES, None);
    let slot = call(
        &controller,
        "POST",
        "/v1/check",
        Some(&good()),
        Some(&check_body("/slots/a")),
    );
    let lease = slot.json()["decisions"][0]["leases"][0]
        .as_str()
        .unwrap_or_else(|| panic!("a lease token: {slot:?}"))
        .to_owned();
    let releases = || {
        metric(
            &controller,
            "sluice_store_command_duration_seconds_count{command=\"release\"} ",
        ) as u64
    };
    let before = releases();
    // The same lease with a count of a million (the loop that used to hold Redis), and a
    // made-up token in the shape the issue showed.
    let (unsigned, signature) = lease.rsplit_once('|').expect("a signed token");
    let (head, _count) = unsigned.rsplit_once('|').expect("key|id|count");
    let forged = [
        format!("{head}|1000000|{signature}"),
        format!("{head}|1000000"),
        format!(
            "sluice:{{0000000000000000}}:concurrency:x:eA|{}|1000000",
            "0".repeat(32)
        ),
    ];
    for token in forged {
        let response = call(
            &controller,
            "POST",
            "/v1/release",
            Some(&good()),
            Some(&json!({ "leases": [token] })),
        );
        assert_eq!(response.status, 400, "{token}: {response:?}");
        assert_eq!(response.json()["field"], "leases[0]", "{response:?}");
    }
    assert_eq!(releases(), before, "no forged release reached the store");
    let released = |token: &str| {
        let response = call(
            &controller,
            "POST",
            "/v1/release",
            Some(&good()),
            Some(&json!({ "leases": [token] })),
        );
        assert_eq!(response.status, 200, "{response:?}");
        response.json()["released"].as_u64().expect("released")
    };
    assert_eq!(released(&lease), 1, "the granted lease frees its slot");
    assert_eq!(released(&lease), 0, "a replay frees nothing");
}

/// Through real Envoy: a filter with the deployment's token (from Envoy's environment)
/// is answered; one with a wrong token gets only 401s, so its requests take the failure
/// mode, and the controller counts them; a filter whose `token_env` names a variable the VM
/// does not have refuses to start, naming the field.
#[test]
fn the_filter_presents_the_check_token_from_envoys_environment() {
    let controller = Controller::start(RULES, None);
    let upstream = Upstream::start();
    let options = |plugin: Value| EnvoyOptions {
        filter: Filter::sluice_with(&plugin),
        upstream_port: upstream.port(),
        controller_ports: vec![controller.port],
        concurrency: 1,
        controller_http2: false,
    };
    let envoy = Envoy::start(&options(sluice_plugin_config("deny", 2_000)));
    for remaining in (0..5).rev() {
        let response = http::get(&envoy.url("/api/through-envoy")).expect("answer");
        assert_eq!(response.status, 200, "{response:?}\n{}", controller.log());
        assert_eq!(response.number("x-ratelimit-remaining"), remaining);
    }
    assert_eq!(
        http::get(&envoy.url("/api/through-envoy")).unwrap().status,
        429
    );

    let mut wrong = sluice_plugin_config("deny", 2_000);
    wrong["controller"]
        .as_object_mut()
        .expect("controller")
        .remove("token_env");
    wrong["controller"]["token"] = json!("a-token-the-controller-never-had");
    let refused_before = metric(
        &controller,
        "sluice_unauthenticated_calls_total{listener=\"check\"} ",
    );
    let impostor = Envoy::start(&options(wrong));
    let response = http::get(&impostor.url("/api/impostor")).expect("answer");
    assert_eq!(
        response.status, 503,
        "a refused check takes the failure mode (deny): {response:?}"
    );
    let refused_after = metric(
        &controller,
        "sluice_unauthenticated_calls_total{listener=\"check\"} ",
    );
    assert!(
        refused_after > refused_before,
        "{refused_before} → {refused_after}"
    );

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("no-token.yaml");
    std::fs::write(
        &path,
        envoy::config_yaml(&options(sluice_plugin_config("deny", 200)), 1, 2),
    )
    .unwrap();
    let output = envoy::validate_with_env(&path, &[]);
    let log = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{log}");
    assert!(log.contains("controller.token_env"), "{log}");
    assert!(log.contains(CHECK_TOKEN_ENV), "{log}");
    let output = envoy::validate(&path);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Envoy's own rate-limit filter reaches the gRPC API only with the token in its
/// `initial_metadata`: without it every call is refused (and counted), and with
/// `failure_mode_deny` Envoy refuses the request.
#[test]
fn the_grpc_api_refuses_calls_without_the_check_token() {
    let controller = Controller::start_with(&ControllerOptions {
        grpc: true,
        check_tokens: Some("another-deployments-token-0123".to_owned()),
        ..ControllerOptions::new(RULES, None)
    });
    let upstream = Upstream::start();
    let envoy = Envoy::start(&EnvoyOptions {
        filter: Filter::NativeRateLimit {
            failure_mode_deny: true,
            rate_limits: envoy::rate_limits_yaml(&[&["{ remote_address: {} }"]]),
        },
        upstream_port: upstream.port(),
        controller_ports: vec![controller.grpc()],
        concurrency: 1,
        controller_http2: true,
    });
    let response = http::get(&envoy.url("/api/native")).expect("answer");
    assert_eq!(response.status, 500, "{response:?}");
    assert!(
        metric(
            &controller,
            "sluice_unauthenticated_calls_total{listener=\"grpc\"} "
        ) >= 1.0,
        "{}",
        controller.log()
    );
}

/// Through real Envoy, under the default configuration: a client that sends a fresh random
/// API key with every request is still one client (counted by its address), so a per-client
/// limit bites.
#[test]
fn random_api_keys_do_not_escape_a_per_client_limit() {
    let controller = Controller::start(RULES, None);
    let upstream = Upstream::start();
    let mut plugin = sluice_plugin_config("deny", 2_000);
    plugin["identity"] = json!({ "api_key_header": "x-api-key" });
    let envoy = Envoy::start(&EnvoyOptions {
        filter: Filter::sluice_with(&plugin),
        upstream_port: upstream.port(),
        controller_ports: vec![controller.port],
        concurrency: 1,
        controller_http2: false,
    });
    let statuses: Vec<u16> = (0..8)
        .map(|n| {
            let key = format!("made-up-key-{n}-{}", std::process::id());
            http::get_with(&envoy.url("/api/keys"), &[("x-api-key", key.as_str())])
                .expect("answer")
                .status
        })
        .collect();
    assert_eq!(
        statuses,
        [200, 200, 200, 200, 200, 429, 429, 429],
        "{}",
        controller.log()
    );
}
