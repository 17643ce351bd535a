//! The dashboard at `/dashboard`: one page of plain HTML, CSS and JavaScript, built into the
//! binary, that reads and changes everything through the admin API with the token the
//! operator types in. The page itself holds no data, so it is served without a token; its
//! Content-Security-Policy lets it load and call nothing but this address (it works
//! air-gapped, and a page that tried to reach elsewhere would be stopped by the browser).

use axum::extract::Path;
use axum::http::{header, HeaderValue};
use axum::response::{IntoResponse, Response};

use crate::error::ApiError;

const INDEX: &str = include_str!("../../dashboard/index.html");

/// The page's other files: name, content type, bytes.
const ASSETS: &[(&str, &str, &str)] = &[
    (
        "dashboard.js",
        "text/javascript; charset=utf-8",
        include_str!("../../dashboard/dashboard.js"),
    ),
    (
        "dashboard.css",
        "text/css; charset=utf-8",
        include_str!("../../dashboard/dashboard.css"),
    ),
    (
        "favicon.svg",
        "image/svg+xml",
        include_str!("../../dashboard/favicon.svg"),
    ),
];

/// Only this address, only our own files; no frames, no forms posted anywhere.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; \
                   connect-src 'self'; base-uri 'none'; form-action 'none'; \
                   frame-ancestors 'none'";

fn reply(content_type: &'static str, body: &'static str) -> Response {
    let mut response = body.into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    // The files change with the binary: a browser asks again rather than keep an old page.
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    response
}

pub async fn page() -> Response {
    reply("text/html; charset=utf-8", INDEX)
}

pub async fn asset(Path(name): Path<String>) -> Result<Response, ApiError> {
    ASSETS
        .iter()
        .find(|(asset, _, _)| *asset == name)
        .map(|(_, content_type, body)| reply(content_type, body))
        .ok_or_else(|| ApiError::not_found(format!("the dashboard has no file `{name}`")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_page_names_only_files_that_are_served() {
        for (name, _, _) in ASSETS {
            if *name != "favicon.svg" || INDEX.contains(name) {
                assert!(INDEX.contains(&format!("/dashboard/{name}")), "{name}");
            }
        }
        // Nothing from elsewhere: every src and href is one of ours.
        for attribute in ["src=\"", "href=\""] {
            for (_, rest) in INDEX
                .match_indices(attribute)
                .map(|(i, _)| INDEX.split_at(i))
            {
                let value = rest[attribute.len()..]
                    .split('"')
                    .next()
                    .unwrap_or_default();
                assert!(
                    value.starts_with("/dashboard/") || value.starts_with('#'),
                    "{attribute}{value}"
                );
            }
        }
    }
}
