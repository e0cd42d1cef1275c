//! Checks after a run: what the API says was sold, and what PostgreSQL recorded.

use std::time::Duration;

use uuid::Uuid;

use super::Common;
use super::report::{Report, Snapshot};
use crate::check::{Check, Rows, wait_for_rows};
use crate::client::{Target, connect, get_request, send};

/// How long the consumer gets to write every sale to PostgreSQL.
const PERSIST_WAIT: Duration = Duration::from_secs(120);

async fn get_json(target: &Target, path: &str) -> Result<serde_json::Value, String> {
    let mut sender = connect(target).await?;
    let answer = send(
        &mut sender,
        get_request(target, path),
        Duration::from_secs(10),
    )
    .await?;
    if answer.status != 200 {
        return Err(format!(
            "GET {path}: {} {}",
            answer.status,
            String::from_utf8_lossy(&answer.body)
        ));
    }
    serde_json::from_slice(&answer.body).map_err(|e| format!("GET {path}: {e}"))
}

/// The event to buy from: `--event`, or the server's default event.
pub async fn resolve_event(common: &Common, target: &Target) -> Result<Uuid, String> {
    if let Some(event) = common.event {
        return Ok(event);
    }
    let event = get_json(target, "/api/v1/event").await?;
    event["id"]
        .as_str()
        .and_then(|id| id.parse().ok())
        .ok_or_else(|| format!("GET /api/v1/event without an id: {event}"))
}

pub async fn snapshot(target: &Target, event: Uuid) -> Result<Snapshot, String> {
    let body = get_json(target, &format!("/api/v1/events/{event}")).await?;
    let field = |name: &str| {
        body[name]
            .as_i64()
            .ok_or_else(|| format!("event without {name}: {body}"))
    };
    Ok(Snapshot {
        total: field("totalSeats")?,
        sold: field("seatsSold")?,
    })
}

/// Runs every check that applies and records it in the report.
pub async fn checked(common: &Common, mut report: Report) -> Report {
    let mut checks = Vec::new();
    checks.push(Check {
        name: "every request answered",
        ok: report.errors == 0,
        detail: format!("{} without an HTTP answer", report.errors),
    });
    let server_errors: u64 = report
        .statuses
        .iter()
        .filter(|(status, _)| status.starts_with('5'))
        .map(|(_, n)| n)
        .sum();
    checks.push(Check {
        name: "no server errors",
        ok: server_errors == 0,
        detail: format!("{server_errors} answers with 5xx"),
    });
    if let Some(before) = report.before {
        match snapshot(&targets_first(common, &report).await, report.event).await {
            Ok(after) => {
                let sold = after.sold - before.sold;
                checks.push(Check {
                    name: "seats sold per the API equal the sum of the 200s",
                    ok: sold == report.seats_sold as i64,
                    detail: format!("API {sold}, 200s {}", report.seats_sold),
                });
                checks.push(Check {
                    name: "never above capacity",
                    ok: after.sold <= after.total,
                    detail: format!("{} of {} seats sold", after.sold, after.total),
                });
            }
            Err(e) => checks.push(Check {
                name: "seats sold per the API",
                ok: false,
                detail: e,
            }),
        }
        if report.replays + report.replay_mismatches > 0 {
            checks.push(Check {
                name: "retries replayed the first answer",
                ok: report.replay_mismatches == 0,
                detail: format!("{} mismatched", report.replay_mismatches),
            });
        }
        if let Some(url) = common.database_url.as_deref().filter(|url| !url.is_empty()) {
            checks.push(persisted(url, &mut report).await);
        }
    }
    report.checks = checks;
    report
}

async fn targets_first(common: &Common, report: &Report) -> Target {
    let urls = vec![
        report
            .targets
            .first()
            .cloned()
            .unwrap_or_else(|| common.urls[0].clone()),
    ];
    crate::client::targets(&urls)
        .await
        .ok()
        .and_then(|mut t| t.pop())
        .expect("the target resolved before the run")
}

/// Waits until PostgreSQL holds one row per sale of this run, with the same seats.
async fn persisted(url: &str, report: &mut Report) -> Check {
    let pattern = format!("rush-{}-%", report.run);
    let (event, sales, seats_sold) = (report.event, report.sales as i64, report.seats_sold as i64);
    let (check, took) = wait_for_rows(
        "one PostgreSQL row per sale",
        url,
        (Duration::from_millis(20), PERSIST_WAIT),
        |pool| {
            let pattern = pattern.clone();
            async move {
                let (rows, keys, seats): (i64, i64, i64) = sqlx::query_as(
                "SELECT count(*), count(DISTINCT idempotency_key), COALESCE(SUM(quantity), 0)::int8
                 FROM purchases WHERE event_id = $1 AND idempotency_key LIKE $2",
            )
            .bind(event)
            .bind(&pattern)
            .fetch_one(&pool)
            .await?;
                let detail =
                    format!("{rows} rows ({keys} distinct keys) for {sales} sales, {seats} seats");
                Ok(if rows == sales && keys == rows && seats == seats_sold {
                    Rows::Complete(detail)
                } else if rows > sales {
                    Rows::Wrong(detail)
                } else {
                    Rows::Behind(detail)
                })
            }
        },
    )
    .await;
    report.persisted_after_s = took.map(|t| t.as_secs_f64());
    check
}
