//! The check API, in process, on the embedded store with a manual clock.

mod support;

use axum::http::StatusCode;
use serde_json::{json, Value};
use support::{call, post, world};

async fn router(
    rules: &str,
) -> (
    axum::Router,
    std::sync::Arc<sluice_controller::store::ManualClock>,
) {
    let world = world(rules).await;
    (world.check, world.clock)
}

const TWO_PER_SECOND: &str = r#"
[[rules]]
name = "two-per-second"
limit = 2
window = "1s"
"#;

fn one_check(client: &str) -> Value {
    json!({ "checks": [{ "client": { "kind": "ip", "value": client }, "path": "/" }] })
}

#[tokio::test]
async fn counts_down_then_denies_then_resets_with_the_window() {
    let (router, clock) = router(TWO_PER_SECOND).await;
    clock.advance(250);
    let (status, body) = post(&router, "/v1/check", one_check("10.0.0.1")).await;
    assert_eq!(status, StatusCode::OK);
    let decision = &body["decisions"][0];
    assert_eq!(decision["allowed"], true);
    assert_eq!(decision["policy"]["rule"], "two-per-second");
    assert_eq!(decision["policy"]["strategy"], "fixed_window");
    assert_eq!(decision["policy"]["remaining"], 1);
    assert_eq!(decision["policy"]["reset_ms"], 750);

    let (_, body) = post(&router, "/v1/check", one_check("10.0.0.1")).await;
    assert_eq!(body["decisions"][0]["policy"]["remaining"], 0);
    let (_, body) = post(&router, "/v1/check", one_check("10.0.0.1")).await;
    assert_eq!(body["decisions"][0]["allowed"], false);
    assert_eq!(body["decisions"][0]["policy"]["retry_after_ms"], 750);

    // Another client has its own counter.
    let (_, body) = post(&router, "/v1/check", one_check("10.0.0.2")).await;
    assert_eq!(body["decisions"][0]["allowed"], true);

    clock.advance(750);
    let (_, body) = post(&router, "/v1/check", one_check("10.0.0.1")).await;
    assert_eq!(body["decisions"][0]["allowed"], true);
    assert_eq!(body["decisions"][0]["policy"]["remaining"], 1);
}

#[tokio::test]
async fn a_batch_is_decided_in_order() {
    let (router, _clock) = router(TWO_PER_SECOND).await;
    let check = json!({ "client": { "kind": "ip", "value": "10.0.0.9" } });
    let (status, body) = post(
        &router,
        "/v1/check",
        json!({ "checks": [check, check, check] }),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let allowed: Vec<bool> = body["decisions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["allowed"].as_bool().unwrap())
        .collect();
    assert_eq!(allowed, [true, true, false]);
}

#[tokio::test]
async fn no_matching_rule_is_unlimited() {
    let (router, _clock) = router("").await;
    let (status, body) = post(&router, "/v1/check", one_check("10.0.0.1")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body, json!({ "decisions": [{ "allowed": true }] }));
}

#[tokio::test]
async fn invalid_checks_are_refused_naming_the_field() {
    let (router, _clock) = router(TWO_PER_SECOND).await;
    let cases = [
        (json!({}), "checks"),
        (
            json!({ "checks": [{ "client": { "kind": "ip" } }] }),
            "checks[0].client.value",
        ),
        (
            json!({ "checks": [{ "client": { "kind": "ip", "value": "x" }, "cost": -1 }] }),
            "checks[0].cost",
        ),
    ];
    for (body, field) in cases {
        let (status, error) = post(&router, "/v1/check", body.clone()).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
        assert_eq!(error["error"], "invalid_request");
        assert_eq!(error["field"], field, "{body}: {error}");
    }
    // A field this release does not know is a newer filter's, not an error (UPGRADING.md).
    let (status, body) = post(&router, "/v1/check", json!({ "checks": [], "batch": 1 })).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body, json!({ "decisions": [] }));
    let too_many: Vec<Value> = (0..1_025)
        .map(|_| one_check("x")["checks"][0].clone())
        .collect();
    let (status, error) = post(&router, "/v1/check", json!({ "checks": too_many })).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(error["field"], "checks");
}

#[tokio::test]
async fn health_and_readiness_answer() {
    let (router, _clock) = router("").await;
    for path in ["/healthz", "/readyz"] {
        let reply = call(&router, "GET", path, None, &[], None).await;
        assert_eq!(reply.status, StatusCode::OK, "{path}");
    }
}

/// A shadow rule never blocks and never stops the enforced rules from counting; the
/// decision says it would have denied, and every applied limit is reported.
#[tokio::test]
async fn shadow_rules_report_but_never_block() {
    let (router, _clock) = router(
        r#"
        [[rules]]
        name = "enforced"
        limit = 3
        window = "1s"

        [[rules]]
        name = "trial"
        limit = 1
        window = "1s"
        shadow = true
        "#,
    )
    .await;
    let mut seen = Vec::new();
    for _ in 0..4 {
        let (_, body) = post(&router, "/v1/check", one_check("10.0.0.1")).await;
        let decision = body["decisions"][0].clone();
        seen.push((
            decision["allowed"].as_bool().unwrap(),
            decision["shadow_denied"].as_bool().unwrap_or(false),
            decision["policy"]["rule"].as_str().unwrap().to_owned(),
        ));
        assert_eq!(
            decision["others"].as_array().unwrap().len(),
            1,
            "both limits are reported: {decision}"
        );
    }
    assert_eq!(
        seen,
        [
            (true, false, "trial".to_owned()),
            (true, true, "trial".to_owned()),
            (true, true, "trial".to_owned()),
            (false, false, "enforced".to_owned()),
        ]
    );
}

/// The controller knows API keys by digest: a known key counts as its user and carries
/// its tier into matching; an unknown key is no identity by default (it is counted by its
/// address), and counts as itself with `unknown_api_keys = "allow"`.
#[tokio::test]
async fn api_keys_map_to_user_and_tier() {
    let digest = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";
    let config = |extra: &str| {
        format!(
            r#"
        [[rules]]
        name = "gold"
        limit = 2
        window = "1m"
        match = {{ tiers = ["gold"] }}

        [[rules]]
        name = "per-key"
        scope = "api_key"
        limit = 5
        window = "1m"

        [[rules]]
        name = "per-address"
        scope = "ip"
        limit = 50
        window = "1m"

        [[api_keys]]
        sha256 = "{digest}"
        user = "acme"
        tier = "gold"
        {extra}
        "#
        )
    };
    let (router, _clock) = router(&config("")).await;
    let with_key = |key: &str| {
        json!({ "checks": [{ "client": { "kind": "api_key", "value": key },
                              "api_key": key, "ip": "10.0.0.1", "path": "/" }] })
    };
    let (_, body) = post(&router, "/v1/check", with_key(digest)).await;
    let decision = &body["decisions"][0];
    assert_eq!(decision["policy"]["rule"], "gold", "{decision}");
    assert_eq!(decision["policy"]["remaining"], 1);
    let (_, body) = post(&router, "/v1/check", with_key(digest)).await;
    assert_eq!(body["decisions"][0]["policy"]["remaining"], 0);
    let (_, body) = post(&router, "/v1/check", with_key(digest)).await;
    assert_eq!(body["decisions"][0]["allowed"], false);

    let unknown = "00".repeat(32);
    let (_, body) = post(&router, "/v1/check", with_key(&unknown)).await;
    let decision = &body["decisions"][0];
    assert_eq!(decision["allowed"], true);
    assert_eq!(
        decision["policy"]["rule"], "per-address",
        "counted by its address only: {decision}"
    );
    assert!(decision["others"].as_array().is_none(), "{decision}");
    // A fresh made-up key each time is the same client: the address's count goes on (two
    // admitted requests with the known key, the unknown one, and this one).
    let (_, body) = post(&router, "/v1/check", with_key(&"01".repeat(32))).await;
    assert_eq!(body["decisions"][0]["policy"]["remaining"], 46, "{body}");

    let allowing = config(
        r#"
        [protection]
        invalid_credentials = 10
        window = "1m"
        block = "1m"
        unknown_api_keys = "allow""#,
    );
    let (allowing, _clock) = self::router(&allowing).await;
    let (_, body) = post(&allowing, "/v1/check", with_key(&unknown)).await;
    let decision = &body["decisions"][0];
    let rules: Vec<&Value> = std::iter::once(&decision["policy"]["rule"])
        .chain(
            decision["others"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|o| &o["rule"]),
        )
        .collect();
    assert!(
        rules.contains(&&json!("per-key")),
        "with allow, the key is a client of its own: {decision}"
    );
}

/// The filter reads its view of the configuration (rules, lists) with the version it holds;
/// unchanged, it gets 304. What it reads parses back to the same rules.
#[tokio::test]
async fn the_filters_view_is_served_by_version() {
    let text = r#"
        [[rules]]
        name = "payments"
        strategy = "token_bucket"
        limit = 10
        window = "1m"
        burst = 20
        failure_mode = "deny"
        shadow = true
        match = { path_glob = "/pay/**", methods = ["POST"], tiers = ["gold"] }

        [[denylist]]
        kind = "ip"
        value = "10.1.2.3/8"
        expires_at = "2030-01-01T00:00:00Z"
    "#;
    let (router, _clock) = router(text).await;
    let reply = call(&router, "GET", "/v1/config", None, &[], None).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.etag.as_deref(), Some("\"1\""));
    let view: sluice_protocol::FilterView = serde_json::from_str(&reply.text).unwrap();
    assert_eq!(view.version, 1);
    let expected: sluice_protocol::ConfigDocument = toml::from_str(text).unwrap();
    assert_eq!(view.rules, expected.rules);
    assert_eq!(
        view.denylist[0].value, "10.0.0.0/8",
        "written the one way it is matched"
    );
    assert_eq!(view.denylist[0].expires_at_ms, Some(1_893_456_000_000));
    let unchanged = call(
        &router,
        "GET",
        "/v1/config",
        None,
        &[("if-none-match", "\"1\"")],
        None,
    )
    .await;
    assert_eq!(unchanged.status, StatusCode::NOT_MODIFIED);
    assert!(unchanged.text.is_empty());
    let other = call(
        &router,
        "GET",
        "/v1/config",
        None,
        &[("if-none-match", "\"0\"")],
        None,
    )
    .await;
    assert_eq!(other.status, StatusCode::OK);
}
