//! The controller's rules file (TOML), read once at start.
//!
//! ```toml
//! [[rules]]
//! name = "per-client"
//! limit = 100
//! window = "1m"
//! match = { path_prefix = "/api/" }
//!
//! [[api_keys]]
//! sha256 = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
//! user = "acme"
//! tier = "gold"
//! ```

use std::collections::HashMap;
use std::path::Path;

use serde::Deserialize;
use sluice_protocol::{Rule, RuleSet};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RulesFile {
    #[serde(default)]
    rules: Vec<Rule>,
    #[serde(default)]
    api_keys: Vec<ApiKeyEntry>,
}

/// An API key the controller knows, by the SHA-256 of the key (the filter never sends the
/// key itself, and the file need not hold it either).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ApiKeyEntry {
    sha256: String,
    #[serde(default)]
    user: Option<String>,
    #[serde(default)]
    tier: Option<String>,
}

/// Whom an API key stands for.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KeyGrant {
    pub user: Option<String>,
    pub tier: Option<String>,
}

/// Known API keys by the hex SHA-256 of the key.
pub type ApiKeys = HashMap<String, KeyGrant>;

/// Everything the rules file says.
#[derive(Debug, Clone, Default)]
pub struct Policy {
    pub rules: RuleSet,
    pub api_keys: ApiKeys,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Invalid { path: String, message: String },
}

pub fn load(path: &Path) -> Result<Policy, ConfigError> {
    let shown = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: shown.clone(),
        source,
    })?;
    parse(&text).map_err(|message| ConfigError::Invalid {
        path: shown,
        message,
    })
}

pub fn parse(text: &str) -> Result<Policy, String> {
    let deserializer = toml::Deserializer::parse(text).map_err(|e| e.to_string())?;
    let file: RulesFile = serde_path_to_error::deserialize(deserializer)
        .map_err(|e| format!("{}: {}", e.path(), e.inner().message()))?;
    let rules = RuleSet::new(file.rules).map_err(|e| e.to_string())?;
    let mut api_keys = ApiKeys::new();
    for (index, entry) in file.api_keys.into_iter().enumerate() {
        let digest = entry.sha256.to_ascii_lowercase();
        if digest.len() != 64 || !digest.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(format!(
                "api_keys[{index}].sha256: must be the 64 hex digits of the key's SHA-256"
            ));
        }
        let grant = KeyGrant {
            user: entry.user,
            tier: entry.tier,
        };
        if api_keys.insert(digest, grant).is_some() {
            return Err(format!(
                "api_keys[{index}].sha256: the same key is listed twice"
            ));
        }
    }
    Ok(Policy { rules, api_keys })
}

/// Just the rules of a rules file.
pub fn parse_rules(text: &str) -> Result<RuleSet, String> {
    parse(text).map(|policy| policy.rules)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_rules_with_match_tables() {
        let rules = parse_rules(
            r#"
            [[rules]]
            name = "per-client"
            limit = 100
            window = "1m"

            [[rules]]
            name = "login"
            scope = "global"
            limit = 5
            window = "1s"
            match = { path_prefix = "/login", methods = ["POST"] }
            "#,
        )
        .unwrap();
        assert_eq!(rules.rules().len(), 2);
        assert_eq!(rules.rules()[1].matcher.methods, ["POST"]);
    }

    #[test]
    fn api_keys_are_known_by_their_digest() {
        let digest = "9F86D081884C7D659A2FEAA0C55AD015A3BF4F1B2B0B822CD15D6C15B0F00A08";
        let policy = parse(&format!(
            "[[api_keys]]\nsha256 = \"{digest}\"\nuser = \"acme\"\ntier = \"gold\""
        ))
        .unwrap();
        let grant = &policy.api_keys[&digest.to_ascii_lowercase()];
        assert_eq!(grant.user.as_deref(), Some("acme"));
        assert_eq!(grant.tier.as_deref(), Some("gold"));
    }

    /// One bad file per error, each with the field the operator is told about and the exact
    /// message after it (`field: message`, as the controller prints it when it refuses to
    /// start).
    #[test]
    fn bad_files_name_the_field() {
        let rule = "[[rules]]\nname = \"a\"\nlimit = 1\nwindow = \"1s\"\n";
        let key = "[[api_keys]]\nsha256 = \"9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08\"\n";
        let cases = [
            (
                "[[rules]]\nname = \"a\"\nlimit = 1\nwindow = \"1x\"".to_owned(),
                "rules[0].window",
                "`1x` has no known unit (ms, s, m, h or d)",
            ),
            (
                "[[rules]]\nname = \"a\"\nlimit = -1\nwindow = \"1s\"".to_owned(),
                "rules[0].limit",
                "invalid value: integer `-1`, expected u64",
            ),
            (
                "[[rules]]\nname = \"a\"\nlimit = 1".to_owned(),
                "rules[0].window",
                "is required by fixed_window",
            ),
            (
                format!("{rule}strategy = \"magic\""),
                "rules[0].strategy",
                "unknown variant `magic`, expected one of `fixed_window`, `sliding_window_log`, \
                 `sliding_window_counter`, `token_bucket`, `gcra`, `leaky_bucket`, `concurrency`",
            ),
            (
                "[[rules]]\nname = \"a b\"\nlimit = 1\nwindow = \"1s\"".to_owned(),
                "rules[0].name",
                "`a b` must be 1 to 64 characters of A-Z, a-z, 0-9, `-` or `_`",
            ),
            (
                format!("{rule}[[rules]]\nname = \"b\"\nlimit = 1\nwindow = \"1s\"\nburst = 2"),
                "rules[1].burst",
                "applies to token_bucket and gcra only, not to fixed_window",
            ),
            (
                format!("{rule}{rule}"),
                "rules[1].name",
                "`a` is used by an earlier rule",
            ),
            (
                "[[rule]]\nname = \"a\"".to_owned(),
                "rule",
                "unknown field `rule`, expected `rules` or `api_keys`",
            ),
            (
                "[[api_keys]]\nsha256 = \"abc\"".to_owned(),
                "api_keys[0].sha256",
                "must be the 64 hex digits of the key's SHA-256",
            ),
            (
                format!("{key}{key}"),
                "api_keys[1].sha256",
                "the same key is listed twice",
            ),
        ];
        for (text, field, message) in cases {
            let error = parse_rules(&text).unwrap_err();
            let (named, told) = error
                .split_once(": ")
                .unwrap_or_else(|| panic!("no `field: message` in {error:?}"));
            assert_eq!((named, told), (field, message), "for the file:\n{text}");
        }
    }
}
