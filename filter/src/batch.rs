//! Batching checks across requests, per Envoy worker.
//!
//! A request that needs a decision registers here and waits (paused in Envoy). While no
//! batch is out, the next one leaves at once; while one is out, requests gather for the
//! next, which leaves the moment the reply to the previous one is in. There is no timer:
//! at low load every request goes alone, under load batches form by themselves.
//!
//! The root context owns every batch callout (a callout owned by a request's context is
//! cancelled with it, and the requests behind it would wait forever). The host glue wakes
//! the root, sends what [`Batcher::next_batch`] gives, and hands each request its verdict
//! through the request's [`Slot`]. Everything here is plain Rust, tested natively.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::rc::Rc;

use sluice_protocol::{Check, CheckRequest};

use crate::config::FailureMode;
use crate::decision::Verdict;

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
    check: Check,
}

#[derive(Debug)]
struct InFlight {
    token: u32,
    sent_at_ms: u64,
    members: Vec<Member>,
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
}

#[derive(Debug)]
pub struct Batcher {
    max_batch: usize,
    max_waiting: usize,
    waiting: VecDeque<Waiting>,
    in_flight: Option<InFlight>,
    wake_requested: bool,
}

impl Batcher {
    /// `max_batch`: most checks one callout carries. `max_waiting`: most requests that may
    /// wait for a batch at once; past it requests are not queued.
    pub fn new(max_batch: usize, max_waiting: usize) -> Self {
        Batcher {
            max_batch: max_batch.max(1),
            max_waiting,
            waiting: VecDeque::new(),
            in_flight: None,
            wake_requested: false,
        }
    }

    pub fn register(&mut self, member: Member, check: Check) -> Registered {
        if self.waiting.len() >= self.max_waiting {
            return Registered::Overloaded;
        }
        self.waiting.push_back(Waiting { member, check });
        if self.in_flight.is_none() && !self.wake_requested {
            self.wake_requested = true;
            Registered::WakeRoot
        } else {
            Registered::Wait
        }
    }

    /// The root was woken (or a reply came in): the next batch to send, if nothing is out
    /// and someone waits. The caller sends it and reports with [`Batcher::sent`] or
    /// [`Batcher::not_sent`].
    pub fn next_batch(&mut self) -> Option<(Vec<Member>, CheckRequest)> {
        self.wake_requested = false;
        if self.in_flight.is_some() || self.waiting.is_empty() {
            return None;
        }
        let size = self.waiting.len().min(self.max_batch);
        let (members, checks) = self
            .waiting
            .drain(..size)
            .map(|waiting| (waiting.member, waiting.check))
            .unzip();
        Some((
            members,
            CheckRequest {
                checks,
                hold_delays: false,
            },
        ))
    }

    pub fn sent(&mut self, token: u32, members: Vec<Member>, now_ms: u64) {
        self.in_flight = Some(InFlight {
            token,
            sent_at_ms: now_ms,
            members,
        });
    }

    /// The callout for a batch could not be dispatched: its members get the failure mode.
    pub fn not_sent(&mut self) {
        self.in_flight = None;
    }

    /// The reply for `token` arrived: the batch's members, in the order of their checks;
    /// `None` for a token that is not the batch in flight (a release call's reply).
    pub fn complete(&mut self, token: u32) -> Option<Vec<Member>> {
        match &self.in_flight {
            Some(batch) if batch.token == token => self.in_flight.take().map(|b| b.members),
            _ => None,
        }
    }

    /// A request went away before its decision: it leaves the queue. (If it is in the
    /// batch that is out, its verdict is simply not delivered.)
    pub fn cancel(&mut self, context_id: u32) {
        self.waiting
            .retain(|waiting| waiting.member.context_id != context_id);
    }

    /// A watchdog for the impossible: a batch out for longer than `limit_ms` (Envoy answers
    /// every callout by its timeout) is given up; its members get the failure mode.
    pub fn overdue(&mut self, now_ms: u64, limit_ms: u64) -> Option<Vec<Member>> {
        match &self.in_flight {
            Some(batch) if now_ms.saturating_sub(batch.sent_at_ms) > limit_ms => {
                self.in_flight.take().map(|b| b.members)
            }
            _ => None,
        }
    }

    pub fn waiting(&self) -> usize {
        self.waiting.len()
    }

    pub fn in_flight(&self) -> bool {
        self.in_flight.is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_protocol::ClientId;

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

    fn ids(members: &[Member]) -> Vec<u32> {
        members.iter().map(|m| m.context_id).collect()
    }

    #[test]
    fn a_lone_request_wakes_the_root_and_goes_alone() {
        let mut batcher = Batcher::new(10, 100);
        assert_eq!(batcher.register(member(1), check(1)), Registered::WakeRoot);
        let (members, request) = batcher.next_batch().unwrap();
        assert_eq!(ids(&members), [1]);
        assert_eq!(request.checks, [check(1)]);
        assert!(
            !request.hold_delays,
            "the filter holds delayed requests itself"
        );
    }

    #[test]
    fn requests_gather_while_a_batch_is_out_and_leave_together_in_order() {
        let mut batcher = Batcher::new(10, 100);
        batcher.register(member(1), check(1));
        let (members, _) = batcher.next_batch().unwrap();
        batcher.sent(77, members, 0);
        for n in 2..=4 {
            assert_eq!(batcher.register(member(n), check(n)), Registered::Wait);
        }
        assert!(
            batcher.next_batch().is_none(),
            "only one batch out at a time"
        );
        assert_eq!(ids(&batcher.complete(77).unwrap()), [1]);
        let (members, request) = batcher.next_batch().unwrap();
        assert_eq!(ids(&members), [2, 3, 4]);
        assert_eq!(request.checks, [check(2), check(3), check(4)]);
    }

    #[test]
    fn batches_are_capped_and_the_rest_waits() {
        let mut batcher = Batcher::new(2, 100);
        for n in 1..=5 {
            batcher.register(member(n), check(n));
        }
        let (first, _) = batcher.next_batch().unwrap();
        assert_eq!(ids(&first), [1, 2]);
        batcher.sent(1, first, 0);
        batcher.complete(1);
        let (second, _) = batcher.next_batch().unwrap();
        assert_eq!(ids(&second), [3, 4]);
        assert_eq!(batcher.waiting(), 1);
    }

    #[test]
    fn only_one_wake_up_is_asked_for_until_the_root_runs() {
        let mut batcher = Batcher::new(10, 100);
        assert_eq!(batcher.register(member(1), check(1)), Registered::WakeRoot);
        assert_eq!(batcher.register(member(2), check(2)), Registered::Wait);
        let (members, _) = batcher.next_batch().unwrap();
        assert_eq!(ids(&members), [1, 2]);
        batcher.sent(5, members, 0);
        batcher.complete(5);
        assert!(batcher.next_batch().is_none());
        assert_eq!(batcher.register(member(3), check(3)), Registered::WakeRoot);
    }

    #[test]
    fn a_request_that_leaves_is_not_sent() {
        let mut batcher = Batcher::new(10, 100);
        batcher.register(member(1), check(1));
        batcher.register(member(2), check(2));
        batcher.cancel(1);
        let (members, request) = batcher.next_batch().unwrap();
        assert_eq!(ids(&members), [2]);
        assert_eq!(request.checks.len(), 1);
    }

    #[test]
    fn replies_for_other_tokens_are_not_the_batch() {
        let mut batcher = Batcher::new(10, 100);
        batcher.register(member(1), check(1));
        let (members, _) = batcher.next_batch().unwrap();
        batcher.sent(9, members, 0);
        assert!(batcher.complete(8).is_none());
        assert!(batcher.in_flight());
        assert!(batcher.complete(9).is_some());
    }

    #[test]
    fn a_batch_that_was_not_sent_frees_the_way() {
        let mut batcher = Batcher::new(10, 100);
        batcher.register(member(1), check(1));
        let _ = batcher.next_batch().unwrap();
        batcher.not_sent();
        assert_eq!(batcher.register(member(2), check(2)), Registered::WakeRoot);
    }

    #[test]
    fn overdue_batches_are_given_up_and_the_queue_is_bounded() {
        let mut batcher = Batcher::new(10, 2);
        batcher.register(member(1), check(1));
        let (members, _) = batcher.next_batch().unwrap();
        batcher.sent(3, members, 1_000);
        assert!(batcher.overdue(1_500, 1_000).is_none());
        assert_eq!(ids(&batcher.overdue(2_001, 1_000).unwrap()), [1]);
        assert!(!batcher.in_flight());
        batcher.register(member(2), check(2));
        batcher.register(member(3), check(3));
        assert_eq!(
            batcher.register(member(4), check(4)),
            Registered::Overloaded
        );
    }
}
