//! `rush ceiling`: the purchase script driven straight against Redis, no HTTP, to
//! measure what one Redis core sells of one hot event with a given batch size.
//!
//! It makes an event of its own under its own key prefix, marks it as recovered on
//! the server it talks to (as `recovery` does), sends calls of `batch` fresh purchases
//! from several connections with a few calls in flight on each, and checks at the end
//! that the event's counter equals the sales the calls reported and that the stream
//! holds one entry per sale. Its keys are deleted afterwards.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use boxoffice::domain::{IdempotencyKey, Quantity};
use boxoffice::gate::script::{Ask, invocation, run_script, script};
use boxoffice::keys::Keys;
use redis::AsyncCommands;
use redis::aio::MultiplexedConnection;
use serde::Serialize;
use uuid::Uuid;

/// Seconds a record of this run lives, should its clean-up be cut short.
const RECORD_TTL: u32 = 600;

pub struct Plan {
    pub redis_url: String,
    pub batch: usize,
    pub connections: usize,
    pub in_flight: usize,
    pub duration: Duration,
}

#[derive(Debug, Serialize)]
pub struct Ceiling {
    pub batch: usize,
    pub connections: usize,
    pub in_flight: usize,
    pub duration_s: f64,
    pub calls: u64,
    pub sales: u64,
    pub sales_per_s: f64,
    /// Redis' CPU time (INFO cpu, user + sys) over the run per sale, in µs.
    pub redis_cpu_us_per_sale: f64,
    pub counter_matches: bool,
    pub stream_matches: bool,
}

pub async fn run(plan: &Plan) -> Result<Ceiling, String> {
    let client = redis::Client::open(plan.redis_url.as_str()).map_err(|e| e.to_string())?;
    let mut admin = client
        .get_multiplexed_async_connection()
        .await
        .map_err(|e| {
            format!(
                "cannot reach Redis at {}: {e}",
                boxoffice::error::redact_url(&plan.redis_url)
            )
        })?;
    let keys = Keys::new(format!("rush-ceiling-{}", std::process::id()));
    let event = Uuid::now_v7();
    let run_id = boxoffice::gate::recovery::server_run_id(&mut admin)
        .await
        .map_err(|e| e.to_string())?;
    let _: () = admin
        .hset_multiple(
            keys.inventory(event),
            &[
                ("total", "1000000000000"),
                ("sold", "0"),
                ("run", run_id.as_str()),
            ],
        )
        .await
        .map_err(|e| e.to_string())?;

    let sales = Arc::new(AtomicU64::new(0));
    let calls = Arc::new(AtomicU64::new(0));
    let cpu_before = redis_cpu(&mut admin).await?;
    let started = Instant::now();
    let deadline = started + plan.duration;
    let mut workers = tokio::task::JoinSet::new();
    for c in 0..plan.connections {
        let conn = client
            .get_multiplexed_async_connection()
            .await
            .map_err(|e| e.to_string())?;
        for f in 0..plan.in_flight {
            let worker = Worker {
                conn: conn.clone(),
                keys: keys.clone(),
                event,
                batch: plan.batch,
                name: format!("{c}-{f}"),
                sales: sales.clone(),
                calls: calls.clone(),
            };
            workers.spawn(worker.run(deadline));
        }
    }
    let mut sent = Vec::new();
    for result in workers.join_all().await {
        sent.push(result?);
    }
    let elapsed = started.elapsed().as_secs_f64();
    let cpu_after = redis_cpu(&mut admin).await?;
    let sales = sales.load(Ordering::Relaxed);
    let sold: u64 = admin
        .hget(keys.inventory(event), "sold")
        .await
        .map_err(|e| e.to_string())?;
    let entries: u64 = admin
        .xlen(keys.stream(event))
        .await
        .map_err(|e| e.to_string())?;
    clean_up(&mut admin, &keys, event, &sent).await?;
    Ok(Ceiling {
        batch: plan.batch,
        connections: plan.connections,
        in_flight: plan.in_flight,
        duration_s: elapsed,
        calls: calls.load(Ordering::Relaxed),
        sales,
        sales_per_s: sales as f64 / elapsed,
        redis_cpu_us_per_sale: (cpu_after - cpu_before) * 1e6 / sales.max(1) as f64,
        counter_matches: sold == sales,
        stream_matches: entries == sales,
    })
}

struct Worker {
    conn: MultiplexedConnection,
    keys: Keys,
    event: Uuid,
    batch: usize,
    name: String,
    sales: Arc<AtomicU64>,
    calls: Arc<AtomicU64>,
}

impl Worker {
    /// Returns the name of the worker and how many keys it used.
    async fn run(mut self, deadline: Instant) -> Result<(String, u64), String> {
        let script = script();
        let one = Quantity::try_from(1).expect("1 is a quantity");
        let mut n = 0u64;
        while Instant::now() < deadline {
            let asks: Vec<Ask> = (0..self.batch)
                .map(|_| {
                    n += 1;
                    Ask::purchase(
                        IdempotencyKey::try_from(format!("{}-{n}", self.name))
                            .expect("a valid key"),
                        one,
                        Uuid::now_v7(),
                    )
                })
                .collect();
            let call = invocation(&script, &self.keys, RECORD_TTL, self.event, &asks);
            let replies: String = run_script(&script, &call, &mut self.conn)
                .await
                .map_err(|e| format!("purchase script: {e}"))?;
            // Fresh keys and seats to spare: every line is a new sale ("NS…").
            let sold = replies.split('\n').filter(|l| l.starts_with("NS")).count();
            if sold != asks.len() {
                return Err(format!(
                    "a call of {} fresh purchases sold {sold}: {:?}",
                    asks.len(),
                    replies.lines().next()
                ));
            }
            self.sales.fetch_add(sold as u64, Ordering::Relaxed);
            self.calls.fetch_add(1, Ordering::Relaxed);
        }
        Ok((self.name, n))
    }
}

fn info_field(info: &str, name: &str) -> Option<String> {
    info.lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(':'))
        .map(|value| value.trim().to_owned())
}

/// Redis' CPU seconds so far, user and system.
async fn redis_cpu(conn: &mut MultiplexedConnection) -> Result<f64, String> {
    let info: String = redis::cmd("INFO")
        .arg("cpu")
        .query_async(conn)
        .await
        .map_err(|e| e.to_string())?;
    let field = |name| {
        info_field(&info, name)
            .and_then(|v| v.parse::<f64>().ok())
            .ok_or(format!("no {name} in INFO cpu"))
    };
    Ok(field("used_cpu_user")? + field("used_cpu_sys")?)
}

/// Deletes every key of this run: the event's counter and stream and the record of
/// each key the workers used (named, not scanned for: the Redis may hold millions).
async fn clean_up(
    conn: &mut MultiplexedConnection,
    keys: &Keys,
    event: Uuid,
    sent: &[(String, u64)],
) -> Result<(), String> {
    let _: () = conn
        .unlink(&[keys.inventory(event), keys.stream(event)])
        .await
        .map_err(|e| e.to_string())?;
    let records = sent
        .iter()
        .flat_map(|(name, used)| (1..=*used).map(move |n| format!("{name}-{n}")))
        .map(|key| keys.idempotency(event, &key));
    let mut chunk = Vec::with_capacity(1000);
    for record in records {
        chunk.push(record);
        if chunk.len() == 1000 {
            let _: () = conn.unlink(&chunk).await.map_err(|e| e.to_string())?;
            chunk.clear();
        }
    }
    if !chunk.is_empty() {
        let _: () = conn.unlink(&chunk).await.map_err(|e| e.to_string())?;
    }
    Ok(())
}
