//! `rush queue`: a crowd in front of a queued event. It creates the event (admin
//! token), has `--buyers` buyers (tokens signed with the servers' buyer key) join, a
//! share before the opening and the rest after, poll as told, and buy one seat once
//! admitted; some try to buy before admission. Then it checks: nobody bought without
//! admission; the early joiners' admission order is independent of their join order
//! (Spearman's rank correlation); no late joiner overtook an earlier one; admissions
//! followed the rate; every admitted buyer who tried could buy while seats remained.

mod check;

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use clap::Args;
use hyper::Method;
use serde::Serialize;
use serde_json::{Value, json};
use tokio::task::JoinSet;
use uuid::Uuid;

use crate::check::Check;
use crate::client::{Pool, run_id, sign_buyer_tokens, targets};
use crate::parse_duration;
use crate::redis_cpu::RedisCpu;

/// Options of `rush queue`.
#[derive(Debug, Args)]
pub struct QueueArgs {
    /// Base URL of a replica; repeat to spread requests round-robin.
    #[arg(long = "url", default_value = "http://127.0.0.1:3000")]
    urls: Vec<String>,
    /// The servers' ADMIN_TOKEN (the run creates its event).
    #[arg(long, env = "ADMIN_TOKEN", hide_env_values = true)]
    admin_token: String,
    /// The servers' BOXOFFICE_BUYER_JWT_KEY (HS256), to sign buyer tokens.
    #[arg(long, env = "BOXOFFICE_BUYER_JWT_KEY", hide_env_values = true)]
    buyer_key: String,
    /// Number of buyers.
    #[arg(long, default_value_t = 2_000)]
    buyers: usize,
    /// Share of buyers who join before the opening.
    #[arg(long, default_value_t = 0.5)]
    early_share: f64,
    /// When the event opens, from the start of the run.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    opens_in: Duration,
    /// Buyers admitted per second.
    #[arg(long, default_value_t = 500)]
    rate: u32,
    /// How long an admission lasts, in seconds.
    #[arg(long, default_value_t = 120)]
    admission_seconds: u32,
    /// Seats of the event (default: one per buyer).
    #[arg(long)]
    seats: Option<u32>,
    /// Share of buyers who first try to buy without admission (must get 403).
    #[arg(long, default_value_t = 0.05)]
    sneak_share: f64,
    /// Requests in flight at most, over pooled keep-alive connections.
    #[arg(long, short = 'c', default_value_t = 64)]
    connections: usize,
    /// Redis of the servers, to report its CPU per request.
    #[arg(long)]
    redis_url: Option<String>,
    /// Give up on one request after this long.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    timeout: Duration,
    /// Print the result as JSON.
    #[arg(long)]
    pub json: bool,
}

impl QueueArgs {
    fn plan(self) -> Plan {
        let Self {
            urls,
            admin_token,
            buyer_key,
            buyers,
            early_share,
            opens_in,
            rate,
            admission_seconds,
            seats,
            sneak_share,
            connections,
            redis_url,
            timeout,
            ..
        } = self;
        Plan {
            urls,
            admin_token,
            buyer_key,
            buyers: buyers.max(1),
            early_share: early_share.clamp(0.0, 1.0),
            opens_in,
            rate: rate.max(1),
            admission_seconds: admission_seconds.max(1),
            seats,
            sneak_share: sneak_share.clamp(0.0, 1.0),
            connections: connections.max(1),
            redis_url,
            timeout,
        }
    }
}

#[derive(Debug, Clone)]
pub struct Plan {
    pub urls: Vec<String>,
    pub admin_token: String,
    pub buyer_key: String,
    pub buyers: usize,
    /// Share of buyers who join before the opening.
    pub early_share: f64,
    pub opens_in: Duration,
    pub rate: u32,
    pub admission_seconds: u32,
    /// Seats of the event; default: one per buyer.
    pub seats: Option<u32>,
    /// Share of buyers who first try to buy without admission.
    pub sneak_share: f64,
    /// Requests in flight at most (pooled keep-alive connections).
    pub connections: usize,
    pub redis_url: Option<String>,
    pub timeout: Duration,
}

#[derive(Debug, Default, Serialize)]
pub struct Outcome {
    pub event: Uuid,
    pub buyers: usize,
    pub early: usize,
    pub late: usize,
    pub joins: u64,
    pub polls: u64,
    /// Polls per second between the opening and the last admission.
    pub polls_per_s: f64,
    /// Redis CPU (user + system) per request from the opening on, every request of
    /// the run (polls, purchases) and the service's own background work counted.
    pub redis_cpu_us_per_request: Option<f64>,
    /// Of that, the time Redis' commands took by its own count.
    pub redis_command_us_per_request: Option<f64>,
    pub sneaks: u64,
    pub sneaks_refused: u64,
    pub purchases: u64,
    pub sold_out: u64,
    pub spearman_rho: f64,
    /// Seconds from admission to the poll that learned of it: median and 99th percentile.
    pub lag_p50_s: f64,
    pub lag_p99_s: f64,
    pub admission_window_s: f64,
    pub observed_rate: f64,
    pub failures: Vec<String>,
    pub checks: Vec<Check>,
}

/// What one buyer saw.
#[derive(Debug, Default, Clone)]
pub(super) struct Seen {
    pub(super) ticket: String,
    /// When its join was sent (this machine's clock).
    pub(super) joined_at_ms: i64,
    pub(super) admitted_at_ms: i64,
    pub(super) learned_at_ms: i64,
    pub(super) polls: u64,
    pub(super) sneaked: bool,
    pub(super) sneak_refused: bool,
    pub(super) bought: bool,
    pub(super) sold_out: bool,
    pub(super) position_rose: bool,
    pub(super) failure: Option<String>,
}

pub(super) fn now_ms() -> i64 {
    Utc::now().timestamp_millis()
}

fn time_ms(value: &Value) -> Option<i64> {
    value
        .as_str()?
        .parse::<DateTime<Utc>>()
        .ok()
        .map(|t| t.timestamp_millis())
}

impl QueueArgs {
    pub async fn run(self) -> Result<Outcome, String> {
        run(self.plan()).await
    }
}

/// The event of a run.
#[derive(Debug, Clone, Copy)]
pub(super) struct Event {
    pub(super) id: Uuid,
    pub(super) seats: u32,
    pub(super) opens_at: DateTime<Utc>,
}

async fn run(plan: Plan) -> Result<Outcome, String> {
    let pool = Arc::new(Pool::new(
        targets(&plan.urls).await?,
        plan.connections,
        plan.timeout,
    ));
    let run = run_id();
    let event = create_event(&pool, &plan, &run).await?;
    let tokens = sign_buyer_tokens(
        &plan.buyer_key,
        &run,
        plan.buyers,
        Duration::from_secs(3_600),
    )?;
    let mut tasks = join(&pool, &plan, event, &tokens).await?;
    let cpu_before = redis_cpu(plan.redis_url.as_deref()).await;
    let requests_before = pool.requests();
    let mut seen: Vec<Seen> = vec![Seen::default(); plan.buyers];
    while let Some(joined) = tasks.join_next().await {
        let (i, s) = joined.map_err(|e| e.to_string())?;
        seen[i] = s;
    }
    let requests = pool.requests() - requests_before;
    let cpu = match (cpu_before, redis_cpu(plan.redis_url.as_deref()).await) {
        (Some(before), Some(after)) if requests > 0 => Some(after.per(&before, requests)),
        _ => None,
    };
    let joins = tokens.len() as u64;
    Ok(check::outcome(&pool, &plan, event, seen, joins, cpu).await)
}

async fn create_event(pool: &Pool, plan: &Plan, run: &str) -> Result<Event, String> {
    let opens_at = Utc::now() + plan.opens_in;
    let seats = plan.seats.unwrap_or(plan.buyers as u32).max(1);
    let admin = format!("Bearer {}", plan.admin_token);
    let body = json!({
        "name": format!("rush queue {run}"),
        "totalSeats": seats,
        "queue": {
            "opensAt": opens_at.to_rfc3339(),
            "admitPerSecond": plan.rate,
            "admissionSeconds": plan.admission_seconds,
        },
    });
    let (status, body) = pool
        .call(
            Method::POST,
            "/api/v1/events",
            &[("authorization", &admin)],
            Some(body),
        )
        .await?;
    match (status, body["id"].as_str()) {
        (201, Some(id)) => Ok(Event {
            id: id.parse().map_err(|e| format!("event id {id}: {e}"))?,
            seats,
            opens_at,
        }),
        _ => Err(format!("creating the queued event: {status} {body}")),
    }
}

/// Early joiners, then (after the opening) the late ones: each wave in order, so
/// ticket numbers follow the order this client sent them. Each buyer then goes on in
/// a task of its own.
async fn join(
    pool: &Arc<Pool>,
    plan: &Plan,
    event: Event,
    tokens: &[String],
) -> Result<JoinSet<(usize, Seen)>, String> {
    let early = (plan.buyers as f64 * plan.early_share).round() as usize;
    let path = format!("/api/v1/events/{}/queue", event.id);
    let mut tasks = JoinSet::new();
    for (i, token) in tokens.iter().enumerate() {
        if i == early {
            let wait = (event.opens_at - Utc::now()).num_milliseconds();
            if wait > 0 {
                tokio::time::sleep(Duration::from_millis(wait as u64 + 20)).await;
            }
        }
        let auth = format!("Bearer {token}");
        let joined_at_ms = now_ms();
        let (status, body) = pool
            .call(Method::POST, &path, &[("authorization", &auth)], None)
            .await?;
        if status != 202 {
            return Err(format!("buyer {i} joining: {status} {body}"));
        }
        let buyer = Buyer {
            pool: pool.clone(),
            event: event.id,
            ticket: body["ticket"].as_str().unwrap_or_default().to_owned(),
            auth,
        };
        let sneak =
            (i as u64).wrapping_mul(2_654_435_761) % 10_000 < (plan.sneak_share * 10_000.0) as u64;
        tasks.spawn(async move {
            let mut seen = buyer.go(body, sneak).await;
            seen.joined_at_ms = joined_at_ms;
            (i, seen)
        });
    }
    Ok(tasks)
}

/// One buyer in the queue.
struct Buyer {
    pool: Arc<Pool>,
    event: Uuid,
    ticket: String,
    auth: String,
}

impl Buyer {
    /// Maybe a sneak purchase first, then polls as told until admitted, then one
    /// purchase with the admission.
    async fn go(self, joined: Value, sneak: bool) -> Seen {
        let mut seen = Seen {
            ticket: self.ticket.clone(),
            sneaked: sneak,
            ..Seen::default()
        };
        if sneak {
            self.sneak(&mut seen).await;
        }
        if let Some(admitted) = self.admission(joined, &mut seen).await {
            self.buy(&admitted, &mut seen).await;
        }
        seen
    }

    async fn purchase(&self, key: &str, admission: Option<&str>) -> Result<(u16, Value), String> {
        let path = format!("/api/v1/events/{}/purchase", self.event);
        let mut headers = vec![
            ("authorization", self.auth.as_str()),
            ("idempotency-key", key),
        ];
        if let Some(admission) = admission {
            headers.push(("admission-token", admission));
        }
        let body = Some(json!({"quantity": 1}));
        self.pool.call(Method::POST, &path, &headers, body).await
    }

    /// A purchase without admission, which must be refused.
    async fn sneak(&self, seen: &mut Seen) {
        let ticket = &self.ticket;
        match self.purchase(&format!("sneak-{ticket}"), None).await {
            Ok((403, _)) => seen.sneak_refused = true,
            other => {
                seen.failure = Some(format!(
                    "{ticket}: a purchase without admission got {other:?}"
                ))
            }
        }
    }

    /// Polls as told until admitted: the poll's answer that says so, or `None` (with
    /// the failure in `seen`).
    async fn admission(&self, joined: Value, seen: &mut Seen) -> Option<Value> {
        let (ticket, event) = (&self.ticket, self.event);
        let path = format!("/api/v1/events/{event}/queue/{ticket}");
        let mut status = joined;
        let mut last_position = u64::MAX;
        let opens_at = time_ms(&status["opensAt"]).unwrap_or_default();
        while status["admitted"] != true {
            if status["admissionExpired"] == true {
                seen.failure = Some(format!(
                    "{ticket}: its admission expired before it learned of it"
                ));
                return None;
            }
            if now_ms() >= opens_at {
                let position = status["position"].as_u64().unwrap_or(u64::MAX);
                seen.position_rose |= position > last_position;
                last_position = position;
            }
            let wait = status["pollAfterMs"].as_u64().unwrap_or(1_000);
            tokio::time::sleep(Duration::from_millis(wait)).await;
            match self
                .pool
                .call(Method::GET, &path, &[("authorization", &self.auth)], None)
                .await
            {
                Ok((200, body)) => {
                    seen.polls += 1;
                    status = body;
                }
                other => {
                    seen.failure = Some(format!("{ticket}: poll got {other:?}"));
                    return None;
                }
            }
        }
        seen.learned_at_ms = now_ms();
        seen.admitted_at_ms = time_ms(&status["admittedAt"]).unwrap_or_default();
        Some(status)
    }

    async fn buy(&self, admitted: &Value, seen: &mut Seen) {
        let admission = admitted["admissionToken"].as_str().unwrap_or_default();
        let ticket = &self.ticket;
        match self
            .purchase(&format!("buy-{ticket}"), Some(admission))
            .await
        {
            Ok((200, _)) => seen.bought = true,
            Ok((409, body)) if body["error"] == "SOLD_OUT" => seen.sold_out = true,
            other => seen.failure = Some(format!("{ticket}: an admitted purchase got {other:?}")),
        }
    }
}

/// Redis' counters, when the run was given its URL and it answers.
async fn redis_cpu(url: Option<&str>) -> Option<RedisCpu> {
    let client = redis::Client::open(url?).ok()?;
    let mut conn = client.get_multiplexed_async_connection().await.ok()?;
    RedisCpu::read(&mut conn).await.ok()
}
