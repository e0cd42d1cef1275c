//! On Redis in cluster mode. A cluster refuses a command or script whose keys hash
//! to different slots, and every event's keys share a slot of their own (the hash
//! tag), so nothing the service sends may name two events' keys. One node serving
//! every slot checks exactly that, without the redirections of several nodes.

use std::time::Duration;

use redis::AsyncCommands;
use reqwest::StatusCode;
use uuid::Uuid;

use crate::harness::{TestEnv, buyer_token};
use crate::processes::{PrivateRedis, on_private_servers};

#[tokio::test]
async fn every_operation_works_on_a_cluster_and_every_sale_reaches_postgresql() {
    on_private_servers(async {
        let redis = PrivateRedis::cluster_of_one().await;
        let env = TestEnv::with_redis(&redis.url()).await;
        let app = env.spawn_app().await;
        let events: Vec<Uuid> = [
            app.create_event("one", 10).await,
            app.create_event("two", 10).await,
            app.create_event("three", 10).await,
        ]
        .into();
        for (i, event) in events.iter().enumerate() {
            let sold = app.purchase_event(*event, &format!("buy-{i}"), 2).await;
            assert_eq!(sold.status, StatusCode::OK, "{}", sold.body);
            let again = app.purchase_event(*event, &format!("buy-{i}"), 2).await;
            assert!(again.replayed);
            let kept = app.hold(*event, &format!("keep-{i}"), 1, None).await;
            let kept = kept.body["holdId"].as_str().unwrap().to_owned();
            assert_eq!(app.confirm(*event, &kept).await.status, StatusCode::OK);
            let dropped = app.hold(*event, &format!("drop-{i}"), 1, None).await;
            let dropped = dropped.body["holdId"].as_str().unwrap().to_owned();
            assert_eq!(
                app.release(*event, &dropped).await.0,
                StatusCode::NO_CONTENT
            );
        }
        // Every event's sales reach PostgreSQL: the consumer reads each stream.
        for event in &events {
            env.wait_for_rows(*event, 2, Duration::from_secs(15)).await;
        }
        let sale = app.purchase_event(events[0], "to-cancel", 1).await;
        env.wait_for_rows(events[0], 3, Duration::from_secs(15))
            .await;
        let purchase = sale.body["purchaseId"].as_str().unwrap();
        assert_eq!(app.cancel(events[0], purchase).await.status, StatusCode::OK);
        // What only Redis holds is lost with it (docs/operations.md, "Durability"):
        // the loss below comes once PostgreSQL has everything.
        env.wait_for_cancellation(purchase, Duration::from_secs(15))
            .await;

        // Reads across events, and a waiting room.
        assert_eq!(app.get("/api/v1/events").await.status, StatusCode::OK);
        let stats = app.get("/api/v1/stats").await;
        assert_eq!(stats.body["global"]["events"], 4, "{}", stats.body);
        let queued = app.create_queued_event(3_600_000, 1, 60).await;
        let join = app
            .send(
                app.client
                    .post(app.url(&format!("/api/v1/events/{queued}/queue")))
                    .bearer_auth(buyer_token("cluster buyer")),
            )
            .await;
        assert_eq!(join.status, StatusCode::ACCEPTED, "{}", join.body);

        // Redis loses everything: each event comes back from PostgreSQL and its stream.
        env.lose_redis_data().await;
        let inventory = format!("{}:{{{}}}:inv", env.prefix, events[0]);
        let kept: bool = env.redis_now().await.exists(inventory).await.unwrap();
        assert!(!kept, "the data was lost");
        for (i, event) in events.iter().enumerate() {
            let again = app.purchase_event(*event, &format!("buy-{i}"), 2).await;
            assert!(again.replayed, "{}", again.body);
            // Two bought, one held and confirmed; the first event's third cancelled.
            assert_eq!(app.event(*event).await["seatsSold"], 3);
        }
        assert_eq!(app.get("/health/ready").await.status, StatusCode::OK);
    })
    .await;
}
