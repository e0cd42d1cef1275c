//! The world a model run acts on: a Redis and a PostgreSQL of its own (so it can
//! kill, restore and stop them), and 1–3 `boxoffice serve` processes (so it can
//! SIGKILL them), and the faults it injects into them.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use redis::AsyncCommands;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::harness::{ADMIN_TOKEN, BUYER_JWT_KEY, TestEnv};
use crate::processes::{Persistence, PrivatePostgres, PrivateRedis, free_port, scratch_dir};

/// The key replicas sign admission tokens with.
const ADMISSION_KEY: &str = "model-admission-key-of-at-least-32-bytes";

/// Milliseconds a consumer's entries stay pending before another takes them over: a
/// replica killed mid-batch leaves its entries to the others this soon.
const CLAIM_IDLE_MS: &str = "1000";

/// How long a drain may take before it counts as entries stuck in a stream.
const DRAIN_LIMIT: Duration = Duration::from_secs(30);

/// One `boxoffice serve` process.
pub struct Replica {
    pub address: String,
    child: Child,
}

impl Replica {
    fn start(env: &TestEnv, name: &str, logs: &std::path::Path) -> Self {
        let port = free_port();
        let log = std::fs::File::create(logs.join(format!("{name}.log"))).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_boxoffice"))
            .arg("serve")
            .env("BOXOFFICE_LISTEN", format!("127.0.0.1:{port}"))
            .env("REDIS_URL", &env.redis_url)
            .env("DATABASE_URL", &env.database_url)
            .env("BOXOFFICE_KEY_PREFIX", &env.prefix)
            .env("ADMIN_TOKEN", ADMIN_TOKEN)
            .env("BOXOFFICE_BUYER_JWT_KEY", BUYER_JWT_KEY)
            .env("BOXOFFICE_ADMISSION_KEY", ADMISSION_KEY)
            .env("BOXOFFICE_INSTANCE_ID", name)
            .env("BOXOFFICE_CONSUMER_BLOCK_MS", "100")
            .env("BOXOFFICE_CLAIM_IDLE_MS", CLAIM_IDLE_MS)
            .env("BOXOFFICE_REDIS_WATCH_MS", "200")
            .env("BOXOFFICE_HOLD_SWEEP_MS", "100")
            .env(
                "BOXOFFICE_ENDED_HOLD_TTL",
                (super::reference::ENDED_HOLD_TTL_MS / 1000).to_string(),
            )
            .env("BOXOFFICE_DB_POOL_SIZE", "4")
            .env("BOXOFFICE_REDIS_TIMEOUT_MS", "1000")
            .env("BOXOFFICE_LOG_FORMAT", "json")
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("boxoffice serve starts");
        Self {
            address: format!("http://127.0.0.1:{port}"),
            child,
        }
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Ways Redis or a process fails, each drawn by the generator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Fault {
    /// FLUSHALL: every key gone, the server (and its run id) the same.
    Flushall,
    /// Redis killed and started with nothing on disk.
    RestartedEmpty,
    /// Redis killed and started from a snapshot taken at an earlier step.
    OlderSnapshot,
    /// Every key of one event deleted.
    EventKeysDeleted,
    /// A replica SIGKILLed (sometimes with a request in flight) and started anew.
    ReplicaKilled,
    /// PostgreSQL stopped for a few steps.
    PostgresDown,
    /// PostgreSQL refuses every new sale row for a few steps (a constraint an
    /// operator added, say): the sales are parked, then sent back by `reconcile
    /// --fix` once it takes them again.
    PostgresRefuses,
    /// A second consumer that takes over every pending entry at once (XAUTOCLAIM
    /// with no idle time) runs for a few steps: the replicas' consumers and it race
    /// over the same entries, for writes and for parking.
    ConsumerOvertaken,
}

impl Fault {
    pub const ALL: [Fault; 8] = [
        Fault::Flushall,
        Fault::RestartedEmpty,
        Fault::OlderSnapshot,
        Fault::EventKeysDeleted,
        Fault::ReplicaKilled,
        Fault::PostgresDown,
        Fault::PostgresRefuses,
        Fault::ConsumerOvertaken,
    ];

    /// Whether it loses Redis data (the run drains the streams first: what was
    /// persisted must come back; see `model`).
    pub fn loses_redis_data(self) -> bool {
        matches!(
            self,
            Fault::Flushall
                | Fault::RestartedEmpty
                | Fault::OlderSnapshot
                | Fault::EventKeysDeleted
        )
    }
}

// Dropped in this order: the replicas, then the environment (its database and keys),
// then the servers.
pub struct World {
    replicas: Vec<Replica>,
    pub env: TestEnv,
    redis: PrivateRedis,
    postgres: PrivatePostgres,
    logs: PathBuf,
    snapshots: Vec<PathBuf>,
    started: usize,
    pub postgres_down: bool,
    pub client: reqwest::Client,
}

impl World {
    pub async fn start(replicas: usize) -> Self {
        let redis = PrivateRedis::start(Persistence::Snapshot).await;
        let postgres = PrivatePostgres::start();
        let env = TestEnv::on(&redis.url(), &postgres.url()).await;
        let logs = scratch_dir("model-logs");
        std::fs::create_dir_all(&logs).unwrap();
        let mut world = Self {
            replicas: Vec::new(),
            env,
            redis,
            postgres,
            logs,
            snapshots: Vec::new(),
            started: 0,
            postgres_down: false,
            client: reqwest::Client::builder()
                .timeout(Duration::from_secs(10))
                .build()
                .unwrap(),
        };
        for _ in 0..replicas {
            let replica = world.new_replica();
            world.replicas.push(replica);
        }
        for i in 0..replicas {
            world.wait_until_live(i).await;
        }
        world
    }

    fn new_replica(&mut self) -> Replica {
        self.started += 1;
        Replica::start(&self.env, &format!("model-{}", self.started), &self.logs)
    }

    async fn wait_until_live(&self, i: usize) {
        let url = format!("{}/health/live", self.replicas[i].address);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(r) = self.client.get(&url).send().await
                && r.status().is_success()
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "replica {i} did not start; see {}",
                self.logs.display()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn replicas(&self) -> usize {
        self.replicas.len()
    }

    pub fn address(&self, replica: usize) -> &str {
        &self.replicas[replica % self.replicas.len()].address
    }

    pub fn snapshots(&self) -> usize {
        self.snapshots.len()
    }

    /// A connection for the faults themselves, patient with a busy machine (a `SAVE`
    /// may take a while).
    async fn redis(&self) -> redis::aio::MultiplexedConnection {
        let config = redis::AsyncConnectionConfig::new()
            .set_response_timeout(Some(Duration::from_secs(60)))
            .set_connection_timeout(Some(Duration::from_secs(10)));
        redis::Client::open(self.env.redis_url.as_str())
            .unwrap()
            .get_multiplexed_async_connection_with_config(&config)
            .await
            .unwrap()
    }

    /// `SAVE`, kept aside as a point in time a later fault may go back to.
    pub async fn take_snapshot(&mut self) {
        let _: () = redis::cmd("SAVE")
            .query_async(&mut self.redis().await)
            .await
            .unwrap();
        let kept = self
            .redis
            .dir()
            .join(format!("snapshot-{}.rdb", self.snapshots.len()));
        std::fs::copy(self.redis.dir().join("dump.rdb"), &kept).unwrap();
        self.snapshots.push(kept);
    }

    pub async fn flushall(&self) {
        let _: () = redis::cmd("FLUSHALL")
            .query_async(&mut self.redis().await)
            .await
            .unwrap();
    }

    pub async fn restart_redis_empty(&mut self) {
        self.redis.kill();
        self.redis.wipe();
        self.redis.restart().await;
    }

    pub async fn restore_snapshot(&mut self, which: usize) {
        self.redis.kill();
        let snapshot = &self.snapshots[which % self.snapshots.len()];
        std::fs::copy(snapshot, self.redis.dir().join("dump.rdb")).unwrap();
        self.redis.restart().await;
    }

    pub async fn delete_event_keys(&self, event: Uuid) {
        let mut redis = self.redis().await;
        let pattern = format!("{}:{{{event}}}:*", self.env.prefix);
        let keys: Vec<String> = redis.keys(pattern).await.unwrap();
        if !keys.is_empty() {
            let _: () = redis.del(keys).await.unwrap();
        }
    }

    /// SIGKILLs a replica and starts another in its place (a new consumer name, as a
    /// replaced pod has).
    pub async fn kill_replica(&mut self, i: usize) {
        let i = i % self.replicas.len();
        self.replicas[i].kill();
        self.replicas[i] = self.new_replica();
        self.wait_until_live(i).await;
    }

    pub fn stop_postgres(&mut self) {
        self.postgres.stop();
        self.postgres_down = true;
    }

    pub fn resume_postgres(&mut self) {
        self.postgres.resume();
        self.postgres_down = false;
    }

    /// Makes PostgreSQL refuse every new sale row (SQLSTATE 23514, for good), or
    /// take them again.
    pub async fn refuse_sales(&self, refuse: bool) {
        let db = &self.env.db;
        if refuse {
            sqlx::query(
                "CREATE OR REPLACE FUNCTION model_refuse() RETURNS trigger LANGUAGE plpgsql AS
                 $$ BEGIN RAISE EXCEPTION 'refused by the model' USING ERRCODE = 'check_violation'; END $$",
            )
            .execute(db)
            .await
            .unwrap();
            sqlx::query(
                "CREATE OR REPLACE TRIGGER model_refuse BEFORE INSERT ON purchases
                 FOR EACH ROW EXECUTE FUNCTION model_refuse()",
            )
            .execute(db)
            .await
            .unwrap();
        } else {
            sqlx::query("DROP TRIGGER IF EXISTS model_refuse ON purchases")
                .execute(db)
                .await
                .unwrap();
        }
    }

    /// Purchase ids parked more than once in the dead letters of `events`.
    pub async fn parked_twice(&self, events: &[Uuid]) -> Vec<String> {
        let mut redis = self.redis().await;
        let mut seen = std::collections::HashSet::new();
        let mut twice = Vec::new();
        for event in events {
            let dead = format!("{}:{{{event}}}:dead", self.env.prefix);
            let entries: redis::streams::StreamRangeReply = redis.xrange_all(dead).await.unwrap();
            for entry in entries.ids {
                let id: Option<String> = entry.get("p");
                if let Some(id) = id
                    && !seen.insert(id.clone())
                {
                    twice.push(id);
                }
            }
        }
        twice
    }

    /// `boxoffice reconcile --fix`: sends parked sales back and rechecks what drifted.
    pub async fn reconcile_fix(&self) -> Result<(), String> {
        let (stores, gate) = self.env.gate().await;
        boxoffice::reconcile::run(&stores, gate.recovery(), true)
            .await
            .map(|_| ())
            .map_err(|e| e.to_string())
    }

    /// Starts a consumer that takes over whatever is pending the moment it is (its
    /// claim idle time is 1 ms); stopped with the token.
    pub async fn start_overtaker(&self) -> (CancellationToken, tokio::task::JoinHandle<()>) {
        let stop = CancellationToken::new();
        let consumer = self.env.consumer("overtaker", 1).await;
        let running = tokio::spawn(consumer.run(stop.clone()));
        (stop, running)
    }

    /// Waits until every entry of the streams of `events` was delivered and
    /// acknowledged (written to PostgreSQL, or parked); `false` after [`DRAIN_LIMIT`].
    pub async fn drain(&self, events: &[Uuid]) -> bool {
        let deadline = Instant::now() + DRAIN_LIMIT;
        while Instant::now() < deadline {
            let mut drained = true;
            for event in events {
                drained &= self.stream_drained(*event).await;
            }
            if drained {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        false
    }

    async fn stream_drained(&self, event: Uuid) -> bool {
        let mut redis = self.redis().await;
        let stream = self.env.stream_key(event);
        let last: redis::RedisResult<redis::streams::StreamInfoStreamReply> =
            redis.xinfo_stream(&stream).await;
        let Ok(last) = last else {
            return true; // no stream: nothing waits in it
        };
        let groups: redis::RedisResult<redis::streams::StreamInfoGroupsReply> =
            redis.xinfo_groups(&stream).await;
        let Ok(groups) = groups else {
            return false;
        };
        groups.groups.iter().any(|g| {
            g.name == "persist" && g.pending == 0 && g.last_delivered_id == last.last_generated_id
        })
    }

    pub fn logs(&self) -> &std::path::Path {
        &self.logs
    }
}

impl Drop for World {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.logs);
        }
    }
}
