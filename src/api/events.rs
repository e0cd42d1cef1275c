//! Events: the seed-compatible `GET /api/v1/event` (default event) and the events
//! resource. Seat counts come from Redis, so they are exact the moment a sale is made.

use std::sync::Arc;

use poem::http::StatusCode;
use poem::web::Data;
use poem_openapi::param::{Path, Query};
use poem_openapi::payload::Json;
use poem_openapi::{ApiResponse, Object, OpenApi};
use uuid::Uuid;

use super::auth::{AdminAuth, authorize};
use super::error::{ApiError, ErrorBody, ErrorCode, api_errors, bad_request, respond};
use super::types::{EventName, Omittable, time_of_ms};
use super::{AppState, Tag};
use crate::db::{self, EventRow};
use crate::domain::{DEFAULT_HOLD_SECONDS, HoldSeconds, SeatLimit, Seats};
use crate::queue::QueueSettings;

#[derive(Default)]
pub struct EventsApi;

/// An event and its seats.
#[derive(Debug, Clone, Object)]
#[oai(rename_all = "camelCase")]
pub struct Event {
    pub id: Uuid,
    pub name: String,
    pub total_seats: i64,
    /// Seats sold (cancelled sales no longer count).
    pub seats_sold: i64,
    /// Seats held by holds not yet confirmed, released or expired.
    pub seats_held: i64,
    /// Seats that can still be bought or held: total − sold − held.
    pub seats_remaining: i64,
    /// How long a hold of this event lasts, in seconds.
    pub hold_seconds: i32,
    /// Most seats one buyer may have (sold and held); absent: no limit.
    #[oai(skip_serializing_if_is_none)]
    pub max_per_buyer: Option<i32>,
    // A queued event's waiting room. (Documented on `WaitingRoom`: a doc comment on a
    // field of another schema's type becomes an `allOf` that client generators
    // handle badly.)
    #[oai(skip_serializing_if_is_none)]
    pub queue: Option<WaitingRoom>,
}

/// A queued event's waiting room (set at creation, which needs a server with
/// `BOXOFFICE_ADMISSION_KEY` and `BOXOFFICE_BUYER_JWT_KEY`; absent: anyone may buy at
/// once): buyers join it (`POST …/queue`), and from `opensAt`
/// are admitted `admitPerSecond` at a time, those who joined before `opensAt` in a
/// random order, later ones first come, first served. Holds and purchases then need
/// the buyer's token and an `Admission-Token`, valid for `admissionSeconds`.
#[derive(Debug, Clone, Object)]
#[oai(rename_all = "camelCase")]
pub struct WaitingRoom {
    pub opens_at: chrono::DateTime<chrono::Utc>,
    #[oai(validator(minimum(value = "1"), maximum(value = "100000")))]
    pub admit_per_second: u32,
    #[oai(validator(minimum(value = "1"), maximum(value = "3600")))]
    pub admission_seconds: u32,
}

/// A new event.
#[derive(Debug, Object)]
#[oai(rename_all = "camelCase")]
pub struct NewEvent {
    pub name: EventName,
    pub total_seats: Seats,
    /// How long a hold lasts, in seconds: 1 to the server's maximum
    /// (`BOXOFFICE_MAX_HOLD_SECONDS`, 3600 unless configured). Default 600.
    pub hold_seconds: Omittable<HoldSeconds>,
    /// Most seats one buyer may have, sold and held together. Purchases and holds
    /// then need a buyer token (`BuyerToken`). Absent: no limit.
    pub max_per_buyer: Omittable<SeatLimit>,
    // Makes the event queued; absent, anyone may buy at once. (Documented on
    // `WaitingRoom`, see `Event::queue`.)
    pub queue: Omittable<WaitingRoom>,
}

#[derive(ApiResponse)]
#[oai(bad_request_handler = "bad_request")]
pub enum EventResponse {
    /// The event.
    #[oai(status = 200)]
    Ok(Json<Event>),
    /// `INVALID_PARAMETER`: the id is not a UUID.
    #[oai(status = 400)]
    BadRequest(Json<ErrorBody>),
    /// `EVENT_NOT_FOUND`.
    #[oai(status = 404)]
    NotFound(Json<ErrorBody>),
    /// `INTERNAL_ERROR`.
    #[oai(status = 500)]
    Internal(Json<ErrorBody>),
    /// `SERVICE_UNAVAILABLE`.
    #[oai(status = 503)]
    Unavailable(Json<ErrorBody>, #[oai(header = "Retry-After")] u32),
}

api_errors!(EventResponse {
    400 => BadRequest,
    404 => NotFound,
    unavailable => Unavailable,
    internal => Internal,
});

#[derive(ApiResponse)]
#[oai(bad_request_handler = "bad_request")]
pub enum EventListResponse {
    /// A page of events, oldest first (seat counts at most a second old). When more
    /// follow, `Link` names the next page (`rel="next"`).
    #[oai(status = 200)]
    Ok(Json<Vec<Event>>, #[oai(header = "Link")] Option<String>),
    /// `INVALID_PARAMETER`: `limit` is not 1–500, or `after` is not a UUID.
    #[oai(status = 400)]
    BadRequest(Json<ErrorBody>),
    /// `EVENT_NOT_FOUND`: `after` names no event.
    #[oai(status = 404)]
    NotFound(Json<ErrorBody>),
    /// `INTERNAL_ERROR`.
    #[oai(status = 500)]
    Internal(Json<ErrorBody>),
    /// `SERVICE_UNAVAILABLE`.
    #[oai(status = 503)]
    Unavailable(Json<ErrorBody>, #[oai(header = "Retry-After")] u32),
}

api_errors!(EventListResponse {
    400 => BadRequest,
    404 => NotFound,
    unavailable => Unavailable,
    internal => Internal,
});

#[derive(ApiResponse)]
#[oai(bad_request_handler = "bad_request")]
pub enum CreateEventResponse {
    /// Created; `Location` is its URL.
    #[oai(status = 201)]
    Created(Json<Event>, #[oai(header = "Location")] String),
    /// `INVALID_BODY` (name must be 1–200 characters, totalSeats 1–1,000,000,
    /// holdSeconds at least 1, the body as the schema says).
    #[oai(status = 400)]
    BadRequest(Json<ErrorBody>),
    /// `UNAUTHORIZED`: missing or wrong bearer token.
    #[oai(status = 401)]
    Unauthorized(Json<ErrorBody>),
    /// `ADMIN_DISABLED`: the server has no `ADMIN_TOKEN`.
    #[oai(status = 403)]
    Forbidden(Json<ErrorBody>),
    /// `PAYLOAD_TOO_LARGE`.
    #[oai(status = 413)]
    PayloadTooLarge(Json<ErrorBody>),
    /// `UNSUPPORTED_MEDIA_TYPE`.
    #[oai(status = 415)]
    UnsupportedMediaType(Json<ErrorBody>),
    /// `FEATURE_NOT_CONFIGURED`: `maxPerBuyer` needs a server with
    /// `BOXOFFICE_BUYER_JWT_KEY`, `queue` one with `BOXOFFICE_ADMISSION_KEY` too.
    /// `INVALID_EVENT_SETTING`: `holdSeconds` above the server's maximum
    /// (`BOXOFFICE_MAX_HOLD_SECONDS`), or `queue.opensAt` not within the last 24
    /// hours or the next 366 days.
    #[oai(status = 422)]
    NotConfigured(Json<ErrorBody>),
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

api_errors!(CreateEventResponse {
    400 => BadRequest,
    401 => Unauthorized,
    403 => Forbidden,
    413 => PayloadTooLarge,
    415 => UnsupportedMediaType,
    422 => NotConfigured,
    unavailable => Unavailable,
    internal => Internal,
});

#[OpenApi]
impl EventsApi {
    /// Seats of the default event
    ///
    /// The seed-compatible view of the event that `POST /api/v1/purchase` sells.
    #[oai(
        path = "/api/v1/event",
        method = "get",
        tag = "Tag::Events",
        operation_id = "defaultEvent"
    )]
    async fn default_event(&self, state: Data<&Arc<AppState>>) -> EventResponse {
        event_response(&state, state.default_event).await
    }

    /// One event
    #[oai(
        path = "/api/v1/events/:id",
        method = "get",
        tag = "Tag::Events",
        operation_id = "getEvent"
    )]
    async fn event(
        &self,
        /// Event id.
        id: Path<Uuid>,
        state: Data<&Arc<AppState>>,
    ) -> EventResponse {
        event_response(&state, id.0).await
    }

    /// Events, a page at a time
    ///
    /// Oldest first, `limit` per page (default 100); follow `Link: <…>; rel="next"`,
    /// or pass the last id of a page as `after`. Each page is computed at most once a
    /// second per replica, so its seat counts may be up to a second old; an event's
    /// own `GET` is exact.
    #[oai(
        path = "/api/v1/events",
        method = "get",
        tag = "Tag::Events",
        operation_id = "listEvents"
    )]
    async fn events(
        &self,
        /// Events per page, 1–500.
        #[oai(validator(minimum(value = "1"), maximum(value = "500")))]
        limit: Query<Option<u32>>,
        /// The id of the last event of the previous page.
        after: Query<Option<Uuid>>,
        state: Data<&Arc<AppState>>,
    ) -> EventListResponse {
        let limit = limit.0.unwrap_or(DEFAULT_PAGE);
        let page = state
            .instance
            .reads
            .events
            .get((after.0, limit), || page(&state, after.0, limit))
            .await;
        respond(page.map(|page| {
            let next = page
                .next
                .map(|last| format!("</api/v1/events?after={last}&limit={limit}>; rel=\"next\""));
            EventListResponse::Ok(Json(page.events), next)
        }))
    }

    /// Create an event (admin)
    #[oai(
        path = "/api/v1/events",
        method = "post",
        tag = "Tag::Events",
        operation_id = "createEvent"
    )]
    async fn create_event(
        &self,
        auth: AdminAuth,
        body: Json<NewEvent>,
        state: Data<&Arc<AppState>>,
    ) -> CreateEventResponse {
        respond(create_event(&state, &auth, &body).await)
    }
}

/// Events per page of `GET /api/v1/events` when the request names no `limit`.
const DEFAULT_PAGE: u32 = 100;

/// A page of events, and the id to continue after when more follow.
#[derive(Clone)]
pub struct Page {
    events: Vec<Event>,
    next: Option<Uuid>,
}

/// Up to `limit` events after `after`, with their seats: one query and `limit` reads
/// of counters at most.
async fn page(state: &AppState, after: Option<Uuid>, limit: u32) -> Result<Page, ApiError> {
    // One more row than asked says whether another page follows.
    let mut rows = db::events_page(&state.db, after, i64::from(limit) + 1).await?;
    if let Some(after) = after
        && rows.is_empty()
        && db::event(&state.db, after).await?.is_none()
    {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            ErrorCode::EventNotFound,
            format!("after names no event ({after}): pass the id of the last event of a page"),
        ));
    }
    let more = rows.len() > limit as usize;
    rows.truncate(limit as usize);
    let mut events = Vec::with_capacity(rows.len());
    for row in rows {
        events.push(with_seats(state, row).await?);
    }
    let next = more.then(|| events.last().map(|e| e.id)).flatten();
    Ok(Page { events, next })
}

async fn create_event(
    state: &AppState,
    auth: &AdminAuth,
    new: &NewEvent,
) -> Result<CreateEventResponse, ApiError> {
    authorize(state, auth)?;
    let settings = settings_of(state, new)?;
    let row = state
        .gate
        .create_event(&state.db, new.name.as_str(), settings)
        .await?;
    let event = with_seats(state, row).await?;
    tracing::info!(event = %event.id, seats = event.total_seats, "event created");
    let location = format!("/api/v1/events/{}", event.id);
    Ok(CreateEventResponse::Created(Json(event), location))
}

/// The settings of a new event, once this server can take them: a hold time within
/// its maximum, an opening within range, and the keys a limit or a queue needs.
fn settings_of(state: &AppState, new: &NewEvent) -> Result<db::EventSettings, ApiError> {
    let hold_seconds = new
        .hold_seconds
        .0
        .map_or(DEFAULT_HOLD_SECONDS, HoldSeconds::get);
    // Well formed (the schema's bounds hold) but outside this server's: 422, as a
    // schema-valid request that cannot be taken.
    let invalid = |message: String| {
        ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            ErrorCode::InvalidEventSetting,
            message,
        )
    };
    if hold_seconds > state.policy.max_hold_seconds {
        return Err(invalid(format!(
            "holdSeconds must be from 1 to {} (BOXOFFICE_MAX_HOLD_SECONDS)",
            state.policy.max_hold_seconds
        )));
    }
    if let Some(queue) = &new.queue.0 {
        let now = chrono::Utc::now().timestamp_millis();
        QueueSettings::check_opening(queue.opens_at.timestamp_millis(), now).map_err(invalid)?;
    }
    let not_configured = |message: &str| {
        ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            ErrorCode::FeatureNotConfigured,
            message,
        )
    };
    if new.max_per_buyer.0.is_some() && state.credentials.buyer_tokens.is_none() {
        return Err(not_configured(
            "maxPerBuyer needs buyer tokens, and this server has no BOXOFFICE_BUYER_JWT_KEY: \
             set it, or create the event without maxPerBuyer",
        ));
    }
    if new.queue.0.is_some()
        && (state.credentials.admissions.is_none() || state.credentials.buyer_tokens.is_none())
    {
        return Err(not_configured(
            "a queue needs admission and buyer tokens, and this server lacks \
             BOXOFFICE_ADMISSION_KEY or BOXOFFICE_BUYER_JWT_KEY: set both, or create the \
             event without a queue",
        ));
    }
    Ok(db::EventSettings {
        seats: new.total_seats,
        hold_seconds,
        max_per_buyer: new.max_per_buyer.0.map(SeatLimit::get),
        queue: new.queue.0.as_ref().map(|q| QueueSettings {
            opens_at_ms: q.opens_at.timestamp_millis(),
            admit_per_second: q.admit_per_second,
            admission_seconds: q.admission_seconds,
            seed: Uuid::new_v4().as_u64_pair().0,
        }),
    })
}

async fn event_response(state: &AppState, id: Uuid) -> EventResponse {
    let event = async {
        let row = db::event(&state.db, id)
            .await?
            .ok_or(crate::Error::EventNotFound(id))?;
        Ok(EventResponse::Ok(Json(with_seats(state, row).await?)))
    };
    respond(event.await)
}

async fn with_seats(state: &AppState, row: EventRow) -> crate::Result<Event> {
    let inventory = state.gate.inventory(row.id).await?;
    let queue = row.queue();
    Ok(Event {
        id: row.id,
        name: row.name,
        total_seats: inventory.total,
        seats_sold: inventory.sold,
        seats_held: inventory.held,
        seats_remaining: inventory.available(),
        hold_seconds: row.hold_seconds,
        max_per_buyer: row.max_per_buyer,
        queue: queue.map(|q| WaitingRoom {
            opens_at: time_of_ms(q.opens_at_ms),
            admit_per_second: q.admit_per_second,
            admission_seconds: q.admission_seconds,
        }),
    })
}
