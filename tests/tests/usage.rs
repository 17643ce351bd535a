//! Usage rules through real Envoy with the real `.wasm`, the controller and Redis, in front
//! of the fake OpenAI-compatible model server (`sluice_e2e::fake_llm`): JSON and streamed
//! replies charge exactly what they report, each rule its own side (total, completion, a
//! response header); usage beyond a reservation is charged in full; a reply that does not
//! say (a stream reset, a client gone mid-stream, no usage, a malformed body, an error page,
//! a stream without `include_usage`) is charged the rule's `unreported` units; a request
//! that cannot fit its reservation is refused before it reaches the upstream.

use std::io::{Read, Write};
use std::time::Duration;

use serde_json::json;
use sluice_e2e::envoy::{sluice_plugin_config, with_fields, EnvoyOptions, Filter};
use sluice_e2e::{http, Controller, Envoy, RedisServer, Upstream};

/// Limits far above what the tests use, over windows so long that nothing refills or rolls
/// over while a test runs (a bucket refills one token per 6 minutes), so counts are exact.
const LIMIT: u64 = 100_000;
const TOKENS_RESERVE: u64 = 1_000;
const OUTPUT_RESERVE: u64 = 300;
const OUTPUT_UNREPORTED: u64 = 250;
const CREDITS_RESERVE: u64 = 500;
const SMALL_BUDGET: u64 = 500;
const SMALL_RESERVE: u64 = 300;
const CAP_RESERVE: u64 = 100;

fn rules() -> String {
    format!(
        r#"
[[rules]]
name = "llm-tokens"
limit = {LIMIT}
window = "10000h"
match = {{ path = "/v1/chat/completions" }}
usage = {{ json_pointer = "/usage/total_tokens", reserve = {TOKENS_RESERVE} }}

[[rules]]
name = "llm-output"
strategy = "token_bucket"
limit = {LIMIT}
window = "10000h"
match = {{ path = "/v1/chat/completions" }}
usage = {{ json_pointer = "/usage/completion_tokens", reserve = {OUTPUT_RESERVE}, unreported = {OUTPUT_UNREPORTED} }}

[[rules]]
name = "llm-credits"
strategy = "gcra"
limit = {LIMIT}
window = "10000h"
burst = {LIMIT}
match = {{ path = "/v1/chat/completions" }}
usage = {{ response_header = "x-usage-total-tokens", reserve = {CREDITS_RESERVE} }}

[[rules]]
name = "small-budget"
limit = {SMALL_BUDGET}
window = "10000h"
match = {{ path = "/v1/chat/completions", headers = [{{ name = "x-small" }}] }}
usage = {{ json_pointer = "/usage/total_tokens", reserve = {SMALL_RESERVE} }}

[[rules]]
name = "output-cap"
limit = {SMALL_BUDGET}
window = "10000h"
match = {{ path = "/v1/chat/completions", headers = [{{ name = "x-cap" }}] }}
usage = {{ json_pointer = "/usage/completion_tokens", reserve = {CAP_RESERVE}, reserve_from = "/max_tokens" }}
"#
    )
}

struct Setup {
    _redis: RedisServer,
    controller: Controller,
    _upstream: Upstream,
    envoy: Envoy,
}

fn setup() -> Setup {
    let redis = RedisServer::start();
    let controller = Controller::start(&rules(), Some(&redis.url()));
    let upstream = Upstream::start();
    let plugin = with_fields(
        sluice_plugin_config("deny", 2_000),
        json!({ "identity": { "client_header": "x-client", "order": ["header", "ip"] } }),
    );
    let envoy = Envoy::start(&EnvoyOptions {
        // With `reserve_from` rules, the filter lets a request's headers go before its body
        // (see the README): the buffer filter holds them from the upstream until then.
        filter: Filter::ThenBuffer {
            first: Box::new(Filter::sluice_with(&plugin)),
        },
        upstream_port: upstream.port(),
        controller_ports: vec![controller.port],
        concurrency: 2,
        controller_http2: false,
    });
    envoy.wait_until_vms_read_the_configuration(2);
    Setup {
        _redis: redis,
        controller,
        _upstream: upstream,
        envoy,
    }
}

fn completion_request(stream: bool, include_usage: bool) -> String {
    json!({
        "model": "fake",
        "messages": [{ "role": "user", "content": "How many tokens is this?" }],
        "stream": stream,
        "stream_options": { "include_usage": include_usage },
    })
    .to_string()
}

impl Setup {
    fn chat(
        &self,
        client: &str,
        stream: bool,
        include_usage: bool,
        extra: &[(&str, &str)],
    ) -> Result<http::Response, ureq::Error> {
        let mut headers = vec![("x-client", client)];
        headers.extend_from_slice(extra);
        http::request(
            "POST",
            &self.envoy.url("/v1/chat/completions"),
            &headers,
            Some(completion_request(stream, include_usage)),
        )
    }

    /// What `client` is counted under `rule`, as the controller's counters say.
    fn counted(&self, client: &str, rule: &str) -> u64 {
        let counters = self
            .controller
            .admin(
                "GET",
                &format!("/v1/admin/counters?kind=header&value={client}&rule={rule}"),
                None,
            )
            .json();
        let remaining = counters["counters"][0]["remaining"]
            .as_u64()
            .unwrap_or_else(|| panic!("no counter of {rule} for {client}: {counters}"));
        let limit = counters["counters"][0]["limit"].as_u64().unwrap_or(LIMIT);
        limit - remaining
    }

    /// Waits until `client`'s counts under every rule are `expected` (settlements come with
    /// the workers' next tick, within a second).
    fn settles_to(&self, client: &str, expected: &[(&str, u64)]) {
        let read = || -> Vec<(&str, u64)> {
            expected
                .iter()
                .map(|(rule, _)| (*rule, self.counted(client, rule)))
                .collect()
        };
        let mut last = Vec::new();
        let settled = (0..250).any(|_| {
            last = read();
            let done = last == expected;
            if !done {
                std::thread::sleep(Duration::from_millis(20));
            }
            done
        });
        assert!(settled, "{client}: counted {last:?}, expected {expected:?}");
        // And it stays there: each reservation settles once.
        std::thread::sleep(Duration::from_millis(1_200));
        assert_eq!(read(), expected, "{client}: settled twice?");
    }
}

#[test]
fn json_and_streamed_replies_charge_exactly_what_they_report_each_rule_its_own_side() {
    let s = setup();
    let json = s
        .chat("json", false, false, &[("x-fake-usage", "30,12")])
        .expect("an answer");
    assert_eq!(json.status, 200, "{json:?}");
    assert_eq!(json.json()["usage"]["total_tokens"], 42);
    s.settles_to(
        "json",
        &[("llm-tokens", 42), ("llm-output", 12), ("llm-credits", 42)],
    );

    let streamed = s
        .chat("stream", true, true, &[("x-fake-usage", "100,40")])
        .expect("an answer");
    assert_eq!(streamed.status, 200, "{streamed:?}");
    assert!(
        streamed.body.contains("\"total_tokens\":140"),
        "{streamed:?}"
    );
    s.settles_to(
        "stream",
        // A stream has no usage header: that rule charges its reservation.
        &[
            ("llm-tokens", 140),
            ("llm-output", 40),
            ("llm-credits", CREDITS_RESERVE),
        ],
    );

    // Far beyond the reservation: charged in full, no free tokens.
    let big = s
        .chat("big", false, false, &[("x-fake-usage", "2000,1500")])
        .expect("an answer");
    assert_eq!(big.status, 200);
    s.settles_to(
        "big",
        &[
            ("llm-tokens", 3_500),
            ("llm-output", 1_500),
            ("llm-credits", 3_500),
        ],
    );
    // The stats read usage per rule and per client, as settled.
    let stats = s
        .controller
        .admin("GET", "/v1/admin/stats?window=1h", None)
        .json();
    let tokens = stats["rules"]
        .as_array()
        .and_then(|rules| rules.iter().find(|r| r["rule"] == "llm-tokens"))
        .map(|rule| rule["usage"].clone())
        .unwrap_or_default();
    assert_eq!(
        (
            &tokens["settlements"],
            &tokens["charged"],
            &tokens["reserved"]
        ),
        (
            &json!(3),
            &json!(42 + 140 + 3_500),
            &json!(3 * TOKENS_RESERVE)
        ),
        "{stats}"
    );
    let top: Vec<(String, u64)> = stats["top_usage"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|top| {
            let client = &top["client"];
            (
                format!(
                    "{}:{}",
                    client["kind"].as_str().unwrap_or(""),
                    client["value"].as_str().unwrap_or("")
                ),
                top["count"].as_u64().unwrap_or(0),
            )
        })
        .collect();
    // Each client's usage over its three rules, most first.
    assert_eq!(
        top,
        [
            ("header:big".to_owned(), 3_500 + 1_500 + 3_500),
            ("header:stream".to_owned(), 140 + 40 + CREDITS_RESERVE),
            ("header:json".to_owned(), 42 + 12 + 42),
        ],
        "{stats}"
    );
    // The next response's headers count tokens: what is left after this one's reservation.
    let next = s
        .chat("big", false, false, &[("x-fake-usage", "1,1")])
        .expect("an answer");
    let policy = next.header("ratelimit").unwrap_or_default().to_owned();
    assert!(
        policy.contains(&format!(
            "\"llm-tokens\";r={}",
            LIMIT - 3_500 - TOKENS_RESERVE
        )),
        "{policy}"
    );
}

#[test]
fn replies_that_do_not_say_are_charged_the_rules_unreported_units() {
    let s = setup();
    let unreported = [
        ("llm-tokens", TOKENS_RESERVE),
        ("llm-output", OUTPUT_UNREPORTED),
        ("llm-credits", CREDITS_RESERVE),
    ];
    let error = s
        .chat("error", false, false, &[("x-fake-fail", "error")])
        .expect("an answer");
    assert_eq!(error.status, 503);
    s.settles_to("error", &unreported);

    let malformed = s
        .chat("malformed", false, false, &[("x-fake-fail", "malformed")])
        .expect("an answer");
    assert_eq!(malformed.status, 200);
    s.settles_to("malformed", &unreported);

    let silent = s
        .chat("silent", false, false, &[("x-fake-fail", "no-usage")])
        .expect("an answer");
    assert_eq!(silent.status, 200);
    // The header still says (the body does not).
    s.settles_to(
        "silent",
        &[
            ("llm-tokens", TOKENS_RESERVE),
            ("llm-output", OUTPUT_UNREPORTED),
            ("llm-credits", 16 + 6),
        ],
    );

    let no_include = s.chat("no-include", true, false, &[]).expect("an answer");
    assert_eq!(no_include.status, 200);
    s.settles_to("no-include", &unreported);

    // The upstream breaks the stream off before its usage: the client sees an error.
    let reset = s.chat("reset", true, true, &[("x-fake-fail", "reset")]);
    assert!(
        reset
            .as_ref()
            .map_or(true, |r| !r.body.contains("total_tokens")),
        "{reset:?}"
    );
    s.settles_to("reset", &unreported);

    // The client goes away after the first event.
    let body = completion_request(true, true);
    let request = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: sluice.test\r\nx-client: gone\r\n\
         x-fake-event-gap-ms: 300\r\ncontent-type: application/json\r\n\
         content-length: {}\r\n\r\n{body}",
        body.len()
    );
    let mut connection =
        std::net::TcpStream::connect(("127.0.0.1", s.envoy.port)).expect("connect to Envoy");
    connection.write_all(request.as_bytes()).expect("send");
    let mut first = [0u8; 512];
    let read = connection.read(&mut first).expect("the first bytes");
    assert!(
        String::from_utf8_lossy(&first[..read]).starts_with("HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&first[..read])
    );
    drop(connection);
    s.settles_to("gone", &unreported);
}

#[test]
fn a_request_that_cannot_fit_its_reservation_is_refused_before_the_upstream() {
    let s = setup();
    let small = [("x-small", "1"), ("x-fake-usage", "150,100")];
    let first = s.chat("tight", false, false, &small).expect("an answer");
    assert_eq!(first.status, 200, "{first:?}");
    s.settles_to("tight", &[("small-budget", 250)]);
    // 250 spent of 500: a reservation of 300 does not fit.
    let refused = s.chat("tight", false, false, &small).expect("an answer");
    assert_eq!(refused.status, 429, "{refused:?}");
    let body = refused.json();
    assert_eq!(body["policy"], "small-budget", "{body}");
    // It says the budget is one of usage, and what is left of it.
    assert_eq!(
        (&body["unit"], &body["limit"], &body["remaining"]),
        (
            &json!("usage"),
            &json!(SMALL_BUDGET),
            &json!(SMALL_BUDGET - 250)
        ),
        "{body}"
    );
    assert!(
        body["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("Usage budget `small-budget` is spent: 500 units")),
        "{body}"
    );
    assert!(
        !refused.body.contains("chatcmpl"),
        "the 429 is the filter's own: the upstream never saw it"
    );
    s.settles_to("tight", &[("small-budget", 250)]);
}

/// Many concurrent streams from one client through 2 Envoys × 2 workers × 2 controllers
/// against one token budget: the total charged is exactly what the upstream reported for
/// the admitted requests, and what was admitted past the budget stays within the bound
/// (charged ≤ budget + Σ max(0, used − reserve)): none with `reserve = max`.
#[test]
fn concurrent_streams_across_proxies_charge_what_they_used_within_the_bound() {
    const BUDGET: u64 = 5_000;
    const USED: u64 = 150;
    for (reserve, name) in [(200, "strict"), (100, "loose")] {
        let rules = format!(
            r#"
[[rules]]
name = "{name}"
limit = {BUDGET}
window = "10000h"
match = {{ path = "/v1/chat/completions" }}
usage = {{ json_pointer = "/usage/total_tokens", reserve = {reserve}, max = {reserve} }}
"#
        );
        // The loose rule's figure is not clamped to its reservation: max above it.
        let rules = if name == "loose" {
            rules.replace(&format!("max = {reserve}"), "max = 1000")
        } else {
            rules
        };
        let redis = RedisServer::start();
        let controllers: Vec<Controller> = (0..2)
            .map(|_| Controller::start(&rules, Some(&redis.url())))
            .collect();
        let upstream = Upstream::start();
        let envoys: Vec<Envoy> = (0..2)
            .map(|_| {
                let envoy = Envoy::start(&EnvoyOptions {
                    filter: Filter::sluice_with(&with_fields(
                        sluice_plugin_config("deny", 2_000),
                        json!({ "identity": { "client_header": "x-client", "order": ["header", "ip"] } }),
                    )),
                    upstream_port: upstream.port(),
                    controller_ports: controllers.iter().map(|c| c.port).collect(),
                    concurrency: 2,
                    controller_http2: false,
                });
                envoy.wait_until_vms_read_the_configuration(2);
                envoy
            })
            .collect();
        let admitted = std::sync::atomic::AtomicU64::new(0);
        let refused = std::sync::atomic::AtomicU64::new(0);
        std::thread::scope(|scope| {
            for thread in 0..24 {
                let envoy = &envoys[thread % 2];
                let (admitted, refused) = (&admitted, &refused);
                scope.spawn(move || {
                    for _ in 0..4 {
                        let reply = http::request(
                            "POST",
                            &envoy.url("/v1/chat/completions"),
                            &[
                                ("x-client", "one"),
                                ("x-fake-usage", "100,50"),
                                ("x-fake-event-gap-ms", "30"),
                            ],
                            Some(completion_request(true, true)),
                        )
                        .expect("an answer");
                        match reply.status {
                            200 => {
                                assert!(reply.body.contains("\"total_tokens\":150"), "{reply:?}");
                                admitted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                            }
                            429 => {
                                refused.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                            }
                            other => panic!("{other}: {reply:?}"),
                        }
                    }
                });
            }
        });
        let admitted = admitted.into_inner();
        assert!(refused.into_inner() > 0, "{name}: the budget was reached");
        // Net of what both controllers reserved, gave back and charged beyond reservations:
        // exact past the budget too (a counter's `remaining` stops at 0).
        let series = |units: &str| -> u64 {
            let series = format!("sluice_usage_units_total{{rule=\"{name}\",units=\"{units}\"}}");
            controllers
                .iter()
                .map(|controller| {
                    http::get(&controller.admin_url("/metrics"))
                        .expect("scrape")
                        .body
                        .lines()
                        .find_map(|line| line.strip_prefix(series.as_str()))
                        .and_then(|value| value.trim().parse::<f64>().ok())
                        .map_or(0, |value| value as u64)
                })
                .sum()
        };
        let charged =
            || (series("reserved") + series("charged")).saturating_sub(series("returned"));
        // Every reservation settled: what is charged is what the admitted requests used.
        let expected = admitted * USED;
        let mut last = 0;
        let settled = (0..250).any(|_| {
            last = charged();
            std::thread::sleep(Duration::from_millis(20));
            last == expected
        });
        assert!(
            settled,
            "{name}: charged {last}, admitted {admitted} × {USED}"
        );
        let overshoot_bound = admitted * USED.saturating_sub(reserve);
        assert!(
            expected <= BUDGET + overshoot_bound,
            "{name}: {admitted} admitted used {expected}, past {BUDGET} + {overshoot_bound}"
        );
        if reserve >= USED {
            assert!(
                expected <= BUDGET,
                "{name}: strict admits nothing past the budget"
            );
        }
    }
}

/// `reserve_from`: the request's `/max_tokens` is its reservation. One that can never fit
/// is refused before the upstream; one that fits holds what it asked for until it
/// settles; a body longer than the filter reads reserves the rule's fixed `reserve`.
#[test]
fn a_request_reserves_the_max_tokens_its_body_asks_for() {
    let s = setup();
    let ask = |max_tokens: u64, padding: usize, usage: &str| {
        let body = json!({
            "model": "fake",
            "messages": [{ "role": "user", "content": "x".repeat(padding) }],
            "max_tokens": max_tokens,
        });
        http::request(
            "POST",
            &s.envoy.url("/v1/chat/completions"),
            &[
                ("x-client", "capped"),
                ("x-cap", "1"),
                ("x-fake-usage", usage),
            ],
            Some(body.to_string()),
        )
        .expect("an answer")
    };
    let upstream_before = s.envoy.stat("cluster.upstream.upstream_rq_total");

    let never = ask(SMALL_BUDGET + 100, 0, "1,1");
    assert_eq!(never.status, 429, "{never:?}");
    let body = never.json();
    assert_eq!(body["policy"], "output-cap", "{body}");
    assert!(
        body["message"]
            .as_str()
            .is_some_and(|m| m.contains("reserves more than usage budget")),
        "{body}"
    );
    assert_eq!(
        s.envoy.stat("cluster.upstream.upstream_rq_total"),
        upstream_before,
        "refused before the upstream"
    );

    let fits = ask(400, 0, "10,5");
    assert_eq!(fits.status, 200, "{fits:?}");
    let left = fits.header("ratelimit").unwrap_or_default().to_owned();
    assert!(
        left.contains(&format!("\"output-cap\";r={}", SMALL_BUDGET - 400)),
        "it holds the 400 it asked for: {left}"
    );
    s.settles_to("capped", &[("output-cap", 5)]);

    // Past the 64 KiB the filter reads: the fixed reservation.
    let long = ask(400, 70 * 1024, "10,5");
    assert_eq!(long.status, 200, "{long:?}");
    let left = long.header("ratelimit").unwrap_or_default().to_owned();
    assert!(
        left.contains(&format!(
            "\"output-cap\";r={}",
            SMALL_BUDGET - 5 - CAP_RESERVE
        )),
        "{left}"
    );
    s.settles_to("capped", &[("output-cap", 10)]);
}
