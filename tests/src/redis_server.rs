//! A throwaway `redis-server` on a free loopback port, without persistence.

use std::process::Command;
use std::time::Duration;

use crate::{free_port, wait_until, Process};

pub struct RedisServer {
    pub port: u16,
    process: Process,
    _dir: tempfile::TempDir,
}

impl RedisServer {
    pub fn start() -> RedisServer {
        let dir = tempfile::tempdir().expect("temp dir");
        let port = free_port();
        let mut command = Command::new("redis-server");
        command
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
            ])
            .args(["--appendonly", "no", "--daemonize", "no"])
            .arg("--dir")
            .arg(dir.path());
        let mut process = Process::spawn("redis-server", command, &dir.path().join("redis.log"));
        let url = format!("redis://127.0.0.1:{port}");
        wait_until("redis-server", Duration::from_secs(10), || {
            process.assert_running();
            redis::Client::open(url.as_str())
                .and_then(|client| client.get_connection())
                .and_then(|mut connection| redis::cmd("PING").query::<String>(&mut connection))
                .is_ok()
        });
        RedisServer {
            port,
            process,
            _dir: dir,
        }
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    pub fn connection(&self) -> redis::Connection {
        redis::Client::open(self.url())
            .and_then(|c| c.get_connection())
            .expect("connect to redis")
    }

    pub fn pid(&self) -> u32 {
        self.process.pid()
    }
}
