//! The HTTP surface: operations (one file per resource), the error mapping
//! (`error`), and the middleware every request passes through (`middleware`).

pub mod body;
pub mod error;

/// Implements poem-openapi's `Type` for a newtype over `String` that has an
/// `as_string(&self) -> &String` method: the given schema documents the rule (a
/// `pattern`, lengths) and the type's own parsing checks it in plain code, because
/// poem-openapi's `pattern` validator compiles its regex on every request (it cost a
/// third of the purchase throughput).
macro_rules! checked_string_type {
    ($ty:ty, $schema:expr) => {
        impl ::poem_openapi::types::Type for $ty {
            const IS_REQUIRED: bool = true;
            type RawValueType = String;
            type RawElementValueType = String;

            fn name() -> ::std::borrow::Cow<'static, str> {
                "string".into()
            }

            fn schema_ref() -> ::poem_openapi::registry::MetaSchemaRef {
                ::poem_openapi::registry::MetaSchemaRef::Inline(Box::new($schema))
            }

            fn as_raw_value(&self) -> Option<&String> {
                Some(self.as_string())
            }

            fn raw_element_iter<'a>(&'a self) -> Box<dyn Iterator<Item = &'a String> + 'a> {
                Box::new(std::iter::once(self.as_string()))
            }
        }
    };
}
/// Implements poem-openapi's `Type`, `ParseFromJSON` and `ToJSON` for an integer
/// newtype with `get()`, `rule()` and `TryFrom<i64, Error = String>` (see `domain`):
/// the schema's bounds come from the same constants as the check, and only JSON
/// integers are taken (`"1"`, `2.5`, `null` are refused).
macro_rules! checked_integer_type {
    ($ty:ty, $min:expr, $max:expr, $format:literal) => {
        impl ::poem_openapi::types::Type for $ty {
            const IS_REQUIRED: bool = true;
            type RawValueType = Self;
            type RawElementValueType = Self;

            fn name() -> ::std::borrow::Cow<'static, str> {
                concat!("integer_", $format).into()
            }

            fn schema_ref() -> ::poem_openapi::registry::MetaSchemaRef {
                ::poem_openapi::registry::MetaSchemaRef::Inline(Box::new(
                    ::poem_openapi::registry::MetaSchema {
                        format: Some($format),
                        minimum: Some(f64::from($min)),
                        maximum: Some(f64::from($max)),
                        ..::poem_openapi::registry::MetaSchema::new("integer")
                    },
                ))
            }

            fn as_raw_value(&self) -> Option<&Self> {
                Some(self)
            }

            fn raw_element_iter<'a>(&'a self) -> Box<dyn Iterator<Item = &'a Self> + 'a> {
                Box::new(std::iter::once(self))
            }
        }

        impl ::poem_openapi::types::ParseFromJSON for $ty {
            fn parse_from_json(
                value: Option<::serde_json::Value>,
            ) -> ::poem_openapi::types::ParseResult<Self> {
                let n = value
                    .as_ref()
                    .and_then(::serde_json::Value::as_i64)
                    .ok_or_else(|| ::poem_openapi::types::ParseError::custom(<$ty>::rule()))?;
                <$ty>::try_from(n).map_err(::poem_openapi::types::ParseError::custom)
            }
        }

        impl ::poem_openapi::types::ToJSON for $ty {
            fn to_json(&self) -> Option<::serde_json::Value> {
                Some(self.get().into())
            }
        }
    };
}

/// A field a client may leave out but not send as `null` (the schema does not allow
/// it): `Option` would take both.
#[derive(Debug, Clone, Copy)]
pub struct Omittable<T>(pub Option<T>);

impl<T: poem_openapi::types::Type> poem_openapi::types::Type for Omittable<T> {
    const IS_REQUIRED: bool = false;
    type RawValueType = T::RawValueType;
    type RawElementValueType = T::RawElementValueType;

    fn name() -> std::borrow::Cow<'static, str> {
        format!("optional_{}", T::name()).into()
    }

    fn schema_ref() -> poem_openapi::registry::MetaSchemaRef {
        T::schema_ref()
    }

    fn register(registry: &mut poem_openapi::registry::Registry) {
        T::register(registry);
    }

    fn as_raw_value(&self) -> Option<&Self::RawValueType> {
        self.0.as_ref().and_then(T::as_raw_value)
    }

    fn raw_element_iter<'a>(
        &'a self,
    ) -> Box<dyn Iterator<Item = &'a Self::RawElementValueType> + 'a> {
        match &self.0 {
            Some(value) => value.raw_element_iter(),
            None => Box::new(std::iter::empty()),
        }
    }

    fn is_none(&self) -> bool {
        self.0.is_none()
    }
}

impl<T: poem_openapi::types::ParseFromJSON> poem_openapi::types::ParseFromJSON for Omittable<T> {
    fn parse_from_json(value: Option<serde_json::Value>) -> poem_openapi::types::ParseResult<Self> {
        match value {
            None => Ok(Self(None)),
            Some(serde_json::Value::Null) => Err(poem_openapi::types::ParseError::custom(
                "leave the field out instead of sending null",
            )),
            value => Ok(Self(Some(
                T::parse_from_json(value).map_err(poem_openapi::types::ParseError::propagate)?,
            ))),
        }
    }
}

impl<T: poem_openapi::types::ToJSON> poem_openapi::types::ToJSON for Omittable<T> {
    fn to_json(&self) -> Option<serde_json::Value> {
        self.0.as_ref().and_then(T::to_json)
    }
}

mod auth;
mod events;
mod holds;
mod middleware;
mod ops;
mod purchase;
mod queue;
mod sales;
mod stats;
pub mod worker;

use std::sync::Arc;
use std::time::Instant;

use poem::{Endpoint, EndpointExt, IntoEndpoint, Response, Route};
use poem_openapi::{OpenApiService, Tags};
use sqlx::PgPool;
use uuid::Uuid;

use crate::gate::Gate;
pub use middleware::request_id;
pub use stats::Stats;

/// What every handler shares.
pub struct AppState {
    pub gate: Gate,
    pub db: PgPool,
    /// Pool for Redis work off the purchase path (readiness, stats).
    pub redis: deadpool_redis::Pool,
    /// The event the seed-compatible endpoints act on.
    pub default_event: Uuid,
    pub instance_id: String,
    pub admin_token: Option<String>,
    /// Verifies buyer tokens; `None` when no key is configured.
    pub buyer_tokens: Option<crate::buyer::BuyerTokens>,
    /// Longest `holdSeconds` an event may be created with.
    pub max_hold_seconds: u32,
    /// Signs and checks admission tokens; `None` when no key is configured (no
    /// queued events then).
    pub admissions: Option<crate::queue::AdmissionTokens>,
    /// Waiting rooms in Redis.
    pub queue: crate::queue::Queue,
    /// Longest a waiting buyer is told to wait between polls.
    pub queue_poll_max_ms: u64,
    pub body_limit: usize,
    /// Longest a request may take, body upload included (408 after).
    pub request_timeout: std::time::Duration,
    /// Browser origins allowed by CORS; empty: CORS off.
    pub cors_origins: Vec<String>,
    pub stats: Stats,
    pub started: Instant,
    /// Renders `/metrics`.
    pub metrics: metrics_exporter_prometheus::PrometheusHandle,
    /// Set when shutdown begins: readiness answers 503 while requests are still served.
    pub draining: std::sync::atomic::AtomicBool,
}

#[derive(Tags)]
enum Tag {
    /// Buying seats.
    Purchases,
    /// Holding seats while the buyer pays, then confirming or releasing them.
    Holds,
    /// Sales made, and their cancellation.
    Sales,
    /// The waiting room of queued events.
    Queue,
    /// Events and their seats.
    Events,
    /// Health probes and counters.
    Operations,
}

type Apis = (
    purchase::PurchaseApi,
    holds::HoldsApi,
    queue::QueueApi,
    sales::SalesApi,
    events::EventsApi,
    ops::OpsApi,
);

fn service() -> OpenApiService<Apis, ()> {
    let apis = (
        purchase::PurchaseApi,
        holds::HoldsApi,
        queue::QueueApi,
        sales::SalesApi,
        events::EventsApi,
        ops::OpsApi,
    );
    OpenApiService::new(apis, "boxoffice", env!("CARGO_PKG_VERSION"))
        .description(
            "Sells seats to a flash crowd without overselling. Every error body is \
             `{\"error\": CODE, \"message\": text}`; the codes are listed in `ErrorCode`.",
        )
        // Relative, so "Try it out" in /docs works behind any load balancer.
        .server("/")
}

/// The OpenAPI document, as served at `/openapi.json` and committed in `openapi/`.
pub fn openapi_json() -> String {
    service().spec()
}

/// Every route of the service, with its middleware.
pub fn routes(state: Arc<AppState>) -> impl Endpoint<Output = Response> {
    let service = service();
    let docs = service.swagger_ui();
    let spec = service.spec_endpoint();
    let cors_on = !state.cors_origins.is_empty();
    let cors = cors(&state.cors_origins);
    Route::new()
        .nest("/", service)
        .nest("/docs", docs)
        .at("/openapi.json", spec)
        .data(state.clone())
        .with_if(cors_on, cors)
        .into_endpoint()
        .around(move |ep, req| middleware::observe(ep, req, state.clone()))
}

/// CORS for the configured origins: what a browser client needs to buy and to read
/// the answer's headers. Off (no CORS headers at all) unless origins are configured.
fn cors(origins: &[String]) -> poem::middleware::Cors {
    poem::middleware::Cors::new()
        .allow_origins(origins.iter().map(String::as_str))
        .allow_methods([
            poem::http::Method::GET,
            poem::http::Method::POST,
            poem::http::Method::DELETE,
        ])
        .allow_headers([
            "content-type",
            "idempotency-key",
            "authorization",
            "admission-token",
            "x-request-id",
        ])
        .expose_headers([
            "idempotent-replayed",
            "retry-after",
            "x-request-id",
            "location",
        ])
        .max_age(600)
}
