//! Envoy's rate-limit service API (`envoy.service.ratelimit.v3.RateLimitService`, gRPC), so
//! that Envoy's native `envoy.filters.http.ratelimit` filter can ask Sluice: the same rules,
//! store and strategies as the check call, decided by [`Limiter::check`] with one store
//! round trip per request.
//!
//! # From descriptors to checks
//!
//! The request's `domain` must not be empty (Envoy requires one) and is otherwise ignored:
//! a controller runs one configuration. Each descriptor becomes one [`Check`], and all of
//! them go to the limiter in one call, in order. Each is limited on its own (a descriptor
//! over its limit does not stop the others from counting, as in Envoy's reference service);
//! the response has one status per descriptor, in order, and is `OVER_LIMIT` when any
//! descriptor is. Every rule whose `match` fits a descriptor's check applies to it, so a
//! rule without `match` counts once per descriptor: when several descriptors carry the same
//! identity, give each an entry the rules tell apart (a `generic_key`).
//!
//! | entry key | becomes |
//! |---|---|
//! | `user` | the user (scope `user`, and the client) |
//! | `api_key` | the API key as the client sent it: the controller keeps only its SHA-256 (hex), as the filter sends it |
//! | `api_key_sha256` | an API key's SHA-256, already computed (64 hex digits) |
//! | `client`, `client_id` | a client id set by something trusted in front: the filter's `header` identity |
//! | `remote_address` (Envoy's `remote_address` action), `ip` | the client's address (scope `ip`); IPv6 by its /64, IPv4-mapped IPv6 as IPv4 |
//! | `tier` | the tier (`match.tiers`, scope `tier`, `tier_limits`) |
//! | `path`, `:path` | the path, without its query |
//! | `host`, `authority`, `:authority` | the host |
//! | `method`, `:method` | the method |
//! | anything else (`generic_key`, `header_match`, a `request_headers` action's `descriptor_key`…) | a request header of that name (lower-cased) for rules' `match.headers` |
//!
//! The client (scope `client`) is the first of user, API key, client id and address the
//! descriptor has, the filter's identity order; a known API key counts as its user and
//! tier, as on the check call. A descriptor with none of them is its own client: its
//! entries, so that each distinct descriptor has its own counter, as in Envoy's reference
//! service. Identity values are trimmed, and an empty one is absent; a user or client id
//! longer than 1 KiB counts as `sha256:<hex>` of it. A key may appear once per descriptor.
//! `user`, `tier` and the client id are believed as they come: derive them from what
//! something in front verified, never from a header a client may set.
//!
//! The cost is the descriptor's `hits_addend` when set (0 checks without consuming), else
//! the request's, where 0 (unset) means 1. Limit overrides (`limit`) and refunds
//! (`is_negative_hits`) are refused: the limits are Sluice's rules. A request without
//! descriptors, with more than [`MAX_CHECKS_PER_CALL`], or with an entry that cannot be read
//! gets `INVALID_ARGUMENT` naming the field (`descriptors[0].entries[1].value: …`); a store
//! failure gets `UNAVAILABLE`, so that Envoy applies its `failure_mode_deny`.
//!
//! # The answer
//!
//! Each descriptor's status has its code, `current_limit` (the speaking rule's name and
//! quota; the unit when its window is exactly a second, minute, hour, day or week, else
//! `UNKNOWN`: the real window is in the `RateLimit-Policy` header), `limit_remaining` and
//! `duration_until_reset`; a descriptor no rule applied to is `OK` without a limit.
//! `response_headers_to_add` carries the headers the filter would send, formatted by
//! [`sluice_protocol::headers`]: `X-RateLimit-*` for the speaking limit (the first denying
//! one, else the one with the fewest requests left over all descriptors) and
//! `RateLimit-Policy`/`RateLimit` for every limit that applied. Over the limit it adds
//! `Retry-After`, `Content-Type: application/json` and the filter's JSON body
//! (`raw_body`); Envoy answers with its `rate_limited_status` (429). An API key refused as
//! unknown (`protection.unknown_api_keys = "reject"`) is `OVER_LIMIT` with
//! `{"error":"invalid_api_key",…}`: Envoy has no other way to refuse.
//!
//! A leaky bucket's delay is held before the answer (Envoy's `timeout` must exceed the
//! rule's `max_delay`). A `concurrency` rule is checked but its slot is given back at once:
//! Envoy's filter never says when a request ends. Safelist and denylist are the filter's
//! and do not apply here.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use envoy_types::pb::envoy::config::core::v3::HeaderValue;
use envoy_types::pb::envoy::extensions::common::ratelimit::v3::RateLimitDescriptor;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_response::rate_limit::Unit;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_response::{
    Code, DescriptorStatus, RateLimit,
};
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_service_server::{
    RateLimitService, RateLimitServiceServer,
};
use envoy_types::pb::envoy::service::ratelimit::v3::{RateLimitRequest, RateLimitResponse};
use envoy_types::pb::google::protobuf::Duration as ProtoDuration;
use sha2::{Digest, Sha256};
use sluice_protocol::headers::{self, HeaderStyle, RETRY_AFTER};
use sluice_protocol::{
    Check, CheckRequest, ClientId, ClientKind, Decision, PolicyStatus, Refusal, Strategy,
};
use tonic::{Request, Response, Status};

use crate::admin::auth::hex;
use crate::check::credential::CheckTokens;
use crate::check::limiter::Limiter;
use crate::check::MAX_CHECKS_PER_CALL;
use crate::metrics::Metrics;
use crate::StartError;

/// Most entries one descriptor may have.
pub const MAX_ENTRIES: usize = 64;

/// Longest user or client id counted as it is; a longer one counts as its SHA-256, as the
/// filter does with its client header.
pub const MAX_IDENTITY_BYTES: usize = 1_024;

/// IPv6 clients are counted by their network of this many bits (the filter's default).
const IPV6_PREFIX: u32 = 64;

/// A request that cannot be turned into checks: the field at fault and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct Invalid {
    pub field: String,
    pub message: String,
}

fn invalid(field: String, message: impl Into<String>) -> Invalid {
    Invalid {
        field,
        message: message.into(),
    }
}

/// What a descriptor entry's key stands for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Role {
    User,
    ApiKey,
    ApiKeyDigest,
    Client,
    Ip,
    Tier,
    Path,
    Host,
    Method,
    Header,
}

impl Role {
    fn of(key: &str) -> Role {
        match key {
            "user" => Role::User,
            "api_key" => Role::ApiKey,
            "api_key_sha256" => Role::ApiKeyDigest,
            "client" | "client_id" => Role::Client,
            "remote_address" | "ip" => Role::Ip,
            "tier" => Role::Tier,
            "path" | ":path" => Role::Path,
            "host" | "authority" | ":authority" => Role::Host,
            "method" | ":method" => Role::Method,
            _ => Role::Header,
        }
    }

    /// The field of the check the role fills, to refuse two entries filling one.
    fn slot(self) -> Role {
        match self {
            Role::ApiKeyDigest => Role::ApiKey,
            other => other,
        }
    }
}

/// The checks for `request`, one per descriptor, in order.
pub fn checks_for(request: &RateLimitRequest) -> Result<Vec<Check>, Invalid> {
    if request.domain.is_empty() {
        return Err(invalid("domain".into(), "must not be empty"));
    }
    if request.descriptors.is_empty() {
        return Err(invalid(
            "descriptors".into(),
            "at least one descriptor is needed",
        ));
    }
    if request.descriptors.len() > MAX_CHECKS_PER_CALL {
        return Err(invalid(
            "descriptors".into(),
            format!(
                "at most {MAX_CHECKS_PER_CALL} descriptors per request, got {}",
                request.descriptors.len()
            ),
        ));
    }
    // Envoy's documented default: an unset (0) hits_addend adds 1.
    let request_cost = u64::from(request.hits_addend.max(1));
    request
        .descriptors
        .iter()
        .enumerate()
        .map(|(index, descriptor)| check_for(index, descriptor, request_cost))
        .collect()
}

/// The check for the descriptor at `index` (see the module's table).
pub fn check_for(
    index: usize,
    descriptor: &RateLimitDescriptor,
    request_cost: u64,
) -> Result<Check, Invalid> {
    let at = |field: &str| format!("descriptors[{index}].{field}");
    if descriptor.limit.is_some() {
        return Err(invalid(
            at("limit"),
            "limit overrides are not supported: the limits are Sluice's rules",
        ));
    }
    if descriptor.is_negative_hits {
        return Err(invalid(at("is_negative_hits"), "refunds are not supported"));
    }
    if descriptor.entries.is_empty() {
        return Err(invalid(
            at("entries"),
            "a descriptor needs at least one entry",
        ));
    }
    if descriptor.entries.len() > MAX_ENTRIES {
        return Err(invalid(
            at("entries"),
            format!(
                "at most {MAX_ENTRIES} entries per descriptor, got {}",
                descriptor.entries.len()
            ),
        ));
    }
    let mut found = Found::default();
    let mut seen: BTreeMap<(Role, String), usize> = BTreeMap::new();
    for (i, entry) in descriptor.entries.iter().enumerate() {
        let field = |name: &str| at(&format!("entries[{i}].{name}"));
        if entry.key.is_empty() {
            return Err(invalid(field("key"), "must not be empty"));
        }
        let role = Role::of(&entry.key);
        let name = if role == Role::Header {
            entry.key.to_ascii_lowercase()
        } else {
            String::new()
        };
        if let Some(first) = seen.insert((role.slot(), name.clone()), i) {
            return Err(invalid(
                field("key"),
                format!(
                    "`{}` says what entries[{first}] already said: one entry per key",
                    entry.key
                ),
            ));
        }
        let value = entry.value.as_str();
        let identity = || Some(value.trim()).filter(|v| !v.is_empty());
        match role {
            Role::User => found.user = identity().map(bounded),
            Role::ApiKey => found.api_key = identity().map(|key| sha256_hex(key.as_bytes())),
            Role::ApiKeyDigest => {
                found.api_key = identity()
                    .map(|digest| {
                        let hex_digits =
                            digest.len() == 64 && digest.bytes().all(|b| b.is_ascii_hexdigit());
                        if hex_digits {
                            Ok(digest.to_ascii_lowercase())
                        } else {
                            Err(invalid(
                                field("value"),
                                "must be a SHA-256 in hex (64 digits)",
                            ))
                        }
                    })
                    .transpose()?;
            }
            Role::Client => found.client = identity().map(bounded),
            Role::Ip => {
                found.ip = identity()
                    .map(|address| {
                        address.parse::<IpAddr>().map(counted_ip).map_err(|_| {
                            invalid(field("value"), format!("`{address}` is not an IP address"))
                        })
                    })
                    .transpose()?;
            }
            Role::Tier => found.tier = identity().map(str::to_owned),
            Role::Path => {
                found.path = value.split_once('?').map_or(value, |(path, _)| path).into();
            }
            Role::Host => found.host = value.to_owned(),
            Role::Method => found.method = value.to_owned(),
            Role::Header => {
                found.headers.insert(name, value.to_owned());
            }
        }
    }
    let cost = descriptor
        .hits_addend
        .map_or(request_cost, |hits| hits.value);
    Ok(found.into_check(descriptor, cost))
}

/// What a descriptor's entries said.
#[derive(Debug, Default)]
struct Found {
    user: Option<String>,
    api_key: Option<String>,
    client: Option<String>,
    ip: Option<String>,
    tier: Option<String>,
    path: String,
    host: String,
    method: String,
    headers: BTreeMap<String, String>,
}

impl Found {
    fn into_check(self, descriptor: &RateLimitDescriptor, cost: u64) -> Check {
        let client = if let Some(user) = &self.user {
            ClientId::new(ClientKind::User, user.clone())
        } else if let Some(digest) = &self.api_key {
            ClientId::new(ClientKind::ApiKey, digest.clone())
        } else if let Some(client) = &self.client {
            ClientId::new(ClientKind::Header, client.clone())
        } else if let Some(ip) = &self.ip {
            ClientId::ip(ip.clone())
        } else {
            descriptor_client(descriptor)
        };
        Check {
            ip: self.ip,
            user: self.user,
            api_key: self.api_key,
            tier: self.tier,
            headers: self.headers,
            ..Check::new(client, &self.host, &self.method, &self.path, cost)
        }
    }
}

/// The client of a descriptor that names nobody: the descriptor itself, its entries as a
/// JSON list of `[key, value]` pairs (which no two descriptors share), as its SHA-256 when
/// long. Its kind is no identity's, so it never shares a counter with one.
fn descriptor_client(descriptor: &RateLimitDescriptor) -> ClientId {
    let pairs: Vec<[&str; 2]> = descriptor
        .entries
        .iter()
        .map(|entry| [entry.key.as_str(), entry.value.as_str()])
        .collect();
    let text = serde_json::to_string(&pairs).unwrap_or_default();
    ClientId {
        kind: "descriptor".to_owned(),
        value: bounded(&text),
    }
}

/// `value` as it is, or `sha256:<hex>` of it when longer than [`MAX_IDENTITY_BYTES`].
fn bounded(value: &str) -> String {
    if value.len() <= MAX_IDENTITY_BYTES {
        value.to_owned()
    } else {
        format!("sha256:{}", sha256_hex(value.as_bytes()))
    }
}

fn sha256_hex(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

/// An address as limits count it, as the filter counts it: IPv4 as it is (IPv4-mapped IPv6
/// too), IPv6 by its /64 (`2001:db8:1:2::/64`).
fn counted_ip(ip: IpAddr) -> String {
    match ip.to_canonical() {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) => {
            let mask = u128::MAX << (128 - IPV6_PREFIX);
            let network = Ipv6Addr::from(u128::from(v6) & mask);
            format!("{network}/{IPV6_PREFIX}")
        }
    }
}

/// Envoy's answer for the decisions of a request's checks, in order (see the module doc).
pub fn response_for(decisions: &[Decision]) -> RateLimitResponse {
    let statuses: Vec<DescriptorStatus> = decisions.iter().map(descriptor_status).collect();
    let over = decisions.iter().any(|decision| !decision.allowed);
    let denying = decisions
        .iter()
        .filter(|decision| !decision.allowed)
        .find_map(|decision| decision.policy.as_ref());
    let speaking = denying.or_else(|| {
        decisions
            .iter()
            .filter_map(|decision| decision.policy.as_ref())
            .min_by_key(|policy| policy.remaining)
    });
    let mut added: Vec<(&str, String)> = Vec::new();
    if let Some(speaking) = speaking {
        let all = decisions.iter().flat_map(Decision::policies);
        added.extend(headers::for_policies(HeaderStyle::Both, speaking, all));
    }
    let mut raw_body = Vec::new();
    if over {
        let body = match denying {
            Some(policy) => {
                added.push((
                    RETRY_AFTER,
                    headers::retry_after_seconds(policy).to_string(),
                ));
                serde_json::to_vec(&headers::denied_body(policy, None)).unwrap_or_default()
            }
            None => unknown_api_key_body(decisions),
        };
        added.push(("content-type", "application/json".to_owned()));
        raw_body = body;
    }
    RateLimitResponse {
        overall_code: if over { Code::OverLimit } else { Code::Ok } as i32,
        statuses,
        response_headers_to_add: added
            .into_iter()
            .map(|(key, value)| HeaderValue {
                key: key.to_owned(),
                value,
                raw_value: Vec::new(),
            })
            .collect(),
        raw_body,
        ..RateLimitResponse::default()
    }
}

/// The body for a request denied for who it is, not for a limit.
fn unknown_api_key_body(decisions: &[Decision]) -> Vec<u8> {
    let refused = decisions
        .iter()
        .any(|decision| decision.refused == Some(Refusal::UnknownApiKey));
    let body = if refused {
        serde_json::json!({
            "error": "invalid_api_key",
            "message": "This API key is not known to the rate limiter.",
        })
    } else {
        serde_json::json!({ "error": "rate_limited", "message": "Rate limit exceeded." })
    };
    body.to_string().into_bytes()
}

fn descriptor_status(decision: &Decision) -> DescriptorStatus {
    let code = if decision.allowed {
        Code::Ok
    } else {
        Code::OverLimit
    };
    let Some(policy) = &decision.policy else {
        return DescriptorStatus {
            code: code as i32,
            ..DescriptorStatus::default()
        };
    };
    DescriptorStatus {
        code: code as i32,
        current_limit: Some(RateLimit {
            name: policy.rule.clone(),
            requests_per_unit: u32::try_from(policy.limit).unwrap_or(u32::MAX),
            unit: unit_of(policy) as i32,
        }),
        limit_remaining: u32::try_from(policy.remaining).unwrap_or(u32::MAX),
        duration_until_reset: Some(proto_duration(policy.reset_ms)),
        quota: None,
    }
}

/// The unit of a limit whose window is exactly one of Envoy's units; `Unknown` otherwise
/// (and for `concurrency`, which has no window).
fn unit_of(policy: &PolicyStatus) -> Unit {
    if policy.strategy == Strategy::Concurrency {
        return Unit::Unknown;
    }
    match policy.window_ms {
        1_000 => Unit::Second,
        60_000 => Unit::Minute,
        3_600_000 => Unit::Hour,
        86_400_000 => Unit::Day,
        604_800_000 => Unit::Week,
        _ => Unit::Unknown,
    }
}

fn proto_duration(ms: u64) -> ProtoDuration {
    ProtoDuration {
        seconds: i64::try_from(ms / 1_000).unwrap_or(i64::MAX),
        // Below 1000 ms × 10^6: fits.
        nanos: i32::try_from((ms % 1_000) * 1_000_000).unwrap_or(0),
    }
}

/// The gRPC service over a limiter.
pub struct Rls {
    limiter: Arc<Limiter>,
    /// Checks counted for the log of limited requests: this service picks its share of
    /// them, as the filter does of its own.
    checks_seen: AtomicU64,
}

impl Rls {
    pub fn new(limiter: Arc<Limiter>) -> Self {
        Rls {
            limiter,
            checks_seen: AtomicU64::new(0),
        }
    }

    fn sample_for_log(&self, checks: &mut [Check]) {
        let share = self
            .limiter
            .config()
            .snapshot()
            .document
            .limited_log_sample();
        if share <= 0.0 {
            return;
        }
        for check in checks {
            let seen = self
                .checks_seen
                .fetch_add(1, Ordering::Relaxed)
                .wrapping_add(1);
            check.sampled = sluice_protocol::sampled(seen, share);
        }
    }
}

#[tonic::async_trait]
impl RateLimitService for Rls {
    async fn should_rate_limit(
        &self,
        request: Request<RateLimitRequest>,
    ) -> Result<Response<RateLimitResponse>, Status> {
        let mut checks = checks_for(request.get_ref()).map_err(|error| {
            tracing::debug!(%error, "invalid rate-limit request");
            Status::invalid_argument(error.to_string())
        })?;
        self.sample_for_log(&mut checks);
        let call = CheckRequest {
            checks,
            hold_delays: true,
            // Envoy's rate-limit filter decides every request here: nothing to lease to,
            // and nobody to settle usage: a usage rule charges its reservation whole.
            lease_holder: None,
            settles: false,
        };
        let decided = self.limiter.check(&call).await.map_err(|error| {
            tracing::warn!(%error, "store unavailable");
            Status::unavailable(format!("store unavailable: {error}"))
        })?;
        let decisions = decided.decisions;
        let leases: Vec<String> = decisions
            .iter()
            .flat_map(|decision| decision.leases.iter().cloned())
            .collect();
        // Envoy's filter never says when a request ends: concurrency slots go back before
        // the answer, so that no later request finds them taken.
        if !leases.is_empty() {
            if let Err(error) = self.limiter.release(&leases).await {
                tracing::warn!(%error, "cannot give concurrency slots back; they expire with their lease");
            }
        }
        let response = response_for(&decisions);
        // A leaky bucket admits a request at its slot: the answer waits until then.
        let delay = if response.overall_code == Code::Ok as i32 {
            decisions
                .iter()
                .filter_map(|decision| decision.policy.as_ref().map(|p| p.delay_ms))
                .max()
                .unwrap_or(0)
        } else {
            0
        };
        if delay > 0 {
            tokio::time::sleep(Duration::from_millis(delay)).await;
        }
        tracing::debug!(
            descriptors = decisions.len(),
            over_limit = response.overall_code == Code::OverLimit as i32,
            "rate-limit call served"
        );
        Ok(Response::new(response))
    }
}

/// Binds `addr` (when the settings give one) and returns the server to run until
/// `shutdown` completes; without an address, a server that is done at once.
///
/// Who may call: the proxies, with a check token in the `authorization` metadata
/// (`Bearer <token>`; Envoy's `grpc_service.initial_metadata`), checked before the request
/// is decoded. What a caller may hold: `limits` (connections, HTTP/2's preface in time, a
/// peer that reads its answers), and the `GRPC_*` bounds of [`crate::listener`] (streams,
/// calls in flight, message size, a call's time, pings, a connection's age).
pub async fn listen(
    addr: Option<SocketAddr>,
    limits: crate::listener::Limits,
    tls: Option<crate::listener::TlsListener>,
    limiter: Arc<Limiter>,
    tokens: Arc<CheckTokens>,
    metrics: Arc<Metrics>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<impl std::future::Future<Output = Result<(), StartError>>, StartError> {
    use crate::listener::{
        GRPC_MAX_CONNECTION_AGE, GRPC_MAX_MESSAGE_BYTES, GRPC_MAX_STREAMS, GRPC_REQUEST_TIMEOUT,
        H2_PING_INTERVAL, H2_PING_TIMEOUT,
    };
    let listener = match addr {
        Some(addr) => Some((addr, crate::listener::bind(addr).await?)),
        None => None,
    };
    if let Some((addr, _)) = &listener {
        tracing::info!(%addr, tls = tls.is_some(), "Envoy rate-limit service (gRPC) listening");
    }
    Ok(async move {
        let Some((addr, listener)) = listener else {
            return Ok(());
        };
        // Within the cap, TCP_NODELAY (replies go out at once, as on the check address),
        // over TLS when asked for (ALPN `h2`).
        let incoming = crate::listener::incoming(listener, limits, tls, Arc::clone(&metrics));
        let authenticate = move |request: tonic::Request<()>| {
            let authorization = request
                .metadata()
                .get("authorization")
                .map(|value| value.as_bytes());
            if tokens.admit(authorization) {
                Ok(request)
            } else {
                metrics.unauthenticated_call("grpc");
                Err(tonic::Status::unauthenticated(
                    "the rate-limit API needs `authorization: Bearer <check token>`",
                ))
            }
        };
        let service = RateLimitServiceServer::new(Rls::new(limiter))
            .max_decoding_message_size(GRPC_MAX_MESSAGE_BYTES);
        tonic::transport::Server::builder()
            .timeout(GRPC_REQUEST_TIMEOUT)
            .max_concurrent_streams(GRPC_MAX_STREAMS)
            .concurrency_limit_per_connection(GRPC_MAX_STREAMS as usize)
            .http2_keepalive_interval(Some(H2_PING_INTERVAL))
            .http2_keepalive_timeout(Some(H2_PING_TIMEOUT))
            // No `max_connection_age_grace`: with it tonic skips the graceful close and
            // drops the connection at age + grace.
            .max_connection_age(GRPC_MAX_CONNECTION_AGE)
            .add_service(tonic::service::interceptor::InterceptedService::new(
                service,
                authenticate,
            ))
            .serve_with_incoming_shutdown(incoming, shutdown)
            .await
            .map_err(|error| StartError::Listen {
                addr,
                source: std::io::Error::other(error),
            })
    })
}

#[cfg(test)]
mod tests {
    use envoy_types::pb::envoy::extensions::common::ratelimit::v3::rate_limit_descriptor::{
        Entry, RateLimitOverride,
    };
    use envoy_types::pb::google::protobuf::UInt64Value;

    use super::*;

    fn descriptor(entries: &[(&str, &str)]) -> RateLimitDescriptor {
        RateLimitDescriptor {
            entries: entries
                .iter()
                .map(|(key, value)| Entry {
                    key: (*key).to_owned(),
                    value: (*value).to_owned(),
                })
                .collect(),
            ..RateLimitDescriptor::default()
        }
    }

    fn request(descriptors: Vec<RateLimitDescriptor>) -> RateLimitRequest {
        RateLimitRequest {
            domain: "sluice".to_owned(),
            descriptors,
            hits_addend: 0,
        }
    }

    fn check(entries: &[(&str, &str)]) -> Check {
        let mut checks = checks_for(&request(vec![descriptor(entries)])).unwrap();
        assert_eq!(checks.len(), 1);
        checks.remove(0)
    }

    fn refused(request: &RateLimitRequest) -> String {
        checks_for(request).unwrap_err().to_string()
    }

    fn refused_entries(entries: &[(&str, &str)]) -> String {
        refused(&request(vec![descriptor(entries)]))
    }

    #[test]
    fn the_client_is_the_first_identity_in_the_filters_order() {
        let all = [
            ("remote_address", "192.0.2.7"),
            ("client_id", "tenant-1"),
            ("api_key", "demo-free-key"),
            ("user", "ann"),
            ("tier", "gold"),
        ];
        let key_digest = "9f8cfdb17116bf0e2a44e071454f25594cb9b8737bf331e6a2f0b30550572f29";
        let every = check(&all);
        assert_eq!(every.client, ClientId::new(ClientKind::User, "ann"));
        assert_eq!(every.user.as_deref(), Some("ann"));
        assert_eq!(
            every.api_key.as_deref(),
            Some(key_digest),
            "the filter's digest"
        );
        assert_eq!(every.ip.as_deref(), Some("192.0.2.7"));
        assert_eq!(every.tier.as_deref(), Some("gold"));
        assert_eq!(
            check(&all[..3]).client,
            ClientId::new(ClientKind::ApiKey, key_digest)
        );
        assert_eq!(
            check(&all[..2]).client,
            ClientId::new(ClientKind::Header, "tenant-1")
        );
        assert_eq!(check(&[("client", "t")]).client.kind, "header");
        assert_eq!(check(&all[..1]).client, ClientId::ip("192.0.2.7"));
        assert_eq!(
            check(&[("ip", "192.0.2.8")]).client,
            ClientId::ip("192.0.2.8")
        );
    }

    #[test]
    fn addresses_count_as_the_filter_counts_them() {
        let ip = |value: &str| check(&[("remote_address", value)]).ip;
        assert_eq!(
            ip("2001:db8:1:2:3:4:5:6").as_deref(),
            Some("2001:db8:1:2::/64")
        );
        assert_eq!(ip("::ffff:198.51.100.4").as_deref(), Some("198.51.100.4"));
        assert_eq!(ip(" 10.0.0.1 ").as_deref(), Some("10.0.0.1"));
        assert_eq!(ip(""), None, "an empty value is no address");
        assert_eq!(
            refused(&request(vec![
                descriptor(&[("generic_key", "a")]),
                descriptor(&[("path", "/"), ("remote_address", "10.0.0.1:80")]),
            ])),
            "descriptors[1].entries[1].value: `10.0.0.1:80` is not an IP address"
        );
    }

    #[test]
    fn api_key_digests_are_taken_when_well_formed() {
        let digest = "9F8CFDB17116BF0E2A44E071454F25594CB9B8737BF331E6A2F0B30550572F29";
        let taken = check(&[("api_key_sha256", digest)]);
        assert_eq!(taken.api_key, Some(digest.to_ascii_lowercase()));
        assert_eq!(
            taken.client,
            ClientId::new(ClientKind::ApiKey, digest.to_ascii_lowercase())
        );
        assert_eq!(
            refused_entries(&[("api_key_sha256", "abc")]),
            "descriptors[0].entries[0].value: must be a SHA-256 in hex (64 digits)"
        );
        assert_eq!(
            refused_entries(&[("api_key", "k"), ("api_key_sha256", digest)]),
            "descriptors[0].entries[1].key: `api_key_sha256` says what entries[0] already \
             said: one entry per key"
        );
    }

    #[test]
    fn request_line_entries_and_headers() {
        let check = check(&[
            (":path", "/items/7?page=2"),
            ("authority", "api.example.com"),
            (":method", "POST"),
            ("generic_key", "checkout"),
            ("X-Plan", "pro"),
            ("remote_address", "10.0.0.1"),
        ]);
        assert_eq!(check.path, "/items/7", "without the query");
        assert_eq!(check.host, "api.example.com");
        assert_eq!(check.method, "POST");
        assert_eq!(
            check.headers,
            BTreeMap::from([
                ("generic_key".to_owned(), "checkout".to_owned()),
                ("x-plan".to_owned(), "pro".to_owned()),
            ])
        );
        let other = super::check_for(
            0,
            &descriptor(&[("path", "/a"), ("host", "h"), ("method", "GET")]),
            1,
        )
        .unwrap();
        assert_eq!([other.path, other.host, other.method], ["/a", "h", "GET"]);
        assert_eq!(
            refused_entries(&[("path", "/a"), (":path", "/b")]),
            "descriptors[0].entries[1].key: `:path` says what entries[0] already said: one \
             entry per key"
        );
        assert!(
            refused_entries(&[("x-plan", "a"), ("X-PLAN", "b")])
                .starts_with("descriptors[0].entries[1].key:"),
            "a header twice"
        );
    }

    #[test]
    fn a_descriptor_without_identity_is_its_own_client() {
        let one = check(&[("generic_key", "a"), ("path", "/x")]);
        let other = check(&[("generic_key", "b"), ("path", "/x")]);
        assert_eq!(one.client.kind, "descriptor");
        assert_eq!(one.client.value, r#"[["generic_key","a"],["path","/x"]]"#);
        assert_ne!(one.client, other.client);
        assert_eq!(one.ip, None);
        // Blank identities are no identities.
        let blank = check(&[("user", "  "), ("client", ""), ("generic_key", "a")]);
        assert_eq!(blank.user, None);
        assert_eq!(blank.client.kind, "descriptor");
    }

    #[test]
    fn long_identities_count_by_their_digest() {
        let long = "u".repeat(MAX_IDENTITY_BYTES + 1);
        let user = check(&[("user", &long)]).client.value;
        assert_eq!(user, format!("sha256:{}", sha256_hex(long.as_bytes())));
        let client = check(&[("client", &long[1..])]).client.value;
        assert_eq!(client, long[1..], "at the bound, as it is");
    }

    #[test]
    fn the_cost_is_hits_addend_with_envoys_defaults() {
        let mut costed = descriptor(&[("generic_key", "a")]);
        costed.hits_addend = Some(UInt64Value { value: 5 });
        let mut free = descriptor(&[("generic_key", "b")]);
        free.hits_addend = Some(UInt64Value { value: 0 });
        let plain = descriptor(&[("generic_key", "c")]);
        let mut call = request(vec![costed, free, plain]);
        let costs = |call: &RateLimitRequest| {
            checks_for(call)
                .unwrap()
                .iter()
                .map(|check| check.cost)
                .collect::<Vec<_>>()
        };
        assert_eq!(costs(&call), [5, 0, 1], "unset (0) means 1");
        call.hits_addend = 3;
        assert_eq!(costs(&call), [5, 0, 3], "the descriptor's own wins");
    }

    #[test]
    fn invalid_requests_name_the_field() {
        let mut call = request(vec![descriptor(&[("user", "a")])]);
        call.domain.clear();
        assert_eq!(refused(&call), "domain: must not be empty");
        assert_eq!(
            refused(&request(Vec::new())),
            "descriptors: at least one descriptor is needed"
        );
        assert_eq!(
            refused(&request(vec![
                descriptor(&[("user", "a")]);
                MAX_CHECKS_PER_CALL + 1
            ])),
            "descriptors: at most 1024 descriptors per request, got 1025"
        );
        assert_eq!(
            refused(&request(vec![
                descriptor(&[("user", "a")]),
                descriptor(&[])
            ])),
            "descriptors[1].entries: a descriptor needs at least one entry"
        );
        assert_eq!(
            refused_entries(&[("user", "a"), ("", "b")]),
            "descriptors[0].entries[1].key: must not be empty"
        );
        let many: Vec<(String, String)> = (0..=MAX_ENTRIES)
            .map(|i| (format!("k{i}"), "v".to_owned()))
            .collect();
        let many: Vec<(&str, &str)> = many.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        assert_eq!(
            refused_entries(&many),
            "descriptors[0].entries: at most 64 entries per descriptor, got 65"
        );
        let mut overridden = descriptor(&[("user", "a")]);
        overridden.limit = Some(RateLimitOverride {
            requests_per_unit: 5,
            unit: 1,
        });
        assert_eq!(
            refused(&request(vec![overridden])),
            "descriptors[0].limit: limit overrides are not supported: the limits are Sluice's \
             rules"
        );
        let mut refund = descriptor(&[("user", "a")]);
        refund.is_negative_hits = true;
        assert_eq!(
            refused(&request(vec![refund])),
            "descriptors[0].is_negative_hits: refunds are not supported"
        );
    }

    fn policy(rule: &str, limit: u64, remaining: u64, window_ms: u64) -> PolicyStatus {
        PolicyStatus {
            rule: rule.to_owned(),
            strategy: Strategy::FixedWindow,
            limit,
            remaining,
            reset_ms: 41_500,
            retry_after_ms: 0,
            window_ms,
            delay_ms: 0,
            reason: None,
            usage: false,
        }
    }

    fn decided(allowed: bool, policy: PolicyStatus) -> Decision {
        Decision {
            allowed,
            policy: Some(policy),
            ..Decision::unlimited()
        }
    }

    fn header<'r>(response: &'r RateLimitResponse, name: &str) -> Option<&'r str> {
        let mut found = response
            .response_headers_to_add
            .iter()
            .filter(|header| header.key == name);
        let first = found.next().map(|header| header.value.as_str());
        assert!(found.next().is_none(), "{name} twice");
        first
    }

    #[test]
    fn an_allowed_request_gets_statuses_and_the_filters_headers() {
        let response = response_for(&[decided(true, policy("per-client", 100, 99, 60_000))]);
        assert_eq!(response.overall_code, Code::Ok as i32);
        let status = &response.statuses[0];
        assert_eq!(status.code, Code::Ok as i32);
        assert_eq!(
            status.current_limit,
            Some(RateLimit {
                name: "per-client".to_owned(),
                requests_per_unit: 100,
                unit: Unit::Minute as i32
            })
        );
        assert_eq!(status.limit_remaining, 99);
        assert_eq!(
            status.duration_until_reset,
            Some(ProtoDuration {
                seconds: 41,
                nanos: 500_000_000
            })
        );
        assert_eq!(header(&response, "x-ratelimit-limit"), Some("100"));
        assert_eq!(header(&response, "x-ratelimit-remaining"), Some("99"));
        assert_eq!(header(&response, "x-ratelimit-reset"), Some("42"));
        assert_eq!(
            header(&response, "ratelimit-policy"),
            Some(r#""per-client";q=100;w=60"#)
        );
        assert_eq!(
            header(&response, "ratelimit"),
            Some(r#""per-client";r=99;t=42"#)
        );
        assert_eq!(header(&response, "retry-after"), None);
        assert_eq!(
            header(&response, "content-type"),
            None,
            "the upstream's own stays"
        );
        assert!(response.raw_body.is_empty());
    }

    #[test]
    fn a_denial_speaks_for_the_request_with_retry_after_and_the_filters_body() {
        let mut denying = policy("login", 5, 0, 10_000);
        denying.retry_after_ms = 7_200;
        let response = response_for(&[
            decided(true, policy("per-client", 100, 0, 60_000)),
            decided(false, denying),
            decided(true, policy("daily", 1_000, 900, 86_400_000)),
        ]);
        assert_eq!(response.overall_code, Code::OverLimit as i32);
        let codes: Vec<i32> = response.statuses.iter().map(|s| s.code).collect();
        assert_eq!(
            codes,
            [Code::Ok as i32, Code::OverLimit as i32, Code::Ok as i32],
            "one status per descriptor, in order"
        );
        assert_eq!(
            response.statuses[1].current_limit.as_ref().map(|l| l.unit),
            Some(Unit::Unknown as i32),
            "10 s is no unit of Envoy's"
        );
        assert_eq!(
            response.statuses[2].current_limit.as_ref().map(|l| l.unit),
            Some(Unit::Day as i32)
        );
        assert_eq!(
            header(&response, "x-ratelimit-limit"),
            Some("5"),
            "the denying one"
        );
        assert_eq!(header(&response, "retry-after"), Some("8"));
        assert_eq!(header(&response, "content-type"), Some("application/json"));
        assert_eq!(
            header(&response, "ratelimit-policy"),
            Some(r#""per-client";q=100;w=60, "login";q=5;w=10, "daily";q=1000;w=86400"#)
        );
        let body: serde_json::Value = serde_json::from_slice(&response.raw_body).unwrap();
        assert_eq!(body["error"], "rate_limited");
        assert_eq!(body["policy"], "login");
        assert_eq!(body["retry_after"], 8);
    }

    #[test]
    fn the_fewest_remaining_speak_when_all_pass_and_unlimited_descriptors_say_nothing() {
        let response = response_for(&[
            Decision::unlimited(),
            decided(true, policy("wide", 100, 50, 1_000)),
            decided(true, policy("narrow", 10, 3, 3_600_000)),
        ]);
        assert_eq!(response.overall_code, Code::Ok as i32);
        assert_eq!(response.statuses[0].code, Code::Ok as i32);
        assert_eq!(response.statuses[0].current_limit, None);
        assert_eq!(
            response.statuses[1].current_limit.as_ref().map(|l| l.unit),
            Some(1)
        );
        assert_eq!(header(&response, "x-ratelimit-limit"), Some("10"));
        assert_eq!(header(&response, "x-ratelimit-remaining"), Some("3"));
        let nothing = response_for(&[Decision::unlimited()]);
        assert!(nothing.response_headers_to_add.is_empty());
        assert_eq!(nothing.overall_code, Code::Ok as i32);
    }

    #[test]
    fn concurrency_limits_have_no_unit_and_huge_numbers_saturate() {
        let mut slots = policy("slots", 3, 1, 60_000);
        slots.strategy = Strategy::Concurrency;
        let huge = policy("huge", u64::from(u32::MAX) + 7, u64::MAX, 1_000);
        let response = response_for(&[decided(true, slots), decided(true, huge)]);
        assert_eq!(
            response.statuses[0].current_limit.as_ref().map(|l| l.unit),
            Some(Unit::Unknown as i32)
        );
        let big = &response.statuses[1];
        assert_eq!(big.limit_remaining, u32::MAX);
        assert_eq!(
            big.current_limit.as_ref().map(|l| l.requests_per_unit),
            Some(u32::MAX)
        );
    }

    #[test]
    fn an_unknown_api_key_is_over_the_limit_with_its_own_body() {
        let refused = Decision {
            allowed: false,
            refused: Some(Refusal::UnknownApiKey),
            ..Decision::unlimited()
        };
        let response = response_for(&[refused]);
        assert_eq!(response.overall_code, Code::OverLimit as i32);
        assert_eq!(response.statuses[0].code, Code::OverLimit as i32);
        assert_eq!(response.statuses[0].current_limit, None);
        assert_eq!(header(&response, "retry-after"), None);
        let body: serde_json::Value = serde_json::from_slice(&response.raw_body).unwrap();
        assert_eq!(body["error"], "invalid_api_key");
    }
}
