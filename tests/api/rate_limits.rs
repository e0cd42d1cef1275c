//! Rate limits per client on the write routes (`api::rate`): a flooding client gets
//! 429 with `Retry-After` and nothing done, from every replica, while other clients
//! buy; a buyer is counted by their token, not by the address they share.

use std::time::Instant;

use redis::AsyncCommands;
use reqwest::StatusCode;
use serde_json::json;
use uuid::Uuid;

use crate::harness::{Reply, TestApp, TestEnv, buyer_token};

/// A purchase as a client behind the shipped nginx sends it (`X-Forwarded-For` holds
/// what the client wrote, then the address nginx saw): the reply and `Retry-After`.
async fn purchase_from(
    app: &TestApp,
    event: Uuid,
    key: &str,
    address: &str,
) -> (Reply, Option<String>) {
    let response = app
        .client
        .post(app.url(&format!("/api/v1/events/{event}/purchase")))
        .header("Idempotency-Key", key)
        .header("X-Forwarded-For", format!("203.0.113.1, {address}"))
        .json(&json!({ "quantity": 1 }))
        .send()
        .await
        .expect("purchase sent");
    let retry_after = response
        .headers()
        .get("retry-after")
        .map(|v| v.to_str().unwrap().to_owned());
    (Reply::read(response).await, retry_after)
}

#[tokio::test]
async fn a_flooding_address_gets_429_from_every_replica_while_another_buys() {
    let env = TestEnv::new().await;
    let mut apps = Vec::new();
    for _ in 0..3 {
        apps.push(
            env.spawn_app_with(|c| {
                c.serve.rate_limits.address = 2; // bursts of 4
                c.serve.rate_limits.trusted_hops = 1;
            })
            .await,
        );
    }
    let event = apps[0].create_event("flooded", 1_000).await;

    let started = Instant::now();
    let (mut sold, mut limited) = (0, Vec::new());
    for i in 0..120 {
        let key = format!("flood-{i}");
        let (reply, retry_after) = purchase_from(&apps[i % 3], event, &key, "198.51.100.1").await;
        match reply.status {
            StatusCode::OK => sold += 1,
            StatusCode::TOO_MANY_REQUESTS => {
                assert_eq!(reply.code(), "RATE_LIMITED");
                assert_eq!(
                    retry_after.as_deref(),
                    Some("1"),
                    "a token comes back in 200 ms"
                );
                limited.push(key);
            }
            other => panic!("{other}: {}", reply.body),
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    // Each replica: a burst of 4, then 2 a second.
    let most = 3.0 * (4.0 + 2.0 * seconds).ceil();
    assert!(!limited.is_empty(), "{sold} sold, none limited");
    assert!(
        f64::from(sold) <= most,
        "{sold} sold in {seconds:.2} s, at most {most}"
    );

    // Another client, at the same replicas at the same time, is not held back.
    for i in 0..6 {
        let (reply, _) =
            purchase_from(&apps[i % 3], event, &format!("other-{i}"), "198.51.100.2").await;
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
    }

    // A limited request did nothing: no record, no seat.
    let mut redis = env.redis_now().await;
    for key in &limited {
        let kept: bool = redis.exists(env.record_key(event, key)).await.unwrap();
        assert!(!kept, "{key} was recorded");
    }
    assert_eq!(env.redis_sold(event).await, i64::from(sold) + 6);
}

#[tokio::test]
async fn a_buyer_is_limited_by_their_token_not_by_the_address_they_share() {
    let env = TestEnv::new().await;
    let app = env
        .spawn_app_with(|c| {
            c.serve.rate_limits.buyer = 1; // bursts of 2
            c.serve.rate_limits.address = 1_000;
        })
        .await;
    let event = app.create_event("buyers", 100).await;
    let (flooder, neighbour) = (buyer_token("flooder"), buyer_token("neighbour"));

    let started = Instant::now();
    let mut answers = Vec::new();
    for i in 0..10 {
        let reply = app
            .purchase_as(event, &format!("f-{i}"), 1, Some(&flooder))
            .await;
        answers.push(reply.status);
    }
    let sold = answers.iter().filter(|s| **s == StatusCode::OK).count();
    let most = 2 + started.elapsed().as_secs_f64().ceil() as usize;
    assert!(
        sold >= 2 && sold <= most,
        "{sold} sold, at most {most}: {answers:?}"
    );
    assert!(answers.contains(&StatusCode::TOO_MANY_REQUESTS));
    // The scheme's case does not matter: still this buyer, still limited.
    let mut lowercase = Vec::new();
    for i in 0..5 {
        let request = app
            .client
            .post(app.url(&format!("/api/v1/events/{event}/purchase")))
            .header("Idempotency-Key", format!("f-lower-{i}"))
            .header("Authorization", format!("bearer {flooder}"))
            .json(&json!({ "quantity": 1 }));
        lowercase.push(app.send(request).await.status);
    }
    assert!(
        lowercase.contains(&StatusCode::TOO_MANY_REQUESTS),
        "{lowercase:?}"
    );
    let sold = sold + lowercase.iter().filter(|s| **s == StatusCode::OK).count();

    // The same address, another buyer: their own bucket.
    let reply = app.purchase_as(event, "n-1", 1, Some(&neighbour)).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
    assert_eq!(env.redis_sold(event).await, sold as i64 + 1);
}
