//! The controller's Prometheus metrics, in one registry (`prometheus-client` encodes the
//! exposition format). Labels come from the configuration (rule, tier, state), never from
//! a client, so the number of series stays bounded.

use prometheus_client::encoding::text::encode;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabels {
    /// The state entered.
    pub to: String,
    /// `automatic` (the signal) or `operator` (the admin API).
    pub by: String,
}

pub struct Metrics {
    registry: Registry,
    pub state_transitions: Family<StateLabels, Counter>,
    pub protection_blocks: Counter,
    pub invalid_credentials: Counter,
    pub reports: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
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
        Metrics {
            registry,
            state_transitions,
            protection_blocks,
            invalid_credentials,
            reports,
        }
    }

    pub fn state_changed(&self, to: &str, by: &str) {
        self.state_transitions
            .get_or_create(&StateLabels {
                to: to.to_owned(),
                by: by.to_owned(),
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
