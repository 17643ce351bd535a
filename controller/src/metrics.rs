//! The controller's Prometheus metrics, in one registry (`prometheus-client` encodes the
//! exposition format). Labels come from the configuration (rule, tier, state) or from a
//! short fixed list (outcome, command), never from a client, so the number of series is
//! bounded by the configuration. A tier a token names that the configuration does not
//! define counts as `other`.

use prometheus_client::encoding::text::encode;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::{Registry, Unit};

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabels {
    /// The state entered.
    pub to: String,
    /// `automatic` (the signal) or `operator` (the admin API).
    pub by: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DecisionLabels {
    pub rule: String,
    pub tier: String,
    /// `allowed`, `limited`, `shadow_limited`, `refused` (an unknown API key) or `failure`
    /// (the store did not answer).
    pub outcome: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CommandLabels {
    /// `check`, `release`, `reset`, `stats`.
    pub command: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RuleLabels {
    pub rule: String,
}

/// What happened to units of a usage rule: `reserved` at admission, `returned` (reserved
/// and not used), `charged` (used beyond the reservation, charged in full).
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct UsageLabels {
    pub rule: String,
    pub units: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SystemStateLabels {
    pub state: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WebhookLabels {
    /// `delivered`, `failed` (every attempt failed) or `dropped` (the queue was full).
    pub result: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BreakerLabels {
    /// `closed`, `open` or `half_open`.
    pub position: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ListenerLabels {
    /// `check` (the check address), `admin` (the admin API) or `grpc` (Envoy's rate-limit
    /// service API).
    pub listener: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReleaseLabels {
    /// The filter's release from its `user-agent` (`0.2.0`); `unknown` for a filter that
    /// names none (0.1.0), `other` past [`MAX_FILTER_RELEASES`] distinct ones.
    pub release: String,
}

/// Most distinct filter releases counted apart: a rollout spans two or three, and the
/// label comes from what a proxy sends.
pub const MAX_FILTER_RELEASES: usize = 8;

/// The release a filter names in its `user-agent` (`sluice-filter/0.2.0`): a semantic
/// version, with at most a short pre-release part, or `unknown`.
pub fn filter_release(user_agent: Option<&str>) -> &str {
    let Some(release) = user_agent.and_then(|agent| agent.strip_prefix("sluice-filter/")) else {
        return "unknown";
    };
    let (core, pre) = release.split_once('-').unwrap_or((release, ""));
    let numbers: Vec<&str> = core.split('.').collect();
    let semantic = numbers.len() == 3
        && numbers
            .iter()
            .all(|n| (1..=6).contains(&n.len()) && n.bytes().all(|b| b.is_ascii_digit()))
        && pre.len() <= 16
        && pre.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'.');
    if semantic {
        release
    } else {
        "unknown"
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FallbackLabels {
    /// `allow`, `deny` or `local`.
    pub fallback: String,
}

pub struct Metrics {
    registry: Registry,
    pub state_transitions: Family<StateLabels, Counter>,
    pub protection_blocks: Counter,
    pub invalid_credentials: Counter,
    pub reports: Counter,
    pub decisions: Family<DecisionLabels, Counter>,
    pub check_call_checks: Histogram,
    pub check_call_duration: Histogram,
    pub store_duration: Family<CommandLabels, Histogram>,
    pub store_errors: Family<CommandLabels, Counter>,
    pub config_version: Gauge,
    pub system_state: Family<SystemStateLabels, Gauge>,
    pub delayed_requests: Gauge,
    pub concurrency_slots: Family<RuleLabels, Gauge>,
    pub alerts: Counter,
    pub webhooks: Family<WebhookLabels, Counter>,
    pub stats_publish_errors: Counter,
    pub breaker_state: Family<BreakerLabels, Gauge>,
    pub breaker_transitions: Family<BreakerLabels, Counter>,
    pub fallback_decisions: Family<FallbackLabels, Counter>,
    pub leases_granted: Family<RuleLabels, Counter>,
    pub leased_requests_granted: Family<RuleLabels, Counter>,
    pub leased_requests_returned: Family<RuleLabels, Counter>,
    pub leased_admissions: Family<RuleLabels, Counter>,
    pub usage_units: Family<UsageLabels, Counter>,
    pub unauthenticated_calls: Family<ListenerLabels, Counter>,
    pub ignored_reports: Counter,
    // -- The listeners' connections (listener.rs) --
    pub connections_open: Family<ListenerLabels, Gauge>,
    pub connections_refused: Family<ListenerLabels, Counter>,
    filter_config_reads: Family<ReleaseLabels, Counter>,
    filter_releases_seen: std::sync::Mutex<Vec<String>>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

/// Seconds from 100 µs to about 13 s, doubling.
fn latency_buckets() -> impl Iterator<Item = f64> {
    exponential_buckets(0.000_1, 2.0, 18)
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("sluice");
        let state_transitions = Family::<StateLabels, Counter>::default();
        registry.register(
            "state_transitions",
            "Changes of the system state, by the state entered and who made them",
            state_transitions.clone(),
        );
        let protection_blocks = Counter::default();
        registry.register(
            "protection_blocks",
            "Addresses denylisted by brute-force protection",
            protection_blocks.clone(),
        );
        let invalid_credentials = Counter::default();
        registry.register(
            "invalid_credentials",
            "Invalid tokens and unknown API keys counted against their address",
            invalid_credentials.clone(),
        );
        let reports = Counter::default();
        registry.register(
            "filter_reports",
            "Reports received from filter workers",
            reports.clone(),
        );
        let decisions = Family::<DecisionLabels, Counter>::default();
        registry.register(
            "decisions",
            "Decisions by rule (each rule that applied), tier and outcome",
            decisions.clone(),
        );
        let check_call_checks = Histogram::new(exponential_buckets(1.0, 2.0, 11));
        registry.register(
            "check_call_checks",
            "Checks per check call (the filter's batch size)",
            check_call_checks.clone(),
        );
        let check_call_duration = Histogram::new(latency_buckets());
        registry.register_with_unit(
            "check_call_duration",
            "Time to decide a check call, from its body read to its answer (without a leaky \
             bucket's held delay)",
            Unit::Seconds,
            check_call_duration.clone(),
        );
        let store_duration = Family::<CommandLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(latency_buckets())
        });
        registry.register_with_unit(
            "store_command_duration",
            "Time of the counters' store commands",
            Unit::Seconds,
            store_duration.clone(),
        );
        let store_errors = Family::<CommandLabels, Counter>::default();
        registry.register(
            "store_errors",
            "Counters' store commands that failed",
            store_errors.clone(),
        );
        registry.register(
            "build",
            "The controller's software release and the commit it was built from (always 1)",
            prometheus_client::metrics::info::Info::new([
                ("version", crate::build::VERSION),
                ("commit", crate::build::COMMIT),
            ]),
        );
        let config_version = Gauge::default();
        registry.register(
            "config_version",
            "The configuration version this controller runs",
            config_version.clone(),
        );
        let system_state = Family::<SystemStateLabels, Gauge>::default();
        registry.register(
            "system_state",
            "1 for the system state in force, 0 for the others",
            system_state.clone(),
        );
        let delayed_requests = Gauge::default();
        registry.register(
            "delayed_requests",
            "Requests a leaky bucket admitted for a later slot that is still ahead",
            delayed_requests.clone(),
        );
        let concurrency_slots = Family::<RuleLabels, Gauge>::default();
        registry.register(
            "concurrency_slots_in_use",
            "Concurrency slots held, as this controller last saw each client's, per rule",
            concurrency_slots.clone(),
        );
        let alerts = Counter::default();
        registry.register(
            "alerts",
            "Alerts raised for clients limited too often",
            alerts.clone(),
        );
        let webhooks = Family::<WebhookLabels, Counter>::default();
        registry.register(
            "alert_webhooks",
            "Alerts sent to the webhook, by result",
            webhooks.clone(),
        );
        let stats_publish_errors = Counter::default();
        registry.register(
            "stats_publish_errors",
            "Stats buckets that could not be shared through the store",
            stats_publish_errors.clone(),
        );
        let breaker_state = Family::<BreakerLabels, Gauge>::default();
        registry.register(
            "store_circuit",
            "The counters' store circuit breaker: 1 for the position it is in",
            breaker_state.clone(),
        );
        let breaker_transitions = Family::<BreakerLabels, Counter>::default();
        registry.register(
            "store_circuit_transitions",
            "Moves of the counters' store circuit breaker, by the position entered",
            breaker_transitions.clone(),
        );
        let fallback_decisions = Family::<FallbackLabels, Counter>::default();
        registry.register(
            "store_fallback_checks",
            "Checks answered by the fallback while the counters' store could not answer",
            fallback_decisions.clone(),
        );
        let leases_granted = Family::<RuleLabels, Counter>::default();
        registry.register(
            "leases_granted",
            "Leases of quota granted to filter workers, by the rule that speaks for the decision",
            leases_granted.clone(),
        );
        let leased_requests_granted = Family::<RuleLabels, Counter>::default();
        registry.register(
            "leased_requests_granted",
            "Requests the granted leases may admit, by rule",
            leased_requests_granted.clone(),
        );
        let leased_requests_returned = Family::<RuleLabels, Counter>::default();
        registry.register(
            "leased_requests_returned",
            "Requests' worth of lease quota that workers gave back unused, by rule",
            leased_requests_returned.clone(),
        );
        let leased_admissions = Family::<RuleLabels, Counter>::default();
        registry.register(
            "leased_admissions",
            "Requests filter workers admitted from leases, as they reported them, by rule",
            leased_admissions.clone(),
        );
        let usage_units = Family::<UsageLabels, Counter>::default();
        registry.register(
            "usage_units",
            "Units of usage rules, by rule: reserved at admission, returned when the response \
             used less, charged beyond the reservation when it used more",
            usage_units.clone(),
        );
        let unauthenticated_calls = Family::<ListenerLabels, Counter>::default();
        registry.register(
            "unauthenticated_calls",
            "Calls refused for want of a valid check token, by listener",
            unauthenticated_calls.clone(),
        );
        let ignored_reports = Counter::default();
        registry.register(
            "filter_reports_ignored",
            "Reports not counted: a reporter's second report in one period, or reporters past \
             the bound",
            ignored_reports.clone(),
        );
        let filter_config_reads = Family::<ReleaseLabels, Counter>::default();
        registry.register(
            "filter_config_reads",
            "Configuration reads by filter workers (each polls about once a second), by the \
             filter's release: how far a rollout has come",
            filter_config_reads.clone(),
        );
        // -- The listeners' connections (listener.rs) --
        let connections_open = Family::<ListenerLabels, Gauge>::default();
        registry.register(
            "connections_open",
            "Connections open, by listener",
            connections_open.clone(),
        );
        let connections_refused = Family::<ListenerLabels, Counter>::default();
        registry.register(
            "connections_refused",
            "Connections closed as soon as accepted because the listener held as many as it \
             may, by listener",
            connections_refused.clone(),
        );
        Metrics {
            filter_config_reads,
            filter_releases_seen: std::sync::Mutex::new(Vec::new()),
            ignored_reports,
            unauthenticated_calls,
            leases_granted,
            leased_requests_granted,
            leased_requests_returned,
            leased_admissions,
            usage_units,
            registry,
            state_transitions,
            protection_blocks,
            invalid_credentials,
            reports,
            decisions,
            check_call_checks,
            check_call_duration,
            store_duration,
            store_errors,
            config_version,
            system_state,
            delayed_requests,
            concurrency_slots,
            alerts,
            webhooks,
            stats_publish_errors,
            breaker_state,
            breaker_transitions,
            fallback_decisions,
            connections_open,
            connections_refused,
        }
    }

    /// The breaker is at `position` (and no longer anywhere else).
    pub fn breaker_position(&self, position: crate::store::breaker::Position) {
        use crate::store::breaker::Position;
        for each in [Position::Closed, Position::Open, Position::HalfOpen] {
            self.breaker_state
                .get_or_create(&BreakerLabels {
                    position: each.as_str().to_owned(),
                })
                .set(i64::from(each == position));
        }
    }

    pub fn breaker_moved(&self, to: crate::store::breaker::Position) {
        self.breaker_position(to);
        self.breaker_transitions
            .get_or_create(&BreakerLabels {
                position: to.as_str().to_owned(),
            })
            .inc();
    }

    pub fn fallback_checks(&self, fallback: crate::store::breaker::Fallback, checks: u64) {
        self.fallback_decisions
            .get_or_create(&FallbackLabels {
                fallback: fallback.as_str().to_owned(),
            })
            .inc_by(checks);
    }

    pub fn lease_granted(&self, rule: &str, requests: u64) {
        let labels = RuleLabels {
            rule: rule.to_owned(),
        };
        self.leases_granted.get_or_create(&labels).inc();
        self.leased_requests_granted
            .get_or_create(&labels)
            .inc_by(requests);
    }

    /// `units` of the usage rule `rule` were `what` (`reserved`, `returned`, `charged`).
    pub fn usage(&self, rule: &str, what: &'static str, units: u64) {
        if units > 0 {
            self.usage_units
                .get_or_create(&UsageLabels {
                    rule: rule.to_owned(),
                    units: what,
                })
                .inc_by(units);
        }
    }

    /// A worker gave back `requests`' worth of a lease of `rule` unused.
    pub fn lease_returned(&self, rule: &str, requests: u64) {
        self.leased_requests_returned
            .get_or_create(&RuleLabels {
                rule: rule.to_owned(),
            })
            .inc_by(requests);
    }

    /// A filter worker read the configuration (`GET /v1/config`), naming its release in
    /// `user_agent`.
    pub fn filter_config_read(&self, user_agent: Option<&str>) {
        let release = filter_release(user_agent);
        let release = match self.filter_releases_seen.lock() {
            Ok(seen) if seen.iter().any(|known| known == release) => release,
            Ok(mut seen) if seen.len() < MAX_FILTER_RELEASES => {
                seen.push(release.to_owned());
                release
            }
            _ => "other",
        };
        self.filter_config_reads
            .get_or_create(&ReleaseLabels {
                release: release.to_owned(),
            })
            .inc();
    }

    pub fn unauthenticated_call(&self, listener: &str) {
        self.unauthenticated_calls
            .get_or_create(&ListenerLabels {
                listener: listener.to_owned(),
            })
            .inc();
    }

    pub fn leased_admissions(&self, rule: &str, requests: u64) {
        self.leased_admissions
            .get_or_create(&RuleLabels {
                rule: rule.to_owned(),
            })
            .inc_by(requests);
    }

    pub fn state_changed(&self, to: &str, by: &str) {
        self.state_transitions
            .get_or_create(&StateLabels {
                to: to.to_owned(),
                by: by.to_owned(),
            })
            .inc();
    }

    /// Times a store command, counting its failure.
    pub fn store_command(&self, command: &str, seconds: f64, failed: bool) {
        let labels = CommandLabels {
            command: command.to_owned(),
        };
        self.store_duration.get_or_create(&labels).observe(seconds);
        if failed {
            self.store_errors.get_or_create(&labels).inc();
        }
    }

    pub fn webhook(&self, result: &str) {
        self.webhooks
            .get_or_create(&WebhookLabels {
                result: result.to_owned(),
            })
            .inc();
    }

    /// A connection closed at once: `listener` held as many as it may.
    pub fn connection_refused(&self, listener: &str) {
        self.connections_refused
            .get_or_create(&ListenerLabels {
                listener: listener.to_owned(),
            })
            .inc();
    }

    /// The exposition text.
    pub fn render(&self) -> String {
        let mut text = String::new();
        // Writing to a String cannot fail.
        let _ = encode(&mut text, &self.registry);
        text
    }
}

/// The scrape's reply, in the content type Prometheus asks for.
pub fn exposition(metrics: &Metrics) -> axum::response::Response {
    use axum::response::IntoResponse;
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        metrics.render(),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_filter_release_is_a_short_semantic_version_or_unknown() {
        assert_eq!(filter_release(Some("sluice-filter/0.2.0")), "0.2.0");
        assert_eq!(
            filter_release(Some("sluice-filter/1.10.3-rc.1")),
            "1.10.3-rc.1"
        );
        for odd in [
            None,
            Some("curl/8.0"),
            Some("sluice-filter/"),
            Some("sluice-filter/0.2"),
            Some("sluice-filter/0.2.x"),
            Some("sluice-filter/0.2.0-\u{0}"),
            Some("sluice-filter/1234567.0.0"),
            Some("sluice-filter/0.2.0-aaaaaaaaaaaaaaaaa"),
        ] {
            assert_eq!(filter_release(odd), "unknown", "{odd:?}");
        }
    }

    #[test]
    fn filter_releases_past_the_bound_are_counted_as_other() {
        let metrics = Metrics::new();
        for patch in 0..MAX_FILTER_RELEASES + 3 {
            metrics.filter_config_read(Some(&format!("sluice-filter/0.2.{patch}")));
        }
        metrics.filter_config_read(Some("sluice-filter/0.2.0"));
        let text = metrics.render();
        let series: Vec<&str> = text
            .lines()
            .filter(|line| line.starts_with("sluice_filter_config_reads_total{"))
            .collect();
        assert_eq!(series.len(), MAX_FILTER_RELEASES + 1, "{series:?}");
        assert!(series.contains(&"sluice_filter_config_reads_total{release=\"0.2.0\"} 2"));
        assert!(series.contains(&"sluice_filter_config_reads_total{release=\"other\"} 3"));
    }
}
