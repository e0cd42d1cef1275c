//! Step 2 of a recovery (see the module docs): writes a [`Rebuilt`] state into
//! Redis, in pipelines of [`CHUNK`] commands. Records and markers are written only
//! where Redis lacks them (`SET NX`: one Redis has is the same or the only one);
//! hold hashes are written over (PostgreSQL and the log are never behind them); the
//! live holds and the buyers' counts go to keys of this attempt, which the last step
//! swaps in.

use redis::aio::ConnectionManager;
use uuid::Uuid;

use super::ledger::{HoldEnd, Rebuilt, RebuiltHold};
use crate::error::Result;
use crate::keys::Keys;

/// Commands per pipeline.
const CHUNK: usize = 1_000;

/// How long the keys of an attempt live if it never reaches its last step.
const ATTEMPT_KEYS_TTL_SECS: i64 = 3_600;

/// Writes everything but the counters; returns how many records it wrote back.
pub async fn write(
    conn: &mut ConnectionManager,
    keys: &Keys,
    event: Uuid,
    rebuilt: &Rebuilt,
    attempt: &str,
    ttl: u32,
) -> Result<usize> {
    let mut commands: Vec<redis::Cmd> = Vec::new();
    for restored in &rebuilt.records {
        let (key, record) = &restored.value;
        commands.push(set_nx(
            keys.idempotency(event, key),
            record.to_string(),
            restored.ttl_secs,
        ));
    }
    for restored in &rebuilt.cancellations {
        let (id, at) = restored.value;
        commands.push(set_nx(
            keys.cancellation(event, id),
            at.to_string(),
            restored.ttl_secs,
        ));
    }
    for hold in &rebuilt.holds {
        commands.extend(hold_hash(keys, event, hold, ttl));
    }

    let live = keys.rebuild(event, attempt, "holds");
    commands.push(redis::Cmd::del(&live));
    for chunk in rebuilt.live_holds().collect::<Vec<_>>().chunks(CHUNK) {
        let mut zadd = redis::cmd("ZADD");
        zadd.arg(&live);
        for hold in chunk {
            zadd.arg(hold.expires_at_ms).arg(hold.member());
        }
        commands.push(zadd);
    }
    commands.push(redis::Cmd::expire(&live, ATTEMPT_KEYS_TTL_SECS));

    let buyers = keys.rebuild(event, attempt, "buyers");
    commands.push(redis::Cmd::del(&buyers));
    let counts: Vec<(&String, &i64)> = rebuilt.buyers.iter().collect();
    for chunk in counts.chunks(CHUNK) {
        let mut hset = redis::cmd("HSET");
        hset.arg(&buyers);
        for (buyer, seats) in chunk {
            hset.arg(*buyer).arg(**seats);
        }
        commands.push(hset);
    }
    commands.push(redis::Cmd::expire(&buyers, ATTEMPT_KEYS_TTL_SECS));

    for chunk in commands.chunks(CHUNK) {
        let mut pipe = redis::pipe();
        for command in chunk {
            pipe.add_command(command.clone()).ignore();
        }
        let _: () = pipe.query_async(conn).await?;
    }
    Ok(rebuilt.records.len())
}

fn set_nx(key: String, value: String, ttl_secs: i64) -> redis::Cmd {
    let mut cmd = redis::cmd("SET");
    cmd.arg(key)
        .arg(value)
        .arg("EX")
        .arg(ttl_secs.max(1))
        .arg("NX");
    cmd
}

/// The commands that write one hold's hash as `lua/purchase.lua` keeps it (fields
/// `s`, `q`, `b`, `k`, `x`, `c`, and `r`, `e` once ended), expiring the idempotency
/// TTL after the hold does, like the script's.
fn hold_hash(keys: &Keys, event: Uuid, hold: &RebuiltHold, ttl: u32) -> Vec<redis::Cmd> {
    let key = keys.hold(event, hold.id);
    let (state, ended_ms, sale_remaining) = match hold.end {
        HoldEnd::Live | HoldEnd::Expired => ("held", None, None),
        HoldEnd::Confirmed {
            seats_remaining,
            sold_at_micros,
        } => (
            "confirmed",
            Some(sold_at_micros / 1000),
            Some(seats_remaining),
        ),
        HoldEnd::Released { at_micros } => ("released", Some(at_micros / 1000), None),
    };
    let mut hset = redis::cmd("HSET");
    hset.arg(&key)
        .arg("s")
        .arg(state)
        .arg("q")
        .arg(hold.quantity)
        .arg("b")
        .arg(hold.buyer.as_deref().unwrap_or(""))
        .arg("k")
        .arg(&hold.idempotency_key)
        .arg("x")
        .arg(hold.expires_at_ms)
        .arg("c")
        .arg(hold.held_at_ms);
    if let Some(ended) = ended_ms {
        hset.arg("e").arg(ended);
    }
    if let Some(remaining) = sale_remaining {
        hset.arg("r").arg(remaining);
    }
    let mut commands = vec![hset];
    if ended_ms.is_none() {
        // A hold read as expired from its time carries no end of its own.
        let mut hdel = redis::cmd("HDEL");
        hdel.arg(&key).arg("e").arg("r");
        commands.push(hdel);
    }
    let mut expire = redis::cmd("PEXPIREAT");
    expire
        .arg(&key)
        .arg(hold.expires_at_ms + i64::from(ttl) * 1000);
    commands.push(expire);
    commands
}

/// How many of `keys` Redis lacks.
pub async fn count_missing(conn: &mut ConnectionManager, keys: &[String]) -> Result<usize> {
    let mut missing = 0;
    for chunk in keys.chunks(CHUNK) {
        let mut pipe = redis::pipe();
        for key in chunk {
            pipe.exists(key);
        }
        let exists: Vec<bool> = pipe.query_async(conn).await?;
        missing += exists.iter().filter(|e| !**e).count();
    }
    Ok(missing)
}
