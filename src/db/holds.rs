//! The `holds` table: holds made and ended, kept as long as a recovery may need them.

use std::time::Duration;

use sqlx::PgConnection;
use sqlx::postgres::PgPool;
use uuid::Uuid;

use crate::error::Result;
use crate::records::{HoldMade, HoldReleased};

/// Writes holds, each with its event, as the gate made them; holds already written
/// are skipped. Returns how many rows were new.
pub async fn insert_holds<'c>(
    db: impl sqlx::PgExecutor<'c>,
    holds: &[(Uuid, &HoldMade)],
) -> Result<u64> {
    let events: Vec<Uuid> = holds.iter().map(|(event, _)| *event).collect();
    let ids: Vec<Uuid> = holds.iter().map(|(_, h)| h.id).collect();
    let keys: Vec<&str> = holds
        .iter()
        .map(|(_, h)| h.idempotency_key.as_str())
        .collect();
    let quantities: Vec<i16> = holds.iter().map(|(_, h)| h.quantity).collect();
    let buyers: Vec<Option<&str>> = holds.iter().map(|(_, h)| h.buyer.as_deref()).collect();
    let remaining: Vec<i32> = holds.iter().map(|(_, h)| h.seats_remaining).collect();
    let held_at: Vec<i64> = holds.iter().map(|(_, h)| h.held_at_micros).collect();
    let expires_at: Vec<i64> = holds.iter().map(|(_, h)| h.expires_at_ms).collect();
    let done = sqlx::query(
        "INSERT INTO holds
             (id, event_id, idempotency_key, quantity, buyer, seats_remaining, held_at, expires_at)
         SELECT id, event, key, quantity, buyer, remaining,
                timestamptz 'epoch' + held * interval '1 microsecond',
                timestamptz 'epoch' + expires * interval '1 millisecond'
         FROM UNNEST($1::uuid[], $2::uuid[], $3::text[], $4::int2[], $5::text[], $6::int4[],
                     $7::int8[], $8::int8[])
              AS h(event, id, key, quantity, buyer, remaining, held, expires)
         ON CONFLICT (id) DO NOTHING",
    )
    .bind(&events)
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

/// Marks holds released, each of its event at its time; a hold already marked keeps
/// its first time. Returns how many rows changed. (Write the holds a release carries
/// first: its hold's own entry may come later, through another consumer.)
pub async fn release_holds<'c>(
    db: impl sqlx::PgExecutor<'c>,
    releases: &[(Uuid, &HoldReleased)],
) -> Result<u64> {
    let marks = releases
        .iter()
        .map(|(event, r)| (*event, r.id, r.released_at_micros));
    super::mark_once(db, "holds", "released_at", marks).await
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
    let made: Vec<(Uuid, &HoldMade)> = holds.iter().map(|hold| (event, hold)).collect();
    insert_holds(&mut *tx, &made).await?;
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
    let released: Vec<(Uuid, &HoldReleased)> = releases.iter().map(|r| (event, r)).collect();
    release_holds(&mut *tx, &released).await?;
    Ok(())
}
