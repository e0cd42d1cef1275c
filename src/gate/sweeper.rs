//! The hold sweeper: returns expired holds of events no request comes for, so that
//! seat counts show them back in time (requests return them first anyway).

use std::time::Duration;

use redis::{AsyncCommands, ErrorKind, ServerErrorKind, Value};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::Gate;
use super::script::{Call, invocation, load_script, run_script, unexpected};
use crate::error::Result;

/// Most expired holds one call of the gate script returns (`EXPIRE_PER_CALL` in
/// `lua/purchase.lua`).
const EXPIRE_PER_CALL: usize = 100;

impl Gate {
    /// Returns the expired holds of `event` to stock; the sweeper's call, for events
    /// no request comes for. Returns how many it returned (at most a bounded number
    /// per call: call again while it returns that many).
    pub async fn sweep(&self, event: Uuid) -> Result<usize> {
        let call = invocation(
            &self.seller.script,
            self.keys(),
            self.seller.retention,
            event,
            &[],
        );
        let inventory = self.keys().inventory(event);
        let returned: String =
            run_script(Call::One(&call), &mut self.seller.conn.clone(), &inventory).await?;
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
        let calls: Vec<redis::Cmd> = events
            .iter()
            .map(|event| {
                invocation(
                    &self.seller.script,
                    self.keys(),
                    self.seller.retention,
                    *event,
                    &[],
                )
            })
            .collect();
        let mut counts = conn.query_each(&calls).await?;
        let no_script = |count: &redis::RedisResult<Value>| matches!(count, Err(e) if e.kind() == ErrorKind::Server(ServerErrorKind::NoScript));
        let lacking: Vec<Uuid> = events
            .iter()
            .zip(&counts)
            .filter(|(_, count)| no_script(count))
            .map(|(event, _)| *event)
            .collect();
        if !lacking.is_empty() {
            // Into each server that lacks it (a load per event: which events share a
            // server is not known here, and a load is cheap).
            for event in lacking {
                load_script(&mut conn, &self.keys().inventory(event)).await?;
            }
            counts = conn.query_each(&calls).await?;
        }
        let mut returned = 0;
        for (event, count) in events.iter().zip(counts) {
            // A master out of reach: its events are swept once it is back (their
            // requests return their expired holds meanwhile); the rest are swept now.
            let Ok(count) = count else {
                continue;
            };
            let count: String = redis::from_redis_value(count)?;
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
}
