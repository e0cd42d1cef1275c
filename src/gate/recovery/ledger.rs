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

use crate::db::{Books, HoldRow};
use crate::records::{Logged, Record};

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

/// An idempotency record or cancellation marker to write back where Redis lacks it,
/// with the seconds it has left.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Restored<T> {
    pub value: T,
    pub ttl_secs: i64,
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
/// limit per buyer or not); `now_ms` is the clock expiries are judged by, `ttl` the
/// idempotency TTL in seconds.
pub fn rebuild(
    log: &Log,
    books: &Books,
    event: (i64, Option<i32>),
    now_ms: i64,
    ttl: u32,
) -> Rebuilt {
    let (total, limit) = event;
    let ttl_ms = i64::from(ttl) * 1000;
    let ttl_left = |since_ms: i64| (ttl_ms - (now_ms - since_ms)).div_euclid(1000);
    let mut rebuilt = Rebuilt {
        durable: durable(log, books),
        ..Rebuilt::default()
    };
    for (buyer, seats) in &books.buyers {
        *rebuilt.buyers.entry(buyer.clone()).or_default() += seats;
    }
    for (seats, buyer, _) in unwritten(log, books) {
        if let Some(buyer) = buyer {
            *rebuilt.buyers.entry(buyer.to_owned()).or_default() += seats;
        }
    }

    rebuilt.holds = holds(log, books, now_ms);
    void_holds_beyond(&mut rebuilt.holds, total - rebuilt.durable.seats(), now_ms);
    for hold in &rebuilt.holds {
        if hold.end == HoldEnd::Live {
            rebuilt.held += i64::from(hold.quantity);
            if let Some(buyer) = &hold.buyer {
                *rebuilt.buyers.entry(buyer.clone()).or_default() += i64::from(hold.quantity);
            }
        }
        let left = ttl_left(hold.held_at_ms);
        if left > 0 {
            rebuilt.records.push(Restored {
                value: (hold.idempotency_key.clone(), hold.record()),
                ttl_secs: left,
            });
        }
    }
    rebuilt
        .buyers
        .retain(|_, seats| *seats > 0 && limit.is_some());

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
            ttl_secs: sale.ttl_left,
        });
    }
    for (id, at, left) in &books.recent_cancellations {
        rebuilt.cancellations.push(Restored {
            value: (*id, *at),
            ttl_secs: *left,
        });
    }
    let written: HashSet<Uuid> = books.written.iter().copied().collect();
    let cancelled: HashSet<Uuid> = books.cancelled.iter().copied().collect();
    for (entry, _) in log.unique() {
        match entry {
            Logged::Sale(sale) if !sale.via_hold && !written.contains(&sale.id) => {
                let left = ttl_left(sale.sold_at_micros / 1000);
                if let (Some(remaining), true) = (sale.seats_remaining, left > 0) {
                    rebuilt.records.push(Restored {
                        value: (
                            sale.idempotency_key.clone(),
                            Record::Sold {
                                quantity: u8::try_from(sale.quantity).unwrap_or(u8::MAX),
                                seats_remaining: i64::from(remaining),
                                purchase_id: sale.id,
                            },
                        ),
                        ttl_secs: left,
                    });
                }
            }
            Logged::Cancel(cancel) if !cancelled.contains(&cancel.id) => {
                let left = ttl_left(cancel.cancelled_at_micros / 1000);
                if left > 0 {
                    rebuilt.cancellations.push(Restored {
                        value: (cancel.id, cancel.cancelled_at_micros),
                        ttl_secs: left,
                    });
                }
            }
            _ => {}
        }
    }
    rebuilt
}

/// Ends live holds, the latest made first, until those left fit in `room` seats.
/// Never needed while every movement is logged in order and clocks agree; when it
/// is (a failover to a server whose clock is behind, say), the seats of a sale
/// outrank a hold's, and `sold + held <= total` holds after every recovery.
fn void_holds_beyond(holds: &mut [RebuiltHold], room: i64, now_ms: i64) {
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
fn holds(log: &Log, books: &Books, now_ms: i64) -> Vec<RebuiltHold> {
    let mut holds: HashMap<Uuid, RebuiltHold> = HashMap::new();
    let mut ends: HashMap<Uuid, HoldEnd> = HashMap::new();
    for row in &books.holds {
        holds.insert(row.id, from_row(row));
        if let Some(end) = row_end(row) {
            ends.insert(row.id, end);
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

fn made_hold(made: &crate::records::HoldMade) -> RebuiltHold {
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

fn from_row(row: &HoldRow) -> RebuiltHold {
    RebuiltHold {
        id: row.id,
        idempotency_key: row.idempotency_key.clone(),
        quantity: u8::try_from(row.quantity).unwrap_or(u8::MAX),
        buyer: row.buyer.clone(),
        seats_remaining: i64::from(row.seats_remaining),
        held_at_ms: row.held_at_micros / 1000,
        expires_at_ms: row.expires_at_ms,
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::records::{Cancellation, Entry, HoldMade, HoldReleased};

    const NOW: i64 = 1_800_000_000_000;
    const TTL: u32 = 86_400;

    fn sale(id: Uuid, quantity: i16, buyer: Option<&str>, via_hold: bool) -> Logged {
        Logged::Sale(Entry {
            id,
            idempotency_key: format!("k-{id}"),
            quantity,
            seats_remaining: Some(7),
            sold_at_micros: (NOW - 1_000) * 1000,
            buyer: buyer.map(str::to_owned),
            via_hold,
            hold: None,
        })
    }

    fn cancel(id: Uuid, quantity: i16, buyer: Option<&str>) -> Logged {
        Logged::Cancel(Cancellation {
            id,
            quantity,
            cancelled_at_micros: (NOW - 500) * 1000,
            buyer: buyer.map(str::to_owned),
        })
    }

    fn hold(id: Uuid, quantity: i16, buyer: Option<&str>, expires_in_ms: i64) -> Logged {
        Logged::Hold(HoldMade {
            id,
            idempotency_key: format!("h-{id}"),
            quantity,
            seats_remaining: 3,
            held_at_micros: (NOW - 2_000) * 1000,
            expires_at_ms: NOW + expires_in_ms,
            buyer: buyer.map(str::to_owned),
        })
    }

    fn release(id: Uuid, quantity: i16) -> Logged {
        Logged::Release(HoldReleased {
            id,
            quantity,
            released_at_micros: (NOW - 100) * 1000,
            buyer: None,
            hold: None,
        })
    }

    #[test]
    fn unwritten_sales_and_cancellations_count_once_wherever_they_were_read() {
        let (a, b, c) = (Uuid::now_v7(), Uuid::now_v7(), Uuid::now_v7());
        let log = Log {
            // `b` was parked and is still in the stream until it is trimmed.
            stream: vec![sale(a, 2, Some("ann"), false), sale(b, 3, None, false)],
            parked: vec![sale(b, 3, None, false), sale(c, 1, Some("ann"), false)],
        };
        let books = Books {
            sold: 10,
            buyers: vec![("ann".into(), 4)],
            written: vec![a],
            ..Books::default()
        };
        let durable = durable(&log, &books);
        assert_eq!(
            (durable.persisted, durable.in_stream, durable.parked),
            (10, 0, 4)
        );
        let rebuilt = rebuild(&log, &books, (100, Some(5)), NOW, TTL);
        assert_eq!(rebuilt.sold(), 14);
        assert_eq!(rebuilt.buyers["ann"], 5, "ann: 4 written + c, not a twice");
    }

    #[test]
    fn a_cancellation_postgresql_has_is_not_undone_by_an_older_redis() {
        let id = Uuid::now_v7();
        // The sale and its cancellation are rows; the log still has the sale's entry.
        let books = Books {
            sold: 0,
            written: vec![id],
            cancelled: vec![id],
            ..Books::default()
        };
        let log = Log {
            stream: vec![sale(id, 2, None, false), cancel(id, 2, None)],
            ..Log::default()
        };
        assert_eq!(rebuild(&log, &books, (100, Some(5)), NOW, TTL).sold(), 0);
        // Not yet written: the cancellation in the log takes the seats off.
        let log = Log {
            stream: vec![sale(id, 2, None, false), cancel(id, 2, None)],
            ..Log::default()
        };
        assert_eq!(
            rebuild(&log, &Books::default(), (100, Some(5)), NOW, TTL).sold(),
            0
        );
    }

    #[test]
    fn holds_end_once_and_for_all_and_live_ones_are_held_again() {
        let (live, released, confirmed, expired) = (
            Uuid::now_v7(),
            Uuid::now_v7(),
            Uuid::now_v7(),
            Uuid::now_v7(),
        );
        let log = Log {
            stream: vec![
                hold(live, 2, Some("bo"), 60_000),
                hold(released, 3, None, 60_000),
                release(released, 3),
                hold(confirmed, 1, None, 60_000),
                sale(confirmed, 1, None, true),
                hold(expired, 4, None, -1),
            ],
            ..Log::default()
        };
        let rebuilt = rebuild(&log, &Books::default(), (100, Some(5)), NOW, TTL);
        let end = |id| rebuilt.holds.iter().find(|h| h.id == id).unwrap().end;
        assert_eq!(end(live), HoldEnd::Live);
        assert!(matches!(end(released), HoldEnd::Released { .. }));
        assert!(matches!(
            end(confirmed),
            HoldEnd::Confirmed {
                seats_remaining: 7,
                ..
            }
        ));
        assert_eq!(end(expired), HoldEnd::Expired);
        assert_eq!(rebuilt.held, 2);
        assert_eq!(rebuilt.buyers["bo"], 2);
        assert_eq!(rebuilt.sold(), 1);
        assert_eq!(
            rebuilt.records.len(),
            4,
            "one record per hold request (the confirmed sale's key is its hold's)"
        );
    }

    #[test]
    fn a_release_written_before_its_hold_still_ends_it() {
        let id = Uuid::now_v7();
        let Logged::Hold(made) = hold(id, 2, None, 60_000) else {
            unreachable!()
        };
        // The release reached PostgreSQL first and its hold row came after: the row
        // carries the release because the release wrote the hold.
        let log = Log {
            stream: vec![Logged::Release(HoldReleased {
                id,
                quantity: 2,
                released_at_micros: (NOW - 100) * 1000,
                buyer: None,
                hold: Some(made),
            })],
            ..Log::default()
        };
        let rebuilt = rebuild(&log, &Books::default(), (100, None), NOW, TTL);
        assert!(matches!(rebuilt.holds[0].end, HoldEnd::Released { .. }));
        assert_eq!(rebuilt.records.len(), 1, "its key's record comes back too");
    }

    #[test]
    fn holds_never_push_sold_plus_held_over_the_total() {
        let (older, newer) = (Uuid::now_v7(), Uuid::now_v7());
        let mut newer_hold = hold(newer, 2, Some("bo"), 60_000);
        if let Logged::Hold(h) = &mut newer_hold {
            h.held_at_micros += 1_000;
        }
        let log = Log {
            stream: vec![hold(older, 2, None, 60_000), newer_hold],
            ..Log::default()
        };
        let books = Books {
            sold: 8,
            ..Books::default()
        };
        let rebuilt = rebuild(&log, &books, (10, Some(4)), NOW, TTL);
        assert_eq!(rebuilt.sold() + rebuilt.held, 10);
        let end = |id| rebuilt.holds.iter().find(|h| h.id == id).unwrap().end;
        assert_eq!(end(older), HoldEnd::Live);
        assert!(matches!(end(newer), HoldEnd::Voided { .. }));
        assert!(!rebuilt.buyers.contains_key("bo"));
    }

    #[test]
    fn a_row_says_how_a_hold_ended_even_when_the_log_has_only_its_making() {
        let id = Uuid::now_v7();
        let row = HoldRow {
            id,
            idempotency_key: "k".into(),
            quantity: 2,
            buyer: None,
            seats_remaining: 5,
            held_at_micros: (NOW - 5_000) * 1000,
            expires_at_ms: NOW + 60_000,
            released_at_micros: Some((NOW - 1_000) * 1000),
            confirmed: false,
            sale_seats_remaining: None,
            sold_at_micros: None,
        };
        let books = Books {
            holds: vec![row],
            ..Books::default()
        };
        let log = Log {
            stream: vec![hold(id, 2, None, 60_000)],
            ..Log::default()
        };
        let rebuilt = rebuild(&log, &books, (100, Some(5)), NOW, TTL);
        assert!(matches!(rebuilt.holds[0].end, HoldEnd::Released { .. }));
        assert_eq!(rebuilt.held, 0);
    }
}
