//! Limits per buyer: the buyer is the verified `sub` of a JWT, and the gate script
//! counts their seats across purchases, holds and confirmations atomically.

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::json;
use uuid::Uuid;

use crate::harness::{BUYER_JWT_KEY, Reply, TestApp, TestEnv, buyer_token, buyer_token_signed};

async fn limited_event(app: &TestApp, seats: u32, limit: u32) -> Uuid {
    app.create_event_with(json!({
        "name": "limited",
        "totalSeats": seats,
        "maxPerBuyer": limit,
        "holdSeconds": 2,
    }))
    .await
}

#[tokio::test]
async fn an_event_with_a_limit_needs_a_valid_buyer_token_and_records_nothing_without() {
    let env = TestEnv::new().await;
    let app = env.spawn_app().await;
    let event = limited_event(&app, 10, 4).await;
    assert_eq!(app.event(event).await["maxPerBuyer"], 4);

    let none = app.purchase_as(event, "k-1", 1, None).await;
    assert_eq!(none.status, StatusCode::UNAUTHORIZED);
    assert_eq!(none.code(), "BUYER_TOKEN_REQUIRED");
    assert_eq!(
        app.hold(event, "k-2", 1, None).await.code(),
        "BUYER_TOKEN_REQUIRED"
    );
    let forged = buyer_token_signed("alice", "another-key-that-is-32-bytes-long!!", 60);
    assert_eq!(
        app.purchase_as(event, "k-1", 1, Some(&forged)).await.code(),
        "BUYER_TOKEN_INVALID"
    );
    let expired = buyer_token_signed("alice", BUYER_JWT_KEY, -5);
    assert_eq!(
        app.hold(event, "k-2", 1, Some(&expired)).await.code(),
        "BUYER_TOKEN_INVALID"
    );
    assert_eq!(
        app.purchase_as(event, "k-1", 1, Some("not-a-jwt"))
            .await
            .code(),
        "BUYER_TOKEN_INVALID"
    );

    // Nothing was recorded under the keys: with a good token they sell afresh.
    let alice = buyer_token("alice");
    let sold = app.purchase_as(event, "k-1", 1, Some(&alice)).await;
    assert_eq!(sold.status, StatusCode::OK, "{:?}", sold.body);
    assert!(!sold.replayed);
    assert_eq!(app.event(event).await["seatsSold"], 1);

    // An event without a limit works as before, token or not.
    let open = app.create_event("open", 5).await;
    assert_eq!(
        app.purchase_as(open, "o-1", 1, None).await.status,
        StatusCode::OK
    );
    assert_eq!(
        app.purchase_as(open, "o-2", 1, Some(&forged)).await.status,
        StatusCode::OK
    );
}

#[tokio::test]
async fn a_buyers_limit_holds_across_replicas_purchases_and_holds() {
    let env = TestEnv::new().await;
    let apps = env.spawn_replicas::<3>().await;
    let event = limited_event(&apps[0], 100, 4).await;
    let (alice, bob) = (buyer_token("alice"), buyer_token("bob"));

    // 30 one-seat orders each from alice and bob at once, purchases and holds
    // alternating, spread over three replicas.
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..60 {
        let app = &apps[i % 3];
        let token = if i % 2 == 0 {
            alice.clone()
        } else {
            bob.clone()
        };
        let kind = if i % 4 < 2 { "purchase" } else { "holds" };
        let (client, url) = (
            app.client.clone(),
            app.url(&format!("/api/v1/events/{event}/{kind}")),
        );
        tasks.spawn(async move {
            let response = client
                .post(url)
                .header("Idempotency-Key", format!("order-{i}"))
                .bearer_auth(&token)
                .json(&json!({"quantity": 1}))
                .send()
                .await
                .unwrap();
            (i, Reply::read(response).await)
        });
    }
    let replies = tasks.join_all().await;
    for buyer in 0..2 {
        let mine: Vec<&Reply> = replies
            .iter()
            .filter(|(i, _)| i % 2 == buyer)
            .map(|(_, r)| r)
            .collect();
        let granted = mine.iter().filter(|r| r.status.is_success()).count();
        assert_eq!(granted, 4, "buyer {buyer}");
        assert!(
            mine.iter()
                .filter(|r| !r.status.is_success())
                .all(|r| r.status == StatusCode::CONFLICT && r.code() == "BUYER_LIMIT")
        );
    }
    let body = apps[1].event(event).await;
    assert_eq!(
        body["seatsSold"].as_i64().unwrap() + body["seatsHeld"].as_i64().unwrap(),
        8
    );

    // A refusal keeps nothing: the same key is decided again, and refused again.
    let (i, refused) = replies
        .iter()
        .find(|(i, r)| i % 2 == 0 && !r.status.is_success())
        .unwrap();
    let kind = if i % 4 < 2 { "purchase" } else { "holds" };
    let again = apps[2]
        .send(
            apps[2]
                .client
                .post(apps[2].url(&format!("/api/v1/events/{event}/{kind}")))
                .header("Idempotency-Key", format!("order-{i}"))
                .bearer_auth(&alice)
                .json(&json!({"quantity": 1})),
        )
        .await;
    assert!(!again.replayed);
    assert_eq!(again.body, refused.body);

    // Releasing one of alice's holds gives her a seat back; confirming does not.
    let holds: Vec<String> = replies
        .iter()
        .filter(|(i, r)| i % 2 == 0 && r.status == StatusCode::CREATED)
        .map(|(_, r)| r.body["holdId"].as_str().unwrap().to_owned())
        .collect();
    assert!(!holds.is_empty(), "alice got some of her seats as holds");
    assert_eq!(
        apps[0]
            .purchase_as(event, "more", 1, Some(&alice))
            .await
            .code(),
        "BUYER_LIMIT"
    );
    assert_eq!(
        apps[0].release(event, &holds[0]).await.0,
        StatusCode::NO_CONTENT
    );
    for hold in &holds[1..] {
        assert_eq!(apps[1].confirm(event, hold).await.status, StatusCode::OK);
    }
    let one_more = apps[2].purchase_as(event, "more-2", 1, Some(&alice)).await;
    assert_eq!(one_more.status, StatusCode::OK, "{:?}", one_more.body);
    assert_eq!(
        apps[0]
            .purchase_as(event, "more-3", 1, Some(&alice))
            .await
            .code(),
        "BUYER_LIMIT"
    );
}

#[tokio::test]
async fn an_expired_hold_gives_its_seats_back_to_the_buyers_allowance() {
    let env = TestEnv::new().await;
    let app = env.spawn_app().await;
    let event = limited_event(&app, 10, 2).await;
    let carol = buyer_token("carol");
    assert_eq!(
        app.hold(event, "c-1", 2, Some(&carol)).await.status,
        StatusCode::CREATED
    );
    assert_eq!(
        app.purchase_as(event, "c-2", 1, Some(&carol)).await.code(),
        "BUYER_LIMIT"
    );
    tokio::time::sleep(Duration::from_millis(2_100)).await;
    assert_eq!(
        app.purchase_as(event, "c-3", 2, Some(&carol)).await.status,
        StatusCode::OK
    );
}

#[tokio::test]
async fn buyers_counts_come_back_from_postgresql_after_redis_loses_its_data() {
    let env = TestEnv::new().await;
    let app = env.spawn_app().await;
    let event = limited_event(&app, 10, 3).await;
    let (dave, erin) = (buyer_token("dave"), buyer_token("erin"));
    assert_eq!(
        app.purchase_as(event, "d-1", 3, Some(&dave)).await.status,
        StatusCode::OK
    );
    assert_eq!(
        app.hold(event, "e-1", 2, Some(&erin)).await.status,
        StatusCode::CREATED
    );
    env.wait_for_rows(event, 1, Duration::from_secs(10)).await;
    wait_for_holds(&env, event, 1).await;

    env.lose_redis_data().await;

    // dave's sale is in PostgreSQL: his allowance is still used up. erin's hold is
    // there too: it holds its seats again, and counts against her.
    assert_eq!(
        app.purchase_as(event, "d-2", 1, Some(&dave)).await.code(),
        "BUYER_LIMIT"
    );
    let body = app.event(event).await;
    assert_eq!(
        (body["seatsSold"].as_i64(), body["seatsHeld"].as_i64()),
        (Some(3), Some(2))
    );
    assert_eq!(
        app.purchase_as(event, "e-2", 2, Some(&erin)).await.code(),
        "BUYER_LIMIT"
    );
    assert_eq!(
        app.purchase_as(event, "e-3", 1, Some(&erin)).await.status,
        StatusCode::OK
    );
}

/// Waits until PostgreSQL has `count` holds of `event`.
async fn wait_for_holds(env: &TestEnv, event: uuid::Uuid, count: i64) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (n,): (i64,) = sqlx::query_as("SELECT count(*) FROM holds WHERE event_id = $1")
            .bind(event)
            .fetch_one(&env.db)
            .await
            .unwrap();
        if n == count {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{n} of {count} holds written"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
