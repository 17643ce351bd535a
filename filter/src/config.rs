//! Plugin configuration: parsed and checked once, at `on_configure`.
//!
//! A configuration that does not parse or does not make sense is refused as a whole, with a
//! message naming the field; the filter never runs half-configured.

use std::fmt;
use std::time::Duration;

use serde::Deserialize;

/// What happens to a request when the controller cannot give a decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FailureMode {
    /// Let the request through without a limit (logged and counted).
    Allow,
    /// Refuse the request with 503.
    Deny,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    controller: RawController,
    #[serde(default = "default_failure_mode")]
    failure_mode: FailureMode,
    #[serde(default)]
    cost_header: Option<String>,
    #[serde(default = "default_batching")]
    batching: bool,
    #[serde(default = "default_max_batch_size")]
    max_batch_size: usize,
}

fn default_batching() -> bool {
    true
}

fn default_max_batch_size() -> usize {
    128
}

/// Most checks one batch may carry (the controller takes at most 1024 per call).
pub const MAX_BATCH_SIZE: usize = 1_024;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawController {
    cluster: String,
    #[serde(default)]
    authority: Option<String>,
    #[serde(default = "default_timeout_ms")]
    timeout_ms: u64,
}

fn default_failure_mode() -> FailureMode {
    FailureMode::Allow
}

fn default_timeout_ms() -> u64 {
    200
}

/// Longest callout timeout accepted; a request waits at most this long for a decision.
pub const MAX_TIMEOUT_MS: u64 = 60_000;

/// Checked configuration, ready for every request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FilterConfig {
    pub controller_cluster: String,
    pub controller_authority: String,
    pub timeout: Duration,
    pub failure_mode: FailureMode,
    /// Request header whose number is the request's cost (lower-case), if any.
    pub cost_header: Option<String>,
    /// Whether the checks of concurrent requests share callouts (see `batch`).
    pub batching: bool,
    pub max_batch_size: usize,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// Dotted path of the offending field, or `.` for the document itself.
    pub field: String,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "invalid plugin configuration at `{}`: {}",
            self.field, self.message
        )
    }
}

impl FilterConfig {
    pub fn parse(bytes: &[u8]) -> Result<Self, ConfigError> {
        let mut deserializer = serde_json::Deserializer::from_slice(bytes);
        let raw: RawConfig =
            serde_path_to_error::deserialize(&mut deserializer).map_err(|e| ConfigError {
                field: e.path().to_string(),
                message: e.inner().to_string(),
            })?;
        let invalid = |field: &str, message: String| ConfigError {
            field: field.to_owned(),
            message,
        };
        let controller = raw.controller;
        if controller.cluster.trim().is_empty() {
            return Err(invalid(
                "controller.cluster",
                "must name an Envoy cluster".into(),
            ));
        }
        if controller.timeout_ms == 0 || controller.timeout_ms > MAX_TIMEOUT_MS {
            return Err(invalid(
                "controller.timeout_ms",
                format!(
                    "must be between 1 and {MAX_TIMEOUT_MS}, got {}",
                    controller.timeout_ms
                ),
            ));
        }
        let authority = controller
            .authority
            .unwrap_or_else(|| controller.cluster.clone());
        if authority.is_empty() || authority.bytes().any(|b| b.is_ascii_whitespace()) {
            return Err(invalid(
                "controller.authority",
                format!("`{authority}` is not a host name"),
            ));
        }
        if let Some(name) = &raw.cost_header {
            let token = |b: u8| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b);
            if name.is_empty() || !name.bytes().all(token) {
                return Err(invalid(
                    "cost_header",
                    format!("`{name}` is not a header name"),
                ));
            }
        }
        if raw.max_batch_size == 0 || raw.max_batch_size > MAX_BATCH_SIZE {
            return Err(invalid(
                "max_batch_size",
                format!(
                    "must be between 1 and {MAX_BATCH_SIZE}, got {}",
                    raw.max_batch_size
                ),
            ));
        }
        Ok(FilterConfig {
            controller_cluster: controller.cluster,
            controller_authority: authority,
            timeout: Duration::from_millis(controller.timeout_ms),
            failure_mode: raw.failure_mode,
            cost_header: raw.cost_header.map(|name| name.to_ascii_lowercase()),
            batching: raw.batching,
            max_batch_size: raw.max_batch_size,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minimal_config_takes_defaults() {
        let config = FilterConfig::parse(br#"{"controller":{"cluster":"sluice"}}"#).unwrap();
        assert_eq!(config.controller_authority, "sluice");
        assert_eq!(config.timeout, Duration::from_millis(200));
        assert_eq!(config.failure_mode, FailureMode::Allow);
        assert!(config.batching);
        assert_eq!(config.max_batch_size, 128);
    }

    #[test]
    fn full_config_parses() {
        let json = br#"{"controller":{"cluster":"c","authority":"ctl.local","timeout_ms":50},
                        "failure_mode":"deny"}"#;
        let config = FilterConfig::parse(json).unwrap();
        assert_eq!(config.controller_authority, "ctl.local");
        assert_eq!(config.timeout, Duration::from_millis(50));
        assert_eq!(config.failure_mode, FailureMode::Deny);
    }

    /// One bad document per error, paired with the field the operator is told about.
    #[test]
    fn each_bad_config_names_its_field() {
        let cases: [(&[u8], &str); 12] = [
            (b"", "."),
            (b"not json", "."),
            (br#"{}"#, "."),
            (
                br#"{"controller":{"cluster":"c"},"failur_mode":"deny"}"#,
                "failur_mode",
            ),
            (
                br#"{"controller":{"cluster":"c"},"failure_mode":"maybe"}"#,
                "failure_mode",
            ),
            (
                br#"{"controller":{"cluster":"c","timeout_ms":"fast"}}"#,
                "controller.timeout_ms",
            ),
            (
                br#"{"controller":{"cluster":"c","timeout_ms":0}}"#,
                "controller.timeout_ms",
            ),
            (br#"{"controller":{"cluster":" "}}"#, "controller.cluster"),
            (
                br#"{"controller":{"cluster":"c"},"cost_header":"x cost"}"#,
                "cost_header",
            ),
            (
                br#"{"controller":{"cluster":"c"},"max_batch_size":0}"#,
                "max_batch_size",
            ),
            (
                br#"{"controller":{"cluster":"c"},"batching":"yes"}"#,
                "batching",
            ),
            (
                br#"{"controller":{"cluster":"c","authority":"a b"}}"#,
                "controller.authority",
            ),
        ];
        for (json, field) in cases {
            let err = FilterConfig::parse(json).unwrap_err();
            assert_eq!(err.field, field, "{}: {err}", String::from_utf8_lossy(json));
        }
    }

    #[test]
    fn missing_and_unknown_fields_are_named_in_the_message() {
        let err = FilterConfig::parse(br#"{}"#).unwrap_err();
        assert!(
            err.to_string().contains("missing field `controller`"),
            "{err}"
        );
        let err = FilterConfig::parse(br#"{"controller":{"cluster":"c"},"failur_mode":"deny"}"#)
            .unwrap_err();
        assert!(
            err.to_string().contains("unknown field `failur_mode`"),
            "{err}"
        );
    }
}
