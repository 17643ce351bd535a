//! A TCP proxy that holds every chunk from client to server for a while: it makes a
//! controller slow without changing it, so that a batch stays out long enough to test what
//! happens meanwhile.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::time::Duration;

pub struct DelayProxy {
    pub port: u16,
}

impl DelayProxy {
    /// Forwards connections on a free port to `127.0.0.1:target`, holding client data for
    /// `delay`. Runs until the test process ends.
    pub fn start(target: u16, delay: Duration) -> DelayProxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind proxy");
        let port = listener.local_addr().expect("proxy address").port();
        std::thread::spawn(move || {
            for client in listener.incoming().flatten() {
                let Ok(server) = TcpStream::connect(("127.0.0.1", target)) else {
                    continue;
                };
                let (Ok(client_in), Ok(server_out)) = (client.try_clone(), server.try_clone())
                else {
                    continue;
                };
                std::thread::spawn(move || pipe(client_in, server_out, delay));
                std::thread::spawn(move || pipe(server, client, Duration::ZERO));
            }
        });
        DelayProxy { port }
    }
}

fn pipe(mut from: TcpStream, mut to: TcpStream, delay: Duration) {
    let mut buffer = [0u8; 16 * 1024];
    loop {
        match from.read(&mut buffer) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                std::thread::sleep(delay);
                if to.write_all(&buffer[..n]).is_err() {
                    break;
                }
            }
        }
    }
    let _ = to.shutdown(Shutdown::Write);
}
