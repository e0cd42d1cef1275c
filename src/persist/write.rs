//! Writing a batch of a stream to PostgreSQL, then acknowledging it: under the
//! event's lock, only while its entries are still pending for this consumer, one
//! entry at a time after a refusal so that only the refused ones are parked.

use std::collections::HashMap;
use std::time::Instant;

use deadpool_redis::redis::streams::{StreamId, StreamPendingCountReply};
use deadpool_redis::redis::{self, AsyncCommands};
use sqlx::PgConnection;
use uuid::Uuid;

use super::{CONSUMER_GROUP, Connection, Consumer};
use crate::db;
use crate::error::{Error, Result};
use crate::records::Logged;

/// How long a batch waits for its event's lock while a recovery holds it, before the
/// consumer leaves it pending and goes on with other events.
const LOCK_WAIT: &str = "SET LOCAL lock_timeout = '500ms'";
/// Once the event's lock is held, the batch's writes wait on row and table locks as
/// long as the server's setting says (none by default). A bound would not keep the
/// consumer going — a table locked from outside fails every retry alike — and a batch
/// that gave up while a recovery waited for it would leave the recovery counting
/// without its sales, whose entries Redis may have lost meanwhile: sold twice.
const WRITE_LOCK_WAIT: &str = "SET LOCAL lock_timeout TO DEFAULT";

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
    /// Writes one batch of a stream to PostgreSQL, then acknowledges it. Entries that
    /// are none of the kinds the gate writes, or that PostgreSQL refuses for good, are
    /// parked instead. Returns `true` when the batch was left pending for a later
    /// round (a recovery of the event held its lock).
    pub(super) async fn persist(
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
        // The short bound is for the recovery's lock only (see `WRITE_LOCK_WAIT`).
        sqlx::query(WRITE_LOCK_WAIT).execute(&mut *tx).await?;
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
            pipe.query_async(conn).await;
        match replies {
            Err(e) if e.code() == Some("NOGROUP") => Ok(false),
            replies => Ok(replies?.iter().all(|reply| reply.ids.len() == 1)),
        }
    }
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
