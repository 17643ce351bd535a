//! Batching checks across requests, per Envoy worker.
//!
//! A request that needs a decision registers here and waits (paused in Envoy). While no
//! batch is out, the next one leaves at once; while one is out, requests gather for the
//! next, which leaves the moment a reply is in. There is no timer: at low load every
//! request goes alone, under load batches form by themselves. A full batch does not wait
//! for a reply: it leaves at once, up to a number of batches out together, so one slow
//! reply does not hold back every request that arrives meanwhile.
//!
//! A batch is bounded by bytes as well as by checks: every call body stays within the
//! controller's [`MAX_CALL_BODY_BYTES`], however long the paths and header values of the
//! requests in it. Each check is encoded once, when it registers: its size is known from
//! then on, and the call body is those encodings put together. A check that could not fit
//! in a call even alone is refused at registration ([`Registered::TooLarge`]): only that
//! request gets the failure mode.
//!
//! The root context owns every batch callout (a callout owned by a request's context is
//! cancelled with it, and the requests behind it would wait forever). The host glue wakes
//! the root, sends what [`Batcher::next_batch`] gives, and hands each request its verdict
//! through the request's [`Slot`]. Everything here is plain Rust, tested natively.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::rc::Rc;

use sluice_protocol::{Check, MAX_CALL_BODY_BYTES};

use crate::config::FailureMode;
use crate::decision::Verdict;

/// Bytes of a call body that are not checks, at most: `{"checks":[`, `]`, the separators,
/// `"hold_delays":false`, `"settles":true` and a `lease_holder` of up to 64 bytes (the root
/// names one of 32), with room to spare. A test holds the encoded request to it.
pub const ENVELOPE_BYTES: usize = 256;

/// Most bytes of checks (each with the comma before it) one call carries.
pub const MAX_CHECKS_BYTES: usize = MAX_CALL_BODY_BYTES - ENVELOPE_BYTES;

/// The call body of a batch: the checks, each as it was encoded when it registered, inside
/// the envelope [`sluice_protocol::CheckRequest`] is written with (`hold_delays` false: a
/// batching filter holds a leaky bucket's delay itself; `lease_holder` when the worker takes
/// leases; `settles` when a usage rule is in force). A test holds it to what `serde_json`
/// writes for the same request.
pub fn call_body(checks: &[Vec<u8>], lease_holder: Option<&str>, settles: bool) -> Vec<u8> {
    let checks_bytes: usize = checks.iter().map(|check| check.len() + 1).sum();
    let mut body = Vec::with_capacity(checks_bytes + ENVELOPE_BYTES);
    body.extend_from_slice(br#"{"checks":["#);
    for (i, check) in checks.iter().enumerate() {
        if i > 0 {
            body.push(b',');
        }
        body.extend_from_slice(check);
    }
    body.extend_from_slice(br#"],"hold_delays":false"#);
    if let Some(holder) = lease_holder {
        body.extend_from_slice(br#","lease_holder":"#);
        body.extend_from_slice(serde_json::Value::from(holder).to_string().as_bytes());
    }
    if settles {
        body.extend_from_slice(br#","settles":true"#);
    }
    body.push(b'}');
    body
}

/// Where the root leaves a request's verdict for the request's own context to read.
pub type Slot = Rc<RefCell<Option<Verdict>>>;

/// A request in a batch: its Envoy context, where its verdict goes, and what its verdict
/// needs besides the decision.
#[derive(Debug, Clone)]
pub struct Member {
    pub context_id: u32,
    pub slot: Slot,
    /// The check's fingerprint, under which a denial is cached.
    pub fingerprint: u64,
    /// What happens to the request if its batch gets no answer.
    pub failure_mode: FailureMode,
}

#[derive(Debug)]
struct Waiting {
    member: Member,
    /// The check as it goes into the call body (JSON).
    encoded: Vec<u8>,
}

impl Waiting {
    /// What the check adds to a call body: its encoded size and a comma.
    fn bytes(&self) -> usize {
        self.encoded.len() + 1
    }
}

/// A batch that may leave: who is in it, and its call body.
#[derive(Debug)]
pub struct Outgoing {
    pub members: Vec<Member>,
    pub body: Vec<u8>,
}

#[derive(Debug)]
struct InFlight {
    token: u32,
    /// When the batch first left (a retry keeps the first attempt's deadline).
    sent_at_ms: u64,
    members: Vec<Member>,
    /// The request, kept for one more attempt; `None` once it was tried again.
    retry: Option<Vec<u8>>,
}

/// A batch whose reply came in.
#[derive(Debug)]
pub struct Completed {
    pub members: Vec<Member>,
    pub sent_at_ms: u64,
    /// The request, if it may be tried once more.
    pub retry: Option<Vec<u8>>,
}

/// What a request that registers should do next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Registered {
    /// Wait; the root must be woken to send a batch (nothing is out, and no wake-up is
    /// already on its way).
    WakeRoot,
    /// Wait; the reply to the batch that is out (or a wake-up already asked for) will send it.
    Wait,
    /// Too many requests wait already: decide this one by the failure mode.
    Overloaded,
    /// The check alone (`bytes`, encoded) would make a call body larger than the controller
    /// reads: decide this one by the failure mode. It was not queued.
    TooLarge { bytes: usize },
}

/// How many checks a batch carries and how many batches may be out at once.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Most checks one callout carries.
    pub max_batch: usize,
    /// Most batches out at once; while one is out, another leaves only when it is full or
    /// a reply has just come in.
    pub max_in_flight: usize,
    /// Most requests that may wait for a batch at once; past it requests are not queued.
    pub max_waiting: usize,
}

#[derive(Debug)]
pub struct Batcher {
    limits: Limits,
    /// Most bytes of checks one batch carries ([`MAX_CHECKS_BYTES`] but in tests).
    max_bytes: usize,
    waiting: VecDeque<Waiting>,
    /// What the waiting checks add up to in call bodies.
    waiting_bytes: usize,
    in_flight: Vec<InFlight>,
    wake_requested: bool,
    /// A reply came in since the last batch left: the next may leave though not full.
    reply_in: bool,
}

impl Batcher {
    pub fn new(limits: Limits) -> Self {
        Batcher {
            limits: Limits {
                max_batch: limits.max_batch.max(1),
                max_in_flight: limits.max_in_flight.max(1),
                max_waiting: limits.max_waiting,
            },
            max_bytes: MAX_CHECKS_BYTES,
            waiting: VecDeque::new(),
            waiting_bytes: 0,
            in_flight: Vec::new(),
            wake_requested: false,
            reply_in: false,
        }
    }

    /// The batcher with batches of at most `max_bytes` bytes of checks (for tests: every
    /// real batcher carries [`MAX_CHECKS_BYTES`]).
    pub fn with_max_bytes(mut self, max_bytes: usize) -> Self {
        self.max_bytes = max_bytes.min(MAX_CHECKS_BYTES);
        self
    }

    pub fn register(&mut self, member: Member, check: &Check) -> Registered {
        let Ok(encoded) = serde_json::to_vec(check) else {
            return Registered::TooLarge { bytes: usize::MAX };
        };
        let waiting = Waiting { member, encoded };
        let bytes = waiting.bytes();
        if bytes > self.max_bytes {
            return Registered::TooLarge { bytes };
        }
        if self.waiting.len() >= self.limits.max_waiting {
            return Registered::Overloaded;
        }
        self.waiting_bytes += bytes;
        self.waiting.push_back(waiting);
        if self.may_send() && !self.wake_requested {
            self.wake_requested = true;
            Registered::WakeRoot
        } else {
            Registered::Wait
        }
    }

    /// Whether a batch may leave now: any that waits when nothing is out or a reply has
    /// just come in; while others are out, a full one if fewer than the most are out.
    fn may_send(&self) -> bool {
        match self.in_flight.len() {
            _ if self.waiting.is_empty() => false,
            0 => true,
            out if out >= self.limits.max_in_flight => false,
            _ => self.reply_in || self.full_batch_waits(),
        }
    }

    /// Whether the waiting checks fill a batch, by count or by bytes.
    fn full_batch_waits(&self) -> bool {
        self.waiting.len() >= self.limits.max_batch || self.waiting_bytes > self.max_bytes
    }

    /// The root was woken (or a reply came in): the next batch to send, if one may leave
    /// (see [`Batcher::may_send`]), its body naming `lease_holder` if the worker takes
    /// leases and saying whether it `settles` usage. The caller sends it and reports with [`Batcher::sent`] (or, if it could not,
    /// gives its members the failure mode), and asks again until there is none.
    pub fn next_batch(&mut self, lease_holder: Option<&str>, settles: bool) -> Option<Outgoing> {
        self.wake_requested = false;
        let may_send = self.may_send();
        self.reply_in = false;
        if !may_send {
            return None;
        }
        // As many as fit by count and by bytes; the first always fits (see `register`).
        let mut size = 0;
        let mut bytes = 0usize;
        for waiting in self.waiting.iter().take(self.limits.max_batch) {
            if size > 0 && bytes.saturating_add(waiting.bytes()) > self.max_bytes {
                break;
            }
            bytes = bytes.saturating_add(waiting.bytes());
            size += 1;
        }
        self.waiting_bytes = self.waiting_bytes.saturating_sub(bytes);
        let (members, checks): (Vec<Member>, Vec<Vec<u8>>) = self
            .waiting
            .drain(..size)
            .map(|waiting| (waiting.member, waiting.encoded))
            .unzip();
        Some(Outgoing {
            members,
            body: call_body(&checks, lease_holder, settles),
        })
    }

    pub fn sent(&mut self, token: u32, members: Vec<Member>, now_ms: u64) {
        self.sent_retriable(token, members, now_ms, None);
    }

    /// A batch left as `token`; `request` is kept to try it once more if it fails.
    pub fn sent_retriable(
        &mut self,
        token: u32,
        members: Vec<Member>,
        sent_at_ms: u64,
        request: Option<Vec<u8>>,
    ) {
        self.in_flight.push(InFlight {
            token,
            sent_at_ms,
            members,
            retry: request,
        });
    }

    /// The reply for `token` arrived: the batch's members, in the order of their checks;
    /// `None` for a token that is no batch in flight (a release call's reply).
    pub fn complete(&mut self, token: u32) -> Option<Vec<Member>> {
        self.complete_batch(token).map(|batch| batch.members)
    }

    /// [`Batcher::complete`], with what a second attempt needs.
    pub fn complete_batch(&mut self, token: u32) -> Option<Completed> {
        let index = self.in_flight.iter().position(|b| b.token == token)?;
        self.reply_in = true;
        let batch = self.in_flight.swap_remove(index);
        Some(Completed {
            members: batch.members,
            sent_at_ms: batch.sent_at_ms,
            retry: batch.retry,
        })
    }

    /// A request went away before its decision: it leaves the queue (if it is in a batch
    /// that is out, its verdict is simply not delivered). The fingerprint of its check, if
    /// it was still waiting: its lease ask, if it made one, will have no answer.
    pub fn cancel(&mut self, context_id: u32) -> Option<u64> {
        let at = self
            .waiting
            .iter()
            .position(|waiting| waiting.member.context_id == context_id)?;
        let waiting = self.waiting.remove(at)?;
        self.waiting_bytes = self.waiting_bytes.saturating_sub(waiting.bytes());
        Some(waiting.member.fingerprint)
    }

    /// The wake-up asked for with [`Registered::WakeRoot`] could not be sent: the next
    /// request to register asks again.
    pub fn wake_failed(&mut self) {
        self.wake_requested = false;
    }

    /// A watchdog for the impossible: batches out for longer than `limit_ms` (Envoy answers
    /// every callout by its timeout) are given up; their members get the failure mode.
    pub fn overdue(&mut self, now_ms: u64, limit_ms: u64) -> Vec<Member> {
        let (lost, kept) = std::mem::take(&mut self.in_flight)
            .into_iter()
            .partition(|batch| now_ms.saturating_sub(batch.sent_at_ms) > limit_ms);
        self.in_flight = kept;
        lost.into_iter().flat_map(|batch| batch.members).collect()
    }

    pub fn waiting(&self) -> usize {
        self.waiting.len()
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_protocol::{CheckRequest, ClientId};

    fn check(n: u32) -> Check {
        Check::new(ClientId::ip(format!("10.0.0.{n}")), "", "GET", "/", 1)
    }

    fn member(context_id: u32) -> Member {
        Member {
            context_id,
            slot: Rc::new(RefCell::new(None)),
            fingerprint: 0,
            failure_mode: FailureMode::Allow,
        }
    }

    /// One batch out at a time.
    fn one_at_a_time(max_batch: usize, max_waiting: usize) -> Batcher {
        Batcher::new(Limits {
            max_batch,
            max_in_flight: 1,
            max_waiting,
        })
    }

    /// Several batches out at once, and room for 100 waiting.
    fn several_at_once(max_batch: usize, max_in_flight: usize) -> Batcher {
        Batcher::new(Limits {
            max_batch,
            max_in_flight,
            max_waiting: 100,
        })
    }

    fn ids(members: &[Member]) -> Vec<u32> {
        members.iter().map(|m| m.context_id).collect()
    }

    #[test]
    fn a_lone_request_wakes_the_root_and_goes_alone() {
        let mut batcher = one_at_a_time(10, 100);
        assert_eq!(batcher.register(member(1), &check(1)), Registered::WakeRoot);
        let Outgoing { members, body } = batcher.next_batch(None, false).unwrap();
        assert_eq!(ids(&members), [1]);
        let request: CheckRequest = serde_json::from_slice(&body).unwrap();
        assert_eq!(request.checks, [check(1)]);
        assert!(
            !request.hold_delays,
            "the filter holds delayed requests itself"
        );
        assert_eq!(request.lease_holder, None);
    }

    #[test]
    fn requests_gather_while_a_batch_is_out_and_leave_together_in_order() {
        let mut batcher = one_at_a_time(10, 100);
        batcher.register(member(1), &check(1));
        let Outgoing { members, body: _ } = batcher.next_batch(None, false).unwrap();
        batcher.sent(77, members, 0);
        for n in 2..=4 {
            assert_eq!(batcher.register(member(n), &check(n)), Registered::Wait);
        }
        assert!(
            batcher.next_batch(None, false).is_none(),
            "only one batch out at a time"
        );
        assert_eq!(ids(&batcher.complete(77).unwrap()), [1]);
        let Outgoing { members, body } = batcher.next_batch(None, false).unwrap();
        assert_eq!(ids(&members), [2, 3, 4]);
        assert_eq!(checks_in(&body), [check(2), check(3), check(4)]);
    }

    #[test]
    fn batches_are_capped_and_the_rest_waits() {
        let mut batcher = one_at_a_time(2, 100);
        for n in 1..=5 {
            batcher.register(member(n), &check(n));
        }
        let Outgoing {
            members: first,
            body: _,
        } = batcher.next_batch(None, false).unwrap();
        assert_eq!(ids(&first), [1, 2]);
        batcher.sent(1, first, 0);
        batcher.complete(1);
        let Outgoing {
            members: second,
            body: _,
        } = batcher.next_batch(None, false).unwrap();
        assert_eq!(ids(&second), [3, 4]);
        assert_eq!(batcher.waiting(), 1);
    }

    #[test]
    fn only_one_wake_up_is_asked_for_until_the_root_runs() {
        let mut batcher = one_at_a_time(10, 100);
        assert_eq!(batcher.register(member(1), &check(1)), Registered::WakeRoot);
        assert_eq!(batcher.register(member(2), &check(2)), Registered::Wait);
        let Outgoing { members, body: _ } = batcher.next_batch(None, false).unwrap();
        assert_eq!(ids(&members), [1, 2]);
        batcher.sent(5, members, 0);
        batcher.complete(5);
        assert!(batcher.next_batch(None, false).is_none());
        assert_eq!(batcher.register(member(3), &check(3)), Registered::WakeRoot);
    }

    #[test]
    fn a_request_that_leaves_is_not_sent() {
        let mut batcher = one_at_a_time(10, 100);
        batcher.register(member(1), &check(1));
        batcher.register(member(2), &check(2));
        batcher.cancel(1);
        let Outgoing { members, body } = batcher.next_batch(None, false).unwrap();
        assert_eq!(ids(&members), [2]);
        assert_eq!(checks_in(&body), [check(2)]);
    }

    #[test]
    fn replies_for_other_tokens_are_not_the_batch() {
        let mut batcher = one_at_a_time(10, 100);
        batcher.register(member(1), &check(1));
        let Outgoing { members, body: _ } = batcher.next_batch(None, false).unwrap();
        batcher.sent(9, members, 0);
        assert!(batcher.complete(8).is_none());
        assert_eq!(batcher.in_flight(), 1);
        assert!(batcher.complete(9).is_some());
    }

    #[test]
    fn a_batch_that_was_not_sent_frees_the_way() {
        let mut batcher = one_at_a_time(10, 100);
        batcher.register(member(1), &check(1));
        let _ = batcher.next_batch(None, false).unwrap();
        assert_eq!(batcher.register(member(2), &check(2)), Registered::WakeRoot);
    }

    #[test]
    fn while_a_batch_is_out_only_a_full_one_leaves_early_up_to_the_most_in_flight() {
        let mut batcher = several_at_once(2, 2);
        batcher.register(member(1), &check(1));
        let Outgoing {
            members: first,
            body: _,
        } = batcher.next_batch(None, false).unwrap();
        batcher.sent(1, first, 0);
        assert_eq!(batcher.register(member(2), &check(2)), Registered::Wait);
        assert!(
            batcher.next_batch(None, false).is_none(),
            "half a batch waits for a reply"
        );
        assert_eq!(
            batcher.register(member(3), &check(3)),
            Registered::WakeRoot,
            "a full batch wakes the root"
        );
        let Outgoing {
            members: second,
            body: _,
        } = batcher.next_batch(None, false).unwrap();
        assert_eq!(ids(&second), [2, 3]);
        batcher.sent(2, second, 0);
        batcher.register(member(4), &check(4));
        assert_eq!(batcher.register(member(5), &check(5)), Registered::Wait);
        assert!(
            batcher.next_batch(None, false).is_none(),
            "two are out already"
        );
        assert_eq!(batcher.in_flight(), 2);
        assert_eq!(ids(&batcher.complete(2).unwrap()), [2, 3]);
        let Outgoing {
            members: third,
            body: _,
        } = batcher.next_batch(None, false).unwrap();
        assert_eq!(ids(&third), [4, 5]);
        batcher.sent(3, third, 0);
        assert_eq!(ids(&batcher.complete(1).unwrap()), [1]);
        assert_eq!(ids(&batcher.complete(3).unwrap()), [4, 5]);
        assert_eq!(batcher.in_flight(), 0);
    }

    #[test]
    fn a_reply_lets_the_next_batch_leave_unfilled_though_another_is_out() {
        let mut batcher = several_at_once(10, 2);
        batcher.register(member(1), &check(1));
        let Outgoing {
            members: first,
            body: _,
        } = batcher.next_batch(None, false).unwrap();
        batcher.sent(1, first, 0);
        batcher.register(member(2), &check(2));
        // A full batch of 10 leaves early and stays out.
        for n in 3..=12 {
            batcher.register(member(n), &check(n));
        }
        let Outgoing {
            members: full,
            body: _,
        } = batcher.next_batch(None, false).unwrap();
        assert_eq!(ids(&full), (2..=11).collect::<Vec<_>>());
        batcher.sent(2, full, 0);
        batcher.register(member(13), &check(13));
        assert!(batcher.next_batch(None, false).is_none());
        batcher.complete(1);
        let Outgoing {
            members: next,
            body: _,
        } = batcher.next_batch(None, false).unwrap();
        assert_eq!(ids(&next), [12, 13], "the reply lets them go");
        batcher.sent(3, next, 0);
        batcher.register(member(14), &check(14));
        assert!(
            batcher.next_batch(None, false).is_none(),
            "one unfilled batch per reply, and two are out"
        );
    }

    #[test]
    fn every_overdue_batch_is_given_up_and_the_others_stay() {
        let mut batcher = several_at_once(1, 3);
        for (n, sent_at) in [(1, 0), (2, 500), (3, 2_000)] {
            batcher.register(member(n), &check(n));
            let Outgoing { members, body: _ } = batcher.next_batch(None, false).unwrap();
            batcher.sent(n, members, sent_at);
        }
        assert_eq!(ids(&batcher.overdue(2_001, 1_000)), [1, 2]);
        assert_eq!(batcher.in_flight(), 1);
        assert!(batcher.complete(3).is_some());
    }

    #[test]
    fn overdue_batches_are_given_up_and_the_queue_is_bounded() {
        let mut batcher = one_at_a_time(10, 2);
        batcher.register(member(1), &check(1));
        let Outgoing { members, body: _ } = batcher.next_batch(None, false).unwrap();
        batcher.sent(3, members, 1_000);
        assert!(batcher.overdue(1_500, 1_000).is_empty());
        assert_eq!(ids(&batcher.overdue(2_001, 1_000)), [1]);
        assert_eq!(batcher.in_flight(), 0);
        batcher.register(member(2), &check(2));
        batcher.register(member(3), &check(3));
        assert_eq!(
            batcher.register(member(4), &check(4)),
            Registered::Overloaded
        );
    }

    fn long_check(n: u32, path_bytes: usize) -> Check {
        let path = format!("/{n}/{}", "p".repeat(path_bytes));
        Check::new(ClientId::ip(format!("10.0.0.{n}")), "", "GET", &path, 1)
    }

    /// A lease holder as long as the one the root names.
    const HOLDER: &str = "0123456789abcdef0123456789abcdef";

    /// What a check adds to a call body: its encoding and a comma.
    fn encoded_len(check: &Check) -> usize {
        serde_json::to_vec(check).unwrap().len() + 1
    }

    fn checks_in(body: &[u8]) -> Vec<Check> {
        serde_json::from_slice::<CheckRequest>(body).unwrap().checks
    }

    #[test]
    fn a_call_body_is_what_serde_writes_for_the_same_request() {
        for count in [0, 1, 2, 17] {
            let checks: Vec<Check> = (0..count).map(check).collect();
            let encoded: Vec<Vec<u8>> = checks
                .iter()
                .map(|check| serde_json::to_vec(check).unwrap())
                .collect();
            for (holder, settles) in [
                (None, false),
                (Some(HOLDER), true),
                (Some("a \"quoted\" holder\n"), false),
            ] {
                let request = CheckRequest {
                    checks: checks.clone(),
                    hold_delays: false,
                    lease_holder: holder.map(str::to_owned),
                    settles,
                };
                assert_eq!(
                    String::from_utf8(call_body(&encoded, holder, settles)).unwrap(),
                    serde_json::to_string(&request).unwrap(),
                    "{count} checks, holder {holder:?}"
                );
            }
        }
    }

    #[test]
    fn the_envelope_of_a_call_fits_in_its_allowance() {
        for count in [1, 2, 100] {
            let mut batcher = one_at_a_time(1_000, 1_000);
            let counted: usize = (0..count).map(|n| encoded_len(&check(n))).sum();
            for n in 0..count {
                batcher.register(member(n), &check(n));
            }
            let Outgoing { members, body } = batcher.next_batch(Some(HOLDER), true).unwrap();
            assert_eq!(members.len(), count as usize);
            let whole = body.len();
            assert!(
                whole <= counted + ENVELOPE_BYTES,
                "{whole} > {counted} + envelope"
            );
            assert!(whole > counted, "the sizes are the checks' own");
        }
    }

    #[test]
    fn batches_are_split_by_bytes_and_a_full_one_leaves_early() {
        let size = encoded_len(&long_check(1, 1_000));
        // Room for three such checks a batch.
        let mut batcher = several_at_once(100, 2).with_max_bytes(3 * size + 10);
        for n in 1..=4 {
            batcher.register(member(n), &long_check(n, 1_000));
        }
        let Outgoing {
            members: first,
            body,
        } = batcher.next_batch(None, false).unwrap();
        assert_eq!(ids(&first), [1, 2, 3], "three fit, the fourth waits");
        assert!(body.len() <= 3 * size + 10 + ENVELOPE_BYTES);
        batcher.sent(1, first, 0);
        batcher.register(member(5), &long_check(5, 1_000));
        assert!(
            batcher.next_batch(None, false).is_none(),
            "two do not fill a batch"
        );
        assert_eq!(
            batcher.register(member(6), &long_check(6, 1_000)),
            Registered::Wait,
            "no more than a batch's worth waits: it waits for a reply"
        );
        batcher.register(member(7), &long_check(7, 1_000));
        let Outgoing {
            members: full,
            body: _,
        } = batcher.next_batch(None, false).unwrap();
        assert_eq!(
            ids(&full),
            [4, 5, 6],
            "full by bytes: it leaves though one is out"
        );
        assert_eq!(batcher.waiting(), 1);
        batcher.cancel(7);
        assert_eq!(
            batcher.waiting_bytes, 0,
            "what leaves the queue leaves its count"
        );
    }

    #[test]
    fn a_check_too_large_for_any_call_is_refused_alone() {
        let mut batcher = one_at_a_time(10, 100).with_max_bytes(2_000);
        assert_eq!(batcher.register(member(1), &check(1)), Registered::WakeRoot);
        let huge = long_check(2, 3_000);
        let bytes = encoded_len(&huge);
        assert_eq!(
            batcher.register(member(2), &huge),
            Registered::TooLarge { bytes }
        );
        let Outgoing { members, body: _ } = batcher.next_batch(None, false).unwrap();
        assert_eq!(ids(&members), [1], "the others go on as ever");
    }

    #[test]
    fn every_call_of_many_long_requests_stays_within_what_the_controller_reads() {
        let mut batcher = one_at_a_time(1_024, 10_000);
        for n in 0..400 {
            assert_ne!(
                batcher.register(member(n), &long_check(n, 7 * 1024)),
                Registered::Overloaded
            );
        }
        let mut sent = 0;
        let mut calls = 0;
        while let Some(Outgoing { members, body }) = batcher.next_batch(Some(HOLDER), true) {
            assert!(body.len() <= MAX_CALL_BODY_BYTES);
            sent += members.len();
            calls += 1;
            batcher.sent(calls, members, 0);
            batcher.complete(calls);
        }
        assert_eq!(sent, 400);
        assert!(calls >= 3, "{calls} calls");
    }
}
