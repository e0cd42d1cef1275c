//! Fault injection: servers killed, stopped, restarted and restored while buyers keep
//! buying. Each test brings the server it breaks (see `processes`), drives real HTTP
//! load, and ends by balancing the books: every confirmed sale is one row, no row
//! without a sale, no key sold twice, no more seats than the event has.
//!
//! Buyers behave like the clients the API documents: on a 503 or a lost connection
//! they retry with the same `Idempotency-Key` until they get an answer.

use std::collections::{HashMap, HashSet};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use redis::AsyncCommands;
use reqwest::StatusCode;
use serde_json::{Value, json};
use tokio::task::block_in_place;
use uuid::Uuid;

use crate::harness::{TestApp, TestEnv, buy_until_answered, rush};
use crate::processes::{Persistence, PrivatePostgres, PrivateRedis, bounded, on_private_servers};

/// How long a buyer keeps retrying one key after the load has ended.
const RETRY_FOR: Duration = Duration::from_secs(60);

/// What one buyer, with one key, finally got.
struct Bought {
    key: String,
    quantity: u8,
    /// `None` if every attempt failed until the buyer gave up.
    status: Option<StatusCode>,
    body: Value,
    attempts: u32,
    answered: Instant,
}

/// Buyers that keep buying from `app`'s `event` for `run_for`, `workers` at a time,
/// each pausing `pause` between purchases.
struct Crowd {
    workers: usize,
    run_for: Duration,
    pause: Duration,
    quantity: fn(usize) -> u8,
}

impl Crowd {
    fn new(workers: usize, run_for: Duration) -> Self {
        Self {
            workers,
            run_for,
            pause: Duration::from_millis(2),
            quantity: |_| 1,
        }
    }

    fn spawn(self, app: &TestApp, event: Uuid, tag: &str) -> tokio::task::JoinHandle<Vec<Bought>> {
        let url = app.url(&format!("/api/v1/events/{event}/purchase"));
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()
            .unwrap();
        let tag = tag.to_owned();
        tokio::spawn(async move {
            let started = Instant::now();
            let mut workers = tokio::task::JoinSet::new();
            for worker in 0..self.workers {
                let (client, url, tag) = (client.clone(), url.clone(), tag.clone());
                workers.spawn(async move {
                    let mut bought = Vec::new();
                    while started.elapsed() < self.run_for {
                        let n = bought.len();
                        let key = format!("{tag}-{worker}-{n}");
                        let quantity = (self.quantity)(n + worker);
                        bought.push(buy(&client, &url, key, quantity).await);
                        tokio::time::sleep(self.pause).await;
                    }
                    bought
                });
            }
            workers.join_all().await.into_iter().flatten().collect()
        })
    }
}

/// One purchase, retried with the same key until it gets a final answer.
async fn buy(client: &reqwest::Client, url: &str, key: String, quantity: u8) -> Bought {
    let (reply, attempts) = buy_until_answered(client, url, &key, quantity, RETRY_FOR).await;
    Bought {
        key,
        quantity,
        status: reply.as_ref().map(|r| r.status),
        body: reply.map_or(Value::Null, |r| r.body),
        attempts,
        answered: Instant::now(),
    }
}

/// Totals of a fault run, printed for the record.
#[derive(Debug)]
#[allow(dead_code)] // read through Debug, in the line each test prints
struct Books {
    sales: usize,
    seats: i64,
    rows: usize,
    refused: usize,
    retried: usize,
}

/// Waits for the consumer, then checks that PostgreSQL and Redis agree with exactly
/// what the buyers were told.
async fn balance(env: &TestEnv, event: Uuid, bought: &[Bought], capacity: i64) -> Books {
    let unanswered: Vec<&str> = bought
        .iter()
        .filter(|b| b.status.is_none())
        .map(|b| b.key.as_str())
        .collect();
    assert!(
        unanswered.is_empty(),
        "buyers never answered: {unanswered:?}"
    );
    let odd: Vec<(&str, StatusCode, &Value)> = bought
        .iter()
        .filter_map(|b| Some((b.key.as_str(), b.status?, &b.body)))
        .filter(|(_, s, _)| *s != StatusCode::OK && *s != StatusCode::CONFLICT)
        .collect();
    assert!(odd.is_empty(), "answers other than 200/409: {odd:?}");

    let sales: Vec<&Bought> = bought
        .iter()
        .filter(|b| b.status == Some(StatusCode::OK))
        .collect();
    let seats: i64 = sales.iter().map(|b| i64::from(b.quantity)).sum();
    assert!(seats <= capacity, "oversold: {seats} seats of {capacity}");

    env.wait_for_rows(event, sales.len(), Duration::from_secs(90))
        .await;
    let rows: HashMap<Uuid, (String, i16)> = env
        .rows(event)
        .await
        .into_iter()
        .map(|(id, key, quantity)| (id, (key, quantity)))
        .collect();
    let keys: HashSet<&String> = rows.values().map(|(key, _)| key).collect();
    assert_eq!(keys.len(), rows.len(), "a key was sold twice");
    for sale in &sales {
        let id: Uuid = sale.body["purchaseId"].as_str().unwrap().parse().unwrap();
        assert_eq!(
            rows.get(&id),
            Some(&(sale.key.clone(), i16::from(sale.quantity))),
            "confirmed sale {id} ({}) is not its row",
            sale.key
        );
    }
    assert_eq!(env.redis_sold(event).await, seats, "Redis' sold counter");
    Books {
        sales: sales.len(),
        seats,
        rows: rows.len(),
        refused: bought.len() - sales.len(),
        retried: bought.iter().filter(|b| b.attempts > 1).count(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sales_made_while_postgres_is_down_are_written_when_it_returns() {
    on_private_servers(async {
        let postgres = block_in_place(PrivatePostgres::start);
        let redis = PrivateRedis::start(Persistence::AofAlways).await;
        let env = TestEnv::on(&redis.url(), &postgres.url()).await;
        let app = env
            .spawn_app_with(|c| c.serve.default_event_seats = 1_000_000)
            .await;
        let event = app.default_event;

        let crowd = Crowd {
            pause: Duration::from_millis(5),
            ..Crowd::new(4, Duration::from_secs(26))
        }
        .spawn(&app, event, "pg-down");
        tokio::time::sleep(Duration::from_secs(3)).await;
        block_in_place(|| postgres.stop());
        let down = Instant::now();
        tokio::time::sleep(Duration::from_secs(20)).await;
        // The backlog waits in the stream. A sale answered before the length is read
        // has its entry in the stream already (the script appends it before it
        // answers); one answered while PostgreSQL is coming back may not be counted.
        let counted = Instant::now();
        let waiting: usize = env.redis.clone().xlen(env.stream_key(event)).await.unwrap();
        // The replica stays in rotation (a Kubernetes probe would keep it), and says
        // why it is degraded.
        let ready = app.get("/health/ready").await;
        assert_eq!(ready.status, StatusCode::OK, "{}", ready.body);
        assert_eq!(
            (&ready.body["status"], &ready.body["postgres"]),
            (&"degraded".into(), &false.into())
        );
        block_in_place(|| postgres.resume());
        let up = Instant::now();
        let bought = crowd.await.unwrap();

        let during = bought
            .iter()
            .filter(|b| {
                b.status == Some(StatusCode::OK) && b.answered > down && b.answered < counted
            })
            .count();
        assert!(during > 100, "only {during} sales while PostgreSQL was down");
        assert!(waiting >= during, "stream held {waiting} entries, {during} sold meanwhile");
        let books = balance(&env, event, &bought, 1_000_000).await;
        eprintln!(
            "postgres down {:?}: {during} sales during the outage, stream held {waiting}; {books:?}",
            up - down
        );
    })
    .await;
}

/// A `boxoffice worker` process of `env`: a stream consumer that can be SIGKILLed,
/// with its metrics and probes on `port`.
pub struct Worker {
    child: Child,
    pub port: u16,
}

impl Worker {
    pub fn start(env: &TestEnv, name: &str, claim_idle_ms: u64) -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let child = Command::new(env!("CARGO_BIN_EXE_boxoffice"))
            .arg("worker")
            .arg(format!("--listen=127.0.0.1:{port}"))
            .arg(format!("--redis-url={}", env.redis_url))
            .arg(format!("--database-url={}", env.database_url))
            .arg(format!("--key-prefix={}", env.prefix))
            .arg(format!("--instance-id={name}"))
            .arg(format!("--claim-idle-ms={claim_idle_ms}"))
            .arg("--consumer-block-ms=200")
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .expect("boxoffice worker starts");
        Self { child, port }
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Entries `consumer` has read and not acknowledged (none before the stream exists).
async fn pending(env: &TestEnv, event: Uuid, consumer: &str) -> usize {
    let reply: redis::RedisResult<redis::streams::StreamPendingCountReply> = env
        .redis
        .clone()
        .xpending_consumer_count(
            env.stream_key(event),
            "persist",
            "-",
            "+",
            100_000,
            consumer,
        )
        .await;
    match reply {
        Ok(reply) => reply.ids.len(),
        Err(e) if e.code() == Some("NOGROUP") => 0,
        Err(e) => panic!("XPENDING: {e}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_killed_mid_batch_leaves_its_sales_to_another() {
    bounded(async {
        let env = TestEnv::new().await;
        let app = env
            .spawn_app_with(|c| {
                c.serve.consumer = false;
                c.serve.default_event_seats = 1_000_000;
            })
            .await;
        let event = app.default_event;
        let crowd = Crowd::new(4, Duration::from_secs(5)).spawn(&app, event, "sigkill");

        // Kill a worker while it holds entries it has read but not acknowledged. It
        // may acknowledge between the check and the kill; then the next one is tried.
        let mut doomed = Vec::new();
        let orphaned = loop {
            assert!(doomed.len() < 20, "never caught a worker mid-batch");
            let name = format!("doomed-{}", doomed.len());
            let mut worker = Worker::start(&env, &name, 30_000);
            let deadline = Instant::now() + Duration::from_secs(20);
            while pending(&env, event, &name).await == 0 {
                assert!(Instant::now() < deadline, "{name} never took a batch");
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            worker.kill();
            let orphaned = pending(&env, event, &name).await;
            doomed.push(name);
            if orphaned > 0 {
                break orphaned;
            }
        };

        let bought = crowd.await.unwrap();
        let _heir = Worker::start(&env, "heir", 500);
        let books = balance(&env, event, &bought, 1_000_000).await;
        for name in &doomed {
            assert_eq!(
                pending(&env, event, name).await,
                0,
                "{name} left entries behind"
            );
        }
        eprintln!(
            "consumer SIGKILLed holding {orphaned} unacknowledged sales (attempt {}); {books:?}",
            doomed.len()
        );
    })
    .await;
}

/// `POST /api/v1/purchase` as raw as a client sees it: status, `Retry-After`, time.
async fn timed_purchase(
    client: reqwest::Client,
    url: String,
    key: String,
) -> (StatusCode, Option<String>, Duration) {
    let started = Instant::now();
    let response = client
        .post(url)
        .header("Idempotency-Key", key)
        .json(&json!({ "quantity": 1 }))
        .send()
        .await
        .expect("an answer, not a dropped connection");
    let retry_after = response
        .headers()
        .get("retry-after")
        .map(|v| v.to_str().unwrap().to_owned());
    (response.status(), retry_after, started.elapsed())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn purchases_fail_fast_while_redis_is_down_and_resume_when_it_returns() {
    on_private_servers(async {
        let mut redis = PrivateRedis::start(Persistence::AofAlways).await;
        let env = TestEnv::with_redis(&redis.url()).await;
        let app = env.spawn_app().await;
        let event = app.default_event;
        for i in 0..20 {
            assert_eq!(
                app.purchase(&format!("before-{i}"), 1).await.status,
                StatusCode::OK
            );
        }

        redis.kill();
        let url = app.url("/api/v1/purchase");
        let mut requests = tokio::task::JoinSet::new();
        for i in 0..50 {
            requests.spawn(timed_purchase(
                app.client.clone(),
                url.clone(),
                format!("during-{i}"),
            ));
        }
        let outage = requests.join_all().await;
        let slowest = outage.iter().map(|(_, _, took)| *took).max().unwrap();
        for (status, retry_after, _) in &outage {
            assert_eq!(*status, StatusCode::SERVICE_UNAVAILABLE);
            assert_eq!(retry_after.as_deref(), Some("1"));
        }
        // Well within the 2 s Redis timeout: a refused connection is not waited out.
        assert!(
            slowest < Duration::from_secs(1),
            "slowest 503 took {slowest:?}"
        );
        let ready = app
            .client
            .get(app.url("/health/ready"))
            .send()
            .await
            .unwrap();
        assert_eq!(ready.status(), StatusCode::SERVICE_UNAVAILABLE);

        redis.restart().await;
        let back = Instant::now();
        loop {
            let (status, ..) =
                timed_purchase(app.client.clone(), url.clone(), "first-after".into()).await;
            if status == StatusCode::OK {
                break;
            }
            assert!(back.elapsed() < Duration::from_secs(10), "still {status}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let resumed = back.elapsed();
        let ready = app
            .client
            .get(app.url("/health/ready"))
            .send()
            .await
            .unwrap();
        assert_eq!(ready.status(), StatusCode::OK);

        // A 503 sold nothing: the same keys now buy, once each.
        let mut bought = Vec::new();
        let url = app.url(&format!("/api/v1/events/{event}/purchase"));
        for key in (0..20)
            .map(|i| format!("before-{i}"))
            .chain((0..50).map(|i| format!("during-{i}")))
            .chain(["first-after".to_owned()])
        {
            bought.push(buy(&app.client, &url, key, 1).await);
        }
        let replayed = bought.iter().filter(|b| b.body["success"] == true).count();
        assert_eq!(replayed, 71);
        let books = balance(&env, event, &bought, 5000).await;
        assert_eq!(books.sales, 71);
        eprintln!(
            "redis down: 50 purchases → 503 + Retry-After, slowest {slowest:?}; \
             resumed {resumed:?} after restart; {books:?}"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_crash_with_appendfsync_always_loses_no_confirmed_sale() {
    on_private_servers(async {
        let mut redis = PrivateRedis::start(Persistence::AofAlways).await;
        let env = TestEnv::with_redis(&redis.url()).await;
        let capacity = 4000;
        let app = env
            .spawn_app_with(|c| c.serve.default_event_seats = capacity)
            .await;
        let event = app.default_event;
        let crowd = Crowd {
            quantity: |n| (n % 3 + 1) as u8,
            ..Crowd::new(6, Duration::from_secs(6))
        }
        .spawn(&app, event, "aof");
        tokio::time::sleep(Duration::from_secs(1)).await;
        let sold_before: i64 = env.redis_sold(event).await;
        assert!(
            sold_before < i64::from(capacity),
            "sold out before the crash"
        );
        redis.kill();
        tokio::time::sleep(Duration::from_secs(1)).await;
        redis.restart().await;
        // Everything confirmed before the crash is still counted.
        assert!(env.redis_sold(event).await >= sold_before);
        let bought = crowd.await.unwrap();

        let books = balance(&env, event, &bought, i64::from(capacity)).await;
        assert!(books.retried > 0, "the crash never reached a buyer");
        eprintln!("redis SIGKILLed with {sold_before} seats sold, AOF always; {books:?}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_restored_from_an_older_snapshot_sells_no_seat_twice() {
    on_private_servers(async {
        let mut redis = PrivateRedis::start(Persistence::Snapshot).await;
        let env = TestEnv::with_redis(&redis.url()).await;
        let app = env
            .spawn_app_with(|c| c.serve.default_event_seats = 1000)
            .await;
        let event = app.default_event;
        let apps = [&app];
        let sell = |tag: &'static str, buyers| {
            rush(
                &apps,
                event,
                buyers,
                16,
                |_| 1,
                move |i| format!("{tag}-{i}"),
            )
        };

        let early = sell("early", 300).await;
        assert!(early.iter().all(|(.., r)| r.status == StatusCode::OK));
        env.wait_for_rows(event, 300, Duration::from_secs(30)).await;
        let _: () = redis::cmd("SAVE")
            .query_async(&mut env.redis.clone())
            .await
            .unwrap();
        let snapshot = redis.dir().join("older.rdb");
        std::fs::copy(redis.dir().join("dump.rdb"), &snapshot).unwrap();

        // Sold and written to PostgreSQL after the snapshot: the restore forgets them.
        let late = sell("late", 300).await;
        assert!(late.iter().all(|(.., r)| r.status == StatusCode::OK));
        env.wait_for_rows(event, 600, Duration::from_secs(30)).await;

        redis.kill();
        std::fs::copy(&snapshot, redis.dir().join("dump.rdb")).unwrap();
        redis.restart().await;

        // Retries of forgotten sales get them replayed, not sold again. (The first
        // attempt may meet the connection the restart broke: a 503, and `buy` retries.)
        let url = app.url(&format!("/api/v1/events/{event}/purchase"));
        for (key, _, first) in late.iter().step_by(10) {
            let again = buy(&app.client, &url, key.clone(), 1).await;
            assert_eq!(
                again.status,
                Some(StatusCode::OK),
                "{key}: {:?}",
                again.body
            );
            assert_eq!(
                again.body["purchaseId"], first.body["purchaseId"],
                "{key} sold again"
            );
        }
        // Exactly the 400 seats left are sold, not the 700 the snapshot thinks.
        let last = sell("last", 1000).await;
        let sold = last
            .iter()
            .filter(|(.., r)| r.status == StatusCode::OK)
            .count();
        let refused = last.iter().filter(|(.., r)| r.code() == "SOLD_OUT").count();
        assert_eq!((sold, refused), (400, 600));

        env.wait_for_rows(event, 1000, Duration::from_secs(30))
            .await;
        let rows = env.rows(event).await;
        let keys: HashSet<&String> = rows.iter().map(|(_, key, _)| key).collect();
        assert_eq!(keys.len(), 1000, "a key was sold twice");
        assert_eq!(env.redis_sold(event).await, 1000);
        eprintln!(
            "redis restored to a snapshot of 300 sold with 600 in PostgreSQL: \
             {sold} sold after, {refused} SOLD_OUT, 1000 rows, 1000 keys"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_restarted_while_postgres_is_down_sells_nothing_until_it_returns() {
    on_private_servers(async {
        let postgres = block_in_place(PrivatePostgres::start);
        let mut redis = PrivateRedis::start(Persistence::AofAlways).await;
        let env = TestEnv::on(&redis.url(), &postgres.url()).await;
        let app = env
            .spawn_app_with(|c| c.serve.default_event_seats = 100)
            .await;
        let event = app.default_event;
        let url = app.url(&format!("/api/v1/events/{event}/purchase"));
        let mut bought = Vec::new();
        for i in 0..10 {
            bought.push(buy(&app.client, &url, format!("before-{i}"), 1).await);
        }
        env.wait_for_rows(event, 10, Duration::from_secs(10)).await;

        block_in_place(|| postgres.stop());
        redis.kill();
        redis.restart().await;
        // Redis cannot be checked against PostgreSQL: no new sale. A record the
        // restarted Redis kept (AOF) is still that key's answer, and is replayed.
        let mut requests = tokio::task::JoinSet::new();
        for key in ["during-0", "during-1", "during-2"] {
            requests.spawn(timed_purchase(
                app.client.clone(),
                app.url("/api/v1/purchase"),
                key.into(),
            ));
        }
        // (Its first attempt may meet the connection the restart broke: a 503.)
        let kept = buy(&app.client, &url, "before-1".into(), 1).await;
        assert_eq!(kept.status, Some(StatusCode::OK), "{:?}", kept.body);
        assert_eq!(kept.body["purchaseId"], bought[1].body["purchaseId"]);
        let mut slowest = Duration::ZERO;
        for (status, retry_after, took) in requests.join_all().await {
            assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
            assert_eq!(retry_after.as_deref(), Some("1"));
            // PostgreSQL's 3 s acquire timeout, once: requests that queued behind a
            // failed recovery fail with it.
            assert!(took < Duration::from_secs(5), "took {took:?}");
            slowest = slowest.max(took);
        }

        block_in_place(|| postgres.resume());
        let replay = buy(&app.client, &url, "before-0".into(), 1).await;
        assert_eq!(replay.body["purchaseId"], bought[0].body["purchaseId"]);
        for i in 0..3 {
            bought.push(buy(&app.client, &url, format!("during-{i}"), 1).await);
        }
        let books = balance(&env, event, &bought, 100).await;
        assert_eq!(books.sales, 13);
        eprintln!(
            "redis restarted while postgres down: 3 new purchases → 503, slowest {slowest:?}, \
             a kept record replayed at once; after it returned the replay matched and 3 sold; \
             {books:?}"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refusal_an_older_snapshot_brings_back_does_not_outrank_the_sale_its_key_made() {
    on_private_servers(async {
        let mut redis = PrivateRedis::start(Persistence::Snapshot).await;
        let env = TestEnv::with_redis(&redis.url()).await;
        let app = env.spawn_app_with(|c| c.serve.redis_watch_ms = 0).await;
        let event = app.create_event("refused-then-sold", 2).await;
        let first = app.purchase_event(event, "first", 2).await;
        assert_eq!(first.status, StatusCode::OK);
        assert_eq!(
            app.purchase_event(event, "late", 1).await.code(),
            "SOLD_OUT"
        );
        env.wait_for_rows(event, 1, Duration::from_secs(10)).await;
        // A snapshot holds the refusal of `late`.
        let _: () = redis::cmd("SAVE")
            .query_async(&mut env.redis_now().await)
            .await
            .unwrap();
        let snapshot = redis.dir().join("older.rdb");
        std::fs::copy(redis.dir().join("dump.rdb"), &snapshot).unwrap();
        // Seats come back, Redis forgets the refusal, and a retry of `late` buys.
        let id = first.body["purchaseId"].as_str().unwrap();
        assert_eq!(app.cancel(event, id).await.status, StatusCode::OK);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let (cancelled,): (bool,) =
                sqlx::query_as("SELECT cancelled_at IS NOT NULL FROM purchases WHERE id = $1")
                    .bind(id.parse::<Uuid>().unwrap())
                    .fetch_one(&env.db)
                    .await
                    .unwrap();
            if cancelled {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the cancellation was never written"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let _: () = redis::cmd("FLUSHALL")
            .query_async(&mut env.redis_now().await)
            .await
            .unwrap();
        let sold = app.purchase_event(event, "late", 1).await;
        assert_eq!(sold.status, StatusCode::OK, "{:?}", sold.body);
        env.wait_for_rows(event, 2, Duration::from_secs(10)).await;

        // Redis comes back from the snapshot, refusal and all: the sale replays.
        redis.kill();
        std::fs::copy(&snapshot, redis.dir().join("dump.rdb")).unwrap();
        redis.restart().await;
        let url = app.url(&format!("/api/v1/events/{event}/purchase"));
        let (again, _) =
            buy_until_answered(&app.client, &url, "late", 1, Duration::from_secs(20)).await;
        let again = again.expect("an answer");
        assert_eq!(again.status, StatusCode::OK, "{:?}", again.body);
        assert_eq!(again.body, sold.body);
        assert!(again.replayed);
    })
    .await;
}
