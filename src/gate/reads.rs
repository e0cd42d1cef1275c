//! Reads that need no script: an event's counters (recovering it first when it is
//! not checked), a hold as Redis has it, a sale still on its way to PostgreSQL.

use redis::AsyncCommands;
use redis::streams::StreamRangeReply;
use uuid::Uuid;

use super::Gate;
use super::outcome::{HoldState, HoldView, Inventory};
use super::script::{server_changed, unexpected};
use crate::error::{Error, Result};
use crate::records::{Entry, Logged};
use crate::store::Redis;

/// Most stream entries [`Gate::unrecorded_sale`] reads.
const STREAM_LOOKUP: usize = 1_000;

impl Gate {
    /// The request key a hold was made with, as its hash has it ('' without one).
    pub(super) async fn hold_request_key(&self, event: Uuid, hold: Uuid) -> Result<String> {
        let key: Option<String> = self
            .seller
            .conn
            .clone()
            .hget(self.keys().hold(event, hold), "k")
            .await?;
        Ok(key.unwrap_or_default())
    }

    /// A sale still in `event`'s stream on its way to PostgreSQL (moments, unless
    /// PostgreSQL is down), found among the entries written from a minute before its
    /// id's time on (a purchase id is a UUID v7 made just before the sale; a hold's,
    /// before its confirmation). Looks at most [`STREAM_LOOKUP`] entries.
    pub async fn unrecorded_sale(&self, event: Uuid, purchase: Uuid) -> Result<Option<Entry>> {
        let Some((secs, _)) = purchase.get_timestamp().map(|t| t.to_unix()) else {
            return Ok(None);
        };
        let from_ms = (secs * 1000).saturating_sub(60_000);
        let page: StreamRangeReply = self
            .seller
            .conn
            .clone()
            .xrange_count(self.keys().stream(event), from_ms, "+", STREAM_LOOKUP)
            .await?;
        Ok(page
            .ids
            .iter()
            .find_map(|entry| match Logged::from_stream(entry) {
                Some(Logged::Sale(sale)) if sale.id == purchase => Some(sale),
                _ => None,
            }))
    }

    /// A hold as Redis has it once the event is checked on this server; `None` if it
    /// has no such hold (never made, forgotten after its retention, or lost with
    /// Redis' data before it reached PostgreSQL).
    pub async fn hold_state(&self, event: Uuid, hold_id: Uuid) -> Result<Option<HoldView>> {
        // Before a recovery, the hash may be from an older point in time.
        self.inventory(event).await?;
        let hold = self.keys().hold(event, hold_id);
        let mut pipe = redis::pipe();
        pipe.cmd("HMGET").arg(&hold).arg(&["s", "q", "c", "x", "e"]);
        Redis::time_of(&mut pipe, &hold);
        let (fields, (secs, micros)): (Vec<Option<String>>, (i64, i64)) =
            pipe.query_async(&mut self.seller.conn.clone()).await?;
        let now_ms = secs * 1000 + micros / 1000;
        let [
            Some(state),
            Some(quantity),
            Some(created),
            Some(expires),
            ended,
        ] = &fields[..]
        else {
            return Ok(None);
        };
        let bad = || unexpected("hold", &format!("{fields:?}"));
        let number = |s: &str| s.parse::<i64>().map_err(|_| bad());
        let expires_at_ms = number(expires)?;
        let mut state = HoldState::parse(state).ok_or_else(bad)?;
        let mut ended_at_ms = ended.as_deref().map(number).transpose()?;
        // A sweep returns a hold's seats without writing its hash (see the script).
        if state == HoldState::Held && now_ms >= expires_at_ms {
            state = HoldState::Expired;
            ended_at_ms = Some(expires_at_ms);
        }
        Ok(Some(HoldView {
            hold_id,
            state,
            quantity: quantity.parse().map_err(|_| bad())?,
            created_at_ms: number(created)?,
            expires_at_ms,
            ended_at_ms,
            purchase_id: (state == HoldState::Confirmed).then_some(hold_id),
        }))
    }

    /// Seat counters of `event`, bringing it back first when Redis lacks it or has
    /// not had it checked (its counters could be behind).
    pub async fn inventory(&self, event: Uuid) -> Result<Inventory> {
        if let Some(inventory) = self.recovery.counters(event).await? {
            return Ok(inventory);
        }
        self.recovery.ensure(event).await?;
        self.recovery
            .counters(event)
            .await?
            .ok_or_else(|| Error::RecoveryPending(server_changed()))
    }
}
