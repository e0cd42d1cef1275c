//! `rush ceiling`: the purchase script driven straight against Redis, no HTTP, to
//! measure what one Redis core sells of one hot event with a given batch size.
//!
//! It stages an event of its own under its own key prefix (`Seller::stage_event`: in
//! Redis alone, no PostgreSQL), sends calls of `batch` fresh purchases
//! from several connections with a few calls in flight on each, and checks at the end
//! that the event's counter equals the sales the calls reported and that the stream
//! holds one entry per sale. Its keys are deleted afterwards.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use boxoffice::domain::{IdempotencyKey, Quantity};
use boxoffice::gate::retention::Retention;
use boxoffice::gate::script::{Ask, Reply, Seller};
use boxoffice::keys::Keys;
use boxoffice::records::Record;
use clap::Args;
use redis::AsyncCommands;
use redis::aio::MultiplexedConnection;
use serde::Serialize;
use uuid::Uuid;

use crate::check::{Check, Verdict};
use crate::parse_duration;
use crate::redis_cpu::RedisCpu;

/// Seconds a record of this run lives, should its clean-up be cut short.
const RECORD_TTL: u32 = 600;

/// Options of `rush ceiling`.
#[derive(Debug, Args)]
pub struct CeilingArgs {
    /// Redis to drive; the run uses keys of its own and deletes them after.
    #[arg(long, default_value = "redis://127.0.0.1:6379")]
    redis_url: String,
    /// Purchases per script call.
    #[arg(long, default_value_t = 128)]
    batch: usize,
    /// Redis connections.
    #[arg(long, short = 'c', default_value_t = 4)]
    connections: usize,
    /// Calls in flight on each connection.
    #[arg(long, default_value_t = 2)]
    in_flight: usize,
    /// How long to run, e.g. `5s`.
    #[arg(long, short = 'd', default_value = "5s", value_parser = parse_duration)]
    duration: Duration,
    /// Print the result as JSON.
    #[arg(long)]
    pub json: bool,
}

impl CeilingArgs {
    fn plan(self) -> Plan {
        let Self {
            redis_url,
            batch,
            connections,
            in_flight,
            duration,
            ..
        } = self;
        Plan {
            redis_url,
            batch: batch.clamp(1, 1024),
            connections: connections.max(1),
            in_flight: in_flight.max(1),
            duration,
        }
    }
}

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
    pub checks: Vec<Check>,
}

impl CeilingArgs {
    pub async fn run(self) -> Result<Ceiling, String> {
        run(&self.plan()).await
    }
}

async fn run(plan: &Plan) -> Result<Ceiling, String> {
    let unreachable = |e: &dyn std::fmt::Display| {
        let url = boxoffice::error::redact_url(&plan.redis_url);
        format!("cannot reach Redis at {url}: {e}")
    };
    let client = redis::Client::open(plan.redis_url.as_str()).map_err(|e| unreachable(&e))?;
    let mut admin = client
        .get_multiplexed_async_connection()
        .await
        .map_err(|e| unreachable(&e))?;
    let keys = Keys::new(format!("rush-ceiling-{}", std::process::id()));
    let event = Uuid::now_v7();
    let sellers = sellers(plan, &keys).await.map_err(|e| unreachable(&e))?;
    sellers[0]
        .stage_event(event, 1_000_000_000_000)
        .await
        .map_err(|e| e.to_string())?;

    let cpu_before = RedisCpu::read(&mut admin).await?;
    let started = Instant::now();
    let (sent, calls, sales) = drive(sellers, plan, event, started + plan.duration).await?;
    let elapsed = started.elapsed().as_secs_f64();
    let (cpu_per_sale, _) = RedisCpu::read(&mut admin).await?.per(&cpu_before, sales);
    let (sold, entries) = counts(&mut admin, &keys, event).await?;
    clean_up(&mut admin, &keys, event, &sent).await?;
    Ok(Ceiling {
        batch: plan.batch,
        connections: plan.connections,
        in_flight: plan.in_flight,
        duration_s: elapsed,
        calls,
        sales,
        sales_per_s: sales as f64 / elapsed,
        redis_cpu_us_per_sale: cpu_per_sale,
        counter_matches: sold == sales,
        stream_matches: entries == sales,
        checks: vec![
            Check {
                name: "the counter equals the sales",
                ok: sold == sales,
                detail: format!("sold {sold}, sales {sales}"),
            },
            Check {
                name: "one stream entry per sale",
                ok: entries == sales,
                detail: format!("{entries} entries, {sales} sales"),
            },
        ],
    })
}

/// `--in-flight` workers per seller until `deadline`: the keys each used, and the
/// calls and sales made.
async fn drive(
    sellers: Vec<Seller>,
    plan: &Plan,
    event: Uuid,
    deadline: Instant,
) -> Result<(Vec<(String, u64)>, u64, u64), String> {
    let sales = Arc::new(AtomicU64::new(0));
    let calls = Arc::new(AtomicU64::new(0));
    let mut workers = tokio::task::JoinSet::new();
    for (c, seller) in sellers.into_iter().enumerate() {
        for f in 0..plan.in_flight {
            let worker = Worker {
                seller: seller.clone(),
                event,
                batch: plan.batch,
                name: format!("{c}-{f}"),
                sales: sales.clone(),
                calls: calls.clone(),
            };
            workers.spawn(worker.run(deadline));
        }
    }
    let sent = workers
        .join_all()
        .await
        .into_iter()
        .collect::<Result<_, _>>()?;
    Ok((
        sent,
        calls.load(Ordering::Relaxed),
        sales.load(Ordering::Relaxed),
    ))
}

/// One seller, on a connection of its own, per `--connections`.
async fn sellers(plan: &Plan, keys: &Keys) -> boxoffice::Result<Vec<Seller>> {
    let mut sellers = Vec::new();
    for _ in 0..plan.connections {
        sellers.push(
            Seller::connect(
                &plan.redis_url,
                keys.clone(),
                Retention::new(RECORD_TTL, RECORD_TTL),
            )
            .await?,
        );
    }
    Ok(sellers)
}

/// The event's counter and the length of its stream.
async fn counts(
    conn: &mut MultiplexedConnection,
    keys: &Keys,
    event: Uuid,
) -> Result<(u64, u64), String> {
    let sold: u64 = conn
        .hget(keys.inventory(event), "sold")
        .await
        .map_err(|e| e.to_string())?;
    let entries: u64 = conn
        .xlen(keys.stream(event))
        .await
        .map_err(|e| e.to_string())?;
    Ok((sold, entries))
}

struct Worker {
    seller: Seller,
    event: Uuid,
    batch: usize,
    name: String,
    sales: Arc<AtomicU64>,
    calls: Arc<AtomicU64>,
}

impl Worker {
    /// Returns the name of the worker and how many keys it used.
    async fn run(self, deadline: Instant) -> Result<(String, u64), String> {
        let one = Quantity::try_from(1).expect("1 is a quantity");
        let mut n = 0u64;
        while Instant::now() < deadline {
            let asks: Vec<Ask> = (0..self.batch)
                .map(|_| {
                    n += 1;
                    let key = IdempotencyKey::try_from(format!("{}-{n}", self.name));
                    Ask::purchase(key.expect("a valid key"), one, Uuid::now_v7())
                })
                .collect();
            let replies = self
                .seller
                .call(self.event, &asks)
                .await
                .map_err(|e| format!("purchase script: {e}"))?;
            // Fresh keys and seats to spare: every reply is a new sale.
            let sold = replies
                .iter()
                .filter(|r| matches!(r, Reply::New(record) if matches!(Record::parse(record), Some(Record::Sold { .. }))))
                .count();
            if sold != asks.len() {
                return Err(format!(
                    "a call of {} fresh purchases sold {sold}: {:?}",
                    asks.len(),
                    replies.first()
                ));
            }
            self.sales.fetch_add(sold as u64, Ordering::Relaxed);
            self.calls.fetch_add(1, Ordering::Relaxed);
        }
        Ok((self.name, n))
    }
}

impl Verdict for Ceiling {
    fn checks(&self) -> &[Check] {
        &self.checks
    }

    fn print_summary(&self) {
        println!(
            "{} sales in {:.2} s = {:.0} sales/s of one event ({} calls of {}, {} connections × {} in flight)\n\
             Redis CPU per sale: {:.2} µs",
            self.sales,
            self.duration_s,
            self.sales_per_s,
            self.calls,
            self.batch,
            self.connections,
            self.in_flight,
            self.redis_cpu_us_per_sale,
        );
    }
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
