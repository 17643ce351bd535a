//! Rules, tiers and API keys: the named entities of the configuration. Changes of some
//! fields (`tiers set`, `keys update`) go through [`merge::read_modify_write`], so that the
//! fields not given keep their values.

use serde_json::{json, Map, Value};
use sha2::{Digest, Sha256};
use sluice_protocol::admin::ApiKeyBody;
use sluice_protocol::config::{ApiKey, Tier};
use sluice_protocol::Rule;

use crate::args::{
    Grant, GrantChange, KeysCommand, RulesCommand, TierChange, TierField, TiersCommand,
};
use crate::client::{encode, parse};
use crate::exit::{Done, Failure};
use crate::merge::{read_modify_write, Write};
use crate::rulefile::{self, RuleFile};
use crate::table::{or_dash, render};
use crate::Context;

fn window_text(window: Option<sluice_protocol::rules::Window>) -> String {
    or_dash(window.map(|w| w.to_string()))
}

fn rule_row(rule: &Rule) -> Vec<String> {
    let matcher = serde_json::to_string(&rule.matcher).unwrap_or_default();
    vec![
        rule.name.clone(),
        rule.strategy.as_str().to_owned(),
        serde_json::to_value(rule.scope)
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default(),
        rule.limit.to_string(),
        window_text(rule.window),
        if rule.tier_limits { "yes" } else { "-" }.to_owned(),
        if matcher == "{}" {
            "-".to_owned()
        } else {
            matcher
        },
    ]
}

fn rules_table(rules: &[Rule]) -> String {
    let rows: Vec<Vec<String>> = rules.iter().map(rule_row).collect();
    render(
        &[
            "NAME", "STRATEGY", "SCOPE", "LIMIT", "WINDOW", "BY TIER", "MATCH",
        ],
        &rows,
    )
}

fn version_note(version: Option<u64>) -> String {
    format!("(configuration version {})", or_dash(version))
}

pub fn rules(context: &Context<'_>, command: &RulesCommand) -> Result<Done, Failure> {
    let client = context.client;
    match command {
        RulesCommand::List => context.show(&client.get("/rules")?, |body| {
            Ok(rules_table(&parse::<Vec<Rule>>(body)?))
        }),
        RulesCommand::Get { name, format } => {
            let answer = client.get(&format!("/rules/{}", encode(name)))?;
            match format {
                None => context.show(&answer, |body| Ok(rules_table(&[parse::<Rule>(body)?]))),
                Some(format) => {
                    let rule: Rule = answer.json()?;
                    rulefile::render(&rule, *format).map(Done::ok)
                }
            }
        }
        RulesCommand::Apply { file } => {
            let rules = rulefile::read(file)?;
            match rules {
                RuleFile::One(rule) => apply_one(context, &rule),
                RuleFile::Many(rules) => apply_many(context, file, &rules),
            }
        }
        RulesCommand::Delete { name } => {
            let answer = client.delete(&format!("/rules/{}", encode(name)))?;
            let version = answer.version;
            context.show(&answer, |_| {
                Ok(format!("rule {name} deleted {}\n", version_note(version)))
            })
        }
    }
}

/// One rule, through its own route: created, or replaced if one of its name exists (the
/// rule file is the whole rule).
fn apply_one(context: &Context<'_>, rule: &Rule) -> Result<Done, Failure> {
    let body = serde_json::to_value(rule).map_err(|e| Failure::refused(e.to_string()))?;
    let path = format!("/rules/{}", encode(&rule.name));
    let created = std::cell::Cell::new(false);
    let answer = read_modify_write(
        context.client,
        &path,
        context.client.pinned(),
        &|current: Option<&Value>| {
            created.set(current.is_none());
            Ok(match current {
                Some(_) => Write {
                    method: "PUT",
                    path: path.clone(),
                    body: body.clone(),
                },
                None => Write {
                    method: "POST",
                    path: "/rules".to_owned(),
                    body: body.clone(),
                },
            })
        },
    )?;
    let version = answer.version;
    context.show(&answer, |_| {
        Ok(format!(
            "rule {} {} {}\n",
            rule.name,
            if created.get() { "created" } else { "replaced" },
            version_note(version)
        ))
    })
}

/// Several rules, as one version: the live configuration with each rule of the file put in
/// (replacing the one of its name, or added after the others), imported with `If-Match`.
fn apply_many(
    context: &Context<'_>,
    file: &std::path::Path,
    rules: &[Rule],
) -> Result<Done, Failure> {
    let outcome = std::cell::RefCell::new(Vec::new());
    let merged_names = std::cell::RefCell::new(Vec::new());
    let result = read_modify_write(
        context.client,
        "/config",
        context.client.pinned(),
        &|current: Option<&Value>| {
            let mut document = current.cloned().unwrap_or_else(|| json!({}));
            let (names, done) = put_rules(&mut document, rules)?;
            *merged_names.borrow_mut() = names;
            *outcome.borrow_mut() = done;
            Ok(Write {
                method: "PUT",
                path: "/config".to_owned(),
                body: document,
            })
        },
    );
    let answer = result
        .map_err(|failure| rulefile::name_in_file(failure, file, &merged_names.borrow(), rules))?;
    let version = answer.version;
    let outcome = outcome.into_inner();
    context.show(&answer, |_| {
        let listed: Vec<String> = outcome
            .iter()
            .map(|(name, created)| {
                format!("{name} ({})", if *created { "created" } else { "replaced" })
            })
            .collect();
        Ok(format!(
            "{} rules applied as one change: {} {}\n",
            listed.len(),
            listed.join(", "),
            version_note(version)
        ))
    })
}

/// The names of a document's rules after [`put_rules`], and for each rule of the file
/// whether it was new.
type Put = (Vec<String>, Vec<(String, bool)>);

/// Puts `rules` into the document's rules (by name).
fn put_rules(document: &mut Value, rules: &[Rule]) -> Result<Put, Failure> {
    let object = document
        .as_object_mut()
        .ok_or_else(|| Failure::refused("the controller's configuration is not an object"))?;
    let live = object
        .entry("rules")
        .or_insert_with(|| Value::Array(Vec::new()));
    let live = live
        .as_array_mut()
        .ok_or_else(|| Failure::refused("the controller's rules are not a list"))?;
    let mut done = Vec::new();
    for rule in rules {
        let value = serde_json::to_value(rule).map_err(|e| Failure::refused(e.to_string()))?;
        match live
            .iter_mut()
            .find(|r| r.get("name").and_then(Value::as_str) == Some(rule.name.as_str()))
        {
            Some(slot) => {
                *slot = value;
                done.push((rule.name.clone(), false));
            }
            None => {
                live.push(value);
                done.push((rule.name.clone(), true));
            }
        }
    }
    let names = live
        .iter()
        .map(|r| {
            r.get("name")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_owned()
        })
        .collect();
    Ok((names, done))
}

fn tiers_table(tiers: &[Tier]) -> String {
    let rows: Vec<Vec<String>> = tiers
        .iter()
        .map(|t| {
            vec![
                t.name.clone(),
                t.limit.to_string(),
                window_text(t.window),
                or_dash(t.burst),
                or_dash(t.degraded.map(|d| {
                    let mut text = d.limit.to_string();
                    if let Some(window) = d.window {
                        text.push_str(&format!("/{window}"));
                    }
                    if let Some(burst) = d.burst {
                        text.push_str(&format!(" burst {burst}"));
                    }
                    text
                })),
                or_dash(t.description.clone()),
            ]
        })
        .collect();
    render(
        &[
            "NAME",
            "LIMIT",
            "WINDOW",
            "BURST",
            "DEGRADED",
            "DESCRIPTION",
        ],
        &rows,
    )
}

pub fn tiers(context: &Context<'_>, command: &TiersCommand) -> Result<Done, Failure> {
    let client = context.client;
    match command {
        TiersCommand::List => context.show(&client.get("/tiers")?, |body| {
            Ok(tiers_table(&parse::<Vec<Tier>>(body)?))
        }),
        TiersCommand::Get { name } => context
            .show(&client.get(&format!("/tiers/{}", encode(name)))?, |body| {
                Ok(tiers_table(&[parse::<Tier>(body)?]))
            }),
        TiersCommand::Set { name, change } => {
            let path = format!("/tiers/{}", encode(name));
            let answer = read_modify_write(client, &path, client.pinned(), &|current: Option<
                &Value,
            >| {
                let tier = change_tier(current, name, change)?;
                Ok(match current {
                    Some(_) => Write {
                        method: "PUT",
                        path: path.clone(),
                        body: tier,
                    },
                    None => Write {
                        method: "POST",
                        path: "/tiers".to_owned(),
                        body: tier,
                    },
                })
            })?;
            context.show(&answer, |body| {
                let mut text = tiers_table(&[parse::<Tier>(body)?]);
                text.push_str(&format!("{}\n", version_note(answer.version)));
                Ok(text)
            })
        }
        TiersCommand::Delete { name } => {
            let answer = client.delete(&format!("/tiers/{}", encode(name)))?;
            let version = answer.version;
            context.show(&answer, |_| {
                Ok(format!("tier {name} deleted {}\n", version_note(version)))
            })
        }
    }
}

/// The tier as it will be: `current` (or a new tier named `name`) with the fields `change`
/// removes taken out, then the fields it gives set; every other field as it was. Values go
/// as given (a window as its text), for the controller to validate and name.
pub fn change_tier(
    current: Option<&Value>,
    name: &str,
    change: &TierChange,
) -> Result<Value, Failure> {
    let mut tier = match current {
        Some(Value::Object(tier)) => tier.clone(),
        Some(other) => {
            return Err(Failure::refused(format!(
                "the controller's tier does not read as one: {other}"
            )))
        }
        None => {
            let mut tier = Map::new();
            tier.insert("name".to_owned(), json!(name));
            tier
        }
    };
    for field in &change.unset {
        match field {
            TierField::Window => drop(tier.remove("window")),
            TierField::Burst => drop(tier.remove("burst")),
            TierField::Description => drop(tier.remove("description")),
            TierField::Degraded => drop(tier.remove("degraded")),
            TierField::DegradedWindow | TierField::DegradedBurst => {
                let key = if *field == TierField::DegradedWindow {
                    "window"
                } else {
                    "burst"
                };
                if let Some(Value::Object(degraded)) = tier.get_mut("degraded") {
                    degraded.remove(key);
                }
            }
        }
    }
    set(&mut tier, "limit", change.limit.map(|v| json!(v)));
    set(
        &mut tier,
        "window",
        change.window.as_ref().map(|v| json!(v)),
    );
    set(&mut tier, "burst", change.burst.map(|v| json!(v)));
    set(
        &mut tier,
        "description",
        change.description.as_ref().map(|v| json!(v)),
    );
    let degraded_given = change.degraded_limit.is_some()
        || change.degraded_window.is_some()
        || change.degraded_burst.is_some();
    if degraded_given {
        let mut degraded = match tier.get("degraded") {
            Some(Value::Object(degraded)) => degraded.clone(),
            _ => Map::new(),
        };
        set(
            &mut degraded,
            "limit",
            change.degraded_limit.map(|v| json!(v)),
        );
        set(
            &mut degraded,
            "window",
            change.degraded_window.as_ref().map(|v| json!(v)),
        );
        set(
            &mut degraded,
            "burst",
            change.degraded_burst.map(|v| json!(v)),
        );
        if !degraded.contains_key("limit") {
            return Err(Failure::usage(format!(
                "tier {name} has no DEGRADED limits yet: give --degraded-limit with \
                 --degraded-window or --degraded-burst"
            )));
        }
        tier.insert("degraded".to_owned(), Value::Object(degraded));
    }
    Ok(Value::Object(tier))
}

fn set(object: &mut Map<String, Value>, key: &str, value: Option<Value>) {
    if let Some(value) = value {
        object.insert(key.to_owned(), value);
    }
}

fn key_rows(keys: &[ApiKey]) -> Vec<Vec<String>> {
    keys.iter()
        .map(|k| {
            vec![
                k.sha256.clone(),
                or_dash(k.user.clone()),
                or_dash(k.tier.clone()),
                or_dash(k.name.clone()),
                or_dash(k.created_at.clone()),
            ]
        })
        .collect()
}

const KEY_HEADER: [&str; 5] = ["SHA256", "USER", "TIER", "NAME", "CREATED"];

/// The digest a key is known by: the argument itself when it is one, else its SHA-256.
pub fn digest_of(key_or_digest: &str) -> String {
    let text = key_or_digest
        .strip_prefix("sha256:")
        .unwrap_or(key_or_digest);
    if text.len() == 64 && text.bytes().all(|b| b.is_ascii_hexdigit()) {
        text.to_ascii_lowercase()
    } else {
        Sha256::digest(key_or_digest.as_bytes())
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }
}

fn grant_body(grant: &Grant) -> Value {
    let mut body = Map::new();
    set(&mut body, "user", grant.user.as_ref().map(|v| json!(v)));
    set(&mut body, "tier", grant.tier.as_ref().map(|v| json!(v)));
    set(&mut body, "name", grant.name.as_ref().map(|v| json!(v)));
    Value::Object(body)
}

/// What `keys update` sends: whom the key stands for now (`current`), less the fields
/// `change` removes, with the fields it gives.
pub fn change_grant(current: &Value, change: &GrantChange) -> Value {
    let mut body = Map::new();
    for key in ["user", "tier", "name"] {
        if let Some(value) = current.get(key).filter(|v| !v.is_null()) {
            body.insert(key.to_owned(), value.clone());
        }
    }
    for field in &change.unset {
        body.remove(field.key());
    }
    set(&mut body, "user", change.user.as_ref().map(|v| json!(v)));
    set(&mut body, "tier", change.tier.as_ref().map(|v| json!(v)));
    set(&mut body, "name", change.name.as_ref().map(|v| json!(v)));
    Value::Object(body)
}

pub fn keys(context: &Context<'_>, command: &KeysCommand) -> Result<Done, Failure> {
    let client = context.client;
    let created = |body: &str| -> Result<String, Failure> {
        let created: ApiKeyBody = parse(body)?;
        let mut text = render(
            &KEY_HEADER,
            &key_rows(std::slice::from_ref(&created.api_key)),
        );
        if let Some(key) = created.key {
            text.push_str(&format!("\nkey: {key}\n(shown once: store it now)\n"));
        }
        Ok(text)
    };
    let one = |body: &str| -> Result<String, Failure> {
        Ok(render(&KEY_HEADER, &key_rows(&[parse::<ApiKey>(body)?])))
    };
    match command {
        KeysCommand::List => context.show(&client.get("/api-keys")?, |body| {
            Ok(render(&KEY_HEADER, &key_rows(&parse::<Vec<ApiKey>>(body)?)))
        }),
        KeysCommand::Get { key_or_sha256 } => context.show(
            &client.get(&format!("/api-keys/{}", encode(&digest_of(key_or_sha256))))?,
            one,
        ),
        KeysCommand::Create { grant } => context.show(
            &client.json("POST", "/api-keys", &grant_body(grant))?,
            created,
        ),
        KeysCommand::Register {
            key_or_sha256,
            grant,
        } => {
            let mut body = grant_body(grant);
            body["sha256"] = json!(digest_of(key_or_sha256));
            context.show(&client.json("POST", "/api-keys", &body)?, created)
        }
        KeysCommand::Update {
            key_or_sha256,
            change,
        } => {
            let path = format!("/api-keys/{}", encode(&digest_of(key_or_sha256)));
            let answer = read_modify_write(client, &path, client.pinned(), &|current: Option<
                &Value,
            >| {
                let current = current.ok_or_else(|| {
                    Failure::refused(format!(
                        "404: there is no API key `{}`",
                        digest_of(key_or_sha256)
                    ))
                })?;
                Ok(Write {
                    method: "PUT",
                    path: path.clone(),
                    body: change_grant(current, change),
                })
            })?;
            context.show(&answer, one)
        }
        KeysCommand::Delete { key_or_sha256 } => {
            let answer =
                client.delete(&format!("/api-keys/{}", encode(&digest_of(key_or_sha256))))?;
            let version = answer.version;
            context.show(&answer, |_| {
                Ok(format!("key deleted {}\n", version_note(version)))
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::args::GrantField;

    fn tier_change() -> TierChange {
        TierChange {
            limit: None,
            window: None,
            burst: None,
            description: None,
            degraded_limit: None,
            degraded_window: None,
            degraded_burst: None,
            unset: Vec::new(),
        }
    }

    #[test]
    fn keys_are_sent_by_digest() {
        let digest = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";
        assert_eq!(digest_of("test"), digest);
        assert_eq!(digest_of(digest), digest);
        assert_eq!(
            digest_of(&format!("sha256:{}", digest.to_uppercase())),
            digest
        );
    }

    #[test]
    fn a_tier_keeps_the_fields_not_given() {
        let current = json!({ "name": "free", "limit": 10, "window": "1m", "burst": 20,
                              "degraded": { "limit": 2, "window": "1m" } });
        let change = TierChange {
            limit: Some(12),
            ..tier_change()
        };
        assert_eq!(
            change_tier(Some(&current), "free", &change).unwrap(),
            json!({ "name": "free", "limit": 12, "window": "1m", "burst": 20,
                    "degraded": { "limit": 2, "window": "1m" } })
        );
        let change = TierChange {
            degraded_burst: Some(4),
            unset: vec![TierField::Burst, TierField::DegradedWindow],
            ..tier_change()
        };
        assert_eq!(
            change_tier(Some(&current), "free", &change).unwrap(),
            json!({ "name": "free", "limit": 10, "window": "1m",
                    "degraded": { "limit": 2, "burst": 4 } })
        );
        let change = TierChange {
            degraded_limit: Some(1),
            unset: vec![TierField::Degraded],
            ..tier_change()
        };
        assert_eq!(
            change_tier(Some(&current), "free", &change).unwrap()["degraded"],
            json!({ "limit": 1 }),
            "unset first, then set: the DEGRADED limits replaced"
        );
    }

    #[test]
    fn a_new_tier_has_only_what_was_given() {
        let change = TierChange {
            limit: Some(5),
            window: Some("1parsec".into()),
            ..tier_change()
        };
        assert_eq!(
            change_tier(None, "gold", &change).unwrap(),
            json!({ "name": "gold", "limit": 5, "window": "1parsec" })
        );
        let change = TierChange {
            degraded_window: Some("1m".into()),
            ..tier_change()
        };
        let failure = change_tier(None, "gold", &change).unwrap_err();
        assert_eq!(failure.code, crate::exit::USAGE, "{failure:?}");
    }

    #[test]
    fn a_key_keeps_whom_it_stands_for_but_the_fields_given() {
        let current = json!({ "sha256": "ab", "user": "acme", "tier": "free",
                              "name": "acme prod", "created_at": "2026-01-01T00:00:00Z" });
        let change = GrantChange {
            user: None,
            tier: Some("pro".into()),
            name: None,
            unset: vec![GrantField::Name],
        };
        assert_eq!(
            change_grant(&current, &change),
            json!({ "user": "acme", "tier": "pro" })
        );
    }
}
