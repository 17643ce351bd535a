//! Who the client is, through a real Envoy running the real `.wasm`: JWTs verified in the
//! filter or by Envoy's `jwt_authn`, API keys the controller maps, `X-Forwarded-For` behind
//! trusted proxies, and the safelist and denylist.

use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine;
use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use serde_json::{json, Value};
use sluice_e2e::envoy::{sluice_plugin_config, with_fields as with, EnvoyOptions, Filter};
use sluice_e2e::http::{self, Response};
use sluice_e2e::{repo_root, Controller, Envoy, Upstream};

const SECRET: &str = "e2e-shared-secret";

fn key_file(name: &str) -> String {
    std::fs::read_to_string(repo_root().join("filter/tests/keys").join(name)).expect("test key")
}

fn now_s() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs()
}

fn hs256(secret: &str, claims: &Value) -> String {
    encode(
        &Header::new(Algorithm::HS256),
        claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .expect("sign HS256")
}

fn rs256(claims: &Value) -> String {
    let private = key_file("rsa_private.pem");
    let mut header = Header::new(Algorithm::RS256);
    header.kid = Some("rsa-1".into());
    encode(
        &header,
        claims,
        &EncodingKey::from_rsa_pem(private.as_bytes()).expect("RSA private key"),
    )
    .expect("sign RS256")
}

fn claims(subject: &str, tier: &str, exp: u64) -> Value {
    json!({ "sub": subject, "tier": tier, "exp": exp, "iss": "https://issuer.test" })
}

/// Per user: gold clients 4 per hour, clients without a tier 2.
const TIERED_RULES: &str = r#"
[[rules]]
name = "gold"
scope = "user"
limit = 4
window = "1h"
match = { tiers = ["gold"] }

[[rules]]
name = "standard"
limit = 2
window = "1h"
match = { tiers = ["default"] }
"#;

fn envoy(filter: Filter, controller: &Controller, upstream: &Upstream) -> Envoy {
    Envoy::start(&EnvoyOptions {
        filter,
        upstream_port: upstream.port(),
        controller_ports: vec![controller.port],
        concurrency: 1,
        controller_http2: false,
    })
}

fn sluice(plugin: Value) -> Filter {
    Filter::sluice_with(&plugin)
}

fn get(envoy: &Envoy, path: &str, headers: &[(&str, &str)]) -> Response {
    http::get_with(&envoy.url(path), headers).expect("request through envoy")
}

fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

/// Statuses of `n` requests with the same headers.
fn statuses(envoy: &Envoy, n: usize, headers: &[(&str, &str)]) -> Vec<u16> {
    (0..n)
        .map(|_| get(envoy, "/items", headers).status)
        .collect()
}

fn jwt_plugin() -> Value {
    with(
        sluice_plugin_config("deny", 1_000),
        json!({ "identity": { "jwt": {
            "keys": [
                { "alg": "HS256", "secret": SECRET },
                { "kid": "rsa-1", "alg": "RS256", "pem": key_file("rsa_public.pem") }
            ],
            "issuers": ["https://issuer.test"],
            "tier_claim": "tier",
            "leeway_s": 5
        } } }),
    )
}

#[test]
fn a_valid_jwt_picks_limits_by_subject_and_tier() {
    let controller = Controller::start(TIERED_RULES, None);
    let upstream = Upstream::start();
    let envoy = envoy(sluice(jwt_plugin()), &controller, &upstream);
    let exp = now_s() + 600;

    let ann = bearer(&hs256(SECRET, &claims("ann", "gold", exp)));
    let first = get(&envoy, "/items", &[("authorization", &ann)]);
    assert_eq!(first.status, 200, "{first:?}\n{}", envoy.log());
    assert_eq!(first.number("x-ratelimit-limit"), 4, "{first:?}");
    assert!(
        first
            .header("ratelimit-policy")
            .is_some_and(|p| p.contains(r#""gold";q=4;w=3600"#)),
        "{first:?}"
    );
    assert_eq!(
        statuses(&envoy, 4, &[("authorization", &ann)]),
        [200, 200, 200, 429]
    );

    // Another gold user has a counter of their own; RS256 verifies too.
    let bob = bearer(&rs256(&claims("bob", "gold", exp)));
    assert_eq!(
        statuses(&envoy, 5, &[("authorization", &bob)]),
        [200, 200, 200, 200, 429]
    );

    // No tier: the standard limit, per user.
    let carl = bearer(&hs256(
        SECRET,
        &json!({ "sub": "carl", "exp": exp, "iss": "https://issuer.test" }),
    ));
    let response = get(&envoy, "/items", &[("authorization", &carl)]);
    assert_eq!(response.number("x-ratelimit-limit"), 2, "{response:?}");
}

#[test]
fn forged_expired_unsigned_and_confused_tokens_get_401() {
    let controller = Controller::start(TIERED_RULES, None);
    let upstream = Upstream::start();
    let envoy = envoy(sluice(jwt_plugin()), &controller, &upstream);
    let exp = now_s() + 600;
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let unsigned = format!(
        "{}.{}.",
        b64.encode(br#"{"alg":"none","typ":"JWT"}"#),
        b64.encode(claims("mallory", "gold", exp).to_string())
    );
    let cases = [
        (
            "forged",
            hs256("not-the-secret", &claims("mallory", "gold", exp)),
        ),
        (
            "expired",
            hs256(SECRET, &claims("mallory", "gold", now_s() - 60)),
        ),
        ("alg none", unsigned),
        (
            "HS256 signed with the RSA public key",
            hs256(&key_file("rsa_public.pem"), &claims("mallory", "gold", exp)),
        ),
        ("wrong issuer", {
            let mut other = claims("mallory", "gold", exp);
            other["iss"] = json!("https://evil.test");
            hs256(SECRET, &other)
        }),
    ];
    for (what, token) in cases {
        let response = get(&envoy, "/items", &[("authorization", &bearer(&token))]);
        assert_eq!(response.status, 401, "{what}: {response:?}");
        assert_eq!(response.json()["error"], "invalid_token", "{what}");
        assert!(
            response
                .header("www-authenticate")
                .is_some_and(|v| v.starts_with("Bearer")),
            "{what}: {response:?}"
        );
    }
    assert_eq!(
        envoy.stat("wasmcustom.sluice_token_rejected"),
        Some(5),
        "each refusal is counted"
    );
    // None of them reached the controller.
    assert_eq!(controller.log().matches("check call served").count(), 0);
}

#[test]
fn an_invalid_token_can_fall_through_to_the_next_identity() {
    let controller = Controller::start(TIERED_RULES, None);
    let upstream = Upstream::start();
    let mut plugin = jwt_plugin();
    plugin["identity"]["jwt"]["on_invalid"] = json!("next");
    let envoy = envoy(sluice(plugin), &controller, &upstream);
    let forged = bearer(&hs256("nope", &claims("mallory", "gold", now_s() + 600)));
    // Counted by address under the standard limit, not as a gold user.
    let response = get(&envoy, "/items", &[("authorization", &forged)]);
    assert_eq!(response.status, 200, "{response:?}");
    assert_eq!(response.number("x-ratelimit-limit"), 2);
}

/// The public half of the test RSA key as a JWK set, for `jwt_authn`.
fn rsa_jwks() -> String {
    let private = EncodingKey::from_rsa_pem(key_file("rsa_private.pem").as_bytes()).expect("key");
    let mut jwk =
        jsonwebtoken::jwk::Jwk::from_encoding_key(&private, Algorithm::RS256).expect("jwk");
    jwk.common.key_id = Some("rsa-1".into());
    json!({ "keys": [jwk] }).to_string()
}

#[test]
fn claims_verified_by_jwt_authn_pick_the_limits() {
    let controller = Controller::start(TIERED_RULES, None);
    let upstream = Upstream::start();
    let plugin = with(
        sluice_plugin_config("deny", 1_000),
        json!({ "identity": { "jwt": {
            "from_metadata": { "key": "jwt_payload" },
            "tier_claim": "tier"
        } } }),
    );
    let filter = Filter::JwtAuthnThen {
        issuer: "https://issuer.test".into(),
        jwks: rsa_jwks(),
        then: Box::new(sluice(plugin)),
    };
    let envoy = envoy(filter, &controller, &upstream);
    let dora = bearer(&rs256(&claims("dora", "gold", now_s() + 600)));
    let first = get(&envoy, "/items", &[("authorization", &dora)]);
    assert_eq!(first.status, 200, "{first:?}\n{}", envoy.log());
    assert_eq!(
        first.number("x-ratelimit-limit"),
        4,
        "gold from jwt_authn: {first:?}"
    );
    assert_eq!(
        statuses(&envoy, 4, &[("authorization", &dora)]),
        [200, 200, 200, 429]
    );
    // A token jwt_authn refuses never reaches the filter.
    let forged = bearer(&hs256("x", &claims("dora", "gold", now_s() + 600)));
    assert_eq!(
        get(&envoy, "/items", &[("authorization", &forged)]).status,
        401
    );
    // No token: jwt_authn lets it through, and the address counts (standard limit).
    let anonymous = get(&envoy, "/items", &[]);
    assert_eq!(anonymous.number("x-ratelimit-limit"), 2, "{anonymous:?}");
}

#[test]
fn api_keys_count_as_the_user_and_tier_the_controller_knows() {
    let digest = sluice_filter::identity::api_key_digest("key-of-acme");
    let rules = format!(
        "{TIERED_RULES}\n[[api_keys]]\nsha256 = \"{digest}\"\nuser = \"acme\"\ntier = \"gold\"\n"
    );
    let controller = Controller::start(&rules, None);
    let upstream = Upstream::start();
    let plugin = with(
        sluice_plugin_config("deny", 1_000),
        json!({ "identity": { "api_key_header": "x-api-key" }, "log_level": "debug" }),
    );
    // Logs at debug, where a leak would show first. (Envoy's own debug log prints every
    // request header, the key among them: only the filter's lines are Sluice's.)
    let envoy = Envoy::start_logging(
        &EnvoyOptions {
            filter: sluice(plugin),
            upstream_port: upstream.port(),
            controller_ports: vec![controller.port],
            concurrency: 1,
            controller_http2: false,
        },
        "debug",
    );
    let acme = [("x-api-key", "key-of-acme")];
    let response = get(&envoy, "/items", &acme);
    assert_eq!(response.number("x-ratelimit-limit"), 4, "{response:?}");
    let unknown = get(&envoy, "/items", &[("x-api-key", "who-knows")]);
    assert_eq!(unknown.number("x-ratelimit-limit"), 2, "{unknown:?}");
    let log = envoy.log();
    let filter_lines: Vec<&str> = log.lines().filter(|l| l.contains("wasm log")).collect();
    assert!(
        filter_lines.iter().any(|l| l.contains("[debug]")),
        "the filter logs at debug here: {filter_lines:?}"
    );
    for secret in ["key-of-acme", "who-knows"] {
        assert!(
            !controller.log().contains(secret),
            "API keys are never logged in clear"
        );
        assert!(
            !filter_lines.iter().any(|l| l.contains(secret)),
            "API keys are never logged in clear: {filter_lines:?}"
        );
        assert!(
            log.contains(secret),
            "Envoy's own debug log does show request headers"
        );
    }
}

const TWO_PER_CLIENT: &str = "[[rules]]\nname = \"per-client\"\nlimit = 2\nwindow = \"1h\"\n";

#[test]
fn a_spoofed_forwarded_for_does_not_change_the_identity() {
    let controller = Controller::start(TWO_PER_CLIENT, None);
    let upstream = Upstream::start();

    // No trusted proxy: the header is ignored, the peer (127.0.0.1) is the client.
    let direct = envoy(
        sluice(sluice_plugin_config("deny", 1_000)),
        &controller,
        &upstream,
    );
    let spoofs: Vec<u16> = ["1.1.1.1", "2.2.2.2", "3.3.3.3"]
        .iter()
        .map(|spoof| get(&direct, "/items", &[("x-forwarded-for", spoof)]).status)
        .collect();
    assert_eq!(spoofs, [200, 200, 429]);

    // One trusted proxy in front (played by the test client): the address it appended
    // counts; whatever the client wrote to its left does not.
    let behind_proxy = envoy(
        sluice(with(
            sluice_plugin_config("deny", 1_000),
            json!({ "identity": { "ip": { "trusted_hops": 1 } } }),
        )),
        &controller,
        &upstream,
    );
    let spoofed: Vec<u16> = ["1.1.1.1", "5.5.5.5, 6.6.6.6", "garbage"]
        .iter()
        .map(|spoof| {
            let header = format!("{spoof}, 198.51.100.4");
            get(&behind_proxy, "/items", &[("x-forwarded-for", &header)]).status
        })
        .collect();
    assert_eq!(spoofed, [200, 200, 429], "one client, whatever it wrote");
    // The proxy may append its entry as a header line of its own: the lines read as one
    // list, so the client's line is still to the left of the trusted entry.
    let two_lines = get(
        &behind_proxy,
        "/items",
        &[
            ("x-forwarded-for", "7.7.7.7"),
            ("x-forwarded-for", "198.51.100.4"),
        ],
    );
    assert_eq!(
        two_lines.status, 429,
        "the same client, its address on a second line: {two_lines:?}"
    );
    let other = get(
        &behind_proxy,
        "/items",
        &[("x-forwarded-for", "198.51.100.5")],
    );
    assert_eq!(
        other.status, 200,
        "another client behind the proxy: {other:?}"
    );
}

#[test]
fn safelisted_requests_skip_the_limiter_and_denylisted_ones_get_403() {
    let digest = sluice_filter::identity::api_key_digest;
    let configuration = format!(
        r#"{TWO_PER_CLIENT}
[[safelist]]
kind = "path"
value = "/public/**"

[[safelist]]
kind = "api_key"
value = "{}"

[[denylist]]
kind = "api_key"
value = "{}"

[[denylist]]
kind = "path"
value = "/admin/*"
"#,
        digest("trusted-key"),
        digest("banned-key")
    );
    let controller = Controller::start(&configuration, None);
    let upstream = Upstream::start();
    let plugin = with(
        sluice_plugin_config("deny", 1_000),
        json!({ "identity": { "api_key_header": "x-api-key" } }),
    );
    let envoy = envoy(sluice(plugin), &controller, &upstream);
    // The lists are the controller's: the filter has them once it has read them (each VM,
    // the main thread's and the worker's, on its first tick).
    envoy.wait_until_vms_read_the_configuration(2);
    for _ in 0..4 {
        let response = get(&envoy, "/public/a/b", &[]);
        assert_eq!(response.status, 200, "{response:?}");
        assert_eq!(
            response.header("x-ratelimit-limit"),
            None,
            "no limit applied"
        );
        let trusted = get(&envoy, "/items", &[("x-api-key", "trusted-key")]);
        assert_eq!(trusted.status, 200, "{trusted:?}");
    }
    for (path, key) in [("/items", "banned-key"), ("/admin/users", "any")] {
        let response = get(&envoy, path, &[("x-api-key", key)]);
        assert_eq!(response.status, 403, "{path}: {response:?}");
        assert_eq!(response.json()["error"], "forbidden");
    }
    // Health and metrics paths are exempt by default.
    for _ in 0..3 {
        assert_eq!(get(&envoy, "/healthz", &[]).status, 200);
    }
    assert_eq!(controller.log().matches("check call served").count(), 0);
    assert_eq!(envoy.stat("wasmcustom.sluice_safelisted"), Some(8));
    assert_eq!(envoy.stat("wasmcustom.sluice_denylisted"), Some(2));
}

#[test]
fn rules_select_requests_by_header_once_the_filter_has_read_them() {
    let rules = r#"
        [[rules]]
        name = "pro-plan"
        limit = 1
        window = "1h"
        match = { headers = [{ name = "X-Plan", value = "pro" }] }
    "#;
    let controller = Controller::start(rules, None);
    let upstream = Upstream::start();
    let mut plugin = sluice_plugin_config("deny", 1_000);
    plugin["controller"]["config_poll_ms"] = json!(1_000);
    let envoy = envoy(sluice(plugin), &controller, &upstream);
    sluice_e2e::wait_until(
        "the filter read the rules",
        std::time::Duration::from_secs(15),
        || envoy.stat("wasmcustom.sluice_config_reads").unwrap_or(0) >= 2,
    );
    let pro = [("x-plan", "pro")];
    assert_eq!(statuses(&envoy, 2, &pro), [200, 429]);
    let free = get(&envoy, "/items", &[("x-plan", "free")]);
    assert_eq!(free.status, 200, "{free:?}");
    assert_eq!(
        free.header("x-ratelimit-limit"),
        None,
        "no rule applies: {free:?}"
    );
    assert_eq!(get(&envoy, "/items", &[]).status, 200);
}
