//! The configuration as files hold it: export, import, and the GitOps gate. `validate`
//! runs offline with the controller's own code (its import's depth check, then
//! `config::file::load`: parse, normalize, validate), so that a file it passes is one the
//! controller takes, and an error is the one the controller gives. `diff` compares a file
//! with the live configuration.

use std::path::Path;

use serde_json::{json, Value};
use sluice_controller::admin::depth;
use sluice_controller::config::file::{self, Format};
use sluice_protocol::admin::VersionBody;
use sluice_protocol::config::ConfigDocument;

use crate::args::ConfigCommand;
use crate::client::Api;
use crate::diff;
use crate::exit::{Done, Failure, DIFFERENT, SUCCESS};
use crate::table::or_dash;
use crate::Context;

pub fn config(context: &Context<'_>, command: &ConfigCommand) -> Result<Done, Failure> {
    match command {
        ConfigCommand::Export { format, output } => {
            let answer = context
                .client
                .get(&format!("/config?format={}", format.name()))?;
            match output {
                Some(path) => {
                    std::fs::write(path, &answer.body).map_err(|e| {
                        Failure::usage(format!("cannot write {}: {e}", path.display()))
                    })?;
                    Ok(Done::ok(format!(
                        "wrote configuration version {} to {}\n",
                        or_dash(answer.version),
                        path.display()
                    )))
                }
                None => Ok(Done::ok(answer.body)),
            }
        }
        ConfigCommand::Import { file } => {
            let format = Format::of_path(file).ok_or_else(|| {
                Failure::usage(format!(
                    "{}: use a .toml, .yaml, .yml or .json file",
                    file.display()
                ))
            })?;
            let text = std::fs::read_to_string(file)
                .map_err(|e| Failure::usage(format!("cannot read {}: {e}", file.display())))?;
            let answer = context.client.call(
                "PUT",
                "/config",
                Some((format.media_type(), text)),
                context.client.pinned(),
            )?;
            context.show(&answer, |body| {
                let version: VersionBody = crate::client::parse(body)?;
                Ok(format!("imported as version {}\n", version.version))
            })
        }
        ConfigCommand::Validate { files } => validate_files(context, files),
        ConfigCommand::Diff { file } => diff_file(context, file),
    }
}

/// A file as the controller would take it: read, checked for depth as an import is, parsed,
/// normalized and validated by the controller's own code. `Err(Failure)` with status 2 when
/// it cannot be read, 1 when it is invalid (`path: field: message`).
pub fn load(path: &Path) -> Result<ConfigDocument, Failure> {
    let shown = path.display();
    let format = Format::of_path(path).ok_or_else(|| {
        Failure::usage(format!(
            "{shown}: the file must end in .toml, .yaml, .yml or .json"
        ))
    })?;
    let bytes =
        std::fs::read(path).map_err(|e| Failure::usage(format!("cannot read {shown}: {e}")))?;
    if let Err(too_deep) = depth::check(&bytes, format) {
        let error = sluice_controller::error::ApiError::from(too_deep);
        return Err(Failure::refused(format!("{shown}: {}", error.body.message)));
    }
    file::load(path).map_err(Failure::refused)
}

fn summary(document: &ConfigDocument) -> String {
    let count =
        |n: usize, one: &str, many: &str| format!("{n} {}", if n == 1 { one } else { many });
    [
        count(document.rules.len(), "rule", "rules"),
        count(document.tiers.len(), "tier", "tiers"),
        count(document.api_keys.len(), "API key", "API keys"),
        count(
            document.safelist.len(),
            "safelist entry",
            "safelist entries",
        ),
        count(
            document.denylist.len(),
            "denylist entry",
            "denylist entries",
        ),
    ]
    .join(", ")
}

/// Each file valid (standard output) or its error (standard error); the worst status.
fn validate_files(context: &Context<'_>, files: &[std::path::PathBuf]) -> Result<Done, Failure> {
    let mut text = String::new();
    let mut results = Vec::new();
    let mut code = SUCCESS;
    for path in files {
        match load(path) {
            Ok(document) => {
                text.push_str(&format!(
                    "{}: valid ({})\n",
                    path.display(),
                    summary(&document)
                ));
                results.push(json!({ "file": path, "valid": true }));
            }
            Err(failure) => {
                eprintln!("{}", failure.message);
                if failure.code == crate::exit::REFUSED {
                    if let Ok(crate::rulefile::RuleFile::One(rule)) = crate::rulefile::read(path) {
                        eprintln!(
                            "hint: {} holds one rule ({}), as `sluice rules apply` takes it; a \
                             configuration holds its rules in a list ([[rules]] in TOML, \
                             `rules:` in YAML, {{\"rules\": [...]}} in JSON)",
                            path.display(),
                            rule.name
                        );
                    }
                }
                results.push(json!({ "file": path, "valid": false, "error": failure.message }));
                code = code.max(failure.code);
            }
        }
    }
    if context.json {
        text = crate::pretty(&Value::Array(results).to_string());
    }
    Ok(Done { text, code })
}

/// What importing `path` would change: status 0 none, 3 some, 1 an invalid file.
fn diff_file(context: &Context<'_>, path: &Path) -> Result<Done, Failure> {
    let document = load(path)?;
    let answer = context.client.get("/config")?;
    let live: Value = answer.json()?;
    // Both as the controller writes them: the file's document, and the live one read back
    // into the same types (a field this CLI does not know is compared as it came).
    let live = serde_json::from_value::<ConfigDocument>(live.clone())
        .ok()
        .and_then(|typed| serde_json::to_value(typed).ok())
        .unwrap_or(live);
    let file = serde_json::to_value(&document).map_err(|e| Failure::refused(e.to_string()))?;
    let changes = diff::diff(&live, &file);
    let code = if changes.is_empty() {
        SUCCESS
    } else {
        DIFFERENT
    };
    let version = or_dash(answer.version);
    let text = if context.json {
        crate::pretty(
            &json!({ "file": path, "version": answer.version, "changes": changes }).to_string(),
        )
    } else if changes.is_empty() {
        format!(
            "no difference: {} is the live configuration (version {version})\n",
            path.display()
        )
    } else {
        format!(
            "{}{} change{} from the live configuration (version {version}) to {}\n",
            diff::render(&changes),
            changes.len(),
            if changes.len() == 1 { "" } else { "s" },
            path.display()
        )
    };
    Ok(Done { text, code })
}
