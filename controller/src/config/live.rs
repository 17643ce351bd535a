//! The configuration this controller runs on: the current [`Snapshot`] behind one atomic
//! pointer, which the check path reads once per call, and the two ways it changes: a change
//! made here (committed to the store, then swapped in at once) and a change made by another
//! controller (seen by polling the store's version).
//!
//! Why polling and not Redis pub/sub: one `GET` of a small key every interval costs nothing
//! next to the checks, needs no second kind of connection, and behaves the same on a
//! single Redis, Redis Cluster and after a Sentinel failover, where subscriptions must be
//! re-established and messages sent meanwhile are lost. A missed message would need the
//! version poll as a safety net anyway; the poll alone is enough.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use sluice_protocol::admin::{AuditEntry, Operations};
use sluice_protocol::config::ConfigDocument;

use super::snapshot::Snapshot;
use super::store::{Commit, ConfigStore, Stored};
use super::validate::{self, FieldError};
use crate::store::now_ms;
use crate::store::StoreError;

/// What wins at start when the store and the file given with `--config` disagree.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ConfigSource {
    /// The store: the file only fills a store that holds nothing yet. Changes through the
    /// admin API are kept.
    Store,
    /// The file: at every start it replaces what the store holds (as a new version), and
    /// the admin API cannot change rules, tiers, keys or lists (the state it can).
    File,
}

/// Why a change was not made.
#[derive(Debug, thiserror::Error)]
pub enum ChangeError {
    #[error("{0}")]
    Invalid(FieldError),
    #[error("the configuration is at version {current}, not the one the change was made from")]
    VersionMismatch { current: u64 },
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// A change to make: the next document and operations, and what the audit log says of it.
pub struct Change {
    pub document: ConfigDocument,
    pub operations: Operations,
    /// The change itself, for the audit log (secrets never).
    pub detail: serde_json::Value,
}

/// Who made a change and what it was.
#[derive(Debug, Clone)]
pub struct Author<'a> {
    pub actor: &'a str,
    pub action: &'a str,
    pub target: &'a str,
}

/// How often a change is retried when another controller committed first (a change made
/// without `If-Match` applies to whatever version is current).
const COMMIT_ATTEMPTS: usize = 5;

pub struct LiveConfig {
    current: ArcSwap<Snapshot>,
    store: Arc<dyn ConfigStore>,
    source: ConfigSource,
    /// The file given with `--config`, until it has been applied as `source` says.
    bootstrap: std::sync::Mutex<Option<ConfigDocument>>,
    /// Whether the store answered the last read.
    reachable: AtomicBool,
    /// A stored version that does not validate here (see [`LiveConfig::invalid_stored`]).
    invalid: std::sync::Mutex<Option<(u64, FieldError)>>,
}

impl LiveConfig {
    /// A live configuration on `store`, starting from what it holds (and `bootstrap`, as
    /// `source` says). If the store cannot be read yet, it starts from `bootstrap` (or
    /// nothing) as version 0, not ready, and [`LiveConfig::refresh`] tries again.
    pub async fn start(
        store: Arc<dyn ConfigStore>,
        bootstrap: Option<ConfigDocument>,
        source: ConfigSource,
    ) -> Arc<LiveConfig> {
        let bootstrap = bootstrap.map(|mut document| {
            validate::normalize(&mut document);
            document
        });
        let initial = bootstrap
            .clone()
            .and_then(|document| Snapshot::build(0, document, Operations::default()).ok())
            .unwrap_or_else(Snapshot::empty);
        let live = Arc::new(LiveConfig {
            current: ArcSwap::from_pointee(initial),
            store,
            source,
            bootstrap: std::sync::Mutex::new(bootstrap),
            reachable: AtomicBool::new(false),
            invalid: std::sync::Mutex::new(None),
        });
        if let Err(error) = live.refresh().await {
            tracing::warn!(%error, "cannot read the configuration from the store yet; retrying");
        }
        live
    }

    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.current.load_full()
    }

    pub fn source(&self) -> ConfigSource {
        self.source
    }

    pub fn store(&self) -> &dyn ConfigStore {
        self.store.as_ref()
    }

    /// Whether the configuration came from the store, the store answered the last read,
    /// and what it holds validates here.
    pub fn is_ready(&self) -> bool {
        self.reachable.load(Ordering::SeqCst) && self.invalid_stored().is_none()
    }

    /// Reads the store's version and, when it is newer than ours, the configuration.
    pub async fn refresh(&self) -> Result<(), StoreError> {
        let read = self.read_store().await;
        self.reachable.store(read.is_ok(), Ordering::SeqCst);
        read
    }

    async fn read_store(&self) -> Result<(), StoreError> {
        if self.bootstrap_pending() {
            self.apply_bootstrap().await?;
        }
        let version = self.store.version().await?;
        if version == 0 || version <= self.snapshot().version {
            return Ok(());
        }
        let stored = self.store.load().await?;
        if stored.version <= self.snapshot().version {
            return Ok(());
        }
        // Validating and compiling a large configuration takes a while: not on the workers
        // the check path runs on.
        let version = stored.version;
        let built = tokio::task::spawn_blocking(move || {
            Snapshot::build(version, stored.document, stored.operations)
        })
        .await
        .map_err(|e| StoreError::Reply(format!("building the configuration failed: {e}")))?;
        self.install(version, built);
        Ok(())
    }

    fn bootstrap_pending(&self) -> bool {
        self.bootstrap
            .lock()
            .map(|pending| pending.is_some())
            .unwrap_or(false)
    }

    /// Applies the file given at start, once the store can be read.
    async fn apply_bootstrap(&self) -> Result<(), StoreError> {
        let Some(document) = self.bootstrap.lock().ok().and_then(|p| p.clone()) else {
            return Ok(());
        };
        // Validated when the file was read (`file::load`); a caller that gives a document
        // directly gets the same check here, before anything is stored.
        if let Err(error) = validate::validate(&document) {
            tracing::error!(%error, "the configuration to start from does not validate; not storing it");
            if let Ok(mut pending) = self.bootstrap.lock() {
                *pending = None;
            }
            return Ok(());
        }
        let stored = self.store.load().await?;
        let replace = match self.source {
            ConfigSource::Store => stored.version == 0,
            ConfigSource::File => stored.document != document,
        };
        if replace {
            let author = Author {
                actor: "bootstrap",
                action: "config.import",
                target: "configuration",
            };
            let from = stored.version;
            let next = Stored {
                version: from + 1,
                operations: stored.operations,
                document,
            };
            let audit = audit_entry(&author, from, serde_json::json!({ "from": "file" }));
            match self.store.commit(from, &next, &audit).await? {
                Commit::Done(version) => {
                    tracing::info!(version, "the configuration file was stored");
                }
                // Another controller stored it (or something else) first: theirs stands.
                Commit::Conflict(version) => {
                    tracing::info!(version, "another controller stored a configuration first");
                }
            }
        } else if stored.version > 0 && self.source == ConfigSource::Store {
            tracing::info!(
                version = stored.version,
                "the store holds a configuration: the file given with --config is not applied \
                 (--config-source file would replace it)"
            );
        }
        if let Ok(mut pending) = self.bootstrap.lock() {
            *pending = None;
        }
        Ok(())
    }

    /// Makes `snapshot` current unless a newer one already is (two changes, or a change and
    /// a poll, can finish in either order); whether it did.
    fn swap_in(&self, snapshot: &Arc<Snapshot>) -> bool {
        let mut installed = false;
        self.current.rcu(|current| {
            installed = current.version < snapshot.version;
            if installed {
                Arc::clone(snapshot)
            } else {
                Arc::clone(current)
            }
        });
        installed
    }

    /// Swaps in the stored configuration `version`, as built, if it is newer than ours.
    fn install(&self, version: u64, built: Result<Snapshot, FieldError>) {
        if version <= self.snapshot().version {
            return;
        }
        match built {
            Ok(snapshot) => {
                if let Ok(mut invalid) = self.invalid.lock() {
                    *invalid = None;
                }
                if self.swap_in(&Arc::new(snapshot)) {
                    tracing::info!(version, "configuration loaded");
                }
            }
            // Validated before it was stored; a document this build cannot read (written
            // by a newer controller, say) must not replace one it can.
            Err(error) => {
                tracing::error!(
                    version,
                    %error,
                    "the stored configuration does not validate here; keeping the previous one"
                );
                if let Ok(mut invalid) = self.invalid.lock() {
                    *invalid = Some((version, error));
                }
            }
        }
    }

    /// The stored version this controller cannot run on, and why (written by a newer
    /// controller, say): it keeps the version before, reports not ready, and refuses changes
    /// (they would be made from a version that is not the store's).
    pub fn invalid_stored(&self) -> Option<(u64, FieldError)> {
        self.invalid.lock().ok().and_then(|invalid| invalid.clone())
    }

    /// Polls the store every `interval` until the process ends.
    pub fn watch(self: &Arc<Self>, interval: Duration) -> tokio::task::JoinHandle<()> {
        let live = Arc::clone(self);
        tokio::spawn(async move {
            let mut ticker = tokio::time::interval(interval);
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut reported = false;
            loop {
                ticker.tick().await;
                match live.refresh().await {
                    Ok(()) => reported = false,
                    Err(error) if !reported => {
                        tracing::warn!(%error, "cannot read the configuration's version");
                        reported = true;
                    }
                    Err(_) => {}
                }
            }
        })
    }

    /// Makes a change: `make` builds it from the current snapshot; it is validated whole,
    /// committed if the configuration is still at the version it was made from (`if_match`,
    /// when given, must be that version), and swapped in here at once. Other controllers
    /// see it at their next poll.
    pub async fn change(
        &self,
        author: &Author<'_>,
        if_match: Option<u64>,
        make: impl Fn(&Snapshot) -> Result<Change, ChangeError>,
    ) -> Result<Arc<Snapshot>, ChangeError> {
        for _ in 0..COMMIT_ATTEMPTS {
            let current = self.snapshot();
            if let Some(expected) = if_match {
                if expected != current.version {
                    // Ours may lag; the store says for sure.
                    self.refresh().await?;
                    let current = self.snapshot();
                    if expected != current.version {
                        return Err(ChangeError::VersionMismatch {
                            current: current.version,
                        });
                    }
                }
            }
            let current = self.snapshot();
            let mut change = make(&current)?;
            validate::normalize(&mut change.document);
            let from = current.version;
            let snapshot =
                Snapshot::build(from + 1, change.document.clone(), change.operations.clone())
                    .map_err(ChangeError::Invalid)?;
            let next = Stored {
                version: from + 1,
                operations: change.operations,
                document: change.document,
            };
            let audit = audit_entry(author, from, change.detail);
            match self.store.commit(from, &next, &audit).await? {
                Commit::Done(version) => {
                    let snapshot = Arc::new(snapshot);
                    self.swap_in(&snapshot);
                    tracing::info!(
                        target: "sluice::audit",
                        actor = author.actor,
                        action = author.action,
                        target_name = author.target,
                        version_before = from,
                        version_after = version,
                        change = %audit.change,
                        "configuration changed"
                    );
                    return Ok(snapshot);
                }
                Commit::Conflict(current) => {
                    if if_match.is_some() {
                        return Err(ChangeError::VersionMismatch { current });
                    }
                    self.refresh().await?;
                    if let Some((version, error)) = self.invalid_stored() {
                        return Err(ChangeError::Conflict(format!(
                            "the stored configuration (version {version}) does not validate \
                             here ({error}): this controller cannot make changes on top of it"
                        )));
                    }
                }
            }
        }
        Err(ChangeError::Conflict(
            "the configuration kept changing under this change; try again".to_owned(),
        ))
    }
}

impl LiveConfig {
    /// Records an action that changed no configuration (a counter reset) in the audit log
    /// and the log.
    pub async fn record(
        &self,
        author: &Author<'_>,
        detail: serde_json::Value,
    ) -> Result<(), StoreError> {
        let version = self.snapshot().version;
        let mut audit = audit_entry(author, version, detail);
        audit.version_after = version;
        self.store.record(&audit).await?;
        tracing::info!(
            target: "sluice::audit",
            actor = author.actor,
            action = author.action,
            target_name = author.target,
            change = %audit.change,
            "action recorded"
        );
        Ok(())
    }
}

fn audit_entry(author: &Author<'_>, from: u64, change: serde_json::Value) -> AuditEntry {
    AuditEntry {
        at: validate::format_rfc3339(now_ms()),
        actor: author.actor.to_owned(),
        action: author.action.to_owned(),
        target: author.target.to_owned(),
        version_before: from,
        version_after: from + 1,
        change,
    }
}
