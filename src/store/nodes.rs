//! Commands that are about a server rather than a key (`INFO`, `TIME`, `SCAN`): on
//! a cluster they must name which server. An event's are sent to the master owning
//! its slot; the rest to every master.

use redis::Value;
use redis::cluster_routing::{
    MultipleNodeRoutingInfo, Route, RoutingInfo, SingleNodeRoutingInfo, SlotAddr,
};

use super::Redis;
use crate::error::{Error, Result};

/// The value of `name` in an `INFO` reply (`name:value` lines), trimmed.
pub fn info_field<'a>(info: &'a str, name: &str) -> Option<&'a str> {
    info.lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(':'))
        .map(str::trim)
}

impl Redis {
    /// Runs `cmd` on the server that holds `key` (its slot's master on a cluster).
    pub async fn on_server_of<T: redis::FromRedisValue>(
        &mut self,
        key: &str,
        cmd: &redis::Cmd,
    ) -> Result<T> {
        let value = match self {
            Redis::Single(conn) => cmd.query_async::<Value>(conn).await?,
            Redis::Cluster(conn) => {
                let route = Route::with_key(key, SlotAddr::Master);
                let routing = RoutingInfo::SingleNode(SingleNodeRoutingInfo::SpecificNode(route));
                conn.route_command(cmd.clone(), routing).await?
            }
        };
        Ok(redis::from_redis_value(refused(value)?)?)
    }

    /// Runs `cmd` on every master (the one server outside a cluster): each master's
    /// address (`host:port`; the URL's outside a cluster) and answer.
    pub async fn on_every_master<T: redis::FromRedisValue>(
        &mut self,
        cmd: &redis::Cmd,
    ) -> Result<Vec<(String, T)>> {
        match self {
            Redis::Single(conn) => Ok(vec![(String::new(), cmd.query_async(conn).await?)]),
            Redis::Cluster(conn) => {
                let routing = RoutingInfo::MultiNode((MultipleNodeRoutingInfo::AllMasters, None));
                let Value::Map(answers) = conn.route_command(cmd.clone(), routing).await? else {
                    return Err(Error::UnexpectedReply(
                        "a command sent to every master answered no map".into(),
                    ));
                };
                answers
                    .into_iter()
                    .map(|(node, answer)| {
                        Ok((
                            redis::from_redis_value(node)?,
                            redis::from_redis_value(refused(answer)?)?,
                        ))
                    })
                    .collect()
            }
        }
    }

    /// Runs `cmd` on the master at `node` (an address [`Redis::on_every_master`]
    /// gave); outside a cluster, on the one server.
    pub async fn on_master<T: redis::FromRedisValue>(
        &mut self,
        node: &str,
        cmd: &redis::Cmd,
    ) -> Result<T> {
        match self {
            Redis::Single(conn) => Ok(cmd.query_async(conn).await?),
            Redis::Cluster(conn) => {
                let (host, port) = node
                    .rsplit_once(':')
                    .and_then(|(host, port)| Some((host.to_owned(), port.parse().ok()?)))
                    .ok_or_else(|| Error::UnexpectedReply(format!("node address {node}")))?;
                let routing =
                    RoutingInfo::SingleNode(SingleNodeRoutingInfo::ByAddress { host, port });
                let answer = conn.route_command(cmd.clone(), routing).await?;
                Ok(redis::from_redis_value(refused(answer)?)?)
            }
        }
    }

    /// The `run_id` of the server holding `key`: what an event's `run` must equal for
    /// it to sell (see `gate::recovery`).
    pub async fn run_id_of(&mut self, key: &str) -> Result<String> {
        let info: String = self
            .on_server_of(key, redis::cmd("INFO").arg("server"))
            .await?;
        run_id(&info)
    }

    /// Every master's `run_id`, sorted: it changes when any master restarts or a
    /// replica is promoted (what the Redis watcher looks for).
    pub async fn run_ids(&mut self) -> Result<String> {
        let infos: Vec<(String, String)> = self
            .on_every_master(redis::cmd("INFO").arg("server"))
            .await?;
        let mut ids = infos
            .iter()
            .map(|(_, info)| run_id(info))
            .collect::<Result<Vec<_>>>()?;
        ids.sort_unstable();
        Ok(ids.join(","))
    }

    /// The clock of the server holding `key`, Unix milliseconds: what its hold
    /// expiries are measured against.
    pub async fn now_ms_of(&mut self, key: &str) -> Result<i64> {
        let (secs, micros): (i64, i64) = self.on_server_of(key, &redis::cmd("TIME")).await?;
        Ok(secs * 1000 + micros / 1000)
    }

    /// Appends to `pipe` a read of the clock of the server holding `key`, answered
    /// like `TIME`: a `TIME` in a pipeline could go to any master of a cluster.
    pub fn time_of(pipe: &mut redis::Pipeline, key: &str) {
        pipe.cmd("EVAL")
            .arg("return redis.call('TIME')")
            .arg(1)
            .arg(key);
    }

    /// Every key matching `pattern` on every master.
    pub async fn scan_all(&mut self, pattern: &str) -> Result<Vec<String>> {
        let masters: Vec<(String, Value)> = self.on_every_master(&redis::cmd("PING")).await?;
        let mut found = Vec::new();
        for (node, _) in masters {
            let mut cursor = 0u64;
            loop {
                let (next, keys): (u64, Vec<String>) = self
                    .on_master(
                        &node,
                        redis::cmd("SCAN")
                            .arg(cursor)
                            .arg("MATCH")
                            .arg(pattern)
                            .arg("COUNT")
                            .arg(1000),
                    )
                    .await?;
                found.extend(keys);
                if next == 0 {
                    break;
                }
                cursor = next;
            }
        }
        Ok(found)
    }
}

/// A command routed by hand answers a refusal as a value (a replica refusing `WAIT`
/// after a failover the client has not seen yet): an error like any other.
pub(super) fn refused(answer: Value) -> Result<Value> {
    match answer {
        Value::ServerError(e) => Err(redis::RedisError::from(e).into()),
        answer => Ok(answer),
    }
}

fn run_id(info: &str) -> Result<String> {
    info_field(info, "run_id")
        .map(str::to_owned)
        .ok_or_else(|| Error::UnexpectedReply("INFO server without run_id".into()))
}
