//! Answers check calls: finds the rules that apply to each check, asks the store, and says
//! which limit speaks for the decision.

use std::sync::Arc;

use sluice_protocol::{
    Check, CheckRequest, CheckResponse, Decision, DenyReason, PolicyStatus, Rule, RuleSet, Strategy,
};

use crate::keys;
use crate::store::{CheckSpec, LimitSpec, Outcome, Store, StoreError};
use crate::strategy::{Params, Verdict};

pub struct Limiter {
    rules: RuleSet,
    store: Arc<dyn Store>,
}

enum Plan<'r> {
    Decided(Decision),
    Ask {
        rules: Vec<&'r Rule>,
        specs: Vec<LimitSpec>,
        lease_id: String,
    },
}

/// A lease token the filter sent back that this controller did not hand out.
#[derive(Debug, thiserror::Error)]
#[error("leases[{index}]: not a lease of this controller")]
pub struct BadLease {
    pub index: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum ReleaseError {
    #[error(transparent)]
    BadLease(#[from] BadLease),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl Limiter {
    pub fn new(rules: RuleSet, store: Arc<dyn Store>) -> Self {
        Limiter { rules, store }
    }

    pub fn store(&self) -> &dyn Store {
        self.store.as_ref()
    }

    pub fn rules(&self) -> &RuleSet {
        &self.rules
    }

    /// Decides every check of a call, in order, with one store call for the whole batch:
    /// a later check for the same counter sees the earlier one's effect, exactly as if they
    /// had arrived one by one.
    pub async fn check(&self, request: &CheckRequest) -> Result<CheckResponse, StoreError> {
        let plans: Vec<Plan<'_>> = request
            .checks
            .iter()
            .map(|check| self.plan(check))
            .collect();
        let batch: Vec<CheckSpec<'_>> = plans
            .iter()
            .filter_map(|plan| match plan {
                Plan::Ask {
                    specs, lease_id, ..
                } => Some(CheckSpec {
                    limits: specs,
                    lease_id,
                }),
                Plan::Decided(_) => None,
            })
            .collect();
        let outcomes = if batch.is_empty() {
            Vec::new()
        } else {
            self.store.check_batch(&batch).await?
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
        let decisions = plans
            .into_iter()
            .map(|plan| match plan {
                Plan::Decided(decision) => decision,
                Plan::Ask {
                    rules,
                    specs,
                    lease_id,
                } => {
                    // Counted above: one outcome per asking check, one verdict per limit.
                    let outcome = outcomes.next().unwrap_or(Outcome {
                        denied_by: None,
                        verdicts: Vec::new(),
                    });
                    decide(&rules, &specs, &lease_id, &outcome)
                }
            })
            .collect();
        Ok(CheckResponse { decisions })
    }

    /// What a check needs: a decision already (no rule, or one that can never admit it),
    /// or the store's answer for these limits.
    fn plan<'r>(&'r self, check: &'r Check) -> Plan<'r> {
        let rules: Vec<&Rule> = self.rules.matching(check).collect();
        if rules.is_empty() {
            return Plan::Decided(Decision::unlimited());
        }
        let costs: Vec<u64> = rules
            .iter()
            .map(|rule| rule.cost.unwrap_or(check.cost))
            .collect();
        if let Some(denial) = never_admitted(&rules, &costs) {
            return Plan::Decided(denial);
        }
        let specs = rules
            .iter()
            .zip(&costs)
            .map(|(rule, &cost)| LimitSpec {
                key: keys::limit_key(
                    rule.strategy,
                    &rule.name,
                    keys::counted_identity(rule.scope, &check.client),
                ),
                params: Params::of(rule),
                cost,
            })
            .collect();
        let takes_slots = rules
            .iter()
            .any(|rule| rule.strategy == Strategy::Concurrency);
        let lease_id = if takes_slots {
            new_lease_id()
        } else {
            String::new()
        };
        Plan::Ask {
            rules,
            specs,
            lease_id,
        }
    }

    /// Gives back the slots named by lease tokens; returns how many were still held.
    pub async fn release(&self, tokens: &[String]) -> Result<u64, ReleaseError> {
        let leases = tokens
            .iter()
            .enumerate()
            .map(|(index, token)| parse_lease_token(token).ok_or(BadLease { index }))
            .collect::<Result<Vec<_>, _>>()?;
        let mut freed = 0;
        for (key, lease_id, count) in leases {
            freed += self.store.release(key, lease_id, count).await?;
        }
        Ok(freed)
    }
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

/// A denial that needs no store: a rule with limit 0, or a cost above what a rule can
/// ever hold. Such a request consumes from no rule.
fn never_admitted(rules: &[&Rule], costs: &[u64]) -> Option<Decision> {
    rules.iter().zip(costs).find_map(|(rule, &cost)| {
        let reason = if rule.limit == 0 && cost > 0 {
            DenyReason::LimitZero
        } else if rule.capacity().is_some_and(|capacity| cost > capacity) {
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
            delay_ms: 0,
        };
        let mut decision = Decision {
            allowed: false,
            policy: Some(policy(rule, &verdict)),
            leases: Vec::new(),
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
        reason: None,
    }
}

/// The decision for a store's outcome, with the leases of the concurrency slots it took.
fn decide(rules: &[&Rule], specs: &[LimitSpec], lease_id: &str, outcome: &Outcome) -> Decision {
    let mut decision = decision(rules, outcome);
    if decision.allowed {
        decision.leases = rules
            .iter()
            .zip(specs)
            .filter(|(rule, spec)| rule.strategy == Strategy::Concurrency && spec.cost > 0)
            .map(|(_, spec)| lease_token(&spec.key, lease_id, spec.cost))
            .collect();
    }
    decision
}

/// The decision for an outcome: the limit that denied speaks for it, or when all allowed,
/// the one with the fewest requests left. The delay is the longest any limit asks for.
fn decision(rules: &[&Rule], outcome: &Outcome) -> Decision {
    let speaking = outcome.denied_by.unwrap_or_else(|| {
        (0..rules.len())
            .min_by_key(|&i| outcome.verdicts[i].remaining)
            .unwrap_or(0)
    });
    let mut policy = policy(rules[speaking], &outcome.verdicts[speaking]);
    if outcome.allowed() {
        policy.delay_ms = outcome
            .verdicts
            .iter()
            .map(|v| v.delay_ms)
            .max()
            .unwrap_or(0);
    }
    Decision {
        allowed: outcome.allowed(),
        policy: Some(policy),
        leases: Vec::new(),
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
