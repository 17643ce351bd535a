//! `GET /v1/admin/stats/stream`: the stats as server-sent events, about once a second, for
//! the dashboard (and anything else that reads `text/event-stream` with a bearer token).
//! Each event is read from the same recorder and store as `GET /v1/admin/stats` reads, plus
//! this controller's counts of the last seconds ([`crate::stats::Recorder::tallies`]): nothing
//! is added to the check path. The stream ends when the controller stops, so an open
//! dashboard never holds a graceful shutdown up.
//!
//! A token may have [`PER_TOKEN`] streams open at once, and the admin API serves
//! [`IN_ALL`]; past either, `429 too_many_streams` names the limit. A client that stops
//! reading its stream is dropped by the listener ([`crate::listener::WRITE_STALL`]).

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
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

/// Streams one token may have open at once: a person's few dashboard tabs. A token that
/// opens more is a script gone wrong, or a stolen token.
pub const PER_TOKEN: usize = 4;

/// Streams the admin API serves at once, every token together. Each reads the stats (and
/// the store's shared counts) once a second and holds a connection: 64 keeps that to 64
/// reads a second, and to half of the admin API's connections
/// ([`crate::listener::ADMIN_MAX_CONNECTIONS`]), so that calls, probes and scrapes still
/// find a place when every stream is open.
pub const IN_ALL: usize = 64;

/// The stats streams an admin API has open, in all and by token name. Part of the API's
/// state: each stream holds its place until it is dropped.
#[derive(Default)]
pub struct OpenStreams(Mutex<Open>);

#[derive(Default)]
struct Open {
    all: usize,
    by_token: BTreeMap<String, usize>,
}

/// One open stream's place, given back when the stream is dropped.
struct Slot {
    streams: Arc<OpenStreams>,
    token: String,
}

impl Slot {
    fn take(state: &AdminState, token: &str) -> Result<Slot, ApiError> {
        let mut open = state
            .streams
            .0
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let mine = open.by_token.get(token).copied().unwrap_or(0);
        if mine >= PER_TOKEN {
            return Err(too_many(format!(
                "the token `{token}` has {mine} stats streams open, the most one token may have \
                 ({PER_TOKEN}): close one (a dashboard tab) first"
            )));
        }
        if open.all >= IN_ALL {
            return Err(too_many(format!(
                "the admin API serves {} stats streams, the most it serves at once \
                 ({IN_ALL}): try again later",
                open.all
            )));
        }
        open.all += 1;
        *open.by_token.entry(token.to_owned()).or_default() += 1;
        Ok(Slot {
            streams: Arc::clone(&state.streams),
            token: token.to_owned(),
        })
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut open = self
            .streams
            .0
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        open.all = open.all.saturating_sub(1);
        if let Some(mine) = open.by_token.get_mut(&self.token) {
            *mine = mine.saturating_sub(1);
            if *mine == 0 {
                open.by_token.remove(&self.token);
            }
        }
    }
}

fn too_many(message: String) -> ApiError {
    ApiError::new(StatusCode::TOO_MANY_REQUESTS, "too_many_streams", message)
}

struct Feed {
    _slot: Slot,
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
              (status = 409, body = sluice_protocol::admin::ErrorBody),
              (status = 429, description = "`too_many_streams`: the token has 4 streams open, \
                                            or the admin API serves 64",
               body = sluice_protocol::admin::ErrorBody)),
    security(("bearer" = [])))]
pub async fn get_stats_stream(
    State(state): State<AdminState>,
    Reader(caller): Reader,
    ValidQuery(query): ValidQuery<StatsQuery>,
) -> Result<Response, ApiError> {
    // Before the stats are read: a refused stream costs nothing.
    let slot = Slot::take(&state, &caller.name)?;
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
        _slot: slot,
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
