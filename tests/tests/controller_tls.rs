//! TLS and mTLS on the controller's listeners (`--tls-cert-file`, `--tls-key-file`,
//! `--tls-client-ca-file`), for real: a CA, the controller's certificate and client
//! certificates made here with the `openssl` command; the controller binary; a real Envoy
//! with the real `.wasm` (and Envoy's own rate-limit filter) calling it through an upstream
//! `transport_socket`, health checks included.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use sluice_e2e::certs::Certs;
use sluice_e2e::controller::{controller_binary, ControllerOptions, ControllerTls};
use sluice_e2e::envoy::{rate_limits_yaml, EnvoyOptions, Filter, UpstreamTls};
use sluice_e2e::http::{self, Response};
use sluice_e2e::{free_port, Controller, Envoy, Upstream};

fn rules(limit: u64) -> String {
    format!("[[rules]]\nname = \"per-client\"\nlimit = {limit}\nwindow = \"1h\"\n")
}

fn tls_controller(
    certs: &Certs,
    mtls: bool,
    rules: &str,
    extra_args: &[&str],
    grpc: bool,
) -> Controller {
    Controller::start_with(&ControllerOptions {
        tls: Some(certs.controller(mtls)),
        grpc,
        extra_args: extra_args.iter().map(|arg| (*arg).to_owned()).collect(),
        ..ControllerOptions::new(rules, None)
    })
}

/// Envoy with the Sluice filter (failure mode deny) asking `controller` over `tls`.
fn envoy_over_tls(controller: &Controller, upstream: &Upstream, tls: &UpstreamTls) -> Envoy {
    envoy_over_tls_http(controller, upstream, tls, false)
}

fn envoy_over_tls_http(
    controller: &Controller,
    upstream: &Upstream,
    tls: &UpstreamTls,
    controller_http2: bool,
) -> Envoy {
    Envoy::start_with_controller_tls(
        &EnvoyOptions {
            filter: Filter::sluice("deny", 2_000),
            upstream_port: upstream.port(),
            controller_ports: vec![controller.port],
            concurrency: 1,
            controller_http2,
        },
        tls,
    )
}

fn get(envoy: &Envoy) -> Response {
    http::get(&envoy.url("/items")).expect("request through envoy")
}

/// `limit` requests pass, the remaining count going down, then the next gets 429: exactly
/// what the same filter and controller answer without TLS (tests/tests/envoy_e2e.rs).
fn limited_exactly(envoy: &Envoy, controller: &Controller, limit: u64) {
    for remaining in (0..limit).rev() {
        let response = get(envoy);
        assert_eq!(
            response.status,
            200,
            "{response:?}\n{}\n{}",
            envoy.log(),
            controller.log()
        );
        assert_eq!(response.body, "hello from upstream\n");
        assert_eq!(response.number("x-ratelimit-limit"), limit);
        assert_eq!(response.number("x-ratelimit-remaining"), remaining);
    }
    let denied = get(envoy);
    assert_eq!(denied.status, 429, "{denied:?}");
    assert_eq!(denied.json()["policy"], "per-client");
}

/// Envoy's cluster of the controller: TLS handshakes made, and (when `healthy`) its health
/// check passing over TLS, with no failure.
fn assert_cluster_over_tls(envoy: &Envoy, healthy: bool) {
    let stat = |name: &str| {
        envoy
            .stat(&format!("cluster.sluice_controller.{name}"))
            .unwrap_or(0)
    };
    assert!(
        stat("ssl.handshake") >= 1,
        "the callouts went over TLS\n{}",
        envoy.log()
    );
    if healthy {
        // The first check may fail while Envoy's main thread compiles the filter at start;
        // from the first success on, every one passes.
        sluice_e2e::wait_until("a health check over TLS", Duration::from_secs(10), || {
            stat("health_check.success") >= 1
        });
        let (successes, failures) = (stat("health_check.success"), stat("health_check.failure"));
        sluice_e2e::wait_until("three more health checks", Duration::from_secs(10), || {
            stat("health_check.success") >= successes + 3
        });
        assert_eq!(stat("health_check.failure"), failures, "{}", envoy.log());
        assert_eq!(stat("membership_healthy"), 1);
    }
}

// -- (1) The filter through a TLS controller ------------------------------------------------

#[test]
fn envoy_through_a_tls_controller_is_limited_exactly_as_without_tls() {
    let certs = Certs::make();
    let controller = tls_controller(&certs, false, &rules(5), &[], false);
    let upstream = Upstream::start();
    let envoy = envoy_over_tls(&controller, &upstream, &certs.envoy(None));
    limited_exactly(&envoy, &controller, 5);
    assert_cluster_over_tls(&envoy, true);

    // The admin API speaks TLS too, with the same certificate, and asks no client
    // certificate (the harness's agent presents none here).
    let rules = controller.admin("GET", "/v1/admin/rules", None);
    assert_eq!(rules.status, 200, "{rules:?}");
    let plain = http::get(&format!(
        "http://127.0.0.1:{}/healthz",
        controller.admin_port
    ));
    assert!(plain.is_err(), "the admin API answered in clear: {plain:?}");
}

// -- (2) No answer in clear -----------------------------------------------------------------

/// What a TLS listener sends back to `request` in clear, until it closes.
fn answer_in_clear(port: u16, request: &[u8]) -> Vec<u8> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("read timeout");
    stream.write_all(request).expect("write");
    let mut answer = Vec::new();
    // A reset after the alert is a close too.
    let _ = stream.read_to_end(&mut answer);
    answer
}

#[test]
fn a_plaintext_client_gets_no_http_answer_from_a_tls_listener() {
    let certs = Certs::make();
    let controller = tls_controller(&certs, false, &rules(5), &[], true);
    let check = format!(
        "POST /v1/check HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\nContent-Type: \
         application/json\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{{}}",
        sluice_e2e::controller::CHECK_TOKEN
    );
    let health = b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";
    let h2_preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00";
    for (listener, port, request) in [
        ("check", controller.port, check.as_bytes()),
        ("check", controller.port, &health[..]),
        ("admin", controller.admin_port, &health[..]),
        ("grpc", controller.grpc(), &h2_preface[..]),
    ] {
        let answer = answer_in_clear(port, request);
        // A TLS alert record (content type 21) at most: no status line, no HTTP/2 frame.
        assert!(
            answer.is_empty() || answer.starts_with(&[21, 3]),
            "{listener}: {:?}",
            String::from_utf8_lossy(&answer)
        );
    }
    // ureq in clear: no answer either (not even an error status).
    let plain = http::get(&format!("http://127.0.0.1:{}/healthz", controller.port));
    assert!(plain.is_err(), "{plain:?}");
    // Over TLS, the same address answers.
    let over_tls = controller.get("/healthz").expect("over TLS");
    assert_eq!(over_tls.status, 200);
}

// -- (3) mTLS -------------------------------------------------------------------------------

#[test]
fn with_a_client_ca_only_a_proxy_with_its_certificate_gets_a_decision() {
    let certs = Certs::make();
    let controller = tls_controller(&certs, true, &rules(3), &[], false);
    let upstream = Upstream::start();

    // Without a client certificate, and with one of another CA: no decision, so the
    // filter's failure mode (deny) answers.
    for client in [None, Some("stranger")] {
        let envoy = envoy_over_tls(&controller, &upstream, &certs.envoy(client));
        for _ in 0..2 {
            let response = get(&envoy);
            assert_eq!(response.status, 503, "{client:?}: {response:?}");
            assert_ne!(response.body, "hello from upstream\n");
        }
    }
    assert!(
        controller.log().contains("TLS handshake failed"),
        "refused handshakes are logged\n{}",
        controller.log()
    );

    // With the CA's client certificate: limited exactly, the health check passing over
    // mTLS; the callouts over HTTP/2 (ALPN h2).
    let envoy = envoy_over_tls_http(&controller, &upstream, &certs.envoy(Some("client")), true);
    limited_exactly(&envoy, &controller, 3);
    assert_cluster_over_tls(&envoy, true);

    // The admin API asks no client certificate, even here.
    let viewer = ControllerTls {
        client_cert: None,
        ..certs.controller(true)
    };
    let metrics = viewer
        .request("GET", &controller.admin_url("/metrics"), &[], None)
        .expect("admin API without a client certificate");
    assert_eq!(metrics.status, 200);
    // The check address does.
    let refused = viewer.request("GET", &controller.url("/healthz"), &[], None);
    assert!(refused.is_err(), "{refused:?}");
}

// -- (4) A handshake is bounded, and holds a place ------------------------------------------

/// Opens a connection to `port`, sends `first` (maybe nothing), and returns how long the
/// listener took to close it (panics past `limit`).
fn closed_after(port: u16, first: &[u8], limit: Duration) -> Duration {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    let started = Instant::now();
    stream.set_read_timeout(Some(limit)).expect("read timeout");
    stream.write_all(first).expect("write");
    let mut byte = [0u8; 1];
    loop {
        match stream.read(&mut byte) {
            Ok(0) => return started.elapsed(),
            Ok(_) => continue,
            Err(error)
                if matches!(
                    error.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                panic!("port {port}: still open after {limit:?}")
            }
            Err(_) => return started.elapsed(),
        }
    }
}

/// A metric of the admin API's `/metrics` (0 when absent).
fn metric(controller: &Controller, line: &str) -> u64 {
    let metrics = controller.admin("GET", "/metrics", None);
    metrics
        .body
        .lines()
        .find_map(|l| l.strip_prefix(line)?.trim().parse().ok())
        .unwrap_or(0)
}

#[test]
fn a_client_that_never_finishes_its_handshake_is_dropped_within_the_header_read_timeout() {
    let certs = Certs::make();
    let timeout = Duration::from_millis(1_000);
    let controller = tls_controller(
        &certs,
        false,
        &rules(5),
        &["--header-read-timeout-ms", "1000"],
        true,
    );
    let margin = Duration::from_millis(1_500);
    // No ClientHello, and half of one (a record's header), on the check address (HTTP)
    // and the gRPC API (tonic's connections).
    for (listener, port) in [("check", controller.port), ("grpc", controller.grpc())] {
        for first in [&b""[..], &[22, 3, 1, 2, 0][..]] {
            let after = closed_after(port, first, timeout + margin * 4);
            assert!(
                after >= timeout - Duration::from_millis(100) && after <= timeout + margin,
                "{listener}, {first:?}: closed after {after:?}"
            );
        }
    }
}

#[test]
fn a_connection_in_its_handshake_holds_its_place_under_the_cap() {
    let certs = Certs::make();
    let controller = tls_controller(
        &certs,
        false,
        &rules(5),
        &[
            "--header-read-timeout-ms",
            "2000",
            "--check-max-connections",
            "1",
        ],
        false,
    );
    let open = "sluice_connections_open{listener=\"check\"}";
    let refused = "sluice_connections_refused_total{listener=\"check\"}";
    sluice_e2e::wait_until("no check connection open", Duration::from_secs(5), || {
        metric(&controller, open) == 0
    });
    let refused_before = metric(&controller, refused);
    // A connection that sends no ClientHello takes the only place…
    let mut silent = TcpStream::connect(("127.0.0.1", controller.port)).expect("connect");
    sluice_e2e::wait_until("the silent connection held", Duration::from_secs(5), || {
        metric(&controller, open) == 1
    });
    // …so a caller that would finish its handshake is closed at once, and counted.
    let turned_away = controller.get("/healthz");
    assert!(turned_away.is_err(), "the place was free: {turned_away:?}");
    assert!(metric(&controller, refused) > refused_before);
    // Once the silent one is dropped (the header-read timeout), the place is free again.
    silent
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("read timeout");
    let mut byte = [0u8; 1];
    assert!(matches!(silent.read(&mut byte), Ok(0) | Err(_)));
    sluice_e2e::wait_until("the place freed", Duration::from_secs(5), || {
        controller.get("/healthz").is_ok_and(|r| r.status == 200)
    });
}

// -- (5) The gRPC API over TLS --------------------------------------------------------------

#[test]
fn envoys_rate_limit_filter_gets_answers_from_the_grpc_api_over_mtls() {
    let certs = Certs::make();
    let controller = tls_controller(&certs, true, &rules(3), &[], true);
    let upstream = Upstream::start();
    let envoy = Envoy::start_with_controller_tls(
        &EnvoyOptions {
            filter: Filter::NativeRateLimit {
                failure_mode_deny: true,
                rate_limits: rate_limits_yaml(&[&["{ remote_address: {} }"]]),
            },
            upstream_port: upstream.port(),
            controller_ports: vec![controller.grpc()],
            concurrency: 1,
            controller_http2: true,
        },
        &certs.envoy(Some("client")),
    );
    for remaining in (0..3).rev() {
        let response = get(&envoy);
        assert_eq!(
            response.status,
            200,
            "{response:?}\n{}\n{}",
            envoy.log(),
            controller.log()
        );
        assert_eq!(response.body, "hello from upstream\n");
        assert_eq!(response.number("x-ratelimit-remaining"), remaining);
    }
    let denied = get(&envoy);
    assert_eq!(denied.status, 429, "{denied:?}");
    // The calls went over TLS (the health checks, HTTP/1.1 on the gRPC port, are not
    // answered there: see the README for `health_check_config` pointing at the check port).
    assert_cluster_over_tls(&envoy, false);
}

// -- (6) Bad TLS settings stop the start ----------------------------------------------------

/// Runs the controller with `args` (development mode, free ports) and returns its exit
/// status and what it wrote, failing if it is still running after 20 s.
fn run_to_exit(args: &[&str]) -> (std::process::ExitStatus, String) {
    let mut child = Command::new(controller_binary())
        .args(["--mode", "development"])
        .args(["--listen", &format!("127.0.0.1:{}", free_port())])
        .args(["--admin-listen", &format!("127.0.0.1:{}", free_port())])
        .args(args)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the controller");
    let deadline = Instant::now() + Duration::from_secs(20);
    while child.try_wait().expect("wait").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let output = child.wait_with_output().expect("output");
            panic!(
                "{args:?}: still running after 20 s\n{}",
                String::from_utf8_lossy(&output.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let output = child.wait_with_output().expect("output");
    (
        output.status,
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

fn arg(path: &Path) -> &str {
    path.to_str().expect("a UTF-8 path")
}

#[test]
fn bad_tls_settings_stop_the_start_naming_the_setting() {
    let certs = Certs::make();
    let (cert, key) = certs.pair("server");
    let (other_cert, other_key) = certs.pair("client");
    let ca = certs.path("ca.pem");
    let missing = certs.path("missing.pem");
    let not_pem = certs.path("not-pem.txt");
    std::fs::write(&not_pem, "just some text\n").expect("write");
    let cases: Vec<(Vec<&str>, &str, &str)> = vec![
        (
            vec!["--tls-cert-file", arg(&cert)],
            "tls_key_file",
            "needs the certificate's private key",
        ),
        (
            vec!["--tls-key-file", arg(&key)],
            "tls_cert_file",
            "needs the certificate",
        ),
        (
            vec!["--tls-client-ca-file", arg(&ca)],
            "tls_client_ca_file",
            "only over TLS",
        ),
        (
            vec![
                "--tls-cert-file",
                arg(&missing),
                "--tls-key-file",
                arg(&key),
            ],
            "tls_cert_file",
            "cannot read",
        ),
        (
            vec![
                "--tls-cert-file",
                arg(&not_pem),
                "--tls-key-file",
                arg(&key),
            ],
            "tls_cert_file",
            "holds no certificate",
        ),
        (
            // A key where the certificate belongs, and the reverse.
            vec!["--tls-cert-file", arg(&key), "--tls-key-file", arg(&key)],
            "tls_cert_file",
            "holds no certificate",
        ),
        (
            vec!["--tls-cert-file", arg(&cert), "--tls-key-file", arg(&cert)],
            "tls_key_file",
            "holds no private key",
        ),
        (
            vec![
                "--tls-cert-file",
                arg(&cert),
                "--tls-key-file",
                arg(&other_key),
            ],
            "tls_key_file",
            "is not the key of the certificate",
        ),
        (
            vec![
                "--tls-cert-file",
                arg(&other_cert),
                "--tls-key-file",
                arg(&key),
            ],
            "tls_key_file",
            "is not the key of the certificate",
        ),
        (
            vec![
                "--tls-cert-file",
                arg(&cert),
                "--tls-key-file",
                arg(&key),
                "--tls-client-ca-file",
                arg(&not_pem),
            ],
            "tls_client_ca_file",
            "holds no certificate",
        ),
        (
            vec![
                "--tls-cert-file",
                arg(&cert),
                "--tls-key-file",
                arg(&key),
                "--tls-client-ca-file",
                arg(&missing),
            ],
            "tls_client_ca_file",
            "cannot read",
        ),
    ];
    for (args, setting, says) in cases {
        let (status, stderr) = run_to_exit(&args);
        assert!(!status.success(), "{args:?}: {status}\n{stderr}");
        let named = format!(
            "setting `{setting}` (--{}, SLUICE_{})",
            setting.replace('_', "-"),
            setting.to_ascii_uppercase()
        );
        assert!(
            stderr.contains(&named) && stderr.contains(says),
            "{args:?}: expected {named} … {says}\n{stderr}"
        );
        assert!(
            !stderr.contains("listening"),
            "{args:?}: refused before any listener\n{stderr}"
        );
    }
    // The same files, right, start a controller: every other test here.
}
