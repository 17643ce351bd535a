//! The `sluice` CLI binary, run against a test controller.

use std::path::PathBuf;
use std::process::Command;

use crate::controller::{Controller, ADMIN_TOKEN};
use crate::{repo_root, required_file};

pub fn binary() -> PathBuf {
    required_file(
        "SLUICE_CLI_BIN",
        &repo_root().join("target/debug/sluice"),
        "run `cargo build -p sluice-cli` first; `make test` does",
    )
}

/// Runs `sluice args…` against `controller`'s admin API with the admin token: its output,
/// or its error.
pub fn run(controller: &Controller, args: &[&str]) -> Result<String, String> {
    let output = Command::new(binary())
        .args(["--url", &controller.admin_url("")])
        .args(args)
        .env("SLUICE_ADMIN_TOKEN", ADMIN_TOKEN)
        .output()
        .expect("run sluice");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    if output.status.success() {
        Ok(stdout)
    } else {
        Err(stderr)
    }
}
