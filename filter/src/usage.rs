//! Reading what a response says its request used, for the usage rules' reservations the
//! request holds (see `sluice_protocol::usage`): from a response header, or by a JSON
//! pointer into a JSON body or into the events of a `text/event-stream` body. Only a
//! request that holds a reservation with a pointer has its body read at all, and what is
//! kept of a body is bounded: a JSON body up to [`MAX_JSON_BODY_BYTES`] (larger: the usage
//! is unreported), an event stream one event at a time, up to [`MAX_EVENT_BYTES`] per event
//! (a longer event is skipped). Plain Rust, tested natively.
//!
//! What counts as a figure: a whole number that is not negative (a fraction is rounded up:
//! what was used is never charged short), at most the reservation's `max` (a larger one is
//! clamped to it). Anything else (a negative number, a string, a missing field, a body that
//! is not JSON, an error page, a stream cut before its usage) leaves the usage unreported,
//! and the reservation's `unreported` units are charged.

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;

use sluice_protocol::{Settlement, UsageReservation, UsageSource, MAX_USAGE};

thread_local! {
    /// Meters of this VM (one per Envoy worker) that read a response body.
    static BODY_METERS: Cell<usize> = const { Cell::new(0) };
    /// Requests of this VM (by context) whose check waits for their body.
    static REQUEST_BODY_WAITS: RefCell<Vec<u32>> = const { RefCell::new(Vec::new()) };
}

/// Whether any request of this VM reads its response body for usage: while none does, the
/// host's body callbacks answer at once, and a route without usage rules costs what it did
/// before they existed.
pub fn any_body_meter() -> bool {
    BODY_METERS.with(Cell::get) > 0
}

/// Most bytes of a request body read for the figures usage rules reserve from: a larger
/// body is checked without them (each rule then reserves its fixed `reserve`).
pub const MAX_REQUEST_BODY_BYTES: usize = 64 * 1024;

/// Whether request `context_id` waits for its body before it is checked: while none does,
/// the host's request body callbacks answer at once.
pub fn waits_for_body(context_id: u32) -> bool {
    REQUEST_BODY_WAITS.with(|waits| {
        waits
            .try_borrow()
            .is_ok_and(|waits| waits.contains(&context_id))
    })
}

/// A request waiting for its body, known by [`waits_for_body`] while it lives.
#[derive(Debug)]
pub struct BodyWait(u32);

impl BodyWait {
    pub fn new(context_id: u32) -> BodyWait {
        REQUEST_BODY_WAITS.with(|waits| {
            if let Ok(mut waits) = waits.try_borrow_mut() {
                waits.push(context_id);
            }
        });
        BodyWait(context_id)
    }
}

impl Drop for BodyWait {
    fn drop(&mut self) {
        REQUEST_BODY_WAITS.with(|waits| {
            if let Ok(mut waits) = waits.try_borrow_mut() {
                waits.retain(|id| *id != self.0);
            }
        });
    }
}

/// The figures a JSON request body holds at `pointers`: whole numbers (a fraction rounded
/// up, at most [`MAX_USAGE`]); a pointer with anything else there, or a body that is not
/// JSON, gives none.
pub fn request_figures(body: &[u8], pointers: &[String]) -> BTreeMap<String, u64> {
    let Ok(value) = serde_json::from_slice::<serde_json::Value>(body) else {
        return BTreeMap::new();
    };
    pointers
        .iter()
        .filter_map(|pointer| {
            let figure = value.pointer(pointer).and_then(json_figure)?;
            Some((pointer.clone(), figure.min(MAX_USAGE)))
        })
        .collect()
}

/// Most bytes of a JSON response body kept to read usage from.
pub const MAX_JSON_BODY_BYTES: usize = 256 * 1024;
/// Most bytes of one event's data kept from an event stream.
pub const MAX_EVENT_BYTES: usize = 64 * 1024;
/// Most bytes of one piece of a body the filter copies in to read; a larger piece (a host
/// that buffered the body whole) leaves the usage unreported.
pub const MAX_BODY_CHUNK_BYTES: usize = 1024 * 1024;

#[derive(Debug)]
enum Body {
    /// No reservation reads the body, or its type is neither JSON nor an event stream.
    Unread,
    /// Before the response headers said what the body is.
    Unknown,
    Json {
        kept: Vec<u8>,
        /// Larger than [`MAX_JSON_BODY_BYTES`]: no longer kept.
        overflowed: bool,
        ended: bool,
    },
    EventStream {
        /// The line being read (bounded by [`MAX_EVENT_BYTES`]).
        line: Vec<u8>,
        /// The current event's data lines, joined by `\n`.
        data: Vec<u8>,
        /// The current line or event grew past the bound: it is skipped.
        overlong: bool,
    },
}

/// One request's reservations and what its response said about them.
#[derive(Debug)]
pub struct Meter {
    reservations: Vec<UsageReservation>,
    /// Per reservation, the figure read (the last one, for an event stream).
    used: Vec<Option<u64>>,
    body: Body,
    /// Counted in [`BODY_METERS`] until dropped.
    counted: bool,
}

impl Drop for Meter {
    fn drop(&mut self) {
        if self.counted {
            BODY_METERS.with(|meters| meters.set(meters.get().saturating_sub(1)));
        }
    }
}

impl Meter {
    /// A meter for `reservations`; `None` when there are none (nothing is read then).
    pub fn new(reservations: Vec<UsageReservation>) -> Option<Meter> {
        if reservations.is_empty() {
            return None;
        }
        let reads_body = reservations
            .iter()
            .any(|r| matches!(r.from, UsageSource::JsonPointer(_)));
        if reads_body {
            BODY_METERS.with(|meters| meters.set(meters.get() + 1));
        }
        Some(Meter {
            used: vec![None; reservations.len()],
            reservations,
            body: if reads_body {
                Body::Unknown
            } else {
                Body::Unread
            },
            counted: reads_body,
        })
    }

    /// The response headers are in: `header` reads one (lower-case name). Reads the header
    /// sources, and from `content-type` how the body is read.
    pub fn on_response_headers(&mut self, header: impl Fn(&str) -> Option<String>) {
        for (reservation, used) in self.reservations.iter().zip(&mut self.used) {
            if let UsageSource::ResponseHeader(name) = &reservation.from {
                *used = header(name).and_then(|value| whole_number(value.trim()));
            }
        }
        // A compressed body (the client asked for it) cannot be read here: unreported.
        let encoded = header("content-encoding")
            .is_some_and(|coding| !coding.trim().eq_ignore_ascii_case("identity"));
        if encoded && matches!(self.body, Body::Unknown) {
            self.body = Body::Unread;
        }
        if matches!(self.body, Body::Unknown) {
            let content_type = header("content-type").unwrap_or_default();
            let media_type = content_type
                .split(';')
                .next()
                .unwrap_or_default()
                .trim()
                .to_ascii_lowercase();
            self.body = if media_type == "text/event-stream" {
                Body::EventStream {
                    line: Vec::new(),
                    data: Vec::new(),
                    overlong: false,
                }
            } else if media_type == "application/json" || media_type.ends_with("+json") {
                Body::Json {
                    kept: Vec::new(),
                    overflowed: false,
                    ended: false,
                }
            } else {
                Body::Unread
            };
        }
    }

    /// Whether the response body is to be read (handed to [`Meter::on_body`]).
    pub fn reads_body(&self) -> bool {
        match &self.body {
            Body::Json {
                overflowed, ended, ..
            } => !overflowed && !ended,
            Body::EventStream { .. } => true,
            Body::Unread | Body::Unknown => false,
        }
    }

    /// The next piece of the response body; `end` once it is the last.
    pub fn on_body(&mut self, chunk: &[u8], end: bool) {
        match &mut self.body {
            Body::Json {
                kept,
                overflowed,
                ended,
            } => {
                if *overflowed || *ended {
                    return;
                }
                if kept.len() + chunk.len() > MAX_JSON_BODY_BYTES {
                    *overflowed = true;
                    *kept = Vec::new();
                    return;
                }
                kept.extend_from_slice(chunk);
                if end {
                    *ended = true;
                    let body = std::mem::take(kept);
                    self.read_json(&body);
                }
            }
            Body::EventStream { .. } => {
                let mut rest = chunk;
                while let Some(at) = rest.iter().position(|&b| b == b'\n') {
                    let (text, after) = rest.split_at(at);
                    self.event_stream_text(text);
                    self.event_stream_line_end();
                    rest = after.get(1..).unwrap_or_default();
                }
                self.event_stream_text(rest);
                if end {
                    // A last event without its blank line still counts.
                    self.event_stream_line_end();
                    self.event_stream_line_end();
                }
            }
            Body::Unread | Body::Unknown => {}
        }
    }

    /// Bytes of a line (no `\n` among them) join the line being read, within the bound.
    fn event_stream_text(&mut self, text: &[u8]) {
        let Body::EventStream { line, overlong, .. } = &mut self.body else {
            return;
        };
        if line.len() + text.len() <= MAX_EVENT_BYTES {
            line.extend_from_slice(text);
        } else {
            *overlong = true;
        }
    }

    /// A line of the event stream ends: a `data` line joins the event, a blank line ends it.
    fn event_stream_line_end(&mut self) {
        let Body::EventStream {
            line,
            data,
            overlong,
        } = &mut self.body
        else {
            return;
        };
        let mut text = std::mem::take(line);
        if text.last() == Some(&b'\r') {
            text.pop();
        }
        if text.is_empty() {
            // The event is complete.
            let event = std::mem::take(data);
            let skipped = std::mem::replace(overlong, false);
            if !skipped && !event.is_empty() && self.may_say(&event) {
                self.read_json(&event);
            }
            return;
        }
        if let Some(value) = text.strip_prefix(b"data:") {
            let value = value.strip_prefix(b" ").unwrap_or(value);
            if data.len() + value.len() + 1 > MAX_EVENT_BYTES {
                *overlong = true;
                return;
            }
            if !data.is_empty() {
                data.push(b'\n');
            }
            data.extend_from_slice(value);
        }
    }

    /// A piece of the body could not be read: what the body says is unknown from here on,
    /// so its figures are unreported (a figure read before may have been replaced).
    pub fn body_unreadable(&mut self) {
        self.body = Body::Unread;
        for (reservation, used) in self.reservations.iter().zip(&mut self.used) {
            if matches!(reservation.from, UsageSource::JsonPointer(_)) {
                *used = None;
            }
        }
    }

    /// Whether an event may hold a figure: the last part of some pointer appears in it as a
    /// key (`"total_tokens"`). Most events of a stream carry content and no usage; they are
    /// not parsed. A pointer ending in an array index, or in a part with an escape, is
    /// always looked for.
    fn may_say(&self, event: &[u8]) -> bool {
        self.reservations.iter().any(|reservation| {
            let UsageSource::JsonPointer(pointer) = &reservation.from else {
                return false;
            };
            let last = pointer.rsplit('/').next().unwrap_or_default();
            if last.is_empty() || last.contains('~') || last.bytes().all(|b| b.is_ascii_digit()) {
                return true;
            }
            let key = format!("\"{last}\"");
            event
                .windows(key.len())
                .any(|window| window == key.as_bytes())
        })
    }

    /// Reads every pointer source from one JSON document (a body, or an event's data);
    /// a figure found replaces the one before.
    fn read_json(&mut self, document: &[u8]) {
        let Ok(value) = serde_json::from_slice::<serde_json::Value>(document) else {
            return;
        };
        for (reservation, used) in self.reservations.iter().zip(&mut self.used) {
            if let UsageSource::JsonPointer(pointer) = &reservation.from {
                if let Some(figure) = value.pointer(pointer).and_then(json_figure) {
                    *used = Some(figure);
                }
            }
        }
    }

    /// What to settle each reservation with, now that the response is over (or cut off):
    /// the figure read, clamped to the reservation's `max`, or its `unreported` units.
    pub fn settlements(mut self) -> Vec<Settlement> {
        let used = std::mem::take(&mut self.used);
        std::mem::take(&mut self.reservations)
            .into_iter()
            .zip(used)
            .map(|(reservation, used)| Settlement {
                used: used.map_or(reservation.unreported, |used| used.min(reservation.max)),
                reservation: reservation.token,
            })
            .collect()
    }
}

/// A header's figure: ASCII digits only; too many of them is as large as can be.
fn whole_number(text: &str) -> Option<u64> {
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some(text.parse().unwrap_or(u64::MAX))
}

fn json_figure(value: &serde_json::Value) -> Option<u64> {
    if let Some(whole) = value.as_u64() {
        return Some(whole);
    }
    let number = value.as_f64()?;
    if !number.is_finite() || number < 0.0 {
        return None;
    }
    // Rounded up; past u64 (only a float can be), as large as can be.
    Some(if number >= u64::MAX as f64 {
        u64::MAX
    } else {
        number.ceil() as u64
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn a_request_body_gives_the_whole_numbers_at_its_pointers_and_nothing_else() {
        let pointers = vec!["/max_tokens".to_owned(), "/n".to_owned(), "/a/b".to_owned()];
        let figures = request_figures(
            br#"{"max_tokens": 300.2, "n": "7", "a": {"b": 12}, "other": 1}"#,
            &pointers,
        );
        assert_eq!(
            figures.into_iter().collect::<Vec<_>>(),
            [("/a/b".to_owned(), 12), ("/max_tokens".to_owned(), 301)]
        );
        for body in [&b"not json"[..], b"", br#"{"max_tokens": -3}"#, b"[1,2]"] {
            assert!(request_figures(body, &pointers).is_empty(), "{body:?}");
        }
        let huge = request_figures(br#"{"max_tokens": 1e300}"#, &pointers);
        assert_eq!(huge.get("/max_tokens"), Some(&MAX_USAGE));
    }

    #[test]
    fn body_waits_are_known_while_they_live() {
        let wait = BodyWait::new(7);
        let other = BodyWait::new(8);
        assert!(waits_for_body(7) && waits_for_body(8) && !waits_for_body(9));
        drop(wait);
        assert!(!waits_for_body(7) && waits_for_body(8));
        drop(other);
        assert!(!waits_for_body(8));
    }

    fn reservation(from: UsageSource, token: &str) -> UsageReservation {
        UsageReservation {
            rule: "tokens".into(),
            reserved: 100,
            from,
            max: 10_000,
            unreported: 100,
            token: token.into(),
        }
    }

    fn pointer(p: &str, token: &str) -> UsageReservation {
        reservation(UsageSource::JsonPointer(p.into()), token)
    }

    fn headers<'a>(pairs: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |name| {
            pairs
                .iter()
                .find(|(n, _)| *n == name)
                .map(|(_, v)| (*v).to_owned())
        }
    }

    fn used(meter: Meter) -> Vec<u64> {
        meter.settlements().into_iter().map(|s| s.used).collect()
    }

    #[test]
    fn nothing_reserved_reads_nothing() {
        assert!(Meter::new(Vec::new()).is_none());
        let mut meter = Meter::new(vec![reservation(
            UsageSource::ResponseHeader("x-used".into()),
            "t",
        )])
        .unwrap();
        meter.on_response_headers(headers(&[("content-type", "application/json")]));
        assert!(!meter.reads_body(), "a header source reads no body");
    }

    #[test]
    fn a_header_says_a_whole_number_or_nothing() {
        for (value, expected) in [
            ("250", 250),
            (" 7 ", 7),
            ("99999999999999999999999", 10_000),
            ("12345", 10_000),
            ("-5", 100),
            ("1.5", 100),
            ("many", 100),
            ("", 100),
        ] {
            let mut meter = Meter::new(vec![reservation(
                UsageSource::ResponseHeader("x-used".into()),
                "t",
            )])
            .unwrap();
            meter.on_response_headers(headers(&[("x-used", value)]));
            assert_eq!(used(meter), [expected], "{value:?}");
        }
    }

    #[test]
    fn a_json_body_is_read_whole_by_each_pointer() {
        let body = br#"{"usage":{"prompt_tokens":12,"completion_tokens":30,"total_tokens":42}}"#;
        let mut meter = Meter::new(vec![
            pointer("/usage/prompt_tokens", "in"),
            pointer("/usage/completion_tokens", "out"),
            pointer("/usage/missing", "none"),
        ])
        .unwrap();
        meter.on_response_headers(headers(&[(
            "content-type",
            "application/json; charset=utf-8",
        )]));
        assert!(meter.reads_body());
        let (first, rest) = body.split_at(20);
        meter.on_body(first, false);
        meter.on_body(rest, true);
        assert!(!meter.reads_body());
        let settled = meter.settlements();
        assert_eq!(
            settled
                .iter()
                .map(|s| (s.reservation.as_str(), s.used))
                .collect::<Vec<_>>(),
            [("in", 12), ("out", 30), ("none", 100)]
        );
    }

    #[test]
    fn hostile_figures_are_answered_deliberately() {
        for (figure, expected) in [
            ("-3", 100),
            ("2.2", 3),
            ("1e300", 10_000),
            ("\"42\"", 100),
            ("null", 100),
            ("[1]", 100),
            ("18446744073709551615", 10_000),
        ] {
            let mut meter = Meter::new(vec![pointer("/n", "t")]).unwrap();
            meter.on_response_headers(headers(&[("content-type", "application/json")]));
            meter.on_body(format!(r#"{{"n":{figure}}}"#).as_bytes(), true);
            assert_eq!(used(meter), [expected], "{figure}");
        }
    }

    #[test]
    fn a_body_that_is_not_json_or_too_large_or_cut_off_is_unreported() {
        let mut gzip = Meter::new(vec![pointer("/n", "t")]).unwrap();
        gzip.on_response_headers(headers(&[
            ("content-type", "application/json"),
            ("content-encoding", "gzip"),
        ]));
        assert!(!gzip.reads_body(), "a compressed body is not read");
        assert_eq!(used(gzip), [100]);

        let mut html = Meter::new(vec![pointer("/n", "t")]).unwrap();
        html.on_response_headers(headers(&[("content-type", "text/html")]));
        assert!(!html.reads_body());
        assert_eq!(used(html), [100]);

        let mut broken = Meter::new(vec![pointer("/n", "t")]).unwrap();
        broken.on_response_headers(headers(&[("content-type", "application/json")]));
        broken.on_body(b"{\"n\": 5", true);
        assert_eq!(used(broken), [100]);

        let mut cut = Meter::new(vec![pointer("/n", "t")]).unwrap();
        cut.on_response_headers(headers(&[("content-type", "application/json")]));
        cut.on_body(br#"{"n":5}"#, false);
        assert_eq!(used(cut), [100], "the body never ended");

        let mut huge = Meter::new(vec![pointer("/n", "t")]).unwrap();
        huge.on_response_headers(headers(&[("content-type", "application/json")]));
        huge.on_body(br#"{"n":5,"pad":""#, false);
        let pad = vec![b'a'; 64 * 1024];
        for _ in 0..5 {
            huge.on_body(&pad, false);
        }
        assert!(!huge.reads_body(), "no longer kept");
        huge.on_body(b"\"}", true);
        assert_eq!(used(huge), [100]);
    }

    fn stream(events: &[&str]) -> String {
        events
            .iter()
            .map(|data| format!("data: {data}\n\n"))
            .collect()
    }

    #[test]
    fn an_event_stream_counts_the_last_event_that_says() {
        let body = stream(&[
            r#"{"choices":[{"delta":{"content":"Hel"}}],"usage":null}"#,
            r#"{"choices":[{"delta":{"content":"lo"}}],"usage":null}"#,
            r#"{"choices":[],"usage":{"prompt_tokens":9,"completion_tokens":2,"total_tokens":11}}"#,
            "[DONE]",
        ]);
        for piece in [1, 7, 64, body.len()] {
            let mut meter = Meter::new(vec![
                pointer("/usage/total_tokens", "all"),
                pointer("/usage/completion_tokens", "out"),
            ])
            .unwrap();
            meter.on_response_headers(headers(&[("content-type", "text/event-stream")]));
            let chunks: Vec<&[u8]> = body.as_bytes().chunks(piece).collect();
            for (i, chunk) in chunks.iter().enumerate() {
                meter.on_body(chunk, i + 1 == chunks.len());
            }
            assert_eq!(used(meter), [11, 2], "pieces of {piece}");
        }
    }

    #[test]
    fn an_event_stream_cut_before_its_usage_is_unreported_and_long_events_are_skipped() {
        let mut cut = Meter::new(vec![pointer("/usage/total_tokens", "t")]).unwrap();
        cut.on_response_headers(headers(&[("content-type", "text/event-stream")]));
        cut.on_body(stream(&[r#"{"usage":null}"#]).as_bytes(), false);
        cut.on_body(b"data: {\"usage\":{\"total_", false);
        assert_eq!(used(cut), [100]);

        let mut long = Meter::new(vec![pointer("/usage/total_tokens", "t")]).unwrap();
        long.on_response_headers(headers(&[("content-type", "text/event-stream")]));
        let padding = "x".repeat(MAX_EVENT_BYTES);
        long.on_body(
            stream(&[&format!(
                r#"{{"usage":{{"total_tokens":5}},"pad":"{padding}"}}"#
            )])
            .as_bytes(),
            false,
        );
        long.on_body(
            stream(&[r#"{"usage":{"total_tokens":8}}"#]).as_bytes(),
            true,
        );
        assert_eq!(
            used(long),
            [8],
            "the overlong event was skipped, the next one read"
        );
    }

    #[test]
    fn a_piece_that_cannot_be_read_leaves_the_body_unreported() {
        let mut meter = Meter::new(vec![
            pointer("/usage/total_tokens", "body"),
            reservation(UsageSource::ResponseHeader("x-used".into()), "header"),
        ])
        .unwrap();
        meter.on_response_headers(headers(&[
            ("content-type", "text/event-stream"),
            ("x-used", "3"),
        ]));
        meter.on_body(
            stream(&[r#"{"usage":{"total_tokens":4}}"#]).as_bytes(),
            false,
        );
        meter.body_unreadable();
        assert!(!meter.reads_body());
        assert_eq!(used(meter), [100, 3]);
    }

    #[test]
    fn body_callbacks_are_wanted_only_while_a_meter_reads_a_body() {
        let before = any_body_meter();
        assert!(!before, "no meter yet on this test's thread");
        let header_only = Meter::new(vec![reservation(
            UsageSource::ResponseHeader("x-used".into()),
            "h",
        )]);
        assert!(!any_body_meter(), "a header source reads no body");
        let body = Meter::new(vec![pointer("/n", "b")]).unwrap();
        let other = Meter::new(vec![pointer("/n", "c")]).unwrap();
        assert!(any_body_meter());
        assert_eq!(body.settlements().len(), 1);
        assert!(any_body_meter(), "one still reads");
        drop(other);
        drop(header_only);
        assert!(!any_body_meter());
    }

    #[test]
    fn an_endless_stream_keeps_one_bounded_event() {
        let mut meter = Meter::new(vec![pointer("/usage/total_tokens", "t")]).unwrap();
        meter.on_response_headers(headers(&[("content-type", "text/event-stream")]));
        let chunk = vec![b'a'; 1024 * 1024];
        for _ in 0..4 {
            meter.on_body(&chunk, false);
        }
        let Body::EventStream { line, data, .. } = &meter.body else {
            panic!("an event stream");
        };
        assert!(line.len() <= MAX_EVENT_BYTES && data.len() <= MAX_EVENT_BYTES);
    }

    proptest! {
        /// Whatever bytes a body holds and however they are cut, reading it ends with one
        /// settlement per reservation, each at most its `max`.
        #[test]
        fn any_body_settles_every_reservation_within_its_max(
            body in proptest::collection::vec(any::<u8>(), 0..2048),
            cut in 1usize..64,
            event_stream in any::<bool>(),
        ) {
            let mut meter = Meter::new(vec![pointer("/usage/total_tokens", "a"), pointer("/n", "b")]).unwrap();
            let content_type = if event_stream { "text/event-stream" } else { "application/json" };
            meter.on_response_headers(headers(&[("content-type", content_type)]));
            let chunks: Vec<&[u8]> = body.chunks(cut).collect();
            for (i, chunk) in chunks.iter().enumerate() {
                meter.on_body(chunk, i + 1 == chunks.len());
            }
            let settled = meter.settlements();
            prop_assert_eq!(settled.len(), 2);
            prop_assert!(settled.iter().all(|s| s.used <= 10_000));
        }
    }
}
