//! What the README names exists: every metric its tables and alert examples name is in a
//! live scrape (the controller's `/metrics`, Envoy's `/stats` and `/stats/prometheus` with
//! the real `.wasm`), every controller flag is in `--help`, every admin route is in the
//! OpenAPI document the controller serves, and every `sluice` command of the CLI section is
//! one the CLI takes. A rename that leaves the README behind fails here.

use std::collections::BTreeSet;
use std::process::Command;

use sluice_e2e::envoy::{sluice_plugin_config, Filter};
use sluice_e2e::{cli, http, repo_root, Controller, Envoy, EnvoyOptions, Upstream};

fn readme() -> String {
    std::fs::read_to_string(repo_root().join("README.md")).expect("README.md")
}

/// The text between the heading `title` and the next heading of the same or a higher level.
fn section(readme: &str, title: &str) -> String {
    let heading = format!("\n{title}\n");
    let start = readme
        .find(&heading)
        .unwrap_or_else(|| panic!("README has no section {title:?}"));
    let level = title.chars().take_while(|c| *c == '#').count();
    let rest = &readme[start + heading.len()..];
    let end = rest
        .lines()
        .scan(0usize, |offset, line| {
            let at = *offset;
            *offset += line.len() + 1;
            Some((at, line))
        })
        .find(|(_, line)| {
            let hashes = line.chars().take_while(|c| *c == '#').count();
            hashes > 0 && hashes <= level && line.chars().nth(hashes) == Some(' ')
        })
        .map_or(rest.len(), |(at, _)| at);
    rest[..end].to_owned()
}

/// Every `sluice_…` metric name in `text` (a base name: label sets, `_bucket` and the like
/// are the scrape's business), and every Envoy-side `wasmcustom.sluice_…` name with the
/// `_suffix` shorthands of the metrics table expanded.
fn metric_names(text: &str) -> (BTreeSet<String>, BTreeSet<String>) {
    let mut controller = BTreeSet::new();
    let mut envoy = BTreeSet::new();
    for line in text.lines() {
        let mut envoy_prefix: Option<String> = None;
        // `sluice_*` is a pattern, not a name.
        let words = line.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == '.'));
        for token in words.filter(|word| !word.ends_with(['_', '.'])) {
            if let Some(name) = token.strip_prefix("wasmcustom.") {
                envoy_prefix = name.rfind('_').map(|_| "sluice".to_owned());
                envoy.insert(name.to_owned());
            } else if let Some(name) = token.strip_prefix("envoy_wasmcustom_") {
                envoy.insert(name.to_owned());
            } else if token.starts_with("sluice_") && !line.contains("wasmcustom") {
                let name = token
                    .trim_end_matches("_bucket")
                    .trim_end_matches("_count")
                    .trim_end_matches("_sum");
                controller.insert(name.to_owned());
            } else if token.starts_with('_') && token.len() > 1 && envoy_prefix.is_some() {
                envoy.insert(format!("sluice{token}"));
            }
        }
    }
    (controller, envoy)
}

/// The metric names the controller registers (without its `sluice_` prefix), read from
/// `controller/src/metrics.rs`: `registry.register(` or `register_with_unit(` then the
/// name as a string literal on the next line.
fn registered_metrics() -> BTreeSet<String> {
    let source =
        std::fs::read_to_string(repo_root().join("controller/src/metrics.rs")).expect("metrics.rs");
    let lines: Vec<&str> = source.lines().collect();
    lines
        .windows(2)
        .filter(|pair| {
            pair[0].trim_end().ends_with("registry.register(")
                || pair[0].trim_end().ends_with("registry.register_with_unit(")
        })
        .filter_map(|pair| pair[1].trim().strip_prefix('"'))
        .filter_map(|rest| rest.split('"').next())
        .map(str::to_owned)
        .collect()
}

/// The README's metrics table and alert examples against live scrapes.
#[test]
fn every_metric_the_readme_names_is_scraped() {
    let text = section(&readme(), "### Metrics");
    let (controller_names, envoy_names) = metric_names(&text);
    assert!(controller_names.len() >= 20, "{controller_names:?}");
    assert!(envoy_names.len() >= 10, "{envoy_names:?}");

    let controller = Controller::start(
        "[[rules]]\nname = \"claims\"\nlimit = 1\nwindow = \"1h\"\n",
        None,
    );
    let upstream = Upstream::start();
    let envoy = Envoy::start(&EnvoyOptions {
        filter: Filter::sluice_with(&sluice_plugin_config("allow", 2_000)),
        upstream_port: upstream.port(),
        controller_ports: vec![controller.port],
        concurrency: 1,
        controller_http2: false,
    });
    // Traffic, so that families with labels have a series: an allowed and a limited request.
    for _ in 0..2 {
        http::get(&envoy.url("/claims")).expect("through envoy");
    }
    // The decisions reach the metrics with the stats' next round (once a second).
    let scrape = || {
        http::get(&controller.admin_url("/metrics"))
            .expect("controller scrape")
            .body
    };
    sluice_e2e::wait_until(
        "the decisions in the scrape",
        std::time::Duration::from_secs(5),
        || scrape().contains("sluice_decisions_total{"),
    );
    let scrape = scrape();
    let scraped: BTreeSet<&str> = scrape
        .lines()
        .filter_map(|line| line.strip_prefix("# TYPE "))
        .filter_map(|line| line.split_whitespace().next())
        .collect();
    // A family with no series yet (no breaker move, no alert) is not in a scrape: those are
    // held to the names the controller registers (controller/src/metrics.rs), which the
    // scrape shows with the `sluice_` prefix and a counter's `_total`.
    let stats = http::get(&format!("http://127.0.0.1:{}/stats", envoy.admin_port))
        .expect("envoy stats")
        .body;
    let prometheus = http::get(&format!(
        "http://127.0.0.1:{}/stats/prometheus",
        envoy.admin_port
    ))
    .expect("envoy prometheus")
    .body;
    let registered = registered_metrics();
    let base = |name: &str| {
        name.trim_start_matches("sluice_")
            .trim_end_matches("_total")
            .trim_end_matches("_seconds")
            .trim_end_matches("_info")
            .to_owned()
    };
    // An alert example may query Envoy's series by their Prometheus name.
    let in_envoys_prometheus = |name: &str| {
        prometheus.lines().any(|line| {
            line.starts_with(&format!("{name} ")) || line.starts_with(&format!("{name}{{"))
        })
    };
    let missing: Vec<&String> = controller_names
        .iter()
        .filter(|name| {
            !scraped.contains(name.as_str())
                && !scraped.contains(name.trim_end_matches("_total"))
                && !scraped.contains(name.trim_end_matches("_info"))
                && !registered.contains(&base(name))
                && !in_envoys_prometheus(name)
        })
        .collect();
    assert!(
        missing.is_empty(),
        "the README names metrics neither the controller nor Envoy serves: {missing:?}"
    );
    // And every series the scrape has is the name the README gives (counters with `_total`).
    for sample in [
        "sluice_decisions_total{",
        "sluice_check_call_duration_seconds_bucket{",
    ] {
        assert!(scrape.contains(sample), "{sample}: {scrape}");
    }
    assert!(
        controller_names.contains("sluice_decisions_total")
            && controller_names.contains("sluice_check_call_duration_seconds"),
        "{controller_names:?}"
    );

    for name in &envoy_names {
        assert!(
            stats.contains(&format!("wasmcustom.{name}:")),
            "Envoy's /stats has no wasmcustom.{name}"
        );
    }
    // What the README says Prometheus sees, and what the alert examples query.
    let prometheus_prefix = if text.contains("names them `envoy_wasmcustom_sluice_*`") {
        "envoy_wasmcustom_"
    } else {
        ""
    };
    for name in &envoy_names {
        let series = format!("{prometheus_prefix}{name}");
        assert!(
            prometheus
                .lines()
                .any(|line| line.starts_with(&format!("{series} "))
                    || line.starts_with(&format!("{series}{{"))),
            "Envoy's /stats/prometheus has no {series}"
        );
    }
}

/// Every flag of the README's controller table is one the controller takes.
#[test]
fn every_controller_flag_the_readme_names_exists() {
    let text = section(&readme(), "### Controller");
    let flags: BTreeSet<&str> = text
        .lines()
        .filter(|line| line.starts_with("| `--"))
        .flat_map(|line| line.split('`'))
        .filter(|token| token.starts_with("--"))
        // `--admin-tls false` names the flag with a value.
        .filter_map(|token| token.split_whitespace().next())
        .collect();
    assert!(flags.len() >= 25, "{flags:?}");
    let help = Command::new(sluice_e2e::controller::controller_binary())
        .arg("--help")
        .output()
        .expect("sluice-controller --help");
    let help = String::from_utf8_lossy(&help.stdout);
    let missing: Vec<&&str> = flags
        .iter()
        .filter(|flag| !help.contains(&format!("{flag} ")) && !help.contains(&format!("{flag}\n")))
        .collect();
    assert!(missing.is_empty(), "not in --help: {missing:?}\n{help}");
}

/// Every admin route of the README's routes table is in the OpenAPI document the
/// controller serves, with its methods.
#[test]
fn every_admin_route_the_readme_names_is_served() {
    let text = section(&readme(), "### Routes");
    let controller = Controller::start("", None);
    let document = http::get(&controller.admin_url("/v1/admin/openapi.json"))
        .expect("openapi")
        .json();
    let paths = document["paths"].as_object().expect("paths");
    let mut checked = 0;
    // The document describes every route but itself; it is what was just read.
    for (method, path) in readme_routes(&text)
        .into_iter()
        .filter(|(_, path)| path != "/v1/admin/openapi.json")
    {
        let route = paths
            .get(&path)
            .unwrap_or_else(|| panic!("README names {path}, the document has no such path"));
        assert!(
            route.get(&method).is_some(),
            "README: {method} {path}; the document: {route}"
        );
        checked += 1;
    }
    assert!(checked >= 25, "only {checked} routes read from the README");
}

/// The (method, path) pairs of the routes table: a cell holds claims separated by `;`,
/// each `METHODS /path` with more paths after `, ` (relative to `/v1/admin` when they do
/// not start with it), or `METHODS …/tail` continuing the claim before it.
fn readme_routes(text: &str) -> Vec<(String, String)> {
    let mut routes = Vec::new();
    for line in text.lines().filter(|line| line.starts_with("| `")) {
        let cell = line
            .split(" | ")
            .next()
            .unwrap_or_default()
            .trim_start_matches("| ");
        let mut previous = String::new();
        for claim in cell.split(';') {
            let claim = claim.replace('`', "");
            let claim = claim.trim();
            let Some(split) = claim.find(" /").or_else(|| claim.find(" …")) else {
                continue;
            };
            let methods: Vec<String> = claim[..split]
                .split(',')
                .map(|m| m.trim().to_ascii_lowercase())
                .collect();
            for path in claim[split + 1..].split(", ") {
                let path = path.split(['?', ' ']).next().unwrap_or_default();
                let path = path.replace("{safelist\\|denylist}", "{list}");
                let path = if let Some(tail) = path.strip_prefix('…') {
                    format!("{previous}{tail}")
                } else if path.starts_with("/v1/admin") {
                    path
                } else {
                    format!("/v1/admin{path}")
                };
                previous.clone_from(&path);
                for method in &methods {
                    routes.push((method.clone(), path.clone()));
                }
            }
        }
    }
    routes
}

/// Every `sluice …` command of the README's CLI section is one the CLI takes.
#[test]
fn every_cli_command_the_readme_shows_exists() {
    let text = section(&readme(), "### The CLI");
    let commands: BTreeSet<Vec<String>> = text
        .lines()
        .filter_map(|line| line.trim().strip_prefix("sluice "))
        .map(|rest| {
            rest.split_whitespace()
                .take_while(|word| {
                    !word.starts_with('-') && !word.starts_with('#') && !word.contains(['.', '/'])
                })
                .take(2)
                .map(str::to_owned)
                .collect()
        })
        .collect();
    assert!(commands.len() >= 15, "{commands:?}");
    for command in &commands {
        let mut args: Vec<&str> = command.iter().map(String::as_str).collect();
        // The second word may be an argument (`sluice block ip …`): the CLI's own help for
        // the first word then names it.
        let first = Command::new(cli::binary())
            .args(&args)
            .arg("--help")
            .output()
            .expect("sluice --help");
        if !first.status.success() {
            args.truncate(1);
            let shorter = Command::new(cli::binary())
                .args(&args)
                .arg("--help")
                .output()
                .expect("sluice --help");
            assert!(
                shorter.status.success(),
                "sluice {} is not a command: {}",
                command.join(" "),
                String::from_utf8_lossy(&shorter.stderr)
            );
        }
    }
}
