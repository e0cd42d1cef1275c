//! What every request passes through, outermost first: a request id, a deadline for
//! requests with a body, the body limit, JSON errors for whatever poem answers on its
//! own, and the request's metrics and stats.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock};
use std::time::{Duration, Instant};

use poem::PathPattern;
use poem::http::{HeaderValue, Method, StatusCode, header};
use poem::{Endpoint, IntoResponse, Request, Response};
use tokio::io::AsyncReadExt;
use tracing::Instrument;
use uuid::Uuid;

use super::AppState;
use super::error::{ApiError, ErrorCode, RETRY_AFTER_SECS};

/// Longest `X-Request-Id` taken from a client; longer or non-ASCII ones are replaced.
const MAX_REQUEST_ID_LEN: usize = 128;

/// A body over the limit is still read, up to this many bytes, before the 413 is
/// sent. An answer sent while the client is still uploading, followed by closing
/// the connection, makes the kernel reset it: the client gets a broken pipe instead
/// of the 413. Bodies larger than this get the 413 and the connection is closed.
const DISCARD_UP_TO: u64 = 4 * 1024 * 1024;

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

/// Tags each request with its request id (the client's `X-Request-Id` or a new one),
/// handles it (see [`handle`]) and counts it.
///
/// The per-request span is at debug level: at info, formatting its fields for every
/// request cost a quarter of the purchase throughput. Lines at warn and above carry
/// `request_id` as a field instead (see [`request_id`]).
pub(super) async fn observe<E: Endpoint>(
    ep: Arc<E>,
    req: Request,
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
    let handled = handle(&*ep, req, &state).instrument(span);
    let mut response = REQUEST_ID.scope(request_id.clone(), handled).await;
    record(
        &state,
        &response,
        &method,
        &path,
        &request_id,
        started.elapsed(),
    );
    response.headers_mut().insert("x-request-id", request_id);
    security_headers(&path, response.headers_mut());
    Ok(response)
}

/// Headers that keep a browser from framing, sniffing or leaking what it is shown,
/// on every answer, so that a bare deployment has them without a proxy in front.
/// Swagger UI at `/docs` is one static page whose script and style poem-openapi
/// writes inline (the spec, ours, inside it): it may run inline code and fetch this
/// origin ("Try it out"), nothing else. Every other answer is data, not a page.
fn security_headers(path: &str, headers: &mut poem::http::HeaderMap) {
    const DOCS: &str = "default-src 'none'; script-src 'unsafe-inline'; \
        style-src 'unsafe-inline'; img-src 'self' data:; font-src data:; connect-src 'self'; \
        base-uri 'none'; form-action 'none'; frame-ancestors 'none'";
    const DATA: &str = "default-src 'none'; frame-ancestors 'none'";
    let policy = if path == "/docs" || path.starts_with("/docs/") {
        DOCS
    } else {
        DATA
    };
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(policy),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
}

/// A process-unique request id: a random prefix per process and a counter. Cheaper
/// than a UUID per request (no system call), and unique across replicas in practice.
fn new_request_id() -> HeaderValue {
    static PREFIX: LazyLock<String> =
        LazyLock::new(|| Uuid::new_v4().simple().to_string()[..12].to_owned());
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    HeaderValue::from_str(&format!("{}-{n:x}", *PREFIX)).expect("hex is a header value")
}

/// Runs the endpoint with the body limit, turning errors poem raises outside our
/// handlers into the API's JSON errors.
///
/// Only requests with a body get a deadline: a slow upload is what a client can
/// stretch, while handlers are bounded by the stores' own timeouts. A timer on every
/// GET cost a tenth of `/health/live` throughput. A sale the handler already made
/// stands when the answer times out; the client learns it by retrying with the same
/// key (the error code says so).
async fn handle<E: Endpoint>(ep: &E, mut req: Request, state: &AppState) -> Response {
    let has_body = req.headers().contains_key(header::CONTENT_LENGTH)
        || req.headers().contains_key(header::TRANSFER_ENCODING);
    let call = async {
        if let Err(too_large) = limit_body(&mut req, state.policy.body_limit).await {
            return too_large;
        }
        match ep.call(req).await {
            Ok(response) => response.into_response(),
            Err(e) => error_response(&e),
        }
    };
    if !has_body {
        return call.await;
    }
    let timeout = state.policy.request_timeout;
    tokio::time::timeout(timeout, call)
        .await
        .unwrap_or_else(|_| {
            json_error(ApiError::from_status(
                StatusCode::REQUEST_TIMEOUT,
                format!(
                    "the request was not received and answered within {timeout:?}: send the \
                     body at once; a purchase may have been made, so retry with the same \
                     Idempotency-Key to learn its outcome"
                ),
            ))
        })
}

/// Answers a write request from a client over its limit (see [`super::rate`]) with
/// 429 before the route reads its body. It runs inside CORS, so that a browser may
/// read the answer and its `Retry-After`.
pub(super) async fn rate_limit<E: Endpoint>(
    ep: Arc<E>,
    req: Request,
    state: Arc<AppState>,
) -> poem::Result<Response> {
    let limits = &state.policy.rate_limits;
    if limits.applies(&req) {
        let buyer = limits
            .limits_buyers()
            .then(|| super::rate::bearer(&req))
            .flatten()
            .and_then(|token| state.credentials.buyer_tokens.as_ref()?.verify(token).ok());
        if let Err(wait) = limits.check(&req, buyer) {
            let seconds = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
            let mut response = json_error(ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                ErrorCode::RateLimited,
                format!(
                    "too many write requests from this client: nothing was done; retry \
                     after {seconds} s"
                ),
            ));
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
            return Ok(response);
        }
    }
    ep.call(req).await.map(IntoResponse::into_response)
}

/// An error poem raised (no route, wrong method, a limit) as the API's JSON error; a
/// 405 carries `Allow`, as HTTP requires.
fn error_response(e: &poem::Error) -> Response {
    let message = match e.status() {
        StatusCode::NOT_FOUND => "no such route: the API's routes are listed at /docs".into(),
        StatusCode::METHOD_NOT_ALLOWED => {
            "this route does not take this method: the Allow header lists those it takes".into()
        }
        _ => e.to_string(),
    };
    let mut response = json_error(ApiError::from_status(e.status(), message));
    if let Some(pattern) = e.data::<PathPattern>() {
        if e.status() == StatusCode::METHOD_NOT_ALLOWED
            && let Some(allow) = route(pattern).and_then(|r| r.allow.clone())
        {
            response.headers_mut().insert(header::ALLOW, allow);
        }
        response.set_data(pattern.clone());
    }
    response
}

/// Metrics for every request; the seed's stats for `/api/` requests; a log line for
/// every 5xx.
fn record(
    state: &AppState,
    response: &Response,
    method: &Method,
    path: &str,
    request_id: &HeaderValue,
    took: Duration,
) {
    let status = response.status();
    let route = response
        .data::<PathPattern>()
        .and_then(route)
        .map_or("other", |r| r.label);
    crate::metrics::http_request(route, method_label(method), status.as_u16(), took);
    if path.starts_with("/api/") {
        let is_purchase = *method == Method::POST && route.ends_with("/purchase");
        state
            .instance
            .stats
            .record(took, is_purchase.then_some(status == StatusCode::OK));
    }
    if status.is_server_error() {
        tracing::warn!(
            request_id = request_id.to_str().unwrap_or_default(),
            %method, path, status = status.as_u16(), ?took,
            "request failed"
        );
    }
}

fn method_label(method: &Method) -> &'static str {
    match *method {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        Method::DELETE => "DELETE",
        _ => "other",
    }
}

/// A route of the service, as the metrics label it and a 405 lists its methods.
struct RouteInfo {
    /// The path as the spec writes it (`/api/v1/events/{id}`).
    label: &'static str,
    allow: Option<HeaderValue>,
}

/// The route poem matched, looked up by its pattern (`/api/v1/events/:id`). Built
/// from the spec's paths, so every operation has its own label without a list here.
fn route(pattern: &PathPattern) -> Option<&'static RouteInfo> {
    static ROUTES: LazyLock<HashMap<String, RouteInfo>> = LazyLock::new(|| {
        let spec: serde_json::Value =
            serde_json::from_str(&super::openapi_json()).expect("the spec is JSON");
        let paths = spec["paths"].as_object().cloned().unwrap_or_default();
        let mut routes: HashMap<String, RouteInfo> = paths
            .into_iter()
            .map(|(path, operations)| {
                let methods: Vec<String> = operations
                    .as_object()
                    .map(|o| o.keys().map(|m| m.to_uppercase()).collect())
                    .unwrap_or_default();
                let pattern = router_pattern(&path);
                let info = RouteInfo {
                    allow: HeaderValue::from_str(&methods.join(", ")).ok(),
                    label: Box::leak(path.into_boxed_str()),
                };
                (pattern, info)
            })
            .collect();
        for fixed in ["/openapi.json", "/docs", "/docs/*"] {
            let label = fixed.trim_end_matches("/*");
            routes.insert(fixed.to_owned(), RouteInfo { label, allow: None });
        }
        routes
    });
    ROUTES.get(&*pattern.0)
}

/// A spec path as poem-openapi registers it with the router: each `{name}` becomes
/// `:param0`, `:param1`, … in order.
fn router_pattern(path: &str) -> String {
    let mut params = 0;
    path.split('/')
        .map(|segment| {
            if segment.starts_with('{') && segment.ends_with('}') {
                params += 1;
                format!(":param{}", params - 1)
            } else {
                segment.to_owned()
            }
        })
        .collect::<Vec<_>>()
        .join("/")
}

/// Refuses bodies over `limit` bytes with 413: by `Content-Length` before reading,
/// and by reading at most `limit` bytes of a body sent without one. What is left of a
/// refused body is read and dropped (see [`DISCARD_UP_TO`]).
async fn limit_body(req: &mut Request, limit: usize) -> Result<(), Response> {
    let length = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let chunked = req.headers().contains_key(header::TRANSFER_ENCODING);
    let mut body = match length {
        Some(length) if length > limit as u64 => req.take_body().into_async_read(),
        None if chunked => {
            let mut body = req.take_body().into_async_read();
            let mut kept = Vec::new();
            (&mut body)
                .take(limit as u64 + 1)
                .read_to_end(&mut kept)
                .await
                .map_err(|_| too_large(limit, true))?;
            if kept.len() <= limit {
                req.set_body(kept);
                return Ok(());
            }
            body
        }
        _ => return Ok(()),
    };
    let discarded = tokio::io::copy(&mut (&mut body).take(DISCARD_UP_TO), &mut tokio::io::sink())
        .await
        .unwrap_or(DISCARD_UP_TO);
    Err(too_large(limit, discarded >= DISCARD_UP_TO))
}

fn too_large(limit: usize, close: bool) -> Response {
    let mut response = json_error(ApiError::from_status(
        StatusCode::PAYLOAD_TOO_LARGE,
        format!("the body may be at most {limit} bytes"),
    ));
    if close {
        response
            .headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    response
}

pub(super) fn json_error(e: ApiError) -> Response {
    let body = poem_openapi::types::ToJSON::to_json(&e.body);
    let mut response = poem::web::Json(body).with_status(e.status).into_response();
    if e.status == StatusCode::SERVICE_UNAVAILABLE {
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(RETRY_AFTER_SECS));
    }
    response
}

#[cfg(test)]
mod tests {
    use super::router_pattern;

    #[test]
    fn spec_paths_become_router_patterns() {
        assert_eq!(router_pattern("/api/v1/events"), "/api/v1/events");
        assert_eq!(
            router_pattern("/api/v1/events/{id}/purchase"),
            "/api/v1/events/:param0/purchase"
        );
        assert_eq!(router_pattern("/a/{x}/b/{y}"), "/a/:param0/b/:param1");
    }
}
