//! `rush holds`: the seat lifecycle under load. On an event of its own (created with
//! the admin token, a short hold time and a limit per buyer), keep-alive connections
//! act as buyers with tokens: each action is a direct purchase, or a hold that is then
//! confirmed, released or abandoned, in the configured shares. After the run it
//! cancels a share of the sales, waits for the abandoned holds to expire, and checks
//! what the service says against what the buyers were told.

mod buyer;
mod check;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use clap::Args;
use hyper::Method;
use serde::Serialize;
use serde_json::{Value, json};
use uuid::Uuid;

use crate::check::Check;
use crate::client::{Target, connect, request, send, sign_buyer_tokens, targets};
use crate::parse_duration;
use buyer::{Shared, Tally, buyer};

/// Options of `rush holds`.
#[derive(Debug, Args)]
pub struct HoldsArgs {
    /// Base URL of a replica; repeat to spread connections round-robin.
    #[arg(long = "url", default_value = "http://127.0.0.1:3000")]
    urls: Vec<String>,
    /// The servers' ADMIN_TOKEN (the run creates its event and cancels sales).
    #[arg(long, env = "ADMIN_TOKEN", hide_env_values = true)]
    admin_token: String,
    /// The servers' BOXOFFICE_BUYER_JWT_KEY, an HS256 secret, to sign buyer
    /// tokens with. Without it: no tokens and no limit.
    #[arg(long, env = "BOXOFFICE_BUYER_JWT_KEY", hide_env_values = true)]
    buyer_key: Option<String>,
    /// Seats of the event.
    #[arg(long, default_value_t = 2_000)]
    seats: u32,
    /// Hold time of the event, in seconds.
    #[arg(long, default_value_t = 2)]
    hold_seconds: u32,
    /// Seats one buyer may have; 0: no limit.
    #[arg(long, default_value_t = 4)]
    max_per_buyer: u32,
    /// Number of distinct buyers.
    #[arg(long, default_value_t = 500)]
    buyers: usize,
    /// Concurrent keep-alive connections.
    #[arg(long, short = 'c', default_value_t = 32)]
    connections: usize,
    /// How long to run.
    #[arg(long, short = 'd', default_value = "5s", value_parser = parse_duration)]
    duration: Duration,
    /// Share of actions that are direct purchases (the rest are holds).
    #[arg(long, default_value_t = 0.2)]
    purchase_share: f64,
    /// Share of holds confirmed.
    #[arg(long, default_value_t = 0.5)]
    confirm_share: f64,
    /// Share of holds released (the rest are abandoned to expire).
    #[arg(long, default_value_t = 0.25)]
    release_share: f64,
    /// Share of sales cancelled after the run.
    #[arg(long, default_value_t = 0.05)]
    cancel_share: f64,
    /// PostgreSQL URL (default: DATABASE_URL, as the server); when given, waits
    /// for the consumer and checks the rows. Empty: no check.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    database_url: Option<String>,
    /// Give up on one request after this long.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    timeout: Duration,
    /// Print the result as JSON.
    #[arg(long)]
    pub json: bool,
}

impl HoldsArgs {
    fn plan(self) -> Plan {
        let Self {
            urls,
            admin_token,
            buyer_key,
            seats,
            hold_seconds,
            max_per_buyer,
            buyers,
            connections,
            duration,
            purchase_share,
            confirm_share,
            release_share,
            cancel_share,
            database_url,
            timeout,
            ..
        } = self;
        let share = |x: f64| x.clamp(0.0, 1.0);

        Plan {
            urls,
            admin_token,
            max_per_buyer: if buyer_key.is_some() {
                max_per_buyer
            } else {
                0
            },
            buyer_key,
            seats: seats.max(1),
            hold_seconds: hold_seconds.max(1),
            buyers: buyers.max(1),
            connections: connections.max(1),
            duration,
            purchase_share: share(purchase_share),
            confirm_share: share(confirm_share),
            release_share: share(release_share),
            cancel_share: share(cancel_share),
            database_url: database_url.filter(|url| !url.is_empty()),
            timeout,
        }
    }
}

/// How a `rush holds` run goes.
#[derive(Debug, Clone)]
pub struct Plan {
    pub urls: Vec<String>,
    pub admin_token: String,
    /// HS256 key the servers verify buyer tokens with; `None`: no tokens, no limit.
    pub buyer_key: Option<String>,
    pub seats: u32,
    pub hold_seconds: u32,
    /// Seats per buyer; 0: no limit.
    pub max_per_buyer: u32,
    pub buyers: usize,
    pub connections: usize,
    pub duration: Duration,
    /// Shares of actions: direct purchases; of holds, confirmed and released (the
    /// rest are abandoned).
    pub purchase_share: f64,
    pub confirm_share: f64,
    pub release_share: f64,
    /// Share of the sales cancelled after the run.
    pub cancel_share: f64,
    pub database_url: Option<String>,
    pub timeout: Duration,
}

/// What a run did and found.
#[derive(Debug, Default, Serialize)]
pub struct Outcome {
    pub event: Uuid,
    pub duration_s: f64,
    pub requests: u64,
    pub requests_per_s: f64,
    /// Sales (direct purchases and confirmations) per second of the run.
    pub sales_per_s: f64,
    pub statuses: HashMap<u16, u64>,
    pub errors: u64,
    pub first_error: Option<String>,
    pub purchases: u64,
    pub purchased_seats: i64,
    pub holds: u64,
    pub confirmed: u64,
    pub confirmed_seats: i64,
    pub released_seats: i64,
    pub abandoned: u64,
    pub abandoned_seats: i64,
    /// Refusals by error code (SOLD_OUT, BUYER_LIMIT, HOLD_EXPIRED, …).
    pub refusals: HashMap<String, u64>,
    pub cancelled: u64,
    pub cancelled_seats: i64,
    /// Most `sold + held` any sample of the event showed during the run.
    pub most_taken: i64,
    pub checks: Vec<Check>,
}

impl HoldsArgs {
    pub async fn run(self) -> Result<Outcome, String> {
        run(self.plan()).await
    }
}

async fn run(plan: Plan) -> Result<Outcome, String> {
    let targets = targets(&plan.urls).await?;
    let run = Uuid::new_v4().simple().to_string()[..12].to_owned();
    let event = create_event(&targets[0], &plan, &run).await?;
    let tokens = tokens(&plan, &run)?;
    let started = Instant::now();
    let shared = Arc::new(Shared {
        plan: plan.clone(),
        targets,
        event,
        tokens,
        next: AtomicU64::new(0),
        deadline: started + plan.duration,
    });
    let stop = Arc::new(AtomicBool::new(false));
    let watcher = tokio::spawn(check::watch(shared.clone(), stop.clone()));
    let mut workers = tokio::task::JoinSet::new();
    for connection in 0..plan.connections {
        workers.spawn(buyer(shared.clone(), connection));
    }
    let mut tally = Tally::default();
    while let Some(worker) = workers.join_next().await {
        tally.merge(worker.map_err(|e| e.to_string())?);
    }
    let elapsed = started.elapsed();
    stop.store(true, Ordering::Relaxed);
    let (most_taken, over_capacity) = watcher.await.map_err(|e| e.to_string())?;

    let mut outcome = Outcome::new(event, elapsed, &tally, most_taken);
    let cancelled = check::cancel_some(&shared, &tally.sales).await?;
    outcome.cancelled = cancelled.len() as u64;
    outcome.cancelled_seats = cancelled.iter().map(|s| s.seats).sum();
    outcome.checks = check::check(&shared, &tally, &outcome, over_capacity, &cancelled).await;
    Ok(outcome)
}

/// A token per buyer when the plan has a buyer key, valid past the run's end.
fn tokens(plan: &Plan, run: &str) -> Result<Vec<Option<String>>, String> {
    let Some(key) = &plan.buyer_key else {
        return Ok(vec![None; plan.buyers]);
    };
    let valid_for = plan.duration + Duration::from_secs(u64::from(plan.hold_seconds) + 3_600);
    Ok(sign_buyer_tokens(key, run, plan.buyers, valid_for)?
        .into_iter()
        .map(Some)
        .collect())
}

impl Outcome {
    fn new(event: Uuid, elapsed: Duration, tally: &Tally, most_taken: i64) -> Self {
        let seconds = elapsed.as_secs_f64();
        Outcome {
            event,
            duration_s: seconds,
            requests: tally.requests,
            requests_per_s: tally.requests as f64 / seconds,
            sales_per_s: (tally.purchases + tally.confirmed) as f64 / seconds,
            statuses: tally.statuses.clone(),
            errors: tally.errors,
            first_error: tally.first_error.clone(),
            purchases: tally.purchases,
            purchased_seats: tally.purchased_seats,
            holds: tally.holds,
            confirmed: tally.confirmed,
            confirmed_seats: tally.confirmed_seats,
            released_seats: tally.released_seats,
            abandoned: tally.abandoned.len() as u64,
            abandoned_seats: tally.abandoned.iter().map(|(_, s, _)| s).sum(),
            refusals: tally.refusals.clone(),
            most_taken,
            ..Outcome::default()
        }
    }
}

async fn create_event(target: &Target, plan: &Plan, run: &str) -> Result<Uuid, String> {
    let mut body = json!({
        "name": format!("rush holds {run}"),
        "totalSeats": plan.seats,
        "holdSeconds": plan.hold_seconds,
    });
    if plan.max_per_buyer > 0 {
        body["maxPerBuyer"] = plan.max_per_buyer.into();
    }
    let mut sender = connect(target).await?;
    let request = request(
        target,
        Method::POST,
        "/api/v1/events",
        &[("authorization", &format!("Bearer {}", plan.admin_token))],
        Some(&body),
    );
    let answer = send(&mut sender, request, Duration::from_secs(10)).await?;
    let body: Value = serde_json::from_slice(&answer.body).unwrap_or_default();
    match (answer.status, body["id"].as_str()) {
        (201, Some(id)) => id.parse().map_err(|e| format!("event id {id}: {e}")),
        _ => Err(format!(
            "creating the event: {} {body} (is --admin-token the servers' ADMIN_TOKEN?)",
            answer.status
        )),
    }
}
