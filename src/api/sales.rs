//! Sales as PostgreSQL records them, and their cancellation by an admin: the seats
//! go back on sale and to the buyer's allowance, the row is marked cancelled through
//! the stream, and a replay of the original purchase still returns the sale (it
//! happened).

use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use poem::http::StatusCode;
use poem::web::Data;
use poem_openapi::param::Path;
use poem_openapi::payload::Json;
use poem_openapi::{ApiResponse, Object, OpenApi};
use uuid::Uuid;

use super::auth::{AdminAuth, authorize};
use super::error::{ApiError, ErrorBody, ErrorCode, api_errors, bad_request, respond};
use super::{AppState, Tag};
use crate::db::{self, PurchaseRow};
use crate::records::Entry;

#[derive(Default)]
pub struct SalesApi;

/// A sale as the record holds it.
#[derive(Debug, Object)]
#[oai(rename_all = "camelCase")]
pub struct SaleInfo {
    pub purchase_id: Uuid,
    pub event_id: Uuid,
    pub quantity: i16,
    /// When Redis made the sale.
    pub sold_at: DateTime<Utc>,
    /// Made by confirming a hold (whose id it carries).
    pub via_hold: bool,
    /// When an admin cancelled it; absent while it stands.
    #[oai(skip_serializing_if_is_none)]
    pub cancelled_at: Option<DateTime<Utc>>,
}

#[derive(ApiResponse)]
#[oai(bad_request_handler = "bad_request")]
pub enum SaleResponse {
    /// The sale.
    #[oai(status = 200)]
    Ok(Json<SaleInfo>),
    /// `INVALID_PARAMETER`.
    #[oai(status = 400)]
    BadRequest(Json<ErrorBody>),
    /// `PURCHASE_NOT_FOUND`.
    #[oai(status = 404)]
    NotFound(Json<ErrorBody>),
    /// `INTERNAL_ERROR`.
    #[oai(status = 500)]
    Internal(Json<ErrorBody>),
    /// `SERVICE_UNAVAILABLE`.
    #[oai(status = 503)]
    Unavailable(Json<ErrorBody>, #[oai(header = "Retry-After")] u32),
}

api_errors!(SaleResponse {
    400 => BadRequest,
    404 => NotFound,
    unavailable => Unavailable,
    internal => Internal,
});

#[derive(ApiResponse)]
#[oai(bad_request_handler = "bad_request")]
pub enum CancelResponse {
    /// Cancelled, now or before (a repeat answers with the first cancellation's
    /// time). `cancelledAt` may take a moment to show on `GET` of the sale.
    #[oai(status = 200)]
    Ok(Json<SaleInfo>),
    /// `INVALID_PARAMETER`.
    #[oai(status = 400)]
    BadRequest(Json<ErrorBody>),
    /// `UNAUTHORIZED`: missing or wrong admin token.
    #[oai(status = 401)]
    Unauthorized(Json<ErrorBody>),
    /// `ADMIN_DISABLED`: the server has no `ADMIN_TOKEN`.
    #[oai(status = 403)]
    Forbidden(Json<ErrorBody>),
    /// `PURCHASE_NOT_FOUND`.
    #[oai(status = 404)]
    NotFound(Json<ErrorBody>),
    /// `RATE_LIMITED`: too many writes from this client; nothing done. Retry after `Retry-After` s.
    #[oai(status = 429)]
    RateLimited(Json<ErrorBody>, #[oai(header = "Retry-After")] u64),
    /// `INTERNAL_ERROR`.
    #[oai(status = 500)]
    Internal(Json<ErrorBody>),
    /// `SERVICE_UNAVAILABLE`: retry after `Retry-After` seconds (also when a sale
    /// just made is not in PostgreSQL after 2 s); a repeat never returns the seats
    /// twice.
    #[oai(status = 503)]
    Unavailable(Json<ErrorBody>, #[oai(header = "Retry-After")] u32),
}

api_errors!(CancelResponse {
    400 => BadRequest,
    401 => Unauthorized,
    403 => Forbidden,
    404 => NotFound,
    unavailable => Unavailable,
    internal => Internal,
});

#[OpenApi]
impl SalesApi {
    /// One sale
    #[oai(
        path = "/api/v1/events/:id/purchases/:purchaseId",
        method = "get",
        tag = "Tag::Sales",
        operation_id = "getSale"
    )]
    async fn sale(
        &self,
        /// Event id.
        id: Path<Uuid>,
        /// Purchase id (for a confirmed hold, the hold's id).
        #[oai(name = "purchaseId")]
        purchase_id: Path<Uuid>,
        state: Data<&Arc<AppState>>,
    ) -> SaleResponse {
        let sale = async {
            let (event, purchase) = (id.0, purchase_id.0);
            if let Some(row) = db::purchase(&state.db, event, purchase).await? {
                return Ok(SaleResponse::Ok(Json(info(&row, row.cancelled_at))));
            }
            // Just sold: read it where it waits for the consumer.
            match state.gate.unrecorded_sale(event, purchase).await? {
                Some(sale) => Ok(SaleResponse::Ok(Json(unrecorded(event, &sale)))),
                None => Err(not_found()),
            }
        };
        respond(sale.await)
    }

    /// Cancel a sale (admin)
    ///
    /// Its seats go back on sale, and back to the buyer's allowance on events with a
    /// limit. Cancelling again changes nothing.
    #[oai(
        path = "/api/v1/events/:id/purchases/:purchaseId/cancel",
        method = "post",
        tag = "Tag::Sales",
        operation_id = "cancelSale"
    )]
    async fn cancel(
        &self,
        auth: AdminAuth,
        /// Event id.
        id: Path<Uuid>,
        /// Purchase id.
        #[oai(name = "purchaseId")]
        purchase_id: Path<Uuid>,
        state: Data<&Arc<AppState>>,
    ) -> CancelResponse {
        respond(cancel(&state, &auth, id.0, purchase_id.0).await)
    }
}

async fn cancel(
    state: &AppState,
    auth: &AdminAuth,
    event: Uuid,
    purchase: Uuid,
) -> Result<CancelResponse, ApiError> {
    authorize(state, auth)?;
    let row = recorded(state, event, purchase).await?;
    if let Some(at) = row.cancelled_at {
        return Ok(CancelResponse::Ok(Json(info(&row, Some(at)))));
    }
    let quantity = u8::try_from(row.quantity).unwrap_or(u8::MAX);
    let cancelled = state
        .gate
        .cancel(event, purchase, quantity, row.buyer.as_deref())
        .await?;
    if !cancelled.replayed {
        crate::metrics::cancellation();
        tracing::info!(%event, %purchase, seats = quantity, "sale cancelled");
    }
    let at = DateTime::from_timestamp_micros(cancelled.at_micros).unwrap_or_default();
    Ok(CancelResponse::Ok(Json(info(&row, Some(at)))))
}

/// How long a cancellation waits for a sale on its way to PostgreSQL (the consumer
/// writes one within milliseconds while it runs) before it answers 503.
const RECORD_WAIT: Duration = Duration::from_secs(2);

/// The sale's row. Cancelling works from the row, which alone is certain to have the
/// sale's seats and buyer; a sale still in the stream is waited for a moment.
async fn recorded(state: &AppState, event: Uuid, purchase: Uuid) -> Result<PurchaseRow, ApiError> {
    if let Some(row) = db::purchase(&state.db, event, purchase).await? {
        return Ok(row);
    }
    if state.gate.unrecorded_sale(event, purchase).await?.is_none() {
        // Written (and trimmed from the stream) between the two reads, or no such sale.
        return db::purchase(&state.db, event, purchase)
            .await?
            .ok_or_else(not_found);
    }
    let give_up = Instant::now() + RECORD_WAIT;
    while Instant::now() < give_up {
        tokio::time::sleep(Duration::from_millis(50)).await;
        if let Some(row) = db::purchase(&state.db, event, purchase).await? {
            return Ok(row);
        }
    }
    Err(ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        ErrorCode::ServiceUnavailable,
        "the sale was just made and is still on its way to the record; retry in a moment",
    ))
}

fn not_found() -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        ErrorCode::PurchaseNotFound,
        "no sale with this id for this event",
    )
}

fn unrecorded(event: Uuid, sale: &Entry) -> SaleInfo {
    SaleInfo {
        purchase_id: sale.id,
        event_id: event,
        quantity: sale.quantity,
        sold_at: DateTime::from_timestamp_micros(sale.sold_at_micros).unwrap_or_default(),
        via_hold: sale.via_hold,
        cancelled_at: None,
    }
}

fn info(row: &PurchaseRow, cancelled_at: Option<DateTime<Utc>>) -> SaleInfo {
    SaleInfo {
        purchase_id: row.id,
        event_id: row.event_id,
        quantity: row.quantity,
        sold_at: row.sold_at,
        via_hold: row.via_hold,
        cancelled_at,
    }
}
