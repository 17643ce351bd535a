//! The whole path, for real: a client → Envoy running the built `.wasm` → the controller
//! binary → redis-server (or the embedded store) → headers or a 429.

use std::io::ErrorKind;
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use sluice_e2e::envoy::{self, EnvoyOptions, Filter};
use sluice_e2e::http::{self, Response};
use sluice_e2e::{Controller, Envoy, RedisServer, Upstream};

fn rules(limit: u64, window: &str) -> String {
    format!("[[rules]]\nname = \"per-client\"\nlimit = {limit}\nwindow = \"{window}\"\n")
}

/// Envoy with the Sluice filter in front of an upstream, asking `controllers`.
fn envoy_for(controllers: &[&Controller], upstream: &Upstream, concurrency: u32) -> Envoy {
    Envoy::start(&EnvoyOptions {
        filter: Filter::sluice("deny", 1_000),
        upstream_port: upstream.port(),
        controller_ports: controllers.iter().map(|c| c.port).collect(),
        concurrency,
        controller_http2: false,
    })
}

fn get(envoy: &Envoy) -> Response {
    http::get(&envoy.url("/items")).expect("request through envoy")
}

fn assert_denied_properly(response: &Response, limit: u64, window_s: u64) {
    assert_eq!(response.status, 429, "{response:?}");
    let retry_after = response.number("retry-after");
    assert!(
        (1..=window_s).contains(&retry_after),
        "Retry-After {retry_after}: {response:?}"
    );
    assert_eq!(response.number("x-ratelimit-limit"), limit);
    assert_eq!(response.number("x-ratelimit-remaining"), 0);
    assert_eq!(response.header("content-type"), Some("application/json"));
    let body = response.json();
    assert_eq!(body["error"], "rate_limited");
    assert_eq!(body["policy"], "per-client");
    assert_eq!(body["limit"], limit);
    assert_eq!(body["remaining"], 0);
    assert_eq!(body["retry_after"], retry_after);
    let reset = body["reset"].as_u64().expect("reset is a number");
    assert!((1..=window_s).contains(&reset), "{body}");
    assert!(
        body["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{body}"
    );
}

/// Requests under the limit pass with headers counting down, then the limit bites.
fn counts_down_then_denies(envoy: &Envoy) {
    for expected_remaining in (0..5).rev() {
        let response = get(envoy);
        assert_eq!(response.status, 200, "{response:?}\n{}", envoy.log());
        assert_eq!(response.body, "hello from upstream\n");
        assert_eq!(response.number("x-ratelimit-limit"), 5);
        assert_eq!(response.number("x-ratelimit-remaining"), expected_remaining);
        let reset = response.number("x-ratelimit-reset");
        assert!((1..=3_600).contains(&reset), "reset {reset}");
    }
    assert_denied_properly(&get(envoy), 5, 3_600);
}

#[test]
fn under_the_limit_headers_count_down_and_over_it_429_with_redis() {
    let redis = RedisServer::start();
    let controller = Controller::start(&rules(5, "1h"), Some(&redis.url()));
    let upstream = Upstream::start();
    let envoy = envoy_for(&[&controller], &upstream, 1);
    counts_down_then_denies(&envoy);

    // The counter lives in Redis, with a TTL no longer than the window (beside the
    // configuration's keys, which have none).
    let mut connection = redis.connection();
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("sluice:*")
        .query(&mut connection)
        .unwrap();
    let keys: Vec<String> = keys
        .into_iter()
        .filter(|key| sluice_controller::keys::counter_of(key).is_some())
        .collect();
    assert_eq!(keys.len(), 1, "{keys:?}");
    let ttl: i64 = redis::cmd("PTTL")
        .arg(&keys[0])
        .query(&mut connection)
        .unwrap();
    assert!(ttl > 0 && ttl <= 3_600_000, "PTTL {ttl}");
}

#[test]
fn embedded_store_serves_the_same_path_without_redis() {
    let controller = Controller::start(&rules(5, "1h"), None);
    assert!(
        controller.log().contains("embedded in-memory store"),
        "{}",
        controller.log()
    );
    let upstream = Upstream::start();
    let envoy = envoy_for(&[&controller], &upstream, 1);
    counts_down_then_denies(&envoy);
}

/// The controller also speaks HTTP/2 without TLS (prior knowledge): the same answers when
/// the callouts go over it, and Envoy's cluster stats show they did.
#[test]
fn callouts_over_http2_get_the_same_answers() {
    let redis = RedisServer::start();
    let controller = Controller::start(&rules(5, "1h"), Some(&redis.url()));
    let upstream = Upstream::start();
    let envoy = Envoy::start(&EnvoyOptions {
        filter: Filter::sluice("deny", 1_000),
        upstream_port: upstream.port(),
        controller_ports: vec![controller.port],
        concurrency: 1,
        controller_http2: true,
    });
    counts_down_then_denies(&envoy);
    let stat = |name: &str| envoy.stat(&format!("cluster.sluice_controller.{name}"));
    assert!(stat("upstream_cx_http2_total").unwrap_or(0) >= 1);
    assert_eq!(stat("upstream_cx_http1_total"), Some(0));
}

#[test]
fn retry_after_is_within_a_short_window_and_the_window_reopens() {
    let redis = RedisServer::start();
    let controller = Controller::start(&rules(1, "2s"), Some(&redis.url()));
    let upstream = Upstream::start();
    let envoy = envoy_for(&[&controller], &upstream, 1);
    // One request a window: the second in a row is denied unless a window boundary fell
    // between the two (then the third is); a few tries bound it.
    let mut denied = get(&envoy);
    for _ in 0..3 {
        if denied.status != 200 {
            break;
        }
        denied = get(&envoy);
    }
    assert_denied_properly(&denied, 1, 2);
    let retry_after = denied.number("retry-after");
    std::thread::sleep(Duration::from_secs(retry_after));
    let reopened = get(&envoy);
    assert_eq!(reopened.status, 200, "{reopened:?}");
}

/// Two Envoy workers, two controllers, one Redis: N concurrent requests against a limit L
/// admit exactly L.
#[test]
fn exactly_the_limit_is_admitted_across_workers_and_controllers() {
    const LIMIT: u64 = 25;
    const REQUESTS: usize = 80;
    let redis = RedisServer::start();
    let first = Controller::start(&rules(LIMIT, "1h"), Some(&redis.url()));
    let second = Controller::start(&rules(LIMIT, "1h"), Some(&redis.url()));
    let upstream = Upstream::start();
    let envoy = envoy_for(&[&first, &second], &upstream, 2);

    let start = Arc::new(Barrier::new(REQUESTS));
    let url = envoy.url("/items");
    let clients: Vec<_> = (0..REQUESTS)
        .map(|_| {
            let start = Arc::clone(&start);
            let url = url.clone();
            std::thread::spawn(move || {
                start.wait();
                http::get(&url).expect("request through envoy").status
            })
        })
        .collect();
    let statuses: Vec<u16> = clients.into_iter().map(|c| c.join().unwrap()).collect();
    let admitted = statuses.iter().filter(|&&s| s == 200).count();
    let denied = statuses.iter().filter(|&&s| s == 429).count();
    assert_eq!(admitted as u64, LIMIT, "{statuses:?}");
    assert_eq!(denied, REQUESTS - LIMIT as usize, "{statuses:?}");

    // Both controllers answered checks, so the exactness is Redis's and not one process's.
    for controller in [&first, &second] {
        let log = controller.log();
        assert!(
            log.contains("check call served"),
            "a controller answered no check:\n{log}"
        );
        // A check the store did not answer is logged as `store unavailable`.
        assert!(!log.contains("store unavailable"), "{log}");
    }
}

/// A loopback port that refuses connections for as long as it lives, and that no one else
/// can take meanwhile: the callout to it fails fast with a synthesized 503.
///
/// The port is the local end of a connection of the test's own (to a listener of its own).
/// Nothing listens on it, so the kernel answers a connection to it with a reset; and it
/// stays bound while the connection lives, so neither a `bind(0)` nor a bind to it (even
/// with `SO_REUSEADDR`, which this socket does not set) can have it. A port freed by
/// dropping a listener, by contrast, can be handed to the next process that binds port 0,
/// and a controller cluster pointed at it would reach whatever listens there.
struct RefusedPort {
    port: u16,
    _connection: (TcpListener, TcpStream, TcpStream),
}

impl RefusedPort {
    fn hold() -> RefusedPort {
        let listener = TcpListener::bind("127.0.0.1:0").expect("a listener");
        let ours = TcpStream::connect(listener.local_addr().expect("its address"))
            .expect("a connection to it");
        let (theirs, _) = listener.accept().expect("the connection accepted");
        let port = ours.local_addr().expect("the local end").port();
        let refused = TcpStream::connect(("127.0.0.1", port));
        assert!(
            refused
                .as_ref()
                .is_err_and(|e| e.kind() == ErrorKind::ConnectionRefused),
            "a connection to the held port {port} was not refused: {refused:?}"
        );
        let taken = TcpListener::bind(("127.0.0.1", port));
        assert!(
            taken
                .as_ref()
                .is_err_and(|e| e.kind() == ErrorKind::AddrInUse),
            "the held port {port} could be bound again: {taken:?}"
        );
        RefusedPort {
            port,
            _connection: (listener, ours, theirs),
        }
    }
}

fn envoy_with_controller_port(port: u16, failure_mode: &str, timeout_ms: u64) -> (Envoy, Upstream) {
    let upstream = Upstream::start();
    let envoy = Envoy::start(&EnvoyOptions {
        filter: Filter::sluice(failure_mode, timeout_ms),
        upstream_port: upstream.port(),
        controller_ports: vec![port],
        concurrency: 1,
        controller_http2: false,
    });
    (envoy, upstream)
}

fn timed_get(envoy: &Envoy) -> (Response, Duration) {
    let started = Instant::now();
    let response = get(envoy);
    (response, started.elapsed())
}

#[test]
fn controller_down_fails_open_in_allow_mode_with_a_log_line() {
    let refused = RefusedPort::hold();
    let (envoy, _upstream) = envoy_with_controller_port(refused.port, "allow", 300);
    for _ in 0..3 {
        let (response, elapsed) = timed_get(&envoy);
        assert_eq!(response.status, 200, "{response:?}");
        assert_eq!(response.header("x-ratelimit-limit"), None);
        assert!(elapsed < Duration::from_millis(300 + 1_000), "{elapsed:?}");
    }
    let log = envoy.log();
    assert!(
        log.contains("sluice: no decision, allowing the request (failure mode allow)"),
        "{log}"
    );
}

#[test]
fn controller_down_fails_closed_in_deny_mode_with_503() {
    let refused = RefusedPort::hold();
    let (envoy, _upstream) = envoy_with_controller_port(refused.port, "deny", 300);
    let (response, elapsed) = timed_get(&envoy);
    assert_eq!(response.status, 503, "{response:?}");
    assert_eq!(response.json()["error"], "rate_limiter_unavailable");
    assert_eq!(response.header("retry-after"), Some("1"));
    assert!(elapsed < Duration::from_millis(300 + 1_000), "{elapsed:?}");
    assert!(envoy.log().contains("failure mode deny"), "{}", envoy.log());
}

/// A controller that accepts connections and never answers: each request is decided by the
/// failure mode once the callout timeout passes, and none waits much longer.
#[test]
fn silent_controller_is_cut_off_at_the_timeout() {
    let silent = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = silent.local_addr().unwrap().port();
    const TIMEOUT_MS: u64 = 400;
    for (mode, status) in [("allow", 200), ("deny", 503)] {
        let (envoy, _upstream) = envoy_with_controller_port(port, mode, TIMEOUT_MS);
        let (response, elapsed) = timed_get(&envoy);
        assert_eq!(response.status, status, "{mode}: {response:?}");
        // Envoy's timers run on its cached clock and may fire a few ms early.
        assert!(
            elapsed >= Duration::from_millis(TIMEOUT_MS - 50),
            "{mode}: answered before the timeout: {elapsed:?}"
        );
        assert!(
            elapsed < Duration::from_millis(TIMEOUT_MS + 1_000),
            "{mode}: {elapsed:?}"
        );
        assert!(
            envoy.log().contains("status 504"),
            "{mode}: {}",
            envoy.log()
        );
    }
    drop(silent);
}

#[test]
fn bad_plugin_configuration_stops_envoy_naming_the_field() {
    let upstream = Upstream::start();
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        (
            r#"{"controller":{"cluster":"sluice_controller","timeout_ms":0}}"#,
            "controller.timeout_ms",
        ),
        (
            r#"{"controller":{"cluster":"sluice_controller"},"failure_mode":"sometimes"}"#,
            "failure_mode",
        ),
        (
            r#"{"controler":{"cluster":"sluice_controller"}}"#,
            "controler",
        ),
    ];
    for (plugin_config, field) in cases {
        let options = EnvoyOptions {
            filter: Filter::Sluice {
                plugin_config: plugin_config.to_owned(),
            },
            upstream_port: upstream.port(),
            controller_ports: vec![],
            concurrency: 1,
            controller_http2: false,
        };
        let path = dir.path().join("bad.yaml");
        std::fs::write(&path, envoy::config_yaml(&options, 1, 2)).unwrap();
        let output = envoy::validate(&path);
        let log = String::from_utf8_lossy(&output.stderr).into_owned()
            + &String::from_utf8_lossy(&output.stdout);
        assert!(
            !output.status.success(),
            "{plugin_config} was accepted:\n{log}"
        );
        assert!(
            log.contains(&format!(
                "sluice: invalid plugin configuration at `{field}`"
            )),
            "{plugin_config}: the log does not name {field}:\n{log}"
        );
    }
}

#[test]
fn a_good_plugin_configuration_validates() {
    let dir = tempfile::tempdir().unwrap();
    let options = EnvoyOptions {
        filter: Filter::sluice("allow", 200),
        upstream_port: 1,
        controller_ports: vec![2],
        concurrency: 1,
        controller_http2: false,
    };
    let path = dir.path().join("good.yaml");
    std::fs::write(&path, envoy::config_yaml(&options, 3, 4)).unwrap();
    let output = envoy::validate(&path);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
}
