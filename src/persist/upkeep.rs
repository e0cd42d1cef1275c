//! Looking after the streams and the group: finding the events' streams, taking over
//! what dead consumers left pending, removing departed consumers, trimming what was
//! written, and deleting old hold rows.

use std::collections::HashMap;
use std::time::Instant;

use deadpool_redis::redis::streams::{
    StreamAutoClaimOptions, StreamAutoClaimReply, StreamInfoConsumersReply, StreamKey,
};
use deadpool_redis::redis::{self, AsyncCommands};

use super::parking::lost;
use super::{
    CONSUMER_GROUP, Connection, Consumer, Cursor, PRUNE_EVERY, PRUNE_STATEMENTS_PER_ROUND,
    TRIM_EVERY, backlog,
};
use crate::db;
use crate::error::{Error, Result};

/// Streams whose group is made, or that are trimmed, per round trip.
const UPKEEP_CHUNK: usize = 256;
/// Streams whose stale entries are taken over per round trip: each reply may carry
/// `consumer_batch` entries, all held at once.
const CLAIM_CHUNK: usize = 64;

impl Consumer {
    /// Re-reads the set of events (new ones appear while running), makes sure each
    /// stream has the group, and updates the backlog gauge.
    pub(super) async fn refresh_streams(
        &self,
        conn: &mut Connection,
        cursor: &mut Cursor,
    ) -> Result<()> {
        let ids: Vec<String> = match conn.smembers(self.keys.events()).await {
            Ok(ids) => ids,
            // On a cluster the set of events is on one master: while it is out of
            // reach, the streams known so far are read on.
            Err(e) if conn.is_cluster() && !cursor.streams.is_empty() => {
                super::stream_unreachable(&self.keys.events(), &e);
                cursor.refreshed = Some(Instant::now());
                return Ok(());
            }
            Err(e) => return Err(e.into()),
        };
        cursor.streams = ids
            .iter()
            .filter_map(|id| id.parse().ok())
            .map(|id| self.keys.stream(id))
            .collect();
        cursor.refreshed = Some(Instant::now());
        let new: Vec<&String> = (cursor.streams.iter())
            .filter(|stream| !cursor.grouped.contains(*stream))
            .collect();
        for chunk in new.chunks(UPKEEP_CHUNK) {
            let creates: Vec<redis::Cmd> = (chunk.iter())
                .map(|stream| redis::Cmd::xgroup_create_mkstream(*stream, CONSUMER_GROUP, "0"))
                .collect();
            for (stream, created) in chunk.iter().zip(conn.query_each(&creates).await?) {
                match created {
                    Err(e) if e.code() != Some("BUSYGROUP") => {
                        if !conn.is_cluster() {
                            return Err(e.into());
                        }
                        super::stream_unreachable(stream, &e);
                    }
                    _ => _ = cursor.grouped.insert((*stream).clone()),
                }
            }
        }
        crate::metrics::stream_backlog(backlog(conn, &cursor.streams).await?);
        Ok(())
    }

    /// Takes over what dead consumers left pending, and removes departed ones: the
    /// first `XAUTOCLAIM` and the `XINFO CONSUMERS` of many streams pipelined, so
    /// that 10,000 events do not cost 20,000 round trips one after the other.
    pub(super) async fn look_after_group(
        &self,
        conn: &mut Connection,
        cursor: &mut Cursor,
    ) -> Result<()> {
        for chunk in cursor.streams.chunks(CLAIM_CHUNK) {
            let mut queries: Vec<redis::Cmd> = (chunk.iter())
                .map(|stream| self.claim_from(stream, "0-0"))
                .collect();
            queries.extend(
                (chunk.iter()).map(|stream| redis::Cmd::xinfo_consumers(stream, CONSUMER_GROUP)),
            );
            let mut replies = conn.query_each(&queries).await?;
            let infos = replies.split_off(chunk.len());
            for ((stream, claim), info) in chunk.iter().zip(replies).zip(infos) {
                let looked_after = async {
                    let claim = redis::from_redis_value(claim?)?;
                    let deferred =
                        (self.claim_stale(conn, stream, claim, &mut cursor.untrimmed)).await?;
                    self.forget_departed(conn, stream, redis::from_redis_value(info?)?)
                        .await?;
                    Ok::<_, Error>(deferred)
                };
                match looked_after.await {
                    Ok(deferred) => cursor.backlog |= deferred,
                    // An error or an odd reply in its place: only this stream waits.
                    Err(e @ (Error::Redis(_) | Error::UnexpectedReply(_))) if conn.is_cluster() => {
                        super::stream_unreachable(stream, &e)
                    }
                    Err(e) => return Err(e),
                }
            }
        }
        cursor.last_claim = Some(Instant::now());
        Ok(())
    }

    /// Trims streams acknowledged a while ago, or all of them when the round was idle.
    pub(super) async fn trim_due(
        &self,
        conn: &mut Connection,
        cursor: &mut Cursor,
        idle: bool,
    ) -> Result<()> {
        let due: Vec<String> = cursor
            .untrimmed
            .iter()
            .filter(|(_, since)| idle || since.elapsed() >= TRIM_EVERY)
            .map(|(stream, _)| stream.clone())
            .collect();
        for chunk in due.chunks(UPKEEP_CHUNK) {
            let trims: Vec<redis::Cmd> = chunk.iter().map(|stream| self.trim_cmd(stream)).collect();
            let mut trimmed = conn.query_each(&trims).await?;
            if trimmed.iter().any(no_script) {
                // On a cluster the script goes to every node, and fails while one is
                // out of reach: then the streams without it wait, as unreachable.
                match self.trim.prepare_invoke().load_async(conn).await {
                    Ok(_) => trimmed = conn.query_each(&trims).await?,
                    Err(e) if conn.is_cluster() => {
                        tracing::debug!(error = %e, "loading lua/trim.lua")
                    }
                    Err(e) => return Err(e.into()),
                }
            }
            for (stream, trimmed) in chunk.iter().zip(trimmed) {
                match trimmed {
                    Ok(_) => _ = cursor.untrimmed.remove(stream),
                    // Trimmed once its master is back.
                    Err(e) if conn.is_cluster() => super::stream_unreachable(stream, &e),
                    Err(e) => return Err(e.into()),
                }
            }
        }
        Ok(())
    }

    pub(super) async fn prune_due(&self, cursor: &mut Cursor) -> Result<()> {
        let Some(retention) = self.hold_retention else {
            return Ok(());
        };
        if cursor
            .last_prune
            .is_some_and(|at| at.elapsed() < PRUNE_EVERY)
        {
            return Ok(());
        }
        cursor.last_prune = Some(Instant::now());
        // Until a statement finds fewer than a batch, within a bound per round: the
        // rest waits for the next round rather than delaying the sales behind it.
        for _ in 0..PRUNE_STATEMENTS_PER_ROUND {
            match db::prune_holds(&self.db, retention).await {
                Ok(pruned) if pruned < db::PRUNE_BATCH => break,
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "deleting holds past their retention failed");
                    break;
                }
            }
        }
        Ok(())
    }

    pub(super) async fn trim_stream(&self, conn: &mut Connection, stream: &str) -> Result<()> {
        let _: i64 = self
            .trim
            .key(stream)
            .arg(CONSUMER_GROUP)
            .invoke_async(conn)
            .await?;
        Ok(())
    }

    /// `lua/trim.lua` on `stream`, by its hash, for a pipeline.
    fn trim_cmd(&self, stream: &str) -> redis::Cmd {
        let mut cmd = redis::cmd("EVALSHA");
        cmd.arg(self.trim.get_hash())
            .arg(1)
            .arg(stream)
            .arg(CONSUMER_GROUP);
        cmd
    }

    /// Removes the consumers `info` lists of `stream`'s group that left: nothing
    /// pending, silent for [`Consumer::departed_after`].
    async fn forget_departed(
        &self,
        conn: &mut Connection,
        stream: &str,
        info: StreamInfoConsumersReply,
    ) -> Result<()> {
        let departed_ms = self.departed_after().as_millis();
        for consumer in info.consumers {
            if consumer.pending == 0
                && consumer.idle as u128 >= departed_ms
                && consumer.name != self.name
            {
                let removed: i64 = self
                    .forget_consumer
                    .key(stream)
                    .arg(CONSUMER_GROUP)
                    .arg(&consumer.name)
                    .invoke_async(conn)
                    .await?;
                if removed == 1 {
                    tracing::info!(
                        stream,
                        consumer = consumer.name,
                        "removed a departed consumer"
                    );
                }
            }
        }
        Ok(())
    }

    /// Takes over entries another consumer left unacknowledged for too long, from
    /// `reply` (an `XAUTOCLAIM` from the start) on; `true` when some were left pending
    /// for a later round (see [`Consumer::persist_round`]).
    async fn claim_stale(
        &self,
        conn: &mut Connection,
        stream: &str,
        mut reply: StreamAutoClaimReply,
        untrimmed: &mut HashMap<String, Instant>,
    ) -> Result<bool> {
        let mut deferred = false;
        loop {
            if !reply.deleted_ids.is_empty() {
                // XAUTOCLAIM has dropped them from the group already.
                let ids: Vec<&str> = reply.deleted_ids.iter().map(String::as_str).collect();
                let event = self.keys.event_of_stream(stream).unwrap_or_default();
                lost(event, "claimed", &ids, "pending, but gone from the stream");
            }
            if !reply.claimed.is_empty() {
                tracing::info!(
                    stream,
                    entries = reply.claimed.len(),
                    "took over sales left pending by another consumer"
                );
                let claimed = StreamKey {
                    key: stream.to_owned(),
                    ids: reply.claimed,
                };
                deferred |= self.persist_round(conn, vec![claimed], untrimmed).await?;
            }
            if reply.next_stream_id == "0-0" {
                return Ok(deferred);
            }
            let next = self.claim_from(stream, &reply.next_stream_id);
            reply = next.query_async(conn).await?;
        }
    }

    /// `XAUTOCLAIM` of `stream`'s entries idle for `claim_idle_ms`, from `start`.
    fn claim_from(&self, stream: &str, start: &str) -> redis::Cmd {
        let options = StreamAutoClaimOptions::default().count(self.config.consumer_batch);
        redis::Cmd::xautoclaim_options(
            stream,
            CONSUMER_GROUP,
            &self.name,
            self.config.claim_idle_ms,
            start,
            options,
        )
    }
}

/// Whether a script's reply says the server does not have it (restarted, or a
/// replica promoted: the script cache is not replicated).
fn no_script(reply: &redis::RedisResult<redis::Value>) -> bool {
    let missing = redis::ErrorKind::Server(redis::ServerErrorKind::NoScript);
    matches!(reply, Err(e) if e.kind() == missing)
}
