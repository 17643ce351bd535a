//! A `redis-server` of a test's own on a free loopback port: throwaway, or durable (and then
//! crashed and restarted by tests of what survives).

use std::process::Command;
use std::time::Duration;

use crate::{free_port, wait_until, Process};

pub struct RedisServer {
    pub port: u16,
    /// Whether it keeps what it acknowledged (append-only file, fsync on every write).
    durable: bool,
    process: Process,
    dir: tempfile::TempDir,
}

/// A server [`RedisServer::kill`] killed, its port and directory kept.
pub struct KilledRedis {
    port: u16,
    durable: bool,
    dir: tempfile::TempDir,
}

impl KilledRedis {
    pub fn restart(self) -> RedisServer {
        RedisServer::launch(self.dir, self.port, self.durable)
    }
}

impl RedisServer {
    /// A Redis that keeps nothing: counters only.
    pub fn start() -> RedisServer {
        RedisServer::launch(tempfile::tempdir().expect("temp dir"), free_port(), false)
    }

    /// A Redis that keeps every write it acknowledged across a crash (`appendonly yes`,
    /// `appendfsync always`), as the configuration's Redis must.
    pub fn start_durable() -> RedisServer {
        RedisServer::launch(tempfile::tempdir().expect("temp dir"), free_port(), true)
    }

    fn launch(dir: tempfile::TempDir, port: u16, durable: bool) -> RedisServer {
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
            .args(if durable {
                ["--appendonly", "yes", "--appendfsync", "always"]
            } else {
                ["--appendonly", "no", "--appendfsync", "everysec"]
            })
            .args(["--daemonize", "no"])
            .arg("--dir")
            .arg(dir.path());
        let log = dir
            .path()
            .join(format!("redis-{}.log", crate::unique_name("run")));
        let mut process = Process::spawn("redis-server", command, &log);
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
            durable,
            process,
            dir,
        }
    }

    /// Kills the server (`SIGKILL`: no shutdown, no final save) and starts it again on the
    /// same port from what it left on disk.
    pub fn crash_and_restart(self) -> RedisServer {
        let RedisServer {
            port,
            durable,
            mut process,
            dir,
        } = self;
        process.stop();
        RedisServer::launch(dir, port, durable)
    }

    /// Kills the server (`SIGKILL`); [`KilledRedis::restart`] starts it again on the same
    /// port, from what it left on disk.
    pub fn kill(self) -> KilledRedis {
        let RedisServer {
            port,
            durable,
            mut process,
            dir,
        } = self;
        process.stop();
        KilledRedis { port, durable, dir }
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
