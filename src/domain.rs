//! Values that cannot hold a bad value once constructed, and the limits they enforce.
//! Every other place (the OpenAPI schemas, the command line, error messages) takes
//! its numbers from the constants here.

use std::fmt;

/// Most seats one purchase may buy.
pub const MAX_QUANTITY: u8 = 10;
/// Most seats one event may have.
pub const MAX_SEATS: i32 = 1_000_000;
/// Longest accepted `Idempotency-Key`.
pub const MAX_KEY_LEN: usize = 255;
/// Longest time a key and its outcome may be remembered: 30 days. Memory grows with
/// it (about 224 bytes per remembered purchase).
pub const MAX_IDEMPOTENCY_TTL: u32 = 30 * 24 * 3600;

/// A client's `Idempotency-Key`: 1–255 printable ASCII characters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdempotencyKey(String);

impl IdempotencyKey {
    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn as_string(&self) -> &String {
        &self.0
    }
}

impl TryFrom<String> for IdempotencyKey {
    type Error = &'static str;

    fn try_from(key: String) -> Result<Self, Self::Error> {
        if key.is_empty() || key.len() > MAX_KEY_LEN {
            return Err("Idempotency-Key must be 1 to 255 characters long");
        }
        if !key.bytes().all(|b| (0x20..=0x7e).contains(&b)) {
            return Err("Idempotency-Key may only contain printable ASCII characters");
        }
        Ok(Self(key))
    }
}

impl fmt::Display for IdempotencyKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A buyer: the verified `sub` claim of their token, 1–255 bytes without control
/// characters.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Buyer(String);

impl Buyer {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for Buyer {
    type Error = &'static str;

    fn try_from(sub: String) -> Result<Self, Self::Error> {
        if sub.is_empty() || sub.len() > MAX_KEY_LEN || sub.chars().any(char::is_control) {
            return Err("the token's sub must be 1 to 255 bytes without control characters");
        }
        Ok(Self(sub))
    }
}

/// Seats in one purchase: 1 to [`MAX_QUANTITY`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Quantity(u8);

impl Quantity {
    pub fn get(self) -> u8 {
        self.0
    }

    /// What a client is told when a quantity is out of range.
    pub fn rule() -> String {
        format!("quantity must be an integer from 1 to {MAX_QUANTITY}")
    }
}

impl TryFrom<i64> for Quantity {
    type Error = String;

    fn try_from(n: i64) -> Result<Self, Self::Error> {
        match u8::try_from(n) {
            Ok(q) if (1..=MAX_QUANTITY).contains(&q) => Ok(Self(q)),
            _ => Err(Self::rule()),
        }
    }
}

/// Seconds a hold lasts: 1 to the configured maximum.
pub const DEFAULT_HOLD_SECONDS: u32 = 600;
/// Largest `BOXOFFICE_MAX_HOLD_SECONDS`: one day.
pub const MAX_HOLD_SECONDS: u32 = 24 * 3600;

/// How long holds of an event last, in seconds: 1 to [`MAX_HOLD_SECONDS`] (a server
/// may allow less, `BOXOFFICE_MAX_HOLD_SECONDS`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HoldSeconds(u32);

impl HoldSeconds {
    pub fn get(self) -> u32 {
        self.0
    }

    pub fn rule() -> String {
        format!("holdSeconds must be an integer from 1 to {MAX_HOLD_SECONDS}")
    }
}

impl TryFrom<i64> for HoldSeconds {
    type Error = String;

    fn try_from(n: i64) -> Result<Self, Self::Error> {
        match u32::try_from(n) {
            Ok(s) if (1..=MAX_HOLD_SECONDS).contains(&s) => Ok(Self(s)),
            _ => Err(Self::rule()),
        }
    }
}

/// Most seats one buyer may have of an event: 1 to [`MAX_SEATS`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SeatLimit(u32);

impl SeatLimit {
    pub fn get(self) -> u32 {
        self.0
    }

    pub fn rule() -> String {
        format!("maxPerBuyer must be an integer from 1 to {MAX_SEATS}")
    }
}

impl TryFrom<i64> for SeatLimit {
    type Error = String;

    fn try_from(n: i64) -> Result<Self, Self::Error> {
        match u32::try_from(n) {
            Ok(s) if s >= 1 && i64::from(s) <= i64::from(MAX_SEATS) => Ok(Self(s)),
            _ => Err(Self::rule()),
        }
    }
}

/// Seats of one event: 1 to [`MAX_SEATS`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Seats(i32);

impl Seats {
    pub fn get(self) -> i32 {
        self.0
    }

    pub fn rule() -> String {
        format!("totalSeats must be an integer from 1 to {MAX_SEATS}")
    }
}

impl TryFrom<i64> for Seats {
    type Error = String;

    fn try_from(n: i64) -> Result<Self, Self::Error> {
        match i32::try_from(n) {
            Ok(seats) if (1..=MAX_SEATS).contains(&seats) => Ok(Self(seats)),
            _ => Err(Self::rule()),
        }
    }
}

impl std::str::FromStr for Seats {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        s.parse::<i64>()
            .map_err(|_| Self::rule())
            .and_then(Self::try_from)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys() {
        assert!(IdempotencyKey::try_from("a".to_string()).is_ok());
        assert!(IdempotencyKey::try_from("x".repeat(255)).is_ok());
        assert!(IdempotencyKey::try_from(String::new()).is_err());
        assert!(IdempotencyKey::try_from("x".repeat(256)).is_err());
        assert!(IdempotencyKey::try_from("tab\there".to_string()).is_err());
        assert!(IdempotencyKey::try_from("caf\u{e9}".to_string()).is_err());
    }

    #[test]
    fn quantities() {
        assert!(Quantity::try_from(0).is_err());
        assert_eq!(Quantity::try_from(1).unwrap().get(), 1);
        assert_eq!(Quantity::try_from(10).unwrap().get(), 10);
        assert!(Quantity::try_from(11).is_err());
        assert!(Quantity::try_from(-1).is_err());
    }

    #[test]
    fn seats() {
        assert!(Seats::try_from(0).is_err());
        assert_eq!("1000000".parse::<Seats>().unwrap().get(), 1_000_000);
        assert!("1000001".parse::<Seats>().is_err());
        assert!("ten".parse::<Seats>().is_err());
    }
}
