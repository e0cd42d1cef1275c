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

use redis::aio::ConnectionManager;
use tokio_util::sync::CancellationToken;

use crate::error::Result;

/// The value of `name` in an `INFO` reply (`name:value` lines), trimmed.
pub fn info_field<'a>(info: &'a str, name: &str) -> Option<&'a str> {
    info.lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(':'))
        .map(str::trim)
}

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

    /// Reads `INFO memory` once.
    pub async fn read(&self, conn: &mut ConnectionManager) -> Result<()> {
        let info: String = redis::cmd("INFO").arg("memory").query_async(conn).await?;
        let field = |name| info_field(&info, name).and_then(|value| value.parse::<u64>().ok());
        if let (Some(used), Some(max)) = (field("used_memory"), field("maxmemory")) {
            self.used.store(used, Ordering::Relaxed);
            self.max.store(max, Ordering::Relaxed);
            crate::metrics::redis_memory(self.used_share());
        }
        let policy = info_field(&info, "maxmemory_policy");
        if policy.is_some_and(|p| p != "noeviction") {
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
    pub async fn watch(
        self,
        mut conn: ConnectionManager,
        every: Duration,
        stop: CancellationToken,
    ) {
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
