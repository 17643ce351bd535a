//! Plugin configuration: parsed and checked once, at `on_configure`.
//!
//! A configuration that does not parse or does not make sense is refused as a whole, with a
//! message naming the field; the filter never runs half-configured.

use std::cell::RefCell;
use std::fmt;
use std::time::Duration;

use ipnet::IpNet;
use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey};
use serde::Deserialize;
use sluice_protocol::headers::HeaderStyle;

use crate::client::{IpPolicy, ProxyTrust};
use crate::grpc;
use crate::host::{Flavour, LogLevel};
use crate::identity::{IdentityConfig, JwtMetadata, JwtSettings, OnInvalidToken, Source};
use crate::jwt::{Expectations, JwtVerifier, VerifyingKey};
use crate::lists::List;

pub use sluice_protocol::FailureMode;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    controller: RawController,
    #[serde(default = "default_failure_mode")]
    failure_mode: FailureMode,
    #[serde(default)]
    cost_header: Option<String>,
    #[serde(default = "default_batching")]
    batching: bool,
    #[serde(default = "default_max_batch_size", deserialize_with = "whole::number")]
    max_batch_size: usize,
    #[serde(
        default = "default_max_batches_in_flight",
        deserialize_with = "whole::number"
    )]
    max_batches_in_flight: usize,
    #[serde(default)]
    identity: RawIdentity,
    #[serde(default)]
    headers: HeaderStyle,
    #[serde(default)]
    shadow: bool,
    /// Moved to the controller: refused with a message saying where.
    #[serde(default)]
    safelist: Option<serde_json::Value>,
    #[serde(default)]
    denylist: Option<serde_json::Value>,
    #[serde(default = "default_exempt_paths")]
    exempt_paths: Vec<String>,
    #[serde(default)]
    denial_cache: RawDenialCache,
    #[serde(default)]
    grpc_status: RawGrpcStatus,
    #[serde(default)]
    test_only_abort_header: Option<String>,
    /// The proxy-wasm host: `envoy` or `ngx`; absent, the filter finds out at start.
    #[serde(default)]
    host: Option<Flavour>,
    #[serde(default)]
    log_level: RawLogLevel,
}

/// The lowest level of the lines the filter sends to the host's log.
#[derive(Debug, Clone, Copy, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
enum RawLogLevel {
    Debug,
    #[default]
    Info,
    Warn,
    Error,
}

impl From<RawLogLevel> for LogLevel {
    fn from(level: RawLogLevel) -> Self {
        match level {
            RawLogLevel::Debug => LogLevel::Debug,
            RawLogLevel::Info => LogLevel::Info,
            RawLogLevel::Warn => LogLevel::Warn,
            RawLogLevel::Error => LogLevel::Error,
        }
    }
}

/// The gRPC status of each kind of local reply, by name or number (see [`crate::grpc`]).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawGrpcStatus {
    #[serde(default)]
    rate_limited: Option<serde_json::Value>,
    #[serde(default)]
    unavailable: Option<serde_json::Value>,
    #[serde(default)]
    invalid_token: Option<serde_json::Value>,
    #[serde(default)]
    unknown_api_key: Option<serde_json::Value>,
    #[serde(default)]
    denylisted: Option<serde_json::Value>,
}

fn default_exempt_paths() -> Vec<String> {
    [
        "/healthz",
        "/readyz",
        "/livez",
        "/metrics",
        "/stats",
        "/stats/**",
    ]
    .map(String::from)
    .to_vec()
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawIdentity {
    #[serde(default)]
    order: Option<Vec<Source>>,
    #[serde(default)]
    jwt: Option<RawJwt>,
    #[serde(default)]
    api_key_header: Option<String>,
    #[serde(default)]
    client_header: Option<String>,
    #[serde(default)]
    ip: RawIp,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawJwt {
    #[serde(default = "default_jwt_header")]
    header: String,
    #[serde(default)]
    keys: Vec<RawJwtKey>,
    #[serde(default)]
    jwks: Option<serde_json::Value>,
    #[serde(default)]
    issuers: Vec<String>,
    #[serde(default)]
    audiences: Vec<String>,
    #[serde(default = "default_leeway_s", deserialize_with = "whole::number")]
    leeway_s: u64,
    #[serde(default = "default_subject_claim")]
    subject_claim: String,
    #[serde(default)]
    tier_claim: Option<String>,
    #[serde(default = "default_on_invalid")]
    on_invalid: OnInvalidToken,
    #[serde(default)]
    from_metadata: Option<RawJwtMetadata>,
    #[serde(
        default = "default_token_cache_size",
        deserialize_with = "whole::number"
    )]
    cache_size: usize,
}

fn default_jwt_header() -> String {
    "authorization".into()
}

fn default_leeway_s() -> u64 {
    60
}

fn default_subject_claim() -> String {
    "sub".into()
}

fn default_on_invalid() -> OnInvalidToken {
    OnInvalidToken::Reject
}

fn default_token_cache_size() -> usize {
    10_000
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawJwtKey {
    #[serde(default)]
    kid: Option<String>,
    alg: String,
    /// HS256/384/512: the shared secret.
    #[serde(default)]
    secret: Option<String>,
    /// RS*, PS*, ES*, EdDSA: the public key in PEM.
    #[serde(default)]
    pem: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawJwtMetadata {
    #[serde(default = "default_jwt_authn")]
    filter: String,
    key: String,
}

fn default_jwt_authn() -> String {
    "envoy.filters.http.jwt_authn".into()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawIp {
    #[serde(default, deserialize_with = "whole::number")]
    trusted_hops: usize,
    #[serde(default)]
    trusted_proxies: Vec<String>,
    #[serde(default = "default_ipv6_prefix", deserialize_with = "whole::number")]
    ipv6_prefix: u8,
    #[serde(default = "default_true")]
    envoy_appends_forwarded_for: bool,
}

impl Default for RawIp {
    fn default() -> Self {
        RawIp {
            trusted_hops: 0,
            trusted_proxies: Vec::new(),
            ipv6_prefix: default_ipv6_prefix(),
            envoy_appends_forwarded_for: true,
        }
    }
}

fn default_ipv6_prefix() -> u8 {
    64
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDenialCache {
    #[serde(default = "default_true")]
    enabled: bool,
    #[serde(default = "default_denial_slots", deserialize_with = "whole::number")]
    slots: u32,
}

impl Default for RawDenialCache {
    fn default() -> Self {
        RawDenialCache {
            enabled: true,
            slots: default_denial_slots(),
        }
    }
}

fn default_true() -> bool {
    true
}

fn default_denial_slots() -> u32 {
    4_096
}

/// Most slots of the denial cache (each a shared-data entry of about 200 bytes).
pub const MAX_DENIAL_SLOTS: u32 = 1 << 20;
/// Most trusted proxy hops.
pub const MAX_TRUSTED_HOPS: usize = crate::client::MAX_FORWARDED_HOPS;

fn default_batching() -> bool {
    true
}

fn default_max_batch_size() -> usize {
    128
}

/// Most checks one batch may carry (the controller takes at most 1024 per call).
pub const MAX_BATCH_SIZE: usize = 1_024;

fn default_max_batches_in_flight() -> usize {
    4
}

/// Most batches one worker may have out at once.
pub const MAX_BATCHES_IN_FLIGHT: usize = 64;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawController {
    cluster: String,
    #[serde(default)]
    authority: Option<String>,
    #[serde(default = "default_timeout_ms", deserialize_with = "whole::number")]
    timeout_ms: u64,
    #[serde(
        default = "default_config_poll_ms",
        alias = "rules_poll_ms",
        deserialize_with = "whole::number"
    )]
    config_poll_ms: u64,
    /// The check token, inline.
    #[serde(default)]
    token: Option<String>,
    /// The name of the VM's environment variable that holds the check token (Envoy:
    /// `vm_config.environment_variables`; Istio: the WasmPlugin's `vmConfig.env`).
    #[serde(default)]
    token_env: Option<String>,
}

/// Shortest check token accepted (the controller's bound too).
pub const MIN_TOKEN_LENGTH: usize = 16;

/// Longest check token accepted.
pub const MAX_TOKEN_LENGTH: usize = 1_024;

/// The `authorization` header every callout carries: the check token from the
/// configuration or from the VM's environment, checked as a header value can carry it.
fn credential(
    controller: &RawController,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Option<Secret>, ConfigError> {
    let (field, token) = match (&controller.token, &controller.token_env) {
        (None, None) => return Ok(None),
        (Some(_), Some(_)) => {
            return Err(invalid(
                "controller.token",
                "give `token` or `token_env`, not both",
            ))
        }
        (Some(token), None) => ("controller.token", token.clone()),
        (None, Some(name)) => {
            let token = env(name).filter(|value| !value.is_empty()).ok_or_else(|| {
                invalid(
                    "controller.token_env",
                    format!(
                        "the VM has no environment variable `{name}` (Envoy passes one with \
                         vm_config.environment_variables.host_env_keys; Istio with the \
                         WasmPlugin's vmConfig.env)"
                    ),
                )
            })?;
            ("controller.token_env", token)
        }
    };
    // The token itself is never shown: a configuration error can end up in any log.
    let usable = (MIN_TOKEN_LENGTH..=MAX_TOKEN_LENGTH).contains(&token.len())
        && token.bytes().all(|b| b.is_ascii_graphic());
    if !usable {
        return Err(invalid(
            field,
            format!(
                "the check token must be {MIN_TOKEN_LENGTH} to {MAX_TOKEN_LENGTH} visible \
                 ASCII characters, no spaces"
            ),
        ));
    }
    Ok(Some(Secret(format!("Bearer {token}"))))
}

fn default_config_poll_ms() -> u64 {
    1_000
}

fn default_failure_mode() -> FailureMode {
    FailureMode::Allow
}

fn default_timeout_ms() -> u64 {
    200
}

/// Shortest interval between two reads of the controller's configuration (the root's tick).
pub const MIN_CONFIG_POLL_MS: u64 = 1_000;

/// Longest callout timeout accepted; a request waits at most this long for a decision.
pub const MAX_TIMEOUT_MS: u64 = 60_000;

/// Whole numbers, also when written as floats (`200.0`): Istio's `WasmPlugin` keeps
/// `pluginConfig` as a `google.protobuf.Struct`, where every number is a double, and other
/// tools that write the configuration may print one with its fraction. A fraction, a
/// negative number or one out of the field's range is refused, naming the field.
mod whole {
    use std::fmt;

    use serde::de::{Deserializer, Error, Unexpected, Visitor};

    /// Largest whole number a double holds exactly (2^53).
    const MAX_EXACT: f64 = 9_007_199_254_740_992.0;

    pub fn number<'de, D, T>(deserializer: D) -> Result<T, D::Error>
    where
        D: Deserializer<'de>,
        T: TryFrom<u64>,
    {
        let value = deserializer.deserialize_any(WholeNumber)?;
        T::try_from(value).map_err(|_| {
            D::Error::invalid_value(Unexpected::Unsigned(value), &"a smaller whole number")
        })
    }

    struct WholeNumber;

    impl Visitor<'_> for WholeNumber {
        type Value = u64;

        fn expecting(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
            formatter.write_str("a whole number")
        }

        fn visit_u64<E: Error>(self, value: u64) -> Result<u64, E> {
            Ok(value)
        }

        fn visit_i64<E: Error>(self, value: i64) -> Result<u64, E> {
            u64::try_from(value).map_err(|_| E::invalid_value(Unexpected::Signed(value), &self))
        }

        fn visit_f64<E: Error>(self, value: f64) -> Result<u64, E> {
            if value.fract() == 0.0 && (0.0..=MAX_EXACT).contains(&value) {
                // Exact: a whole double no larger than 2^53.
                Ok(value as u64)
            } else {
                Err(E::invalid_value(Unexpected::Float(value), &self))
            }
        }
    }
}

/// Checked configuration, ready for every request.
#[derive(Debug)]
pub struct FilterConfig {
    pub controller_cluster: String,
    pub controller_authority: String,
    /// The `authorization` value of every callout (`Bearer <check token>`), if any.
    pub controller_credential: Option<Secret>,
    pub timeout: Duration,
    /// How often each worker reads the controller's configuration (rules, lists) with the
    /// version it holds; `None`: never (no lists, the filter's `failure_mode` for every
    /// request).
    pub config_poll: Option<Duration>,
    pub failure_mode: FailureMode,
    /// Request header whose number is the request's cost (lower-case), if any.
    pub cost_header: Option<String>,
    /// Whether the checks of concurrent requests share callouts (see `batch`).
    pub batching: bool,
    pub max_batch_size: usize,
    /// Most batches out at once per worker (see `batch::Limits`).
    pub max_batches_in_flight: usize,
    pub identity: IdentityConfig,
    pub headers: HeaderStyle,
    /// Everything is evaluated and reported; nothing is blocked.
    pub shadow: bool,
    /// Paths never limited (health, metrics), as globs.
    pub exempt: List,
    /// Slots of the denial cache; `None` when it is off.
    pub denial_cache_slots: Option<u32>,
    /// The gRPC status of each kind of local reply to a gRPC request.
    pub grpc_status: grpc::Statuses,
    /// Tests only: a request carrying this header aborts the VM, so that tests can show
    /// what Envoy's `failure_policy` does with a VM that failed. Never set it in production.
    pub test_only_abort_header: Option<String>,
    /// The host named by the configuration; `None`: probed at start (`flavour::probe`).
    pub host: Option<Flavour>,
    /// Lines below this level are neither formatted nor sent to the host.
    pub log_level: LogLevel,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// Dotted path of the offending field, or `.` for the document itself.
    pub field: String,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "invalid plugin configuration at `{}`: {}",
            self.field, self.message
        )
    }
}

/// A header value that must not be shown: its `Debug` says only that it is there.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

impl FilterConfig {
    /// The configuration `bytes` hold, with the check token from the VM's environment
    /// where `controller.token_env` names it.
    pub fn parse(bytes: &[u8]) -> Result<Self, ConfigError> {
        Self::parse_with_env(bytes, &|name| std::env::var(name).ok())
    }

    /// [`FilterConfig::parse`] with the environment `env`.
    pub fn parse_with_env(
        bytes: &[u8],
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Self, ConfigError> {
        let mut deserializer = serde_json::Deserializer::from_slice(bytes);
        let raw: RawConfig =
            serde_path_to_error::deserialize(&mut deserializer).map_err(|e| ConfigError {
                field: e.path().to_string(),
                message: e.inner().to_string(),
            })?;
        let controller = raw.controller;
        let controller_credential = credential(&controller, env)?;
        if controller.cluster.trim().is_empty() {
            return Err(invalid("controller.cluster", "must name an Envoy cluster"));
        }
        between_one_and(
            "controller.timeout_ms",
            controller.timeout_ms,
            MAX_TIMEOUT_MS,
        )?;
        let authority = controller
            .authority
            .unwrap_or_else(|| controller.cluster.clone());
        if authority.is_empty() || authority.bytes().any(|b| b.is_ascii_whitespace()) {
            return Err(invalid(
                "controller.authority",
                format!("`{authority}` is not a host name"),
            ));
        }
        if let Some(name) = &raw.cost_header {
            header_name("cost_header", name)?;
        }
        if let Some(name) = &raw.test_only_abort_header {
            header_name("test_only_abort_header", name)?;
        }
        between_one_and("max_batch_size", raw.max_batch_size, MAX_BATCH_SIZE)?;
        between_one_and(
            "max_batches_in_flight",
            raw.max_batches_in_flight,
            MAX_BATCHES_IN_FLIGHT,
        )?;
        between_one_and(
            "denial_cache.slots",
            raw.denial_cache.slots,
            MAX_DENIAL_SLOTS,
        )?;
        let identity = identity_config(raw.identity)?;
        for (field, moved) in [("safelist", &raw.safelist), ("denylist", &raw.denylist)] {
            if moved.is_some() {
                return Err(invalid(
                    field,
                    "the lists are managed by the controller now: add entries through its \
                     admin API (/v1/admin/lists) or its configuration file",
                ));
            }
        }
        for (index, path) in raw.exempt_paths.iter().enumerate() {
            if !path.starts_with('/') {
                return Err(invalid(
                    format!("exempt_paths[{index}]"),
                    format!("`{path}` must start with `/`"),
                ));
            }
        }
        let exempt = List::of_paths(&raw.exempt_paths);
        let grpc_status = grpc_statuses(&raw.grpc_status)?;
        Ok(FilterConfig {
            controller_cluster: controller.cluster,
            controller_authority: authority,
            controller_credential,
            timeout: Duration::from_millis(controller.timeout_ms),
            config_poll: (controller.config_poll_ms > 0)
                .then(|| Duration::from_millis(controller.config_poll_ms.max(MIN_CONFIG_POLL_MS))),
            failure_mode: raw.failure_mode,
            cost_header: raw.cost_header.map(|name| name.to_ascii_lowercase()),
            batching: raw.batching,
            max_batch_size: raw.max_batch_size,
            max_batches_in_flight: raw.max_batches_in_flight,
            identity,
            headers: raw.headers,
            shadow: raw.shadow,
            exempt,
            denial_cache_slots: raw.denial_cache.enabled.then_some(raw.denial_cache.slots),
            grpc_status,
            test_only_abort_header: raw
                .test_only_abort_header
                .map(|name| name.to_ascii_lowercase()),
            host: raw.host,
            log_level: raw.log_level.into(),
        })
    }
}

fn invalid(field: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError {
        field: field.into(),
        message: message.into(),
    }
}

/// `value` is between 1 and `most`.
fn between_one_and<N>(field: &str, value: N, most: N) -> Result<(), ConfigError>
where
    N: PartialOrd + From<u8> + fmt::Display,
{
    if value >= N::from(1) && value <= most {
        Ok(())
    } else {
        Err(invalid(
            field,
            format!("must be between 1 and {most}, got {value}"),
        ))
    }
}

/// A header name (RFC 9110 token), lower-cased.
fn header_name(field: &str, name: &str) -> Result<String, ConfigError> {
    let token = |b: u8| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b);
    if name.is_empty() || !name.bytes().all(token) {
        return Err(invalid(field, format!("`{name}` is not a header name")));
    }
    Ok(name.to_ascii_lowercase())
}

fn grpc_statuses(raw: &RawGrpcStatus) -> Result<grpc::Statuses, ConfigError> {
    let defaults = grpc::Statuses::default();
    let code = |name: &str, value: &Option<serde_json::Value>, default: grpc::Code| {
        value.as_ref().map_or(Ok(default), |value| {
            grpc::Code::parse(value).map_err(|why| invalid(format!("grpc_status.{name}"), why))
        })
    };
    Ok(grpc::Statuses {
        rate_limited: code("rate_limited", &raw.rate_limited, defaults.rate_limited)?,
        unavailable: code("unavailable", &raw.unavailable, defaults.unavailable)?,
        invalid_token: code("invalid_token", &raw.invalid_token, defaults.invalid_token)?,
        unknown_api_key: code(
            "unknown_api_key",
            &raw.unknown_api_key,
            defaults.unknown_api_key,
        )?,
        denylisted: code("denylisted", &raw.denylisted, defaults.denylisted)?,
    })
}

fn identity_config(raw: RawIdentity) -> Result<IdentityConfig, ConfigError> {
    let order = raw.order.unwrap_or_else(|| IdentityConfig::default().order);
    if order.is_empty() {
        return Err(invalid("identity.order", "must name at least one source"));
    }
    for (index, source) in order.iter().enumerate() {
        if order
            .get(..index)
            .is_some_and(|before| before.contains(source))
        {
            return Err(invalid(
                format!("identity.order[{index}]"),
                format!("{source:?} is listed twice"),
            ));
        }
    }
    let api_key_header = raw
        .api_key_header
        .map(|name| header_name("identity.api_key_header", &name))
        .transpose()?;
    let client_header = raw
        .client_header
        .map(|name| header_name("identity.client_header", &name))
        .transpose()?;
    let jwt = raw.jwt.map(jwt_settings).transpose()?;
    let trust = match (raw.ip.trusted_hops, raw.ip.trusted_proxies.is_empty()) {
        (0, true) => ProxyTrust::Nobody,
        (hops, true) if hops <= MAX_TRUSTED_HOPS => ProxyTrust::Hops(hops),
        (hops, true) => {
            return Err(invalid(
                "identity.ip.trusted_hops",
                format!("must be at most {MAX_TRUSTED_HOPS}, got {hops}"),
            ))
        }
        (0, false) => ProxyTrust::Networks(networks(
            "identity.ip.trusted_proxies",
            &raw.ip.trusted_proxies,
        )?),
        (_, false) => {
            return Err(invalid(
                "identity.ip.trusted_proxies",
                "set either trusted_hops or trusted_proxies, not both",
            ))
        }
    };
    if raw.ip.ipv6_prefix > 128 {
        return Err(invalid(
            "identity.ip.ipv6_prefix",
            format!("must be at most 128, got {}", raw.ip.ipv6_prefix),
        ));
    }
    Ok(IdentityConfig {
        order,
        jwt,
        api_key_header,
        client_header,
        ip: IpPolicy {
            trust,
            ipv6_prefix: raw.ip.ipv6_prefix,
            envoy_appends: raw.ip.envoy_appends_forwarded_for,
        },
    })
}

fn networks(field: &str, entries: &[String]) -> Result<Vec<IpNet>, ConfigError> {
    entries
        .iter()
        .enumerate()
        .map(|(index, entry)| {
            let entry = entry.trim();
            entry
                .parse::<IpNet>()
                .or_else(|_| entry.parse::<std::net::IpAddr>().map(IpNet::from))
                .map(|net| net.trunc())
                .map_err(|_| {
                    invalid(
                        format!("{field}[{index}]"),
                        format!("`{entry}` is not an address or CIDR network"),
                    )
                })
        })
        .collect()
}

fn algorithm(field: &str, name: &str) -> Result<Algorithm, ConfigError> {
    name.parse::<Algorithm>().map_err(|_| {
        invalid(
            field,
            format!(
                "`{name}` is not one of HS256, HS384, HS512, RS256, RS384, RS512, \
                 PS256, PS384, PS512, ES256, ES384, EdDSA"
            ),
        )
    })
}

fn jwt_settings(raw: RawJwt) -> Result<JwtSettings, ConfigError> {
    let header = header_name("identity.jwt.header", &raw.header)?;
    let mut keys = Vec::new();
    for (index, key) in raw.keys.iter().enumerate() {
        let field = |name: &str| format!("identity.jwt.keys[{index}].{name}");
        let alg = algorithm(&field("alg"), &key.alg)?;
        let hmac = matches!(alg, Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512);
        let decoding = match (hmac, &key.secret, &key.pem) {
            (true, Some(secret), None) if !secret.is_empty() => {
                DecodingKey::from_secret(secret.as_bytes())
            }
            (true, _, _) => {
                return Err(invalid(
                    field("secret"),
                    format!("{} keys need a non-empty `secret` and no `pem`", key.alg),
                ))
            }
            (false, None, Some(pem)) => {
                let parsed = match alg {
                    Algorithm::ES256 | Algorithm::ES384 => DecodingKey::from_ec_pem(pem.as_bytes()),
                    Algorithm::EdDSA => DecodingKey::from_ed_pem(pem.as_bytes()),
                    _ => DecodingKey::from_rsa_pem(pem.as_bytes()),
                };
                parsed.map_err(|e| {
                    invalid(field("pem"), format!("not a {} public key: {e}", key.alg))
                })?
            }
            (false, _, _) => {
                return Err(invalid(
                    field("pem"),
                    format!(
                        "{} keys need the public key as `pem` (a secret would let anyone \
                         holding the public key sign)",
                        key.alg
                    ),
                ))
            }
        };
        keys.push(VerifyingKey {
            kid: key.kid.clone(),
            algorithm: alg,
            key: decoding,
        });
    }
    if let Some(jwks) = raw.jwks {
        let set: JwkSet = serde_json::from_value(jwks)
            .map_err(|e| invalid("identity.jwt.jwks", format!("not a JWK set: {e}")))?;
        for (index, jwk) in set.keys.iter().enumerate() {
            let field = |name: &str| format!("identity.jwt.jwks.keys[{index}]{name}");
            let alg = jwk
                .common
                .key_algorithm
                .ok_or_else(|| {
                    invalid(
                        field(".alg"),
                        "is required: each key verifies one algorithm",
                    )
                })?
                .to_string();
            let alg = algorithm(&field(".alg"), &alg)?;
            let key = DecodingKey::from_jwk(jwk)
                .map_err(|e| invalid(field(""), format!("unusable key: {e}")))?;
            if key.family() != alg.family() {
                return Err(invalid(field(".alg"), "does not fit the key's type"));
            }
            keys.push(VerifyingKey {
                kid: jwk.common.key_id.clone(),
                algorithm: alg,
                key,
            });
        }
    }
    let metadata = raw.from_metadata.map(|m| JwtMetadata {
        filter: m.filter,
        key: m.key,
    });
    if keys.is_empty() && metadata.is_none() {
        return Err(invalid(
            "identity.jwt.keys",
            "give keys (or `jwks`) to verify tokens with, or `from_metadata` to read jwt_authn's",
        ));
    }
    if raw.subject_claim.is_empty() {
        return Err(invalid("identity.jwt.subject_claim", "must not be empty"));
    }
    let verifier = (!keys.is_empty()).then(|| {
        RefCell::new(JwtVerifier::new(
            keys,
            Expectations {
                issuers: raw.issuers,
                audiences: raw.audiences,
                leeway_s: raw.leeway_s,
                subject_claim: raw.subject_claim.clone(),
                tier_claim: raw.tier_claim.clone(),
            },
            raw.cache_size,
        ))
    });
    Ok(JwtSettings {
        header,
        on_invalid: raw.on_invalid,
        metadata,
        subject_claim: raw.subject_claim,
        tier_claim: raw.tier_claim,
        verifier,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minimal_config_takes_defaults() {
        let config = FilterConfig::parse(br#"{"controller":{"cluster":"sluice"}}"#).unwrap();
        assert_eq!(config.controller_authority, "sluice");
        assert_eq!(config.timeout, Duration::from_millis(200));
        assert_eq!(config.failure_mode, FailureMode::Allow);
        assert!(config.batching);
        assert_eq!(config.max_batch_size, 128);
        assert_eq!(config.max_batches_in_flight, 4);
        assert_eq!(config.host, None, "probed at start");
        assert_eq!(config.log_level, LogLevel::Info);
    }

    #[test]
    fn host_and_log_level_are_taken_by_name() {
        let config = FilterConfig::parse(
            br#"{"controller":{"cluster":"127.0.0.1:8081"},"host":"ngx","log_level":"debug"}"#,
        )
        .unwrap();
        assert_eq!(config.host, Some(Flavour::Ngx));
        assert_eq!(config.log_level, LogLevel::Debug);
        assert_eq!(config.controller_authority, "127.0.0.1:8081");
        let envoy = FilterConfig::parse(br#"{"controller":{"cluster":"c"},"host":"envoy"}"#);
        assert_eq!(envoy.unwrap().host, Some(Flavour::Envoy));
        for (bad, field) in [
            (r#""host":"kong""#, "host"),
            (r#""log_level":"verbose""#, "log_level"),
        ] {
            let json = format!(r#"{{"controller":{{"cluster":"c"}},{bad}}}"#);
            let error = FilterConfig::parse(json.as_bytes()).unwrap_err();
            assert_eq!(error.field, field, "{error}");
        }
    }

    #[test]
    fn full_config_parses() {
        let json = br#"{"controller":{"cluster":"c","authority":"ctl.local","timeout_ms":50},
                        "failure_mode":"deny"}"#;
        let config = FilterConfig::parse(json).unwrap();
        assert_eq!(config.controller_authority, "ctl.local");
        assert_eq!(config.timeout, Duration::from_millis(50));
        assert_eq!(config.failure_mode, FailureMode::Deny);
    }

    #[test]
    fn the_check_token_comes_inline_or_from_the_vms_environment() {
        let none = FilterConfig::parse(br#"{"controller":{"cluster":"c"}}"#).unwrap();
        assert_eq!(none.controller_credential, None);
        let inline = FilterConfig::parse(
            br#"{"controller":{"cluster":"c","token":"check-token-0123456789"}}"#,
        )
        .unwrap();
        assert_eq!(
            inline.controller_credential.as_ref().map(Secret::expose),
            Some("Bearer check-token-0123456789")
        );
        assert!(
            !format!("{inline:?}").contains("check-token-0123456789"),
            "the token never shows in Debug"
        );
        let env =
            |name: &str| (name == "SLUICE_CHECK_TOKEN").then(|| "env-token-0123456789".into());
        let from_env = FilterConfig::parse_with_env(
            br#"{"controller":{"cluster":"c","token_env":"SLUICE_CHECK_TOKEN"}}"#,
            &env,
        )
        .unwrap();
        assert_eq!(
            from_env.controller_credential.as_ref().map(Secret::expose),
            Some("Bearer env-token-0123456789")
        );
        let refused = [
            (
                r#"{"controller":{"cluster":"c","token_env":"MISSING"}}"#,
                "controller.token_env",
            ),
            (
                r#"{"controller":{"cluster":"c","token":"short"}}"#,
                "controller.token",
            ),
            (
                r#"{"controller":{"cluster":"c","token":"has a space in it 0123"}}"#,
                "controller.token",
            ),
            (
                r#"{"controller":{"cluster":"c","token":"check-token-0123456789",
                   "token_env":"SLUICE_CHECK_TOKEN"}}"#,
                "controller.token",
            ),
        ];
        for (json, field) in refused {
            let error = FilterConfig::parse_with_env(json.as_bytes(), &env).unwrap_err();
            assert_eq!(error.field, field, "{json}");
            assert!(!error.message.contains("0123456789"), "{error}");
        }
    }

    /// One bad document per error, paired with the field the operator is told about.
    #[test]
    fn each_bad_config_names_its_field() {
        let cases: [(&[u8], &str); 13] = [
            (b"", "."),
            (b"not json", "."),
            (br#"{}"#, "."),
            (
                br#"{"controller":{"cluster":"c"},"failur_mode":"deny"}"#,
                "failur_mode",
            ),
            (
                br#"{"controller":{"cluster":"c"},"failure_mode":"maybe"}"#,
                "failure_mode",
            ),
            (
                br#"{"controller":{"cluster":"c","timeout_ms":"fast"}}"#,
                "controller.timeout_ms",
            ),
            (
                br#"{"controller":{"cluster":"c","timeout_ms":0}}"#,
                "controller.timeout_ms",
            ),
            (br#"{"controller":{"cluster":" "}}"#, "controller.cluster"),
            (
                br#"{"controller":{"cluster":"c"},"cost_header":"x cost"}"#,
                "cost_header",
            ),
            (
                br#"{"controller":{"cluster":"c"},"max_batch_size":0}"#,
                "max_batch_size",
            ),
            (
                br#"{"controller":{"cluster":"c"},"max_batches_in_flight":65}"#,
                "max_batches_in_flight",
            ),
            (
                br#"{"controller":{"cluster":"c"},"batching":"yes"}"#,
                "batching",
            ),
            (
                br#"{"controller":{"cluster":"c","authority":"a b"}}"#,
                "controller.authority",
            ),
        ];
        for (json, field) in cases {
            let err = FilterConfig::parse(json).unwrap_err();
            assert_eq!(err.field, field, "{}: {err}", String::from_utf8_lossy(json));
        }
    }

    fn with(extra: &str) -> Vec<u8> {
        format!(r#"{{"controller":{{"cluster":"c"}},{extra}}}"#).into_bytes()
    }

    /// The new sections, one bad value each, with the field the operator is told about.
    #[test]
    fn each_bad_identity_list_or_cache_setting_names_its_field() {
        let rsa_public = include_str!("../tests/keys/rsa_public.pem").replace('\n', "\\n");
        let cases = [
            (
                r#""identity":{"jwt":{"keys":[{"alg":"none","secret":"s"}]}}"#.to_owned(),
                "identity.jwt.keys[0].alg",
            ),
            (
                r#""identity":{"jwt":{"keys":[{"alg":"RS256","secret":"s"}]}}"#.to_owned(),
                "identity.jwt.keys[0].pem",
            ),
            (
                format!(
                    r#""identity":{{"jwt":{{"keys":[{{"alg":"HS256","pem":"{rsa_public}"}}]}}}}"#
                ),
                "identity.jwt.keys[0].secret",
            ),
            (
                r#""identity":{"jwt":{"keys":[{"alg":"ES256","pem":"not a key"}]}}"#.to_owned(),
                "identity.jwt.keys[0].pem",
            ),
            (r#""identity":{"jwt":{}}"#.to_owned(), "identity.jwt.keys"),
            (
                r#""identity":{"jwt":{"jwks":{"keys":[{"kty":"oct","k":"c2VjcmV0"}]}}}"#.to_owned(),
                "identity.jwt.jwks.keys[0].alg",
            ),
            (
                r#""identity":{"jwt":{"jwks":"nope"}}"#.to_owned(),
                "identity.jwt.jwks",
            ),
            (
                r#""identity":{"jwt":{"from_metadata":{"key":"p"},"on_invalid":"shrug"}}"#
                    .to_owned(),
                "identity.jwt.on_invalid",
            ),
            (r#""identity":{"order":[]}"#.to_owned(), "identity.order"),
            (
                r#""identity":{"order":["ip","jwt","ip"]}"#.to_owned(),
                "identity.order[2]",
            ),
            (
                r#""identity":{"api_key_header":"x key"}"#.to_owned(),
                "identity.api_key_header",
            ),
            (
                r#""identity":{"ip":{"trusted_proxies":["10.0.0.0/8","nope"]}}"#.to_owned(),
                "identity.ip.trusted_proxies[1]",
            ),
            (
                r#""identity":{"ip":{"trusted_hops":1,"trusted_proxies":["10.0.0.0/8"]}}"#
                    .to_owned(),
                "identity.ip.trusted_proxies",
            ),
            (
                r#""identity":{"ip":{"trusted_hops":99}}"#.to_owned(),
                "identity.ip.trusted_hops",
            ),
            (
                r#""identity":{"ip":{"ipv6_prefix":129}}"#.to_owned(),
                "identity.ip.ipv6_prefix",
            ),
            (
                r#""safelist":{"api_keys":["sha256:zz"]}"#.to_owned(),
                "safelist",
            ),
            (r#""denylist":{"ips":["1.2.3.4/8"]}"#.to_owned(), "denylist"),
            (
                r#""exempt_paths":["/ok","healthz"]"#.to_owned(),
                "exempt_paths[1]",
            ),
            (
                r#""denial_cache":{"slots":0}"#.to_owned(),
                "denial_cache.slots",
            ),
            (r#""headers":"fancy""#.to_owned(), "headers"),
            (r#""shadow":"yes""#.to_owned(), "shadow"),
        ];
        for (extra, field) in cases {
            let err = FilterConfig::parse(&with(&extra)).unwrap_err();
            assert_eq!(err.field, field, "{extra}: {err}");
        }
    }

    #[test]
    fn every_kind_of_key_is_accepted_with_its_algorithm() {
        let pem = |name: &str| {
            match name {
                "rsa" => include_str!("../tests/keys/rsa_public.pem"),
                _ => include_str!("../tests/keys/ec_public.pem"),
            }
            .replace('\n', "\\n")
        };
        let json = format!(
            r#""identity":{{"jwt":{{"keys":[
                {{"alg":"HS512","secret":"s"}},
                {{"kid":"r","alg":"PS256","pem":"{}"}},
                {{"kid":"e","alg":"ES256","pem":"{}"}}],
              "jwks":{{"keys":[{{"kty":"oct","k":"c2VjcmV0","alg":"HS256","kid":"j"}}]}},
              "issuers":["i"],"audiences":["a"],"tier_claim":"plan","on_invalid":"next"}},
              "api_key_header":"X-Api-Key","order":["api_key","jwt","ip"],
              "ip":{{"trusted_proxies":["10.0.0.0/8","fd00::1"],"ipv6_prefix":56}}}},
              "headers":"ietf","shadow":true,"denial_cache":{{"enabled":false}}"#,
            pem("rsa"),
            pem("ec"),
        );
        let config = FilterConfig::parse(&with(&json)).unwrap();
        assert_eq!(config.identity.api_key_header.as_deref(), Some("x-api-key"));
        assert!(config.shadow);
        assert_eq!(config.denial_cache_slots, None);
        assert_eq!(config.identity.ip.ipv6_prefix, 56);
        let jwt = config.identity.jwt.as_ref().unwrap();
        assert_eq!(jwt.tier_claim.as_deref(), Some("plan"));
        // Each configured key verifies a token signed for it, with the algorithm it names.
        use jsonwebtoken::{encode, EncodingKey, Header};
        const NOW: u64 = 1_800_000_000;
        let claims = serde_json::json!({
            "sub": "ann", "plan": "gold", "iss": "i", "aud": "a", "exp": NOW + 60
        });
        let sign = |alg: Algorithm, kid: Option<&str>, key: &EncodingKey| {
            let mut header = Header::new(alg);
            header.kid = kid.map(str::to_owned);
            encode(&header, &claims, key).unwrap()
        };
        let rsa =
            EncodingKey::from_rsa_pem(include_bytes!("../tests/keys/rsa_private.pem")).unwrap();
        let ec = EncodingKey::from_ec_pem(include_bytes!("../tests/keys/ec_private.pem")).unwrap();
        let tokens = [
            (
                "HS512",
                sign(Algorithm::HS512, None, &EncodingKey::from_secret(b"s")),
            ),
            ("PS256", sign(Algorithm::PS256, Some("r"), &rsa)),
            ("ES256", sign(Algorithm::ES256, Some("e"), &ec)),
            (
                "HS256 from the JWK set",
                sign(
                    Algorithm::HS256,
                    Some("j"),
                    &EncodingKey::from_secret(b"secret"),
                ),
            ),
        ];
        let verifier = jwt.verifier.as_ref().unwrap();
        for (what, token) in &tokens {
            let verified = verifier.borrow_mut().verify(token, NOW);
            let claims = verified.unwrap_or_else(|e| panic!("{what}: {e}"));
            assert_eq!(claims.subject, "ann", "{what}");
            assert_eq!(claims.tier.as_deref(), Some("gold"), "{what}");
        }
        // And only those: an RS256 token from the same RSA key names no configured key.
        let rs256 = sign(Algorithm::RS256, Some("r"), &rsa);
        assert!(verifier.borrow_mut().verify(&rs256, NOW).is_err());
        let wrong_secret = sign(Algorithm::HS256, Some("j"), &EncodingKey::from_secret(b"x"));
        assert!(verifier.borrow_mut().verify(&wrong_secret, NOW).is_err());
    }

    /// Istio hands `pluginConfig` over from a `google.protobuf.Struct`, whose numbers are
    /// doubles: a whole number written as a float counts as that number; a fraction, a
    /// negative number or one too large for its field is refused, naming the field.
    #[test]
    fn whole_numbers_may_be_written_as_floats() {
        let config = FilterConfig::parse(&with(
            r#""max_batch_size":64.0,"identity":{"ip":{"trusted_hops":1.0,"ipv6_prefix":56.0}},
               "denial_cache":{"slots":1e3}"#,
        ))
        .unwrap();
        assert_eq!(config.max_batch_size, 64);
        assert_eq!(config.identity.ip.ipv6_prefix, 56);
        assert_eq!(config.denial_cache_slots, Some(1000));
        let config =
            FilterConfig::parse(br#"{"controller":{"cluster":"c","timeout_ms":250.0}}"#).unwrap();
        assert_eq!(config.timeout, Duration::from_millis(250));
        for (json, field) in [
            (
                r#"{"controller":{"cluster":"c","timeout_ms":200.5}}"#,
                "controller.timeout_ms",
            ),
            (
                r#"{"controller":{"cluster":"c","timeout_ms":-1}}"#,
                "controller.timeout_ms",
            ),
            (
                r#"{"controller":{"cluster":"c","timeout_ms":1e300}}"#,
                "controller.timeout_ms",
            ),
            (
                r#"{"controller":{"cluster":"c"},"identity":{"ip":{"ipv6_prefix":300}}}"#,
                "identity.ip.ipv6_prefix",
            ),
            (
                r#"{"controller":{"cluster":"c"},"max_batch_size":"64"}"#,
                "max_batch_size",
            ),
        ] {
            let err = FilterConfig::parse(json.as_bytes()).unwrap_err();
            assert_eq!(err.field, field, "{json}: {err}");
        }
    }

    #[test]
    fn grpc_statuses_default_as_documented_and_take_names_or_numbers() {
        let config = FilterConfig::parse(br#"{"controller":{"cluster":"c"}}"#).unwrap();
        let statuses = config.grpc_status;
        assert_eq!(statuses.rate_limited, grpc::Code::ResourceExhausted);
        assert_eq!(statuses.unavailable, grpc::Code::Unavailable);
        assert_eq!(statuses.invalid_token, grpc::Code::Unauthenticated);
        assert_eq!(statuses.unknown_api_key, grpc::Code::Unauthenticated);
        assert_eq!(statuses.denylisted, grpc::Code::PermissionDenied);
        let config = FilterConfig::parse(&with(
            r#""grpc_status":{"rate_limited":"UNAVAILABLE","denylisted":16,"unavailable":13.0}"#,
        ))
        .unwrap();
        assert_eq!(config.grpc_status.rate_limited, grpc::Code::Unavailable);
        assert_eq!(config.grpc_status.denylisted, grpc::Code::Unauthenticated);
        assert_eq!(config.grpc_status.unavailable, grpc::Code::Internal);
        assert_eq!(
            config.grpc_status.invalid_token,
            grpc::Code::Unauthenticated
        );
    }

    /// One bad value per field, with the field the operator is told about.
    #[test]
    fn each_bad_grpc_status_names_its_field() {
        for (extra, field) in [
            (
                r#""grpc_status":{"rate_limited":"SLOW_DOWN"}"#,
                "grpc_status.rate_limited",
            ),
            (
                r#""grpc_status":{"unavailable":0}"#,
                "grpc_status.unavailable",
            ),
            (
                r#""grpc_status":{"invalid_token":"OK"}"#,
                "grpc_status.invalid_token",
            ),
            (
                r#""grpc_status":{"unknown_api_key":17}"#,
                "grpc_status.unknown_api_key",
            ),
            (
                r#""grpc_status":{"denylisted":[7]}"#,
                "grpc_status.denylisted",
            ),
            (r#""grpc_status":{"limited":8}"#, "grpc_status.limited"),
            (r#""grpc_status":"RESOURCE_EXHAUSTED""#, "grpc_status"),
        ] {
            let err = FilterConfig::parse(&with(extra)).unwrap_err();
            assert_eq!(err.field, field, "{extra}: {err}");
        }
        let err = FilterConfig::parse(&with(r#""grpc_status":{"rate_limited":"SLOW_DOWN"}"#))
            .unwrap_err();
        assert!(
            err.to_string()
                .contains("invalid plugin configuration at `grpc_status.rate_limited`"),
            "{err}"
        );
    }

    #[test]
    fn missing_and_unknown_fields_are_named_in_the_message() {
        let err = FilterConfig::parse(br#"{}"#).unwrap_err();
        assert!(
            err.to_string().contains("missing field `controller`"),
            "{err}"
        );
        let err = FilterConfig::parse(br#"{"controller":{"cluster":"c"},"failur_mode":"deny"}"#)
            .unwrap_err();
        assert!(
            err.to_string().contains("unknown field `failur_mode`"),
            "{err}"
        );
    }
}
