//! `boxoffice reconcile`: per event, whether Redis agrees with PostgreSQL and the
//! streams — its `sold` counter with the seats PostgreSQL holds plus the seats of
//! sales still waiting in the stream or parked, and its idempotency records with the
//! sales made within the TTL.
//!
//! Redis behind, or missing records, means a seat or a retried request could be sold
//! twice: `--fix` brings the event back through the one recovery every path uses
//! ([`Recovery::ensure_event`], forced), and sends parked sales back to the stream.
//! Redis ahead means confirmed sales are missing from both PostgreSQL and the stream:
//! lost rows, which no command can recreate; it is reported.
//!
//! Events are read from PostgreSQL and from Redis (its set of events and the
//! dead-letter streams), so that an event whose row is gone still shows, with the
//! sales Redis holds for it: its sales are parked, and it is off sale (the consumer
//! takes it off, `persist`). Once the row is restored, `--fix` sends them back.

use std::collections::HashSet;
use std::fmt;
use std::time::Duration;

use deadpool_redis::redis::AsyncCommands;
use uuid::Uuid;

use crate::db::{self, EventRow};
use crate::error::Result;
use crate::gate::recovery::{Mode, Recovery};
use crate::persist;
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
    /// Checked against PostgreSQL on the Redis server now running.
    pub on_sale: bool,
    pub persisted: i64,
    /// Seats of stream entries not yet in PostgreSQL.
    pub in_stream: i64,
    /// Seats of sales PostgreSQL refused, set aside.
    pub parked: i64,
    /// Entries in the dead letters, of any kind (a hold parked counts no seats).
    pub parked_entries: usize,
    /// Sales within the idempotency TTL whose record Redis lacks.
    pub records_missing: usize,
    /// PostgreSQL has a row for the event (Redis may still hold one it lost).
    pub in_postgres: bool,
}

/// How an event's state in Redis relates to PostgreSQL and the streams.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Ok,
    /// Not in Redis; it is brought back at its next request.
    NotLoaded,
    /// Not checked on this Redis server yet (it restarted, or was restored or
    /// replaced); it is at the event's next request.
    NotChecked,
    /// Redis counts fewer seats than were sold: it would sell them again.
    RedisBehind,
    /// Redis counts more seats than PostgreSQL and the streams hold: rows were lost.
    RowsMissing,
    /// Idempotency records of recent sales are gone: their retries would buy again.
    RecordsMissing,
    /// Sales PostgreSQL refused for good wait in the dead-letter stream.
    Parked,
    /// Redis holds the event (or sales of it) but PostgreSQL has no row for it.
    EventMissing,
}

impl Status {
    /// Whether this needs an operator: `reconcile` exits 1 on it.
    pub fn is_drift(self) -> bool {
        !matches!(self, Status::Ok | Status::NotLoaded | Status::NotChecked)
    }
}

impl Row {
    pub fn status(&self) -> Status {
        let durable = self.persisted + self.in_stream + self.parked;
        match self.redis_sold {
            _ if !self.in_postgres => Status::EventMissing,
            // Whether or not the event is loaded: they wait for an operator.
            _ if self.parked_entries > 0 => Status::Parked,
            None => Status::NotLoaded,
            Some(_) if !self.on_sale => Status::NotChecked,
            Some(sold) if sold < durable => Status::RedisBehind,
            Some(sold) if sold > durable => Status::RowsMissing,
            Some(_) if self.records_missing > 0 => Status::RecordsMissing,
            Some(_) => Status::Ok,
        }
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Status::Ok => "ok",
            Status::NotLoaded => "not loaded",
            Status::NotChecked => "not checked yet",
            Status::RedisBehind => "DRIFT: Redis behind",
            Status::RowsMissing => "DRIFT: rows missing",
            Status::RecordsMissing => "DRIFT: records missing",
            Status::Parked => "DRIFT: sales parked",
            Status::EventMissing => "DRIFT: no event row (restore it, then --fix)",
        })
    }
}

/// Reads every event; with `fix`, repairs what can be repaired (see the module docs)
/// and reads again. Returns the final reading.
pub async fn run(stores: &Stores, recovery: &Recovery, fix: bool) -> Result<Vec<Row>> {
    let events = db::events(&stores.db).await?;
    let known: HashSet<Uuid> = events.iter().map(|e| e.id).collect();
    let mut rows = Vec::with_capacity(events.len());
    for event in &events {
        let mut row = settled(stores, recovery, event).await?;
        if fix && row.status() != Status::Ok {
            repair(stores, recovery, event, &row).await?;
            row = settled(stores, recovery, event).await?;
        }
        rows.push(row);
    }
    for id in in_redis(stores).await? {
        if known.contains(&id) {
            continue;
        }
        // Created since the list was read (the row comes before Redis): read as any.
        if let Some(event) = db::event(&stores.db, id).await? {
            rows.push(settled(stores, recovery, &event).await?);
            continue;
        }
        // Nothing to repair without the row: its settings are gone with it.
        let mut row = settled(stores, recovery, &missing(id)).await?;
        row.in_postgres = false;
        row.total = recovery
            .state(id)
            .await?
            .map_or(0, |(inventory, _)| inventory.total);
        rows.push(row);
    }
    Ok(rows)
}

/// Events Redis knows: its set of events, and those with dead letters.
async fn in_redis(stores: &Stores) -> Result<Vec<Uuid>> {
    let mut conn = stores.redis.get().await?;
    let mut ids: HashSet<Uuid> = conn
        .smembers::<_, Vec<String>>(stores.keys.events())
        .await?
        .iter()
        .filter_map(|id| id.parse().ok())
        .collect();
    // An event leaves the set only by hand; its dead letters may still be there.
    let dead = conn.scan_all(&stores.keys.dead_letters_pattern()).await?;
    for key in dead {
        ids.extend(stores.keys.event_of_dead_letters(&key));
    }
    let mut ids: Vec<Uuid> = ids.into_iter().collect();
    ids.sort();
    Ok(ids)
}

/// Stands in for the row of an event PostgreSQL lacks, to read what Redis holds.
fn missing(id: Uuid) -> EventRow {
    EventRow {
        id,
        name: "(no row in PostgreSQL)".into(),
        total_seats: 0,
        hold_seconds: 0,
        max_per_buyer: None,
        queue_opens_at: None,
        queue_admit_per_second: None,
        queue_admission_seconds: None,
        queue_seed: None,
    }
}

async fn repair(stores: &Stores, recovery: &Recovery, event: &EventRow, row: &Row) -> Result<()> {
    if row.parked_entries > 0 {
        let mut conn = stores.redis.get().await?;
        let sent = persist::requeue_parked(&mut conn, &stores.keys, event.id).await?;
        tracing::info!(event = %event.id, sent, "parked sales sent back to the stream");
    }
    if row.status() != Status::RowsMissing {
        let report = recovery.ensure_event(event, Mode::Force).await?;
        tracing::info!(event = %event.id, ?report, "event checked against PostgreSQL");
    }
    Ok(())
}

/// A reading that is consistent, or the last of `READINGS` inconsistent ones.
async fn settled(stores: &Stores, recovery: &Recovery, event: &EventRow) -> Result<Row> {
    let mut row = read(stores, recovery, event).await?;
    for _ in 1..READINGS {
        if !row.status().is_drift() {
            break;
        }
        tokio::time::sleep(SETTLE).await;
        row = read(stores, recovery, event).await?;
    }
    Ok(row)
}

async fn read(stores: &Stores, recovery: &Recovery, event: &EventRow) -> Result<Row> {
    // Redis first: a sale made after this reading shows up in PostgreSQL or the
    // stream and reads as Redis behind for a moment; `settled` reads again.
    let state = recovery.state(event.id).await?;
    let durable = recovery.durable(event).await?;
    let records_missing = match state {
        Some((_, true)) => recovery.missing_records(event).await?,
        _ => 0,
    };
    Ok(Row {
        event: event.id,
        name: event.name.clone(),
        total: i64::from(event.total_seats),
        redis_sold: state.map(|(inventory, _)| inventory.sold),
        on_sale: state.is_some_and(|(_, on_sale)| on_sale),
        persisted: durable.persisted,
        in_stream: durable.in_stream,
        parked: durable.parked,
        records_missing,
        parked_entries: stores
            .redis
            .get()
            .await?
            .xlen(stores.keys.dead_letters(event.id))
            .await?,
        in_postgres: true,
    })
}

/// The table `boxoffice reconcile` prints.
pub fn table(rows: &[Row]) -> String {
    let mut out = format!(
        "{:<36}  {:<20}  {:>9}  {:>9}  {:>9}  {:>9}  {:>7}  {:>9}  status\n",
        "event", "name", "total", "redis", "postgres", "stream", "parked", "no-record"
    );
    for row in rows {
        let redis = row.redis_sold.map_or("-".to_owned(), |s| s.to_string());
        let name: String = row.name.chars().take(20).collect();
        out.push_str(&format!(
            "{:<36}  {:<20}  {:>9}  {:>9}  {:>9}  {:>9}  {:>7}  {:>9}  {}\n",
            row.event,
            name,
            row.total,
            redis,
            row.persisted,
            row.in_stream,
            row.parked,
            row.records_missing,
            row.status()
        ));
    }
    out
}
