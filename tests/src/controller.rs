//! The controller binary, started on a free port with a rules file.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use crate::{free_port, repo_root, required_file, Process};

pub struct Controller {
    pub port: u16,
    process: Process,
    _dir: tempfile::TempDir,
}

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
    pub rules: &'a str,
    pub redis_url: Option<&'a str>,
    pub redis_timeout_ms: Option<u64>,
    pub log_filter: &'a str,
}

impl<'a> ControllerOptions<'a> {
    pub fn new(rules: &'a str, redis_url: Option<&'a str>) -> Self {
        ControllerOptions {
            rules,
            redis_url,
            redis_timeout_ms: Some(2_000),
            log_filter: "info,sluice_controller=debug",
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
        let rules_path = dir.path().join("rules.toml");
        std::fs::write(&rules_path, options.rules).expect("write rules");
        let port = free_port();
        let mut command = Command::new(controller_binary());
        command
            .arg("--config")
            .arg(&rules_path)
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .env("RUST_LOG", options.log_filter);
        if let Some(url) = options.redis_url {
            command.args(["--redis-url", url]);
            if let Some(timeout) = options.redis_timeout_ms {
                command.args(["--redis-timeout-ms", &timeout.to_string()]);
            }
        }
        let mut process = Process::spawn("controller", command, &dir.path().join("controller.log"));
        process.wait_until_ready(
            &format!("http://127.0.0.1:{port}/readyz"),
            Duration::from_secs(20),
        );
        Controller {
            port,
            process,
            _dir: dir,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
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
