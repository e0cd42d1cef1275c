//! The purchase gate: one Lua script in Redis decides every sale (see
//! `lua/purchase.lua`), and this module calls it, loads events into Redis from
//! PostgreSQL when they are missing there, and reads seat counts.
//!
//! Purchases run over one multiplexed connection (`ConnectionManager`) shared by all
//! requests, so concurrent scripts pipeline instead of each waiting for a pooled
//! connection's round trip.

use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{AsyncCommands, Script};
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
        let reply = self
            .purchase
            .key(self.keys.inventory(event))
            .key(self.keys.idempotency(event, key.as_str()))
            .key(self.keys.stream(event))
            .arg(quantity.get())
            // 32 hex digits, not the 36-character hyphenated form: it keeps the whole
            // record within 44 bytes, which Redis stores inline with its object header.
            .arg(Uuid::now_v7().simple().to_string())
            .arg(self.idempotency_ttl)
            .arg(key.as_str())
            .invoke_async(&mut self.conn.clone())
            .await;
        metrics::histogram!("boxoffice_redis_script_duration_seconds")
            .record(started.elapsed().as_secs_f64());
        Ok(reply?)
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

    async fn load_from_db(&self, event: Uuid) -> Result<()> {
        let row = db::event(&self.db, event)
            .await?
            .ok_or(Error::EventNotFound(event))?;
        self.load(&row).await
    }

    /// Puts `event` into Redis, or raises its `sold` counter to what PostgreSQL holds.
    pub async fn load(&self, event: &EventRow) -> Result<()> {
        let persisted = db::seats_sold(&self.db, event.id).await?;
        let mut conn = self.conn.clone();
        let (created, raised): (i64, i64) = self
            .load_event
            .key(self.keys.inventory(event.id))
            .key(self.keys.stream(event.id))
            .arg(event.total_seats)
            .arg(persisted)
            .arg(CONSUMER_GROUP)
            .invoke_async(&mut conn)
            .await?;
        // The consumer finds streams through this set; a set outside the event's hash
        // slot cannot be written by the script on a cluster, hence the second command.
        let _: () = conn.sadd(self.keys.events(), event.id.to_string()).await?;
        if created == 1 {
            tracing::info!(event = %event.id, persisted, "loaded event into Redis");
        }
        if raised > 0 {
            tracing::warn!(
                event = %event.id, raised,
                "Redis had fewer seats sold than PostgreSQL (restored from an older snapshot?); raised it"
            );
        }
        Ok(())
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

    /// Reloads every event whenever the Redis server changes (a restart, failover or
    /// restore gives it a new `run_id`): an empty Redis gets its events back, and an
    /// older snapshot gets its `sold` counters raised before it sells seats twice.
    pub async fn watch_redis(self, shutdown: tokio_util::sync::CancellationToken) {
        let mut known: Option<String> = None;
        loop {
            match self.redis_run_id().await {
                Ok(run_id) if known.as_ref() != Some(&run_id) => match self.load_all().await {
                    Ok(()) => {
                        if known.is_some() {
                            tracing::warn!(%run_id, "Redis server changed; events reloaded");
                        }
                        known = Some(run_id);
                    }
                    Err(e) => tracing::warn!(error = %e, "reloading events into Redis failed"),
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
    }
}
