//! The rule schema: which requests a limit applies to, whom it counts, and how.
//!
//! Rules are validated once ([`RuleSet::new`]) and then only read. Errors name the field
//! (`rules[1].window`) so that an operator can find the mistake.

use std::borrow::Cow;
use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::check::Check;
use crate::duration;
use crate::usage::Usage;

/// Rate-limiting algorithm of a rule; the check call carries which one answered.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Strategy {
    /// Counts requests in windows aligned to the epoch; the count starts afresh at each
    /// boundary (so up to twice the limit can pass across one).
    #[default]
    FixedWindow,
    /// Exact: a request counts for one window after it was made.
    SlidingWindowLog,
    /// The current window's count plus the previous one's, weighted by their overlap.
    SlidingWindowCounter,
    /// `burst` tokens, refilled at `limit` per `window`; allows bursts.
    TokenBucket,
    /// Generic cell rate algorithm: requests evenly spaced at `limit` per `window`, up to
    /// `burst` early.
    Gcra,
    /// A queue drained at `limit` per `window`: requests wait for their slot up to
    /// `max_delay`, and are denied past it.
    LeakyBucket,
    /// At most `limit` requests in flight; a slot is held until the stream ends or its
    /// `lease` expires.
    Concurrency,
}

impl Strategy {
    pub const ALL: [Strategy; 7] = [
        Strategy::FixedWindow,
        Strategy::SlidingWindowLog,
        Strategy::SlidingWindowCounter,
        Strategy::TokenBucket,
        Strategy::Gcra,
        Strategy::LeakyBucket,
        Strategy::Concurrency,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Strategy::FixedWindow => "fixed_window",
            Strategy::SlidingWindowLog => "sliding_window_log",
            Strategy::SlidingWindowCounter => "sliding_window_counter",
            Strategy::TokenBucket => "token_bucket",
            Strategy::Gcra => "gcra",
            Strategy::LeakyBucket => "leaky_bucket",
            Strategy::Concurrency => "concurrency",
        }
    }
}

/// What the filter does with a request when the controller cannot give a decision.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FailureMode {
    /// Let the request through without a limit (logged and counted).
    Allow,
    /// Refuse the request with 503.
    Deny,
}

/// Whom a rule counts separately. A rule scoped to an identity the request does not have
/// (`user` for an anonymous request, say) does not apply to it.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Scope {
    /// One counter per client, by the first identity the filter established (user from a
    /// JWT, API key, configured header, IP: see the filter's `identity.order`).
    #[default]
    Client,
    /// One counter shared by every client.
    Global,
    /// One counter per route (host and path) the rule matches, shared by every client.
    Route,
    /// One counter per client address (IPv6 grouped by the filter's prefix).
    Ip,
    /// One counter per user named by a verified JWT (or an API key the controller knows).
    User,
    /// One counter per API key.
    ApiKey,
    /// One counter per tier, shared by every client of the tier.
    Tier,
}

/// Which requests a rule applies to. Every field that is set must match; an empty match
/// applies to every request.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleMatch {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// The path, exactly (without the query string).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_prefix: Option<String>,
    /// `*` stands for any characters but `/`, `**` for any characters at all:
    /// `/users/*/orders`, `/static/**`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_glob: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub methods: Vec<String>,
    /// The client's tier must be one of these; a client without a tier is in
    /// [`DEFAULT_TIER`].
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tiers: Vec<String>,
    /// Request headers: each must be present, with this exact value when one is given.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub headers: Vec<HeaderMatch>,
}

#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeaderMatch {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
}

impl RuleMatch {
    /// Whether nothing is set: the rule applies to every request.
    pub fn is_empty(&self) -> bool {
        *self == RuleMatch::default()
    }

    fn matches(&self, check: &Check) -> bool {
        self.host
            .as_deref()
            .is_none_or(|host| host.eq_ignore_ascii_case(&check.host))
            && self.path.as_deref().is_none_or(|path| check.path == path)
            && self
                .path_prefix
                .as_deref()
                .is_none_or(|prefix| check.path.starts_with(prefix))
            && self
                .path_glob
                .as_deref()
                .is_none_or(|glob| glob_matches(glob.as_bytes(), check.path.as_bytes()))
            && (self.methods.is_empty()
                || self
                    .methods
                    .iter()
                    .any(|m| m.eq_ignore_ascii_case(&check.method)))
            && (self.tiers.is_empty() || {
                let tier = check.tier.as_deref().unwrap_or(DEFAULT_TIER);
                self.tiers.iter().any(|t| t == tier)
            })
            && self.headers.iter().all(|wanted| {
                let sent = check.headers.get(&wanted.name.to_ascii_lowercase());
                match (&wanted.value, sent) {
                    (_, None) => false,
                    (None, Some(_)) => true,
                    (Some(value), Some(sent)) => value == sent,
                }
            })
    }
}

/// The tier of a client that has none, for `match.tiers`: rules for clients without a tier
/// say `tiers = ["default"]`.
pub const DEFAULT_TIER: &str = "default";

/// A path glob compiled once: most are an exact path or a prefix (`/static/**`), which need
/// no matching machinery (and no allocation) per request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PathPattern {
    Exact(String),
    Prefix(String),
    Glob(String),
}

impl PathPattern {
    pub fn new(glob: &str) -> Self {
        match glob.find('*') {
            None => PathPattern::Exact(glob.to_owned()),
            Some(star) if glob.get(star..) == Some("**") => {
                PathPattern::Prefix(glob.get(..star).unwrap_or("").to_owned())
            }
            Some(_) => PathPattern::Glob(glob.to_owned()),
        }
    }

    pub fn matches(&self, path: &str) -> bool {
        match self {
            PathPattern::Exact(exact) => path == exact,
            PathPattern::Prefix(prefix) => path.starts_with(prefix.as_str()),
            PathPattern::Glob(glob) => glob_matches(glob.as_bytes(), path.as_bytes()),
        }
    }
}

/// Whether `path` matches `glob` (`*`: any run of characters but `/`; `**`: any run).
/// Walks the glob once, keeping every position of the path it can have reached: time is
/// the glob's length times the path's, whatever the stars.
pub fn glob_matches(glob: &[u8], path: &[u8]) -> bool {
    let mut reached = vec![false; path.len() + 1];
    let mut next = vec![false; path.len() + 1];
    if let Some(start) = reached.first_mut() {
        *start = true;
    }
    let mut rest = glob;
    while let Some((&token, after)) = rest.split_first() {
        next.iter_mut().for_each(|n| *n = false);
        if token == b'*' {
            let crosses_slash = after.first() == Some(&b'*');
            rest = if crosses_slash { &after[1..] } else { after };
            let mut carrying = false;
            for (i, slot) in next.iter_mut().enumerate() {
                carrying |= reached[i];
                *slot = carrying;
                // A single star stops at a slash: the slash itself is for the glob to match.
                if !crosses_slash && path.get(i) == Some(&b'/') {
                    carrying = false;
                }
            }
        } else {
            rest = after;
            for (i, &byte) in path.iter().enumerate() {
                next[i + 1] = reached[i] && byte == token;
            }
        }
        std::mem::swap(&mut reached, &mut next);
        if !reached.contains(&true) {
            return false;
        }
    }
    reached.last().copied().unwrap_or(false)
}

/// A length of time, written `500ms`, `1s`, `10m`… in configuration and held as
/// milliseconds. `Window` is never zero; `Delay` may be.
macro_rules! millis_type {
    ($name:ident, $zero_ok:expr) => {
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub struct $name(u64);

        impl $name {
            pub fn from_millis(ms: u64) -> Option<Self> {
                ($zero_ok || ms > 0).then_some($name(ms))
            }

            pub fn millis(self) -> u64 {
                self.0
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(&duration::format_millis(self.0))
            }
        }

        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                serializer.serialize_str(&duration::format_millis(self.0))
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                let text = String::deserialize(deserializer)?;
                let parsed = if $zero_ok {
                    duration::parse_millis_or_zero(&text)
                } else {
                    duration::parse_millis(&text)
                };
                parsed.map($name).map_err(serde::de::Error::custom)
            }
        }
    };
}

millis_type!(Window, false);
millis_type!(Delay, true);

#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    pub name: String,
    #[serde(default)]
    pub strategy: Strategy,
    #[serde(default)]
    pub scope: Scope,
    /// Requests admitted per window (in flight, for `concurrency`); 0 blocks every matching
    /// request.
    pub limit: u64,
    /// Required by every strategy but `concurrency`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", schema(value_type = Option<String>, example = "1m"))]
    pub window: Option<Window>,
    /// `token_bucket` (default: `limit`) and `gcra` (default: 1): requests that may come at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub burst: Option<u64>,
    /// `leaky_bucket` only, required: the longest a request may wait for its slot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", schema(value_type = Option<String>, example = "1s"))]
    pub max_delay: Option<Delay>,
    /// `concurrency` only (default 60s): when a slot that was never released frees itself.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", schema(value_type = Option<String>, example = "60s"))]
    pub lease: Option<Window>,
    /// What one request costs under this rule; default: the cost the filter sends (1 unless
    /// the filter reads it from a request header).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cost: Option<u64>,
    #[serde(default, rename = "match", skip_serializing_if = "RuleMatch::is_empty")]
    pub matcher: RuleMatch,
    /// Evaluated and reported (headers, metrics) but never blocks: for trying a rule out.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub shadow: bool,
    /// What the filter does with requests this rule applies to when the controller cannot
    /// answer; default: the filter's own `failure_mode`. When rules disagree, deny wins.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure_mode: Option<FailureMode>,
    /// Counts each client with the limits of its tier (`limit`, and `window` and `burst`
    /// where the tier sets them); clients without a tier count in the tier `default` if
    /// one is defined; clients of a tier the configuration does not define get the rule's
    /// own limits.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub tier_limits: bool,
    /// A client that keeps hitting this rule's limit cools down for longer each time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub penalty: Option<Penalty>,
    /// Lease mode: the controller hands each filter worker part of a key's quota, which
    /// the worker admits from without asking (`fixed_window`, `token_bucket`, `gcra`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub leased: Option<Leased>,
    /// Counts what each request used, as its response says (LLM tokens, credits): a
    /// reservation is taken when the request is admitted and settled when its response
    /// ends (`fixed_window`, `token_bucket`, `gcra`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
}

/// How a leased rule shares out its quota. A worker's lease is taken from the key's quota
/// when it is granted (so leases never admit beyond the limit): at most `share_percent` %
/// of the limit (the burst) divided by the workers holding leases on the key. A
/// `fixed_window` lease lasts to the end of its window (ending sooner would lose what it
/// has left for the rest of the window); a `token_bucket` or `gcra` lease lasts `ttl`, and
/// what it has left then is lost until the bucket refills it. What a lease holds unused is
/// quota nobody else can have meanwhile: the slack this mode trades for requests decided
/// without a round trip.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct Leased {
    /// The share of the limit (1–100 %) all leases on one key may hold at once.
    #[serde(default = "default_lease_share")]
    pub share_percent: u8,
    /// `token_bucket` and `gcra` only: how long a lease lasts (default 1s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", schema(value_type = Option<String>, example = "1s"))]
    pub ttl: Option<Window>,
}

impl Leased {
    /// How long a `token_bucket` or `gcra` lease lasts.
    pub fn ttl_ms(&self) -> u64 {
        self.ttl.map_or(DEFAULT_LEASE_TTL_MS, Window::millis)
    }
}

fn default_lease_share() -> u8 {
    5
}

const DEFAULT_LEASE_TTL_MS: u64 = 1_000;

/// Strategies whose quota can be handed out ahead: taking `n` from them now is the same
/// as admitting `n` requests now. The others cannot: a sliding window remembers when each
/// request came (a lease would have to be placed in time), a leaky bucket schedules each
/// request, and concurrency counts requests in flight.
pub const LEASABLE: [Strategy; 3] = [Strategy::FixedWindow, Strategy::TokenBucket, Strategy::Gcra];

/// Strategies that can settle usage after the response: for the same reason as
/// [`LEASABLE`], what a reservation took can be given back, and usage beyond it charged, as
/// a count. A sliding window would have to place the difference in time, a leaky bucket
/// has already scheduled the request, and concurrency counts requests, not units.
pub const USAGE_STRATEGIES: [Strategy; 3] = LEASABLE;

/// A progressive penalty: each time the rule denies a client (outside a cool-down), the
/// client's strikes grow by one and it may not pass for `base × 2^(strikes − 1)`, at most
/// `max`; one strike is forgiven for every `decay` without a denial.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct Penalty {
    #[cfg_attr(feature = "openapi", schema(value_type = String, example = "10s"))]
    pub base: Window,
    #[cfg_attr(feature = "openapi", schema(value_type = String, example = "10m"))]
    pub max: Window,
    #[cfg_attr(feature = "openapi", schema(value_type = String, example = "1m"))]
    pub decay: Window,
}

/// The request headers the rules match on (lower-case, each once): what the filter sends.
pub fn matched_headers(rules: &[Rule]) -> Vec<String> {
    let mut names: Vec<String> = rules
        .iter()
        .flat_map(|rule| &rule.matcher.headers)
        .map(|header| header.name.to_ascii_lowercase())
        .collect();
    names.sort();
    names.dedup();
    names
}

/// The failure mode for a request the controller could not decide: deny if any rule that
/// applies says deny, else allow if any says allow, else `default`.
pub fn failure_mode_for<'r>(
    rules: impl IntoIterator<Item = &'r Rule>,
    check: &Check,
    default: FailureMode,
) -> FailureMode {
    let mut chosen = None;
    for rule in rules {
        match rule.failure_mode {
            Some(mode) if rule.applies_to(check) => {
                if mode == FailureMode::Deny {
                    return FailureMode::Deny;
                }
                chosen = Some(mode);
            }
            _ => {}
        }
    }
    chosen.unwrap_or(default)
}

/// Default lease of a `concurrency` slot.
pub const DEFAULT_LEASE_MS: u64 = 60_000;

/// Largest `limit` of a `sliding_window_log` rule: the log keeps one entry per request.
pub const MAX_LOG_LIMIT: u64 = 100_000;

/// Rate strategies compute in integers of `limit × window` (and `burst × window`,
/// `max_delay × limit`); Redis's Lua numbers are exact below 2^53.
pub const MAX_EXACT: u64 = 1 << 53;

impl Rule {
    /// The most one response may count under a usage rule: its `max`, or else what the
    /// strategy counts exactly with the rule's window (a bucket or GCRA counts in units of
    /// `1/window`: `max × window` stays below 2^52, room left for debt), at most 10^12.
    pub fn usage_max(&self) -> Option<u64> {
        let usage = self.usage.as_ref()?;
        let exact = match self.strategy {
            Strategy::TokenBucket | Strategy::Gcra => {
                (MAX_EXACT / 2 / self.window_ms().max(1)).saturating_sub(1)
            }
            _ => crate::MAX_USAGE,
        };
        Some(usage.max_or(exact.min(crate::MAX_USAGE)))
    }

    /// The rule as it counts a client of `tier` (see [`Rule::tier_limits`]).
    pub fn with_tier_limits(&self, tier: &crate::config::TierLimits) -> Rule {
        let takes_burst = matches!(self.strategy, Strategy::TokenBucket | Strategy::Gcra);
        // A concurrency rule has no window; a tier's burst is for the strategies that have
        // one. Tiers name limits for every rule that counts by tier, whatever its strategy.
        let keeps_window = self.strategy == Strategy::Concurrency;
        Rule {
            limit: tier.limit,
            window: if keeps_window {
                self.window
            } else {
                tier.window.or(self.window)
            },
            burst: if takes_burst {
                tier.burst.or(self.burst)
            } else {
                self.burst
            },
            ..self.clone()
        }
    }

    /// Whether the rule's `match` selects the check.
    pub fn applies_to(&self, check: &Check) -> bool {
        self.matcher.matches(check)
    }

    pub fn window_ms(&self) -> u64 {
        self.window.map_or(0, Window::millis)
    }

    /// The burst of `token_bucket` and `gcra`, with their defaults.
    pub fn burst(&self) -> u64 {
        match self.strategy {
            Strategy::TokenBucket => self.burst.unwrap_or(self.limit),
            Strategy::Gcra => self.burst.unwrap_or(1),
            _ => 0,
        }
    }

    pub fn lease_ms(&self) -> u64 {
        self.lease.map_or(DEFAULT_LEASE_MS, Window::millis)
    }

    pub fn max_delay_ms(&self) -> u64 {
        self.max_delay.map_or(0, Delay::millis)
    }

    /// The quota shown to clients as `X-RateLimit-Limit`: the requests the rule admits at
    /// once when nothing has been used. That is `limit` for window and concurrency
    /// strategies, the burst for `token_bucket` and `gcra`, and for `leaky_bucket` the
    /// queue it can hold (the first request passes at once, then one per slot until the
    /// wait would pass `max_delay`).
    pub fn quota(&self) -> u64 {
        match self.strategy {
            Strategy::TokenBucket | Strategy::Gcra => self.burst(),
            Strategy::LeakyBucket if self.limit > 0 => {
                let queued = u128::from(self.max_delay_ms()) * u128::from(self.limit)
                    / u128::from(self.window_ms().max(1));
                u64::try_from(queued).unwrap_or(u64::MAX).saturating_add(1)
            }
            _ => self.limit,
        }
    }

    /// Largest cost one request can ever be admitted with: what the limit holds at once
    /// (for a leaky bucket, the places in its queue: a request taking more would hold
    /// everyone behind it longer than `max_delay`).
    pub fn capacity(&self) -> u64 {
        self.quota()
    }

    fn validate(&self) -> Result<(), (Cow<'static, str>, String)> {
        self.validate_fields()
            .map_err(|(field, message)| (Cow::Borrowed(field), message))?;
        for (index, header) in self.matcher.headers.iter().enumerate() {
            let token = |b: u8| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b);
            if header.name.is_empty()
                || !header.name.bytes().all(token)
                || header.name.starts_with(':')
            {
                return Err((
                    Cow::Owned(format!("match.headers[{index}].name")),
                    format!("`{}` is not a header name", header.name),
                ));
            }
        }
        Ok(())
    }

    fn validate_fields(&self) -> Result<(), (&'static str, String)> {
        let name_ok = !self.name.is_empty()
            && self.name.len() <= MAX_RULE_NAME
            && self
                .name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if !name_ok {
            return Err((
                "name",
                format!(
                    "`{}` must be 1 to {MAX_RULE_NAME} characters of A-Z, a-z, 0-9, `-` or `_`",
                    self.name
                ),
            ));
        }
        let paths = [
            ("match.path", &self.matcher.path),
            ("match.path_prefix", &self.matcher.path_prefix),
            ("match.path_glob", &self.matcher.path_glob),
        ];
        for (field, path) in paths {
            if let Some(path) = path {
                if !path.starts_with('/') || path.len() > MAX_MATCH_PATH {
                    return Err((
                        field,
                        format!(
                            "`{path}` must start with `/` and be at most {MAX_MATCH_PATH} bytes"
                        ),
                    ));
                }
            }
        }

        let strategy = self.strategy.as_str();
        let only_for = |field: &'static str, allowed: &[Strategy], set: bool| {
            if set && !allowed.contains(&self.strategy) {
                let names: Vec<&str> = allowed.iter().map(|s| s.as_str()).collect();
                Err((
                    field,
                    format!("applies to {} only, not to {strategy}", names.join(" and ")),
                ))
            } else {
                Ok(())
            }
        };
        only_for(
            "burst",
            &[Strategy::TokenBucket, Strategy::Gcra],
            self.burst.is_some(),
        )?;
        only_for(
            "max_delay",
            &[Strategy::LeakyBucket],
            self.max_delay.is_some(),
        )?;
        only_for("lease", &[Strategy::Concurrency], self.lease.is_some())?;
        match (self.strategy, self.window) {
            (Strategy::Concurrency, Some(_)) => {
                return Err((
                    "window",
                    "does not apply to concurrency; set `lease`".into(),
                ))
            }
            (Strategy::Concurrency, None) => {}
            (_, None) => return Err(("window", format!("is required by {strategy}"))),
            (_, Some(_)) => {}
        }
        if let Some(penalty) = &self.penalty {
            if self.strategy == Strategy::Concurrency {
                return Err((
                    "penalty",
                    "does not apply to concurrency (a slot frees when a request ends)".into(),
                ));
            }
            if penalty.max.millis() < penalty.base.millis() {
                return Err(("penalty.max", "must be at least penalty.base".into()));
            }
        }
        if let Some(leased) = &self.leased {
            if !LEASABLE.contains(&self.strategy) {
                return Err((
                    "leased",
                    format!(
                        "only fixed_window, token_bucket and gcra can lease quota, not {strategy}"
                    ),
                ));
            }
            if self.shadow {
                return Err((
                    "leased",
                    "a shadow rule is counted request by request".into(),
                ));
            }
            if self.penalty.is_some() {
                return Err((
                    "leased",
                    "a rule with a penalty decides each request (a lease would skip its strikes)"
                        .into(),
                ));
            }
            if leased.ttl.is_some() && self.strategy == Strategy::FixedWindow {
                return Err((
                    "leased.ttl",
                    "a fixed_window lease lasts to the end of its window (ending it sooner \
                     would lose what it has left); ttl is for token_bucket and gcra"
                        .into(),
                ));
            }
            if !(1..=100).contains(&leased.share_percent) {
                return Err((
                    "leased.share_percent",
                    format!("must be from 1 to 100, got {}", leased.share_percent),
                ));
            }
        }
        if let Some(usage) = &self.usage {
            if !USAGE_STRATEGIES.contains(&self.strategy) {
                return Err((
                    "usage",
                    format!(
                        "only fixed_window, token_bucket and gcra can settle usage, not {strategy}"
                    ),
                ));
            }
            let conflict = [
                ("leased", self.leased.is_some()),
                ("cost", self.cost.is_some()),
                ("shadow", self.shadow),
            ];
            if let Some((field, _)) = conflict.iter().find(|(_, set)| *set) {
                return Err((
                    "usage",
                    format!(
                        "cannot be combined with {field}: a usage rule's cost is what each \
                         response reports"
                    ),
                ));
            }
            let max = self.usage_max().unwrap_or(crate::MAX_USAGE);
            if usage.max.is_some()
                && matches!(self.strategy, Strategy::TokenBucket | Strategy::Gcra)
            {
                let product = u128::from(max) * u128::from(self.window_ms());
                if product >= u128::from(MAX_EXACT / 2) {
                    return Err((
                        "usage.max",
                        format!(
                            "too large for exact arithmetic with this window: usage.max × the \
                             window must stay below 2^52 (at most {})",
                            MAX_EXACT / 2 / self.window_ms().max(1) - 1
                        ),
                    ));
                }
            }
            usage.validate(max)?;
            if usage.reserve > self.capacity() {
                return Err((
                    "usage.reserve",
                    format!(
                        "{} is more than the rule ever admits at once ({}): every request \
                         would be refused",
                        usage.reserve,
                        self.capacity()
                    ),
                ));
            }
        }
        if self.strategy == Strategy::LeakyBucket && self.max_delay.is_none() {
            return Err((
                "max_delay",
                "is required by leaky_bucket (0s for none)".into(),
            ));
        }
        if self.limit > MAX_EXACT {
            return Err(("limit", format!("must be at most 2^53 ({MAX_EXACT})")));
        }
        if self.burst == Some(0) {
            return Err(("burst", "must be at least 1".into()));
        }
        if self.strategy == Strategy::SlidingWindowLog && self.limit > MAX_LOG_LIMIT {
            return Err((
                "limit",
                format!("sliding_window_log keeps one entry per request: at most {MAX_LOG_LIMIT}"),
            ));
        }
        let rate_based = matches!(
            self.strategy,
            Strategy::SlidingWindowCounter
                | Strategy::TokenBucket
                | Strategy::Gcra
                | Strategy::LeakyBucket
        );
        if rate_based {
            let window = u128::from(self.window_ms());
            let products = [
                ("limit", u128::from(self.limit) * window),
                ("burst", u128::from(self.burst()) * window),
                (
                    "max_delay",
                    u128::from(self.max_delay_ms()) * u128::from(self.limit),
                ),
            ];
            for (field, product) in products {
                if product >= u128::from(MAX_EXACT) {
                    return Err((
                        field,
                        format!(
                            "too large for exact arithmetic with this window: \
                             {field} × the other factor must stay below 2^53"
                        ),
                    ));
                }
            }
        }
        Ok(())
    }
}

/// A validation failure, naming the field it is about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleError {
    pub field: String,
    pub message: String,
}

impl fmt::Display for RuleError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

impl std::error::Error for RuleError {}

/// Longest path a rule may match on.
pub const MAX_MATCH_PATH: usize = 1_024;

/// Longest rule name; names end up in Redis keys and response headers.
pub const MAX_RULE_NAME: usize = 64;

/// A validated list of rules, in the order they were written.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RuleSet {
    rules: Vec<Rule>,
}

impl RuleSet {
    pub fn new(rules: Vec<Rule>) -> Result<Self, RuleError> {
        // Names seen so far: a set, so that ten thousand rules validate in linear time.
        let mut names = std::collections::HashSet::with_capacity(rules.len());
        for (index, rule) in rules.iter().enumerate() {
            let error = |field: &str, message: String| RuleError {
                field: format!("rules[{index}].{field}"),
                message,
            };
            rule.validate()
                .map_err(|(field, message)| error(&field, message))?;
            if !names.insert(rule.name.as_str()) {
                return Err(error(
                    "name",
                    format!("`{}` is used by an earlier rule", rule.name),
                ));
            }
        }
        // Every check carries the headers the rules match on: bounded, so a check is.
        let headers = matched_headers(&rules).len();
        if headers > crate::MAX_CHECK_HEADERS {
            return Err(RuleError {
                field: "rules".to_owned(),
                message: format!(
                    "the rules match on {headers} distinct headers; at most {}",
                    crate::MAX_CHECK_HEADERS
                ),
            });
        }
        Ok(RuleSet { rules })
    }

    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }

    /// Every rule that applies to the check, in configuration order.
    pub fn matching<'a>(&'a self, check: &'a Check) -> impl Iterator<Item = &'a Rule> + 'a {
        self.rules
            .iter()
            .filter(move |rule| rule.matcher.matches(check))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::check::ClientId;

    fn rule(name: &str, matcher: RuleMatch) -> Rule {
        Rule {
            name: name.to_owned(),
            strategy: Strategy::FixedWindow,
            scope: Scope::Client,
            limit: 10,
            window: Some(Window(1_000)),
            burst: None,
            max_delay: None,
            lease: None,
            cost: None,
            matcher,
            shadow: false,
            failure_mode: None,
            tier_limits: false,
            penalty: None,
            leased: None,
            usage: None,
        }
    }

    fn check(method: &str, path: &str) -> Check {
        Check::new(ClientId::ip("10.0.0.1"), "api.example.com", method, path, 1)
    }

    #[test]
    fn the_rules_match_on_a_bounded_number_of_headers() {
        let on_headers = |from: usize, to: usize| {
            rule(
                &format!("h{from}"),
                RuleMatch {
                    headers: (from..to)
                        .map(|n| HeaderMatch {
                            name: format!("x-h{n}"),
                            value: None,
                        })
                        .collect(),
                    ..RuleMatch::default()
                },
            )
        };
        let at_the_bound = vec![on_headers(0, 40), on_headers(20, crate::MAX_CHECK_HEADERS)];
        assert!(RuleSet::new(at_the_bound).is_ok(), "64 distinct headers");
        let past = vec![
            on_headers(0, 40),
            on_headers(40, crate::MAX_CHECK_HEADERS + 1),
        ];
        let error = RuleSet::new(past).unwrap_err();
        assert_eq!(error.field, "rules");
        assert!(
            error.message.contains("65 distinct headers"),
            "{}",
            error.message
        );
    }

    #[test]
    fn rule_parses_from_json_with_defaults() {
        let json = r#"{"name":"per-ip","limit":5,"window":"1m"}"#;
        let rule: Rule = serde_json::from_str(json).unwrap();
        assert_eq!(rule.window_ms(), 60_000);
        assert_eq!(rule.strategy, Strategy::FixedWindow);
        assert_eq!(rule.scope, Scope::Client);
        assert_eq!(rule.matcher, RuleMatch::default());
    }

    #[test]
    fn bad_window_is_refused_with_reason() {
        let json = r#"{"name":"x","limit":5,"window":"5 minutes"}"#;
        let err = serde_json::from_str::<Rule>(json).unwrap_err().to_string();
        assert!(err.contains("no known unit"), "{err}");
    }

    #[test]
    fn matching_checks_every_set_field() {
        let rules = RuleSet::new(vec![
            rule("all", RuleMatch::default()),
            rule(
                "posts-to-api",
                RuleMatch {
                    path_prefix: Some("/api".into()),
                    methods: vec!["POST".into()],
                    ..RuleMatch::default()
                },
            ),
            rule(
                "other-host",
                RuleMatch {
                    host: Some("admin.example.com".into()),
                    ..RuleMatch::default()
                },
            ),
        ])
        .unwrap();
        let names = |c: &Check| {
            rules
                .matching(c)
                .map(|r| r.name.clone())
                .collect::<Vec<_>>()
        };
        assert_eq!(names(&check("post", "/api/items")), ["all", "posts-to-api"]);
        assert_eq!(names(&check("GET", "/api/items")), ["all"]);
        assert_eq!(names(&check("POST", "/apx")), ["all"]);
    }

    #[test]
    fn paths_match_exactly_by_prefix_or_by_glob_and_tiers_must_be_known() {
        let with = |matcher: RuleMatch| RuleSet::new(vec![rule("r", matcher)]).unwrap();
        let applies = |rules: &RuleSet, check: &Check| rules.matching(check).count() == 1;
        let exact = with(RuleMatch {
            path: Some("/login".into()),
            ..RuleMatch::default()
        });
        assert!(applies(&exact, &check("POST", "/login")));
        assert!(!applies(&exact, &check("POST", "/login/x")));
        let glob = with(RuleMatch {
            path_glob: Some("/users/*/orders".into()),
            ..RuleMatch::default()
        });
        assert!(applies(&glob, &check("GET", "/users/42/orders")));
        assert!(!applies(&glob, &check("GET", "/users/42/x/orders")));
        let gold = with(RuleMatch {
            tiers: vec!["gold".into()],
            ..RuleMatch::default()
        });
        let mut gold_check = check("GET", "/");
        assert!(!applies(&gold, &gold_check), "no tier: not a gold client");
        let untiered = with(RuleMatch {
            tiers: vec![DEFAULT_TIER.into()],
            ..RuleMatch::default()
        });
        assert!(applies(&untiered, &gold_check));
        gold_check.tier = Some("gold".into());
        assert!(applies(&gold, &gold_check));
        gold_check.tier = Some("silver".into());
        assert!(!applies(&gold, &gold_check));
    }

    #[test]
    fn a_rules_failure_mode_overrides_the_default_and_deny_wins() {
        let mut payments = rule(
            "payments",
            RuleMatch {
                path_prefix: Some("/pay".into()),
                ..RuleMatch::default()
            },
        );
        payments.failure_mode = Some(FailureMode::Deny);
        let mut open = rule("open", RuleMatch::default());
        open.failure_mode = Some(FailureMode::Allow);
        let no_mode = rule("no-mode", RuleMatch::default());
        // Deny wins wherever it stands: "the first matching rule wins" would fail one order.
        for rules in [
            [payments.clone(), open.clone(), no_mode.clone()],
            [open.clone(), no_mode.clone(), payments.clone()],
            [no_mode.clone(), payments.clone(), open.clone()],
        ] {
            let mode = |path: &str, default| failure_mode_for(&rules, &check("GET", path), default);
            assert_eq!(mode("/pay/1", FailureMode::Allow), FailureMode::Deny);
            // A rule's own mode overrides the default, and a rule without one does not.
            assert_eq!(mode("/items", FailureMode::Deny), FailureMode::Allow);
        }
        assert_eq!(
            failure_mode_for([&no_mode], &check("GET", "/pay"), FailureMode::Deny),
            FailureMode::Deny,
            "no rule with a mode: the default"
        );
        assert_eq!(
            failure_mode_for([] as [&Rule; 0], &check("GET", "/pay"), FailureMode::Allow),
            FailureMode::Allow
        );
    }

    #[test]
    fn headers_match_by_presence_or_exact_value() {
        let rules = RuleSet::new(vec![rule(
            "pro",
            RuleMatch {
                headers: vec![
                    HeaderMatch {
                        name: "X-Plan".into(),
                        value: Some("pro".into()),
                    },
                    HeaderMatch {
                        name: "x-tenant".into(),
                        value: None,
                    },
                ],
                ..RuleMatch::default()
            },
        )])
        .unwrap();
        assert_eq!(matched_headers(rules.rules()), ["x-plan", "x-tenant"]);
        let mut check = check("GET", "/");
        let applies = |check: &Check| rules.matching(check).count() == 1;
        assert!(!applies(&check));
        check.headers.insert("x-plan".into(), "pro".into());
        assert!(!applies(&check), "x-tenant missing");
        check.headers.insert("x-tenant".into(), "anything".into());
        assert!(applies(&check));
        check.headers.insert("x-plan".into(), "free".into());
        assert!(!applies(&check));
        let bad = rule(
            "bad",
            RuleMatch {
                headers: vec![HeaderMatch {
                    name: ":path".into(),
                    value: None,
                }],
                ..RuleMatch::default()
            },
        );
        assert_eq!(
            RuleSet::new(vec![bad]).unwrap_err().field,
            "rules[0].match.headers[0].name"
        );
    }

    #[test]
    fn compiled_patterns_agree_with_the_glob_matcher() {
        let globs = [
            "/healthz",
            "/stats/**",
            "/a/*/b",
            "/**",
            "/x**",
            "/a/**/z",
            "/*.png",
        ];
        let paths = [
            "/healthz",
            "/healthz/x",
            "/stats/",
            "/stats/a/b",
            "/stats",
            "/a/1/b",
            "/a/1/2/b",
            "/x",
            "/xyz/w",
            "/a/q/z",
            "/p.png",
            "/d/p.png",
            "",
        ];
        for glob in globs {
            let pattern = PathPattern::new(glob);
            for path in paths {
                assert_eq!(
                    pattern.matches(path),
                    glob_matches(glob.as_bytes(), path.as_bytes()),
                    "{glob} vs {path} ({pattern:?})"
                );
            }
        }
        assert_eq!(
            PathPattern::new("/stats/**"),
            PathPattern::Prefix("/stats/".into())
        );
        assert_eq!(
            PathPattern::new("/healthz"),
            PathPattern::Exact("/healthz".into())
        );
    }

    #[test]
    fn globs_take_single_and_double_stars() {
        let cases: [(&str, &str, bool); 10] = [
            ("/a/*", "/a/b", true),
            ("/a/*", "/a/", true),
            ("/a/*", "/a/b/c", false),
            ("/a/**", "/a/b/c", true),
            ("/a/**/z", "/a/b/c/z", true),
            ("/a/**/z", "/a/b/c/y", false),
            ("/*.png", "/x.png", true),
            ("/*.png", "/x/y.png", false),
            ("/exact", "/exact", true),
            ("/exact", "/exactly", false),
        ];
        for (glob, path, expected) in cases {
            assert_eq!(
                glob_matches(glob.as_bytes(), path.as_bytes()),
                expected,
                "{glob} vs {path}"
            );
        }
    }

    #[test]
    fn invalid_rules_name_the_field() {
        let cases = [
            (
                vec![rule("bad name", RuleMatch::default())],
                "rules[0].name",
            ),
            (
                vec![
                    rule("a", RuleMatch::default()),
                    rule("a", RuleMatch::default()),
                ],
                "rules[1].name",
            ),
            (
                vec![rule(
                    "p",
                    RuleMatch {
                        path_prefix: Some("api".into()),
                        ..RuleMatch::default()
                    },
                )],
                "rules[0].match.path_prefix",
            ),
        ];
        for (rules, field) in cases {
            assert_eq!(RuleSet::new(rules).unwrap_err().field, field);
        }
    }

    #[test]
    fn each_strategy_parses_with_its_own_fields() {
        let cases = [
            r#"{"name":"a","strategy":"sliding_window_log","limit":5,"window":"1s"}"#,
            r#"{"name":"a","strategy":"sliding_window_counter","limit":5,"window":"1s"}"#,
            r#"{"name":"a","strategy":"token_bucket","limit":5,"window":"1s","burst":20}"#,
            r#"{"name":"a","strategy":"gcra","limit":5,"window":"1s"}"#,
            r#"{"name":"a","strategy":"leaky_bucket","limit":5,"window":"1s","max_delay":"0s"}"#,
            r#"{"name":"a","strategy":"concurrency","limit":5,"lease":"30s"}"#,
            r#"{"name":"a","strategy":"concurrency","limit":5}"#,
            r#"{"name":"a","limit":5,"window":"1s","usage":{"json_pointer":"/usage/total_tokens","reserve":5}}"#,
            r#"{"name":"a","strategy":"gcra","limit":5,"window":"1s","burst":9,"usage":{"response_header":"x-used","reserve":9}}"#,
        ];
        for json in cases {
            let rule: Rule = serde_json::from_str(json).unwrap();
            RuleSet::new(vec![rule]).unwrap_or_else(|e| panic!("{json}: {e}"));
        }
        let gcra: Rule =
            serde_json::from_str(r#"{"name":"a","strategy":"gcra","limit":5,"window":"1s"}"#)
                .unwrap();
        assert_eq!(gcra.burst(), 1);
        let bucket: Rule = serde_json::from_str(
            r#"{"name":"a","strategy":"token_bucket","limit":5,"window":"1s"}"#,
        )
        .unwrap();
        assert_eq!(bucket.burst(), 5);
    }

    /// One bad rule per error, each with the field it is reported against.
    #[test]
    fn strategy_fields_are_checked() {
        let cases = [
            (
                r#"{"name":"a","strategy":"sliding_window_counter","limit":5,"window":"1s","usage":{"json_pointer":"/t","reserve":1}}"#,
                "rules[0].usage",
            ),
            (
                r#"{"name":"a","limit":5,"window":"1s","cost":2,"usage":{"json_pointer":"/t","reserve":1}}"#,
                "rules[0].usage",
            ),
            (
                r#"{"name":"a","limit":5,"window":"1s","leased":{},"usage":{"json_pointer":"/t","reserve":1}}"#,
                "rules[0].usage",
            ),
            (
                r#"{"name":"a","limit":5,"window":"1s","usage":{"json_pointer":"/t","reserve":6}}"#,
                "rules[0].usage.reserve",
            ),
            (
                r#"{"name":"a","limit":5,"window":"1s","usage":{"json_pointer":"t","reserve":1}}"#,
                "rules[0].usage.json_pointer",
            ),
            (
                r#"{"name":"a","strategy":"gcra","limit":5,"window":"1d","usage":{"json_pointer":"/t","reserve":1,"max":1000000000000}}"#,
                "rules[0].usage.max",
            ),
            (r#"{"name":"a","limit":5}"#, "rules[0].window"),
            (
                r#"{"name":"a","strategy":"concurrency","limit":5,"window":"1s"}"#,
                "rules[0].window",
            ),
            (
                r#"{"name":"a","limit":5,"window":"1s","burst":3}"#,
                "rules[0].burst",
            ),
            (
                r#"{"name":"a","strategy":"gcra","limit":5,"window":"1s","burst":0}"#,
                "rules[0].burst",
            ),
            (
                r#"{"name":"a","strategy":"leaky_bucket","limit":5,"window":"1s"}"#,
                "rules[0].max_delay",
            ),
            (
                r#"{"name":"a","limit":5,"window":"1s","max_delay":"1s"}"#,
                "rules[0].max_delay",
            ),
            (
                r#"{"name":"a","limit":5,"window":"1s","lease":"1s"}"#,
                "rules[0].lease",
            ),
            (
                r#"{"name":"a","strategy":"sliding_window_log","limit":100001,"window":"1s"}"#,
                "rules[0].limit",
            ),
            (
                r#"{"name":"a","strategy":"token_bucket","limit":1000000000000,"window":"1d"}"#,
                "rules[0].limit",
            ),
        ];
        for (json, field) in cases {
            let rule: Rule = serde_json::from_str(json).unwrap();
            let err = RuleSet::new(vec![rule]).unwrap_err();
            assert_eq!(err.field, field, "{json}: {err}");
        }
    }

    #[test]
    fn limits_up_to_two_to_the_53_are_accepted() {
        let at = r#"{"name":"a","limit":9007199254740992,"window":"1d"}"#;
        assert!(RuleSet::new(vec![serde_json::from_str(at).unwrap()]).is_ok());
        let above = r#"{"name":"a","limit":9007199254740993,"window":"1d"}"#;
        let err = RuleSet::new(vec![serde_json::from_str(above).unwrap()]).unwrap_err();
        assert_eq!(err.field, "rules[0].limit");
    }

    #[test]
    fn quota_is_what_can_pass_at_once() {
        let quota = |json: &str| serde_json::from_str::<Rule>(json).unwrap().quota();
        assert_eq!(quota(r#"{"name":"a","limit":5,"window":"1s"}"#), 5);
        assert_eq!(
            quota(r#"{"name":"a","strategy":"token_bucket","limit":1,"window":"1s","burst":20}"#),
            20
        );
        assert_eq!(
            quota(r#"{"name":"a","strategy":"gcra","limit":10,"window":"1s"}"#),
            1
        );
        // One every 500 ms, waiting at most 1 s: now, +500 ms, +1000 ms.
        assert_eq!(
            quota(
                r#"{"name":"a","strategy":"leaky_bucket","limit":2,"window":"1s","max_delay":"1s"}"#
            ),
            3
        );
        assert_eq!(
            quota(
                r#"{"name":"a","strategy":"leaky_bucket","limit":2,"window":"1s","max_delay":"0s"}"#
            ),
            1
        );
    }
}
