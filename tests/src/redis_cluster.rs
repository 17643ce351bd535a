//! Redis Cluster and Redis Sentinel of a test's own, on free loopback ports, from the same
//! `redis-server` (and `redis-cli`) the single-server harness uses; every process is killed
//! when the guard drops.

use std::process::Command;
use std::time::Duration;

use crate::{free_port, wait_until, Process};

/// One `redis-server` with extra arguments (cluster mode, `--replicaof`, `--sentinel`).
struct Node {
    port: u16,
    process: Process,
}

fn start_node(dir: &std::path::Path, extra: &[String]) -> Node {
    let port = free_port();
    let mut command = Command::new("redis-server");
    command
        .args(extra)
        .args([
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--daemonize",
            "no",
        ])
        .arg("--dir")
        .arg(dir);
    let log = dir.join(format!("redis-{port}.log"));
    let mut process = Process::spawn("redis-server", command, &log);
    wait_until("redis-server", Duration::from_secs(10), || {
        process.assert_running();
        query::<String>(port, &["PING"]).is_ok()
    });
    Node { port, process }
}

/// Runs one command on the server at `port`.
pub fn query<T: redis::FromRedisValue>(port: u16, args: &[&str]) -> redis::RedisResult<T> {
    let client = redis::Client::open(format!("redis://127.0.0.1:{port}"))?;
    let mut connection = client.get_connection_with_timeout(Duration::from_secs(2))?;
    let mut cmd = redis::cmd(args[0]);
    for arg in &args[1..] {
        cmd.arg(*arg);
    }
    cmd.query(&mut connection)
}

/// A Redis Cluster of `masters` masters (no replicas), every slot assigned, every node
/// agreeing, before [`RedisCluster::start`] returns.
pub struct RedisCluster {
    nodes: Vec<Node>,
    _dir: tempfile::TempDir,
}

impl RedisCluster {
    pub fn start(masters: usize) -> RedisCluster {
        let dir = tempfile::tempdir().expect("temp dir");
        let nodes: Vec<Node> = (0..masters)
            .map(|index| {
                let conf = dir.path().join(format!("nodes-{index}.conf"));
                start_node(
                    dir.path(),
                    &[
                        "--cluster-enabled".into(),
                        "yes".into(),
                        "--cluster-config-file".into(),
                        conf.display().to_string(),
                        "--cluster-node-timeout".into(),
                        "5000".into(),
                        // The bus port is the client port + 10000 unless given, which can fall
                        // in the ephemeral range and collide with any outgoing connection.
                        "--cluster-port".into(),
                        free_port().to_string(),
                    ],
                )
            })
            .collect();
        let addresses: Vec<String> = nodes
            .iter()
            .map(|node| format!("127.0.0.1:{}", node.port))
            .collect();
        let created = Command::new("redis-cli")
            .arg("--cluster")
            .arg("create")
            .args(&addresses)
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .output()
            .expect("run redis-cli --cluster create");
        assert!(
            created.status.success(),
            "redis-cli --cluster create: {}{}",
            String::from_utf8_lossy(&created.stdout),
            String::from_utf8_lossy(&created.stderr)
        );
        let cluster = RedisCluster { nodes, _dir: dir };
        // Every node must know every slot's owner before a client is pointed at it.
        wait_until("redis cluster", Duration::from_secs(30), || {
            cluster.nodes.iter().all(|node| {
                query::<String>(node.port, &["CLUSTER", "INFO"]).is_ok_and(|info| {
                    info.contains("cluster_state:ok")
                        && info.contains("cluster_slots_ok:16384")
                        && info.contains(&format!("cluster_known_nodes:{masters}"))
                })
            })
        });
        cluster
    }

    /// The seed nodes, as `--redis-cluster-nodes` takes them.
    pub fn urls(&self) -> Vec<String> {
        self.nodes
            .iter()
            .map(|node| format!("redis://127.0.0.1:{}", node.port))
            .collect()
    }

    pub fn ports(&self) -> Vec<u16> {
        self.nodes.iter().map(|node| node.port).collect()
    }

    /// `CLUSTER KEYSLOT key`, as the server computes it.
    pub fn keyslot(&self, key: &str) -> u16 {
        query(self.nodes[0].port, &["CLUSTER", "KEYSLOT", key]).expect("CLUSTER KEYSLOT")
    }

    /// The port of the master serving `key`'s slot.
    pub fn port_of(&self, key: &str) -> u16 {
        let slot = self.keyslot(key);
        let slots: redis::Value =
            query(self.nodes[0].port, &["CLUSTER", "SLOTS"]).expect("CLUSTER SLOTS");
        let redis::Value::Array(ranges) = slots else {
            panic!("CLUSTER SLOTS answered {slots:?}");
        };
        for range in ranges {
            let redis::Value::Array(fields) = range else {
                continue;
            };
            let number = |value: &redis::Value| match value {
                redis::Value::Int(n) => *n,
                _ => -1,
            };
            let (low, high) = (number(&fields[0]), number(&fields[1]));
            if (low..=high).contains(&i64::from(slot)) {
                if let redis::Value::Array(master) = &fields[2] {
                    return u16::try_from(number(&master[1])).expect("a port");
                }
            }
        }
        panic!("no master serves slot {slot}");
    }

    /// `GET key` on the master that holds it.
    pub fn get(&self, key: &str) -> Option<String> {
        query(self.port_of(key), &["GET", key]).expect("GET")
    }

    /// Whether `key` exists (on the master that holds it).
    pub fn exists(&self, key: &str) -> bool {
        query::<i64>(self.port_of(key), &["EXISTS", key]).expect("EXISTS") == 1
    }

    /// How many times the cluster's masters together ran `command` (`INFO commandstats`).
    pub fn calls(&self, command: &str) -> u64 {
        self.nodes
            .iter()
            .map(|node| calls(node.port, command))
            .sum()
    }

    /// PIDs of the servers, for tests that look at processes.
    pub fn pids(&self) -> Vec<u32> {
        self.nodes.iter().map(|node| node.process.pid()).collect()
    }
}

/// How many times the server at `port` has run `command` (`INFO commandstats`).
pub fn calls(port: u16, command: &str) -> u64 {
    let info: String = query(port, &["INFO", "commandstats"]).expect("INFO commandstats");
    let prefix = format!("cmdstat_{command}:calls=");
    info.lines()
        .find_map(|line| line.strip_prefix(&prefix))
        .and_then(|rest| rest.split(',').next()?.parse().ok())
        .unwrap_or(0)
}

/// One master, one replica, three Sentinels watching the master as `MASTER_NAME`, each
/// Sentinel knowing the replica and the other two before [`RedisSentinels::start`] returns.
pub struct RedisSentinels {
    master: Option<Node>,
    replica: Node,
    sentinels: Vec<Node>,
    _dir: tempfile::TempDir,
}

/// The name the Sentinels know the master by.
pub const MASTER_NAME: &str = "sluice";

impl RedisSentinels {
    pub fn start() -> RedisSentinels {
        let dir = tempfile::tempdir().expect("temp dir");
        let master = start_node(dir.path(), &[]);
        let replica = start_node(
            dir.path(),
            &[
                "--replicaof".into(),
                "127.0.0.1".into(),
                master.port.to_string(),
            ],
        );
        wait_until("replica in sync", Duration::from_secs(20), || {
            query::<String>(replica.port, &["INFO", "replication"])
                .is_ok_and(|info| info.contains("master_link_status:up"))
        });
        let sentinels: Vec<Node> = (0..3)
            .map(|index| {
                // A Sentinel rewrites its configuration file: one file each.
                let conf = dir.path().join(format!("sentinel-{index}.conf"));
                std::fs::write(
                    &conf,
                    format!(
                        "sentinel monitor {MASTER_NAME} 127.0.0.1 {port} 2\n\
                         sentinel down-after-milliseconds {MASTER_NAME} 1000\n\
                         sentinel failover-timeout {MASTER_NAME} 10000\n\
                         sentinel parallel-syncs {MASTER_NAME} 1\n",
                        port = master.port
                    ),
                )
                .expect("write sentinel.conf");
                start_node(
                    dir.path(),
                    &[conf.display().to_string(), "--sentinel".into()],
                )
            })
            .collect();
        let world = RedisSentinels {
            master: Some(master),
            replica,
            sentinels,
            _dir: dir,
        };
        wait_until("sentinels", Duration::from_secs(60), || {
            world.sentinels.iter().all(|sentinel| {
                query::<Vec<String>>(sentinel.port, &["SENTINEL", "MASTER", MASTER_NAME]).is_ok_and(
                    |fields| {
                        let field = |name: &str| {
                            fields
                                .chunks(2)
                                .find(|pair| pair[0] == name)
                                .map(|pair| pair[1].clone())
                                .unwrap_or_default()
                        };
                        field("num-slaves") == "1" && field("num-other-sentinels") == "2"
                    },
                )
            })
        });
        world
    }

    /// The Sentinels, as `--redis-sentinels` takes them.
    pub fn urls(&self) -> Vec<String> {
        self.sentinels
            .iter()
            .map(|node| format!("redis://127.0.0.1:{}", node.port))
            .collect()
    }

    pub fn master_port(&self) -> Option<u16> {
        self.master.as_ref().map(|node| node.port)
    }

    pub fn replica_port(&self) -> u16 {
        self.replica.port
    }

    /// The master's port as the first Sentinel names it now.
    pub fn named_master_port(&self) -> Option<u16> {
        query::<Vec<String>>(
            self.sentinels[0].port,
            &["SENTINEL", "GET-MASTER-ADDR-BY-NAME", MASTER_NAME],
        )
        .ok()
        .and_then(|address| address.get(1)?.parse().ok())
    }

    /// Kills the master (`SIGKILL`).
    pub fn kill_master(&mut self) {
        if let Some(mut master) = self.master.take() {
            master.process.stop();
        }
    }
}
