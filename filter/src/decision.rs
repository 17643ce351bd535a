//! Turning the controller's reply (or its absence) into what happens to the request.
//! No host calls here: the host glue feeds in what Envoy reported and carries out the
//! [`Verdict`].

use std::borrow::Cow;

use sluice_protocol::headers::{self, HeaderStyle, RETRY_AFTER};
use sluice_protocol::rules::MAX_MATCH_PATH;
use sluice_protocol::{
    Check, CheckResponse, Decision, LeaseReturn, PolicyStatus, Refusal, Settlement,
    UsageReservation, MAX_REQUEST_FIELD_BYTES,
};

use crate::config::{FailureMode, FilterConfig};
use crate::identity::Identity;
use crate::jwt::TokenError;

/// Headers as (lower-case name, value) pairs.
pub type Headers = Vec<(&'static str, String)>;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Let the request go upstream (after `delay_ms`, when a leaky bucket gave it a later
    /// slot and the filter holds it); add these headers to its response, and give these
    /// concurrency leases back when its stream ends.
    Continue {
        response_headers: Headers,
        leases: Vec<String>,
        delay_ms: u64,
        /// Usage rules' reservations, settled with what the response says it used.
        usage: Vec<UsageReservation>,
    },
    /// Answer the client directly: `status`, `headers` and the JSON `body` for HTTP; for
    /// gRPC (see [`crate::grpc`]) the status `kind` maps to, the short plain `message` as
    /// `grpc-message` and `retry_after_ms` as `grpc-retry-pushback-ms`.
    Reply {
        status: u32,
        headers: Headers,
        body: String,
        kind: ReplyKind,
        message: String,
        retry_after_ms: Option<u64>,
    },
}

/// Why the filter answered a request itself (what the gRPC status is chosen by).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyKind {
    /// Over a limit (429).
    RateLimited,
    /// No decision and the failure mode is deny (503).
    Unavailable,
    /// A token that is present and invalid (401).
    InvalidToken,
    /// An API key the controller does not know (401).
    UnknownApiKey,
    /// Denylisted (403).
    Denylisted,
}

impl Verdict {
    fn pass() -> Self {
        Verdict::Continue {
            response_headers: Vec::new(),
            leases: Vec::new(),
            delay_ms: 0,
            usage: Vec::new(),
        }
    }
}

/// How a decided request is counted in the filter's metrics (the order is the host's
/// tally order).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Counted {
    Allowed = 0,
    Limited = 1,
    /// Allowed, but only because the rule (or the whole filter) is in shadow mode.
    ShadowLimited = 2,
    /// Refused for who the client is (an API key the controller does not know).
    Refused = 3,
}

/// Why no decision came from the controller. Each is logged and handled by the failure mode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// `dispatch_http_call` refused the call (for example an unknown cluster).
    Dispatch(String),
    /// The callout came back with a status other than 200: Envoy synthesises 503 for a
    /// refused connection or no healthy host and 504 for a timeout.
    Status(String),
    /// A 200 whose body is not one decision for our one check.
    MalformedReply(String),
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Dispatch(why) => write!(f, "callout could not be dispatched: {why}"),
            Failure::Status(status) => write!(f, "controller answered with status {status}"),
            Failure::MalformedReply(why) => write!(f, "controller reply is malformed: {why}"),
        }
    }
}

/// Whether a failed callout is worth one more attempt on another controller: Envoy's own
/// answer for a host it could not reach (no status, or 502/503 without the controller's
/// JSON body). A controller that answered, even with an error, is alive and stays the
/// judge; a timeout (504) has used the deadline up.
pub fn another_host_may_answer(status: Option<&str>, body: &[u8]) -> bool {
    match status {
        None => true,
        Some("502" | "503") => body.first() != Some(&b'{'),
        Some(_) => false,
    }
}

/// Highest cost a request header can claim.
pub const MAX_HEADER_COST: u64 = 1_000_000;

/// The cost a request claims in the configured cost header: a whole number from 1 to
/// [`MAX_HEADER_COST`]; anything else counts as 1, so that a header can never make a
/// request free.
pub fn cost_from_header(value: Option<&str>) -> u64 {
    value
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map_or(1, |cost| cost.clamp(1, MAX_HEADER_COST))
}

/// The check to send for a request of `identity`. `path` is the path the filter matched
/// (see [`normalized_path`]); the host, method and path are bounded as a check carries them
/// (see [`bounded_field`] and [`bounded_path`]). The identities are bounded already (see
/// [`crate::identity::bounded_identity`]).
pub fn check_for(identity: &Identity, host: &str, method: &str, path: &str, cost: u64) -> Check {
    Check {
        ip: Some(identity.counted_ip.clone()),
        user: identity.user.clone(),
        api_key: identity.api_key.clone(),
        tier: identity.tier.clone(),
        ..Check::new(
            identity.client.clone(),
            bounded_field(host),
            bounded_to(method, MAX_METHOD_BYTES),
            &bounded_path(path_only(path)),
            cost,
        )
    }
}

/// The path without its query string: the query does not choose a rule, and leaving it
/// out keeps it out of the controller.
pub fn path_only(path: &str) -> &str {
    path.split_once('?').map_or(path, |(path, _query)| path)
}

/// The path the filter matches exempt globs and lists on and sends to the controller: the
/// `:path` without its query string (as [`path_only`]), normalised so that one resource has
/// one spelling whatever the client wrote, and whether or not Envoy normalised it first
/// (the shipped configurations have Envoy do so: `normalize_path`, `merge_slashes`):
/// 1. a percent-encoded unreserved character (`A-Z a-z 0-9 - . _ ~`) is decoded, as RFC 3986
///    (sections 2.3 and 6.2.2.2) makes it the same URI: `%2e` and `%2E` are `.`, so
///    `/stats/%2e%2e/x` is `/stats/../x`. Every other escape stays as it was sent, once (no
///    second round: `%252e` stays): in particular `%2F` and `%5C` are data, not separators
///    (Envoy's `path_with_escaped_slashes_action` decides what they mean before the filter);
/// 2. runs of `/` are merged into one (`//stats//x` is `/stats/x`), as most servers and
///    path cleaners read them (nginx, Go's `path.Clean`), before
/// 3. the `.` and `..` segments are resolved by RFC 3986's `remove_dot_segments` (section
///    5.2.4): `/a/./b` is `/a/b`, `/stats/../x` is `/x`, and `..` never climbs above the
///    root (`/..` is `/`).
///
/// The function is idempotent: what Envoy forwards after its own normalisation is left as
/// it is, so the filter then matches exactly the path the upstream gets.
pub fn normalized_path(raw: &str) -> Cow<'_, str> {
    let path = path_only(raw);
    // Most paths are already normal: no escapes, no empty and no dot segments.
    let clean = !path.contains('%')
        && !path.contains("//")
        && !path.starts_with('.')
        && !path
            .split('/')
            .any(|segment| segment == "." || segment == "..");
    if clean {
        return Cow::Borrowed(path);
    }
    let decoded = decode_unreserved(path);
    let merged = merge_slashes(&decoded);
    Cow::Owned(remove_dot_segments(&merged))
}

fn hex_value(byte: u8) -> Option<u8> {
    match byte {
        b'0'..=b'9' => Some(byte - b'0'),
        b'a'..=b'f' => Some(byte - b'a' + 10),
        b'A'..=b'F' => Some(byte - b'A' + 10),
        _ => None,
    }
}

/// `path` with every percent-encoded unreserved character decoded (once). A `%` that starts
/// no escape stays as it is, unless the characters decoded after it would now make it one
/// (`%%32e` would read `%2e`): it is then written `%25`, as Envoy's own normalisation does,
/// so that decoding never makes a new escape and a second pass changes nothing.
fn decode_unreserved(path: &str) -> String {
    let bytes = path.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    // Where a `%` that starts no escape went in `out`.
    let mut stray = Vec::new();
    let mut at = 0;
    while let Some(&byte) = bytes.get(at) {
        let (high, low) = (bytes.get(at + 1), bytes.get(at + 2));
        let value = match (byte, high, low) {
            (b'%', Some(&high), Some(&low)) => hex_value(high)
                .zip(hex_value(low))
                .map(|(high, low)| high * 16 + low),
            _ => None,
        };
        let unreserved =
            value.filter(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'.' | b'_' | b'~'));
        match (unreserved, value) {
            (Some(decoded), _) => {
                out.push(decoded);
                at += 3;
            }
            (None, Some(_)) => {
                // An escape of anything else stays as sent.
                out.extend_from_slice(bytes.get(at..at + 3).unwrap_or_default());
                at += 3;
            }
            (None, None) => {
                if byte == b'%' {
                    stray.push(out.len());
                }
                out.push(byte);
                at += 1;
            }
        }
    }
    for &at in stray.iter().rev() {
        let hex = |offset: usize| out.get(at + offset).copied().and_then(hex_value);
        if hex(1).is_some() && hex(2).is_some() {
            out.splice(at + 1..at + 1, *b"25");
        }
    }
    // Only ASCII escapes became ASCII bytes: still UTF-8.
    String::from_utf8(out).unwrap_or_else(|_| path.to_owned())
}

fn merge_slashes(path: &str) -> String {
    let mut out = String::with_capacity(path.len());
    for c in path.chars() {
        if !(c == '/' && out.ends_with('/')) {
            out.push(c);
        }
    }
    out
}

/// RFC 3986, section 5.2.4.
fn remove_dot_segments(path: &str) -> String {
    fn drop_last_segment(output: &mut String) {
        match output.rfind('/') {
            Some(at) => output.truncate(at),
            None => output.clear(),
        }
    }
    let mut input = path;
    let mut output = String::with_capacity(path.len());
    while !input.is_empty() {
        if let Some(rest) = input
            .strip_prefix("../")
            .or_else(|| input.strip_prefix("./"))
        {
            input = rest;
        } else if let Some(rest) = input.strip_prefix("/.").filter(|r| r.starts_with('/')) {
            input = rest;
        } else if input == "/." {
            input = "/";
        } else if let Some(rest) = input.strip_prefix("/..").filter(|r| r.starts_with('/')) {
            input = rest;
            drop_last_segment(&mut output);
        } else if input == "/.." {
            input = "/";
            drop_last_segment(&mut output);
        } else if input == "." || input == ".." {
            input = "";
        } else {
            // The first segment, with its leading `/` if it has one, up to the next `/`.
            let end = input
                .char_indices()
                .skip(1)
                .find(|(_, c)| *c == '/')
                .map_or(input.len(), |(at, _)| at);
            let (segment, rest) = (
                input.get(..end).unwrap_or(input),
                input.get(end..).unwrap_or(""),
            );
            output.push_str(segment);
            input = rest;
        }
    }
    output
}

// What makes [`bounded_path`] keep every rule's `path_prefix`: each half it keeps is longer
// than any path a rule names.
const _: () = assert!(MAX_MATCH_PATH < MAX_REQUEST_FIELD_BYTES / 2);

/// The largest index at most `at` that is a character boundary of `text`.
fn floor_boundary(text: &str, at: usize) -> usize {
    let mut at = at.min(text.len());
    while !text.is_char_boundary(at) {
        at -= 1;
    }
    at
}

/// A host or header value as a check carries it: cut to at most [`MAX_REQUEST_FIELD_BYTES`]
/// (at a character boundary). A rule matches these by equality (hosts without case), so
/// only a rule naming a value longer than the cut could see a difference, and no host name
/// or sensible header value is that long.
pub fn bounded_field(value: &str) -> &str {
    bounded_to(value, MAX_REQUEST_FIELD_BYTES)
}

fn bounded_to(value: &str, bytes: usize) -> &str {
    value
        .get(..floor_boundary(value, bytes))
        .unwrap_or_default()
}

// The controller refuses a whole call if one of its checks has a longer method, more
// matched headers or a longer header name (see [`unsendable`]).
pub use sluice_protocol::{MAX_CHECK_HEADERS, MAX_HEADER_NAME_BYTES, MAX_METHOD_BYTES};

/// Why the controller would refuse a call carrying `check` whatever else is in it, if it
/// would: more matched headers than it takes, or a name too long (only possible when the
/// rules match on more headers than that). Such a check is never put in a batch: its
/// request alone gets the failure mode. Every other field is bounded as it is built.
pub fn unsendable(check: &Check) -> Option<String> {
    if check.headers.len() > MAX_CHECK_HEADERS {
        return Some(format!(
            "the request carries {} headers the rules match on; a check carries at most \
             {MAX_CHECK_HEADERS} (the rules should match on fewer)",
            check.headers.len()
        ));
    }
    check
        .headers
        .keys()
        .find(|name| name.len() > MAX_HEADER_NAME_BYTES)
        .map(|name| {
            format!(
                "a header the rules match on has a name of {} bytes; a check carries names \
                 of at most {MAX_HEADER_NAME_BYTES}",
                name.len()
            )
        })
}

/// A path as a check carries it: a path longer than [`MAX_REQUEST_FIELD_BYTES`] keeps its
/// first and its last `MAX_REQUEST_FIELD_BYTES / 2` bytes (at character boundaries) and
/// loses the middle. Rules name paths of at most [`MAX_MATCH_PATH`] bytes (1 KiB), far less
/// than either half, so for a cut path:
/// - `path` never matches (neither the whole path nor the cut one can equal it);
/// - `path_prefix` matches exactly as on the whole path (the head is kept);
/// - a `path_glob` still matches if it matched the whole path with every literal
///   character of the glob in the head or the tail: globs anchored at either end
///   (`/static/**`, `/**/export`, `/files/*.json`, `/users/*/orders`) match as before (a
///   `*` that spanned the cut spans a part of the same run, still without `/`). Only a
///   glob whose literal text matched nowhere but in the dropped middle of a path over
///   8 KiB (`/**/admin/**`) can miss it. Keeping only the head would lose every glob that
///   ends in a literal, and a hash would lose every rule.
///
/// The exempt globs and the lists are matched in the filter on the whole path.
pub fn bounded_path(path: &str) -> Cow<'_, str> {
    if path.len() <= MAX_REQUEST_FIELD_BYTES {
        return Cow::Borrowed(path);
    }
    let half = MAX_REQUEST_FIELD_BYTES / 2;
    let head_end = floor_boundary(path, half);
    let mut tail_start = path.len() - half;
    while !path.is_char_boundary(tail_start) {
        tail_start += 1;
    }
    let head = path.get(..head_end).unwrap_or_default();
    let tail = path.get(tail_start..).unwrap_or_default();
    Cow::Owned([head, tail].concat())
}

/// The body of the release call for concurrency slots (`leases`), leases' unused quota
/// (`returns`) and usage reservations (`settlements`).
pub fn release_request(
    leases: &[String],
    returns: &[LeaseReturn],
    settlements: &[Settlement],
) -> Vec<u8> {
    /// [`sluice_protocol::ReleaseRequest`] as written, borrowed.
    #[derive(serde::Serialize)]
    struct Release<'a> {
        leases: &'a [String],
        #[serde(skip_serializing_if = "<[_]>::is_empty")]
        returns: &'a [LeaseReturn],
        #[serde(skip_serializing_if = "<[_]>::is_empty")]
        settlements: &'a [Settlement],
    }
    serde_json::to_vec(&Release {
        leases,
        returns,
        settlements,
    })
    .unwrap_or_default()
}

/// The decisions in a reply to a check call of `expected` checks, one per check.
pub fn decisions_from_reply(
    status: Option<&str>,
    body: &[u8],
    expected: usize,
) -> Result<Vec<Decision>, Failure> {
    if status != Some("200") {
        // The body says whose answer it is: Envoy's ("upstream connect error … reset
        // reason: …") or the controller's JSON error. Kept short for the log line.
        let said: String = String::from_utf8_lossy(body).chars().take(160).collect();
        let status = status.unwrap_or("(none)");
        return Err(Failure::Status(if said.is_empty() {
            status.to_owned()
        } else {
            format!("{status} ({})", said.trim())
        }));
    }
    let response: CheckResponse =
        serde_json::from_slice(body).map_err(|e| Failure::MalformedReply(e.to_string()))?;
    if response.decisions.len() != expected {
        return Err(Failure::MalformedReply(format!(
            "expected {expected} decisions, got {}",
            response.decisions.len()
        )));
    }
    Ok(response.decisions)
}

/// The verdict for a callout of one check that came back with `status` and `body`.
pub fn verdict_for_reply(
    config: &FilterConfig,
    status: Option<&str>,
    body: &[u8],
    request_id: Option<&str>,
) -> Result<(Verdict, Counted, Decision), Failure> {
    let decisions = decisions_from_reply(status, body, 1)?;
    let decision = decisions
        .into_iter()
        .next()
        .ok_or_else(|| Failure::MalformedReply("no decision".into()))?;
    let (verdict, counted) = verdict_for_decision(config, &decision, request_id);
    Ok((verdict, counted, decision))
}

/// What the controller's decision means for the request: through with rate-limit headers,
/// or 429 with `Retry-After` and a JSON body. In shadow mode (the filter's, or the rule's
/// as the controller reports it) a denial only shows in headers and metrics.
pub fn verdict_for_decision(
    config: &FilterConfig,
    decision: &Decision,
    request_id: Option<&str>,
) -> (Verdict, Counted) {
    if let Some(Refusal::UnknownApiKey) = decision.refused {
        if config.shadow {
            return (Verdict::pass(), Counted::ShadowLimited);
        }
        return (unknown_api_key(request_id), Counted::Refused);
    }
    let Some(policy) = &decision.policy else {
        let verdict = Verdict::Continue {
            response_headers: Vec::new(),
            leases: decision.leases.clone(),
            delay_ms: 0,
            usage: decision.usage.clone(),
        };
        return (verdict, Counted::Allowed);
    };
    let rate_headers = headers::for_policies(config.headers, policy, decision.policies());
    if decision.allowed || config.shadow {
        let counted = if decision.allowed && !decision.shadow_denied {
            Counted::Allowed
        } else {
            Counted::ShadowLimited
        };
        let verdict = Verdict::Continue {
            response_headers: rate_headers,
            leases: decision.leases.clone(),
            delay_ms: if decision.allowed { policy.delay_ms } else { 0 },
            usage: decision.usage.clone(),
        };
        return (verdict, counted);
    }
    (
        too_many_requests(rate_headers, policy, request_id),
        Counted::Limited,
    )
}

/// A 429 for a denial the filter remembers (see `denial`), with the time left.
pub fn cached_denial(
    style: HeaderStyle,
    shown: &crate::denial::Shown,
    request_id: Option<&str>,
) -> Verdict {
    let rate_headers = headers::for_policies(style, &shown.policy, shown.policies());
    too_many_requests(rate_headers, &shown.policy, request_id)
}

fn too_many_requests(
    mut rate_headers: Headers,
    policy: &PolicyStatus,
    request_id: Option<&str>,
) -> Verdict {
    let retry_after_s = headers::retry_after_seconds(policy);
    rate_headers.push((RETRY_AFTER, retry_after_s.to_string()));
    rate_headers.push(("content-type", "application/json".to_owned()));
    let body = serde_json::to_string(&headers::denied_body(policy, request_id))
        .unwrap_or_else(|_| String::from(r#"{"error":"rate_limited"}"#));
    Verdict::Reply {
        status: 429,
        headers: rate_headers,
        body,
        kind: ReplyKind::RateLimited,
        message: format!(
            "rate limit `{}` exceeded, retry in {retry_after_s} s",
            policy.rule
        ),
        retry_after_ms: Some(policy.retry_after_ms),
    }
}

fn json_reply(
    status: u32,
    kind: ReplyKind,
    message: String,
    mut extra: Headers,
    body: serde_json::Value,
) -> Verdict {
    extra.push(("content-type", "application/json".to_owned()));
    Verdict::Reply {
        status,
        headers: extra,
        body: body.to_string(),
        kind,
        message,
        retry_after_ms: None,
    }
}

/// A 401 for a token that is present and invalid (when the configuration rejects those).
pub fn token_rejected(error: &TokenError, request_id: Option<&str>) -> Verdict {
    json_reply(
        401,
        ReplyKind::InvalidToken,
        format!("invalid token: {error}"),
        vec![(
            "www-authenticate",
            r#"Bearer error="invalid_token""#.to_owned(),
        )],
        serde_json::json!({
            "error": "invalid_token",
            "message": error.to_string(),
            "request_id": request_id,
        }),
    )
}

/// A 401 for an API key the controller does not know (where unknown keys are refused).
pub fn unknown_api_key(request_id: Option<&str>) -> Verdict {
    json_reply(
        401,
        ReplyKind::UnknownApiKey,
        "unknown API key".to_owned(),
        Vec::new(),
        serde_json::json!({
            "error": "invalid_api_key",
            "message": "This API key is not known to the rate limiter.",
            "request_id": request_id,
        }),
    )
}

/// A 403 for a denylisted request.
pub fn denylisted(request_id: Option<&str>) -> Verdict {
    json_reply(
        403,
        ReplyKind::Denylisted,
        "denied by the rate limiter's denylist".to_owned(),
        Vec::new(),
        serde_json::json!({
            "error": "forbidden",
            "message": "This client or path is denied by the rate limiter's denylist.",
            "request_id": request_id,
        }),
    )
}

/// What the failure mode says to do when there is no decision.
pub fn verdict_for_failure(mode: FailureMode) -> Verdict {
    match mode {
        FailureMode::Allow => Verdict::pass(),
        FailureMode::Deny => Verdict::Reply {
            status: 503,
            headers: vec![
                (RETRY_AFTER, "1".to_owned()),
                ("content-type", "application/json".to_owned()),
            ],
            body: String::from(
                r#"{"error":"rate_limiter_unavailable","message":"The rate limiter could not be reached; the request was refused (failure mode deny)."}"#,
            ),
            kind: ReplyKind::Unavailable,
            message: String::from("rate limiter unavailable (failure mode deny), retry in 1 s"),
            retry_after_ms: Some(1_000),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_protocol::{ClientId, ReleaseRequest, Strategy};

    fn config(extra: &str) -> FilterConfig {
        FilterConfig::parse(format!(r#"{{"controller":{{"cluster":"c"}}{extra}}}"#).as_bytes())
            .unwrap()
    }

    fn status(rule: &str, remaining: u64, allowed: bool) -> PolicyStatus {
        PolicyStatus {
            rule: rule.into(),
            strategy: Strategy::FixedWindow,
            limit: 5,
            remaining,
            reset_ms: 1_500,
            retry_after_ms: if allowed { 0 } else { 1_500 },
            window_ms: 2_000,
            delay_ms: 0,
            reason: None,
            usage: false,
        }
    }

    fn decision(allowed: bool, remaining: u64) -> Decision {
        Decision {
            allowed,
            policy: Some(status("per-ip", remaining, allowed)),
            ..Decision::unlimited()
        }
    }

    fn reply(allowed: bool, remaining: u64) -> Vec<u8> {
        serde_json::to_vec(&CheckResponse {
            decisions: vec![decision(allowed, remaining)],
        })
        .unwrap()
    }

    fn header<'a>(headers: &'a Headers, name: &str) -> &'a str {
        headers
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.as_str())
            .unwrap_or_else(|| panic!("no {name} in {headers:?}"))
    }

    #[test]
    fn allowed_decision_continues_with_rate_headers() {
        let (verdict, counted, _) =
            verdict_for_reply(&config(""), Some("200"), &reply(true, 4), None).unwrap();
        let Verdict::Continue {
            response_headers,
            leases,
            ..
        } = verdict
        else {
            panic!("{verdict:?}")
        };
        assert_eq!(counted, Counted::Allowed);
        assert_eq!(header(&response_headers, "x-ratelimit-limit"), "5");
        assert_eq!(header(&response_headers, "x-ratelimit-remaining"), "4");
        assert_eq!(header(&response_headers, "x-ratelimit-reset"), "2");
        assert_eq!(
            header(&response_headers, "ratelimit-policy"),
            r#""per-ip";q=5;w=2"#
        );
        assert_eq!(
            header(&response_headers, "ratelimit"),
            r#""per-ip";r=4;t=2"#
        );
        assert!(leases.is_empty());
    }

    #[test]
    fn header_style_is_configurable() {
        for (style, legacy, ietf) in [
            ("legacy", true, false),
            ("ietf", false, true),
            ("both", true, true),
        ] {
            let config = config(&format!(r#","headers":"{style}""#));
            let (verdict, _) = verdict_for_decision(&config, &decision(true, 3), None);
            let Verdict::Continue {
                response_headers, ..
            } = verdict
            else {
                panic!("{verdict:?}")
            };
            let has = |name: &str| response_headers.iter().any(|(n, _)| *n == name);
            assert_eq!(has("x-ratelimit-limit"), legacy, "{style}");
            assert_eq!(has("ratelimit"), ietf, "{style}");
            assert_eq!(has("ratelimit-policy"), ietf, "{style}");
        }
    }

    #[test]
    fn every_applied_policy_is_listed_in_the_ietf_fields() {
        let mut both = decision(true, 1);
        both.others = vec![PolicyStatus {
            limit: 100,
            window_ms: 60_000,
            ..status("daily", 90, true)
        }];
        let (verdict, _) = verdict_for_decision(&config(""), &both, None);
        let Verdict::Continue {
            response_headers, ..
        } = verdict
        else {
            panic!("{verdict:?}")
        };
        assert_eq!(
            header(&response_headers, "ratelimit-policy"),
            r#""per-ip";q=5;w=2, "daily";q=100;w=60"#
        );
        assert_eq!(
            header(&response_headers, "ratelimit"),
            r#""per-ip";r=1;t=2, "daily";r=90;t=2"#
        );
        assert_eq!(header(&response_headers, "x-ratelimit-remaining"), "1");
    }

    #[test]
    fn denied_decision_replies_429_with_retry_after_json_and_request_id() {
        let (verdict, counted, _) =
            verdict_for_reply(&config(""), Some("200"), &reply(false, 0), Some("req-7")).unwrap();
        let Verdict::Reply {
            status,
            headers,
            body,
            kind,
            message,
            retry_after_ms,
        } = verdict
        else {
            panic!("{verdict:?}")
        };
        assert_eq!(counted, Counted::Limited);
        assert_eq!(status, 429);
        assert_eq!(kind, ReplyKind::RateLimited);
        assert_eq!(message, "rate limit `per-ip` exceeded, retry in 2 s");
        assert_eq!(retry_after_ms, Some(1_500));
        assert_eq!(header(&headers, "retry-after"), "2");
        assert_eq!(header(&headers, "x-ratelimit-remaining"), "0");
        assert_eq!(header(&headers, "ratelimit"), r#""per-ip";r=0;t=2"#);
        let body: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(body["error"], "rate_limited");
        assert_eq!(body["policy"], "per-ip");
        assert_eq!(body["retry_after"], 2);
        assert_eq!(body["request_id"], "req-7");
    }

    #[test]
    fn shadow_mode_lets_denials_through_with_headers() {
        let (verdict, counted) =
            verdict_for_decision(&config(r#","shadow":true"#), &decision(false, 0), None);
        assert_eq!(counted, Counted::ShadowLimited);
        let Verdict::Continue {
            response_headers, ..
        } = verdict
        else {
            panic!("{verdict:?}")
        };
        assert_eq!(header(&response_headers, "x-ratelimit-remaining"), "0");
        // A rule in shadow: the controller allowed, and says the rule would have denied.
        let mut shadow_rule = decision(true, 0);
        shadow_rule.shadow_denied = true;
        let (verdict, counted) = verdict_for_decision(&config(""), &shadow_rule, None);
        assert_eq!(counted, Counted::ShadowLimited);
        assert!(matches!(verdict, Verdict::Continue { .. }));
    }

    #[test]
    fn no_policy_continues_without_headers() {
        let body = serde_json::to_vec(&CheckResponse {
            decisions: vec![Decision::unlimited()],
        })
        .unwrap();
        let (verdict, counted, _) =
            verdict_for_reply(&config(""), Some("200"), &body, None).unwrap();
        assert_eq!(verdict, Verdict::pass());
        assert_eq!(counted, Counted::Allowed);
    }

    #[test]
    fn every_kind_of_bad_reply_is_a_failure_and_takes_the_failure_mode() {
        let two = serde_json::to_vec(&CheckResponse {
            decisions: vec![Decision::unlimited(), Decision::unlimited()],
        })
        .unwrap();
        let cases: [(Option<&str>, &[u8]); 6] = [
            (Some("503"), b""),
            (Some("504"), b"upstream request timeout"),
            (Some("500"), br#"{"error":"store_unavailable"}"#),
            (None, b""),
            (Some("200"), b"{not json"),
            (Some("200"), &two),
        ];
        for (status, body) in cases {
            let outcome = verdict_for_reply(&config(""), status, body, None);
            assert!(outcome.is_err(), "{status:?} {body:?}: {outcome:?}");
        }
        assert_eq!(verdict_for_failure(FailureMode::Allow), Verdict::pass());
        let Verdict::Reply { status, body, .. } = verdict_for_failure(FailureMode::Deny) else {
            panic!("deny mode refuses")
        };
        assert_eq!(status, 503);
        assert!(body.contains("rate_limiter_unavailable"), "{body}");
    }

    #[test]
    fn the_check_carries_every_identity_and_drops_the_query_string() {
        let identity = Identity {
            client: ClientId::ip("10.0.0.1"),
            ip: Some("10.0.0.1".parse().unwrap()),
            counted_ip: "10.0.0.1".into(),
            user: Some("ann".into()),
            tier: Some("gold".into()),
            api_key: Some("ab".into()),
            invalid_token: false,
        };
        let check = check_for(&identity, "h", "GET", "/a/b?token=secret", 3);
        assert_eq!(check.path, "/a/b");
        assert_eq!(check.cost, 3);
        assert_eq!(check.ip.as_deref(), Some("10.0.0.1"));
        assert_eq!(check.user.as_deref(), Some("ann"));
        assert_eq!(check.tier.as_deref(), Some("gold"));
        assert_eq!(check.api_key.as_deref(), Some("ab"));
    }

    #[test]
    fn leases_of_an_admitted_request_are_kept_for_its_release() {
        let mut response: CheckResponse = serde_json::from_slice(&reply(true, 3)).unwrap();
        response.decisions[0].leases = vec!["lease-a".into()];
        let body = serde_json::to_vec(&response).unwrap();
        let (verdict, _, _) = verdict_for_reply(&config(""), Some("200"), &body, None).unwrap();
        let Verdict::Continue { leases, .. } = verdict else {
            panic!("{verdict:?}")
        };
        assert_eq!(leases, ["lease-a"]);
        let release: ReleaseRequest =
            serde_json::from_slice(&release_request(&leases, &[], &[])).unwrap();
        assert_eq!(release.leases, ["lease-a"]);
    }

    #[test]
    fn local_replies_are_json_with_their_status() {
        let Verdict::Reply {
            status,
            headers,
            body,
            kind,
            message,
            ..
        } = token_rejected(&TokenError::Expired, Some("r1"))
        else {
            panic!()
        };
        assert_eq!(status, 401);
        assert_eq!(kind, ReplyKind::InvalidToken);
        assert_eq!(message, format!("invalid token: {}", TokenError::Expired));
        assert_eq!(
            header(&headers, "www-authenticate"),
            r#"Bearer error="invalid_token""#
        );
        let body: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(body["error"], "invalid_token");
        assert_eq!(body["request_id"], "r1");
        let Verdict::Reply { status, body, .. } = denylisted(None) else {
            panic!()
        };
        assert_eq!(status, 403);
        assert_eq!(
            serde_json::from_str::<serde_json::Value>(&body).unwrap()["error"],
            "forbidden"
        );
        let shown = crate::denial::Shown {
            policy: status_with_retry(700),
            others: Vec::new(),
        };
        let cached = cached_denial(HeaderStyle::Both, &shown, None);
        let Verdict::Reply {
            status, headers, ..
        } = cached
        else {
            panic!()
        };
        assert_eq!(status, 429);
        assert_eq!(header(&headers, "retry-after"), "1");
    }

    fn status_with_retry(retry_after_ms: u64) -> PolicyStatus {
        PolicyStatus {
            retry_after_ms,
            ..status("per-ip", 0, false)
        }
    }

    #[test]
    fn header_cost_is_a_bounded_positive_number() {
        assert_eq!(cost_from_header(None), 1);
        assert_eq!(cost_from_header(Some("5")), 5);
        assert_eq!(cost_from_header(Some(" 7 ")), 7);
        assert_eq!(
            cost_from_header(Some("0")),
            1,
            "a header cannot make a request free"
        );
        assert_eq!(cost_from_header(Some("-3")), 1);
        assert_eq!(cost_from_header(Some("lots")), 1);
        assert_eq!(cost_from_header(Some("99999999999999999999999")), 1);
        assert_eq!(cost_from_header(Some("5000000")), MAX_HEADER_COST);
    }

    #[test]
    fn paths_are_normalised_before_anything_matches_them() {
        let cases = [
            ("/stats/../x", "/x"),
            ("/stats/%2e%2e/x", "/x"),
            ("/stats/%2E%2e/x", "/x"),
            ("/stats/.%2e/x", "/x"),
            ("/stats/%2e/x", "/stats/x"),
            ("//stats//x", "/stats/x"),
            ("/a/./b", "/a/b"),
            ("/..", "/"),
            ("/../../x", "/x"),
            ("/a/b/..", "/a/"),
            ("/a/b/.", "/a/b/"),
            ("/a/b/../../../c", "/c"),
            // Slashes merge before dot segments resolve, as nginx and Go read them.
            ("/stats//../x", "/x"),
            ("/stats/../x?next=/stats/", "/x"),
            ("/items?q=/../", "/items"),
            // Unreserved characters are decoded once; every other escape stays as sent.
            ("/%61pi/%7Euser", "/api/~user"),
            ("/stats%2F..%2Fx", "/stats%2F..%2Fx"),
            ("/stats/%252e%252e/x", "/stats/%252e%252e/x"),
            ("/a%2", "/a%2"),
            ("/a%zz/..", "/"),
            ("/p/%%/x", "/p/%%/x"),
            // As Envoy writes it: decoding never makes a new escape.
            ("/stats/%%32e%%32e/x", "/stats/%252e%252e/x"),
            ("/%4%31", "/%2541"),
            ("/caf\u{e9}/../b", "/b"),
            ("/", "/"),
            ("", ""),
            ("*", "*"),
            ("/already/normal", "/already/normal"),
        ];
        for (raw, normal) in cases {
            assert_eq!(normalized_path(raw), normal, "{raw}");
        }
        let exempt = sluice_protocol::rules::PathPattern::new("/stats/**");
        for sneaky in [
            "/stats/../api/x",
            "/stats/%2e%2e/api/x",
            "/stats/./../api/x",
        ] {
            assert!(!exempt.matches(&normalized_path(sneaky)), "{sneaky}");
        }
        assert!(exempt.matches(&normalized_path("//stats//server_info")));
    }

    proptest::proptest! {
        #[test]
        fn normalising_anything_is_idempotent_and_bounding_it_never_panics(
            path in "(/|%|[0-9a-fA-F]|\\.|\\?|[^/%?]){0,40}"
        ) {
            let once = normalized_path(&path).into_owned();
            proptest::prop_assert_eq!(normalized_path(&once), once.as_str(), "{}", path);
            let _ = bounded_path(&path);
            let _ = bounded_field(&path);
        }

        #[test]
        fn normalising_is_idempotent_and_leaves_no_dot_or_empty_segment(
            path in "/[a-z./%2eE]{0,24}"
        ) {
            let once = normalized_path(&path).into_owned();
            proptest::prop_assert_eq!(normalized_path(&once), once.as_str());
            proptest::prop_assert!(!once.contains("//"), "{once}");
            proptest::prop_assert!(
                !once.split('/').any(|s| s == "." || s == ".."),
                "{}", once
            );
            proptest::prop_assert!(once.starts_with('/'), "{once}");
        }
    }

    #[test]
    fn fields_are_cut_at_character_boundaries() {
        assert_eq!(bounded_field("GET"), "GET");
        let long = "\u{e9}".repeat(MAX_REQUEST_FIELD_BYTES);
        let cut = bounded_field(&long);
        assert!(cut.len() <= MAX_REQUEST_FIELD_BYTES && cut.len() >= MAX_REQUEST_FIELD_BYTES - 1);
        assert!(long.starts_with(cut));
    }

    #[test]
    fn a_long_path_keeps_its_ends_and_still_meets_the_rules_that_name_them() {
        use sluice_protocol::rules::glob_matches;
        assert_eq!(bounded_path("/short"), "/short");
        let middle = "x".repeat(2 * MAX_REQUEST_FIELD_BYTES);
        let path = format!("/api/v1/files/{middle}.json/export");
        let cut = bounded_path(&path);
        assert!(cut.len() <= MAX_REQUEST_FIELD_BYTES, "{}", cut.len());
        assert!(cut.starts_with("/api/v1/files/xxx") && cut.ends_with("xxx.json/export"));
        for glob in [
            "/api/**",
            "/api/**/export",
            "/api/*/files/*/export",
            "/**.json/export",
        ] {
            assert!(glob_matches(glob.as_bytes(), path.as_bytes()), "{glob}");
            assert!(glob_matches(glob.as_bytes(), cut.as_bytes()), "{glob}");
        }
        // What the cut can change is the other way: a `/` in the dropped middle is gone, so
        // a cut path may meet a rule the whole one did not (counted more, never less).
        let slashes = format!("/api/{middle}/{middle}/export");
        assert!(!glob_matches(b"/api/*/export", slashes.as_bytes()));
        assert!(glob_matches(
            b"/api/*/export",
            bounded_path(&slashes).as_bytes()
        ));
        // Multi-byte characters are never split.
        let wide = format!("/{}", "\u{e9}".repeat(MAX_REQUEST_FIELD_BYTES));
        let cut = bounded_path(&wide);
        assert!(cut.len() <= MAX_REQUEST_FIELD_BYTES);
        assert!(cut.chars().skip(1).all(|c| c == '\u{e9}'));
        // The check carries the cut path, host and method.
        let identity = Identity {
            client: sluice_protocol::ClientId::ip("10.0.0.1"),
            ip: None,
            counted_ip: "10.0.0.1".into(),
            user: None,
            tier: None,
            api_key: None,
            invalid_token: false,
        };
        let host = "h".repeat(MAX_REQUEST_FIELD_BYTES + 1);
        let check = check_for(&identity, &host, &host, &path, 1);
        assert_eq!(check.path, cut_of(&path));
        assert_eq!(check.host.len(), MAX_REQUEST_FIELD_BYTES);
        assert_eq!(check.method.len(), MAX_METHOD_BYTES);
    }

    fn cut_of(path: &str) -> String {
        bounded_path(path).into_owned()
    }
}
