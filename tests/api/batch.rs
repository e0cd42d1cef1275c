//! One script call decides many purchases of an event (`lua/purchase.lua`, `batch`):
//! each is decided as if it had the call to itself, in order.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use boxoffice::domain::{IdempotencyKey, Quantity};
use boxoffice::gate::script::{Ask, Reply as Decided};
use redis::AsyncCommands;
use redis::streams::StreamRangeReply;
use reqwest::StatusCode;
use uuid::Uuid;

use crate::harness::{TestEnv, buy_until_answered, rush};
use crate::processes::{Persistence, PrivateRedis, on_private_servers};

fn ask(key: &str, quantity: u8) -> Ask {
    Ask::purchase(
        IdempotencyKey::try_from(key.to_owned()).unwrap(),
        Quantity::try_from(i64::from(quantity)).unwrap(),
        Uuid::now_v7(),
    )
}

fn purchase_id(ask: &Ask) -> Uuid {
    match ask {
        Ask::Purchase { purchase_id, .. } => *purchase_id,
        other => panic!("not a purchase: {other:?}"),
    }
}

/// The event's stream entries, as field maps, oldest first.
async fn entries(env: &TestEnv, event: Uuid) -> Vec<BTreeMap<String, String>> {
    let reply: StreamRangeReply = env
        .redis_now()
        .await
        .xrange_all(env.stream_key(event))
        .await
        .unwrap();
    reply
        .ids
        .iter()
        .map(|entry| {
            entry
                .map
                .iter()
                .map(|(field, value)| (field.clone(), redis::from_redis_value_ref(value).unwrap()))
                .collect()
        })
        .collect()
}

#[tokio::test]
async fn one_call_decides_repeated_keys_refusals_and_the_last_seats_in_order() {
    let env = TestEnv::new().await;
    let app = env.spawn_app_with(|c| c.serve.consumer = false).await;
    let event = app.create_event("batch", 5).await;
    let (_stores, gate) = env.gate().await;

    let asks = [
        ask("a", 3),
        ask("b", 3), // 2 left: refused
        ask("a", 3), // the same key again: what the first got
        ask("c", 2), // a smaller purchase after a refusal still gets the last 2
        ask("d", 1), // sold out
        ask("a", 5), // another quantity: the record comes back, the API says 422
    ];
    let replies = gate.seller().call(event, &asks).await.unwrap();
    let sold_a = format!("S3:2:{}", purchase_id(&asks[0]).simple());
    let sold_c = format!("S2:0:{}", purchase_id(&asks[3]).simple());
    assert_eq!(
        replies,
        [
            Decided::New(sold_a.clone()),
            Decided::New("X3".into()),
            Decided::Replay(sold_a.clone()),
            Decided::New(sold_c),
            Decided::New("X1".into()),
            Decided::Replay(sold_a),
        ]
    );
    // One stream entry per sale, in order, each with the seats left after it.
    let sales = entries(&env, event).await;
    let sold: Vec<(&str, &str, &str)> = sales
        .iter()
        .map(|e| (e["k"].as_str(), e["q"].as_str(), e["r"].as_str()))
        .collect();
    assert_eq!(sold, [("a", "3", "2"), ("c", "2", "0")]);
    let counters: BTreeMap<String, String> = env
        .redis_now()
        .await
        .hgetall(format!("{}:{{{event}}}:inv", env.prefix))
        .await
        .unwrap();
    assert_eq!(
        (
            &*counters["sold"],
            &*counters["purchases"],
            &*counters["rejected"]
        ),
        ("5", "2", "2")
    );

    // The API reads the same records back.
    let again = app.purchase_event(event, "a", 3).await;
    assert_eq!(again.status, StatusCode::OK);
    assert!(again.replayed);
    assert_eq!(
        again.body["purchaseId"],
        purchase_id(&asks[0]).to_string().as_str()
    );
    assert_eq!(app.purchase_event(event, "b", 3).await.code(), "SOLD_OUT");
    assert_eq!(
        app.purchase_event(event, "a", 5).await.code(),
        "IDEMPOTENCY_KEY_REUSED"
    );
}

#[tokio::test]
async fn a_crowd_larger_than_the_cap_is_sold_in_calls_of_at_most_the_cap() {
    let env = TestEnv::new().await;
    let app = env
        .spawn_app_with(|c| {
            c.serve.consumer = false; // it would trim the stream this test reads
            c.common.store.purchase_batch = 4;
        })
        .await;
    let event = app.create_event("capped", 30).await;

    let replies = rush(&[&app], event, 40, 40, |_| 1, |i| format!("cap-{i}")).await;
    let mut remaining = BTreeSet::new();
    for (key, _, reply) in &replies {
        match reply.status {
            StatusCode::OK => assert!(
                remaining.insert(reply.body["seatsRemaining"].as_i64().unwrap()),
                "{key}: a seat count given twice"
            ),
            _ => assert_eq!(reply.code(), "SOLD_OUT", "{key}: {:?}", reply.body),
        }
    }
    // 30 sales, each told a different count of seats left: exactly 29 down to 0.
    assert_eq!(remaining, (0..30).collect());
    assert_eq!(env.redis_sold(event).await, 30);

    // The sales of one call share its time; no call carried more than the cap, and
    // the crowd did share calls.
    let mut per_call = BTreeMap::<String, usize>::new();
    for entry in entries(&env, event).await {
        *per_call.entry(entry["t"].clone()).or_default() += 1;
    }
    assert_eq!(per_call.values().sum::<usize>(), 30);
    assert!(per_call.values().all(|&n| n <= 4), "{per_call:?}");
    assert!(per_call.values().any(|&n| n > 1), "{per_call:?}");
}

#[tokio::test]
async fn a_call_redis_refuses_fails_each_of_its_purchases_and_writes_nothing() {
    let env = TestEnv::new().await;
    let app = env
        .spawn_app_with(|c| {
            c.serve.consumer = false;
            c.common.store.purchase_batch = 8;
        })
        .await;
    let event = app.create_event("refused", 100).await;
    // Something else wrote the event's stream key: the script refuses before writing.
    let mut redis = env.redis_now().await;
    let _: () = redis.del(env.stream_key(event)).await.unwrap();
    let _: () = redis
        .set(env.stream_key(event), "not a stream")
        .await
        .unwrap();

    let replies = rush(&[&app], event, 20, 20, |_| 2, |i| format!("no-{i}")).await;
    for (key, _, reply) in &replies {
        assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE, "{key}");
    }
    assert_eq!(env.redis_sold(event).await, 0);
    let recorded: Vec<String> = redis
        .keys(format!("{}:{{{event}}}:idem:*", env.prefix))
        .await
        .unwrap();
    assert!(recorded.is_empty(), "{recorded:?}");

    // Once the key is a stream again, the same requests sell, once each.
    let _: () = redis.del(env.stream_key(event)).await.unwrap();
    let replies = rush(&[&app], event, 20, 20, |_| 2, |i| format!("no-{i}")).await;
    assert!(replies.iter().all(|(_, _, r)| r.status == StatusCode::OK));
    assert_eq!(env.redis_sold(event).await, 40);
    assert_eq!(entries(&env, event).await.len(), 20);
}

/// Blocks the Redis server at `url` for `busy`, as a slow command would.
async fn stall(url: String, busy: Duration) {
    let client = redis::Client::open(url.as_str()).unwrap();
    let config =
        redis::AsyncConnectionConfig::new().set_response_timeout(Some(Duration::from_secs(10)));
    let mut conn = client
        .get_multiplexed_async_connection_with_config(&config)
        .await
        .unwrap();
    let spin = "local t = redis.call('TIME') local until_ = t[1] * 1e6 + t[2] + ARGV[1] \
                repeat t = redis.call('TIME') until t[1] * 1e6 + t[2] >= until_ return 1";
    let _: i64 = redis::Script::new(spin)
        .arg(busy.as_micros() as u64)
        .invoke_async(&mut conn)
        .await
        .unwrap();
}

#[tokio::test]
async fn purchases_of_a_timed_out_call_get_503_and_their_retries_sell_once() {
    on_private_servers(async {
        let redis = PrivateRedis::start(Persistence::Snapshot).await;
        let env = TestEnv::with_redis(&redis.url()).await;
        let app = env
            .spawn_app_with(|c| {
                c.serve.consumer = false; // it would trim the stream this test reads
                c.common.store.purchase_batch = 8;
                c.common.store.redis_timeout_ms = 200;
            })
            .await;
        let event = app.create_event("stalled", 100).await;

        let stalled = tokio::spawn(stall(redis.url(), Duration::from_millis(900)));
        tokio::time::sleep(Duration::from_millis(50)).await;
        let first = rush(&[&app], event, 24, 24, |_| 1, |i| format!("slow-{i}")).await;
        stalled.await.unwrap();
        let failed = first
            .iter()
            .filter(|(_, _, r)| r.status == StatusCode::SERVICE_UNAVAILABLE)
            .count();
        assert!(failed > 0, "no call timed out");
        assert!(
            first.iter().all(|(_, _, r)| matches!(
                r.status,
                StatusCode::OK | StatusCode::SERVICE_UNAVAILABLE
            ))
        );

        // Timed out is not undone: Redis ran those calls once it could. A retry gets
        // the sale that was made, or makes it; never a second one.
        let url = app.url(&format!("/api/v1/events/{event}/purchase"));
        let client = reqwest::Client::new();
        let mut ids = BTreeSet::new();
        for (key, _, reply) in &first {
            let (again, _) =
                buy_until_answered(&client, &url, key, 1, Duration::from_secs(10)).await;
            let again = again.expect("answered");
            assert_eq!(again.status, StatusCode::OK, "{key}");
            if reply.status == StatusCode::OK {
                assert_eq!(again.body["purchaseId"], reply.body["purchaseId"]);
            }
            ids.insert(again.body["purchaseId"].as_str().unwrap().to_owned());
        }
        assert_eq!(ids.len(), 24);
        assert_eq!(env.redis_sold(event).await, 24);
        assert_eq!(entries(&env, event).await.len(), 24);
    })
    .await;
}
