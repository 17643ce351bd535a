//! `make bench`, in three parts (`sluice-bench envoy`, `sluice-bench attack`,
//! `sluice-bench strategies`; all by default):
//!
//! envoy: Envoy (`--concurrency 1`) under load from wrk, configurations interleaved round
//! by round so that they share the machine's noise: (a) no limiter, (b) Envoy's
//! `local_ratelimit` (never reached), (c) Sluice with one callout per request and (d)
//! Sluice batching checks across requests, each on the embedded store and on Redis, and (e)
//! Envoy's own rate-limit filter asking the controller's gRPC API (on Redis). Prints
//! RPS, p50 and p99 per configuration and each one's RPS ratio to (a); then, at a fixed
//! light load (200 req/s, open loop), the latency Sluice adds to (a).
//!
//! attack: 90% of requests from one client far over its limit, 10% from many clients
//! under theirs, through Envoy with Sluice on Redis with and without the denial cache, next
//! to bare Envoy and Envoy's `local_ratelimit`: RPS, and how many checks and callouts
//! reached the controller (from Envoy's own stats).
//!
//! strategies: per strategy, the embedded store's cost per decision (in process) and the
//! controller's check calls per second on Redis (wrk straight at the controller), each as a
//! ratio to a baseline measured in the same run.
//!
//! Settings (environment): BENCH_SECONDS (per run, default 5), BENCH_ROUNDS (default 3),
//! BENCH_CONNECTIONS (default 50), BENCH_BASELINE_WASM (another build of the filter, run
//! beside this one in the filter part; `make bench BASELINE=<git ref>` builds and sets it).

use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use sluice_controller::store::{LimitSpec, MemoryStore, Store, SystemClock};
use sluice_controller::strategy::Params;
use sluice_e2e::controller::ControllerOptions;
use sluice_e2e::envoy::{
    rate_limits_yaml, sluice_plugin_config, with_fields, EnvoyOptions, Filter,
};
use sluice_e2e::{http, Controller, Envoy, RedisCluster, RedisServer, Upstream};
use sluice_protocol::Strategy;

fn setting(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// One wrk run's figures.
#[derive(Debug, Clone, Copy)]
struct Run {
    rps: f64,
    p50_ms: f64,
    p99_ms: f64,
    non_2xx: u64,
}

fn millis(text: &str) -> Option<f64> {
    let split = text.find(|c: char| c.is_ascii_alphabetic())?;
    let (number, unit) = text.split_at(split);
    let value: f64 = number.parse().ok()?;
    match unit {
        "us" => Some(value / 1_000.0),
        "ms" => Some(value),
        "s" => Some(value * 1_000.0),
        _ => None,
    }
}

fn parse_wrk(output: &str) -> Option<Run> {
    let mut run = Run {
        rps: 0.0,
        p50_ms: 0.0,
        p99_ms: 0.0,
        non_2xx: 0,
    };
    for line in output.lines().map(str::trim) {
        let mut words = line.split_whitespace();
        match (words.next(), words.next()) {
            (Some("Requests/sec:"), Some(rps)) => run.rps = rps.parse().ok()?,
            (Some("50%"), Some(latency)) => run.p50_ms = millis(latency)?,
            (Some("99%"), Some(latency)) => run.p99_ms = millis(latency)?,
            _ if line.starts_with("Non-2xx or 3xx responses:") => {
                run.non_2xx = line.rsplit(' ').next()?.parse().ok()?;
            }
            _ => {}
        }
    }
    (run.rps > 0.0).then_some(run)
}

fn wrk(url: &str, seconds: u64, connections: u64) -> Run {
    wrk_with(url, seconds, connections, None)
}

/// wrk, with a Lua script that shapes the requests when one is given.
fn wrk_with(url: &str, seconds: u64, connections: u64, script: Option<&std::path::Path>) -> Run {
    let mut command = Command::new("wrk");
    command.args([
        "-t1",
        &format!("-c{connections}"),
        &format!("-d{seconds}s"),
        "--latency",
    ]);
    if let Some(script) = script {
        command.arg("-s").arg(script);
    }
    let output = command
        .arg(url)
        .output()
        .expect("run wrk (make bench installs it)");
    let text = String::from_utf8_lossy(&output.stdout);
    parse_wrk(&text).unwrap_or_else(|| panic!("cannot read wrk's output:\n{text}"))
}

/// CPU time (user + system) a process has used so far, in seconds, from `/proc`: what it
/// cost, whatever else the machine was doing meanwhile.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces) start at `state`, field 3;
    // utime and stime are fields 14 and 15.
    let after_name = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    let ticks = |index: usize| {
        fields
            .get(index)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (ticks(11) + ticks(12)) / clock_ticks_per_second()
}

fn clock_ticks_per_second() -> f64 {
    static TICKS: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *TICKS.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|out| String::from_utf8_lossy(&out.stdout).trim().parse().ok())
            .unwrap_or(100.0)
    })
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

struct Settings {
    seconds: u64,
    rounds: u64,
    connections: u64,
}

fn main() {
    let settings = Settings {
        seconds: setting("BENCH_SECONDS", 5),
        rounds: setting("BENCH_ROUNDS", 3),
        connections: setting("BENCH_CONNECTIONS", 50),
    };
    let part = std::env::args().nth(1).unwrap_or_else(|| "all".to_owned());
    // Run under callgrind by `filter_core_instructions`: one stage, nothing else.
    if part == "filter-core-count" {
        let stage = std::env::args().nth(2).unwrap_or_default();
        let rounds = std::env::args()
            .nth(3)
            .and_then(|n| n.parse().ok())
            .unwrap_or(1);
        FilterCore::new().run_stage(&stage, rounds);
        return;
    }
    let mut report = String::new();
    if matches!(part.as_str(), "all" | "envoy") {
        report.push_str(&envoy_scenarios(&settings));
    }
    if matches!(part.as_str(), "all" | "attack") {
        report.push_str(&attack_scenario(&settings));
    }
    if matches!(part.as_str(), "all" | "filter") {
        report.push_str(&filter_cost_scenario(&settings));
    }
    if matches!(part.as_str(), "all" | "filter" | "rules") {
        report.push_str(&rule_matching_native());
    }
    if matches!(part.as_str(), "all" | "rules") {
        report.push_str(&rules_through_envoy(&settings));
    }
    if matches!(part.as_str(), "all" | "leases") {
        report.push_str(&lease_scenario(&settings));
    }
    if matches!(part.as_str(), "all" | "usage") {
        report.push_str(&usage_scenario(&settings));
    }
    if matches!(part.as_str(), "all" | "strategies") {
        report.push_str(&strategy_scenarios(&settings));
    }
    if part == "cluster" {
        report.push_str(&controller_on_redis(&settings, &[Strategy::FixedWindow]));
    }
    assert!(
        !report.is_empty(),
        "unknown part {part:?}: use envoy, attack, filter, rules, leases, usage, strategies, cluster or all"
    );
    println!("{report}");
    let out = sluice_e2e::repo_root().join("target/bench");
    if std::fs::create_dir_all(&out).is_ok() {
        let _ = std::fs::write(out.join("latest.md"), &report);
    }
}

/// Runs `measure` for each configuration, round after round, and returns every run.
fn interleaved<C>(
    settings: &Settings,
    configurations: &[(&str, C)],
    measure: impl Fn(&C) -> Run,
) -> Vec<Vec<Run>> {
    let mut runs: Vec<Vec<Run>> = vec![Vec::new(); configurations.len()];
    for round in 1..=settings.rounds {
        for (index, (name, configuration)) in configurations.iter().enumerate() {
            let run = measure(configuration);
            eprintln!(
                "round {round} {name}: {:.0} req/s, p50 {:.2} ms, p99 {:.2} ms, non-2xx {}",
                run.rps, run.p50_ms, run.p99_ms, run.non_2xx
            );
            runs[index].push(run);
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    runs
}

/// A markdown table of medians, RPS as a ratio to the first configuration: the ratio of
/// the medians, and the median (and range) of each round's own ratio, which cancels the
/// machine's drift between rounds better.
fn table<C>(title: &str, configurations: &[(&str, C)], runs: &[Vec<Run>]) -> String {
    let summary = |runs: &[Run]| {
        (
            median(runs.iter().map(|r| r.rps).collect()),
            median(runs.iter().map(|r| r.p50_ms).collect()),
            median(runs.iter().map(|r| r.p99_ms).collect()),
            runs.iter().map(|r| r.non_2xx).sum::<u64>(),
        )
    };
    let (baseline_rps, _, _, _) = summary(&runs[0]);
    let mut table = format!(
        "### {title}\n\n| configuration | req/s (median) | ratio to first | ratio per round: median (min–max) | p50 ms | p99 ms | non-2xx |\n|---|---:|---:|---:|---:|---:|---:|\n"
    );
    for ((name, _), config_runs) in configurations.iter().zip(runs) {
        let (rps, p50, p99, non_2xx) = summary(config_runs);
        let per_round: Vec<f64> = config_runs
            .iter()
            .zip(&runs[0])
            .map(|(run, base)| run.rps / base.rps)
            .collect();
        let low = per_round.iter().copied().fold(f64::INFINITY, f64::min);
        let high = per_round.iter().copied().fold(0.0, f64::max);
        table.push_str(&format!(
            "| {name} | {rps:.0} | {:.2} | {:.2} ({low:.2}–{high:.2}) | {p50:.2} | {p99:.2} | {non_2xx} |\n",
            rps / baseline_rps,
            median(per_round.clone())
        ));
    }
    table.push('\n');
    table
}

/// An Envoy with one worker in front of `upstream`, asking `controller` if any, over
/// HTTP/2 if `http2`.
fn one_worker_envoy(
    filter: Filter,
    upstream: &Upstream,
    controller: Option<&Controller>,
    http2: bool,
) -> Envoy {
    Envoy::start(&EnvoyOptions {
        filter,
        upstream_port: upstream.port(),
        controller_ports: controller.map(|c| vec![c.port]).unwrap_or_default(),
        concurrency: 1,
        controller_http2: http2,
    })
}

/// (e): an Envoy with one worker whose own rate-limit filter sends one descriptor (the
/// address) per request to `controller`'s gRPC API, over HTTP/2.
fn native_ratelimit_envoy(upstream: &Upstream, controller: &Controller) -> Envoy {
    Envoy::start(&EnvoyOptions {
        filter: Filter::NativeRateLimit {
            failure_mode_deny: true,
            rate_limits: rate_limits_yaml(&[&["{ remote_address: {} }"]]),
        },
        upstream_port: upstream.port(),
        controller_ports: vec![controller.grpc()],
        concurrency: 1,
        controller_http2: true,
    })
}

fn envoy_scenarios(settings: &Settings) -> String {
    // Limits so large they are never reached: the benchmark measures the cost of asking.
    let rules = "[[rules]]\nname = \"bench\"\nlimit = 1000000000000\nwindow = \"1h\"\n";
    let upstream = Upstream::start();
    let redis = RedisServer::start();
    let embedded = Controller::start_logging(rules, None, "warn");
    // It also serves the gRPC API, for (e).
    let on_redis = Controller::start_with(&ControllerOptions {
        log_filter: "warn",
        grpc: true,
        ..ControllerOptions::new(rules, Some(&redis.url()))
    });
    let per_request = || Filter::sluice_batching("deny", 1_000, false);
    let batched = || Filter::sluice("deny", 1_000);
    // (name, filter, controller, HTTP/2 callouts)
    let specs = [
        ("(a) Envoy, no limiter", Filter::None, None, false),
        (
            "(b) Envoy local_ratelimit",
            Filter::LocalRateLimitNeverReached,
            None,
            false,
        ),
        (
            "(c) Sluice per request, embedded",
            per_request(),
            Some(&embedded),
            false,
        ),
        (
            "(c) Sluice per request, Redis",
            per_request(),
            Some(&on_redis),
            false,
        ),
        (
            "(c) Sluice per request, Redis, HTTP/2",
            per_request(),
            Some(&on_redis),
            true,
        ),
        (
            "(d) Sluice batched, embedded",
            batched(),
            Some(&embedded),
            false,
        ),
        (
            "(d) Sluice batched, Redis",
            batched(),
            Some(&on_redis),
            false,
        ),
        (
            "(d) Sluice batched, Redis, HTTP/2",
            batched(),
            Some(&on_redis),
            true,
        ),
    ];
    // The processes that work for each configuration besides Envoy: (controller, Redis).
    let mut helpers: Vec<[Option<u32>; 2]> = specs
        .iter()
        .map(|(_, _, controller, _)| {
            let redis_pid = controller
                .filter(|c| std::ptr::eq(*c, &on_redis))
                .map(|_| redis.pid());
            [controller.map(Controller::pid), redis_pid]
        })
        .collect();
    let mut configurations: Vec<(&str, Envoy)> = specs
        .into_iter()
        .map(|(name, filter, controller, http2)| {
            (name, one_worker_envoy(filter, &upstream, controller, http2))
        })
        .collect();
    configurations.push((
        "(e) Envoy native ratelimit → Sluice gRPC → Redis",
        native_ratelimit_envoy(&upstream, &on_redis),
    ));
    helpers.push([Some(on_redis.pid()), Some(redis.pid())]);
    let (runs, costs) = costed_rounds(settings, "envoy", &configurations, |index| helpers[index]);
    let mut report = table(
        "Envoy, one worker, saturated (ratio to (a))",
        &configurations,
        &runs,
    );
    report.push_str(&cost_table(&configurations, &costs));

    // Open loop at fixed rates: what a request pays when nothing queues (200 req/s), and
    // under a steady load every configuration can carry, the added latency with queueing.
    let fixed: Vec<&(&str, Envoy)> = configurations
        .iter()
        .filter(|(name, _)| name.starts_with("(a)") || name.contains("Redis"))
        .collect();
    for rate in [200, setting("BENCH_FIXED_RPS", 2_000)] {
        report.push_str(&fixed_rate_table(settings, &fixed, rate));
    }
    report
}

fn fixed_rate_table(settings: &Settings, configurations: &[&(&str, Envoy)], rate: u64) -> String {
    let mut latencies: Vec<Vec<(f64, f64)>> = vec![Vec::new(); configurations.len()];
    for round in 1..=settings.rounds {
        for (index, (name, envoy)) in configurations.iter().enumerate() {
            let (p50, p99) = fixed_rate(&envoy.url("/bench"), rate, settings.seconds);
            eprintln!("round {round} {name} at {rate} req/s: p50 {p50:.3} ms, p99 {p99:.3} ms");
            latencies[index].push((p50, p99));
        }
    }
    let mut report = format!("### Envoy, one worker, {rate} req/s fixed rate (latency from the scheduled send)\n\n| configuration | p50 ms | p99 ms | p50 above (a) ms | p99 above (a) ms |\n|---|---:|---:|---:|---:|\n");
    let medians: Vec<(f64, f64)> = latencies
        .iter()
        .map(|runs| {
            (
                median(runs.iter().map(|r| r.0).collect()),
                median(runs.iter().map(|r| r.1).collect()),
            )
        })
        .collect();
    for ((name, _), (p50, p99)) in configurations.iter().zip(&medians) {
        report.push_str(&format!(
            "| {name} | {p50:.3} | {p99:.3} | {:.3} | {:.3} |\n",
            p50 - medians[0].0,
            p99 - medians[0].1
        ));
    }
    report.push('\n');
    report
}

/// A wrk script: 9 requests in 10 from the client `abuser`, the others each from one of
/// 100000 clients (by the `x-client` header the filter identifies clients by here).
fn attack_script(dir: &std::path::Path) -> std::path::PathBuf {
    let script = r#"request = function()
  local headers = {}
  if math.random(1, 10) <= 9 then
    headers["x-client"] = "abuser"
  else
    headers["x-client"] = "user-" .. math.random(1, 100000)
  end
  return wrk.format(nil, "/bench", headers)
end
"#;
    let file = dir.join("attack.lua");
    std::fs::write(&file, script).expect("write wrk script");
    file
}

/// Envoy counters read before and after a run: calls to the controller, checks decided
/// (the Sluice filter's, or the answers Envoy's own rate-limit filter got) and denial
/// cache hits.
fn counters(envoy: &Envoy) -> [u64; 3] {
    let stat = |name: &str| envoy.stat(name).unwrap_or(0);
    [
        stat("cluster.sluice_controller.upstream_rq_total"),
        stat("wasmcustom.sluice_checks")
            + stat("cluster.upstream.ratelimit.ok")
            + stat("cluster.upstream.ratelimit.over_limit"),
        stat("wasmcustom.sluice_denial_cache_hits"),
    ]
}

/// Interleaved saturated rounds of `configurations` (see [`costed_run`]); `helpers` names
/// the controller and Redis processes of a configuration by its index. Returns each
/// configuration's runs and their costs.
fn costed_rounds(
    settings: &Settings,
    part: &str,
    configurations: &[(&str, Envoy)],
    helpers: impl Fn(usize) -> [Option<u32>; 2],
) -> (Vec<Vec<Run>>, Vec<Vec<[f64; 4]>>) {
    costed_scripted_rounds(settings, part, configurations, helpers, |_| None)
}

/// [`costed_rounds`], each configuration's requests shaped by the wrk script `script`
/// names for its index (none: the same request every time).
fn costed_scripted_rounds<'s>(
    settings: &Settings,
    part: &str,
    configurations: &[(&str, Envoy)],
    helpers: impl Fn(usize) -> [Option<u32>; 2],
    script: impl Fn(usize) -> Option<&'s std::path::Path>,
) -> (Vec<Vec<Run>>, Vec<Vec<[f64; 4]>>) {
    eprintln!(
        "{part}: {} configurations × {} rounds × {} s, wrk -t1 -c{}, Envoy --concurrency 1",
        configurations.len(),
        settings.rounds,
        settings.seconds,
        settings.connections
    );
    let costs = std::cell::RefCell::new(vec![Vec::new(); configurations.len()]);
    let runs = interleaved(settings, configurations, |envoy| {
        let index = configurations
            .iter()
            .position(|(_, e)| e.port == envoy.port)
            .unwrap_or(0);
        let (run, cost) = costed_run(settings, envoy, helpers(index), script(index));
        costs.borrow_mut()[index].push(cost);
        run
    });
    (runs, costs.into_inner())
}

/// A saturated wrk run (after a 1 s warm-up: connections, caches, JIT) with what it cost:
/// CPU µs per request of Envoy and of `helpers` (controller, Redis), and the checks each
/// callout to the controller carried.
fn costed_run(
    settings: &Settings,
    envoy: &Envoy,
    helpers: [Option<u32>; 2],
    script: Option<&std::path::Path>,
) -> (Run, [f64; 4]) {
    let url = envoy.url("/bench");
    wrk_with(&url, 1, settings.connections, script);
    let pids = [Some(envoy.pid()), helpers[0], helpers[1]];
    let before = pids.map(|pid| pid.map_or(0.0, cpu_seconds));
    let [callouts_before, checks_before, _] = counters(envoy);
    let run = wrk_with(&url, settings.seconds, settings.connections, script);
    let after = pids.map(|pid| pid.map_or(0.0, cpu_seconds));
    let [callouts_after, checks_after, _] = counters(envoy);
    let requests = (run.rps * settings.seconds as f64).max(1.0);
    let [envoy_us, controller_us, redis_us] =
        [0, 1, 2].map(|i| (after[i] - before[i]) * 1e6 / requests);
    let per_callout =
        (checks_after - checks_before) as f64 / (callouts_after - callouts_before).max(1) as f64;
    eprintln!(
        "    CPU µs per request: Envoy {envoy_us:.1}, controller {controller_us:.1}, Redis {redis_us:.1}; {per_callout:.1} checks per callout"
    );
    (run, [envoy_us, controller_us, redis_us, per_callout])
}

/// Where Envoy's time goes with the filter, by taking parts away: the Envoy build is
/// stripped, so a profile splits its time by binary only; this splits it by feature.
fn filter_cost_scenario(settings: &Settings) -> String {
    let rules = "[[rules]]\nname = \"bench\"\nlimit = 1000000000000\nwindow = \"1h\"\n";
    let upstream = Upstream::start();
    let redis = RedisServer::start();
    let controller = Controller::start_logging(rules, Some(&redis.url()), "warn");
    // The same controller without stats, alerts or the log of limited requests: what they
    // cost the check path.
    let without_stats = Controller::start_with(&ControllerOptions {
        log_filter: "warn",
        extra_args: vec!["--stats".into(), "false".into()],
        ..ControllerOptions::new(rules, Some(&redis.url()))
    });
    let batched = |extra: serde_json::Value| {
        Filter::sluice_with(&with_fields(sluice_plugin_config("deny", 1_000), extra))
    };
    const WITHOUT_STATS: &str = "Sluice batched (defaults), controller --stats false";
    let specs = [
        ("(a) Envoy, no limiter", Filter::None),
        (
            "Sluice, every path exempt (the filter runs, asks nobody)",
            batched(serde_json::json!({ "exempt_paths": ["/**"] })),
        ),
        (
            "Sluice batched, headers ietf (2 response headers)",
            batched(serde_json::json!({ "headers": "ietf" })),
        ),
        (
            "Sluice batched, no denial cache",
            batched(serde_json::json!({ "denial_cache": { "enabled": false } })),
        ),
        (
            "Sluice batched, max_batches_in_flight 1",
            batched(serde_json::json!({ "max_batches_in_flight": 1 })),
        ),
        ("Sluice batched (defaults)", batched(serde_json::json!({}))),
        (WITHOUT_STATS, batched(serde_json::json!({}))),
    ];
    // Another build of the filter (`make bench BASELINE=<git ref>`), beside this one in the
    // same run: the ratio between them is what a change did.
    let baseline = std::env::var_os("BENCH_BASELINE_WASM").map(std::path::PathBuf::from);
    // A build from before the check token knows no `token_env` and sends no credential: it
    // asks a controller (same Redis, same rules) whose check address is open, so the ratio
    // between the two includes what the credential costs.
    let open_controller = baseline.as_ref().map(|_| {
        Controller::start_with(&ControllerOptions {
            log_filter: "warn",
            check_tokens: None,
            ..ControllerOptions::new(rules, Some(&redis.url()))
        })
    });
    let baseline_specs = baseline.iter().flat_map(|wasm| {
        let from = |extra: serde_json::Value| {
            let mut plugin = with_fields(sluice_plugin_config("deny", 1_000), extra);
            if let Some(controller) = plugin["controller"].as_object_mut() {
                controller.remove("token_env");
            }
            Filter::SluiceBuild {
                plugin_config: plugin.to_string(),
                wasm: wasm.clone(),
            }
        };
        [
            (
                "baseline build: every path exempt",
                from(serde_json::json!({ "exempt_paths": ["/**"] })),
            ),
            (
                "baseline build: batched (defaults)",
                from(serde_json::json!({})),
            ),
        ]
    });
    let asked_by = |name: &str| -> &Controller {
        match (name, &open_controller) {
            (WITHOUT_STATS, _) => &without_stats,
            (name, Some(open)) if name.starts_with("baseline build") => open,
            _ => &controller,
        }
    };
    let configurations: Vec<(&str, Envoy)> = specs
        .into_iter()
        .chain(baseline_specs)
        .map(|(name, filter)| {
            let asks = !matches!(filter, Filter::None);
            let asked = asked_by(name);
            let envoy = one_worker_envoy(filter, &upstream, asks.then_some(asked), false);
            (name, envoy)
        })
        .collect();
    let (runs, costs) = costed_rounds(settings, "filter", &configurations, |index| {
        let asked = asked_by(configurations.get(index).map_or("", |(name, _)| *name));
        [Some(asked.pid()), Some(redis.pid())]
    });
    let mut report = table(
        "The filter's parts, one worker, saturated (ratio to (a))",
        &configurations,
        &runs,
    );
    report.push_str(&cost_table(&configurations, &costs));
    report.push_str(&filter_core_native());
    report
}

/// The whole check path at 1, 100, 1,000 and 10,000 rules in force: each size's controller
/// (its own Redis: a controller takes the configuration its store holds) holds that many
/// rules, each on its own path prefix. Each request comes from one of 10,000 clients at
/// random, and a client's path falls under one rule's prefix, so every check matches one
/// rule of all of them and every size counts the same 10,000 keys: only matching differs
/// between the sizes, not how widely the store's writes spread. Beside them, bare Envoy and
/// the exempt filter (the floor), one worker, saturated.
fn rules_through_envoy(settings: &Settings) -> String {
    const SIZES: [usize; 4] = [1, 100, 1_000, 10_000];
    const CLIENTS: usize = 10_000;
    let rules_text = |count: usize| -> String {
        (0..count)
            .map(|n| {
                format!(
                    "[[rules]]\nname = \"r{n}\"\nlimit = 1000000000000\nwindow = \"1h\"\nmatch = {{ path_prefix = \"/api/items/{n}/\" }}\n\n"
                )
            })
            .collect()
    };
    let upstream = Upstream::start();
    let stores: Vec<RedisServer> = SIZES.iter().map(|_| RedisServer::start()).collect();
    let controllers: Vec<Controller> = SIZES
        .iter()
        .zip(&stores)
        .map(|(count, redis)| {
            Controller::start_logging(&rules_text(*count), Some(&redis.url()), "warn")
        })
        .collect();
    let dir = tempfile::tempdir().expect("temp dir");
    let scripts: Vec<std::path::PathBuf> = SIZES
        .iter()
        .map(|count| {
            let file = dir.path().join(format!("rules-{count}.lua"));
            // 10,000 clients whatever the number of rules: each client's requests match one
            // rule, so every size counts 10,000 keys and only matching differs.
            let script = format!(
                "request = function()\n  local client = math.random(0, {CLIENTS} - 1)\n  return wrk.format(nil, \"/api/items/\" .. (client % {count}) .. \"/\" .. client, {{ [\"x-client\"] = \"client-\" .. client }})\nend\n"
            );
            std::fs::write(&file, script).expect("write wrk script");
            file
        })
        .collect();
    let sluice = |extra: serde_json::Value| {
        let identity = serde_json::json!({
            "identity": { "client_header": "x-client", "order": ["header", "ip"] }
        });
        Filter::sluice_with(&with_fields(
            with_fields(sluice_plugin_config("deny", 1_000), identity),
            extra,
        ))
    };
    let names: Vec<String> = SIZES
        .iter()
        .map(|&count| {
            let plural = if count == 1 { "" } else { "s" };
            format!("Sluice batched, {count} rule{plural} in force")
        })
        .collect();
    let mut configurations: Vec<(&str, Envoy)> = vec![
        (
            "(a) Envoy, no limiter",
            one_worker_envoy(Filter::None, &upstream, None, false),
        ),
        (
            "Sluice, every path exempt (the floor)",
            one_worker_envoy(
                sluice(serde_json::json!({ "exempt_paths": ["/**"] })),
                &upstream,
                Some(&controllers[0]),
                false,
            ),
        ),
    ];
    for (name, controller) in names.iter().zip(&controllers) {
        configurations.push((
            name.as_str(),
            one_worker_envoy(
                sluice(serde_json::json!({})),
                &upstream,
                Some(controller),
                false,
            ),
        ));
    }
    // The largest size again, its controller without stats (on the same Redis): what the
    // per-rule stats cost as rules grow.
    let largest = SIZES.len() - 1;
    let without_stats = Controller::start_with(&ControllerOptions {
        log_filter: "warn",
        extra_args: vec!["--stats".into(), "false".into()],
        ..ControllerOptions::new(&rules_text(SIZES[largest]), Some(&stores[largest].url()))
    });
    configurations.push((
        "Sluice batched, 10000 rules in force, controller --stats false",
        one_worker_envoy(
            sluice(serde_json::json!({})),
            &upstream,
            Some(&without_stats),
            false,
        ),
    ));
    let (runs, costs) = costed_scripted_rounds(
        settings,
        "rules",
        &configurations,
        |index| match index.checked_sub(2) {
            Some(size) if size < SIZES.len() => {
                [Some(controllers[size].pid()), Some(stores[size].pid())]
            }
            Some(_) => [Some(without_stats.pid()), Some(stores[largest].pid())],
            None => [None, None],
        },
        // The first two (and the last) take the largest size's requests.
        |index| {
            let size = index.checked_sub(2).unwrap_or(largest).min(largest);
            Some(scripts[size].as_path())
        },
    );
    let mut report = table(
        "The check path by the number of rules in force, one worker, saturated (ratio to (a))",
        &configurations,
        &runs,
    );
    report.push_str(&cost_table(&configurations, &costs));
    report
}

/// Usage rules on the check path, one worker saturated: a plain route while no usage rule
/// is in force and while a token rule is in force on another route (the plain route must
/// cost the same: a request that holds no reservation reads no body), and streamed replies
/// of the fake model server (`POST /v1/chat/completions`, ten events each, usage in the
/// last) without a limiter and with the token rule reserving and settling each one.
fn usage_scenario(settings: &Settings) -> String {
    let plain = "[[rules]]\nname = \"plain\"\nlimit = 1000000000000\nwindow = \"1h\"\nmatch = { path = \"/plain\" }\n";
    let with_tokens = format!(
        "{plain}\n[[rules]]\nname = \"tokens\"\nlimit = 1000000000000\nwindow = \"1h\"\nmatch = {{ path = \"/v1/chat/completions\" }}\nusage = {{ json_pointer = \"/usage/total_tokens\", reserve = 1000 }}\n"
    );
    let upstream = Upstream::start();
    // One Redis each: a controller takes the configuration the store already holds.
    let plain_redis = RedisServer::start();
    let tokens_redis = RedisServer::start();
    let plain_controller = Controller::start_logging(plain, Some(&plain_redis.url()), "warn");
    let tokens_controller =
        Controller::start_logging(&with_tokens, Some(&tokens_redis.url()), "warn");
    let sluice = || {
        Filter::sluice_with(&with_fields(
            sluice_plugin_config("deny", 1_000),
            serde_json::json!({
                "identity": { "client_header": "x-client", "order": ["header", "ip"] }
            }),
        ))
    };
    let dir = tempfile::tempdir().expect("temp dir");
    let plain_script = dir.path().join("plain.lua");
    std::fs::write(
        &plain_script,
        "request = function()\n  return wrk.format(nil, \"/plain\", { [\"x-client\"] = \"client-\" .. math.random(1, 5000) })\nend\n",
    )
    .expect("write wrk script");
    let streamed_script = dir.path().join("streamed.lua");
    std::fs::write(
        &streamed_script,
        r#"local body = '{"messages":[{"role":"user","content":"bench"}],"max_tokens":10,"stream":true,"stream_options":{"include_usage":true}}'
request = function()
  return wrk.format("POST", "/v1/chat/completions", { ["x-client"] = "client-" .. math.random(1, 5000), ["content-type"] = "application/json" }, body)
end
"#,
    )
    .expect("write wrk script");
    let configurations: Vec<(&str, Envoy)> = vec![
        (
            "(a) Envoy, no limiter, plain route",
            one_worker_envoy(Filter::None, &upstream, None, false),
        ),
        (
            "Sluice, plain route, a token rule in force on another route",
            one_worker_envoy(sluice(), &upstream, Some(&tokens_controller), false),
        ),
        (
            "Sluice, plain route, no usage rule in force",
            one_worker_envoy(sluice(), &upstream, Some(&plain_controller), false),
        ),
        (
            "Envoy, no limiter, streamed replies",
            one_worker_envoy(Filter::None, &upstream, None, false),
        ),
        (
            "Sluice, streamed replies, a token rule reserving and settling each",
            one_worker_envoy(sluice(), &upstream, Some(&tokens_controller), false),
        ),
    ];
    let (runs, costs) = costed_scripted_rounds(
        settings,
        "usage",
        &configurations,
        |index| match index {
            2 => [Some(plain_controller.pid()), Some(plain_redis.pid())],
            1 | 4 => [Some(tokens_controller.pid()), Some(tokens_redis.pid())],
            _ => [None, None],
        },
        |index| {
            Some(if index < 3 {
                plain_script.as_path()
            } else {
                streamed_script.as_path()
            })
        },
    );
    let mut report = table(
        "Usage rules, one worker, saturated (ratio to (a); the streamed rows compare with each other)",
        &configurations,
        &runs,
    );
    report.push_str(&cost_table(&configurations, &costs));
    report
}

/// A wrk script: each request from one of 5000 clients (by `x-client`), at random.
fn many_clients_script(dir: &std::path::Path) -> std::path::PathBuf {
    let script = r#"request = function()
  return wrk.format(nil, "/bench", { ["x-client"] = "client-" .. math.random(1, 5000) })
end
"#;
    let file = dir.join("many-clients.lua");
    std::fs::write(&file, script).expect("write wrk script");
    file
}

/// Lease mode against exact batching, one worker saturated: a single hot key (every
/// request from one client) and 5000 keys, with the exempt filter as the floor any wasm
/// filter pays; then an accuracy run with a limit that is reached.
fn lease_scenario(settings: &Settings) -> String {
    let exact_rules = "[[rules]]\nname = \"bench\"\nlimit = 1000000000000\nwindow = \"1h\"\n";
    let leased_rules = format!("{exact_rules}leased = {{}}\n");
    let upstream = Upstream::start();
    // One Redis each: a controller takes the configuration the store already holds.
    let redis = RedisServer::start();
    let leased_redis = RedisServer::start();
    // Another for the second hot-key Envoy: a worker's lease of a fixed window lasts to the
    // window's end, and on one key the first worker would hold the whole lease quota.
    let second_redis = RedisServer::start();
    let exact = Controller::start_logging(exact_rules, Some(&redis.url()), "warn");
    let leased = Controller::start_logging(&leased_rules, Some(&leased_redis.url()), "warn");
    let second = Controller::start_logging(&leased_rules, Some(&second_redis.url()), "warn");
    let sluice = |extra: serde_json::Value| {
        let identity = serde_json::json!({
            "identity": { "client_header": "x-client", "order": ["header", "ip"] }
        });
        Filter::sluice_with(&with_fields(
            with_fields(sluice_plugin_config("deny", 1_000), identity),
            extra,
        ))
    };
    let specs: [(&str, Filter, Option<&Controller>, bool); 8] = [
        ("(a) Envoy, no limiter", Filter::None, None, false),
        (
            "Sluice, every path exempt (the floor)",
            sluice(serde_json::json!({ "exempt_paths": ["/**"] })),
            Some(&exact),
            false,
        ),
        (
            "exact batched, one hot key",
            sluice(serde_json::json!({})),
            Some(&exact),
            false,
        ),
        (
            "leased, one hot key",
            sluice(serde_json::json!({})),
            Some(&leased),
            false,
        ),
        (
            "leased, one hot key, IETF headers only (2 of 5)",
            sluice(serde_json::json!({ "headers": "ietf" })),
            Some(&second),
            false,
        ),
        (
            "exact batched, 5000 keys",
            sluice(serde_json::json!({})),
            Some(&exact),
            true,
        ),
        (
            "leased, 5000 keys",
            sluice(serde_json::json!({})),
            Some(&leased),
            true,
        ),
        ("(a) Envoy, no limiter, 5000 keys", Filter::None, None, true),
    ];
    let dir = tempfile::tempdir().expect("temp dir");
    let script = many_clients_script(dir.path());
    let scripted: Vec<bool> = specs.iter().map(|(_, _, _, many)| *many).collect();
    let asked: Vec<[Option<u32>; 2]> = specs
        .iter()
        .map(|(_, _, controller, _)| match controller {
            Some(c) if c.pid() == leased.pid() => [Some(c.pid()), Some(leased_redis.pid())],
            Some(c) if c.pid() == second.pid() => [Some(c.pid()), Some(second_redis.pid())],
            Some(c) => [Some(c.pid()), Some(redis.pid())],
            None => [None, None],
        })
        .collect();
    let configurations: Vec<(&str, Envoy)> = specs
        .into_iter()
        .map(|(name, filter, controller, _)| {
            (name, one_worker_envoy(filter, &upstream, controller, false))
        })
        .collect();
    let (runs, costs) = costed_scripted_rounds(
        settings,
        "leases",
        &configurations,
        |index| asked[index],
        |index| scripted[index].then_some(script.as_path()),
    );
    let mut report = table(
        "Lease mode, one worker, saturated (ratio to (a))",
        &configurations,
        &runs,
    );
    report.push_str(&cost_table(&configurations, &costs));
    report.push_str(&envoy_busy_table(&configurations, &runs, &costs));
    if let Some((_, envoy)) = configurations
        .iter()
        .find(|(name, _)| *name == "exact batched, one hot key")
    {
        report.push_str(&round_trip_by_stage(settings, envoy, &exact));
    }
    report.push_str(&lease_accuracy(&upstream));
    report
}

/// Where an exact request's wait goes, from one more saturated run: the request as wrk saw
/// it, the callout as Envoy timed it (its cluster's `upstream_rq_time`, over this Envoy's
/// runs), the controller's time per call and the store's per script call (means, from its
/// histograms' sums and counts over this run).
fn round_trip_by_stage(settings: &Settings, envoy: &Envoy, controller: &Controller) -> String {
    let scrape = || {
        http::get(&controller.admin_url("/metrics"))
            .map(|r| r.body)
            .unwrap_or_default()
    };
    let value = |text: &str, series: &str| -> f64 {
        text.lines()
            .find_map(|line| line.strip_prefix(series))
            .and_then(|rest| rest.trim().split(' ').next()?.parse().ok())
            .unwrap_or(0.0)
    };
    let before = scrape();
    let [callouts_before, checks_before, _] = counters(envoy);
    let run = wrk(&envoy.url("/bench"), settings.seconds, settings.connections);
    let after = scrape();
    let [callouts_after, checks_after, _] = counters(envoy);
    let mean_ms = |sum: &str, count: &str| {
        let calls = value(&after, count) - value(&before, count);
        (value(&after, sum) - value(&before, sum)) * 1e3 / calls.max(1.0)
    };
    let controller_ms = mean_ms(
        "sluice_check_call_duration_seconds_sum ",
        "sluice_check_call_duration_seconds_count ",
    );
    let store_ms = mean_ms(
        r#"sluice_store_command_duration_seconds_sum{command="check"} "#,
        r#"sluice_store_command_duration_seconds_count{command="check"} "#,
    );
    let quantiles = http::get(&format!(
        "http://127.0.0.1:{}/stats?filter=^cluster.sluice_controller.upstream_rq_time$",
        envoy.admin_port
    ))
    .map(|r| r.body)
    .unwrap_or_default();
    // `P50(interval,cumulative)`: the cumulative one.
    let quantile = |name: &str| -> String {
        quantiles
            .split_once(&format!("{name}("))
            .and_then(|(_, rest)| rest.split_once(')'))
            .and_then(|(pair, _)| pair.split_once(','))
            .map_or_else(|| "?".to_owned(), |(_, cumulative)| cumulative.to_owned())
    };
    let per_callout =
        (checks_after - checks_before) as f64 / (callouts_after - callouts_before).max(1) as f64;
    format!(
        "### Exact batched, one hot key: where the wait goes\n\n\
         | stage | time |\n|---|---:|\n\
         | request, as wrk saw it (p50 / p99) | {:.2} / {:.2} ms |\n\
         | the batch's callout, as Envoy timed it (p50 / p99, ms resolution) | {} / {} ms |\n\
         | the controller, per call (mean) | {controller_ms:.3} ms |\n\
         | of which the store's script call (mean) | {store_ms:.3} ms |\n\
         | checks per callout | {per_callout:.1} |\n\n",
        run.p50_ms,
        run.p99_ms,
        quantile("P50"),
        quantile("P99"),
    )
}

/// How busy Envoy's one worker was: its CPU per request times requests per second.
fn envoy_busy_table<C>(
    configurations: &[(&str, C)],
    runs: &[Vec<Run>],
    costs: &[Vec<[f64; 4]>],
) -> String {
    let mut table = String::from(
        "### Envoy's CPU while saturated (share of one core, median over rounds)\n\n| configuration | Envoy CPU |\n|---|---:|\n",
    );
    for (((name, _), runs), costs) in configurations.iter().zip(runs).zip(costs) {
        let busy = median(
            runs.iter()
                .zip(costs)
                .map(|(run, cost)| run.rps * cost[0] / 1e6)
                .collect(),
        );
        table.push_str(&format!("| {name} | {:.0} % |\n", busy * 100.0));
    }
    table.push('\n');
    table
}

/// A leased and an exact rule with a limit that is reached (20000 per 10 s window), each
/// driven far past it for most of one window: admitted against the limit and the bound.
fn lease_accuracy(upstream: &Upstream) -> String {
    const LIMIT: u64 = 20_000;
    let rules = |leased: bool| {
        format!(
            "[[rules]]\nname = \"accuracy\"\nlimit = {LIMIT}\nwindow = \"10s\"\n{}",
            if leased {
                "leased = { share_percent = 5 }\n"
            } else {
                ""
            }
        )
    };
    let mut table = String::from(
        "### Accuracy: one window of 10 s, limit 20000, one client far past it\n\n| rule | admitted | limit | bound (5 %) | within |\n|---|---:|---:|---:|---|\n",
    );
    for leased in [false, true] {
        let redis = RedisServer::start();
        let controller = Controller::start_logging(&rules(leased), Some(&redis.url()), "warn");
        let envoy = one_worker_envoy(
            Filter::sluice_with(&sluice_plugin_config("deny", 1_000)),
            upstream,
            Some(&controller),
            false,
        );
        let url = envoy.url("/bench");
        // 200 ms into a window, for 9 s: every admission is that window's.
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let start = (now / 10_000 + 1) * 10_000 + 200;
        std::thread::sleep(Duration::from_millis(start - now));
        // Admitted: what reached the upstream.
        let upstream_requests = || {
            envoy
                .stat("cluster.upstream.upstream_rq_total")
                .unwrap_or(0)
        };
        let before = upstream_requests();
        let run = wrk(&url, 9, 50);
        let admitted = upstream_requests() - before;
        let requests = (run.rps * 9.0).round() as u64;
        let bound = LIMIT * 5 / 100;
        let within = admitted <= LIMIT && admitted + bound >= LIMIT;
        eprintln!("accuracy, leased {leased}: about {requests} requests, {admitted} admitted");
        table.push_str(&format!(
            "| {} | {admitted} | {LIMIT} | {bound} | {} |\n",
            if leased { "leased" } else { "exact" },
            if within { "yes" } else { "NO" }
        ));
    }
    table.push('\n');
    table
}

/// The filter's own work per request, natively (the same code and optimisation level as the
/// `.wasm`, without V8): what of Envoy's time the filter's Rust could at most win back.
/// The controller's rule matching (`Snapshot::rules_for`) per check, natively, with 1 to
/// 10,000 rules in force: a third for exact paths, a third for path prefixes, a third for a
/// host each with a glob, and one for every request. Beside it, in the same run, a scan of
/// every rule (what matching cost before the index). The ratio is to 100 rules, the first
/// size at which requests find a rule of each kind.
fn rule_matching_native() -> String {
    use serde_json::json;
    use sluice_controller::config::snapshot::Snapshot;
    use sluice_protocol::admin::Operations;
    use sluice_protocol::config::ConfigDocument;
    use sluice_protocol::Check;
    const CHECKS: usize = 4_096;
    let rule = |n: usize, matcher: serde_json::Value| json!({ "name": format!("r{n}"), "limit": 1_000, "window": "1m", "match": matcher });
    let check = |host: &str, path: String| -> Check {
        serde_json::from_value(json!({
            "client": { "kind": "ip", "value": "192.0.2.1" },
            "host": host, "method": "GET", "path": path,
        }))
        .expect("a check")
    };
    let mut table = "### Rule matching per check, natively (the controller's snapshot)\n\nIndexed twice: requests asking for a third of all rules in turn (at 10,000 rules each pass touches megabytes of rules and index, past the L2 cache), and requests asking for the same number of rules at every size (33 of each kind, spread over all of them), which is the index's own cost.\n\n| rules in force | indexed ns per check, a third of the rules asked | ratio to 100 rules | indexed ns per check, 33 of each kind asked | ratio to 100 rules | scan of every rule, ns per check | rules matched per check |\n|---:|---:|---:|---:|---:|---:|---:|\n".to_owned();
    let mut rows = Vec::new();
    for count in [1usize, 100, 1_000, 10_000] {
        let mut rules = vec![rule(0, json!({}))];
        rules.extend((1..count).map(|n| match n % 3 {
            0 => rule(n, json!({ "path": format!("/api/items/{}", n / 3) })),
            1 => rule(n, json!({ "path_prefix": format!("/teams/{}/", n / 3) })),
            _ => rule(
                n,
                json!({ "host": format!("h{}.test", n / 3), "path_glob": "/v1/*/x" }),
            ),
        }));
        let document: ConfigDocument =
            serde_json::from_value(json!({ "rules": rules })).expect("a configuration");
        // Requests to a rule of every kind that exists at this size, and to none but the
        // rule for all: the same rules matched per check at every size from 100 on.
        let ids = (count / 3).max(1);
        let requests = |id: &dyn Fn(usize) -> usize| -> Vec<Check> {
            (0..CHECKS)
                .map(|n| match n % 4 {
                    0 => check("any.test", format!("/api/items/{}", 1 + id(n))),
                    1 => check("any.test", format!("/teams/{}/members", id(n))),
                    2 => check(&format!("h{}.test", id(n)), "/v1/users/x".to_owned()),
                    _ => check("any.test", format!("/elsewhere/{n}")),
                })
                .collect()
        };
        let checks = requests(&|n| n % ids);
        // The same 33 of each kind at every size (all of them at 100 rules), spread over all.
        let stride = (ids / 33).max(1);
        let hot_checks = requests(&|n| (n % ids.min(33)) * stride);
        let snapshot = Snapshot::build(1, document, Operations::default()).expect("valid");
        // One pass to warm up, then timed passes (fewer for the scan, whose passes are long).
        let time = |checks: &[Check], matched: &dyn Fn(&Check) -> usize, rounds: usize| {
            checks.iter().for_each(|check| {
                std::hint::black_box(matched(check));
            });
            let mut total = 0usize;
            let began = Instant::now();
            for _ in 0..rounds {
                for check in checks {
                    total += matched(std::hint::black_box(check));
                }
            }
            let checks_run = (rounds * CHECKS) as f64;
            (
                began.elapsed().as_nanos() as f64 / checks_run,
                total as f64 / checks_run,
            )
        };
        let (indexed_ns, matched) = time(&checks, &|check| snapshot.rules_for(check).count(), 20);
        let (hot_ns, hot_matched) =
            time(&hot_checks, &|check| snapshot.rules_for(check).count(), 20);
        let scan_rounds = (20_000 / count).clamp(1, 20);
        let (scan_ns, scanned) = time(
            &checks,
            &|check| snapshot.rules.matching(check).count(),
            scan_rounds,
        );
        assert_eq!(
            matched, scanned,
            "the index and the scan match the same rules"
        );
        assert_eq!(matched, hot_matched, "both request sets match alike");
        rows.push((count, indexed_ns, hot_ns, scan_ns, matched));
    }
    // From 100 rules on, each request matches the same rules: the flatness is measured there.
    let (base, hot_base) = rows.get(1).map_or((1.0, 1.0), |row| (row.1, row.2));
    for (count, indexed_ns, hot_ns, scan_ns, matched) in rows {
        table.push_str(&format!(
            "| {count} | {indexed_ns:.0} | {:.2} | {hot_ns:.0} | {:.2} | {scan_ns:.0} | {matched:.2} |\n",
            indexed_ns / base,
            hot_ns / hot_base
        ));
    }
    table.push('\n');
    table
}

/// The filter's own work on a batch of checks, stage by stage, natively: what
/// [`filter_core_native`] times and [`filter_core_instructions`] counts.
struct FilterCore {
    config: sluice_filter::config::FilterConfig,
    reply: String,
}

/// Checks per batch in [`FilterCore`]: about what a saturated worker sends per callout.
const CORE_BATCH: usize = 17;
/// The stages of [`FilterCore`], as the tables name them and `filter-core-count` takes them.
const CORE_STAGES: [(&str, &str); 4] = [
    ("build", "identify, build the check, fingerprint it"),
    ("encode", "encode the batch (JSON)"),
    ("decode", "decode the reply (JSON)"),
    ("verdict", "verdict and response headers"),
];

impl FilterCore {
    fn new() -> Self {
        let config =
            sluice_filter::config::FilterConfig::parse(br#"{"controller":{"cluster":"c"}}"#)
                .expect("plugin config");
        let decision_json = r#"{"allowed":true,"policy":{"rule":"bench","strategy":"fixed_window","limit":1000000000000,"remaining":999999999000,"reset_ms":41000,"retry_after_ms":0,"window_ms":3600000}}"#;
        let reply = format!(
            r#"{{"decisions":[{}]}}"#,
            vec![decision_json; CORE_BATCH].join(",")
        );
        FilterCore { config, reply }
    }

    fn build(&self) -> Vec<sluice_protocol::Check> {
        use sluice_filter::{decision, denial, identity};
        let facts = identity::Facts {
            peer: Some("127.0.0.1:50123"),
            forwarded_for: None,
            token_header: None,
            verified_claims: None,
            api_key: None,
            client_header: None,
        };
        (0..CORE_BATCH)
            .map(|_| {
                let identity =
                    identity::identify(&self.config.identity, &facts, 0).expect("identity");
                let check = decision::check_for(&identity, "127.0.0.1:10000", "GET", "/bench", 1);
                std::hint::black_box(denial::slot_key(denial::fingerprint(&check, 1), 4096));
                check
            })
            .collect()
    }

    /// As a worker does: each check encoded as it joins the batch, the call body put
    /// together from them when the batch leaves.
    fn encode(&self, checks: &[sluice_protocol::Check]) -> Vec<u8> {
        use sluice_filter::batch::{Batcher, Limits, Member};
        let mut batcher = Batcher::new(Limits {
            max_batch: CORE_BATCH,
            max_in_flight: 1,
            max_waiting: CORE_BATCH,
        });
        for (context_id, check) in (0..).zip(checks) {
            let member = Member {
                context_id,
                slot: Default::default(),
                fingerprint: 0,
                failure_mode: sluice_filter::config::FailureMode::Allow,
            };
            batcher.register(member, check);
        }
        batcher.next_batch(None, false).expect("a batch").body
    }

    fn decode(&self) -> Vec<sluice_protocol::Decision> {
        sluice_filter::decision::decisions_from_reply(
            Some("200"),
            self.reply.as_bytes(),
            CORE_BATCH,
        )
        .expect("decode")
    }

    fn verdict(&self, decisions: &[sluice_protocol::Decision]) {
        for decided in decisions {
            std::hint::black_box(sluice_filter::decision::verdict_for_decision(
                &self.config,
                decided,
                None,
            ));
        }
    }

    /// `rounds` batches of one stage alone (its inputs made once, before): what callgrind
    /// counts for `sluice-bench filter-core-count <stage> <rounds>`.
    fn run_stage(&self, stage: &str, rounds: usize) {
        let checks = self.build();
        let decisions = self.decode();
        for _ in 0..rounds {
            match stage {
                "build" => drop(std::hint::black_box(self.build())),
                "encode" => drop(std::hint::black_box(self.encode(&checks))),
                "decode" => drop(std::hint::black_box(self.decode())),
                "verdict" => self.verdict(&decisions),
                other => panic!("no stage {other}"),
            }
        }
    }
}

fn filter_core_native() -> String {
    const ROUNDS: usize = 20_000;
    let core = FilterCore::new();
    let mut spent = [Duration::ZERO; 4];
    for _ in 0..ROUNDS {
        let began = Instant::now();
        let checks = core.build();
        let built = Instant::now();
        std::hint::black_box(core.encode(&checks));
        let encoded = Instant::now();
        let decisions = core.decode();
        let decoded = Instant::now();
        core.verdict(&decisions);
        let settled = Instant::now();
        for (total, part) in spent.iter_mut().zip([
            built - began,
            encoded - built,
            decoded - encoded,
            settled - decoded,
        ]) {
            *total += part;
        }
    }
    let per_request = |d: Duration| d.as_nanos() as f64 / (ROUNDS * CORE_BATCH) as f64;
    let instructions = filter_core_instructions();
    let mut table = format!("### The filter's own work per request, natively (batches of {CORE_BATCH})\n\nInstructions are counted by callgrind (the same on every run: what a change to this code did, beside the noise the times carry).\n\n| step | ns per request | instructions per request |\n|---|---:|---:|\n");
    let counted = |i: usize| {
        instructions
            .as_ref()
            .map_or_else(|| "–".to_owned(), |counts| format!("{:.0}", counts[i]))
    };
    for (i, ((_, step), total)) in CORE_STAGES.iter().zip(spent).enumerate() {
        table.push_str(&format!(
            "| {step} | {:.0} | {} |\n",
            per_request(total),
            counted(i)
        ));
    }
    table.push_str(&format!(
        "| all | {:.0} | {} |\n\n",
        per_request(spent.iter().sum()),
        instructions.as_ref().map_or_else(
            || "– (valgrind not found)".to_owned(),
            |counts| format!("{:.0}", counts.iter().sum::<f64>())
        )
    ));
    table
}

/// Instructions per request of each [`CORE_STAGES`] stage, counted by callgrind: this
/// binary run under valgrind twice per stage (`filter-core-count`), with `ROUNDS` and twice
/// as many batches, so that everything but the stage's own work cancels out. `None` without
/// valgrind.
fn filter_core_instructions() -> Option<Vec<f64>> {
    const ROUNDS: usize = 200;
    let me = std::env::current_exe().ok()?;
    let count = |stage: &str, rounds: usize| -> Option<f64> {
        let output = Command::new("valgrind")
            .args(["--tool=callgrind", "--callgrind-out-file=/dev/null"])
            .arg(&me)
            .args(["filter-core-count", stage, &rounds.to_string()])
            .output()
            .ok()?;
        let stderr = String::from_utf8_lossy(&output.stderr);
        stderr
            .lines()
            .find_map(|line| line.split("Collected :").nth(1))
            .and_then(|n| n.trim().parse().ok())
    };
    CORE_STAGES
        .iter()
        .map(|(stage, _)| {
            let once = count(stage, ROUNDS)?;
            let twice = count(stage, 2 * ROUNDS)?;
            Some((twice - once) / (ROUNDS * CORE_BATCH) as f64)
        })
        .collect()
}

fn attack_scenario(settings: &Settings) -> String {
    // Each client: 100 requests per second. The abuser sends thousands.
    let rules = "[[rules]]\nname = \"per-client\"\nlimit = 100\nwindow = \"1s\"\n";
    let upstream = Upstream::start();
    let redis = RedisServer::start();
    let controller = Controller::start_logging(rules, Some(&redis.url()), "warn");
    let sluice = |denial_cache: bool| {
        Filter::sluice_with(&with_fields(
            sluice_plugin_config("deny", 1_000),
            serde_json::json!({
                "identity": { "client_header": "x-client", "order": ["header", "ip"] },
                "denial_cache": { "enabled": denial_cache }
            }),
        ))
    };
    let envoy = |filter, controller| one_worker_envoy(filter, &upstream, controller, false);
    let configurations = [
        ("(a) Envoy, no limiter", envoy(Filter::None, None)),
        (
            "(b) Envoy local_ratelimit (one bucket, never reached)",
            envoy(Filter::LocalRateLimitNeverReached, None),
        ),
        (
            "(c) Sluice batched, Redis, denial cache",
            envoy(sluice(true), Some(&controller)),
        ),
        (
            "(d) Sluice batched, Redis, no denial cache",
            envoy(sluice(false), Some(&controller)),
        ),
    ];
    let dir = tempfile::tempdir().expect("temp dir");
    let script = attack_script(dir.path());
    eprintln!(
        "attack: {} configurations × {} rounds × {} s, wrk -t1 -c{}, 90% from one client",
        configurations.len(),
        settings.rounds,
        settings.seconds,
        settings.connections
    );
    let mut runs: Vec<Vec<(Run, [u64; 3])>> = vec![Vec::new(); configurations.len()];
    for round in 1..=settings.rounds {
        for (index, (name, envoy)) in configurations.iter().enumerate() {
            let url = envoy.url("/bench");
            wrk_with(&url, 1, settings.connections, Some(&script));
            let before = counters(envoy);
            let run = wrk_with(&url, settings.seconds, settings.connections, Some(&script));
            let after = counters(envoy);
            let delta = [0, 1, 2].map(|i| after[i].saturating_sub(before[i]));
            eprintln!(
                "round {round} {name}: {:.0} req/s, non-2xx {}, callouts {}, checks {}, cache hits {}",
                run.rps, run.non_2xx, delta[0], delta[1], delta[2]
            );
            runs[index].push((run, delta));
        }
    }
    for (name, envoy) in &configurations {
        let log = envoy.log();
        let tail: Vec<&str> = log
            .lines()
            .filter(|l| l.contains("wasm") || l.contains("panic"))
            .rev()
            .take(8)
            .collect();
        eprintln!("DEBUG {name}:\n{}", tail.join("\n"));
    }
    let baseline = median(runs[0].iter().map(|(r, _)| r.rps).collect());
    let mut report = String::from(
        "### Attack: 90% of requests from one client over its limit (100/s), 10% from 100000 others\n\n| configuration | req/s (median) | ratio to (a) | p99 ms | refused (429) per s | callouts to the controller per s | checks decided by the controller per s |\n|---|---:|---:|---:|---:|---:|---:|\n",
    );
    for ((name, _), runs) in configurations.iter().zip(&runs) {
        let rps = median(runs.iter().map(|(r, _)| r.rps).collect());
        let p99 = median(runs.iter().map(|(r, _)| r.p99_ms).collect());
        let per_second = |value: u64| value as f64 / settings.seconds as f64;
        let refused = median(runs.iter().map(|(r, _)| per_second(r.non_2xx)).collect());
        let callouts = median(runs.iter().map(|(_, d)| per_second(d[0])).collect());
        let decided = median(
            runs.iter()
                .map(|(_, d)| per_second(d[1].saturating_sub(d[2])))
                .collect(),
        );
        report.push_str(&format!(
            "| {name} | {rps:.0} | {:.2} | {p99:.2} | {refused:.0} | {callouts:.0} | {decided:.0} |\n",
            rps / baseline
        ));
    }
    report.push('\n');
    report
}

/// CPU per request of each process, medians over rounds: a measure of cost that the
/// machine's noise (other tenants, steal time) moves far less than requests per second.
/// Per configuration and round: CPU µs per request of Envoy, the controller and Redis, and
/// the checks each callout to the controller carried (0 without callouts).
fn cost_table<C>(configurations: &[(&str, C)], costs: &[Vec<[f64; 4]>]) -> String {
    let medians: Vec<[f64; 5]> = costs
        .iter()
        .map(|rounds| {
            let part = |i: usize| median(rounds.iter().map(|c| c[i]).collect());
            let all = median(rounds.iter().map(|c| c[0] + c[1] + c[2]).collect());
            [part(0), part(1), part(2), all, part(3)]
        })
        .collect();
    let base = medians.first().copied().unwrap_or([1.0; 5]);
    let mut table = String::from(
        "### CPU per request (µs, from /proc, median over rounds)\n\n| configuration | Envoy | controller | Redis | all | Envoy ratio to (a) | all ratio to (a) | checks per callout |\n|---|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for ((name, _), m) in configurations.iter().zip(&medians) {
        table.push_str(&format!(
            "| {name} | {:.1} | {:.1} | {:.1} | {:.1} | {:.2} | {:.2} | {:.1} |\n",
            m[0],
            m[1],
            m[2],
            m[3],
            m[0] / base[0],
            m[3] / base[3],
            m[4]
        ));
    }
    table.push('\n');
    table
}

/// Open-loop load at `rps` requests per second for `seconds`: each request is due at a
/// fixed time and its latency counts from then, so a slow answer cannot hide the ones that
/// should have been sent meanwhile (no coordinated omission). Returns (p50, p99) in ms.
fn fixed_rate(url: &str, rps: u64, seconds: u64) -> (f64, f64) {
    let total = rps * seconds;
    let interval = Duration::from_nanos(1_000_000_000 / rps);
    let start = Instant::now() + Duration::from_millis(50);
    let next = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let workers: Vec<_> = (0..16)
        .map(|_| {
            let (next, url) = (Arc::clone(&next), url.to_owned());
            std::thread::spawn(move || {
                let agent: ureq::Agent = ureq::Agent::config_builder()
                    .http_status_as_error(false)
                    .timeout_global(Some(Duration::from_secs(5)))
                    .build()
                    .into();
                let mut latencies = Vec::new();
                loop {
                    let n = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    if n >= total {
                        return latencies;
                    }
                    let due = start + interval * n as u32;
                    if let Some(wait) = due.checked_duration_since(Instant::now()) {
                        std::thread::sleep(wait);
                    }
                    let ok = agent.get(&url).call().is_ok_and(|r| r.status() == 200);
                    assert!(ok, "a request failed under light load");
                    latencies.push(due.elapsed().as_secs_f64() * 1_000.0);
                }
            })
        })
        .collect();
    let mut all: Vec<f64> = workers
        .into_iter()
        .flat_map(|w| w.join().expect("worker"))
        .collect();
    all.sort_by(f64::total_cmp);
    let at = |q: f64| all[((all.len() as f64 * q) as usize).min(all.len() - 1)];
    (at(0.50), at(0.99))
}

/// Rules for the strategy benchmark: one per strategy, on its own path, never reached by
/// the 10000 clients the load spreads over.
fn strategy_rules() -> String {
    let fields = [
        ("fixed_window", "limit = 1000000000000\nwindow = \"1h\""),
        ("sliding_window_log", "limit = 100000\nwindow = \"1h\""),
        (
            "sliding_window_counter",
            "limit = 1000000000\nwindow = \"1h\"",
        ),
        (
            "token_bucket",
            "limit = 1000000000\nwindow = \"1h\"\nburst = 1000000000",
        ),
        (
            "gcra",
            "limit = 1000000000\nwindow = \"1h\"\nburst = 1000000000",
        ),
        (
            "leaky_bucket",
            "limit = 1000000000\nwindow = \"1h\"\nmax_delay = \"0s\"",
        ),
        ("concurrency", "limit = 1000000000000\nlease = \"1s\""),
    ];
    fields
        .iter()
        .map(|(strategy, fields)| {
            format!("[[rules]]\nname = \"{strategy}\"\nstrategy = \"{strategy}\"\n{fields}\nmatch = {{ path_prefix = \"/{strategy}\" }}\n\n")
        })
        .collect()
}

/// A wrk script that posts one check for `path`, from one of 10000 clients at random.
fn check_script(dir: &std::path::Path, path: &str) -> std::path::PathBuf {
    let script = format!(
        r#"wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer {token}"
request = function()
  local body = '{{"checks":[{{"client":{{"kind":"ip","value":"10.0.' .. math.random(0, 9999) .. '"}},"path":"{path}"}}]}}'
  return wrk.format(nil, "/v1/check", nil, body)
end
"#,
        token = sluice_e2e::controller::CHECK_TOKEN
    );
    let file = dir.join(format!("check{}.lua", path.replace('/', "_")));
    std::fs::write(&file, script).expect("write wrk script");
    file
}

fn strategy_scenarios(settings: &Settings) -> String {
    let mut report = String::from("### Embedded store, cost per decision (in process, one thread)\n\n| strategy | ns per decision | ratio to fixed_window |\n|---|---:|---:|\n");
    let decisions = 200_000u64;
    let mut baseline_ns = 0.0;
    for strategy in Strategy::ALL {
        let store = MemoryStore::new(Arc::new(SystemClock));
        let params = match strategy {
            Strategy::SlidingWindowLog => Params {
                strategy,
                limit: 100_000,
                period_ms: 3_600_000,
                extra: 0,
                penalty: None,
            },
            Strategy::Concurrency => Params {
                strategy,
                limit: u64::MAX / 2,
                period_ms: 1_000,
                extra: 0,
                penalty: None,
            },
            Strategy::LeakyBucket => Params {
                strategy,
                limit: 1_000_000_000,
                period_ms: 3_600_000,
                extra: 0,
                penalty: None,
            },
            _ => Params {
                strategy,
                limit: 1_000_000_000,
                period_ms: 3_600_000,
                extra: 1_000_000_000,
                penalty: None,
            },
        };
        let keys: Vec<String> = (0..10_000)
            .map(|n| format!("sluice:{{bench}}:{}:r:{n}", strategy.as_str()))
            .collect();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime");
        let began = Instant::now();
        runtime.block_on(async {
            for n in 0..decisions {
                let limit = LimitSpec {
                    key: keys[(n % 10_000) as usize].clone(),
                    params,
                    cost: 1,
                };
                let outcome = store
                    .check(
                        std::slice::from_ref(&limit),
                        "0123456789abcdef0123456789abcdef",
                    )
                    .await;
                assert!(
                    outcome.is_ok_and(|o| o.allowed()),
                    "{strategy:?} denied in the benchmark"
                );
            }
        });
        let ns = began.elapsed().as_nanos() as f64 / decisions as f64;
        if strategy == Strategy::FixedWindow {
            baseline_ns = ns;
        }
        eprintln!("embedded {}: {ns:.0} ns per decision", strategy.as_str());
        report.push_str(&format!(
            "| {} | {ns:.0} | {:.2} |\n",
            strategy.as_str(),
            ns / baseline_ns
        ));
    }
    report.push('\n');

    report.push_str(&controller_on_redis(settings, &Strategy::ALL));
    report
}

/// Check calls per second of a controller on a single Redis, per strategy of `strategies`,
/// and of one on a three-master Redis Cluster (fixed window), in the same rounds, as ratios
/// to a call that matches no rule (the `cluster` part runs only this, for fixed windows).
fn controller_on_redis(settings: &Settings, strategies: &[Strategy]) -> String {
    let redis = RedisServer::start();
    let controller = Controller::start_logging(&strategy_rules(), Some(&redis.url()), "warn");
    let cluster = RedisCluster::start(3);
    let on_cluster = Controller::start_with(&ControllerOptions {
        log_filter: "warn",
        extra_args: vec![
            "--redis-cluster-nodes".into(),
            cluster.urls().join(","),
            "--redis-timeout-ms".into(),
            "2000".into(),
        ],
        ..ControllerOptions::new(&strategy_rules(), None)
    });
    let dir = tempfile::tempdir().expect("temp dir");
    let url = format!("http://127.0.0.1:{}", controller.port);
    let cluster_url = format!("http://127.0.0.1:{}", on_cluster.port);
    let mut configurations = vec![(
        "no rule matches (no Redis call)".to_owned(),
        (url.clone(), check_script(dir.path(), "/none")),
    )];
    for strategy in strategies {
        configurations.push((
            strategy.as_str().to_owned(),
            (
                url.clone(),
                check_script(dir.path(), &format!("/{}", strategy.as_str())),
            ),
        ));
    }
    configurations.push((
        "fixed_window on a 3-master Redis Cluster".to_owned(),
        (cluster_url, check_script(dir.path(), "/fixed_window")),
    ));
    let configurations: Vec<(&str, (String, std::path::PathBuf))> = configurations
        .iter()
        .map(|(name, c)| (name.as_str(), c.clone()))
        .collect();
    eprintln!(
        "strategies: controller on Redis (and on a Redis Cluster), wrk -t1 -c{} straight at /v1/check",
        settings.connections
    );
    let seconds = settings.seconds.div_ceil(2).max(2);
    let runs = interleaved(settings, &configurations, |(url, script)| {
        wrk_with(url, seconds, settings.connections, Some(script))
    });
    table(
        "Controller check calls per second on Redis, per strategy, and on a Redis Cluster (ratio to no rule)",
        &configurations,
        &runs,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_wrk_latency_output() {
        let output = "Running 5s test @ http://127.0.0.1:1/bench
  1 threads and 50 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     2.10ms  400.00us  12.00ms   90.00%
  Latency Distribution
     50%  850.00us
     75%    1.20ms
     90%    2.00ms
     99%    1.05s
  52000 requests in 5.00s, 9.00MB read
  Non-2xx or 3xx responses: 7
Requests/sec:  10400.50
Transfer/sec:      1.80MB
";
        let run = parse_wrk(output).unwrap();
        assert_eq!(run.rps, 10_400.5);
        assert_eq!(run.p50_ms, 0.85);
        assert_eq!(run.p99_ms, 1_050.0);
        assert_eq!(run.non_2xx, 7);
    }
}
