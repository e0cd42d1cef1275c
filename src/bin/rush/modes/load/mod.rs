//! `rush seed` and `rush sustained`: purchases of one event, tallied, then checked
//! against what the API says was sold and, with a database URL, what PostgreSQL holds.

mod connection;
mod report;
mod verify;

use std::io::IsTerminal;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use clap::Args;

use crate::client::{connect, purchase_request, run_id, send, sign_buyer_tokens, targets, token};
use crate::parse_duration;
use connection::{Connection, Shared};
pub use report::Report;
use report::Tally;

/// Options of `rush seed`.
#[derive(Debug, Args)]
pub struct SeedArgs {
    #[command(flatten)]
    pub common: Common,
    /// Number of users.
    #[arg(long, default_value_t = 1000)]
    pub users: usize,
}

/// Options of `rush sustained`.
#[derive(Debug, Args)]
pub struct SustainedArgs {
    #[command(flatten)]
    pub common: Common,
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
    /// Share of requests (0–1) that repeat an earlier sale's key and quantity; they
    /// must get the same answer back, marked as replayed.
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
    fn plan(&self) -> Plan {
        Plan {
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

/// Options of the purchase modes, `seed` and `sustained`.
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

/// How a sustained run sends.
pub struct Plan {
    pub connections: usize,
    pub duration: Duration,
    pub rate: Option<u64>,
    pub requests: Option<u64>,
    pub retry_share: f64,
    pub get: Option<String>,
    pub retry_failed: u32,
}

/// Buyer tokens for `--buyers` buyers when `--buyer-key` is given: request `n` is
/// sent as buyer `n % buyers`.
fn buyer_tokens(common: &Common, run: &str) -> Result<Vec<String>, String> {
    match &common.buyer_key {
        Some(key) => sign_buyer_tokens(
            key,
            run,
            common.buyers.max(1),
            Duration::from_secs(24 * 3600),
        ),
        None => Ok(Vec::new()),
    }
}

/// Prints progress once a second: a rewritten line on a terminal, plain lines otherwise.
fn progress(
    done: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    quiet: bool,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        if quiet {
            return;
        }
        let terminal = std::io::stderr().is_terminal();
        let started = Instant::now();
        let mut last = 0;
        let mut ticker = tokio::time::interval(Duration::from_secs(1));
        ticker.tick().await;
        loop {
            ticker.tick().await;
            if stop.load(Ordering::Relaxed) {
                break;
            }
            let now = done.load(Ordering::Relaxed);
            let line = format!(
                "{:>5.1}s  {now:>9} requests  {:>8} req/s",
                started.elapsed().as_secs_f64(),
                now - last
            );
            last = now;
            if terminal {
                eprint!("\r{line}");
            } else {
                eprintln!("{line}");
            }
        }
        if terminal {
            eprintln!();
        }
    })
}

impl SeedArgs {
    /// The replaced service's test, then the checks.
    pub async fn run(&self) -> Result<Report, String> {
        let report = seed(&self.common, self.users).await?;
        Ok(verify::checked(&self.common, report).await)
    }
}

impl SustainedArgs {
    /// A sustained run, then the checks.
    pub async fn run(&self) -> Result<Report, String> {
        let report = sustained(&self.common, &self.plan()).await?;
        Ok(verify::checked(&self.common, report).await)
    }
}

/// The replaced service's test: `users` at once, each on its own new connection.
async fn seed(common: &Common, users: usize) -> Result<Report, String> {
    let targets = targets(&common.urls).await?;
    let event = verify::resolve_event(common, &targets[0]).await?;
    let before = Some(verify::snapshot(&targets[0], event).await?);
    let run = run_id();
    let tokens = Arc::new(buyer_tokens(common, &run)?);
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for user in 0..users {
        let tokens = tokens.clone();
        let target = targets[user % targets.len()].clone();
        let key = format!("rush-{run}-{user}");
        let quantity = common.quantity.pick(user as u64);
        let timeout = common.timeout;
        tasks.spawn(async move {
            let begin = Instant::now();
            let answer = async {
                let mut sender = connect(&target).await?;
                send(
                    &mut sender,
                    purchase_request(&target, event, &key, quantity, token(&tokens, user as u64)),
                    timeout,
                )
                .await
            }
            .await;
            (answer, quantity, begin.elapsed())
        });
    }
    let mut tally = Tally::default();
    while let Some(joined) = tasks.join_next().await {
        let (answer, quantity, latency) = joined.map_err(|e| e.to_string())?;
        tally.record_latency(latency);
        match answer {
            Ok(answer) => tally.answered(answer.status, quantity),
            Err(e) => tally.error(e),
        }
    }
    Ok(Report::new(
        "seed",
        &targets,
        event,
        run,
        before,
        started.elapsed(),
        tally,
    ))
}

/// Keep-alive connections, each sending as answers arrive (closed model) or at its
/// share of a fixed rate (open model).
async fn sustained(common: &Common, plan: &Plan) -> Result<Report, String> {
    let targets = targets(&common.urls).await?;
    let (event, before) = match plan.get {
        Some(_) => (common.event.unwrap_or_default(), None),
        None => {
            let event = verify::resolve_event(common, &targets[0]).await?;
            (event, Some(verify::snapshot(&targets[0], event).await?))
        }
    };
    let run = run_id();
    let tokens = buyer_tokens(common, &run)?;
    let started = Instant::now();
    let shared = Arc::new(Shared {
        targets,
        event,
        run,
        tokens,
        next: AtomicU64::new(0),
        done: Arc::new(AtomicU64::new(0)),
        started,
        deadline: started + plan.duration,
        get: plan.get.clone(),
        rate: plan.rate,
        requests: plan.requests,
        retry_share: plan.retry_share,
        retry_failed: plan.retry_failed,
        quantity: common.quantity,
        timeout: common.timeout,
    });
    let (tally, elapsed) = connections(&shared, plan.connections, common.json).await?;
    let mode = match (&plan.get, plan.rate) {
        (Some(_), _) => "get",
        (None, Some(_)) => "open",
        (None, None) => "closed",
    };
    let mut report = Report::new(
        mode,
        &shared.targets,
        event,
        shared.run.clone(),
        before,
        elapsed,
        tally,
    );
    report.rate = plan.rate;
    report.connections = Some(plan.connections);
    Ok(report)
}

/// Runs `count` connections to the end, with progress on stderr unless `quiet`: what
/// they counted, and how long they ran (not counting the progress line's last tick).
async fn connections(
    shared: &Arc<Shared>,
    count: usize,
    quiet: bool,
) -> Result<(Tally, Duration), String> {
    let stop = Arc::new(AtomicBool::new(false));
    let ticker = progress(shared.done.clone(), stop.clone(), quiet);
    let mut workers = tokio::task::JoinSet::new();
    for connection in 0..count {
        workers.spawn(Connection::new(shared.clone(), connection).run());
    }
    let mut tally = Tally::default();
    while let Some(worker) = workers.join_next().await {
        tally.merge(worker.map_err(|e| e.to_string())?);
    }
    let elapsed = shared.started.elapsed();
    stop.store(true, Ordering::Relaxed);
    let _ = ticker.await;
    Ok((tally, elapsed))
}
