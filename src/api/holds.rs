//! Holds: seats set aside while the buyer pays, for the event's hold time. A hold is
//! confirmed (it becomes a sale), released (its seats go back on sale at once) or
//! expires (the same, at `expiresAt`). Every move is decided by the gate script.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use poem::http::StatusCode;
use poem::web::Data;
use poem_openapi::param::{Header, Path};
use poem_openapi::payload::Json;
use poem_openapi::{ApiResponse, Enum, Object, OpenApi};
use uuid::Uuid;

use super::auth::{BuyerAuth, Identity};
use super::body::Body;
use super::error::{ApiError, ErrorBody, ErrorCode, api_errors, bad_request, respond};
use super::sale::{PurchaseOk, label, refusal};
use super::types::time_of_ms;
use super::{AppState, Tag};
use crate::domain::{IdempotencyKey, Quantity};
use crate::gate::{Confirmation, Held, HoldState, HoldView, Outcome, Release};

#[derive(Default)]
pub struct HoldsApi;

/// What to hold.
#[derive(Debug, Object)]
pub struct HoldRequest {
    /// Seats to hold, 1 to 10. All or nothing: if fewer are available, none are held.
    pub quantity: Quantity,
}

/// A hold just made.
#[derive(Debug, Object, serde::Serialize)]
#[oai(rename_all = "camelCase")]
#[serde(rename_all = "camelCase")]
pub struct HoldCreated {
    /// Confirm or release the hold with this id; once confirmed, also the sale's id.
    pub hold_id: Uuid,
    pub event_id: Uuid,
    pub quantity: u8,
    /// When the seats go back on sale unless the hold is confirmed first.
    pub expires_at: DateTime<Utc>,
    /// Seats that can still be bought or held, right after this hold.
    pub seats_remaining: i64,
}

/// Where a hold is in its life; it only moves forward.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Enum)]
#[oai(rename_all = "lowercase")]
pub enum HoldStatus {
    /// Seats set aside until `expiresAt`.
    Held,
    /// Sold: `purchaseId` is the sale.
    Confirmed,
    /// Released by the buyer; the seats went back on sale.
    Released,
    /// Not confirmed in time; the seats went back on sale.
    Expired,
}

/// A hold and its times.
#[derive(Debug, Object)]
#[oai(rename_all = "camelCase")]
pub struct HoldInfo {
    pub hold_id: Uuid,
    pub event_id: Uuid,
    pub state: HoldStatus,
    pub quantity: u8,
    pub created_at: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
    /// When it was confirmed, released or expired.
    #[oai(skip_serializing_if_is_none)]
    pub ended_at: Option<DateTime<Utc>>,
    /// The sale, once confirmed.
    #[oai(skip_serializing_if_is_none)]
    pub purchase_id: Option<Uuid>,
}

#[derive(ApiResponse)]
#[oai(bad_request_handler = "bad_request")]
pub enum HoldResponse {
    /// Seats held. A repeat of a request already answered carries
    /// `Idempotent-Replayed: true` and the same body.
    #[oai(status = 201)]
    Created(
        Body<HoldCreated>,
        #[oai(header = "Location")] String,
        #[oai(header = "Idempotent-Replayed")] Option<bool>,
    ),
    /// `INVALID_IDEMPOTENCY_KEY`, `INVALID_QUANTITY`, `INVALID_BODY` or
    /// `INVALID_PARAMETER`. Nothing is held and nothing is recorded under the key.
    #[oai(status = 400)]
    BadRequest(Json<ErrorBody>),
    /// `BUYER_TOKEN_REQUIRED` or `BUYER_TOKEN_INVALID` (events with a limit per buyer).
    #[oai(status = 401)]
    Unauthorized(Json<ErrorBody>),
    /// `ADMISSION_REQUIRED`: the event is queued and the request has no valid
    /// `Admission-Token` for this event and buyer. Nothing is recorded.
    #[oai(status = 403)]
    Forbidden(Json<ErrorBody>),
    /// `EVENT_NOT_FOUND`.
    #[oai(status = 404)]
    NotFound(Json<ErrorBody>),
    /// `SOLD_OUT`: fewer seats are available than requested; or `BUYER_LIMIT`.
    /// Nothing was held and nothing is kept under the key: a repeat is decided again.
    #[oai(status = 409)]
    SoldOut(Json<ErrorBody>),
    /// `PAYLOAD_TOO_LARGE`.
    #[oai(status = 413)]
    PayloadTooLarge(Json<ErrorBody>),
    /// `UNSUPPORTED_MEDIA_TYPE`.
    #[oai(status = 415)]
    UnsupportedMediaType(Json<ErrorBody>),
    /// `IDEMPOTENCY_KEY_REUSED`: the key's hold was made with another quantity, or
    /// the key bought seats; nothing was held.
    #[oai(status = 422)]
    KeyReused(Json<ErrorBody>),
    /// `RATE_LIMITED`: too many writes from this client; nothing done. Retry after `Retry-After` s.
    #[oai(status = 429)]
    RateLimited(Json<ErrorBody>, #[oai(header = "Retry-After")] u64),
    /// `INTERNAL_ERROR`.
    #[oai(status = 500)]
    Internal(Json<ErrorBody>),
    /// `SERVICE_UNAVAILABLE`: retry with the same key after `Retry-After` seconds.
    #[oai(status = 503)]
    Unavailable(Json<ErrorBody>, #[oai(header = "Retry-After")] u32),
}

api_errors!(HoldResponse {
    400 => BadRequest,
    401 => Unauthorized,
    403 => Forbidden,
    404 => NotFound,
    409 => SoldOut,
    413 => PayloadTooLarge,
    415 => UnsupportedMediaType,
    422 => KeyReused,
    unavailable => Unavailable,
    internal => Internal,
});

#[derive(ApiResponse)]
#[oai(bad_request_handler = "bad_request")]
pub enum HoldInfoResponse {
    /// The hold. One that is still `held` past `expiresAt` is shown as `expired`.
    #[oai(status = 200)]
    Ok(Json<HoldInfo>),
    /// `INVALID_PARAMETER`.
    #[oai(status = 400)]
    BadRequest(Json<ErrorBody>),
    /// `HOLD_NOT_FOUND`.
    #[oai(status = 404)]
    NotFound(Json<ErrorBody>),
    /// `INTERNAL_ERROR`.
    #[oai(status = 500)]
    Internal(Json<ErrorBody>),
    /// `SERVICE_UNAVAILABLE`.
    #[oai(status = 503)]
    Unavailable(Json<ErrorBody>, #[oai(header = "Retry-After")] u32),
}

api_errors!(HoldInfoResponse {
    400 => BadRequest,
    404 => NotFound,
    unavailable => Unavailable,
    internal => Internal,
});

#[derive(ApiResponse)]
#[oai(bad_request_handler = "bad_request")]
pub enum ConfirmResponse {
    /// Sold: the body of a purchase, with the hold's id as the purchase id. A repeat
    /// gets the same sale with `Idempotent-Replayed: true`.
    #[oai(status = 200)]
    Ok(
        Body<PurchaseOk>,
        #[oai(header = "Idempotent-Replayed")] Option<bool>,
    ),
    /// `INVALID_PARAMETER`.
    #[oai(status = 400)]
    BadRequest(Json<ErrorBody>),
    /// `HOLD_NOT_FOUND` or `EVENT_NOT_FOUND`.
    #[oai(status = 404)]
    NotFound(Json<ErrorBody>),
    /// `HOLD_EXPIRED`: the hold expired or was released; nothing was sold.
    #[oai(status = 410)]
    Gone(Json<ErrorBody>),
    /// `RATE_LIMITED`: too many writes from this client; nothing done. Retry after `Retry-After` s.
    #[oai(status = 429)]
    RateLimited(Json<ErrorBody>, #[oai(header = "Retry-After")] u64),
    /// `INTERNAL_ERROR`.
    #[oai(status = 500)]
    Internal(Json<ErrorBody>),
    /// `SERVICE_UNAVAILABLE`: retry after `Retry-After` seconds; a repeat never sells
    /// twice.
    #[oai(status = 503)]
    Unavailable(Json<ErrorBody>, #[oai(header = "Retry-After")] u32),
}

api_errors!(ConfirmResponse {
    400 => BadRequest,
    404 => NotFound,
    410 => Gone,
    unavailable => Unavailable,
    internal => Internal,
});

#[derive(ApiResponse)]
#[oai(bad_request_handler = "bad_request")]
pub enum ReleaseResponse {
    /// Released: the seats are on sale again (also when it had expired or was
    /// released before).
    #[oai(status = 204)]
    Released,
    /// `INVALID_PARAMETER`.
    #[oai(status = 400)]
    BadRequest(Json<ErrorBody>),
    /// `HOLD_NOT_FOUND`.
    #[oai(status = 404)]
    NotFound(Json<ErrorBody>),
    /// `HOLD_CONFIRMED`: the hold became a sale, which stands.
    #[oai(status = 409)]
    Confirmed(Json<ErrorBody>),
    /// `RATE_LIMITED`: too many writes from this client; nothing done. Retry after `Retry-After` s.
    #[oai(status = 429)]
    RateLimited(Json<ErrorBody>, #[oai(header = "Retry-After")] u64),
    /// `INTERNAL_ERROR`.
    #[oai(status = 500)]
    Internal(Json<ErrorBody>),
    /// `SERVICE_UNAVAILABLE`.
    #[oai(status = 503)]
    Unavailable(Json<ErrorBody>, #[oai(header = "Retry-After")] u32),
}

api_errors!(ReleaseResponse {
    400 => BadRequest,
    404 => NotFound,
    409 => Confirmed,
    unavailable => Unavailable,
    internal => Internal,
});

#[OpenApi]
impl HoldsApi {
    /// Hold seats
    ///
    /// Sets seats aside for the event's hold time (`holdSeconds`), then they go back
    /// on sale unless confirmed. Send a fresh `Idempotency-Key` per intended hold and
    /// repeat it on retries: a repeat gets the hold back and never holds twice (a
    /// refusal is not kept: a repeat is decided again).
    #[oai(
        path = "/api/v1/events/:id/holds",
        method = "post",
        tag = "Tag::Holds",
        operation_id = "holdSeats"
    )]
    async fn hold(
        &self,
        /// Event id.
        id: Path<Uuid>,
        /// Unique per intended hold; 1–255 printable ASCII characters.
        #[oai(name = "Idempotency-Key")]
        key: Header<IdempotencyKey>,
        body: Json<HoldRequest>,
        /// For a queued event: the token its waiting room gave this buyer.
        #[oai(name = "Admission-Token")]
        admission: Header<Option<String>>,
        auth: BuyerAuth,
        state: Data<&Arc<AppState>>,
    ) -> HoldResponse {
        let identity = Identity::for_event(&state, &auth, id.0, admission.0.as_deref());
        respond(hold(&state, id.0, &key.0, body.0.quantity, &identity).await)
    }

    /// One hold
    #[oai(
        path = "/api/v1/events/:id/holds/:holdId",
        method = "get",
        tag = "Tag::Holds",
        operation_id = "getHold"
    )]
    async fn hold_info(
        &self,
        /// Event id.
        id: Path<Uuid>,
        /// Hold id.
        #[oai(name = "holdId")]
        hold_id: Path<Uuid>,
        state: Data<&Arc<AppState>>,
    ) -> HoldInfoResponse {
        let info = async {
            let view = state
                .gate
                .hold_state(id.0, hold_id.0)
                .await?
                .ok_or_else(hold_not_found)?;
            Ok(HoldInfoResponse::Ok(Json(info(id.0, &view))))
        };
        respond(info.await)
    }

    /// Confirm a hold
    ///
    /// Turns the hold into a sale, before it expires. Repeats return the same sale.
    #[oai(
        path = "/api/v1/events/:id/holds/:holdId/confirm",
        method = "post",
        tag = "Tag::Holds",
        operation_id = "confirmHold"
    )]
    async fn confirm(
        &self,
        /// Event id.
        id: Path<Uuid>,
        /// Hold id.
        #[oai(name = "holdId")]
        hold_id: Path<Uuid>,
        state: Data<&Arc<AppState>>,
    ) -> ConfirmResponse {
        respond(confirm(&state, id.0, hold_id.0).await)
    }

    /// Release a hold
    ///
    /// Its seats go back on sale at once. Releasing again, or a hold that expired,
    /// answers 204 too.
    #[oai(
        path = "/api/v1/events/:id/holds/:holdId",
        method = "delete",
        tag = "Tag::Holds",
        operation_id = "releaseHold"
    )]
    async fn release(
        &self,
        /// Event id.
        id: Path<Uuid>,
        /// Hold id.
        #[oai(name = "holdId")]
        hold_id: Path<Uuid>,
        state: Data<&Arc<AppState>>,
    ) -> ReleaseResponse {
        let released = async {
            match state.gate.release(id.0, hold_id.0).await? {
                Release::Released => {
                    crate::metrics::hold("released");
                    Ok(ReleaseResponse::Released)
                }
                Release::NotFound => Err(hold_not_found()),
                Release::Confirmed => Err(ApiError::new(
                    StatusCode::CONFLICT,
                    ErrorCode::HoldConfirmed,
                    "the hold was confirmed and the sale stands: an admin can cancel the sale \
                     (POST …/purchases/{purchaseId}/cancel)",
                )),
            }
        };
        respond(released.await)
    }
}

async fn hold(
    state: &AppState,
    event: Uuid,
    key: &IdempotencyKey,
    quantity: Quantity,
    identity: &Identity,
) -> Result<HoldResponse, ApiError> {
    let decision = state
        .gate
        .hold(event, &identity.claim(key, quantity))
        .await?;
    let replayed = decision.replayed.then_some(true);
    crate::metrics::hold(label(&decision.outcome, "held"));
    match decision.outcome {
        Outcome::Done(held) => Ok(HoldResponse::Created(
            Body(created(event, &held)),
            format!("/api/v1/events/{event}/holds/{}", held.hold_id),
            replayed,
        )),
        refused => Err(refusal(refused, identity)),
    }
}

async fn confirm(state: &AppState, event: Uuid, hold: Uuid) -> Result<ConfirmResponse, ApiError> {
    match state.gate.confirm(event, hold).await? {
        Confirmation::Sold { sale, replayed } => {
            if !replayed {
                crate::metrics::hold("confirmed");
                crate::metrics::purchase("sold", false, sale.quantity);
            }
            Ok(ConfirmResponse::Ok(
                Body(PurchaseOk::new(event, &sale)),
                replayed.then_some(true),
            ))
        }
        Confirmation::Ended(state) => {
            crate::metrics::hold("confirm_too_late");
            let what = if state == HoldState::Released {
                "was released"
            } else {
                "expired"
            };
            Err(ApiError::new(
                StatusCode::GONE,
                ErrorCode::HoldExpired,
                format!("the hold {what} and its seats went back on sale; nothing was sold"),
            ))
        }
        Confirmation::NotFound => Err(hold_not_found()),
    }
}

fn hold_not_found() -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        ErrorCode::HoldNotFound,
        "no hold with this id for this event",
    )
}

fn created(event: Uuid, held: &Held) -> HoldCreated {
    HoldCreated {
        hold_id: held.hold_id,
        event_id: event,
        quantity: held.quantity,
        expires_at: time_of_ms(held.expires_at_ms),
        seats_remaining: held.seats_remaining,
    }
}

fn info(event: Uuid, view: &HoldView) -> HoldInfo {
    HoldInfo {
        hold_id: view.hold_id,
        event_id: event,
        state: match view.state {
            HoldState::Held => HoldStatus::Held,
            HoldState::Confirmed => HoldStatus::Confirmed,
            HoldState::Released => HoldStatus::Released,
            HoldState::Expired => HoldStatus::Expired,
        },
        quantity: view.quantity,
        created_at: time_of_ms(view.created_at_ms),
        expires_at: time_of_ms(view.expires_at_ms),
        ended_at: view.ended_at_ms.map(time_of_ms),
        purchase_id: view.purchase_id,
    }
}
