//! The waiting room of a queued event: join, then poll until admitted (see `queue`).

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use poem::http::StatusCode;
use poem::web::Data;
use poem_openapi::param::Path;
use poem_openapi::payload::Json;
use poem_openapi::{ApiResponse, Object, OpenApi};
use uuid::Uuid;

use super::auth::{BuyerAuth, Identity};
use super::error::{ApiError, ErrorBody, ErrorCode, api_errors, bad_request, respond};
use super::{AppState, Tag};
use crate::db;
use crate::domain::Buyer;
use crate::queue::{Held, Room, Standing, Ticket, admission_expires_ms};

pub struct QueueApi;

/// Where a buyer stands in the waiting room.
#[derive(Debug, Object)]
#[oai(rename_all = "camelCase")]
pub struct QueueStatus {
    /// The buyer's ticket: joining again returns the same one.
    pub ticket: String,
    /// Whether the buyer may hold and buy now, with `admissionToken`.
    pub admitted: bool,
    /// Places to go before admission (1: next). Before `opensAt`, the number of
    /// buyers in the draw: everyone who joins before the opening gets a uniformly
    /// random place at it. From the opening on, it only goes down.
    #[oai(skip_serializing_if_is_none)]
    pub position: Option<u64>,
    /// Estimated seconds until admission.
    #[oai(skip_serializing_if_is_none)]
    pub estimated_wait_seconds: Option<u64>,
    /// Poll again after this many milliseconds (spread out by position).
    #[oai(skip_serializing_if_is_none)]
    pub poll_after_ms: Option<u64>,
    /// When the waiting room opens.
    pub opens_at: DateTime<Utc>,
    /// Send as `Admission-Token` with holds and purchases of this event, with the
    /// same buyer token.
    #[oai(skip_serializing_if_is_none)]
    pub admission_token: Option<String>,
    /// When the buyer was admitted.
    #[oai(skip_serializing_if_is_none)]
    pub admitted_at: Option<DateTime<Utc>>,
    /// When the admission token expires.
    #[oai(skip_serializing_if_is_none)]
    pub expires_at: Option<DateTime<Utc>>,
}

#[derive(ApiResponse)]
#[oai(bad_request_handler = "bad_request")]
pub enum JoinResponse {
    /// In the waiting room (or admitted already).
    #[oai(status = 202)]
    Accepted(Json<QueueStatus>),
    /// `INVALID_PARAMETER`.
    #[oai(status = 400)]
    BadRequest(Json<ErrorBody>),
    /// `BUYER_TOKEN_REQUIRED` or `BUYER_TOKEN_INVALID`.
    #[oai(status = 401)]
    Unauthorized(Json<ErrorBody>),
    /// `EVENT_NOT_FOUND`.
    #[oai(status = 404)]
    NotFound(Json<ErrorBody>),
    /// `EVENT_NOT_QUEUED`: anyone may hold and buy at once.
    #[oai(status = 409)]
    NotQueued(Json<ErrorBody>),
    /// `INTERNAL_ERROR`.
    #[oai(status = 500)]
    Internal(Json<ErrorBody>),
    /// `SERVICE_UNAVAILABLE`.
    #[oai(status = 503)]
    Unavailable(Json<ErrorBody>, #[oai(header = "Retry-After")] u32),
}

api_errors!(JoinResponse {
    400 => BadRequest,
    401 => Unauthorized,
    404 => NotFound,
    409 => NotQueued,
    unavailable => Unavailable,
    internal => Internal,
});

#[derive(ApiResponse)]
#[oai(bad_request_handler = "bad_request")]
pub enum StatusResponse {
    /// Where the ticket stands; once admitted, the admission token.
    #[oai(status = 200)]
    Ok(Json<QueueStatus>),
    /// `INVALID_PARAMETER`.
    #[oai(status = 400)]
    BadRequest(Json<ErrorBody>),
    /// `BUYER_TOKEN_REQUIRED` or `BUYER_TOKEN_INVALID`: a ticket is read with its
    /// buyer's token.
    #[oai(status = 401)]
    Unauthorized(Json<ErrorBody>),
    /// `TICKET_NOT_FOUND`: not this buyer's ticket, or no such waiting room.
    #[oai(status = 404)]
    NotFound(Json<ErrorBody>),
    /// `INTERNAL_ERROR`.
    #[oai(status = 500)]
    Internal(Json<ErrorBody>),
    /// `SERVICE_UNAVAILABLE`.
    #[oai(status = 503)]
    Unavailable(Json<ErrorBody>, #[oai(header = "Retry-After")] u32),
}

api_errors!(StatusResponse {
    400 => BadRequest,
    401 => Unauthorized,
    404 => NotFound,
    unavailable => Unavailable,
    internal => Internal,
});

#[OpenApi]
impl QueueApi {
    /// Join the waiting room
    ///
    /// One ticket per buyer (the `sub` of the buyer token): joining again returns it.
    #[oai(
        path = "/api/v1/events/:id/queue",
        method = "post",
        tag = "Tag::Queue",
        operation_id = "joinQueue"
    )]
    async fn join(
        &self,
        /// Event id.
        id: Path<Uuid>,
        auth: BuyerAuth,
        state: Data<&Arc<AppState>>,
    ) -> JoinResponse {
        respond(join(&state, id.0, &auth).await)
    }

    /// Where a ticket stands
    ///
    /// O(1) for the service: poll no sooner than `pollAfterMs`.
    #[oai(
        path = "/api/v1/events/:id/queue/:ticket",
        method = "get",
        tag = "Tag::Queue",
        operation_id = "queueStatus"
    )]
    async fn status(
        &self,
        /// Event id.
        id: Path<Uuid>,
        /// The ticket joining gave.
        ticket: Path<String>,
        auth: BuyerAuth,
        state: Data<&Arc<AppState>>,
    ) -> StatusResponse {
        respond(status(&state, id.0, &ticket.0, &auth).await)
    }
}

fn buyer(state: &AppState, auth: &BuyerAuth) -> Result<Buyer, ApiError> {
    let identity = Identity::of(state, auth);
    identity.buyer.clone().ok_or_else(|| identity.required())
}

async fn join(state: &AppState, event: Uuid, auth: &BuyerAuth) -> Result<JoinResponse, ApiError> {
    let buyer = buyer(state, auth)?;
    let joined = match state.queue.join(event, &buyer).await? {
        Some(joined) => joined,
        None => {
            // Not in Redis: no such event, not queued, or to be brought back.
            let row = db::event(&state.db, event)
                .await?
                .ok_or(crate::Error::EventNotFound(event))?;
            if row.queue().is_none() {
                return Err(ApiError::new(
                    StatusCode::CONFLICT,
                    ErrorCode::EventNotQueued,
                    "this event has no waiting room: hold or buy at once",
                ));
            }
            state.gate.recovery().ensure(event).await?;
            state.queue.join(event, &buyer).await?.ok_or_else(|| {
                crate::Error::RecoveryPending("the waiting room is being restored".into())
            })?
        }
    };
    let (held, room) = joined;
    crate::metrics::queue_joined();
    let status = answer(state, event, &buyer, held, &room).await?;
    Ok(JoinResponse::Accepted(Json(status)))
}

async fn status(
    state: &AppState,
    event: Uuid,
    ticket: &str,
    auth: &BuyerAuth,
) -> Result<StatusResponse, ApiError> {
    let buyer = buyer(state, auth)?;
    let not_found = || {
        ApiError::new(
            StatusCode::NOT_FOUND,
            ErrorCode::TicketNotFound,
            "no such ticket of this buyer in this event's waiting room",
        )
    };
    let asked = Ticket::parse(ticket).ok_or_else(not_found)?;
    let (held, room) = state
        .queue
        .poll(event, &buyer)
        .await?
        .ok_or_else(not_found)?;
    let held = held
        .filter(|held| held.ticket == asked)
        .ok_or_else(not_found)?;
    let status = answer(state, event, &buyer, held, &room).await?;
    Ok(StatusResponse::Ok(Json(status)))
}

/// What a buyer is told about their ticket, joining or polling: where it stands, or,
/// once admitted, the admission token. The first answer that tells a buyer they are
/// admitted, from any replica, starts the token's window (see `queue`).
async fn answer(
    state: &AppState,
    event: Uuid,
    buyer: &Buyer,
    held: Held,
    room: &Room,
) -> Result<QueueStatus, ApiError> {
    let joined = room.early + room.late;
    let admitted = room.admitted().min(joined);
    crate::metrics::queue_room(event, joined - admitted, admitted);
    let ticket = held.ticket;
    let standing = room
        .standing(ticket, held.admitted_at_ms)
        .ok_or_else(|| crate::Error::UnexpectedReply(format!("ticket {ticket} not in {room:?}")))?;
    let time = |ms: i64| DateTime::from_timestamp_millis(ms).unwrap_or_default();
    let mut status = QueueStatus {
        ticket: ticket.to_string(),
        admitted: false,
        position: None,
        estimated_wait_seconds: None,
        poll_after_ms: Some(standing.poll_after_ms(state.queue_poll_max_ms)),
        opens_at: time(room.settings.opens_at_ms),
        admission_token: None,
        admitted_at: None,
        expires_at: None,
    };
    match standing {
        Standing::BeforeOpening {
            in_draw,
            opens_in_ms,
        } => {
            status.position = Some(in_draw);
            status.estimated_wait_seconds = Some(opens_in_ms.div_ceil(1000));
        }
        Standing::Waiting { position, wait_ms } => {
            status.position = Some(position);
            status.estimated_wait_seconds = Some(wait_ms.div_ceil(1000));
        }
        Standing::Admitted { admitted_at_ms } => {
            let admissions = state.admissions.as_ref().ok_or_else(|| {
                crate::Error::Startup("queued event, but no BOXOFFICE_ADMISSION_KEY".into())
            })?;
            let (served_ms, first) = state.queue.served(event, buyer, room.now_ms).await?;
            if first {
                let ms = |from: i64, to: i64| Duration::from_millis((to - from).max(0) as u64);
                let joined_ms = held.joined_ms.unwrap_or(admitted_at_ms);
                crate::metrics::queue_admission(
                    ms(admitted_at_ms, room.now_ms),
                    ms(joined_ms, admitted_at_ms),
                );
            }
            let expires_ms =
                admission_expires_ms(admitted_at_ms, served_ms, room.settings.admission_seconds);
            status.admitted = true;
            status.poll_after_ms = None;
            status.admission_token = Some(admissions.issue(event, buyer, expires_ms)?);
            status.admitted_at = Some(time(admitted_at_ms));
            status.expires_at = Some(time(expires_ms.div_euclid(1000) * 1000));
        }
    }
    Ok(status)
}
