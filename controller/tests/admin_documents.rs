//! The documents the admin API reads, in process: one nested deeper than the bound is
//! refused at once in every format (a YAML import nested 100,000 deep used to take 47 s to
//! parse, and held the threads that answer checks meanwhile), and the largest imports,
//! parsed, validated and applied while checks flow, leave the checks their usual latency.

mod support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::{Request, StatusCode};
use http_body_util::BodyExt;
use serde_json::{json, Value};
use sluice_controller::admin::depth::MAX_DEPTH;
use sluice_controller::admin::{MAX_IMPORT_BYTES, REQUEST_TIMEOUT};
use support::{call, world, ADMIN_TOKEN};
use tower::ServiceExt;

const ADMIN: Option<&str> = Some(ADMIN_TOKEN);

const START: &str = r#"
[[rules]]
name = "per-client"
limit = 1000000
window = "1m"
"#;

/// Well under the admin API's 10 s limit, with room for a slow machine: a refusal takes
/// milliseconds.
const AT_ONCE: Duration = Duration::from_secs(2);

/// Documents nested `depth` deep (the document's top level counted), in every way each
/// format nests: what they are, their media type, their text.
fn nested(depth: usize) -> Vec<(&'static str, &'static str, String)> {
    let inner = depth - 1;
    let mut documents = vec![
        (
            "YAML flow sequences",
            "application/yaml",
            format!("rules: {}{}", "[".repeat(inner), "]".repeat(inner)),
        ),
        (
            "YAML flow mappings",
            "application/yaml",
            format!("rules: {}1{}", "{a: ".repeat(inner), "}".repeat(inner)),
        ),
        (
            "YAML compact block sequences",
            "application/yaml",
            format!("{}x", "- ".repeat(depth)),
        ),
        (
            "JSON arrays",
            "application/json",
            format!("{{\"rules\": {}{}}}", "[".repeat(inner), "]".repeat(inner)),
        ),
        (
            "JSON objects",
            "application/json",
            format!(
                "{{\"rules\": {}1{}}}",
                "{\"a\": ".repeat(inner),
                "}".repeat(inner)
            ),
        ),
        (
            "TOML arrays",
            "application/toml",
            format!("rules = {}{}", "[".repeat(inner), "]".repeat(inner)),
        ),
        (
            "TOML inline tables",
            "application/toml",
            format!("rules = {}1{}", "{a = ".repeat(inner), "}".repeat(inner)),
        ),
        (
            "TOML dotted keys",
            "application/toml",
            format!("{}a = 1", "a.".repeat(inner)),
        ),
        (
            "TOML table headers",
            "application/toml",
            format!("[{}a]\nb = 1", "a.".repeat(depth - 2)),
        ),
    ];
    // Each level a line indented one more: 100,000 deep would take 5 GB.
    if depth <= 1000 {
        let block = (0..depth)
            .map(|i| format!("{}a:\n", " ".repeat(i)))
            .collect::<String>();
        documents.push(("YAML block mappings", "application/yaml", block));
    }
    documents
}

/// Whether an answer is the refusal of a document nested deeper than the bound.
fn too_deep(status: StatusCode, body: &Value) -> bool {
    let message = body["message"].as_str().unwrap_or_default();
    status == StatusCode::BAD_REQUEST
        && body["error"] == "invalid_request"
        && body.get("field").is_none()
        && message.contains(&format!("nested more than {MAX_DEPTH} levels deep"))
}

async fn version(world: &support::World) -> Value {
    call(&world.admin, "GET", "/v1/admin/version", ADMIN, &[], None)
        .await
        .json()
}

#[tokio::test]
async fn an_import_nested_too_deeply_is_refused_at_once_in_every_format() {
    let world = world(START).await;
    let before = version(&world).await;
    for depth in [100_000, MAX_DEPTH + 1] {
        for (what, media_type, text) in nested(depth) {
            let started = Instant::now();
            let reply = call(
                &world.admin,
                "PUT",
                "/v1/admin/config",
                ADMIN,
                &[("content-type", media_type)],
                Some(&text),
            )
            .await;
            let took = started.elapsed();
            let body = reply.json();
            assert!(
                too_deep(reply.status, &body),
                "{what}, {depth} deep: {} {body}",
                reply.status
            );
            assert!(took < AT_ONCE, "{what}, {depth} deep: refused in {took:?}");
        }
    }
    assert_eq!(version(&world).await, before, "nothing was applied");
}

/// At the bound, a document is read: it is refused only for what the schema says of it.
#[tokio::test]
async fn an_import_nested_as_deeply_as_the_bound_is_read() {
    let world = world(START).await;
    for (what, media_type, text) in nested(MAX_DEPTH) {
        let reply = call(
            &world.admin,
            "PUT",
            "/v1/admin/config",
            ADMIN,
            &[("content-type", media_type)],
            Some(&text),
        )
        .await;
        let body = reply.json();
        assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{what}: {body}");
        assert!(!too_deep(reply.status, &body), "{what}: {body}");
    }
    // And a real configuration, as deep as configurations go, applies.
    let reply = call(
        &world.admin,
        "PUT",
        "/v1/admin/config",
        ADMIN,
        &[("content-type", "application/yaml")],
        Some(
            "rules:\n- name: per-client\n  limit: 5\n  window: 1m\n  match:\n    headers:\n    \
             - name: x-team\n      value: a\n",
        ),
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text);
}

/// Every JSON body the admin API reads has the same bound (`serde_json` stops at 128 by
/// itself; the bound is lower, and its refusal says what it is).
#[tokio::test]
async fn a_json_body_nested_too_deeply_is_refused_naming_the_bound() {
    let world = world(START).await;
    let routes = [
        ("POST", "/v1/admin/rules"),
        ("PUT", "/v1/admin/rules/per-client"),
        ("POST", "/v1/admin/tiers"),
        ("POST", "/v1/admin/api-keys"),
        ("POST", "/v1/admin/lists/denylist"),
        ("PUT", "/v1/admin/state"),
        ("PUT", "/v1/admin/enforcement"),
    ];
    for (method, path) in routes {
        for depth in [100_000, MAX_DEPTH + 1, MAX_DEPTH] {
            let inner = depth - 1;
            let text = format!("{{\"name\": {}{}}}", "[".repeat(inner), "]".repeat(inner));
            let started = Instant::now();
            let reply = call(&world.admin, method, path, ADMIN, &[], Some(&text)).await;
            let took = started.elapsed();
            let body = reply.json();
            assert_eq!(
                reply.status,
                StatusCode::BAD_REQUEST,
                "{method} {path}: {body}"
            );
            assert_eq!(
                too_deep(reply.status, &body),
                depth > MAX_DEPTH,
                "{method} {path}, {depth} deep: {body}"
            );
            assert!(took < AT_ONCE, "{method} {path}: refused in {took:?}");
        }
    }
}

/// The largest import the admin API takes, as YAML (the slowest of the three to read): a
/// valid configuration, so that it is parsed, validated, compiled and applied.
fn largest_import() -> String {
    let mut text =
        String::from("rules:\n- name: per-client\n  limit: 1000000\n  window: 1m\napi_keys:\n");
    let label = "a label for people ".repeat(10);
    for i in 0u64.. {
        let entry = format!("- sha256: {i:064x}\n  user: user-{i}\n  name: {label}\n");
        if text.len() + entry.len() > MAX_IMPORT_BYTES {
            break;
        }
        text.push_str(&entry);
    }
    text
}

/// `method path` with `body`: the status and the body. Unlike `support::call`, a future that
/// a task of the runtime can run.
async fn send(
    router: &axum::Router,
    method: &str,
    path: &str,
    content_type: &str,
    body: String,
) -> (StatusCode, String) {
    let request = Request::builder()
        .method(method)
        .uri(path)
        .header("authorization", format!("Bearer {ADMIN_TOKEN}"))
        .header("content-type", content_type)
        .body(Body::from(body))
        .expect("request");
    let response = router.clone().oneshot(request).await.expect("a response");
    let status = response.status();
    let bytes = response
        .into_body()
        .collect()
        .await
        .expect("body")
        .to_bytes();
    (status, String::from_utf8_lossy(&bytes).into_owned())
}

/// Check calls, one about every millisecond, until `enough` says so: how long each took.
/// Each runs on the runtime's workers (as a check listener's connection does); it is asked
/// from a thread of its own and timed from then, so that the time it waits for a free
/// worker counts.
async fn check_latencies(
    check: axum::Router,
    enough: impl Fn(usize) -> bool + Send + 'static,
) -> Vec<Duration> {
    let runtime = tokio::runtime::Handle::current();
    let request = json!({
        "checks": [{ "client": { "kind": "ip", "value": "10.0.0.1" }, "path": "/" }]
    })
    .to_string();
    tokio::task::spawn_blocking(move || {
        let mut took = Vec::new();
        while !enough(took.len()) {
            let (check, request) = (check.clone(), request.clone());
            let started = Instant::now();
            let call = runtime.spawn(async move {
                send(&check, "POST", "/v1/check", "application/json", request).await
            });
            let (status, body) = runtime.block_on(call).expect("the check call");
            took.push(started.elapsed());
            assert_eq!(status, StatusCode::OK, "{body}");
            std::thread::sleep(Duration::from_millis(1));
        }
        took
    })
    .await
    .expect("the check calls")
}

/// The median and the longest.
fn summary(mut took: Vec<Duration>) -> (Duration, Duration) {
    took.sort();
    (took[took.len() / 2], took[took.len() - 1])
}

/// The filter waits 200 ms for a check before it falls back to its failure mode; two
/// imports of the largest size once held a check for 4.2 s. The runtime has two workers, as
/// on the two-core machines the controller is sized for.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_largest_imports_leave_checks_their_usual_latency() {
    let world = world(START).await;
    let document = Arc::new(largest_import());

    let quiet_until = Instant::now() + Duration::from_millis(500);
    let quiet = check_latencies(world.check.clone(), move |n| {
        n >= 50 && Instant::now() >= quiet_until
    })
    .await;

    let finished = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let imports: Vec<_> = (0..2)
        .map(|_| {
            let (admin, document, finished) = (
                world.admin.clone(),
                Arc::clone(&document),
                Arc::clone(&finished),
            );
            tokio::spawn(async move {
                let reply = send(
                    &admin,
                    "PUT",
                    "/v1/admin/config",
                    "application/yaml",
                    document.to_string(),
                )
                .await;
                let took = started.elapsed();
                finished.fetch_add(1, Ordering::SeqCst);
                (reply, took)
            })
        })
        .collect();
    let busy = {
        let finished = Arc::clone(&finished);
        check_latencies(world.check.clone(), move |_| {
            finished.load(Ordering::SeqCst) == 2
        })
        .await
    };
    let mut import_times = Vec::new();
    let mut statuses = Vec::new();
    for import in imports {
        let ((status, text), took) = import.await.expect("the import");
        statuses.push((status, text.chars().take(200).collect::<String>()));
        import_times.push(took);
    }

    let calls = busy.len();
    let (quiet_median, quiet_longest) = summary(quiet);
    let (busy_median, busy_longest) = summary(busy);
    println!(
        "imports of {} bytes answered {statuses:?} after {import_times:?}; checks without \
         imports: median {quiet_median:?}, longest {quiet_longest:?}; during them ({calls} \
         calls): median {busy_median:?}, longest {busy_longest:?}",
        document.len()
    );
    assert!(
        calls >= 10,
        "the imports took {import_times:?}: too short to measure"
    );
    assert!(
        busy_longest < Duration::from_millis(150),
        "a check took {busy_longest:?} during the imports (median {busy_median:?}; \
         {quiet_median:?} and {quiet_longest:?} without)"
    );
    // Answered within the request limit: applied, or (an unoptimized build on a busy
    // machine parses 16 MB of YAML in more than 10 s) refused when the limit ran out. A
    // handler parsing on a worker used to keep the limit's timer from firing at all.
    for ((status, text), took) in statuses.iter().zip(&import_times) {
        assert!(
            [StatusCode::OK, StatusCode::REQUEST_TIMEOUT].contains(status),
            "{status} {text}"
        );
        assert!(
            *took < REQUEST_TIMEOUT + Duration::from_secs(2),
            "an import was answered after {took:?}"
        );
    }
}
