//! The configuration document as a file holds it: TOML (as the controller always read),
//! YAML (what GitOps tools write) or JSON. The same schema in each, read and written here.

use std::path::Path;

use sluice_protocol::config::ConfigDocument;

use super::validate::FieldError;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Toml,
    Yaml,
    Json,
}

impl Format {
    /// By the file's extension (`.toml`, `.yaml`/`.yml`, `.json`).
    pub fn of_path(path: &Path) -> Option<Format> {
        match path.extension()?.to_str()? {
            "toml" => Some(Format::Toml),
            "yaml" | "yml" => Some(Format::Yaml),
            "json" => Some(Format::Json),
            _ => None,
        }
    }

    /// By a request's or reply's media type (`application/toml`, `application/yaml`…).
    pub fn of_media_type(media_type: &str) -> Option<Format> {
        let essence = media_type.split(';').next()?.trim().to_ascii_lowercase();
        match essence.as_str() {
            "application/toml" | "text/toml" => Some(Format::Toml),
            "application/yaml" | "application/x-yaml" | "text/yaml" => Some(Format::Yaml),
            "application/json" | "" => Some(Format::Json),
            _ => None,
        }
    }

    /// By name (`toml`, `yaml`, `json`), as `?format=` gives it.
    pub fn of_name(name: &str) -> Option<Format> {
        match name {
            "toml" => Some(Format::Toml),
            "yaml" | "yml" => Some(Format::Yaml),
            "json" => Some(Format::Json),
            _ => None,
        }
    }

    pub fn media_type(self) -> &'static str {
        match self {
            Format::Toml => "application/toml",
            Format::Yaml => "application/yaml",
            Format::Json => "application/json",
        }
    }
}

/// Reads a document, naming the field at fault (`rules[0].window`) when it does not parse.
pub fn parse(text: &str, format: Format) -> Result<ConfigDocument, FieldError> {
    let path_error = |path: String, message: String| {
        FieldError::new(crate::error::field_of(&path, &message), message)
    };
    match format {
        Format::Toml => {
            // A syntax error names no field; it says where it is instead.
            let deserializer = toml::Deserializer::parse(text).map_err(|e| {
                let at = e.span().map_or(0, |span| span.start);
                FieldError::new(
                    "",
                    format!("{}: {}", line_and_column(text, at), e.message()),
                )
            })?;
            serde_path_to_error::deserialize(deserializer)
                .map_err(|e| path_error(e.path().to_string(), e.inner().message().to_owned()))
        }
        Format::Yaml => {
            let deserializer = serde_yaml_ng::Deserializer::from_str(text);
            serde_path_to_error::deserialize(deserializer)
                .map_err(|e| path_error(e.path().to_string(), e.inner().to_string()))
        }
        Format::Json => {
            let mut deserializer = serde_json::Deserializer::from_str(text);
            serde_path_to_error::deserialize(&mut deserializer)
                .map_err(|e| path_error(e.path().to_string(), e.inner().to_string()))
        }
    }
}

/// `line L, column C` of byte `at` of `text` (both counted from 1).
fn line_and_column(text: &str, at: usize) -> String {
    let before = text.get(..at).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    format!("line {line}, column {column}")
}

/// Writes a document in `format`, in the schema [`parse`] reads.
pub fn render(document: &ConfigDocument, format: Format) -> Result<String, String> {
    match format {
        Format::Toml => toml::to_string_pretty(document).map_err(|e| e.to_string()),
        Format::Yaml => serde_yaml_ng::to_string(document).map_err(|e| e.to_string()),
        Format::Json => serde_json::to_string_pretty(document).map_err(|e| e.to_string()),
    }
}

/// Reads the file at `path`, by its extension.
pub fn load(path: &Path) -> Result<ConfigDocument, String> {
    let shown = path.display();
    let format = Format::of_path(path)
        .ok_or_else(|| format!("{shown}: the file must end in .toml, .yaml, .yml or .json"))?;
    let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read {shown}: {e}"))?;
    let mut document = parse(&text, format).map_err(|e| format!("{shown}: {e}"))?;
    super::validate::normalize(&mut document);
    super::validate::validate(&document).map_err(|e| format!("{shown}: {e}"))?;
    Ok(document)
}

#[cfg(test)]
mod tests {
    use super::*;

    const TOML: &str = r#"
[[tiers]]
name = "pro"
limit = 100
window = "1m"

[[rules]]
name = "per-client"
limit = 10
window = "1m"
tier_limits = true
match = { path_prefix = "/api/" }

[[api_keys]]
sha256 = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
user = "acme"
tier = "pro"

[[denylist]]
kind = "ip"
value = "10.0.0.0/8"
reason = "abuse"
"#;

    #[test]
    fn every_format_reads_what_it_wrote() {
        let document = parse(TOML, Format::Toml).unwrap();
        for format in [Format::Toml, Format::Yaml, Format::Json] {
            let text = render(&document, format).unwrap();
            assert_eq!(
                parse(&text, format).unwrap(),
                document,
                "{format:?}:\n{text}"
            );
        }
    }

    #[test]
    fn yaml_errors_name_the_field_too() {
        let yaml = "rules:\n  - name: a\n    limit: 1\n    window: 1x\n";
        let error = parse(yaml, Format::Yaml).unwrap_err();
        assert_eq!(error.field, "rules[0].window");
    }
}
