//! `make bench`: Envoy (`--concurrency 1`) under load from wrk, configurations interleaved
//! round by round so that they share the machine's noise:
//!   (a) no limiter, (b) Envoy's `local_ratelimit` (never reached),
//!   (c) Sluice with the embedded store, (d) Sluice with Redis.
//! Prints RPS, p50 and p99 per configuration and each one's RPS ratio to (a).
//!
//! Settings (environment): BENCH_SECONDS (per run, default 5), BENCH_ROUNDS (default 3),
//! BENCH_CONNECTIONS (default 50).

use std::process::Command;
use std::time::Duration;

use sluice_e2e::envoy::{EnvoyOptions, Filter};
use sluice_e2e::{Controller, Envoy, RedisServer, Upstream};

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
    let output = Command::new("wrk")
        .args([
            "-t1",
            &format!("-c{connections}"),
            &format!("-d{seconds}s"),
            "--latency",
            url,
        ])
        .output()
        .expect("run wrk (make bench installs it)");
    let text = String::from_utf8_lossy(&output.stdout);
    parse_wrk(&text).unwrap_or_else(|| panic!("cannot read wrk's output:\n{text}"))
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

fn main() {
    let seconds = setting("BENCH_SECONDS", 5);
    let rounds = setting("BENCH_ROUNDS", 3);
    let connections = setting("BENCH_CONNECTIONS", 50);

    // Limits so large they are never reached: the benchmark measures the cost of asking.
    let rules = "[[rules]]\nname = \"bench\"\nlimit = 1000000000000\nwindow = \"1h\"\n";
    let upstream = Upstream::start();
    let redis = RedisServer::start();
    let embedded = Controller::start_logging(rules, None, "warn");
    let on_redis = Controller::start_logging(rules, Some(&redis.url()), "warn");
    let envoy = |filter: Filter, controller: Option<&Controller>| {
        Envoy::start(&EnvoyOptions {
            filter,
            upstream_port: upstream.port(),
            controller_ports: controller.map(|c| vec![c.port]).unwrap_or_default(),
            concurrency: 1,
        })
    };
    let configurations = [
        ("(a) Envoy, no limiter", envoy(Filter::None, None)),
        (
            "(b) Envoy local_ratelimit",
            envoy(Filter::LocalRateLimitNeverReached, None),
        ),
        (
            "(c) Sluice, embedded store",
            envoy(Filter::sluice("deny", 1_000), Some(&embedded)),
        ),
        (
            "(d) Sluice, Redis",
            envoy(Filter::sluice("deny", 1_000), Some(&on_redis)),
        ),
    ];

    eprintln!(
        "{} configurations × {rounds} rounds × {seconds} s, wrk -t1 -c{connections}, Envoy --concurrency 1",
        configurations.len()
    );
    let mut runs: Vec<Vec<Run>> = vec![Vec::new(); configurations.len()];
    for round in 1..=rounds {
        for (index, (name, envoy)) in configurations.iter().enumerate() {
            let url = envoy.url("/bench");
            wrk(&url, 1, connections); // warm-up: connections, caches, JIT
            let run = wrk(&url, seconds, connections);
            eprintln!(
                "round {round} {name}: {:.0} req/s, p50 {:.2} ms, p99 {:.2} ms, non-2xx {}",
                run.rps, run.p50_ms, run.p99_ms, run.non_2xx
            );
            runs[index].push(run);
        }
        std::thread::sleep(Duration::from_millis(200));
    }

    let summary = |runs: &[Run]| {
        (
            median(runs.iter().map(|r| r.rps).collect()),
            median(runs.iter().map(|r| r.p50_ms).collect()),
            median(runs.iter().map(|r| r.p99_ms).collect()),
            runs.iter().map(|r| r.non_2xx).sum::<u64>(),
        )
    };
    let (baseline_rps, _, _, _) = summary(&runs[0]);
    let mut table = String::from(
        "| configuration | req/s (median) | ratio to (a) | p50 ms | p99 ms | non-2xx |\n|---|---:|---:|---:|---:|---:|\n",
    );
    for ((name, _), runs) in configurations.iter().zip(&runs) {
        let (rps, p50, p99, non_2xx) = summary(runs);
        table.push_str(&format!(
            "| {name} | {rps:.0} | {:.2} | {p50:.2} | {p99:.2} | {non_2xx} |\n",
            rps / baseline_rps
        ));
    }
    println!("{table}");
    let out = sluice_e2e::repo_root().join("target/bench");
    if std::fs::create_dir_all(&out).is_ok() {
        let _ = std::fs::write(out.join("latest.md"), &table);
    }
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
