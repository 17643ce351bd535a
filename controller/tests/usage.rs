//! Usage rules in process, on the embedded store with a manual clock: a reservation is
//! taken at admission and only for an asker that settles; a settlement gives back what was
//! not used or charges what was used beyond it, once; a forged, replayed or late settlement
//! changes nothing; the release call bounds what it reads, naming the field.

mod support;

use axum::http::StatusCode;
use serde_json::{json, Value};
use support::{post, world};

const RULES: &str = r#"
[[rules]]
name = "tokens"
limit = 10000
window = "1h"
match = { path = "/v1/chat/completions" }
usage = { json_pointer = "/usage/total_tokens", reserve = 1000 }

[[rules]]
name = "requests"
limit = 100
window = "1h"
"#;

fn completion_checks(settles: bool, count: usize) -> Value {
    let check =
        json!({ "client": { "kind": "ip", "value": "10.0.0.1" }, "path": "/v1/chat/completions" });
    json!({ "checks": vec![check; count], "settles": settles })
}

async fn decide(router: &axum::Router, body: Value) -> Vec<Value> {
    let (status, reply) = post(router, "/v1/check", body).await;
    assert_eq!(status, StatusCode::OK, "{reply}");
    reply["decisions"].as_array().cloned().unwrap_or_default()
}

/// What is left of the client's token budget, as the next check would see it before its
/// own reservation.
async fn tokens_left(router: &axum::Router) -> u64 {
    let decision = &decide(router, completion_checks(true, 1)).await[0];
    let left = decision["others"]
        .as_array()
        .into_iter()
        .flatten()
        .chain(std::iter::once(&decision["policy"]))
        .find(|policy| policy["rule"] == "tokens")
        .and_then(|policy| policy["remaining"].as_u64())
        .expect("the token rule applied");
    // Give that reservation back whole, so the probe leaves no trace.
    let token = decision["usage"][0]["token"]
        .as_str()
        .expect("a reservation");
    settle(router, json!([{ "reservation": token, "used": 0 }])).await;
    left + 1_000
}

async fn settle(router: &axum::Router, settlements: Value) -> Value {
    let (status, reply) = post(router, "/v1/release", json!({ "settlements": settlements })).await;
    assert_eq!(status, StatusCode::OK, "{reply}");
    reply["settled"].clone()
}

#[tokio::test]
async fn a_reservation_is_settled_once_with_what_was_used() {
    let world = world(RULES).await;
    let decisions = decide(&world.check, completion_checks(true, 3)).await;
    let reservations: Vec<&Value> = decisions.iter().map(|d| &d["usage"][0]).collect();
    for reservation in &reservations {
        assert_eq!(reservation["rule"], "tokens");
        assert_eq!(reservation["reserved"], 1000);
        assert_eq!(
            reservation["from"],
            json!({ "json_pointer": "/usage/total_tokens" })
        );
        assert_eq!(reservation["unreported"], 1000);
    }
    assert_eq!(
        decisions[0]["usage"].as_array().map(Vec::len),
        Some(1),
        "only the usage rule reserves"
    );
    assert_eq!(tokens_left(&world.check).await, 10_000 - 3_000);

    let token = |i: usize| reservations[i]["token"].as_str().unwrap().to_owned();
    let settled = settle(
        &world.check,
        json!([
            { "reservation": token(0), "used": 400 },
            { "reservation": token(1), "used": 1000 },
            { "reservation": token(2), "used": 2500 },
        ]),
    )
    .await;
    assert_eq!(
        settled,
        json!({ "returned": [600, 0, 0], "charged": [0, 0, 1500] })
    );
    assert_eq!(tokens_left(&world.check).await, 10_000 - 400 - 1000 - 2500);

    let replayed = settle(
        &world.check,
        json!([
            { "reservation": token(0), "used": 0 },
            { "reservation": token(1), "used": 0 },
            { "reservation": token(2), "used": 9000 },
        ]),
    )
    .await;
    assert_eq!(
        replayed,
        json!({ "returned": [0, 0, 0], "charged": [0, 0, 0] }),
        "each reservation settles once"
    );
    assert_eq!(tokens_left(&world.check).await, 10_000 - 3_900);

    let metrics = world.metrics.render();
    for line in [
        r#"sluice_usage_units_total{rule="tokens",units="returned"}"#,
        r#"sluice_usage_units_total{rule="tokens",units="charged"} 1500"#,
    ] {
        assert!(metrics.contains(line), "{line} in\n{metrics}");
    }
}

#[tokio::test]
async fn an_asker_that_does_not_settle_gets_no_reservation_and_pays_the_estimate() {
    let world = world(RULES).await;
    let decisions = decide(&world.check, completion_checks(false, 2)).await;
    assert!(
        decisions.iter().all(|d| d.get("usage").is_none()),
        "{decisions:?}"
    );
    // Nor a policy marked as counting usage, which a 0.1.0 filter would refuse.
    let policies = |decision: &Value| {
        let mut all = vec![decision["policy"].clone()];
        all.extend(decision["others"].as_array().cloned().unwrap_or_default());
        all
    };
    assert!(
        decisions
            .iter()
            .flat_map(policies)
            .all(|policy| policy.get("usage").is_none()),
        "{decisions:?}"
    );
    let settling = decide(&world.check, completion_checks(true, 1)).await;
    assert!(
        policies(&settling[0])
            .iter()
            .any(|policy| policy["rule"] == "tokens" && policy["usage"] == true),
        "{settling:?}"
    );
    assert_eq!(tokens_left(&world.check).await, 10_000 - 3_000);
}

#[tokio::test]
async fn forged_and_late_settlements_change_nothing() {
    let world = world(RULES).await;
    let decision = &decide(&world.check, completion_checks(true, 1)).await[0];
    let token = decision["usage"][0]["token"].as_str().unwrap().to_owned();
    let forged = token.replacen("|1000|", "|9000|", 1);
    assert_ne!(forged, token);
    let lease_like = token.replacen("r|", "g|", 1);
    assert_eq!(
        settle(
            &world.check,
            json!([
                { "reservation": forged, "used": 0 },
                { "reservation": lease_like, "used": 0 },
                { "reservation": "r|nothing", "used": 0 },
            ])
        )
        .await,
        json!({ "returned": [0, 0, 0], "charged": [0, 0, 0] })
    );
    // A signed reservation is no lease: its token gives nothing back as one.
    let (status, reply) = post(
        &world.check,
        "/v1/release",
        json!({ "returns": [{ "grant": token, "unused": 1 }] }),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{reply}");
    assert_eq!(reply["returned"], json!([0]));
    assert_eq!(tokens_left(&world.check).await, 10_000 - 1_000);

    // An hour and more later the reservation stands.
    world.clock.advance(60 * 60 * 1_000);
    assert_eq!(
        settle(&world.check, json!([{ "reservation": token, "used": 0 }])).await,
        json!({ "returned": [0], "charged": [0] })
    );
}

#[tokio::test]
async fn the_release_call_bounds_its_settlements_naming_the_field() {
    let world = world(RULES).await;
    let one = json!({ "reservation": "r", "used": 1 });
    let cases = [
        (
            json!({ "settlements": vec![one.clone(); 1_025] }),
            "settlements",
        ),
        (
            json!({ "settlements": [{ "reservation": "r".repeat(5_000), "used": 1 }] }),
            "settlements[0].reservation",
        ),
        (
            json!({ "settlements": [one, { "reservation": "r", "used": 2_000_000_000_000_u64 }] }),
            "settlements[1].used",
        ),
        (
            json!({ "settlements": [{ "reservation": "r", "used": -1 }] }),
            "settlements[0].used",
        ),
    ];
    for (body, field) in cases {
        let (status, reply) = post(&world.check, "/v1/release", body).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{field}: {reply}");
        assert_eq!(reply["field"], field, "{reply}");
    }
}

#[tokio::test]
async fn the_stats_show_usage_by_rule_tier_and_client() {
    let world = world(RULES).await;
    let checks = |client: &str, count: usize| {
        let check = json!({
            "client": { "kind": "ip", "value": client },
            "path": "/v1/chat/completions",
        });
        json!({ "checks": vec![check; count], "settles": true })
    };
    let heavy = decide(&world.check, checks("10.0.0.1", 2)).await;
    let light = decide(&world.check, checks("10.0.0.2", 1)).await;
    let token = |decision: &Value| decision["usage"][0]["token"].clone();
    settle(
        &world.check,
        json!([
            { "reservation": token(&heavy[0]), "used": 300 },
            { "reservation": token(&heavy[1]), "used": 1500 },
            { "reservation": token(&light[0]), "used": 0 },
        ]),
    )
    .await;

    let stats = support::call(
        &world.admin,
        "GET",
        "/v1/admin/stats?window=1m",
        Some(support::ADMIN_TOKEN),
        &[],
        None,
    )
    .await
    .json();
    let usage = json!({
        "reserved": 3000, "settlements": 3, "returned": 1700, "overshoot": 500, "charged": 1800,
    });
    let rule = |name: &str| {
        stats["rules"]
            .as_array()
            .and_then(|rules| rules.iter().find(|r| r["rule"] == name))
            .cloned()
            .unwrap_or_else(|| panic!("rule {name} in {stats}"))
    };
    assert_eq!(rule("tokens")["usage"], usage, "{stats}");
    assert!(rule("requests").get("usage").is_none(), "{stats}");
    assert_eq!(stats["tiers"][0]["tier"], "default", "{stats}");
    assert_eq!(stats["tiers"][0]["usage"], usage, "{stats}");
    // The client that used nothing cost nothing, and is not among the top.
    assert_eq!(
        stats["top_usage"],
        json!([{ "client": { "kind": "ip", "value": "10.0.0.1" }, "count": 1800, "error": 0 }]),
        "{stats}"
    );
}

#[tokio::test]
async fn a_request_reserves_what_its_body_says_within_bounds() {
    let world = world(
        r#"
[[rules]]
name = "output"
limit = 10000
window = "1h"
usage = { json_pointer = "/usage/completion_tokens", reserve = 1000, reserve_from = "/max_tokens", max = 4000 }
"#,
    )
    .await;
    let reserved = |figures: Value| {
        let check = json!({
            "client": { "kind": "ip", "value": "10.0.0.9" },
            "path": "/v1/chat/completions",
            "request_figures": figures,
        });
        let router = world.check.clone();
        async move {
            let decisions = decide(&router, json!({ "checks": [check], "settles": true })).await;
            let reservation = &decisions[0]["usage"][0];
            // A reply that does not say is charged what this request reserved.
            assert_eq!(reservation["unreported"], reservation["reserved"]);
            reservation["reserved"].clone()
        }
    };
    assert_eq!(reserved(json!({ "/max_tokens": 250 })).await, 250);
    assert_eq!(reserved(json!({})).await, 1000, "not said: `reserve`");
    assert_eq!(reserved(json!({ "/other": 250 })).await, 1000);
    assert_eq!(reserved(json!({ "/max_tokens": 0 })).await, 1, "at least 1");
    assert_eq!(
        reserved(json!({ "/max_tokens": 9999 })).await,
        4000,
        "at most max"
    );

    let too_many: serde_json::Map<String, Value> =
        (0..9).map(|i| (format!("/f{i}"), json!(1))).collect();
    let cases = [
        (json!(too_many), "checks[0].request_figures"),
        (
            json!({ format!("/{}", "a".repeat(300)): 1 }),
            "checks[0].request_figures",
        ),
        (
            json!({ "/max_tokens": 1_000_000_000_001u64 }),
            "checks[0].request_figures./max_tokens",
        ),
    ];
    for (figures, field) in cases {
        let check = json!({
            "client": { "kind": "ip", "value": "10.0.0.9" },
            "request_figures": figures,
        });
        let (status, reply) = post(&world.check, "/v1/check", json!({ "checks": [check] })).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{reply}");
        assert_eq!(reply["field"], field, "{reply}");
    }
}
