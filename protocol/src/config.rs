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

/// How many distinct unknown fields a view may carry before the filter refuses it: each
/// costs one more pass over the view, and a controller a release ahead adds a handful.
pub const MAX_UNKNOWN_VIEW_FIELDS: usize = 32;

impl FilterView {
    /// Reads the view as a filter must when the controller may be a release ahead: a field
    /// this build does not know (in the view, a rule, a match, a list item) is dropped
    /// wherever it appears, and named in the second value (`rules[].match.new_field`), so
    /// the filter can say once what it ignored. The rule schema stays strict for what
    /// operators write (files and the admin API); only this reader is lenient.
    pub fn from_json(bytes: &[u8]) -> Result<(FilterView, Vec<String>), String> {
        let mut value: serde_json::Value =
            serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
        let mut ignored = Vec::new();
        loop {
            let error = match serde_path_to_error::deserialize::<_, FilterView>(&value) {
                Ok(view) => return Ok((view, ignored)),
                Err(error) => error,
            };
            let message = error.inner().to_string();
            let unknown = message
                .strip_prefix("unknown field `")
                .and_then(|rest| rest.split_once('`'))
                .map(|(name, _)| name.to_owned());
            let segments: Vec<_> = error.path().iter().cloned().collect();
            let Some((unknown, (_, parents))) = unknown.zip(segments.split_last()) else {
                return Err(format!("{}: {message}", error.path()));
            };
            if ignored.len() == MAX_UNKNOWN_VIEW_FIELDS {
                return Err(format!(
                    "more than {MAX_UNKNOWN_VIEW_FIELDS} fields this filter does not know"
                ));
            }
            let mut removed = 0;
            drop_field(&mut value, parents, &unknown, &mut removed);
            if removed == 0 {
                return Err(format!("{}: {message}", error.path()));
            }
            ignored.push(field_pattern(parents, &unknown));
        }
    }
}

/// Removes `field` from every object at `path`, read with every sequence index as "each
/// element": a field new in one rule is new in all of them, and one pass drops them all.
fn drop_field(
    value: &mut serde_json::Value,
    path: &[serde_path_to_error::Segment],
    field: &str,
    removed: &mut usize,
) {
    use serde_path_to_error::Segment;
    let Some((first, rest)) = path.split_first() else {
        if let Some(object) = value.as_object_mut() {
            *removed += usize::from(object.remove(field).is_some());
        }
        return;
    };
    match (first, value) {
        (Segment::Seq { .. }, serde_json::Value::Array(items)) => {
            for item in items {
                drop_field(item, rest, field, removed);
            }
        }
        (Segment::Map { key }, serde_json::Value::Object(object)) => {
            if let Some(inner) = object.get_mut(key) {
                drop_field(inner, rest, field, removed);
            }
        }
        _ => {}
    }
}

/// `rules[].match.field`: where a dropped field was, with indices left out.
fn field_pattern(path: &[serde_path_to_error::Segment], field: &str) -> String {
    use serde_path_to_error::Segment;
    let mut pattern = String::new();
    for segment in path {
        match segment {
            Segment::Seq { .. } => pattern.push_str("[]"),
            Segment::Map { key } => {
                if !pattern.is_empty() {
                    pattern.push('.');
                }
                pattern.push_str(key);
            }
            Segment::Enum { variant } => {
                pattern.push('.');
                pattern.push_str(variant);
            }
            Segment::Unknown => pattern.push_str(".?"),
        }
    }
    if !pattern.is_empty() {
        pattern.push('.');
    }
    pattern.push_str(field);
    pattern
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

    /// What a controller a release ahead might send: a field new to the view, to every
    /// rule, to a match and to a list item.
    const VIEW_FROM_A_NEWER_CONTROLLER: &str = r#"{
        "version": 7,
        "rollout": {"wave": 2},
        "rules": [
            { "name": "a", "limit": 10, "window": "1m", "weight": 3,
              "match": { "path_prefix": "/api", "query": {"x": "1"} } },
            { "name": "b", "limit": 5, "window": "1s", "weight": 1 }
        ],
        "denylist": [{ "kind": "ip", "value": "10.0.0.1", "source": "feed" }]
    }"#;

    #[test]
    fn a_view_with_fields_this_filter_does_not_know_is_read_without_them_and_they_are_named() {
        let (view, ignored) = FilterView::from_json(VIEW_FROM_A_NEWER_CONTROLLER.as_bytes())
            .expect("a newer controller's view");
        assert_eq!(view.version, 7);
        assert_eq!(view.rules.len(), 2);
        assert_eq!(view.rules[0].limit, 10);
        assert_eq!(view.rules[1].name, "b");
        assert_eq!(view.denylist.len(), 1);
        let mut ignored = ignored;
        ignored.sort();
        // The view and its list items always ignored what they did not know; the rule
        // schema is the strict one, and what is dropped from it is named.
        assert_eq!(ignored, ["rules[].match.query", "rules[].weight"]);
        // The schema operators write stays strict.
        let strict = serde_json::from_str::<FilterView>(VIEW_FROM_A_NEWER_CONTROLLER);
        assert!(strict.is_err());
    }

    #[test]
    fn a_view_that_is_wrong_not_newer_is_still_refused_naming_the_field() {
        let wrong_type =
            br#"{"version": 1, "rules": [{"name": "a", "limit": "ten", "window": "1m"}]}"#;
        let error = FilterView::from_json(wrong_type).unwrap_err();
        assert!(error.starts_with("rules[0].limit:"), "{error}");
        let many: String = (0..=MAX_UNKNOWN_VIEW_FIELDS)
            .map(|n| format!(r#""new_{n}": 1, "#))
            .collect();
        let view = format!(
            r#"{{"version": 1, "rules": [{{{many}"name": "a", "limit": 1, "window": "1s"}}]}}"#
        );
        let error = FilterView::from_json(view.as_bytes());
        assert!(error.unwrap_err().contains("more than 32"));
        assert!(FilterView::from_json(b"not json").is_err());
        assert!(FilterView::from_json(br#"{"version": 1, "rules": 3}"#).is_err());
    }
}
