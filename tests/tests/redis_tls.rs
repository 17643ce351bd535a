//! The controller on a Redis that speaks TLS only (`rediss://`): a real `redis-server
//! --tls-port` with a certificate made here by the `openssl` command, trusted through
//! `SSL_CERT_FILE` (the controller trusts the system's CAs and that file's). The counters
//! and the configuration live there; a controller that does not trust the CA is not ready.

use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::json;
use sluice_e2e::controller::{controller_binary, ControllerOptions};
use sluice_e2e::{free_port, http, wait_until, Controller, Process};

const RULES: &str = "[[rules]]\nname = \"per-client\"\nlimit = 3\nwindow = \"1h\"\n";

fn openssl(dir: &Path, args: &[&str]) {
    let output = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("the openssl command (make installs it)");
    assert!(
        output.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// A CA (`ca.pem`) and Redis's certificate of it for 127.0.0.1 (`redis.pem`, `redis.key`);
/// and a CA nobody used (`other-ca.pem`).
fn certificates(dir: &Path) {
    for ca in ["ca", "other-ca"] {
        openssl(
            dir,
            &[
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-nodes",
                "-keyout",
                &format!("{ca}.key"),
                "-out",
                &format!("{ca}.pem"),
                "-days",
                "2",
                "-subj",
                &format!("/CN=sluice test {ca}"),
            ],
        );
    }
    openssl(
        dir,
        &[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            "redis.key",
            "-out",
            "redis.csr",
            "-subj",
            "/CN=127.0.0.1",
        ],
    );
    std::fs::write(
        dir.join("redis.ext"),
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n",
    )
    .expect("write the extensions");
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            "redis.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "redis.pem",
            "-days",
            "2",
            "-extfile",
            "redis.ext",
        ],
    );
}

/// A redis-server that speaks TLS only, on a free port.
fn tls_redis(dir: &Path) -> (Process, u16) {
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
        .arg(dir.join("redis.pem"))
        .arg("--tls-key-file")
        .arg(dir.join("redis.key"))
        .arg("--tls-ca-cert-file")
        .arg(dir.join("ca.pem"))
        .current_dir(dir);
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
    let dir = tempfile::tempdir().expect("temp dir");
    certificates(dir.path());
    let (_redis, port) = tls_redis(dir.path());
    let url = format!("rediss://127.0.0.1:{port}");
    // Ready means its PING went through over TLS, and the configuration was stored there.
    let controller = Controller::start_with(&ControllerOptions {
        env: trusting(dir.path().join("ca.pem")),
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
        env: trusting(dir.path().join("ca.pem")),
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
    let dir = tempfile::tempdir().expect("temp dir");
    certificates(dir.path());
    let (_redis, port) = tls_redis(dir.path());
    let (listen, admin) = (free_port(), free_port());
    let mut command = Command::new(controller_binary());
    command
        .args(["--mode", "development"])
        .args(["--listen", &format!("127.0.0.1:{listen}")])
        .args(["--admin-listen", &format!("127.0.0.1:{admin}")])
        .args(["--redis-url", &format!("rediss://127.0.0.1:{port}")])
        .env("SSL_CERT_FILE", dir.path().join("other-ca.pem"))
        .stdin(Stdio::null());
    let _controller = Process::spawn("controller", command, &dir.path().join("controller.log"));
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
