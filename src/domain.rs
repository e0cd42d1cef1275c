//! Values that cannot hold a bad value once constructed.

use std::fmt;

/// Most seats one purchase may buy.
pub const MAX_QUANTITY: u8 = 10;
/// Longest accepted `Idempotency-Key`.
pub const MAX_KEY_LEN: usize = 255;

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

/// Seats in one purchase: 1 to [`MAX_QUANTITY`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Quantity(u8);

impl Quantity {
    pub fn get(self) -> u8 {
        self.0
    }
}

impl TryFrom<i64> for Quantity {
    type Error = &'static str;

    fn try_from(n: i64) -> Result<Self, Self::Error> {
        match u8::try_from(n) {
            Ok(q) if (1..=MAX_QUANTITY).contains(&q) => Ok(Self(q)),
            _ => Err("quantity must be an integer from 1 to 10"),
        }
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
}
