//! The request path as Envoy drives it (context creation, headers, queue wake-ups, callout
//! replies, ticks, the end of each stream), run natively against the mock host: first a few
//! scenarios, then a property test that feeds arbitrary bytes to everything the filter reads
//! from Envoy, makes host calls fail, and checks that nothing panics and no request is left
//! waiting.
//!
//! `PROPTEST_CASES=20000 cargo test -p sluice-filter --release --test request_path` for a
//! longer run by hand.

// Helpers of a test file may panic: a failed expectation is the test failing.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use proptest::prelude::*;
use sluice_filter::host::{Action, Flavour, HeaderMap, LogLevel, Status};
use sluice_filter::testing::{HostCall, MockEnvoy};
use sluice_protocol::{CheckRequest, CheckResponse, Decision, PolicyStatus, Strategy as Algorithm};

const PEER: &[&str] = &["source", "address"];

fn plugin(extra: serde_json::Value) -> Vec<u8> {
    let mut config = serde_json::json!({
        "controller": { "cluster": "sluice_controller", "timeout_ms": 200 },
    });
    if let (Some(target), serde_json::Value::Object(extra)) = (config.as_object_mut(), extra) {
        target.extend(extra);
    }
    config.to_string().into_bytes()
}

fn headers(pairs: &[(&[u8], &[u8])]) -> Vec<u8> {
    HeaderMap::serialize(pairs)
}

fn get(path: &[u8], extra: &[(&[u8], &[u8])]) -> Vec<u8> {
    let mut pairs: Vec<(&[u8], &[u8])> = vec![
        (b":method", b"GET"),
        (b":path", path),
        (b":authority", b"api.example.com"),
    ];
    pairs.extend_from_slice(extra);
    headers(&pairs)
}

fn status(allowed: bool) -> PolicyStatus {
    PolicyStatus {
        rule: "per-client".into(),
        strategy: Algorithm::FixedWindow,
        limit: 5,
        remaining: if allowed { 4 } else { 0 },
        reset_ms: 7_000,
        retry_after_ms: if allowed { 0 } else { 7_000 },
        window_ms: 10_000,
        delay_ms: 0,
        reason: None,
        usage: false,
    }
}

/// A 200 reply deciding each check of `body` (a check call) as `allow` says.
fn decisions_for(body: &[u8], mut allow: impl FnMut(usize) -> bool) -> Vec<u8> {
    let request: CheckRequest = serde_json::from_slice(body).expect("the filter sends JSON");
    let decisions = (0..request.checks.len())
        .map(|index| {
            let allowed = allow(index);
            Decision {
                allowed,
                policy: Some(status(allowed)),
                ..Decision::unlimited()
            }
        })
        .collect();
    serde_json::to_vec(&CheckResponse { decisions }).expect("encode")
}

fn checks_in(body: &[u8]) -> Vec<sluice_protocol::Check> {
    serde_json::from_slice::<CheckRequest>(body)
        .expect("a check call")
        .checks
}

#[test]
fn a_header_that_is_not_utf8_is_just_another_request() {
    let (mut envoy, configured) = MockEnvoy::start(&plugin(serde_json::json!({})));
    assert!(configured);
    let (hostile, action) = envoy.request(
        get(b"/hello", &[(b"x-other", b"caf\xe9 \xff\xfe")]),
        &[(PEER, b"192.0.2.7:5000")],
    );
    assert_eq!(
        action,
        Action::Pause,
        "it waits for its decision like any other"
    );
    envoy.run_queues();
    let call = envoy.calls().pop().expect("a batch went out");
    envoy.answer_with(call.token, "200", &decisions_for(&call.body, |_| true));
    assert!(envoy.settled(hostile));
    assert_eq!(envoy.respond(hostile), Action::Continue);
    let response = envoy.host.state.borrow().response_headers[&hostile].clone();
    assert!(response
        .iter()
        .any(|(n, v)| n == "x-ratelimit-remaining" && v == "4"));
    envoy.finish(hostile);

    let (next, action) = envoy.request(get(b"/hello", &[]), &[(PEER, b"192.0.2.8:5000")]);
    assert_eq!(action, Action::Pause);
    envoy.run_queues();
    let call = envoy.calls().pop().expect("the next batch went out");
    envoy.answer_with(call.token, "200", &decisions_for(&call.body, |_| false));
    let reply = envoy.reply(next).expect("a 429");
    assert_eq!(reply.status, 429);
    assert_eq!(reply.details, "sluice_rate_limited");
}

#[test]
fn each_identity_input_decides_on_purpose_what_bytes_mean() {
    let config = plugin(serde_json::json!({
        "identity": {
            "order": ["api_key", "header", "ip"],
            "api_key_header": "x-api-key",
            "client_header": "x-client-id",
            "ip": { "trusted_hops": 1 }
        },
        "cost_header": "x-cost",
    }));
    let (mut envoy, configured) = MockEnvoy::start(&config);
    assert!(configured);
    let long = vec![b'k'; 2_000];
    let requests: Vec<Vec<u8>> = vec![
        get(b"/a", &[(b"x-api-key", b"\xff\xfekey")]),
        get(b"/a", &[(b"x-client-id", b"t\xe9nant")]),
        get(b"/a", &[(b"x-client-id", &long)]),
        get(b"/a", &[(b"x-forwarded-for", b"\xff, 198.51.100.4")]),
        get(b"/caf\xe9?q=\xff", &[(b"x-cost", b"\xff9")]),
    ];
    for request in requests {
        envoy.request(request, &[(PEER, b"10.0.0.2:5000")]);
    }
    envoy.run_queues();
    let call = envoy.calls().pop().expect("one batch");
    let checks = checks_in(&call.body);
    assert_eq!(checks.len(), 5);
    let digest = |bytes: &[u8]| sluice_filter::identity::api_key_digest(bytes);
    assert_eq!(checks[0].client.kind, "api_key");
    assert_eq!(checks[0].client.value, digest(b"\xff\xfekey"));
    assert_eq!(checks[1].client.kind, "header");
    assert_eq!(
        checks[1].client.value,
        format!("sha256:{}", digest(b"t\xe9nant"))
    );
    assert_eq!(checks[2].client.value, format!("sha256:{}", digest(&long)));
    // The hop that is not an address stops the search at the trusted peer.
    assert_eq!(checks[3].client.value, "10.0.0.2");
    assert_eq!(
        checks[4].path, "/caf\u{fffd}",
        "the query never leaves the filter"
    );
    assert_eq!(checks[4].cost, 1, "a cost that is not a number counts 1");
}

#[test]
fn an_unreadable_request_gets_the_failure_mode_not_a_hang() {
    for (mode, expected) in [("allow", Action::Continue), ("deny", Action::Pause)] {
        let (mut envoy, _) = MockEnvoy::start(&plugin(serde_json::json!({ "failure_mode": mode })));
        envoy
            .host
            .state
            .borrow_mut()
            .failing
            .insert(HostCall::HeaderMap, Status::SerializationFailure);
        let (request, action) = envoy.request(get(b"/", &[]), &[]);
        assert_eq!(action, expected, "{mode}");
        if mode == "deny" {
            assert_eq!(envoy.reply(request).map(|r| r.status), Some(503));
        }
        assert_eq!(envoy.host.metric("sluice_callout_errors"), 1);
    }
}

#[test]
fn a_lost_local_reply_lets_the_request_go_on() {
    let (mut envoy, _) = MockEnvoy::start(&plugin(serde_json::json!({})));
    envoy
        .host
        .state
        .borrow_mut()
        .failing
        .insert(HostCall::SendLocalResponse, Status::BadArgument);
    let (request, _) = envoy.request(get(b"/", &[]), &[(PEER, b"192.0.2.1:1")]);
    envoy.run_queues();
    let call = envoy.calls().pop().expect("a batch");
    envoy.answer_with(call.token, "200", &decisions_for(&call.body, |_| false));
    assert!(envoy.settled(request), "resumed rather than left paused");
}

/// What Envoy answers a callout itself when the host it picked refused the connection.
const NO_CONTROLLER: &[u8] =
    b"upstream connect error or disconnect/reset before headers. reset reason: connection failure";

#[test]
fn a_batch_that_found_no_controller_is_tried_once_more_within_its_deadline() {
    let (mut envoy, _) = MockEnvoy::start(&plugin(serde_json::json!({ "failure_mode": "deny" })));
    let (request, _) = envoy.request(get(b"/", &[]), &[(PEER, b"192.0.2.1:1")]);
    envoy.run_queues();
    let first = envoy.calls().pop().expect("a batch");
    assert_eq!(first.timeout_ms, 200);
    envoy.host.state.borrow_mut().now_ms += 30;
    envoy.answer_with(first.token, "503", NO_CONTROLLER);
    assert!(
        !envoy.settled(request),
        "not decided by the failure mode yet"
    );
    let second = envoy.calls().pop().expect("the batch again");
    assert_eq!(second.body, first.body, "the same checks");
    assert_eq!(second.timeout_ms, 170, "what is left of the first deadline");
    assert_eq!(envoy.host.metric("sluice_callout_retries"), 1);
    envoy.answer_with(second.token, "200", &decisions_for(&second.body, |_| true));
    assert!(envoy.settled(request));
    assert_eq!(envoy.reply(request), None, "admitted by the controller");
    assert_eq!(envoy.host.metric("sluice_allowed"), 1);
}

#[test]
fn a_batch_is_tried_again_once_only() {
    let (mut envoy, _) = MockEnvoy::start(&plugin(serde_json::json!({ "failure_mode": "deny" })));
    let (request, _) = envoy.request(get(b"/", &[]), &[(PEER, b"192.0.2.1:1")]);
    envoy.run_queues();
    let first = envoy.calls().pop().expect("a batch");
    envoy.answer(first.token, Vec::new(), Vec::new());
    let second = envoy.calls().pop().expect("tried again after a reset");
    envoy.answer_with(second.token, "503", NO_CONTROLLER);
    assert!(envoy.calls().is_empty(), "no third attempt");
    assert_eq!(
        envoy.reply(request).map(|r| r.status),
        Some(503),
        "the failure mode"
    );
    assert_eq!(envoy.host.metric("sluice_callout_retries"), 1);
}

#[test]
fn a_controllers_own_error_or_a_spent_deadline_is_not_tried_again() {
    let answers: [(&str, &[u8], u64); 3] = [
        (
            "503",
            br#"{"error":"store_unavailable","message":"redis"}"#,
            0,
        ),
        ("504", b"upstream request timeout", 0),
        ("503", NO_CONTROLLER, 195),
    ];
    for (status, body, elapsed_ms) in answers {
        let (mut envoy, _) =
            MockEnvoy::start(&plugin(serde_json::json!({ "failure_mode": "deny" })));
        let (request, _) = envoy.request(get(b"/", &[]), &[(PEER, b"192.0.2.1:1")]);
        envoy.run_queues();
        let call = envoy.calls().pop().expect("a batch");
        envoy.host.state.borrow_mut().now_ms += elapsed_ms;
        envoy.answer_with(call.token, status, body);
        assert!(envoy.calls().is_empty(), "{status} after {elapsed_ms} ms");
        assert_eq!(envoy.reply(request).map(|r| r.status), Some(503));
        assert_eq!(envoy.host.metric("sluice_callout_retries"), 0);
    }
}

/// A limited gRPC call gets a gRPC reply: the configured status as Envoy's `grpc_status`
/// (Envoy writes `grpc-status` and percent-encodes the body into `grpc-message`), a short
/// plain message, the rate-limit headers and the pushback; gRPC-Web gets the reply built
/// by the filter; a plain HTTP request in the same batch still gets the JSON 429.
#[test]
fn limited_grpc_calls_get_a_grpc_reply_and_http_requests_the_json_429() {
    for (config, expected_status) in [
        (serde_json::json!({}), 8),
        (
            serde_json::json!({ "grpc_status": { "rate_limited": "UNAVAILABLE" } }),
            14,
        ),
    ] {
        let (mut envoy, configured) = MockEnvoy::start(&plugin(config));
        assert!(configured);
        let grpc = |content_type: &'static [u8]| {
            let mut pairs: Vec<(&[u8], &[u8])> = vec![
                (b":method", b"POST"),
                (b":path", b"/pkg.Service/Call"),
                (b":authority", b"api.example.com"),
                (b"content-type", content_type),
            ];
            pairs.push((b"te", b"trailers"));
            headers(&pairs)
        };
        let (call, _) = envoy.request(grpc(b"application/grpc+proto"), &[(PEER, b"192.0.2.1:1")]);
        let (web, _) = envoy.request(
            grpc(b"application/grpc-web+proto"),
            &[(PEER, b"192.0.2.2:1")],
        );
        let (plain, _) = envoy.request(get(b"/", &[]), &[(PEER, b"192.0.2.3:1")]);
        envoy.run_queues();
        let batch = envoy.calls().pop().expect("a batch");
        envoy.answer_with(batch.token, "200", &decisions_for(&batch.body, |_| false));

        let reply = envoy.reply(call).expect("a local reply to the gRPC call");
        assert_eq!(reply.grpc_status, Some(expected_status));
        assert_eq!(
            String::from_utf8_lossy(&reply.body),
            "rate limit `per-client` exceeded, retry in 7 s"
        );
        assert_eq!(reply.details, "sluice_rate_limited");
        let header = |reply: &sluice_filter::testing::LocalReply, name: &str| {
            reply
                .headers
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, v)| v.clone())
        };
        assert_eq!(header(&reply, "retry-after").as_deref(), Some("7"));
        assert_eq!(
            header(&reply, "grpc-retry-pushback-ms").as_deref(),
            Some("7000")
        );
        assert_eq!(header(&reply, "x-ratelimit-limit").as_deref(), Some("5"));
        assert_eq!(
            header(&reply, "x-ratelimit-remaining").as_deref(),
            Some("0")
        );
        assert_eq!(
            header(&reply, "content-type"),
            None,
            "Envoy sets application/grpc"
        );

        let reply = envoy
            .reply(web)
            .expect("a local reply to the gRPC-Web call");
        assert_eq!((reply.status, reply.grpc_status), (200, None));
        assert_eq!(reply.body.first(), Some(&0x80), "gRPC-Web's trailer frame");
        assert_eq!(
            header(&reply, "grpc-status"),
            Some(expected_status.to_string())
        );
        assert_eq!(
            header(&reply, "grpc-message").as_deref(),
            Some("rate limit `per-client` exceeded, retry in 7 s")
        );
        assert_eq!(
            header(&reply, "content-type").as_deref(),
            Some("application/grpc-web+proto")
        );
        assert_eq!(header(&reply, "retry-after").as_deref(), Some("7"));

        let reply = envoy.reply(plain).expect("a 429");
        assert_eq!((reply.status, reply.grpc_status), (429, None));
        assert_eq!(
            header(&reply, "content-type").as_deref(),
            Some("application/json")
        );
        assert!(String::from_utf8_lossy(&reply.body).starts_with('{'));
    }
}

/// A stream admitted by a concurrency rule holds its leases until Envoy says it has ended
/// (`on_log` comes however it ends: completed, client gone, upstream reset, timeout), then
/// gives them back in one release call; a stream that ends while its check is still out
/// has its leases given back when the answer comes.
#[test]
fn a_stream_gives_its_concurrency_leases_back_when_it_ends() {
    let (mut envoy, _) = MockEnvoy::start(&plugin(serde_json::json!({})));
    let admit_with = |body: &[u8], lease: &str| {
        let checks = checks_in(body).len();
        let decisions = (0..checks)
            .map(|i| Decision {
                leases: vec![format!("{lease}-{i}")],
                ..Decision::unlimited()
            })
            .collect();
        serde_json::to_vec(&CheckResponse { decisions }).expect("encode")
    };
    let releases = |envoy: &MockEnvoy| -> Vec<Vec<String>> {
        envoy
            .calls()
            .iter()
            .filter(|c| {
                c.headers
                    .iter()
                    .any(|(n, v)| n == ":path" && v == "/v1/release")
            })
            .map(|c| {
                serde_json::from_slice::<sluice_protocol::ReleaseRequest>(&c.body)
                    .expect("a release")
                    .leases
            })
            .collect()
    };
    let (stream, _) = envoy.request(get(b"/ws", &[]), &[(PEER, b"192.0.2.1:1")]);
    envoy.run_queues();
    let batch = envoy.calls().pop().expect("a batch");
    envoy.answer_with(batch.token, "200", &admit_with(&batch.body, "a"));
    assert!(envoy.settled(stream));
    assert_eq!(envoy.respond(stream), Action::Continue);
    assert!(releases(&envoy).is_empty(), "held while the stream lives");
    envoy.finish(stream);
    assert_eq!(releases(&envoy), vec![vec!["a-0".to_owned()]]);

    // Gone before its answer: the leases the answer brings go straight back.
    let (early, _) = envoy.request(get(b"/ws", &[]), &[(PEER, b"192.0.2.2:1")]);
    envoy.run_queues();
    let batch = envoy
        .calls()
        .into_iter()
        .find(|c| {
            c.headers
                .iter()
                .any(|(n, v)| n == ":path" && v == "/v1/check")
        })
        .expect("a batch");
    envoy.finish(early);
    envoy.answer_with(batch.token, "200", &admit_with(&batch.body, "b"));
    assert_eq!(
        releases(&envoy),
        vec![vec!["a-0".to_owned()], vec!["b-0".to_owned()]]
    );
}

#[test]
fn a_response_settles_its_usage_reservations_with_what_it_says_at_the_next_tick() {
    use sluice_protocol::{ReleaseRequest, Settlement, UsageReservation, UsageSource};
    let mut envoy = started_with_view(
        &plugin(serde_json::json!({})),
        serde_json::json!({ "version": 1, "rules": [{ "name": "tokens", "limit": 100000, "window": "1h",
            "usage": { "json_pointer": "/usage/total_tokens", "reserve": 500 } }] }),
    );
    let reserved = |token: &str, from: UsageSource| UsageReservation {
        rule: "tokens".into(),
        reserved: 500,
        from,
        max: 100_000,
        unreported: 500,
        token: token.into(),
    };
    let admit_with = |body: &[u8], prefix: &str| {
        let request: CheckRequest = serde_json::from_slice(body).expect("a check call");
        assert!(request.settles, "the filter says it settles");
        let decisions = (0..request.checks.len())
            .map(|i| Decision {
                usage: vec![
                    reserved(
                        &format!("{prefix}{i}-body"),
                        UsageSource::JsonPointer("/usage/total_tokens".into()),
                    ),
                    reserved(
                        &format!("{prefix}{i}-header"),
                        UsageSource::ResponseHeader("x-used".into()),
                    ),
                ],
                ..Decision::unlimited()
            })
            .collect();
        serde_json::to_vec(&CheckResponse { decisions }).expect("encode")
    };
    let settled = |envoy: &MockEnvoy| -> Vec<Settlement> {
        envoy
            .calls()
            .iter()
            .filter(|c| path_of(c) == "/v1/release")
            .flat_map(|c| {
                serde_json::from_slice::<ReleaseRequest>(&c.body)
                    .expect("a release")
                    .settlements
            })
            .collect()
    };
    let (stream, _) = envoy.request(get(b"/v1/chat/completions", &[]), &[(PEER, b"192.0.2.1:1")]);
    envoy.run_queues();
    let batch = envoy.calls().pop().expect("a batch");
    envoy.answer_with(batch.token, "200", &admit_with(&batch.body, "a"));
    envoy.host.state.borrow_mut().response_headers.insert(
        stream,
        vec![
            ("content-type".into(), "application/json".into()),
            ("x-used".into(), "7".into()),
        ],
    );
    assert_eq!(envoy.respond(stream), Action::Continue);
    let body =
        br#"{"id":"x","usage":{"prompt_tokens":30,"completion_tokens":12,"total_tokens":42}}"#;
    let (first, rest) = body.split_at(25);
    assert_eq!(envoy.respond_body(stream, first, false), Action::Continue);
    assert_eq!(envoy.respond_body(stream, rest, true), Action::Continue);
    envoy.finish(stream);

    // Gone before its answer: it never went upstream, so it used nothing.
    let (early, _) = envoy.request(get(b"/v1/chat/completions", &[]), &[(PEER, b"192.0.2.2:1")]);
    envoy.run_queues();
    let batch = envoy
        .calls()
        .into_iter()
        .rfind(|c| path_of(c) == "/v1/check")
        .expect("a batch");
    envoy.finish(early);
    envoy.answer_with(batch.token, "200", &admit_with(&batch.body, "b"));

    assert!(settled(&envoy).is_empty(), "settlements wait for the tick");
    envoy.tick(1_000);
    let mut got: Vec<(String, u64)> = settled(&envoy)
        .into_iter()
        .map(|s| (s.reservation, s.used))
        .collect();
    got.sort();
    assert_eq!(
        got,
        [
            ("a0-body".to_owned(), 42),
            ("a0-header".to_owned(), 7),
            ("b0-body".to_owned(), 0),
            ("b0-header".to_owned(), 0),
        ]
    );
    envoy.tick(1_000);
    assert_eq!(settled(&envoy).len(), 4, "each settles once");
}

#[test]
fn a_filter_says_it_settles_only_while_a_usage_rule_is_in_force() {
    // A controller without usage rules may be one of 0.1.0, which refuses the field.
    let (mut envoy, _) = MockEnvoy::start(&plugin(serde_json::json!({})));
    envoy.request(get(b"/", &[]), &[(PEER, b"192.0.2.1:1")]);
    envoy.run_queues();
    let batch = envoy.calls().pop().expect("a batch");
    assert!(
        !String::from_utf8_lossy(&batch.body).contains("settles"),
        "{:?}",
        batch.body
    );
}

#[test]
fn a_body_ended_by_trailers_is_read() {
    use sluice_protocol::{ReleaseRequest, UsageReservation, UsageSource};
    let mut envoy = started_with_view(
        &plugin(serde_json::json!({})),
        serde_json::json!({ "version": 1, "rules": [{ "name": "tokens", "limit": 100000, "window": "1h",
            "usage": { "json_pointer": "/usage/total_tokens", "reserve": 500 } }] }),
    );
    let (stream, _) = envoy.request(get(b"/v1/chat/completions", &[]), &[(PEER, b"192.0.2.1:1")]);
    envoy.run_queues();
    let batch = envoy.calls().pop().expect("a batch");
    let decision = Decision {
        usage: vec![UsageReservation {
            rule: "tokens".into(),
            reserved: 500,
            from: UsageSource::JsonPointer("/usage/total_tokens".into()),
            max: 100_000,
            unreported: 500,
            token: "t".into(),
        }],
        ..Decision::unlimited()
    };
    let reply = CheckResponse {
        decisions: vec![decision],
    };
    envoy.answer_with(
        batch.token,
        "200",
        &serde_json::to_vec(&reply).expect("encode"),
    );
    envoy.host.state.borrow_mut().response_headers.insert(
        stream,
        vec![("content-type".into(), "application/json".into())],
    );
    envoy.respond(stream);
    envoy.respond_body(stream, br#"{"usage":{"total_tokens":77}}"#, false);
    envoy.respond_trailers(stream);
    envoy.finish(stream);
    envoy.tick(1_000);
    let settled: Vec<u64> = envoy
        .calls()
        .iter()
        .filter(|c| path_of(c) == "/v1/release")
        .flat_map(|c| {
            serde_json::from_slice::<ReleaseRequest>(&c.body)
                .expect("a release")
                .settlements
        })
        .map(|s| s.used)
        .collect();
    assert_eq!(settled, [77]);
}

#[test]
fn callbacks_for_contexts_the_filter_does_not_know_are_ignored() {
    let (mut envoy, _) = MockEnvoy::start(&plugin(serde_json::json!({})));
    envoy.answer_with(999, "200", b"{}");
    envoy.finish(4242);
    assert_eq!(envoy.respond(77), Action::Continue);
    assert_eq!(envoy.contexts(), (1, 0));
}

#[test]
fn a_refused_configuration_starts_nothing() {
    let (mut envoy, configured) = MockEnvoy::start(b"\xff{not json");
    assert!(!configured);
    let (request, action) = envoy.request(get(b"/", &[]), &[]);
    assert_eq!(action, Action::Continue);
    assert!(envoy.calls().is_empty());
    envoy.finish(request);
    let logs = envoy.host.state.borrow().logs.clone();
    assert!(
        logs.iter()
            .any(|(_, line)| line.contains("invalid plugin configuration")),
        "{logs:?}"
    );
}

#[test]
fn without_batching_a_requests_own_callout_answers_it() {
    let (mut envoy, _) = MockEnvoy::start(&plugin(serde_json::json!({ "batching": false })));
    let (request, action) = envoy.request(get(b"/", &[]), &[(PEER, b"192.0.2.1:1")]);
    assert_eq!(action, Action::Pause);
    let call = envoy.calls().pop().expect("its own callout");
    assert_eq!(
        call.owner, envoy.root,
        "Envoy hands every reply to the root"
    );
    envoy.answer_with(call.token, "200", &decisions_for(&call.body, |_| true));
    assert!(envoy.host.state.borrow().resumed.contains(&request));
}

#[test]
fn the_controllers_lists_apply_before_anyone_is_asked_and_expire_on_time() {
    let (mut envoy, _) = MockEnvoy::start(&plugin(serde_json::json!({})));
    envoy.tick(1_000);
    let read = envoy
        .calls()
        .pop()
        .expect("the configuration is read on the tick");
    let header = |call: &sluice_filter::testing::Call, name: &str| {
        call.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.clone())
    };
    assert_eq!(header(&read, ":path").as_deref(), Some("/v1/config"));
    assert_eq!(header(&read, "if-none-match"), None, "nothing held yet");
    envoy.answer_with(read.token, "200", &config_view(4));

    let (denied, action) = envoy.request(get(b"/deny/x", &[]), &[(PEER, b"192.0.2.1:1")]);
    assert_eq!(action, Action::Pause);
    assert_eq!(envoy.reply(denied).map(|r| r.status), Some(403));
    let (safe, action) = envoy.request(get(b"/", &[]), &[(PEER, b"10.9.9.9:1")]);
    assert_eq!(action, Action::Continue);
    assert!(!envoy.settled(safe));
    envoy.run_queues();
    assert!(envoy.calls().is_empty(), "neither was asked about");

    // The next read names the version held; unchanged, the controller says 304.
    envoy.tick(1_000);
    let again = envoy.calls().pop().expect("read again");
    assert_eq!(header(&again, "if-none-match").as_deref(), Some("\"4\""));
    envoy.answer_with(again.token, "304", b"");
    let (still, _) = envoy.request(get(b"/deny/y", &[]), &[(PEER, b"192.0.2.1:1")]);
    assert_eq!(envoy.reply(still).map(|r| r.status), Some(403));
    assert_eq!(envoy.host.metric("sluice_config_reads"), 2);
    assert_eq!(envoy.host.metric("sluice_denylisted"), 2);
}

fn path_of(call: &sluice_filter::testing::Call) -> String {
    call.headers
        .iter()
        .find(|(n, _)| n == ":path")
        .map(|(_, v)| v.clone())
        .unwrap_or_default()
}

/// Starts the filter with `plugin` and hands it the controller's view `view` (JSON).
fn started_with_view(plugin: &[u8], view: serde_json::Value) -> MockEnvoy {
    let (mut envoy, started) = MockEnvoy::start(plugin);
    assert!(started);
    envoy.tick(1_000);
    let read = envoy
        .calls()
        .pop()
        .expect("the configuration is read on the tick");
    assert_eq!(path_of(&read), "/v1/config");
    envoy.answer_with(read.token, "200", view.to_string().as_bytes());
    envoy
}

/// Sends one request and has the controller admit it; returns its context.
fn admitted(envoy: &mut MockEnvoy, peer: &[u8]) -> u32 {
    let (request, action) = envoy.request(get(b"/", &[]), &[(PEER, peer)]);
    assert_eq!(action, Action::Pause);
    envoy.run_queues();
    let batch = envoy.calls().pop().expect("a check call");
    envoy.answer_with(batch.token, "200", &decisions_for(&batch.body, |_| true));
    request
}

#[test]
fn the_controller_hears_what_it_asked_for_once_a_second_and_nothing_else() {
    let jwt = plugin(serde_json::json!({
        "identity": { "jwt": { "keys": [{ "alg": "HS256", "secret": "s" }], "on_invalid": "reject" } },
    }));
    let view = serde_json::json!({
        "version": 2, "report": { "upstream_status": true, "invalid_tokens": true },
    });
    let mut envoy = started_with_view(&jwt, view);
    for status in ["200", "503", "500"] {
        let request = admitted(&mut envoy, b"192.0.2.1:1");
        envoy
            .host
            .state
            .borrow_mut()
            .response_headers
            .insert(request, vec![(":status".to_owned(), status.to_owned())]);
        envoy.respond(request);
        envoy.finish(request);
    }
    let forged: &[(&[u8], &[u8])] = &[(b"authorization", b"Bearer not.a.token")];
    let (refused, _) = envoy.request(get(b"/", forged), &[(PEER, b"192.0.2.9:4")]);
    assert_eq!(envoy.reply(refused).map(|r| r.status), Some(401));
    envoy.respond(refused);
    envoy.tick(1_000);
    let calls = envoy.calls();
    let report = calls
        .iter()
        .find(|call| path_of(call) == "/v1/report")
        .expect("a report on the tick");
    let report: sluice_protocol::Report = serde_json::from_slice(&report.body).expect("JSON");
    assert_eq!(
        report,
        sluice_protocol::Report {
            responses: 3,
            server_errors: 2,
            invalid_tokens: vec![sluice_protocol::AddressCount {
                ip: "192.0.2.9".into(),
                count: 1
            }],
            cached_denials: Vec::new(),
            leased: Vec::new(),
        },
        "the filter's own 401 is not an upstream answer"
    );
    envoy.host.state.borrow_mut().calls.clear();
    envoy.tick(1_000);
    assert!(
        envoy
            .calls()
            .iter()
            .all(|call| path_of(call) != "/v1/report"),
        "nothing seen, nothing sent"
    );
}

#[test]
fn only_the_checks_sampled_for_the_log_carry_the_request_id() {
    let sent = |sample: f64| -> Vec<(bool, Option<String>)> {
        let mut envoy = started_with_view(
            &plugin(serde_json::json!({})),
            serde_json::json!({ "version": 1, "limited_log_sample": sample }),
        );
        (0..8)
            .map(|n| {
                let id = format!("req-{n}");
                let (_, action) = envoy.request(
                    get(b"/", &[(b"x-request-id", id.as_bytes())]),
                    &[(PEER, b"192.0.2.1:1")],
                );
                assert_eq!(action, Action::Pause);
                envoy.run_queues();
                let batch = envoy.calls().pop().expect("a check call");
                envoy.answer_with(batch.token, "200", &decisions_for(&batch.body, |_| true));
                let check = checks_in(&batch.body).remove(0);
                (check.sampled, check.request_id)
            })
            .collect()
    };
    let quarter = sent(0.25);
    let expected: Vec<(bool, Option<String>)> = (0..8)
        .map(|n| {
            if n % 4 == 3 {
                (true, Some(format!("req-{n}")))
            } else {
                (false, None)
            }
        })
        .collect();
    assert_eq!(quarter, expected, "one check in four, with its id");
    assert!(
        sent(0.0).iter().all(|c| *c == (false, None)),
        "sampling off"
    );
    assert!(
        sent(1.0)
            .iter()
            .all(|(sampled, id)| *sampled && id.is_some()),
        "every check"
    );
}

/// The filter with a controller whose one rule is leased, its configuration read.
fn started_with_a_leased_rule() -> MockEnvoy {
    let view = serde_json::json!({
        "version": 3,
        "rules": [{ "name": "per-client", "limit": 5, "window": "10s", "leased": {} }],
    });
    let envoy = started_with_view(&plugin(serde_json::json!({})), view);
    envoy.host.state.borrow_mut().calls.clear();
    envoy
}

#[test]
fn a_lease_admits_requests_of_its_kind_without_a_callout_until_spent_or_ended() {
    let mut envoy = started_with_a_leased_rule();
    let peer: &[u8] = b"192.0.2.1:1";
    let (first, action) = envoy.request(get(b"/", &[]), &[(PEER, peer)]);
    assert_eq!(action, Action::Pause);
    envoy.run_queues();
    let batch = envoy.calls().pop().expect("a check call");
    let asked: CheckRequest = serde_json::from_slice(&batch.body).expect("JSON");
    let holder = asked
        .lease_holder
        .expect("a leased rule: the worker names itself");
    assert_eq!(holder.len(), 32);
    assert!(asked.checks[0].lease, "the check asks for a lease");
    let granted = CheckResponse {
        decisions: vec![Decision {
            allowed: true,
            policy: Some(status(true)),
            grant: Some(sluice_protocol::Grant {
                token: None,
                units: 2,
                ttl_ms: 1_000,
            }),
            ..Decision::unlimited()
        }],
    };
    envoy.answer_with(
        batch.token,
        "200",
        &serde_json::to_vec(&granted).expect("encode"),
    );
    assert!(envoy.settled(first));
    envoy.host.state.borrow_mut().calls.clear();
    // Two more of the same kind pass at once, with Remaining counting down from 4.
    for remaining in ["3", "2"] {
        let (request, action) = envoy.request(get(b"/", &[]), &[(PEER, peer)]);
        assert_eq!(action, Action::Continue, "admitted from the lease");
        envoy.respond(request);
        let response = envoy.host.state.borrow().response_headers[&request].clone();
        assert!(
            response
                .iter()
                .any(|(n, v)| n == "x-ratelimit-remaining" && v == remaining),
            "{response:?}"
        );
        envoy.finish(request);
    }
    envoy.run_queues();
    assert!(envoy.calls().is_empty(), "no callout for leased admissions");
    // Another client's request is not this lease's kind; the spent lease asks again.
    for peer in [&b"192.0.2.2:1"[..], peer] {
        let (_, action) = envoy.request(get(b"/", &[]), &[(PEER, peer)]);
        assert_eq!(action, Action::Pause);
    }
    envoy.run_queues();
    let batch = envoy.calls().pop().expect("both asked");
    assert_eq!(checks_in(&batch.body).len(), 2);
    // Leased admissions reach the metrics with the next batch (or tick), not one by one.
    assert_eq!(envoy.host.metric("sluice_leased_admissions"), 2);
    // A lease granted now ends 1 s after its check left, whatever is left of it.
    let regranted = CheckResponse {
        decisions: vec![
            Decision {
                allowed: true,
                policy: Some(status(true)),
                ..Decision::unlimited()
            },
            Decision {
                allowed: true,
                policy: Some(status(true)),
                grant: Some(sluice_protocol::Grant {
                    token: None,
                    units: 100,
                    ttl_ms: 1_000,
                }),
                ..Decision::unlimited()
            },
        ],
    };
    envoy.answer_with(
        batch.token,
        "200",
        &serde_json::to_vec(&regranted).expect("encode"),
    );
    envoy.host.state.borrow_mut().calls.clear();
    let (_, action) = envoy.request(get(b"/", &[]), &[(PEER, peer)]);
    assert_eq!(action, Action::Continue);
    envoy.tick(1_000);
    // The tick's report tells the controller what the leases admitted.
    let report = envoy
        .calls()
        .into_iter()
        .find(|call| path_of(call) == "/v1/report")
        .expect("a report");
    let report: sluice_protocol::Report = serde_json::from_slice(&report.body).expect("JSON");
    assert_eq!(
        report.leased,
        [sluice_protocol::LeasedAdmissions {
            client: sluice_protocol::ClientId::ip("192.0.2.1"),
            rule: "per-client".into(),
            tier: None,
            count: 3
        }]
    );
    envoy.host.state.borrow_mut().calls.clear();
    let (_, action) = envoy.request(get(b"/", &[]), &[(PEER, peer)]);
    assert_eq!(action, Action::Pause, "the lease ended");
}

#[test]
fn failed_decisions_are_logged_once_a_second_with_the_count_of_the_rest() {
    let (mut envoy, started) = MockEnvoy::start(&plugin(serde_json::json!({})));
    assert!(started);
    let warnings = |envoy: &MockEnvoy| -> Vec<String> {
        envoy
            .host
            .state
            .borrow()
            .logs
            .iter()
            .filter(|(level, line)| *level == LogLevel::Warn && line.contains("no decision"))
            .map(|(_, line)| line.clone())
            .collect()
    };
    let fail_one = |envoy: &mut MockEnvoy| {
        let (_, action) = envoy.request(get(b"/", &[]), &[(PEER, b"192.0.2.1:1")]);
        assert_eq!(action, Action::Pause);
        envoy.run_queues();
        let batch = envoy.calls().pop().expect("a check call");
        envoy.answer_with(batch.token, "500", b"{}");
    };
    for _ in 0..3 {
        fail_one(&mut envoy);
    }
    assert_eq!(warnings(&envoy).len(), 1, "{:?}", warnings(&envoy));
    envoy.tick(1_000);
    fail_one(&mut envoy);
    let lines = warnings(&envoy);
    assert_eq!(lines.len(), 2, "{lines:?}");
    assert!(
        lines[1].contains("(2 more failures since the last line, not logged)"),
        "{lines:?}"
    );
    assert_eq!(
        envoy.host.metric("sluice_callout_errors"),
        4,
        "every failure counted"
    );
}

#[test]
fn a_request_that_leaves_before_its_batch_does_not_keep_its_kind_from_asking() {
    let mut envoy = started_with_a_leased_rule();
    let peer: &[u8] = b"192.0.2.1:1";
    let (gone, action) = envoy.request(get(b"/", &[]), &[(PEER, peer)]);
    assert_eq!(action, Action::Pause);
    envoy.finish(gone);
    let (_, action) = envoy.request(get(b"/", &[]), &[(PEER, peer)]);
    assert_eq!(action, Action::Pause);
    envoy.run_queues();
    let batch = envoy.calls().pop().expect("a check call");
    let checks = checks_in(&batch.body);
    assert_eq!(checks.len(), 1, "the first left the queue");
    assert!(checks[0].lease, "the kind asks again");
}

#[test]
fn a_controller_that_asks_for_no_report_gets_none() {
    let mut envoy = started_with_view(
        &plugin(serde_json::json!({})),
        serde_json::json!({ "version": 1 }),
    );
    let request = admitted(&mut envoy, b"192.0.2.1:1");
    envoy
        .host
        .state
        .borrow_mut()
        .response_headers
        .insert(request, vec![(":status".to_owned(), "503".to_owned())]);
    envoy.respond(request);
    envoy.tick(1_000);
    assert!(envoy
        .calls()
        .iter()
        .all(|call| path_of(call) != "/v1/report"));
}

#[test]
fn an_api_key_the_controller_does_not_know_is_refused_with_401() {
    let keyed = plugin(serde_json::json!({ "identity": { "api_key_header": "x-api-key" } }));
    let (mut envoy, _) = MockEnvoy::start(&keyed);
    let key: &[(&[u8], &[u8])] = &[(b"x-api-key", b"guess-1")];
    let (request, _) = envoy.request(get(b"/", key), &[(PEER, b"192.0.2.1:1")]);
    envoy.run_queues();
    let batch = envoy.calls().pop().expect("a check call");
    let checks = checks_in(&batch.body);
    assert_eq!(
        checks[0].api_key.as_deref(),
        Some(sluice_filter::identity::api_key_digest(b"guess-1").as_str()),
        "the key goes as its digest only"
    );
    let refused = Decision {
        allowed: false,
        refused: Some(sluice_protocol::Refusal::UnknownApiKey),
        ..Decision::unlimited()
    };
    let body = serde_json::to_vec(&CheckResponse {
        decisions: vec![refused],
    })
    .expect("encode");
    envoy.answer_with(batch.token, "200", &body);
    let reply = envoy.reply(request).expect("a local reply");
    assert_eq!(reply.status, 401);
    let body: serde_json::Value = serde_json::from_slice(&reply.body).expect("JSON");
    assert_eq!(body["error"], "invalid_api_key", "{body}");
    assert_eq!(envoy.host.metric("sluice_unknown_api_key"), 1);
}

#[test]
fn switched_off_the_filter_lets_everything_through_even_without_an_answer() {
    let closed = plugin(serde_json::json!({ "failure_mode": "deny" }));
    let mut envoy = started_with_view(
        &closed,
        serde_json::json!({ "version": 3, "enforce": false }),
    );
    let (request, _) = envoy.request(get(b"/", &[]), &[(PEER, b"192.0.2.1:1")]);
    envoy.run_queues();
    let batch = envoy.calls().pop().expect("still asked: counted, reported");
    envoy.answer_with(batch.token, "503", b"no healthy upstream");
    let again = envoy.calls().pop().expect("tried once more");
    envoy.answer_with(again.token, "503", b"no healthy upstream");
    assert_eq!(envoy.reply(request), None, "not refused");
    assert!(envoy.host.state.borrow().resumed.contains(&request));
    // Enforcing, the same failure refuses.
    let mut envoy = started_with_view(&closed, serde_json::json!({ "version": 4 }));
    let (request, _) = envoy.request(get(b"/", &[]), &[(PEER, b"192.0.2.1:1")]);
    envoy.run_queues();
    let batch = envoy.calls().pop().expect("a check call");
    envoy.answer_with(batch.token, "503", b"no healthy upstream");
    let again = envoy.calls().pop().expect("tried once more");
    envoy.answer_with(again.token, "503", b"no healthy upstream");
    assert_eq!(envoy.reply(request).map(|r| r.status), Some(503));
}

// --- what a request from the internet can make the filter do ----------------------------

/// Answers every check call out (and the ones their replies send) as allowed, asserting each
/// body fits what the controller reads; returns how many calls there were.
fn allow_every_call(envoy: &mut MockEnvoy) -> usize {
    let mut calls = 0;
    while let Some(call) = envoy.calls().pop() {
        assert!(
            call.body.len() <= sluice_protocol::MAX_CALL_BODY_BYTES,
            "a call of {} bytes",
            call.body.len()
        );
        calls += 1;
        envoy.answer_with(call.token, "200", &decisions_for(&call.body, |_| true));
    }
    calls
}

#[test]
fn the_path_is_matched_and_sent_in_its_normal_form() {
    let (mut envoy, _) = MockEnvoy::start(&plugin(serde_json::json!({})));
    let limited = [
        ("/stats/../x", "/x"),
        ("/stats/%2e%2e/x", "/x"),
        ("/stats/%2E./x?to=/stats/", "/x"),
        ("/stats//../x", "/x"),
        ("//api//./v1/../items", "/api/items"),
        ("/%61pi/x", "/api/x"),
    ];
    for (raw, sent) in limited {
        let (request, action) = envoy.request(get(raw.as_bytes(), &[]), &[(PEER, b"192.0.2.1:1")]);
        assert_eq!(action, Action::Pause, "{raw} is limited");
        envoy.run_queues();
        let call = envoy.calls().pop().expect("the controller is asked");
        assert_eq!(checks_in(&call.body)[0].path, sent, "{raw}");
        envoy.answer_with(call.token, "200", &decisions_for(&call.body, |_| true));
        assert!(envoy.settled(request));
    }
    // Exempt (`/stats/**` by default) only when the normal form is.
    for exempt in ["//stats//server_info", "/stats/a/../b", "/x/../stats"] {
        let (_, action) = envoy.request(get(exempt.as_bytes(), &[]), &[(PEER, b"192.0.2.1:1")]);
        assert_eq!(action, Action::Continue, "{exempt}");
    }
    envoy.run_queues();
    assert!(envoy.calls().is_empty(), "nobody asked about exempt paths");
}

const RSA_PUBLIC: &str = include_str!("keys/rsa_public.pem");
const RSA_PRIVATE: &[u8] = include_bytes!("keys/rsa_private.pem");

/// An RS256 token for key `rsa-1`, signed properly and then given another subject: every
/// signature check refuses it.
fn forged_rs256(subject: &str) -> String {
    use base64::Engine;
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256);
    header.kid = Some("rsa-1".into());
    let claims = serde_json::json!({ "sub": "ann", "exp": 4_000_000_000u64 });
    let key = jsonwebtoken::EncodingKey::from_rsa_pem(RSA_PRIVATE).expect("RSA key");
    let good = jsonwebtoken::encode(&header, &claims, &key).expect("sign");
    let (header, rest) = good.split_once('.').expect("a JWT");
    let (_, signature) = rest.split_once('.').expect("a JWT");
    let payload = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .encode(serde_json::json!({ "sub": subject, "exp": 4_000_000_000u64 }).to_string());
    format!("{header}.{payload}.{signature}")
}

fn signature_checks_logged(envoy: &MockEnvoy) -> usize {
    envoy
        .host
        .state
        .borrow()
        .logs
        .iter()
        .filter(|(level, line)| {
            *level == LogLevel::Debug && line.contains("a token's signature was checked")
        })
        .count()
}

#[test]
fn a_denylisted_client_gets_its_403_before_its_token_is_looked_at() {
    let jwt = plugin(serde_json::json!({
        "identity": {
            "api_key_header": "x-api-key",
            "jwt": { "keys": [{ "kid": "rsa-1", "alg": "RS256", "pem": RSA_PUBLIC }] }
        },
        "log_level": "debug",
    }));
    let view = serde_json::json!({
        "version": 1,
        "denylist": [
            { "kind": "ip", "value": "192.0.2.66" },
            { "kind": "api_key", "value": sluice_filter::identity::api_key_digest(b"banned") },
        ],
    });
    let mut envoy = started_with_view(&jwt, view);
    let token = format!("Bearer {}", forged_rs256("mallory"));
    for (n, (peer, key)) in [
        (&b"192.0.2.66:1"[..], &b"any"[..]),
        (b"192.0.2.7:1", b"banned"),
    ]
    .iter()
    .cycle()
    .take(6)
    .enumerate()
    {
        // Each a token of its own: no cache could answer for it.
        let token = format!("{token}{n}");
        let (request, _) = envoy.request(
            get(
                b"/items",
                &[(b"authorization", token.as_bytes()), (b"x-api-key", key)],
            ),
            &[(PEER, peer)],
        );
        assert_eq!(envoy.reply(request).map(|r| r.status), Some(403));
    }
    assert_eq!(signature_checks_logged(&envoy), 0, "no token was looked at");
    assert_eq!(envoy.host.metric("sluice_denylisted"), 6);
    assert_eq!(envoy.host.metric("sluice_token_rejected"), 0);
    // The same token from a client not on the list is checked, and refused.
    let (request, _) = envoy.request(
        get(b"/items", &[(b"authorization", token.as_bytes())]),
        &[(PEER, b"192.0.2.7:1")],
    );
    assert_eq!(envoy.reply(request).map(|r| r.status), Some(401));
    assert_eq!(signature_checks_logged(&envoy), 1);
}

#[test]
fn a_forged_token_is_checked_once_however_often_it_comes() {
    let jwt = plugin(serde_json::json!({
        "identity": {
            "jwt": { "keys": [
                { "kid": "rsa-1", "alg": "RS256", "pem": RSA_PUBLIC },
                { "alg": "HS256", "secret": "s" }
            ] }
        },
        "log_level": "debug",
    }));
    let (mut envoy, started) = MockEnvoy::start(&jwt);
    assert!(started);
    let token = format!("Bearer {}", forged_rs256("mallory"));
    for n in 0..20u8 {
        let peer = format!("198.51.100.{n}:1");
        let (request, _) = envoy.request(
            get(b"/items", &[(b"authorization", token.as_bytes())]),
            &[(PEER, peer.as_bytes())],
        );
        let reply = envoy.reply(request).expect("refused");
        assert_eq!(reply.status, 401);
        let body: serde_json::Value = serde_json::from_slice(&reply.body).expect("JSON");
        assert_eq!(body["error"], "invalid_token", "the same answer each time");
    }
    assert_eq!(signature_checks_logged(&envoy), 1);
    assert_eq!(
        envoy.host.metric("sluice_token_rejected"),
        20,
        "each is counted"
    );
    let logs = envoy.host.state.borrow().logs.clone();
    assert!(
        logs.iter()
            .any(|(_, line)| line.contains("checked against 1 key(s): refused")),
        "{logs:?}"
    );
}

#[test]
fn many_long_requests_go_in_calls_the_controller_can_read() {
    let (mut envoy, _) = MockEnvoy::start(&plugin(serde_json::json!({
        "failure_mode": "deny",
        "max_batch_size": 1024,
        "max_batches_in_flight": 1,
    })));
    let path = format!("/{}", "p".repeat(7 * 1024));
    let requests: Vec<u32> = (0..200u32)
        .map(|n| {
            let peer = format!("10.{}.{}.1:1", n / 200, n % 200);
            let (request, action) =
                envoy.request(get(path.as_bytes(), &[]), &[(PEER, peer.as_bytes())]);
            assert_eq!(action, Action::Pause);
            request
        })
        .collect();
    envoy.run_queues();
    let calls = allow_every_call(&mut envoy);
    assert!(calls >= 2, "{calls} calls for 200 checks of 7 KiB");
    for request in requests {
        assert!(envoy.settled(request));
        assert_eq!(envoy.reply(request), None, "every one allowed, none failed");
    }
    assert_eq!(envoy.host.metric("sluice_callout_errors"), 0);
    assert_eq!(envoy.host.metric("sluice_allowed"), 200);
}

/// Rules that match on `n` headers, `x-h0`…, and the filter started with them.
fn started_with_header_rules(n: usize, batching: bool) -> MockEnvoy {
    let rules: Vec<serde_json::Value> = (0..n)
        .map(|n| {
            serde_json::json!({
                "name": format!("r{n}"), "limit": 5, "window": "1m",
                "match": { "headers": [{ "name": format!("x-h{n}") }] }
            })
        })
        .collect();
    let envoy = started_with_view(
        &plugin(serde_json::json!({ "failure_mode": "deny", "batching": batching })),
        serde_json::json!({ "version": 1, "rules": rules }),
    );
    envoy.host.state.borrow_mut().calls.clear();
    envoy
}

/// A request whose check the controller could not take fails alone (its failure mode, and a
/// line saying why), and the next request is decided as ever.
fn fails_alone(envoy: &mut MockEnvoy, headers_sent: &[(String, String)], why: &str) {
    let extra: Vec<(&[u8], &[u8])> = headers_sent
        .iter()
        .map(|(n, v)| (n.as_bytes(), v.as_bytes()))
        .collect();
    let (refused, _) = envoy.request(get(b"/", &extra), &[(PEER, b"192.0.2.1:1")]);
    assert_eq!(
        envoy.reply(refused).map(|r| r.status),
        Some(503),
        "its failure mode"
    );
    let (normal, _) = envoy.request(get(b"/", &[]), &[(PEER, b"192.0.2.2:1")]);
    envoy.run_queues();
    assert_eq!(allow_every_call(envoy), 1, "only the normal one was sent");
    assert!(envoy.settled(normal));
    assert_eq!(envoy.reply(normal), None);
    let logs = envoy.host.state.borrow().logs.clone();
    assert!(
        logs.iter()
            .any(|(level, line)| *level == LogLevel::Warn && line.contains(why)),
        "{logs:?}"
    );
}

#[test]
fn a_check_too_large_for_any_call_fails_alone_and_says_why() {
    // 64 header values of 8 KiB of `\`, each twice as long in JSON: more than 1 MiB.
    let sent: Vec<(String, String)> = (0..64)
        .map(|n| (format!("x-h{n}"), "\\".repeat(8 * 1024)))
        .collect();
    for batching in [true, false] {
        let mut envoy = started_with_header_rules(64, batching);
        fails_alone(
            &mut envoy,
            &sent,
            "more than a call to the controller carries",
        );
    }
}

#[test]
fn a_check_with_more_headers_than_the_controller_takes_fails_alone() {
    let sent: Vec<(String, String)> = (0..65).map(|n| (format!("x-h{n}"), "v".into())).collect();
    for batching in [true, false] {
        let mut envoy = started_with_header_rules(65, batching);
        fails_alone(&mut envoy, &sent, "a check carries at most 64");
        // With one fewer, it is sent.
        let (request, _) = envoy.request(
            get(
                b"/",
                &sent[..64]
                    .iter()
                    .map(|(n, v)| (n.as_bytes(), v.as_bytes()))
                    .collect::<Vec<_>>(),
            ),
            &[(PEER, b"192.0.2.3:1")],
        );
        envoy.run_queues();
        assert_eq!(allow_every_call(&mut envoy), 1);
        assert_eq!(envoy.reply(request), None);
    }
}

#[test]
fn long_identities_and_fields_leave_the_filter_bounded() {
    let config = plugin(serde_json::json!({
        "identity": { "order": ["header", "ip"], "client_header": "x-client-id" },
    }));
    let mut envoy = started_with_view(
        &config,
        serde_json::json!({ "version": 1, "rules": [{
            "name": "plan", "limit": 5, "window": "1m",
            "match": { "headers": [{ "name": "x-plan" }] }
        }] }),
    );
    envoy.host.state.borrow_mut().calls.clear();
    let max = sluice_protocol::MAX_IDENTITY_BYTES;
    let field = sluice_protocol::MAX_REQUEST_FIELD_BYTES;
    let client = "c".repeat(max + 1);
    let exact = "e".repeat(max);
    let long = "v".repeat(3 * field);
    let path = format!("/{long}");
    for (who, expected) in [
        (
            client.clone(),
            format!(
                "sha256:{}",
                sluice_filter::identity::api_key_digest(&client)
            ),
        ),
        (exact.clone(), exact.clone()),
    ] {
        let (_, action) = envoy.request(
            headers(&[
                (b":method", long.as_bytes()),
                (b":path", path.as_bytes()),
                (b":authority", long.as_bytes()),
                (b"x-client-id", who.as_bytes()),
                (b"x-plan", long.as_bytes()),
            ]),
            &[(PEER, b"192.0.2.1:1")],
        );
        assert_eq!(action, Action::Pause);
        envoy.run_queues();
        let call = envoy.calls().pop().expect("a check call");
        let check = checks_in(&call.body).remove(0);
        assert_eq!(check.client.value, expected);
        assert!(check.client.value.len() <= max);
        assert!(check.path.len() <= field && check.path.starts_with("/vvv"));
        assert_eq!(check.host.len(), field);
        assert_eq!(
            check.method.len(),
            sluice_filter::decision::MAX_METHOD_BYTES
        );
        assert_eq!(check.headers["x-plan"].len(), field);
        envoy.answer_with(call.token, "200", &decisions_for(&call.body, |_| true));
    }
}

#[test]
fn a_request_the_denial_cache_answers_does_not_keep_its_kind_from_asking_for_a_lease() {
    let mut envoy = started_with_a_leased_rule();
    let peer: &[u8] = b"192.0.2.1:1";
    let lease_asked = |envoy: &mut MockEnvoy| {
        let (request, action) = envoy.request(get(b"/", &[]), &[(PEER, peer)]);
        assert_eq!(action, Action::Pause);
        envoy.run_queues();
        let batch = envoy.calls().pop().expect("a check call");
        let asked = checks_in(&batch.body)[0].lease;
        envoy.answer_with(batch.token, "200", &decisions_for(&batch.body, |_| false));
        assert_eq!(envoy.reply(request).map(|r| r.status), Some(429));
        envoy.host.state.borrow_mut().calls.clear();
        asked
    };
    assert!(lease_asked(&mut envoy), "the first of its kind asks");
    // Denied for 7 s: the next one is answered from the denial cache, without a callout.
    let (cached, _) = envoy.request(get(b"/", &[]), &[(PEER, peer)]);
    assert_eq!(envoy.reply(cached).map(|r| r.status), Some(429));
    envoy.run_queues();
    assert!(envoy.calls().is_empty(), "answered from the cache");
    // Once the denial ends, the kind asks for a lease again.
    envoy.tick(8_000);
    envoy.host.state.borrow_mut().calls.clear();
    assert!(
        lease_asked(&mut envoy),
        "the cached answer left no ask behind"
    );
}

// --- generated input ------------------------------------------------------------------

/// Bytes a client (or a broken host) could hand over.
fn hostile_bytes() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..48),
        Just(b"caf\xe9 \xff\xfe".to_vec()),
        Just(vec![b'a'; 5_000]),
        Just(b"Bearer \xff.\xfe.\x00".to_vec()),
        Just(b"198.51.100.1, \xff, 10.0.0.1".to_vec()),
        Just(b"\x01\x02\r\n\t".to_vec()),
        "[ -~]{0,40}".prop_map(String::into_bytes),
    ]
}

fn header_name() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        Just(b":path".to_vec()),
        Just(b":authority".to_vec()),
        Just(b":method".to_vec()),
        Just(b"x-api-key".to_vec()),
        Just(b"x-client-id".to_vec()),
        Just(b"authorization".to_vec()),
        Just(b"x-forwarded-for".to_vec()),
        Just(b"x-cost".to_vec()),
        Just(b"x-request-id".to_vec()),
        Just(b"x-plan".to_vec()),
        proptest::collection::vec(any::<u8>(), 0..12),
    ]
}

/// A serialised header map, or (sometimes) bytes that are not one.
fn request_headers() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        8 => proptest::collection::vec((header_name(), hostile_bytes()), 0..10)
            .prop_map(|pairs| HeaderMap::serialize(&pairs)),
        1 => proptest::collection::vec(any::<u8>(), 0..64),
    ]
}

#[derive(Debug, Clone)]
enum Op {
    Request {
        headers: Vec<u8>,
        peer: Vec<u8>,
    },
    RunQueues,
    /// Answer the oldest callout: a real decision per check, or these bytes.
    AnswerDecisions {
        allow_mask: u32,
    },
    AnswerGarbage {
        status: Vec<u8>,
        body: Vec<u8>,
    },
    Tick {
        ms: u64,
    },
    /// The oldest live request ends (done, or its client left), its response typed as an
    /// event stream or JSON, and carrying `body` (cut into pieces of `cut` bytes) and these
    /// bytes as its usage header.
    Finish {
        event_stream: bool,
        body: Vec<u8>,
        cut: usize,
        usage_header: String,
    },
    Fail {
        call: HostCall,
        on: bool,
    },
    GarbleSharedData {
        value: Vec<u8>,
    },
}

/// Host calls that may fail. Not `set_effective_context` and `continue_stream`: Envoy
/// refuses those only for a request that is gone, and if it refused them for one it holds,
/// no filter could act on that request again (Envoy's own stream timeout would end it).
fn host_call() -> impl Strategy<Value = HostCall> {
    prop_oneof![
        Just(HostCall::HeaderMap),
        Just(HostCall::Header),
        Just(HostCall::Property),
        Just(HostCall::Buffer),
        Just(HostCall::HttpCall),
        Just(HostCall::SendLocalResponse),
        Just(HostCall::SharedData),
        Just(HostCall::SetSharedData),
        Just(HostCall::Enqueue),
        Just(HostCall::ReplaceHeader),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (request_headers(), hostile_bytes()).prop_map(|(headers, peer)| Op::Request { headers, peer }),
        3 => Just(Op::RunQueues),
        3 => any::<u32>().prop_map(|allow_mask| Op::AnswerDecisions { allow_mask }),
        1 => (hostile_bytes(), hostile_bytes()).prop_map(|(status, body)| Op::AnswerGarbage { status, body }),
        2 => (0u64..3_000).prop_map(|ms| Op::Tick { ms }),
        2 => (any::<bool>(), hostile_bytes(), 1usize..16, "[ -~]{0,24}").prop_map(
            |(event_stream, body, cut, usage_header)| Op::Finish { event_stream, body, cut, usage_header }
        ),
        1 => (host_call(), any::<bool>()).prop_map(|(call, on)| Op::Fail { call, on }),
        1 => hostile_bytes().prop_map(|value| Op::GarbleSharedData { value }),
    ]
}

/// The controller's view of its configuration: rules with failure modes and matched
/// headers, and lists (some entries expired).
fn config_view(version: u64) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "version": version,
        // Everything the filter can be asked to report, so that the generated runs tally it.
        "report": { "upstream_status": true, "invalid_tokens": true },
        "rules": [
            { "name": "pay", "limit": 5, "window": "1m", "failure_mode": "deny",
              "match": { "path_prefix": "/pay", "headers": [{ "name": "x-plan" }] } }
        ],
        "safelist": [{ "kind": "ip", "value": "10.0.0.0/8" }],
        "denylist": [
            { "kind": "path", "value": "/deny/**" },
            { "kind": "user", "value": "ann", "expires_at_ms": 1_800_000_001_000u64 },
            { "kind": "api_key", "value": sluice_filter::identity::api_key_digest(b"bad") },
        ],
    }))
    .expect("encode")
}

fn configs() -> Vec<Vec<u8>> {
    vec![
        plugin(serde_json::json!({})),
        plugin(serde_json::json!({ "batching": false, "failure_mode": "deny" })),
        plugin(serde_json::json!({
            "max_batch_size": 2,
            "identity": {
                "api_key_header": "x-api-key",
                "client_header": "x-client-id",
                "ip": { "trusted_hops": 2 },
                "jwt": { "keys": [{ "alg": "HS256", "secret": "s" }], "on_invalid": "reject" }
            },
            "cost_header": "x-cost",
        })),
        plugin(serde_json::json!({
            "shadow": true,
            "identity": { "jwt": { "keys": [{ "alg": "HS256", "secret": "s" }], "on_invalid": "next" } },
        })),
    ]
}

/// `reply` (a check call's answer) with usage reservations on every other allowed decision,
/// one read from the body and one from a header, as `mask` picks.
fn with_usage(reply: &[u8], mask: u32) -> Vec<u8> {
    use sluice_protocol::{UsageReservation, UsageSource};
    let mut response: CheckResponse = serde_json::from_slice(reply).expect("a reply");
    for (i, decision) in response.decisions.iter_mut().enumerate() {
        if decision.allowed && (mask >> (i % 32)) & 2 == 2 {
            decision.usage = [
                UsageSource::JsonPointer("/usage/total_tokens".into()),
                UsageSource::ResponseHeader("x-used".into()),
            ]
            .into_iter()
            .map(|from| UsageReservation {
                rule: "tokens".into(),
                reserved: 10,
                from,
                max: 1_000,
                unreported: 10,
                token: format!("r{i}"),
            })
            .collect();
        }
    }
    serde_json::to_vec(&response).expect("encode")
}

fn run(profile: Flavour, config: &[u8], ops: Vec<Op>) {
    let config = match profile {
        Flavour::Envoy => config.to_vec(),
        // ngx_wasm_module has no clusters: its callout target is `host:port`.
        Flavour::Ngx => String::from_utf8_lossy(config)
            .replace("\"sluice_controller\"", "\"127.0.0.1:8081\"")
            .into_bytes(),
    };
    let (mut envoy, configured) = MockEnvoy::start_as(profile, &config);
    assert!(configured);
    let mut live: Vec<(u32, Action)> = Vec::new();
    for op in ops {
        match op {
            Op::Request { headers, peer } => {
                let (context, action) = envoy.request(headers, &[(PEER, &peer)]);
                live.push((context, action));
            }
            Op::RunQueues => envoy.run_queues(),
            Op::AnswerDecisions { allow_mask } => {
                if let Some(call) = envoy.calls().first().cloned() {
                    let reads_config = call
                        .headers
                        .iter()
                        .any(|(n, v)| n == ":path" && v == sluice_protocol::CONFIG_PATH);
                    let (status, body) = if reads_config {
                        // A new version now and then, else "unchanged".
                        if allow_mask % 3 == 0 {
                            ("200", config_view(u64::from(allow_mask % 5)))
                        } else {
                            ("304", Vec::new())
                        }
                    } else {
                        match serde_json::from_slice::<CheckRequest>(&call.body) {
                            Ok(_) => (
                                "200",
                                with_usage(
                                    &decisions_for(&call.body, |i| allow_mask >> (i % 32) & 1 == 1),
                                    allow_mask,
                                ),
                            ),
                            Err(_) => ("200", br#"{"released":1}"#.to_vec()),
                        }
                    };
                    envoy.answer_with(call.token, status, &body);
                }
            }
            Op::AnswerGarbage { status, body } => {
                if let Some(call) = envoy.calls().first().cloned() {
                    let headers = HeaderMap::serialize(&[(&b":status"[..], &status[..])]);
                    envoy.answer(call.token, headers, body);
                }
            }
            Op::Tick { ms } => envoy.tick(ms),
            Op::Finish {
                event_stream,
                body,
                cut,
                usage_header,
            } => {
                if !live.is_empty() {
                    let (context, _) = live.remove(0);
                    let content_type = if event_stream {
                        "text/event-stream"
                    } else {
                        "application/json"
                    };
                    envoy.host.state.borrow_mut().response_headers.insert(
                        context,
                        vec![
                            ("content-type".into(), content_type.into()),
                            ("x-used".into(), usage_header),
                        ],
                    );
                    envoy.respond(context);
                    let pieces: Vec<&[u8]> = body.chunks(cut).collect();
                    for (i, piece) in pieces.iter().enumerate() {
                        envoy.respond_body(context, piece, i + 1 == pieces.len());
                    }
                    envoy.finish(context);
                }
            }
            Op::Fail { call, on } => {
                let mut state = envoy.host.state.borrow_mut();
                if on {
                    state.failing.insert(call, Status::InternalFailure);
                } else {
                    state.failing.remove(&call);
                }
            }
            Op::GarbleSharedData { value } => {
                let mut state = envoy.host.state.borrow_mut();
                for slot in state.shared_data.values_mut() {
                    slot.clone_from(&value);
                }
                for n in 0..8 {
                    state
                        .shared_data
                        .insert(format!("sluice.denied.{n}"), value.clone());
                }
            }
        }
    }
    // Envoy keeps working: host calls succeed again, every callout is answered in time or
    // runs past the watchdog. Then no paused request may still be waiting.
    envoy.host.state.borrow_mut().failing.clear();
    for _ in 0..4 {
        envoy.run_queues();
        for call in envoy.calls() {
            envoy.answer_with(call.token, "503", b"upstream connect error");
        }
        envoy.tick(2_000);
    }
    for (context, action) in live {
        if action == Action::Pause {
            assert!(
                envoy.settled(context),
                "request {context} was paused and never resumed or answered"
            );
        }
        envoy.respond(context);
        envoy.finish(context);
    }
    assert_eq!(envoy.contexts().1, 0, "every stream context was deleted");
    assert_eq!(
        envoy.traps(),
        Vec::<String>::new(),
        "nothing traps on {profile:?}"
    );
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn no_bytes_from_envoy_break_the_request_path(
        config in 0usize..4,
        ngx in any::<bool>(),
        ops in proptest::collection::vec(op(), 1..40),
    ) {
        let configs = configs();
        // The same runs on a mock that behaves as Kong's ngx_wasm_module where it differs.
        let profile = if ngx { Flavour::Ngx } else { Flavour::Envoy };
        run(profile, &configs[config], ops);
    }
}

#[test]
fn the_filter_does_not_depend_on_the_proxy_wasm_sdk() {
    // Its wrappers panic on client bytes and on host statuses (see src/host.rs): every host
    // call goes through the filter's own ABI layer instead. The lock file says what the
    // filter really links, whichever way a dependency would come back.
    let lock = include_str!("../../Cargo.lock");
    let filter = lock
        .split("[[package]]")
        .find(|package| package.contains("name = \"sluice-filter\""))
        .expect("sluice-filter in Cargo.lock");
    assert!(filter.contains("dependencies"), "{filter}");
    assert!(
        !filter.contains("\"proxy-wasm"),
        "the filter links the SDK again: {filter}"
    );
    assert!(
        !lock.contains("name = \"proxy-wasm\""),
        "the SDK is in the workspace again"
    );
}

#[test]
fn denials_answered_from_the_cache_before_the_first_configuration_read_are_reported() {
    let (mut envoy, configured) = MockEnvoy::start(&plugin(serde_json::json!({})));
    assert!(configured);
    let peer: &[u8] = b"192.0.2.1:1";
    let (first, _) = envoy.request(get(b"/", &[]), &[(PEER, peer)]);
    envoy.run_queues();
    let batch = envoy.calls().pop().expect("a check call");
    envoy.answer_with(batch.token, "200", &decisions_for(&batch.body, |_| false));
    assert_eq!(envoy.reply(first).map(|r| r.status), Some(429));
    envoy.host.state.borrow_mut().calls.clear();
    // The worker has not read the controller's configuration yet: the cache answers anyway.
    let (cached, _) = envoy.request(get(b"/", &[]), &[(PEER, peer)]);
    assert_eq!(envoy.reply(cached).map(|r| r.status), Some(429));
    envoy.run_queues();
    assert!(envoy.calls().is_empty(), "answered from the cache");
    envoy.tick(1_000);
    let report = envoy
        .calls()
        .into_iter()
        .find(|call| path_of(call) == "/v1/report")
        .expect("a report of the cached denial");
    let body: serde_json::Value = serde_json::from_slice(&report.body).expect("JSON");
    assert_eq!(body["cached_denials"][0]["count"], 1, "{body}");
}

fn post_chat(extra: &[(&[u8], &[u8])]) -> Vec<u8> {
    let mut pairs: Vec<(&[u8], &[u8])> = vec![
        (b":method", b"POST"),
        (b":path", b"/v1/chat/completions"),
        (b":authority", b"api.example.com"),
        (b"content-type", b"application/json"),
    ];
    pairs.extend_from_slice(extra);
    headers(&pairs)
}

fn checks_sent(envoy: &MockEnvoy) -> Vec<sluice_protocol::Check> {
    envoy
        .calls()
        .iter()
        .filter(|c| path_of(c) == "/v1/check")
        .flat_map(|c| {
            serde_json::from_slice::<CheckRequest>(&c.body)
                .expect("a check call")
                .checks
        })
        .collect()
}

#[test]
fn a_request_that_reserves_from_its_body_is_checked_once_the_body_is_in() {
    use sluice_filter::usage::{waits_for_body, MAX_REQUEST_BODY_BYTES};
    let mut envoy = started_with_view(
        &plugin(serde_json::json!({})),
        serde_json::json!({ "version": 1, "rules": [{ "name": "output", "limit": 100000,
            "window": "1h", "match": { "path": "/v1/chat/completions" },
            "usage": { "json_pointer": "/usage/completion_tokens", "reserve": 500,
                       "reserve_from": "/max_tokens" } }] }),
    );
    let peer: &[(&[&str], &[u8])] = &[(PEER, b"192.0.2.1:1")];

    // Its headers go on (a proxy-wasm filter that holds them gets no body); its body is
    // held, and checked with the figure once it ends.
    let (stream, action) = envoy.request_with_body(post_chat(&[]), peer);
    assert_eq!(action, Action::Continue);
    assert!(waits_for_body(stream));
    assert_eq!(
        envoy.send_body(stream, br#"{"model":"m","max_tok"#, false),
        Action::Pause
    );
    envoy.run_queues();
    assert!(
        checks_sent(&envoy).is_empty(),
        "nothing asked before the body"
    );
    assert_eq!(
        envoy.send_body(stream, br#"ens":77.5}"#, true),
        Action::Pause
    );
    assert!(!waits_for_body(stream), "no piece comes after the last");
    envoy.run_queues();
    let batch = envoy.calls().pop().expect("a batch");
    let check = &checks_sent(&envoy)[0];
    assert_eq!(
        check.request_figures.get("/max_tokens"),
        Some(&78),
        "{check:?}"
    );
    envoy.answer_with(batch.token, "200", &decisions_for(&batch.body, |_| true));
    assert!(envoy.host.state.borrow().resumed.contains(&stream));

    // Another route, a request without a body, a compressed body: asked at once.
    let before = checks_sent(&envoy).len();
    let (embeddings, action) = envoy.request_with_body(
        headers(&[
            (b":method", b"POST"),
            (b":path", b"/v1/embeddings"),
            (b":authority", b"api.example.com"),
        ]),
        peer,
    );
    assert_eq!(action, Action::Pause);
    assert!(!waits_for_body(embeddings));
    envoy.request(post_chat(&[]), peer);
    let (gzip, action) =
        envoy.request_with_body(post_chat(&[(b"content-encoding", b"gzip")]), peer);
    assert_eq!(action, Action::Pause);
    assert!(!waits_for_body(gzip));
    envoy.run_queues();
    let asked = checks_sent(&envoy);
    assert_eq!(asked.len(), before + 3);
    assert!(asked[before..].iter().all(|c| c.request_figures.is_empty()));
    let batch = envoy.calls().pop().expect("their batch");
    envoy.answer_with(batch.token, "200", &decisions_for(&batch.body, |_| true));

    // Longer than the filter reads: asked without the figure as soon as it is known.
    let (long, _) = envoy.request_with_body(post_chat(&[]), peer);
    let piece = vec![b' '; MAX_REQUEST_BODY_BYTES + 1];
    assert_eq!(envoy.send_body(long, &piece, false), Action::Pause);
    envoy.run_queues();
    let last = checks_sent(&envoy).pop().expect("its check");
    assert!(last.request_figures.is_empty());
    // The rest of its body is held until the answer: a piece let go would send it on.
    assert_eq!(envoy.send_body(long, b"more", false), Action::Pause);
    let batch = envoy.calls().pop().expect("its batch");
    envoy.answer_with(batch.token, "200", &decisions_for(&batch.body, |_| true));
    assert!(envoy.host.state.borrow().resumed.contains(&long));
    assert_eq!(envoy.send_body(long, b"rest", true), Action::Continue);
    assert!(!waits_for_body(long));

    // Gone before its body: nothing asked, nothing left waiting.
    let before = checks_sent(&envoy).len();
    let (gone, _) = envoy.request_with_body(post_chat(&[]), peer);
    assert!(waits_for_body(gone));
    envoy.finish(gone);
    assert!(!waits_for_body(gone));
    envoy.run_queues();
    assert_eq!(checks_sent(&envoy).len(), before);
}

#[test]
fn a_body_read_request_is_held_only_when_its_body_can_be_read_and_cached_by_its_figures() {
    use sluice_filter::usage::waits_for_body;
    let mut envoy = started_with_view(
        &plugin(serde_json::json!({})),
        serde_json::json!({ "version": 1, "rules": [{ "name": "output", "limit": 100000,
            "window": "1h", "match": { "path": "/v1/chat/completions" },
            "usage": { "json_pointer": "/usage/completion_tokens", "reserve": 500,
                       "reserve_from": "/max_tokens" } }] }),
    );
    let peer: &[(&[&str], &[u8])] = &[(PEER, b"192.0.2.1:1")];
    // Bodies it would not read whole, and streams whose data would stall: asked at once.
    for extra in [
        &[(&b"content-type"[..], &b"text/plain"[..])][..],
        &[(b"content-length", b"70000")],
        &[(b"upgrade", b"websocket")],
    ] {
        let mut pairs: Vec<(&[u8], &[u8])> = vec![
            (b":method", b"POST"),
            (b":path", b"/v1/chat/completions"),
            (b":authority", b"api.example.com"),
        ];
        if !extra.iter().any(|(name, _)| *name == b"content-type") {
            pairs.push((b"content-type", b"application/json; charset=utf-8"));
        }
        pairs.extend_from_slice(extra);
        let (stream, action) = envoy.request_with_body(headers(&pairs), peer);
        assert_eq!(action, Action::Pause, "{extra:?}");
        assert!(!waits_for_body(stream), "{extra:?}");
    }
    envoy.run_queues();
    let batch = envoy.calls().pop().expect("their batch");
    envoy.answer_with(batch.token, "200", &decisions_for(&batch.body, |_| true));

    // A denial is kept under the figures it was decided on.
    let ask = |envoy: &mut MockEnvoy, max_tokens: u64| {
        let (stream, action) = envoy.request_with_body(post_chat(&[]), peer);
        assert_eq!(action, Action::Continue);
        let body = format!(r#"{{"max_tokens":{max_tokens}}}"#);
        (stream, envoy.send_body(stream, body.as_bytes(), true))
    };
    let (denied, _) = ask(&mut envoy, 600);
    envoy.run_queues();
    let batch = envoy.calls().pop().expect("a batch");
    envoy.answer_with(batch.token, "200", &decisions_for(&batch.body, |_| false));
    assert_eq!(envoy.reply(denied).map(|r| r.status), Some(429));
    let calls = envoy.calls().len();
    let (again, action) = ask(&mut envoy, 600);
    assert_eq!(
        envoy.reply(again).map(|r| r.status),
        Some(429),
        "from the cache"
    );
    assert_eq!(action, Action::Pause);
    envoy.run_queues();
    assert_eq!(envoy.calls().len(), calls, "asked nobody");
    let (_, action) = ask(&mut envoy, 10);
    assert_eq!(action, Action::Pause);
    envoy.run_queues();
    assert_eq!(envoy.calls().len(), calls + 1, "asking for less is asked");
}

#[test]
fn a_held_body_waits_out_a_leaky_buckets_delay() {
    let mut envoy = started_with_view(
        &plugin(serde_json::json!({})),
        serde_json::json!({ "version": 1, "rules": [{ "name": "output", "limit": 100000,
            "window": "1h", "match": { "path": "/v1/chat/completions" },
            "usage": { "json_pointer": "/usage/completion_tokens", "reserve": 500,
                       "reserve_from": "/max_tokens" } }] }),
    );
    let peer: &[(&[&str], &[u8])] = &[(PEER, b"192.0.2.1:1")];
    let (stream, _) = envoy.request_with_body(post_chat(&[]), peer);
    let piece = vec![b' '; sluice_filter::usage::MAX_REQUEST_BODY_BYTES + 1];
    assert_eq!(envoy.send_body(stream, &piece, false), Action::Pause);
    envoy.run_queues();
    let batch = envoy.calls().pop().expect("its batch");
    let decision = Decision {
        allowed: true,
        policy: Some(PolicyStatus {
            strategy: Algorithm::LeakyBucket,
            delay_ms: 500,
            ..status(true)
        }),
        ..Decision::unlimited()
    };
    let reply = CheckResponse {
        decisions: vec![decision],
    };
    envoy.answer_with(
        batch.token,
        "200",
        &serde_json::to_vec(&reply).expect("encode"),
    );
    assert!(!envoy.host.state.borrow().resumed.contains(&stream));
    assert_eq!(
        envoy.send_body(stream, b"more", false),
        Action::Pause,
        "its slot is not due"
    );
    envoy.tick(600);
    assert!(envoy.host.state.borrow().resumed.contains(&stream));
    assert_eq!(envoy.send_body(stream, b"rest", true), Action::Continue);
}
