//! The controller's own settings: from a settings file (`--settings`, TOML), environment
//! variables and flags, the later winning (flag or variable over file over default), all
//! checked at start with errors that name the setting.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use clap::Parser;
use serde::Deserialize;

use crate::config::ConfigSource;
use crate::store::breaker::{BreakerSettings, Fallback};
use crate::store::RedisTarget;

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    /// For people: one line per event, fields as `key=value`.
    Text,
    /// For collectors: one JSON object per line (`timestamp`, `level`, `target`, and the
    /// event's fields beside them, `message` among them).
    Json,
}

/// How strict the controller is about what it needs to run safely.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// Refuses to start without an admin token, without a check token (the proxies'
    /// credential) and without a store that keeps acknowledged changes (Redis, or
    /// `--state-file` for the embedded store).
    Production,
    /// Starts anyway: without admin tokens the admin API is not served; without check
    /// tokens anyone who reaches the check address is taken for a proxy; without a state
    /// file changes are kept in memory only. For tests and trying things out.
    Development,
}

#[derive(Debug, Clone, Default, Parser)]
#[command(
    name = "sluice-controller",
    version,
    long_version = concat!(env!("CARGO_PKG_VERSION"), " (commit ", env!("SLUICE_COMMIT"), ")"),
    about = "Sluice rate-limit controller"
)]
pub struct Flags {
    /// Settings file (TOML) with any of the settings below, by their long names with `_`.
    #[arg(long, env = "SLUICE_SETTINGS")]
    pub settings: Option<PathBuf>,
    /// Address of the check call, the filter's configuration view, /healthz and /readyz
    /// [default: 127.0.0.1:8081].
    #[arg(long, env = "SLUICE_LISTEN")]
    pub listen: Option<SocketAddr>,
    /// Address of the admin API [default: 127.0.0.1:8082].
    #[arg(long, env = "SLUICE_ADMIN_LISTEN")]
    pub admin_listen: Option<SocketAddr>,
    /// Address of Envoy's rate-limit service API (gRPC), for Envoy's own
    /// `envoy.filters.http.ratelimit` filter [default: not served].
    #[arg(long, env = "SLUICE_GRPC_LISTEN")]
    pub grpc_listen: Option<SocketAddr>,
    /// Redis for the counters (`redis://[:password@]host:port[/db]`). Without it the
    /// embedded in-memory store is used: counters are then local to this process.
    #[arg(long, env = "SLUICE_REDIS_URL")]
    pub redis_url: Option<String>,
    /// Redis for the configuration and audit log [default: the counters' Redis]. It must
    /// keep what it acknowledged (appendonly yes, appendfsync always).
    #[arg(long, env = "SLUICE_CONFIG_REDIS_URL")]
    pub config_redis_url: Option<String>,
    /// How long a Redis command may take before it fails [default: 100].
    #[arg(long, env = "SLUICE_REDIS_TIMEOUT_MS")]
    pub redis_timeout_ms: Option<u64>,
    /// What answers checks while the counters' Redis cannot (its circuit is open): fail
    /// (the filter's failure mode applies), allow, deny, or local (this controller's
    /// embedded store) [default: fail].
    #[arg(long, env = "SLUICE_STORE_FALLBACK", value_enum)]
    pub store_fallback: Option<Fallback>,
    /// Consecutive failed Redis calls that open the circuit [default: 3].
    #[arg(long, env = "SLUICE_STORE_BREAKER_FAILURES")]
    pub store_breaker_failures: Option<u32>,
    /// How long the circuit stays open before one call probes Redis [default: 1000].
    #[arg(long, env = "SLUICE_STORE_BREAKER_OPEN_MS")]
    pub store_breaker_open_ms: Option<u64>,
    /// A configuration file (TOML, YAML or JSON) to start from.
    #[arg(long, env = "SLUICE_CONFIG")]
    pub config: Option<PathBuf>,
    /// What wins when the store and --config disagree at start [default: store].
    #[arg(long, env = "SLUICE_CONFIG_SOURCE", value_enum)]
    pub config_source: Option<ConfigSource>,
    /// Where the embedded store keeps the configuration (without Redis).
    #[arg(long, env = "SLUICE_STATE_FILE")]
    pub state_file: Option<PathBuf>,
    /// Admin API tokens (TOML: `[[tokens]]` with name, role, token or sha256). Tokens can
    /// also come from SLUICE_ADMIN_TOKENS (`name:role:token;…`).
    #[arg(long, env = "SLUICE_ADMIN_TOKENS_FILE")]
    pub admin_tokens_file: Option<PathBuf>,
    /// The check tokens the proxies present on the check address and the gRPC API
    /// (`Authorization: Bearer`): one per line, or `sha256:<hex>`. Tokens can also come
    /// from SLUICE_CHECK_TOKENS (`token,token`); several at once allow a rotation.
    #[arg(long, env = "SLUICE_CHECK_TOKENS_FILE")]
    pub check_tokens_file: Option<PathBuf>,
    /// production or development [default: production].
    #[arg(long, env = "SLUICE_MODE", value_enum)]
    pub mode: Option<Mode>,
    /// How often the configuration's version is read from the store [default: 500].
    #[arg(long, env = "SLUICE_CONFIG_POLL_MS")]
    pub config_poll_ms: Option<u64>,
    /// How many entries the audit log keeps [default: 1000].
    #[arg(long, env = "SLUICE_AUDIT_LENGTH")]
    pub audit_length: Option<usize>,
    /// text or json [default: text].
    #[arg(long, env = "SLUICE_LOG_FORMAT", value_enum)]
    pub log_format: Option<LogFormat>,
    /// Keep stats (per rule and tier, top clients), alerts and logs of limited requests
    /// [default: true]; false leaves the check path with counting only in the store.
    #[arg(long, env = "SLUICE_STATS")]
    pub stats: Option<bool>,
    /// Also serve /metrics on the check address [default: false].
    #[arg(long, env = "SLUICE_CHECK_METRICS")]
    pub check_metrics: Option<bool>,
    /// This controller's name in shared stats [default: host name and process id].
    #[arg(long, env = "SLUICE_CONTROLLER_ID")]
    pub controller_id: Option<String>,
    // -- Redis Cluster and Sentinel (instead of --redis-url) --
    /// Redis Cluster seed nodes for the counters and the configuration
    /// (`redis://host:port,redis://host:port`), instead of --redis-url.
    #[arg(long, env = "SLUICE_REDIS_CLUSTER_NODES", value_delimiter = ',')]
    pub redis_cluster_nodes: Vec<String>,
    /// Redis Sentinels that name the master (`redis://host:port,…`), instead of --redis-url;
    /// with --redis-sentinel-master.
    #[arg(long, env = "SLUICE_REDIS_SENTINELS", value_delimiter = ',')]
    pub redis_sentinels: Vec<String>,
    /// The name the Sentinels know the master by.
    #[arg(long, env = "SLUICE_REDIS_SENTINEL_MASTER")]
    pub redis_sentinel_master: Option<String>,
    // -- The listeners' bounds (listener.rs) --
    /// How long a connection may take to send its first request and an HTTP/1.1 request's
    /// head (on the check address its body too), and how long an idle HTTP/1.1 connection is
    /// kept; on the gRPC API, how long a connection may take to send HTTP/2's preface
    /// [default: 5000].
    #[arg(long, env = "SLUICE_HEADER_READ_TIMEOUT_MS")]
    pub header_read_timeout_ms: Option<u64>,
    /// Connections the check address holds at once; more are closed as they come
    /// [default: 1024].
    #[arg(long, env = "SLUICE_CHECK_MAX_CONNECTIONS")]
    pub check_max_connections: Option<usize>,
    /// Connections the admin API holds at once [default: 128].
    #[arg(long, env = "SLUICE_ADMIN_MAX_CONNECTIONS")]
    pub admin_max_connections: Option<usize>,
    /// Connections the gRPC API holds at once [default: 256].
    #[arg(long, env = "SLUICE_GRPC_MAX_CONNECTIONS")]
    pub grpc_max_connections: Option<usize>,
    // -- TLS on the listeners (listener.rs) --
    /// The certificate chain (PEM, the listeners' own certificate first) the listeners
    /// present; with --tls-key-file, the check address, the gRPC API and the admin API
    /// speak TLS only [default: no TLS].
    #[arg(long, env = "SLUICE_TLS_CERT_FILE")]
    pub tls_cert_file: Option<PathBuf>,
    /// The private key (PEM: PKCS#8, PKCS#1 or SEC1) of --tls-cert-file.
    #[arg(long, env = "SLUICE_TLS_KEY_FILE")]
    pub tls_key_file: Option<PathBuf>,
    /// CA certificates (PEM): the check address and the gRPC API then require a client
    /// certificate issued by one of them (mTLS) [default: no client certificate asked].
    #[arg(long, env = "SLUICE_TLS_CLIENT_CA_FILE")]
    pub tls_client_ca_file: Option<PathBuf>,
    /// Whether the admin API speaks TLS too when the other listeners do [default: true].
    #[arg(long, env = "SLUICE_ADMIN_TLS")]
    pub admin_tls: Option<bool>,
}

/// The settings file: the same settings as the flags, snake_case.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileSettings {
    listen: Option<SocketAddr>,
    admin_listen: Option<SocketAddr>,
    grpc_listen: Option<SocketAddr>,
    redis_url: Option<String>,
    config_redis_url: Option<String>,
    redis_timeout_ms: Option<u64>,
    store_fallback: Option<Fallback>,
    store_breaker_failures: Option<u32>,
    store_breaker_open_ms: Option<u64>,
    config: Option<PathBuf>,
    config_source: Option<ConfigSource>,
    state_file: Option<PathBuf>,
    admin_tokens_file: Option<PathBuf>,
    check_tokens_file: Option<PathBuf>,
    mode: Option<Mode>,
    config_poll_ms: Option<u64>,
    audit_length: Option<usize>,
    log_format: Option<LogFormat>,
    stats: Option<bool>,
    check_metrics: Option<bool>,
    controller_id: Option<String>,
    redis_cluster_nodes: Option<Vec<String>>,
    redis_sentinels: Option<Vec<String>>,
    redis_sentinel_master: Option<String>,
    header_read_timeout_ms: Option<u64>,
    check_max_connections: Option<usize>,
    admin_max_connections: Option<usize>,
    grpc_max_connections: Option<usize>,
    tls_cert_file: Option<PathBuf>,
    tls_key_file: Option<PathBuf>,
    tls_client_ca_file: Option<PathBuf>,
    admin_tls: Option<bool>,
}

/// Checked settings, ready to run on.
#[derive(Debug, Clone)]
pub struct Settings {
    pub listen: SocketAddr,
    pub admin_listen: SocketAddr,
    /// Envoy's rate-limit service API (gRPC), when served.
    pub grpc_listen: Option<SocketAddr>,
    pub redis_url: Option<String>,
    pub config_redis_url: Option<String>,
    pub redis_timeout_ms: u64,
    /// The circuit breaker around the counters' Redis.
    pub breaker: BreakerSettings,
    pub config: Option<PathBuf>,
    pub config_source: ConfigSource,
    pub state_file: Option<PathBuf>,
    pub admin_tokens_file: Option<PathBuf>,
    /// `SLUICE_ADMIN_TOKENS`, read from the environment only (a flag would show in `ps`).
    pub admin_tokens: Option<String>,
    pub check_tokens_file: Option<PathBuf>,
    /// `SLUICE_CHECK_TOKENS`, from the environment only.
    pub check_tokens: Option<String>,
    pub mode: Mode,
    pub config_poll_ms: u64,
    pub audit_length: usize,
    pub log_format: LogFormat,
    pub stats: bool,
    pub check_metrics: bool,
    pub controller_id: String,
    /// Redis Cluster seed nodes (empty: no cluster).
    pub redis_cluster_nodes: Vec<String>,
    /// Sentinels naming the master `redis_sentinel_master` (empty: no Sentinel).
    pub redis_sentinels: Vec<String>,
    pub redis_sentinel_master: Option<String>,
    /// The listeners' bounds (listener.rs).
    pub header_read_timeout_ms: u64,
    pub check_max_connections: usize,
    pub admin_max_connections: usize,
    pub grpc_max_connections: usize,
    /// TLS on the listeners (listener.rs, [`crate::listener::Tls`]): the certificate chain
    /// and its key (both or neither), the CA of the client certificates the check address
    /// and the gRPC API require (mTLS), and whether the admin API speaks TLS too.
    pub tls_cert_file: Option<PathBuf>,
    pub tls_key_file: Option<PathBuf>,
    pub tls_client_ca_file: Option<PathBuf>,
    pub admin_tls: bool,
}

/// A setting that cannot be used, named as flag, variable and file key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("setting `{setting}` (--{flag}, SLUICE_{variable}): {message}")]
pub struct SettingError {
    pub setting: &'static str,
    flag: String,
    variable: String,
    pub message: String,
}

pub fn setting_error(setting: &'static str, message: impl Into<String>) -> SettingError {
    SettingError {
        setting,
        flag: setting.replace('_', "-"),
        variable: setting.to_ascii_uppercase(),
        message: message.into(),
    }
}

fn range<T: PartialOrd + std::fmt::Display + Copy>(
    setting: &'static str,
    value: T,
    low: T,
    high: T,
) -> Result<T, SettingError> {
    if value >= low && value <= high {
        Ok(value)
    } else {
        Err(setting_error(
            setting,
            format!("must be between {low} and {high}, got {value}"),
        ))
    }
}

impl Settings {
    /// The settings `flags` (and the environment) give, over the settings file they name.
    pub fn resolve(flags: Flags) -> Result<Settings, SettingError> {
        let file = match &flags.settings {
            Some(path) => read_file(path)?,
            None => FileSettings::default(),
        };
        let redis_url = flags.redis_url.or(file.redis_url);
        let settings = Settings {
            listen: flags
                .listen
                .or(file.listen)
                .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 8081))),
            admin_listen: flags
                .admin_listen
                .or(file.admin_listen)
                .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 8082))),
            grpc_listen: flags.grpc_listen.or(file.grpc_listen),
            config_redis_url: flags
                .config_redis_url
                .or(file.config_redis_url)
                .or_else(|| redis_url.clone()),
            redis_url,
            redis_timeout_ms: range(
                "redis_timeout_ms",
                flags
                    .redis_timeout_ms
                    .or(file.redis_timeout_ms)
                    .unwrap_or(100),
                1,
                60_000,
            )?,
            breaker: BreakerSettings {
                failures: range(
                    "store_breaker_failures",
                    flags
                        .store_breaker_failures
                        .or(file.store_breaker_failures)
                        .unwrap_or(3),
                    1,
                    1_000,
                )?,
                open_ms: range(
                    "store_breaker_open_ms",
                    flags
                        .store_breaker_open_ms
                        .or(file.store_breaker_open_ms)
                        .unwrap_or(1_000),
                    50,
                    60_000,
                )?,
                fallback: flags
                    .store_fallback
                    .or(file.store_fallback)
                    .unwrap_or_default(),
            },
            config: flags.config.or(file.config),
            config_source: flags
                .config_source
                .or(file.config_source)
                .unwrap_or(ConfigSource::Store),
            state_file: flags.state_file.or(file.state_file),
            admin_tokens_file: flags.admin_tokens_file.or(file.admin_tokens_file),
            admin_tokens: std::env::var("SLUICE_ADMIN_TOKENS").ok(),
            check_tokens_file: flags.check_tokens_file.or(file.check_tokens_file),
            check_tokens: std::env::var("SLUICE_CHECK_TOKENS").ok(),
            mode: flags.mode.or(file.mode).unwrap_or(Mode::Production),
            config_poll_ms: range(
                "config_poll_ms",
                flags.config_poll_ms.or(file.config_poll_ms).unwrap_or(500),
                50,
                60_000,
            )?,
            audit_length: range(
                "audit_length",
                flags.audit_length.or(file.audit_length).unwrap_or(1_000),
                1,
                100_000,
            )?,
            log_format: flags
                .log_format
                .or(file.log_format)
                .unwrap_or(LogFormat::Text),
            stats: flags.stats.or(file.stats).unwrap_or(true),
            check_metrics: flags.check_metrics.or(file.check_metrics).unwrap_or(false),
            controller_id: flags
                .controller_id
                .or(file.controller_id)
                .unwrap_or_else(default_controller_id),
            redis_cluster_nodes: or_file(flags.redis_cluster_nodes, file.redis_cluster_nodes),
            redis_sentinels: or_file(flags.redis_sentinels, file.redis_sentinels),
            redis_sentinel_master: flags.redis_sentinel_master.or(file.redis_sentinel_master),
            header_read_timeout_ms: range(
                "header_read_timeout_ms",
                flags
                    .header_read_timeout_ms
                    .or(file.header_read_timeout_ms)
                    .unwrap_or(crate::listener::HEADER_READ_TIMEOUT_MS),
                100,
                60_000,
            )?,
            check_max_connections: range(
                "check_max_connections",
                flags
                    .check_max_connections
                    .or(file.check_max_connections)
                    .unwrap_or(crate::listener::CHECK_MAX_CONNECTIONS),
                1,
                1_000_000,
            )?,
            admin_max_connections: range(
                "admin_max_connections",
                flags
                    .admin_max_connections
                    .or(file.admin_max_connections)
                    .unwrap_or(crate::listener::ADMIN_MAX_CONNECTIONS),
                1,
                1_000_000,
            )?,
            grpc_max_connections: range(
                "grpc_max_connections",
                flags
                    .grpc_max_connections
                    .or(file.grpc_max_connections)
                    .unwrap_or(crate::listener::GRPC_MAX_CONNECTIONS),
                1,
                1_000_000,
            )?,
            tls_cert_file: flags.tls_cert_file.or(file.tls_cert_file),
            tls_key_file: flags.tls_key_file.or(file.tls_key_file),
            tls_client_ca_file: flags.tls_client_ca_file.or(file.tls_client_ca_file),
            admin_tls: flags.admin_tls.or(file.admin_tls).unwrap_or(true),
        };
        settings.check_redis_topology()?;
        settings.check()?;
        Ok(settings)
    }

    fn check(&self) -> Result<(), SettingError> {
        if self.listen == self.admin_listen {
            return Err(setting_error(
                "admin_listen",
                format!(
                    "must differ from listen ({}): the admin API need not be reachable from \
                     the proxies",
                    self.listen
                ),
            ));
        }
        if let Some(grpc) = self.grpc_listen {
            if grpc == self.listen || grpc == self.admin_listen {
                return Err(setting_error(
                    "grpc_listen",
                    format!(
                        "must differ from listen ({}) and admin_listen ({})",
                        self.listen, self.admin_listen
                    ),
                ));
            }
        }
        for (setting, url) in [
            ("redis_url", &self.redis_url),
            ("config_redis_url", &self.config_redis_url),
        ] {
            if let Some(url) = url {
                if !(url.starts_with("redis://") || url.starts_with("rediss://")) {
                    return Err(setting_error(
                        setting,
                        "must be a redis:// or rediss:// URL",
                    ));
                }
            }
        }
        let id_ok = !self.controller_id.is_empty()
            && self.controller_id.len() <= 128
            && self
                .controller_id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
        if !id_ok {
            return Err(setting_error(
                "controller_id",
                "must be 1 to 128 characters of A-Z, a-z, 0-9, `-`, `_` or `.`",
            ));
        }
        if self.config_source == ConfigSource::File && self.config.is_none() {
            return Err(setting_error(
                "config_source",
                "`file` needs a configuration file (--config)",
            ));
        }
        self.check_tls()?;
        if self.mode == Mode::Production
            && self.config_redis().is_none()
            && self.state_file.is_none()
        {
            return Err(setting_error(
                "state_file",
                "production mode needs the configuration kept: give --redis-url (or \
                 --config-redis-url) or --state-file (or run with --mode development)",
            ));
        }
        Ok(())
    }
}

// -- TLS on the listeners -----------------------------------------------------------------

impl Settings {
    /// Whether the check address and the gRPC API speak TLS (the admin API too, unless
    /// `admin_tls` is false).
    pub fn tls(&self) -> bool {
        self.tls_cert_file.is_some()
    }

    /// A certificate with its key, or neither; a client CA only with them.
    /// What the files hold is read, and checked, by [`crate::listener::Tls::load`].
    fn check_tls(&self) -> Result<(), SettingError> {
        match (&self.tls_cert_file, &self.tls_key_file) {
            (Some(_), None) => Err(setting_error(
                "tls_key_file",
                "tls_cert_file needs the certificate's private key (tls_key_file)",
            )),
            (None, Some(_)) => Err(setting_error(
                "tls_cert_file",
                "tls_key_file needs the certificate it is the key of (tls_cert_file)",
            )),
            (None, None) if self.tls_client_ca_file.is_some() => Err(setting_error(
                "tls_client_ca_file",
                "client certificates are asked for only over TLS: give tls_cert_file and \
                 tls_key_file too",
            )),
            _ => Ok(()),
        }
    }
}

// -- Redis Cluster and Sentinel ------------------------------------------------------------

/// A list from the flags (or the environment) if it has any entry, else from the file.
fn or_file(flags: Vec<String>, file: Option<Vec<String>>) -> Vec<String> {
    if flags.is_empty() {
        file.unwrap_or_default()
    } else {
        flags
    }
}

impl Settings {
    /// The Redis the counters live in, if any: one server, a Cluster or a Sentinel's master.
    pub fn counters_redis(&self) -> Option<RedisTarget> {
        if !self.redis_cluster_nodes.is_empty() {
            Some(RedisTarget::Cluster(self.redis_cluster_nodes.clone()))
        } else if !self.redis_sentinels.is_empty() {
            Some(RedisTarget::Sentinel {
                sentinels: self.redis_sentinels.clone(),
                master: self.redis_sentinel_master.clone().unwrap_or_default(),
            })
        } else {
            self.redis_url.clone().map(RedisTarget::Single)
        }
    }

    /// The Redis the configuration lives in, if any: `config_redis_url`, else the counters'.
    pub fn config_redis(&self) -> Option<RedisTarget> {
        match &self.config_redis_url {
            Some(url) => Some(RedisTarget::Single(url.clone())),
            None => self.counters_redis(),
        }
    }

    /// Whether the configuration shares the counters' Redis (and then their connection).
    pub fn config_shares_counters_redis(&self) -> bool {
        self.counters_redis().is_some() && self.config_redis() == self.counters_redis()
    }

    /// At most one way to the counters' Redis, each well formed.
    fn check_redis_topology(&self) -> Result<(), SettingError> {
        let cluster = !self.redis_cluster_nodes.is_empty();
        let sentinel = !self.redis_sentinels.is_empty();
        if cluster && (sentinel || self.redis_url.is_some()) {
            return Err(setting_error(
                "redis_cluster_nodes",
                "give one of redis_url, redis_cluster_nodes or redis_sentinels",
            ));
        }
        if sentinel && self.redis_url.is_some() {
            return Err(setting_error(
                "redis_sentinels",
                "give one of redis_url, redis_cluster_nodes or redis_sentinels",
            ));
        }
        for (setting, urls) in [
            ("redis_cluster_nodes", &self.redis_cluster_nodes),
            ("redis_sentinels", &self.redis_sentinels),
        ] {
            if let Some(bad) = urls.iter().find(|url| {
                !(url.starts_with("redis://") || url.starts_with("rediss://"))
                    || url.len() <= "redis://".len()
            }) {
                return Err(setting_error(
                    setting,
                    format!(
                        "each entry must be a redis:// or rediss:// URL, got {:?}",
                        crate::store::redact_password(bad)
                    ),
                ));
            }
        }
        match (&self.redis_sentinel_master, sentinel) {
            (None, true) => Err(setting_error(
                "redis_sentinel_master",
                "redis_sentinels needs the name of the master they watch",
            )),
            (Some(_), false) => Err(setting_error(
                "redis_sentinel_master",
                "is only used with redis_sentinels",
            )),
            (Some(name), true)
                if name.is_empty()
                    || name.len() > 128
                    || !name
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b)) =>
            {
                Err(setting_error(
                    "redis_sentinel_master",
                    "must be 1 to 128 characters of A-Z, a-z, 0-9, `-`, `_` or `.`",
                ))
            }
            _ => Ok(()),
        }
    }
}

/// The host name (as the kernel says) and the process id: unique among the controllers of
/// one deployment, and readable in shared stats.
fn default_controller_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|name| name.trim().to_owned())
        .filter(|name| !name.is_empty())
        .unwrap_or_else(|| "controller".to_owned());
    let host: String = host
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || "-_.".contains(*c))
        .take(100)
        .collect();
    format!("{host}-{}", std::process::id())
}

fn read_file(path: &Path) -> Result<FileSettings, SettingError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| setting_error("settings", format!("cannot read {}: {e}", path.display())))?;
    toml::from_str(&text)
        .map_err(|e| setting_error("settings", format!("{}: {}", path.display(), e.message())))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resolve(args: &[&str]) -> Result<Settings, SettingError> {
        let flags =
            Flags::try_parse_from(std::iter::once("sluice-controller").chain(args.iter().copied()))
                .map_err(|e| setting_error("flags", e.to_string()))?;
        Settings::resolve(flags)
    }

    #[test]
    fn defaults_flags_and_file_in_that_order() {
        let dir = tempfile_dir();
        let file = dir.join("settings.toml");
        std::fs::write(
            &file,
            "admin_listen = \"127.0.0.1:9100\"\nredis_timeout_ms = 250\nmode = \"development\"\n",
        )
        .unwrap();
        let settings = resolve(&[
            "--settings",
            file.to_str().unwrap(),
            "--redis-timeout-ms",
            "300",
        ])
        .unwrap();
        assert_eq!(settings.admin_listen.port(), 9100, "from the file");
        assert_eq!(settings.redis_timeout_ms, 300, "the flag wins");
        assert_eq!(settings.listen.port(), 8081, "the default");
        assert_eq!(settings.mode, Mode::Development);
        assert_eq!(settings.grpc_listen, None, "not served unless asked for");
        std::fs::write(
            &file,
            "grpc_listen = \"127.0.0.1:9101\"\nmode = \"development\"\n",
        )
        .unwrap();
        let settings = resolve(&["--settings", file.to_str().unwrap()]).unwrap();
        assert_eq!(
            settings.grpc_listen.map(|a| a.port()),
            Some(9101),
            "from the file"
        );
        let settings = resolve(&[
            "--settings",
            file.to_str().unwrap(),
            "--grpc-listen",
            "127.0.0.1:9102",
        ])
        .unwrap();
        assert_eq!(
            settings.grpc_listen.map(|a| a.port()),
            Some(9102),
            "the flag wins"
        );
    }

    #[test]
    fn bad_settings_name_the_setting() {
        let error = resolve(&["--mode", "development", "--redis-timeout-ms", "0"]).unwrap_err();
        assert_eq!(error.setting, "redis_timeout_ms");
        assert!(
            error.to_string().starts_with(
                "setting `redis_timeout_ms` (--redis-timeout-ms, SLUICE_REDIS_TIMEOUT_MS)"
            ),
            "{error}"
        );
        let error = resolve(&[
            "--mode",
            "development",
            "--listen",
            "127.0.0.1:9000",
            "--admin-listen",
            "127.0.0.1:9000",
        ])
        .unwrap_err();
        assert_eq!(error.setting, "admin_listen");
        for taken in ["127.0.0.1:8081", "127.0.0.1:8082"] {
            let error = resolve(&["--mode", "development", "--grpc-listen", taken]).unwrap_err();
            assert_eq!(error.setting, "grpc_listen", "{taken} is taken");
        }
        let error = resolve(&[]).unwrap_err();
        assert_eq!(
            error.setting, "state_file",
            "production keeps its configuration"
        );
        let error =
            resolve(&["--mode", "development", "--redis-url", "localhost:6379"]).unwrap_err();
        assert_eq!(error.setting, "redis_url");
        let dir = tempfile_dir();
        let file = dir.join("bad.toml");
        std::fs::write(&file, "listen_on = \"x\"\n").unwrap();
        let error = resolve(&["--settings", file.to_str().unwrap()]).unwrap_err();
        assert!(error.message.contains("listen_on"), "{error}");
    }

    #[test]
    fn cluster_and_sentinel_from_flags_or_file() {
        let settings = resolve(&[
            "--redis-cluster-nodes",
            "redis://127.0.0.1:7000,redis://127.0.0.1:7001",
        ])
        .unwrap();
        assert_eq!(
            settings.counters_redis(),
            Some(RedisTarget::Cluster(vec![
                "redis://127.0.0.1:7000".into(),
                "redis://127.0.0.1:7001".into()
            ]))
        );
        assert!(
            settings.config_shares_counters_redis(),
            "production: the configuration is kept in the cluster"
        );
        let dir = tempfile_dir();
        let file = dir.join("sentinel.toml");
        std::fs::write(
            &file,
            "redis_sentinels = [\"redis://127.0.0.1:26379\"]\nredis_sentinel_master = \"sluice\"\n",
        )
        .unwrap();
        let settings = resolve(&["--settings", file.to_str().unwrap()]).unwrap();
        assert_eq!(
            settings.counters_redis(),
            Some(RedisTarget::Sentinel {
                sentinels: vec!["redis://127.0.0.1:26379".into()],
                master: "sluice".into()
            })
        );
        let settings = resolve(&[
            "--settings",
            file.to_str().unwrap(),
            "--config-redis-url",
            "redis://127.0.0.1:6379",
        ])
        .unwrap();
        assert!(!settings.config_shares_counters_redis());
    }

    #[test]
    fn bad_cluster_and_sentinel_settings_name_the_setting() {
        let bad: [(&[&str], &str); 6] = [
            (
                &["--redis-cluster-nodes", "redis://a:1,b:2"],
                "redis_cluster_nodes",
            ),
            (
                &[
                    "--redis-cluster-nodes",
                    "redis://a:1",
                    "--redis-url",
                    "redis://b:2",
                ],
                "redis_cluster_nodes",
            ),
            (
                &["--redis-sentinels", "redis://a:1"],
                "redis_sentinel_master",
            ),
            (
                &[
                    "--redis-sentinels",
                    "redis://a:1",
                    "--redis-sentinel-master",
                    "a b",
                ],
                "redis_sentinel_master",
            ),
            (
                &["--mode", "development", "--redis-sentinel-master", "m"],
                "redis_sentinel_master",
            ),
            (
                &[
                    "--redis-sentinels",
                    "redis://a:1",
                    "--redis-sentinel-master",
                    "m",
                    "--redis-url",
                    "redis://b:2",
                ],
                "redis_sentinels",
            ),
        ];
        for (args, setting) in bad {
            let error = resolve(args).unwrap_err();
            assert_eq!(error.setting, setting, "{args:?}: {error}");
        }
        let error = resolve(&["--redis-cluster-nodes", "localhost:7000"]).unwrap_err();
        assert_eq!(
            error.to_string(),
            "setting `redis_cluster_nodes` (--redis-cluster-nodes, SLUICE_REDIS_CLUSTER_NODES): \
             each entry must be a redis:// or rediss:// URL, got \"localhost:7000\""
        );
    }

    #[test]
    fn the_listeners_bounds_have_defaults_and_ranges() {
        let settings = resolve(&["--mode", "development"]).unwrap();
        assert_eq!(settings.header_read_timeout_ms, 5_000);
        assert_eq!(settings.check_max_connections, 1_024);
        assert_eq!(settings.admin_max_connections, 128);
        assert_eq!(settings.grpc_max_connections, 256);
        let dir = tempfile_dir();
        let file = dir.join("settings.toml");
        std::fs::write(
            &file,
            "mode = \"development\"\nheader_read_timeout_ms = 800\ncheck_max_connections = 3\n",
        )
        .unwrap();
        let settings = resolve(&[
            "--settings",
            file.to_str().unwrap(),
            "--grpc-max-connections",
            "7",
        ])
        .unwrap();
        assert_eq!(settings.header_read_timeout_ms, 800, "from the file");
        assert_eq!(settings.check_max_connections, 3, "from the file");
        assert_eq!(settings.grpc_max_connections, 7, "the flag");
        for (args, setting) in [
            (
                &["--header-read-timeout-ms", "99"],
                "header_read_timeout_ms",
            ),
            (&["--check-max-connections", "0"], "check_max_connections"),
            (&["--admin-max-connections", "0"], "admin_max_connections"),
            (
                &["--grpc-max-connections", "1000001"],
                "grpc_max_connections",
            ),
        ] {
            let args = [&["--mode", "development"][..], &args[..]].concat();
            let error = resolve(&args).unwrap_err();
            assert_eq!(error.setting, setting, "{args:?}: {error}");
        }
    }

    #[test]
    fn tls_needs_a_certificate_and_its_key() {
        let settings = resolve(&["--mode", "development"]).unwrap();
        assert!(!settings.tls(), "off unless asked for");
        assert!(
            settings.admin_tls,
            "the admin API follows the others by default"
        );
        let dir = tempfile_dir();
        let file = dir.join("settings.toml");
        std::fs::write(
            &file,
            "mode = \"development\"\ntls_cert_file = \"c.pem\"\ntls_key_file = \"k.pem\"\n\
             tls_client_ca_file = \"ca.pem\"\nadmin_tls = false\n",
        )
        .unwrap();
        let settings = resolve(&["--settings", file.to_str().unwrap()]).unwrap();
        assert!(settings.tls());
        assert_eq!(settings.tls_key_file, Some(PathBuf::from("k.pem")));
        assert_eq!(settings.tls_client_ca_file, Some(PathBuf::from("ca.pem")));
        assert!(!settings.admin_tls, "from the file");
        for (args, setting) in [
            (&["--tls-cert-file", "c.pem"][..], "tls_key_file"),
            (&["--tls-key-file", "k.pem"][..], "tls_cert_file"),
            (
                &["--tls-client-ca-file", "ca.pem"][..],
                "tls_client_ca_file",
            ),
        ] {
            let args = [&["--mode", "development"][..], args].concat();
            let error = resolve(&args).unwrap_err();
            assert_eq!(error.setting, setting, "{args:?}: {error}");
        }
    }

    fn tempfile_dir() -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "sluice-settings-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos())
        ));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }
}
