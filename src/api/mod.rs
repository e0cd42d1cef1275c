//! The HTTP surface: operations (one file per resource), the error mapping, and the
//! middleware every request passes through (request id, stats, body limit, JSON
//! errors for whatever poem answers on its own).

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
mod events;
mod ops;
mod purchase;
mod stats;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use poem::http::{HeaderValue, StatusCode, header};
use poem::{Endpoint, EndpointExt, IntoEndpoint, IntoResponse, Request, Response, Route};
use poem_openapi::{OpenApiService, Tags};
use sqlx::PgPool;
use tracing::Instrument;
use uuid::Uuid;

use crate::purchase::Gate;
use error::ApiError;
pub use stats::Stats;

/// Longest `X-Request-Id` taken from a client; longer or non-ASCII ones are replaced.
const MAX_REQUEST_ID_LEN: usize = 128;

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
    /// Events and their seats.
    Events,
    /// Health probes and counters.
    Operations,
}

type Apis = (purchase::PurchaseApi, events::EventsApi, ops::OpsApi);

fn service() -> OpenApiService<Apis, ()> {
    let apis = (purchase::PurchaseApi, events::EventsApi, ops::OpsApi);
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
        .around(move |ep, req| observe(ep, req, state.clone()))
}

/// CORS for the configured origins: what a browser client needs to buy and to read
/// the answer's headers. Off (no CORS headers at all) unless origins are configured.
fn cors(origins: &[String]) -> poem::middleware::Cors {
    poem::middleware::Cors::new()
        .allow_origins(origins.iter().map(String::as_str))
        .allow_methods([poem::http::Method::GET, poem::http::Method::POST])
        .allow_headers([
            "content-type",
            "idempotency-key",
            "authorization",
            "x-request-id",
        ])
        .expose_headers(["idempotent-replayed", "retry-after", "x-request-id"])
        .max_age(600)
}

tokio::task_local! {
    /// The id of the request being handled, for log lines written deep in handlers.
    static REQUEST_ID: HeaderValue;
}

/// The id of the request this task is handling ("-" outside a request).
pub fn request_id() -> String {
    REQUEST_ID
        .try_with(|id| id.to_str().unwrap_or_default().to_owned())
        .unwrap_or_else(|_| "-".into())
}

/// A process-unique request id: a random prefix per process and a counter. Cheaper
/// than a UUID per request (no system call), and unique across replicas in practice.
fn new_request_id() -> HeaderValue {
    static PREFIX: std::sync::LazyLock<String> =
        std::sync::LazyLock::new(|| Uuid::new_v4().simple().to_string()[..12].to_owned());
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    HeaderValue::from_str(&format!("{}-{n:x}", *PREFIX)).expect("hex is a header value")
}

/// Tags each request with its request id (the client's `X-Request-Id` or a new one),
/// enforces the body limit, turns errors poem raises outside our handlers into the
/// API's JSON errors, and counts the request.
///
/// The per-request span is at debug level: at info, formatting its fields for every
/// request cost a quarter of the purchase throughput. Lines at warn and above carry
/// `request_id` as a field instead (see [`request_id`]).
async fn observe<E: Endpoint>(
    ep: Arc<E>,
    mut req: Request,
    state: Arc<AppState>,
) -> poem::Result<Response> {
    let started = Instant::now();
    let request_id = req
        .headers()
        .get("x-request-id")
        .filter(|v| v.len() <= MAX_REQUEST_ID_LEN && v.to_str().is_ok())
        .cloned()
        .unwrap_or_else(new_request_id);
    let span = tracing::debug_span!(
        "request",
        method = %req.method(),
        path = %req.uri().path(),
        request_id = request_id.to_str().unwrap_or_default(),
    );
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    let path = path.as_str();

    // Only requests with a body get a deadline: a slow upload is what a client can
    // stretch, while handlers are bounded by the stores' own timeouts. A timer on every
    // GET cost a tenth of `/health/live` throughput.
    let deadline = (req.headers().contains_key(header::CONTENT_LENGTH)
        || req.headers().contains_key(header::TRANSFER_ENCODING))
    .then_some(state.request_timeout);
    let handled = async {
        if let Err(e) = limit_body(&mut req, state.body_limit).await {
            return e;
        }
        match ep.call(req).await {
            Ok(response) => response.into_response(),
            Err(e) => {
                let mut response = json_error(ApiError::from_status(e.status(), e.to_string()));
                if e.status() == StatusCode::METHOD_NOT_ALLOWED
                    && let Some(allow) = allowed_methods(route_label(path))
                {
                    response.headers_mut().insert(header::ALLOW, allow);
                }
                response
            }
        }
    };
    // A sale the handler already made stands when the answer times out; the client
    // learns it by retrying with the same key (the error code says so).
    let handled = async {
        let Some(timeout) = deadline else {
            return handled.await;
        };
        tokio::time::timeout(timeout, handled)
            .await
            .unwrap_or_else(|_| {
                json_error(ApiError::from_status(
                    StatusCode::REQUEST_TIMEOUT,
                    format!("the request was not received and answered within {timeout:?}"),
                ))
            })
    };
    let mut response = REQUEST_ID
        .scope(request_id.clone(), handled.instrument(span))
        .await;

    let status = response.status();
    let route = route_label(path);
    let elapsed = started.elapsed();
    let method_label = method_label(&method);
    metrics::counter!(
        "boxoffice_http_requests_total",
        "route" => route, "method" => method_label, "status" => status_label(status)
    )
    .increment(1);
    metrics::histogram!(
        "boxoffice_http_request_duration_seconds",
        "route" => route, "method" => method_label
    )
    .record(elapsed.as_secs_f64());
    if path.starts_with("/api/") {
        let is_purchase = method == poem::http::Method::POST && path.ends_with("/purchase");
        state
            .stats
            .record(elapsed, is_purchase.then_some(status == StatusCode::OK));
    }
    if status.is_server_error() {
        tracing::warn!(
            request_id = request_id.to_str().unwrap_or_default(),
            %method, path, status = status.as_u16(), elapsed = ?started.elapsed(),
            "request failed"
        );
    }
    response.headers_mut().insert("x-request-id", request_id);
    Ok(response)
}

// Labels are `&'static str`: building them as Strings on every request cost
// measurable throughput.
fn method_label(method: &poem::http::Method) -> &'static str {
    use poem::http::Method;
    match *method {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        _ => "other",
    }
}

fn status_label(status: StatusCode) -> &'static str {
    static LABELS: std::sync::LazyLock<Vec<String>> =
        std::sync::LazyLock::new(|| (0..1000).map(|code| code.to_string()).collect());
    LABELS
        .get(usize::from(status.as_u16()))
        .map_or("other", String::as_str)
}

/// The route a path belongs to, as a metrics label: ids are folded, unknown paths
/// share one label, so the label's values stay few.
fn route_label(path: &str) -> &'static str {
    const FIXED: &[&str] = &[
        "/api/v1/purchase",
        "/api/v1/event",
        "/api/v1/events",
        "/api/v1/stats",
        "/health",
        "/health/live",
        "/health/ready",
        "/metrics",
        "/openapi.json",
    ];
    if let Some(route) = FIXED.iter().find(|r| **r == path) {
        return route;
    }
    match path.strip_prefix("/api/v1/events/") {
        Some(rest) if rest.ends_with("/purchase") => "/api/v1/events/{id}/purchase",
        Some(rest) if !rest.contains('/') => "/api/v1/events/{id}",
        _ if path.starts_with("/docs") => "/docs",
        _ => "other",
    }
}

/// The `Allow` header for a route of the spec (a 405 must carry it).
fn allowed_methods(route: &str) -> Option<HeaderValue> {
    static ALLOWED: std::sync::LazyLock<std::collections::HashMap<String, HeaderValue>> =
        std::sync::LazyLock::new(|| {
            let spec: serde_json::Value =
                serde_json::from_str(&openapi_json()).expect("the spec is JSON");
            let paths = spec["paths"].as_object().cloned().unwrap_or_default();
            paths
                .into_iter()
                .filter_map(|(path, operations)| {
                    let methods: Vec<String> = operations
                        .as_object()?
                        .keys()
                        .map(|m| m.to_uppercase())
                        .collect();
                    Some((path, HeaderValue::from_str(&methods.join(", ")).ok()?))
                })
                .collect()
        });
    ALLOWED.get(route).cloned()
}

/// Refuses bodies over `limit` bytes with 413: by `Content-Length` before reading,
/// and by reading at most `limit` bytes of a body sent without one.
async fn limit_body(req: &mut Request, limit: usize) -> Result<(), Response> {
    let too_large = || {
        json_error(ApiError::from_status(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("the body may be at most {limit} bytes"),
        ))
    };
    let length = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    match length {
        Some(length) if length > limit as u64 => Err(too_large()),
        Some(_) => Ok(()),
        None if req.headers().contains_key(header::TRANSFER_ENCODING) => {
            let body = req
                .take_body()
                .into_bytes_limit(limit)
                .await
                .map_err(|_| too_large())?;
            req.set_body(body);
            Ok(())
        }
        None => Ok(()),
    }
}

fn json_error(e: ApiError) -> Response {
    let body = poem_openapi::types::ToJSON::to_json(&e.body);
    let mut response = poem::web::Json(body).with_status(e.status).into_response();
    if e.status == StatusCode::SERVICE_UNAVAILABLE {
        response.headers_mut().insert(
            header::RETRY_AFTER,
            HeaderValue::from(error::RETRY_AFTER_SECS),
        );
    }
    response
}
