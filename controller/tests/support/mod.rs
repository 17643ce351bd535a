//! A controller in process: the check and admin routers on the embedded stores, with a
//! manual clock and the configuration a test starts from. Requests go through `oneshot`.

#![allow(dead_code)]

use std::sync::Arc;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use axum::Router;
use http_body_util::BodyExt;
use serde_json::Value;
use sluice_controller::admin::auth::Tokens;
use sluice_controller::admin::{self, AdminState};
use sluice_controller::alerts::Webhooks;
use sluice_controller::automatic::Signals;
use sluice_controller::check::limiter::Limiter;
use sluice_controller::check::{self, CheckState};
use sluice_controller::config::file::{self, Format};
use sluice_controller::config::{ConfigSource, LiveConfig, MemoryConfigStore};
use sluice_controller::metrics::Metrics;
use sluice_controller::protection;
use sluice_controller::stats::{self, Recorder};
use sluice_controller::store::{ManualClock, MemoryStore};
use tower::ServiceExt;

pub const ADMIN_TOKEN: &str = "admin-token-0123456789";
pub const READ_TOKEN: &str = "read-token-0123456789";

pub struct World {
    pub check: Router,
    pub admin: Router,
    pub live: Arc<LiveConfig>,
    pub clock: Arc<ManualClock>,
    pub counters: Arc<MemoryStore>,
    pub signals: Arc<Signals>,
    pub metrics: Arc<Metrics>,
    pub recorder: Arc<Recorder>,
    pub guard: Arc<protection::Guard>,
}

/// A controller started from the configuration `toml` (TOML; empty for none).
pub async fn world(toml: &str) -> World {
    let store = Arc::new(MemoryConfigStore::open(None, 100).expect("config store"));
    world_on(toml, ConfigSource::Store, store).await
}

pub struct Reply {
    pub status: StatusCode,
    pub etag: Option<String>,
    pub content_type: Option<String>,
    pub text: String,
}

impl Reply {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.text)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {} {}", self.status, self.text))
    }

    /// The version the `ETag` names.
    pub fn version(&self) -> u64 {
        self.etag
            .as_deref()
            .and_then(|tag| tag.trim_matches('"').parse().ok())
            .unwrap_or_else(|| panic!("no version in ETag {:?}", self.etag))
    }
}

/// One request: `method path`, with a bearer `token` and `headers`, and a body.
pub async fn call(
    router: &Router,
    method: &str,
    path: &str,
    token: Option<&str>,
    headers: &[(&str, &str)],
    body: Option<&str>,
) -> Reply {
    let mut request = Request::builder().method(method).uri(path);
    if let Some(token) = token {
        request = request.header("authorization", format!("Bearer {token}"));
    }
    if body.is_some()
        && !headers
            .iter()
            .any(|(n, _)| n.eq_ignore_ascii_case("content-type"))
    {
        request = request.header("content-type", "application/json");
    }
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let request = request
        .body(body.map_or_else(Body::empty, |b| Body::from(b.to_owned())))
        .expect("request");
    let response = router.clone().oneshot(request).await.expect("a response");
    let status = response.status();
    let header = |name: &str| {
        response
            .headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let (etag, content_type) = (header("etag"), header("content-type"));
    let bytes = response
        .into_body()
        .collect()
        .await
        .expect("body")
        .to_bytes();
    Reply {
        status,
        etag,
        content_type,
        text: String::from_utf8_lossy(&bytes).into_owned(),
    }
}

/// `POST path` on the check router with a JSON body.
pub async fn post(router: &Router, path: &str, body: Value) -> (StatusCode, Value) {
    let reply = call(router, "POST", path, None, &[], Some(&body.to_string())).await;
    (reply.status, reply.json())
}

/// A controller like [`world`]'s whose configuration is managed as `source` says: with
/// [`ConfigSource::File`], `toml` is the file given with `--config`.
pub async fn world_with_source(toml: &str, source: ConfigSource) -> World {
    let store = Arc::new(MemoryConfigStore::open(None, 100).expect("config store"));
    world_on(toml, source, store).await
}

/// A controller like [`world`]'s on the configuration store `store`.
pub async fn world_on(
    toml: &str,
    source: ConfigSource,
    store: Arc<dyn sluice_controller::config::ConfigStore>,
) -> World {
    let clock = ManualClock::starting_at(1_000_000);
    let counters = Arc::new(MemoryStore::new(clock.clone()));
    let bootstrap = (!toml.trim().is_empty())
        .then(|| file::parse(toml, Format::Toml).expect("the test's configuration parses"));
    let live = LiveConfig::start(store, bootstrap, source).await;
    let metrics = Arc::new(Metrics::new());
    let (guard, _task) =
        protection::start(Arc::clone(&live), counters.clone(), Arc::clone(&metrics));
    let signals = Arc::new(Signals::default());
    let recorder = Arc::new(Recorder::new("test-controller", Arc::clone(&metrics)));
    let (webhooks, _webhook_task) = Webhooks::start(Arc::clone(&metrics));
    let _stats_task = stats::run(
        Arc::clone(&recorder),
        Arc::clone(&live),
        counters.clone(),
        Arc::clone(&metrics),
        webhooks,
    );
    let limiter = Arc::new(
        Limiter::new(Arc::clone(&live), counters.clone())
            .with_guard(Arc::clone(&guard))
            .with_observability(Arc::clone(&metrics), Some(Arc::clone(&recorder))),
    );
    let tokens = Tokens::from_text(&format!("ops:admin:{ADMIN_TOKEN};viewer:read:{READ_TOKEN}"))
        .expect("tokens");
    World {
        check: check::app(
            CheckState {
                limiter: Arc::clone(&limiter),
                signals: Arc::clone(&signals),
                guard: Arc::clone(&guard),
                metrics: Arc::clone(&metrics),
                tokens: Default::default(),
                reporters: Default::default(),
                views: Default::default(),
            },
            true,
        ),
        admin: admin::app(AdminState {
            config: Arc::clone(&live),
            limiter,
            tokens: Arc::new(tokens),
            metrics: Arc::clone(&metrics),
            stopping: Default::default(),
            streams: Default::default(),
        }),
        live,
        clock,
        counters,
        signals,
        metrics,
        recorder,
        guard,
    }
}

/// A reply with every header, for what [`Reply`] does not keep (`WWW-Authenticate`…).
pub struct FullReply {
    pub reply: Reply,
    pub headers: axum::http::HeaderMap,
}

/// Sends `request` as it is (any headers, any body bytes).
pub async fn send(router: &Router, request: Request<Body>) -> FullReply {
    let response = router.clone().oneshot(request).await.expect("a response");
    let status = response.status();
    let headers = response.headers().clone();
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let (etag, content_type) = (header("etag"), header("content-type"));
    let bytes = response
        .into_body()
        .collect()
        .await
        .expect("body")
        .to_bytes();
    FullReply {
        reply: Reply {
            status,
            etag,
            content_type,
            text: String::from_utf8_lossy(&bytes).into_owned(),
        },
        headers,
    }
}
