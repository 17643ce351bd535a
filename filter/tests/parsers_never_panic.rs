//! Every parser of untrusted input, fed arbitrary input: it may refuse, it must not panic
//! (a panic kills the worker's VM, and every later request on it fails).
//!
//! `make test` runs a bounded number of cases; for a longer run by hand:
//! `PROPTEST_CASES=200000 cargo test -p sluice-filter --release --test parsers_never_panic`.

use proptest::prelude::*;
use sluice_filter::client::{self, IpPolicy, ProxyTrust};
use sluice_filter::config::FilterConfig;
use sluice_filter::decision::{self, cost_from_header};
use sluice_filter::denial;
use sluice_filter::jwt::{bearer_token, Expectations, JwtVerifier, VerifyingKey};
use sluice_protocol::rules::{glob_matches, PathPattern};

fn config() -> ProptestConfig {
    // PROPTEST_CASES in the environment overrides this (proptest reads it itself).
    ProptestConfig::with_cases(512)
}

/// Text that looks like what the parsers expect, often enough to get past the first check.
fn header_like() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<String>(),
        "[0-9a-fA-F:.\\[\\], ]{0,64}",
        "(Bearer |bearer |Basic )?[A-Za-z0-9_.=-]{0,80}",
        "[0-9]{0,30}",
    ]
}

/// A JSON document near the plugin configuration's shape.
fn config_like() -> impl Strategy<Value = Vec<u8>> {
    let keys = prop_oneof![
        Just("controller"),
        Just("failure_mode"),
        Just("identity"),
        Just("jwt"),
        Just("keys"),
        Just("alg"),
        Just("pem"),
        Just("secret"),
        Just("ip"),
        Just("trusted_hops"),
        Just("trusted_proxies"),
        Just("safelist"),
        Just("ips"),
        Just("paths"),
        Just("denial_cache"),
        Just("slots"),
        Just("headers"),
    ];
    let leaf = prop_oneof![
        Just(serde_json::json!(null)),
        any::<i64>().prop_map(|n| serde_json::json!(n)),
        any::<bool>().prop_map(|b| serde_json::json!(b)),
        header_like().prop_map(|s| serde_json::json!(s)),
        Just(serde_json::json!({"cluster": "c"})),
        Just(serde_json::json!("HS256")),
        Just(serde_json::json!(["10.0.0.0/8", "::1", "300.1.1.1/99"])),
    ];
    let value = leaf.prop_recursive(4, 32, 6, move |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(serde_json::Value::Array),
            prop::collection::vec((keys.clone(), inner), 0..5).prop_map(|pairs| {
                serde_json::Value::Object(
                    pairs.into_iter().map(|(k, v)| (k.to_owned(), v)).collect(),
                )
            }),
        ]
    });
    prop_oneof![
        value.prop_map(|v| v.to_string().into_bytes()),
        prop::collection::vec(any::<u8>(), 0..256),
    ]
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn plugin_configuration_parsing_never_panics(bytes in config_like()) {
        let _ = FilterConfig::parse(&bytes);
        let mut with_controller = serde_json::json!({"controller": {"cluster": "c"}});
        if let Ok(extra) = serde_json::from_slice::<serde_json::Value>(&bytes) {
            if let Some(map) = extra.as_object() {
                for (key, value) in map {
                    with_controller[key] = value.clone();
                }
            }
        }
        let _ = FilterConfig::parse(with_controller.to_string().as_bytes());
    }

    #[test]
    fn forwarded_for_and_peer_parsing_never_panics(
        peer in proptest::option::of(header_like()),
        forwarded in proptest::option::of(header_like()),
        hops in 0usize..40,
        prefix in 0u8..=200,
        appends in any::<bool>(),
    ) {
        for trust in [
            ProxyTrust::Nobody,
            ProxyTrust::Hops(hops),
            ProxyTrust::Networks(vec!["10.0.0.0/8".parse().unwrap(), "::/0".parse().unwrap()]),
        ] {
            let policy = IpPolicy { trust, ipv6_prefix: prefix, envoy_appends: appends };
            if let Some(ip) = client::client_ip(peer.as_deref(), forwarded.as_deref(), &policy) {
                let _ = client::counted_ip(ip, prefix);
            }
        }
    }

    #[test]
    fn request_header_parsing_never_panics(value in header_like()) {
        let _ = cost_from_header(Some(&value));
        let _ = bearer_token(&value, true);
        let _ = bearer_token(&value, false);
        let _ = decision::path_only(&value);
        let _ = client::peer_ip(&value);
    }

    #[test]
    fn token_verification_never_panics(token in prop_oneof![
        any::<String>(),
        "[A-Za-z0-9_-]{0,40}\\.[A-Za-z0-9_-]{0,80}\\.[A-Za-z0-9_-]{0,40}",
        "eyJhbGciOiJIUzI1NiJ9\\.[A-Za-z0-9_-]{0,80}\\.[A-Za-z0-9_-]{0,43}",
    ]) {
        let mut verifier = JwtVerifier::new(
            vec![VerifyingKey {
                kid: None,
                algorithm: jsonwebtoken::Algorithm::HS256,
                key: jsonwebtoken::DecodingKey::from_secret(b"k"),
            }],
            Expectations { subject_claim: "sub".into(), ..Expectations::default() },
            4,
        );
        prop_assert!(verifier.verify(&token, 1_800_000_000).is_err(), "an unsigned guess verified");
    }

    #[test]
    fn denial_cache_slots_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..64), fp in any::<u64>(), now in any::<u64>()) {
        let _ = denial::lookup(&bytes, fp, now);
    }

    #[test]
    fn glob_matching_never_panics_and_compiled_patterns_agree(glob in "[a-z/*]{0,12}", path in "[a-z/]{0,24}") {
        let matched = glob_matches(glob.as_bytes(), path.as_bytes());
        prop_assert_eq!(PathPattern::new(&glob).matches(&path), matched);
    }
}
