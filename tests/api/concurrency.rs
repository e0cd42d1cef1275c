use std::collections::{HashMap, HashSet};
use std::time::Duration;

use reqwest::StatusCode;
use uuid::Uuid;

use crate::harness::{TestEnv, rush};

const CAPACITY: i64 = 1000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousands_of_buyers_on_three_instances_never_oversell() {
    let env = TestEnv::new().await;
    let apps = env.spawn_replicas::<3>().await;
    let event = apps[0].create_event("flash crowd", CAPACITY as u32).await;

    let replies = rush(
        &[&apps[0], &apps[1], &apps[2]],
        event,
        2500,
        500,
        |i| (i * 7 % 10 + 1) as u8,
        |i| format!("buyer-{i}"),
    )
    .await;

    let mut sold = 0i64;
    let mut sales: HashMap<Uuid, (String, i16)> = HashMap::new();
    for (key, quantity, reply) in &replies {
        match reply.status {
            StatusCode::OK => {
                sold += i64::from(*quantity);
                let id = reply.body["purchaseId"].as_str().unwrap().parse().unwrap();
                assert!(
                    sales
                        .insert(id, (key.clone(), i16::from(*quantity)))
                        .is_none()
                );
                assert!(reply.body["seatsRemaining"].as_i64().unwrap() >= 0);
            }
            StatusCode::CONFLICT => assert_eq!(reply.code(), "SOLD_OUT"),
            other => panic!("unexpected {other}: {:?}", reply.body),
        }
    }
    let seats = apps[2].event(event).await;
    assert!(sold <= CAPACITY, "oversold: {sold} > {CAPACITY}");
    assert_eq!(seats["seatsSold"], sold, "seatsSold is the sum of the 200s");
    assert!(
        sold > CAPACITY - 10,
        "demand far above capacity left {sold} sold"
    );

    // Sell what remains one seat at a time: the event ends at exactly its capacity.
    let remaining = CAPACITY - sold;
    for i in 0..remaining {
        let reply = apps[0].purchase_event(event, &format!("rest-{i}"), 1).await;
        assert_eq!(reply.status, StatusCode::OK);
        let id = reply.body["purchaseId"].as_str().unwrap().parse().unwrap();
        sales.insert(id, (format!("rest-{i}"), 1));
    }
    assert_eq!(
        apps[1].purchase_event(event, "one-more", 1).await.code(),
        "SOLD_OUT"
    );
    assert_eq!(apps[1].event(event).await["seatsSold"], CAPACITY);

    env.wait_for_rows(event, sales.len(), Duration::from_secs(30))
        .await;
    let rows = env.rows(event).await;
    let ids: HashSet<Uuid> = rows.iter().map(|(id, ..)| *id).collect();
    assert_eq!(ids.len(), rows.len(), "no duplicate rows");
    for (id, key, quantity) in &rows {
        assert_eq!(
            sales.get(id),
            Some(&(key.clone(), *quantity)),
            "row {id} matches its sale"
        );
    }
    let persisted: i64 = rows.iter().map(|(_, _, q)| i64::from(*q)).sum();
    assert_eq!(persisted, CAPACITY);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_seed_test_sells_1000_of_1000() {
    let env = TestEnv::new().await;
    let app = env.spawn_app().await;
    let event = app.create_event("seed", CAPACITY as u32).await;

    let replies = rush(
        &[&app],
        event,
        1000,
        1000,
        |_| 1,
        |_| Uuid::new_v4().to_string(),
    )
    .await;

    let ok = replies
        .iter()
        .filter(|(_, _, r)| r.status == StatusCode::OK)
        .count();
    let failures: Vec<_> = replies
        .iter()
        .filter(|(_, _, r)| r.status != StatusCode::OK)
        .map(|(_, _, r)| (r.status, r.body.clone()))
        .take(3)
        .collect();
    assert_eq!(ok, 1000, "failures: {failures:?}");
    assert_eq!(app.event(event).await["seatsRemaining"], 0);
    assert_eq!(
        app.purchase_event(event, "late", 1).await.code(),
        "SOLD_OUT"
    );
    env.wait_for_rows(event, 1000, Duration::from_secs(30))
        .await;
}
