//! A real Envoy with the real `.wasm`, configured per test.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use crate::{free_port, http, repo_root, required_file, Process};

/// Envoy's binary from the project's virtualenv (`make envoy` installs it).
pub fn envoy_binary() -> PathBuf {
    let lib = repo_root().join(".venv/lib");
    let found = std::fs::read_dir(&lib).ok().and_then(|entries| {
        entries
            .flatten()
            .map(|python| python.path().join("site-packages/envoy/_bin/envoy"))
            .find(|candidate| candidate.is_file())
    });
    required_file(
        "ENVOY_BIN",
        &found.unwrap_or_else(|| lib.join("python3/site-packages/envoy/_bin/envoy")),
        "run `make envoy` first; `make test` does",
    )
}

/// The older Envoys the filter is also tested on (`make older-envoys` installs them):
/// `SLUICE_OLDER_ENVOYS` (paths separated by `:`), else every `.venv/envoy-<version>`. None
/// found fails the caller: a version matrix that silently shrinks to one version tests
/// nothing.
pub fn older_envoy_binaries() -> Vec<PathBuf> {
    let listed = std::env::var("SLUICE_OLDER_ENVOYS").ok();
    let mut found: Vec<PathBuf> = match listed.filter(|list| !list.trim().is_empty()) {
        Some(list) => list.split(':').map(|path| repo_root().join(path)).collect(),
        None => std::fs::read_dir(repo_root().join(".venv"))
            .into_iter()
            .flatten()
            .flatten()
            .filter(|venv| venv.file_name().to_string_lossy().starts_with("envoy-"))
            .filter_map(|venv| {
                std::fs::read_dir(venv.path().join("lib"))
                    .ok()?
                    .flatten()
                    .map(|python| python.path().join("site-packages/envoy/_bin/envoy"))
                    .find(|candidate| candidate.is_file())
            })
            .collect(),
    };
    found.sort();
    assert!(
        !found.is_empty() && found.iter().all(|path| path.is_file()),
        "older Envoys not found: {found:?} (set SLUICE_OLDER_ENVOYS or run `make older-envoys`)"
    );
    found
}

/// [`binary_version`], asked once per binary and test process.
fn cached_version(binary: &Path) -> String {
    static VERSIONS: std::sync::Mutex<Vec<(PathBuf, String)>> = std::sync::Mutex::new(Vec::new());
    let mut versions = VERSIONS
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    if let Some((_, version)) = versions.iter().find(|(path, _)| path == binary) {
        return version.clone();
    }
    let version = binary_version(binary);
    versions.push((binary.to_owned(), version.clone()));
    version
}

/// Every Envoy config shipped in `envoy/`, in name order.
pub fn shipped_configs() -> Vec<PathBuf> {
    let mut configs: Vec<PathBuf> = std::fs::read_dir(repo_root().join("envoy"))
        .expect("envoy/ exists")
        .flatten()
        .map(|entry| entry.path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "yaml"))
        .collect();
    configs.sort();
    assert!(
        configs.len() >= 3,
        "expected the demo, compose and native rate-limit configs, found {configs:?}"
    );
    configs
}

/// `text` with `from` replaced by `to`, which must occur exactly `times` times: a config
/// that drifted from what the test expects fails loudly instead of testing something else.
pub fn replace_exactly(text: &str, from: &str, to: &str, times: usize) -> String {
    assert_eq!(
        text.matches(from).count(),
        times,
        "expected {times}× {from:?} in the config"
    );
    text.replace(from, to)
}

/// A shipped config with its `.wasm` path pointed at the freshly built filter; a config
/// without the Sluice filter (Envoy's own rate-limit filter asking over gRPC) as it is.
pub fn with_built_wasm(path: &Path) -> String {
    let text = std::fs::read_to_string(path).expect("read config");
    if !text.contains("envoy.filters.http.wasm") {
        assert!(
            text.contains("envoy.filters.http.ratelimit"),
            "{} has neither the Sluice filter nor Envoy's rate-limit filter",
            path.display()
        );
        return text;
    }
    let shipped_wasm = text
        .lines()
        .find_map(|line| {
            line.split_once("filename: \"")?
                .1
                .split_once('"')
                .map(|(file, _)| file)
        })
        .unwrap_or_else(|| panic!("{} loads no .wasm file", path.display()));
    assert!(
        shipped_wasm.ends_with("sluice_filter.wasm"),
        "{shipped_wasm}"
    );
    let quoted = format!("\"{shipped_wasm}\"");
    replace_exactly(&text, &quoted, &format!("\"{}\"", wasm_file().display()), 1)
}

/// The version an Envoy binary reports (`1.36.2`), from `envoy --version`.
pub fn binary_version(binary: &Path) -> String {
    let output = Command::new(binary)
        .arg("--version")
        .output()
        .expect("run envoy --version");
    let text = String::from_utf8_lossy(&output.stdout);
    text.split('/')
        .find(|part| {
            part.split('.').count() == 3 && part.chars().all(|c| c.is_ascii_digit() || c == '.')
        })
        .unwrap_or_else(|| panic!("no version in {text:?}"))
        .to_owned()
}

/// The filter built for Envoy (`make wasm` builds it).
pub fn wasm_file() -> PathBuf {
    required_file(
        "SLUICE_WASM",
        &repo_root().join("target/wasm32-wasip1/release/sluice_filter.wasm"),
        "run `make wasm` first; `make test` does",
    )
}

/// The HTTP filter in front of the router.
#[derive(Debug, Clone)]
pub enum Filter {
    /// Nothing: Envoy proxies straight to the upstream.
    None,
    /// Envoy's own `local_ratelimit`, with a bucket so large it never denies.
    LocalRateLimitNeverReached,
    /// The Sluice filter with this plugin configuration (JSON).
    Sluice { plugin_config: String },
    /// The same, from another build of the filter (the benchmark's baseline).
    SluiceBuild {
        plugin_config: String,
        wasm: PathBuf,
    },
    /// Envoy's `jwt_authn` with one provider (`issuer`, inline JWKS), which verifies tokens
    /// in `Authorization`, lets requests without one through, and leaves the payload in
    /// its metadata under `jwt_payload`; then `then`.
    JwtAuthnThen {
        issuer: String,
        jwks: String,
        then: Box<Filter>,
    },
    /// `first`, then Envoy's `buffer` filter: a request goes on only once its whole body is
    /// in (up to 1 MiB), so what `first` lets go before its body reaches no upstream
    /// early (see the README on `reserve_from`).
    ThenBuffer { first: Box<Filter> },
    /// Envoy's own `envoy.filters.http.ratelimit`, asking the `sluice_controller` cluster
    /// over gRPC (give it the controllers' gRPC ports, and `controller_http2`), with these
    /// `rate_limits` (YAML, a list of `{ actions: [...] }` at the filter's indentation).
    NativeRateLimit {
        failure_mode_deny: bool,
        rate_limits: String,
    },
}

/// `plugin` with the top-level fields of `extra` set (replacing any of the same name).
pub fn with_fields(mut plugin: serde_json::Value, extra: serde_json::Value) -> serde_json::Value {
    if let (Some(target), serde_json::Value::Object(extra)) = (plugin.as_object_mut(), extra) {
        target.extend(extra);
    }
    plugin
}

/// [`Filter::sluice`]'s plugin configuration as JSON, for tests that add to it.
pub fn sluice_plugin_config(failure_mode: &str, timeout_ms: u64) -> serde_json::Value {
    serde_json::json!({
        "controller": {
            "cluster": "sluice_controller",
            "authority": "sluice-controller",
            "timeout_ms": timeout_ms,
            "token_env": crate::controller::CHECK_TOKEN_ENV
        },
        "failure_mode": failure_mode
    })
}

impl Filter {
    /// Sluice asking the `sluice_controller` cluster with the given failure mode and
    /// timeout, batching checks across requests (the default).
    pub fn sluice(failure_mode: &str, timeout_ms: u64) -> Filter {
        Filter::sluice_batching(failure_mode, timeout_ms, true)
    }

    /// [`Filter::sluice`], with batching on or off (one callout per request).
    pub fn sluice_batching(failure_mode: &str, timeout_ms: u64, batching: bool) -> Filter {
        Filter::sluice_with(&with_fields(
            sluice_plugin_config(failure_mode, timeout_ms),
            serde_json::json!({ "batching": batching }),
        ))
    }

    /// The Sluice filter with this plugin configuration.
    pub fn sluice_with(plugin: &serde_json::Value) -> Filter {
        Filter::Sluice {
            plugin_config: plugin.to_string(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct EnvoyOptions {
    pub filter: Filter,
    pub upstream_port: u16,
    /// Endpoints of the `sluice_controller` cluster (round robin).
    pub controller_ports: Vec<u16>,
    pub concurrency: u32,
    /// Whether callouts to the controller speak HTTP/2 (prior knowledge) instead of HTTP/1.1.
    pub controller_http2: bool,
}

/// The Sluice filter's block: plugin configuration `plugin_config`, code from `wasm`.
fn sluice_filter_yaml(plugin_config: &str, wasm: &Path) -> String {
    format!(
        r#"
          - name: envoy.filters.http.wasm
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm
              config:
                name: sluice
                root_id: sluice
                configuration:
                  "@type": type.googleapis.com/google.protobuf.StringValue
                  value: '{}'
                failure_policy: FAIL_RELOAD
                reload_config: {{ backoff: {{ base_interval: 0.5s, max_interval: 10s }} }}
                vm_config:
                  vm_id: sluice
                  runtime: envoy.wasm.runtime.v8
                  environment_variables: {{ host_env_keys: [{}] }}
                  code: {{ local: {{ filename: "{}" }} }}"#,
        plugin_config.replace('\'', "''"),
        crate::controller::CHECK_TOKEN_ENV,
        wasm.display()
    )
}

fn http_filter_yaml(filter: &Filter) -> String {
    match filter {
        Filter::None => String::new(),
        Filter::LocalRateLimitNeverReached => r#"
          - name: envoy.filters.http.local_ratelimit
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit
              stat_prefix: local_rate_limiter
              token_bucket: { max_tokens: 1000000000, tokens_per_fill: 1000000000, fill_interval: 1s }
              filter_enabled: { runtime_key: local_rate_limit_enabled, default_value: { numerator: 100, denominator: HUNDRED } }
              filter_enforced: { runtime_key: local_rate_limit_enforced, default_value: { numerator: 100, denominator: HUNDRED } }"#
            .to_owned(),
        Filter::Sluice { plugin_config } => sluice_filter_yaml(plugin_config, &wasm_file()),
        Filter::SluiceBuild { plugin_config, wasm } => sluice_filter_yaml(plugin_config, wasm),
        Filter::NativeRateLimit {
            failure_mode_deny,
            rate_limits,
        } => native_ratelimit_yaml(*failure_mode_deny, rate_limits),
        Filter::ThenBuffer { first } => format!(
            r#"{}
          - name: envoy.filters.http.buffer
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.buffer.v3.Buffer
              max_request_bytes: 1048576"#,
            http_filter_yaml(first)
        ),
        Filter::JwtAuthnThen { issuer, jwks, then } => format!(
            r#"
          - name: envoy.filters.http.jwt_authn
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.jwt_authn.v3.JwtAuthentication
              providers:
                test:
                  issuer: "{issuer}"
                  forward: true
                  payload_in_metadata: jwt_payload
                  local_jwks: {{ inline_string: '{jwks}' }}
              rules:
              - match: {{ prefix: "/" }}
                requires:
                  requires_any:
                    requirements:
                    - provider_name: test
                    - allow_missing: {{}}{then}"#,
            jwks = jwks.replace('\'', "''"),
            then = http_filter_yaml(then),
        ),
    }
}

/// Envoy's rate-limit filter with its descriptors' actions in the filter itself (so the
/// route stays as it is), asking `sluice_controller` with a generous timeout (tests share two
/// cores; Envoy's default is 20 ms).
fn native_ratelimit_yaml(failure_mode_deny: bool, rate_limits: &str) -> String {
    format!(
        r#"
          - name: envoy.filters.http.ratelimit
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.ratelimit.v3.RateLimit
              domain: sluice
              failure_mode_deny: {failure_mode_deny}
              timeout: 2s
              rate_limit_service:
                transport_api_version: V3
                grpc_service:
                  envoy_grpc: {{ cluster_name: sluice_controller }}
                  initial_metadata: [{{ key: authorization, value: "Bearer {check_token}" }}]
              rate_limits:{rate_limits}"#,
        check_token = crate::controller::CHECK_TOKEN
    )
}

/// The `rate_limits` of [`Filter::NativeRateLimit`]: one descriptor per list of actions
/// (each action a YAML flow mapping, such as `{ remote_address: {} }`).
pub fn rate_limits_yaml(descriptors: &[&[&str]]) -> String {
    descriptors
        .iter()
        .map(|actions| {
            let actions: String = actions
                .iter()
                .map(|action| format!("\n                - {action}"))
                .collect();
            format!("\n              - actions:{actions}")
        })
        .collect()
}

fn endpoints_yaml(ports: &[u16]) -> String {
    ports
        .iter()
        .map(|port| {
            format!(
                "\n        - endpoint: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: {port} }} }} }}"
            )
        })
        .collect()
}

/// The shipped configurations' health checking of the controller cluster (see
/// `envoy/demo.yaml`): `/readyz` twice a second, and a host that refuses a connection
/// ejected at once.
pub const CONTROLLER_HEALTH: &str = r#"
    health_checks:
    - timeout: 0.25s
      interval: 0.5s
      no_traffic_interval: 1s
      unhealthy_threshold: 2
      healthy_threshold: 1
      http_health_check: { path: /readyz }
    outlier_detection:
      split_external_local_origin_errors: true
      consecutive_local_origin_failure: 1
      consecutive_gateway_failure: 3
      interval: 1s
      base_ejection_time: 2s
      max_ejection_time: 10s
      max_ejection_percent: 50"#;

/// TLS from Envoy to the `sluice_controller` cluster (`envoy.transport_sockets.tls`), for a
/// controller started with `--tls-cert-file` ([`Envoy::start_with_controller_tls`]). The
/// cluster's health checks go over it too.
#[derive(Debug, Clone)]
pub struct UpstreamTls {
    /// The CA Envoy trusts the controller's certificate by (`validation_context.trusted_ca`).
    pub ca_file: PathBuf,
    /// The name Envoy sends (`sni`) and requires among the certificate's DNS names
    /// (`match_typed_subject_alt_names`: without it Envoy takes any certificate of the CA).
    pub server_name: String,
    /// Envoy's client certificate and key (`tls_certificates`), for a controller that
    /// requires one (`--tls-client-ca-file`).
    pub client_cert: Option<(PathBuf, PathBuf)>,
}

/// The `sluice_controller` cluster's `transport_socket` for `tls`, at the cluster's
/// indentation.
pub fn upstream_tls_yaml(tls: &UpstreamTls) -> String {
    let client_cert = tls
        .client_cert
        .as_ref()
        .map(|(cert, key)| {
            format!(
                r#"
          tls_certificates:
          - certificate_chain: {{ filename: "{}" }}
            private_key: {{ filename: "{}" }}"#,
                cert.display(),
                key.display()
            )
        })
        .unwrap_or_default();
    format!(
        r#"
    transport_socket:
      name: envoy.transport_sockets.tls
      typed_config:
        "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext
        sni: {server_name}
        common_tls_context:
          tls_params: {{ tls_minimum_protocol_version: TLSv1_2 }}
          validation_context:
            trusted_ca: {{ filename: "{ca}" }}
            match_typed_subject_alt_names:
            - san_type: DNS
              matcher: {{ exact: {server_name} }}{client_cert}"#,
        server_name = tls.server_name,
        ca = tls.ca_file.display(),
    )
}

/// The whole bootstrap configuration for one test Envoy.
pub fn config_yaml(options: &EnvoyOptions, listen_port: u16, admin_port: u16) -> String {
    config_yaml_with_tls(options, None, listen_port, admin_port)
}

/// [`config_yaml`], with TLS to the controllers when `tls` is given.
pub fn config_yaml_with_tls(
    options: &EnvoyOptions,
    tls: Option<&UpstreamTls>,
    listen_port: u16,
    admin_port: u16,
) -> String {
    // A cluster needs at least one endpoint to be valid; port 9 (discard) refuses.
    let controller_ports = if options.controller_ports.is_empty() {
        vec![9]
    } else {
        options.controller_ports.clone()
    };
    format!(
        r#"admin:
  address: {{ socket_address: {{ address: 127.0.0.1, port_value: {admin_port} }} }}
static_resources:
  listeners:
  - name: ingress
    address: {{ socket_address: {{ address: 127.0.0.1, port_value: {listen_port} }} }}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: ingress
          use_remote_address: true
          # As every shipped config (see envoy/demo.yaml): one spelling per path before any
          # filter or route sees it.
          normalize_path: true
          merge_slashes: true
          path_with_escaped_slashes_action: UNESCAPE_AND_REDIRECT
          route_config:
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
              - match: {{ prefix: "/" }}
                route: {{ cluster: upstream }}
          http_filters:{filters}
          - name: envoy.filters.http.router
            typed_config: {{ "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router }}
  clusters:
  - name: upstream
    type: STATIC
    connect_timeout: 1s
    load_assignment:
      cluster_name: upstream
      endpoints:
      - lb_endpoints:{upstream}
  - name: sluice_controller
    type: STATIC
    connect_timeout: 0.25s{controller_protocol}{controller_health}{controller_tls}
    load_assignment:
      cluster_name: sluice_controller
      endpoints:
      - lb_endpoints:{controllers}
"#,
        filters = http_filter_yaml(&options.filter),
        upstream = endpoints_yaml(&[options.upstream_port]),
        controllers = endpoints_yaml(&controller_ports),
        controller_health = CONTROLLER_HEALTH,
        controller_tls = tls.map(upstream_tls_yaml).unwrap_or_default(),
        // Idle connections closed by Envoy before the controller closes them, as in every
        // shipped config.
        controller_protocol = if options.controller_http2 {
            r#"
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        common_http_protocol_options: { idle_timeout: 4s }
        explicit_http_config: { http2_protocol_options: {} }"#
        } else {
            r#"
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        common_http_protocol_options: { idle_timeout: 4s }
        explicit_http_config: { http_protocol_options: {} }"#
        },
    )
}

pub struct Envoy {
    pub port: u16,
    pub admin_port: u16,
    process: Process,
    _dir: tempfile::TempDir,
}

impl Envoy {
    pub fn start(options: &EnvoyOptions) -> Envoy {
        Envoy::start_logging(options, "info")
    }

    /// [`Envoy::start`] with Envoy's (and the filter's) log at `level` (`debug`, `trace`…).
    pub fn start_logging(options: &EnvoyOptions, level: &str) -> Envoy {
        Envoy::start_on(&envoy_binary(), options, level)
    }

    /// [`Envoy::start`] with another Envoy binary than the project's (an older version).
    pub fn start_binary(binary: &Path, options: &EnvoyOptions) -> Envoy {
        Envoy::start_on(binary, options, "info")
    }

    fn start_on(binary: &Path, options: &EnvoyOptions, level: &str) -> Envoy {
        let (port, admin_port) = (free_port(), free_port());
        let config = config_yaml(options, port, admin_port);
        Envoy::launch(
            binary,
            &config,
            port,
            admin_port,
            options.concurrency,
            level,
        )
    }

    /// [`Envoy::start`], its callouts to the controllers (and their health checks) over TLS.
    pub fn start_with_controller_tls(options: &EnvoyOptions, tls: &UpstreamTls) -> Envoy {
        let (port, admin_port) = (free_port(), free_port());
        let config = config_yaml_with_tls(options, Some(tls), port, admin_port);
        Envoy::launch(
            &envoy_binary(),
            &config,
            port,
            admin_port,
            options.concurrency,
            "info",
        )
    }

    /// Starts Envoy on a ready-made configuration whose listener is `port` and admin
    /// `admin_port`, from the repository root (shipped configs use paths relative to it).
    pub fn start_with_config(config: &str, port: u16, admin_port: u16, concurrency: u32) -> Envoy {
        Envoy::launch(
            &envoy_binary(),
            config,
            port,
            admin_port,
            concurrency,
            "info",
        )
    }

    fn launch(
        binary: &Path,
        config: &str,
        port: u16,
        admin_port: u16,
        concurrency: u32,
        level: &str,
    ) -> Envoy {
        // Shown with a failing test's output: which Envoy it ran on.
        eprintln!("Envoy {} ({})", cached_version(binary), binary.display());
        let dir = tempfile::tempdir().expect("temp dir");
        let config_path = dir.path().join("envoy.yaml");
        std::fs::write(&config_path, config).expect("write config");
        let mut command = Command::new(binary);
        command
            .arg("-c")
            .arg(&config_path)
            .args(["--concurrency", &concurrency.to_string()])
            .args(["--disable-hot-restart", "--log-level", level])
            .env(
                crate::controller::CHECK_TOKEN_ENV,
                crate::controller::CHECK_TOKEN,
            )
            .current_dir(repo_root());
        let mut process = Process::spawn("envoy", command, &dir.path().join("envoy.log"));
        process.wait_until_ready(
            &format!("http://127.0.0.1:{admin_port}/ready"),
            Duration::from_secs(60),
        );
        Envoy {
            port,
            admin_port,
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

    /// Everything Envoy (and the filter's log lines) wrote so far.
    pub fn log(&self) -> String {
        self.process.log()
    }

    /// Per worker, the requests its listener `ingress` took (`worker_N.downstream_rq`…
    /// is not kept per worker, connections are): connections accepted by each worker.
    pub fn connections_per_worker(&self, concurrency: u32) -> Vec<u64> {
        (0..concurrency)
            .map(|worker| {
                self.stat(&format!(
                    "listener.127.0.0.1_{}.worker_{worker}.downstream_cx_total",
                    self.port
                ))
                .unwrap_or(0)
            })
            .collect()
    }

    /// How many Envoy threads (main and workers) have logged a line containing `text`.
    pub fn threads_that_logged(&self, text: &str) -> usize {
        let mut threads: Vec<String> = self
            .log()
            .lines()
            .filter(|line| line.contains(text))
            .filter_map(|line| line.split("][").nth(1).map(str::to_owned))
            .collect();
        threads.sort();
        threads.dedup();
        threads.len()
    }

    /// Waits (15 s at most) until `vms` of the filter's VMs (the main thread's and each
    /// worker's) have read the controller's configuration: until then rules that match on
    /// headers and the lists do not apply to their requests.
    pub fn wait_until_vms_read_the_configuration(&self, vms: usize) {
        crate::wait_until(
            "every VM read the configuration",
            std::time::Duration::from_secs(15),
            || self.threads_that_logged("read configuration version") >= vms,
        );
    }

    /// A counter or gauge from Envoy's admin `/stats`.
    pub fn stat(&self, name: &str) -> Option<u64> {
        let stats = http::get(&format!(
            "http://127.0.0.1:{}/stats?filter=^{name}$",
            self.admin_port
        ))
        .ok()?;
        stats.body.lines().find_map(|line| {
            let (stat, value) = line.split_once(": ")?;
            (stat == name).then(|| value.trim().parse().ok()).flatten()
        })
    }
}

/// `envoy --mode validate` of a config file: loads the VM and runs the plugin's
/// `on_configure` without binding ports (with the check token in the environment, as
/// every test Envoy has it).
pub fn validate(config: &Path) -> Output {
    validate_with_env(
        config,
        &[(
            crate::controller::CHECK_TOKEN_ENV,
            crate::controller::CHECK_TOKEN,
        )],
    )
}

/// [`validate`] with another Envoy binary than the project's (an older version).
pub fn validate_with_binary(binary: &Path, config: &Path) -> Output {
    validate_as(
        binary,
        config,
        &[(
            crate::controller::CHECK_TOKEN_ENV,
            crate::controller::CHECK_TOKEN,
        )],
    )
}

/// [`validate`] with exactly the environment variables `env` of the test's own.
pub fn validate_with_env(config: &Path, env: &[(&str, &str)]) -> Output {
    validate_as(&envoy_binary(), config, env)
}

fn validate_as(binary: &Path, config: &Path, env: &[(&str, &str)]) -> Output {
    Command::new(binary)
        .env_remove(crate::controller::CHECK_TOKEN_ENV)
        .envs(env.iter().copied())
        .arg("--mode")
        .arg("validate")
        .arg("-c")
        .arg(config)
        .args(["--disable-hot-restart", "--log-level", "info"])
        .current_dir(repo_root())
        .output()
        .expect("run envoy --mode validate")
}
