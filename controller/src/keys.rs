//! The one place that builds Redis keys.
//!
//! Layout: `sluice:{<tag>}:<strategy>:<rule>:<client>`, where
//! - `<tag>` is a hash of the client identity: every key of one client lands in one Redis
//!   Cluster slot, and no client can choose its slot by choosing its name;
//! - `<rule>` is a validated rule name (`[A-Za-z0-9_-]`, see `RuleSet::new`);
//! - `<client>` is the identity in unpadded URL-safe base64, so no value can contain `:`,
//!   `{` or `}` and two identities never share a key.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use sha2::{Digest, Sha256};
use sluice_protocol::{Check, ClientId, ClientKind, Scope, Strategy};

const PREFIX: &str = "sluice";

/// Whom a rule with `scope` counts `check` against: `Some(None)` for one counter shared by
/// everyone, `None` when the check lacks the identity the scope needs (the rule then does
/// not apply to it).
pub fn counted_identity(scope: Scope, check: &Check) -> Option<Option<ClientId>> {
    let named = |kind: ClientKind, value: &Option<String>| {
        value
            .as_ref()
            .map(|value| Some(ClientId::new(kind, value.clone())))
    };
    match scope {
        Scope::Client => Some(Some(check.client.clone())),
        Scope::Global => Some(None),
        Scope::Route => Some(Some(ClientId {
            kind: "route".to_owned(),
            value: format!("{}{}", check.host.to_ascii_lowercase(), check.path),
        })),
        Scope::Ip => named(ClientKind::Ip, &check.ip).or_else(|| {
            check
                .client
                .is(ClientKind::Ip)
                .then(|| Some(check.client.clone()))
        }),
        Scope::User => named(ClientKind::User, &check.user),
        Scope::ApiKey => named(ClientKind::ApiKey, &check.api_key),
        Scope::Tier => check.tier.as_ref().map(|tier| {
            Some(ClientId {
                kind: "tier".to_owned(),
                value: tier.clone(),
            })
        }),
    }
}

/// Key of the counter of `rule` for `identity` (`None`: the rule's global counter).
pub fn limit_key(strategy: Strategy, rule: &str, identity: Option<&ClientId>) -> String {
    let encoded = identity.map_or_else(
        || "-".to_owned(),
        |id| {
            format!(
                "{}.{}",
                URL_SAFE_NO_PAD.encode(&id.kind),
                URL_SAFE_NO_PAD.encode(&id.value)
            )
        },
    );
    format!(
        "{PREFIX}:{{{}}}:{}:{rule}:{encoded}",
        slot_tag(identity),
        strategy.as_str()
    )
}

/// The strategy and rule of a key [`limit_key`] built; `None` for any other key.
pub fn counter_of(key: &str) -> Option<(Strategy, &str)> {
    let rest = key.strip_prefix(PREFIX)?.strip_prefix(":{")?;
    let (tag, rest) = rest.split_once('}')?;
    let (strategy, rest) = rest.strip_prefix(':')?.split_once(':')?;
    let strategy = Strategy::ALL.into_iter().find(|s| s.as_str() == strategy)?;
    let (rule, identity) = rest.split_once(':')?;
    let well_formed = tag.len() == 16
        && tag.bytes().all(|b| b.is_ascii_hexdigit())
        && !rule.is_empty()
        && rule
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        && !identity.is_empty()
        && identity
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.');
    well_formed.then_some((strategy, rule))
}

/// The key of the penalty of the limit whose key is `limit_key` (same client, same rule,
/// same slot): `sluice:{tag}:penalty:<rule>:<client>`.
pub fn penalty_key(limit_key: &str) -> String {
    beside(limit_key, PENALTY)
}

const PENALTY: &str = "penalty";

/// The key of the set of workers holding leases on the limit whose key is `limit_key`
/// (same slot): `sluice:{tag}:holders:<rule>:<client>`. Not a counter: a reset of the
/// rule's counters leaves it, as the leases it describes are still held.
pub fn lease_holders_key(limit_key: &str) -> String {
    beside(limit_key, "holders")
}

/// The key of the set of grants whose unused quota was given back, and of usage
/// reservations settled, on the limit whose key is `limit_key` (same slot;
/// `lua/lease_return.lua`, `lua/charge.lua`): `sluice:{tag}:refunded:<rule>:<client>`. Each
/// is settled once: a replay finds it here and gives back or charges nothing.
pub fn lease_refunds_key(limit_key: &str) -> String {
    beside(limit_key, "refunded")
}

/// The units in flight of the concurrency limit whose key is `limit_key` (same slot): a
/// hash of the sum of its leases' costs and their number, beside the set of its leases
/// (`lua/concurrency.lua`, which builds the same name from the limit's key itself):
/// `sluice:{tag}:inflight:<rule>:<client>`. Not a counter: a reset deletes the set of
/// leases, and the scripts then see that this hash no longer describes it and rebuild it.
pub fn concurrency_units_key(limit_key: &str) -> String {
    beside(limit_key, "inflight")
}

/// A key of `kind` beside the limit whose key is `limit_key`: its strategy part replaced,
/// so it shares the limit's client, rule and Cluster slot.
fn beside(limit_key: &str, kind: &str) -> String {
    let mut parts = limit_key.splitn(4, ':');
    match (parts.next(), parts.next(), parts.next(), parts.next()) {
        (Some(prefix), Some(tag), Some(_strategy), Some(rest)) => {
            format!("{prefix}:{tag}:{kind}:{rest}")
        }
        _ => format!("{limit_key}:{kind}"),
    }
}

/// The counter of invalid credentials from `ip` (brute-force protection). Its rule part is
/// no rule's name (`~` is not allowed in one), so no rule's reset touches it.
pub fn invalid_credentials_key(ip: &str) -> String {
    limit_key(
        Strategy::FixedWindow,
        "~invalid-credentials",
        Some(&ClientId::ip(ip.to_owned())),
    )
}

/// How often `client` was limited by `rule` in the current alert period (alerts). Like
/// [`invalid_credentials_key`], its rule part is no rule's name.
pub fn alert_count_key(rule: &str, client: &ClientId) -> String {
    limit_key(
        Strategy::FixedWindow,
        &format!("~alert-count.{rule}"),
        Some(client),
    )
}

/// Whether an alert for `client` and `rule` went out in the current cooldown.
pub fn alert_fired_key(rule: &str, client: &ClientId) -> String {
    limit_key(
        Strategy::FixedWindow,
        &format!("~alert-fired.{rule}"),
        Some(client),
    )
}

/// The rule a counter's or a penalty's key belongs to; `None` for any other key.
pub fn rule_of(key: &str) -> Option<&str> {
    if let Some((_, rule)) = counter_of(key) {
        return Some(rule);
    }
    let rest = key.strip_prefix(PREFIX)?.strip_prefix(":{")?;
    let (_tag, rest) = rest.split_once('}')?;
    let rest = rest
        .strip_prefix(':')?
        .strip_prefix(PENALTY)?
        .strip_prefix(':')?;
    rest.split_once(':').map(|(rule, _)| rule)
}

/// Whether `key` is one [`limit_key`] builds for `strategy` (for keys that come back from
/// outside, such as lease tokens).
pub fn is_limit_key(strategy: Strategy, key: &str) -> bool {
    counter_of(key).is_some_and(|(of, _)| of == strategy)
}

/// A `SCAN MATCH` pattern for the counters of `rule` (every client), or of every rule.
/// Rule names are `[A-Za-z0-9_-]`, which no glob treats specially; callers confirm each
/// key with [`counter_of`].
pub fn counters_pattern(rule: Option<&str>) -> String {
    match rule {
        Some(rule) => format!("{PREFIX}:{{*}}:*:{rule}:*"),
        None => format!("{PREFIX}:{{*}}:*:*:*"),
    }
}

/// The configuration's keys. One hash tag for all of them: the script that commits a change
/// touches every one, so on Redis Cluster they must share a slot. No counter key can be
/// one of them (a counter's tag is 16 hex digits).
pub fn config_document_key() -> String {
    format!("{PREFIX}:{{config}}:document")
}

pub fn config_version_key() -> String {
    format!("{PREFIX}:{{config}}:version")
}

pub fn audit_key() -> String {
    format!("{PREFIX}:{{config}}:audit")
}

/// Brute-force protection's blocks (beside the configuration, in its slot).
pub fn protection_blocks_key() -> String {
    format!("{PREFIX}:{{config}}:protection:blocks")
}

/// The stats a controller published for one bucket. One hash tag for all stats keys, so a
/// reader gets every controller's with one `MGET`, on Redis Cluster too; the number of
/// keys is bounded by the controllers times the buckets kept.
pub fn stats_key(resolution_ms: u64, start_ms: u64, controller: &str) -> String {
    format!("{PREFIX}:{{stats}}:{resolution_ms}:{start_ms}:{controller}")
}

/// The controllers that published stats, scored by when they last did.
pub fn stats_controllers_key() -> String {
    format!("{PREFIX}:{{stats}}:controllers")
}

/// The Redis Cluster slot of `key`: CRC16 (XMODEM) of its hash tag (the part between the
/// first `{` and the next `}`, when not empty), else of the whole key, mod 16384.
pub fn slot(key: &str) -> u16 {
    let bytes = key.as_bytes();
    let hashed = bytes
        .iter()
        .position(|&b| b == b'{')
        .and_then(|open| {
            let rest = &bytes[open + 1..];
            let close = rest.iter().position(|&b| b == b'}')?;
            (close > 0).then(|| &rest[..close])
        })
        .unwrap_or(bytes);
    crc16_xmodem(hashed) % 16_384
}

fn crc16_xmodem(bytes: &[u8]) -> u16 {
    let mut crc: u16 = 0;
    for &byte in bytes {
        crc ^= u16::from(byte) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc
}

fn slot_tag(identity: Option<&ClientId>) -> String {
    let mut hasher = Sha256::new();
    match identity {
        Some(id) => {
            hasher.update(id.kind.as_bytes());
            hasher.update([0]);
            hasher.update(id.value.as_bytes());
        }
        None => hasher.update(b"\x01global"),
    }
    let digest = hasher.finalize();
    digest.iter().take(8).map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(kind: &str, value: &str) -> ClientId {
        ClientId {
            kind: kind.into(),
            value: value.into(),
        }
    }

    fn tag_of(key: &str) -> &str {
        let open = key.find('{').unwrap();
        let close = key[open..].find('}').unwrap() + open;
        &key[open + 1..close]
    }

    #[test]
    fn one_clients_keys_share_a_slot_tag() {
        let client = id("ip", "10.0.0.1");
        let a = limit_key(Strategy::FixedWindow, "per-ip", Some(&client));
        let b = limit_key(Strategy::FixedWindow, "login", Some(&client));
        assert_ne!(a, b);
        assert_eq!(tag_of(&a), tag_of(&b));
    }

    #[test]
    fn hostile_identities_cannot_pick_a_slot_or_collide() {
        let hostile = [
            id("ip", "{evil}"),
            id("ip", "a}:{b"),
            id("ip", "x:fixed_window:per-ip:eA"),
            id("ip.x", "y"),
            id("ip", "x.y"),
            id("ip", ""),
            id("", "ip"),
        ];
        let keys: Vec<String> = hostile
            .iter()
            .map(|c| limit_key(Strategy::FixedWindow, "r", Some(c)))
            .collect();
        for key in &keys {
            // Exactly one pair of braces, the hash tag we wrote.
            assert_eq!(key.matches('{').count(), 1, "{key}");
            assert_eq!(key.matches('}').count(), 1, "{key}");
            assert_eq!(tag_of(key).len(), 16, "{key}");
            assert!(tag_of(key).bytes().all(|b| b.is_ascii_hexdigit()), "{key}");
        }
        let mut unique = keys.clone();
        unique.sort();
        unique.dedup();
        assert_eq!(unique.len(), keys.len(), "{keys:?}");
    }

    #[test]
    fn keys_we_build_are_recognised_and_others_are_not() {
        let client = id("ip", "10.0.0.1");
        let key = limit_key(Strategy::Concurrency, "slots", Some(&client));
        assert!(is_limit_key(Strategy::Concurrency, &key));
        assert!(is_limit_key(
            Strategy::Concurrency,
            &limit_key(Strategy::Concurrency, "s", None)
        ));
        assert!(!is_limit_key(Strategy::FixedWindow, &key));
        for bad in [
            "",
            "sluice:{zz}:concurrency:a:b",
            "other:{0123456789abcdef}:concurrency:a:b",
            "sluice:{0123456789abcdef}:concurrency:a:b c",
        ] {
            assert!(!is_limit_key(Strategy::Concurrency, bad), "{bad}");
        }
    }

    #[test]
    fn scopes_count_by_their_own_identity_or_do_not_apply() {
        let mut check = Check::new(id("user", "ann"), "API.example.com", "GET", "/a", 1);
        check.ip = Some("10.0.0.1".into());
        check.user = Some("ann".into());
        let counted = |scope| counted_identity(scope, &check);
        assert_eq!(counted(Scope::Client), Some(Some(id("user", "ann"))));
        assert_eq!(counted(Scope::Global), Some(None));
        assert_eq!(counted(Scope::Ip), Some(Some(id("ip", "10.0.0.1"))));
        assert_eq!(counted(Scope::User), Some(Some(id("user", "ann"))));
        assert_eq!(
            counted(Scope::Route),
            Some(Some(id("route", "api.example.com/a")))
        );
        assert_eq!(
            counted(Scope::ApiKey),
            None,
            "no API key: rule does not apply"
        );
        assert_eq!(counted(Scope::Tier), None, "no tier: rule does not apply");
        check.tier = Some("gold".into());
        assert_eq!(
            counted_identity(Scope::Tier, &check),
            Some(Some(id("tier", "gold")))
        );
    }

    #[test]
    fn slots_are_those_redis_computes() {
        // What `redis-cli CLUSTER KEYSLOT <key>` answers (Redis 7.0).
        for (key, expected) in [
            ("foo", 12182),
            ("bar", 5061),
            ("123456789", 12739),
            ("{user1000}.following", 3443),
            ("{}x", 10595),
            ("a{}b{c}", 7353),
            ("{c}", 7365),
            ("sluice:{config}:document", 4717),
            ("sluice:{stats}:controllers", 7650),
        ] {
            assert_eq!(slot(key), expected, "{key}");
        }
        let client = id("ip", "{foo}");
        let key = limit_key(Strategy::FixedWindow, "r", Some(&client));
        assert_ne!(slot(&key), slot("foo"), "a client's braces pick no slot");
        assert_eq!(slot(&key), slot(&penalty_key(&key)));
    }

    #[test]
    fn a_concurrency_limits_units_sit_beside_it_and_are_no_counter() {
        let key = limit_key(Strategy::Concurrency, "slots", Some(&id("ip", "10.0.0.1")));
        let units = concurrency_units_key(&key);
        assert_eq!(slot(&units), slot(&key));
        assert_eq!(units, key.replacen(":concurrency:", ":inflight:", 1));
        assert_eq!(rule_of(&units), None);
        // What `lua/concurrency.lua`'s units_key() does with a key of another shape.
        assert_eq!(
            concurrency_units_key("sluice:{model}:a-1"),
            "sluice:{model}:a-1:inflight"
        );
    }

    #[test]
    fn global_counter_differs_from_every_client() {
        let global = limit_key(Strategy::FixedWindow, "r", None);
        let dash = limit_key(Strategy::FixedWindow, "r", Some(&id("ip", "-")));
        assert_ne!(global, dash);
        assert!(global.starts_with("sluice:{"));
    }
}
