//! One connection type for every way the controller can reach Redis: a single server, a
//! Redis Cluster (seed nodes; MOVED/ASK, per-node script loading and per-node pipelines are
//! the `redis` crate's), or the master a set of Sentinels names (followed through failover).
//!
//! [`RedisConnection`] implements `redis::aio::ConnectionLike`, so the counters' store and the
//! configuration's store send their commands and scripts the same way on all three. On a
//! single Redis it is the `ConnectionManager` it always was: one `match` more, nothing else.

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwapOption;
use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster::{ClusterClient, ClusterClientBuilder};
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{RoutingInfo, SingleNodeRoutingInfo};
use redis::io::tcp::TcpSettings;
use redis::sentinel::{SentinelClient, SentinelNodeConnectionInfo, SentinelServerType};
use redis::{
    Cmd, IntoConnectionInfo, Pipeline, RedisError, RedisFuture, RedisResult, ServerErrorKind, Value,
};

/// Where Redis is, as the settings say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RedisTarget {
    /// One server (`redis_url`).
    Single(String),
    /// A Redis Cluster, reached through any of these seed nodes (`redis_cluster_nodes`).
    Cluster(Vec<String>),
    /// The master named `master` by these Sentinels (`redis_sentinels`,
    /// `redis_sentinel_master`).
    Sentinel {
        sentinels: Vec<String>,
        master: String,
    },
}

impl RedisTarget {
    /// For logs, without passwords.
    pub fn describe(&self) -> String {
        let list = |urls: &[String]| {
            urls.iter()
                .map(|url| redact_password(url))
                .collect::<Vec<_>>()
                .join(",")
        };
        match self {
            RedisTarget::Single(url) => redact_password(url),
            RedisTarget::Cluster(nodes) => format!("cluster {}", list(nodes)),
            RedisTarget::Sentinel { sentinels, master } => {
                format!("master {master:?} of sentinels {}", list(sentinels))
            }
        }
    }

    /// The setting a failure to open it is reported against.
    pub fn setting(&self) -> &'static str {
        match self {
            RedisTarget::Single(_) => "redis_url",
            RedisTarget::Cluster(_) => "redis_cluster_nodes",
            RedisTarget::Sentinel { .. } => "redis_sentinels",
        }
    }
}

/// A multiplexed connection to Redis, however it is deployed; cloning shares it.
#[derive(Clone)]
pub enum RedisConnection {
    Single(ConnectionManager),
    Cluster(LazyCluster),
    Sentinel(SentinelConnection),
}

impl RedisConnection {
    /// Prepares a connection to `target`. No connection is made until the first command, so
    /// the controller starts (and reports not ready) while Redis comes up.
    pub fn open(target: &RedisTarget, timeout: Duration) -> RedisResult<RedisConnection> {
        match target {
            RedisTarget::Single(url) => {
                Ok(RedisConnection::Single(connection_manager(url, timeout)?))
            }
            RedisTarget::Cluster(nodes) => {
                let mut seeds = Vec::with_capacity(nodes.len());
                for node in nodes {
                    seeds.push(node.as_str().into_connection_info()?);
                }
                let client = ClusterClientBuilder::new(seeds)
                    .tcp_settings(TcpSettings::default().set_nodelay(true))
                    .connection_timeout(timeout)
                    .response_timeout(timeout)
                    // Redirections (MOVED, ASK) and slot refreshes count as retries; a
                    // check must not wait out the crate's default 16 with back-off.
                    .retries(3)
                    .min_retry_wait(1)
                    .max_retry_wait(20)
                    .build()?;
                Ok(RedisConnection::Cluster(LazyCluster {
                    client: Arc::new(client),
                    connection: Arc::new(tokio::sync::OnceCell::new()),
                }))
            }
            RedisTarget::Sentinel { sentinels, master } => {
                let node = SentinelNodeConnectionInfo::default()
                    .set_tcp_settings(TcpSettings::default().set_nodelay(true));
                let mut addresses = Vec::with_capacity(sentinels.len());
                for sentinel in sentinels {
                    addresses.push(sentinel.as_str().into_connection_info()?);
                }
                let client = SentinelClient::build(
                    addresses,
                    master.clone(),
                    Some(node),
                    SentinelServerType::Master,
                )?;
                Ok(RedisConnection::Sentinel(SentinelConnection {
                    inner: Arc::new(SentinelInner {
                        sentinel: tokio::sync::Mutex::new(client),
                        master: ArcSwapOption::empty(),
                        timeout,
                    }),
                }))
            }
        }
    }

    /// Whether this is a Redis Cluster (where one script may only touch one slot).
    pub fn is_cluster(&self) -> bool {
        matches!(self, RedisConnection::Cluster(_))
    }

    /// A connection to each master of a cluster (for `SCAN`, whose cursor is per node); on
    /// a single Redis or a Sentinel master, the one connection.
    pub async fn masters(&self) -> RedisResult<Vec<NodeConnection>> {
        match self {
            RedisConnection::Cluster(cluster) => {
                let connection = cluster.get().await?;
                let nodes: String = redis::FromRedisValue::from_redis_value(
                    connection
                        .clone()
                        .route_command(
                            redis::cmd("CLUSTER").arg("NODES").clone(),
                            RoutingInfo::SingleNode(SingleNodeRoutingInfo::Random),
                        )
                        .await?,
                )?;
                Ok(masters_of(&nodes)
                    .into_iter()
                    .map(|(host, port)| NodeConnection::Node {
                        connection: connection.clone(),
                        host,
                        port,
                    })
                    .collect())
            }
            other => Ok(vec![NodeConnection::Whole(other.clone())]),
        }
    }
}

/// A connection to one master of a cluster, or the whole (non-cluster) Redis.
pub enum NodeConnection {
    Whole(RedisConnection),
    Node {
        connection: ClusterConnection,
        host: String,
        port: u16,
    },
}

impl NodeConnection {
    pub async fn query<T: redis::FromRedisValue>(&mut self, cmd: &Cmd) -> RedisResult<T> {
        match self {
            NodeConnection::Whole(connection) => cmd.query_async(connection).await,
            NodeConnection::Node {
                connection,
                host,
                port,
            } => {
                let value = connection
                    .route_command(
                        cmd.clone(),
                        RoutingInfo::SingleNode(SingleNodeRoutingInfo::ByAddress {
                            host: host.clone(),
                            port: *port,
                        }),
                    )
                    .await?;
                redis::FromRedisValue::from_redis_value(value).map_err(Into::into)
            }
        }
    }
}

/// The masters (host, port) in a `CLUSTER NODES` answer that serve slots and are not
/// failing.
fn masters_of(nodes: &str) -> Vec<(String, u16)> {
    nodes
        .lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let flags = fields.get(2)?;
            let is_master = flags.split(',').any(|f| f == "master")
                && !flags.split(',').any(|f| f == "fail" || f == "noaddr");
            // Fields 8 and on are the slots it serves.
            if !is_master || fields.len() < 9 {
                return None;
            }
            let address = fields.get(1)?.split(['@', ',']).next()?;
            let (host, port) = address.rsplit_once(':')?;
            Some((host.to_owned(), port.parse().ok()?))
        })
        .collect()
}

fn connection_manager(url: &str, timeout: Duration) -> RedisResult<ConnectionManager> {
    // Without TCP_NODELAY a small command written while the previous one is unacked
    // waits for the ACK (Nagle), and pipelined checks queue behind it.
    let info = url
        .into_connection_info()?
        .set_tcp_settings(TcpSettings::default().set_nodelay(true));
    connection_manager_for(redis::Client::open(info)?, timeout)
}

fn connection_manager_for(
    client: redis::Client,
    timeout: Duration,
) -> RedisResult<ConnectionManager> {
    let config = ConnectionManagerConfig::new()
        .set_connection_timeout(Some(timeout))
        .set_response_timeout(Some(timeout))
        .set_number_of_retries(1);
    ConnectionManager::new_lazy_with_config(client, config)
}

/// A cluster connection made on first use (the crate's is made by an async call), and
/// made again on a later use if the first attempt failed.
#[derive(Clone)]
pub struct LazyCluster {
    client: Arc<ClusterClient>,
    connection: Arc<tokio::sync::OnceCell<ClusterConnection>>,
}

impl LazyCluster {
    async fn get(&self) -> RedisResult<ClusterConnection> {
        self.connection
            .get_or_try_init(|| self.client.get_async_connection())
            .await
            .cloned()
    }
}

/// The master the Sentinels name, on a connection that is dropped, and the master asked for
/// again, when it fails in a way a failover explains (refused, dropped, timed out, or
/// `READONLY`: the old master came back as a replica).
#[derive(Clone)]
pub struct SentinelConnection {
    inner: Arc<SentinelInner>,
}

struct SentinelInner {
    sentinel: tokio::sync::Mutex<SentinelClient>,
    master: ArcSwapOption<Master>,
    timeout: Duration,
}

struct Master {
    connection: ConnectionManager,
}

impl SentinelConnection {
    async fn master(&self) -> RedisResult<Arc<Master>> {
        if let Some(master) = self.inner.master.load_full() {
            return Ok(master);
        }
        // One lookup at a time; who waited for it uses its answer.
        let mut sentinel = self.inner.sentinel.lock().await;
        if let Some(master) = self.inner.master.load_full() {
            return Ok(master);
        }
        let lookup = tokio::time::timeout(self.inner.timeout, sentinel.async_get_client()).await;
        let client = match lookup {
            Ok(client) => client?,
            Err(_) => {
                return Err(RedisError::from(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "no sentinel named the master in time",
                )))
            }
        };
        let address = client.get_connection_info().addr().to_string();
        tracing::info!(master = %address, "sentinel names the master");
        let master = Arc::new(Master {
            connection: connection_manager_for(client, self.inner.timeout)?,
        });
        self.inner.master.store(Some(Arc::clone(&master)));
        Ok(master)
    }

    /// Forgets `master` if it is still the current one and its answer says it may no
    /// longer be the master ([`fails_over`], [`replies_fail_over`]).
    fn after(&self, master: &Arc<Master>, failover: bool) {
        if failover {
            let current = self.inner.master.load();
            if current.as_ref().is_some_and(|c| Arc::ptr_eq(c, master)) {
                self.inner.master.store(None);
            }
        }
    }
}

/// Whether an error is one a failover explains: refused, dropped, timed out, or a reply
/// `READONLY` (the old master came back as a replica) or `MASTERDOWN` (a replica whose
/// master is gone).
fn fails_over(error: &RedisError) -> bool {
    error.is_io_error()
        || error.is_connection_refusal()
        || error.is_connection_dropped()
        || error.is_timeout()
        || error.kind() == redis::ErrorKind::Server(ServerErrorKind::ReadOnly)
        || error.kind() == redis::ErrorKind::Server(ServerErrorKind::MasterDown)
}

/// Whether replies carry a `READONLY` or `MASTERDOWN` error. The `redis` crate hands a
/// server's error reply back as a value (`Value::ServerError`), not as an `Err`: the
/// caller's `query_async` makes it one, after the connection has answered.
fn replies_fail_over<'a>(replies: impl IntoIterator<Item = &'a Value>) -> bool {
    replies.into_iter().any(|reply| match reply {
        Value::ServerError(error) => matches!(
            error.kind(),
            Some(ServerErrorKind::ReadOnly | ServerErrorKind::MasterDown)
        ),
        // A transaction's replies, one level down.
        Value::Array(replies) => replies_fail_over(replies),
        _ => false,
    })
}

impl ConnectionLike for RedisConnection {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            RedisConnection::Single(connection) => connection.req_packed_command(cmd),
            RedisConnection::Cluster(cluster) => {
                Box::pin(async move { cluster.get().await?.req_packed_command(cmd).await })
            }
            RedisConnection::Sentinel(sentinel) => Box::pin(async move {
                let master = sentinel.master().await?;
                let answer = master.connection.clone().req_packed_command(cmd).await;
                let failover = match &answer {
                    Ok(reply) => replies_fail_over([reply]),
                    Err(error) => fails_over(error),
                };
                sentinel.after(&master, failover);
                answer
            }),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            RedisConnection::Single(connection) => {
                connection.req_packed_commands(pipeline, offset, count)
            }
            RedisConnection::Cluster(cluster) => Box::pin(async move {
                cluster
                    .get()
                    .await?
                    .req_packed_commands(pipeline, offset, count)
                    .await
            }),
            RedisConnection::Sentinel(sentinel) => Box::pin(async move {
                let master = sentinel.master().await?;
                let answer = master
                    .connection
                    .clone()
                    .req_packed_commands(pipeline, offset, count)
                    .await;
                let failover = match &answer {
                    Ok(replies) => replies_fail_over(replies),
                    Err(error) => fails_over(error),
                };
                sentinel.after(&master, failover);
                answer
            }),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            RedisConnection::Single(connection) => connection.get_db(),
            RedisConnection::Cluster(_) | RedisConnection::Sentinel(_) => 0,
        }
    }
}

pub(crate) fn redact_password(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme_end), Some(at)) if at > scheme_end => {
            format!("{}://***@{}", &url[..scheme_end], &url[at + 1..])
        }
        _ => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masters_are_read_from_cluster_nodes() {
        let nodes = "\
a1 127.0.0.1:7001@17001 myself,master - 0 0 1 connected 0-5460
b2 127.0.0.1:7002@17002,host.example master - 0 0 2 connected 5461-10922
c3 127.0.0.1:7003@17003 master,fail - 0 0 3 connected 10923-16383
d4 127.0.0.1:7004@17004 slave a1 0 0 1 connected
e5 127.0.0.1:7005@17005 master - 0 0 0 connected
";
        assert_eq!(
            masters_of(nodes),
            [
                ("127.0.0.1".to_owned(), 7001),
                ("127.0.0.1".to_owned(), 7002)
            ]
        );
    }

    #[test]
    fn readonly_and_masterdown_replies_fail_over_and_other_replies_do_not() {
        let reply = |bytes: &[u8]| redis::parse_redis_value(bytes).expect("a reply");
        let readonly = reply(b"-READONLY You can't write against a read only replica.\r\n");
        let masterdown = reply(b"-MASTERDOWN Link with MASTER is down\r\n");
        let other = reply(b"-ERR wrong number of arguments\r\n");
        let fine = reply(b":1\r\n");
        assert!(replies_fail_over([&readonly]));
        assert!(replies_fail_over([&fine, &masterdown]));
        assert!(replies_fail_over([&Value::Array(vec![
            fine.clone(),
            readonly
        ])]));
        assert!(!replies_fail_over([&other, &fine]));
        assert!(!replies_fail_over([]));
    }

    #[test]
    fn targets_describe_themselves_without_passwords() {
        let target = RedisTarget::Cluster(vec![
            "redis://:pw@10.0.0.1:7000".into(),
            "redis://10.0.0.2:7000".into(),
        ]);
        assert_eq!(
            target.describe(),
            "cluster redis://***@10.0.0.1:7000,redis://10.0.0.2:7000"
        );
        assert_eq!(target.setting(), "redis_cluster_nodes");
    }
}
