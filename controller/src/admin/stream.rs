//! `GET /v1/admin/stats/stream`: the stats as server-sent events, about once a second, for
//! the dashboard (and anything else that reads `text/event-stream` with a bearer token).
//! Each event is read from the same recorder and store as `GET /v1/admin/stats` reads, plus
//! this controller's counts of the last seconds ([`crate::stats::Recorder::tallies`]): nothing
//! is added to the check path. The stream ends when the controller stops, so an open
//! dashboard never holds a graceful shutdown up.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use sluice_protocol::admin::{StatsBody, StatsEvent};

use super::auth::Reader;
use super::stats::{gather, StatsQuery};
use super::{AdminState, Stopping};
use crate::error::{ApiError, ValidQuery};
use crate::stats::{self, RateMeter, Recorder, Window};

/// How often an event goes out.
pub const INTERVAL: Duration = Duration::from_secs(1);

struct Feed {
    state: AdminState,
    recorder: Arc<Recorder>,
    window: Window,
    top: usize,
    meter: RateMeter,
    ticks: tokio::time::Interval,
    stopping: Stopping,
    /// The stats read while the request was checked, for the first event.
    first: Option<StatsBody>,
    last_tick: tokio::time::Instant,
}

impl Feed {
    /// The next event, or `None` once the controller stops.
    async fn next(&mut self) -> Option<Event> {
        let stats = match self.first.take() {
            Some(stats) => stats,
            None => {
                tokio::select! {
                    _ = self.ticks.tick() => {}
                    () = self.stopping.wait() => return None,
                }
                stats::stats(
                    &self.recorder,
                    self.state.limiter.store(),
                    self.window,
                    self.top,
                )
                .await
            }
        };
        let now = tokio::time::Instant::now();
        let mut rates = self.meter.since_last(self.recorder.tallies());
        rates.interval_ms =
            u64::try_from(now.duration_since(self.last_tick).as_millis()).unwrap_or(u64::MAX);
        self.last_tick = now;
        let snapshot = self.state.config.snapshot();
        let event = StatsEvent {
            at: crate::config::validate::format_rfc3339_ms(crate::store::now_ms()),
            version: snapshot.version,
            state: snapshot.operations.clone(),
            rates,
            hints: stats::hints(&stats).hints,
            stats,
        };
        Some(match Event::default().event("stats").json_data(&event) {
            Ok(event) => event,
            Err(error) => {
                tracing::warn!(%error, "a stats event could not be written");
                Event::default().comment("an event could not be written")
            }
        })
    }
}

#[utoipa::path(get, path = "/v1/admin/stats/stream", tag = "stats", params(StatsQuery),
    responses((status = 200, description = "Server-sent events, `event: stats` about once a second, \
                                             each `data` a StatsEvent; open until the client goes or \
                                             the controller stops",
               content_type = "text/event-stream", body = StatsEvent),
              (status = 400, body = sluice_protocol::admin::ErrorBody),
              (status = 409, body = sluice_protocol::admin::ErrorBody)),
    security(("bearer" = [])))]
pub async fn get_stats_stream(
    State(state): State<AdminState>,
    _: Reader,
    ValidQuery(query): ValidQuery<StatsQuery>,
) -> Result<Response, ApiError> {
    // A bad question, or a controller without stats, is answered as JSON, before any event.
    let first = gather(&state, &query).await?;
    let Some(recorder) = state.limiter.recorder().cloned() else {
        return Err(ApiError::conflict(
            "this controller keeps no stats (it runs with --stats false)",
        ));
    };
    let mut ticks = tokio::time::interval(INTERVAL);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The first tick completes at once: the first event is `first`.
    ticks.reset();
    let feed = Feed {
        stopping: state.stopping.clone(),
        state,
        recorder,
        window: query.window.unwrap_or(Window::Minute),
        top: query.top.unwrap_or(10),
        meter: RateMeter::default(),
        ticks,
        first: Some(first),
        last_tick: tokio::time::Instant::now(),
    };
    let events = futures_util::stream::unfold(feed, |mut feed| async move {
        let event = feed.next().await?;
        Some((Ok::<Event, Infallible>(event), feed))
    });
    Ok(Sse::new(events)
        .keep_alive(KeepAlive::default())
        .into_response())
}
