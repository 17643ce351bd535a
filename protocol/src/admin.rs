//! The admin API's bodies, shared by the controller that serves them and the `sluice` CLI
//! (and any other client) that sends and reads them. Paths are under [`ADMIN_PREFIX`];
//! the OpenAPI document the controller serves at `/v1/admin/openapi.json` describes each.

use serde::{Deserialize, Serialize};

use crate::check::PolicyStatus;
use crate::config::{ApiKey, ListEntry, ListKind, ListName};

pub const ADMIN_PREFIX: &str = "/v1/admin";

/// Every error the API answers with: a code, the field it is about (when one is), and a
/// sentence for people.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ErrorBody {
    /// `invalid_request`, `unauthorized`, `forbidden`, `not_found`, `conflict`,
    /// `version_mismatch`, `store_unavailable`, `too_large`, `method_not_allowed`.
    pub error: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
    pub message: String,
}

/// The configuration's version: it grows by one with every change.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct VersionBody {
    pub version: u64,
}

/// `POST /v1/admin/api-keys`: without `sha256`, the controller makes a new key and shows it
/// once; with it, a key made elsewhere is registered by its digest.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct NewApiKey {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tier: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

/// A key as the API answers for it; `key` only in the answer that created it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ApiKeyBody {
    /// The key itself: shown once, when the controller made it. Store it now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    pub api_key: ApiKey,
}

/// `PUT /v1/admin/api-keys/{sha256}`: whom the key stands for.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct ApiKeyUpdate {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tier: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

/// `POST /v1/admin/lists/{list}`. The expiry as a time (`expires_at`, RFC 3339) or from now
/// (`expires_in`, `10m`, `1h`, `1d`), not both.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct NewListEntry {
    pub kind: ListKind,
    pub value: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_in: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// A list entry with its id (derived from the list, the kind and the value, so the same
/// entry always has the same id).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ListEntryBody {
    pub id: String,
    pub list: ListName,
    pub entry: ListEntry,
}

/// `GET /v1/admin/counters`: where a client stands under each rule that counts it, read
/// without consuming anything.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct CountersBody {
    pub counters: Vec<PolicyStatus>,
}

/// `GET /v1/admin/protection/blocks`: the addresses brute-force protection blocks now.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct BlocksBody {
    pub blocks: Vec<Block>,
}

/// One address protection blocks, until when (RFC 3339).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Block {
    pub ip: String,
    pub until: String,
}

/// `DELETE /v1/admin/counters`: how many counters were reset.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ResetBody {
    pub reset: u64,
}

/// The system's state, which tiers' limits can follow.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum SystemState {
    #[default]
    Normal,
    Degraded,
}

impl SystemState {
    pub const ALL: [SystemState; 2] = [SystemState::Normal, SystemState::Degraded];

    pub fn as_str(self) -> &'static str {
        match self {
            SystemState::Normal => "NORMAL",
            SystemState::Degraded => "DEGRADED",
        }
    }
}

/// `PUT /v1/admin/state`: the state to run in. Setting it pins it (the automatic signal no
/// longer changes it) unless `automatic` is true; `{"automatic": true}` alone hands the state
/// back to the signal.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct StateBody {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<SystemState>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub automatic: Option<bool>,
}

/// `PUT /v1/admin/enforcement`: the emergency switch, for every rule or for one. `false`:
/// nothing is refused (by that rule); it acts as in shadow (counted, and reported as
/// would-be-limited) until switched back. A rule's own `shadow` setting is left alone.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct EnforcementBody {
    pub enforce: bool,
    /// The rule to switch; absent, the global switch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rule: Option<String>,
}

/// `GET /v1/admin/enforcement`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct EnforcementStatus {
    /// The global switch.
    pub enforce: bool,
    /// Rules switched off one by one.
    pub unenforced_rules: Vec<String>,
}

/// How the system runs at the moment: part of the versioned configuration (a change
/// reaches every controller and filter like any other), but not of the document files
/// hold, so that an import never flips it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Operations {
    #[serde(default)]
    pub state: SystemState,
    /// RFC 3339: when the state last changed (absent: never).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state_since: Option<String>,
    /// Whether the automatic signal may change the state.
    #[serde(default = "yes")]
    pub automatic: bool,
    /// The emergency switch: `false`, nothing is refused.
    #[serde(default = "yes")]
    pub enforce: bool,
    /// Rules switched off one by one (by name).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub unenforced_rules: Vec<String>,
}

fn yes() -> bool {
    true
}

impl Operations {
    /// Whether `rule` is enforced now (switches only; the rule's own `shadow` aside).
    pub fn enforces(&self, rule: &str) -> bool {
        self.enforce && !self.unenforced_rules.iter().any(|name| name == rule)
    }
}

impl Default for Operations {
    fn default() -> Self {
        Operations {
            state: SystemState::default(),
            state_since: None,
            automatic: true,
            enforce: true,
            unenforced_rules: Vec::new(),
        }
    }
}

/// What a token may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Reads configuration, counters, stats and the audit log.
    Read,
    /// Everything.
    Admin,
}

/// `GET /v1/admin/build`: which build of the controller answers (not the configuration's
/// version).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct BuildBody {
    /// The software's release, a semantic version (`0.2.0`).
    pub version: String,
    /// The commit it was built from, or `unknown`.
    pub commit: String,
}

/// `GET /v1/admin/whoami`: the token's name and role.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct WhoAmIBody {
    pub name: String,
    pub role: Role,
}

/// One change, as the audit log keeps it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct AuditEntry {
    /// RFC 3339.
    pub at: String,
    /// The token's name (or `bootstrap` for a file the controller started from).
    pub actor: String,
    /// `rule.create`, `tier.update`, `api_key.delete`, `list.add`, `config.import`,
    /// `state.set`, `counters.reset`…
    pub action: String,
    /// What it acted on: a rule's name, a key's digest, a list entry's id.
    pub target: String,
    pub version_before: u64,
    pub version_after: u64,
    /// The change itself (secrets never: keys appear by digest).
    #[cfg_attr(feature = "openapi", schema(value_type = Object))]
    pub change: serde_json::Value,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct AuditBody {
    pub entries: Vec<AuditEntry>,
}

/// `GET /v1/admin/stats`: what the limiter did over the window, on every controller that
/// shares the store.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct StatsBody {
    /// `1m` (in 10 s buckets) or `1h` (in minutes).
    pub window: String,
    /// RFC 3339: the start of the first bucket counted, and now.
    pub from: String,
    pub to: String,
    /// Controllers whose figures are in (this one's, and every other's that published).
    pub controllers: u64,
    pub decisions: u64,
    pub rules: Vec<RuleStats>,
    pub tiers: Vec<TierStats>,
    /// Clients limited most (by any rule), most first.
    pub top_limited: Vec<TopClient>,
    /// Clients that asked most, most first.
    pub top_requesting: Vec<TopClient>,
    /// How far any top count may be over the truth (the summaries' smallest count); a
    /// client not listed asked at most this many times.
    pub top_error_bound: u64,
    /// Clients whose settled usage was largest (units charged by usage rules: reserved,
    /// less what was returned, plus what was charged beyond the reservation), most first.
    /// Each count is at most its `error` over the truth.
    #[serde(default)]
    pub top_usage: Vec<TopClient>,
}

/// Units of a usage rule (or of every usage rule of a tier) in the window. A request's
/// reservation counts when it is admitted and its settlement when its response ends, so a
/// window's figures may hold one without the other.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct UsageStats {
    /// Reserved by requests admitted.
    pub reserved: u64,
    /// Reservations settled.
    pub settlements: u64,
    /// Given back by settlements: reserved and not used.
    pub returned: u64,
    /// Charged by settlements beyond their reservation (the overshoot the README bounds).
    pub overshoot: u64,
    /// What settled requests cost: their reservations, less returned, plus overshoot.
    pub charged: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct RuleStats {
    pub rule: String,
    pub allowed: u64,
    /// Denied by this rule.
    pub limited: u64,
    /// Would have been denied by this rule (in shadow, or enforcement off).
    pub shadow_limited: u64,
    /// Allowed with at most 10 % of the limit left.
    pub near_limit: u64,
    /// `near_limit / allowed`.
    pub near_limit_ratio: f64,
    /// The most of its limit any client used (0–1).
    pub max_used_ratio: f64,
    /// Distinct clients that asked under this rule (a HyperLogLog estimate, ±3 %).
    pub clients: u64,
    /// Distinct clients this rule limited (estimate).
    pub limited_clients: u64,
    /// A usage rule's units; absent for other rules.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<UsageStats>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct TierStats {
    /// A configured tier, `default` (no tier) or `other` (a tier the configuration does not
    /// define).
    pub tier: String,
    pub allowed: u64,
    pub limited: u64,
    pub shadow_limited: u64,
    /// Refused for who the client is (an unknown API key).
    pub refused: u64,
    /// The units of every usage rule, for this tier's clients; absent when none settled or
    /// reserved.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<UsageStats>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct TopClient {
    /// API keys by their SHA-256, as everywhere.
    pub client: crate::ClientId,
    /// At most `error` over the true count.
    pub count: u64,
    pub error: u64,
}

/// `GET /v1/admin/hints`: rules whose limits may need a look, with the figures.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct HintsBody {
    pub window: String,
    pub hints: Vec<Hint>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Hint {
    pub rule: String,
    /// `too_strict` or `too_generous`.
    pub kind: String,
    pub message: String,
    #[cfg_attr(feature = "openapi", schema(value_type = Object))]
    pub figures: serde_json::Value,
}

/// One event of `GET /v1/admin/stats/stream` (`event: stats`, about once a second): what the
/// limiter did since the event before, the stats of the window, the hints, and the
/// configuration's version and system state (a client reads the rest again when the version
/// moves).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct StatsEvent {
    /// RFC 3339, when the event was made.
    pub at: String,
    /// The configuration's version.
    pub version: u64,
    pub state: Operations,
    /// This controller's decisions since the event before (none in the first event).
    pub rates: Rates,
    pub stats: StatsBody,
    pub hints: Vec<Hint>,
}

/// Decisions of this controller over `interval_ms`: overall (each decision once) and per
/// rule (as the stats count them: a rule that was not reached for a denied request is not
/// counted).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Rates {
    pub interval_ms: u64,
    pub allowed: u64,
    pub limited: u64,
    pub shadow_limited: u64,
    /// Refused for who the client is (an unknown API key).
    pub refused: u64,
    pub rules: Vec<RuleRate>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct RuleRate {
    pub rule: String,
    pub allowed: u64,
    pub limited: u64,
    pub shadow_limited: u64,
}
