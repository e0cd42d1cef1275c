//! Answers of public reads whose cost grows with the number of events (`/api/v1/stats`,
//! pages of `/api/v1/events`), kept for a short while per replica: however many
//! clients ask, each distinct answer is computed at most once per `ttl`, and while
//! one request computes it the others wait for that result instead of computing it
//! again. The number of distinct answers kept is bounded; past it, a request computes
//! its own without keeping it. At most `COMPUTING` computations of one cache run at
//! once, kept or not: a client asking for many distinct answers waits its turn
//! rather than multiplying the load on the stores.

use std::collections::HashMap;
use std::future::Future;
use std::hash::Hash;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

type Slot<V> = Arc<tokio::sync::Mutex<Option<(Instant, V)>>>;

/// Computations of one cache running at once.
const COMPUTING: usize = 2;

pub struct Cache<K, V> {
    ttl: Duration,
    capacity: usize,
    slots: Mutex<HashMap<K, Slot<V>>>,
    computing: tokio::sync::Semaphore,
}

impl<K: Eq + Hash + Clone, V: Clone> Cache<K, V> {
    pub fn new(ttl: Duration, capacity: usize) -> Self {
        Self {
            ttl,
            capacity: capacity.max(1),
            slots: Mutex::new(HashMap::new()),
            computing: tokio::sync::Semaphore::new(COMPUTING),
        }
    }

    /// The answer for `key`: kept, if computed less than `ttl` ago; else computed now.
    pub async fn get<F, Fut, E>(&self, key: K, compute: F) -> Result<V, E>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<V, E>>,
    {
        let Some(slot) = self.slot(key) else {
            let _turn = self.computing.acquire().await.expect("never closed");
            return compute().await;
        };
        let mut kept = slot.lock().await;
        if let Some((at, value)) = kept.as_ref()
            && at.elapsed() < self.ttl
        {
            return Ok(value.clone());
        }
        let _turn = self.computing.acquire().await.expect("never closed");
        let value = compute().await?;
        *kept = Some((Instant::now(), value.clone()));
        Ok(value)
    }

    /// The slot of `key`, made if there is room (after dropping stale ones).
    fn slot(&self, key: K) -> Option<Slot<V>> {
        let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        if !slots.contains_key(&key) && slots.len() >= self.capacity {
            let ttl = self.ttl;
            // A slot being computed (locked) stays; a stale or empty one goes.
            slots.retain(|_, slot| {
                slot.try_lock().map_or(true, |kept| {
                    kept.as_ref().is_some_and(|(at, _)| at.elapsed() < ttl)
                })
            });
            if slots.len() >= self.capacity {
                return None;
            }
        }
        Some(slots.entry(key).or_default().clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    #[tokio::test]
    async fn concurrent_readers_share_one_computation_and_the_answer_expires() {
        let cache: Arc<Cache<u8, u32>> = Arc::new(Cache::new(Duration::from_millis(200), 4));
        let runs = Arc::new(AtomicU32::new(0));
        let read = |cache: Arc<Cache<u8, u32>>, runs: Arc<AtomicU32>| async move {
            cache
                .get(1, || async {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    Ok::<_, ()>(runs.fetch_add(1, Ordering::SeqCst) + 1)
                })
                .await
                .unwrap()
        };
        let mut readers = tokio::task::JoinSet::new();
        for _ in 0..10 {
            readers.spawn(read(cache.clone(), runs.clone()));
        }
        assert!(readers.join_all().await.into_iter().all(|a| a == 1));
        tokio::time::sleep(Duration::from_millis(250)).await;
        assert_eq!(read(cache.clone(), runs.clone()).await, 2);
    }

    #[tokio::test]
    async fn past_its_capacity_a_read_is_computed_and_not_kept() {
        let cache: Cache<u8, u8> = Cache::new(Duration::from_secs(60), 2);
        for key in 0..2 {
            cache.get(key, || async { Ok::<_, ()>(key) }).await.unwrap();
        }
        assert_eq!(cache.get(9, || async { Ok::<_, ()>(9) }).await, Ok(9));
        assert_eq!(cache.slots.lock().unwrap().len(), 2);
        assert_eq!(cache.get(0, || async { Ok::<_, ()>(100) }).await, Ok(0));
    }
}
