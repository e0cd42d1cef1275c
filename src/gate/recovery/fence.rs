//! The Redis side of an attempt (steps 1 and 4 of the module docs): taking an event
//! off sale under a token, and back on sale only while that token still holds it.

use redis::AsyncCommands;
use uuid::Uuid;

use super::ledger::Rebuilt;
use super::{Begun, Mode, Recovery};
use crate::db::EventRow;
use crate::error::Result;
use crate::keys::CONSUMER_GROUP;
use crate::keys::Keys;

impl Recovery {
    /// Step 1: takes the event off sale; `None` when it is on sale on this server
    /// and `mode` lets it be.
    pub(super) async fn begin(&self, event: &EventRow, mode: Mode) -> Result<Option<Begun>> {
        let mut begin = self.begin.key(self.keys.inventory(event.id));
        begin
            .key(self.keys.stream(event.id))
            .key(self.keys.queue(event.id))
            .arg(event.total_seats)
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
        let (state, run, token, created): (String, String, String, i64) =
            begin.invoke_async(&mut self.conn.clone()).await?;
        Ok((state != "checked").then_some(Begun {
            run,
            token,
            created: created == 1,
        }))
    }

    /// Step 4: puts the event on sale with `rebuilt`'s counters and the sets of
    /// `attempt`; returns `sold` and `held` as they were, or `None` when the attempt
    /// must begin again.
    pub(super) async fn end(
        &self,
        event: Uuid,
        begun: &Begun,
        rebuilt: &Rebuilt,
        attempt: &str,
    ) -> Result<Option<(i64, i64)>> {
        let (state, sold, held): (String, i64, i64) = self
            .end
            .key(self.keys.inventory(event))
            .key(self.keys.holds(event))
            .key(self.keys.buyers(event))
            .key(self.keys.rebuild(event, attempt, "holds"))
            .key(self.keys.rebuild(event, attempt, "buyers"))
            .arg(&begun.token)
            .arg(&begun.run)
            .arg(rebuilt.sold())
            .arg(rebuilt.held)
            .arg(rebuilt.live_holds().count())
            .arg(rebuilt.buyers.len())
            .invoke_async(&mut self.conn.clone())
            .await?;
        Ok((state == "checked").then_some((sold, held)))
    }

    /// Whether the attempt `begun` still owns the event: its token in place, on the
    /// same server.
    pub(super) async fn still_owns(&self, event: Uuid, begun: &Begun) -> Result<bool> {
        let mut conn = self.conn.clone();
        let inventory = self.keys.inventory(event);
        let fence: Option<String> = conn.hget(&inventory, "fence").await?;
        Ok(fence.as_deref() == Some(begun.token.as_str())
            && conn.run_id_of(&inventory).await? == begun.run)
    }
}

/// Takes `event` off sale on this Redis server, as if it had not been checked: its
/// next request runs the recovery (which answers `EventNotFound` when PostgreSQL
/// has no row for it). The token of a recovery under way goes too, so that an
/// attempt that began while the row was there cannot put the event back on sale.
pub async fn take_off_sale(
    conn: &mut impl redis::aio::ConnectionLike,
    keys: &Keys,
    event: Uuid,
) -> Result<()> {
    let _: i64 = redis::cmd("HDEL")
        .arg(keys.inventory(event))
        .arg("run")
        .arg("fence")
        .query_async(conn)
        .await?;
    Ok(())
}
