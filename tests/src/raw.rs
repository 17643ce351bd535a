//! HTTP/1.1 written and read as bytes, for requests no well-behaved client would send: header
//! values that are not UTF-8, control characters, overlong fields, trailers.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

/// A response as it came off the wire.
#[derive(Debug)]
pub struct RawResponse {
    pub status: u16,
    pub headers: Vec<(String, Vec<u8>)>,
    pub body: Vec<u8>,
}

impl RawResponse {
    pub fn header(&self, name: &str) -> Option<&[u8]> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_slice())
    }

    pub fn header_text(&self, name: &str) -> Option<String> {
        self.header(name)
            .map(|v| String::from_utf8_lossy(v).into_owned())
    }
}

/// Sends `request` (the whole request, as bytes; it should say `Connection: close`) to
/// `127.0.0.1:port` and reads the response until the server closes.
pub fn send(port: u16, request: &[u8]) -> std::io::Result<RawResponse> {
    let mut stream = TcpStream::connect(("127.0.0.1", port))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    stream.write_all(request)?;
    let mut bytes = Vec::new();
    stream.read_to_end(&mut bytes)?;
    parse(&bytes).ok_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!(
                "not an HTTP response: {:?}",
                String::from_utf8_lossy(&bytes)
            ),
        )
    })
}

fn parse(bytes: &[u8]) -> Option<RawResponse> {
    let end = bytes.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = bytes.get(..end)?;
    let mut lines = head
        .split(|&b| b == b'\n')
        .map(|l| l.strip_suffix(b"\r").unwrap_or(l));
    let status_line = String::from_utf8_lossy(lines.next()?).into_owned();
    let status = status_line.split(' ').nth(1)?.parse().ok()?;
    let headers = lines
        .filter_map(|line| {
            let colon = line.iter().position(|&b| b == b':')?;
            let name = String::from_utf8_lossy(&line[..colon]).trim().to_owned();
            let value = line[colon + 1..].trim_ascii().to_vec();
            Some((name, value))
        })
        .collect::<Vec<_>>();
    let rest = bytes.get(end + 4..)?.to_vec();
    let chunked = headers.iter().any(|(n, v)| {
        n.eq_ignore_ascii_case("transfer-encoding") && v.eq_ignore_ascii_case(b"chunked")
    });
    let body = if chunked { dechunk(&rest) } else { rest };
    Some(RawResponse {
        status,
        headers,
        body,
    })
}

fn dechunk(mut bytes: &[u8]) -> Vec<u8> {
    let mut body = Vec::new();
    while let Some(line_end) = bytes.windows(2).position(|w| w == b"\r\n") {
        let size = std::str::from_utf8(&bytes[..line_end])
            .ok()
            .and_then(|s| usize::from_str_radix(s.split(';').next().unwrap_or("").trim(), 16).ok())
            .unwrap_or(0);
        if size == 0 {
            break;
        }
        let start = line_end + 2;
        let Some(chunk) = bytes.get(start..start + size) else {
            break;
        };
        body.extend_from_slice(chunk);
        bytes = bytes.get(start + size + 2..).unwrap_or_default();
    }
    body
}

/// A `GET` of `path` with `headers` (names and values as bytes), closing after the answer.
pub fn get_request(path: &[u8], headers: &[(&[u8], &[u8])]) -> Vec<u8> {
    let mut request = [b"GET ", path, b" HTTP/1.1\r\n"].concat();
    if !headers.iter().any(|(n, _)| n.eq_ignore_ascii_case(b"host")) {
        request.extend_from_slice(b"Host: sluice.test\r\n");
    }
    for (name, value) in headers {
        request.extend_from_slice(name);
        request.extend_from_slice(b": ");
        request.extend_from_slice(value);
        request.extend_from_slice(b"\r\n");
    }
    request.extend_from_slice(b"Connection: close\r\n\r\n");
    request
}
