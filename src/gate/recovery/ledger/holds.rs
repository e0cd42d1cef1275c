//! Holds, all sources merged: made (a row, the log's entry, or the copy a release or
//! confirmation carries) and ended (confirmed, released, expired, or voided by a
//! recovery so that they fit).

use std::collections::HashMap;

use uuid::Uuid;

use super::Log;
use crate::db::{Books, HoldRow};
use crate::gate::retention::Retention;
use crate::records::{HoldMade, Logged, Record};

/// How a hold stands, all sources merged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HoldEnd {
    /// Still holds its seats (until its expiry).
    Live,
    /// Sold: seats left after the sale, and when (Unix µs).
    Confirmed {
        seats_remaining: i64,
        sold_at_micros: i64,
    },
    Released {
        at_micros: i64,
    },
    /// Neither confirmed nor released by its expiry.
    Expired,
    /// Live by the books, but its seats are not there (sales fill the event): ended
    /// by the recovery at `at_ms` so that `sold + held <= total` holds.
    Voided {
        at_ms: i64,
    },
}

/// A hold as recovery writes it back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RebuiltHold {
    pub id: Uuid,
    pub idempotency_key: String,
    pub quantity: u8,
    pub buyer: Option<String>,
    pub seats_remaining: i64,
    pub held_at_ms: i64,
    pub expires_at_ms: i64,
    pub end: HoldEnd,
}

impl RebuiltHold {
    /// Its member in the event's set of live holds (`Keys::holds`).
    pub fn member(&self) -> String {
        format!(
            "{}:{}:{}",
            self.id.simple(),
            self.quantity,
            self.buyer.as_deref().unwrap_or("")
        )
    }

    /// Unix ms until which its hash and its request's record are kept: the
    /// idempotency TTL after its sale, else the ended-hold TTL after it was released
    /// or voided, or after its expiry (`kept_until` in `lua/purchase.lua`).
    pub fn kept_until_ms(&self, retention: &Retention) -> i64 {
        match self.end {
            HoldEnd::Confirmed { sold_at_micros, .. } => (sold_at_micros / 1000
                + retention.idempotency_ms())
            .max(self.expires_at_ms + retention.ended_hold_ms()),
            HoldEnd::Released { at_micros } => at_micros / 1000 + retention.ended_hold_ms(),
            HoldEnd::Voided { at_ms } => at_ms.min(self.expires_at_ms) + retention.ended_hold_ms(),
            HoldEnd::Live | HoldEnd::Expired => self.expires_at_ms + retention.ended_hold_ms(),
        }
    }

    /// The record its request's key replays.
    pub fn record(&self) -> Record {
        Record::Held {
            quantity: self.quantity,
            seats_remaining: self.seats_remaining,
            hold_id: self.id,
            expires_at_ms: self.expires_at_ms,
        }
    }
}

/// Ends live holds, the latest made first, until those left fit in `room` seats.
/// Never needed while every movement is logged in order and clocks agree; when it
/// is (a failover to a server whose clock is behind, say), the seats of a sale
/// outrank a hold's, and `sold + held <= total` holds after every recovery.
pub(super) fn void_holds_beyond(holds: &mut [RebuiltHold], room: i64, now_ms: i64) {
    let held: i64 = holds
        .iter()
        .filter(|h| h.end == HoldEnd::Live)
        .map(|h| i64::from(h.quantity))
        .sum();
    let mut over = held - room.max(0);
    if over <= 0 {
        return;
    }
    let mut live: Vec<&mut RebuiltHold> = holds
        .iter_mut()
        .filter(|h| h.end == HoldEnd::Live)
        .collect();
    live.sort_by_key(|h| std::cmp::Reverse(h.held_at_ms));
    for hold in live {
        if over <= 0 {
            break;
        }
        tracing::error!(hold = %hold.id, seats = hold.quantity, "a live hold whose seats are sold: ended by the recovery");
        over -= i64::from(hold.quantity);
        hold.end = HoldEnd::Voided { at_ms: now_ms };
    }
}

/// Every hold PostgreSQL or the log knows of, with how it stands at `now_ms`.
pub(super) fn holds(log: &Log, books: &Books, now_ms: i64) -> Vec<RebuiltHold> {
    let mut holds: HashMap<Uuid, RebuiltHold> = HashMap::new();
    let mut ends: HashMap<Uuid, HoldEnd> = HashMap::new();
    for row in &books.holds {
        holds.insert(row.made.id, made_hold(&row.made));
        if let Some(end) = row_end(row) {
            ends.insert(row.made.id, end);
        }
    }
    for (entry, _) in log.unique() {
        match entry {
            Logged::Hold(made) => {
                holds.entry(made.id).or_insert_with(|| made_hold(made));
            }
            // A confirmation ends a hold for good, whatever else was read of it.
            Logged::Sale(sale) if sale.via_hold => {
                if let Some(made) = &sale.hold {
                    holds.entry(made.id).or_insert_with(|| made_hold(made));
                }
                ends.insert(
                    sale.id,
                    HoldEnd::Confirmed {
                        seats_remaining: sale.seats_remaining.map_or(0, i64::from),
                        sold_at_micros: sale.sold_at_micros,
                    },
                );
            }
            Logged::Release(release) => {
                if let Some(made) = &release.hold {
                    holds.entry(made.id).or_insert_with(|| made_hold(made));
                }
                ends.entry(release.id).or_insert(HoldEnd::Released {
                    at_micros: release.released_at_micros,
                });
            }
            _ => {}
        }
    }
    let mut holds: Vec<RebuiltHold> = holds
        .into_values()
        .map(|mut hold| {
            hold.end = match ends.get(&hold.id) {
                Some(end) => *end,
                None if now_ms >= hold.expires_at_ms => HoldEnd::Expired,
                None => HoldEnd::Live,
            };
            hold
        })
        .collect();
    holds.sort_by_key(|h| h.id);
    holds
}

/// A hold as made, before anything read of how it ended.
fn made_hold(made: &HoldMade) -> RebuiltHold {
    RebuiltHold {
        id: made.id,
        idempotency_key: made.idempotency_key.clone(),
        quantity: u8::try_from(made.quantity).unwrap_or(u8::MAX),
        buyer: made.buyer.clone(),
        seats_remaining: i64::from(made.seats_remaining),
        held_at_ms: made.held_at_micros / 1000,
        expires_at_ms: made.expires_at_ms,
        end: HoldEnd::Live,
    }
}

fn row_end(row: &HoldRow) -> Option<HoldEnd> {
    if row.confirmed {
        return Some(HoldEnd::Confirmed {
            seats_remaining: row.sale_seats_remaining.map_or(0, i64::from),
            sold_at_micros: row.sold_at_micros.unwrap_or_default(),
        });
    }
    row.released_at_micros
        .map(|at_micros| HoldEnd::Released { at_micros })
}
