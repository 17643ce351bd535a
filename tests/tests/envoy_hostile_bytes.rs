//! Bytes no well-behaved client sends, through a real Envoy (one worker) with the real
//! `.wasm`: values that are not UTF-8, control characters and overlong values in every
//! place a client can put them. Each gets a deliberate answer, and after each one a normal
//! client on the same worker still gets its normal limited answer. Then an upstream that
//! answers with header values that are not UTF-8, and a VM that fails on purpose, which
//! Envoy reloads (`failure_policy: FAIL_RELOAD`, as in every shipped config).

use std::time::{Duration, Instant};

use serde_json::{json, Value};
use sluice_e2e::envoy::{config_yaml, sluice_plugin_config, with_fields, EnvoyOptions, Filter};
use sluice_e2e::raw::{self, RawResponse};
use sluice_e2e::upstream::BINARY_HEADER_VALUE;
use sluice_e2e::{free_port, wait_until, Controller, Envoy, Upstream};

/// `/probe` admits one request per client an hour; every request counts a great many.
const RULES: &str = r#"
[[rules]]
name = "probe"
limit = 1
window = "1h"
match = { path_prefix = "/probe" }

[[rules]]
name = "everything"
limit = 100000
window = "1h"
"#;

fn plugin() -> Value {
    with_fields(
        sluice_plugin_config("deny", 2_000),
        json!({
            "identity": {
                "jwt": { "keys": [{ "alg": "HS256", "secret": "hostile-test" }] },
                "api_key_header": "x-api-key",
                "client_header": "x-client-id",
                "ip": { "trusted_hops": 1 }
            },
            "cost_header": "x-cost",
            "test_only_abort_header": "x-sluice-test-abort"
        }),
    )
}

/// Envoy with one worker, request trailers parsed (so that a request's trailers reach the
/// filter chain), in front of `upstream`.
fn envoy(controller: &Controller, upstream: &Upstream) -> Envoy {
    let options = EnvoyOptions {
        filter: Filter::sluice_with(&plugin()),
        upstream_port: upstream.port(),
        controller_ports: vec![controller.port],
        concurrency: 1,
        controller_http2: false,
    };
    let (port, admin_port) = (free_port(), free_port());
    let config = config_yaml(&options, port, admin_port).replace(
        "use_remote_address: true",
        "use_remote_address: true\n          http_protocol_options: { enable_trailers: true }",
    );
    Envoy::start_with_config(&config, port, admin_port, 1)
}

/// A normal client after a hostile request: its first request passes with its limit shown,
/// its second is refused, exactly as for any client.
fn assert_worker_still_limits(envoy: &Envoy, client: &str, after: &str) {
    let get = || {
        raw::send(
            envoy.port,
            &raw::get_request(b"/probe", &[(b"x-client-id", client.as_bytes())]),
        )
        .unwrap_or_else(|e| panic!("after {after}: {e}\n{}", envoy.log()))
    };
    let first = get();
    assert_eq!(
        first.status,
        200,
        "after {after}: {first:?}\n{}",
        envoy.log()
    );
    assert_eq!(
        first.header_text("x-ratelimit-remaining").as_deref(),
        Some("0"),
        "after {after}"
    );
    let second = get();
    assert_eq!(second.status, 429, "after {after}: {second:?}");
    let body: Value = serde_json::from_slice(&second.body).expect("a JSON 429");
    assert_eq!(body["policy"], "probe", "after {after}");
}

struct Case {
    what: &'static str,
    request: Vec<u8>,
    /// The one answer this request must get, and who gives it.
    status: u16,
}

fn get(what: &'static str, path: &[u8], headers: &[(&[u8], &[u8])], status: u16) -> Case {
    Case {
        what,
        request: raw::get_request(path, headers),
        status,
    }
}

fn cases() -> Vec<Case> {
    const BINARY: &[u8] = b"caf\xe9 \xff\xfe";
    let long = vec![b'a'; 16 * 1024];
    let long_token = [b"Bearer ".as_slice(), &vec![b'e'; 9 * 1024]].concat();
    let many_hops = (0..200)
        .map(|i| format!("10.0.{}.{}", i / 250, i % 250))
        .collect::<Vec<_>>()
        .join(", ");
    let with_trailer = |value: &[u8]| {
        [
            b"POST /h/upload HTTP/1.1\r\nHost: sluice.test\r\nTransfer-Encoding: chunked\r\nTrailer: x-trailer\r\nConnection: close\r\n\r\n5\r\nhello\r\n0\r\nx-trailer: ".as_slice(),
            value,
            b"\r\n\r\n",
        ]
        .concat()
    };
    vec![
        // Any header, even one the filter never reads: the request goes on (counted by
        // its address under `rest`).
        get(
            "a header value that is not UTF-8",
            b"/h",
            &[(b"x-other", BINARY)],
            200,
        ),
        get(
            "an overlong header value",
            b"/h",
            &[(b"x-other", &long)],
            200,
        ),
        // Envoy's codec refuses control characters in a value before any filter runs.
        get(
            "a control character in a header",
            b"/h",
            &[(b"x-other", b"a\x01b")],
            400,
        ),
        // The client header: counted as the SHA-256 of its bytes, never as the address.
        get(
            "a client id that is not UTF-8",
            b"/h",
            &[(b"x-client-id", BINARY)],
            200,
        ),
        get(
            "an overlong client id",
            b"/h",
            &[(b"x-client-id", &long)],
            200,
        ),
        get(
            "a control character in the client id",
            b"/h",
            &[(b"x-client-id", b"\x7f\x02")],
            400,
        ),
        // The API key: hashed as the bytes it is.
        get(
            "an API key that is not UTF-8",
            b"/h",
            &[(b"x-api-key", BINARY)],
            200,
        ),
        get("an overlong API key", b"/h", &[(b"x-api-key", &long)], 200),
        // A token that is present and not valid is refused with 401 (on_invalid: reject).
        get(
            "a token that is not UTF-8",
            b"/h",
            &[(b"authorization", b"Bearer \xff\xfe.\xe9.x")],
            401,
        ),
        get(
            "an overlong token",
            b"/h",
            &[(b"authorization", &long_token)],
            401,
        ),
        get(
            "a token that is not a token",
            b"/h",
            &[(b"authorization", b"Bearer a.b.c")],
            401,
        ),
        // X-Forwarded-For: an entry that is not an address stops the search at the peer.
        get(
            "a forwarded-for that is not UTF-8",
            b"/h",
            &[(b"x-forwarded-for", b"\xff\xfe, 198.51.100.4")],
            200,
        ),
        get(
            "a forwarded-for of 200 hops",
            b"/h",
            &[(b"x-forwarded-for", many_hops.as_bytes())],
            200,
        ),
        // The cost header: garbage counts 1.
        get(
            "a cost that is not UTF-8",
            b"/h",
            &[(b"x-cost", b"\xff9")],
            200,
        ),
        // The path: bytes Envoy's codec lets through are matched with U+FFFD.
        get("a path that is not UTF-8", b"/h/caf\xe9", &[], 400),
        get(
            "an overlong path",
            &[b"/h/".as_slice(), &long].concat(),
            &[],
            200,
        ),
        get("a control character in the path", b"/h/a\x01b", &[], 400),
        // The query string never leaves the filter.
        get("a query that is not UTF-8", b"/h?q=\xff\xfe", &[], 400),
        get(
            "an overlong query",
            &[b"/h?q=".as_slice(), &long].concat(),
            &[],
            200,
        ),
        // `:authority` from the Host header.
        get(
            "a host that is not UTF-8",
            b"/h",
            &[(b"host", b"caf\xe9.example")],
            400,
        ),
        get("an overlong host", b"/h", &[(b"host", &long)], 200),
        get(
            "an x-request-id that is not UTF-8 on a refused request",
            b"/h",
            &[
                (b"authorization", b"Bearer a.b.c"),
                (b"x-request-id", BINARY),
            ],
            401,
        ),
        Case {
            what: "a trailer that is not UTF-8 on a request with a body",
            request: with_trailer(BINARY),
            status: 200,
        },
        Case {
            what: "a trailer with a control character",
            request: with_trailer(b"a\x01b"),
            status: 400,
        },
    ]
}

#[test]
fn every_place_a_client_puts_bytes_gets_a_deliberate_answer_and_the_worker_lives_on() {
    let controller = Controller::start(RULES, None);
    let upstream = Upstream::start();
    let envoy = envoy(&controller, &upstream);
    assert_worker_still_limits(&envoy, "probe-before", "nothing");
    for (index, case) in cases().into_iter().enumerate() {
        let response: RawResponse = raw::send(envoy.port, &case.request)
            .unwrap_or_else(|e| panic!("{}: {e}\n{}", case.what, envoy.log()));
        assert_eq!(response.status, case.status, "{}: {response:?}", case.what);
        if case.status == 401 {
            let body: Value = serde_json::from_slice(&response.body).expect("JSON");
            assert_eq!(body["error"], "invalid_token", "{}", case.what);
        }
        if case.status == 200 {
            assert!(
                response.header("x-ratelimit-limit").is_some(),
                "{}: decided by the limiter: {response:?}",
                case.what
            );
        }
        assert_worker_still_limits(&envoy, &format!("probe-{index}"), case.what);
    }
    let log = envoy.log();
    assert!(!log.contains("panicked"), "{log}");
    assert!(!log.contains("[critical]"), "{log}");
    assert_eq!(
        envoy.stat("wasm.sluice.vm_reload_success"),
        Some(0),
        "no VM failed"
    );
}

#[test]
fn an_upstream_answering_with_bytes_that_are_not_utf8_passes_through() {
    let controller = Controller::start(RULES, None);
    let upstream = Upstream::start();
    let envoy = envoy(&controller, &upstream);
    for client in ["binary-1", "binary-2"] {
        let response = raw::send(
            envoy.port,
            &raw::get_request(b"/binary-headers", &[(b"x-client-id", client.as_bytes())]),
        )
        .expect("an answer");
        assert_eq!(response.status, 200, "{response:?}");
        assert_eq!(response.header("x-binary"), Some(BINARY_HEADER_VALUE));
        assert!(response.header("x-ratelimit-remaining").is_some());
        assert_worker_still_limits(&envoy, &format!("probe-{client}"), "a binary response");
    }
}

/// The filter never panics, but a VM can still fail (a bug in a dependency, memory). Envoy
/// then reloads it (`failure_policy: FAIL_RELOAD`), and the worker limits again.
#[test]
fn a_vm_that_fails_is_reloaded_and_the_worker_limits_again() {
    let controller = Controller::start(RULES, None);
    let upstream = Upstream::start();
    let envoy = envoy(&controller, &upstream);
    assert_worker_still_limits(&envoy, "before-abort", "nothing");
    assert_eq!(envoy.stat("wasm.sluice.vm_reload_success"), Some(0));
    let aborted = raw::send(
        envoy.port,
        &raw::get_request(b"/h", &[(b"x-sluice-test-abort", b"1")]),
    );
    let failed_at = Instant::now();
    // The failing request itself is not answered by the filter (Envoy resets it or fails it).
    assert!(
        aborted.as_ref().map_or(true, |r| r.status >= 500),
        "{aborted:?}"
    );
    wait_until("the VM to be reloaded", Duration::from_secs(30), || {
        raw::send(
            envoy.port,
            &raw::get_request(b"/h", &[(b"x-client-id", b"reload")]),
        )
        .is_ok_and(|r| r.status == 200 && r.header("x-ratelimit-limit").is_some())
    });
    let reloaded_after = failed_at.elapsed();
    println!("limiting again {reloaded_after:?} after the VM failed");
    // The README's promise: within 5 s (the reload's backoff starts at 0.5 s).
    assert!(
        reloaded_after <= Duration::from_secs(5),
        "limiting again only {reloaded_after:?} after the VM failed"
    );
    assert_worker_still_limits(&envoy, "after-reload", "the reload");
    // Envoy counts the reload itself (`wasm.<plugin name>.vm_reload_*`).
    assert_eq!(envoy.stat("wasm.sluice.vm_reload_success"), Some(1));
    assert_eq!(envoy.stat("wasm.sluice.vm_reload_failure"), Some(0));
    let log = envoy.log();
    assert!(log.contains("aborting the VM on purpose"), "{log}");
}
