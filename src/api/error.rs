//! Every error the API answers with, and the one place that maps internal errors
//! and request-parsing failures to HTTP statuses and codes.

use poem::http::StatusCode;
use poem_openapi::error::{
    ContentTypeError, ParseParamError, ParsePathError, ParseRequestPayloadError,
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
            "no event with this id",
        )
    }

    /// Maps a failure to extract the request (headers, path, body) to the API's own
    /// error. poem-openapi hands these over as opaque `poem::Error`s.
    pub fn from_request_error(err: poem::Error) -> Self {
        if let Some(e) = err.downcast_ref::<ParseParamError>() {
            let code = if e.name.eq_ignore_ascii_case("Idempotency-Key") {
                ErrorCode::InvalidIdempotencyKey
            } else {
                ErrorCode::InvalidParameter
            };
            let message = if code == ErrorCode::InvalidIdempotencyKey {
                "the Idempotency-Key header is required: 1 to 255 printable ASCII characters".into()
            } else {
                format!("invalid parameter {}: {}", e.name, e.reason)
            };
            return Self::new(StatusCode::BAD_REQUEST, code, message);
        }
        if let Some(e) = err.downcast_ref::<ParsePathError>() {
            // `e.name` is poem-openapi's internal name (`param0`), not the documented one.
            return Self::new(
                StatusCode::BAD_REQUEST,
                ErrorCode::InvalidParameter,
                format!("invalid path parameter: {}", e.reason),
            );
        }
        if let Some(e) = err.downcast_ref::<ParseRequestPayloadError>() {
            return Self::from_payload_error(&e.reason);
        }
        if err.is::<ContentTypeError>() {
            return Self::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                ErrorCode::UnsupportedMediaType,
                "the body must be JSON with Content-Type: application/json",
            );
        }
        Self::from_status(err.status(), err.to_string())
    }

    /// poem-openapi reports JSON syntax errors with serde's message, a body of the
    /// wrong shape as "Expected input type \"PurchaseRequest\"…", and a bad field
    /// inside it with "field `quantity` …" or "(occurred while parsing \"PurchaseRequest\")".
    fn from_payload_error(reason: &str) -> Self {
        let in_quantity = reason.contains("field `quantity`")
            || reason.contains("occurred while parsing \"PurchaseRequest\"")
            || reason.contains("occurred while parsing \"HoldRequest\"");
        let code = if in_quantity {
            ErrorCode::InvalidQuantity
        } else {
            ErrorCode::InvalidBody
        };
        let message = match code {
            ErrorCode::InvalidQuantity => format!("{} ({reason})", Quantity::rule()),
            _ => format!("the body must be a JSON object as documented ({reason})"),
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

impl From<Error> for ApiError {
    fn from(err: Error) -> Self {
        match err {
            Error::EventNotFound(_) => Self::event_not_found(),
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
                    "internal error; see the server log for this request id",
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
