//! The Sluice controller as a library: `main.rs` only reads settings and calls [`serve`].

pub mod api;
pub mod config;
pub mod keys;
pub mod limiter;
pub mod settings;
pub mod store;
pub mod strategy;

use std::sync::Arc;
use std::time::Duration;

use axum::serve::ListenerExt;
use tokio::net::TcpListener;

use crate::limiter::Limiter;
use crate::settings::Settings;
use crate::store::{MemoryStore, RedisStore, Store, SystemClock};

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    #[error("--redis-url: {0}")]
    Redis(store::StoreError),
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
}

/// The store the settings ask for.
pub fn build_store(settings: &Settings) -> Result<Arc<dyn Store>, StartError> {
    match &settings.redis_url {
        Some(url) => {
            let timeout = Duration::from_millis(settings.redis_timeout_ms);
            Ok(Arc::new(
                RedisStore::new(url, timeout).map_err(StartError::Redis)?,
            ))
        }
        None => Ok(Arc::new(MemoryStore::new(Arc::new(SystemClock)))),
    }
}

/// Loads rules, opens the store, and serves until `shutdown` completes.
pub async fn serve(
    settings: Settings,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), StartError> {
    let policy = match &settings.config {
        Some(path) => config::load(path)?,
        None => {
            tracing::warn!("no --config given: no rule applies, every check is allowed");
            config::Policy::default()
        }
    };
    let store = build_store(&settings)?;
    if settings.redis_url.is_none() {
        tracing::warn!(
            "no --redis-url given: using the embedded in-memory store; counters are local to this process"
        );
    }
    tracing::info!(
        rules = policy.rules.rules().len(),
        api_keys = policy.api_keys.len(),
        store = %store.describe(),
        "starting"
    );
    let limiter = Arc::new(Limiter::new(policy.rules, store).with_api_keys(policy.api_keys));
    let listener =
        TcpListener::bind(settings.listen)
            .await
            .map_err(|source| StartError::Listen {
                addr: settings.listen,
                source,
            })?;
    tracing::info!(addr = %settings.listen, "listening");
    // Replies go out at once: Envoy waits on each one (Nagle would hold a reply written in
    // parts until the previous part is acknowledged).
    let listener = listener.tap_io(|stream| {
        if let Err(error) = stream.set_nodelay(true) {
            tracing::debug!("cannot set TCP_NODELAY: {error}");
        }
    });
    axum::serve(listener, api::app(api::AppState { limiter }))
        .with_graceful_shutdown(shutdown)
        .await
        .map_err(|source| StartError::Listen {
            addr: settings.listen,
            source,
        })
}

/// Completes on Ctrl-C or SIGTERM.
pub async fn shutdown_signal() {
    let interrupt = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = interrupt => {},
        () = terminate => {},
    }
    tracing::info!("shutting down");
}
