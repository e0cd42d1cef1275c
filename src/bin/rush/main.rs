//! `rush`: the load generator and checker for boxoffice.
//!
//! * `rush seed`: the replaced service's own test — N users at once, each on a fresh
//!   connection, each buying one seat with a fresh Idempotency-Key.
//! * `rush sustained`: C keep-alive connections for a duration (closed model), or a
//!   fixed request rate (open model, latency measured from each request's scheduled
//!   time so a stalled server cannot hide its queue).
//! * `rush ceiling`: the purchase script driven straight against Redis, batches of
//!   fresh purchases of one event: what one Redis core sells, without HTTP.
//! * `rush queue`: a crowd in front of a queued event, joining before and after the
//!   opening, polling as told and buying once admitted; fairness and rate checked.
//! * `rush flood`: anonymous requests with fresh keys on a sold-out event, and joins
//!   of a waiting room, while buyers of another event buy: what Redis keeps per
//!   request, and the buyers' latency.
//! * `rush holds`: the seat lifecycle (purchases, holds confirmed, released or
//!   abandoned, cancellations) on an event of its own, with buyer tokens and a limit,
//!   checked at the end.
//!
//! Every run ends with checks (seats sold per the API equal the sum of the 200s and
//! never exceed capacity; with `--database-url`, one PostgreSQL row per sale) and
//! exits through `check::finish`: 0 when all held, 1 when one failed, 2 when the run
//! could not be made. Layout: `modes/` has one module per mode (its options, run and
//! checks), `client.rs` the transport and token signing, `check.rs` the verdict.

mod check;
mod client;
mod modes;
mod redis_cpu;

use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

use check::finish;
use modes::{ceiling, flood, holds, load, queue};

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
    Seed(load::SeedArgs),
    /// Keep-alive connections for a duration, or at a fixed rate with `--rate`.
    Sustained(load::SustainedArgs),
    /// The seat lifecycle on an event of its own: holds confirmed, released or
    /// abandoned, direct purchases, cancellations, buyers with tokens and a limit.
    Holds(holds::HoldsArgs),
    /// A crowd in front of a queued event of its own: join before and after the
    /// opening, poll as told, buy once admitted; checks fairness and the rate.
    Queue(queue::QueueArgs),
    /// The purchase script straight against Redis: sales/s of one event.
    Ceiling(ceiling::CeilingArgs),
    /// Anonymous requests with fresh keys on a sold-out event while buyers of
    /// another buy: what Redis keeps per request, and the buyers' latency.
    Flood(flood::FloodArgs),
}

#[tokio::main]
async fn main() -> ExitCode {
    match Cli::parse().mode {
        Mode::Seed(args) => finish(args.run().await, args.common.json),
        Mode::Sustained(args) => finish(args.run().await, args.common.json),
        Mode::Holds(args) => {
            let json = args.json;
            finish(args.run().await, json)
        }
        Mode::Queue(args) => {
            let json = args.json;
            finish(args.run().await, json)
        }
        Mode::Ceiling(args) => {
            let json = args.json;
            finish(args.run().await, json)
        }
        Mode::Flood(args) => {
            let json = args.json;
            finish(args.run().await, json)
        }
    }
}

/// A duration as the options take it: `10s`, `500ms`, `1m`, or seconds alone.
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
