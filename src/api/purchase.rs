//! Buying seats: the seed-compatible `POST /api/v1/purchase` (default event) and
//! `POST /api/v1/events/{id}/purchase`.

use std::sync::Arc;

use poem::web::Data;
use poem_openapi::param::{Header, Path};
use poem_openapi::payload::Json;
use poem_openapi::{ApiResponse, Object, OpenApi};
use uuid::Uuid;

use super::auth::{BuyerAuth, Identity};
use super::body::Body;
use super::error::{ApiError, ErrorBody, api_errors, bad_request, respond};
use super::sale::{PurchaseOk, record_outcome, refusal};
use super::{AppState, Tag};

use crate::domain::{IdempotencyKey, Quantity};
use crate::gate::Outcome;

#[derive(Default)]
pub struct PurchaseApi;

/// What to buy.
#[derive(Debug, Object)]
pub struct PurchaseRequest {
    /// Seats to buy, 1 to 10. All or nothing: if fewer remain, none are sold.
    pub quantity: Quantity,
}

#[derive(ApiResponse)]
#[oai(bad_request_handler = "bad_request")]
pub enum PurchaseResponse {
    /// Seats sold. A repeat of a request already answered carries
    /// `Idempotent-Replayed: true` and the same body.
    #[oai(status = 200)]
    Ok(
        Body<PurchaseOk>,
        #[oai(header = "Idempotent-Replayed")] Option<bool>,
    ),
    /// `INVALID_IDEMPOTENCY_KEY`, `INVALID_QUANTITY`, `INVALID_BODY` or `INVALID_PARAMETER`.
    /// Nothing is sold and nothing is recorded under the key.
    #[oai(status = 400)]
    BadRequest(Json<ErrorBody>),
    /// `BUYER_TOKEN_REQUIRED` or `BUYER_TOKEN_INVALID`: the event limits seats per
    /// buyer and the request has no valid buyer token. Nothing is recorded.
    #[oai(status = 401)]
    Unauthorized(Json<ErrorBody>),
    /// `ADMISSION_REQUIRED`: the event is queued and the request has no valid
    /// `Admission-Token` for this event and buyer. Nothing is recorded.
    #[oai(status = 403)]
    Forbidden(Json<ErrorBody>),
    /// `EVENT_NOT_FOUND`.
    #[oai(status = 404)]
    NotFound(Json<ErrorBody>),
    /// `SOLD_OUT`: fewer seats remain than requested; or `BUYER_LIMIT`: the buyer
    /// would have more seats than the event allows one buyer. Nothing was sold and
    /// nothing is kept under the key: a repeat is decided again.
    #[oai(status = 409)]
    SoldOut(Json<ErrorBody>),
    /// `PAYLOAD_TOO_LARGE`.
    #[oai(status = 413)]
    PayloadTooLarge(Json<ErrorBody>),
    /// `UNSUPPORTED_MEDIA_TYPE`.
    #[oai(status = 415)]
    UnsupportedMediaType(Json<ErrorBody>),
    /// `IDEMPOTENCY_KEY_REUSED`: the key's sale was made with another quantity (or
    /// the key holds seats); nothing was sold.
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

api_errors!(PurchaseResponse {
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

#[OpenApi]
impl PurchaseApi {
    /// Buy seats of the default event
    ///
    /// The seed-compatible purchase. Send a fresh `Idempotency-Key` per intended
    /// purchase and repeat it on retries: a repeat gets the sale back and never sells
    /// twice (a refusal is not kept: a repeat is decided again).
    #[oai(
        path = "/api/v1/purchase",
        method = "post",
        tag = "Tag::Purchases",
        operation_id = "purchase"
    )]
    async fn purchase(
        &self,
        /// Unique per intended purchase; 1–255 printable ASCII characters.
        #[oai(name = "Idempotency-Key")]
        key: Header<IdempotencyKey>,
        body: Json<PurchaseRequest>,
        auth: BuyerAuth,
        state: Data<&Arc<AppState>>,
    ) -> PurchaseResponse {
        let identity = Identity::of(&state, &auth);
        respond(
            buy(
                &state,
                state.default_event,
                &key.0,
                body.0.quantity,
                &identity,
            )
            .await,
        )
    }

    /// Buy seats of an event
    #[oai(
        path = "/api/v1/events/:id/purchase",
        method = "post",
        tag = "Tag::Purchases",
        operation_id = "purchaseEvent"
    )]
    async fn purchase_event(
        &self,
        /// Event id.
        id: Path<Uuid>,
        /// Unique per intended purchase; 1–255 printable ASCII characters.
        #[oai(name = "Idempotency-Key")]
        key: Header<IdempotencyKey>,
        body: Json<PurchaseRequest>,
        /// For a queued event: the token its waiting room gave this buyer.
        #[oai(name = "Admission-Token")]
        admission: Header<Option<String>>,
        auth: BuyerAuth,
        state: Data<&Arc<AppState>>,
    ) -> PurchaseResponse {
        let identity = Identity::for_event(&state, &auth, id.0, admission.0.as_deref());
        respond(buy(&state, id.0, &key.0, body.0.quantity, &identity).await)
    }
}

async fn buy(
    state: &AppState,
    event: Uuid,
    key: &IdempotencyKey,
    quantity: Quantity,
    identity: &Identity,
) -> Result<PurchaseResponse, ApiError> {
    let decision = state
        .gate
        .purchase(event, &identity.claim(key, quantity))
        .await?;
    let replayed = decision.replayed.then_some(true);
    record_outcome(&decision);
    match decision.outcome {
        Outcome::Done(sale) => Ok(PurchaseResponse::Ok(
            Body(PurchaseOk::new(event, &sale)),
            replayed,
        )),
        refused => Err(refusal(refused, identity)),
    }
}
