//! Who may use the admin API: bearer tokens, each with a name (what the audit log records)
//! and a role (`read` or `admin`). Tokens come from a file or an environment variable; the
//! controller keeps only their SHA-256 and compares digests in constant time, every token
//! every time, so neither a match nor its position shows in how long a refusal takes.

use std::path::Path;

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use sluice_protocol::admin::Role;
use subtle::ConstantTimeEq;

use super::AdminState;
use crate::error::ApiError;

/// Who is calling.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub name: String,
    pub role: Role,
}

#[derive(Debug, Clone)]
struct Token {
    name: String,
    role: Role,
    digest: [u8; 32],
}

/// The tokens the admin API accepts.
#[derive(Debug, Clone, Default)]
pub struct Tokens(Vec<Token>);

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TokensFile {
    tokens: Vec<TokenEntry>,
}

/// `[[tokens]]` in the tokens file: the token in clear (`token`) or as the hex SHA-256 of it
/// (`sha256`), so that the file need not hold it.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenEntry {
    name: String,
    role: Role,
    #[serde(default)]
    token: Option<String>,
    #[serde(default)]
    sha256: Option<String>,
}

/// Shortest token accepted: anything shorter is guessable.
pub const MIN_TOKEN_LENGTH: usize = 16;

pub(crate) fn digest_of(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

pub(crate) fn hex_digest(field: &str, hex: &str) -> Result<[u8; 32], String> {
    let refused = || format!("{field}: must be the 64 hex digits of the token's SHA-256");
    if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(refused());
    }
    let bytes: Result<Vec<u8>, _> = (0..hex.len())
        .step_by(2)
        .map(|i| {
            hex.get(i..i + 2)
                .map_or(Err(()), |b| u8::from_str_radix(b, 16).map_err(|_| ()))
        })
        .collect();
    bytes
        .ok()
        .and_then(|b| <[u8; 32]>::try_from(b).ok())
        .ok_or_else(refused)
}

impl Tokens {
    fn add(&mut self, field: &str, name: &str, role: Role, digest: [u8; 32]) -> Result<(), String> {
        if name.is_empty() || name.len() > 64 || name.contains(char::is_whitespace) {
            return Err(format!("{field}.name: 1 to 64 characters, no spaces"));
        }
        if self.0.iter().any(|t| t.name == name) {
            return Err(format!("{field}.name: `{name}` is used by another token"));
        }
        if self.0.iter().any(|t| t.digest == digest) {
            return Err(format!(
                "{field}: the same token is given twice (as `{name}` and another name)"
            ));
        }
        self.0.push(Token {
            name: name.to_owned(),
            role,
            digest,
        });
        Ok(())
    }

    fn add_clear(
        &mut self,
        field: &str,
        name: &str,
        role: Role,
        token: &str,
    ) -> Result<(), String> {
        if token.len() < MIN_TOKEN_LENGTH {
            return Err(format!(
                "{field}.token: at least {MIN_TOKEN_LENGTH} characters"
            ));
        }
        self.add(field, name, role, digest_of(token))
    }

    /// A tokens file (TOML): `[[tokens]]` with `name`, `role` and `token` or `sha256`.
    pub fn from_file(path: &Path) -> Result<Tokens, String> {
        let shown = path.display();
        let text =
            std::fs::read_to_string(path).map_err(|e| format!("cannot read {shown}: {e}"))?;
        let file: TokensFile = toml::from_str(&text).map_err(|e| format!("{shown}: {e}"))?;
        let mut tokens = Tokens::default();
        for (index, entry) in file.tokens.iter().enumerate() {
            let field = format!("{shown}: tokens[{index}]");
            match (&entry.token, &entry.sha256) {
                (Some(token), None) => tokens.add_clear(&field, &entry.name, entry.role, token)?,
                (None, Some(hex)) => {
                    let digest = hex_digest(&format!("{field}.sha256"), hex)?;
                    tokens.add(&field, &entry.name, entry.role, digest)?;
                }
                _ => return Err(format!("{field}: give `token` or `sha256`, one of them")),
            }
        }
        Ok(tokens)
    }

    /// `name:role:token` entries separated by `;` (`SLUICE_ADMIN_TOKENS`).
    pub fn from_text(text: &str) -> Result<Tokens, String> {
        let mut tokens = Tokens::default();
        for (index, entry) in text
            .split(';')
            .map(str::trim)
            .filter(|e| !e.is_empty())
            .enumerate()
        {
            let field = format!("SLUICE_ADMIN_TOKENS[{index}]");
            let mut parts = entry.splitn(3, ':');
            let (Some(name), Some(role), Some(token)) = (parts.next(), parts.next(), parts.next())
            else {
                return Err(format!("{field}: write name:role:token"));
            };
            let role = match role {
                "admin" => Role::Admin,
                "read" => Role::Read,
                other => return Err(format!("{field}.role: `{other}` is not read or admin")),
            };
            tokens.add_clear(&field, name, role, token)?;
        }
        Ok(tokens)
    }

    pub fn merge(mut self, other: Tokens) -> Result<Tokens, String> {
        for token in other.0 {
            self.add("tokens", &token.name.clone(), token.role, token.digest)?;
        }
        Ok(self)
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn has_admin(&self) -> bool {
        self.0.iter().any(|t| t.role == Role::Admin)
    }

    /// The caller a presented token stands for, compared against every token in constant
    /// time.
    pub fn identify(&self, presented: &str) -> Option<Caller> {
        let digest = digest_of(presented);
        let mut found: Option<&Token> = None;
        for token in &self.0 {
            if bool::from(token.digest.ct_eq(&digest)) {
                found = Some(token);
            }
        }
        found.map(|token| Caller {
            name: token.name.clone(),
            role: token.role,
        })
    }

    /// A new random token (for `make run`, or for an operator to put in a file).
    pub fn generate() -> Result<String, String> {
        let mut bytes = [0u8; 24];
        getrandom::fill(&mut bytes).map_err(|e| format!("no randomness: {e}"))?;
        Ok(format!("sluice-admin-{}", hex(&bytes)))
    }
}

pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes.iter().fold(String::new(), |mut out, b| {
        let _ = write!(out, "{b:02x}");
        out
    })
}

/// A 401 with its challenge (RFC 6750): `invalid_token` when a token was given and is not
/// one of ours.
fn unauthorized(message: &str, invalid_token: bool) -> Response {
    let mut response =
        ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", message).into_response();
    let challenge = if invalid_token {
        "Bearer realm=\"sluice-admin\", error=\"invalid_token\""
    } else {
        "Bearer realm=\"sluice-admin\""
    };
    response.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        axum::http::HeaderValue::from_static(challenge),
    );
    response
}

/// Any caller with a valid token (`read` or `admin`).
pub struct Reader(pub Caller);

/// A caller whose token has the `admin` role.
pub struct Admin(pub Caller);

impl FromRequestParts<AdminState> for Reader {
    type Rejection = Response;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AdminState,
    ) -> Result<Self, Self::Rejection> {
        let value = parts
            .headers
            .get(header::AUTHORIZATION)
            .ok_or_else(|| unauthorized("this API needs `Authorization: Bearer <token>`", false))?;
        // The scheme is case-insensitive (RFC 9110 §11.1).
        let presented = value
            .to_str()
            .ok()
            .and_then(|v| v.split_once(' '))
            .filter(|(scheme, token)| {
                scheme.eq_ignore_ascii_case("bearer") && !token.trim().is_empty()
            })
            .map(|(_, token)| token.trim())
            .ok_or_else(|| {
                unauthorized("the Authorization header must be `Bearer <token>`", false)
            })?;
        state
            .tokens
            .identify(presented)
            .map(Reader)
            .ok_or_else(|| unauthorized("the token is not valid", true))
    }
}

impl FromRequestParts<AdminState> for Admin {
    type Rejection = Response;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AdminState,
    ) -> Result<Self, Self::Rejection> {
        let Reader(caller) = Reader::from_request_parts(parts, state).await?;
        if caller.role == Role::Admin {
            Ok(Admin(caller))
        } else {
            Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "forbidden",
                format!("the token `{}` may read, not change", caller.name),
            )
            .into_response())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_found_by_their_digest_and_roles_kept() {
        let tokens =
            Tokens::from_text("ops:admin:ops-token-0123456789; viewer:read:view-token-0123456789")
                .unwrap();
        assert_eq!(
            tokens.identify("ops-token-0123456789"),
            Some(Caller {
                name: "ops".into(),
                role: Role::Admin
            })
        );
        assert_eq!(
            tokens.identify("view-token-0123456789").unwrap().role,
            Role::Read
        );
        assert_eq!(tokens.identify("ops-token-012345678"), None);
        assert_eq!(tokens.identify(""), None);
    }

    #[test]
    fn bad_token_settings_name_what_is_wrong() {
        assert!(Tokens::from_text("ops:admin:short")
            .unwrap_err()
            .contains("at least 16"));
        assert!(Tokens::from_text("ops:root:0123456789abcdef")
            .unwrap_err()
            .contains("role"));
        assert!(Tokens::from_text("ops")
            .unwrap_err()
            .contains("name:role:token"));
        let twice = "a:admin:0123456789abcdef;a:read:fedcba9876543210";
        assert!(Tokens::from_text(twice)
            .unwrap_err()
            .contains("used by another token"));
    }
}
