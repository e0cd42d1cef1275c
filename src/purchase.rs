//! The purchase gate: one Lua script in Redis decides every sale (see
//! `lua/purchase.lua`), and this module calls it, loads events into Redis from
//! PostgreSQL when they are missing there, and reads seat counts.
//!
//! Purchases run over one multiplexed connection (`ConnectionManager`) shared by all
//! requests, so concurrent scripts pipeline instead of each waiting for a pooled
//! connection's round trip.
//!
//! Redis forgets its script cache on every restart, failover and restore, and those
//! are exactly the moments it may have lost sales. So a `NOSCRIPT` reply is taken as
//! "this Redis may be behind": before the purchase script is loaded again, every event
//! is checked against PostgreSQL and the stream ([`Gate::recover`]). No instance can
//! sell on a restored Redis before that check, because none can run the script.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::streams::StreamRangeReply;
use redis::{AsyncCommands, ErrorKind, Script, ServerErrorKind};
use sqlx::PgPool;
use uuid::Uuid;

use crate::db::{self, EventRow};
use crate::domain::{IdempotencyKey, Quantity};
use crate::error::{Error, Result, redact_url};
use crate::keys::Keys;

/// Name of the consumer group that writes sales to PostgreSQL.
pub const CONSUMER_GROUP: &str = "persist";

/// Reconnect attempts of the shared connection before a command fails; kept low so a
/// request fails fast (503) instead of waiting out a Redis outage.
const RECONNECT_RETRIES: usize = 1;

/// How often the Redis server's identity is checked (see [`Gate::watch_redis`]).
const RUN_ID_CHECK_EVERY: Duration = Duration::from_secs(5);

/// Stream entries read per XRANGE call when counting unwritten sales.
const RANGE_CHUNK: usize = 10_000;

/// After a failed recovery, how long requests fail at once instead of trying again.
const RECOVERY_RETRY_AFTER: Duration = Duration::from_secs(1);

/// Idempotency records written back per pipeline during recovery.
const RESTORE_CHUNK: usize = 1_000;

/// What one purchase request came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Seats were sold.
    Sold(Sale),
    /// Fewer seats remain than asked for; nothing was sold.
    SoldOut,
    /// The key was first used with another quantity; nothing was sold.
    KeyReused,
}

/// A completed sale as the client sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sale {
    pub purchase_id: Uuid,
    pub quantity: u8,
    pub seats_remaining: i64,
}

/// An outcome and whether it repeats one recorded earlier under the same key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub outcome: Outcome,
    pub replayed: bool,
}

/// Seat counters of one event, straight from Redis.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Inventory {
    pub total: i64,
    pub sold: i64,
    /// Successful purchases (a purchase may hold up to 10 seats).
    pub purchases: i64,
    /// Purchases refused for lack of seats.
    pub rejected: i64,
}

/// The Redis side of selling: scripts, keys and connections.
#[derive(Clone)]
pub struct Gate {
    conn: ConnectionManager,
    db: PgPool,
    keys: Keys,
    idempotency_ttl: u64,
    purchase: Script,
    load_event: Script,
    /// Held while this instance brings a Redis without the purchase script up to
    /// date, so that concurrent requests wait for one recovery instead of racing.
    /// Holds when and why the last attempt failed.
    recovery: Arc<tokio::sync::Mutex<Option<(std::time::Instant, String)>>>,
}

/// What PostgreSQL and the stream say about an event's sales.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Durable {
    /// Seats in `purchases`.
    pub persisted: i64,
    /// Seats of stream entries that are not rows yet.
    pub in_stream: i64,
}

impl Durable {
    /// Seats sold for certain: Redis must never count fewer.
    pub fn seats(&self) -> i64 {
        self.persisted + self.in_stream
    }
}

impl Gate {
    pub async fn connect(
        redis_url: &str,
        timeout: Duration,
        db: PgPool,
        keys: Keys,
        idempotency_ttl: u64,
    ) -> Result<Self> {
        let unreachable = |e: redis::RedisError| {
            Error::Startup(format!(
                "cannot reach Redis at {} ({e}); start it or set REDIS_URL",
                redact_url(redis_url)
            ))
        };
        let client = redis::Client::open(redis_url).map_err(unreachable)?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(timeout))
            .set_response_timeout(Some(timeout))
            .set_number_of_retries(RECONNECT_RETRIES);
        let conn = ConnectionManager::new_with_config(client, config)
            .await
            .map_err(unreachable)?;
        Ok(Self {
            conn,
            db,
            keys,
            idempotency_ttl,
            purchase: Script::new(include_str!("../lua/purchase.lua")),
            load_event: Script::new(include_str!("../lua/load_event.lua")),
            recovery: Arc::default(),
        })
    }

    pub fn keys(&self) -> &Keys {
        &self.keys
    }

    /// Sells `quantity` seats of `event` under `key`, or replays what that key got before.
    pub async fn purchase(
        &self,
        event: Uuid,
        key: &IdempotencyKey,
        quantity: Quantity,
    ) -> Result<Decision> {
        let (kind, record) = self.run_purchase(event, key, quantity).await?;
        let (kind, record) = if kind == "unknown" {
            // Not in Redis yet (new, flushed or restored Redis): load it and try once more.
            self.load_from_db(event).await?;
            self.run_purchase(event, key, quantity).await?
        } else {
            (kind, record)
        };
        let replayed = match kind.as_str() {
            "new" => false,
            "replay" => true,
            _ => return Err(Error::UnexpectedReply(format!("{kind} {record}"))),
        };
        let (recorded_quantity, outcome) = parse_record(&record)?;
        let outcome = if recorded_quantity != quantity.get() {
            Outcome::KeyReused
        } else {
            outcome
        };
        Ok(Decision { outcome, replayed })
    }

    async fn run_purchase(
        &self,
        event: Uuid,
        key: &IdempotencyKey,
        quantity: Quantity,
    ) -> Result<(String, String)> {
        let started = std::time::Instant::now();
        // EVALSHA by hand rather than `Script::invoke_async`, which would load the
        // script on NOSCRIPT without the recovery that must come first.
        let mut evalsha = redis::cmd("EVALSHA");
        evalsha
            .arg(self.purchase.get_hash())
            .arg(3)
            .arg(self.keys.inventory(event))
            .arg(self.keys.idempotency(event, key.as_str()))
            .arg(self.keys.stream(event))
            .arg(quantity.get())
            // 32 hex digits, not the 36-character hyphenated form: it keeps the whole
            // record within 44 bytes, which Redis stores inline with its object header.
            .arg(Uuid::now_v7().simple().to_string())
            .arg(self.idempotency_ttl)
            .arg(key.as_str());
        let mut conn = self.conn.clone();
        let reply = match evalsha.query_async(&mut conn).await {
            Err(e) if e.kind() == ErrorKind::Server(ServerErrorKind::NoScript) => {
                self.recover().await?;
                evalsha.query_async(&mut conn).await
            }
            reply => reply,
        };
        metrics::histogram!("boxoffice_redis_script_duration_seconds")
            .record(started.elapsed().as_secs_f64());
        Ok(reply?)
    }

    /// Makes a Redis that lacks the purchase script safe to sell from, then loads the
    /// script. For every event: `sold` is raised to what PostgreSQL and the stream
    /// hold, and the idempotency records of sales within the TTL are written back, so
    /// a retried request gets its sale replayed rather than sold again. Does nothing
    /// when the script is there (another request or replica recovered first).
    pub async fn recover(&self) -> Result<()> {
        let mut last_failure = self.recovery.lock().await;
        let mut conn = self.conn.clone();
        let (loaded,): (bool,) = redis::cmd("SCRIPT")
            .arg("EXISTS")
            .arg(self.purchase.get_hash())
            .query_async(&mut conn)
            .await?;
        if loaded {
            return Ok(());
        }
        // Requests that queued behind an attempt that just failed fail with it
        // rather than each waiting out PostgreSQL's timeouts again.
        if let Some((at, error)) = last_failure.as_ref()
            && at.elapsed() < RECOVERY_RETRY_AFTER
        {
            return Err(Error::RecoveryPending(error.clone()));
        }
        let started = std::time::Instant::now();
        let recovered = self.recover_events(&mut conn).await;
        *last_failure = match &recovered {
            Ok(_) => None,
            Err(e) => Some((std::time::Instant::now(), e.to_string())),
        };
        let (events, records) = recovered?;
        tracing::warn!(
            events,
            records,
            took = ?started.elapsed(),
            "Redis had no purchase script (new, restarted, failed over or restored): \
             counters checked against PostgreSQL before selling"
        );
        Ok(())
    }

    /// The work of [`Gate::recover`]; returns how many events and records it handled.
    async fn recover_events(&self, conn: &mut ConnectionManager) -> Result<(usize, usize)> {
        let mut records = 0;
        let events = db::events(&self.db).await?;
        for event in &events {
            // A script's writes reach the AOF/RDB together, so a counter that was not
            // behind still has the records of its sales; only a lossy Redis needs them.
            if self.load(event).await? {
                records += self.restore_records(event).await?;
            }
        }
        self.purchase.load_async(conn).await?;
        Ok((events.len(), records))
    }

    /// Writes back the idempotency records of `event`'s sales made within the TTL,
    /// where Redis lacks them. Returns how many PostgreSQL had.
    pub async fn restore_records(&self, event: &EventRow) -> Result<usize> {
        let sales = db::recent_sales(&self.db, event, self.idempotency_ttl).await?;
        let mut conn = self.conn.clone();
        for chunk in sales.chunks(RESTORE_CHUNK) {
            let mut pipe = redis::pipe();
            for sale in chunk {
                pipe.cmd("SET")
                    .arg(self.keys.idempotency(event.id, &sale.idempotency_key))
                    .arg(sale_record(sale.quantity, sale.seats_remaining, sale.id))
                    .arg("EX")
                    .arg(sale.ttl_left)
                    // A record Redis still has is newer than or equal to this one.
                    .arg("NX")
                    .ignore();
            }
            let _: () = pipe.query_async(&mut conn).await?;
        }
        Ok(sales.len())
    }

    /// Seat counters of `event`, loading it from PostgreSQL when Redis lacks it.
    pub async fn inventory(&self, event: Uuid) -> Result<Inventory> {
        if let Some(inventory) = self.read_inventory(event).await? {
            return Ok(inventory);
        }
        self.load_from_db(event).await?;
        self.read_inventory(event)
            .await?
            .ok_or_else(|| Error::UnexpectedReply(format!("event {event} vanished from Redis")))
    }

    async fn read_inventory(&self, event: Uuid) -> Result<Option<Inventory>> {
        let fields: (Option<i64>, Option<i64>, Option<i64>, Option<i64>) = self
            .conn
            .clone()
            .hmget(
                self.keys.inventory(event),
                &["total", "sold", "purchases", "rejected"],
            )
            .await?;
        Ok(match fields {
            (Some(total), Some(sold), purchases, rejected) => Some(Inventory {
                total,
                sold,
                purchases: purchases.unwrap_or(0),
                rejected: rejected.unwrap_or(0),
            }),
            _ => None,
        })
    }

    /// Loads an event Redis lacks. Its idempotency records are written back first:
    /// a Redis that lost the event lost them too, and the moment the counter exists a
    /// retried key could otherwise be sold again.
    async fn load_from_db(&self, event: Uuid) -> Result<()> {
        let row = db::event(&self.db, event)
            .await?
            .ok_or(Error::EventNotFound(event))?;
        self.restore_records(&row).await?;
        self.load(&row).await.map(drop)
    }

    /// Puts `event` into Redis, or raises its `sold` counter to the seats PostgreSQL
    /// and the stream hold (see [`Gate::durable`]). Returns whether Redis had lost
    /// sales of it: the event was missing or its counter was behind.
    pub async fn load(&self, event: &EventRow) -> Result<bool> {
        let durable = self.durable(event.id).await?;
        let mut conn = self.conn.clone();
        let (created, raised): (i64, i64) = self
            .load_event
            .key(self.keys.inventory(event.id))
            .key(self.keys.stream(event.id))
            .arg(event.total_seats)
            .arg(durable.seats())
            .arg(CONSUMER_GROUP)
            .invoke_async(&mut conn)
            .await?;
        // The consumer finds streams through this set; a set outside the event's hash
        // slot cannot be written by the script on a cluster, hence the second command.
        let _: () = conn.sadd(self.keys.events(), event.id.to_string()).await?;
        if created == 1 {
            tracing::info!(event = %event.id, persisted = durable.persisted, "loaded event into Redis");
        }
        if raised > 0 {
            tracing::warn!(
                event = %event.id, raised,
                "Redis had fewer seats sold than PostgreSQL and the stream (restored from an older snapshot?); raised it"
            );
        }
        Ok(created == 1 || raised > 0)
    }

    /// Seats of `event` sold for certain: rows in PostgreSQL plus stream entries not
    /// written yet. Entries already written but not yet trimmed count once.
    pub async fn durable(&self, event: Uuid) -> Result<Durable> {
        let mut conn = self.conn.clone();
        let stream = self.keys.stream(event);
        let mut entries: Vec<(Uuid, i64)> = Vec::new();
        let mut start = "-".to_owned();
        loop {
            let page: StreamRangeReply =
                conn.xrange_count(&stream, &start, "+", RANGE_CHUNK).await?;
            for entry in &page.ids {
                let id = entry.get::<String>("p").and_then(|p| p.parse().ok());
                if let (Some(id), Some(q)) = (id, entry.get::<i64>("q")) {
                    entries.push((id, q));
                }
            }
            match page.ids.last() {
                Some(last) if page.ids.len() == RANGE_CHUNK => start = format!("({}", last.id),
                _ => break,
            }
        }
        let ids: Vec<Uuid> = entries.iter().map(|(id, _)| *id).collect();
        // One statement, so that a row written meanwhile is counted in exactly one place.
        let (persisted, written) = db::seats_sold_and_written(&self.db, event, &ids).await?;
        let written: HashSet<Uuid> = written.into_iter().collect();
        let in_stream = entries
            .iter()
            .filter(|(id, _)| !written.contains(id))
            .map(|(_, q)| q)
            .sum();
        Ok(Durable {
            persisted,
            in_stream,
        })
    }

    /// Loads every event of PostgreSQL into Redis (see [`Gate::load`]).
    pub async fn load_all(&self) -> Result<()> {
        for event in db::events(&self.db).await? {
            self.load(&event).await?;
        }
        Ok(())
    }

    /// The `run_id` of the Redis server behind the shared connection.
    pub async fn redis_run_id(&self) -> Result<String> {
        let info: String = redis::cmd("INFO")
            .arg("server")
            .query_async(&mut self.conn.clone())
            .await?;
        info.lines()
            .find_map(|line| line.strip_prefix("run_id:"))
            .map(|id| id.trim().to_owned())
            .ok_or_else(|| Error::UnexpectedReply("INFO server without run_id".into()))
    }

    /// Recovers (see [`Gate::recover`]) as soon as the Redis server changes, rather
    /// than at the next purchase: a restart, failover or restore gives it a new
    /// `run_id`.
    pub async fn watch_redis(self, shutdown: tokio_util::sync::CancellationToken) {
        let mut known: Option<String> = None;
        loop {
            match self.redis_run_id().await {
                Ok(run_id) if known.as_ref() != Some(&run_id) => match self.recover().await {
                    Ok(()) => known = Some(run_id),
                    Err(e) => tracing::warn!(error = %e, "recovering a new Redis failed"),
                },
                Ok(_) => {}
                Err(e) => tracing::debug!(error = %e, "Redis run_id check failed"),
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(RUN_ID_CHECK_EVERY) => {}
            }
        }
    }
}

/// The idempotency record of a sale, as `lua/purchase.lua` writes it.
fn sale_record(quantity: i16, seats_remaining: i64, purchase_id: Uuid) -> String {
    format!("S{quantity}:{seats_remaining}:{}", purchase_id.simple())
}

/// Parses a record written by `lua/purchase.lua` into its quantity and outcome.
fn parse_record(record: &str) -> Result<(u8, Outcome)> {
    let bad = || Error::UnexpectedReply(format!("idempotency record {record:?}"));
    let (kind, rest) = record.split_at_checked(1).ok_or_else(bad)?;
    match kind {
        "X" => Ok((rest.parse().map_err(|_| bad())?, Outcome::SoldOut)),
        "S" => {
            let mut parts = rest.splitn(3, ':');
            let mut next = || parts.next().ok_or_else(bad);
            let quantity = next()?.parse().map_err(|_| bad())?;
            let seats_remaining = next()?.parse().map_err(|_| bad())?;
            let purchase_id = next()?.parse().map_err(|_| bad())?;
            Ok((
                quantity,
                Outcome::Sold(Sale {
                    purchase_id,
                    quantity,
                    seats_remaining,
                }),
            ))
        }
        _ => Err(bad()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_records() {
        let id = Uuid::now_v7();
        assert_eq!(parse_record("X3").unwrap(), (3, Outcome::SoldOut));
        assert_eq!(
            parse_record(&format!("S2:998:{}", id.simple())).unwrap(),
            (
                2,
                Outcome::Sold(Sale {
                    purchase_id: id,
                    quantity: 2,
                    seats_remaining: 998
                })
            )
        );
        assert!(parse_record("").is_err());
        assert!(parse_record("S2:x:y").is_err());
        assert!(parse_record("Q1").is_err());
        assert_eq!(
            parse_record(&sale_record(2, 998, id)).unwrap(),
            parse_record(&format!("S2:998:{}", id.simple())).unwrap()
        );
    }
}
