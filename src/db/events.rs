//! The `events` table.

use sqlx::postgres::PgPool;
use sqlx::{FromRow, PgConnection};
use uuid::Uuid;

use crate::domain::Seats;
use crate::error::Result;

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

/// Up to `limit` events in creation order, after the event `after` (none: from the
/// first; an id of no event: none).
pub async fn events_page(pool: &PgPool, after: Option<Uuid>, limit: i64) -> Result<Vec<EventRow>> {
    Ok(sqlx::query_as(concat!(
        "SELECT ",
        event_columns!(),
        " FROM events
         WHERE $1::uuid IS NULL
            OR (created_at, id) > (SELECT created_at, id FROM events WHERE id = $1)
         ORDER BY created_at, id LIMIT $2"
    ))
    .bind(after)
    .bind(limit)
    .fetch_all(pool)
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
