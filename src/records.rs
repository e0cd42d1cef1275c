//! What the gate script writes, as Rust reads and writes it: the idempotency record
//! kept under each key (of a purchase or a hold), and the stream entry of each sale
//! and cancellation. `lua/purchase.lua` is the other side of both formats; `tests/api/records.rs` runs the script and
//! parses what it wrote with these functions.

use std::fmt;

use redis::streams::StreamId;
use uuid::Uuid;

/// The outcome recorded under an `Idempotency-Key`, replayed to every repeat of the
/// request. A purchase's: `S<quantity>:<seats left>:<purchase id>` for a sale,
/// `X<quantity>` for a refusal for lack of seats, `L<quantity>` over the buyer's
/// limit. A hold's: `H<quantity>:<seats left>:<hold id>:<expiry, Unix ms>`, `HX…`,
/// `HL…`. One key space for both, so a key used for a purchase and then for a hold
/// (or the other way) is a reused key. A sale's record is at most 44 bytes (32 hex
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
}

/// The cancellation of a sale, as the event's stream carries it to PostgreSQL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cancellation {
    /// The purchase id of the sale cancelled.
    pub id: Uuid,
    pub quantity: i16,
    pub cancelled_at_micros: i64,
}

/// What an entry of an event's stream records.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Logged {
    Sale(Entry),
    Cancel(Cancellation),
}

/// Field names of a stream entry, as `lua/purchase.lua` writes them.
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
}

impl Logged {
    /// Reads an entry of an event's stream; `None` if it is neither a sale nor a
    /// cancellation.
    pub fn from_stream(entry: &StreamId) -> Option<Self> {
        let id = entry.get::<String>(field::PURCHASE_ID)?.parse().ok()?;
        let quantity = entry.get(field::QUANTITY)?;
        if let Some(cancelled_at_micros) = entry.get(field::CANCELLED_AT) {
            return Some(Logged::Cancel(Cancellation {
                id,
                quantity,
                cancelled_at_micros,
            }));
        }
        Some(Logged::Sale(Entry {
            id,
            idempotency_key: entry.get(field::KEY)?,
            quantity,
            seats_remaining: entry.get(field::SEATS_REMAINING),
            sold_at_micros: entry.get(field::SOLD_AT)?,
            buyer: entry.get(field::BUYER),
            via_hold: entry.contains_key(field::VIA_HOLD),
        }))
    }

    /// What a count needs of an entry.
    pub fn movement(entry: &StreamId) -> Option<Movement> {
        Some(Movement {
            id: entry.get::<String>(field::PURCHASE_ID)?.parse().ok()?,
            seats: entry.get(field::QUANTITY)?,
            cancel: entry.contains_key(field::CANCELLED_AT),
            buyer: entry.get(field::BUYER),
        })
    }
}

impl Movement {
    /// Seats the entry adds to what is sold: a cancellation's count negative.
    pub fn signed_seats(&self) -> i64 {
        if self.cancel { -self.seats } else { self.seats }
    }
}

/// Seats a stream entry moves: a sale's, or a cancellation's (which returns them).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Movement {
    /// The purchase id.
    pub id: Uuid,
    pub seats: i64,
    pub cancel: bool,
    pub buyer: Option<String>,
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
