//! The controller on a Redis that speaks TLS only (`rediss://`): a real `redis-server
//! --tls-port` with a certificate made for the test (`sluice_e2e::certs`), trusted through
//! `SSL_CERT_FILE` (the controller trusts the system's CAs and that file's). The counters
//! and the configuration live there; a controller that does not trust the CA is not ready.

use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::json;
use sluice_e2e::certs::Certs;
use sluice_e2e::controller::{controller_binary, ControllerOptions};
use sluice_e2e::{free_port, http, wait_until, Controller, Process};

const RULES: &str = "[[rules]]\nname = \"per-client\"\nlimit = 3\nwindow = \"1h\"\n";

/// A redis-server that speaks TLS only, on a free port.
fn tls_redis(certs: &Certs) -> (Process, u16) {
    let dir = certs.path("");
    let port = free_port();
    let mut command = Command::new("redis-server");
    command
        .args([
            "--port",
            "0",
            "--tls-port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
        ])
        .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
        .args(["--tls-auth-clients", "no"])
        .arg("--tls-cert-file")
        .arg(certs.path("server.pem"))
        .arg("--tls-key-file")
        .arg(certs.path("server.key"))
        .arg("--tls-ca-cert-file")
        .arg(certs.path("ca.pem"))
        .current_dir(&dir);
    let process = Process::spawn("redis-tls", command, &dir.join("redis.log"));
    wait_until("redis-server's TLS port", Duration::from_secs(10), || {
        TcpStream::connect(("127.0.0.1", port)).is_ok()
    });
    (process, port)
}

fn trusting(ca: PathBuf) -> Vec<(String, String)> {
    vec![("SSL_CERT_FILE".to_owned(), ca.display().to_string())]
}

#[test]
fn the_controller_counts_and_keeps_its_configuration_on_a_tls_redis() {
    let certs = Certs::make();
    let (_redis, port) = tls_redis(&certs);
    let url = format!("rediss://127.0.0.1:{port}");
    // Ready means its PING went through over TLS, and the configuration was stored there.
    let controller = Controller::start_with(&ControllerOptions {
        env: trusting(certs.path("ca.pem")),
        ..ControllerOptions::new(RULES, Some(&url))
    });
    let check = json!({ "checks": [{ "client": { "kind": "ip", "value": "192.0.2.1" } }] });
    let remaining: Vec<u64> = (0..4)
        .map(|_| {
            let answer = http::post_check(&controller.url("/v1/check"), &check)
                .expect("a check")
                .json();
            answer["decisions"][0]["policy"]["remaining"]
                .as_u64()
                .unwrap_or_else(|| panic!("a remaining count: {answer}"))
        })
        .collect();
    assert_eq!(remaining, [2, 1, 0, 0], "{}", controller.log());
    let tier = controller.admin(
        "POST",
        "/v1/admin/tiers",
        Some(&json!({ "name": "gold", "limit": 10 })),
    );
    assert_eq!(tier.status, 201, "{tier:?}");
    // A second controller on the same TLS Redis sees both: counters and configuration.
    let second = Controller::start_with(&ControllerOptions {
        env: trusting(certs.path("ca.pem")),
        ..ControllerOptions::new("", Some(&url))
    });
    assert_eq!(second.config_version(), controller.config_version());
    let answer = http::post_check(&second.url("/v1/check"), &check)
        .expect("a check")
        .json();
    assert_eq!(answer["decisions"][0]["allowed"], false, "{answer}");
}

/// The certificate is checked: a controller that trusts another CA reaches no Redis and
/// says why on `/readyz`.
#[test]
fn a_controller_that_does_not_trust_the_redis_certificate_is_not_ready() {
    let certs = Certs::make();
    let (_redis, port) = tls_redis(&certs);
    let (listen, admin) = (free_port(), free_port());
    let mut command = Command::new(controller_binary());
    command
        .args(["--mode", "development"])
        .args(["--listen", &format!("127.0.0.1:{listen}")])
        .args(["--admin-listen", &format!("127.0.0.1:{admin}")])
        .args(["--redis-url", &format!("rediss://127.0.0.1:{port}")])
        .env("SSL_CERT_FILE", certs.path("other-ca.pem"))
        .stdin(Stdio::null());
    let _controller = Process::spawn("controller", command, &certs.path("controller.log"));
    let readyz = format!("http://127.0.0.1:{listen}/readyz");
    wait_until("the controller answers", Duration::from_secs(20), || {
        http::get(&readyz).is_ok()
    });
    // Several probes, each a try at Redis: none gets through.
    for _ in 0..5 {
        let ready = http::get(&readyz).expect("readyz");
        assert_eq!(ready.status, 503, "{ready:?}");
        std::thread::sleep(Duration::from_millis(200));
    }
}
