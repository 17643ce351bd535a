//! What a client on the internet can make of the request path, through a real Envoy running
//! the real `.wasm` in front of a real controller: a path that climbs out of an exempt glob
//! (`/stats/../x`), a burst of requests whose checks together outgrow what the controller
//! reads in one call, and forged tokens that would cost a signature check each.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use serde_json::{json, Value};
use sluice_e2e::envoy::{config_yaml, sluice_plugin_config, with_fields, EnvoyOptions, Filter};
use sluice_e2e::raw::{self, RawResponse};
use sluice_e2e::{free_port, repo_root, wait_until, Controller, Envoy, Upstream};

fn options(plugin: &Value, controller_port: u16, upstream: &Upstream) -> EnvoyOptions {
    EnvoyOptions {
        filter: Filter::sluice_with(plugin),
        upstream_port: upstream.port(),
        controller_ports: vec![controller_port],
        concurrency: 1,
        controller_http2: false,
    }
}

/// A response as text, for failure messages.
fn show(response: &RawResponse) -> String {
    let headers: Vec<String> = response
        .headers
        .iter()
        .map(|(name, value)| format!("{name}: {}", String::from_utf8_lossy(value)))
        .collect();
    format!(
        "{} {headers:?} {}",
        response.status,
        String::from_utf8_lossy(&response.body)
    )
}

/// `GET path` exactly as written (no client library normalises it on the way).
fn raw_get(envoy: &Envoy, path: &str, headers: &[(&[u8], &[u8])]) -> RawResponse {
    raw::send(envoy.port, &raw::get_request(path.as_bytes(), headers))
        .unwrap_or_else(|e| panic!("GET {path}: {e}\n{}", envoy.log()))
}

// --- paths -------------------------------------------------------------------------------

/// `/x` admits two requests per client an hour; nothing else is limited.
const PATH_RULES: &str = r#"
[[rules]]
name = "x"
limit = 2
window = "1h"
match = { path_prefix = "/x" }
"#;

/// The connection manager's path options, as the harness (and every shipped config) sets
/// them.
const NORMALISING: &str = "          normalize_path: true\n          merge_slashes: true\n          path_with_escaped_slashes_action: UNESCAPE_AND_REDIRECT\n";

/// `/stats/../x` and its spellings count against `/x`: two pass with `/x`'s limit shown, and
/// then `/x` itself is refused. Exempt paths stay exempt.
fn assert_dotted_paths_count_as_x(envoy: &Envoy, more: &[&str]) {
    for (path, remaining) in [("/stats/../x", "1"), ("/stats/%2e%2e/x", "0")] {
        let response = raw_get(envoy, path, &[]);
        assert_eq!(
            response.status,
            200,
            "{path}: {}\n{}",
            show(&response),
            envoy.log()
        );
        assert_eq!(
            response.header_text("x-ratelimit-limit").as_deref(),
            Some("2"),
            "{path} is limited as /x, not exempt: {}",
            show(&response)
        );
        assert_eq!(
            response.header_text("x-ratelimit-remaining").as_deref(),
            Some(remaining),
            "{path}"
        );
    }
    for path in more.iter().copied().chain(["/x"]) {
        let response = raw_get(envoy, path, &[]);
        assert_eq!(response.status, 429, "{path}: {}", show(&response));
        let body: Value = serde_json::from_slice(&response.body).expect("a JSON 429");
        assert_eq!(body["policy"], "x", "{path}");
    }
    let exempt = raw_get(envoy, "/x/../stats/server_info", &[]);
    assert_eq!(exempt.status, 200, "{}", show(&exempt));
    assert_eq!(
        exempt.header("x-ratelimit-limit"),
        None,
        "exempt: {}",
        show(&exempt)
    );
}

/// As shipped: Envoy normalises the path before the filter and the upstream see it, and
/// redirects a client whose path hides a `/` as `%2F`.
#[test]
fn envoy_as_shipped_normalises_the_path_for_the_filter_and_the_upstream() {
    let controller = Controller::start(PATH_RULES, None);
    let upstream = Upstream::start();
    let options = options(
        &sluice_plugin_config("deny", 2_000),
        controller.port,
        &upstream,
    );
    let (port, admin_port) = (free_port(), free_port());
    let config = config_yaml(&options, port, admin_port);
    assert!(config.contains(NORMALISING), "the harness's path options");
    let envoy = Envoy::start_with_config(&config, port, admin_port, 1);

    assert_dotted_paths_count_as_x(&envoy, &["//x"]);
    // The upstream answers `/status/418` with 418: it got the normalised path.
    for path in ["/stats/../status/418", "//status//418", "/status/%2e/418"] {
        let response = raw_get(&envoy, path, &[]);
        assert_eq!(response.status, 418, "{path}: {}", show(&response));
    }
    let escaped = raw_get(&envoy, "/status%2F418", &[]);
    assert_eq!(escaped.status, 307, "{}", show(&escaped));
    assert_eq!(
        escaped.header_text("location").as_deref(),
        Some("/status/418"),
        "{}",
        show(&escaped)
    );
}

/// A host that does not normalise (a config without the options): the filter matches and
/// counts the normal form all the same, though the upstream gets the path as sent.
#[test]
fn the_filter_normalises_the_path_where_envoy_does_not() {
    let controller = Controller::start(PATH_RULES, None);
    let upstream = Upstream::start();
    let options = options(
        &sluice_plugin_config("deny", 2_000),
        controller.port,
        &upstream,
    );
    let (port, admin_port) = (free_port(), free_port());
    let config = config_yaml(&options, port, admin_port);
    assert!(config.contains(NORMALISING), "the harness's path options");
    let config = config.replace(NORMALISING, "");
    let envoy = Envoy::start_with_config(&config, port, admin_port, 1);

    // This Envoy really leaves paths alone: the upstream does not see `/status/418`.
    let untouched = raw_get(&envoy, "/stats/../status/418", &[]);
    assert_eq!(untouched.status, 200, "{}", show(&untouched));
    assert_dotted_paths_count_as_x(&envoy, &["//x", "/y/./../x", "/%78"]);
}

// --- long requests in batches ------------------------------------------------------------

/// A TCP proxy in front of the controller that holds what Envoy sends (but its health
/// checks) until it is opened, and notes the `content-length` of every call through it.
struct Gate {
    port: u16,
    open: Arc<AtomicBool>,
    lengths: Arc<Mutex<Vec<usize>>>,
}

impl Gate {
    fn start(target: u16) -> Gate {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind gate");
        let port = listener.local_addr().expect("gate address").port();
        let open = Arc::new(AtomicBool::new(false));
        let lengths = Arc::new(Mutex::new(Vec::new()));
        let (gate_open, seen) = (Arc::clone(&open), Arc::clone(&lengths));
        std::thread::spawn(move || {
            for client in listener.incoming().flatten() {
                let Ok(server) = TcpStream::connect(("127.0.0.1", target)) else {
                    continue;
                };
                let (Ok(client_in), Ok(server_out)) = (client.try_clone(), server.try_clone())
                else {
                    continue;
                };
                let (gate_open, seen) = (Arc::clone(&gate_open), Arc::clone(&seen));
                std::thread::spawn(move || forward(client_in, server_out, &gate_open, &seen));
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut &server, &mut &client);
                    let _ = client.shutdown(Shutdown::Write);
                });
            }
        });
        Gate {
            port,
            open,
            lengths,
        }
    }

    fn open(&self) {
        self.open.store(true, Ordering::SeqCst);
    }

    fn lengths(&self) -> Vec<usize> {
        self.lengths.lock().expect("lengths").clone()
    }
}

/// Envoy's side to the controller's: a health check (`GET /readyz`) passes at once; the rest
/// waits for the gate. The `content-length` of each request that goes by is noted.
fn forward(mut from: TcpStream, mut to: TcpStream, open: &AtomicBool, seen: &Mutex<Vec<usize>>) {
    let mut buffer = vec![0u8; 64 * 1024];
    let mut probe = None;
    let mut requests = Requests::default();
    loop {
        let n = match from.read(&mut buffer) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let chunk = &buffer[..n];
        let probing = *probe.get_or_insert_with(|| chunk.starts_with(b"GET /readyz"));
        if !probing {
            while !open.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(5));
            }
            requests.feed(chunk, seen);
        }
        if to.write_all(chunk).is_err() {
            break;
        }
    }
    let _ = to.shutdown(Shutdown::Write);
}

/// HTTP/1.1 requests one after another on a connection: each head, then as many bytes of
/// body as it says.
#[derive(Default)]
struct Requests {
    head: Vec<u8>,
    body_left: usize,
}

impl Requests {
    fn feed(&mut self, mut chunk: &[u8], seen: &Mutex<Vec<usize>>) {
        while let Some((&byte, rest)) = chunk.split_first() {
            if self.body_left > 0 {
                let n = self.body_left.min(chunk.len());
                self.body_left -= n;
                chunk = &chunk[n..];
                continue;
            }
            self.head.push(byte);
            chunk = rest;
            if self.head.ends_with(b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&self.head).to_ascii_lowercase();
                let length = head
                    .lines()
                    .find_map(|line| line.strip_prefix("content-length:"))
                    .and_then(|value| value.trim().parse().ok())
                    .unwrap_or(0);
                seen.lock().expect("lengths").push(length);
                self.body_left = length;
                self.head.clear();
            }
        }
    }
}

/// 200 requests with paths of 7 KiB, all waiting at once on one worker: their checks
/// together are 1.4 MB, more than the controller reads in one call (1 MiB). Each must get
/// the controller's own answer; with failure mode deny, a batch the controller refused
/// would show as 503s.
#[test]
fn many_long_requests_at_once_all_get_the_controllers_answer() {
    const REQUESTS: usize = 200;
    let rules = "[[rules]]\nname = \"everyone\"\nlimit = 100000\nwindow = \"1h\"\n";
    let controller = Controller::start(rules, None);
    let gate = Gate::start(controller.port);
    let upstream = Upstream::start();
    let mut plugin = with_fields(
        sluice_plugin_config("deny", 20_000),
        json!({ "max_batch_size": 1024 }),
    );
    // Only checks go through the gate.
    plugin["controller"]["config_poll_ms"] = json!(0);
    let envoy = Envoy::start(&options(&plugin, gate.port, &upstream));

    let start = Arc::new(Barrier::new(REQUESTS));
    let port = envoy.port;
    let clients: Vec<_> = (0..REQUESTS)
        .map(|n| {
            let start = Arc::clone(&start);
            std::thread::spawn(move || {
                let path = format!("/long/{n:03}/{}", "p".repeat(7 * 1024));
                start.wait();
                raw::send(port, &raw::get_request(path.as_bytes(), &[]))
            })
        })
        .collect();
    // Every request is in Envoy, waiting for its decision, before any check gets through.
    wait_until(
        "every request waits in Envoy",
        Duration::from_secs(60),
        || envoy.stat("http.ingress.downstream_rq_active").unwrap_or(0) >= REQUESTS as u64,
    );
    gate.open();
    let responses: Vec<RawResponse> = clients
        .into_iter()
        .map(|client| client.join().expect("client").expect("a response"))
        .collect();
    let not_decided: Vec<String> = responses
        .iter()
        .filter(|r| r.status != 200 || r.header("x-ratelimit-limit").is_none())
        .map(|r| format!("{} {}", r.status, String::from_utf8_lossy(&r.body)))
        .collect();
    assert!(
        not_decided.is_empty(),
        "{} of {REQUESTS} requests did not get the controller's answer: {:?}\n{}",
        not_decided.len(),
        not_decided.first(),
        envoy
            .log()
            .lines()
            .filter(|l| l.contains("wasm"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert_eq!(envoy.stat("wasmcustom.sluice_callout_errors"), Some(0));
    assert_eq!(
        envoy.stat("wasmcustom.sluice_allowed"),
        Some(REQUESTS as u64)
    );
    let lengths = gate.lengths();
    let checks: Vec<usize> = controller
        .log()
        .lines()
        .filter(|l| l.contains("check call served"))
        .filter_map(|l| {
            l.split("checks=")
                .nth(1)?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .collect();
    println!(
        "{} check calls; checks per call {checks:?}; bytes per call {lengths:?}",
        lengths.len()
    );
    assert!(
        lengths
            .iter()
            .all(|&length| length <= sluice_protocol::MAX_CALL_BODY_BYTES),
        "{lengths:?}"
    );
    assert!(
        lengths.iter().any(|&length| length > 512 * 1024),
        "the batches were large: the test tested something ({lengths:?})"
    );
}

// --- tokens ------------------------------------------------------------------------------

fn key_file(name: &str) -> String {
    std::fs::read_to_string(repo_root().join("filter/tests/keys").join(name)).expect("test key")
}

fn now_s() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs()
}

/// An RS256 token, properly signed (with the key `kid` names, if any).
fn rs256(kid: Option<&str>, subject: &str) -> String {
    let mut header = Header::new(Algorithm::RS256);
    header.kid = kid.map(str::to_owned);
    let claims = json!({ "sub": subject, "exp": now_s() + 600 });
    let key = EncodingKey::from_rsa_pem(key_file("rsa_private.pem").as_bytes()).expect("key");
    encode(&header, &claims, &key).expect("sign RS256")
}

/// A token signed for `ann` and then made to say `subject`: no key verifies it, and only a
/// signature check can tell.
fn forged(kid: Option<&str>, subject: &str) -> String {
    let good = rs256(kid, "ann");
    let mut parts = good.split('.');
    let (header, _, signature) = (parts.next(), parts.next(), parts.next());
    let payload = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .encode(json!({ "sub": subject, "exp": now_s() + 600 }).to_string());
    format!(
        "{}.{payload}.{}",
        header.expect("header"),
        signature.expect("signature")
    )
}

/// Two RS256 keys (one named, one not) and an HS256 one; behind one trusted proxy (the test
/// client), so that each request can come from an address of its own.
/// The filter's own debug lines (its `log_level`), for Envoy to log at debug.
fn logging_at_debug(plugin: Value) -> Value {
    with_fields(plugin, json!({ "log_level": "debug" }))
}

fn jwt_plugin() -> Value {
    with_fields(
        sluice_plugin_config("deny", 2_000),
        json!({ "identity": {
            "ip": { "trusted_hops": 1 },
            "jwt": { "keys": [
                { "kid": "rsa-1", "alg": "RS256", "pem": key_file("rsa_public.pem") },
                { "alg": "RS256", "pem": key_file("rsa_public.pem") },
                { "alg": "HS256", "secret": "edge-test" }
            ] }
        } }),
    )
}

/// The filter's debug lines about signature checks so far.
fn signature_checks(envoy: &Envoy) -> Vec<String> {
    envoy
        .log()
        .lines()
        .filter(|l| l.contains("a token's signature was checked"))
        .map(str::to_owned)
        .collect()
}

fn get_as(envoy: &Envoy, client: &str, token: &str) -> RawResponse {
    let bearer = format!("Bearer {token}");
    raw_get(
        envoy,
        "/items",
        &[
            (b"authorization", bearer.as_bytes()),
            (b"x-forwarded-for", client.as_bytes()),
        ],
    )
}

/// 30 requests with one forged RS256 token, without a `kid`: the first costs a check
/// against each RS256 key (two), every later one a lookup. Each is still refused and
/// counted.
#[test]
fn a_burst_of_one_forged_token_is_checked_once() {
    let controller = Controller::start("", None);
    let upstream = Upstream::start();
    let envoy = Envoy::start_logging(
        &options(&logging_at_debug(jwt_plugin()), controller.port, &upstream),
        "debug",
    );
    let token = forged(None, "mallory");
    let burst = Arc::new(Barrier::new(30));
    let port = envoy.port;
    let statuses: Vec<u16> = (0..30)
        .map(|n| {
            let (burst, token) = (Arc::clone(&burst), token.clone());
            std::thread::spawn(move || {
                let bearer = format!("Bearer {token}");
                let client = format!("198.51.100.{n}");
                burst.wait();
                let request = raw::get_request(
                    b"/items",
                    &[
                        (b"authorization", bearer.as_bytes()),
                        (b"x-forwarded-for", client.as_bytes()),
                    ],
                );
                raw::send(port, &request).expect("a response").status
            })
        })
        .collect::<Vec<_>>()
        .into_iter()
        .map(|client| client.join().expect("client"))
        .collect();
    assert_eq!(statuses, [401; 30], "{}", envoy.log());
    assert_eq!(envoy.stat("wasmcustom.sluice_token_rejected"), Some(30));
    let checks = signature_checks(&envoy);
    assert_eq!(checks.len(), 1, "{checks:#?}");
    assert!(
        checks[0].contains("checked against 2 key(s): refused"),
        "{checks:#?}"
    );
    // A valid token is still taken, and checked once too.
    let valid = rs256(Some("rsa-1"), "ann");
    for _ in 0..3 {
        let response = get_as(&envoy, "198.51.100.200", &valid);
        assert_eq!(response.status, 200, "{}", show(&response));
    }
    let checks = signature_checks(&envoy);
    assert_eq!(checks.len(), 2, "{checks:#?}");
    assert!(checks[1].contains("against 1 key(s): valid"), "{checks:#?}");
}

/// A client on the denylist gets its 403 before its token is looked at: no signature is
/// checked for it, whatever it sends. The same token from another client is checked.
#[test]
fn a_denylisted_clients_tokens_are_never_checked() {
    let lists = "[[denylist]]\nkind = \"ip\"\nvalue = \"203.0.113.66\"\n";
    let controller = Controller::start(lists, None);
    let upstream = Upstream::start();
    let envoy = Envoy::start_logging(
        &options(&logging_at_debug(jwt_plugin()), controller.port, &upstream),
        "debug",
    );
    envoy.wait_until_vms_read_the_configuration(2);
    let banned = "203.0.113.66";
    let tokens = [
        forged(None, "mallory"),
        forged(Some("rsa-1"), "mallory"),
        forged(None, "eve"),
        rs256(Some("rsa-1"), "ann"),
    ];
    for token in &tokens {
        for _ in 0..3 {
            let response = get_as(&envoy, banned, token);
            assert_eq!(response.status, 403, "{}", show(&response));
        }
    }
    assert_eq!(envoy.stat("wasmcustom.sluice_denylisted"), Some(12));
    assert_eq!(
        signature_checks(&envoy),
        Vec::<String>::new(),
        "no token of a denylisted client is checked"
    );
    assert_eq!(
        envoy.stat("wasmcustom.sluice_token_rejected").unwrap_or(0),
        0
    );
    // Another client with the same tokens: checked, refused or taken.
    let statuses: Vec<u16> = tokens
        .iter()
        .map(|token| get_as(&envoy, "203.0.113.7", token).status)
        .collect();
    assert_eq!(statuses, [401, 401, 401, 200]);
    assert_eq!(signature_checks(&envoy).len(), 4);
}
