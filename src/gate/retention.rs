//! How long the gate keeps what a retry needs.
//!
//! A sale's key and outcome are kept for the idempotency TTL: a retry within it gets
//! the sale back. A hold that ended without a sale (released, or expired) sold
//! nothing and can no longer change, so its hash and its request's record are kept
//! only as long as a retried confirmation or release plausibly comes: the
//! ended-hold TTL after it ended. That bounds what anonymous hold-and-release cycles
//! leave in Redis. A confirmed hold is a sale and is kept as long as one.
//!
//! `lua/purchase.lua` applies the rule as holds move (`kept_until`); recovery
//! applies it to the holds it writes back (`RebuiltHold::kept_until_ms`).

/// The two lifetimes, in seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    idempotency_secs: u32,
    ended_hold_secs: u32,
}

impl Retention {
    /// `ended_hold_secs` is cut to `idempotency_secs`: a hold is never remembered
    /// longer than a sale.
    pub const fn new(idempotency_secs: u32, ended_hold_secs: u32) -> Self {
        let ended_hold_secs = if ended_hold_secs < idempotency_secs {
            ended_hold_secs
        } else {
            idempotency_secs
        };
        Self {
            idempotency_secs,
            ended_hold_secs,
        }
    }

    /// Seconds a sale's key and outcome, and a cancellation's marker, are kept.
    pub fn idempotency_secs(&self) -> u32 {
        self.idempotency_secs
    }

    /// Seconds a hold that ended without a sale keeps its hash and record.
    pub fn ended_hold_secs(&self) -> u32 {
        self.ended_hold_secs
    }

    pub(crate) fn idempotency_ms(&self) -> i64 {
        i64::from(self.idempotency_secs) * 1000
    }

    pub(crate) fn ended_hold_ms(&self) -> i64 {
        i64::from(self.ended_hold_secs) * 1000
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_ended_hold_is_never_kept_longer_than_a_sale() {
        let retention = Retention::new(60, 900);
        assert_eq!(retention.ended_hold_secs(), 60);
        assert_eq!(Retention::new(86_400, 900).ended_hold_secs(), 900);
    }
}
