//! The admin API's OpenAPI 3.1 document, generated from the handlers' own types and
//! annotations, served at `/v1/admin/openapi.json` (without a token: it holds no data) and
//! checked in as `controller/openapi.json` (a test holds the two to each other).
//!
//! What every operation shares is added here, once, rather than on each handler: the
//! answers of the layers in front of the handlers (`401`, `403`, `413`, a bad `If-Match`),
//! the `ETag` of the answers that carry the configuration's version, and each operation's
//! id and one-line summary ([`OPERATIONS`]: unique ids, as client generators need).

use axum::response::{IntoResponse, Response};
use utoipa::openapi::path::{Operation, ParameterIn};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::openapi::{RefOr, Required};
use utoipa::{Modify, OpenApi};

use super::{config, counters, entities, keys, lists, protection, stats, stream, system};

/// Every operation of the admin API: method, path, `operationId`, `summary`. The document's
/// test holds it to the document: every operation here and only these, ids unique.
pub const OPERATIONS: &[(&str, &str, &str, &str)] = &[
    (
        "get",
        "/v1/admin/version",
        "getVersion",
        "Read the configuration's version",
    ),
    (
        "get",
        "/v1/admin/build",
        "getBuild",
        "The controller's software version and commit",
    ),
    (
        "get",
        "/v1/admin/config",
        "exportConfig",
        "Export the whole configuration",
    ),
    (
        "put",
        "/v1/admin/config",
        "importConfig",
        "Replace the whole configuration",
    ),
    (
        "get",
        "/v1/admin/rules",
        "listRules",
        "List the rules, in the order they apply",
    ),
    ("post", "/v1/admin/rules", "createRule", "Add a rule"),
    ("get", "/v1/admin/rules/{name}", "getRule", "Read a rule"),
    (
        "put",
        "/v1/admin/rules/{name}",
        "updateRule",
        "Replace a rule",
    ),
    (
        "delete",
        "/v1/admin/rules/{name}",
        "deleteRule",
        "Delete a rule",
    ),
    ("get", "/v1/admin/tiers", "listTiers", "List the tiers"),
    ("post", "/v1/admin/tiers", "createTier", "Add a tier"),
    ("get", "/v1/admin/tiers/{name}", "getTier", "Read a tier"),
    (
        "put",
        "/v1/admin/tiers/{name}",
        "updateTier",
        "Replace a tier",
    ),
    (
        "delete",
        "/v1/admin/tiers/{name}",
        "deleteTier",
        "Delete a tier",
    ),
    (
        "get",
        "/v1/admin/api-keys",
        "listApiKeys",
        "List the API keys, by their digests",
    ),
    (
        "post",
        "/v1/admin/api-keys",
        "createApiKey",
        "Make an API key (shown once)",
    ),
    (
        "get",
        "/v1/admin/api-keys/{sha256}",
        "getApiKey",
        "Read an API key's record",
    ),
    (
        "put",
        "/v1/admin/api-keys/{sha256}",
        "updateApiKey",
        "Change an API key's record",
    ),
    (
        "delete",
        "/v1/admin/api-keys/{sha256}",
        "deleteApiKey",
        "Revoke an API key",
    ),
    (
        "get",
        "/v1/admin/lists/{list}",
        "listListEntries",
        "List the safelist's or denylist's entries",
    ),
    (
        "post",
        "/v1/admin/lists/{list}",
        "addListEntry",
        "Add an entry to the safelist or denylist",
    ),
    (
        "get",
        "/v1/admin/lists/{list}/{id}",
        "getListEntry",
        "Read a list entry",
    ),
    (
        "delete",
        "/v1/admin/lists/{list}/{id}",
        "removeListEntry",
        "Remove a list entry",
    ),
    (
        "get",
        "/v1/admin/counters",
        "inspectCounters",
        "Read a client's counters without consuming",
    ),
    (
        "delete",
        "/v1/admin/counters",
        "resetCounters",
        "Reset counters: a client's, a rule's or all",
    ),
    (
        "get",
        "/v1/admin/protection/blocks",
        "listProtectionBlocks",
        "List the addresses brute-force protection blocks",
    ),
    (
        "delete",
        "/v1/admin/protection/blocks/{ip}",
        "liftProtectionBlock",
        "Lift a brute-force protection block",
    ),
    (
        "get",
        "/v1/admin/state",
        "getState",
        "Read the system state",
    ),
    (
        "put",
        "/v1/admin/state",
        "setState",
        "Set the system state, or hand it to the signal",
    ),
    (
        "get",
        "/v1/admin/enforcement",
        "getEnforcement",
        "Read the emergency switch",
    ),
    (
        "put",
        "/v1/admin/enforcement",
        "setEnforcement",
        "Switch enforcement off or on, for every rule or one",
    ),
    (
        "get",
        "/v1/admin/stats",
        "getStats",
        "Read the traffic stats over a window",
    ),
    (
        "get",
        "/v1/admin/stats/stream",
        "streamStats",
        "Follow the stats as server-sent events",
    ),
    (
        "get",
        "/v1/admin/hints",
        "getHints",
        "Read tuning hints drawn from the stats",
    ),
    (
        "get",
        "/v1/admin/audit",
        "listAudit",
        "Read the audit log, newest first",
    ),
    (
        "get",
        "/v1/admin/whoami",
        "whoAmI",
        "Name the caller's token and its role",
    ),
];

/// What the layers in front of the handlers answer, and what every operation shares.
struct Shared;

/// An answer in the one error shape.
fn error(description: &str) -> RefOr<utoipa::openapi::Response> {
    RefOr::T(
        utoipa::openapi::ResponseBuilder::new()
            .description(description)
            .content(
                "application/json",
                utoipa::openapi::ContentBuilder::new()
                    .schema(Some(utoipa::openapi::Ref::from_schema_name("ErrorBody")))
                    .build(),
            )
            .build(),
    )
}

/// Its id and summary, from [`OPERATIONS`]; a summary a doc comment gave becomes the
/// description.
fn name(method: &str, path: &str, operation: &mut Operation) {
    let Some((_, _, id, summary)) = OPERATIONS
        .iter()
        .find(|(m, p, _, _)| *m == method && *p == path)
    else {
        // Not in the table: the document's test names it.
        return;
    };
    operation.operation_id = Some((*id).to_owned());
    if let Some(long) = operation.summary.replace((*summary).to_owned()) {
        if operation.description.is_none() {
            operation.description = Some(long.replace('\n', " "));
        }
    }
}

/// A parameter the annotation left `in: path` that the path does not name is one of the
/// handler's query parameters (utoipa takes `path` when it does not know the extractor,
/// as for `ValidQuery`): it is written as one, required only when it cannot be left out.
fn query_parameters(path: &str, operation: &mut Operation) {
    for parameter in operation.parameters.iter_mut().flatten() {
        let named = path.contains(&format!("{{{}}}", parameter.name));
        if parameter.parameter_in == ParameterIn::Path && !named {
            parameter.parameter_in = ParameterIn::Query;
            let nullable = serde_json::to_value(&parameter.schema)
                .ok()
                .and_then(|schema| schema.get("type").cloned())
                .is_some_and(|kind| kind.as_array().is_some_and(|k| k.contains(&"null".into())));
            parameter.required = if nullable {
                Required::False
            } else {
                Required::True
            };
        }
    }
}

/// The answers of the layers in front of every handler: the token (`401`, and `403` for a
/// change with a `read` token), the body limit (`413`), and a bad or stale `If-Match`
/// (`400`, `409`).
fn common_answers(operation: &mut Operation, changes: bool) {
    let if_match = operation
        .parameters
        .iter()
        .flatten()
        .any(|p| p.parameter_in == ParameterIn::Header && p.name == "If-Match");
    let query = operation
        .parameters
        .iter()
        .flatten()
        .any(|p| p.parameter_in == ParameterIn::Query);
    let responses = &mut operation.responses.responses;
    if query {
        responses.entry("400".to_owned()).or_insert_with(|| {
            error(
                "A query parameter that does not parse, or one the operation does not take \
                 (`field` names it)",
            )
        });
    }
    responses
        .entry("401".to_owned())
        .or_insert_with(|| error("No token, or one that is not valid"));
    if changes {
        responses
            .entry("403".to_owned())
            .or_insert_with(|| error("The token's role may read, not change"));
        responses
            .entry("413".to_owned())
            .or_insert_with(|| error("The body is larger than the route takes"));
    }
    if if_match {
        responses.entry("400".to_owned()).or_insert_with(|| {
            error(
                "The request is not valid (`field` names what): an If-Match that is not a \
                     version, a body that does not parse",
            )
        });
        responses.entry("409".to_owned()).or_insert_with(|| {
            error(
                "`version_mismatch`: If-Match names a version that is no longer current (the \
                 ETag names the current one)",
            )
        });
    }
}

/// What a created entity's answer leads to (an OpenAPI link: clients and test generators
/// follow it to the entity just made).
struct Created {
    /// The operation that creates it.
    by: &'static str,
    /// The operations on it.
    then: &'static [&'static str],
    /// Each path parameter of those, taken from the created answer.
    parameters: &'static [(&'static str, &'static str)],
}

const LINKS: &[Created] = &[
    Created {
        by: "createRule",
        then: &["getRule", "updateRule", "deleteRule"],
        parameters: &[("name", "$response.body#/name")],
    },
    Created {
        by: "createTier",
        then: &["getTier", "updateTier", "deleteTier"],
        parameters: &[("name", "$response.body#/name")],
    },
    Created {
        by: "createApiKey",
        then: &["getApiKey", "updateApiKey", "deleteApiKey"],
        parameters: &[("sha256", "$response.body#/api_key/sha256")],
    },
    Created {
        by: "addListEntry",
        then: &["getListEntry", "removeListEntry"],
        parameters: &[
            ("list", "$response.body#/list"),
            ("id", "$response.body#/id"),
        ],
    },
];

/// The links of [`LINKS`] on the `201` of a creating operation.
fn links(operation: &mut Operation) {
    use utoipa::openapi::link::LinkBuilder;
    let id = operation.operation_id.as_deref().unwrap_or_default();
    let Some(created) = LINKS.iter().find(|created| created.by == id) else {
        return;
    };
    let Some(RefOr::T(answer)) = operation.responses.responses.get_mut("201") else {
        return;
    };
    for target in created.then {
        let mut link = LinkBuilder::new().operation_id(*target);
        for (name, expression) in created.parameters {
            link = link.parameter(*name, *expression);
        }
        answer
            .links
            .insert((*target).to_owned(), RefOr::T(link.build()));
    }
}

/// The operations whose answers do not carry the configuration's version.
const UNVERSIONED: &[&str] = &["getBuild", "streamStats", "liftProtectionBlock"];

/// The `ETag` (the configuration's version) on every success that carries one, and on a
/// `409`, where it is there when the conflict is a `version_mismatch` (the current version).
fn etag(operation: &mut Operation) {
    use utoipa::openapi::header::HeaderBuilder;
    use utoipa::openapi::schema::{ObjectBuilder, Type};
    let id = operation.operation_id.as_deref().unwrap_or_default();
    let versioned = !UNVERSIONED.contains(&id);
    for (status, response) in operation.responses.responses.iter_mut() {
        let RefOr::T(response) = response else {
            continue;
        };
        let description = match status.as_str() {
            "200" | "201" if versioned => ETAG_ALWAYS,
            "409" => "On a `version_mismatch`, the current version",
            _ => continue,
        };
        let header = HeaderBuilder::new()
            .schema(
                ObjectBuilder::new()
                    .schema_type(Type::String)
                    .pattern(Some(r#"^"[0-9]+"$"#)),
            )
            .description(Some(description))
            .build();
        response.headers.insert("ETag".to_owned(), header);
    }
}

/// How [`etag`] describes an `ETag` every such answer carries ([`finish`] marks it
/// required).
const ETAG_ALWAYS: &str = "The configuration's version (for `If-Match`)";

impl Modify for Shared {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        for (path, item) in openapi.paths.paths.iter_mut() {
            let operations = [
                ("get", &mut item.get, false),
                ("post", &mut item.post, true),
                ("put", &mut item.put, true),
                ("delete", &mut item.delete, true),
                ("patch", &mut item.patch, true),
            ];
            for (method, operation, changes) in operations {
                let Some(operation) = operation else { continue };
                name(method, path, operation);
                query_parameters(path, operation);
                common_answers(operation, changes);
                etag(operation);
                links(operation);
            }
        }
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some(
                        "A token from the controller's tokens file or SLUICE_ADMIN_TOKENS; \
                         the `read` role may call every GET, the `admin` role everything",
                    ))
                    .build(),
            ),
        );
    }
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Sluice admin API",
        description = "Rules, tiers, API keys and lists changed while traffic flows; counters, \
                       the system state and the audit log. Every change is validated whole, \
                       versioned (ETag / If-Match) and audited.",
        license(name = "Apache-2.0"),
    ),
    components(schemas(sluice_protocol::admin::ErrorBody, crate::stats::Window)),
    paths(
        config::version, config::export, config::import,
        entities::list_rules, entities::create_rule, entities::get_rule, entities::update_rule,
        entities::delete_rule,
        entities::list_tiers, entities::create_tier, entities::get_tier, entities::update_tier,
        entities::delete_tier,
        keys::list, keys::create, keys::get, keys::update, keys::delete,
        lists::list, lists::add, lists::get, lists::remove,
        counters::inspect, counters::reset, protection::list, protection::lift,
        system::get_state, system::set_state, system::get_enforcement, system::set_enforcement,
        system::audit, system::whoami, system::build,
        stats::get_stats, stats::get_hints, stream::get_stats_stream,
    ),
    modifiers(&Shared),
    tags(
        (name = "config", description = "The whole configuration: version, export, import"),
        (name = "rules"), (name = "tiers"), (name = "api-keys"), (name = "lists"),
        (name = "counters"), (name = "state"), (name = "stats"), (name = "audit"),
        (name = "protection", description = "Brute-force protection's blocks, beside the configuration"),
    )
)]
pub struct AdminApi;

/// The document as JSON (pretty, with a final newline, as it is checked in).
pub fn document() -> String {
    let written = AdminApi::openapi()
        .to_json()
        .and_then(|text| serde_json::from_str::<Json>(&text));
    let mut text = match written {
        Ok(mut document) => {
            finish(&mut document);
            serde_json::to_string_pretty(&document)
        }
        Err(error) => Err(error),
    }
    .unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"));
    text.push('\n');
    text
}

/// What utoipa's types cannot say: the `ETag` headers every answer of theirs carries are
/// `required` (its header has no such field), and a link names its target `operationId`
/// (utoipa 5.5 writes the field as `operation_id`).
fn finish(document: &mut Json) {
    let Some(paths) = document.get_mut("paths") else {
        return;
    };
    for (_, item) in paths.entries_mut() {
        for (_, operation) in item.entries_mut() {
            let Some(responses) = operation.get_mut("responses") else {
                continue;
            };
            for (_, response) in responses.entries_mut() {
                if let Some(headers) = response.get_mut("headers") {
                    for (_, header) in headers.entries_mut() {
                        let always = header
                            .get_mut("description")
                            .is_some_and(|d| matches!(d, Json::Scalar(v) if v == ETAG_ALWAYS));
                        if always {
                            header.set("required", Json::Scalar(true.into()));
                        }
                    }
                }
                if let Some(links) = response.get_mut("links") {
                    for (_, link) in links.entries_mut() {
                        link.rename("operation_id", "operationId");
                    }
                }
            }
        }
    }
}

/// JSON whose objects keep their keys in the order they came (serde_json's `Value` sorts
/// them), so that the document reads in the order utoipa writes it.
enum Json {
    /// Null, a boolean, a number or a string.
    Scalar(serde_json::Value),
    Array(Vec<Json>),
    Object(Vec<(String, Json)>),
}

impl Json {
    fn get_mut(&mut self, key: &str) -> Option<&mut Json> {
        self.entries_mut()
            .find(|(name, _)| name == key)
            .map(|(_, value)| value)
    }

    /// An object's entries; nothing for anything else.
    fn entries_mut(&mut self) -> std::slice::IterMut<'_, (String, Json)> {
        match self {
            Json::Object(entries) => entries.iter_mut(),
            _ => Default::default(),
        }
    }

    /// Sets `key` of an object (at the end, if it is new).
    fn set(&mut self, key: &str, value: Json) {
        if let Json::Object(entries) = self {
            match entries.iter_mut().find(|(name, _)| name == key) {
                Some((_, old)) => *old = value,
                None => entries.push((key.to_owned(), value)),
            }
        }
    }

    /// Renames an object's key `from`, in place.
    fn rename(&mut self, from: &str, to: &str) {
        if let Some((name, _)) = self.entries_mut().find(|(name, _)| name == from) {
            *name = to.to_owned();
        }
    }
}

impl serde::Serialize for Json {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::{SerializeMap, SerializeSeq};
        match self {
            Json::Scalar(value) => value.serialize(serializer),
            Json::Array(items) => {
                let mut seq = serializer.serialize_seq(Some(items.len()))?;
                for item in items {
                    seq.serialize_element(item)?;
                }
                seq.end()
            }
            Json::Object(entries) => {
                let mut map = serializer.serialize_map(Some(entries.len()))?;
                for (key, value) in entries {
                    map.serialize_entry(key, value)?;
                }
                map.end()
            }
        }
    }
}

impl<'de> serde::Deserialize<'de> for Json {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Json, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = Json;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("JSON")
            }
            fn visit_unit<E>(self) -> Result<Json, E> {
                Ok(Json::Scalar(serde_json::Value::Null))
            }
            fn visit_bool<E>(self, v: bool) -> Result<Json, E> {
                Ok(Json::Scalar(v.into()))
            }
            fn visit_i64<E>(self, v: i64) -> Result<Json, E> {
                Ok(Json::Scalar(v.into()))
            }
            fn visit_u64<E>(self, v: u64) -> Result<Json, E> {
                Ok(Json::Scalar(v.into()))
            }
            fn visit_f64<E>(self, v: f64) -> Result<Json, E> {
                Ok(Json::Scalar(v.into()))
            }
            fn visit_str<E>(self, v: &str) -> Result<Json, E> {
                Ok(Json::Scalar(v.into()))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Json, A::Error> {
                let mut items = Vec::new();
                while let Some(item) = seq.next_element()? {
                    items.push(item);
                }
                Ok(Json::Array(items))
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Json, A::Error> {
                let mut entries = Vec::new();
                while let Some(entry) = map.next_entry()? {
                    entries.push(entry);
                }
                Ok(Json::Object(entries))
            }
        }
        deserializer.deserialize_any(Visitor)
    }
}

pub async fn serve() -> Response {
    (
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        document(),
    )
        .into_response()
}
