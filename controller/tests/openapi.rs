//! The admin API's OpenAPI document: what the controller serves at
//! `/v1/admin/openapi.json` is the checked-in `controller/openapi.json`, byte for byte, and
//! it describes every route the admin router serves.
//!
//! After changing the API, write the file anew and check it in:
//!
//! ```sh
//! SLUICE_WRITE_OPENAPI=1 cargo test -p sluice-controller --test openapi
//! ```

mod support;

use std::collections::BTreeSet;
use std::path::PathBuf;

use axum::http::StatusCode;
use serde_json::{json, Value};
use support::{call, world, ADMIN_TOKEN};

const WRITE: &str = "SLUICE_WRITE_OPENAPI";

/// Every route the admin router serves under /v1/admin, as the document names it. A route
/// added to the router must be added here, and then to the document (a `utoipa::path`
/// annotation, listed in `AdminApi`): the tests below hold the three together.
const ROUTES: &[(&str, &str)] = &[
    ("get", "/v1/admin/version"),
    ("get", "/v1/admin/build"),
    ("get", "/v1/admin/config"),
    ("put", "/v1/admin/config"),
    ("get", "/v1/admin/rules"),
    ("post", "/v1/admin/rules"),
    ("get", "/v1/admin/rules/{name}"),
    ("put", "/v1/admin/rules/{name}"),
    ("delete", "/v1/admin/rules/{name}"),
    ("get", "/v1/admin/tiers"),
    ("post", "/v1/admin/tiers"),
    ("get", "/v1/admin/tiers/{name}"),
    ("put", "/v1/admin/tiers/{name}"),
    ("delete", "/v1/admin/tiers/{name}"),
    ("get", "/v1/admin/api-keys"),
    ("post", "/v1/admin/api-keys"),
    ("get", "/v1/admin/api-keys/{sha256}"),
    ("put", "/v1/admin/api-keys/{sha256}"),
    ("delete", "/v1/admin/api-keys/{sha256}"),
    ("get", "/v1/admin/lists/{list}"),
    ("post", "/v1/admin/lists/{list}"),
    ("get", "/v1/admin/lists/{list}/{id}"),
    ("delete", "/v1/admin/lists/{list}/{id}"),
    ("get", "/v1/admin/counters"),
    ("delete", "/v1/admin/counters"),
    ("get", "/v1/admin/protection/blocks"),
    ("delete", "/v1/admin/protection/blocks/{ip}"),
    ("get", "/v1/admin/state"),
    ("put", "/v1/admin/state"),
    ("get", "/v1/admin/enforcement"),
    ("put", "/v1/admin/enforcement"),
    ("get", "/v1/admin/stats"),
    ("get", "/v1/admin/stats/stream"),
    ("get", "/v1/admin/hints"),
    ("get", "/v1/admin/audit"),
    ("get", "/v1/admin/whoami"),
    ("get", "/v1/admin/openapi.json"),
];

/// Routes whose answer does not end (server-sent events): only their headers are read.
const STREAMS: &[&str] = &["/v1/admin/stats/stream"];

/// The one route the document does not describe: the document itself.
const THE_DOCUMENT: &str = "/v1/admin/openapi.json";

fn checked_in() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("openapi.json")
}

async fn served() -> String {
    let world = world("").await;
    let reply = call(&world.admin, "GET", THE_DOCUMENT, None, &[], None).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text);
    assert_eq!(reply.content_type.as_deref(), Some("application/json"));
    reply.text
}

async fn document() -> Value {
    serde_json::from_str(&served().await).expect("the document is JSON")
}

#[tokio::test]
async fn the_served_document_is_the_checked_in_one() {
    let text = served().await;
    let path = checked_in();
    if std::env::var_os(WRITE).is_some_and(|v| !v.is_empty() && v != "0") {
        std::fs::write(&path, &text)
            .unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
        eprintln!("wrote {}: check it in", path.display());
        return;
    }
    let help = format!(
        "run `{WRITE}=1 cargo test -p sluice-controller --test openapi` to write it, and check it in"
    );
    let on_disk = std::fs::read(&path)
        .unwrap_or_else(|e| panic!("{} cannot be read ({e}): {help}", path.display()));
    if on_disk != text.as_bytes() {
        let on_disk = String::from_utf8_lossy(&on_disk);
        let first = on_disk
            .lines()
            .zip(text.lines())
            .position(|(a, b)| a != b)
            .unwrap_or_else(|| on_disk.lines().count().min(text.lines().count()));
        panic!(
            "{} is not the document the controller serves (first difference at line {}): {help}",
            path.display(),
            first + 1
        );
    }
}

#[tokio::test]
async fn the_document_is_openapi_3_1_with_the_bearer_scheme() {
    let document = document().await;
    assert_eq!(document["openapi"], "3.1.0");
    assert!(document["info"]["title"].is_string());
    let bearer = &document["components"]["securitySchemes"]["bearer"];
    assert_eq!(bearer["type"], "http", "{bearer}");
    assert_eq!(bearer["scheme"], "bearer", "{bearer}");
    // Every operation needs the token.
    for (path, operations) in document["paths"].as_object().expect("paths") {
        for (method, operation) in operations.as_object().expect("operations") {
            assert_eq!(
                operation["security"],
                json!([{ "bearer": [] }]),
                "{method} {path} says it needs the bearer token"
            );
            assert!(
                operation["responses"]
                    .as_object()
                    .is_some_and(|r| !r.is_empty()),
                "{method} {path} has responses"
            );
        }
    }
}

/// The operations the document describes.
fn documented(document: &Value) -> BTreeSet<(String, String)> {
    document["paths"]
        .as_object()
        .expect("paths")
        .iter()
        .flat_map(|(path, operations)| {
            operations
                .as_object()
                .expect("operations")
                .keys()
                .filter(|key| ["get", "put", "post", "delete", "patch"].contains(&key.as_str()))
                .map(move |method| (method.clone(), path.clone()))
        })
        .collect()
}

#[tokio::test]
async fn the_document_describes_every_route_but_itself() {
    let document = document().await;
    let routes: BTreeSet<(String, String)> = ROUTES
        .iter()
        .filter(|(_, path)| *path != THE_DOCUMENT)
        .map(|(method, path)| ((*method).to_owned(), (*path).to_owned()))
        .collect();
    let described = documented(&document);
    let missing: Vec<_> = routes.difference(&described).collect();
    let extra: Vec<_> = described.difference(&routes).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "served but not described: {missing:?}; described but not in ROUTES: {extra:?}"
    );
}

/// Every operation of the document: (method, path, operation).
fn operations(document: &Value) -> Vec<(String, String, &Value)> {
    let mut all = Vec::new();
    for (path, item) in document["paths"].as_object().expect("paths") {
        for (method, operation) in item.as_object().expect("operations") {
            if ["get", "put", "post", "delete", "patch"].contains(&method.as_str()) {
                all.push((method.clone(), path.clone(), operation));
            }
        }
    }
    all
}

/// Client generators name a function after each `operationId`: every operation has one, in
/// camelCase, no two alike; and a one-line `summary`.
#[tokio::test]
async fn every_operation_has_a_unique_id_and_a_summary() {
    let document = document().await;
    let mut seen: std::collections::BTreeMap<String, String> = Default::default();
    for (method, path, operation) in operations(&document) {
        let id = operation["operationId"].as_str().unwrap_or_default();
        assert!(
            !id.is_empty()
                && id.starts_with(|c: char| c.is_ascii_lowercase())
                && id.chars().all(|c| c.is_ascii_alphanumeric()),
            "{method} {path}: operationId {id:?} is not camelCase"
        );
        if let Some(other) = seen.insert(id.to_owned(), format!("{method} {path}")) {
            panic!("operationId {id:?} names both {other} and {method} {path}");
        }
        let summary = operation["summary"].as_str().unwrap_or_default();
        assert!(
            !summary.trim().is_empty() && !summary.contains('\n'),
            "{method} {path} has no one-line summary: {summary:?}"
        );
    }
    assert_eq!(seen.len(), ROUTES.len() - 1, "{seen:?}");
}

/// The table the ids and summaries come from names the document's operations, and only
/// them (a stale entry would name an operation that is gone).
#[tokio::test]
async fn the_operations_table_is_the_document() {
    let document = document().await;
    let table: BTreeSet<(String, String, String)> = sluice_controller::admin::openapi::OPERATIONS
        .iter()
        .map(|(method, path, id, _)| ((*method).into(), (*path).into(), (*id).into()))
        .collect();
    let described: BTreeSet<(String, String, String)> = operations(&document)
        .into_iter()
        .map(|(method, path, operation)| {
            let id = operation["operationId"].as_str().unwrap_or_default().into();
            (method, path, id)
        })
        .collect();
    assert_eq!(table, described);
}

/// A path parameter is one the path names; every other is a query or header parameter,
/// required only when it cannot be left out.
#[tokio::test]
async fn parameters_are_where_the_server_reads_them() {
    let document = document().await;
    for (method, path, operation) in operations(&document) {
        for parameter in operation["parameters"].as_array().into_iter().flatten() {
            let name = parameter["name"].as_str().expect("a name");
            let named = path.contains(&format!("{{{name}}}"));
            let place = parameter["in"].as_str().expect("in");
            assert_eq!(
                place == "path",
                named,
                "{method} {path}: parameter {name} is `in: {place}`"
            );
            if place == "query" {
                assert_eq!(
                    parameter["required"],
                    json!(false),
                    "{method} {path}: query parameter {name} may be left out"
                );
            }
        }
    }
}

/// A path with its parameters filled in, for a request.
fn concrete(path: &str) -> String {
    path.replace("{name}", "nothing")
        .replace("{sha256}", &"0".repeat(64))
        .replace("{list}", "denylist")
        .replace("{id}", "0123456789abcdef")
}

/// `ROUTES` is what the router serves: each route answers (the handler's own answer, even
/// when it is "not found"), and every other method on its path is not allowed.
#[tokio::test]
async fn the_router_serves_the_routes_and_only_them() {
    let world = world("").await;
    let paths: BTreeSet<&str> = ROUTES.iter().map(|(_, path)| *path).collect();
    for path in paths {
        for method in ["get", "put", "post", "delete", "patch"] {
            let served = ROUTES.contains(&(method, path));
            let upper = method.to_ascii_uppercase();
            if served && method == "get" && STREAMS.contains(&path) {
                let request = axum::http::Request::builder()
                    .uri(path)
                    .header("authorization", format!("Bearer {ADMIN_TOKEN}"))
                    .body(axum::body::Body::empty())
                    .expect("request");
                let response = tower::ServiceExt::oneshot(world.admin.clone(), request)
                    .await
                    .expect("a response");
                assert_eq!(response.status(), StatusCode::OK, "GET {path}");
                assert_eq!(
                    response.headers().get("content-type").map(|v| v.as_bytes()),
                    Some(&b"text/event-stream"[..]),
                    "GET {path}"
                );
                continue;
            }
            let body = (method != "get" && method != "delete").then_some("{}");
            let reply = call(
                &world.admin,
                &upper,
                &concrete(path),
                Some(ADMIN_TOKEN),
                &[],
                body,
            )
            .await;
            let by_the_router = reply.status == StatusCode::METHOD_NOT_ALLOWED
                || (reply.status == StatusCode::NOT_FOUND && reply.text.is_empty());
            if served {
                assert!(
                    !by_the_router,
                    "{upper} {path} is not served: {} {}",
                    reply.status, reply.text
                );
            } else {
                assert_eq!(
                    reply.status,
                    StatusCode::METHOD_NOT_ALLOWED,
                    "{upper} {path} is served but not in ROUTES"
                );
            }
        }
    }
}

/// The paths `admin::app` routes (read from its source), against `ROUTES`: a new path in the
/// router is a new path here.
#[test]
fn every_path_the_router_names_is_in_the_routes() {
    let source = include_str!("../src/admin/mod.rs");
    let app = source
        .split_once("pub fn app(")
        .map(|(_, rest)| rest)
        .expect("admin::app");
    let (nested, _outside) = app
        .split_once(".nest(")
        .expect("the routes are nested under the prefix");
    let named: BTreeSet<String> = nested
        .split(".route(")
        .skip(1)
        .filter_map(|rest| rest.trim_start().strip_prefix('"')?.split_once('"'))
        .map(|(path, _)| path)
        .map(|path| format!("{}{path}", sluice_protocol::admin::ADMIN_PREFIX))
        .collect();
    assert!(named.len() >= 10, "found the routes: {named:?}");
    let listed: BTreeSet<String> = ROUTES.iter().map(|(_, path)| (*path).to_owned()).collect();
    assert_eq!(named, listed, "admin::app's paths against ROUTES");
}

/// The document holds no data: it is served without a token.
#[tokio::test]
async fn the_document_needs_no_token() {
    let world = world("").await;
    let reply = call(&world.admin, "GET", THE_DOCUMENT, None, &[], None).await;
    assert_eq!(reply.status, StatusCode::OK);
    let with_token = call(
        &world.admin,
        "GET",
        THE_DOCUMENT,
        Some(ADMIN_TOKEN),
        &[],
        None,
    )
    .await;
    assert_eq!(with_token.text, reply.text);
}
