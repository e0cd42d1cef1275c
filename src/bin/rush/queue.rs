//! `rush queue`: a crowd in front of a queued event. It creates the event (admin
//! token), has `--buyers` buyers (tokens signed with the servers' buyer key) join, a
//! share before the opening and the rest after, poll as told, and buy one seat once
//! admitted; some try to buy before admission. Then it checks: nobody bought without
//! admission; the early joiners' admission order is independent of their join order
//! (Spearman's rank correlation); no late joiner overtook an earlier one; admissions
//! followed the rate; every admitted buyer who tried could buy while seats remained.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use chrono::{DateTime, Utc};
use hyper::Method;
use serde::Serialize;
use serde_json::{Value, json};
use tokio::sync::Semaphore;
use uuid::Uuid;

use crate::client::{Answer, Sender, Target, connect, request, send, sign_buyer_tokens, targets};
use crate::report::Check;

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
struct Seen {
    ticket: String,
    /// When its join was sent (this machine's clock).
    joined_at_ms: i64,
    admitted_at_ms: i64,
    learned_at_ms: i64,
    polls: u64,
    sneaked: bool,
    sneak_refused: bool,
    bought: bool,
    sold_out: bool,
    position_rose: bool,
    failure: Option<String>,
}

/// Kept-alive connections shared by every buyer, spread over the replicas.
struct Pool {
    targets: Vec<Target>,
    idle: std::sync::Mutex<Vec<(usize, Sender)>>,
    permits: Semaphore,
    next: AtomicU64,
    timeout: Duration,
    requests: AtomicU64,
}

impl Pool {
    async fn call(
        &self,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<Value>,
    ) -> Result<(u16, Value), String> {
        let _permit = self.permits.acquire().await.map_err(|e| e.to_string())?;
        // A pooled connection the server closed while idle is dropped, and the
        // request is sent once more on a fresh one.
        let pooled = self.idle.lock().unwrap_or_else(|e| e.into_inner()).pop();
        if let Some((t, mut sender)) = pooled.filter(|(_, s)| !s.is_closed())
            && let Ok(answer) = self
                .send_on(t, &mut sender, &method, path, headers, &body)
                .await
        {
            self.idle
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push((t, sender));
            return Ok(answer);
        }
        let t = self.next.fetch_add(1, Ordering::Relaxed) as usize % self.targets.len();
        let mut sender = connect(&self.targets[t]).await?;
        let answer = self
            .send_on(t, &mut sender, &method, path, headers, &body)
            .await?;
        self.idle
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((t, sender));
        Ok(answer)
    }

    async fn send_on(
        &self,
        t: usize,
        sender: &mut Sender,
        method: &Method,
        path: &str,
        headers: &[(&str, &str)],
        body: &Option<Value>,
    ) -> Result<(u16, Value), String> {
        let request = request(
            &self.targets[t],
            method.clone(),
            path,
            headers,
            body.as_ref(),
        );
        self.requests.fetch_add(1, Ordering::Relaxed);
        let answer: Answer = send(sender, request, self.timeout).await?;
        Ok((
            answer.status,
            serde_json::from_slice(&answer.body).unwrap_or_default(),
        ))
    }
}

fn now_ms() -> i64 {
    Utc::now().timestamp_millis()
}

fn time_ms(value: &Value) -> Option<i64> {
    value
        .as_str()?
        .parse::<DateTime<Utc>>()
        .ok()
        .map(|t| t.timestamp_millis())
}

pub async fn run(plan: Plan) -> Result<Outcome, String> {
    let targets = targets(&plan.urls).await?;
    let run = Uuid::new_v4().simple().to_string()[..12].to_owned();
    let opens_at = Utc::now() + plan.opens_in;
    let seats = plan.seats.unwrap_or(plan.buyers as u32).max(1);
    let pool = Arc::new(Pool {
        targets,
        idle: std::sync::Mutex::new(Vec::new()),
        permits: Semaphore::new(plan.connections.max(1)),
        next: AtomicU64::new(0),
        timeout: plan.timeout,
        requests: AtomicU64::new(0),
    });
    let admin = format!("Bearer {}", plan.admin_token);
    let (status, body) = pool
        .call(
            Method::POST,
            "/api/v1/events",
            &[("authorization", &admin)],
            Some(json!({
                "name": format!("rush queue {run}"),
                "totalSeats": seats,
                "queue": {
                    "opensAt": opens_at.to_rfc3339(),
                    "admitPerSecond": plan.rate,
                    "admissionSeconds": plan.admission_seconds,
                },
            })),
        )
        .await?;
    let event: Uuid = match (status, body["id"].as_str()) {
        (201, Some(id)) => id.parse().map_err(|e| format!("{e}"))?,
        _ => return Err(format!("creating the queued event: {status} {body}")),
    };
    let tokens = sign_buyer_tokens(
        &plan.buyer_key,
        &run,
        plan.buyers,
        Duration::from_secs(3_600),
    )?;

    let early = (plan.buyers as f64 * plan.early_share).round() as usize;
    let mut seen: Vec<Seen> = vec![Seen::default(); plan.buyers];
    // Early joiners, then (after the opening) the late ones: each wave in order, so
    // ticket numbers follow the order this client sent them.
    let mut tasks = tokio::task::JoinSet::new();
    let mut joins = 0;
    for (i, token) in tokens.iter().enumerate() {
        if i == early {
            let wait = (opens_at - Utc::now()).num_milliseconds();
            if wait > 0 {
                tokio::time::sleep(Duration::from_millis(wait as u64 + 20)).await;
            }
        }
        let auth = format!("Bearer {token}");
        let path = format!("/api/v1/events/{event}/queue");
        let joined_at_ms = now_ms();
        let (status, body) = pool
            .call(Method::POST, &path, &[("authorization", &auth)], None)
            .await?;
        joins += 1;
        if status != 202 {
            return Err(format!("buyer {i} joining: {status} {body}"));
        }
        let ticket = body["ticket"].as_str().unwrap_or_default().to_owned();
        let sneak =
            (i as u64).wrapping_mul(2_654_435_761) % 10_000 < (plan.sneak_share * 10_000.0) as u64;
        let pool = pool.clone();
        tasks.spawn(async move {
            let mut seen = buyer(&pool, event, ticket, auth, body, sneak).await;
            seen.joined_at_ms = joined_at_ms;
            (i, seen)
        });
    }
    let window_start = opens_at.timestamp_millis();
    let cpu_before = redis_cpu(plan.redis_url.as_deref()).await;
    let requests_before = pool.requests.load(Ordering::Relaxed);
    while let Some(joined) = tasks.join_next().await {
        let (i, s) = joined.map_err(|e| e.to_string())?;
        seen[i] = s;
    }
    let window_end = seen
        .iter()
        .map(|s| s.learned_at_ms)
        .max()
        .unwrap_or(window_start);
    let requests = pool.requests.load(Ordering::Relaxed) - requests_before;
    let cpu = match (cpu_before, redis_cpu(plan.redis_url.as_deref()).await) {
        (Some(a), Some(b)) if requests > 0 => Some((
            (b.0 - a.0) * 1e6 / requests as f64,
            (b.1 - a.1) * 1e6 / requests as f64,
        )),
        _ => None,
    };
    Ok(check(
        &pool, &plan, event, seats, opens_at, seen, joins, window_end, cpu,
    )
    .await)
}

/// One buyer: maybe a sneak purchase first, then polls as told until admitted, then
/// one purchase with the admission.
async fn buyer(
    pool: &Pool,
    event: Uuid,
    ticket: String,
    auth: String,
    joined: Value,
    sneak: bool,
) -> Seen {
    let mut seen = Seen {
        ticket: ticket.clone(),
        sneaked: sneak,
        ..Seen::default()
    };
    let purchase = format!("/api/v1/events/{event}/purchase");
    if sneak {
        let key = format!("sneak-{ticket}");
        match pool
            .call(
                Method::POST,
                &purchase,
                &[("authorization", &auth), ("idempotency-key", &key)],
                Some(json!({"quantity": 1})),
            )
            .await
        {
            Ok((403, _)) => seen.sneak_refused = true,
            other => {
                seen.failure = Some(format!(
                    "{ticket}: a purchase without admission got {other:?}"
                ))
            }
        }
    }
    let path = format!("/api/v1/events/{event}/queue/{ticket}");
    let mut status = joined;
    let mut last_position = u64::MAX;
    let opens_at = time_ms(&status["opensAt"]).unwrap_or_default();
    while status["admitted"] != true {
        if status["admissionExpired"] == true {
            seen.failure = Some(format!(
                "{ticket}: its admission expired before it learned of it"
            ));
            return seen;
        }
        if now_ms() >= opens_at {
            let position = status["position"].as_u64().unwrap_or(u64::MAX);
            seen.position_rose |= position > last_position;
            last_position = position;
        }
        let wait = status["pollAfterMs"].as_u64().unwrap_or(1_000);
        tokio::time::sleep(Duration::from_millis(wait)).await;
        match pool
            .call(Method::GET, &path, &[("authorization", &auth)], None)
            .await
        {
            Ok((200, body)) => {
                seen.polls += 1;
                status = body;
            }
            other => {
                seen.failure = Some(format!("{ticket}: poll got {other:?}"));
                return seen;
            }
        }
    }
    seen.learned_at_ms = now_ms();
    seen.admitted_at_ms = time_ms(&status["admittedAt"]).unwrap_or_default();
    let admission = status["admissionToken"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let key = format!("buy-{ticket}");
    match pool
        .call(
            Method::POST,
            &purchase,
            &[
                ("authorization", &auth),
                ("idempotency-key", &key),
                ("admission-token", &admission),
            ],
            Some(json!({"quantity": 1})),
        )
        .await
    {
        Ok((200, _)) => seen.bought = true,
        Ok((409, body)) if body["error"] == "SOLD_OUT" => seen.sold_out = true,
        other => seen.failure = Some(format!("{ticket}: an admitted purchase got {other:?}")),
    }
    seen
}

/// Redis' CPU seconds (user + system), and the seconds its commands took by its own
/// count (`INFO commandstats`: the commands alone, without reading requests and
/// writing replies).
async fn redis_cpu(url: Option<&str>) -> Option<(f64, f64)> {
    let client = redis::Client::open(url?).ok()?;
    let mut conn = client.get_multiplexed_async_connection().await.ok()?;
    let info: String = redis::cmd("INFO")
        .arg("all")
        .query_async(&mut conn)
        .await
        .ok()?;
    let field = |name: &str| -> Option<f64> {
        info.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().parse().ok())
    };
    let commands: f64 = info
        .lines()
        .filter(|l| l.starts_with("cmdstat_"))
        .filter_map(|l| l.split(',').find_map(|f| f.strip_prefix("usec=")))
        .filter_map(|v| v.parse::<f64>().ok())
        .sum();
    Some((
        field("used_cpu_user:")? + field("used_cpu_sys:")?,
        commands / 1e6,
    ))
}

fn spearman(a: &[f64], b: &[f64]) -> f64 {
    let n = a.len() as f64;
    if n < 2.0 {
        return 0.0;
    }
    let d2: f64 = a.iter().zip(b).map(|(x, y)| (x - y).powi(2)).sum();
    1.0 - 6.0 * d2 / (n * (n * n - 1.0))
}

#[allow(clippy::too_many_arguments)]
async fn check(
    pool: &Pool,
    plan: &Plan,
    event: Uuid,
    seats: u32,
    opens_at: DateTime<Utc>,
    seen: Vec<Seen>,
    joins: u64,
    window_end: i64,
    redis_cpu: Option<(f64, f64)>,
) -> Outcome {
    let opens = opens_at.timestamp_millis();
    let failures: Vec<String> = seen.iter().filter_map(|s| s.failure.clone()).collect();
    let number = |s: &Seen| s.ticket[1..].parse::<u64>().unwrap_or(0);
    let early: Vec<&Seen> = seen.iter().filter(|s| s.ticket.starts_with('p')).collect();
    let mut late: Vec<&Seen> = seen.iter().filter(|s| s.ticket.starts_with('o')).collect();
    late.sort_by_key(|s| number(s));
    let mut all: Vec<&Seen> = seen.iter().filter(|s| s.admitted_at_ms > 0).collect();
    all.sort_by_key(|s| s.admitted_at_ms);

    // The early joiners' admission ranks against their join order.
    let mut by_admission: Vec<&Seen> = early.clone();
    by_admission.sort_by_key(|s| s.admitted_at_ms);
    let mut rank = std::collections::HashMap::new();
    for (r, s) in by_admission.iter().enumerate() {
        rank.insert(s.ticket.clone(), r as f64);
    }
    let joined: Vec<f64> = early.iter().map(|s| number(s) as f64 - 1.0).collect();
    let admitted: Vec<f64> = early.iter().map(|s| rank[&s.ticket]).collect();
    let rho = spearman(&joined, &admitted);
    let bound = 4.0 / ((early.len().max(2) - 1) as f64).sqrt();

    let overtaken = late
        .windows(2)
        .filter(|w| w[1].admitted_at_ms < w[0].admitted_at_ms)
        .count();
    let early_last = early
        .iter()
        .map(|s| s.admitted_at_ms)
        .max()
        .unwrap_or(i64::MIN);
    let late_first = late
        .iter()
        .map(|s| s.admitted_at_ms)
        .min()
        .unwrap_or(i64::MAX);

    // Admission moments against the rate. Each early place at opens + ⌈k × 1000 / rate⌉
    // for its own place k; each late one `1 / rate` after the place before it, or, when
    // it joined after that moment (the rate does not bank), when it joined.
    let rate = u64::from(plan.rate);
    let moment = |k: u64| opens + (k * 1000).div_ceil(rate) as i64;
    let mut places = std::collections::HashSet::new();
    let early_off = early
        .iter()
        .filter(|s| {
            let k = ((s.admitted_at_ms - opens).max(0) as u64 * rate / 1000).max(1);
            let place =
                (k.saturating_sub(1)..=k + 1).find(|k| *k >= 1 && moment(*k) == s.admitted_at_ms);
            !place.is_some_and(|k| places.insert(k))
        })
        .count();
    let step_ms = (1000 / rate) as i64;
    let mut previous = moment(early.len() as u64);
    let late_off = late
        .iter()
        .filter(|s| {
            let at = s.admitted_at_ms;
            let gap = at - previous;
            previous = at;
            // Clocks of this machine and Redis' agree within a few ms here.
            let after_a_lull = at + 50 >= s.joined_at_ms && gap > step_ms + 1;
            gap < step_ms || (gap > step_ms + 1 && !after_a_lull)
        })
        .count();
    let off_rate = early_off + late_off;
    let last_admitted = all.last().map(|s| s.admitted_at_ms).unwrap_or(opens);
    let window_s = (last_admitted - opens).max(1) as f64 / 1000.0;
    let observed_rate = all.len() as f64 / window_s;
    let mut lags: Vec<i64> = all
        .iter()
        .map(|s| s.learned_at_ms - s.admitted_at_ms)
        .collect();
    lags.push(0);
    lags.sort_unstable();
    let pct = |p: f64| lags[((lags.len() - 1) as f64 * p) as usize] as f64 / 1000.0;

    let sneaks = seen.iter().filter(|s| s.sneaked).count() as u64;
    let refused = seen.iter().filter(|s| s.sneak_refused).count() as u64;
    let purchases = seen.iter().filter(|s| s.bought).count() as u64;
    let sold_out = seen.iter().filter(|s| s.sold_out).count() as u64;
    let polls: u64 = seen.iter().map(|s| s.polls).sum();
    let polls_window_s = ((window_end - opens).max(1)) as f64 / 1000.0;
    let sold = match pool
        .call(Method::GET, &format!("/api/v1/events/{event}"), &[], None)
        .await
    {
        Ok((200, body)) => body["seatsSold"].as_i64(),
        _ => None,
    };

    let checks = vec![
        Check {
            name: "every buyer was answered as the API says",
            ok: failures.is_empty(),
            detail: format!(
                "{} failures{}",
                failures.len(),
                failures
                    .first()
                    .map(|f| format!(", first: {f}"))
                    .unwrap_or_default()
            ),
        },
        Check {
            name: "nobody bought without admission",
            ok: refused == sneaks && sold == Some(purchases as i64),
            detail: format!(
                "{refused} of {sneaks} purchases without admission refused (403); \
                 seats sold {sold:?} = admitted purchases {purchases}"
            ),
        },
        Check {
            name: "early joiners admitted in an order independent of joining",
            ok: rho.abs() < bound && early.len() + late.len() == seen.len(),
            detail: format!(
                "Spearman's rho {rho:.4} over {} early joiners (|rho| < {bound:.3}, 4 standard errors)",
                early.len()
            ),
        },
        Check {
            name: "no late joiner overtook an earlier one (nor any early one)",
            ok: overtaken == 0 && early_last < late_first,
            detail: format!("{overtaken} overtakes among {} late joiners", late.len()),
        },
        Check {
            name: "admissions at the rate",
            ok: off_rate == 0 && observed_rate <= plan.rate as f64 * 1.05 + 1.0,
            detail: format!(
                "{off_rate} places off max(the place before + 1/rate, joining); {:.1} admitted/s \
                 over {window_s:.2} s (rate {})",
                observed_rate, plan.rate
            ),
        },
        Check {
            name: "positions only went down",
            ok: !seen.iter().any(|s| s.position_rose),
            detail: format!(
                "{} buyers saw their position rise",
                seen.iter().filter(|s| s.position_rose).count()
            ),
        },
        Check {
            name: "every admitted buyer could buy while seats remained",
            ok: purchases + sold_out == seen.len() as u64
                && (sold_out == 0 || sold == Some(i64::from(seats))),
            detail: format!("{purchases} bought, {sold_out} sold out, {seats} seats"),
        },
    ];
    Outcome {
        event,
        buyers: seen.len(),
        early: early.len(),
        late: late.len(),
        joins,
        polls,
        polls_per_s: polls as f64 / polls_window_s,
        redis_cpu_us_per_request: redis_cpu.map(|c| c.0),
        redis_command_us_per_request: redis_cpu.map(|c| c.1),
        sneaks,
        sneaks_refused: refused,
        purchases,
        sold_out,
        spearman_rho: rho,
        lag_p50_s: pct(0.5),
        lag_p99_s: pct(0.99),
        admission_window_s: window_s,
        observed_rate,
        failures: failures.into_iter().take(10).collect(),
        checks,
    }
}

impl crate::Verdict for Outcome {
    fn checks(&self) -> &[crate::report::Check] {
        &self.checks
    }

    fn print_summary(&self) {
        println!(
            "rush queue on event {}: {} buyers ({} before the opening, {} after), {} joins, {} polls ({:.0}/s), \
             Redis CPU per request {} (its commands {})",
            self.event,
            self.buyers,
            self.early,
            self.late,
            self.joins,
            self.polls,
            self.polls_per_s,
            self.redis_cpu_us_per_request
                .map_or("n/a (no --redis-url)".into(), |c| format!("{c:.1} µs")),
            self.redis_command_us_per_request
                .map_or("n/a".into(), |c| format!("{c:.1} µs")),
        );
        println!(
            "admitted over {:.2} s ({:.1}/s); learned of it after p50 {:.2} s, p99 {:.2} s; {} bought, {} sold out; \
             {} of {} sneak purchases refused",
            self.admission_window_s,
            self.observed_rate,
            self.lag_p50_s,
            self.lag_p99_s,
            self.purchases,
            self.sold_out,
            self.sneaks_refused,
            self.sneaks
        );
    }
}
