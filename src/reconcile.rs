//! `boxoffice reconcile`: per event, whether Redis' `sold` counter equals the seats
//! PostgreSQL holds plus the seats of sales still waiting in the stream.
//!
//! Redis below that sum means Redis lost sales (restored from an older snapshot) and
//! would sell those seats again: `--fix` raises it (never lowers it). Redis above it
//! means confirmed sales are missing from both PostgreSQL and the stream: lost rows,
//! which no command can recreate.

use std::fmt;
use std::time::Duration;

use redis::AsyncCommands;
use uuid::Uuid;

use crate::db::{self, EventRow};
use crate::error::Result;
use crate::purchase::Gate;
use crate::startup::Stores;

/// Sales in flight make one reading inconsistent; a difference must survive this many
/// readings, `SETTLE` apart, to count as drift.
const READINGS: usize = 3;
const SETTLE: Duration = Duration::from_millis(300);

/// One event's counters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Row {
    pub event: Uuid,
    pub name: String,
    pub total: i64,
    /// `None` when Redis does not have the event (it is loaded on first use).
    pub redis_sold: Option<i64>,
    pub persisted: i64,
    /// Seats of stream entries not yet in PostgreSQL.
    pub in_stream: i64,
}

/// How an event's counters relate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Ok,
    /// Not in Redis; it is loaded from PostgreSQL when first used.
    NotLoaded,
    /// Redis counts fewer seats than were sold: it would sell them again.
    RedisBehind,
    /// Redis counts more seats than PostgreSQL and the stream hold: rows were lost.
    RowsMissing,
}

impl Row {
    pub fn status(&self) -> Status {
        match self.redis_sold {
            None => Status::NotLoaded,
            Some(sold) if sold < self.persisted + self.in_stream => Status::RedisBehind,
            Some(sold) if sold > self.persisted + self.in_stream => Status::RowsMissing,
            Some(_) => Status::Ok,
        }
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Status::Ok => "ok",
            Status::NotLoaded => "not loaded",
            Status::RedisBehind => "DRIFT: Redis behind",
            Status::RowsMissing => "DRIFT: rows missing",
        })
    }
}

/// Reads every event's counters; with `fix`, raises Redis where it is behind and
/// reads again. Returns the final reading.
pub async fn run(stores: &Stores, gate: &Gate, fix: bool) -> Result<Vec<Row>> {
    let events = db::events(&stores.db).await?;
    let mut rows = Vec::with_capacity(events.len());
    for event in &events {
        let mut row = settled(stores, gate, event).await?;
        if fix && row.status() == Status::RedisBehind {
            // Records first: once raised, the counter sells again (see `Gate::recover`).
            gate.restore_records(event).await?;
            gate.load(event).await?;
            row = settled(stores, gate, event).await?;
        }
        rows.push(row);
    }
    Ok(rows)
}

/// A reading that is consistent, or the last of `READINGS` inconsistent ones.
async fn settled(stores: &Stores, gate: &Gate, event: &EventRow) -> Result<Row> {
    let mut row = read(stores, gate, event).await?;
    for _ in 1..READINGS {
        if matches!(row.status(), Status::Ok | Status::NotLoaded) {
            break;
        }
        tokio::time::sleep(SETTLE).await;
        row = read(stores, gate, event).await?;
    }
    Ok(row)
}

async fn read(stores: &Stores, gate: &Gate, event: &EventRow) -> Result<Row> {
    let mut conn = stores.redis.get().await?;
    // Redis first: a sale made after this reading shows up in PostgreSQL or the
    // stream and reads as Redis behind for a moment; `settled` reads again.
    let redis_sold: Option<i64> = conn.hget(stores.keys.inventory(event.id), "sold").await?;
    let durable = gate.durable(event.id).await?;
    Ok(Row {
        event: event.id,
        name: event.name.clone(),
        total: i64::from(event.total_seats),
        redis_sold,
        persisted: durable.persisted,
        in_stream: durable.in_stream,
    })
}

/// The table `boxoffice reconcile` prints.
pub fn table(rows: &[Row]) -> String {
    let mut out = format!(
        "{:<36}  {:<20}  {:>9}  {:>9}  {:>9}  {:>9}  status\n",
        "event", "name", "total", "redis", "postgres", "stream"
    );
    for row in rows {
        let redis = row.redis_sold.map_or("-".to_owned(), |s| s.to_string());
        let name: String = row.name.chars().take(20).collect();
        out.push_str(&format!(
            "{:<36}  {:<20}  {:>9}  {:>9}  {:>9}  {:>9}  {}\n",
            row.event,
            name,
            row.total,
            redis,
            row.persisted,
            row.in_stream,
            row.status()
        ));
    }
    out
}
