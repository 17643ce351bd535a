//! Strategies whose behaviour reaches into the filter, through a real Envoy: the leaky
//! bucket's delay (the request waits, paused in Envoy, for its slot) and the concurrency
//! limit's release when the stream ends.

use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use sluice_e2e::envoy::{EnvoyOptions, Filter};
use sluice_e2e::{http, wait_until, Controller, Envoy, RedisServer, Upstream};

const RULES: &str = r#"
[[rules]]
name = "queue"
strategy = "leaky_bucket"
limit = 2
window = "1s"
max_delay = "1s"
match = { path_prefix = "/queued" }

[[rules]]
name = "one-at-a-time"
strategy = "concurrency"
limit = 1
lease = "1h"
match = { path_prefix = "/slow" }
"#;

struct World {
    redis: RedisServer,
    _controller: Controller,
    _upstream: Upstream,
    envoy: Envoy,
}

fn world() -> World {
    let redis = RedisServer::start();
    let controller = Controller::start(RULES, Some(&redis.url()));
    let upstream = Upstream::start();
    let envoy = Envoy::start(&EnvoyOptions {
        // The timeout must outlast the longest delay a leaky bucket can ask for.
        filter: Filter::sluice("deny", 3_000),
        upstream_port: upstream.port(),
        controller_ports: vec![controller.port],
        concurrency: 2,
        controller_http2: false,
    });
    World {
        redis,
        _controller: controller,
        _upstream: upstream,
        envoy,
    }
}

#[test]
fn leaky_bucket_holds_requests_until_their_slot_and_refuses_past_the_max_delay() {
    let world = world();
    let start = Arc::new(Barrier::new(4));
    let url = world.envoy.url("/queued");
    let clients: Vec<_> = (0..4)
        .map(|_| {
            let (start, url) = (Arc::clone(&start), url.clone());
            std::thread::spawn(move || {
                start.wait();
                let began = Instant::now();
                let response = http::get(&url).expect("request through envoy");
                (response, began.elapsed())
            })
        })
        .collect();
    let mut results: Vec<_> = clients.into_iter().map(|c| c.join().unwrap()).collect();
    results.sort_by_key(|(_, elapsed)| *elapsed);
    let statuses: Vec<u16> = results.iter().map(|(r, _)| r.status).collect();
    let mut sorted = statuses.clone();
    sorted.sort();
    // Slots at 0, 500 and 1000 ms; the fourth would wait 1500 ms > max_delay.
    assert_eq!(sorted, [200, 200, 200, 429], "{results:?}");
    let admitted: Vec<Duration> = results
        .iter()
        .filter(|(r, _)| r.status == 200)
        .map(|(_, e)| *e)
        .collect();
    assert!(
        admitted[2] >= Duration::from_millis(950),
        "the last slot came early: {admitted:?}"
    );
    assert!(admitted[2] < Duration::from_millis(2_500), "{admitted:?}");
    assert!(admitted[1] >= Duration::from_millis(450), "{admitted:?}");
    let (denied, denied_after) = results.iter().find(|(r, _)| r.status == 429).unwrap();
    assert!(
        *denied_after < Duration::from_millis(500),
        "the refusal waited: {denied_after:?}"
    );
    assert_eq!(denied.json()["policy"], "queue");
    assert!(denied.number("retry-after") >= 1);
}

#[test]
fn a_concurrency_slot_is_released_when_the_stream_ends() {
    let world = world();
    let mut redis = world.redis.connection();
    let slots_held = move || -> i64 {
        let keys: Vec<String> = ::redis::cmd("KEYS")
            .arg("sluice:*:concurrency:*")
            .query(&mut redis)
            .unwrap();
        keys.iter()
            .map(|key| {
                ::redis::cmd("ZCARD")
                    .arg(key)
                    .query::<i64>(&mut redis)
                    .unwrap()
            })
            .sum()
    };
    let slots_held = std::sync::Mutex::new(slots_held);
    let held = || (slots_held.lock().unwrap())();

    let slow_url = world.envoy.url("/slow/800");
    let first = std::thread::spawn(move || http::get(&slow_url).expect("slow request"));
    wait_until(
        "the slow request holds its slot",
        Duration::from_secs(5),
        || held() == 1,
    );

    let second = http::get(&world.envoy.url("/slow/0")).unwrap();
    assert_eq!(second.status, 429, "{second:?}");
    assert_eq!(second.json()["policy"], "one-at-a-time");

    assert_eq!(first.join().unwrap().status, 200);
    // The lease is an hour long: only the filter's release can free the slot this soon.
    wait_until("the slot is released", Duration::from_secs(5), || {
        held() == 0
    });
    let third = http::get(&world.envoy.url("/slow/0")).unwrap();
    assert_eq!(third.status, 200, "{third:?}");
    wait_until(
        "the third request's slot is released too",
        Duration::from_secs(5),
        || held() == 0,
    );
}

/// The filter reads a request's cost from the configured header; a rule without a cost of
/// its own counts that many.
#[test]
fn the_cost_header_makes_a_request_count_more() {
    let rules = "[[rules]]\nname = \"bucket\"\nstrategy = \"token_bucket\"\nlimit = 1\nwindow = \"1h\"\nburst = 5\n";
    let controller = Controller::start(rules, None);
    let upstream = Upstream::start();
    let envoy = Envoy::start(&EnvoyOptions {
        filter: Filter::Sluice {
            plugin_config:
                r#"{"controller":{"cluster":"sluice_controller","token_env":"SLUICE_CHECK_TOKEN"},
                    "cost_header":"X-Cost"}"#
                    .to_owned(),
        },
        upstream_port: upstream.port(),
        controller_ports: vec![controller.port],
        concurrency: 1,
        controller_http2: false,
    });
    let url = envoy.url("/api");
    let costly = http::get_with(&url, &[("x-cost", "3")]).unwrap();
    assert_eq!(costly.status, 200, "{costly:?}");
    assert_eq!(costly.number("x-ratelimit-remaining"), 2);
    let too_costly = http::get_with(&url, &[("x-cost", "3")]).unwrap();
    assert_eq!(too_costly.status, 429, "{too_costly:?}");
    // Zero or garbage counts as 1: a header can never make a request free.
    let zero = http::get_with(&url, &[("x-cost", "0")]).unwrap();
    assert_eq!(zero.number("x-ratelimit-remaining"), 1, "{zero:?}");
    let plain = http::get(&url).unwrap();
    assert_eq!(plain.number("x-ratelimit-remaining"), 0, "{plain:?}");
}

/// A client that leaves while its check is out still gets a slot from the controller (the
/// controller cannot know); the filter gives it back at once instead of letting it wait for
/// its hour-long lease.
#[test]
fn a_slot_taken_for_a_client_that_left_mid_batch_is_given_back() {
    use sluice_e2e::delay_proxy::DelayProxy;
    use std::io::Write;
    let rules =
        "[[rules]]\nname = \"one\"\nstrategy = \"concurrency\"\nlimit = 1\nlease = \"1h\"\n";
    let controller = Controller::start(rules, None);
    let slow = DelayProxy::start(controller.port, Duration::from_millis(300));
    let upstream = Upstream::start();
    let mut plugin = sluice_e2e::envoy::sluice_plugin_config("deny", 3_000);
    // Only checks and releases pass the proxy.
    plugin["controller"]["config_poll_ms"] = serde_json::json!(0);
    let envoy = Envoy::start(&EnvoyOptions {
        filter: Filter::sluice_with(&plugin),
        upstream_port: upstream.port(),
        controller_ports: vec![slow.port],
        concurrency: 1,
        controller_http2: false,
    });
    let mut leaver = std::net::TcpStream::connect(("127.0.0.1", envoy.port)).unwrap();
    leaver
        .write_all(b"GET /leaving HTTP/1.1\r\nhost: sluice\r\n\r\n")
        .unwrap();
    wait_until("its check is out", Duration::from_secs(5), || {
        slow.chunks_in() >= 1
    });
    drop(leaver);
    // The check's answer (a slot taken) and the release of that slot.
    let answered = || {
        envoy
            .stat("cluster.sluice_controller.upstream_rq_200")
            .unwrap_or(0)
    };
    wait_until("the slot was given back", Duration::from_secs(5), || {
        answered() >= 2
    });
    let next = http::get(&envoy.url("/next")).unwrap();
    assert_eq!(next.status, 200, "the slot is free again: {next:?}");
    assert!(
        controller
            .log()
            .contains("release call served leases=1 freed=1"),
        "{}",
        controller.log()
    );
}
