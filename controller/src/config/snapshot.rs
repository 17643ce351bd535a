//! One version of the configuration, validated and compiled for the check path, and never
//! changed: a change builds the next snapshot and swaps it in whole ([`super::LiveConfig`]),
//! so a check reads one version from start to end.

use std::collections::HashMap;

use sluice_protocol::admin::{Operations, SystemState};
use sluice_protocol::config::{ConfigDocument, FilterView, ListEntry, ListItem, Reported};
use sluice_protocol::rule_index::RuleIndex;
use sluice_protocol::rules::DEFAULT_TIER;
use sluice_protocol::{Check, Rule, RuleSet};

use super::validate::{self, FieldError};

/// Whom an API key stands for.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KeyGrant {
    pub user: Option<String>,
    pub tier: Option<String>,
}

#[derive(Debug)]
pub struct Snapshot {
    pub version: u64,
    /// The system state and the emergency switch.
    pub operations: Operations,
    /// The document as stored: what the admin API reads and exports.
    pub document: ConfigDocument,
    /// The document's rules, validated.
    pub rules: RuleSet,
    /// The rules as checks apply them now: each in shadow while enforcement is off.
    effective: Vec<Rule>,
    /// The effective rules by host and path literal: a check is matched against the few
    /// that could apply to it, however many rules there are.
    index: RuleIndex,
    /// For each rule (in order), its form for each tier (with the tier's limits of the
    /// current state) when it counts by tier.
    by_tier: Vec<HashMap<String, Rule>>,
    /// Known API keys by the hex SHA-256 of the key.
    pub api_keys: HashMap<String, KeyGrant>,
    /// `GET /v1/config`'s body, built once per version.
    pub filter_view: Vec<u8>,
    /// The body for a filter that names no release (0.1.0, which refuses a rule with a
    /// field it does not know): the rules without `usage`. Its checks do not settle, so
    /// each of its requests is charged its reservation. `None` while no rule counts usage.
    pub legacy_filter_view: Option<Vec<u8>>,
    /// Whether any rule in force is leased: only then are leases considered.
    pub leases: bool,
}

impl Snapshot {
    /// Validates and compiles `document` as `version`, for the state and switch of
    /// `operations`.
    pub fn build(
        version: u64,
        document: ConfigDocument,
        operations: Operations,
    ) -> Result<Snapshot, FieldError> {
        let validated = validate::validate(&document)?;
        let degraded = operations.state == SystemState::Degraded;
        let effective: Vec<Rule> = document
            .rules
            .iter()
            .map(|rule| Rule {
                shadow: rule.shadow || !operations.enforces(&rule.name),
                ..rule.clone()
            })
            .collect();
        let by_tier = effective
            .iter()
            .map(|rule| {
                if !rule.tier_limits {
                    return HashMap::new();
                }
                document
                    .tiers
                    .iter()
                    .map(|tier| {
                        let limits = tier.limits(degraded);
                        (tier.name.clone(), rule.with_tier_limits(&limits))
                    })
                    .collect()
            })
            .collect();
        let api_keys = document
            .api_keys
            .iter()
            .map(|key| {
                let grant = KeyGrant {
                    user: key.user.clone(),
                    tier: key.tier.clone(),
                };
                (key.sha256.clone(), grant)
            })
            .collect();
        let view = FilterView {
            version,
            rules: effective.clone(),
            safelist: list_items(&document.safelist),
            denylist: list_items(&document.denylist),
            report: Reported {
                upstream_status: document.automatic_state.is_some(),
                invalid_tokens: document.protection.is_some(),
                // Cheap (a tally per cached denial, one report a second) and what keeps the
                // stats and alerts whole: a client refused from the cache is the one the
                // stats most want to see.
                cached_denials: true,
            },
            enforce: operations.enforce,
            limited_log_sample: document.limited_log_sample(),
        };
        let filter_view = serde_json::to_vec(&view).unwrap_or_default();
        let legacy_filter_view = view.rules.iter().any(|rule| rule.usage.is_some()).then(|| {
            let mut legacy = view.clone();
            for rule in &mut legacy.rules {
                rule.usage = None;
            }
            serde_json::to_vec(&legacy).unwrap_or_default()
        });
        let leases = effective
            .iter()
            .any(|rule| rule.leased.is_some() && !rule.shadow);
        Ok(Snapshot {
            leases,
            version,
            operations,
            document,
            rules: validated.rules,
            index: RuleIndex::new(effective.iter().map(|rule| &rule.matcher)),
            effective,
            by_tier,
            api_keys,
            filter_view,
            legacy_filter_view,
        })
    }

    /// The empty configuration (no rule applies), as version 0.
    pub fn empty() -> Snapshot {
        Snapshot {
            version: 0,
            operations: Operations::default(),
            document: ConfigDocument::default(),
            rules: RuleSet::default(),
            effective: Vec::new(),
            index: RuleIndex::default(),
            by_tier: Vec::new(),
            api_keys: HashMap::new(),
            filter_view: serde_json::to_vec(&FilterView::default()).unwrap_or_default(),
            legacy_filter_view: None,
            leases: false,
        }
    }

    /// Every rule that applies to `check`, in configuration order, each as it counts the
    /// check's client (with the limits of its tier, for a rule that counts by tier).
    pub fn rules_for<'a>(&'a self, check: &'a Check) -> impl Iterator<Item = &'a Rule> + 'a {
        let tier = check.tier.as_deref().unwrap_or(DEFAULT_TIER);
        self.index
            .candidates(check)
            .into_iter()
            .filter_map(move |position| {
                let position = position as usize;
                let rule = self.effective.get(position)?;
                if !rule.applies_to(check) {
                    return None;
                }
                let by_tier = self.by_tier.get(position)?;
                Some(by_tier.get(tier).unwrap_or(rule))
            })
    }

    /// A rule by name, as it counts a client of `tier`.
    pub fn rule_for_tier(&self, name: &str, tier: Option<&str>) -> Option<&Rule> {
        let index = self.effective.iter().position(|r| r.name == name)?;
        let rule = self.effective.get(index)?;
        let tier = tier.unwrap_or(DEFAULT_TIER);
        Some(
            self.by_tier
                .get(index)
                .and_then(|by_tier| by_tier.get(tier))
                .unwrap_or(rule),
        )
    }
}

fn list_items(entries: &[ListEntry]) -> Vec<ListItem> {
    entries
        .iter()
        .map(|entry| ListItem {
            kind: entry.kind,
            value: entry.value.clone(),
            expires_at_ms: entry
                .expires_at
                .as_deref()
                .and_then(|t| validate::rfc3339_ms("expires_at", t).ok()),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_protocol::ClientId;

    fn document(toml_text: &str) -> ConfigDocument {
        toml::from_str(toml_text).unwrap()
    }

    #[test]
    fn a_rule_that_counts_by_tier_takes_each_tiers_limits() {
        let snapshot = Snapshot::build(
            3,
            document(
                r#"
                [[tiers]]
                name = "pro"
                limit = 100
                burst = 150

                [[rules]]
                name = "per-client"
                strategy = "token_bucket"
                limit = 10
                window = "1m"
                burst = 20
                tier_limits = true
                "#,
            ),
            Operations::default(),
        )
        .unwrap();
        let mut check = Check::new(ClientId::ip("10.0.0.1"), "", "GET", "/", 1);
        let limits = |check: &Check| {
            let rule = snapshot.rules_for(check).next().unwrap();
            (rule.limit, rule.window_ms(), rule.burst())
        };
        assert_eq!(limits(&check), (10, 60_000, 20), "no tier: the rule's own");
        check.tier = Some("pro".into());
        assert_eq!(
            limits(&check),
            (100, 60_000, 150),
            "the tier's, the rule's window"
        );
        check.tier = Some("unknown".into());
        assert_eq!(limits(&check), (10, 60_000, 20));
        let view: FilterView = serde_json::from_slice(&snapshot.filter_view).unwrap();
        assert_eq!(view.version, 3);
        assert_eq!(view.rules.len(), 1);
    }

    #[test]
    fn a_filter_that_names_no_release_reads_the_rules_without_usage() {
        let rules =
            |toml_text: &str| Snapshot::build(1, document(toml_text), Operations::default());
        let plain = rules(
            r#"
            [[rules]]
            name = "per-client"
            limit = 10
            window = "1m"
            "#,
        )
        .unwrap();
        assert_eq!(plain.legacy_filter_view, None, "nothing to hide");
        let with_usage = rules(
            r#"
            [[rules]]
            name = "per-client"
            limit = 10
            window = "1m"

            [[rules]]
            name = "tokens"
            limit = 10000
            window = "1m"
            usage = { json_pointer = "/usage/total_tokens", reserve = 100 }
            "#,
        )
        .unwrap();
        let view: FilterView = serde_json::from_slice(&with_usage.filter_view).unwrap();
        assert!(view.rules[1].usage.is_some());
        let legacy: FilterView =
            serde_json::from_slice(with_usage.legacy_filter_view.as_deref().unwrap()).unwrap();
        assert_eq!(legacy.rules.len(), 2);
        assert!(legacy.rules.iter().all(|rule| rule.usage.is_none()));
        assert_eq!(
            FilterView {
                rules: view
                    .rules
                    .into_iter()
                    .map(|rule| Rule {
                        usage: None,
                        ..rule
                    })
                    .collect(),
                ..view
            },
            legacy,
            "nothing else differs"
        );
    }
}
