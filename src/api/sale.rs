//! The answer of a sale, whether a purchase or a confirmed hold made it, the errors
//! of a purchase or hold that was not done, and their outcome labels in the metrics.

use poem::http::StatusCode;
use poem_openapi::Object;
use uuid::Uuid;

use super::auth::Identity;
use super::error::{ApiError, ErrorCode};
use crate::gate::{Decision, Outcome, Sale};

/// A completed sale.
#[derive(Debug, Object, serde::Serialize)]
#[oai(rename_all = "camelCase")]
#[serde(rename_all = "camelCase")]
pub struct PurchaseOk {
    /// Always `true`.
    pub success: bool,
    /// Seats of the event left right after this sale.
    pub seats_remaining: i64,
    /// Identity of the sale, also its row id in the `purchases` table.
    pub purchase_id: Uuid,
    /// Seats sold.
    pub quantity: u8,
    /// The event the seats belong to.
    pub event_id: Uuid,
}

impl PurchaseOk {
    pub fn new(event: Uuid, sale: &Sale) -> Self {
        Self {
            success: true,
            seats_remaining: sale.seats_remaining,
            purchase_id: sale.purchase_id,
            quantity: sale.quantity,
            event_id: event,
        }
    }
}

/// The error for a purchase or hold that was not done: a refusal (`SOLD_OUT`,
/// `BUYER_LIMIT`) is a 409 like any other error, kept nowhere.
pub fn refusal<T>(outcome: Outcome<T>, identity: &Identity) -> ApiError {
    match outcome {
        Outcome::Done(_) => unreachable!("a refusal"),
        Outcome::SoldOut => ApiError::new(
            StatusCode::CONFLICT,
            ErrorCode::SoldOut,
            "fewer seats remain than requested; nothing was sold",
        ),
        Outcome::BuyerLimit => ApiError::new(
            StatusCode::CONFLICT,
            ErrorCode::BuyerLimit,
            "this would give the buyer more seats than the event allows one buyer; \
             nothing was sold",
        ),
        Outcome::KeyReused => ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            ErrorCode::IdempotencyKeyReused,
            "this Idempotency-Key was used for a request with another quantity, or for \
             another kind of request",
        ),
        Outcome::BuyerRequired => identity.required(),
        Outcome::AdmissionRequired => identity.not_admitted(),
    }
}

/// The label of an outcome in the metrics; `done` names the success.
pub fn label<T>(outcome: &Outcome<T>, done: &'static str) -> &'static str {
    match outcome {
        Outcome::Done(_) => done,
        Outcome::SoldOut => "sold_out",
        Outcome::KeyReused => "key_reused",
        Outcome::BuyerLimit => "buyer_limit",
        Outcome::BuyerRequired => "buyer_required",
        Outcome::AdmissionRequired => "admission_required",
    }
}

/// Counts a purchase's outcome (`boxoffice_purchases_total`).
pub fn record_outcome(decision: &Decision) {
    let seats = match &decision.outcome {
        Outcome::Done(sale) => sale.quantity,
        _ => 0,
    };
    crate::metrics::purchase(label(&decision.outcome, "sold"), decision.replayed, seats);
}
