//! Who the client is: the first identity found in the configured order (by default the
//! user of a verified JWT, then an API key, then a configured header, then the client's
//! address). The address is always established too, for rules and lists that use it.
//!
//! It is found in two steps, so that the denylist can be asked in between: what costs
//! nothing to read ([`before_token`]: the address, the API key's digest, the client header)
//! and then the token ([`with_token`]), whose signature may cost a millisecond and a half
//! of CPU (RS256 in wasm). A client denylisted by address or key is refused before its
//! token is looked at.
//!
//! No identity leaves the filter longer than [`MAX_IDENTITY_BYTES`]: a longer client header
//! value, subject or tier is sent, listed, counted and logged as `sha256:<hex>` of its
//! bytes (see [`bounded_identity`]), so that the controller's keys, sketches and logs never
//! hold it whole.

use std::cell::RefCell;
use std::net::IpAddr;

use serde::Deserialize;
use sha2::{Digest, Sha256};
use sluice_protocol::{ClientId, ClientKind};

use crate::client::{self, IpPolicy, UNKNOWN_CLIENT};
use crate::jwt::{self, Claims, JwtVerifier, TokenError};

/// Longest identity (client header value, subject, tier) sent as it is; a longer one (or a
/// client header value that is not UTF-8) goes as `sha256:<hex>` of its bytes.
pub use sluice_protocol::MAX_IDENTITY_BYTES;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Source {
    Jwt,
    ApiKey,
    Header,
    Ip,
}

/// What happens to a request whose token is present but not valid.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnInvalidToken {
    /// 401 with a JSON body.
    Reject,
    /// Identify the client by the next source, as if it had sent no token.
    Next,
}

/// Where Envoy's `jwt_authn` filter left the payload it verified (`payload_in_metadata`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JwtMetadata {
    pub filter: String,
    pub key: String,
}

#[derive(Debug)]
pub struct JwtSettings {
    /// Lower-case header the token comes in; `authorization` expects `Bearer <token>`.
    pub header: String,
    pub on_invalid: OnInvalidToken,
    /// Claims already verified by `jwt_authn`, read instead of verifying again.
    pub metadata: Option<JwtMetadata>,
    pub subject_claim: String,
    pub tier_claim: Option<String>,
    /// Verifies tokens in the filter; `None` when only `jwt_authn`'s metadata is used.
    pub verifier: Option<RefCell<JwtVerifier>>,
}

#[derive(Debug)]
pub struct IdentityConfig {
    pub order: Vec<Source>,
    pub jwt: Option<JwtSettings>,
    /// Lower-case header carrying an API key.
    pub api_key_header: Option<String>,
    /// Lower-case header naming the client (set by a trusted component in front).
    pub client_header: Option<String>,
    pub ip: IpPolicy,
}

impl Default for IdentityConfig {
    fn default() -> Self {
        IdentityConfig {
            order: vec![Source::Jwt, Source::ApiKey, Source::Header, Source::Ip],
            jwt: None,
            api_key_header: None,
            client_header: None,
            ip: IpPolicy::default(),
        }
    }
}

/// What the host read from the request, only what the configuration needs.
#[derive(Debug, Default)]
pub struct Facts<'a> {
    /// Envoy's `source.address`.
    pub peer: Option<&'a str>,
    pub forwarded_for: Option<&'a str>,
    /// The value of the JWT header.
    pub token_header: Option<&'a str>,
    /// Subject and tier from `jwt_authn`'s metadata.
    pub verified_claims: Option<Claims>,
    /// Bytes as the client sent them: a key is hashed whatever it holds.
    pub api_key: Option<&'a [u8]>,
    pub client_header: Option<&'a [u8]>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// Whom per-client limits count.
    pub client: ClientId,
    pub ip: Option<IpAddr>,
    /// The address as limits count it (IPv6 by prefix).
    pub counted_ip: String,
    pub user: Option<String>,
    pub tier: Option<String>,
    /// SHA-256 (hex) of the API key.
    pub api_key: Option<String>,
    /// The request carried a token that failed verification, passed over as configured
    /// (`on_invalid: next`); it still counts against the address (brute-force protection).
    pub invalid_token: bool,
}

/// A request refused for its invalid token, and the address it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejected {
    pub error: TokenError,
    pub counted_ip: String,
}

/// SHA-256 of an API key, in hex: how keys are sent, listed and logged.
pub fn api_key_digest(key: impl AsRef<[u8]>) -> String {
    sha256_hex(key.as_ref())
}

fn sha256_hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    Sha256::digest(bytes)
        .iter()
        .fold(String::with_capacity(64), |mut hex, byte| {
            let _ = write!(hex, "{byte:02x}");
            hex
        })
}

/// A header value without surrounding whitespace; an empty one is no value.
fn present(value: Option<&[u8]>) -> Option<&[u8]> {
    value.map(<[u8]>::trim_ascii).filter(|v| !v.is_empty())
}

/// How a client header's value counts: as it is, or as `sha256:<hex>` of its bytes when it
/// is longer than [`MAX_IDENTITY_BYTES`] or not UTF-8, so that no two values share a
/// counter and none is silently dropped for the address.
pub fn client_header_identity(value: &[u8]) -> String {
    match std::str::from_utf8(value) {
        Ok(text) if text.len() <= MAX_IDENTITY_BYTES => text.to_owned(),
        _ => hashed_identity(value),
    }
}

fn hashed_identity(value: &[u8]) -> String {
    format!("sha256:{}", sha256_hex(value))
}

/// An identity (a subject or tier from a token or from `jwt_authn`) as the filter sends,
/// lists and logs it: as it is up to [`MAX_IDENTITY_BYTES`], else `sha256:<hex>` of its
/// bytes (71 bytes). Two values still never share a counter; a denylist entry for such a
/// user names the digest.
pub fn bounded_identity(value: String) -> String {
    if value.len() <= MAX_IDENTITY_BYTES {
        value
    } else {
        hashed_identity(value.as_bytes())
    }
}

impl IdentityConfig {
    /// Whether [`identify`] reads `X-Forwarded-For` (only behind trusted proxies).
    pub fn wants_forwarded_for(&self) -> bool {
        self.ip.trust != client::ProxyTrust::Nobody
    }
}

/// What is known of the client before its token is looked at: everything that costs no
/// more than a hash to establish.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Known {
    pub ip: Option<IpAddr>,
    pub counted_ip: String,
    /// SHA-256 (hex) of the API key.
    pub api_key: Option<String>,
    /// The client header's value as it counts (see [`client_header_identity`]).
    pub header: Option<String>,
}

impl Known {
    /// The request's identity as far as it is known (no user, no tier): enough for the
    /// denylist's addresses, networks, keys and paths.
    pub fn identity(&self) -> Identity {
        Identity {
            client: ClientId::ip(self.counted_ip.clone()),
            ip: self.ip,
            counted_ip: self.counted_ip.clone(),
            user: None,
            tier: None,
            api_key: self.api_key.clone(),
            invalid_token: false,
        }
    }
}

/// The first step of [`identify`]: the address, the API key and the client header (the
/// token and `jwt_authn`'s claims in `facts` are not looked at).
pub fn before_token(config: &IdentityConfig, facts: &Facts<'_>) -> Known {
    let ip = client::client_ip(facts.peer, facts.forwarded_for, &config.ip);
    let counted_ip = ip.map_or_else(
        || UNKNOWN_CLIENT.to_owned(),
        |ip| client::counted_ip(ip, config.ip.ipv6_prefix),
    );
    let api_key = config
        .api_key_header
        .as_ref()
        .and_then(|_| present(facts.api_key))
        .map(api_key_digest);
    let header = config
        .client_header
        .as_ref()
        .and_then(|_| present(facts.client_header))
        .map(client_header_identity);
    Known {
        ip,
        counted_ip,
        api_key,
        header,
    }
}

/// Identifies the client at `now_s`. Fails only for a token that is present and invalid
/// while the configuration says to reject such requests.
pub fn identify(
    config: &IdentityConfig,
    facts: &Facts<'_>,
    now_s: u64,
) -> Result<Identity, Rejected> {
    with_token(config, before_token(config, facts), facts, now_s)
}

/// The second step of [`identify`]: the token (verified here, or `jwt_authn`'s claims),
/// then the first identity in the configured order.
pub fn with_token(
    config: &IdentityConfig,
    known: Known,
    facts: &Facts<'_>,
    now_s: u64,
) -> Result<Identity, Rejected> {
    let Known {
        ip,
        counted_ip,
        api_key,
        header,
    } = known;
    let (claims, invalid_token) = match &config.jwt {
        Some(settings) => match jwt_claims(settings, facts, now_s) {
            Ok(Verified::Claims(claims)) => (Some(claims), false),
            Ok(Verified::NoToken) => (None, false),
            Ok(Verified::PassedOver) => (None, true),
            Err(error) => return Err(Rejected { error, counted_ip }),
        },
        None => (None, false),
    };
    let client = config
        .order
        .iter()
        .find_map(|source| match source {
            Source::Jwt => claims
                .as_ref()
                .map(|c| ClientId::new(ClientKind::User, c.subject.clone())),
            Source::ApiKey => api_key
                .as_ref()
                .map(|digest| ClientId::new(ClientKind::ApiKey, digest.clone())),
            Source::Header => header
                .as_ref()
                .map(|value| ClientId::new(ClientKind::Header, value.clone())),
            Source::Ip => Some(ClientId::ip(counted_ip.clone())),
        })
        // Nobody identified by the sources in the order: the address still counts.
        .unwrap_or_else(|| ClientId::ip(counted_ip.clone()));
    let (user, tier) = match claims {
        Some(Claims { subject, tier }) => (Some(subject), tier),
        None => (None, None),
    };
    Ok(Identity {
        client,
        ip,
        counted_ip,
        user,
        tier,
        api_key,
        invalid_token,
    })
}

/// What became of a request's token.
enum Verified {
    Claims(Claims),
    NoToken,
    /// Invalid, and the configuration says to pass over it.
    PassedOver,
}

/// The claims of the request's JWT: from `jwt_authn`'s metadata when configured and
/// present, else from the token, verified here. Either way bounded (see
/// [`bounded_identity`]).
fn jwt_claims(
    settings: &JwtSettings,
    facts: &Facts<'_>,
    now_s: u64,
) -> Result<Verified, TokenError> {
    if let Some(claims) = &facts.verified_claims {
        return Ok(Verified::Claims(Claims {
            subject: bounded_identity(claims.subject.clone()),
            tier: claims.tier.clone().map(bounded_identity),
        }));
    }
    let Some(verifier) = &settings.verifier else {
        return Ok(Verified::NoToken);
    };
    let token = facts
        .token_header
        .and_then(|value| jwt::bearer_token(value, settings.header == "authorization"));
    let Some(token) = token else {
        return Ok(Verified::NoToken);
    };
    match verifier.borrow_mut().verify(token, now_s) {
        Ok(claims) => Ok(Verified::Claims(claims)),
        Err(error) => match settings.on_invalid {
            OnInvalidToken::Reject => Err(error),
            OnInvalidToken::Next => Ok(Verified::PassedOver),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::ProxyTrust;
    use crate::jwt::{Expectations, VerifyingKey};
    use jsonwebtoken::{encode, Algorithm, DecodingKey, EncodingKey, Header};
    use serde_json::json;

    const NOW: u64 = 1_800_000_000;

    fn settings(on_invalid: OnInvalidToken) -> JwtSettings {
        let verifier = JwtVerifier::new(
            vec![VerifyingKey {
                kid: None,
                algorithm: Algorithm::HS256,
                key: DecodingKey::from_secret(b"k"),
            }],
            Expectations {
                subject_claim: "sub".into(),
                tier_claim: Some("tier".into()),
                leeway_s: 0,
                ..Expectations::default()
            },
            8,
        );
        JwtSettings {
            header: "authorization".into(),
            on_invalid,
            metadata: None,
            subject_claim: "sub".into(),
            tier_claim: Some("tier".into()),
            verifier: Some(RefCell::new(verifier)),
        }
    }

    fn config(on_invalid: OnInvalidToken) -> IdentityConfig {
        IdentityConfig {
            jwt: Some(settings(on_invalid)),
            api_key_header: Some("x-api-key".into()),
            client_header: Some("x-client-id".into()),
            ..IdentityConfig::default()
        }
    }

    fn bearer(secret: &str) -> String {
        let token = encode(
            &Header::new(Algorithm::HS256),
            &json!({"sub": "ann", "tier": "gold", "exp": NOW + 60}),
            &EncodingKey::from_secret(secret.as_bytes()),
        )
        .unwrap();
        format!("Bearer {token}")
    }

    #[test]
    fn the_default_order_is_user_then_key_then_header_then_ip() {
        let config = config(OnInvalidToken::Reject);
        let token = bearer("k");
        let mut facts = Facts {
            peer: Some("192.0.2.1:5000"),
            token_header: Some(&token),
            api_key: Some(b"key-1"),
            client_header: Some(b"tenant-7"),
            ..Facts::default()
        };
        let who = |facts: &Facts<'_>| identify(&config, facts, NOW).unwrap();
        let identity = who(&facts);
        assert_eq!(identity.client, ClientId::new(ClientKind::User, "ann"));
        assert_eq!(identity.tier.as_deref(), Some("gold"));
        assert_eq!(identity.api_key, Some(api_key_digest("key-1")));
        assert_eq!(identity.counted_ip, "192.0.2.1");
        facts.token_header = None;
        assert_eq!(
            who(&facts).client,
            ClientId::new(ClientKind::ApiKey, api_key_digest("key-1"))
        );
        facts.api_key = None;
        assert_eq!(
            who(&facts).client,
            ClientId::new(ClientKind::Header, "tenant-7")
        );
        facts.client_header = None;
        assert_eq!(who(&facts).client, ClientId::ip("192.0.2.1"));
        facts.peer = None;
        assert_eq!(who(&facts).client, ClientId::ip(UNKNOWN_CLIENT));
    }

    #[test]
    fn the_order_is_configurable() {
        let config = IdentityConfig {
            order: vec![Source::Header, Source::Jwt],
            ..config(OnInvalidToken::Reject)
        };
        let token = bearer("k");
        let facts = Facts {
            peer: Some("192.0.2.1:5000"),
            token_header: Some(&token),
            client_header: Some(b"tenant-7"),
            ..Facts::default()
        };
        let identity = identify(&config, &facts, NOW).unwrap();
        assert_eq!(
            identity.client,
            ClientId::new(ClientKind::Header, "tenant-7")
        );
        assert_eq!(
            identity.user.as_deref(),
            Some("ann"),
            "the user is still known"
        );
    }

    #[test]
    fn an_invalid_token_rejects_or_falls_through_as_configured() {
        let forged = bearer("wrong");
        let facts = Facts {
            peer: Some("192.0.2.1:5000"),
            token_header: Some(&forged),
            ..Facts::default()
        };
        let rejected = identify(&config(OnInvalidToken::Reject), &facts, NOW).unwrap_err();
        assert_eq!(rejected.counted_ip, "192.0.2.1", "the address it came from");
        let identity = identify(&config(OnInvalidToken::Next), &facts, NOW).unwrap();
        assert_eq!(identity.client, ClientId::ip("192.0.2.1"));
        assert_eq!(identity.user, None, "a refused token names nobody");
        assert!(
            identity.invalid_token,
            "passed over, but still seen as invalid"
        );
    }

    #[test]
    fn jwt_authn_claims_are_taken_without_verifying() {
        let config = config(OnInvalidToken::Reject);
        let facts = Facts {
            peer: Some("192.0.2.1:5000"),
            token_header: Some("Bearer not-even-a-token"),
            verified_claims: Some(Claims {
                subject: "bob".into(),
                tier: Some("silver".into()),
            }),
            ..Facts::default()
        };
        let identity = identify(&config, &facts, NOW).unwrap();
        assert_eq!(identity.client, ClientId::new(ClientKind::User, "bob"));
        assert_eq!(identity.tier.as_deref(), Some("silver"));
    }

    #[test]
    fn long_or_binary_keys_and_headers_still_name_their_client() {
        let config = IdentityConfig {
            order: vec![Source::Header, Source::ApiKey, Source::Ip],
            ..config(OnInvalidToken::Reject)
        };
        let who = |api_key: Option<&[u8]>, header: Option<&[u8]>| {
            let facts = Facts {
                peer: Some("192.0.2.1:5000"),
                api_key,
                client_header: header,
                ..Facts::default()
            };
            identify(&config, &facts, NOW).unwrap()
        };
        let huge = vec![b'k'; MAX_IDENTITY_BYTES + 1];
        let binary: &[u8] = b"caf\xe9 \xff\xfe";
        for value in [&huge[..], binary] {
            let hashed = format!("sha256:{}", api_key_digest(value));
            assert_eq!(
                who(None, Some(value)).client,
                ClientId::new(ClientKind::Header, hashed),
                "a header value is never dropped for the address"
            );
            let by_key = who(Some(value), None);
            assert_eq!(
                by_key.client,
                ClientId::new(ClientKind::ApiKey, api_key_digest(value))
            );
        }
        let mut other = huge.clone();
        other[0] = b'j';
        assert_ne!(
            who(None, Some(&huge)).client,
            who(None, Some(&other)).client
        );
        assert_eq!(
            who(None, Some(b"  tenant-7 ")).client,
            ClientId::new(ClientKind::Header, "tenant-7")
        );
        assert_eq!(who(None, Some(b"   ")).client, ClientId::ip("192.0.2.1"));
    }

    #[test]
    fn long_claims_from_jwt_authn_are_their_digest() {
        let config = config(OnInvalidToken::Reject);
        let long = "s".repeat(MAX_IDENTITY_BYTES + 1);
        let facts = Facts {
            peer: Some("192.0.2.1:5000"),
            verified_claims: Some(Claims {
                subject: long.clone(),
                tier: Some(long.clone()),
            }),
            ..Facts::default()
        };
        let identity = identify(&config, &facts, NOW).unwrap();
        let digest = format!("sha256:{}", api_key_digest(&long));
        assert_eq!(
            identity.client,
            ClientId::new(ClientKind::User, digest.clone())
        );
        assert_eq!(identity.user.as_deref(), Some(digest.as_str()));
        assert_eq!(identity.tier.as_deref(), Some(digest.as_str()));
        let exact = "s".repeat(MAX_IDENTITY_BYTES);
        assert_eq!(bounded_identity(exact.clone()), exact);
        assert_eq!(
            client_header_identity(exact.as_bytes()),
            exact,
            "at the bound: as it is"
        );
    }

    #[test]
    fn what_is_known_before_the_token_costs_no_verification() {
        let config = config(OnInvalidToken::Reject);
        let token = bearer("k");
        let facts = Facts {
            peer: Some("192.0.2.1:5000"),
            token_header: Some(&token),
            api_key: Some(b"key-1"),
            client_header: Some(b"tenant-7"),
            ..Facts::default()
        };
        let known = before_token(&config, &facts);
        let verifier = config.jwt.as_ref().unwrap().verifier.as_ref().unwrap();
        assert_eq!(verifier.borrow().signature_checks(), 0, "the token waits");
        let partial = known.identity();
        assert_eq!(partial.counted_ip, "192.0.2.1");
        assert_eq!(partial.api_key, Some(api_key_digest("key-1")));
        assert_eq!(partial.user, None);
        let whole = with_token(&config, known, &facts, NOW).unwrap();
        assert_eq!(verifier.borrow().signature_checks(), 1);
        assert_eq!(whole, identify(&config, &facts, NOW).unwrap());
        assert_eq!(whole.user.as_deref(), Some("ann"));
    }

    #[test]
    fn forwarded_for_counts_only_behind_trusted_proxies() {
        let mut config = config(OnInvalidToken::Reject);
        let facts = Facts {
            peer: Some("10.0.0.2:5000"),
            forwarded_for: Some("6.6.6.6, 198.51.100.4"),
            ..Facts::default()
        };
        assert_eq!(
            identify(&config, &facts, NOW).unwrap().counted_ip,
            "10.0.0.2"
        );
        config.ip.trust = ProxyTrust::Hops(1);
        config.ip.envoy_appends = false;
        assert_eq!(
            identify(&config, &facts, NOW).unwrap().counted_ip,
            "198.51.100.4"
        );
    }

    #[test]
    fn api_key_digest_is_sha256_hex() {
        assert_eq!(
            api_key_digest("test"),
            "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
        );
    }
}
