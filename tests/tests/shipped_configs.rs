//! What ships in `envoy/` and `controller/` works as shipped.

use sluice_e2e::envoy::{self, replace_exactly, shipped_configs, with_built_wasm};
use sluice_e2e::{free_port, http, repo_root, Controller, Envoy, Upstream};

#[test]
fn every_shipped_envoy_config_validates() {
    let dir = tempfile::tempdir().unwrap();
    for config in shipped_configs() {
        let checked = dir.path().join(config.file_name().unwrap());
        std::fs::write(&checked, with_built_wasm(&config)).unwrap();
        let output = envoy::validate(&checked);
        assert!(
            output.status.success(),
            "{} does not validate:\n{}",
            config.display(),
            String::from_utf8_lossy(&output.stderr)
        );
    }
}

/// README, "Hostile input": every shipped config sets the wasm filter's `failure_policy:
/// FAIL_RELOAD` with a backoff of 0.5–10 s, so that a VM that panicked is replaced instead of
/// failing every later request on its worker (tests/tests/envoy_hostile_bytes.rs shows the
/// reload itself, with the tests' Envoy, which sets the same).
#[test]
fn every_shipped_sluice_filter_reloads_a_failed_vm_with_the_documented_backoff() {
    let mut filters = 0;
    for path in shipped_configs() {
        let text = std::fs::read_to_string(&path).unwrap();
        let config: serde_yaml_ng::Value = serde_yaml_ng::from_str(&text).unwrap();
        let listeners = config["static_resources"]["listeners"]
            .as_sequence()
            .unwrap();
        let wasm_filters = listeners
            .iter()
            .flat_map(|listener| {
                listener["filter_chains"]
                    .as_sequence()
                    .into_iter()
                    .flatten()
            })
            .flat_map(|chain| chain["filters"].as_sequence().into_iter().flatten())
            .flat_map(|filter| {
                filter["typed_config"]["http_filters"]
                    .as_sequence()
                    .into_iter()
                    .flatten()
            })
            .filter(|filter| filter["name"].as_str() == Some("envoy.filters.http.wasm"));
        for filter in wasm_filters {
            filters += 1;
            let wasm = &filter["typed_config"]["config"];
            let file = path.display();
            assert_eq!(
                wasm["failure_policy"].as_str(),
                Some("FAIL_RELOAD"),
                "{file}"
            );
            let backoff = &wasm["reload_config"]["backoff"];
            assert_eq!(backoff["base_interval"].as_str(), Some("0.5s"), "{file}");
            assert_eq!(backoff["max_interval"].as_str(), Some("10s"), "{file}");
        }
    }
    assert_eq!(
        filters, 2,
        "the demo's and docker-compose's Envoy run the Sluice filter"
    );
    // And the tests' Envoy runs it the same way.
    let tested = envoy::config_yaml(
        &envoy::EnvoyOptions {
            filter: envoy::Filter::sluice("deny", 1_000),
            upstream_port: 1,
            controller_ports: vec![2],
            concurrency: 1,
            controller_http2: false,
        },
        3,
        4,
    );
    assert!(tested.contains("failure_policy: FAIL_RELOAD"));
    assert!(
        tested.contains("reload_config: { backoff: { base_interval: 0.5s, max_interval: 10s } }")
    );
}

fn cluster<'a>(config: &'a serde_yaml_ng::Value, name: &str) -> &'a serde_yaml_ng::Value {
    config["static_resources"]["clusters"]
        .as_sequence()
        .and_then(|clusters| clusters.iter().find(|c| c["name"].as_str() == Some(name)))
        .unwrap_or_else(|| panic!("no cluster {name}"))
}

/// The tests' Envoy checks the controllers' health as the shipped configs do, so what the
/// failure and chaos tests show is what a user of the shipped configs gets.
#[test]
fn the_shipped_controller_clusters_check_health_as_the_tests_envoy_does() {
    let dedented: String = envoy::CONTROLLER_HEALTH
        .lines()
        .map(|line| line.strip_prefix("    ").unwrap_or(line))
        .collect::<Vec<_>>()
        .join("\n");
    let tested: serde_yaml_ng::Value = serde_yaml_ng::from_str(&dedented).unwrap();
    assert!(tested["health_checks"][0]["http_health_check"]["path"] == "/readyz");
    for file in ["envoy/demo.yaml", "envoy/compose.yaml"] {
        let text = std::fs::read_to_string(repo_root().join(file)).unwrap();
        let config: serde_yaml_ng::Value = serde_yaml_ng::from_str(&text).unwrap();
        let shipped = cluster(&config, "sluice_controller");
        for part in ["health_checks", "outlier_detection"] {
            assert_eq!(shipped[part], tested[part], "{file}: {part}");
        }
    }
    let text = std::fs::read_to_string(repo_root().join("envoy/native-ratelimit.yaml")).unwrap();
    let config: serde_yaml_ng::Value = serde_yaml_ng::from_str(&text).unwrap();
    let rls = cluster(&config, "sluice_rls");
    assert_eq!(
        rls["health_checks"][0]["http_health_check"]["path"], "/readyz",
        "the gRPC cluster is health-checked on the check port's /readyz"
    );
    assert!(rls["outlier_detection"].is_mapping());
}

/// The demo (`envoy/demo.yaml` and `controller/demo-rules.toml`, as `make run` uses them)
/// on free ports, with its controller on the embedded store.
fn demo() -> (Controller, Upstream, Envoy) {
    let rules = std::fs::read_to_string(repo_root().join("controller/demo-rules.toml")).unwrap();
    let controller = Controller::start(&rules, None);
    let upstream = Upstream::start();
    let envoy = start_shipped(
        "envoy/demo.yaml",
        &[(8080, upstream.port()), (8081, controller.port)],
    );
    (controller, upstream, envoy)
}

/// A shipped Envoy config (`file`, from the repository's root) on free ports: its listener
/// (10000) and admin (9901), and each `(shipped, ours)` of `others`.
fn start_shipped(file: &str, others: &[(u16, u16)]) -> Envoy {
    let (port, admin_port) = (free_port(), free_port());
    let mut config = with_built_wasm(&repo_root().join(file));
    for (shipped, ours) in [(10000, port), (9901, admin_port)].iter().chain(others) {
        config = replace_exactly(
            &config,
            &format!("port_value: {shipped} "),
            &format!("port_value: {ours} "),
            1,
        );
    }
    Envoy::start_with_config(&config, port, admin_port, 1)
}

fn epoch_ms() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis()
}

/// Runs `requests` inside one window of `window_ms` aligned to the epoch (the shipped
/// rules' fixed windows, on the clock the controller shares with this test), and gives what
/// they saw. Each attempt starts in the first 40% of a window no earlier attempt sent a
/// request in; an attempt whose requests straddled a boundary (which resets the count)
/// shows nothing and is made again in the next window, so a slow machine costs time, not
/// a false failure, and what is asserted on is always one window's count.
fn in_one_window<T: std::fmt::Debug>(window_ms: u128, mut requests: impl FnMut() -> T) -> T {
    const ATTEMPTS: usize = 5;
    let mut touched: Option<u128> = None;
    for _ in 0..ATTEMPTS {
        sluice_e2e::wait_until(
            "the start of a window no attempt has used",
            std::time::Duration::from_millis(3 * window_ms as u64),
            || {
                let now = epoch_ms();
                touched.is_none_or(|window| now / window_ms > window)
                    && now % window_ms < window_ms * 2 / 5
            },
        );
        let began = epoch_ms();
        let seen = requests();
        let ended = epoch_ms();
        if began / window_ms == ended / window_ms {
            return seen;
        }
        eprintln!(
            "the requests took {} ms and straddled a {window_ms} ms window: {seen:?}; again",
            ended - began
        );
        touched = Some(ended / window_ms);
    }
    panic!("{ATTEMPTS} attempts, none inside one {window_ms} ms window");
}

/// `n` requests to `path` (with `headers`), one after another.
fn send(envoy: &Envoy, path: &str, headers: &[(&str, &str)], n: usize) -> Vec<http::Response> {
    (0..n)
        .map(|_| http::get_with(&envoy.url(path), headers).expect("through envoy"))
        .collect()
}

/// Five requests from one anonymous client (within one 10 s window) pass with
/// `x-ratelimit-remaining` counting down, and the sixth is limited by `policy`.
fn assert_five_then_limited(responses: &[http::Response], policy: &str) {
    let seen: Vec<(u16, Option<&str>)> = responses
        .iter()
        .map(|r| (r.status, r.header("x-ratelimit-remaining")))
        .collect();
    assert_eq!(
        seen[..5],
        [
            (200, Some("4")),
            (200, Some("3")),
            (200, Some("2")),
            (200, Some("1")),
            (200, Some("0"))
        ],
        "5 pass, counting down: {responses:?}"
    );
    let limited = &responses[5];
    assert_eq!(limited.status, 429, "{limited:?}");
    assert_eq!(limited.json()["policy"], policy);
}

/// Five requests from one anonymous client pass with headers counting down, the sixth is
/// limited.
#[test]
fn the_demo_configuration_limits_as_the_readme_says() {
    let (_controller, _upstream, envoy) = demo();

    let responses = in_one_window(10_000, || send(&envoy, "/anything", &[], 6));
    assert_five_then_limited(&responses, "per-client");
}

/// The README's quick start on the demo's fake model: each reply's `RateLimit` shows the
/// token budget left after its own reservation of 500, the replies before it settled at
/// what they used (301 tokens: a prompt of 1, `max_tokens` 300).
#[test]
fn the_demo_counts_the_tokens_replies_report_as_the_readme_says() {
    let (_controller, _upstream, envoy) = demo();
    // A worker settles once it knows a usage rule is in force: from its first read.
    envoy.wait_until_vms_read_the_configuration(1);
    let ask = || {
        http::request(
            "POST",
            &envoy.url("/v1/chat/completions"),
            &[("x-api-key", "demo-pro-key")],
            Some(r#"{"messages":[{"role":"user","content":"hi"}],"max_tokens":300}"#.to_owned()),
        )
        .expect("through envoy")
    };
    let tokens_left = |reply: &http::Response| {
        let fields = reply.header("ratelimit").unwrap_or_default().to_owned();
        fields
            .split(',')
            .find_map(|field| field.trim().strip_prefix("\"llm-tokens\";r="))
            .and_then(|rest| rest.split(';').next())
            .and_then(|r| r.parse::<u64>().ok())
            .unwrap_or_else(|| panic!("no llm-tokens field: {fields:?}"))
    };
    // The budget is a minute's: the three replies in one minute.
    let seen = in_one_window(60_000, || {
        (0..3)
            .map(|i| {
                if i > 0 {
                    std::thread::sleep(std::time::Duration::from_millis(1_500));
                }
                let reply = ask();
                assert_eq!(reply.status, 200, "{reply:?}");
                assert_eq!(reply.json()["usage"]["total_tokens"], 301);
                tokens_left(&reply)
            })
            .collect::<Vec<u64>>()
    });
    assert_eq!(
        seen,
        [2_000 - 500, 2_000 - 301 - 500, 2_000 - 2 * 301 - 500]
    );
}

/// The README's worked example: the demo's free key bursts to 20 and gets 2 when DEGRADED,
/// pro's limit stays 100 (150 with its burst when NORMAL), an unknown key gets 401.
#[test]
fn the_demo_tiers_follow_the_system_state_as_the_readme_says() {
    let (controller, _upstream, envoy) = demo();
    let with_key = |key: &str| {
        http::get_with(&envoy.url("/hello"), &[("x-api-key", key)]).expect("through envoy")
    };
    let limit = |key: &str| with_key(key).header("x-ratelimit-limit").map(str::to_owned);
    let passed = (0..25)
        .filter(|_| with_key("demo-free-key").status == 200)
        .count();
    assert_eq!(
        passed, 20,
        "free bursts to 20 (and refills a token every 6 s)"
    );
    assert_eq!(limit("demo-pro-key").as_deref(), Some("150"));
    assert_eq!(limit("demo-enterprise-key").as_deref(), Some("1000"));
    assert_eq!(with_key("not-a-demo-key").status, 401);

    let set = controller.admin(
        "PUT",
        "/v1/admin/state",
        Some(&serde_json::json!({ "state": "DEGRADED" })),
    );
    assert_eq!(set.status, 200, "{set:?}");
    // A denial the filter remembers holds until it reads the new version (within 2 s).
    sluice_e2e::wait_until("free is shed", std::time::Duration::from_secs(2), || {
        limit("demo-free-key").as_deref() == Some("2")
    });
    assert_eq!(
        limit("demo-pro-key").as_deref(),
        Some("100"),
        "pro keeps 100"
    );
    assert_eq!(limit("demo-enterprise-key").as_deref(), Some("1000"));
    controller.admin(
        "PUT",
        "/v1/admin/state",
        Some(&serde_json::json!({ "automatic": true, "state": "NORMAL" })),
    );
    sluice_e2e::wait_until(
        "free bursts again",
        std::time::Duration::from_secs(2),
        || limit("demo-free-key").as_deref() == Some("20"),
    );
}

/// Envoy's own rate-limit filter as shipped (`envoy/native-ratelimit.yaml` with
/// `controller/native-ratelimit-rules.toml`) on free ports: anonymous clients get 5
/// requests, a known key its tier's burst, an unknown key is refused, and Envoy adds the
/// controller's headers.
#[test]
fn the_native_ratelimit_configuration_limits_as_its_comments_say() {
    let rules = std::fs::read_to_string(repo_root().join("controller/native-ratelimit-rules.toml"))
        .unwrap();
    // The check token the shipped file's initial_metadata carries.
    let controller = Controller::start_with(&sluice_e2e::controller::ControllerOptions {
        grpc: true,
        check_tokens: Some("sluice-demo-check-token-change-me".to_owned()),
        ..sluice_e2e::controller::ControllerOptions::new(&rules, None)
    });
    let upstream = Upstream::start();
    let envoy = start_shipped(
        "envoy/native-ratelimit.yaml",
        &[
            (8080, upstream.port()),
            (8083, controller.grpc()),
            (8081, controller.port),
        ],
    );

    let responses = in_one_window(10_000, || send(&envoy, "/anything", &[], 6));
    assert_five_then_limited(&responses, "per-address");

    let with_key = |key: &str| {
        http::get_with(&envoy.url("/hello"), &[("x-api-key", key)]).expect("through envoy")
    };
    let keyed = with_key("demo-pro-key");
    assert_eq!(
        keyed.status, 200,
        "a key escapes the address limit: {keyed:?}"
    );
    assert_eq!(keyed.header("x-ratelimit-limit"), Some("150"));
    let passed = (0..21)
        .filter(|_| with_key("demo-free-key").status == 200)
        .count();
    assert_eq!(passed, 20, "free bursts to 20");
    let unknown = with_key("not-a-demo-key");
    assert_eq!(unknown.status, 429, "{unknown:?}");
    assert_eq!(unknown.json()["error"], "invalid_api_key");

    // 2 a second for everyone, in windows aligned to the second.
    let expensive: Vec<u16> = in_one_window(1_000, || {
        send(&envoy, "/expensive", &[("x-api-key", "demo-pro-key")], 3)
            .iter()
            .map(|response| response.status)
            .collect::<Vec<u16>>()
    });
    assert_eq!(
        expensive,
        [200, 200, 429],
        "2 a second for everyone on /expensive"
    );
}
