//! Validation of the configuration document, the same for a file, an import and every
//! write through the admin API. Errors name the field (`rules[1].window`,
//! `tiers[0].limit`); checks of one entity name fields relative to it, so that the admin API
//! can name them in the body a client sent.

use std::collections::HashSet;
use std::fmt;

use ipnet::IpNet;
use sluice_protocol::config::{
    ApiKey, AutomaticState, ConfigDocument, ListEntry, ListKind, Observability, Protection, Tier,
};
use sluice_protocol::rules::DEFAULT_TIER;
use sluice_protocol::rules::{MAX_EXACT, MAX_RULE_NAME};
use sluice_protocol::{Rule, RuleSet};

/// A validation failure: the field, and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    pub field: String,
    pub message: String,
}

impl FieldError {
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        FieldError {
            field: field.into(),
            message: message.into(),
        }
    }

    /// The same error about `prefix` + its field (`rules[2]` + `window`).
    pub fn within(self, prefix: &str) -> Self {
        let field = if self.field.is_empty() {
            prefix.to_owned()
        } else if self.field.starts_with('[') {
            format!("{prefix}{}", self.field)
        } else {
            format!("{prefix}.{}", self.field)
        };
        FieldError { field, ..self }
    }
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.field.is_empty() {
            f.write_str(&self.message)
        } else {
            write!(f, "{}: {}", self.field, self.message)
        }
    }
}

impl std::error::Error for FieldError {}

/// Names of tiers, users and the like: what ends up in headers, logs and keys.
fn check_name(field: &str, name: &str) -> Result<(), FieldError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_RULE_NAME
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(FieldError::new(
            field,
            format!(
                "`{name}` must be 1 to {MAX_RULE_NAME} characters of A-Z, a-z, 0-9, `-` or `_`"
            ),
        ))
    }
}

/// Longest free text (descriptions, reasons, labels, users).
pub const MAX_TEXT: usize = 256;

fn check_text(field: &str, text: &Option<String>) -> Result<(), FieldError> {
    match text {
        Some(text) if text.len() > MAX_TEXT || text.chars().any(char::is_control) => {
            Err(FieldError::new(
                field,
                format!("must be at most {MAX_TEXT} bytes of printable text"),
            ))
        }
        _ => Ok(()),
    }
}

fn check_time(field: &str, time: &Option<String>) -> Result<Option<u64>, FieldError> {
    time.as_deref()
        .map(|text| rfc3339_ms(field, text))
        .transpose()
}

/// An RFC 3339 time (`2026-12-01T10:00:00Z`) as milliseconds since the epoch.
pub fn rfc3339_ms(field: &str, text: &str) -> Result<u64, FieldError> {
    let time = humantime::parse_rfc3339_weak(text)
        .map_err(|e| FieldError::new(field, format!("`{text}` is not an RFC 3339 time ({e})")))?;
    let since = time
        .duration_since(std::time::UNIX_EPOCH)
        .map_err(|_| FieldError::new(field, format!("`{text}` is before 1970")))?;
    u64::try_from(since.as_millis()).map_err(|_| FieldError::new(field, "is too far ahead"))
}

/// Milliseconds since the epoch as RFC 3339 (seconds, UTC).
pub fn format_rfc3339(ms: u64) -> String {
    let time = std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms);
    humantime::format_rfc3339_seconds(time).to_string()
}

/// Milliseconds since the epoch as RFC 3339 to the millisecond (UTC): for expiries, which
/// must not come up to a second early.
pub fn format_rfc3339_ms(ms: u64) -> String {
    let time = std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms);
    humantime::format_rfc3339_millis(time).to_string()
}

pub fn validate_tier(tier: &Tier) -> Result<(), FieldError> {
    check_name("name", &tier.name)?;
    if tier.limit > MAX_EXACT {
        return Err(FieldError::new(
            "limit",
            format!("must be at most 2^53 ({MAX_EXACT})"),
        ));
    }
    if tier.burst == Some(0) {
        return Err(FieldError::new("burst", "must be at least 1"));
    }
    if let Some(degraded) = &tier.degraded {
        if degraded.limit > MAX_EXACT {
            return Err(FieldError::new(
                "degraded.limit",
                format!("must be at most 2^53 ({MAX_EXACT})"),
            ));
        }
        if degraded.burst == Some(0) {
            return Err(FieldError::new("degraded.burst", "must be at least 1"));
        }
    }
    check_text("description", &tier.description)
}

/// The automatic state's thresholds: shares from 0 to 1, leaving below entering.
pub fn validate_automatic_state(automatic: &AutomaticState) -> Result<(), FieldError> {
    for (field, share) in [
        ("enter_share", automatic.enter_share),
        ("leave_share", automatic.leave_share),
    ] {
        if !(0.0..=1.0).contains(&share) {
            return Err(FieldError::new(
                field,
                format!("must be a share from 0 to 1, got {share}"),
            ));
        }
    }
    if automatic.enter_share == 0.0 {
        return Err(FieldError::new(
            "enter_share",
            "must be above 0 (at 0 the state would never be NORMAL)",
        ));
    }
    if automatic.leave_share >= automatic.enter_share {
        return Err(FieldError::new(
            "leave_share",
            format!(
                "must be below enter_share ({}): the gap between them keeps the state from \
                 flapping",
                automatic.enter_share
            ),
        ));
    }
    if automatic.min_responses == Some(0) {
        return Err(FieldError::new("min_responses", "must be at least 1"));
    }
    Ok(())
}

pub fn validate_observability(observability: &Observability) -> Result<(), FieldError> {
    if let Some(sample) = observability.limited_log_sample {
        if !(0.0..=1.0).contains(&sample) {
            return Err(FieldError::new(
                "limited_log_sample",
                format!("must be a share from 0 to 1, got {sample}"),
            ));
        }
    }
    let Some(alerts) = &observability.alerts else {
        return Ok(());
    };
    if alerts.limited == 0 || alerts.limited > MAX_EXACT {
        return Err(FieldError::new(
            "alerts.limited",
            "must be from 1 to 2^53 (how many times one client may be limited within the \
             period before an alert)",
        ));
    }
    if let Some(url) = &alerts.webhook {
        let scheme_ok = url.starts_with("http://") || url.starts_with("https://");
        let host = url.split_once("://").map_or("", |(_, rest)| rest);
        if !scheme_ok || host.is_empty() || url.chars().any(char::is_control) || url.len() > 2048 {
            return Err(FieldError::new(
                "alerts.webhook",
                format!("`{url}` is not an http:// or https:// URL"),
            ));
        }
    }
    Ok(())
}

pub fn validate_protection(protection: &Protection) -> Result<(), FieldError> {
    if protection.invalid_credentials == 0 {
        return Err(FieldError::new(
            "invalid_credentials",
            "must be at least 1 (the number of invalid credentials an address may present \
             within the window)",
        ));
    }
    if protection.invalid_credentials > MAX_EXACT {
        return Err(FieldError::new(
            "invalid_credentials",
            format!("must be at most 2^53 ({MAX_EXACT})"),
        ));
    }
    Ok(())
}

/// The 64 lower-case hex digits of a SHA-256, from any case, with or without `sha256:`.
pub fn digest(field: &str, text: &str) -> Result<String, FieldError> {
    let digest = text
        .strip_prefix("sha256:")
        .unwrap_or(text)
        .to_ascii_lowercase();
    if digest.len() == 64 && digest.bytes().all(|b| b.is_ascii_hexdigit()) {
        Ok(digest)
    } else {
        Err(FieldError::new(
            field,
            "must be the 64 hex digits of the key's SHA-256",
        ))
    }
}

pub fn validate_api_key(key: &ApiKey, tiers: &KnownTiers<'_>) -> Result<(), FieldError> {
    digest("sha256", &key.sha256)?;
    if let Some(user) = &key.user {
        if user.is_empty() {
            return Err(FieldError::new("user", "must not be empty"));
        }
    }
    check_text("user", &key.user)?;
    if let Some(tier) = &key.tier {
        tiers.check("tier", tier)?;
    }
    check_text("name", &key.name)?;
    check_time("created_at", &key.created_at)?;
    Ok(())
}

/// The value a list entry holds, in the form it is matched in.
pub fn list_value(kind: ListKind, value: &str) -> Result<String, FieldError> {
    let value = value.trim();
    match kind {
        ListKind::Ip => {
            let net = value
                .parse::<IpNet>()
                .or_else(|_| value.parse::<std::net::IpAddr>().map(IpNet::from))
                .map_err(|_| {
                    FieldError::new(
                        "value",
                        format!("`{value}` is not an address or a CIDR network"),
                    )
                })?;
            Ok(net.trunc().to_string())
        }
        ListKind::User => {
            if value.is_empty() || value.len() > MAX_TEXT {
                Err(FieldError::new(
                    "value",
                    format!("a user must be 1 to {MAX_TEXT} bytes"),
                ))
            } else {
                Ok(value.to_owned())
            }
        }
        ListKind::ApiKey => digest("value", value),
        ListKind::Path => {
            if value.starts_with('/') && value.len() <= sluice_protocol::rules::MAX_MATCH_PATH {
                Ok(value.to_owned())
            } else {
                Err(FieldError::new(
                    "value",
                    format!("`{value}` must be a path glob starting with `/`"),
                ))
            }
        }
    }
}

pub fn validate_list_entry(entry: &ListEntry) -> Result<(), FieldError> {
    list_value(entry.kind, &entry.value)?;
    check_time("expires_at", &entry.expires_at)?;
    check_text("reason", &entry.reason)?;
    check_time("created_at", &entry.created_at)?;
    Ok(())
}

/// Writes what can be written more than one way in the one way it is matched and stored:
/// key digests in lower case, list values as [`list_value`] gives them (`10.1.2.3/8` is
/// `10.0.0.0/8`). Values that are not valid stay as they are, for [`validate`] to name.
pub fn normalize(document: &mut ConfigDocument) {
    for key in &mut document.api_keys {
        if let Ok(digest) = digest("sha256", &key.sha256) {
            key.sha256 = digest;
        }
    }
    for entry in document
        .safelist
        .iter_mut()
        .chain(document.denylist.iter_mut())
    {
        if let Ok(value) = list_value(entry.kind, &entry.value) {
            entry.value = value;
        }
    }
}

/// The tiers a document defines, for names that refer to one. A document that defines no
/// tier lets any name stand (tiers are then only labels for `match.tiers`).
pub struct KnownTiers<'a>(Vec<&'a str>);

impl<'a> KnownTiers<'a> {
    pub fn of(tiers: &'a [Tier]) -> Self {
        KnownTiers(tiers.iter().map(|t| t.name.as_str()).collect())
    }

    pub fn check(&self, field: &str, name: &str) -> Result<(), FieldError> {
        check_name(field, name)?;
        if self.0.is_empty() || name == DEFAULT_TIER || self.0.contains(&name) {
            return Ok(());
        }
        Err(FieldError::new(
            field,
            format!(
                "`{name}` is not a tier (the tiers are {})",
                self.0.join(", ")
            ),
        ))
    }
}

fn unique<'a>(
    field: &str,
    what: &str,
    names: impl IntoIterator<Item = &'a str>,
) -> Result<(), FieldError> {
    let mut seen = HashSet::new();
    for (index, name) in names.into_iter().enumerate() {
        if !seen.insert(name) {
            return Err(FieldError::new(
                format!("{field}[{index}]"),
                format!("{what} `{name}` is listed twice"),
            ));
        }
    }
    Ok(())
}

/// A validated document: its rules compiled, its tiers' limits checked against every rule
/// that counts by tier.
#[derive(Debug, Clone)]
pub struct Validated {
    pub rules: RuleSet,
}

/// Checks the whole document; the first error found, naming its field.
pub fn validate(document: &ConfigDocument) -> Result<Validated, FieldError> {
    for (index, tier) in document.tiers.iter().enumerate() {
        validate_tier(tier).map_err(|e| e.within(&format!("tiers[{index}]")))?;
    }
    unique(
        "tiers",
        "the tier",
        document.tiers.iter().map(|t| t.name.as_str()),
    )
    .map_err(|e| FieldError::new(format!("{}.name", e.field), e.message))?;
    let rules =
        RuleSet::new(document.rules.clone()).map_err(|e| FieldError::new(e.field, e.message))?;
    let tiers = KnownTiers::of(&document.tiers);
    for (index, rule) in document.rules.iter().enumerate() {
        for (t, tier) in rule.matcher.tiers.iter().enumerate() {
            tiers.check(&format!("rules[{index}].match.tiers[{t}]"), tier)?;
        }
        if rule.tier_limits {
            for (t, tier) in document.tiers.iter().enumerate() {
                tier_limits_fit(rule, tier).map_err(|e| e.within(&format!("tiers[{t}]")))?;
            }
        }
    }
    if let Some(automatic) = &document.automatic_state {
        validate_automatic_state(automatic).map_err(|e| e.within("automatic_state"))?;
    }
    if let Some(protection) = &document.protection {
        validate_protection(protection).map_err(|e| e.within("protection"))?;
    }
    if let Some(observability) = &document.observability {
        validate_observability(observability).map_err(|e| e.within("observability"))?;
    }
    for (index, key) in document.api_keys.iter().enumerate() {
        validate_api_key(key, &tiers).map_err(|e| e.within(&format!("api_keys[{index}]")))?;
    }
    let digests: Vec<String> = document
        .api_keys
        .iter()
        .map(|k| k.sha256.to_ascii_lowercase())
        .collect();
    unique("api_keys", "the key", digests.iter().map(String::as_str)).map_err(|e| {
        FieldError::new(
            format!("{}.sha256", e.field),
            "the same key is listed twice",
        )
    })?;
    for (list, entries) in [
        ("safelist", &document.safelist),
        ("denylist", &document.denylist),
    ] {
        for (index, entry) in entries.iter().enumerate() {
            validate_list_entry(entry).map_err(|e| e.within(&format!("{list}[{index}]")))?;
        }
        let keys: Vec<String> = entries
            .iter()
            .map(|e| format!("{} {}", e.kind.as_str(), e.value))
            .collect();
        unique(list, "the entry", keys.iter().map(String::as_str))?;
    }
    Ok(Validated { rules })
}

/// A tier's limits (in each state), put into a rule that counts by tier, must make a valid
/// rule.
fn tier_limits_fit(rule: &Rule, tier: &Tier) -> Result<(), FieldError> {
    for (prefix, degraded) in [("", false), ("degraded.", true)] {
        if degraded && tier.degraded.is_none() {
            continue;
        }
        RuleSet::new(vec![rule.with_tier_limits(&tier.limits(degraded))]).map_err(|e| {
            let field = e.field.trim_start_matches("rules[0].");
            let field = match field {
                "burst" => "burst",
                _ => "limit",
            };
            FieldError::new(
                format!("{prefix}{field}"),
                format!("{} (in rule `{}`)", e.message, rule.name),
            )
        })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn list_values_are_checked_and_written_one_way() {
        assert_eq!(
            list_value(ListKind::Ip, "10.1.2.3/8").unwrap(),
            "10.0.0.0/8"
        );
        assert_eq!(
            list_value(ListKind::Ip, "192.0.2.7").unwrap(),
            "192.0.2.7/32"
        );
        assert_eq!(
            list_value(ListKind::Ip, "2001:db8::1/64").unwrap(),
            "2001:db8::/64"
        );
        assert!(list_value(ListKind::Ip, "10.0.0.300").is_err());
        let digest = "9F86D081884C7D659A2FEAA0C55AD015A3BF4F1B2B0B822CD15D6C15B0F00A08";
        assert_eq!(
            list_value(ListKind::ApiKey, &format!("sha256:{digest}")).unwrap(),
            digest.to_ascii_lowercase()
        );
        assert!(list_value(ListKind::ApiKey, "key-in-clear").is_err());
        assert!(list_value(ListKind::Path, "no-slash").is_err());
        assert_eq!(list_value(ListKind::User, " ann ").unwrap(), "ann");
    }

    #[test]
    fn times_are_rfc3339() {
        assert_eq!(rfc3339_ms("t", "1970-01-01T00:00:01Z").unwrap(), 1_000);
        assert_eq!(format_rfc3339(1_000), "1970-01-01T00:00:01Z");
        assert_eq!(rfc3339_ms("t", "tomorrow").unwrap_err().field, "t");
    }
}
