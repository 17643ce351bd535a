//! Promises of the README that no other test held (issue #23), in process on the embedded
//! stores with a manual clock: progressive penalties configured on a rule (the decision's
//! `reason`, the cool-down as `Retry-After`, the 429's message), token auth on the stats and
//! hints, and the dashboard's Content-Security-Policy.

mod support;

use axum::http::StatusCode;
use serde_json::{json, Value};
use sluice_protocol::headers::{denied_body, retry_after_seconds};
use sluice_protocol::{DenyReason, PolicyStatus};
use support::{call, post, send, world, World, ADMIN_TOKEN, READ_TOKEN};

// ----- progressive penalties ---------------------------------------------------------------

/// Two requests a second; cool-downs of 10 s doubling to 40 s; one strike forgiven per
/// minute. The clock starts on a whole second, so every window starts with the test.
const PENALISED: &str = r#"
[[rules]]
name = "login"
limit = 2
window = "1s"
penalty = { base = "10s", max = "40s", decay = "1m" }
"#;

async fn decide(world: &World, client: &str) -> Value {
    let body = json!({ "checks": [{ "client": { "kind": "ip", "value": client }, "path": "/" }] });
    let (status, reply) = post(&world.check, "/v1/check", body).await;
    assert_eq!(status, StatusCode::OK, "{reply}");
    reply["decisions"][0].clone()
}

/// The decision of a request that must be refused by a cool-down of `cool_down_ms`, and what
/// the filter tells the client from it (`Retry-After`, the 429's message).
fn assert_cooling(decision: &Value, cool_down_ms: u64, what: &str) {
    assert_eq!(decision["allowed"], false, "{what}: {decision}");
    let policy: PolicyStatus =
        serde_json::from_value(decision["policy"].clone()).expect("a policy");
    assert_eq!(policy.rule, "login", "{what}");
    assert_eq!(
        policy.reason,
        Some(DenyReason::CoolDown),
        "{what}: {decision}"
    );
    assert_eq!(decision["policy"]["reason"], "cool_down", "{what}");
    assert_eq!(policy.retry_after_ms, cool_down_ms, "{what}: {decision}");
    let seconds = cool_down_ms.div_ceil(1_000);
    assert_eq!(retry_after_seconds(&policy), seconds, "{what}");
    let body = denied_body(&policy, None);
    assert_eq!(body.error, "rate_limited");
    assert_eq!(
        body.message,
        format!(
            "Rate limit `login` was exceeded again and again: this client is cooling down; \
             retry in {seconds} s."
        ),
        "{what}"
    );
}

/// Spends the client's window (both requests admitted) and returns the decision of one
/// more, which the limit denies.
async fn hit_the_limit(world: &World, client: &str) -> Value {
    for n in 1..=2 {
        let decision = decide(world, client).await;
        assert_eq!(decision["allowed"], true, "request {n}: {decision}");
    }
    decide(world, client).await
}

#[tokio::test]
async fn a_client_that_keeps_hitting_a_penalised_rule_cools_down_longer_each_time() {
    let world = world(PENALISED).await;
    let client = "198.51.100.20";

    // The first denial is a strike: the base cool-down, which outlasts the window's second.
    assert_cooling(&hit_the_limit(&world, client).await, 10_000, "strike 1");
    // Within the cool-down the window turns, yet the client stays refused; no new strike.
    world.clock.advance(4_000);
    assert_cooling(&decide(&world, client).await, 6_000, "cooling, 4 s in");
    world.clock.advance(6_000);
    // Over: admitted again, and the next denial doubles the cool-down.
    assert_cooling(&hit_the_limit(&world, client).await, 20_000, "strike 2");
    world.clock.advance(20_000);
    assert_cooling(&hit_the_limit(&world, client).await, 40_000, "strike 3");
    world.clock.advance(40_000);
    assert_cooling(
        &hit_the_limit(&world, client).await,
        40_000,
        "strike 4: at the maximum",
    );

    // Another client is not punished for it.
    let other = decide(&world, "198.51.100.21").await;
    assert_eq!(other["allowed"], true, "{other}");

    // Three minutes without a denial forgive three of the four strikes: the next is strike 2.
    world.clock.advance(40_000 + 180_000);
    assert_cooling(&hit_the_limit(&world, client).await, 20_000, "decayed");
}

/// The README's own example penalty (`base = "10s", max = "10m", decay = "1m"`) on a client
/// that asks twice a second and never stops: by the README ("one strike is forgiven for
/// every `decay` without a denial") a client refused all along is never forgiven, so its
/// cool-downs double to the maximum. (Strikes used to decay from the last strike, through
/// the cool-down's own refusals, and the cool-downs stopped at 80 s.)
#[tokio::test]
async fn a_client_refused_all_along_is_never_forgiven_and_reaches_the_maximum() {
    let world = world(
        r#"
[[rules]]
name = "login"
limit = 1
window = "1s"
penalty = { base = "10s", max = "10m", decay = "1m" }
"#,
    )
    .await;
    // A strike is a denial outside a cool-down: the first denial after an admission.
    let mut cool_downs = Vec::new();
    let mut admitted_before = false;
    // Thirty minutes of two requests a second.
    for _ in 0..3_600 {
        let decision = decide(&world, "198.51.100.30").await;
        let admitted = decision["allowed"] == true;
        if !admitted && admitted_before {
            assert_eq!(decision["policy"]["reason"], "cool_down", "{decision}");
            cool_downs.push(decision["policy"]["retry_after_ms"].as_u64().unwrap_or(0) / 1_000);
        }
        admitted_before = admitted;
        world.clock.advance(500);
    }
    println!("cool-downs of the strikes, in seconds: {cool_downs:?}");
    assert!(
        cool_downs.contains(&600),
        "the cool-down never reached the maximum of 10 m: {cool_downs:?}"
    );
}

// ----- token auth on the stats and hints ---------------------------------------------------

#[tokio::test]
async fn stats_and_hints_need_a_token_and_a_read_token_is_enough() {
    let world = world(PENALISED).await;
    for path in [
        "/v1/admin/stats",
        "/v1/admin/hints",
        "/v1/admin/stats?window=1h&top=3",
    ] {
        for token in [None, Some("not-a-token-of-this-controller")] {
            let refused = call(&world.admin, "GET", path, token, &[], None).await;
            assert_eq!(
                refused.status,
                StatusCode::UNAUTHORIZED,
                "{path} with {token:?}: {}",
                refused.text
            );
            assert!(refused.json()["error"].is_string(), "{}", refused.text);
        }
        for token in [READ_TOKEN, ADMIN_TOKEN] {
            let reply = call(&world.admin, "GET", path, Some(token), &[], None).await;
            assert_eq!(reply.status, StatusCode::OK, "{path}: {}", reply.text);
            assert!(reply.json().is_object(), "{path}: {}", reply.text);
        }
    }
}

// ----- the dashboard's Content-Security-Policy ---------------------------------------------

/// The policy's directives: name → sources.
fn directives(policy: &str) -> Vec<(String, Vec<String>)> {
    policy
        .split(';')
        .map(str::trim)
        .filter(|d| !d.is_empty())
        .map(|directive| {
            let mut words = directive.split_whitespace();
            let name = words.next().unwrap_or_default().to_ascii_lowercase();
            (name, words.map(str::to_owned).collect())
        })
        .collect()
}

/// What the README says the policy does: "lets it load and call nothing but its own
/// address, so nothing is fetched from the internet, ever". Every fetch directive allows
/// `'self'` at most (no host, scheme, wildcard, inline or eval), anything unnamed falls to
/// `default-src 'none'`, the page may call its own address (`connect-src 'self'`), and
/// neither a `<base>` nor a form can send it elsewhere.
fn assert_loads_and_calls_only_its_own_address(policy: &str, what: &str) {
    let directives = directives(policy);
    let sources = |name: &str| {
        directives
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, s)| s.clone())
    };
    assert_eq!(
        sources("default-src"),
        Some(vec!["'none'".to_owned()]),
        "{what}: {policy}"
    );
    assert_eq!(
        sources("connect-src"),
        Some(vec!["'self'".to_owned()]),
        "{what}: {policy}"
    );
    for (name, allowed) in [("base-uri", "'none'"), ("form-action", "'none'")] {
        let given = sources(name).unwrap_or_else(|| panic!("{what}: no {name} in {policy}"));
        assert!(
            given.iter().all(|s| s == allowed || s == "'self'"),
            "{what}: {name} {given:?}"
        );
    }
    for (name, given) in &directives {
        if name.ends_with("-src") || name.ends_with("-src-elem") || name.ends_with("-src-attr") {
            assert!(
                given.iter().all(|s| s == "'self'" || s == "'none'"),
                "{what}: {name} allows more than this address: {given:?}"
            );
        }
    }
}

#[tokio::test]
async fn the_dashboard_is_served_without_a_token_under_a_policy_of_its_own_address_only() {
    let world = world("").await;
    let page = send(
        &world.admin,
        axum::http::Request::get("/dashboard")
            .body(axum::body::Body::empty())
            .expect("request"),
    )
    .await;
    assert_eq!(page.reply.status, StatusCode::OK, "{}", page.reply.text);
    assert!(
        page.reply
            .content_type
            .as_deref()
            .is_some_and(|t| t.starts_with("text/html")),
        "{:?}",
        page.reply.content_type
    );
    let policies: Vec<&str> = page
        .headers
        .get_all("content-security-policy")
        .iter()
        .map(|v| v.to_str().expect("a policy in ASCII"))
        .collect();
    assert_eq!(policies.len(), 1, "one policy: {policies:?}");
    let policy = policies[0];
    assert_eq!(
        policy,
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; \
         connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    );
    assert_loads_and_calls_only_its_own_address(policy, "/dashboard");

    // The files the page names are served under the same policy.
    for asset in ["dashboard.js", "dashboard.css"] {
        assert!(
            page.reply.text.contains(&format!("/dashboard/{asset}")),
            "{asset}"
        );
        let file = send(
            &world.admin,
            axum::http::Request::get(format!("/dashboard/{asset}"))
                .body(axum::body::Body::empty())
                .expect("request"),
        )
        .await;
        assert_eq!(file.reply.status, StatusCode::OK, "{asset}");
        assert_eq!(
            file.headers
                .get("content-security-policy")
                .and_then(|v| v.to_str().ok()),
            Some(policy),
            "{asset}"
        );
    }
}
