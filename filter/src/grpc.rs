//! gRPC clients get the filter's local replies as gRPC: a status they understand
//! (`RESOURCE_EXHAUSTED` rather than the `UNAVAILABLE` Envoy would map a 429 to, which
//! clients retry at once), a short plain message instead of the JSON body, and the
//! rate-limit headers plus `grpc-retry-pushback-ms` in the trailers-only reply. No host
//! calls here: the request path passes in the request's `content-type`.
//!
//! What Envoy does with a local reply to a gRPC request (content-type `application/grpc`
//! or `application/grpc+…`, Envoy's own test): it answers `200` trailers-only, sets
//! `grpc-status` from the `grpc_status` argument of `proxy_send_local_response`, and puts
//! the body, percent-encoded by Envoy, in `grpc-message`; the headers the filter adds stay.
//! So for gRPC the filter hands Envoy the plain message and never encodes it itself.
//! gRPC-Web (`application/grpc-web…`) is not gRPC to Envoy (unless its `grpc_web` filter
//! runs first and turns the request into gRPC): the filter then builds the reply itself,
//! `200` with `grpc-status` and a `grpc-message` it percent-encodes, both as headers and as
//! the trailer frame in the body (base64 for `grpc-web-text`). The body is needed: Envoy
//! drops the `content-type` of a local reply without one.

use std::fmt;

use crate::decision::{Headers, ReplyKind};

/// gRPC status codes (<https://grpc.github.io/grpc/core/md_doc_statuscodes.html>).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Code {
    Cancelled = 1,
    Unknown = 2,
    InvalidArgument = 3,
    DeadlineExceeded = 4,
    NotFound = 5,
    AlreadyExists = 6,
    PermissionDenied = 7,
    ResourceExhausted = 8,
    FailedPrecondition = 9,
    Aborted = 10,
    OutOfRange = 11,
    Unimplemented = 12,
    Internal = 13,
    Unavailable = 14,
    DataLoss = 15,
    Unauthenticated = 16,
}

impl Code {
    /// Every code a refusal may carry, with its canonical name. `OK` (0) is not one: a
    /// refused call must not look like a successful one.
    pub const ALL: [(Code, &'static str); 16] = [
        (Code::Cancelled, "CANCELLED"),
        (Code::Unknown, "UNKNOWN"),
        (Code::InvalidArgument, "INVALID_ARGUMENT"),
        (Code::DeadlineExceeded, "DEADLINE_EXCEEDED"),
        (Code::NotFound, "NOT_FOUND"),
        (Code::AlreadyExists, "ALREADY_EXISTS"),
        (Code::PermissionDenied, "PERMISSION_DENIED"),
        (Code::ResourceExhausted, "RESOURCE_EXHAUSTED"),
        (Code::FailedPrecondition, "FAILED_PRECONDITION"),
        (Code::Aborted, "ABORTED"),
        (Code::OutOfRange, "OUT_OF_RANGE"),
        (Code::Unimplemented, "UNIMPLEMENTED"),
        (Code::Internal, "INTERNAL"),
        (Code::Unavailable, "UNAVAILABLE"),
        (Code::DataLoss, "DATA_LOSS"),
        (Code::Unauthenticated, "UNAUTHENTICATED"),
    ];

    pub fn number(self) -> u32 {
        self as u32
    }

    pub fn name(self) -> &'static str {
        Code::ALL
            .iter()
            .find(|(code, _)| *code == self)
            .map_or("UNKNOWN", |(_, name)| name)
    }

    /// A code by its canonical name (`RESOURCE_EXHAUSTED`) or its number (`8`).
    pub fn parse(value: &serde_json::Value) -> Result<Code, String> {
        let found = match value {
            serde_json::Value::String(name) => Code::ALL
                .iter()
                .find(|(_, known)| known == name)
                .map(|(code, _)| *code),
            serde_json::Value::Number(number) => number
                .as_f64()
                .filter(|n| n.fract() == 0.0)
                .and_then(|n| {
                    Code::ALL
                        .iter()
                        .find(|(code, _)| f64::from(*code as u32) == n)
                })
                .map(|(code, _)| *code),
            _ => None,
        };
        found.ok_or_else(|| {
            format!(
                "{value} is not a gRPC status for a refusal: give a name such as \
                 \"RESOURCE_EXHAUSTED\" or a code from 1 to 16 (0, OK, is not a refusal)"
            )
        })
    }
}

impl fmt::Display for Code {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.name(), self.number())
    }
}

/// The gRPC status of each kind of local reply (the plugin setting `grpc_status`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Statuses {
    pub rate_limited: Code,
    pub unavailable: Code,
    pub invalid_token: Code,
    pub unknown_api_key: Code,
    pub denylisted: Code,
}

impl Default for Statuses {
    fn default() -> Self {
        Statuses {
            rate_limited: Code::ResourceExhausted,
            unavailable: Code::Unavailable,
            invalid_token: Code::Unauthenticated,
            unknown_api_key: Code::Unauthenticated,
            denylisted: Code::PermissionDenied,
        }
    }
}

impl Statuses {
    pub fn code(&self, kind: ReplyKind) -> Code {
        match kind {
            ReplyKind::RateLimited => self.rate_limited,
            ReplyKind::Unavailable => self.unavailable,
            ReplyKind::InvalidToken => self.invalid_token,
            ReplyKind::UnknownApiKey => self.unknown_api_key,
            ReplyKind::Denylisted => self.denylisted,
        }
    }
}

/// How a request speaks gRPC, from its `content-type`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Protocol {
    /// `application/grpc` or `application/grpc+…`, as Envoy itself tells gRPC requests:
    /// Envoy turns the local reply into a gRPC one.
    Grpc,
    /// `application/grpc-web…`: the filter builds the gRPC-Web reply, with this
    /// content-type (the request's).
    GrpcWeb(String),
}

const GRPC: &[u8] = b"application/grpc";
const GRPC_WEB: &[u8] = b"application/grpc-web";
/// Longest content-type echoed back to a gRPC-Web client.
const MAX_CONTENT_TYPE_BYTES: usize = 128;

/// Whether a request with this `content-type` is gRPC, and which kind.
pub fn protocol(content_type: Option<&[u8]>) -> Option<Protocol> {
    let value = content_type?;
    // Envoy's rule (`Grpc::Common::hasGrpcContentType`): exactly `application/grpc`, or
    // followed by `+`; byte for byte.
    if value.starts_with(GRPC) && matches!(value.get(GRPC.len()), None | Some(b'+')) {
        return Some(Protocol::Grpc);
    }
    let prefix = value.get(..GRPC_WEB.len())?;
    if !prefix.eq_ignore_ascii_case(GRPC_WEB) {
        return None;
    }
    let echoed = std::str::from_utf8(value)
        .ok()
        .filter(|text| text.len() <= MAX_CONTENT_TYPE_BYTES)
        .filter(|text| text.bytes().all(|b| b.is_ascii_graphic() || b == b' '))
        .map_or_else(|| "application/grpc-web+proto".to_owned(), str::to_owned);
    Some(Protocol::GrpcWeb(echoed))
}

/// `grpc-message` percent-encoding (gRPC over HTTP/2: every byte outside `0x20..=0x7E`,
/// and `%`, as `%XX` of the UTF-8 bytes).
pub fn percent_encode(message: &str) -> String {
    let mut encoded = String::with_capacity(message.len());
    for byte in message.bytes() {
        if (0x20..=0x7e).contains(&byte) && byte != b'%' {
            encoded.push(char::from(byte));
        } else {
            encoded.push_str(&format!("%{byte:02X}"));
        }
    }
    encoded
}

/// gRPC-Web's trailer frame: flag `0x80`, the length (4 bytes, big-endian), then the
/// trailers as HTTP/1 header lines.
fn trailer_frame(code: Code, encoded_message: &str) -> Vec<u8> {
    let trailers = format!(
        "grpc-status:{}\r\ngrpc-message:{encoded_message}\r\n",
        code.number()
    );
    let length = u32::try_from(trailers.len()).unwrap_or(u32::MAX);
    let mut frame = Vec::with_capacity(5 + trailers.len());
    frame.push(0x80);
    frame.extend_from_slice(&length.to_be_bytes());
    frame.extend_from_slice(trailers.as_bytes());
    frame
}

/// A local reply as handed to Envoy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalReply {
    pub status: u32,
    pub headers: Headers,
    pub body: Vec<u8>,
    /// `grpc_status` of `proxy_send_local_response`: Envoy makes the reply gRPC with it.
    pub grpc_status: Option<u32>,
}

/// The gRPC form of a local reply: `headers` are the HTTP reply's (rate-limit headers,
/// `Retry-After`, its content-type, which goes), `message` the short text for
/// `grpc-message`, `retry_after_ms` the wait `grpc-retry-pushback-ms` tells the client.
pub fn local_reply(
    protocol: &Protocol,
    code: Code,
    status: u32,
    headers: &Headers,
    message: &str,
    retry_after_ms: Option<u64>,
) -> LocalReply {
    let mut grpc_headers: Headers = headers
        .iter()
        .filter(|(name, _)| *name != "content-type")
        .cloned()
        .collect();
    if let Some(ms) = retry_after_ms {
        grpc_headers.push(("grpc-retry-pushback-ms", ms.to_string()));
    }
    match protocol {
        // Envoy sets `:status` 200, `content-type`, `grpc-status` (from the argument) and
        // `grpc-message` (the body, percent-encoded by Envoy).
        Protocol::Grpc => LocalReply {
            status,
            headers: grpc_headers,
            body: message.as_bytes().to_vec(),
            grpc_status: Some(code.number()),
        },
        Protocol::GrpcWeb(content_type) => {
            let encoded = percent_encode(message);
            let body = trailer_frame(code, &encoded);
            let body = if content_type.to_ascii_lowercase().contains("grpc-web-text") {
                use base64::Engine;
                base64::engine::general_purpose::STANDARD
                    .encode(body)
                    .into_bytes()
            } else {
                body
            };
            grpc_headers.push(("content-type", content_type.clone()));
            grpc_headers.push(("grpc-status", code.number().to_string()));
            grpc_headers.push(("grpc-message", encoded));
            LocalReply {
                status: 200,
                headers: grpc_headers,
                body,
                grpc_status: None,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_is_told_as_envoy_tells_it_and_grpc_web_apart() {
        let cases: [(&[u8], Option<Protocol>); 10] = [
            (b"application/grpc", Some(Protocol::Grpc)),
            (b"application/grpc+proto", Some(Protocol::Grpc)),
            (b"application/grpc+json", Some(Protocol::Grpc)),
            (
                b"application/grpc-web",
                Some(Protocol::GrpcWeb("application/grpc-web".into())),
            ),
            (
                b"application/grpc-web-text+proto",
                Some(Protocol::GrpcWeb("application/grpc-web-text+proto".into())),
            ),
            (
                b"Application/GRPC-Web+proto",
                Some(Protocol::GrpcWeb("Application/GRPC-Web+proto".into())),
            ),
            (
                b"application/grpc-web\xff",
                Some(Protocol::GrpcWeb("application/grpc-web+proto".into())),
            ),
            (b"application/grpcx", None),
            (b"application/json", None),
            (b"", None),
        ];
        for (content_type, expected) in cases {
            assert_eq!(
                protocol(Some(content_type)),
                expected,
                "{}",
                String::from_utf8_lossy(content_type)
            );
        }
        assert_eq!(protocol(None), None);
    }

    #[test]
    fn messages_are_percent_encoded_as_grpc_says() {
        assert_eq!(
            percent_encode("rate limit `per-client` exceeded, retry in 7 s"),
            "rate limit `per-client` exceeded, retry in 7 s"
        );
        assert_eq!(percent_encode("100% caf\u{e9}\n"), "100%25 caf%C3%A9%0A");
    }

    #[test]
    fn codes_parse_by_name_or_number_and_never_ok() {
        use serde_json::json;
        assert_eq!(
            Code::parse(&json!("RESOURCE_EXHAUSTED")),
            Ok(Code::ResourceExhausted)
        );
        assert_eq!(Code::parse(&json!(14)), Ok(Code::Unavailable));
        assert_eq!(Code::parse(&json!(16.0)), Ok(Code::Unauthenticated));
        for bad in [
            json!(0),
            json!("OK"),
            json!(17),
            json!(8.5),
            json!("resource_exhausted"),
            json!(null),
        ] {
            assert!(Code::parse(&bad).is_err(), "{bad}");
        }
        for (code, name) in Code::ALL {
            assert_eq!(code.name(), name);
            assert_eq!(Code::parse(&json!(code.number())), Ok(code));
        }
    }

    fn rate_headers() -> Headers {
        vec![
            ("x-ratelimit-limit", "5".to_owned()),
            ("retry-after", "7".to_owned()),
            ("content-type", "application/json".to_owned()),
        ]
    }

    #[test]
    fn grpc_replies_leave_the_encoding_to_envoy_and_keep_the_headers() {
        let reply = local_reply(
            &Protocol::Grpc,
            Code::ResourceExhausted,
            429,
            &rate_headers(),
            "rate limit `per-client` exceeded, retry in 7 s",
            Some(6_500),
        );
        assert_eq!(reply.grpc_status, Some(8));
        assert_eq!(
            reply.body,
            b"rate limit `per-client` exceeded, retry in 7 s"
        );
        assert_eq!(
            reply.headers,
            vec![
                ("x-ratelimit-limit", "5".to_owned()),
                ("retry-after", "7".to_owned()),
                ("grpc-retry-pushback-ms", "6500".to_owned()),
            ]
        );
    }

    #[test]
    fn grpc_web_replies_are_built_here_with_the_message_encoded_once() {
        let reply = local_reply(
            &Protocol::GrpcWeb("application/grpc-web+proto".into()),
            Code::PermissionDenied,
            403,
            &rate_headers(),
            "denied: 100%",
            None,
        );
        assert_eq!(reply.status, 200);
        assert_eq!(reply.grpc_status, None);
        let trailers = b"grpc-status:7\r\ngrpc-message:denied: 100%25\r\n";
        assert_eq!(reply.body.first(), Some(&0x80));
        assert_eq!(reply.body.get(1..5), Some(&[0, 0, 0, 44][..]));
        assert_eq!(reply.body.get(5..), Some(&trailers[..]));
        let header = |name: &str| {
            reply
                .headers
                .iter()
                .filter(|(n, _)| *n == name)
                .map(|(_, v)| v.as_str())
                .collect::<Vec<_>>()
        };
        assert_eq!(header("content-type"), ["application/grpc-web+proto"]);
        assert_eq!(header("grpc-status"), ["7"]);
        assert_eq!(header("grpc-message"), ["denied: 100%25"]);
        assert_eq!(header("retry-after"), ["7"]);
        assert!(header("grpc-retry-pushback-ms").is_empty());

        let text = local_reply(
            &Protocol::GrpcWeb("application/grpc-web-text".into()),
            Code::PermissionDenied,
            403,
            &rate_headers(),
            "denied: 100%",
            None,
        );
        use base64::Engine;
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(&text.body)
            .unwrap();
        assert_eq!(
            decoded, reply.body,
            "grpc-web-text carries the frame in base64"
        );
    }
}
