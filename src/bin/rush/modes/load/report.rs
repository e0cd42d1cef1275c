//! The report of a run: text for people, JSON for scripts.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Serialize;
use uuid::Uuid;

use hdrhistogram::Histogram;

use crate::check::{Check, Verdict};
use crate::client::Target;

#[derive(Debug, Serialize)]
pub struct Latency {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
    pub mean: f64,
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub mode: &'static str,
    pub targets: Vec<String>,
    pub event: Uuid,
    /// Prefix of this run's Idempotency-Keys: `rush-<run>-`.
    pub run: String,
    pub connections: Option<usize>,
    pub rate: Option<u64>,
    pub duration_s: f64,
    pub requests: u64,
    pub throughput_rps: f64,
    pub statuses: BTreeMap<String, u64>,
    pub errors: u64,
    pub first_error: Option<String>,
    pub seats_sold: u64,
    pub sales: u64,
    pub replays: u64,
    pub replay_mismatches: u64,
    pub resent: u64,
    /// Milliseconds.
    pub latency_ms: Latency,
    /// Seconds from the end of the run until PostgreSQL held every sale.
    pub persisted_after_s: Option<f64>,
    pub checks: Vec<Check>,
    #[serde(skip)]
    pub before: Option<Snapshot>,
}

impl Report {
    pub fn new(
        mode: &'static str,
        targets: &[Target],
        event: Uuid,
        run: String,
        before: Option<Snapshot>,
        elapsed: std::time::Duration,
        tally: Tally,
    ) -> Self {
        let ms = |micros: u64| micros as f64 / 1000.0;
        let h = &tally.latency;
        let requests = tally.requests();
        Self {
            mode,
            targets: targets.iter().map(|t| t.url.clone()).collect(),
            event,
            run,
            connections: None,
            rate: None,
            duration_s: elapsed.as_secs_f64(),
            requests,
            throughput_rps: requests as f64 / elapsed.as_secs_f64().max(1e-9),
            statuses: tally
                .statuses
                .iter()
                .map(|(status, n)| (status.to_string(), *n))
                .collect(),
            errors: tally.errors,
            first_error: tally.first_error.clone(),
            seats_sold: tally.seats_sold,
            sales: tally.sales,
            replays: tally.replays,
            replay_mismatches: tally.replay_mismatches,
            resent: tally.resent,
            latency_ms: Latency {
                p50: ms(h.value_at_quantile(0.50)),
                p90: ms(h.value_at_quantile(0.90)),
                p99: ms(h.value_at_quantile(0.99)),
                p999: ms(h.value_at_quantile(0.999)),
                max: ms(h.max()),
                mean: h.mean() / 1000.0,
            },
            persisted_after_s: None,
            checks: Vec::new(),
            before,
        }
    }
}

impl Verdict for Report {
    fn checks(&self) -> &[Check] {
        &self.checks
    }

    fn print_summary(&self) {
        let failed = self.requests - self.statuses.get("200").copied().unwrap_or(0);
        let breakdown: Vec<String> = self
            .statuses
            .iter()
            .map(|(status, n)| format!("{status}: {n} requests"))
            .chain((self.errors > 0).then(|| format!("no answer: {} requests", self.errors)))
            .collect();
        println!(
            "Results ({} against {}):",
            self.mode,
            self.targets.join(", ")
        );
        match self.mode {
            "seed" => println!("  Sold seats: {}/{}", self.seats_sold, self.requests),
            "get" => {}
            _ => println!(
                "  Sold seats: {} in {} purchases",
                self.seats_sold, self.sales
            ),
        }
        println!("  Failed requests: {failed}/{}", self.requests);
        println!("  Duration: {:.3} seconds", self.duration_s);
        println!("  Status Code Breakdown: {}", breakdown.join(", "));
        if let Some(e) = &self.first_error {
            println!("  First error: {e}");
        }
        println!("  Throughput: {:.0} requests/s", self.throughput_rps);
        let l = &self.latency_ms;
        println!(
            "  Latency ms: p50 {:.2}  p90 {:.2}  p99 {:.2}  p99.9 {:.2}  max {:.2}",
            l.p50, l.p90, l.p99, l.p999, l.max
        );
        if self.replays + self.replay_mismatches > 0 {
            println!(
                "  Retries: {} replayed identically, {} mismatched",
                self.replays, self.replay_mismatches
            );
        }
        if self.resent > 0 {
            println!("  Sent again after no answer or 502-504: {}", self.resent);
        }
        if let Some(after) = self.persisted_after_s {
            println!("  PostgreSQL held every sale {after:.2} s after the run");
        }
    }
}

/// Latencies are tracked up to a minute, in microseconds.
const MAX_LATENCY_MICROS: u64 = 60_000_000;

/// What a run counted.
pub struct Tally {
    pub latency: Histogram<u64>,
    pub statuses: BTreeMap<u16, u64>,
    /// Requests that got no HTTP answer (refused, reset, timed out).
    pub errors: u64,
    pub first_error: Option<String>,
    /// Seats sold by first-time purchases answered 200.
    pub seats_sold: u64,
    /// First-time purchases answered 200.
    pub sales: u64,
    /// Repeated keys answered with `Idempotent-Replayed: true` and the first answer.
    pub replays: u64,
    /// Repeated keys that got anything else: an idempotency bug.
    pub replay_mismatches: u64,
    /// Requests sent again after no answer or a 502/503/504 (`--retry-failed`).
    pub resent: u64,
}

impl Default for Tally {
    fn default() -> Self {
        Self {
            latency: Histogram::new_with_bounds(1, MAX_LATENCY_MICROS, 3).expect("bounds"),
            statuses: BTreeMap::new(),
            errors: 0,
            first_error: None,
            seats_sold: 0,
            sales: 0,
            replays: 0,
            replay_mismatches: 0,
            resent: 0,
        }
    }
}

impl Tally {
    pub fn merge(&mut self, other: Tally) {
        self.latency.add(other.latency).expect("same bounds");
        for (status, n) in other.statuses {
            *self.statuses.entry(status).or_default() += n;
        }
        self.errors += other.errors;
        self.first_error = self.first_error.take().or(other.first_error);
        self.seats_sold += other.seats_sold;
        self.sales += other.sales;
        self.replays += other.replays;
        self.replay_mismatches += other.replay_mismatches;
        self.resent += other.resent;
    }

    pub fn record_latency(&mut self, latency: Duration) {
        let micros = (latency.as_micros() as u64).clamp(1, MAX_LATENCY_MICROS);
        self.latency.saturating_record(micros);
    }

    /// A first-time purchase of `quantity` seats answered `status`.
    pub fn answered(&mut self, status: u16, quantity: u8) {
        *self.statuses.entry(status).or_default() += 1;
        if status == 200 {
            self.seats_sold += u64::from(quantity);
            self.sales += 1;
        }
    }

    pub fn error(&mut self, e: String) {
        self.errors += 1;
        self.first_error.get_or_insert(e);
    }

    pub fn requests(&self) -> u64 {
        self.statuses.values().sum::<u64>() + self.errors
    }
}

/// An event's seats as the API reports them.
#[derive(Debug, Clone, Copy)]
pub struct Snapshot {
    pub total: i64,
    pub sold: i64,
}
