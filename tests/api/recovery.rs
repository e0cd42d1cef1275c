//! The recovery matrix: every way Redis can lose state, crossed with every way the
//! service comes back from it. Each cell runs on a Redis of its own (it is flushed,
//! killed and restored) and ends the same way: every earlier key, retried, replays
//! its first answer (the same body, the same purchase id), new keys sell exactly the
//! seats left, every sale is one row, and nothing is oversold.
//!
//! | loss \ way back | request | noscript | watcher | reconcile | two replicas | cut half-way | two prefixes |
//! | --- | --- | --- | --- | --- | --- | --- | --- |
//! | keys deleted while stopped | ✓ | ✓ | ✓ (startup) | ✓ | ✓ | ✓ | ✓ |
//! | FLUSHALL while running | model ⁴ | ✓ | – ¹ | ✓ | model | ✓ | ✓ |
//! | restarted empty while running | model | = request ² | ✓ | ✓ | model | ✓ | ✓ |
//! | restarted empty while stopped | ✓ | = request | ✓ (startup) | ✓ | ✓ | ✓ | ✓ |
//! | older snapshot while running | model | = request | ✓ | ✓ | model | ✓ | ✓ |
//! | older snapshot while stopped | ✓ | = request | ✓ (startup) | ✓ | ✓ | ✓ | ✓ |
//! | records gone, then restart | ✓ | = request | ✓ | ✓ | ✓ | ✓ | ✓ |
//! | records gone while running | – ³ | – ³ | – ³ | ✓ | – ³ | ✓ | – ³ |
//!
//! Ways back: **request**, the first retry finds the event missing or unchecked (the
//! watcher is off); **noscript**, the same with the script cache emptied too;
//! **watcher**, the event is back on sale before any request (after a stop, by the
//! startup round); **reconcile**, `reconcile --fix` before any request; **two
//! replicas**, the first retries reach two replicas at once; **cut half-way**, a
//! `boxoffice reconcile --fix` process is SIGKILLed in the middle of restoring 20,000
//! records, then a request finishes the job; **two prefixes**, two deployments on
//! the one Redis lose state together and each comes back by a request.
//!
//! ¹ FLUSHALL leaves the server (its run id) as it was: nothing for a watcher to see;
//! the first request finds the event missing. ² A restarted server has an empty
//! script cache: the first request meets NOSCRIPT anyway. ³ Records deleted behind
//! the service's back (eviction, by hand) while the server runs leave nothing a
//! request or watcher could notice; `boxoffice reconcile` finds them (docs/operations.md, "Known
//! limits"). ⁴ The model-based fault test (`tests/api/model/`) draws these losses on
//! 1–3 replicas, each brought back by the next request, with every other operation
//! (holds, cancellations, the waiting room) around them.

use std::collections::HashSet;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use boxoffice::reconcile::{self, Status};
use boxoffice::records::{Entry, Record};
use redis::AsyncCommands;
use reqwest::StatusCode;
use serde_json::Value;
use tokio::task::block_in_place;
use uuid::Uuid;

use crate::harness::{Reply, TestApp, TestEnv, buy_until_answered, rush};
use crate::processes::{Persistence, PrivateRedis, on_private_servers};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Loss {
    KeysDeletedWhileStopped,
    FlushallWhileRunning,
    RestartedEmptyWhileRunning,
    RestartedEmptyWhileStopped,
    OlderSnapshotWhileRunning,
    OlderSnapshotWhileStopped,
    RecordsGoneThenRestart,
    RecordsGoneWhileRunning,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Back {
    Request,
    Noscript,
    Watcher,
    Reconcile,
    TwoReplicas,
    CutHalfWay,
    TwoPrefixes,
}

/// Seats each cell's event has besides the bulk of a cut-half-way cell.
const SEATS: i64 = 100;
/// Sales a cut-half-way cell seeds, so that its restore takes long enough to cut.
const BULK: usize = 20_000;

impl Loss {
    fn persistence(self) -> Persistence {
        match self {
            Loss::OlderSnapshotWhileRunning | Loss::OlderSnapshotWhileStopped => {
                Persistence::Snapshot
            }
            _ => Persistence::AofAlways,
        }
    }

    fn while_stopped(self) -> bool {
        matches!(
            self,
            Loss::KeysDeletedWhileStopped
                | Loss::RestartedEmptyWhileStopped
                | Loss::OlderSnapshotWhileStopped
        )
    }
}

/// One deployment (key prefix and database) on the cell's Redis, with its replicas
/// and the sales made before the loss.
struct Deployment {
    env: TestEnv,
    apps: Vec<TestApp>,
    replicas: usize,
    watch: bool,
    event: Uuid,
    capacity: i64,
    /// Key, quantity and first answer of every sale made over HTTP.
    earlier: Vec<(String, u8, Value)>,
    /// Sales seeded straight into PostgreSQL (and then into Redis).
    bulk: Vec<Entry>,
}

impl Deployment {
    async fn new(redis: &PrivateRedis, replicas: usize, watch: bool, bulk: usize) -> Self {
        let env = TestEnv::with_redis(&redis.url()).await;
        let mut deployment = Self {
            env,
            apps: Vec::new(),
            replicas,
            watch,
            event: Uuid::nil(),
            capacity: SEATS + bulk as i64,
            earlier: Vec::new(),
            bulk: Vec::new(),
        };
        deployment.start().await;
        deployment.event = deployment.apps[0]
            .create_event("matrix", deployment.capacity as u32)
            .await;
        deployment
    }

    async fn start(&mut self) {
        let watch_ms = if self.watch { 100 } else { 0 };
        for _ in 0..self.replicas {
            let app = self
                .env
                .spawn_app_with(|c| c.serve.redis_watch_ms = watch_ms)
                .await;
            self.apps.push(app);
        }
    }

    async fn stop(&mut self) {
        for app in self.apps.drain(..) {
            app.stop().await;
        }
    }

    fn sold(&self) -> i64 {
        let http: i64 = self.earlier.iter().map(|(_, q, _)| i64::from(*q)).sum();
        http + self.bulk.len() as i64
    }

    fn sales(&self) -> usize {
        self.earlier.len() + self.bulk.len()
    }

    /// `n` purchases of 1–3 seats over HTTP, all sold, all written to PostgreSQL.
    async fn sell(&mut self, tag: &str, n: usize) {
        let apps: Vec<&TestApp> = self.apps.iter().collect();
        let replies = rush(
            &apps,
            self.event,
            n,
            8,
            |i| (i % 3 + 1) as u8,
            |i| format!("{tag}-{i}"),
        )
        .await;
        for (key, quantity, reply) in replies {
            assert_eq!(reply.status, StatusCode::OK, "{key}: {:?}", reply.body);
            self.earlier.push((key, quantity, reply.body));
        }
        self.persisted().await;
    }

    async fn persisted(&self) {
        self.env
            .wait_for_rows(self.event, self.sales(), Duration::from_secs(30))
            .await;
    }

    /// `n` one-seat sales written straight to PostgreSQL, as if sold and persisted
    /// earlier, then taken into Redis by `reconcile --fix`: Redis holds them as it
    /// holds any sale (counted, with records) before the loss.
    async fn seed_bulk(&mut self, n: usize) {
        let now = micros_now();
        let sold = self.sold();
        let bulk: Vec<Entry> = (0..n)
            .map(|i| Entry {
                id: Uuid::now_v7(),
                idempotency_key: format!("bulk-{i}"),
                quantity: 1,
                seats_remaining: Some((self.capacity - sold - i as i64 - 1) as i32),
                sold_at_micros: now,
                buyer: None,
                via_hold: false,
                hold: None,
            })
            .collect();
        for chunk in bulk.chunks(5_000) {
            let chunk: Vec<_> = chunk.iter().map(|sale| (self.event, sale)).collect();
            boxoffice::db::insert_sales(&self.env.db, &chunk)
                .await
                .unwrap();
        }
        self.bulk = bulk;
        let (stores, gate) = self.env.gate().await;
        reconcile::run(&stores, gate.recovery(), true)
            .await
            .unwrap();
        assert_eq!(self.env.redis_sold(self.event).await, self.sold());
    }

    /// Deletes every key of this deployment, or only its idempotency records.
    async fn delete_keys(&self, only_records: bool) {
        let pattern = if only_records {
            format!("{}:{{{}}}:idem:*", self.env.prefix, self.event)
        } else {
            format!("{}:*", self.env.prefix)
        };
        let mut redis = self.env.redis_now().await;
        let keys: Vec<String> = redis.keys(pattern).await.unwrap();
        assert!(!keys.is_empty());
        for chunk in keys.chunks(10_000) {
            let _: () = redis.del(chunk).await.unwrap();
        }
    }

    /// The way back, then the books: see the module docs.
    async fn comes_back(&self, cell: &str) {
        let retried = self.retry_earlier().await;
        self.bulk_records_are_back().await;
        let left = self.capacity - self.sold();
        let apps: Vec<&TestApp> = self.apps.iter().collect();
        let fresh = rush(
            &apps,
            self.event,
            left as usize + 10,
            8,
            |_| 1,
            |i| format!("after-{i}"),
        )
        .await;
        let sold = fresh
            .iter()
            .filter(|(.., r)| r.status == StatusCode::OK)
            .count();
        let refused = fresh
            .iter()
            .filter(|(.., r)| r.code() == "SOLD_OUT")
            .count();
        assert_eq!((sold as i64, refused), (left, 10), "{cell}: new buyers");

        self.env
            .wait_for_rows(self.event, self.sales() + sold, Duration::from_secs(30))
            .await;
        let rows = self.env.rows(self.event).await;
        let keys: HashSet<&String> = rows.iter().map(|(_, key, _)| key).collect();
        assert_eq!(keys.len(), rows.len(), "{cell}: a key was sold twice");
        let seats: i64 = rows.iter().map(|(.., q)| i64::from(*q)).sum();
        assert_eq!(seats, self.capacity, "{cell}: seats in rows");
        assert_eq!(self.env.redis_sold(self.event).await, self.capacity);
        eprintln!(
            "{cell}: {} earlier sales ({} seats, {} seeded), {retried} retried → all replayed \
             with their purchase ids; {sold} sold after + {refused} SOLD_OUT; {} rows = sales; \
             Redis sold {} of {} (0 oversold)",
            self.sales(),
            self.sold(),
            self.bulk.len(),
            rows.len(),
            self.capacity,
            self.capacity
        );
    }

    /// Retries every key sold over HTTP, spread over the replicas, 8 at a time; each
    /// must replay its first answer.
    async fn retry_earlier(&self) -> usize {
        let permits = std::sync::Arc::new(tokio::sync::Semaphore::new(8));
        let mut retries = tokio::task::JoinSet::new();
        for (i, (key, quantity, first)) in self.earlier.iter().enumerate() {
            let app = &self.apps[i % self.apps.len()];
            let (client, url) = (app.client.clone(), self.purchase_url(app));
            let (key, quantity, first) = (key.clone(), *quantity, first.clone());
            let permits = permits.clone();
            retries.spawn(async move {
                let _permit = permits.acquire_owned().await.unwrap();
                let (reply, _) =
                    buy_until_answered(&client, &url, &key, quantity, Duration::from_secs(30))
                        .await;
                (key, first, reply)
            });
        }
        let replies = retries.join_all().await;
        for (key, first, reply) in &replies {
            let reply: &Reply = reply.as_ref().expect("an answer");
            assert_eq!(reply.status, StatusCode::OK, "{key}: {:?}", reply.body);
            assert!(reply.replayed, "{key} was sold again: {:?}", reply.body);
            assert_eq!(&reply.body, first, "{key}: not the first answer");
        }
        replies.len()
    }

    /// Every seeded sale's record is in Redis again, naming its purchase; a sample is
    /// retried over HTTP.
    async fn bulk_records_are_back(&self) {
        if self.bulk.is_empty() {
            return;
        }
        let keys: Vec<String> = self
            .bulk
            .iter()
            .map(|s| {
                format!(
                    "{}:{{{}}}:idem:{}",
                    self.env.prefix, self.event, s.idempotency_key
                )
            })
            .collect();
        let mut redis = self.env.redis_now().await;
        for (chunk, sales) in keys.chunks(5_000).zip(self.bulk.chunks(5_000)) {
            let records: Vec<Option<String>> = redis.mget(chunk).await.unwrap();
            for (record, sale) in records.iter().zip(sales) {
                let record = record.as_deref().and_then(Record::parse);
                assert!(
                    matches!(record, Some(Record::Sold { purchase_id, .. }) if purchase_id == sale.id),
                    "{}: record {record:?}",
                    sale.idempotency_key
                );
            }
        }
        let app = &self.apps[0];
        for sale in self.bulk.iter().step_by(1_000) {
            let reply = app
                .purchase_event(self.event, &sale.idempotency_key, 1)
                .await;
            assert!(reply.replayed, "{} sold again", sale.idempotency_key);
            assert_eq!(reply.body["purchaseId"], sale.id.to_string());
        }
    }

    fn purchase_url(&self, app: &TestApp) -> String {
        app.url(&format!("/api/v1/events/{}/purchase", self.event))
    }

    /// Whether the event is on sale on the server now running: its `run` is the
    /// server's run id and its first earlier key's record is there.
    async fn on_sale_again(&self) -> bool {
        let mut redis = self.env.redis_now().await;
        let info: String = redis::cmd("INFO")
            .arg("server")
            .query_async(&mut redis)
            .await
            .unwrap();
        let run_id = info
            .lines()
            .find_map(|l| l.strip_prefix("run_id:"))
            .unwrap()
            .trim()
            .to_owned();
        let inventory = format!("{}:{{{}}}:inv", self.env.prefix, self.event);
        let run: Option<String> = redis.hget(&inventory, "run").await.unwrap();
        let (key, ..) = &self.earlier[0];
        let record = format!("{}:{{{}}}:idem:{key}", self.env.prefix, self.event);
        let kept: bool = redis.exists(record).await.unwrap();
        run.as_deref() == Some(run_id.as_str()) && kept
    }
}

fn micros_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_micros() as i64
}

/// The cell's Redis, its deployments, and the snapshot an older-snapshot loss
/// restores.
struct Cell {
    name: String,
    loss: Loss,
    back: Back,
    /// Before `redis`: dropped (stopped) first.
    deployments: Vec<Deployment>,
    redis: PrivateRedis,
}

impl Cell {
    async fn new(loss: Loss, back: Back) -> Self {
        let redis = PrivateRedis::start(loss.persistence()).await;
        let replicas = if back == Back::TwoReplicas { 2 } else { 1 };
        let watch = back == Back::Watcher;
        let count = if back == Back::TwoPrefixes { 2 } else { 1 };
        let mut deployments = Vec::new();
        for _ in 0..count {
            let bulk = if back == Back::CutHalfWay { BULK } else { 0 };
            deployments.push(Deployment::new(&redis, replicas, watch, bulk).await);
        }
        Self {
            name: format!("{loss:?} × {back:?}"),
            loss,
            back,
            redis,
            deployments,
        }
    }

    /// Sales before the loss: some before the snapshot an older-snapshot loss goes
    /// back to, the rest (and a cut-half-way cell's bulk) after it.
    async fn sell(&mut self) {
        for deployment in &mut self.deployments {
            deployment.sell("before", 12).await;
        }
        if self.loss.persistence() == Persistence::Snapshot {
            let _: () = redis::cmd("SAVE")
                .query_async(&mut self.deployments[0].env.redis_now().await)
                .await
                .unwrap();
            std::fs::copy(self.dump(), self.snapshot()).unwrap();
        }
        for deployment in &mut self.deployments {
            deployment.sell("later", 12).await;
            if self.back == Back::CutHalfWay {
                deployment.seed_bulk(BULK).await;
            }
        }
    }

    fn dump(&self) -> std::path::PathBuf {
        self.redis.dir().join("dump.rdb")
    }

    fn snapshot(&self) -> std::path::PathBuf {
        self.redis.dir().join("older.rdb")
    }

    async fn lose(&mut self) {
        if self.loss.while_stopped() {
            for deployment in &mut self.deployments {
                deployment.stop().await;
            }
        }
        match self.loss {
            Loss::KeysDeletedWhileStopped => {
                for deployment in &self.deployments {
                    deployment.delete_keys(false).await;
                }
            }
            Loss::FlushallWhileRunning => {
                let _: () = redis::cmd("FLUSHALL")
                    .query_async(&mut self.deployments[0].env.redis_now().await)
                    .await
                    .unwrap();
            }
            Loss::RestartedEmptyWhileRunning | Loss::RestartedEmptyWhileStopped => {
                self.redis.kill();
                self.redis.wipe();
                self.redis.restart().await;
            }
            Loss::OlderSnapshotWhileRunning | Loss::OlderSnapshotWhileStopped => {
                self.redis.kill();
                std::fs::copy(self.snapshot(), self.dump()).unwrap();
                self.redis.restart().await;
            }
            Loss::RecordsGoneThenRestart | Loss::RecordsGoneWhileRunning => {
                for deployment in &self.deployments {
                    deployment.delete_keys(true).await;
                }
                if self.loss == Loss::RecordsGoneThenRestart {
                    self.redis.kill();
                    self.redis.restart().await;
                }
            }
        }
        if self.loss.while_stopped() {
            for deployment in &mut self.deployments {
                deployment.start().await;
            }
        }
    }

    /// What happens between the loss and the retries.
    async fn way_back(&mut self) {
        match self.back {
            Back::Request | Back::TwoReplicas | Back::TwoPrefixes => {}
            Back::Noscript => {
                let _: () = redis::cmd("SCRIPT")
                    .arg("FLUSH")
                    .query_async(&mut self.deployments[0].env.redis_now().await)
                    .await
                    .unwrap();
            }
            Back::Watcher => {
                let deployment = &self.deployments[0];
                let deadline = Instant::now() + Duration::from_secs(20);
                while !deployment.on_sale_again().await {
                    assert!(
                        Instant::now() < deadline,
                        "{}: the watcher never recovered",
                        self.name
                    );
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
            Back::Reconcile => {
                let deployment = &self.deployments[0];
                let (stores, gate) = deployment.env.gate().await;
                let before = reconcile::run(&stores, gate.recovery(), false)
                    .await
                    .unwrap();
                let after = reconcile::run(&stores, gate.recovery(), true)
                    .await
                    .unwrap();
                let status = |rows: &[reconcile::Row]| {
                    rows.iter()
                        .find(|r| r.event == deployment.event)
                        .map(reconcile::Row::status)
                };
                eprintln!("{}: reconcile saw {:?}", self.name, status(&before));
                assert_eq!(status(&after), Some(Status::Ok), "{}", self.name);
            }
            Back::CutHalfWay => self.cut_a_recovery_half_way().await,
        }
    }

    /// Runs `boxoffice reconcile --fix` and SIGKILLs it while it restores records;
    /// tries again (after the same loss) if it finished first.
    async fn cut_a_recovery_half_way(&mut self) {
        for attempt in 1..=5 {
            let deployment = &self.deployments[0];
            let mut redis = deployment.env.redis_now().await;
            let before: usize = redis::cmd("DBSIZE").query_async(&mut redis).await.unwrap();
            let mut process = Command::new(env!("CARGO_BIN_EXE_boxoffice"))
                .arg("reconcile")
                .arg("--fix")
                .env("REDIS_URL", &deployment.env.redis_url)
                .env("DATABASE_URL", &deployment.env.database_url)
                .env("BOXOFFICE_KEY_PREFIX", &deployment.env.prefix)
                .env("RUST_LOG", "error")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .spawn()
                .expect("boxoffice reconcile runs");
            let started = Instant::now();
            loop {
                let now: usize = redis::cmd("DBSIZE").query_async(&mut redis).await.unwrap();
                if now > before + 500 && now < before + BULK {
                    break;
                }
                let finished = block_in_place(|| process.try_wait()).unwrap().is_some();
                if finished || started.elapsed() > Duration::from_secs(60) {
                    break;
                }
            }
            let _ = process.kill();
            let _ = process.wait();
            let restored: usize = redis::cmd("DBSIZE").query_async(&mut redis).await.unwrap();
            let inventory = format!("{}:{{{}}}:inv", deployment.env.prefix, deployment.event);
            let run: Option<String> = redis.hget(&inventory, "run").await.unwrap();
            if run.is_none() && restored < before + BULK {
                eprintln!(
                    "{}: reconcile --fix killed with {} of {} records restored (attempt {attempt}); \
                     the event stayed off sale",
                    self.name,
                    restored - before,
                    deployment.sales()
                );
                return;
            }
            self.lose().await;
        }
        panic!("{}: never caught a recovery half-way", self.name);
    }
}

async fn cell(loss: Loss, back: Back) {
    on_private_servers(async {
        let mut cell = Cell::new(loss, back).await;
        cell.sell().await;
        cell.lose().await;
        cell.way_back().await;
        for deployment in &cell.deployments {
            deployment.comes_back(&cell.name).await;
        }
    })
    .await;
}

macro_rules! row {
    ($row:ident = $loss:ident: $($cell:ident = $back:ident),* $(,)?) => {
        mod $row {
            use super::{Back, Loss, cell};
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $cell() {
                    cell(Loss::$loss, Back::$back).await;
                }
            )*
        }
    };
}

row!(keys_deleted_while_stopped = KeysDeletedWhileStopped:
    request = Request, noscript = Noscript, watcher = Watcher, reconcile = Reconcile,
    two_replicas = TwoReplicas, cut_half_way = CutHalfWay, two_prefixes = TwoPrefixes);
row!(flushall_while_running = FlushallWhileRunning:
    noscript = Noscript, reconcile = Reconcile, cut_half_way = CutHalfWay,
    two_prefixes = TwoPrefixes);
row!(restarted_empty_while_running = RestartedEmptyWhileRunning:
    watcher = Watcher, reconcile = Reconcile, cut_half_way = CutHalfWay,
    two_prefixes = TwoPrefixes);
row!(restarted_empty_while_stopped = RestartedEmptyWhileStopped:
    request = Request, watcher = Watcher, reconcile = Reconcile,
    two_replicas = TwoReplicas, cut_half_way = CutHalfWay, two_prefixes = TwoPrefixes);
row!(older_snapshot_while_running = OlderSnapshotWhileRunning:
    watcher = Watcher, reconcile = Reconcile, cut_half_way = CutHalfWay,
    two_prefixes = TwoPrefixes);
row!(older_snapshot_while_stopped = OlderSnapshotWhileStopped:
    request = Request, watcher = Watcher, reconcile = Reconcile,
    two_replicas = TwoReplicas, cut_half_way = CutHalfWay, two_prefixes = TwoPrefixes);
row!(records_gone_then_restart = RecordsGoneThenRestart:
    request = Request, watcher = Watcher, reconcile = Reconcile,
    two_replicas = TwoReplicas, cut_half_way = CutHalfWay, two_prefixes = TwoPrefixes);
row!(records_gone_while_running = RecordsGoneWhileRunning:
    reconcile = Reconcile, cut_half_way = CutHalfWay);
