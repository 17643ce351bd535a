//! API keys, by the SHA-256 of the key. The controller makes a new key on request and shows
//! it once, in the answer that created it; it never stores or logs a key in clear.

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use sha2::{Digest, Sha256};
use sluice_protocol::admin::{ApiKeyBody, ApiKeyUpdate, NewApiKey};
use sluice_protocol::config::ApiKey;

use super::auth::{hex, Admin, Reader};
use super::{
    document_writable, if_match, json_body, missing, versioned, with_document, AdminState,
};
use crate::config::validate::{self, FieldError};
use crate::config::{Author, ChangeError};
use crate::error::{ApiError, Body};

/// A new key: `sk_` and 32 random bytes in hex.
fn new_key() -> Result<String, ApiError> {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).map_err(|e| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            format!("no randomness: {e}"),
        )
    })?;
    Ok(format!("sk_{}", hex(&bytes)))
}

fn now() -> String {
    let ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
    validate::format_rfc3339(ms)
}

/// An error about the key at `index` names the key's own field.
fn relative(index: usize, error: ChangeError) -> ChangeError {
    match error {
        ChangeError::Invalid(FieldError { field, message }) => {
            let prefix = format!("api_keys[{index}].");
            let field = field
                .strip_prefix(&prefix)
                .map(str::to_owned)
                .unwrap_or(field);
            ChangeError::Invalid(FieldError { field, message })
        }
        other => other,
    }
}

#[utoipa::path(get, path = "/v1/admin/api-keys", tag = "api-keys",
    responses((status = 200, description = "Every key, by its digest", body = Vec<ApiKey>)),
    security(("bearer" = [])))]
pub async fn list(State(state): State<AdminState>, _: Reader) -> Response {
    let snapshot = state.config.snapshot();
    versioned(
        StatusCode::OK,
        snapshot.version,
        &snapshot.document.api_keys,
    )
}

#[utoipa::path(get, path = "/v1/admin/api-keys/{sha256}", tag = "api-keys",
    params(("sha256" = String, Path)),
    responses((status = 200, body = ApiKey), (status = 404, body = sluice_protocol::admin::ErrorBody)),
    security(("bearer" = [])))]
pub async fn get(
    State(state): State<AdminState>,
    _: Reader,
    Path(sha256): Path<String>,
) -> Result<Response, ApiError> {
    let snapshot = state.config.snapshot();
    let digest = sha256.to_ascii_lowercase();
    let key = snapshot
        .document
        .api_keys
        .iter()
        .find(|k| k.sha256 == digest)
        .ok_or_else(|| ApiError::from(missing("API key", &sha256)))?;
    Ok(versioned(StatusCode::OK, snapshot.version, key))
}

#[utoipa::path(post, path = "/v1/admin/api-keys", tag = "api-keys", request_body = NewApiKey,
    params(("If-Match" = Option<String>, Header, description = "The version the change was made from")),
    responses((status = 201, description = "The key (shown once) and its record", body = ApiKeyBody),
              (status = 400, body = sluice_protocol::admin::ErrorBody),
              (status = 409, body = sluice_protocol::admin::ErrorBody)),
    security(("bearer" = [])))]
pub async fn create(
    State(state): State<AdminState>,
    Admin(caller): Admin,
    headers: HeaderMap,
    Body(body): Body,
) -> Result<Response, ApiError> {
    document_writable(&state)?;
    let request: NewApiKey = json_body(&body)?;
    let (key, sha256) = match &request.sha256 {
        Some(digest) => (None, validate::digest("sha256", digest)?),
        None => {
            let key = new_key()?;
            let digest = hex(&Sha256::digest(key.as_bytes()));
            (Some(key), digest)
        }
    };
    let record = ApiKey {
        sha256: sha256.clone(),
        user: request.user,
        tier: request.tier,
        name: request.name,
        created_at: Some(now()),
    };
    let author = Author {
        actor: &caller.name,
        action: "api_key.create",
        target: &sha256,
    };
    let index = std::sync::atomic::AtomicUsize::new(0);
    let snapshot = state
        .config
        .change(&author, if_match(&headers)?, |snapshot| {
            with_document(snapshot, |document| {
                if document.api_keys.iter().any(|k| k.sha256 == record.sha256) {
                    return Err(ChangeError::Conflict(
                        "this key is registered already".to_owned(),
                    ));
                }
                document.api_keys.push(record.clone());
                index.store(
                    document.api_keys.len() - 1,
                    std::sync::atomic::Ordering::Relaxed,
                );
                Ok(serde_json::to_value(&record).unwrap_or_default())
            })
        })
        .await
        .map_err(|e| {
            ApiError::from(relative(
                index.load(std::sync::atomic::Ordering::Relaxed),
                e,
            ))
        })?;
    let body = ApiKeyBody {
        key,
        api_key: record,
    };
    Ok(versioned(StatusCode::CREATED, snapshot.version, &body))
}

#[utoipa::path(put, path = "/v1/admin/api-keys/{sha256}", tag = "api-keys", request_body = ApiKeyUpdate,
    params(("sha256" = String, Path),
           ("If-Match" = Option<String>, Header, description = "The version the change was made from")),
    responses((status = 200, body = ApiKey), (status = 400, body = sluice_protocol::admin::ErrorBody),
              (status = 404, body = sluice_protocol::admin::ErrorBody),
              (status = 409, body = sluice_protocol::admin::ErrorBody)),
    security(("bearer" = [])))]
pub async fn update(
    State(state): State<AdminState>,
    Admin(caller): Admin,
    Path(sha256): Path<String>,
    headers: HeaderMap,
    Body(body): Body,
) -> Result<Response, ApiError> {
    document_writable(&state)?;
    let update: ApiKeyUpdate = json_body(&body)?;
    let digest = sha256.to_ascii_lowercase();
    let author = Author {
        actor: &caller.name,
        action: "api_key.update",
        target: &digest,
    };
    let index = std::sync::atomic::AtomicUsize::new(0);
    let snapshot = state
        .config
        .change(&author, if_match(&headers)?, |snapshot| {
            with_document(snapshot, |document| {
                let at = document
                    .api_keys
                    .iter()
                    .position(|k| k.sha256 == digest)
                    .ok_or_else(|| missing("API key", &digest))?;
                index.store(at, std::sync::atomic::Ordering::Relaxed);
                let key = &mut document.api_keys[at];
                key.user.clone_from(&update.user);
                key.tier.clone_from(&update.tier);
                key.name.clone_from(&update.name);
                Ok(serde_json::to_value(&*key).unwrap_or_default())
            })
        })
        .await
        .map_err(|e| {
            ApiError::from(relative(
                index.load(std::sync::atomic::Ordering::Relaxed),
                e,
            ))
        })?;
    let key = snapshot
        .document
        .api_keys
        .iter()
        .find(|k| k.sha256 == digest)
        .cloned();
    Ok(versioned(StatusCode::OK, snapshot.version, &key))
}

#[utoipa::path(delete, path = "/v1/admin/api-keys/{sha256}", tag = "api-keys",
    params(("sha256" = String, Path),
           ("If-Match" = Option<String>, Header, description = "The version the change was made from")),
    responses((status = 200, description = "Deleted"), (status = 404, body = sluice_protocol::admin::ErrorBody),
              (status = 409, body = sluice_protocol::admin::ErrorBody)),
    security(("bearer" = [])))]
pub async fn delete(
    State(state): State<AdminState>,
    Admin(caller): Admin,
    Path(sha256): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    document_writable(&state)?;
    let digest = sha256.to_ascii_lowercase();
    let author = Author {
        actor: &caller.name,
        action: "api_key.delete",
        target: &digest,
    };
    let snapshot = state
        .config
        .change(&author, if_match(&headers)?, |snapshot| {
            with_document(snapshot, |document| {
                let at = document
                    .api_keys
                    .iter()
                    .position(|k| k.sha256 == digest)
                    .ok_or_else(|| missing("API key", &digest))?;
                let removed = document.api_keys.remove(at);
                Ok(serde_json::json!({ "deleted": removed }))
            })
        })
        .await?;
    Ok(versioned(
        StatusCode::OK,
        snapshot.version,
        &serde_json::json!({ "deleted": digest }),
    ))
}
