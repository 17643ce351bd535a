//! The controller's three listeners, in one place: whom each one serves, how that caller is
//! checked, and what bounds what a caller can hold. Anything from the network is taken as
//! hostile until checked, and even a checked caller holds nothing for long.
//!
//! | listener | who calls | checked by | caps and timeouts |
//! |---|---|---|---|
//! | check (`listen`) | the proxies' filters, their health checks, probes | a check token ([`crate::check::credential`]); `/healthz`, `/readyz` open | [`Limits::check`] |
//! | admin (`admin_listen`) | people, the dashboard, the CLI, Prometheus | an admin token ([`crate::admin::auth`]); probes and `/metrics` open | [`Limits::admin`], a request limit ([`crate::admin::REQUEST_TIMEOUT`]), stats streams per token |
//! | gRPC (`grpc_listen`) | Envoy's rate-limit filter | a check token ([`crate::rls`]) | [`Limits::grpc`] and the `GRPC_*` bounds |
//!
//! Every listener caps its connections: past the cap a new connection is closed as soon as
//! it is accepted, and counted (`sluice_connections_refused_total`). Closing at once, rather
//! than leaving the connection waiting, tells a proxy at once to try another controller
//! (the shipped Envoy configurations' outlier detection ejects a controller whose
//! connections fail), and keeps a flood from piling up in the kernel's queue. Each listener has its own cap, so that a
//! flood of admin connections never takes a place of the check path's.
//!
//! A connection must send its first request within the header-read timeout
//! (`header_read_timeout_ms`), whatever protocol it speaks; an HTTP/1.1 request's head must
//! arrive within it too, and an HTTP/1.1 connection waits for the next request no longer
//! than that (hyper times the wait for a head from the end of the last answer). On the check
//! address a request's body must arrive within it as well. A peer that reads nothing while
//! an answer waits to be written is dropped after [`WRITE_STALL`]. HTTP/2 connections are
//! pinged ([`H2_PING_INTERVAL`]) and dropped when the peer does not answer
//! ([`H2_PING_TIMEOUT`]); on the check and admin addresses one that starts no request for
//! [`H2_IDLE`] is closed gracefully (GOAWAY), on the gRPC API a connection is closed
//! gracefully at [`GRPC_MAX_CONNECTION_AGE`].

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use axum::body::{Body, Bytes, HttpBody};
use axum::extract::Request;
use axum::response::Response;
use axum::Router;
use http_body::{Frame, SizeHint};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use prometheus_client::metrics::gauge::Gauge;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};
use tokio::time::{Instant, Sleep};

use crate::metrics::{ListenerLabels, Metrics};
use crate::settings::Settings;
use crate::StartError;

/// Default of `header_read_timeout_ms`. Envoy writes a whole request at once, and a person's
/// tools do too: five seconds is far above any honest sender's time, and short enough that
/// a client trickling its headers, or saying nothing, holds its place briefly. It is also
/// how long an idle HTTP/1.1 connection is kept (as Node.js and Apache keep theirs): give
/// Envoy's cluster of the controller a shorter `idle_timeout` so that Envoy, not the
/// controller, closes an idle connection.
pub const HEADER_READ_TIMEOUT_MS: u64 = 5_000;

/// Default of `check_max_connections`. Over HTTP/1.1 Envoy opens one connection per call in
/// flight, per worker (a leaky bucket's held answer keeps its call in flight), plus one per
/// health checker: a fleet of 32 proxies of 8 workers with 4 calls in flight each is 1024.
pub const CHECK_MAX_CONNECTIONS: usize = 1_024;

/// Default of `admin_max_connections`. People, the dashboard (one connection per open stats
/// stream, of which the admin API serves at most 64: admin/stream.rs), the CLI, probes and
/// Prometheus: twice the streams leaves half for everything else when every stream is open.
pub const ADMIN_MAX_CONNECTIONS: usize = 128;

/// Default of `grpc_max_connections`. Envoy multiplexes a worker's calls on one HTTP/2
/// connection per controller, and opens another only when [`GRPC_MAX_STREAMS`] are in use:
/// 256 is 32 proxies of 8 workers.
pub const GRPC_MAX_CONNECTIONS: usize = 256;

/// How long a peer may read nothing while an answer waits to be written before its
/// connection is dropped. Answers are small, and the stats stream writes about once a
/// second: a client that takes none of it for this long has gone, or is holding the
/// connection on purpose.
pub const WRITE_STALL: Duration = Duration::from_secs(30);

/// How often an HTTP/2 connection is pinged; one that does not answer within
/// [`H2_PING_TIMEOUT`] is dropped. Envoy answers pings as any HTTP/2 client does.
pub const H2_PING_INTERVAL: Duration = Duration::from_secs(20);
pub const H2_PING_TIMEOUT: Duration = Duration::from_secs(10);

/// How long an HTTP/2 connection on the check or admin address may start no request (with
/// none in flight) before it is closed gracefully: GOAWAY tells the client which requests
/// were served, so that closing is safe at any moment (unlike HTTP/1.1's).
pub const H2_IDLE: Duration = Duration::from_secs(60);

/// The longest a gRPC call may take. A call is decided in one store round trip (at most
/// `redis_timeout_ms`) plus a leaky bucket's held delay; Envoy sends its own deadline
/// (`grpc-timeout`, the filter's `timeout`), and the shorter one wins: this bounds a caller
/// that sends none.
pub const GRPC_REQUEST_TIMEOUT: Duration = Duration::from_secs(60);

/// Streams one gRPC connection may have open (`SETTINGS_MAX_CONCURRENT_STREAMS`), and calls
/// it may have in flight. Envoy opens another connection when a connection's streams are all
/// taken, so the bound costs it nothing; calls in flight have the same bound, so that no call
/// waits behind another (a leaky bucket's held answer would hold it up).
pub const GRPC_MAX_STREAMS: u32 = 128;

/// The largest gRPC request message. A request is a domain and a few descriptors of a few
/// short entries (an address, a header's value, a key): well under a kilobyte. 64 KiB holds
/// 64 entries of 1 KiB; tonic's default (4 MiB), times [`GRPC_MAX_STREAMS`] streams, would
/// let one connection make the controller buffer half a gigabyte.
pub const GRPC_MAX_MESSAGE_BYTES: usize = 64 << 10;

/// Age at which a gRPC connection is closed gracefully (GOAWAY; Envoy opens a new one for
/// its next call). tonic has no idle timeout: this bounds how long a connection that answers
/// pings but asks nothing holds its place, and spreads Envoy's connections over controllers
/// started since.
pub const GRPC_MAX_CONNECTION_AGE: Duration = Duration::from_secs(600);

/// Pause after an accept that failed for want of resources (no file descriptor left), so
/// that the loop does not spin; connections that came and went are not such failures.
const ACCEPT_PAUSE: Duration = Duration::from_millis(100);

/// At most one warning per listener in this time when connections are refused.
const WARN_EVERY: Duration = Duration::from_secs(60);

/// HTTP/2's connection preface (RFC 9113 §3.4): the gRPC API's first 24 bytes.
const H2_PREFACE_BYTES: usize = 24;

/// What one listener bounds.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Its name in metrics and logs: `check`, `admin` or `grpc`.
    pub name: &'static str,
    pub max_connections: usize,
    /// The first request, an HTTP/1.1 head, an idle HTTP/1.1 connection; on the gRPC API,
    /// HTTP/2's preface.
    pub header_read: Duration,
    /// How long a request's body may take to arrive, from its head (`None`: the app bounds
    /// its requests itself).
    pub body_read: Option<Duration>,
    /// `TCP_NODELAY`: answers go out at once.
    pub nodelay: bool,
}

impl Limits {
    pub fn check(settings: &Settings) -> Limits {
        let header_read = Duration::from_millis(settings.header_read_timeout_ms);
        Limits {
            name: "check",
            max_connections: settings.check_max_connections,
            header_read,
            // Envoy writes a check call (at most a mebibyte) with its head.
            body_read: Some(header_read),
            // Replies go out at once: Envoy waits on each one (Nagle would hold a reply
            // written in parts until the previous part is acknowledged).
            nodelay: true,
        }
    }

    pub fn admin(settings: &Settings) -> Limits {
        Limits {
            name: "admin",
            max_connections: settings.admin_max_connections,
            header_read: Duration::from_millis(settings.header_read_timeout_ms),
            // The admin API's request limit covers reading the body (an import may be
            // 16 MB from a slow link).
            body_read: None,
            nodelay: false,
        }
    }

    pub fn grpc(settings: &Settings) -> Limits {
        Limits {
            name: "grpc",
            max_connections: settings.grpc_max_connections,
            header_read: Duration::from_millis(settings.header_read_timeout_ms),
            // A message is bounded by GRPC_MAX_MESSAGE_BYTES and the call by
            // GRPC_REQUEST_TIMEOUT.
            body_read: None,
            nodelay: true,
        }
    }
}

pub async fn bind(addr: SocketAddr) -> Result<TcpListener, StartError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| StartError::Listen { addr, source })
}

/// Warns when the connections the listeners may hold, together, are more than this process
/// may open files: past that, accepting fails on every listener (the check address
/// included) and Redis cannot reconnect, before any cap is reached.
pub fn warn_if_files_short(settings: &Settings) {
    let grpc = settings
        .grpc_listen
        .map_or(0, |_| settings.grpc_max_connections);
    let wanted = settings
        .check_max_connections
        .saturating_add(settings.admin_max_connections)
        .saturating_add(grpc);
    let Some(soft) = open_files_limit() else {
        return;
    };
    // Room for Redis connections, the state file, logs.
    let room = 64;
    if soft < u64::try_from(wanted.saturating_add(room)).unwrap_or(u64::MAX) {
        tracing::warn!(
            open_files_limit = soft,
            connections = wanted,
            "the listeners may hold {wanted} connections together, but this process may open \
             only {soft} files: raise its limit (`ulimit -n`, LimitNOFILE=) above {}, or lower \
             check_max_connections, admin_max_connections, grpc_max_connections",
            wanted + room
        );
    }
}

/// The soft limit of open files, as `/proc/self/limits` says (Linux).
fn open_files_limit() -> Option<u64> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits
        .lines()
        .find(|line| line.starts_with("Max open files"))?;
    line.trim_start_matches("Max open files")
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

// -- Accepting, within the cap --------------------------------------------------------------

/// A listener's places, and the accept loop that gives them out.
struct Gate {
    places: Arc<Semaphore>,
    limits: Limits,
    open: Gauge,
    metrics: Arc<Metrics>,
    last_warning: Option<Instant>,
}

impl Gate {
    fn new(limits: Limits, metrics: Arc<Metrics>) -> Gate {
        let label = ListenerLabels {
            listener: limits.name.to_owned(),
        };
        let open = metrics.connections_open.get_or_create(&label).clone();
        Gate {
            places: Arc::new(Semaphore::new(limits.max_connections)),
            limits,
            open,
            metrics,
            last_warning: None,
        }
    }

    /// The next connection that gets a place; the others are closed as they come.
    async fn accept(&mut self, listener: &TcpListener) -> Guarded {
        loop {
            let (stream, peer) = match listener.accept().await {
                Ok(accepted) => accepted,
                Err(error) => {
                    if !matches!(
                        error.kind(),
                        io::ErrorKind::ConnectionAborted
                            | io::ErrorKind::ConnectionReset
                            | io::ErrorKind::ConnectionRefused
                    ) {
                        self.warn(format_args!("cannot accept a connection: {error}"));
                        tokio::time::sleep(ACCEPT_PAUSE).await;
                    }
                    continue;
                }
            };
            let Ok(place) = Arc::clone(&self.places).try_acquire_owned() else {
                drop(stream);
                self.metrics.connection_refused(self.limits.name);
                tracing::debug!(listener = self.limits.name, %peer, "connection refused: at the cap");
                let cap = self.limits.max_connections;
                self.warn(format_args!(
                    "{cap} connections open, the most this listener holds: new ones are closed \
                     (sluice_connections_refused_total)"
                ));
                continue;
            };
            if self.limits.nodelay {
                if let Err(error) = stream.set_nodelay(true) {
                    tracing::debug!("cannot set TCP_NODELAY: {error}");
                }
            }
            self.open.inc();
            return Guarded {
                io: stream,
                _place: Place {
                    _permit: place,
                    open: self.open.clone(),
                },
                preface: None,
                write_stall: WRITE_STALL,
                stall: None,
                stalling: false,
            };
        }
    }

    fn warn(&mut self, message: std::fmt::Arguments<'_>) {
        let now = Instant::now();
        if self
            .last_warning
            .is_some_and(|last| now.duration_since(last) < WARN_EVERY)
        {
            return;
        }
        self.last_warning = Some(now);
        tracing::warn!(listener = self.limits.name, "{message}");
    }
}

/// A connection's place under its listener's cap, given back when the connection is dropped.
struct Place {
    _permit: OwnedSemaphorePermit,
    open: Gauge,
}

impl Drop for Place {
    fn drop(&mut self) {
        self.open.dec();
    }
}

/// An accepted connection, holding its place, that fails a write the peer leaves waiting
/// for [`WRITE_STALL`], and (on the gRPC API) a read that leaves HTTP/2's preface unsent
/// past its deadline.
pub struct Guarded {
    io: TcpStream,
    _place: Place,
    /// Bytes of the preface still to come, and by when.
    preface: Option<(usize, Pin<Box<Sleep>>)>,
    /// [`WRITE_STALL`], but in tests.
    write_stall: Duration,
    stall: Option<Pin<Box<Sleep>>>,
    /// Whether `stall` is timing the write under way.
    stalling: bool,
}

impl Guarded {
    fn expect_preface(&mut self, within: Duration) {
        self.preface = Some((H2_PREFACE_BYTES, Box::pin(tokio::time::sleep(within))));
    }

    /// `polled` from a write: a write left waiting starts the stall timer, one that moved
    /// stops it.
    fn timed<T>(
        &mut self,
        cx: &mut Context<'_>,
        polled: Poll<io::Result<T>>,
    ) -> Poll<io::Result<T>> {
        if polled.is_ready() {
            self.stalling = false;
            return polled;
        }
        let deadline = Instant::now() + self.write_stall;
        let stall = self
            .stall
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        if !self.stalling {
            stall.as_mut().reset(deadline);
            self.stalling = true;
        }
        if stall.as_mut().poll(cx).is_ready() {
            self.stalling = false;
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the peer read nothing of the answer in time",
            )));
        }
        Poll::Pending
    }
}

impl AsyncRead for Guarded {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.io).poll_read(cx, buf);
        let Some((missing, deadline)) = &mut this.preface else {
            return polled;
        };
        match polled {
            Poll::Ready(Ok(())) => {
                *missing = missing.saturating_sub(buf.filled().len() - before);
                if *missing == 0 {
                    this.preface = None;
                }
                Poll::Ready(Ok(()))
            }
            Poll::Pending if deadline.as_mut().poll(cx).is_ready() => {
                Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "the peer did not send HTTP/2's preface in time",
                )))
            }
            other => other,
        }
    }
}

impl AsyncWrite for Guarded {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.io).poll_write(cx, buf);
        this.timed(cx, polled)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.io).poll_write_vectored(cx, bufs);
        this.timed(cx, polled)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.io).poll_flush(cx);
        this.timed(cx, polled)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.io).poll_shutdown(cx);
        this.timed(cx, polled)
    }
}

impl tonic::transport::server::Connected for Guarded {
    type ConnectInfo = tonic::transport::server::TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.io.connect_info()
    }
}

/// The gRPC API's connections, for tonic (`serve_with_incoming_shutdown`): within the cap,
/// each to send HTTP/2's preface within the header-read timeout.
pub fn incoming(
    listener: TcpListener,
    limits: Limits,
    metrics: Arc<Metrics>,
) -> impl futures_util::Stream<Item = io::Result<Guarded>> {
    let gate = Gate::new(limits, metrics);
    futures_util::stream::unfold((listener, gate), |(listener, mut gate)| async move {
        let mut connection = gate.accept(&listener).await;
        connection.expect_preface(gate.limits.header_read);
        Some((Ok(connection), (listener, gate)))
    })
}

// -- Serving an axum app -------------------------------------------------------------------

/// Serves `app` on `listener` within `limits` until `stopped` holds `true`; then accepts no
/// more, asks every connection to close once its answers are out, and returns when they all
/// have (as `axum::serve`'s graceful shutdown does).
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: Limits,
    metrics: Arc<Metrics>,
    mut stopped: watch::Receiver<bool>,
) {
    let mut gate = Gate::new(limits, metrics);
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read);
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(H2_PING_INTERVAL)
        .keep_alive_timeout(H2_PING_TIMEOUT);
    let builder = Arc::new(builder);
    // Each connection's task holds a receiver: `closed()` completes when they all ended.
    let (all_closed, connections) = watch::channel(());
    loop {
        let io = tokio::select! {
            io = gate.accept(&listener) => io,
            _ = stopped.wait_for(|stop| *stop) => break,
        };
        let connection = Connection {
            builder: Arc::clone(&builder),
            app: app.clone(),
            limits,
            stopped: stopped.clone(),
            _open: connections.clone(),
        };
        tokio::spawn(connection.run(io));
    }
    drop(listener);
    drop(connections);
    all_closed.closed().await;
}

struct Connection {
    builder: Arc<auto::Builder<TokioExecutor>>,
    app: Router,
    limits: Limits,
    stopped: watch::Receiver<bool>,
    _open: watch::Receiver<()>,
}

impl Connection {
    async fn run(mut self, io: Guarded) {
        let activity = Arc::new(Activity::default());
        let service = PerRequest {
            app: self.app.clone(),
            activity: Arc::clone(&activity),
            body_read: self.limits.body_read,
        };
        let connection = self.builder.serve_connection(TokioIo::new(io), service);
        let mut connection = std::pin::pin!(connection);
        // First the first request's deadline; then, each time it passes, the idle one.
        let deadline = tokio::time::sleep(self.limits.header_read);
        let mut deadline = std::pin::pin!(deadline);
        let mut seen = 0;
        let mut closing = false;
        loop {
            tokio::select! {
                served = connection.as_mut() => {
                    if let Err(error) = served {
                        tracing::debug!(listener = self.limits.name, "connection ended: {error}");
                    }
                    break;
                }
                _ = self.stopped.wait_for(|stop| *stop), if !closing => {
                    closing = true;
                    connection.as_mut().graceful_shutdown();
                }
                () = deadline.as_mut() => {
                    let started = activity.started.load(Ordering::Relaxed);
                    if started == 0 {
                        // Nothing asked yet: neither HTTP/1.1's head timer nor HTTP/2's pings
                        // run before the protocol is known and its handshake done.
                        tracing::debug!(
                            listener = self.limits.name,
                            "connection closed: no request within the header-read timeout"
                        );
                        break;
                    }
                    let busy = activity.in_flight.load(Ordering::Relaxed) > 0;
                    if (started != seen || busy) || closing {
                        seen = started;
                    } else {
                        // HTTP/1.1 is closed by hyper's own timer first; for HTTP/2 this
                        // is GOAWAY, and the connection ends once its answers are out.
                        closing = true;
                        connection.as_mut().graceful_shutdown();
                    }
                    deadline.as_mut().reset(Instant::now() + H2_IDLE);
                }
            }
        }
    }
}

/// What a connection's requests are doing: how many started, how many are still answered.
#[derive(Default)]
struct Activity {
    started: AtomicU64,
    in_flight: AtomicUsize,
}

/// A request being answered, until its answer's body is written or dropped.
struct InFlight(Arc<Activity>);

impl InFlight {
    fn start(activity: &Arc<Activity>) -> InFlight {
        activity.started.fetch_add(1, Ordering::Relaxed);
        activity.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(Arc::clone(activity))
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The app, for one connection's requests.
struct PerRequest {
    app: Router,
    activity: Arc<Activity>,
    body_read: Option<Duration>,
}

impl hyper::service::Service<Request<Incoming>> for PerRequest {
    type Response = Response;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response, Infallible>> + Send>>;

    fn call(&self, request: Request<Incoming>) -> Self::Future {
        let in_flight = InFlight::start(&self.activity);
        let request = match self.body_read {
            Some(limit) => request.map(|body| Body::new(ReadDeadline::new(body, limit))),
            None => request.map(Body::new),
        };
        // A router is always ready.
        let answer = tower_service::Service::call(&mut self.app.clone(), request);
        Box::pin(async move {
            let response = answer.await?;
            Ok(response.map(|body| {
                Body::new(Answering {
                    body,
                    _in_flight: in_flight,
                })
            }))
        })
    }
}

/// An answer's body, keeping its request in flight until it is written (or dropped).
struct Answering {
    body: Body,
    _in_flight: InFlight,
}

impl HttpBody for Answering {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// A request's body that must arrive within `limit` of its head: past it, reading it fails
/// (the route answers 400 and the connection is closed).
struct ReadDeadline<B> {
    body: B,
    limit: Duration,
    deadline: Instant,
    timer: Option<Pin<Box<Sleep>>>,
}

impl<B> ReadDeadline<B> {
    fn new(body: B, limit: Duration) -> Self {
        ReadDeadline {
            body,
            limit,
            deadline: Instant::now() + limit,
            timer: None,
        }
    }
}

impl<B> HttpBody for ReadDeadline<B>
where
    B: HttpBody<Data = Bytes> + Unpin,
    B::Error: Into<axum::BoxError>,
{
    type Data = Bytes;
    type Error = axum::BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::BoxError>>> {
        let this = &mut *self;
        if let Poll::Ready(frame) = Pin::new(&mut this.body).poll_frame(cx) {
            return Poll::Ready(frame.map(|frame| frame.map_err(Into::into)));
        }
        // Only a body that does not arrive at once costs a timer.
        let deadline = this.deadline;
        let timer = this
            .timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        ready!(timer.as_mut().poll(cx));
        Poll::Ready(Some(Err(format!(
            "the body did not arrive within {} ms of the request's head",
            this.limit.as_millis()
        )
        .into())))
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use http_body_util::BodyExt;

    use super::*;

    /// A body whose frames come from a channel, as slowly as the test sends them.
    struct Trickle(tokio::sync::mpsc::Receiver<Bytes>);

    impl HttpBody for Trickle {
        type Data = Bytes;
        type Error = Infallible;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
            self.0
                .poll_recv(cx)
                .map(|chunk| chunk.map(|bytes| Ok(Frame::data(bytes))))
        }
    }

    #[tokio::test]
    async fn a_body_must_arrive_within_its_limit() {
        let limit = Duration::from_millis(300);
        let (send, receive) = tokio::sync::mpsc::channel(4);
        let mut body = ReadDeadline::new(Trickle(receive), limit);
        send.send(Bytes::from_static(b"a")).await.unwrap();
        let first = body.frame().await.unwrap().unwrap();
        assert_eq!(first.into_data().unwrap(), "a");
        tokio::time::sleep(limit / 2).await;
        send.send(Bytes::from_static(b"b")).await.unwrap();
        assert!(body.frame().await.unwrap().is_ok(), "within the limit");
        let error = body.frame().await.unwrap().unwrap_err();
        assert_eq!(
            error.to_string(),
            "the body did not arrive within 300 ms of the request's head"
        );
        assert!(
            Instant::now() >= body.deadline,
            "it waited for the deadline"
        );
        drop(send);
    }

    #[tokio::test]
    async fn a_whole_body_costs_no_timer() {
        let body = Full(Some(Bytes::from_static(b"{}")));
        let mut body = ReadDeadline::new(body, Duration::from_secs(5));
        let frame = body.frame().await.unwrap().unwrap();
        assert_eq!(frame.into_data().unwrap(), "{}");
        assert!(body.frame().await.is_none());
        assert!(body.timer.is_none());
    }

    struct Full(Option<Bytes>);

    impl HttpBody for Full {
        type Data = Bytes;
        type Error = Infallible;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
            Poll::Ready(self.0.take().map(|bytes| Ok(Frame::data(bytes))))
        }
    }

    /// A connection to a peer that reads nothing, as the server holds it.
    async fn unread(stall: Duration, preface: Option<Duration>) -> (Guarded, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let peer = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (io, _) = listener.accept().await.unwrap();
        let places = Arc::new(Semaphore::new(1));
        let mut guarded = Guarded {
            io,
            _place: Place {
                _permit: places.try_acquire_owned().unwrap(),
                open: Gauge::default(),
            },
            preface: None,
            write_stall: stall,
            stall: None,
            stalling: false,
        };
        if let Some(within) = preface {
            guarded.expect_preface(within);
        }
        (guarded, peer)
    }

    #[tokio::test]
    async fn a_peer_that_reads_nothing_is_dropped_after_the_stall() {
        use tokio::io::AsyncWriteExt;
        let stall = Duration::from_millis(300);
        let (mut guarded, _peer) = unread(stall, None).await;
        let chunk = vec![0u8; 64 << 10];
        let mut last_progress = Instant::now();
        let error = loop {
            match guarded.write(&chunk).await {
                Ok(_) => last_progress = Instant::now(),
                Err(error) => break error,
            }
        };
        assert_eq!(error.kind(), io::ErrorKind::TimedOut, "{error}");
        assert!(last_progress.elapsed() >= stall, "only after the stall");
    }

    #[tokio::test]
    async fn the_preface_must_come_in_time() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let within = Duration::from_millis(300);
        let (mut guarded, mut peer) = unread(WRITE_STALL, Some(within)).await;
        let started = Instant::now();
        peer.write_all(b"PRI * HTTP/2.0\r\n").await.unwrap();
        let mut buffer = [0u8; 64];
        assert_eq!(guarded.read(&mut buffer).await.unwrap(), 16);
        let error = guarded.read(&mut buffer).await.unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::TimedOut);
        assert!(started.elapsed() >= within);

        let (mut guarded, mut peer) = unread(WRITE_STALL, Some(within)).await;
        peer.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
            .await
            .unwrap();
        let mut read = 0;
        while read < H2_PREFACE_BYTES {
            read += guarded.read(&mut buffer[read..]).await.unwrap();
        }
        assert!(
            guarded.preface.is_none(),
            "the deadline is over once it came"
        );
        tokio::time::sleep(within * 2).await;
        peer.write_all(b"later").await.unwrap();
        assert_eq!(guarded.read(&mut buffer).await.unwrap(), 5);
    }

    #[test]
    fn the_open_files_limit_is_read() {
        if std::path::Path::new("/proc/self/limits").exists() {
            assert!(open_files_limit().is_some_and(|soft| soft > 0));
        }
    }
}
