//! An app instance under test and the requests tests send it.

use std::time::Duration;

use reqwest::{RequestBuilder, Response, StatusCode};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::*;

/// A running app instance. Dropping it stops it.
pub struct TestApp {
    pub address: String,
    pub default_event: Uuid,
    pub client: reqwest::Client,
    pub(super) shutdown: CancellationToken,
    pub(super) graceful: Option<boxoffice::startup::ShutdownHandle>,
    pub(super) handle: Option<tokio::task::JoinHandle<boxoffice::Result<()>>>,
}

/// A response read whole: status, headers of interest, JSON body.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: StatusCode,
    pub replayed: bool,
    pub body: Value,
    pub content_type: String,
}

impl Reply {
    pub async fn read(response: Response) -> Self {
        let status = response.status();
        Self::try_read(response)
            .await
            .unwrap_or_else(|text| panic!("{status}: body is not JSON: {text:?}"))
    }

    /// The reply, or what arrived of its body when that is not JSON (a connection cut
    /// half-way, say).
    pub async fn try_read(response: Response) -> Result<Self, String> {
        let status = response.status();
        let replayed = response
            .headers()
            .get("idempotent-replayed")
            .is_some_and(|v| v == "true");
        let content_type = response
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        let text = response.text().await.map_err(|e| e.to_string())?;
        let body = serde_json::from_str(&text).map_err(|_| text)?;
        Ok(Self {
            status,
            replayed,
            body,
            content_type,
        })
    }

    /// The `error` code of an error body.
    pub fn code(&self) -> &str {
        self.body["error"].as_str().unwrap_or("<no error code>")
    }
}

impl TestApp {
    /// A client of the app at `address`, for tasks that cannot borrow the app (it is
    /// stopped by its owner, not by this handle).
    pub fn at(address: &str) -> Self {
        Self {
            address: address.to_owned(),
            default_event: Uuid::nil(),
            client: reqwest::Client::new(),
            shutdown: CancellationToken::new(),
            graceful: None,
            handle: None,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.address)
    }

    pub async fn send(&self, request: RequestBuilder) -> Reply {
        Reply::read(request.send().await.expect("request sent")).await
    }

    pub async fn get(&self, path: &str) -> Reply {
        self.send(self.client.get(self.url(path))).await
    }

    /// `POST /api/v1/purchase` of the default event.
    pub async fn purchase(&self, key: &str, quantity: u8) -> Reply {
        self.purchase_body(key, json!({ "quantity": quantity }))
            .await
    }

    pub async fn purchase_body(&self, key: &str, body: Value) -> Reply {
        self.send(
            self.client
                .post(self.url("/api/v1/purchase"))
                .header("Idempotency-Key", key)
                .json(&body),
        )
        .await
    }

    /// `POST /api/v1/events/{event}/purchase`.
    pub async fn purchase_event(&self, event: Uuid, key: &str, quantity: u8) -> Reply {
        self.send(
            self.client
                .post(self.url(&format!("/api/v1/events/{event}/purchase")))
                .header("Idempotency-Key", key)
                .json(&json!({ "quantity": quantity })),
        )
        .await
    }

    /// Creates an event through the admin API and returns its id.
    pub async fn create_event(&self, name: &str, seats: u32) -> Uuid {
        let reply = self
            .send(
                self.client
                    .post(self.url("/api/v1/events"))
                    .bearer_auth(ADMIN_TOKEN)
                    .json(&json!({ "name": name, "totalSeats": seats })),
            )
            .await;
        assert_eq!(reply.status, StatusCode::CREATED, "{:?}", reply.body);
        reply.body["id"].as_str().unwrap().parse().unwrap()
    }

    /// Creates an event with the given body (name, totalSeats, holdSeconds,
    /// maxPerBuyer) and returns its id.
    pub async fn create_event_with(&self, body: Value) -> Uuid {
        let reply = self
            .send(
                self.client
                    .post(self.url("/api/v1/events"))
                    .bearer_auth(ADMIN_TOKEN)
                    .json(&body),
            )
            .await;
        assert_eq!(reply.status, StatusCode::CREATED, "{:?}", reply.body);
        reply.body["id"].as_str().unwrap().parse().unwrap()
    }

    /// Creates an event of 1,000 seats with a waiting room that opens `opens_in_ms`
    /// from now (negative: opened already), admitting `rate` a second, each for
    /// `admission` seconds.
    pub async fn create_queued_event(&self, opens_in_ms: i64, rate: u32, admission: u32) -> Uuid {
        let opens_at = chrono::Utc::now() + chrono::Duration::milliseconds(opens_in_ms);
        self.create_event_with(json!({
            "name": "queued",
            "totalSeats": 1000,
            "queue": {
                "opensAt": opens_at.to_rfc3339(),
                "admitPerSecond": rate,
                "admissionSeconds": admission,
            },
        }))
        .await
    }

    /// `POST /api/v1/events/{event}/purchase` with a buyer token, if any.
    pub async fn purchase_as(
        &self,
        event: Uuid,
        key: &str,
        quantity: u8,
        token: Option<&str>,
    ) -> Reply {
        let mut request = self
            .client
            .post(self.url(&format!("/api/v1/events/{event}/purchase")))
            .header("Idempotency-Key", key)
            .json(&json!({ "quantity": quantity }));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        self.send(request).await
    }

    /// `POST /api/v1/events/{event}/holds` with a buyer token, if any.
    pub async fn hold(&self, event: Uuid, key: &str, quantity: u8, token: Option<&str>) -> Reply {
        let mut request = self
            .client
            .post(self.url(&format!("/api/v1/events/{event}/holds")))
            .header("Idempotency-Key", key)
            .json(&json!({ "quantity": quantity }));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        self.send(request).await
    }

    /// `POST /api/v1/events/{event}/holds/{hold}/confirm`.
    pub async fn confirm(&self, event: Uuid, hold: &str) -> Reply {
        self.send(
            self.client
                .post(self.url(&format!("/api/v1/events/{event}/holds/{hold}/confirm"))),
        )
        .await
    }

    /// `DELETE /api/v1/events/{event}/holds/{hold}`: the status, and the body if any.
    pub async fn release(&self, event: Uuid, hold: &str) -> (StatusCode, Option<Value>) {
        let response = self
            .client
            .delete(self.url(&format!("/api/v1/events/{event}/holds/{hold}")))
            .send()
            .await
            .expect("release sent");
        let status = response.status();
        let text = response.text().await.unwrap();
        (status, serde_json::from_str(&text).ok())
    }

    /// `POST /api/v1/events/{event}/purchases/{purchase}/cancel` as the admin.
    pub async fn cancel(&self, event: Uuid, purchase: &str) -> Reply {
        self.send(
            self.client
                .post(self.url(&format!(
                    "/api/v1/events/{event}/purchases/{purchase}/cancel"
                )))
                .bearer_auth(ADMIN_TOKEN),
        )
        .await
    }

    /// `GET /api/v1/events/{event}`.
    pub async fn event(&self, event: Uuid) -> Value {
        let reply = self.get(&format!("/api/v1/events/{event}")).await;
        assert_eq!(reply.status, StatusCode::OK, "{:?}", reply.body);
        reply.body
    }

    /// Starts what SIGTERM starts: not ready at once, stop after `drain`.
    pub fn begin_shutdown(&mut self, drain: Duration) -> tokio::task::JoinHandle<()> {
        let graceful = self.graceful.take().expect("shutdown begins once");
        tokio::spawn(graceful.drain_and_stop(drain))
    }

    /// Waits until the instance has stopped.
    pub async fn stopped(mut self) {
        if let Some(handle) = self.handle.take() {
            handle.await.unwrap().unwrap();
        }
    }

    /// Stops the instance at once (no drain), waiting for it to finish.
    pub async fn stop(mut self) {
        self.shutdown.cancel();
        if let Some(handle) = self.handle.take() {
            handle.await.unwrap().unwrap();
        }
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}
