//! The configuration operators manage: rules, tiers, API keys and the safelist and denylist.
//! One document, as files hold it (TOML or YAML) and as the admin API imports and exports
//! it; the controller keeps it versioned in its store. The filter reads a view of it (the
//! rules and the lists) from the controller, [`FilterView`].

use serde::{Deserialize, Serialize};

use crate::rules::{Rule, Window};

/// Versioned path where the filter reads its view of the configuration. The reply carries
/// the version as its `ETag`; a request whose `If-None-Match` names it gets `304`.
pub const CONFIG_PATH: &str = "/v1/config";

/// Everything an operator manages, in one document.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct ConfigDocument {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tiers: Vec<Tier>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rules: Vec<Rule>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub api_keys: Vec<ApiKey>,
    /// Requests that skip the limiter.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub safelist: Vec<ListEntry>,
    /// Requests refused with 403.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub denylist: Vec<ListEntry>,
    /// When the system state changes by itself, and from what.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub automatic_state: Option<AutomaticState>,
    /// Brute-force protection: addresses that keep presenting invalid credentials.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protection: Option<Protection>,
    /// Logs of limited requests and alerts on clients that keep being limited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observability: Option<Observability>,
}

/// What the controllers say about limited requests.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct Observability {
    /// The share (0–1) of limited requests logged, one line each (default 0.01).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limited_log_sample: Option<f64>,
    /// An alert when one client is limited too often.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alerts: Option<Alerts>,
}

/// When one client is limited by one rule more than `limited` times within a `period`
/// (aligned to the epoch, as fixed windows are), one alert goes to the log and, if set, to
/// `webhook`; then none for that client and rule for `cooldown` (default: the period).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct Alerts {
    pub limited: u64,
    #[cfg_attr(feature = "openapi", schema(value_type = String, example = "1m"))]
    pub period: Window,
    /// `http://` or `https://` URL that receives each alert as a JSON `POST`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub webhook: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", schema(value_type = Option<String>, example = "10m"))]
    pub cooldown: Option<Window>,
}

/// The share of limited requests logged when the configuration does not say.
pub const DEFAULT_LIMITED_LOG_SAMPLE: f64 = 0.01;

impl ConfigDocument {
    /// The share of limited requests the controllers log.
    pub fn limited_log_sample(&self) -> f64 {
        self.observability
            .as_ref()
            .and_then(|o| o.limited_log_sample)
            .unwrap_or(DEFAULT_LIMITED_LOG_SAMPLE)
    }
}

/// The system state follows the share of upstream answers that are 5xx, as the filters
/// report them: `DEGRADED` once the share reaches `enter_share` over `window`, `NORMAL`
/// once it is back at `leave_share` or below (hysteresis), never sooner than `dwell` after
/// the last change (so it cannot flap). Only while the state is automatic: an operator who
/// sets it pins it, until they hand it back.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct AutomaticState {
    /// Share (0–1) of 5xx answers at which the state becomes `DEGRADED`.
    pub enter_share: f64,
    /// Share (0–1) at or below which it goes back to `NORMAL`; below `enter_share`.
    pub leave_share: f64,
    /// How far back the share is measured (default 30s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", schema(value_type = Option<String>, example = "30s"))]
    pub window: Option<Window>,
    /// The least time between two changes (default 60s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", schema(value_type = Option<String>, example = "60s"))]
    pub dwell: Option<Window>,
    /// Fewer answers in the window than this decide nothing (default 100).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_responses: Option<u64>,
}

/// What unknown API keys get.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum UnknownApiKeys {
    /// They are counted by the address they come from, like a client without a key (the
    /// default): a made-up key is no new identity, so a client that sends a fresh key with
    /// every request is still limited. Rules scoped per API key do not count them.
    #[default]
    ByAddress,
    /// They count as their own client (by digest), as any key: each new key is a new
    /// client with a quota of its own.
    Allow,
    /// They are refused with 401, and count as invalid credentials of the address.
    Reject,
}

/// Addresses that present `invalid_credentials` invalid tokens (or unknown API keys, with
/// `unknown_api_keys = "reject"`) within `window` are denylisted for `block`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct Protection {
    pub invalid_credentials: u64,
    #[cfg_attr(feature = "openapi", schema(value_type = String, example = "1m"))]
    pub window: Window,
    #[cfg_attr(feature = "openapi", schema(value_type = String, example = "15m"))]
    pub block: Window,
    #[serde(default)]
    pub unknown_api_keys: UnknownApiKeys,
}

/// A named set of limits that clients belong to (by their API key or their token's tier
/// claim). A rule with `tier_limits = true` counts each client with its tier's limits.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct Tier {
    /// `[A-Za-z0-9_-]`, at most 64.
    pub name: String,
    /// Requests per window (in flight, for a `concurrency` rule).
    pub limit: u64,
    /// Default: the rule's own window.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", schema(value_type = Option<String>, example = "1m"))]
    pub window: Option<Window>,
    /// For `token_bucket` and `gcra` rules. Default: the rule's own burst.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub burst: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// The tier's limits while the system is `DEGRADED` (default: the same as above).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub degraded: Option<TierLimits>,
}

/// A tier's limits in one system state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct TierLimits {
    pub limit: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", schema(value_type = Option<String>, example = "1m"))]
    pub window: Option<Window>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub burst: Option<u64>,
}

impl Tier {
    /// The tier's limits in `degraded` or normal operation.
    pub fn limits(&self, degraded: bool) -> TierLimits {
        match (degraded, self.degraded) {
            (true, Some(limits)) => limits,
            _ => TierLimits {
                limit: self.limit,
                window: self.window,
                burst: self.burst,
            },
        }
    }
}

/// An API key the controller knows, by the SHA-256 of the key: the filter sends only the
/// digest, and the store never holds a key in clear.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct ApiKey {
    /// 64 lower-case hex digits.
    pub sha256: String,
    /// The key counts as this user (scopes `client` and `user`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// And has this tier (`match.tiers`, scope `tier`, `tier_limits`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tier: Option<String>,
    /// A label for people ("acme production").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// RFC 3339, set when the admin API created the key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_at: Option<String>,
}

/// What a list entry matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum ListKind {
    /// An address or a CIDR network.
    Ip,
    /// A user (a token's subject, or the user of a known API key).
    User,
    /// An API key, by the 64 hex digits of its SHA-256.
    ApiKey,
    /// A path glob (`*` within a segment, `**` across).
    Path,
}

impl ListKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ListKind::Ip => "ip",
            ListKind::User => "user",
            ListKind::ApiKey => "api_key",
            ListKind::Path => "path",
        }
    }
}

/// One safelist or denylist entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct ListEntry {
    pub kind: ListKind,
    pub value: String,
    /// RFC 3339; the entry stops applying then. None: until removed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// RFC 3339, set when the admin API added the entry.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_at: Option<String>,
}

/// The two lists.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum ListName {
    Safelist,
    Denylist,
}

impl ListName {
    pub fn as_str(self) -> &'static str {
        match self {
            ListName::Safelist => "safelist",
            ListName::Denylist => "denylist",
        }
    }
}

/// A list entry as the filter matches it: the expiry in milliseconds since the epoch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListItem {
    pub kind: ListKind,
    pub value: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at_ms: Option<u64>,
}

/// What the filter needs of the configuration: the rules (each rule's failure mode, the
/// headers rules match on) and the lists, which it applies before asking anyone.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FilterView {
    pub version: u64,
    #[serde(default)]
    pub rules: Vec<Rule>,
    #[serde(default)]
    pub safelist: Vec<ListItem>,
    #[serde(default)]
    pub denylist: Vec<ListItem>,
    /// What the filter reports once a second on [`crate::REPORT_PATH`] (nothing: no report,
    /// and no work on the request path for it).
    #[serde(default)]
    pub report: Reported,
    /// The emergency switch: `false`, nothing is refused, not even when the controller
    /// cannot be reached (every rule's failure mode is then `allow`).
    #[serde(default = "enforcing")]
    pub enforce: bool,
    /// The share of limited requests the controllers log (0: none). The filter marks this
    /// share of its checks `sampled` (with the request's `x-request-id`), and samples the
    /// denials it answers from its cache at this rate, naming their request ids in its
    /// report.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub limited_log_sample: f64,
}

fn is_zero(value: &f64) -> bool {
    *value == 0.0
}

fn enforcing() -> bool {
    true
}

impl Default for FilterView {
    fn default() -> Self {
        FilterView {
            version: 0,
            rules: Vec::new(),
            safelist: Vec::new(),
            denylist: Vec::new(),
            report: Reported::default(),
            enforce: true,
            limited_log_sample: 0.0,
        }
    }
}

/// The signals the controller wants from the filters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reported {
    /// Upstream answers and how many were 5xx (`automatic_state` is configured).
    #[serde(default)]
    pub upstream_status: bool,
    /// Requests refused for an invalid token, by address (`protection` is configured).
    #[serde(default)]
    pub invalid_tokens: bool,
    /// Requests refused from the denial cache, by client and rule (the controller keeps
    /// stats).
    #[serde(default)]
    pub cached_denials: bool,
}

impl Reported {
    pub fn any(self) -> bool {
        self.upstream_status || self.invalid_tokens || self.cached_denials
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_document_round_trips_and_refuses_unknown_fields() {
        let json = r#"{
            "tiers": [{ "name": "pro", "limit": 100, "window": "1m", "burst": 150 }],
            "rules": [{ "name": "per-client", "limit": 10, "window": "1m", "tier_limits": true }],
            "api_keys": [{ "sha256": "ab", "user": "acme", "tier": "pro" }],
            "denylist": [{ "kind": "ip", "value": "10.0.0.0/8", "reason": "abuse",
                           "expires_at": "2026-12-01T10:00:00Z" }]
        }"#;
        let document: ConfigDocument = serde_json::from_str(json).unwrap();
        assert_eq!(document.tiers[0].burst, Some(150));
        assert!(document.rules[0].tier_limits);
        assert_eq!(document.denylist[0].kind, ListKind::Ip);
        let again: ConfigDocument =
            serde_json::from_str(&serde_json::to_string(&document).unwrap()).unwrap();
        assert_eq!(again, document);
        let err = serde_json::from_str::<ConfigDocument>(r#"{"rulez":[]}"#).unwrap_err();
        assert!(err.to_string().contains("rulez"), "{err}");
    }
}
