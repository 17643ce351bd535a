//! The controller binary, started on a free port with a rules file.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use crate::{free_port, repo_root, required_file, Process};

pub struct Controller {
    pub port: u16,
    /// The admin API's port.
    pub admin_port: u16,
    /// The port of Envoy's rate-limit service API (gRPC), when asked for
    /// ([`ControllerOptions::grpc`]).
    pub grpc_port: Option<u16>,
    process: Process,
    _dir: tempfile::TempDir,
}

/// The admin token every test controller accepts (role `admin`, name `test`).
pub const ADMIN_TOKEN: &str = "test-admin-token-0123456789";
/// A token with the `read` role (name `viewer`).
pub const READ_TOKEN: &str = "test-read-token-0123456789";
/// The check token test controllers accept by default, and test Envoys hand their filter
/// (the environment variable [`CHECK_TOKEN_ENV`]).
pub const CHECK_TOKEN: &str = "test-check-token-0123456789";
pub const CHECK_TOKEN_ENV: &str = "SLUICE_CHECK_TOKEN";

pub fn controller_binary() -> PathBuf {
    required_file(
        "SLUICE_CONTROLLER_BIN",
        &repo_root().join("target/debug/sluice-controller"),
        "run `cargo build -p sluice-controller` first; `make test` does",
    )
}

/// How to start a controller. Tests share two cores with many processes and are about exact
/// answers, not about how fast Redis answers, so by default a slow moment must not fail a
/// check: Redis commands get 2 s unless `redis_timeout_ms` says otherwise (`None`: the
/// controller's own default).
#[derive(Debug, Clone)]
pub struct ControllerOptions<'a> {
    /// The configuration (TOML) it starts from (`--config`); empty for none.
    pub rules: &'a str,
    pub redis_url: Option<&'a str>,
    pub redis_timeout_ms: Option<u64>,
    pub log_filter: &'a str,
    /// Where the embedded store keeps the configuration (`--state-file`).
    pub state_file: Option<&'a std::path::Path>,
    /// More flags, as given.
    pub extra_args: Vec<String>,
    /// Whether it serves Envoy's rate-limit service API (`--grpc-listen` on a free port).
    pub grpc: bool,
    /// The check tokens it accepts (`SLUICE_CHECK_TOKENS`); `None`: an open check address.
    pub check_tokens: Option<String>,
}

impl<'a> ControllerOptions<'a> {
    pub fn new(rules: &'a str, redis_url: Option<&'a str>) -> Self {
        ControllerOptions {
            rules,
            redis_url,
            redis_timeout_ms: Some(2_000),
            log_filter: "info,sluice_controller=debug",
            state_file: None,
            extra_args: Vec::new(),
            grpc: false,
            check_tokens: Some(CHECK_TOKEN.to_owned()),
        }
    }
}

impl Controller {
    /// Starts a controller with `rules` (TOML) on Redis at `redis_url`, or on its embedded
    /// store when `None`, and waits until `/readyz` answers 200. It logs every check call.
    pub fn start(rules: &str, redis_url: Option<&str>) -> Controller {
        Controller::start_with(&ControllerOptions::new(rules, redis_url))
    }

    /// [`Controller::start`] with another `RUST_LOG` filter (the benchmark logs little).
    pub fn start_logging(rules: &str, redis_url: Option<&str>, log_filter: &str) -> Controller {
        Controller::start_with(&ControllerOptions {
            log_filter,
            ..ControllerOptions::new(rules, redis_url)
        })
    }

    pub fn start_with(options: &ControllerOptions<'_>) -> Controller {
        let dir = tempfile::tempdir().expect("temp dir");
        let (port, admin_port) = (free_port(), free_port());
        let mut command = Command::new(controller_binary());
        command
            .args(["--mode", "development"])
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .args(["--admin-listen", &format!("127.0.0.1:{admin_port}")])
            // Changes show on every test controller within a tenth of a second.
            .args(["--config-poll-ms", "100"])
            .env(
                "SLUICE_ADMIN_TOKENS",
                format!("test:admin:{ADMIN_TOKEN};viewer:read:{READ_TOKEN}"),
            )
            .env("RUST_LOG", options.log_filter);
        if let Some(tokens) = &options.check_tokens {
            command.env("SLUICE_CHECK_TOKENS", tokens);
        }
        if !options.rules.trim().is_empty() {
            let rules_path = dir.path().join("rules.toml");
            std::fs::write(&rules_path, options.rules).expect("write rules");
            command.arg("--config").arg(&rules_path);
        }
        if let Some(url) = options.redis_url {
            command.args(["--redis-url", url]);
            if let Some(timeout) = options.redis_timeout_ms {
                command.args(["--redis-timeout-ms", &timeout.to_string()]);
            }
        }
        if let Some(path) = options.state_file {
            command.arg("--state-file").arg(path);
        }
        let grpc_port = options.grpc.then(free_port);
        if let Some(grpc_port) = grpc_port {
            command.args(["--grpc-listen", &format!("127.0.0.1:{grpc_port}")]);
        }
        command.args(&options.extra_args);
        let mut process = Process::spawn("controller", command, &dir.path().join("controller.log"));
        process.wait_until_ready(
            &format!("http://127.0.0.1:{port}/readyz"),
            Duration::from_secs(20),
        );
        Controller {
            port,
            admin_port,
            grpc_port,
            process,
            _dir: dir,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    /// A URL of the admin API (`/v1/admin/rules`).
    pub fn admin_url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.admin_port)
    }

    /// An admin API call with the admin token: `method` on `path`, with a JSON body.
    pub fn admin(
        &self,
        method: &str,
        path: &str,
        body: Option<&serde_json::Value>,
    ) -> crate::http::Response {
        let token = format!("Bearer {ADMIN_TOKEN}");
        crate::http::request(
            method,
            &self.admin_url(path),
            &[("authorization", token.as_str())],
            body.map(serde_json::Value::to_string),
        )
        .unwrap_or_else(|e| panic!("{method} {path}: {e}"))
    }

    /// The version of the configuration this controller runs on (its `/readyz` says).
    pub fn config_version(&self) -> u64 {
        crate::http::get(&self.url("/readyz"))
            .ok()
            .and_then(|r| r.json()["config_version"].as_u64())
            .unwrap_or(0)
    }

    /// The port of Envoy's rate-limit service API; panics when it was not asked for.
    pub fn grpc(&self) -> u16 {
        self.grpc_port
            .expect("started without the gRPC API (ControllerOptions::grpc)")
    }

    pub fn pid(&self) -> u32 {
        self.process.pid()
    }

    pub fn log(&self) -> String {
        self.process.log()
    }

    pub fn stop(&mut self) {
        self.process.stop();
    }
}
