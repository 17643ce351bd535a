//! Answers check calls: finds the rules that apply to each check, asks the store, and says
//! which limit speaks for the decision.

use std::sync::Arc;

use sluice_protocol::{
    Check, CheckRequest, CheckResponse, Decision, PolicyStatus, Rule, RuleSet, Strategy,
};

use crate::keys;
use crate::store::{LimitSpec, Outcome, Store, StoreError};

pub struct Limiter {
    rules: RuleSet,
    store: Arc<dyn Store>,
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

    /// Decides every check of a call, in order: a later check for the same counter sees the
    /// earlier one's effect, exactly as if they had arrived one by one.
    pub async fn check(&self, request: &CheckRequest) -> Result<CheckResponse, StoreError> {
        let mut decisions = Vec::with_capacity(request.checks.len());
        for check in &request.checks {
            decisions.push(self.decide(check).await?);
        }
        Ok(CheckResponse { decisions })
    }

    async fn decide(&self, check: &Check) -> Result<Decision, StoreError> {
        let rules: Vec<&Rule> = self.rules.matching(check).collect();
        if rules.is_empty() {
            return Ok(Decision::unlimited());
        }
        // Every rule is fixed-window for now; when strategies differ per rule, each group
        // goes to its own script and the results are merged here.
        let specs: Vec<LimitSpec> = rules
            .iter()
            .map(|rule| LimitSpec {
                key: keys::limit_key(
                    rule.strategy,
                    &rule.name,
                    keys::counted_identity(rule.scope, &check.client),
                ),
                limit: rule.limit,
                window_ms: rule.window.millis(),
            })
            .collect();
        let outcome = self.store.fixed_window(&specs, check.cost).await?;
        Ok(decision(&rules, &outcome))
    }
}

/// The decision for an outcome: the limit that denied speaks for it, or when all allowed,
/// the one with the fewest requests left.
fn decision(rules: &[&Rule], outcome: &Outcome) -> Decision {
    let remaining = |index: usize| {
        rules[index]
            .limit
            .saturating_sub(outcome.states[index].count)
    };
    let speaking = outcome
        .denied_by
        .unwrap_or_else(|| (0..rules.len()).min_by_key(|&i| remaining(i)).unwrap_or(0));
    let rule = rules[speaking];
    let state = outcome.states[speaking];
    debug_assert_eq!(rule.strategy, Strategy::FixedWindow);
    Decision {
        allowed: outcome.allowed(),
        policy: Some(PolicyStatus {
            rule: rule.name.clone(),
            strategy: rule.strategy,
            limit: rule.limit,
            remaining: remaining(speaking),
            reset_ms: state.reset_ms,
            retry_after_ms: if outcome.allowed() { 0 } else { state.reset_ms },
            window_ms: rule.window.millis(),
        }),
    }
}
