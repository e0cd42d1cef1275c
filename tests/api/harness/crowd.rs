//! Many buyers at once, and one that retries as the API advises.

use std::sync::Arc;
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::json;
use uuid::Uuid;

use super::*;

/// One purchase as a client that follows the API's advice sends it: on a 503 or a
/// lost connection, the same request again with the same key, until it gets another
/// answer or `give_up` passes. Returns the answer (`None` if there was none) and the
/// number of attempts.
pub async fn buy_until_answered(
    client: &reqwest::Client,
    url: &str,
    key: &str,
    quantity: u8,
    give_up: Duration,
) -> (Option<Reply>, u32) {
    let deadline = Instant::now() + give_up;
    let mut attempts = 0;
    loop {
        attempts += 1;
        let sent = client
            .post(url)
            .header("Idempotency-Key", key)
            .json(&json!({ "quantity": quantity }))
            .send()
            .await;
        if let Ok(response) = sent
            && response.status() != StatusCode::SERVICE_UNAVAILABLE
            && response.status() != StatusCode::REQUEST_TIMEOUT
            && let Ok(reply) = Reply::try_read(response).await
        {
            return (Some(reply), attempts);
        }
        if Instant::now() > deadline {
            return (None, attempts);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Fires `buyers` purchases at `apps` round-robin with up to `in_flight` at once;
/// `quantity(i)` and `key(i)` pick each buyer's order. Returns every reply in order.
pub async fn rush(
    apps: &[&TestApp],
    event: Uuid,
    buyers: usize,
    in_flight: usize,
    quantity: impl Fn(usize) -> u8,
    key: impl Fn(usize) -> String,
) -> Vec<(String, u8, Reply)> {
    let permits = Arc::new(tokio::sync::Semaphore::new(in_flight));
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..buyers {
        let app = apps[i % apps.len()];
        let client = app.client.clone();
        let url = app.url(&format!("/api/v1/events/{event}/purchase"));
        let (key, quantity) = (key(i), quantity(i));
        let permits = permits.clone();
        tasks.spawn(async move {
            let _permit = permits.acquire_owned().await.unwrap();
            let response = client
                .post(url)
                .header("Idempotency-Key", &key)
                .json(&json!({ "quantity": quantity }))
                .send()
                .await
                .expect("purchase sent");
            (i, key, quantity, Reply::read(response).await)
        });
    }
    let mut replies = tasks.join_all().await;
    replies.sort_by_key(|(i, ..)| *i);
    replies.into_iter().map(|(_, k, q, r)| (k, q, r)).collect()
}
