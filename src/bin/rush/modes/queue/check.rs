//! After a `rush queue` run: nobody bought without admission; the early joiners'
//! admission order is independent of their join order (Spearman's rank correlation);
//! no late joiner overtook an earlier one; admissions followed the rate; every
//! admitted buyer who tried could buy while seats remained.

use std::collections::{HashMap, HashSet};

use hyper::Method;

use super::{Event, Outcome, Plan, Seen};
use crate::check::{Check, Verdict};
use crate::client::Pool;

/// The buyers, grouped as the checks read them.
struct Crowd<'a> {
    seen: &'a [Seen],
    /// Joined before the opening (tickets `p…`), in no particular order.
    early: Vec<&'a Seen>,
    /// Joined after the opening (tickets `o…`), in ticket order.
    late: Vec<&'a Seen>,
    /// Every admitted buyer, in admission order.
    admitted: Vec<&'a Seen>,
}

fn number(s: &Seen) -> u64 {
    s.ticket[1..].parse::<u64>().unwrap_or(0)
}

impl<'a> Crowd<'a> {
    fn new(seen: &'a [Seen]) -> Self {
        let early = seen.iter().filter(|s| s.ticket.starts_with('p')).collect();
        let mut late: Vec<&Seen> = seen.iter().filter(|s| s.ticket.starts_with('o')).collect();
        late.sort_by_key(|s| number(s));
        let mut admitted: Vec<&Seen> = seen.iter().filter(|s| s.admitted_at_ms > 0).collect();
        admitted.sort_by_key(|s| s.admitted_at_ms);
        Self {
            seen,
            early,
            late,
            admitted,
        }
    }

    fn count(&self, what: impl Fn(&Seen) -> bool) -> u64 {
        self.seen.iter().filter(|s| what(s)).count() as u64
    }

    /// Spearman's rho of the early joiners' admission ranks against their join order,
    /// and the bound it must stay within (4 standard errors).
    fn fairness(&self) -> (f64, f64) {
        let mut by_admission = self.early.clone();
        by_admission.sort_by_key(|s| s.admitted_at_ms);
        let rank: HashMap<&str, f64> = by_admission
            .iter()
            .enumerate()
            .map(|(r, s)| (s.ticket.as_str(), r as f64))
            .collect();
        let joined: Vec<f64> = self.early.iter().map(|s| number(s) as f64 - 1.0).collect();
        let admitted: Vec<f64> = self.early.iter().map(|s| rank[s.ticket.as_str()]).collect();
        let bound = 4.0 / ((self.early.len().max(2) - 1) as f64).sqrt();
        (spearman(&joined, &admitted), bound)
    }

    /// Late joiners admitted before one who joined earlier; and whether every early
    /// joiner came before every late one.
    fn overtakes(&self) -> (usize, bool) {
        let overtaken = self
            .late
            .windows(2)
            .filter(|w| w[1].admitted_at_ms < w[0].admitted_at_ms)
            .count();
        let early_last = self.early.iter().map(|s| s.admitted_at_ms).max();
        let late_first = self.late.iter().map(|s| s.admitted_at_ms).min();
        let in_order = early_last.unwrap_or(i64::MIN) < late_first.unwrap_or(i64::MAX);
        (overtaken, in_order)
    }

    /// Admission moments off the rate. Each early place at opens + ⌈k × 1000 / rate⌉
    /// for its own place k; each late one `1 / rate` after the place before it, or,
    /// when it joined after that moment (the rate does not bank), when it joined.
    fn off_rate(&self, opens: i64, rate: u64) -> usize {
        let moment = |k: u64| opens + (k * 1000).div_ceil(rate) as i64;
        let mut places = HashSet::new();
        let early_off = self
            .early
            .iter()
            .filter(|s| {
                let k = ((s.admitted_at_ms - opens).max(0) as u64 * rate / 1000).max(1);
                let place = (k.saturating_sub(1)..=k + 1)
                    .find(|k| *k >= 1 && moment(*k) == s.admitted_at_ms);
                !place.is_some_and(|k| places.insert(k))
            })
            .count();
        let step_ms = (1000 / rate) as i64;
        let mut previous = moment(self.early.len() as u64);
        let late_off = self
            .late
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
        early_off + late_off
    }

    /// Seconds from admission to the poll that learned of it, at percentile `p`.
    fn lag_s(&self, p: f64) -> f64 {
        let mut lags: Vec<i64> = self
            .admitted
            .iter()
            .map(|s| s.learned_at_ms - s.admitted_at_ms)
            .collect();
        lags.push(0);
        lags.sort_unstable();
        lags[((lags.len() - 1) as f64 * p) as usize] as f64 / 1000.0
    }
}

fn spearman(a: &[f64], b: &[f64]) -> f64 {
    let n = a.len() as f64;
    if n < 2.0 {
        return 0.0;
    }
    let d2: f64 = a.iter().zip(b).map(|(x, y)| (x - y).powi(2)).sum();
    1.0 - 6.0 * d2 / (n * (n * n - 1.0))
}

/// What the run found, with every check.
pub(super) async fn outcome(
    pool: &Pool,
    plan: &Plan,
    event: Event,
    seen: Vec<Seen>,
    joins: u64,
    redis_cpu: Option<(f64, f64)>,
) -> Outcome {
    let crowd = Crowd::new(&seen);
    let opens = event.opens_at.timestamp_millis();
    let last_admitted = crowd.admitted.last().map_or(opens, |s| s.admitted_at_ms);
    let window_s = (last_admitted - opens).max(1) as f64 / 1000.0;
    let last_learned = seen.iter().map(|s| s.learned_at_ms).max().unwrap_or(opens);
    let polls: u64 = seen.iter().map(|s| s.polls).sum();
    let path = format!("/api/v1/events/{}", event.id);
    let sold = match pool.call(Method::GET, &path, &[], None).await {
        Ok((200, body)) => body["seatsSold"].as_i64(),
        _ => None,
    };
    let mut outcome = Outcome {
        event: event.id,
        buyers: seen.len(),
        early: crowd.early.len(),
        late: crowd.late.len(),
        joins,
        polls,
        polls_per_s: polls as f64 / ((last_learned - opens).max(1) as f64 / 1000.0),
        redis_cpu_us_per_request: redis_cpu.map(|c| c.0),
        redis_command_us_per_request: redis_cpu.map(|c| c.1),
        sneaks: crowd.count(|s| s.sneaked),
        sneaks_refused: crowd.count(|s| s.sneak_refused),
        purchases: crowd.count(|s| s.bought),
        sold_out: crowd.count(|s| s.sold_out),
        spearman_rho: crowd.fairness().0,
        lag_p50_s: crowd.lag_s(0.5),
        lag_p99_s: crowd.lag_s(0.99),
        admission_window_s: window_s,
        observed_rate: crowd.admitted.len() as f64 / window_s,
        failures: seen.iter().filter_map(|s| s.failure.clone()).collect(),
        checks: Vec::new(),
    };
    outcome.checks = checks(&crowd, &outcome, plan, event, sold);
    outcome.failures.truncate(10);
    outcome
}

fn checks(crowd: &Crowd, o: &Outcome, plan: &Plan, event: Event, sold: Option<i64>) -> Vec<Check> {
    let seats = event.seats;
    let mut checks = vec![
        Check {
            name: "every buyer was answered as the API says",
            ok: o.failures.is_empty(),
            detail: format!(
                "{} failures{}",
                o.failures.len(),
                o.failures
                    .first()
                    .map(|f| format!(", first: {f}"))
                    .unwrap_or_default()
            ),
        },
        Check {
            name: "nobody bought without admission",
            ok: o.sneaks_refused == o.sneaks && sold == Some(o.purchases as i64),
            detail: format!(
                "{} of {} purchases without admission refused (403); \
                 seats sold {sold:?} = admitted purchases {}",
                o.sneaks_refused, o.sneaks, o.purchases
            ),
        },
    ];
    checks.extend(order_checks(crowd, o, plan, event));
    checks.push(Check {
        name: "every admitted buyer could buy while seats remained",
        ok: o.purchases + o.sold_out == o.buyers as u64
            && (o.sold_out == 0 || sold == Some(i64::from(seats))),
        detail: format!(
            "{} bought, {} sold out, {seats} seats",
            o.purchases, o.sold_out
        ),
    });
    checks
}

/// The order and pace of admissions.
fn order_checks(crowd: &Crowd, o: &Outcome, plan: &Plan, event: Event) -> [Check; 4] {
    let (rho, bound) = crowd.fairness();
    let (overtaken, early_first) = crowd.overtakes();
    let off_rate = crowd.off_rate(event.opens_at.timestamp_millis(), u64::from(plan.rate));
    let risen = crowd.count(|s| s.position_rose);
    [
        Check {
            name: "early joiners admitted in an order independent of joining",
            ok: rho.abs() < bound && o.early + o.late == o.buyers,
            detail: format!(
                "Spearman's rho {rho:.4} over {} early joiners (|rho| < {bound:.3}, 4 standard errors)",
                o.early
            ),
        },
        Check {
            name: "no late joiner overtook an earlier one (nor any early one)",
            ok: overtaken == 0 && early_first,
            detail: format!("{overtaken} overtakes among {} late joiners", o.late),
        },
        Check {
            name: "admissions at the rate",
            ok: off_rate == 0 && o.observed_rate <= plan.rate as f64 * 1.05 + 1.0,
            detail: format!(
                "{off_rate} places off max(the place before + 1/rate, joining); {:.1} admitted/s \
                 over {:.2} s (rate {})",
                o.observed_rate, o.admission_window_s, plan.rate
            ),
        },
        Check {
            name: "positions only went down",
            ok: risen == 0,
            detail: format!("{risen} buyers saw their position rise"),
        },
    ]
}

impl Verdict for Outcome {
    fn checks(&self) -> &[Check] {
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
