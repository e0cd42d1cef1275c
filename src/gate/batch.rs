//! Group commit for the scripts that decide seats.
//!
//! Every key of an event lives in one Redis hash slot, so one Redis core decides every
//! sale of the event, and most of what a script call costs there is the call itself,
//! not the commands inside. So while one call for an event is in flight, the requests
//! for that event that arrive wait in a queue, and the next call carries all of them
//! (up to a cap), in arrival order. There is no timer: a request that finds no call in
//! flight is sent at once, so an idle system adds no latency, and under a rush the
//! batches grow by themselves with the time a call takes.
//!
//! [`Coalescer`] only queues, takes turns and hands answers back; what one call means
//! is the [`Decide`] implementation's (see `purchase`).

use std::collections::VecDeque;
use std::collections::hash_map::{Entry, HashMap};
use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use tokio::sync::oneshot;
use uuid::Uuid;

use crate::error::{Error, Result};

/// One kind of script call that decides many requests of one event at once.
pub trait Decide: Send + Sync + 'static {
    type Request: Send + 'static;
    type Answer: Send + 'static;

    /// Decides `requests` of `event` in one call, in order: one result per request,
    /// in the same order. A call that fails answers each of its requests with the
    /// error.
    fn decide(
        &self,
        event: Uuid,
        requests: Vec<Self::Request>,
    ) -> impl Future<Output = Vec<Result<Self::Answer>>> + Send;
}

type Waiting<D> = (
    <D as Decide>::Request,
    oneshot::Sender<Result<<D as Decide>::Answer>>,
);

/// Queues requests per event and sends them in batches, one call in flight per event.
pub struct Coalescer<D: Decide> {
    shared: Arc<Shared<D>>,
}

impl<D: Decide> Clone for Coalescer<D> {
    fn clone(&self) -> Self {
        Self {
            shared: self.shared.clone(),
        }
    }
}

struct Shared<D: Decide> {
    decider: D,
    cap: usize,
    /// An event has an entry exactly while a sender task runs for it; the entry holds
    /// the requests that wait for that task's next call.
    queues: Mutex<HashMap<Uuid, VecDeque<Waiting<D>>>>,
}

impl<D: Decide> Shared<D> {
    fn queues(&self) -> MutexGuard<'_, HashMap<Uuid, VecDeque<Waiting<D>>>> {
        // The lock guards plain pushes and drains, which leave the map whole even
        // when a holder panicked.
        self.queues.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl<D: Decide> Coalescer<D> {
    /// `cap` is the most requests one call carries (at least 1).
    pub fn new(decider: D, cap: usize) -> Self {
        Self {
            shared: Arc::new(Shared {
                decider,
                cap: cap.max(1),
                queues: Mutex::new(HashMap::new()),
            }),
        }
    }

    /// Has `request` decided in the next call for `event` and returns its answer.
    ///
    /// A request whose caller stops waiting before its call is sent (a client that
    /// timed out behind a slow call) is dropped undecided: a retry on another replica
    /// may meanwhile have been refused, and a refusal keeps nothing a late decision
    /// could see, so deciding it later could sell under a key whose last answer was
    /// 409. Once its call is sent it is decided, and a retry gets the outcome back.
    pub async fn submit(&self, event: Uuid, request: D::Request) -> Result<D::Answer> {
        let (answer, answered) = oneshot::channel();
        let start_sender = match self.shared.queues().entry(event) {
            Entry::Occupied(mut queue) => {
                queue.get_mut().push_back((request, answer));
                false
            }
            Entry::Vacant(vacant) => {
                vacant.insert(VecDeque::from([(request, answer)]));
                true
            }
        };
        if start_sender {
            tokio::spawn(send_batches(self.shared.clone(), event));
        }
        answered.await.unwrap_or_else(|_| {
            Err(Error::UnexpectedReply(
                "the call that carried this request gave no answer for it".into(),
            ))
        })
    }
}

/// Sends the event's waiting requests, at most `cap` per call, until none wait.
async fn send_batches<D: Decide>(shared: Arc<Shared<D>>, event: Uuid) {
    let _unstick = Unstick {
        shared: &shared,
        event,
    };
    loop {
        let batch: Vec<Waiting<D>> = {
            let mut queues = shared.queues();
            let Some(queue) = queues.get_mut(&event) else {
                return;
            };
            if queue.is_empty() {
                queues.remove(&event);
                return;
            }
            queue.retain(|(_, answer)| !answer.is_closed());
            let take = queue.len().min(shared.cap);
            queue.drain(..take).collect()
        };
        if batch.is_empty() {
            continue;
        }
        let (requests, answers): (Vec<_>, Vec<_>) = batch.into_iter().unzip();
        let results = shared.decider.decide(event, requests).await;
        // A missing result drops its sender, and `submit` reports that.
        for (answer, result) in answers.into_iter().zip(results) {
            // The caller may have stopped waiting; its outcome is recorded anyway.
            let _ = answer.send(result);
        }
    }
}

/// Should a call panic, drops the event's queue so that its requests fail instead of
/// waiting forever, and the next request starts a new sender.
struct Unstick<'a, D: Decide> {
    shared: &'a Shared<D>,
    event: Uuid,
}

impl<D: Decide> Drop for Unstick<'_, D> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.shared.queues().remove(&self.event);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    use super::*;

    /// Answers each request with its own value, and records the batch sizes.
    struct Echo {
        batches: Mutex<Vec<usize>>,
        calls_in_flight: AtomicUsize,
        panic_on: Option<u32>,
    }

    impl Decide for Arc<Echo> {
        type Request = u32;
        type Answer = u32;

        async fn decide(&self, _event: Uuid, requests: Vec<u32>) -> Vec<Result<u32>> {
            assert_eq!(self.calls_in_flight.fetch_add(1, Ordering::SeqCst), 0);
            if requests.iter().any(|r| Some(*r) == self.panic_on) {
                self.calls_in_flight.fetch_sub(1, Ordering::SeqCst);
                panic!("a bug in the call");
            }
            self.batches.lock().unwrap().push(requests.len());
            tokio::time::sleep(Duration::from_millis(5)).await;
            self.calls_in_flight.fetch_sub(1, Ordering::SeqCst);
            requests.into_iter().map(Ok).collect()
        }
    }

    fn echo(panic_on: Option<u32>) -> Arc<Echo> {
        Arc::new(Echo {
            batches: Mutex::new(Vec::new()),
            calls_in_flight: AtomicUsize::new(0),
            panic_on,
        })
    }

    #[tokio::test]
    async fn requests_that_wait_share_calls_of_at_most_cap_and_get_their_own_answers() {
        let decider = echo(None);
        let coalescer = Coalescer::new(decider.clone(), 8);
        let event = Uuid::now_v7();
        let asks = (0..50u32).map(|n| {
            let coalescer = coalescer.clone();
            tokio::spawn(async move { (n, coalescer.submit(event, n).await.unwrap()) })
        });
        for ask in asks.collect::<Vec<_>>() {
            let (asked, answered) = ask.await.unwrap();
            assert_eq!(asked, answered);
        }
        let batches = decider.batches.lock().unwrap().clone();
        assert_eq!(batches.iter().sum::<usize>(), 50);
        assert!(batches.iter().all(|&n| n <= 8), "{batches:?}");
        assert!(batches.len() < 50, "nothing was batched: {batches:?}");
        assert!(coalescer.shared.queues().is_empty());
        // A request that finds nothing in flight goes at once, alone.
        assert_eq!(coalescer.submit(event, 99).await.unwrap(), 99);
        assert_eq!(decider.batches.lock().unwrap().last(), Some(&1));
    }

    #[tokio::test]
    async fn a_request_whose_caller_left_before_its_call_was_sent_is_not_decided() {
        let decider = echo(None);
        let coalescer = Coalescer::new(decider.clone(), 8);
        let event = Uuid::now_v7();
        let first = tokio::spawn({
            let coalescer = coalescer.clone();
            async move { coalescer.submit(event, 1).await }
        });
        tokio::time::sleep(Duration::from_millis(1)).await; // 1's call is in flight
        let gone = tokio::spawn({
            let coalescer = coalescer.clone();
            async move { coalescer.submit(event, 2).await }
        });
        tokio::time::sleep(Duration::from_millis(1)).await;
        gone.abort();
        assert_eq!(first.await.unwrap().unwrap(), 1);
        assert_eq!(coalescer.submit(event, 3).await.unwrap(), 3);
        assert_eq!(*decider.batches.lock().unwrap(), [1, 1], "2 was decided");
    }

    #[tokio::test]
    async fn a_panicking_call_fails_its_requests_and_the_event_sells_again() {
        let coalescer = Coalescer::new(echo(Some(7)), 4);
        let event = Uuid::now_v7();
        assert!(coalescer.submit(event, 7).await.is_err());
        assert!(coalescer.shared.queues().is_empty());
        assert_eq!(coalescer.submit(event, 3).await.unwrap(), 3);
    }
}
