//! Seeing the limiter work through real Envoy, the real `.wasm`, two controllers and Redis:
//! known traffic read back from the stats API (both controllers' decisions, merged through
//! the store), and the JSON log line of each limited request, carrying the request id the
//! client was told.

use std::time::{Duration, Instant};

use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use sluice_e2e::controller::ControllerOptions;
use sluice_e2e::envoy::{sluice_plugin_config, with_fields, EnvoyOptions, Filter};
use sluice_e2e::http::{self, Response};
use sluice_e2e::{Controller, Envoy, RedisServer, Upstream};

fn digest(key: &str) -> String {
    Sha256::digest(key.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Three requests an hour per client on /api/, every limited request logged.
fn config() -> String {
    let mut config = String::from(
        r#"
[[tiers]]
name = "gold"
limit = 3
window = "1h"

[[rules]]
name = "per-client"
limit = 3
window = "1h"
match = { path_prefix = "/api/" }

[observability]
limited_log_sample = 1.0
"#,
    );
    for user in ["ann", "bob"] {
        config.push_str(&format!(
            "\n[[api_keys]]\nsha256 = \"{}\"\nuser = \"{user}\"\ntier = \"gold\"\n",
            digest(&format!("{user}-key"))
        ));
    }
    config
}

fn get(envoy: &Envoy, key: &str) -> Response {
    http::get_with(&envoy.url("/api/items"), &[("x-api-key", key)]).expect("through envoy")
}

/// Waits until a 10 s stats bucket has ended (and been published by every controller),
/// after the traffic sent before now.
fn after_the_bucket_ends() {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis() as u64;
    let next = now - now % 10_000 + 10_000;
    // The ticker runs once a second: publishing follows within ~1 s of the boundary.
    std::thread::sleep(Duration::from_millis(next - now + 2_500));
}

/// The last minute's stats from `controller`, read again for a few seconds while fewer than
/// `decisions` show: each controller publishes an ended bucket on its next tick, which runs
/// late on a busy machine. What is read last is returned, for the caller to judge.
fn stats_once_published(controller: &Controller, decisions: u64) -> Value {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let stats = controller
            .admin("GET", "/v1/admin/stats?window=1m", None)
            .json();
        if stats["decisions"].as_u64() >= Some(decisions) || Instant::now() > deadline {
            return stats;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn known_traffic_reads_back_from_the_stats_api_and_each_limited_request_logs_its_id() {
    let config = config();
    let redis = RedisServer::start();
    let url = redis.url();
    let with_json_logs = |id: &str| {
        let mut options = ControllerOptions::new(&config, Some(&url));
        options.extra_args = vec![
            "--log-format".into(),
            "json".into(),
            "--controller-id".into(),
            id.into(),
        ];
        options.log_filter = "info";
        Controller::start_with(&options)
    };
    let first = with_json_logs("first");
    let second = with_json_logs("second");
    let upstream = Upstream::start();
    // One Envoy per controller, so that each controller surely decides some of the traffic
    // (Envoy's load balancer would not promise it) and the stats must be merged.
    let envoy_of = |controller: &Controller| {
        let envoy = Envoy::start(&EnvoyOptions {
            filter: Filter::sluice_with(&with_fields(
                sluice_plugin_config("deny", 2_000),
                json!({ "identity": { "api_key_header": "x-api-key" } }),
            )),
            upstream_port: upstream.port(),
            controller_ports: vec![controller.port],
            concurrency: 2,
            controller_http2: false,
        });
        envoy.wait_until_vms_read_the_configuration(3);
        envoy
    };
    let envoy = envoy_of(&first);
    let other_envoy = envoy_of(&second);

    // ann: 3 allowed, 4 limited; bob: 2 allowed.
    let mut request_ids = Vec::new();
    for _ in 0..7 {
        let response = get(&envoy, "ann-key");
        if response.status == 429 {
            request_ids.push(response.json()["request_id"].as_str().unwrap().to_owned());
        }
    }
    assert_eq!(request_ids.len(), 4);
    for _ in 0..2 {
        assert_eq!(get(&other_envoy, "bob-key").status, 200);
    }
    // One JSON line per limited request, on whichever controller decided it. A denial the
    // filter answered from its cache is reported up to a second or two later and counted in
    // the bucket it arrives in: the lines show every decision was counted before the wait
    // for that bucket to end starts.
    let began = Instant::now();
    let lines: Vec<Value> = loop {
        let lines: Vec<Value> = [first.log(), second.log()]
            .iter()
            .flat_map(|log| {
                log.lines()
                    .filter_map(|line| serde_json::from_str::<Value>(line).ok())
                    .collect::<Vec<_>>()
            })
            .filter(|line| line["target"] == "sluice::limited")
            .collect();
        if lines.len() >= 4 || began.elapsed() > Duration::from_secs(10) {
            break lines;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    after_the_bucket_ends();

    // The other controller publishes its ended bucket on its next tick, about a second late
    // on a busy machine.
    let stats = stats_once_published(&first, 9);
    assert_eq!(stats["controllers"], 2, "{stats}");
    assert_eq!(stats["decisions"], 9, "{stats}");
    let rule = &stats["rules"][0];
    assert_eq!(
        (
            rule["rule"].as_str(),
            rule["allowed"].as_u64(),
            rule["limited"].as_u64()
        ),
        (Some("per-client"), Some(5), Some(4)),
        "{stats}"
    );
    assert_eq!(rule["clients"], 2);
    assert_eq!(rule["limited_clients"], 1);
    assert_eq!(
        stats["tiers"],
        json!([{ "tier": "gold", "allowed": 5, "limited": 4, "shadow_limited": 0, "refused": 0 }])
    );
    assert_eq!(
        stats["top_limited"],
        json!([{ "client": { "kind": "user", "value": "ann" }, "count": 4, "error": 0 }])
    );
    // The other controller's answer is the same.
    let other = stats_once_published(&second, 9);
    assert_eq!(other["decisions"], 9, "{other}");
    assert_eq!(other["rules"], stats["rules"]);

    assert_eq!(lines.len(), 4, "{lines:?}");
    let mut logged: Vec<String> = lines
        .iter()
        .map(|line| line["request_id"].as_str().unwrap_or_default().to_owned())
        .collect();
    logged.sort();
    request_ids.sort();
    assert_eq!(logged, request_ids, "the ids the clients were told");
    for line in &lines {
        assert_eq!(line["level"], "INFO");
        assert_eq!(line["client"], "ann");
        assert_eq!(line["rule"], "per-client");
        assert_eq!(line["tier"], "gold");
        assert_eq!(line["strategy"], "fixed_window");
        assert_eq!(line["remaining"], 0);
        assert!(line["timestamp"].is_string(), "{line}");
    }
}
