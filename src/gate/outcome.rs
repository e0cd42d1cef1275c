//! What the gate's operations come to, as the API and the CLI see them, and an
//! event's seat counters. Plain data: recovery and the API use these without
//! depending on the gate itself.

use uuid::Uuid;

/// What a purchase or hold request came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome<T = Sale> {
    /// Seats were sold (a purchase) or held (a hold).
    Done(T),
    /// Fewer seats are available than asked for; nothing was sold or held.
    SoldOut,
    /// The key was first used with another quantity, or for the other kind of
    /// request; nothing was done.
    KeyReused,
    /// The buyer's seats would exceed the event's limit; nothing was done.
    BuyerLimit,
    /// The event has a limit per buyer and the request named no verified buyer.
    BuyerRequired,
    /// The event is queued and the request carried no valid admission.
    AdmissionRequired,
}

/// A completed sale as the client sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sale {
    pub purchase_id: Uuid,
    pub quantity: u8,
    pub seats_remaining: i64,
}

/// A hold as its request was answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Held {
    pub hold_id: Uuid,
    pub quantity: u8,
    pub seats_remaining: i64,
    pub expires_at_ms: i64,
}

/// An outcome and whether it repeats one recorded earlier under the same key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision<T = Sale> {
    pub outcome: Outcome<T>,
    pub replayed: bool,
}

/// What confirming a hold came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Confirmation {
    /// The sale; `replayed` when the hold had been confirmed before.
    Sold { sale: Sale, replayed: bool },
    /// The hold expired or was released; nothing was sold.
    Ended(HoldState),
    /// No such hold (never made, or forgotten since).
    NotFound,
}

/// What releasing a hold came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Release {
    /// Its seats are on sale again (now, or by an earlier release or its expiry).
    Released,
    /// It was confirmed: the sale stands (cancel it instead).
    Confirmed,
    NotFound,
}

/// What cancelling a sale came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cancelled {
    /// When the sale was cancelled, Unix microseconds (by this request or an earlier one).
    pub at_micros: i64,
    pub replayed: bool,
}

/// The states a hold moves through, only forward.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HoldState {
    Held,
    Confirmed,
    Released,
    Expired,
}

impl HoldState {
    pub(super) fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "held" => HoldState::Held,
            "confirmed" => HoldState::Confirmed,
            "released" => HoldState::Released,
            "expired" => HoldState::Expired,
            _ => return None,
        })
    }
}

/// A hold as Redis has it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HoldView {
    pub hold_id: Uuid,
    pub state: HoldState,
    pub quantity: u8,
    pub created_at_ms: i64,
    pub expires_at_ms: i64,
    /// When it was confirmed, released or expired.
    pub ended_at_ms: Option<i64>,
    /// The sale's id once confirmed (the hold's own id).
    pub purchase_id: Option<Uuid>,
}

/// Seat counters of one event, straight from Redis.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Inventory {
    pub total: i64,
    pub sold: i64,
    /// Successful purchases (a purchase may hold up to 10 seats).
    pub purchases: i64,
    /// Purchases and holds refused (no seats, or over a buyer's limit).
    pub rejected: i64,
    /// Seats held by holds not yet confirmed, released or expired.
    pub held: i64,
}

impl Inventory {
    /// Seats that can still be bought or held.
    pub fn available(&self) -> i64 {
        self.total - self.sold - self.held
    }
}
