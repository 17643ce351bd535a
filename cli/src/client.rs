//! The admin API over HTTP: one request at a time, every status an answer, errors shown in
//! the API's own words (`field: message`).

use std::time::Duration;

use serde::de::DeserializeOwned;
use sluice_protocol::admin::{ErrorBody, ADMIN_PREFIX};

pub struct Client {
    base: String,
    token: Option<String>,
    if_match: Option<u64>,
    agent: ureq::Agent,
}

/// A successful answer: the version its `ETag` names, and the body.
pub struct Answer {
    pub version: Option<u64>,
    pub body: String,
}

#[derive(Debug)]
pub struct Failure(pub String);

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl Answer {
    pub fn json<T: DeserializeOwned>(&self) -> Result<T, Failure> {
        serde_json::from_str(&self.body).map_err(|e| {
            Failure(format!(
                "the controller's answer does not read ({e}): {}",
                self.body
            ))
        })
    }
}

impl Client {
    pub fn new(url: &str, token: Option<String>, if_match: Option<u64>) -> Client {
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(30)))
            .build()
            .into();
        Client {
            base: url.trim_end_matches('/').to_owned(),
            token,
            if_match,
            agent,
        }
    }

    /// `method` on `path` (under /v1/admin) with a body of `content_type`; a status of 400
    /// or more is a [`Failure`] naming the field the API named.
    pub fn send(
        &self,
        method: &str,
        path: &str,
        body: Option<(&str, String)>,
    ) -> Result<Answer, Failure> {
        let url = format!("{}{ADMIN_PREFIX}{path}", self.base);
        let method_name = ureq::http::Method::from_bytes(method.as_bytes())
            .map_err(|e| Failure(format!("{method}: {e}")))?;
        let mut request = ureq::http::Request::builder().method(method_name).uri(&url);
        if let Some(token) = &self.token {
            request = request.header("authorization", format!("Bearer {token}"));
        }
        if let (Some(version), true) = (self.if_match, method != "GET") {
            request = request.header("if-match", format!("\"{version}\""));
        }
        let (content_type, text) = body.unwrap_or(("application/json", String::new()));
        if !text.is_empty() {
            request = request.header("content-type", content_type);
        }
        let request = request
            .body(text)
            .map_err(|e| Failure(format!("{url}: {e}")))?;
        let mut response = self
            .agent
            .run(request)
            .map_err(|e| Failure(format!("cannot reach the controller at {}: {e}", self.base)))?;
        let status = response.status().as_u16();
        let version = response
            .headers()
            .get("etag")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim_matches('"').parse().ok());
        let body = response
            .body_mut()
            .read_to_string()
            .map_err(|e| Failure(format!("{url}: {e}")))?;
        if status >= 400 {
            let said = serde_json::from_str::<ErrorBody>(&body)
                .map(|e| match e.field {
                    Some(field) => format!("{field}: {}", e.message),
                    None => e.message,
                })
                .unwrap_or(body);
            return Err(Failure(format!("{status}: {said}")));
        }
        Ok(Answer { version, body })
    }

    pub fn get(&self, path: &str) -> Result<Answer, Failure> {
        self.send("GET", path, None)
    }

    pub fn delete(&self, path: &str) -> Result<Answer, Failure> {
        self.send("DELETE", path, None)
    }

    pub fn json(
        &self,
        method: &str,
        path: &str,
        body: &serde_json::Value,
    ) -> Result<Answer, Failure> {
        self.send(method, path, Some(("application/json", body.to_string())))
    }
}

/// Percent-encodes a path segment or query value.
pub fn encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}
