//! One connection acting as buyers: purchases and holds confirmed, released or
//! abandoned, in the plan's shares; and what it was told.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use hyper::Method;
use serde_json::{Value, json};
use uuid::Uuid;

use super::Plan;
use crate::client::{Answer, Sender, Target, connect, request, send};

/// What the connections share.
pub(super) struct Shared {
    pub(super) plan: Plan,
    pub(super) targets: Vec<Target>,
    pub(super) event: Uuid,
    pub(super) tokens: Vec<Option<String>>,
    pub(super) next: AtomicU64,
    pub(super) deadline: Instant,
}

/// One sale a buyer was told about.
#[derive(Debug, Clone)]
pub(super) struct Sale {
    pub(super) id: String,
    pub(super) seats: i64,
    pub(super) buyer: usize,
}

/// What one connection saw.
#[derive(Default)]
pub(super) struct Tally {
    pub(super) requests: u64,
    pub(super) statuses: HashMap<u16, u64>,
    pub(super) errors: u64,
    pub(super) first_error: Option<String>,
    pub(super) purchases: u64,
    pub(super) purchased_seats: i64,
    pub(super) holds: u64,
    pub(super) confirmed: u64,
    pub(super) confirmed_seats: i64,
    pub(super) released_seats: i64,
    pub(super) refusals: HashMap<String, u64>,
    pub(super) sales: Vec<Sale>,
    /// Abandoned holds: id, seats, expiry.
    pub(super) abandoned: Vec<(String, i64, chrono::DateTime<chrono::Utc>)>,
}

/// A fixed hash of `n` in [0, 1): spreads the actions without an RNG to seed.
pub(super) fn fraction(n: u64, salt: u64) -> f64 {
    (n.wrapping_add(salt).wrapping_mul(2_654_435_761) % 10_000) as f64 / 10_000.0
}

/// One connection acting as the buyers it picks, until the deadline.
pub(super) async fn buyer(shared: Arc<Shared>, connection: usize) -> Tally {
    let target = shared.targets[connection % shared.targets.len()].clone();
    let mut client = Client::new(target, shared.plan.timeout);
    while Instant::now() < shared.deadline {
        let n = shared.next.fetch_add(1, Ordering::Relaxed);
        let who = (n as usize).wrapping_mul(7919) % shared.plan.buyers;
        let mut headers = vec![(
            "idempotency-key".to_owned(),
            format!("rush-{}-{n}", shared.event),
        )];
        if let Some(token) = &shared.tokens[who] {
            headers.push(("authorization".to_owned(), format!("Bearer {token}")));
        }
        let action = Action {
            n,
            who,
            quantity: 1 + (n % 2) as i64,
            headers,
        };
        if fraction(n, 1) < shared.plan.purchase_share {
            client.purchase(shared.event, action).await;
        } else {
            client.hold(shared.event, &shared.plan, action).await;
        }
    }
    client.tally
}

/// One buyer's action: its number, the buyer, seats, and the headers it sends.
struct Action {
    n: u64,
    who: usize,
    quantity: i64,
    headers: Vec<(String, String)>,
}

impl Client {
    async fn purchase(&mut self, event: Uuid, action: Action) {
        let path = format!("/api/v1/events/{event}/purchase");
        let body = Some(json!({ "quantity": action.quantity }));
        if let Some((200, body)) = self.call(Method::POST, &path, &action.headers, body).await {
            self.tally.purchases += 1;
            self.tally.purchased_seats += action.quantity;
            self.tally.sales.push(Sale {
                id: body["purchaseId"].as_str().unwrap_or_default().to_owned(),
                seats: action.quantity,
                buyer: action.who,
            });
        }
    }

    /// A hold, then confirmed, released or abandoned as the plan's shares say.
    async fn hold(&mut self, event: Uuid, plan: &Plan, action: Action) {
        let path = format!("/api/v1/events/{event}/holds");
        let body = Some(json!({ "quantity": action.quantity }));
        let Some((201, held)) = self.call(Method::POST, &path, &action.headers, body).await else {
            return;
        };
        self.tally.holds += 1;
        let hold = held["holdId"].as_str().unwrap_or_default().to_owned();
        let choice = fraction(action.n, 2);
        if choice < plan.confirm_share {
            let path = format!("/api/v1/events/{event}/holds/{hold}/confirm");
            if let Some((200, _)) = self.call(Method::POST, &path, &[], None).await {
                self.tally.confirmed += 1;
                self.tally.confirmed_seats += action.quantity;
                self.tally.sales.push(Sale {
                    id: hold,
                    seats: action.quantity,
                    buyer: action.who,
                });
            }
        } else if choice < plan.confirm_share + plan.release_share {
            let path = format!("/api/v1/events/{event}/holds/{hold}");
            if let Some((204, _)) = self.call(Method::DELETE, &path, &[], None).await {
                self.tally.released_seats += action.quantity;
            }
        } else {
            let expires = held["expiresAt"]
                .as_str()
                .and_then(|t| t.parse().ok())
                .unwrap_or_else(chrono::Utc::now);
            self.tally.abandoned.push((hold, action.quantity, expires));
        }
    }
}

/// One kept-alive connection and what it counted.
pub(super) struct Client {
    target: Target,
    sender: Option<Sender>,
    tally: Tally,
    timeout: Duration,
}

impl Client {
    pub(super) fn new(target: Target, timeout: Duration) -> Self {
        Self {
            target,
            sender: None,
            tally: Tally::default(),
            timeout,
        }
    }

    /// Sends one request; returns its status and JSON body, or `None` (counted as an
    /// error) when no answer came.
    pub(super) async fn call(
        &mut self,
        method: Method,
        path: &str,
        headers: &[(String, String)],
        body: Option<Value>,
    ) -> Option<(u16, Value)> {
        let headers: Vec<(&str, &str)> = headers
            .iter()
            .map(|(n, v)| (n.as_str(), v.as_str()))
            .collect();
        let request = request(&self.target, method, path, &headers, body.as_ref());
        self.tally.requests += 1;
        let answer: Result<Answer, String> = async {
            let mut sender = match self.sender.take() {
                Some(sender) => sender,
                None => connect(&self.target).await?,
            };
            let answer = send(&mut sender, request, self.timeout).await?;
            self.sender = Some(sender);
            Ok(answer)
        }
        .await;
        match answer {
            Ok(answer) => {
                *self.tally.statuses.entry(answer.status).or_default() += 1;
                let body: Value = serde_json::from_slice(&answer.body).unwrap_or_default();
                if let Some(code) = body["error"].as_str() {
                    *self.tally.refusals.entry(code.to_owned()).or_default() += 1;
                }
                Some((answer.status, body))
            }
            Err(e) => {
                self.tally.errors += 1;
                self.tally.first_error.get_or_insert(e);
                None
            }
        }
    }
}

impl Tally {
    pub(super) fn merge(&mut self, from: Tally) {
        let into = self;
        into.requests += from.requests;
        for (status, n) in from.statuses {
            *into.statuses.entry(status).or_default() += n;
        }
        for (code, n) in from.refusals {
            *into.refusals.entry(code).or_default() += n;
        }
        into.errors += from.errors;
        into.first_error = into.first_error.take().or(from.first_error);
        into.purchases += from.purchases;
        into.purchased_seats += from.purchased_seats;
        into.holds += from.holds;
        into.confirmed += from.confirmed;
        into.confirmed_seats += from.confirmed_seats;
        into.released_seats += from.released_seats;
        into.sales.extend(from.sales);
        into.abandoned.extend(from.abandoned);
    }
}
