//! What a filter worker reports once a second, taken as untrusted even from an
//! authenticated proxy: one compromised or buggy proxy must not lock out clients, flip the
//! automatic state or grow the controller's memory.
//!
//! - Every list is bounded in length and every string in size; counts are bounded by what
//!   one worker can see in one reporting period.
//! - Invalid tokens are reported by single address (an IPv6 client by a network of at
//!   least [`MIN_IPV6_PREFIX`] bits), never by a wider network.
//! - Each reporter (a worker, named by the `x-sluice-reporter` header) is counted at most
//!   once per [`REPORT_PERIOD_MS`]; reports past that, and reporters past
//!   [`MAX_REPORTERS_PER_PERIOD`] in one period, are acknowledged and ignored.

use std::collections::HashSet;
use std::net::IpAddr;
use std::sync::{Mutex, PoisonError};

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use ipnet::IpNet;
use sluice_protocol::{
    ClientId, Report, MAX_IDENTITY_BYTES, MAX_REPORTED_ADDRESSES, REPORTER_HEADER,
};

use super::CheckState;
use crate::error::{parse_json, ApiError, Body};

/// Most requests (answers, invalid tokens, cached denials, leased admissions) one report
/// may count in any one of its numbers: more than one Envoy worker serves in a second
/// (about 35,000 requests a second bare, on this project's measurements), with room for a
/// report that was held back a few periods.
pub const MAX_REPORTED_COUNT: u64 = 200_000;

/// Narrowest IPv6 network a report may name (a site's /48): anything wider would let one
/// report block clients it never saw.
pub const MIN_IPV6_PREFIX: u8 = 48;

/// How often one reporter is counted: the filter reports once a second.
pub const REPORT_PERIOD_MS: u64 = 1_000;

/// Most distinct reporters counted in one period (workers of every proxy together).
pub const MAX_REPORTERS_PER_PERIOD: usize = 16_384;

/// Longest reporter name.
const MAX_REPORTER_BYTES: usize = 64;

/// Longest rule or tier name a report may carry.
const MAX_NAME_BYTES: usize = 128;

/// Most request ids one cached-denial entry may carry, and their longest.
const MAX_REQUEST_IDS: usize = 16;
const MAX_REQUEST_ID_BYTES: usize = 128;

/// Who reported in the current period.
#[derive(Debug, Default)]
pub struct Reporters {
    period: Mutex<(u64, HashSet<String>)>,
}

impl Reporters {
    /// Whether `reporter` is counted in the period of `now_ms` (its first report there, and
    /// room left for one more reporter).
    pub fn first_in_period(&self, reporter: &str, now_ms: u64) -> bool {
        let period = now_ms / REPORT_PERIOD_MS;
        let mut current = self.period.lock().unwrap_or_else(PoisonError::into_inner);
        if current.0 != period {
            *current = (period, HashSet::new());
        }
        if current.1.contains(reporter) || current.1.len() >= MAX_REPORTERS_PER_PERIOD {
            return false;
        }
        current.1.insert(reporter.to_owned());
        true
    }
}

/// A filter worker's report of the last second: the upstream's answers feed the automatic
/// system state, invalid tokens by address feed brute-force protection, cached denials
/// and leased admissions the stats. Answered at once; the counting happens elsewhere.
pub async fn report(
    State(state): State<CheckState>,
    headers: HeaderMap,
    Body(body): Body,
) -> Result<StatusCode, ApiError> {
    // Filters older than the header are counted together, as one reporter.
    let reporter = match headers.get(REPORTER_HEADER) {
        None => "",
        Some(value) => value
            .to_str()
            .ok()
            .filter(|name| !name.is_empty() && name.len() <= MAX_REPORTER_BYTES)
            .ok_or_else(|| {
                ApiError::invalid(
                    REPORTER_HEADER,
                    format!("1 to {MAX_REPORTER_BYTES} visible ASCII characters"),
                )
            })?,
    };
    let report: Report = parse_json(&body)?;
    // Everything checked before anything is counted: a refused report changes nothing.
    bounded(&report)?;
    state.metrics.reports.inc();
    let now = crate::store::now_ms();
    if !state.reporters.first_in_period(reporter, now) {
        state.metrics.ignored_reports.inc();
        return Ok(StatusCode::NO_CONTENT);
    }
    state
        .signals
        .report(now, report.responses, report.server_errors);
    for address in &report.invalid_tokens {
        state.guard.strike(&address.ip, address.count);
    }
    let snapshot = state.limiter.config().snapshot();
    for leased in &report.leased {
        // Labels only from the configuration: a rule it does not have counts as `other`.
        let rule = if snapshot
            .rules
            .rules()
            .iter()
            .any(|rule| rule.name == leased.rule)
        {
            leased.rule.as_str()
        } else {
            "other"
        };
        state.metrics.leased_admissions(rule, leased.count);
    }
    if let Some(recorder) = state.limiter.recorder() {
        recorder.record_cached(&snapshot, &report.cached_denials);
        recorder.record_leased(&snapshot, &report.leased);
    }
    Ok(StatusCode::NO_CONTENT)
}

/// Every bound of a report, the first one broken named by its field.
pub fn bounded(report: &Report) -> Result<(), ApiError> {
    at_most("invalid_tokens", "addresses", report.invalid_tokens.len())?;
    at_most("cached_denials", "entries", report.cached_denials.len())?;
    at_most("leased", "entries", report.leased.len())?;
    count("responses", report.responses)?;
    count("server_errors", report.server_errors)?;
    if report.server_errors > report.responses {
        return Err(ApiError::invalid(
            "server_errors",
            "cannot exceed responses (5xx answers are among them)",
        ));
    }
    for (index, address) in report.invalid_tokens.iter().enumerate() {
        let field = format!("invalid_tokens[{index}]");
        single_address(&format!("{field}.ip"), &address.ip)?;
        count(&format!("{field}.count"), address.count)?;
    }
    for (index, entry) in report.cached_denials.iter().enumerate() {
        let field = format!("cached_denials[{index}]");
        client(&format!("{field}.client"), &entry.client)?;
        name(&format!("{field}.rule"), &entry.rule)?;
        if let Some(tier) = &entry.tier {
            name(&format!("{field}.tier"), tier)?;
        }
        count(&format!("{field}.count"), entry.count)?;
        if entry.request_ids.len() > MAX_REQUEST_IDS {
            return Err(ApiError::invalid(
                format!("{field}.request_ids"),
                format!("at most {MAX_REQUEST_IDS} request ids per entry"),
            ));
        }
        for (n, id) in entry.request_ids.iter().enumerate() {
            if id.len() > MAX_REQUEST_ID_BYTES {
                return Err(ApiError::invalid(
                    format!("{field}.request_ids[{n}]"),
                    format!("at most {MAX_REQUEST_ID_BYTES} bytes"),
                ));
            }
        }
    }
    for (index, entry) in report.leased.iter().enumerate() {
        let field = format!("leased[{index}]");
        client(&format!("{field}.client"), &entry.client)?;
        name(&format!("{field}.rule"), &entry.rule)?;
        if let Some(tier) = &entry.tier {
            name(&format!("{field}.tier"), tier)?;
        }
        count(&format!("{field}.count"), entry.count)?;
    }
    Ok(())
}

/// A report's list `field` holds at most [`MAX_REPORTED_ADDRESSES`] `items`.
fn at_most(field: &str, items: &str, len: usize) -> Result<(), ApiError> {
    if len > MAX_REPORTED_ADDRESSES {
        return Err(ApiError::invalid(
            field,
            format!("at most {MAX_REPORTED_ADDRESSES} {items} per report, got {len}"),
        ));
    }
    Ok(())
}

fn count(field: &str, value: u64) -> Result<(), ApiError> {
    if value > MAX_REPORTED_COUNT {
        return Err(ApiError::invalid(
            field,
            format!(
                "at most {MAX_REPORTED_COUNT} per report (what one worker can see), got {value}"
            ),
        ));
    }
    Ok(())
}

fn name(field: &str, value: &str) -> Result<(), ApiError> {
    if value.len() > MAX_NAME_BYTES {
        return Err(ApiError::invalid(
            field,
            format!("at most {MAX_NAME_BYTES} bytes"),
        ));
    }
    Ok(())
}

/// A client id as a check carries it: its value at most [`MAX_IDENTITY_BYTES`] (the
/// filter hashes longer ones).
pub fn client(field: &str, client: &ClientId) -> Result<(), ApiError> {
    if client.kind.len() > MAX_NAME_BYTES {
        return Err(ApiError::invalid(
            format!("{field}.kind"),
            format!("at most {MAX_NAME_BYTES} bytes"),
        ));
    }
    if client.value.len() > MAX_IDENTITY_BYTES {
        return Err(ApiError::invalid(
            format!("{field}.value"),
            format!("at most {MAX_IDENTITY_BYTES} bytes (the filter sends a hash of longer ones)"),
        ));
    }
    Ok(())
}

/// One client's address: an IPv4 address (or its /32), an IPv6 address or network of at
/// least [`MIN_IPV6_PREFIX`] bits. `unknown` (Envoy gave no address) passes and is not
/// counted.
fn single_address(field: &str, value: &str) -> Result<(), ApiError> {
    if value == "unknown" || value.parse::<IpAddr>().is_ok() {
        return Ok(());
    }
    let refused = || {
        ApiError::invalid(
            field,
            format!(
                "`{}` is not one client's address: an IPv4 address, or an IPv6 address or \
                 network of /{MIN_IPV6_PREFIX} or narrower",
                value.chars().take(64).collect::<String>()
            ),
        )
    };
    match value.parse::<IpNet>().map_err(|_| refused())? {
        IpNet::V4(net) if net.prefix_len() == 32 => Ok(()),
        IpNet::V6(net) if net.prefix_len() >= MIN_IPV6_PREFIX => Ok(()),
        _ => Err(refused()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_protocol::AddressCount;

    fn with_address(ip: &str, count: u64) -> Report {
        Report {
            invalid_tokens: vec![AddressCount {
                ip: ip.into(),
                count,
            }],
            ..Report::default()
        }
    }

    #[test]
    fn reports_name_single_addresses_never_networks() {
        for ok in [
            "192.0.2.7",
            "192.0.2.7/32",
            "2001:db8::1",
            "2001:db8:1:2::/64",
            "unknown",
        ] {
            assert!(bounded(&with_address(ok, 5)).is_ok(), "{ok}");
        }
        for wide in [
            "0.0.0.0/0",
            "::/0",
            "10.0.0.0/8",
            "192.0.2.0/31",
            "2001:db8::/32",
            "x",
        ] {
            let error = bounded(&with_address(wide, 5)).unwrap_err();
            assert_eq!(
                error.body.field.as_deref(),
                Some("invalid_tokens[0].ip"),
                "{wide}"
            );
        }
    }

    #[test]
    fn counts_are_bounded_by_what_one_worker_can_see() {
        let error = bounded(&with_address("192.0.2.7", 1_000_000_000)).unwrap_err();
        assert_eq!(error.body.field.as_deref(), Some("invalid_tokens[0].count"));
        let flood = Report {
            responses: 1_000_000,
            server_errors: 1_000_000,
            ..Report::default()
        };
        assert_eq!(
            bounded(&flood).unwrap_err().body.field.as_deref(),
            Some("responses")
        );
        let more_errors_than_answers = Report {
            responses: 10,
            server_errors: 11,
            ..Report::default()
        };
        assert_eq!(
            bounded(&more_errors_than_answers)
                .unwrap_err()
                .body
                .field
                .as_deref(),
            Some("server_errors")
        );
    }

    #[test]
    fn a_reporter_counts_once_per_period_and_reporters_are_bounded() {
        let reporters = Reporters::default();
        assert!(reporters.first_in_period("w1", 10_000));
        assert!(!reporters.first_in_period("w1", 10_999), "same period");
        assert!(reporters.first_in_period("w2", 10_999));
        assert!(reporters.first_in_period("w1", 11_000), "next period");
        for n in 0..MAX_REPORTERS_PER_PERIOD {
            reporters.first_in_period(&format!("r{n}"), 20_000);
        }
        assert!(!reporters.first_in_period("one-too-many", 20_000));
    }
}
