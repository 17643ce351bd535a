//! Seeing the limiter work, in process on the embedded stores: the Prometheus scrape read by
//! a real parser of the exposition format, the stats API's figures for known traffic, the
//! tuning hints, and alerts to a webhook (a test HTTP server), once per period, never for a
//! client under the threshold, and never in the way of checks when the webhook is dead.

mod support;

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::http::StatusCode;
use serde_json::{json, Value};
use support::{call, post, world, World, ADMIN_TOKEN};

const RULES: &str = r#"
[[rules]]
name = "per-client"
limit = 3
window = "1h"
match = { path_prefix = "/api/" }

[[rules]]
name = "roomy"
limit = 1000
window = "1h"
match = { path_prefix = "/roomy" }
"#;

fn by_ip(ip: &str, path: &str) -> Value {
    json!({ "client": { "kind": "ip", "value": ip }, "ip": ip, "path": path })
}

async fn check(world: &World, one: Value) -> Value {
    let (status, body) = post(
        &world.check,
        "/v1/check",
        json!({ "checks": [one], "hold_delays": false }),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    body["decisions"][0].clone()
}

async fn admin_get(world: &World, path: &str) -> (StatusCode, Value) {
    let reply = call(&world.admin, "GET", path, Some(ADMIN_TOKEN), &[], None).await;
    (reply.status, reply.json())
}

/// The stats task brings the metrics up to date once a second.
async fn a_tick() {
    tokio::time::sleep(Duration::from_millis(1_200)).await;
}

fn scrape_text(text: &str) -> prometheus_parse::Scrape {
    let lines = text.lines().map(|line| Ok(line.to_owned()));
    prometheus_parse::Scrape::parse(lines).expect("the exposition format parses")
}

async fn scrape(world: &World) -> (String, prometheus_parse::Scrape) {
    let reply = call(&world.admin, "GET", "/metrics", None, &[], None).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert!(
        reply
            .content_type
            .as_deref()
            .is_some_and(|t| t.starts_with("application/openmetrics-text")),
        "{:?}",
        reply.content_type
    );
    let parsed = scrape_text(&reply.text);
    (reply.text, parsed)
}

fn value_of(scrape: &prometheus_parse::Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
    scrape
        .samples
        .iter()
        .filter(|s| s.metric == name)
        .filter(|s| labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .map(|s| match s.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => v,
            _ => 0.0,
        })
        .sum()
}

#[tokio::test]
async fn the_scrape_parses_with_conventional_names_and_counters_only_grow() {
    let world = world(RULES).await;
    for _ in 0..5 {
        check(&world, by_ip("10.0.0.1", "/api/a")).await;
    }
    check(&world, by_ip("10.0.0.2", "/roomy/x")).await;
    a_tick().await;
    let (text, first) = scrape(&world).await;

    // No series twice; every name by the conventions.
    let mut seen = HashSet::new();
    for sample in &first.samples {
        let labels: BTreeMap<_, _> = sample.labels.iter().collect();
        assert!(
            seen.insert(format!("{}{labels:?}", sample.metric)),
            "{} twice",
            sample.metric
        );
        assert!(sample.metric.starts_with("sluice_"), "{}", sample.metric);
        assert!(
            sample
                .metric
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_'),
            "{}",
            sample.metric
        );
    }
    for line in text.lines().filter(|l| l.starts_with("# TYPE ")) {
        let mut parts = line.split_whitespace().skip(2);
        let (name, kind) = (parts.next().unwrap(), parts.next().unwrap());
        match kind {
            // OpenMetrics names the counter family without `_total`; its samples carry it.
            "counter" => assert!(
                first
                    .samples
                    .iter()
                    .any(|s| s.metric == format!("{name}_total"))
                    || !text.contains(&format!("\n{name}")),
                "{name}: counter samples end in _total"
            ),
            "histogram" => {
                for suffix in ["_bucket", "_sum", "_count"] {
                    assert!(
                        text.contains(&format!("\n{name}{suffix}")),
                        "{name}{suffix} missing"
                    );
                }
            }
            "gauge" => {}
            // OpenMetrics' info: one sample, `{name}_info{labels} 1` (sluice_build_info).
            "info" => assert!(
                first
                    .samples
                    .iter()
                    .any(|s| s.metric == format!("{name}_info")
                        && matches!(s.value, prometheus_parse::Value::Untyped(v)
                            | prometheus_parse::Value::Gauge(v) if v == 1.0)),
                "{name}: an info family has one `_info` sample of 1"
            ),
            other => panic!("{name}: unexpected type {other}"),
        }
        if name.contains("duration") {
            assert!(name.ends_with("_seconds"), "{name}: durations in seconds");
        }
    }
    let limited = [
        ("rule", "per-client"),
        ("tier", "default"),
        ("outcome", "limited"),
    ];
    let allowed = [
        ("rule", "per-client"),
        ("tier", "default"),
        ("outcome", "allowed"),
    ];
    assert_eq!(value_of(&first, "sluice_decisions_total", &limited), 2.0);
    assert_eq!(value_of(&first, "sluice_decisions_total", &allowed), 3.0);
    assert_eq!(
        value_of(&first, "sluice_decisions_total", &[("rule", "roomy")]),
        1.0
    );
    assert_eq!(
        value_of(&first, "sluice_check_call_checks_count", &[]),
        6.0,
        "one call per check here"
    );
    assert!(
        value_of(
            &first,
            "sluice_store_command_duration_seconds_count",
            &[("command", "check")]
        ) >= 6.0
    );
    assert_eq!(value_of(&first, "sluice_config_version", &[]), 1.0);
    assert_eq!(
        value_of(&first, "sluice_system_state", &[("state", "NORMAL")]),
        1.0
    );

    // Under more traffic, every counter stays or grows.
    for _ in 0..3 {
        check(&world, by_ip("10.0.0.3", "/api/a")).await;
    }
    a_tick().await;
    let (_, second) = scrape(&world).await;
    for sample in first.samples.iter().filter(|s| {
        s.metric.ends_with("_total") || s.metric.ends_with("_count") || s.metric.ends_with("_sum")
    }) {
        let labels: Vec<(&str, &str)> = sample
            .labels
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        let before = value_of(&first, &sample.metric, &labels);
        let after = value_of(&second, &sample.metric, &labels);
        assert!(
            after >= before,
            "{} {labels:?}: {before} → {after}",
            sample.metric
        );
    }
    assert_eq!(value_of(&second, "sluice_decisions_total", &allowed), 6.0);
}

#[tokio::test]
async fn the_stats_say_who_was_limited_by_what_and_how_often() {
    let world = world(RULES).await;
    for _ in 0..5 {
        check(&world, by_ip("10.0.0.1", "/api/a")).await;
    }
    for _ in 0..2 {
        check(&world, by_ip("10.0.0.2", "/api/a")).await;
    }
    for window in ["1m", "1h"] {
        let (status, stats) = admin_get(&world, &format!("/v1/admin/stats?window={window}")).await;
        assert_eq!(status, StatusCode::OK, "{stats}");
        assert_eq!(stats["window"], window);
        assert_eq!(stats["controllers"], 1);
        assert_eq!(stats["decisions"], 7);
        let rule = &stats["rules"][0];
        assert_eq!(rule["rule"], "per-client", "{stats}");
        assert_eq!(rule["allowed"], 5);
        assert_eq!(rule["limited"], 2);
        assert_eq!(rule["clients"], 2);
        assert_eq!(rule["limited_clients"], 1);
        // 10.0.0.1's third request left it nothing: near the limit, all of it used.
        assert_eq!(rule["near_limit"], 1);
        assert_eq!(rule["max_used_ratio"], 1.0);
        assert_eq!(
            stats["tiers"],
            json!([{ "tier": "default", "allowed": 5, "limited": 2, "shadow_limited": 0,
                     "refused": 0 }])
        );
        assert_eq!(
            stats["top_limited"],
            json!([{ "client": { "kind": "ip", "value": "10.0.0.1" }, "count": 2, "error": 0 }])
        );
        assert_eq!(stats["top_requesting"][0]["count"], 5);
        assert_eq!(stats["top_requesting"][1]["client"]["value"], "10.0.0.2");
        assert_eq!(
            stats["top_error_bound"], 0,
            "exact below the summary's capacity"
        );
    }
    let (status, body) = admin_get(&world, "/v1/admin/stats?window=2m").await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(body["field"], "window", "{body}");
    let (status, body) = admin_get(&world, "/v1/admin/stats?top=65").await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(body["field"], "top", "{body}");
}

#[tokio::test]
async fn hints_name_a_rule_too_strict_for_many_clients_and_one_nobody_comes_near() {
    let world = world(RULES).await;
    // Twelve clients, ten of them over per-client's 3.
    for client in 0..12 {
        let times = if client < 10 { 4 } else { 1 };
        for _ in 0..times {
            check(&world, by_ip(&format!("10.1.0.{client}"), "/api/a")).await;
        }
    }
    // A hundred decisions of `roomy` (1000 an hour), nobody near it.
    for client in 0..100 {
        check(&world, by_ip(&format!("10.2.0.{client}"), "/roomy/a")).await;
    }
    let (status, hints) = admin_get(&world, "/v1/admin/hints?window=1m").await;
    assert_eq!(status, StatusCode::OK, "{hints}");
    let kinds: Vec<(String, String)> = hints["hints"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| {
            (
                h["rule"].as_str().unwrap().to_owned(),
                h["kind"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert!(
        kinds.contains(&("per-client".into(), "too_strict".into())),
        "{hints}"
    );
    assert!(
        kinds.contains(&("roomy".into(), "too_generous".into())),
        "{hints}"
    );
    let strict = hints["hints"]
        .as_array()
        .unwrap()
        .iter()
        .find(|h| h["kind"] == "too_strict")
        .unwrap();
    assert_eq!(strict["figures"]["limited_clients"], 10, "{strict}");
    assert!(
        strict["message"]
            .as_str()
            .unwrap()
            .contains("10 distinct clients"),
        "{strict}"
    );
}

/// A webhook that keeps what it is sent.
async fn webhook() -> (String, Arc<Mutex<Vec<Value>>>) {
    let received = Arc::new(Mutex::new(Vec::new()));
    let kept = Arc::clone(&received);
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(move |body: axum::Json<Value>| {
            let kept = Arc::clone(&kept);
            async move {
                kept.lock().unwrap().push(body.0);
                StatusCode::NO_CONTENT
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (url, received)
}

fn alerting(url: &str) -> String {
    format!(
        r#"{RULES}
[observability.alerts]
limited = 5
period = "1h"
webhook = "{url}"
"#
    )
}

#[tokio::test]
async fn a_hammering_client_raises_one_alert_and_one_just_under_the_threshold_none() {
    let (url, received) = webhook().await;
    let world = world(&alerting(&url)).await;
    // 3 allowed, then 20 limited; the neighbour is limited 5 times: not more than 5.
    for _ in 0..23 {
        check(&world, by_ip("10.0.0.66", "/api/a")).await;
    }
    for _ in 0..8 {
        check(&world, by_ip("10.0.0.7", "/api/a")).await;
    }
    for _ in 0..30 {
        if !received.lock().unwrap().is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // More of it, over more seconds: still the one alert of this period.
    for _ in 0..10 {
        check(&world, by_ip("10.0.0.66", "/api/a")).await;
    }
    a_tick().await;
    a_tick().await;
    let alerts = received.lock().unwrap().clone();
    assert_eq!(alerts.len(), 1, "{alerts:?}");
    let alert = &alerts[0];
    assert_eq!(alert["alert"], "client_limited");
    assert_eq!(
        alert["client"],
        json!({ "kind": "ip", "value": "10.0.0.66" })
    );
    assert_eq!(alert["rule"], "per-client");
    assert_eq!(alert["threshold"], 5);
    assert_eq!(alert["period_ms"], 3_600_000);
    assert!(alert["limited"].as_u64().unwrap() > 5, "{alert}");
    let scraped = call(&world.admin, "GET", "/metrics", None, &[], None)
        .await
        .text;
    assert!(scraped.contains("sluice_alerts_total 1"), "{scraped}");
    assert!(
        scraped.contains(r#"sluice_alert_webhooks_total{result="delivered"} 1"#),
        "{scraped}"
    );
}

#[tokio::test]
async fn a_dead_webhook_never_holds_up_a_check() {
    // It takes connections and never answers.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    let accepted = Arc::new(Mutex::new(0usize));
    let counting = Arc::clone(&accepted);
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            *counting.lock().unwrap() += 1;
            held.push(socket);
        }
    });
    let world = world(&alerting(&url)).await;
    for _ in 0..10 {
        check(&world, by_ip("10.0.0.66", "/api/a")).await;
    }
    for _ in 0..30 {
        if *accepted.lock().unwrap() > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        *accepted.lock().unwrap(),
        1,
        "the alert went to the webhook"
    );
    // The webhook is still waiting on its answer (it never comes); checks go on meanwhile.
    for i in 0..200 {
        let decision = check(
            &world,
            by_ip(&format!("10.3.{}.{}", i / 200, i % 200), "/api/a"),
        )
        .await;
        assert_eq!(decision["allowed"], true);
    }
    let scraped = call(&world.admin, "GET", "/metrics", None, &[], None)
        .await
        .text;
    assert!(
        !scraped.contains(r#"sluice_alert_webhooks_total{result="delivered"}"#),
        "{scraped}"
    );
}
