//! The admin API's OpenAPI 3.1 document, generated from the handlers' own types and
//! annotations, served at `/v1/admin/openapi.json` (without a token: it holds no data) and
//! checked in as `controller/openapi.json` (a test holds the two to each other).

use axum::response::{IntoResponse, Response};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

use super::{config, counters, entities, keys, lists, protection, stats, stream, system};

struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::{RefOr, ResponseBuilder};
        let error = |description: &str| {
            RefOr::T(
                ResponseBuilder::new()
                    .description(description)
                    .content(
                        "application/json",
                        utoipa::openapi::ContentBuilder::new()
                            .schema(Some(utoipa::openapi::Ref::from_schema_name("ErrorBody")))
                            .build(),
                    )
                    .build(),
            )
        };
        for item in openapi.paths.paths.values_mut() {
            let operations = [
                (&mut item.get, false),
                (&mut item.post, true),
                (&mut item.put, true),
                (&mut item.delete, true),
            ];
            for (operation, changes) in operations {
                let Some(operation) = operation else { continue };
                let responses = &mut operation.responses.responses;
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
        system::audit, system::whoami, stats::get_stats, stats::get_hints, stream::get_stats_stream,
    ),
    modifiers(&BearerAuth),
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
    let mut text = AdminApi::openapi()
        .to_pretty_json()
        .unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"));
    text.push('\n');
    text
}

pub async fn serve() -> Response {
    (
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        document(),
    )
        .into_response()
}
