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
//!
//! With `tls_cert_file` and `tls_key_file` ([`Tls`]) every listener speaks TLS only (1.2 or
//! 1.3, rustls), with the one certificate: the check token and the admin tokens never cross
//! the network in clear. With `tls_client_ca_file` the check address and the gRPC API also
//! require a client certificate issued by that CA (mTLS): only the proxies hold one. The
//! admin API never asks for one (its callers are people, browsers, Prometheus and probes,
//! each with an admin token or calling only the open routes), and can be left without TLS
//! (`admin_tls = false`). A TLS handshake is part of a connection's first request: it
//! must be over within the header-read timeout, and the connection holds its place under
//! the cap from the moment it is accepted.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::path::Path;
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
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::danger::ClientCertVerifier;
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};
use tokio::time::{Instant, Sleep};
use tokio_rustls::TlsAcceptor;
use tonic::transport::server::{Connected, TcpConnectInfo};

use crate::metrics::{ListenerLabels, Metrics};
use crate::settings::{setting_error, SettingError, Settings};
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
    /// HTTP/2's preface. A TLS handshake counts in the time of the first request (or of
    /// the preface).
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

/// An accepted TCP connection, holding its place, that fails a write the peer leaves
/// waiting for [`WRITE_STALL`].
struct Guarded {
    io: TcpStream,
    _place: Place,
    /// [`WRITE_STALL`], but in tests.
    write_stall: Duration,
    stall: Option<Pin<Box<Sleep>>>,
    /// Whether `stall` is timing the write under way.
    stalling: bool,
}

impl Guarded {
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
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
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

// -- TLS -----------------------------------------------------------------------------------

/// ALPN of the check and admin addresses: both protocols they serve (hyper's builder tells
/// them apart by HTTP/2's preface either way).
const ALPN_HTTP: &[&[u8]] = &[b"h2", b"http/1.1"];

/// ALPN of the gRPC API: HTTP/2 only. A client that offers only other protocols is refused
/// in the handshake (RFC 7301); one that offers none is served.
const ALPN_GRPC: &[&[u8]] = &[b"h2"];

/// The listeners' TLS, from `tls_cert_file`, `tls_key_file`, `tls_client_ca_file` and
/// `admin_tls`: one certificate for every listener (they are one service, under one name;
/// a second certificate would be a second thing to renew), client certificates required on
/// the check address and the gRPC API when a client CA is given, never on the admin API.
/// Read once at start: a renewed certificate takes a restart.
#[derive(Clone)]
pub struct Tls {
    pub check: TlsListener,
    pub grpc: TlsListener,
    /// `None` with `admin_tls = false`.
    pub admin: Option<TlsListener>,
}

/// One listener's TLS: its configuration, and when it last warned of failed handshakes.
#[derive(Clone)]
pub struct TlsListener(Arc<TlsSide>);

struct TlsSide {
    acceptor: TlsAcceptor,
    last_warning: std::sync::Mutex<Option<Instant>>,
}

impl Tls {
    /// The TLS the settings ask for (`None`: none), its files read and checked: an
    /// unreadable file, one without PEM of the kind it should hold, a key that is not the
    /// certificate's or a CA rustls cannot use stops the start, naming the setting.
    pub fn load(settings: &Settings) -> Result<Option<Tls>, SettingError> {
        let (Some(cert_file), Some(key_file)) = (&settings.tls_cert_file, &settings.tls_key_file)
        else {
            return Ok(None);
        };
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let chain = read_certificates("tls_cert_file", cert_file)?;
        let key = read_key(key_file)?;
        provider
            .key_provider
            .load_private_key(key.clone_key())
            .map_err(|e| {
                setting_error(
                    "tls_key_file",
                    format!("{}: not a usable private key: {e}", key_file.display()),
                )
            })?;
        let clients = match &settings.tls_client_ca_file {
            Some(path) => Some(client_verifier(path, &provider)?),
            None => None,
        };
        let config = |verifier: Option<&Arc<dyn ClientCertVerifier>>,
                      alpn: &[&[u8]]|
         -> Result<TlsListener, SettingError> {
            let builder = ServerConfig::builder_with_provider(Arc::clone(&provider))
                .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
                .map_err(|e| setting_error("tls_cert_file", e.to_string()))?;
            let builder = match verifier {
                Some(verifier) => builder.with_client_cert_verifier(Arc::clone(verifier)),
                None => builder.with_no_client_auth(),
            };
            let mut config = builder
                .with_single_cert(chain.clone(), key.clone_key())
                .map_err(|e| match e {
                    rustls::Error::InconsistentKeys(_) => setting_error(
                        "tls_key_file",
                        format!(
                            "{} is not the key of the certificate in {} (the first of its \
                             chain)",
                            key_file.display(),
                            cert_file.display()
                        ),
                    ),
                    other => setting_error(
                        "tls_cert_file",
                        format!("{}: not a usable certificate: {other}", cert_file.display()),
                    ),
                })?;
            config.alpn_protocols = alpn.iter().map(|protocol| protocol.to_vec()).collect();
            Ok(TlsListener(Arc::new(TlsSide {
                acceptor: TlsAcceptor::from(Arc::new(config)),
                last_warning: std::sync::Mutex::new(None),
            })))
        };
        Ok(Some(Tls {
            check: config(clients.as_ref(), ALPN_HTTP)?,
            grpc: config(clients.as_ref(), ALPN_GRPC)?,
            admin: if settings.admin_tls {
                Some(config(None, ALPN_HTTP)?)
            } else {
                None
            },
        }))
    }
}

/// Every certificate (PEM) in `path`, the setting `setting`'s file.
fn read_certificates(
    setting: &'static str,
    path: &Path,
) -> Result<Vec<CertificateDer<'static>>, SettingError> {
    let text = read_pem_file(setting, path)?;
    let certificates = CertificateDer::pem_slice_iter(&text)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| setting_error(setting, format!("{}: not PEM: {e}", path.display())))?;
    if certificates.is_empty() {
        return Err(setting_error(
            setting,
            format!(
                "{} holds no certificate (PEM, `-----BEGIN CERTIFICATE-----`)",
                path.display()
            ),
        ));
    }
    Ok(certificates)
}

/// The first private key (PEM: PKCS#8, PKCS#1 or SEC1) in `tls_key_file`.
fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, SettingError> {
    let text = read_pem_file("tls_key_file", path)?;
    PrivateKeyDer::from_pem_slice(&text).map_err(|e| {
        let message = match e {
            rustls::pki_types::pem::Error::NoItemsFound => format!(
                "{} holds no private key (PEM, `-----BEGIN PRIVATE KEY-----`, `… RSA PRIVATE \
                 KEY-----` or `… EC PRIVATE KEY-----`)",
                path.display()
            ),
            other => format!("{}: not PEM: {other}", path.display()),
        };
        setting_error("tls_key_file", message)
    })
}

/// The largest PEM file read: a long chain or a bundle of CAs is a few tens of kilobytes.
const MAX_PEM_BYTES: u64 = 1 << 20;

fn read_pem_file(setting: &'static str, path: &Path) -> Result<Vec<u8>, SettingError> {
    use std::io::Read;
    let cannot =
        |e: io::Error| setting_error(setting, format!("cannot read {}: {e}", path.display()));
    let mut text = Vec::new();
    std::fs::File::open(path)
        .map_err(cannot)?
        .take(MAX_PEM_BYTES + 1)
        .read_to_end(&mut text)
        .map_err(cannot)?;
    if text.len() as u64 > MAX_PEM_BYTES {
        return Err(setting_error(
            setting,
            format!(
                "{} is over {MAX_PEM_BYTES} bytes: not a PEM file",
                path.display()
            ),
        ));
    }
    Ok(text)
}

/// Client certificates issued by a CA of `tls_client_ca_file`, required.
fn client_verifier(
    path: &Path,
    provider: &Arc<rustls::crypto::CryptoProvider>,
) -> Result<Arc<dyn ClientCertVerifier>, SettingError> {
    let mut roots = RootCertStore::empty();
    for certificate in read_certificates("tls_client_ca_file", path)? {
        roots.add(certificate).map_err(|e| {
            setting_error(
                "tls_client_ca_file",
                format!("{}: not a usable CA certificate: {e}", path.display()),
            )
        })?;
    }
    WebPkiClientVerifier::builder_with_provider(Arc::new(roots), Arc::clone(provider))
        .build()
        .map_err(|e| setting_error("tls_client_ca_file", format!("{}: {e}", path.display())))
}

impl TlsListener {
    /// Logs a failed handshake: each at debug, and a warning at most once a minute, for
    /// a caller whose certificate (or trust in the controller's) does not match is a
    /// deployment's mistake that someone must see. A peer that closed without a word (a
    /// TCP probe, a scan) is not one.
    fn failed(&self, listener: &'static str, peer: Option<SocketAddr>, error: &io::Error) {
        let peer = peer.map_or_else(|| "?".to_owned(), |peer| peer.to_string());
        tracing::debug!(listener, %peer, "TLS handshake failed: {error}");
        if error.kind() == io::ErrorKind::UnexpectedEof {
            return;
        }
        let now = Instant::now();
        {
            let Ok(mut last) = self.0.last_warning.lock() else {
                return;
            };
            if last.is_some_and(|last| now.duration_since(last) < WARN_EVERY) {
                return;
            }
            *last = Some(now);
        }
        tracing::warn!(
            listener,
            %peer,
            "TLS handshake failed: {error} (a caller without a certificate the controller \
             trusts, or that does not trust the controller's, or not speaking TLS; at most \
             one warning a minute, every failure at debug)"
        );
    }
}

// -- A connection as its protocol reads it -------------------------------------------------

/// What [`Wire`] reads and writes once its handshake is over.
trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

/// TCP, or TLS over it.
enum Wire {
    Plain(Guarded),
    /// The TLS handshake, run by the connection's first reads and writes.
    Handshake(Box<tokio_rustls::Accept<Guarded>>, TlsListener),
    Tls(Box<tokio_rustls::server::TlsStream<Guarded>>),
    /// The handshake failed (the error was returned once).
    Failed,
}

impl Wire {
    /// The stream to read and write, once the handshake (if any) is over.
    fn poll_stream(
        &mut self,
        cx: &mut Context<'_>,
        listener: &'static str,
        peer: Option<SocketAddr>,
    ) -> Poll<io::Result<Pin<&mut dyn Stream>>> {
        if let Wire::Handshake(accept, tls) = self {
            match ready!(Pin::new(accept.as_mut()).poll(cx)) {
                Ok(stream) => *self = Wire::Tls(Box::new(stream)),
                Err(error) => {
                    tls.failed(listener, peer, &error);
                    *self = Wire::Failed;
                    return Poll::Ready(Err(error));
                }
            }
        }
        Poll::Ready(match self {
            Wire::Plain(io) => Ok(Pin::new(io)),
            Wire::Tls(io) => Ok(Pin::new(io.as_mut())),
            Wire::Handshake(..) | Wire::Failed => Err(io::Error::new(
                io::ErrorKind::NotConnected,
                "the TLS handshake failed",
            )),
        })
    }
}

/// An accepted connection as its protocol reads it: over TCP or TLS (whose handshake runs
/// as the connection is first read or written), holding its place under the cap. On the
/// gRPC API the handshake and HTTP/2's preface must be over within the header-read timeout
/// ([`Accepted::expect_preface`]); on the check and admin addresses the whole first request
/// must be (the deadline of [`serve`]'s connections).
pub struct Accepted {
    wire: Wire,
    listener: &'static str,
    info: TcpConnectInfo,
    /// Bytes of the preface still to come (after the handshake), and by when.
    preface: Option<(usize, Pin<Box<Sleep>>)>,
}

impl Accepted {
    fn new(io: Guarded, tls: Option<&TlsListener>, listener: &'static str) -> Accepted {
        let info = io.io.connect_info();
        let wire = match tls {
            Some(tls) => Wire::Handshake(Box::new(tls.0.acceptor.accept(io)), tls.clone()),
            None => Wire::Plain(io),
        };
        Accepted {
            wire,
            listener,
            info,
            preface: None,
        }
    }

    fn expect_preface(&mut self, within: Duration) {
        self.preface = Some((H2_PREFACE_BYTES, Box::pin(tokio::time::sleep(within))));
    }

    /// `polled` from a read of `read` bytes or a write: while the preface is awaited, a
    /// read or write left waiting past its deadline fails.
    fn before_preface<T>(
        &mut self,
        cx: &mut Context<'_>,
        polled: Poll<io::Result<T>>,
        read: usize,
    ) -> Poll<io::Result<T>> {
        let Some((missing, deadline)) = &mut self.preface else {
            return polled;
        };
        match polled {
            Poll::Ready(Ok(value)) => {
                *missing = missing.saturating_sub(read);
                if *missing == 0 {
                    self.preface = None;
                }
                Poll::Ready(Ok(value))
            }
            Poll::Pending if deadline.as_mut().poll(cx).is_ready() => {
                Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "the peer did not finish the TLS handshake and send HTTP/2's preface in \
                     time",
                )))
            }
            other => other,
        }
    }
}

impl AsyncRead for Accepted {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let polled = match this
            .wire
            .poll_stream(cx, this.listener, this.info.remote_addr)
        {
            Poll::Ready(Ok(stream)) => stream.poll_read(cx, buf),
            Poll::Ready(Err(error)) => Poll::Ready(Err(error)),
            Poll::Pending => Poll::Pending,
        };
        let read = buf.filled().len() - before;
        this.before_preface(cx, polled, read)
    }
}

impl AsyncWrite for Accepted {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = match this
            .wire
            .poll_stream(cx, this.listener, this.info.remote_addr)
        {
            Poll::Ready(Ok(stream)) => stream.poll_write(cx, buf),
            Poll::Ready(Err(error)) => Poll::Ready(Err(error)),
            Poll::Pending => Poll::Pending,
        };
        this.before_preface(cx, polled, 0)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = match this
            .wire
            .poll_stream(cx, this.listener, this.info.remote_addr)
        {
            Poll::Ready(Ok(stream)) => stream.poll_write_vectored(cx, bufs),
            Poll::Ready(Err(error)) => Poll::Ready(Err(error)),
            Poll::Pending => Poll::Pending,
        };
        this.before_preface(cx, polled, 0)
    }

    fn is_write_vectored(&self) -> bool {
        match &self.wire {
            Wire::Plain(io) => io.is_write_vectored(),
            Wire::Tls(io) => io.is_write_vectored(),
            Wire::Handshake(..) | Wire::Failed => false,
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let polled = match this
            .wire
            .poll_stream(cx, this.listener, this.info.remote_addr)
        {
            Poll::Ready(Ok(stream)) => stream.poll_flush(cx),
            Poll::Ready(Err(error)) => Poll::Ready(Err(error)),
            Poll::Pending => Poll::Pending,
        };
        this.before_preface(cx, polled, 0)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().wire {
            Wire::Plain(io) => Pin::new(io).poll_shutdown(cx),
            Wire::Tls(io) => Pin::new(io.as_mut()).poll_shutdown(cx),
            // Nothing to close gracefully: dropping the connection closes it.
            Wire::Handshake(..) | Wire::Failed => Poll::Ready(Ok(())),
        }
    }
}

impl Connected for Accepted {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.info.clone()
    }
}

/// The gRPC API's connections, for tonic (`serve_with_incoming_shutdown`): within the cap,
/// over TLS when `tls` is given, each to finish its handshake and send HTTP/2's preface
/// within the header-read timeout. The handshake runs in the connection's own task, not
/// here: a peer that never finishes one holds up no other.
pub fn incoming(
    listener: TcpListener,
    limits: Limits,
    tls: Option<TlsListener>,
    metrics: Arc<Metrics>,
) -> impl futures_util::Stream<Item = io::Result<Accepted>> {
    let gate = Gate::new(limits, metrics);
    futures_util::stream::unfold(
        (listener, gate, tls),
        |(listener, mut gate, tls)| async move {
            let io = gate.accept(&listener).await;
            let mut connection = Accepted::new(io, tls.as_ref(), gate.limits.name);
            connection.expect_preface(gate.limits.header_read);
            Some((Ok(connection), (listener, gate, tls)))
        },
    )
}

// -- Serving an axum app -------------------------------------------------------------------

/// Serves `app` on `listener` within `limits` (over TLS when `tls` is given) until
/// `stopped` holds `true`; then accepts no more, asks every connection to close once its
/// answers are out, and returns when they all have (as `axum::serve`'s graceful shutdown
/// does).
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: Limits,
    tls: Option<TlsListener>,
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
        tokio::spawn(connection.run(Accepted::new(io, tls.as_ref(), limits.name)));
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
    async fn run(mut self, io: Accepted) {
        let activity = Arc::new(Activity::default());
        let service = PerRequest {
            app: self.app.clone(),
            activity: Arc::clone(&activity),
            body_read: self.limits.body_read,
        };
        let connection = self.builder.serve_connection(TokioIo::new(io), service);
        let mut connection = std::pin::pin!(connection);
        // First the first request's deadline (a TLS handshake included); then, each time it
        // passes, the idle one.
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
                        // run before the protocol is known and its handshakes (TLS, HTTP/2)
                        // are done.
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
    async fn unread(stall: Duration) -> (Guarded, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let peer = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (io, _) = listener.accept().await.unwrap();
        let places = Arc::new(Semaphore::new(1));
        let guarded = Guarded {
            io,
            _place: Place {
                _permit: places.try_acquire_owned().unwrap(),
                open: Gauge::default(),
            },
            write_stall: stall,
            stall: None,
            stalling: false,
        };
        (guarded, peer)
    }

    /// The same, as the gRPC API holds it: HTTP/2's preface due `within`.
    async fn unread_preface(within: Duration) -> (Accepted, TcpStream) {
        let (guarded, peer) = unread(WRITE_STALL).await;
        let mut accepted = Accepted::new(guarded, None, "test");
        accepted.expect_preface(within);
        (accepted, peer)
    }

    #[tokio::test]
    async fn a_peer_that_reads_nothing_is_dropped_after_the_stall() {
        use tokio::io::AsyncWriteExt;
        let stall = Duration::from_millis(300);
        let (mut guarded, _peer) = unread(stall).await;
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
        let (mut guarded, mut peer) = unread_preface(within).await;
        let started = Instant::now();
        peer.write_all(b"PRI * HTTP/2.0\r\n").await.unwrap();
        let mut buffer = [0u8; 64];
        assert_eq!(guarded.read(&mut buffer).await.unwrap(), 16);
        let error = guarded.read(&mut buffer).await.unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::TimedOut);
        assert!(started.elapsed() >= within);

        let (mut guarded, mut peer) = unread_preface(within).await;
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

    /// Settings with TLS files `cert`, `key` and maybe `client_ca`.
    fn tls_settings(cert: &Path, key: &Path, client_ca: Option<&Path>) -> Settings {
        Settings::resolve(crate::settings::Flags {
            mode: Some(crate::settings::Mode::Development),
            tls_cert_file: Some(cert.to_path_buf()),
            tls_key_file: Some(key.to_path_buf()),
            tls_client_ca_file: client_ca.map(Path::to_path_buf),
            ..Default::default()
        })
        .unwrap()
    }

    #[test]
    fn tls_files_that_cannot_serve_name_their_setting() {
        let dir = std::env::temp_dir().join(format!("sluice-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let missing = dir.join("missing.pem");
        let text = dir.join("text.pem");
        std::fs::write(&text, "not a certificate\n").unwrap();
        let big = dir.join("big.pem");
        std::fs::write(&big, vec![b'a'; (MAX_PEM_BYTES + 1) as usize]).unwrap();
        let error = |settings: Settings| match Tls::load(&settings) {
            Ok(_) => panic!("loaded"),
            Err(error) => error,
        };
        let e = error(tls_settings(&missing, &text, None));
        assert_eq!(e.setting, "tls_cert_file");
        assert!(e.message.starts_with("cannot read "), "{e}");
        let e = error(tls_settings(&text, &text, None));
        assert_eq!(e.setting, "tls_cert_file");
        assert!(e
            .message
            .ends_with("holds no certificate (PEM, `-----BEGIN CERTIFICATE-----`)"));
        let e = error(tls_settings(&big, &text, None));
        assert_eq!(e.setting, "tls_cert_file");
        assert!(e.message.contains("is over 1048576 bytes"), "{e}");
        assert!(
            Tls::load(
                &Settings::resolve(crate::settings::Flags {
                    mode: Some(crate::settings::Mode::Development),
                    ..Default::default()
                })
                .unwrap()
            )
            .unwrap()
            .is_none(),
            "no TLS unless asked for"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_open_files_limit_is_read() {
        if std::path::Path::new("/proc/self/limits").exists() {
            assert!(open_files_limit().is_some_and(|soft| soft > 0));
        }
    }
}
