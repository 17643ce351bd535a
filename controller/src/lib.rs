//! The Sluice controller as a library: `main.rs` reads the settings and calls [`serve`].
//!
//! - [`check`]: the hot path the filter calls (check, release, its configuration view);
//! - [`rls`]: Envoy's rate-limit service API (gRPC) for Envoy's native rate-limit filter;
//! - [`admin`]: the admin API on its own address (auth, audit, OpenAPI);
//! - [`config`]: the configuration model, its validation, store and live snapshot;
//! - [`store`], [`strategy`], [`keys`]: counters, the algorithms, every Redis key;
//! - [`automatic`], [`protection`]: the system state following the upstream's health, and
//!   addresses blocked for invalid credentials; [`metrics`]: what Prometheus scrapes.

pub mod admin;
pub mod alerts;
pub mod automatic;
pub mod build;
pub mod check;
pub mod config;
pub mod error;
pub mod keys;
pub mod listener;
pub mod metrics;
pub mod protection;
pub mod rls;
pub mod settings;
pub mod sketch;
pub mod stats;
pub mod store;
pub mod strategy;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use crate::admin::auth::Tokens;
use crate::alerts::Webhooks;
use crate::automatic::Signals;
use crate::check::credential::{CheckTokens, LeaseSigner};
use crate::check::limiter::Limiter;
use crate::config::{ConfigStore, LiveConfig, MemoryConfigStore, RedisConfigStore};
use crate::metrics::Metrics;
use crate::settings::{setting_error, Mode, SettingError, Settings};
use crate::stats::Recorder;
use crate::store::breaker::GuardedStore;
use crate::store::{MemoryStore, RedisStore, Store, SystemClock};

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Setting(#[from] SettingError),
    #[error("{0}")]
    Config(String),
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// The counters' store and the configuration's.
pub struct Stores {
    pub counters: Arc<dyn Store>,
    pub config: Arc<dyn ConfigStore>,
}

/// The stores the settings ask for: the counters', and the configuration's (on the same
/// connection when they share a Redis).
pub fn build_stores(settings: &Settings) -> Result<Stores, StartError> {
    // A single Redis, a Redis Cluster or a Sentinel's master (settings.rs).
    let Some(target) = settings.counters_redis() else {
        return Ok(Stores {
            counters: Arc::new(MemoryStore::new(Arc::new(SystemClock))),
            config: build_config_store(settings)?,
        });
    };
    let timeout = Duration::from_millis(settings.redis_timeout_ms);
    let counters = RedisStore::open(&target, timeout)
        .map_err(|e| setting_error(target.setting(), e.to_string()))?;
    let config: Arc<dyn ConfigStore> = if settings.config_shares_counters_redis() {
        Arc::new(RedisConfigStore::on(
            counters.connection(),
            &target,
            settings.audit_length,
        ))
    } else {
        build_config_store(settings)?
    };
    Ok(Stores {
        counters: Arc::new(counters),
        config,
    })
}

/// The configuration's store the settings ask for, on a connection of its own.
pub fn build_config_store(settings: &Settings) -> Result<Arc<dyn ConfigStore>, StartError> {
    match settings.config_redis() {
        Some(target) => {
            let timeout = Duration::from_millis(settings.redis_timeout_ms);
            let setting = match target {
                store::RedisTarget::Single(_) if settings.config_redis_url.is_some() => {
                    "config_redis_url"
                }
                _ => target.setting(),
            };
            let store = RedisConfigStore::open(&target, timeout, settings.audit_length)
                .map_err(|e| setting_error(setting, e.to_string()))?;
            Ok(Arc::new(store))
        }
        None => {
            let store = MemoryConfigStore::open(settings.state_file.clone(), settings.audit_length)
                .map_err(|e| setting_error("state_file", e.to_string()))?;
            Ok(Arc::new(store))
        }
    }
}

/// The admin tokens the settings give (file and environment together).
pub fn admin_tokens(settings: &Settings) -> Result<Tokens, StartError> {
    let from_file = match &settings.admin_tokens_file {
        Some(path) => Tokens::from_file(path).map_err(|e| setting_error("admin_tokens_file", e))?,
        None => Tokens::default(),
    };
    let from_env = match &settings.admin_tokens {
        Some(text) => Tokens::from_text(text).map_err(|e| setting_error("admin_tokens", e))?,
        None => Tokens::default(),
    };
    let tokens = from_file
        .merge(from_env)
        .map_err(|e| setting_error("admin_tokens", e))?;
    if settings.mode == Mode::Production && !tokens.has_admin() {
        return Err(setting_error(
            "admin_tokens_file",
            "production mode needs at least one admin token (a tokens file, or \
             SLUICE_ADMIN_TOKENS=name:admin:token; or run with --mode development)",
        )
        .into());
    }
    Ok(tokens)
}

/// The check tokens the settings give (file and environment together). Production mode
/// needs one: without it anyone who reaches the check address can spend any client's quota,
/// report invalid tokens or release leases.
pub fn check_tokens(settings: &Settings) -> Result<CheckTokens, StartError> {
    let from_file = match &settings.check_tokens_file {
        Some(path) => {
            CheckTokens::from_file(path).map_err(|e| setting_error("check_tokens_file", e))?
        }
        None => CheckTokens::default(),
    };
    let from_env = match &settings.check_tokens {
        Some(text) => CheckTokens::from_text(text).map_err(|e| setting_error("check_tokens", e))?,
        None => CheckTokens::default(),
    };
    let tokens = from_file
        .merge(from_env)
        .map_err(|e| setting_error("check_tokens", e))?;
    if tokens.is_empty() {
        if settings.mode == Mode::Production {
            return Err(setting_error(
                "check_tokens_file",
                "production mode needs at least one check token, the credential the proxies \
                 present (a file of tokens, or SLUICE_CHECK_TOKENS=token; the filter's \
                 `controller.token_env`); or run with --mode development",
            )
            .into());
        }
        tracing::warn!(
            "NO CHECK TOKEN: the check address ({}) and the gRPC API take any caller for a \
             proxy. Anyone who reaches them can spend any client's quota, report invalid \
             tokens to get addresses blocked, release leases and read the lists. Give \
             SLUICE_CHECK_TOKENS or --check-tokens-file (development mode only).",
            settings.listen
        );
    } else {
        tracing::info!(
            tokens = tokens.len(),
            "check address and gRPC API need a check token"
        );
    }
    Ok(tokens)
}

/// Opens the stores, loads the configuration, and serves the check and admin APIs (and
/// Envoy's rate-limit service API, when asked for) until `shutdown` completes.
pub async fn serve(
    settings: Settings,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), StartError> {
    let tokens = admin_tokens(&settings)?;
    let check_tokens = Arc::new(check_tokens(&settings)?);
    let bootstrap = match &settings.config {
        Some(path) => Some(config::file::load(path).map_err(StartError::Config)?),
        None => None,
    };
    let Stores {
        counters,
        config: config_store,
    } = build_stores(&settings)?;
    if settings.counters_redis().is_none() {
        tracing::warn!(
            "no --redis-url given: counting in the embedded in-memory store; counters are local to this process"
        );
    }
    if let Err(risk) = config_store.durability().await {
        tracing::warn!("{risk}");
    }
    let live = LiveConfig::start(config_store, bootstrap, settings.config_source).await;
    let watcher = live.watch(Duration::from_millis(settings.config_poll_ms));
    let snapshot = live.snapshot();
    tracing::info!(
        version = snapshot.version,
        rules = snapshot.rules.rules().len(),
        tiers = snapshot.document.tiers.len(),
        api_keys = snapshot.api_keys.len(),
        counters = %counters.describe(),
        config = %live.store().describe(),
        "starting"
    );
    let metrics = Arc::new(Metrics::new());
    // The embedded store cannot fail; Redis is guarded by the circuit breaker.
    let counters: Arc<dyn Store> = if settings.counters_redis().is_some() {
        Arc::new(GuardedStore::new(
            counters,
            settings.breaker,
            Arc::clone(&metrics),
        ))
    } else {
        counters
    };
    let (guard, protection_task) = protection::start(
        Arc::clone(&live),
        Arc::clone(&counters),
        Arc::clone(&metrics),
    );
    let signals = Arc::new(Signals::default());
    let automatic_task = automatic::run(
        Arc::clone(&live),
        Arc::clone(&signals),
        Arc::clone(&metrics),
    );
    let recorder = settings
        .stats
        .then(|| Arc::new(Recorder::new(&settings.controller_id, Arc::clone(&metrics))));
    let (webhooks, webhook_task) = Webhooks::start(Arc::clone(&metrics));
    let stats_task = recorder.as_ref().map(|recorder| {
        stats::run(
            Arc::clone(recorder),
            Arc::clone(&live),
            Arc::clone(&counters),
            Arc::clone(&metrics),
            webhooks,
        )
    });
    let limiter = Arc::new(
        Limiter::new(Arc::clone(&live), counters)
            .with_lease_signer(LeaseSigner::new(&check_tokens))
            .with_grant_signer(LeaseSigner::for_grants(&check_tokens))
            .with_guard(Arc::clone(&guard))
            .with_observability(Arc::clone(&metrics), recorder),
    );

    let (stop, stopped) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        shutdown.await;
        let _ = stop.send(true);
    });
    let until_stopped = |mut stopped: tokio::sync::watch::Receiver<bool>| async move {
        let _ = stopped.wait_for(|stop| *stop).await;
    };

    // Each listener's caps and timeouts (listener.rs).
    let check_limits = listener::Limits::check(&settings);
    let admin_limits = listener::Limits::admin(&settings);
    let grpc_limits = listener::Limits::grpc(&settings);
    listener::warn_if_files_short(&settings);
    // TLS on the listeners, when asked for: its files are read and checked before any
    // listener is bound, and a bad one stops the start naming its setting.
    let tls = listener::Tls::load(&settings)?;
    match &tls {
        Some(tls) => tracing::info!(
            client_certificates = if settings.tls_client_ca_file.is_some() {
                "required on the check address and the gRPC API"
            } else {
                "not asked for"
            },
            admin_tls = tls.admin.is_some(),
            "the listeners speak TLS only"
        ),
        None => tracing::info!(
            "no TLS on the listeners: the check and admin tokens cross the network in clear \
             unless the network protects them (a mesh's mTLS); see --tls-cert-file"
        ),
    }

    let check_listener = listener::bind(settings.listen).await?;
    tracing::info!(addr = %settings.listen, tls = tls.is_some(), "check API listening");
    let check_app = check::app(
        check::CheckState {
            limiter: Arc::clone(&limiter),
            signals,
            guard,
            metrics: Arc::clone(&metrics),
            tokens: Arc::clone(&check_tokens),
            reporters: Default::default(),
            views: Default::default(),
        },
        settings.check_metrics,
    );
    let check_server = listener::serve(
        check_listener,
        check_app,
        check_limits,
        tls.as_ref().map(|tls| tls.check.clone()),
        Arc::clone(&metrics),
        stopped.clone(),
    );

    let admin_server = if tokens.is_empty() {
        tracing::warn!(
            "no admin tokens: the admin API is not served (development mode); give a tokens \
             file or SLUICE_ADMIN_TOKENS to serve it"
        );
        None
    } else {
        let admin_listener = listener::bind(settings.admin_listen).await?;
        let admin_tls = tls.as_ref().and_then(|tls| tls.admin.clone());
        tracing::info!(
            addr = %settings.admin_listen,
            tls = admin_tls.is_some(),
            "admin API listening"
        );
        let admin_app = admin::app(admin::AdminState {
            config: Arc::clone(&live),
            limiter: Arc::clone(&limiter),
            tokens: Arc::new(tokens),
            metrics: Arc::clone(&metrics),
            stopping: admin::Stopping::on(stopped.clone()),
            streams: Default::default(),
        });
        Some(listener::serve(
            admin_listener,
            admin_app,
            admin_limits,
            admin_tls,
            Arc::clone(&metrics),
            stopped.clone(),
        ))
    };
    let grpc_done = rls::listen(
        settings.grpc_listen,
        grpc_limits,
        tls.map(|tls| tls.grpc),
        Arc::clone(&limiter),
        check_tokens,
        Arc::clone(&metrics),
        until_stopped(stopped.clone()),
    )
    .await?;
    let check_done = async move {
        check_server.await;
        Ok::<(), StartError>(())
    };
    let admin_done = async move {
        if let Some(server) = admin_server {
            server.await;
        }
        Ok::<(), StartError>(())
    };
    let served = tokio::try_join!(check_done, admin_done, grpc_done).map(|_| ());
    watcher.abort();
    automatic_task.abort();
    protection_task.abort();
    webhook_task.abort();
    if let Some(task) = stats_task {
        task.abort();
    }
    served
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
