//! One keep-alive connection of a sustained run: when it sends, what, and how it
//! counts the answers (a retried key must replay its first answer).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper::Request;
use uuid::Uuid;

use super::QuantityArg;
use super::report::Tally;
use crate::client::{
    Answer, Sender, Target, clone_request, connect, get_request, purchase_request, send, token,
};

/// Earlier requests a connection remembers as candidates for retries.
const RETRY_HISTORY: usize = 1024;

/// State the connections of a sustained run share.
pub(super) struct Shared {
    pub(super) targets: Vec<Target>,
    pub(super) event: Uuid,
    pub(super) run: String,
    pub(super) next: AtomicU64,
    pub(super) done: Arc<AtomicU64>,
    pub(super) started: Instant,
    pub(super) deadline: Instant,
    pub(super) get: Option<String>,
    pub(super) rate: Option<u64>,
    pub(super) requests: Option<u64>,
    pub(super) retry_share: f64,
    pub(super) retry_failed: u32,
    pub(super) quantity: QuantityArg,
    pub(super) timeout: Duration,
    pub(super) tokens: Vec<String>,
}

/// One connection of a sustained run and what it has seen.
pub(super) struct Connection {
    shared: Arc<Shared>,
    target: Target,
    sender: Option<Sender>,
    tally: Tally,
    /// Earlier purchases (key, quantity, answer), candidates for retries.
    history: Vec<(String, u8, Answer)>,
}

/// One request of a run: what to send, and why.
struct Planned {
    n: u64,
    request: Request<Full<Bytes>>,
    key: String,
    pub(super) quantity: u8,
    /// A repeat of an earlier purchase, which must replay its answer.
    retry: bool,
}

impl Connection {
    pub(super) fn new(shared: Arc<Shared>, connection: usize) -> Self {
        let target = shared.targets[connection % shared.targets.len()].clone();
        Self {
            shared,
            target,
            sender: None,
            tally: Tally::default(),
            history: Vec::new(),
        }
    }

    pub(super) async fn run(mut self) -> Tally {
        loop {
            let n = self.shared.next.fetch_add(1, Ordering::Relaxed);
            if self.shared.requests.is_some_and(|max| n >= max) {
                break;
            }
            let Some(scheduled) = self.schedule(n).await else {
                break;
            };
            let planned = self.plan(n);
            let result = self.send_retrying(&planned.request).await;
            self.tally.record_latency(scheduled.elapsed());
            self.shared.done.fetch_add(1, Ordering::Relaxed);
            match result {
                Ok(answer) => self.check(planned, answer),
                Err(e) => {
                    self.tally.error(e);
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
        }
        self.tally
    }

    /// When the `n`-th request is due: now (closed model) or its slot of the rate
    /// (open model, waited for); `None` once the run is over.
    async fn schedule(&self, n: u64) -> Option<Instant> {
        let shared = &self.shared;
        let scheduled = match shared.rate {
            Some(rate) => {
                let at = shared.started + Duration::from_secs_f64(n as f64 / rate as f64);
                if at >= shared.deadline {
                    return None;
                }
                tokio::time::sleep_until(at.into()).await;
                at
            }
            None => Instant::now(),
        };
        let over = shared.requests.is_none() && Instant::now() >= shared.deadline;
        (!over).then_some(scheduled)
    }

    fn plan(&self, n: u64) -> Planned {
        let shared = &self.shared;
        // A fixed hash of n decides retries: spread out, and no RNG to seed.
        let retry = shared.retry_share > 0.0
            && !self.history.is_empty()
            && (n.wrapping_mul(2_654_435_761) % 10_000) as f64 / 10_000.0 < shared.retry_share;
        let (key, quantity) = if shared.get.is_some() {
            (String::new(), 0)
        } else if retry {
            let (key, quantity, _) = &self.history[n as usize % self.history.len()];
            (key.clone(), *quantity)
        } else {
            (format!("rush-{}-{n}", shared.run), shared.quantity.pick(n))
        };
        let request = match &shared.get {
            Some(path) => get_request(&self.target, path),
            None => purchase_request(
                &self.target,
                shared.event,
                &key,
                quantity,
                token(&shared.tokens, n),
            ),
        };
        Planned {
            n,
            request,
            key,
            quantity,
            retry,
        }
    }

    /// Sends on the kept-alive connection (opening one when needed), and again after
    /// no answer or a 502/503/504, up to `--retry-failed` times.
    async fn send_retrying(&mut self, request: &Request<Full<Bytes>>) -> Result<Answer, String> {
        let mut attempt = 0;
        loop {
            let result = match self.sender.take() {
                Some(conn) => Ok(conn),
                None => connect(&self.target).await,
            };
            let result = match result {
                Ok(mut conn) => {
                    let answer = send(&mut conn, clone_request(request), self.shared.timeout).await;
                    if answer.is_ok() {
                        self.sender = Some(conn);
                    }
                    answer
                }
                Err(e) => Err(e),
            };
            let failed = match &result {
                Ok(answer) => matches!(answer.status, 502..=504),
                Err(_) => true,
            };
            if !failed || attempt >= self.shared.retry_failed {
                return result;
            }
            attempt += 1;
            self.tally.resent += 1;
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Counts an answer; a retry must have replayed the first answer exactly.
    fn check(&mut self, planned: Planned, answer: Answer) {
        *self.tally.statuses.entry(answer.status).or_default() += 1;
        if self.shared.get.is_some() {
            return;
        }
        let slot = planned.n as usize;
        if planned.retry {
            let (_, _, first) = &self.history[slot % self.history.len()];
            if answer.replayed && answer.status == first.status && answer.body == first.body {
                self.tally.replays += 1;
            } else {
                self.tally.replay_mismatches += 1;
            }
            return;
        }
        if answer.status == 200 {
            self.tally.seats_sold += u64::from(planned.quantity);
            self.tally.sales += 1;
        }
        // Only sales are replayed: a refusal keeps nothing and is decided again.
        if answer.status == 200 && self.shared.retry_share > 0.0 {
            if self.history.len() == RETRY_HISTORY {
                self.history.swap_remove(slot % RETRY_HISTORY);
            }
            self.history.push((planned.key, planned.quantity, answer));
        }
    }
}
