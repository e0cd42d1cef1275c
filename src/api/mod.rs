//! The HTTP surface: operations (one file per resource), the error mapping
//! (`error`), and the middleware every request passes through (`middleware`).

pub mod body;
pub mod error;

mod auth;
mod cache;
mod events;
mod holds;
mod middleware;
mod ops;
mod purchase;
mod queue;
pub mod rate;
mod sale;
mod sales;
mod stats;
mod types;
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
    pub redis: crate::store::Pool,
    /// Waiting rooms in Redis.
    pub queue: crate::queue::Queue,
    /// The event the seed-compatible endpoints act on.
    pub default_event: Uuid,
    pub credentials: Credentials,
    pub policy: Policy,
    pub instance: Instance,
}

/// Who may do what: the admin token, and the keys that check buyers and admissions.
pub struct Credentials {
    pub admin_token: Option<String>,
    /// Verifies buyer tokens; `None` when no key is configured.
    pub buyer_tokens: Option<crate::buyer::BuyerTokens>,
    /// Signs and checks admission tokens; `None` when no key is configured (no
    /// queued events then).
    pub admissions: Option<crate::queue::AdmissionTokens>,
}

/// What this server takes from a client, and what it tells one.
pub struct Policy {
    /// Longest `holdSeconds` an event may be created with.
    pub max_hold_seconds: u32,
    /// Longest a waiting buyer is told to wait between polls.
    pub queue_poll_max_ms: u64,
    pub body_limit: usize,
    /// Longest a request may take, body upload included (408 after).
    pub request_timeout: std::time::Duration,
    /// Browser origins allowed by CORS; empty: CORS off.
    pub cors_origins: Vec<String>,
    /// Write requests per client.
    pub rate_limits: rate::RateLimits,
}

/// This process, as operators see it.
pub struct Instance {
    pub id: String,
    pub stats: Stats,
    pub started: Instant,
    /// Renders `/metrics`.
    pub metrics: metrics_exporter_prometheus::PrometheusHandle,
    /// Set when shutdown begins: readiness answers 503 while requests are still served.
    pub draining: std::sync::atomic::AtomicBool,
    /// Recent answers of the reads whose cost grows with the number of events.
    pub reads: Reads,
}

/// How long an answer of `/api/v1/stats` or a page of `/api/v1/events` is kept.
const READ_CACHE_TTL: std::time::Duration = std::time::Duration::from_secs(1);

/// Distinct pages of `/api/v1/events` kept at once (each at most `READ_CACHE_TTL`).
const EVENT_PAGES_KEPT: usize = 64;

/// Recent answers of the public reads that cost O(events) (see `cache`).
pub struct Reads {
    global: cache::Cache<(), ops::GlobalSales>,
    /// Pages by (`after`, `limit`).
    events: cache::Cache<(Option<Uuid>, u32), events::Page>,
}

impl Default for Reads {
    fn default() -> Self {
        Self {
            global: cache::Cache::new(READ_CACHE_TTL, 1),
            events: cache::Cache::new(READ_CACHE_TTL, EVENT_PAGES_KEPT),
        }
    }
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
    OpenApiService::new(Apis::default(), "boxoffice", env!("CARGO_PKG_VERSION"))
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
    let cors_on = !state.policy.cors_origins.is_empty();
    let cors = cors(&state.policy.cors_origins);
    Route::new()
        .nest("/", service)
        .nest("/docs", docs)
        .at("/openapi.json", spec)
        .data(state.clone())
        .around({
            let state = state.clone();
            move |ep, req| middleware::rate_limit(ep, req, state.clone())
        })
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
