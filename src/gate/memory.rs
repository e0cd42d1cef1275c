//! Redis' memory against its `maxmemory`: the gate needs `noeviction` (an evicted
//! record or counter would be a sale forgotten), so a full Redis refuses every write,
//! and every sale of every event stops. Before it gets there, the gate refuses new
//! purchases and holds of anonymous clients (no buyer token) once Redis is fuller than
//! `BOXOFFICE_REDIS_MEMORY_SHARE` percent; buyers with tokens, confirmations,
//! releases and cancellations go on. Halfway from that share to the limit, new
//! claims of buyers with tokens wait too (a token holder with fresh keys could fill
//! Redis as well); only replays and the ends of holds and sales go on. A watcher
//! reads `INFO memory` every interval; between reads the last one stands. A Redis
//! that will not tell (INFO denied) or that may evict is warned of once.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::error::Result;
use crate::store::Redis;
pub use crate::store::info_field;

/// The last reading, shared by the gate and its watcher.
#[derive(Debug, Clone)]
pub struct Memory {
    /// `used_memory` and `maxmemory` in bytes; max 0: Redis has no limit.
    used: Arc<AtomicU64>,
    max: Arc<AtomicU64>,
    /// Percent of `maxmemory` above which anonymous purchases and holds are refused;
    /// 100: never (only Redis' own refusal, answered 503).
    share: u8,
}

/// Redis fuller than the configured share, as last read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Full {
    pub used: u64,
    pub max: u64,
    /// Past halfway from the share to `maxmemory`: buyers with tokens wait too.
    pub critical: bool,
}

impl Memory {
    pub fn new(share: u8) -> Self {
        Self {
            used: Arc::default(),
            max: Arc::default(),
            share: share.clamp(1, 100),
        }
    }

    /// `Some` when Redis is fuller than the share of its `maxmemory`.
    pub fn full(&self) -> Option<Full> {
        let (used, max) = (
            self.used.load(Ordering::Relaxed),
            self.max.load(Ordering::Relaxed),
        );
        let share = u64::from(self.share);
        let over = max > 0 && share < 100 && used * 100 > max * share;
        let critical = used * 200 > max * (share + 100);
        over.then_some(Full {
            used,
            max,
            critical,
        })
    }

    /// The share of `maxmemory` in use, as last read; `None` without a limit.
    pub fn used_share(&self) -> Option<f64> {
        let max = self.max.load(Ordering::Relaxed);
        (max > 0).then(|| self.used.load(Ordering::Relaxed) as f64 / max as f64)
    }

    /// Reads `INFO memory` once; on a cluster, every master's, and keeps the fullest
    /// (a claim is not told which master its event is on: the fullest one holds every
    /// anonymous claim back).
    pub async fn read(&self, conn: &mut Redis) -> Result<()> {
        let infos: Vec<(String, String)> = conn
            .on_every_master(redis::cmd("INFO").arg("memory"))
            .await?;
        let field = |info, name| info_field(info, name).and_then(|value| value.parse::<u64>().ok());
        let fullest = infos
            .iter()
            .filter_map(|(_, info)| Some((field(info, "used_memory")?, field(info, "maxmemory")?)))
            .max_by(|(u1, m1), (u2, m2)| share(*u1, *m1).total_cmp(&share(*u2, *m2)));
        if let Some((used, max)) = fullest {
            self.used.store(used, Ordering::Relaxed);
            self.max.store(max, Ordering::Relaxed);
            crate::metrics::redis_memory(self.used_share());
        }
        let evicting = infos.iter().find_map(|(_, info)| {
            info_field(info, "maxmemory_policy").filter(|p| *p != "noeviction")
        });
        if let Some(policy) = evicting {
            static WARNED: AtomicBool = AtomicBool::new(false);
            if !WARNED.swap(true, Ordering::Relaxed) {
                tracing::warn!(
                    policy,
                    "Redis may evict keys (maxmemory-policy is not noeviction): an evicted \
                     record or counter is a sale forgotten; set noeviction"
                );
            }
        }
        Ok(())
    }

    /// Reads Redis' memory every `every` until shutdown.
    pub async fn watch(self, mut conn: Redis, every: Duration, stop: CancellationToken) {
        loop {
            if let Err(e) = self.read(&mut conn).await {
                static WARNED: AtomicBool = AtomicBool::new(false);
                if !WARNED.swap(true, Ordering::Relaxed) {
                    tracing::warn!(error = %e, "cannot read Redis' memory (INFO memory): \
                        claims are not held back before Redis is full");
                }
            }
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(every) => {}
            }
        }
    }
}

/// `used` as a share of `max`; without a limit, none.
fn share(used: u64, max: u64) -> f64 {
    if max == 0 {
        0.0
    } else {
        used as f64 / max as f64
    }
}
