//! Brute-force protection's blocks, as operators see and lift them. Blocks live beside the
//! configuration (`crate::protection`): listing them reads the store, lifting one ends it at
//! once for every controller (within a second) and is recorded in the audit log.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::Response;
use sluice_protocol::admin::{Block, BlocksBody};
use sluice_protocol::ListKind;

use super::auth::{Admin, Reader};
use super::{versioned, AdminState};
use crate::config::validate::{format_rfc3339_ms, list_value};
use crate::config::Author;
use crate::error::ApiError;
use crate::protection::MAX_BLOCKS;
use crate::store::now_ms;

#[utoipa::path(get, path = "/v1/admin/protection/blocks", tag = "protection",
    responses((status = 200, description = "The addresses protection blocks now, and until when", body = BlocksBody),
              (status = 503, body = sluice_protocol::admin::ErrorBody)),
    security(("bearer" = [])))]
pub async fn list(State(state): State<AdminState>, _: Reader) -> Result<Response, ApiError> {
    let blocks = state
        .config
        .store()
        .blocks(now_ms(), MAX_BLOCKS)
        .await
        .map_err(|e| ApiError::store_unavailable(&e))?;
    let body = BlocksBody {
        blocks: blocks
            .into_iter()
            .map(|(ip, until)| Block {
                ip,
                until: format_rfc3339_ms(until),
            })
            .collect(),
    };
    let version = state.config.snapshot().version;
    Ok(versioned(StatusCode::OK, version, &body))
}

#[utoipa::path(delete, path = "/v1/admin/protection/blocks/{ip}", tag = "protection",
    params(("ip" = String, Path, description = "The blocked address, as listed (`192.0.2.7/32`; `/` written `%2F`) or bare")),
    responses((status = 204, description = "Lifted"),
              (status = 400, body = sluice_protocol::admin::ErrorBody),
              (status = 404, body = sluice_protocol::admin::ErrorBody),
              (status = 503, body = sluice_protocol::admin::ErrorBody)),
    security(("bearer" = [])))]
pub async fn lift(
    State(state): State<AdminState>,
    Admin(caller): Admin,
    Path(ip): Path<String>,
) -> Result<StatusCode, ApiError> {
    let address =
        list_value(ListKind::Ip, &ip).map_err(|error| ApiError::invalid("ip", error.message))?;
    let lifted = state
        .config
        .store()
        .remove_block(&address)
        .await
        .map_err(|e| ApiError::store_unavailable(&e))?;
    if !lifted {
        return Err(ApiError::not_found(format!(
            "protection does not block `{address}`"
        )));
    }
    let author = Author {
        actor: &caller.name,
        action: "protection.lift",
        target: &address,
    };
    state
        .config
        .record(&author, serde_json::json!({ "ip": address }))
        .await
        .map_err(|e| ApiError::store_unavailable(&e))?;
    Ok(StatusCode::NO_CONTENT)
}
