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

    /// Freezes the server (`SIGSTOP`): connections stay open, nothing is answered, as when
    /// Redis hangs or the network drops packets.
    pub fn pause(&self) {
        signal(self.pid(), "STOP");
    }

    /// Lets a paused server go on (`SIGCONT`).
    pub fn resume(&self) {
        signal(self.pid(), "CONT");
    }

    /// How many times the server has run `command` (lower-case, as `INFO commandstats`
    /// names it: `evalsha`, `eval`, `ping`…).
    pub fn calls(&self, command: &str) -> u64 {
        let info: String = redis::cmd("INFO")
            .arg("commandstats")
            .query(&mut self.connection())
            .expect("INFO commandstats");
        let prefix = format!("cmdstat_{command}:calls=");
        info.lines()
            .find_map(|line| line.strip_prefix(&prefix))
            .and_then(|rest| rest.split(',').next()?.parse().ok())
            .unwrap_or(0)
    }

    /// The clients connected now, less the connection this call opens.
    pub fn other_clients(&self) -> Vec<String> {
        let list: String = redis::cmd("CLIENT")
            .arg("LIST")
            .query(&mut self.connection())
            .expect("CLIENT LIST");
        list.lines()
            .filter(|line| !line.contains(" cmd=client|list"))
            .map(str::to_owned)
            .collect()
    }
}

fn signal(pid: u32, name: &str) {
    let status = Command::new("kill")
        .arg(format!("-{name}"))
        .arg(pid.to_string())
        .status()
        .expect("run kill");
    assert!(status.success(), "kill -{name} {pid}");
}
