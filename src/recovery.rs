//! Recovery: the one way an event's state comes into Redis, on every path that needs
//! it — the first request for an event Redis lacks or has not checked, the Redis
//! watcher after a server change, startup, and `boxoffice reconcile --fix`.
//!
//! # The rule
//!
//! An event sells only while its inventory hash carries `run` = the run id of the
//! Redis server process answering; `lua/purchase.lua` compares the two on every sale
//! and answers `recover` otherwise. `run` is written by [`Recovery::ensure`] alone,
//! in its last step (`lua/recover_end.lua`), after, on that same server process:
//!
//! 1. `lua/recover_begin.lua` took the event off sale (deleting `run`), created its
//!    counters or raised `sold` to the seats PostgreSQL and the stream hold (never
//!    lowering it), and left a token in the hash;
//! 2. the idempotency records of every sale of the event within the TTL were written
//!    back from PostgreSQL (`SET NX`: a record Redis has is never older);
//! 3. the event was added to the set the stream consumer reads streams from.
//!
//! So an event never sells from counters or records that were not checked, and never
//! before its stream is read: that is a property of the data, whoever calls.
//!
//! # Why it holds
//!
//! * **Restart, restore from any older file, failover**: the server answering is a
//!   new process with a new run id, so every event's `run` differs, whatever the
//!   file or the replica held (a snapshot taken after a recovery holds the old run id).
//! * **FLUSHALL, keys deleted**: the inventory is gone, which the script treats alike.
//! * **Several deployments on one Redis** (key prefixes): `run` is per event and each
//!   deployment checks its own events; nothing is shared between them (the script
//!   cache, which is, says nothing about any deployment's data).
//! * **Several replicas at once, or an attempt cut at any point** (timeout, error,
//!   crash): each step is idempotent. Step 1 reuses the token of an attempt already
//!   under way, so attempts that overlap share one, and whichever finishes its
//!   restore first puts the event on sale; an attempt cut short leaves the event off
//!   sale with its token, and the next one, in any process, finishes the job. The
//!   last step refuses when the server changed or the event was recreated meanwhile
//!   (new token): then the attempt begins again.
//!
//! # What it costs and what it cannot do
//!
//! The purchase script reads `INFO server` on each sale (3–4 µs of Redis time). A
//! recovery rewrites every record within the TTL of its event, during which the
//! event answers 503; see README "Durability". Refusals (`SOLD_OUT`) are not restored
//! (PostgreSQL holds sales only), and no recovery can bring back a sale that only the
//! lost part of Redis held. Records deleted behind the service's back on a running
//! server (by eviction, or by hand) are found by `boxoffice reconcile`.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use redis::aio::ConnectionManager;
use redis::streams::StreamRangeReply;
use redis::{AsyncCommands, Script};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::db::{self, EventRow};
use crate::error::{Error, Result};
use crate::keys::Keys;
use crate::persist::CONSUMER_GROUP;
use crate::purchase::Inventory;
use crate::records::{Logged, Movement, Record};

/// Attempts of one recovery before it gives up (each further one follows a server
/// change or a lost event in the middle of the previous).
const ATTEMPTS: usize = 3;

/// After a failed recovery, how long requests for that event fail at once instead
/// of trying again (each try may wait out PostgreSQL's connection timeout).
const RETRY_AFTER: Duration = Duration::from_secs(1);

/// Idempotency records written back per pipeline.
const RESTORE_CHUNK: usize = 1_000;

/// Stream entries read per XRANGE call when counting unwritten sales.
const RANGE_CHUNK: usize = 10_000;

/// What PostgreSQL and Redis' streams say about an event's sales.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Durable {
    /// Seats in `purchases`, cancelled ones left out.
    pub persisted: i64,
    /// Seats of stream entries that are not rows yet, less those of cancellations
    /// not yet written.
    pub in_stream: i64,
    /// Seats of sales PostgreSQL refused, set aside in the dead-letter stream.
    pub parked: i64,
}

impl Durable {
    /// Seats sold for certain: Redis must never count fewer.
    pub fn seats(&self) -> i64 {
        self.persisted + self.in_stream + self.parked
    }
}

/// What one recovery did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Report {
    /// The event was already on sale on this server; nothing was changed.
    pub was_on_sale: bool,
    pub created: bool,
    pub raised_by: i64,
    pub records: usize,
}

/// Whether a recovery may leave alone an event that is on sale.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Only events missing, behind, or not checked on this server.
    Check,
    /// Every event, even one on sale: off sale until its records are restored.
    Force,
}

/// When and why the last recovery of an event in this process failed.
type LastFailure = Option<(Instant, String)>;

#[derive(Clone)]
pub struct Recovery {
    conn: ConnectionManager,
    db: PgPool,
    keys: Keys,
    idempotency_ttl: u32,
    begin: Script,
    end: Script,
    seats: Script,
    raise_buyers: Script,
    settle: Script,
    /// One lock per event being recovered in this process: concurrent requests wait
    /// for one recovery instead of each running one.
    running: Arc<Mutex<HashMap<Uuid, Arc<tokio::sync::Mutex<LastFailure>>>>>,
}

impl Recovery {
    pub fn new(conn: ConnectionManager, db: PgPool, keys: Keys, idempotency_ttl: u32) -> Self {
        Self {
            conn,
            db,
            keys,
            idempotency_ttl,
            begin: crate::lua_script!("recover_begin.lua"),
            end: crate::lua_script!("recover_end.lua"),
            seats: crate::lua_script!("seats.lua"),
            raise_buyers: crate::lua_script!("raise_buyers.lua"),
            settle: crate::lua_script!("settle_holds.lua"),
            running: Arc::default(),
        }
    }

    /// Brings `event` on sale on this Redis server if it is not (see the module
    /// docs). `EventNotFound` if PostgreSQL does not have it.
    pub async fn ensure(&self, event: Uuid) -> Result<Report> {
        // PostgreSQL first: an id that names no event leaves nothing behind here.
        let row = db::event(&self.db, event)
            .await?
            .ok_or(Error::EventNotFound(event))?;
        self.ensure_event(&row, Mode::Check).await
    }

    /// [`Recovery::ensure`] for an event already read from PostgreSQL.
    pub async fn ensure_event(&self, event: &EventRow, mode: Mode) -> Result<Report> {
        let lock = self.lock(event.id);
        let mut last_failure = lock.lock().await;
        if mode == Mode::Check && self.counters(event.id).await?.is_some() {
            // Another request of this process finished the job while this one waited.
            return Ok(Report {
                was_on_sale: true,
                ..Report::default()
            });
        }
        if let Some((at, error)) = last_failure.as_ref()
            && at.elapsed() < RETRY_AFTER
        {
            return Err(Error::RecoveryPending(error.clone()));
        }
        let recovered = self.recover(event, mode).await;
        *last_failure = recovered
            .as_ref()
            .err()
            .map(|e| (Instant::now(), e.to_string()));
        recovered
    }

    fn lock(&self, event: Uuid) -> Arc<tokio::sync::Mutex<LastFailure>> {
        let mut running = self.running.lock().unwrap_or_else(|e| e.into_inner());
        running.entry(event).or_default().clone()
    }

    /// Every event of PostgreSQL, one by one; the first error is returned after all
    /// were tried.
    pub async fn ensure_all(&self) -> Result<usize> {
        let events = db::events(&self.db).await?;
        let mut first_error = None;
        for event in &events {
            if let Err(e) = self.ensure_event(event, Mode::Check).await {
                first_error.get_or_insert(e);
            }
        }
        first_error.map_or(Ok(events.len()), Err)
    }

    /// The steps of the module docs, begun again when the last one refuses.
    async fn recover(&self, event: &EventRow, mode: Mode) -> Result<Report> {
        let started = Instant::now();
        let inventory = self.keys.inventory(event.id);
        for _ in 0..ATTEMPTS {
            let durable = self.durable(event.id).await?;
            let mut begin = self.begin.key(&inventory);
            begin
                .key(self.keys.stream(event.id))
                .key(self.keys.queue(event.id))
                .arg(event.total_seats)
                .arg(durable.seats())
                .arg(CONSUMER_GROUP)
                .arg(Uuid::new_v4().simple().to_string())
                .arg(u8::from(mode == Mode::Force))
                .arg(
                    event
                        .max_per_buyer
                        .map(|n| n.to_string())
                        .unwrap_or_default(),
                )
                .arg(event.hold_seconds);
            if let Some(queue) = event.queue() {
                begin
                    .arg(queue.opens_at_ms)
                    .arg(queue.admit_per_second)
                    .arg(queue.admission_seconds)
                    .arg(queue.seed);
            }
            let (state, run, token, created, raised_by): (String, String, String, i64, i64) =
                begin.invoke_async(&mut self.conn.clone()).await?;
            if state == "checked" {
                return Ok(Report {
                    was_on_sale: true,
                    ..Report::default()
                });
            }
            let records = self.restore_records(event).await?;
            self.settle_holds(event).await?;
            self.restore_buyers(event).await?;
            let _: () = self
                .conn
                .clone()
                .sadd(self.keys.events(), event.id.to_string())
                .await?;
            let ended: String = self
                .end
                .key(&inventory)
                .arg(&token)
                .arg(&run)
                .invoke_async(&mut self.conn.clone())
                .await?;
            if ended == "checked" {
                let report = Report {
                    was_on_sale: false,
                    created: created == 1,
                    raised_by,
                    records,
                };
                log_recovery(event, &durable, &report, started.elapsed());
                crate::metrics::recovery(records);
                return Ok(report);
            }
        }
        Err(Error::RecoveryPending(
            "the Redis server changed or lost the event while it was being checked".into(),
        ))
    }

    /// Writes back the idempotency records of `event`'s sales made within the TTL,
    /// where Redis lacks them. Returns how many PostgreSQL had.
    async fn restore_records(&self, event: &EventRow) -> Result<usize> {
        let sales = db::recent_sales(&self.db, event, self.idempotency_ttl).await?;
        let mut conn = self.conn.clone();
        for chunk in sales.chunks(RESTORE_CHUNK) {
            let mut pipe = redis::pipe();
            for sale in chunk {
                let record = Record::Sold {
                    quantity: u8::try_from(sale.quantity).unwrap_or(u8::MAX),
                    seats_remaining: sale.seats_remaining,
                    purchase_id: sale.id,
                };
                pipe.cmd("SET")
                    .arg(self.keys.idempotency(event.id, &sale.idempotency_key))
                    .arg(record.to_string())
                    .arg("EX")
                    .arg(sale.ttl_left)
                    .arg("NX")
                    .ignore();
            }
            let _: () = pipe.query_async(&mut conn).await?;
        }
        Ok(sales.len())
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
        let sales = db::recent_sales(&self.db, event, self.idempotency_ttl).await?;
        let keys: Vec<String> = sales
            .iter()
            .filter(|sale| sale.ttl_left > EXPIRY_MARGIN)
            .map(|sale| self.keys.idempotency(event.id, &sale.idempotency_key))
            .collect();
        let mut missing = 0;
        for chunk in keys.chunks(RESTORE_CHUNK) {
            let mut pipe = redis::pipe();
            for key in chunk {
                pipe.exists(key);
            }
            let exists: Vec<bool> = pipe.query_async(&mut self.conn.clone()).await?;
            missing += exists.iter().filter(|e| !**e).count();
        }
        Ok(missing)
    }

    /// Seats of `event` sold for certain: rows in PostgreSQL that are not cancelled,
    /// stream entries not written yet (entries written but not yet trimmed count
    /// once; a cancellation not yet written takes its seats off), and parked sales.
    pub async fn durable(&self, event: Uuid) -> Result<Durable> {
        let entries = self.stream_movements(&self.keys.stream(event)).await?;
        let (sales, cancels) = ids_by_kind(&entries);
        // One statement, so that a row written meanwhile is counted in exactly one place.
        let counted = db::seats_sold_and_written(&self.db, event, &sales, &cancels).await?;
        let unwritten = unwritten(&entries, &counted.written, &counted.cancelled);
        let parked = self
            .stream_movements(&self.keys.dead_letters(event))
            .await?
            .iter()
            .map(Movement::signed_seats)
            .sum();
        Ok(Durable {
            persisted: counted.sold,
            in_stream: unwritten.map(Movement::signed_seats).sum(),
            parked,
        })
    }

    /// Seats each buyer of `event` has for certain (as [`Recovery::durable`] counts
    /// them, per buyer), raised to in Redis: a buyer's count is never lowered (holds
    /// that survived count in it too).
    async fn restore_buyers(&self, event: &EventRow) -> Result<usize> {
        if event.max_per_buyer.is_none() {
            return Ok(0);
        }
        let entries = self.stream_movements(&self.keys.stream(event.id)).await?;
        let (sales, cancels) = ids_by_kind(&entries);
        let counted = db::buyer_seats_and_written(&self.db, event.id, &sales, &cancels).await?;
        let mut seats: HashMap<String, i64> = counted.buyers.into_iter().collect();
        for movement in unwritten(&entries, &counted.written, &counted.cancelled) {
            if let Some(buyer) = &movement.buyer {
                *seats.entry(buyer.clone()).or_default() += movement.signed_seats();
            }
        }
        let mut conn = self.conn.clone();
        let pairs: Vec<(String, i64)> = seats.into_iter().filter(|(_, n)| *n > 0).collect();
        for chunk in pairs.chunks(RESTORE_CHUNK) {
            let mut raise = self.raise_buyers.key(self.keys.buyers(event.id));
            for (buyer, n) in chunk {
                raise.arg(buyer).arg(n);
            }
            let _: i64 = raise.invoke_async(&mut conn).await?;
        }
        Ok(pairs.len())
    }

    /// Holds Redis has as held though PostgreSQL has their sale (Redis came back from
    /// a file older than their confirmation): marked confirmed, their seats out of
    /// `held` (`sold` counts them already), so that none is both sold and expired.
    async fn settle_holds(&self, event: &EventRow) -> Result<usize> {
        let mut conn = self.conn.clone();
        let members: Vec<String> = conn.zrange(self.keys.holds(event.id), 0, -1).await?;
        let by_id: HashMap<Uuid, &String> = members
            .iter()
            .filter_map(|m| Some((m.split(':').next()?.parse().ok()?, m)))
            .collect();
        if by_id.is_empty() {
            return Ok(0);
        }
        let ids: Vec<Uuid> = by_id.keys().copied().collect();
        let sold = db::sales_of(&self.db, event.id, &ids).await?;
        for chunk in sold.chunks(RESTORE_CHUNK) {
            let mut settle = self.settle.key(self.keys.inventory(event.id));
            settle.key(self.keys.holds(event.id));
            for sale in chunk {
                settle
                    .key(self.keys.hold(event.id, sale.id))
                    .arg(by_id[&sale.id])
                    .arg(sale.seats_remaining)
                    .arg(sale.sold_at_ms);
            }
            let _: i64 = settle.invoke_async(&mut conn).await?;
        }
        if !sold.is_empty() {
            tracing::warn!(event = %event.id, holds = sold.len(), "holds found confirmed in PostgreSQL marked confirmed in Redis");
        }
        Ok(sold.len())
    }

    /// Every entry of a stream that moves seats, read in chunks.
    async fn stream_movements(&self, stream: &str) -> Result<Vec<Movement>> {
        let mut conn = self.conn.clone();
        let mut movements = Vec::new();
        let mut start = "-".to_owned();
        loop {
            let page: StreamRangeReply =
                conn.xrange_count(stream, &start, "+", RANGE_CHUNK).await?;
            movements.extend(page.ids.iter().filter_map(Logged::movement));
            match page.ids.last() {
                Some(last) if page.ids.len() == RANGE_CHUNK => start = format!("({}", last.id),
                _ => return Ok(movements),
            }
        }
    }

    /// The `run_id` of the Redis server behind the shared connection.
    pub async fn redis_run_id(&self) -> Result<String> {
        server_run_id(&mut self.conn.clone()).await
    }

    /// Checks every event at once when the Redis server changes (and at start), rather
    /// than at each event's next request, which would otherwise wait for it.
    pub async fn watch_redis(self, every: Duration, shutdown: CancellationToken) {
        let mut known: Option<String> = None;
        loop {
            match self.redis_run_id().await {
                Ok(run_id) if known.as_ref() != Some(&run_id) => match self.ensure_all().await {
                    Ok(events) => {
                        tracing::info!(events, run_id, "events checked on this Redis server");
                        known = Some(run_id);
                    }
                    Err(e) => tracing::warn!(error = %e, "checking events on a new Redis failed"),
                },
                Ok(_) => {}
                Err(e) => tracing::debug!(error = %e, "Redis run_id check failed"),
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(every) => {}
            }
        }
    }
}

/// The purchase ids of the sales and of the cancellations among `entries`.
fn ids_by_kind(entries: &[Movement]) -> (Vec<Uuid>, Vec<Uuid>) {
    let (cancels, sales): (Vec<&Movement>, Vec<&Movement>) = entries.iter().partition(|m| m.cancel);
    let ids = |list: Vec<&Movement>| list.iter().map(|m| m.id).collect();
    (ids(sales), ids(cancels))
}

/// The entries PostgreSQL does not reflect yet: sales not `written` as rows, and
/// cancellations not yet marked (`cancelled`) on theirs.
fn unwritten<'a>(
    entries: &'a [Movement],
    written: &[Uuid],
    cancelled: &[Uuid],
) -> impl Iterator<Item = &'a Movement> {
    let written: HashSet<Uuid> = written.iter().copied().collect();
    let cancelled: HashSet<Uuid> = cancelled.iter().copied().collect();
    entries.iter().filter(move |m| {
        let done = if m.cancel { &cancelled } else { &written };
        !done.contains(&m.id)
    })
}

fn log_recovery(event: &EventRow, durable: &Durable, report: &Report, took: Duration) {
    if report.created && report.records == 0 && durable.seats() == 0 {
        tracing::info!(event = %event.id, "event on sale in Redis");
        return;
    }
    tracing::warn!(
        event = %event.id,
        created = report.created,
        raised_by = report.raised_by,
        records = report.records,
        persisted = durable.persisted,
        in_stream = durable.in_stream,
        ?took,
        "event checked against PostgreSQL on this Redis server (new, restarted, restored \
         or failed over) and put back on sale"
    );
}

/// The `run_id` of the Redis server `conn` talks to: what an event's `run` must equal
/// for it to sell (see the module docs).
pub async fn server_run_id(conn: &mut impl redis::aio::ConnectionLike) -> Result<String> {
    let info: String = redis::cmd("INFO").arg("server").query_async(conn).await?;
    info.lines()
        .find_map(|line| line.strip_prefix("run_id:"))
        .map(|id| id.trim().to_owned())
        .ok_or_else(|| Error::UnexpectedReply("INFO server without run_id".into()))
}
