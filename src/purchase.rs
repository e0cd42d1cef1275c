//! The purchase gate: one Lua script in Redis decides every sale (`lua/purchase.lua`),
//! and this module calls it and reads seat counts.
//!
//! Purchases run over one multiplexed connection (`ConnectionManager`) shared by all
//! requests. Purchases of one event that arrive while a call for it is in flight
//! share the next call (see [`crate::batch`]); calls for different events pipeline
//! instead of each waiting for a pooled connection's round trip.
//!
//! The script sells only from an event that was checked against PostgreSQL on the
//! Redis server process now answering (see [`crate::recovery`]); otherwise it answers
//! `recover`, and the gate has the event brought back before trying once more.

use std::time::Instant;

use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::{Cmd, ErrorKind, FromRedisValue, RedisWrite, Script, ServerErrorKind, ToRedisArgs};
use sqlx::PgPool;
use uuid::Uuid;

use crate::batch::{Coalescer, Decide};
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

/// The Redis side of selling: the script and the shared connection, the coalescer
/// that batches purchases of one event, and the recovery that every event passes
/// before it sells.
#[derive(Clone)]
pub struct Gate {
    seller: Seller,
    /// `None` when a call carries one purchase (`BOXOFFICE_PURCHASE_BATCH=1`): every
    /// request then sends its own call at once, and calls pipeline on the connection.
    coalescer: Option<Coalescer<Seller>>,
    recovery: Recovery,
}

/// One purchase as the script takes it.
#[derive(Debug, Clone)]
pub struct Ask {
    pub key: IdempotencyKey,
    pub quantity: Quantity,
    /// The id of the sale if one is made; unused when the key replays.
    pub purchase_id: Uuid,
}

/// What the purchase script answered for one purchase.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    New(String),
    Replay(String),
    /// The event is missing or not checked on this Redis server; nothing happened.
    Recover,
}

/// Runs the purchase script: one call decides a batch of purchases of one event.
#[derive(Clone)]
pub struct Seller {
    conn: ConnectionManager,
    keys: Keys,
    idempotency_ttl: u32,
    script: Script,
}

impl Seller {
    /// Decides `asks` of `event` in one call, in order.
    pub async fn call(&self, event: Uuid, asks: &[Ask]) -> Result<Vec<Reply>> {
        crate::metrics::script_batch("purchase", asks.len());
        let started = Instant::now();
        let call = invocation(&self.script, &self.keys, self.idempotency_ttl, event, asks);
        let lines: String = run_script(&self.script, &call, &mut self.conn.clone()).await?;
        crate::metrics::script_run(started.elapsed());
        let replies = lines
            .split('\n')
            .map(Reply::parse)
            .collect::<Result<Vec<_>>>()?;
        if replies.len() != asks.len() {
            return Err(Error::UnexpectedReply(format!(
                "{} replies for {} purchases",
                replies.len(),
                asks.len()
            )));
        }
        Ok(replies)
    }
}

impl Reply {
    /// One line of the script's answer (the format is in `lua/purchase.lua`).
    fn parse(line: &str) -> Result<Self> {
        match line.split_at_checked(1) {
            Some(("N", record)) => Ok(Reply::New(record.to_owned())),
            Some(("R", record)) => Ok(Reply::Replay(record.to_owned())),
            Some(("C", "")) => Ok(Reply::Recover),
            _ => Err(Error::UnexpectedReply(format!("purchase script: {line:?}"))),
        }
    }
}

impl Decide for Seller {
    type Request = Ask;
    type Answer = Reply;

    async fn decide(&self, event: Uuid, asks: Vec<Ask>) -> Vec<Result<Reply>> {
        match self.call(event, &asks).await {
            Ok(replies) => replies.into_iter().map(Ok).collect(),
            // Every purchase of a failed call gets the error: none of them was
            // decided, or all were and the retries replay them.
            Err(e) => asks.iter().map(|_| Err(e.duplicate())).collect(),
        }
    }
}

/// The purchase script, `lua/purchase.lua`.
pub fn script() -> Script {
    crate::lua_script!("purchase.lua")
}

/// The call of `script` that decides `asks` of `event`, in order (the argument layout
/// is in `lua/purchase.lua`): `EVALSHA`, to be sent with [`run_script`].
///
/// Built as one command rather than a `ScriptInvocation`, which holds every key and
/// argument in an allocation of its own and copies them into a command on each call.
pub fn invocation(
    script: &Script,
    keys: &Keys,
    idempotency_ttl: u32,
    event: Uuid,
    asks: &[Ask],
) -> Cmd {
    let mut cmd = redis::cmd("EVALSHA");
    cmd.arg(script.get_hash())
        .arg(2 + asks.len())
        .arg(keys.inventory(event))
        .arg(keys.stream(event));
    for ask in asks {
        cmd.arg(Formatted(keys.idempotency_name(event, ask.key.as_str())));
    }
    cmd.arg(idempotency_ttl);
    for ask in asks {
        cmd.arg(ask.quantity.get())
            .arg(Formatted(records::purchase_id_arg(ask.purchase_id)))
            .arg(ask.key.as_str());
    }
    cmd
}

/// Sends `call` (an `EVALSHA` of `script`), loading the script first if Redis lacks it.
pub async fn run_script<T: FromRedisValue>(
    script: &Script,
    call: &Cmd,
    conn: &mut impl ConnectionLike,
) -> redis::RedisResult<T> {
    match call.query_async(conn).await {
        Err(e) if e.kind() == ErrorKind::Server(ServerErrorKind::NoScript) => {
            script.load_async(conn).await?;
            call.query_async(conn).await
        }
        result => result,
    }
}

/// An argument formatted straight into the command's buffer.
struct Formatted<T>(T);

impl<T: std::fmt::Display> ToRedisArgs for Formatted<T> {
    fn write_redis_args<W: ?Sized + RedisWrite>(&self, out: &mut W) {
        out.write_arg_fmt(&self.0);
    }
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
        let seller = Seller {
            conn: conn.clone(),
            keys: keys.clone(),
            idempotency_ttl: store.idempotency_ttl,
            script: script(),
        };
        Ok(Self {
            recovery: Recovery::new(conn, db, keys, store.idempotency_ttl),
            coalescer: (store.purchase_batch > 1)
                .then(|| Coalescer::new(seller.clone(), usize::from(store.purchase_batch))),
            seller,
        })
    }

    pub fn keys(&self) -> &Keys {
        &self.seller.keys
    }

    /// The script runner itself, for callers that decide a batch of their own.
    pub fn seller(&self) -> &Seller {
        &self.seller
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
        let purchase_id = Uuid::now_v7();
        let ask = || Ask {
            key: key.clone(),
            quantity,
            purchase_id,
        };
        let reply = match self.decide(event, ask()).await? {
            Reply::Recover => {
                self.recovery.ensure(event).await?;
                self.decide(event, ask()).await?
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

    /// Has the script decide one purchase: in the event's next batch, or in a call of
    /// its own when batching is off.
    async fn decide(&self, event: Uuid, ask: Ask) -> Result<Reply> {
        if let Some(coalescer) = &self.coalescer {
            return coalescer.submit(event, ask).await;
        }
        let mut replies = self.seller.call(event, std::slice::from_ref(&ask)).await?;
        replies
            .pop()
            .ok_or_else(|| Error::UnexpectedReply("no reply for the purchase".into()))
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
