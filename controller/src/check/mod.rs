//! The controller's HTTP surface: the check call, health and readiness.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Serialize;
use sluice_protocol::{
    CheckRequest, CheckResponse, ReleaseRequest, RulesSnapshot, CHECK_PATH, RELEASE_PATH,
    RULES_PATH,
};

use crate::limiter::{Limiter, ReleaseError};

/// Most checks one call may carry.
pub const MAX_CHECKS_PER_CALL: usize = 1_024;

#[derive(Clone)]
pub struct AppState {
    pub limiter: Arc<Limiter>,
}

pub fn app(state: AppState) -> Router {
    Router::new()
        .route(CHECK_PATH, post(check))
        .route(RELEASE_PATH, post(release))
        .route(RULES_PATH, get(rules))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(state)
}

/// The one error shape of the API.
#[derive(Debug, Serialize)]
pub struct ApiError {
    #[serde(skip)]
    status: StatusCode,
    error: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    field: Option<String>,
    message: String,
}

impl ApiError {
    fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            error: "invalid_request",
            field: Some(field.into()),
            message: message.into(),
        }
    }
}

impl ApiError {
    fn store_unavailable(error: &crate::store::StoreError) -> Self {
        tracing::warn!(%error, "check failed: store unavailable");
        ApiError {
            status: StatusCode::SERVICE_UNAVAILABLE,
            error: "store_unavailable",
            field: None,
            message: error.to_string(),
        }
    }
}

/// Parses a JSON body, naming the offending field on failure.
fn parse_body<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    let mut deserializer = serde_json::Deserializer::from_slice(body);
    serde_path_to_error::deserialize(&mut deserializer)
        .map_err(|e| ApiError::invalid(e.path().to_string(), e.inner().to_string()))
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(&self)).into_response()
    }
}

async fn check(
    State(state): State<AppState>,
    body: Bytes,
) -> Result<Json<CheckResponse>, ApiError> {
    let request: CheckRequest = parse_body(&body)?;
    if request.checks.len() > MAX_CHECKS_PER_CALL {
        return Err(ApiError::invalid(
            "checks",
            format!(
                "at most {MAX_CHECKS_PER_CALL} checks per call, got {}",
                request.checks.len()
            ),
        ));
    }
    let response = state
        .limiter
        .check(&request)
        .await
        .map_err(|e| ApiError::store_unavailable(&e))?;
    tracing::debug!(checks = response.decisions.len(), "check call served");
    // A leaky bucket admits a request at its slot: the answer is held until then (the
    // filter keeps the request paused meanwhile).
    let delay = response
        .decisions
        .iter()
        .filter_map(|decision| decision.policy.as_ref().map(|p| p.delay_ms))
        .max()
        .unwrap_or(0);
    if delay > 0 && request.hold_delays {
        tokio::time::sleep(std::time::Duration::from_millis(delay)).await;
    }
    Ok(Json(response))
}

async fn release(
    State(state): State<AppState>,
    body: Bytes,
) -> Result<Json<serde_json::Value>, ApiError> {
    let request: ReleaseRequest = parse_body(&body)?;
    if request.leases.len() > MAX_CHECKS_PER_CALL {
        return Err(ApiError::invalid(
            "leases",
            format!(
                "at most {MAX_CHECKS_PER_CALL} leases per call, got {}",
                request.leases.len()
            ),
        ));
    }
    match state.limiter.release(&request.leases).await {
        Ok(freed) => {
            tracing::debug!(leases = request.leases.len(), freed, "release call served");
            Ok(Json(serde_json::json!({ "released": freed })))
        }
        Err(ReleaseError::BadLease(bad)) => Err(ApiError::invalid(
            format!("leases[{}]", bad.index),
            bad.to_string(),
        )),
        Err(ReleaseError::Store(error)) => Err(ApiError::store_unavailable(&error)),
    }
}

/// The rules, for the filter: it needs each rule's failure mode when it cannot ask.
async fn rules(State(state): State<AppState>) -> Json<RulesSnapshot> {
    Json(RulesSnapshot {
        rules: state.limiter.rules().rules().to_vec(),
    })
}

async fn healthz() -> Json<serde_json::Value> {
    Json(serde_json::json!({ "status": "ok" }))
}

async fn readyz(State(state): State<AppState>) -> (StatusCode, Json<serde_json::Value>) {
    let store = state.limiter.store();
    match store.ping().await {
        Ok(()) => (
            StatusCode::OK,
            Json(serde_json::json!({ "status": "ready", "store": store.describe() })),
        ),
        Err(error) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(serde_json::json!({
                "status": "not_ready",
                "store": store.describe(),
                "error": error.to_string(),
            })),
        ),
    }
}
