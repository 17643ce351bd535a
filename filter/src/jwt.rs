//! Verifying JWTs inside the filter, with the algorithm pinned per key, and remembering
//! tokens already verified (an RS256 verification costs about 1.6 ms of CPU in wasm), and
//! tokens already refused.
//!
//! The work a token can cause is bounded: it is checked only against the configured keys
//! of the algorithm its header names (and of its `kid`, when it names one that a key has),
//! so a token costs at most as many signature checks as there are such keys, N (one in the
//! usual configuration of one key per algorithm, or one per `kid`). A token refused after a
//! signature check is remembered for [`REFUSED_FOR_S`] seconds, by its SHA-256: repeating
//! a forged token costs at most N verifications once, then a hash and a lookup. Tokens
//! refused before any signature check (malformed, too long, an algorithm no key has) are
//! not remembered: refusing them again costs no more than looking them up, and they must
//! not push out the tokens whose refusal was dear.

use std::collections::{HashMap, VecDeque};

use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

/// Longest token looked at; anything longer is refused before any parsing.
pub const MAX_TOKEN_BYTES: usize = 8 * 1024;

/// A key a token may be signed with, and the one algorithm it verifies.
pub struct VerifyingKey {
    pub kid: Option<String>,
    pub algorithm: Algorithm,
    pub key: DecodingKey,
}

impl std::fmt::Debug for VerifyingKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VerifyingKey")
            .field("kid", &self.kid)
            .field("algorithm", &self.algorithm)
            .finish_non_exhaustive()
    }
}

/// What is checked besides the signature.
#[derive(Debug, Clone, Default)]
pub struct Expectations {
    /// The token's `iss` must be one of these (when any are set).
    pub issuers: Vec<String>,
    /// The token's `aud` must name one of these (when any are set).
    pub audiences: Vec<String>,
    /// Seconds of clock skew allowed on `exp` and `nbf`.
    pub leeway_s: u64,
    pub subject_claim: String,
    pub tier_claim: Option<String>,
}

/// Who a verified token says the client is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claims {
    pub subject: String,
    pub tier: Option<String>,
}

/// Why a token was refused; shown to the client in the 401 body and logged.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("the token is longer than {MAX_TOKEN_BYTES} bytes")]
    TooLong,
    #[error("the token is malformed or uses an algorithm that is not accepted ({0})")]
    Malformed(String),
    #[error("no configured key verifies {0} tokens with this key id")]
    NoKey(String),
    #[error("the signature or a claim is invalid ({0})")]
    Invalid(String),
    #[error("the token has expired")]
    Expired,
    #[error("the token is not valid yet")]
    NotYetValid,
    #[error("the token has no `exp` claim")]
    NoExpiry,
    #[error("the token has no string claim `{0}`")]
    NoSubject(String),
}

/// How long a token refused after a signature check is refused again without another one.
/// Every refusal but `NotYetValid` holds for good (the keys and expectations are fixed for
/// the VM's life), so this only bounds how late a token valid from a moment slightly past
/// the leeway is taken.
pub const REFUSED_FOR_S: u64 = 10;

/// Most refused tokens remembered per worker (each about 100 bytes).
pub const REFUSED_CACHE_SIZE: usize = 4_096;

#[derive(Debug)]
pub struct JwtVerifier {
    /// Each key with the validation of its algorithm, built once.
    keys: Vec<(VerifyingKey, Validation)>,
    expectations: Expectations,
    cache: TokenCache<Claims>,
    refused: TokenCache<TokenError>,
    /// Signature checks made since the verifier was built (for the log and tests).
    signature_checks: u64,
}

impl JwtVerifier {
    pub fn new(keys: Vec<VerifyingKey>, expectations: Expectations, cache_size: usize) -> Self {
        let keys = keys
            .into_iter()
            .map(|key| {
                let validation = validation(key.algorithm, &expectations);
                (key, validation)
            })
            .collect();
        JwtVerifier {
            keys,
            expectations,
            cache: TokenCache::new(cache_size),
            refused: TokenCache::new(REFUSED_CACHE_SIZE),
            signature_checks: 0,
        }
    }

    /// Verifies `token` at `now_s` (seconds since the epoch), or answers from the cache of
    /// tokens verified before, which holds a token until its `exp` (plus leeway), or from
    /// the cache of tokens refused after a signature check, which holds one for
    /// [`REFUSED_FOR_S`].
    pub fn verify(&mut self, token: &str, now_s: u64) -> Result<Claims, TokenError> {
        if token.len() > MAX_TOKEN_BYTES {
            return Err(TokenError::TooLong);
        }
        let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        if let Some(claims) = self.cache.get(&digest, now_s) {
            return Ok(claims);
        }
        if let Some(error) = self.refused.get(&digest, now_s) {
            return Err(error);
        }
        let (verified, checks) = self.verify_uncached(token, now_s);
        self.signature_checks = self.signature_checks.saturating_add(checks);
        match verified {
            Ok((claims, valid_until)) => {
                self.cache.insert(digest, claims.clone(), valid_until);
                Ok(claims)
            }
            Err(error) => {
                if checks > 0 {
                    let until = now_s.saturating_add(REFUSED_FOR_S);
                    self.refused.insert(digest, error.clone(), until);
                }
                Err(error)
            }
        }
    }

    /// Signature checks made since the verifier was built: a verification that was not
    /// answered from a cache made at least one, at most [`JwtVerifier::most_checks_for`].
    pub fn signature_checks(&self) -> u64 {
        self.signature_checks
    }

    /// The keys a token of `algorithm` (with key id `kid`) is checked against, in order.
    fn candidates<'a>(
        &'a self,
        algorithm: Algorithm,
        kid: Option<&'a str>,
    ) -> impl Iterator<Item = &'a (VerifyingKey, Validation)> + 'a {
        // The algorithm is the key's, never the token's: a token can only pick among keys
        // configured for the algorithm it names (no `none`, no HMAC with a public key).
        // A `kid` that a key of the algorithm has picks that key (and the keys without
        // one); a token without a `kid` may be signed by any key of its algorithm.
        self.keys.iter().filter(move |(key, _)| {
            key.algorithm == algorithm
                && match (kid, &key.kid) {
                    (Some(wanted), Some(kid)) => wanted == kid,
                    _ => true,
                }
        })
    }

    /// The most signature checks one token of `algorithm` (and `kid`) can cost: N, the
    /// number of keys it is checked against.
    pub fn most_checks_for(&self, algorithm: Algorithm, kid: Option<&str>) -> usize {
        self.candidates(algorithm, kid).count()
    }

    /// The claims (and until when they hold), and how many signature checks it took.
    fn verify_uncached(&self, token: &str, now_s: u64) -> (Result<(Claims, u64), TokenError>, u64) {
        let header = match jsonwebtoken::decode_header(token) {
            Ok(header) => header,
            Err(e) => return (Err(TokenError::Malformed(e.to_string())), 0),
        };
        let mut checks = 0;
        let mut last_error = None;
        for (key, validation) in self.candidates(header.alg, header.kid.as_deref()) {
            checks += 1;
            match jsonwebtoken::decode::<Map<String, Value>>(token, &key.key, validation) {
                Ok(data) => return (self.check_claims(&data.claims, now_s), checks),
                Err(error) => last_error = Some(TokenError::Invalid(error.to_string())),
            }
        }
        let error = last_error.unwrap_or_else(|| TokenError::NoKey(format!("{:?}", header.alg)));
        (Err(error), checks)
    }

    fn check_claims(
        &self,
        claims: &Map<String, Value>,
        now_s: u64,
    ) -> Result<(Claims, u64), TokenError> {
        let leeway = self.expectations.leeway_s;
        let exp = claims
            .get("exp")
            .and_then(Value::as_u64)
            .ok_or(TokenError::NoExpiry)?;
        let valid_until = exp.saturating_add(leeway);
        if valid_until <= now_s {
            return Err(TokenError::Expired);
        }
        if let Some(nbf) = claims.get("nbf").and_then(Value::as_u64) {
            if nbf > now_s.saturating_add(leeway) {
                return Err(TokenError::NotYetValid);
            }
        }
        let subject_claim = &self.expectations.subject_claim;
        let subject = claim_text(claims.get(subject_claim))
            .ok_or_else(|| TokenError::NoSubject(subject_claim.clone()))?;
        let tier = self
            .expectations
            .tier_claim
            .as_ref()
            .and_then(|name| claim_text(claims.get(name)));
        Ok((Claims { subject, tier }, valid_until))
    }
}

/// What `jsonwebtoken` checks for a key of `algorithm`: the signature, and `iss`/`aud`
/// when set. Time is checked in [`JwtVerifier`] against the host's clock, with the leeway.
fn validation(algorithm: Algorithm, expectations: &Expectations) -> Validation {
    let mut validation = Validation::new(algorithm);
    validation.validate_exp = false;
    validation.validate_nbf = false;
    validation.required_spec_claims.clear();
    validation.validate_aud = !expectations.audiences.is_empty();
    if validation.validate_aud {
        validation.set_audience(&expectations.audiences);
        validation.set_required_spec_claims(&["aud"]);
    }
    if !expectations.issuers.is_empty() {
        validation.set_issuer(&expectations.issuers);
        validation.required_spec_claims.insert("iss".to_owned());
    }
    validation
}

/// A claim as an identity: strings (not empty), integers written out; nothing else. A string
/// longer than [`crate::identity::MAX_IDENTITY_BYTES`] is its digest (see
/// [`crate::identity::bounded_identity`]), before it is cached or sent anywhere.
fn claim_text(value: Option<&Value>) -> Option<String> {
    match value? {
        Value::String(text) if !text.is_empty() => {
            Some(crate::identity::bounded_identity(text.clone()))
        }
        Value::Number(number) if number.is_u64() || number.is_i64() => Some(number.to_string()),
        _ => None,
    }
}

/// The bearer token of an `Authorization` value (`Bearer <token>`, any case), or the value
/// itself for a header that carries only the token.
pub fn bearer_token(value: &str, authorization: bool) -> Option<&str> {
    let value = value.trim();
    let token = if authorization {
        let (scheme, rest) = value.split_once(' ')?;
        if !scheme.eq_ignore_ascii_case("bearer") {
            return None;
        }
        rest.trim()
    } else {
        value
    };
    (!token.is_empty()).then_some(token)
}

/// Tokens seen before, by SHA-256 of the token, each with what it gave (its claims, or why
/// it was refused) until a time (seconds). Bounded: when full, the oldest entry goes.
#[derive(Debug)]
struct TokenCache<V> {
    capacity: usize,
    entries: HashMap<[u8; 32], (V, u64)>,
    order: VecDeque<[u8; 32]>,
}

impl<V: Clone> TokenCache<V> {
    fn new(capacity: usize) -> Self {
        TokenCache {
            capacity,
            entries: HashMap::new(),
            order: VecDeque::new(),
        }
    }

    fn get(&mut self, digest: &[u8; 32], now_s: u64) -> Option<V> {
        match self.entries.get(digest) {
            Some((value, valid_until)) if *valid_until > now_s => Some(value.clone()),
            Some(_) => {
                self.entries.remove(digest);
                None
            }
            None => None,
        }
    }

    fn insert(&mut self, digest: [u8; 32], value: V, valid_until: u64) {
        if self.capacity == 0 {
            return;
        }
        while self.entries.len() >= self.capacity {
            match self.order.pop_front() {
                Some(oldest) => {
                    self.entries.remove(&oldest);
                }
                None => self.entries.clear(),
            }
        }
        if self.entries.insert(digest, (value, valid_until)).is_none() {
            self.order.push_back(digest);
        }
        // Entries removed on expiry leave their place in `order`; drop those at the front.
        while self.order.len() > self.capacity.saturating_mul(2) {
            self.order.pop_front();
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.entries.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{encode, EncodingKey, Header};
    use serde_json::json;

    pub const NOW: u64 = 1_800_000_000;

    pub fn hs_key(secret: &str) -> VerifyingKey {
        VerifyingKey {
            kid: None,
            algorithm: Algorithm::HS256,
            key: DecodingKey::from_secret(secret.as_bytes()),
        }
    }

    fn expectations() -> Expectations {
        Expectations {
            issuers: vec![],
            audiences: vec![],
            leeway_s: 30,
            subject_claim: "sub".into(),
            tier_claim: Some("tier".into()),
        }
    }

    fn hs_token(secret: &str, claims: Value) -> String {
        encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(secret.as_bytes()),
        )
        .unwrap()
    }

    fn verifier(keys: Vec<VerifyingKey>, expectations: Expectations) -> JwtVerifier {
        JwtVerifier::new(keys, expectations, 16)
    }

    #[test]
    fn a_valid_token_gives_subject_and_tier() {
        let mut verifier = verifier(vec![hs_key("s3cret")], expectations());
        let token = hs_token(
            "s3cret",
            json!({"sub": "ann", "tier": "gold", "exp": NOW + 60}),
        );
        assert_eq!(
            verifier.verify(&token, NOW),
            Ok(Claims {
                subject: "ann".into(),
                tier: Some("gold".into())
            })
        );
    }

    #[test]
    fn forged_expired_early_and_subjectless_tokens_are_refused() {
        let mut verifier = verifier(vec![hs_key("s3cret")], expectations());
        let forged = hs_token("guess", json!({"sub": "ann", "exp": NOW + 60}));
        assert!(matches!(
            verifier.verify(&forged, NOW),
            Err(TokenError::Invalid(_))
        ));
        let expired = hs_token("s3cret", json!({"sub": "ann", "exp": NOW - 31}));
        assert_eq!(verifier.verify(&expired, NOW), Err(TokenError::Expired));
        let within_leeway = hs_token("s3cret", json!({"sub": "ann", "exp": NOW - 29}));
        assert!(verifier.verify(&within_leeway, NOW).is_ok());
        let early = hs_token(
            "s3cret",
            json!({"sub": "ann", "exp": NOW + 600, "nbf": NOW + 31}),
        );
        assert_eq!(verifier.verify(&early, NOW), Err(TokenError::NotYetValid));
        let no_exp = hs_token("s3cret", json!({"sub": "ann"}));
        assert_eq!(verifier.verify(&no_exp, NOW), Err(TokenError::NoExpiry));
        let no_sub = hs_token("s3cret", json!({"exp": NOW + 60}));
        assert_eq!(
            verifier.verify(&no_sub, NOW),
            Err(TokenError::NoSubject("sub".into()))
        );
        assert_eq!(
            verifier.verify(&"a".repeat(MAX_TOKEN_BYTES + 1), NOW),
            Err(TokenError::TooLong)
        );
    }

    #[test]
    fn alg_none_is_refused() {
        let mut verifier = verifier(vec![hs_key("s3cret")], expectations());
        use base64::Engine;
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let header = b64.encode(br#"{"alg":"none","typ":"JWT"}"#);
        let claims = b64.encode(json!({"sub": "ann", "exp": NOW + 60}).to_string());
        for token in [format!("{header}.{claims}."), format!("{header}.{claims}")] {
            assert!(
                matches!(verifier.verify(&token, NOW), Err(TokenError::Malformed(_))),
                "{token}"
            );
        }
    }

    #[test]
    fn a_token_cannot_choose_hmac_with_the_public_key() {
        let public_pem = include_str!("../tests/keys/rsa_public.pem");
        let rsa = VerifyingKey {
            kid: None,
            algorithm: Algorithm::RS256,
            key: DecodingKey::from_rsa_pem(public_pem.as_bytes()).unwrap(),
        };
        let mut verifier = verifier(vec![rsa], expectations());
        // HS256 signed with the public key's text as the secret: the classic confusion.
        let confused = hs_token(public_pem, json!({"sub": "ann", "exp": NOW + 60}));
        assert_eq!(
            verifier.verify(&confused, NOW),
            Err(TokenError::NoKey("HS256".into()))
        );
        let private_pem = include_str!("../tests/keys/rsa_private.pem");
        let good = encode(
            &Header::new(Algorithm::RS256),
            &json!({"sub": "ann", "exp": NOW + 60}),
            &EncodingKey::from_rsa_pem(private_pem.as_bytes()).unwrap(),
        )
        .unwrap();
        assert_eq!(verifier.verify(&good, NOW).unwrap().subject, "ann");
    }

    #[test]
    fn ec_keys_verify_es256_and_nothing_else() {
        let ec = VerifyingKey {
            kid: None,
            algorithm: Algorithm::ES256,
            key: DecodingKey::from_ec_pem(include_bytes!("../tests/keys/ec_public.pem")).unwrap(),
        };
        let mut verifier = verifier(vec![ec], expectations());
        let private =
            EncodingKey::from_ec_pem(include_bytes!("../tests/keys/ec_private.pem")).unwrap();
        let good = encode(
            &Header::new(Algorithm::ES256),
            &json!({"sub": "eve", "exp": NOW + 60}),
            &private,
        )
        .unwrap();
        assert_eq!(verifier.verify(&good, NOW).unwrap().subject, "eve");
        let hs = hs_token("whatever", json!({"sub": "eve", "exp": NOW + 60}));
        assert_eq!(
            verifier.verify(&hs, NOW),
            Err(TokenError::NoKey("HS256".into()))
        );
    }

    #[test]
    fn ed25519_keys_verify_eddsa() {
        let ed = VerifyingKey {
            kid: None,
            algorithm: Algorithm::EdDSA,
            key: DecodingKey::from_ed_pem(include_bytes!("../tests/keys/ed25519_public.pem"))
                .unwrap(),
        };
        let mut verifier = verifier(vec![ed], expectations());
        let private =
            EncodingKey::from_ed_pem(include_bytes!("../tests/keys/ed25519_private.pem")).unwrap();
        let claims = json!({"sub": "ed", "exp": NOW + 60});
        let good = encode(&Header::new(Algorithm::EdDSA), &claims, &private).unwrap();
        assert_eq!(verifier.verify(&good, NOW).unwrap().subject, "ed");
        let mut tampered = good.clone();
        tampered.push('A');
        assert!(verifier.verify(&tampered, NOW).is_err());
    }

    #[test]
    fn issuer_and_audience_are_checked_when_set() {
        let strict = Expectations {
            issuers: vec!["https://issuer.example".into()],
            audiences: vec!["api".into()],
            ..expectations()
        };
        let mut verifier = verifier(vec![hs_key("k")], strict);
        let good = hs_token(
            "k",
            json!({"sub": "ann", "exp": NOW + 60, "iss": "https://issuer.example", "aud": ["x", "api"]}),
        );
        assert!(verifier.verify(&good, NOW).is_ok());
        for claims in [
            json!({"sub": "ann", "exp": NOW + 60, "iss": "https://other", "aud": "api"}),
            json!({"sub": "ann", "exp": NOW + 60, "iss": "https://issuer.example", "aud": "web"}),
            json!({"sub": "ann", "exp": NOW + 60, "aud": "api"}),
            json!({"sub": "ann", "exp": NOW + 60, "iss": "https://issuer.example"}),
        ] {
            let token = hs_token("k", claims.clone());
            assert!(verifier.verify(&token, NOW).is_err(), "{claims}");
        }
    }

    #[test]
    fn key_ids_pick_the_key() {
        let keys = vec![
            VerifyingKey {
                kid: Some("old".into()),
                ..hs_key("old-secret")
            },
            VerifyingKey {
                kid: Some("new".into()),
                ..hs_key("new-secret")
            },
        ];
        let mut verifier = verifier(keys, expectations());
        let mut header = Header::new(Algorithm::HS256);
        header.kid = Some("new".into());
        let token = encode(
            &header,
            &json!({"sub": "ann", "exp": NOW + 60}),
            &EncodingKey::from_secret(b"new-secret"),
        )
        .unwrap();
        assert!(verifier.verify(&token, NOW).is_ok());
        header.kid = Some("old".into());
        let wrong = encode(
            &header,
            &json!({"sub": "ann", "exp": NOW + 60}),
            &EncodingKey::from_secret(b"new-secret"),
        )
        .unwrap();
        assert!(verifier.verify(&wrong, NOW).is_err());
    }

    #[test]
    fn verified_tokens_are_cached_until_they_expire_and_the_cache_is_bounded() {
        let mut verifier = JwtVerifier::new(vec![hs_key("k")], expectations(), 2);
        let token = hs_token("k", json!({"sub": "ann", "exp": NOW + 10}));
        assert!(verifier.verify(&token, NOW).is_ok());
        assert_eq!(verifier.cache.len(), 1);
        // Past exp + leeway the cached entry is not used: the token is checked again.
        assert_eq!(verifier.verify(&token, NOW + 41), Err(TokenError::Expired));
        for n in 0..5 {
            let token = hs_token("k", json!({"sub": format!("u{n}"), "exp": NOW + 60}));
            assert!(verifier.verify(&token, NOW).is_ok());
            assert!(verifier.cache.len() <= 2);
        }
    }

    fn rsa_key(kid: Option<&str>) -> VerifyingKey {
        VerifyingKey {
            kid: kid.map(str::to_owned),
            algorithm: Algorithm::RS256,
            key: DecodingKey::from_rsa_pem(include_bytes!("../tests/keys/rsa_public.pem")).unwrap(),
        }
    }

    /// An RS256 token with `kid`, signed properly, then its payload changed: it names an
    /// algorithm the keys have, and every signature check refuses it.
    fn forged_rs256(kid: Option<&str>, subject: &str) -> String {
        let mut header = Header::new(Algorithm::RS256);
        header.kid = kid.map(str::to_owned);
        let private =
            EncodingKey::from_rsa_pem(include_bytes!("../tests/keys/rsa_private.pem")).unwrap();
        let good = encode(&header, &json!({"sub": "ann", "exp": NOW + 60}), &private).unwrap();
        let mut parts: Vec<String> = good.split('.').map(str::to_owned).collect();
        use base64::Engine;
        parts[1] = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .encode(json!({"sub": subject, "exp": NOW + 60}).to_string());
        parts.join(".")
    }

    #[test]
    fn a_refused_token_costs_its_signature_checks_once_then_a_lookup_for_a_while() {
        let mut verifier = verifier(vec![rsa_key(Some("rsa-1"))], expectations());
        let forged = forged_rs256(Some("rsa-1"), "mallory");
        let first = verifier.verify(&forged, NOW);
        assert!(matches!(first, Err(TokenError::Invalid(_))), "{first:?}");
        assert_eq!(verifier.signature_checks(), 1);
        for later in 0..REFUSED_FOR_S {
            assert_eq!(
                verifier.verify(&forged, NOW + later),
                first,
                "the same refusal"
            );
        }
        assert_eq!(verifier.signature_checks(), 1, "answered from memory");
        // Forgotten after a while: checked again, and remembered again.
        assert_eq!(verifier.verify(&forged, NOW + REFUSED_FOR_S), first);
        assert_eq!(verifier.signature_checks(), 2);
        // Refusals after a good signature are remembered too (expired, no subject).
        let expired = hs_token("s3cret", json!({"sub": "ann", "exp": NOW - 100}));
        let mut hs = verifier_with_hs();
        for _ in 0..3 {
            assert_eq!(hs.verify(&expired, NOW), Err(TokenError::Expired));
        }
        assert_eq!(hs.signature_checks(), 1);
    }

    fn verifier_with_hs() -> JwtVerifier {
        verifier(vec![hs_key("s3cret")], expectations())
    }

    #[test]
    fn tokens_refused_before_any_signature_check_are_not_remembered() {
        let mut verifier = verifier(vec![rsa_key(None)], expectations());
        let hs = hs_token("whatever", json!({"sub": "eve", "exp": NOW + 60}));
        for token in ["not-a-token", hs.as_str(), &"a".repeat(MAX_TOKEN_BYTES + 1)] {
            for _ in 0..2 {
                assert!(verifier.verify(token, NOW).is_err());
            }
        }
        assert_eq!(verifier.signature_checks(), 0);
        assert_eq!(verifier.refused.len(), 0, "nothing dear to remember");
    }

    #[test]
    fn a_token_costs_at_most_the_keys_of_its_algorithm_and_kid() {
        let keys = vec![
            rsa_key(Some("a")),
            rsa_key(Some("b")),
            rsa_key(Some("c")),
            hs_key("s3cret"),
        ];
        let mut verifier = verifier(keys, expectations());
        // Without a kid: every RS256 key, never the HS256 one.
        assert_eq!(verifier.most_checks_for(Algorithm::RS256, None), 3);
        verifier.verify(&forged_rs256(None, "m1"), NOW).unwrap_err();
        assert_eq!(verifier.signature_checks(), 3);
        // A kid a key has: that key alone; a kid none has: no check at all.
        assert_eq!(verifier.most_checks_for(Algorithm::RS256, Some("b")), 1);
        verifier
            .verify(&forged_rs256(Some("b"), "m2"), NOW)
            .unwrap_err();
        assert_eq!(verifier.signature_checks(), 4);
        assert_eq!(
            verifier.verify(&forged_rs256(Some("zz"), "m3"), NOW),
            Err(TokenError::NoKey("RS256".into()))
        );
        assert_eq!(verifier.signature_checks(), 4);
        // Repeated, each costs nothing more.
        for kid in [None, Some("b")] {
            verifier.verify(&forged_rs256(kid, "m1"), NOW).unwrap_err();
        }
        verifier
            .verify(&forged_rs256(Some("b"), "m2"), NOW)
            .unwrap_err();
        assert_eq!(
            verifier.signature_checks(),
            4 + 1,
            "only the new (kid b, m1) one"
        );
    }

    #[test]
    fn remembered_refusals_are_bounded() {
        let mut verifier = verifier(vec![rsa_key(None)], expectations());
        let mut cache = TokenCache::new(3);
        for n in 0u8..10 {
            cache.insert([n; 32], TokenError::Expired, NOW + 10);
            assert!(cache.len() <= 3);
        }
        assert_eq!(cache.get(&[9; 32], NOW), Some(TokenError::Expired));
        assert_eq!(cache.get(&[0; 32], NOW), None, "the oldest went first");
        verifier.verify(&forged_rs256(None, "x"), NOW).unwrap_err();
        assert_eq!(verifier.refused.len(), 1);
    }

    #[test]
    fn a_long_subject_or_tier_is_its_digest() {
        let mut verifier = verifier_with_hs();
        let long = "u".repeat(crate::identity::MAX_IDENTITY_BYTES + 1);
        let exact = "t".repeat(crate::identity::MAX_IDENTITY_BYTES);
        let token = hs_token(
            "s3cret",
            json!({"sub": long, "tier": exact, "exp": NOW + 60}),
        );
        let claims = verifier.verify(&token, NOW).unwrap();
        assert_eq!(
            claims.subject,
            format!("sha256:{}", crate::identity::api_key_digest(&long))
        );
        assert_eq!(
            claims.tier.as_deref(),
            Some(exact.as_str()),
            "at the bound: as it is"
        );
    }

    #[test]
    fn bearer_tokens_are_taken_from_authorization() {
        assert_eq!(
            bearer_token("Bearer abc.def.ghi", true),
            Some("abc.def.ghi")
        );
        assert_eq!(bearer_token("bearer   abc ", true), Some("abc"));
        assert_eq!(bearer_token("Basic dXNlcg==", true), None);
        assert_eq!(bearer_token("Bearer ", true), None);
        assert_eq!(bearer_token("abc.def.ghi", true), None);
        assert_eq!(bearer_token("abc.def.ghi", false), Some("abc.def.ghi"));
    }
}
