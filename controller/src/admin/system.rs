//! The system state, the audit log, and who the caller is.

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use serde::Deserialize;
use sluice_protocol::admin::{AuditBody, StateBody, WhoAmIBody};

use super::auth::{Admin, Reader};
use super::{if_match, versioned, AdminState};
use crate::config::{Author, Change};
use crate::error::{parse_json, ApiError, Body, ValidQuery};

#[utoipa::path(get, path = "/v1/admin/state", tag = "state",
    responses((status = 200, body = StateBody)),
    security(("bearer" = [])))]
pub async fn get_state(State(state): State<AdminState>, _: Reader) -> Response {
    let snapshot = state.config.snapshot();
    versioned(
        StatusCode::OK,
        snapshot.version,
        &StateBody {
            state: snapshot.state,
        },
    )
}

#[utoipa::path(put, path = "/v1/admin/state", tag = "state", request_body = StateBody,
    params(("If-Match" = Option<String>, Header, description = "The version the change was made from")),
    responses((status = 200, body = StateBody), (status = 400, body = sluice_protocol::admin::ErrorBody),
              (status = 409, body = sluice_protocol::admin::ErrorBody)),
    security(("bearer" = [])))]
pub async fn set_state(
    State(state): State<AdminState>,
    Admin(caller): Admin,
    headers: HeaderMap,
    Body(body): Body,
) -> Result<Response, ApiError> {
    let wanted: StateBody = parse_json(&body)?;
    let author = Author {
        actor: &caller.name,
        action: "state.set",
        target: wanted.state.as_str(),
    };
    let snapshot = state
        .config
        .change(&author, if_match(&headers)?, |snapshot| {
            Ok(Change {
                document: snapshot.document.clone(),
                state: wanted.state,
                detail: serde_json::json!({ "from": snapshot.state, "to": wanted.state }),
            })
        })
        .await?;
    Ok(versioned(
        StatusCode::OK,
        snapshot.version,
        &StateBody {
            state: snapshot.state,
        },
    ))
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
pub struct AuditQuery {
    /// Most entries, newest first (default 100, at most 1000).
    pub limit: Option<usize>,
}

#[utoipa::path(get, path = "/v1/admin/audit", tag = "audit", params(AuditQuery),
    responses((status = 200, body = AuditBody), (status = 503, body = sluice_protocol::admin::ErrorBody)),
    security(("bearer" = [])))]
pub async fn audit(
    State(state): State<AdminState>,
    _: Reader,
    ValidQuery(query): ValidQuery<AuditQuery>,
) -> Result<Response, ApiError> {
    let limit = query.limit.unwrap_or(100).clamp(1, 1_000);
    let entries = state
        .config
        .store()
        .audit(limit)
        .await
        .map_err(|e| ApiError::store_unavailable(&e))?;
    let version = state.config.snapshot().version;
    Ok(versioned(StatusCode::OK, version, &AuditBody { entries }))
}

#[utoipa::path(get, path = "/v1/admin/whoami", tag = "audit",
    responses((status = 200, body = WhoAmIBody), (status = 401, body = sluice_protocol::admin::ErrorBody)),
    security(("bearer" = [])))]
pub async fn whoami(State(state): State<AdminState>, Reader(caller): Reader) -> Response {
    let version = state.config.snapshot().version;
    versioned(
        StatusCode::OK,
        version,
        &WhoAmIBody {
            name: caller.name,
            role: caller.role,
        },
    )
}
