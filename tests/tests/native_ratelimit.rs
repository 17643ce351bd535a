//! Envoy's own rate-limit filter (`envoy.filters.http.ratelimit`) asking the controller's
//! rate-limit service API over gRPC, for real: a client → Envoy → the controller binary →
//! redis-server → Envoy's 200 or 429, with the headers the controller's answer carried.

use std::sync::{Arc, Barrier};

use envoy_types::pb::envoy::extensions::common::ratelimit::v3::rate_limit_descriptor::Entry;
use envoy_types::pb::envoy::extensions::common::ratelimit::v3::RateLimitDescriptor;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_response::Code;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_service_client::RateLimitServiceClient;
use envoy_types::pb::envoy::service::ratelimit::v3::{RateLimitRequest, RateLimitResponse};
use sluice_e2e::controller::ControllerOptions;
use sluice_e2e::envoy::{rate_limits_yaml, EnvoyOptions, Filter};
use sluice_e2e::http::{self, Response};
use sluice_e2e::{free_port, Controller, Envoy, RedisServer, Upstream};

/// A controller on `redis` serving the gRPC API, with `rules`.
fn controller(rules: &str, redis: &RedisServer) -> Controller {
    Controller::start_with(&ControllerOptions {
        grpc: true,
        ..ControllerOptions::new(rules, Some(&redis.url()))
    })
}

/// Envoy (`concurrency` workers) with its rate-limit filter asking the gRPC API on `ports`,
/// one descriptor per list of actions.
fn envoy_asking(
    ports: Vec<u16>,
    upstream: &Upstream,
    failure_mode_deny: bool,
    descriptors: &[&[&str]],
    concurrency: u32,
) -> Envoy {
    Envoy::start(&EnvoyOptions {
        filter: Filter::NativeRateLimit {
            failure_mode_deny,
            rate_limits: rate_limits_yaml(descriptors),
        },
        upstream_port: upstream.port(),
        controller_ports: ports,
        concurrency,
        controller_http2: true,
    })
}

const BY_ADDRESS: &[&str] = &["{ remote_address: {} }"];

fn per_client(limit: u64, window: &str) -> String {
    format!("[[rules]]\nname = \"per-client\"\nlimit = {limit}\nwindow = \"{window}\"\n")
}

fn get(envoy: &Envoy, headers: &[(&str, &str)]) -> Response {
    http::get_with(&envoy.url("/items"), headers).expect("request through envoy")
}

/// Under the limit the upstream answers with the controller's headers added by Envoy; over
/// it Envoy answers 429 with them, `Retry-After` and the controller's JSON body.
#[test]
fn under_the_limit_200_with_headers_over_it_429_with_the_controllers_answer() {
    let redis = RedisServer::start();
    let controller = controller(&per_client(5, "1h"), &redis);
    let upstream = Upstream::start();
    let envoy = envoy_asking(vec![controller.grpc()], &upstream, true, &[BY_ADDRESS], 1);
    for remaining in (0..5).rev() {
        let response = get(&envoy, &[]);
        assert_eq!(response.status, 200, "{response:?}\n{}", envoy.log());
        assert_eq!(response.body, "hello from upstream\n");
        assert_eq!(response.number("x-ratelimit-limit"), 5);
        assert_eq!(response.number("x-ratelimit-remaining"), remaining);
        let reset = response.number("x-ratelimit-reset");
        assert!((1..=3_600).contains(&reset), "reset {reset}");
        assert_eq!(
            response.header("ratelimit-policy"),
            Some(r#""per-client";q=5;w=3600"#)
        );
        assert_eq!(
            response.header("ratelimit"),
            Some(format!(r#""per-client";r={remaining};t={reset}"#).as_str())
        );
        assert_eq!(response.header("retry-after"), None);
        assert_eq!(
            response.header("content-type"),
            Some("text/plain; charset=utf-8")
        );
    }
    let denied = get(&envoy, &[]);
    assert_eq!(denied.status, 429, "{denied:?}");
    assert_eq!(denied.number("x-ratelimit-limit"), 5);
    assert_eq!(denied.number("x-ratelimit-remaining"), 0);
    let retry_after = denied.number("retry-after");
    assert!((1..=3_600).contains(&retry_after), "{denied:?}");
    assert_eq!(denied.header("x-envoy-ratelimited"), Some("true"));
    assert_eq!(denied.header("content-type"), Some("application/json"));
    let body = denied.json();
    assert_eq!(body["error"], "rate_limited");
    assert_eq!(body["policy"], "per-client");
    assert_eq!(body["limit"], 5);
    assert_eq!(body["retry_after"], retry_after);
    assert_eq!(envoy.stat("cluster.upstream.ratelimit.over_limit"), Some(1));
    assert_eq!(envoy.stat("cluster.upstream.ratelimit.ok"), Some(5));
}

/// Two Envoy workers, two controllers as endpoints of the rate-limit cluster, one Redis: N
/// concurrent requests against a limit L admit exactly L, and both controllers answered.
#[test]
fn exactly_the_limit_is_admitted_across_two_controllers() {
    const LIMIT: u64 = 25;
    const REQUESTS: usize = 80;
    let redis = RedisServer::start();
    let first = controller(&per_client(LIMIT, "1h"), &redis);
    let second = controller(&per_client(LIMIT, "1h"), &redis);
    let upstream = Upstream::start();
    let envoy = envoy_asking(
        vec![first.grpc(), second.grpc()],
        &upstream,
        true,
        &[BY_ADDRESS],
        2,
    );
    let start = Arc::new(Barrier::new(REQUESTS));
    let url = envoy.url("/items");
    let clients: Vec<_> = (0..REQUESTS)
        .map(|_| {
            let (start, url) = (Arc::clone(&start), url.clone());
            std::thread::spawn(move || {
                start.wait();
                http::get(&url).expect("request through envoy").status
            })
        })
        .collect();
    let statuses: Vec<u16> = clients.into_iter().map(|c| c.join().unwrap()).collect();
    let admitted = statuses.iter().filter(|&&s| s == 200).count();
    let denied = statuses.iter().filter(|&&s| s == 429).count();
    assert_eq!(admitted as u64, LIMIT, "{statuses:?}");
    assert_eq!(denied, REQUESTS - LIMIT as usize, "{statuses:?}");
    for controller in [&first, &second] {
        let log = controller.log();
        assert!(
            log.contains("rate-limit call served"),
            "a controller answered no call:\n{log}"
        );
    }
}

/// A rate-limit service that cannot be reached: Envoy lets requests through with
/// `failure_mode_deny: false` and answers 500 with `true` (Envoy's documented default status
/// for an error of the rate-limit service), and counts each.
#[test]
fn a_controller_that_is_down_gets_envoys_failure_mode() {
    let upstream = Upstream::start();
    let nobody = free_port();
    let allowing = envoy_asking(vec![nobody], &upstream, false, &[BY_ADDRESS], 1);
    let passed = get(&allowing, &[]);
    assert_eq!(passed.status, 200, "{passed:?}");
    assert_eq!(passed.header("x-ratelimit-limit"), None);
    assert_eq!(
        allowing.stat("cluster.upstream.ratelimit.failure_mode_allowed"),
        Some(1)
    );
    let denying = envoy_asking(vec![nobody], &upstream, true, &[BY_ADDRESS], 1);
    let refused = get(&denying, &[]);
    assert_eq!(refused.status, 500, "{refused:?}");
    assert_eq!(denying.stat("cluster.upstream.ratelimit.error"), Some(1));
}

/// A gRPC client of the controller's API, on a runtime of its own.
struct Client {
    runtime: tokio::runtime::Runtime,
    port: u16,
}

impl Client {
    fn new(port: u16) -> Client {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        Client { runtime, port }
    }

    fn call(&self, request: RateLimitRequest) -> Result<RateLimitResponse, tonic::Status> {
        // As Envoy sends it (grpc_service.initial_metadata).
        let credential = format!("Bearer {}", sluice_e2e::controller::CHECK_TOKEN);
        self.call_as(request, Some(&credential))
    }

    /// A call with `credential` as its `authorization` metadata, or none.
    fn call_as(
        &self,
        request: RateLimitRequest,
        credential: Option<&str>,
    ) -> Result<RateLimitResponse, tonic::Status> {
        self.runtime.block_on(async {
            let mut client =
                RateLimitServiceClient::connect(format!("http://127.0.0.1:{}", self.port))
                    .await
                    .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
            let mut request = tonic::Request::new(request);
            if let Some(credential) = credential {
                request.metadata_mut().insert(
                    "authorization",
                    credential.parse().expect("a metadata value"),
                );
            }
            client
                .should_rate_limit(request)
                .await
                .map(tonic::Response::into_inner)
        })
    }
}

fn descriptor(entries: &[(&str, &str)]) -> RateLimitDescriptor {
    RateLimitDescriptor {
        entries: entries
            .iter()
            .map(|(key, value)| Entry {
                key: (*key).to_owned(),
                value: (*value).to_owned(),
            })
            .collect(),
        ..RateLimitDescriptor::default()
    }
}

fn request(descriptors: Vec<RateLimitDescriptor>) -> RateLimitRequest {
    RateLimitRequest {
        domain: "sluice".to_owned(),
        descriptors,
        hits_addend: 0,
    }
}

/// Straight to the controller binary: statuses per descriptor, the cost, and the codes of
/// invalid requests and of a store that does not answer.
#[test]
fn the_grpc_api_answers_per_descriptor_and_refuses_with_the_field_named() {
    let redis = RedisServer::start();
    let controller = Controller::start_with(&ControllerOptions {
        grpc: true,
        redis_timeout_ms: Some(300),
        ..ControllerOptions::new(&per_client(10, "1m"), Some(&redis.url()))
    });
    let client = Client::new(controller.grpc());
    let mut costly = descriptor(&[("remote_address", "192.0.2.7")]);
    costly.hits_addend = Some(envoy_types::pb::google::protobuf::UInt64Value { value: 4 });
    let mut call = request(vec![descriptor(&[("user", "ann")]), costly]);
    call.hits_addend = 2;
    let answer = client.call(call.clone()).expect("an answer");
    assert_eq!(answer.overall_code, Code::Ok as i32);
    let remaining: Vec<u32> = answer.statuses.iter().map(|s| s.limit_remaining).collect();
    assert_eq!(
        remaining,
        [8, 6],
        "the request's cost, then the descriptor's own"
    );
    let limit = answer.statuses[0].current_limit.as_ref().expect("a limit");
    assert_eq!(
        (limit.name.as_str(), limit.requests_per_unit, limit.unit),
        ("per-client", 10, 2)
    );
    let scripts = || redis.calls("evalsha") + redis.calls("eval");
    let scripts_before = scripts();
    let answer = client.call(call.clone()).expect("an answer");
    assert_eq!(
        scripts() - scripts_before,
        1,
        "one store round trip for the whole request"
    );
    let remaining: Vec<u32> = answer.statuses.iter().map(|s| s.limit_remaining).collect();
    assert_eq!(remaining, [6, 2]);
    // Without the check token, or with another, the call is refused before Redis is asked.
    let scripts_before = scripts();
    for credential in [None, Some("Bearer not-the-check-token-0123456789")] {
        let refused = client.call_as(call.clone(), credential).unwrap_err();
        assert_eq!(
            refused.code(),
            tonic::Code::Unauthenticated,
            "{credential:?}"
        );
    }
    assert_eq!(scripts(), scripts_before, "nothing reached Redis");
    let answer = client.call(call.clone()).expect("an answer");
    let codes: Vec<i32> = answer.statuses.iter().map(|s| s.code).collect();
    assert_eq!(codes, [Code::Ok as i32, Code::OverLimit as i32]);
    assert_eq!(answer.overall_code, Code::OverLimit as i32);

    let refused = client
        .call(request(vec![descriptor(&[(
            "remote_address",
            "not-an-ip",
        )])]))
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::InvalidArgument);
    assert_eq!(
        refused.message(),
        "descriptors[0].entries[0].value: `not-an-ip` is not an IP address"
    );
    let refused = client.call(request(Vec::new())).unwrap_err();
    assert_eq!(refused.code(), tonic::Code::InvalidArgument);
    assert_eq!(
        refused.message(),
        "descriptors: at least one descriptor is needed"
    );

    redis.pause();
    let failed = client.call(request(vec![descriptor(&[("user", "bob")])]));
    redis.resume();
    let failed = failed.unwrap_err();
    assert_eq!(failed.code(), tonic::Code::Unavailable, "{failed:?}");
    assert!(
        failed.message().starts_with("store unavailable"),
        "{failed:?}"
    );
}

/// A store that does not answer is an error Envoy applies its failure mode to: 500 when it
/// denies, the upstream's answer when it allows.
#[test]
fn a_store_failure_gets_envoys_failure_mode() {
    let redis = RedisServer::start();
    let controller = Controller::start_with(&ControllerOptions {
        grpc: true,
        redis_timeout_ms: Some(300),
        ..ControllerOptions::new(&per_client(10, "1m"), Some(&redis.url()))
    });
    let upstream = Upstream::start();
    let denying = envoy_asking(vec![controller.grpc()], &upstream, true, &[BY_ADDRESS], 1);
    let allowing = envoy_asking(vec![controller.grpc()], &upstream, false, &[BY_ADDRESS], 1);
    assert_eq!(get(&denying, &[]).status, 200);
    redis.pause();
    let refused = get(&denying, &[]);
    let passed = get(&allowing, &[]);
    redis.resume();
    assert_eq!(refused.status, 500, "{refused:?}");
    assert_eq!(passed.status, 200, "{passed:?}");
    assert_eq!(passed.header("x-ratelimit-limit"), None);
    assert!(
        controller.log().contains("store unavailable"),
        "{}",
        controller.log()
    );
    assert_eq!(
        get(&denying, &[]).status,
        200,
        "and back once Redis answers"
    );
}

const IDENTITY_RULES: &str = r#"
[[rules]]
name = "per-key"
scope = "api_key"
limit = 2
window = "1h"

[[rules]]
name = "per-user"
scope = "user"
limit = 3
window = "1h"

[[api_keys]]
sha256 = "9b1f6b1b4c1ac3f4e6b5b6d7f1c0d2b3a4e5f60718293a4b5c6d7e8f9a0b1c2d"
user = "placeholder"

# Unknown keys count as clients of their own here (by default they count by address).
[protection]
invalid_credentials = 1000
window = "1m"
block = "1m"
unknown_api_keys = "allow"
"#;

/// One descriptor from `x-api-key` (as `api_key`, hashed by the controller) and one from
/// `x-user` (as `user`): different keys count apart, a user hits the user-scoped rule, and a
/// key the configuration knows counts as its user.
#[test]
fn descriptors_map_to_the_documented_identities() {
    let known_key = "acme-secret-key";
    let digest = sluice_filter::identity::api_key_digest(known_key);
    let rules = IDENTITY_RULES
        .replace(
            "9b1f6b1b4c1ac3f4e6b5b6d7f1c0d2b3a4e5f60718293a4b5c6d7e8f9a0b1c2d",
            &digest,
        )
        .replace("placeholder", "acme");
    let redis = RedisServer::start();
    let controller = controller(&rules, &redis);
    let upstream = Upstream::start();
    let envoy = envoy_asking(
        vec![controller.grpc()],
        &upstream,
        true,
        &[
            &["{ request_headers: { header_name: x-api-key, descriptor_key: api_key } }"],
            &["{ request_headers: { header_name: x-user, descriptor_key: user } }"],
        ],
        1,
    );
    let statuses = |headers: &[(&str, &str)], n: usize| -> Vec<u16> {
        (0..n).map(|_| get(&envoy, headers).status).collect()
    };
    assert_eq!(statuses(&[("x-api-key", "key-a")], 3), [200, 200, 429]);
    let other = get(&envoy, &[("x-api-key", "key-b")]);
    assert_eq!(other.status, 200, "another key counts apart: {other:?}");
    assert_eq!(other.number("x-ratelimit-remaining"), 1);
    let limited = get(&envoy, &[("x-api-key", "key-a")]);
    assert_eq!(limited.json()["policy"], "per-key");

    assert_eq!(statuses(&[("x-user", "ann")], 4), [200, 200, 200, 429]);
    assert_eq!(
        get(&envoy, &[("x-user", "ann")]).json()["policy"],
        "per-user"
    );
    assert_eq!(statuses(&[("x-user", "bob")], 1), [200]);

    // The known key is user acme: each request counts under per-key and per-user.
    let keyed = get(&envoy, &[("x-api-key", known_key)]);
    assert_eq!(keyed.status, 200, "{keyed:?}");
    assert_eq!(
        keyed.header("ratelimit-policy"),
        Some(r#""per-key";q=2;w=3600, "per-user";q=3;w=3600"#)
    );
    assert_eq!(statuses(&[("x-user", "acme")], 3), [200, 200, 429]);

    // A request with neither header sends no descriptor: Envoy asks nobody.
    let anonymous = get(&envoy, &[]);
    assert_eq!(anonymous.status, 200);
    assert_eq!(anonymous.header("x-ratelimit-limit"), None);
}

/// The Sluice filter and Envoy's own filter, each in its own Envoy, count an API key on one
/// counter: the controller hashes the key as the filter does, and knows it as its user.
#[test]
fn the_wasm_filter_and_the_native_filter_share_a_clients_counter() {
    let redis = RedisServer::start();
    let known = format!(
        "{}\n[[api_keys]]\nsha256 = \"{}\"\nuser = \"shared\"\n",
        per_client(4, "1h"),
        sluice_filter::identity::api_key_digest("shared-key")
    );
    let controller = controller(&known, &redis);
    let upstream = Upstream::start();
    let native = envoy_asking(
        vec![controller.grpc()],
        &upstream,
        true,
        &[&["{ request_headers: { header_name: x-api-key, descriptor_key: api_key } }"]],
        1,
    );
    let plugin = sluice_e2e::envoy::with_fields(
        sluice_e2e::envoy::sluice_plugin_config("deny", 1_000),
        serde_json::json!({ "identity": { "api_key_header": "x-api-key" } }),
    );
    let wasm = Envoy::start(&EnvoyOptions {
        filter: Filter::sluice_with(&plugin),
        upstream_port: upstream.port(),
        controller_ports: vec![controller.port],
        concurrency: 1,
        controller_http2: false,
    });
    let key = [("x-api-key", "shared-key")];
    let remaining: Vec<u64> = [&native, &wasm, &native, &wasm]
        .iter()
        .map(|envoy| {
            let response = get(envoy, &key);
            assert_eq!(response.status, 200, "{response:?}");
            response.number("x-ratelimit-remaining")
        })
        .collect();
    assert_eq!(remaining, [3, 2, 1, 0]);
    assert_eq!(get(&native, &key).status, 429);
    assert_eq!(get(&wasm, &key).status, 429);
}
