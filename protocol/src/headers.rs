//! How a decision is shown to the client: `X-RateLimit-*` headers, `Retry-After` and the
//! JSON body of a 429. Both the filter (which writes them) and tests (which read them) use
//! these functions, so the format is defined once.

use serde::Serialize;

use crate::check::{DenyReason, PolicyStatus};

pub const LIMIT: &str = "x-ratelimit-limit";
pub const REMAINING: &str = "x-ratelimit-remaining";
pub const RESET: &str = "x-ratelimit-reset";
pub const RETRY_AFTER: &str = "retry-after";

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
    pub limit: u64,
    pub remaining: u64,
    pub reset: u64,
    pub retry_after: u64,
}

pub fn denied_body(policy: &PolicyStatus) -> DeniedBody<'_> {
    let retry_after = retry_after_seconds(policy);
    DeniedBody {
        error: "rate_limited",
        message: match policy.reason {
            None => format!(
                "Rate limit `{}` exceeded: {} requests allowed; retry in {retry_after} s.",
                policy.rule, policy.limit
            ),
            Some(DenyReason::LimitZero) => {
                format!("Rate limit `{}` admits no requests at the moment.", policy.rule)
            }
            Some(DenyReason::CostExceedsCapacity) => format!(
                "This request costs more than rate limit `{}` can ever admit ({}); it will not pass.",
                policy.rule, policy.limit
            ),
        },
        policy: &policy.rule,
        limit: policy.limit,
        remaining: policy.remaining,
        reset: ceil_seconds(policy.reset_ms),
        retry_after,
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
        let body = serde_json::to_value(denied_body(&policy(0, 2_500, 2_500))).unwrap();
        assert_eq!(body["error"], "rate_limited");
        assert_eq!(body["policy"], "per-ip");
        assert_eq!(body["limit"], 10);
        assert_eq!(body["remaining"], 0);
        assert_eq!(body["reset"], 3);
        assert_eq!(body["retry_after"], 3);
        assert!(body["message"].as_str().unwrap().contains("per-ip"));
    }
}
