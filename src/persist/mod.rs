//! The stream consumer: moves the seat movements of each event's Redis stream (sales,
//! cancellations, holds made and released) into PostgreSQL.
//!
//! Every replica runs one consumer in the group [`CONSUMER_GROUP`] under its own name.
//! A batch is written in one `INSERT … ON CONFLICT (id) DO NOTHING` and only then
//! acknowledged, so delivery is at-least-once and the rows exactly-once: a batch
//! redelivered after a crash writes nothing new. While PostgreSQL is down, sales wait
//! in the stream; entries left pending by a dead consumer are taken over (`XAUTOCLAIM`)
//! once idle for `claim_idle_ms`, and a consumer gone for good (no pending entries,
//! silent for [`Consumer::departed_after`]) is removed from the group so that replicas
//! of past deployments do not pile up in it.
//!
//! An entry PostgreSQL refuses for good (a constraint or data error, see
//! [`crate::db::refused_for_good`]) is parked in the event's dead-letter stream
//! (`lua/park.lua`) rather than retried forever in front of every later one;
//! `boxoffice reconcile` reports parked sales and `--fix` sends them back.
//!
//! How a round reads the streams, on a single Redis and in cluster mode: [`read`].
//!
//! Holds are kept in PostgreSQL only as long as recovery could need them: every
//! [`PRUNE_EVERY`], holds that expired more than the idempotency TTL ago are deleted.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use deadpool_redis::redis::{self, Script};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::config::ConsumerConfig;
use crate::error::Result;
use crate::keys::Keys;

pub use crate::keys::CONSUMER_GROUP;
pub use parking::requeue_parked;

mod parking;
mod read;
mod upkeep;
mod write;

/// How often the list of event streams is re-read (new events appear while running).
const REFRESH_STREAMS_EVERY: Duration = Duration::from_secs(1);
/// How often each stream is trimmed of acknowledged entries.
const TRIM_EVERY: Duration = Duration::from_secs(1);

/// How often holds nothing can ask for any more are deleted from PostgreSQL, and how
/// many statements of [`crate::db::PRUNE_BATCH`] rows one round may run.
const PRUNE_EVERY: Duration = Duration::from_secs(60);
const PRUNE_STATEMENTS_PER_ROUND: usize = 20;

/// Longest pause between retries while Redis or PostgreSQL is failing.
const MAX_BACKOFF: Duration = Duration::from_secs(5);
const MIN_BACKOFF: Duration = Duration::from_millis(100);

type Connection = crate::store::Pooled;

/// Persists sales from the streams of every event in Redis.
pub struct Consumer {
    redis: crate::store::Pool,
    db: PgPool,
    keys: Keys,
    name: String,
    config: ConsumerConfig,
    /// How long a hold row is kept after its expiry (`None`: forever).
    hold_retention: Option<Duration>,
    forget_consumer: Script,
    trim: Script,
    park: Script,
}

/// What the consumer remembers between reads. All of it describes one Redis server
/// and connection, so an error forgets it ([`Cursor::reset`]): the next round may
/// meet another server, restored or empty.
struct Cursor {
    /// Held across rounds: a pool checkout costs a PING round trip.
    conn: Option<Connection>,
    streams: Vec<String>,
    refreshed: Option<Instant>,
    /// Streams with acknowledged entries not yet trimmed, and since when.
    untrimmed: HashMap<String, Instant>,
    /// Streams whose group is known to exist.
    grouped: HashSet<String>,
    /// Whether a command may name one stream only (Redis in cluster mode); read
    /// from the server on the first round.
    per_stream: Option<bool>,
    /// Read our own pending entries (`0`) instead of new ones (`>`): at start (a
    /// restart under the same name) and after a failed write.
    backlog: bool,
    last_claim: Option<Instant>,
    last_prune: Option<Instant>,
}

impl Cursor {
    fn new() -> Self {
        Self {
            conn: None,
            streams: Vec::new(),
            refreshed: None,
            untrimmed: HashMap::new(),
            grouped: HashSet::new(),
            per_stream: None,
            backlog: true,
            last_claim: None,
            last_prune: None,
        }
    }

    /// Forgets everything but the streams known: on a cluster they are read on while
    /// the set of events is out of reach (`refresh_streams`), whatever else failed.
    fn reset(&mut self) {
        let streams = std::mem::take(&mut self.streams);
        *self = Self::new();
        self.streams = streams;
    }
}

/// What one round found to read.
enum Round {
    NoStreams,
    Empty,
    Partial,
    Full,
}

impl Consumer {
    pub fn new(
        redis: crate::store::Pool,
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
            hold_retention: None,
            forget_consumer: Script::new(include_str!("../../lua/forget_consumer.lua")),
            trim: Script::new(include_str!("../../lua/trim.lua")),
            park: Script::new(include_str!("../../lua/park.lua")),
        }
    }

    /// Deletes holds from PostgreSQL `retention` after their expiry.
    pub fn keeping_holds_for(mut self, retention: Duration) -> Self {
        self.hold_retention = Some(retention);
        self
    }

    /// Runs until `shutdown` is cancelled. A batch in progress is written and
    /// acknowledged before it returns.
    pub async fn run(self, shutdown: CancellationToken) {
        tracing::info!(consumer = %self.name, "stream consumer started");
        let mut cursor = Cursor::new();
        let mut backoff = MIN_BACKOFF;
        while !shutdown.is_cancelled() {
            match self.step(&mut cursor).await {
                Ok(Round::NoStreams) => pause(&shutdown, self.block()).await,
                // A short batch: let sales accumulate a little, so the next round
                // writes more rows per statement and round trip.
                Ok(Round::Partial) => pause(&shutdown, self.linger()).await,
                Ok(Round::Full | Round::Empty) => backoff = MIN_BACKOFF,
                Err(e) => {
                    crate::metrics::consumer_error();
                    tracing::warn!(error = %e, retry_in = ?backoff, "persisting sales failed");
                    cursor.reset();
                    pause(&shutdown, backoff).await;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
        if let Some(mut conn) = cursor.conn.take() {
            for stream in cursor.untrimmed.keys() {
                if let Err(e) = self.trim_stream(&mut conn, stream).await {
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

    /// One round: find the streams, look after the group, read, write, acknowledge, trim.
    async fn step(&self, cursor: &mut Cursor) -> Result<Round> {
        let mut conn = match cursor.conn.take() {
            Some(conn) => conn,
            None => self.redis.get().await?,
        };
        // With no stream yet, look again every round: the first sale must not wait.
        if cursor.streams.is_empty()
            || cursor
                .refreshed
                .is_none_or(|at| at.elapsed() >= REFRESH_STREAMS_EVERY)
        {
            self.refresh_streams(&mut conn, cursor).await?;
        }
        if cursor.streams.is_empty() {
            cursor.conn = Some(conn);
            return Ok(Round::NoStreams);
        }
        if cursor
            .last_claim
            .is_none_or(|at| at.elapsed() >= self.claim_every())
        {
            self.look_after_group(&mut conn, cursor).await?;
        }
        let longest = self.read(&mut conn, cursor).await?;
        self.trim_due(&mut conn, cursor, longest == 0).await?;
        self.prune_due(cursor).await?;
        cursor.conn = Some(conn);
        Ok(match longest {
            0 => Round::Empty,
            n if n >= self.config.consumer_batch => Round::Full,
            _ => Round::Partial,
        })
    }
}

/// A stream this round could not read or look after: on a cluster, its master is out
/// of reach (both it and its replica lost, or failing over). The round goes on with
/// the other streams, so that one lost shard does not stop every event's sales from
/// reaching PostgreSQL; this one is read again next round. Warned of at most every
/// ten seconds.
fn stream_unreachable(stream: &str, error: &dyn std::fmt::Display) {
    static LAST_WARNED: std::sync::Mutex<Option<std::time::Instant>> = std::sync::Mutex::new(None);
    let mut last = LAST_WARNED.lock().unwrap_or_else(|e| e.into_inner());
    if last.is_none_or(|at| at.elapsed() >= Duration::from_secs(10)) {
        *last = Some(std::time::Instant::now());
        tracing::warn!(stream, %error, "a stream could not be read; the others go on");
    }
}

async fn pause(shutdown: &CancellationToken, duration: Duration) {
    tokio::select! {
        _ = shutdown.cancelled() => {}
        _ = tokio::time::sleep(duration) => {}
    }
}

/// Sales not yet in PostgreSQL in `streams`: delivered but unacknowledged (`pending`)
/// plus not yet delivered (`lag`). Pipelined, `BACKLOG_CHUNK` streams per round
/// trip: one round trip per stream, every second, cost Redis a quarter of a core in
/// system time with 10,000 events and no sale at all.
pub async fn backlog(conn: &mut Connection, streams: &[String]) -> Result<i64> {
    const BACKLOG_CHUNK: usize = 500;
    let mut backlog = 0;
    for chunk in streams.chunks(BACKLOG_CHUNK) {
        let infos: Vec<redis::Cmd> = chunk
            .iter()
            .map(|stream| redis::cmd("XINFO").arg("GROUPS").arg(stream).to_owned())
            .collect();
        let replies = crate::store::or_nil(conn.query_each(&infos).await?);
        backlog += replies.iter().map(group_backlog).sum::<i64>();
    }
    Ok(backlog)
}

/// The consumer group's backlog (pending + lag) in an `XINFO GROUPS` reply; 0 for
/// anything else (no such group, or an error in its place in a pipeline).
pub fn group_backlog(groups: &redis::Value) -> i64 {
    let groups: Vec<HashMap<String, redis::Value>> =
        redis::from_redis_value_ref(groups).unwrap_or_default();
    let field = |group: &HashMap<String, redis::Value>, name: &str| match group.get(name) {
        Some(redis::Value::Int(n)) => *n,
        _ => 0,
    };
    groups
        .iter()
        .filter(|g| matches!(g.get("name"), Some(redis::Value::BulkString(n)) if n == CONSUMER_GROUP.as_bytes()))
        .map(|g| field(g, "pending") + field(g, "lag"))
        .sum()
}
