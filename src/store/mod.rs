//! The connection to Redis: one server, or a Redis Cluster (`BOXOFFICE_REDIS_CLUSTER`).
//!
//! Every other module talks to Redis through [`Redis`] (multiplexed, shared) or a
//! [`Pool`] (for the consumer's blocking reads), whichever Redis is behind them.
//! Every key an operation touches carries its event's hash tag (`keys`), so each
//! script and each command lands on the one master that owns the event; the global
//! set of events has a slot of its own. What must see every master (the run ids
//! behind the Redis watcher, memory, SCAN) goes through [`Redis::on_every_master`].

mod nodes;

use std::time::Duration;

use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{RoutingInfo, SingleNodeRoutingInfo};
use redis::{Cmd, Pipeline, RedisFuture, RedisResult, Value};

pub use nodes::info_field;

use crate::config::StoreConfig;
use crate::error::{Error, Result, redact_url};

/// Reconnect attempts before a command fails; kept low so a request fails fast (503)
/// instead of waiting out a Redis outage.
const RECONNECT_RETRIES: usize = 1;

/// A multiplexed connection shared by every task of a process: the gate, the
/// waiting rooms, recovery.
#[derive(Clone)]
pub enum Redis {
    Single(ConnectionManager),
    /// Follows MOVED and ASK, and finds a promoted replica itself.
    Cluster(ClusterConnection),
}

impl Redis {
    /// Connects to `REDIS_URL`; every command may take `store.redis_timeout()`.
    pub async fn connect(store: &StoreConfig) -> Result<Self> {
        Self::connect_with(store, store.redis_timeout()).await
    }

    /// Connects with commands that may take up to `response` (a blocking read).
    async fn connect_with(store: &StoreConfig, response: Duration) -> Result<Self> {
        let unreachable = |e: redis::RedisError| {
            Error::Startup(format!(
                "cannot reach Redis at {} ({e}); start it or set REDIS_URL",
                redact_url(&store.redis_url)
            ))
        };
        if store.redis_cluster {
            let client = ClusterClient::builder(seed_nodes(&store.redis_url))
                .connection_timeout(store.redis_timeout())
                .response_timeout(response)
                .retries(RECONNECT_RETRIES as u32)
                .build()
                .map_err(unreachable)?;
            let conn = client.get_async_connection().await.map_err(unreachable)?;
            return Ok(Redis::Cluster(conn));
        }
        let client = redis::Client::open(store.redis_url.as_str()).map_err(unreachable)?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(store.redis_timeout()))
            .set_response_timeout(Some(response))
            .set_number_of_retries(RECONNECT_RETRIES);
        let conn = ConnectionManager::new_with_config(client, config)
            .await
            .map_err(unreachable)?;
        Ok(Redis::Single(conn))
    }

    /// A connection of its own to one server at `url`, as `rush` and tests use.
    pub async fn open(url: &str) -> Result<Self> {
        Ok(Redis::Single(
            ConnectionManager::new(redis::Client::open(url)?).await?,
        ))
    }

    pub fn is_cluster(&self) -> bool {
        matches!(self, Redis::Cluster(_))
    }
}

/// `ConnectionLike` for an enum of a single server's connection and a cluster's: each
/// call goes to whichever it holds.
macro_rules! either_connection {
    ($kind:ident) => {
        impl ConnectionLike for $kind {
            fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
                match self {
                    $kind::Single(conn) => conn.req_packed_command(cmd),
                    $kind::Cluster(conn) => conn.req_packed_command(cmd),
                }
            }

            fn req_packed_commands<'a>(
                &'a mut self,
                pipe: &'a Pipeline,
                offset: usize,
                count: usize,
            ) -> RedisFuture<'a, Vec<Value>> {
                match self {
                    $kind::Single(conn) => conn.req_packed_commands(pipe, offset, count),
                    $kind::Cluster(conn) => conn.req_packed_commands(pipe, offset, count),
                }
            }

            fn get_db(&self) -> i64 {
                match self {
                    $kind::Single(conn) => conn.get_db(),
                    $kind::Cluster(conn) => conn.get_db(),
                }
            }
        }
    };
}

either_connection!(Redis);

/// Replicas that must acknowledge a call's writes (`WAIT`) before it is answered.
#[derive(Debug, Clone, Copy)]
pub struct Replicas {
    pub acks: u8,
    pub timeout_ms: u64,
}

/// `WAIT` counts the writes of the connection it is sent on, up to it. So it goes in
/// one pipeline with the writes it is for: the same connection, the same server, in
/// order. (Sent by itself after them, a client that re-made its connection, or sent
/// the command to another server after a failover, would have it count nothing.)
impl Replicas {
    /// Appends `WAIT` to `pipe`, after the writes it must cover; `false` (nothing
    /// appended) when no acknowledgement is wanted.
    pub fn append(self, pipe: &mut Pipeline) -> bool {
        if self.acks == 0 {
            return false;
        }
        pipe.cmd("WAIT").arg(self.acks).arg(self.timeout_ms);
        true
    }

    /// What `WAIT` answered (`acked` replicas): enough, or `ReplicasBehind`.
    pub fn check(self, acked: i64) -> Result<()> {
        if acked < i64::from(self.acks) {
            return Err(Error::ReplicasBehind {
                acked,
                wanted: self.acks,
            });
        }
        Ok(())
    }
}

/// Connections for work that may block one (the consumer's `XREADGROUP … BLOCK`)
/// and other non-hot work. A cluster connection is multiplexed and never blocks (the
/// consumer polls a cluster), so on a cluster the pool is one shared connection.
#[derive(Clone)]
pub enum Pool {
    Single(deadpool_redis::Pool),
    Cluster(ClusterConnection),
}

/// A connection taken from a [`Pool`].
pub enum Pooled {
    Single(deadpool_redis::Connection),
    Cluster(ClusterConnection),
}

impl Pool {
    /// A pool of `store.redis_pool_size` connections whose commands may take `block`
    /// more than `store.redis_timeout()`.
    pub async fn connect(store: &StoreConfig, block: Duration) -> Result<Self> {
        if store.redis_cluster {
            return match Redis::connect_with(store, block + store.redis_timeout()).await? {
                Redis::Cluster(conn) => Ok(Pool::Cluster(conn)),
                Redis::Single(_) => unreachable!("a cluster configuration connects a cluster"),
            };
        }
        let connection = redis::AsyncConnectionConfig::new()
            .set_connection_timeout(Some(store.redis_timeout()))
            .set_response_timeout(Some(block + store.redis_timeout()));
        let manager =
            deadpool_redis::Manager::new_with_config(store.redis_url.as_str(), connection)
                .map_err(|e| {
                    Error::Startup(format!(
                        "invalid REDIS_URL {}: {e}",
                        redact_url(&store.redis_url)
                    ))
                })?;
        let pool = deadpool_redis::Pool::builder(manager)
            .max_size(store.redis_pool_size)
            .wait_timeout(Some(store.redis_timeout()))
            .create_timeout(Some(store.redis_timeout()))
            .runtime(deadpool_redis::Runtime::Tokio1)
            .build()
            .map_err(|e| Error::Startup(format!("building the Redis pool: {e}")))?;
        Ok(Pool::Single(pool))
    }

    pub async fn get(&self) -> Result<Pooled> {
        Ok(match self {
            Pool::Single(pool) => Pooled::Single(pool.get().await?),
            Pool::Cluster(conn) => Pooled::Cluster(conn.clone()),
        })
    }
}

impl Pooled {
    pub fn is_cluster(&self) -> bool {
        matches!(self, Pooled::Cluster(_))
    }

    /// Whether Redis answers: on a cluster, any master (one failing over leaves the
    /// others' events selling, so the process is still ready to serve).
    pub async fn ping(&mut self) -> Result<()> {
        let ping = redis::cmd("PING");
        let _: Value = match self {
            Pooled::Single(conn) => ping.query_async(conn).await?,
            Pooled::Cluster(conn) => {
                let any = RoutingInfo::SingleNode(SingleNodeRoutingInfo::RandomPrimary);
                nodes::refused(conn.route_command(ping, any).await?)?
            }
        };
        Ok(())
    }

    /// Every key matching `pattern`, on every master of a cluster.
    pub async fn scan_all(&mut self, pattern: &str) -> Result<Vec<String>> {
        match self {
            Pooled::Single(conn) => {
                let options = redis::ScanOptions::default()
                    .with_pattern(pattern)
                    .with_count(1_000);
                let mut found = Vec::new();
                let mut keys: redis::AsyncIter<String> =
                    redis::AsyncCommands::scan_options(conn, options).await?;
                while let Some(key) = keys.next_item().await {
                    found.push(key?);
                }
                Ok(found)
            }
            Pooled::Cluster(conn) => Redis::Cluster(conn.clone()).scan_all(pattern).await,
        }
    }
}

either_connection!(Pooled);

/// Commands of up to this many events are in flight at once on a cluster.
const IN_FLIGHT: usize = 256;

impl Redis {
    /// Sends `commands`, which may name different events' keys, and answers each in
    /// its place, with its own error: one pipeline on a single server; on a cluster,
    /// where a pipeline must stay within one slot, each command by itself,
    /// [`IN_FLIGHT`] at a time (each master's connection pipelines them anyway), so
    /// that a master out of reach fails only its own events' commands.
    pub async fn query_each(&mut self, commands: &[Cmd]) -> Result<Vec<RedisResult<Value>>> {
        match self {
            Redis::Single(conn) => pipelined(conn, commands).await,
            Redis::Cluster(conn) => one_by_one(conn, commands).await,
        }
    }
}

impl Pooled {
    /// See [`Redis::query_each`].
    pub async fn query_each(&mut self, commands: &[Cmd]) -> Result<Vec<RedisResult<Value>>> {
        match self {
            Pooled::Single(conn) => pipelined(conn, commands).await,
            Pooled::Cluster(conn) => one_by_one(conn, commands).await,
        }
    }
}

/// [`Redis::query_each`]'s answers with every error as `Nil`: for reads where a
/// missing key and an unreadable one count alike (a stream not made yet, a master
/// out of reach).
pub fn or_nil(answers: Vec<RedisResult<Value>>) -> Vec<Value> {
    answers
        .into_iter()
        .map(|answer| answer.unwrap_or(Value::Nil))
        .collect()
}

async fn pipelined(
    conn: &mut impl ConnectionLike,
    commands: &[Cmd],
) -> Result<Vec<RedisResult<Value>>> {
    // redis-rs refuses to send an empty pipeline.
    if commands.is_empty() {
        return Ok(Vec::new());
    }
    let mut pipe = redis::pipe();
    pipe.ignore_errors();
    for command in commands {
        pipe.add_command(command.clone());
    }
    let answers: Vec<Value> = pipe.query_async(conn).await?;
    Ok(answers
        .into_iter()
        .map(|answer| match answer {
            Value::ServerError(e) => Err(e.into()),
            answer => Ok(answer),
        })
        .collect())
}

async fn one_by_one(conn: &ClusterConnection, commands: &[Cmd]) -> Result<Vec<RedisResult<Value>>> {
    use futures_util::{StreamExt, stream};

    let calls: Vec<_> = commands
        .iter()
        .map(|command| {
            let (command, mut conn) = (command.clone(), conn.clone());
            async move { command.query_async::<Value>(&mut conn).await }
        })
        .collect();
    Ok(stream::iter(calls).buffered(IN_FLIGHT).collect().await)
}

/// The seed nodes of a cluster `REDIS_URL`: one or more URLs separated by commas
/// (`redis://a:6379,redis://b:6379`); the client learns the rest from them.
fn seed_nodes(url: &str) -> Vec<&str> {
    url.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::seed_nodes;

    #[test]
    fn a_cluster_url_lists_its_seed_nodes() {
        assert_eq!(
            seed_nodes("redis://a:7000, redis://b:7001,"),
            ["redis://a:7000", "redis://b:7001"]
        );
        assert_eq!(seed_nodes("redis://a:7000"), ["redis://a:7000"]);
    }
}
