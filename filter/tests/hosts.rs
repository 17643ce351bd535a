//! One filter binary, two proxy-wasm hosts (issue 25): the request path run natively
//! against the mock host behaving as Envoy does and as Kong's ngx_wasm_module does where
//! they differ (`testing.rs`), and the portable layer (`flavour.rs`) on its own. A mock host
//! in the ngx profile records every call that would trap there; each ngx test expects none.

#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use sluice_filter::flavour::{probe, Portable};
use sluice_filter::host::{Action, Flavour, HeaderMap, Host, LogLevel, Status};
use sluice_filter::testing::{Call, MockEnvoy, MockHost};
use sluice_protocol::{
    CheckRequest, CheckResponse, Decision, PolicyStatus, ReleaseRequest, Strategy,
};

const PEER: &[&str] = &["source", "address"];

fn plugin(cluster: &str, extra: serde_json::Value) -> Vec<u8> {
    let mut config = serde_json::json!({
        "controller": { "cluster": cluster, "timeout_ms": 200, "config_poll_ms": 1_000 },
    });
    if let (Some(target), serde_json::Value::Object(extra)) = (config.as_object_mut(), extra) {
        target.extend(extra);
    }
    config.to_string().into_bytes()
}

/// A request as nginx hands it over: header names in the client's case, `:authority` the
/// server's own name and port, the client's host in `Host`.
fn nginx_request(path: &[u8]) -> Vec<u8> {
    HeaderMap::serialize::<&[u8], &[u8]>(&[
        (b":method", b"GET"),
        (b":path", path),
        (b":authority", b"localhost:8080"),
        (b"Host", b"api.example.com"),
        (b"X-Api-Key", b"key-1"),
    ])
}

fn path_of(call: &Call) -> &str {
    call.headers
        .iter()
        .find(|(name, _)| name == ":path")
        .map_or("", |(_, value)| value.as_str())
}

fn calls_to(envoy: &MockEnvoy, path: &str) -> Vec<Call> {
    envoy
        .calls()
        .into_iter()
        .filter(|call| path_of(call) == path)
        .collect()
}

fn decision(allowed: bool, leases: &[&str]) -> Vec<u8> {
    let policy = PolicyStatus {
        rule: "per-client".into(),
        strategy: Strategy::FixedWindow,
        limit: 2,
        remaining: u64::from(allowed),
        reset_ms: 7_000,
        retry_after_ms: if allowed { 0 } else { 7_000 },
        window_ms: 10_000,
        delay_ms: 0,
        reason: None,
        usage: false,
    };
    let decision = Decision {
        allowed,
        policy: Some(policy),
        leases: leases.iter().map(|l| (*l).to_owned()).collect(),
        ..Decision::unlimited()
    };
    serde_json::to_vec(&CheckResponse {
        decisions: vec![decision],
    })
    .unwrap()
}

fn logged(envoy: &MockEnvoy, text: &str) -> bool {
    envoy
        .host
        .state
        .borrow()
        .logs
        .iter()
        .any(|(_, line)| line.contains(text))
}

/// Reads the configuration on the first tick, as both hosts allow from `on_tick`.
fn read_configuration(envoy: &mut MockEnvoy) {
    envoy.tick(1_000);
    let read = calls_to(envoy, "/v1/config")
        .pop()
        .expect("a configuration read");
    envoy.answer_with(read.token, "200", br#"{"version":1}"#);
}

#[test]
fn the_host_is_probed_without_a_trap_and_a_named_host_wins() {
    let config = plugin("127.0.0.1:8081", serde_json::json!({}));
    let (ngx, started) = MockEnvoy::start_as(Flavour::Ngx, &config);
    assert!(started);
    assert!(logged(&ngx, "host ngx"), "probed as ngx");
    assert!(
        logged(&ngx, "batching is off"),
        "and said why batching is off"
    );
    assert_eq!(ngx.traps(), Vec::<String>::new());
    assert!(
        ngx.host.state.borrow().queues.is_empty(),
        "no queue registered"
    );

    let (envoy, started) = MockEnvoy::start_as(Flavour::Envoy, &config);
    assert!(started);
    assert!(logged(&envoy, "host envoy"), "probed as Envoy");
    assert_eq!(
        envoy.host.state.borrow().queues.len(),
        1,
        "batching's queue"
    );

    // Named in the configuration: no probe, whatever the host would answer.
    let named = plugin("127.0.0.1:8081", serde_json::json!({ "host": "ngx" }));
    let (envoy_told_ngx, _) = MockEnvoy::start_as(Flavour::Envoy, &named);
    assert!(logged(&envoy_told_ngx, "host ngx"));
    let named = plugin("127.0.0.1:8081", serde_json::json!({ "host": "envoy" }));
    let (ngx_told_envoy, started) = MockEnvoy::start_as(Flavour::Ngx, &named);
    assert!(!started, "batching's queue could not be registered");
    assert_eq!(
        ngx_told_envoy.traps(),
        vec!["proxy_register_shared_queue of an undeclared queue".to_owned()],
        "the mock traps as ngx would: batching cannot run there"
    );
}

#[test]
fn the_probe_reads_the_answer_to_a_context_no_host_has() {
    let envoy = MockHost::default();
    assert_eq!(probe(&envoy), Flavour::Envoy);
    let ngx = MockHost::default();
    ngx.state.borrow_mut().profile = Flavour::Ngx;
    assert_eq!(probe(&ngx), Flavour::Ngx);
}

/// The request path on ngx: one callout per request to an `ip:port` target, the client's
/// `Host`, header names in any case, a 429 whose reason phrase stays the status's own, and
/// one tick period for good; nothing traps.
#[test]
fn on_ngx_requests_are_allowed_allowed_and_limited_without_a_trap() {
    let config = plugin(
        "127.0.0.1:8081",
        serde_json::json!({ "identity": { "api_key_header": "x-api-key" } }),
    );
    let (mut ngx, started) = MockEnvoy::start_as(Flavour::Ngx, &config);
    assert!(started);
    read_configuration(&mut ngx);
    for allowed in [true, true, false] {
        let (request, action) = ngx.request(nginx_request(b"/items"), &[(PEER, b"192.0.2.1")]);
        assert_eq!(action, Action::Pause);
        ngx.run_queues();
        let check = calls_to(&ngx, "/v1/check")
            .pop()
            .expect("its own check call");
        assert_eq!(check.cluster, "127.0.0.1:8081", "the target as given");
        assert_eq!(check.caller, request, "made from the request itself");
        let sent: CheckRequest = serde_json::from_slice(&check.body).unwrap();
        assert_eq!(sent.checks.len(), 1);
        assert_eq!(
            sent.checks[0].host, "api.example.com",
            "Host, not :authority"
        );
        assert!(
            sent.checks[0].api_key.is_some(),
            "the API key was found under X-Api-Key: {:?}",
            sent.checks[0]
        );
        ngx.answer_with(check.token, "200", &decision(allowed, &[]));
        assert!(ngx.settled(request), "allowed {allowed}");
        if allowed {
            assert_eq!(ngx.reply(request), None);
            assert_eq!(ngx.respond(request), Action::Continue);
            let headers = ngx.host.state.borrow().response_headers[&request].clone();
            assert!(
                headers.iter().any(|(n, _)| n == "x-ratelimit-remaining"),
                "{headers:?}"
            );
        } else {
            let reply = ngx.reply(request).expect("a 429");
            assert_eq!(reply.status, 429);
            assert_eq!(reply.details, "", "ngx makes details the reason phrase");
            assert!(reply.headers.iter().any(|(n, _)| n == "retry-after"));
        }
        ngx.finish(request);
    }
    for _ in 0..5 {
        ngx.tick(1_000);
    }
    assert_eq!(
        ngx.host.state.borrow().tick_periods,
        vec![1_000],
        "one period reached the host"
    );
    assert_eq!(ngx.traps(), Vec::<String>::new());
}

/// ngx traps on a callout from `on_log`: a request's concurrency leases go back from the
/// next tick there, and at once in Envoy, as before.
#[test]
fn concurrency_leases_go_back_from_the_next_tick_on_ngx_and_at_once_in_envoy() {
    let releases = |envoy: &MockEnvoy| -> Vec<Vec<String>> {
        calls_to(envoy, "/v1/release")
            .iter()
            .map(|call| {
                serde_json::from_slice::<ReleaseRequest>(&call.body)
                    .unwrap()
                    .leases
            })
            .collect()
    };
    let config = plugin("127.0.0.1:8081", serde_json::json!({ "batching": false }));
    for profile in [Flavour::Ngx, Flavour::Envoy] {
        let (mut host, _) = MockEnvoy::start_as(profile, &config);
        let (request, _) = host.request(nginx_request(b"/ws"), &[(PEER, b"192.0.2.1")]);
        let check = calls_to(&host, "/v1/check").pop().expect("a check call");
        host.answer_with(check.token, "200", &decision(true, &["slot-1"]));
        host.respond(request);
        host.finish(request);
        match profile {
            Flavour::Ngx => {
                assert!(releases(&host).is_empty(), "not from on_log");
                host.tick(1_000);
                assert_eq!(releases(&host), vec![vec!["slot-1".to_owned()]]);
            }
            Flavour::Envoy => {
                assert_eq!(releases(&host), vec![vec!["slot-1".to_owned()]]);
            }
        }
        assert_eq!(host.traps(), Vec::<String>::new(), "{profile:?}");
    }
}

/// The denial cache on ngx: CAS 0 does not overwrite there, so a write reads the key's CAS
/// first; a denial cached over an older one is found.
#[test]
fn on_ngx_a_denial_is_cached_over_an_older_one() {
    let config = plugin("127.0.0.1:8081", serde_json::json!({}));
    let (mut ngx, _) = MockEnvoy::start_as(Flavour::Ngx, &config);
    read_configuration(&mut ngx);
    let deny = |ngx: &mut MockEnvoy| {
        let (request, _) = ngx.request(nginx_request(b"/items"), &[(PEER, b"192.0.2.1")]);
        match calls_to(ngx, "/v1/check").pop() {
            Some(check) => {
                ngx.answer_with(check.token, "200", &decision(false, &[]));
                true
            }
            None => {
                assert_eq!(ngx.reply(request).map(|r| r.status), Some(429));
                false
            }
        }
    };
    assert!(deny(&mut ngx), "the first denial is the controller's");
    assert!(!deny(&mut ngx), "then the cache's");
    // The cached denial runs out; the next one is written over it.
    ngx.tick(8_000);
    assert!(deny(&mut ngx), "asked again once the denial ran out");
    assert!(!deny(&mut ngx), "and cached again over the old entry");
    assert_eq!(ngx.host.metric("sluice_denial_cache_hits"), 2);
    assert_eq!(ngx.traps(), Vec::<String>::new());
}

#[test]
fn the_portable_layer_writes_with_the_cas_the_host_needs() {
    // ngx: CAS 0 over an existing key is refused; the layer reads the CAS first.
    let ngx = MockHost::default();
    ngx.state.borrow_mut().profile = Flavour::Ngx;
    assert_eq!(ngx.set_shared_data("k", b"1"), Ok(()));
    assert_eq!(ngx.set_shared_data("k", b"2"), Err(Status::CasMismatch));
    let portable = Portable::new(ngx);
    portable.adopt(Flavour::Ngx, LogLevel::Info);
    assert_eq!(portable.set_shared_data("k", b"2"), Ok(()));
    assert_eq!(portable.shared_data("k"), Ok(Some(b"2".to_vec())));
    assert_eq!(portable.set_shared_data("new", b"3"), Ok(()));

    // Envoy: CAS 0 writes unconditionally, and the layer adds no read (a failing read
    // would show).
    let envoy = Portable::new(MockHost::default());
    envoy.adopt(Flavour::Envoy, LogLevel::Info);
    envoy.state.borrow_mut().failing.insert(
        sluice_filter::testing::HostCall::SharedData,
        Status::InternalFailure,
    );
    assert_eq!(envoy.set_shared_data("k", b"1"), Ok(()));
    assert_eq!(envoy.set_shared_data("k", b"2"), Ok(()));
    assert_eq!(envoy.state.borrow().shared_data["k"], b"2".to_vec());
}

#[test]
fn the_portable_layer_passes_one_tick_period_to_ngx_and_every_one_to_envoy() {
    for (profile, reached) in [
        (Flavour::Ngx, vec![1_000]),
        (Flavour::Envoy, vec![1_000, 5, 1_000]),
    ] {
        let raw = MockHost::default();
        raw.state.borrow_mut().profile = profile;
        let host = Portable::new(raw);
        host.adopt(profile, LogLevel::Info);
        for period in [1_000, 5, 1_000] {
            assert_eq!(host.set_tick_period_ms(1, period), Ok(()));
        }
        assert_eq!(host.state.borrow().tick_periods, reached, "{profile:?}");
        assert!(host.state.borrow().traps.is_empty(), "{profile:?}");
    }
}

/// ngx keeps a tick period per root context: a second root of the filter in the same VM
/// gets its own first period.
#[test]
fn on_ngx_each_root_context_gets_its_first_tick_period() {
    let raw = MockHost::default();
    raw.state.borrow_mut().profile = Flavour::Ngx;
    let host = Portable::new(raw);
    host.adopt(Flavour::Ngx, LogLevel::Info);
    for (root, period) in [(1, 1_000), (2, 1_000), (1, 5), (2, 5)] {
        {
            let mut state = host.state.borrow_mut();
            state.root = root;
            state.effective = root;
        }
        assert_eq!(host.set_tick_period_ms(root, period), Ok(()));
    }
    assert_eq!(host.state.borrow().tick_periods, vec![1_000, 1_000]);
    assert!(host.state.borrow().traps.is_empty());
}

/// Envoy as before: batching over a shared queue, a 429's details for the access log.
#[test]
fn envoy_keeps_batching_and_the_details_of_its_local_replies() {
    let config = plugin("sluice_controller", serde_json::json!({}));
    let (mut envoy, _) = MockEnvoy::start_as(Flavour::Envoy, &config);
    let (request, action) = envoy.request(nginx_request(b"/items"), &[(PEER, b"192.0.2.1:5")]);
    assert_eq!(action, Action::Pause);
    assert!(envoy.calls().is_empty(), "waits for the batch");
    envoy.run_queues();
    let batch = calls_to(&envoy, "/v1/check").pop().expect("a batch");
    assert_eq!(batch.caller, envoy.root, "the root's callout");
    let sent: CheckRequest = serde_json::from_slice(&batch.body).unwrap();
    assert_eq!(sent.checks[0].host, "localhost:8080", ":authority in Envoy");
    envoy.answer_with(batch.token, "200", &decision(false, &[]));
    let reply = envoy.reply(request).expect("a 429");
    assert_eq!(reply.details, "sluice_rate_limited");
    assert_eq!(envoy.traps(), Vec::<String>::new());
}

#[test]
fn the_log_level_comes_from_the_configuration() {
    for (level, info_sent) in [(None, true), (Some("warn"), false), (Some("debug"), true)] {
        let extra = level.map_or(
            serde_json::json!({}),
            |l| serde_json::json!({ "log_level": l }),
        );
        let (envoy, _) = MockEnvoy::start(&plugin("sluice_controller", extra));
        assert_eq!(logged(&envoy, "configured"), info_sent, "{level:?}");
        let debug = envoy
            .host
            .state
            .borrow()
            .logs
            .iter()
            .any(|(l, _)| *l == LogLevel::Debug);
        assert!(!debug, "no debug line yet at {level:?}");
        assert_eq!(
            envoy.host.log_level() <= LogLevel::Debug,
            level == Some("debug"),
            "{level:?}"
        );
    }
}

#[test]
fn header_names_are_read_in_lower_case_whatever_the_host_sent() {
    let map = HeaderMap::from_pairs(&[("X-Api-Key", "k"), ("HOST", "a.example")]);
    assert_eq!(map.get_utf8("x-api-key").as_deref(), Some("k"));
    assert_eq!(map.get_utf8("host").as_deref(), Some("a.example"));
}
