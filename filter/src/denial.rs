//! The denial cache: once the controller has denied a request until time T, the same
//! request (same client, route, cost and identities) is denied locally until T, without a
//! callout. Shared by every worker of an Envoy through proxy-wasm shared data, in a fixed
//! number of slots so that it stays bounded whatever the clients do.
//!
//! It only repeats what the controller said: an entry is written from a denial and read
//! back for the very same check until the moment the controller named. Concurrency limits
//! are not cached (a slot can free up at any time), nor are shadow decisions.

use serde::{Deserialize, Serialize};
use sluice_protocol::{Check, Decision, PolicyStatus, Strategy};

/// Shared-data key of a slot.
pub fn slot_key(fingerprint: u64, slots: u32) -> String {
    format!("sluice.denied.{}", fingerprint % u64::from(slots.max(1)))
}

/// A 64-bit fingerprint of everything the controller's decision depended on: the check and
/// the version of the configuration it was decided under ([`Check::decision_fingerprint`]).
pub fn fingerprint(check: &Check, config_version: u64) -> u64 {
    check.decision_fingerprint(config_version)
}

/// What a slot holds: whose denial it is, until when, when it was decided, and what the
/// controller's 429 showed (every rule that applied), so that a cached 429 is the
/// controller's, with its times counted down.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub fingerprint: u64,
    pub until_ms: u64,
    pub decided_ms: u64,
    pub shown: Shown,
}

/// The statuses of a denial: the one that speaks for it, and the others that applied.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Shown {
    pub policy: PolicyStatus,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub others: Vec<PolicyStatus>,
}

impl Shown {
    pub fn policies(&self) -> impl Iterator<Item = &PolicyStatus> + Clone {
        std::iter::once(&self.policy).chain(&self.others)
    }
}

/// The entry to cache for a decision made at `now_ms`, if it may be cached.
pub fn entry_for(fingerprint: u64, decision: &Decision, now_ms: u64) -> Option<Entry> {
    if decision.allowed || decision.shadow_denied {
        return None;
    }
    let policy = decision.policy.as_ref()?;
    let cacheable = policy.strategy != Strategy::Concurrency && policy.retry_after_ms > 0;
    cacheable.then(|| Entry {
        fingerprint,
        until_ms: now_ms.saturating_add(policy.retry_after_ms),
        decided_ms: now_ms,
        shown: Shown {
            policy: policy.clone(),
            others: decision.others.clone(),
        },
    })
}

pub fn encode(entry: &Entry) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(256);
    bytes.extend_from_slice(&entry.fingerprint.to_le_bytes());
    bytes.extend_from_slice(&entry.until_ms.to_le_bytes());
    bytes.extend_from_slice(&entry.decided_ms.to_le_bytes());
    // The statuses are read only on a hit; they go after the fixed part.
    if serde_json::to_writer(&mut bytes, &entry.shown).is_err() {
        return Vec::new();
    }
    bytes
}

/// What a slot's entry shows if it is this fingerprint's and still holds at `now_ms`: the
/// controller's statuses with the time since counted off every reset, and the time left
/// as the retry.
pub fn lookup(bytes: &[u8], fingerprint: u64, now_ms: u64) -> Option<Shown> {
    let stored = u64::from_le_bytes(bytes.get(0..8)?.try_into().ok()?);
    let until_ms = u64::from_le_bytes(bytes.get(8..16)?.try_into().ok()?);
    if stored != fingerprint || until_ms <= now_ms {
        return None;
    }
    let decided_ms = u64::from_le_bytes(bytes.get(16..24)?.try_into().ok()?);
    let mut shown: Shown = serde_json::from_slice(bytes.get(24..)?).ok()?;
    let elapsed = now_ms.saturating_sub(decided_ms);
    let left = until_ms - now_ms;
    shown.policy.retry_after_ms = left;
    for status in std::iter::once(&mut shown.policy).chain(shown.others.iter_mut()) {
        status.reset_ms = status.reset_ms.saturating_sub(elapsed);
    }
    // A reset never comes before the retry it allows.
    shown.policy.reset_ms = shown.policy.reset_ms.max(left);
    Some(shown)
}

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_protocol::ClientId;

    fn check(client: &str) -> Check {
        Check::new(ClientId::ip(client), "h", "GET", "/a", 1)
    }

    fn denial(strategy: Strategy, retry_after_ms: u64) -> Decision {
        Decision {
            allowed: false,
            policy: Some(PolicyStatus {
                rule: "r".into(),
                strategy,
                limit: 5,
                remaining: 0,
                reset_ms: retry_after_ms,
                retry_after_ms,
                window_ms: 1_000,
                delay_ms: 0,
                reason: None,
                usage: false,
            }),
            ..Decision::unlimited()
        }
    }

    #[test]
    fn a_denial_is_repeated_until_its_time_and_only_for_its_request() {
        let fp = fingerprint(&check("10.0.0.1"), 7);
        let entry = entry_for(fp, &denial(Strategy::FixedWindow, 800), 10_000).unwrap();
        let bytes = encode(&entry);
        let hit = lookup(&bytes, fp, 10_300).unwrap().policy;
        assert_eq!(hit.retry_after_ms, 500);
        assert_eq!(hit.rule, "r");
        assert_eq!(
            lookup(&bytes, fp, 10_800),
            None,
            "expired at the controller's time"
        );
        assert_eq!(
            lookup(&bytes, fingerprint(&check("10.0.0.2"), 7), 10_300),
            None
        );
    }

    /// A cached 429 shows what the controller's did: every rule that applied, each reset
    /// counted down by the time since, a bucket's reset kept apart from its retry.
    #[test]
    fn a_cached_denial_shows_every_rule_with_its_times_counted_down() {
        let fp = fingerprint(&check("10.0.0.1"), 7);
        let mut decision = denial(Strategy::TokenBucket, 800);
        if let Some(policy) = decision.policy.as_mut() {
            policy.reset_ms = 5_000;
        }
        decision.others = vec![PolicyStatus {
            rule: "daily".into(),
            remaining: 90,
            reset_ms: 60_000,
            ..denial(Strategy::FixedWindow, 0).policy.unwrap()
        }];
        let bytes = encode(&entry_for(fp, &decision, 10_000).unwrap());
        let shown = lookup(&bytes, fp, 10_300).unwrap();
        assert_eq!(shown.policy.retry_after_ms, 500);
        assert_eq!(
            shown.policy.reset_ms, 4_700,
            "the bucket's own reset, counted down"
        );
        assert_eq!(shown.others.len(), 1);
        assert_eq!(shown.others[0].rule, "daily");
        assert_eq!(shown.others[0].remaining, 90);
        assert_eq!(shown.others[0].reset_ms, 59_700);
    }

    #[test]
    fn fingerprints_cover_every_field_the_decision_used() {
        use sluice_protocol::ClientKind;
        let base = Check {
            ip: Some("10.0.0.1".into()),
            ..check("10.0.0.1")
        };
        // One variant per field the controller's decision can depend on: if the
        // fingerprint left any out, one client's cached 429 would answer another.
        let variants: Vec<(&str, Check)> = vec![
            ("base", base.clone()),
            (
                "client value",
                Check {
                    client: ClientId::ip("10.0.0.2"),
                    ..base.clone()
                },
            ),
            (
                "client kind",
                Check {
                    client: ClientId::new(ClientKind::Header, "10.0.0.1"),
                    ..base.clone()
                },
            ),
            (
                "host",
                Check {
                    host: "other".into(),
                    ..base.clone()
                },
            ),
            (
                "method",
                Check {
                    method: "POST".into(),
                    ..base.clone()
                },
            ),
            (
                "path",
                Check {
                    path: "/b".into(),
                    ..base.clone()
                },
            ),
            (
                "cost",
                Check {
                    cost: 2,
                    ..base.clone()
                },
            ),
            (
                "address",
                Check {
                    ip: Some("10.0.0.9".into()),
                    ..base.clone()
                },
            ),
            (
                "no address",
                Check {
                    ip: None,
                    ..base.clone()
                },
            ),
            (
                "user",
                Check {
                    user: Some("ann".into()),
                    ..base.clone()
                },
            ),
            (
                "api key",
                Check {
                    api_key: Some("ab12".into()),
                    ..base.clone()
                },
            ),
            (
                "tier",
                Check {
                    tier: Some("gold".into()),
                    ..base.clone()
                },
            ),
            ("headers", {
                let mut other = base.clone();
                other.headers.insert("x-plan".into(), "pro".into());
                other
            }),
        ];
        for (i, (name, check)) in variants.iter().enumerate() {
            for (other_name, other) in &variants[i + 1..] {
                assert_ne!(
                    fingerprint(check, 7),
                    fingerprint(other, 7),
                    "{name} and {other_name} share a fingerprint"
                );
            }
        }
        // Field boundaries count: the same bytes split differently are another check.
        let split_a = Check {
            user: Some("ab".into()),
            api_key: Some("c".into()),
            ..base.clone()
        };
        let split_b = Check {
            user: Some("a".into()),
            api_key: Some("bc".into()),
            ..base.clone()
        };
        assert_ne!(fingerprint(&split_a, 7), fingerprint(&split_b, 7));
        // A denial made under one configuration is not one under the next.
        assert_ne!(fingerprint(&base, 7), fingerprint(&base, 8));
        // Host names compare without case, as the rules match them.
        let upper = Check {
            host: "H".into(),
            ..base.clone()
        };
        assert_eq!(fingerprint(&upper, 7), fingerprint(&base, 7));
    }

    #[test]
    fn allowed_shadow_and_concurrency_decisions_are_not_cached() {
        let mut allowed = denial(Strategy::FixedWindow, 500);
        allowed.allowed = true;
        assert_eq!(entry_for(1, &allowed, 0), None);
        let mut shadow = denial(Strategy::FixedWindow, 500);
        shadow.allowed = true;
        shadow.shadow_denied = true;
        assert_eq!(entry_for(1, &shadow, 0), None);
        assert_eq!(entry_for(1, &denial(Strategy::Concurrency, 500), 0), None);
        assert!(entry_for(1, &denial(Strategy::Gcra, 500), 0).is_some());
    }

    #[test]
    fn garbage_in_a_slot_is_a_miss() {
        for bytes in [&b""[..], b"short", &[0u8; 16], &[0xff; 40]] {
            assert_eq!(lookup(bytes, 0, 0), None);
        }
    }

    #[test]
    fn slots_are_bounded() {
        assert_eq!(slot_key(4097, 4096), "sluice.denied.1");
        assert_eq!(slot_key(7, 0), "sluice.denied.0");
    }
}
