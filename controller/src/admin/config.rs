//! The whole configuration: its version, an export in the schema files use (TOML, YAML or
//! JSON), and an import that validates everything first and applies all of it, as one
//! version, or nothing. Both run off the threads that answer checks ([`super::offload`]);
//! an import nested deeper than [`super::depth::MAX_DEPTH`] is refused before it is parsed.

use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use sluice_protocol::admin::VersionBody;
use sluice_protocol::config::ConfigDocument;

use super::auth::{Admin, Reader};
use super::{document_writable, if_match, versioned, AdminState};
use crate::config::file::{self, Format};
use crate::config::{Author, Change};
use crate::error::{ApiError, Body, ValidQuery};

#[utoipa::path(get, path = "/v1/admin/version", tag = "config",
    responses((status = 200, body = VersionBody)),
    security(("bearer" = [])))]
pub async fn version(State(state): State<AdminState>, _: Reader) -> Response {
    let version = state.config.snapshot().version;
    versioned(StatusCode::OK, version, &VersionBody { version })
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct ExportQuery {
    /// `json` (default), `toml` or `yaml`.
    pub format: Option<String>,
}

#[utoipa::path(get, path = "/v1/admin/config", tag = "config", params(ExportQuery),
    responses((status = 200, description = "The configuration, in the schema files use (JSON; TOML or YAML with `format`)", body = ConfigDocument),
              (status = 400, body = sluice_protocol::admin::ErrorBody)),
    security(("bearer" = [])))]
pub async fn export(
    State(state): State<AdminState>,
    _: Reader,
    ValidQuery(query): ValidQuery<ExportQuery>,
) -> Result<Response, ApiError> {
    let format = match query.format.as_deref() {
        None => Format::Json,
        Some(name) => Format::of_name(name).ok_or_else(|| {
            ApiError::invalid("format", format!("`{name}` is not json, toml or yaml"))
        })?,
    };
    let snapshot = state.config.snapshot();
    let text = file::render(&snapshot.document, format)
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e))?;
    Ok((
        [
            (header::CONTENT_TYPE, format.media_type().to_owned()),
            (header::ETAG, crate::check::etag(snapshot.version)),
        ],
        text,
    )
        .into_response())
}

#[utoipa::path(put, path = "/v1/admin/config", tag = "config",
    request_body(content = ConfigDocument, description = "A whole configuration (JSON; TOML or YAML with Content-Type application/toml or application/yaml)"),
    params(("If-Match" = Option<String>, Header, description = "The version the change was made from")),
    responses((status = 200, description = "Applied as one version", body = VersionBody),
              (status = 400, description = "Nothing was applied: the error names the entry", body = sluice_protocol::admin::ErrorBody),
              (status = 409, body = sluice_protocol::admin::ErrorBody)),
    security(("bearer" = [])))]
pub async fn import(
    State(state): State<AdminState>,
    Admin(caller): Admin,
    headers: HeaderMap,
    Body(body): Body,
) -> Result<Response, ApiError> {
    document_writable(&state)?;
    let media_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("application/json");
    let format = Format::of_media_type(media_type).ok_or_else(|| {
        ApiError::invalid(
            "Content-Type",
            format!("`{media_type}` is not application/json, application/toml or application/yaml"),
        )
    })?;
    let text = std::str::from_utf8(&body)
        .map_err(|_| ApiError::invalid("", "the configuration is not UTF-8"))?;
    super::depth::check(text.as_bytes(), format)?;
    let document = file::parse(text, format)?;
    // The parse may have taken seconds: if the request limit ran out meanwhile (and the
    // client was told 408), the import stops here, before it changes anything.
    tokio::task::yield_now().await;
    let author = Author {
        actor: &caller.name,
        action: "config.import",
        target: "configuration",
    };
    let summary = serde_json::json!({
        "tiers": document.tiers.len(), "rules": document.rules.len(),
        "api_keys": document.api_keys.len(), "safelist": document.safelist.len(),
        "denylist": document.denylist.len(),
    });
    let snapshot = state
        .config
        .change(&author, if_match(&headers)?, |snapshot| {
            Ok(Change {
                document: document.clone(),
                operations: snapshot.operations.clone(),
                detail: summary.clone(),
            })
        })
        .await?;
    Ok(versioned(
        StatusCode::OK,
        snapshot.version,
        &VersionBody {
            version: snapshot.version,
        },
    ))
}
