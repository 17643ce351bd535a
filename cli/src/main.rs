//! `sluice`: the common tasks of the admin API from a shell. Tables for people, `--json` for
//! scripts (the API's own bodies). Exit status 0 on success, 1 when the controller refused
//! (its error is printed as `status: field: message`), 2 for a usage error.

mod client;
mod table;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand, ValueEnum};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use sluice_protocol::admin::{
    ApiKeyBody, AuditBody, BlocksBody, CountersBody, EnforcementStatus, ListEntryBody, Operations,
    ResetBody, VersionBody, WhoAmIBody,
};
use sluice_protocol::config::{ApiKey, ListKind, Tier};
use sluice_protocol::Rule;

use client::{encode, Client, Failure};
use table::{or_dash, render};

#[derive(Parser)]
#[command(
    name = "sluice",
    version,
    about = "Operate a Sluice controller through its admin API"
)]
struct Cli {
    /// The controller's admin address.
    #[arg(
        long,
        env = "SLUICE_ADMIN_URL",
        default_value = "http://127.0.0.1:8082",
        global = true
    )]
    url: String,
    /// A token of the controller's (`read` to look, `admin` to change).
    #[arg(
        long,
        env = "SLUICE_ADMIN_TOKEN",
        hide_env_values = true,
        global = true
    )]
    token: Option<String>,
    /// Print the API's JSON instead of tables.
    #[arg(long, global = true)]
    json: bool,
    /// Make a change only if the configuration is still at this version (else 409).
    #[arg(long, global = true)]
    if_match: Option<u64>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum ProtectionCommand {
    /// The addresses blocked now, and until when.
    Blocks,
    /// Ends the block of an address now.
    Lift { ip: String },
}

#[derive(Subcommand)]
enum Command {
    /// The configuration's version, the system state, and who the token is.
    Status,
    /// Rules: which requests a limit applies to, whom it counts, and how.
    #[command(subcommand)]
    Rules(RulesCommand),
    /// Tiers: named limits that clients belong to.
    #[command(subcommand)]
    Tiers(TiersCommand),
    /// API keys, by the SHA-256 of the key.
    #[command(subcommand)]
    Keys(KeysCommand),
    /// The safelist: requests that skip the limiter.
    #[command(subcommand)]
    Allow(ListCommand),
    /// The denylist: requests refused with 403.
    #[command(subcommand)]
    Deny(ListCommand),
    /// Counters: where a client stands, and resets.
    #[command(subcommand)]
    Counters(CountersCommand),
    /// The system state (NORMAL or DEGRADED), set by hand or left to the signal.
    #[command(subcommand)]
    State(StateCommand),
    /// The emergency switch: `off` lets everything through (every rule, or --rule's),
    /// still counted and reported as would-be-limited.
    Enforce {
        #[arg(value_parser = ["on", "off"])]
        switch: Option<String>,
        /// Switch one rule only.
        #[arg(long)]
        rule: Option<String>,
    },
    /// Blocks a client now: denylists it (403) for a while.
    Block {
        #[arg(value_enum)]
        kind: Kind,
        value: String,
        /// How long (`10m`, `1h`, `1d`).
        #[arg(long = "for", default_value = "1h")]
        duration: String,
        #[arg(long)]
        reason: Option<String>,
    },
    /// Brute-force protection's blocks: the addresses blocked now, and lifting one.
    #[command(subcommand)]
    Protection(ProtectionCommand),
    /// The whole configuration, as files hold it.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// The newest changes, newest first.
    Audit {
        #[arg(long, default_value_t = 20)]
        limit: usize,
    },
}

#[derive(Subcommand)]
enum RulesCommand {
    List,
    Get {
        name: String,
    },
    /// Creates the rule in FILE (TOML or JSON, one rule), or replaces the one of its name.
    Apply {
        file: PathBuf,
    },
    Delete {
        name: String,
    },
}

#[derive(Subcommand)]
enum TiersCommand {
    List,
    Get {
        name: String,
    },
    /// Creates the tier, or replaces the one of this name.
    Set {
        name: String,
        #[arg(long)]
        limit: u64,
        #[arg(long)]
        window: Option<String>,
        #[arg(long)]
        burst: Option<u64>,
        #[arg(long)]
        description: Option<String>,
        /// The limit while the system is DEGRADED (default: the same).
        #[arg(long)]
        degraded_limit: Option<u64>,
        #[arg(long, requires = "degraded_limit")]
        degraded_window: Option<String>,
        #[arg(long, requires = "degraded_limit")]
        degraded_burst: Option<u64>,
    },
    Delete {
        name: String,
    },
}

#[derive(Args)]
struct Grant {
    /// The user the key counts as.
    #[arg(long)]
    user: Option<String>,
    /// The key's tier.
    #[arg(long)]
    tier: Option<String>,
    /// A label for people.
    #[arg(long)]
    name: Option<String>,
}

#[derive(Subcommand)]
enum KeysCommand {
    List,
    /// Makes a new key (printed once: store it).
    Create {
        #[command(flatten)]
        grant: Grant,
    },
    /// Registers a key made elsewhere, by its SHA-256 (or by the key itself, hashed here).
    Register {
        key_or_sha256: String,
        #[command(flatten)]
        grant: Grant,
    },
    /// Replaces whom the key stands for.
    Update {
        sha256: String,
        #[command(flatten)]
        grant: Grant,
    },
    Delete {
        sha256: String,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum Kind {
    Ip,
    User,
    ApiKey,
    Path,
}

impl Kind {
    fn list_kind(self) -> ListKind {
        match self {
            Kind::Ip => ListKind::Ip,
            Kind::User => ListKind::User,
            Kind::ApiKey => ListKind::ApiKey,
            Kind::Path => ListKind::Path,
        }
    }
}

#[derive(Subcommand)]
enum ListCommand {
    List,
    /// Adds an entry: an address or network, a user, an API key (hashed here unless given
    /// as its 64 hex digits), a path glob.
    Add {
        #[arg(value_enum)]
        kind: Kind,
        value: String,
        /// The entry stops applying after this long (`10m`, `1h`, `1d`).
        #[arg(long, conflicts_with = "expires_at")]
        expires_in: Option<String>,
        /// The entry stops applying at this time (RFC 3339).
        #[arg(long)]
        expires_at: Option<String>,
        #[arg(long)]
        reason: Option<String>,
    },
    /// Removes the entry with this id (`list` shows them).
    Remove {
        id: String,
    },
}

#[derive(Args)]
struct Whose {
    /// How the client is counted: ip, user, api_key, header or tier.
    #[arg(long)]
    kind: Option<String>,
    #[arg(long)]
    value: Option<String>,
    /// The client's tier, for rules that count by tier.
    #[arg(long)]
    tier: Option<String>,
    #[arg(long)]
    rule: Option<String>,
}

#[derive(Subcommand)]
enum CountersCommand {
    Show {
        #[command(flatten)]
        whose: Whose,
    },
    /// Resets a client's counters (--kind, --value), a rule's (--rule), or all (--all).
    Reset {
        #[command(flatten)]
        whose: Whose,
        #[arg(long)]
        all: bool,
    },
}

#[derive(Subcommand)]
enum StateCommand {
    Get,
    /// Sets the state and pins it (the automatic signal no longer changes it).
    Set {
        #[arg(value_parser = ["NORMAL", "DEGRADED"])]
        state: String,
    },
    /// Hands the state back to the automatic signal.
    Auto,
}

#[derive(Clone, Copy, ValueEnum)]
enum Format {
    Toml,
    Yaml,
    Json,
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// Writes the configuration (to standard output, or FILE).
    Export {
        #[arg(long, value_enum, default_value = "toml")]
        format: Format,
        #[arg(long)]
        output: Option<PathBuf>,
    },
    /// Replaces the whole configuration with FILE (.toml, .yaml or .json), all or nothing.
    Import { file: PathBuf },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let client = Client::new(&cli.url, cli.token.clone(), cli.if_match);
    match run(&cli, &client) {
        Ok(text) => {
            print!("{text}");
            ExitCode::SUCCESS
        }
        Err(Failure(message)) => {
            eprintln!("sluice: {message}");
            ExitCode::FAILURE
        }
    }
}

fn pretty(value: &str) -> String {
    serde_json::from_str::<Value>(value)
        .ok()
        .and_then(|v| serde_json::to_string_pretty(&v).ok())
        .map_or_else(|| value.to_owned(), |text| text + "\n")
}

/// The digest a key is known by: the argument itself when it is one, else its SHA-256.
fn digest_of(key_or_digest: &str) -> String {
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

fn read(path: &Path) -> Result<String, Failure> {
    std::fs::read_to_string(path)
        .map_err(|e| Failure(format!("cannot read {}: {e}", path.display())))
}

fn run(cli: &Cli, client: &Client) -> Result<String, Failure> {
    let as_json = cli.json;
    let out = |answer: client::Answer, table: &dyn Fn(&str) -> Result<String, Failure>| {
        if as_json {
            Ok(pretty(&answer.body))
        } else {
            table(&answer.body)
        }
    };
    match &cli.command {
        Command::Status => {
            let version: VersionBody = client.get("/version")?.json()?;
            let operations: Operations = client.get("/state")?.json()?;
            let who: WhoAmIBody = client.get("/whoami")?.json()?;
            if as_json {
                return Ok(pretty(
                    &json!({ "version": version.version, "state": operations, "whoami": who })
                        .to_string(),
                ));
            }
            Ok(format!(
                "version  {}\nstate    {}\nenforce  {}\ntoken    {} ({:?})\n",
                version.version,
                state_line(&operations),
                enforcement_line(operations.enforce, &operations.unenforced_rules),
                who.name,
                who.role
            ))
        }
        Command::Rules(command) => rules(client, command, &out),
        Command::Tiers(command) => tiers(client, command, &out),
        Command::Keys(command) => keys(client, command, &out),
        Command::Allow(command) => list(client, "safelist", command, &out),
        Command::Deny(command) => list(client, "denylist", command, &out),
        Command::Counters(command) => counters(client, command, &out),
        Command::Protection(ProtectionCommand::Blocks) => {
            out(client.get("/protection/blocks")?, &|body| {
                let blocks: BlocksBody = parse(body)?;
                let rows: Vec<Vec<String>> = blocks
                    .blocks
                    .iter()
                    .map(|block| vec![block.ip.clone(), block.until.clone()])
                    .collect();
                Ok(render(&["IP", "UNTIL"], &rows))
            })
        }
        Command::Protection(ProtectionCommand::Lift { ip }) => {
            let answer = client.delete(&format!("/protection/blocks/{}", encode(ip)))?;
            out(answer, &|_| Ok(format!("block of {ip} lifted\n")))
        }
        Command::State(command) => {
            let answer = match command {
                StateCommand::Get => client.get("/state")?,
                StateCommand::Set { state } => {
                    client.json("PUT", "/state", &json!({ "state": state }))?
                }
                StateCommand::Auto => {
                    client.json("PUT", "/state", &json!({ "automatic": true }))?
                }
            };
            out(answer, &|body| {
                let operations: Operations = parse(body)?;
                Ok(format!("{}\n", state_line(&operations)))
            })
        }
        Command::Enforce { switch, rule } => {
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
            out(answer, &|body| {
                let status: EnforcementStatus = parse(body)?;
                Ok(format!(
                    "{}\n",
                    enforcement_line(status.enforce, &status.unenforced_rules)
                ))
            })
        }
        Command::Block {
            kind,
            value,
            duration,
            reason,
        } => {
            let command = ListCommand::Add {
                kind: *kind,
                value: value.clone(),
                expires_in: Some(duration.clone()),
                expires_at: None,
                reason: reason.clone(),
            };
            list(client, "denylist", &command, &out)
        }
        Command::Config(ConfigCommand::Export { format, output }) => {
            let name = match format {
                Format::Toml => "toml",
                Format::Yaml => "yaml",
                Format::Json => "json",
            };
            let answer = client.get(&format!("/config?format={name}"))?;
            match output {
                Some(path) => {
                    std::fs::write(path, &answer.body)
                        .map_err(|e| Failure(format!("cannot write {}: {e}", path.display())))?;
                    Ok(format!(
                        "wrote version {} to {}\n",
                        or_dash(answer.version),
                        path.display()
                    ))
                }
                None => Ok(answer.body),
            }
        }
        Command::Config(ConfigCommand::Import { file }) => {
            let content_type = match file.extension().and_then(|e| e.to_str()) {
                Some("toml") => "application/toml",
                Some("yaml" | "yml") => "application/yaml",
                Some("json") => "application/json",
                _ => {
                    return Err(Failure(format!(
                        "{}: use a .toml, .yaml or .json file",
                        file.display()
                    )))
                }
            };
            let answer = client.send("PUT", "/config", Some((content_type, read(file)?)))?;
            out(answer, &|body| {
                let version: VersionBody =
                    serde_json::from_str(body).map_err(|e| Failure(e.to_string()))?;
                Ok(format!("imported as version {}\n", version.version))
            })
        }
        Command::Audit { limit } => {
            let answer = client.get(&format!("/audit?limit={limit}"))?;
            out(answer, &|body| {
                let audit: AuditBody =
                    serde_json::from_str(body).map_err(|e| Failure(e.to_string()))?;
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
    }
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

type Out<'a> = dyn Fn(client::Answer, &dyn Fn(&str) -> Result<String, Failure>) -> Result<String, Failure>
    + 'a;

fn parse<T: serde::de::DeserializeOwned>(body: &str) -> Result<T, Failure> {
    serde_json::from_str(body)
        .map_err(|e| Failure(format!("the controller's answer does not read: {e}")))
}

fn rule_row(rule: &Rule) -> Vec<String> {
    let window = rule
        .window
        .map(|w| sluice_protocol::duration::format_millis(w.millis()))
        .unwrap_or_else(|| "-".to_owned());
    let matcher = serde_json::to_string(&rule.matcher).unwrap_or_default();
    vec![
        rule.name.clone(),
        rule.strategy.as_str().to_owned(),
        format!("{:?}", rule.scope).to_ascii_lowercase(),
        rule.limit.to_string(),
        window,
        if rule.tier_limits { "yes" } else { "-" }.to_owned(),
        if matcher == "{}" {
            "-".to_owned()
        } else {
            matcher
        },
    ]
}

fn rules(client: &Client, command: &RulesCommand, out: &Out<'_>) -> Result<String, Failure> {
    let table = |body: &str| -> Result<String, Failure> {
        let rules: Vec<Rule> = match serde_json::from_str::<Vec<Rule>>(body) {
            Ok(rules) => rules,
            Err(_) => vec![parse::<Rule>(body)?],
        };
        let rows: Vec<Vec<String>> = rules.iter().map(rule_row).collect();
        Ok(render(
            &[
                "NAME", "STRATEGY", "SCOPE", "LIMIT", "WINDOW", "BY TIER", "MATCH",
            ],
            &rows,
        ))
    };
    match command {
        RulesCommand::List => out(client.get("/rules")?, &table),
        RulesCommand::Get { name } => out(client.get(&format!("/rules/{}", encode(name)))?, &table),
        RulesCommand::Apply { file } => {
            let text = read(file)?;
            let rule: Rule = if file.extension().and_then(|e| e.to_str()) == Some("json") {
                serde_json::from_str(&text)
                    .map_err(|e| Failure(format!("{}: {e}", file.display())))?
            } else {
                toml::from_str(&text).map_err(|e| Failure(format!("{}: {e}", file.display())))?
            };
            let body = serde_json::to_value(&rule).map_err(|e| Failure(e.to_string()))?;
            let exists = client
                .get(&format!("/rules/{}", encode(&rule.name)))
                .is_ok();
            let answer = if exists {
                client.json("PUT", &format!("/rules/{}", encode(&rule.name)), &body)?
            } else {
                client.json("POST", "/rules", &body)?
            };
            let version = answer.version;
            out(answer, &|_| {
                Ok(format!(
                    "rule {} {} (version {})\n",
                    rule.name,
                    if exists { "replaced" } else { "created" },
                    or_dash(version)
                ))
            })
        }
        RulesCommand::Delete { name } => {
            let answer = client.delete(&format!("/rules/{}", encode(name)))?;
            let version = answer.version;
            out(answer, &|_| {
                Ok(format!(
                    "rule {name} deleted (version {})\n",
                    or_dash(version)
                ))
            })
        }
    }
}

fn tiers(client: &Client, command: &TiersCommand, out: &Out<'_>) -> Result<String, Failure> {
    let table = |body: &str| -> Result<String, Failure> {
        let tiers: Vec<Tier> = match serde_json::from_str::<Vec<Tier>>(body) {
            Ok(tiers) => tiers,
            Err(_) => vec![parse::<Tier>(body)?],
        };
        let rows: Vec<Vec<String>> = tiers
            .iter()
            .map(|t| {
                vec![
                    t.name.clone(),
                    t.limit.to_string(),
                    or_dash(
                        t.window
                            .map(|w| sluice_protocol::duration::format_millis(w.millis())),
                    ),
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
        Ok(render(
            &[
                "NAME",
                "LIMIT",
                "WINDOW",
                "BURST",
                "DEGRADED",
                "DESCRIPTION",
            ],
            &rows,
        ))
    };
    match command {
        TiersCommand::List => out(client.get("/tiers")?, &table),
        TiersCommand::Get { name } => out(client.get(&format!("/tiers/{}", encode(name)))?, &table),
        TiersCommand::Set {
            name,
            limit,
            window,
            burst,
            description,
            degraded_limit,
            degraded_window,
            degraded_burst,
        } => {
            let mut body = json!({ "name": name, "limit": limit });
            if let Some(limit) = degraded_limit {
                let mut degraded = json!({ "limit": limit });
                if let Some(window) = degraded_window {
                    degraded["window"] = json!(window);
                }
                if let Some(burst) = degraded_burst {
                    degraded["burst"] = json!(burst);
                }
                body["degraded"] = degraded;
            }
            if let Some(window) = window {
                body["window"] = json!(window);
            }
            if let Some(burst) = burst {
                body["burst"] = json!(burst);
            }
            if let Some(description) = description {
                body["description"] = json!(description);
            }
            let path = format!("/tiers/{}", encode(name));
            let answer = if client.get(&path).is_ok() {
                client.json("PUT", &path, &body)?
            } else {
                client.json("POST", "/tiers", &body)?
            };
            out(answer, &table)
        }
        TiersCommand::Delete { name } => {
            let answer = client.delete(&format!("/tiers/{}", encode(name)))?;
            let version = answer.version;
            out(answer, &|_| {
                Ok(format!(
                    "tier {name} deleted (version {})\n",
                    or_dash(version)
                ))
            })
        }
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

fn keys(client: &Client, command: &KeysCommand, out: &Out<'_>) -> Result<String, Failure> {
    let grant_body =
        |grant: &Grant| json!({ "user": grant.user, "tier": grant.tier, "name": grant.name });
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
    match command {
        KeysCommand::List => out(client.get("/api-keys")?, &|body| {
            Ok(render(&KEY_HEADER, &key_rows(&parse::<Vec<ApiKey>>(body)?)))
        }),
        KeysCommand::Create { grant } => out(
            client.json("POST", "/api-keys", &grant_body(grant))?,
            &created,
        ),
        KeysCommand::Register {
            key_or_sha256,
            grant,
        } => {
            let mut body = grant_body(grant);
            body["sha256"] = json!(digest_of(key_or_sha256));
            out(client.json("POST", "/api-keys", &body)?, &created)
        }
        KeysCommand::Update { sha256, grant } => out(
            client.json(
                "PUT",
                &format!("/api-keys/{}", encode(&digest_of(sha256))),
                &grant_body(grant),
            )?,
            &|body| Ok(render(&KEY_HEADER, &key_rows(&[parse::<ApiKey>(body)?]))),
        ),
        KeysCommand::Delete { sha256 } => {
            let answer = client.delete(&format!("/api-keys/{}", encode(&digest_of(sha256))))?;
            let version = answer.version;
            out(answer, &|_| {
                Ok(format!("key deleted (version {})\n", or_dash(version)))
            })
        }
    }
}

fn list(
    client: &Client,
    list: &str,
    command: &ListCommand,
    out: &Out<'_>,
) -> Result<String, Failure> {
    let rows = |entries: &[ListEntryBody]| -> Vec<Vec<String>> {
        entries
            .iter()
            .map(|e| {
                vec![
                    e.id.clone(),
                    e.entry.kind.as_str().to_owned(),
                    e.entry.value.clone(),
                    or_dash(e.entry.expires_at.clone()),
                    or_dash(e.entry.reason.clone()),
                ]
            })
            .collect()
    };
    let header = ["ID", "KIND", "VALUE", "EXPIRES", "REASON"];
    match command {
        ListCommand::List => out(client.get(&format!("/lists/{list}"))?, &|body| {
            Ok(render(&header, &rows(&parse::<Vec<ListEntryBody>>(body)?)))
        }),
        ListCommand::Add {
            kind,
            value,
            expires_in,
            expires_at,
            reason,
        } => {
            let value = match kind {
                Kind::ApiKey => digest_of(value),
                _ => value.clone(),
            };
            let body = json!({
                "kind": kind.list_kind(), "value": value, "expires_in": expires_in,
                "expires_at": expires_at, "reason": reason,
            });
            let body = strip_nulls(body);
            out(
                client.json("POST", &format!("/lists/{list}"), &body)?,
                &|body| Ok(render(&header, &rows(&[parse::<ListEntryBody>(body)?]))),
            )
        }
        ListCommand::Remove { id } => {
            let answer = client.delete(&format!("/lists/{list}/{}", encode(id)))?;
            let version = answer.version;
            out(answer, &|_| {
                Ok(format!(
                    "{list} entry {id} removed (version {})\n",
                    or_dash(version)
                ))
            })
        }
    }
}

fn strip_nulls(value: Value) -> Value {
    match value {
        Value::Object(map) => {
            Value::Object(map.into_iter().filter(|(_, v)| !v.is_null()).collect())
        }
        other => other,
    }
}

fn whose_query(whose: &Whose, all: bool) -> String {
    let mut parts = Vec::new();
    for (name, value) in [
        ("kind", &whose.kind),
        ("value", &whose.value),
        ("tier", &whose.tier),
        ("rule", &whose.rule),
    ] {
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

fn counters(client: &Client, command: &CountersCommand, out: &Out<'_>) -> Result<String, Failure> {
    match command {
        CountersCommand::Show { whose } => {
            let answer = client.get(&format!("/counters{}", whose_query(whose, false)))?;
            out(answer, &|body| {
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
            out(answer, &|body| {
                let reset: ResetBody = parse(body)?;
                Ok(format!("{} counters reset\n", reset.reset))
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn queries_are_encoded() {
        let whose = Whose {
            kind: Some("ip".into()),
            value: Some("2001:db8::1".into()),
            tier: None,
            rule: Some("per client".into()),
        };
        assert_eq!(
            whose_query(&whose, false),
            "?kind=ip&value=2001%3Adb8%3A%3A1&rule=per%20client"
        );
    }
}
