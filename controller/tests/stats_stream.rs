//! `GET /v1/admin/stats/stream`, in process: server-sent events of the stats, about once a
//! second, each saying what came since the one before; the token and the question checked
//! (as JSON errors) before any event; the stream ends when the controller stops.

mod support;

use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use http_body_util::BodyExt;
use serde_json::{json, Value};
use support::{call, post, world, World, ADMIN_TOKEN, READ_TOKEN};
use tower::ServiceExt;

const RULES: &str = r#"
[[rules]]
name = "per-client"
limit = 3
window = "1h"
"#;

/// Each event waits at most this long (they come once a second).
const NEXT_EVENT: Duration = Duration::from_secs(10);

async fn check(world: &World, ip: &str) {
    let (status, body) = post(
        &world.check,
        "/v1/check",
        json!({ "checks": [{ "client": { "kind": "ip", "value": ip }, "path": "/" }] }),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
}

/// An open stream, read event by event.
struct Events {
    body: Body,
    buffer: String,
}

impl Events {
    async fn open(world: &World, token: &str) -> Events {
        let request = Request::builder()
            .uri("/v1/admin/stats/stream")
            .header("authorization", format!("Bearer {token}"))
            .body(Body::empty())
            .expect("request");
        let response = world.admin.clone().oneshot(request).await.expect("answer");
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(
            response.headers()["content-type"].as_bytes(),
            b"text/event-stream"
        );
        Events {
            body: response.into_body(),
            buffer: String::new(),
        }
    }

    /// The next `stats` event's data (keep-alive comments skipped); `None` when the stream
    /// ended.
    async fn next(&mut self) -> Option<Value> {
        loop {
            if let Some(end) = self.buffer.find("\n\n") {
                let block: String = self.buffer.drain(..end + 2).collect();
                let mut event = None;
                let mut data = Vec::new();
                for line in block.lines() {
                    if let Some(name) = line.strip_prefix("event: ") {
                        event = Some(name.to_owned());
                    } else if let Some(text) = line.strip_prefix("data: ") {
                        data.push(text.to_owned());
                    }
                }
                if event.as_deref() == Some("stats") {
                    return Some(serde_json::from_str(&data.join("\n")).expect("JSON data"));
                }
                continue;
            }
            let frame = tokio::time::timeout(NEXT_EVENT, self.body.frame())
                .await
                .expect("an event within the wait")?;
            let frame = frame.expect("a frame");
            if let Ok(bytes) = frame.into_data() {
                self.buffer.push_str(&String::from_utf8_lossy(&bytes));
            }
        }
    }
}

#[tokio::test]
async fn each_event_says_what_came_since_the_one_before() {
    let world = world(RULES).await;
    for _ in 0..2 {
        check(&world, "10.0.0.1").await;
    }
    let mut events = Events::open(&world, READ_TOKEN).await;
    let first = events.next().await.expect("a first event");
    // The first event has the window's stats, and no rates yet.
    assert_eq!(first["stats"]["decisions"], 2, "{first}");
    assert_eq!(first["stats"]["rules"][0]["allowed"], 2, "{first}");
    assert_eq!(first["rates"]["allowed"], 0, "{first}");
    assert_eq!(first["state"]["state"], "NORMAL", "{first}");
    assert!(first["version"].as_u64().is_some(), "{first}");
    assert!(first["hints"].is_array(), "{first}");

    for _ in 0..5 {
        check(&world, "10.0.0.2").await;
    }
    // What came since: 3 allowed and 2 limited, in one event or spread over a few.
    let (mut allowed, mut limited, mut rule_limited) = (0, 0, 0);
    for _ in 0..5 {
        let event = events.next().await.expect("an event");
        allowed += event["rates"]["allowed"].as_u64().expect("allowed");
        limited += event["rates"]["limited"].as_u64().expect("limited");
        rule_limited += event["rates"]["rules"]
            .as_array()
            .expect("rules")
            .iter()
            .filter(|r| r["rule"] == "per-client")
            .map(|r| r["limited"].as_u64().unwrap_or(0))
            .sum::<u64>();
        assert!(event["rates"]["interval_ms"].as_u64().expect("interval") > 0);
        if allowed == 3 && limited == 2 {
            assert_eq!(event["stats"]["decisions"], 7, "{event}");
            break;
        }
    }
    assert_eq!((allowed, limited, rule_limited), (3, 2, 2));
    // Nothing more came: the next event says none.
    let quiet = events.next().await.expect("an event");
    assert_eq!(
        (
            quiet["rates"]["allowed"].as_u64(),
            quiet["rates"]["limited"].as_u64()
        ),
        (Some(0), Some(0)),
        "{quiet}"
    );
}

#[tokio::test]
async fn a_stream_needs_a_token_and_a_good_question_answered_as_json() {
    let world = world(RULES).await;
    let reply = call(
        &world.admin,
        "GET",
        "/v1/admin/stats/stream",
        None,
        &[],
        None,
    )
    .await;
    assert_eq!(reply.status, StatusCode::UNAUTHORIZED);
    assert_eq!(reply.json()["error"], "unauthorized");
    let reply = call(
        &world.admin,
        "GET",
        "/v1/admin/stats/stream?top=1000",
        Some(ADMIN_TOKEN),
        &[],
        None,
    )
    .await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST);
    assert_eq!(reply.json()["field"], "top");
    let reply = call(
        &world.admin,
        "GET",
        "/v1/admin/stats/stream?token=x",
        Some(ADMIN_TOKEN),
        &[],
        None,
    )
    .await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST);
    assert_eq!(reply.json()["field"], "token");
}
