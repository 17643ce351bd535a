//! Answers check calls: finds the rules that apply to each check, asks the store, and says
//! which limit speaks for the decision. Each call reads one configuration snapshot, whole.

use std::borrow::Cow;
use std::sync::Arc;

use sluice_protocol::config::UnknownApiKeys;
use sluice_protocol::{
    Check, CheckRequest, CheckResponse, ClientId, ClientKind, Decision, DenyReason, Grant,
    LeaseReturn, PolicyStatus, Refusal, Rule, Scope, Settlement, Strategy, UsageReservation,
    MAX_USAGE,
};

use super::credential::{CheckTokens, LeaseSigner};
use super::grant::{self, GrantToken, GrantedLimit, Taker, TokenKind};
use crate::config::{LiveConfig, Snapshot};
use crate::keys;
use crate::metrics::Metrics;
use crate::protection::Guard;
use crate::stats::{self, Recorder, UsageSettled};
use crate::store::{Charge, CheckSpec, LimitSpec, Outcome, Reservation, Store, StoreError};
use crate::strategy::{Params, Verdict};

pub struct Limiter {
    config: Arc<LiveConfig>,
    store: Arc<dyn Store>,
    /// Where unknown API keys are counted against their address (brute-force protection).
    guard: Option<Arc<Guard>>,
    metrics: Arc<Metrics>,
    /// Stats, alerts and the log of limited requests (none: `--stats false`).
    recorder: Option<Arc<Recorder>>,
    signer: LeaseSigner,
    /// Signs grant tokens (see `grant`): never without a key.
    grant_signer: LeaseSigner,
}

/// A check's limits as the store is asked about them: the enforced rules together (all or
/// nothing), then each shadow rule on its own, so that a shadow rule never blocks and
/// counts only what it would have admitted.
struct Asked<'r> {
    enforced: Vec<&'r Rule>,
    enforced_specs: Vec<LimitSpec>,
    shadow: Vec<(&'r Rule, Vec<LimitSpec>)>,
    lease_id: String,
}

enum Plan<'r> {
    Decided(Decision),
    Ask(Asked<'r>),
}

impl Asked<'_> {
    fn specs(&self) -> impl Iterator<Item = CheckSpec<'_>> {
        let enforced = (!self.enforced_specs.is_empty()).then_some(CheckSpec {
            limits: &self.enforced_specs,
            lease_id: &self.lease_id,
        });
        enforced
            .into_iter()
            .chain(self.shadow.iter().map(|(_, specs)| CheckSpec {
                limits: specs,
                lease_id: &self.lease_id,
            }))
    }
}

/// How long after admission a usage reservation may be settled: longer than any response a
/// proxy lets stream. Later, the reservation stands as charged.
pub const SETTLE_WITHIN_MS: u64 = 60 * 60 * 1_000;

/// What settling each reservation did: units given back (it used less than reserved) and
/// units charged (it used more), 0 and 0 for a settlement that was not taken (a token this
/// deployment did not sign, one settled before, or one past [`SETTLE_WITHIN_MS`]).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Settled {
    pub returned: Vec<u64>,
    pub charged: Vec<u64>,
}

/// A lease token the filter sent back that this controller did not hand out.
#[derive(Debug, thiserror::Error)]
#[error("leases[{index}]: not a lease of this controller")]
pub struct BadLease {
    pub index: usize,
}

/// A return that asks back more than its grant holds.
#[derive(Debug, thiserror::Error)]
#[error("returns[{index}].unused: {why}")]
pub struct BadReturn {
    pub index: usize,
    pub why: String,
}

#[derive(Debug, thiserror::Error)]
pub enum ReleaseError {
    #[error(transparent)]
    BadLease(#[from] BadLease),
    #[error(transparent)]
    BadReturn(#[from] BadReturn),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl Limiter {
    pub fn new(config: Arc<LiveConfig>, store: Arc<dyn Store>) -> Self {
        Limiter {
            config,
            store,
            guard: None,
            metrics: Arc::new(Metrics::new()),
            recorder: None,
            signer: LeaseSigner::default(),
            grant_signer: LeaseSigner::for_grants(&CheckTokens::default()),
        }
    }

    /// Signs the grant tokens it hands out (with which workers give leases' unused quota
    /// back), and takes returns only of tokens signed so.
    pub fn with_grant_signer(mut self, signer: LeaseSigner) -> Self {
        self.grant_signer = signer;
        self
    }

    /// Signs the lease tokens it hands out, and refuses releases of tokens it did not sign.
    pub fn with_lease_signer(mut self, signer: LeaseSigner) -> Self {
        self.signer = signer;
        self
    }

    /// Times store commands in `metrics` and records decisions in `recorder`.
    pub fn with_observability(
        mut self,
        metrics: Arc<Metrics>,
        recorder: Option<Arc<Recorder>>,
    ) -> Self {
        self.metrics = metrics;
        self.recorder = recorder;
        self
    }

    pub fn recorder(&self) -> Option<&Arc<Recorder>> {
        self.recorder.as_ref()
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// `store_call` timed as `command` in the metrics.
    async fn timed<T>(
        &self,
        command: &str,
        store_call: impl std::future::Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        let began = std::time::Instant::now();
        let result = store_call.await;
        self.metrics
            .store_command(command, began.elapsed().as_secs_f64(), result.is_err());
        result
    }

    /// Counts refused unknown API keys in `guard`.
    pub fn with_guard(mut self, guard: Arc<Guard>) -> Self {
        self.guard = Some(guard);
        self
    }

    pub fn store(&self) -> &dyn Store {
        self.store.as_ref()
    }

    pub fn config(&self) -> &LiveConfig {
        &self.config
    }

    /// Decides every check of a call, in order, with one store call for the whole batch:
    /// a later check for the same counter sees the earlier one's effect, exactly as if they
    /// had arrived one by one.
    pub async fn check(&self, request: &CheckRequest) -> Result<CheckResponse, StoreError> {
        let snapshot = self.config.snapshot();
        let checks: Vec<Cow<'_, Check>> = request
            .checks
            .iter()
            .map(|check| resolve_api_key(&snapshot, check))
            .collect();
        let rejecting = unknown_keys_policy(&snapshot) == UnknownApiKeys::Reject
            // The emergency switch lets everything through.
            && snapshot.operations.enforce;
        let mut plans: Vec<Plan<'_>> = checks
            .iter()
            .map(|check| {
                if rejecting && unknown_api_key(&snapshot, check) {
                    if let (Some(guard), Some(ip)) = (&self.guard, &check.ip) {
                        guard.strike(ip, 1);
                    }
                    return Plan::Decided(Decision {
                        allowed: false,
                        refused: Some(Refusal::UnknownApiKey),
                        ..Decision::unlimited()
                    });
                }
                plan(&snapshot, check)
            })
            .collect();
        let batch: Vec<CheckSpec<'_>> = plans
            .iter()
            .flat_map(|plan| match plan {
                Plan::Ask(asked) => Some(asked.specs()),
                Plan::Decided(_) => None,
            })
            .flatten()
            .collect();
        let outcomes = if batch.is_empty() {
            Vec::new()
        } else {
            match self.timed("check", self.store.check_batch(&batch)).await {
                Ok(outcomes) => outcomes,
                Err(error) => {
                    if let Some(recorder) = &self.recorder {
                        let seen: Vec<&Check> = checks.iter().map(AsRef::as_ref).collect();
                        recorder.failed(&snapshot, &seen);
                    }
                    return Err(error);
                }
            }
        };
        let well_formed = outcomes.len() == batch.len()
            && outcomes
                .iter()
                .zip(&batch)
                .all(|(o, c)| o.verdicts.len() == c.limits.len());
        if !well_formed {
            return Err(StoreError::Reply(format!(
                "{} outcomes for {} checks, or verdicts missing",
                outcomes.len(),
                batch.len()
            )));
        }
        let mut outcomes = outcomes.into_iter();
        let mut decisions: Vec<Decision> = plans
            .iter_mut()
            .zip(&checks)
            .map(|(plan, check)| match plan {
                // Taken out, not copied: only the asked plans are needed after this.
                Plan::Decided(decision) => std::mem::replace(decision, Decision::unlimited()),
                Plan::Ask(asked) => {
                    // Counted above: one outcome per spec, one verdict per limit.
                    // No enforced rule: nothing was asked, nothing denies.
                    let enforced = if asked.enforced_specs.is_empty() {
                        None
                    } else {
                        outcomes.next()
                    }
                    .unwrap_or(Outcome {
                        denied_by: None,
                        verdicts: Vec::new(),
                        in_fallback: false,
                    });
                    let shadow: Vec<Outcome> = outcomes.by_ref().take(asked.shadow.len()).collect();
                    let mut decision = decide(asked, &enforced, &shadow);
                    // Counted: every enforced limit took its reservation. A fallback's
                    // answer took nothing from the store: nothing to settle there.
                    if request.settles && enforced.allowed() && !enforced.in_fallback {
                        decision.usage =
                            self.usage_reservations(&snapshot, check, asked, &enforced);
                    } else if !request.settles
                        && asked.enforced.iter().any(|rule| rule.usage.is_some())
                    {
                        // An asker that does not settle may be a 0.1.0 filter, which
                        // refuses a policy with fields it does not know.
                        decision.forget_usage();
                    }
                    decision
                }
            })
            .collect();
        if let Some(holder) = request.lease_holder.as_deref() {
            if snapshot.leases {
                self.grant_leases(holder, &checks, &plans, &mut decisions)
                    .await;
            }
        }
        for decision in &mut decisions {
            for lease in &mut decision.leases {
                *lease = self.signer.sign(std::mem::take(lease));
            }
        }
        if let Some(recorder) = &self.recorder {
            let seen: Vec<&Check> = checks.iter().map(AsRef::as_ref).collect();
            recorder.record(&snapshot, &seen, &decisions);
        }
        Ok(CheckResponse { decisions })
    }

    /// Leases quota to `holder` for the admitted checks whose rules are all leased. A lease
    /// is reserved first (`Store::reserve_leases`: per limit, the unused part of all leases
    /// stays within `share_percent` % of its quota, split evenly between their holders),
    /// then taken from every limit of the check at once (an ordinary all-or-nothing check of
    /// `units` requests), so what leases admit never goes beyond the limits. Best effort: a
    /// store that fails here costs the lease, never the decision already made.
    async fn grant_leases(
        &self,
        holder: &str,
        checks: &[Cow<'_, Check>],
        plans: &[Plan<'_>],
        decisions: &mut [Decision],
    ) {
        // One lease per kind of request in a call: the worker sent the others of the kind
        // before the first lease reached it, and the first lease serves what follows.
        let mut kinds: Vec<u64> = Vec::new();
        let wanted: Vec<(usize, &Asked<'_>, u64, u64)> = plans
            .iter()
            .zip(decisions.iter())
            .enumerate()
            .filter_map(|(index, (plan, decision))| {
                let Plan::Ask(asked) = plan else {
                    return None;
                };
                if !checks[index].lease {
                    return None;
                }
                let ttl_ms = lease_ttl(asked, decision)?;
                let kind = lease_kind(&checks[index]);
                if kinds.contains(&kind) {
                    return None;
                }
                kinds.push(kind);
                Some((index, asked, ttl_ms, kind))
            })
            .collect();
        if wanted.is_empty() {
            return;
        }
        // One lease per worker and kind of request (the filter keeps leases by the
        // request's decision facts), so each is a holder of its own.
        let asked_for: Vec<Reservation> = wanted
            .iter()
            .flat_map(|(_, asked, ttl_ms, kind)| {
                let leaseholder = format!("{holder}.{kind:016x}");
                asked
                    .enforced
                    .iter()
                    .zip(&asked.enforced_specs)
                    .map(move |(rule, spec)| Reservation {
                        key: keys::lease_holders_key(&spec.key),
                        holder: leaseholder.clone(),
                        ttl_ms: *ttl_ms,
                        quota: lease_quota(rule),
                    })
            })
            .collect();
        let reserved = match self
            .timed("lease_reserve", self.store.reserve_leases(&asked_for))
            .await
        {
            Ok(reserved) if reserved.len() == asked_for.len() => reserved,
            Ok(_) | Err(_) => return,
        };
        let mut reserved = reserved.into_iter();
        let mut grants: Vec<(usize, u64, u64, Vec<LimitSpec>, String)> = Vec::new();
        for (index, asked, ttl_ms, kind) in wanted {
            let of_check: Vec<u64> = reserved.by_ref().take(asked.enforced.len()).collect();
            let units = lease_units(asked, &decisions[index], &of_check);
            if units == 0 {
                continue;
            }
            let specs = asked
                .enforced_specs
                .iter()
                .map(|spec| LimitSpec {
                    cost: spec.cost.saturating_mul(units),
                    ..spec.clone()
                })
                .collect();
            grants.push((index, units, ttl_ms, specs, format!("{holder}.{kind:016x}")));
        }
        if grants.is_empty() {
            return;
        }
        let batch: Vec<CheckSpec<'_>> = grants
            .iter()
            .map(|(_, _, _, specs, _)| CheckSpec {
                limits: specs,
                lease_id: "",
            })
            .collect();
        let Ok(outcomes) = self.timed("lease", self.store.check_batch(&batch)).await else {
            return;
        };
        for ((index, units, ttl_ms, specs, leaseholder), outcome) in grants.iter().zip(outcomes) {
            if !outcome.allowed() {
                continue;
            }
            let decision = &mut decisions[*index];
            let token = self.grant_token(decision, *units, *ttl_ms, specs, &outcome, leaseholder);
            decision.grant = Some(Grant {
                units: *units,
                ttl_ms: *ttl_ms,
                token: Some(token),
            });
            if let Some(policy) = &decision.policy {
                self.metrics.lease_granted(&policy.rule, *units);
            }
        }
    }

    /// The signed token with which the worker can give back what a lease of `units`
    /// requests, taken as `specs` (the store's `outcome`), leaves unused.
    fn grant_token(
        &self,
        decision: &Decision,
        units: u64,
        ttl_ms: u64,
        specs: &[LimitSpec],
        outcome: &Outcome,
        leaseholder: &str,
    ) -> String {
        let store_now = self.store.now_ms();
        let limits = specs
            .iter()
            .zip(&outcome.verdicts)
            .map(|(spec, verdict)| GrantedLimit {
                key: &spec.key,
                params: spec.params,
                cost: spec.cost / units.max(1),
                counted_in: if spec.params.strategy == Strategy::FixedWindow {
                    grant::counted_in(store_now, verdict.reset_ms, spec.params.period_ms)
                } else {
                    0
                },
            })
            .collect();
        let id = new_lease_id();
        let token = GrantToken {
            kind: TokenKind::Lease,
            id: &id,
            until_ms: store_now.saturating_add(ttl_ms),
            rule: decision.policy.as_ref().map_or("", |policy| &policy.rule),
            units,
            limits,
            holder: leaseholder,
            taker: Taker::default(),
        };
        self.grant_signer.sign(token.encode())
    }

    /// The reservations an admitted check holds of its enforced usage rules, each with the
    /// signed token its settlement presents (which names the tier and client, for the stats).
    fn usage_reservations(
        &self,
        snapshot: &Snapshot,
        check: &Check,
        asked: &Asked<'_>,
        enforced: &Outcome,
    ) -> Vec<UsageReservation> {
        if !asked.enforced.iter().any(|rule| rule.usage.is_some()) {
            return Vec::new();
        }
        let store_now = self.store.now_ms();
        let client = format!("{}:{}", check.client.kind, check.client.value);
        let taker = Taker {
            tier: stats::tier_label(snapshot, check.tier.as_deref()),
            client: &client,
        };
        asked
            .enforced
            .iter()
            .zip(&asked.enforced_specs)
            .zip(&enforced.verdicts)
            .filter_map(|((rule, spec), verdict)| {
                let usage = rule.usage.as_ref()?;
                let from = usage.source()?;
                let id = new_lease_id();
                let token = GrantToken {
                    kind: TokenKind::Reservation,
                    id: &id,
                    until_ms: store_now.saturating_add(SETTLE_WITHIN_MS),
                    rule: &rule.name,
                    units: spec.cost,
                    limits: vec![GrantedLimit {
                        key: &spec.key,
                        params: spec.params,
                        cost: 1,
                        counted_in: if spec.params.strategy == Strategy::FixedWindow {
                            grant::counted_in(store_now, verdict.reset_ms, spec.params.period_ms)
                        } else {
                            0
                        },
                    }],
                    holder: "",
                    taker,
                };
                self.metrics.usage(&rule.name, "reserved", spec.cost);
                Some(UsageReservation {
                    rule: rule.name.clone(),
                    reserved: spec.cost,
                    from,
                    max: rule.usage_max().unwrap_or(MAX_USAGE),
                    // What this request reserved, not the rule's fixed `reserve`: with
                    // `reserve_from` they differ.
                    unreported: usage.unreported.unwrap_or(spec.cost),
                    token: self.grant_signer.sign(token.encode()),
                })
            })
            .collect()
    }

    /// Settles usage reservations with what their responses reported: what was reserved
    /// and not used goes back to the limit (within the window it was counted in, for a
    /// fixed window), what was used beyond the reservation is charged in full. Each
    /// reservation settles once; `used` is clamped to [`MAX_USAGE`].
    pub async fn settle(&self, settlements: &[Settlement]) -> Result<Settled, StoreError> {
        let now_ms = self.store.now_ms();
        let mut refunds = Vec::new();
        let mut charges = Vec::new();
        // Per settlement: its token, and where its refund or charge is.
        let mut taken: Vec<(usize, GrantToken<'_>, Result<usize, usize>)> = Vec::new();
        for (index, settlement) in settlements.iter().enumerate() {
            let Some(token) = self
                .grant_signer
                .verify(&settlement.reservation)
                .and_then(GrantToken::parse)
                .filter(|token| token.kind == TokenKind::Reservation)
            else {
                continue;
            };
            let Some(limit) = token.limits.first() else {
                continue;
            };
            if now_ms >= token.until_ms {
                continue;
            }
            let used = settlement.used.min(MAX_USAGE);
            let remember_ms = token.until_ms.saturating_sub(now_ms).saturating_add(60_000);
            let at = if used > token.units {
                charges.push(Charge {
                    key: limit.key.to_owned(),
                    params: limit.params,
                    units: used - token.units,
                    reservation: token.id.to_owned(),
                    remember_ms,
                });
                Err(charges.len() - 1)
            } else {
                // Nothing to give back still settles it: a replay then changes nothing.
                refunds.extend(token.refunds(token.units - used, now_ms));
                Ok(refunds.len() - 1)
            };
            taken.push((index, token, at));
        }
        let mut settled = Settled {
            returned: vec![0; settlements.len()],
            charged: vec![0; settlements.len()],
        };
        let returned = if refunds.is_empty() {
            Vec::new()
        } else {
            self.timed("usage_return", self.store.refund(&refunds))
                .await?
        };
        let charged = if charges.is_empty() {
            Vec::new()
        } else {
            self.timed("usage_charge", self.store.charge(&charges))
                .await?
        };
        let mut seen = Vec::with_capacity(taken.len());
        for (index, token, at) in taken {
            let mut counted = UsageSettled {
                rule: token.rule,
                tier: token.taker.tier,
                client: token.taker.client,
                reserved: token.units,
                returned: 0,
                charged: 0,
            };
            match at {
                Ok(at) => {
                    counted.returned = returned.get(at).copied().unwrap_or(0);
                    settled.returned[index] = counted.returned;
                    self.metrics.usage(token.rule, "returned", counted.returned);
                }
                Err(at) => {
                    counted.charged = charged.get(at).copied().unwrap_or(0);
                    settled.charged[index] = counted.charged;
                    self.metrics.usage(token.rule, "charged", counted.charged);
                }
            }
            seen.push(counted);
        }
        if let Some(recorder) = &self.recorder {
            recorder.settled(&seen);
        }
        Ok(settled)
    }

    /// Gives back what leases left unused, by their grants' tokens: per return, the
    /// requests' worth of quota given back (0 for a token this deployment did not sign, a
    /// lease that has ended, or a grant returned before). `unused` beyond what the grant
    /// holds is refused, naming the return.
    pub async fn return_leases(&self, returns: &[LeaseReturn]) -> Result<Vec<u64>, ReleaseError> {
        let now_ms = self.store.now_ms();
        let mut refunds = Vec::new();
        let mut of_return: Vec<(usize, usize, u64, &str)> = Vec::new();
        for (index, returned) in returns.iter().enumerate() {
            let Some(token) = self
                .grant_signer
                .verify(&returned.grant)
                .and_then(GrantToken::parse)
                .filter(|token| token.kind == TokenKind::Lease)
            else {
                continue;
            };
            if returned.unused > token.units {
                return Err(ReleaseError::BadReturn(BadReturn {
                    index,
                    why: format!(
                        "{} unused of a lease of {} requests",
                        returned.unused, token.units
                    ),
                }));
            }
            if returned.unused == 0 || now_ms >= token.until_ms {
                continue;
            }
            let first = refunds.len();
            let cost = token.limits.first().map_or(1, |limit| limit.cost.max(1));
            refunds.extend(token.refunds(returned.unused, now_ms));
            of_return.push((index, first, cost, token.rule));
        }
        let mut given = vec![0; returns.len()];
        if refunds.is_empty() {
            return Ok(given);
        }
        let refunded = self
            .timed("lease_return", self.store.refund(&refunds))
            .await?;
        for (index, first, cost, rule) in of_return {
            let requests = refunded.get(first).copied().unwrap_or(0) / cost;
            given[index] = requests;
            if requests > 0 {
                self.metrics.lease_returned(rule, requests);
            }
        }
        Ok(given)
    }

    /// Gives back the slots named by lease tokens; returns how many were still held.
    pub async fn release(&self, tokens: &[String]) -> Result<u64, ReleaseError> {
        let leases = tokens
            .iter()
            .enumerate()
            .map(|(index, token)| {
                self.signer
                    .verify(token)
                    .and_then(parse_lease_token)
                    .ok_or(BadLease { index })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let mut freed = 0;
        for (key, lease_id, count) in leases {
            freed += self
                .timed("release", self.store.release(key, lease_id, count))
                .await?;
        }
        if let Some(recorder) = &self.recorder {
            recorder.released(tokens);
        }
        Ok(freed)
    }

    /// The counters `client` (of `tier`) has under each rule that would count it (or under
    /// `rule` only), read without consuming anything. Route-scoped rules count a route, not
    /// a client, and are left out.
    pub async fn inspect(
        &self,
        client: &ClientId,
        tier: Option<&str>,
        rule: Option<&str>,
    ) -> Result<Vec<PolicyStatus>, StoreError> {
        let snapshot = self.config.snapshot();
        let counted = counters_of(&snapshot, client, tier, rule, true);
        if counted.is_empty() {
            return Ok(Vec::new());
        }
        let limits: Vec<LimitSpec> = counted
            .iter()
            .map(|(rule, key)| LimitSpec {
                key: key.clone(),
                params: Params::of(rule),
                cost: 0,
            })
            .collect();
        let verdicts = self.store.check_each(&limits).await?;
        Ok(counted
            .iter()
            .zip(verdicts)
            .map(|((rule, _), verdict)| policy(rule, &verdict))
            .collect())
    }

    /// Resets counters: `client`'s own under every rule (or `rule`; not the counters it
    /// shares with others under `global` and `tier` rules), every client's under `rule`, or
    /// every counter. Returns how many were deleted.
    pub async fn reset(&self, target: &ResetTarget<'_>) -> Result<u64, StoreError> {
        match target {
            ResetTarget::Client { client, tier, rule } => {
                let snapshot = self.config.snapshot();
                let keys: Vec<String> = counters_of(&snapshot, client, *tier, *rule, false)
                    .into_iter()
                    .flat_map(|(rule, key)| {
                        let penalty = rule.penalty.map(|_| keys::penalty_key(&key));
                        std::iter::once(key).chain(penalty)
                    })
                    .collect();
                self.store.delete_keys(&keys).await
            }
            ResetTarget::Rule(rule) => self.store.delete_counters(Some(rule)).await,
            ResetTarget::All => self.store.delete_counters(None).await,
        }
    }
}

/// Which counters to reset.
#[derive(Debug, Clone, Copy)]
pub enum ResetTarget<'a> {
    Client {
        client: &'a ClientId,
        tier: Option<&'a str>,
        rule: Option<&'a str>,
    },
    Rule(&'a str),
    All,
}

/// The rules (as they count a client of `tier`) that have a counter for `client`, each with
/// the key of that counter. `shared` counters (a `global` or `tier` rule's, which the client
/// shares with others) are left out unless asked for: resetting one client must not reset
/// everybody's. An API key the configuration knows stands for its user and tier, as on the
/// check path. Route-scoped rules count a route, not a client, and are left out.
fn counters_of<'s>(
    snapshot: &'s Snapshot,
    client: &ClientId,
    tier: Option<&str>,
    only: Option<&str>,
    shared: bool,
) -> Vec<(&'s Rule, String)> {
    let mut check = Check::new(client.clone(), "", "", "", 0);
    let value = Some(client.value.clone());
    if client.is(ClientKind::Ip) {
        check.ip.clone_from(&value);
    } else if client.is(ClientKind::User) {
        check.user.clone_from(&value);
    } else if client.is(ClientKind::ApiKey) {
        check.api_key.clone_from(&value);
    }
    check.tier = tier.map(str::to_owned);
    let check = resolve_api_key(snapshot, &check).into_owned();
    let tier = check.tier.as_deref();
    snapshot
        .rules
        .rules()
        .iter()
        .filter(|rule| only.is_none_or(|name| rule.name == name))
        .filter(|rule| match rule.scope {
            Scope::Route => false,
            Scope::Global | Scope::Tier => shared,
            _ => true,
        })
        .filter_map(|rule| {
            let rule = snapshot.rule_for_tier(&rule.name, tier)?;
            let identity = keys::counted_identity(rule.scope, &check)?;
            Some((
                rule,
                keys::limit_key(rule.strategy, &rule.name, identity.as_ref()),
            ))
        })
        .collect()
}

fn new_lease_id() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}

fn lease_token(key: &str, lease_id: &str, cost: u64) -> String {
    format!("{key}|{lease_id}|{cost}")
}

fn parse_lease_token(token: &str) -> Option<(&str, &str, u64)> {
    let mut parts = token.rsplitn(3, '|');
    let count: u64 = parts.next()?.parse().ok()?;
    let lease_id = parts.next()?;
    let key = parts.next()?;
    let id_ok = lease_id.len() == 32 && lease_id.bytes().all(|b| b.is_ascii_hexdigit());
    (id_ok && (1..=1_000_000).contains(&count) && keys::is_limit_key(Strategy::Concurrency, key))
        .then_some((key, lease_id, count))
}

/// Whether `check` carries an API key the configuration does not know.
fn unknown_api_key(snapshot: &Snapshot, check: &Check) -> bool {
    check
        .api_key
        .as_ref()
        .is_some_and(|key| !snapshot.api_keys.contains_key(key))
}

/// What happens to API keys the configuration does not know (`protection.unknown_api_keys`,
/// counted by address when not said).
fn unknown_keys_policy(snapshot: &Snapshot) -> UnknownApiKeys {
    snapshot
        .document
        .protection
        .as_ref()
        .map(|p| p.unknown_api_keys)
        .unwrap_or_default()
}

/// The check as the rules see it: an API key the controller knows stands for its user
/// (who then is the client) and tier; a JWT's own user and tier win over the key's. An
/// unknown key is, by default, no identity: the client is counted by its address.
fn resolve_api_key<'c>(snapshot: &Snapshot, check: &'c Check) -> Cow<'c, Check> {
    let Some(key) = check.api_key.as_ref() else {
        return Cow::Borrowed(check);
    };
    let Some(grant) = snapshot.api_keys.get(key) else {
        if unknown_keys_policy(snapshot) != UnknownApiKeys::ByAddress {
            return Cow::Borrowed(check);
        }
        let mut by_address = check.clone();
        by_address.api_key = None;
        if by_address.client.is(ClientKind::ApiKey) {
            by_address.client = ClientId::ip(
                by_address
                    .ip
                    .clone()
                    .unwrap_or_else(|| "unknown".to_owned()),
            );
        }
        return Cow::Owned(by_address);
    };
    let mut resolved = check.clone();
    if resolved.user.is_none() {
        resolved.user.clone_from(&grant.user);
    }
    if resolved.tier.is_none() {
        resolved.tier.clone_from(&grant.tier);
    }
    if let (true, Some(user)) = (resolved.client.is(ClientKind::ApiKey), &resolved.user) {
        resolved.client = ClientId::new(ClientKind::User, user.clone());
    }
    Cow::Owned(resolved)
}

/// What a check needs: a decision already (no rule, or one that can never admit it),
/// or the store's answer for these limits.
fn plan<'r>(snapshot: &'r Snapshot, check: &'r Check) -> Plan<'r> {
    let counted: Vec<(&Rule, Option<ClientId>)> = snapshot
        .rules_for(check)
        .filter_map(|rule| Some((rule, keys::counted_identity(rule.scope, check)?)))
        .collect();
    if counted.is_empty() {
        return Plan::Decided(Decision::unlimited());
    }
    let spec = |rule: &Rule, identity: &Option<ClientId>| {
        // A usage rule takes its reservation now; the response settles the rest.
        let cost = match &rule.usage {
            Some(usage) => usage.reservation(
                &check.request_figures,
                rule.usage_max().unwrap_or(MAX_USAGE),
            ),
            None => rule.cost.unwrap_or(check.cost),
        };
        LimitSpec {
            key: keys::limit_key(rule.strategy, &rule.name, identity.as_ref()),
            params: Params::of(rule),
            // A concurrency rule in shadow reports the slots in use but takes none: a
            // slot it took would have to be given back by a request that was refused.
            cost: if rule.shadow && rule.strategy == Strategy::Concurrency {
                0
            } else {
                cost
            },
        }
    };
    let (enforced, shadow): (Vec<_>, Vec<_>) =
        counted.into_iter().partition(|(rule, _)| !rule.shadow);
    let enforced_rules: Vec<&Rule> = enforced.iter().map(|(rule, _)| *rule).collect();
    let enforced_specs: Vec<LimitSpec> = enforced
        .iter()
        .map(|(rule, identity)| spec(rule, identity))
        .collect();
    let costs: Vec<u64> = enforced_specs.iter().map(|spec| spec.cost).collect();
    if let Some(denial) = never_admitted(&enforced_rules, &costs) {
        return Plan::Decided(denial);
    }
    let takes_slots = enforced_rules
        .iter()
        .any(|rule| rule.strategy == Strategy::Concurrency);
    let lease_id = if takes_slots {
        new_lease_id()
    } else {
        String::new()
    };
    Plan::Ask(Asked {
        enforced: enforced_rules,
        enforced_specs,
        shadow: shadow
            .iter()
            .map(|(rule, identity)| (*rule, vec![spec(rule, identity)]))
            .collect(),
        lease_id,
    })
}

/// How long a lease for this decision may last, if it may have one: admitted by enforced
/// rules that are all leased and no shadow rule (counted request by request). A fixed
/// window's lease lasts to the window's end (it was counted in that window, so an earlier
/// end would lose its rest), a bucket's its `ttl`; with several rules, the first end.
fn lease_ttl(asked: &Asked<'_>, decision: &Decision) -> Option<u64> {
    if !decision.allowed
        || decision.shadow_denied
        || decision.refused.is_some()
        || !asked.shadow.is_empty()
        || asked.enforced.is_empty()
    {
        return None;
    }
    let mut ttl = u64::MAX;
    for rule in &asked.enforced {
        let leased = rule.leased?;
        let ends = if rule.strategy == Strategy::FixedWindow {
            decision
                .policies()
                .find(|status| status.rule == rule.name)
                .map_or(0, |status| status.reset_ms)
        } else {
            leased.ttl_ms()
        };
        ttl = ttl.min(ends);
    }
    (ttl > 0).then_some(ttl)
}

/// What all leases on one key of `rule` may hold at once: `share_percent` % of its quota.
fn lease_quota(rule: &Rule) -> u64 {
    let share = rule
        .leased
        .map_or(0, |leased| u128::from(leased.share_percent));
    u64::try_from(u128::from(rule.quota()) * share / 100).unwrap_or(u64::MAX)
}

/// The kind of request a lease is for: what the filter keys its leases by (the check's
/// decision fingerprint), without the configuration version, so that a worker's next lease
/// of a kind replaces its reservation across a change (its old leases are dropped).
fn lease_kind(check: &Check) -> u64 {
    check.decision_fingerprint(0)
}

/// The requests a lease for this decision holds: for each limit, what was `reserved` for
/// it and what it has left, in requests of this check's cost; the smallest of them.
fn lease_units(asked: &Asked<'_>, decision: &Decision, reserved: &[u64]) -> u64 {
    let mut units = u64::MAX;
    for ((rule, spec), reserved) in asked
        .enforced
        .iter()
        .zip(&asked.enforced_specs)
        .zip(reserved)
    {
        let cost = spec.cost.max(1);
        let remaining = decision
            .policies()
            .find(|status| status.rule == rule.name)
            .map_or(0, |status| status.remaining);
        units = units.min(reserved / cost).min(remaining / cost);
    }
    if units == u64::MAX {
        0
    } else {
        units
    }
}

/// A denial that needs no store: a rule with limit 0, or a cost above what a rule can
/// ever hold. Such a request consumes from no rule.
fn never_admitted(rules: &[&Rule], costs: &[u64]) -> Option<Decision> {
    rules.iter().zip(costs).find_map(|(rule, &cost)| {
        let reason = if rule.limit == 0 && cost > 0 {
            DenyReason::LimitZero
        } else if cost > rule.capacity() {
            DenyReason::CostExceedsCapacity
        } else {
            return None;
        };
        let period = Params::of(rule).period_ms;
        let verdict = Verdict {
            ok: false,
            remaining: 0,
            reset_ms: 0,
            retry_after_ms: period,
            ..Verdict::default()
        };
        let mut decision = Decision {
            allowed: false,
            policy: Some(policy(rule, &verdict)),
            ..Decision::unlimited()
        };
        if let Some(policy) = &mut decision.policy {
            policy.reason = Some(reason);
        }
        Some(decision)
    })
}

fn policy(rule: &Rule, verdict: &Verdict) -> PolicyStatus {
    PolicyStatus {
        rule: rule.name.clone(),
        strategy: rule.strategy,
        limit: rule.quota(),
        remaining: verdict.remaining,
        reset_ms: verdict.reset_ms,
        retry_after_ms: if verdict.ok {
            0
        } else {
            verdict.retry_after_ms
        },
        window_ms: Params::of(rule).period_ms,
        delay_ms: verdict.delay_ms,
        reason: verdict.cooling.then_some(DenyReason::CoolDown),
        usage: rule.usage.is_some(),
    }
}

/// The decision for the store's outcomes of a check: the enforced limit that denied speaks
/// for it; when none did, a shadow limit that would have denied (`shadow_denied`); else the
/// limit with the fewest requests left. The delay is the longest an enforced limit asks for;
/// an admitted request holds the concurrency slots its enforced limits gave it.
fn decide(asked: &Asked<'_>, enforced: &Outcome, shadow: &[Outcome]) -> Decision {
    let enforced_statuses = asked
        .enforced
        .iter()
        .zip(&enforced.verdicts)
        .map(|(rule, verdict)| policy(rule, verdict));
    let shadow_statuses = asked
        .shadow
        .iter()
        .zip(shadow)
        .filter_map(|((rule, _), outcome)| Some(policy(rule, outcome.verdicts.first()?)));
    let mut statuses: Vec<PolicyStatus> = enforced_statuses.chain(shadow_statuses).collect();
    let shadow_denier = shadow
        .iter()
        .position(|outcome| !outcome.allowed())
        .map(|i| asked.enforced.len() + i);
    let speaking = enforced
        .denied_by
        .or(shadow_denier)
        .or_else(|| {
            (0..statuses.len()).min_by_key(|&i| statuses.get(i).map_or(u64::MAX, |s| s.remaining))
        })
        .unwrap_or(0);
    let allowed = enforced.allowed();
    let leases = if allowed {
        asked
            .enforced
            .iter()
            .zip(&asked.enforced_specs)
            .filter(|(rule, spec)| rule.strategy == Strategy::Concurrency && spec.cost > 0)
            .map(|(_, spec)| lease_token(&spec.key, &asked.lease_id, spec.cost))
            .collect()
    } else {
        Vec::new()
    };
    let delay_ms = if allowed {
        enforced
            .verdicts
            .iter()
            .map(|v| v.delay_ms)
            .max()
            .unwrap_or(0)
    } else {
        0
    };
    let mut speaking_policy = (speaking < statuses.len()).then(|| statuses.remove(speaking));
    if let Some(policy) = &mut speaking_policy {
        policy.delay_ms = delay_ms;
    }
    Decision {
        allowed,
        policy: speaking_policy,
        others: statuses,
        shadow_denied: allowed && enforced.denied_by.is_none() && shadow_denier.is_some(),
        leases,
        refused: None,
        grant: None,
        usage: Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lease_tokens_round_trip_and_foreign_ones_are_refused() {
        let key = keys::limit_key(Strategy::Concurrency, "slots", None);
        let id = new_lease_id();
        let token = lease_token(&key, &id, 2);
        assert_eq!(
            parse_lease_token(&token),
            Some((key.as_str(), id.as_str(), 2))
        );
        let other = keys::limit_key(Strategy::FixedWindow, "slots", None);
        for bad in [
            lease_token(&other, &id, 1),
            lease_token(&key, "not-hex", 1),
            lease_token(&key, &id, 0),
            format!("{key}|{id}"),
            "sluice:{x}:concurrency:a:b|0123|1".to_owned(),
            String::new(),
        ] {
            assert_eq!(parse_lease_token(&bad), None, "{bad}");
        }
    }
}
