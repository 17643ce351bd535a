//! Usage known only from the response (LLM tokens, credits an upstream reports): a rule
//! with [`Usage`] reserves an estimate when it admits a request, and the filter settles
//! the reservation when the response ends, with what the response says was used. The
//! controller puts everything the filter needs to read and settle into the decision
//! ([`UsageReservation`]), so the filter reads a response only for requests that hold one.

use serde::{Deserialize, Serialize};

/// Most a response may report (and a reservation hold): a clamp, not a limit.
pub const MAX_USAGE: u64 = 1_000_000_000_000;
/// Longest JSON pointer a rule may name.
pub const MAX_POINTER_BYTES: usize = 256;
/// Most settlements one release call carries.
pub const MAX_SETTLEMENTS_PER_CALL: usize = 1_024;
/// Most figures one check carries from its request body (distinct `reserve_from` pointers
/// of the rules that may apply).
pub const MAX_REQUEST_FIGURES: usize = 8;

/// Where a response says what its request used, and what is reserved until it does.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Usage {
    /// A response header holding a whole number (`x-usage-tokens`). One of
    /// `response_header` and `json_pointer`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response_header: Option<String>,
    /// An RFC 6901 pointer into the JSON response body (`/usage/total_tokens`); in a
    /// `text/event-stream` reply, into each event's `data`, the last event that has it
    /// counting.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub json_pointer: Option<String>,
    /// Units reserved when a request is admitted, taken from the limit like a cost; with
    /// `reserve_from`, only when the request does not say.
    pub reserve: u64,
    /// An RFC 6901 pointer into the JSON request body (`/max_tokens`): a whole number there
    /// is the reservation (at least 1, at most `max`). The filter reads a request body of at
    /// most 64 KiB for it; without a figure (no body, not JSON, larger, compressed, no such
    /// field, not a whole number) the reservation is `reserve`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reserve_from: Option<String>,
    /// The most one response may report: larger figures count as this (default and at
    /// most 10^12).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max: Option<u64>,
    /// Units charged when the response does not say (no header, no figure in the body,
    /// a body that is not JSON or too large to read, a stream cut before its usage);
    /// default: the reservation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unreported: Option<u64>,
}

impl Usage {
    pub fn source(&self) -> Option<UsageSource> {
        match (&self.response_header, &self.json_pointer) {
            (Some(header), None) => Some(UsageSource::ResponseHeader(header.to_ascii_lowercase())),
            (None, Some(pointer)) => Some(UsageSource::JsonPointer(pointer.clone())),
            _ => None,
        }
    }

    /// The most one response may count, `max` or else `default_max` (what the rule's
    /// strategy and window can count exactly: see `Rule::usage_max`).
    pub fn max_or(&self, default_max: u64) -> u64 {
        self.max.unwrap_or(default_max)
    }

    pub fn unreported(&self) -> u64 {
        self.unreported.unwrap_or(self.reserve)
    }

    /// What a request reserves: the figure its body holds at `reserve_from` (among
    /// `figures`, by pointer), clamped to 1..=`max`, or else `reserve`.
    pub fn reservation(&self, figures: &std::collections::BTreeMap<String, u64>, max: u64) -> u64 {
        self.reserve_from
            .as_ref()
            .and_then(|pointer| figures.get(pointer))
            .map_or(self.reserve, |figure| (*figure).clamp(1, max.max(1)))
    }

    /// The first field that is wrong, and why, with `max` as the rule makes it.
    pub fn validate(&self, max: u64) -> Result<(), (&'static str, String)> {
        match (&self.response_header, &self.json_pointer) {
            (Some(_), Some(_)) | (None, None) => {
                return Err((
                    "usage",
                    "set one of response_header and json_pointer".into(),
                ))
            }
            (Some(header), None) => {
                let token = |b: u8| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b);
                if header.is_empty()
                    || header.len() > crate::MAX_HEADER_NAME_BYTES
                    || !header.bytes().all(token)
                {
                    return Err((
                        "usage.response_header",
                        format!("`{header}` is not a header name"),
                    ));
                }
            }
            (None, Some(pointer)) => check_pointer("usage.json_pointer", pointer)?,
        }
        if let Some(pointer) = &self.reserve_from {
            check_pointer("usage.reserve_from", pointer)?;
        }
        if max > MAX_USAGE || max == 0 {
            return Err(("usage.max", format!("must be from 1 to {MAX_USAGE}")));
        }
        if self.reserve == 0 || self.reserve > max {
            return Err((
                "usage.reserve",
                format!("must be from 1 to usage.max ({max})"),
            ));
        }
        if self.unreported() > max {
            return Err((
                "usage.unreported",
                format!("must be at most usage.max ({max})"),
            ));
        }
        Ok(())
    }
}

/// An RFC 6901 pointer a rule may name: from the root, bounded, with valid escapes.
pub fn check_pointer(field: &'static str, pointer: &str) -> Result<(), (&'static str, String)> {
    if !pointer.starts_with('/') || pointer.len() > MAX_POINTER_BYTES {
        return Err((
            field,
            format!("`{pointer}` must start with `/` and be at most {MAX_POINTER_BYTES} bytes"),
        ));
    }
    if !valid_escapes(pointer) {
        return Err((
            field,
            format!("`{pointer}`: `~` must be followed by 0 or 1 (RFC 6901)"),
        ));
    }
    Ok(())
}

fn valid_escapes(pointer: &str) -> bool {
    let bytes = pointer.as_bytes();
    bytes
        .iter()
        .enumerate()
        .all(|(i, &b)| b != b'~' || matches!(bytes.get(i + 1), Some(b'0' | b'1')))
}

/// Where the filter reads a response's usage.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UsageSource {
    /// A response header (lower case).
    ResponseHeader(String),
    /// A JSON pointer into the body, or into each event of an event stream.
    JsonPointer(String),
}

/// What an admitted request holds of a usage rule's limit until it settles: sent in the
/// decision to a filter that said it settles ([`crate::Check::settles`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UsageReservation {
    pub rule: String,
    pub reserved: u64,
    pub from: UsageSource,
    /// Larger reported figures count as this.
    pub max: u64,
    /// What is charged when the response does not say.
    pub unreported: u64,
    /// Signed by the controller: names the limit and the reservation, settles once.
    pub token: String,
}

/// A reservation settled: the response said `used` (clamped to the reservation's `max`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Settlement {
    pub reservation: String,
    pub used: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn usage(header: Option<&str>, pointer: Option<&str>, reserve: u64) -> Usage {
        Usage {
            response_header: header.map(str::to_owned),
            json_pointer: pointer.map(str::to_owned),
            reserve,
            reserve_from: None,
            max: None,
            unreported: None,
        }
    }

    #[test]
    fn exactly_one_source_is_named() {
        assert_eq!(
            usage(None, None, 1).validate(MAX_USAGE).unwrap_err().0,
            "usage"
        );
        assert_eq!(
            usage(Some("x-tokens"), Some("/usage/total_tokens"), 1)
                .validate(MAX_USAGE)
                .unwrap_err()
                .0,
            "usage"
        );
        assert!(usage(Some("X-Tokens"), None, 1).validate(MAX_USAGE).is_ok());
        assert_eq!(
            usage(Some("X-Tokens"), None, 1).source(),
            Some(UsageSource::ResponseHeader("x-tokens".into()))
        );
        assert!(usage(None, Some("/usage/total_tokens"), 1)
            .validate(MAX_USAGE)
            .is_ok());
    }

    #[test]
    fn each_bad_field_is_named() {
        let cases = [
            (usage(Some("x tokens"), None, 1), "usage.response_header"),
            (usage(Some(""), None, 1), "usage.response_header"),
            (usage(None, Some("usage"), 1), "usage.json_pointer"),
            (usage(None, Some("/a~2b"), 1), "usage.json_pointer"),
            (usage(None, Some("/a~"), 1), "usage.json_pointer"),
            (
                usage(None, Some(&format!("/{}", "a".repeat(300))), 1),
                "usage.json_pointer",
            ),
            (usage(None, Some("/t"), 0), "usage.reserve"),
            (
                Usage {
                    reserve_from: Some("max_tokens".into()),
                    ..usage(None, Some("/t"), 1)
                },
                "usage.reserve_from",
            ),
            (
                Usage {
                    reserve_from: Some("/a~".into()),
                    ..usage(None, Some("/t"), 1)
                },
                "usage.reserve_from",
            ),
            (
                Usage {
                    max: Some(10),
                    ..usage(None, Some("/t"), 11)
                },
                "usage.reserve",
            ),
            (
                Usage {
                    max: Some(MAX_USAGE + 1),
                    ..usage(None, Some("/t"), 1)
                },
                "usage.max",
            ),
            (
                Usage {
                    max: Some(10),
                    unreported: Some(11),
                    ..usage(None, Some("/t"), 1)
                },
                "usage.unreported",
            ),
        ];
        for (usage, field) in cases {
            let max = usage.max_or(MAX_USAGE);
            assert_eq!(usage.validate(max).unwrap_err().0, field, "{usage:?}");
        }
        assert!(usage(None, Some("/a~0b/c~1d"), 5)
            .validate(MAX_USAGE)
            .is_ok());
    }

    #[test]
    fn what_is_charged_unreported_defaults_to_the_reservation() {
        assert_eq!(usage(None, Some("/t"), 300).unreported(), 300);
        assert_eq!(
            Usage {
                unreported: Some(0),
                ..usage(None, Some("/t"), 300)
            }
            .unreported(),
            0
        );
    }

    #[test]
    fn a_request_reserves_what_its_body_says_within_one_and_max() {
        let with_pointer = Usage {
            reserve_from: Some("/max_tokens".into()),
            ..usage(None, Some("/usage/completion_tokens"), 300)
        };
        let figures = |pairs: &[(&str, u64)]| {
            pairs
                .iter()
                .map(|(pointer, figure)| ((*pointer).to_owned(), *figure))
                .collect::<std::collections::BTreeMap<_, _>>()
        };
        assert_eq!(
            with_pointer.reservation(&figures(&[("/max_tokens", 77)]), 1_000),
            77
        );
        assert_eq!(
            with_pointer.reservation(&figures(&[("/max_tokens", 0)]), 1_000),
            1
        );
        assert_eq!(
            with_pointer.reservation(&figures(&[("/max_tokens", 5_000)]), 1_000),
            1_000
        );
        // Not said, or said at another pointer: the fixed reservation.
        assert_eq!(with_pointer.reservation(&figures(&[]), 1_000), 300);
        assert_eq!(
            with_pointer.reservation(&figures(&[("/n", 77)]), 1_000),
            300
        );
        // A rule without `reserve_from` ignores what the body says.
        let fixed = usage(None, Some("/usage/completion_tokens"), 300);
        assert_eq!(
            fixed.reservation(&figures(&[("/max_tokens", 77)]), 1_000),
            300
        );
        assert!(with_pointer.validate(1_000).is_ok());
    }
}
