use reqwest::StatusCode;

use crate::helpers::{AppOptions, TestEnv};

#[tokio::test]
async fn health_probes_answer() {
    let env = TestEnv::new().await;
    let app = env.spawn_app(AppOptions::default()).await;

    for path in ["/health", "/health/live"] {
        let reply = app.get(path).await;
        assert_eq!(reply.status, StatusCode::OK, "{path}");
        assert_eq!(reply.body["status"], "ok");
    }
    let ready = app.get("/health/ready").await;
    assert_eq!(ready.status, StatusCode::OK);
    assert_eq!(
        (&ready.body["redis"], &ready.body["postgres"]),
        (&true.into(), &true.into())
    );
}

#[tokio::test]
async fn stats_count_this_instance_and_all_replicas() {
    let env = TestEnv::new().await;
    let a = env
        .spawn_app(AppOptions {
            default_seats: 3,
            ..AppOptions::default()
        })
        .await;
    let b = env.spawn_app(AppOptions::default()).await;

    assert_eq!(a.purchase("st-1", 2).await.status, StatusCode::OK);
    assert_eq!(b.purchase("st-2", 1).await.status, StatusCode::OK);
    assert_eq!(a.purchase("st-3", 1).await.code(), "SOLD_OUT");

    let stats = a.get("/api/v1/stats").await;
    assert_eq!(stats.status, StatusCode::OK);
    assert_eq!(stats.body["totalRequests"], 2);
    assert_eq!(stats.body["successPurchases"], 1);
    assert_eq!(stats.body["failedPurchases"], 1);
    assert!(stats.body["p95Latency"].as_f64().unwrap() > 0.0);
    assert!(stats.body["instanceId"].is_string());
    let global = &stats.body["global"];
    assert_eq!(global["seatsSold"], 3);
    assert_eq!(global["purchases"], 2);
    assert_eq!(global["soldOut"], 1);
    assert_eq!(global["events"], 1);
}
