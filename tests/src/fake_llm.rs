//! A stand-in for an OpenAI-compatible model server, for the usage tests, the benchmark
//! and the demo: `POST /v1/chat/completions` answers a JSON completion or, with
//! `"stream": true`, a `text/event-stream` of chunks, and says what the request used in
//! `usage` (in the last event, when `stream_options.include_usage` asks for it, as OpenAI's
//! API does). Nothing is generated: each token of the answer is the word `tok`.
//!
//! What it used is counted from the request: the prompt a token per 4 bytes of the
//! messages' contents (at least 1), the completion `max_tokens` (default 16). A test sets
//! both with `x-fake-usage: <prompt>,<completion>`, and makes the server misbehave with
//! `x-fake-fail`: `error` (a 503 HTML page), `malformed` (JSON cut short), `no-usage`
//! (JSON without `usage`), `reset` (a stream broken off before its usage). Between events
//! it waits `x-fake-event-gap-ms` (at most 1 s).

use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};

/// Usage as the response reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Used {
    pub prompt: u64,
    pub completion: u64,
}

impl Used {
    pub fn total(&self) -> u64 {
        self.prompt + self.completion
    }

    fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "prompt_tokens": self.prompt,
            "completion_tokens": self.completion,
            "total_tokens": self.total(),
        })
    }
}

/// What the request asked, as far as the answer depends on it.
struct Asked {
    used: Used,
    stream: bool,
    include_usage: bool,
}

fn asked(headers: &HeaderMap, body: &[u8]) -> Asked {
    let request: serde_json::Value = serde_json::from_slice(body).unwrap_or_default();
    let prompt_bytes: usize = request["messages"]
        .as_array()
        .map(|messages| {
            messages
                .iter()
                .filter_map(|m| m["content"].as_str())
                .map(str::len)
                .sum()
        })
        .unwrap_or(0);
    let mut used = Used {
        prompt: (prompt_bytes as u64).div_ceil(4).max(1),
        completion: request["max_tokens"].as_u64().unwrap_or(16),
    };
    if let Some((prompt, completion)) = headers
        .get("x-fake-usage")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split_once(','))
    {
        used.prompt = prompt.trim().parse().unwrap_or(used.prompt);
        used.completion = completion.trim().parse().unwrap_or(used.completion);
    }
    Asked {
        used,
        stream: request["stream"].as_bool().unwrap_or(false),
        include_usage: request["stream_options"]["include_usage"]
            .as_bool()
            .unwrap_or(false),
    }
}

fn chunk(content: Option<&str>, usage: Option<&Used>, include_usage: bool) -> String {
    let choices = match content {
        Some(text) => serde_json::json!([{ "index": 0, "delta": { "content": text } }]),
        None => serde_json::json!([]),
    };
    let mut event = serde_json::json!({
        "id": "chatcmpl-fake",
        "object": "chat.completion.chunk",
        "model": "fake",
        "choices": choices,
    });
    if include_usage {
        event["usage"] = usage.map_or(serde_json::Value::Null, Used::json);
    }
    format!("data: {event}\n\n")
}

pub async fn chat_completions(headers: HeaderMap, body: Bytes) -> Response {
    let asked = asked(&headers, &body);
    let fail = headers
        .get("x-fake-fail")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    let gap = Duration::from_millis(
        headers
            .get("x-fake-event-gap-ms")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0u64)
            .min(1_000),
    );
    match fail.as_str() {
        "error" => {
            return (
                StatusCode::SERVICE_UNAVAILABLE,
                [(header::CONTENT_TYPE, "text/html")],
                "<html><body>overloaded</body></html>",
            )
                .into_response()
        }
        "malformed" => {
            return (
                [(header::CONTENT_TYPE, "application/json")],
                r#"{"id":"chatcmpl-fake","usage":{"total_tokens":"#,
            )
                .into_response()
        }
        _ => {}
    }
    let used = asked.used;
    if !asked.stream {
        let mut completion = serde_json::json!({
            "id": "chatcmpl-fake",
            "object": "chat.completion",
            "model": "fake",
            "choices": [{
                "index": 0,
                "message": { "role": "assistant", "content": "tok ".repeat(used.completion.min(64) as usize) },
                "finish_reason": "stop",
            }],
        });
        if fail != "no-usage" {
            completion["usage"] = used.json();
        }
        return (
            [
                (header::CONTENT_TYPE, "application/json".to_owned()),
                (
                    header::HeaderName::from_static("x-usage-total-tokens"),
                    used.total().to_string(),
                ),
            ],
            completion.to_string(),
        )
            .into_response();
    }
    let include_usage = asked.include_usage && fail != "no-usage";
    let reset = fail == "reset";
    // The content in at most 8 events, then the usage event, then `[DONE]`.
    let events = used.completion.clamp(1, 8);
    let stream = futures_util::stream::unfold(0u64, move |sent| async move {
        if sent > events + 1 {
            return None;
        }
        if sent > 0 {
            tokio::time::sleep(gap).await;
        }
        let event = if sent < events {
            chunk(Some("tok "), None, include_usage)
        } else if sent == events {
            if reset {
                // Broken off before its usage: the connection ends mid-body.
                return Some((Err(std::io::Error::other("reset on purpose")), u64::MAX));
            }
            if include_usage {
                chunk(None, Some(&used), true)
            } else {
                String::new()
            }
        } else {
            "data: [DONE]\n\n".to_owned()
        };
        Some((Ok::<_, std::io::Error>(Bytes::from(event)), sent + 1))
    });
    (
        [
            (header::CONTENT_TYPE, "text/event-stream"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        Body::from_stream(stream),
    )
        .into_response()
}
