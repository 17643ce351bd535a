//! Every listener bounds what a client can hold, checked against the controller binary: a
//! client that trickles its request, or says nothing, is cut off by the header-read timeout
//! (check and admin addresses, and HTTP/2's preface on the gRPC API) while others are
//! served; past a listener's connection cap a new connection is closed at once, and served
//! again once a place is free; a gRPC message over its bound is refused; a token holds at
//! most four stats streams, and the admin API serves at most 64.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use envoy_types::pb::envoy::extensions::common::ratelimit::v3::rate_limit_descriptor::Entry;
use envoy_types::pb::envoy::extensions::common::ratelimit::v3::RateLimitDescriptor;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_service_client::RateLimitServiceClient;
use envoy_types::pb::envoy::service::ratelimit::v3::{RateLimitRequest, RateLimitResponse};
use sluice_e2e::controller::{ControllerOptions, ADMIN_TOKEN, CHECK_TOKEN, READ_TOKEN};
use sluice_e2e::{http, wait_until, Controller};

/// The header-read timeout the tests give (`--header-read-timeout-ms`).
const TIMEOUT: Duration = Duration::from_millis(1_000);
/// How late a cut may come on two busy cores.
const MARGIN: Duration = Duration::from_secs(3);
/// How often a trickling client sends its next byte: four bytes within the timeout.
const EVERY: Duration = Duration::from_millis(250);
const WAIT: Duration = Duration::from_secs(15);

fn start(extra: &[&str], grpc: bool) -> Controller {
    Controller::start_with(&ControllerOptions {
        extra_args: extra.iter().map(|arg| (*arg).to_owned()).collect(),
        grpc,
        ..ControllerOptions::new("", None)
    })
}

fn with_timeout(grpc: bool) -> Controller {
    let ms = TIMEOUT.as_millis().to_string();
    start(&["--header-read-timeout-ms", &ms], grpc)
}

/// A metric's value on the admin API's `/metrics` (0 when it is not there yet).
fn metric(controller: &Controller, series: &str) -> f64 {
    let text = http::get(&controller.admin_url("/metrics"))
        .expect("metrics")
        .body;
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0.0)
}

fn open_connections(controller: &Controller, listener: &str) -> f64 {
    metric(
        controller,
        &format!("sluice_connections_open{{listener=\"{listener}\"}}"),
    )
}

/// What a client that sends `at_once`, then `trickled` a byte every [`EVERY`], saw.
struct Cut {
    /// From the connection to the server closing it; `None`: still open at `give_up`.
    after: Option<Duration>,
    /// From the last of `at_once` to the server closing it.
    after_head: Option<Duration>,
    /// What the server wrote before closing.
    answer: String,
}

/// Connects to `port`, sends `at_once`, then `trickled` a byte at a time, reading all
/// along, until the server closes the connection or `give_up` passes.
fn trickle(port: u16, at_once: &[u8], trickled: &[u8], give_up: Duration) -> Cut {
    let started = Instant::now();
    let mut stream = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    stream.set_read_timeout(Some(EVERY)).expect("read timeout");
    stream.write_all(at_once).expect("send the first bytes");
    let head_sent = Instant::now();
    let mut answer = Vec::new();
    let mut next = trickled.iter();
    let closed = loop {
        if started.elapsed() > give_up {
            break false;
        }
        if let Some(byte) = next.next() {
            if stream.write_all(&[*byte]).is_err() {
                break true;
            }
        }
        let mut chunk = [0u8; 4096];
        match stream.read(&mut chunk) {
            Ok(0) => break true,
            Ok(n) => answer.extend_from_slice(&chunk[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => break true,
        }
    };
    Cut {
        after: closed.then(|| started.elapsed()),
        after_head: closed.then(|| head_sent.elapsed()),
        answer: String::from_utf8_lossy(&answer).into_owned(),
    }
}

fn assert_cut_in_time(what: &str, after: Option<Duration>) {
    let after = after.unwrap_or_else(|| panic!("{what}: still open after {WAIT:?}"));
    assert!(
        after >= TIMEOUT.mul_f32(0.9) && after <= TIMEOUT + MARGIN,
        "{what}: closed after {after:?}, not after the timeout ({TIMEOUT:?})"
    );
}

/// A head long enough to take far longer than the timeout at a byte per [`EVERY`].
fn slow_head(path: &str) -> Vec<u8> {
    format!(
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: {}\r\n\r\n",
        "a".repeat(200)
    )
    .into_bytes()
}

/// A client sending its headers a byte at a time, and one that says nothing, are cut off
/// by the header-read timeout on the check and the admin address; a normal request is
/// answered meanwhile.
#[test]
fn slow_and_silent_clients_are_cut_off_on_the_http_addresses() {
    let controller = with_timeout(false);
    for (name, port, path) in [
        ("check", controller.port, "/healthz"),
        ("admin", controller.admin_port, "/v1/admin/version"),
    ] {
        let slow = std::thread::spawn(move || trickle(port, b"", &slow_head(path), WAIT));
        let silent = std::thread::spawn(move || trickle(port, b"", b"", WAIT));
        wait_until("both connections accepted", WAIT, || {
            open_connections(&controller, name) >= 2.0
        });
        // Meanwhile the listener answers.
        let readyz = http::get(&controller.url("/readyz")).expect("readyz");
        assert_eq!(readyz.status, 200, "{readyz:?}");
        let version = controller.admin("GET", "/v1/admin/version", None);
        assert_eq!(version.status, 200, "{version:?}");
        let slow = slow.join().expect("slow client");
        assert_cut_in_time(&format!("{name}: a byte every {EVERY:?}"), slow.after);
        assert!(
            !slow.answer.contains("200 OK"),
            "{name}: the trickled request was never served: {}",
            slow.answer
        );
        let silent = silent.join().expect("silent client");
        assert_cut_in_time(&format!("{name}: nothing sent"), silent.after);
    }
}

/// An HTTP/1.1 connection left idle after its answer is closed after the timeout (keep-alive
/// is not a way to hold a place); a check call whose body trickles is refused at the
/// timeout, counted from its head.
#[test]
fn idle_connections_and_slow_bodies_are_cut_off_on_the_check_address() {
    let controller = with_timeout(false);
    let request = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n";
    let mut stream = TcpStream::connect(("127.0.0.1", controller.port)).expect("connect");
    stream.write_all(request).expect("send");
    stream
        .set_read_timeout(Some(Duration::from_millis(100)))
        .expect("read timeout");
    let mut answer = Vec::new();
    let mut answered = None;
    let deadline = Instant::now() + WAIT;
    let closed = loop {
        assert!(Instant::now() < deadline, "still open after {WAIT:?}");
        let mut chunk = [0u8; 4096];
        match stream.read(&mut chunk) {
            Ok(0) => break Instant::now(),
            Ok(n) => {
                answer.extend_from_slice(&chunk[..n]);
                answered.get_or_insert_with(Instant::now);
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => break Instant::now(),
        }
    };
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let answered = answered.expect("an answer");
    assert_cut_in_time("an idle keep-alive connection", Some(closed - answered));

    let body = br#"{"checks":[{"client":{"kind":"ip","value":"192.0.2.1"},"path":"/"}]}"#;
    let head = format!(
        "POST /v1/check HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {CHECK_TOKEN}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len() + 100
    );
    let mut trickled = body.to_vec();
    trickled.extend(std::iter::repeat_n(b' ', 100));
    let slow = trickle(controller.port, head.as_bytes(), &trickled, WAIT);
    assert_cut_in_time("a body a byte at a time", slow.after_head);
    assert!(
        slow.answer.starts_with("HTTP/1.1 400")
            && slow
                .answer
                .contains("the body did not arrive within 1000 ms of the request's head"),
        "{}",
        slow.answer
    );
}

/// Past the check address's cap (3 here), a new connection is closed as soon as it is
/// accepted, and counted, while the first ones stay open; once one of them closes, a
/// normal request is served again.
#[test]
fn past_the_connection_cap_new_connections_are_closed_until_a_place_is_free() {
    let controller = start(
        &[
            "--check-max-connections",
            "3",
            // Long enough that the held connections are not cut during the test.
            "--header-read-timeout-ms",
            "30000",
        ],
        false,
    );
    wait_until("the readiness polls' connections to close", WAIT, || {
        open_connections(&controller, "check") == 0.0
    });
    let mut held: Vec<TcpStream> = (0..3)
        .map(|_| TcpStream::connect(("127.0.0.1", controller.port)).expect("connect"))
        .collect();
    wait_until("three connections held", WAIT, || {
        open_connections(&controller, "check") == 3.0
    });
    let refused_before = metric(
        &controller,
        "sluice_connections_refused_total{listener=\"check\"}",
    );
    let mut fourth = TcpStream::connect(("127.0.0.1", controller.port)).expect("connect");
    fourth.set_read_timeout(Some(WAIT)).expect("read timeout");
    // The server may have closed it before this is written (then writing fails).
    let _ = fourth.write_all(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n");
    let mut answer = Vec::new();
    let started = Instant::now();
    let read = fourth.read_to_end(&mut answer);
    assert!(
        started.elapsed() < MARGIN,
        "the fourth connection was not closed at once"
    );
    assert!(
        answer.is_empty(),
        "the fourth connection was served: {:?} ({read:?})",
        String::from_utf8_lossy(&answer)
    );
    assert_eq!(
        metric(
            &controller,
            "sluice_connections_refused_total{listener=\"check\"}"
        ) - refused_before,
        1.0
    );
    assert_eq!(
        open_connections(&controller, "check"),
        3.0,
        "the first ones stay"
    );
    assert!(
        http::get(&controller.url("/readyz")).is_err(),
        "no place for a request while three are held"
    );
    // The admin API has places of its own.
    assert_eq!(
        controller.admin("GET", "/v1/admin/version", None).status,
        200
    );

    // One connection goes: a request is served again.
    let first = held.remove(0);
    drop(first);
    wait_until("a place to come free", WAIT, || {
        open_connections(&controller, "check") == 2.0
    });
    let readyz = http::get(&controller.url("/readyz")).expect("readyz once a place is free");
    assert_eq!(readyz.status, 200, "{readyz:?}");
    drop(held);
}

/// A gRPC client, on a runtime of its own, presenting the check token.
fn grpc_call(port: u16, request: RateLimitRequest) -> Result<RateLimitResponse, tonic::Status> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let mut client = RateLimitServiceClient::connect(format!("http://127.0.0.1:{port}"))
            .await
            .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
        let mut request = tonic::Request::new(request);
        let credential = format!("Bearer {CHECK_TOKEN}").parse().expect("metadata");
        request.metadata_mut().insert("authorization", credential);
        client
            .should_rate_limit(request)
            .await
            .map(tonic::Response::into_inner)
    })
}

fn rate_limit_request(value: String) -> RateLimitRequest {
    RateLimitRequest {
        domain: "sluice".to_owned(),
        descriptors: vec![RateLimitDescriptor {
            entries: vec![Entry {
                key: "generic_key".to_owned(),
                value,
            }],
            ..RateLimitDescriptor::default()
        }],
        hits_addend: 0,
    }
}

/// The gRPC API drops a connection that sends nothing, and one that sends HTTP/2's preface
/// a byte at a time, at the header-read timeout, while a real call is answered; it
/// announces 128 streams per connection; a message over 64 KiB is refused before it is
/// decoded.
#[test]
fn the_grpc_api_drops_silent_and_slow_connections_and_bounds_messages() {
    let controller = with_timeout(true);
    let port = controller.grpc();
    let silent = std::thread::spawn(move || trickle(port, b"", b"", WAIT));
    let slow =
        std::thread::spawn(move || trickle(port, b"", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", WAIT));
    wait_until("both connections accepted", WAIT, || {
        open_connections(&controller, "grpc") >= 2.0
    });
    let answered = grpc_call(port, rate_limit_request("small".to_owned()));
    assert!(answered.is_ok(), "{answered:?}");
    assert_cut_in_time("gRPC: nothing sent", silent.join().expect("silent").after);
    assert_cut_in_time(
        "gRPC: the preface a byte at a time",
        slow.join().expect("slow").after,
    );

    assert_eq!(
        grpc_settings(port).get(&SETTINGS_MAX_CONCURRENT_STREAMS),
        Some(&128),
        "streams per connection"
    );

    let refused = grpc_call(port, rate_limit_request("v".repeat(70 << 10)))
        .expect_err("a message over 64 KiB");
    assert_eq!(refused.code(), tonic::Code::OutOfRange, "{refused:?}");
    assert!(refused.message().contains("65536"), "{refused:?}");
    let answered = grpc_call(port, rate_limit_request("w".repeat(60 << 10)));
    assert!(answered.is_ok(), "60 KiB is within the bound: {answered:?}");
}

const SETTINGS_MAX_CONCURRENT_STREAMS: u16 = 0x3;

/// The settings the gRPC API's HTTP/2 server announces (RFC 9113 §6.5), by identifier.
fn grpc_settings(port: u16) -> std::collections::BTreeMap<u16, u32> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    stream.set_read_timeout(Some(WAIT)).expect("read timeout");
    // The preface, and an empty SETTINGS frame.
    stream
        .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0")
        .expect("send the preface");
    loop {
        let mut header = [0u8; 9];
        stream.read_exact(&mut header).expect("a frame's header");
        let length =
            usize::from(header[0]) << 16 | usize::from(header[1]) << 8 | usize::from(header[2]);
        let mut payload = vec![0u8; length];
        stream.read_exact(&mut payload).expect("a frame's payload");
        // The first SETTINGS frame that is not an acknowledgement.
        if header[3] == 0x4 && header[4] & 0x1 == 0 {
            return payload
                .chunks_exact(6)
                .map(|entry| {
                    (
                        u16::from_be_bytes([entry[0], entry[1]]),
                        u32::from_be_bytes([entry[2], entry[3], entry[4], entry[5]]),
                    )
                })
                .collect();
        }
    }
}

/// What opening a stats stream gave: the status, and the open connection or the body.
struct Opened {
    status: u16,
    body: String,
    /// Held: dropping it closes the stream.
    _stream: TcpStream,
}

fn open_stream(controller: &Controller, token: &str) -> Opened {
    let mut stream =
        TcpStream::connect(("127.0.0.1", controller.admin_port)).expect("connect to the admin API");
    write!(
        stream,
        "GET /v1/admin/stats/stream HTTP/1.1\r\nHost: 127.0.0.1\r\n\
         Authorization: Bearer {token}\r\nAccept: text/event-stream\r\n\r\n"
    )
    .expect("send the request");
    stream.set_read_timeout(Some(WAIT)).expect("read timeout");
    let mut seen = Vec::new();
    let head_end = loop {
        if let Some(end) = seen.windows(4).position(|w| w == b"\r\n\r\n") {
            break end + 4;
        }
        let mut chunk = [0u8; 4096];
        let n = stream.read(&mut chunk).expect("read the answer");
        assert!(n > 0, "closed before an answer");
        seen.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&seen[..head_end]).into_owned();
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP answer: {head}"));
    let mut body = seen[head_end..].to_vec();
    if status != 200 {
        let length: usize = head
            .lines()
            .find_map(|line| {
                let (name, value) = line.split_once(':')?;
                name.eq_ignore_ascii_case("content-length")
                    .then(|| value.trim().parse().ok())?
            })
            .unwrap_or_else(|| panic!("no content-length: {head}"));
        while body.len() < length {
            let mut chunk = [0u8; 4096];
            let n = stream.read(&mut chunk).expect("read the body");
            assert!(n > 0, "closed within the body");
            body.extend_from_slice(&chunk[..n]);
        }
    }
    Opened {
        status,
        body: String::from_utf8_lossy(&body).into_owned(),
        _stream: stream,
    }
}

fn assert_too_many(opened: &Opened, message: &str) {
    assert_eq!(opened.status, 429, "{}", opened.body);
    let body: serde_json::Value = serde_json::from_str(&opened.body).expect("a JSON error");
    assert_eq!(body["error"], "too_many_streams", "{body}");
    assert_eq!(body["message"], message, "{body}");
}

/// A token holds at most four stats streams: the fifth is refused with 429 in the one
/// error shape, naming the limit, while another token opens its own; once one closes,
/// the token opens another.
#[test]
fn a_token_holds_at_most_four_stats_streams() {
    let controller = start(&[], false);
    let mut open: Vec<Opened> = (0..4)
        .map(|_| open_stream(&controller, ADMIN_TOKEN))
        .collect();
    for opened in &open {
        assert_eq!(opened.status, 200, "{}", opened.body);
    }
    assert_too_many(
        &open_stream(&controller, ADMIN_TOKEN),
        "the token `test` has 4 stats streams open, the most one token may have (4): close \
         one (a dashboard tab) first",
    );
    let other = open_stream(&controller, READ_TOKEN);
    assert_eq!(other.status, 200, "another token's own: {}", other.body);

    // The controller notices a closed stream when it next writes to it (within a second).
    drop(open.remove(0));
    let mut again = None;
    wait_until("a closed stream's place to come free", WAIT, || {
        let opened = open_stream(&controller, ADMIN_TOKEN);
        let free = opened.status == 200;
        again = Some(opened);
        free
    });
    drop((open, other, again));
}

/// The admin API serves at most 64 stats streams, every token together: with 16 tokens
/// holding four each, a token with none is refused, naming the limit.
#[test]
fn the_admin_api_serves_at_most_64_stats_streams() {
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("tokens.toml");
    let more: Vec<String> = (0..15)
        .map(|i| format!("stream-token-{i:02}-0123456789"))
        .collect();
    let toml: String = more
        .iter()
        .enumerate()
        .map(|(i, token)| {
            format!("[[tokens]]\nname = \"s{i}\"\nrole = \"read\"\ntoken = \"{token}\"\n")
        })
        .collect();
    std::fs::write(&file, toml).expect("write the tokens");
    let path = file.to_str().expect("a UTF-8 path");
    let controller = start(&["--admin-tokens-file", path], false);
    let tokens = std::iter::once(ADMIN_TOKEN).chain(more.iter().map(String::as_str));
    let mut open = Vec::new();
    for token in tokens {
        for _ in 0..4 {
            let opened = open_stream(&controller, token);
            assert_eq!(
                opened.status,
                200,
                "stream {}: {}",
                open.len() + 1,
                opened.body
            );
            open.push(opened);
        }
    }
    assert_eq!(open.len(), 64);
    assert_too_many(
        &open_stream(&controller, READ_TOKEN),
        "the admin API serves 64 stats streams, the most it serves at once (64): try again \
         later",
    );
    drop(open);
}
