//! Where the configuration lives: in Redis (beside or apart from the counters), or for a
//! controller without Redis in memory and, when it has a state file, on disk. Either way a
//! change is committed only if the configuration is still at the version it was made from,
//! together with its audit entry, atomically.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use redis::Script;
use serde::{Deserialize, Serialize};
use sluice_protocol::admin::{AuditEntry, Operations};
use sluice_protocol::config::ConfigDocument;

use crate::keys;
use crate::store::{RedisConnection, RedisTarget, StoreError};

/// One version of the configuration, as stored.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Stored {
    pub version: u64,
    #[serde(default)]
    pub operations: Operations,
    #[serde(default)]
    pub document: ConfigDocument,
}

/// How a commit ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Commit {
    /// Stored as this version.
    Done(u64),
    /// The configuration had moved on to this version: nothing was written.
    Conflict(u64),
}

#[async_trait]
pub trait ConfigStore: Send + Sync {
    fn describe(&self) -> String;

    /// The stored version (0 when nothing was ever stored): cheap, polled by every
    /// controller.
    async fn version(&self) -> Result<u64, StoreError>;

    /// The stored configuration (version 0 and empty when nothing was ever stored).
    async fn load(&self) -> Result<Stored, StoreError>;

    /// Stores `next` (whose version must be `from + 1`) if the stored version is still
    /// `from`, with `audit` appended to the audit log.
    async fn commit(
        &self,
        from: u64,
        next: &Stored,
        audit: &AuditEntry,
    ) -> Result<Commit, StoreError>;

    /// The newest audit entries, newest first.
    async fn audit(&self, limit: usize) -> Result<Vec<AuditEntry>, StoreError>;

    /// Records an action that changed no configuration (a counter reset) in the audit log.
    async fn record(&self, audit: &AuditEntry) -> Result<(), StoreError>;

    /// Whether an acknowledged change survives a crash of the store, and if not, why.
    async fn durability(&self) -> Result<(), String>;

    /// Adds brute-force protection's `blocks` (address, end in ms), keeping at most `most`
    /// at once; returns the addresses blocked by this call. Blocks are not part of the
    /// configuration: no version, no audit entry.
    async fn add_blocks(
        &self,
        blocks: &[(String, u64)],
        now_ms: u64,
        most: usize,
    ) -> Result<Vec<String>, StoreError>;

    /// The blocks in force at `now_ms` (address, end in ms), at most `most`.
    async fn blocks(&self, now_ms: u64, most: usize) -> Result<Vec<(String, u64)>, StoreError>;

    /// Ends the block of `address` now; whether there was one.
    async fn remove_block(&self, address: &str) -> Result<bool, StoreError>;
}

fn encode<T: Serialize>(value: &T) -> Result<String, StoreError> {
    serde_json::to_string(value).map_err(|e| StoreError::Reply(format!("cannot encode: {e}")))
}

/// The configuration in Redis, under the keys `keys.rs` gives it. On a Redis Cluster they
/// share one hash tag (`{config}`): the commit script and the audit's `MULTI` touch one slot.
pub struct RedisConfigStore {
    connection: RedisConnection,
    target_for_logs: String,
    commit: Script,
    block: Script,
    audit_length: usize,
}

impl RedisConfigStore {
    /// On the single Redis at `url`.
    pub fn new(url: &str, timeout: Duration, audit_length: usize) -> Result<Self, StoreError> {
        RedisConfigStore::open(&RedisTarget::Single(url.to_owned()), timeout, audit_length)
    }

    /// On `target` (a single Redis, a Cluster, or a Sentinel's master), on a connection of
    /// its own.
    pub fn open(
        target: &RedisTarget,
        timeout: Duration,
        audit_length: usize,
    ) -> Result<Self, StoreError> {
        let connection = RedisConnection::open(target, timeout)?;
        Ok(RedisConfigStore::on(connection, target, audit_length))
    }

    /// On a connection the controller has already (the counters' Redis, when the
    /// configuration lives there too).
    pub fn on(connection: RedisConnection, target: &RedisTarget, audit_length: usize) -> Self {
        RedisConfigStore {
            connection,
            target_for_logs: target.describe(),
            commit: Script::new(include_str!("../../../lua/config_commit.lua")),
            block: Script::new(include_str!("../../../lua/protection_block.lua")),
            audit_length: audit_length.max(1),
        }
    }
}

#[async_trait]
impl ConfigStore for RedisConfigStore {
    fn describe(&self) -> String {
        format!("redis at {}", self.target_for_logs)
    }

    async fn version(&self) -> Result<u64, StoreError> {
        let version: Option<u64> = redis::cmd("GET")
            .arg(keys::config_version_key())
            .query_async(&mut self.connection.clone())
            .await?;
        Ok(version.unwrap_or(0))
    }

    async fn load(&self) -> Result<Stored, StoreError> {
        let text: Option<String> = redis::cmd("GET")
            .arg(keys::config_document_key())
            .query_async(&mut self.connection.clone())
            .await?;
        match text {
            None => Ok(Stored::default()),
            Some(text) => serde_json::from_str(&text).map_err(|e| {
                StoreError::Reply(format!("the stored configuration does not read: {e}"))
            }),
        }
    }

    async fn commit(
        &self,
        from: u64,
        next: &Stored,
        audit: &AuditEntry,
    ) -> Result<Commit, StoreError> {
        let reply: (i64, u64) = self
            .commit
            .key(keys::config_document_key())
            .key(keys::config_version_key())
            .key(keys::audit_key())
            .arg(from)
            .arg(encode(next)?)
            .arg(encode(audit)?)
            .arg(self.audit_length)
            .invoke_async(&mut self.connection.clone())
            .await?;
        Ok(match reply {
            (1, version) => Commit::Done(version),
            (_, current) => Commit::Conflict(current),
        })
    }

    async fn audit(&self, limit: usize) -> Result<Vec<AuditEntry>, StoreError> {
        let stop = i64::try_from(limit.max(1)).unwrap_or(i64::MAX) - 1;
        let entries: Vec<String> = redis::cmd("LRANGE")
            .arg(keys::audit_key())
            .arg(0)
            .arg(stop)
            .query_async(&mut self.connection.clone())
            .await?;
        Ok(entries
            .iter()
            .filter_map(|text| serde_json::from_str(text).ok())
            .collect())
    }

    async fn record(&self, audit: &AuditEntry) -> Result<(), StoreError> {
        let length = i64::try_from(self.audit_length).unwrap_or(i64::MAX);
        let _: () = redis::pipe()
            .atomic()
            .cmd("LPUSH")
            .arg(keys::audit_key())
            .arg(encode(audit)?)
            .ignore()
            .cmd("LTRIM")
            .arg(keys::audit_key())
            .arg(0)
            .arg(length - 1)
            .ignore()
            .query_async(&mut self.connection.clone())
            .await?;
        Ok(())
    }

    async fn add_blocks(
        &self,
        blocks: &[(String, u64)],
        now_ms: u64,
        most: usize,
    ) -> Result<Vec<String>, StoreError> {
        if blocks.is_empty() {
            return Ok(Vec::new());
        }
        let mut invocation = self.block.key(keys::protection_blocks_key());
        invocation.arg(now_ms).arg(most);
        for (address, ends) in blocks {
            invocation.arg(address).arg(*ends);
        }
        Ok(invocation
            .invoke_async(&mut self.connection.clone())
            .await?)
    }

    async fn blocks(&self, now_ms: u64, most: usize) -> Result<Vec<(String, u64)>, StoreError> {
        let held: Vec<(String, u64)> = redis::cmd("ZRANGE")
            .arg(keys::protection_blocks_key())
            .arg(format!("({now_ms}"))
            .arg("+inf")
            .arg("BYSCORE")
            .arg("LIMIT")
            .arg(0)
            .arg(most)
            .arg("WITHSCORES")
            .query_async(&mut self.connection.clone())
            .await?;
        Ok(held)
    }

    async fn remove_block(&self, address: &str) -> Result<bool, StoreError> {
        let removed: u64 = redis::cmd("ZREM")
            .arg(keys::protection_blocks_key())
            .arg(address)
            .query_async(&mut self.connection.clone())
            .await?;
        Ok(removed > 0)
    }

    async fn durability(&self) -> Result<(), String> {
        let settings: Result<Vec<String>, _> = redis::cmd("CONFIG")
            .arg("GET")
            .arg("append*")
            .query_async(&mut self.connection.clone())
            .await;
        let settings =
            settings.map_err(|e| format!("cannot read Redis's persistence settings ({e})"))?;
        let setting = |name: &str| {
            settings
                .chunks(2)
                .find(|pair| pair.first().is_some_and(|n| n == name))
                .and_then(|pair| pair.get(1).cloned())
                .unwrap_or_default()
        };
        if setting("appendonly") == "yes" && setting("appendfsync") == "always" {
            Ok(())
        } else {
            Err(format!(
                "Redis runs with appendonly {} and appendfsync {}: a change acknowledged just \
                 before Redis crashes can be lost (run the configuration's Redis with \
                 appendonly yes, appendfsync always)",
                setting("appendonly"),
                setting("appendfsync")
            ))
        }
    }
}

/// What the embedded store keeps, and writes to its state file.
#[derive(Debug, Default, Serialize, Deserialize)]
struct Held {
    stored: Stored,
    #[serde(default)]
    audit: Vec<AuditEntry>,
}

/// The configuration in this process, written to `state_file` (when there is one) before
/// a change is acknowledged.
pub struct MemoryConfigStore {
    held: Mutex<Held>,
    state_file: Option<PathBuf>,
    audit_length: usize,
    /// Protection's blocks: address → end (ms). Not written to the state file: a block
    /// is short-lived, and a restart ends it.
    blocks: Mutex<BTreeMap<String, u64>>,
}

impl MemoryConfigStore {
    /// Reads `state_file` if it exists.
    pub fn open(state_file: Option<PathBuf>, audit_length: usize) -> Result<Self, StoreError> {
        let held = match &state_file {
            Some(path) if path.exists() => {
                let text = std::fs::read_to_string(path).map_err(|e| {
                    StoreError::Reply(format!("cannot read {}: {e}", path.display()))
                })?;
                serde_json::from_str(&text).map_err(|e| {
                    StoreError::Reply(format!("{} does not read: {e}", path.display()))
                })?
            }
            _ => Held::default(),
        };
        Ok(MemoryConfigStore {
            held: Mutex::new(held),
            state_file,
            audit_length: audit_length.max(1),
            blocks: Mutex::new(BTreeMap::new()),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Held> {
        self.held.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Writes `bytes` to `path` so that a crash leaves either the old file or the new one:
/// a temporary file beside it, flushed to disk, renamed over it, the directory flushed.
fn write_durably(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty());
    if let Some(dir) = dir {
        std::fs::create_dir_all(dir)?;
    }
    let temporary = path.with_extension("tmp");
    {
        let mut file = std::fs::File::create(&temporary)?;
        file.write_all(bytes)?;
        file.sync_all()?;
    }
    std::fs::rename(&temporary, path)?;
    if let Some(dir) = dir {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

#[async_trait]
impl ConfigStore for MemoryConfigStore {
    fn describe(&self) -> String {
        match &self.state_file {
            Some(path) => format!("the embedded store, kept in {}", path.display()),
            None => "the embedded store, in memory only".to_owned(),
        }
    }

    async fn version(&self) -> Result<u64, StoreError> {
        Ok(self.lock().stored.version)
    }

    async fn load(&self) -> Result<Stored, StoreError> {
        Ok(self.lock().stored.clone())
    }

    async fn commit(
        &self,
        from: u64,
        next: &Stored,
        audit: &AuditEntry,
    ) -> Result<Commit, StoreError> {
        let mut held = self.lock();
        if held.stored.version != from {
            return Ok(Commit::Conflict(held.stored.version));
        }
        let previous = std::mem::replace(&mut held.stored, next.clone());
        held.audit.insert(0, audit.clone());
        held.audit.truncate(self.audit_length);
        if let Some(path) = &self.state_file {
            let written = encode(&*held).and_then(|text| {
                write_durably(path, text.as_bytes())
                    .map_err(|e| StoreError::Reply(format!("cannot write {}: {e}", path.display())))
            });
            if let Err(error) = written {
                held.stored = previous;
                held.audit.remove(0);
                return Err(error);
            }
        }
        Ok(Commit::Done(next.version))
    }

    async fn audit(&self, limit: usize) -> Result<Vec<AuditEntry>, StoreError> {
        Ok(self.lock().audit.iter().take(limit).cloned().collect())
    }

    async fn record(&self, audit: &AuditEntry) -> Result<(), StoreError> {
        let mut held = self.lock();
        held.audit.insert(0, audit.clone());
        held.audit.truncate(self.audit_length);
        if let Some(path) = &self.state_file {
            let text = encode(&*held)?;
            write_durably(path, text.as_bytes())
                .map_err(|e| StoreError::Reply(format!("cannot write {}: {e}", path.display())))?;
        }
        Ok(())
    }

    async fn durability(&self) -> Result<(), String> {
        match &self.state_file {
            Some(_) => Ok(()),
            None => Err(
                "no --state-file: changes made through the admin API are lost when the \
                 controller stops"
                    .to_owned(),
            ),
        }
    }

    async fn add_blocks(
        &self,
        blocks: &[(String, u64)],
        now_ms: u64,
        most: usize,
    ) -> Result<Vec<String>, StoreError> {
        let mut held = self.blocks.lock().unwrap_or_else(PoisonError::into_inner);
        held.retain(|_, ends| *ends > now_ms);
        let mut added = Vec::new();
        for (address, ends) in blocks {
            if held.len() >= most {
                break;
            }
            if *ends > now_ms && !held.contains_key(address) {
                held.insert(address.clone(), *ends);
                added.push(address.clone());
            }
        }
        Ok(added)
    }

    async fn blocks(&self, now_ms: u64, most: usize) -> Result<Vec<(String, u64)>, StoreError> {
        let held = self.blocks.lock().unwrap_or_else(PoisonError::into_inner);
        Ok(held
            .iter()
            .filter(|(_, ends)| **ends > now_ms)
            .take(most)
            .map(|(address, ends)| (address.clone(), *ends))
            .collect())
    }

    async fn remove_block(&self, address: &str) -> Result<bool, StoreError> {
        let mut held = self.blocks.lock().unwrap_or_else(PoisonError::into_inner);
        Ok(held.remove(address).is_some())
    }
}
