//! Hostile and careless clients: every limit refuses cheaply and clearly, and frees
//! what the client held.

use std::time::{Duration, Instant};

use reqwest::StatusCode;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::harness::{Reply, TestApp, TestEnv};

async fn connect(app: &TestApp) -> TcpStream {
    TcpStream::connect(app.address.trim_start_matches("http://"))
        .await
        .unwrap()
}

/// Reads until the server closes the connection or `within` passes; returns what
/// arrived and whether the connection was closed.
async fn read_until_closed(stream: &mut TcpStream, within: Duration) -> (String, bool) {
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = Instant::now() + within;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return (String::from_utf8_lossy(&seen).into(), true),
            Ok(Ok(n)) => seen.extend_from_slice(&buf[..n]),
            Err(_) => return (String::from_utf8_lossy(&seen).into(), false),
        }
    }
}

#[tokio::test]
async fn headers_over_the_limit_get_431_and_under_it_are_served() {
    let env = TestEnv::new().await;
    let app = env.spawn_app().await;
    let big = app
        .client
        .get(app.url("/health"))
        .header("x-filler", "a".repeat(20 * 1024))
        .send()
        .await
        .unwrap();
    assert_eq!(big.status(), StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE);
    let fine = app
        .client
        .get(app.url("/health"))
        .header("x-filler", "a".repeat(8 * 1024))
        .send()
        .await
        .unwrap();
    assert_eq!(fine.status(), StatusCode::OK);
}

#[tokio::test]
async fn a_client_too_slow_to_send_its_headers_is_disconnected() {
    let env = TestEnv::new().await;
    let app = env
        .spawn_app_with(|c| c.serve.header_timeout_ms = 300)
        .await;
    // Half a request line, then nothing: the connection is closed, not kept.
    let mut slow = connect(&app).await;
    slow.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let started = Instant::now();
    let (_, closed) = read_until_closed(&mut slow, Duration::from_secs(5)).await;
    assert!(closed, "still open after 5 s");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );

    // One that connects and says nothing, likewise.
    let mut silent = connect(&app).await;
    let (_, closed) = read_until_closed(&mut silent, Duration::from_secs(5)).await;
    assert!(closed);

    // A prompt client is unaffected.
    assert_eq!(app.get("/health").await.status, StatusCode::OK);
}

#[tokio::test]
async fn a_body_that_does_not_arrive_in_time_gets_408() {
    let env = TestEnv::new().await;
    let app = env
        .spawn_app_with(|c| c.serve.request_timeout_ms = 300)
        .await;
    let mut slow = connect(&app).await;
    slow.write_all(
        b"POST /api/v1/purchase HTTP/1.1\r\nHost: x\r\nIdempotency-Key: slow-body\r\n\
          Content-Type: application/json\r\nContent-Length: 20\r\n\r\n{\"quan",
    )
    .await
    .unwrap();
    let started = Instant::now();
    let (answer, _) = read_until_closed(&mut slow, Duration::from_secs(5)).await;
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("\"REQUEST_TIMEOUT\""), "{answer}");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    // Nothing was sold under the key.
    let reply = app.purchase("slow-body", 1).await;
    assert_eq!((reply.status, reply.replayed), (StatusCode::OK, false));
}

#[tokio::test]
async fn connections_over_the_limit_wait_until_one_closes() {
    let env = TestEnv::new().await;
    let app = env.spawn_app_with(|c| c.serve.max_connections = 2).await;
    let held = [connect(&app).await, connect(&app).await];
    let mut third = connect(&app).await;
    third
        .write_all(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let (answer, _) = read_until_closed(&mut third, Duration::from_millis(500)).await;
    assert!(answer.is_empty(), "served beyond the limit: {answer}");

    drop(held);
    let (answer, closed) = read_until_closed(&mut third, Duration::from_secs(5)).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(closed);
}

#[tokio::test]
async fn deeply_nested_json_is_refused_quickly() {
    let env = TestEnv::new().await;
    let app = env.spawn_app().await;
    let depth = 5_000;
    let body = format!(
        "{{\"quantity\":{}1{}}}",
        "[".repeat(depth),
        "]".repeat(depth)
    );
    let started = Instant::now();
    let reply = Reply::read(
        app.client
            .post(app.url("/api/v1/purchase"))
            .header("Idempotency-Key", "nested")
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{:?}", reply.body);
    assert!(started.elapsed() < Duration::from_secs(1));
    let reply = app.purchase("nested", 1).await;
    assert_eq!((reply.status, reply.replayed), (StatusCode::OK, false));
}

#[tokio::test]
async fn cors_is_off_unless_origins_are_configured() {
    let env = TestEnv::new().await;
    let preflight = |app: &TestApp, origin: &str| {
        app.client
            .request(reqwest::Method::OPTIONS, app.url("/api/v1/purchase"))
            .header("origin", origin)
            .header("access-control-request-method", "POST")
            .header(
                "access-control-request-headers",
                "content-type,idempotency-key",
            )
            .send()
    };
    let allowed = |response: &reqwest::Response| {
        response
            .headers()
            .get("access-control-allow-origin")
            .map(|v| v.to_str().unwrap().to_owned())
    };

    let closed = env.spawn_app().await;
    let response = preflight(&closed, "https://shop.example").await.unwrap();
    assert_eq!(allowed(&response), None);
    let response = closed
        .client
        .get(closed.url("/api/v1/event"))
        .header("origin", "https://shop.example")
        .send()
        .await
        .unwrap();
    assert_eq!(allowed(&response), None);

    let open = env
        .spawn_app_with(|c| c.serve.cors_origins = vec!["https://shop.example".into()])
        .await;
    let response = preflight(&open, "https://shop.example").await.unwrap();
    assert!(response.status().is_success(), "{}", response.status());
    assert_eq!(allowed(&response).as_deref(), Some("https://shop.example"));
    let response = open
        .client
        .get(open.url("/api/v1/event"))
        .header("origin", "https://shop.example")
        .send()
        .await
        .unwrap();
    assert_eq!(allowed(&response).as_deref(), Some("https://shop.example"));
    let response = preflight(&open, "https://evil.example").await.unwrap();
    assert_eq!(allowed(&response), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_uploading_a_body_over_the_limit_reads_the_413() {
    let env = TestEnv::new().await;
    let app = env.spawn_app().await;
    let size = 2 * 1024 * 1024;
    for _ in 0..3 {
        let mut stream = connect(&app).await;
        let head = format!(
            "POST /api/v1/purchase HTTP/1.1\r\nHost: x\r\nIdempotency-Key: big-body\r\n\
             Connection: close\r\nContent-Type: application/json\r\n\
             Content-Length: {size}\r\n\r\n"
        );
        stream.write_all(head.as_bytes()).await.unwrap();
        stream.write_all(&vec![b' '; size / 2]).await.unwrap();
        // Half-way through the upload nothing has come back: an answer now, and the
        // connection closed after it, would cut the upload off (a broken pipe, and
        // most clients never read the answer).
        let mut early = [0u8; 64];
        let answered = tokio::time::timeout(Duration::from_millis(300), stream.read(&mut early));
        assert!(answered.await.is_err(), "answered before the upload ended");
        stream.write_all(&vec![b' '; size / 2]).await.unwrap();
        let (answer, _) = read_until_closed(&mut stream, Duration::from_secs(5)).await;
        assert!(answer.starts_with("HTTP/1.1 413"), "{answer:?}");
        assert!(answer.contains("\"PAYLOAD_TOO_LARGE\""), "{answer}");
    }
    // Nothing was sold under the key.
    let reply = app.purchase("big-body", 1).await;
    assert_eq!((reply.status, reply.replayed), (StatusCode::OK, false));
}

#[tokio::test]
async fn a_client_that_sends_requests_and_never_reads_the_answers_is_disconnected() {
    let env = TestEnv::new().await;
    let app = env
        .spawn_app_with(|c| {
            c.serve.write_timeout_ms = 500;
            c.serve.max_connections = 2;
        })
        .await;
    // Two connections (every slot) pipeline requests for the spec, a large answer,
    // and read nothing: once the socket buffers are full their answers stall.
    let request = b"GET /openapi.json HTTP/1.1\r\nHost: x\r\n\r\n".repeat(400);
    let mut hogs = Vec::new();
    for _ in 0..2 {
        let mut hog = connect(&app).await;
        let (_, mut writer) = hog.split();
        // The server stops reading once its answers stall; so may this write.
        let _ = tokio::time::timeout(Duration::from_secs(2), writer.write_all(&request)).await;
        hogs.push(hog);
    }

    // The stalled connections are closed, so a prompt client gets a slot.
    let started = Instant::now();
    let fresh = reqwest::Client::new();
    let live = tokio::time::timeout(
        Duration::from_secs(10),
        fresh.get(app.url("/health/live")).send(),
    )
    .await
    .expect("answered: the stalled connections gave their slots back")
    .unwrap();
    assert_eq!(live.status(), StatusCode::OK);
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    drop(hogs);
}
