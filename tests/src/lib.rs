//! A small harness for tests and benchmarks that own their world: real `redis-server`,
//! real controllers, a real Envoy running the real `.wasm`, each on free loopback ports,
//! waited for by polling and killed when dropped.

pub mod browser;
pub mod certs;
pub mod cli;
pub mod controller;
pub mod delay_proxy;
pub mod envoy;
pub mod fake_llm;
pub mod fixtures;
pub mod http;
pub mod newer_controller;
pub mod process;
pub mod prometheus;
pub mod raw;
pub mod redis_cluster;
pub mod redis_server;
pub mod upstream;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

pub use controller::Controller;
pub use envoy::{Envoy, EnvoyOptions, Filter};
pub use process::Process;
pub use redis_cluster::{RedisCluster, RedisSentinels};
pub use redis_server::RedisServer;
pub use upstream::Upstream;

/// The repository's root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map_or_else(|| PathBuf::from("."), Path::to_path_buf)
}

/// A path from an environment variable, or a default under the repository; panics with a
/// hint when the file is missing, because a test that cannot find its parts must fail,
/// not pass by skipping.
pub fn required_file(variable: &str, default: &Path, hint: &str) -> PathBuf {
    // Relative paths are the repository's: tests run with the package directory as cwd.
    let path = std::env::var_os(variable)
        .map_or_else(|| default.to_path_buf(), |value| repo_root().join(value));
    assert!(
        path.is_file(),
        "{} not found (set {variable} or {hint})",
        path.display()
    );
    path
}

/// A loopback port for a process a test starts, free when checked, and given out once in
/// this test process. Ports come from below the kernel's ephemeral range, counting up from
/// an offset of this process's own: the kernel never hands them out for another socket's
/// `bind(0)` or outgoing connection, and no other test of this run gets the same one, so
/// nothing can take the port between this check and the process binding it.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|range| range.split_whitespace().next()?.parse::<u32>().ok())
        .unwrap_or(32_768);
    const LOWEST: u32 = 10_000;
    let span = ephemeral_low.saturating_sub(LOWEST).max(1_000);
    let offset = std::process::id().wrapping_mul(7_919) % span;
    for _ in 0..span {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = LOWEST + (offset + n) % span;
        let Ok(port) = u16::try_from(port) else {
            continue;
        };
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port below {ephemeral_low}");
}

/// Polls `ready` every 20 ms until it holds or `timeout` passes.
pub fn wait_until(what: &str, timeout: Duration, mut ready: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !ready() {
        assert!(
            Instant::now() < deadline,
            "{what} was not ready within {timeout:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A name no other test in this run uses, for keys and files.
pub fn unique_name(prefix: &str) -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}
