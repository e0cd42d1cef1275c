//! Every error code the spec lists, provoked the way a client would, and its message
//! read as that client: it names the field, header or setting to change, in the API's
//! words, and never a parser's type name.

use std::collections::BTreeMap;
use std::time::Duration;

use poem_openapi::types::ToJSON;
use reqwest::StatusCode;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use uuid::Uuid;

use crate::harness::{ADMIN_TOKEN, Reply, TestApp, TestEnv, buyer_token};

/// Words of the parsers behind the API, which mean nothing to a client.
const INTERNAL: &[&str] = &[
    "integer_",
    "string_",
    "int32",
    "int64",
    "Request\"",
    "NewEvent",
    "WaitingRoom",
    "failed to parse",
    "occurred while",
    "Expected input type",
    "param0",
    "authorization error",
];

/// What each code's message must name for the client to know what to change (or,
/// where nothing is theirs to change, what to do next).
fn hint(code: &str) -> &'static [&'static str] {
    match code {
        "SOLD_OUT" => &["seats"],
        "INVALID_IDEMPOTENCY_KEY" => &["Idempotency-Key"],
        "INVALID_QUANTITY" => &["quantity"],
        "INVALID_BODY" => &[
            "JSON",
            "totalSeats",
            "name",
            "holdSeconds",
            "maxPerBuyer",
            "queue",
        ],
        "INVALID_PARAMETER" => &["UUID"],
        "IDEMPOTENCY_KEY_REUSED" => &["Idempotency-Key"],
        "EVENT_NOT_FOUND" => &["event"],
        "NOT_FOUND" => &["/docs"],
        "METHOD_NOT_ALLOWED" => &["Allow"],
        "PAYLOAD_TOO_LARGE" => &["bytes"],
        "REQUEST_TIMEOUT" => &["Idempotency-Key"],
        "UNSUPPORTED_MEDIA_TYPE" => &["Content-Type: application/json"],
        "UNAUTHORIZED" => &["ADMIN_TOKEN"],
        "BUYER_TOKEN_REQUIRED" => &["Authorization: Bearer"],
        "BUYER_TOKEN_INVALID" => &["token"],
        "BUYER_LIMIT" => &["buyer"],
        "HOLD_NOT_FOUND" => &["hold"],
        "HOLD_EXPIRED" => &["hold"],
        "HOLD_CONFIRMED" => &["cancel"],
        "PURCHASE_NOT_FOUND" => &["sale"],
        "ADMISSION_REQUIRED" => &["Admission-Token"],
        "EVENT_NOT_QUEUED" => &["waiting room"],
        "TICKET_NOT_FOUND" => &["ticket"],
        "FEATURE_NOT_CONFIGURED" => &["BOXOFFICE_BUYER_JWT_KEY"],
        "INVALID_EVENT_SETTING" => &["BOXOFFICE_MAX_HOLD_SECONDS"],
        "ADMIN_DISABLED" => &["ADMIN_TOKEN"],
        "SERVICE_UNAVAILABLE" => &["retry"],
        "INTERNAL_ERROR" => &["X-Request-Id"],
        "RATE_LIMITED" => &["retry after"],
        other => panic!("{other}: list what its message must name"),
    }
}

fn spec_codes() -> Vec<String> {
    let spec: Value =
        serde_json::from_str(include_str!("../../openapi/openapi.json")).expect("spec is JSON");
    spec["components"]["schemas"]["ErrorCode"]["enum"]
        .as_array()
        .expect("ErrorCode is an enum")
        .iter()
        .map(|c| c.as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test]
async fn every_error_code_names_what_to_change_in_the_apis_words() {
    let env = TestEnv::new().await;
    let app = env
        .spawn_app_with(|c| c.serve.request_timeout_ms = 300)
        .await;
    let keyless = env
        .spawn_app_with(|c| {
            c.serve.buyer_jwt_key = None;
            c.serve.admission_key = None;
        })
        .await;
    let no_admin = env
        .spawn_app_with(|c| {
            c.serve.admin_token = None;
            c.serve.rate_limits.address = 1; // bursts of 2
        })
        .await;
    let mut seen: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut note = |reply: Reply| {
        if reply.status.is_success() {
            return;
        }
        let code = reply.code().to_owned();
        let message = reply.body["message"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        seen.entry(code).or_default().push(message);
    };
    let events = app.url("/api/v1/events");
    let post = |path: &str| app.client.post(app.url(path));

    let event = app.create_event("errors", 2).await;
    let on = |what: &str| format!("/api/v1/events/{event}/{what}");
    note(app.purchase_event(event, "k1", 2).await);
    note(app.purchase_event(event, "k2", 1).await); // SOLD_OUT
    note(app.purchase_event(event, "k1", 1).await); // IDEMPOTENCY_KEY_REUSED
    note(app.purchase_event(Uuid::now_v7(), "k", 1).await); // EVENT_NOT_FOUND
    note(
        app.send(
            post("/api/v1/events//purchase")
                .header("Idempotency-Key", "k")
                .json(&json!({"quantity": 1})),
        )
        .await,
    );
    note(
        app.send(post("/api/v1/purchase").json(&json!({"quantity": 1})))
            .await,
    );
    note(app.purchase_body("k", json!({"quantity": 11})).await);
    note(app.purchase_body("k", json!({"quantity": "two"})).await);
    note(app.purchase_body("k", json!([1])).await);
    note(
        app.send(
            post("/api/v1/purchase")
                .header("Idempotency-Key", "k")
                .body("{\"quantity\": 1"),
        )
        .await,
    );
    note(
        app.send(
            post("/api/v1/purchase")
                .header("Idempotency-Key", "k")
                .body("{\"quantity\": 1}"),
        )
        .await,
    );
    note(
        app.send(
            post("/api/v1/purchase")
                .header("Idempotency-Key", "k")
                .json(&json!({"quantity": "x".repeat(20_000)})),
        )
        .await,
    );
    note(app.get("/api/v1/nowhere").await);
    note(
        app.send(app.client.delete(app.url("/api/v1/purchase")))
            .await,
    );
    note(
        app.send(
            app.client
                .post(events.clone())
                .json(&json!({"name": "e", "totalSeats": 1})),
        )
        .await,
    );
    note(
        app.send(
            app.client
                .post(events.clone())
                .bearer_auth("not-it")
                .json(&json!({"name": "e", "totalSeats": 1})),
        )
        .await,
    );
    for (body, field) in [
        (json!({"name": "e", "totalSeats": 0}), "totalSeats"),
        (
            json!({"name": "e", "totalSeats": 1, "queue": {"opensAt": "soon"}}),
            "queue",
        ),
        (
            json!({"name": "e", "totalSeats": 1, "holdSeconds": 86_400}),
            "holdSeconds",
        ),
    ] {
        let reply = app
            .send(
                app.client
                    .post(events.clone())
                    .bearer_auth(ADMIN_TOKEN)
                    .json(&body),
            )
            .await;
        let message = reply.body["message"].as_str().unwrap_or_default();
        assert!(message.contains(field), "{body}: {message}");
        note(reply);
    }

    for body in [
        json!({"name": "e", "totalSeats": 1, "holdSeconds": null}),
        json!({"name": "e", "totalSeats": 1, "maxPerBuyer": "2"}),
        json!({"name": "e", "totalSeats": 1, "queue": {"admitPerSecond": 5}}),
        json!({"name": "", "totalSeats": 1}),
        json!({"totalSeats": 1}),
        json!("an event"),
    ] {
        note(create_event(&app, ADMIN_TOKEN, &body).await);
    }
    note(
        app.send(
            post("/api/v1/events/01a220c6-8a7c-75ef-9c0b-/purchase")
                .header("Idempotency-Key", "k")
                .json(&json!({"quantity": 1})),
        )
        .await,
    );
    note(app.purchase_body("k", json!({"quantity": null})).await);
    note(app.purchase_body("k", json!({"quantity": 1.5})).await);
    note(app.purchase_body("k", json!({})).await);
    note(
        app.send(
            post("/api/v1/purchase")
                .header("Idempotency-Key", "k")
                .header("Content-Type", "application/json")
                .body(""),
        )
        .await,
    );
    note(
        app.send(
            post("/api/v1/purchase")
                .header("Idempotency-Key", "x".repeat(300))
                .json(&json!({"quantity": 1})),
        )
        .await,
    );

    // Holds: unknown, released, confirmed.
    note(app.confirm(event, &Uuid::now_v7().to_string()).await);
    let roomy = app.create_event("errors, holds", 10).await;
    let hold = app.hold(roomy, "h1", 1, None).await.body["holdId"]
        .as_str()
        .unwrap()
        .to_owned();
    app.release(roomy, &hold).await;
    note(app.confirm(roomy, &hold).await); // HOLD_EXPIRED
    let kept = app.hold(roomy, "h2", 1, None).await.body["holdId"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(app.confirm(roomy, &kept).await.status, StatusCode::OK);
    let (_, body) = app.release(roomy, &kept).await;
    note(Reply {
        status: StatusCode::CONFLICT,
        replayed: false,
        body: body.unwrap(),
        content_type: String::new(),
    });
    note(app.cancel(roomy, &Uuid::now_v7().to_string()).await); // PURCHASE_NOT_FOUND

    // Buyers.
    let limited = app
        .create_event_with(json!({"name": "limited", "totalSeats": 10, "maxPerBuyer": 1}))
        .await;
    note(app.purchase_as(limited, "b1", 1, None).await);
    note(app.purchase_as(limited, "b2", 1, Some("not-a-jwt")).await);
    note(
        app.purchase_as(limited, "b3", 2, Some(&buyer_token("ann")))
            .await,
    );

    // The waiting room.
    let opens = (chrono::Utc::now() + chrono::Duration::minutes(10)).to_rfc3339();
    let queued = app
        .create_event_with(json!({"name": "queued", "totalSeats": 10,
            "queue": {"opensAt": opens, "admitPerSecond": 10, "admissionSeconds": 60}}))
        .await;
    let ann = buyer_token("ann");
    note(app.purchase_as(queued, "q1", 1, Some(&ann)).await);
    note(app.send(post(&on("queue")).bearer_auth(&ann)).await);
    note(
        app.send(
            app.client
                .get(app.url(&format!("/api/v1/events/{queued}/queue/p999")))
                .bearer_auth(&ann),
        )
        .await,
    );

    // Servers configured without the buyer keys, or without the admin token.
    let limited_body = json!({"name": "e", "totalSeats": 1, "maxPerBuyer": 1});
    note(create_event(&keyless, ADMIN_TOKEN, &limited_body).await);
    note(create_event(&no_admin, "any", &limited_body).await);
    // A client over its rate limit.
    for i in 0..20 {
        let reply = no_admin.purchase(&format!("limited-{i}"), 1).await;
        let limited = reply.status == StatusCode::TOO_MANY_REQUESTS;
        note(reply);
        if limited {
            break;
        }
    }

    // A body that does not arrive in time.
    let address = app.address.trim_start_matches("http://").to_owned();
    let mut slow = tokio::net::TcpStream::connect(&address).await.unwrap();
    slow.write_all(
        b"POST /api/v1/purchase HTTP/1.1\r\nHost: x\r\nIdempotency-Key: slow\r\n\
          Content-Type: application/json\r\nContent-Length: 20\r\nConnection: close\r\n\r\n{\"quan",
    )
    .await
    .unwrap();
    let mut answer = String::new();
    tokio::time::timeout(Duration::from_secs(5), slow.read_to_string(&mut answer))
        .await
        .expect("answered in time")
        .unwrap();
    let body = answer.split("\r\n\r\n").nth(1).unwrap_or_default();
    note(Reply {
        status: StatusCode::REQUEST_TIMEOUT,
        replayed: false,
        body: serde_json::from_str(body).unwrap(),
        content_type: String::new(),
    });

    // What no client can provoke on demand, mapped by the same function.
    for error in [
        boxoffice::Error::RecoveryPending("an event is being recovered".into()),
        boxoffice::Error::UnexpectedReply("a bug".into()),
    ] {
        let mapped = boxoffice::api::error::ApiError::from(error);
        note(Reply {
            status: mapped.status,
            replayed: false,
            body: json!({"error": mapped.body.error.to_json(), "message": mapped.body.message}),
            content_type: String::new(),
        });
    }

    let mut problems = Vec::new();
    for code in spec_codes() {
        let Some(messages) = seen.get(&code) else {
            problems.push(format!("{code}: not provoked"));
            continue;
        };
        for message in messages {
            if let Some(word) = INTERNAL.iter().find(|w| message.contains(*w)) {
                problems.push(format!("{code}: {message:?} has the parser's {word:?}"));
            }
            if !hint(&code).iter().any(|word| message.contains(word)) {
                problems.push(format!(
                    "{code}: {message:?} names none of {:?}",
                    hint(&code)
                ));
            }
        }
    }
    assert!(
        problems.is_empty(),
        "{}\n\nall: {seen:#?}",
        problems.join("\n")
    );
}

async fn create_event(app: &TestApp, token: &str, body: &Value) -> Reply {
    app.send(
        app.client
            .post(app.url("/api/v1/events"))
            .bearer_auth(token)
            .json(body),
    )
    .await
}

#[tokio::test]
async fn a_server_refuses_to_start_with_a_short_admin_token_or_an_example_secret() {
    use boxoffice::startup::Application;
    let env = TestEnv::new().await;
    let start = |change: &dyn Fn(&mut boxoffice::cli::ServeArgs)| {
        let mut config = env.config();
        change(&mut config);
        async move {
            Application::build(&config.common, &config.serve, &config.consumer)
                .await
                .err()
                .map(|e| e.to_string())
        }
    };
    let short = start(&|c| c.serve.admin_token = Some("change".into())).await;
    let short = short.expect("a 6-byte admin token is refused");
    assert!(short.contains("ADMIN_TOKEN is 6 bytes"), "{short}");
    assert!(short.contains("BOXOFFICE_INSECURE_DEV"), "{short}");
    let example = "change-me-to-a-secret-of-32-bytes-or-more";
    let shipped = start(&|c| c.serve.buyer_jwt_key = Some(example.into())).await;
    let shipped = shipped.expect("k8s/secret.yaml's buyer key is refused");
    assert!(
        shipped.contains("BOXOFFICE_BUYER_JWT_KEY is an example value"),
        "{shipped}"
    );

    let laptop = start(&|c| {
        c.serve.admin_token = Some("change".into());
        c.serve.insecure_dev = true;
    })
    .await;
    assert_eq!(laptop, None, "BOXOFFICE_INSECURE_DEV accepts it");
}
