//! Faults under load through the real Envoy with the real `.wasm`, two controllers and a
//! real Redis: Redis killed for a few seconds, one of two controllers killed, and the
//! embedded fallback's bound. Each test prints what it counted; the bounds asserted are the
//! README's ("Through faults"), with slack for a noisy two-core machine. Every request the
//! load sends is counted, answered or not: a request that fails or hangs is one of the
//! failures these tests are for.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
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
/// Envoy's workers: with the main thread's, `CONCURRENCY + 1` filter VMs.
const CONCURRENCY: u32 = 2;

/// The tests that load the machine take turns: two at once on two cores would measure
/// each other.
fn one_at_a_time() -> MutexGuard<'static, ()> {
    static TURN: Mutex<()> = Mutex::new(());
    TURN.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// What came back for one request.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Answer {
    /// A response: its status, whether a controller decided it (the rate-limit headers are
    /// there) rather than the failure mode, and the `error` of a JSON body.
    Response {
        status: u16,
        decided: bool,
        error: Option<String>,
    },
    /// No response: the connection failed, or nothing came within the client's 10 s.
    Failed(String),
}

#[derive(Debug)]
struct Sample {
    /// When the request was sent, from the start of the load.
    sent: Duration,
    /// Until the response, or until the request failed.
    latency: Duration,
    answer: Answer,
}

impl Sample {
    fn status(&self) -> Option<u16> {
        match self.answer {
            Answer::Response { status, .. } => Some(status),
            Answer::Failed(_) => None,
        }
    }

    /// Decided by a controller from its store, not by the failure mode.
    fn decided(&self) -> bool {
        matches!(self.answer, Answer::Response { decided: true, .. })
    }

    /// Admitted by a controller's decision.
    fn admitted_by_a_controller(&self) -> bool {
        matches!(
            self.answer,
            Answer::Response {
                status: 200,
                decided: true,
                ..
            }
        )
    }

    /// The failure mode `deny`'s answer, as the README documents it: `503` without
    /// rate-limit headers, `{"error":"rate_limiter_unavailable",…}`.
    fn refused_by_the_failure_mode(&self) -> bool {
        matches!(
            &self.answer,
            Answer::Response { status: 503, decided: false, error: Some(error) }
                if error == "rate_limiter_unavailable"
        )
    }

    fn failed(&self) -> bool {
        matches!(self.answer, Answer::Failed(_))
    }
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
                        let answer = match http::get(&url) {
                            Ok(response) => Answer::Response {
                                status: response.status,
                                decided: response.header("x-ratelimit-remaining").is_some(),
                                error: serde_json::from_str::<serde_json::Value>(&response.body)
                                    .ok()
                                    .and_then(|body| body["error"].as_str().map(str::to_owned)),
                            },
                            Err(error) => Answer::Failed(error.to_string()),
                        };
                        samples.push(Sample {
                            sent: sent - began,
                            latency: sent.elapsed(),
                            answer,
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

/// Every request was answered (none failed, none hung past the client's timeout), and none
/// waited past the filter's deadline (with this machine's slack).
fn assert_every_request_answered_in_time(samples: &[Sample]) {
    let failed: Vec<&Sample> = samples.iter().filter(|s| s.failed()).collect();
    assert!(
        failed.is_empty(),
        "{} of {} requests got no answer: {failed:?}",
        failed.len(),
        samples.len()
    );
    let late: Vec<&Sample> = samples
        .iter()
        .filter(|s| s.latency >= DEADLINE + SLACK)
        .collect();
    assert!(
        late.is_empty(),
        "{} requests waited past the deadline of {DEADLINE:?} (+{SLACK:?}): {late:?}",
        late.len()
    );
}

fn envoy_for(controllers: &[&Controller], upstream: &Upstream, failure_mode: &str) -> Envoy {
    Envoy::start(&EnvoyOptions {
        filter: Filter::sluice(failure_mode, DEADLINE.as_millis() as u64),
        upstream_port: upstream.port(),
        controller_ports: controllers.iter().map(|c| c.port).collect(),
        concurrency: CONCURRENCY,
        controller_http2: false,
    })
}

fn every_vm_configured(envoy: &Envoy) {
    envoy.wait_until_vms_read_the_configuration(CONCURRENCY as usize + 1);
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
    let _turn = one_at_a_time();
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
    let undecided_in_outage = outage.iter().filter(|s| !s.decided()).count();
    // Exact limiting is back once every later request is decided by the store again.
    let last_undecided = samples
        .iter()
        .filter(|s| s.sent >= back_at && !s.decided())
        .map(|s| s.sent)
        .max();
    let recovered_in = last_undecided.map_or(Duration::ZERO, |t| t.saturating_sub(back_at));
    let not_200: Vec<&Sample> = samples.iter().filter(|s| s.status() != Some(200)).collect();
    println!(
        "redis killed for 4 s: {} requests; before {before_rate:.0} req/s, during the outage \
         {outage_rate:.0} req/s ({undecided_in_outage} of {} by the failure mode); \
         not decided by Redis after it was back: {} (exact again {recovered_in:?} after); \
         longest request {:?}; without an answer: {}; other than 200: {}",
        samples.len(),
        outage.len(),
        samples
            .iter()
            .filter(|s| s.sent >= back_at && !s.decided())
            .count(),
        longest(&samples),
        samples.iter().filter(|s| s.failed()).count(),
        not_200.len(),
    );
    assert_every_request_answered_in_time(&samples);
    // The limit is never reached, and the failure mode (allow) admits: whatever answered,
    // every request passed.
    assert!(
        not_200.is_empty(),
        "every request admitted, by a controller or by the failure mode: {not_200:?}"
    );
    let undecided_before = before.iter().filter(|s| !s.decided()).count();
    assert_eq!(
        undecided_before,
        0,
        "decided by Redis before the kill: {:?}\n{}",
        before
            .iter()
            .filter(|s| !s.decided())
            .map(|s| (s.sent, s.status(), s.latency))
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
}

#[test]
fn one_of_two_controllers_killed_under_load_the_survivor_decides_within_two_seconds() {
    let _turn = one_at_a_time();
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

    // A request answered before the kill is the living controllers'; one in flight at the
    // kill, or sent after it, is the kill's.
    let (before, after): (Vec<&Sample>, Vec<&Sample>) =
        samples.iter().partition(|s| s.sent + s.latency < killed_at);
    let refused: Vec<&&Sample> = after
        .iter()
        .filter(|s| s.refused_by_the_failure_mode())
        .collect();
    let settled_from = killed_at + Duration::from_secs(2);
    let late = refused.iter().filter(|s| s.sent >= settled_from).count();
    let stat = |name: &str| {
        envoy
            .stat(&format!("wasmcustom.sluice_{name}"))
            .unwrap_or(0)
    };
    let (retries, failure_denied) = (stat("callout_retries"), stat("failure_denied"));
    println!(
        "one of two controllers killed: {} requests after the kill, {} by the failure mode \
         (deny), {late} of them 2 s or more after the kill; Envoy counted {failure_denied} \
         denied by the failure mode; batches tried again on the other controller: {retries}; \
         longest request {:?}; without an answer: {}",
        after.len(),
        refused.len(),
        longest(&samples),
        samples.iter().filter(|s| s.failed()).count(),
    );
    assert_every_request_answered_in_time(&samples);
    assert!(
        before.len() > 10 && before.iter().all(|s| s.admitted_by_a_controller()),
        "before the kill every request is admitted by a controller: {:?}",
        before
            .iter()
            .filter(|s| !s.admitted_by_a_controller())
            .collect::<Vec<_>>()
    );
    assert!(after.len() > 10, "load went on after the kill");
    // Statuses as documented: a controller's decision (a 200: the limit is never reached)
    // or the failure mode's 503; nothing else.
    let other: Vec<&&Sample> = after
        .iter()
        .filter(|s| !s.admitted_by_a_controller() && !s.refused_by_the_failure_mode())
        .collect();
    assert!(other.is_empty(), "answers after the kill: {other:?}");
    // Batches that found the dead controller were sent once more, to the survivor.
    assert!(
        retries >= 1,
        "no batch was tried again on the survivor (wasmcustom.sluice_callout_retries is \
         {retries}), so none found the dead controller, or none was retried"
    );
    // A request falls to the failure mode only when its batch found no controller, was
    // sent once more, and found none again (before Envoy took the dead one out): every
    // such batch counts a retry, and holds at most one request of each client.
    assert!(
        refused.len() as u64 <= retries * CLIENTS as u64,
        "{} requests refused by the failure mode, more than {CLIENTS} for each of the \
         {retries} batches tried again: {refused:?}",
        refused.len()
    );
    assert!(
        between(&samples, settled_from, Duration::MAX)
            .iter()
            .all(|s| s.admitted_by_a_controller()),
        "within 2 s every request is decided by the survivor ({late} were not)"
    );
    assert_eq!(
        failure_denied,
        refused.len() as u64,
        "Envoy counts every failure-mode answer the clients got"
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
