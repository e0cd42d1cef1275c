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
//! [`db::refused_for_good`]) is parked in the event's dead-letter stream
//! (`lua/park.lua`) rather than retried forever in front of every later one;
//! `boxoffice reconcile` reports parked sales and `--fix` sends them back.
//!
//! Holds are kept in PostgreSQL only as long as recovery could need them: every
//! [`PRUNE_EVERY`], holds that expired more than the idempotency TTL ago are deleted.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use deadpool_redis::redis::streams::{
    StreamAutoClaimOptions, StreamAutoClaimReply, StreamId, StreamInfoConsumersReply,
    StreamPendingCountReply, StreamReadOptions, StreamReadReply,
};
use deadpool_redis::redis::{self, AsyncCommands, Script};
use sqlx::{PgConnection, PgPool};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::config::ConsumerConfig;
use crate::db;
use crate::error::{Error, Result};
use crate::keys::Keys;
use crate::records::Logged;

pub use crate::keys::CONSUMER_GROUP;

/// How often the list of event streams is re-read (new events appear while running).
const REFRESH_STREAMS_EVERY: Duration = Duration::from_secs(1);
/// How often each stream is trimmed of acknowledged entries.
const TRIM_EVERY: Duration = Duration::from_secs(1);

/// How long a batch waits for its event's lock while a recovery holds it, before the
/// consumer leaves it pending and goes on with other events.
const LOCK_WAIT: &str = "SET LOCAL lock_timeout = '500ms'";
/// Back to no bound, once the event's lock is held.
const LOCK_WAIT_ENDED: &str = "SET LOCAL lock_timeout TO DEFAULT";

/// What became of a batch.
enum Written {
    /// Written: how many sales were new rows.
    Rows(u64),
    /// Its entries were no longer pending for this consumer.
    NotPending,
    /// A recovery of the event held its lock: left pending for a later round.
    Busy,
}

/// How often holds nothing can ask for any more are deleted from PostgreSQL, and how
/// many statements of [`db::PRUNE_BATCH`] rows one round may run.
const PRUNE_EVERY: Duration = Duration::from_secs(60);
const PRUNE_STATEMENTS_PER_ROUND: usize = 20;

/// Longest pause between retries while Redis or PostgreSQL is failing.
const MAX_BACKOFF: Duration = Duration::from_secs(5);
const MIN_BACKOFF: Duration = Duration::from_millis(100);

type Connection = deadpool_redis::Connection;

/// Persists sales from the streams of every event in Redis.
pub struct Consumer {
    redis: deadpool_redis::Pool,
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
            backlog: true,
            last_claim: None,
            last_prune: None,
        }
    }

    fn reset(&mut self) {
        *self = Self::new();
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
            hold_retention: None,
            forget_consumer: Script::new(include_str!("../lua/forget_consumer.lua")),
            trim: Script::new(include_str!("../lua/trim.lua")),
            park: Script::new(include_str!("../lua/park.lua")),
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

    /// Re-reads the set of events (new ones appear while running), makes sure each
    /// stream has the group, and updates the backlog gauge.
    async fn refresh_streams(&self, conn: &mut Connection, cursor: &mut Cursor) -> Result<()> {
        let ids: Vec<String> = conn.smembers(self.keys.events()).await?;
        cursor.streams = ids
            .iter()
            .filter_map(|id| id.parse().ok())
            .map(|id| self.keys.stream(id))
            .collect();
        cursor.refreshed = Some(Instant::now());
        let mut pending = 0;
        for stream in &cursor.streams {
            if !cursor.grouped.contains(stream) {
                ensure_group(conn, stream).await?;
                cursor.grouped.insert(stream.clone());
            }
            pending += backlog(conn, stream).await.unwrap_or(0);
        }
        crate::metrics::stream_backlog(pending);
        Ok(())
    }

    /// Takes over what dead consumers left pending, and removes departed ones.
    async fn look_after_group(&self, conn: &mut Connection, cursor: &mut Cursor) -> Result<()> {
        for stream in &cursor.streams {
            if self
                .claim_stale(conn, stream, &mut cursor.untrimmed)
                .await?
            {
                cursor.backlog = true;
            }
            self.forget_departed(conn, stream).await?;
        }
        cursor.last_claim = Some(Instant::now());
        Ok(())
    }

    /// Reads and persists one batch from every stream; returns the longest batch.
    async fn read(&self, conn: &mut Connection, cursor: &mut Cursor) -> Result<usize> {
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
                    cursor.refreshed = None;
                }
            })?;
        let mut longest = 0;
        let mut deferred = false;
        for stream in reply.map(|r| r.keys).unwrap_or_default() {
            longest = longest.max(stream.ids.len());
            deferred |= self
                .persist(conn, &stream.key, stream.ids, &mut cursor.untrimmed)
                .await?;
        }
        if deferred {
            // Left pending for this consumer: read again from its pending entries.
            cursor.backlog = true;
            return Ok(longest);
        }
        if cursor.backlog && longest == 0 {
            cursor.backlog = false;
        }
        Ok(longest)
    }

    /// Trims streams acknowledged a while ago, or all of them when the round was idle.
    async fn trim_due(&self, conn: &mut Connection, cursor: &mut Cursor, idle: bool) -> Result<()> {
        let due: Vec<String> = cursor
            .untrimmed
            .iter()
            .filter(|(_, since)| idle || since.elapsed() >= TRIM_EVERY)
            .map(|(stream, _)| stream.clone())
            .collect();
        for stream in due {
            self.trim_stream(conn, &stream).await?;
            cursor.untrimmed.remove(&stream);
        }
        Ok(())
    }

    async fn prune_due(&self, cursor: &mut Cursor) -> Result<()> {
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

    async fn trim_stream(&self, conn: &mut Connection, stream: &str) -> Result<()> {
        let _: i64 = self
            .trim
            .key(stream)
            .arg(CONSUMER_GROUP)
            .invoke_async(&mut **conn)
            .await?;
        Ok(())
    }

    /// Removes consumers of `stream`'s group that left: nothing pending, silent for
    /// [`Consumer::departed_after`].
    async fn forget_departed(&self, conn: &mut Connection, stream: &str) -> Result<()> {
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

    /// Takes over entries another consumer left unacknowledged for too long; `true`
    /// when some were left pending for a later round (see [`Consumer::persist`]).
    async fn claim_stale(
        &self,
        conn: &mut Connection,
        stream: &str,
        untrimmed: &mut HashMap<String, Instant>,
    ) -> Result<bool> {
        let mut deferred = false;
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
                deferred |= self.persist(conn, stream, reply.claimed, untrimmed).await?;
            }
            if reply.next_stream_id == "0-0" {
                return Ok(deferred);
            }
            start = reply.next_stream_id;
        }
    }

    /// Writes one batch of a stream to PostgreSQL, then acknowledges it. Entries that
    /// are none of the kinds the gate writes, or that PostgreSQL refuses for good, are
    /// parked instead. Returns `true` when the batch was left pending for a later
    /// round (a recovery of the event held its lock).
    async fn persist(
        &self,
        conn: &mut Connection,
        stream: &str,
        entries: Vec<StreamId>,
        untrimmed: &mut HashMap<String, Instant>,
    ) -> Result<bool> {
        if entries.is_empty() {
            return Ok(false);
        }
        let event = self
            .keys
            .event_of_stream(stream)
            .ok_or_else(|| Error::UnexpectedReply(format!("stream key {stream}")))?;
        let mut batch = Vec::with_capacity(entries.len());
        for entry in &entries {
            match Logged::from_stream(entry) {
                Some(logged) => batch.push((logged, entry.id.clone())),
                None => {
                    let reason = "not a seat movement written by lua/purchase.lua";
                    self.park_entry(conn, stream, event, &entry.id, reason)
                        .await?;
                }
            }
        }
        let (written, done) = match self.write_batch(conn, stream, event, &batch).await {
            Err(e) if db::refused_for_good(&e).is_some() => {
                tracing::warn!(error = %e, %event, "PostgreSQL refused a batch; writing it entry by entry");
                match self.write_one_by_one(conn, stream, event, &batch).await? {
                    Some(written) => written,
                    None => return Ok(true),
                }
            }
            // Not this consumer's any more: not acknowledged here either.
            Ok(Written::NotPending) => return Ok(false),
            Ok(Written::Busy) => return Ok(true),
            Ok(Written::Rows(written)) => {
                (written, batch.iter().map(|(_, id)| id.as_str()).collect())
            }
            Err(e) => return Err(e),
        };
        if !done.is_empty() {
            let _: i64 = conn.xack(stream, CONSUMER_GROUP, &done).await?;
        }
        crate::metrics::consumer_batch(entries.len(), written);
        tracing::debug!(%event, read = entries.len(), written, "persisted sales");
        untrimmed
            .entry(stream.to_owned())
            .or_insert_with(Instant::now);
        Ok(false)
    }

    /// Writes `batch` in one transaction that holds the event's lock shared
    /// ([`db::lock_event_shared`]), provided its entries are still pending for this
    /// consumer once the lock is held.
    ///
    /// The check under the lock is what keeps a recovery exact: a recovery holds the
    /// lock exclusively while it reads the stream and PostgreSQL, so a batch is
    /// either in PostgreSQL before it reads, or written after it is done, and then
    /// only if the entries were not lost with Redis' data meanwhile (the recovery did
    /// not count them) nor taken over by another consumer (which writes them). The
    /// lock is waited for at most [`LOCK_WAIT`]: a long recovery of one event does
    /// not hold up the others' sales.
    async fn write_batch(
        &self,
        conn: &mut Connection,
        stream: &str,
        event: Uuid,
        batch: &[(Logged, String)],
    ) -> Result<Written> {
        if batch.is_empty() {
            return Ok(Written::Rows(0));
        }
        let mut tx = self.db.begin().await?;
        sqlx::query(LOCK_WAIT).execute(&mut *tx).await?;
        match db::lock_event_shared(&mut tx, event).await {
            Err(e) if db::lock_not_available(&e) => {
                tracing::debug!(%event, "a recovery holds the event; its batch waits");
                return Ok(Written::Busy);
            }
            locked => locked?,
        }
        // The bound is for the recovery's lock only: the INSERT may wait on row or
        // table locks as long as it must, or a batch a recovery is waiting for would
        // give up and leave that recovery counting without it.
        sqlx::query(LOCK_WAIT_ENDED).execute(&mut *tx).await?;
        let ids: Vec<&str> = batch.iter().map(|(_, id)| id.as_str()).collect();
        if !self.still_pending(conn, stream, &ids).await? {
            crate::metrics::consumer_batch_dropped();
            tracing::warn!(
                %event, entries = ids.len(),
                "entries no longer pending for this consumer when their batch was to be \
                 written (taken over by another consumer, or lost with Redis' data)"
            );
            return Ok(Written::NotPending);
        }
        let written = write_logged(&mut tx, event, batch).await?;
        tx.commit().await?;
        Ok(Written::Rows(written))
    }

    /// After PostgreSQL refused a batch: each entry alone, parking those it refuses.
    /// Returns how many sales were new rows, and the entries written or parked (to
    /// acknowledge); `None` when a recovery held the event meanwhile (the rest waits).
    async fn write_one_by_one<'a>(
        &self,
        conn: &mut Connection,
        stream: &str,
        event: Uuid,
        batch: &'a [(Logged, String)],
    ) -> Result<Option<(u64, Vec<&'a str>)>> {
        let (mut written, mut done) = (0, Vec::new());
        // Once the event's row is known to be gone, the rest of the batch is parked
        // without another INSERT each: all of it would be refused alike.
        let mut row_gone: Option<String> = None;
        for entry in batch {
            if let Some(reason) = &row_gone {
                self.park_entry(conn, stream, event, &entry.1, reason)
                    .await?;
                continue;
            }
            match self
                .write_batch(conn, stream, event, std::slice::from_ref(entry))
                .await
            {
                Ok(Written::Rows(n)) => {
                    written += n;
                    done.push(entry.1.as_str());
                }
                Ok(Written::NotPending) => {}
                Ok(Written::Busy) => return Ok(None),
                Err(e) => match db::refused_for_good(&e) {
                    Some(code) => {
                        let reason = format!("SQLSTATE {code}: {e}");
                        if code == db::FOREIGN_KEY_VIOLATION
                            && self.off_sale_if_gone(conn, event).await?
                        {
                            row_gone = Some(reason.clone());
                        }
                        self.park_entry(conn, stream, event, &entry.1, &reason)
                            .await?;
                    }
                    None => return Err(e),
                },
            }
        }
        Ok(Some((written, done)))
    }

    /// Takes `event` off sale when PostgreSQL has no row for it (deleted by hand, or
    /// the database restored from before it was created): every sale of it would
    /// be parked. Its next request runs the recovery, which finds no row and
    /// answers 404, so no more seats are sold; what was sold meanwhile waits in the
    /// dead letters until the row is back and `boxoffice reconcile --fix` sends it.
    /// Returns whether the row is gone.
    async fn off_sale_if_gone(&self, conn: &mut Connection, event: Uuid) -> Result<bool> {
        if db::event(&self.db, event).await?.is_some() {
            return Ok(false);
        }
        crate::gate::recovery::take_off_sale(conn, &self.keys, event).await?;
        tracing::error!(
            %event,
            "PostgreSQL has no row for this event: it is off sale (404) and its sales are \
             parked; restore the row, then run `boxoffice reconcile --fix`"
        );
        Ok(true)
    }

    /// Whether every one of `ids` is pending for this consumer (one `XPENDING` of each,
    /// pipelined: a range would count entries of this consumer's between them too).
    async fn still_pending(
        &self,
        conn: &mut Connection,
        stream: &str,
        ids: &[&str],
    ) -> Result<bool> {
        let mut pipe = redis::pipe();
        for id in ids {
            pipe.cmd("XPENDING")
                .arg(stream)
                .arg(CONSUMER_GROUP)
                .arg(*id)
                .arg(*id)
                .arg(1)
                .arg(&self.name);
        }
        let replies: redis::RedisResult<Vec<StreamPendingCountReply>> =
            pipe.query_async(&mut **conn).await;
        match replies {
            Err(e) if e.code() == Some("NOGROUP") => Ok(false),
            replies => Ok(replies?.iter().all(|reply| reply.ids.len() == 1)),
        }
    }

    /// Sets an entry aside in the event's dead letters (`lua/park.lua`, which also
    /// acknowledges it), if it is still pending for this consumer; one that another
    /// consumer took over meanwhile is its to write or park. One gone from the stream
    /// while pending (removed behind the service's back) cannot be parked: the script
    /// acknowledges it so that it stops coming back, and it is reported as lost.
    async fn park_entry(
        &self,
        conn: &mut Connection,
        stream: &str,
        event: Uuid,
        entry: &str,
        reason: &str,
    ) -> Result<()> {
        let parked: i64 = self
            .park
            .key(stream)
            .key(self.keys.dead_letters(event))
            .arg(CONSUMER_GROUP)
            .arg(entry)
            .arg(reason)
            .arg(&self.name)
            .invoke_async(&mut **conn)
            .await?;
        match parked {
            1 => {
                crate::metrics::parked();
                tracing::error!(
                    %event, entry, reason,
                    "parked a sale PostgreSQL cannot take; see `boxoffice reconcile`"
                );
            }
            0 => lost(event, "parking", &[entry], reason),
            _ => tracing::info!(
                %event, entry,
                "not parking an entry no longer pending for this consumer (taken over or \
                 acknowledged by another)"
            ),
        }
        Ok(())
    }
}

/// Reports stream entries that disappeared before their rows were written: what they
/// recorded is not in PostgreSQL, and only `boxoffice reconcile` can tell which seats.
fn lost(event: Uuid, how: &'static str, entries: &[&str], reason: &str) {
    crate::metrics::entries_lost(how, entries.len());
    tracing::error!(
        %event, ?entries, reason,
        "stream entries were removed before PostgreSQL had them: what they recorded is \
         lost; see `boxoffice reconcile`"
    );
}

/// Writes the entries of one batch of an event in `tx`, in the order they depend on
/// each other: a hold before its sale or release, a sale before its cancellation
/// (one batch may carry both). Every write is idempotent: an entry delivered again
/// changes nothing. Returns how many sales were new rows.
async fn write_logged(
    tx: &mut PgConnection,
    event: Uuid,
    batch: &[(Logged, String)],
) -> Result<u64> {
    let (mut holds, mut sales, mut releases, mut cancels) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for (logged, _) in batch {
        match logged {
            Logged::Hold(hold) => holds.push(hold.clone()),
            Logged::Sale(sale) => sales.push(sale.clone()),
            Logged::Release(release) => releases.push(release.clone()),
            Logged::Cancel(cancel) => cancels.push(cancel.clone()),
        }
    }
    // The holds that releases and confirmations carry too: a hold's own entry may
    // come later, through another consumer, or be lost with Redis' data.
    let carried = releases.iter().filter_map(|r| r.hold.clone());
    holds.extend(carried.chain(sales.iter().filter_map(|s| s.hold.clone())));
    if !holds.is_empty() {
        db::insert_holds(&mut *tx, event, &holds).await?;
    }
    let written = if sales.is_empty() {
        0
    } else {
        db::insert_sales(&mut *tx, event, &sales).await?
    };
    if !releases.is_empty() {
        db::release_holds(&mut *tx, event, &releases).await?;
    }
    if !cancels.is_empty() {
        db::cancel_sales(&mut *tx, event, &cancels).await?;
    }
    Ok(written)
}

/// Sends the sales parked for `event` back to its stream for another try; returns
/// how many.
pub async fn requeue_parked(conn: &mut Connection, keys: &Keys, event: Uuid) -> Result<usize> {
    const PER_CALL: usize = 1_000;
    let requeue = Script::new(include_str!("../lua/requeue.lua"));
    let mut moved = 0;
    loop {
        let n: usize = requeue
            .key(keys.stream(event))
            .key(keys.dead_letters(event))
            .arg(PER_CALL)
            .invoke_async(&mut **conn)
            .await?;
        moved += n;
        if n < PER_CALL {
            return Ok(moved);
        }
    }
}

async fn ensure_group(conn: &mut Connection, stream: &str) -> Result<()> {
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

/// Sales not yet in PostgreSQL for one stream: delivered but unacknowledged
/// (`pending`) plus not yet delivered (`lag`).
pub async fn backlog(conn: &mut Connection, stream: &str) -> Result<i64> {
    let groups: Vec<HashMap<String, redis::Value>> = redis::cmd("XINFO")
        .arg("GROUPS")
        .arg(stream)
        .query_async(conn)
        .await?;
    let field = |group: &HashMap<String, redis::Value>, name: &str| match group.get(name) {
        Some(redis::Value::Int(n)) => *n,
        _ => 0,
    };
    Ok(groups
        .iter()
        .filter(|g| matches!(g.get("name"), Some(redis::Value::BulkString(n)) if n == CONSUMER_GROUP.as_bytes()))
        .map(|g| field(g, "pending") + field(g, "lag"))
        .sum())
}
