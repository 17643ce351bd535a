//! A small harness for tests and benchmarks that own their world: real `redis-server`,
//! real controllers, a real Envoy running the real `.wasm`, each on free loopback ports,
//! waited for by polling and killed when dropped.

pub mod controller;
pub mod delay_proxy;
pub mod envoy;
pub mod fixtures;
pub mod http;
pub mod process;
pub mod raw;
pub mod redis_server;
pub mod upstream;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

pub use controller::Controller;
pub use envoy::{Envoy, EnvoyOptions, Filter};
pub use process::Process;
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

/// A loopback port that was free a moment ago.
pub fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
    listener.local_addr().expect("local address").port()
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
