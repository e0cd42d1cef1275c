//! Every error the API answers with, and the one place that maps internal errors
//! and request-parsing failures to HTTP statuses and codes.

use poem::http::StatusCode;
use poem_openapi::error::{
    AuthorizationError, ContentTypeError, ParseParamError, ParsePathError, ParseRequestPayloadError,
};
use poem_openapi::{Enum, Object};

use crate::domain::Quantity;
use crate::error::Error;

/// Seconds a client is told to wait (`Retry-After`) when a dependency is down.
pub const RETRY_AFTER_SECS: u32 = 1;

/// Stable machine-readable error code of an `ErrorBody`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Enum)]
#[oai(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum ErrorCode {
    /// Fewer seats remain than the purchase asked for; nothing was sold.
    SoldOut,
    /// `Idempotency-Key` header missing, empty, longer than 255 characters or not
    /// printable ASCII.
    InvalidIdempotencyKey,
    /// `quantity` missing, not an integer, or outside 1–10.
    InvalidQuantity,
    /// Body is not valid JSON or not the expected object.
    InvalidBody,
    /// A path or query parameter is malformed (for example an event id that is not a UUID).
    InvalidParameter,
    /// The key was already used for a purchase with another quantity; nothing was sold.
    IdempotencyKeyReused,
    /// No event with this id.
    EventNotFound,
    /// No such route.
    NotFound,
    /// The route exists but not for this method.
    MethodNotAllowed,
    /// Body larger than the server accepts.
    PayloadTooLarge,
    /// The request (its body included) was not received and answered in time. A
    /// purchase may have been made: retry with the same `Idempotency-Key` to learn.
    RequestTimeout,
    /// `Content-Type` missing or not `application/json`.
    UnsupportedMediaType,
    /// Missing or wrong bearer token.
    Unauthorized,
    /// The event limits seats per buyer and the request carried no buyer token.
    BuyerTokenRequired,
    /// The buyer token is not valid: bad signature or algorithm, expired, no `sub`,
    /// or the server has no key to check it with.
    BuyerTokenInvalid,
    /// The buyer would have more seats (sold and held) than the event allows one
    /// buyer; nothing was sold or held.
    BuyerLimit,
    /// No hold with this id (never made, forgotten since, or lost with Redis' data).
    HoldNotFound,
    /// The hold expired or was released; nothing was sold. Make a new hold.
    HoldExpired,
    /// The hold was confirmed: the sale stands (an admin can cancel it).
    HoldConfirmed,
    /// No sale with this id for this event.
    PurchaseNotFound,
    /// The event is queued: a hold or purchase needs an `Admission-Token` from its
    /// waiting room, for this event and this buyer, not expired.
    AdmissionRequired,
    /// The event has no waiting room.
    EventNotQueued,
    /// No such ticket in the event's waiting room.
    TicketNotFound,
    /// The event asks for something this server is not configured for: a limit per
    /// buyer needs `BOXOFFICE_BUYER_JWT_KEY`, a waiting room also
    /// `BOXOFFICE_ADMISSION_KEY`. Nothing was created.
    FeatureNotConfigured,
    /// A setting of the event is well formed but outside what the server takes:
    /// `holdSeconds` above `BOXOFFICE_MAX_HOLD_SECONDS`, `queue.opensAt` not within
    /// the last 24 hours or the next 366 days. Nothing was created.
    InvalidEventSetting,
    /// The admin API is disabled because no admin token is configured.
    AdminDisabled,
    /// Too many write requests from this client (buyer or address): nothing was
    /// done or recorded; retry after `Retry-After` seconds.
    RateLimited,
    /// Redis or PostgreSQL is unreachable; retry after `Retry-After` seconds.
    ServiceUnavailable,
    /// A bug; the details are in the server's log under the request id.
    InternalError,
}

/// Body of every non-2xx response.
#[derive(Debug, Clone, Object)]
pub struct ErrorBody {
    // No doc comment here: poem-openapi would wrap the reference to `ErrorCode` in an
    // `allOf` to attach it, which client generators (openapi-python-client) drop the
    // whole schema over. `ErrorCode` documents itself.
    pub error: ErrorCode,
    /// Human-readable explanation; wording may change.
    pub message: String,
}

/// An error on its way to becoming a response.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub body: ErrorBody,
}

impl ApiError {
    pub fn new(status: StatusCode, error: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            status,
            body: ErrorBody {
                error,
                message: message.into(),
            },
        }
    }

    pub fn event_not_found() -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            ErrorCode::EventNotFound,
            "no event with this id: GET /api/v1/events lists the events",
        )
    }

    /// Maps a failure to extract the request (headers, path, body) to the API's own
    /// error. poem-openapi hands these over as opaque `poem::Error`s whose texts name
    /// its parsers' types; a client is told instead, in the API's words, which field
    /// or header to change and what a valid value looks like.
    pub fn from_request_error(err: poem::Error) -> Self {
        if let Some(e) = err.downcast_ref::<ParseParamError>() {
            if !e.name.eq_ignore_ascii_case("Idempotency-Key") {
                return Self::new(
                    StatusCode::BAD_REQUEST,
                    ErrorCode::InvalidParameter,
                    format!("the {} parameter is not valid (see /docs)", e.name),
                );
            }
            return Self::new(
                StatusCode::BAD_REQUEST,
                ErrorCode::InvalidIdempotencyKey,
                "send an Idempotency-Key header of 1 to 255 printable ASCII characters: \
                 a new one (a UUID, say) per purchase, the same one for its retries",
            );
        }
        if let Some(e) = err.downcast_ref::<ParsePathError>() {
            // `e.name` is poem-openapi's internal name (`param0`), not the documented one.
            let what = if e.reason.contains("invalid length: found 0") {
                "is empty (is the variable that holds it set?)"
            } else {
                "is not a UUID"
            };
            return Self::new(
                StatusCode::BAD_REQUEST,
                ErrorCode::InvalidParameter,
                format!(
                    "an id in the path {what}: event, hold and purchase ids are UUIDs \
                     as the API returns them, such as 01a220c6-8a7c-75ef-9c0b-53d5363b7420"
                ),
            );
        }
        if let Some(e) = err.downcast_ref::<ParseRequestPayloadError>() {
            return Self::from_payload_error(&e.reason);
        }
        if err.is::<ContentTypeError>() {
            return Self::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                ErrorCode::UnsupportedMediaType,
                "the body must be JSON sent with Content-Type: application/json",
            );
        }
        if err.is::<AuthorizationError>() {
            // Only the admin scheme can fail: a buyer token is optional.
            return Self::new(
                StatusCode::UNAUTHORIZED,
                ErrorCode::Unauthorized,
                "this call needs the admin token: send Authorization: Bearer <token>, \
                 where <token> is the server's ADMIN_TOKEN (a server started without \
                 one has the admin API disabled)",
            );
        }
        Self::from_status(err.status(), err.to_string())
    }

    /// poem-openapi reports a body that is not JSON with serde's message, one of the
    /// wrong shape as `Expected input type "PurchaseRequest", found …`, and a bad
    /// field as `failed to parse "<type>": <why> (occurred while parsing "<schema>")`,
    /// where `<why>` is this API's own rule when one of its types refused the value.
    fn from_payload_error(reason: &str) -> Self {
        let schema = reason
            .rsplit("(occurred while parsing \"")
            .next()
            .filter(|_| reason.contains("(occurred while parsing"))
            .or_else(|| reason.strip_prefix("Expected input type \""))
            .and_then(|rest| rest.split('"').next());
        let Some(schema) = schema else {
            let at = reason
                .rsplit_once(" at line ")
                .and_then(|(_, at)| at.split_once(" column "))
                .map(|(line, column)| format!(" (the error is at line {line}, column {column})"))
                .unwrap_or_default();
            return Self::new(
                StatusCode::BAD_REQUEST,
                ErrorCode::InvalidBody,
                format!("the body is not valid JSON{at}"),
            );
        };
        let whole_body_wrong = reason.starts_with("Expected input type");
        let (code, message) = match schema {
            "PurchaseRequest" | "HoldRequest" if !whole_body_wrong => (
                ErrorCode::InvalidQuantity,
                format!("{}, as in {{\"quantity\": 2}}", Quantity::rule()),
            ),
            "PurchaseRequest" | "HoldRequest" => (
                ErrorCode::InvalidBody,
                "the body must be a JSON object such as {\"quantity\": 2}".to_string(),
            ),
            _ => (ErrorCode::InvalidBody, event_body_problem(reason)),
        };
        Self::new(StatusCode::BAD_REQUEST, code, message)
    }

    /// An error poem produced outside of our handlers (routing, limits).
    pub fn from_status(status: StatusCode, message: String) -> Self {
        let code = match status {
            StatusCode::NOT_FOUND => ErrorCode::NotFound,
            StatusCode::METHOD_NOT_ALLOWED => ErrorCode::MethodNotAllowed,
            StatusCode::PAYLOAD_TOO_LARGE => ErrorCode::PayloadTooLarge,
            StatusCode::REQUEST_TIMEOUT => ErrorCode::RequestTimeout,
            StatusCode::UNSUPPORTED_MEDIA_TYPE => ErrorCode::UnsupportedMediaType,
            StatusCode::UNAUTHORIZED => ErrorCode::Unauthorized,
            StatusCode::SERVICE_UNAVAILABLE => ErrorCode::ServiceUnavailable,
            s if s.is_client_error() => ErrorCode::InvalidParameter,
            _ => ErrorCode::InternalError,
        };
        Self::new(status, code, message)
    }
}

/// What is wrong with an event's body, in the API's words: the rule of the field a
/// type of this API refused (those rules name their field), else what the body or
/// its waiting room must look like.
fn event_body_problem(reason: &str) -> String {
    let innermost = reason
        .split("failed to parse \"")
        .nth(1)
        .and_then(|rest| rest.split_once("\": "))
        .map(|(_, why)| why.split(" (occurred while parsing").next().unwrap_or(why));
    if let Some(rule) = innermost.filter(|why| names_a_field(why)) {
        return rule.to_string();
    }
    if innermost.is_some_and(|why| why.starts_with("leave the field out")) {
        return "holdSeconds, maxPerBuyer and queue take no null: leave a field out to \
                have none"
            .into();
    }
    if reason.contains("\"WaitingRoom\"") {
        return "queue must be an object such as {\"opensAt\": \"2026-12-24T18:00:00Z\", \
                \"admitPerSecond\": 50, \"admissionSeconds\": 300}: opensAt an RFC 3339 \
                time, admitPerSecond from 1 to 100000, admissionSeconds from 1 to 3600"
            .into();
    }
    "the body must be an event such as {\"name\": \"Encore\", \"totalSeats\": 300}, \
     optionally with holdSeconds, maxPerBuyer and queue (see /docs)"
        .into()
}

/// Whether a refusal is one of this API's own rules, which start with the field's
/// name ("quantity must be …", "name may not …").
fn names_a_field(why: &str) -> bool {
    let mut words = why.split(' ');
    let field = words.next().unwrap_or_default();
    !field.is_empty()
        && field.chars().all(|c| c.is_ascii_alphanumeric() || c == '.')
        && field.starts_with(|c: char| c.is_ascii_lowercase())
        && matches!(words.next(), Some("must" | "may"))
}

impl From<Error> for ApiError {
    fn from(err: Error) -> Self {
        match err {
            Error::EventNotFound(_) => Self::event_not_found(),
            Error::RedisNearlyFull { used, max } => {
                tracing::warn!(
                    request_id = super::request_id(),
                    used,
                    max,
                    "claim refused: Redis nearly full"
                );
                Self::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    ErrorCode::ServiceUnavailable,
                    "Redis is nearly full: new purchases and holds wait (without a buyer \
                     token first); retry with the same Idempotency-Key after Retry-After",
                )
            }
            Error::ReplicasBehind { acked, wanted } => {
                tracing::warn!(
                    request_id = super::request_id(),
                    acked,
                    wanted,
                    "answer held back: Redis replicas behind"
                );
                Self::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    ErrorCode::ServiceUnavailable,
                    "Redis' replicas are behind: retry with the same Idempotency-Key after \
                     Retry-After; the retry replays what this request did",
                )
            }
            Error::Redis(e) if e.code() == Some("OOM") => {
                tracing::error!(request_id = super::request_id(), error = %e, "Redis is out of memory");
                Self::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    ErrorCode::ServiceUnavailable,
                    "Redis is out of memory: nothing was done; retry with the same \
                     Idempotency-Key after Retry-After",
                )
            }
            e if e.is_unavailable() => {
                tracing::warn!(request_id = super::request_id(), error = %e, "dependency unavailable");
                Self::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    ErrorCode::ServiceUnavailable,
                    "a backing store is unavailable; retry shortly",
                )
            }
            e => {
                tracing::error!(request_id = super::request_id(), error = %e, "request failed");
                Self::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    ErrorCode::InternalError,
                    "internal error: report the X-Request-Id of this response; the server's log has the details under it",
                )
            }
        }
    }
}

/// A handler's result as its response enum, so handlers can use `?` and every error
/// is mapped here.
pub fn respond<T: From<ApiError>>(result: Result<T, ApiError>) -> T {
    result.unwrap_or_else(T::from)
}

/// The `bad_request_handler` of every response enum.
pub fn bad_request<T: From<ApiError>>(err: poem::Error) -> T {
    ApiError::from_request_error(err).into()
}

/// Implements `From<ApiError>` for an operation's response enum: each listed variant
/// takes the error with that status; `unavailable` carries `Retry-After`; any other
/// status becomes `internal` (and is logged).
macro_rules! api_errors {
    ($ty:ident { $($status:literal => $variant:ident,)* unavailable => $unavailable:ident, internal => $internal:ident $(,)? }) => {
        impl From<$crate::api::error::ApiError> for $ty {
            fn from(e: $crate::api::error::ApiError) -> Self {
                match e.status.as_u16() {
                    $($status => $ty::$variant(::poem_openapi::payload::Json(e.body)),)*
                    503 => $ty::$unavailable(
                        ::poem_openapi::payload::Json(e.body),
                        $crate::api::error::RETRY_AFTER_SECS,
                    ),
                    status => {
                        if status != 500 {
                            ::tracing::error!(
                                request_id = $crate::api::request_id(),
                                status,
                                error = ?e.body,
                                "status not documented for this operation"
                            );
                        }
                        $ty::$internal(::poem_openapi::payload::Json(e.body))
                    }
                }
            }
        }
    };
}
pub(crate) use api_errors;
