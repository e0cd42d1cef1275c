//! A test's own database and Redis key prefix, the app instances started in it, and
//! the back doors tests use to look at or break its stores.

use std::time::{Duration, Instant};

use boxoffice::cli::ServeArgs;
use boxoffice::config::LogFormat;
use boxoffice::persist::Consumer;
use boxoffice::startup::{Application, Stores};
use clap::Parser;
use redis::AsyncCommands;
use sqlx::{Connection, PgConnection, PgPool};
use uuid::Uuid;

use super::*;

/// One isolated world: its own PostgreSQL database and Redis key prefix. Several apps
/// started from one `TestEnv` share them, like replicas. Dropping it removes both.
pub struct TestEnv {
    pub redis_url: String,
    pub database_url: String,
    postgres_url: String,
    pub db_name: String,
    pub prefix: String,
    pub db: PgPool,
    pub redis: redis::aio::MultiplexedConnection,
    /// `redis_url` names the seed nodes of a Redis Cluster.
    pub redis_cluster: bool,
}

#[derive(Parser)]
pub(super) struct TestCli {
    #[command(flatten)]
    args: ServeArgs,
}

impl TestEnv {
    pub async fn new() -> Self {
        let services = services().await;
        Self::on(&services.redis_url, &services.postgres_url).await
    }

    /// An environment on its own Redis and the shared PostgreSQL.
    pub async fn with_redis(redis_url: &str) -> Self {
        let services = services().await;
        Self::on(redis_url, &services.postgres_url).await
    }

    /// An environment on a Redis Cluster of its own (`redis` talks to one node).
    pub async fn with_cluster(cluster: &crate::redis_cluster::PrivateCluster) -> Self {
        let services = services().await;
        let mut env = Self::on(&cluster.node_url(0), &services.postgres_url).await;
        env.redis_url = cluster.seeds();
        env.redis_cluster = true;
        env
    }

    /// An environment on the given servers: a Redis URL and a PostgreSQL server URL
    /// without a database (the fault tests bring their own).
    pub async fn on(redis_url: &str, postgres_url: &str) -> Self {
        // Warnings go to the test's captured output, shown when it fails.
        let _ = tracing_subscriber::fmt()
            .with_env_filter(
                tracing_subscriber::EnvFilter::try_from_default_env()
                    .unwrap_or_else(|_| "warn".into()),
            )
            .with_test_writer()
            .try_init();
        let id = Uuid::new_v4().simple().to_string();
        let db_name = format!("boxoffice_test_{id}");
        let database_url = format!("{postgres_url}/{db_name}");
        // Creating and migrating the database is the app's job; do it once up front
        // so that the replicas of a test do not race on it.
        let db = boxoffice::db::connect(&database_url, 4)
            .await
            .expect("test database");
        let redis = redis::Client::open(redis_url)
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .expect("test Redis");
        Self {
            redis_url: redis_url.to_owned(),
            postgres_url: postgres_url.to_owned(),
            database_url,
            db_name,
            prefix: format!("test-{id}"),
            db,
            redis,
            redis_cluster: false,
        }
    }

    /// The configuration of an app instance in this environment: the command line's
    /// defaults, this environment's stores, and settings that keep tests quick.
    pub fn config(&self) -> ServeArgs {
        let mut config = TestCli::parse_from(["boxoffice"]).args;
        config.serve.listen = "127.0.0.1:0".parse().unwrap();
        config.serve.admin_token = Some(ADMIN_TOKEN.into());
        config.serve.buyer_jwt_key = Some(BUYER_JWT_KEY.into());
        config.serve.admission_key = Some("test-admission-key-of-at-least-32-bytes".into());
        config.common.store.redis_url = self.redis_url.clone();
        config.common.store.redis_cluster = self.redis_cluster;
        config.common.store.database_url = self.database_url.clone();
        config.common.store.key_prefix = self.prefix.clone();
        config.common.store.db_pool_size = 4;
        config.common.log_format = LogFormat::Pretty;
        config.consumer.consumer_block_ms = 200;
        config
    }

    /// Starts one app instance (a replica) in this environment.
    pub async fn spawn_app(&self) -> TestApp {
        self.spawn_app_with(|_| {}).await
    }

    /// Starts one app instance with `change` made to its configuration.
    pub async fn spawn_app_with(&self, change: impl FnOnce(&mut ServeArgs)) -> TestApp {
        let mut config = self.config();
        change(&mut config);
        let app = Application::build(&config.common, &config.serve, &config.consumer)
            .await
            .expect("app starts");
        let address = format!("http://127.0.0.1:{}", app.port());
        let default_event = app.default_event();
        let shutdown = app.shutdown_token();
        let graceful = Some(app.shutdown_handle());
        let handle = tokio::spawn(app.run_until_stopped());
        TestApp {
            address,
            default_event,
            client: reqwest::Client::new(),
            shutdown,
            graceful,
            handle: Some(handle),
        }
    }

    /// `N` app instances: replicas behind an imaginary load balancer.
    pub async fn spawn_replicas<const N: usize>(&self) -> [TestApp; N] {
        let mut apps = Vec::with_capacity(N);
        for _ in 0..N {
            apps.push(self.spawn_app().await);
        }
        apps.try_into()
            .unwrap_or_else(|_| unreachable!("exactly N apps"))
    }

    /// The stores and purchase gate of this environment, as one-shot commands use them.
    pub async fn gate(&self) -> (Stores, boxoffice::gate::Gate) {
        let store = self.config().common.store;
        let stores = Stores::connect(&store, Duration::from_secs(1))
            .await
            .expect("stores");
        let gate = boxoffice::gate::Gate::connect(&store, stores.db.clone())
            .await
            .expect("gate");
        (stores, gate)
    }

    /// A stream consumer of this environment, not yet running.
    pub async fn consumer(&self, name: &str, claim_idle_ms: u64) -> Consumer {
        let mut config = self.config();
        config.consumer.claim_idle_ms = claim_idle_ms;
        let stores = Stores::connect(&config.common.store, Duration::from_millis(200))
            .await
            .expect("stores");
        stores.consumer(name.to_owned(), &config.consumer)
    }

    /// Rows of `purchases` for `event`: (purchase id, idempotency key, quantity).
    pub async fn rows(&self, event: Uuid) -> Vec<(Uuid, String, i16)> {
        sqlx::query_as(
            "SELECT id, idempotency_key, quantity FROM purchases WHERE event_id = $1 ORDER BY id",
        )
        .bind(event)
        .fetch_all(&self.db)
        .await
        .unwrap()
    }

    /// Waits until `purchases` holds `count` rows for `event`, or panics after `within`.
    pub async fn wait_for_rows(&self, event: Uuid, count: usize, within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            let rows = self.rows(event).await.len();
            if rows == count {
                return;
            }
            assert!(
                rows < count,
                "more rows ({rows}) than sales ({count}) for event {event}"
            );
            assert!(
                Instant::now() < deadline,
                "only {rows} of {count} rows for event {event} after {within:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// When PostgreSQL has a sale cancelled (`None`: not, or not yet).
    pub async fn cancelled_at(&self, purchase: &str) -> Option<chrono::DateTime<chrono::Utc>> {
        let (at,): (Option<chrono::DateTime<chrono::Utc>>,) =
            sqlx::query_as("SELECT cancelled_at FROM purchases WHERE id = $1")
                .bind(purchase.parse::<Uuid>().unwrap())
                .fetch_one(&self.db)
                .await
                .unwrap();
        at
    }

    /// Waits until PostgreSQL has the sale cancelled (through the stream).
    pub async fn wait_for_cancellation(&self, purchase: &str, within: Duration) {
        let deadline = Instant::now() + within;
        while self.cancelled_at(purchase).await.is_none() {
            assert!(
                Instant::now() < deadline,
                "{purchase}: row not marked cancelled"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Deletes every Redis key of this environment: Redis lost its data (the server
    /// is the same, so recovery starts from the missing inventory).
    pub async fn lose_redis_data(&self) {
        delete_keys(&self.redis_url, &self.prefix).await;
    }

    /// The Redis key of an Idempotency-Key's record.
    pub fn record_key(&self, event: Uuid, key: &str) -> String {
        format!("{}:{{{event}}}:idem:{key}", self.prefix)
    }

    pub fn stream_key(&self, event: Uuid) -> String {
        format!("{}:{{{event}}}:log", self.prefix)
    }

    /// A new connection to this environment's Redis; unlike `redis`, it works after a
    /// fault test restarted the server.
    pub async fn redis_now(&self) -> redis::aio::MultiplexedConnection {
        redis::Client::open(self.redis_url.as_str())
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap()
    }

    /// Redis' `sold` counter of an event.
    pub async fn redis_sold(&self, event: Uuid) -> i64 {
        let key = format!("{}:{{{event}}}:inv", self.prefix);
        self.redis_now().await.hget(key, "sold").await.unwrap()
    }
}

impl Drop for TestEnv {
    fn drop(&mut self) {
        let (redis_url, postgres_url, db_name, prefix) = (
            self.redis_url.clone(),
            self.postgres_url.clone(),
            self.db_name.clone(),
            self.prefix.clone(),
        );
        // Drop runs outside async; clean up on a thread with its own runtime.
        let cleanup = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async move {
                // Twice: an app task that was reloading its events when the test ended
                // may write keys back once more before it notices it was stopped.
                delete_keys(&redis_url, &prefix).await;
                tokio::time::sleep(Duration::from_millis(500)).await;
                delete_keys(&redis_url, &prefix).await;
                if let Ok(mut conn) =
                    PgConnection::connect(&format!("{postgres_url}/postgres")).await
                {
                    let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
                        "DROP DATABASE IF EXISTS \"{db_name}\" WITH (FORCE)"
                    )))
                    .execute(&mut conn)
                    .await;
                }
            });
        });
        let _ = cleanup.join();
    }
}

/// Deletes every key under `prefix` (and nothing else).
pub(super) async fn delete_keys(redis_url: &str, prefix: &str) {
    let Ok(client) = redis::Client::open(redis_url) else {
        return;
    };
    let Ok(mut conn) = client.get_multiplexed_async_connection().await else {
        return;
    };
    let mut cursor = 0u64;
    loop {
        let Ok((next, keys)): redis::RedisResult<(u64, Vec<String>)> = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(format!("{prefix}:*"))
            .arg("COUNT")
            .arg(10_000)
            .query_async(&mut conn)
            .await
        else {
            return;
        };
        // A key per command: on a cluster, one naming keys of two events is refused.
        if !keys.is_empty() {
            let mut pipe = redis::pipe();
            for key in &keys {
                pipe.del(key).ignore();
            }
            let _: redis::RedisResult<()> = pipe.query_async(&mut conn).await;
        }
        if next == 0 {
            return;
        }
        cursor = next;
    }
}
