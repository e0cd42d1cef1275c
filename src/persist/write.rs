//! Writing what a round read to PostgreSQL, then acknowledging it: under each
//! event's lock, only while its entries are still pending for this consumer, one
//! entry at a time after a refusal so that only the refused ones are parked.
//!
//! Many events with a few entries each are written together, in one transaction
//! (`write_group`): a transaction each cost a commit per sale, and the drain fell to
//! 290 rows/s with 10,000 events. A group that meets a recovery's lock or a refusal
//! is written again event by event, which handles both.

use std::collections::HashMap;
use std::time::Instant;

use deadpool_redis::redis::streams::{StreamKey, StreamPendingCountReply};
use deadpool_redis::redis::{self, AsyncCommands};
use uuid::Uuid;

use super::{CONSUMER_GROUP, Connection, Consumer};
use crate::db;
use crate::error::{Error, Result};
use crate::records::Logged;

/// How long a batch waits for its event's lock while a recovery holds it, before the
/// consumer leaves it pending and goes on with other events. (A group does not wait:
/// it is written again event by event.)
const LOCK_WAIT: &str = "SET LOCAL lock_timeout = '500ms'";
/// Once the event's lock is held, the batch's writes wait on row and table locks as
/// long as the server's setting says (none by default). A bound would not keep the
/// consumer going — a table locked from outside fails every retry alike — and a batch
/// that gave up while a recovery waited for it would leave the recovery counting
/// without its sales, whose entries Redis may have lost meanwhile: sold twice.
const WRITE_LOCK_WAIT: &str = "SET LOCAL lock_timeout TO DEFAULT";

/// Most events written in one transaction: it takes a lock of each, and PostgreSQL's
/// lock table (room for 64 per connection by default) is shared by the whole server.
const GROUP_EVENTS: usize = 64;

/// One stream's entries of a round, read as seat movements.
struct Batch {
    stream: String,
    event: Uuid,
    /// How many entries were read, the unreadable ones (parked) included.
    read: usize,
    /// Each movement with its entry id.
    entries: Vec<(Logged, String)>,
}

impl Batch {
    fn ids(&self) -> Vec<&str> {
        self.entries.iter().map(|(_, id)| id.as_str()).collect()
    }

    /// The movements, each with its event, as [`db::write_movements`] takes them.
    fn movements(&self) -> impl Iterator<Item = (Uuid, &Logged)> {
        self.entries.iter().map(|(logged, _)| (self.event, logged))
    }
}

/// What became of a batch.
enum Written {
    /// Written: how many sales were new rows.
    Rows(u64),
    /// Its entries were no longer pending for this consumer.
    NotPending,
    /// A recovery of the event held its lock: left pending for a later round.
    Busy,
}

impl Consumer {
    /// Writes what a round read to PostgreSQL, then acknowledges it: streams with
    /// few entries together, up to `consumer_batch` entries a transaction. Returns
    /// `true` when some of it was left pending for a later round (a recovery of its
    /// event held the lock).
    pub(super) async fn persist_round(
        &self,
        conn: &mut Connection,
        streams: Vec<StreamKey>,
        untrimmed: &mut HashMap<String, Instant>,
    ) -> Result<bool> {
        let mut batches = Vec::with_capacity(streams.len());
        for stream in streams.into_iter().filter(|s| !s.ids.is_empty()) {
            batches.push(self.batch(conn, stream).await?);
        }
        let mut deferred = false;
        for mut group in groups(batches, self.config.consumer_batch, GROUP_EVENTS) {
            deferred |= match group.len() {
                1 => self.persist(conn, group.remove(0), untrimmed).await?,
                _ => self.persist_group(conn, group, untrimmed).await?,
            };
        }
        Ok(deferred)
    }

    /// Reads a stream's entries as seat movements. Entries that are none of the
    /// kinds the gate writes are parked.
    async fn batch(&self, conn: &mut Connection, stream: StreamKey) -> Result<Batch> {
        let event = self
            .keys
            .event_of_stream(&stream.key)
            .ok_or_else(|| Error::UnexpectedReply(format!("stream key {}", stream.key)))?;
        let mut entries = Vec::with_capacity(stream.ids.len());
        for entry in &stream.ids {
            match Logged::from_stream(entry) {
                Some(logged) => entries.push((logged, entry.id.clone())),
                None => {
                    let reason = "not a seat movement written by lua/purchase.lua";
                    self.park_entry(conn, &stream.key, event, &entry.id, reason)
                        .await?;
                }
            }
        }
        Ok(Batch {
            read: stream.ids.len(),
            stream: stream.key,
            event,
            entries,
        })
    }

    /// Writes the batches of several events in one transaction, then acknowledges
    /// them; when a recovery holds one of the events, or PostgreSQL refuses the
    /// writes, writes each batch by itself instead ([`Consumer::persist`]).
    async fn persist_group(
        &self,
        conn: &mut Connection,
        group: Vec<Batch>,
        untrimmed: &mut HashMap<String, Instant>,
    ) -> Result<bool> {
        let Some((pending, written)) = self.write_group(conn, &group).await? else {
            let mut deferred = false;
            for batch in group {
                deferred |= self.persist(conn, batch, untrimmed).await?;
            }
            return Ok(deferred);
        };
        // Reported once written: a group written again event by event reports them there.
        let mut written_batches = Vec::with_capacity(group.len());
        for (batch, pending) in group.iter().zip(pending) {
            match pending {
                true => written_batches.push(batch),
                false => not_pending(batch),
            }
        }
        let acks: Vec<redis::Cmd> = written_batches
            .iter()
            .filter(|batch| !batch.entries.is_empty())
            .map(|batch| redis::Cmd::xack(&batch.stream, CONSUMER_GROUP, &batch.ids()))
            .collect();
        for acked in conn.query_each(&acks).await? {
            acked?;
        }
        let read = written_batches.iter().map(|batch| batch.read).sum();
        crate::metrics::consumer_batch(read, written);
        tracing::debug!(
            events = written_batches.len(),
            read,
            written,
            "persisted sales"
        );
        for batch in written_batches {
            untrimmed
                .entry(batch.stream.clone())
                .or_insert_with(Instant::now);
        }
        Ok(false)
    }

    /// Writes `group` in one transaction that holds the lock of each of its events
    /// shared, as [`Consumer::write_batch`] does for one, leaving out the batches no
    /// longer pending for this consumer. Returns which batches were written and how
    /// many sales were new rows; `None`, having written nothing, when a recovery
    /// holds one of the events or PostgreSQL refused the writes.
    async fn write_group(
        &self,
        conn: &mut Connection,
        group: &[Batch],
    ) -> Result<Option<(Vec<bool>, u64)>> {
        let mut tx = self.db.begin().await?;
        let events: Vec<Uuid> = group.iter().map(|batch| batch.event).collect();
        if !db::try_lock_events_shared(&mut tx, &events).await? {
            tracing::debug!(
                events = events.len(),
                "a recovery holds an event of a group"
            );
            return Ok(None);
        }
        let pending = self.pending(conn, group).await?;
        let entries: Vec<(Uuid, &Logged)> = group
            .iter()
            .zip(&pending)
            .filter(|(_, pending)| **pending)
            .flat_map(|(batch, _)| batch.movements())
            .collect();
        let written = match db::write_movements(&mut tx, &entries).await {
            Err(e) if db::refused_for_good(&e).is_some() => {
                tracing::debug!(error = %e, "PostgreSQL refused a group; writing it event by event");
                return Ok(None);
            }
            written => written?,
        };
        tx.commit().await?;
        Ok(Some((pending, written)))
    }

    /// Writes one batch to PostgreSQL, then acknowledges it. Entries that PostgreSQL
    /// refuses for good are parked instead. Returns `true` when the batch was left
    /// pending for a later round (a recovery of the event held its lock).
    async fn persist(
        &self,
        conn: &mut Connection,
        batch: Batch,
        untrimmed: &mut HashMap<String, Instant>,
    ) -> Result<bool> {
        let (stream, event) = (batch.stream.as_str(), batch.event);
        let (written, done) = match self.write_batch(conn, &batch).await {
            Err(e) if db::refused_for_good(&e).is_some() => {
                tracing::warn!(error = %e, %event, "PostgreSQL refused a batch; writing it entry by entry");
                match self.write_one_by_one(conn, &batch).await? {
                    Some(written) => written,
                    None => return Ok(true),
                }
            }
            // Not this consumer's any more: not acknowledged here either.
            Ok(Written::NotPending) => return Ok(false),
            Ok(Written::Busy) => return Ok(true),
            Ok(Written::Rows(written)) => (written, batch.ids()),
            Err(e) => return Err(e),
        };
        if !done.is_empty() {
            let _: i64 = conn.xack(stream, CONSUMER_GROUP, &done).await?;
        }
        crate::metrics::consumer_batch(batch.read, written);
        tracing::debug!(%event, read = batch.read, written, "persisted sales");
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
    async fn write_batch(&self, conn: &mut Connection, batch: &Batch) -> Result<Written> {
        if batch.entries.is_empty() {
            return Ok(Written::Rows(0));
        }
        let event = batch.event;
        let mut tx = self.db.begin().await?;
        sqlx::query(LOCK_WAIT).execute(&mut *tx).await?;
        match db::lock_event_shared(&mut tx, event).await {
            Err(e) if db::lock_not_available(&e) => {
                tracing::debug!(%event, "a recovery holds the event; its batch waits");
                return Ok(Written::Busy);
            }
            locked => locked?,
        }
        // The short bound is for the recovery's lock only (see `WRITE_LOCK_WAIT`).
        sqlx::query(WRITE_LOCK_WAIT).execute(&mut *tx).await?;
        if !self.pending(conn, std::slice::from_ref(batch)).await?[0] {
            not_pending(batch);
            return Ok(Written::NotPending);
        }
        let entries: Vec<(Uuid, &Logged)> = batch.movements().collect();
        let written = db::write_movements(&mut tx, &entries).await?;
        tx.commit().await?;
        Ok(Written::Rows(written))
    }

    /// After PostgreSQL refused a batch: each entry alone, parking those it refuses.
    /// Returns how many sales were new rows, and the entries written or parked (to
    /// acknowledge); `None` when a recovery held the event meanwhile (the rest waits).
    async fn write_one_by_one<'a>(
        &self,
        conn: &mut Connection,
        batch: &'a Batch,
    ) -> Result<Option<(u64, Vec<&'a str>)>> {
        let (stream, event) = (batch.stream.as_str(), batch.event);
        let (mut written, mut done) = (0, Vec::new());
        // Once the event's row is known to be gone, the rest of the batch is parked
        // without another INSERT each: all of it would be refused alike.
        let mut row_gone: Option<String> = None;
        for (logged, id) in &batch.entries {
            if let Some(reason) = &row_gone {
                self.park_entry(conn, stream, event, id, reason).await?;
                continue;
            }
            let one = Batch {
                stream: batch.stream.clone(),
                event,
                read: 1,
                entries: vec![(logged.clone(), id.clone())],
            };
            match self.write_batch(conn, &one).await {
                Ok(Written::Rows(n)) => {
                    written += n;
                    done.push(id.as_str());
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
                        self.park_entry(conn, stream, event, id, &reason).await?;
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

    /// For each batch, whether every one of its entries is pending for this
    /// consumer: one `XPENDING` per entry (a range would count entries of this
    /// consumer's between them too), pipelined where Redis allows.
    async fn pending(&self, conn: &mut Connection, batches: &[Batch]) -> Result<Vec<bool>> {
        let mut queries = Vec::new();
        for batch in batches {
            for (_, id) in &batch.entries {
                let mut query = redis::cmd("XPENDING");
                query
                    .arg(&batch.stream)
                    .arg(CONSUMER_GROUP)
                    .arg(id)
                    .arg(id)
                    .arg(1)
                    .arg(&self.name);
                queries.push(query);
            }
        }
        let mut replies = conn.query_each(&queries).await?.into_iter();
        let mut pending = Vec::with_capacity(batches.len());
        for batch in batches {
            let mut all = true;
            for reply in replies.by_ref().take(batch.entries.len()) {
                all &= match reply {
                    Err(e) if e.code() == Some("NOGROUP") => false,
                    reply => {
                        redis::from_redis_value::<StreamPendingCountReply>(reply?)?
                            .ids
                            .len()
                            == 1
                    }
                };
            }
            pending.push(all);
        }
        Ok(pending)
    }
}

/// Counts and reports a batch left unwritten because its entries were no longer
/// pending for this consumer.
fn not_pending(batch: &Batch) {
    crate::metrics::consumer_batch_dropped();
    tracing::warn!(
        event = %batch.event, entries = batch.entries.len(),
        "entries no longer pending for this consumer when their batch was to be \
         written (taken over by another consumer, or lost with Redis' data)"
    );
}

/// Splits a round's batches into groups of at most `entries` entries and `events`
/// events, each written in one transaction; a batch that big already is a group of
/// its own.
fn groups(batches: Vec<Batch>, entries: usize, events: usize) -> Vec<Vec<Batch>> {
    let mut groups: Vec<Vec<Batch>> = Vec::new();
    let mut size = 0;
    for batch in batches {
        let len = batch.entries.len();
        match groups.last_mut() {
            Some(group) if size + len <= entries && group.len() < events => group.push(batch),
            _ => {
                size = 0;
                groups.push(vec![batch]);
            }
        }
        size += len;
    }
    groups
}
