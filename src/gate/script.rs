//! The Rust half of the gate script's protocol (`lua/purchase.lua`): a request as
//! the script takes it ([`Ask`]), one call that decides a batch of them
//! ([`Seller`]), the command built without copies ([`invocation`]), and what its
//! answers mean ([`Reply`], and `decision` for purchases and holds).

use std::time::Instant;

use redis::{Cmd, ErrorKind, FromRedisValue, RedisWrite, Script, ServerErrorKind, ToRedisArgs};
use uuid::Uuid;

use super::batch::Decide;
use super::outcome::{Decision, Outcome, Sale};
use super::retention::Retention;
use crate::domain::{Buyer, IdempotencyKey, Quantity};
use crate::error::{Error, Result};
use crate::keys::Keys;
use crate::records::{self, Record};
use crate::store::{Redis, Replicas};

/// What a purchase or a hold asks for: seats under an idempotency key, for a buyer.
#[derive(Debug, Clone)]
pub struct Claim {
    pub key: IdempotencyKey,
    pub quantity: Quantity,
    pub buyer: Option<Buyer>,
    /// Carries a valid admission token for `buyer` (queued events need one).
    pub admitted: bool,
}

/// One request as the script takes it (the layout is in `lua/purchase.lua`).
#[derive(Debug, Clone)]
pub enum Ask {
    Purchase {
        claim: Claim,
        /// The id of the sale if one is made; unused when the key replays.
        purchase_id: Uuid,
    },
    Hold {
        claim: Claim,
        /// The id of the hold if one is made; unused when the key replays.
        hold_id: Uuid,
    },
    /// `client_key`: the hold's request key as read from its hash ('' if none).
    Confirm {
        hold_id: Uuid,
        client_key: String,
    },
    Release {
        hold_id: Uuid,
        client_key: String,
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
            claim: Claim {
                key,
                quantity,
                buyer: None,
                admitted: false,
            },
            purchase_id,
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
    pub(super) conn: Redis,
    pub(super) keys: Keys,
    pub(super) retention: Retention,
    pub(super) script: Script,
    /// Replicas that must have a call's writes before it is answered, and how long
    /// to wait for them (`BOXOFFICE_REDIS_REPLICA_ACKS`).
    pub(super) replicas: Replicas,
}

impl Seller {
    /// A seller of its own on `redis_url`, outside any [`Gate`](super::Gate): for
    /// measuring the script alone (`rush ceiling`).
    pub async fn connect(redis_url: &str, keys: Keys, retention: Retention) -> Result<Self> {
        let conn = Redis::open(redis_url).await?;
        Ok(Self {
            conn,
            keys,
            retention,
            script: script(),
            replicas: Replicas {
                acks: 0,
                timeout_ms: 0,
            },
        })
    }

    /// Puts `event` on sale in this Redis alone, with `total` seats and no row in
    /// PostgreSQL behind it, marked as checked against this server the way recovery
    /// marks an event it restored. Only for measuring the script (`rush ceiling`): a
    /// real event is made with [`Gate::create_event`](super::Gate::create_event). An
    /// event Redis has already is refused, never reset.
    pub async fn stage_event(&self, event: Uuid, total: u64) -> Result<()> {
        let mut conn = self.conn.clone();
        let inventory = self.keys.inventory(event);
        let fresh: bool = redis::cmd("HSETNX")
            .arg(&inventory)
            .arg("total")
            .arg(total)
            .query_async(&mut conn)
            .await?;
        if !fresh {
            return Err(Error::Startup(format!(
                "event {event} exists in Redis already: only a new event is staged"
            )));
        }
        let run = conn.run_id_of(&inventory).await?;
        redis::cmd("HSET")
            .arg(&inventory)
            .arg(&[("sold", "0"), ("run", run.as_str())])
            .query_async::<()>(&mut conn)
            .await?;
        Ok(())
    }

    /// Decides `asks` of `event` in one call, in order, after returning expired holds.
    pub async fn call(&self, event: Uuid, asks: &[Ask]) -> Result<Vec<Reply>> {
        crate::metrics::script_batch("purchase", asks.len());
        let started = Instant::now();
        let call = invocation(&self.script, &self.keys, self.retention, event, asks);
        let inventory = self.keys.inventory(event);
        let mut conn = self.conn.clone();
        let lines: String = if self.replicas.acks == 0 {
            run_script(Call::One(&call), &mut conn, &inventory).await?
        } else {
            let mut acknowledged = redis::pipe();
            acknowledged.add_command(call).cmd("SET");
            // A write of this call's own: what it replays may have been written by
            // another connection, whose writes this one's `WAIT` does not count.
            acknowledged
                .arg(self.keys.replica_ack(event))
                .arg(1)
                .arg("PX")
                .arg(60_000)
                .ignore();
            self.replicas.append(&mut acknowledged);
            let (lines, acked): (String, i64) =
                run_script(Call::Piped(&acknowledged), &mut conn, &inventory).await?;
            self.replicas.check(acked)?;
            lines
        };
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
pub(super) fn script() -> Script {
    Script::new(CODE)
}

const CODE: &str = crate::lua_code!("purchase.lua");

/// Loads the gate script into the server holding `key`. (`Script::load_async` would
/// send it to every node of a cluster, and fail while any one is down.)
pub(super) async fn load_script(conn: &mut Redis, key: &str) -> Result<()> {
    let _: String = conn
        .on_server_of(key, redis::cmd("SCRIPT").arg("LOAD").arg(CODE))
        .await?;
    Ok(())
}

/// The call of `script` that decides `asks` of `event`, in order (the argument layout
/// is in `lua/purchase.lua`): `EVALSHA`, to be sent with [`run_script`]. No asks: the
/// call only returns expired holds.
///
/// Built as one command rather than a `ScriptInvocation`, which holds every key and
/// argument in an allocation of its own and copies them into a command on each call.
pub(super) fn invocation(
    script: &Script,
    keys: &Keys,
    retention: Retention,
    event: Uuid,
    asks: &[Ask],
) -> Cmd {
    let mut cmd = redis::cmd("EVALSHA");
    let key_count: usize = asks.iter().map(Ask::key_count).sum();
    cmd.arg(script.get_hash())
        .arg(4 + key_count)
        .arg(keys.inventory(event))
        .arg(keys.stream(event))
        .arg(keys.holds(event))
        .arg(keys.buyers(event));
    for ask in asks {
        ask.push_keys(&mut cmd, keys, event);
    }
    cmd.arg(retention.idempotency_secs())
        .arg(retention.ended_hold_secs());
    for ask in asks {
        ask.push_args(&mut cmd);
    }
    cmd
}

impl Ask {
    /// How many keys of its own the request passes (after the event's four).
    fn key_count(&self) -> usize {
        match self {
            Ask::Hold { .. } | Ask::Confirm { .. } | Ask::Release { .. } => 2,
            Ask::Purchase { .. } | Ask::Cancel { .. } => 1,
        }
    }

    /// Its keys, as the table in `lua/purchase.lua` lists them.
    fn push_keys(&self, cmd: &mut Cmd, keys: &Keys, event: Uuid) {
        match self {
            Ask::Purchase { claim, .. } => {
                cmd.arg(Formatted(keys.idempotency_name(event, claim.key.as_str())));
            }
            Ask::Hold { claim, hold_id } => {
                cmd.arg(Formatted(keys.idempotency_name(event, claim.key.as_str())))
                    .arg(Formatted(keys.hold_name(event, *hold_id)));
            }
            Ask::Confirm {
                hold_id,
                client_key,
            }
            | Ask::Release {
                hold_id,
                client_key,
            } => {
                cmd.arg(Formatted(keys.hold_name(event, *hold_id)))
                    .arg(Formatted(keys.idempotency_name(event, client_key)));
            }
            Ask::Cancel { purchase_id, .. } => {
                cmd.arg(keys.cancellation(event, *purchase_id));
            }
        }
    }

    /// Its arguments, as the table in `lua/purchase.lua` lists them.
    fn push_args(&self, cmd: &mut Cmd) {
        match self {
            Ask::Purchase {
                claim,
                purchase_id: id,
            }
            | Ask::Hold { claim, hold_id: id } => {
                let op = if matches!(self, Ask::Hold { .. }) {
                    'H'
                } else {
                    'P'
                };
                cmd.arg(Formatted(format_args!("{op}{}", claim.quantity.get())))
                    .arg(Formatted(records::purchase_id_arg(*id)))
                    .arg(claim.key.as_str())
                    .arg(claim.buyer.as_ref().map_or("", Buyer::as_str))
                    .arg(if claim.admitted { "1" } else { "" });
            }
            Ask::Confirm {
                hold_id,
                client_key,
            }
            | Ask::Release {
                hold_id,
                client_key,
            } => {
                let op = if matches!(self, Ask::Confirm { .. }) {
                    "C"
                } else {
                    "D"
                };
                cmd.arg(op)
                    .arg(Formatted(records::purchase_id_arg(*hold_id)))
                    .arg(client_key.as_str());
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
}

/// A call of the gate script as sent: by itself, or in a pipeline that begins with it.
pub(super) enum Call<'a> {
    One(&'a Cmd),
    Piped(&'a redis::Pipeline),
}

impl Call<'_> {
    async fn send<T: FromRedisValue>(&self, conn: &mut Redis) -> redis::RedisResult<T> {
        match self {
            Call::One(cmd) => cmd.query_async(conn).await,
            Call::Piped(pipe) => pipe.query_async(conn).await,
        }
    }
}

/// Sends `call` (naming `key`), loading the script into that server first if it
/// lacks it.
pub(super) async fn run_script<T: FromRedisValue>(
    call: Call<'_>,
    conn: &mut Redis,
    key: &str,
) -> Result<T> {
    match call.send(conn).await {
        Err(e) if e.kind() == ErrorKind::Server(ServerErrorKind::NoScript) => {
            load_script(conn, key).await?;
            Ok(call.send(conn).await?)
        }
        result => Ok(result?),
    }
}

/// An argument formatted straight into the command's buffer.
struct Formatted<T>(T);

impl<T: std::fmt::Display> ToRedisArgs for Formatted<T> {
    fn write_redis_args<W: ?Sized + RedisWrite>(&self, out: &mut W) {
        out.write_arg_fmt(&self.0);
    }
}

/// The sale a record tells of, whether a purchase or a hold's confirmation made it.
pub(super) fn sale(record: Record) -> Option<Sale> {
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

/// The outcome of a purchase or hold from the script's reply: `kind` reads the
/// records of the request's own kind; any other record under the key means the key
/// was used for the other kind of request.
pub(super) fn decision<T>(
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

pub(super) fn unexpected(what: &str, reply: &str) -> Error {
    Error::UnexpectedReply(format!("{what}: {reply:?}"))
}

pub(super) fn server_changed() -> String {
    "the Redis server changed while the event was being checked".into()
}
