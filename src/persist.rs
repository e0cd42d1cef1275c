//! The stream consumer: moves sales from each event's Redis stream into PostgreSQL.
//!
//! Every replica runs one consumer in the group [`CONSUMER_GROUP`] under its own name.
//! A batch is written in one `INSERT … ON CONFLICT (id) DO NOTHING` and only then
//! acknowledged, so delivery is at-least-once and the rows exactly-once: a batch
//! redelivered after a crash writes nothing new. While PostgreSQL is down, sales wait
//! in the stream; entries left pending by a dead consumer are taken over (`XAUTOCLAIM`)
//! once idle for `claim_idle_ms`, and a consumer gone for good (no pending entries,
//! silent for [`Consumer::departed_after`]) is removed from the group so that replicas
//! of past deployments do not pile up in it.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use deadpool_redis::redis::streams::{
    StreamAutoClaimOptions, StreamAutoClaimReply, StreamId, StreamInfoConsumersReply,
    StreamPendingReply, StreamReadOptions, StreamReadReply,
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

/// How often the list of event streams is re-read (new events appear while running).
const REFRESH_STREAMS_EVERY: Duration = Duration::from_secs(1);
/// How often each stream is trimmed of acknowledged entries.
const TRIM_EVERY: Duration = Duration::from_secs(1);

/// Batches at least this long are written as two statements in parallel.
const SPLIT_BATCH_AT: usize = 200;

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
    forget_consumer: redis::Script,
}

/// What the consumer remembers between reads.
struct Cursor {
    /// Held across rounds: a pool checkout costs a PING round trip.
    conn: Option<deadpool_redis::Connection>,
    streams: Vec<String>,
    refreshed: Option<Instant>,
    /// Per stream: the highest id acknowledged since the last trim, and when that was.
    untrimmed: HashMap<String, ((u64, u64), Instant)>,
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
            forget_consumer: redis::Script::new(include_str!("../lua/forget_consumer.lua")),
        }
    }

    /// Runs until `shutdown` is cancelled. A batch in progress is written and
    /// acknowledged before it returns.
    pub async fn run(self, shutdown: CancellationToken) {
        tracing::info!(consumer = %self.name, "stream consumer started");
        let mut cursor = Cursor {
            conn: None,
            streams: Vec::new(),
            refreshed: None,
            untrimmed: HashMap::new(),
            grouped: HashSet::new(),
            backlog: true,
            last_claim: None,
        };
        let mut backoff = MIN_BACKOFF;
        while !shutdown.is_cancelled() {
            match self.step(&mut cursor).await {
                Ok(Round::NoStreams) => pause(&shutdown, self.block()).await,
                // A short batch: let sales accumulate a little, so the next round
                // writes more rows per statement and round trip.
                Ok(Round::Partial) => pause(&shutdown, self.linger()).await,
                Ok(Round::Full | Round::Empty) => backoff = MIN_BACKOFF,
                Err(e) => {
                    metrics::counter!("boxoffice_consumer_errors_total").increment(1);
                    tracing::warn!(error = %e, retry_in = ?backoff, "persisting sales failed");
                    cursor.conn = None;
                    cursor.backlog = true;
                    pause(&shutdown, backoff).await;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
        if let Some(mut conn) = cursor.conn.take() {
            for (stream, (acked, _)) in cursor.untrimmed.drain() {
                if let Err(e) = trim(&mut conn, &stream, acked).await {
                    tracing::debug!(error = %e, stream, "trim on shutdown failed");
                }
            }
        }
        tracing::info!(consumer = %self.name, "stream consumer stopped");
    }

    fn block(&self) -> Duration {
        Duration::from_millis(self.config.consumer_block_ms)
    }

    fn linger(&self) -> Duration {
        Duration::from_millis(self.config.consumer_linger_ms)
    }

    fn claim_every(&self) -> Duration {
        Duration::from_millis((self.config.claim_idle_ms / 2).max(100))
    }

    /// Silence after which a consumer without pending entries counts as gone: ten
    /// claim timeouts (5 minutes by default). A live consumer polls every
    /// `consumer_block_ms`, so it is never that quiet; one that was only paused is
    /// recreated by its next read.
    pub fn departed_after(&self) -> Duration {
        Duration::from_millis(self.config.claim_idle_ms.saturating_mul(10))
    }

    /// Removes consumers of `stream`'s group that left: nothing pending, silent for
    /// [`Consumer::departed_after`].
    async fn forget_departed(
        &self,
        conn: &mut deadpool_redis::Connection,
        stream: &str,
    ) -> Result<()> {
        let info: StreamInfoConsumersReply = conn.xinfo_consumers(stream, CONSUMER_GROUP).await?;
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
                    .invoke_async(&mut **conn)
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

    /// One read-write-acknowledge round.
    async fn step(&self, cursor: &mut Cursor) -> Result<Round> {
        let mut conn = match cursor.conn.take() {
            Some(conn) => conn,
            None => self.redis.get().await?,
        };
        let round = self.step_on(&mut conn, cursor).await?;
        cursor.conn = Some(conn);
        Ok(round)
    }

    async fn step_on(
        &self,
        conn: &mut deadpool_redis::Connection,
        cursor: &mut Cursor,
    ) -> Result<Round> {
        if cursor
            .refreshed
            .is_none_or(|at| at.elapsed() >= REFRESH_STREAMS_EVERY)
        {
            let ids: Vec<String> = conn.smembers(self.keys.events()).await?;
            cursor.streams = ids
                .iter()
                .filter_map(|id| id.parse().ok())
                .map(|id| self.keys.stream(id))
                .collect();
            cursor.refreshed = Some(Instant::now());
            let mut pending = 0;
            for stream in &cursor.streams {
                pending += backlog(conn, stream).await.unwrap_or(0);
            }
            metrics::gauge!("boxoffice_stream_backlog").set(pending as f64);
        }
        if cursor.streams.is_empty() {
            return Ok(Round::NoStreams);
        }
        for stream in &cursor.streams {
            if !cursor.grouped.contains(stream) {
                ensure_group(conn, stream).await?;
                cursor.grouped.insert(stream.clone());
            }
        }

        if cursor
            .last_claim
            .is_none_or(|at| at.elapsed() >= self.claim_every())
        {
            for stream in &cursor.streams {
                self.claim_stale(conn, stream, &mut cursor.untrimmed)
                    .await?;
                self.forget_departed(conn, stream).await?;
            }
            cursor.last_claim = Some(Instant::now());
        }

        let batch = self.config.consumer_batch;
        let mut options = StreamReadOptions::default()
            .group(CONSUMER_GROUP, &self.name)
            .count(batch);
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
        let mut longest = 0;
        for stream in reply.map(|r| r.keys).unwrap_or_default() {
            longest = longest.max(stream.ids.len());
            self.persist(conn, &stream.key, stream.ids, &mut cursor.untrimmed)
                .await?;
        }
        let idle = longest == 0;
        if cursor.backlog && idle {
            cursor.backlog = false;
        }
        let due: Vec<String> = cursor
            .untrimmed
            .iter()
            .filter(|(_, (_, since))| idle || since.elapsed() >= TRIM_EVERY)
            .map(|(stream, _)| stream.clone())
            .collect();
        for stream in due {
            if let Some((acked, _)) = cursor.untrimmed.remove(&stream) {
                trim(conn, &stream, acked).await?;
            }
        }
        Ok(match longest {
            0 => Round::Empty,
            n if n >= batch => Round::Full,
            _ => Round::Partial,
        })
    }

    /// Takes over entries another consumer left unacknowledged for too long.
    async fn claim_stale(
        &self,
        conn: &mut deadpool_redis::Connection,
        stream: &str,
        untrimmed: &mut HashMap<String, ((u64, u64), Instant)>,
    ) -> Result<()> {
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
                self.persist(conn, stream, reply.claimed, untrimmed).await?;
            }
            if reply.next_stream_id == "0-0" {
                return Ok(());
            }
            start = reply.next_stream_id;
        }
    }

    /// Writes one batch of a stream to PostgreSQL, then acknowledges it.
    async fn persist(
        &self,
        conn: &mut deadpool_redis::Connection,
        stream: &str,
        entries: Vec<StreamId>,
        untrimmed: &mut HashMap<String, ((u64, u64), Instant)>,
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
        let written = if sales.len() >= SPLIT_BATCH_AT {
            // Two statements on two connections: PostgreSQL inserts them on two cores.
            // Each is idempotent, and nothing is acknowledged unless both succeed.
            let (first, second) = sales.split_at(sales.len() / 2);
            let (a, b) = tokio::try_join!(
                db::insert_sales(&self.db, event, first),
                db::insert_sales(&self.db, event, second),
            )?;
            a + b
        } else {
            db::insert_sales(&self.db, event, &sales).await?
        };
        let ids: Vec<&str> = entries.iter().map(|e| e.id.as_str()).collect();
        let _: i64 = conn.xack(stream, CONSUMER_GROUP, &ids).await?;
        metrics::histogram!("boxoffice_consumer_batch_size").record(entries.len() as f64);
        metrics::counter!("boxoffice_consumer_rows_written_total").increment(written);
        tracing::debug!(%event, read = entries.len(), written, "persisted sales");
        if let Some(last) = ids.iter().filter_map(|id| parse_stream_id(id)).max() {
            let entry = untrimmed
                .entry(stream.to_owned())
                .or_insert((last, Instant::now()));
            entry.0 = entry.0.max(last);
        }
        Ok(())
    }
}

/// What one round found to read.
enum Round {
    NoStreams,
    Empty,
    Partial,
    Full,
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
