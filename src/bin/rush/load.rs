//! Sending requests and tallying what came back.

use std::io::IsTerminal;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper::Request;
use uuid::Uuid;

use crate::Common;
use crate::client::{
    Answer, Sender, Target, buyer_tokens, clone_request, connect, get_request, purchase_request,
    run_id, send, targets, token,
};
use crate::report::{Report, Tally};
use crate::verify;

/// Earlier requests a connection remembers as candidates for retries.
const RETRY_HISTORY: usize = 1024;

/// How a sustained run sends.
pub struct Plan {
    pub connections: usize,
    pub duration: Duration,
    pub rate: Option<u64>,
    pub requests: Option<u64>,
    pub retry_share: f64,
    pub get: Option<String>,
    pub retry_failed: u32,
}

/// Prints progress once a second: a rewritten line on a terminal, plain lines otherwise.
fn progress(
    done: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    quiet: bool,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        if quiet {
            return;
        }
        let terminal = std::io::stderr().is_terminal();
        let started = Instant::now();
        let mut last = 0;
        let mut ticker = tokio::time::interval(Duration::from_secs(1));
        ticker.tick().await;
        loop {
            ticker.tick().await;
            if stop.load(Ordering::Relaxed) {
                break;
            }
            let now = done.load(Ordering::Relaxed);
            let line = format!(
                "{:>5.1}s  {now:>9} requests  {:>8} req/s",
                started.elapsed().as_secs_f64(),
                now - last
            );
            last = now;
            if terminal {
                eprint!("\r{line}");
            } else {
                eprintln!("{line}");
            }
        }
        if terminal {
            eprintln!();
        }
    })
}

/// The replaced service's test: `users` at once, each on its own new connection.
pub async fn seed(common: &Common, users: usize) -> Result<Report, String> {
    let targets = targets(&common.urls).await?;
    let event = verify::resolve_event(common, &targets[0]).await?;
    let before = Some(verify::snapshot(&targets[0], event).await?);
    let run = run_id();
    let tokens = Arc::new(buyer_tokens(common, &run)?);
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for user in 0..users {
        let tokens = tokens.clone();
        let target = targets[user % targets.len()].clone();
        let key = format!("rush-{run}-{user}");
        let quantity = common.quantity.pick(user as u64);
        let timeout = common.timeout;
        tasks.spawn(async move {
            let begin = Instant::now();
            let answer = async {
                let mut sender = connect(&target).await?;
                send(
                    &mut sender,
                    purchase_request(&target, event, &key, quantity, token(&tokens, user as u64)),
                    timeout,
                )
                .await
            }
            .await;
            (answer, quantity, begin.elapsed())
        });
    }
    let mut tally = Tally::default();
    while let Some(joined) = tasks.join_next().await {
        let (answer, quantity, latency) = joined.map_err(|e| e.to_string())?;
        tally.record_latency(latency);
        match answer {
            Ok(answer) => {
                *tally.statuses.entry(answer.status).or_default() += 1;
                if answer.status == 200 {
                    tally.seats_sold += u64::from(quantity);
                    tally.sales += 1;
                }
            }
            Err(e) => tally.error(e),
        }
    }
    Ok(Report::new(
        "seed",
        &targets,
        event,
        run,
        before,
        started.elapsed(),
        tally,
    ))
}

/// State the connections of a sustained run share.
struct Shared {
    targets: Vec<Target>,
    event: Uuid,
    run: String,
    next: AtomicU64,
    done: Arc<AtomicU64>,
    started: Instant,
    deadline: Instant,
    get: Option<String>,
    rate: Option<u64>,
    requests: Option<u64>,
    retry_share: f64,
    retry_failed: u32,
    quantity: crate::QuantityArg,
    timeout: Duration,
    tokens: Vec<String>,
}

/// Keep-alive connections, each sending as answers arrive (closed model) or at its
/// share of a fixed rate (open model).
pub async fn sustained(common: &Common, plan: &Plan) -> Result<Report, String> {
    let targets = targets(&common.urls).await?;
    let event = match plan.get {
        Some(_) => common.event.unwrap_or_default(),
        None => verify::resolve_event(common, &targets[0]).await?,
    };
    let before = match plan.get {
        Some(_) => None,
        None => Some(verify::snapshot(&targets[0], event).await?),
    };
    let run = run_id();
    let tokens = buyer_tokens(common, &run)?;
    let started = Instant::now();
    let shared = Arc::new(Shared {
        targets,
        event,
        run,
        tokens,
        next: AtomicU64::new(0),
        done: Arc::new(AtomicU64::new(0)),
        started,
        deadline: started + plan.duration,
        get: plan.get.clone(),
        rate: plan.rate,
        requests: plan.requests,
        retry_share: plan.retry_share,
        retry_failed: plan.retry_failed,
        quantity: common.quantity,
        timeout: common.timeout,
    });
    let stop = Arc::new(AtomicBool::new(false));
    let ticker = progress(shared.done.clone(), stop.clone(), common.json);
    let mut workers = tokio::task::JoinSet::new();
    for connection in 0..plan.connections {
        let worker = Connection::new(shared.clone(), connection);
        workers.spawn(worker.run());
    }
    let mut tally = Tally::default();
    while let Some(worker) = workers.join_next().await {
        tally.merge(worker.map_err(|e| e.to_string())?);
    }
    let elapsed = started.elapsed();
    stop.store(true, Ordering::Relaxed);
    let _ = ticker.await;
    let mode = match (&plan.get, plan.rate) {
        (Some(_), _) => "get",
        (None, Some(_)) => "open",
        (None, None) => "closed",
    };
    let mut report = Report::new(
        mode,
        &shared.targets,
        event,
        shared.run.clone(),
        before,
        elapsed,
        tally,
    );
    report.rate = plan.rate;
    report.connections = Some(plan.connections);
    Ok(report)
}

/// One connection of a sustained run and what it has seen.
struct Connection {
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
    quantity: u8,
    /// A repeat of an earlier purchase, which must replay its answer.
    retry: bool,
}

impl Connection {
    fn new(shared: Arc<Shared>, connection: usize) -> Self {
        let target = shared.targets[connection % shared.targets.len()].clone();
        Self {
            shared,
            target,
            sender: None,
            tally: Tally::default(),
            history: Vec::new(),
        }
    }

    async fn run(mut self) -> Tally {
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
        if matches!(answer.status, 200 | 409) && self.shared.retry_share > 0.0 {
            if self.history.len() == RETRY_HISTORY {
                self.history.swap_remove(slot % RETRY_HISTORY);
            }
            self.history.push((planned.key, planned.quantity, answer));
        }
    }
}
