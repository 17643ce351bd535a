//! Admin requests are handled on tokio's blocking pool, never on the runtime's workers: the
//! workers answer checks, and an Envoy filter gives a check 200 ms before it falls back to
//! its failure mode. An admin request can hold its thread for seconds (a 16 MB import is
//! read, validated and compiled into the next snapshot, an export rendered), and it does so
//! on a thread of its own.
//!
//! The whole handler runs there, not only its parse: [`crate::config::LiveConfig::change`]
//! validates and compiles the next snapshot before it commits it, and that is as long again
//! as the parse. The handler is driven by the runtime's handle (`block_on`), so it awaits
//! the store as it always did.
//!
//! The request limit ([`super::REQUEST_TIMEOUT`]) now holds while a handler computes: the
//! answer (408) leaves when it runs out, where a handler busy on a worker used to keep even
//! the timer from firing. The handler is then dropped at its next await (the import awaits
//! once between its parse and its change, so that an import answered 408 is not applied).
//! A parse under way cannot be interrupted: it finishes first, on its own thread, holding
//! one of the [`AT_ONCE`] places until then.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use tokio::sync::Semaphore;

use crate::error::ApiError;

/// How many admin requests are handled at once; more wait their turn (within the request
/// limit). Two, as many as the two workers of a two-core controller could run before: admin
/// work takes no more cores, nor memory, at once than it could then (a 16 MB YAML import of
/// small flow collections takes 1.6 GB while `serde_yaml_ng` holds its events, and 5 s).
pub const AT_ONCE: usize = 2;

/// The places for [`off_the_workers`], one set per admin router.
pub fn places() -> Arc<Semaphore> {
    Arc::new(Semaphore::new(AT_ONCE))
}

/// Middleware: runs the rest of the request on the blocking pool, once a place is free.
pub async fn off_the_workers(
    State(places): State<Arc<Semaphore>>,
    request: Request,
    next: Next,
) -> Response {
    let Ok(place) = places.acquire_owned().await else {
        return internal("the admin API is stopping");
    };
    let runtime = tokio::runtime::Handle::current();
    // Dropped with this future (the request limit ran out, the client went): the handler
    // then stops at its next await.
    let (_going_on, gone) = tokio::sync::oneshot::channel::<()>();
    let handled = tokio::task::spawn_blocking(move || {
        let _place = place;
        runtime.block_on(async move {
            tokio::select! {
                biased;
                _ = gone => None,
                response = next.run(request) => Some(response),
            }
        })
    })
    .await;
    match handled {
        Ok(Some(response)) => response,
        // Not while this future holds the sender.
        Ok(None) => internal("the request was abandoned"),
        Err(error) => {
            tracing::error!(%error, "an admin request failed");
            internal("the request failed")
        }
    }
}

fn internal(message: &str) -> Response {
    ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", message).into_response()
}
