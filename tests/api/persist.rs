use std::time::Duration;

use redis::AsyncCommands;
use redis::streams::{StreamReadOptions, StreamReadReply};
use reqwest::StatusCode;
use tokio_util::sync::CancellationToken;

use crate::harness::TestEnv;

#[tokio::test]
async fn sales_made_while_the_consumer_is_stopped_are_written_when_it_starts() {
    let env = TestEnv::new().await;
    let app = env.spawn_app_with(|c| c.serve.consumer = false).await;
    let event = app.default_event;
    for i in 0..40 {
        let reply = app
            .purchase(&format!("offline-{i}"), (i % 3 + 1) as u8)
            .await;
        assert_eq!(reply.status, StatusCode::OK);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(env.rows(event).await.is_empty(), "nothing consumes yet");

    let stop = CancellationToken::new();
    let consumer = tokio::spawn(env.consumer("late-worker", 30_000).await.run(stop.clone()));
    env.wait_for_rows(event, 40, Duration::from_secs(10)).await;
    stop.cancel();
    consumer.await.unwrap();

    let persisted: i64 = env.rows(event).await.iter().map(|r| i64::from(r.2)).sum();
    assert_eq!(persisted, env.redis_sold(event).await);
    // Acknowledged entries are trimmed, so the stream does not grow without bound.
    let len: usize = env.redis.clone().xlen(env.stream_key(event)).await.unwrap();
    assert!(len <= 1, "stream still holds {len} entries");
}

#[tokio::test]
async fn entries_left_pending_by_a_dead_consumer_are_reclaimed() {
    let env = TestEnv::new().await;
    let app = env.spawn_app_with(|c| c.serve.consumer = false).await;
    let event = app.default_event;
    for i in 0..25 {
        assert_eq!(
            app.purchase(&format!("orphan-{i}"), 1).await.status,
            StatusCode::OK
        );
    }
    // A consumer reads the entries, then dies before writing or acknowledging them.
    let options = StreamReadOptions::default()
        .group("persist", "doomed")
        .count(100);
    let taken: StreamReadReply = env
        .redis
        .clone()
        .xread_options(&[env.stream_key(event)], &[">"], &options)
        .await
        .unwrap();
    assert_eq!(taken.keys[0].ids.len(), 25);
    // The removal script refuses a consumer that still holds entries.
    let forget = redis::Script::new(include_str!("../../lua/forget_consumer.lua"));
    let removed: i64 = forget
        .key(env.stream_key(event))
        .arg("persist")
        .arg("doomed")
        .invoke_async(&mut env.redis.clone())
        .await
        .unwrap();
    assert_eq!(removed, 0, "a consumer holding entries was removed");
    // And one that joined and left without reading anything.
    let _: i64 = redis::cmd("XGROUP")
        .arg("CREATECONSUMER")
        .arg(env.stream_key(event))
        .arg("persist")
        .arg("idle-ghost")
        .query_async(&mut env.redis.clone())
        .await
        .unwrap();

    let stop = CancellationToken::new();
    let survivor = tokio::spawn(env.consumer("survivor", 300).await.run(stop.clone()));
    env.wait_for_rows(event, 25, Duration::from_secs(15)).await;

    // Both leave the group once silent for ten claim timeouts (3 s here) with nothing
    // pending; "doomed" only after its entries were taken over.
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    loop {
        let info: redis::streams::StreamInfoConsumersReply = env
            .redis
            .clone()
            .xinfo_consumers(env.stream_key(event), "persist")
            .await
            .unwrap();
        let names: Vec<String> = info.consumers.into_iter().map(|c| c.name).collect();
        if names == ["survivor"] {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "still in the group: {names:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    stop.cancel();
    survivor.await.unwrap();

    let pending: redis::streams::StreamPendingReply = env
        .redis
        .clone()
        .xpending(env.stream_key(event), "persist")
        .await
        .unwrap();
    assert_eq!(pending.count(), 0, "every reclaimed entry was acknowledged");
}

#[tokio::test]
async fn an_event_lost_from_redis_is_reloaded_with_its_persisted_sales() {
    let env = TestEnv::new().await;
    let app = env.spawn_app().await;
    let event = app.create_event("reload", 50).await;
    for i in 0..5 {
        assert_eq!(
            app.purchase_event(event, &format!("r-{i}"), 2).await.status,
            StatusCode::OK
        );
    }
    env.wait_for_rows(event, 5, Duration::from_secs(10)).await;

    let inventory = format!("{}:{{{event}}}:inv", env.prefix);
    let _: () = env.redis.clone().del(&inventory).await.unwrap();

    let seats = app.event(event).await;
    assert_eq!(seats["seatsSold"], 10, "sold comes back from PostgreSQL");
    for i in 0..4 {
        let reply = app.purchase_event(event, &format!("after-{i}"), 10).await;
        assert_eq!(reply.body["seatsRemaining"], 30 - 10 * i, "{reply:?}");
    }
    assert_eq!(
        app.purchase_event(event, "over", 1).await.code(),
        "SOLD_OUT"
    );
}

#[tokio::test]
async fn retries_after_redis_lost_an_event_are_replayed_not_sold_again() {
    let env = TestEnv::new().await;
    let app = env.spawn_app().await;
    let event = app.create_event("lost", 10).await;
    let mut first = Vec::new();
    for i in 0..3 {
        let reply = app.purchase_event(event, &format!("l-{i}"), 2).await;
        assert_eq!(reply.status, StatusCode::OK);
        first.push(reply.body["purchaseId"].clone());
    }
    env.wait_for_rows(event, 3, Duration::from_secs(10)).await;

    // Every key of the event gone, as after a FLUSHALL (the script stays loaded).
    let mut redis = env.redis.clone();
    let keys: Vec<String> = redis
        .keys(format!("{}:{{{event}}}:*", env.prefix))
        .await
        .unwrap();
    assert!(keys.len() >= 4, "{keys:?}");
    let _: () = redis.del(&keys).await.unwrap();

    for (i, purchase_id) in first.iter().enumerate() {
        let again = app.purchase_event(event, &format!("l-{i}"), 2).await;
        assert_eq!(again.status, StatusCode::OK);
        assert!(again.replayed, "l-{i} sold again");
        assert_eq!(&again.body["purchaseId"], purchase_id);
    }
    let fresh = app.purchase_event(event, "l-new", 2).await;
    assert_eq!(fresh.body["seatsRemaining"], 2, "{fresh:?}");
    env.wait_for_rows(event, 4, Duration::from_secs(10)).await;
}

/// A sale as `lua/purchase.lua` writes it to a stream, by hand.
async fn append_sale(env: &TestEnv, event: uuid::Uuid, key: &str, quantity: i64) {
    let micros = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_micros()
        .to_string();
    let id = uuid::Uuid::now_v7().simple().to_string();
    let fields = [
        ("p", id.as_str()),
        ("k", key),
        ("q", &quantity.to_string()),
        ("r", "0"),
        ("t", &micros),
    ];
    let _: String = env
        .redis_now()
        .await
        .xadd(env.stream_key(event), "*", &fields)
        .await
        .unwrap();
}

#[tokio::test]
async fn a_sale_postgres_refuses_for_good_is_parked_and_the_rest_go_on() {
    let env = TestEnv::new().await;
    let app = env.spawn_app().await;
    let event = app.create_event("parking", 100).await;
    assert_eq!(
        app.purchase_event(event, "p-1", 1).await.status,
        StatusCode::OK
    );
    // A quantity the table's CHECK refuses, between two good sales of the event...
    append_sale(&env, event, "p-bad", 50).await;
    let _: i64 = env
        .redis_now()
        .await
        .hincr(format!("{}:{{{event}}}:inv", env.prefix), "sold", 50)
        .await
        .unwrap();
    assert_eq!(
        app.purchase_event(event, "p-2", 1).await.status,
        StatusCode::OK
    );
    // ...and a stream of an event PostgreSQL does not have (a foreign key refuses it).
    let stranger = uuid::Uuid::now_v7();
    append_sale(&env, stranger, "s-1", 2).await;
    let _: i64 = env
        .redis_now()
        .await
        .sadd(format!("{}:events", env.prefix), stranger.to_string())
        .await
        .unwrap();
    assert_eq!(
        app.purchase_event(event, "p-3", 1).await.status,
        StatusCode::OK
    );

    // The good sales are written; the two refused ones wait, parked, with the reason.
    env.wait_for_rows(event, 3, Duration::from_secs(10)).await;
    let parked = |event: uuid::Uuid| format!("{}:{{{event}}}:dead", env.prefix);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let mut redis = env.redis_now().await;
        let here: usize = redis.xlen(parked(event)).await.unwrap();
        let there: usize = redis.xlen(parked(stranger)).await.unwrap();
        if (here, there) == (1, 1) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "parked: {here}, {there}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let dead: redis::streams::StreamRangeReply = env
        .redis_now()
        .await
        .xrange_all(parked(event))
        .await
        .unwrap();
    let reason: String = dead.ids[0].get("reason").unwrap();
    assert!(reason.contains("23514"), "{reason}");

    let (stores, gate) = env.gate().await;
    let rows = boxoffice::reconcile::run(&stores, gate.recovery(), false)
        .await
        .unwrap();
    let row = rows.iter().find(|r| r.event == event).unwrap();
    assert_eq!(
        (row.persisted, row.parked, row.status()),
        (3, 50, boxoffice::reconcile::Status::Parked)
    );

    // Once the cause is fixed, `reconcile --fix` sends the sale back and it is written.
    sqlx::query("INSERT INTO events (id, name, total_seats) VALUES ($1, 'late', 10)")
        .bind(stranger)
        .execute(&env.db)
        .await
        .unwrap();
    let rows = boxoffice::reconcile::run(&stores, gate.recovery(), true)
        .await
        .unwrap();
    let late = rows.iter().find(|r| r.event == stranger).unwrap();
    assert_eq!(late.redis_sold, Some(2), "{late:?}");
    env.wait_for_rows(stranger, 1, Duration::from_secs(10))
        .await;
}

#[tokio::test]
async fn trimming_removes_only_what_the_group_acknowledged() {
    let env = TestEnv::new().await;
    let stream = env.stream_key(uuid::Uuid::now_v7());
    let mut redis = env.redis_now().await;
    let _: () = redis
        .xgroup_create_mkstream(&stream, "persist", "0")
        .await
        .unwrap();
    for i in 1..=6 {
        let _: String = redis
            .xadd(&stream, format!("{i}-0"), &[("n", i)])
            .await
            .unwrap();
    }
    // Four delivered, of which 1, 2 and 4 acknowledged; 5 and 6 never delivered.
    let options = StreamReadOptions::default().group("persist", "c").count(4);
    let _: StreamReadReply = redis
        .xread_options(&[&stream], &[">"], &options)
        .await
        .unwrap();
    let _: i64 = redis
        .xack(&stream, "persist", &["1-0", "2-0", "4-0"])
        .await
        .unwrap();
    let trim = redis::Script::new(include_str!("../../lua/trim.lua"));
    let removed = async || -> i64 {
        let mut redis = env.redis_now().await;
        trim.key(&stream)
            .arg("persist")
            .invoke_async(&mut redis)
            .await
            .unwrap()
    };
    assert_eq!(
        removed().await,
        2,
        "below the oldest pending entry (3) only"
    );
    let _: i64 = redis.xack(&stream, "persist", &["3-0"]).await.unwrap();
    assert_eq!(
        removed().await,
        2,
        "up to the last delivered (4), not the undelivered 5 and 6"
    );
    let left: redis::streams::StreamRangeReply = redis.xrange_all(&stream).await.unwrap();
    let ids: Vec<&str> = left.ids.iter().map(|e| e.id.as_str()).collect();
    assert_eq!(ids, ["5-0", "6-0"]);
}

#[tokio::test]
async fn a_release_written_before_its_hold_still_ends_the_hold_in_postgresql() {
    let env = TestEnv::new().await;
    let app = env.spawn_app().await;
    let event = app.create_event("release-first", 10).await;
    // Two consumers may write a hold's entries in either order: here the release
    // reaches PostgreSQL first (it is first in the stream), then the hold itself.
    let id = uuid::Uuid::now_v7().simple().to_string();
    let now_ms = chrono::Utc::now().timestamp_millis();
    let (made, expires) = ((now_ms * 1000).to_string(), (now_ms + 60_000).to_string());
    let hold = [
        ("p", id.as_str()),
        ("k", "release-first"),
        ("q", "2"),
        ("r", "8"),
        ("x", &expires),
        ("m", &made),
    ];
    let released_at = ((now_ms + 1) * 1000).to_string();
    // The release carries its hold under names of its own (`src/records.rs`).
    let release = [
        ("p", id.as_str()),
        ("q", "2"),
        ("d", &released_at),
        ("k", "release-first"),
        ("hl", "8"),
        ("hx", &expires),
        ("hm", &made),
    ];
    let mut redis = env.redis_now().await;
    for fields in [&release[..], &hold[..]] {
        let entry: String = redis
            .xadd(env.stream_key(event), "*", fields)
            .await
            .unwrap();
        // Each in a batch of its own: written and acknowledged before the next.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let groups: redis::streams::StreamInfoGroupsReply =
                redis.xinfo_groups(env.stream_key(event)).await.unwrap();
            if groups
                .groups
                .iter()
                .any(|g| g.last_delivered_id == entry && g.pending == 0)
            {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{entry} was never written"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let row: Option<(Option<chrono::DateTime<chrono::Utc>>,)> =
            sqlx::query_as("SELECT released_at FROM holds WHERE id = $1")
                .bind(id.parse::<uuid::Uuid>().unwrap())
                .fetch_optional(&env.db)
                .await
                .unwrap();
        match row {
            Some((Some(_),)) => return,
            Some((None,)) => panic!("the hold was written without its release"),
            None => {}
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the hold never reached PostgreSQL"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_in_flight_when_redis_loses_its_data_is_counted_by_the_recovery() {
    let env = TestEnv::new().await;
    let app = env
        .spawn_app_with(|c| {
            c.serve.redis_watch_ms = 0;
            c.serve.consumer = false;
        })
        .await;
    let event = app.create_event("in-flight", 10).await;
    for i in 0..5 {
        let sold = app.purchase_event(event, &format!("flight-{i}"), 2).await;
        assert_eq!(sold.status, StatusCode::OK, "{:?}", sold.body);
    }
    // A consumer reads the five sales in one batch; its write is held up in
    // PostgreSQL (the table locked)...
    let mut blocker = env.db.begin().await.unwrap();
    sqlx::query("LOCK TABLE purchases IN ACCESS EXCLUSIVE MODE")
        .execute(&mut *blocker)
        .await
        .unwrap();
    let stop = CancellationToken::new();
    let consumer = tokio::spawn(env.consumer("in-flight", 60_000).await.run(stop.clone()));
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (waiting,): (i64,) = sqlx::query_as(
            "SELECT count(*) FROM pg_stat_activity
             WHERE wait_event_type = 'Lock' AND query LIKE 'INSERT INTO purchases%'",
        )
        .fetch_one(&env.db)
        .await
        .unwrap();
        if waiting > 0 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the consumer never wrote"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // ...when Redis loses the event, stream and all; a buyer's request brings it back.
    env.lose_redis_data().await;
    let late = {
        let client = app.client.clone();
        let url = app.url(&format!("/api/v1/events/{event}/purchase"));
        tokio::spawn(async move {
            crate::harness::buy_until_answered(
                &client,
                &url,
                "after-the-loss",
                1,
                Duration::from_secs(30),
            )
            .await
        })
    };
    // Longer than the consumer's bound on waiting for the recovery's lock, which must
    // not bound its INSERT's wait.
    tokio::time::sleep(Duration::from_millis(800)).await;
    blocker.commit().await.unwrap();

    // The write lands, and the recovery counts it: the event is sold out, not sold again.
    let (answer, _) = late.await.unwrap();
    let answer = answer.expect("an answer");
    assert_eq!(answer.code(), "SOLD_OUT", "{:?}", answer.body);
    env.wait_for_rows(event, 5, Duration::from_secs(10)).await;
    let body = app.event(event).await;
    assert_eq!(body["seatsSold"], 10, "{body}");
    stop.cancel();
    consumer.await.unwrap();
}

#[tokio::test]
async fn a_confirmation_alone_brings_its_hold_to_postgresql() {
    let env = TestEnv::new().await;
    let app = env.spawn_app().await;
    let event = app.create_event("confirmation-alone", 10).await;
    // The hold's own entry went to another consumer, and was lost with Redis' data:
    // the confirmation that reached PostgreSQL still records the hold it sold.
    let id = uuid::Uuid::now_v7();
    let now_ms = chrono::Utc::now().timestamp_millis();
    let (made, expires, sold) = (
        (now_ms * 1000).to_string(),
        (now_ms + 60_000).to_string(),
        ((now_ms + 5) * 1000).to_string(),
    );
    let simple = id.simple().to_string();
    let sale = [
        ("p", simple.as_str()),
        ("k", "confirmation-alone"),
        ("q", "2"),
        ("r", "6"),
        ("t", &sold),
        ("h", "1"),
        ("hl", "8"),
        ("hx", &expires),
        ("hm", &made),
    ];
    let _: String = env
        .redis_now()
        .await
        .xadd(env.stream_key(event), "*", &sale)
        .await
        .unwrap();
    env.wait_for_rows(event, 1, Duration::from_secs(10)).await;
    let (key, remaining): (String, i32) =
        sqlx::query_as("SELECT idempotency_key, seats_remaining FROM holds WHERE id = $1")
            .bind(id)
            .fetch_one(&env.db)
            .await
            .unwrap();
    assert_eq!((key.as_str(), remaining), ("confirmation-alone", 8));
}

/// Two consumers over one poison entry: the one that read it first is overtaken
/// (XAUTOCLAIM) while PostgreSQL refuses it, and both try to park it. Only the
/// owner may: one copy in the dead letters, counted once.
#[tokio::test]
async fn a_poison_entry_two_consumers_race_over_is_parked_once() {
    let env = TestEnv::new().await;
    let event = uuid::Uuid::now_v7();
    let (stream, dead) = (
        env.stream_key(event),
        format!("{}:{{{event}}}:dead", env.prefix),
    );
    let mut redis = env.redis_now().await;
    let _: () = redis
        .xgroup_create_mkstream(&stream, "persist", "0")
        .await
        .unwrap();
    append_sale(&env, event, "poison", 3).await;
    let read = |consumer: &'static str| {
        let options = StreamReadOptions::default().group("persist", consumer);
        let mut redis = redis.clone();
        let stream = stream.clone();
        async move {
            let reply: StreamReadReply = redis
                .xread_options(&[stream], &[">"], &options)
                .await
                .unwrap();
            reply.keys[0].ids[0].id.clone()
        }
    };
    let entry = read("first").await;
    // Idle long enough for the other one's XAUTOCLAIM, which takes it over.
    let _: redis::streams::StreamClaimReply = redis
        .xclaim(&stream, "persist", "second", 0, &[&entry])
        .await
        .unwrap();

    let park = redis::Script::new(include_str!("../../lua/park.lua"));
    let mut parked = Vec::new();
    for consumer in ["first", "second", "first"] {
        let answer: i64 = park
            .key(&stream)
            .key(&dead)
            .arg("persist")
            .arg(&entry)
            .arg("SQLSTATE 23503")
            .arg(consumer)
            .invoke_async(&mut redis)
            .await
            .unwrap();
        parked.push(answer);
    }
    assert_eq!(parked, [-1, 1, -1], "only the owner parks, once");
    let copies: usize = redis.xlen(&dead).await.unwrap();
    assert_eq!(copies, 1);
    let pending: redis::streams::StreamPendingReply =
        redis.xpending(&stream, "persist").await.unwrap();
    assert_eq!(pending.count(), 0, "acknowledged by the owner");
}

/// Two live consumers that take over each other's entries at once (claim idle 1 ms)
/// over poison entries: each is parked exactly once and none stays pending.
#[tokio::test]
async fn two_consumers_overtaking_each_other_park_each_poison_entry_once() {
    const POISON: usize = 100;
    let env = TestEnv::new().await;
    let app = env.spawn_app_with(|c| c.serve.consumer = false).await;
    let event = app.create_event("contested", 1_000).await;
    for i in 0..POISON {
        // A quantity the table's CHECK refuses.
        append_sale(&env, event, &format!("poison-{i}"), 50).await;
    }
    let stop = CancellationToken::new();
    let mut consumers = Vec::new();
    for name in ["left", "right"] {
        let consumer = env.consumer(name, 1).await;
        consumers.push(tokio::spawn(consumer.run(stop.clone())));
    }
    let dead = format!("{}:{{{event}}}:dead", env.prefix);
    let mut redis = env.redis_now().await;
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let parked: usize = redis.xlen(&dead).await.unwrap();
        let pending: redis::streams::StreamPendingReply = redis
            .xpending(env.stream_key(event), "persist")
            .await
            .unwrap();
        if parked >= POISON && pending.count() == 0 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "parked {parked}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Long enough for a second copy to show up, were one on its way.
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.cancel();
    for consumer in consumers {
        consumer.await.unwrap();
    }
    let entries: redis::streams::StreamRangeReply = redis.xrange_all(&dead).await.unwrap();
    let mut ids: Vec<String> = entries
        .ids
        .iter()
        .map(|e| e.get::<String>("p").unwrap())
        .collect();
    ids.sort();
    ids.dedup();
    assert_eq!((entries.ids.len(), ids.len()), (POISON, POISON));
}

/// An event whose row PostgreSQL lost stops selling once the consumer finds out:
/// the sales made meanwhile are parked and shown by `reconcile`, which brings them
/// back once the row is restored.
#[tokio::test]
async fn an_event_without_its_row_goes_off_sale_and_its_parked_sales_come_back() {
    use boxoffice::reconcile::{self, Status};

    let env = TestEnv::new().await;
    let app = env.spawn_app().await;
    let event = app.create_event("vanishing", 100).await;
    let row: (String, i32) = sqlx::query_as("SELECT name, total_seats FROM events WHERE id = $1")
        .bind(event)
        .fetch_one(&env.db)
        .await
        .unwrap();
    sqlx::query("DELETE FROM events WHERE id = $1")
        .bind(event)
        .execute(&env.db)
        .await
        .unwrap();

    // Redis does not know yet: this one sells, and PostgreSQL refuses its row.
    let first = app.purchase_event(event, "before-noticed", 2).await;
    assert_eq!(first.status, StatusCode::OK, "{first:?}");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let mut sold_meanwhile = 0;
    let refused = loop {
        let key = format!("after-{sold_meanwhile}");
        let reply = app.purchase_event(event, &key, 1).await;
        if reply.status != StatusCode::OK {
            break reply;
        }
        sold_meanwhile += 1;
        assert!(std::time::Instant::now() < deadline, "still selling");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(
        (refused.status, refused.code()),
        (StatusCode::NOT_FOUND, "EVENT_NOT_FOUND"),
        "{refused:?}"
    );
    // The key that did sell is still replayed: its sale happened.
    let again = app.purchase_event(event, "before-noticed", 2).await;
    assert_eq!(again.body, first.body);

    let (stores, gate) = env.gate().await;
    let rows = reconcile::run(&stores, gate.recovery(), true)
        .await
        .unwrap();
    let lost = rows
        .iter()
        .find(|r| r.event == event)
        .expect("listed from Redis");
    assert_eq!(lost.status(), Status::EventMissing, "{lost:?}");
    let parked_seats = 2 + sold_meanwhile;
    assert_eq!(lost.parked, parked_seats, "{lost:?}");

    // The row restored, `--fix` sends the parked sales and puts the event on sale.
    sqlx::query("INSERT INTO events (id, name, total_seats) VALUES ($1, $2, $3)")
        .bind(event)
        .bind(&row.0)
        .bind(row.1)
        .execute(&env.db)
        .await
        .unwrap();
    let rows = reconcile::run(&stores, gate.recovery(), true)
        .await
        .unwrap();
    let back = rows.iter().find(|r| r.event == event).unwrap();
    assert_eq!(back.redis_sold, Some(parked_seats), "{back:?}");
    let after = app.purchase_event(event, "after-restore", 1).await;
    assert_eq!(after.status, StatusCode::OK, "{after:?}");
    let sales = 1 + usize::try_from(sold_meanwhile).unwrap() + 1;
    env.wait_for_rows(event, sales, Duration::from_secs(10))
        .await;
    let seats: i64 = env.rows(event).await.iter().map(|r| i64::from(r.2)).sum();
    assert_eq!(seats, parked_seats + 1);
}

/// A `boxoffice worker` is observable on its own port, and an entry removed from
/// the stream while pending is counted as lost there, not ignored.
#[tokio::test]
async fn a_worker_exports_metrics_and_counts_entries_lost_while_pending() {
    let env = TestEnv::new().await;
    let app = env.spawn_app_with(|c| c.serve.consumer = false).await;
    let event = app.default_event;
    for i in 0..3 {
        assert_eq!(
            app.purchase(&format!("w-{i}"), 1).await.status,
            StatusCode::OK
        );
    }
    // A consumer reads them and dies; one of its entries is then deleted by hand.
    let options = StreamReadOptions::default().group("persist", "gone");
    let mut redis = env.redis_now().await;
    let taken: StreamReadReply = redis
        .xread_options(&[env.stream_key(event)], &[">"], &options)
        .await
        .unwrap();
    let doomed = taken.keys[0].ids[1].id.clone();
    let _: i64 = redis.xdel(env.stream_key(event), &[&doomed]).await.unwrap();

    let worker = crate::faults::Worker::start(&env, "observer", 100);
    let client = reqwest::Client::new();
    let base = format!("http://127.0.0.1:{}", worker.port);
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let metrics = loop {
        let text = match client.get(format!("{base}/metrics")).send().await {
            Ok(response) => response.text().await.unwrap_or_default(),
            Err(_) => String::new(),
        };
        if text.contains("boxoffice_consumer_entries_lost_total")
            && text.contains("boxoffice_consumer_rows_written_total")
        {
            break text;
        }
        assert!(std::time::Instant::now() < deadline, "metrics: {text}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(
        metrics.contains("boxoffice_consumer_entries_lost_total{how=\"claimed\"} 1"),
        "{metrics}"
    );
    env.wait_for_rows(event, 2, Duration::from_secs(10)).await;
    let ready: serde_json::Value = client
        .get(format!("{base}/health/ready"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(ready["status"], "ready", "{ready}");
}

/// Sales of many events are written together, a transaction for many events; an
/// event a recovery holds, or one PostgreSQL refuses, holds up only its own sales.
#[tokio::test]
async fn many_events_are_written_together_and_one_held_or_refused_waits_alone() {
    let env = TestEnv::new().await;
    let app = env.spawn_app_with(|c| c.serve.consumer = false).await;
    let mut events = Vec::new();
    for i in 0..30 {
        let event = app.create_event(&format!("together {i}"), 10).await;
        for n in 0..2 {
            let reply = app.purchase_event(event, &format!("t-{i}-{n}"), 1).await;
            assert_eq!(reply.status, StatusCode::OK, "{reply:?}");
        }
        events.push(event);
    }
    // The first event's lock held exclusively, as a recovery of it holds it.
    let held = events[0];
    let mut recovery = env.db.begin().await.unwrap();
    boxoffice::db::lock_event(&mut recovery, held)
        .await
        .unwrap();

    let stop = CancellationToken::new();
    let consumer = tokio::spawn(env.consumer("together", 30_000).await.run(stop.clone()));
    for event in &events[1..] {
        env.wait_for_rows(*event, 2, Duration::from_secs(10)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        env.rows(held).await.is_empty(),
        "written while its recovery held the event"
    );
    recovery.rollback().await.unwrap();
    env.wait_for_rows(held, 2, Duration::from_secs(10)).await;
    stop.cancel();
    consumer.await.unwrap();

    // A stream of an event PostgreSQL does not have, among new sales of the others,
    // all read in one round: its sale is refused for good and parked; theirs are
    // written.
    let stranger = uuid::Uuid::now_v7();
    append_sale(&env, stranger, "s-1", 1).await;
    let _: i64 = env
        .redis_now()
        .await
        .sadd(format!("{}:events", env.prefix), stranger.to_string())
        .await
        .unwrap();
    for (i, event) in events.iter().enumerate() {
        let reply = app.purchase_event(*event, &format!("t-{i}-2"), 1).await;
        assert_eq!(reply.status, StatusCode::OK, "{reply:?}");
    }
    let stop = CancellationToken::new();
    let consumer = tokio::spawn(env.consumer("together", 30_000).await.run(stop.clone()));
    for event in &events {
        env.wait_for_rows(*event, 3, Duration::from_secs(10)).await;
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let dead = format!("{}:{{{stranger}}}:dead", env.prefix);
    while env.redis_now().await.xlen::<_, usize>(&dead).await.unwrap() != 1 {
        assert!(
            std::time::Instant::now() < deadline,
            "the refused sale is not parked"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.cancel();
    consumer.await.unwrap();
    for event in events {
        assert_eq!(env.rows(event).await.len(), 3);
    }
}
