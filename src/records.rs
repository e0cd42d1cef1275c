//! What the gate script writes, as Rust reads and writes it: the idempotency record
//! kept under each key (of a purchase or a hold), and the stream entry of each seat
//! movement PostgreSQL must hold — a sale, a cancellation, a hold made, a hold
//! released. `lua/purchase.lua` is the other side of both formats;
//! `tests/api/records.rs` runs the script and parses what it wrote with these
//! functions.

use std::fmt;

use redis::streams::StreamId;
use uuid::Uuid;

/// The outcome of a purchase or hold, as the gate script answers it. A purchase's:
/// `S<quantity>:<seats left>:<purchase id>` for a sale, `X<quantity>` for a refusal
/// for lack of seats, `L<quantity>` over the buyer's limit. A hold's:
/// `H<quantity>:<seats left>:<hold id>:<expiry, Unix ms>`, `HX…`, `HL…`. Sales and
/// holds are recorded under the `Idempotency-Key` and replayed to every repeat of
/// the request; refusals are answered and not kept (they sold nothing; see
/// [`Record::kept`]). One key space for both, so a key used for a purchase and then
/// for a hold (or the other way) is a reused key. A sale's record is at most 44 bytes (32 hex
/// digits for the id), which Redis stores inline with its object header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Record {
    Sold {
        quantity: u8,
        seats_remaining: i64,
        purchase_id: Uuid,
    },
    Refused {
        quantity: u8,
    },
    OverLimit {
        quantity: u8,
    },
    Held {
        quantity: u8,
        seats_remaining: i64,
        hold_id: Uuid,
        expires_at_ms: i64,
    },
    HoldRefused {
        quantity: u8,
    },
    HoldOverLimit {
        quantity: u8,
    },
}

impl Record {
    /// Whether `stored`, the value under an idempotency key, is a kept decision (a
    /// sale or a hold). A refusal an earlier version recorded reads as none, as the
    /// gate script reads it (`lua/purchase.lua`, `purchase_or_hold`).
    pub fn kept(stored: Option<&str>) -> bool {
        stored.is_some_and(|s| {
            !(s.starts_with(['X', 'L']) || s.starts_with("HX") || s.starts_with("HL"))
        })
    }

    pub fn parse(record: &str) -> Option<Self> {
        let (kind, rest) = record.split_at_checked(1)?;
        match kind {
            "X" => Some(Record::Refused {
                quantity: rest.parse().ok()?,
            }),
            "L" => Some(Record::OverLimit {
                quantity: rest.parse().ok()?,
            }),
            "S" => {
                let mut parts = rest.splitn(3, ':');
                Some(Record::Sold {
                    quantity: parts.next()?.parse().ok()?,
                    seats_remaining: parts.next()?.parse().ok()?,
                    purchase_id: parts.next()?.parse().ok()?,
                })
            }
            "H" => match rest.split_at_checked(1)? {
                ("X", quantity) => Some(Record::HoldRefused {
                    quantity: quantity.parse().ok()?,
                }),
                ("L", quantity) => Some(Record::HoldOverLimit {
                    quantity: quantity.parse().ok()?,
                }),
                _ => {
                    let mut parts = rest.splitn(4, ':');
                    Some(Record::Held {
                        quantity: parts.next()?.parse().ok()?,
                        seats_remaining: parts.next()?.parse().ok()?,
                        hold_id: parts.next()?.parse().ok()?,
                        expires_at_ms: parts.next()?.parse().ok()?,
                    })
                }
            },
            _ => None,
        }
    }

    pub fn quantity(&self) -> u8 {
        match self {
            Record::Sold { quantity, .. }
            | Record::Refused { quantity }
            | Record::OverLimit { quantity }
            | Record::Held { quantity, .. }
            | Record::HoldRefused { quantity }
            | Record::HoldOverLimit { quantity } => *quantity,
        }
    }

    /// Whether the record answers a hold request rather than a purchase.
    pub fn is_hold(&self) -> bool {
        matches!(
            self,
            Record::Held { .. } | Record::HoldRefused { .. } | Record::HoldOverLimit { .. }
        )
    }
}

impl fmt::Display for Record {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Record::Sold {
                quantity,
                seats_remaining,
                purchase_id,
            } => write!(f, "S{quantity}:{seats_remaining}:{}", purchase_id.simple()),
            Record::Refused { quantity } => write!(f, "X{quantity}"),
            Record::OverLimit { quantity } => write!(f, "L{quantity}"),
            Record::Held {
                quantity,
                seats_remaining,
                hold_id,
                expires_at_ms,
            } => write!(
                f,
                "H{quantity}:{seats_remaining}:{}:{expires_at_ms}",
                hold_id.simple()
            ),
            Record::HoldRefused { quantity } => write!(f, "HX{quantity}"),
            Record::HoldOverLimit { quantity } => write!(f, "HL{quantity}"),
        }
    }
}

/// A purchase id as the script takes it: 32 hex digits, the form the record holds.
pub fn purchase_id_arg(id: Uuid) -> uuid::fmt::Simple {
    id.simple()
}

/// One sale as the event's stream carries it to PostgreSQL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// The purchase id: the row's identity, so a redelivered entry is the same row.
    /// A confirmed hold's sale has the hold's id.
    pub id: Uuid,
    pub idempotency_key: String,
    pub quantity: i16,
    /// Seats left right after the sale, as its 200 said. Absent in entries written
    /// before the field existed.
    pub seats_remaining: Option<i32>,
    /// Microseconds since the Unix epoch, from Redis' clock.
    pub sold_at_micros: i64,
    /// The verified buyer, when the request carried one.
    pub buyer: Option<String>,
    /// Made by confirming a hold (its idempotency key belongs to the hold request).
    pub via_hold: bool,
    /// That hold, as the confirmation carries it (absent for holds made before it did).
    pub hold: Option<HoldMade>,
}

/// The cancellation of a sale, as the event's stream carries it to PostgreSQL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cancellation {
    /// The purchase id of the sale cancelled.
    pub id: Uuid,
    pub quantity: i16,
    pub cancelled_at_micros: i64,
    /// The buyer the sale counted against, if any.
    pub buyer: Option<String>,
}

/// A hold as the gate made it: what recovery needs to bring it back, or to know it
/// ended, after Redis lost it.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct HoldMade {
    /// The hold's id; its sale, once confirmed, has the same id.
    pub id: Uuid,
    pub idempotency_key: String,
    pub quantity: i16,
    /// Seats left right after the hold, as its 201 said.
    pub seats_remaining: i32,
    /// Microseconds since the Unix epoch, from Redis' clock.
    pub held_at_micros: i64,
    /// Milliseconds since the Unix epoch, from Redis' clock.
    pub expires_at_ms: i64,
    pub buyer: Option<String>,
}

/// The release of a hold (its seats back on sale before its expiry), with what made
/// the hold: two consumers may write the hold and its release in either order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HoldReleased {
    pub id: Uuid,
    pub quantity: i16,
    pub released_at_micros: i64,
    pub buyer: Option<String>,
    /// The hold itself (absent from releases of holds made before it was logged).
    pub hold: Option<HoldMade>,
}

/// What an entry of an event's stream records. A hold's confirmation is the sale
/// it makes (`via_hold`); a hold's expiry is not logged: a hold neither confirmed
/// nor released by its expiry expired, which its expiry time says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Logged {
    Sale(Entry),
    Cancel(Cancellation),
    Hold(HoldMade),
    Release(HoldReleased),
}

/// Field names of a stream entry, as `lua/purchase.lua` writes them. The kind of an
/// entry is told by which of `c`, `d`, `x` it has, in that order (none: a sale). A
/// release and a hold's confirmation carry the hold too, under names of their own
/// (`hl`, `hx`, `hm`, with `k` its request's key), so that a consumer from before
/// they did reads them as before. Hold entries have no `t`, so a consumer from before
/// holds were logged does not take one for a sale.
pub mod field {
    pub const PURCHASE_ID: &str = "p";
    pub const KEY: &str = "k";
    pub const QUANTITY: &str = "q";
    pub const SEATS_REMAINING: &str = "r";
    pub const SOLD_AT: &str = "t";
    pub const BUYER: &str = "b";
    pub const VIA_HOLD: &str = "h";
    /// Present on cancellations only: when the sale was cancelled.
    pub const CANCELLED_AT: &str = "c";
    /// Present on holds made only: when the hold expires (Unix ms).
    pub const EXPIRES_AT: &str = "x";
    /// When the hold was made (Unix µs), on holds made.
    pub const HELD_AT: &str = "m";
    /// Present on releases only: when the hold was released (Unix µs).
    pub const RELEASED_AT: &str = "d";
    /// On releases and confirmations, the hold's own seats left, expiry and making.
    pub const HOLD_SEATS_REMAINING: &str = "hl";
    pub const HOLD_EXPIRES_AT: &str = "hx";
    pub const HOLD_HELD_AT: &str = "hm";
}

impl Logged {
    /// Reads an entry of an event's stream (or of its dead letters, whose extra
    /// fields are ignored); `None` if it is none of the kinds above.
    pub fn from_stream(entry: &StreamId) -> Option<Self> {
        let id = entry.get::<String>(field::PURCHASE_ID)?.parse().ok()?;
        let quantity = entry.get(field::QUANTITY)?;
        let buyer = entry.get(field::BUYER);
        if let Some(cancelled_at_micros) = entry.get(field::CANCELLED_AT) {
            return Some(Logged::Cancel(Cancellation {
                id,
                quantity,
                cancelled_at_micros,
                buyer,
            }));
        }
        // A hold from the fields `names` gives: its seats left, when it was made and
        // when it expires.
        let hold = |[left, made, expires]: [&str; 3]| -> Option<HoldMade> {
            Some(HoldMade {
                id,
                idempotency_key: entry.get(field::KEY)?,
                quantity,
                seats_remaining: entry.get(left)?,
                held_at_micros: entry.get(made)?,
                expires_at_ms: entry.get(expires)?,
                buyer: buyer.clone(),
            })
        };
        let carried = [
            field::HOLD_SEATS_REMAINING,
            field::HOLD_HELD_AT,
            field::HOLD_EXPIRES_AT,
        ];
        if let Some(released_at_micros) = entry.get(field::RELEASED_AT) {
            return Some(Logged::Release(HoldReleased {
                id,
                quantity,
                released_at_micros,
                hold: hold(carried),
                buyer,
            }));
        }
        if entry.contains_key(field::EXPIRES_AT) {
            return Some(Logged::Hold(hold([
                field::SEATS_REMAINING,
                field::HELD_AT,
                field::EXPIRES_AT,
            ])?));
        }
        let via_hold = entry.contains_key(field::VIA_HOLD);
        Some(Logged::Sale(Entry {
            id,
            idempotency_key: entry.get(field::KEY)?,
            quantity,
            seats_remaining: entry.get(field::SEATS_REMAINING),
            sold_at_micros: entry.get(field::SOLD_AT)?,
            hold: via_hold.then(|| hold(carried)).flatten(),
            buyer,
            via_hold,
        }))
    }

    /// The purchase or hold id the entry is about.
    pub fn id(&self) -> Uuid {
        match self {
            Logged::Sale(e) => e.id,
            Logged::Cancel(c) => c.id,
            Logged::Hold(h) => h.id,
            Logged::Release(r) => r.id,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip() {
        let sold = Record::Sold {
            quantity: 10,
            seats_remaining: 999_990,
            purchase_id: Uuid::now_v7(),
        };
        assert_eq!(Record::parse(&sold.to_string()), Some(sold));
        assert!(sold.to_string().len() <= 44);
        let refused = Record::Refused { quantity: 3 };
        assert_eq!(refused.to_string(), "X3");
        assert_eq!(Record::parse("X3"), Some(refused));
        let held = Record::Held {
            quantity: 2,
            seats_remaining: 7,
            hold_id: Uuid::now_v7(),
            expires_at_ms: 1_790_000_000_123,
        };
        assert_eq!(Record::parse(&held.to_string()), Some(held));
        for other in [
            Record::OverLimit { quantity: 4 },
            Record::HoldRefused { quantity: 1 },
            Record::HoldOverLimit { quantity: 10 },
        ] {
            assert_eq!(Record::parse(&other.to_string()), Some(other));
        }
        for bad in ["", "S2:x:y", "Q1", "S2:998", "X", "H", "HX", "H2:1:x:3"] {
            assert_eq!(Record::parse(bad), None, "{bad:?}");
        }
    }
}
