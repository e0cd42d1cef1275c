//! `rush holds`: the seat lifecycle under load. On an event of its own (created with
//! the admin token, a short hold time and a limit per buyer), keep-alive connections
//! act as buyers with tokens: each action is a direct purchase, or a hold that is then
//! confirmed, released or abandoned, in the configured shares. After the run it
//! cancels a share of the sales, waits for the abandoned holds to expire, and checks
//! what the service says against what the buyers were told.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use hyper::Method;
use serde::Serialize;
use serde_json::{Value, json};
use uuid::Uuid;

use crate::client::{Answer, Sender, Target, connect, request, send, sign_buyer_tokens, targets};
use crate::report::Check;

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

/// What the connections share.
struct Shared {
    plan: Plan,
    targets: Vec<Target>,
    event: Uuid,
    tokens: Vec<Option<String>>,
    next: AtomicU64,
    deadline: Instant,
}

/// One sale a buyer was told about.
#[derive(Debug, Clone)]
struct Sale {
    id: String,
    seats: i64,
    buyer: usize,
}

/// What one connection saw.
#[derive(Default)]
struct Tally {
    requests: u64,
    statuses: HashMap<u16, u64>,
    errors: u64,
    first_error: Option<String>,
    purchases: u64,
    purchased_seats: i64,
    holds: u64,
    confirmed: u64,
    confirmed_seats: i64,
    released_seats: i64,
    refusals: HashMap<String, u64>,
    sales: Vec<Sale>,
    /// Abandoned holds: id, seats, expiry.
    abandoned: Vec<(String, i64, chrono::DateTime<chrono::Utc>)>,
}

pub async fn run(plan: Plan) -> Result<Outcome, String> {
    let targets = targets(&plan.urls).await?;
    let run = Uuid::new_v4().simple().to_string()[..12].to_owned();
    let event = create_event(&targets[0], &plan, &run).await?;
    let tokens: Vec<Option<String>> = match &plan.buyer_key {
        Some(key) => {
            let valid_for =
                plan.duration + Duration::from_secs(u64::from(plan.hold_seconds) + 3_600);
            sign_buyer_tokens(key, &run, plan.buyers, valid_for)?
                .into_iter()
                .map(Some)
                .collect()
        }
        None => vec![None; plan.buyers],
    };
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
    let watcher = tokio::spawn(watch(shared.clone(), stop.clone()));
    let mut workers = tokio::task::JoinSet::new();
    for connection in 0..plan.connections {
        workers.spawn(buyer(shared.clone(), connection));
    }
    let mut tally = Tally::default();
    while let Some(worker) = workers.join_next().await {
        merge(&mut tally, worker.map_err(|e| e.to_string())?);
    }
    let elapsed = started.elapsed();
    stop.store(true, Ordering::Relaxed);
    let (most_taken, over_capacity) = watcher.await.map_err(|e| e.to_string())?;

    let mut outcome = Outcome {
        event,
        duration_s: elapsed.as_secs_f64(),
        requests: tally.requests,
        requests_per_s: tally.requests as f64 / elapsed.as_secs_f64(),
        sales_per_s: (tally.purchases + tally.confirmed) as f64 / elapsed.as_secs_f64(),
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
    };
    let cancelled = cancel_some(&shared, &tally.sales).await?;
    outcome.cancelled = cancelled.len() as u64;
    outcome.cancelled_seats = cancelled.iter().map(|s| s.seats).sum();
    outcome.checks = check(&shared, &tally, &outcome, over_capacity, &cancelled).await;
    Ok(outcome)
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

/// A fixed hash of `n` in [0, 1): spreads the actions without an RNG to seed.
fn fraction(n: u64, salt: u64) -> f64 {
    (n.wrapping_add(salt).wrapping_mul(2_654_435_761) % 10_000) as f64 / 10_000.0
}

/// One connection acting as the buyers it picks, until the deadline.
async fn buyer(shared: Arc<Shared>, connection: usize) -> Tally {
    let target = shared.targets[connection % shared.targets.len()].clone();
    let mut client = Client {
        target,
        sender: None,
        tally: Tally::default(),
        timeout: shared.plan.timeout,
    };
    let (event, plan) = (shared.event, &shared.plan);
    while Instant::now() < shared.deadline {
        let n = shared.next.fetch_add(1, Ordering::Relaxed);
        let who = (n as usize).wrapping_mul(7919) % plan.buyers;
        let auth = shared.tokens[who].as_ref().map(|t| format!("Bearer {t}"));
        let mut headers = vec![("idempotency-key".to_owned(), format!("rush-{event}-{n}"))];
        if let Some(auth) = auth.clone() {
            headers.push(("authorization".to_owned(), auth));
        }
        let quantity = 1 + (n % 2) as i64;
        let body = Some(json!({ "quantity": quantity }));
        if fraction(n, 1) < plan.purchase_share {
            let path = format!("/api/v1/events/{event}/purchase");
            if let Some((200, body)) = client.call(Method::POST, &path, &headers, body).await {
                client.tally.purchases += 1;
                client.tally.purchased_seats += quantity;
                client.tally.sales.push(Sale {
                    id: body["purchaseId"].as_str().unwrap_or_default().to_owned(),
                    seats: quantity,
                    buyer: who,
                });
            }
            continue;
        }
        let path = format!("/api/v1/events/{event}/holds");
        let Some((201, held)) = client.call(Method::POST, &path, &headers, body).await else {
            continue;
        };
        client.tally.holds += 1;
        let hold = held["holdId"].as_str().unwrap_or_default().to_owned();
        let choice = fraction(n, 2);
        if choice < plan.confirm_share {
            let path = format!("/api/v1/events/{event}/holds/{hold}/confirm");
            if let Some((200, _)) = client.call(Method::POST, &path, &[], None).await {
                client.tally.confirmed += 1;
                client.tally.confirmed_seats += quantity;
                client.tally.sales.push(Sale {
                    id: hold,
                    seats: quantity,
                    buyer: who,
                });
            }
        } else if choice < plan.confirm_share + plan.release_share {
            let path = format!("/api/v1/events/{event}/holds/{hold}");
            if let Some((204, _)) = client.call(Method::DELETE, &path, &[], None).await {
                client.tally.released_seats += quantity;
            }
        } else {
            let expires = held["expiresAt"]
                .as_str()
                .and_then(|t| t.parse().ok())
                .unwrap_or_else(chrono::Utc::now);
            client.tally.abandoned.push((hold, quantity, expires));
        }
    }
    client.tally
}

/// One kept-alive connection and what it counted.
struct Client {
    target: Target,
    sender: Option<Sender>,
    tally: Tally,
    timeout: Duration,
}

impl Client {
    /// Sends one request; returns its status and JSON body, or `None` (counted as an
    /// error) when no answer came.
    async fn call(
        &mut self,
        method: Method,
        path: &str,
        headers: &[(String, String)],
        body: Option<Value>,
    ) -> Option<(u16, Value)> {
        let headers: Vec<(&str, &str)> = headers
            .iter()
            .map(|(n, v)| (n.as_str(), v.as_str()))
            .collect();
        let request = request(&self.target, method, path, &headers, body.as_ref());
        self.tally.requests += 1;
        let answer: Result<Answer, String> = async {
            let mut sender = match self.sender.take() {
                Some(sender) => sender,
                None => connect(&self.target).await?,
            };
            let answer = send(&mut sender, request, self.timeout).await?;
            self.sender = Some(sender);
            Ok(answer)
        }
        .await;
        match answer {
            Ok(answer) => {
                *self.tally.statuses.entry(answer.status).or_default() += 1;
                let body: Value = serde_json::from_slice(&answer.body).unwrap_or_default();
                if let Some(code) = body["error"].as_str() {
                    *self.tally.refusals.entry(code.to_owned()).or_default() += 1;
                }
                Some((answer.status, body))
            }
            Err(e) => {
                self.tally.errors += 1;
                self.tally.first_error.get_or_insert(e);
                None
            }
        }
    }
}

fn merge(into: &mut Tally, from: Tally) {
    into.requests += from.requests;
    for (status, n) in from.statuses {
        *into.statuses.entry(status).or_default() += n;
    }
    for (code, n) in from.refusals {
        *into.refusals.entry(code).or_default() += n;
    }
    into.errors += from.errors;
    into.first_error = into.first_error.take().or(from.first_error);
    into.purchases += from.purchases;
    into.purchased_seats += from.purchased_seats;
    into.holds += from.holds;
    into.confirmed += from.confirmed;
    into.confirmed_seats += from.confirmed_seats;
    into.released_seats += from.released_seats;
    into.sales.extend(from.sales);
    into.abandoned.extend(from.abandoned);
}

/// The event's seats, as `GET /api/v1/events/{id}` says: (total, sold, held).
async fn seats(target: &Target, event: Uuid) -> Result<(i64, i64, i64), String> {
    let mut sender = connect(target).await?;
    let path = format!("/api/v1/events/{event}");
    let answer = send(
        &mut sender,
        request(target, Method::GET, &path, &[], None),
        Duration::from_secs(10),
    )
    .await?;
    let body: Value = serde_json::from_slice(&answer.body).map_err(|e| e.to_string())?;
    let field = |name: &str| body[name].as_i64().ok_or(format!("{path}: {body}"));
    Ok((
        field("totalSeats")?,
        field("seatsSold")?,
        field("seatsHeld")?,
    ))
}

/// Samples the event's seats during the run: the most `sold + held` seen, and
/// whether it ever exceeded the total.
async fn watch(shared: Arc<Shared>, stop: Arc<AtomicBool>) -> (i64, bool) {
    let (mut most, mut over) = (0, false);
    while !stop.load(Ordering::Relaxed) {
        if let Ok((total, sold, held)) = seats(&shared.targets[0], shared.event).await {
            most = most.max(sold + held);
            over |= sold + held > total || sold < 0 || held < 0;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    (most, over)
}

/// Cancels every sale whose place in the list falls in the cancel share, as the
/// admin; a sale not yet in PostgreSQL answers 503 and is tried again.
async fn cancel_some(shared: &Shared, sales: &[Sale]) -> Result<Vec<Sale>, String> {
    let plan = &shared.plan;
    let chosen: Vec<&Sale> = sales
        .iter()
        .enumerate()
        .filter(|(i, _)| fraction(*i as u64, 3) < plan.cancel_share)
        .map(|(_, s)| s)
        .collect();
    let mut client = Client {
        target: shared.targets[0].clone(),
        sender: None,
        tally: Tally::default(),
        timeout: plan.timeout,
    };
    let auth = vec![(
        "authorization".to_owned(),
        format!("Bearer {}", plan.admin_token),
    )];
    let mut cancelled = Vec::new();
    for sale in chosen {
        let path = format!(
            "/api/v1/events/{}/purchases/{}/cancel",
            shared.event, sale.id
        );
        let give_up = Instant::now() + Duration::from_secs(60);
        loop {
            match client.call(Method::POST, &path, &auth, None).await {
                Some((200, _)) => {
                    cancelled.push(sale.clone());
                    break;
                }
                Some((503, _)) | None if Instant::now() < give_up => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                other => return Err(format!("cancelling {}: {other:?}", sale.id)),
            }
        }
    }
    Ok(cancelled)
}

async fn check(
    shared: &Shared,
    tally: &Tally,
    outcome: &Outcome,
    over_capacity: bool,
    cancelled: &[Sale],
) -> Vec<Check> {
    let plan = &shared.plan;
    let mut checks = vec![
        Check {
            name: "every request answered",
            ok: tally.errors == 0,
            detail: format!("{} without an HTTP answer", tally.errors),
        },
        Check {
            name: "no server errors",
            ok: tally.statuses.keys().all(|s| *s < 500),
            detail: format!("statuses {:?}", tally.statuses),
        },
        Check {
            name: "sold + held never above the total during the run",
            ok: !over_capacity,
            detail: format!("most taken at a sample: {}", outcome.most_taken),
        },
    ];

    // The abandoned holds expire; the sweeper returns them within its interval.
    let latest = tally.abandoned.iter().map(|(_, _, at)| *at).max();
    if let Some(latest) = latest {
        let wait = (latest - chrono::Utc::now()).num_milliseconds().max(0) as u64 + 1_500;
        tokio::time::sleep(Duration::from_millis(wait)).await;
    }
    let expected_sold = outcome.purchased_seats + outcome.confirmed_seats - outcome.cancelled_seats;
    match seats(&shared.targets[0], shared.event).await {
        Ok((total, sold, held)) => {
            checks.push(Check {
                name: "sold = confirmed + purchased − cancelled",
                ok: sold == expected_sold,
                detail: format!(
                    "API {sold}; {} + {} − {}",
                    outcome.confirmed_seats, outcome.purchased_seats, outcome.cancelled_seats
                ),
            });
            checks.push(Check {
                name: "every abandoned hold's seats came back after its expiry",
                ok: held == 0 && sold + held <= total,
                detail: format!(
                    "{held} seats still held after {} abandoned holds ({} seats) expired",
                    outcome.abandoned, outcome.abandoned_seats
                ),
            });
        }
        Err(e) => checks.push(Check {
            name: "the event's seats",
            ok: false,
            detail: e,
        }),
    }
    let mut expired = 0;
    let sample: Vec<_> = tally.abandoned.iter().take(200).collect();
    let mut client = Client {
        target: shared.targets[0].clone(),
        sender: None,
        tally: Tally::default(),
        timeout: plan.timeout,
    };
    for (hold, _, _) in &sample {
        let path = format!("/api/v1/events/{}/holds/{hold}", shared.event);
        if let Some((200, body)) = client.call(Method::GET, &path, &[], None).await
            && body["state"] == "expired"
        {
            expired += 1;
        }
    }
    checks.push(Check {
        name: "abandoned holds read as expired",
        ok: expired == sample.len(),
        detail: format!("{expired} of {} sampled", sample.len()),
    });

    if plan.max_per_buyer > 0 {
        let mut per_buyer: HashMap<usize, i64> = HashMap::new();
        for sale in &tally.sales {
            *per_buyer.entry(sale.buyer).or_default() += sale.seats;
        }
        for sale in cancelled {
            *per_buyer.entry(sale.buyer).or_default() -= sale.seats;
        }
        let most = per_buyer.values().copied().max().unwrap_or(0);
        checks.push(Check {
            name: "no buyer over the limit",
            ok: most <= i64::from(plan.max_per_buyer),
            detail: format!(
                "most seats one buyer bought: {most} (limit {}, {} buyers)",
                plan.max_per_buyer,
                per_buyer.len()
            ),
        });
    }
    if let Some(url) = &plan.database_url {
        checks.push(rows(url, shared.event, tally, outcome, plan.max_per_buyer).await);
    }
    checks
}

/// Waits until PostgreSQL holds one row per sale and marks each cancellation, and
/// checks no buyer there is over the limit.
async fn rows(url: &str, event: Uuid, tally: &Tally, outcome: &Outcome, limit: u32) -> Check {
    let name = "PostgreSQL: one row per sale, cancellations marked, no buyer over the limit";
    let pool = match sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .connect(url)
        .await
    {
        Ok(pool) => pool,
        Err(e) => {
            return Check {
                name,
                ok: false,
                detail: format!("cannot connect: {e}"),
            };
        }
    };
    let sales = tally.sales.len() as i64;
    let started = Instant::now();
    loop {
        let counted: Result<(i64, i64, i64, i64), _> = sqlx::query_as(
            "SELECT count(*),
                    COALESCE(SUM(quantity) FILTER (WHERE cancelled_at IS NULL), 0)::int8,
                    count(*) FILTER (WHERE cancelled_at IS NOT NULL),
                    COALESCE((SELECT max(s) FROM (SELECT SUM(quantity) AS s FROM purchases
                              WHERE event_id = $1 AND cancelled_at IS NULL
                              GROUP BY buyer) b), 0)::int8
             FROM purchases WHERE event_id = $1",
        )
        .bind(event)
        .fetch_one(&pool)
        .await;
        let (rows, seats, cancelled, most) = match counted {
            Ok(counted) => counted,
            Err(e) => {
                return Check {
                    name,
                    ok: false,
                    detail: e.to_string(),
                };
            }
        };
        let expected_seats =
            outcome.purchased_seats + outcome.confirmed_seats - outcome.cancelled_seats;
        let detail = format!(
            "{rows} rows for {sales} sales, {seats} seats not cancelled (expected \
             {expected_seats}), {cancelled} cancelled of {}, most per buyer {most}",
            outcome.cancelled
        );
        let limit_ok = limit == 0 || most <= i64::from(limit);
        if rows == sales
            && seats == expected_seats
            && cancelled == outcome.cancelled as i64
            && limit_ok
        {
            return Check {
                name,
                ok: true,
                detail,
            };
        }
        if rows > sales || !limit_ok || started.elapsed() > Duration::from_secs(60) {
            return Check {
                name,
                ok: false,
                detail,
            };
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

impl crate::Verdict for Outcome {
    fn checks(&self) -> &[crate::report::Check] {
        &self.checks
    }

    fn print_summary(&self) {
        println!(
            "rush holds on event {}: {} requests in {:.2} s ({:.0} req/s), {:.0} sales/s",
            self.event, self.requests, self.duration_s, self.requests_per_s, self.sales_per_s
        );
        println!(
            "purchases {} ({} seats); holds {}: confirmed {} ({} seats), released {} seats, \
             abandoned {} ({} seats); cancelled {} ({} seats)",
            self.purchases,
            self.purchased_seats,
            self.holds,
            self.confirmed,
            self.confirmed_seats,
            self.released_seats,
            self.abandoned,
            self.abandoned_seats,
            self.cancelled,
            self.cancelled_seats
        );
        let mut statuses: Vec<_> = self.statuses.iter().collect();
        statuses.sort();
        let mut refusals: Vec<_> = self.refusals.iter().collect();
        refusals.sort();
        println!("statuses {statuses:?}; refusals {refusals:?}");
    }
}
