//! The monitoring kit of `deploy/monitoring`, proven rather than assumed: `promtool` checks
//! the rules and runs their unit tests (every alert shown firing and quiet); the
//! PrometheusRule is the plain rules file, generated from it; the ServiceMonitor and
//! PodMonitor select what `deploy/kubernetes` and `deploy/istio` ship; the rules that need
//! the controller's stats say so; and a real Prometheus scraping two controllers and two
//! Envoys with the real `.wasm` under traffic (limits biting, leases, a call without a check
//! token, an Envoy whose controller never answers, Redis killed) has a series for every
//! vector selector an alert, a recording rule or a dashboard panel reads. A renamed metric,
//! a wrong label value or a metric that only exists in the README fails here.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use sluice_e2e::controller::ControllerOptions;
use sluice_e2e::envoy::{EnvoyOptions, Filter};
use sluice_e2e::prometheus::{promtool_binary, Prometheus, ScrapeJob};
use sluice_e2e::{free_port, http, repo_root, Controller, Envoy, RedisServer, Upstream};

fn monitoring() -> PathBuf {
    repo_root().join("deploy/monitoring")
}

fn read(path: &std::path::Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Every document of a YAML file.
fn documents(path: &std::path::Path) -> Vec<Value> {
    use serde::Deserialize;
    serde_yaml_ng::Deserializer::from_str(&read(path))
        .map(|document| {
            Value::deserialize(document).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        })
        .collect()
}

fn document(path: &std::path::Path) -> Value {
    let mut all = documents(path);
    assert_eq!(all.len(), 1, "{} holds one document", path.display());
    all.remove(0)
}

fn array<'a>(value: &'a Value, pointer: &str) -> &'a Vec<Value> {
    value
        .pointer(pointer)
        .and_then(Value::as_array)
        .unwrap_or_else(|| panic!("no list at {pointer} in {value}"))
}

// ----- promtool ----------------------------------------------------------------------------

fn promtool(args: &[&str]) -> String {
    let output = Command::new(promtool_binary())
        .args(args)
        .current_dir(monitoring())
        .output()
        .expect("promtool runs");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        output.status.success(),
        "promtool {}: {}\n{text}",
        args.join(" "),
        output.status
    );
    text
}

/// The rules are valid PromQL with valid templates, and their unit tests pass.
#[test]
fn promtool_checks_the_rules_and_runs_their_unit_tests() {
    let checked = promtool(&["check", "rules", "sluice-rules.yaml"]);
    assert!(checked.contains("SUCCESS"), "{checked}");
    let tested = promtool(&["test", "rules", "sluice-rules.test.yaml"]);
    assert!(tested.contains("SUCCESS"), "{tested}");
    // The PrometheusRule holds the same rules (a second opinion on the generated file).
    let generated = tempfile::tempdir().expect("temp dir");
    let spec = document(&monitoring().join("prometheusrule.yaml"))["spec"].clone();
    let plain = generated.path().join("from-prometheusrule.yaml");
    std::fs::write(&plain, spec.to_string()).expect("write");
    promtool(&["check", "rules", &plain.display().to_string()]);
}

/// Every alert has a unit test that shows it firing and one that shows it quiet, and every
/// alert carries a severity and a summary.
#[test]
fn every_alert_has_unit_tests_firing_and_quiet() {
    let rules = document(&monitoring().join("sluice-rules.yaml"));
    let tests = document(&monitoring().join("sluice-rules.test.yaml"));
    assert_eq!(
        array(&tests, "/rule_files"),
        &vec![json!("sluice-rules.yaml")]
    );
    let mut firing = BTreeSet::new();
    let mut quiet = BTreeSet::new();
    for test in array(&tests, "/tests") {
        for case in test["alert_rule_test"].as_array().into_iter().flatten() {
            let name = case["alertname"].as_str().expect("alertname").to_owned();
            if case["exp_alerts"].as_array().is_some_and(|a| !a.is_empty()) {
                firing.insert(name);
            } else {
                quiet.insert(name);
            }
        }
    }
    let alerts: BTreeSet<String> = array(&rules, "/groups")
        .iter()
        .flat_map(|group| array(group, "/rules"))
        .filter_map(|rule| {
            let name = rule["alert"].as_str()?;
            assert!(
                rule["labels"]["severity"].is_string()
                    && rule["annotations"]["summary"].is_string(),
                "{name} needs a severity and a summary"
            );
            Some(name.to_owned())
        })
        .collect();
    assert!(alerts.len() >= 12, "{alerts:?}");
    let never_firing: Vec<_> = alerts.difference(&firing).collect();
    assert!(
        never_firing.is_empty(),
        "no unit test shows these firing: {never_firing:?}"
    );
    let never_quiet: Vec<_> = alerts.difference(&quiet).collect();
    assert!(
        never_quiet.is_empty(),
        "no unit test shows these quiet: {never_quiet:?}"
    );
    let unknown: Vec<_> = firing
        .union(&quiet)
        .filter(|a| !alerts.contains(*a))
        .collect();
    assert!(
        unknown.is_empty(),
        "tests of alerts that do not exist: {unknown:?}"
    );
}

// ----- the PrometheusRule: the plain file, generated -----------------------------------------

const PROMETHEUS_RULE_HEAD: &str = "\
# GENERATED from sluice-rules.yaml by tests/tests/monitoring.rs: do not edit. Change
# sluice-rules.yaml, then `SLUICE_UPDATE_MONITORING=1 cargo test -p sluice-e2e --test
# monitoring the_prometheus_rule` rewrites this file.
apiVersion: monitoring.coreos.com/v1
kind: PrometheusRule
metadata:
  name: sluice
  labels:
    app.kubernetes.io/name: sluice-controller
    app.kubernetes.io/component: monitoring
    app.kubernetes.io/part-of: sluice
spec:
";

/// The PrometheusRule for the plain rules file `rules`: its `groups:` (comments and all)
/// under `spec:`.
fn prometheus_rule(rules: &str) -> String {
    let start = rules
        .find("\ngroups:")
        .expect("sluice-rules.yaml has `groups:` at the top level")
        + 1;
    let mut text = PROMETHEUS_RULE_HEAD.to_owned();
    for line in rules[start..].lines() {
        if !line.is_empty() {
            text.push_str("  ");
            text.push_str(line);
        }
        text.push('\n');
    }
    text
}

#[test]
fn the_prometheus_rule_is_the_rules_file() {
    let rules_text = read(&monitoring().join("sluice-rules.yaml"));
    let path = monitoring().join("prometheusrule.yaml");
    let expected = prometheus_rule(&rules_text);
    if std::env::var_os("SLUICE_UPDATE_MONITORING").is_some() {
        std::fs::write(&path, &expected).expect("write prometheusrule.yaml");
    }
    assert_eq!(
        read(&path),
        expected,
        "deploy/monitoring/prometheusrule.yaml is not generated from sluice-rules.yaml: run \
         SLUICE_UPDATE_MONITORING=1 cargo test -p sluice-e2e --test monitoring \
         the_prometheus_rule"
    );
    // And as a cluster reads them: the same groups.
    let plain = document(&monitoring().join("sluice-rules.yaml"));
    let resource = document(&path);
    assert_eq!(resource["apiVersion"], "monitoring.coreos.com/v1");
    assert_eq!(resource["kind"], "PrometheusRule");
    assert_eq!(resource["spec"]["groups"], plain["groups"]);
    assert!(array(&plain, "/groups").len() >= 2);
}

// ----- the monitors against the manifests ----------------------------------------------------

/// The ServiceMonitor scrapes the controller's admin port (where `/metrics` is, without a
/// token) under the job name the rules query; the PodMonitor scrapes the Envoy sidecars the
/// WasmPlugin selects on Istio's Envoy metrics port; the NetworkPolicy lets Prometheus
/// reach the admin port by the container port's name.
#[test]
fn the_monitors_select_what_deploy_ships() {
    let kubernetes = repo_root().join("deploy/kubernetes");
    let services = documents(&kubernetes.join("services.yaml"));
    let deployment = document(&kubernetes.join("deployment.yaml"));
    let monitor = document(&monitoring().join("controller-servicemonitor.yaml"));
    assert_eq!(monitor["kind"], "ServiceMonitor");
    let wanted = monitor["spec"]["selector"]["matchLabels"]
        .as_object()
        .expect("matchLabels");
    let endpoint = &array(&monitor, "/spec/endpoints")[0];
    let port = endpoint["port"].as_str().expect("a port name");
    assert_eq!(endpoint["path"], "/metrics");
    // Exactly one selected Service has that port: the admin Service.
    let selected: Vec<&Value> = services
        .iter()
        .filter(|service| {
            wanted
                .iter()
                .all(|(k, v)| &service["metadata"]["labels"][k] == v)
        })
        .filter(|service| {
            array(service, "/spec/ports")
                .iter()
                .any(|p| p["name"] == port)
        })
        .collect();
    assert_eq!(selected.len(), 1, "{port}: {selected:?}");
    assert_eq!(selected[0]["metadata"]["name"], "sluice-controller-admin");
    let target_port = array(selected[0], "/spec/ports")
        .iter()
        .find(|p| p["name"] == port)
        .map(|p| p["targetPort"].clone())
        .expect("the port");
    assert_eq!(target_port, "admin");
    // The job name comes from the Service's label: the one the rules' `up{job=…}` names.
    let job_label = monitor["spec"]["jobLabel"].as_str().expect("jobLabel");
    let job = selected[0]["metadata"]["labels"][job_label].clone();
    assert_eq!(job, "sluice-controller");
    let rules = read(&monitoring().join("sluice-rules.yaml"));
    assert!(
        rules.contains(&format!("up{{job={job}}}")),
        "the rules query {job}"
    );
    assert_eq!(
        array(&monitor, "/spec/namespaceSelector/matchNames"),
        &vec![json!("sluice")]
    );
    assert_eq!(
        document(&kubernetes.join("kustomization.yaml"))["namespace"],
        "sluice"
    );

    // Envoy: the sidecars the WasmPlugin runs in.
    let plugin = document(&repo_root().join("deploy/istio/wasmplugin.yaml"));
    let pods = document(&monitoring().join("envoy-podmonitor.yaml"));
    assert_eq!(pods["kind"], "PodMonitor");
    assert_eq!(
        pods["spec"]["selector"]["matchLabels"],
        plugin["spec"]["selector"]["matchLabels"]
    );
    assert_eq!(pods["spec"]["namespaceSelector"]["any"], true);
    let endpoint = &array(&pods, "/spec/podMetricsEndpoints")[0];
    assert_eq!(
        endpoint["port"], "http-envoy-prom",
        "Istio's sidecar port 15090"
    );
    assert_eq!(endpoint["path"], "/stats/prometheus");

    // The NetworkPolicy opens the controller's admin port, by its container port's name.
    let policy = document(&monitoring().join("networkpolicy.yaml"));
    assert_eq!(policy["kind"], "NetworkPolicy");
    assert_eq!(
        policy["spec"]["podSelector"]["matchLabels"],
        deployment["spec"]["selector"]["matchLabels"]
    );
    let container_ports: Vec<&Value> = array(&deployment, "/spec/template/spec/containers/0/ports")
        .iter()
        .map(|p| &p["name"])
        .collect();
    let opened: Vec<&Value> = array(&policy, "/spec/ingress")
        .iter()
        .flat_map(|rule| array(rule, "/ports"))
        .map(|p| &p["port"])
        .collect();
    assert_eq!(opened, vec![&json!("admin")]);
    assert!(container_ports.contains(&&json!("admin")));

    // The kustomization applies every resource here, and the dashboard as a ConfigMap.
    let kustomization = document(&monitoring().join("kustomization.yaml"));
    let listed: BTreeSet<&str> = array(&kustomization, "/resources")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    for resource in [
        "prometheusrule.yaml",
        "controller-servicemonitor.yaml",
        "envoy-podmonitor.yaml",
        "networkpolicy.yaml",
    ] {
        assert!(
            listed.contains(resource),
            "{resource} is not in the kustomization"
        );
    }
    let generated = array(&kustomization, "/configMapGenerator/0/files");
    assert_eq!(generated, &vec![json!("grafana-dashboard.json")]);
}

// ----- what the rules and the dashboard read ---------------------------------------------------

const AGGREGATIONS: &[&str] = &[
    "sum",
    "min",
    "max",
    "avg",
    "group",
    "stddev",
    "stdvar",
    "count",
    "count_values",
    "bottomk",
    "topk",
    "quantile",
];
/// Keywords followed by a list of label names in parentheses.
const LABEL_LIST_KEYWORDS: &[&str] = &[
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
];
const OPERATOR_WORDS: &[&str] = &[
    "and", "or", "unless", "bool", "offset", "atan2", "inf", "nan",
];

/// Where the string, `{…}` or `[…]` opened at `start` ends (the index after it), strings
/// inside skipped.
fn end_of(chars: &[char], start: usize) -> usize {
    let open = chars[start];
    let close = match open {
        '{' => '}',
        '[' => ']',
        '(' => ')',
        quote => quote,
    };
    let mut i = start + 1;
    while i < chars.len() {
        let c = chars[i];
        if c == '\\' && matches!(open, '"' | '\'') {
            i += 2;
            continue;
        }
        if c == close {
            return i + 1;
        }
        if matches!(open, '{' | '[' | '(') && matches!(c, '"' | '\'' | '`') {
            i = end_of(chars, i);
            continue;
        }
        i += 1;
    }
    chars.len()
}

/// The vector selectors of a PromQL expression as written: a metric name with its label
/// matchers (`sluice_decisions_total{outcome="limited"}`), or a bare `{…}`. Not selectors:
/// functions and aggregations (a name before `(`), the label lists after `by`, `on` and
/// the like, strings, numbers and durations, ranges `[5m]`.
fn selectors(expr: &str) -> Vec<String> {
    let chars: Vec<char> = expr.chars().collect();
    let text = |from: usize, to: usize| chars[from..to].iter().collect::<String>();
    let mut found = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if c == '#' {
            while i < chars.len() && chars[i] != '\n' {
                i += 1;
            }
        } else if matches!(c, '"' | '\'' | '`' | '[') {
            i = end_of(&chars, i);
        } else if c == '{' {
            let end = end_of(&chars, i);
            found.push(text(i, end));
            i = end;
        } else if c.is_ascii_digit()
            || (c == '.' && chars.get(i + 1).is_some_and(char::is_ascii_digit))
        {
            // 0.99, 1e-3, 0x1f, 5m.
            i += 1;
            while i < chars.len()
                && (chars[i].is_ascii_alphanumeric()
                    || chars[i] == '.'
                    || (matches!(chars[i], '+' | '-') && matches!(chars[i - 1], 'e' | 'E')))
            {
                i += 1;
            }
        } else if c.is_ascii_alphabetic() || c == '_' || c == ':' {
            let start = i;
            while i < chars.len()
                && (chars[i].is_ascii_alphanumeric() || matches!(chars[i], '_' | ':'))
            {
                i += 1;
            }
            let word = text(start, i);
            let mut next = i;
            while next < chars.len() && chars[next].is_whitespace() {
                next += 1;
            }
            let before = chars.get(next).copied();
            if LABEL_LIST_KEYWORDS.contains(&word.as_str()) {
                if before == Some('(') {
                    i = end_of(&chars, next);
                }
            } else if AGGREGATIONS.contains(&word.as_str())
                || OPERATOR_WORDS.contains(&word.to_ascii_lowercase().as_str())
                || before == Some('(')
            {
                // A function, an aggregation or an operator.
            } else if before == Some('{') {
                let end = end_of(&chars, next);
                found.push(format!("{word}{}", text(next, end)));
                i = end;
            } else {
                found.push(word);
            }
        } else {
            i += 1;
        }
    }
    found
}

#[test]
fn selectors_are_read_from_promql_as_prometheus_would() {
    let expr = r#"sum by (rule) (rate(a_total{x="b}", y=~"c|d"}[5m] offset 1h))
        / on (rule) group_left (tier) b_seconds_bucket > 0.2e-1
        unless on () count(c:rate5m {q='1'}) > 0 and absent(up{job="j"}) # a note d_total
        or max_over_time(e[1m:10s]) * 1e3 + histogram_quantile(0.99, sum by (le) (f)) or {__name__="g"}"#;
    assert_eq!(
        selectors(expr),
        vec![
            r#"a_total{x="b}", y=~"c|d"}"#,
            "b_seconds_bucket",
            "c:rate5m{q='1'}",
            r#"up{job="j"}"#,
            "e",
            "f",
            r#"{__name__="g"}"#,
        ]
    );
}

/// Grafana's variables as a query of the dashboard would run with them: every rule and
/// tier (the dashboard's `All`), a rate interval.
fn grafana_substitute(expr: &str) -> String {
    expr.replace("$__rate_interval", "1m")
        .replace("$__range", "5m")
        .replace("$__interval", "1m")
        .replace("$rule", ".*")
        .replace("$tier", ".*")
}

/// Every expression the kit evaluates, each with where it comes from: the rules, the
/// dashboard's panels, the dashboard's variables (`label_values(selector, label)`).
fn expressions() -> Vec<(String, String)> {
    let mut all = Vec::new();
    let rules = document(&monitoring().join("sluice-rules.yaml"));
    for group in array(&rules, "/groups") {
        for rule in array(group, "/rules") {
            let name = rule["alert"]
                .as_str()
                .or(rule["record"].as_str())
                .expect("a name");
            all.push((
                format!("rule {name}"),
                rule["expr"].as_str().expect("expr").to_owned(),
            ));
        }
    }
    let dashboard: Value =
        serde_json::from_str(&read(&monitoring().join("grafana-dashboard.json")))
            .expect("the dashboard is JSON");
    let mut panels: Vec<&Value> = array(&dashboard, "/panels").iter().collect();
    while let Some(panel) = panels.pop() {
        panels.extend(panel["panels"].as_array().into_iter().flatten());
        for target in panel["targets"].as_array().into_iter().flatten() {
            let expr = target["expr"].as_str().expect("a target's expr");
            all.push((
                format!("panel {:?}", panel["title"].as_str().unwrap_or("")),
                grafana_substitute(expr),
            ));
        }
    }
    for variable in array(&dashboard, "/templating/list") {
        if let Some(query) = variable["query"]["query"].as_str() {
            let inner = query
                .strip_prefix("label_values(")
                .and_then(|rest| rest.rsplit_once(','))
                .map(|(selector, _)| selector.trim().to_owned())
                .unwrap_or_else(|| panic!("variable query {query}: label_values(selector, label)"));
            all.push((format!("variable {}", variable["name"]), inner));
        }
    }
    all
}

/// What `--stats false` takes away, seen on live controllers: the per-rule decisions and the
/// system state are not served, the configuration version stays 0 (the stats' tick sets
/// all three).
const STATS_ONLY: &[&str] = &[
    "sluice_decisions_total",
    "sluice_system_state",
    "sluice_config_version",
];
/// Rules that read a stats-only series on purpose and work without it:
/// `SluiceEnvoyLimitingMuch` fires only while `sluice_decisions_total` is absent.
const WORKS_WITHOUT_STATS: &[&str] = &["SluiceEnvoyLimitingMuch"];

/// The metric name of a selector (`{__name__="x"}` is not used by the kit).
fn metric_name(selector: &str) -> &str {
    selector.split('{').next().unwrap_or(selector)
}

/// Every rule that reads a series `--stats false` removes, itself or through a recording
/// rule, carries `requires: controller-stats`, and no other rule does; and `--stats false`
/// does remove them.
#[test]
fn the_rules_that_need_the_controllers_stats_say_so() {
    let rules = document(&monitoring().join("sluice-rules.yaml"));
    let mut needs_stats: BTreeSet<String> = STATS_ONLY.iter().map(|s| (*s).to_owned()).collect();
    // Recording rules first (the file lists them first), so alerts see what they record.
    for group in array(&rules, "/groups") {
        for rule in array(group, "/rules") {
            let name = rule["alert"]
                .as_str()
                .or(rule["record"].as_str())
                .expect("a name");
            let reads = selectors(rule["expr"].as_str().expect("expr"))
                .iter()
                .any(|selector| needs_stats.contains(metric_name(selector)));
            let labelled = rule["labels"]["requires"] == "controller-stats";
            if WORKS_WITHOUT_STATS.contains(&name) {
                assert!(reads && !labelled, "{name}");
                continue;
            }
            assert_eq!(
                reads, labelled,
                "{name}: reads a series --stats false removes: {reads}; labelled requires: \
                 controller-stats: {labelled}"
            );
            if let (true, Some(record)) = (reads, rule["record"].as_str()) {
                needs_stats.insert(record.to_owned());
            }
        }
    }

    let rule = "[[rules]]\nname = \"r\"\nlimit = 1\nwindow = \"1h\"\n";
    let start = |stats: &str| {
        Controller::start_with(&ControllerOptions {
            extra_args: vec!["--stats".into(), stats.into()],
            log_filter: "info",
            ..ControllerOptions::new(rule, None)
        })
    };
    let (with, without) = (start("true"), start("false"));
    let check =
        json!({ "checks": [{ "client": { "kind": "ip", "value": "192.0.2.1" }, "path": "/" }] });
    for controller in [&with, &without] {
        for _ in 0..2 {
            let reply = http::post_check(&controller.url("/v1/check"), &check).expect("an answer");
            assert_eq!(reply.status, 200, "{reply:?}");
        }
    }
    let has_all = |scraped: &str| {
        scraped.contains("sluice_decisions_total{")
            && scraped.contains("sluice_system_state{")
            && scraped.contains("sluice_config_version 1")
    };
    wait_for(
        "the stats' series with --stats true",
        Duration::from_secs(10),
        || has_all(&scrape(&with)),
        || scrape(&with),
    );
    // The same time has passed for the controller without stats: both checked, none shown.
    let scraped = scrape(&without);
    assert!(
        scraped.contains("sluice_check_call_duration_seconds_count 2"),
        "{scraped}"
    );
    assert!(!scraped.contains("sluice_decisions_total{"), "{scraped}");
    assert!(!scraped.contains("sluice_system_state{"), "{scraped}");
    assert!(scraped.contains("sluice_config_version 0"), "{scraped}");
}

/// Two requests an hour per client on /api/, many on /fresh/ (never denied, so never
/// answered from the filter's denial cache), a leased rule on /leased; every client limited
/// more than once in a minute raises an alert to a webhook nobody answers.
fn config(webhook_port: u16) -> String {
    format!(
        r#"
[[rules]]
name = "per-client"
limit = 2
window = "1h"
match = {{ path_prefix = "/api/" }}

[[rules]]
name = "fresh"
limit = 100000
window = "1h"
match = {{ path_prefix = "/fresh/" }}

[[rules]]
name = "leased"
limit = 10000
window = "1m"
match = {{ path = "/leased" }}
leased = {{ share_percent = 5 }}

[observability]
alerts = {{ limited = 1, period = "1m", webhook = "http://127.0.0.1:{webhook_port}/hook" }}
"#
    )
}

fn scrape(controller: &Controller) -> String {
    http::get(&controller.admin_url("/metrics"))
        .map(|r| r.body)
        .unwrap_or_default()
}

fn wait_for(
    what: &str,
    timeout: Duration,
    mut done: impl FnMut() -> bool,
    context: impl Fn() -> String,
) {
    let deadline = Instant::now() + timeout;
    while !done() {
        assert!(
            Instant::now() < deadline,
            "{what}: not within {timeout:?}\n{}",
            context()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The test that would have caught the README's dead alerts: a real Prometheus scrapes the
/// controllers' `/metrics` and the Envoys' `/stats/prometheus` under traffic that makes every
/// failure counter count, evaluates the rules, and every vector selector of every rule,
/// dashboard panel and dashboard variable returns a series; every dashboard expression is
/// one Prometheus accepts.
#[test]
fn every_series_the_rules_and_the_dashboard_read_exists_under_traffic() {
    let expressions = expressions();
    let mut wanted: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (origin, expr) in &expressions {
        let found = selectors(expr);
        assert!(!found.is_empty(), "{origin}: no selector in {expr}");
        for selector in found {
            wanted.entry(selector).or_default().insert(origin.clone());
        }
    }
    assert!(wanted.len() >= 40, "{wanted:?}");

    let counters = RedisServer::start();
    let configuration = RedisServer::start_durable();
    let webhook_port = free_port();
    let rules = config(webhook_port);
    // Two controllers on the same Redis: the one Envoy asks keeps the default store
    // fallback (`fail`: a check the store cannot answer is a store error, and the filter
    // applies its failure mode); the other answers by `allow` (a fallback answer is no
    // store error).
    let controller_with = |fallback: &str| {
        Controller::start_with(&ControllerOptions {
            log_filter: "info",
            extra_args: [
                "--config-redis-url",
                &configuration.url(),
                "--store-fallback",
                fallback,
                "--store-breaker-failures",
                "3",
                "--store-breaker-open-ms",
                "1000",
            ]
            .map(str::to_owned)
            .to_vec(),
            ..ControllerOptions::new(&rules, Some(&counters.url()))
        })
    };
    let controller = controller_with("fail");
    let allowing = controller_with("allow");
    let upstream = Upstream::start();
    let envoy = Envoy::start(&EnvoyOptions {
        filter: Filter::sluice("allow", 2_000),
        upstream_port: upstream.port(),
        controller_ports: vec![controller.port],
        concurrency: 1,
        controller_http2: false,
    });
    // An Envoy whose controller never answers (nothing listens there): every request it
    // takes gets the failure mode.
    let orphan = Envoy::start(&EnvoyOptions {
        filter: Filter::sluice("allow", 500),
        upstream_port: upstream.port(),
        controller_ports: vec![free_port()],
        concurrency: 1,
        controller_http2: false,
    });
    let rules_file = monitoring().join("sluice-rules.yaml");
    let prometheus = Prometheus::start(
        &[
            ScrapeJob {
                name: "sluice-controller".into(),
                metrics_path: "/metrics".into(),
                targets: vec![
                    format!("127.0.0.1:{}", controller.admin_port),
                    format!("127.0.0.1:{}", allowing.admin_port),
                ],
            },
            ScrapeJob {
                name: "sluice-envoy".into(),
                metrics_path: "/stats/prometheus".into(),
                targets: vec![
                    format!("127.0.0.1:{}", envoy.admin_port),
                    format!("127.0.0.1:{}", orphan.admin_port),
                ],
            },
        ],
        &[&rules_file],
    );

    // Limits biting: two allowed, then refused (by the controller, then the denial cache).
    envoy.wait_until_vms_read_the_configuration(2);
    let statuses: Vec<u16> = (0..6)
        .map(|_| {
            http::get(&envoy.url("/api/items"))
                .expect("through envoy")
                .status
        })
        .collect();
    assert_eq!(statuses, [200, 200, 429, 429, 429, 429]);
    // Leases: the filter asks for one, then admits from it.
    for _ in 0..20 {
        assert_eq!(
            http::get(&envoy.url("/leased"))
                .expect("through envoy")
                .status,
            200
        );
    }
    // The failure mode: allowed without a decision.
    for _ in 0..3 {
        assert_eq!(
            http::get(&orphan.url("/api/items"))
                .expect("through envoy")
                .status,
            200
        );
    }
    // A check call without the check token.
    let unauthenticated =
        http::post_json(&controller.url("/v1/check"), &json!({ "checks": [] })).expect("an answer");
    assert_eq!(unauthenticated.status, 401, "{unauthenticated:?}");
    // The operator moves the system state there and back.
    for state in ["DEGRADED", "NORMAL"] {
        let changed = controller.admin("PUT", "/v1/admin/state", Some(&json!({ "state": state })));
        assert_eq!(changed.status, 200, "{changed:?}");
    }
    // The alert and the lease reports are counted through Redis: let them land first.
    wait_for(
        "the alert raised and the leased admissions reported",
        Duration::from_secs(20),
        || {
            let scraped = scrape(&controller);
            scraped.contains("sluice_leased_admissions_total{")
                && scraped
                    .lines()
                    .any(|l| l.starts_with("sluice_alerts_total ") && !l.ends_with(" 0"))
        },
        || scrape(&controller),
    );

    // Redis away: the store fails, the circuits open, the filter gets 503s and applies its
    // failure mode, the other controller's fallback answers.
    let _away = counters.kill();
    let check = json!({ "checks": [{ "client": { "kind": "ip", "value": "192.0.2.7" }, "path": "/fresh/items" }] });
    wait_for(
        "store errors and fallback answers",
        Duration::from_secs(20),
        || {
            let _ = http::get(&envoy.url("/fresh/items"));
            let _ = http::post_check(&allowing.url("/v1/check"), &check);
            scrape(&controller).contains("sluice_store_errors_total{")
                && scrape(&allowing).contains("sluice_store_fallback_checks_total{")
        },
        || {
            format!(
                "{}\n{}\n{}",
                scrape(&controller),
                scrape(&allowing),
                envoy.log()
            )
        },
    );

    // Every selector returns a series once Prometheus has scraped and evaluated (the
    // webhook's failure takes its retries, about 15 s).
    let deadline = Instant::now() + Duration::from_secs(60);
    let missing = loop {
        let missing: Vec<(&String, &BTreeSet<String>)> = wanted
            .iter()
            .filter(|(selector, _)| {
                prometheus
                    .query(selector)
                    .unwrap_or_else(|e| panic!("Prometheus refuses the selector {e}"))
                    .is_empty()
            })
            .collect();
        if missing.is_empty() || Instant::now() > deadline {
            break missing;
        }
        std::thread::sleep(Duration::from_millis(250));
    };
    let report: Vec<String> = missing
        .iter()
        .map(|(selector, origins)| format!("  {selector}  (read by {origins:?})"))
        .collect();
    assert!(
        missing.is_empty(),
        "no series for these selectors after a minute of scraping:\n{}\n\ntargets:\n{}\n\n\
         controller's /metrics:\n{}\nprometheus log:\n{}",
        report.join("\n"),
        prometheus.targets(),
        scrape(&controller),
        prometheus.log()
    );
    // Every whole expression is one Prometheus evaluates (the dashboard's are checked by
    // nothing else).
    for (origin, expr) in &expressions {
        if let Err(e) = prometheus.query(expr) {
            panic!("{origin}: Prometheus refuses it: {e}");
        }
    }
    eprintln!(
        "{} selectors of {} expressions, every one with a series",
        wanted.len(),
        expressions.len()
    );
}
