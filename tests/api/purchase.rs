use reqwest::StatusCode;
use serde_json::json;
use uuid::Uuid;

use crate::harness::TestEnv;

#[tokio::test]
async fn a_purchase_sells_seats_and_reaches_postgres() {
    let env = TestEnv::new().await;
    let app = env.spawn_app().await;

    let reply = app.purchase("happy-1", 2).await;

    assert_eq!(reply.status, StatusCode::OK, "{:?}", reply.body);
    assert!(!reply.replayed);
    assert_eq!(reply.content_type, "application/json; charset=utf-8");
    let purchase_id: Uuid = reply.body["purchaseId"].as_str().unwrap().parse().unwrap();
    // The whole body: exactly the spec's fields, named as the spec names them.
    assert_eq!(
        reply.body,
        json!({
            "success": true,
            "seatsRemaining": 4998,
            "purchaseId": purchase_id.to_string(),
            "quantity": 2,
            "eventId": app.default_event.to_string(),
        })
    );

    let event = app.get("/api/v1/event").await;
    assert_eq!(event.status, StatusCode::OK);
    assert_eq!(
        (
            &event.body["totalSeats"],
            &event.body["seatsSold"],
            &event.body["seatsRemaining"]
        ),
        (&json!(5000), &json!(2), &json!(4998))
    );

    env.wait_for_rows(app.default_event, 1, std::time::Duration::from_secs(10))
        .await;
    assert_eq!(
        env.rows(app.default_event).await,
        vec![(purchase_id, "happy-1".to_string(), 2)]
    );
}

#[tokio::test]
async fn a_sold_out_event_answers_409_and_sells_nothing() {
    let env = TestEnv::new().await;
    let app = env
        .spawn_app_with(|c| c.serve.default_event_seats = 3)
        .await;

    assert_eq!(app.purchase("so-1", 2).await.status, StatusCode::OK);
    let refused = app.purchase("so-2", 2).await;
    assert_eq!(refused.status, StatusCode::CONFLICT);
    assert_eq!(refused.code(), "SOLD_OUT");
    assert!(refused.body["message"].is_string());
    assert_eq!(app.get("/api/v1/event").await.body["seatsSold"], 2);

    let last = app.purchase("so-3", 1).await;
    assert_eq!(last.status, StatusCode::OK);
    assert_eq!(last.body["seatsRemaining"], 0);
    assert_eq!(app.purchase("so-4", 1).await.code(), "SOLD_OUT");
    assert_eq!(app.get("/api/v1/event").await.body["seatsSold"], 3);
}

#[tokio::test]
async fn the_last_seats_sell_exactly() {
    let env = TestEnv::new().await;
    let app = env.spawn_app().await;
    let event = app.create_event("last seats", 12).await;
    assert_eq!(
        app.purchase_event(event, "ls-1", 5).await.status,
        StatusCode::OK
    );

    // 7 remain: 8 sells nothing, 7 sells all of them, then nothing more.
    let too_many = app.purchase_event(event, "ls-2", 8).await;
    assert_eq!(too_many.code(), "SOLD_OUT");
    assert_eq!(app.event(event).await["seatsRemaining"], 7);

    let rest = app.purchase_event(event, "ls-3", 7).await;
    assert_eq!(rest.status, StatusCode::OK);
    assert_eq!(rest.body["seatsRemaining"], 0);
    assert_eq!(
        app.purchase_event(event, "ls-4", 1).await.code(),
        "SOLD_OUT"
    );

    let seats = app.event(event).await;
    assert_eq!(
        (&seats["seatsSold"], &seats["seatsRemaining"]),
        (&json!(12), &json!(0))
    );
}

/// One invalid request and the status and code it must get.
struct Case {
    name: &'static str,
    key: Option<String>,
    content_type: Option<&'static str>,
    body: String,
    status: StatusCode,
    code: &'static str,
}

fn case(name: &'static str, body: &str, status: StatusCode, code: &'static str) -> Case {
    Case {
        name,
        key: Some(format!("matrix-{name}")),
        content_type: Some("application/json"),
        body: body.to_owned(),
        status,
        code,
    }
}

#[tokio::test]
async fn invalid_requests_get_json_errors_and_sell_nothing() {
    let env = TestEnv::new().await;
    let app = env.spawn_app().await;
    let bad = StatusCode::BAD_REQUEST;
    let valid = r#"{"quantity":1}"#;
    let cases = vec![
        Case {
            key: None,
            ..case("missing key", valid, bad, "INVALID_IDEMPOTENCY_KEY")
        },
        Case {
            key: Some(String::new()),
            ..case("empty key", valid, bad, "INVALID_IDEMPOTENCY_KEY")
        },
        Case {
            key: Some("k".repeat(256)),
            ..case("long key", valid, bad, "INVALID_IDEMPOTENCY_KEY")
        },
        Case {
            key: Some("tab\tkey".into()),
            ..case("control key", valid, bad, "INVALID_IDEMPOTENCY_KEY")
        },
        case("quantity 0", r#"{"quantity":0}"#, bad, "INVALID_QUANTITY"),
        case("quantity 11", r#"{"quantity":11}"#, bad, "INVALID_QUANTITY"),
        case("quantity -1", r#"{"quantity":-1}"#, bad, "INVALID_QUANTITY"),
        case(
            "quantity 2.5",
            r#"{"quantity":2.5}"#,
            bad,
            "INVALID_QUANTITY",
        ),
        case(
            "quantity string",
            r#"{"quantity":"1"}"#,
            bad,
            "INVALID_QUANTITY",
        ),
        case(
            "quantity null",
            r#"{"quantity":null}"#,
            bad,
            "INVALID_QUANTITY",
        ),
        case("quantity missing", r#"{}"#, bad, "INVALID_QUANTITY"),
        case(
            "quantity huge",
            r#"{"quantity":1e400}"#,
            bad,
            "INVALID_BODY",
        ),
        case("malformed json", r#"{"quantity":"#, bad, "INVALID_BODY"),
        case("not an object", r#"[1]"#, bad, "INVALID_BODY"),
        case("empty body", "", bad, "INVALID_BODY"),
        Case {
            content_type: Some("text/plain"),
            ..case(
                "text body",
                valid,
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "UNSUPPORTED_MEDIA_TYPE",
            )
        },
        Case {
            content_type: None,
            ..case(
                "no content type",
                valid,
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "UNSUPPORTED_MEDIA_TYPE",
            )
        },
        case(
            "over the body limit",
            &format!(r#"{{"quantity":1,"pad":"{}"}}"#, "x".repeat(20_000)),
            StatusCode::PAYLOAD_TOO_LARGE,
            "PAYLOAD_TOO_LARGE",
        ),
    ];

    for case in &cases {
        let mut request = app
            .client
            .post(app.url("/api/v1/purchase"))
            .body(case.body.clone());
        if let Some(key) = &case.key {
            request = request.header("Idempotency-Key", key);
        }
        if let Some(content_type) = case.content_type {
            request = request.header("Content-Type", content_type);
        }
        let reply = app.send(request).await;
        assert_eq!(reply.status, case.status, "{}: {:?}", case.name, reply.body);
        assert_eq!(reply.code(), case.code, "{}: {:?}", case.name, reply.body);
        assert!(
            reply.content_type.starts_with("application/json"),
            "{}",
            case.name
        );
        assert!(reply.body["message"].is_string(), "{}", case.name);
    }

    assert_eq!(app.get("/api/v1/event").await.body["seatsSold"], 0);
    // Rejected requests are not recorded under their key: the key still works.
    let later = app.purchase("matrix-quantity 0", 1).await;
    assert_eq!(later.status, StatusCode::OK);
    assert!(!later.replayed);
}

#[tokio::test]
async fn unknown_and_malformed_events_are_refused() {
    let env = TestEnv::new().await;
    let app = env.spawn_app().await;

    let unknown = app.purchase_event(Uuid::now_v7(), "ghost", 1).await;
    assert_eq!(
        (unknown.status, unknown.code()),
        (StatusCode::NOT_FOUND, "EVENT_NOT_FOUND")
    );

    let malformed = app.get("/api/v1/events/not-a-uuid").await;
    assert_eq!(
        (malformed.status, malformed.code()),
        (StatusCode::BAD_REQUEST, "INVALID_PARAMETER")
    );
    let wrong_method = app
        .client
        .delete(app.url("/api/v1/events"))
        .send()
        .await
        .unwrap();
    assert_eq!(wrong_method.status(), StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(wrong_method.headers()["allow"], "GET, POST");
    // Also on a route with a path parameter.
    let wrong_method = app
        .client
        .delete(app.url(&format!("/api/v1/events/{}/purchase", Uuid::now_v7())))
        .send()
        .await
        .unwrap();
    assert_eq!(wrong_method.status(), StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(wrong_method.headers()["allow"], "POST");
    let route = app.get("/api/v1/nothing-here").await;
    assert_eq!(
        (route.status, route.code()),
        (StatusCode::NOT_FOUND, "NOT_FOUND")
    );
}

#[tokio::test]
async fn request_ids_are_echoed_or_generated() {
    let env = TestEnv::new().await;
    let app = env.spawn_app().await;

    let echoed = app
        .client
        .get(app.url("/health"))
        .header("X-Request-Id", "trace-me-42")
        .send()
        .await
        .unwrap();
    assert_eq!(echoed.headers()["x-request-id"], "trace-me-42");

    let first = app.client.get(app.url("/health")).send().await.unwrap();
    let second = app.client.get(app.url("/health")).send().await.unwrap();
    let (first, second) = (
        first.headers()["x-request-id"].to_str().unwrap().to_owned(),
        second.headers()["x-request-id"]
            .to_str()
            .unwrap()
            .to_owned(),
    );
    assert!(first.len() > 12, "{first}");
    assert_ne!(first, second, "each request gets its own id");
}
