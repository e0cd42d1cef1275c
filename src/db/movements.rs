//! Seat movements as the stream consumer writes them: holds, sales, releases and
//! cancellations of any number of events, in one transaction.

use sqlx::PgConnection;
use uuid::Uuid;

use super::{cancel_sales, insert_holds, insert_sales, release_holds};
use crate::error::Result;
use crate::records::Logged;

/// Writes seat movements, each of its event, in `tx`, in the order they depend on
/// each other: a hold before its sale or release, a sale before its cancellation
/// (one batch may carry both). Every write is idempotent: an entry delivered again
/// changes nothing. Returns how many sales were new rows.
pub async fn write_movements(tx: &mut PgConnection, entries: &[(Uuid, &Logged)]) -> Result<u64> {
    let (mut holds, mut sales, mut releases, mut cancels) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for (event, logged) in entries {
        match logged {
            Logged::Hold(hold) => holds.push((*event, hold)),
            Logged::Sale(sale) => sales.push((*event, sale)),
            Logged::Release(release) => releases.push((*event, release)),
            Logged::Cancel(cancel) => cancels.push((*event, cancel)),
        }
    }
    // The holds that releases and confirmations carry too: a hold's own entry may
    // come later, through another consumer, or be lost with Redis' data.
    let carried = releases
        .iter()
        .filter_map(|(e, r)| Some((*e, r.hold.as_ref()?)));
    let confirmed = sales
        .iter()
        .filter_map(|(e, s)| Some((*e, s.hold.as_ref()?)));
    holds.extend(carried.chain(confirmed).collect::<Vec<_>>());
    // Rows in one order in every transaction: two consumers writing the same rows
    // (one took the other's entries over) wait for each other, never deadlock.
    holds.sort_by_key(|(_, hold)| hold.id);
    holds.dedup_by_key(|(_, hold)| hold.id);
    sales.sort_by_key(|(_, sale)| sale.id);
    releases.sort_by_key(|(_, release)| release.id);
    cancels.sort_by_key(|(_, cancel)| cancel.id);
    if !holds.is_empty() {
        insert_holds(&mut *tx, &holds).await?;
    }
    let written = if sales.is_empty() {
        0
    } else {
        insert_sales(&mut *tx, &sales).await?
    };
    if !releases.is_empty() {
        release_holds(&mut *tx, &releases).await?;
    }
    if !cancels.is_empty() {
        cancel_sales(&mut *tx, &cancels).await?;
    }
    Ok(written)
}
