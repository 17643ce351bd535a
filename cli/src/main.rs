//! `sluice`: the common tasks of the admin API from a shell. Tables for people, `--json` for
//! scripts (the API's own bodies). The exit statuses are in [`exit`]: 0 done, 1 refused or
//! invalid, 2 usage, 3 differences (`config diff`).
//!
//! - [`args`]: the command line, every command with its help and examples;
//! - [`client`]: the admin API over HTTP; [`merge`]: changes of some fields that keep the
//!   others (read, change, write back with `If-Match`, retry);
//! - [`entities`] (rules, tiers, keys), [`lists`] (allow, deny, block, unblock),
//!   [`operations`] (status, state, enforcement, counters, audit), [`observe`] (top, watch,
//!   hints), [`gitops`] (export, import, validate, diff): the commands;
//! - [`rulefile`], [`diff`], [`table`]: pure parts, unit-tested.

mod args;
mod client;
mod diff;
mod entities;
mod exit;
mod gitops;
mod lists;
mod merge;
mod observe;
mod operations;
mod rulefile;
mod table;

use std::io::Write;
use std::process::ExitCode;

use clap::{CommandFactory, Parser};
use serde_json::Value;

use args::{Cli, Command};
use client::{Answer, Client};
use exit::{Done, Failure};

fn main() -> ExitCode {
    let cli = Cli::parse();
    let client = Client::new(&cli.url, cli.token.clone(), cli.if_match);
    let context = Context {
        client: &client,
        json: cli.json,
    };
    let (text, code) = match run(&cli.command, &context) {
        Ok(done) => (done.text, done.code),
        Err(failure) => {
            eprintln!("sluice: {failure}");
            (String::new(), failure.code)
        }
    };
    let mut stdout = std::io::stdout().lock();
    // A closed pipe (`sluice … | head`) is not an error of the command's.
    let _ = stdout.write_all(text.as_bytes());
    let _ = stdout.flush();
    ExitCode::from(code)
}

/// What every command is given: the controller, and whether to print JSON.
pub struct Context<'a> {
    pub client: &'a Client,
    pub json: bool,
}

impl Context<'_> {
    /// The answer as the API's JSON (`--json`), or as `table` renders it.
    pub fn show(
        &self,
        answer: &Answer,
        table: impl FnOnce(&str) -> Result<String, Failure>,
    ) -> Result<Done, Failure> {
        if self.json {
            Ok(Done::ok(pretty(&answer.body)))
        } else {
            table(&answer.body).map(Done::ok)
        }
    }
}

/// JSON indented for people; anything else as it came.
pub fn pretty(body: &str) -> String {
    serde_json::from_str::<Value>(body)
        .ok()
        .and_then(|v| serde_json::to_string_pretty(&v).ok())
        .map_or_else(|| body.to_owned(), |text| text + "\n")
}

fn run(command: &Command, context: &Context<'_>) -> Result<Done, Failure> {
    match command {
        Command::Status => operations::status(context),
        Command::Top(top) => observe::top(context, top),
        Command::Watch(watch) => observe::watch(context, watch),
        Command::Hints(window) => observe::hints(context, &window.window),
        Command::Rules(command) => entities::rules(context, command),
        Command::Tiers(command) => entities::tiers(context, command),
        Command::Keys(command) => entities::keys(context, command),
        Command::Allow(command) => lists::list(context, "safelist", command),
        Command::Deny(command) => lists::list(context, "denylist", command),
        Command::Block {
            kind,
            value,
            duration,
            reason,
        } => lists::block(context, *kind, value, duration, reason.as_deref()),
        Command::Unblock { ip } => lists::unblock(context, ip),
        Command::Protection(command) => lists::protection(context, command),
        Command::Counters(command) => operations::counters(context, command),
        Command::State(command) => operations::state(context, command),
        Command::Enforce { switch, rule } => {
            operations::enforce(context, switch.as_deref(), rule.as_deref())
        }
        Command::Audit { limit } => operations::audit(context, *limit),
        Command::Config(command) => gitops::config(context, command),
        Command::Completions { shell } => {
            let mut text = Vec::new();
            clap_complete::generate(*shell, &mut Cli::command(), "sluice", &mut text);
            Ok(Done::ok(String::from_utf8_lossy(&text).into_owned()))
        }
    }
}
