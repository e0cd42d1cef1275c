//! The hold sweeper: returns expired holds of events no request comes for, so that
//! seat counts show them back in time (requests return them first anyway).

use std::time::Duration;

use redis::{AsyncCommands, ServerErrorKind, Value};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::Gate;
use super::script::{invocation, run_script, unexpected};
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
        let no_script = |value: &Value| matches!(value, Value::ServerError(e) if e.kind() == Some(ServerErrorKind::NoScript));
        if counts.iter().any(no_script) {
            self.seller.script.load_async(&mut conn).await?;
            counts = conn.query_each(&calls).await?;
        }
        let mut returned = 0;
        for (event, count) in events.iter().zip(counts) {
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
