//! The `purchases` table: sales, as the consumer writes them, and their cancellations.

use sqlx::FromRow;
use sqlx::postgres::PgPool;
use uuid::Uuid;

use super::EventRow;
use crate::error::Result;
use crate::records::{Cancellation, Entry};

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

/// Writes a batch of sales, each with its event, in one statement. Sales already
/// written (a redelivered stream entry) are skipped, so the write can be retried
/// freely. Returns how many rows were new.
pub async fn insert_sales<'c>(
    db: impl sqlx::PgExecutor<'c>,
    sales: &[(Uuid, &Entry)],
) -> Result<u64> {
    let events: Vec<Uuid> = sales.iter().map(|(event, _)| *event).collect();
    let ids: Vec<Uuid> = sales.iter().map(|(_, s)| s.id).collect();
    let keys: Vec<&str> = sales
        .iter()
        .map(|(_, s)| s.idempotency_key.as_str())
        .collect();
    let quantities: Vec<i16> = sales.iter().map(|(_, s)| s.quantity).collect();
    let remaining: Vec<Option<i32>> = sales.iter().map(|(_, s)| s.seats_remaining).collect();
    let sold_at: Vec<i64> = sales.iter().map(|(_, s)| s.sold_at_micros).collect();
    let buyers: Vec<Option<&str>> = sales.iter().map(|(_, s)| s.buyer.as_deref()).collect();
    let via_hold: Vec<bool> = sales.iter().map(|(_, s)| s.via_hold).collect();
    let done = sqlx::query(
        "INSERT INTO purchases
             (id, event_id, idempotency_key, quantity, seats_remaining, sold_at, buyer, via_hold)
         SELECT id, event, key, quantity, remaining,
                timestamptz 'epoch' + micros * interval '1 microsecond', buyer, via_hold
         FROM UNNEST($1::uuid[], $2::uuid[], $3::text[], $4::int2[], $5::int4[], $6::int8[],
                     $7::text[], $8::bool[])
              AS s(event, id, key, quantity, remaining, micros, buyer, via_hold)
         ON CONFLICT (id) DO NOTHING",
    )
    .bind(&events)
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

/// Marks sales cancelled, each of its event at its time; a row already marked keeps
/// its first time, so the write can be retried freely. Returns how many rows changed.
pub async fn cancel_sales<'c>(
    db: impl sqlx::PgExecutor<'c>,
    cancels: &[(Uuid, &Cancellation)],
) -> Result<u64> {
    let marks = cancels
        .iter()
        .map(|(event, c)| (*event, c.id, c.cancelled_at_micros));
    super::mark_once(db, "purchases", "cancelled_at", marks).await
}
