use std::time::Duration;

use boxoffice::reconcile::{self, Status};
use redis::AsyncCommands;
use reqwest::StatusCode;

use crate::harness::TestEnv;

#[tokio::test]
async fn reconcile_sees_sales_in_flight_and_raises_a_redis_that_fell_behind() {
    let env = TestEnv::new().await;
    let app = env.spawn_app_with(|c| c.serve.consumer = false).await;
    let event = app.create_event("audited", 100).await;
    for i in 0..5 {
        let reply = app.purchase_event(event, &format!("a-{i}"), 3).await;
        assert_eq!(reply.status, StatusCode::OK);
    }
    let (stores, gate) = env.gate().await;

    // Nothing persisted yet: the 15 seats wait in the stream, and that is consistent.
    let rows = reconcile::run(&stores, gate.recovery(), false)
        .await
        .unwrap();
    let row = rows.iter().find(|r| r.event == event).unwrap();
    assert_eq!(
        (row.redis_sold, row.persisted, row.in_stream, row.status()),
        (Some(15), 0, 15, Status::Ok)
    );

    // As after a restore from an older snapshot: Redis forgets 9 seats.
    let inventory = format!("{}:{{{event}}}:inv", env.prefix);
    let _: () = env.redis.clone().hset(&inventory, "sold", 6).await.unwrap();
    let rows = reconcile::run(&stores, gate.recovery(), false)
        .await
        .unwrap();
    let row = rows.iter().find(|r| r.event == event).unwrap();
    assert_eq!(row.status(), Status::RedisBehind);
    assert!(reconcile::table(&rows).contains("DRIFT: Redis behind"));

    let rows = reconcile::run(&stores, gate.recovery(), true)
        .await
        .unwrap();
    let row = rows.iter().find(|r| r.event == event).unwrap();
    assert_eq!((row.redis_sold, row.status()), (Some(15), Status::Ok));
    assert_eq!(env.redis_sold(event).await, 15);
}

#[tokio::test]
async fn reconcile_reports_sales_missing_from_postgres_and_the_stream() {
    let env = TestEnv::new().await;
    let app = env.spawn_app().await;
    let event = app.create_event("lossy", 100).await;
    assert_eq!(
        app.purchase_event(event, "b-1", 4).await.status,
        StatusCode::OK
    );
    env.wait_for_rows(event, 1, Duration::from_secs(10)).await;

    // Redis counts 2 seats that neither PostgreSQL nor the stream has.
    let inventory = format!("{}:{{{event}}}:inv", env.prefix);
    let _: i64 = env
        .redis
        .clone()
        .hincr(&inventory, "sold", 2)
        .await
        .unwrap();
    let (stores, gate) = env.gate().await;

    let rows = reconcile::run(&stores, gate.recovery(), true)
        .await
        .unwrap();
    let row = rows.iter().find(|r| r.event == event).unwrap();
    assert_eq!(
        (row.redis_sold, row.persisted, row.status()),
        (Some(6), 4, Status::RowsMissing)
    );
    assert_eq!(env.redis_sold(event).await, 6, "--fix never lowers Redis");
}
