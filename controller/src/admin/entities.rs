//! Rules and tiers: named entities of the document, created, read, replaced and deleted by
//! name. A change is validated with the whole document (a tier whose limits do not fit a
//! rule that counts by tier is refused), and errors about the entity name its own fields.

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use serde::de::DeserializeOwned;
use serde::Serialize;
use sluice_protocol::config::{ConfigDocument, Tier};
use sluice_protocol::Rule;

use super::auth::{Admin, Reader};
use super::{
    document_writable, if_match, json_body, missing, versioned, with_document, AdminState,
};
use crate::config::{Author, ChangeError, FieldError};
use crate::error::{ApiError, Body};

/// What rules and tiers have in common here.
trait Named: Clone + Serialize + DeserializeOwned {
    /// `rule`, `tier`: in messages and audit actions.
    const KIND: &'static str;
    /// `rules`, `tiers`: their place in the document.
    const FIELD: &'static str;
    fn name(&self) -> &str;
    fn all(document: &ConfigDocument) -> &Vec<Self>;
    fn all_mut(document: &mut ConfigDocument) -> &mut Vec<Self>;
}

impl Named for Rule {
    const KIND: &'static str = "rule";
    const FIELD: &'static str = "rules";
    fn name(&self) -> &str {
        &self.name
    }
    fn all(document: &ConfigDocument) -> &Vec<Self> {
        &document.rules
    }
    fn all_mut(document: &mut ConfigDocument) -> &mut Vec<Self> {
        &mut document.rules
    }
}

impl Named for Tier {
    const KIND: &'static str = "tier";
    const FIELD: &'static str = "tiers";
    fn name(&self) -> &str {
        &self.name
    }
    fn all(document: &ConfigDocument) -> &Vec<Self> {
        &document.tiers
    }
    fn all_mut(document: &mut ConfigDocument) -> &mut Vec<Self> {
        &mut document.tiers
    }
}

/// An error about the entity at `index` names the entity's own field (`window`, not
/// `rules[3].window`); errors about other parts of the document keep their full name.
fn relative<T: Named>(index: usize, error: ChangeError) -> ChangeError {
    match error {
        ChangeError::Invalid(FieldError { field, message }) => {
            let prefix = format!("{}[{index}]", T::FIELD);
            let field = match field.strip_prefix(&prefix) {
                Some("") => String::new(),
                Some(rest) if rest.starts_with('.') => rest.trim_start_matches('.').to_owned(),
                _ => field,
            };
            ChangeError::Invalid(FieldError { field, message })
        }
        other => other,
    }
}

fn list<T: Named>(state: &AdminState) -> Response {
    let snapshot = state.config.snapshot();
    versioned(StatusCode::OK, snapshot.version, T::all(&snapshot.document))
}

fn get<T: Named>(state: &AdminState, name: &str) -> Result<Response, ApiError> {
    let snapshot = state.config.snapshot();
    let found = T::all(&snapshot.document)
        .iter()
        .find(|e| e.name() == name)
        .ok_or_else(|| ApiError::from(missing(T::KIND, name)))?;
    Ok(versioned(StatusCode::OK, snapshot.version, found))
}

/// Creates (`replace: None`) or replaces the entity `replace` names.
async fn put<T: Named>(
    state: &AdminState,
    caller: &str,
    headers: &HeaderMap,
    replace: Option<&str>,
    body: &[u8],
) -> Result<Response, ApiError> {
    document_writable(state)?;
    let entity: T = json_body(body)?;
    if let Some(name) = replace {
        if entity.name() != name {
            return Err(ApiError::invalid(
                "name",
                format!(
                    "the body names `{}`, the path `{name}` (rename by delete and create)",
                    entity.name()
                ),
            ));
        }
    }
    let action = format!(
        "{}.{}",
        T::KIND,
        if replace.is_some() {
            "update"
        } else {
            "create"
        }
    );
    let author = Author {
        actor: caller,
        action: &action,
        target: entity.name(),
    };
    // Where the entity stands in the document, for naming its fields in errors.
    let index_cell = std::sync::atomic::AtomicUsize::new(0);
    let snapshot = state
        .config
        .change(&author, if_match(headers)?, |snapshot| {
            with_document(snapshot, |document| {
                let all = T::all_mut(document);
                let position = all.iter().position(|e| e.name() == entity.name());
                match (position, replace.is_some()) {
                    (Some(_), false) => {
                        return Err(ChangeError::Conflict(format!(
                            "there is a {} `{}` already (PUT replaces it)",
                            T::KIND,
                            entity.name()
                        )))
                    }
                    (None, true) => return Err(missing(T::KIND, entity.name())),
                    (Some(at), true) => {
                        all[at] = entity.clone();
                        index_cell.store(at, std::sync::atomic::Ordering::Relaxed);
                    }
                    (None, false) => {
                        all.push(entity.clone());
                        index_cell.store(all.len() - 1, std::sync::atomic::Ordering::Relaxed);
                    }
                }
                Ok(serde_json::to_value(&entity).unwrap_or_default())
            })
        })
        .await
        .map_err(|e| {
            ApiError::from(relative::<T>(
                index_cell.load(std::sync::atomic::Ordering::Relaxed),
                e,
            ))
        })?;
    let status = if replace.is_some() {
        StatusCode::OK
    } else {
        StatusCode::CREATED
    };
    Ok(versioned(status, snapshot.version, &entity))
}

async fn delete<T: Named>(
    state: &AdminState,
    caller: &str,
    headers: &HeaderMap,
    name: &str,
) -> Result<Response, ApiError> {
    document_writable(state)?;
    let action = format!("{}.delete", T::KIND);
    let author = Author {
        actor: caller,
        action: &action,
        target: name,
    };
    let snapshot = state
        .config
        .change(&author, if_match(headers)?, |snapshot| {
            with_document(snapshot, |document| {
                let all = T::all_mut(document);
                let at = all
                    .iter()
                    .position(|e| e.name() == name)
                    .ok_or_else(|| missing(T::KIND, name))?;
                let removed = all.remove(at);
                Ok(serde_json::json!({ "deleted": removed }))
            })
        })
        .await?;
    Ok(versioned(
        StatusCode::OK,
        snapshot.version,
        &serde_json::json!({ "deleted": name }),
    ))
}

#[utoipa::path(get, path = "/v1/admin/rules", tag = "rules",
    responses((status = 200, description = "Every rule, in the order they apply", body = Vec<Rule>)),
    security(("bearer" = [])))]
pub async fn list_rules(State(state): State<AdminState>, _: Reader) -> Response {
    list::<Rule>(&state)
}

#[utoipa::path(post, path = "/v1/admin/rules", tag = "rules", request_body = Rule,
    params(("If-Match" = Option<String>, Header, description = "The version the change was made from")),
    responses((status = 201, body = Rule), (status = 400, body = sluice_protocol::admin::ErrorBody),
              (status = 409, body = sluice_protocol::admin::ErrorBody)),
    security(("bearer" = [])))]
pub async fn create_rule(
    State(state): State<AdminState>,
    Admin(caller): Admin,
    headers: HeaderMap,
    Body(body): Body,
) -> Result<Response, ApiError> {
    put::<Rule>(&state, &caller.name, &headers, None, &body).await
}

#[utoipa::path(get, path = "/v1/admin/rules/{name}", tag = "rules",
    params(("name" = String, Path)),
    responses((status = 200, body = Rule), (status = 404, body = sluice_protocol::admin::ErrorBody)),
    security(("bearer" = [])))]
pub async fn get_rule(
    State(state): State<AdminState>,
    _: Reader,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    get::<Rule>(&state, &name)
}

#[utoipa::path(put, path = "/v1/admin/rules/{name}", tag = "rules", request_body = Rule,
    params(("name" = String, Path),
           ("If-Match" = Option<String>, Header, description = "The version the change was made from")),
    responses((status = 200, body = Rule), (status = 400, body = sluice_protocol::admin::ErrorBody),
              (status = 404, body = sluice_protocol::admin::ErrorBody),
              (status = 409, body = sluice_protocol::admin::ErrorBody)),
    security(("bearer" = [])))]
pub async fn update_rule(
    State(state): State<AdminState>,
    Admin(caller): Admin,
    Path(name): Path<String>,
    headers: HeaderMap,
    Body(body): Body,
) -> Result<Response, ApiError> {
    put::<Rule>(&state, &caller.name, &headers, Some(&name), &body).await
}

#[utoipa::path(delete, path = "/v1/admin/rules/{name}", tag = "rules",
    params(("name" = String, Path),
           ("If-Match" = Option<String>, Header, description = "The version the change was made from")),
    responses((status = 200, description = "Deleted"), (status = 404, body = sluice_protocol::admin::ErrorBody),
              (status = 409, body = sluice_protocol::admin::ErrorBody)),
    security(("bearer" = [])))]
pub async fn delete_rule(
    State(state): State<AdminState>,
    Admin(caller): Admin,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    delete::<Rule>(&state, &caller.name, &headers, &name).await
}

#[utoipa::path(get, path = "/v1/admin/tiers", tag = "tiers",
    responses((status = 200, body = Vec<Tier>)),
    security(("bearer" = [])))]
pub async fn list_tiers(State(state): State<AdminState>, _: Reader) -> Response {
    list::<Tier>(&state)
}

#[utoipa::path(post, path = "/v1/admin/tiers", tag = "tiers", request_body = Tier,
    params(("If-Match" = Option<String>, Header, description = "The version the change was made from")),
    responses((status = 201, body = Tier), (status = 400, body = sluice_protocol::admin::ErrorBody),
              (status = 409, body = sluice_protocol::admin::ErrorBody)),
    security(("bearer" = [])))]
pub async fn create_tier(
    State(state): State<AdminState>,
    Admin(caller): Admin,
    headers: HeaderMap,
    Body(body): Body,
) -> Result<Response, ApiError> {
    put::<Tier>(&state, &caller.name, &headers, None, &body).await
}

#[utoipa::path(get, path = "/v1/admin/tiers/{name}", tag = "tiers",
    params(("name" = String, Path)),
    responses((status = 200, body = Tier), (status = 404, body = sluice_protocol::admin::ErrorBody)),
    security(("bearer" = [])))]
pub async fn get_tier(
    State(state): State<AdminState>,
    _: Reader,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    get::<Tier>(&state, &name)
}

#[utoipa::path(put, path = "/v1/admin/tiers/{name}", tag = "tiers", request_body = Tier,
    params(("name" = String, Path),
           ("If-Match" = Option<String>, Header, description = "The version the change was made from")),
    responses((status = 200, body = Tier), (status = 400, body = sluice_protocol::admin::ErrorBody),
              (status = 404, body = sluice_protocol::admin::ErrorBody),
              (status = 409, body = sluice_protocol::admin::ErrorBody)),
    security(("bearer" = [])))]
pub async fn update_tier(
    State(state): State<AdminState>,
    Admin(caller): Admin,
    Path(name): Path<String>,
    headers: HeaderMap,
    Body(body): Body,
) -> Result<Response, ApiError> {
    put::<Tier>(&state, &caller.name, &headers, Some(&name), &body).await
}

#[utoipa::path(delete, path = "/v1/admin/tiers/{name}", tag = "tiers",
    params(("name" = String, Path),
           ("If-Match" = Option<String>, Header, description = "The version the change was made from")),
    responses((status = 200, description = "Deleted"), (status = 400, body = sluice_protocol::admin::ErrorBody),
              (status = 404, body = sluice_protocol::admin::ErrorBody),
              (status = 409, body = sluice_protocol::admin::ErrorBody)),
    security(("bearer" = [])))]
pub async fn delete_tier(
    State(state): State<AdminState>,
    Admin(caller): Admin,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    delete::<Tier>(&state, &caller.name, &headers, &name).await
}
