//! Test harness: finds Redis and PostgreSQL, gives every test its own database and
//! Redis key prefix, and starts app instances on random ports.
//!
//! Services, in order: `BOXOFFICE_TEST_REDIS_URL` / `BOXOFFICE_TEST_DATABASE_URL`; the
//! local defaults when they answer; containers started with testcontainers, which
//! `BOXOFFICE_TEST_CONTAINERS=1` chooses even where local services answer.

use std::sync::Arc;
use std::time::{Duration, Instant};

use boxoffice::cli::ServeArgs;
use boxoffice::config::LogFormat;
use boxoffice::persist::Consumer;
use boxoffice::startup::{Application, Stores};
use clap::Parser;
use redis::AsyncCommands;
use reqwest::{RequestBuilder, Response, StatusCode};
use serde_json::{Value, json};
use sqlx::{Connection, PgConnection, PgPool};
use tokio::sync::OnceCell;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

const LOCAL_REDIS: &str = "redis://127.0.0.1:6379";
const LOCAL_POSTGRES: &str = "postgres://postgres@127.0.0.1:5432";
pub const ADMIN_TOKEN: &str = "test-admin-token";
/// The key every test app verifies buyer tokens with (HS256).
pub const BUYER_JWT_KEY: &str = "test-buyer-key-of-at-least-32-bytes!";

/// A buyer token for `sub`, valid for a minute.
pub fn buyer_token(sub: &str) -> String {
    buyer_token_signed(sub, BUYER_JWT_KEY, 60)
}

/// A buyer token for `sub` signed with `key`, expiring `ttl` seconds from now
/// (negative: already expired).
pub fn buyer_token_signed(sub: &str, key: &str, ttl: i64) -> String {
    let exp = jsonwebtoken::get_current_timestamp() as i64 + ttl;
    jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &json!({ "sub": sub, "exp": exp }),
        &jsonwebtoken::EncodingKey::from_secret(key.as_bytes()).unwrap(),
    )
    .unwrap()
}

/// Where the test services are: a Redis URL and a PostgreSQL server URL (no database).
struct Services {
    redis_url: String,
    postgres_url: String,
}

static SERVICES: OnceCell<Services> = OnceCell::const_new();

async fn services() -> &'static Services {
    SERVICES.get_or_init(find_services).await
}

async fn find_services() -> Services {
    if let (Ok(redis_url), Ok(postgres_url)) = (
        std::env::var("BOXOFFICE_TEST_REDIS_URL"),
        std::env::var("BOXOFFICE_TEST_DATABASE_URL"),
    ) {
        return Services {
            redis_url,
            postgres_url: postgres_url.trim_end_matches('/').to_owned(),
        };
    }
    let forced =
        std::env::var("BOXOFFICE_TEST_CONTAINERS").is_ok_and(|v| !v.is_empty() && v != "0");
    if !forced && redis_answers(LOCAL_REDIS).await && postgres_answers(LOCAL_POSTGRES).await {
        return Services {
            redis_url: LOCAL_REDIS.into(),
            postgres_url: LOCAL_POSTGRES.into(),
        };
    }
    containers::start().await
}

/// Whether a Redis answers PING at `url` within 2 s.
pub async fn redis_answers(url: &str) -> bool {
    let ping = async {
        let client = redis::Client::open(url).ok()?;
        let mut conn = client.get_multiplexed_async_connection().await.ok()?;
        redis::cmd("PING")
            .query_async::<String>(&mut conn)
            .await
            .ok()
    };
    matches!(
        tokio::time::timeout(Duration::from_secs(2), ping).await,
        Ok(Some(_))
    )
}

async fn postgres_answers(server: &str) -> bool {
    let url = format!("{server}/postgres");
    matches!(
        tokio::time::timeout(Duration::from_secs(2), PgConnection::connect(&url)).await,
        Ok(Ok(_))
    )
}

mod containers {
    use std::any::Any;
    use std::sync::Mutex;

    use testcontainers_modules::postgres::Postgres;
    use testcontainers_modules::redis::Redis;
    use testcontainers_modules::testcontainers::ImageExt;
    use testcontainers_modules::testcontainers::runners::AsyncRunner;

    use super::Services;

    /// The images docker-compose.yml runs, so the tests meet the same servers (the
    /// modules' defaults, Redis 5 and PostgreSQL 11, lack commands the service uses).
    const REDIS_TAG: &str = "7.2-alpine";
    const POSTGRES_TAG: &str = "16-alpine";

    /// The containers, kept until the test binary exits (see [`remove_at_exit`]).
    static RUNNING: Mutex<Vec<Box<dyn Any + Send>>> = Mutex::new(Vec::new());

    /// Starts one Redis and one PostgreSQL container for the whole test binary.
    pub async fn start() -> Services {
        let redis = Redis::default()
            .with_tag(REDIS_TAG)
            .start()
            .await
            .expect("no Redis at 127.0.0.1:6379 and Docker could not start one");
        let postgres = Postgres::default()
            .with_tag(POSTGRES_TAG)
            .start()
            .await
            .expect("no PostgreSQL at 127.0.0.1:5432 and Docker could not start one");
        let services = Services {
            redis_url: format!(
                "redis://{}:{}",
                redis.get_host().await.unwrap(),
                redis.get_host_port_ipv4(6379).await.unwrap()
            ),
            postgres_url: format!(
                "postgres://postgres:postgres@{}:{}",
                postgres.get_host().await.unwrap(),
                postgres.get_host_port_ipv4(5432).await.unwrap()
            ),
        };
        let mut running = RUNNING.lock().unwrap();
        running.push(Box::new(redis));
        running.push(Box::new(postgres));
        remove_at_exit();
        services
    }

    unsafe extern "C" {
        fn atexit(callback: extern "C" fn()) -> std::ffi::c_int;
    }

    /// Every test shares the containers, so none of them can own them, and statics
    /// are never dropped: the containers are removed when the process exits, by
    /// dropping them (testcontainers removes a container on drop) in a runtime of
    /// their own.
    fn remove_at_exit() {
        extern "C" fn remove() {
            let containers =
                std::mem::take(&mut *RUNNING.lock().unwrap_or_else(|e| e.into_inner()));
            if let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                runtime.block_on(async move { drop(containers) });
            }
        }
        static REGISTERED: std::sync::Once = std::sync::Once::new();
        // SAFETY: `remove` is a plain function that stays valid for the whole process.
        REGISTERED.call_once(|| unsafe {
            atexit(remove);
        });
    }
}

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
}

#[derive(Parser)]
struct TestCli {
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

    /// Deletes every Redis key of this environment: Redis lost its data (the server
    /// is the same, so recovery starts from the missing inventory).
    pub async fn lose_redis_data(&self) {
        delete_keys(&self.redis_url, &self.prefix).await;
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
async fn delete_keys(redis_url: &str, prefix: &str) {
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
        if !keys.is_empty() {
            let _: redis::RedisResult<()> = conn.del(&keys).await;
        }
        if next == 0 {
            return;
        }
        cursor = next;
    }
}

/// A running app instance. Dropping it stops it.
pub struct TestApp {
    pub address: String,
    pub default_event: Uuid,
    pub client: reqwest::Client,
    shutdown: CancellationToken,
    graceful: Option<boxoffice::startup::ShutdownHandle>,
    handle: Option<tokio::task::JoinHandle<boxoffice::Result<()>>>,
}

/// A response read whole: status, headers of interest, JSON body.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: StatusCode,
    pub replayed: bool,
    pub body: Value,
    pub content_type: String,
}

impl Reply {
    pub async fn read(response: Response) -> Self {
        let status = response.status();
        Self::try_read(response)
            .await
            .unwrap_or_else(|text| panic!("{status}: body is not JSON: {text:?}"))
    }

    /// The reply, or what arrived of its body when that is not JSON (a connection cut
    /// half-way, say).
    pub async fn try_read(response: Response) -> Result<Self, String> {
        let status = response.status();
        let replayed = response
            .headers()
            .get("idempotent-replayed")
            .is_some_and(|v| v == "true");
        let content_type = response
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        let text = response.text().await.map_err(|e| e.to_string())?;
        let body = serde_json::from_str(&text).map_err(|_| text)?;
        Ok(Self {
            status,
            replayed,
            body,
            content_type,
        })
    }

    /// The `error` code of an error body.
    pub fn code(&self) -> &str {
        self.body["error"].as_str().unwrap_or("<no error code>")
    }
}

impl TestApp {
    /// A client of the app at `address`, for tasks that cannot borrow the app (it is
    /// stopped by its owner, not by this handle).
    pub fn at(address: &str) -> Self {
        Self {
            address: address.to_owned(),
            default_event: Uuid::nil(),
            client: reqwest::Client::new(),
            shutdown: CancellationToken::new(),
            graceful: None,
            handle: None,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.address)
    }

    pub async fn send(&self, request: RequestBuilder) -> Reply {
        Reply::read(request.send().await.expect("request sent")).await
    }

    pub async fn get(&self, path: &str) -> Reply {
        self.send(self.client.get(self.url(path))).await
    }

    /// `POST /api/v1/purchase` of the default event.
    pub async fn purchase(&self, key: &str, quantity: u8) -> Reply {
        self.purchase_body(key, json!({ "quantity": quantity }))
            .await
    }

    pub async fn purchase_body(&self, key: &str, body: Value) -> Reply {
        self.send(
            self.client
                .post(self.url("/api/v1/purchase"))
                .header("Idempotency-Key", key)
                .json(&body),
        )
        .await
    }

    /// `POST /api/v1/events/{event}/purchase`.
    pub async fn purchase_event(&self, event: Uuid, key: &str, quantity: u8) -> Reply {
        self.send(
            self.client
                .post(self.url(&format!("/api/v1/events/{event}/purchase")))
                .header("Idempotency-Key", key)
                .json(&json!({ "quantity": quantity })),
        )
        .await
    }

    /// Creates an event through the admin API and returns its id.
    pub async fn create_event(&self, name: &str, seats: u32) -> Uuid {
        let reply = self
            .send(
                self.client
                    .post(self.url("/api/v1/events"))
                    .bearer_auth(ADMIN_TOKEN)
                    .json(&json!({ "name": name, "totalSeats": seats })),
            )
            .await;
        assert_eq!(reply.status, StatusCode::CREATED, "{:?}", reply.body);
        reply.body["id"].as_str().unwrap().parse().unwrap()
    }

    /// Creates an event with the given body (name, totalSeats, holdSeconds,
    /// maxPerBuyer) and returns its id.
    pub async fn create_event_with(&self, body: Value) -> Uuid {
        let reply = self
            .send(
                self.client
                    .post(self.url("/api/v1/events"))
                    .bearer_auth(ADMIN_TOKEN)
                    .json(&body),
            )
            .await;
        assert_eq!(reply.status, StatusCode::CREATED, "{:?}", reply.body);
        reply.body["id"].as_str().unwrap().parse().unwrap()
    }

    /// `POST /api/v1/events/{event}/purchase` with a buyer token, if any.
    pub async fn purchase_as(
        &self,
        event: Uuid,
        key: &str,
        quantity: u8,
        token: Option<&str>,
    ) -> Reply {
        let mut request = self
            .client
            .post(self.url(&format!("/api/v1/events/{event}/purchase")))
            .header("Idempotency-Key", key)
            .json(&json!({ "quantity": quantity }));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        self.send(request).await
    }

    /// `POST /api/v1/events/{event}/holds` with a buyer token, if any.
    pub async fn hold(&self, event: Uuid, key: &str, quantity: u8, token: Option<&str>) -> Reply {
        let mut request = self
            .client
            .post(self.url(&format!("/api/v1/events/{event}/holds")))
            .header("Idempotency-Key", key)
            .json(&json!({ "quantity": quantity }));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        self.send(request).await
    }

    /// `POST /api/v1/events/{event}/holds/{hold}/confirm`.
    pub async fn confirm(&self, event: Uuid, hold: &str) -> Reply {
        self.send(
            self.client
                .post(self.url(&format!("/api/v1/events/{event}/holds/{hold}/confirm"))),
        )
        .await
    }

    /// `DELETE /api/v1/events/{event}/holds/{hold}`: the status, and the body if any.
    pub async fn release(&self, event: Uuid, hold: &str) -> (StatusCode, Option<Value>) {
        let response = self
            .client
            .delete(self.url(&format!("/api/v1/events/{event}/holds/{hold}")))
            .send()
            .await
            .expect("release sent");
        let status = response.status();
        let text = response.text().await.unwrap();
        (status, serde_json::from_str(&text).ok())
    }

    /// `POST /api/v1/events/{event}/purchases/{purchase}/cancel` as the admin.
    pub async fn cancel(&self, event: Uuid, purchase: &str) -> Reply {
        self.send(
            self.client
                .post(self.url(&format!(
                    "/api/v1/events/{event}/purchases/{purchase}/cancel"
                )))
                .bearer_auth(ADMIN_TOKEN),
        )
        .await
    }

    /// `GET /api/v1/events/{event}`.
    pub async fn event(&self, event: Uuid) -> Value {
        let reply = self.get(&format!("/api/v1/events/{event}")).await;
        assert_eq!(reply.status, StatusCode::OK, "{:?}", reply.body);
        reply.body
    }

    /// Starts what SIGTERM starts: not ready at once, stop after `drain`.
    pub fn begin_shutdown(&mut self, drain: Duration) -> tokio::task::JoinHandle<()> {
        let graceful = self.graceful.take().expect("shutdown begins once");
        tokio::spawn(graceful.drain_and_stop(drain))
    }

    /// Waits until the instance has stopped.
    pub async fn stopped(mut self) {
        if let Some(handle) = self.handle.take() {
            handle.await.unwrap().unwrap();
        }
    }

    /// Stops the instance at once (no drain), waiting for it to finish.
    pub async fn stop(mut self) {
        self.shutdown.cancel();
        if let Some(handle) = self.handle.take() {
            handle.await.unwrap().unwrap();
        }
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// One purchase as a client that follows the API's advice sends it: on a 503 or a
/// lost connection, the same request again with the same key, until it gets another
/// answer or `give_up` passes. Returns the answer (`None` if there was none) and the
/// number of attempts.
pub async fn buy_until_answered(
    client: &reqwest::Client,
    url: &str,
    key: &str,
    quantity: u8,
    give_up: Duration,
) -> (Option<Reply>, u32) {
    let deadline = Instant::now() + give_up;
    let mut attempts = 0;
    loop {
        attempts += 1;
        let sent = client
            .post(url)
            .header("Idempotency-Key", key)
            .json(&json!({ "quantity": quantity }))
            .send()
            .await;
        if let Ok(response) = sent
            && response.status() != StatusCode::SERVICE_UNAVAILABLE
            && response.status() != StatusCode::REQUEST_TIMEOUT
            && let Ok(reply) = Reply::try_read(response).await
        {
            return (Some(reply), attempts);
        }
        if Instant::now() > deadline {
            return (None, attempts);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Fires `buyers` purchases at `apps` round-robin with up to `in_flight` at once;
/// `quantity(i)` and `key(i)` pick each buyer's order. Returns every reply in order.
pub async fn rush(
    apps: &[&TestApp],
    event: Uuid,
    buyers: usize,
    in_flight: usize,
    quantity: impl Fn(usize) -> u8,
    key: impl Fn(usize) -> String,
) -> Vec<(String, u8, Reply)> {
    let permits = Arc::new(tokio::sync::Semaphore::new(in_flight));
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..buyers {
        let app = apps[i % apps.len()];
        let client = app.client.clone();
        let url = app.url(&format!("/api/v1/events/{event}/purchase"));
        let (key, quantity) = (key(i), quantity(i));
        let permits = permits.clone();
        tasks.spawn(async move {
            let _permit = permits.acquire_owned().await.unwrap();
            let response = client
                .post(url)
                .header("Idempotency-Key", &key)
                .json(&json!({ "quantity": quantity }))
                .send()
                .await
                .expect("purchase sent");
            (i, key, quantity, Reply::read(response).await)
        });
    }
    let mut replies = tasks.join_all().await;
    replies.sort_by_key(|(i, ..)| *i);
    replies.into_iter().map(|(_, k, q, r)| (k, q, r)).collect()
}
