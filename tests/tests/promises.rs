//! Promises of the README that no other test held (issue #23), against the real binaries: the
//! `allow` and `deny` store fallbacks while the counters' Redis is away, the configuration's
//! version check when the configuration lives in Redis, a rule's penalty as the client sees
//! it through Envoy, admin tokens kept by their SHA-256 in `--admin-tokens-file`, the CLI's
//! exit codes, the start-up warning about a Redis that does not fsync, and the filter's
//! bounds from "Hostile input" (a controller reply over 4 MiB, an `x-request-id` over 128
//! bytes, `X-Forwarded-For` past 32 hops) through a real Envoy with the real `.wasm`.

use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use sluice_e2e::controller::{
    controller_binary, ControllerOptions, ADMIN_TOKEN, CHECK_TOKEN, READ_TOKEN,
};
use sluice_e2e::envoy::{config_yaml, sluice_plugin_config, with_fields, EnvoyOptions, Filter};
use sluice_e2e::http::{self, Response};
use sluice_e2e::{cli, free_port, wait_until, Controller, Envoy, Process, RedisServer, Upstream};

// ----- helpers -----------------------------------------------------------------------------

/// One check of `client` (by address) on the check API; the call must succeed.
fn decide(controller: &Controller, client: &str) -> Value {
    let body = json!({ "checks": [{ "client": { "kind": "ip", "value": client }, "path": "/" }] });
    let reply = http::post_check(&controller.url("/v1/check"), &body).expect("an answer");
    assert_eq!(reply.status, 200, "{reply:?}");
    reply.json()["decisions"][0].clone()
}

/// The value of one series (`name{labels}`, as the scrape writes it) in the controller's
/// `/metrics`; absent counts as 0.
fn metric(controller: &Controller, series: &str) -> u64 {
    let scrape = controller.admin("GET", "/metrics", None).body;
    scrape
        .lines()
        .find_map(|line| {
            let value = line.strip_prefix(series)?.strip_prefix(' ')?;
            value.trim().parse::<f64>().ok()
        })
        .map_or(0, |value| value as u64)
}

fn ready(controller: &Controller) -> u16 {
    http::get(&controller.url("/readyz")).map_or(0, |r| r.status)
}

/// The `ETag`'s version.
fn etag_version(reply: &Response) -> u64 {
    reply
        .header("etag")
        .and_then(|tag| tag.trim_matches('"').parse().ok())
        .unwrap_or_else(|| panic!("no version in the ETag: {reply:?}"))
}

fn sha256_hex(text: &str) -> String {
    Sha256::digest(text.as_bytes())
        .iter()
        .map(|byte| format!("{byte:02x}"))
        .collect()
}

/// Envoy with one worker and the Sluice filter `plugin`, asking the controllers on
/// `controller_ports`; `config_edit` changes its bootstrap configuration first.
fn envoy_with(
    plugin: &Value,
    upstream: &Upstream,
    controller_ports: Vec<u16>,
    config_edit: impl Fn(String) -> String,
) -> Envoy {
    let options = EnvoyOptions {
        filter: Filter::sluice_with(plugin),
        upstream_port: upstream.port(),
        controller_ports,
        concurrency: 1,
        controller_http2: false,
    };
    let (port, admin_port) = (free_port(), free_port());
    let config = config_edit(config_yaml(&options, port, admin_port));
    Envoy::start_with_config(&config, port, admin_port, 1)
}

// ----- 1. the allow and deny store fallbacks -----------------------------------------------

/// Two requests per client an hour.
const TWO_AN_HOUR: &str = "[[rules]]\nname = \"per-client\"\nlimit = 2\nwindow = \"1h\"\n";
const BREAKER_FAILURES: u64 = 3;
const BREAKER_OPEN_MS: u64 = 1_500;

/// README, "Through faults": while the counters' Redis cannot answer, `--store-fallback
/// allow` / `deny` admits / refuses every check itself (a refusal's `Retry-After` is the
/// breaker's open time), the circuit opens after `--store-breaker-failures` consecutive
/// failures, every such check counts in `sluice_store_fallback_checks_total{fallback}`, and
/// once Redis is back checks are counted in Redis again. The configuration lives in a Redis
/// of its own (`--config-redis-url`), which stays up.
fn the_fallback_answers_while_redis_is_away(fallback: &str) {
    let counters = RedisServer::start();
    let config = RedisServer::start_durable();
    let (counters_url, config_url) = (counters.url(), config.url());
    let controller = Controller::start_with(&ControllerOptions {
        redis_timeout_ms: None,
        log_filter: "info",
        extra_args: [
            "--config-redis-url",
            &config_url,
            "--store-fallback",
            fallback,
            "--store-breaker-failures",
            &BREAKER_FAILURES.to_string(),
            "--store-breaker-open-ms",
            &BREAKER_OPEN_MS.to_string(),
        ]
        .map(str::to_owned)
        .to_vec(),
        ..ControllerOptions::new(TWO_AN_HOUR, Some(&counters_url))
    });
    let fallback_checks = format!("sluice_store_fallback_checks_total{{fallback=\"{fallback}\"}}");
    let circuit = |position: &str| {
        metric(
            &controller,
            &format!("sluice_store_circuit{{position=\"{position}\"}}"),
        )
    };

    // Redis counts: the client's third request is over its limit.
    let spent = "192.0.2.10";
    for n in 1..=2 {
        assert_eq!(decide(&controller, spent)["allowed"], true, "request {n}");
    }
    assert_eq!(decide(&controller, spent)["allowed"], false);
    assert_eq!(metric(&controller, &fallback_checks), 0);

    let stopped = counters.kill();
    // Every check from now on is answered by the fallback; the circuit opens at the
    // configured count of consecutive failures, not before.
    let mut answered = Vec::new();
    for n in 1..=BREAKER_FAILURES {
        assert_eq!(circuit("closed"), 1, "closed before failure {n}");
        answered.push(decide(&controller, &format!("192.0.2.{}", 100 + n)));
    }
    assert_eq!(circuit("open"), 1, "open after {BREAKER_FAILURES} failures");
    assert_eq!(
        metric(
            &controller,
            "sluice_store_circuit_transitions_total{position=\"open\"}"
        ),
        1
    );
    let ready_while_away = http::get(&controller.url("/readyz")).expect("an answer");
    assert_eq!(ready_while_away.status, 503, "{ready_while_away:?}");
    // A client Redis refused, and clients Redis would admit, alike.
    answered.push(decide(&controller, spent));
    for n in 0..4 {
        answered.push(decide(&controller, &format!("192.0.2.{}", 200 + n)));
    }
    for decision in &answered {
        let policy = &decision["policy"];
        assert_eq!(policy["rule"], "per-client", "{decision}");
        match fallback {
            "allow" => {
                assert_eq!(decision["allowed"], true, "{decision}");
                assert_eq!(policy["retry_after_ms"], 0, "{decision}");
            }
            _ => {
                assert_eq!(decision["allowed"], false, "{decision}");
                assert_eq!(policy["retry_after_ms"], BREAKER_OPEN_MS, "{decision}");
                assert_eq!(policy["remaining"], 0, "{decision}");
            }
        }
    }
    assert_eq!(
        metric(&controller, &fallback_checks),
        answered.len() as u64,
        "every check while Redis was away"
    );

    let counters = stopped.restart();
    wait_until("the circuit closed", Duration::from_secs(10), || {
        ready(&controller) == 200
    });
    assert_eq!(circuit("closed"), 1);
    // Counted in Redis again: a fresh client gets exactly its limit, whatever the fallback.
    let fresh = "192.0.2.50";
    for n in 1..=2 {
        let decision = decide(&controller, fresh);
        assert_eq!(decision["allowed"], true, "request {n}: {decision}");
        assert_eq!(decision["policy"]["remaining"], 2 - n, "{decision}");
    }
    let third = decide(&controller, fresh);
    assert_eq!(third["allowed"], false, "{third}");
    assert!(
        third["policy"]["retry_after_ms"].as_u64().unwrap_or(0) > BREAKER_OPEN_MS,
        "the window's wait, not the breaker's: {third}"
    );
    assert_eq!(
        metric(&controller, &fallback_checks),
        answered.len() as u64,
        "no check since is the fallback's"
    );
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("sluice:*")
        .query(&mut counters.connection())
        .expect("KEYS");
    assert!(!keys.is_empty(), "the counters are in Redis again");
}

#[test]
fn store_fallback_allow_admits_every_check_while_redis_is_away_and_counts_them() {
    the_fallback_answers_while_redis_is_away("allow");
}

#[test]
fn store_fallback_deny_refuses_every_check_while_redis_is_away_and_counts_them() {
    the_fallback_answers_while_redis_is_away("deny");
}

// ----- 2. the configuration's version check on Redis ---------------------------------------

/// A controller started by this file itself, for flags the harness sets its own way (the
/// harness polls the configuration every 100 ms, and a flag may not be given twice).
struct OwnController {
    port: u16,
    admin_port: u16,
    _process: Process,
    _dir: tempfile::TempDir,
}

impl OwnController {
    fn start(args: &[&str]) -> OwnController {
        let dir = tempfile::tempdir().expect("temp dir");
        let (port, admin_port) = (free_port(), free_port());
        let mut command = Command::new(controller_binary());
        command
            .args(["--mode", "development"])
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .args(["--admin-listen", &format!("127.0.0.1:{admin_port}")])
            .args(args)
            .env("SLUICE_ADMIN_TOKENS", format!("test:admin:{ADMIN_TOKEN}"))
            .env("SLUICE_CHECK_TOKENS", CHECK_TOKEN)
            .env("RUST_LOG", "info");
        let mut process = Process::spawn("controller", command, &dir.path().join("controller.log"));
        process.wait_until_ready(
            &format!("http://127.0.0.1:{port}/readyz"),
            Duration::from_secs(20),
        );
        OwnController {
            port,
            admin_port,
            _process: process,
            _dir: dir,
        }
    }

    fn config_version(&self) -> u64 {
        http::get(&format!("http://127.0.0.1:{}/readyz", self.port))
            .ok()
            .and_then(|r| r.json()["config_version"].as_u64())
            .unwrap_or(0)
    }

    fn admin(&self, method: &str, path: &str, if_match: u64, body: &Value) -> Response {
        let token = format!("Bearer {ADMIN_TOKEN}");
        let tag = format!("\"{if_match}\"");
        http::request(
            method,
            &format!("http://127.0.0.1:{}{path}", self.admin_port),
            &[("authorization", &token), ("if-match", &tag)],
            Some(body.to_string()),
        )
        .expect("an answer")
    }
}

fn admin_if_match(
    controller: &Controller,
    method: &str,
    path: &str,
    if_match: u64,
    body: &Value,
) -> Response {
    let token = format!("Bearer {ADMIN_TOKEN}");
    let tag = format!("\"{if_match}\"");
    http::request(
        method,
        &controller.admin_url(path),
        &[("authorization", &token), ("if-match", &tag)],
        Some(body.to_string()),
    )
    .expect("an answer")
}

/// README, "Routes" and "What reaches what": a change is committed only if the
/// configuration is still at the version it was made from; a stale `If-Match` gets `409
/// {"error":"version_mismatch"}` whose `ETag` names the current version. Here the
/// configuration lives in Redis and the stale change goes through a second controller whose
/// own view is behind (it reads the version once a minute): only the store can tell.
#[test]
fn a_stale_if_match_through_another_controller_on_the_same_redis_gets_409_with_the_current_etag() {
    let redis = RedisServer::start_durable();
    let url = redis.url();
    let first = Controller::start(TWO_AN_HOUR, Some(&url));
    assert_eq!(first.config_version(), 1);
    let second = OwnController::start(&["--redis-url", &url, "--config-poll-ms", "60000"]);
    assert_eq!(second.config_version(), 1);

    let made = admin_if_match(
        &first,
        "POST",
        "/v1/admin/tiers",
        1,
        &json!({ "name": "gold", "limit": 50 }),
    );
    assert!(made.status == 200 || made.status == 201, "{made:?}");
    assert_eq!(etag_version(&made), 2);
    assert_eq!(
        second.config_version(),
        1,
        "the second controller has not read it"
    );

    let stale = second.admin(
        "POST",
        "/v1/admin/tiers",
        1,
        &json!({ "name": "silver", "limit": 5 }),
    );
    assert_eq!(stale.status, 409, "{stale:?}");
    assert_eq!(stale.json()["error"], "version_mismatch", "{stale:?}");
    assert_eq!(stale.json()["field"], "If-Match", "{stale:?}");
    assert_eq!(
        etag_version(&stale),
        2,
        "the current version, to retry from: {stale:?}"
    );
    let silver = first.admin("GET", "/v1/admin/tiers/silver", None);
    assert_eq!(
        silver.status, 404,
        "the refused change changed nothing: {silver:?}"
    );

    // Retried from the version the 409 named, it applies.
    let retried = second.admin(
        "POST",
        "/v1/admin/tiers",
        2,
        &json!({ "name": "silver", "limit": 5 }),
    );
    assert!(
        retried.status == 200 || retried.status == 201,
        "{retried:?}"
    );
    assert_eq!(etag_version(&retried), 3);
    wait_until(
        "the first controller reads it",
        Duration::from_secs(5),
        || first.config_version() == 3,
    );
    assert_eq!(
        first.admin("GET", "/v1/admin/tiers/silver", None).status,
        200
    );
}

// ----- 3. a rule's penalty, as the client sees it ------------------------------------------

/// README, "Progressive penalties" and "What the client sees": a client that keeps hitting
/// a rule with a `penalty` gets the 429 with `Retry-After` the cool-down and the message
/// ``Rate limit `login` was exceeded again and again: this client is cooling down; retry in
/// N s.``, through Envoy and the real `.wasm`, counted in Redis.
#[test]
fn a_client_that_keeps_hitting_a_penalised_rule_is_told_to_cool_down() {
    const PENALISED: &str = r#"
[[rules]]
name = "login"
limit = 2
window = "1s"
match = { path_prefix = "/login" }
penalty = { base = "30s", max = "5m", decay = "10m" }
"#;
    let redis = RedisServer::start();
    let url = redis.url();
    let controller = Controller::start(PENALISED, Some(&url));
    let upstream = Upstream::start();
    let envoy = envoy_with(
        &sluice_plugin_config("deny", 2_000),
        &upstream,
        vec![controller.port],
        |config| config,
    );
    // Two a second pass; the first refusal (at the latest the third request of a second)
    // is a strike.
    let refused = (0..20)
        .map(|_| http::get(&envoy.url("/login")).expect("an answer"))
        .find(|reply| reply.status != 200)
        .expect("a refusal within 20 requests");
    assert_eq!(refused.status, 429, "{refused:?}");
    assert_eq!(refused.header("retry-after"), Some("30"), "{refused:?}");
    let body = refused.json();
    assert_eq!(body["error"], "rate_limited", "{body}");
    assert_eq!(body["policy"], "login", "{body}");
    assert_eq!(body["retry_after"], 30, "{body}");
    assert_eq!(
        body["message"],
        "Rate limit `login` was exceeded again and again: this client is cooling down; retry in 30 s.",
        "{body}"
    );
    // A second later the window has turned, and the client still cools down.
    std::thread::sleep(Duration::from_millis(1_100));
    let cooling = http::get(&envoy.url("/login")).expect("an answer");
    assert_eq!(cooling.status, 429, "{cooling:?}");
    let wait = cooling.number("retry-after");
    assert!((28..=30).contains(&wait), "{cooling:?}");
    assert_eq!(
        cooling.json()["message"],
        format!(
            "Rate limit `login` was exceeded again and again: this client is cooling down; retry in {wait} s."
        ),
        "{cooling:?}"
    );
}

// ----- 5. admin tokens by their SHA-256 ----------------------------------------------------

/// README, `--admin-tokens-file`: `[[tokens]]` with `name`, `role` and `sha256` (of the
/// token, so the file need not hold it): the controller accepts the token itself.
#[test]
fn admin_tokens_held_only_by_their_sha256_in_the_tokens_file_are_accepted() {
    let reader = "hashed-read-token-0123456789";
    let operator = "hashed-admin-token-0123456789";
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("admin-tokens.toml");
    let text = format!(
        "[[tokens]]\nname = \"auditor\"\nrole = \"read\"\nsha256 = \"{}\"\n\n\
         [[tokens]]\nname = \"ops-hashed\"\nrole = \"admin\"\nsha256 = \"{}\"\n",
        sha256_hex(reader),
        sha256_hex(operator)
    );
    assert!(!text.contains(reader) && !text.contains(operator));
    std::fs::write(&file, text).expect("write the tokens file");
    let controller = Controller::start_with(&ControllerOptions {
        extra_args: vec!["--admin-tokens-file".to_owned(), file.display().to_string()],
        ..ControllerOptions::new(TWO_AN_HOUR, None)
    });
    let call = |method: &str, path: &str, token: &str, body: Option<Value>| {
        let credential = format!("Bearer {token}");
        http::request(
            method,
            &controller.admin_url(path),
            &[("authorization", &credential)],
            body.map(|b| b.to_string()),
        )
        .expect("an answer")
    };

    let whoami = call("GET", "/v1/admin/whoami", reader, None);
    assert_eq!(whoami.status, 200, "{whoami:?}");
    assert_eq!(whoami.json()["name"], "auditor");
    assert_eq!(whoami.json()["role"], "read");
    let tier = json!({ "name": "gold", "limit": 50 });
    let refused = call("POST", "/v1/admin/tiers", reader, Some(tier.clone()));
    assert_eq!(
        refused.status, 403,
        "a read token changes nothing: {refused:?}"
    );

    let whoami = call("GET", "/v1/admin/whoami", operator, None);
    assert_eq!(whoami.status, 200, "{whoami:?}");
    assert_eq!(whoami.json()["name"], "ops-hashed");
    assert_eq!(whoami.json()["role"], "admin");
    let made = call("POST", "/v1/admin/tiers", operator, Some(tier));
    assert!(made.status == 200 || made.status == 201, "{made:?}");

    // The digest is not a token, nor is anything else.
    for wrong in [
        sha256_hex(reader),
        "hashed-read-token-0123456780".to_owned(),
    ] {
        let refused = call("GET", "/v1/admin/whoami", &wrong, None);
        assert_eq!(refused.status, 401, "{wrong}: {refused:?}");
    }
}

// ----- 7. the CLI's exit codes -------------------------------------------------------------

fn sluice(controller: &Controller, token: &str, args: &[&str]) -> std::process::Output {
    Command::new(cli::binary())
        .args(["--url", &controller.admin_url("")])
        .args(args)
        .env("SLUICE_ADMIN_TOKEN", token)
        .output()
        .expect("run sluice")
}

/// README, "The CLI": it exits 0 on success, 1 when the controller refused (its error
/// printed as `status: field: message`), 2 on a usage error.
#[test]
fn the_cli_exits_0_on_success_1_when_refused_with_the_error_and_2_on_a_usage_error() {
    let controller = Controller::start(TWO_AN_HOUR, None);

    let status = sluice(&controller, ADMIN_TOKEN, &["status"]);
    assert_eq!(status.status.code(), Some(0), "{status:?}");
    let made = sluice(
        &controller,
        ADMIN_TOKEN,
        &["tiers", "set", "gold", "--limit", "50"],
    );
    assert_eq!(made.status.code(), Some(0), "{made:?}");

    // Refused: the API's own answer to the same body, as `status: field: message`.
    let bad = json!({ "name": "silver", "limit": 10, "window": "1parsec" });
    let api = controller.admin("POST", "/v1/admin/tiers", Some(&bad));
    assert_eq!(api.status, 400, "{api:?}");
    let (field, message) = (api.json()["field"].clone(), api.json()["message"].clone());
    assert_eq!(field, "window", "{api:?}");
    let refused = sluice(
        &controller,
        ADMIN_TOKEN,
        &[
            "tiers", "set", "silver", "--limit", "10", "--window", "1parsec",
        ],
    );
    assert_eq!(refused.status.code(), Some(1), "{refused:?}");
    let stderr = String::from_utf8_lossy(&refused.stderr);
    let expected = format!("400: window: {}", message.as_str().expect("a message"));
    assert!(
        stderr.lines().any(|line| line.ends_with(&expected)),
        "{expected:?} in {stderr:?}"
    );
    // Refused for want of a valid token (no field): `status: message`.
    let unauthorized = sluice(&controller, "not-a-token-of-this-controller", &["status"]);
    assert_eq!(unauthorized.status.code(), Some(1), "{unauthorized:?}");
    assert!(
        String::from_utf8_lossy(&unauthorized.stderr).contains("401: "),
        "{unauthorized:?}"
    );
    // A read token asking for a change: 403.
    let forbidden = sluice(
        &controller,
        READ_TOKEN,
        &["tiers", "set", "gold", "--limit", "5"],
    );
    assert_eq!(forbidden.status.code(), Some(1), "{forbidden:?}");
    assert!(
        String::from_utf8_lossy(&forbidden.stderr).contains("403: "),
        "{forbidden:?}"
    );

    let version = controller.config_version();
    for usage in [
        &["--no-such-flag", "status"][..],
        &["tiers", "set", "gold"],
        &["state", "set", "SIDEWAYS"],
        &["no-such-command"],
        &["tiers", "set", "gold", "--limit", "many"],
    ] {
        let output = sluice(&controller, ADMIN_TOKEN, usage);
        assert_eq!(output.status.code(), Some(2), "{usage:?}: {output:?}");
    }
    assert_eq!(
        controller.config_version(),
        version,
        "usage errors change nothing"
    );
}

// ----- 8. the warning about a Redis that does not fsync ------------------------------------

/// README, "Persistence": the controller warns at start when it can read that the
/// configuration's Redis does not run with `appendonly yes` and `appendfsync always`.
#[test]
fn a_controller_warns_at_start_when_the_configurations_redis_does_not_fsync() {
    let volatile = RedisServer::start();
    let durable = RedisServer::start_durable();
    let (volatile_url, durable_url) = (volatile.url(), durable.url());
    let warning = |controller: &Controller| -> Vec<String> {
        controller
            .log()
            .lines()
            .filter(|line| line.contains("appendfsync"))
            .map(str::to_owned)
            .collect()
    };
    let start = |counters: &str, config: Option<&str>| {
        Controller::start_with(&ControllerOptions {
            log_filter: "info",
            extra_args: config
                .map(|url| vec!["--config-redis-url".to_owned(), url.to_owned()])
                .unwrap_or_default(),
            ..ControllerOptions::new(TWO_AN_HOUR, Some(counters))
        })
    };

    let on_volatile = start(&volatile_url, None);
    let lines = warning(&on_volatile);
    assert_eq!(lines.len(), 1, "{}", on_volatile.log());
    assert!(lines[0].contains("WARN"), "{lines:?}");
    assert!(
        lines[0].contains("Redis runs with appendonly no and appendfsync everysec")
            && lines[0].contains("can be lost"),
        "{lines:?}"
    );

    let on_durable = start(&durable_url, None);
    assert!(warning(&on_durable).is_empty(), "{}", on_durable.log());
    // Counters on a Redis that keeps nothing, the configuration on one that does: no warning.
    let split = start(&volatile_url, Some(&durable_url));
    assert!(warning(&split).is_empty(), "{}", split.log());
}

// ----- 9. the filter's bounds on hostile input ---------------------------------------------

/// `MAX_REPLY_BYTES` of the filter: "replies over 4 MiB are cut, hence malformed".
const FOUR_MIB: usize = 4 << 20;

/// A controller that denies every check, with its reply padded (whitespace in front of the
/// JSON) to exactly 4 MiB, or one byte more for paths under `/over`. It answers `/readyz`
/// (Envoy's health checks) and the configuration read too.
struct FakeController {
    port: u16,
    checks: Arc<AtomicU64>,
}

impl FakeController {
    fn start() -> FakeController {
        use axum::http::header::CONTENT_TYPE;
        use axum::routing::{get, post};

        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.set_nonblocking(true).expect("nonblocking");
        let port = listener.local_addr().expect("address").port();
        let checks = Arc::new(AtomicU64::new(0));
        let counted = Arc::clone(&checks);
        let app = axum::Router::new()
            .route("/readyz", get(|| async { "ready" }))
            .route(
                "/v1/config",
                get(|| async { ([(CONTENT_TYPE, "application/json")], r#"{"version":1}"#) }),
            )
            .route(
                "/v1/check",
                post(move |body: String| {
                    let counted = Arc::clone(&counted);
                    async move {
                        counted.fetch_add(1, Ordering::SeqCst);
                        ([(CONTENT_TYPE, "application/json")], padded_denials(&body))
                    }
                }),
            );
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            runtime.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
                axum::serve(listener, app).await.expect("serve");
            });
        });
        FakeController { port, checks }
    }

    fn checks(&self) -> u64 {
        self.checks.load(Ordering::SeqCst)
    }
}

fn padded_denials(request: &str) -> String {
    let request: Value = serde_json::from_str(request).unwrap_or(Value::Null);
    let checks = request["checks"].as_array().cloned().unwrap_or_default();
    let over = checks.iter().any(|check| {
        check["path"]
            .as_str()
            .is_some_and(|p| p.starts_with("/over"))
    });
    let decisions: Vec<Value> = checks
        .iter()
        .map(|_| {
            json!({ "allowed": false, "policy": {
                "rule": "fake", "strategy": "fixed_window", "limit": 5, "remaining": 0,
                "reset_ms": 7_000, "retry_after_ms": 7_000, "window_ms": 60_000 } })
        })
        .collect();
    let reply = json!({ "decisions": decisions }).to_string();
    let size = if over { FOUR_MIB + 1 } else { FOUR_MIB };
    format!("{}{reply}", " ".repeat(size - reply.len()))
}

/// README, "Hostile input": the controller's replies over 4 MiB are cut, hence malformed,
/// and get the failure mode; a reply of 4 MiB is read whole.
#[test]
fn a_controller_reply_over_4_mib_is_malformed_and_gets_the_failure_mode() {
    let fake = FakeController::start();
    let upstream = Upstream::start();
    let envoy = envoy_with(
        &sluice_plugin_config("deny", 10_000),
        &upstream,
        vec![fake.port],
        |config| config,
    );

    let whole = http::get(&envoy.url("/exact")).expect("an answer");
    assert_eq!(whole.status, 429, "a reply of 4 MiB decides: {whole:?}");
    assert_eq!(whole.json()["policy"], "fake", "{whole:?}");
    assert_eq!(whole.header("retry-after"), Some("7"), "{whole:?}");

    let before = fake.checks();
    let cut = http::get(&envoy.url("/over")).expect("an answer");
    assert_eq!(fake.checks(), before + 1, "the controller was asked");
    assert_eq!(cut.status, 503, "failure mode deny: {cut:?}");
    assert_eq!(cut.json()["error"], "rate_limiter_unavailable", "{cut:?}");
    assert!(envoy.log().contains("no decision"), "{}", envoy.log());
}

const BLOCKED: &str = r#"
[[rules]]
name = "blocked"
limit = 0
match = { path_prefix = "/blocked" }
window = "1h"
"#;

/// README, "Hostile input": an `x-request-id` over 128 bytes is left out of the local
/// reply's body. Envoy keeps the client's id here (`preserve_external_request_id`), so the
/// filter sees what the client sent.
#[test]
fn an_x_request_id_over_128_bytes_is_left_out_of_the_429_body() {
    let controller = Controller::start(BLOCKED, None);
    let upstream = Upstream::start();
    let envoy = envoy_with(
        &sluice_plugin_config("deny", 2_000),
        &upstream,
        vec![controller.port],
        |config| {
            config.replace(
                "use_remote_address: true",
                "use_remote_address: true\n          preserve_external_request_id: true",
            )
        },
    );
    let refused = |path: &str, id: &str| -> Value {
        let reply = http::get_with(&envoy.url(path), &[("x-request-id", id)]).expect("an answer");
        assert_eq!(reply.status, 429, "{reply:?}");
        reply.json()
    };
    let short = "request-0123456789";
    assert_eq!(refused("/blocked/short", short)["request_id"], short);
    let at_the_bound = "r".repeat(128);
    assert_eq!(
        refused("/blocked/128", &at_the_bound)["request_id"],
        at_the_bound.as_str()
    );
    let over = "r".repeat(129);
    let body = refused("/blocked/129", &over);
    assert!(body.get("request_id").is_none(), "{body}");
    assert_eq!(body["error"], "rate_limited", "{body}");
}

/// README, "Hostile input": at most 32 hops of `X-Forwarded-For` are read from the right.
/// Behind trusted proxies (here every `10.x` and loopback address) the client is the
/// rightmost address outside them; a client written as the header's 32nd entry from the
/// right (the entry Envoy appends for the peer is the first) is found, one written as the
/// 33rd is not: the search ends at the last trusted hop read, which then counts.
#[test]
fn x_forwarded_for_is_read_for_32_hops_from_the_right_and_no_further() {
    const PER_ADDRESS: &str = r#"
[[rules]]
name = "per-address"
scope = "ip"
limit = 1
window = "1h"
"#;
    let controller = Controller::start(PER_ADDRESS, None);
    let upstream = Upstream::start();
    let plugin = with_fields(
        sluice_plugin_config("deny", 2_000),
        json!({ "identity": { "ip": { "trusted_proxies": ["127.0.0.0/8", "10.0.0.0/8"] } } }),
    );
    let envoy = envoy_with(&plugin, &upstream, vec![controller.port], |config| config);
    // `client`, then `proxies` trusted hops, as a client and its proxies would write it;
    // Envoy appends one more entry.
    let status = |client: &str, proxies: usize, network: u8| {
        let mut entries = vec![client.to_owned()];
        entries.extend((1..=proxies).map(|i| format!("10.{network}.0.{i}")));
        let header = entries.join(", ");
        http::get_with(&envoy.url("/"), &[("x-forwarded-for", &header)])
            .expect("an answer")
            .status
    };

    // 30 proxies: the client is the 32nd entry. Two clients behind the same chain count
    // apart, and each is limited as itself.
    assert_eq!(status("198.51.100.1", 30, 1), 200);
    assert_eq!(status("198.51.100.2", 30, 1), 200, "a client of its own");
    assert_eq!(status("198.51.100.1", 30, 1), 429, "counted as itself");
    // 31 proxies: the client is the 33rd entry, never read: both clients are the farthest
    // proxy read, one counter.
    assert_eq!(status("198.51.100.3", 31, 2), 200);
    assert_eq!(
        status("198.51.100.4", 31, 2),
        429,
        "one counter past the 32nd hop"
    );
}
