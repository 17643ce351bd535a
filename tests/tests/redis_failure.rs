//! What the README promises when Redis stops answering, with the controller's own default
//! Redis timeout (every other test gives the controller 2 s): the check call answers `503
//! {"error":"store_unavailable"}` once the timeout has passed, `/readyz` answers 503, the
//! filter applies its failure mode, and everything comes back when Redis does.

use std::time::{Duration, Instant};

use serde_json::json;
use sluice_e2e::controller::ControllerOptions;
use sluice_e2e::envoy::{EnvoyOptions, Filter};
use sluice_e2e::http;
use sluice_e2e::{wait_until, Controller, Envoy, RedisServer, Upstream};

const RULES: &str = "[[rules]]\nname = \"per-client\"\nlimit = 1000\nwindow = \"1h\"\n";
/// `--redis-timeout-ms` when not given (README, "Controller").
const DEFAULT_REDIS_TIMEOUT: Duration = Duration::from_millis(100);

fn check_body() -> serde_json::Value {
    json!({ "checks": [{ "client": { "kind": "ip", "value": "192.0.2.1" }, "path": "/" }] })
}

#[test]
fn a_frozen_redis_gets_503_store_unavailable_not_ready_and_the_failure_mode() {
    let redis = RedisServer::start();
    let url = redis.url();
    let controller = Controller::start_with(&ControllerOptions {
        redis_timeout_ms: None,
        ..ControllerOptions::new(RULES, Some(&url))
    });
    let upstream = Upstream::start();
    let envoy = Envoy::start(&EnvoyOptions {
        filter: Filter::sluice("deny", 2_000),
        upstream_port: upstream.port(),
        controller_ports: vec![controller.port],
        concurrency: 1,
        controller_http2: false,
    });
    let check = || http::post_check(&controller.url("/v1/check"), &check_body()).expect("answer");
    assert_eq!(check().status, 200);
    assert_eq!(http::get(&envoy.url("/items")).unwrap().status, 200);

    redis.pause();
    let began = Instant::now();
    let refused = check();
    let took = began.elapsed();
    assert_eq!(refused.status, 503, "{refused:?}");
    assert_eq!(refused.json()["error"], "store_unavailable", "{refused:?}");
    // It waited for the default timeout, not the 2 s other tests give it.
    assert!(
        took >= DEFAULT_REDIS_TIMEOUT,
        "answered before the timeout: {took:?}"
    );
    assert!(
        took < Duration::from_millis(1_500),
        "the default Redis timeout is 100 ms, the answer took {took:?}"
    );
    let ready = http::get(&controller.url("/readyz")).unwrap();
    assert_eq!(ready.status, 503, "{ready:?}");
    assert_eq!(ready.json()["status"], "not_ready");
    let through_envoy = http::get(&envoy.url("/items")).unwrap();
    assert_eq!(through_envoy.status, 503, "{through_envoy:?}");
    assert_eq!(through_envoy.json()["error"], "rate_limiter_unavailable");
    assert!(
        envoy.log().contains("controller answered with status 503"),
        "{}",
        envoy.log()
    );

    redis.resume();
    wait_until(
        "the controller is ready again",
        Duration::from_secs(10),
        || http::get(&controller.url("/readyz")).is_ok_and(|r| r.status == 200),
    );
    assert_eq!(check().status, 200);
    let back = http::get(&envoy.url("/items")).unwrap();
    assert_eq!(back.status, 200, "{back:?}");
    assert!(back.header("x-ratelimit-remaining").is_some(), "{back:?}");
}
