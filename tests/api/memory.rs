//! A Redis near or at its `maxmemory` (`gate::memory`): anonymous purchases and holds
//! wait with 503 above the configured share while buyers with tokens and the ends of
//! holds go on; at the limit Redis refuses writes, which is a 503 with nothing half
//! written, and a retry of the same key sells once when room comes back.

use std::time::Duration;

use redis::AsyncCommands;
use reqwest::StatusCode;

use crate::harness::{TestApp, TestEnv, buyer_token};
use crate::processes::{Persistence, PrivateRedis, on_private_servers};

/// Sets Redis' `maxmemory` to `used × factor` (0: no limit), with `noeviction`.
async fn limit_memory(redis: &mut redis::aio::MultiplexedConnection, factor: f64) {
    let info: String = redis::cmd("INFO")
        .arg("memory")
        .query_async(redis)
        .await
        .unwrap();
    let used: f64 = info
        .lines()
        .find_map(|l| l.strip_prefix("used_memory:"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let max = (used * factor) as u64;
    for (name, value) in [
        ("maxmemory-policy", "noeviction".to_owned()),
        ("maxmemory", max.to_string()),
    ] {
        let _: () = redis::cmd("CONFIG")
            .arg("SET")
            .arg(name)
            .arg(value)
            .query_async(redis)
            .await
            .unwrap();
    }
}

/// A purchase whose answer must be 503 with `Retry-After`: its message.
async fn unavailable(app: &TestApp, path: &str, key: &str, quantity: u8) -> String {
    let response = app
        .client
        .post(app.url(path))
        .header("Idempotency-Key", key)
        .json(&serde_json::json!({ "quantity": quantity }))
        .send()
        .await
        .unwrap();
    assert_eq!(
        response.status(),
        StatusCode::SERVICE_UNAVAILABLE,
        "{path} {key}"
    );
    assert!(response.headers().contains_key("retry-after"));
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["error"], "SERVICE_UNAVAILABLE");
    body["message"].as_str().unwrap().to_owned()
}

#[tokio::test]
async fn a_nearly_full_redis_makes_anonymous_claims_wait_while_buyers_with_tokens_buy() {
    on_private_servers(async {
        let redis = PrivateRedis::start(Persistence::Snapshot).await;
        let env = TestEnv::with_redis(&redis.url()).await;
        let app = env
            .spawn_app_with(|c| {
                c.common.store.redis_memory_share = 70;
                c.serve.redis_watch_ms = 50;
            })
            .await;
        let event = app.create_event("nearly full", 10).await;
        let held = app.hold(event, "before", 1, None).await;
        assert_eq!(held.status, StatusCode::CREATED);
        let hold = held.body["holdId"].as_str().unwrap().to_owned();
        let early = app.purchase_as(event, "early", 1, None).await;
        assert_eq!(early.status, StatusCode::OK);

        let mut conn = env.redis_now().await;
        // 16 MiB of ballast, so that the tens of KB of connection buffers that come and
        // go on a loaded machine do not move the share in use across a threshold. Made
        // by Redis (SETRANGE pads with zeros) so no 16 MiB query buffer counts too.
        let _: () = conn.setrange("ballast", (16 << 20) - 1, "x").await.unwrap();
        limit_memory(&mut conn, 1.28).await; // about 78 % in use: over 70, under 85
        tokio::time::sleep(Duration::from_millis(300)).await;

        let purchase = format!("/api/v1/events/{event}/purchase");
        let message = unavailable(&app, &purchase, "anonymous", 1).await;
        assert!(message.contains("nearly full"), "{message}");
        let holds = format!("/api/v1/events/{event}/holds");
        unavailable(&app, &holds, "anonymous-hold", 1).await;
        for key in ["anonymous", "anonymous-hold"] {
            let exists: bool = conn.exists(env.record_key(event, key)).await.unwrap();
            assert!(!exists, "a refused claim records nothing");
        }

        // A key answered before is replayed: that writes nothing.
        let replayed = app.purchase_as(event, "early", 1, None).await;
        assert_eq!(replayed.status, StatusCode::OK, "{}", replayed.body);
        assert!(replayed.replayed);
        assert_eq!(replayed.body["purchaseId"], early.body["purchaseId"]);

        let token = buyer_token("signed-in");
        let bought = app.purchase_as(event, "signed-in", 1, Some(&token)).await;
        assert_eq!(bought.status, StatusCode::OK, "{}", bought.body);

        // Past halfway to the limit, buyers with tokens wait too; ends of holds go on.
        limit_memory(&mut conn, 1.03).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        let waiting = app.purchase_as(event, "signed-in-2", 1, Some(&token)).await;
        assert_eq!(
            waiting.status,
            StatusCode::SERVICE_UNAVAILABLE,
            "{}",
            waiting.body
        );
        let confirmed = app.confirm(event, &hold).await;
        assert_eq!(confirmed.status, StatusCode::OK, "{}", confirmed.body);

        let ready = app.get("/health/ready").await;
        assert_eq!(ready.status, StatusCode::OK);
        assert_eq!(ready.body["status"], "degraded");
        assert_eq!(ready.body["redisNearlyFull"], true);
        assert!(ready.body["redisMemory"].as_f64().unwrap() > 0.7);
        let metrics = app.client.get(app.url("/metrics")).send().await.unwrap();
        let metrics = metrics.text().await.unwrap();
        assert!(metrics.contains("boxoffice_redis_memory_used_ratio"));

        limit_memory(&mut conn, 0.0).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        let retried = app.purchase_as(event, "anonymous", 1, None).await;
        assert_eq!(retried.status, StatusCode::OK, "{}", retried.body);
        assert_eq!(env.redis_sold(event).await, 4);
    })
    .await;
}

#[tokio::test]
async fn a_full_redis_answers_503_with_nothing_written_and_the_retry_sells_once() {
    on_private_servers(async {
        let redis = PrivateRedis::start(Persistence::Snapshot).await;
        let env = TestEnv::with_redis(&redis.url()).await;
        let app = env
            .spawn_app_with(|c| {
                c.common.store.redis_memory_share = 100; // only Redis' own refusal
                c.serve.consumer = false; // it would trim the stream this test reads
            })
            .await;
        let event = app.create_event("full", 10).await;
        assert_eq!(
            app.purchase_event(event, "first", 2).await.status,
            StatusCode::OK
        );
        let mut conn = env.redis_now().await;
        let stream_before: u64 = conn.xlen(env.stream_key(event)).await.unwrap();

        limit_memory(&mut conn, 0.5).await;
        let purchase = format!("/api/v1/events/{event}/purchase");
        for (i, quantity) in [1, 3].into_iter().enumerate() {
            let message = unavailable(&app, &purchase, &format!("while-full-{i}"), quantity).await;
            assert!(message.contains("out of memory"), "{message}");
        }
        assert_eq!(env.redis_sold(event).await, 2, "nothing sold while full");
        let stream_now: u64 = conn.xlen(env.stream_key(event)).await.unwrap();
        assert_eq!(stream_now, stream_before, "nothing logged while full");

        limit_memory(&mut conn, 0.0).await;
        let first = app.purchase_event(event, "while-full-0", 1).await;
        assert_eq!(first.status, StatusCode::OK, "{}", first.body);
        let again = app.purchase_event(event, "while-full-0", 1).await;
        assert_eq!(again.body["purchaseId"], first.body["purchaseId"]);
        assert_eq!(env.redis_sold(event).await, 3);
    })
    .await;
}
