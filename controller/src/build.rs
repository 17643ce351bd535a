//! Which build of the controller this is: the software's version (semantic, the crates'
//! version) and the commit it was built from. Not the configuration's version, which
//! `GET /v1/admin/version` reports.

/// The release, as `--version`, `sluice_build_info` and `GET /v1/admin/build` give it.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// The commit built (`unknown` when the build had no git and no `SLUICE_COMMIT`).
pub const COMMIT: &str = env!("SLUICE_COMMIT");
