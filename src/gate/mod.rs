//! The gate: one Lua script in Redis decides every seat movement (`lua/purchase.lua`):
//! purchases, holds and their confirmation or release, cancellations, and the expiry
//! of holds. This module calls it and reads seat counts and holds.
//!
//! Purchases run over one multiplexed connection (`store::Redis`) shared by all
//! requests. Purchases of one event that arrive while a call for it is in flight
//! share the next call (see [`batch`]); calls for different events pipeline
//! instead of each waiting for a pooled connection's round trip.
//!
//! The script sells only from an event that was checked against PostgreSQL on the
//! Redis server process now answering (see [`recovery`]); otherwise it answers
//! `recover`, and the gate has the event brought back before trying once more.

//!
//! | module | what |
//! | --- | --- |
//! | [`outcome`] | what each operation comes to, and an event's counters |
//! | [`script`] | the Rust half of the script protocol |
//! | [`batch`] | purchases of one event that arrive together share one call |
//! | `sweeper` | expired holds returned for events no request comes for |
//! | `reads` | reads that need no script: counters, a hold, a sale on its way |
//! | [`recovery`] | the one way an event's state comes (back) into Redis |
//! | [`retention`] | how long what a retry needs is kept |

pub mod batch;
pub mod memory;
pub mod outcome;
mod reads;
pub mod recovery;
pub mod retention;
pub mod script;
mod sweeper;

use std::time::Duration;

use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::config::StoreConfig;
use crate::error::{Error, Result};
use crate::keys::Keys;
use crate::records::Record;
use crate::store::Redis;
use batch::Coalescer;
pub use outcome::{
    Cancelled, Confirmation, Decision, Held, HoldState, HoldView, Inventory, Outcome, Release, Sale,
};
use recovery::Recovery;
use retention::Retention;
pub use script::Claim;
use script::{Ask, Reply, Seller, decision, sale, server_changed, unexpected};

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
    memory: memory::Memory,
}

impl Gate {
    pub async fn connect(store: &StoreConfig, db: PgPool) -> Result<Self> {
        let conn = Redis::connect(store).await?;
        let keys = Keys::new(store.key_prefix.clone());
        let retention = Retention::new(store.idempotency_ttl, store.ended_hold_ttl);
        if retention.ended_hold_secs() < store.ended_hold_ttl {
            tracing::warn!(
                ended_hold_ttl = store.ended_hold_ttl,
                idempotency_ttl = store.idempotency_ttl,
                "BOXOFFICE_ENDED_HOLD_TTL is above BOXOFFICE_IDEMPOTENCY_TTL: ended holds are \
                 kept as long as sales"
            );
        }
        let seller = Seller {
            conn: conn.clone(),
            keys: keys.clone(),
            retention,
            script: script::script(),
            replicas: crate::store::Replicas {
                acks: store.redis_replica_acks,
                // Within the command timeout, so that the answer is Redis' count of
                // replicas rather than a timeout of the connection.
                timeout_ms: (store.redis_timeout_ms / 2).max(1),
            },
        };
        Ok(Self {
            recovery: Recovery::new(conn, db, keys, retention, seller.replicas),
            memory: memory::Memory::new(store.redis_memory_share),
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

    /// Creates an event: its row in PostgreSQL, then its state in Redis, in that
    /// order so that Redis never sells an event PostgreSQL lacks. The API and the
    /// command line both create events here.
    pub async fn create_event(
        &self,
        db: &PgPool,
        name: &str,
        settings: crate::db::EventSettings,
    ) -> Result<crate::db::EventRow> {
        let row = crate::db::create_event(db, name, settings).await?;
        self.recovery
            .ensure_event(&row, recovery::Mode::Check)
            .await?;
        Ok(row)
    }

    /// The one way an event's state comes (back) into Redis.
    pub fn recovery(&self) -> &Recovery {
        &self.recovery
    }

    /// Redis' memory as last read, and the share above which anonymous claims wait.
    pub fn memory(&self) -> &memory::Memory {
        &self.memory
    }

    /// Reads Redis' memory every `every` until shutdown (see [`memory`]).
    pub async fn watch_memory(self, every: Duration, stop: CancellationToken) {
        let conn = self.seller.conn.clone();
        self.memory.watch(conn, every, stop).await
    }

    /// Whether a purchase or hold may go to Redis: an anonymous one with a key not
    /// answered before waits while Redis is fuller than the configured share, so
    /// that buyers with tokens and the ends of holds still find room; past halfway
    /// to the limit, one with a token waits too (see [`memory`]). A key that sold or
    /// held before is let through to be replayed, which writes nothing. The one check
    /// both take.
    async fn admit(&self, event: Uuid, claim: &Claim) -> Result<()> {
        let Some(full) = self.memory.full() else {
            return Ok(());
        };
        if claim.buyer.is_some() && !full.critical {
            return Ok(());
        }
        let record = self.keys().idempotency(event, claim.key.as_str());
        let stored: Option<String> =
            redis::AsyncCommands::get(&mut self.seller.conn.clone(), record).await?;
        if Record::kept(stored.as_deref()) {
            return Ok(());
        }
        Err(Error::RedisNearlyFull {
            used: full.used,
            max: full.max,
        })
    }

    /// Sells the claimed seats of `event`, or replays what the claim's key got before.
    pub async fn purchase(&self, event: Uuid, claim: &Claim) -> Result<Decision> {
        self.admit(event, claim).await?;
        let purchase_id = Uuid::now_v7();
        let reply = self
            .decide_on_sale(event, || Ask::Purchase {
                claim: claim.clone(),
                purchase_id,
            })
            .await?;
        decision(reply, claim.quantity, |record| match record {
            Record::Refused { .. } => Some(Outcome::SoldOut),
            Record::OverLimit { .. } => Some(Outcome::BuyerLimit),
            sold => sale(sold).map(Outcome::Done),
        })
    }

    /// Holds the claimed seats of `event` for the event's hold time, or replays what
    /// the claim's key got before.
    pub async fn hold(&self, event: Uuid, claim: &Claim) -> Result<Decision<Held>> {
        self.admit(event, claim).await?;
        let hold_id = Uuid::now_v7();
        let reply = self
            .decide_on_sale(event, || Ask::Hold {
                claim: claim.clone(),
                hold_id,
            })
            .await?;
        decision(reply, claim.quantity, |record| match record {
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
        let reply = self.end_hold(event, hold_id, true).await?;
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
        match self.end_hold(event, hold_id, false).await? {
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

    /// Has the script confirm (or release) a hold. The call names the record of the
    /// hold's request, which moves with the hold (`retention`), so that the script
    /// writes no key it was not given (on a cluster, one could be mid-migration): the
    /// request's key is read from the hold first. A hold that came back since (a
    /// recovery) may carry another; the script then does nothing and answers 'W'.
    async fn end_hold(&self, event: Uuid, hold_id: Uuid, confirm: bool) -> Result<Reply> {
        for _ in 0..2 {
            let client_key = self.hold_request_key(event, hold_id).await?;
            let ask = || match confirm {
                true => Ask::Confirm {
                    hold_id,
                    client_key: client_key.clone(),
                },
                false => Ask::Release {
                    hold_id,
                    client_key: client_key.clone(),
                },
            };
            match self.decide_on_sale(event, ask).await? {
                Reply::Other(line) if line == "W" => continue,
                reply => return Ok(reply),
            }
        }
        Err(unexpected("hold", "W twice"))
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
}
