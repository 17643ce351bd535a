//! Turning the controller's reply (or its absence) into what happens to the request.
//! No host calls here: the host glue feeds in what Envoy reported and carries out the
//! [`Verdict`].

use sluice_protocol::headers::{self, RETRY_AFTER};
use sluice_protocol::{Check, CheckRequest, CheckResponse, ClientId, Decision, ReleaseRequest};

use crate::config::{FailureMode, FilterConfig};

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
    /// Answer the client directly.
    Reply {
        status: u32,
        headers: Headers,
        body: String,
    },
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

/// The check to send for a request.
pub fn check_request(
    client: ClientId,
    host: &str,
    method: &str,
    path: &str,
    cost: u64,
) -> CheckRequest {
    // The query string does not choose a rule; leaving it out keeps it out of the controller.
    let path = path.split_once('?').map_or(path, |(path, _query)| path);
    CheckRequest {
        checks: vec![Check {
            client,
            host: host.to_owned(),
            method: method.to_owned(),
            path: path.to_owned(),
            cost,
        }],
        hold_delays: true,
    }
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
) -> Result<Verdict, (Failure, Verdict)> {
    match decisions_from_reply(status, body, 1) {
        Ok(decisions) => match decisions.first() {
            Some(decision) => Ok(verdict_for_decision(decision)),
            None => Err((
                Failure::MalformedReply("no decision".into()),
                verdict_for_failure(config),
            )),
        },
        Err(failure) => Err((failure, verdict_for_failure(config))),
    }
}

pub fn verdict_for_decision(decision: &Decision) -> Verdict {
    let Some(policy) = &decision.policy else {
        return Verdict::Continue {
            response_headers: Vec::new(),
            leases: decision.leases.clone(),
            delay_ms: 0,
        };
    };
    let mut rate_headers: Headers = headers::rate_limit_headers(policy).into();
    if decision.allowed {
        return Verdict::Continue {
            response_headers: rate_headers,
            leases: decision.leases.clone(),
            delay_ms: policy.delay_ms,
        };
    }
    rate_headers.push((
        RETRY_AFTER,
        headers::retry_after_seconds(policy).to_string(),
    ));
    rate_headers.push(("content-type", "application/json".to_owned()));
    let body = serde_json::to_string(&headers::denied_body(policy))
        .unwrap_or_else(|_| String::from(r#"{"error":"rate_limited"}"#));
    Verdict::Reply {
        status: 429,
        headers: rate_headers,
        body,
    }
}

/// What the failure mode says to do when there is no decision.
pub fn verdict_for_failure(config: &FilterConfig) -> Verdict {
    match config.failure_mode {
        FailureMode::Allow => Verdict::Continue {
            response_headers: Vec::new(),
            leases: Vec::new(),
            delay_ms: 0,
        },
        FailureMode::Deny => Verdict::Reply {
            status: 503,
            headers: vec![
                (RETRY_AFTER, "1".to_owned()),
                ("content-type", "application/json".to_owned()),
            ],
            body: String::from(
                r#"{"error":"rate_limiter_unavailable","message":"The rate limiter could not be reached; the request was refused (failure mode deny)."}"#,
            ),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_protocol::{PolicyStatus, Strategy};
    use std::time::Duration;

    fn config(failure_mode: FailureMode) -> FilterConfig {
        FilterConfig {
            controller_cluster: "c".into(),
            controller_authority: "c".into(),
            timeout: Duration::from_millis(100),
            failure_mode,
            cost_header: None,
            batching: false,
            max_batch_size: 1,
        }
    }

    fn reply(allowed: bool, remaining: u64) -> Vec<u8> {
        serde_json::to_vec(&CheckResponse {
            decisions: vec![Decision {
                allowed,
                policy: Some(PolicyStatus {
                    rule: "per-ip".into(),
                    strategy: Strategy::FixedWindow,
                    limit: 5,
                    remaining,
                    reset_ms: 1_500,
                    retry_after_ms: if allowed { 0 } else { 1_500 },
                    window_ms: 2_000,
                    delay_ms: 0,
                    reason: None,
                }),
                leases: vec![],
            }],
        })
        .unwrap()
    }

    fn header<'a>(headers: &'a Headers, name: &str) -> &'a str {
        headers
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.as_str())
            .unwrap()
    }

    #[test]
    fn allowed_decision_continues_with_rate_headers() {
        let verdict = verdict_for_reply(&config(FailureMode::Deny), Some("200"), &reply(true, 4));
        let Ok(Verdict::Continue {
            response_headers,
            leases,
            ..
        }) = verdict
        else {
            panic!("{verdict:?}")
        };
        assert_eq!(header(&response_headers, "x-ratelimit-limit"), "5");
        assert_eq!(header(&response_headers, "x-ratelimit-remaining"), "4");
        assert_eq!(header(&response_headers, "x-ratelimit-reset"), "2");
        assert!(leases.is_empty());
    }

    #[test]
    fn denied_decision_replies_429_with_retry_after_and_json() {
        let verdict = verdict_for_reply(&config(FailureMode::Allow), Some("200"), &reply(false, 0));
        let Ok(Verdict::Reply {
            status,
            headers,
            body,
        }) = verdict
        else {
            panic!("{verdict:?}")
        };
        assert_eq!(status, 429);
        assert_eq!(header(&headers, "retry-after"), "2");
        assert_eq!(header(&headers, "x-ratelimit-remaining"), "0");
        let body: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(body["error"], "rate_limited");
        assert_eq!(body["retry_after"], 2);
    }

    #[test]
    fn no_policy_continues_without_headers() {
        let body = serde_json::to_vec(&CheckResponse {
            decisions: vec![Decision::unlimited()],
        })
        .unwrap();
        let verdict = verdict_for_reply(&config(FailureMode::Deny), Some("200"), &body);
        assert_eq!(
            verdict,
            Ok(Verdict::Continue {
                response_headers: vec![],
                leases: vec![],
                delay_ms: 0,
            })
        );
    }

    #[test]
    fn every_kind_of_bad_reply_takes_the_failure_mode() {
        let two = serde_json::to_vec(&CheckResponse {
            decisions: vec![Decision::unlimited(), Decision::unlimited()],
        })
        .unwrap();
        let cases: [(Option<&str>, &[u8]); 5] = [
            (Some("503"), b""),
            (Some("504"), b"upstream request timeout"),
            (None, b""),
            (Some("200"), b"{not json"),
            (Some("200"), &two),
        ];
        for (status, body) in cases {
            let (failure, verdict) =
                verdict_for_reply(&config(FailureMode::Allow), status, body).unwrap_err();
            assert_eq!(
                verdict,
                Verdict::Continue {
                    response_headers: vec![],
                    leases: vec![],
                    delay_ms: 0,
                },
                "{failure}"
            );
            let (_, verdict) =
                verdict_for_reply(&config(FailureMode::Deny), status, body).unwrap_err();
            assert!(
                matches!(verdict, Verdict::Reply { status: 503, .. }),
                "{failure}"
            );
        }
    }

    #[test]
    fn check_request_drops_the_query_string() {
        let request = check_request(ClientId::ip("10.0.0.1"), "h", "GET", "/a/b?token=secret", 1);
        assert_eq!(request.checks[0].path, "/a/b");
        assert_eq!(request.checks[0].cost, 1);
    }

    #[test]
    fn leases_of_an_admitted_request_are_kept_for_its_release() {
        let mut response: CheckResponse = serde_json::from_slice(&reply(true, 3)).unwrap();
        response.decisions[0].leases = vec!["lease-a".into()];
        let body = serde_json::to_vec(&response).unwrap();
        let verdict = verdict_for_reply(&config(FailureMode::Allow), Some("200"), &body);
        let Ok(Verdict::Continue { leases, .. }) = verdict else {
            panic!("{verdict:?}")
        };
        assert_eq!(leases, ["lease-a"]);
        let release: ReleaseRequest = serde_json::from_slice(&release_request(leases)).unwrap();
        assert_eq!(release.leases, ["lease-a"]);
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
