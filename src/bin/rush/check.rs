//! What every mode ends with: checks that held or failed, one way to print them and
//! exit, and one way to wait for PostgreSQL to catch up with a run.

use std::future::Future;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use serde::Serialize;
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;

/// One verification and whether it held.
#[derive(Debug, Serialize)]
pub struct Check {
    pub name: &'static str,
    pub ok: bool,
    pub detail: String,
}

/// What a mode found: serialized whole for `--json`, or its summary and checks.
pub trait Verdict: Serialize {
    fn checks(&self) -> &[Check];
    /// The lines before the checks, in the text report.
    fn print_summary(&self);
}

/// The one exit path: prints the outcome (as JSON, or its summary and checks); exit 1
/// when a check failed, 2 when the run could not be made.
pub fn finish(result: Result<impl Verdict, String>, json: bool) -> ExitCode {
    let outcome = match result {
        Ok(outcome) => outcome,
        Err(e) => {
            eprintln!("rush: {e}");
            return ExitCode::from(2);
        }
    };
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&outcome).expect("plain data")
        );
    } else {
        outcome.print_summary();
        for check in outcome.checks() {
            let mark = if check.ok { "ok  " } else { "FAIL" };
            println!("  {mark} {}: {}", check.name, check.detail);
        }
    }
    if outcome.checks().iter().all(|c| c.ok) {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// What PostgreSQL holds so far, as a probe of [`wait_for_rows`] reads it.
pub enum Rows {
    /// Everything the run expects is there.
    Complete(String),
    /// Not yet: the consumer may still be writing.
    Behind(String),
    /// More than the run made, or rows that break a rule: waiting cannot help.
    Wrong(String),
}

/// Polls `probe` every `every` until PostgreSQL holds what the run expects, or `limit`
/// passes. Returns the check and, when it held, how long after the run it did.
pub async fn wait_for_rows<F, Fut>(
    name: &'static str,
    url: &str,
    (every, limit): (Duration, Duration),
    mut probe: F,
) -> (Check, Option<Duration>)
where
    F: FnMut(PgPool) -> Fut,
    Fut: Future<Output = Result<Rows, sqlx::Error>>,
{
    let check = |ok, detail| Check { name, ok, detail };
    let pool = match PgPoolOptions::new().max_connections(1).connect(url).await {
        Ok(pool) => pool,
        Err(e) => return (check(false, format!("cannot connect: {e}")), None),
    };
    let started = Instant::now();
    loop {
        match probe(pool.clone()).await {
            Ok(Rows::Complete(detail)) => return (check(true, detail), Some(started.elapsed())),
            Ok(Rows::Behind(detail)) if started.elapsed() > limit => {
                return (check(false, format!("{detail} after {limit:?}")), None);
            }
            Ok(Rows::Behind(_)) => tokio::time::sleep(every).await,
            Ok(Rows::Wrong(detail)) => return (check(false, detail), None),
            Err(e) => return (check(false, e.to_string()), None),
        }
    }
}
