//! The safelist and the denylist: entries (an address or network, a user, an API key by
//! digest, a path glob), each with an optional expiry and a reason. An entry's id comes from
//! its list, kind and value, so the same entry has the same id wherever it was made.

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use sha2::{Digest, Sha256};
use sluice_protocol::admin::{ListEntryBody, NewListEntry};
use sluice_protocol::config::{ConfigDocument, ListEntry, ListName};

use super::auth::{hex, Admin, Reader};
use super::{document_writable, if_match, json_body, versioned, with_document, AdminState};
use crate::config::validate;
use crate::config::{Author, ChangeError};
use crate::error::{ApiError, Body};
use crate::store::now_ms;

pub fn entry_id(list: ListName, entry: &ListEntry) -> String {
    let digest = Sha256::digest(
        format!(
            "{}\0{}\0{}",
            list.as_str(),
            entry.kind.as_str(),
            entry.value
        )
        .as_bytes(),
    );
    hex(digest.get(..8).unwrap_or_default())
}

fn parse_list(name: &str) -> Result<ListName, ApiError> {
    match name {
        "safelist" => Ok(ListName::Safelist),
        "denylist" => Ok(ListName::Denylist),
        other => Err(ApiError::not_found(format!(
            "there is no list `{other}` (safelist or denylist)"
        ))),
    }
}

fn entries_mut(document: &mut ConfigDocument, list: ListName) -> &mut Vec<ListEntry> {
    match list {
        ListName::Safelist => &mut document.safelist,
        ListName::Denylist => &mut document.denylist,
    }
}

fn entries(document: &ConfigDocument, list: ListName) -> &Vec<ListEntry> {
    match list {
        ListName::Safelist => &document.safelist,
        ListName::Denylist => &document.denylist,
    }
}

fn body(list: ListName, entry: &ListEntry) -> ListEntryBody {
    ListEntryBody {
        id: entry_id(list, entry),
        list,
        entry: entry.clone(),
    }
}

/// The entry a request asks for, checked and written the one way it is stored.
fn new_entry(request: NewListEntry) -> Result<ListEntry, ApiError> {
    let value = validate::list_value(request.kind, &request.value)?;
    let expires_at = match (&request.expires_at, &request.expires_in) {
        (Some(_), Some(_)) => {
            return Err(ApiError::invalid(
                "expires_in",
                "give expires_at or expires_in, not both",
            ))
        }
        (Some(at), None) => {
            let ms = validate::rfc3339_ms("expires_at", at)?;
            if ms <= now_ms() {
                return Err(ApiError::invalid(
                    "expires_at",
                    format!("`{at}` is past: the entry would never apply"),
                ));
            }
            Some(validate::format_rfc3339(ms))
        }
        (None, Some(within)) => {
            let ms = sluice_protocol::duration::parse_millis(within)
                .map_err(|e| ApiError::invalid("expires_in", e.to_string()))?;
            Some(validate::format_rfc3339_ms(now_ms().saturating_add(ms)))
        }
        (None, None) => None,
    };
    let entry = ListEntry {
        kind: request.kind,
        value,
        expires_at,
        reason: request.reason,
        created_at: Some(validate::format_rfc3339(now_ms())),
    };
    validate::validate_list_entry(&entry)?;
    Ok(entry)
}

#[utoipa::path(get, path = "/v1/admin/lists/{list}", tag = "lists",
    params(("list" = ListName, Path)),
    responses((status = 200, body = Vec<ListEntryBody>), (status = 404, body = sluice_protocol::admin::ErrorBody)),
    security(("bearer" = [])))]
pub async fn list(
    State(state): State<AdminState>,
    _: Reader,
    Path(list): Path<String>,
) -> Result<Response, ApiError> {
    let list = parse_list(&list)?;
    let snapshot = state.config.snapshot();
    let all: Vec<ListEntryBody> = entries(&snapshot.document, list)
        .iter()
        .map(|entry| body(list, entry))
        .collect();
    Ok(versioned(StatusCode::OK, snapshot.version, &all))
}

#[utoipa::path(get, path = "/v1/admin/lists/{list}/{id}", tag = "lists",
    params(("list" = ListName, Path), ("id" = String, Path)),
    responses((status = 200, body = ListEntryBody), (status = 404, body = sluice_protocol::admin::ErrorBody)),
    security(("bearer" = [])))]
pub async fn get(
    State(state): State<AdminState>,
    _: Reader,
    Path((list, id)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let list = parse_list(&list)?;
    let snapshot = state.config.snapshot();
    let entry = entries(&snapshot.document, list)
        .iter()
        .find(|entry| entry_id(list, entry) == id)
        .ok_or_else(|| {
            ApiError::not_found(format!("there is no entry `{id}` in the {}", list.as_str()))
        })?;
    Ok(versioned(
        StatusCode::OK,
        snapshot.version,
        &body(list, entry),
    ))
}

#[utoipa::path(post, path = "/v1/admin/lists/{list}", tag = "lists", request_body = NewListEntry,
    params(("list" = ListName, Path),
           ("If-Match" = Option<String>, Header, description = "The version the change was made from")),
    responses((status = 201, body = ListEntryBody), (status = 400, body = sluice_protocol::admin::ErrorBody),
              (status = 404, description = "There is no such list", body = sluice_protocol::admin::ErrorBody),
              (status = 409, body = sluice_protocol::admin::ErrorBody)),
    security(("bearer" = [])))]
pub async fn add(
    State(state): State<AdminState>,
    Admin(caller): Admin,
    Path(list): Path<String>,
    headers: HeaderMap,
    Body(request): Body,
) -> Result<Response, ApiError> {
    let list = parse_list(&list)?;
    document_writable(&state)?;
    let entry = new_entry(json_body(&request)?)?;
    let id = entry_id(list, &entry);
    let author = Author {
        actor: &caller.name,
        action: "list.add",
        target: &id,
    };
    let snapshot = state
        .config
        .change(&author, if_match(&headers)?, |snapshot| {
            with_document(snapshot, |document| {
                let all = entries_mut(document, list);
                if all.iter().any(|e| entry_id(list, e) == id) {
                    return Err(ChangeError::Conflict(format!(
                        "the {} has this entry already (`{id}`)",
                        list.as_str()
                    )));
                }
                all.push(entry.clone());
                Ok(serde_json::json!({ "list": list, "entry": entry }))
            })
        })
        .await?;
    Ok(versioned(
        StatusCode::CREATED,
        snapshot.version,
        &body(list, &entry),
    ))
}

#[utoipa::path(delete, path = "/v1/admin/lists/{list}/{id}", tag = "lists",
    params(("list" = ListName, Path), ("id" = String, Path),
           ("If-Match" = Option<String>, Header, description = "The version the change was made from")),
    responses((status = 200, description = "Removed"), (status = 404, body = sluice_protocol::admin::ErrorBody),
              (status = 409, body = sluice_protocol::admin::ErrorBody)),
    security(("bearer" = [])))]
pub async fn remove(
    State(state): State<AdminState>,
    Admin(caller): Admin,
    Path((list, id)): Path<(String, String)>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let list = parse_list(&list)?;
    document_writable(&state)?;
    let author = Author {
        actor: &caller.name,
        action: "list.remove",
        target: &id,
    };
    let snapshot = state
        .config
        .change(&author, if_match(&headers)?, |snapshot| {
            with_document(snapshot, |document| {
                let all = entries_mut(document, list);
                let at = all
                    .iter()
                    .position(|e| entry_id(list, e) == id)
                    .ok_or_else(|| {
                        ChangeError::NotFound(format!(
                            "there is no entry `{id}` in the {}",
                            list.as_str()
                        ))
                    })?;
                let removed = all.remove(at);
                Ok(serde_json::json!({ "list": list, "removed": removed }))
            })
        })
        .await?;
    Ok(versioned(
        StatusCode::OK,
        snapshot.version,
        &serde_json::json!({ "removed": id }),
    ))
}
