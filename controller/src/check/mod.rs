//! The hot path: what the filter calls on the check address (the check call, releases, its
//! view of the configuration and its reports), with health and readiness. Nothing here takes a lock the
//! admin surface holds: each call reads the configuration snapshot once.

pub mod limiter;

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use sluice_protocol::{
    CheckRequest, CheckResponse, ReleaseRequest, Report, CHECK_PATH, CONFIG_PATH,
    MAX_REPORTED_ADDRESSES, RELEASE_PATH, REPORT_PATH,
};

use crate::automatic::Signals;
use crate::error::{parse_json, ApiError};
use crate::metrics::Metrics;
use crate::protection::Guard;
use limiter::{Limiter, ReleaseError};

/// Most checks one call may carry.
pub const MAX_CHECKS_PER_CALL: usize = 1_024;

#[derive(Clone)]
pub struct CheckState {
    pub limiter: Arc<Limiter>,
    /// Upstream answers the filters report (the automatic system state).
    pub signals: Arc<Signals>,
    /// Invalid tokens the filters report (brute-force protection).
    pub guard: Arc<Guard>,
    pub metrics: Arc<Metrics>,
}

/// The check address's routes; `/metrics` too when `with_metrics`.
pub fn app(state: CheckState, with_metrics: bool) -> Router {
    let router = Router::new()
        .route(CHECK_PATH, post(check))
        .route(RELEASE_PATH, post(release))
        .route(REPORT_PATH, post(report))
        .route(CONFIG_PATH, get(filter_view))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz));
    let router = if with_metrics {
        router.route("/metrics", get(metrics))
    } else {
        router
    };
    router.with_state(state)
}

async fn check(
    State(state): State<CheckState>,
    body: Bytes,
) -> Result<Json<CheckResponse>, ApiError> {
    let began = std::time::Instant::now();
    let request: CheckRequest = parse_json(&body)?;
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
    state
        .metrics
        .check_call_checks
        .observe(request.checks.len() as f64);
    state
        .metrics
        .check_call_duration
        .observe(began.elapsed().as_secs_f64());
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
    State(state): State<CheckState>,
    body: Bytes,
) -> Result<Json<serde_json::Value>, ApiError> {
    let request: ReleaseRequest = parse_json(&body)?;
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

/// A filter worker's report of the last second: the upstream's answers feed the automatic
/// system state, invalid tokens by address feed brute-force protection. Answered at once;
/// the counting happens elsewhere.
async fn report(State(state): State<CheckState>, body: Bytes) -> Result<StatusCode, ApiError> {
    let report: Report = parse_json(&body)?;
    // Every list checked before anything is counted: a refused report changes nothing.
    at_most("invalid_tokens", "addresses", report.invalid_tokens.len())?;
    at_most("cached_denials", "entries", report.cached_denials.len())?;
    at_most("leased", "entries", report.leased.len())?;
    state.metrics.reports.inc();
    let now = crate::store::now_ms();
    state
        .signals
        .report(now, report.responses, report.server_errors);
    for address in &report.invalid_tokens {
        state.guard.strike(&address.ip, address.count);
    }
    let snapshot = state.limiter.config().snapshot();
    for leased in &report.leased {
        // Labels only from the configuration: a rule it does not have counts as `other`.
        let rule = if snapshot
            .rules
            .rules()
            .iter()
            .any(|rule| rule.name == leased.rule)
        {
            leased.rule.as_str()
        } else {
            "other"
        };
        state.metrics.leased_admissions(rule, leased.count);
    }
    if let Some(recorder) = state.limiter.recorder() {
        recorder.record_cached(&snapshot, &report.cached_denials);
        recorder.record_leased(&snapshot, &report.leased);
    }
    Ok(StatusCode::NO_CONTENT)
}

/// A report's list `field` holds at most [`MAX_REPORTED_ADDRESSES`] `items`.
fn at_most(field: &str, items: &str, len: usize) -> Result<(), ApiError> {
    if len > MAX_REPORTED_ADDRESSES {
        return Err(ApiError::invalid(
            field,
            format!("at most {MAX_REPORTED_ADDRESSES} {items} per report, got {len}"),
        ));
    }
    Ok(())
}

/// The version as an entity tag.
pub fn etag(version: u64) -> String {
    format!("\"{version}\"")
}

/// What the filter needs of the configuration (rules, lists), built once per version. The
/// filter asks with the version it holds (`If-None-Match`): unchanged, it gets `304`.
async fn filter_view(State(state): State<CheckState>, headers: HeaderMap) -> Response {
    let snapshot = state.limiter.config().snapshot();
    let tag = etag(snapshot.version);
    let unchanged = headers
        .get(header::IF_NONE_MATCH)
        .and_then(|value| value.to_str().ok())
        .is_some_and(|value| value.split(',').any(|t| t.trim() == tag));
    if unchanged {
        return (StatusCode::NOT_MODIFIED, [(header::ETAG, tag)]).into_response();
    }
    (
        [
            (header::ETAG, tag),
            (header::CONTENT_TYPE, "application/json".to_owned()),
        ],
        snapshot.filter_view.clone(),
    )
        .into_response()
}

async fn metrics(State(state): State<CheckState>) -> Response {
    crate::metrics::exposition(&state.metrics)
}

pub async fn healthz() -> Json<serde_json::Value> {
    Json(serde_json::json!({ "status": "ok" }))
}

/// Ready when the counters' store answers a `PING` (and its circuit is closed) and the
/// configuration was read from its store.
async fn readyz(State(state): State<CheckState>) -> (StatusCode, Json<serde_json::Value>) {
    readiness(&state.limiter).await
}

pub async fn readiness(limiter: &Limiter) -> (StatusCode, Json<serde_json::Value>) {
    let store = limiter.store();
    let config = limiter.config();
    // An open circuit answers by the fallback: Envoy's health checks should send the
    // checks to a controller whose store answers, while there is one.
    let problem = match store.ping().await {
        Err(error) => Err(store.circuit().unwrap_or_else(|| error.to_string())),
        Ok(()) => Ok(()),
    };
    let problem = match problem {
        Err(error) => Some(error),
        Ok(()) if !config.is_ready() => Some(match config.invalid_stored() {
            Some((version, error)) => {
                format!("the stored configuration (version {version}) does not validate: {error}")
            }
            None => format!(
                "the configuration has not been read from {}",
                config.store().describe()
            ),
        }),
        Ok(()) => None,
    };
    let version = config.snapshot().version;
    match problem {
        None => (
            StatusCode::OK,
            Json(serde_json::json!({
                "status": "ready", "store": store.describe(), "config_version": version,
            })),
        ),
        Some(error) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(serde_json::json!({
                "status": "not_ready", "store": store.describe(), "error": error,
                "config_version": version,
            })),
        ),
    }
}
