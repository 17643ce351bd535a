//! Batching checks across requests, through a real Envoy: exactness is unchanged, every
//! answer lands on its own request, a failed batch fails every request in it by the
//! failure mode, and a client that leaves mid-batch stalls nobody.

use std::io::Write;
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use sluice_e2e::delay_proxy::DelayProxy;
use sluice_e2e::envoy::{sluice_plugin_config, with_fields, EnvoyOptions, Filter};
use sluice_e2e::fixtures::{strategy_rules, STRATEGY_CASES};
use sluice_e2e::http::{self, Response};
use sluice_e2e::{wait_until, Controller, Envoy, RedisServer, Upstream};

fn envoy(filter: Filter, controllers: &[u16], upstream: &Upstream, concurrency: u32) -> Envoy {
    Envoy::start(&EnvoyOptions {
        filter,
        upstream_port: upstream.port(),
        controller_ports: controllers.to_vec(),
        concurrency,
        controller_http2: false,
    })
}

/// Sluice (failure mode deny, `timeout_ms`) that never reads the controller's rules: only
/// checks go to the controller, so that counting what reaches it counts batches.
fn without_rules_reads(timeout_ms: u64) -> Filter {
    let mut plugin = sluice_plugin_config("deny", timeout_ms);
    plugin["controller"]["config_poll_ms"] = serde_json::json!(0);
    Filter::sluice_with(&plugin)
}

/// Sends `paths` all at once, one client thread each; returns (path, response, elapsed).
fn burst(envoy: &Envoy, paths: Vec<String>) -> Vec<(String, Response, Duration)> {
    let start = Arc::new(Barrier::new(paths.len()));
    let clients: Vec<_> = paths
        .into_iter()
        .map(|path| {
            let url = envoy.url(&path);
            let start = Arc::clone(&start);
            std::thread::spawn(move || {
                start.wait();
                let began = Instant::now();
                let response = http::get(&url).expect("request through envoy");
                (path, response, began.elapsed())
            })
        })
        .collect();
    clients.into_iter().map(|c| c.join().unwrap()).collect()
}

/// The strategies' exactness tests, through Envoy with batching on: two workers, two
/// controllers, one Redis.
#[test]
fn every_strategy_admits_exactly_its_limit_through_batching_envoy() {
    let redis = RedisServer::start();
    let rules = strategy_rules();
    let controllers = [
        Controller::start(&rules, Some(&redis.url())),
        Controller::start(&rules, Some(&redis.url())),
    ];
    let upstream = Upstream::start();
    let envoy = envoy(
        Filter::sluice("deny", 2_000),
        &[controllers[0].port, controllers[1].port],
        &upstream,
        2,
    );
    for (strategy, _, path, expected) in STRATEGY_CASES {
        // Concurrency slots are held for as long as the upstream takes: 1.5 s.
        let path = if strategy == "concurrency" {
            "/slow/1500".to_owned()
        } else {
            path.to_owned()
        };
        let results = burst(&envoy, vec![path; 40]);
        let admitted = results.iter().filter(|(_, r, _)| r.status == 200).count();
        let denied = results.iter().filter(|(_, r, _)| r.status == 429).count();
        let odd: Vec<&Response> = results
            .iter()
            .map(|(_, r, _)| r)
            .filter(|r| r.status != 200 && r.status != 429)
            .collect();
        assert_eq!(
            (admitted, denied),
            (expected, 40 - expected),
            "{strategy}: other answers {odd:?}\n{}",
            envoy
                .log()
                .lines()
                .filter(|l| l.contains("wasm"))
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
    let batched = controllers.iter().any(|c| {
        c.log()
            .lines()
            .any(|l| l.contains("check call served") && !l.contains("checks=1"))
    });
    assert!(batched, "no check call carried more than one check");
    // Every batch got its answer: no callout failed and the watchdog never had to give a
    // batch up (its line says the batch was lost).
    assert_eq!(envoy.stat("wasmcustom.sluice_callout_errors"), Some(0));
    let log = envoy.log();
    assert!(!log.contains("the batch was lost"), "{log}");
    assert!(!log.contains("no decision"), "{log}");
}

/// Rules for `lanes` lanes: lane `k` is the path prefix `/lane-k/`, limited to `k`.
fn lane_rules(lanes: u64) -> String {
    (1..=lanes)
        .map(|k| {
            format!("[[rules]]\nname = \"lane-{k}\"\nlimit = {k}\nwindow = \"1d\"\nmatch = {{ path_prefix = \"/lane-{k}/\" }}\n\n")
        })
        .collect()
}

/// `k + extra` requests for each lane `k`.
fn lane_paths(lanes: u64, extra: u64) -> Vec<String> {
    (1..=lanes)
        .flat_map(|k| (0..k + extra).map(move |n| format!("/lane-{k}/{n}")))
        .collect()
}

/// Each lane admitted exactly its limit, and every response carries its own lane's policy
/// and a distinct remaining count.
fn assert_answers_landed(results: &[(String, Response, Duration)], lanes: u64, extra: u64) {
    for k in 1..=lanes {
        let lane: Vec<&Response> = results
            .iter()
            .filter(|(path, _, _)| path.starts_with(&format!("/lane-{k}/")))
            .map(|(_, response, _)| response)
            .collect();
        for response in &lane {
            assert_eq!(
                response.number("x-ratelimit-limit"),
                k,
                "lane {k}: {response:?}"
            );
        }
        let mut remaining: Vec<u64> = lane
            .iter()
            .filter(|r| r.status == 200)
            .map(|r| r.number("x-ratelimit-remaining"))
            .collect();
        remaining.sort();
        assert_eq!(remaining, (0..k).collect::<Vec<_>>(), "lane {k}");
        let denied: Vec<&&Response> = lane.iter().filter(|r| r.status == 429).collect();
        assert_eq!(denied.len() as u64, extra, "lane {k}");
        for response in denied {
            assert_eq!(response.json()["policy"], format!("lane-{k}"));
        }
    }
}

/// Lanes with distinct limits, all in one burst: the answers land on their own requests.
#[test]
fn answers_land_on_their_own_requests() {
    const LANES: u64 = 8;
    let controller = Controller::start(&lane_rules(LANES), None);
    let upstream = Upstream::start();
    let envoy = envoy(
        Filter::sluice("deny", 2_000),
        &[controller.port],
        &upstream,
        1,
    );
    let results = burst(&envoy, lane_paths(LANES, 2));
    assert_answers_landed(&results, LANES, 2);
    let log = controller.log();
    let calls = log
        .lines()
        .filter(|l| l.contains("check call served"))
        .count();
    assert!(
        calls < results.len(),
        "every request had its own call ({calls})"
    );
}

/// With a slow controller, full batches do not wait for the reply to the batch that is out:
/// they leave at once, side by side, and their answers land on their own requests too.
#[test]
fn full_batches_leave_while_another_is_out() {
    const LANES: u64 = 3;
    const DELAY: Duration = Duration::from_millis(500);
    let controller = Controller::start(&lane_rules(LANES), None);
    let slow = DelayProxy::start(controller.port, DELAY);
    let upstream = Upstream::start();
    let mut plugin = with_fields(
        sluice_plugin_config("deny", 5_000),
        serde_json::json!({ "max_batch_size": 3, "max_batches_in_flight": 4 }),
    );
    // Only checks pass the proxy, so that what it sees is the batches.
    plugin["controller"]["config_poll_ms"] = serde_json::json!(0);
    let envoy = envoy(Filter::sluice_with(&plugin), &[slow.port], &upstream, 1);
    let opener = {
        let url = envoy.url("/opener");
        std::thread::spawn(move || http::get(&url).expect("request through envoy"))
    };
    wait_until("the opener's batch is out", Duration::from_secs(5), || {
        slow.chunks_in() >= 1
    });
    let nine_requests_three_full_batches = lane_paths(LANES, 1);
    let results = burst(&envoy, nine_requests_three_full_batches);
    assert_eq!(opener.join().unwrap().status, 200);
    assert_answers_landed(&results, LANES, 1);
    // One batch at a time, the first would wait for the opener's reply and each of the
    // three for the one before: well over three delays. Side by side: about one.
    let slowest = results.iter().map(|(_, _, took)| *took).max().unwrap();
    assert!(
        slowest < DELAY * 5 / 2,
        "the slowest request took {slowest:?}: the batches went one after another\n{}",
        controller.log()
    );
}

/// A controller that never answers: every request of a batch gets the failure mode once
/// the callout times out (or once the batch before it has), and none waits longer.
#[test]
fn a_failed_batch_gives_every_request_the_failure_mode() {
    let silent = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = silent.local_addr().unwrap().port();
    let upstream = Upstream::start();
    const TIMEOUT_MS: u64 = 300;
    for (mode, status) in [("allow", 200), ("deny", 503)] {
        let envoy = envoy(Filter::sluice(mode, TIMEOUT_MS), &[port], &upstream, 1);
        let results = burst(&envoy, vec!["/any".to_owned(); 30]);
        for (_, response, elapsed) in &results {
            assert_eq!(response.status, status, "{mode}: {response:?}");
            // One batch out, the rest behind it: at most two timeouts, plus a margin.
            assert!(
                *elapsed < Duration::from_millis(2 * TIMEOUT_MS + 1_000),
                "{mode}: {elapsed:?}"
            );
        }
        let log = envoy.log();
        assert!(
            log.contains(&format!(
                "(failure mode {mode}): controller answered with status 504"
            )),
            "{mode}:\n{log}"
        );
    }
    drop(silent);
}

/// A client that sends a request and leaves while its check is in a batch that is out (the
/// first request, which woke the batcher) stalls nothing: the requests after it on the same
/// worker are answered normally.
#[test]
fn a_client_leaving_mid_batch_does_not_stall_the_worker() {
    let controller = Controller::start(
        "[[rules]]\nname = \"r\"\nlimit = 1000\nwindow = \"1h\"\n",
        None,
    );
    let slow = DelayProxy::start(controller.port, Duration::from_millis(400));
    let upstream = Upstream::start();
    let envoy = envoy(without_rules_reads(3_000), &[slow.port], &upstream, 1);
    for round in 0..3 {
        let seen = slow.chunks_in();
        let mut leaver = TcpStream::connect(("127.0.0.1", envoy.port)).unwrap();
        leaver
            .write_all(b"GET /leaving HTTP/1.1\r\nhost: sluice\r\n\r\n")
            .unwrap();
        wait_until("its batch is out", Duration::from_secs(5), || {
            slow.chunks_in() > seen
        });
        drop(leaver);
        let began = Instant::now();
        let after = http::get(&envoy.url("/after")).unwrap();
        assert_eq!(after.status, 200, "round {round}: {after:?}");
        assert!(
            began.elapsed() < Duration::from_secs(3),
            "round {round}: {:?}",
            began.elapsed()
        );
    }
}

/// The same with a denial: the answer for the client that left is a local reply, and a
/// reply to a request Envoy has already finished must not reach the filter (the SDK would
/// panic on the unknown context, and the worker's VM would fail every later request).
#[test]
fn a_client_leaving_before_its_denial_arrives_does_not_break_the_worker() {
    let controller = Controller::start(
        "[[rules]]\nname = \"r\"\nlimit = 1\nwindow = \"1h\"\n",
        None,
    );
    let slow = DelayProxy::start(controller.port, Duration::from_millis(400));
    let upstream = Upstream::start();
    let envoy = envoy(without_rules_reads(3_000), &[slow.port], &upstream, 1);
    // The only request the limit admits; later ones are denied.
    assert_eq!(http::get(&envoy.url("/first")).unwrap().status, 200);
    for round in 0..3 {
        let seen = slow.chunks_in();
        let mut leaver = TcpStream::connect(("127.0.0.1", envoy.port)).unwrap();
        leaver
            .write_all(format!("GET /leaving-{round} HTTP/1.1\r\nhost: sluice\r\n\r\n").as_bytes())
            .unwrap();
        wait_until("its batch is out", Duration::from_secs(5), || {
            slow.chunks_in() > seen
        });
        drop(leaver);
        // Envoy has the controller's answer (the denial) for the client that left: the
        // first request's callout and one per round so far.
        wait_until("its denial has come back", Duration::from_secs(5), || {
            envoy
                .stat("cluster.sluice_controller.upstream_rq_200")
                .unwrap_or(0)
                >= 2 + round
        });
        let after = http::get(&envoy.url(&format!("/after-{round}"))).unwrap();
        assert_eq!(after.status, 429, "round {round}: {after:?}");
    }
    assert!(!envoy.log().contains("panicked"), "{}", envoy.log());
}

/// Many clients that send a request and hang up at once, while batches of denials come
/// back: whatever Envoy has finished by then must not be answered (see the test above).
/// Afterwards the worker still answers properly.
#[test]
fn clients_hanging_up_under_load_do_not_break_the_worker() {
    let controller = Controller::start(
        "[[rules]]\nname = \"r\"\nlimit = 1\nwindow = \"1h\"\n",
        None,
    );
    let upstream = Upstream::start();
    let mut plugin = sluice_e2e::envoy::sluice_plugin_config("deny", 2_000);
    // Every denial goes to the controller (the cache would answer most of them here).
    plugin["denial_cache"] = serde_json::json!({ "enabled": false });
    let envoy = envoy(
        Filter::sluice_with(&plugin),
        &[controller.port],
        &upstream,
        1,
    );
    // The only request the limit admits; every later one is denied.
    assert_eq!(http::get(&envoy.url("/first")).unwrap().status, 200);
    let deadline = Instant::now() + Duration::from_secs(4);
    let port = envoy.port;
    let hangers: Vec<_> = (0..24)
        .map(|n| {
            std::thread::spawn(move || {
                let mut sent = 0u32;
                while Instant::now() < deadline {
                    if let Ok(mut stream) = TcpStream::connect(("127.0.0.1", port)) {
                        let request = format!("GET /hang-{n} HTTP/1.1\r\nhost: sluice\r\n\r\n");
                        let _ = stream.write_all(request.as_bytes());
                        // Sometimes at once, sometimes a moment later: mid-batch either way.
                        if sent % 2 == 1 {
                            std::thread::sleep(Duration::from_micros(300));
                        }
                        sent += 1;
                    }
                }
                sent
            })
        })
        .collect();
    let sent: u32 = hangers.into_iter().map(|h| h.join().unwrap()).sum();
    assert!(sent > 100, "only {sent} requests sent");
    for _ in 0..3 {
        let after = http::get(&envoy.url("/after")).unwrap();
        assert_eq!(after.status, 429, "{after:?}");
        assert_eq!(after.json()["policy"], "r", "{after:?}");
    }
    assert!(!envoy.log().contains("panicked"), "{}", envoy.log());
}

/// With batching off, each request makes its own callout: same answers.
#[test]
fn batching_off_still_limits() {
    let controller = Controller::start(
        "[[rules]]\nname = \"r\"\nlimit = 3\nwindow = \"1h\"\n",
        None,
    );
    let upstream = Upstream::start();
    let envoy = envoy(
        Filter::sluice_batching("deny", 1_000, false),
        &[controller.port],
        &upstream,
        1,
    );
    let statuses: Vec<u16> = (0..4)
        .map(|_| http::get(&envoy.url("/x")).unwrap().status)
        .collect();
    assert_eq!(statuses, [200, 200, 200, 429]);
    assert_eq!(controller.log().matches("check call served").count(), 4);
}
