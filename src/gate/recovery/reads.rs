//! What a recovery reads: the event's log (stream and dead letters) and books in
//! PostgreSQL, and Redis' own view of the event, which `reconcile` compares.

use redis::AsyncCommands;
use redis::streams::StreamRangeReply;
use uuid::Uuid;

use super::ledger::{self, Durable, Log};
use super::{RANGE_CHUNK, Recovery, restore};
use crate::db::{self, EventRow};
use crate::error::Result;
use crate::gate::outcome::Inventory;
use crate::records::Logged;

impl Recovery {
    /// The event's log, then what PostgreSQL holds of it, on `lock`, which holds the
    /// event's lock (see the module docs for the order).
    pub(super) async fn read_books(
        &self,
        event: &EventRow,
        lock: &mut sqlx::PgConnection,
    ) -> Result<(Log, db::Books)> {
        let log = self.read_log(event.id).await?;
        let ids = log.ids();
        let books = db::books(
            lock,
            event,
            self.retention.idempotency_secs(),
            &ids.sales,
            &ids.cancellations,
            &ids.holds,
        )
        .await?;
        Ok((log, books))
    }

    /// The stream and the dead letters of `event`. The dead letters are read before
    /// and after the stream: an entry moved between the two (parked, or sent back) is
    /// read at least once.
    pub(super) async fn read_log(&self, event: Uuid) -> Result<Log> {
        let dead = self.keys.dead_letters(event);
        let mut parked = self.read_stream(&dead).await?;
        let stream = self.read_stream(&self.keys.stream(event)).await?;
        parked.extend(self.read_stream(&dead).await?);
        Ok(Log { stream, parked })
    }

    /// Every entry of a stream that the gate wrote, read in chunks.
    pub(super) async fn read_stream(&self, stream: &str) -> Result<Vec<Logged>> {
        let mut conn = self.conn.clone();
        let mut entries = Vec::new();
        let mut start = "-".to_owned();
        loop {
            let page: StreamRangeReply =
                conn.xrange_count(stream, &start, "+", RANGE_CHUNK).await?;
            entries.extend(page.ids.iter().filter_map(Logged::from_stream));
            match page.ids.last() {
                Some(last) if page.ids.len() == RANGE_CHUNK => start = format!("({}", last.id),
                _ => return Ok(entries),
            }
        }
    }

    /// The counters of `event` if it is on sale on this server; `None` if Redis lacks
    /// it or has not had it checked.
    pub async fn counters(&self, event: Uuid) -> Result<Option<Inventory>> {
        Ok(self
            .state(event)
            .await?
            .and_then(|(inventory, on_sale)| on_sale.then_some(inventory)))
    }

    /// The counters of `event` as Redis has them, and whether it is on sale on this
    /// server (checked since the server started); `None` if Redis lacks the event.
    pub async fn state(&self, event: Uuid) -> Result<Option<(Inventory, bool)>> {
        let fields: Vec<i64> = self
            .seats
            .key(self.keys.inventory(event))
            .invoke_async(&mut self.conn.clone())
            .await?;
        Ok(match fields[..] {
            [total, sold, purchases, rejected, on_sale, held] => Some((
                Inventory {
                    total,
                    sold,
                    purchases,
                    rejected,
                    held,
                },
                on_sale == 1,
            )),
            _ => None,
        })
    }

    /// How many sales of `event` within the TTL have no idempotency record in Redis
    /// (a retry of one would be sold again). Sales whose record expires within
    /// `EXPIRY_MARGIN` are left out, so that a record expiring meanwhile does not count.
    pub async fn missing_records(&self, event: &EventRow) -> Result<usize> {
        const EXPIRY_MARGIN: i64 = 5;
        let sales = db::recent_sales(&self.db, event, self.retention.idempotency_secs()).await?;
        let keys: Vec<String> = sales
            .iter()
            .filter(|sale| sale.ttl_left > EXPIRY_MARGIN)
            .map(|sale| self.keys.idempotency(event.id, &sale.idempotency_key))
            .collect();
        restore::count_missing(&mut self.conn.clone(), &keys).await
    }

    /// Seats of `event` sold for certain: rows in PostgreSQL that are not cancelled,
    /// and entries of its log that are not rows yet (a cancellation not yet written
    /// takes its seats off).
    pub async fn durable(&self, event: &EventRow) -> Result<Durable> {
        let mut lock = self.db.begin().await?;
        db::lock_event(&mut lock, event.id).await?;
        let (log, books) = self.read_books(event, &mut lock).await?;
        lock.rollback().await?;
        Ok(ledger::durable(&log, &books))
    }

    /// The `run_id` of every Redis master (of the one server outside a cluster),
    /// sorted: what changes when one restarts or a replica takes over.
    pub async fn redis_run_ids(&self) -> Result<String> {
        self.conn.clone().run_ids().await
    }
}
