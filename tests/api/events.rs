use std::time::Duration;

use reqwest::StatusCode;
use serde_json::json;

use crate::harness::{ADMIN_TOKEN, TestEnv};

#[tokio::test]
async fn events_are_created_listed_and_sold_without_a_restart() {
    let env = TestEnv::new().await;
    let app = env.spawn_app().await;

    let created = app
        .send(
            app.client
                .post(app.url("/api/v1/events"))
                .bearer_auth(ADMIN_TOKEN)
                .json(&json!({ "name": "Encore", "totalSeats": 30 })),
        )
        .await;
    assert_eq!(created.status, StatusCode::CREATED);
    assert_eq!(created.body["name"], "Encore");
    assert_eq!(
        (
            &created.body["totalSeats"],
            &created.body["seatsSold"],
            &created.body["seatsRemaining"]
        ),
        (&json!(30), &json!(0), &json!(30))
    );
    let id = created.body["id"].as_str().unwrap().parse().unwrap();

    let list = app.get("/api/v1/events").await;
    assert_eq!(list.status, StatusCode::OK);
    let names: Vec<&str> = list
        .body
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["Default event", "Encore"]);

    assert_eq!(
        app.purchase_event(id, "encore-1", 3).await.status,
        StatusCode::OK
    );
    assert_eq!(app.event(id).await["seatsRemaining"], 27);
    // The running consumer finds the new event's stream by itself.
    env.wait_for_rows(id, 1, Duration::from_secs(10)).await;
}

#[tokio::test]
async fn creating_events_needs_the_admin_token() {
    let env = TestEnv::new().await;
    let app = env.spawn_app().await;
    let new_event = json!({ "name": "x", "totalSeats": 5 });
    let post = || app.client.post(app.url("/api/v1/events")).json(&new_event);

    let anonymous = app.send(post()).await;
    assert_eq!(
        (anonymous.status, anonymous.code()),
        (StatusCode::UNAUTHORIZED, "UNAUTHORIZED")
    );
    let wrong = app.send(post().bearer_auth("guess")).await;
    assert_eq!(
        (wrong.status, wrong.code()),
        (StatusCode::UNAUTHORIZED, "UNAUTHORIZED")
    );

    let invalid = [
        json!({ "name": "", "totalSeats": 5 }),
        json!({ "name": "x", "totalSeats": 0 }),
        json!({ "name": "x", "totalSeats": 1_000_001 }),
        json!({ "name": "x" }),
        json!({ "name": 12345, "totalSeats": 5 }),
        json!({ "name": "nul\u{0}byte", "totalSeats": 5 }),
    ];
    for body in invalid {
        let reply = app
            .send(
                app.client
                    .post(app.url("/api/v1/events"))
                    .bearer_auth(ADMIN_TOKEN)
                    .json(&body),
            )
            .await;
        assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{body}");
        assert_eq!(reply.code(), "INVALID_BODY", "{body}: {:?}", reply.body);
    }
    assert_eq!(
        app.get("/api/v1/events")
            .await
            .body
            .as_array()
            .unwrap()
            .len(),
        1
    );
}

#[tokio::test]
async fn without_a_configured_token_the_admin_api_is_disabled() {
    let env = TestEnv::new().await;
    let app = env.spawn_app_with(|c| c.serve.admin_token = None).await;

    let reply = app
        .send(
            app.client
                .post(app.url("/api/v1/events"))
                .bearer_auth("anything")
                .json(&json!({ "name": "x", "totalSeats": 5 })),
        )
        .await;
    assert_eq!(
        (reply.status, reply.code()),
        (StatusCode::FORBIDDEN, "ADMIN_DISABLED")
    );
}

#[tokio::test]
async fn every_replica_sells_the_same_default_event_whatever_else_exists() {
    let env = TestEnv::new().await;
    let first = env.spawn_app().await;
    // An event that sorts before the default one (as one created by hand, or by a
    // CLI racing the first boot, may): replicas used to take the oldest as default.
    sqlx::query(
        "INSERT INTO events (id, name, total_seats, created_at)
         VALUES ($1, 'older', 10, now() - interval '1 day')",
    )
    .bind(uuid::Uuid::now_v7())
    .execute(&env.db)
    .await
    .unwrap();
    let second = env.spawn_app().await;
    assert_eq!(second.default_event, first.default_event);
    assert_eq!(
        first.get("/api/v1/event").await.body["id"],
        second.get("/api/v1/event").await.body["id"]
    );
}

#[tokio::test]
async fn settings_the_server_is_not_configured_for_get_a_documented_422() {
    let env = TestEnv::new().await;
    let app = env
        .spawn_app_with(|c| {
            c.serve.buyer_jwt_key = None;
            c.serve.admission_key = None;
        })
        .await;
    let opens_at = chrono::Utc::now().to_rfc3339();
    for (body, setting) in [
        (
            json!({"name": "limited", "totalSeats": 5, "maxPerBuyer": 2}),
            "BOXOFFICE_BUYER_JWT_KEY",
        ),
        (
            json!({"name": "queued", "totalSeats": 5,
                   "queue": {"opensAt": opens_at, "admitPerSecond": 1, "admissionSeconds": 5}}),
            "BOXOFFICE_ADMISSION_KEY",
        ),
    ] {
        let reply = app
            .send(
                app.client
                    .post(app.url("/api/v1/events"))
                    .bearer_auth(ADMIN_TOKEN)
                    .json(&body),
            )
            .await;
        assert_eq!(
            reply.status,
            StatusCode::UNPROCESSABLE_ENTITY,
            "{:?}",
            reply.body
        );
        assert_eq!(reply.code(), "FEATURE_NOT_CONFIGURED");
        let message = reply.body["message"].as_str().unwrap();
        assert!(message.contains(setting), "{message}");
    }
    let spec = app.get("/openapi.json").await.body;
    let create = &spec["paths"]["/api/v1/events"]["post"]["responses"];
    assert!(
        create.get("422").is_some(),
        "422 is not in the spec: {create}"
    );
}

#[tokio::test]
async fn events_come_a_page_at_a_time_following_link_and_each_page_is_kept_a_second() {
    let env = TestEnv::new().await;
    let app = env.spawn_app().await;
    let mut made = Vec::new();
    for i in 0..4 {
        made.push(app.create_event(&format!("page {i}"), 5).await.to_string());
    }

    let mut seen = Vec::new();
    let mut path = "/api/v1/events?limit=2".to_owned();
    loop {
        let response = app.client.get(app.url(&path)).send().await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        let link = response
            .headers()
            .get("link")
            .map(|l| l.to_str().unwrap().to_owned());
        let page: serde_json::Value = response.json().await.unwrap();
        let page = page.as_array().unwrap();
        assert!(page.len() <= 2);
        seen.extend(page.iter().map(|e| e["id"].as_str().unwrap().to_owned()));
        let Some(link) = link else { break };
        assert!(link.ends_with("; rel=\"next\""), "{link}");
        path = link[1..link.find('>').unwrap()].to_owned();
    }
    assert_eq!(seen.len(), 5, "the default event and four more, once each");
    assert_eq!(&seen[1..], &made[..], "oldest first");

    // A page is kept for a second: a sale shows on it after that, at once on the event.
    let first = format!("/api/v1/events?limit=5&after={}", seen[0]);
    assert_eq!(app.get(&first).await.body[0]["seatsSold"], 0);
    let event = made[0].parse().unwrap();
    assert_eq!(
        app.purchase_event(event, "paged", 2).await.status,
        StatusCode::OK
    );
    assert_eq!(app.event(event).await["seatsSold"], 2);
    assert_eq!(app.get(&first).await.body[0]["seatsSold"], 0);
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    assert_eq!(app.get(&first).await.body[0]["seatsSold"], 2);

    for bad in ["limit=0", "limit=501", "after=not-a-uuid"] {
        let reply = app.get(&format!("/api/v1/events?{bad}")).await;
        assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{bad}");
        assert_eq!(reply.code(), "INVALID_PARAMETER", "{bad}");
    }
    // A cursor naming no event is a missing resource, not a malformed request: an
    // empty page would read as the last one.
    let unknown = format!("/api/v1/events?after={}", uuid::Uuid::now_v7());
    let reply = app.get(&unknown).await;
    assert_eq!(reply.status, StatusCode::NOT_FOUND);
    assert_eq!(reply.code(), "EVENT_NOT_FOUND");
}
