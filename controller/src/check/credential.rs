//! Who may call the check address and Envoy's rate-limit API: the proxies of this
//! deployment, each presenting one of the deployment's check tokens as
//! `Authorization: Bearer <token>`. A call without one is refused before its body is read,
//! so it changes nothing and costs the store nothing.
//!
//! Several tokens are accepted at once so that a token can be rotated without downtime: add
//! the new one to every controller, move the proxies to it, then drop the old one. Only
//! their SHA-256 is kept, and a presented token is compared with every one in constant time.
//!
//! With no token configured the channel is open (development only; the controller says so
//! loudly at start, and production mode refuses to start).

use std::path::Path;

use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use subtle::ConstantTimeEq;

use crate::admin::auth::{digest_of, hex_digest, MIN_TOKEN_LENGTH};
use crate::error::ApiError;

/// The check tokens this controller accepts (their digests).
#[derive(Debug, Clone, Default)]
pub struct CheckTokens(Vec<[u8; 32]>);

/// Most check tokens accepted at once: rotation needs two, a few spare is plenty.
const MAX_CHECK_TOKENS: usize = 16;

impl CheckTokens {
    /// Tokens separated by commas (`SLUICE_CHECK_TOKENS`).
    pub fn from_text(text: &str) -> Result<CheckTokens, String> {
        let mut tokens = CheckTokens::default();
        for (index, token) in text
            .split(',')
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .enumerate()
        {
            tokens.add_clear(&format!("SLUICE_CHECK_TOKENS[{index}]"), token)?;
        }
        Ok(tokens)
    }

    /// A file of one token per line; `sha256:<hex>` names a token by its digest, so the
    /// file need not hold it. Blank lines and `#` comments are skipped.
    pub fn from_file(path: &Path) -> Result<CheckTokens, String> {
        let shown = path.display();
        let text =
            std::fs::read_to_string(path).map_err(|e| format!("cannot read {shown}: {e}"))?;
        let mut tokens = CheckTokens::default();
        for (number, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let field = format!("{shown}: line {}", number + 1);
            match line.strip_prefix("sha256:") {
                Some(hex) => tokens.add(&field, hex_digest(&field, hex)?)?,
                None => tokens.add_clear(&field, line)?,
            }
        }
        Ok(tokens)
    }

    fn add_clear(&mut self, field: &str, token: &str) -> Result<(), String> {
        if token.len() < MIN_TOKEN_LENGTH || token.contains(char::is_whitespace) {
            return Err(format!(
                "{field}: a check token is at least {MIN_TOKEN_LENGTH} characters, no spaces"
            ));
        }
        self.add(field, digest_of(token))
    }

    fn add(&mut self, field: &str, digest: [u8; 32]) -> Result<(), String> {
        if self.0.contains(&digest) {
            return Err(format!("{field}: the same check token is given twice"));
        }
        if self.0.len() >= MAX_CHECK_TOKENS {
            return Err(format!("{field}: at most {MAX_CHECK_TOKENS} check tokens"));
        }
        self.0.push(digest);
        Ok(())
    }

    pub fn merge(mut self, other: CheckTokens) -> Result<CheckTokens, String> {
        for digest in other.0 {
            self.add("check tokens", digest)?;
        }
        Ok(self)
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether a call carrying `authorization` (the header's bytes) may go on: always
    /// when no token is configured, else when it is `Bearer` and one of ours.
    pub fn admit(&self, authorization: Option<&[u8]>) -> bool {
        if self.0.is_empty() {
            return true;
        }
        let Some(presented) = authorization.and_then(bearer) else {
            return false;
        };
        let digest = digest_of_bytes(presented);
        // Every token compared every time: neither a match nor its position shows.
        self.0
            .iter()
            .fold(subtle::Choice::from(0), |found, ours| {
                found | ours.ct_eq(&digest)
            })
            .into()
    }
}

/// Signs the lease tokens this controller hands out, and checks those a release names,
/// so that a release can only name leases a controller of this deployment granted, for
/// the count granted, and a forged one is refused before the store is asked.
///
/// The key comes from the deployment's check tokens (every controller has them): the first
/// signs, every one verifies, so a rotation that adds a token first keeps every lease
/// releasable. Without check tokens (development) tokens go unsigned, as the channel is
/// open anyway.
#[derive(Clone, Default)]
pub struct LeaseSigner {
    keys: Vec<[u8; 32]>,
    /// Without keys, refuse every token instead of taking it unsigned.
    refuse_unsigned: bool,
}

/// Bytes of the signature kept in a token (128 bits, hex).
const SIGNATURE_BYTES: usize = 16;

impl LeaseSigner {
    pub fn new(tokens: &CheckTokens) -> Self {
        LeaseSigner {
            keys: Self::derived_keys(tokens, b"sluice lease token key\0"),
            refuse_unsigned: false,
        }
    }

    /// One key per check token, derived under `label` (so that each kind of token the
    /// controller signs has keys of its own).
    fn derived_keys(tokens: &CheckTokens, label: &[u8]) -> Vec<[u8; 32]> {
        use sha2::{Digest, Sha256};
        tokens
            .0
            .iter()
            .map(|digest| {
                let mut hasher = Sha256::new();
                hasher.update(label);
                hasher.update(digest);
                hasher.finalize().into()
            })
            .collect()
    }

    /// The signer of grant tokens (what lets a worker give a lease's unused quota back).
    /// Keyed like the lease tokens' (under a label of its own), so that any controller of
    /// the deployment takes a return; but never unsigned: a forged return would give back
    /// quota that was never taken, lifting a limit. Without check tokens the key is this
    /// process's own, so a return reaches only the controller that granted the lease (at
    /// another it is refused, and the lease's quota stays spent as before returns existed).
    pub fn for_grants(tokens: &CheckTokens) -> Self {
        let keys: Vec<[u8; 32]> = if tokens.0.is_empty() {
            let mut key = [0u8; 32];
            // No randomness (never on the platforms this runs on): a fixed key would let
            // anyone forge returns, so none can be verified.
            if getrandom::fill(&mut key).is_err() {
                return LeaseSigner {
                    keys: Vec::new(),
                    refuse_unsigned: true,
                };
            }
            vec![key]
        } else {
            Self::derived_keys(tokens, b"sluice grant token key\0")
        };
        LeaseSigner {
            keys,
            refuse_unsigned: true,
        }
    }

    fn mac(key: &[u8; 32], token: &str) -> [u8; SIGNATURE_BYTES] {
        use hmac::{Hmac, Mac};
        let mut mac = <Hmac<sha2::Sha256> as Mac>::new_from_slice(key)
            .unwrap_or_else(|_| unreachable!("HMAC takes a key of any length"));
        mac.update(token.as_bytes());
        let full = mac.finalize().into_bytes();
        let mut short = [0u8; SIGNATURE_BYTES];
        short.copy_from_slice(&full[..SIGNATURE_BYTES]);
        short
    }

    /// `token` with its signature (as it is without a key).
    pub fn sign(&self, token: String) -> String {
        match self.keys.first() {
            Some(key) => {
                let signature = crate::admin::auth::hex(&Self::mac(key, &token));
                format!("{token}|{signature}")
            }
            None => token,
        }
    }

    /// The token a signed one carries, if one of the keys signed it.
    pub fn verify<'a>(&self, signed: &'a str) -> Option<&'a str> {
        if self.keys.is_empty() {
            return (!self.refuse_unsigned).then_some(signed);
        }
        let (token, signature) = signed.rsplit_once('|')?;
        let presented = hex_digest_16(signature)?;
        let valid = self
            .keys
            .iter()
            .fold(subtle::Choice::from(0), |found, key| {
                found | Self::mac(key, token).ct_eq(&presented)
            });
        bool::from(valid).then_some(token)
    }
}

/// 16 bytes written as 32 hex digits.
fn hex_digest_16(hex: &str) -> Option<[u8; SIGNATURE_BYTES]> {
    if hex.len() != SIGNATURE_BYTES * 2 {
        return None;
    }
    let mut bytes = [0u8; SIGNATURE_BYTES];
    for (index, byte) in bytes.iter_mut().enumerate() {
        *byte = u8::from_str_radix(hex.get(index * 2..index * 2 + 2)?, 16).ok()?;
    }
    Some(bytes)
}

fn digest_of_bytes(bytes: &[u8]) -> [u8; 32] {
    use sha2::{Digest, Sha256};
    Sha256::digest(bytes).into()
}

/// The token of `Bearer <token>` (the scheme without case, RFC 9110 §11.1).
fn bearer(value: &[u8]) -> Option<&[u8]> {
    let space = value.iter().position(|&b| b == b' ')?;
    let (scheme, rest) = value.split_at(space);
    let token = rest.trim_ascii();
    (scheme.eq_ignore_ascii_case(b"bearer") && !token.is_empty()).then_some(token)
}

/// A `401` in the one error shape, with its challenge.
pub fn unauthenticated() -> Response {
    let mut response = ApiError::new(
        StatusCode::UNAUTHORIZED,
        "unauthorized",
        "the check address needs `Authorization: Bearer <check token>` (the filter's \
         `controller.token` or `controller.token_env`)",
    )
    .into_response();
    response.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        HeaderValue::from_static("Bearer realm=\"sluice-check\""),
    );
    response
}

/// The check address's gate: every route behind it needs a check token.
pub async fn require(
    State(state): State<super::CheckState>,
    request: Request,
    next: Next,
) -> Response {
    let authorization = request
        .headers()
        .get(header::AUTHORIZATION)
        .map(HeaderValue::as_bytes);
    if state.tokens.admit(authorization) {
        next.run(request).await
    } else {
        state.metrics.unauthenticated_call("check");
        unauthenticated()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_call_is_admitted_only_with_one_of_the_tokens() {
        let tokens = CheckTokens::from_text("old-token-0123456789, new-token-0123456789").unwrap();
        assert_eq!(tokens.len(), 2);
        assert!(tokens.admit(Some(b"Bearer old-token-0123456789")));
        assert!(tokens.admit(Some(b"bearer new-token-0123456789")));
        assert!(!tokens.admit(Some(b"Bearer new-token-012345678")));
        assert!(!tokens.admit(Some(b"Basic new-token-0123456789")));
        assert!(!tokens.admit(Some(b"new-token-0123456789")));
        assert!(!tokens.admit(Some(b"Bearer ")));
        assert!(!tokens.admit(Some(b"Bearer \xff\xfe")));
        assert!(!tokens.admit(None));
    }

    #[test]
    fn lease_tokens_verify_only_as_signed_by_a_deployment_key() {
        let old = CheckTokens::from_text("old-token-0123456789").unwrap();
        let rotating = CheckTokens::from_text("old-token-0123456789,new-token-0123456789").unwrap();
        let new = CheckTokens::from_text("new-token-0123456789").unwrap();
        let signed = LeaseSigner::new(&old).sign("key|id|3".into());
        assert_eq!(LeaseSigner::new(&old).verify(&signed), Some("key|id|3"));
        assert_eq!(
            LeaseSigner::new(&rotating).verify(&signed),
            Some("key|id|3"),
            "a controller that added a token still takes the old key's leases"
        );
        assert_eq!(LeaseSigner::new(&new).verify(&signed), None);
        let forged_count = signed.replacen("|3|", "|1000000|", 1);
        assert_eq!(LeaseSigner::new(&old).verify(&forged_count), None);
        assert_eq!(LeaseSigner::new(&old).verify("key|id|3"), None);
        assert_eq!(LeaseSigner::new(&old).verify("key|id|3|zz"), None);
        let open = LeaseSigner::default();
        assert_eq!(open.sign("key|id|3".into()), "key|id|3");
        assert_eq!(open.verify("key|id|3"), Some("key|id|3"));
    }

    #[test]
    fn without_tokens_the_channel_is_open() {
        assert!(CheckTokens::default().admit(None));
    }

    #[test]
    fn bad_check_tokens_name_what_is_wrong() {
        assert!(CheckTokens::from_text("short")
            .unwrap_err()
            .contains("at least 16"));
        assert!(
            CheckTokens::from_text("same-token-0123456789,same-token-0123456789")
                .unwrap_err()
                .contains("twice")
        );
        let many: Vec<String> = (0..17)
            .map(|n| format!("token-{n:02}-0123456789"))
            .collect();
        assert!(CheckTokens::from_text(&many.join(","))
            .unwrap_err()
            .contains("at most 16"));
    }

    #[test]
    fn a_tokens_file_takes_clear_tokens_and_digests() {
        let dir = std::env::temp_dir().join(format!("sluice-check-tokens-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("tokens");
        let digest = crate::admin::auth::hex(&digest_of("hashed-token-0123456789"));
        std::fs::write(
            &path,
            format!("# rotation\nclear-token-0123456789\n\nsha256:{digest}\n"),
        )
        .unwrap();
        let tokens = CheckTokens::from_file(&path).unwrap();
        assert!(tokens.admit(Some(b"Bearer clear-token-0123456789")));
        assert!(tokens.admit(Some(b"Bearer hashed-token-0123456789")));
        std::fs::write(&path, "sha256:nothex\n").unwrap();
        assert!(CheckTokens::from_file(&path)
            .unwrap_err()
            .contains("line 1"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
