//! What a recovery reads of an event: its sales, cancellations and holds.

use sqlx::{FromRow, PgConnection};
use uuid::Uuid;

use super::{EventRow, RecentSale, recent_sales};
use crate::error::Result;
use crate::records::HoldMade;

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
    /// The hold as its log entry tells of it.
    #[sqlx(flatten)]
    pub made: HoldMade,
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
        buyer_seats(tx, event.id).await?
    } else {
        Vec::new()
    };
    let hold_rows = hold_rows(tx, event.id, ttl, holds).await?;
    let recent_sales = recent_sales(&mut *tx, event, ttl).await?;
    let recent_cancellations = recent_cancellations(tx, event.id, ttl).await?;
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

/// Seats sold per buyer, cancellations deducted.
async fn buyer_seats(tx: &mut PgConnection, event: Uuid) -> Result<Vec<(String, i64)>> {
    Ok(sqlx::query_as(
        "SELECT buyer, SUM(quantity)::int8 FROM purchases
         WHERE event_id = $1 AND buyer IS NOT NULL AND cancelled_at IS NULL
         GROUP BY buyer",
    )
    .bind(event)
    .fetch_all(&mut *tx)
    .await?)
}

/// The holds that expired less than the TTL ago (their keys may still be retried),
/// and those of `holds` (named by the log), with how each ended.
async fn hold_rows(
    tx: &mut PgConnection,
    event: Uuid,
    ttl: u32,
    holds: &[Uuid],
) -> Result<Vec<HoldRow>> {
    let micros = |column: &str| format!("(EXTRACT(EPOCH FROM {column}) * 1000000)::int8");
    Ok(sqlx::query_as(sqlx::AssertSqlSafe(format!(
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
    .bind(event)
    .bind(f64::from(ttl))
    .bind(holds)
    .fetch_all(&mut *tx)
    .await?)
}

/// Cancellations within the TTL: (purchase id, when in Unix µs, seconds left).
async fn recent_cancellations(
    tx: &mut PgConnection,
    event: Uuid,
    ttl: u32,
) -> Result<Vec<(Uuid, i64, i64)>> {
    Ok(sqlx::query_as(
        "SELECT id, (EXTRACT(EPOCH FROM cancelled_at) * 1000000)::int8,
                GREATEST(1, CEIL($2 - EXTRACT(EPOCH FROM now() - cancelled_at)))::int8
         FROM purchases
         WHERE event_id = $1 AND cancelled_at > now() - make_interval(secs => $2)",
    )
    .bind(event)
    .bind(f64::from(ttl))
    .fetch_all(&mut *tx)
    .await?)
}
