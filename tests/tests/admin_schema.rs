//! The admin API against its own OpenAPI document: schemathesis (from PyPI, `make
//! schemathesis` installs it in `.venv`) generates requests for every operation the
//! document describes, with the admin token, and fails on any 5xx answer.

use std::process::Command;

use sluice_e2e::controller::ADMIN_TOKEN;
use sluice_e2e::{repo_root, required_file, Controller};

const CONFIGURATION: &str = r#"
[[tiers]]
name = "pro"
limit = 100
window = "1m"

[[rules]]
name = "per-client"
limit = 10
window = "1m"
tier_limits = true
"#;

#[test]
fn no_generated_request_gets_a_server_error() {
    let schemathesis = required_file(
        "SCHEMATHESIS",
        &repo_root().join(".venv/bin/schemathesis"),
        "run `make schemathesis` first; `make test` does",
    );
    let controller = Controller::start(CONFIGURATION, None);
    let output = Command::new(schemathesis)
        .arg("run")
        .arg(controller.admin_url("/v1/admin/openapi.json"))
        .args(["--url", &controller.admin_url("")])
        .args(["--checks", "not_a_server_error"])
        // Server-sent events: an answer that does not end until the client goes.
        // controller/tests/stats_stream.rs tests it.
        .args(["--exclude-path", "/v1/admin/stats/stream"])
        .args(["--header", &format!("Authorization: Bearer {ADMIN_TOKEN}")])
        .args(["--phases", "examples,coverage,fuzzing"])
        .args(["--max-examples", "25", "--workers", "1"])
        .args(["--seed", "1"])
        .env("SCHEMATHESIS_HOOKS", "")
        .env("NO_COLOR", "1")
        .output()
        .expect("run schemathesis");
    let report = format!(
        "{}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        output.status.success(),
        "schemathesis found failures:\n{report}"
    );
    assert!(
        report.contains("passed") || report.contains("Passed"),
        "schemathesis ran no operation:\n{report}"
    );
    assert!(
        !controller.log().contains("panicked"),
        "{}",
        controller.log()
    );
}
