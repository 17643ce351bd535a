//! The system state, following the upstream's health by itself: the filters report once a
//! second how many upstream answers they saw and how many were 5xx (`POST /v1/report`);
//! each controller keeps the last minutes of what reached it, second by second, and every
//! second decides with [`next_state`] whether the state should change. A change is made like
//! any other (versioned, audited, propagated); when two controllers decide at once, the
//! store's version check lets one of them through.
//!
//! Each controller sees the reports Envoy sent it, a sample of all of them (Envoy spreads the
//! reports over the controllers like any call); a share is a ratio, so a sample estimates it.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use sluice_protocol::admin::{Operations, SystemState};
use sluice_protocol::config::AutomaticState;

use crate::config::validate::rfc3339_ms;
use crate::config::{Author, Change, LiveConfig};
use crate::metrics::Metrics;
use crate::store::now_ms;

/// Defaults of [`AutomaticState`]'s optional fields.
pub const DEFAULT_WINDOW_MS: u64 = 30_000;
pub const DEFAULT_DWELL_MS: u64 = 60_000;
pub const DEFAULT_MIN_RESPONSES: u64 = 100;
/// The longest window kept, in seconds.
const KEPT_SECONDS: u64 = 3_600;

/// Upstream answers per second, as the filters reported them.
#[derive(Debug, Default)]
pub struct Signals {
    /// (second since the epoch, responses, 5xx), oldest first.
    seconds: Mutex<VecDeque<(u64, u64, u64)>>,
}

impl Signals {
    pub fn report(&self, now_ms: u64, responses: u64, server_errors: u64) {
        if responses == 0 {
            return;
        }
        let second = now_ms / 1_000;
        let mut seconds = self.seconds.lock().unwrap_or_else(PoisonError::into_inner);
        match seconds.back_mut() {
            Some((at, r, e)) if *at == second => {
                *r = r.saturating_add(responses);
                *e = e.saturating_add(server_errors.min(responses));
            }
            _ => seconds.push_back((second, responses, server_errors.min(responses))),
        }
        while seconds
            .front()
            .is_some_and(|(at, _, _)| *at + KEPT_SECONDS < second)
        {
            seconds.pop_front();
        }
    }

    /// (responses, 5xx) over the `window_ms` before `now_ms`.
    pub fn over(&self, now_ms: u64, window_ms: u64) -> (u64, u64) {
        let from = now_ms.saturating_sub(window_ms) / 1_000;
        let seconds = self.seconds.lock().unwrap_or_else(PoisonError::into_inner);
        seconds
            .iter()
            .filter(|(at, _, _)| *at >= from)
            .fold((0, 0), |(r, e), (_, dr, de)| (r + dr, e + de))
    }
}

/// The state the signal asks for, if it should change now: only while the state is
/// automatic, never sooner than the dwell after the last change, and only on enough answers.
/// Entering and leaving `DEGRADED` have different thresholds (hysteresis), so a share between
/// them changes nothing.
pub fn next_state(
    operations: &Operations,
    config: &AutomaticState,
    responses: u64,
    server_errors: u64,
    now_ms: u64,
) -> Option<SystemState> {
    if !operations.automatic {
        return None;
    }
    let dwell = config.dwell.map_or(DEFAULT_DWELL_MS, |d| d.millis());
    let since = operations
        .state_since
        .as_deref()
        .and_then(|at| rfc3339_ms("state_since", at).ok());
    if since.is_some_and(|since| now_ms.saturating_sub(since) < dwell) {
        return None;
    }
    if responses < config.min_responses.unwrap_or(DEFAULT_MIN_RESPONSES).max(1) {
        return None;
    }
    let share = server_errors as f64 / responses as f64;
    match operations.state {
        SystemState::Normal if share >= config.enter_share => Some(SystemState::Degraded),
        SystemState::Degraded if share <= config.leave_share => Some(SystemState::Normal),
        _ => None,
    }
}

/// Decides every second, until the process ends.
pub fn run(
    live: Arc<LiveConfig>,
    signals: Arc<Signals>,
    metrics: Arc<Metrics>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut ticker = tokio::time::interval(Duration::from_secs(1));
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticker.tick().await;
            decide(&live, &signals, &metrics, now_ms()).await;
        }
    })
}

/// One decision at `now`: a transition if the signal asks for one.
pub async fn decide(live: &LiveConfig, signals: &Signals, metrics: &Metrics, now: u64) {
    let snapshot = live.snapshot();
    let Some(config) = snapshot.document.automatic_state.clone() else {
        return;
    };
    let window = config.window.map_or(DEFAULT_WINDOW_MS, |w| w.millis());
    let (responses, errors) = signals.over(now, window);
    let Some(to) = next_state(&snapshot.operations, &config, responses, errors, now) else {
        return;
    };
    let share = errors as f64 / responses.max(1) as f64;
    let author = Author {
        actor: "automatic",
        action: "state.auto",
        target: to.as_str(),
    };
    let made = live
        .change(&author, Some(snapshot.version), |current| {
            let mut operations = crate::admin::system::with_state(&current.operations, to);
            operations.automatic = true;
            Ok(Change {
                document: current.document.clone(),
                operations,
                detail: serde_json::json!({
                    "from": current.operations.state, "to": to,
                    "share": share, "responses": responses, "server_errors": errors,
                    "window_ms": window,
                }),
            })
        })
        .await;
    match made {
        Ok(_) => {
            metrics.state_changed(to.as_str(), "automatic");
            tracing::warn!(
                to = to.as_str(),
                share,
                responses,
                server_errors = errors,
                "the system state changed by itself"
            );
        }
        // Another controller made the same decision first, or the configuration moved.
        Err(error) => tracing::debug!(%error, "no automatic state change"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_protocol::rules::Window;

    fn config() -> AutomaticState {
        AutomaticState {
            enter_share: 0.2,
            leave_share: 0.05,
            window: None,
            dwell: Window::from_millis(10_000),
            min_responses: Some(10),
        }
    }

    fn at(state: SystemState, since_ms: Option<u64>) -> Operations {
        Operations {
            state,
            state_since: since_ms.map(crate::config::validate::format_rfc3339),
            ..Operations::default()
        }
    }

    #[test]
    fn the_state_changes_past_a_threshold_and_not_between_them() {
        let now = 1_800_000_000_000;
        let normal = at(SystemState::Normal, None);
        assert_eq!(
            next_state(&normal, &config(), 100, 20, now),
            Some(SystemState::Degraded)
        );
        assert_eq!(next_state(&normal, &config(), 100, 19, now), None);
        let degraded = at(SystemState::Degraded, Some(now - 20_000));
        assert_eq!(
            next_state(&degraded, &config(), 100, 10, now),
            None,
            "between: stays"
        );
        assert_eq!(
            next_state(&degraded, &config(), 100, 5, now),
            Some(SystemState::Normal)
        );
    }

    #[test]
    fn the_dwell_the_answers_needed_and_a_pinned_state_hold_it() {
        let now = 1_800_000_000_000;
        let fresh = at(SystemState::Normal, Some(now - 9_000));
        assert_eq!(
            next_state(&fresh, &config(), 100, 90, now),
            None,
            "within the dwell"
        );
        let settled = at(SystemState::Normal, Some(now - 10_000));
        assert_eq!(
            next_state(&settled, &config(), 100, 90, now),
            Some(SystemState::Degraded)
        );
        assert_eq!(
            next_state(&settled, &config(), 9, 9, now),
            None,
            "too few answers"
        );
        let pinned = Operations {
            automatic: false,
            ..settled
        };
        assert_eq!(next_state(&pinned, &config(), 100, 90, now), None);
    }

    #[test]
    fn reports_add_up_per_second_within_the_window() {
        let signals = Signals::default();
        signals.report(10_000, 10, 1);
        signals.report(10_500, 10, 1);
        signals.report(12_000, 5, 5);
        assert_eq!(signals.over(12_000, 1_000), (5, 5));
        assert_eq!(signals.over(12_000, 3_000), (25, 7));
        signals.report(12_100, 3, 9);
        assert_eq!(
            signals.over(12_100, 1_000),
            (8, 8),
            "no more errors than answers"
        );
    }
}
