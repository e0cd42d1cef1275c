//! The purchase gate: one Lua script in Redis decides every sale (`lua/purchase.lua`),
//! and this module calls it and reads seat counts.
//!
//! Purchases run over one multiplexed connection (`ConnectionManager`) shared by all
//! requests, so concurrent scripts pipeline instead of each waiting for a pooled
//! connection's round trip.
//!
//! The script sells only from an event that was checked against PostgreSQL on the
//! Redis server process now answering (see [`crate::recovery`]); otherwise it answers
//! `recover`, and the gate has the event brought back before trying once more.

use std::time::Instant;

use redis::Script;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use sqlx::PgPool;
use uuid::Uuid;

use crate::config::StoreConfig;
use crate::domain::{IdempotencyKey, Quantity};
use crate::error::{Error, Result, redact_url};
use crate::keys::Keys;
use crate::records::{self, Record};
use crate::recovery::Recovery;

/// Reconnect attempts of the shared connection before a command fails; kept low so a
/// request fails fast (503) instead of waiting out a Redis outage.
const RECONNECT_RETRIES: usize = 1;

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

/// The Redis side of selling: the scripts, the shared connection, and the recovery
/// that every event passes before it sells.
#[derive(Clone)]
pub struct Gate {
    conn: ConnectionManager,
    keys: Keys,
    idempotency_ttl: u32,
    purchase: Script,
    recovery: Recovery,
}

/// What the purchase script answered.
enum Reply {
    New(String),
    Replay(String),
    /// The event is missing or not checked on this Redis server; nothing happened.
    Recover,
}

impl Gate {
    pub async fn connect(store: &StoreConfig, db: PgPool) -> Result<Self> {
        let unreachable = |e: redis::RedisError| {
            Error::Startup(format!(
                "cannot reach Redis at {} ({e}); start it or set REDIS_URL",
                redact_url(&store.redis_url)
            ))
        };
        let client = redis::Client::open(store.redis_url.as_str()).map_err(unreachable)?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(store.redis_timeout()))
            .set_response_timeout(Some(store.redis_timeout()))
            .set_number_of_retries(RECONNECT_RETRIES);
        let conn = ConnectionManager::new_with_config(client, config)
            .await
            .map_err(unreachable)?;
        let keys = Keys::new(store.key_prefix.clone());
        Ok(Self {
            recovery: Recovery::new(conn.clone(), db, keys.clone(), store.idempotency_ttl),
            conn,
            keys,
            idempotency_ttl: store.idempotency_ttl,
            purchase: crate::lua_script!("purchase.lua"),
        })
    }

    pub fn keys(&self) -> &Keys {
        &self.keys
    }

    /// The one way an event's state comes (back) into Redis.
    pub fn recovery(&self) -> &Recovery {
        &self.recovery
    }

    /// Sells `quantity` seats of `event` under `key`, or replays what that key got before.
    pub async fn purchase(
        &self,
        event: Uuid,
        key: &IdempotencyKey,
        quantity: Quantity,
    ) -> Result<Decision> {
        let reply = match self.run_purchase(event, key, quantity).await? {
            Reply::Recover => {
                self.recovery.ensure(event).await?;
                self.run_purchase(event, key, quantity).await?
            }
            reply => reply,
        };
        let (record, replayed) = match reply {
            Reply::New(record) => (record, false),
            Reply::Replay(record) => (record, true),
            Reply::Recover => return Err(Error::RecoveryPending(server_changed())),
        };
        let record = Record::parse(&record)
            .ok_or_else(|| Error::UnexpectedReply(format!("idempotency record {record:?}")))?;
        let outcome = match record {
            _ if record.quantity() != quantity.get() => Outcome::KeyReused,
            Record::Refused { .. } => Outcome::SoldOut,
            Record::Sold {
                quantity,
                seats_remaining,
                purchase_id,
            } => Outcome::Sold(Sale {
                purchase_id,
                quantity,
                seats_remaining,
            }),
        };
        Ok(Decision { outcome, replayed })
    }

    async fn run_purchase(
        &self,
        event: Uuid,
        key: &IdempotencyKey,
        quantity: Quantity,
    ) -> Result<Reply> {
        let started = Instant::now();
        let (kind, record): (String, String) = self
            .purchase
            .key(self.keys.inventory(event))
            .key(self.keys.idempotency(event, key.as_str()))
            .key(self.keys.stream(event))
            .arg(quantity.get())
            .arg(records::purchase_id_arg(Uuid::now_v7()))
            .arg(self.idempotency_ttl)
            .arg(key.as_str())
            .invoke_async(&mut self.conn.clone())
            .await?;
        crate::metrics::script_run(started.elapsed());
        match kind.as_str() {
            "new" => Ok(Reply::New(record)),
            "replay" => Ok(Reply::Replay(record)),
            "recover" => Ok(Reply::Recover),
            _ => Err(Error::UnexpectedReply(format!("{kind} {record}"))),
        }
    }

    /// Seat counters of `event`, bringing it back first when Redis lacks it or has
    /// not had it checked (its counters could be behind).
    pub async fn inventory(&self, event: Uuid) -> Result<Inventory> {
        if let Some(inventory) = self.recovery.counters(event).await? {
            return Ok(inventory);
        }
        self.recovery.ensure(event).await?;
        self.recovery
            .counters(event)
            .await?
            .ok_or_else(|| Error::RecoveryPending(server_changed()))
    }
}

fn server_changed() -> String {
    "the Redis server changed while the event was being checked".into()
}
