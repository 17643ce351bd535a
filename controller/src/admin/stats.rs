//! What the limiter did (per rule, per tier, the top clients) and tuning hints, over the
//! last minute or hour, merged over every controller that shares the store.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;
use serde::Deserialize;
use sluice_protocol::admin::{HintsBody, StatsBody};

use super::auth::Reader;
use super::{versioned, AdminState};
use crate::error::{ApiError, ValidQuery};
use crate::stats::{self, Window};

/// Longest top lists asked for (each summary holds [`stats::TOP_CAPACITY`] clients).
const MAX_TOP: usize = stats::TOP_CAPACITY;

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct StatsQuery {
    /// `1m` (default) or `1h`.
    pub window: Option<Window>,
    /// Entries of each top list (default 10, at most 64).
    pub top: Option<usize>,
}

pub(super) async fn gather(state: &AdminState, query: &StatsQuery) -> Result<StatsBody, ApiError> {
    let Some(recorder) = state.limiter.recorder() else {
        return Err(ApiError::conflict(
            "this controller keeps no stats (it runs with --stats false)",
        ));
    };
    let top = query.top.unwrap_or(10);
    if top > MAX_TOP {
        return Err(ApiError::invalid(
            "top",
            format!("at most {MAX_TOP}, got {top}"),
        ));
    }
    let window = query.window.unwrap_or(Window::Minute);
    Ok(stats::stats(recorder, state.limiter.store(), window, top).await)
}

#[utoipa::path(get, path = "/v1/admin/stats", tag = "stats", params(StatsQuery),
    responses((status = 200, body = StatsBody), (status = 400, body = sluice_protocol::admin::ErrorBody),
              (status = 409, body = sluice_protocol::admin::ErrorBody)),
    security(("bearer" = [])))]
pub async fn get_stats(
    State(state): State<AdminState>,
    _: Reader,
    ValidQuery(query): ValidQuery<StatsQuery>,
) -> Result<Response, ApiError> {
    let body = gather(&state, &query).await?;
    Ok(versioned(
        StatusCode::OK,
        state.config.snapshot().version,
        &body,
    ))
}

#[utoipa::path(get, path = "/v1/admin/hints", tag = "stats", params(StatsQuery),
    responses((status = 200, body = HintsBody), (status = 400, body = sluice_protocol::admin::ErrorBody),
              (status = 409, body = sluice_protocol::admin::ErrorBody)),
    security(("bearer" = [])))]
pub async fn get_hints(
    State(state): State<AdminState>,
    _: Reader,
    ValidQuery(query): ValidQuery<StatsQuery>,
) -> Result<Response, ApiError> {
    let body = gather(&state, &query).await?;
    Ok(versioned(
        StatusCode::OK,
        state.config.snapshot().version,
        &stats::hints(&body),
    ))
}
