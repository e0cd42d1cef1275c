use std::time::Duration;

use reqwest::StatusCode;

use crate::harness::TestEnv;

#[tokio::test]
async fn health_probes_answer() {
    let env = TestEnv::new().await;
    let app = env.spawn_app().await;

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
        .spawn_app_with(|c| c.serve.default_event_seats = 3)
        .await;
    let b = env.spawn_app().await;

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

    // The totals across replicas are computed at most once a second per replica.
    let event = a.create_event("later", 5).await;
    assert_eq!(
        a.purchase_event(event, "st-4", 1).await.status,
        StatusCode::OK
    );
    assert_eq!(a.get("/api/v1/stats").await.body["global"]["seatsSold"], 3);
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    let global = &a.get("/api/v1/stats").await.body["global"];
    assert_eq!(
        (&global["seatsSold"], &global["events"]),
        (&4.into(), &2.into())
    );
}

#[tokio::test]
async fn on_shutdown_readiness_fails_first_while_requests_are_still_served() {
    let env = TestEnv::new().await;
    let mut app = env.spawn_app().await;
    let (address, event) = (app.address.clone(), app.default_event);

    let stopping = app.begin_shutdown(Duration::from_millis(800));
    tokio::time::sleep(Duration::from_millis(50)).await;

    let ready = app.get("/health/ready").await;
    assert_eq!(
        (ready.status, ready.code()),
        (StatusCode::SERVICE_UNAVAILABLE, "SERVICE_UNAVAILABLE")
    );
    assert_eq!(app.get("/health/live").await.status, StatusCode::OK);
    assert_eq!(app.purchase("during-drain", 1).await.status, StatusCode::OK);

    stopping.await.unwrap();
    app.stopped().await;
    let refused = reqwest::Client::new()
        .get(format!("{address}/health/live"))
        .send()
        .await;
    assert!(refused.is_err(), "the listener is closed after the drain");
    // The consumer wrote the sale made during the drain before it stopped.
    env.wait_for_rows(event, 1, Duration::from_secs(10)).await;
}

#[tokio::test]
async fn metrics_are_served_in_prometheus_format() {
    let env = TestEnv::new().await;
    let app = env.spawn_app().await;
    assert_eq!(app.purchase("metered", 2).await.status, StatusCode::OK);
    assert_eq!(app.purchase("metered", 2).await.status, StatusCode::OK);
    let event = app.default_event;
    assert_eq!(
        app.purchase_event(event, "metered-2", 1).await.status,
        StatusCode::OK
    );

    let response = app.client.get(app.url("/metrics")).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let text = response.text().await.unwrap();
    for series in [
        r#"boxoffice_http_requests_total{route="/api/v1/purchase",method="POST",status="200"}"#,
        r#"boxoffice_http_requests_total{route="/api/v1/events/{id}/purchase",method="POST",status="200"}"#,
        "boxoffice_http_request_duration_seconds_bucket{",
        r#"boxoffice_purchases_total{outcome="sold"}"#,
        r#"boxoffice_purchases_replayed_total{outcome="sold"}"#,
        "boxoffice_seats_sold_total",
        "boxoffice_redis_script_duration_seconds_bucket{",
    ] {
        assert!(text.contains(series), "missing {series} in\n{text}");
    }
}
