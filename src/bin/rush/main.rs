//! `rush`: the load generator and checker for boxoffice.
//!
//! * `rush seed`: the replaced service's own test — N users at once, each on a fresh
//!   connection, each buying one seat with a fresh Idempotency-Key.
//! * `rush sustained`: C keep-alive connections for a duration (closed model), or a
//!   fixed request rate (open model, latency measured from each request's scheduled
//!   time so a stalled server cannot hide its queue).
//!
//! * `rush ceiling`: the purchase script driven straight against Redis, batches of
//!   fresh purchases of one event: what one Redis core sells, without HTTP.
//! * `rush queue`: a crowd in front of a queued event, joining before and after the
//!   opening, polling as told and buying once admitted; fairness and rate checked.
//! * `rush holds`: the seat lifecycle (purchases, holds confirmed, released or
//!   abandoned, cancellations) on an event of its own, with buyer tokens and a limit,
//!   checked at the end.
//!
//! Every HTTP run ends with a check: seats sold per the API equal the sum of the 200s and
//! never exceed capacity; with `--database-url`, one PostgreSQL row per sale.

mod ceiling;
mod client;
mod holds;
mod load;
mod queue;
mod report;
mod verify;

use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "rush",
    version,
    about = "Load generator and checker for boxoffice"
)]
struct Cli {
    #[command(subcommand)]
    mode: Mode,
}

#[derive(Debug, Subcommand)]
enum Mode {
    /// N users fire at once, each on a fresh connection, each buying 1 seat.
    Seed {
        #[command(flatten)]
        common: Common,
        /// Number of users.
        #[arg(long, default_value_t = 1000)]
        users: usize,
    },
    /// Keep-alive connections for a duration, or at a fixed rate with `--rate`.
    Sustained(SustainedArgs),
    /// The seat lifecycle on an event of its own: holds confirmed, released or
    /// abandoned, direct purchases, cancellations, buyers with tokens and a limit.
    Holds(HoldsArgs),
    /// A crowd in front of a queued event of its own: join before and after the
    /// opening, poll as told, buy once admitted; checks fairness and the rate.
    Queue(QueueArgs),
    /// The purchase script straight against Redis: sales/s of one event.
    Ceiling(CeilingArgs),
}

/// Options of `rush sustained`.
#[derive(Debug, Args)]
struct SustainedArgs {
    #[command(flatten)]
    common: Common,
    /// Concurrent keep-alive connections.
    #[arg(long, short = 'c', default_value_t = 64)]
    connections: usize,
    /// How long to run, e.g. `10s`, `500ms`, `1m`.
    #[arg(long, short = 'd', default_value = "10s", value_parser = parse_duration)]
    duration: Duration,
    /// Requests per second (open model). Without it each connection sends as
    /// fast as it gets answers.
    #[arg(long)]
    rate: Option<u64>,
    /// Stop after this many requests.
    #[arg(long)]
    requests: Option<u64>,
    /// Share of requests (0–1) that repeat an earlier request's key and quantity;
    /// they must get the same answer back, marked as replayed.
    #[arg(long, default_value_t = 0.0)]
    retry_share: f64,
    /// Send `GET <path>` instead of purchases (to measure the framework alone).
    #[arg(long)]
    get: Option<String>,
    /// Retry a request that got no answer or a 502/503/504 up to this many times,
    /// with the same Idempotency-Key, as a careful client would.
    #[arg(long, default_value_t = 0)]
    retry_failed: u32,
}

impl SustainedArgs {
    fn plan(&self) -> load::Plan {
        load::Plan {
            connections: self.connections.max(1),
            duration: self.duration,
            rate: self.rate,
            requests: self.requests,
            retry_share: self.retry_share.clamp(0.0, 1.0),
            get: self.get.clone(),
            retry_failed: self.retry_failed,
        }
    }
}

/// Options of `rush holds`.
#[derive(Debug, Args)]
struct HoldsArgs {
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
    json: bool,
}

impl HoldsArgs {
    fn plan(self) -> holds::Plan {
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

        holds::Plan {
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

/// Options of `rush queue`.
#[derive(Debug, Args)]
struct QueueArgs {
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
    json: bool,
}

impl QueueArgs {
    fn plan(self) -> queue::Plan {
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
        queue::Plan {
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

/// Options of `rush ceiling`.
#[derive(Debug, Args)]
struct CeilingArgs {
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
    json: bool,
}

impl CeilingArgs {
    fn plan(self) -> ceiling::Plan {
        let Self {
            redis_url,
            batch,
            connections,
            in_flight,
            duration,
            ..
        } = self;
        ceiling::Plan {
            redis_url,
            batch: batch.clamp(1, 1024),
            connections: connections.max(1),
            in_flight: in_flight.max(1),
            duration,
        }
    }
}

/// Options shared by every mode.
#[derive(Debug, Clone, Args)]
pub struct Common {
    /// Base URL of a replica; repeat to spread requests round-robin.
    #[arg(long = "url", default_value = "http://127.0.0.1:3000")]
    pub urls: Vec<String>,
    /// Event to buy from; default: the default event (`GET /api/v1/event`).
    #[arg(long)]
    pub event: Option<uuid::Uuid>,
    /// Seats per purchase: a number from 1 to 10, or `mixed` (1–10).
    #[arg(long, default_value = "1")]
    pub quantity: QuantityArg,
    /// PostgreSQL URL (default: DATABASE_URL, as the server); when given, waits for
    /// the consumer and checks one row per sale. Empty: no check.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<String>,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
    /// Give up on one request after this long.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub timeout: Duration,
    /// The servers' BOXOFFICE_BUYER_JWT_KEY (HS256): purchases then carry buyer
    /// tokens, request n as buyer n mod `--buyers` (events with a limit need them).
    #[arg(long, env = "BOXOFFICE_BUYER_JWT_KEY", hide_env_values = true)]
    pub buyer_key: Option<String>,
    /// Number of distinct buyers when `--buyer-key` is given.
    #[arg(long, default_value_t = 10_000)]
    pub buyers: usize,
}

#[derive(Debug, Clone, Copy)]
pub enum QuantityArg {
    Fixed(u8),
    Mixed,
}

impl std::str::FromStr for QuantityArg {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "mixed" => Ok(Self::Mixed),
            n => match n.parse::<u8>() {
                Ok(q @ 1..=10) => Ok(Self::Fixed(q)),
                _ => Err("a number from 1 to 10, or `mixed`".into()),
            },
        }
    }
}

impl QuantityArg {
    /// Quantity of the `n`-th request.
    pub fn pick(self, n: u64) -> u8 {
        match self {
            Self::Fixed(q) => q,
            // A fixed permutation of 1..=10: spread evenly, no RNG needed.
            Self::Mixed => (n.wrapping_mul(7) % 10 + 1) as u8,
        }
    }
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let (number, unit) = s
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .map(|i| s.split_at(i))
        .unwrap_or((s, "s"));
    let value: f64 = number.parse().map_err(|_| format!("bad duration {s:?}"))?;
    let seconds = match unit {
        "ms" => value / 1000.0,
        "s" => value,
        "m" => value * 60.0,
        _ => return Err(format!("bad duration unit in {s:?}: use ms, s or m")),
    };
    Ok(Duration::from_secs_f64(seconds))
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.mode {
        Mode::Ceiling(args) => {
            let json = args.json;
            return ceiling_report(ceiling::run(&args.plan()).await, json);
        }
        Mode::Holds(args) => {
            let json = args.json;
            return finish(holds::run(args.plan()).await, json);
        }
        Mode::Queue(args) => {
            let json = args.json;
            return finish(queue::run(args.plan()).await, json);
        }
        Mode::Seed { common, users } => load::seed(&common, users).await.map(|r| (common, r)),
        Mode::Sustained(args) => {
            let plan = args.plan();
            load::sustained(&args.common, &plan)
                .await
                .map(|r| (args.common, r))
        }
    };
    match result {
        Ok((common, mut report)) => {
            let ok = verify::run(&common, &mut report).await;
            report.print(common.json);
            if ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(e) => {
            eprintln!("rush: {e}");
            ExitCode::from(2)
        }
    }
}

/// What a self-checking mode (`holds`, `queue`) found.
pub trait Verdict: serde::Serialize {
    fn checks(&self) -> &[report::Check];
    /// The lines before the checks, in the text report.
    fn print_summary(&self);
}

/// Prints a self-checking mode's outcome (as JSON, or its summary and checks); exit 1
/// when a check failed, 2 when the run could not be made.
fn finish(result: Result<impl Verdict, String>, json: bool) -> ExitCode {
    match result {
        Ok(outcome) => {
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&outcome).expect("plain data")
                );
            } else {
                outcome.print_summary();
                report::print_checks(outcome.checks());
            }
            if outcome.checks().iter().all(|c| c.ok) {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(e) => {
            eprintln!("rush: {e}");
            ExitCode::from(2)
        }
    }
}

fn ceiling_report(result: Result<ceiling::Ceiling, String>, json: bool) -> ExitCode {
    let ceiling = match result {
        Ok(ceiling) => ceiling,
        Err(e) => {
            eprintln!("rush: {e}");
            return ExitCode::from(2);
        }
    };
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&ceiling).expect("plain data")
        );
    } else {
        println!(
            "{} sales in {:.2} s = {:.0} sales/s of one event ({} calls of {}, {} connections × {} in flight)\n\
             Redis CPU per sale: {:.2} µs\n\
             counter = sales: {}, one stream entry per sale: {}",
            ceiling.sales,
            ceiling.duration_s,
            ceiling.sales_per_s,
            ceiling.calls,
            ceiling.batch,
            ceiling.connections,
            ceiling.in_flight,
            ceiling.redis_cpu_us_per_sale,
            ceiling.counter_matches,
            ceiling.stream_matches,
        );
    }
    if ceiling.counter_matches && ceiling.stream_matches {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
