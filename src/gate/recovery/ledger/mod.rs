//! What an event's state must be, worked out from what PostgreSQL holds ([`Books`])
//! and the entries of the event's log it does not reflect yet ([`Log`]): the stream
//! and the dead letters. Pure functions, so each rule is tested here on its own.
//!
//! Every seat movement the gate makes is appended to the stream in the same script
//! call, and an entry leaves the stream only after PostgreSQL has it (or it was
//! parked). So PostgreSQL plus the log is never behind what Redis decided, and is
//! ahead of Redis exactly when Redis came back from an older point in time.

use std::collections::{HashMap, HashSet};

use uuid::Uuid;

use crate::db::Books;
use crate::gate::retention::Retention;
use crate::records::{Logged, Record};

mod holds;

pub use holds::{HoldEnd, RebuiltHold};
use holds::{holds, void_holds_beyond};

/// The entries of an event's log: its stream, and the dead-letter stream of
/// entries PostgreSQL refused. One entry may be read in both (it moved between the
/// reads): each kind of entry counts once per id.
#[derive(Debug, Clone, Default)]
pub struct Log {
    pub stream: Vec<Logged>,
    pub parked: Vec<Logged>,
}

/// The ids the log speaks of, by kind: sales, cancellations, holds.
#[derive(Debug, Clone, Default)]
pub struct LogIds {
    pub sales: Vec<Uuid>,
    pub cancellations: Vec<Uuid>,
    pub holds: Vec<Uuid>,
}

impl Log {
    pub fn ids(&self) -> LogIds {
        let mut ids = LogIds::default();
        for entry in self.stream.iter().chain(&self.parked) {
            match entry {
                Logged::Sale(sale) => ids.sales.push(sale.id),
                Logged::Cancel(cancel) => ids.cancellations.push(cancel.id),
                Logged::Hold(hold) => ids.holds.push(hold.id),
                Logged::Release(_) => {}
            }
        }
        ids
    }

    /// Each entry once, with whether it was parked. A parked entry stays in the
    /// stream, acknowledged, until the stream is trimmed: it counts as parked.
    fn unique(&self) -> impl Iterator<Item = (&Logged, bool)> {
        let mut seen = HashSet::new();
        let parked = self.parked.iter().map(|e| (e, true));
        let stream = self.stream.iter().map(|e| (e, false));
        parked
            .chain(stream)
            .filter(move |(entry, _)| seen.insert((std::mem::discriminant(*entry), entry.id())))
    }
}

/// Seats sold for certain, by where they are recorded.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Durable {
    /// Seats in `purchases`, cancelled ones left out.
    pub persisted: i64,
    /// Seats of stream entries that are not rows yet, less those of cancellations
    /// not yet written.
    pub in_stream: i64,
    /// The same for entries PostgreSQL refused, set aside in the dead letters.
    pub parked: i64,
}

impl Durable {
    /// Seats sold: what Redis' `sold` must be.
    pub fn seats(&self) -> i64 {
        self.persisted + self.in_stream + self.parked
    }
}

/// The seats each unwritten sale or cancellation of the log adds to what is sold
/// (a cancellation's negative), with its buyer and whether it was parked.
fn unwritten<'a>(
    log: &'a Log,
    books: &'a Books,
) -> impl Iterator<Item = (i64, Option<&'a str>, bool)> + 'a {
    let written: HashSet<Uuid> = books.written.iter().copied().collect();
    let cancelled: HashSet<Uuid> = books.cancelled.iter().copied().collect();
    log.unique().filter_map(move |(entry, parked)| match entry {
        Logged::Sale(sale) if !written.contains(&sale.id) => {
            Some((i64::from(sale.quantity), sale.buyer.as_deref(), parked))
        }
        Logged::Cancel(cancel) if !cancelled.contains(&cancel.id) => {
            Some((-i64::from(cancel.quantity), cancel.buyer.as_deref(), parked))
        }
        _ => None,
    })
}

pub fn durable(log: &Log, books: &Books) -> Durable {
    let mut durable = Durable {
        persisted: books.sold,
        ..Durable::default()
    };
    for (seats, _, parked) in unwritten(log, books) {
        if parked {
            durable.parked += seats;
        } else {
            durable.in_stream += seats;
        }
    }
    durable
}

/// An idempotency record or cancellation marker to write back where Redis lacks it,
/// and when it expires (Unix ms, on the clock the gate's own expiries use: a hold's
/// record goes with its hash, to the millisecond).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Restored<T> {
    pub value: T,
    pub expires_at_ms: i64,
}

/// The state an event must have in Redis.
#[derive(Debug, Clone, Default)]
pub struct Rebuilt {
    pub durable: Durable,
    /// Seats of live holds.
    pub held: i64,
    /// Seats sold and held per buyer (buyers with none left out).
    pub buyers: HashMap<String, i64>,
    /// Every hold whose hash or record Redis may still be asked for.
    pub holds: Vec<RebuiltHold>,
    /// Records of purchases (by client key) and holds.
    pub records: Vec<Restored<(String, Record)>>,
    /// Cancellations of the last TTL: purchase id and when (Unix µs).
    pub cancellations: Vec<Restored<(Uuid, i64)>>,
}

impl Rebuilt {
    pub fn sold(&self) -> i64 {
        self.durable.seats()
    }

    pub fn live_holds(&self) -> impl Iterator<Item = &RebuiltHold> {
        self.holds.iter().filter(|h| h.end == HoldEnd::Live)
    }

    /// The holds this recovery ended (see [`HoldEnd::Voided`]), as made.
    pub fn voided_holds(&self) -> Vec<crate::records::HoldMade> {
        self.holds
            .iter()
            .filter(|h| matches!(h.end, HoldEnd::Voided { .. }))
            .map(|h| crate::records::HoldMade {
                id: h.id,
                idempotency_key: h.idempotency_key.clone(),
                quantity: i16::from(h.quantity),
                seats_remaining: i32::try_from(h.seats_remaining).unwrap_or(i32::MAX),
                held_at_micros: h.held_at_ms * 1000,
                expires_at_ms: h.expires_at_ms,
                buyer: h.buyer.clone(),
            })
            .collect()
    }
}

/// Merges `books` and `log` into the state of `event` (of `total` seats, with a
/// limit per buyer or not); `now_ms` is the clock expiries are judged by.
pub fn rebuild(
    log: &Log,
    books: &Books,
    event: (i64, Option<i32>),
    now_ms: i64,
    retention: &Retention,
) -> Rebuilt {
    let (total, limit) = event;
    let kept_until = |since_ms: i64| since_ms + retention.idempotency_ms();
    let mut rebuilt = Rebuilt {
        durable: durable(log, books),
        buyers: seats_per_buyer(log, books),
        holds: holds(log, books, now_ms),
        ..Rebuilt::default()
    };
    void_holds_beyond(&mut rebuilt.holds, total - rebuilt.durable.seats(), now_ms);
    count_holds(&mut rebuilt, retention, now_ms);
    rebuilt
        .buyers
        .retain(|_, seats| *seats > 0 && limit.is_some());
    restore_sale_records(&mut rebuilt, log, books, (now_ms, &kept_until));
    rebuilt
}

/// Seats sold per buyer: PostgreSQL's count plus the log's sales it lacks.
fn seats_per_buyer(log: &Log, books: &Books) -> HashMap<String, i64> {
    let mut buyers: HashMap<String, i64> = HashMap::new();
    for (buyer, seats) in &books.buyers {
        *buyers.entry(buyer.clone()).or_default() += seats;
    }
    for (seats, buyer, _) in unwritten(log, books) {
        if let Some(buyer) = buyer {
            *buyers.entry(buyer.to_owned()).or_default() += seats;
        }
    }
    buyers
}

/// Adds the live holds to `held` and to their buyers, and each hold's record while
/// it is kept (see [`Retention`]).
fn count_holds(rebuilt: &mut Rebuilt, retention: &Retention, now_ms: i64) {
    for hold in &rebuilt.holds {
        if hold.end == HoldEnd::Live {
            rebuilt.held += i64::from(hold.quantity);
            if let Some(buyer) = &hold.buyer {
                *rebuilt.buyers.entry(buyer.clone()).or_default() += i64::from(hold.quantity);
            }
        }
        let until = hold.kept_until_ms(retention);
        if until > now_ms {
            rebuilt.records.push(Restored {
                value: (hold.idempotency_key.clone(), hold.record()),
                expires_at_ms: until,
            });
        }
    }
}

/// The records of recent sales and cancellations, from PostgreSQL and from the
/// log's entries it lacks, each while its key's TTL lasts.
fn restore_sale_records(
    rebuilt: &mut Rebuilt,
    log: &Log,
    books: &Books,
    (now_ms, kept_until): (i64, &impl Fn(i64) -> i64),
) {
    for sale in &books.recent_sales {
        rebuilt.records.push(Restored {
            value: (
                sale.idempotency_key.clone(),
                Record::Sold {
                    quantity: u8::try_from(sale.quantity).unwrap_or(u8::MAX),
                    seats_remaining: sale.seats_remaining,
                    purchase_id: sale.id,
                },
            ),
            expires_at_ms: now_ms + sale.ttl_left * 1000,
        });
    }
    for (id, at, left) in &books.recent_cancellations {
        rebuilt.cancellations.push(Restored {
            value: (*id, *at),
            expires_at_ms: now_ms + *left * 1000,
        });
    }
    let written: HashSet<Uuid> = books.written.iter().copied().collect();
    let cancelled: HashSet<Uuid> = books.cancelled.iter().copied().collect();
    for (entry, _) in log.unique() {
        match entry {
            Logged::Sale(sale) if !sale.via_hold && !written.contains(&sale.id) => {
                let until = kept_until(sale.sold_at_micros / 1000);
                if let (Some(remaining), true) = (sale.seats_remaining, until > now_ms) {
                    rebuilt.records.push(Restored {
                        value: (
                            sale.idempotency_key.clone(),
                            Record::Sold {
                                quantity: u8::try_from(sale.quantity).unwrap_or(u8::MAX),
                                seats_remaining: i64::from(remaining),
                                purchase_id: sale.id,
                            },
                        ),
                        expires_at_ms: until,
                    });
                }
            }
            Logged::Cancel(cancel) if !cancelled.contains(&cancel.id) => {
                let until = kept_until(cancel.cancelled_at_micros / 1000);
                if until > now_ms {
                    rebuilt.cancellations.push(Restored {
                        value: (cancel.id, cancel.cancelled_at_micros),
                        expires_at_ms: until,
                    });
                }
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests;
