//! The rule schema: which requests a limit applies to, whom it counts, and how.
//!
//! Rules are validated once ([`RuleSet::new`]) and then only read. Errors name the field
//! (`rules[1].window`) so that an operator can find the mistake.

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::check::Check;
use crate::duration;

/// Rate-limiting algorithm of a rule. More strategies come with later work; the protocol
/// already carries which one answered.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Strategy {
    /// Counts requests in windows aligned to the epoch; the count starts afresh at each boundary.
    #[default]
    FixedWindow,
}

impl Strategy {
    pub fn as_str(self) -> &'static str {
        match self {
            Strategy::FixedWindow => "fixed_window",
        }
    }
}

/// Whom a rule counts separately.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Scope {
    /// One counter per client identity.
    #[default]
    Client,
    /// One counter shared by every client.
    Global,
}

/// Which requests a rule applies to. Every field that is set must match; an empty match
/// applies to every request.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleMatch {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_prefix: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub methods: Vec<String>,
}

impl RuleMatch {
    fn matches(&self, check: &Check) -> bool {
        self.host
            .as_deref()
            .is_none_or(|host| host.eq_ignore_ascii_case(&check.host))
            && self
                .path_prefix
                .as_deref()
                .is_none_or(|prefix| check.path.starts_with(prefix))
            && (self.methods.is_empty()
                || self
                    .methods
                    .iter()
                    .any(|m| m.eq_ignore_ascii_case(&check.method)))
    }
}

/// A window length, written `1s`, `10m`… in configuration and held as milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Window(u64);

impl Window {
    pub fn from_millis(ms: u64) -> Option<Self> {
        (ms > 0).then_some(Window(ms))
    }

    pub fn millis(self) -> u64 {
        self.0
    }
}

impl Serialize for Window {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&format!("{}ms", self.0))
    }
}

impl<'de> Deserialize<'de> for Window {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        duration::parse_millis(&text)
            .map(Window)
            .map_err(serde::de::Error::custom)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    pub name: String,
    #[serde(default)]
    pub strategy: Strategy,
    #[serde(default)]
    pub scope: Scope,
    /// Requests admitted per window; 0 blocks every matching request.
    pub limit: u64,
    pub window: Window,
    #[serde(default, rename = "match")]
    pub matcher: RuleMatch,
}

/// A validation failure, naming the field it is about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleError {
    pub field: String,
    pub message: String,
}

impl fmt::Display for RuleError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

impl std::error::Error for RuleError {}

/// Longest rule name; names end up in Redis keys and response headers.
pub const MAX_RULE_NAME: usize = 64;

/// A validated list of rules, in the order they were written.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RuleSet {
    rules: Vec<Rule>,
}

impl RuleSet {
    pub fn new(rules: Vec<Rule>) -> Result<Self, RuleError> {
        for (index, rule) in rules.iter().enumerate() {
            let field = |name: &str| format!("rules[{index}].{name}");
            let name_ok = !rule.name.is_empty()
                && rule.name.len() <= MAX_RULE_NAME
                && rule
                    .name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
            if !name_ok {
                return Err(RuleError {
                    field: field("name"),
                    message: format!(
                        "`{}` must be 1 to {MAX_RULE_NAME} characters of A-Z, a-z, 0-9, `-` or `_`",
                        rule.name
                    ),
                });
            }
            if rules[..index]
                .iter()
                .any(|earlier| earlier.name == rule.name)
            {
                return Err(RuleError {
                    field: field("name"),
                    message: format!("`{}` is used by an earlier rule", rule.name),
                });
            }
            if let Some(prefix) = &rule.matcher.path_prefix {
                if !prefix.starts_with('/') {
                    return Err(RuleError {
                        field: field("match.path_prefix"),
                        message: format!("`{prefix}` must start with `/`"),
                    });
                }
            }
        }
        Ok(RuleSet { rules })
    }

    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }

    /// Every rule that applies to the check, in configuration order.
    pub fn matching<'a>(&'a self, check: &'a Check) -> impl Iterator<Item = &'a Rule> + 'a {
        self.rules
            .iter()
            .filter(move |rule| rule.matcher.matches(check))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::check::ClientId;

    fn rule(name: &str, matcher: RuleMatch) -> Rule {
        Rule {
            name: name.to_owned(),
            strategy: Strategy::FixedWindow,
            scope: Scope::Client,
            limit: 10,
            window: Window(1_000),
            matcher,
        }
    }

    fn check(method: &str, path: &str) -> Check {
        Check {
            client: ClientId::ip("10.0.0.1"),
            host: "api.example.com".into(),
            method: method.into(),
            path: path.into(),
            cost: 1,
        }
    }

    #[test]
    fn rule_parses_from_json_with_defaults() {
        let json = r#"{"name":"per-ip","limit":5,"window":"1m"}"#;
        let rule: Rule = serde_json::from_str(json).unwrap();
        assert_eq!(rule.window.millis(), 60_000);
        assert_eq!(rule.strategy, Strategy::FixedWindow);
        assert_eq!(rule.scope, Scope::Client);
        assert_eq!(rule.matcher, RuleMatch::default());
    }

    #[test]
    fn bad_window_is_refused_with_reason() {
        let json = r#"{"name":"x","limit":5,"window":"5 minutes"}"#;
        let err = serde_json::from_str::<Rule>(json).unwrap_err().to_string();
        assert!(err.contains("no known unit"), "{err}");
    }

    #[test]
    fn matching_checks_every_set_field() {
        let rules = RuleSet::new(vec![
            rule("all", RuleMatch::default()),
            rule(
                "posts-to-api",
                RuleMatch {
                    path_prefix: Some("/api".into()),
                    methods: vec!["POST".into()],
                    host: None,
                },
            ),
            rule(
                "other-host",
                RuleMatch {
                    host: Some("admin.example.com".into()),
                    ..RuleMatch::default()
                },
            ),
        ])
        .unwrap();
        let names = |c: &Check| {
            rules
                .matching(c)
                .map(|r| r.name.clone())
                .collect::<Vec<_>>()
        };
        assert_eq!(names(&check("post", "/api/items")), ["all", "posts-to-api"]);
        assert_eq!(names(&check("GET", "/api/items")), ["all"]);
        assert_eq!(names(&check("POST", "/apx")), ["all"]);
    }

    #[test]
    fn invalid_rules_name_the_field() {
        let cases = [
            (
                vec![rule("bad name", RuleMatch::default())],
                "rules[0].name",
            ),
            (
                vec![
                    rule("a", RuleMatch::default()),
                    rule("a", RuleMatch::default()),
                ],
                "rules[1].name",
            ),
            (
                vec![rule(
                    "p",
                    RuleMatch {
                        path_prefix: Some("api".into()),
                        ..RuleMatch::default()
                    },
                )],
                "rules[0].match.path_prefix",
            ),
        ];
        for (rules, field) in cases {
            assert_eq!(RuleSet::new(rules).unwrap_err().field, field);
        }
    }
}
