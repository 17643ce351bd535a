//! The admin surface, on its own address: the configuration (rules, tiers, API keys,
//! lists) read and changed while traffic flows, counters inspected and reset, the system
//! state, the audit log, and the OpenAPI document that describes all of it. Every route but
//! the OpenAPI document (which holds no data) needs a bearer token ([`auth`]); changes need
//! the `admin` role. Nothing here is on the
//! check path: a change builds a new snapshot and swaps it in ([`crate::config::LiveConfig`]),
//! and every request under [`sluice_protocol::admin::ADMIN_PREFIX`] is handled off the
//! threads that answer checks ([`offload`]). Every document it reads is refused if nested
//! deeper than [`depth::MAX_DEPTH`], before it is parsed.

pub mod auth;
mod config;
mod counters;
mod dashboard;
pub mod depth;
mod entities;
mod keys;
mod lists;
pub mod offload;
pub mod openapi;
mod protection;
mod stats;
pub mod stream;
pub mod system;

use std::sync::Arc;
use std::time::Duration;

use axum::extract::DefaultBodyLimit;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get};
use axum::{Json, Router};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tower_http::timeout::TimeoutLayer;

use crate::check::limiter::Limiter;
use crate::config::{ChangeError, ConfigSource, LiveConfig, Snapshot};
use crate::error::ApiError;
use auth::Tokens;

/// Largest body of a change (a rule, a key, a list entry).
pub const MAX_BODY_BYTES: usize = 1 << 20;
/// Largest configuration an import may carry.
pub const MAX_IMPORT_BYTES: usize = 16 << 20;
/// Longest an admin request may take: the layer that enforces it is outside every other,
/// and the handlers run off the runtime's workers ([`offload`]), so that a handler busy
/// parsing does not keep the timer from firing.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Clone)]
pub struct AdminState {
    pub config: Arc<LiveConfig>,
    pub limiter: Arc<Limiter>,
    pub tokens: Arc<Tokens>,
    pub metrics: Arc<crate::metrics::Metrics>,
    /// Ends the event streams when the controller stops.
    pub stopping: Stopping,
    /// The stats streams open (bounded per token and in all).
    pub streams: Arc<stream::OpenStreams>,
}

/// Whether the controller is stopping: long answers (the stats stream) end when it is, so
/// that a graceful shutdown does not wait for their clients. The default never stops.
#[derive(Clone, Default)]
pub struct Stopping(Option<tokio::sync::watch::Receiver<bool>>);

impl Stopping {
    /// Stopping once `stopped` holds `true` (or its sender is gone).
    pub fn on(stopped: tokio::sync::watch::Receiver<bool>) -> Stopping {
        Stopping(Some(stopped))
    }

    /// Completes when the controller stops.
    pub async fn wait(&mut self) {
        match &mut self.0 {
            Some(stopped) => {
                let _ = stopped.wait_for(|stop| *stop).await;
            }
            None => std::future::pending().await,
        }
    }
}

pub fn app(state: AdminState) -> Router {
    let prefix = sluice_protocol::admin::ADMIN_PREFIX;
    let api = Router::new()
        .route("/version", get(config::version))
        .route("/build", get(system::build))
        .route(
            "/config",
            get(config::export)
                .put(config::import)
                .layer(DefaultBodyLimit::max(MAX_IMPORT_BYTES)),
        )
        .route(
            "/rules",
            get(entities::list_rules).post(entities::create_rule),
        )
        .route(
            "/rules/{name}",
            get(entities::get_rule)
                .put(entities::update_rule)
                .delete(entities::delete_rule),
        )
        .route(
            "/tiers",
            get(entities::list_tiers).post(entities::create_tier),
        )
        .route(
            "/tiers/{name}",
            get(entities::get_tier)
                .put(entities::update_tier)
                .delete(entities::delete_tier),
        )
        .route("/api-keys", get(keys::list).post(keys::create))
        .route(
            "/api-keys/{sha256}",
            get(keys::get).put(keys::update).delete(keys::delete),
        )
        .route("/lists/{list}", get(lists::list).post(lists::add))
        .route("/lists/{list}/{id}", get(lists::get).delete(lists::remove))
        .route("/counters", get(counters::inspect).delete(counters::reset))
        .route("/protection/blocks", get(protection::list))
        .route("/protection/blocks/{ip}", delete(protection::lift))
        .route("/state", get(system::get_state).put(system::set_state))
        .route(
            "/enforcement",
            get(system::get_enforcement).put(system::set_enforcement),
        )
        .route("/stats", get(stats::get_stats))
        .route("/stats/stream", get(stream::get_stats_stream))
        .route("/hints", get(stats::get_hints))
        .route("/audit", get(system::audit))
        .route("/whoami", get(system::whoami))
        .route("/openapi.json", get(openapi::serve))
        .method_not_allowed_fallback(crate::error::method_not_allowed)
        .layer(axum::middleware::from_fn_with_state(
            offload::places(),
            offload::off_the_workers,
        ));
    Router::new()
        .nest(prefix, api)
        .route("/healthz", get(crate::check::healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/dashboard", get(dashboard::page))
        .route("/dashboard/{asset}", get(dashboard::asset))
        .fallback(crate::error::not_found)
        .method_not_allowed_fallback(crate::error::method_not_allowed)
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(TimeoutLayer::with_status_code(
            StatusCode::REQUEST_TIMEOUT,
            REQUEST_TIMEOUT,
        ))
        .with_state(state)
}

/// Prometheus's scrape: counts only, no configuration and no client, so no token.
async fn metrics(axum::extract::State(state): axum::extract::State<AdminState>) -> Response {
    crate::metrics::exposition(&state.metrics)
}

async fn readyz(
    axum::extract::State(state): axum::extract::State<AdminState>,
) -> impl IntoResponse {
    crate::check::readiness(&state.limiter).await
}

/// A reply with the configuration's version as its `ETag`.
pub fn versioned<T: Serialize>(status: StatusCode, version: u64, body: &T) -> Response {
    let mut response = (status, Json(body)).into_response();
    if let Ok(tag) = HeaderValue::from_str(&crate::check::etag(version)) {
        response.headers_mut().insert(header::ETAG, tag);
    }
    response
}

/// A JSON body, refused before it is parsed if nested deeper than [`depth::MAX_DEPTH`];
/// a parse error names the field.
pub fn json_body<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    depth::check(body, crate::config::file::Format::Json)?;
    crate::error::parse_json(body)
}

/// The version a change was made from (`If-Match: "12"`), if the caller names one.
pub fn if_match(headers: &HeaderMap) -> Result<Option<u64>, ApiError> {
    let Some(value) = headers.get(header::IF_MATCH) else {
        return Ok(None);
    };
    let text = value.to_str().unwrap_or_default().trim();
    if text == "*" {
        return Ok(None);
    }
    text.trim_start_matches("W/")
        .trim_matches('"')
        .parse::<u64>()
        .map(Some)
        .map_err(|_| {
            ApiError::invalid(
                "If-Match",
                format!("`{text}` is not a version (the ETag of a read, such as \"12\")"),
            )
        })
}

/// Refuses changes to the document when it is managed by a file (`--config-source file`).
pub fn document_writable(state: &AdminState) -> Result<(), ApiError> {
    match state.config.source() {
        ConfigSource::Store => Ok(()),
        ConfigSource::File => Err(ApiError::conflict(
            "the configuration is managed by the file given with --config (--config-source \
             file): change the file and restart, or run with --config-source store",
        )),
    }
}

/// An entity the change made no sense without.
pub fn missing(what: &str, name: &str) -> ChangeError {
    ChangeError::NotFound(format!("there is no {what} `{name}`"))
}

/// Builds the change for the current snapshot's document.
pub fn with_document(
    snapshot: &Snapshot,
    edit: impl FnOnce(&mut sluice_protocol::ConfigDocument) -> Result<serde_json::Value, ChangeError>,
) -> Result<crate::config::Change, ChangeError> {
    let mut document = snapshot.document.clone();
    let detail = edit(&mut document)?;
    Ok(crate::config::Change {
        document,
        operations: snapshot.operations.clone(),
        detail,
    })
}
