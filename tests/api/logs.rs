//! Secrets never reach the log: the real binary runs at debug level, is given
//! passwords in both store URLs and an admin token, and is sent the token, a wrong
//! token and purchases, through a Redis outage; its whole output is then searched.

use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

use crate::harness::TestEnv;
use crate::processes::{Persistence, PrivatePostgres, PrivateRedis, servers_available};

const REDIS_PASSWORD: &str = "redis-pw-4d1e0a";
const PG_PASSWORD: &str = "pg-pw-9b7c2f";
const ADMIN_TOKEN: &str = "admin-token-77f1c3-of-32-bytes-or-more";
const WRONG_TOKEN: &str = "wrong-token-31aa8d";
const IDEMPOTENCY_KEY: &str = "idem-key-5c2e91";

/// Output of a `boxoffice` process, collected line by line as it is written.
#[derive(Clone, Default)]
struct Output(Arc<Mutex<String>>);

impl Output {
    fn collect(&self, stream: impl tokio::io::AsyncRead + Unpin + Send + 'static) {
        let output = self.clone();
        tokio::spawn(async move {
            let mut lines = BufReader::new(stream).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                let mut text = output.0.lock().unwrap();
                text.push_str(&line);
                text.push('\n');
            }
        });
    }

    fn text(&self) -> String {
        self.0.lock().unwrap().clone()
    }

    /// The port from the "serving" line, once it is there.
    async fn port(&self) -> u16 {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let port = self.text().lines().find_map(|line| {
                let line: Value = serde_json::from_str(line).ok()?;
                (line["message"] == "serving").then(|| line["port"].as_u64())?
            });
            if let Some(port) = port {
                return port as u16;
            }
            assert!(Instant::now() < deadline, "never served:\n{}", self.text());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

fn assert_no_secrets(output: &str) {
    for secret in [
        REDIS_PASSWORD,
        PG_PASSWORD,
        ADMIN_TOKEN,
        WRONG_TOKEN,
        IDEMPOTENCY_KEY,
    ] {
        let line = output.lines().find(|line| line.contains(secret));
        assert!(line.is_none(), "{secret} is in the log: {}", line.unwrap());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_never_reach_the_log() {
    if !servers_available() {
        return;
    }
    let mut redis = PrivateRedis::start_with(Persistence::AofAlways, Some(REDIS_PASSWORD)).await;
    // A PostgreSQL of its own with trust authentication, whatever the shared one asks.
    let postgres = tokio::task::block_in_place(PrivatePostgres::start);
    let env = TestEnv::on(&redis.url(), &postgres.url()).await;
    // Trust authentication ignores the password; the process still has to keep it quiet.
    let database_url = env.database_url.replacen(
        "postgres://postgres@",
        &format!("postgres://postgres:{PG_PASSWORD}@"),
        1,
    );
    assert_ne!(
        database_url, env.database_url,
        "no password in {database_url}"
    );

    let mut child = Command::new(env!("CARGO_BIN_EXE_boxoffice"))
        .arg("--listen=127.0.0.1:0")
        .arg(format!("--key-prefix={}", env.prefix))
        .arg("--log-format=json")
        .env("REDIS_URL", redis.url())
        .env("DATABASE_URL", &database_url)
        .env("ADMIN_TOKEN", ADMIN_TOKEN)
        .env("RUST_LOG", "debug")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let output = Output::default();
    output.collect(child.stdout.take().unwrap());
    output.collect(child.stderr.take().unwrap());
    let base = format!("http://127.0.0.1:{}", output.port().await);
    let client = reqwest::Client::new();
    let create = |token: &'static str| {
        client
            .post(format!("{base}/api/v1/events"))
            .bearer_auth(token)
            .json(&json!({ "name": "Logged", "totalSeats": 10 }))
            .send()
    };
    let purchase = || {
        client
            .post(format!("{base}/api/v1/purchase"))
            .header("Idempotency-Key", IDEMPOTENCY_KEY)
            .json(&json!({ "quantity": 1 }))
            .send()
    };

    assert_eq!(
        create(ADMIN_TOKEN).await.unwrap().status(),
        StatusCode::CREATED
    );
    assert_eq!(
        create(WRONG_TOKEN).await.unwrap().status(),
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(purchase().await.unwrap().status(), StatusCode::OK);
    redis.kill();
    assert_eq!(
        purchase().await.unwrap().status(),
        StatusCode::SERVICE_UNAVAILABLE
    );
    let ready = client
        .get(format!("{base}/health/ready"))
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status(), StatusCode::SERVICE_UNAVAILABLE);
    redis.restart().await;
    let back = Instant::now();
    while purchase().await.unwrap().status() != StatusCode::OK {
        assert!(back.elapsed() < Duration::from_secs(10));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    child.kill().await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;

    let text = output.text();
    // The outage was logged: the search ran over real error lines.
    assert!(text.contains("dependency unavailable"), "{text}");
    assert!(text.contains("request failed"), "{text}");
    assert_no_secrets(&text);
}

#[tokio::test]
async fn a_store_that_cannot_be_reached_is_named_without_its_password() {
    let unreachable = format!("redis://:{REDIS_PASSWORD}@127.0.0.1:1");
    let output = Command::new(env!("CARGO_BIN_EXE_boxoffice"))
        .arg("--listen=127.0.0.1:0")
        .env("REDIS_URL", &unreachable)
        .env(
            "DATABASE_URL",
            format!("postgres://postgres:{PG_PASSWORD}@127.0.0.1:1/boxoffice"),
        )
        .env("ADMIN_TOKEN", ADMIN_TOKEN)
        .output()
        .await
        .unwrap();
    assert!(!output.status.success());
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        text.contains("cannot reach PostgreSQL at postgres://postgres:***@127.0.0.1:1"),
        "{text}"
    );
    assert_no_secrets(&text);
}

/// Commands print their result alone on standard output; logs go to standard error,
/// so `EVENT=$(boxoffice event create …)` captures the id.
#[tokio::test]
async fn event_create_prints_only_the_id_on_standard_output() {
    let env = TestEnv::new().await;
    let output = Command::new(env!("CARGO_BIN_EXE_boxoffice"))
        .args(["event", "create", "--name", "printed", "--seats", "7"])
        .env("REDIS_URL", &env.redis_url)
        .env("DATABASE_URL", &env.database_url)
        .env("BOXOFFICE_KEY_PREFIX", &env.prefix)
        .env("BOXOFFICE_LOG_FORMAT", "json")
        .env("RUST_LOG", "info")
        .output()
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    let stdout = String::from_utf8(output.stdout).unwrap();
    let id: uuid::Uuid = stdout
        .trim_end()
        .parse()
        .unwrap_or_else(|e| panic!("stdout {stdout:?} is not one id ({e}); stderr: {stderr}"));
    assert_eq!(stdout, format!("{id}\n"));
    let seats: i32 = sqlx::query_scalar("SELECT total_seats FROM events WHERE id = $1")
        .bind(id)
        .fetch_one(&env.db)
        .await
        .unwrap();
    assert_eq!(seats, 7);
}
