//! Operations endpoints: health probes and `/api/v1/stats`.

use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::Duration;

use poem::http::StatusCode;
use poem::web::Data;
use poem_openapi::payload::{Json, PlainText};
use poem_openapi::{ApiResponse, Object, OpenApi};

use super::error::{ApiError, ErrorBody, ErrorCode, api_errors, bad_request};
use super::{AppState, Tag};
use crate::persist;

/// How long a readiness probe waits for each dependency.
const READY_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Default)]
pub struct OpsApi;

/// The process is up.
#[derive(Debug, Object)]
#[oai(rename_all = "camelCase")]
pub struct Health {
    /// `ok`.
    pub status: String,
    pub instance_id: String,
    pub uptime_seconds: u64,
}

/// This replica can sell: Redis answers and it is not shutting down.
#[derive(Debug, Object)]
#[oai(rename_all = "camelCase")]
pub struct Ready {
    /// `ready`, or `degraded` while PostgreSQL does not answer (purchases go on,
    /// sales wait in the stream and are written when it is back, but creating events
    /// and recovering an event after a loss of Redis data wait for it) or while Redis
    /// is nearly full (`redisMemory`).
    pub status: String,
    pub redis: bool,
    pub postgres: bool,
    /// Share of Redis' `maxmemory` in use (0–1), as last read; absent when Redis has
    /// no limit. Above `BOXOFFICE_REDIS_MEMORY_SHARE`, purchases and holds without a
    /// buyer token get 503.
    #[oai(skip_serializing_if_is_none)]
    pub redis_memory: Option<f64>,
    /// Redis is above that share.
    pub redis_nearly_full: bool,
}

#[derive(ApiResponse)]
#[oai(bad_request_handler = "bad_request")]
pub enum ReadyResponse {
    /// Redis answers; send traffic here. `status` says whether PostgreSQL does too.
    #[oai(status = 200)]
    Ok(Json<Ready>),
    /// `INTERNAL_ERROR`.
    #[oai(status = 500)]
    Internal(Json<ErrorBody>),
    /// `SERVICE_UNAVAILABLE`: Redis does not answer, or the replica is shutting down.
    #[oai(status = 503)]
    Unavailable(Json<ErrorBody>, #[oai(header = "Retry-After")] u32),
}

api_errors!(ReadyResponse {
    unavailable => Unavailable,
    internal => Internal,
});

/// Sales across every replica, from Redis; absent from the stats while Redis is
/// unreachable.
#[derive(Debug, Clone, Object)]
#[oai(rename_all = "camelCase")]
pub struct GlobalSales {
    /// Events loaded in Redis.
    pub events: u64,
    pub seats_sold: i64,
    /// Successful purchases.
    pub purchases: i64,
    /// Purchases refused with `SOLD_OUT`.
    pub sold_out: i64,
    /// Sales in the streams not yet written to PostgreSQL.
    pub persistence_lag: i64,
}

/// Counters of this instance (the seed's fields) and of all replicas.
#[derive(Debug, Object)]
#[oai(rename_all = "camelCase")]
pub struct StatsBody {
    /// API requests this instance served.
    pub total_requests: u64,
    /// Purchases this instance answered with 200.
    pub success_purchases: u64,
    /// Purchases this instance answered with anything else.
    pub failed_purchases: u64,
    /// 95th percentile latency of this instance's API requests, in milliseconds.
    pub p95_latency: f64,
    pub instance_id: String,
    pub uptime_seconds: u64,
    // Global counters, absent while Redis is unreachable. (Documented on
    // `GlobalSales`: a doc comment here becomes an `allOf` that client generators
    // handle badly.)
    pub global: Option<GlobalSales>,
}

#[OpenApi]
impl OpsApi {
    /// Liveness (seed-compatible)
    #[oai(
        path = "/health",
        method = "get",
        tag = "Tag::Operations",
        operation_id = "health"
    )]
    async fn health(&self, state: Data<&Arc<AppState>>) -> Json<Health> {
        health(&state)
    }

    /// Liveness: the process answers
    #[oai(
        path = "/health/live",
        method = "get",
        tag = "Tag::Operations",
        operation_id = "healthLive"
    )]
    async fn live(&self, state: Data<&Arc<AppState>>) -> Json<Health> {
        health(&state)
    }

    /// Readiness: this replica can sell (Redis answers)
    ///
    /// PostgreSQL down does not take a replica out of rotation: purchases keep
    /// succeeding and wait in the stream. It is reported as `degraded` here, by
    /// `boxoffice_postgres_up` and in the log.
    #[oai(
        path = "/health/ready",
        method = "get",
        tag = "Tag::Operations",
        operation_id = "healthReady"
    )]
    async fn ready(&self, state: Data<&Arc<AppState>>) -> ReadyResponse {
        if state
            .instance
            .draining
            .load(std::sync::atomic::Ordering::Relaxed)
        {
            return ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                ErrorCode::ServiceUnavailable,
                "not ready: shutting down",
            )
            .into();
        }
        let (redis, postgres) = readiness(&state.redis, &state.db).await;
        if !redis {
            return ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                ErrorCode::ServiceUnavailable,
                "not ready: redis unreachable",
            )
            .into();
        }
        let memory = state.gate.memory();
        let nearly_full = memory.full().is_some();
        ReadyResponse::Ok(Json(Ready {
            status: if postgres && !nearly_full {
                "ready"
            } else {
                "degraded"
            }
            .into(),
            redis,
            postgres,
            redis_memory: memory.used_share(),
            redis_nearly_full: nearly_full,
        }))
    }

    /// Prometheus metrics
    ///
    /// Requests per route and status with latency histograms, purchases by outcome,
    /// seats sold, Redis script latency, stream backlog, consumer batches and errors.
    #[oai(
        path = "/metrics",
        method = "get",
        tag = "Tag::Operations",
        operation_id = "metrics"
    )]
    async fn metrics(&self, state: Data<&Arc<AppState>>) -> PlainText<String> {
        PlainText(state.instance.metrics.render())
    }

    /// Request counters and sales
    ///
    /// The seed's fields describe this instance; `global` adds up every replica.
    #[oai(
        path = "/api/v1/stats",
        method = "get",
        tag = "Tag::Operations",
        operation_id = "stats"
    )]
    async fn stats(&self, state: Data<&Arc<AppState>>) -> Json<StatsBody> {
        let local = state.instance.stats.snapshot();
        let global = match state.instance.reads.global.get((), || global(&state)).await {
            Ok(global) => Some(global),
            Err(e) => {
                tracing::warn!(error = %e, "global stats unavailable");
                None
            }
        };
        Json(StatsBody {
            total_requests: local.total_requests,
            success_purchases: local.success_purchases,
            failed_purchases: local.failed_purchases,
            p95_latency: local.p95_latency_ms,
            instance_id: state.instance.id.clone(),
            uptime_seconds: state.instance.started.elapsed().as_secs(),
            global,
        })
    }
}

/// Events whose counters one pipeline reads.
const GLOBAL_CHUNK: usize = 500;

/// Every event's counters and backlog, added up: pipelined on a pooled connection
/// (never the one purchases share), `GLOBAL_CHUNK` events per round trip. Counters
/// are read as Redis has them, without recovering an event that lacks them.
async fn global(state: &AppState) -> crate::Result<GlobalSales> {
    let keys = state.gate.keys();
    let mut conn = state.redis.get().await?;
    let ids: Vec<String> = redis::AsyncCommands::smembers(&mut conn, keys.events()).await?;
    let ids: Vec<uuid::Uuid> = ids.iter().filter_map(|id| id.parse().ok()).collect();
    let mut global = GlobalSales {
        events: 0,
        seats_sold: 0,
        purchases: 0,
        sold_out: 0,
        persistence_lag: 0,
    };
    for chunk in ids.chunks(GLOBAL_CHUNK) {
        let mut reads = Vec::with_capacity(chunk.len() * 2);
        for id in chunk {
            reads.push(
                redis::cmd("HMGET")
                    .arg(keys.inventory(*id))
                    .arg(&["sold", "purchases", "rejected"])
                    .to_owned(),
            );
            reads.push(
                redis::cmd("XINFO")
                    .arg("GROUPS")
                    .arg(keys.stream(*id))
                    .to_owned(),
            );
        }
        // A stream not made yet answers XINFO with an error: that event has no backlog.
        let replies = crate::store::or_nil(conn.query_each(&reads).await?);
        for pair in replies.chunks(2) {
            let counters: Vec<Option<i64>> =
                redis::from_redis_value_ref(&pair[0]).unwrap_or_default();
            if counters.iter().all(Option::is_none) {
                continue;
            }
            let counter = |i: usize| counters.get(i).copied().flatten().unwrap_or(0);
            global.events += 1;
            global.seats_sold += counter(0);
            global.purchases += counter(1);
            global.sold_out += counter(2);
            global.persistence_lag += pair.get(1).map_or(0, persist::group_backlog);
        }
    }
    Ok(global)
}

/// Whether Redis and PostgreSQL answer within [`READY_TIMEOUT`], asked together.
/// PostgreSQL's answer is exported as `boxoffice_postgres_up` and logged when it
/// changes.
pub(super) async fn readiness(redis: &crate::store::Pool, db: &sqlx::PgPool) -> (bool, bool) {
    static POSTGRES_WAS_UP: AtomicU8 = AtomicU8::new(UNKNOWN);
    const UNKNOWN: u8 = 2;

    let ping = async { redis.get().await.ok()?.ping().await.ok() };
    let (redis, postgres) = tokio::join!(
        tokio::time::timeout(READY_TIMEOUT, ping),
        tokio::time::timeout(READY_TIMEOUT, sqlx::query("SELECT 1").execute(db)),
    );
    let postgres = matches!(postgres, Ok(Ok(_)));
    crate::metrics::postgres_up(postgres);
    let before = POSTGRES_WAS_UP.swap(u8::from(postgres), Ordering::Relaxed);
    if before != u8::from(postgres) {
        if postgres {
            tracing::info!("PostgreSQL answers again");
        } else {
            tracing::warn!(
                "PostgreSQL does not answer: selling goes on, sales wait in the stream \
                 until it is back"
            );
        }
    }
    (matches!(redis, Ok(Some(_))), postgres)
}

fn health(state: &AppState) -> Json<Health> {
    Json(Health {
        status: "ok".into(),
        instance_id: state.instance.id.clone(),
        uptime_seconds: state.instance.started.elapsed().as_secs(),
    })
}
