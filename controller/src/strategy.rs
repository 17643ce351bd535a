//! The strategies of `lua/`, in Rust, for the embedded store. Each function here is the twin
//! of a Lua file: same state, same integer arithmetic, same answers (the conformance suite
//! and the property test hold them to it). Pure: the time is passed in.

use std::cmp::{max, min};
use std::collections::{BTreeSet, HashMap};

use sluice_protocol::{Rule, Strategy};

/// A limit as the stores see it. `period_ms` is the window (the lease, for concurrency);
/// `extra` is the burst (token bucket, GCRA), the max delay in ms (leaky bucket), or 0.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Params {
    pub strategy: Strategy,
    pub limit: u64,
    pub period_ms: u64,
    pub extra: u64,
    /// A progressive penalty for clients that keep hitting the limit (see [`strike`]).
    pub penalty: Option<PenaltyParams>,
}

/// A rule's penalty in milliseconds: cool-downs from `base_ms` doubling to `max_ms`, one
/// strike forgiven per `decay_ms` without a denial.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PenaltyParams {
    pub base_ms: u64,
    pub max_ms: u64,
    pub decay_ms: u64,
}

impl Params {
    pub fn of(rule: &Rule) -> Params {
        let (period_ms, extra) = match rule.strategy {
            Strategy::TokenBucket | Strategy::Gcra => (rule.window_ms(), rule.burst()),
            Strategy::LeakyBucket => (rule.window_ms(), rule.max_delay_ms()),
            Strategy::Concurrency => (rule.lease_ms(), 0),
            _ => (rule.window_ms(), 0),
        };
        Params {
            strategy: rule.strategy,
            limit: rule.limit,
            period_ms,
            extra,
            penalty: rule.penalty.map(|p| PenaltyParams {
                base_ms: p.base.millis(),
                max_ms: p.max.millis(),
                decay_ms: p.decay.millis(),
            }),
        }
    }
}

/// What a limit says about one request.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Verdict {
    pub ok: bool,
    pub remaining: u64,
    pub reset_ms: u64,
    pub retry_after_ms: u64,
    pub delay_ms: u64,
    /// Denied because the client is cooling down under the limit's penalty (or began to
    /// with this denial: `retry_after_ms` is then the cool-down).
    pub cooling: bool,
}

/// A limit's state in the embedded store; the shape of its Redis key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum State {
    Window {
        start: u64,
        count: u64,
    },
    /// Sorted times of admitted requests, one per unit of cost.
    Log {
        entries: Vec<u64>,
    },
    Counter {
        start: u64,
        current: u64,
        previous: u64,
    },
    Bucket {
        units: u64,
        last: u64,
    },
    /// GCRA's and the leaky bucket's lead over now, in units of 1/limit ms.
    Debt {
        debt: u64,
        last: u64,
    },
    /// A concurrency limit's leases.
    Leases(Leases),
    /// A penalty: strikes, the end of the current cool-down, the time of the last strike.
    Penalty {
        strikes: u64,
        until: u64,
        last: u64,
    },
}

/// The cool-down left at `now` under a penalty whose state is `state` (0: none).
pub fn cooling(state: Option<&State>, now: u64) -> u64 {
    match state {
        Some(State::Penalty { until, .. }) => until.saturating_sub(now),
        _ => 0,
    }
}

/// One more strike at `now` (the twin of `lua/penalty.lua`): the penalty's new state, the
/// cool-down it starts, and how long the state matters (its TTL).
pub fn strike(penalty: &PenaltyParams, state: Option<&State>, now: u64) -> (State, u64, u64) {
    // Strikes are forgiven for time without a denial: counted from the end of the last
    // cool-down, not from the strike (a client refused all through it was not forgiven).
    let (strikes, cooled) = match state {
        Some(&State::Penalty { strikes, until, .. }) => (strikes, until),
        _ => (0, now),
    };
    // The clock may have gone back: no time has passed, nothing is forgiven.
    let forgiven = now.saturating_sub(cooled) / penalty.decay_ms.max(1);
    let strikes = strikes.saturating_sub(forgiven) + 1;
    let doubled = u128::from(penalty.base_ms) << (strikes - 1).min(40);
    let cooldown = sat(doubled.min(u128::from(penalty.max_ms)));
    let ttl = cooldown.saturating_add(strikes.saturating_mul(penalty.decay_ms));
    let state = State::Penalty {
        strikes,
        until: now.saturating_add(cooldown),
        last: now,
    };
    (state, cooldown, ttl)
}

/// How to change a limit's state when the request is admitted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Commit {
    Replace(State),
    AppendLog { at: u64, count: u64, window: u64 },
    AddLeases { at: u64, lease_ms: u64, count: u64 },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peeked {
    pub verdict: Verdict,
    /// The change to make if every limit admits the request, and the TTL of the result.
    pub commit: Option<(Commit, u64)>,
}

fn ceil_div(a: u128, b: u128) -> u64 {
    u64::try_from(a.div_ceil(b)).unwrap_or(u64::MAX)
}

fn floor_div(a: u128, b: u128) -> u64 {
    u64::try_from(a / b).unwrap_or(u64::MAX)
}

fn sat(value: u128) -> u64 {
    u64::try_from(value).unwrap_or(u64::MAX)
}

/// Decides one request of `cost` against one limit whose stored state is `state`.
pub fn peek(params: &Params, state: Option<&State>, now: u64, cost: u64) -> Peeked {
    if params.limit == 0 {
        let verdict = Verdict {
            ok: cost == 0,
            remaining: 0,
            reset_ms: 0,
            retry_after_ms: if cost == 0 { 0 } else { params.period_ms },
            ..Verdict::default()
        };
        return Peeked {
            verdict,
            commit: None,
        };
    }
    let Params {
        limit,
        period_ms: period,
        extra,
        ..
    } = *params;
    match params.strategy {
        Strategy::FixedWindow => fixed_window(state, now, cost, limit, period),
        Strategy::SlidingWindowLog => sliding_window_log(state, now, cost, limit, period),
        Strategy::SlidingWindowCounter => sliding_window_counter(state, now, cost, limit, period),
        Strategy::TokenBucket => token_bucket(state, now, cost, limit, period, extra),
        Strategy::Gcra => gcra(state, now, cost, limit, period, extra),
        Strategy::LeakyBucket => leaky_bucket(state, now, cost, limit, period, extra),
        Strategy::Concurrency => concurrency(state, now, cost, limit, period),
    }
}

fn verdict(ok: bool, remaining: u64, reset_ms: u64, retry_after_ms: u64) -> Verdict {
    Verdict {
        ok,
        remaining,
        reset_ms,
        retry_after_ms: if ok { 0 } else { retry_after_ms },
        ..Verdict::default()
    }
}

fn fixed_window(state: Option<&State>, now: u64, cost: u64, limit: u64, window: u64) -> Peeked {
    let mut start = now - now % window;
    let mut count = 0;
    if let Some(&State::Window {
        start: stored,
        count: stored_count,
    }) = state
    {
        if stored >= start {
            start = stored;
            count = stored_count;
        }
    }
    let ok = count.saturating_add(cost) <= limit;
    let after = if ok { count + cost } else { count };
    let reset = start + window - now;
    Peeked {
        verdict: verdict(ok, limit.saturating_sub(after), reset, reset),
        commit: Some((
            Commit::Replace(State::Window {
                start,
                count: after,
            }),
            reset,
        )),
    }
}

fn sliding_window_log(
    state: Option<&State>,
    now: u64,
    cost: u64,
    limit: u64,
    window: u64,
) -> Peeked {
    let empty = Vec::new();
    let stored = match state {
        Some(State::Log { entries }) => entries,
        _ => &empty,
    };
    // Sorted, so the entries that left the window (at + window <= now) are a prefix, even
    // when the clock went back and some entries are newer than now.
    let live = &stored[stored.partition_point(|&at| at.saturating_add(window) <= now)..];
    let count = live.len() as u64;
    let ok = count.saturating_add(cost) <= limit;
    let after = if ok { count + cost } else { count };
    let newest = match live.last() {
        Some(&at) if !(ok && cost > 0) || at > now => at,
        _ => now,
    };
    let reset = if after > 0 { newest + window - now } else { 0 };
    let retry = if ok {
        0
    } else {
        let k = count + cost - limit;
        match live.get((k - 1) as usize) {
            Some(&at) if k <= count => at + window - now,
            _ => window,
        }
    };
    Peeked {
        verdict: verdict(ok, limit.saturating_sub(after), reset, retry),
        commit: Some((
            Commit::AppendLog {
                at: now,
                count: cost,
                window,
            },
            reset,
        )),
    }
}

fn sliding_window_counter(
    state: Option<&State>,
    now: u64,
    cost: u64,
    limit: u64,
    window: u64,
) -> Peeked {
    let mut start = now - now % window;
    let (mut current, mut previous) = (0u64, 0u64);
    if let Some(&State::Counter {
        start: stored,
        current: c,
        previous: p,
    }) = state
    {
        if stored >= start {
            start = stored;
            current = c;
            previous = p;
        } else if stored + window == start {
            previous = c;
        }
    }
    let w = u128::from(window);
    let elapsed = now.saturating_sub(start);
    let mut weighted =
        u128::from(previous) * u128::from(window - elapsed) + u128::from(current) * w;
    let ok = weighted + u128::from(cost) * w <= u128::from(limit) * w;
    let mut after_current = current;
    if ok {
        after_current = current + cost;
        weighted += u128::from(cost) * w;
    }
    let to_window_end = start + window - now;
    let reset = if after_current > 0 {
        to_window_end + window
    } else if previous > 0 {
        to_window_end
    } else {
        0
    };
    let retry = if ok {
        0
    } else {
        let room = i128::from(limit) - i128::from(current) - i128::from(cost);
        if room >= 0 {
            let fits_at = window - floor_div(room as u128 * w, u128::from(previous)).min(window);
            fits_at - elapsed
        } else if current > 0 {
            let spare = i128::from(limit) - i128::from(cost);
            let floor = (spare * w as i128).div_euclid(i128::from(current));
            sat((i128::from(to_window_end + window) - floor).max(0) as u128)
        } else {
            to_window_end + window
        }
    };
    let remaining = floor_div((u128::from(limit) * w).saturating_sub(weighted), w);
    Peeked {
        verdict: verdict(ok, remaining, reset, retry),
        commit: Some((
            Commit::Replace(State::Counter {
                start,
                current: after_current,
                previous,
            }),
            start + 2 * window - now,
        )),
    }
}

/// Time since `last`, and the later of the two (the clock may have gone back).
fn elapsed_since(state_last: Option<u64>, now: u64) -> (u64, u64) {
    match state_last {
        Some(last) => (now.saturating_sub(last), max(last, now)),
        None => (0, now),
    }
}

fn token_bucket(
    state: Option<&State>,
    now: u64,
    cost: u64,
    limit: u64,
    window: u64,
    burst: u64,
) -> Peeked {
    let (w, rate) = (u128::from(window), u128::from(limit));
    let capacity = u128::from(burst) * w;
    let (stored, stored_last) = match state {
        Some(&State::Bucket { units, last }) => (Some(u128::from(units)), Some(last)),
        _ => (None, None),
    };
    let (elapsed, last) = elapsed_since(stored_last, now);
    let units = stored.map_or(capacity, |units| {
        min(capacity, units + u128::from(elapsed) * rate)
    });
    let need = u128::from(cost) * w;
    let ok = units >= need;
    let after = if ok { units - need } else { units };
    // A bucket in debt (charged beyond what it held) refills only from `last`, ahead of now.
    let ahead = last.saturating_sub(now);
    let reset = ceil_div(capacity - after, rate).saturating_add(ahead);
    let retry = if ok {
        0
    } else {
        ceil_div(need - units, rate).saturating_add(ahead)
    };
    Peeked {
        verdict: verdict(ok, floor_div(after, w), reset, retry),
        commit: Some((
            Commit::Replace(State::Bucket {
                units: sat(after),
                last,
            }),
            reset,
        )),
    }
}

/// Debt left of `state` at `now`, paid at `rate` units per ms.
fn debt_now(state: Option<&State>, now: u64, rate: u128) -> (u128, u64) {
    match state {
        Some(&State::Debt { debt, last }) => {
            let (elapsed, last) = elapsed_since(Some(last), now);
            (
                u128::from(debt).saturating_sub(u128::from(elapsed) * rate),
                last,
            )
        }
        _ => (0, now),
    }
}

fn gcra(state: Option<&State>, now: u64, cost: u64, limit: u64, window: u64, burst: u64) -> Peeked {
    let (w, rate) = (u128::from(window), u128::from(limit));
    let tolerance = u128::from(burst) * w;
    let (debt, last) = debt_now(state, now, rate);
    let wanted = debt + u128::from(cost) * w;
    let ok = wanted <= tolerance;
    let after = if ok { wanted } else { debt };
    let reset = ceil_div(after, rate);
    let retry = if ok {
        0
    } else {
        ceil_div(wanted - tolerance, rate)
    };
    Peeked {
        verdict: verdict(
            ok,
            floor_div(tolerance.saturating_sub(after), w),
            reset,
            retry,
        ),
        commit: Some((
            Commit::Replace(State::Debt {
                debt: sat(after),
                last,
            }),
            reset,
        )),
    }
}

fn leaky_bucket(
    state: Option<&State>,
    now: u64,
    cost: u64,
    limit: u64,
    window: u64,
    max_delay: u64,
) -> Peeked {
    let (w, rate) = (u128::from(window), u128::from(limit));
    let (queued, last) = debt_now(state, now, rate);
    let delay = ceil_div(queued, rate);
    let ok = delay <= max_delay;
    let after = if ok {
        queued + u128::from(cost) * w
    } else {
        queued
    };
    let bound = u128::from(max_delay) * rate;
    let remaining = if after <= bound {
        floor_div(bound - after, w) + 1
    } else {
        0
    };
    let reset = ceil_div(after, rate);
    let retry = if ok {
        0
    } else {
        ceil_div(queued - bound, rate)
    };
    let mut verdict = verdict(ok, remaining, reset, retry);
    verdict.delay_ms = if ok { delay } else { 0 };
    Peeked {
        verdict,
        commit: Some((
            Commit::Replace(State::Debt {
                debt: sat(after),
                last,
            }),
            reset,
        )),
    }
}

/// A concurrency limit's leases (the twin of `lua/concurrency.lua`'s set and units hash):
/// one entry per lease whatever its cost, and the sum of their costs, so that a grant and a
/// release are O(log n) and each lease's expiry is dealt with once.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Leases {
    /// (lease id, cost) → expiry ms: the script's member `<lease id>=<cost>` and its score.
    expiry_of: HashMap<(String, u64), u64>,
    /// The same leases as (expiry ms, lease id, cost), earliest first.
    by_expiry: BTreeSet<(u64, String, u64)>,
    /// The sum of their costs.
    units: u64,
}

impl Leases {
    /// How many leases are kept (expired ones included until [`forget_expired`]).
    pub fn len(&self) -> usize {
        self.by_expiry.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_expiry.is_empty()
    }

    /// The leases that expired by `now`, earliest first.
    fn expired(&self, now: u64) -> impl Iterator<Item = &(u64, String, u64)> {
        self.by_expiry
            .iter()
            .take_while(move |(expiry, _, _)| *expiry <= now)
    }

    /// Units held at `now`: O(leases expired and not yet forgotten).
    fn live_units(&self, now: u64) -> u64 {
        let gone: u64 = self.expired(now).map(|(_, _, cost)| *cost).sum();
        self.units.saturating_sub(gone)
    }

    fn forget_expired(&mut self, now: u64) {
        while let Some((expiry, _, _)) = self.by_expiry.first() {
            if *expiry > now {
                break;
            }
            if let Some((_, id, cost)) = self.by_expiry.pop_first() {
                self.expiry_of.remove(&(id, cost));
                self.units = self.units.saturating_sub(cost);
            }
        }
    }

    /// A lease of `cost` until `expiry`. A lease id already held with this cost (never,
    /// for the controller's random ids) only moves its expiry, as the script's ZADD does.
    fn add(&mut self, id: &str, cost: u64, expiry: u64) {
        match self.expiry_of.insert((id.to_owned(), cost), expiry) {
            Some(before) => {
                self.by_expiry.remove(&(before, id.to_owned(), cost));
            }
            None => self.units = self.units.saturating_add(cost),
        }
        self.by_expiry.insert((expiry, id.to_owned(), cost));
    }

    /// Gives back the lease `id` of `cost` if it is held at `now`; returns the units freed.
    fn release(&mut self, id: &str, cost: u64, now: u64) -> u64 {
        let lease = (id.to_owned(), cost);
        match self.expiry_of.get(&lease) {
            Some(&expiry) if expiry > now => {
                self.expiry_of.remove(&lease);
                self.by_expiry.remove(&(expiry, lease.0, cost));
                self.units = self.units.saturating_sub(cost);
                cost
            }
            _ => 0,
        }
    }
}

fn concurrency(state: Option<&State>, now: u64, cost: u64, limit: u64, lease: u64) -> Peeked {
    let leases = match state {
        Some(State::Leases(leases)) => Some(leases),
        _ => None,
    };
    let count = leases.map_or(0, |l| l.live_units(now));
    let ok = count.saturating_add(cost) <= limit;
    let after = if ok { count + cost } else { count };
    let mut earliest = leases.and_then(|l| {
        l.by_expiry
            .iter()
            .map(|(expiry, _, _)| *expiry)
            .find(|&expiry| expiry > now)
    });
    if ok && cost > 0 && earliest.is_none_or(|e| now + lease < e) {
        earliest = Some(now + lease);
    }
    let reset = match earliest {
        Some(expiry) if after > 0 => expiry - now,
        _ => 0,
    };
    // An expired lease's expiry is before now + lease: only live ones can be later.
    let latest = leases
        .and_then(|l| l.by_expiry.last())
        .map_or(now + lease, |(l, _, _)| max(*l, now + lease));
    Peeked {
        verdict: verdict(ok, limit.saturating_sub(after), reset, min(reset, 1_000)),
        commit: Some((
            Commit::AddLeases {
                at: now,
                lease_ms: lease,
                count: cost,
            },
            latest - now,
        )),
    }
}

/// Applies an admitted request's change to the stored state.
pub fn apply(commit: Commit, state: &mut Option<State>, lease_id: &str) {
    match commit {
        Commit::Replace(new) => *state = Some(new),
        Commit::AppendLog { at, count, window } => {
            let mut entries = match state.take() {
                Some(State::Log { entries }) => entries,
                _ => Vec::new(),
            };
            entries.retain(|&entry| entry.saturating_add(window) > at);
            let position = entries.partition_point(|&entry| entry <= at);
            entries.splice(position..position, std::iter::repeat_n(at, count as usize));
            *state = Some(State::Log { entries });
        }
        Commit::AddLeases {
            at,
            lease_ms,
            count,
        } => {
            let mut leases = match state.take() {
                Some(State::Leases(leases)) => leases,
                _ => Leases::default(),
            };
            leases.forget_expired(at);
            leases.add(lease_id, count, at + lease_ms);
            *state = Some(State::Leases(leases));
        }
    }
}

/// Forgets the concurrency leases that expired by `now` (the twin of the sweep
/// `lua/concurrency.lua` does before it counts): each lease is forgotten once, so a check
/// does not pay again for leases that expired long ago. Other states are left alone.
pub fn forget_expired(state: &mut Option<State>, now: u64) {
    if let Some(State::Leases(leases)) = state {
        leases.forget_expired(now);
    }
}

/// Gives back the lease `lease_id` granted for `count` units (`lua/release.lua`); returns
/// the units it freed: `count` while it is held at `now`, 0 once it has expired or was
/// released. O(log n), whatever the count.
/// What a refund did to a limit: its new state, how long that state matters (its TTL), and
/// how many of the units asked it gave back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refunded {
    pub state: State,
    pub ttl_ms: u64,
    pub given: u64,
}

/// Gives back `units` (in request costs) that a lease took from a limit and did not use: the
/// twin of `refund` in `lua/fixed_window.lua`, `lua/token_bucket.lua` and `lua/gcra.lua`.
/// Never more than the state holds taken, so the limit admits no more than it would have
/// had the lease never been taken: a fixed window only within the window the lease was
/// counted in (`counted_in`, that window's start: the quota of a window that ended is gone
/// with it), a bucket up to full, GCRA's debt down to none. `None` when nothing is given
/// (no state, another window, or a strategy that cannot be leased).
pub fn refund(
    params: &Params,
    state: Option<&State>,
    now: u64,
    units: u64,
    counted_in: u64,
) -> Option<Refunded> {
    let Params {
        limit,
        period_ms: window,
        extra: burst,
        ..
    } = *params;
    if limit == 0 || window == 0 || units == 0 {
        return None;
    }
    let (w, rate) = (u128::from(window), u128::from(limit));
    match (params.strategy, state) {
        (Strategy::FixedWindow, Some(&State::Window { start, count })) => {
            let ends = start.saturating_add(window);
            if start != counted_in || now >= ends || count == 0 {
                return None;
            }
            let given = min(units, count);
            Some(Refunded {
                state: State::Window {
                    start,
                    count: count - given,
                },
                ttl_ms: ends - now,
                given,
            })
        }
        (
            Strategy::TokenBucket,
            Some(&State::Bucket {
                units: stored,
                last,
            }),
        ) => {
            let capacity = u128::from(burst) * w;
            let (elapsed, last) = elapsed_since(Some(last), now);
            let held = min(capacity, u128::from(stored) + u128::from(elapsed) * rate);
            let back = min(u128::from(units) * w, capacity - held);
            let after = held + back;
            Some(Refunded {
                state: State::Bucket {
                    units: sat(after),
                    last,
                },
                ttl_ms: ceil_div(capacity - after, rate).saturating_add(last.saturating_sub(now)),
                given: floor_div(back, w),
            })
        }
        (Strategy::Gcra, Some(State::Debt { .. })) => {
            let (debt, last) = debt_now(state, now, rate);
            let back = min(u128::from(units) * w, debt);
            let after = debt - back;
            Some(Refunded {
                state: State::Debt {
                    debt: sat(after),
                    last,
                },
                ttl_ms: ceil_div(after, rate),
                given: floor_div(back, w),
            })
        }
        _ => None,
    }
}

/// Charges `units` (in request costs) a request used beyond what it reserved: the twin of
/// `charge` in `lua/fixed_window.lua`, `lua/token_bucket.lua` and `lua/gcra.lua`. Charged in
/// full whatever the limit holds (the usage happened): a fixed window counts it in the
/// window that is current now, past its limit if need be; a bucket goes into debt (empty,
/// and refilling only from a later time); GCRA's debt grows past its burst. Each admits
/// the client again only once the overdraft is paid. `None` for a strategy that cannot
/// settle usage.
pub fn charge(params: &Params, state: Option<&State>, now: u64, units: u64) -> Option<Charged> {
    let Params {
        limit,
        period_ms: window,
        extra: burst,
        ..
    } = *params;
    if limit == 0 || window == 0 || units == 0 {
        return None;
    }
    let (w, rate) = (u128::from(window), u128::from(limit));
    match params.strategy {
        Strategy::FixedWindow => {
            let current = now - now % window;
            // A stored window later than now (the clock went back) keeps counting.
            let (start, count) = match state {
                Some(&State::Window { start, count }) if start >= current => (start, count),
                _ => (current, 0),
            };
            Some(Charged {
                state: State::Window {
                    start,
                    count: count.saturating_add(units),
                },
                ttl_ms: start + window - now,
            })
        }
        Strategy::TokenBucket => {
            let capacity = u128::from(burst) * w;
            let (held, last) = match state {
                Some(&State::Bucket {
                    units: stored,
                    last,
                }) => {
                    let (elapsed, last) = elapsed_since(Some(last), now);
                    (
                        min(capacity, u128::from(stored) + u128::from(elapsed) * rate),
                        last,
                    )
                }
                _ => (capacity, now),
            };
            let need = u128::from(units) * w;
            // Short of tokens: the bucket stays empty until the shortfall has flowed in.
            let (after, last) = if held >= need {
                (held - need, last)
            } else {
                (0, last.saturating_add(ceil_div(need - held, rate)))
            };
            let ttl_ms = ceil_div(capacity - after, rate).saturating_add(last.saturating_sub(now));
            Some(Charged {
                state: State::Bucket {
                    units: sat(after),
                    last,
                },
                ttl_ms,
            })
        }
        Strategy::Gcra => {
            let (debt, last) = debt_now(state, now, rate);
            let after = debt + u128::from(units) * w;
            Some(Charged {
                state: State::Debt {
                    debt: sat(after),
                    last,
                },
                ttl_ms: ceil_div(after, rate),
            })
        }
        _ => None,
    }
}

/// What a charge did to a limit: its new state and how long that state matters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Charged {
    pub state: State,
    pub ttl_ms: u64,
}

pub fn release(state: &mut Option<State>, lease_id: &str, count: u64, now: u64) -> u64 {
    match state {
        Some(State::Leases(leases)) => leases.release(lease_id, count, now),
        _ => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slots(limit: u64) -> Params {
        Params {
            strategy: Strategy::Concurrency,
            limit,
            period_ms: 30_000,
            extra: 0,
            penalty: None,
        }
    }

    /// Checks a request of `cost` at `now` and, as the stores do, applies it when admitted
    /// and not free.
    fn take(state: &mut Option<State>, limit: u64, now: u64, cost: u64, id: &str) -> Verdict {
        let peeked = peek(&slots(limit), state.as_ref(), now, cost);
        if let (true, true, Some((commit, _))) = (peeked.verdict.ok, cost > 0, peeked.commit) {
            apply(commit, state, id);
        }
        peeked.verdict
    }

    fn leases(state: &Option<State>) -> &Leases {
        match state {
            Some(State::Leases(leases)) => leases,
            other => panic!("not leases: {other:?}"),
        }
    }

    fn usage_limit(strategy: Strategy) -> Params {
        Params {
            strategy,
            limit: 100,
            period_ms: 1_000,
            extra: 100,
            penalty: None,
        }
    }

    /// Admits `cost` at `now` as the stores do; whether it was admitted.
    fn admit(params: &Params, state: &mut Option<State>, now: u64, cost: u64) -> bool {
        let peeked = peek(params, state.as_ref(), now, cost);
        if let (true, Some((commit, _))) = (peeked.verdict.ok, peeked.commit) {
            apply(commit, state, "");
        }
        peeked.verdict.ok
    }

    #[test]
    fn usage_beyond_what_is_left_is_charged_in_full_and_paid_before_the_next_admission() {
        for strategy in [Strategy::FixedWindow, Strategy::TokenBucket, Strategy::Gcra] {
            let params = usage_limit(strategy);
            let mut state = None;
            assert!(admit(&params, &mut state, 10_000, 60), "{strategy:?}");
            // The response said 160: 100 more than reserved, 60 past the limit.
            let charged = charge(&params, state.as_ref(), 10_000, 100).unwrap();
            state = Some(charged.state);
            assert!(charged.ttl_ms > 0);
            assert!(
                !admit(&params, &mut state, 10_001, 1),
                "{strategy:?}: overdrawn"
            );
            if strategy == Strategy::FixedWindow {
                // The next window starts afresh: the overdraft was this window's.
                assert!(admit(&params, &mut state, 11_000, 100));
            } else {
                // 160 used of a bucket of 100 refilled at 100/s: 60 owed, so 1 is there
                // again after 610 ms and not before.
                assert!(!admit(&params, &mut state, 10_609, 1), "{strategy:?}");
                assert!(admit(&params, &mut state, 10_610, 1), "{strategy:?}");
            }
        }
    }

    #[test]
    fn a_charge_on_a_fresh_limit_counts_from_full() {
        for strategy in [Strategy::FixedWindow, Strategy::TokenBucket, Strategy::Gcra] {
            let params = usage_limit(strategy);
            let mut state = Some(charge(&params, None, 5_500, 30).unwrap().state);
            assert!(admit(&params, &mut state, 5_500, 70), "{strategy:?}");
            assert!(!admit(&params, &mut state, 5_500, 1), "{strategy:?}");
        }
        let unsettled = usage_limit(Strategy::SlidingWindowCounter);
        assert!(charge(&unsettled, None, 5_500, 30).is_none());
        assert!(charge(&usage_limit(Strategy::Gcra), None, 5_500, 0).is_none());
    }

    #[test]
    fn a_lease_is_one_entry_whatever_its_cost_and_goes_back_whole() {
        let mut state = None;
        let v = take(&mut state, 2_000_000, 1_000, 1_000_000, "a");
        assert_eq!((v.ok, v.remaining), (true, 1_000_000));
        assert_eq!(leases(&state).len(), 1);
        assert_eq!(release(&mut state, "a", 1_000_000, 1_001), 1_000_000);
        assert!(leases(&state).is_empty());
        assert_eq!(release(&mut state, "a", 1_000_000, 1_002), 0, "a replay");
        assert_eq!(
            take(&mut state, 2_000_000, 1_003, 0, "").remaining,
            2_000_000
        );
    }

    #[test]
    fn a_release_names_the_cost_it_was_granted() {
        let mut state = None;
        take(&mut state, 10, 1_000, 3, "a");
        assert_eq!(release(&mut state, "a", 1, 1_001), 0);
        assert_eq!(release(&mut state, "a", 4, 1_001), 0);
        assert_eq!(take(&mut state, 10, 1_001, 0, "").remaining, 7);
    }

    #[test]
    fn expired_leases_give_their_units_back_once() {
        let mut state = None;
        take(&mut state, 5, 1_000, 3, "a");
        take(&mut state, 5, 2_000, 2, "b");
        assert!(!take(&mut state, 5, 30_999, 1, "c").ok);
        // a expires at 31 000: its 3 units come back, before and after it is forgotten.
        assert_eq!(take(&mut state, 5, 31_000, 0, "").remaining, 3);
        assert_eq!(
            release(&mut state, "a", 3, 31_000),
            0,
            "expired: nothing to free"
        );
        forget_expired(&mut state, 31_000);
        assert_eq!(leases(&state).len(), 1);
        assert_eq!(take(&mut state, 5, 31_000, 0, "").remaining, 3);
        assert_eq!(release(&mut state, "b", 2, 31_000), 2);
        assert_eq!(take(&mut state, 5, 31_000, 0, "").remaining, 5);
    }

    /// What the settlement arithmetic owes the model: with the clock still (one instant,
    /// one window), every limit holds, in units, what the settled requests used plus what
    /// the unsettled ones reserved — whatever was admitted, in whatever order requests
    /// settle, under or over their reservations.
    mod settlement {
        use super::*;
        use proptest::prelude::{any, prop, prop_assert, prop_assert_eq, proptest};

        const NOW: u64 = 7_250;

        /// The units a limit's state holds taken, scaled by the window (as it stores them),
        /// and how far below the truth it may be (a bucket's debt is kept as time, rounded
        /// up to whole milliseconds of refill: at most `rate` under per charge into debt).
        fn held_taken(params: &Params, state: &Option<State>) -> u128 {
            let w = u128::from(params.period_ms);
            let rate = u128::from(params.limit);
            match (params.strategy, state) {
                (_, None) => 0,
                (Strategy::FixedWindow, Some(State::Window { count, .. })) => {
                    u128::from(*count) * w
                }
                (Strategy::Gcra, Some(State::Debt { debt, .. })) => u128::from(*debt),
                (Strategy::TokenBucket, Some(State::Bucket { units, last })) => {
                    let capacity = u128::from(params.extra) * w;
                    let owed = u128::from(last.saturating_sub(NOW)) * rate;
                    capacity + owed - u128::from(*units)
                }
                (strategy, other) => panic!("{strategy:?} holds {other:?}"),
            }
        }

        proptest! {
            #[test]
            fn a_limit_holds_what_was_used_plus_what_is_still_reserved(
                strategy in prop::sample::select(vec![
                    Strategy::FixedWindow, Strategy::TokenBucket, Strategy::Gcra,
                ]),
                ops in prop::collection::vec((any::<bool>(), 0u64..1_000, 0u64..150), 1..40),
            ) {
                let params = usage_limit(strategy);
                let w = u128::from(params.period_ms);
                let window_start = NOW - NOW % params.period_ms;
                let mut state: Option<State> = None;
                let mut outstanding: Vec<u64> = Vec::new();
                let (mut settled_used, mut debt_charges) = (0u128, 0u128);
                for (settle, a, used) in ops {
                    if settle && !outstanding.is_empty() {
                        let reserved = outstanding.swap_remove(a as usize % outstanding.len());
                        if used < reserved {
                            if let Some(given) =
                                refund(&params, state.as_ref(), NOW, reserved - used, window_start)
                            {
                                prop_assert_eq!(given.given, reserved - used);
                                state = Some(given.state);
                            } else {
                                prop_assert!(false, "a refund within its window gives");
                            }
                        } else if used > reserved {
                            let before = held_taken(&params, &state);
                            let charged = charge(&params, state.as_ref(), NOW, used - reserved);
                            prop_assert!(charged.is_some());
                            if let Some(charged) = charged {
                                state = Some(charged.state);
                            }
                            let capacity = u128::from(params.extra) * w;
                            if strategy == Strategy::TokenBucket
                                && before + u128::from(used - reserved) * w > capacity
                            {
                                debt_charges += 1;
                            }
                        }
                        settled_used += u128::from(used);
                    } else {
                        let reserve = 1 + a % 60;
                        if admit(&params, &mut state, NOW, reserve) {
                            outstanding.push(reserve);
                        }
                    }
                    let model = (settled_used
                        + outstanding.iter().map(|r| u128::from(*r)).sum::<u128>())
                        * w;
                    let held = held_taken(&params, &state);
                    let slack = debt_charges * u128::from(params.limit);
                    prop_assert!(
                        held <= model + slack && held >= model,
                        "{:?}: holds {} taken, the model {} (slack {})",
                        strategy, held, model, slack
                    );
                }
            }
        }
    }
}
