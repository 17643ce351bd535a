//! Leases of quota a worker holds for leased rules: the controller took them from the
//! limits already, so the worker admits requests of the same kind from them without asking
//! anyone, until the lease is spent or ends. Kept per worker, by the request's decision
//! fingerprint (the denial cache's: client, request line, matched headers, configuration
//! version), so a lease only ever admits the kind of request it was granted for, under the
//! configuration it was granted under.

use std::collections::{HashMap, HashSet};

use sluice_protocol::{Decision, LeaseReturn};

/// Leases one worker asks for at most: past it, checks ask for none (they are decided as
/// they come) until ended leases are swept.
pub const MAX_LEASES: usize = 4_096;

/// A lease not spent this long after its grant is given back: it was sized to last about a
/// second of its kind's traffic, so the traffic has at least halved (or stopped). Its next
/// request asks again, for a lease sized to the traffic as it is now.
pub const RETURN_AFTER_MS: u64 = 2_000;

#[derive(Debug)]
struct Held {
    /// Requests the lease may still admit.
    left: u64,
    /// Admitted from it so far.
    used: u64,
    /// When it ends, by this worker's clock: counted from when the check was sent, so it
    /// never outlives the controller's end of it.
    ends_at_ms: u64,
    granted_at_ms: u64,
    /// The decision that came with it, for the rate-limit headers.
    decision: Decision,
    /// The grants' tokens (from a controller that gives them) and their units, oldest
    /// first: what gives the unused part back.
    grants: Vec<(String, u64)>,
}

impl Held {
    /// Returns of what is left, newest grant first (an older grant's window may have fewer
    /// of its requests left to give back to).
    fn returns(self) -> impl Iterator<Item = LeaseReturn> {
        let mut left = self.left;
        self.grants
            .into_iter()
            .rev()
            .filter_map(move |(grant, units)| {
                let unused = left.min(units);
                left -= unused;
                (unused > 0).then_some(LeaseReturn { grant, unused })
            })
    }
}

#[derive(Debug, Default)]
pub struct Leases {
    by_fingerprint: HashMap<u64, Held>,
    /// Kinds with a check out that asked for a lease: one ask at a time per kind, so that
    /// a worker never holds more of a kind than the controller reserved for it.
    asking: HashSet<u64>,
}

impl Leases {
    /// Keeps the lease that came with `decision` (for a check sent at `sent_at_ms`).
    pub fn hold(&mut self, fingerprint: u64, decision: &Decision, sent_at_ms: u64, now_ms: u64) {
        let Some(grant) = &decision.grant else {
            return;
        };
        let (units, ttl_ms) = (grant.units, grant.ttl_ms);
        let token = grant.token.clone().map(|token| (token, units));
        if units == 0 || !decision.allowed {
            return;
        }
        let ends_at_ms = sent_at_ms.saturating_add(ttl_ms);
        if let Some(held) = self.by_fingerprint.get_mut(&fingerprint) {
            // Requests of one kind that were already on their way when the first lease came
            // bring leases too: what they hold is added, never dropped (it was taken from
            // the limit). Both end within the same window, so the later end is safe.
            if now_ms < held.ends_at_ms && held.left > 0 {
                held.left = held.left.saturating_add(units);
                held.ends_at_ms = held.ends_at_ms.max(ends_at_ms);
                held.grants.extend(token);
                return;
            }
        }
        // Kept even past MAX_LEASES: the lease was taken from the limit already, and
        // dropping it would lose it. Checks ask for leases only while there is room
        // ([`Leases::may_ask`]), so only those already on their way can go past.
        self.by_fingerprint.insert(
            fingerprint,
            Held {
                left: units,
                used: 0,
                ends_at_ms,
                granted_at_ms: now_ms,
                decision: Decision {
                    grant: None,
                    ..decision.clone()
                },
                grants: token.into_iter().collect(),
            },
        );
    }

    /// Admits one request from the lease for `fingerprint`, if there is one with requests
    /// left: the decision to answer with. `Remaining` is what the controller reported with
    /// the grant less what this lease admitted since (other workers' use in between is not
    /// seen), and `Reset` counts down from the grant.
    pub fn admit(&mut self, fingerprint: u64, now_ms: u64) -> Option<Decision> {
        let held = self.by_fingerprint.get_mut(&fingerprint)?;
        if now_ms >= held.ends_at_ms || held.left == 0 {
            self.by_fingerprint.remove(&fingerprint);
            return None;
        }
        held.left -= 1;
        held.used += 1;
        let elapsed = now_ms.saturating_sub(held.granted_at_ms);
        let mut decision = held.decision.clone();
        for status in decision.policy.iter_mut().chain(decision.others.iter_mut()) {
            status.remaining = status.remaining.saturating_sub(held.used);
            status.reset_ms = status.reset_ms.saturating_sub(elapsed);
        }
        if held.left == 0 {
            self.by_fingerprint.remove(&fingerprint);
        }
        Some(decision)
    }

    /// Whether the check for `fingerprint` asks for a lease: when the worker has room for
    /// another and no other check of the kind is out asking. Each ask is answered by
    /// [`Leases::answered`].
    pub fn may_ask(&mut self, fingerprint: u64, now_ms: u64) -> bool {
        if self.by_fingerprint.len() >= MAX_LEASES {
            self.sweep(now_ms);
        }
        self.by_fingerprint.len() < MAX_LEASES && self.asking.insert(fingerprint)
    }

    /// The check for `fingerprint` was decided, or failed: the kind may ask again.
    pub fn answered(&mut self, fingerprint: u64) {
        if !self.asking.is_empty() {
            self.asking.remove(&fingerprint);
        }
    }

    /// Forgets the leases that ended.
    pub fn sweep(&mut self, now_ms: u64) {
        self.by_fingerprint
            .retain(|_, held| now_ms < held.ends_at_ms && held.left > 0);
    }

    /// Takes out the leases still live but not spent [`RETURN_AFTER_MS`] after their
    /// grant, and gives what they have left back.
    pub fn returns_due(&mut self, now_ms: u64) -> Vec<LeaseReturn> {
        let due: Vec<u64> = self
            .by_fingerprint
            .iter()
            .filter(|(_, held)| {
                now_ms < held.ends_at_ms
                    && held.left > 0
                    && !held.grants.is_empty()
                    && now_ms.saturating_sub(held.granted_at_ms) >= RETURN_AFTER_MS
            })
            .map(|(fingerprint, _)| *fingerprint)
            .collect();
        due.into_iter()
            .filter_map(|fingerprint| self.by_fingerprint.remove(&fingerprint))
            .flat_map(Held::returns)
            .collect()
    }

    /// Forgets every lease (the configuration changed: none can be used again), giving back
    /// what the live ones have left.
    pub fn clear(&mut self, now_ms: u64) -> Vec<LeaseReturn> {
        self.asking.clear();
        self.by_fingerprint
            .drain()
            .filter(|(_, held)| now_ms < held.ends_at_ms)
            .flat_map(|(_, held)| held.returns())
            .collect()
    }

    pub fn len(&self) -> usize {
        self.by_fingerprint.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_fingerprint.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use sluice_protocol::{Grant, PolicyStatus, Strategy};

    use super::*;

    fn granted(units: u64, ttl_ms: u64) -> Decision {
        with_token(units, ttl_ms, None)
    }

    fn with_token(units: u64, ttl_ms: u64, token: Option<&str>) -> Decision {
        Decision {
            policy: Some(PolicyStatus {
                rule: "hot".into(),
                strategy: Strategy::FixedWindow,
                limit: 100,
                remaining: 40,
                reset_ms: 5_000,
                retry_after_ms: 0,
                window_ms: 10_000,
                delay_ms: 0,
                reason: None,
                usage: false,
            }),
            grant: Some(Grant {
                units,
                ttl_ms,
                token: token.map(str::to_owned),
            }),
            ..Decision::unlimited()
        }
    }

    #[test]
    fn a_lease_admits_its_units_then_nothing_and_counts_remaining_down() {
        let mut leases = Leases::default();
        leases.hold(7, &granted(3, 1_000), 1_000, 1_010);
        let remaining: Vec<u64> = (0..3)
            .map(|n| {
                let decision = leases.admit(7, 1_100 + n).expect("admitted from the lease");
                assert!(decision.allowed && decision.grant.is_none());
                decision.policy.map_or(0, |p| p.remaining)
            })
            .collect();
        assert_eq!(remaining, [39, 38, 37]);
        assert_eq!(leases.admit(7, 1_200), None, "spent");
        assert!(leases.is_empty());
    }

    #[test]
    fn a_lease_ends_counted_from_when_its_check_was_sent_and_fits_only_its_kind() {
        let mut leases = Leases::default();
        leases.hold(7, &granted(50, 1_000), 1_000, 1_300);
        assert_eq!(leases.admit(8, 1_400), None, "another kind of request");
        assert!(leases.admit(7, 1_999).is_some());
        assert_eq!(leases.admit(7, 2_000), None, "ended at sent + ttl");
    }

    #[test]
    fn a_second_lease_for_a_kind_still_held_adds_to_it() {
        let mut leases = Leases::default();
        leases.hold(7, &granted(2, 1_000), 1_000, 1_010);
        assert!(leases.admit(7, 1_020).is_some());
        leases.hold(7, &granted(3, 1_000), 1_500, 1_510);
        let admitted = (0..10).filter(|_| leases.admit(7, 2_200).is_some()).count();
        assert_eq!(
            admitted, 4,
            "1 left of the first, 3 of the second, until 2.5 s"
        );
        leases.hold(7, &granted(3, 1_000), 3_000, 3_010);
        assert_eq!(
            leases.admit(7, 4_000),
            None,
            "a fresh lease ends on its own time"
        );
    }

    #[test]
    fn denials_and_decisions_without_a_grant_hold_nothing_and_the_table_is_bounded() {
        let mut leases = Leases::default();
        leases.hold(1, &Decision::unlimited(), 0, 0);
        let denied = Decision {
            allowed: false,
            ..granted(5, 1_000)
        };
        leases.hold(2, &denied, 0, 0);
        assert!(leases.is_empty());
        for fingerprint in 0..(MAX_LEASES as u64) {
            assert!(leases.may_ask(fingerprint, 0));
            leases.hold(fingerprint, &granted(5, 1_000), 0, 0);
            leases.answered(fingerprint);
        }
        assert!(!leases.may_ask(u64::MAX, 10), "full: no more asking");
        // A lease already on its way is kept all the same (it was taken from the limit).
        leases.hold(u64::MAX, &granted(5, 1_000), 0, 10);
        assert_eq!(leases.len(), MAX_LEASES + 1);
        // Ended leases make room.
        assert!(leases.may_ask(1, 5_000));
        assert_eq!(leases.len(), 0);
    }

    #[test]
    fn one_check_of_a_kind_asks_at_a_time() {
        let mut leases = Leases::default();
        assert!(leases.may_ask(7, 0));
        assert!(!leases.may_ask(7, 0), "the first is still out");
        assert!(leases.may_ask(8, 0), "another kind asks on its own");
        leases.answered(7);
        assert!(leases.may_ask(7, 0));
    }

    fn returned(grant: &str, unused: u64) -> LeaseReturn {
        LeaseReturn {
            grant: grant.to_owned(),
            unused,
        }
    }

    #[test]
    fn a_lease_not_spent_two_seconds_after_its_grant_gives_its_rest_back_newest_grant_first() {
        let mut leases = Leases::default();
        leases.hold(7, &with_token(10, 60_000, Some("g1")), 1_000, 1_000);
        leases.hold(7, &with_token(4, 60_000, Some("g2")), 1_100, 1_100);
        leases.hold(8, &with_token(5, 60_000, Some("busy")), 2_500, 2_500);
        for _ in 0..6 {
            assert!(leases.admit(7, 2_000).is_some());
        }
        assert_eq!(leases.returns_due(2_999), [], "not yet two seconds");
        assert_eq!(
            leases.returns_due(3_000),
            [returned("g2", 4), returned("g1", 4)],
            "8 of 14 left: the newest grant's 4, then 4 of the oldest's"
        );
        assert_eq!(
            leases.admit(7, 3_001),
            None,
            "given back: the kind asks again"
        );
        assert_eq!(leases.len(), 1, "the younger lease is kept");
        assert_eq!(leases.returns_due(10_000), [returned("busy", 5)]);
    }

    #[test]
    fn leases_without_tokens_or_ended_give_nothing_back() {
        let mut leases = Leases::default();
        leases.hold(1, &granted(10, 60_000), 0, 0);
        leases.hold(2, &with_token(10, 1_000, Some("ended")), 0, 0);
        assert_eq!(leases.returns_due(5_000), []);
        assert_eq!(leases.len(), 2, "swept by the tick, not returned");
        leases.hold(3, &with_token(10, 60_000, Some("spent")), 0, 0);
        for _ in 0..10 {
            assert!(leases.admit(3, 10).is_some());
        }
        assert_eq!(leases.returns_due(5_000), []);
    }

    #[test]
    fn a_configuration_change_gives_back_every_live_lease() {
        let mut leases = Leases::default();
        leases.hold(1, &with_token(10, 60_000, Some("a")), 0, 0);
        leases.hold(2, &with_token(3, 1_000, Some("ended")), 0, 0);
        assert!(leases.may_ask(9, 0));
        assert!(leases.admit(1, 100).is_some());
        assert_eq!(
            leases.clear(1_500),
            [returned("a", 9)],
            "at once, not two seconds on"
        );
        assert!(leases.is_empty());
        assert!(leases.may_ask(9, 600), "asks forgotten too");
    }
}
