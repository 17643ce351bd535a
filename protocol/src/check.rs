//! The check call between filter and controller.
//!
//! It is batch-shaped: one `POST` carries a list of checks and the reply carries one decision
//! per check, in the same order. The filter may send one check per call or many.
//!
//! Every type here ignores fields it does not know, in both directions: Envoys and the
//! controller Deployment roll out independently, and a release that adds a field to a call
//! or a reply must not put the other side's requests into the failure mode (UPGRADING.md).
//! Bounds, not strictness, protect the controller from what a proxy sends.

use std::collections::BTreeMap;

use crate::usage::{Settlement, UsageReservation};
use serde::{Deserialize, Serialize};

/// Versioned path of the check call on the controller.
pub const CHECK_PATH: &str = "/v1/check";

/// Largest body the controller reads on its check address (check, release, report). The
/// filter splits its batches so that every call fits.
pub const MAX_CALL_BODY_BYTES: usize = 1 << 20;

/// Longest identity (client value, user, tier) or request field a check may carry. The
/// filter replaces a longer identity by its hash before it leaves the filter, so no key,
/// sketch or log line downstream ever holds it whole.
pub const MAX_IDENTITY_BYTES: usize = 256;

/// Longest path, host or header value a check carries. The filter cuts a longer host or
/// header value, and keeps a longer path's first and last half of this (rules match paths
/// of at most `MAX_MATCH_PATH` bytes, so exact paths, prefixes and globs anchored at either
/// end match as before).
pub const MAX_REQUEST_FIELD_BYTES: usize = 8 * 1024;

/// Longest method a check carries (the filter cuts a longer one; no rule names one).
pub const MAX_METHOD_BYTES: usize = 64;

/// Most matched headers one check carries (rules may match on at most this many distinct
/// headers), and the longest name of one.
pub const MAX_CHECK_HEADERS: usize = 64;
pub const MAX_HEADER_NAME_BYTES: usize = 256;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckRequest {
    pub checks: Vec<Check>,
    /// Whether the controller holds its answer until a leaky bucket's slot (the default).
    /// A filter that batches asks for `false`: the answer then comes at once with
    /// `delay_ms`, and the filter holds the request itself, so that one delayed check does
    /// not hold a whole batch.
    #[serde(default = "yes", skip_serializing_if = "is_true")]
    pub hold_delays: bool,
    /// Who asks, when it takes leases of leased rules' quota (a filter worker, named once
    /// per VM): the controller counts the holders of each key's leases by it. Absent: no
    /// lease is granted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease_holder: Option<String>,
    /// The asker settles usage rules' reservations when responses end: only then may its
    /// decisions carry [`UsageReservation`]s (an asker that does not settle is charged each
    /// reservation whole).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub settles: bool,
}

fn yes() -> bool {
    true
}

fn is_true(value: &bool) -> bool {
    *value
}

/// One request's worth of question: who is asking, for what, at what cost.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Check {
    pub client: ClientId,
    #[serde(default)]
    pub host: String,
    #[serde(default)]
    pub method: String,
    #[serde(default)]
    pub path: String,
    #[serde(default = "default_cost")]
    pub cost: u64,
    /// The client's address as the filter established it (grouped by prefix for IPv6), for
    /// rules scoped per IP whatever identity counts the client otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip: Option<String>,
    /// The user a verified JWT names.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// SHA-256 (hex) of the API key the request carries; the key itself never leaves the
    /// filter.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_key: Option<String>,
    /// The tier a verified JWT names (the controller may also know it from the API key).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tier: Option<String>,
    /// The request headers rules match on (lower-case names), as the filter learnt them
    /// from the controller's rules.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub headers: BTreeMap<String, String>,
    /// The asking worker would hold a lease for this check (a leased rule applies and it
    /// has room for one): only then may the decision carry a [`Grant`].
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub lease: bool,
    /// Picked for the log of limited requests: the controller logs this check's decision
    /// if it is limited. Whoever builds the check picks (the filter, one in
    /// `1/limited_log_sample` of its checks, see [`sampled`]), so the request id travels
    /// only with the checks that may be logged. Not part of what is counted.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub sampled: bool,
    /// Envoy's `x-request-id`, sent with a `sampled` check for the log line.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
    /// Whole numbers the request body holds at the JSON pointers usage rules reserve from
    /// (`"/max_tokens": 300`), read by the filter only while such a rule may apply (see
    /// [`crate::Usage::reserve_from`]); at most [`crate::MAX_REQUEST_FIGURES`].
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub request_figures: BTreeMap<String, u64>,
}

/// Whether the `seen`-th item (counting from 1) of a sequence is one of the `share` (0–1)
/// picked: evenly, one in every `1/share`, so a share is met exactly over any long run and
/// the choice costs a multiplication, not a random draw.
pub fn sampled(seen: u64, share: f64) -> bool {
    if share <= 0.0 || seen == 0 {
        return false;
    }
    let seen = seen as f64;
    (seen * share).floor() > ((seen - 1.0) * share).floor()
}

impl Check {
    /// A 64-bit fingerprint of everything a decision on this check depends on (client,
    /// host without case, request line, cost, identities, matched headers; not the log
    /// sample's fields) and the configuration version it is decided under. The filter keys
    /// its denial cache and its leases by it; the controller names a lease's kind by it.
    pub fn decision_fingerprint(&self, config_version: u64) -> u64 {
        use std::hash::{Hash, Hasher};
        // SipHash with fixed keys: the same in every worker's VM, and a client would need a
        // second preimage to make someone else's request look like its own.
        let mut hasher = std::hash::DefaultHasher::new();
        config_version.hash(&mut hasher);
        self.client.kind.hash(&mut hasher);
        self.client.value.hash(&mut hasher);
        // Host names compare without case; hashed byte by byte to spare an allocation.
        for byte in self.host.bytes() {
            hasher.write_u8(byte.to_ascii_lowercase());
        }
        hasher.write_u8(0xff);
        self.method.hash(&mut hasher);
        self.path.hash(&mut hasher);
        self.cost.hash(&mut hasher);
        self.ip.hash(&mut hasher);
        self.user.hash(&mut hasher);
        self.api_key.hash(&mut hasher);
        self.tier.hash(&mut hasher);
        self.headers.hash(&mut hasher);
        self.request_figures.hash(&mut hasher);
        hasher.finish()
    }

    /// A check with nothing but a client and the request line; the other identities unset.
    pub fn new(client: ClientId, host: &str, method: &str, path: &str, cost: u64) -> Self {
        Check {
            client,
            host: host.to_owned(),
            method: method.to_owned(),
            path: path.to_owned(),
            cost,
            ip: None,
            user: None,
            api_key: None,
            tier: None,
            headers: BTreeMap::new(),
            lease: false,
            sampled: false,
            request_id: None,
            request_figures: BTreeMap::new(),
        }
    }
}

fn default_cost() -> u64 {
    1
}

/// The identity a limit is counted against. `kind` says how it was established
/// (`user`, `api_key`, `header` or `ip`, see [`ClientKind`]), `value` is the identity itself.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ClientId {
    pub kind: String,
    pub value: String,
}

/// How the filter established who the client is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientKind {
    User,
    ApiKey,
    Header,
    Ip,
}

impl ClientKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ClientKind::User => "user",
            ClientKind::ApiKey => "api_key",
            ClientKind::Header => "header",
            ClientKind::Ip => "ip",
        }
    }
}

impl ClientId {
    pub fn new(kind: ClientKind, value: impl Into<String>) -> Self {
        ClientId {
            kind: kind.as_str().to_owned(),
            value: value.into(),
        }
    }

    pub fn ip(address: impl Into<String>) -> Self {
        ClientId::new(ClientKind::Ip, address)
    }

    pub fn is(&self, kind: ClientKind) -> bool {
        self.kind == kind.as_str()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckResponse {
    pub decisions: Vec<Decision>,
}

/// The answer to one check. `policy` is absent when no rule applied to the request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Decision {
    pub allowed: bool,
    /// The limit that speaks for the decision (see [`PolicyStatus`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<PolicyStatus>,
    /// Every other limit that applied, for clients told about each (`RateLimit` fields).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub others: Vec<PolicyStatus>,
    /// Allowed only because the rule that denied is in shadow mode: `policy` is that
    /// rule, and says what would have happened.
    #[serde(default, skip_serializing_if = "is_false")]
    pub shadow_denied: bool,
    /// Concurrency slots held by this request: the filter hands them back with
    /// [`ReleaseRequest`] when the request's stream ends.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub leases: Vec<String>,
    /// Refused for who the client is, not for a limit (`allowed` is false, `policy` absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refused: Option<Refusal>,
    /// Quota leased to the asking worker beyond this request: it may admit requests like
    /// this one itself (see [`Grant`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grant: Option<Grant>,
    /// What the request holds of usage rules' limits until its response says what it used:
    /// the filter settles each when the response ends.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub usage: Vec<UsageReservation>,
}

/// A lease of quota, already taken from every limit the request counted against: the
/// worker admits up to `units` (in request costs) of requests with the same decision facts
/// (its denial-cache fingerprint: client, request line, the headers rules match on, the
/// configuration version) without asking, for `ttl_ms` from when it sent the check.
///
/// `token`, when the controller sends one, lets the worker give back what the lease has not
/// admitted (a [`LeaseReturn`] in its release call): signed by the controller, it names the
/// limits the lease was taken from and may be presented once.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Grant {
    pub units: u64,
    pub ttl_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
}

/// Why a request was refused for who it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Refusal {
    /// An API key the controller does not know, where unknown keys are refused
    /// (`protection.unknown_api_keys = "reject"`): the filter answers 401.
    UnknownApiKey,
}

impl Decision {
    /// Marks no policy as counting usage: for an asker that does not settle.
    pub fn forget_usage(&mut self) {
        for policy in self.policy.iter_mut().chain(self.others.iter_mut()) {
            policy.usage = false;
        }
    }

    /// No rule matched: the request goes on and carries no rate-limit headers.
    pub fn unlimited() -> Self {
        Decision {
            allowed: true,
            policy: None,
            others: Vec::new(),
            shadow_denied: false,
            leases: Vec::new(),
            refused: None,
            grant: None,
            usage: Vec::new(),
        }
    }

    /// Every limit that applied, the speaking one first.
    pub fn policies(&self) -> impl Iterator<Item = &PolicyStatus> + Clone {
        self.policy.iter().chain(&self.others)
    }
}

fn is_false(value: &bool) -> bool {
    !*value
}

/// Why a request was denied, when it is not simply "over the limit for now".
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DenyReason {
    /// The rule's limit is 0: it admits nothing (maintenance).
    LimitZero,
    /// The request costs more than the limit can ever hold: it will never pass.
    CostExceedsCapacity,
    /// The client kept hitting a rule with a penalty: it is cooling down (`retry_after` is
    /// the cool-down's end).
    CoolDown,
}

/// Versioned path of the release call.
pub const RELEASE_PATH: &str = "/v1/release";

/// Hands back concurrency slots (the `leases` of decisions) when requests end, and the
/// unused part of leases of quota (`returns`) that a worker will not use.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReleaseRequest {
    #[serde(default)]
    pub leases: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub returns: Vec<LeaseReturn>,
    /// Usage reservations settled with what responses reported.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub settlements: Vec<Settlement>,
}

/// Quota of a lease that its worker gives back: `unused` of the requests its [`Grant`]
/// (named by the grant's `token`) admits at most.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseReturn {
    pub grant: String,
    pub unused: u64,
}

/// Bytes of a grant's token the controller reads, at most.
pub const MAX_GRANT_TOKEN_BYTES: usize = 4 * 1024;

/// Versioned path where each filter worker reports, once a second, what it saw that the
/// controller cannot: its upstream's answers (for the automatic system state) and invalid
/// tokens by address (for brute-force protection).
pub const REPORT_PATH: &str = "/v1/report";

/// The header naming the worker that sends a report (each is counted once a period).
pub const REPORTER_HEADER: &str = "x-sluice-reporter";

/// Most addresses one report names.
pub const MAX_REPORTED_ADDRESSES: usize = 256;

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Report {
    /// Upstream responses since the last report (the filter's own local replies not counted).
    #[serde(default)]
    pub responses: u64,
    /// Of them, 5xx.
    #[serde(default)]
    pub server_errors: u64,
    /// Requests refused for an invalid token, by client address.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub invalid_tokens: Vec<AddressCount>,
    /// Requests the filter refused from its denial cache (the controller never saw them),
    /// by client, rule and tier: for the stats and alerts.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cached_denials: Vec<CachedDenials>,
    /// Requests the filter admitted from leases (the controller never saw them), by client,
    /// rule of the lease's decision and tier.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub leased: Vec<LeasedAdmissions>,
}

/// Requests of one kind a filter worker admitted from a lease, by client, the rule of the
/// lease's decision and tier: for the stats, as the controller never saw them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeasedAdmissions {
    pub client: ClientId,
    pub rule: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tier: Option<String>,
    pub count: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CachedDenials {
    pub client: ClientId,
    pub rule: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tier: Option<String>,
    pub count: u64,
    /// The request ids of those the filter sampled for the controller's log.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub request_ids: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AddressCount {
    pub ip: String,
    pub count: u64,
}

/// The state of the limit that speaks for the decision: the one that denied, or when
/// every limit allowed, the most restrictive one.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyStatus {
    pub rule: String,
    pub strategy: crate::rules::Strategy,
    pub limit: u64,
    pub remaining: u64,
    /// Milliseconds until the quota is whole again.
    pub reset_ms: u64,
    /// Milliseconds until a request like this one could pass; zero when it was allowed.
    #[serde(default)]
    pub retry_after_ms: u64,
    /// Length of the limit's window in milliseconds, for the `RateLimit-Policy` header
    /// (the lease, for `concurrency`).
    pub window_ms: u64,
    /// How long the controller held the request for its slot (`leaky_bucket`).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub delay_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<DenyReason>,
    /// The limit counts usage that responses report (a usage rule), not requests.
    #[serde(default, skip_serializing_if = "is_false")]
    pub usage: bool,
}

fn is_zero(value: &u64) -> bool {
    *value == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sampling_picks_exactly_its_share_evenly_and_nothing_at_zero() {
        let picked = |share: f64, upto: u64| (1..=upto).filter(|&n| sampled(n, share)).count();
        assert_eq!(picked(0.01, 10_000), 100);
        assert_eq!(picked(0.3, 10), 3);
        assert_eq!(picked(1.0, 50), 50);
        assert_eq!(picked(0.0, 1_000), 0);
        // Evenly: one in every hundred, never two in a row.
        let at: Vec<u64> = (1..=300).filter(|&n| sampled(n, 0.01)).collect();
        assert_eq!(at, [100, 200, 300]);
    }

    #[test]
    fn an_unsampled_check_carries_neither_the_mark_nor_a_request_id() {
        let check = Check::new(ClientId::ip("10.0.0.1"), "h", "GET", "/a", 1);
        let wire = serde_json::to_value(&check).unwrap();
        assert!(wire.get("sampled").is_none(), "{wire}");
        assert!(wire.get("request_id").is_none(), "{wire}");
        let marked = Check {
            sampled: true,
            request_id: Some("r-1".into()),
            ..check
        };
        let back: Check = serde_json::from_value(serde_json::to_value(&marked).unwrap()).unwrap();
        assert_eq!(back, marked);
    }

    #[test]
    fn check_request_round_trips_and_defaults_cost_to_one() {
        let json = r#"{"checks":[{"client":{"kind":"ip","value":"10.0.0.1"},"path":"/a"}]}"#;
        let parsed: CheckRequest = serde_json::from_str(json).unwrap();
        assert_eq!(parsed.checks[0].cost, 1);
        assert_eq!(parsed.checks[0].client, ClientId::ip("10.0.0.1"));
        let again: CheckRequest =
            serde_json::from_str(&serde_json::to_string(&parsed).unwrap()).unwrap();
        assert_eq!(again, parsed);
    }

    /// A call and a reply from a release ahead, with a field new at every level: read as
    /// this release knows them, nothing lost.
    #[test]
    fn calls_and_replies_from_a_newer_release_are_read_ignoring_the_fields_they_add() {
        let call = r#"{"checks":[{"client":{"kind":"ip","value":"10.0.0.1","zone":"eu"},
            "path":"/a","cost":2,"priority":"high"}],"extra":1}"#;
        let parsed: CheckRequest = serde_json::from_str(call).unwrap();
        assert_eq!(parsed.checks[0].client, ClientId::ip("10.0.0.1"));
        assert_eq!(
            (parsed.checks[0].path.as_str(), parsed.checks[0].cost),
            ("/a", 2)
        );
        let reply = r#"{"decisions":[{"allowed":false,"why":"x","policy":{"rule":"r",
            "strategy":"fixed_window","limit":5,"remaining":0,"reset_ms":900,
            "retry_after_ms":900,"window_ms":1000,"quota_unit":"tokens"}}],"served_by":"c-2"}"#;
        let parsed: CheckResponse = serde_json::from_str(reply).unwrap();
        let policy = parsed.decisions[0].policy.as_ref().unwrap();
        assert!(!parsed.decisions[0].allowed);
        assert_eq!(
            (policy.rule.as_str(), policy.limit, policy.retry_after_ms),
            ("r", 5, 900)
        );
        let report = r#"{"responses":3,"server_errors":1,"latency":{"p99":5},
            "invalid_tokens":[{"ip":"10.0.0.9","count":2,"first":1}]}"#;
        let parsed: Report = serde_json::from_str(report).unwrap();
        assert_eq!((parsed.responses, parsed.invalid_tokens[0].count), (3, 2));
        let release: ReleaseRequest =
            serde_json::from_str(r#"{"leases":["l1"],"reason":"done"}"#).unwrap();
        assert_eq!(release.leases, ["l1"]);
    }

    #[test]
    fn unlimited_decision_serialises_without_policy() {
        let json = serde_json::to_string(&Decision::unlimited()).unwrap();
        assert_eq!(json, r#"{"allowed":true}"#);
    }
}
