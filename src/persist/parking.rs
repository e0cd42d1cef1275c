//! Entries PostgreSQL refuses for good: set aside in the event's dead-letter stream,
//! reported when gone, and sent back by `boxoffice reconcile --fix`.

use deadpool_redis::redis::Script;
use uuid::Uuid;

use super::{CONSUMER_GROUP, Connection, Consumer};
use crate::error::Result;
use crate::keys::Keys;

impl Consumer {
    /// Sets an entry aside in the event's dead letters (`lua/park.lua`, which also
    /// acknowledges it), if it is still pending for this consumer; one that another
    /// consumer took over meanwhile is its to write or park. One gone from the stream
    /// while pending (removed behind the service's back) cannot be parked: the script
    /// acknowledges it so that it stops coming back, and it is reported as lost.
    pub(super) async fn park_entry(
        &self,
        conn: &mut Connection,
        stream: &str,
        event: Uuid,
        entry: &str,
        reason: &str,
    ) -> Result<()> {
        let parked: i64 = self
            .park
            .key(stream)
            .key(self.keys.dead_letters(event))
            .arg(CONSUMER_GROUP)
            .arg(entry)
            .arg(reason)
            .arg(&self.name)
            .invoke_async(conn)
            .await?;
        match parked {
            1 => {
                crate::metrics::parked();
                tracing::error!(
                    %event, entry, reason,
                    "parked a sale PostgreSQL cannot take; see `boxoffice reconcile`"
                );
            }
            0 => lost(event, "parking", &[entry], reason),
            _ => tracing::info!(
                %event, entry,
                "not parking an entry no longer pending for this consumer (taken over or \
                 acknowledged by another)"
            ),
        }
        Ok(())
    }
}

/// Reports stream entries that disappeared before their rows were written: what they
/// recorded is not in PostgreSQL, and only `boxoffice reconcile` can tell which seats.
pub(super) fn lost(event: Uuid, how: &'static str, entries: &[&str], reason: &str) {
    crate::metrics::entries_lost(how, entries.len());
    tracing::error!(
        %event, ?entries, reason,
        "stream entries were removed before PostgreSQL had them: what they recorded is \
         lost; see `boxoffice reconcile`"
    );
}

/// Sends the sales parked for `event` back to its stream for another try; returns
/// how many.
pub async fn requeue_parked(conn: &mut Connection, keys: &Keys, event: Uuid) -> Result<usize> {
    const PER_CALL: usize = 1_000;
    let requeue = Script::new(include_str!("../../lua/requeue.lua"));
    let mut moved = 0;
    loop {
        let n: usize = requeue
            .key(keys.stream(event))
            .key(keys.dead_letters(event))
            .arg(PER_CALL)
            .invoke_async(conn)
            .await?;
        moved += n;
        if n < PER_CALL {
            return Ok(moved);
        }
    }
}
