//! The `sluice` CLI, the real binary against a real controller: every command's exit status
//! and output, on its way to success and where it can be refused (README, "The CLI"); a
//! change of some fields keeps the others (a tier's DEGRADED limits, a key's user); the
//! GitOps gate (`config validate` on every invalid fixture of the controller, with its exact
//! error; `config diff` with and without differences); the rule files of examples/rules/;
//! completions.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::{json, Value};
use sluice_e2e::controller::{ControllerOptions, ADMIN_TOKEN, CHECK_TOKEN, READ_TOKEN};
use sluice_e2e::{cli, http, repo_root, Controller};

/// Tiers with DEGRADED limits, a rule that counts by tier, brute-force protection. The
/// client rule's window is an hour, so that a few checks never straddle two windows.
const CONFIG: &str = r#"
[[tiers]]
name = "free"
limit = 10
window = "1m"
burst = 20
degraded = { limit = 2, window = "1m" }

[[tiers]]
name = "pro"
limit = 100
window = "1m"

[[rules]]
name = "per-client"
limit = 5
window = "1h"
match = { path_prefix = "/api/" }

[[rules]]
name = "per-tier"
strategy = "token_bucket"
limit = 10
window = "1m"
tier_limits = true

[protection]
invalid_credentials = 1
window = "1m"
block = "1m"
"#;

/// What a run of the CLI ended with.
#[derive(Debug)]
struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Run {
    /// Asserts status 0 and gives the output.
    fn ok(self) -> String {
        assert_eq!(self.code, 0, "{self:?}");
        self.stdout
    }

    /// Asserts `code` and that standard error says `said`; gives standard error.
    fn fails(self, code: i32, said: &str) -> String {
        assert_eq!(self.code, code, "{self:?}");
        assert!(self.stderr.contains(said), "{said:?} in {self:?}");
        self.stderr
    }
}

fn run_with(controller: Option<&Controller>, token: &str, args: &[&str]) -> Run {
    let mut command = Command::new(cli::binary());
    match controller {
        Some(controller) => command.args(["--url", &controller.admin_url("")]),
        // Offline: a free port, where nothing listens.
        None => command.args([
            "--url".to_owned(),
            format!("http://127.0.0.1:{}", sluice_e2e::free_port()),
        ]),
    };
    let output = command
        .args(args)
        .env("SLUICE_ADMIN_TOKEN", token)
        .output()
        .expect("run sluice");
    Run {
        code: output.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

/// `sluice args…` against `controller` with the admin token.
fn sluice(controller: &Controller, args: &[&str]) -> Run {
    run_with(Some(controller), ADMIN_TOKEN, args)
}

/// `sluice args…` with no controller.
fn offline(args: &[&str]) -> Run {
    run_with(None, ADMIN_TOKEN, args)
}

fn api(controller: &Controller, path: &str) -> Value {
    let response = controller.admin("GET", path, None);
    assert_eq!(response.status, 200, "{path}: {response:?}");
    response.json()
}

fn scratch() -> tempfile::TempDir {
    tempfile::tempdir().expect("a scratch directory")
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).expect("write");
    path
}

fn text(path: &Path) -> &str {
    path.to_str().expect("a UTF-8 path")
}

// ----- the one-field-change guarantee ---------------------------------------------------

#[test]
fn tiers_set_changes_the_fields_given_and_keeps_the_degraded_limits() {
    let controller = Controller::start(CONFIG, None);
    let said = sluice(&controller, &["tiers", "set", "free", "--limit", "12"]).ok();
    assert!(said.contains("free"), "{said}");
    assert!(said.contains("2/1m"), "the DEGRADED limits shown: {said}");
    assert_eq!(
        api(&controller, "/v1/admin/tiers/free"),
        json!({ "name": "free", "limit": 12, "window": "1m", "burst": 20,
                "degraded": { "limit": 2, "window": "1m" } }),
        "only the limit changed"
    );
    // A DEGRADED field alone keeps the other DEGRADED fields, and the normal ones.
    sluice(
        &controller,
        &["tiers", "set", "free", "--degraded-burst", "3"],
    )
    .ok();
    assert_eq!(
        api(&controller, "/v1/admin/tiers/free"),
        json!({ "name": "free", "limit": 12, "window": "1m", "burst": 20,
                "degraded": { "limit": 2, "window": "1m", "burst": 3 } })
    );
    // --unset takes a field out, on purpose.
    sluice(
        &controller,
        &[
            "tiers", "set", "free", "--unset", "degraded", "--unset", "burst",
        ],
    )
    .ok();
    assert_eq!(
        api(&controller, "/v1/admin/tiers/free"),
        json!({ "name": "free", "limit": 12, "window": "1m" })
    );
    // A tier that does not exist is created.
    let created = sluice(
        &controller,
        &[
            "tiers",
            "set",
            "gold",
            "--limit",
            "5",
            "--degraded-limit",
            "1",
        ],
    )
    .ok();
    assert!(created.contains("gold"), "{created}");
    assert_eq!(
        api(&controller, "/v1/admin/tiers/gold"),
        json!({ "name": "gold", "limit": 5, "degraded": { "limit": 1 } })
    );
    let listed = sluice(&controller, &["tiers", "list"]).ok();
    for name in ["free", "pro", "gold"] {
        assert!(listed.contains(name), "{listed}");
    }
    let got = sluice(&controller, &["tiers", "get", "gold"]).ok();
    assert!(got.contains("gold") && got.contains("DEGRADED"), "{got}");

    // Refused by the controller: its field and message.
    let version = controller.config_version();
    sluice(
        &controller,
        &[
            "tiers", "set", "silver", "--limit", "1", "--window", "1parsec",
        ],
    )
    .fails(1, "400: window: ");
    sluice(&controller, &["tiers", "get", "silver"]).fails(1, "404: ");
    // A stale --if-match is final: 409, no retry.
    sluice(
        &controller,
        &["--if-match", "1", "tiers", "set", "free", "--limit", "13"],
    )
    .fails(1, "409: If-Match: the configuration is at version");
    // Nothing to change, or DEGRADED fields without a DEGRADED limit: usage errors.
    sluice(&controller, &["tiers", "set", "free"]).fails(2, "--limit");
    sluice(
        &controller,
        &["tiers", "set", "free", "--degraded-window", "1m"],
    )
    .fails(2, "no DEGRADED limits yet");
    assert_eq!(
        controller.config_version(),
        version,
        "refusals change nothing"
    );

    let deleted = sluice(&controller, &["tiers", "delete", "gold"]).ok();
    assert!(deleted.starts_with("tier gold deleted"), "{deleted}");
    sluice(&controller, &["tiers", "delete", "gold"]).fails(1, "404: ");
    // A read token may look, not change.
    run_with(
        Some(&controller),
        READ_TOKEN,
        &["tiers", "set", "free", "--limit", "1"],
    )
    .fails(1, "403: ");
}

#[test]
fn keys_update_changes_the_fields_given_and_keeps_the_user() {
    let controller = Controller::start(CONFIG, None);
    let digest = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"; // "test"
    let registered = sluice(
        &controller,
        &[
            "keys",
            "register",
            "test",
            "--user",
            "acme",
            "--tier",
            "free",
            "--name",
            "acme prod",
        ],
    )
    .ok();
    assert!(registered.contains(digest), "hashed here: {registered}");
    let said = sluice(&controller, &["keys", "update", digest, "--tier", "pro"]).ok();
    assert!(said.contains("acme") && said.contains("pro"), "{said}");
    let key = api(&controller, &format!("/v1/admin/api-keys/{digest}"));
    assert_eq!(key["user"], "acme", "the user stays: {key}");
    assert_eq!(key["name"], "acme prod", "the name stays: {key}");
    assert_eq!(key["tier"], "pro", "{key}");
    assert!(key["created_at"].is_string(), "{key}");
    // By the key itself too, and --unset.
    sluice(&controller, &["keys", "update", "test", "--unset", "name"]).ok();
    let key = api(&controller, &format!("/v1/admin/api-keys/{digest}"));
    assert_eq!(
        (&key["user"], &key["tier"], key.get("name")),
        (&json!("acme"), &json!("pro"), None),
        "{key}"
    );
    let got = sluice(&controller, &["keys", "get", "test"]).ok();
    assert!(got.contains("acme"), "{got}");

    let created = sluice(&controller, &["keys", "create", "--user", "bob"]).ok();
    assert!(created.contains("key: sk_"), "{created}");
    sluice(&controller, &["keys", "create", "--tier", "platinum"]).fails(1, "400: tier: ");
    let listed = sluice(&controller, &["keys", "list"]).ok();
    assert!(
        listed.contains("acme") && listed.contains("bob"),
        "{listed}"
    );

    // Refused: an unknown key, an unknown tier (the controller's field and message).
    sluice(
        &controller,
        &["keys", "update", "no-such-key", "--tier", "pro"],
    )
    .fails(1, "404: there is no API key");
    sluice(
        &controller,
        &["keys", "update", "test", "--tier", "platinum"],
    )
    .fails(1, "400: tier: ");
    sluice(&controller, &["keys", "update", "test"]).fails(2, "--user");
    sluice(&controller, &["keys", "register", "test"]).fails(1, "409: ");
    let deleted = sluice(&controller, &["keys", "delete", "test"]).ok();
    assert!(deleted.starts_with("key deleted"), "{deleted}");
    sluice(&controller, &["keys", "get", "test"]).fails(1, "404: ");
}

/// With `--config-source file` the controller refuses every change of the document: the
/// read-modify-write commands pass its reason on (a create refused as a "duplicate" that
/// still does not exist is not retried as a race).
#[test]
fn changes_to_a_configuration_a_file_manages_are_refused_with_the_controllers_reason() {
    let controller = Controller::start_with(&ControllerOptions {
        extra_args: vec!["--config-source".to_owned(), "file".to_owned()],
        ..ControllerOptions::new(CONFIG, None)
    });
    let rules = repo_root().join("examples/rules/public-api.toml");
    for args in [
        &["tiers", "set", "new-tier", "--limit", "1"][..],
        &["tiers", "set", "free", "--limit", "1"],
        &["rules", "apply", text(&rules)],
        &["keys", "register", "test", "--user", "acme"],
    ] {
        let said =
            sluice(&controller, args).fails(1, "409: the configuration is managed by the file");
        assert!(!said.contains("kept changing"), "not a race: {said}");
    }
    assert_eq!(controller.config_version(), 1);
}

// ----- rules and the example files ------------------------------------------------------

#[test]
fn rules_are_listed_read_applied_from_every_example_file_and_deleted() {
    let controller = Controller::start(CONFIG, None);
    let listed = sluice(&controller, &["rules", "list"]).ok();
    assert!(
        listed.contains("per-client") && listed.contains("token_bucket"),
        "{listed}"
    );
    let got = sluice(&controller, &["rules", "get", "per-client"]).ok();
    assert!(got.contains("per-client"), "{got}");
    sluice(&controller, &["rules", "get", "nope"]).fails(1, "404: ");
    run_with(Some(&controller), "not-a-token", &["rules", "list"]).fails(1, "401: ");

    // `get --format toml`, edited, applied back: the round trip an operator makes.
    let dir = scratch();
    let toml = sluice(
        &controller,
        &["rules", "get", "per-client", "--format", "toml"],
    )
    .ok();
    assert!(toml.contains("name = \"per-client\""), "{toml}");
    let edited = write(
        dir.path(),
        "r.toml",
        &toml.replace("limit = 5", "limit = 7"),
    );
    let applied = sluice(&controller, &["rules", "apply", text(&edited)]).ok();
    assert!(applied.starts_with("rule per-client replaced"), "{applied}");
    assert_eq!(api(&controller, "/v1/admin/rules/per-client")["limit"], 7);

    // Every file of examples/rules/, as it is; twice (created, then replaced).
    let examples = repo_root().join("examples/rules");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&examples)
        .expect("examples/rules")
        .map(|entry| entry.expect("an entry").path())
        .filter(|path| path.extension().is_some_and(|e| e != "md"))
        .collect();
    files.sort();
    assert!(files.len() >= 4, "{files:?}");
    for file in &files {
        let first = sluice(&controller, &["rules", "apply", text(file)]).ok();
        assert!(first.contains("created"), "{}: {first}", file.display());
        let again = sluice(&controller, &["rules", "apply", text(file)]).ok();
        assert!(again.contains("replaced"), "{}: {again}", file.display());
    }
    let names: Vec<String> = api(&controller, "/v1/admin/rules")
        .as_array()
        .expect("a list")
        .iter()
        .map(|rule| rule["name"].as_str().unwrap_or_default().to_owned())
        .collect();
    for name in [
        "per-client",
        "per-tier",
        "login-brute-force",
        "api-per-client",
        "search-global",
        "uploads-in-flight",
        "partner-reads",
        "anonymous",
    ] {
        assert!(names.iter().any(|n| n == name), "{name}: {names:?}");
    }
    // A list is applied as one change: one version for three rules.
    let before = controller.config_version();
    let said = sluice(
        &controller,
        &["rules", "apply", text(&examples.join("public-api.toml"))],
    )
    .ok();
    assert!(said.starts_with("3 rules applied as one change"), "{said}");
    assert_eq!(controller.config_version(), before + 1);

    // Refused, with nothing changed: the field named as the controller names it.
    let version = controller.config_version();
    let bad = write(
        dir.path(),
        "bad.toml",
        "name = \"x\"\nlimit = 1\nwindow = \"1 fortnight\"\n",
    );
    sluice(&controller, &["rules", "apply", text(&bad)]).fails(1, "bad.toml: window: ");
    let missing = write(dir.path(), "missing.toml", "name = \"x\"\nlimit = 1\n");
    sluice(&controller, &["rules", "apply", text(&missing)])
        .fails(1, "missing.toml: window: is required by fixed_window");
    // A list that names a tier the live configuration lacks: refused by the controller as
    // one configuration, named as the file names the rule.
    let unknown_tier = write(
        dir.path(),
        "tiers.toml",
        "[[rules]]\nname = \"ok\"\nlimit = 1\nwindow = \"1m\"\n\n[[rules]]\nname = \"gold-only\"\nlimit = 1\nwindow = \"1m\"\nmatch = { tiers = [\"gold\"] }\n",
    );
    let stderr = sluice(&controller, &["rules", "apply", text(&unknown_tier)]).fails(1, "400: ");
    assert!(
        stderr.contains("tiers.toml: rules[1].match.tiers") && stderr.contains("gold-only"),
        "{stderr}"
    );
    // The obvious wrong shapes are told the right ones.
    let singular = write(
        dir.path(),
        "singular.toml",
        "[rule]\nname = \"x\"\nlimit = 1\n",
    );
    sluice(&controller, &["rules", "apply", text(&singular)]).fails(1, "[[rules]]");
    let whole = write(
        dir.path(),
        "whole.toml",
        "[[tiers]]\nname = \"t\"\nlimit = 1\n\n[[rules]]\nname = \"x\"\nlimit = 1\nwindow = \"1m\"\n",
    );
    sluice(&controller, &["rules", "apply", text(&whole)]).fails(1, "sluice config import");
    let ini = write(dir.path(), "rule.ini", "name = x\n");
    sluice(&controller, &["rules", "apply", text(&ini)]).fails(2, ".toml, .yaml");
    sluice(&controller, &["rules", "apply", "/no/such/rule.toml"]).fails(2, "cannot read");
    assert_eq!(
        controller.config_version(),
        version,
        "refusals change nothing"
    );

    let deleted = sluice(&controller, &["rules", "delete", "login-brute-force"]).ok();
    assert!(
        deleted.starts_with("rule login-brute-force deleted"),
        "{deleted}"
    );
    sluice(&controller, &["rules", "delete", "login-brute-force"]).fails(1, "404: ");
}

// ----- lists, blocks, protection ----------------------------------------------------------

#[test]
fn lists_blocks_and_unblock() {
    let controller = Controller::start(CONFIG, None);
    let added = sluice(
        &controller,
        &[
            "deny",
            "add",
            "ip",
            "203.0.113.0/24",
            "--expires-in",
            "1h",
            "--reason",
            "scraping",
        ],
    )
    .ok();
    assert!(
        added.contains("203.0.113.0/24") && added.contains("scraping"),
        "{added}"
    );
    let listed = sluice(&controller, &["--json", "deny", "list"]).ok();
    let entries: Value = serde_json::from_str(&listed).expect("JSON");
    let id = entries[0]["id"].as_str().expect("an id").to_owned();
    let removed = sluice(&controller, &["deny", "remove", &id]).ok();
    assert!(removed.contains(&id), "{removed}");
    sluice(&controller, &["deny", "remove", &id]).fails(1, "404: ");
    sluice(&controller, &["deny", "add", "ip", "not-an-address"]).fails(1, "400: value: ");

    // Kebab-case on the command line; the configuration's spelling is taken too.
    for (spelling, key) in [("api-key", "sk_one"), ("api_key", "sk_two")] {
        let added = sluice(&controller, &["allow", "add", spelling, key]).ok();
        assert!(added.contains("api_key"), "{added}");
    }
    sluice(&controller, &["allow", "add", "path", "/public/**"]).ok();
    let listed = sluice(&controller, &["allow", "list"]).ok();
    assert!(listed.contains("/public/**"), "{listed}");
    assert!(!listed.contains("sk_one"), "keys are sent hashed: {listed}");
    sluice(&controller, &["allow", "add", "apikey", "x"]).fails(2, "apikey");

    // block, then unblock: the denylist entry goes.
    let blocked = sluice(
        &controller,
        &[
            "block",
            "ip",
            "198.51.100.7",
            "--for",
            "10m",
            "--reason",
            "incident 42",
        ],
    )
    .ok();
    assert!(blocked.contains("incident 42"), "{blocked}");
    let unblocked = sluice(&controller, &["unblock", "198.51.100.7"]).ok();
    assert!(unblocked.contains("denylist entry"), "{unblocked}");
    let denylist = api(&controller, "/v1/admin/lists/denylist");
    assert_eq!(denylist, json!([]), "{denylist}");
    sluice(&controller, &["unblock", "198.51.100.7"]).fails(1, "404: nothing blocks");
    sluice(&controller, &["unblock", "not-an-address"]).fails(1, "400: ip: ");
    sluice(
        &controller,
        &["block", "ip", "192.0.2.1", "--for", "forever"],
    )
    .fails(1, "400: ");

    // Brute-force protection's block: a proxy reports an address presenting bad
    // credentials (one is the threshold here); `unblock` lifts it.
    let report = json!({ "invalid_tokens": [{ "ip": "203.0.113.77", "count": 2 }] });
    let credential = format!("Bearer {CHECK_TOKEN}");
    let response = http::request(
        "POST",
        &controller.url("/v1/report"),
        &[
            ("authorization", credential.as_str()),
            ("x-sluice-reporter", "cli-test"),
        ],
        Some(report.to_string()),
    )
    .expect("a report");
    assert_eq!(response.status, 204, "{response:?}");
    sluice_e2e::wait_until("the block", Duration::from_secs(5), || {
        sluice(&controller, &["protection", "blocks"])
            .stdout
            .contains("203.0.113.77/32")
    });
    let lifted = sluice(&controller, &["unblock", "203.0.113.77"]).ok();
    assert!(
        lifted.contains("brute-force protection's block of 203.0.113.77/32 lifted"),
        "{lifted}"
    );
    let blocks = sluice(&controller, &["protection", "blocks"]).ok();
    assert!(blocks.contains("(none)"), "{blocks}");
    // The old name still lifts (protection's block only).
    sluice(&controller, &["protection", "lift", "203.0.113.77"])
        .fails(1, "404: protection does not block");
    let report = json!({ "invalid_tokens": [{ "ip": "203.0.113.78", "count": 2 }] });
    let response = http::request(
        "POST",
        &controller.url("/v1/report"),
        &[
            ("authorization", credential.as_str()),
            ("x-sluice-reporter", "cli-test-2"),
        ],
        Some(report.to_string()),
    )
    .expect("a report");
    assert_eq!(response.status, 204, "{response:?}");
    sluice_e2e::wait_until("the second block", Duration::from_secs(5), || {
        sluice(&controller, &["protection", "blocks"])
            .stdout
            .contains("203.0.113.78/32")
    });
    let lifted = sluice(&controller, &["protection", "lift", "203.0.113.78"]).ok();
    assert_eq!(
        lifted,
        "brute-force protection's block of 203.0.113.78/32 lifted\n"
    );
    run_with(Some(&controller), "not-a-token", &["protection", "blocks"]).fails(1, "401: ");
    run_with(Some(&controller), READ_TOKEN, &["unblock", "203.0.113.77"]).fails(1, "403: ");
}

// ----- operations: status, state, enforcement, counters, audit --------------------------

#[test]
fn status_names_the_software_apart_from_the_configurations_version() {
    let controller = Controller::start(CONFIG, None);
    let status = sluice(&controller, &["status"]).ok();
    assert!(status.contains("\nconfiguration version: 1\n"), "{status}");
    assert!(status.contains("state: NORMAL"), "{status}");
    assert!(status.contains("token: test (admin)"), "{status}");
    let cli_version = env!("CARGO_PKG_VERSION");
    assert!(
        status.contains(&format!("\ncli: sluice {cli_version}\n")),
        "{status}"
    );
    // The controller's software, as `/v1/admin/build` says; an older controller without
    // the route (404) is named as such, and the command still succeeds.
    let build = controller.admin("GET", "/v1/admin/build", None);
    let expected = match build.status {
        200 => {
            let build = build.json();
            format!(
                "controller: sluice {} (commit {})",
                build["version"].as_str().expect("a version"),
                build["commit"].as_str().expect("a commit")
            )
        }
        404 => "controller: unknown (older than this CLI)".to_owned(),
        other => panic!("/v1/admin/build answered {other}: {build:?}"),
    };
    assert!(status.starts_with(&format!("{expected}\n")), "{status}");
    let json: Value =
        serde_json::from_str(&sluice(&controller, &["--json", "status"]).ok()).expect("JSON");
    assert_eq!(json["configuration_version"], 1, "{json}");
    assert_eq!(json["cli"]["version"], cli_version, "{json}");

    let version = offline(&["--version"]).ok();
    assert_eq!(version, format!("sluice {cli_version}\n"));
    run_with(Some(&controller), "not-a-token", &["status"]).fails(1, "401: ");
    offline(&["status"]).fails(1, "cannot reach the controller");
}

/// A controller from before `/v1/admin/build`: it answers the other routes `status` reads,
/// and 404 (as any unknown route) for that one.
fn older_controller() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("a port");
    let url = format!("http://{}", listener.local_addr().expect("its address"));
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let mut reader = BufReader::new(stream.try_clone().expect("the stream"));
            let mut request_line = String::new();
            let _ = reader.read_line(&mut request_line);
            let mut line = String::new();
            while reader.read_line(&mut line).is_ok_and(|n| n > 2) {
                line.clear();
            }
            let path = request_line.split_whitespace().nth(1).unwrap_or_default();
            let (status, body) = match path {
                "/v1/admin/version" => ("200 OK", json!({ "version": 41 })),
                "/v1/admin/state" => (
                    "200 OK",
                    json!({ "state": "NORMAL", "automatic": true, "enforce": true }),
                ),
                "/v1/admin/whoami" => ("200 OK", json!({ "name": "ops", "role": "read" })),
                _ => (
                    "404 Not Found",
                    json!({ "error": "not_found", "message": "no such route" }),
                ),
            };
            let body = body.to_string();
            let _ = std::io::Write::write_all(
                &mut stream,
                format!(
                    "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                )
                .as_bytes(),
            );
        }
    });
    url
}

#[test]
fn status_of_a_controller_older_than_the_build_route_says_so_and_succeeds() {
    let url = older_controller();
    let output = Command::new(cli::binary())
        .args(["--url", &url, "status"])
        .env("SLUICE_ADMIN_TOKEN", READ_TOKEN)
        .output()
        .expect("run sluice");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert_eq!(output.status.code(), Some(0), "{output:?}");
    assert!(
        stdout.starts_with("controller: unknown (older than this CLI)\n"),
        "{stdout}"
    );
    assert!(stdout.contains("\nconfiguration version: 41\n"), "{stdout}");
    assert!(stdout.contains("token: ops (read)"), "{stdout}");
}

#[test]
fn state_enforcement_counters_and_audit() {
    let controller = Controller::start(CONFIG, None);
    assert!(sluice(&controller, &["state", "get"])
        .ok()
        .starts_with("NORMAL"));
    let set = sluice(&controller, &["state", "set", "degraded"]).ok();
    assert!(
        set.starts_with("DEGRADED") && set.contains("pinned"),
        "{set}"
    );
    let auto = sluice(&controller, &["state", "auto"]).ok();
    assert!(auto.contains("(automatic)"), "{auto}");
    sluice(&controller, &["state", "set", "SIDEWAYS"]).fails(2, "SIDEWAYS");
    run_with(Some(&controller), READ_TOKEN, &["state", "set", "NORMAL"]).fails(1, "403: ");

    assert_eq!(sluice(&controller, &["enforce"]).ok(), "on\n");
    let off = sluice(&controller, &["enforce", "off", "--rule", "per-client"]).ok();
    assert_eq!(off, "on; off for per-client\n");
    assert_eq!(
        sluice(&controller, &["enforce", "on", "--rule", "per-client"]).ok(),
        "on\n"
    );
    sluice(&controller, &["enforce", "off", "--rule", "nope"]).fails(1, "404: ");
    sluice(&controller, &["enforce", "sideways"]).fails(2, "sideways");

    // A client with a counter.
    let check = json!({ "checks": [{ "client": { "kind": "ip", "value": "192.0.2.9" },
                                     "path": "/api/x" }] });
    let response = http::post_check(&controller.url("/v1/check"), &check).expect("a check");
    assert_eq!(response.status, 200, "{response:?}");
    let shown = sluice(
        &controller,
        &["counters", "show", "--kind", "ip", "--value", "192.0.2.9"],
    )
    .ok();
    assert!(
        shown.contains("per-client") && shown.contains("REMAINING"),
        "{shown}"
    );
    let reset = sluice(
        &controller,
        &["counters", "reset", "--kind", "ip", "--value", "192.0.2.9"],
    )
    .ok();
    assert!(reset.ends_with("counters reset\n"), "{reset}");
    sluice(
        &controller,
        &["counters", "reset", "--kind", "api-key", "--value", "sk_x"],
    )
    .ok();
    sluice(&controller, &["counters", "reset", "--rule", "per-client"]).ok();
    sluice(&controller, &["counters", "reset", "--rule", "nope"]).fails(1, "404: ");
    sluice(
        &controller,
        &[
            "counters",
            "show",
            "--kind",
            "ip",
            "--value",
            "192.0.2.9",
            "--rule",
            "nope",
        ],
    )
    .fails(1, "404: there is no rule `nope`");
    sluice(&controller, &["counters", "show", "--kind", "ip"]).fails(2, "--value");

    let audit = sluice(&controller, &["audit", "--limit", "3"]).ok();
    assert!(
        audit.contains("ACTOR") && audit.contains("counters.reset"),
        "{audit}"
    );
    let json: Value =
        serde_json::from_str(&sluice(&controller, &["--json", "audit", "--limit", "2"]).ok())
            .expect("JSON");
    assert_eq!(json["entries"].as_array().map(Vec::len), Some(2), "{json}");
    run_with(Some(&controller), "not-a-token", &["audit"]).fails(1, "401: ");
}

// ----- top, watch, hints -----------------------------------------------------------------

#[test]
fn top_watch_and_hints_show_the_stats() {
    let controller = Controller::start(CONFIG, None);
    let check = json!({ "checks": [{ "client": { "kind": "ip", "value": "192.0.2.10" },
                                     "path": "/api/x" }] });
    for _ in 0..7 {
        let response = http::post_check(&controller.url("/v1/check"), &check).expect("a check");
        assert_eq!(response.status, 200, "{response:?}");
    }
    // The stats take the decisions in at their next round (about a second).
    sluice_e2e::wait_until("the decisions in the stats", Duration::from_secs(5), || {
        api(&controller, "/v1/admin/stats")["decisions"]
            .as_u64()
            .is_some_and(|n| n >= 7)
    });
    let top = sluice(&controller, &["top", "--once"]).ok();
    assert!(top.starts_with("window 1m: "), "{top}");
    let row = top
        .lines()
        .find(|line| line.starts_with("per-client "))
        .unwrap_or_else(|| panic!("per-client's row: {top}"));
    let cells: Vec<&str> = row.split_whitespace().collect();
    assert_eq!(&cells[1..3], ["5", "2"], "5 allowed, 2 limited: {top}");
    assert!(
        top.contains("TOP LIMITED") && top.contains("ip 192.0.2.10"),
        "{top}"
    );
    let json: Value = serde_json::from_str(&sluice(&controller, &["--json", "top", "--once"]).ok())
        .expect("JSON");
    assert!(json["decisions"].as_u64().unwrap_or(0) >= 7, "{json}");
    sluice(&controller, &["top", "--once", "--top", "1000"]).fails(1, "400: top: ");

    // Without --once it redraws until stopped.
    let mut child = Command::new(cli::binary())
        .args([
            "--url",
            &controller.admin_url(""),
            "top",
            "--interval",
            "200ms",
        ])
        .env("SLUICE_ADMIN_TOKEN", ADMIN_TOKEN)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("sluice top");
    let stdout = child.stdout.take().expect("its output");
    let headers = BufReader::new(stdout)
        .lines()
        .map_while(Result::ok)
        .filter(|line| line.starts_with("sluice top: every 200ms"))
        .take(2)
        .count();
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(headers, 2, "drawn twice");

    let watched = sluice(&controller, &["watch", "--count", "2"]).ok();
    let lines: Vec<&str> = watched.lines().collect();
    assert_eq!(lines.len(), 2, "{watched}");
    for line in &lines {
        assert!(
            line.contains("  configuration 1  NORMAL  allowed "),
            "{watched}"
        );
    }
    let watched = sluice(&controller, &["--json", "watch", "--count", "1"]).ok();
    let event: Value = serde_json::from_str(watched.trim()).expect("one JSON event a line");
    assert_eq!(event["version"], 1, "{event}");
    assert!(
        event["stats"]["decisions"].as_u64().unwrap_or(0) >= 7,
        "{event}"
    );

    let hints = sluice(&controller, &["hints"]).ok();
    assert!(hints.starts_with("hints over 1m:\nRULE"), "{hints}");
    let hints: Value =
        serde_json::from_str(&sluice(&controller, &["--json", "hints", "--window", "1h"]).ok())
            .expect("JSON");
    assert_eq!(hints["window"], "1h", "{hints}");
    sluice(&controller, &["hints", "--window", "1d"]).fails(2, "1d");

    // A controller that keeps no stats says so, through each.
    let quiet = Controller::start_with(&ControllerOptions {
        extra_args: vec!["--stats".to_owned(), "false".to_owned()],
        ..ControllerOptions::new(CONFIG, None)
    });
    for args in [&["top", "--once"][..], &["watch"], &["hints"]] {
        sluice(&quiet, args).fails(1, "409: this controller keeps no stats");
    }
}

// ----- the GitOps gate -------------------------------------------------------------------

fn fixtures() -> Vec<PathBuf> {
    let dir = repo_root().join("controller/tests/invalid-config");
    let mut paths: Vec<PathBuf> = std::fs::read_dir(&dir)
        .expect("controller/tests/invalid-config")
        .map(|entry| entry.expect("an entry").path())
        .collect();
    paths.sort();
    paths
}

/// The error a fixture says the controller gives (its first line, `# expect: …`).
fn expected(path: &Path) -> String {
    let text = std::fs::read_to_string(path).expect("the fixture");
    text.lines()
        .next()
        .and_then(|line| line.strip_prefix("# expect: "))
        .unwrap_or_else(|| panic!("{}: no `# expect:` line", path.display()))
        .to_owned()
}

#[test]
fn config_validate_refuses_every_invalid_fixture_with_the_controllers_error() {
    let paths = fixtures();
    assert!(paths.len() >= 100, "{}", paths.len());
    let mut wrong = Vec::new();
    for path in &paths {
        let run = offline(&["config", "validate", text(path)]);
        let line = format!("{}: {}", path.display(), expected(path));
        if run.code != 1 || run.stderr.lines().next() != Some(line.as_str()) {
            wrong.push(format!("{line}\n  got {}: {}", run.code, run.stderr.trim()));
        }
        assert!(run.stdout.is_empty(), "{run:?}");
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));

    // Valid files: the demo's, and the whole configurations of examples/rules/.
    let demo = repo_root().join("controller/demo-rules.toml");
    let said = offline(&["config", "validate", text(&demo)]).ok();
    assert_eq!(
        said,
        format!(
            "{}: valid (4 rules, 3 tiers, 3 API keys, 0 safelist entries, 0 denylist entries)\n",
            demo.display()
        )
    );
    let examples = repo_root().join("examples/rules");
    for name in [
        "api-tiers.yaml",
        "public-api.toml",
        "llm-token-budgets.toml",
    ] {
        offline(&["config", "validate", text(&examples.join(name))]).ok();
    }
    // One rule is not a configuration: refused, with a hint.
    offline(&[
        "config",
        "validate",
        text(&examples.join("login-brute-force.toml")),
    ])
    .fails(1, "hint: ");
    // Several files: each is reported; one invalid makes the status 1.
    let bad = &paths[0];
    let run = offline(&["config", "validate", text(&demo), text(bad)]);
    assert_eq!(run.code, 1, "{run:?}");
    assert!(run.stdout.contains(": valid ("), "{run:?}");
    assert!(run.stderr.contains(&expected(bad)), "{run:?}");
    let run = offline(&["--json", "config", "validate", text(&demo), text(bad)]);
    let json: Value = serde_json::from_str(&run.stdout).expect("JSON");
    assert_eq!(json[0]["valid"], true, "{json}");
    assert_eq!(json[1]["valid"], false, "{json}");
    // Usage: a file that cannot be read, a name that says no format, no file.
    offline(&["config", "validate", "/no/such/file.toml"]).fails(2, "cannot read");
    let dir = scratch();
    let ini = write(dir.path(), "c.ini", "");
    offline(&["config", "validate", text(&ini)]).fails(2, ".toml, .yaml, .yml or .json");
    offline(&["config", "validate"]).fails(2, "FILES");
}

#[test]
fn config_diff_shows_what_a_file_would_change_and_export_import_round_trip() {
    let controller = Controller::start(CONFIG, None);
    let dir = scratch();
    let exported = dir.path().join("live.toml");
    let wrote = sluice(
        &controller,
        &["config", "export", "--output", text(&exported)],
    )
    .ok();
    assert_eq!(
        wrote,
        format!("wrote configuration version 1 to {}\n", exported.display())
    );
    let yaml = sluice(&controller, &["config", "export", "--format", "yaml"]).ok();
    assert!(yaml.contains("name: per-client"), "{yaml}");
    run_with(Some(&controller), "not-a-token", &["config", "export"]).fails(1, "401: ");

    // The live configuration itself: no difference.
    let same = sluice(&controller, &["config", "diff", text(&exported)]).ok();
    assert_eq!(
        same,
        format!(
            "no difference: {} is the live configuration (version 1)\n",
            exported.display()
        )
    );
    // Real changes: a limit, a tier gone, a tier's DEGRADED limit, a rule added, a list
    // entry, the rules' order.
    let live = std::fs::read_to_string(&exported).expect("the export");
    let changed = live
        .replace("limit = 5\n", "limit = 7\n")
        .replace("[tiers.degraded]\nlimit = 2", "[tiers.degraded]\nlimit = 1");
    let changed = format!(
        "{changed}\n[[rules]]\nname = \"new-rule\"\nlimit = 1\nwindow = \"1s\"\n\n[[denylist]]\nkind = \"ip\"\nvalue = \"192.0.2.0/24\"\n"
    );
    assert_ne!(changed, live);
    let file = write(dir.path(), "changed.toml", &changed);
    let run = sluice(&controller, &["config", "diff", text(&file)]);
    assert_eq!(run.code, 3, "{run:?}");
    for line in [
        "~ tier free: degraded.limit 2 → 1\n",
        "~ rule per-client: limit 5 → 7\n",
        "+ rule new-rule\n",
        "+ denylist entry ip 192.0.2.0/24\n",
        "4 changes from the live configuration (version 1)",
    ] {
        assert!(run.stdout.contains(line), "{line:?} in {}", run.stdout);
    }
    let json: Value = serde_json::from_str(
        &sluice(&controller, &["--json", "config", "diff", text(&file)]).stdout,
    )
    .expect("JSON");
    assert_eq!(json["changes"].as_array().map(Vec::len), Some(4), "{json}");
    assert_eq!(json["changes"][0]["fields"][0]["file"], 1, "{json}");

    // Applied, the file is what runs: no difference any more.
    let imported = sluice(&controller, &["config", "import", text(&file)]).ok();
    assert_eq!(imported, "imported as version 2\n");
    sluice(&controller, &["config", "diff", text(&file)]).ok();
    // A file without a tier and with the rules in another order.
    let fewer = write(
        dir.path(),
        "fewer.yaml",
        "rules:\n  - name: new-rule\n    limit: 1\n    window: 1s\n  - name: per-client\n    limit: 7\n    window: 1m\n    match:\n      path_prefix: /api/\n",
    );
    let run = sluice(&controller, &["config", "diff", text(&fewer)]);
    assert_eq!(run.code, 3, "{run:?}");
    for line in [
        "- tier free\n",
        "- tier pro\n",
        "- rule per-tier\n",
        "- denylist entry ip 192.0.2.0/24\n",
        "~ the rules' order: order [\"per-client\",\"new-rule\"] → [\"new-rule\",\"per-client\"]\n",
        "- protection\n",
    ] {
        assert!(run.stdout.contains(line), "{line:?} in {}", run.stdout);
    }

    // An invalid file: its error (as `config validate` gives it), status 1, nothing asked.
    for fixture in &fixtures() {
        sluice(&controller, &["config", "diff", text(fixture)]).fails(1, &expected(fixture));
    }
    run_with(
        Some(&controller),
        "not-a-token",
        &["config", "diff", text(&file)],
    )
    .fails(1, "401: ");
    sluice(&controller, &["config", "diff", "/no/such/file.toml"]).fails(2, "cannot read");
    // Import refusals: the entry named, nothing applied; a stale --if-match.
    let broken = write(
        dir.path(),
        "broken.toml",
        &changed.replace("window = \"1s\"", "window = \"1 fortnight\""),
    );
    sluice(&controller, &["config", "import", text(&broken)]).fails(1, "400: rules[");
    sluice(
        &controller,
        &["--if-match", "1", "config", "import", text(&exported)],
    )
    .fails(1, "409: ");
    assert_eq!(controller.config_version(), 2);
}

// ----- help, names, completions -----------------------------------------------------------

#[test]
fn every_command_has_help_with_examples_and_completions_are_generated() {
    let top = offline(&["--help"]).ok();
    assert!(
        top.contains("Exit status:") && top.contains("3  config diff"),
        "{top}"
    );
    let commands: Vec<&str> = top
        .lines()
        .skip_while(|line| *line != "Commands:")
        .skip(1)
        .take_while(|line| !line.is_empty())
        .filter_map(|line| line.split_whitespace().next())
        .filter(|name| *name != "help")
        .collect();
    for name in [
        "status",
        "top",
        "watch",
        "hints",
        "unblock",
        "config",
        "completions",
    ] {
        assert!(commands.contains(&name), "{name}: {commands:?}");
    }
    for command in &commands {
        let help = offline(&[command, "--help"]).ok();
        assert!(
            help.contains("Examples:\n") && help.contains(&format!("  sluice {command}")),
            "sluice {command} --help: {help}"
        );
    }
    for (group, sub) in [
        ("rules", "apply"),
        ("tiers", "set"),
        ("keys", "update"),
        ("config", "validate"),
        ("config", "diff"),
    ] {
        let help = offline(&[group, sub, "--help"]).ok();
        assert!(
            help.contains(&format!("  sluice {group} {sub} ")),
            "{group} {sub}: {help}"
        );
    }

    let bash = offline(&["completions", "bash"]).ok();
    assert!(
        bash.contains("_sluice()") && bash.contains("unblock"),
        "{}",
        bash.len()
    );
    for shell in ["zsh", "fish"] {
        let script = offline(&["completions", shell]).ok();
        assert!(script.contains("unblock"), "{shell}");
    }
    offline(&["completions", "tcsh"]).fails(2, "tcsh");
    offline(&["no-such-command"]).fails(2, "no-such-command");
}
