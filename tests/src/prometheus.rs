//! A real Prometheus (Debian's `prometheus` package; `make prometheus` installs it) scraping
//! the test's processes on a free loopback port, with its storage in a temp dir, and
//! `promtool` beside it.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::{free_port, http, required_file, Process};

/// `promtool` (or `PROMTOOL`).
pub fn promtool_binary() -> PathBuf {
    required_file(
        "PROMTOOL",
        Path::new("/usr/bin/promtool"),
        "run `make prometheus` first; `make test` does",
    )
}

/// The Prometheus server (or `PROMETHEUS_BIN`).
pub fn prometheus_binary() -> PathBuf {
    required_file(
        "PROMETHEUS_BIN",
        Path::new("/usr/bin/prometheus"),
        "run `make prometheus` first; `make test` does",
    )
}

/// One scrape job: its name, the path it scrapes and its `host:port` targets.
#[derive(Debug, Clone)]
pub struct ScrapeJob {
    pub name: String,
    pub metrics_path: String,
    pub targets: Vec<String>,
}

pub struct Prometheus {
    pub port: u16,
    process: Process,
    _dir: tempfile::TempDir,
}

impl Prometheus {
    /// Starts Prometheus scraping `jobs` every second and evaluating `rule_files` every
    /// second, and waits until `/-/ready` answers 200.
    pub fn start(jobs: &[ScrapeJob], rule_files: &[&Path]) -> Prometheus {
        let dir = tempfile::tempdir().expect("temp dir");
        let port = free_port();
        // JSON is YAML: no YAML writer needed, and every string is quoted.
        let config = serde_json::json!({
            "global": { "scrape_interval": "1s", "evaluation_interval": "1s",
                        "scrape_timeout": "1s" },
            "rule_files": rule_files.iter().map(|f| f.display().to_string()).collect::<Vec<_>>(),
            "scrape_configs": jobs.iter().map(|job| serde_json::json!({
                "job_name": job.name,
                "metrics_path": job.metrics_path,
                "static_configs": [{ "targets": job.targets }],
            })).collect::<Vec<_>>(),
        });
        let config_path = dir.path().join("prometheus.yml");
        std::fs::write(&config_path, config.to_string()).expect("write prometheus.yml");
        let mut command = Command::new(prometheus_binary());
        command
            .arg(format!("--config.file={}", config_path.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .arg("--storage.tsdb.retention.time=1h")
            .arg("--log.level=warn");
        let mut process = Process::spawn("prometheus", command, &dir.path().join("prometheus.log"));
        process.wait_until_ready(
            &format!("http://127.0.0.1:{port}/-/ready"),
            Duration::from_secs(30),
        );
        Prometheus {
            port,
            process,
            _dir: dir,
        }
    }

    /// An instant query: `Ok(the result's series)`, or `Err(Prometheus's error)` for an
    /// expression it refuses.
    pub fn query(&self, expr: &str) -> Result<Vec<serde_json::Value>, String> {
        let url = format!(
            "http://127.0.0.1:{}/api/v1/query?query={}",
            self.port,
            percent_encode(expr)
        );
        let response = http::get(&url).map_err(|e| format!("{expr}: {e}"))?;
        let body: serde_json::Value = serde_json::from_str(&response.body).unwrap_or_default();
        if body["status"] != "success" {
            return Err(format!("{expr}: {}", response.body));
        }
        Ok(body["data"]["result"]
            .as_array()
            .cloned()
            .unwrap_or_default())
    }

    /// Every scrape target's health, as `job instance health last-error` lines.
    pub fn targets(&self) -> String {
        let url = format!("http://127.0.0.1:{}/api/v1/targets", self.port);
        let body: serde_json::Value = http::get(&url)
            .ok()
            .and_then(|r| serde_json::from_str(&r.body).ok())
            .unwrap_or_default();
        body["data"]["activeTargets"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|t| {
                format!(
                    "{} {} {} {}",
                    t["labels"]["job"], t["labels"]["instance"], t["health"], t["lastError"]
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    pub fn log(&self) -> String {
        self.process.log()
    }
}

/// `text` for a URL's query string: every byte but the unreserved ones as `%XX`.
pub fn percent_encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}
