//! The HTTP surface of `boxoffice worker`, a stream consumer running apart from the
//! API: `/metrics` (the same series as a server's, the consumer's among them) and
//! health probes, on a port of its own. Not part of the public API (no spec).

use std::time::Instant;

use poem::http::StatusCode;
use poem::web::{Data, Json};
use poem::{Endpoint, EndpointExt, Response, Route, get, handler};
use serde_json::json;

/// What the probes need.
#[derive(Clone)]
pub struct WorkerState {
    pub redis: crate::store::Pool,
    pub db: sqlx::PgPool,
    pub instance_id: String,
    pub started: Instant,
    pub metrics: metrics_exporter_prometheus::PrometheusHandle,
}

/// `/metrics`, `/health/live` and `/health/ready` of a worker.
pub fn routes(state: WorkerState) -> impl Endpoint<Output = Response> {
    Route::new()
        .at("/metrics", get(metrics))
        .at("/health", get(live))
        .at("/health/live", get(live))
        .at("/health/ready", get(ready))
        .data(state)
        .map_to_response()
}

#[handler]
fn metrics(state: Data<&WorkerState>) -> String {
    state.metrics.render()
}

#[handler]
fn live(state: Data<&WorkerState>) -> Json<serde_json::Value> {
    Json(json!({
        "status": "ok",
        "instanceId": state.instance_id,
        "uptimeSeconds": state.started.elapsed().as_secs(),
    }))
}

/// A worker is ready when Redis answers (it reads the streams); PostgreSQL down is
/// `degraded`, as on a server: the backlog waits in the streams.
#[handler]
async fn ready(state: Data<&WorkerState>) -> (StatusCode, Json<serde_json::Value>) {
    let (redis, postgres) = super::ops::readiness(&state.redis, &state.db).await;
    let status = match (redis, postgres) {
        (false, _) => "not ready: redis unreachable",
        (true, false) => "degraded",
        (true, true) => "ready",
    };
    let code = if redis {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        code,
        Json(json!({ "status": status, "redis": redis, "postgres": postgres })),
    )
}
