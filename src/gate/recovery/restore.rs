//! Step 2 of a recovery (see the module docs): writes a [`Rebuilt`] state into
//! Redis. Records and cancellation markers are written over what Redis has: a sale
//! or hold PostgreSQL has outranks a refusal an older snapshot brought back under
//! the same key (the key was refused, the refusal forgotten with Redis' data, the
//! key sold on a retry), and every writer writes the same value. Hold hashes are
//! written over too (PostgreSQL and the log are never behind them), and the live holds
//! and the buyers' counts go to sets of the attempt's own, which the last step swaps
//! in: both through scripts that write only while the attempt still owns the event
//! (`lua/restore_holds.lua`, `lua/restore_set.lua`), so that an attempt overtaken by
//! another never writes over what was sold since.

use crate::store::Redis;
use redis::Script;
use uuid::Uuid;

use super::ledger::{HoldEnd, Rebuilt, RebuiltHold};
use crate::error::Result;
use crate::gate::retention::Retention;
use crate::keys::Keys;
use crate::records::Record;

/// Commands per pipeline, and holds or set members per script call.
const CHUNK: usize = 500;

/// How long the sets of an attempt live if it never reaches its last step.
const ATTEMPT_KEYS_TTL_SECS: i64 = 3_600;

/// An attempt under way: its token and the server it began on.
pub struct Attempt<'a> {
    pub id: &'a str,
    pub token: &'a str,
    pub run: &'a str,
}

/// The scripts that write only while an attempt owns the event.
#[derive(Clone)]
pub struct Scripts {
    holds: Script,
    set: Script,
}

impl Scripts {
    pub fn new() -> Self {
        Self {
            holds: crate::lua_script!("restore_holds.lua"),
            set: crate::lua_script!("restore_set.lua"),
        }
    }
}

/// One attempt's writes of one event: where they go and what fences them.
pub struct Writer<'a> {
    pub conn: Redis,
    pub keys: &'a Keys,
    pub scripts: &'a Scripts,
    pub event: Uuid,
    pub attempt: Attempt<'a>,
    pub retention: Retention,
}

impl Writer<'_> {
    /// Writes everything but the counters; returns how many records it wrote back,
    /// or `None` when the attempt no longer owns the event (another finished it, or
    /// the server changed).
    pub async fn write(&mut self, rebuilt: &Rebuilt) -> Result<Option<usize>> {
        self.records(rebuilt).await?;
        let owned = self.holds(rebuilt).await? && self.sets(rebuilt).await?;
        Ok(owned.then_some(rebuilt.records.len()))
    }

    /// Idempotency records and cancellation markers, written over what Redis has.
    async fn records(&mut self, rebuilt: &Rebuilt) -> Result<()> {
        let (keys, event) = (self.keys, self.event);
        let records = rebuilt.records.iter().map(|restored| {
            let (key, record) = &restored.value;
            set(
                keys.idempotency(event, key),
                record.to_string(),
                restored.expires_at_ms,
            )
        });
        let cancellations = rebuilt.cancellations.iter().map(|restored| {
            let (id, at) = restored.value;
            set(
                keys.cancellation(event, id),
                at.to_string(),
                restored.expires_at_ms,
            )
        });
        let commands: Vec<redis::Cmd> = records.chain(cancellations).collect();
        for chunk in commands.chunks(CHUNK) {
            let mut pipe = redis::pipe();
            for command in chunk {
                pipe.add_command(command.clone()).ignore();
            }
            let _: () = pipe.query_async(&mut self.conn).await?;
        }
        Ok(())
    }

    /// Hold hashes, fenced by the attempt's token; `false` when it no longer owns the
    /// event.
    async fn holds(&mut self, rebuilt: &Rebuilt) -> Result<bool> {
        let inventory = self.keys.inventory(self.event);
        for chunk in rebuilt.holds.chunks(CHUNK) {
            let mut call = self.scripts.holds.key(&inventory);
            call.arg(self.attempt.token).arg(self.attempt.run);
            for hold in chunk {
                call.key(self.keys.hold(self.event, hold.id));
                hold_fields(&mut call, hold, &self.retention);
            }
            let written: i64 = call.invoke_async(&mut self.conn).await?;
            if written == 0 {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// The attempt's own copies of the live holds and the buyers' counts, which step
    /// 4 puts in place; `false` when it no longer owns the event.
    async fn sets(&mut self, rebuilt: &Rebuilt) -> Result<bool> {
        let (keys, event, attempt) = (self.keys, self.event, &self.attempt);
        let inventory = keys.inventory(event);
        let live: Vec<(i64, String)> = rebuilt
            .live_holds()
            .map(|h| (h.expires_at_ms, h.member()))
            .collect();
        let counts: Vec<(&String, &i64)> = rebuilt.buyers.iter().collect();
        let sets = [
            (
                keys.rebuild(event, attempt.id, "holds"),
                "zset",
                pairs(&live),
            ),
            (
                keys.rebuild(event, attempt.id, "buyers"),
                "hash",
                pairs(&counts),
            ),
        ];
        for (key, kind, members) in &sets {
            // At least one call, which sets the TTL even of a set left empty.
            let mut chunks: Vec<&[String]> = members.chunks(2 * CHUNK).collect();
            if chunks.is_empty() {
                chunks.push(&[]);
            }
            for chunk in chunks {
                let written: i64 = self
                    .scripts
                    .set
                    .key(&inventory)
                    .key(key)
                    .arg(attempt.token)
                    .arg(attempt.run)
                    .arg(*kind)
                    .arg(ATTEMPT_KEYS_TTL_SECS)
                    .arg(chunk)
                    .invoke_async(&mut self.conn)
                    .await?;
                if written == 0 {
                    return Ok(false);
                }
            }
        }
        Ok(true)
    }
}

/// Pairs as a flat list of arguments.
fn pairs<A: ToString, B: ToString>(pairs: &[(A, B)]) -> Vec<String> {
    pairs
        .iter()
        .flat_map(|(a, b)| [a.to_string(), b.to_string()])
        .collect()
}

fn set(key: String, value: String, expires_at_ms: i64) -> redis::Cmd {
    let mut cmd = redis::cmd("SET");
    cmd.arg(key).arg(value).arg("PXAT").arg(expires_at_ms);
    cmd
}

/// One hold's fields as `lua/restore_holds.lua` takes them: the hash as
/// `lua/purchase.lua` keeps it, for as long (see [`Retention`]).
fn hold_fields(call: &mut redis::ScriptInvocation<'_>, hold: &RebuiltHold, retention: &Retention) {
    let (state, ended_ms, sale_remaining) = match hold.end {
        HoldEnd::Live => ("held", None, None),
        // Judged by the later of two clocks: written as such, so that reading it
        // agrees with confirming it whichever clock is behind.
        HoldEnd::Expired => ("expired", Some(hold.expires_at_ms), None),
        HoldEnd::Confirmed {
            seats_remaining,
            sold_at_micros,
        } => (
            "confirmed",
            Some(sold_at_micros / 1000),
            Some(seats_remaining),
        ),
        HoldEnd::Released { at_micros } => ("released", Some(at_micros / 1000), None),
        // Recorded as released in PostgreSQL (`db::end_holds`).
        HoldEnd::Voided { at_ms } => ("released", Some(at_ms), None),
    };
    let text = |n: Option<i64>| n.map(|n| n.to_string()).unwrap_or_default();
    call.arg(state)
        .arg(hold.quantity)
        .arg(hold.buyer.as_deref().unwrap_or(""))
        .arg(&hold.idempotency_key)
        .arg(hold.expires_at_ms)
        .arg(hold.held_at_ms)
        .arg(hold.seats_remaining)
        .arg(text(ended_ms))
        .arg(text(sale_remaining))
        .arg(hold.kept_until_ms(retention));
}

/// How many of `keys` Redis lacks.
pub async fn count_missing(conn: &mut Redis, keys: &[String]) -> Result<usize> {
    let mut missing = 0;
    for chunk in keys.chunks(CHUNK) {
        let stored: Vec<Option<String>> = redis::cmd("MGET").arg(chunk).query_async(conn).await?;
        missing += stored
            .iter()
            .filter(|s| !Record::kept(s.as_deref()))
            .count();
    }
    Ok(missing)
}
