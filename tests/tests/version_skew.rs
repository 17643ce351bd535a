//! Version skew (UPGRADING.md): Envoys and the controller Deployment roll out apart, so for
//! a while a filter of one release talks to a controller of the next, or the reverse. Every
//! request must still be limited exactly, and none may fall to the failure mode:
//! - the previous release's `.wasm` (built from its git ref by `make test`, with
//!   `scripts/build-at-ref.sh`) in front of this controller;
//! - this `.wasm` in front of the previous release's controller;
//! - this `.wasm` in front of a controller a release ahead, which adds fields to every
//!   reply (a stand-in: a proxy that adds them to the real controller's answers);
//! - this controller reading calls from a filter a release ahead, with fields added.

use std::path::{Path, PathBuf};

use serde_json::json;
use sluice_e2e::controller::ControllerOptions;
use sluice_e2e::envoy::{sluice_plugin_config, EnvoyOptions, Filter};
use sluice_e2e::http;
use sluice_e2e::newer_controller::NewerController;
use sluice_e2e::{repo_root, required_file, Controller, Envoy, Upstream};

const LIMIT: u64 = 3;

/// A limit per client, and one that matches a header, so that the filter must read the
/// rules from the controller's configuration view to send the header along.
const RULES: &str = r#"
[[rules]]
name = "per-client"
limit = 3
window = "1h"

[[rules]]
name = "per-plan"
limit = 100
window = "1h"
match = { headers = [{ name = "x-plan", value = "free" }] }
"#;

fn previous_release(variable: &str, what: &str) -> PathBuf {
    required_file(
        variable,
        &repo_root().join("target/at-ref/(previous release not built)"),
        &format!(
            "run `scripts/build-at-ref.sh <PREVIOUS_RELEASE in the Makefile> {what}`; `make \
             test` does"
        ),
    )
}

fn envoy(controller_port: u16, upstream: &Upstream, wasm: Option<&Path>) -> Envoy {
    let plugin_config = sluice_plugin_config("deny", 2_000).to_string();
    let filter = match wasm {
        Some(wasm) => Filter::SluiceBuild {
            plugin_config,
            wasm: wasm.to_path_buf(),
        },
        None => Filter::Sluice { plugin_config },
    };
    Envoy::start_logging(
        &EnvoyOptions {
            filter,
            upstream_port: upstream.port(),
            controller_ports: vec![controller_port],
            concurrency: 1,
            controller_http2: false,
        },
        "info",
    )
}

/// The client's `LIMIT` requests pass counting down, the next is refused by the rule, none
/// was answered from the failure mode, and the filter read the configuration (it sends the
/// header the second rule matches on, which only the view tells it).
fn limited_exactly(envoy: &Envoy) {
    envoy.wait_until_vms_read_the_configuration(2);
    for remaining in (0..LIMIT).rev() {
        let response = http::get_with(&envoy.url("/items"), &[("x-plan", "free")])
            .expect("request through envoy");
        assert_eq!(response.status, 200, "{response:?}\n{}", envoy.log());
        assert_eq!(response.number("x-ratelimit-limit"), LIMIT, "{response:?}");
        assert_eq!(response.number("x-ratelimit-remaining"), remaining);
        // Both rules applied: the plan's limit is in the RateLimit fields too.
        let policy = response.header("ratelimit-policy").unwrap_or_default();
        assert!(policy.contains("\"per-plan\""), "{response:?}");
    }
    let denied = http::get_with(&envoy.url("/items"), &[("x-plan", "free")]).expect("request");
    assert_eq!(denied.status, 429, "{denied:?}\n{}", envoy.log());
    assert_eq!(denied.json()["policy"], "per-client");
    assert_eq!(envoy.stat("wasmcustom.sluice_failure_allowed"), Some(0));
    assert_eq!(envoy.stat("wasmcustom.sluice_failure_denied"), Some(0));
    assert!(envoy.stat("wasmcustom.sluice_config_reads").unwrap_or(0) >= 1);
}

/// `sluice_filter_config_reads_total{release}` on the controller.
fn filter_config_reads(controller: &Controller, release: &str) -> u64 {
    let series = format!("sluice_filter_config_reads_total{{release=\"{release}\"}} ");
    let metrics = http::get(&controller.admin_url("/metrics")).expect("metrics");
    metrics
        .body
        .lines()
        .find_map(|line| line.strip_prefix(series.as_str()))
        .map_or(0, |value| value.trim().parse().expect("a count"))
}

/// `RULES` and a usage rule over every request, which the previous release does not know:
/// it reads the view all the same, and is charged each request's reservation.
fn rules_with_usage() -> String {
    format!(
        r#"{RULES}
[[rules]]
name = "usage-budget"
limit = 1000000
window = "1h"
usage = {{ response_header = "x-usage", reserve = 1 }}
"#
    )
}

#[test]
fn the_previous_releases_filter_is_limited_exactly_by_this_controller() {
    let wasm = previous_release("SLUICE_PREVIOUS_WASM", "filter");
    let controller = Controller::start(&rules_with_usage(), None);
    let upstream = Upstream::start();
    let envoy = envoy(controller.port, &upstream, Some(&wasm));
    limited_exactly(&envoy);
    // The previous release names no release of its own.
    assert!(filter_config_reads(&controller, "unknown") >= 1);
}

#[test]
fn this_filter_is_limited_exactly_by_the_previous_releases_controller() {
    let binary = previous_release("SLUICE_PREVIOUS_CONTROLLER_BIN", "controller");
    let controller = Controller::start_with(&ControllerOptions {
        binary: Some(&binary),
        ..ControllerOptions::new(RULES, None)
    });
    let upstream = Upstream::start();
    let envoy = envoy(controller.port, &upstream, None);
    limited_exactly(&envoy);
}

#[test]
fn this_filter_reads_a_newer_controllers_replies_ignoring_the_fields_it_adds() {
    let controller = Controller::start(RULES, None);
    let newer = NewerController::start(controller.port);
    let upstream = Upstream::start();
    let envoy = envoy(newer.port, &upstream, None);
    limited_exactly(&envoy);
    assert!(newer.objects_changed() > 0);
    // The filter names its release on every call: the controller counts it.
    assert!(filter_config_reads(&controller, env!("CARGO_PKG_VERSION")) >= 1);
    assert_eq!(filter_config_reads(&controller, "unknown"), 0);
    // It says once per configuration version what it ignores, naming each field.
    let log = envoy.log();
    assert!(
        log.contains("carries fields this filter does not know")
            && log.contains("rules[].next_release_shard")
            && log.contains("rules[].match.headers[].next_release_detail"),
        "{log}"
    );
}

#[test]
fn this_controller_reads_a_newer_filters_calls_ignoring_the_fields_they_add() {
    let controller = Controller::start(RULES, None);
    let check = json!({
        "checks": [{
            "client": { "kind": "ip", "value": "10.1.2.3", "next_release_zone": "eu" },
            "method": "GET", "path": "/items", "cost": 1,
            "headers": { "x-plan": "free" },
            "next_release_priority": "high"
        }],
        "next_release_trace": { "id": "abc" }
    });
    for expected_remaining in (0..LIMIT).rev() {
        let reply = http::post_check(&controller.url("/v1/check"), &check).expect("check");
        assert_eq!(reply.status, 200, "{reply:?}");
        let decision = &reply.json()["decisions"][0];
        assert_eq!(decision["allowed"], true, "{decision}");
        assert_eq!(decision["policy"]["rule"], "per-client", "{decision}");
        assert_eq!(decision["policy"]["remaining"], expected_remaining);
        assert_eq!(decision["others"][0]["rule"], "per-plan", "{decision}");
    }
    let reply = http::post_check(&controller.url("/v1/check"), &check).expect("check");
    assert_eq!(reply.json()["decisions"][0]["allowed"], false, "{reply:?}");
    let report = json!({ "responses": 2, "server_errors": 0, "next_release_latency": [1, 2] });
    let reply = http::post_check(&controller.url("/v1/report"), &report).expect("report");
    assert!(reply.status < 300, "{reply:?}");
}

/// The previous release's filter in front of this controller under lease mode: this
/// controller's grants carry a token (to give unused quota back) inside `grant`, where the
/// previous release takes unknown fields; it admits from the leases as before, and nothing
/// falls to the failure mode.
#[test]
fn the_previous_releases_filter_takes_this_controllers_leases() {
    let wasm = previous_release("SLUICE_PREVIOUS_WASM", "filter");
    let rules = r#"
[[rules]]
name = "hot"
limit = 1000
window = "1h"
scope = "global"
match = { path = "/hot" }
leased = { share_percent = 50 }
"#;
    let controller = Controller::start(rules, None);
    let upstream = Upstream::start();
    let envoy = envoy(controller.port, &upstream, Some(&wasm));
    envoy.wait_until_vms_read_the_configuration(2);
    for _ in 0..40 {
        let response = http::get(&envoy.url("/hot")).expect("request through envoy");
        assert_eq!(response.status, 200, "{response:?}\n{}", envoy.log());
    }
    let leased = envoy
        .stat("wasmcustom.sluice_leased_admissions")
        .unwrap_or(0);
    assert!(
        leased >= 16,
        "admitted from this controller's leases: {leased}\n{}",
        envoy.log()
    );
    assert_eq!(envoy.stat("wasmcustom.sluice_failure_allowed"), Some(0));
    assert_eq!(envoy.stat("wasmcustom.sluice_failure_denied"), Some(0));
}
