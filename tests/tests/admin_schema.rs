//! The admin API against its own OpenAPI document: schemathesis (from PyPI, `make
//! schemathesis` installs it in `.venv`) generates requests for every operation the
//! document describes, with the admin token, valid and invalid ones, follows the document's
//! links from what it creates to reading, changing and deleting it, and holds every answer
//! to the document: no 5xx; a status the operation documents; the documented content type,
//! body schema and headers (the `ETag` the document says every success carries); invalid
//! input refused; a token left out, a required header left out or a method the path does
//! not take refused as documented.
//!
//! Not checked: that every request the document's schemas allow is accepted
//! (`positive_data_acceptance`). The document says what a field is (a string, a list
//! name), not every rule the server validates it by (a rule name's characters, a duration's
//! syntax, `kind` and `value` given together), so schema-valid requests are refused with a
//! documented `400`.

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

/// What every answer is held to (`schemathesis run --help` lists them).
const CHECKS: &[&str] = &[
    "not_a_server_error",
    "status_code_conformance",
    "content_type_conformance",
    "response_headers_conformance",
    "response_schema_conformance",
    "negative_data_rejection",
    "missing_required_header",
    "unsupported_method",
    "allow_header_conformance",
    "ignored_auth",
    "use_after_free",
    "ensure_resource_availability",
];

#[test]
fn every_generated_request_is_answered_as_the_document_says() {
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
        .args(["--checks", CHECKS.join(",").as_str()])
        // Server-sent events: an answer that does not end until the client goes.
        // controller/tests/stats_stream.rs tests it.
        .args(["--exclude-path", "/v1/admin/stats/stream"])
        .args(["--header", &format!("Authorization: Bearer {ADMIN_TOKEN}")])
        .args(["--phases", "examples,coverage,fuzzing,stateful"])
        .args(["--max-examples", "25", "--workers", "1"])
        .args(["--seed", "1", "--generation-database", "none"])
        .args(["--output-truncate", "false"])
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
    // Every operation but the stream was tried, in every phase.
    let document = sluice_e2e::http::get(&controller.admin_url("/v1/admin/openapi.json"))
        .expect("the document")
        .json();
    let operations: usize = document["paths"]
        .as_object()
        .expect("paths")
        .values()
        .map(|item| item.as_object().map_or(0, |methods| methods.len()))
        .sum();
    let tested = report
        .lines()
        .find_map(|line| line.trim().strip_prefix("Tested: "))
        .and_then(|n| n.trim().parse::<usize>().ok());
    assert_eq!(
        tested,
        Some(operations - 1),
        "schemathesis did not try every operation:\n{report}"
    );
    for phase in ["Examples", "Coverage", "Fuzzing", "Stateful"] {
        assert!(
            report.contains(&format!("✅ {phase}")),
            "the {phase} phase did not pass:\n{report}"
        );
    }
    assert!(
        !controller.log().contains("panicked"),
        "{}",
        controller.log()
    );
}
