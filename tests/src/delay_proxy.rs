//! A TCP proxy that holds every chunk from client to server for a while: it makes a
//! controller slow without changing it, so that a batch stays out long enough to test what
//! happens meanwhile.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

pub struct DelayProxy {
    pub port: u16,
    /// Chunks read from clients so far (a callout that reached the proxy), and chunks of
    /// replies passed back to them: what tests wait for instead of sleeping.
    from_clients: Arc<AtomicU64>,
    to_clients: Arc<AtomicU64>,
}

impl DelayProxy {
    /// Forwards connections on a free port to `127.0.0.1:target`, holding client data for
    /// `delay`. Runs until the test process ends.
    pub fn start(target: u16, delay: Duration) -> DelayProxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind proxy");
        let port = listener.local_addr().expect("proxy address").port();
        let from_clients = Arc::new(AtomicU64::new(0));
        let to_clients = Arc::new(AtomicU64::new(0));
        let (requests, replies) = (Arc::clone(&from_clients), Arc::clone(&to_clients));
        std::thread::spawn(move || {
            for client in listener.incoming().flatten() {
                let Ok(server) = TcpStream::connect(("127.0.0.1", target)) else {
                    continue;
                };
                let (Ok(client_in), Ok(server_out)) = (client.try_clone(), server.try_clone())
                else {
                    continue;
                };
                let (requests, replies) = (Arc::clone(&requests), Arc::clone(&replies));
                let probing = Arc::new(AtomicBool::new(false));
                let probing_in = Arc::clone(&probing);
                std::thread::spawn(move || {
                    pipe(client_in, server_out, delay, &requests, &probing_in, true)
                });
                std::thread::spawn(move || {
                    pipe(server, client, Duration::ZERO, &replies, &probing, false)
                });
            }
        });
        DelayProxy {
            port,
            from_clients,
            to_clients,
        }
    }

    /// Chunks read from clients so far.
    pub fn chunks_in(&self) -> u64 {
        self.from_clients.load(Ordering::SeqCst)
    }

    /// Chunks of replies passed back to clients so far.
    pub fn chunks_out(&self) -> u64 {
        self.to_clients.load(Ordering::SeqCst)
    }
}

/// Copies `from` to `to`, holding each chunk for `delay` and counting it in `seen`. Envoy's
/// health checks of the controller (a connection of their own, opening with `GET /readyz`)
/// pass at once and uncounted: the tests are about checks, and a probe held past its
/// timeout would mark the controller unhealthy. The client side (`first_is_request`)
/// decides from its first chunk, in `probing`.
fn pipe(
    mut from: TcpStream,
    mut to: TcpStream,
    delay: Duration,
    seen: &AtomicU64,
    probing: &AtomicBool,
    first_is_request: bool,
) {
    let mut buffer = [0u8; 16 * 1024];
    let mut first = first_is_request;
    loop {
        match from.read(&mut buffer) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if first {
                    first = false;
                    probing.store(buffer[..n].starts_with(b"GET /readyz"), Ordering::SeqCst);
                }
                if !probing.load(Ordering::SeqCst) {
                    seen.fetch_add(1, Ordering::SeqCst);
                    std::thread::sleep(delay);
                }
                if to.write_all(&buffer[..n]).is_err() {
                    break;
                }
            }
        }
    }
    let _ = to.shutdown(Shutdown::Write);
}
