//! The gate: one Lua script in Redis decides every seat movement (`lua/purchase.lua`):
//! purchases, holds and their confirmation or release, cancellations, and the expiry
//! of holds. This module calls it and reads seat counts and holds.
//!
//! Purchases run over one multiplexed connection (`ConnectionManager`) shared by all
//! requests. Purchases of one event that arrive while a call for it is in flight
//! share the next call (see [`crate::batch`]); calls for different events pipeline
//! instead of each waiting for a pooled connection's round trip.
//!
//! The script sells only from an event that was checked against PostgreSQL on the
//! Redis server process now answering (see [`crate::recovery`]); otherwise it answers
//! `recover`, and the gate has the event brought back before trying once more.

use std::time::{Duration, Instant};

use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::streams::StreamRangeReply;
use redis::{
    AsyncCommands, Cmd, ErrorKind, FromRedisValue, RedisWrite, Script, ServerErrorKind, ToRedisArgs,
};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::batch::{Coalescer, Decide};
use crate::config::StoreConfig;
use crate::domain::{Buyer, IdempotencyKey, Quantity};
use crate::error::{Error, Result, redact_url};
use crate::keys::Keys;
use crate::records::{self, Entry, Logged, Record};
use crate::recovery::Recovery;

/// Most expired holds one call of the gate script returns (`EXPIRE_PER_CALL` in
/// `lua/purchase.lua`).
const EXPIRE_PER_CALL: usize = 100;

/// Most stream entries [`Gate::unrecorded_sale`] reads.
const STREAM_LOOKUP: usize = 1_000;

/// Reconnect attempts of the shared connection before a command fails; kept low so a
/// request fails fast (503) instead of waiting out a Redis outage.
const RECONNECT_RETRIES: usize = 1;

/// What a purchase or hold request came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome<T = Sale> {
    /// Seats were sold (a purchase) or held (a hold).
    Done(T),
    /// Fewer seats are available than asked for; nothing was sold or held.
    SoldOut,
    /// The key was first used with another quantity, or for the other kind of
    /// request; nothing was done.
    KeyReused,
    /// The buyer's seats would exceed the event's limit; nothing was done.
    BuyerLimit,
    /// The event has a limit per buyer and the request named no verified buyer.
    BuyerRequired,
    /// The event is queued and the request carried no valid admission.
    AdmissionRequired,
}

/// A completed sale as the client sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sale {
    pub purchase_id: Uuid,
    pub quantity: u8,
    pub seats_remaining: i64,
}

/// A hold as its request was answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Held {
    pub hold_id: Uuid,
    pub quantity: u8,
    pub seats_remaining: i64,
    pub expires_at_ms: i64,
}

/// An outcome and whether it repeats one recorded earlier under the same key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision<T = Sale> {
    pub outcome: Outcome<T>,
    pub replayed: bool,
}

/// What confirming a hold came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Confirmation {
    /// The sale; `replayed` when the hold had been confirmed before.
    Sold { sale: Sale, replayed: bool },
    /// The hold expired or was released; nothing was sold.
    Ended(HoldState),
    /// No such hold (never made, or forgotten since).
    NotFound,
}

/// What releasing a hold came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Release {
    /// Its seats are on sale again (now, or by an earlier release or its expiry).
    Released,
    /// It was confirmed: the sale stands (cancel it instead).
    Confirmed,
    NotFound,
}

/// What cancelling a sale came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cancelled {
    /// When the sale was cancelled, Unix microseconds (by this request or an earlier one).
    pub at_micros: i64,
    pub replayed: bool,
}

/// The states a hold moves through, only forward.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HoldState {
    Held,
    Confirmed,
    Released,
    Expired,
}

impl HoldState {
    fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "held" => HoldState::Held,
            "confirmed" => HoldState::Confirmed,
            "released" => HoldState::Released,
            "expired" => HoldState::Expired,
            _ => return None,
        })
    }
}

/// A hold as Redis has it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HoldView {
    pub hold_id: Uuid,
    pub state: HoldState,
    pub quantity: u8,
    pub created_at_ms: i64,
    pub expires_at_ms: i64,
    /// When it was confirmed, released or expired.
    pub ended_at_ms: Option<i64>,
    /// The sale's id once confirmed (the hold's own id).
    pub purchase_id: Option<Uuid>,
}

/// Seat counters of one event, straight from Redis.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Inventory {
    pub total: i64,
    pub sold: i64,
    /// Successful purchases (a purchase may hold up to 10 seats).
    pub purchases: i64,
    /// Purchases and holds refused (no seats, or over a buyer's limit).
    pub rejected: i64,
    /// Seats held by holds not yet confirmed, released or expired.
    pub held: i64,
}

impl Inventory {
    /// Seats that can still be bought or held.
    pub fn available(&self) -> i64 {
        self.total - self.sold - self.held
    }
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

/// One request as the script takes it (the layout is in `lua/purchase.lua`).
#[derive(Debug, Clone)]
pub enum Ask {
    Purchase {
        key: IdempotencyKey,
        quantity: Quantity,
        /// The id of the sale if one is made; unused when the key replays.
        purchase_id: Uuid,
        buyer: Option<Buyer>,
        /// Carries a valid admission token for `buyer` (queued events need one).
        admitted: bool,
    },
    Hold {
        key: IdempotencyKey,
        quantity: Quantity,
        hold_id: Uuid,
        buyer: Option<Buyer>,
        admitted: bool,
    },
    Confirm {
        hold_id: Uuid,
    },
    Release {
        hold_id: Uuid,
    },
    Cancel {
        purchase_id: Uuid,
        quantity: u8,
        /// The buyer the sale counts against, if any.
        buyer: Option<String>,
    },
}

impl Ask {
    /// A purchase without a buyer.
    pub fn purchase(key: IdempotencyKey, quantity: Quantity, purchase_id: Uuid) -> Self {
        Ask::Purchase {
            key,
            quantity,
            purchase_id,
            buyer: None,
            admitted: false,
        }
    }
}

/// What the script answered for one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// Decided by this call; a record, or what the operation answers.
    New(String),
    /// Decided before; what was answered then.
    Replay(String),
    /// The event is missing or not checked on this Redis server; nothing happened.
    Recover,
    /// Doing it would break an invariant of the counters; nothing happened.
    Invariant,
    /// Anything else the script answers for this kind of request (`T`, `E…`, `F`,
    /// `G`: see `lua/purchase.lua`).
    Other(String),
}

/// Runs the gate script: one call decides a batch of requests of one event.
#[derive(Clone)]
pub struct Seller {
    conn: ConnectionManager,
    keys: Keys,
    idempotency_ttl: u32,
    script: Script,
}

impl Seller {
    /// Decides `asks` of `event` in one call, in order, after returning expired holds.
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
            Some(("Z", "")) => Ok(Reply::Invariant),
            Some(_) => Ok(Reply::Other(line.to_owned())),
            None => Err(Error::UnexpectedReply(format!("gate script: {line:?}"))),
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
/// is in `lua/purchase.lua`): `EVALSHA`, to be sent with [`run_script`]. No asks: the
/// call only returns expired holds.
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
    let key_count: usize = asks
        .iter()
        .map(|ask| {
            if matches!(ask, Ask::Hold { .. }) {
                2
            } else {
                1
            }
        })
        .sum();
    cmd.arg(script.get_hash())
        .arg(4 + key_count)
        .arg(keys.inventory(event))
        .arg(keys.stream(event))
        .arg(keys.holds(event))
        .arg(keys.buyers(event));
    for ask in asks {
        match ask {
            Ask::Purchase { key, .. } => {
                cmd.arg(Formatted(keys.idempotency_name(event, key.as_str())));
            }
            Ask::Hold { key, hold_id, .. } => {
                cmd.arg(Formatted(keys.idempotency_name(event, key.as_str())))
                    .arg(Formatted(keys.hold_name(event, *hold_id)));
            }
            Ask::Confirm { hold_id } | Ask::Release { hold_id } => {
                cmd.arg(Formatted(keys.hold_name(event, *hold_id)));
            }
            Ask::Cancel { purchase_id, .. } => {
                cmd.arg(keys.cancellation(event, *purchase_id));
            }
        }
    }
    cmd.arg(idempotency_ttl);
    for ask in asks {
        match ask {
            Ask::Purchase {
                key,
                quantity,
                purchase_id: id,
                buyer,
                admitted,
            }
            | Ask::Hold {
                key,
                quantity,
                hold_id: id,
                buyer,
                admitted,
            } => {
                let op = if matches!(ask, Ask::Hold { .. }) {
                    'H'
                } else {
                    'P'
                };
                cmd.arg(Formatted(format_args!("{op}{}", quantity.get())))
                    .arg(Formatted(records::purchase_id_arg(*id)))
                    .arg(key.as_str())
                    .arg(buyer.as_ref().map_or("", Buyer::as_str))
                    .arg(if *admitted { "1" } else { "" });
            }
            Ask::Confirm { hold_id } => {
                cmd.arg("C")
                    .arg(Formatted(records::purchase_id_arg(*hold_id)));
            }
            Ask::Release { hold_id } => {
                cmd.arg("D")
                    .arg(Formatted(records::purchase_id_arg(*hold_id)));
            }
            Ask::Cancel {
                purchase_id,
                quantity,
                buyer,
            } => {
                cmd.arg(Formatted(format_args!("K{quantity}")))
                    .arg(Formatted(records::purchase_id_arg(*purchase_id)))
                    .arg(buyer.as_deref().unwrap_or(""));
            }
        }
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

    /// The waiting rooms, on the same connection.
    pub fn queue(&self) -> crate::queue::Queue {
        crate::queue::Queue::new(self.seller.conn.clone(), self.seller.keys.clone())
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
        buyer: Option<&Buyer>,
        admitted: bool,
    ) -> Result<Decision> {
        let purchase_id = Uuid::now_v7();
        let reply = self
            .decide_on_sale(event, || Ask::Purchase {
                key: key.clone(),
                quantity,
                purchase_id,
                buyer: buyer.cloned(),
                admitted,
            })
            .await?;
        decision(reply, quantity, |record| match record {
            Record::Refused { .. } => Some(Outcome::SoldOut),
            Record::OverLimit { .. } => Some(Outcome::BuyerLimit),
            sold => sale(sold).map(Outcome::Done),
        })
    }

    /// Holds `quantity` seats of `event` for the event's hold time under `key`, or
    /// replays what that key got before.
    pub async fn hold(
        &self,
        event: Uuid,
        key: &IdempotencyKey,
        quantity: Quantity,
        buyer: Option<&Buyer>,
        admitted: bool,
    ) -> Result<Decision<Held>> {
        let hold_id = Uuid::now_v7();
        let reply = self
            .decide_on_sale(event, || Ask::Hold {
                key: key.clone(),
                quantity,
                hold_id,
                buyer: buyer.cloned(),
                admitted,
            })
            .await?;
        decision(reply, quantity, |record| match record {
            Record::Held {
                quantity,
                seats_remaining,
                hold_id,
                expires_at_ms,
            } => Some(Outcome::Done(Held {
                hold_id,
                quantity,
                seats_remaining,
                expires_at_ms,
            })),
            Record::HoldRefused { .. } => Some(Outcome::SoldOut),
            Record::HoldOverLimit { .. } => Some(Outcome::BuyerLimit),
            _ => None,
        })
    }

    /// Turns a hold into a sale, unless it expired or was released; a repeat returns
    /// the same sale.
    pub async fn confirm(&self, event: Uuid, hold_id: Uuid) -> Result<Confirmation> {
        let reply = self
            .decide_on_sale(event, || Ask::Confirm { hold_id })
            .await?;
        let sold = |record: &str, replayed| {
            Record::parse(record)
                .and_then(sale)
                .map(|sale| Confirmation::Sold { sale, replayed })
                .ok_or_else(|| unexpected("confirmation", record))
        };
        match reply {
            Reply::New(record) => sold(&record, false),
            Reply::Replay(record) => sold(&record, true),
            Reply::Other(line) if line == "G" => Ok(Confirmation::NotFound),
            Reply::Other(line) => line
                .strip_prefix('E')
                .and_then(HoldState::parse)
                .map(Confirmation::Ended)
                .ok_or_else(|| unexpected("confirmation", &line)),
            Reply::Recover | Reply::Invariant => Err(Error::RecoveryPending(server_changed())),
        }
    }

    /// Returns a hold's seats to stock at once; idempotent.
    pub async fn release(&self, event: Uuid, hold_id: Uuid) -> Result<Release> {
        match self
            .decide_on_sale(event, || Ask::Release { hold_id })
            .await?
        {
            Reply::New(_) | Reply::Replay(_) => Ok(Release::Released),
            Reply::Other(line) if line == "F" => Ok(Release::Confirmed),
            Reply::Other(line) if line == "G" => Ok(Release::NotFound),
            Reply::Other(line) => Err(unexpected("release", &line)),
            Reply::Recover | Reply::Invariant => Err(Error::RecoveryPending(server_changed())),
        }
    }

    /// Returns the seats of a sale to stock (and to its buyer's allowance), once:
    /// a repeat answers with the first cancellation's time.
    pub async fn cancel(
        &self,
        event: Uuid,
        purchase_id: Uuid,
        quantity: u8,
        buyer: Option<&str>,
    ) -> Result<Cancelled> {
        let reply = self
            .decide_on_sale(event, || Ask::Cancel {
                purchase_id,
                quantity,
                buyer: buyer.map(str::to_owned),
            })
            .await?;
        let (micros, replayed) = match reply {
            Reply::New(micros) => (micros, false),
            Reply::Replay(micros) => (micros, true),
            Reply::Other(line) => return Err(unexpected("cancellation", &line)),
            Reply::Recover | Reply::Invariant => {
                return Err(Error::RecoveryPending(server_changed()));
            }
        };
        let at_micros = micros
            .parse()
            .map_err(|_| unexpected("cancellation", &micros))?;
        Ok(Cancelled {
            at_micros,
            replayed,
        })
    }

    /// Returns the expired holds of `event` to stock; the sweeper's call, for events
    /// no request comes for. Returns how many it returned (at most a bounded number
    /// per call: call again while it returns that many).
    pub async fn sweep(&self, event: Uuid) -> Result<usize> {
        let call = invocation(&self.seller.script, self.keys(), 1, event, &[]);
        let returned: String =
            run_script(&self.seller.script, &call, &mut self.seller.conn.clone()).await?;
        returned.parse().map_err(|_| unexpected("sweep", &returned))
    }

    /// Every `every`, returns the expired holds of every event in Redis, so that seat
    /// counts show them back within that time even when no request for the event
    /// comes (requests return them first anyway). Each replica sweeps; a sweep finds
    /// what another already returned gone, so they never return seats twice.
    pub async fn sweep_holds(self, every: Duration, shutdown: CancellationToken) {
        loop {
            if let Err(e) = self.sweep_all().await {
                tracing::debug!(error = %e, "sweeping expired holds failed");
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(every) => {}
            }
        }
    }

    /// One sweep: one pipelined call per event, then more for events that had more
    /// expired holds than one call returns.
    async fn sweep_all(&self) -> Result<usize> {
        let mut conn = self.seller.conn.clone();
        let ids: Vec<String> = conn.smembers(self.keys().events()).await?;
        let events: Vec<Uuid> = ids.iter().filter_map(|id| id.parse().ok()).collect();
        let mut pipe = redis::pipe();
        for event in &events {
            pipe.add_command(invocation(&self.seller.script, self.keys(), 1, *event, &[]));
        }
        let counts: Vec<String> = match pipe.query_async(&mut conn).await {
            Err(e) if e.kind() == ErrorKind::Server(ServerErrorKind::NoScript) => {
                self.seller.script.load_async(&mut conn).await?;
                pipe.query_async(&mut conn).await?
            }
            counts => counts?,
        };
        let mut returned = 0;
        for (event, count) in events.iter().zip(counts) {
            let mut count: usize = count.parse().map_err(|_| unexpected("sweep", &count))?;
            returned += count;
            while count >= EXPIRE_PER_CALL {
                count = self.sweep(*event).await?;
                returned += count;
            }
        }
        if returned > 0 {
            crate::metrics::holds_expired(returned);
        }
        Ok(returned)
    }

    /// A sale still in `event`'s stream on its way to PostgreSQL (moments, unless
    /// PostgreSQL is down), found among the entries written from a minute before its
    /// id's time on (a purchase id is a UUID v7 made just before the sale; a hold's,
    /// before its confirmation). Looks at most [`STREAM_LOOKUP`] entries.
    pub async fn unrecorded_sale(&self, event: Uuid, purchase: Uuid) -> Result<Option<Entry>> {
        let Some((secs, _)) = purchase.get_timestamp().map(|t| t.to_unix()) else {
            return Ok(None);
        };
        let from_ms = (secs * 1000).saturating_sub(60_000);
        let page: StreamRangeReply = self
            .seller
            .conn
            .clone()
            .xrange_count(self.keys().stream(event), from_ms, "+", STREAM_LOOKUP)
            .await?;
        Ok(page
            .ids
            .iter()
            .find_map(|entry| match Logged::from_stream(entry) {
                Some(Logged::Sale(sale)) if sale.id == purchase => Some(sale),
                _ => None,
            }))
    }

    /// A hold as Redis has it once the event is checked on this server; `None` if it
    /// has no such hold (never made, forgotten after its retention, or lost with
    /// Redis' data before it reached PostgreSQL).
    pub async fn hold_state(&self, event: Uuid, hold_id: Uuid) -> Result<Option<HoldView>> {
        // Before a recovery, the hash may be from an older point in time.
        self.inventory(event).await?;
        let (fields, (secs, micros)): (Vec<Option<String>>, (i64, i64)) = redis::pipe()
            .cmd("HMGET")
            .arg(self.keys().hold(event, hold_id))
            .arg(&["s", "q", "c", "x", "e"])
            .cmd("TIME")
            .query_async(&mut self.seller.conn.clone())
            .await?;
        let now_ms = secs * 1000 + micros / 1000;
        let [
            Some(state),
            Some(quantity),
            Some(created),
            Some(expires),
            ended,
        ] = &fields[..]
        else {
            return Ok(None);
        };
        let bad = || unexpected("hold", &format!("{fields:?}"));
        let number = |s: &str| s.parse::<i64>().map_err(|_| bad());
        let expires_at_ms = number(expires)?;
        let mut state = HoldState::parse(state).ok_or_else(bad)?;
        let mut ended_at_ms = ended.as_deref().map(number).transpose()?;
        // A sweep returns a hold's seats without writing its hash (see the script).
        if state == HoldState::Held && now_ms >= expires_at_ms {
            state = HoldState::Expired;
            ended_at_ms = Some(expires_at_ms);
        }
        Ok(Some(HoldView {
            hold_id,
            state,
            quantity: quantity.parse().map_err(|_| bad())?,
            created_at_ms: number(created)?,
            expires_at_ms,
            ended_at_ms,
            purchase_id: (state == HoldState::Confirmed).then_some(hold_id),
        }))
    }

    /// Has the script decide one request; when the event must be recovered first,
    /// recovers it and asks once more (`ask` builds the request again).
    async fn decide_on_sale(&self, event: Uuid, ask: impl Fn() -> Ask) -> Result<Reply> {
        let reply = match self.decide(event, ask()).await? {
            Reply::Recover => {
                self.recovery.ensure(event).await?;
                self.decide(event, ask()).await?
            }
            reply => reply,
        };
        match reply {
            Reply::Invariant => Err(Error::InvariantBroken(event)),
            reply => Ok(reply),
        }
    }

    /// Has the script decide one request: in the event's next batch, or in a call of
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

/// The outcome of a purchase or hold from the script's reply: `kind` reads the
/// records of the request's own kind; any other record under the key means the key
/// was used for the other kind of request.
/// The sale a record tells of, whether a purchase or a hold's confirmation made it.
fn sale(record: Record) -> Option<Sale> {
    match record {
        Record::Sold {
            quantity,
            seats_remaining,
            purchase_id,
        } => Some(Sale {
            purchase_id,
            quantity,
            seats_remaining,
        }),
        _ => None,
    }
}

fn decision<T>(
    reply: Reply,
    quantity: Quantity,
    kind: impl FnOnce(Record) -> Option<Outcome<T>>,
) -> Result<Decision<T>> {
    let (record, replayed) = match reply {
        Reply::New(record) => (record, false),
        Reply::Replay(record) => (record, true),
        Reply::Other(line) if line == "T" || line == "A" => {
            let outcome = if line == "T" {
                Outcome::BuyerRequired
            } else {
                Outcome::AdmissionRequired
            };
            return Ok(Decision {
                outcome,
                replayed: false,
            });
        }
        Reply::Other(line) => return Err(unexpected("request", &line)),
        Reply::Recover | Reply::Invariant => {
            return Err(Error::RecoveryPending(server_changed()));
        }
    };
    let parsed = Record::parse(&record).ok_or_else(|| unexpected("idempotency record", &record))?;
    let outcome = if parsed.quantity() != quantity.get() {
        Outcome::KeyReused
    } else {
        kind(parsed).unwrap_or(Outcome::KeyReused)
    };
    Ok(Decision { outcome, replayed })
}

fn unexpected(what: &str, reply: &str) -> Error {
    Error::UnexpectedReply(format!("{what}: {reply:?}"))
}

fn server_changed() -> String {
    "the Redis server changed while the event was being checked".into()
}
