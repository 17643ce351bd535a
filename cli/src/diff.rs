//! What applying one configuration over another would change: entities added, removed and
//! changed (with the fields that differ), by their identity (a rule and a tier by name, a
//! key by digest, a list entry by kind and value), the rules' order, and the settings.
//! Pure: two JSON documents in, a list of changes out.

use serde::Serialize;
use serde_json::{Map, Value};

/// A document's sections of named entities: (field, what one is called, its identity).
const ENTITIES: [(&str, &str, Identity); 5] = [
    ("tiers", "tier", Identity::Field("name")),
    ("rules", "rule", Identity::Field("name")),
    ("api_keys", "API key", Identity::Field("sha256")),
    ("safelist", "safelist entry", Identity::KindValue),
    ("denylist", "denylist entry", Identity::KindValue),
];

#[derive(Clone, Copy)]
enum Identity {
    Field(&'static str),
    /// `ip 10.0.0.0/8`.
    KindValue,
}

impl Identity {
    fn of(self, entity: &Value) -> String {
        let text = |key: &str| {
            entity
                .get(key)
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_owned()
        };
        match self {
            Identity::Field(key) => text(key),
            Identity::KindValue => format!("{} {}", text("kind"), text("value")),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    Added,
    Removed,
    Changed,
}

/// One field that differs: its path in the entity (`degraded.limit`), and its value in the
/// live configuration and in the file (`None`: absent).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Field {
    pub field: String,
    pub live: Option<Value>,
    pub file: Option<Value>,
}

/// One change applying the file would make.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Change {
    /// The document's section (`rules`, `tiers`, `api_keys`, `safelist`, `denylist`, a
    /// setting such as `automatic_state`).
    pub section: String,
    /// What it is, for people (`rule login`, `the rules' order`, `automatic_state`).
    pub what: String,
    pub kind: Kind,
    pub fields: Vec<Field>,
}

/// The changes that make `live` into `file`.
pub fn diff(live: &Value, file: &Value) -> Vec<Change> {
    let mut changes = Vec::new();
    for (section, called, identity) in ENTITIES {
        let list = |document: &Value| -> Vec<Value> {
            document
                .get(section)
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default()
        };
        let (before, after) = (list(live), list(file));
        let find = |list: &[Value], id: &str| list.iter().find(|e| identity.of(e) == id).cloned();
        for entity in &before {
            let id = identity.of(entity);
            match find(&after, &id) {
                None => changes.push(Change {
                    section: section.to_owned(),
                    what: format!("{called} {id}"),
                    kind: Kind::Removed,
                    fields: Vec::new(),
                }),
                Some(new) => {
                    let mut fields = Vec::new();
                    compare("", Some(entity), Some(&new), &mut fields);
                    if !fields.is_empty() {
                        changes.push(Change {
                            section: section.to_owned(),
                            what: format!("{called} {id}"),
                            kind: Kind::Changed,
                            fields,
                        });
                    }
                }
            }
        }
        for entity in &after {
            let id = identity.of(entity);
            if find(&before, &id).is_none() {
                changes.push(Change {
                    section: section.to_owned(),
                    what: format!("{called} {id}"),
                    kind: Kind::Added,
                    fields: Vec::new(),
                });
            }
        }
        if section == "rules" {
            // Rules apply in order: the same rules in another order are another configuration.
            let names = |list: &[Value], other: &[Value]| -> Vec<Value> {
                list.iter()
                    .map(|e| identity.of(e))
                    .filter(|id| other.iter().any(|o| identity.of(o) == *id))
                    .map(Value::String)
                    .collect()
            };
            let (was, will) = (names(&before, &after), names(&after, &before));
            if was != will {
                changes.push(Change {
                    section: section.to_owned(),
                    what: "the rules' order".to_owned(),
                    kind: Kind::Changed,
                    fields: vec![Field {
                        field: "order".to_owned(),
                        live: Some(Value::Array(was)),
                        file: Some(Value::Array(will)),
                    }],
                });
            }
        }
    }
    // The settings (automatic_state, protection, observability, and any other section).
    let empty = Map::new();
    let keys = |document: &Value| {
        document
            .as_object()
            .unwrap_or(&empty)
            .keys()
            .cloned()
            .collect::<Vec<_>>()
    };
    let mut settings: Vec<String> = keys(live);
    for key in keys(file) {
        if !settings.contains(&key) {
            settings.push(key);
        }
    }
    settings.retain(|key| !ENTITIES.iter().any(|(section, _, _)| section == key));
    settings.sort();
    for key in settings {
        let (before, after) = (live.get(&key), file.get(&key));
        let kind = match (before, after) {
            (Some(_), None) => Kind::Removed,
            (None, Some(_)) => Kind::Added,
            _ => Kind::Changed,
        };
        let mut fields = Vec::new();
        compare("", before, after, &mut fields);
        if !fields.is_empty() {
            changes.push(Change {
                section: key.clone(),
                what: key,
                kind,
                fields,
            });
        }
    }
    changes
}

/// The fields under `path` that differ between `before` and `after`: objects field by
/// field, anything else (lists among them) whole.
fn compare(path: &str, before: Option<&Value>, after: Option<&Value>, out: &mut Vec<Field>) {
    match (before, after) {
        (Some(Value::Object(a)), Some(Value::Object(b))) => {
            let mut keys: Vec<&String> = a.keys().collect();
            for key in b.keys() {
                if !a.contains_key(key) {
                    keys.push(key);
                }
            }
            for key in keys {
                let inner = if path.is_empty() {
                    key.clone()
                } else {
                    format!("{path}.{key}")
                };
                compare(&inner, a.get(key), b.get(key), out);
            }
        }
        (a, b) if a == b => {}
        (a, b) => out.push(Field {
            field: path.to_owned(),
            live: a.cloned(),
            file: b.cloned(),
        }),
    }
}

fn shown(value: Option<&Value>) -> String {
    match value {
        None | Some(Value::Null) => "(none)".to_owned(),
        Some(value) => value.to_string(),
    }
}

/// The changes for people, one a line: `+` added, `-` removed, `~` changed (live → file).
pub fn render(changes: &[Change]) -> String {
    let mut text = String::new();
    for change in changes {
        let mark = match change.kind {
            Kind::Added => '+',
            Kind::Removed => '-',
            Kind::Changed => '~',
        };
        text.push_str(&format!("{mark} {}", change.what));
        let fields: Vec<String> = change
            .fields
            .iter()
            .map(|f| {
                let name = if f.field.is_empty() {
                    String::new()
                } else {
                    format!("{} ", f.field)
                };
                format!(
                    "{name}{} → {}",
                    shown(f.live.as_ref()),
                    shown(f.file.as_ref())
                )
            })
            .collect();
        if !fields.is_empty() && change.kind == Kind::Changed {
            text.push_str(&format!(": {}", fields.join("; ")));
        }
        text.push('\n');
    }
    text
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn the_same_document_makes_no_change() {
        let document =
            json!({ "rules": [{ "name": "a", "limit": 1 }], "protection": { "block": "1m" } });
        assert_eq!(diff(&document, &document), []);
    }

    #[test]
    fn entities_by_their_identity_with_the_fields_that_differ() {
        let live = json!({
            "tiers": [{ "name": "pro", "limit": 100, "degraded": { "limit": 50 } },
                      { "name": "gold", "limit": 5 }],
            "rules": [{ "name": "a", "limit": 1, "window": "1m" }],
            "denylist": [{ "kind": "ip", "value": "10.0.0.0/8" }],
        });
        let file = json!({
            "tiers": [{ "name": "pro", "limit": 200, "degraded": { "limit": 50, "window": "1m" } }],
            "rules": [{ "name": "a", "limit": 1, "window": "1m" }, { "name": "b", "limit": 2 }],
            "denylist": [{ "kind": "ip", "value": "10.0.0.0/8", "reason": "abuse" }],
            "automatic_state": { "enter_share": 0.5 },
        });
        let text = render(&diff(&live, &file));
        assert_eq!(
            text,
            "~ tier pro: degraded.window (none) → \"1m\"; limit 100 → 200\n\
             - tier gold\n\
             + rule b\n\
             ~ denylist entry ip 10.0.0.0/8: reason (none) → \"abuse\"\n\
             + automatic_state\n"
        );
    }

    #[test]
    fn the_rules_order_is_a_change() {
        let live = json!({ "rules": [{ "name": "a" }, { "name": "b" }, { "name": "c" }] });
        let file = json!({ "rules": [{ "name": "b" }, { "name": "a" }] });
        assert_eq!(
            render(&diff(&live, &file)),
            "- rule c\n~ the rules' order: order [\"a\",\"b\"] → [\"b\",\"a\"]\n"
        );
    }
}
