//! PostgreSQL: connecting (creating the database when missing), migrations, and the
//! few queries the service runs. Runtime-checked queries, so a build needs no database.

use std::time::Duration;

use sqlx::migrate::MigrateDatabase;
use sqlx::postgres::{PgPool, PgPoolOptions};
use sqlx::{FromRow, PgConnection, Postgres};
use uuid::Uuid;

use crate::domain::Seats;
use crate::error::{Error, Result, redact_url};
use crate::records::{Cancellation, Entry, HoldMade, HoldReleased};

/// How long startup and requests wait for a PostgreSQL connection.
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(3);

/// Advisory lock key held while the default event is created, so replicas starting
/// together create one event, not one each.
const DEFAULT_EVENT_LOCK: i64 = 0x626f_786f_6666;

/// An event as PostgreSQL records it.
#[derive(Debug, Clone, FromRow)]
pub struct EventRow {
    pub id: Uuid,
    pub name: String,
    pub total_seats: i32,
    pub hold_seconds: i32,
    pub max_per_buyer: Option<i32>,
    pub queue_opens_at: Option<chrono::DateTime<chrono::Utc>>,
    pub queue_admit_per_second: Option<i32>,
    pub queue_admission_seconds: Option<i32>,
    pub queue_seed: Option<i64>,
}

impl EventRow {
    /// The event's waiting room, if it is queued.
    pub fn queue(&self) -> Option<crate::queue::QueueSettings> {
        Some(crate::queue::QueueSettings {
            opens_at_ms: self.queue_opens_at?.timestamp_millis(),
            admit_per_second: u32::try_from(self.queue_admit_per_second?).ok()?,
            admission_seconds: u32::try_from(self.queue_admission_seconds?).ok()?,
            seed: self.queue_seed? as u64,
        })
    }
}

/// The columns of [`EventRow`], for every query that reads one (a macro, so queries
/// stay string literals).
macro_rules! event_columns {
    () => {
        "id, name, total_seats, hold_seconds, max_per_buyer, queue_opens_at, \
         queue_admit_per_second, queue_admission_seconds, queue_seed"
    };
}

/// What an event is created with, beside its name.
#[derive(Debug, Clone, Copy)]
pub struct EventSettings {
    pub seats: Seats,
    pub hold_seconds: u32,
    pub max_per_buyer: Option<u32>,
    pub queue: Option<crate::queue::QueueSettings>,
}

impl EventSettings {
    /// An event with `seats` and the defaults for the rest.
    pub fn seats(seats: Seats) -> Self {
        Self {
            seats,
            hold_seconds: crate::domain::DEFAULT_HOLD_SECONDS,
            max_per_buyer: None,
            queue: None,
        }
    }
}

/// A sale as PostgreSQL records it.
#[derive(Debug, Clone, FromRow)]
pub struct PurchaseRow {
    pub id: Uuid,
    pub event_id: Uuid,
    pub quantity: i16,
    pub buyer: Option<String>,
    pub via_hold: bool,
    pub sold_at: chrono::DateTime<chrono::Utc>,
    pub cancelled_at: Option<chrono::DateTime<chrono::Utc>>,
}

/// Connects to PostgreSQL, creating the database if it does not exist, and migrates it.
pub async fn connect(url: &str, pool_size: u32) -> Result<PgPool> {
    let unreachable = |e: sqlx::Error| connect_error(url, e);
    if !Postgres::database_exists(url).await.map_err(unreachable)? {
        // Another replica may create it between our check and our CREATE.
        if let Err(e) = Postgres::create_database(url).await
            && !Postgres::database_exists(url).await.unwrap_or(false)
        {
            return Err(unreachable(e));
        }
        tracing::info!(url = %redact_url(url), "created database");
    }
    let pool = PgPoolOptions::new()
        .max_connections(pool_size)
        .acquire_timeout(ACQUIRE_TIMEOUT)
        .connect(url)
        .await
        .map_err(unreachable)?;
    sqlx::migrate!().run(&pool).await?;
    Ok(pool)
}

/// Why startup could not use PostgreSQL, with the advice that fits: a server that
/// answered and refused (a wrong role, password or database) needs another
/// DATABASE_URL, not to be started.
fn connect_error(url: &str, e: sqlx::Error) -> Error {
    let url = redact_url(url);
    Error::Startup(match &e {
        sqlx::Error::Database(refusal) => format!(
            "PostgreSQL at {url} refused: {}; check the user, password and database \
             name in DATABASE_URL (to create a missing database, the user needs CREATEDB \
             and access to the postgres database)",
            refusal.message()
        ),
        _ => format!("cannot reach PostgreSQL at {url} ({e}); start it or set DATABASE_URL"),
    })
}

pub async fn create_event<'c>(
    db: impl sqlx::PgExecutor<'c>,
    name: &str,
    settings: EventSettings,
) -> Result<EventRow> {
    let to_i32 = |n: u32| i32::try_from(n).unwrap_or(i32::MAX);
    let queue = settings.queue;
    Ok(sqlx::query_as(concat!(
        "INSERT INTO events (id, name, total_seats, hold_seconds, max_per_buyer, queue_opens_at,
                             queue_admit_per_second, queue_admission_seconds, queue_seed)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) RETURNING ",
        event_columns!()
    ))
    .bind(Uuid::now_v7())
    .bind(name)
    .bind(settings.seats.get())
    .bind(to_i32(settings.hold_seconds))
    .bind(settings.max_per_buyer.map(to_i32))
    .bind(queue.and_then(|q| chrono::DateTime::from_timestamp_millis(q.opens_at_ms)))
    .bind(queue.map(|q| to_i32(q.admit_per_second)))
    .bind(queue.map(|q| to_i32(q.admission_seconds)))
    .bind(queue.map(|q| q.seed as i64))
    .fetch_one(db)
    .await?)
}

pub async fn event(pool: &PgPool, id: Uuid) -> Result<Option<EventRow>> {
    Ok(sqlx::query_as(concat!(
        "SELECT ",
        event_columns!(),
        " FROM events WHERE id = $1"
    ))
    .bind(id)
    .fetch_optional(pool)
    .await?)
}

/// Whether PostgreSQL has a row for `event`, read on `conn` (a recovery's lock).
pub async fn event_exists(conn: &mut PgConnection, event: Uuid) -> Result<bool> {
    Ok(sqlx::query("SELECT 1 FROM events WHERE id = $1")
        .bind(event)
        .fetch_optional(conn)
        .await?
        .is_some())
}

/// Every event, oldest first.
pub async fn events(pool: &PgPool) -> Result<Vec<EventRow>> {
    Ok(sqlx::query_as(concat!(
        "SELECT ",
        event_columns!(),
        " FROM events ORDER BY created_at, id"
    ))
    .fetch_all(pool)
    .await?)
}

/// One sale of `event`.
pub async fn purchase(pool: &PgPool, event: Uuid, id: Uuid) -> Result<Option<PurchaseRow>> {
    Ok(sqlx::query_as(
        "SELECT id, event_id, quantity, buyer, via_hold, sold_at, cancelled_at
         FROM purchases WHERE event_id = $1 AND id = $2",
    )
    .bind(event)
    .bind(id)
    .fetch_optional(pool)
    .await?)
}

/// The default event, which the seed-compatible endpoints sell from. It is recorded
/// in `default_event` once, by the first replica to start on an empty database
/// (which creates it with `name` and `seats`); every replica then reads the same one.
pub async fn default_event(pool: &PgPool, name: &str, seats: Seats) -> Result<EventRow> {
    let mut tx = pool.begin().await?;
    sqlx::query("SELECT pg_advisory_xact_lock($1)")
        .bind(DEFAULT_EVENT_LOCK)
        .execute(&mut *tx)
        .await?;
    let existing: Option<EventRow> = sqlx::query_as(
        "SELECT e.id, e.name, e.total_seats, e.hold_seconds, e.max_per_buyer, e.queue_opens_at,
                e.queue_admit_per_second, e.queue_admission_seconds, e.queue_seed
         FROM default_event d JOIN events e ON e.id = d.event_id",
    )
    .fetch_optional(&mut *tx)
    .await?;
    let event = match existing {
        Some(event) => event,
        None => {
            let event = create_event(&mut *tx, name, EventSettings::seats(seats)).await?;
            sqlx::query("INSERT INTO default_event (event_id) VALUES ($1)")
                .bind(event.id)
                .execute(&mut *tx)
                .await?;
            tracing::info!(event = %event.id, seats = seats.get(), "created the default event");
            event
        }
    };
    tx.commit().await?;
    Ok(event)
}

/// A sale recent enough that its idempotency record should still be in Redis.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct RecentSale {
    pub id: Uuid,
    pub idempotency_key: String,
    pub quantity: i16,
    /// Seats left right after this sale: as its 200 said, or for rows from before
    /// that was stored, recomputed from the order PostgreSQL has the sales in.
    pub seats_remaining: i64,
    /// Seconds until the record would have expired.
    pub ttl_left: i64,
}

/// Sales of `event` made within the last `ttl` seconds, newest first; sales made by
/// confirming a hold are left out (their key recorded the hold: see [`books`]).
pub async fn recent_sales<'c>(
    db: impl sqlx::PgExecutor<'c>,
    event: &EventRow,
    ttl: u32,
) -> Result<Vec<RecentSale>> {
    let sales = sqlx::query_as(
        "SELECT id, idempotency_key, quantity, seats_remaining,
                GREATEST(1, CEIL($3 - EXTRACT(EPOCH FROM now() - sold_at)))::int8 AS ttl_left
         FROM (SELECT id, idempotency_key, quantity, sold_at,
                      COALESCE(seats_remaining,
                               $2 - SUM(quantity) OVER (ORDER BY sold_at, id))::int8
                          AS seats_remaining, via_hold
               FROM purchases WHERE event_id = $1) AS running
         WHERE sold_at > now() - make_interval(secs => $3) AND NOT via_hold
         ORDER BY sold_at DESC, id DESC",
    )
    .bind(event.id)
    .bind(i64::from(event.total_seats))
    .bind(f64::from(ttl))
    .fetch_all(db)
    .await?;
    Ok(sales)
}

/// Writes a batch of sales of one event in one statement. Sales already written
/// (a redelivered stream entry) are skipped, so the write can be retried freely.
/// Returns how many rows were new.
pub async fn insert_sales<'c>(
    db: impl sqlx::PgExecutor<'c>,
    event: Uuid,
    sales: &[Entry],
) -> Result<u64> {
    let ids: Vec<Uuid> = sales.iter().map(|s| s.id).collect();
    let keys: Vec<&str> = sales.iter().map(|s| s.idempotency_key.as_str()).collect();
    let quantities: Vec<i16> = sales.iter().map(|s| s.quantity).collect();
    let remaining: Vec<Option<i32>> = sales.iter().map(|s| s.seats_remaining).collect();
    let sold_at: Vec<i64> = sales.iter().map(|s| s.sold_at_micros).collect();
    let buyers: Vec<Option<&str>> = sales.iter().map(|s| s.buyer.as_deref()).collect();
    let via_hold: Vec<bool> = sales.iter().map(|s| s.via_hold).collect();
    let done = sqlx::query(
        "INSERT INTO purchases
             (id, event_id, idempotency_key, quantity, seats_remaining, sold_at, buyer, via_hold)
         SELECT id, $1, key, quantity, remaining,
                timestamptz 'epoch' + micros * interval '1 microsecond', buyer, via_hold
         FROM UNNEST($2::uuid[], $3::text[], $4::int2[], $5::int4[], $6::int8[], $7::text[],
                     $8::bool[])
              AS s(id, key, quantity, remaining, micros, buyer, via_hold)
         ON CONFLICT (id) DO NOTHING",
    )
    .bind(event)
    .bind(&ids)
    .bind(&keys)
    .bind(&quantities)
    .bind(&remaining)
    .bind(&sold_at)
    .bind(&buyers)
    .bind(&via_hold)
    .execute(db)
    .await?;
    Ok(done.rows_affected())
}

/// Marks sales of `event` cancelled, each at its time; a row already marked keeps its
/// first time, so the write can be retried freely. Returns how many rows changed.
pub async fn cancel_sales<'c>(
    db: impl sqlx::PgExecutor<'c>,
    event: Uuid,
    cancels: &[Cancellation],
) -> Result<u64> {
    let ids: Vec<Uuid> = cancels.iter().map(|c| c.id).collect();
    let at: Vec<i64> = cancels.iter().map(|c| c.cancelled_at_micros).collect();
    let done = sqlx::query(
        "UPDATE purchases p
         SET cancelled_at = timestamptz 'epoch' + c.micros * interval '1 microsecond'
         FROM UNNEST($2::uuid[], $3::int8[]) AS c(id, micros)
         WHERE p.event_id = $1 AND p.id = c.id AND p.cancelled_at IS NULL",
    )
    .bind(event)
    .bind(&ids)
    .bind(&at)
    .execute(db)
    .await?;
    Ok(done.rows_affected())
}

/// Writes holds of one event as the gate made them; holds already written are
/// skipped. Returns how many rows were new.
pub async fn insert_holds<'c>(
    db: impl sqlx::PgExecutor<'c>,
    event: Uuid,
    holds: &[HoldMade],
) -> Result<u64> {
    let ids: Vec<Uuid> = holds.iter().map(|h| h.id).collect();
    let keys: Vec<&str> = holds.iter().map(|h| h.idempotency_key.as_str()).collect();
    let quantities: Vec<i16> = holds.iter().map(|h| h.quantity).collect();
    let buyers: Vec<Option<&str>> = holds.iter().map(|h| h.buyer.as_deref()).collect();
    let remaining: Vec<i32> = holds.iter().map(|h| h.seats_remaining).collect();
    let held_at: Vec<i64> = holds.iter().map(|h| h.held_at_micros).collect();
    let expires_at: Vec<i64> = holds.iter().map(|h| h.expires_at_ms).collect();
    let done = sqlx::query(
        "INSERT INTO holds
             (id, event_id, idempotency_key, quantity, buyer, seats_remaining, held_at, expires_at)
         SELECT id, $1, key, quantity, buyer, remaining,
                timestamptz 'epoch' + held * interval '1 microsecond',
                timestamptz 'epoch' + expires * interval '1 millisecond'
         FROM UNNEST($2::uuid[], $3::text[], $4::int2[], $5::text[], $6::int4[], $7::int8[],
                     $8::int8[])
              AS h(id, key, quantity, buyer, remaining, held, expires)
         ON CONFLICT (id) DO NOTHING",
    )
    .bind(event)
    .bind(&ids)
    .bind(&keys)
    .bind(&quantities)
    .bind(&buyers)
    .bind(&remaining)
    .bind(&held_at)
    .bind(&expires_at)
    .execute(db)
    .await?;
    Ok(done.rows_affected())
}

/// Marks holds of `event` released, each at its time; a hold already marked keeps
/// its first time. Returns how many rows changed. (Write the holds a release carries
/// first: its hold's own entry may come later, through another consumer.)
pub async fn release_holds<'c>(
    db: impl sqlx::PgExecutor<'c>,
    event: Uuid,
    releases: &[HoldReleased],
) -> Result<u64> {
    let ids: Vec<Uuid> = releases.iter().map(|r| r.id).collect();
    let at: Vec<i64> = releases.iter().map(|r| r.released_at_micros).collect();
    let done = sqlx::query(
        "UPDATE holds h
         SET released_at = timestamptz 'epoch' + r.micros * interval '1 microsecond'
         FROM UNNEST($2::uuid[], $3::int8[]) AS r(id, micros)
         WHERE h.event_id = $1 AND h.id = r.id AND h.released_at IS NULL",
    )
    .bind(event)
    .bind(&ids)
    .bind(&at)
    .execute(db)
    .await?;
    Ok(done.rows_affected())
}

/// Most hold rows one prune statement deletes, so that it never holds locks for long.
pub const PRUNE_BATCH: u64 = 10_000;

/// Deletes up to [`PRUNE_BATCH`] holds that expired more than `retention` ago:
/// nothing can ask for them any more (their idempotency record and hash lived that
/// long in Redis; a confirmed one's sale is in `purchases`). Returns how many went.
pub async fn prune_holds(pool: &PgPool, retention: Duration) -> Result<u64> {
    let done = sqlx::query(
        "DELETE FROM holds WHERE id IN (
             SELECT id FROM holds WHERE expires_at < now() - make_interval(secs => $1)
             LIMIT $2 FOR UPDATE SKIP LOCKED)",
    )
    .bind(retention.as_secs_f64())
    .bind(PRUNE_BATCH as i64)
    .execute(pool)
    .await?;
    Ok(done.rows_affected())
}

/// Marks holds of `event` released at `at_micros` (writing them first if PostgreSQL
/// lacks them): holds a recovery ended because their seats are sold (see
/// `recovery::ledger`), so that no later recovery brings them back.
pub async fn end_holds(
    tx: &mut PgConnection,
    event: Uuid,
    holds: &[HoldMade],
    at_micros: i64,
) -> Result<()> {
    insert_holds(&mut *tx, event, holds).await?;
    let releases: Vec<HoldReleased> = holds
        .iter()
        .map(|h| HoldReleased {
            id: h.id,
            quantity: h.quantity,
            released_at_micros: at_micros,
            buyer: h.buyer.clone(),
            hold: None,
        })
        .collect();
    release_holds(&mut *tx, event, &releases).await?;
    Ok(())
}

/// The advisory lock that orders the writes of an event's log to PostgreSQL
/// against its recoveries (`persist` takes it shared for each batch, `recovery`
/// exclusively while it reads and rebuilds): a key derived from the event id.
pub fn event_lock(event: Uuid) -> i64 {
    let (high, low) = event.as_u64_pair();
    (high ^ low) as i64
}

/// Takes the shared lock of [`event_lock`] in `tx`, until it ends.
pub async fn lock_event_shared(tx: &mut PgConnection, event: Uuid) -> Result<()> {
    sqlx::query("SELECT pg_advisory_xact_lock_shared($1)")
        .bind(event_lock(event))
        .execute(tx)
        .await?;
    Ok(())
}

/// Whether `e` is PostgreSQL giving up on a lock after `lock_timeout` (SQLSTATE 55P03).
pub fn lock_not_available(e: &Error) -> bool {
    matches!(e, Error::Db(sqlx::Error::Database(e)) if e.code().as_deref() == Some("55P03"))
}

/// Takes the exclusive lock of [`event_lock`] in `tx`, until it ends: it waits for
/// every batch being written for the event, and holds off the next ones.
pub async fn lock_event(tx: &mut PgConnection, event: Uuid) -> Result<()> {
    sqlx::query("SELECT pg_advisory_xact_lock($1)")
        .bind(event_lock(event))
        .execute(tx)
        .await?;
    Ok(())
}

/// What PostgreSQL holds of one event, read in one snapshot (see [`books`]).
#[derive(Debug, Clone, Default)]
pub struct Books {
    /// Seats of sales that are not cancelled.
    pub sold: i64,
    /// The same per buyer (buyers with none left out).
    pub buyers: Vec<(String, i64)>,
    /// Those of the sale ids asked about that are rows.
    pub written: Vec<Uuid>,
    /// Those of the cancelled ids asked about whose rows are marked cancelled.
    pub cancelled: Vec<Uuid>,
    /// Holds recent enough to matter (see [`books`]), with how each ended.
    pub holds: Vec<HoldRow>,
    /// Sales whose idempotency record should still be in Redis.
    pub recent_sales: Vec<RecentSale>,
    /// Sales cancelled within the TTL: (purchase id, when, Unix µs, seconds left).
    pub recent_cancellations: Vec<(Uuid, i64, i64)>,
    /// PostgreSQL's clock (Unix ms), a floor for Redis' when judging expiries.
    pub now_ms: i64,
}

/// A hold as PostgreSQL has it.
#[derive(Debug, Clone, PartialEq, Eq, FromRow)]
pub struct HoldRow {
    pub id: Uuid,
    pub idempotency_key: String,
    pub quantity: i16,
    pub buyer: Option<String>,
    pub seats_remaining: i32,
    pub held_at_micros: i64,
    pub expires_at_ms: i64,
    pub released_at_micros: Option<i64>,
    /// Whether `purchases` has its sale (it was confirmed).
    pub confirmed: bool,
    /// That sale: seats left after it, and when (Unix µs).
    pub sale_seats_remaining: Option<i32>,
    pub sold_at_micros: Option<i64>,
}

/// Everything recovery needs of `event` from PostgreSQL, read on `tx` while it holds
/// the event's lock ([`lock_event`]): no batch of the event's log is written
/// meanwhile, so the statements agree with one another: sales and per-buyer seats, which of the log's `sales` and `cancellations`
/// are written already, the holds whose record or hash Redis keeps (expired less
/// than `ttl` ago, or named in `holds`), and the sales and cancellations of the last
/// `ttl`.
pub async fn books(
    tx: &mut PgConnection,
    event: &EventRow,
    ttl: u32,
    sales: &[Uuid],
    cancellations: &[Uuid],
    holds: &[Uuid],
) -> Result<Books> {
    let (sold, written, cancelled, now_ms): (i64, Vec<Uuid>, Vec<Uuid>, i64) = sqlx::query_as(
        "SELECT COALESCE(SUM(quantity) FILTER (WHERE cancelled_at IS NULL), 0)::int8,
                COALESCE(array_agg(id) FILTER (WHERE id = ANY($2)), '{}'),
                COALESCE(array_agg(id) FILTER (WHERE id = ANY($3) AND cancelled_at IS NOT NULL),
                         '{}'),
                (EXTRACT(EPOCH FROM clock_timestamp()) * 1000)::int8
         FROM purchases WHERE event_id = $1",
    )
    .bind(event.id)
    .bind(sales)
    .bind(cancellations)
    .fetch_one(&mut *tx)
    .await?;
    let buyers = if event.max_per_buyer.is_some() {
        sqlx::query_as(
            "SELECT buyer, SUM(quantity)::int8 FROM purchases
             WHERE event_id = $1 AND buyer IS NOT NULL AND cancelled_at IS NULL
             GROUP BY buyer",
        )
        .bind(event.id)
        .fetch_all(&mut *tx)
        .await?
    } else {
        Vec::new()
    };
    let micros = |column: &str| format!("(EXTRACT(EPOCH FROM {column}) * 1000000)::int8");
    let hold_rows = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT h.id, h.idempotency_key, h.quantity, h.buyer, h.seats_remaining,
                {} AS held_at_micros,
                (EXTRACT(EPOCH FROM h.expires_at) * 1000)::int8 AS expires_at_ms,
                {} AS released_at_micros,
                p.id IS NOT NULL AS confirmed,
                p.seats_remaining AS sale_seats_remaining,
                {} AS sold_at_micros
         FROM holds h LEFT JOIN purchases p ON p.id = h.id AND p.event_id = h.event_id
         WHERE h.event_id = $1
           AND (h.expires_at > now() - make_interval(secs => $2) OR h.id = ANY($3))",
        micros("h.held_at"),
        micros("h.released_at"),
        micros("p.sold_at"),
    )))
    .bind(event.id)
    .bind(f64::from(ttl))
    .bind(holds)
    .fetch_all(&mut *tx)
    .await?;
    let recent_sales = recent_sales(&mut *tx, event, ttl).await?;
    let recent_cancellations = sqlx::query_as(
        "SELECT id, (EXTRACT(EPOCH FROM cancelled_at) * 1000000)::int8,
                GREATEST(1, CEIL($2 - EXTRACT(EPOCH FROM now() - cancelled_at)))::int8
         FROM purchases
         WHERE event_id = $1 AND cancelled_at > now() - make_interval(secs => $2)",
    )
    .bind(event.id)
    .bind(f64::from(ttl))
    .fetch_all(&mut *tx)
    .await?;
    Ok(Books {
        sold,
        buyers,
        written,
        cancelled,
        holds: hold_rows,
        recent_sales,
        recent_cancellations,
        now_ms,
    })
}

/// SQLSTATE of a row that references one that is not there (a sale of an event
/// PostgreSQL has no row for).
pub const FOREIGN_KEY_VIOLATION: &str = "23503";

/// The SQLSTATE of an error by which PostgreSQL refused a write because of what was
/// written, so that writing it again can never succeed: class 22 (data exception,
/// e.g. a value out of range) or 23 (integrity constraint violation, e.g. a sale of
/// an event it does not have). `None` for anything else (connection lost, server
/// shutting down), which may pass next time.
pub fn refused_for_good(e: &Error) -> Option<String> {
    match e {
        Error::Db(sqlx::Error::Database(e)) => e
            .code()
            .filter(|code| code.starts_with("22") || code.starts_with("23"))
            .map(|code| code.into_owned()),
        _ => None,
    }
}
