use std::time::Duration;

use reqwest::StatusCode;

use crate::harness::{TestEnv, rush};

#[tokio::test]
async fn a_repeated_request_gets_the_same_answer_and_sells_once() {
    let env = TestEnv::new().await;
    let app = env.spawn_app().await;

    let first = app.purchase("retry-me", 3).await;
    let again = app.purchase("retry-me", 3).await;

    assert_eq!(first.status, StatusCode::OK);
    assert!(!first.replayed);
    assert_eq!((again.status, &again.body), (first.status, &first.body));
    assert!(again.replayed, "a replay carries Idempotent-Replayed: true");
    assert_eq!(app.get("/api/v1/event").await.body["seatsSold"], 3);
    env.wait_for_rows(app.default_event, 1, Duration::from_secs(10))
        .await;
}

#[tokio::test]
async fn a_key_reused_with_another_quantity_is_refused_and_sells_nothing() {
    let env = TestEnv::new().await;
    let app = env.spawn_app().await;
    assert_eq!(app.purchase("reused", 2).await.status, StatusCode::OK);

    let reused = app.purchase("reused", 5).await;

    assert_eq!(reused.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(reused.code(), "IDEMPOTENCY_KEY_REUSED");
    assert_eq!(app.get("/api/v1/event").await.body["seatsSold"], 2);
}

#[tokio::test]
async fn a_refusal_keeps_nothing_and_a_retry_is_decided_again() {
    let env = TestEnv::new().await;
    let app = env.spawn_app().await;
    let event = app.create_event("tiny", 1).await;
    let held = app.hold(event, "holder", 1, None).await;
    let hold = held.body["holdId"].as_str().unwrap().to_owned();

    let refused = app.purchase_event(event, "later", 1).await;
    assert_eq!(refused.code(), "SOLD_OUT");
    assert!(!refused.replayed);
    let mut redis = env.redis_now().await;
    let kept: bool = redis::AsyncCommands::exists(&mut redis, env.record_key(event, "later"))
        .await
        .unwrap();
    assert!(!kept, "a refusal keeps a record");

    // While the event stays sold out, the retry gets the same answer, decided again.
    let again = app.purchase_event(event, "later", 1).await;
    assert_eq!((again.status, &again.body), (refused.status, &refused.body));
    assert!(!again.replayed);

    // Seats came back: the refused key sold nothing, so it may buy them, once.
    assert_eq!(app.release(event, &hold).await.0, StatusCode::NO_CONTENT);
    let bought = app.purchase_event(event, "later", 1).await;
    assert_eq!(bought.status, StatusCode::OK, "{}", bought.body);
    assert!(!bought.replayed);
    let replay = app.purchase_event(event, "later", 1).await;
    assert!(replay.replayed);
    assert_eq!(replay.body["purchaseId"], bought.body["purchaseId"]);
    assert_eq!(app.event(event).await["seatsSold"], 1);
}

#[tokio::test]
async fn keys_are_scoped_to_an_event() {
    let env = TestEnv::new().await;
    let app = env.spawn_app().await;
    let (a, b) = (
        app.create_event("a", 10).await,
        app.create_event("b", 10).await,
    );

    let in_a = app.purchase_event(a, "shared-key", 1).await;
    let in_b = app.purchase_event(b, "shared-key", 1).await;

    assert!(!in_a.replayed && !in_b.replayed);
    assert_ne!(in_a.body["purchaseId"], in_b.body["purchaseId"]);
    assert_eq!(app.event(a).await["seatsSold"], 1);
    assert_eq!(app.event(b).await["seatsSold"], 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_key_fired_at_three_instances_at_once_sells_once() {
    let env = TestEnv::new().await;
    let apps = env.spawn_replicas::<3>().await;
    let event = apps[0].create_event("one key", 100).await;

    let replies = rush(
        &[&apps[0], &apps[1], &apps[2]],
        event,
        60,
        60,
        |_| 4,
        |_| "the-same-key".to_string(),
    )
    .await;

    let first = &replies[0].2;
    for (_, _, reply) in &replies {
        assert_eq!((reply.status, &reply.body), (StatusCode::OK, &first.body));
    }
    let originals = replies.iter().filter(|(_, _, r)| !r.replayed).count();
    assert_eq!(originals, 1, "exactly one request made the sale");
    assert_eq!(apps[1].event(event).await["seatsSold"], 4);
    env.wait_for_rows(event, 1, Duration::from_secs(10)).await;
}

#[tokio::test]
async fn an_expired_key_may_buy_again_and_both_sales_are_persisted() {
    let env = TestEnv::new().await;
    let app = env
        .spawn_app_with(|c| c.common.store.idempotency_ttl = 1)
        .await;

    let first = app.purchase("short-lived", 1).await;
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let second = app.purchase("short-lived", 1).await;

    assert_eq!(
        (first.status, second.status),
        (StatusCode::OK, StatusCode::OK)
    );
    assert!(!second.replayed);
    assert_ne!(first.body["purchaseId"], second.body["purchaseId"]);
    env.wait_for_rows(app.default_event, 2, Duration::from_secs(10))
        .await;
}
