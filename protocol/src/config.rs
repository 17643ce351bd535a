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
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
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
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FilterView {
    pub version: u64,
    #[serde(default)]
    pub rules: Vec<Rule>,
    #[serde(default)]
    pub safelist: Vec<ListItem>,
    #[serde(default)]
    pub denylist: Vec<ListItem>,
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
