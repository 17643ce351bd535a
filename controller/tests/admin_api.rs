//! The admin API, in process (`oneshot` on the router), on the embedded stores: every route's
//! answer and `ETag`, the audit entry of every change, tokens and roles, `If-Match`, the
//! errors (each naming its field), and that a refused call changes nothing. The check
//! router of the same controller shows that a change applies at once.

mod support;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use serde::de::DeserializeOwned;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use sluice_controller::config::file::{self, Format};
use sluice_controller::config::ConfigSource;
use sluice_protocol::config::Tier;
use sluice_protocol::{ConfigDocument, Rule};
use support::{call, post, world, world_with_source, Reply, World, ADMIN_TOKEN, READ_TOKEN};

const ADMIN: Option<&str> = Some(ADMIN_TOKEN);
const READ: Option<&str> = Some(READ_TOKEN);

/// SHA-256 of `test` and of `foo`.
const DIGEST: &str = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";
const OTHER_DIGEST: &str = "2c26b46b68ffc68ff99b453c1d30413413422d706483bfa0f98a5e886266e7ae";

/// What most tests start from (version 1): two tiers, a rule for everyone, a rule that
/// counts by tier on `/api/`, a key of tier `pro`, and a denylisted address.
const START: &str = r#"
[[tiers]]
name = "pro"
limit = 5

[[tiers]]
name = "free"
limit = 1

[[rules]]
name = "per-client"
limit = 3
window = "1m"

[[rules]]
name = "tiered"
strategy = "sliding_window_log"
limit = 2
window = "1m"
tier_limits = true
match = { path_prefix = "/api/" }

[[api_keys]]
sha256 = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
user = "acme"
tier = "pro"
name = "acme production"

[[denylist]]
kind = "ip"
value = "192.0.2.66"
reason = "abuse"
"#;

/// `actual` says what `expected` says, both read as a `T` (so `1m` and `60s` are one window,
/// and a default left out is the default), and holds nothing a `T` does not.
fn same_as<T: DeserializeOwned + PartialEq + std::fmt::Debug>(actual: &Value, expected: &Value) {
    let read = |value: &Value| {
        serde_json::from_value::<T>(value.clone()).unwrap_or_else(|e| panic!("{e}: {value}"))
    };
    assert_eq!(read(actual), read(expected), "{actual}");
}

fn sha256_hex(text: &str) -> String {
    Sha256::digest(text.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

// ----- requests and what they must do ------------------------------------------------------

/// One request to the admin router.
#[derive(Debug, Clone)]
struct Ask {
    method: &'static str,
    path: String,
    token: Option<&'static str>,
    headers: Vec<(&'static str, String)>,
    body: Option<String>,
}

impl Ask {
    fn new(method: &'static str, path: impl Into<String>) -> Self {
        Ask {
            method,
            path: path.into(),
            token: ADMIN,
            headers: Vec::new(),
            body: None,
        }
    }

    fn get(path: impl Into<String>) -> Self {
        Ask::new("GET", path)
    }

    fn json(mut self, body: Value) -> Self {
        self.body = Some(body.to_string());
        self
    }

    fn text(mut self, body: impl Into<String>) -> Self {
        self.body = Some(body.into());
        self
    }

    fn token(mut self, token: Option<&'static str>) -> Self {
        self.token = token;
        self
    }

    fn header(mut self, name: &'static str, value: impl Into<String>) -> Self {
        self.headers.push((name, value.into()));
        self
    }

    fn if_match(self, version: u64) -> Self {
        self.header("if-match", format!("\"{version}\""))
    }

    fn is_write(&self) -> bool {
        self.method != "GET"
    }

    async fn send(&self, world: &World) -> Reply {
        let headers: Vec<(&str, &str)> = self
            .headers
            .iter()
            .map(|(name, value)| (*name, value.as_str()))
            .collect();
        call(
            &world.admin,
            self.method,
            &self.path,
            self.token,
            &headers,
            self.body.as_deref(),
        )
        .await
    }
}

/// A GET with the admin token that must succeed.
async fn read(world: &World, path: &str) -> Reply {
    let reply = Ask::get(path).send(world).await;
    assert_eq!(reply.status, StatusCode::OK, "GET {path}: {}", reply.text);
    reply
}

/// What a refused call must leave as it was: the version, the whole configuration, and
/// the audit log.
#[derive(Debug, PartialEq)]
struct Seen {
    version: u64,
    export: String,
    audit: Vec<Value>,
}

async fn seen(world: &World) -> Seen {
    let version = read(world, "/v1/admin/version").await;
    let number = version.json()["version"]
        .as_u64()
        .unwrap_or_else(|| panic!("no version in {}", version.text));
    assert_eq!(version.version(), number, "the ETag names the version");
    let export = read(world, "/v1/admin/config").await;
    assert_eq!(export.version(), number);
    let audit = read(world, "/v1/admin/audit?limit=1000").await.json()["entries"]
        .as_array()
        .cloned()
        .expect("entries");
    Seen {
        version: number,
        export: export.text,
        audit,
    }
}

/// Sends `ask`, which must be refused with `status`, `error` and `field`; nothing changes.
async fn refused(
    world: &World,
    ask: &Ask,
    status: StatusCode,
    error: &str,
    field: Option<&str>,
) -> Value {
    let before = seen(world).await;
    let reply = ask.send(world).await;
    let what = format!("{} {} {:?}", ask.method, ask.path, ask.body);
    assert_eq!(reply.status, status, "{what}: {}", reply.text);
    assert_eq!(
        reply.content_type.as_deref(),
        Some("application/json"),
        "{what}"
    );
    let body = reply.json();
    assert_eq!(body["error"], error, "{what}: {body}");
    assert_eq!(body["field"].as_str(), field, "{what}: {body}");
    assert!(
        body["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{what}: a message for people: {body}"
    );
    if error == "version_mismatch" {
        assert!(reply.etag.is_some(), "{what}: names the current version");
    } else {
        assert_eq!(reply.etag, None, "{what}: a refusal names no version");
    }
    assert_eq!(
        seen(world).await,
        before,
        "{what} was refused but changed something"
    );
    body
}

/// Sends `ask`, which must make one change: answered with `status` and the next version
/// as its `ETag`, which `/version` then says, with one audit entry of `ops` doing `action`
/// to `target`. Returns the reply and the audit entry.
async fn changed(
    world: &World,
    ask: &Ask,
    status: StatusCode,
    action: &str,
    target: &str,
) -> (Reply, Value) {
    let before = seen(world).await;
    let reply = ask.send(world).await;
    let what = format!("{} {}", ask.method, ask.path);
    assert_eq!(reply.status, status, "{what}: {}", reply.text);
    assert_eq!(
        reply.version(),
        before.version + 1,
        "{what}: the ETag is the next version"
    );
    let after = seen(world).await;
    assert_eq!(
        after.version,
        before.version + 1,
        "{what}: one change, one version"
    );
    assert_eq!(
        after.audit.len(),
        before.audit.len() + 1,
        "{what}: one audit entry"
    );
    assert_eq!(
        after.audit[1..],
        before.audit[..],
        "{what}: the log only grows"
    );
    let entry = after.audit[0].clone();
    assert_eq!(entry["actor"], "ops", "{entry}");
    assert_eq!(entry["action"], action, "{entry}");
    assert_eq!(entry["target"], target, "{entry}");
    assert_eq!(entry["version_before"], before.version, "{entry}");
    assert_eq!(entry["version_after"], before.version + 1, "{entry}");
    assert!(
        entry["at"]
            .as_str()
            .is_some_and(|at| sluice_controller::config::validate::rfc3339_ms("at", at).is_ok()),
        "{entry}"
    );
    (reply, entry)
}

/// The id the denylisted address of [`START`] has.
async fn start_entry_id(world: &World) -> String {
    let list = read(world, "/v1/admin/lists/denylist").await.json();
    list[0]["id"].as_str().expect("an id").to_owned()
}

/// Every route under /v1/admin but the OpenAPI document, as a request that succeeds with
/// the admin token on [`START`] (`entry` is the id of its denylisted address).
fn routes(entry: &str) -> Vec<Ask> {
    vec![
        Ask::get("/v1/admin/version"),
        Ask::get("/v1/admin/config"),
        Ask::get("/v1/admin/config?format=toml"),
        Ask::new("PUT", "/v1/admin/config").json(json!({ "rules": [] })),
        Ask::get("/v1/admin/rules"),
        Ask::new("POST", "/v1/admin/rules")
            .json(json!({ "name": "login", "limit": 5, "window": "1s" })),
        Ask::get("/v1/admin/rules/per-client"),
        Ask::new("PUT", "/v1/admin/rules/per-client")
            .json(json!({ "name": "per-client", "limit": 4, "window": "1m" })),
        Ask::new("DELETE", "/v1/admin/rules/per-client"),
        Ask::get("/v1/admin/tiers"),
        Ask::new("POST", "/v1/admin/tiers").json(json!({ "name": "gold", "limit": 50 })),
        Ask::get("/v1/admin/tiers/free"),
        Ask::new("PUT", "/v1/admin/tiers/free").json(json!({ "name": "free", "limit": 2 })),
        Ask::new("DELETE", "/v1/admin/tiers/free"),
        Ask::get("/v1/admin/api-keys"),
        Ask::new("POST", "/v1/admin/api-keys").json(json!({ "user": "globex" })),
        Ask::get(format!("/v1/admin/api-keys/{DIGEST}")),
        Ask::new("PUT", format!("/v1/admin/api-keys/{DIGEST}")).json(json!({ "user": "acme" })),
        Ask::new("DELETE", format!("/v1/admin/api-keys/{DIGEST}")),
        Ask::get("/v1/admin/lists/denylist"),
        Ask::get("/v1/admin/lists/safelist"),
        Ask::new("POST", "/v1/admin/lists/denylist")
            .json(json!({ "kind": "ip", "value": "203.0.113.9" })),
        Ask::get(format!("/v1/admin/lists/denylist/{entry}")),
        Ask::new("DELETE", format!("/v1/admin/lists/denylist/{entry}")),
        Ask::get("/v1/admin/counters?kind=ip&value=10.0.0.1"),
        Ask::new("DELETE", "/v1/admin/counters?all=true"),
        Ask::get("/v1/admin/state"),
        Ask::new("PUT", "/v1/admin/state").json(json!({ "state": "DEGRADED" })),
        Ask::get("/v1/admin/enforcement"),
        Ask::new("PUT", "/v1/admin/enforcement").json(json!({ "enforce": false })),
        Ask::get("/v1/admin/audit"),
        Ask::get("/v1/admin/whoami"),
    ]
}

// ----- tokens and roles --------------------------------------------------------------------

#[tokio::test]
async fn every_route_succeeds_with_the_admin_token() {
    // Each on a fresh controller: a delete must find what it deletes.
    let probe = world(START).await;
    let entry = start_entry_id(&probe).await;
    for ask in routes(&entry) {
        let world = world(START).await;
        let reply = ask.send(&world).await;
        assert!(
            reply.status.is_success(),
            "{} {}: {} {}",
            ask.method,
            ask.path,
            reply.status,
            reply.text
        );
        assert!(
            reply.etag.is_some(),
            "{} {} has an ETag",
            ask.method,
            ask.path
        );
    }
}

#[tokio::test]
async fn every_route_refuses_a_missing_or_wrong_token() {
    let world = world(START).await;
    let entry = start_entry_id(&world).await;
    let before = seen(&world).await;
    let authorizations = [
        None,
        Some(format!("Bearer {}", "wrong-token-0123456789")),
        Some(format!("Bearer {ADMIN_TOKEN}x")),
        Some("Bearer ".to_owned()),
        Some(format!("Basic {ADMIN_TOKEN}")),
        Some(ADMIN_TOKEN.to_owned()),
    ];
    for ask in routes(&entry) {
        for authorization in &authorizations {
            let mut request = Request::builder().method(ask.method).uri(&ask.path);
            if let Some(value) = authorization {
                request = request.header("authorization", value);
            }
            if ask.body.is_some() {
                request = request.header("content-type", "application/json");
            }
            let body = ask.body.clone().map_or_else(Body::empty, Body::from);
            let full = support::send(&world.admin, request.body(body).expect("request")).await;
            let what = format!("{} {} with {authorization:?}", ask.method, ask.path);
            assert_eq!(
                full.reply.status,
                StatusCode::UNAUTHORIZED,
                "{what}: {}",
                full.reply.text
            );
            // RFC 6750: a token that was given and is not valid says `invalid_token`.
            let given = authorization
                .as_deref()
                .is_some_and(|a| a.starts_with("Bearer ") && a.len() > 7);
            let expected = if given {
                "Bearer realm=\"sluice-admin\", error=\"invalid_token\""
            } else {
                "Bearer realm=\"sluice-admin\""
            };
            assert_eq!(
                full.headers
                    .get("www-authenticate")
                    .and_then(|v| v.to_str().ok()),
                Some(expected),
                "{what}"
            );
            let error = full.reply.json();
            assert_eq!(error["error"], "unauthorized", "{what}");
            assert!(error["message"].as_str().is_some_and(|m| !m.is_empty()));
        }
    }
    assert_eq!(
        seen(&world).await,
        before,
        "no refused call changed anything"
    );
}

#[tokio::test]
async fn the_read_token_reads_everything_and_changes_nothing() {
    let world = world(START).await;
    let entry = start_entry_id(&world).await;
    for ask in routes(&entry) {
        let ask = ask.token(READ);
        if ask.is_write() {
            let error = refused(&world, &ask, StatusCode::FORBIDDEN, "forbidden", None).await;
            assert!(
                error["message"]
                    .as_str()
                    .unwrap_or_default()
                    .contains("viewer"),
                "names the token: {error}"
            );
        } else {
            let reply = ask.send(&world).await;
            assert_eq!(
                reply.status,
                StatusCode::OK,
                "GET {}: {}",
                ask.path,
                reply.text
            );
            assert_eq!(reply.version(), 1, "GET {}", ask.path);
        }
    }
    // The role is checked before anything else: a change to nothing is still forbidden.
    for ask in [
        Ask::new("DELETE", "/v1/admin/rules/nothing"),
        Ask::new("POST", "/v1/admin/lists/graylist").text("not json"),
        Ask::new("PUT", "/v1/admin/config").text("not json"),
    ] {
        refused(
            &world,
            &ask.token(READ),
            StatusCode::FORBIDDEN,
            "forbidden",
            None,
        )
        .await;
    }
}

#[tokio::test]
async fn whoami_names_the_token_and_its_role() {
    let world = world(START).await;
    let reply = read(&world, "/v1/admin/whoami").await;
    assert_eq!(reply.json(), json!({ "name": "ops", "role": "admin" }));
    assert_eq!(reply.version(), 1);
    let reply = Ask::get("/v1/admin/whoami").token(READ).send(&world).await;
    assert_eq!(reply.json(), json!({ "name": "viewer", "role": "read" }));
}

#[tokio::test]
async fn the_version_is_the_etag_of_every_read() {
    let world = world("").await;
    let reply = read(&world, "/v1/admin/version").await;
    assert_eq!(reply.json(), json!({ "version": 0 }), "nothing stored yet");
    assert_eq!(reply.etag.as_deref(), Some("\"0\""));
    let world = support::world(START).await;
    let reply = read(&world, "/v1/admin/version").await;
    assert_eq!(reply.json(), json!({ "version": 1 }), "the file, stored");
    assert_eq!(reply.etag.as_deref(), Some("\"1\""));
}

// ----- rules and tiers ---------------------------------------------------------------------

#[tokio::test]
async fn rules_are_listed_created_read_replaced_and_deleted() {
    let world = world(START).await;
    let list = read(&world, "/v1/admin/rules").await;
    assert_eq!(list.version(), 1);
    same_as::<Vec<Rule>>(
        &list.json(),
        &json!([
            { "name": "per-client", "limit": 3, "window": "1m" },
            { "name": "tiered", "strategy": "sliding_window_log", "limit": 2, "window": "1m",
              "tier_limits": true, "match": { "path_prefix": "/api/" } },
        ]),
    );
    let one = read(&world, "/v1/admin/rules/tiered").await;
    assert_eq!(one.json(), list.json()[1]);
    assert_eq!(one.version(), 1);

    let login = json!({ "name": "login", "scope": "global", "limit": 5, "window": "1s",
                        "failure_mode": "deny", "match": { "path": "/login", "methods": ["POST"] } });
    let (reply, entry) = changed(
        &world,
        &Ask::new("POST", "/v1/admin/rules").json(login.clone()),
        StatusCode::CREATED,
        "rule.create",
        "login",
    )
    .await;
    let stored = reply.json();
    same_as::<Rule>(&stored, &login);
    assert_eq!(entry["change"], stored, "the audit log holds the rule");
    assert_eq!(read(&world, "/v1/admin/rules/login").await.json(), stored);
    let names: Vec<Value> = read(&world, "/v1/admin/rules")
        .await
        .json()
        .as_array()
        .unwrap()
        .iter()
        .map(|rule| rule["name"].clone())
        .collect();
    assert_eq!(
        names,
        ["per-client", "tiered", "login"],
        "a new rule comes last"
    );

    let replacement = json!({ "name": "login", "limit": 10, "window": "1m" });
    let (reply, entry) = changed(
        &world,
        &Ask::new("PUT", "/v1/admin/rules/login").json(replacement.clone()),
        StatusCode::OK,
        "rule.update",
        "login",
    )
    .await;
    let replaced = reply.json();
    same_as::<Rule>(&replaced, &replacement); // the whole rule: scope, match… are gone
    assert_eq!(entry["change"], replaced);
    assert_eq!(read(&world, "/v1/admin/rules/login").await.json(), replaced);
    let names: Vec<Value> = read(&world, "/v1/admin/rules")
        .await
        .json()
        .as_array()
        .unwrap()
        .iter()
        .map(|rule| rule["name"].clone())
        .collect();
    assert_eq!(
        names,
        ["per-client", "tiered", "login"],
        "a replaced rule keeps its place"
    );

    let (reply, _) = changed(
        &world,
        &Ask::new("DELETE", "/v1/admin/rules/login"),
        StatusCode::OK,
        "rule.delete",
        "login",
    )
    .await;
    assert_eq!(reply.json(), json!({ "deleted": "login" }));
    refused(
        &world,
        &Ask::get("/v1/admin/rules/login"),
        StatusCode::NOT_FOUND,
        "not_found",
        None,
    )
    .await;
}

#[tokio::test]
async fn tiers_are_listed_created_read_replaced_and_deleted() {
    let world = world(START).await;
    let list = read(&world, "/v1/admin/tiers").await;
    assert_eq!(list.version(), 1);
    same_as::<Vec<Tier>>(
        &list.json(),
        &json!([{ "name": "pro", "limit": 5 }, { "name": "free", "limit": 1 }]),
    );
    assert_eq!(
        read(&world, "/v1/admin/tiers/free").await.json(),
        list.json()[1]
    );

    let gold = json!({ "name": "gold", "limit": 50, "window": "30s",
                       "description": "for the biggest customers" });
    let (reply, entry) = changed(
        &world,
        &Ask::new("POST", "/v1/admin/tiers").json(gold.clone()),
        StatusCode::CREATED,
        "tier.create",
        "gold",
    )
    .await;
    let stored = reply.json();
    same_as::<Tier>(&stored, &gold);
    assert_eq!(entry["change"], stored);
    assert_eq!(read(&world, "/v1/admin/tiers/gold").await.json(), stored);

    let (reply, _) = changed(
        &world,
        &Ask::new("PUT", "/v1/admin/tiers/gold").json(json!({ "name": "gold", "limit": 80 })),
        StatusCode::OK,
        "tier.update",
        "gold",
    )
    .await;
    same_as::<Tier>(&reply.json(), &json!({ "name": "gold", "limit": 80 }));
    assert_eq!(
        read(&world, "/v1/admin/tiers/gold").await.json(),
        reply.json()
    );

    let (reply, _) = changed(
        &world,
        &Ask::new("DELETE", "/v1/admin/tiers/gold"),
        StatusCode::OK,
        "tier.delete",
        "gold",
    )
    .await;
    assert_eq!(reply.json(), json!({ "deleted": "gold" }));
    refused(
        &world,
        &Ask::get("/v1/admin/tiers/gold"),
        StatusCode::NOT_FOUND,
        "not_found",
        None,
    )
    .await;
}

// ----- API keys ----------------------------------------------------------------------------

#[tokio::test]
async fn a_key_the_controller_makes_is_shown_once_and_stored_by_its_digest() {
    let world = world(START).await;
    let ask = Ask::new("POST", "/v1/admin/api-keys")
        .json(json!({ "user": "globex", "tier": "free", "name": "globex ci" }));
    let before = seen(&world).await;
    let reply = ask.send(&world).await;
    assert_eq!(reply.status, StatusCode::CREATED, "{}", reply.text);
    let body = reply.json();
    let key = body["key"].as_str().expect("the key, this once").to_owned();
    assert!(key.starts_with("sk_") && key.len() == 67, "{key}");
    let digest = sha256_hex(&key);
    let record = &body["api_key"];
    assert_eq!(record["sha256"], digest, "stored by the SHA-256 of the key");
    assert_eq!(record["user"], "globex");
    assert_eq!(record["tier"], "free");
    assert_eq!(record["name"], "globex ci");
    assert!(record["created_at"].is_string(), "{record}");
    assert_eq!(reply.version(), before.version + 1);

    let after = seen(&world).await;
    assert_eq!(after.version, before.version + 1);
    let entry = &after.audit[0];
    assert_eq!(
        (&entry["actor"], &entry["action"], &entry["target"]),
        (&json!("ops"), &json!("api_key.create"), &json!(digest))
    );
    assert_eq!(
        entry["change"], *record,
        "the audit log holds the record, not the key"
    );

    // Never again: not in a listing, a read, an export, the audit log.
    let mut shown = vec![
        read(&world, "/v1/admin/api-keys").await.text,
        read(&world, &format!("/v1/admin/api-keys/{digest}"))
            .await
            .text,
        read(&world, "/v1/admin/audit").await.text,
    ];
    for format in ["json", "toml", "yaml"] {
        shown.push(
            read(&world, &format!("/v1/admin/config?format={format}"))
                .await
                .text,
        );
    }
    for text in &shown {
        assert!(!text.contains(&key), "the key shows again: {text}");
        assert!(!text.contains("\"key\""), "{text}");
    }
    let listed = read(&world, "/v1/admin/api-keys").await.json();
    assert_eq!(listed.as_array().map(Vec::len), Some(2));
    assert_eq!(listed[1], *record);
    assert_eq!(
        read(&world, &format!("/v1/admin/api-keys/{digest}"))
            .await
            .json(),
        *record
    );

    // A second key is another key.
    let again = ask.send(&world).await.json();
    assert_ne!(again["key"], body["key"]);
}

#[tokio::test]
async fn a_key_made_elsewhere_is_registered_by_its_digest_then_changed_and_deleted() {
    let world = world(START).await;
    let (reply, _) = changed(
        &world,
        &Ask::new("POST", "/v1/admin/api-keys")
            .json(json!({ "sha256": OTHER_DIGEST.to_ascii_uppercase(), "user": "initech" })),
        StatusCode::CREATED,
        "api_key.create",
        OTHER_DIGEST,
    )
    .await;
    let body = reply.json();
    assert!(body.get("key").is_none(), "no key to show: {body}");
    assert_eq!(body["api_key"]["sha256"], OTHER_DIGEST, "in lower case");
    assert_eq!(body["api_key"]["user"], "initech");
    let created_at = body["api_key"]["created_at"].clone();
    assert!(created_at.is_string());
    let upper = format!("/v1/admin/api-keys/{}", OTHER_DIGEST.to_ascii_uppercase());
    assert_eq!(
        read(&world, &upper).await.json(),
        body["api_key"],
        "found in any case"
    );

    let (reply, entry) = changed(
        &world,
        &Ask::new("PUT", format!("/v1/admin/api-keys/{OTHER_DIGEST}"))
            .json(json!({ "user": "initech-2", "tier": "pro", "name": "initech" })),
        StatusCode::OK,
        "api_key.update",
        OTHER_DIGEST,
    )
    .await;
    let updated = json!({ "sha256": OTHER_DIGEST, "user": "initech-2", "tier": "pro",
                          "name": "initech", "created_at": created_at });
    assert_eq!(
        reply.json(),
        updated,
        "whom it stands for changes, not when it was made"
    );
    assert_eq!(entry["change"], updated);
    assert_eq!(read(&world, &upper).await.json(), updated);

    let (reply, _) = changed(
        &world,
        &Ask::new("DELETE", upper.clone()),
        StatusCode::OK,
        "api_key.delete",
        OTHER_DIGEST,
    )
    .await;
    assert_eq!(reply.json(), json!({ "deleted": OTHER_DIGEST }));
    refused(
        &world,
        &Ask::get(upper),
        StatusCode::NOT_FOUND,
        "not_found",
        None,
    )
    .await;
    let listed = read(&world, "/v1/admin/api-keys").await.json();
    assert_eq!(
        listed.as_array().map(Vec::len),
        Some(1),
        "the key of START is left"
    );
    assert_eq!(listed[0]["sha256"], DIGEST);
}

// ----- lists -------------------------------------------------------------------------------

#[tokio::test]
async fn list_entries_are_added_read_and_removed_by_id() {
    let world = world(START).await;
    let start = read(&world, "/v1/admin/lists/denylist").await;
    assert_eq!(start.version(), 1);
    let start = start.json();
    assert_eq!(start.as_array().map(Vec::len), Some(1));
    assert_eq!(start[0]["list"], "denylist");
    assert_eq!(
        start[0]["entry"],
        json!({ "kind": "ip", "value": "192.0.2.66/32", "reason": "abuse" }),
        "written the one way it is matched"
    );
    assert_eq!(
        read(&world, "/v1/admin/lists/safelist").await.json(),
        json!([])
    );

    let (reply, entry) = changed(
        &world,
        &Ask::new("POST", "/v1/admin/lists/safelist")
            .json(json!({ "kind": "ip", "value": "10.1.2.3/8", "reason": "office" })),
        StatusCode::CREATED,
        "list.add",
        // The target is the entry's id, the same wherever the entry is made.
        &id_elsewhere("safelist", json!({ "kind": "ip", "value": "10.0.0.0/8" })).await,
    )
    .await;
    let office = reply.json();
    let id = office["id"].as_str().expect("an id").to_owned();
    assert_eq!(office["list"], "safelist");
    assert_eq!(office["entry"]["kind"], "ip");
    assert_eq!(
        office["entry"]["value"], "10.0.0.0/8",
        "the network, not an address in it"
    );
    assert_eq!(office["entry"]["reason"], "office");
    assert!(office["entry"]["created_at"].is_string());
    assert!(office["entry"].get("expires_at").is_none());
    assert_eq!(entry["change"]["entry"], office["entry"]);
    assert_eq!(
        read(&world, &format!("/v1/admin/lists/safelist/{id}"))
            .await
            .json(),
        office
    );
    assert_eq!(
        read(&world, "/v1/admin/lists/safelist").await.json(),
        json!([office])
    );

    // The same value in the other list is another entry, with another id.
    let (reply, _) = changed(
        &world,
        &Ask::new("POST", "/v1/admin/lists/denylist")
            .json(json!({ "kind": "ip", "value": "10.0.0.0/8" })),
        StatusCode::CREATED,
        "list.add",
        &id_elsewhere("denylist", json!({ "kind": "ip", "value": "10.0.0.0/8" })).await,
    )
    .await;
    assert_ne!(reply.json()["id"], office["id"]);

    let (reply, _) = changed(
        &world,
        &Ask::new("DELETE", format!("/v1/admin/lists/safelist/{id}")),
        StatusCode::OK,
        "list.remove",
        &id,
    )
    .await;
    assert_eq!(reply.json(), json!({ "removed": id }));
    refused(
        &world,
        &Ask::get(format!("/v1/admin/lists/safelist/{id}")),
        StatusCode::NOT_FOUND,
        "not_found",
        None,
    )
    .await;
    assert_eq!(
        read(&world, "/v1/admin/lists/safelist").await.json(),
        json!([])
    );
    assert_eq!(
        read(&world, "/v1/admin/lists/denylist")
            .await
            .json()
            .as_array()
            .map(Vec::len),
        Some(2)
    );
}

/// The id `entry` gets in `list` of another controller: an entry's id comes from its list,
/// kind and value, whoever made it.
async fn id_elsewhere(list: &str, entry: Value) -> String {
    let elsewhere = world("").await;
    let reply = Ask::new("POST", format!("/v1/admin/lists/{list}"))
        .json(entry)
        .send(&elsewhere)
        .await;
    assert_eq!(reply.status, StatusCode::CREATED, "{}", reply.text);
    reply.json()["id"].as_str().expect("an id").to_owned()
}

#[tokio::test]
async fn list_entries_of_every_kind_are_written_the_one_way_they_are_matched() {
    let world = world(START).await;
    let added = |kind: &str, value: &str| {
        Ask::new("POST", "/v1/admin/lists/denylist").json(json!({ "kind": kind, "value": value }))
    };
    let cases = [
        ("ip", "2001:db8::1/64", "2001:db8::/64"),
        ("ip", " 198.51.100.7 ", "198.51.100.7/32"),
        ("user", " mallory ", "mallory"),
        (
            "api_key",
            &format!("sha256:{}", OTHER_DIGEST.to_ascii_uppercase()),
            OTHER_DIGEST,
        ),
        ("path", "/admin/**", "/admin/**"),
    ];
    for (kind, value, stored) in cases {
        let reply = added(kind, value).send(&world).await;
        assert_eq!(
            reply.status,
            StatusCode::CREATED,
            "{kind} {value}: {}",
            reply.text
        );
        assert_eq!(reply.json()["entry"]["value"], stored, "{kind} {value}");
        // Written another way, it is the same entry.
        refused(
            &world,
            &added(kind, stored),
            StatusCode::CONFLICT,
            "conflict",
            None,
        )
        .await;
    }
}

#[tokio::test]
async fn list_entries_expire_at_a_time_or_after_a_while() {
    let world = world(START).await;
    let reply = Ask::new("POST", "/v1/admin/lists/denylist")
        .json(json!({ "kind": "user", "value": "mallory", "expires_at": "2030-01-01T00:00:00Z" }))
        .send(&world)
        .await;
    assert_eq!(reply.status, StatusCode::CREATED, "{}", reply.text);
    assert_eq!(reply.json()["entry"]["expires_at"], "2030-01-01T00:00:00Z");

    let now_ms = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64
    };
    let before = now_ms();
    let reply = Ask::new("POST", "/v1/admin/lists/denylist")
        .json(json!({ "kind": "user", "value": "trudy", "expires_in": "1h" }))
        .send(&world)
        .await;
    let after = now_ms();
    assert_eq!(reply.status, StatusCode::CREATED, "{}", reply.text);
    let at = reply.json()["entry"]["expires_at"]
        .as_str()
        .expect("an expiry")
        .to_owned();
    let at = sluice_controller::config::validate::rfc3339_ms("expires_at", &at).unwrap();
    // Written in whole seconds.
    assert!(
        (before + 3_600_000).saturating_sub(1_000) <= at && at <= after + 3_600_000,
        "{before} + 1h <= {at} <= {after} + 1h"
    );
}

// ----- state, audit ------------------------------------------------------------------------

#[tokio::test]
async fn the_state_is_read_and_set_as_a_change() {
    let world = world(START).await;
    let reply = read(&world, "/v1/admin/state").await;
    assert_eq!(
        reply.json(),
        json!({ "state": "NORMAL", "automatic": true, "enforce": true })
    );
    assert_eq!(reply.version(), 1);
    let document = seen(&world).await.export;
    let (reply, entry) = changed(
        &world,
        &Ask::new("PUT", "/v1/admin/state").json(json!({ "state": "DEGRADED" })),
        StatusCode::OK,
        "state.set",
        "DEGRADED",
    )
    .await;
    let body = reply.json();
    assert_eq!(body["state"], "DEGRADED");
    assert_eq!(body["automatic"], false, "set by hand: pinned");
    let since = body["state_since"].as_str().expect("since when");
    assert!(sluice_controller::config::validate::rfc3339_ms("since", since).is_ok());
    assert_eq!(
        entry["change"],
        json!({ "from": "NORMAL", "to": "DEGRADED", "automatic": false })
    );
    let reply = read(&world, "/v1/admin/state").await;
    assert_eq!(reply.json(), body);
    assert_eq!(reply.version(), 2);
    assert_eq!(
        seen(&world).await.export,
        document,
        "the state is not the document"
    );
    let (reply, _) = changed(
        &world,
        &Ask::new("PUT", "/v1/admin/state").json(json!({ "automatic": true })),
        StatusCode::OK,
        "state.set",
        "automatic",
    )
    .await;
    let handed_back = reply.json();
    assert_eq!(
        handed_back["state"], "DEGRADED",
        "the state stays until the signal moves it"
    );
    assert_eq!(handed_back["automatic"], true);
    assert_eq!(
        handed_back["state_since"], body["state_since"],
        "no change of state"
    );
    changed(
        &world,
        &Ask::new("PUT", "/v1/admin/state").json(json!({ "state": "NORMAL" })),
        StatusCode::OK,
        "state.set",
        "NORMAL",
    )
    .await;
    refused(
        &world,
        &Ask::new("PUT", "/v1/admin/state").json(json!({})),
        StatusCode::BAD_REQUEST,
        "invalid_request",
        Some("state"),
    )
    .await;
}

#[tokio::test]
async fn the_audit_log_is_newest_first_and_limited_on_request() {
    let world = world(START).await;
    for limit in [4, 5] {
        Ask::new("PUT", "/v1/admin/tiers/free")
            .json(json!({ "name": "free", "limit": limit }))
            .send(&world)
            .await;
    }
    let all = read(&world, "/v1/admin/audit").await;
    assert_eq!(all.version(), 3);
    let entries = all.json()["entries"].as_array().cloned().unwrap();
    let versions: Vec<(u64, u64)> = entries
        .iter()
        .map(|e| {
            (
                e["version_before"].as_u64().unwrap(),
                e["version_after"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(versions, [(2, 3), (1, 2), (0, 1)]);
    assert_eq!(
        entries[2]["actor"], "bootstrap",
        "the file the controller started from"
    );
    assert_eq!(entries[2]["action"], "config.import");
    assert_eq!(entries[0]["change"], json!({ "name": "free", "limit": 5 }));
    let newest = read(&world, "/v1/admin/audit?limit=1").await.json();
    assert_eq!(newest["entries"], json!([entries[0]]));
}

/// A body that names a field twice is refused naming that field, like every other refusal.
#[tokio::test]
async fn a_field_given_twice_is_named() {
    let world = world(START).await;
    let ask = Ask::new("POST", "/v1/admin/tiers")
        .text(r#"{"name":"gold","name":"silver","limit":5}"#)
        .header("content-type", "application/json");
    let error = refused(
        &world,
        &ask,
        StatusCode::BAD_REQUEST,
        "invalid_request",
        Some("name"),
    )
    .await;
    assert!(
        error["message"]
            .as_str()
            .unwrap_or_default()
            .contains("duplicate"),
        "{error}"
    );
}

// ----- If-Match ----------------------------------------------------------------------------

#[tokio::test]
async fn a_change_made_from_an_old_version_is_refused_and_one_from_the_current_applies() {
    let probe = world(START).await;
    let entry = start_entry_id(&probe).await;
    let writes: Vec<Ask> = routes(&entry)
        .into_iter()
        .filter(|ask| ask.is_write() && !ask.path.contains("/counters"))
        .collect();
    assert_eq!(writes.len(), 14, "every change of the configuration");
    for ask in writes {
        let world = world(START).await;
        // Someone else changes something first: version 2.
        Ask::new("PUT", "/v1/admin/tiers/pro")
            .json(json!({ "name": "pro", "limit": 6 }))
            .send(&world)
            .await;
        let error = refused(
            &world,
            &ask.clone().if_match(1),
            StatusCode::CONFLICT,
            "version_mismatch",
            Some("If-Match"),
        )
        .await;
        assert!(
            error["message"]
                .as_str()
                .unwrap_or_default()
                .contains("version 2"),
            "says the current version: {error}"
        );
        // And names it as its ETag: the client can retry without reading it again.
        let stale = ask.clone().if_match(1).send(&world).await;
        assert_eq!(stale.status, StatusCode::CONFLICT);
        assert_eq!(stale.version(), 2, "{} {}", ask.method, ask.path);
        let reply = ask.clone().if_match(2).send(&world).await;
        assert!(
            reply.status.is_success(),
            "{} {}: {}",
            ask.method,
            ask.path,
            reply.text
        );
        assert_eq!(reply.version(), 3, "{} {}", ask.method, ask.path);
    }
}

#[tokio::test]
async fn if_match_takes_a_strong_or_weak_tag_or_a_star_and_nothing_else() {
    let world = world(START).await;
    let tier = |limit: u64| {
        Ask::new("PUT", "/v1/admin/tiers/free").json(json!({ "name": "free", "limit": limit }))
    };
    for (tag, version) in [("*", 2), ("W/\"2\"", 3), ("3", 4), (" \"4\" ", 5)] {
        let reply = tier(version).header("if-match", tag).send(&world).await;
        assert_eq!(
            reply.status,
            StatusCode::OK,
            "If-Match: {tag}: {}",
            reply.text
        );
        assert_eq!(reply.version(), version, "If-Match: {tag}");
    }
    for tag in ["abc", "\"5\", \"6\"", "-1", ""] {
        refused(
            &world,
            &tier(9).header("if-match", tag),
            StatusCode::BAD_REQUEST,
            "invalid_request",
            Some("If-Match"),
        )
        .await;
    }
}

// ----- bad requests ------------------------------------------------------------------------

#[tokio::test]
async fn bad_bodies_are_refused_naming_the_field() {
    let world = world(START).await;
    let rule = |body: Value| Ask::new("POST", "/v1/admin/rules").json(body);
    let tier = |body: Value| Ask::new("POST", "/v1/admin/tiers").json(body);
    let key = |body: Value| Ask::new("POST", "/v1/admin/api-keys").json(body);
    let entry = |body: Value| Ask::new("POST", "/v1/admin/lists/denylist").json(body);
    let cases: Vec<(Ask, Option<&str>)> = vec![
        // Rules.
        (
            rule(json!({ "name": "b", "limit": 1, "window": "1s", "bogus": 1 })),
            Some("bogus"),
        ),
        (
            rule(json!({ "name": "b", "limit": "1", "window": "1s" })),
            Some("limit"),
        ),
        (
            rule(json!({ "name": "b", "limit": -1, "window": "1s" })),
            Some("limit"),
        ),
        (rule(json!({ "limit": 1, "window": "1s" })), Some("name")),
        (rule(json!({ "name": "b", "window": "1s" })), Some("limit")),
        (rule(json!({ "name": "b", "limit": 1 })), Some("window")),
        (
            rule(json!({ "name": "b", "limit": 1, "window": "1x" })),
            Some("window"),
        ),
        (
            rule(json!({ "name": "b", "limit": 1, "window": 60 })),
            Some("window"),
        ),
        (
            rule(json!({ "name": "b c", "limit": 1, "window": "1s" })),
            Some("name"),
        ),
        (
            rule(json!({ "name": "b", "limit": 1, "window": "1s", "burst": 2 })),
            Some("burst"),
        ),
        (
            rule(json!({ "name": "b", "limit": 9, "window": "1s",
                         "usage": { "response_header": "x used", "reserve": 1 } })),
            Some("usage.response_header"),
        ),
        (
            rule(json!({ "name": "b", "limit": 9, "window": "1s",
                         "usage": { "json_pointer": "/t", "reserve": 1, "max": 5, "unreported": 6 } })),
            Some("usage.unreported"),
        ),
        (
            rule(json!({ "name": "b", "limit": 9, "window": "1s",
                         "usage": { "json_pointer": "/t", "reserve": 1, "estimate": 6 } })),
            Some("usage.estimate"),
        ),
        (
            rule(json!({ "name": "b", "limit": 1, "window": "1s", "strategy": "magic" })),
            Some("strategy"),
        ),
        (
            rule(json!({ "name": "b", "limit": 1, "window": "1s", "match": { "verb": "GET" } })),
            Some("match.verb"),
        ),
        (
            rule(json!({ "name": "b", "limit": 1, "window": "1s", "match": { "path": "x" } })),
            Some("match.path"),
        ),
        (
            rule(
                json!({ "name": "b", "limit": 1, "window": "1s", "match": { "tiers": ["gold"] } }),
            ),
            Some("match.tiers[0]"),
        ),
        (
            rule(json!({ "name": "b", "limit": 1, "window": "1s",
                      "match": { "headers": [{ "name": "x-a" }, { "name": "x b" }] } })),
            Some("match.headers[1].name"),
        ),
        (rule(json!([])), None),
        (
            Ask::new("POST", "/v1/admin/rules").text("{\"name\": "),
            Some("name"),
        ),
        (Ask::new("POST", "/v1/admin/rules"), None),
        // A rule that counts by tier must fit every tier: 5 (`pro`) × the window is too large.
        (
            rule(
                json!({ "name": "b", "strategy": "sliding_window_counter", "limit": 1,
                      "window": "50000000d", "tier_limits": true }),
            ),
            Some("tiers[0].limit"),
        ),
        (
            Ask::new("PUT", "/v1/admin/rules/per-client")
                .json(json!({ "name": "other", "limit": 1, "window": "1s" })),
            Some("name"),
        ),
        (
            Ask::new("PUT", "/v1/admin/rules/per-client")
                .json(json!({ "name": "per-client", "limit": 1 })),
            Some("window"),
        ),
        (
            Ask::new("PUT", "/v1/admin/rules/tiered").json(
                json!({ "name": "tiered", "strategy": "concurrency", "limit": 1,
                          "window": "1s" }),
            ),
            Some("window"),
        ),
        // Tiers, among them one whose limits do not fit the rule that counts by tier.
        (
            tier(json!({ "name": "gold tier", "limit": 1 })),
            Some("name"),
        ),
        (tier(json!({ "name": "gold" })), Some("limit")),
        (
            tier(json!({ "name": "gold", "limit": 1, "rate": 2 })),
            Some("rate"),
        ),
        (
            tier(json!({ "name": "gold", "limit": 1, "burst": 0 })),
            Some("burst"),
        ),
        (
            tier(json!({ "name": "gold", "limit": 1, "window": "0s" })),
            Some("window"),
        ),
        (
            tier(json!({ "name": "gold", "limit": 200_000 })),
            Some("limit"),
        ),
        (
            Ask::new("PUT", "/v1/admin/tiers/pro").json(json!({ "name": "pro", "limit": 100_001 })),
            Some("limit"),
        ),
        (
            Ask::new("PUT", "/v1/admin/tiers/pro").json(json!({ "name": "gold", "limit": 1 })),
            Some("name"),
        ),
        // A tier a key belongs to cannot go: the error names the key.
        (
            Ask::new("DELETE", "/v1/admin/tiers/pro"),
            Some("api_keys[0].tier"),
        ),
        // API keys.
        (key(json!({ "sha256": "abc" })), Some("sha256")),
        (
            key(json!({ "sha256": format!("{}zz", &OTHER_DIGEST[..62]) })),
            Some("sha256"),
        ),
        (
            key(json!({ "sha256": "the-api-key-itself" })),
            Some("sha256"),
        ),
        (key(json!({ "tier": "gold" })), Some("tier")),
        (key(json!({ "user": "" })), Some("user")),
        (key(json!({ "name": "a\u{7}b" })), Some("name")),
        (key(json!({ "owner": "acme" })), Some("owner")),
        (key(json!({ "user": 7 })), Some("user")),
        (
            Ask::new("PUT", format!("/v1/admin/api-keys/{DIGEST}")).json(json!({ "tier": "gold" })),
            Some("tier"),
        ),
        (
            Ask::new("PUT", format!("/v1/admin/api-keys/{DIGEST}"))
                .json(json!({ "sha256": OTHER_DIGEST })),
            Some("sha256"),
        ),
        // List entries.
        (
            entry(json!({ "kind": "ip", "value": "10.0.0.300" })),
            Some("value"),
        ),
        (
            entry(json!({ "kind": "ip", "value": "10.0.0.0/33" })),
            Some("value"),
        ),
        (
            entry(
                json!({ "kind": "ip", "value": "10.0.0.1", "expires_at": "2030-01-01T00:00:00Z",
                       "expires_in": "1h" }),
            ),
            Some("expires_in"),
        ),
        (
            entry(json!({ "kind": "ip", "value": "10.0.0.1", "expires_in": "soon" })),
            Some("expires_in"),
        ),
        (
            entry(json!({ "kind": "ip", "value": "10.0.0.1", "expires_in": "0s" })),
            Some("expires_in"),
        ),
        (
            entry(json!({ "kind": "ip", "value": "10.0.0.1", "expires_in": "1w" })),
            Some("expires_in"),
        ),
        (
            entry(json!({ "kind": "ip", "value": "10.0.0.1", "expires_at": "tomorrow" })),
            Some("expires_at"),
        ),
        (
            entry(json!({ "kind": "ip", "value": "10.0.0.1", "reason": "x".repeat(257) })),
            Some("reason"),
        ),
        (
            entry(
                json!({ "kind": "ip", "value": "10.0.0.1", "created_at": "2026-01-01T00:00:00Z" }),
            ),
            Some("created_at"),
        ),
        (
            entry(json!({ "kind": "country", "value": "xx" })),
            Some("kind"),
        ),
        (entry(json!({ "kind": "ip" })), Some("value")),
        (
            entry(json!({ "kind": "user", "value": " " })),
            Some("value"),
        ),
        (
            entry(json!({ "kind": "api_key", "value": "sk_live_0123" })),
            Some("value"),
        ),
        (
            entry(json!({ "kind": "path", "value": "admin/**" })),
            Some("value"),
        ),
        // State.
        (
            Ask::new("PUT", "/v1/admin/state").json(json!({ "state": "broken" })),
            Some("state"),
        ),
        (
            Ask::new("PUT", "/v1/admin/state").json(json!({})),
            Some("state"),
        ),
        (
            Ask::new("PUT", "/v1/admin/state").json(json!({ "state": "NORMAL", "why": "x" })),
            Some("why"),
        ),
        // Counters, export, import.
        (Ask::new("DELETE", "/v1/admin/counters"), Some("kind")),
        (
            Ask::new("DELETE", "/v1/admin/counters?kind=ip"),
            Some("value"),
        ),
        (
            Ask::new("DELETE", "/v1/admin/counters?value=10.0.0.1"),
            Some("kind"),
        ),
        (
            Ask::new("DELETE", "/v1/admin/counters?kind=planet&value=x"),
            Some("kind"),
        ),
        (
            Ask::new("DELETE", "/v1/admin/counters?kind=ip&value="),
            Some("value"),
        ),
        (
            Ask::new(
                "DELETE",
                "/v1/admin/counters?all=true&kind=ip&value=10.0.0.1",
            ),
            Some("all"),
        ),
        (
            Ask::new("DELETE", "/v1/admin/counters?all=true&rule=per-client"),
            Some("all"),
        ),
        (Ask::get("/v1/admin/counters"), Some("kind")),
        (Ask::get("/v1/admin/counters?kind=ip"), Some("value")),
        (
            Ask::get("/v1/admin/counters?kind=planet&value=x"),
            Some("kind"),
        ),
        (Ask::get("/v1/admin/config?format=xml"), Some("format")),
        (
            Ask::new("PUT", "/v1/admin/config")
                .header("content-type", "text/plain")
                .text("rules = []"),
            Some("Content-Type"),
        ),
        (
            Ask::new("PUT", "/v1/admin/config").json(json!({ "rulez": [] })),
            Some("rulez"),
        ),
    ];
    for (ask, field) in cases {
        refused(
            &world,
            &ask,
            StatusCode::BAD_REQUEST,
            "invalid_request",
            field,
        )
        .await;
    }
}

/// An error about a tier's fit with a rule says which rule, and a rule that counts by tier
/// and does not fit a tier names that tier.
#[tokio::test]
async fn a_tier_that_does_not_fit_a_rule_that_counts_by_tier_is_named() {
    let world = world(START).await;
    let error = refused(
        &world,
        &Ask::new("POST", "/v1/admin/tiers").json(json!({ "name": "gold", "limit": 200_000 })),
        StatusCode::BAD_REQUEST,
        "invalid_request",
        Some("limit"),
    )
    .await;
    assert_eq!(
        error["message"],
        "sliding_window_log keeps one entry per request: at most 100000 (in rule `tiered`)"
    );
    let error = refused(
        &world,
        &Ask::new("POST", "/v1/admin/rules").json(json!({
            "name": "smooth", "strategy": "sliding_window_counter", "limit": 1,
            "window": "50000000d", "tier_limits": true })),
        StatusCode::BAD_REQUEST,
        "invalid_request",
        Some("tiers[0].limit"),
    )
    .await;
    assert_eq!(
        error["message"],
        "too large for exact arithmetic with this window: limit × the other factor must stay \
         below 2^53 (in rule `smooth`)"
    );
}

#[tokio::test]
async fn missing_entities_are_not_found() {
    let world = world(START).await;
    let missing_key = format!("/v1/admin/api-keys/{OTHER_DIGEST}");
    let cases = [
        Ask::get("/v1/admin/rules/nothing"),
        Ask::new("PUT", "/v1/admin/rules/nothing")
            .json(json!({ "name": "nothing", "limit": 1, "window": "1s" })),
        Ask::new("DELETE", "/v1/admin/rules/nothing"),
        Ask::get("/v1/admin/tiers/gold"),
        Ask::new("PUT", "/v1/admin/tiers/gold").json(json!({ "name": "gold", "limit": 1 })),
        Ask::new("DELETE", "/v1/admin/tiers/gold"),
        Ask::get(missing_key.clone()),
        Ask::new("PUT", missing_key.clone()).json(json!({ "user": "x" })),
        Ask::new("DELETE", missing_key),
        Ask::get("/v1/admin/api-keys/not-a-digest"),
        Ask::get("/v1/admin/lists/denylist/0123456789abcdef"),
        Ask::new("DELETE", "/v1/admin/lists/denylist/0123456789abcdef"),
        Ask::get("/v1/admin/lists/graylist"),
        Ask::get("/v1/admin/lists/graylist/0123456789abcdef"),
        Ask::new("POST", "/v1/admin/lists/graylist")
            .json(json!({ "kind": "ip", "value": "10.0.0.1" })),
        Ask::new("DELETE", "/v1/admin/lists/graylist/0123456789abcdef"),
        Ask::get("/v1/admin/counters?kind=ip&value=10.0.0.1&rule=nothing"),
        Ask::new(
            "DELETE",
            "/v1/admin/counters?kind=ip&value=10.0.0.1&rule=nothing",
        ),
        Ask::new("DELETE", "/v1/admin/counters?rule=nothing"),
    ];
    for ask in cases {
        let error = refused(&world, &ask, StatusCode::NOT_FOUND, "not_found", None).await;
        assert!(
            error["message"]
                .as_str()
                .unwrap_or_default()
                .contains("no "),
            "{error}"
        );
    }
}

#[tokio::test]
async fn creating_what_exists_is_a_conflict() {
    let world = world(START).await;
    let entry = |value: &str| {
        Ask::new("POST", "/v1/admin/lists/denylist").json(json!({ "kind": "ip", "value": value }))
    };
    let cases = [
        Ask::new("POST", "/v1/admin/rules")
            .json(json!({ "name": "per-client", "limit": 9, "window": "1s" })),
        Ask::new("POST", "/v1/admin/tiers").json(json!({ "name": "pro", "limit": 9 })),
        Ask::new("POST", "/v1/admin/api-keys").json(json!({ "sha256": DIGEST })),
        Ask::new("POST", "/v1/admin/api-keys")
            .json(json!({ "sha256": DIGEST.to_ascii_uppercase(), "user": "other" })),
        entry("192.0.2.66"),
        entry("192.0.2.66/32"),
    ];
    for ask in cases {
        refused(&world, &ask, StatusCode::CONFLICT, "conflict", None).await;
    }
}

/// `--config-source file`: the file is the configuration, the admin API cannot change it
/// (the state it can).
#[tokio::test]
async fn a_configuration_managed_by_a_file_is_read_only_here() {
    let world = world_with_source(START, ConfigSource::File).await;
    let entry = start_entry_id(&world).await;
    for ask in routes(&entry) {
        if !ask.is_write() {
            continue;
        }
        // The operations (state, enforcement) are not the file's to say.
        let operations = ["/state", "/enforcement", "/counters"];
        if operations.iter().any(|path| ask.path.contains(path)) {
            let reply = ask.send(&world).await;
            assert_eq!(
                reply.status,
                StatusCode::OK,
                "{} {}: {}",
                ask.method,
                ask.path,
                reply.text
            );
            continue;
        }
        let error = refused(&world, &ask, StatusCode::CONFLICT, "conflict", None).await;
        assert!(
            error["message"]
                .as_str()
                .unwrap_or_default()
                .contains("--config"),
            "{error}"
        );
    }
}

/// `head` and `tail` with spaces between, `total` bytes in all.
fn padded(head: &str, tail: &str, total: usize) -> String {
    format!(
        "{head}{}{tail}",
        " ".repeat(total - head.len() - tail.len())
    )
}

/// A body is taken up to its limit to the byte (1 MiB; an import 16 MiB), and refused one
/// byte past it, changing nothing.
#[tokio::test]
async fn bodies_are_limited_but_an_import_may_be_larger() {
    use sluice_controller::admin::{MAX_BODY_BYTES, MAX_IMPORT_BYTES};
    let world = world(START).await;
    let rule = |name: &str, total: usize| {
        padded(
            &format!("{{\"name\":\"{name}\",\"limit\":1,\"window\":\"1s\""),
            "}",
            total,
        )
    };
    let before = seen(&world).await;
    let reply = Ask::new("POST", "/v1/admin/rules")
        .text(rule("over", MAX_BODY_BYTES + 1))
        .send(&world)
        .await;
    assert_eq!(reply.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(reply.json()["error"], "too_large");
    assert_eq!(seen(&world).await, before);
    let reply = Ask::new("POST", "/v1/admin/rules")
        .text(rule("at-the-limit", MAX_BODY_BYTES))
        .send(&world)
        .await;
    assert_eq!(reply.status, StatusCode::CREATED, "{}", reply.text);
    let import = |total: usize| {
        padded(
            r#"{"rules":[{"name":"b","limit":1,"window":"1s"}]"#,
            "}",
            total,
        )
    };
    let version = seen(&world).await;
    let reply = Ask::new("PUT", "/v1/admin/config")
        .text(import(MAX_IMPORT_BYTES + 1))
        .send(&world)
        .await;
    assert_eq!(reply.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(seen(&world).await, version);
    let reply = Ask::new("PUT", "/v1/admin/config")
        .text(import(MAX_IMPORT_BYTES))
        .send(&world)
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text);
    assert_eq!(reply.json(), json!({ "version": 3 }));
}

/// Every refusal has the API's one error shape, `{"error","field","message"}` as JSON: the
/// query string's errors too.
#[tokio::test]
async fn a_bad_query_string_is_refused_in_the_one_error_shape_naming_the_field() {
    let world = world(START).await;
    let cases = [
        (Ask::get("/v1/admin/audit?limit=many"), "limit"),
        (Ask::get("/v1/admin/audit?since=yesterday"), "since"),
        (
            Ask::get("/v1/admin/counters?kind=ip&value=10.0.0.1&bogus=1"),
            "bogus",
        ),
        (Ask::new("DELETE", "/v1/admin/counters?all=yes"), "all"),
        (Ask::get("/v1/admin/config?format=json&pretty=1"), "pretty"),
    ];
    let mut wrong = Vec::new();
    for (ask, field) in cases {
        let reply = ask.send(&world).await;
        let body: Option<Value> = serde_json::from_str(&reply.text).ok();
        let fine = reply.status == StatusCode::BAD_REQUEST
            && body
                .as_ref()
                .is_some_and(|b| b["error"] == "invalid_request" && b["field"] == field);
        if !fine {
            wrong.push(format!(
                "{} {}: {} {}",
                ask.method, ask.path, reply.status, reply.text
            ));
        }
    }
    assert!(
        wrong.is_empty(),
        "not in the error shape:\n{}",
        wrong.join("\n")
    );
}

/// What the router itself refuses (no such route, a method a route does not have, a body
/// over the limit) is in the one error shape too.
#[tokio::test]
async fn refusals_of_the_router_itself_are_in_the_one_error_shape() {
    let world = world(START).await;
    let cases = [
        (Ask::get("/v1/admin/nothing"), StatusCode::NOT_FOUND),
        (
            Ask::new("PATCH", "/v1/admin/rules"),
            StatusCode::METHOD_NOT_ALLOWED,
        ),
        (
            Ask::new("POST", "/v1/admin/rules").text(" ".repeat(2 << 20)),
            StatusCode::PAYLOAD_TOO_LARGE,
        ),
    ];
    let mut wrong = Vec::new();
    for (ask, status) in cases {
        let reply = ask.send(&world).await;
        let body: Option<sluice_protocol::admin::ErrorBody> =
            serde_json::from_str(&reply.text).ok();
        if reply.status != status || body.is_none() {
            wrong.push(format!(
                "{} {}: {} {:?}",
                ask.method, ask.path, reply.status, reply.text
            ));
        }
    }
    assert!(
        wrong.is_empty(),
        "not in the error shape:\n{}",
        wrong.join("\n")
    );
}

// ----- export and import -------------------------------------------------------------------

#[tokio::test]
async fn the_export_in_every_format_reads_back_as_the_same_document() {
    let world = world(START).await;
    // Something of every kind the API writes, with times.
    Ask::new("POST", "/v1/admin/api-keys")
        .json(json!({ "user": "globex", "tier": "free" }))
        .send(&world)
        .await;
    Ask::new("POST", "/v1/admin/lists/safelist")
        .json(json!({ "kind": "path", "value": "/public/**", "expires_in": "1d", "reason": "launch" }))
        .send(&world).await;
    Ask::new("POST", "/v1/admin/rules")
        .json(json!({ "name": "queue", "strategy": "leaky_bucket", "limit": 10, "window": "1s",
                      "max_delay": "0s", "cost": 2, "shadow": true,
                      "match": { "headers": [{ "name": "x-plan", "value": "pro" }], "tiers": ["pro", "default"] } }))
        .send(&world).await;
    let version = seen(&world).await.version;
    assert_eq!(version, 4);
    let held = world.live.snapshot().document.clone();
    for (name, format, media_type) in [
        ("json", Format::Json, "application/json"),
        ("toml", Format::Toml, "application/toml"),
        ("yaml", Format::Yaml, "application/yaml"),
    ] {
        let reply = read(&world, &format!("/v1/admin/config?format={name}")).await;
        assert_eq!(reply.content_type.as_deref(), Some(media_type), "{name}");
        assert_eq!(reply.version(), version, "{name}");
        let document = file::parse(&reply.text, format).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(document, held, "{name}:\n{}", reply.text);
    }
    let default = read(&world, "/v1/admin/config").await;
    assert_eq!(default.content_type.as_deref(), Some("application/json"));
    let document: ConfigDocument = serde_json::from_str(&default.text).unwrap();
    assert_eq!(document, held);
}

/// What the tests import: every kind of entry (the list entry as it will be stored).
fn imported() -> Value {
    json!({
        "tiers": [{ "name": "gold", "limit": 100, "window": "1m" }],
        "rules": [
            { "name": "one", "limit": 1, "window": "1s" },
            { "name": "two", "strategy": "token_bucket", "scope": "ip", "limit": 2,
              "window": "1s", "burst": 4, "match": { "path_prefix": "/two/" } },
            { "name": "three", "limit": 3, "window": "1m", "tier_limits": true,
              "match": { "tiers": ["gold"] } },
        ],
        "api_keys": [{ "sha256": OTHER_DIGEST, "user": "initech", "tier": "gold" }],
        "safelist": [{ "kind": "ip", "value": "10.0.0.0/8" }],
        "denylist": [{ "kind": "user", "value": "mallory", "expires_at": "2030-01-01T00:00:00Z" }],
    })
}

#[tokio::test]
async fn an_import_in_every_format_applies_whole_as_one_version() {
    let document: ConfigDocument = serde_json::from_value(imported()).unwrap();
    let bodies = [
        ("application/json", imported().to_string()),
        ("application/json; charset=utf-8", imported().to_string()),
        (
            "application/toml",
            file::render(&document, Format::Toml).unwrap(),
        ),
        (
            "application/yaml",
            file::render(&document, Format::Yaml).unwrap(),
        ),
    ];
    for (media_type, body) in bodies {
        let world = world(START).await;
        let (reply, entry) = changed(
            &world,
            &Ask::new("PUT", "/v1/admin/config")
                .header("content-type", media_type)
                .text(body),
            StatusCode::OK,
            "config.import",
            "configuration",
        )
        .await;
        assert_eq!(reply.json(), json!({ "version": 2 }), "{media_type}");
        assert_eq!(
            entry["change"],
            json!({ "tiers": 1, "rules": 3, "api_keys": 1, "safelist": 1, "denylist": 1 })
        );
        let exported = read(&world, "/v1/admin/config").await.json();
        same_as::<ConfigDocument>(&exported, &imported()); // the import replaced everything
                                                           // The check path has it: `one` counts everyone, `three` the key's tier.
        let decision = check(
            &world,
            json!({ "client": { "kind": "api_key", "value": OTHER_DIGEST },
                                              "api_key": OTHER_DIGEST, "path": "/" }),
        )
        .await;
        assert_eq!(policy(&decision, "one")["limit"], 1, "{decision}");
        assert_eq!(policy(&decision, "three")["limit"], 100, "{decision}");
        assert!(find(&decision, "per-client").is_none(), "{decision}");
    }
}

#[tokio::test]
async fn a_hand_written_toml_or_yaml_import_applies() {
    let toml = r#"
[[rules]]
name = "hand-written"
limit = 7
window = "1m"

[[denylist]]
kind = "ip"
value = "10.1.2.3/8"
"#;
    let yaml = "rules:\n  - name: hand-written\n    limit: 7\n    window: 1m\ndenylist:\n  - kind: ip\n    value: 10.1.2.3/8\n";
    for (media_type, body) in [("application/toml", toml), ("application/yaml", yaml)] {
        let world = world(START).await;
        changed(
            &world,
            &Ask::new("PUT", "/v1/admin/config")
                .header("content-type", media_type)
                .text(body),
            StatusCode::OK,
            "config.import",
            "configuration",
        )
        .await;
        let exported = read(&world, "/v1/admin/config").await.json();
        same_as::<ConfigDocument>(
            &exported,
            &json!({ "rules": [{ "name": "hand-written", "limit": 7, "window": "1m" }],
                     "denylist": [{ "kind": "ip", "value": "10.0.0.0/8" }] }),
        );
    }
}

#[tokio::test]
async fn an_import_with_one_bad_entry_changes_nothing_and_names_it() {
    let mut bad_window = imported();
    bad_window["rules"][2]["window"] = json!("1x");
    let mut no_window = imported();
    no_window["rules"][2]
        .as_object_mut()
        .unwrap()
        .remove("window");
    let mut bad_tier = imported();
    bad_tier["api_keys"][0]["tier"] = json!("platinum");
    let mut bad_entry = imported();
    bad_entry["denylist"]
        .as_array_mut()
        .unwrap()
        .push(json!({ "kind": "ip", "value": "10.0.0.300" }));
    let cases = [
        (bad_window, "rules[2].window"),
        (no_window, "rules[2].window"),
        (bad_tier, "api_keys[0].tier"),
        (bad_entry, "denylist[1].value"),
    ];
    let world = world(START).await;
    for (value, field) in cases {
        let document: Result<ConfigDocument, _> = serde_json::from_value(value.clone());
        let mut bodies = vec![("application/json", value.to_string())];
        // What parses can be written in the other formats too.
        if let Ok(document) = document {
            bodies.push((
                "application/toml",
                file::render(&document, Format::Toml).unwrap(),
            ));
            bodies.push((
                "application/yaml",
                file::render(&document, Format::Yaml).unwrap(),
            ));
        } else {
            bodies.push(("application/toml", toml_of(&value)));
        }
        for (media_type, body) in bodies {
            let ask = Ask::new("PUT", "/v1/admin/config")
                .header("content-type", media_type)
                .text(body);
            refused(
                &world,
                &ask,
                StatusCode::BAD_REQUEST,
                "invalid_request",
                Some(field),
            )
            .await;
        }
    }
    let not_utf8 = Request::builder()
        .method("PUT")
        .uri("/v1/admin/config")
        .header("authorization", format!("Bearer {ADMIN_TOKEN}"))
        .body(Body::from(vec![b'{', 0xff, b'}']))
        .unwrap();
    let before = seen(&world).await;
    let full = support::send(&world.admin, not_utf8).await;
    assert_eq!(full.reply.status, StatusCode::BAD_REQUEST);
    assert_eq!(full.reply.json()["error"], "invalid_request");
    assert_eq!(seen(&world).await, before);
}

/// A JSON value as TOML, for documents the schema refuses (so they cannot be rendered).
fn toml_of(value: &Value) -> String {
    toml::to_string(value).expect("as TOML")
}

// ----- the check path sees every change at once --------------------------------------------

/// One check's decision on the world's check router.
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

fn find<'d>(decision: &'d Value, rule: &str) -> Option<&'d Value> {
    std::iter::once(&decision["policy"])
        .chain(decision["others"].as_array().into_iter().flatten())
        .find(|status| status["rule"] == rule)
}

/// The state of `rule` in `decision`, which it must have.
fn policy<'d>(decision: &'d Value, rule: &str) -> &'d Value {
    find(decision, rule).unwrap_or_else(|| panic!("`{rule}` did not apply: {decision}"))
}

fn by_ip(ip: &str, path: &str) -> Value {
    json!({ "client": { "kind": "ip", "value": ip }, "ip": ip, "path": path })
}

#[tokio::test]
async fn rules_created_changed_and_deleted_apply_to_the_next_check() {
    let world = world(START).await;
    let decision = check(&world, by_ip("10.0.0.5", "/new/a")).await;
    assert!(find(&decision, "new").is_none());
    Ask::new("POST", "/v1/admin/rules")
        .json(json!({ "name": "new", "limit": 1, "window": "1m", "match": { "path_prefix": "/new/" } }))
        .send(&world)
        .await;
    let decision = check(&world, by_ip("10.0.0.5", "/new/a")).await;
    assert_eq!(decision["allowed"], true);
    assert_eq!(policy(&decision, "new")["limit"], 1);
    assert_eq!(policy(&decision, "new")["remaining"], 0);
    let decision = check(&world, by_ip("10.0.0.5", "/new/a")).await;
    assert_eq!(decision["allowed"], false);
    assert_eq!(decision["policy"]["rule"], "new");

    Ask::new("PUT", "/v1/admin/rules/per-client")
        .json(json!({ "name": "per-client", "limit": 10, "window": "1m" }))
        .send(&world)
        .await;
    let decision = check(&world, by_ip("10.0.0.6", "/")).await;
    assert_eq!(policy(&decision, "per-client")["limit"], 10);

    Ask::new("DELETE", "/v1/admin/rules/new").send(&world).await;
    let decision = check(&world, by_ip("10.0.0.5", "/new/a")).await;
    assert_eq!(decision["allowed"], true, "{decision}");
    assert!(find(&decision, "new").is_none(), "{decision}");
}

#[tokio::test]
async fn a_tiers_new_limit_applies_to_its_clients_at_once() {
    let world = world(START).await;
    let acme = json!({ "client": { "kind": "api_key", "value": DIGEST }, "api_key": DIGEST,
                       "path": "/api/items" });
    let decision = check(&world, acme.clone()).await;
    assert_eq!(
        policy(&decision, "tiered")["limit"],
        5,
        "pro's limit: {decision}"
    );
    assert_eq!(policy(&decision, "tiered")["remaining"], 4);
    let reply = Ask::new("PUT", "/v1/admin/tiers/pro")
        .json(json!({ "name": "pro", "limit": 50 }))
        .send(&world)
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text);
    let decision = check(&world, acme).await;
    assert_eq!(policy(&decision, "tiered")["limit"], 50, "{decision}");
    assert_eq!(
        policy(&decision, "tiered")["remaining"],
        48,
        "the same counter, a new limit"
    );

    // A key made through the API counts as its user, with its tier's limits.
    let made = Ask::new("POST", "/v1/admin/api-keys")
        .json(json!({ "user": "globex", "tier": "free" }))
        .send(&world)
        .await
        .json();
    let digest = made["api_key"]["sha256"].as_str().unwrap().to_owned();
    let globex = json!({ "client": { "kind": "api_key", "value": digest }, "api_key": digest,
                         "path": "/api/items" });
    let decision = check(&world, globex.clone()).await;
    assert_eq!(
        policy(&decision, "tiered")["limit"],
        1,
        "free's limit: {decision}"
    );
    let decision = check(&world, globex.clone()).await;
    assert_eq!(decision["allowed"], false);
    // Moved to tier pro, the key's client gets pro's limit.
    Ask::new("PUT", format!("/v1/admin/api-keys/{digest}"))
        .json(json!({ "user": "globex", "tier": "pro" }))
        .send(&world)
        .await;
    let decision = check(&world, globex.clone()).await;
    assert_eq!(decision["allowed"], true, "{decision}");
    assert_eq!(policy(&decision, "tiered")["limit"], 50);
    // Deleted, the key is a stranger: no tier, so the rule's own limits.
    Ask::new("DELETE", format!("/v1/admin/api-keys/{digest}"))
        .send(&world)
        .await;
    let decision = check(&world, globex).await;
    assert_eq!(policy(&decision, "tiered")["limit"], 2, "{decision}");
}

#[tokio::test]
async fn list_changes_reach_the_filters_view_at_once() {
    let world = world(START).await;
    let view = call(&world.check, "GET", "/v1/config", None, &[], None).await;
    assert_eq!(view.etag.as_deref(), Some("\"1\""));
    assert_eq!(
        view.json()["denylist"],
        json!([{ "kind": "ip", "value": "192.0.2.66/32" }])
    );
    let added = Ask::new("POST", "/v1/admin/lists/denylist")
        .json(json!({ "kind": "ip", "value": "203.0.113.0/24", "expires_at": "2030-01-01T00:00:00Z" }))
        .send(&world)
        .await
        .json();
    Ask::new("POST", "/v1/admin/lists/safelist")
        .json(json!({ "kind": "path", "value": "/public/**" }))
        .send(&world)
        .await;
    let view = call(
        &world.check,
        "GET",
        "/v1/config",
        None,
        &[("if-none-match", "\"1\"")],
        None,
    )
    .await;
    assert_eq!(
        view.status,
        StatusCode::OK,
        "the old version is not current"
    );
    assert_eq!(view.etag.as_deref(), Some("\"3\""));
    let body = view.json();
    assert_eq!(body["version"], 3);
    assert_eq!(
        body["denylist"],
        json!([{ "kind": "ip", "value": "192.0.2.66/32" },
               { "kind": "ip", "value": "203.0.113.0/24", "expires_at_ms": 1_893_456_000_000_u64 }])
    );
    assert_eq!(
        body["safelist"],
        json!([{ "kind": "path", "value": "/public/**" }])
    );

    let id = added["id"].as_str().unwrap();
    Ask::new("DELETE", format!("/v1/admin/lists/denylist/{id}"))
        .send(&world)
        .await;
    let view = call(&world.check, "GET", "/v1/config", None, &[], None).await;
    assert_eq!(
        view.json()["denylist"],
        json!([{ "kind": "ip", "value": "192.0.2.66/32" }])
    );
}

// ----- counters ----------------------------------------------------------------------------

#[tokio::test]
async fn inspecting_counters_reads_without_consuming() {
    let world = world(START).await;
    let client = by_ip("10.0.0.1", "/api/x");
    check(&world, client.clone()).await;
    check(&world, client.clone()).await;
    let path = "/v1/admin/counters?kind=ip&value=10.0.0.1";
    let first = read(&world, path).await;
    assert_eq!(first.version(), 1);
    let counters = first.json()["counters"].clone();
    let remaining: Vec<(Value, Value, Value)> = counters
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["rule"].clone(),
                c["limit"].clone(),
                c["remaining"].clone(),
            )
        })
        .collect();
    assert_eq!(
        remaining,
        [
            (json!("per-client"), json!(3), json!(1)),
            (json!("tiered"), json!(2), json!(0))
        ]
    );
    for _ in 0..3 {
        assert_eq!(
            read(&world, path).await.json()["counters"],
            counters,
            "unchanged by a read"
        );
    }
    let decision = check(&world, by_ip("10.0.0.1", "/")).await;
    assert_eq!(
        policy(&decision, "per-client")["remaining"],
        0,
        "the reads took nothing"
    );
    // One rule; a client never seen is whole.
    let one = read(
        &world,
        "/v1/admin/counters?kind=ip&value=10.0.0.1&rule=tiered",
    )
    .await
    .json();
    assert_eq!(one["counters"].as_array().map(Vec::len), Some(1));
    assert_eq!(one["counters"][0]["rule"], "tiered");
    let fresh = read(&world, "/v1/admin/counters?kind=ip&value=10.9.9.9")
        .await
        .json();
    assert_eq!(fresh["counters"][0]["remaining"], 3);
    // A tier's limits, for a rule that counts by tier.
    let pro = read(
        &world,
        "/v1/admin/counters?kind=ip&value=10.0.0.1&rule=tiered&tier=pro",
    )
    .await;
    assert_eq!(pro.json()["counters"][0]["limit"], 5);
    assert_eq!(pro.json()["counters"][0]["remaining"], 3);
    // Reading counters is not a change: no audit entry.
    assert_eq!(seen(&world).await.audit.len(), 1);
}

/// Whatever the strategy, an inspection takes nothing: a client checked, inspected three
/// times and checked again gets the answer it gets without the inspections.
#[tokio::test]
async fn inspecting_takes_nothing_under_any_strategy() {
    let rules = r#"
[[rules]]
name = "fixed"
limit = 10
window = "1m"

[[rules]]
name = "log"
strategy = "sliding_window_log"
limit = 10
window = "1m"

[[rules]]
name = "counter"
strategy = "sliding_window_counter"
limit = 10
window = "1m"

[[rules]]
name = "bucket"
strategy = "token_bucket"
limit = 10
window = "1m"

[[rules]]
name = "cells"
strategy = "gcra"
limit = 10
window = "1m"
burst = 10

[[rules]]
name = "queue"
strategy = "leaky_bucket"
limit = 10
window = "1m"
max_delay = "1m"

[[rules]]
name = "in-flight"
strategy = "concurrency"
limit = 10
"#;
    let inspected = world(rules).await;
    let plain = world(rules).await;
    let client = by_ip("10.0.0.1", "/");
    let strip = |decision: Value| {
        let mut decision = decision;
        decision.as_object_mut().unwrap().remove("leases");
        decision
    };
    strip(check(&inspected, client.clone()).await);
    strip(check(&plain, client.clone()).await);
    let path = "/v1/admin/counters?kind=ip&value=10.0.0.1";
    let counters = read(&inspected, path).await.json();
    assert_eq!(
        counters["counters"].as_array().map(Vec::len),
        Some(7),
        "{counters}"
    );
    for _ in 0..2 {
        assert_eq!(read(&inspected, path).await.json(), counters);
    }
    assert_eq!(
        strip(check(&inspected, client.clone()).await),
        strip(check(&plain, client).await)
    );
}

#[tokio::test]
async fn counters_are_reset_by_client_by_rule_or_all() {
    let world = world(START).await;
    let use_up = |ip: &'static str| {
        let world = &world;
        async move {
            for _ in 0..2 {
                check(world, by_ip(ip, "/api/x")).await;
            }
        }
    };
    let remaining = |ip: &'static str| {
        let world = &world;
        async move {
            let body = read(world, &format!("/v1/admin/counters?kind=ip&value={ip}"))
                .await
                .json();
            body["counters"]
                .as_array()
                .unwrap()
                .iter()
                .map(|c| c["remaining"].as_u64().unwrap())
                .collect::<Vec<u64>>()
        }
    };
    use_up("10.0.0.1").await;
    use_up("10.0.0.2").await;
    assert_eq!(remaining("10.0.0.1").await, [1, 0]);

    // One client: its counters under every rule; the other client keeps its own.
    let before = seen(&world).await;
    let reply = Ask::new("DELETE", "/v1/admin/counters?kind=ip&value=10.0.0.1")
        .send(&world)
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text);
    assert_eq!(reply.json(), json!({ "reset": 2 }));
    assert_eq!(
        reply.version(),
        before.version,
        "a reset is not a configuration change"
    );
    let after = seen(&world).await;
    assert_eq!(
        (after.version, &after.export),
        (before.version, &before.export)
    );
    assert_eq!(
        after.audit.len(),
        before.audit.len() + 1,
        "but it is audited"
    );
    let entry = &after.audit[0];
    assert_eq!(entry["actor"], "ops");
    assert_eq!(entry["action"], "counters.reset");
    assert_eq!(entry["version_before"], before.version);
    assert_eq!(entry["version_after"], before.version);
    assert_eq!(entry["change"]["reset"], 2);
    assert_eq!(
        entry["change"]["client"],
        json!({ "kind": "ip", "value": "10.0.0.1" })
    );
    assert_eq!(remaining("10.0.0.1").await, [3, 2]);
    assert_eq!(remaining("10.0.0.2").await, [1, 0]);

    // One client under one rule.
    use_up("10.0.0.1").await;
    let reply = Ask::new(
        "DELETE",
        "/v1/admin/counters?kind=ip&value=10.0.0.1&rule=tiered",
    )
    .send(&world)
    .await;
    assert_eq!(reply.json(), json!({ "reset": 1 }));
    assert_eq!(remaining("10.0.0.1").await, [1, 2]);

    // One rule, every client.
    let reply = Ask::new("DELETE", "/v1/admin/counters?rule=per-client")
        .send(&world)
        .await;
    assert_eq!(reply.json(), json!({ "reset": 2 }));
    assert_eq!(remaining("10.0.0.1").await, [3, 2]);
    assert_eq!(remaining("10.0.0.2").await, [3, 0]);

    // Everything.
    use_up("10.0.0.1").await;
    let reply = Ask::new("DELETE", "/v1/admin/counters?all=true")
        .send(&world)
        .await;
    assert_eq!(reply.json(), json!({ "reset": 3 }));
    assert_eq!(remaining("10.0.0.1").await, [3, 2]);
    assert_eq!(remaining("10.0.0.2").await, [3, 2]);
    let decision = check(&world, by_ip("10.0.0.2", "/api/x")).await;
    assert_eq!(
        policy(&decision, "tiered")["remaining"],
        1,
        "the check path sees the reset"
    );
    let audit = seen(&world).await.audit;
    let resets = audit
        .iter()
        .filter(|e| e["action"] == "counters.reset")
        .count();
    assert_eq!(resets, 4, "every reset is audited");
}

/// Resetting one client gives that client a fresh start, nobody else: a counter it shares
/// with everybody (`scope = "global"`) or with its tier is not its own to reset.
#[tokio::test]
async fn resetting_one_client_leaves_counters_it_shares_with_others() {
    let world = world(
        r#"
[[rules]]
name = "everyone"
scope = "global"
limit = 10
window = "1m"

[[rules]]
name = "mine"
limit = 10
window = "1m"
"#,
    )
    .await;
    for ip in ["10.0.0.1", "10.0.0.2", "10.0.0.3"] {
        check(&world, by_ip(ip, "/")).await;
    }
    let reply = Ask::new("DELETE", "/v1/admin/counters?kind=ip&value=10.0.0.1")
        .send(&world)
        .await;
    assert_eq!(reply.status, StatusCode::OK);
    let decision = check(&world, by_ip("10.0.0.2", "/")).await;
    assert_eq!(policy(&decision, "mine")["remaining"], 8, "10.0.0.2's own");
    assert_eq!(
        policy(&decision, "everyone")["remaining"],
        6,
        "three requests were made before this one; resetting 10.0.0.1 must not forget them: {decision}"
    );
}

// ----- outside /v1/admin -------------------------------------------------------------------

#[tokio::test]
async fn the_admin_address_answers_health_and_readiness_without_a_token() {
    let world = world(START).await;
    let health = call(&world.admin, "GET", "/healthz", None, &[], None).await;
    assert_eq!(health.status, StatusCode::OK);
    let ready = call(&world.admin, "GET", "/readyz", None, &[], None).await;
    assert_eq!(ready.status, StatusCode::OK);
    assert_eq!(ready.json()["config_version"], 1);
}

// ----- changes made at the same time -------------------------------------------------------

/// A configuration store whose next commit, once made, answers only when the test says
/// (as a Redis reply may come late): meanwhile other changes go on.
struct HeldCommit {
    inner: sluice_controller::config::MemoryConfigStore,
    hold: std::sync::atomic::AtomicBool,
    committed: tokio::sync::Notify,
    release: tokio::sync::Notify,
}

#[async_trait::async_trait]
impl sluice_controller::config::ConfigStore for HeldCommit {
    fn describe(&self) -> String {
        self.inner.describe()
    }

    async fn version(&self) -> Result<u64, sluice_controller::store::StoreError> {
        self.inner.version().await
    }

    async fn load(
        &self,
    ) -> Result<sluice_controller::config::Stored, sluice_controller::store::StoreError> {
        self.inner.load().await
    }

    async fn commit(
        &self,
        from: u64,
        next: &sluice_controller::config::Stored,
        audit: &sluice_protocol::admin::AuditEntry,
    ) -> Result<sluice_controller::config::store::Commit, sluice_controller::store::StoreError>
    {
        let done = self.inner.commit(from, next, audit).await;
        if self.hold.swap(false, std::sync::atomic::Ordering::SeqCst) {
            self.committed.notify_one();
            self.release.notified().await;
        }
        done
    }

    async fn audit(
        &self,
        limit: usize,
    ) -> Result<Vec<sluice_protocol::admin::AuditEntry>, sluice_controller::store::StoreError> {
        self.inner.audit(limit).await
    }

    async fn record(
        &self,
        audit: &sluice_protocol::admin::AuditEntry,
    ) -> Result<(), sluice_controller::store::StoreError> {
        self.inner.record(audit).await
    }

    async fn durability(&self) -> Result<(), String> {
        self.inner.durability().await
    }

    async fn add_blocks(
        &self,
        blocks: &[(String, u64)],
        now_ms: u64,
        most: usize,
    ) -> Result<Vec<String>, sluice_controller::store::StoreError> {
        self.inner.add_blocks(blocks, now_ms, most).await
    }

    async fn blocks(
        &self,
        now_ms: u64,
        most: usize,
    ) -> Result<Vec<(String, u64)>, sluice_controller::store::StoreError> {
        self.inner.blocks(now_ms, most).await
    }

    async fn remove_block(
        &self,
        address: &str,
    ) -> Result<bool, sluice_controller::store::StoreError> {
        self.inner.remove_block(address).await
    }
}

/// Two changes at once: the first one's commit answers late, after the second was made on
/// top of it. Both stand, and the controller runs on the newest version, not on the one the
/// late answer was about.
#[tokio::test]
async fn a_late_commit_answer_does_not_bring_back_an_older_version() {
    let store = std::sync::Arc::new(HeldCommit {
        inner: sluice_controller::config::MemoryConfigStore::open(None, 100).unwrap(),
        hold: std::sync::atomic::AtomicBool::new(false),
        committed: tokio::sync::Notify::new(),
        release: tokio::sync::Notify::new(),
    });
    let world = support::world_on(START, ConfigSource::Store, store.clone()).await;
    store.hold.store(true, std::sync::atomic::Ordering::SeqCst);
    let first = Ask::new("PUT", "/v1/admin/tiers/pro").json(json!({ "name": "pro", "limit": 6 }));
    let second =
        Ask::new("PUT", "/v1/admin/tiers/free").json(json!({ "name": "free", "limit": 2 }));
    let (first, second) = tokio::join!(first.send(&world), async {
        store.committed.notified().await; // version 2 is stored; its answer is held
        let reply = second.send(&world).await;
        store.release.notify_one();
        reply
    });
    assert_eq!(second.status, StatusCode::OK, "{}", second.text);
    assert_eq!(second.version(), 3, "made on top of the first");
    assert_eq!(first.status, StatusCode::OK, "{}", first.text);
    assert_eq!(first.version(), 2);

    let version = read(&world, "/v1/admin/version").await.json();
    assert_eq!(
        version,
        json!({ "version": 3 }),
        "the controller went back to version 2"
    );
    let tiers = read(&world, "/v1/admin/tiers").await.json();
    same_as::<Vec<Tier>>(
        &tiers,
        &json!([{ "name": "pro", "limit": 6 }, { "name": "free", "limit": 2 }]),
    );
}
