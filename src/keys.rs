//! Redis key names. Every key one script touches carries the event's hash tag
//! (`{<event id>}`), so the scripts run unchanged on Redis Cluster.

use std::fmt;

use uuid::Uuid;

/// Name of the consumer group that writes every event's stream to PostgreSQL
/// (`persist`); recovery creates it with the stream.
pub const CONSUMER_GROUP: &str = "persist";

/// Builds key names under a configurable prefix (several deployments, or test runs,
/// can share one Redis).
#[derive(Debug, Clone)]
pub struct Keys {
    prefix: String,
}

impl Keys {
    pub fn new(prefix: impl Into<String>) -> Self {
        Self {
            prefix: prefix.into(),
        }
    }

    /// Hash with the event's `total`, `sold`, `held`, `purchases` and `rejected`
    /// counters, its settings (`limit` seats per buyer, `hold` seconds, `queued` when
    /// buyers must be admitted from its waiting room), `run`, the Redis server it was
    /// last checked on, and `fence`, the token of a recovery under way (see
    /// `recovery`). No TTL.
    pub fn inventory(&self, event: Uuid) -> String {
        format!("{}:{{{event}}}:inv", self.prefix)
    }

    /// The outcome recorded under one Idempotency-Key of the event.
    pub fn idempotency(&self, event: Uuid, key: &str) -> String {
        self.idempotency_name(event, key).to_string()
    }

    /// [`Keys::idempotency`] to be written into a buffer: the purchase call writes one
    /// per purchase straight into its command.
    pub fn idempotency_name<'a>(&'a self, event: Uuid, key: &'a str) -> impl fmt::Display + 'a {
        fmt::from_fn(move |f| write!(f, "{}:{{{event}}}:idem:{key}", self.prefix))
    }

    /// Holds that still hold seats: a sorted set of `<hold id>:<seats>:<buyer>` by
    /// expiry (Unix ms), so the gate finds the expired ones first. A member lives
    /// until its hold is confirmed, released or expired.
    pub fn holds(&self, event: Uuid) -> String {
        format!("{}:{{{event}}}:holds", self.prefix)
    }

    /// One hold: its state, seats, buyer, request key and times. Kept, with its
    /// request's record, the ended-hold TTL after its expiry or release, or the
    /// idempotency TTL after its confirmation (`gate::retention`), so its state can
    /// be read and a confirmation or release repeated.
    pub fn hold(&self, event: Uuid, hold: Uuid) -> String {
        self.hold_name(event, hold).to_string()
    }

    pub fn hold_name(&self, event: Uuid, hold: Uuid) -> impl fmt::Display + '_ {
        fmt::from_fn(move |f| write!(f, "{}:{{{event}}}:hold:{}", self.prefix, hold.simple()))
    }

    /// Seats sold or held per buyer (the `sub` of their token), for events with a
    /// limit per buyer. No TTL; rebuilt from PostgreSQL and the stream by recovery.
    pub fn buyers(&self, event: Uuid) -> String {
        format!("{}:{{{event}}}:buyers", self.prefix)
    }

    /// Marks a sale as cancelled, holding the time of the cancellation, so a repeated
    /// cancellation returns no seats twice. Kept for the idempotency TTL; PostgreSQL's
    /// `cancelled_at` answers after that.
    pub fn cancellation(&self, event: Uuid, purchase: Uuid) -> String {
        format!("{}:{{{event}}}:cancel:{}", self.prefix, purchase.simple())
    }

    /// Written with each gate call that waits for replicas, so that the call has a
    /// write of its own for `WAIT` to count (a replay writes nothing else). Its value
    /// means nothing; it expires a minute after the last call.
    pub fn replica_ack(&self, event: Uuid) -> String {
        format!("{}:{{{event}}}:ack", self.prefix)
    }

    /// The event's waiting room: its settings (`opens`, `rate`, `admission`, `seed`)
    /// and how many joined before (`early`) and after (`late`) the opening. No TTL.
    pub fn queue(&self, event: Uuid) -> String {
        format!("{}:{{{event}}}:queue", self.prefix)
    }

    /// When each admitted buyer was first told so (for the metrics). No TTL.
    pub fn queue_served(&self, event: Uuid) -> String {
        format!("{}:{{{event}}}:queue:served", self.prefix)
    }

    /// The waiting room's ticket of each buyer, with when they joined. No TTL.
    pub fn queue_tickets(&self, event: Uuid) -> String {
        format!("{}:{{{event}}}:queue:tickets", self.prefix)
    }

    /// A set one recovery attempt builds (`part`: `holds` or `buyers`) before it swaps
    /// it in for the event's own (see `recovery`). Expires if the attempt dies.
    pub fn rebuild(&self, event: Uuid, attempt: &str, part: &str) -> String {
        format!("{}:{{{event}}}:rebuild:{attempt}:{part}", self.prefix)
    }

    /// Stream of the event's seat movements (sales, cancellations, holds made and
    /// released), consumed into PostgreSQL.
    pub fn stream(&self, event: Uuid) -> String {
        format!("{}:{{{event}}}:log", self.prefix)
    }

    /// Sales PostgreSQL refused for good, set aside with the reason (see `lua/park.lua`).
    pub fn dead_letters(&self, event: Uuid) -> String {
        format!("{}:{{{event}}}:dead", self.prefix)
    }

    /// Set of the ids of events loaded into Redis; the consumer reads their streams.
    pub fn events(&self) -> String {
        format!("{}:events", self.prefix)
    }

    /// A `SCAN` pattern matching every event's dead-letter stream.
    pub fn dead_letters_pattern(&self) -> String {
        format!("{}:{{*}}:dead", glob_escape(&self.prefix))
    }

    /// The event a dead-letter stream key belongs to.
    pub fn event_of_dead_letters(&self, key: &str) -> Option<Uuid> {
        self.event_of(key, "dead")
    }

    /// The event a stream key belongs to.
    pub fn event_of_stream(&self, stream: &str) -> Option<Uuid> {
        self.event_of(stream, "log")
    }

    /// The event of a key `<prefix>:{<event>}:<kind>`.
    fn event_of(&self, key: &str, kind: &str) -> Option<Uuid> {
        key.strip_prefix(&self.prefix)?
            .strip_prefix(":{")?
            .strip_suffix(kind)?
            .strip_suffix("}:")?
            .parse()
            .ok()
    }
}

/// A key prefix without braces (`BOXOFFICE_KEY_PREFIX`): a `{…}` in it would be every
/// key's hash tag, and put every event in one cluster slot.
pub fn valid_prefix(value: &str) -> Result<String, String> {
    if value.contains(['{', '}']) {
        return Err("braces are not allowed: every key's hash tag is its event's".into());
    }
    Ok(value.to_owned())
}

/// `prefix` with the characters `SCAN MATCH` treats as a pattern escaped.
fn glob_escape(prefix: &str) -> String {
    let mut out = String::with_capacity(prefix.len());
    for c in prefix.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `lua/purchase.lua` names a hold's request record from the event's inventory
    /// key and the hold's request key (a confirmation does not pass it).
    #[test]
    fn a_record_is_named_from_the_inventory_key() {
        let keys = Keys::new("tix");
        let id = Uuid::now_v7();
        let inventory = keys.inventory(id);
        let base = inventory.strip_suffix("inv").unwrap();
        assert_eq!(keys.idempotency(id, "k-1"), format!("{base}idem:k-1"));
    }

    #[test]
    fn a_prefix_with_braces_is_refused() {
        assert!(super::valid_prefix("shop{1}").is_err());
        assert!(super::valid_prefix("shop}").is_err());
        assert_eq!(super::valid_prefix("t*x").as_deref(), Ok("t*x"));
    }

    #[test]
    fn stream_key_round_trips() {
        let keys = Keys::new("tix");
        let id = Uuid::now_v7();
        assert_eq!(keys.event_of_stream(&keys.stream(id)), Some(id));
        assert_eq!(keys.event_of_stream(&keys.inventory(id)), None);
        assert_eq!(Keys::new("other").event_of_stream(&keys.stream(id)), None);
    }

    #[test]
    fn dead_letter_keys_round_trip_and_match_their_pattern() {
        let keys = Keys::new("t*x");
        let id = Uuid::now_v7();
        assert_eq!(keys.event_of_dead_letters(&keys.dead_letters(id)), Some(id));
        assert_eq!(keys.event_of_dead_letters(&keys.stream(id)), None);
        assert_eq!(keys.dead_letters_pattern(), "t\\*x:{*}:dead");
    }
}
