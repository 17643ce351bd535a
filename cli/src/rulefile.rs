//! Rule files, as `sluice rules apply` takes them: one rule (its fields at the top), or a
//! list of rules as a configuration file holds them (`[[rules]]` in TOML, `rules:` in
//! YAML, `{"rules": [...]}` or `[...]` in JSON). Each rule is read and checked by the
//! controller's own parser and validation, so an error is the one the controller gives.

use std::path::Path;

use serde_json::{json, Value};
use sluice_controller::config::file::{self, Format};
use sluice_controller::config::validate;
use sluice_controller::config::FieldError;
use sluice_protocol::Rule;

use crate::args::FileFormat;
use crate::exit::Failure;

/// What a rule file holds.
#[derive(Debug, PartialEq)]
pub enum RuleFile {
    /// One rule, its fields at the top.
    One(Box<Rule>),
    /// A list of rules.
    Many(Vec<Rule>),
}

/// The sections of a whole configuration besides `rules`: a file with any of them is one
/// for `config import`.
const OTHER_SECTIONS: [&str; 7] = [
    "tiers",
    "api_keys",
    "safelist",
    "denylist",
    "automatic_state",
    "protection",
    "observability",
];

const SHAPES: &str = "a rule file holds one rule, its fields at the top (name = \"login\", \
    limit = 5, window = \"1m\"), or a list of rules ([[rules]] tables in TOML, `rules:` in \
    YAML, {\"rules\": [...]} or [...] in JSON); `sluice rules get NAME --format toml` writes \
    one, and examples/rules/ has more";

/// Reads the rule file at `path`: a usage error (2) when it cannot be read or its name does
/// not say its format, an invalid file (1) when it does not hold rules the controller takes.
pub fn read(path: &Path) -> Result<RuleFile, Failure> {
    let shown = path.display();
    let format = Format::of_path(path).ok_or_else(|| {
        Failure::usage(format!(
            "{shown}: a rule file ends in .toml, .yaml, .yml or .json"
        ))
    })?;
    let text = std::fs::read_to_string(path)
        .map_err(|e| Failure::usage(format!("cannot read {shown}: {e}")))?;
    parse(&text, format).map_err(|message| Failure::refused(format!("{shown}: {message}")))
}

/// The rules `text` holds, or what is wrong with it.
pub fn parse(text: &str, format: Format) -> Result<RuleFile, String> {
    let value: Value = match format {
        Format::Toml => toml::from_str::<toml::Table>(text)
            .map_err(|e| e.to_string().trim_end().to_owned())
            .and_then(|table| serde_json::to_value(table).map_err(|e| e.to_string()))?,
        Format::Yaml => serde_yaml_ng::from_str(text).map_err(|e| e.to_string())?,
        Format::Json => serde_json::from_str(text).map_err(|e| e.to_string())?,
    };
    let (rules, one) = match value {
        Value::Array(rules) => (rules, false),
        Value::Object(mut object) if object.contains_key("rules") => {
            let others: Vec<&str> = OTHER_SECTIONS
                .into_iter()
                .filter(|section| object.contains_key(*section))
                .collect();
            if !others.is_empty() {
                return Err(format!(
                    "it holds {} too: `sluice rules apply` applies rules only; a whole \
                     configuration goes in with `sluice config import` (check it first with \
                     `sluice config validate`)",
                    others.join(", ")
                ));
            }
            match object.remove("rules") {
                Some(Value::Array(rules)) if object.is_empty() => (rules, false),
                Some(Value::Array(_)) => {
                    let unknown: Vec<&String> = object.keys().collect();
                    return Err(format!(
                        "{}: not a section of a configuration ({SHAPES})",
                        unknown
                            .iter()
                            .map(|k| k.as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    ));
                }
                _ => return Err(format!("rules: must be a list ({SHAPES})")),
            }
        }
        Value::Object(object) if object.contains_key("name") || object.contains_key("limit") => {
            (vec![Value::Object(object)], true)
        }
        _ => return Err(format!("not a rule file: {SHAPES}")),
    };
    if rules.is_empty() {
        return Err(format!("no rules in it: {SHAPES}"));
    }
    let relative = |error: FieldError| -> String {
        if !one {
            return error.to_string();
        }
        let field = match error.field.strip_prefix("rules[0]") {
            Some(rest) => rest.trim_start_matches('.').to_owned(),
            None => error.field,
        };
        FieldError::new(field, error.message).to_string()
    };
    // The controller's own reading and validation, of a document that holds these rules.
    let mut document =
        file::parse(&json!({ "rules": rules }).to_string(), Format::Json).map_err(relative)?;
    validate::normalize(&mut document);
    validate::validate(&document).map_err(relative)?;
    let mut rules = document.rules;
    Ok(match (one, rules.pop()) {
        (true, Some(rule)) => RuleFile::One(Box::new(rule)),
        (_, Some(last)) => {
            rules.push(last);
            RuleFile::Many(rules)
        }
        (_, None) => return Err(format!("no rules in it: {SHAPES}")),
    })
}

/// A rule as a file `rules apply` takes back.
pub fn render(rule: &Rule, format: FileFormat) -> Result<String, Failure> {
    let text = match format {
        FileFormat::Toml => toml::to_string_pretty(rule).map_err(|e| e.to_string()),
        FileFormat::Yaml => serde_yaml_ng::to_string(rule).map_err(|e| e.to_string()),
        FileFormat::Json => serde_json::to_string_pretty(rule)
            .map(|text| text + "\n")
            .map_err(|e| e.to_string()),
    };
    text.map_err(Failure::refused)
}

/// A refusal of a list of rules applied as one configuration names `rules[k]` of the live
/// configuration: this names the rule as the file does (`rules[i]`, and its name).
pub fn name_in_file(failure: Failure, file: &Path, merged: &[String], rules: &[Rule]) -> Failure {
    let Some((status, rest)) = failure.message.split_once(": rules[") else {
        return failure;
    };
    let Some((index, rest)) = rest.split_once(']') else {
        return failure;
    };
    let Some(name) = index.parse::<usize>().ok().and_then(|k| merged.get(k)) else {
        return failure;
    };
    let message = match rules.iter().position(|rule| &rule.name == name) {
        Some(at) => format!(
            "{status}: {}: rules[{at}]{rest} (rule `{name}`)",
            file.display()
        ),
        None => format!("{status}: rules[{index}]{rest} (the live rule `{name}`)"),
    };
    Failure { message, ..failure }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(text: &str, format: Format) -> Rule {
        match parse(text, format) {
            Ok(RuleFile::One(rule)) => *rule,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn one_rule_in_each_format() {
        let toml = "name = \"login\"\nlimit = 5\nwindow = \"1m\"\nmatch = { path = \"/login\" }\n";
        let yaml = "name: login\nlimit: 5\nwindow: 1m\nmatch:\n  path: /login\n";
        let json = r#"{"name": "login", "limit": 5, "window": "1m", "match": {"path": "/login"}}"#;
        let rule = one(toml, Format::Toml);
        assert_eq!(rule.name, "login");
        assert_eq!(one(yaml, Format::Yaml), rule);
        assert_eq!(one(json, Format::Json), rule);
        for format in [FileFormat::Toml, FileFormat::Yaml, FileFormat::Json] {
            let text = render(&rule, format).unwrap();
            let read = match format {
                FileFormat::Toml => Format::Toml,
                FileFormat::Yaml => Format::Yaml,
                FileFormat::Json => Format::Json,
            };
            assert_eq!(one(&text, read), rule, "{text}");
        }
    }

    #[test]
    fn a_list_as_a_configuration_holds_it() {
        let toml = "[[rules]]\nname = \"a\"\nlimit = 1\nwindow = \"1s\"\n\n[[rules]]\nname = \"b\"\nlimit = 2\nwindow = \"1s\"\n";
        let json = r#"[{"name": "a", "limit": 1, "window": "1s"}, {"name": "b", "limit": 2, "window": "1s"}]"#;
        let yaml = "rules:\n  - name: a\n    limit: 1\n    window: 1s\n  - name: b\n    limit: 2\n    window: 1s\n";
        for (text, format) in [
            (toml, Format::Toml),
            (json, Format::Json),
            (yaml, Format::Yaml),
        ] {
            match parse(text, format) {
                Ok(RuleFile::Many(rules)) => {
                    let names: Vec<&str> = rules.iter().map(|r| r.name.as_str()).collect();
                    assert_eq!(names, ["a", "b"]);
                }
                other => panic!("{format:?}: {other:?}"),
            }
        }
    }

    #[test]
    fn errors_name_the_field_as_the_controller_does() {
        let error = parse("name = \"a\"\nlimit = 1\n", Format::Toml).unwrap_err();
        assert_eq!(error, "window: is required by fixed_window");
        let error = parse(
            "[[rules]]\nname = \"a\"\nlimit = 1\nwindow = \"1s\"\n[[rules]]\nname = \"b\"\nlimit = 1\nwindow = \"1 fortnight\"\n",
            Format::Toml,
        )
        .unwrap_err();
        assert!(error.starts_with("rules[1].window: "), "{error}");
        let error = parse(
            "name = \"a\"\nlimit = 1\nwindow = \"1s\"\nlimt = 2\n",
            Format::Toml,
        )
        .unwrap_err();
        assert!(error.contains("unknown field `limt`"), "{error}");
    }

    #[test]
    fn the_wrong_shapes_are_told_what_the_right_ones_are() {
        for (text, format) in [
            ("[rule]\nname = \"a\"\nlimit = 1\n", Format::Toml),
            ("[rules]\nname = \"a\"\nlimit = 1\n", Format::Toml),
            ("[]", Format::Json),
            ("\"a rule\"", Format::Json),
        ] {
            let error = parse(text, format).unwrap_err();
            assert!(error.contains("[[rules]]"), "{text}: {error}");
        }
        let error = parse(
            "[[tiers]]\nname = \"t\"\nlimit = 1\n[[rules]]\nname = \"a\"\nlimit = 1\nwindow = \"1s\"\n",
            Format::Toml,
        )
        .unwrap_err();
        assert!(error.contains("it holds tiers too"), "{error}");
        assert!(error.contains("sluice config import"), "{error}");
    }

    #[test]
    fn a_refusal_of_the_whole_names_the_rule_of_the_file() {
        let rules = vec![
            one("name = \"x\"\nlimit = 1\nwindow = \"1s\"\n", Format::Toml),
            one("name = \"y\"\nlimit = 1\nwindow = \"1s\"\n", Format::Toml),
        ];
        let merged = ["live".to_owned(), "x".to_owned(), "y".to_owned()];
        let failure = name_in_file(
            Failure::refused("400: rules[2].match.tiers[0]: there is no tier `gold`"),
            Path::new("r.toml"),
            &merged,
            &rules,
        );
        assert_eq!(
            failure.message,
            "400: r.toml: rules[1].match.tiers[0]: there is no tier `gold` (rule `y`)"
        );
    }
}
