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
use super::types::time_of_ms;
use super::{AppState, Tag};
use crate::db;
use crate::domain::Buyer;
use crate::gate::recovery::Mode;
use crate::queue::{Held, Room, Standing, Ticket, admission_expires_ms};

#[derive(Default)]
pub struct QueueApi;

/// Where a buyer stands in the waiting room.
#[derive(Debug, Default, Object)]
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
    /// When the admission token expires (or expired).
    #[oai(skip_serializing_if_is_none)]
    pub expires_at: Option<DateTime<Utc>>,
    /// `true` when the admission's window passed unused: the ticket is spent. Join
    /// again (`POST …/queue`) for a new place at the back.
    #[oai(skip_serializing_if_is_none)]
    pub admission_expired: Option<bool>,
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
    // The ticket just issued is missing only if the room was lost meanwhile.
    let lost = || {
        ApiError::from(crate::Error::RecoveryPending(
            "the waiting room is being restored".into(),
        ))
    };
    let (mut held, mut room) = joined(state, event, &buyer, None).await?;
    let mut stands = standing(state, event, &buyer, held, &room, lost).await?;
    if let Answer::Expired { .. } = stands {
        // A spent ticket: joining again is joining at the back.
        (held, room) = joined(state, event, &buyer, Some(held.ticket)).await?;
        stands = standing(state, event, &buyer, held, &room, lost).await?;
    }
    crate::metrics::queue_joined();
    let status = render(state, event, &buyer, held, &room, stands)?;
    Ok(JoinResponse::Accepted(Json(status)))
}

/// The buyer's ticket (`spent`: a new one at the back in place of that one) and the
/// room, bringing the room back first when Redis lacks it.
async fn joined(
    state: &AppState,
    event: Uuid,
    buyer: &Buyer,
    spent: Option<Ticket>,
) -> Result<(Held, Room), ApiError> {
    if let Some(joined) = state.queue.join(event, buyer, spent).await? {
        return Ok(joined);
    }
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
    let recovery = state.gate.recovery();
    recovery.ensure(event).await?;
    if let Some(joined) = state.queue.join(event, buyer, spent).await? {
        return Ok(joined);
    }
    // The event was on sale without its room (its keys deleted by hand): rebuilt.
    recovery.ensure_event(&row, Mode::Force).await?;
    Ok(state
        .queue
        .join(event, buyer, spent)
        .await?
        .ok_or_else(|| {
            crate::Error::RecoveryPending("the waiting room is being restored".into())
        })?)
}

async fn status(
    state: &AppState,
    event: Uuid,
    ticket: &str,
    auth: &BuyerAuth,
) -> Result<StatusResponse, ApiError> {
    let buyer = buyer(state, auth)?;
    let not_found = ticket_not_found;
    let asked = Ticket::parse(ticket).ok_or_else(not_found)?;
    let (held, room) = state
        .queue
        .poll(event, &buyer)
        .await?
        .ok_or_else(not_found)?;
    let held = held
        .filter(|held| held.ticket == asked)
        .ok_or_else(not_found)?;
    let stands = standing(state, event, &buyer, held, &room, ticket_not_found).await?;
    let status = render(state, event, &buyer, held, &room, stands)?;
    Ok(StatusResponse::Ok(Json(status)))
}

/// Where a buyer stands, for the answer.
enum Answer {
    Standing(Standing),
    /// Admitted, with a window until `expires_ms`; `first` when this answer is the
    /// first to tell the buyer.
    Admitted {
        admitted_at_ms: i64,
        expires_ms: i64,
        first: bool,
    },
    /// Admitted, and the window passed unused.
    Expired {
        admitted_at_ms: i64,
        expires_ms: i64,
    },
}

/// Beyond the longest poll interval, how late a buyer who polls as told may learn
/// of their admission (a poll's own round trip, a busy client).
const LEARN_SLACK_MS: i64 = 2_000;

/// Where `held` stands in `room` (`missing`: the error when the room does not know
/// the ticket); once admitted, the admission's window, which the first answer that
/// tells the buyer of it (from any replica) starts (see `queue`).
async fn standing(
    state: &AppState,
    event: Uuid,
    buyer: &Buyer,
    held: Held,
    room: &Room,
    missing: impl FnOnce() -> ApiError,
) -> Result<Answer, ApiError> {
    let standing = room
        .standing(held.ticket, held.admitted_at_ms)
        .ok_or_else(missing)?;
    let Standing::Admitted { admitted_at_ms } = standing else {
        return Ok(Answer::Standing(standing));
    };
    let (served_ms, first) = state.queue.served(event, buyer, room.now_ms).await?;
    let learn_within_ms = i64::try_from(Standing::longest_poll_ms(state.policy.queue_poll_max_ms))
        .unwrap_or(i64::MAX)
        .saturating_add(LEARN_SLACK_MS);
    let expires_ms = admission_expires_ms(
        admitted_at_ms,
        served_ms,
        learn_within_ms,
        room.settings.admission_seconds,
    );
    if expires_ms <= room.now_ms {
        return Ok(Answer::Expired {
            admitted_at_ms,
            expires_ms,
        });
    }
    Ok(Answer::Admitted {
        admitted_at_ms,
        expires_ms,
        first,
    })
}

fn ticket_not_found() -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        ErrorCode::TicketNotFound,
        "no such ticket of this buyer in this event's waiting room",
    )
}

/// The first answer that tells a buyer of its admission: how late it came, and how
/// long the buyer waited from joining.
fn count_admission(held: &Held, room: &Room, admitted_at_ms: i64) {
    let ms = |from: i64, to: i64| Duration::from_millis((to - from).max(0) as u64);
    let joined_ms = held.joined_ms.unwrap_or(admitted_at_ms);
    crate::metrics::queue_admission(
        ms(admitted_at_ms, room.now_ms),
        ms(joined_ms, admitted_at_ms),
    );
}

/// What a buyer is told about their ticket, joining or polling: where it stands, or,
/// once admitted, the admission token.
fn render(
    state: &AppState,
    event: Uuid,
    buyer: &Buyer,
    held: Held,
    room: &Room,
    stands: Answer,
) -> Result<QueueStatus, ApiError> {
    let joined = room.early + room.late;
    let admitted = room.admitted().min(joined);
    crate::metrics::queue_room(event, joined - admitted, admitted);
    let time = time_of_ms;
    let mut status = QueueStatus {
        ticket: held.ticket.to_string(),
        opens_at: time(room.settings.opens_at_ms),
        ..QueueStatus::default()
    };
    match stands {
        Answer::Standing(standing) => {
            status.poll_after_ms = Some(standing.poll_after_ms(state.policy.queue_poll_max_ms));
            let (position, wait_ms) = match standing {
                Standing::BeforeOpening {
                    in_draw,
                    opens_in_ms,
                } => (in_draw, opens_in_ms),
                Standing::Waiting { position, wait_ms } => (position, wait_ms),
                Standing::Admitted { .. } => unreachable!("admissions are answered below"),
            };
            status.position = Some(position);
            status.estimated_wait_seconds = Some(wait_ms.div_ceil(1000));
        }
        Answer::Admitted {
            admitted_at_ms,
            expires_ms,
            first,
        } => {
            if first {
                count_admission(&held, room, admitted_at_ms);
            }
            let admissions = state.credentials.admissions.as_ref().ok_or_else(|| {
                crate::Error::Startup("queued event, but no BOXOFFICE_ADMISSION_KEY".into())
            })?;
            status.admitted = true;
            status.admission_token = Some(admissions.issue(event, buyer, expires_ms)?);
            status.admitted_at = Some(time(admitted_at_ms));
            status.expires_at = Some(time(expires_ms.div_euclid(1000) * 1000));
        }
        Answer::Expired {
            admitted_at_ms,
            expires_ms,
        } => {
            status.admitted_at = Some(time(admitted_at_ms));
            status.expires_at = Some(time(expires_ms.div_euclid(1000) * 1000));
            status.admission_expired = Some(true);
        }
    }
    Ok(status)
}
