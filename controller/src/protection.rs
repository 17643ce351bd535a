//! Brute-force protection: an address that presents more than `invalid_credentials`
//! invalid tokens (the filters report them, [`sluice_protocol::Report`]) or unknown API keys
//! (the check path sees them, with `unknown_api_keys = "reject"`) within `window` is
//! denylisted for `block`.
//!
//! Counting is off the check path: strikes go into a bounded queue, and once a second one
//! task counts them in the counters' store (a fixed window per address, shared by every
//! controller on the same Redis) and makes one configuration change for every address
//! that went over, which reaches the filters like any denylist entry. The same change
//! drops the entries protection made that have expired.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use sluice_protocol::config::{ConfigDocument, ListEntry, ListKind, Protection};
use sluice_protocol::Strategy;
use tokio::sync::mpsc;

use crate::config::validate::{format_rfc3339, format_rfc3339_ms, list_value, rfc3339_ms};
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

pub struct Guard {
    strikes: mpsc::Sender<(String, u64)>,
    metrics: Arc<Metrics>,
    pub dropped: AtomicU64,
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
    });
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
                    round(&live, store.as_ref(), &metrics, strikes, now_ms()).await;
                }
            }
        }
    });
    (guard, task)
}

/// Counts `strikes` and makes the change that blocks the addresses over the threshold and
/// releases expired blocks.
pub async fn round(
    live: &LiveConfig,
    store: &dyn Store,
    metrics: &Metrics,
    strikes: HashMap<String, u64>,
    now: u64,
) {
    let snapshot = live.snapshot();
    let Some(protection) = snapshot.document.protection.clone() else {
        return;
    };
    let over = match over_threshold(store, &protection, strikes).await {
        Ok(over) => over,
        Err(error) => {
            tracing::warn!(%error, "brute-force protection could not count invalid credentials");
            Vec::new()
        }
    };
    let blocking: Vec<(String, u64)> = over
        .into_iter()
        .filter(|(ip, _)| !blocked(&snapshot.document, ip, now))
        .collect();
    let expired = expired_blocks(&snapshot.document, now);
    if blocking.is_empty() && expired == 0 {
        return;
    }
    let target = match blocking.as_slice() {
        [(ip, _)] => ip.clone(),
        [] => format!("{expired} expired"),
        many => format!("{} addresses", many.len()),
    };
    let author = Author {
        actor: "protection",
        action: if blocking.is_empty() {
            "protection.release"
        } else {
            "protection.block"
        },
        target: &target,
    };
    let block_ms = protection.block.millis();
    let made = live
        .change(&author, None, |current| {
            let mut document = current.document.clone();
            let released = release_expired(&mut document, now);
            let mut blocked_now = Vec::new();
            for (ip, count) in &blocking {
                if block(&mut document, &protection, ip, *count, now) {
                    blocked_now.push(serde_json::json!({ "ip": ip, "invalid_credentials": count }));
                }
            }
            if blocked_now.is_empty() && released.is_empty() {
                return Err(ChangeError::Conflict("nothing to change".into()));
            }
            Ok(Change {
                document,
                operations: current.operations.clone(),
                detail: serde_json::json!({
                    "blocked": blocked_now, "released": released, "block_ms": block_ms,
                    "threshold": protection.invalid_credentials,
                    "window_ms": protection.window.millis(),
                }),
            })
        })
        .await;
    match made {
        Ok(_) => {
            for (ip, count) in &blocking {
                metrics.protection_blocks.inc();
                tracing::warn!(
                    ip = ip.as_str(),
                    invalid_credentials = count,
                    block_ms,
                    "blocked an address that kept presenting invalid credentials"
                );
            }
        }
        Err(ChangeError::Conflict(_)) => {}
        Err(error) => {
            tracing::warn!(%error, "brute-force protection could not change the denylist")
        }
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

/// Denylists `ip` for the block; `false` when it is denylisted already (by anyone).
fn block(
    document: &mut ConfigDocument,
    protection: &Protection,
    ip: &str,
    count: u64,
    now: u64,
) -> bool {
    if blocked(document, ip, now) {
        return false;
    }
    // An expired entry of an operator's for the same address makes way.
    document
        .denylist
        .retain(|entry| !(entry.kind == ListKind::Ip && entry.value == ip));
    document.denylist.push(ListEntry {
        kind: ListKind::Ip,
        value: ip.to_owned(),
        expires_at: Some(format_rfc3339_ms(
            now.saturating_add(protection.block.millis()),
        )),
        reason: Some(format!(
            "{REASON_PREFIX} more than {} invalid credentials within {} ({count} in the last \
             second)",
            protection.invalid_credentials, protection.window
        )),
        created_at: Some(format_rfc3339(now)),
    });
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_protocol::rules::Window;

    fn protection() -> Protection {
        Protection {
            invalid_credentials: 5,
            window: Window::from_millis(60_000).unwrap(),
            block: Window::from_millis(600_000).unwrap(),
            unknown_api_keys: Default::default(),
        }
    }

    #[test]
    fn a_block_is_added_once_and_released_when_it_expires() {
        let now = 1_800_000_000_000;
        let mut document = ConfigDocument::default();
        assert!(block(&mut document, &protection(), "192.0.2.7/32", 3, now));
        assert!(
            !block(&mut document, &protection(), "192.0.2.7/32", 3, now + 1),
            "once"
        );
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
        assert!(
            block(&mut document, &protection(), "192.0.2.9/32", 6, now),
            "expired: blocks"
        );
        assert_eq!(document.denylist.len(), 1, "the expired entry made way");
    }

    #[test]
    fn addresses_are_struck_as_the_denylist_writes_them() {
        assert_eq!(canonical("192.0.2.1").as_deref(), Some("192.0.2.1/32"));
        assert_eq!(canonical("2001:db8::/64").as_deref(), Some("2001:db8::/64"));
        assert_eq!(canonical("unknown"), None);
        assert_eq!(canonical(""), None);
    }
}
