//! Lease mode, in process, on the embedded store with a manual clock: what a lease is
//! sized from, that it is taken from the limit, and when none is granted.

mod support;

use axum::http::StatusCode;
use serde_json::{json, Value};
use support::{call, post, world, ADMIN_TOKEN};

/// 200 a minute, 5 % of it (10) in leases, which last to the end of their window.
const LEASED: &str = r#"
[[rules]]
name = "hot"
limit = 200
window = "1m"
match = { path = "/hot" }
leased = { share_percent = 5 }

[[rules]]
name = "exact"
limit = 200
window = "1m"
match = { path = "/exact" }
"#;

/// A whole minute on the test clock.
const MINUTE: u64 = 1_020_000;

/// `count` checks of one kind; with a holder, each asks for a lease.
fn checks(holder: Option<&str>, path: &str, count: usize) -> Value {
    let mut check = json!({ "client": { "kind": "ip", "value": "10.0.0.1" }, "path": path });
    let mut body = json!({});
    if let Some(holder) = holder {
        body["lease_holder"] = json!(holder);
        check["lease"] = json!(true);
    }
    body["checks"] = json!(vec![check; count]);
    body
}

/// A decision's grant without its token (which holds a random id and a signature).
fn grant(decision: &Value) -> Value {
    let mut grant = decision["grant"].clone();
    if let Some(grant) = grant.as_object_mut() {
        let token = grant.remove("token");
        assert!(
            token
                .as_ref()
                .and_then(Value::as_str)
                .is_some_and(|t| t.starts_with("g|")),
            "a grant carries the token to give it back: {token:?}"
        );
    }
    grant
}

async fn decide(router: &axum::Router, body: Value) -> Vec<Value> {
    let (status, reply) = post(router, "/v1/check", body).await;
    assert_eq!(status, StatusCode::OK, "{reply}");
    reply["decisions"].as_array().cloned().unwrap_or_default()
}

#[tokio::test]
async fn a_lease_is_its_share_of_the_quota_taken_from_the_limit() {
    let world = world(LEASED).await;
    // 15 s into the minute: a fixed window's lease ends with the window, 45 s later.
    world.clock.set(MINUTE + 15_000);
    let first = decide(&world.check, checks(Some("worker-a"), "/hot", 1)).await;
    assert_eq!(first[0]["allowed"], true);
    assert_eq!(grant(&first[0]), json!({ "units": 10, "ttl_ms": 45_000 }));
    assert_eq!(
        first[0]["policy"]["remaining"], 199,
        "the request's own view: the lease is the asking worker's"
    );
    // The lease was taken from the limit: the next exact decision sees 1 + 10 counted.
    let next = decide(&world.check, checks(None, "/hot", 1)).await;
    assert_eq!(next[0]["policy"]["remaining"], 188);
    assert!(next[0].get("grant").is_none(), "no holder, no lease");
    // A holder whose check does not ask (it has no room for another lease) gets none.
    let mut unasked = checks(Some("worker-c"), "/hot", 1);
    unasked["checks"][0]["lease"] = json!(false);
    let unasked = decide(&world.check, unasked).await;
    assert!(unasked[0].get("grant").is_none(), "{}", unasked[0]);
    assert_eq!(unasked[0]["policy"]["remaining"], 187);
    // A second worker: the quota's other half is not free yet (a holds 10 of 10).
    let second = decide(&world.check, checks(Some("worker-b"), "/hot", 1)).await;
    assert!(second[0].get("grant").is_none(), "{}", second[0]);
    // a asks again (its lease spent): now it shares with b, 5 each.
    let again = decide(&world.check, checks(Some("worker-a"), "/hot", 1)).await;
    assert_eq!(again[0]["grant"]["units"], 5);
    let b = decide(&world.check, checks(Some("worker-b"), "/hot", 1)).await;
    assert_eq!(b[0]["grant"]["units"], 5);
    let metrics = world.metrics.render();
    assert!(
        metrics.contains(r#"sluice_leases_granted_total{rule="hot"} 3"#),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"sluice_leased_requests_granted_total{rule="hot"} 20"#),
        "{metrics}"
    );
}

#[tokio::test]
async fn no_lease_beyond_what_is_left_nor_past_the_window_nor_for_exact_rules() {
    let world = world(LEASED).await;
    // 59.5 s into the minute: a lease may last 500 ms, to the window's end.
    world.clock.set(MINUTE + 59_500);
    let decided = decide(&world.check, checks(Some("w"), "/hot", 1)).await;
    assert_eq!(grant(&decided[0]), json!({ "units": 10, "ttl_ms": 500 }));
    // An exact rule's check never carries a lease.
    let exact = decide(&world.check, checks(Some("w"), "/exact", 3)).await;
    assert!(exact.iter().all(|d| d.get("grant").is_none()));
    // Near the limit a lease holds what is left at most.
    world.clock.advance(500);
    let spent = decide(&world.check, checks(None, "/hot", 195)).await;
    assert!(spent.iter().all(|d| d["allowed"] == true));
    let last = decide(&world.check, checks(Some("x"), "/hot", 1)).await;
    assert_eq!(last[0]["policy"]["remaining"], 4);
    assert_eq!(last[0]["grant"]["units"], 4, "{}", last[0]);
    let denied = decide(&world.check, checks(Some("x"), "/hot", 1)).await;
    assert_eq!(denied[0]["allowed"], false);
    assert!(denied[0].get("grant").is_none());
}

#[tokio::test]
async fn token_bucket_and_gcra_lease_a_share_of_their_burst() {
    let world = world(
        r#"
[[rules]]
name = "bucket"
strategy = "token_bucket"
limit = 100
window = "1s"
burst = 400
match = { path = "/bucket" }
leased = { share_percent = 10, ttl = "1s" }

[[rules]]
name = "cells"
strategy = "gcra"
limit = 100
window = "1s"
burst = 50
match = { path = "/cells" }
leased = {}
"#,
    )
    .await;
    // A first lease holds 16: the worker's traffic is not known yet.
    let bucket = decide(&world.check, checks(Some("w"), "/bucket", 1)).await;
    assert_eq!(grant(&bucket[0]), json!({ "units": 16, "ttl_ms": 1_000 }));
    let after = decide(&world.check, checks(None, "/bucket", 1)).await;
    assert_eq!(after[0]["policy"]["remaining"], 400 - 1 - 16 - 1);
    // Spent in 100 ms: the next holds a second of that, within the quota of 10 % (40).
    world.clock.advance(100);
    let next = decide(&world.check, checks(Some("w"), "/bucket", 1)).await;
    assert_eq!(next[0]["grant"]["units"], 40);
    let cells = decide(&world.check, checks(Some("w"), "/cells", 1)).await;
    assert_eq!(cells[0]["grant"]["units"], 2, "5 % of a burst of 50");
}

#[tokio::test]
async fn what_the_filters_admitted_from_leases_is_in_the_stats_and_the_metrics() {
    let world = world(LEASED).await;
    world.clock.set(MINUTE + 1_000);
    let granted = decide(&world.check, checks(Some("w"), "/hot", 1)).await;
    assert_eq!(granted[0]["grant"]["units"], 10);
    let report = json!({ "leased": [{
        "client": { "kind": "ip", "value": "10.0.0.1" }, "rule": "hot", "count": 7,
    }] });
    let reply = call(
        &world.check,
        "POST",
        "/v1/report",
        None,
        &[("content-type", "application/json")],
        Some(&report.to_string()),
    )
    .await;
    assert_eq!(reply.status, StatusCode::NO_CONTENT, "{}", reply.text);
    let stats = call(
        &world.admin,
        "GET",
        "/v1/admin/stats?window=1m",
        Some(ADMIN_TOKEN),
        &[],
        None,
    )
    .await
    .json();
    assert_eq!(
        stats["decisions"], 8,
        "the exact decision and 7 from its lease: {stats}"
    );
    let hot = stats["rules"]
        .as_array()
        .and_then(|rules| rules.iter().find(|r| r["rule"] == "hot"))
        .cloned()
        .unwrap_or_default();
    assert_eq!(hot["allowed"], 8, "{stats}");
    assert_eq!(stats["top_requesting"][0]["count"], 8, "{stats}");
    let metrics = world.metrics.render();
    assert!(
        metrics.contains(r#"sluice_leased_admissions_total{rule="hot"} 7"#),
        "{metrics}"
    );
}

async fn give_back(router: &axum::Router, returns: Value) -> (StatusCode, Value) {
    post(
        router,
        "/v1/release",
        json!({ "leases": [], "returns": returns }),
    )
    .await
}

#[tokio::test]
async fn a_lease_given_back_returns_its_unused_quota_once_and_only_as_granted() {
    let world = world(LEASED).await;
    world.clock.set(MINUTE + 15_000);
    let first = decide(&world.check, checks(Some("worker-a"), "/hot", 1)).await;
    let token = first[0]["grant"]["token"]
        .as_str()
        .expect("token")
        .to_owned();
    let remaining = || async {
        decide(&world.check, checks(None, "/hot", 1)).await[0]["policy"]["remaining"]
            .as_u64()
            .expect("remaining")
    };
    assert_eq!(remaining().await, 188, "1 + a lease of 10 + this one");

    let (status, reply) = give_back(&world.check, json!([{ "grant": token, "unused": 11 }])).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{reply}");
    assert_eq!(reply["field"], "returns[0].unused", "{reply}");

    let (status, reply) = give_back(&world.check, json!([{ "grant": token, "unused": 7 }])).await;
    assert_eq!(
        (status, &reply["returned"]),
        (StatusCode::OK, &json!([7])),
        "{reply}"
    );
    assert_eq!(remaining().await, 194, "7 back, one more counted");
    let (status, reply) = give_back(&world.check, json!([{ "grant": token, "unused": 7 }])).await;
    assert_eq!(
        (status, &reply["returned"]),
        (StatusCode::OK, &json!([0])),
        "a replay"
    );

    let forged = token.replacen("|10|", "|999|", 1);
    let unsigned = token
        .rsplit_once('|')
        .map(|(t, _)| t.to_owned())
        .expect("signed");
    let (status, reply) = give_back(
        &world.check,
        json!([{ "grant": forged, "unused": 500 }, { "grant": unsigned, "unused": 5 }]),
    )
    .await;
    assert_eq!(
        (status, &reply["returned"]),
        (StatusCode::OK, &json!([0, 0])),
        "tokens this controller did not sign give nothing back: {reply}"
    );
    assert_eq!(remaining().await, 193);

    // A lease that ended gives nothing back: its window's quota went with it.
    let again = decide(&world.check, checks(Some("worker-b"), "/hot", 1)).await;
    let late = again[0]["grant"]["token"]
        .as_str()
        .expect("token")
        .to_owned();
    world.clock.set(MINUTE + 60_000);
    let (_, reply) = give_back(&world.check, json!([{ "grant": late, "unused": 1 }])).await;
    assert_eq!(reply["returned"], json!([0]), "{reply}");

    let metrics = world.metrics.render();
    assert!(
        metrics.contains(r#"sluice_leased_requests_returned_total{rule="hot"} 7"#),
        "{metrics}"
    );
    let (status, reply) = give_back(
        &world.check,
        json!([{ "grant": "x".repeat(4 * 1024 + 1), "unused": 1 }]),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{reply}");
    assert_eq!(reply["field"], "returns[0].grant", "{reply}");
}
