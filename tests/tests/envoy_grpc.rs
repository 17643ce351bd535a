//! gRPC, long-lived streams and HTTP/2 clients through a real Envoy running the real
//! `.wasm`, with the real controller:
//! - a real gRPC client (tonic) calling a real gRPC server (tonic) through Envoy gets
//!   `RESOURCE_EXHAUSTED` with a short message and the rate-limit fields over the limit,
//!   `UNAVAILABLE` in failure mode deny, `UNAUTHENTICATED` for a bad token and
//!   `PERMISSION_DENIED` when denylisted (and gRPC-Web the same, built by the filter);
//! - HTTP/2 streams under a concurrency limit of 2: the third is refused, and whichever way
//!   one of the two ends (client cancels, client gone, upstream ends, upstream resets,
//!   Envoy's idle timeout) a new one is admitted;
//! - identity, headers and local replies are the same over HTTP/1.1 and HTTP/2.
//!
//! The listener's connection manager takes HTTP/1.1 and HTTP/2 (prior knowledge) on one
//! port (`codec_type` AUTO, Envoy's default); these tests make the upstream cluster speak
//! HTTP/2 where the upstream is a gRPC server, by editing the harness's configuration.

// Helpers of a test file may panic: a failed expectation is the test failing.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_service_client::RateLimitServiceClient;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_service_server::{
    RateLimitService, RateLimitServiceServer,
};
use envoy_types::pb::envoy::service::ratelimit::v3::{RateLimitRequest, RateLimitResponse};
use sluice_e2e::envoy::{config_yaml, sluice_plugin_config, with_fields, EnvoyOptions, Filter};
use sluice_e2e::http::Response;
use sluice_e2e::{free_port, Controller, Envoy, Upstream};

const CALL: &str = "/envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit";
const SECRET: &str = "grpc-e2e-secret";

// ---- the world ------------------------------------------------------------------------

/// Envoy (one worker) with `plugin` in front of an upstream on `upstream_port` that speaks
/// HTTP/2 when `upstream_h2`, asking `controller` (none: a port that refuses);
/// `/streams.Test/Idle…` has an idle timeout of 2 s, and no route has a response timeout
/// (streams live as long as their ends want).
fn envoy(
    plugin: &serde_json::Value,
    upstream_port: u16,
    controller: Option<&Controller>,
    upstream_h2: bool,
) -> Envoy {
    let options = EnvoyOptions {
        filter: Filter::sluice_with(plugin),
        upstream_port,
        controller_ports: controller.map(|c| vec![c.port]).unwrap_or_default(),
        concurrency: 1,
        controller_http2: false,
    };
    let (port, admin_port) = (free_port(), free_port());
    let mut config = config_yaml(&options, port, admin_port);
    let edit = |config: &mut String, anchor: &str, replacement: &str| {
        assert!(
            config.contains(anchor),
            "the harness's Envoy config changed: no `{anchor}`"
        );
        *config = config.replacen(anchor, replacement, 1);
    };
    edit(
        &mut config,
        "              - match: { prefix: \"/\" }\n                route: { cluster: upstream }",
        "              - match: { prefix: \"/streams.Test/Idle\" }\n                route: { cluster: upstream, timeout: 0s, idle_timeout: 2s }\n              - match: { prefix: \"/\" }\n                route: { cluster: upstream, timeout: 0s }",
    );
    if upstream_h2 {
        edit(
            &mut config,
            "  - name: upstream\n    type: STATIC\n    connect_timeout: 1s",
            "  - name: upstream\n    type: STATIC\n    connect_timeout: 1s\n    typed_extension_protocol_options:\n      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:\n        \"@type\": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions\n        explicit_http_config: { http2_protocol_options: {} }",
        );
    }
    let envoy = Envoy::start_with_config(&config, port, admin_port, 1);
    if controller.is_some() {
        // The lists are the controller's: the filter has them once each VM (the main
        // thread's and the worker's) has read them, on its first tick.
        envoy.wait_until_vms_read_the_configuration(2);
    }
    envoy
}

/// The plugin configuration of these tests: failure mode `failure_mode`, identity by token
/// (HS256 with [`SECRET`]), then `x-api-key`, then the address.
fn plugin(failure_mode: &str) -> serde_json::Value {
    with_fields(
        sluice_plugin_config(failure_mode, 2_000),
        serde_json::json!({
            "identity": {
                "order": ["jwt", "api_key", "ip"],
                "jwt": { "keys": [{ "alg": "HS256", "secret": SECRET }] },
                "api_key_header": "x-api-key"
            }
        }),
    )
}

fn rules(extra: &str) -> String {
    let banned = sluice_filter::identity::api_key_digest("banned-key".as_bytes());
    format!(
        "[[rules]]\nname = \"per-client\"\nlimit = 3\nwindow = \"1h\"\n{extra}\n\
         [[denylist]]\nkind = \"api_key\"\nvalue = \"{banned}\"\n\
         # Each API key is a client of its own here (by default an unknown key counts by\n\
         # its address).\n\
         [protection]\ninvalid_credentials = 1000\nwindow = \"1m\"\nblock = \"1m\"\n\
         unknown_api_keys = \"allow\"\n"
    )
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

// ---- a real gRPC server ---------------------------------------------------------------

/// A gRPC server (tonic) whose one method answers OK, counting its calls.
#[derive(Default, Clone)]
struct Answering {
    calls: Arc<Mutex<u64>>,
}

#[tonic::async_trait]
impl RateLimitService for Answering {
    async fn should_rate_limit(
        &self,
        _request: tonic::Request<RateLimitRequest>,
    ) -> Result<tonic::Response<RateLimitResponse>, tonic::Status> {
        *self.calls.lock().unwrap() += 1;
        Ok(tonic::Response::new(RateLimitResponse {
            overall_code: 1,
            ..RateLimitResponse::default()
        }))
    }
}

/// Serves [`Answering`] on a free port, on `runtime`, until the test ends.
fn grpc_server(runtime: &tokio::runtime::Runtime) -> (u16, Answering) {
    let service = Answering::default();
    let port = free_port();
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let served = service.clone();
    runtime.spawn(async move {
        tonic::transport::Server::builder()
            .add_service(RateLimitServiceServer::new(served))
            .serve(addr)
            .await
            .expect("gRPC server");
    });
    runtime.block_on(async {
        let deadline = Instant::now() + Duration::from_secs(10);
        while tokio::net::TcpStream::connect(addr).await.is_err() {
            assert!(Instant::now() < deadline, "the gRPC server did not listen");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });
    (port, service)
}

/// One unary call through Envoy with `metadata`: the answer's metadata, or the status.
async fn call(
    envoy_port: u16,
    metadata: &[(&'static str, &str)],
) -> Result<tonic::metadata::MetadataMap, tonic::Status> {
    let mut client = RateLimitServiceClient::connect(format!("http://127.0.0.1:{envoy_port}"))
        .await
        .expect("connect to Envoy over HTTP/2");
    let mut request = tonic::Request::new(RateLimitRequest {
        domain: "test".into(),
        ..RateLimitRequest::default()
    });
    for (name, value) in metadata {
        request
            .metadata_mut()
            .insert(*name, value.parse().expect("metadata value"));
    }
    client
        .should_rate_limit(request)
        .await
        .map(|response| response.metadata().clone())
}

fn meta<'a>(metadata: &'a tonic::metadata::MetadataMap, name: &str) -> Option<&'a str> {
    metadata.get(name).and_then(|value| value.to_str().ok())
}

fn expect_status(
    outcome: Result<tonic::metadata::MetadataMap, tonic::Status>,
    code: tonic::Code,
    what: &str,
    envoy: &Envoy,
) -> tonic::Status {
    match outcome {
        Err(status) if status.code() == code => status,
        other => panic!("{what}: expected {code:?}, got {other:?}\n{}", envoy.log()),
    }
}

/// Under the limit the call reaches the server; over it the client sees RESOURCE_EXHAUSTED
/// with the short message, and the rate-limit fields in the trailers; a bad token is
/// UNAUTHENTICATED, a denylisted key PERMISSION_DENIED; with no controller and failure mode
/// deny, UNAVAILABLE. gRPC-Web gets the same status from the filter's own reply.
#[test]
fn a_limited_grpc_call_gets_resource_exhausted_with_a_short_message_and_its_fields() {
    let runtime = runtime();
    let (server_port, server) = grpc_server(&runtime);
    let controller = Controller::start(&rules(""), None);
    let envoy = envoy(&plugin("allow"), server_port, Some(&controller), true);

    for expected_remaining in ["2", "1", "0"] {
        let metadata = runtime
            .block_on(call(envoy.port, &[]))
            .unwrap_or_else(|status| panic!("under the limit: {status:?}\n{}", envoy.log()));
        assert_eq!(meta(&metadata, "x-ratelimit-limit"), Some("3"));
        assert_eq!(
            meta(&metadata, "x-ratelimit-remaining"),
            Some(expected_remaining)
        );
    }
    assert_eq!(
        *server.calls.lock().unwrap(),
        3,
        "each call under the limit reached the server"
    );

    let status = expect_status(
        runtime.block_on(call(envoy.port, &[])),
        tonic::Code::ResourceExhausted,
        "over the limit",
        &envoy,
    );
    let metadata = status.metadata();
    println!(
        "over the limit: {:?} {:?} {metadata:?}",
        status.code(),
        status.message()
    );
    let retry_after: u64 = meta(metadata, "retry-after")
        .expect("retry-after")
        .parse()
        .unwrap();
    assert!(
        (1..=3_600).contains(&retry_after),
        "retry-after {retry_after}"
    );
    assert_eq!(
        status.message(),
        format!("rate limit `per-client` exceeded, retry in {retry_after} s")
    );
    let pushback: u64 = meta(metadata, "grpc-retry-pushback-ms")
        .expect("grpc-retry-pushback-ms")
        .parse()
        .unwrap();
    assert!(
        pushback <= retry_after * 1_000 && pushback > (retry_after - 1) * 1_000,
        "pushback {pushback} ms against retry-after {retry_after} s"
    );
    assert_eq!(meta(metadata, "x-ratelimit-limit"), Some("3"));
    assert_eq!(meta(metadata, "x-ratelimit-remaining"), Some("0"));
    assert!(meta(metadata, "ratelimit").is_some_and(|v| v.contains("per-client")));
    assert_eq!(
        *server.calls.lock().unwrap(),
        3,
        "the limited call never reached the server"
    );

    // What Envoy itself put on the wire: grpc-message is the plain message, once.
    let raw = runtime.block_on(h2_request(
        envoy.port,
        "POST",
        CALL,
        &grpc_headers(&[]),
        grpc_frame(),
    ));
    assert_eq!(raw.status, 200, "{raw:?}");
    assert_eq!(raw.header("grpc-status"), Some("8"), "{raw:?}");
    assert_eq!(
        raw.header("content-type"),
        Some("application/grpc"),
        "{raw:?}"
    );
    assert_eq!(
        raw.header("grpc-message").map(str::to_owned),
        Some(format!(
            "rate limit `per-client` exceeded, retry in {} s",
            raw.number("retry-after")
        ))
    );

    let status = expect_status(
        runtime.block_on(call(envoy.port, &[("authorization", "Bearer not-a-token")])),
        tonic::Code::Unauthenticated,
        "a bad token",
        &envoy,
    );
    println!("bad token: {:?}", status.message());
    assert!(
        status.message().starts_with("invalid token: "),
        "{status:?}"
    );

    let status = expect_status(
        runtime.block_on(call(envoy.port, &[("x-api-key", "banned-key")])),
        tonic::Code::PermissionDenied,
        "a denylisted key",
        &envoy,
    );
    assert_eq!(status.message(), "denied by the rate limiter's denylist");

    // A key of its own has its own quota: the limit was the address's, not everybody's.
    runtime
        .block_on(call(envoy.port, &[("x-api-key", "a-good-key")]))
        .unwrap_or_else(|status| panic!("another client: {status:?}"));
    assert_eq!(*server.calls.lock().unwrap(), 4);

    // gRPC-Web is not gRPC to Envoy: the filter builds the reply itself, the trailers in
    // the headers and as the trailer frame of the body (base64 for grpc-web-text).
    let text = sluice_e2e::http::request(
        "POST",
        &envoy.url(CALL),
        &[
            ("content-type", "application/grpc-web-text"),
            ("x-grpc-web", "1"),
            ("authorization", "Bearer not-a-token"),
        ],
        None,
    )
    .expect("a gRPC-Web-text call over HTTP/1.1");
    let binary = runtime.block_on(h2_request(
        envoy.port,
        "POST",
        CALL,
        &[
            ("content-type", "application/grpc-web+proto"),
            ("x-grpc-web", "1"),
            ("authorization", "Bearer not-a-token"),
        ],
        grpc_frame(),
    ));
    for (web, content_type) in [
        (&text, "application/grpc-web-text"),
        (&binary, "application/grpc-web+proto"),
    ] {
        println!("gRPC-Web: {web:?}");
        assert_eq!(web.status, 200, "{web:?}");
        assert_eq!(web.header("grpc-status"), Some("16"), "{web:?}");
        assert_eq!(web.header("content-type"), Some(content_type), "{web:?}");
        assert!(web
            .header("grpc-message")
            .is_some_and(|m| m.starts_with("invalid token: ")));
    }
    use base64::Engine;
    let frame = base64::engine::general_purpose::STANDARD
        .decode(text.body.trim())
        .expect("base64");
    assert_eq!(frame.first(), Some(&0x80), "a trailer frame");
    let trailers = String::from_utf8_lossy(frame.get(5..).unwrap_or_default()).into_owned();
    assert!(
        trailers.starts_with("grpc-status:16\r\ngrpc-message:invalid token: "),
        "{trailers:?}"
    );
    assert!(
        binary.body.contains("grpc-status:16\r\n"),
        "{:?}",
        binary.body
    );

    // No controller at all, failure mode deny: UNAVAILABLE, with a wait to push back.
    let deny = self::envoy(&plugin("deny"), server_port, None, true);
    let status = expect_status(
        runtime.block_on(call(deny.port, &[])),
        tonic::Code::Unavailable,
        "failure mode deny",
        &deny,
    );
    println!(
        "failure mode deny: {:?} {:?}",
        status.message(),
        status.metadata()
    );
    assert_eq!(
        status.message(),
        "rate limiter unavailable (failure mode deny), retry in 1 s"
    );
    assert_eq!(meta(status.metadata(), "retry-after"), Some("1"));
    assert_eq!(
        meta(status.metadata(), "grpc-retry-pushback-ms"),
        Some("1000")
    );
    assert_eq!(*server.calls.lock().unwrap(), 4);
}

// ---- HTTP/2 by hand -------------------------------------------------------------------

/// An empty gRPC message (an empty protobuf message of any type): flag 0, length 0.
fn grpc_frame() -> Bytes {
    Bytes::from_static(&[0, 0, 0, 0, 0])
}

fn grpc_headers<'a>(extra: &[(&'a str, &'a str)]) -> Vec<(&'a str, &'a str)> {
    let mut headers = vec![("content-type", "application/grpc"), ("te", "trailers")];
    headers.extend_from_slice(extra);
    headers
}

/// One request over a fresh HTTP/2 connection (prior knowledge) to Envoy: the response
/// headers (and trailers, after them) and the body.
async fn h2_request(
    port: u16,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Bytes,
) -> Response {
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    let (mut sender, connection) = h2::client::handshake(tcp).await.expect("HTTP/2 handshake");
    tokio::spawn(connection);
    let mut request = http::Request::builder()
        .method(method)
        .uri(format!("http://127.0.0.1:{port}{path}"));
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let (response, mut stream) = sender
        .send_request(request.body(()).expect("request"), body.is_empty())
        .expect("send the request");
    if !body.is_empty() {
        stream.send_data(body, true).expect("send the body");
    }
    let response = response.await.expect("a response");
    let status = response.status().as_u16();
    let mut headers = pairs(response.headers());
    let mut body = response.into_body();
    let mut bytes = Vec::new();
    while let Some(chunk) = body.data().await {
        let chunk = chunk.expect("body");
        let _ = body.flow_control().release_capacity(chunk.len());
        bytes.extend_from_slice(&chunk);
    }
    if let Ok(Some(trailers)) = body.trailers().await {
        headers.extend(pairs(&trailers));
    }
    Response {
        status,
        headers,
        body: String::from_utf8_lossy(&bytes).into_owned(),
    }
}

fn pairs(map: &http::HeaderMap) -> Vec<(String, String)> {
    map.iter()
        .map(|(name, value)| {
            (
                name.as_str().to_owned(),
                String::from_utf8_lossy(value.as_bytes()).into_owned(),
            )
        })
        .collect()
}

// ---- a streaming upstream that ends each stream when told -----------------------------

/// How a stream ended at the upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ended {
    /// It answered `grpc-status: 0` in trailers, as told.
    Finished,
    /// It reset the stream (`RST_STREAM`), as told.
    ResetByUs,
    /// Envoy reset it (the client went, or a timeout).
    ResetByEnvoy,
}

#[derive(Debug, Clone, Copy)]
enum Command {
    Finish,
    Reset,
}

/// An HTTP/2 upstream that answers each stream (named by its `x-stream` header) with
/// gRPC headers and one empty message, then holds it until told to finish or reset it, or
/// until Envoy resets it; it remembers how each ended.
#[derive(Clone, Default)]
struct StreamUpstream {
    commands: Arc<Mutex<HashMap<String, tokio::sync::oneshot::Sender<Command>>>>,
    ended: Arc<Mutex<HashMap<String, Ended>>>,
}

impl StreamUpstream {
    fn start(runtime: &tokio::runtime::Runtime) -> (u16, StreamUpstream) {
        let upstream = StreamUpstream::default();
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .expect("bind");
        let port = listener.local_addr().expect("address").port();
        let serving = upstream.clone();
        runtime.spawn(async move {
            while let Ok((socket, _)) = listener.accept().await {
                let serving = serving.clone();
                tokio::spawn(async move {
                    let Ok(mut connection) = h2::server::handshake(socket).await else {
                        return;
                    };
                    while let Some(Ok((request, respond))) = connection.accept().await {
                        tokio::spawn(serving.clone().serve(request, respond));
                    }
                });
            }
        });
        (port, upstream)
    }

    async fn serve(
        self,
        request: http::Request<h2::RecvStream>,
        mut respond: h2::server::SendResponse<Bytes>,
    ) {
        let name = request
            .headers()
            .get("x-stream")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("unnamed")
            .to_owned();
        let response = http::Response::builder()
            .status(200)
            .header("content-type", "application/grpc")
            .body(())
            .expect("response");
        let Ok(mut send) = respond.send_response(response, false) else {
            return;
        };
        let (tell, told) = tokio::sync::oneshot::channel();
        self.commands.lock().unwrap().insert(name.clone(), tell);
        if send.send_data(grpc_frame(), false).is_err() {
            return;
        }
        // Keep reading what the client sends, so that flow control never stalls it.
        let mut body = request.into_body();
        tokio::spawn(async move {
            while let Some(Ok(chunk)) = body.data().await {
                let _ = body.flow_control().release_capacity(chunk.len());
            }
        });
        let command = tokio::select! {
            command = told => command.ok(),
            _ = std::future::poll_fn(|cx| send.poll_reset(cx)) => None,
        };
        let ended = match command {
            Some(Command::Finish) => {
                let mut trailers = http::HeaderMap::new();
                trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
                let _ = send.send_trailers(trailers);
                Ended::Finished
            }
            Some(Command::Reset) => {
                send.send_reset(h2::Reason::INTERNAL_ERROR);
                Ended::ResetByUs
            }
            None => Ended::ResetByEnvoy,
        };
        self.ended.lock().unwrap().insert(name, ended);
    }

    fn tell(&self, name: &str, command: Command) {
        let tell = self
            .commands
            .lock()
            .unwrap()
            .remove(name)
            .expect("a stream of that name");
        tell.send(command).expect("the stream is still held");
    }

    /// Waits (bounded) until the stream `name` has ended here, and says how.
    fn wait_ended(&self, name: &str) -> Ended {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Some(ended) = self.ended.lock().unwrap().get(name) {
                return *ended;
            }
            assert!(
                Instant::now() < deadline,
                "stream {name} never ended at the upstream"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// A stream the client holds open: its request side, its connection (dropping the task
/// closes the connection), and the response body.
struct Held {
    name: String,
    send: h2::SendStream<Bytes>,
    body: h2::RecvStream,
    connection: tokio::task::JoinHandle<()>,
}

enum Opened {
    Admitted(Held),
    /// Refused with this `grpc-status` and `grpc-message` (a trailers-only reply).
    Refused(String, String),
}

/// Opens a streaming call `name` on `path` over a connection of its own.
async fn open(port: u16, path: &str, name: &str) -> Opened {
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    let (mut sender, connection) = h2::client::handshake(tcp).await.expect("handshake");
    let connection = tokio::spawn(async move {
        let _ = connection.await;
    });
    let request = http::Request::builder()
        .method("POST")
        .uri(format!("http://127.0.0.1:{port}{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .header("x-stream", name)
        .body(())
        .expect("request");
    let (response, mut send) = sender.send_request(request, false).expect("send");
    // A refused call may be answered (and its request side reset by Envoy) before this
    // message leaves: what counts is the answer below.
    let _ = send.send_data(grpc_frame(), false);
    let response = tokio::time::timeout(Duration::from_secs(10), response)
        .await
        .expect("an answer within 10 s")
        .expect("a response");
    let headers = response.headers();
    if let Some(status) = headers.get("grpc-status") {
        let text = |v: &http::HeaderValue| String::from_utf8_lossy(v.as_bytes()).into_owned();
        let message = headers.get("grpc-message").map(text).unwrap_or_default();
        return Opened::Refused(text(status), message);
    }
    assert_eq!(response.status(), 200);
    let mut body = response.into_body();
    let first = tokio::time::timeout(Duration::from_secs(10), body.data())
        .await
        .expect("the upstream's first message within 10 s");
    assert!(
        matches!(first, Some(Ok(_))),
        "the stream carries the upstream's message"
    );
    Opened::Admitted(Held {
        name: name.to_owned(),
        send,
        body,
        connection,
    })
}

/// The ways a stream ends that these tests try.
#[derive(Debug, Clone, Copy)]
enum Way {
    /// The client cancels the call (`RST_STREAM CANCEL`), its connection stays.
    ClientCancels,
    /// The client's connection goes away.
    ClientGone,
    /// The upstream finishes the call (trailers).
    UpstreamFinishes,
    /// The upstream resets the stream.
    UpstreamResets,
    /// Envoy's route idle timeout (2 s) ends it.
    EnvoyTimeout,
}

impl Way {
    fn path(self) -> &'static str {
        match self {
            Way::EnvoyTimeout => "/streams.Test/Idle",
            _ => "/streams.Test/Hold",
        }
    }
}

/// A concurrency limit of 2 on streams: the third is refused with RESOURCE_EXHAUSTED, and
/// after one of the two ends — each way in turn — a new one is admitted (the lease lasts an
/// hour, so only the release can free it), and the count is right again after each.
#[test]
fn a_stream_holds_its_concurrency_slot_until_it_ends_however_it_ends() {
    let runtime = runtime();
    let (upstream_port, upstream) = StreamUpstream::start(&runtime);
    let controller = Controller::start(
        "[[rules]]\nname = \"two-streams\"\nstrategy = \"concurrency\"\nlimit = 2\nlease = \"1h\"\n\
         match = { path_prefix = \"/streams.Test/\" }\n",
        None,
    );
    let envoy = envoy(&plugin("deny"), upstream_port, Some(&controller), true);
    let port = envoy.port;
    let admitted = |opened: Opened, what: &str| match opened {
        Opened::Admitted(held) => held,
        Opened::Refused(status, message) => {
            panic!("{what} refused ({status}, {message})\n{}", envoy.log())
        }
    };
    let _first = admitted(
        runtime.block_on(open(port, Way::ClientCancels.path(), "first")),
        "first",
    );
    let ways = [
        Way::ClientCancels,
        Way::ClientGone,
        Way::UpstreamFinishes,
        Way::UpstreamResets,
        Way::EnvoyTimeout,
    ];
    let mut victim = admitted(
        runtime.block_on(open(port, ways[0].path(), "victim-0")),
        "second",
    );
    for (index, way) in ways.iter().enumerate() {
        match runtime.block_on(open(port, "/streams.Test/Hold", &format!("third-{index}"))) {
            Opened::Refused(status, message) => {
                assert_eq!(status, "8", "{message}");
                assert!(
                    message.starts_with("rate limit `two-streams` exceeded"),
                    "{message}"
                );
            }
            Opened::Admitted(held) => {
                panic!("a third stream was admitted beside {} and first", held.name)
            }
        }
        let name = victim.name.clone();
        let ended = match way {
            Way::ClientCancels => {
                victim.send.send_reset(h2::Reason::CANCEL);
                upstream.wait_ended(&name)
            }
            Way::ClientGone => {
                victim.connection.abort();
                drop(victim);
                upstream.wait_ended(&name)
            }
            Way::UpstreamFinishes => {
                upstream.tell(&name, Command::Finish);
                let ended = upstream.wait_ended(&name);
                // The client sees the call end with status 0.
                let trailers = runtime.block_on(async {
                    while let Some(Ok(_)) = victim.body.data().await {}
                    victim.body.trailers().await
                });
                let status = trailers
                    .ok()
                    .flatten()
                    .and_then(|t| t.get("grpc-status").cloned());
                assert_eq!(status.as_ref().map(|s| s.as_bytes()), Some(&b"0"[..]));
                ended
            }
            Way::UpstreamResets => {
                upstream.tell(&name, Command::Reset);
                upstream.wait_ended(&name)
            }
            // Nobody does anything: Envoy's idle timeout ends it.
            Way::EnvoyTimeout => upstream.wait_ended(&name),
        };
        let expected = match way {
            Way::UpstreamFinishes => Ended::Finished,
            Way::UpstreamResets => Ended::ResetByUs,
            _ => Ended::ResetByEnvoy,
        };
        assert_eq!(ended, expected, "{way:?}");
        // The release is a callout of its own: poll (bounded) until a stream is admitted.
        let next_way = ways.get(index + 1).copied().unwrap_or(Way::ClientCancels);
        let next_name = format!("victim-{}", index + 1);
        let deadline = Instant::now() + Duration::from_secs(15);
        let mut refused = 0;
        victim = loop {
            match runtime.block_on(open(port, next_way.path(), &next_name)) {
                Opened::Admitted(held) => break held,
                Opened::Refused(status, _) => {
                    assert_eq!(status, "8");
                    refused += 1;
                    assert!(
                        Instant::now() < deadline,
                        "{way:?}: no slot came back within 15 s ({refused} refused)\n{}",
                        envoy.log()
                    );
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
        };
        println!("{way:?}: the stream ended at the upstream as {ended:?}; a new one was admitted after {refused} refusals");
    }
    // Still exactly two held: the first and the last victim.
    assert!(matches!(
        runtime.block_on(open(port, "/streams.Test/Hold", "last-third")),
        Opened::Refused(..)
    ));
}

// ---- the same over HTTP/1.1 and HTTP/2 ------------------------------------------------

#[derive(Debug, Clone, Copy)]
enum Downstream {
    Http1,
    Http2,
}

fn get(envoy: &Envoy, over: Downstream, path: &str, headers: &[(&str, &str)]) -> Response {
    match over {
        Downstream::Http1 => {
            sluice_e2e::http::get_with(&envoy.url(path), headers).expect("HTTP/1.1")
        }
        Downstream::Http2 => {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            runtime.block_on(h2_request(envoy.port, "GET", path, headers, Bytes::new()))
        }
    }
}

/// Whatever a client sees, over HTTP/1.1 or HTTP/2: the headers under the limit, the 429
/// and its body over it, the 401 for a bad token, the 403 when denylisted; and one client
/// is one client, whichever protocol it speaks (its address counts once across both).
#[test]
fn identity_headers_and_local_replies_are_the_same_over_http1_and_http2() {
    let controller = Controller::start(&rules(""), None);
    let upstream = Upstream::start();
    let envoy = envoy(&plugin("allow"), upstream.port(), Some(&controller), false);
    let mut seen = Vec::new();
    for over in [Downstream::Http1, Downstream::Http2] {
        let key = format!("key-{over:?}");
        for remaining in [2, 1, 0] {
            let response = get(&envoy, over, "/items", &[("x-api-key", &key)]);
            assert_eq!(response.status, 200, "{over:?}: {response:?}");
            assert_eq!(response.body, "hello from upstream\n");
            assert_eq!(response.number("x-ratelimit-limit"), 3);
            assert_eq!(
                response.number("x-ratelimit-remaining"),
                remaining,
                "{over:?}"
            );
            assert!(response
                .header("ratelimit")
                .is_some_and(|v| v.contains("per-client")));
        }
        let limited = get(&envoy, over, "/items", &[("x-api-key", &key)]);
        assert_eq!(limited.status, 429, "{over:?}: {limited:?}");
        assert_eq!(limited.header("content-type"), Some("application/json"));
        let retry_after = limited.number("retry-after");
        assert!((1..=3_600).contains(&retry_after));
        assert_eq!(limited.json()["error"], "rate_limited");
        assert_eq!(limited.json()["policy"], "per-client");

        let bad = get(&envoy, over, "/items", &[("authorization", "Bearer nope")]);
        assert_eq!(bad.status, 401, "{over:?}: {bad:?}");
        assert_eq!(bad.json()["error"], "invalid_token");
        assert_eq!(
            bad.header("www-authenticate"),
            Some(r#"Bearer error="invalid_token""#)
        );

        let banned = get(&envoy, over, "/items", &[("x-api-key", "banned-key")]);
        assert_eq!(banned.status, 403, "{over:?}: {banned:?}");
        assert_eq!(banned.json()["error"], "forbidden");
        seen.push((over, limited.status, bad.status, banned.status));
    }
    // The address is one client across both protocols: 2 over HTTP/1.1, 1 over HTTP/2.
    for (over, remaining) in [
        (Downstream::Http1, 2),
        (Downstream::Http1, 1),
        (Downstream::Http2, 0),
    ] {
        let response = get(&envoy, over, "/anonymous", &[]);
        assert_eq!(response.status, 200, "{over:?}: {response:?}");
        assert_eq!(
            response.number("x-ratelimit-remaining"),
            remaining,
            "{over:?}"
        );
    }
    for over in [Downstream::Http1, Downstream::Http2] {
        assert_eq!(get(&envoy, over, "/anonymous", &[]).status, 429, "{over:?}");
    }
    println!("limited, bad token, denylisted per protocol: {seen:?}");
}
