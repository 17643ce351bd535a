//! The hot path: what the filter calls on the check address (the check call, releases, its
//! view of the configuration and its reports), with health and readiness. Nothing here takes a lock the
//! admin surface holds: each call reads the configuration snapshot once.

pub mod credential;
pub mod grant;
pub mod limiter;
pub mod report;

use std::sync::Arc;

use axum::extract::{DefaultBodyLimit, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use sluice_protocol::usage::MAX_POINTER_BYTES;
use sluice_protocol::{
    CheckRequest, CheckResponse, FilterView, ReleaseRequest, CHECK_PATH, CONFIG_PATH,
    MAX_CALL_BODY_BYTES, MAX_CHECK_HEADERS, MAX_GRANT_TOKEN_BYTES, MAX_HEADER_NAME_BYTES,
    MAX_IDENTITY_BYTES, MAX_METHOD_BYTES, MAX_REQUEST_FIELD_BYTES, MAX_REQUEST_FIGURES,
    MAX_SETTLEMENTS_PER_CALL, MAX_USAGE, RELEASE_PATH, REPORT_PATH,
};

use crate::automatic::Signals;
use crate::error::{parse_json, ApiError, Body};
use crate::metrics::Metrics;
use crate::protection::{BlockSet, Guard};
use credential::CheckTokens;
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
    /// Who may call: the deployment's check tokens (none: anyone, development only).
    pub tokens: Arc<CheckTokens>,
    /// Who reported in the current period (each reporter counts once per period).
    pub reporters: Arc<report::Reporters>,
    /// The filter's view with protection's blocks.
    pub views: Arc<ViewsWithBlocks>,
}

/// The check address's routes; `/metrics` too when `with_metrics`.
///
/// Who may call: the proxies, with a check token. Every route that reads or changes
/// anything (check, release, report, the configuration view) refuses a call without one
/// before its body is read; bodies are read up to [`MAX_CALL_BODY_BYTES`]. Health and
/// readiness stay open for probes: they read nothing and change nothing.
pub fn app(state: CheckState, with_metrics: bool) -> Router {
    let router = Router::new()
        .route(CHECK_PATH, post(check))
        .route(RELEASE_PATH, post(release))
        .route(REPORT_PATH, post(report::report))
        .route(CONFIG_PATH, get(filter_view))
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            credential::require,
        ))
        .layer(DefaultBodyLimit::max(MAX_CALL_BODY_BYTES))
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
    Body(body): Body,
) -> Result<Json<CheckResponse>, ApiError> {
    let began = std::time::Instant::now();
    let request: CheckRequest = parse_json(&body)?;
    bounded(&request)?;
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
    Body(body): Body,
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
    if request.returns.len() > MAX_CHECKS_PER_CALL {
        return Err(ApiError::invalid(
            "returns",
            format!(
                "at most {MAX_CHECKS_PER_CALL} returns per call, got {}",
                request.returns.len()
            ),
        ));
    }
    if let Some(index) = request
        .returns
        .iter()
        .position(|returned| returned.grant.len() > MAX_GRANT_TOKEN_BYTES)
    {
        return Err(ApiError::invalid(
            format!("returns[{index}].grant"),
            format!("at most {MAX_GRANT_TOKEN_BYTES} bytes"),
        ));
    }
    if request.settlements.len() > MAX_SETTLEMENTS_PER_CALL {
        return Err(ApiError::invalid(
            "settlements",
            format!(
                "at most {MAX_SETTLEMENTS_PER_CALL} settlements per call, got {}",
                request.settlements.len()
            ),
        ));
    }
    for (index, settlement) in request.settlements.iter().enumerate() {
        if settlement.reservation.len() > MAX_GRANT_TOKEN_BYTES {
            return Err(ApiError::invalid(
                format!("settlements[{index}].reservation"),
                format!("at most {MAX_GRANT_TOKEN_BYTES} bytes"),
            ));
        }
        if settlement.used > MAX_USAGE {
            return Err(ApiError::invalid(
                format!("settlements[{index}].used"),
                format!("at most {MAX_USAGE}"),
            ));
        }
    }
    let outcome = async {
        let freed = state.limiter.release(&request.leases).await?;
        let returned = state.limiter.return_leases(&request.returns).await?;
        let settled = state.limiter.settle(&request.settlements).await?;
        Ok::<_, ReleaseError>((freed, returned, settled))
    };
    match outcome.await {
        Ok((freed, returned, settled)) => {
            tracing::debug!(
                leases = request.leases.len(),
                freed,
                returns = request.returns.len(),
                settlements = request.settlements.len(),
                "release call served"
            );
            Ok(Json(serde_json::json!({
                "released": freed,
                "returned": returned,
                "settled": settled,
            })))
        }
        Err(ReleaseError::BadLease(bad)) => Err(ApiError::invalid(
            format!("leases[{}]", bad.index),
            bad.to_string(),
        )),
        Err(ReleaseError::BadReturn(bad)) => Err(ApiError::invalid(
            format!("returns[{}].unused", bad.index),
            bad.to_string(),
        )),
        Err(ReleaseError::Store(error)) => Err(ApiError::store_unavailable(&error)),
    }
}

/// Every bound of a check call, the first one broken named by its field: what reaches the
/// store's keys, the stats' sketches and the logs is never longer than these.
fn bounded(request: &CheckRequest) -> Result<(), ApiError> {
    if request.checks.len() > MAX_CHECKS_PER_CALL {
        return Err(ApiError::invalid(
            "checks",
            format!(
                "at most {MAX_CHECKS_PER_CALL} checks per call, got {}",
                request.checks.len()
            ),
        ));
    }
    if let Some(holder) = &request.lease_holder {
        longest("lease_holder", holder, 64)?;
    }
    for (index, check) in request.checks.iter().enumerate() {
        let field = |name: &str| format!("checks[{index}].{name}");
        report::client(&field("client"), &check.client)?;
        for (name, value) in [
            ("ip", &check.ip),
            ("user", &check.user),
            ("api_key", &check.api_key),
            ("tier", &check.tier),
        ] {
            if let Some(value) = value {
                longest(&field(name), value, MAX_IDENTITY_BYTES)?;
            }
        }
        longest(&field("host"), &check.host, MAX_REQUEST_FIELD_BYTES)?;
        longest(&field("method"), &check.method, MAX_METHOD_BYTES)?;
        longest(&field("path"), &check.path, MAX_REQUEST_FIELD_BYTES)?;
        if let Some(id) = &check.request_id {
            longest(&field("request_id"), id, 128)?;
        }
        if check.headers.len() > MAX_CHECK_HEADERS {
            return Err(ApiError::invalid(
                field("headers"),
                format!("at most {MAX_CHECK_HEADERS} headers"),
            ));
        }
        for (name, value) in &check.headers {
            longest(&field("headers"), name, MAX_HEADER_NAME_BYTES)?;
            longest(
                &field(&format!("headers.{name}")),
                value,
                MAX_REQUEST_FIELD_BYTES,
            )?;
        }
        if check.request_figures.len() > MAX_REQUEST_FIGURES {
            return Err(ApiError::invalid(
                field("request_figures"),
                format!("at most {MAX_REQUEST_FIGURES} figures"),
            ));
        }
        for (pointer, figure) in &check.request_figures {
            longest(&field("request_figures"), pointer, MAX_POINTER_BYTES)?;
            if *figure > MAX_USAGE {
                return Err(ApiError::invalid(
                    field(&format!("request_figures.{pointer}")),
                    format!("at most {MAX_USAGE}"),
                ));
            }
        }
    }
    Ok(())
}

fn longest(field: &str, value: &str, bytes: usize) -> Result<(), ApiError> {
    if value.len() > bytes {
        return Err(ApiError::invalid(
            field,
            format!("at most {bytes} bytes, got {}", value.len()),
        ));
    }
    Ok(())
}

/// The version as an entity tag.
pub fn etag(version: u64) -> String {
    format!("\"{version}\"")
}

/// What the filter needs of the configuration (rules, lists), built once per version, with
/// protection's blocks in its denylist. The entity tag is the version, and the blocks' tag
/// when there are any: a block changes what the filters read, not the version their denial
/// caches and leases are keyed by. The filter asks with the tag it holds (`If-None-Match`):
/// unchanged, it gets `304`.
async fn filter_view(State(state): State<CheckState>, headers: HeaderMap) -> Response {
    let user_agent = headers
        .get(header::USER_AGENT)
        .and_then(|agent| agent.to_str().ok());
    state.metrics.filter_config_read(user_agent);
    let legacy = crate::metrics::filter_release(user_agent) == "unknown";
    let snapshot = state.limiter.config().snapshot();
    let blocks = state.guard.blocks();
    let tag = view_tag(snapshot.version, blocks.tag);
    let unchanged = headers
        .get(header::IF_NONE_MATCH)
        .and_then(|value| value.to_str().ok())
        .is_some_and(|value| value.split(',').any(|t| t.trim() == tag));
    if unchanged {
        return (StatusCode::NOT_MODIFIED, [(header::ETAG, tag)]).into_response();
    }
    let (base, legacy) = match &snapshot.legacy_filter_view {
        Some(view) if legacy => (view, true),
        _ => (&snapshot.filter_view, false),
    };
    let body = if blocks.items.is_empty() {
        base.clone()
    } else {
        state.views.with_blocks(&snapshot, (base, legacy), &blocks)
    };
    (
        [
            (header::ETAG, tag),
            (header::CONTENT_TYPE, "application/json".to_owned()),
        ],
        body,
    )
        .into_response()
}

fn view_tag(version: u64, blocks: u64) -> String {
    if blocks == 0 {
        etag(version)
    } else {
        format!("\"{version}.{blocks:016x}\"")
    }
}

/// The filter's view with protection's blocks, built once per version, set of blocks and
/// form of the view (this release's, or the one for a filter that names none).
#[derive(Default)]
pub struct ViewsWithBlocks {
    built: arc_swap::ArcSwapOption<(u64, u64, bool, Vec<u8>)>,
}

impl ViewsWithBlocks {
    fn with_blocks(
        &self,
        snapshot: &crate::config::Snapshot,
        (base, legacy): (&[u8], bool),
        blocks: &BlockSet,
    ) -> Vec<u8> {
        if let Some(built) = self.built.load().as_ref() {
            let (version, tag, built_legacy, body) = &**built;
            if *version == snapshot.version && *tag == blocks.tag && *built_legacy == legacy {
                return body.clone();
            }
        }
        let Ok(mut view) = serde_json::from_slice::<FilterView>(base) else {
            return base.to_vec();
        };
        view.denylist.extend(blocks.items.iter().cloned());
        let body = serde_json::to_vec(&view).unwrap_or_else(|_| base.to_vec());
        self.built.store(Some(Arc::new((
            snapshot.version,
            blocks.tag,
            legacy,
            body.clone(),
        ))));
        body
    }
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
