//! The system state, the emergency switch, the audit log, and who the caller is.

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use sluice_protocol::admin::{
    AuditBody, BuildBody, EnforcementBody, EnforcementStatus, Operations, StateBody, SystemState,
    WhoAmIBody,
};

use super::auth::{Admin, Reader};
use super::{if_match, json_body, versioned, AdminState};
use crate::config::{Author, Change};
use crate::error::{ApiError, Body, ValidQuery};

#[utoipa::path(get, path = "/v1/admin/state", tag = "state",
    responses((status = 200, description = "The state, since when, whether the signal drives it, and the emergency switch", body = Operations)),
    security(("bearer" = [])))]
pub async fn get_state(State(state): State<AdminState>, _: Reader) -> Response {
    let snapshot = state.config.snapshot();
    versioned(StatusCode::OK, snapshot.version, &snapshot.operations)
}

fn now_rfc3339() -> String {
    let ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
    crate::config::validate::format_rfc3339(ms)
}

/// `operations` with the state set to `to` (now, if it changes).
pub fn with_state(operations: &Operations, to: SystemState) -> Operations {
    let mut next = operations.clone();
    if operations.state != to {
        next.state = to;
        next.state_since = Some(now_rfc3339());
    }
    next
}

#[utoipa::path(put, path = "/v1/admin/state", tag = "state", request_body = StateBody,
    params(("If-Match" = Option<String>, Header, description = "The version the change was made from")),
    responses((status = 200, body = Operations), (status = 400, body = sluice_protocol::admin::ErrorBody),
              (status = 409, body = sluice_protocol::admin::ErrorBody)),
    security(("bearer" = [])))]
pub async fn set_state(
    State(state): State<AdminState>,
    Admin(caller): Admin,
    headers: HeaderMap,
    Body(body): Body,
) -> Result<Response, ApiError> {
    let wanted: StateBody = json_body(&body)?;
    if wanted.state.is_none() && wanted.automatic.is_none() {
        return Err(ApiError::invalid(
            "state",
            "give a state, automatic, or both",
        ));
    }
    let target = wanted.state.map_or("automatic", SystemState::as_str);
    let before = state.config.snapshot().operations.state;
    let author = Author {
        actor: &caller.name,
        action: "state.set",
        target,
    };
    let snapshot = state
        .config
        .change(&author, if_match(&headers)?, |snapshot| {
            let current = &snapshot.operations;
            let mut next = match wanted.state {
                Some(to) => with_state(current, to),
                None => current.clone(),
            };
            // Setting the state pins it, unless the caller hands it to the signal.
            next.automatic = wanted.automatic.unwrap_or(wanted.state.is_none());
            Ok(Change {
                document: snapshot.document.clone(),
                detail: serde_json::json!({
                    "from": current.state, "to": next.state, "automatic": next.automatic,
                }),
                operations: next,
            })
        })
        .await?;
    if before != snapshot.operations.state {
        state
            .metrics
            .state_changed(snapshot.operations.state.as_str(), "operator");
        tracing::warn!(
            from = before.as_str(),
            to = snapshot.operations.state.as_str(),
            by = caller.name.as_str(),
            "the system state was set"
        );
    }
    Ok(versioned(
        StatusCode::OK,
        snapshot.version,
        &snapshot.operations,
    ))
}

#[utoipa::path(get, path = "/v1/admin/enforcement", tag = "state",
    responses((status = 200, body = EnforcementStatus)),
    security(("bearer" = [])))]
pub async fn get_enforcement(State(state): State<AdminState>, _: Reader) -> Response {
    let snapshot = state.config.snapshot();
    versioned(
        StatusCode::OK,
        snapshot.version,
        &enforcement(&snapshot.operations),
    )
}

fn enforcement(operations: &Operations) -> EnforcementStatus {
    EnforcementStatus {
        enforce: operations.enforce,
        unenforced_rules: operations.unenforced_rules.clone(),
    }
}

/// The emergency switch: with `enforce: false` nothing is refused (every rule, or the one
/// named, acts as in shadow: counted, and reported as would-be-limited) until it is
/// switched back.
#[utoipa::path(put, path = "/v1/admin/enforcement", tag = "state", request_body = EnforcementBody,
    params(("If-Match" = Option<String>, Header, description = "The version the change was made from")),
    responses((status = 200, body = EnforcementStatus), (status = 400, body = sluice_protocol::admin::ErrorBody),
              (status = 404, body = sluice_protocol::admin::ErrorBody),
              (status = 409, body = sluice_protocol::admin::ErrorBody)),
    security(("bearer" = [])))]
pub async fn set_enforcement(
    State(state): State<AdminState>,
    Admin(caller): Admin,
    headers: HeaderMap,
    Body(body): Body,
) -> Result<Response, ApiError> {
    let wanted: EnforcementBody = json_body(&body)?;
    let switch = if wanted.enforce { "on" } else { "off" };
    let target = match &wanted.rule {
        Some(rule) => format!("{rule} {switch}"),
        None => switch.to_owned(),
    };
    let author = Author {
        actor: &caller.name,
        action: "enforcement.set",
        target: &target,
    };
    let snapshot = state
        .config
        .change(&author, if_match(&headers)?, |snapshot| {
            let mut operations = snapshot.operations.clone();
            match &wanted.rule {
                None => operations.enforce = wanted.enforce,
                Some(rule) => {
                    if !snapshot.document.rules.iter().any(|r| &r.name == rule) {
                        return Err(super::missing("rule", rule));
                    }
                    operations.unenforced_rules.retain(|name| name != rule);
                    if !wanted.enforce {
                        operations.unenforced_rules.push(rule.clone());
                    }
                }
            }
            Ok(Change {
                document: snapshot.document.clone(),
                operations,
                detail: serde_json::json!({ "enforce": wanted.enforce, "rule": wanted.rule }),
            })
        })
        .await?;
    tracing::warn!(
        enforce = wanted.enforce,
        rule = wanted.rule.as_deref().unwrap_or("(every rule)"),
        by = caller.name.as_str(),
        "enforcement switched"
    );
    Ok(versioned(
        StatusCode::OK,
        snapshot.version,
        &enforcement(&snapshot.operations),
    ))
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
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

/// Which build of the controller answers: the software's release and commit, for the
/// upgrade order in UPGRADING.md (the configuration's version is `GET /v1/admin/version`).
#[utoipa::path(get, path = "/v1/admin/build", tag = "audit", operation_id = "getBuild",
    summary = "The controller's software version and commit",
    responses((status = 200, body = BuildBody), (status = 401, body = sluice_protocol::admin::ErrorBody)),
    security(("bearer" = [])))]
pub async fn build(_: Reader) -> Response {
    let body = BuildBody {
        version: crate::build::VERSION.to_owned(),
        commit: crate::build::COMMIT.to_owned(),
    };
    (StatusCode::OK, axum::Json(body)).into_response()
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
