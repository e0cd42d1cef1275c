//! PostgreSQL: connecting (creating the database when missing), migrations, and the
//! few queries the service runs. Runtime-checked queries, so a build needs no database.

use std::time::Duration;

use sqlx::migrate::MigrateDatabase;
use sqlx::postgres::{PgPool, PgPoolOptions};
use sqlx::{FromRow, Postgres};
use uuid::Uuid;

use crate::error::{Error, Result, redact_url};

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
}

/// One sale on its way from the stream to `purchases`.
#[derive(Debug, Clone, PartialEq)]
pub struct Sale {
    pub id: Uuid,
    pub idempotency_key: String,
    pub quantity: i16,
    /// Microseconds since the Unix epoch, from Redis' clock.
    pub sold_at_micros: i64,
}

/// Connects to PostgreSQL, creating the database if it does not exist, and migrates it.
pub async fn connect(url: &str, pool_size: u32) -> Result<PgPool> {
    let unreachable = |e: sqlx::Error| {
        Error::Startup(format!(
            "cannot reach PostgreSQL at {} ({e}); start it or set DATABASE_URL",
            redact_url(url)
        ))
    };
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

pub async fn create_event(pool: &PgPool, name: &str, total_seats: i32) -> Result<EventRow> {
    let row = sqlx::query_as(
        "INSERT INTO events (id, name, total_seats) VALUES ($1, $2, $3)
         RETURNING id, name, total_seats",
    )
    .bind(Uuid::now_v7())
    .bind(name)
    .bind(total_seats)
    .fetch_one(pool)
    .await?;
    Ok(row)
}

pub async fn event(pool: &PgPool, id: Uuid) -> Result<Option<EventRow>> {
    Ok(
        sqlx::query_as("SELECT id, name, total_seats FROM events WHERE id = $1")
            .bind(id)
            .fetch_optional(pool)
            .await?,
    )
}

/// Every event, oldest first.
pub async fn events(pool: &PgPool) -> Result<Vec<EventRow>> {
    Ok(
        sqlx::query_as("SELECT id, name, total_seats FROM events ORDER BY created_at, id")
            .fetch_all(pool)
            .await?,
    )
}

/// The default event, which the seed-compatible endpoints sell from: the oldest
/// event, created with `name` and `seats` when there is none.
pub async fn default_event(pool: &PgPool, name: &str, seats: i32) -> Result<EventRow> {
    let mut tx = pool.begin().await?;
    sqlx::query("SELECT pg_advisory_xact_lock($1)")
        .bind(DEFAULT_EVENT_LOCK)
        .execute(&mut *tx)
        .await?;
    let existing: Option<EventRow> =
        sqlx::query_as("SELECT id, name, total_seats FROM events ORDER BY created_at, id LIMIT 1")
            .fetch_optional(&mut *tx)
            .await?;
    let event = match existing {
        Some(event) => event,
        None => {
            let event: EventRow = sqlx::query_as(
                "INSERT INTO events (id, name, total_seats) VALUES ($1, $2, $3)
                 RETURNING id, name, total_seats",
            )
            .bind(Uuid::now_v7())
            .bind(name)
            .bind(seats)
            .fetch_one(&mut *tx)
            .await?;
            tracing::info!(event = %event.id, seats, "created the default event");
            event
        }
    };
    tx.commit().await?;
    Ok(event)
}

/// Seats of `event` that PostgreSQL has recorded as sold.
pub async fn seats_sold(pool: &PgPool, event: Uuid) -> Result<i64> {
    let (sold,): (i64,) = sqlx::query_as(
        "SELECT COALESCE(SUM(quantity), 0)::int8 FROM purchases WHERE event_id = $1",
    )
    .bind(event)
    .fetch_one(pool)
    .await?;
    Ok(sold)
}

/// Which of `ids` are already rows of `purchases`.
pub async fn existing_purchases(pool: &PgPool, ids: &[Uuid]) -> Result<Vec<Uuid>> {
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    let rows: Vec<(Uuid,)> = sqlx::query_as("SELECT id FROM purchases WHERE id = ANY($1)")
        .bind(ids)
        .fetch_all(pool)
        .await?;
    Ok(rows.into_iter().map(|(id,)| id).collect())
}

/// Writes a batch of sales of one event in one statement. Sales already written
/// (a redelivered stream entry) are skipped, so the write can be retried freely.
/// Returns how many rows were new.
pub async fn insert_sales(pool: &PgPool, event: Uuid, sales: &[Sale]) -> Result<u64> {
    let ids: Vec<Uuid> = sales.iter().map(|s| s.id).collect();
    let keys: Vec<&str> = sales.iter().map(|s| s.idempotency_key.as_str()).collect();
    let quantities: Vec<i16> = sales.iter().map(|s| s.quantity).collect();
    let sold_at: Vec<i64> = sales.iter().map(|s| s.sold_at_micros).collect();
    let done = sqlx::query(
        "INSERT INTO purchases (id, event_id, idempotency_key, quantity, sold_at)
         SELECT id, $1, key, quantity, timestamptz 'epoch' + micros * interval '1 microsecond'
         FROM UNNEST($2::uuid[], $3::text[], $4::int2[], $5::int8[]) AS s(id, key, quantity, micros)
         ON CONFLICT (id) DO NOTHING",
    )
    .bind(event)
    .bind(&ids)
    .bind(&keys)
    .bind(&quantities)
    .bind(&sold_at)
    .execute(pool)
    .await?;
    Ok(done.rows_affected())
}
