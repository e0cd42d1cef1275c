//! This instance's request counters and latency, kept for the seed-compatible
//! `/api/v1/stats`.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use hdrhistogram::Histogram;

/// Latencies are recorded in microseconds up to this bound; slower requests count
/// as this value.
const MAX_TRACKED_MICROS: u64 = 60_000_000;

pub struct Stats {
    total_requests: AtomicU64,
    success_purchases: AtomicU64,
    failed_purchases: AtomicU64,
    latency: Mutex<Histogram<u64>>,
}

impl Default for Stats {
    fn default() -> Self {
        Self {
            total_requests: AtomicU64::new(0),
            success_purchases: AtomicU64::new(0),
            failed_purchases: AtomicU64::new(0),
            latency: Mutex::new(
                Histogram::new_with_bounds(1, MAX_TRACKED_MICROS, 2)
                    .expect("valid histogram bounds"),
            ),
        }
    }
}

/// A snapshot of [`Stats`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Snapshot {
    pub total_requests: u64,
    pub success_purchases: u64,
    pub failed_purchases: u64,
    pub p95_latency_ms: f64,
}

impl Stats {
    /// Records one API request; `purchase` is `Some(success)` for purchase requests.
    pub fn record(&self, elapsed: Duration, purchase: Option<bool>) {
        self.total_requests.fetch_add(1, Ordering::Relaxed);
        match purchase {
            Some(true) => self.success_purchases.fetch_add(1, Ordering::Relaxed),
            Some(false) => self.failed_purchases.fetch_add(1, Ordering::Relaxed),
            None => 0,
        };
        let micros = (elapsed.as_micros() as u64).clamp(1, MAX_TRACKED_MICROS);
        if let Ok(mut latency) = self.latency.lock() {
            latency.saturating_record(micros);
        }
    }

    pub fn snapshot(&self) -> Snapshot {
        let p95 = self
            .latency
            .lock()
            .map(|h| h.value_at_quantile(0.95))
            .unwrap_or(0);
        Snapshot {
            total_requests: self.total_requests.load(Ordering::Relaxed),
            success_purchases: self.success_purchases.load(Ordering::Relaxed),
            failed_purchases: self.failed_purchases.load(Ordering::Relaxed),
            p95_latency_ms: p95 as f64 / 1000.0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_and_p95() {
        let stats = Stats::default();
        for ms in 1..=100 {
            stats.record(Duration::from_millis(ms), Some(ms % 2 == 0));
        }
        stats.record(Duration::from_millis(1), None);
        let s = stats.snapshot();
        assert_eq!(s.total_requests, 101);
        assert_eq!((s.success_purchases, s.failed_purchases), (50, 50));
        assert!((94.0..=96.5).contains(&s.p95_latency_ms), "{s:?}");
    }
}
