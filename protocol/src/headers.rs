//! How a decision is shown to the client: the legacy `X-RateLimit-*` headers, the IETF
//! `RateLimit-Policy` and `RateLimit` fields (draft-ietf-httpapi-ratelimit-headers-11),
//! `Retry-After` and the JSON body of a 429. Both the filter (which writes them) and tests
//! (which read them) use these functions, so the format is defined once.

use serde::{Deserialize, Serialize};

use crate::check::{DenyReason, PolicyStatus};
use crate::rules::Strategy;

pub const LIMIT: &str = "x-ratelimit-limit";
pub const REMAINING: &str = "x-ratelimit-remaining";
pub const RESET: &str = "x-ratelimit-reset";
pub const RETRY_AFTER: &str = "retry-after";
pub const RATELIMIT_POLICY: &str = "ratelimit-policy";
pub const RATELIMIT: &str = "ratelimit";

/// Which rate-limit headers clients are sent.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HeaderStyle {
    /// `X-RateLimit-Limit`, `-Remaining`, `-Reset`, for the most restrictive limit.
    Legacy,
    /// `RateLimit-Policy` and `RateLimit`, one entry per limit that applied.
    Ietf,
    /// Both.
    #[default]
    Both,
}

impl HeaderStyle {
    pub fn legacy(self) -> bool {
        matches!(self, HeaderStyle::Legacy | HeaderStyle::Both)
    }

    pub fn ietf(self) -> bool {
        matches!(self, HeaderStyle::Ietf | HeaderStyle::Both)
    }
}

/// A Structured Field string (RFC 9651 §3.3.3): quoted, with `"` and `\` escaped and
/// anything outside printable ASCII dropped.
#[cfg(test)]
fn sf_string(text: &str) -> String {
    let mut out = String::new();
    push_sf_string(&mut out, text);
    out
}

/// Appends `text` to `out` as a Structured Field string (see [`sf_string`]).
fn push_sf_string(out: &mut String, text: &str) {
    out.reserve(text.len() + 2);
    out.push('"');
    for c in text.chars().filter(|c| (' '..='~').contains(c)) {
        if c == '"' || c == '\\' {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('"');
}

/// One list member per policy, `, ` between them, each written by `member` straight into
/// the field (the headers are built for every request: no string per member, no join).
fn sf_list<'a>(
    policies: impl IntoIterator<Item = &'a PolicyStatus>,
    member: impl Fn(&mut String, &PolicyStatus) -> std::fmt::Result,
) -> String {
    let mut out = String::with_capacity(48);
    for (index, policy) in policies.into_iter().enumerate() {
        if index > 0 {
            out.push_str(", ");
        }
        push_sf_string(&mut out, &policy.rule);
        // Writing to a String cannot fail.
        let _ = member(&mut out, policy);
    }
    out
}

/// `RateLimit-Policy`: each limit's quota `q` and window `w` in seconds (at least 1), with
/// the quota unit `qu` where it is not requests: `"per-ip";q=100;w=60`.
pub fn ratelimit_policy<'a>(policies: impl IntoIterator<Item = &'a PolicyStatus>) -> String {
    use std::fmt::Write;
    sf_list(policies, |out, policy| {
        write!(
            out,
            ";q={};w={}",
            policy.limit,
            ceil_seconds(policy.window_ms).max(1)
        )?;
        if policy.strategy == Strategy::Concurrency {
            out.push_str(";qu=\"concurrent-requests\"");
        }
        Ok(())
    })
}

/// `RateLimit`: each limit's remaining quota `r` and seconds `t` until it is whole again:
/// `"per-ip";r=42;t=17`.
pub fn ratelimit<'a>(policies: impl IntoIterator<Item = &'a PolicyStatus>) -> String {
    use std::fmt::Write;
    sf_list(policies, |out, policy| {
        write!(
            out,
            ";r={};t={}",
            policy.remaining,
            ceil_seconds(policy.reset_ms)
        )
    })
}

/// The rate-limit headers of a decision in `style`: `speaking` is the limit the legacy
/// headers describe, `all` every limit that applied (the speaking one included).
pub fn for_policies<'a>(
    style: HeaderStyle,
    speaking: &PolicyStatus,
    all: impl Iterator<Item = &'a PolicyStatus> + Clone,
) -> Vec<(&'static str, String)> {
    let mut headers = Vec::with_capacity(5);
    if style.legacy() {
        headers.extend(rate_limit_headers(speaking));
    }
    if style.ietf() {
        headers.push((RATELIMIT_POLICY, ratelimit_policy(all.clone())));
        headers.push((RATELIMIT, ratelimit(all)));
    }
    headers
}

/// Whole seconds, rounded up: a client told to come back after 0 seconds when 300 ms remain
/// would only be denied again.
pub fn ceil_seconds(ms: u64) -> u64 {
    ms.div_ceil(1_000)
}

/// `X-RateLimit-Limit`, `-Remaining` and `-Reset` (seconds until the quota is whole again).
pub fn rate_limit_headers(policy: &PolicyStatus) -> [(&'static str, String); 3] {
    [
        (LIMIT, policy.limit.to_string()),
        (REMAINING, policy.remaining.to_string()),
        (RESET, ceil_seconds(policy.reset_ms).to_string()),
    ]
}

/// Seconds for `Retry-After` on a denial; at least 1, as `0` invites an immediate retry.
pub fn retry_after_seconds(policy: &PolicyStatus) -> u64 {
    ceil_seconds(policy.retry_after_ms).max(1)
}

/// The JSON body of a 429.
#[derive(Debug, Serialize)]
pub struct DeniedBody<'a> {
    pub error: &'static str,
    pub message: String,
    pub policy: &'a str,
    /// What `limit` and `remaining` count: `requests`, or `usage` (the units responses
    /// report, such as an LLM's tokens).
    pub unit: &'static str,
    pub limit: u64,
    pub remaining: u64,
    pub reset: u64,
    pub retry_after: u64,
    /// Envoy's `x-request-id`, when the request has one: the key to find it in the logs.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub request_id: Option<&'a str>,
}

pub fn denied_body<'a>(policy: &'a PolicyStatus, request_id: Option<&'a str>) -> DeniedBody<'a> {
    let retry_after = retry_after_seconds(policy);
    let rule = &policy.rule;
    let limit = policy.limit;
    let message = match (policy.reason, policy.usage) {
        (None, false) => {
            format!("Rate limit `{rule}` exceeded: {limit} requests allowed; retry in {retry_after} s.")
        }
        (None, true) => format!(
            "Usage budget `{rule}` is spent: {limit} units per {} s, as responses report them, \
             with each request in flight holding its reservation; retry in {retry_after} s.",
            ceil_seconds(policy.window_ms).max(1)
        ),
        (Some(DenyReason::LimitZero), _) => {
            format!("Rate limit `{rule}` admits no requests at the moment.")
        }
        (Some(DenyReason::CostExceedsCapacity), false) => format!(
            "This request costs more than rate limit `{rule}` can ever admit ({limit}); it will not pass."
        ),
        (Some(DenyReason::CostExceedsCapacity), true) => format!(
            "This request reserves more than usage budget `{rule}` can ever hold ({limit} units); \
             it will not pass."
        ),
        (Some(DenyReason::CoolDown), _) => format!(
            "Rate limit `{rule}` was exceeded again and again: this client is cooling down; \
             retry in {retry_after} s."
        ),
    };
    DeniedBody {
        error: "rate_limited",
        message,
        policy: &policy.rule,
        unit: if policy.usage { "usage" } else { "requests" },
        limit: policy.limit,
        remaining: policy.remaining,
        reset: ceil_seconds(policy.reset_ms),
        retry_after,
        request_id,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rules::Strategy;

    fn policy(remaining: u64, reset_ms: u64, retry_after_ms: u64) -> PolicyStatus {
        PolicyStatus {
            rule: "per-ip".into(),
            strategy: Strategy::FixedWindow,
            limit: 10,
            remaining,
            reset_ms,
            retry_after_ms,
            window_ms: 60_000,
            delay_ms: 0,
            reason: None,
            usage: false,
        }
    }

    #[test]
    fn headers_round_reset_up_to_whole_seconds() {
        let headers = rate_limit_headers(&policy(3, 1_001, 0));
        assert_eq!(
            headers,
            [
                (LIMIT, "10".to_owned()),
                (REMAINING, "3".to_owned()),
                (RESET, "2".to_owned())
            ]
        );
    }

    #[test]
    fn retry_after_is_never_zero() {
        assert_eq!(retry_after_seconds(&policy(0, 10, 10)), 1);
        assert_eq!(retry_after_seconds(&policy(0, 4_500, 4_500)), 5);
    }

    #[test]
    fn denied_body_carries_every_field() {
        let body =
            serde_json::to_value(denied_body(&policy(0, 2_500, 2_500), Some("req-1"))).unwrap();
        assert_eq!(body["request_id"], "req-1");
        assert_eq!(body["error"], "rate_limited");
        assert_eq!(body["policy"], "per-ip");
        assert_eq!(body["limit"], 10);
        assert_eq!(body["remaining"], 0);
        assert_eq!(body["reset"], 3);
        assert_eq!(body["retry_after"], 3);
        assert!(body["message"].as_str().unwrap().contains("per-ip"));
        let body = serde_json::to_value(denied_body(&policy(0, 1, 1), None)).unwrap();
        assert!(body.get("request_id").is_none());
        assert_eq!(body["unit"], "requests");
        assert!(body["message"]
            .as_str()
            .unwrap()
            .contains("10 requests allowed"));
    }

    #[test]
    fn a_spent_usage_budget_is_told_in_units_not_requests() {
        let spent = PolicyStatus {
            usage: true,
            limit: 100_000,
            remaining: 120,
            ..policy(120, 30_000, 30_000)
        };
        let body = serde_json::to_value(denied_body(&spent, None)).unwrap();
        assert_eq!(body["unit"], "usage");
        assert_eq!(body["remaining"], 120);
        assert_eq!(
            body["message"],
            "Usage budget `per-ip` is spent: 100000 units per 60 s, as responses report them, \
             with each request in flight holding its reservation; retry in 30 s."
        );
        let too_big = PolicyStatus {
            reason: Some(DenyReason::CostExceedsCapacity),
            ..spent
        };
        let body = serde_json::to_value(denied_body(&too_big, None)).unwrap();
        assert!(
            body["message"]
                .as_str()
                .unwrap()
                .contains("reserves more than usage budget"),
            "{body}"
        );
    }

    fn named(
        rule: &str,
        limit: u64,
        window_ms: u64,
        remaining: u64,
        reset_ms: u64,
    ) -> PolicyStatus {
        PolicyStatus {
            rule: rule.into(),
            limit,
            remaining,
            reset_ms,
            window_ms,
            ..policy(0, 0, 0)
        }
    }

    /// The draft's own examples (draft-ietf-httpapi-ratelimit-headers-11, §3 and §4):
    /// `RateLimit-Policy: "default";q=100;w=10` with `RateLimit: "default";r=50;t=30`, and a
    /// list of two policies.
    #[test]
    fn ietf_fields_match_the_drafts_examples() {
        let default = named("default", 100, 10_000, 50, 30_000);
        assert_eq!(ratelimit_policy([&default]), r#""default";q=100;w=10"#);
        assert_eq!(ratelimit([&default]), r#""default";r=50;t=30"#);
        let burst = named("burst", 100, 60_000, 0, 0);
        let daily = named("daily", 1_000, 86_400_000, 0, 0);
        assert_eq!(
            ratelimit_policy([&burst, &daily]),
            r#""burst";q=100;w=60, "daily";q=1000;w=86400"#
        );
    }

    #[test]
    fn ietf_fields_round_windows_up_and_name_concurrency_units() {
        let short = named("short", 5, 500, 4, 1);
        assert_eq!(ratelimit_policy([&short]), r#""short";q=5;w=1"#);
        assert_eq!(ratelimit([&short]), r#""short";r=4;t=1"#);
        let slots = PolicyStatus {
            strategy: Strategy::Concurrency,
            ..named("slots", 3, 60_000, 2, 0)
        };
        assert_eq!(
            ratelimit_policy([&slots]),
            r#""slots";q=3;w=60;qu="concurrent-requests""#
        );
    }

    #[test]
    fn structured_strings_are_escaped() {
        assert_eq!(sf_string(r#"a"b\c"#), r#""a\"b\\c""#);
        assert_eq!(sf_string("tab\there"), r#""tabhere""#);
    }

    #[test]
    fn header_style_picks_the_fields() {
        let one = named("one", 10, 1_000, 3, 500);
        let two = named("two", 20, 1_000, 9, 500);
        let names = |style| {
            for_policies(style, &one, [&one, &two].into_iter())
                .into_iter()
                .map(|(name, _)| name)
                .collect::<Vec<_>>()
        };
        assert_eq!(names(HeaderStyle::Legacy), [LIMIT, REMAINING, RESET]);
        assert_eq!(names(HeaderStyle::Ietf), [RATELIMIT_POLICY, RATELIMIT]);
        assert_eq!(names(HeaderStyle::Both).len(), 5);
        let ietf = for_policies(HeaderStyle::Ietf, &one, [&one, &two].into_iter());
        assert_eq!(ietf[1].1, r#""one";r=3;t=1, "two";r=9;t=1"#);
    }
}
