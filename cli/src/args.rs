//! The command line: every command with what it does and an example (`sluice help <command>`
//! shows them; a unit test holds every command to having both). Words on the command line
//! are kebab-case (`api-key`); the configuration's own spelling (`api_key`) is taken too.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};
use sluice_protocol::config::ListKind;

#[derive(Parser)]
#[command(
    name = "sluice",
    version,
    about = "Operate a Sluice controller through its admin API",
    long_about = "Operate a Sluice controller through its admin API: limits, keys, lists, the \
                  system state, stats, and the configuration as files hold it.\n\n\
                  Tables for people, --json for scripts (the API's own bodies). A change that \
                  touches some fields of a tier or a key keeps the others: the CLI reads the \
                  object, changes what it was given, and writes it back with If-Match, reading \
                  again if another change got in first.",
    after_help = "Examples:
  export SLUICE_ADMIN_URL=http://controller:8082 SLUICE_ADMIN_TOKEN=…
  sluice status
  sluice tiers set pro --limit 200
  sluice top
  sluice config validate sluice.toml && sluice config diff sluice.toml

Exit status:
  0  done (config validate: every file valid; config diff: no difference)
  1  the controller refused (its error printed as `status: field: message`), or could not be
     reached, or a file is invalid (`file: field: message`)
  2  usage error (unknown command or flag, bad value, a file that cannot be read)
  3  config diff: applying the file would change the live configuration"
)]
pub struct Cli {
    /// The controller's admin address.
    #[arg(
        long,
        env = "SLUICE_ADMIN_URL",
        default_value = "http://127.0.0.1:8082",
        global = true
    )]
    pub url: String,
    /// A token of the controller's (`read` to look, `admin` to change).
    #[arg(
        long,
        env = "SLUICE_ADMIN_TOKEN",
        hide_env_values = true,
        global = true
    )]
    pub token: Option<String>,
    /// Print the API's JSON instead of tables.
    #[arg(long, global = true)]
    pub json: bool,
    /// Make a change only if the configuration is still at this version (else 409, and no
    /// retry).
    #[arg(long, global = true, value_name = "VERSION")]
    pub if_match: Option<u64>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// The controller's software version, the configuration's version, the system state,
    /// and who the token is.
    #[command(
        long_about = "The controller's software version (`GET /v1/admin/build`; an older \
                      controller that does not say is shown as unknown), the configuration's \
                      version (it grows by one with every change), the system state, the \
                      emergency switch, and the token's name and role.",
        after_help = "Examples:
  sluice status
  sluice status --json | jq .configuration_version"
    )]
    Status,
    /// What the limiter does now: decisions per rule and tier, the top clients (refreshing).
    #[command(
        long_about = "What the limiter did over the last minute (or hour), over every \
                      controller that shares the store: decisions per rule and per tier, and \
                      the clients limited and asking most. Redraws every --interval until \
                      interrupted (Ctrl-C); --once prints one table and exits, for scripts.",
        after_help = "Examples:
  sluice top
  sluice top --window 1h --top 20
  sluice top --once --json | jq '.rules[] | select(.limited > 0)'"
    )]
    Top(Top),
    /// The stats stream: one line a second, as the controller sends it, until interrupted.
    #[command(
        long_about = "The controller's stats stream (`/v1/admin/stats/stream`, server-sent \
                      events, about one a second), one line per event: when, the \
                      configuration's version, the system state, the decisions since the line \
                      before, and per rule. Until interrupted (Ctrl-C), or --count events; \
                      --json prints each event's JSON on one line.",
        after_help = "Examples:
  sluice watch
  sluice watch --count 10 --json > stats.ndjson"
    )]
    Watch(Watch),
    /// Rules whose limits may need a look (too strict, too generous), with the figures.
    #[command(after_help = "Examples:
  sluice hints
  sluice hints --window 1h")]
    Hints(Window),
    /// Rules: which requests a limit applies to, whom it counts, and how.
    #[command(
        subcommand,
        after_help = "Examples:
  sluice rules list
  sluice rules get per-client --format toml > per-client.toml
  sluice rules apply examples/rules/login-brute-force.toml
  sluice rules delete old-rule"
    )]
    Rules(RulesCommand),
    /// Tiers: named limits that clients belong to.
    #[command(
        subcommand,
        after_help = "Examples:
  sluice tiers list
  sluice tiers set pro --limit 200          # keeps pro's window, burst and DEGRADED limits
  sluice tiers set free --degraded-limit 2 --degraded-window 1m"
    )]
    Tiers(TiersCommand),
    /// API keys, by the SHA-256 of the key.
    #[command(
        subcommand,
        after_help = "Examples:
  sluice keys create --user acme --tier pro --name \"acme production\"
  sluice keys update <sha256> --tier enterprise   # keeps the key's user and name
  sluice keys list"
    )]
    Keys(KeysCommand),
    /// The safelist: requests that skip the limiter.
    #[command(
        subcommand,
        after_help = "Examples:
  sluice allow add path '/public/**'
  sluice allow add ip 10.0.0.0/8 --reason \"internal\"
  sluice allow list"
    )]
    Allow(ListCommand),
    /// The denylist: requests refused with 403.
    #[command(
        subcommand,
        after_help = "Examples:
  sluice deny add ip 203.0.113.0/24 --expires-in 1h --reason scraping
  sluice deny add api-key sk_…          # hashed here: the key itself is never sent
  sluice deny list
  sluice deny remove <id>"
    )]
    Deny(ListCommand),
    /// Counters: where a client stands, and resets.
    #[command(
        subcommand,
        after_help = "Examples:
  sluice counters show --kind ip --value 203.0.113.9
  sluice counters reset --kind api-key --value <sha256>
  sluice counters reset --rule per-client"
    )]
    Counters(CountersCommand),
    /// The system state (NORMAL or DEGRADED), set by hand or left to the signal.
    #[command(
        subcommand,
        after_help = "Examples:
  sluice state get
  sluice state set DEGRADED     # and pins it
  sluice state auto             # hands it back to the automatic signal"
    )]
    State(StateCommand),
    /// The emergency switch: `off` lets everything through, still counted.
    #[command(
        long_about = "The emergency switch: `off` lets everything through (every rule, or \
                      --rule's), still counted and reported as would-be-limited; `on` enforces \
                      again. Without on or off: where the switch stands.",
        after_help = "Examples:
  sluice enforce                 # where it stands
  sluice enforce off             # the big red button
  sluice enforce off --rule login
  sluice enforce on"
    )]
    Enforce {
        /// `on` or `off`; without it, where the switch stands.
        #[arg(value_parser = ["on", "off"])]
        switch: Option<String>,
        /// Switch one rule only.
        #[arg(long)]
        rule: Option<String>,
    },
    /// Blocks a client now: denylists it (403) for a while.
    #[command(
        long_about = "Blocks a client now: a denylist entry (403 within about 2 s) that \
                      expires after --for. `sluice unblock IP` ends it early.",
        after_help = "Examples:
  sluice block ip 203.0.113.9 --for 10m --reason \"incident 42\"
  sluice block user mallory --for 1d"
    )]
    Block {
        /// What the value is: ip, user, api-key or path.
        #[arg(value_enum)]
        kind: Kind,
        /// The address or network, user, API key (hashed here) or path glob.
        value: String,
        /// How long (`10m`, `1h`, `1d`).
        #[arg(long = "for", default_value = "1h")]
        duration: String,
        /// Why, for the audit log and the next operator.
        #[arg(long)]
        reason: Option<String>,
    },
    /// Unblocks an address: lifts brute-force protection's block and removes its denylist
    /// entry.
    #[command(
        long_about = "Unblocks an address now: lifts brute-force protection's block of it \
                      (`DELETE /v1/admin/protection/blocks/{ip}`) and removes the denylist \
                      entries for that address alone (as `sluice block ip` makes them). \
                      Entries for a network that contains it stay (`sluice deny remove ID`). \
                      Refused (1) when nothing blocked it.",
        after_help = "Examples:
  sluice unblock 198.51.100.4
  sluice unblock 2001:db8::7"
    )]
    Unblock {
        /// The address (`198.51.100.4`, `2001:db8::7`; `/32` or `/128` may follow).
        ip: String,
    },
    /// Brute-force protection's blocks: the addresses blocked now, and lifting one.
    #[command(
        subcommand,
        after_help = "Examples:
  sluice protection blocks
  sluice unblock 198.51.100.4     # lifts the block (and any denylist entry for it)"
    )]
    Protection(ProtectionCommand),
    /// The whole configuration: export, import, and the GitOps gate (validate, diff).
    #[command(
        subcommand,
        after_help = "Examples:
  sluice config export --format yaml --output sluice.yaml
  sluice config validate sluice.yaml        # offline: no controller needed
  sluice config diff sluice.yaml            # exit 3 when it would change something
  sluice config import sluice.yaml

In CI:
  sluice config validate config/*.toml                   # every pull request; no controller
  sluice config diff config/prod.toml || [ $? -eq 3 ]    # show the change; fail on 1 or 2"
    )]
    Config(ConfigCommand),
    /// The newest changes, newest first: who, what, when, and the versions.
    #[command(after_help = "Examples:
  sluice audit
  sluice audit --limit 5 --json")]
    Audit {
        /// How many entries.
        #[arg(long, default_value_t = 20)]
        limit: usize,
    },
    /// Shell completions, for bash, zsh or fish (and elvish, powershell).
    #[command(after_help = "Examples:
  sluice completions bash > /etc/bash_completion.d/sluice
  sluice completions zsh > \"${fpath[1]}/_sluice\"
  sluice completions fish > ~/.config/fish/completions/sluice.fish")]
    Completions {
        /// The shell to write completions for.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
}

#[derive(Args)]
pub struct Window {
    /// The stats' window: `1m` (in 10 s buckets) or `1h` (in minutes).
    #[arg(long, value_parser = ["1m", "1h"], default_value = "1m")]
    pub window: String,
}

#[derive(Args)]
pub struct Top {
    #[command(flatten)]
    pub window: Window,
    /// How many clients in each top list (at most 64).
    #[arg(long, default_value_t = 10)]
    pub top: usize,
    /// How often the table is redrawn (`2s`, `500ms`, `1m`).
    #[arg(long, default_value = "2s", value_parser = parse_interval)]
    pub interval: std::time::Duration,
    /// Print the table once and exit (for scripts).
    #[arg(long)]
    pub once: bool,
}

#[derive(Args)]
pub struct Watch {
    #[command(flatten)]
    pub window: Window,
    /// How many clients in each event's top lists (at most 64).
    #[arg(long, default_value_t = 10)]
    pub top: usize,
    /// Stop after this many events (default: until interrupted).
    #[arg(long)]
    pub count: Option<u64>,
}

fn parse_interval(text: &str) -> Result<std::time::Duration, String> {
    let millis = sluice_protocol::duration::parse_millis(text).map_err(|e| e.to_string())?;
    if millis < 100 {
        return Err("at least 100ms".to_owned());
    }
    Ok(std::time::Duration::from_millis(millis))
}

#[derive(Clone, Copy, ValueEnum)]
pub enum FileFormat {
    Toml,
    Yaml,
    Json,
}

impl FileFormat {
    pub fn name(self) -> &'static str {
        match self {
            FileFormat::Toml => "toml",
            FileFormat::Yaml => "yaml",
            FileFormat::Json => "json",
        }
    }
}

#[derive(Subcommand)]
pub enum RulesCommand {
    /// Every rule, in the order they apply.
    #[command(after_help = "Examples:
  sluice rules list
  sluice rules list --json")]
    List,
    /// One rule: as a table, or (--format) as a file `rules apply` takes back.
    #[command(after_help = "Examples:
  sluice rules get per-client
  sluice rules get per-client --format toml > per-client.toml   # edit, then `rules apply` it")]
    Get {
        /// The rule's name.
        name: String,
        /// Print the rule as a rule file (toml, yaml or json) instead of a table.
        #[arg(long, value_enum)]
        format: Option<FileFormat>,
    },
    /// Creates or replaces rules from a file: one rule, or a list of them.
    #[command(
        long_about = "Creates the rules in FILE, or replaces those of the same name. FILE \
                      (.toml, .yaml/.yml or .json) holds either one rule, its fields at the top:

    name = \"login\"
    strategy = \"sliding_window_log\"
    limit = 5
    window = \"1m\"
    match = { path = \"/login\", methods = [\"POST\"] }

or a list of rules, as a configuration file holds them (`[[rules]]` tables in TOML, \
`rules:` in YAML, {\"rules\": [...]} or [...] in JSON). One rule is created or replaced \
through its own route (its errors name its fields: `window`); a list is applied as one \
version, all or nothing, through the configuration's import with If-Match (audited as \
config.import; errors name the rule in the file: `rules[1].window`). Rules are \
checked with the controller's own validation before anything is sent. A file with other \
sections (tiers, api_keys, lists) is refused: that is a whole configuration, for \
`sluice config import`. `sluice rules get NAME --format toml` writes a rule in this format; \
examples/rules/ has more.",
        after_help = "Examples:
  sluice rules apply examples/rules/login-brute-force.toml
  sluice rules apply examples/rules/api-tiers.yaml
  sluice rules get per-client --format toml > r.toml && $EDITOR r.toml && sluice rules apply r.toml"
    )]
    Apply {
        /// The rule file (.toml, .yaml, .yml or .json).
        file: PathBuf,
    },
    /// Deletes a rule.
    #[command(after_help = "Examples:
  sluice rules delete old-rule")]
    Delete {
        /// The rule's name.
        name: String,
    },
}

/// The fields of a tier `tiers set` changes; the others keep their values.
#[derive(Args)]
#[group(id = "change", required = true, multiple = true)]
pub struct TierChange {
    /// Requests per window (in flight, for a `concurrency` rule). Needed to create a tier.
    #[arg(long)]
    pub limit: Option<u64>,
    /// The tier's window (`1m`, `1h`; default: the rule's own).
    #[arg(long)]
    pub window: Option<String>,
    /// Requests that may come at once (token_bucket and gcra rules).
    #[arg(long)]
    pub burst: Option<u64>,
    /// A sentence for people.
    #[arg(long)]
    pub description: Option<String>,
    /// The limit while the system is DEGRADED.
    #[arg(long)]
    pub degraded_limit: Option<u64>,
    /// The window while DEGRADED.
    #[arg(long)]
    pub degraded_window: Option<String>,
    /// The burst while DEGRADED.
    #[arg(long)]
    pub degraded_burst: Option<u64>,
    /// Removes a field (applied before the values given): window, burst, description,
    /// degraded (all DEGRADED limits), degraded-window, degraded-burst.
    #[arg(long, value_enum, value_name = "FIELD")]
    pub unset: Vec<TierField>,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum TierField {
    Window,
    Burst,
    Description,
    Degraded,
    DegradedWindow,
    DegradedBurst,
}

#[derive(Subcommand)]
pub enum TiersCommand {
    /// Every tier, with its limits in each state.
    #[command(after_help = "Examples:
  sluice tiers list")]
    List,
    /// One tier.
    #[command(after_help = "Examples:
  sluice tiers get pro")]
    Get {
        /// The tier's name.
        name: String,
    },
    /// Creates a tier, or changes the fields given of an existing one (the others stay).
    #[command(
        long_about = "Creates the tier (--limit needed), or changes only the fields given of \
                      the existing one: its other fields, its DEGRADED limits among them, stay \
                      as they are. Read, changed and written back with If-Match; read again \
                      and retried if another change got in first. --unset removes a field.",
        after_help = "Examples:
  sluice tiers set pro --limit 100 --window 1m --burst 150
  sluice tiers set pro --limit 200                  # window, burst, DEGRADED limits stay
  sluice tiers set free --degraded-limit 2 --degraded-window 1m
  sluice tiers set free --unset degraded            # the same limits in every state"
    )]
    #[command(
        override_usage = "sluice tiers set <NAME> [--limit N] [--window W] [--burst N] \
                          [--description TEXT] [--degraded-limit N] [--degraded-window W] \
                          [--degraded-burst N] [--unset FIELD]...  (at least one)"
    )]
    Set {
        /// The tier's name (`[A-Za-z0-9_-]`).
        name: String,
        #[command(flatten)]
        change: TierChange,
    },
    /// Deletes a tier.
    #[command(after_help = "Examples:
  sluice tiers delete gold")]
    Delete {
        /// The tier's name.
        name: String,
    },
}

#[derive(Args)]
pub struct Grant {
    /// The user the key counts as.
    #[arg(long)]
    pub user: Option<String>,
    /// The key's tier.
    #[arg(long)]
    pub tier: Option<String>,
    /// A label for people.
    #[arg(long)]
    pub name: Option<String>,
}

/// What `keys update` changes; the rest of the key stays.
#[derive(Args)]
#[group(id = "grant-change", required = true, multiple = true)]
pub struct GrantChange {
    /// The user the key counts as.
    #[arg(long)]
    pub user: Option<String>,
    /// The key's tier.
    #[arg(long)]
    pub tier: Option<String>,
    /// A label for people.
    #[arg(long)]
    pub name: Option<String>,
    /// Removes a field (applied before the values given): user, tier or name.
    #[arg(long, value_enum, value_name = "FIELD")]
    pub unset: Vec<GrantField>,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum GrantField {
    User,
    Tier,
    Name,
}

impl GrantField {
    pub fn key(self) -> &'static str {
        match self {
            GrantField::User => "user",
            GrantField::Tier => "tier",
            GrantField::Name => "name",
        }
    }
}

#[derive(Subcommand)]
pub enum KeysCommand {
    /// Every key, by its digest.
    #[command(after_help = "Examples:
  sluice keys list")]
    List,
    /// One key.
    #[command(after_help = "Examples:
  sluice keys get <sha256>
  sluice keys get sk_…        # hashed here")]
    Get {
        /// The key's SHA-256 (64 hex digits), or the key itself (hashed here).
        key_or_sha256: String,
    },
    /// Makes a new key (printed once: store it).
    #[command(after_help = "Examples:
  sluice keys create --user acme --tier pro --name \"acme production\"")]
    Create {
        #[command(flatten)]
        grant: Grant,
    },
    /// Registers a key made elsewhere, by its SHA-256 (or by the key itself, hashed here).
    #[command(after_help = "Examples:
  sluice keys register 9f86d081…0a08 --user acme --tier pro
  sluice keys register sk_live_… --tier free     # hashed here: the key is never sent")]
    Register {
        /// The key's SHA-256 (64 hex digits), or the key itself (hashed here).
        key_or_sha256: String,
        #[command(flatten)]
        grant: Grant,
    },
    /// Changes whom a key stands for: the fields given (the others stay).
    #[command(
        long_about = "Changes the fields given of a key (user, tier, name); the others stay as \
                      they are. Read, changed and written back with If-Match; read again and \
                      retried if another change got in first. --unset removes a field.",
        after_help = "Examples:
  sluice keys update <sha256> --tier enterprise     # the user and name stay
  sluice keys update <sha256> --unset name"
    )]
    #[command(
        override_usage = "sluice keys update <KEY_OR_SHA256> [--user U] [--tier T] [--name N] \
                          [--unset FIELD]...  (at least one)"
    )]
    Update {
        /// The key's SHA-256 (64 hex digits), or the key itself (hashed here).
        key_or_sha256: String,
        #[command(flatten)]
        change: GrantChange,
    },
    /// Deletes a key: requests with it are no longer known by it.
    #[command(after_help = "Examples:
  sluice keys delete <sha256>")]
    Delete {
        /// The key's SHA-256 (64 hex digits), or the key itself (hashed here).
        key_or_sha256: String,
    },
}

/// What a list entry (or a block) matches.
#[derive(Clone, Copy, ValueEnum)]
pub enum Kind {
    /// An address or a network (CIDR).
    Ip,
    /// A user.
    User,
    /// An API key (hashed here unless given as its 64 hex digits).
    #[value(alias = "api_key")]
    ApiKey,
    /// A path glob (`*` within a segment, `**` across).
    Path,
}

impl Kind {
    pub fn list_kind(self) -> ListKind {
        match self {
            Kind::Ip => ListKind::Ip,
            Kind::User => ListKind::User,
            Kind::ApiKey => ListKind::ApiKey,
            Kind::Path => ListKind::Path,
        }
    }
}

#[derive(Subcommand)]
pub enum ListCommand {
    /// Every entry, with its id, expiry and reason.
    #[command(after_help = "Examples:
  sluice deny list
  sluice allow list --json")]
    List,
    /// Adds an entry: an address or network, a user, an API key, a path glob.
    #[command(
        long_about = "Adds an entry: an address or network (ip), a user, an API key (hashed \
                      here unless given as its 64 hex digits: the key itself is never sent), \
                      a path glob (`*` within a segment, `**` across). It applies within about \
                      2 s, until removed or until it expires.",
        after_help = "Examples:
  sluice deny add ip 203.0.113.0/24 --expires-in 1h --reason scraping
  sluice deny add api-key sk_…
  sluice allow add path '/healthz'
  sluice allow add user ops-bot --expires-at 2030-01-01T00:00:00Z"
    )]
    Add {
        /// What the value is: ip, user, api-key or path.
        #[arg(value_enum)]
        kind: Kind,
        /// The address or network, user, API key or path glob.
        value: String,
        /// The entry stops applying after this long (`10m`, `1h`, `1d`).
        #[arg(long, conflicts_with = "expires_at")]
        expires_in: Option<String>,
        /// The entry stops applying at this time (RFC 3339).
        #[arg(long)]
        expires_at: Option<String>,
        /// Why, for the audit log and the next operator.
        #[arg(long)]
        reason: Option<String>,
    },
    /// Removes the entry with this id (`list` shows them).
    #[command(after_help = "Examples:
  sluice deny remove 3f2a9c0d1e4b5a6f
  sluice allow remove 0b1c2d3e4f5a6b7c")]
    Remove {
        /// The entry's id, as `list` shows it.
        id: String,
    },
}

/// How a client is counted, for `counters`.
#[derive(Clone, Copy, ValueEnum)]
pub enum CounterKind {
    Ip,
    User,
    #[value(alias = "api_key")]
    ApiKey,
    Header,
    Tier,
}

impl CounterKind {
    /// As the API names it.
    pub fn api_name(self) -> &'static str {
        match self {
            CounterKind::Ip => "ip",
            CounterKind::User => "user",
            CounterKind::ApiKey => "api_key",
            CounterKind::Header => "header",
            CounterKind::Tier => "tier",
        }
    }
}

#[derive(Args)]
pub struct Whose {
    /// How the client is counted: ip, user, api-key, header or tier.
    #[arg(long, value_enum, requires = "value")]
    pub kind: Option<CounterKind>,
    /// The client: an address, a user, a key's SHA-256 (or the key, hashed here), a
    /// header's value, a tier.
    #[arg(long, requires = "kind")]
    pub value: Option<String>,
    /// The client's tier, for rules that count by tier.
    #[arg(long)]
    pub tier: Option<String>,
    /// One rule only.
    #[arg(long)]
    pub rule: Option<String>,
}

#[derive(Subcommand)]
pub enum CountersCommand {
    /// Where a client stands under each rule that counts it (nothing is consumed).
    #[command(after_help = "Examples:
  sluice counters show --kind ip --value 203.0.113.9
  sluice counters show --kind api-key --value sk_… --rule per-tier")]
    Show {
        #[command(flatten)]
        whose: Whose,
    },
    /// Resets a client's counters (--kind, --value), a rule's (--rule), or all (--all).
    #[command(after_help = "Examples:
  sluice counters reset --kind user --value acme
  sluice counters reset --rule per-client
  sluice counters reset --all")]
    Reset {
        #[command(flatten)]
        whose: Whose,
        /// Every counter of every rule.
        #[arg(long)]
        all: bool,
    },
}

#[derive(Subcommand)]
pub enum StateCommand {
    /// The state, since when, and whether the automatic signal may change it.
    #[command(after_help = "Examples:
  sluice state get")]
    Get,
    /// Sets the state and pins it (the automatic signal no longer changes it).
    #[command(after_help = "Examples:
  sluice state set DEGRADED
  sluice state set NORMAL")]
    Set {
        /// NORMAL or DEGRADED.
        #[arg(value_parser = ["NORMAL", "DEGRADED"], ignore_case = true)]
        state: String,
    },
    /// Hands the state back to the automatic signal.
    #[command(after_help = "Examples:
  sluice state auto")]
    Auto,
}

#[derive(Subcommand)]
pub enum ProtectionCommand {
    /// The addresses blocked now, and until when.
    #[command(after_help = "Examples:
  sluice protection blocks")]
    Blocks,
    /// Ends protection's block of an address now (`sluice unblock` also removes its
    /// denylist entry).
    #[command(after_help = "Examples:
  sluice protection lift 198.51.100.4
  sluice unblock 198.51.100.4      # the same, and any denylist entry for the address")]
    Lift {
        /// The blocked address, as `blocks` lists it or bare.
        ip: String,
    },
}

#[derive(Subcommand)]
pub enum ConfigCommand {
    /// Writes the live configuration (to standard output, or --output).
    #[command(after_help = "Examples:
  sluice config export > sluice.toml
  sluice config export --format yaml --output sluice.yaml")]
    Export {
        /// The file format.
        #[arg(long, value_enum, default_value = "toml")]
        format: FileFormat,
        /// Where to write it (default: standard output).
        #[arg(long)]
        output: Option<PathBuf>,
    },
    /// Replaces the whole configuration with FILE, all or nothing.
    #[command(after_help = "Examples:
  sluice config import sluice.yaml
  sluice config import sluice.toml --if-match 41     # only if nobody changed it since 41")]
    Import {
        /// The configuration (.toml, .yaml, .yml or .json).
        file: PathBuf,
    },
    /// Checks configuration files offline, with the controller's own validation.
    #[command(
        long_about = "Checks configuration files (.toml, .yaml/.yml or .json, as `--config` and \
                      `config import` take them) offline: no controller needed. The same \
                      parser and validation the controller runs, so an error is the one the \
                      controller would give, naming its field (`file: rules[0].window: is \
                      required by fixed_window`). Exit 0 when every file is valid, 1 when one \
                      is not, 2 when one cannot be read.",
        after_help = "Examples:
  sluice config validate sluice.toml
  sluice config validate deploy/config/*.yaml      # in CI: exit 1 fails the job"
    )]
    Validate {
        /// The files to check.
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
    /// What applying FILE would change in the live configuration.
    #[command(
        long_about = "What applying FILE (`sluice config import FILE`) would change in the live \
                      configuration: rules, tiers, API keys, list entries and settings added, \
                      removed or changed, with the fields that differ (live → file), and a \
                      change in the rules' order. FILE is validated first, as `config validate` \
                      does. Exit 0 when there is no difference, 3 when there are, 1 when FILE \
                      is invalid or the controller refused.",
        after_help = "Examples:
  sluice config diff sluice.toml
  sluice config diff sluice.toml --json
  sluice config diff sluice.toml; [ $? -eq 3 ] && sluice config import sluice.toml"
    )]
    Diff {
        /// The configuration to compare (.toml, .yaml, .yml or .json).
        file: PathBuf,
    },
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    /// Every command, with its path (`sluice tiers set`).
    fn every(command: &clap::Command, path: String, out: &mut Vec<(String, clap::Command)>) {
        for sub in command.get_subcommands() {
            if sub.get_name() == "help" {
                continue;
            }
            let here = format!("{path} {}", sub.get_name());
            out.push((here.clone(), sub.clone()));
            every(sub, here, out);
        }
    }

    #[test]
    fn every_command_has_help_and_an_example() {
        let mut root = Cli::command();
        root.build();
        let mut commands = Vec::new();
        every(&root, "sluice".to_owned(), &mut commands);
        assert!(commands.len() >= 45, "{}", commands.len());
        let mut wanting = Vec::new();
        for (path, command) in &commands {
            if command
                .get_about()
                .is_none_or(|about| about.to_string().is_empty())
            {
                wanting.push(format!("{path}: no about"));
            }
            let examples = command
                .get_after_help()
                .map(ToString::to_string)
                .unwrap_or_default();
            if !examples.starts_with("Examples:\n") || !examples.contains(&format!("\n  {path}")) {
                wanting.push(format!("{path}: no example of itself"));
            }
            for arg in command.get_arguments() {
                let id = arg.get_id().as_str();
                if id != "help" && id != "version" && arg.get_help().is_none() {
                    wanting.push(format!("{path}: --{id} has no help"));
                }
            }
        }
        assert!(wanting.is_empty(), "{}", wanting.join("\n"));
    }

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn kinds_are_kebab_case_and_take_the_files_spelling_too() {
        for spelling in ["api-key", "api_key"] {
            let cli = Cli::try_parse_from(["sluice", "deny", "add", spelling, "x"]).unwrap();
            assert!(matches!(
                cli.command,
                Command::Deny(ListCommand::Add {
                    kind: Kind::ApiKey,
                    ..
                })
            ));
        }
        let help = Cli::command()
            .find_subcommand_mut("deny")
            .and_then(|deny| deny.find_subcommand_mut("add"))
            .map(|add| add.render_help().to_string())
            .unwrap_or_default();
        assert!(help.contains("api-key"), "{help}");
        assert!(!help.contains("api_key"), "{help}");
    }

    #[test]
    fn a_change_with_no_field_is_a_usage_error() {
        for line in [
            &["sluice", "tiers", "set", "gold"][..],
            &["sluice", "keys", "update", "abc"],
        ] {
            let error = Cli::try_parse_from(line).err().expect("refused");
            assert_eq!(error.exit_code(), 2, "{line:?}");
        }
        assert!(Cli::try_parse_from(["sluice", "tiers", "set", "gold", "--burst", "3"]).is_ok());
    }
}
