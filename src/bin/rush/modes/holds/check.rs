//! After a `rush holds` run: a share of the sales cancelled, the abandoned holds left
//! to expire, and what the service says checked against what the buyers were told.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use hyper::Method;
use serde_json::Value;
use uuid::Uuid;

use super::Outcome;
use super::buyer::{Client, Sale, Shared, Tally, fraction};
use crate::check::{Check, Rows, Verdict, wait_for_rows};
use crate::client::{Target, connect, request, send};

/// The event's seats, as `GET /api/v1/events/{id}` says: (total, sold, held).
async fn seats(target: &Target, event: Uuid) -> Result<(i64, i64, i64), String> {
    let mut sender = connect(target).await?;
    let path = format!("/api/v1/events/{event}");
    let answer = send(
        &mut sender,
        request(target, Method::GET, &path, &[], None),
        Duration::from_secs(10),
    )
    .await?;
    let body: Value = serde_json::from_slice(&answer.body).map_err(|e| e.to_string())?;
    let field = |name: &str| body[name].as_i64().ok_or(format!("{path}: {body}"));
    Ok((
        field("totalSeats")?,
        field("seatsSold")?,
        field("seatsHeld")?,
    ))
}

/// Samples the event's seats during the run: the most `sold + held` seen, and
/// whether it ever exceeded the total.
pub(super) async fn watch(shared: Arc<Shared>, stop: Arc<AtomicBool>) -> (i64, bool) {
    let (mut most, mut over) = (0, false);
    while !stop.load(Ordering::Relaxed) {
        if let Ok((total, sold, held)) = seats(&shared.targets[0], shared.event).await {
            most = most.max(sold + held);
            over |= sold + held > total || sold < 0 || held < 0;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    (most, over)
}

/// Cancels every sale whose place in the list falls in the cancel share, as the
/// admin; a sale not yet in PostgreSQL answers 503 and is tried again.
pub(super) async fn cancel_some(shared: &Shared, sales: &[Sale]) -> Result<Vec<Sale>, String> {
    let plan = &shared.plan;
    let chosen: Vec<&Sale> = sales
        .iter()
        .enumerate()
        .filter(|(i, _)| fraction(*i as u64, 3) < plan.cancel_share)
        .map(|(_, s)| s)
        .collect();
    let mut client = Client::new(shared.targets[0].clone(), plan.timeout);
    let auth = vec![(
        "authorization".to_owned(),
        format!("Bearer {}", plan.admin_token),
    )];
    let mut cancelled = Vec::new();
    for sale in chosen {
        let path = format!(
            "/api/v1/events/{}/purchases/{}/cancel",
            shared.event, sale.id
        );
        let give_up = Instant::now() + Duration::from_secs(60);
        loop {
            match client.call(Method::POST, &path, &auth, None).await {
                Some((200, _)) => {
                    cancelled.push(sale.clone());
                    break;
                }
                Some((503, _)) | None if Instant::now() < give_up => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                other => return Err(format!("cancelling {}: {other:?}", sale.id)),
            }
        }
    }
    Ok(cancelled)
}

/// Every check of a run, once the abandoned holds have had time to expire.
pub(super) async fn check(
    shared: &Shared,
    tally: &Tally,
    outcome: &Outcome,
    over_capacity: bool,
    cancelled: &[Sale],
) -> Vec<Check> {
    let mut checks = vec![
        Check {
            name: "every request answered",
            ok: tally.errors == 0,
            detail: format!("{} without an HTTP answer", tally.errors),
        },
        Check {
            name: "no server errors",
            ok: tally.statuses.keys().all(|s| *s < 500),
            detail: format!("statuses {:?}", tally.statuses),
        },
        Check {
            name: "sold + held never above the total during the run",
            ok: !over_capacity,
            detail: format!("most taken at a sample: {}", outcome.most_taken),
        },
    ];
    // The abandoned holds expire; the sweeper returns them within its interval.
    if let Some(latest) = tally.abandoned.iter().map(|(_, _, at)| *at).max() {
        let wait = (latest - chrono::Utc::now()).num_milliseconds().max(0) as u64 + 1_500;
        tokio::time::sleep(Duration::from_millis(wait)).await;
    }
    checks.extend(seats_after(shared, outcome).await);
    checks.push(abandoned_expired(shared, tally).await);
    let limit = shared.plan.max_per_buyer;
    if limit > 0 {
        checks.push(buyer_limit(tally, cancelled, limit));
    }
    if let Some(url) = &shared.plan.database_url {
        checks.push(rows(url, shared.event, tally, outcome, limit).await);
    }
    checks
}

/// The event's seats after the run: sales net of cancellations, nothing held.
async fn seats_after(shared: &Shared, outcome: &Outcome) -> Vec<Check> {
    let expected_sold = outcome.purchased_seats + outcome.confirmed_seats - outcome.cancelled_seats;
    match seats(&shared.targets[0], shared.event).await {
        Ok((total, sold, held)) => vec![
            Check {
                name: "sold = confirmed + purchased − cancelled",
                ok: sold == expected_sold,
                detail: format!(
                    "API {sold}; {} + {} − {}",
                    outcome.confirmed_seats, outcome.purchased_seats, outcome.cancelled_seats
                ),
            },
            Check {
                name: "every abandoned hold's seats came back after its expiry",
                ok: held == 0 && sold + held <= total,
                detail: format!(
                    "{held} seats still held after {} abandoned holds ({} seats) expired",
                    outcome.abandoned, outcome.abandoned_seats
                ),
            },
        ],
        Err(e) => vec![Check {
            name: "the event's seats",
            ok: false,
            detail: e,
        }],
    }
}

/// Up to 200 abandoned holds, each of which must read as expired.
async fn abandoned_expired(shared: &Shared, tally: &Tally) -> Check {
    let sample: Vec<_> = tally.abandoned.iter().take(200).collect();
    let mut client = Client::new(shared.targets[0].clone(), shared.plan.timeout);
    let mut expired = 0;
    for (hold, _, _) in &sample {
        let path = format!("/api/v1/events/{}/holds/{hold}", shared.event);
        if let Some((200, body)) = client.call(Method::GET, &path, &[], None).await
            && body["state"] == "expired"
        {
            expired += 1;
        }
    }
    Check {
        name: "abandoned holds read as expired",
        ok: expired == sample.len(),
        detail: format!("{expired} of {} sampled", sample.len()),
    }
}

/// Seats per buyer, as the buyers were told, net of cancellations.
fn buyer_limit(tally: &Tally, cancelled: &[Sale], limit: u32) -> Check {
    let mut per_buyer: HashMap<usize, i64> = HashMap::new();
    for sale in &tally.sales {
        *per_buyer.entry(sale.buyer).or_default() += sale.seats;
    }
    for sale in cancelled {
        *per_buyer.entry(sale.buyer).or_default() -= sale.seats;
    }
    let most = per_buyer.values().copied().max().unwrap_or(0);
    Check {
        name: "no buyer over the limit",
        ok: most <= i64::from(limit),
        detail: format!(
            "most seats one buyer bought: {most} (limit {limit}, {} buyers)",
            per_buyer.len()
        ),
    }
}

/// Waits until PostgreSQL holds one row per sale and marks each cancellation, and
/// checks no buyer there is over the limit.
async fn rows(url: &str, event: Uuid, tally: &Tally, outcome: &Outcome, limit: u32) -> Check {
    let sales = tally.sales.len() as i64;
    let expected_seats =
        outcome.purchased_seats + outcome.confirmed_seats - outcome.cancelled_seats;
    let expected_cancelled = outcome.cancelled as i64;
    let name = "PostgreSQL: one row per sale, cancellations marked, no buyer over the limit";
    let (check, _) = wait_for_rows(name, url, (Duration::from_millis(50), Duration::from_secs(60)), |pool| async move {
        let (rows, seats, cancelled, most): (i64, i64, i64, i64) = sqlx::query_as(
            "SELECT count(*),
                    COALESCE(SUM(quantity) FILTER (WHERE cancelled_at IS NULL), 0)::int8,
                    count(*) FILTER (WHERE cancelled_at IS NOT NULL),
                    COALESCE((SELECT max(s) FROM (SELECT SUM(quantity) AS s FROM purchases
                              WHERE event_id = $1 AND cancelled_at IS NULL
                              GROUP BY buyer) b), 0)::int8
             FROM purchases WHERE event_id = $1",
        )
        .bind(event)
        .fetch_one(&pool)
        .await?;
        let detail = format!(
            "{rows} rows for {sales} sales, {seats} seats not cancelled (expected \
             {expected_seats}), {cancelled} cancelled of {expected_cancelled}, most per buyer {most}"
        );
        let limit_ok = limit == 0 || most <= i64::from(limit);
        Ok(if rows > sales || !limit_ok {
            Rows::Wrong(detail)
        } else if rows == sales && seats == expected_seats && cancelled == expected_cancelled {
            Rows::Complete(detail)
        } else {
            Rows::Behind(detail)
        })
    })
    .await;
    check
}

impl Verdict for Outcome {
    fn checks(&self) -> &[Check] {
        &self.checks
    }

    fn print_summary(&self) {
        println!(
            "rush holds on event {}: {} requests in {:.2} s ({:.0} req/s), {:.0} sales/s",
            self.event, self.requests, self.duration_s, self.requests_per_s, self.sales_per_s
        );
        println!(
            "purchases {} ({} seats); holds {}: confirmed {} ({} seats), released {} seats, \
             abandoned {} ({} seats); cancelled {} ({} seats)",
            self.purchases,
            self.purchased_seats,
            self.holds,
            self.confirmed,
            self.confirmed_seats,
            self.released_seats,
            self.abandoned,
            self.abandoned_seats,
            self.cancelled,
            self.cancelled_seats
        );
        let mut statuses: Vec<_> = self.statuses.iter().collect();
        statuses.sort();
        let mut refusals: Vec<_> = self.refusals.iter().collect();
        refusals.sort();
        println!("statuses {statuses:?}; refusals {refusals:?}");
    }
}
