//! Alerts on clients that keep being limited: when one client is limited by one rule more
//! than `limited` times within a `period`, one alert goes to the log (target
//! `sluice::alert`) and to the webhook, then none for that client and rule for the
//! cooldown.
//!
//! Nothing here is on the check path: the stats recorder tallies limited decisions per
//! client and rule in memory, and once a second [`round`] counts the tallies in the
//! counters' store, so that every controller on one Redis adds to the same counts and
//! exactly one of them fires: a fixed window of the period holds the count, a second one
//! of the cooldown (limit 1) lets one alert through. The webhook is called by a task of its
//! own with retries and backoff; when it cannot keep up, alerts are dropped (and counted),
//! never waited for.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use sluice_protocol::config::Alerts;
use sluice_protocol::{ClientId, Strategy};
use tokio::sync::mpsc;

use crate::config::validate::format_rfc3339_ms;
use crate::keys;
use crate::metrics::Metrics;
use crate::store::{LimitSpec, Store, StoreError};
use crate::strategy::Params;

/// Alerts waiting for the webhook; past it they are dropped.
const QUEUE: usize = 256;
/// Attempts per alert, and the first wait between two (doubling).
const ATTEMPTS: u32 = 5;
const FIRST_BACKOFF: Duration = Duration::from_secs(1);
/// Longest one webhook call may take.
const WEBHOOK_TIMEOUT: Duration = Duration::from_secs(5);

/// What the log and the webhook get.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Alert {
    pub alert: &'static str,
    pub client: ClientId,
    pub rule: String,
    /// Limited at least this many times in the current period.
    pub limited: u64,
    pub threshold: u64,
    pub period_ms: u64,
    pub at: String,
    pub controller: String,
}

/// Limited decisions tallied since the last round: (rule, client) → count.
pub type Tally = HashMap<(String, ClientId), u64>;

/// The alerts `tally` raises now, with the counts shared through `store`.
pub async fn round(
    store: &dyn Store,
    config: &Alerts,
    tally: Tally,
    controller: &str,
    now: u64,
) -> Result<Vec<Alert>, StoreError> {
    if tally.is_empty() {
        return Ok(Vec::new());
    }
    let period_ms = config.period.millis();
    let counted = Params {
        strategy: Strategy::FixedWindow,
        limit: config.limited,
        period_ms,
        extra: 0,
        penalty: None,
    };
    let tally: Vec<((String, ClientId), u64)> = tally.into_iter().collect();
    let counts: Vec<LimitSpec> = tally
        .iter()
        .map(|((rule, client), count)| LimitSpec {
            key: keys::alert_count_key(rule, client),
            params: counted,
            cost: *count,
        })
        .collect();
    let verdicts = store.check_each(&counts).await?;
    // Over the threshold: the count could not take this round's tally.
    let over: Vec<(&(String, ClientId), u64, u64)> = tally
        .iter()
        .zip(&verdicts)
        .filter(|(_, verdict)| !verdict.ok)
        .map(|((who, count), verdict)| {
            let before = config.limited.saturating_sub(verdict.remaining);
            (who, *count, before)
        })
        .collect();
    if over.is_empty() {
        return Ok(Vec::new());
    }
    let once = Params {
        strategy: Strategy::FixedWindow,
        limit: 1,
        period_ms: config.cooldown.unwrap_or(config.period).millis(),
        extra: 0,
        penalty: None,
    };
    let fired: Vec<LimitSpec> = over
        .iter()
        .map(|((rule, client), _, _)| LimitSpec {
            key: keys::alert_fired_key(rule, client),
            params: once,
            cost: 1,
        })
        .collect();
    let first = store.check_each(&fired).await?;
    Ok(over
        .into_iter()
        .zip(first)
        .filter(|(_, verdict)| verdict.ok)
        .map(|(((rule, client), count, before), _)| Alert {
            alert: "client_limited",
            client: client.clone(),
            rule: rule.clone(),
            limited: before.saturating_add(count),
            threshold: config.limited,
            period_ms,
            at: format_rfc3339_ms(now),
            controller: controller.to_owned(),
        })
        .collect())
}

/// The log line of an alert.
pub fn log(alert: &Alert) {
    tracing::warn!(
        target: "sluice::alert",
        client_kind = alert.client.kind.as_str(),
        client = alert.client.value.as_str(),
        rule = alert.rule.as_str(),
        limited = alert.limited,
        threshold = alert.threshold,
        period_ms = alert.period_ms,
        "a client keeps being limited"
    );
}

/// Sends alerts to webhooks, one at a time, from a queue that never makes anyone wait.
pub struct Webhooks {
    queue: mpsc::Sender<(String, Alert)>,
    metrics: Arc<Metrics>,
}

impl Webhooks {
    pub fn start(metrics: Arc<Metrics>) -> (Webhooks, tokio::task::JoinHandle<()>) {
        let (queue, mut waiting) = mpsc::channel::<(String, Alert)>(QUEUE);
        let sender_metrics = Arc::clone(&metrics);
        let task = tokio::spawn(async move {
            while let Some((url, alert)) = waiting.recv().await {
                let delivered = deliver(&url, &alert).await;
                sender_metrics.webhook(if delivered { "delivered" } else { "failed" });
            }
        });
        (Webhooks { queue, metrics }, task)
    }

    /// Queues `alert` for `url`; drops it when the queue is full.
    pub fn send(&self, url: &str, alert: Alert) {
        if self.queue.try_send((url.to_owned(), alert)).is_err() {
            self.metrics.webhook("dropped");
            tracing::warn!(target: "sluice::alert", "the alert webhook is behind: an alert was dropped");
        }
    }
}

/// Posts `alert` to `url`, trying again with doubling waits; whether it got through.
async fn deliver(url: &str, alert: &Alert) -> bool {
    let Ok(body) = serde_json::to_string(alert) else {
        return false;
    };
    let mut wait = FIRST_BACKOFF;
    for attempt in 1..=ATTEMPTS {
        let (url_now, body_now) = (url.to_owned(), body.clone());
        let answered = tokio::task::spawn_blocking(move || post(&url_now, &body_now)).await;
        match answered {
            Ok(Ok(())) => return true,
            Ok(Err(why)) => tracing::warn!(
                target: "sluice::alert",
                attempt,
                "the alert webhook failed: {why}"
            ),
            Err(_) => return false,
        }
        if attempt < ATTEMPTS {
            tokio::time::sleep(wait).await;
            wait = wait.saturating_mul(2);
        }
    }
    false
}

fn post(url: &str, body: &str) -> Result<(), String> {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(WEBHOOK_TIMEOUT))
        .http_status_as_error(false)
        .build()
        .into();
    let response = agent
        .post(url)
        .header("content-type", "application/json")
        .send(body)
        .map_err(|e| e.to_string())?;
    let status = response.status();
    if status.is_success() {
        Ok(())
    } else {
        Err(format!("status {}", status.as_u16()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{ManualClock, MemoryStore};
    use sluice_protocol::rules::Window;

    fn config() -> Alerts {
        Alerts {
            limited: 10,
            period: Window::from_millis(60_000).unwrap_or_else(|| unreachable!()),
            webhook: None,
            cooldown: None,
        }
    }

    fn tally(rule: &str, client: &str, count: u64) -> Tally {
        let mut tally = Tally::new();
        tally.insert((rule.to_owned(), ClientId::ip(client)), count);
        tally
    }

    #[tokio::test]
    async fn a_client_over_the_threshold_fires_once_per_period_and_one_under_it_never() {
        let clock = ManualClock::starting_at(1_800_000_000_000);
        let store = MemoryStore::new(clock.clone());
        let now = 1_800_000_000_000;
        let mut fired = Vec::new();
        for _ in 0..5 {
            fired.extend(
                round(&store, &config(), tally("r", "10.0.0.1", 4), "c1", now)
                    .await
                    .unwrap(),
            );
            let quiet = round(&store, &config(), tally("r", "10.0.0.2", 2), "c1", now)
                .await
                .unwrap();
            assert!(quiet.is_empty(), "10 in the period is not more than 10");
        }
        assert_eq!(fired.len(), 1, "{fired:?}");
        assert_eq!(fired[0].client, ClientId::ip("10.0.0.1"));
        assert_eq!(fired[0].limited, 12, "8 counted, then 4 more");
        // The next period: once more.
        clock.advance(60_000);
        let mut next = Vec::new();
        for _ in 0..4 {
            next.extend(
                round(&store, &config(), tally("r", "10.0.0.1", 4), "c1", now)
                    .await
                    .unwrap(),
            );
        }
        assert_eq!(next.len(), 1);
    }
}
