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
    /// TLS on its listeners, when asked for ([`ControllerOptions::tls`]).
    pub tls: Option<ControllerTls>,
    process: Process,
    _dir: tempfile::TempDir,
}

/// TLS on a test controller's listeners (`--tls-cert-file`, `--tls-key-file`,
/// `--tls-client-ca-file`), and what the harness's own calls (readiness, the admin API)
/// trust and present.
#[derive(Debug, Clone)]
pub struct ControllerTls {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    /// `--tls-client-ca-file`: the check address and the gRPC API require a client
    /// certificate of this CA.
    pub client_ca_file: Option<PathBuf>,
    /// The CA the harness trusts the controller's certificate by.
    pub ca_file: PathBuf,
    /// The certificate and key the harness presents (under mTLS, on the check address).
    pub client_cert: Option<(PathBuf, PathBuf)>,
}

impl ControllerTls {
    /// An HTTPS client for the harness's own calls: trusting `ca_file`, presenting
    /// `client_cert`, every status an answer.
    pub fn agent(&self) -> ureq::Agent {
        let read = |path: &PathBuf| {
            std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        };
        let ca = ureq::tls::Certificate::from_pem(&read(&self.ca_file)).expect("the CA (PEM)");
        let client_cert = self.client_cert.as_ref().map(|(cert, key)| {
            let cert = ureq::tls::Certificate::from_pem(&read(cert)).expect("certificate (PEM)");
            let key = ureq::tls::PrivateKey::from_pem(&read(key)).expect("key (PEM)");
            ureq::tls::ClientCert::new_with_certs(&[cert], key)
        });
        let tls = ureq::tls::TlsConfig::builder()
            .root_certs(ureq::tls::RootCerts::new_with_certs(&[ca]))
            .client_cert(client_cert)
            .build();
        ureq::Agent::config_builder()
            .tls_config(tls)
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(10)))
            .max_idle_connections(0)
            .build()
            .into()
    }

    /// `method url` with `headers` and a JSON `body`, over [`ControllerTls::agent`].
    pub fn request(
        &self,
        method: &str,
        url: &str,
        headers: &[(&str, &str)],
        body: Option<String>,
    ) -> Result<crate::http::Response, ureq::Error> {
        let mut request = ureq::http::Request::builder().method(method).uri(url);
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        if body.is_some() {
            request = request.header("content-type", "application/json");
        }
        let request = request
            .body(body.unwrap_or_default())
            .map_err(|e| ureq::Error::BadUri(e.to_string()))?;
        let response = self.agent().run(request)?;
        let status = response.status().as_u16();
        let headers = response
            .headers()
            .iter()
            .map(|(n, v)| (n.as_str().to_owned(), v.to_str().unwrap_or("").to_owned()))
            .collect();
        let body = response.into_body().read_to_string()?;
        Ok(crate::http::Response {
            status,
            headers,
            body,
        })
    }
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
    /// How often it reads the configuration's version (`--config-poll-ms`): 100 ms, so that
    /// changes show within a tenth of a second; the controller's default is 500.
    pub config_poll_ms: u64,
    /// More environment variables, as given.
    pub env: Vec<(String, String)>,
    /// TLS on its listeners; `None` (the default): none.
    pub tls: Option<ControllerTls>,
    /// Another build of the controller (the previous release's); `None`: this tree's.
    pub binary: Option<&'a std::path::Path>,
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
            config_poll_ms: 100,
            env: Vec::new(),
            tls: None,
            binary: None,
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
        let mut command = Command::new(
            options
                .binary
                .map_or_else(controller_binary, std::path::Path::to_path_buf),
        );
        command
            .args(["--mode", "development"])
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .args(["--admin-listen", &format!("127.0.0.1:{admin_port}")])
            // 100 ms by default: changes show on every test controller within a tenth of a second.
            .args(["--config-poll-ms", &options.config_poll_ms.to_string()])
            .env(
                "SLUICE_ADMIN_TOKENS",
                format!("test:admin:{ADMIN_TOKEN};viewer:read:{READ_TOKEN}"),
            )
            .env("RUST_LOG", options.log_filter);
        if let Some(tokens) = &options.check_tokens {
            command.env("SLUICE_CHECK_TOKENS", tokens);
        }
        command.envs(options.env.iter().map(|(name, value)| (name, value)));
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
        if let Some(tls) = &options.tls {
            command.arg("--tls-cert-file").arg(&tls.cert_file);
            command.arg("--tls-key-file").arg(&tls.key_file);
            if let Some(ca) = &tls.client_ca_file {
                command.arg("--tls-client-ca-file").arg(ca);
            }
        }
        command.args(&options.extra_args);
        let mut process = Process::spawn("controller", command, &dir.path().join("controller.log"));
        match &options.tls {
            None => process.wait_until_ready(
                &format!("http://127.0.0.1:{port}/readyz"),
                Duration::from_secs(20),
            ),
            Some(tls) => {
                let ready = format!("https://127.0.0.1:{port}/readyz");
                crate::wait_until("controller", Duration::from_secs(20), || {
                    process.assert_running();
                    tls.request("GET", &ready, &[], None)
                        .is_ok_and(|r| r.status == 200)
                });
            }
        }
        Controller {
            port,
            admin_port,
            grpc_port,
            tls: options.tls.clone(),
            process,
            _dir: dir,
        }
    }

    /// A URL of the check address (`https` with TLS).
    pub fn url(&self, path: &str) -> String {
        format!("{}://127.0.0.1:{}{path}", self.scheme(), self.port)
    }

    /// A URL of the admin API (`/v1/admin/rules`; `https` with TLS).
    pub fn admin_url(&self, path: &str) -> String {
        format!("{}://127.0.0.1:{}{path}", self.scheme(), self.admin_port)
    }

    fn scheme(&self) -> &'static str {
        if self.tls.is_some() {
            "https"
        } else {
            "http"
        }
    }

    /// An admin API call with the admin token: `method` on `path`, with a JSON body.
    pub fn admin(
        &self,
        method: &str,
        path: &str,
        body: Option<&serde_json::Value>,
    ) -> crate::http::Response {
        let token = format!("Bearer {ADMIN_TOKEN}");
        let headers = [("authorization", token.as_str())];
        let body = body.map(serde_json::Value::to_string);
        match &self.tls {
            None => crate::http::request(method, &self.admin_url(path), &headers, body),
            Some(tls) => tls.request(method, &self.admin_url(path), &headers, body),
        }
        .unwrap_or_else(|e| panic!("{method} {path}: {e}"))
    }

    /// `GET path` on the check address (over TLS, as [`ControllerTls::agent`], when it
    /// speaks TLS).
    pub fn get(&self, path: &str) -> Result<crate::http::Response, ureq::Error> {
        match &self.tls {
            None => crate::http::get(&self.url(path)),
            Some(tls) => tls.request("GET", &self.url(path), &[], None),
        }
    }

    /// The version of the configuration this controller runs on (its `/readyz` says).
    pub fn config_version(&self) -> u64 {
        self.get("/readyz")
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

    /// Checks this controller served, from its log (a line per call, with its `checks=`).
    pub fn checks_served(&self) -> usize {
        self.log()
            .lines()
            .filter(|line| line.contains("check call served"))
            .map(|line| {
                line.split("checks=")
                    .nth(1)
                    .and_then(|rest| rest.split_whitespace().next())
                    .and_then(|n| n.parse::<usize>().ok())
                    .unwrap_or(1)
            })
            .sum()
    }

    pub fn stop(&mut self) {
        self.process.stop();
    }
}
