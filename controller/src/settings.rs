//! Command-line and environment settings.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Parser;

#[derive(Debug, Clone, Parser)]
#[command(
    name = "sluice-controller",
    version,
    about = "Sluice rate-limit controller"
)]
pub struct Settings {
    /// Rules file (TOML). Without one, no rule applies and every check is allowed.
    #[arg(long, env = "SLUICE_CONFIG")]
    pub config: Option<PathBuf>,

    /// Address to serve the check call, health and readiness on.
    #[arg(long, env = "SLUICE_LISTEN", default_value = "127.0.0.1:8081")]
    pub listen: SocketAddr,

    /// Redis to keep counters in (`redis://[:password@]host:port[/db]`). Without it the
    /// embedded in-memory store is used: counters are local to this process.
    #[arg(long, env = "SLUICE_REDIS_URL")]
    pub redis_url: Option<String>,

    /// How long a Redis command may take before the check fails (and the filter applies its
    /// failure mode).
    #[arg(long, env = "SLUICE_REDIS_TIMEOUT_MS", default_value_t = 100,
          value_parser = clap::value_parser!(u64).range(1..=60_000))]
    pub redis_timeout_ms: u64,
}
