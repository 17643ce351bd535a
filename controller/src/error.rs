//! The one error shape of every API the controller serves:
//! `{"error":"…","field":"…","message":"…"}` with a status that says the same.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use sluice_protocol::admin::ErrorBody;

use crate::config::{ChangeError, FieldError};
use crate::store::StoreError;

#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub body: ErrorBody,
    /// The configuration's version, sent as the answer's `ETag` (a `409 version_mismatch`
    /// names the current one, so a client can retry without reading it again).
    pub version: Option<u64>,
}

impl ApiError {
    pub fn new(status: StatusCode, error: &str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            body: ErrorBody {
                error: error.to_owned(),
                field: None,
                message: message.into(),
            },
            version: None,
        }
    }

    /// A `400` about `field`.
    pub fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        let mut error = ApiError::new(StatusCode::BAD_REQUEST, "invalid_request", message);
        let field = field.into();
        error.body.field = (!field.is_empty()).then_some(field);
        error
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        ApiError::new(StatusCode::NOT_FOUND, "not_found", message)
    }

    pub fn conflict(message: impl Into<String>) -> Self {
        ApiError::new(StatusCode::CONFLICT, "conflict", message)
    }

    pub fn store_unavailable(error: &StoreError) -> Self {
        tracing::warn!(%error, "store unavailable");
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "store_unavailable",
            error.to_string(),
        )
    }
}

impl From<FieldError> for ApiError {
    fn from(error: FieldError) -> Self {
        ApiError::invalid(error.field, error.message)
    }
}

impl From<ChangeError> for ApiError {
    fn from(error: ChangeError) -> Self {
        match error {
            ChangeError::Invalid(error) => error.into(),
            ChangeError::VersionMismatch { current } => {
                let mut error = ApiError::new(
                    StatusCode::CONFLICT,
                    "version_mismatch",
                    format!(
                        "the configuration is at version {current}: read it again and retry \
                         (If-Match names the version a change was made from)"
                    ),
                );
                error.body.field = Some("If-Match".to_owned());
                error.version = Some(current);
                error
            }
            ChangeError::NotFound(message) => ApiError::not_found(message),
            ChangeError::Conflict(message) => ApiError::conflict(message),
            ChangeError::Store(error) => ApiError::store_unavailable(&error),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status, Json(self.body)).into_response();
        if let Some(version) = self.version {
            if let Ok(tag) = axum::http::HeaderValue::from_str(&crate::check::etag(version)) {
                response.headers_mut().insert(axum::http::header::ETAG, tag);
            }
        }
        response
    }
}

/// Parses a JSON body, naming the offending field on failure.
pub fn parse_json<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    let mut deserializer = serde_json::Deserializer::from_slice(body);
    serde_path_to_error::deserialize(&mut deserializer).map_err(|e| {
        let message = e.inner().to_string();
        let path = e.path().to_string();
        ApiError::invalid(field_of(&path, &message), message)
    })
}

/// The field an error is about: its path, or for a field that is missing, that field (the
/// path then names the object that lacks it).
pub fn field_of(path: &str, message: &str) -> String {
    // serde names a missing or repeated field in its message, not in the path.
    let missing = ["missing field `", "duplicate field `"]
        .iter()
        .find_map(|prefix| message.strip_prefix(prefix))
        .and_then(|rest| rest.split_once('`'))
        .map(|(name, _)| name);
    match (path, missing) {
        (".", Some(name)) => name.to_owned(),
        (".", None) => String::new(),
        (path, Some(name)) => format!("{path}.{name}"),
        (path, None) => path.to_owned(),
    }
}

/// A query string, parsed into `T`; a bad one is refused in the one error shape, naming the
/// parameter.
pub struct ValidQuery<T>(pub T);

impl<T: serde::de::DeserializeOwned, S: Send + Sync> axum::extract::FromRequestParts<S>
    for ValidQuery<T>
{
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        _state: &S,
    ) -> Result<Self, Self::Rejection> {
        let query = parts.uri.query().unwrap_or_default();
        let deserializer =
            serde_urlencoded::Deserializer::new(form_urlencoded_pairs(query.as_bytes()));
        serde_path_to_error::deserialize(deserializer)
            .map(ValidQuery)
            .map_err(|e| {
                let message = e.inner().to_string();
                let path = e.path().to_string();
                let field = field_of(&path, &message);
                // An unknown parameter is named in the message, not the path.
                let field = if field.is_empty() {
                    message
                        .strip_prefix("unknown field `")
                        .and_then(|rest| rest.split_once('`'))
                        .map(|(name, _)| name.to_owned())
                        .unwrap_or_default()
                } else {
                    field
                };
                ApiError::invalid(field, message)
            })
    }
}

fn form_urlencoded_pairs(query: &[u8]) -> form_urlencoded::Parse<'_> {
    form_urlencoded::parse(query)
}

/// A request body; one over the route's limit is refused as `413 too_large`.
pub struct Body(pub axum::body::Bytes);

impl<S: Send + Sync> axum::extract::FromRequest<S> for Body {
    type Rejection = ApiError;

    async fn from_request(
        request: axum::extract::Request,
        state: &S,
    ) -> Result<Self, Self::Rejection> {
        axum::body::Bytes::from_request(request, state)
            .await
            .map(Body)
            .map_err(|rejection| {
                let status = rejection.status();
                if status == StatusCode::PAYLOAD_TOO_LARGE {
                    ApiError::new(
                        status,
                        "too_large",
                        "the body is larger than this route takes",
                    )
                } else {
                    ApiError::new(status, "invalid_request", rejection.body_text())
                }
            })
    }
}

/// An unknown path, in the one error shape.
pub async fn not_found() -> ApiError {
    ApiError::not_found("there is no such route (see /v1/admin/openapi.json)")
}

/// A route asked with a method it does not take, in the one error shape.
pub async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "this route does not take that method (see /v1/admin/openapi.json)",
    )
}
