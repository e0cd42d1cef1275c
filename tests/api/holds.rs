//! Holds: seats set aside, then confirmed, released or expired, all decided by the
//! gate script with the same exactness as purchases.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use redis::AsyncCommands;
use reqwest::StatusCode;
use serde_json::json;
use uuid::Uuid;

use crate::harness::{TestApp, TestEnv};
use crate::processes::{Persistence, PrivateRedis, on_private_servers};

async fn seats(app: &TestApp, event: Uuid) -> (i64, i64, i64) {
    let body = app.event(event).await;
    (
        body["seatsSold"].as_i64().unwrap(),
        body["seatsHeld"].as_i64().unwrap(),
        body["seatsRemaining"].as_i64().unwrap(),
    )
}

fn hold_id(reply: &crate::harness::Reply) -> String {
    reply.body["holdId"].as_str().unwrap().to_owned()
}

#[tokio::test]
async fn a_hold_sets_seats_aside_and_its_confirmation_sells_them_once() {
    let env = TestEnv::new().await;
    let app = env.spawn_app().await;
    let event = app.create_event("hold-confirm", 5).await;

    let held = app.hold(event, "h-1", 3, None).await;
    assert_eq!(held.status, StatusCode::CREATED, "{:?}", held.body);
    assert_eq!(held.body["seatsRemaining"], 2);
    assert_eq!(held.body["quantity"], 3);
    let id = hold_id(&held);
    assert_eq!(seats(&app, event).await, (0, 3, 2));

    // The held seats are not for sale; the others are.
    assert_eq!(app.purchase_event(event, "p-1", 3).await.code(), "SOLD_OUT");
    assert_eq!(
        app.purchase_event(event, "p-2", 2).await.status,
        StatusCode::OK
    );

    // The same key again: the same hold, not a second one.
    let again = app.hold(event, "h-1", 3, None).await;
    assert_eq!(again.status, StatusCode::CREATED);
    assert!(again.replayed);
    assert_eq!(again.body, held.body);
    // The key of a hold is not a purchase's, and the other way round.
    assert_eq!(
        app.purchase_event(event, "h-1", 3).await.code(),
        "IDEMPOTENCY_KEY_REUSED"
    );
    assert_eq!(
        app.hold(event, "p-2", 2, None).await.code(),
        "IDEMPOTENCY_KEY_REUSED"
    );

    let sale = app.confirm(event, &id).await;
    assert_eq!(sale.status, StatusCode::OK, "{:?}", sale.body);
    assert_eq!(sale.body["purchaseId"], id.as_str());
    assert_eq!(sale.body["quantity"], 3);
    assert_eq!(sale.body["seatsRemaining"], 0);
    assert!(!sale.replayed);
    let repeat = app.confirm(event, &id).await;
    assert_eq!(repeat.status, StatusCode::OK);
    assert!(repeat.replayed);
    assert_eq!(repeat.body, sale.body);
    assert_eq!(seats(&app, event).await, (5, 0, 0));

    let info = app.get(&format!("/api/v1/events/{event}/holds/{id}")).await;
    assert_eq!(info.body["state"], "confirmed");
    assert_eq!(info.body["purchaseId"], id.as_str());
    assert!(info.body["endedAt"].is_string());

    // A confirmed hold cannot be released: the sale stands.
    let (status, body) = app.release(event, &id).await;
    assert_eq!(status, StatusCode::CONFLICT);
    assert_eq!(body.unwrap()["error"], "HOLD_CONFIRMED");

    // One row per sale: the direct purchase and the confirmed hold.
    env.wait_for_rows(event, 2, Duration::from_secs(10)).await;
    let via_hold: Vec<(Uuid, bool)> =
        sqlx::query_as("SELECT id, via_hold FROM purchases WHERE event_id = $1 ORDER BY via_hold")
            .bind(event)
            .fetch_all(&env.db)
            .await
            .unwrap();
    assert_eq!(via_hold[1], (id.parse().unwrap(), true));
    assert!(!via_hold[0].1);
}

#[tokio::test]
async fn a_released_hold_returns_its_seats_at_once_and_cannot_be_confirmed() {
    let env = TestEnv::new().await;
    let app = env.spawn_app().await;
    let event = app.create_event("hold-release", 4).await;
    let id = hold_id(&app.hold(event, "r-1", 4, None).await);
    assert_eq!(seats(&app, event).await, (0, 4, 0));

    let (status, body) = app.release(event, &id).await;
    assert_eq!((status, body), (StatusCode::NO_CONTENT, None));
    assert_eq!(seats(&app, event).await, (0, 0, 4));
    // Idempotent, and the seats come back only once.
    assert_eq!(app.release(event, &id).await.0, StatusCode::NO_CONTENT);
    assert_eq!(seats(&app, event).await, (0, 0, 4));

    let late = app.confirm(event, &id).await;
    assert_eq!(late.status, StatusCode::GONE);
    assert_eq!(late.code(), "HOLD_EXPIRED");
    assert_eq!(seats(&app, event).await, (0, 0, 4));
    let info = app.get(&format!("/api/v1/events/{event}/holds/{id}")).await;
    assert_eq!(info.body["state"], "released");

    let unknown = Uuid::now_v7();
    assert_eq!(
        app.confirm(event, &unknown.to_string()).await.code(),
        "HOLD_NOT_FOUND"
    );
    assert_eq!(
        app.release(event, &unknown.to_string()).await.0,
        StatusCode::NOT_FOUND
    );
    let missing = app
        .get(&format!("/api/v1/events/{event}/holds/{unknown}"))
        .await;
    assert_eq!(missing.code(), "HOLD_NOT_FOUND");
}

#[tokio::test]
async fn an_expired_hold_returns_its_seats_without_traffic_and_is_never_sold() {
    let env = TestEnv::new().await;
    let app = env.spawn_app().await;
    let event = app
        .create_event_with(json!({"name": "hold-expiry", "totalSeats": 3, "holdSeconds": 1}))
        .await;
    assert_eq!(app.event(event).await["holdSeconds"], 1);
    let held = app.hold(event, "e-1", 2, None).await;
    let id = hold_id(&held);
    let expires_at: chrono::DateTime<chrono::Utc> =
        held.body["expiresAt"].as_str().unwrap().parse().unwrap();
    let left = (expires_at - chrono::Utc::now()).num_milliseconds();
    assert!((500..=1_100).contains(&left), "{left} ms to expiry");
    assert_eq!(seats(&app, event).await, (0, 2, 1));

    // No request touches the event: the sweeper returns the seats, within a second
    // of the expiry.
    let deadline = Instant::now() + Duration::from_millis(left as u64 + 1_000);
    loop {
        let now = seats(&app, event).await;
        if now == (0, 0, 3) {
            break;
        }
        assert!(Instant::now() < deadline, "seats still held: {now:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        chrono::Utc::now() >= expires_at,
        "returned before the expiry"
    );

    let late = app.confirm(event, &id).await;
    assert_eq!(late.code(), "HOLD_EXPIRED");
    let info = app.get(&format!("/api/v1/events/{event}/holds/{id}")).await;
    assert_eq!(info.body["state"], "expired");
    assert_eq!(info.body["endedAt"], info.body["expiresAt"]);
    assert_eq!(app.release(event, &id).await.0, StatusCode::NO_CONTENT);
    assert_eq!(seats(&app, event).await, (0, 0, 3));
}

#[tokio::test]
async fn a_purchase_after_the_expiry_finds_the_seats_back_even_before_any_sweep() {
    let env = TestEnv::new().await;
    let app = env.spawn_app_with(|c| c.serve.hold_sweep_ms = 0).await;
    let event = app
        .create_event_with(json!({"name": "lazy-expiry", "totalSeats": 2, "holdSeconds": 1}))
        .await;
    let late = hold_id(&app.hold(event, "lazy-hold", 1, None).await);
    app.hold(event, "lazy-hold-2", 1, None).await;
    assert_eq!(
        app.purchase_event(event, "too-soon", 1).await.code(),
        "SOLD_OUT"
    );
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    // No sweeper: a confirmation past the expiry finds the hold expired, and a
    // purchase's own call returns the expired holds before it decides.
    assert_eq!(app.confirm(event, &late).await.code(), "HOLD_EXPIRED");
    let sold = app.purchase_event(event, "after", 2).await;
    assert_eq!(sold.status, StatusCode::OK, "{:?}", sold.body);
    assert_eq!(seats(&app, event).await, (2, 0, 0));
}

#[tokio::test]
async fn the_last_seat_goes_to_exactly_one_of_a_hold_and_a_purchase() {
    let env = TestEnv::new().await;
    let [a, b] = env.spawn_replicas::<2>().await;
    for round in 0..20 {
        let event = a.create_event(&format!("last-seat-{round}"), 1).await;
        let (hold_key, buy_key) = (format!("h-{round}"), format!("p-{round}"));
        let (held, bought) = tokio::join!(
            a.hold(event, &hold_key, 1, None),
            b.purchase_event(event, &buy_key, 1),
        );
        let winners = [
            held.status == StatusCode::CREATED,
            bought.status == StatusCode::OK,
        ];
        assert_eq!(
            winners.iter().filter(|w| **w).count(),
            1,
            "round {round}: {held:?} {bought:?}"
        );
        let loser = if winners[0] { &bought } else { &held };
        assert_eq!(loser.code(), "SOLD_OUT");
        let (sold, on_hold, left) = seats(&a, event).await;
        assert_eq!((sold + on_hold, left), (1, 0), "round {round}");
    }
}

#[tokio::test]
async fn a_confirmation_racing_the_expiry_either_sells_or_returns_the_seats_never_both() {
    let env = TestEnv::new().await;
    let [a, b] = env.spawn_replicas::<2>().await;
    let event = a
        .create_event_with(json!({"name": "edge", "totalSeats": 40, "holdSeconds": 1}))
        .await;
    let mut holds = Vec::new();
    for i in 0..40 {
        holds.push(hold_id(&a.hold(event, &format!("edge-{i}"), 1, None).await));
    }
    // Confirm each around its expiry: some before, some after, from two replicas.
    tokio::time::sleep(Duration::from_millis(900)).await;
    let mut tasks = tokio::task::JoinSet::new();
    for (i, id) in holds.iter().enumerate() {
        let app = if i % 2 == 0 { &a } else { &b };
        let (client, url) = (
            app.client.clone(),
            app.url(&format!("/api/v1/events/{event}/holds/{id}/confirm")),
        );
        let delay = Duration::from_millis((i as u64 % 10) * 25);
        tasks.spawn(async move {
            tokio::time::sleep(delay).await;
            let response = client.post(url).send().await.unwrap();
            response.status()
        });
    }
    let statuses = tasks.join_all().await;
    let confirmed = statuses.iter().filter(|s| **s == StatusCode::OK).count() as i64;
    let expired = statuses.iter().filter(|s| **s == StatusCode::GONE).count() as i64;
    assert_eq!(confirmed + expired, 40, "{statuses:?}");

    // Once every hold is past its expiry: sold = confirmed, nothing held, and each
    // hold's state agrees with its confirmation's answer.
    tokio::time::sleep(Duration::from_millis(1_300)).await;
    assert_eq!(seats(&a, event).await, (confirmed, 0, 40 - confirmed));
    let mut states = HashSet::new();
    for id in &holds {
        let info = a.get(&format!("/api/v1/events/{event}/holds/{id}")).await;
        states.insert(info.body["state"].as_str().unwrap().to_owned());
    }
    assert!(states.is_subset(&HashSet::from(["confirmed".into(), "expired".into()])));
    env.wait_for_rows(event, confirmed as usize, Duration::from_secs(10))
        .await;
}

#[tokio::test]
async fn a_rush_of_holds_on_three_replicas_holds_exactly_the_seats_there_are() {
    let env = TestEnv::new().await;
    let apps = env.spawn_replicas::<3>().await;
    let event = apps[0]
        .create_event_with(json!({"name": "hold-rush", "totalSeats": 120, "holdSeconds": 2}))
        .await;
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..300 {
        let app = &apps[i % 3];
        let (client, url) = (
            app.client.clone(),
            app.url(&format!("/api/v1/events/{event}/holds")),
        );
        tasks.spawn(async move {
            let response = client
                .post(url)
                .header("Idempotency-Key", format!("rush-{i}"))
                .json(&json!({"quantity": 1 + i % 2}))
                .send()
                .await
                .unwrap();
            crate::harness::Reply::read(response).await
        });
    }
    let replies = tasks.join_all().await;
    let held: Vec<_> = replies
        .iter()
        .filter(|r| r.status == StatusCode::CREATED)
        .collect();
    let seats_held: i64 = held
        .iter()
        .map(|r| r.body["quantity"].as_i64().unwrap())
        .sum();
    assert!(
        replies
            .iter()
            .all(|r| r.status == StatusCode::CREATED || r.code() == "SOLD_OUT")
    );
    // 150 one-seat and 150 two-seat asks for 120 seats: every seat gets held (a
    // 1-seat ask fits whenever a seat is left... unless 2-seat asks came last).
    assert!((119..=120).contains(&seats_held), "{seats_held}");
    assert_eq!(
        seats(&apps[0], event).await,
        (0, seats_held, 120 - seats_held)
    );

    // Confirm a half, release a quarter, abandon the rest.
    let (mut confirmed, mut released, mut sales) = (0, 0, 0);
    for (i, reply) in held.iter().enumerate() {
        let id = hold_id(reply);
        let app = &apps[i % 3];
        let quantity = reply.body["quantity"].as_i64().unwrap();
        match i % 4 {
            0 | 1 => {
                assert_eq!(app.confirm(event, &id).await.status, StatusCode::OK);
                confirmed += quantity;
                sales += 1;
            }
            2 => {
                assert_eq!(app.release(event, &id).await.0, StatusCode::NO_CONTENT);
                released += quantity;
            }
            _ => {}
        }
    }
    let abandoned = seats_held - confirmed - released;
    assert_eq!(
        seats(&apps[1], event).await,
        (confirmed, abandoned, 120 - confirmed - abandoned)
    );
    tokio::time::sleep(Duration::from_millis(3_300)).await;
    assert_eq!(
        seats(&apps[2], event).await,
        (confirmed, 0, 120 - confirmed)
    );
    env.wait_for_rows(event, sales, Duration::from_secs(10))
        .await;
    let (row_seats,): (i64,) = sqlx::query_as(
        "SELECT COALESCE(SUM(quantity), 0)::int8 FROM purchases WHERE event_id = $1",
    )
    .bind(event)
    .fetch_one(&env.db)
    .await
    .unwrap();
    assert_eq!(row_seats, confirmed);
}

#[tokio::test]
async fn hold_times_are_validated_against_the_servers_maximum() {
    let env = TestEnv::new().await;
    let app = env.spawn_app_with(|c| c.serve.max_hold_seconds = 900).await;
    for (bad, status, code) in [
        (json!(0), StatusCode::BAD_REQUEST, "INVALID_BODY"),
        (json!("60"), StatusCode::BAD_REQUEST, "INVALID_BODY"),
        (json!(1.5), StatusCode::BAD_REQUEST, "INVALID_BODY"),
        // Within the schema's bounds, above this server's.
        (
            json!(901),
            StatusCode::UNPROCESSABLE_ENTITY,
            "INVALID_EVENT_SETTING",
        ),
    ] {
        let reply = app
            .send(
                app.client
                    .post(app.url("/api/v1/events"))
                    .bearer_auth(crate::harness::ADMIN_TOKEN)
                    .json(&json!({"name": "x", "totalSeats": 5, "holdSeconds": bad})),
            )
            .await;
        assert_eq!(reply.status, status, "{bad}: {:?}", reply.body);
        assert_eq!(reply.code(), code, "{bad}");
    }
    let event = app.create_event("default-hold", 5).await;
    assert_eq!(app.event(event).await["holdSeconds"], 600);
}

#[tokio::test]
async fn a_hold_redis_forgot_was_confirmed_is_settled_from_postgresql_not_sold_twice() {
    let env = TestEnv::new().await;
    let app = env.spawn_app().await;
    let event = app.create_event("settle", 10).await;
    let id = hold_id(&app.hold(event, "settle-1", 3, None).await);

    // A snapshot of the event's keys as they are before the confirmation.
    let keys = [
        format!("{}:{{{event}}}:inv", env.prefix),
        format!("{}:{{{event}}}:holds", env.prefix),
        format!("{}:{{{event}}}:hold:{}", env.prefix, id.replace('-', "")),
    ];
    let mut redis = env.redis_now().await;
    let mut snapshot = Vec::new();
    for key in &keys {
        let dump: Vec<u8> = redis::cmd("DUMP")
            .arg(key)
            .query_async(&mut redis)
            .await
            .unwrap();
        snapshot.push(dump);
    }
    let sale = app.confirm(event, &id).await;
    assert_eq!(sale.status, StatusCode::OK);
    env.wait_for_rows(event, 1, Duration::from_secs(10)).await;

    // Redis comes back from that snapshot: the hold held again, `sold` behind. The
    // event is no longer marked checked on this server, as after a restart.
    for (key, dump) in keys.iter().zip(&snapshot) {
        let _: () = redis::cmd("RESTORE")
            .arg(key)
            .arg(0)
            .arg(dump.as_slice())
            .arg("REPLACE")
            .query_async(&mut redis)
            .await
            .unwrap();
    }
    let _: () = redis::cmd("HDEL")
        .arg(&keys[0])
        .arg("run")
        .query_async(&mut redis)
        .await
        .unwrap();

    assert_eq!(seats(&app, event).await, (3, 0, 7));
    let again = app.confirm(event, &id).await;
    assert_eq!(again.status, StatusCode::OK);
    assert!(again.replayed);
    assert_eq!(again.body["purchaseId"], sale.body["purchaseId"]);
    assert_eq!(seats(&app, event).await, (3, 0, 7));
    let info = app.get(&format!("/api/v1/events/{event}/holds/{id}")).await;
    assert_eq!(info.body["state"], "confirmed");
}

#[tokio::test]
async fn a_hold_lost_with_redis_before_it_reached_postgresql_returns_its_seats() {
    let env = TestEnv::new().await;
    // No consumer: the hold stays in the stream, which the loss takes with it.
    let app = env.spawn_app_with(|c| c.serve.consumer = false).await;
    let event = app.create_event("lost-holds", 4).await;
    let held = app.hold(event, "lost-1", 3, None).await;
    let id = hold_id(&held);

    env.lose_redis_data().await;

    assert_eq!(seats(&app, event).await, (0, 0, 4));
    assert_eq!(app.confirm(event, &id).await.code(), "HOLD_NOT_FOUND");
    // The hold request's record went too: its retry makes a new hold.
    let again = app.hold(event, "lost-1", 3, None).await;
    assert_eq!(again.status, StatusCode::CREATED);
    assert!(!again.replayed);
    assert_ne!(hold_id(&again), id);
}

/// Waits until PostgreSQL has the hold `id` (the consumer wrote its entry).
async fn hold_persisted(env: &TestEnv, id: &str) {
    let id: Uuid = id.parse().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let found: Option<(Uuid,)> = sqlx::query_as("SELECT id FROM holds WHERE id = $1")
            .bind(id)
            .fetch_optional(&env.db)
            .await
            .unwrap();
        if found.is_some() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "hold {id} never reached PostgreSQL"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hold_released_after_the_snapshot_stays_released_when_redis_returns_to_it() {
    on_private_servers(async {
        let mut redis = PrivateRedis::start(Persistence::Snapshot).await;
        let env = TestEnv::with_redis(&redis.url()).await;
        let app = env.spawn_app_with(|c| c.serve.redis_watch_ms = 0).await;
        let event = app.create_event("snapshot-release", 2).await;
        let id = hold_id(&app.hold(event, "held-then-released", 2, None).await);
        hold_persisted(&env, &id).await;
        let _: () = redis::cmd("SAVE")
            .query_async(&mut env.redis_now().await)
            .await
            .unwrap();
        let snapshot = redis.dir().join("older.rdb");
        std::fs::copy(redis.dir().join("dump.rdb"), &snapshot).unwrap();

        // After the snapshot: the hold is released and another buyer takes its seats.
        assert_eq!(app.release(event, &id).await.0, StatusCode::NO_CONTENT);
        let bought = app.purchase_event(event, "the-other-buyer", 2).await;
        assert_eq!(bought.status, StatusCode::OK, "{:?}", bought.body);
        env.wait_for_rows(event, 1, Duration::from_secs(10)).await;

        redis.kill();
        std::fs::copy(&snapshot, redis.dir().join("dump.rdb")).unwrap();
        redis.restart().await;

        // The released hold does not come back to life with the snapshot.
        let mut confirm = app.confirm(event, &id).await;
        while confirm.status == StatusCode::SERVICE_UNAVAILABLE {
            confirm = app.confirm(event, &id).await;
        }
        assert_eq!(confirm.status, StatusCode::GONE, "{:?}", confirm.body);
        assert_eq!(confirm.code(), "HOLD_EXPIRED");
        assert_eq!(seats(&app, event).await, (2, 0, 0));
        let info = app.get(&format!("/api/v1/events/{event}/holds/{id}")).await;
        assert_eq!(info.body["state"], "released");
        let more = app.purchase_event(event, "one-more", 1).await;
        assert_eq!(more.code(), "SOLD_OUT");
        tokio::time::sleep(Duration::from_millis(500)).await;
        let rows = env.rows(event).await;
        let seats_in_rows: i64 = rows.iter().map(|(.., q)| i64::from(*q)).sum();
        assert_eq!(seats_in_rows, 2, "{rows:?}");
    })
    .await;
}

#[tokio::test]
async fn a_confirmed_holds_key_and_id_replay_the_sale_after_redis_lost_its_data() {
    let env = TestEnv::new().await;
    let app = env.spawn_app().await;
    let event = app.create_event("confirmed-then-lost", 5).await;
    let held = app.hold(event, "hold-key", 2, None).await;
    let id = hold_id(&held);
    let sale = app.confirm(event, &id).await;
    assert_eq!(sale.status, StatusCode::OK);
    env.wait_for_rows(event, 1, Duration::from_secs(10)).await;
    hold_persisted(&env, &id).await;

    env.lose_redis_data().await;

    // The client that lost the confirmation's answer asks again, by id and by key.
    let again = app.confirm(event, &id).await;
    assert_eq!(again.status, StatusCode::OK, "{:?}", again.body);
    assert!(again.replayed);
    assert_eq!(again.body, sale.body);
    let rehold = app.hold(event, "hold-key", 2, None).await;
    assert_eq!(rehold.status, StatusCode::CREATED, "{:?}", rehold.body);
    assert!(rehold.replayed);
    assert_eq!(rehold.body, held.body);
    assert_eq!(app.confirm(event, &id).await.body, sale.body);
    assert_eq!(seats(&app, event).await, (2, 0, 3));
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(env.rows(event).await.len(), 1, "the key sold twice");
}

#[tokio::test]
async fn a_live_hold_comes_back_after_redis_lost_its_data_and_can_be_confirmed() {
    let env = TestEnv::new().await;
    let app = env.spawn_app().await;
    let event = app.create_event("held-then-lost", 4).await;
    let held = app.hold(event, "live-hold", 3, None).await;
    let id = hold_id(&held);
    hold_persisted(&env, &id).await;

    env.lose_redis_data().await;

    assert_eq!(seats(&app, event).await, (0, 3, 1));
    let again = app.hold(event, "live-hold", 3, None).await;
    assert!(again.replayed);
    assert_eq!(again.body, held.body);
    let sale = app.confirm(event, &id).await;
    assert_eq!(sale.status, StatusCode::OK, "{:?}", sale.body);
    assert_eq!(sale.body["purchaseId"], id.as_str());
    assert_eq!(seats(&app, event).await, (3, 0, 1));
}

#[tokio::test]
async fn a_hold_confirmed_in_lost_data_cannot_be_released_before_recovery_settles_it() {
    let env = TestEnv::new().await;
    let app = env.spawn_app_with(|c| c.serve.redis_watch_ms = 0).await;
    let event = app.create_event("release-before-recovery", 10).await;
    let id = hold_id(&app.hold(event, "confirm-then-release", 3, None).await);
    let keys = [
        format!("{}:{{{event}}}:inv", env.prefix),
        format!("{}:{{{event}}}:holds", env.prefix),
        format!("{}:{{{event}}}:hold:{}", env.prefix, id.replace('-', "")),
    ];
    let mut redis = env.redis_now().await;
    let mut snapshot = Vec::new();
    for key in &keys {
        let dump: Vec<u8> = redis::cmd("DUMP")
            .arg(key)
            .query_async(&mut redis)
            .await
            .unwrap();
        snapshot.push(dump);
    }
    let sale = app.confirm(event, &id).await;
    assert_eq!(sale.status, StatusCode::OK);
    env.wait_for_rows(event, 1, Duration::from_secs(10)).await;
    // Redis comes back from before the confirmation, not yet checked on this server.
    for (key, dump) in keys.iter().zip(&snapshot) {
        let _: () = redis::cmd("RESTORE")
            .arg(key)
            .arg(0)
            .arg(dump.as_slice())
            .arg("REPLACE")
            .query_async(&mut redis)
            .await
            .unwrap();
    }
    let _: () = redis::cmd("HDEL")
        .arg(&keys[0])
        .arg("run")
        .query_async(&mut redis)
        .await
        .unwrap();

    // The first request is a release: it must not undo the sale.
    let (status, body) = app.release(event, &id).await;
    assert_eq!(status, StatusCode::CONFLICT, "{body:?}");
    assert_eq!(body.unwrap()["error"], "HOLD_CONFIRMED");
    let info = app.get(&format!("/api/v1/events/{event}/holds/{id}")).await;
    assert_eq!(info.body["state"], "confirmed");
    assert_eq!(seats(&app, event).await, (3, 0, 7));
}

/// A hold that ended without a sale keeps its hash and its key's record only the
/// ended-hold TTL after it ended (what a retried release needs), then nothing; a
/// confirmed one is kept as long as a sale.
#[tokio::test]
async fn an_ended_hold_is_kept_for_the_ended_hold_ttl_and_a_confirmed_one_like_a_sale() {
    let env = TestEnv::new().await;
    let app = env
        .spawn_app_with(|c| c.common.store.ended_hold_ttl = 2)
        .await;
    let event = app.create_event("retention", 4).await;
    let released = hold_id(&app.hold(event, "gone", 1, None).await);
    let confirmed = hold_id(&app.hold(event, "sold", 1, None).await);
    let live = hold_id(&app.hold(event, "live", 1, None).await);
    assert_eq!(
        app.release(event, &released).await.0,
        StatusCode::NO_CONTENT
    );
    assert_eq!(app.confirm(event, &confirmed).await.status, StatusCode::OK);

    let mut redis = env.redis_now().await;
    let hold_key = |id: &str| {
        let id = Uuid::parse_str(id).unwrap().simple();
        format!("{}:{{{event}}}:hold:{id}", env.prefix)
    };
    let mut pttl = async |key: String| -> i64 { redis.pttl(key).await.unwrap() };
    for key in [hold_key(&released), env.record_key(event, "gone")] {
        let left = pttl(key.clone()).await;
        assert!((1..=2_000).contains(&left), "{key}: {left} ms");
    }
    for key in [hold_key(&confirmed), env.record_key(event, "sold")] {
        let left = pttl(key.clone()).await;
        assert!(left > 86_390_000, "{key}: {left} ms");
    }
    // A live hold: until its expiry (600 s), and then the ended-hold TTL.
    for key in [hold_key(&live), env.record_key(event, "live")] {
        let left = pttl(key.clone()).await;
        assert!((598_000..=602_000).contains(&left), "{key}: {left} ms");
    }
    // Within it a retry gets the same answer.
    assert_eq!(
        app.release(event, &released).await.0,
        StatusCode::NO_CONTENT
    );
    assert_eq!(app.confirm(event, &released).await.code(), "HOLD_EXPIRED");

    tokio::time::sleep(Duration::from_millis(2_500)).await;
    assert_eq!(app.release(event, &released).await.0, StatusCode::NOT_FOUND);
    assert_eq!(app.confirm(event, &confirmed).await.status, StatusCode::OK);
    assert!(app.confirm(event, &confirmed).await.replayed);
    // The key is free again: a new hold, never a sale.
    let again = app.hold(event, "gone", 1, None).await;
    assert_eq!(again.status, StatusCode::CREATED);
    assert!(!again.replayed);
    assert_eq!(seats(&app, event).await, (1, 2, 1));
}

/// The first request after Redis lost its data is the confirmation: the hold's
/// request key, read before the call, is missing then, and comes back with the
/// recovery. The sale still keeps the hold's key as long as a sale's.
#[tokio::test]
async fn a_hold_confirmed_first_thing_after_redis_lost_its_data_keeps_its_key_like_a_sale() {
    let env = TestEnv::new().await;
    let app = env
        .spawn_app_with(|c| c.common.store.ended_hold_ttl = 60)
        .await;
    let event = app.create_event("confirmed-after-loss", 4).await;
    let held = app.hold(event, "comes-back", 2, None).await;
    let id = hold_id(&held);
    hold_persisted(&env, &id).await;

    env.lose_redis_data().await;

    let sale = app.confirm(event, &id).await;
    assert_eq!(sale.status, StatusCode::OK, "{:?}", sale.body);
    let left: i64 = env
        .redis_now()
        .await
        .pttl(env.record_key(event, "comes-back"))
        .await
        .unwrap();
    assert!(left > 86_390_000, "the hold's key is kept {left} ms");
    assert_eq!(seats(&app, event).await, (2, 0, 2));
}
