//! Recovery: the one way an event's state comes into Redis, on every path that needs
//! it — the first request for an event Redis lacks or has not checked, the Redis
//! watcher after a server change, startup, and `boxoffice reconcile --fix`.
//!
//! # The rule
//!
//! An event sells only while its inventory hash carries `run` = the run id of the
//! Redis server process answering; `lua/purchase.lua` compares the two before every
//! seat movement (purchase, hold, confirmation, release, cancellation, and the
//! return of expired holds) and answers `recover` otherwise. `run` is written by
//! [`Recovery::ensure`] alone, in its last step, after, on that same server process:
//!
//! 1. `lua/recover_begin.lua` took the event off sale (deleting `run`) and left a
//!    token in the hash: from here on nothing moves a seat of the event, so what
//!    PostgreSQL and the event's log (stream and dead letters) say of it is fixed;
//! 2. holding the event's lock in PostgreSQL ([`db::lock_event`]), so that no batch
//!    of its log is being written meanwhile, that was read ([`ledger`]) and worked
//!    out into the state the event must have: idempotency records, cancellation
//!    markers and hold hashes were written over what Redis had, the live holds and the buyers' counts into sets of this attempt
//!    ([`restore`]), each only while the attempt still owned the event;
//! 3. the event was added to the set the stream consumer reads streams from;
//! 4. `lua/recover_end.lua`, if the token is still there, swapped those keys in,
//!    set `sold` and `held`, and wrote `run`, in one step.
//!
//! So an event never sells from state that was not checked, and never before its
//! stream is read: that is a property of the data, whoever calls.
//!
//! # What each piece of state becomes
//!
//! Every seat movement is appended to the event's stream in the script call that
//! makes it, and an entry leaves the stream only once PostgreSQL has it (or it was
//! parked in the dead letters). So PostgreSQL plus the log is never behind Redis,
//! and is ahead of it exactly when Redis came back from an older point in time (a
//! snapshot, a replica that had not caught up). Recovery therefore sets every
//! counter to what they say, up or down, and never keeps what Redis had instead:
//!
//! | state | what PostgreSQL and the log know | after recovery |
//! | --- | --- | --- |
//! | `sold` | sales (rows, entries), less cancellations | exactly that |
//! | hold: live | made (`holds` row or entry), not ended, before its expiry | held again: its seats in `held`, its member back, its hash and its key's record |
//! | hold: confirmed | its sale (row or entry, same id) | hash `confirmed` with the sale's answer: a retried confirmation replays it |
//! | hold: released | `released_at` or a release entry | hash `released`: never confirms |
//! | hold: expired | none of the above by its expiry | hash read as expired, seats not held |
//! | `held` | live holds | their seats |
//! | buyers' counts | sales and live holds per buyer | exactly that |
//! | purchase records | sales of the last TTL, with their answer | written back, over a refusal an older snapshot holds for the same key |
//! | cancellation markers | `cancelled_at` or an entry, of the last TTL | written back |
//! | refusals (`SOLD_OUT`, over the limit) | nothing | never kept (a refusal sold nothing): a retry is decided again |
//! | waiting room | its settings (`events`) | the room back, empty: tickets are gone, admissions already issued (signed tokens) still admit, and re-joiners are admitted at the rate from now (`src/queue/`) |
//!
//! Redis' own state is written over, not merged: it can only be equal or older. A
//! hold that ended does not come back to life; one that was live comes back and can
//! be confirmed. A sale or hold only the lost part of Redis held (its entry was
//! still in the stream) is lost with it: only `appendfsync always` rules that out.
//!
//! # Why it holds
//!
//! * **Restart, restore from any older file, failover**: the server answering is a
//!   new process with a new run id, so every event's `run` differs, whatever the
//!   file or the replica held (a snapshot taken after a recovery holds the old run id).
//! * **A replica promoted on a Redis Cluster** (its master died, or `CLUSTER
//!   FAILOVER`): the run id is the one signal that needs nothing else. The replica
//!   holds its master's copy of each event, `run` included, which names the master's
//!   process, never the replica's own (a run id is made when a process starts and
//!   never shared, unlike the replication id, which a replica takes over from its
//!   master, or the config epoch, which changes with every slot move and says nothing
//!   about data). So the first seat movement on the promoted replica answers
//!   `recover`, and each event is rebuilt from PostgreSQL and its log there, the
//!   sales the master acknowledged but never passed on included when they reached
//!   PostgreSQL. Those that had not are kept by answering only once a replica has
//!   them (`store::Replicas`). A slot moved to another master (resharding) carries
//!   `run` along and is caught the same way. `tests/api/cluster.rs` kills a master
//!   whose replica lags mid-rush, with and without a consumer, fails one over by hand
//!   and moves a live event's slot.
//! * **FLUSHALL, keys deleted**: the inventory is gone, which the script treats alike.
//! * **Several deployments on one Redis** (key prefixes): `run` is per event and each
//!   deployment checks its own events; nothing is shared between them (the script
//!   cache, which is, says nothing about any deployment's data).
//! * **Several replicas at once, or an attempt cut at any point** (timeout, error,
//!   crash): step 1 reuses the token of an attempt already under way, so attempts
//!   that overlap share one and whichever finishes first puts the event on sale.
//!   Every write of step 2 but records and markers (the same values whoever writes
//!   them) checks that the attempt still owns the event (its server, its token), so an overtaken attempt writes nothing
//!   over holds confirmed or released since; each builds its sets under keys of its
//!   own, which expire if it dies, and the last step takes them only whole. An
//!   attempt cut short leaves the event off sale with its token, and the next one,
//!   in any process, does the job again. The last step refuses when the server
//!   changed meanwhile: then the attempt begins again.
//! * **The stream consumer** writes each batch in a transaction that holds the
//!   event's lock shared and first checks that the entries are still pending for it
//!   (`persist`). So a batch is in PostgreSQL before a recovery reads, or is written
//!   after it, and then only if Redis did not lose those entries meanwhile (the
//!   recovery did not count them) — a write in flight across a FLUSHALL or a
//!   failover cannot add rows the recovery did not see. With the lock held nothing
//!   writes the event's rows, so the log and then PostgreSQL are read at leisure, on
//!   the lock's own connection ([`db::books`]). Attempts queue for the lock, and one
//!   that finds another finished the job writes nothing.
//! * **Clocks**: expiries are judged by the later of Redis' and PostgreSQL's clock, so
//!   a failover to a server whose clock is behind does not bring an expired hold
//!   back; should the books ever hold more live holds than seats left, the latest
//!   ones are ended ([`ledger::rebuild`]): `sold + held <= total` after every
//!   recovery.
//!
//! # What it costs and what it cannot do
//!
//! The purchase script reads `INFO server` on each sale (3–4 µs of Redis time). A
//! recovery rewrites every record within the TTL of its event, during which the
//! event answers 503; see docs/operations.md, "Durability". Records deleted behind the service's
//! back on a running server (by eviction, or by hand) are found by `boxoffice
//! reconcile`.
//!
//! Setting `sold` down as well as up departs from the first rule of the design
//! ("never lower a counter Redis still has"), which guarded against a loader racing
//! live sales with a stale count: here nothing sells while the counts are read, so
//! the count is exact, and keeping a higher one would keep cancelled seats off sale
//! and ended holds alive after a restore. The one case it costs: stream entries
//! removed behind the service's back (by hand, or by a `MAXLEN` trim of another
//! tool) before they reached PostgreSQL. Their sales then exist in no record, and a
//! recovery puts their seats back on sale; `boxoffice reconcile` reports such an
//! event as "rows missing" while Redis still counts them.

mod fence;
pub mod ledger;
mod reads;
mod restore;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use redis::{AsyncCommands, Script};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::db::{self, EventRow};
use crate::error::{Error, Result};
use crate::gate::retention::Retention;
use crate::keys::Keys;
use crate::store::{Redis, Replicas};
pub use fence::take_off_sale;
pub use ledger::Durable;
use ledger::Rebuilt;

/// Attempts of one recovery before it gives up (each further one follows a server
/// change in the middle of the previous).
const ATTEMPTS: usize = 3;

/// After a failed recovery, how long requests for that event fail at once instead
/// of trying again (each try may wait out PostgreSQL's connection timeout).
const RETRY_AFTER: Duration = Duration::from_secs(1);

/// Stream entries read per XRANGE call.
const RANGE_CHUNK: usize = 10_000;

/// What one recovery did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Report {
    /// The event was already on sale on this server; nothing was changed.
    pub was_on_sale: bool,
    pub created: bool,
    /// How far `sold` moved (negative: Redis counted sales that were cancelled, or
    /// holds confirmed, in what it lost).
    pub sold_moved_by: i64,
    pub held: i64,
    pub records: usize,
    pub live_holds: usize,
}

impl Report {
    /// An event found on sale on this server: nothing to do.
    fn on_sale() -> Self {
        Self {
            was_on_sale: true,
            ..Self::default()
        }
    }
}

/// What one attempt came to.
enum Attempted {
    Done(Report),
    /// Overtaken by another attempt, or the server changed, before the event was
    /// on sale: begin again.
    Again,
}

/// Whether a recovery may leave alone an event that is on sale.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Only events missing or not checked on this server.
    Check,
    /// Every event, even one on sale: off sale until its state is rebuilt.
    Force,
}

/// When and why the last recovery of an event in this process failed.
type LastFailure = Option<(Instant, String)>;

#[derive(Clone)]
pub struct Recovery {
    conn: Redis,
    db: PgPool,
    keys: Keys,
    retention: Retention,
    /// Replicas that must have the event in the set of events before it sells (see
    /// `store::Replicas`): a failover must not lose it, or its stream goes unread.
    replicas: Replicas,
    begin: Script,
    end: Script,
    seats: Script,
    restore: restore::Scripts,
    /// One lock per event being recovered in this process: concurrent requests wait
    /// for one recovery instead of each running one.
    running: Arc<Mutex<HashMap<Uuid, Arc<tokio::sync::Mutex<LastFailure>>>>>,
}

impl Recovery {
    pub fn new(
        conn: Redis,
        db: PgPool,
        keys: Keys,
        retention: Retention,
        replicas: Replicas,
    ) -> Self {
        Self {
            conn,
            db,
            keys,
            retention,
            replicas,
            begin: crate::lua_script!("recover_begin.lua"),
            end: crate::lua_script!("recover_end.lua"),
            seats: crate::lua_script!("seats.lua"),
            restore: restore::Scripts::new(),
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
            return Ok(Report::on_sale());
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
        let mut checked = Vec::with_capacity(events.len());
        for event in &events {
            match self.ensure_event(event, Mode::Check).await {
                Ok(_) => checked.push(event.id.to_string()),
                Err(e) => _ = first_error.get_or_insert(e),
            }
        }
        // On a cluster the set of events lives on a master of its own, which may have
        // failed over without an entry (with `BOXOFFICE_REDIS_REPLICA_ACKS=0`) while
        // the event's own master kept it checked: put every checked event back.
        let mut conn = self.conn.clone();
        for chunk in checked.chunks(1_000) {
            let _: () = conn.sadd(self.keys.events(), chunk).await?;
        }
        first_error.map_or(Ok(events.len()), Err)
    }

    /// The steps of the module docs, begun again when the last one refuses.
    async fn recover(&self, event: &EventRow, mode: Mode) -> Result<Report> {
        let started = Instant::now();
        for _ in 0..ATTEMPTS {
            let Some(begun) = self.begin(event, mode).await? else {
                return Ok(Report::on_sale());
            };
            if let Attempted::Done(report) = self.attempt(event, &begun, started).await? {
                return Ok(report);
            }
        }
        Err(Error::RecoveryPending(
            "the Redis server changed while the event was being checked".into(),
        ))
    }

    /// Steps 2 to 4 of one attempt, under the event's lock in PostgreSQL: no batch of
    /// the event's log is written there while it reads and rebuilds (see `persist`).
    async fn attempt(
        &self,
        event: &EventRow,
        begun: &Begun,
        started: Instant,
    ) -> Result<Attempted> {
        let mut lock = self.db.begin().await?;
        db::lock_event(&mut lock, event.id).await?;
        // The row may have gone since it was read (the consumer then took the
        // event off sale, `persist`): such an event is not put back on sale.
        if !db::event_exists(&mut lock, event.id).await? {
            lock.rollback().await?;
            return Err(Error::EventNotFound(event.id));
        }
        // Attempts queue for the lock: one that finds the job done writes nothing.
        if !self.still_owns(event.id, begun).await? {
            lock.rollback().await?;
            return self.overtaken(event.id).await;
        }
        let (log, books) = self.read_books(event, &mut lock).await?;
        let redis_now = self
            .conn
            .clone()
            .now_ms_of(&self.keys.inventory(event.id))
            .await?;
        let rebuilt = ledger::rebuild(
            &log,
            &books,
            (i64::from(event.total_seats), event.max_per_buyer),
            redis_now.max(books.now_ms),
            &self.retention,
        );
        let Some((records, sold_before)) = self
            .restore_and_end(event.id, begun, &rebuilt, redis_now, &mut lock)
            .await?
        else {
            lock.rollback().await?;
            return self.overtaken(event.id).await;
        };
        lock.commit().await?;
        let report = Report {
            was_on_sale: false,
            created: begun.created,
            sold_moved_by: rebuilt.sold() - sold_before,
            held: rebuilt.held,
            records,
            live_holds: rebuilt.live_holds().count(),
        };
        log_recovery(event, &rebuilt, &report, started.elapsed());
        crate::metrics::recovery(records);
        Ok(Attempted::Done(report))
    }

    /// Steps 3 and 4: writes `rebuilt` into Redis and puts the event back on sale;
    /// returns the records written and `sold` as it was, or `None` when another
    /// attempt overtook this one or the server changed.
    async fn restore_and_end(
        &self,
        event: Uuid,
        begun: &Begun,
        rebuilt: &Rebuilt,
        redis_now: i64,
        lock: &mut sqlx::PgConnection,
    ) -> Result<Option<(usize, i64)>> {
        let attempt_id = Uuid::new_v4().simple().to_string();
        let mut writer = restore::Writer {
            conn: self.conn.clone(),
            keys: &self.keys,
            scripts: &self.restore,
            event,
            attempt: restore::Attempt {
                id: &attempt_id,
                token: &begun.token,
                run: &begun.run,
            },
            retention: self.retention,
        };
        let written = writer.write(rebuilt).await?;
        let Some(records) = written else {
            return Ok(None);
        };
        let mut add = redis::pipe();
        add.sadd(self.keys.events(), event.to_string()).ignore();
        if self.replicas.append(&mut add) {
            let (acked,): (i64,) = add.query_async(&mut self.conn.clone()).await?;
            self.replicas.check(acked)?;
        } else {
            let _: () = add.query_async(&mut self.conn.clone()).await?;
        }
        // Holds this recovery ended stay ended: recorded with the event back on sale,
        // or not at all.
        let voided = rebuilt.voided_holds();
        if !voided.is_empty() {
            db::end_holds(lock, event, &voided, redis_now * 1000).await?;
        }
        let ended = self.end(event, begun, rebuilt, &attempt_id).await?;
        Ok(ended.map(|(sold_before, _)| (records, sold_before)))
    }

    /// An attempt another one overtook: done when the event is on sale now.
    async fn overtaken(&self, event: Uuid) -> Result<Attempted> {
        Ok(if self.counters(event).await?.is_some() {
            Attempted::Done(Report::on_sale())
        } else {
            Attempted::Again
        })
    }

    /// Checks every event at once when the Redis server changes (and at start), rather
    /// than at each event's next request, which would otherwise wait for it.
    pub async fn watch_redis(self, every: Duration, shutdown: CancellationToken) {
        let mut known: Option<String> = None;
        loop {
            match self.redis_run_ids().await {
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

/// An attempt under way: the server it began on and its token.
struct Begun {
    run: String,
    token: String,
    created: bool,
}

fn log_recovery(event: &EventRow, rebuilt: &Rebuilt, report: &Report, took: Duration) {
    if report.created && report.records == 0 && rebuilt.sold() == 0 && rebuilt.holds.is_empty() {
        tracing::info!(event = %event.id, "event on sale in Redis");
        return;
    }
    tracing::warn!(
        event = %event.id,
        created = report.created,
        sold = rebuilt.sold(),
        sold_moved_by = report.sold_moved_by,
        held = report.held,
        live_holds = report.live_holds,
        records = report.records,
        persisted = rebuilt.durable.persisted,
        in_stream = rebuilt.durable.in_stream,
        parked = rebuilt.durable.parked,
        ?took,
        "event checked against PostgreSQL on this Redis server (new, restarted, restored \
         or failed over) and put back on sale"
    );
}
