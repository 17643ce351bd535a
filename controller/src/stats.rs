//! What the limiter did, in memory: per rule and per tier, allowed and limited decisions,
//! how close clients came to their limits, how many distinct clients asked and were
//! limited, and the top requesting and top limited clients; for the stats API, the tuning
//! hints, the decision metrics, alerts and the sampled log of limited requests.
//!
//! The check path pays one lock per check call and in-memory counting per decision (no
//! allocation once a rule, a tier and a top-list entry are known). Decisions go into a
//! bucket of 10 s; a bucket that ends is folded into one of 60 s; 7 of the first and 61 of
//! the second are kept, so memory is bounded by the number of rules and tiers (the
//! configuration's) times that, whatever the number of clients: top lists are Space-Saving
//! summaries of [`TOP_CAPACITY`] entries and distinct counts HyperLogLogs (see
//! [`crate::sketch`]).
//!
//! Several controllers add up through the store: each publishes every bucket that ends
//! (`publish_stats`, with a TTL), and the stats API merges the others' published buckets
//! with its own. A bucket is published when it ends, so another controller's last 10 s
//! are missing from a one-minute answer.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap, VecDeque};
use std::fmt::Write;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use sluice_protocol::admin::{
    Hint, HintsBody, RuleStats, StatsBody, TierStats, TopClient, UsageStats,
};
use sluice_protocol::{
    CachedDenials, Check, ClientId, ClientKind, Decision, LeasedAdmissions, Strategy,
};

use crate::alerts::{self, Tally, Webhooks};
use crate::config::validate::format_rfc3339_ms;
use crate::config::{LiveConfig, Snapshot};
use crate::keys;
use crate::metrics::{DecisionLabels, Metrics, RuleLabels, SystemStateLabels};
use crate::sketch::{DistinctCount, SpaceSaving};
use crate::store::{now_ms, Store};

/// The two resolutions buckets are kept at, and how many of each.
pub const FINE_MS: u64 = 10_000;
const FINE_KEPT: usize = 7;
pub const COARSE_MS: u64 = 60_000;
const COARSE_KEPT: usize = 61;
/// Entries of each top list's summary: a client with more than 1/64 of a bucket's
/// decisions is always in it; each count is over by at most the summary's smallest.
pub const TOP_CAPACITY: usize = 64;
/// Distinct (rule, client) pairs tallied for alerts in one second, and leases tracked.
const MAX_ALERT_TALLY: usize = 10_000;
const MAX_LEASES: usize = 100_000;
/// An allowed decision with at most this share of its limit left is near the limit.
const NEAR_LIMIT_PERMILLE: u64 = 100;

/// One rule's figures in one bucket.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RuleCounts {
    pub allowed: u64,
    pub limited: u64,
    pub shadow_limited: u64,
    pub near_limit: u64,
    /// The most any client used of its limit, in thousandths.
    pub max_used_permille: u64,
    pub requesting: DistinctCount,
    pub limited_clients: DistinctCount,
    #[serde(default)]
    pub usage: UsageCounts,
}

/// A usage rule's units (or a tier's, over its usage rules) in one bucket.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct UsageCounts {
    pub reserved: u64,
    pub settlements: u64,
    pub returned: u64,
    pub overshoot: u64,
    pub charged: u64,
}

impl UsageCounts {
    fn merge(&mut self, other: &UsageCounts) {
        self.reserved += other.reserved;
        self.settlements += other.settlements;
        self.returned += other.returned;
        self.overshoot += other.overshoot;
        self.charged += other.charged;
    }

    fn settle(&mut self, settled: &UsageSettled<'_>) {
        self.settlements += 1;
        self.returned += settled.returned;
        self.overshoot += settled.charged;
        self.charged += settled.cost();
    }

    fn stats(&self) -> Option<UsageStats> {
        (*self != UsageCounts::default()).then_some(UsageStats {
            reserved: self.reserved,
            settlements: self.settlements,
            returned: self.returned,
            overshoot: self.overshoot,
            charged: self.charged,
        })
    }
}

/// One reservation settled, as its signed token named it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UsageSettled<'a> {
    pub rule: &'a str,
    /// The tier's label, and the client's `kind:value`; empty in a token signed before
    /// they were carried.
    pub tier: &'a str,
    pub client: &'a str,
    pub reserved: u64,
    /// Given back to the limit.
    pub returned: u64,
    /// Charged beyond the reservation.
    pub charged: u64,
}

impl UsageSettled<'_> {
    /// What the request cost its limit in the end.
    fn cost(&self) -> u64 {
        self.reserved
            .saturating_sub(self.returned)
            .saturating_add(self.charged)
    }
}

impl RuleCounts {
    fn merge(&mut self, other: &RuleCounts) {
        self.usage.merge(&other.usage);
        self.allowed += other.allowed;
        self.limited += other.limited;
        self.shadow_limited += other.shadow_limited;
        self.near_limit += other.near_limit;
        self.max_used_permille = self.max_used_permille.max(other.max_used_permille);
        self.requesting.merge(&other.requesting);
        self.limited_clients.merge(&other.limited_clients);
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct TierCounts {
    pub allowed: u64,
    pub limited: u64,
    pub shadow_limited: u64,
    pub refused: u64,
    #[serde(default)]
    pub usage: UsageCounts,
}

impl TierCounts {
    fn merge(&mut self, other: &TierCounts) {
        self.usage.merge(&other.usage);
        self.allowed += other.allowed;
        self.limited += other.limited;
        self.shadow_limited += other.shadow_limited;
        self.refused += other.refused;
    }
}

/// What happened in one interval, on one controller (or, merged, on several).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Bucket {
    pub start_ms: u64,
    pub controller: String,
    pub decisions: u64,
    pub rules: BTreeMap<String, RuleCounts>,
    pub tiers: BTreeMap<String, TierCounts>,
    pub top_requesting: SpaceSaving,
    pub top_limited: SpaceSaving,
    /// Clients by the units their settled usage cost (buckets published before it was
    /// kept have an empty one).
    #[serde(default = "top_summary")]
    pub top_usage: SpaceSaving,
}

fn top_summary() -> SpaceSaving {
    SpaceSaving::new(TOP_CAPACITY)
}

impl Bucket {
    fn new(start_ms: u64, controller: &str) -> Bucket {
        Bucket {
            start_ms,
            controller: controller.to_owned(),
            decisions: 0,
            rules: BTreeMap::new(),
            tiers: BTreeMap::new(),
            top_requesting: top_summary(),
            top_limited: top_summary(),
            top_usage: top_summary(),
        }
    }

    pub fn merge(&mut self, other: &Bucket) {
        self.decisions += other.decisions;
        for (rule, counts) in &other.rules {
            self.rules.entry(rule.clone()).or_default().merge(counts);
        }
        for (tier, counts) in &other.tiers {
            self.tiers.entry(tier.clone()).or_default().merge(counts);
        }
        self.top_requesting.merge(&other.top_requesting);
        self.top_limited.merge(&other.top_limited);
        self.top_usage.merge(&other.top_usage);
    }
}

/// The buckets of one resolution, oldest first; the last is the current one.
struct Ring {
    resolution_ms: u64,
    kept: usize,
    buckets: VecDeque<Bucket>,
}

impl Ring {
    fn new(resolution_ms: u64, kept: usize) -> Ring {
        Ring {
            resolution_ms,
            kept,
            buckets: VecDeque::new(),
        }
    }

    /// The bucket `now` falls in, starting it (and ending the one before) if need be;
    /// returns the bucket that ended, if one did.
    fn roll(&mut self, now: u64, controller: &str) -> Option<Bucket> {
        let start = now - now % self.resolution_ms;
        match self.buckets.back() {
            Some(current) if current.start_ms >= start => None,
            _ => {
                let ended = self.buckets.back().cloned();
                self.buckets.push_back(Bucket::new(start, controller));
                while self.buckets.len() > self.kept {
                    self.buckets.pop_front();
                }
                ended.filter(|bucket| bucket.decisions > 0)
            }
        }
    }

    fn current(&mut self) -> Option<&mut Bucket> {
        self.buckets.back_mut()
    }

    fn since(&self, from_ms: u64) -> impl Iterator<Item = &Bucket> {
        self.buckets
            .iter()
            .filter(move |bucket| bucket.start_ms + self.resolution_ms > from_ms)
    }
}

/// A decision's outcome, as metrics label it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Allowed = 0,
    Limited = 1,
    ShadowLimited = 2,
    Refused = 3,
    Failure = 4,
}

const OUTCOMES: [&str; 5] = ["allowed", "limited", "shadow_limited", "refused", "failure"];

/// The rule label of a decision no rule applied to.
const NO_RULE: &str = "-";

struct Inner {
    fine: Ring,
    coarse: Ring,
    /// Ended buckets, to publish: (resolution, bucket).
    ended: Vec<(u64, Bucket)>,
    /// Decisions since the metrics were last brought up to date: rule → tier → outcome.
    pending: HashMap<String, HashMap<String, [u64; 5]>>,
    alert_tally: Tally,
    /// When each admitted-for-later request's slot comes (leaky bucket).
    delayed: BinaryHeap<Reverse<u64>>,
    /// Concurrency leases this controller handed out: token → (rule, slots, expiry).
    leases: HashMap<String, (String, u64, u64)>,
    client: String,
}

pub struct Recorder {
    inner: Mutex<Inner>,
    metrics: Arc<Metrics>,
    controller: String,
}

fn client_label(client: &ClientId, into: &mut String) {
    into.clear();
    let _ = write!(into, "{}:{}", client.kind, client.value);
}

pub fn tier_label<'a>(snapshot: &'a Snapshot, tier: Option<&'a str>) -> &'a str {
    match tier {
        None => "default",
        Some(tier) if snapshot.document.tiers.iter().any(|t| t.name == tier) => tier,
        Some("default") => "default",
        Some(_) => "other",
    }
}

impl Recorder {
    pub fn new(controller: &str, metrics: Arc<Metrics>) -> Recorder {
        Recorder {
            inner: Mutex::new(Inner {
                fine: Ring::new(FINE_MS, FINE_KEPT),
                coarse: Ring::new(COARSE_MS, COARSE_KEPT),
                ended: Vec::new(),
                pending: HashMap::new(),
                alert_tally: Tally::new(),
                delayed: BinaryHeap::new(),
                leases: HashMap::new(),
                client: String::new(),
            }),
            metrics,
            controller: controller.to_owned(),
        }
    }

    pub fn controller(&self) -> &str {
        &self.controller
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn roll(&self, inner: &mut Inner, now: u64) {
        if let Some(ended) = inner.fine.roll(now, &self.controller) {
            if let Some(coarse) = inner.coarse.current() {
                coarse.merge(&ended);
            }
            inner.ended.push((FINE_MS, ended));
        }
        if let Some(ended) = inner.coarse.roll(now, &self.controller) {
            inner.ended.push((COARSE_MS, ended));
        }
        // The coarse bucket just started takes nothing of the fine one in progress (a
        // fine bucket is folded in when it ends); both start on a whole minute together.
    }

    /// Records the decisions of one check call (`checks` as the rules saw them).
    pub fn record(&self, snapshot: &Snapshot, checks: &[&Check], decisions: &[Decision]) {
        let now = now_ms();
        let sample = snapshot.document.limited_log_sample();
        let alerting = snapshot
            .document
            .observability
            .as_ref()
            .is_some_and(|o| o.alerts.is_some());
        let mut guard = self.lock();
        let inner = &mut *guard;
        self.roll(inner, now);
        let mut client = std::mem::take(&mut inner.client);
        for (check, decision) in checks.iter().zip(decisions) {
            client_label(&check.client, &mut client);
            let tier = tier_label(snapshot, check.tier.as_deref());
            let outcome = if decision.refused.is_some() {
                Outcome::Refused
            } else if !decision.allowed {
                Outcome::Limited
            } else if decision.shadow_denied {
                Outcome::ShadowLimited
            } else {
                Outcome::Allowed
            };
            let Some(bucket) = inner.fine.current() else {
                continue;
            };
            bucket.decisions += 1;
            bucket.top_requesting.add(&client, 1);
            if outcome == Outcome::Limited {
                bucket.top_limited.add(&client, 1);
            }
            let tier_counts = match bucket.tiers.get_mut(tier) {
                Some(counts) => counts,
                None => bucket.tiers.entry(tier.to_owned()).or_default(),
            };
            match outcome {
                Outcome::Allowed => tier_counts.allowed += 1,
                Outcome::Limited => tier_counts.limited += 1,
                Outcome::ShadowLimited => tier_counts.shadow_limited += 1,
                Outcome::Refused | Outcome::Failure => tier_counts.refused += 1,
            }
            for reservation in &decision.usage {
                tier_counts.usage.reserved += reservation.reserved;
            }
            let mut counted_rules = 0;
            for (index, policy) in decision.policies().enumerate() {
                let speaking = index == 0;
                // A rule that did not speak for a denied request was not reached.
                let rule_outcome = match (speaking, outcome) {
                    (true, Outcome::Limited) => Outcome::Limited,
                    (true, Outcome::ShadowLimited) => Outcome::ShadowLimited,
                    (_, Outcome::Allowed | Outcome::ShadowLimited) => Outcome::Allowed,
                    _ => continue,
                };
                counted_rules += 1;
                let counts = match bucket.rules.get_mut(&policy.rule) {
                    Some(counts) => counts,
                    None => bucket.rules.entry(policy.rule.clone()).or_default(),
                };
                counts.requesting.add(&client);
                if let Some(reservation) = decision.usage.iter().find(|r| r.rule == policy.rule) {
                    counts.usage.reserved += reservation.reserved;
                }
                match rule_outcome {
                    Outcome::Limited => {
                        counts.limited += 1;
                        counts.limited_clients.add(&client);
                    }
                    Outcome::ShadowLimited => {
                        counts.shadow_limited += 1;
                        counts.limited_clients.add(&client);
                    }
                    _ => {
                        counts.allowed += 1;
                        let left = policy
                            .remaining
                            .saturating_mul(1_000)
                            .checked_div(policy.limit);
                        if let Some(left) = left {
                            if left <= NEAR_LIMIT_PERMILLE {
                                counts.near_limit += 1;
                            }
                            counts.max_used_permille =
                                counts.max_used_permille.max(1_000u64.saturating_sub(left));
                        }
                    }
                }
                let tiers = match inner.pending.get_mut(&policy.rule) {
                    Some(tiers) => tiers,
                    None => inner.pending.entry(policy.rule.clone()).or_default(),
                };
                let outcomes = match tiers.get_mut(tier) {
                    Some(outcomes) => outcomes,
                    None => tiers.entry(tier.to_owned()).or_default(),
                };
                outcomes[rule_outcome as usize] += 1;
                if rule_outcome == Outcome::Limited
                    && alerting
                    && (inner.alert_tally.len() < MAX_ALERT_TALLY
                        || inner
                            .alert_tally
                            .contains_key(&(policy.rule.clone(), check.client.clone())))
                {
                    *inner
                        .alert_tally
                        .entry((policy.rule.clone(), check.client.clone()))
                        .or_default() += 1;
                }
                if policy.delay_ms > 0 && decision.allowed && speaking {
                    inner
                        .delayed
                        .push(Reverse(now.saturating_add(policy.delay_ms)));
                }
            }
            if counted_rules == 0 {
                let tiers = inner.pending.entry(NO_RULE.to_owned()).or_default();
                let outcomes = match tiers.get_mut(tier) {
                    Some(outcomes) => outcomes,
                    None => tiers.entry(tier.to_owned()).or_default(),
                };
                outcomes[outcome as usize] += 1;
            }
            if outcome == Outcome::Limited && check.sampled && sample > 0.0 {
                log_limited(check, decision, tier);
            }
            if !decision.leases.is_empty() {
                let lease_ms = decision
                    .policies()
                    .find(|p| p.strategy == Strategy::Concurrency)
                    .map_or(60_000, |p| p.window_ms);
                for token in &decision.leases {
                    if inner.leases.len() >= MAX_LEASES {
                        break;
                    }
                    if let Some((key, count)) = lease_parts(token) {
                        let rule = keys::counter_of(key).map_or(NO_RULE, |(_, rule)| rule);
                        inner.leases.insert(
                            token.clone(),
                            (rule.to_owned(), count, now.saturating_add(lease_ms)),
                        );
                    }
                }
            }
        }
        inner.client = client;
    }

    /// Denials the filters answered from their caches (reported once a second): counted as
    /// limited decisions of their client, rule and tier, for the stats, metrics and alerts.
    pub fn record_cached(&self, snapshot: &Snapshot, denials: &[CachedDenials]) {
        if denials.is_empty() {
            return;
        }
        let alerting = snapshot
            .document
            .observability
            .as_ref()
            .is_some_and(|o| o.alerts.is_some());
        let mut guard = self.lock();
        let inner = &mut *guard;
        self.roll(inner, now_ms());
        let mut client = std::mem::take(&mut inner.client);
        for denied in denials {
            let count = denied.count;
            let (who, tier) = reported_client(snapshot, &denied.client, denied.tier.as_deref());
            client_label(&who, &mut client);
            // Only rules the configuration has: a report names what the filter remembered.
            let Some(rule) = snapshot
                .rules
                .rules()
                .iter()
                .find(|r| r.name == denied.rule)
            else {
                continue;
            };
            let Some(bucket) = inner.fine.current() else {
                continue;
            };
            bucket.decisions += count;
            bucket.top_requesting.add(&client, count);
            bucket.top_limited.add(&client, count);
            bucket.tiers.entry(tier.to_owned()).or_default().limited += count;
            for request_id in &denied.request_ids {
                tracing::info!(
                    target: "sluice::limited",
                    request_id = request_id.as_str(),
                    client_kind = who.kind.as_str(),
                    client = who.value.as_str(),
                    rule = rule.name.as_str(),
                    tier,
                    strategy = rule.strategy.as_str(),
                    remaining = 0,
                    cached = true,
                    "limited"
                );
            }
            let counts = bucket.rules.entry(rule.name.clone()).or_default();
            counts.limited += count;
            counts.requesting.add(&client);
            counts.limited_clients.add(&client);
            inner
                .pending
                .entry(rule.name.clone())
                .or_default()
                .entry(tier.to_owned())
                .or_default()[Outcome::Limited as usize] += count;
            if alerting && inner.alert_tally.len() < MAX_ALERT_TALLY {
                *inner
                    .alert_tally
                    .entry((rule.name.clone(), who.clone()))
                    .or_default() += count;
            }
        }
        inner.client = client;
    }

    /// Requests the filters admitted from leases, as a report names them: allowed decisions
    /// of the lease's rule that the controller did not see.
    pub fn record_leased(&self, snapshot: &Snapshot, leased: &[LeasedAdmissions]) {
        if leased.is_empty() {
            return;
        }
        let mut guard = self.lock();
        let inner = &mut *guard;
        self.roll(inner, now_ms());
        let mut client = std::mem::take(&mut inner.client);
        for admitted in leased {
            let count = admitted.count;
            let (who, tier) = reported_client(snapshot, &admitted.client, admitted.tier.as_deref());
            client_label(&who, &mut client);
            if !snapshot
                .rules
                .rules()
                .iter()
                .any(|r| r.name == admitted.rule)
            {
                continue;
            }
            let Some(bucket) = inner.fine.current() else {
                continue;
            };
            bucket.decisions += count;
            bucket.top_requesting.add(&client, count);
            bucket.tiers.entry(tier.to_owned()).or_default().allowed += count;
            let counts = bucket.rules.entry(admitted.rule.clone()).or_default();
            counts.allowed += count;
            counts.requesting.add(&client);
            inner
                .pending
                .entry(admitted.rule.clone())
                .or_default()
                .entry(tier.to_owned())
                .or_default()[Outcome::Allowed as usize] += count;
        }
        inner.client = client;
    }

    /// Usage reservations settled: their units by rule, tier and client.
    pub fn settled(&self, settled: &[UsageSettled<'_>]) {
        if settled.is_empty() {
            return;
        }
        let mut guard = self.lock();
        let inner = &mut *guard;
        self.roll(inner, now_ms());
        let Some(bucket) = inner.fine.current() else {
            return;
        };
        for one in settled {
            match bucket.rules.get_mut(one.rule) {
                Some(counts) => counts.usage.settle(one),
                None => bucket
                    .rules
                    .entry(one.rule.to_owned())
                    .or_default()
                    .usage
                    .settle(one),
            }
            if one.tier.is_empty() {
                continue;
            }
            match bucket.tiers.get_mut(one.tier) {
                Some(counts) => counts.usage.settle(one),
                None => bucket
                    .tiers
                    .entry(one.tier.to_owned())
                    .or_default()
                    .usage
                    .settle(one),
            }
            if !one.client.is_empty() && one.cost() > 0 {
                bucket.top_usage.add(one.client, one.cost());
            }
        }
    }

    /// Leases given back.
    pub fn released(&self, tokens: &[String]) {
        let mut inner = self.lock();
        for token in tokens {
            inner.leases.remove(token);
        }
    }

    /// A check call the store did not answer: every rule that applied counts a failure.
    pub fn failed(&self, snapshot: &Snapshot, checks: &[&Check]) {
        let mut inner = self.lock();
        for check in checks {
            let tier = tier_label(snapshot, check.tier.as_deref()).to_owned();
            for rule in snapshot.rules_for(check) {
                let outcomes = inner
                    .pending
                    .entry(rule.name.clone())
                    .or_default()
                    .entry(tier.clone())
                    .or_default();
                outcomes[Outcome::Failure as usize] += 1;
            }
        }
    }

    /// Brings the metrics up to date; returns what ended and what alerts to count.
    fn tick(&self, snapshot: &Snapshot, now: u64) -> (Vec<(u64, Bucket)>, Tally) {
        let mut guard = self.lock();
        let inner = &mut *guard;
        self.roll(inner, now);
        for (rule, tiers) in inner.pending.drain() {
            for (tier, outcomes) in tiers {
                for (outcome, count) in OUTCOMES.iter().zip(outcomes) {
                    if count > 0 {
                        self.metrics
                            .decisions
                            .get_or_create(&DecisionLabels {
                                rule: rule.clone(),
                                tier: tier.clone(),
                                outcome: (*outcome).to_owned(),
                            })
                            .inc_by(count);
                    }
                }
            }
        }
        while inner.delayed.peek().is_some_and(|Reverse(due)| *due <= now) {
            inner.delayed.pop();
        }
        self.metrics
            .delayed_requests
            .set(i64::try_from(inner.delayed.len()).unwrap_or(i64::MAX));
        inner.leases.retain(|_, (_, _, expires)| *expires > now);
        let mut slots: BTreeMap<&str, u64> = BTreeMap::new();
        for rule in snapshot
            .rules
            .rules()
            .iter()
            .filter(|r| r.strategy == Strategy::Concurrency)
        {
            slots.insert(&rule.name, 0);
        }
        for (rule, count, _) in inner.leases.values() {
            if let Some(held) = slots.get_mut(rule.as_str()) {
                *held += count;
            }
        }
        for (rule, held) in slots {
            self.metrics
                .concurrency_slots
                .get_or_create(&RuleLabels {
                    rule: rule.to_owned(),
                })
                .set(i64::try_from(held).unwrap_or(i64::MAX));
        }
        (
            std::mem::take(&mut inner.ended),
            std::mem::take(&mut inner.alert_tally),
        )
    }

    /// This controller's buckets of `resolution_ms` that end after `from_ms`, merged into
    /// `into`; returns how many there were.
    fn merge_own(&self, resolution_ms: u64, from_ms: u64, into: &mut Bucket) -> usize {
        let mut guard = self.lock();
        let inner = &mut *guard;
        self.roll(inner, now_ms());
        let ring = if resolution_ms == FINE_MS {
            &inner.fine
        } else {
            &inner.coarse
        };
        let mut merged = 0;
        for bucket in ring.since(from_ms) {
            into.merge(bucket);
            merged += 1;
        }
        // The coarse bucket in progress has not taken the fine one in progress yet.
        if resolution_ms == COARSE_MS {
            if let Some(current) = inner.fine.buckets.back() {
                into.merge(current);
            }
        }
        merged
    }
}

/// The plain counts of one bucket, without its sketches: what a live view needs to say how
/// many decisions came since it last looked.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BucketTally {
    pub start_ms: u64,
    /// Over every tier (each decision once): allowed, limited, shadow-limited, refused.
    pub overall: [u64; 4],
    /// Per rule: allowed, limited, shadow-limited.
    pub rules: BTreeMap<String, [u64; 3]>,
}

impl Recorder {
    /// The counts of this controller's buckets of 10 s, oldest first. Read-only (it does not
    /// start a bucket) and copies only counters: the lock is held for about as long as one
    /// check call holds it.
    pub fn tallies(&self) -> Vec<BucketTally> {
        let inner = self.lock();
        inner
            .fine
            .buckets
            .iter()
            .map(|bucket| BucketTally {
                start_ms: bucket.start_ms,
                overall: bucket.tiers.values().fold([0; 4], |mut sum, counts| {
                    sum[0] += counts.allowed;
                    sum[1] += counts.limited;
                    sum[2] += counts.shadow_limited;
                    sum[3] += counts.refused;
                    sum
                }),
                rules: bucket
                    .rules
                    .iter()
                    .map(|(rule, counts)| {
                        (
                            rule.clone(),
                            [counts.allowed, counts.limited, counts.shadow_limited],
                        )
                    })
                    .collect(),
            })
            .collect()
    }
}

/// Decisions since the last look, from successive [`Recorder::tallies`]: a bucket's counts
/// only grow while it is kept, so what came since is, bucket by bucket, the counts now less
/// the counts seen last time (nothing for a bucket that has left the ring; all of a bucket
/// not seen before).
#[derive(Debug, Default)]
pub struct RateMeter {
    seen: Option<BTreeMap<u64, BucketTally>>,
}

impl RateMeter {
    /// What came since the last call (nothing on the first: it only takes the counts in).
    pub fn since_last(&mut self, tallies: Vec<BucketTally>) -> sluice_protocol::admin::Rates {
        let mut rates = sluice_protocol::admin::Rates::default();
        let now: BTreeMap<u64, BucketTally> =
            tallies.into_iter().map(|t| (t.start_ms, t)).collect();
        if let Some(seen) = &self.seen {
            let empty = BucketTally::default();
            let mut rules: BTreeMap<&str, [u64; 3]> = BTreeMap::new();
            for (start, tally) in &now {
                let before = seen.get(start).unwrap_or(&empty);
                let overall = [
                    &mut rates.allowed,
                    &mut rates.limited,
                    &mut rates.shadow_limited,
                    &mut rates.refused,
                ];
                for (i, sum) in overall.into_iter().enumerate() {
                    *sum += tally.overall[i].saturating_sub(before.overall[i]);
                }
                for (rule, counts) in &tally.rules {
                    let was = before.rules.get(rule).copied().unwrap_or_default();
                    let sum = rules.entry(rule).or_default();
                    for i in 0..3 {
                        sum[i] += counts[i].saturating_sub(was[i]);
                    }
                }
            }
            rates.rules = rules
                .into_iter()
                .map(|(rule, [allowed, limited, shadow_limited])| {
                    sluice_protocol::admin::RuleRate {
                        rule: rule.to_owned(),
                        allowed,
                        limited,
                        shadow_limited,
                    }
                })
                .collect();
        }
        self.seen = Some(now);
        rates
    }
}

/// `key|lease id|slots` → (key, slots).
fn lease_parts(token: &str) -> Option<(&str, u64)> {
    let mut parts = token.rsplitn(3, '|');
    let count = parts.next()?.parse().ok()?;
    let _lease = parts.next()?;
    Some((parts.next()?, count))
}

/// Whom a filter's report names, as the rules count it, and the tier's label: the filter
/// names an API key's client by the key; the rules count its user, in its tier.
fn reported_client<'s>(
    snapshot: &'s Snapshot,
    client: &ClientId,
    tier: Option<&'s str>,
) -> (ClientId, &'s str) {
    let grant = (client.kind == ClientKind::ApiKey.as_str())
        .then(|| snapshot.api_keys.get(&client.value))
        .flatten();
    let who = match grant.and_then(|g| g.user.as_ref()) {
        Some(user) => ClientId::new(ClientKind::User, user.clone()),
        None => client.clone(),
    };
    let tier = tier.or_else(|| grant.and_then(|g| g.tier.as_deref()));
    (who, tier_label(snapshot, tier))
}

fn log_limited(check: &Check, decision: &Decision, tier: &str) {
    let Some(policy) = &decision.policy else {
        return;
    };
    tracing::info!(
        target: "sluice::limited",
        request_id = check.request_id.as_deref().unwrap_or("-"),
        client_kind = check.client.kind.as_str(),
        // API keys arrive as their SHA-256 already; nothing here is a secret.
        client = check.client.value.as_str(),
        rule = policy.rule.as_str(),
        tier,
        strategy = policy.strategy.as_str(),
        remaining = policy.remaining,
        reset_ms = policy.reset_ms,
        retry_after_ms = policy.retry_after_ms,
        "limited"
    );
}

/// Once a second, until the process ends: metrics, publishing, alerts, gauges.
pub fn run(
    recorder: Arc<Recorder>,
    live: Arc<LiveConfig>,
    store: Arc<dyn Store>,
    metrics: Arc<Metrics>,
    webhooks: Webhooks,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut ticker = tokio::time::interval(Duration::from_secs(1));
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticker.tick().await;
            let snapshot = live.snapshot();
            let now = now_ms();
            metrics
                .config_version
                .set(i64::try_from(snapshot.version).unwrap_or(i64::MAX));
            for state in sluice_protocol::admin::SystemState::ALL {
                metrics
                    .system_state
                    .get_or_create(&SystemStateLabels {
                        state: state.as_str().to_owned(),
                    })
                    .set(i64::from(snapshot.operations.state == state));
            }
            let (ended, tally) = recorder.tick(&snapshot, now);
            for (resolution, bucket) in ended {
                let ttl = resolution * if resolution == FINE_MS { 8 } else { 62 };
                let published = match serde_json::to_vec(&bucket) {
                    Ok(payload) => store
                        .publish_stats(
                            &recorder.controller,
                            resolution,
                            bucket.start_ms,
                            payload,
                            ttl,
                        )
                        .await
                        .map_err(|e| e.to_string()),
                    Err(e) => Err(e.to_string()),
                };
                if let Err(error) = published {
                    metrics.stats_publish_errors.inc();
                    tracing::debug!(%error, "could not publish a stats bucket");
                }
            }
            let alerts_config = snapshot
                .document
                .observability
                .as_ref()
                .and_then(|o| o.alerts.clone());
            if let Some(config) = alerts_config {
                match alerts::round(store.as_ref(), &config, tally, &recorder.controller, now).await
                {
                    Ok(raised) => {
                        for alert in raised {
                            metrics.alerts.inc();
                            alerts::log(&alert);
                            if let Some(url) = &config.webhook {
                                webhooks.send(url, alert);
                            }
                        }
                    }
                    Err(error) => tracing::warn!(%error, "could not count alerts"),
                }
            }
        }
    })
}

/// The stats of the last `window` (`1m`: in 10 s buckets; `1h`: in minutes), this
/// controller's and every other's that published, merged.
pub async fn stats(
    recorder: &Recorder,
    store: &dyn Store,
    window: Window,
    top: usize,
) -> StatsBody {
    let now = now_ms();
    let (resolution, span) = match window {
        Window::Minute => (FINE_MS, 60_000),
        Window::Hour => (COARSE_MS, 3_600_000),
    };
    let from = now.saturating_sub(span);
    let mut merged = Bucket::new(from - from % resolution, recorder.controller());
    recorder.merge_own(resolution, from, &mut merged);
    let mut controllers = std::collections::BTreeSet::new();
    controllers.insert(recorder.controller().to_owned());
    let first = from - from % resolution;
    let starts: Vec<u64> = (0..)
        .map(|i| first + i * resolution)
        .take_while(|start| *start < now)
        .collect();
    match store
        .read_stats(resolution, &starts, recorder.controller())
        .await
    {
        Ok(payloads) => {
            for payload in payloads {
                if let Ok(bucket) = serde_json::from_slice::<Bucket>(&payload) {
                    controllers.insert(bucket.controller.clone());
                    merged.merge(&bucket);
                }
            }
        }
        Err(error) => tracing::warn!(%error, "other controllers' stats could not be read"),
    }
    body(&merged, window, first, now, controllers.len(), top)
}

fn top_clients(summary: &SpaceSaving, top: usize) -> Vec<TopClient> {
    summary
        .top(top)
        .into_iter()
        .map(|hit| {
            let (kind, value) = hit.item.split_once(':').unwrap_or(("", &hit.item));
            TopClient {
                client: ClientId {
                    kind: kind.to_owned(),
                    value: value.to_owned(),
                },
                count: hit.count,
                error: hit.error,
            }
        })
        .collect()
}

fn ratio(part: u64, whole: u64) -> f64 {
    if whole == 0 {
        0.0
    } else {
        part as f64 / whole as f64
    }
}

fn body(
    merged: &Bucket,
    window: Window,
    from: u64,
    to: u64,
    controllers: usize,
    top: usize,
) -> StatsBody {
    StatsBody {
        window: window.as_str().to_owned(),
        from: format_rfc3339_ms(from),
        to: format_rfc3339_ms(to),
        controllers: controllers as u64,
        decisions: merged.decisions,
        rules: merged
            .rules
            .iter()
            .map(|(rule, counts)| RuleStats {
                rule: rule.clone(),
                allowed: counts.allowed,
                limited: counts.limited,
                shadow_limited: counts.shadow_limited,
                near_limit: counts.near_limit,
                near_limit_ratio: ratio(counts.near_limit, counts.allowed),
                max_used_ratio: counts.max_used_permille as f64 / 1_000.0,
                clients: counts.requesting.estimate(),
                limited_clients: counts.limited_clients.estimate(),
                usage: counts.usage.stats(),
            })
            .collect(),
        tiers: merged
            .tiers
            .iter()
            .map(|(tier, counts)| TierStats {
                tier: tier.clone(),
                allowed: counts.allowed,
                limited: counts.limited,
                shadow_limited: counts.shadow_limited,
                refused: counts.refused,
                usage: counts.usage.stats(),
            })
            .collect(),
        top_limited: top_clients(&merged.top_limited, top),
        top_requesting: top_clients(&merged.top_requesting, top),
        top_error_bound: merged
            .top_requesting
            .max_unmonitored_count()
            .max(merged.top_limited.max_unmonitored_count()),
        top_usage: top_clients(&merged.top_usage, top),
    }
}

/// The window a stats question is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, utoipa::ToSchema)]
pub enum Window {
    #[serde(rename = "1m")]
    Minute,
    #[serde(rename = "1h")]
    Hour,
}

impl Window {
    pub fn as_str(self) -> &'static str {
        match self {
            Window::Minute => "1m",
            Window::Hour => "1h",
        }
    }
}

/// Distinct clients limited by a rule at which it may be too strict, and the share of its
/// requesting clients they must make.
pub const STRICT_CLIENTS: u64 = 10;
pub const STRICT_SHARE: f64 = 0.25;
/// Decisions a rule must have made before it may be called too generous, and the share of
/// its limit no client came above.
pub const GENEROUS_DECISIONS: u64 = 100;
pub const GENEROUS_USED: f64 = 0.5;

/// Tuning hints from the stats: a rule many distinct clients hit may be too strict; one
/// no client came near may be too generous. Each with the figures behind it.
pub fn hints(stats: &StatsBody) -> HintsBody {
    let mut hints = Vec::new();
    for rule in &stats.rules {
        let decided = rule.allowed + rule.limited + rule.shadow_limited;
        let limited_share = ratio(rule.limited_clients, rule.clients);
        if rule.limited_clients >= STRICT_CLIENTS && limited_share >= STRICT_SHARE {
            hints.push(Hint {
                rule: rule.rule.clone(),
                kind: "too_strict".to_owned(),
                message: format!(
                    "{} distinct clients ({:.0} % of the {} that asked) hit `{}` in the last \
                     {}: it may be too strict",
                    rule.limited_clients,
                    limited_share * 100.0,
                    rule.clients,
                    rule.rule,
                    stats.window
                ),
                figures: serde_json::json!({
                    "limited_clients": rule.limited_clients, "clients": rule.clients,
                    "limited": rule.limited, "decisions": decided,
                }),
            });
        } else if decided >= GENEROUS_DECISIONS
            && rule.limited == 0
            && rule.shadow_limited == 0
            && rule.max_used_ratio < GENEROUS_USED
        {
            hints.push(Hint {
                rule: rule.rule.clone(),
                kind: "too_generous".to_owned(),
                message: format!(
                    "no client came above {:.1} % of `{}` in the last {} ({} decisions): it \
                     may be too generous",
                    rule.max_used_ratio * 100.0,
                    rule.rule,
                    stats.window,
                    decided
                ),
                figures: serde_json::json!({
                    "max_used_ratio": rule.max_used_ratio, "decisions": decided,
                    "clients": rule.clients,
                }),
            });
        }
    }
    HintsBody {
        window: stats.window.clone(),
        hints,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tally(start_ms: u64, allowed: u64, limited: u64) -> BucketTally {
        BucketTally {
            start_ms,
            overall: [allowed, limited, 0, 0],
            rules: BTreeMap::from([("r".to_owned(), [allowed, limited, 0])]),
        }
    }

    #[test]
    fn the_rate_meter_counts_what_came_since_across_buckets() {
        let mut meter = RateMeter::default();
        // The first look only takes the counts in.
        let first = meter.since_last(vec![tally(0, 5, 1)]);
        assert_eq!((first.allowed, first.limited), (0, 0));
        assert!(first.rules.is_empty());
        // The same bucket grew, and a new one started.
        let second = meter.since_last(vec![tally(0, 7, 1), tally(10_000, 3, 2)]);
        assert_eq!((second.allowed, second.limited), (5, 2));
        assert_eq!(second.rules.len(), 1);
        assert_eq!((second.rules[0].allowed, second.rules[0].limited), (5, 2));
        // The oldest bucket left the ring: that is not a negative rate.
        let third = meter.since_last(vec![tally(10_000, 4, 2)]);
        assert_eq!((third.allowed, third.limited), (1, 0));
    }
}
