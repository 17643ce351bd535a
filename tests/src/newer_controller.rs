//! A stand-in for a controller one release ahead: an HTTP proxy in front of a real
//! controller that adds fields this release does not know to every JSON object of every
//! reply (the check decisions, every rule and match of the configuration view, ...), as a
//! later release may. Everything else passes through as it is.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use axum::body::{to_bytes, Body};
use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::response::Response;
use axum::Router;

/// Fields a later release might add: a scalar, a list and an object.
fn added_fields() -> serde_json::Map<String, serde_json::Value> {
    let serde_json::Value::Object(fields) = serde_json::json!({
        "next_release_shard": 7,
        "next_release_weights": [1, 2, 3],
        "next_release_detail": { "since": "0.3.0", "enabled": true }
    }) else {
        return serde_json::Map::new();
    };
    fields
}

/// Adds [`added_fields`] to every object in `value`, however deep.
fn add_fields(value: &mut serde_json::Value) -> u64 {
    match value {
        serde_json::Value::Object(object) => {
            let nested: u64 = object.values_mut().map(add_fields).sum();
            object.extend(added_fields());
            nested + 1
        }
        serde_json::Value::Array(items) => items.iter_mut().map(add_fields).sum(),
        _ => 0,
    }
}

#[derive(Clone)]
struct Target {
    port: u16,
    objects_changed: Arc<AtomicU64>,
}

pub struct NewerController {
    pub port: u16,
    objects_changed: Arc<AtomicU64>,
}

impl NewerController {
    /// Serves on a free port in front of the controller's check address `target_port`,
    /// until the test process ends.
    pub fn start(target_port: u16) -> NewerController {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind proxy");
        listener.set_nonblocking(true).expect("nonblocking");
        let port = listener.local_addr().expect("proxy address").port();
        let objects_changed = Arc::new(AtomicU64::new(0));
        let target = Target {
            port: target_port,
            objects_changed: Arc::clone(&objects_changed),
        };
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .expect("proxy runtime");
            runtime.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
                let app = Router::new().fallback(forward).with_state(target);
                axum::serve(listener, app).await.expect("proxy serves");
            });
        });
        NewerController {
            port,
            objects_changed,
        }
    }

    /// JSON objects of replies that got the added fields so far.
    pub fn objects_changed(&self) -> u64 {
        self.objects_changed.load(Ordering::SeqCst)
    }
}

async fn forward(State(target): State<Target>, request: Request) -> Response {
    let (parts, body) = request.into_parts();
    let Ok(body) = to_bytes(body, 4 << 20).await else {
        return status_only(StatusCode::PAYLOAD_TOO_LARGE);
    };
    let url = format!(
        "http://127.0.0.1:{}{}",
        target.port,
        parts.uri.path_and_query().map_or("/", |p| p.as_str())
    );
    let headers: Vec<(String, String)> = parts
        .headers
        .iter()
        .filter(|(name, _)| !matches!(name.as_str(), "host" | "content-length" | "connection"))
        .filter_map(|(name, value)| Some((name.to_string(), value.to_str().ok()?.to_owned())))
        .collect();
    let method = parts.method.to_string();
    let body = (!body.is_empty()).then(|| String::from_utf8_lossy(&body).into_owned());
    let reply = tokio::task::spawn_blocking(move || {
        let headers: Vec<(&str, &str)> = headers
            .iter()
            .map(|(n, v)| (n.as_str(), v.as_str()))
            .filter(|(n, _)| *n != "content-type")
            .collect();
        crate::http::request(&method, &url, &headers, body)
    })
    .await;
    let Ok(Ok(reply)) = reply else {
        return status_only(StatusCode::BAD_GATEWAY);
    };
    let mut reply_body = reply.body;
    if let Ok(mut json) = serde_json::from_str::<serde_json::Value>(&reply_body) {
        let changed = add_fields(&mut json);
        target.objects_changed.fetch_add(changed, Ordering::SeqCst);
        reply_body = json.to_string();
    }
    let mut response = Response::builder().status(reply.status);
    for (name, value) in &reply.headers {
        if !matches!(
            name.as_str(),
            "content-length" | "transfer-encoding" | "connection" | "date"
        ) {
            response = response.header(name, value);
        }
    }
    response
        .body(Body::from(reply_body))
        .unwrap_or_else(|_| status_only(StatusCode::BAD_GATEWAY))
}

fn status_only(status: StatusCode) -> Response {
    let mut response = Response::new(Body::empty());
    *response.status_mut() = status;
    response
}
