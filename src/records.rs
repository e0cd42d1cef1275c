//! What the purchase script writes, as Rust reads and writes it: the idempotency
//! record kept under each key, and the stream entry of each sale. `lua/purchase.lua`
//! is the other side of both formats; `tests/api/records.rs` runs the script and
//! parses what it wrote with these functions.

use std::fmt;

use redis::streams::StreamId;
use uuid::Uuid;

/// The outcome recorded under an `Idempotency-Key`, replayed to every repeat of the
/// request. `S<quantity>:<seats left>:<purchase id>` for a sale, `X<quantity>` for a
/// refusal. A sale's record is at most 44 bytes (32 hex digits for the id), which
/// Redis stores inline with its object header.
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
}

impl Record {
    pub fn parse(record: &str) -> Option<Self> {
        let (kind, rest) = record.split_at_checked(1)?;
        match kind {
            "X" => Some(Record::Refused {
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
            _ => None,
        }
    }

    pub fn quantity(&self) -> u8 {
        match self {
            Record::Sold { quantity, .. } | Record::Refused { quantity } => *quantity,
        }
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
    pub id: Uuid,
    pub idempotency_key: String,
    pub quantity: i16,
    /// Seats left right after the sale, as its 200 said. Absent in entries written
    /// before the field existed.
    pub seats_remaining: Option<i32>,
    /// Microseconds since the Unix epoch, from Redis' clock.
    pub sold_at_micros: i64,
}

/// Field names of a stream entry, as `lua/purchase.lua` writes them.
pub mod field {
    pub const PURCHASE_ID: &str = "p";
    pub const KEY: &str = "k";
    pub const QUANTITY: &str = "q";
    pub const SEATS_REMAINING: &str = "r";
    pub const SOLD_AT: &str = "t";
}

impl Entry {
    /// Reads an entry of a sales stream; `None` if it is not one.
    pub fn from_stream(entry: &StreamId) -> Option<Self> {
        Some(Self {
            id: entry.get::<String>(field::PURCHASE_ID)?.parse().ok()?,
            idempotency_key: entry.get(field::KEY)?,
            quantity: entry.get(field::QUANTITY)?,
            seats_remaining: entry.get(field::SEATS_REMAINING),
            sold_at_micros: entry.get(field::SOLD_AT)?,
        })
    }

    /// The purchase id and seats of an entry, which is all a count needs.
    pub fn seats(entry: &StreamId) -> Option<(Uuid, i64)> {
        let id = entry.get::<String>(field::PURCHASE_ID)?.parse().ok()?;
        Some((id, entry.get(field::QUANTITY)?))
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
        for bad in ["", "S2:x:y", "Q1", "S2:998", "X"] {
            assert_eq!(Record::parse(bad), None, "{bad:?}");
        }
    }
}
