//! `rush flood`: what an anonymous crowd can make the service keep, and whether
//! buyers still buy meanwhile (docs/operations.md, "Abuse and hardening").
//!
//! It creates a sold-out event (one seat, bought), a live one, and a waiting room
//! opening in an hour. Then, for `--duration`, `-c` requests at a time with fresh
//! keys and no token: purchases and holds on the sold-out event, releases of holds
//! that do not exist, joins of the waiting room. With `--redis-url`, Redis' memory is
//! read right before and after: what it grew by per request. A second round of the
//! same flood runs while `--buyers` buyers buy one seat after another from the live
//! event (a 503 or 429 retried with the same key), timed from first try to sale.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use boxoffice::gate::memory::info_field;
use clap::Args;
use hyper::Method;
use serde::Serialize;
use serde_json::{Value, json};
use tokio::task::JoinSet;
use uuid::Uuid;

use crate::check::{Check, Verdict};
use crate::client::{Pool, run_id, targets};
use crate::parse_duration;

/// Answers a flooding request may get: refused (sold out, no such hold, no token,
/// over a rate limit) or shed (503). Anything else sold or held on a sold-out event.
const REFUSED: [u16; 5] = [401, 404, 409, 429, 503];
/// Tries of one buyer's purchase (a 503 or 429 is sent again with the same key).
const BUYER_TRIES: usize = 6;

/// Options of `rush flood`.
#[derive(Debug, Args)]
pub struct FloodArgs {
    /// Base URL of a replica; repeat to spread connections round-robin.
    #[arg(long = "url", default_value = "http://127.0.0.1:3000")]
    urls: Vec<String>,
    /// The servers' ADMIN_TOKEN (the run creates its events).
    #[arg(long, env = "ADMIN_TOKEN", hide_env_values = true)]
    admin_token: String,
    /// The servers' Redis, to read its memory (`INFO memory`) right before and after
    /// the flood. Without it, growth is not measured.
    #[arg(long)]
    redis_url: Option<String>,
    /// Flooding requests in flight.
    #[arg(long, short = 'c', default_value_t = 64)]
    connections: usize,
    /// How long each round (measured alone, then beside the buyers) lasts.
    #[arg(long, short = 'd', default_value = "10s", value_parser = parse_duration)]
    duration: Duration,
    /// Buyers of the live event in the second round, each buying one seat at a time.
    #[arg(long, default_value_t = 4)]
    buyers: usize,
    /// Most Redis may grow per flooding request, in bytes.
    #[arg(long, default_value_t = 25.0)]
    max_bytes: f64,
    /// Give up on one request after this long.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    timeout: Duration,
    /// Print the result as JSON.
    #[arg(long)]
    pub json: bool,
}

/// The events of one run, and the paths the flood sends to.
struct Events {
    sold_out: Uuid,
    live: Uuid,
    /// `None` when the servers have no admission key (no waiting rooms).
    queued: Option<Uuid>,
}

/// What `rush flood` found.
#[derive(Debug, Serialize)]
pub struct Outcome {
    sold_out_event: Uuid,
    live_event: Uuid,
    flood_requests: u64,
    flood_per_s: f64,
    /// Answers to the flood, by status.
    statuses: BTreeMap<u16, u64>,
    /// Redis' growth per flooding request in the first round, bytes.
    bytes_per_request: Option<f64>,
    buyers_sales: u64,
    buyers_retries: u64,
    buyers_p50_ms: f64,
    buyers_p99_ms: f64,
    checks: Vec<Check>,
}

impl FloodArgs {
    pub async fn run(self) -> Result<Outcome, String> {
        let pool = Arc::new(Pool::new(
            targets(&self.urls).await?,
            self.connections.max(1) + self.buyers,
            self.timeout,
        ));
        let run = run_id();
        let events = self.create_events(&pool, &run).await?;
        let mut redis = match &self.redis_url {
            Some(url) => Some(redis_connection(url).await?),
            None => None,
        };
        let lanes = self.connections.max(1) as u64;
        let mut statuses = BTreeMap::new();
        // Connections opened and scripts loaded before anything is measured.
        let warm_up = (200, Duration::from_secs(60));
        flood(&pool, &events, lanes, warm_up, &mut statuses).await;
        statuses.clear();

        let before = match redis.as_mut() {
            Some(conn) => Some(kept_bytes(conn).await?),
            None => None,
        };
        let started = Instant::now();
        let round = (u64::MAX, self.duration);
        let first = flood(&pool, &events, lanes, round, &mut statuses).await;
        let elapsed = started.elapsed();
        let bytes_per_request = match (redis.as_mut(), before) {
            (Some(conn), Some(before)) => {
                Some((kept_bytes(conn).await? - before) as f64 / first.max(1) as f64)
            }
            _ => None,
        };

        let done = Arc::new(AtomicBool::new(false));
        let buyers = self.buy(&pool, events.live, &run, done.clone());
        let second = flood(&pool, &events, lanes, round, &mut statuses).await;
        done.store(true, Ordering::Relaxed);
        let (mut took, retries) = buyers.await?;
        took.sort();
        let at = |q: f64| {
            took.get(((took.len() as f64 - 1.0) * q) as usize)
                .map_or(0.0, |d| d.as_secs_f64() * 1e3)
        };
        let mut outcome = Outcome {
            sold_out_event: events.sold_out,
            live_event: events.live,
            flood_requests: first + second,
            flood_per_s: first as f64 / elapsed.as_secs_f64(),
            statuses,
            bytes_per_request,
            buyers_sales: took.len() as u64,
            buyers_retries: retries,
            buyers_p50_ms: at(0.5),
            buyers_p99_ms: at(0.99),
            checks: Vec::new(),
        };
        outcome.checks = self.checks(&pool, &events, &outcome).await?;
        Ok(outcome)
    }

    async fn create_events(&self, pool: &Pool, run: &str) -> Result<Events, String> {
        let create = async |body: Value| -> Result<Option<Uuid>, String> {
            let auth = format!("Bearer {}", self.admin_token);
            let (status, body) = pool
                .call(
                    Method::POST,
                    "/api/v1/events",
                    &[("authorization", &auth)],
                    Some(body),
                )
                .await?;
            match (status, body["id"].as_str()) {
                (201, Some(id)) => Ok(Some(id.parse().map_err(|e| format!("event {id}: {e}"))?)),
                (422, _) => Ok(None),
                _ => Err(format!(
                    "creating an event: {status} {body} (is --admin-token the servers' ADMIN_TOKEN?)"
                )),
            }
        };
        let name = |what: &str| format!("rush flood {run} {what}");
        let missing = || "the servers refused a plain event".to_owned();
        let sold_out = create(json!({"name": name("sold out"), "totalSeats": 1}))
            .await?
            .ok_or_else(missing)?;
        let live = create(json!({"name": name("live"), "totalSeats": 1_000_000}))
            .await?
            .ok_or_else(missing)?;
        let opens = chrono::Utc::now() + chrono::Duration::hours(1);
        let queued = create(json!({
            "name": name("queued"),
            "totalSeats": 10,
            "queue": {"opensAt": opens.to_rfc3339(), "admitPerSecond": 1, "admissionSeconds": 60},
        }))
        .await?;
        let key = format!("rush-flood-{run}-last-seat");
        let (status, body) = purchase(pool, sold_out, &key).await?;
        if status != 200 {
            return Err(format!("buying the sold-out event's seat: {status} {body}"));
        }
        Ok(Events {
            sold_out,
            live,
            queued,
        })
    }

    /// Buyers of the live event, until `done`: the time of each sale from its first
    /// try, and how many tries were retries.
    fn buy(
        &self,
        pool: &Arc<Pool>,
        live: Uuid,
        run: &str,
        done: Arc<AtomicBool>,
    ) -> impl Future<Output = Result<(Vec<Duration>, u64), String>> + use<> {
        let mut buyers = JoinSet::new();
        for b in 0..self.buyers {
            let (pool, done, run) = (pool.clone(), done.clone(), run.to_owned());
            buyers.spawn(async move {
                let (mut took, mut retries) = (Vec::new(), 0);
                for n in 0.. {
                    if done.load(Ordering::Relaxed) {
                        break;
                    }
                    let key = format!("rush-flood-{run}-buyer-{b}-{n}");
                    let started = Instant::now();
                    let mut answer = purchase(&pool, live, &key).await;
                    for _ in 1..BUYER_TRIES {
                        match &answer {
                            Ok((429 | 503, _)) | Err(_) => {
                                retries += 1;
                                tokio::time::sleep(Duration::from_millis(100)).await;
                                answer = purchase(&pool, live, &key).await;
                            }
                            _ => break,
                        }
                    }
                    match answer? {
                        (200, _) => took.push(started.elapsed()),
                        (status, body) => return Err(format!("a buyer got {status} {body}")),
                    }
                }
                Ok((took, retries))
            });
        }
        async move {
            let (mut took, mut retries) = (Vec::new(), 0);
            for buyer in buyers.join_all().await {
                let (t, r) = buyer?;
                took.extend(t);
                retries += r;
            }
            Ok((took, retries))
        }
    }

    async fn checks(
        &self,
        pool: &Pool,
        events: &Events,
        outcome: &Outcome,
    ) -> Result<Vec<Check>, String> {
        let seats = async |event: Uuid| -> Result<(i64, i64), String> {
            let (_, body) = pool
                .call(Method::GET, &format!("/api/v1/events/{event}"), &[], None)
                .await?;
            Ok((
                body["seatsSold"].as_i64().unwrap_or(-1),
                body["seatsHeld"].as_i64().unwrap_or(-1),
            ))
        };
        let others: u64 = (outcome.statuses.iter())
            .filter(|(status, _)| !REFUSED.contains(status))
            .map(|(_, n)| n)
            .sum();
        let mut checks = vec![
            Check {
                name: "the flood was refused",
                ok: others == 0,
                detail: format!("{others} answers other than {REFUSED:?}"),
            },
            Check {
                name: "the sold-out event stayed sold out",
                ok: seats(events.sold_out).await? == (1, 0),
                detail: "1 seat sold, none held".into(),
            },
        ];
        let (live_sold, _) = seats(events.live).await?;
        checks.push(Check {
            name: "every buyer's sale counted once",
            ok: live_sold == outcome.buyers_sales as i64 && outcome.buyers_sales > 0,
            detail: format!(
                "{} sales answered, {live_sold} seats sold",
                outcome.buyers_sales
            ),
        });
        if let Some(bytes) = outcome.bytes_per_request {
            checks.push(Check {
                name: "refusals keep nothing in Redis",
                ok: bytes <= self.max_bytes,
                detail: format!("{bytes:.1} B per request (at most {})", self.max_bytes),
            });
        }
        Ok(checks)
    }
}

/// Sends `count` flooding requests (or as many as fit in `duration`), `lanes` at a
/// time, the kinds in turn; counts their answers (0: none came) into `statuses`;
/// returns how many.
async fn flood(
    pool: &Arc<Pool>,
    events: &Events,
    lanes: u64,
    (count, duration): (u64, Duration),
    statuses: &mut BTreeMap<u16, u64>,
) -> u64 {
    let deadline = Instant::now() + duration;
    let mut senders = JoinSet::new();
    for lane in 0..lanes {
        let pool = pool.clone();
        let (sold_out, queued) = (events.sold_out, events.queued);
        senders.spawn(async move {
            let mut seen = BTreeMap::<u16, u64>::new();
            let mut n = lane;
            while n < count && Instant::now() < deadline {
                let key = Uuid::new_v4().to_string();
                let headers = [("idempotency-key", key.as_str())];
                let seat = Some(json!({ "quantity": 1 }));
                let event = format!("/api/v1/events/{sold_out}");
                // Each lane sends every kind in turn, so the mix stays even.
                let (method, path, headers, body) = match ((n / lanes + n) % 4, queued) {
                    (1, _) => (Method::POST, format!("{event}/holds"), &headers[..], seat),
                    (2, _) => {
                        let hold = format!("{event}/holds/{}", Uuid::now_v7());
                        (Method::DELETE, hold, &headers[..], None)
                    }
                    (3, Some(queued)) => {
                        let queue = format!("/api/v1/events/{queued}/queue");
                        (Method::POST, queue, &[][..], None)
                    }
                    _ => (
                        Method::POST,
                        format!("{event}/purchase"),
                        &headers[..],
                        seat,
                    ),
                };
                let answer = pool.call(method, &path, headers, body).await;
                *seen
                    .entry(answer.map_or(0, |(status, _)| status))
                    .or_default() += 1;
                n += lanes;
            }
            seen
        });
    }
    let mut sent = 0;
    for seen in senders.join_all().await {
        for (status, n) in seen {
            *statuses.entry(status).or_default() += n;
            sent += n;
        }
    }
    sent
}

async fn redis_connection(url: &str) -> Result<redis::aio::MultiplexedConnection, String> {
    let client = redis::Client::open(url).map_err(|e| format!("Redis at {url}: {e}"))?;
    client
        .get_multiplexed_async_connection()
        .await
        .map_err(|e| format!("Redis at {url}: {e}"))
}

async fn purchase(pool: &Pool, event: Uuid, key: &str) -> Result<(u16, Value), String> {
    pool.call(
        Method::POST,
        &format!("/api/v1/events/{event}/purchase"),
        &[("idempotency-key", key)],
        Some(json!({ "quantity": 1 })),
    )
    .await
}

/// What Redis keeps: `used_memory` less the buffers of client connections, which
/// come and go with the traffic of the moment.
async fn kept_bytes(conn: &mut redis::aio::MultiplexedConnection) -> Result<i64, String> {
    let info: String = redis::cmd("INFO")
        .arg("memory")
        .query_async(conn)
        .await
        .map_err(|e| format!("INFO memory: {e}"))?;
    let field = |name| -> Result<i64, String> {
        info_field(&info, name)
            .and_then(|v| v.parse().ok())
            .ok_or(format!("no {name} in INFO memory"))
    };
    Ok(field("used_memory")? - field("mem_clients_normal")?)
}

impl Verdict for Outcome {
    fn checks(&self) -> &[Check] {
        &self.checks
    }

    fn print_summary(&self) {
        println!(
            "rush flood: {} requests with fresh keys and no token ({:.0}/s in the measured \
             round), answers {:?}; Redis grew {} per request",
            self.flood_requests,
            self.flood_per_s,
            self.statuses,
            self.bytes_per_request
                .map_or("n/a (no --redis-url)".into(), |b| format!("{b:.1} B")),
        );
        println!(
            "buyers of the live event meanwhile: {} sales, p50 {:.1} ms, p99 {:.1} ms, {} retries",
            self.buyers_sales, self.buyers_p50_ms, self.buyers_p99_ms, self.buyers_retries,
        );
    }
}
