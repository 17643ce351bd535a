//! Running the system: status, the system state, the emergency switch, counters, audit.

use serde_json::json;
use sluice_protocol::admin::{
    AuditBody, BuildBody, CountersBody, EnforcementStatus, Operations, ResetBody, VersionBody,
    WhoAmIBody,
};

use crate::args::{CountersCommand, StateCommand, Whose};
use crate::client::{encode, parse};
use crate::entities::digest_of;
use crate::exit::{Done, Failure};
use crate::table::render;
use crate::Context;

/// The controller's software, as `status` names it; `None` from a controller older than
/// `/v1/admin/build` (404).
fn build(context: &Context<'_>) -> Result<Option<BuildBody>, Failure> {
    match context.client.get("/build") {
        Ok(answer) => answer.json().map(Some),
        Err(refusal) if refusal.status() == Some(404) => Ok(None),
        Err(refusal) => Err(refusal.into()),
    }
}

fn software(build: Option<&BuildBody>) -> String {
    match build {
        Some(build) => format!("sluice {} (commit {})", build.version, build.commit),
        None => "unknown (older than this CLI)".to_owned(),
    }
}

pub fn status(context: &Context<'_>) -> Result<Done, Failure> {
    let client = context.client;
    let build = build(context)?;
    let version: VersionBody = client.get("/version")?.json()?;
    let operations: Operations = client.get("/state")?.json()?;
    let who: WhoAmIBody = client.get("/whoami")?.json()?;
    let role = serde_json::to_value(who.role)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default();
    if context.json {
        let controller = build
            .as_ref()
            .map(|b| json!({ "version": b.version, "commit": b.commit }));
        return Ok(Done::ok(crate::pretty(
            &json!({
                "controller": controller,
                "cli": { "version": env!("CARGO_PKG_VERSION") },
                "configuration_version": version.version,
                "state": operations,
                "whoami": { "name": who.name, "role": role },
            })
            .to_string(),
        )));
    }
    Ok(Done::ok(format!(
        "controller: {}\ncli: sluice {}\nconfiguration version: {}\nstate: {}\nenforcement: {}\ntoken: {} ({role})\n",
        software(build.as_ref()),
        env!("CARGO_PKG_VERSION"),
        version.version,
        state_line(&operations),
        enforcement_line(operations.enforce, &operations.unenforced_rules),
        who.name,
    )))
}

fn state_line(operations: &Operations) -> String {
    let mut line = operations.state.as_str().to_owned();
    if let Some(since) = &operations.state_since {
        line.push_str(&format!(" since {since}"));
    }
    line.push_str(if operations.automatic {
        " (automatic)"
    } else {
        " (pinned: `sluice state auto` hands it back)"
    });
    line
}

fn enforcement_line(enforce: bool, unenforced: &[String]) -> String {
    let mut line = if enforce {
        "on".to_owned()
    } else {
        "OFF: nothing is refused".to_owned()
    };
    if !unenforced.is_empty() {
        line.push_str(&format!("; off for {}", unenforced.join(", ")));
    }
    line
}

pub fn state(context: &Context<'_>, command: &StateCommand) -> Result<Done, Failure> {
    let client = context.client;
    let answer = match command {
        StateCommand::Get => client.get("/state")?,
        StateCommand::Set { state } => client.json(
            "PUT",
            "/state",
            &json!({ "state": state.to_ascii_uppercase() }),
        )?,
        StateCommand::Auto => client.json("PUT", "/state", &json!({ "automatic": true }))?,
    };
    context.show(&answer, |body| {
        let operations: Operations = parse(body)?;
        Ok(format!("{}\n", state_line(&operations)))
    })
}

pub fn enforce(
    context: &Context<'_>,
    switch: Option<&str>,
    rule: Option<&str>,
) -> Result<Done, Failure> {
    let client = context.client;
    let answer = match switch {
        None => client.get("/enforcement")?,
        Some(switch) => {
            let mut body = json!({ "enforce": switch == "on" });
            if let Some(rule) = rule {
                body["rule"] = json!(rule);
            }
            client.json("PUT", "/enforcement", &body)?
        }
    };
    context.show(&answer, |body| {
        let status: EnforcementStatus = parse(body)?;
        Ok(format!(
            "{}\n",
            enforcement_line(status.enforce, &status.unenforced_rules)
        ))
    })
}

/// The query of a counters call.
pub fn whose_query(whose: &Whose, all: bool) -> String {
    let mut parts = Vec::new();
    if let (Some(kind), Some(value)) = (whose.kind, &whose.value) {
        let value = match kind {
            crate::args::CounterKind::ApiKey => digest_of(value),
            _ => value.clone(),
        };
        parts.push(format!("kind={}", kind.api_name()));
        parts.push(format!("value={}", encode(&value)));
    }
    for (name, value) in [("tier", &whose.tier), ("rule", &whose.rule)] {
        if let Some(value) = value {
            parts.push(format!("{name}={}", encode(value)));
        }
    }
    if all {
        parts.push("all=true".to_owned());
    }
    if parts.is_empty() {
        String::new()
    } else {
        format!("?{}", parts.join("&"))
    }
}

pub fn counters(context: &Context<'_>, command: &CountersCommand) -> Result<Done, Failure> {
    let client = context.client;
    match command {
        CountersCommand::Show { whose } => {
            let answer = client.get(&format!("/counters{}", whose_query(whose, false)))?;
            context.show(&answer, |body| {
                let counters: CountersBody = parse(body)?;
                let rows: Vec<Vec<String>> = counters
                    .counters
                    .iter()
                    .map(|p| {
                        vec![
                            p.rule.clone(),
                            p.strategy.as_str().to_owned(),
                            p.limit.to_string(),
                            p.remaining.to_string(),
                            format!("{} ms", p.reset_ms),
                        ]
                    })
                    .collect();
                Ok(render(
                    &["RULE", "STRATEGY", "LIMIT", "REMAINING", "RESET"],
                    &rows,
                ))
            })
        }
        CountersCommand::Reset { whose, all } => {
            let answer = client.delete(&format!("/counters{}", whose_query(whose, *all)))?;
            context.show(&answer, |body| {
                let reset: ResetBody = parse(body)?;
                Ok(format!("{} counters reset\n", reset.reset))
            })
        }
    }
}

pub fn audit(context: &Context<'_>, limit: usize) -> Result<Done, Failure> {
    let answer = context.client.get(&format!("/audit?limit={limit}"))?;
    context.show(&answer, |body| {
        let audit: AuditBody = parse(body)?;
        let rows: Vec<Vec<String>> = audit
            .entries
            .iter()
            .map(|e| {
                vec![
                    e.at.clone(),
                    e.actor.clone(),
                    e.action.clone(),
                    e.target.clone(),
                    format!("{} → {}", e.version_before, e.version_after),
                ]
            })
            .collect();
        Ok(render(
            &["AT", "ACTOR", "ACTION", "TARGET", "VERSION"],
            &rows,
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::args::CounterKind;

    #[test]
    fn queries_are_encoded() {
        let whose = Whose {
            kind: Some(CounterKind::Ip),
            value: Some("2001:db8::1".into()),
            tier: None,
            rule: Some("per client".into()),
        };
        assert_eq!(
            whose_query(&whose, false),
            "?kind=ip&value=2001%3Adb8%3A%3A1&rule=per%20client"
        );
        let key = Whose {
            kind: Some(CounterKind::ApiKey),
            value: Some("test".into()),
            tier: None,
            rule: None,
        };
        assert_eq!(
            whose_query(&key, false),
            "?kind=api_key&value=9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
        );
    }

    #[test]
    fn the_software_is_named_apart_from_the_configuration() {
        let build = BuildBody {
            version: "0.2.0".into(),
            commit: "abc123".into(),
        };
        assert_eq!(software(Some(&build)), "sluice 0.2.0 (commit abc123)");
        assert_eq!(software(None), "unknown (older than this CLI)");
    }
}
