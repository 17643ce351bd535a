//! Counters: where a client stands under each rule, read without consuming anything, and
//! resets (of one client, of one rule, or of everything), which the audit log records.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;
use serde::Deserialize;
use sluice_protocol::admin::{CountersBody, ResetBody};
use sluice_protocol::ClientId;

use super::auth::{Admin, Reader};
use super::{versioned, AdminState};
use crate::check::limiter::ResetTarget;
use crate::config::Author;
use crate::error::{ApiError, ValidQuery};

/// Whose counters: a client by the kind of identity it is counted by (`ip`, `user`,
/// `api_key` (the key's digest), `header`, `tier`) and its value; optionally one rule, and
/// the client's tier (for rules that count by tier).
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct CounterQuery {
    pub kind: Option<String>,
    pub value: Option<String>,
    pub tier: Option<String>,
    pub rule: Option<String>,
    /// `DELETE` only: reset every counter of every rule.
    #[serde(default)]
    pub all: bool,
}

const KINDS: [&str; 5] = ["ip", "user", "api_key", "header", "tier"];

fn client(query: &CounterQuery) -> Result<Option<ClientId>, ApiError> {
    match (&query.kind, &query.value) {
        (None, None) => Ok(None),
        (Some(kind), Some(value)) => {
            if !KINDS.contains(&kind.as_str()) {
                return Err(ApiError::invalid(
                    "kind",
                    format!("`{kind}` is not one of {}", KINDS.join(", ")),
                ));
            }
            if value.is_empty() {
                return Err(ApiError::invalid("value", "must not be empty"));
            }
            Ok(Some(ClientId {
                kind: kind.clone(),
                value: value.clone(),
            }))
        }
        (Some(_), None) => Err(ApiError::invalid("value", "is required with kind")),
        (None, Some(_)) => Err(ApiError::invalid("kind", "is required with value")),
    }
}

fn known_rule(state: &AdminState, rule: Option<&str>) -> Result<(), ApiError> {
    match rule {
        Some(name)
            if !state
                .config
                .snapshot()
                .rules
                .rules()
                .iter()
                .any(|r| r.name == name) =>
        {
            Err(ApiError::not_found(format!("there is no rule `{name}`")))
        }
        _ => Ok(()),
    }
}

#[utoipa::path(get, path = "/v1/admin/counters", tag = "counters", params(CounterQuery),
    responses((status = 200, body = CountersBody), (status = 400, body = sluice_protocol::admin::ErrorBody),
              (status = 404, description = "There is no such rule", body = sluice_protocol::admin::ErrorBody),
              (status = 503, body = sluice_protocol::admin::ErrorBody)),
    security(("bearer" = [])))]
pub async fn inspect(
    State(state): State<AdminState>,
    _: Reader,
    ValidQuery(query): ValidQuery<CounterQuery>,
) -> Result<Response, ApiError> {
    let client = client(&query)?.ok_or_else(|| ApiError::invalid("kind", "is required"))?;
    known_rule(&state, query.rule.as_deref())?;
    let counters = state
        .limiter
        .inspect(&client, query.tier.as_deref(), query.rule.as_deref())
        .await
        .map_err(|e| ApiError::store_unavailable(&e))?;
    let version = state.config.snapshot().version;
    Ok(versioned(
        StatusCode::OK,
        version,
        &CountersBody { counters },
    ))
}

#[utoipa::path(delete, path = "/v1/admin/counters", tag = "counters", params(CounterQuery),
    responses((status = 200, body = ResetBody), (status = 400, body = sluice_protocol::admin::ErrorBody),
              (status = 404, description = "There is no such rule", body = sluice_protocol::admin::ErrorBody),
              (status = 503, body = sluice_protocol::admin::ErrorBody)),
    security(("bearer" = [])))]
pub async fn reset(
    State(state): State<AdminState>,
    Admin(caller): Admin,
    ValidQuery(query): ValidQuery<CounterQuery>,
) -> Result<Response, ApiError> {
    let client = client(&query)?;
    known_rule(&state, query.rule.as_deref())?;
    let target = match (&client, query.rule.as_deref(), query.all) {
        (Some(client), rule, false) => ResetTarget::Client {
            client,
            tier: query.tier.as_deref(),
            rule,
        },
        (None, Some(rule), false) => ResetTarget::Rule(rule),
        (None, None, true) => ResetTarget::All,
        (_, _, true) => {
            return Err(ApiError::invalid(
                "all",
                "resets every counter: give it alone, without a client or a rule",
            ))
        }
        (None, None, false) => {
            return Err(ApiError::invalid(
                "kind",
                "say whose counters: a client (kind and value), a rule, or all=true",
            ))
        }
    };
    let reset = state
        .limiter
        .reset(&target)
        .await
        .map_err(|e| ApiError::store_unavailable(&e))?;
    let described = match &target {
        ResetTarget::Client { client, rule, .. } => match rule {
            Some(rule) => format!("{}:{} rule:{rule}", client.kind, client.value),
            None => format!("{}:{}", client.kind, client.value),
        },
        ResetTarget::Rule(rule) => format!("rule:{rule}"),
        ResetTarget::All => "all".to_owned(),
    };
    let author = Author {
        actor: &caller.name,
        action: "counters.reset",
        target: &described,
    };
    let detail = serde_json::json!({
        "client": client, "rule": query.rule, "all": query.all, "reset": reset,
    });
    state
        .config
        .record(&author, detail)
        .await
        .map_err(|e| ApiError::store_unavailable(&e))?;
    let version = state.config.snapshot().version;
    Ok(versioned(StatusCode::OK, version, &ResetBody { reset }))
}
