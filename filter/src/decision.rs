//! Turning the controller's reply (or its absence) into what happens to the request.
//! No host calls here: the host glue feeds in what Envoy reported and carries out the
//! [`Verdict`].

use sluice_protocol::headers::{self, HeaderStyle, RETRY_AFTER};
use sluice_protocol::{Check, CheckResponse, Decision, PolicyStatus, Refusal, ReleaseRequest};

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

/// The check to send for a request of `identity`.
pub fn check_for(identity: &Identity, host: &str, method: &str, path: &str, cost: u64) -> Check {
    Check {
        ip: Some(identity.counted_ip.clone()),
        user: identity.user.clone(),
        api_key: identity.api_key.clone(),
        tier: identity.tier.clone(),
        ..Check::new(identity.client.clone(), host, method, path_only(path), cost)
    }
}

/// The path without its query string: the query does not choose a rule, and leaving it
/// out keeps it out of the controller.
pub fn path_only(path: &str) -> &str {
    path.split_once('?').map_or(path, |(path, _query)| path)
}

/// The body of the release call for `leases`.
pub fn release_request(leases: Vec<String>) -> Vec<u8> {
    serde_json::to_vec(&ReleaseRequest { leases }).unwrap_or_default()
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
    policy: &PolicyStatus,
    request_id: Option<&str>,
) -> Verdict {
    let rate_headers = headers::for_policies(style, policy, std::iter::once(policy));
    too_many_requests(rate_headers, policy, request_id)
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
    use sluice_protocol::{ClientId, Strategy};

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
        let release: ReleaseRequest = serde_json::from_slice(&release_request(leases)).unwrap();
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
        let cached = cached_denial(HeaderStyle::Both, &status_with_retry(700), None);
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
}
