//! What clients are told and what happens when things fail, through a real Envoy running
//! the real `.wasm`: header styles, shadow mode, the denial cache, and the failure mode
//! when the controller dies or has no healthy endpoint.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use sluice_e2e::envoy::{config_yaml, sluice_plugin_config, with_fields, EnvoyOptions, Filter};
use sluice_e2e::http::{self, Response};
use sluice_e2e::{free_port, Controller, Envoy, Upstream};

fn per_client(limit: u64) -> String {
    format!("[[rules]]\nname = \"per-client\"\nlimit = {limit}\nwindow = \"1h\"\n")
}

fn plugin(extra: Value) -> Value {
    with_fields(sluice_plugin_config("deny", 1_000), extra)
}

fn envoy_with(
    plugin: &Value,
    controller_ports: Vec<u16>,
    upstream: &Upstream,
    concurrency: u32,
) -> Envoy {
    Envoy::start(&EnvoyOptions {
        filter: Filter::sluice_with(plugin),
        upstream_port: upstream.port(),
        controller_ports,
        concurrency,
        controller_http2: false,
    })
}

fn get(envoy: &Envoy) -> Response {
    http::get(&envoy.url("/items")).expect("request through envoy")
}

#[test]
fn each_header_style_is_written_on_allowed_and_denied_responses() {
    let upstream = Upstream::start();
    for (style, legacy, ietf) in [
        ("legacy", true, false),
        ("ietf", false, true),
        ("both", true, true),
    ] {
        // A controller per style, so that each sees the client's first request allowed.
        let controller = Controller::start(&per_client(1), None);
        let envoy = envoy_with(
            &plugin(json!({ "headers": style })),
            vec![controller.port],
            &upstream,
            1,
        );
        let responses: Vec<Response> = (0..2).map(|_| get(&envoy)).collect();
        assert_eq!(responses[0].status, 200, "{style}: {:?}", responses[0]);
        let denied = responses.last().expect("two responses");
        assert_eq!(denied.status, 429, "{style}: {denied:?}");
        for response in &responses {
            assert_eq!(
                response.header("x-ratelimit-limit").is_some(),
                legacy,
                "{style}: {response:?}"
            );
            assert_eq!(
                response.header("ratelimit").is_some(),
                ietf,
                "{style}: {response:?}"
            );
            assert_eq!(
                response.header("ratelimit-policy").is_some(),
                ietf,
                "{style}: {response:?}"
            );
        }
        if ietf {
            assert_eq!(
                denied.header("ratelimit-policy"),
                Some(r#""per-client";q=1;w=3600"#)
            );
            let ratelimit = denied.header("ratelimit").unwrap_or_default();
            assert!(
                ratelimit.starts_with(r#""per-client";r=0;t="#),
                "{ratelimit}"
            );
        }
        assert!(denied.number("retry-after") >= 1);
        let body = denied.json();
        assert_eq!(body["policy"], "per-client");
        assert!(
            body["request_id"].as_str().is_some_and(|id| !id.is_empty()),
            "Envoy's x-request-id is in the body: {body}"
        );
    }
}

#[test]
fn shadow_mode_never_blocks_but_reports_what_would_have_happened() {
    let controller = Controller::start(&per_client(2), None);
    let upstream = Upstream::start();
    let envoy = envoy_with(
        &plugin(json!({ "shadow": true })),
        vec![controller.port],
        &upstream,
        1,
    );
    let responses: Vec<Response> = (0..5).map(|_| get(&envoy)).collect();
    let remaining: Vec<u64> = responses
        .iter()
        .map(|r| r.number("x-ratelimit-remaining"))
        .collect();
    assert!(responses.iter().all(|r| r.status == 200), "{responses:?}");
    assert_eq!(remaining, [1, 0, 0, 0, 0]);
    assert_eq!(envoy.stat("wasmcustom.sluice_shadow_limited"), Some(3));
    assert_eq!(envoy.stat("wasmcustom.sluice_limited"), Some(0));
    assert_eq!(envoy.stat("wasmcustom.sluice_allowed"), Some(2));
    assert_eq!(envoy.stat("wasmcustom.sluice_checks"), Some(5));
}

#[test]
fn a_rule_in_shadow_reports_while_enforced_rules_still_bite() {
    let rules = r#"
        [[rules]]
        name = "enforced"
        limit = 4
        window = "1h"

        [[rules]]
        name = "trial"
        limit = 1
        window = "1h"
        shadow = true
    "#;
    let controller = Controller::start(rules, None);
    let upstream = Upstream::start();
    let envoy = envoy_with(&plugin(json!({})), vec![controller.port], &upstream, 1);
    let responses: Vec<Response> = (0..5).map(|_| get(&envoy)).collect();
    let statuses: Vec<u16> = responses.iter().map(|r| r.status).collect();
    assert_eq!(statuses, [200, 200, 200, 200, 429], "{responses:?}");
    let second = &responses[1];
    assert_eq!(
        second.number("x-ratelimit-limit"),
        1,
        "the trial rule speaks: {second:?}"
    );
    assert!(
        second
            .header("ratelimit-policy")
            .is_some_and(|p| p.contains(r#""enforced";q=4"#) && p.contains(r#""trial";q=1"#)),
        "{second:?}"
    );
    assert_eq!(envoy.stat("wasmcustom.sluice_shadow_limited"), Some(3));
    assert_eq!(responses[4].json()["policy"], "enforced");
}

#[test]
fn the_denial_cache_answers_repeat_offenders_without_callouts() {
    let upstream = Upstream::start();

    let cached = Controller::start(&per_client(2), None);
    let envoy = envoy_with(&plugin(json!({})), vec![cached.port], &upstream, 1);
    let statuses: Vec<u16> = (0..30).map(|_| get(&envoy).status).collect();
    assert_eq!(
        statuses.iter().filter(|s| **s == 200).count(),
        2,
        "{statuses:?}"
    );
    assert_eq!(
        statuses.iter().filter(|s| **s == 429).count(),
        28,
        "{statuses:?}"
    );
    assert_eq!(
        cached.checks_served(),
        3,
        "two admitted, one denial, then the cache"
    );
    assert_eq!(envoy.stat("wasmcustom.sluice_denial_cache_hits"), Some(27));
    let cached_reply = get(&envoy);
    assert_eq!(cached_reply.status, 429);
    assert!(cached_reply.number("retry-after") >= 1, "{cached_reply:?}");
    assert_eq!(cached_reply.json()["policy"], "per-client");

    // The same flood without the cache: every request is a callout.
    let uncached = Controller::start(&per_client(2), None);
    let envoy = envoy_with(
        &plugin(json!({ "denial_cache": { "enabled": false } })),
        vec![uncached.port],
        &upstream,
        1,
    );
    let statuses: Vec<u16> = (0..30).map(|_| get(&envoy).status).collect();
    assert_eq!(statuses.iter().filter(|s| **s == 429).count(), 28);
    assert_eq!(uncached.checks_served(), 30);

    // Two workers share the cache: a denial learned on one is known on the other.
    let shared = Controller::start(&per_client(2), None);
    let envoy = envoy_with(&plugin(json!({})), vec![shared.port], &upstream, 2);
    let statuses: Vec<u16> = (0..40).map(|_| get(&envoy).status).collect();
    assert_eq!(
        statuses.iter().filter(|s| **s == 200).count(),
        2,
        "{statuses:?}"
    );
    // Both workers served the flood, and the controller saw one denial in all: with a cache
    // per worker it would have seen one per worker.
    let per_worker = envoy.connections_per_worker(2);
    assert!(
        per_worker.iter().all(|n| *n >= 5),
        "both workers took requests: {per_worker:?}"
    );
    assert_eq!(
        shared.checks_served(),
        3,
        "two admitted and one denial, whichever worker it was on"
    );
}

/// A 429 the denial cache answers is the controller's 429: every rule that applied in its
/// headers, the same body, only the times counted down (and a token bucket's reset kept
/// apart from its retry).
#[test]
fn a_cached_429_is_the_controllers_429_with_its_times_counted_down() {
    let rules = r#"
        [[rules]]
        name = "per-client"
        strategy = "token_bucket"
        limit = 2
        window = "1h"

        [[rules]]
        name = "hourly"
        limit = 100
        window = "1h"
    "#;
    let controller = Controller::start(rules, None);
    let upstream = Upstream::start();
    let envoy = envoy_with(
        &plugin(json!({ "headers": "both" })),
        vec![controller.port],
        &upstream,
        1,
    );
    assert_eq!((get(&envoy).status, get(&envoy).status), (200, 200));
    let from_controller = get(&envoy);
    assert_eq!(controller.checks_served(), 3);
    let from_cache = get(&envoy);
    assert_eq!(
        controller.checks_served(),
        3,
        "the fourth came from the cache"
    );
    assert_eq!(envoy.stat("wasmcustom.sluice_denial_cache_hits"), Some(1));
    for reply in [&from_controller, &from_cache] {
        assert_eq!(reply.status, 429, "{reply:?}");
    }
    // The same headers, by name and (for those that do not count down) by value.
    let names = |reply: &Response| -> Vec<String> {
        let mut names: Vec<String> = reply
            .headers
            .iter()
            .map(|(name, _)| name.to_ascii_lowercase())
            .filter(|name| name != "date" && name != "content-length")
            .collect();
        names.sort();
        names
    };
    assert_eq!(names(&from_cache), names(&from_controller));
    for same in [
        "ratelimit-policy",
        "x-ratelimit-limit",
        "x-ratelimit-remaining",
    ] {
        assert_eq!(
            from_cache.header(same),
            from_controller.header(same),
            "{same}: {from_controller:?} / {from_cache:?}"
        );
    }
    // Both rules, in the IETF header, on both.
    for reply in [&from_controller, &from_cache] {
        let ratelimit = reply.header("ratelimit").unwrap_or_default();
        assert!(
            ratelimit.contains("\"per-client\"") && ratelimit.contains("\"hourly\""),
            "{reply:?}"
        );
    }
    // The same body but for the times and the request id.
    let comparable = |reply: &Response| {
        let mut body = reply.json();
        for key in ["reset", "retry_after", "request_id", "message"] {
            body.as_object_mut().map(|b| b.remove(key));
        }
        body
    };
    assert_eq!(comparable(&from_cache), comparable(&from_controller));
    // A bucket's reset (when it is full again) stays its own, not its retry.
    assert!(
        from_cache.number("x-ratelimit-reset") > from_cache.number("retry-after"),
        "{from_cache:?}"
    );
    assert!(from_cache.number("x-ratelimit-reset") <= from_controller.number("x-ratelimit-reset"));
}

/// One request of the load: when it was sent and answered, and how.
struct Sample {
    sent: Instant,
    done: Instant,
    status: u16,
}

/// Requests from 4 threads for `run` in total; the controller is killed after `kill_at`.
/// Returns every request, and when the kill began and when the controller was gone.
fn load_through_a_dying_controller(
    envoy: &Envoy,
    controller: &mut Controller,
    kill_at: Duration,
    run: Duration,
) -> (Vec<Sample>, Instant, Instant) {
    let stop = Arc::new(AtomicBool::new(false));
    let url = envoy.url("/items");
    let workers: Vec<_> = (0..4)
        .map(|_| {
            let (stop, url) = (Arc::clone(&stop), url.clone());
            std::thread::spawn(move || {
                let mut seen = Vec::new();
                while !stop.load(Ordering::SeqCst) {
                    let sent = Instant::now();
                    let status = http::get(&url).map_or(0, |r| r.status);
                    seen.push(Sample {
                        sent,
                        done: Instant::now(),
                        status,
                    });
                }
                seen
            })
        })
        .collect();
    std::thread::sleep(kill_at);
    let kill_began = Instant::now();
    controller.stop();
    let gone = Instant::now();
    std::thread::sleep(run.saturating_sub(kill_at));
    stop.store(true, Ordering::SeqCst);
    let samples = workers
        .into_iter()
        .flat_map(|worker| worker.join().expect("load thread"))
        .collect();
    (samples, kill_began, gone)
}

#[test]
fn a_controller_killed_mid_run_leaves_every_request_to_the_failure_mode_and_none_hangs() {
    let upstream = Upstream::start();
    for (mode, status_after) in [("deny", 503), ("allow", 200)] {
        let mut controller = Controller::start(&per_client(1_000_000), None);
        let mut config = sluice_plugin_config(mode, 300);
        config["denial_cache"] = json!({ "enabled": false });
        let envoy = envoy_with(&config, vec![controller.port], &upstream, 2);
        let (samples, kill_began, gone) = load_through_a_dying_controller(
            &envoy,
            &mut controller,
            Duration::from_millis(1_500),
            Duration::from_secs(4),
        );
        let before: Vec<u16> = samples
            .iter()
            .filter(|s| s.done < kill_began)
            .map(|s| s.status)
            .collect();
        let after: Vec<u16> = samples
            .iter()
            .filter(|s| s.sent > gone)
            .map(|s| s.status)
            .collect();
        let spanning: Vec<u16> = samples
            .iter()
            .filter(|s| s.done >= kill_began && s.sent <= gone)
            .map(|s| s.status)
            .collect();
        assert!(
            before.len() > 10 && after.len() > 10,
            "{mode}: {} before, {} after",
            before.len(),
            after.len()
        );
        assert!(before.iter().all(|s| *s == 200), "{mode}: {before:?}");
        assert!(
            after.iter().all(|s| *s == status_after),
            "{mode}: {after:?}"
        );
        assert!(
            spanning.iter().all(|s| *s == 200 || *s == status_after),
            "{mode}: in flight at the kill: {spanning:?}"
        );
        let slowest = samples
            .iter()
            .map(|s| s.done - s.sent)
            .max()
            .unwrap_or_default();
        assert!(
            slowest < Duration::from_millis(300 * 2 + 1_500),
            "{mode}: a request took {slowest:?}"
        );
        let failure_stat = if mode == "deny" {
            "wasmcustom.sluice_failure_denied"
        } else {
            "wasmcustom.sluice_failure_allowed"
        };
        assert!(
            envoy.stat(failure_stat).unwrap_or(0) >= after.len() as u64,
            "{mode}: {failure_stat} counts every request after the kill"
        );
        assert!(envoy.stat("wasmcustom.sluice_callout_errors").unwrap_or(0) > 0);
        assert!(
            envoy.log().contains("no decision"),
            "{mode}: the failures are logged"
        );
    }
}

#[test]
fn a_controller_cluster_with_no_healthy_endpoint_fails_at_once() {
    let upstream = Upstream::start();
    let options = EnvoyOptions {
        filter: Filter::sluice_with(&sluice_plugin_config("deny", 2_000)),
        upstream_port: upstream.port(),
        controller_ports: vec![],
        concurrency: 1,
        controller_http2: false,
    };
    let (port, admin_port) = (free_port(), free_port());
    let discard = "\n        - endpoint: { address: { socket_address: { address: 127.0.0.1, port_value: 9 } } }";
    let config = config_yaml(&options, port, admin_port);
    assert!(
        config.contains(discard),
        "the harness's placeholder endpoint"
    );
    let config = config.replace(&format!("lb_endpoints:{discard}"), "lb_endpoints: []");
    let envoy = Envoy::start_with_config(&config, port, admin_port, 1);
    for _ in 0..5 {
        let started = Instant::now();
        let response = get(&envoy);
        assert_eq!(response.status, 503, "{response:?}");
        assert!(
            started.elapsed() < Duration::from_millis(1_000),
            "waited {:?} with no endpoint to wait for",
            started.elapsed()
        );
    }
    assert!(envoy.log().contains("no decision"), "{}", envoy.log());
}

#[test]
fn a_rules_own_failure_mode_holds_for_its_requests_when_the_controller_is_gone() {
    let rules = r#"
        [[rules]]
        name = "payments"
        limit = 1000
        window = "1h"
        failure_mode = "deny"
        match = { path_prefix = "/pay" }

        [[rules]]
        name = "everything"
        limit = 1000
        window = "1h"
    "#;
    let mut controller = Controller::start(rules, None);
    let upstream = Upstream::start();
    let mut config = sluice_plugin_config("allow", 300);
    config["controller"]["config_poll_ms"] = json!(1_000);
    let envoy = envoy_with(&config, vec![controller.port], &upstream, 2);
    // Each VM (the main thread's and each worker's) logs the rules when it first reads them.
    envoy.wait_until_vms_read_the_configuration(3);
    let status = |path: &str| http::get(&envoy.url(path)).expect("request").status;
    assert_eq!((status("/pay/1"), status("/items")), (200, 200));
    controller.stop();
    for _ in 0..5 {
        assert_eq!(status("/pay/1"), 503, "the payments rule says deny");
        assert_eq!(status("/items"), 200, "the filter's own mode says allow");
    }
    // Every read logs the count, also when it is zero: this one names the one rule.
    assert!(
        envoy
            .log()
            .contains("2 rules (1 with a failure mode of their own)"),
        "{}",
        envoy.log()
    );
}

/// `config_poll_ms: 0`: the filter never reads the rules, so a rule that matches a header
/// never applies to its requests (the filter does not know to send the header), while a
/// filter that reads them, beside it on the same controller, applies it.
#[test]
fn a_filter_told_not_to_read_rules_never_reads_them() {
    let rules = r#"
        [[rules]]
        name = "pro"
        limit = 1
        window = "1h"
        match = { headers = [{ name = "x-plan", value = "pro" }] }
    "#;
    let controller = Controller::start(rules, None);
    let upstream = Upstream::start();
    let mut reading = sluice_plugin_config("deny", 1_000);
    reading["controller"]["config_poll_ms"] = json!(1_000);
    let mut never = sluice_plugin_config("deny", 1_000);
    never["controller"]["config_poll_ms"] = json!(0);
    let reader = envoy_with(&reading, vec![controller.port], &upstream, 1);
    let blind = envoy_with(&never, vec![controller.port], &upstream, 1);
    // Both filters' ticks have run a few times by the time the reader has read twice.
    sluice_e2e::wait_until(
        "the reader read the rules twice",
        Duration::from_secs(15),
        || reader.stat("wasmcustom.sluice_config_reads").unwrap_or(0) >= 2,
    );
    reader.wait_until_vms_read_the_configuration(2);
    assert_eq!(blind.stat("wasmcustom.sluice_config_reads"), Some(0));
    let pro = |envoy: &Envoy| {
        http::get_with(&envoy.url("/items"), &[("x-plan", "pro")])
            .expect("request")
            .status
    };
    assert_eq!(
        (pro(&reader), pro(&reader)),
        (200, 429),
        "the reader applies it"
    );
    assert_eq!(
        (pro(&blind), pro(&blind)),
        (200, 200),
        "the blind filter cannot"
    );
}
