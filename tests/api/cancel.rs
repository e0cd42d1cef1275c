//! Cancellations: an admin returns a sale's seats to stock (and to the buyer's
//! allowance); the row is marked through the stream; the sale's key still replays it.

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::json;
use uuid::Uuid;

use crate::harness::{TestEnv, buyer_token};

#[tokio::test]
async fn a_cancelled_sale_returns_its_seats_once_and_its_key_still_replays_it() {
    let env = TestEnv::new().await;
    let app = env.spawn_app().await;
    let event = app.create_event("cancel", 5).await;
    let sale = app.purchase_event(event, "to-cancel", 3).await;
    let id = sale.body["purchaseId"].as_str().unwrap().to_owned();
    env.wait_for_rows(event, 1, Duration::from_secs(10)).await;

    let cancelled = app.cancel(event, &id).await;
    assert_eq!(cancelled.status, StatusCode::OK, "{:?}", cancelled.body);
    let at = cancelled.body["cancelledAt"].as_str().unwrap().to_owned();
    assert_eq!(app.event(event).await["seatsRemaining"], 5);

    // Again: the same cancellation, no seats returned twice.
    let again = app.cancel(event, &id).await;
    assert_eq!(again.body["cancelledAt"].as_str(), Some(at.as_str()));
    assert_eq!(app.event(event).await["seatsRemaining"], 5);

    // The sale happened: its key replays it.
    let replay = app.purchase_event(event, "to-cancel", 3).await;
    assert_eq!(replay.status, StatusCode::OK);
    assert!(replay.replayed);
    assert_eq!(replay.body, sale.body);

    // The row is marked through the stream, at the cancellation's time.
    env.wait_for_cancellation(&id, Duration::from_secs(10))
        .await;
    let marked = env.cancelled_at(&id).await.unwrap();
    assert_eq!(marked, at.parse::<chrono::DateTime<chrono::Utc>>().unwrap());
    let shown = app
        .get(&format!("/api/v1/events/{event}/purchases/{id}"))
        .await;
    assert_eq!(shown.body["cancelledAt"].as_str(), Some(at.as_str()));
    assert_eq!(shown.body["quantity"], 3);
    // Once PostgreSQL has it, a cancellation is answered from there.
    assert_eq!(
        app.cancel(event, &id).await.body["cancelledAt"].as_str(),
        Some(at.as_str())
    );

    // The seats sell again, and recovery after a loss counts the sale out.
    assert_eq!(
        app.purchase_event(event, "after", 5).await.status,
        StatusCode::OK
    );
    env.wait_for_rows(event, 2, Duration::from_secs(10)).await;
    env.lose_redis_data().await;
    let body = app.event(event).await;
    assert_eq!(
        (body["seatsSold"].as_i64(), body["seatsRemaining"].as_i64()),
        (Some(5), Some(0))
    );
}

#[tokio::test]
async fn cancelling_gives_seats_back_to_the_buyers_allowance_and_needs_the_admin() {
    let env = TestEnv::new().await;
    let app = env.spawn_app().await;
    let event = app
        .create_event_with(json!({"name": "cancel-limit", "totalSeats": 10, "maxPerBuyer": 2}))
        .await;
    let frank = buyer_token("frank");
    let sale = app.purchase_as(event, "f-1", 2, Some(&frank)).await;
    let id = sale.body["purchaseId"].as_str().unwrap().to_owned();
    assert_eq!(
        app.purchase_as(event, "f-2", 1, Some(&frank)).await.code(),
        "BUYER_LIMIT"
    );
    env.wait_for_rows(event, 1, Duration::from_secs(10)).await;

    let anonymous = app
        .send(
            app.client
                .post(app.url(&format!("/api/v1/events/{event}/purchases/{id}/cancel"))),
        )
        .await;
    assert_eq!(anonymous.status, StatusCode::UNAUTHORIZED);
    let as_buyer = app
        .send(
            app.client
                .post(app.url(&format!("/api/v1/events/{event}/purchases/{id}/cancel")))
                .bearer_auth(&frank),
        )
        .await;
    assert_eq!(as_buyer.code(), "UNAUTHORIZED");

    assert_eq!(app.cancel(event, &id).await.status, StatusCode::OK);
    assert_eq!(
        app.purchase_as(event, "f-3", 2, Some(&frank)).await.status,
        StatusCode::OK
    );
    let unknown = Uuid::now_v7();
    assert_eq!(
        app.cancel(event, &unknown.to_string()).await.code(),
        "PURCHASE_NOT_FOUND"
    );
}

#[tokio::test]
async fn a_sale_on_its_way_to_postgresql_can_be_read_and_is_cancelled_once_recorded() {
    let env = TestEnv::new().await;
    let app = env.spawn_app_with(|c| c.serve.consumer = false).await;
    let event = app.create_event("in-transit", 5).await;
    let sale = app.purchase_event(event, "in-transit", 2).await;
    let id = sale.body["purchaseId"].as_str().unwrap().to_owned();

    let shown = app
        .get(&format!("/api/v1/events/{event}/purchases/{id}"))
        .await;
    assert_eq!(shown.status, StatusCode::OK, "{:?}", shown.body);
    assert_eq!(
        (
            shown.body["quantity"].as_i64(),
            shown.body["viaHold"].as_bool()
        ),
        (Some(2), Some(false))
    );
    assert!(shown.body.get("cancelledAt").is_none());
    let early = app.cancel(event, &id).await;
    assert_eq!(
        early.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "{:?}",
        early.body
    );
    assert_eq!(app.event(event).await["seatsRemaining"], 3);

    // A replica with a consumer writes it.
    let worker = env.spawn_app().await;
    env.wait_for_rows(event, 1, Duration::from_secs(10)).await;
    assert_eq!(worker.cancel(event, &id).await.status, StatusCode::OK);
    assert_eq!(worker.event(event).await["seatsRemaining"], 5);

    // With the consumer running, a cancellation right after the sale waits for its row.
    let next = worker.purchase_event(event, "in-transit-2", 1).await;
    let next = next.body["purchaseId"].as_str().unwrap().to_owned();
    assert_eq!(worker.cancel(event, &next).await.status, StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancellation_after_the_snapshot_stays_counted_out_when_redis_returns_to_it() {
    use crate::processes::{Persistence, PrivateRedis, on_private_servers};
    on_private_servers(async {
        let mut redis = PrivateRedis::start(Persistence::Snapshot).await;
        let env = TestEnv::with_redis(&redis.url()).await;
        let app = env.spawn_app_with(|c| c.serve.redis_watch_ms = 0).await;
        let event = app.create_event("cancel-after-snapshot", 4).await;
        let sale = app.purchase_event(event, "cancelled-later", 3).await;
        let id = sale.body["purchaseId"].as_str().unwrap().to_owned();
        env.wait_for_rows(event, 1, Duration::from_secs(10)).await;
        let _: () = redis::cmd("SAVE")
            .query_async(&mut env.redis_now().await)
            .await
            .unwrap();
        let snapshot = redis.dir().join("older.rdb");
        std::fs::copy(redis.dir().join("dump.rdb"), &snapshot).unwrap();

        let cancelled = app.cancel(event, &id).await;
        assert_eq!(cancelled.status, StatusCode::OK, "{:?}", cancelled.body);
        env.wait_for_cancellation(&id, Duration::from_secs(10))
            .await;

        redis.kill();
        std::fs::copy(&snapshot, redis.dir().join("dump.rdb")).unwrap();
        redis.restart().await;

        // The snapshot counts the sale; PostgreSQL knows it was cancelled: the seats
        // stay back on sale, and the cancellation reads as it was answered.
        let mut seats = app.get(&format!("/api/v1/events/{event}")).await;
        while seats.status == StatusCode::SERVICE_UNAVAILABLE {
            seats = app.get(&format!("/api/v1/events/{event}")).await;
        }
        assert_eq!(seats.body["seatsSold"], 0, "{:?}", seats.body);
        assert_eq!(seats.body["seatsRemaining"], 4);
        let again = app.cancel(event, &id).await;
        assert_eq!(again.body["cancelledAt"], cancelled.body["cancelledAt"]);
        assert_eq!(
            app.purchase_event(event, "after", 4).await.status,
            StatusCode::OK
        );
    })
    .await;
}
