//! A tiny upstream that answers 200 to everything, for tests, the demo and the benchmark.

use std::net::SocketAddr;

use std::time::Duration;

use axum::extract::Path;
use axum::routing::{get, post};
use axum::Router;

/// The service itself: `200 hello from upstream` on every path and method; `/slow/{ms}`
/// answers the same after `ms` milliseconds (at most 10 s); `/status/{code}` answers with
/// that status (an upstream in trouble, for the automatic system state); `/binary-headers`
/// with response header values that are not UTF-8; `POST /v1/chat/completions` is a fake
/// OpenAI-compatible model server (see [`crate::fake_llm`]).
pub fn app() -> Router {
    Router::new()
        .route(
            "/v1/chat/completions",
            post(crate::fake_llm::chat_completions),
        )
        .route("/slow/{ms}", get(slow))
        .route("/status/{code}", get(status))
        .route("/binary-headers", get(binary_headers))
        .fallback(|| async { HELLO })
}

/// A reply whose header values hold bytes that are not UTF-8 (HTTP allows obs-text).
pub const BINARY_HEADER_VALUE: &[u8] = b"caf\xe9 \xff\xfe";

async fn binary_headers() -> impl axum::response::IntoResponse {
    let value = axum::http::HeaderValue::from_bytes(BINARY_HEADER_VALUE)
        .unwrap_or_else(|_| axum::http::HeaderValue::from_static("?"));
    ([("x-binary", value.clone()), ("set-cookie", value)], HELLO)
}

const HELLO: &str = "hello from upstream\n";

async fn status(Path(code): Path<u16>) -> (axum::http::StatusCode, &'static str) {
    let status = axum::http::StatusCode::from_u16(code)
        .unwrap_or(axum::http::StatusCode::INTERNAL_SERVER_ERROR);
    (status, HELLO)
}

async fn slow(Path(ms): Path<u64>) -> &'static str {
    tokio::time::sleep(Duration::from_millis(ms.min(10_000))).await;
    HELLO
}

/// Serves [`app`] on `listener` until the process ends.
pub async fn serve(listener: tokio::net::TcpListener) -> std::io::Result<()> {
    axum::serve(listener, app()).await
}

/// An upstream running on its own thread for as long as the test runs.
pub struct Upstream {
    pub addr: SocketAddr,
}

impl Upstream {
    pub fn start() -> Upstream {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind upstream");
        listener.set_nonblocking(true).expect("nonblocking");
        let addr = listener.local_addr().expect("upstream address");
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("upstream runtime");
            runtime.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).expect("tokio listener");
                serve(listener).await.expect("upstream serves");
            });
        });
        Upstream { addr }
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }
}
