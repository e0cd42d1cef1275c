//! The waiting room: fair order (a random draw among those who joined before the
//! opening, first come first served after), admission at a rate all replicas agree
//! on, and admission tokens bound to the event and the buyer.

use std::collections::HashMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use reqwest::StatusCode;
use serde_json::json;
use uuid::Uuid;

use crate::harness::{Reply, TestApp, TestEnv, buyer_token};

async fn join(app: &TestApp, event: Uuid, token: &str) -> Reply {
    app.send(
        app.client
            .post(app.url(&format!("/api/v1/events/{event}/queue")))
            .bearer_auth(token),
    )
    .await
}

async fn poll(app: &TestApp, event: Uuid, ticket: &str, token: &str) -> Reply {
    app.send(
        app.client
            .get(app.url(&format!("/api/v1/events/{event}/queue/{ticket}")))
            .bearer_auth(token),
    )
    .await
}

/// Polls until admitted, checking that the position never goes up; returns the
/// admission answer.
async fn wait_for_admission(app: &TestApp, event: Uuid, ticket: &str, token: &str) -> Reply {
    let mut last = u64::MAX;
    for _ in 0..400 {
        let status = poll(app, event, ticket, token).await;
        assert_eq!(status.status, StatusCode::OK, "{:?}", status.body);
        if status.body["admitted"] == true {
            return status;
        }
        let opened = DateTime::parse_from_rfc3339(status.body["opensAt"].as_str().unwrap())
            .unwrap()
            <= Utc::now();
        let position = status.body["position"].as_u64().unwrap();
        if opened {
            assert!(
                position <= last,
                "{ticket}: position {position} after {last}"
            );
            last = position;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("{ticket} never admitted");
}

/// Spearman's rank correlation of two rankings of the same n items.
fn spearman(a: &[f64], b: &[f64]) -> f64 {
    let n = a.len() as f64;
    let d2: f64 = a.iter().zip(b).map(|(x, y)| (x - y).powi(2)).sum();
    1.0 - 6.0 * d2 / (n * (n * n - 1.0))
}

#[tokio::test]
async fn early_joiners_are_drawn_at_random_later_ones_served_in_order_at_the_rate() {
    let env = TestEnv::new().await;
    let apps = env.spawn_replicas::<3>().await;
    let rate = 40;
    let event = apps[0].create_queued_event(2_500, rate, 60).await;
    let (early, late) = (40, 15);

    let tokens: Vec<String> = (0..early + late)
        .map(|i| buyer_token(&format!("q-{i}")))
        .collect();
    let mut tickets = Vec::new();
    for (i, token) in tokens.iter().take(early).enumerate() {
        let joined = join(&apps[i % 3], event, token).await;
        assert_eq!(joined.status, StatusCode::ACCEPTED, "{:?}", joined.body);
        assert_eq!(joined.body["ticket"], format!("p{}", i + 1));
        assert_eq!(joined.body["admitted"], false);
        tickets.push(joined.body["ticket"].as_str().unwrap().to_owned());
    }
    // One place per buyer: joining again, anywhere, gives the same ticket.
    assert_eq!(join(&apps[2], event, &tokens[0]).await.body["ticket"], "p1");
    let opens_at: DateTime<Utc> = join(&apps[1], event, &tokens[0]).await.body["opensAt"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    let until_open = (opens_at - Utc::now()).num_milliseconds();
    assert!(until_open > 0, "the early buyers joined too slowly");
    tokio::time::sleep(Duration::from_millis(until_open as u64 + 10)).await;
    for (i, token) in tokens.iter().enumerate().skip(early) {
        let joined = join(&apps[i % 3], event, token).await;
        assert_eq!(joined.body["ticket"], format!("o{}", i - early + 1));
        tickets.push(joined.body["ticket"].as_str().unwrap().to_owned());
    }

    // Everyone polls until admitted, from the three replicas in turn.
    let mut tasks = tokio::task::JoinSet::new();
    for (i, (ticket, token)) in tickets.iter().zip(&tokens).enumerate() {
        let (app, ticket, token) = (apps[i % 3].address.clone(), ticket.clone(), token.clone());
        let env_app = TestApp::at(&app);
        tasks.spawn(async move {
            let admitted = wait_for_admission(&env_app, event, &ticket, &token).await;
            (i, admitted.body)
        });
    }
    let admitted: HashMap<usize, serde_json::Value> = tasks.join_all().await.into_iter().collect();
    let at = |i: usize| -> i64 {
        admitted[&i]["admittedAt"]
            .as_str()
            .unwrap()
            .parse::<DateTime<Utc>>()
            .unwrap()
            .timestamp_millis()
    };
    // Every replica answers the same moment for the same ticket.
    for app in &apps {
        let again = poll(app, event, &tickets[7], &tokens[7]).await;
        assert_eq!(again.body["admittedAt"], admitted[&7]["admittedAt"]);
    }

    // Admission at the rate: the k-th place at opensAt + ⌈k × 1000 / rate⌉ ms.
    let mut order: Vec<usize> = (0..early + late).collect();
    order.sort_by_key(|i| at(*i));
    for (k, i) in order.iter().enumerate() {
        let expected =
            opens_at.timestamp_millis() + ((k as u64 + 1) * 1000).div_ceil(u64::from(rate)) as i64;
        assert_eq!(at(*i), expected, "place {}", k + 1);
    }
    // Every early joiner before every late one; the late ones in the order they joined.
    assert!(order[..early].iter().all(|i| *i < early));
    assert_eq!(
        order[early..],
        (early..early + late).collect::<Vec<_>>()[..]
    );
    // The draw: admission order of the early joiners against their join order.
    let rank: Vec<f64> = (0..early)
        .map(|i| order.iter().position(|j| *j == i).unwrap() as f64)
        .collect();
    let joined: Vec<f64> = (0..early).map(|i| i as f64).collect();
    let rho = spearman(&joined, &rank);
    assert!(
        rho.abs() < 0.7,
        "Spearman's rho {rho:.3} between join and admission order"
    );
    assert_ne!(order[..early], (0..early).collect::<Vec<_>>()[..]);
}

#[tokio::test]
async fn a_queued_event_sells_only_with_an_admission_for_that_event_and_buyer() {
    let env = TestEnv::new().await;
    let app = env.spawn_app().await;
    let event = app.create_queued_event(-1_000, 1_000, 2).await;
    let other = app.create_queued_event(-1_000, 1_000, 60).await;
    let (ann, bob) = (buyer_token("ann"), buyer_token("bob"));

    let refused = app.purchase_as(event, "no-admission", 1, Some(&ann)).await;
    assert_eq!(refused.status, StatusCode::FORBIDDEN, "{:?}", refused.body);
    assert_eq!(refused.code(), "ADMISSION_REQUIRED");
    assert_eq!(
        app.hold(event, "no-admission-hold", 1, Some(&ann))
            .await
            .code(),
        "ADMISSION_REQUIRED"
    );

    let joined = join(&app, event, &ann).await;
    let ticket = joined.body["ticket"].as_str().unwrap().to_owned();
    let status = wait_for_admission(&app, event, &ticket, &ann).await;
    let admission = status.body["admissionToken"].as_str().unwrap().to_owned();
    let metrics = app.client.get(app.url("/metrics")).send().await.unwrap();
    let metrics = metrics.text().await.unwrap();
    for series in [
        "boxoffice_queue_admissions_served_total",
        "boxoffice_queue_wait_seconds_count",
        "boxoffice_queue_admission_lag_seconds_count",
        &format!("boxoffice_queue_admitted{{event=\"{event}\"}} 1"),
        &format!("boxoffice_queue_waiting{{event=\"{event}\"}} 0"),
    ] {
        assert!(metrics.contains(series), "{series} not in /metrics");
    }
    let with = |key: &'static str, token: &str| {
        app.client
            .post(app.url(&format!("/api/v1/events/{event}/purchase")))
            .header("Idempotency-Key", key)
            .header("Admission-Token", &admission)
            .bearer_auth(token)
            .json(&json!({"quantity": 1}))
    };
    // Bound to the buyer: bob cannot use ann's admission.
    assert_eq!(
        app.send(with("bob", &bob)).await.code(),
        "ADMISSION_REQUIRED"
    );
    let sold = app.send(with("ann", &ann)).await;
    assert_eq!(sold.status, StatusCode::OK, "{:?}", sold.body);
    // Bound to the event.
    let elsewhere = app
        .send(
            app.client
                .post(app.url(&format!("/api/v1/events/{other}/purchase")))
                .header("Idempotency-Key", "elsewhere")
                .header("Admission-Token", &admission)
                .bearer_auth(&ann)
                .json(&json!({"quantity": 1})),
        )
        .await;
    assert_eq!(elsewhere.code(), "ADMISSION_REQUIRED");
    // Short-lived: after admissionSeconds it no longer admits.
    let expires_at: DateTime<Utc> = status.body["expiresAt"].as_str().unwrap().parse().unwrap();
    let left = (expires_at - Utc::now()).num_milliseconds().max(0) as u64;
    tokio::time::sleep(Duration::from_millis(left + 1_100)).await;
    assert_eq!(
        app.send(with("ann-late", &ann)).await.code(),
        "ADMISSION_REQUIRED"
    );
    assert_eq!(app.event(event).await["seatsSold"], 1);
}

#[tokio::test]
async fn tickets_belong_to_their_buyer_and_plain_events_have_no_queue() {
    let env = TestEnv::new().await;
    let app = env.spawn_app().await;
    let event = app.create_queued_event(60_000, 10, 60).await;
    let (ann, bob) = (buyer_token("ann"), buyer_token("bob"));
    let ticket = join(&app, event, &ann).await.body["ticket"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(
        poll(&app, event, &ticket, &bob).await.code(),
        "TICKET_NOT_FOUND"
    );
    assert_eq!(
        poll(&app, event, "p999", &ann).await.code(),
        "TICKET_NOT_FOUND"
    );
    let anonymous = app
        .send(
            app.client
                .post(app.url(&format!("/api/v1/events/{event}/queue"))),
        )
        .await;
    assert_eq!(anonymous.code(), "BUYER_TOKEN_REQUIRED");
    let before = poll(&app, event, &ticket, &ann).await;
    assert_eq!(
        (
            before.body["admitted"].as_bool(),
            before.body["position"].as_u64()
        ),
        (Some(false), Some(1))
    );
    assert!(before.body["pollAfterMs"].as_u64().unwrap() >= 1_000);

    let plain = app.create_event("plain", 10).await;
    assert_eq!(join(&app, plain, &ann).await.code(), "EVENT_NOT_QUEUED");
    // Plain events sell as before.
    assert_eq!(
        app.purchase_event(plain, "plain", 1).await.status,
        StatusCode::OK
    );
}

#[tokio::test]
async fn after_redis_loses_its_data_the_room_starts_empty_and_issued_admissions_still_admit() {
    let env = TestEnv::new().await;
    let app = env.spawn_app().await;
    let event = app.create_queued_event(-1_000, 1_000, 60).await;
    let ann = buyer_token("ann");
    let ticket = join(&app, event, &ann).await.body["ticket"]
        .as_str()
        .unwrap()
        .to_owned();
    let admitted = wait_for_admission(&app, event, &ticket, &ann).await;
    let admission = admitted.body["admissionToken"].as_str().unwrap().to_owned();

    env.lose_redis_data().await;

    // The ticket went with the room; the admission, a signed token, did not.
    assert_eq!(
        poll(&app, event, &ticket, &ann).await.code(),
        "TICKET_NOT_FOUND"
    );
    let sold = app
        .send(
            app.client
                .post(app.url(&format!("/api/v1/events/{event}/purchase")))
                .header("Idempotency-Key", "after-loss")
                .header("Admission-Token", &admission)
                .bearer_auth(&ann)
                .json(&json!({"quantity": 1})),
        )
        .await;
    assert_eq!(sold.status, StatusCode::OK, "{:?}", sold.body);
    // The room is back, empty, with its settings: joining again is joining anew,
    // after the opening, and admission follows.
    let again = join(&app, event, &buyer_token("bo")).await;
    assert_eq!(again.status, StatusCode::ACCEPTED, "{:?}", again.body);
    assert_eq!(again.body["ticket"], "o1");
    let rejoined = join(&app, event, &ann).await;
    assert_eq!(rejoined.body["ticket"], "o2");
}

/// Buyers who join one by one after a quiet spell (`opensAt` long past, nobody in
/// line): each must be admitted no earlier than it joined, one place per
/// `1 / rate` after the one before, with a token that is still valid when it
/// learns of it. Returns the admission moments (ms), in joining order.
async fn late_joiners_after_a_lull(rate: u32, buyers: usize) -> Vec<i64> {
    let env = TestEnv::new().await;
    let app = env.spawn_app().await;
    // Opened ten seconds ago and nobody came: ten seconds of unused admissions.
    let event = app.create_queued_event(-10_000, rate, 5).await;
    let tokens: Vec<String> = (0..buyers)
        .map(|i| buyer_token(&format!("lull-{i}")))
        .collect();
    let mut joined_at = Vec::new();
    let mut tickets = Vec::new();
    for token in &tokens {
        joined_at.push(Utc::now().timestamp_millis());
        let joined = join(&app, event, token).await;
        assert_eq!(joined.status, StatusCode::ACCEPTED, "{:?}", joined.body);
        tickets.push(joined.body["ticket"].as_str().unwrap().to_owned());
    }
    let mut admitted_at = Vec::new();
    for (i, (ticket, token)) in tickets.iter().zip(&tokens).enumerate() {
        let admitted = wait_for_admission(&app, event, ticket, token).await;
        let at = |field: &str| {
            admitted.body[field]
                .as_str()
                .unwrap()
                .parse::<DateTime<Utc>>()
                .unwrap()
                .timestamp_millis()
        };
        let (admitted_ms, expires_ms) = (at("admittedAt"), at("expiresAt"));
        let now = Utc::now().timestamp_millis();
        // Redis' clock and this one agree within a few ms on this machine.
        assert!(
            admitted_ms + 50 >= joined_at[i],
            "{ticket} admitted before it joined"
        );
        assert!(
            expires_ms > now,
            "{ticket}: its token expired at {expires_ms}, now {now}"
        );
        let token_admission = admitted.body["admissionToken"].as_str().unwrap();
        let sold = app
            .send(
                app.client
                    .post(app.url(&format!("/api/v1/events/{event}/purchase")))
                    .header("Idempotency-Key", format!("lull-buy-{i}"))
                    .header("Admission-Token", token_admission)
                    .bearer_auth(token)
                    .json(&json!({"quantity": 1})),
            )
            .await;
        assert_eq!(sold.status, StatusCode::OK, "{ticket}: {:?}", sold.body);
        admitted_at.push(admitted_ms);
    }
    admitted_at
}

#[tokio::test]
async fn late_joiners_after_a_lull_are_admitted_at_the_rate_one_per_second() {
    let at = late_joiners_after_a_lull(1, 3).await;
    for pair in at.windows(2) {
        assert!(
            pair[1] - pair[0] >= 1_000,
            "admitted at {at:?}: faster than 1/s"
        );
    }
    eprintln!(
        "1/s after a 10 s lull: 3 joiners admitted {} ms apart in all",
        at[2] - at[0]
    );
}

#[tokio::test]
async fn late_joiners_after_a_lull_are_admitted_at_the_rate_five_hundred_per_second() {
    let buyers = 50;
    let at = late_joiners_after_a_lull(500, buyers).await;
    for pair in at.windows(2) {
        assert!(
            pair[1] - pair[0] >= 2,
            "admitted at {at:?}: faster than 500/s"
        );
    }
    let spread = at[buyers - 1] - at[0];
    assert!(
        spread >= 98,
        "50 places at 500/s span at least 98 ms, not {spread}"
    );
    eprintln!("500/s after a 10 s lull: {buyers} joiners admitted over {spread} ms");
}

#[tokio::test]
async fn waiting_room_times_are_checked() {
    let env = TestEnv::new().await;
    let app = env.spawn_app().await;
    for opens_at in ["1960-01-01T00:00:00Z", "2999-01-01T00:00:00Z"] {
        let reply = app
            .send(
                app.client
                    .post(app.url("/api/v1/events"))
                    .bearer_auth(crate::harness::ADMIN_TOKEN)
                    .json(&json!({
                        "name": "bad-times",
                        "totalSeats": 5,
                        "queue": {"opensAt": opens_at, "admitPerSecond": 1, "admissionSeconds": 5},
                    })),
            )
            .await;
        assert_eq!(
            reply.status,
            StatusCode::UNPROCESSABLE_ENTITY,
            "{opens_at}: {:?}",
            reply.body
        );
        assert_eq!(reply.code(), "INVALID_EVENT_SETTING");
        let message = reply.body["message"].as_str().unwrap();
        assert!(message.contains("opensAt"), "{message}");
    }
}

#[tokio::test]
async fn a_spent_admission_says_so_and_joining_again_queues_at_the_back() {
    let env = TestEnv::new().await;
    let app = env.spawn_app().await;
    let event = app.create_queued_event(-1_000, 1_000, 1).await;
    let ann = buyer_token("ann");
    let first = join(&app, event, &ann).await;
    assert_eq!(first.body["admitted"], true, "{:?}", first.body);
    let ticket = first.body["ticket"].as_str().unwrap().to_owned();
    tokio::time::sleep(Duration::from_millis(2_100)).await;

    let spent = poll(&app, event, &ticket, &ann).await;
    assert_eq!(spent.status, StatusCode::OK, "{:?}", spent.body);
    assert_eq!(spent.body["admitted"], false);
    assert_eq!(spent.body["admissionExpired"], true);
    assert!(
        spent.body.get("admissionToken").is_none(),
        "{:?}",
        spent.body
    );

    let again = join(&app, event, &ann).await;
    assert_eq!(again.status, StatusCode::ACCEPTED, "{:?}", again.body);
    assert_ne!(
        again.body["ticket"],
        ticket.as_str(),
        "a new place at the back"
    );
    assert_eq!(again.body["admitted"], true, "{:?}", again.body);
    let sold = app
        .send(
            app.client
                .post(app.url(&format!("/api/v1/events/{event}/purchase")))
                .header("Idempotency-Key", "spent-then-again")
                .header(
                    "Admission-Token",
                    again.body["admissionToken"].as_str().unwrap(),
                )
                .bearer_auth(&ann)
                .json(&json!({"quantity": 1})),
        )
        .await;
    assert_eq!(sold.status, StatusCode::OK, "{:?}", sold.body);
}

#[tokio::test]
async fn an_admission_window_starts_when_the_buyer_learns_of_it_but_does_not_bank() {
    let env = TestEnv::new().await;
    // A buyer who polls as told learns of an admission within 1 s (+ 2 s of slack).
    let app = env
        .spawn_app_with(|c| c.serve.queue_poll_max_ms = 1_000)
        .await;
    let event = app.create_queued_event(500, 1_000, 2).await;
    let (ann, bob) = (buyer_token("ann"), buyer_token("bob"));
    let ticket = |reply: Reply| reply.body["ticket"].as_str().unwrap().to_owned();
    let ann_ticket = ticket(join(&app, event, &ann).await);
    let bob_ticket = ticket(join(&app, event, &bob).await);
    // Both are admitted a moment after the opening. Ann learns of it 2.5 s later,
    // past the 2 s window counted from the admission: hers starts when she learns.
    tokio::time::sleep(Duration::from_millis(3_000)).await;
    let learned = poll(&app, event, &ann_ticket, &ann).await;
    assert_eq!(learned.body["admitted"], true, "{:?}", learned.body);
    let expires: DateTime<Utc> = learned.body["expiresAt"].as_str().unwrap().parse().unwrap();
    assert!(expires > Utc::now(), "{:?}", learned.body);
    // Bob stays away for 6 s: a window cannot start later than 3 s after the
    // admission, so his has passed.
    tokio::time::sleep(Duration::from_millis(3_500)).await;
    let late = poll(&app, event, &bob_ticket, &bob).await;
    assert_eq!(late.body["admissionExpired"], true, "{:?}", late.body);
}
