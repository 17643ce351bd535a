//! The one door between the filter and Envoy.
//!
//! Everything the filter asks of Envoy goes through [`Host`]: every call returns a
//! `Result` (or is best effort by design, like a log line), and everything Envoy hands over
//! comes as bytes. What a malformed value means is decided where it is read (see
//! `stream.rs`), never by a conversion that panics.
//!
//! Why not the proxy-wasm SDK (`proxy-wasm` 0.2.5, the newest on crates.io): its
//! convenience wrappers turn every header value into a `String` with `unwrap` (one request
//! with a `0xFF` byte in any header killed the worker's VM), most of its `hostcalls`
//! functions end in `panic!("unexpected status")`, and its dispatcher panics on a context
//! or callout token it does not know and `unwrap`s `set_effective_context`. A forked SDK
//! would carry its 3,000 lines to keep the twenty calls the filter makes. So the filter
//! speaks the proxy-wasm ABI (0.2.1) itself: `abi.rs` holds the raw imports and exports,
//! the only `unsafe` code of the crate, and implements this trait; `testing.rs` implements
//! it for native tests. The SDK is not a dependency at all, so none of its panicking
//! wrappers can be called (a test checks `Cargo.toml` keeps it out).

use std::borrow::Cow;
use std::fmt;
use std::ops::Range;

/// A status the host answered with, other than success.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    NotFound,
    BadArgument,
    SerializationFailure,
    ParseFailure,
    Empty,
    CasMismatch,
    InternalFailure,
    Unimplemented,
    /// A code this ABI version does not define.
    Unknown(u32),
}

impl Status {
    /// The host's return code as a result: 0 is success, anything else a [`Status`].
    pub fn check(code: u32) -> Result<(), Status> {
        Err(match code {
            0 => return Ok(()),
            1 => Status::NotFound,
            2 => Status::BadArgument,
            3 => Status::SerializationFailure,
            4 => Status::ParseFailure,
            7 => Status::Empty,
            8 => Status::CasMismatch,
            10 => Status::InternalFailure,
            12 => Status::Unimplemented,
            other => Status::Unknown(other),
        })
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum LogLevel {
    Trace = 0,
    Debug = 1,
    Info = 2,
    Warn = 3,
    Error = 4,
    Critical = 5,
}

/// What a stream callback tells Envoy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Continue = 0,
    Pause = 1,
}

/// The header maps the filter reads or writes (proxy-wasm `MapType`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MapType {
    RequestHeaders = 0,
    ResponseHeaders = 2,
    CallResponseHeaders = 6,
}

/// The buffers the filter reads (proxy-wasm `BufferType`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BufferType {
    HttpRequestBody = 0,
    HttpResponseBody = 1,
    CallResponseBody = 4,
    PluginConfiguration = 7,
}

/// Which proxy-wasm host the filter runs in: where hosts differ, the filter does what the
/// one it runs in needs (see `flavour.rs`). Decided once, at `on_configure`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Flavour {
    #[default]
    Envoy,
    /// Kong's ngx_wasm_module (nginx, Kong Gateway 3.4+).
    Ngx,
}

/// Everything the filter asks of Envoy (or another proxy-wasm host).
pub trait Host {
    /// Best effort: there is nobody to tell when the host refuses a log line.
    fn log(&self, level: LogLevel, message: &str);
    /// The lowest level the filter sends to the host's log (the plugin configuration's
    /// `log_level`: the host still filters by its own level). Not asked of the host: hosts
    /// disagree on `proxy_get_log_level`'s signature, so the filter does not import it.
    fn log_level(&self) -> LogLevel {
        LogLevel::Info
    }
    /// The host the filter runs in (Envoy until configured otherwise).
    fn flavour(&self) -> Flavour {
        Flavour::Envoy
    }
    /// Takes the host's flavour and the log level from the plugin configuration, once, at
    /// `on_configure`. Only the portable layer (`flavour::Portable`) keeps them.
    fn adopt(&self, _flavour: Flavour, _log_level: LogLevel) {}
    /// Milliseconds since the epoch by Envoy's clock; 0 if Envoy will not say.
    fn now_ms(&self) -> u64;
    fn buffer(&self, buffer: BufferType, max_size: usize) -> Result<Option<Vec<u8>>, Status>;
    fn header_map(&self, map: MapType) -> Result<HeaderMap, Status>;
    fn header(&self, map: MapType, name: &str) -> Result<Option<Vec<u8>>, Status>;
    fn replace_header(&self, map: MapType, name: &str, value: &str) -> Result<(), Status>;
    /// A property (`["source", "address"]`) as Envoy serialises it; `None` when absent.
    fn property(&self, path: &[&str]) -> Result<Option<Vec<u8>>, Status>;
    /// Answers the current request locally. `details` shows in Envoy's access log as
    /// `%RESPONSE_CODE_DETAILS%` (no whitespace); `grpc_status` makes it a gRPC reply.
    fn send_local_response(
        &self,
        status: u32,
        details: &str,
        headers: &[(&str, &str)],
        body: &[u8],
        grpc_status: Option<u32>,
    ) -> Result<(), Status>;
    fn resume_request(&self) -> Result<(), Status>;
    /// Makes `context_id` the context later calls act on, until the callback returns.
    fn set_effective_context(&self, context_id: u32) -> Result<(), Status>;
    /// Calls `cluster`; the reply comes to the current context's `on_http_call_response`
    /// with the returned token.
    fn http_call(
        &self,
        cluster: &str,
        headers: &[(&str, &str)],
        body: &[u8],
        timeout_ms: u32,
    ) -> Result<u32, Status>;
    /// A shared-data value and its CAS; `None` when the key is absent.
    fn shared_data_with_cas(&self, key: &str) -> Result<Option<(Vec<u8>, u32)>, Status>;
    /// Writes `value` if the key's CAS is still `cas`. What `cas` 0 means differs: Envoy
    /// writes unconditionally, ngx_wasm_module only if the key is absent.
    fn set_shared_data_if(&self, key: &str, value: &[u8], cas: u32) -> Result<(), Status>;
    fn shared_data(&self, key: &str) -> Result<Option<Vec<u8>>, Status> {
        Ok(self.shared_data_with_cas(key)?.map(|(value, _)| value))
    }
    /// Writes `value` whatever the key holds (last writer wins).
    fn set_shared_data(&self, key: &str, value: &[u8]) -> Result<(), Status> {
        self.set_shared_data_if(key, value, 0)
    }
    fn register_shared_queue(&self, name: &str) -> Result<u32, Status>;
    fn enqueue_shared_queue(&self, queue_id: u32, value: &[u8]) -> Result<(), Status>;
    fn dequeue_shared_queue(&self, queue_id: u32) -> Result<Option<Vec<u8>>, Status>;
    /// Sets the tick period of the current context, the root `root_context_id` (named for
    /// the portable layer's bookkeeping; the ABI call acts on the current context).
    fn set_tick_period_ms(&self, root_context_id: u32, period_ms: u32) -> Result<(), Status>;
    fn define_counter(&self, name: &str) -> Result<u32, Status>;
    fn increment_metric(&self, metric_id: u32, by: i64) -> Result<(), Status>;
}

/// A header map as Envoy serialises it (a count, then each name's and value's length, then
/// the names and values, each followed by a NUL), kept as one buffer: reading a request's
/// headers costs one host call and two allocations, whatever their number. Names and values
/// are bytes; Envoy passes any byte a client sent in a value (obs-text) through.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HeaderMap {
    bytes: Vec<u8>,
    entries: Vec<(Range<usize>, Range<usize>)>,
}

fn le_u32(bytes: &[u8], at: usize) -> Option<usize> {
    let word: [u8; 4] = bytes.get(at..at.checked_add(4)?)?.try_into().ok()?;
    usize::try_from(u32::from_le_bytes(word)).ok()
}

impl HeaderMap {
    /// Reads Envoy's serialisation; `None` if the bytes do not hold a whole map. Names are
    /// made lower-case (Envoy's already are; ngx_wasm_module keeps the client's case).
    pub fn parse(mut bytes: Vec<u8>) -> Option<HeaderMap> {
        if bytes.is_empty() {
            return Some(HeaderMap::default());
        }
        let count = le_u32(&bytes, 0)?;
        // Each entry takes at least 10 bytes (two lengths, two NULs): a count that cannot
        // fit is a lie, and must not size an allocation.
        if count > bytes.len() / 10 {
            return None;
        }
        let mut data = 4usize.checked_add(count.checked_mul(8)?)?;
        let mut entries = Vec::with_capacity(count);
        for index in 0..count {
            let lengths = 4 + index * 8;
            let name_len = le_u32(&bytes, lengths)?;
            let value_len = le_u32(&bytes, lengths + 4)?;
            let name = data..data.checked_add(name_len)?;
            let value_start = name.end.checked_add(1)?;
            let value = value_start..value_start.checked_add(value_len)?;
            if value.end >= bytes.len() {
                return None;
            }
            if let Some(name) = bytes.get_mut(name.clone()) {
                name.make_ascii_lowercase();
            }
            data = value.end + 1;
            entries.push((name, value));
        }
        Some(HeaderMap { bytes, entries })
    }

    /// Envoy's serialisation of `pairs`.
    pub fn serialize<N: AsRef<[u8]>, V: AsRef<[u8]>>(pairs: &[(N, V)]) -> Vec<u8> {
        let size: usize = pairs
            .iter()
            .map(|(n, v)| n.as_ref().len() + v.as_ref().len() + 10)
            .sum();
        let mut bytes = Vec::with_capacity(4 + size);
        let len = |n: usize| u32::try_from(n).unwrap_or(u32::MAX).to_le_bytes();
        bytes.extend_from_slice(&len(pairs.len()));
        for (name, value) in pairs {
            bytes.extend_from_slice(&len(name.as_ref().len()));
            bytes.extend_from_slice(&len(value.as_ref().len()));
        }
        for (name, value) in pairs {
            bytes.extend_from_slice(name.as_ref());
            bytes.push(0);
            bytes.extend_from_slice(value.as_ref());
            bytes.push(0);
        }
        bytes
    }

    pub fn from_pairs<N: AsRef<[u8]>, V: AsRef<[u8]>>(pairs: &[(N, V)]) -> HeaderMap {
        HeaderMap::parse(HeaderMap::serialize(pairs)).unwrap_or_default()
    }

    /// Every (name, value), in Envoy's order.
    pub fn iter(&self) -> impl Iterator<Item = (&[u8], &[u8])> {
        self.entries.iter().map(|(name, value)| {
            (
                self.bytes.get(name.clone()).unwrap_or_default(),
                self.bytes.get(value.clone()).unwrap_or_default(),
            )
        })
    }

    /// The value of `name` (Envoy's names are lower-case); a header sent more than once
    /// reads as its values joined by `, `, as HTTP defines a repeated field (this matters
    /// for `X-Forwarded-For`, whose rightmost entries are the trusted ones).
    pub fn get(&self, name: &str) -> Option<Cow<'_, [u8]>> {
        let mut values = self
            .iter()
            .filter(|(key, _)| *key == name.as_bytes())
            .map(|(_, value)| value);
        let first = values.next()?;
        match values.next() {
            None => Some(Cow::Borrowed(first)),
            Some(second) => {
                let mut joined = [first, b", ", second].concat();
                for value in values {
                    joined.extend_from_slice(b", ");
                    joined.extend_from_slice(value);
                }
                Some(Cow::Owned(joined))
            }
        }
    }

    /// [`HeaderMap::get`] as text, with every byte sequence that is not UTF-8 replaced by
    /// U+FFFD: for values that are matched or shown, never trusted as an identity.
    pub fn get_lossy(&self, name: &str) -> Option<String> {
        self.get(name)
            .map(|value| String::from_utf8_lossy(&value).into_owned())
    }

    /// [`HeaderMap::get`] if it is UTF-8; a value that is not counts as absent.
    pub fn get_utf8(&self, name: &str) -> Option<String> {
        self.get(name)
            .and_then(|value| String::from_utf8(value.into_owned()).ok())
    }
}

/// A property path as the ABI takes it: the segments separated by NUL.
pub fn property_path(path: &[&str]) -> Vec<u8> {
    path.join("\0").into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_what_it_serialised_bytes_and_all() {
        let pairs: [(&[u8], &[u8]); 3] = [
            (b":path", b"/a"),
            (b"x-other", b"caf\xe9 \xff\xfe"),
            (b"empty", b""),
        ];
        let map = HeaderMap::parse(HeaderMap::serialize(&pairs)).unwrap();
        assert_eq!(map.iter().collect::<Vec<_>>(), pairs.to_vec());
        assert_eq!(
            map.get("x-other").as_deref(),
            Some(&b"caf\xe9 \xff\xfe"[..])
        );
        assert_eq!(map.get_utf8("x-other"), None, "not UTF-8 is absent");
        assert_eq!(
            map.get_lossy("x-other").unwrap(),
            "caf\u{fffd} \u{fffd}\u{fffd}"
        );
        assert_eq!(map.get_utf8(":path").as_deref(), Some("/a"));
        assert_eq!(map.get("empty").as_deref(), Some(&b""[..]));
        assert_eq!(map.get("missing"), None);
    }

    #[test]
    fn a_repeated_header_reads_as_its_values_joined_in_order() {
        let map = HeaderMap::from_pairs(&[
            ("x-forwarded-for", "198.51.100.1"),
            (":path", "/"),
            ("x-forwarded-for", "203.0.113.9"),
            ("x-forwarded-for", "192.0.2.2"),
        ]);
        assert_eq!(
            map.get_utf8("x-forwarded-for").as_deref(),
            Some("198.51.100.1, 203.0.113.9, 192.0.2.2")
        );
        assert!(matches!(map.get(":path"), Some(Cow::Borrowed(b"/"))));
    }

    #[test]
    fn truncated_or_lying_maps_are_refused() {
        let whole = HeaderMap::serialize(&[("a", "1"), ("bb", "22")]);
        for cut in 1..whole.len() {
            assert_eq!(
                HeaderMap::parse(whole[..cut].to_vec()),
                None,
                "cut at {cut}"
            );
        }
        let mut huge_count = whole.clone();
        huge_count[..4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(HeaderMap::parse(huge_count), None);
        let mut huge_length = whole;
        huge_length[4..8].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(HeaderMap::parse(huge_length), None);
        assert_eq!(HeaderMap::parse(Vec::new()), Some(HeaderMap::default()));
    }

    #[test]
    fn statuses_are_results() {
        assert_eq!(Status::check(0), Ok(()));
        assert_eq!(Status::check(1), Err(Status::NotFound));
        assert_eq!(Status::check(99), Err(Status::Unknown(99)));
        assert_eq!(property_path(&["source", "address"]), b"source\0address");
    }
}
