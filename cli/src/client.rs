//! The admin API over HTTP: one request at a time, every status an answer, errors shown in
//! the API's own words (`status: field: message`). [`Api`] is the one call the commands
//! make, so that the read-modify-write loop ([`crate::merge`]) can be tried against a
//! scripted controller.

use std::io::{BufRead, BufReader};
use std::time::Duration;

use serde::de::DeserializeOwned;
use sluice_protocol::admin::{ErrorBody, ADMIN_PREFIX};

use crate::exit::Failure;

/// A successful answer: the configuration version its `ETag` names, and the body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    pub version: Option<u64>,
    pub body: String,
}

impl Answer {
    pub fn json<T: DeserializeOwned>(&self) -> Result<T, Failure> {
        parse(&self.body)
    }
}

/// Reads an answer's body, or says it does not read.
pub fn parse<T: DeserializeOwned>(body: &str) -> Result<T, Failure> {
    serde_json::from_str(body).map_err(|e| {
        Failure::refused(format!(
            "the controller's answer does not read ({e}): {body}"
        ))
    })
}

/// A call that got no answer a command can use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// The controller could not be reached, or its answer could not be read.
    Unreachable(String),
    /// It answered with a status of 400 or more.
    Status {
        status: u16,
        /// The API's error body, when the answer is one.
        error: Option<ErrorBody>,
        /// The body as it came.
        raw: String,
        /// The configuration's version, when the answer names it (a `409 version_mismatch`
        /// does).
        version: Option<u64>,
    },
}

impl Refusal {
    pub fn status(&self) -> Option<u16> {
        match self {
            Refusal::Status { status, .. } => Some(*status),
            Refusal::Unreachable(_) => None,
        }
    }

    /// The API's error code (`version_mismatch`, `conflict`, `not_found`…).
    pub fn code(&self) -> Option<&str> {
        match self {
            Refusal::Status {
                error: Some(error), ..
            } => Some(&error.error),
            _ => None,
        }
    }
}

impl From<Refusal> for Failure {
    /// `status: field: message`, or `status: message` when the error names no field.
    fn from(refusal: Refusal) -> Failure {
        match refusal {
            Refusal::Unreachable(message) => Failure::refused(message),
            Refusal::Status {
                status, error, raw, ..
            } => {
                let said = match error {
                    Some(ErrorBody {
                        field: Some(field),
                        message,
                        ..
                    }) => format!("{field}: {message}"),
                    Some(error) => error.message,
                    None => raw,
                };
                Failure::refused(format!("{status}: {said}"))
            }
        }
    }
}

/// The one call every command makes: `method` on `path` (under `/v1/admin`), with a body
/// of a media type, and `If-Match: "version"` when a version is given.
pub trait Api {
    fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<(&str, String)>,
        if_match: Option<u64>,
    ) -> Result<Answer, Refusal>;
}

pub struct Client {
    base: String,
    token: Option<String>,
    /// `--if-match`: sent with every change a command makes in one call.
    if_match: Option<u64>,
    agent: ureq::Agent,
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

    /// The version `--if-match` gave, if it did.
    pub fn pinned(&self) -> Option<u64> {
        self.if_match
    }

    fn request(
        &self,
        method: &str,
        path: &str,
        content_type: Option<&str>,
        if_match: Option<u64>,
    ) -> Result<ureq::http::request::Builder, Refusal> {
        let url = format!("{}{ADMIN_PREFIX}{path}", self.base);
        let method_name = ureq::http::Method::from_bytes(method.as_bytes())
            .map_err(|e| Refusal::Unreachable(format!("{method}: {e}")))?;
        let mut request = ureq::http::Request::builder().method(method_name).uri(&url);
        if let Some(token) = &self.token {
            request = request.header("authorization", format!("Bearer {token}"));
        }
        if let Some(version) = if_match {
            request = request.header("if-match", format!("\"{version}\""));
        }
        if let Some(content_type) = content_type {
            request = request.header("content-type", content_type);
        }
        Ok(request)
    }

    fn unreachable(&self, error: impl std::fmt::Display) -> Refusal {
        Refusal::Unreachable(format!(
            "cannot reach the controller at {}: {error}",
            self.base
        ))
    }

    pub fn get(&self, path: &str) -> Result<Answer, Refusal> {
        self.call("GET", path, None, None)
    }

    /// A `DELETE`, with `--if-match` when it was given.
    pub fn delete(&self, path: &str) -> Result<Answer, Refusal> {
        self.call("DELETE", path, None, self.if_match)
    }

    /// A JSON body, with `--if-match` when it was given.
    pub fn json(
        &self,
        method: &str,
        path: &str,
        body: &serde_json::Value,
    ) -> Result<Answer, Refusal> {
        self.call(
            method,
            path,
            Some(("application/json", body.to_string())),
            self.if_match,
        )
    }

    /// `GET path` as server-sent events: `on_event(event, data)` for each event until it
    /// returns `false` or the controller ends the stream (`Ok(false)` then). No time limit:
    /// a stream is open for as long as it is read.
    pub fn events(
        &self,
        path: &str,
        mut on_event: impl FnMut(&str, &str) -> bool,
    ) -> Result<bool, Refusal> {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_connect(Some(Duration::from_secs(10)))
            .build()
            .into();
        let request = self
            .request("GET", path, None, None)?
            .header("accept", "text/event-stream")
            .body(())
            .map_err(|e| self.unreachable(e))?;
        let mut response = agent.run(request).map_err(|e| self.unreachable(e))?;
        let status = response.status().as_u16();
        if status >= 400 {
            let raw = response
                .body_mut()
                .read_to_string()
                .map_err(|e| self.unreachable(e))?;
            return Err(refusal(status, raw, None));
        }
        let reader = BufReader::new(response.body_mut().as_reader());
        let (mut event, mut data) = (String::new(), String::new());
        for line in reader.lines() {
            let line = line.map_err(|e| self.unreachable(e))?;
            if line.is_empty() {
                if !data.is_empty() && !on_event(&event, &data) {
                    return Ok(true);
                }
                event.clear();
                data.clear();
            } else if let Some(name) = line.strip_prefix("event:") {
                name.trim().clone_into(&mut event);
            } else if let Some(text) = line.strip_prefix("data:") {
                if !data.is_empty() {
                    data.push('\n');
                }
                data.push_str(text.strip_prefix(' ').unwrap_or(text));
            }
            // `:` lines are the stream's keep-alive comments.
        }
        Ok(false)
    }
}

fn refusal(status: u16, raw: String, version: Option<u64>) -> Refusal {
    Refusal::Status {
        status,
        error: serde_json::from_str::<ErrorBody>(&raw).ok(),
        raw,
        version,
    }
}

impl Api for Client {
    fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<(&str, String)>,
        if_match: Option<u64>,
    ) -> Result<Answer, Refusal> {
        let (content_type, text) = match body {
            Some((content_type, text)) => (Some(content_type), text),
            None => (None, String::new()),
        };
        let request = self
            .request(method, path, content_type, if_match)?
            .body(text)
            .map_err(|e| self.unreachable(e))?;
        let mut response = self.agent.run(request).map_err(|e| self.unreachable(e))?;
        let status = response.status().as_u16();
        let version = response
            .headers()
            .get("etag")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim_start_matches("W/").trim_matches('"').parse().ok());
        let body = response
            .body_mut()
            .read_to_string()
            .map_err(|e| self.unreachable(e))?;
        if status >= 400 {
            return Err(refusal(status, body, version));
        }
        Ok(Answer { version, body })
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
