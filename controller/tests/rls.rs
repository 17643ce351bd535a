//! Envoy's rate-limit service API in process, on the embedded store with a manual clock:
//! what the gRPC service does beyond mapping descriptors (`src/rls.rs` tests that).

mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use envoy_types::pb::envoy::extensions::common::ratelimit::v3::rate_limit_descriptor::Entry;
use envoy_types::pb::envoy::extensions::common::ratelimit::v3::RateLimitDescriptor;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_response::Code;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_service_server::RateLimitService;
use envoy_types::pb::envoy::service::ratelimit::v3::{RateLimitRequest, RateLimitResponse};
use serde_json::json;
use sluice_controller::check::limiter::Limiter;
use sluice_controller::rls::Rls;
use support::{post, world, World};

async fn service(rules: &str) -> (Rls, World) {
    let world = world(rules).await;
    let limiter = Limiter::new(Arc::clone(&world.live), world.counters.clone());
    (Rls::new(Arc::new(limiter)), world)
}

async fn ask(service: &Rls, entries: &[(&str, &str)]) -> RateLimitResponse {
    let request = RateLimitRequest {
        domain: "sluice".to_owned(),
        descriptors: vec![RateLimitDescriptor {
            entries: entries
                .iter()
                .map(|(key, value)| Entry {
                    key: (*key).to_owned(),
                    value: (*value).to_owned(),
                })
                .collect(),
            ..RateLimitDescriptor::default()
        }],
        hits_addend: 0,
    };
    service
        .should_rate_limit(tonic::Request::new(request))
        .await
        .expect("an answer")
        .into_inner()
}

fn code(response: &RateLimitResponse) -> Code {
    Code::try_from(response.overall_code).expect("a known code")
}

/// Envoy's filter never says when a request ends: a concurrency rule refuses a request when
/// its slots are full (taken by the Sluice filter's requests), and the request takes none.
#[tokio::test]
async fn a_concurrency_rule_is_checked_but_holds_no_slot() {
    let (service, world) = service(
        "[[rules]]\nname = \"slots\"\nstrategy = \"concurrency\"\nlimit = 1\nlease = \"1m\"\n",
    )
    .await;
    for _ in 0..3 {
        assert_eq!(code(&ask(&service, &[("user", "ann")]).await), Code::Ok);
    }
    // The Sluice filter's request holds the slot until it releases it.
    let (_, held) = post(
        &world.check,
        "/v1/check",
        json!({ "checks": [{ "client": { "kind": "user", "value": "ann" } }] }),
    )
    .await;
    assert_eq!(held["decisions"][0]["allowed"], true, "{held}");
    assert_eq!(
        code(&ask(&service, &[("user", "ann")]).await),
        Code::OverLimit
    );
    let (_, released) = post(
        &world.check,
        "/v1/release",
        json!({ "leases": held["decisions"][0]["leases"] }),
    )
    .await;
    assert_eq!(released["released"], 1);
    assert_eq!(code(&ask(&service, &[("user", "ann")]).await), Code::Ok);
}

/// A leaky bucket admits a request at its slot: the answer waits until then.
#[tokio::test]
async fn a_leaky_bucket_answer_waits_for_its_slot() {
    let (service, _world) = service(
        "[[rules]]\nname = \"queue\"\nstrategy = \"leaky_bucket\"\nlimit = 5\nwindow = \"1s\"\nmax_delay = \"1s\"\n",
    )
    .await;
    let started = Instant::now();
    assert_eq!(code(&ask(&service, &[("user", "ann")]).await), Code::Ok);
    assert!(
        started.elapsed() < Duration::from_millis(150),
        "the first passes at once"
    );
    let started = Instant::now();
    assert_eq!(code(&ask(&service, &[("user", "ann")]).await), Code::Ok);
    assert!(
        started.elapsed() >= Duration::from_millis(200),
        "the next one's slot is 200 ms later: {:?}",
        started.elapsed()
    );
}

/// With unknown keys refused, a key the configuration does not know is over the limit with
/// the filter's `invalid_api_key` body; a known one passes as its user.
#[tokio::test]
async fn unknown_api_keys_are_refused_when_the_configuration_says_so() {
    let known = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"; // "test"
    let (service, _world) = service(&format!(
        "[[rules]]\nname = \"per-user\"\nscope = \"user\"\nlimit = 5\nwindow = \"1m\"\n\
         [[api_keys]]\nsha256 = \"{known}\"\nuser = \"acme\"\n\
         [protection]\ninvalid_credentials = 10\nwindow = \"1m\"\nblock = \"1m\"\nunknown_api_keys = \"reject\"\n"
    ))
    .await;
    let refused = ask(
        &service,
        &[("api_key", "made-up"), ("remote_address", "10.0.0.1")],
    )
    .await;
    assert_eq!(code(&refused), Code::OverLimit);
    assert_eq!(refused.statuses[0].code, Code::OverLimit as i32);
    let body: serde_json::Value = serde_json::from_slice(&refused.raw_body).unwrap();
    assert_eq!(body["error"], "invalid_api_key");
    let passed = ask(&service, &[("api_key", "test")]).await;
    assert_eq!(code(&passed), Code::Ok);
    let limit = passed.statuses[0]
        .current_limit
        .as_ref()
        .expect("per-user applies");
    assert_eq!(
        (limit.name.as_str(), passed.statuses[0].limit_remaining),
        ("per-user", 4)
    );
}

/// A rule in shadow never makes a descriptor over the limit, and the headers say where it
/// stands.
#[tokio::test]
async fn a_shadow_rule_reports_and_never_denies() {
    let (service, _world) =
        service("[[rules]]\nname = \"trial\"\nlimit = 1\nwindow = \"1m\"\nshadow = true\n").await;
    assert_eq!(code(&ask(&service, &[("user", "ann")]).await), Code::Ok);
    let over = ask(&service, &[("user", "ann")]).await;
    assert_eq!(code(&over), Code::Ok);
    let remaining = over
        .response_headers_to_add
        .iter()
        .find(|header| header.key == "x-ratelimit-remaining")
        .map(|header| header.value.as_str());
    assert_eq!(remaining, Some("0"));
}
