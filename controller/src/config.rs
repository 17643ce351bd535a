//! The controller's rules file (TOML), read once at start.
//!
//! ```toml
//! [[rules]]
//! name = "per-client"
//! limit = 100
//! window = "1m"
//! match = { path_prefix = "/api/" }
//! ```

use std::path::Path;

use serde::Deserialize;
use sluice_protocol::{Rule, RuleSet};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RulesFile {
    #[serde(default)]
    rules: Vec<Rule>,
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

pub fn load_rules(path: &Path) -> Result<RuleSet, ConfigError> {
    let shown = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: shown.clone(),
        source,
    })?;
    parse_rules(&text).map_err(|message| ConfigError::Invalid {
        path: shown,
        message,
    })
}

pub fn parse_rules(text: &str) -> Result<RuleSet, String> {
    let deserializer = toml::Deserializer::parse(text).map_err(|e| e.to_string())?;
    let file: RulesFile = serde_path_to_error::deserialize(deserializer)
        .map_err(|e| format!("{}: {}", e.path(), e.inner().message()))?;
    RuleSet::new(file.rules).map_err(|e| e.to_string())
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

    /// One bad file per error, each with the field the operator is told about.
    #[test]
    fn bad_files_name_the_field() {
        let cases = [
            (
                "[[rules]]\nname = \"a\"\nlimit = 1\nwindow = \"1x\"",
                "rules[0].window",
            ),
            (
                "[[rules]]\nname = \"a\"\nlimit = -1\nwindow = \"1s\"",
                "rules[0].limit",
            ),
            ("[[rules]]\nname = \"a\"\nlimit = 1", "rules[0]"),
            (
                "[[rules]]\nname = \"a\"\nlimit = 1\nwindow = \"1s\"\nstrategy = \"magic\"",
                "rules[0].strategy",
            ),
            (
                "[[rules]]\nname = \"a b\"\nlimit = 1\nwindow = \"1s\"",
                "rules[0].name",
            ),
            ("[[rule]]\nname = \"a\"", "rule"),
        ];
        for (text, field) in cases {
            let message = parse_rules(text).unwrap_err();
            assert!(
                message.starts_with(field),
                "expected {field}, got: {message}"
            );
        }
    }
}
