//! Brute-force protection: an address that presents more than `invalid_credentials`
//! invalid tokens (the filters report them, [`sluice_protocol::Report`]) or unknown API keys
//! (the check path sees them, with `unknown_api_keys = "reject"`) within `window` is
//! denylisted for `block`.
//!
//! Counting is off the check path: strikes go into a bounded queue, and once a second one
//! task counts them in the counters' store (a fixed window per address, shared by every
//! controller on the same Redis) and blocks every address that went over.
//!
//! Blocks live beside the configuration, in its store, not in it: at most [`MAX_BLOCKS`] at
//! once, each ending by itself. A flood of blocks therefore changes no version (the filters'
//! denial caches and leases are kept), writes nothing to the operators' audit log, and
//! cannot grow the view every worker reads past its bound. Every controller reads them once
//! a second and serves them in the filters' denylist (`GET /v1/config`, whose entity tag
//! then names them too). Each block is logged and counted.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use sluice_protocol::config::{ConfigDocument, ListEntry, ListItem, ListKind, Protection};
use sluice_protocol::Strategy;
use tokio::sync::mpsc;

use crate::config::validate::{list_value, rfc3339_ms};
use crate::config::{Author, Change, ChangeError, LiveConfig};
use crate::keys;
use crate::metrics::Metrics;
use crate::store::now_ms;
use crate::store::{LimitSpec, Store};
use crate::strategy::Params;

/// The reason of every entry protection makes; how it knows its own entries.
pub const REASON_PREFIX: &str = "protection:";
/// Strikes waiting to be counted; past it they are dropped (and counted as dropped).
const QUEUE: usize = 4_096;
/// Addresses counted in one round; the rest wait for the next.
const MAX_ADDRESSES_PER_ROUND: usize = 10_000;
/// Most blocks in force at once, across the controllers of a store: about 200 KB of view
/// for every worker to read. Past it, addresses over the threshold are not blocked (logged
/// and counted): a flood from that many addresses is beyond what a denylist answers.
pub const MAX_BLOCKS: usize = 4_096;

/// The blocks in force as this controller last read them, with a tag that changes when
/// they do (0 when there are none).
#[derive(Debug, Default)]
pub struct BlockSet {
    pub items: Vec<ListItem>,
    pub tag: u64,
}

impl BlockSet {
    fn of(blocks: Vec<(String, u64)>) -> BlockSet {
        use std::hash::{Hash, Hasher};
        if blocks.is_empty() {
            return BlockSet::default();
        }
        let mut hasher = std::hash::DefaultHasher::new();
        blocks.hash(&mut hasher);
        BlockSet {
            items: blocks
                .into_iter()
                .map(|(value, ends)| ListItem {
                    kind: ListKind::Ip,
                    value,
                    expires_at_ms: Some(ends),
                })
                .collect(),
            tag: hasher.finish().max(1),
        }
    }
}

pub struct Guard {
    strikes: mpsc::Sender<(String, u64)>,
    metrics: Arc<Metrics>,
    pub dropped: AtomicU64,
    blocks: ArcSwap<BlockSet>,
}

impl Guard {
    /// `count` invalid credentials from `ip` (an address, or an IPv6 network as limits
    /// count it). Never waits.
    pub fn strike(&self, ip: &str, count: u64) {
        let Some(address) = canonical(ip) else {
            return;
        };
        if count == 0 {
            return;
        }
        self.metrics.invalid_credentials.inc_by(count);
        if self.strikes.try_send((address, count)).is_err() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The blocks in force, as last read from the store.
    pub fn blocks(&self) -> Arc<BlockSet> {
        self.blocks.load_full()
    }

    /// Reads the blocks in force from the configuration's store.
    pub async fn refresh(&self, live: &LiveConfig, now: u64) {
        match live.store().blocks(now, MAX_BLOCKS).await {
            Ok(blocks) => {
                let next = BlockSet::of(blocks);
                if next.tag != self.blocks.load().tag {
                    self.blocks.store(Arc::new(next));
                }
            }
            Err(error) => {
                tracing::warn!(%error, "brute-force protection could not read its blocks")
            }
        }
    }
}

/// The address (or IPv6 network) as the denylist writes it; `None` for anything else
/// (`unknown`, when Envoy gave no address).
fn canonical(value: &str) -> Option<String> {
    list_value(ListKind::Ip, value).ok()
}

/// Starts the task that counts strikes and blocks; it ends when the guard is dropped.
pub fn start(
    live: Arc<LiveConfig>,
    store: Arc<dyn Store>,
    metrics: Arc<Metrics>,
) -> (Arc<Guard>, tokio::task::JoinHandle<()>) {
    let (strikes, mut queue) = mpsc::channel::<(String, u64)>(QUEUE);
    let guard = Arc::new(Guard {
        strikes,
        metrics: Arc::clone(&metrics),
        dropped: AtomicU64::new(0),
        blocks: ArcSwap::from_pointee(BlockSet::default()),
    });
    let task_guard = Arc::clone(&guard);
    let task = tokio::spawn(async move {
        let mut pending: HashMap<String, u64> = HashMap::new();
        let mut ticker = tokio::time::interval(Duration::from_secs(1));
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                strike = queue.recv() => match strike {
                    Some((ip, count)) => {
                        if pending.len() < MAX_ADDRESSES_PER_ROUND || pending.contains_key(&ip) {
                            *pending.entry(ip).or_default() += count;
                        }
                    }
                    None => return,
                },
                _ = ticker.tick() => {
                    let strikes = std::mem::take(&mut pending);
                    round(&task_guard, &live, store.as_ref(), &metrics, strikes, now_ms()).await;
                }
            }
        }
    });
    (guard, task)
}

/// Counts `strikes`, blocks the addresses over the threshold, and reads the blocks in
/// force into `guard`. Entries an earlier version of protection put in the configuration's
/// denylist are dropped when they expire.
pub async fn round(
    guard: &Guard,
    live: &LiveConfig,
    store: &dyn Store,
    metrics: &Metrics,
    strikes: HashMap<String, u64>,
    now: u64,
) {
    let snapshot = live.snapshot();
    if let Some(protection) = snapshot.document.protection.clone() {
        let over = match over_threshold(store, &protection, strikes).await {
            Ok(over) => over,
            Err(error) => {
                tracing::warn!(%error, "brute-force protection could not count invalid credentials");
                Vec::new()
            }
        };
        // An operator's entry already answers for its address.
        let over: Vec<(String, u64)> = over
            .into_iter()
            .filter(|(ip, _)| !blocked(&snapshot.document, ip, now))
            .collect();
        block_all(live, metrics, &protection, &over, now).await;
    }
    release_legacy(live, now).await;
    guard.refresh(live, now).await;
}

/// Blocks each of `over` (address, invalid credentials this round) for the block time.
async fn block_all(
    live: &LiveConfig,
    metrics: &Metrics,
    protection: &Protection,
    over: &[(String, u64)],
    now: u64,
) {
    if over.is_empty() {
        return;
    }
    let block_ms = protection.block.millis();
    let ends = now.saturating_add(block_ms);
    let asked: Vec<(String, u64)> = over.iter().map(|(ip, _)| (ip.clone(), ends)).collect();
    let added = match live.store().add_blocks(&asked, now, MAX_BLOCKS).await {
        Ok(added) => added,
        Err(error) => {
            tracing::warn!(%error, "brute-force protection could not block addresses");
            return;
        }
    };
    for (ip, count) in over {
        if added.contains(ip) {
            metrics.protection_blocks.inc();
            tracing::warn!(
                target: "sluice::protection",
                ip = ip.as_str(),
                invalid_credentials = count,
                block_ms,
                threshold = protection.invalid_credentials,
                window_ms = protection.window.millis(),
                "blocked an address that kept presenting invalid credentials"
            );
        }
    }
    let unblocked = over.len().saturating_sub(added.len());
    if unblocked > 0 {
        tracing::debug!(
            unblocked,
            "addresses over the threshold already blocked, or past the bound of {MAX_BLOCKS} blocks"
        );
    }
}

/// Drops the expired entries protection used to write into the configuration's denylist
/// (before its blocks lived beside it), in one change.
async fn release_legacy(live: &LiveConfig, now: u64) {
    if expired_blocks(&live.snapshot().document, now) == 0 {
        return;
    }
    let author = Author {
        actor: "protection",
        action: "protection.release",
        target: "expired blocks",
    };
    let made = live
        .change(&author, None, |current| {
            let mut document = current.document.clone();
            let released = release_expired(&mut document, now);
            if released.is_empty() {
                return Err(ChangeError::Conflict("nothing to change".into()));
            }
            Ok(Change {
                document,
                operations: current.operations.clone(),
                detail: serde_json::json!({ "released": released }),
            })
        })
        .await;
    match made {
        Ok(_) | Err(ChangeError::Conflict(_)) => {}
        Err(error) => tracing::warn!(%error, "brute-force protection could not tidy the denylist"),
    }
}

/// The addresses whose strikes take them over the threshold in the current window, with
/// how many they sent in this round.
async fn over_threshold(
    store: &dyn Store,
    protection: &Protection,
    strikes: HashMap<String, u64>,
) -> Result<Vec<(String, u64)>, crate::store::StoreError> {
    if strikes.is_empty() {
        return Ok(Vec::new());
    }
    let params = Params {
        strategy: Strategy::FixedWindow,
        limit: protection.invalid_credentials,
        period_ms: protection.window.millis(),
        extra: 0,
        penalty: None,
    };
    let strikes: Vec<(String, u64)> = strikes.into_iter().collect();
    let limits: Vec<LimitSpec> = strikes
        .iter()
        .map(|(ip, count)| LimitSpec {
            key: keys::invalid_credentials_key(ip),
            params,
            cost: *count,
        })
        .collect();
    let verdicts = store.check_each(&limits).await?;
    Ok(strikes
        .into_iter()
        .zip(verdicts)
        .filter(|(_, verdict)| !verdict.ok)
        .map(|(strike, _)| strike)
        .collect())
}

fn live_until(entry: &ListEntry) -> Option<u64> {
    entry
        .expires_at
        .as_deref()
        .and_then(|at| rfc3339_ms("expires_at", at).ok())
}

fn ours(entry: &ListEntry) -> bool {
    entry
        .reason
        .as_deref()
        .is_some_and(|reason| reason.starts_with(REASON_PREFIX))
}

/// Whether the denylist holds `ip` now.
fn blocked(document: &ConfigDocument, ip: &str, now: u64) -> bool {
    document.denylist.iter().any(|entry| {
        entry.kind == ListKind::Ip
            && entry.value == ip
            && live_until(entry).is_none_or(|until| now < until)
    })
}

fn expired_blocks(document: &ConfigDocument, now: u64) -> usize {
    document
        .denylist
        .iter()
        .filter(|entry| ours(entry) && live_until(entry).is_some_and(|until| until <= now))
        .count()
}

/// Drops the expired entries protection made; returns their addresses.
fn release_expired(document: &mut ConfigDocument, now: u64) -> Vec<String> {
    let mut released = Vec::new();
    document.denylist.retain(|entry| {
        let expired = ours(entry) && live_until(entry).is_some_and(|until| until <= now);
        if expired {
            released.push(entry.value.clone());
        }
        !expired
    });
    released
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::validate::{format_rfc3339, format_rfc3339_ms};

    fn legacy_block(ip: &str, ends: u64) -> ListEntry {
        ListEntry {
            kind: ListKind::Ip,
            value: ip.into(),
            expires_at: Some(format_rfc3339_ms(ends)),
            reason: Some(format!("{REASON_PREFIX} more than 5 invalid credentials")),
            created_at: None,
        }
    }

    #[test]
    fn legacy_blocks_in_the_denylist_are_released_when_they_expire() {
        let now = 1_800_000_000_000;
        let mut document = ConfigDocument::default();
        document
            .denylist
            .push(legacy_block("192.0.2.7/32", now + 600_000));
        assert!(blocked(&document, "192.0.2.7/32", now + 599_999));
        assert!(
            !blocked(&document, "192.0.2.7/32", now + 600_000),
            "expired"
        );
        assert_eq!(expired_blocks(&document, now + 599_999), 0);
        assert_eq!(
            release_expired(&mut document, now + 600_000),
            vec!["192.0.2.7/32"]
        );
        assert!(document.denylist.is_empty());
    }

    #[test]
    fn an_operators_entries_are_never_released() {
        let now = 1_800_000_000_000;
        let mut document = ConfigDocument::default();
        document.denylist.push(ListEntry {
            kind: ListKind::Ip,
            value: "192.0.2.9/32".into(),
            expires_at: Some(format_rfc3339(now - 1_000)),
            reason: Some("abuse".into()),
            created_at: None,
        });
        assert_eq!(release_expired(&mut document, now), Vec::<String>::new());
        assert_eq!(document.denylist.len(), 1);
    }

    #[test]
    fn a_block_sets_tag_names_its_content() {
        assert_eq!(BlockSet::of(Vec::new()).tag, 0);
        let one = BlockSet::of(vec![("192.0.2.1/32".into(), 5)]);
        let same = BlockSet::of(vec![("192.0.2.1/32".into(), 5)]);
        let other = BlockSet::of(vec![("192.0.2.2/32".into(), 5)]);
        assert_ne!(one.tag, 0);
        assert_eq!(one.tag, same.tag);
        assert_ne!(one.tag, other.tag);
        assert_eq!(one.items[0].expires_at_ms, Some(5));
    }

    #[test]
    fn addresses_are_struck_as_the_denylist_writes_them() {
        assert_eq!(canonical("192.0.2.1").as_deref(), Some("192.0.2.1/32"));
        assert_eq!(canonical("2001:db8::/64").as_deref(), Some("2001:db8::/64"));
        assert_eq!(canonical("unknown"), None);
        assert_eq!(canonical(""), None);
    }
}
