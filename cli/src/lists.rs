//! The safelist and the denylist, blocks (`block`: a denylist entry that expires), and
//! unblocking an address (brute-force protection's block and the denylist's entry).

use serde_json::{json, Map, Value};
use sluice_controller::config::validate::list_value;
use sluice_protocol::admin::{BlocksBody, ListEntryBody};
use sluice_protocol::config::ListKind;

use crate::args::{Kind, ListCommand, ProtectionCommand};
use crate::client::{encode, parse, Refusal};
use crate::entities::digest_of;
use crate::exit::{Done, Failure};
use crate::table::{or_dash, render};
use crate::Context;

const HEADER: [&str; 5] = ["ID", "KIND", "VALUE", "EXPIRES", "REASON"];

fn rows(entries: &[ListEntryBody]) -> Vec<Vec<String>> {
    entries
        .iter()
        .map(|e| {
            vec![
                e.id.clone(),
                // As the configuration spells it (`api_key`), which the CLI takes too.
                e.entry.kind.as_str().to_owned(),
                e.entry.value.clone(),
                or_dash(e.entry.expires_at.clone()),
                or_dash(e.entry.reason.clone()),
            ]
        })
        .collect()
}

pub fn list(context: &Context<'_>, list: &str, command: &ListCommand) -> Result<Done, Failure> {
    let client = context.client;
    match command {
        ListCommand::List => context.show(&client.get(&format!("/lists/{list}"))?, |body| {
            Ok(render(&HEADER, &rows(&parse::<Vec<ListEntryBody>>(body)?)))
        }),
        ListCommand::Add {
            kind,
            value,
            expires_in,
            expires_at,
            reason,
        } => add(
            context,
            list,
            *kind,
            value,
            expires_in.as_deref(),
            expires_at.as_deref(),
            reason.as_deref(),
        ),
        ListCommand::Remove { id } => {
            let answer = client.delete(&format!("/lists/{list}/{}", encode(id)))?;
            let version = answer.version;
            context.show(&answer, |_| {
                Ok(format!(
                    "{list} entry {id} removed (configuration version {})\n",
                    or_dash(version)
                ))
            })
        }
    }
}

fn add(
    context: &Context<'_>,
    list: &str,
    kind: Kind,
    value: &str,
    expires_in: Option<&str>,
    expires_at: Option<&str>,
    reason: Option<&str>,
) -> Result<Done, Failure> {
    let value = match kind {
        Kind::ApiKey => digest_of(value),
        _ => value.to_owned(),
    };
    let mut body = Map::new();
    body.insert("kind".to_owned(), json!(kind.list_kind()));
    body.insert("value".to_owned(), json!(value));
    for (key, given) in [
        ("expires_in", expires_in),
        ("expires_at", expires_at),
        ("reason", reason),
    ] {
        if let Some(given) = given {
            body.insert(key.to_owned(), json!(given));
        }
    }
    let answer = context
        .client
        .json("POST", &format!("/lists/{list}"), &Value::Object(body))?;
    context.show(&answer, |body| {
        Ok(render(&HEADER, &rows(&[parse::<ListEntryBody>(body)?])))
    })
}

pub fn block(
    context: &Context<'_>,
    kind: Kind,
    value: &str,
    duration: &str,
    reason: Option<&str>,
) -> Result<Done, Failure> {
    add(
        context,
        "denylist",
        kind,
        value,
        Some(duration),
        None,
        reason,
    )
}

/// The address as the lists hold it (`198.51.100.4/32`), or the text as given.
fn address(text: &str) -> String {
    list_value(ListKind::Ip, text).unwrap_or_else(|_| text.to_owned())
}

/// Lifts protection's block of `ip` and removes the denylist's entries for that address
/// alone; refused when neither blocked it.
pub fn unblock(context: &Context<'_>, ip: &str) -> Result<Done, Failure> {
    let client = context.client;
    let mut done = Vec::new();
    match client.delete(&format!("/protection/blocks/{}", encode(ip))) {
        Ok(_) => done.push(format!(
            "brute-force protection's block of {} lifted",
            address(ip)
        )),
        Err(refusal) if refusal.status() == Some(404) => {}
        Err(refusal) => return Err(refusal.into()),
    }
    let wanted = address(ip);
    let entries: Vec<ListEntryBody> = client.get("/lists/denylist")?.json()?;
    let mut version = None;
    for entry in entries
        .iter()
        .filter(|e| e.entry.kind == ListKind::Ip && address(&e.entry.value) == wanted)
    {
        match client.delete(&format!("/lists/denylist/{}", encode(&entry.id))) {
            Ok(answer) => {
                version = answer.version;
                done.push(format!(
                    "denylist entry {} ({}) removed",
                    entry.id, entry.entry.value
                ));
            }
            // Expired and removed meanwhile: nothing left to do.
            Err(Refusal::Status { status: 404, .. }) => {}
            Err(refusal) => return Err(refusal.into()),
        }
    }
    if done.is_empty() {
        return Err(Failure::refused(format!(
            "404: nothing blocks {ip}: brute-force protection does not, and no denylist entry \
             is for this address alone (`sluice deny list`; a network's entry is removed with \
             `sluice deny remove ID`)"
        )));
    }
    if context.json {
        return Ok(Done::ok(crate::pretty(
            &json!({ "unblocked": wanted, "done": done, "version": version }).to_string(),
        )));
    }
    let mut text = done.join("\n");
    if let Some(version) = version {
        text.push_str(&format!(" (configuration version {version})"));
    }
    text.push('\n');
    Ok(Done::ok(text))
}

pub fn protection(context: &Context<'_>, command: &ProtectionCommand) -> Result<Done, Failure> {
    let client = context.client;
    match command {
        ProtectionCommand::Blocks => context.show(&client.get("/protection/blocks")?, |body| {
            let blocks: BlocksBody = parse(body)?;
            let rows: Vec<Vec<String>> = blocks
                .blocks
                .iter()
                .map(|block| vec![block.ip.clone(), block.until.clone()])
                .collect();
            Ok(render(&["IP", "UNTIL"], &rows))
        }),
        ProtectionCommand::Lift { ip } => {
            client.delete(&format!("/protection/blocks/{}", encode(ip)))?;
            Ok(Done::ok(format!(
                "brute-force protection's block of {} lifted\n",
                address(ip)
            )))
        }
    }
}
