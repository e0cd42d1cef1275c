//! The waiting room of a queued event: buyers join, wait, and are admitted at a fixed
//! rate from the opening.
//!
//! # Order
//!
//! Each buyer gets one ticket (`lua/queue_join.lua`): `p<n>` for the n-th to join
//! before the opening, `o<n>` after, numbered by Redis, whose clock alone decides
//! which side of the opening a join falls. Once the event opens no more `p` tickets
//! are issued, so their number `P` is final, and a ticket's place in line is:
//!
//! * `p<n>`: `1 + π(n − 1)`, where π is a pseudo-random permutation of `0..P` keyed
//!   by the event's seed ([`permute`]): the order of joining before the opening says
//!   nothing about the order of admission.
//! * `o<n>`: `P + n`: first come, first served.
//!
//! # Admission
//!
//! Early places are admitted from the opening at the rate: place `k` at `opensAt +
//! ⌈k × 1000 / rate⌉` ms. A late ticket is given its moment when it joins, from
//! Redis' clock (`lua/queue_join.lua`): one `1 / rate` after the place before it, but
//! never before it joined. So the rate does not bank: after a quiet spell the next
//! joiner is admitted at once and those right behind it one `1 / rate` apart, not
//! all together. Every replica reads the same moments, a poll is O(1) (hash fields
//! and `TIME`), and a position only goes down.
//!
//! An admitted buyer gets an admission token ([`AdmissionTokens`]) that names the
//! event and the buyer and expires `admissionSeconds` after the later of its
//! admission and the first time any replica told the buyer so (recorded once in
//! Redis): a buyer who polls late still gets the whole window, and every later answer
//! carries the same expiry.
//!
//! After Redis lost the room, recovery brings it back with its settings and no
//! tickets: buyers join again and are admitted at the rate from then on (the chain
//! starts again at the first re-joiner); tokens already issued stay valid.

use crate::store::Redis;
use uuid::Uuid;

use crate::domain::Buyer;
use crate::error::{Error, Result};
use crate::keys::Keys;

mod admission;
#[cfg(test)]
mod tests;

pub use admission::{AdmissionTokens, admission_expires_ms};

/// What a queued event is created with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueSettings {
    pub opens_at_ms: i64,
    pub admit_per_second: u32,
    pub admission_seconds: u32,
    /// Keys the permutation of those who join before the opening.
    pub seed: u64,
}

/// How far in the past a waiting room may open: an event created a little after its
/// announced opening still queues; one from decades ago is a mistake.
pub const OPENS_AT_PAST_MAX_MS: i64 = 24 * 3600 * 1000;
/// How far ahead a waiting room may open.
pub const OPENS_AT_FUTURE_MAX_MS: i64 = 366 * 24 * 3600 * 1000;

impl QueueSettings {
    /// Whether the opening time is within the window above around `now_ms`; an
    /// explanation if not.
    pub fn check_opening(opens_at_ms: i64, now_ms: i64) -> std::result::Result<(), String> {
        if opens_at_ms < now_ms - OPENS_AT_PAST_MAX_MS
            || opens_at_ms > now_ms + OPENS_AT_FUTURE_MAX_MS
        {
            return Err(
                "queue.opensAt must be within the last 24 hours or the next 366 days".into(),
            );
        }
        Ok(())
    }
}

/// Fewest milliseconds a waiting buyer is told to wait before polling again (the
/// most is configured: `BOXOFFICE_QUEUE_POLL_MAX_MS`).
const MIN_POLL_MS: u64 = 1_000;

/// A buyer's ticket: who joined when.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ticket {
    /// The n-th to join before the opening (from 1).
    Early(u64),
    /// The n-th to join after it (from 1).
    Late(u64),
}

impl Ticket {
    pub fn parse(s: &str) -> Option<Self> {
        let (kind, n) = s.split_at_checked(1)?;
        let n: u64 = n.parse().ok().filter(|n| *n >= 1)?;
        match kind {
            "p" => Some(Ticket::Early(n)),
            "o" => Some(Ticket::Late(n)),
            _ => None,
        }
    }
}

impl std::fmt::Display for Ticket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Ticket::Early(n) => write!(f, "p{n}"),
            Ticket::Late(n) => write!(f, "o{n}"),
        }
    }
}

/// The waiting room as Redis has it at one moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Room {
    pub settings: QueueSettings,
    /// Tickets issued before the opening, and after.
    pub early: u64,
    pub late: u64,
    /// The chain of late admissions: where it (re)started (ms) and how many places
    /// it has admitted or will admit from there; `None` before the first late join.
    pub chain: Option<(i64, u64)>,
    /// Redis' clock, milliseconds.
    pub now_ms: i64,
}

/// Where one ticket stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Standing {
    /// Before the opening: every early ticket is in the draw, `in_draw` of them so far.
    BeforeOpening { in_draw: u64, opens_in_ms: u64 },
    /// Waiting: `position` places to go (1: next), about `wait_ms` more.
    Waiting { position: u64, wait_ms: u64 },
    /// Admitted at `admitted_at_ms`.
    Admitted { admitted_at_ms: i64 },
}

impl Room {
    /// Milliseconds from a chain's start to its `count`-th place.
    fn offset_ms(&self, count: u64) -> i64 {
        let ms = (u128::from(count) * 1000).div_ceil(u128::from(self.settings.admit_per_second));
        i64::try_from(ms).unwrap_or(i64::MAX)
    }

    /// Places of a chain started at `base` admitted by now.
    fn admitted_since(&self, base: i64) -> u64 {
        let since = u128::try_from(self.now_ms - base).unwrap_or(0);
        u64::try_from(since * u128::from(self.settings.admit_per_second) / 1000).unwrap_or(u64::MAX)
    }

    /// Buyers admitted by now, of those who joined.
    pub fn admitted(&self) -> u64 {
        let early = self
            .admitted_since(self.settings.opens_at_ms)
            .min(self.early);
        let late_waiting = match self.chain {
            Some((base, count)) => count.saturating_sub(self.admitted_since(base)),
            None => 0,
        };
        early + self.late.saturating_sub(late_waiting)
    }

    /// The place in line of an early ticket, once the event has opened; `None` for
    /// a ticket Redis never issued.
    pub fn place(&self, ticket: Ticket) -> Option<u64> {
        match ticket {
            Ticket::Early(n) if n <= self.early => {
                Some(1 + permute(n - 1, self.early, self.settings.seed))
            }
            Ticket::Late(n) if n <= self.late => Some(self.early + n),
            _ => None,
        }
    }

    /// Where `ticket` stands now; `admitted_at_ms` is the moment a late ticket was
    /// given when it joined. `None` for a ticket Redis never issued.
    pub fn standing(&self, ticket: Ticket, admitted_at_ms: Option<i64>) -> Option<Standing> {
        let opens_in = self.settings.opens_at_ms - self.now_ms;
        let place = self.place(ticket)?;
        if opens_in > 0 {
            return Some(Standing::BeforeOpening {
                in_draw: self.early,
                opens_in_ms: opens_in.unsigned_abs(),
            });
        }
        let at = match (ticket, admitted_at_ms) {
            (Ticket::Late(_), Some(at)) => at,
            // Early places, and late tickets issued before they carried a moment.
            _ => self.settings.opens_at_ms + self.offset_ms(place),
        };
        if at <= self.now_ms {
            return Some(Standing::Admitted { admitted_at_ms: at });
        }
        let wait_ms = (at - self.now_ms).unsigned_abs();
        // The places between now and `at` are one `1 / rate` apart.
        let position = (u128::from(wait_ms) * u128::from(self.settings.admit_per_second))
            .div_ceil(1000)
            .max(1);
        Some(Standing::Waiting {
            position: u64::try_from(position).unwrap_or(u64::MAX),
            wait_ms,
        })
    }
}

impl Standing {
    /// The longest a buyer is told to wait between polls, with `max_ms` configured.
    pub fn longest_poll_ms(max_ms: u64) -> u64 {
        max_ms.max(MIN_POLL_MS)
    }

    /// When to poll again: half the expected wait, between 1 s and `max_ms`, so
    /// polls thin out with the distance to the front. With N waiting and admission
    /// at r per second, about 2r buyers poll every second, the next ones less and
    /// less often, and none less often than every `max_ms`: the poll rate stays
    /// near 2r·(1 + ln(N / 2r)) + N / max, whatever N.
    pub fn poll_after_ms(&self, max_ms: u64) -> u64 {
        let max_ms = Self::longest_poll_ms(max_ms);
        match *self {
            Standing::BeforeOpening { opens_in_ms, .. } => opens_in_ms.clamp(MIN_POLL_MS, max_ms),
            Standing::Waiting { wait_ms, .. } => (wait_ms / 2).clamp(MIN_POLL_MS, max_ms),
            Standing::Admitted { .. } => 0,
        }
    }
}

/// A keyed pseudo-random permutation of `0..size`: an eight-round Feistel network
/// over the smallest even power of two at least `size`, walking the cycle until the
/// value falls inside. (Four rounds over halves of a few bits are not random enough:
/// over 2,000 seeds, the rank correlation of 1,000 places with the joining order
/// spread 0.040 instead of a random permutation's 0.032, and 9 seeds passed 4
/// standard errors, which `rush queue` fails on; eight rounds: 0.032 and 1.) Every replica computes the same place from the same seed, and the
/// function of the ticket number is a bijection, so no two early tickets share a
/// place. (splitmix64 as the round function: fixed, unlike std's hasher.)
pub fn permute(x: u64, size: u64, seed: u64) -> u64 {
    if size <= 1 {
        return 0;
    }
    let bits = 64 - (size - 1).leading_zeros();
    let half = bits.div_ceil(2);
    let mask = (1u64 << half) - 1;
    let mut value = x;
    loop {
        let (mut left, mut right) = (value >> half, value & mask);
        for round in 0..8u64 {
            let f = splitmix64(seed ^ (round << 56) ^ right) & mask;
            (left, right) = (right, left ^ f);
        }
        value = (left << half) | right;
        if value < size {
            return value;
        }
    }
}

fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Joins and reads waiting rooms in Redis.
#[derive(Clone)]
pub struct Queue {
    conn: Redis,
    keys: Keys,
    join: redis::Script,
}

impl Queue {
    pub fn new(conn: Redis, keys: Keys) -> Self {
        Self {
            conn,
            keys,
            join: crate::lua_script!("queue_join.lua"),
        }
    }

    /// The ticket of `buyer` (a new one, or the one they have; with `spent`, a new
    /// one at the back in place of that one, if they still hold it), and the room;
    /// `None` when Redis does not have the event's waiting room (recover it first).
    pub async fn join(
        &self,
        event: Uuid,
        buyer: &Buyer,
        spent: Option<Ticket>,
    ) -> Result<Option<(Held, Room)>> {
        let reply: Vec<String> = self
            .join
            .key(self.keys.queue(event))
            .key(self.keys.queue_tickets(event))
            .key(self.keys.queue_served(event))
            .arg(buyer.as_str())
            .arg(spent.map(|t| t.to_string()).unwrap_or_default())
            .invoke_async(&mut self.conn.clone())
            .await?;
        let [ticket, fields @ .., admitted_at, base, count] = &reply[..] else {
            return Ok(None);
        };
        let bad = || Error::UnexpectedReply(format!("queue join {reply:?}"));
        let held = Held {
            ticket: Ticket::parse(ticket).ok_or_else(bad)?,
            joined_ms: None,
            admitted_at_ms: optional_number(admitted_at).map_err(|_| bad())?,
        };
        let mut fields = fields.to_vec();
        fields.extend([base.clone(), count.clone()]);
        Ok(Some((held, room(&fields)?)))
    }

    /// The room now and the ticket `buyer` holds in it, if any; `None` when Redis
    /// does not have the room. O(1): two hash reads and the clock, pipelined.
    pub async fn poll(&self, event: Uuid, buyer: &Buyer) -> Result<Option<(Option<Held>, Room)>> {
        type Reply = (Vec<Option<String>>, Option<String>, (i64, i64));
        let mut pipe = redis::pipe();
        pipe.cmd("HMGET")
            .arg(self.keys.queue(event))
            .arg(&[
                "opens",
                "rate",
                "admission",
                "seed",
                "early",
                "late",
                "base",
                "count",
            ])
            .cmd("HGET")
            .arg(self.keys.queue_tickets(event))
            .arg(buyer.as_str());
        Redis::time_of(&mut pipe, &self.keys.queue(event));
        let (fields, ticket, (secs, micros)): Reply =
            pipe.query_async(&mut self.conn.clone()).await?;
        if fields[0].is_none() || fields[3].is_none() {
            return Ok(None);
        }
        let mut all: Vec<String> = fields.into_iter().map(Option::unwrap_or_default).collect();
        all.insert(6, (secs * 1000 + micros / 1000).to_string());
        Ok(Some((ticket.as_deref().and_then(Held::parse), room(&all)?)))
    }

    /// When `buyer` was first told they were admitted, by any replica: `now_ms` if
    /// this is the first time (then also `true`).
    pub async fn served(&self, event: Uuid, buyer: &Buyer, now_ms: i64) -> Result<(i64, bool)> {
        let (first, at): (bool, i64) = redis::pipe()
            .cmd("HSETNX")
            .arg(self.keys.queue_served(event))
            .arg(buyer.as_str())
            .arg(now_ms)
            .cmd("HGET")
            .arg(self.keys.queue_served(event))
            .arg(buyer.as_str())
            .query_async(&mut self.conn.clone())
            .await?;
        Ok((at, first))
    }
}

/// A buyer's ticket as Redis keeps it (`'<ticket>@<joined>[@<admitted at>]'`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Held {
    pub ticket: Ticket,
    /// When the buyer joined (Unix ms), where known.
    pub joined_ms: Option<i64>,
    /// A late ticket's admission moment (Unix ms), given when it joined.
    pub admitted_at_ms: Option<i64>,
}

impl Held {
    fn parse(held: &str) -> Option<Self> {
        let mut parts = held.split('@');
        let ticket = Ticket::parse(parts.next()?)?;
        let joined_ms = Some(parts.next()?.parse().ok()?);
        let admitted_at_ms = parts.next().map(str::parse).transpose().ok()?;
        Some(Self {
            ticket,
            joined_ms,
            admitted_at_ms,
        })
    }
}

fn optional_number(s: &str) -> std::result::Result<Option<i64>, std::num::ParseIntError> {
    (!s.is_empty()).then(|| s.parse()).transpose()
}

/// A room from opens, rate, admission, seed, early, late, now (ms), and the late
/// chain's base and count ('' before the first late join), as strings.
fn room(fields: &[String]) -> Result<Room> {
    let bad = || Error::UnexpectedReply(format!("waiting room {fields:?}"));
    let n = |i: usize| -> Result<i64> {
        match fields.get(i).map(String::as_str) {
            Some("") => Ok(0),
            Some(v) => v.parse().map_err(|_| bad()),
            None => Err(bad()),
        }
    };
    let count = |i: usize| u64::try_from(n(i)?).map_err(|_| bad());
    let base = optional_number(fields.get(7).ok_or_else(bad)?).map_err(|_| bad())?;
    Ok(Room {
        settings: QueueSettings {
            opens_at_ms: n(0)?,
            admit_per_second: u32::try_from(n(1)?).map_err(|_| bad())?.max(1),
            admission_seconds: u32::try_from(n(2)?).map_err(|_| bad())?,
            seed: fields[3].parse().map_err(|_| bad())?,
        },
        early: count(4)?,
        late: count(5)?,
        now_ms: n(6)?,
        chain: match base {
            Some(base) => Some((base, count(8)?)),
            None => None,
        },
    })
}
