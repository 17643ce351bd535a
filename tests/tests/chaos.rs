//! Faults under load through the real Envoy with the real `.wasm`, two controllers and a
//! real Redis: Redis killed for a few seconds, one of two controllers killed, and the
//! embedded fallback's bound. Each test prints what it counted; the bounds asserted are the
//! README's ("Through faults"), with slack for a noisy two-core machine.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::json;
use sluice_e2e::controller::ControllerOptions;
use sluice_e2e::envoy::{EnvoyOptions, Filter};
use sluice_e2e::http;
use sluice_e2e::{wait_until, Controller, Envoy, RedisServer, Upstream};

/// A limit no test reaches: every decision admits, and says so in its headers.
const RULES: &str = "[[rules]]\nname = \"per-client\"\nlimit = 100000000\nwindow = \"1h\"\n";
/// The filter's deadline for a decision.
const DEADLINE: Duration = Duration::from_millis(500);
/// What a request may take beyond the deadline on this machine (Envoy, the upstream, the
/// client, the scheduler).
const SLACK: Duration = Duration::from_millis(700);
const CLIENTS: usize = 6;

struct Sample {
    /// When the request was sent, from the start of the load.
    sent: Duration,
    latency: Duration,
    status: u16,
    /// Decided by a controller from its store (the rate-limit headers are there), not by
    /// the failure mode.
    decided: bool,
}

struct Load {
    began: Instant,
    stop: Arc<AtomicBool>,
    clients: Vec<JoinHandle<Vec<Sample>>>,
}

impl Load {
    fn start(envoy: &Envoy) -> Load {
        let began = Instant::now();
        let stop = Arc::new(AtomicBool::new(false));
        let clients = (0..CLIENTS)
            .map(|_| {
                let url = envoy.url("/items");
                let stop = Arc::clone(&stop);
                std::thread::spawn(move || {
                    let mut samples = Vec::new();
                    while !stop.load(Ordering::Relaxed) {
                        let sent = Instant::now();
                        let Ok(response) = http::get(&url) else {
                            continue;
                        };
                        samples.push(Sample {
                            sent: sent - began,
                            latency: sent.elapsed(),
                            status: response.status,
                            decided: response.header("x-ratelimit-remaining").is_some(),
                        });
                    }
                    samples
                })
            })
            .collect();
        Load {
            began,
            stop,
            clients,
        }
    }

    fn now(&self) -> Duration {
        self.began.elapsed()
    }

    fn finish(self) -> Vec<Sample> {
        self.stop.store(true, Ordering::Relaxed);
        let mut samples: Vec<Sample> = self
            .clients
            .into_iter()
            .flat_map(|client| client.join().expect("load thread"))
            .collect();
        samples.sort_by_key(|s| s.sent);
        samples
    }
}

fn between(samples: &[Sample], from: Duration, to: Duration) -> Vec<&Sample> {
    samples
        .iter()
        .filter(|s| s.sent >= from && s.sent < to)
        .collect()
}

fn per_second(samples: &[&Sample], from: Duration, to: Duration) -> f64 {
    samples.len() as f64 / (to - from).as_secs_f64()
}

fn longest(samples: &[Sample]) -> Duration {
    samples.iter().map(|s| s.latency).max().unwrap_or_default()
}

fn envoy_for(controllers: &[&Controller], upstream: &Upstream, failure_mode: &str) -> Envoy {
    Envoy::start(&EnvoyOptions {
        filter: Filter::sluice(failure_mode, DEADLINE.as_millis() as u64),
        upstream_port: upstream.port(),
        controller_ports: controllers.iter().map(|c| c.port).collect(),
        concurrency: 2,
        controller_http2: false,
    })
}

fn every_vm_configured(envoy: &Envoy) {
    envoy.wait_until_vms_read_the_configuration(2);
}

/// A controller on `redis` with its own default Redis timeout and these flags.
fn controller(redis: &str, flags: &[&str]) -> Controller {
    Controller::start_with(&ControllerOptions {
        redis_timeout_ms: None,
        log_filter: "info",
        extra_args: flags.iter().map(|f| f.to_string()).collect(),
        ..ControllerOptions::new(RULES, Some(redis))
    })
}

#[test]
fn redis_killed_under_load_the_fallback_answers_at_full_speed_and_exact_limiting_returns() {
    let redis = RedisServer::start();
    let url = redis.url();
    let first = controller(&url, &[]);
    let second = controller(&url, &[]);
    let upstream = Upstream::start();
    let envoy = envoy_for(&[&first, &second], &upstream, "allow");
    every_vm_configured(&envoy);
    let load = Load::start(&envoy);

    std::thread::sleep(Duration::from_secs(3));
    let killed_at = load.now();
    let killed = redis.kill();
    std::thread::sleep(Duration::from_secs(4));
    let restarting_at = load.now();
    let redis = killed.restart();
    let back_at = load.now();
    std::thread::sleep(Duration::from_secs(4));
    let samples = load.finish();
    drop(redis);

    // Requests in flight when Redis died are the outage's.
    let before_until = killed_at - Duration::from_millis(200);
    let before = between(&samples, Duration::from_millis(500), before_until);
    // The breaker opens within a few failed calls: the outage is measured from 0.5 s in.
    let outage_from = killed_at + Duration::from_millis(500);
    let outage = between(&samples, outage_from, restarting_at);
    let before_rate = per_second(&before, Duration::from_millis(500), before_until);
    let outage_rate = per_second(&outage, outage_from, restarting_at);
    let undecided_in_outage = outage.iter().filter(|s| !s.decided).count();
    // Exact limiting is back once every later request is decided by the store again.
    let last_undecided = samples
        .iter()
        .filter(|s| s.sent >= back_at && !s.decided)
        .map(|s| s.sent)
        .max();
    let recovered_in = last_undecided.map_or(Duration::ZERO, |t| t.saturating_sub(back_at));
    println!(
        "redis killed for 4 s: {} requests; before {before_rate:.0} req/s, during the outage \
         {outage_rate:.0} req/s ({undecided_in_outage} of {} by the failure mode); \
         not decided by Redis after it was back: {} (exact again {recovered_in:?} after); \
         longest request {:?}; statuses other than 200: {}",
        samples.len(),
        outage.len(),
        samples
            .iter()
            .filter(|s| s.sent >= back_at && !s.decided)
            .count(),
        longest(&samples),
        samples.iter().filter(|s| s.status != 200).count(),
    );
    let undecided_before = before.iter().filter(|s| !s.decided).count();
    assert_eq!(
        undecided_before,
        0,
        "decided by Redis before the kill: {:?}\n{}",
        before
            .iter()
            .filter(|s| !s.decided)
            .map(|s| (s.sent, s.status, s.latency))
            .collect::<Vec<_>>(),
        envoy
            .log()
            .lines()
            .filter(|l| l.contains("sluice"))
            .take(30)
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert!(
        outage.iter().all(|s| s.status == 200),
        "the failure mode (allow) applied"
    );
    assert!(
        outage.len() > 10 && undecided_in_outage == outage.len(),
        "the outage was seen: {undecided_in_outage} of {}",
        outage.len()
    );
    assert!(
        outage_rate >= before_rate / 2.0,
        "at full speed: {outage_rate:.0} req/s during the outage, {before_rate:.0} before"
    );
    assert!(
        recovered_in <= Duration::from_secs(2),
        "exact limiting returned {recovered_in:?} after Redis was back"
    );
    assert!(
        longest(&samples) < DEADLINE + SLACK,
        "a request waited {:?}, past the deadline of {DEADLINE:?}",
        longest(&samples)
    );
}

#[test]
fn one_of_two_controllers_killed_under_load_the_survivor_decides_within_two_seconds() {
    let redis = RedisServer::start();
    let url = redis.url();
    let mut doomed = controller(&url, &[]);
    let survivor = controller(&url, &[]);
    let upstream = Upstream::start();
    // Deny: a request the survivor did not decide is refused, and counted as such.
    let envoy = envoy_for(&[&doomed, &survivor], &upstream, "deny");
    every_vm_configured(&envoy);
    let load = Load::start(&envoy);

    std::thread::sleep(Duration::from_secs(2));
    let killed_at = load.now();
    doomed.stop();
    std::thread::sleep(Duration::from_secs(5));
    let samples = load.finish();

    let after = between(&samples, killed_at, Duration::MAX);
    let refused: Vec<&&Sample> = after.iter().filter(|s| !s.decided).collect();
    let settled_from = killed_at + Duration::from_secs(2);
    let late = refused.iter().filter(|s| s.sent >= settled_from).count();
    let retries = envoy.stat("wasmcustom.sluice_callout_retries").unwrap_or(0);
    println!(
        "one of two controllers killed: {} requests after the kill, {} by the failure mode \
         (deny: {}), {late} of them 2 s or more after the kill; batches tried again on the \
         other controller: {retries}; longest request {:?}",
        after.len(),
        refused.len(),
        refused.iter().filter(|s| s.status == 503).count(),
        longest(&samples),
    );
    assert!(after.len() > 10, "load went on after the kill");
    assert!(
        between(&samples, settled_from, Duration::MAX)
            .iter()
            .all(|s| s.status == 200 && s.decided),
        "within 2 s every request is decided by the survivor ({late} were not)"
    );
    assert!(
        longest(&samples) < DEADLINE + SLACK,
        "a request waited {:?}, past the deadline of {DEADLINE:?}",
        longest(&samples)
    );
}

fn check(controller: &Controller) -> bool {
    let body =
        json!({ "checks": [{ "client": { "kind": "ip", "value": "192.0.2.7" }, "path": "/" }] });
    let response = http::post_check(&controller.url("/v1/check"), &body).expect("an answer");
    assert_eq!(response.status, 200, "{response:?}");
    response.json()["decisions"][0]["allowed"] == true
}

/// With `--store-fallback local`, each controller counts on its own while Redis is away
/// (a client gets at most N controllers × its limit), and Redis counts alone again once it
/// is back.
#[test]
fn the_local_fallback_limits_each_controller_on_its_own_and_hands_back_to_redis() {
    const RULES_OF_FIVE: &str = "[[rules]]\nname = \"per-client\"\nlimit = 5\nwindow = \"1h\"\n";
    let redis = RedisServer::start();
    let url = redis.url();
    let start = || {
        Controller::start_with(&ControllerOptions {
            redis_timeout_ms: None,
            log_filter: "info",
            extra_args: vec!["--store-fallback".into(), "local".into()],
            ..ControllerOptions::new(RULES_OF_FIVE, Some(&url))
        })
    };
    let controllers = [start(), start()];
    let killed = redis.kill();

    let admitted: Vec<usize> = controllers
        .iter()
        .map(|c| (0..12).filter(|_| check(c)).count())
        .collect();
    println!("Redis away, admitted of 12 each by the local fallback: {admitted:?}");
    assert_eq!(
        admitted,
        [5, 5],
        "each controller enforces the limit on its own"
    );
    for controller in &controllers {
        let ready = http::get(&controller.url("/readyz")).unwrap();
        assert_eq!(ready.status, 503, "{ready:?}");
        assert!(ready.body.contains("circuit"), "{ready:?}");
        let metrics = controller.admin("GET", "/metrics", None).body;
        assert!(
            metrics.contains("sluice_store_circuit{position=\"open\"} 1")
                || metrics.contains("sluice_store_circuit{position=\"half_open\"} 1"),
            "{metrics}"
        );
        assert!(metrics.contains("sluice_store_fallback_checks_total{fallback=\"local\"} 12"));
    }

    let _redis = killed.restart();
    for controller in &controllers {
        wait_until("the circuit closed", Duration::from_secs(5), || {
            http::get(&controller.url("/readyz")).is_ok_and(|r| r.status == 200)
        });
    }
    // Redis came back empty: one counter for both controllers again.
    let admitted: usize = (0..12).filter(|i| check(&controllers[i % 2])).count();
    assert_eq!(admitted, 5, "counted in Redis, across both controllers");
}
