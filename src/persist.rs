//! The stream consumer: moves sales from each event's Redis stream into PostgreSQL.
//!
//! Every replica runs one consumer in the group [`CONSUMER_GROUP`] under its own name.
//! A batch is written in one `INSERT … ON CONFLICT (id) DO NOTHING` and only then
//! acknowledged, so delivery is at-least-once and the rows exactly-once: a batch
//! redelivered after a crash writes nothing new. While PostgreSQL is down, sales wait
//! in the stream; entries left pending by a dead consumer are taken over (`XAUTOCLAIM`)
//! once idle for `claim_idle_ms`.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use deadpool_redis::redis::streams::{
    StreamAutoClaimOptions, StreamAutoClaimReply, StreamId, StreamPendingReply, StreamReadOptions,
    StreamReadReply,
};
use deadpool_redis::redis::{self, AsyncCommands};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::config::ConsumerConfig;
use crate::db::{self, Sale};
use crate::error::{Error, Result};
use crate::keys::Keys;
use crate::purchase::CONSUMER_GROUP;

/// Longest pause between retries while Redis or PostgreSQL is failing.
const MAX_BACKOFF: Duration = Duration::from_secs(5);
const MIN_BACKOFF: Duration = Duration::from_millis(100);

/// Persists sales from the streams of every event in Redis.
pub struct Consumer {
    redis: deadpool_redis::Pool,
    db: PgPool,
    keys: Keys,
    name: String,
    config: ConsumerConfig,
}

/// What the consumer remembers between reads.
struct Cursor {
    streams: Vec<String>,
    /// Streams whose group is known to exist.
    grouped: HashSet<String>,
    /// Read our own pending entries (`0`) instead of new ones (`>`): at start (a
    /// restart under the same name) and after a failed write.
    backlog: bool,
    last_claim: Option<Instant>,
}

impl Consumer {
    pub fn new(
        redis: deadpool_redis::Pool,
        db: PgPool,
        keys: Keys,
        name: String,
        config: ConsumerConfig,
    ) -> Self {
        Self {
            redis,
            db,
            keys,
            name,
            config,
        }
    }

    /// Runs until `shutdown` is cancelled. A batch in progress is written and
    /// acknowledged before it returns.
    pub async fn run(self, shutdown: CancellationToken) {
        tracing::info!(consumer = %self.name, "stream consumer started");
        let mut cursor = Cursor {
            streams: Vec::new(),
            grouped: HashSet::new(),
            backlog: true,
            last_claim: None,
        };
        let mut backoff = MIN_BACKOFF;
        while !shutdown.is_cancelled() {
            match self.step(&mut cursor).await {
                Ok(idle) => {
                    backoff = MIN_BACKOFF;
                    if idle {
                        pause(&shutdown, self.block()).await;
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, retry_in = ?backoff, "persisting sales failed");
                    cursor.backlog = true;
                    pause(&shutdown, backoff).await;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
        tracing::info!(consumer = %self.name, "stream consumer stopped");
    }

    fn block(&self) -> Duration {
        Duration::from_millis(self.config.consumer_block_ms)
    }

    fn claim_every(&self) -> Duration {
        Duration::from_millis((self.config.claim_idle_ms / 2).max(100))
    }

    /// One read-write-acknowledge round. Returns true when there was nothing to read
    /// because no event exists yet.
    async fn step(&self, cursor: &mut Cursor) -> Result<bool> {
        let mut conn = self.redis.get().await?;
        let ids: Vec<String> = conn.smembers(self.keys.events()).await?;
        cursor.streams = ids
            .iter()
            .filter_map(|id| id.parse().ok())
            .map(|id| self.keys.stream(id))
            .collect();
        if cursor.streams.is_empty() {
            return Ok(true);
        }
        for stream in &cursor.streams {
            if !cursor.grouped.contains(stream) {
                ensure_group(&mut conn, stream).await?;
                cursor.grouped.insert(stream.clone());
            }
        }

        if cursor
            .last_claim
            .is_none_or(|at| at.elapsed() >= self.claim_every())
        {
            for stream in &cursor.streams {
                self.claim_stale(&mut conn, stream).await?;
            }
            cursor.last_claim = Some(Instant::now());
        }

        let mut options = StreamReadOptions::default()
            .group(CONSUMER_GROUP, &self.name)
            .count(self.config.consumer_batch);
        let from = if cursor.backlog {
            "0"
        } else {
            options = options.block(self.config.consumer_block_ms as usize);
            ">"
        };
        let ids = vec![from; cursor.streams.len()];
        let reply: Option<StreamReadReply> = conn
            .xread_options(&cursor.streams, &ids, &options)
            .await
            .inspect_err(|e| {
                // A stream deleted by hand loses its group; recreate it next round.
                if e.code() == Some("NOGROUP") {
                    cursor.grouped.clear();
                }
            })?;
        let mut read = 0;
        for stream in reply.map(|r| r.keys).unwrap_or_default() {
            read += stream.ids.len();
            self.persist(&mut conn, &stream.key, stream.ids).await?;
        }
        if cursor.backlog && read == 0 {
            cursor.backlog = false;
        }
        Ok(false)
    }

    /// Takes over entries another consumer left unacknowledged for too long.
    async fn claim_stale(&self, conn: &mut deadpool_redis::Connection, stream: &str) -> Result<()> {
        let mut start = "0-0".to_owned();
        loop {
            let reply: StreamAutoClaimReply = conn
                .xautoclaim_options(
                    stream,
                    CONSUMER_GROUP,
                    &self.name,
                    self.config.claim_idle_ms,
                    &start,
                    StreamAutoClaimOptions::default().count(self.config.consumer_batch),
                )
                .await?;
            if !reply.claimed.is_empty() {
                tracing::info!(
                    stream,
                    entries = reply.claimed.len(),
                    "took over sales left pending by another consumer"
                );
                self.persist(conn, stream, reply.claimed).await?;
            }
            if reply.next_stream_id == "0-0" {
                return Ok(());
            }
            start = reply.next_stream_id;
        }
    }

    /// Writes one batch of a stream to PostgreSQL, then acknowledges and trims it.
    async fn persist(
        &self,
        conn: &mut deadpool_redis::Connection,
        stream: &str,
        entries: Vec<StreamId>,
    ) -> Result<()> {
        if entries.is_empty() {
            return Ok(());
        }
        let event = self
            .keys
            .event_of_stream(stream)
            .ok_or_else(|| Error::UnexpectedReply(format!("stream key {stream}")))?;
        let mut sales = Vec::with_capacity(entries.len());
        for entry in &entries {
            match parse_sale(entry) {
                Some(sale) => sales.push(sale),
                // Not written by the purchase script; acknowledged so it cannot block
                // the stream, and logged so it is not lost silently.
                None => tracing::error!(stream, id = %entry.id, fields = ?entry.map,
                    "skipping a stream entry that is not a sale"),
            }
        }
        let written = db::insert_sales(&self.db, event, &sales).await?;
        let ids: Vec<&str> = entries.iter().map(|e| e.id.as_str()).collect();
        let _: i64 = conn.xack(stream, CONSUMER_GROUP, &ids).await?;
        tracing::debug!(%event, read = entries.len(), written, "persisted sales");
        let last = ids.iter().filter_map(|id| parse_stream_id(id)).max();
        if let Some(last) = last {
            trim(conn, stream, last).await?;
        }
        Ok(())
    }
}

/// Removes acknowledged entries so streams do not grow without bound. Every entry up
/// to `acked` has been delivered (ids only grow), so any of them not yet acknowledged
/// is in the group's pending list: trimming below both bounds removes only entries
/// already in PostgreSQL.
async fn trim(
    conn: &mut deadpool_redis::Connection,
    stream: &str,
    acked: (u64, u64),
) -> Result<()> {
    let pending: StreamPendingReply = conn.xpending(stream, CONSUMER_GROUP).await?;
    let oldest_pending = match &pending {
        StreamPendingReply::Data(data) => parse_stream_id(&data.start_id),
        _ => None,
    };
    let (ms, seq) = match oldest_pending {
        Some(pending) if pending <= acked => pending,
        _ => (acked.0, acked.1 + 1),
    };
    let _: i64 = redis::cmd("XTRIM")
        .arg(stream)
        .arg("MINID")
        .arg(format!("{ms}-{seq}"))
        .query_async(conn)
        .await?;
    Ok(())
}

async fn ensure_group(conn: &mut deadpool_redis::Connection, stream: &str) -> Result<()> {
    let created: redis::RedisResult<()> = conn
        .xgroup_create_mkstream(stream, CONSUMER_GROUP, "0")
        .await;
    match created {
        Err(e) if e.code() != Some("BUSYGROUP") => Err(e.into()),
        _ => Ok(()),
    }
}

async fn pause(shutdown: &CancellationToken, duration: Duration) {
    tokio::select! {
        _ = shutdown.cancelled() => {}
        _ = tokio::time::sleep(duration) => {}
    }
}

fn parse_sale(entry: &StreamId) -> Option<Sale> {
    Some(Sale {
        id: entry.get::<String>("p")?.parse::<Uuid>().ok()?,
        idempotency_key: entry.get("k")?,
        quantity: entry.get("q")?,
        sold_at_micros: entry.get("t")?,
    })
}

fn parse_stream_id(id: &str) -> Option<(u64, u64)> {
    let (ms, seq) = id.split_once('-')?;
    Some((ms.parse().ok()?, seq.parse().ok()?))
}

/// Sales not yet in PostgreSQL for one stream: delivered but unacknowledged
/// (`pending`) plus not yet delivered (`lag`).
pub async fn backlog(conn: &mut deadpool_redis::Connection, stream: &str) -> Result<i64> {
    let groups: Vec<std::collections::HashMap<String, redis::Value>> = redis::cmd("XINFO")
        .arg("GROUPS")
        .arg(stream)
        .query_async(conn)
        .await?;
    let field = |group: &std::collections::HashMap<String, redis::Value>, name: &str| match group
        .get(name)
    {
        Some(redis::Value::Int(n)) => *n,
        _ => 0,
    };
    Ok(groups
        .iter()
        .filter(|g| matches!(g.get("name"), Some(redis::Value::BulkString(n)) if n == CONSUMER_GROUP.as_bytes()))
        .map(|g| field(g, "pending") + field(g, "lag"))
        .sum())
}

#[cfg(test)]
mod tests {
    use super::parse_stream_id;

    #[test]
    fn stream_ids_order_numerically() {
        assert_eq!(
            parse_stream_id("1700000000000-12"),
            Some((1_700_000_000_000, 12))
        );
        assert!(parse_stream_id("9-0") < parse_stream_id("10-0"));
        assert_eq!(parse_stream_id("nope"), None);
    }
}
