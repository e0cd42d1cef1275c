//! Wiring: builds the application from its configuration and runs the HTTP server,
//! the stream consumer and the Redis watcher under one shutdown signal.
//!
//! Startup checks no event in Redis itself: the watcher's first round does, like
//! every later one after a Redis server change, and a request for an event not yet
//! checked has it checked first (see `recovery`).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use sqlx::PgPool;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::api::{self, AppState, Credentials, Instance, Policy, Stats};
use crate::buyer::BuyerTokens;
use crate::config::{CommonConfig, ConsumerConfig, ServeConfig, StoreConfig};
use crate::db;
use crate::domain::Seats;
use crate::error::{Error, Result};
use crate::gate::Gate;
use crate::keys::Keys;
use crate::persist::Consumer;
use crate::queue::AdmissionTokens;
use crate::server::{self, Limits};
use crate::store;

/// How long in-flight requests may take to finish after shutdown begins.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// Connections to both stores, shared by the server and the consumer.
#[derive(Clone)]
pub struct Stores {
    pub db: PgPool,
    pub redis: store::Pool,
    pub keys: Keys,
    /// How long a decision is remembered (`BOXOFFICE_IDEMPOTENCY_TTL`, seconds).
    pub idempotency_ttl: u32,
}

impl Stores {
    /// Connects to PostgreSQL (creating and migrating the database) and builds the
    /// Redis pool. `block` is the longest blocking command the pool must allow.
    pub async fn connect(config: &StoreConfig, block: Duration) -> Result<Self> {
        let db = db::connect(&config.database_url, config.db_pool_size).await?;
        let redis = store::Pool::connect(config, block).await?;
        Ok(Self {
            db,
            redis,
            keys: Keys::new(config.key_prefix.clone()),
            idempotency_ttl: config.idempotency_ttl,
        })
    }

    pub fn consumer(&self, name: String, config: &ConsumerConfig) -> Consumer {
        Consumer::new(
            self.redis.clone(),
            self.db.clone(),
            self.keys.clone(),
            name,
            config.clone(),
        )
        .keeping_holds_for(Duration::from_secs(u64::from(self.idempotency_ttl)))
    }
}

/// A built, not yet running, `boxoffice serve`.
pub struct Application {
    listener: TcpListener,
    limits: Limits,
    /// How often the watcher checks which Redis server answers; `None`: no watcher.
    redis_watch: Option<Duration>,
    /// How often expired holds are swept; `None`: no sweeper.
    hold_sweep: Option<Duration>,
    port: u16,
    state: Arc<AppState>,
    consumer: Option<Consumer>,
    shutdown: CancellationToken,
}

impl Application {
    /// Connects to the stores, ensures the default event and binds the listener.
    pub async fn build(
        common: &CommonConfig,
        serve: &ServeConfig,
        consumer: &ConsumerConfig,
    ) -> Result<Self> {
        serve.check_secrets()?;
        let instance_id = common.instance_id();
        let block = Duration::from_millis(consumer.consumer_block_ms);
        let stores = Stores::connect(&common.store, block).await?;
        let gate = Gate::connect(&common.store, stores.db.clone()).await?;
        let queue = gate.queue();
        let seats =
            Seats::try_from(i64::from(serve.default_event_seats)).map_err(Error::Startup)?;
        let default_event = db::default_event(&stores.db, &serve.default_event_name, seats).await?;

        let listener = bind(serve).await?;
        let port = listener
            .local_addr()
            .map_or(serve.listen.port(), |addr| addr.port());
        let consumer = serve
            .consumer
            .then(|| stores.consumer(instance_id.clone(), consumer));
        let state = Arc::new(AppState {
            gate,
            db: stores.db,
            redis: stores.redis,
            queue,
            default_event: default_event.id,
            credentials: credentials(serve)?,
            policy: policy(serve),
            instance: Instance {
                id: instance_id,
                stats: Stats::default(),
                started: Instant::now(),
                metrics: crate::metrics::install(),
                draining: AtomicBool::new(false),
                reads: Default::default(),
            },
        });
        Ok(Self {
            listener,
            limits: serve.limits(),
            redis_watch: serve.redis_watch(),
            hold_sweep: serve.hold_sweep(),
            port,
            state,
            consumer,
            shutdown: CancellationToken::new(),
        })
    }

    /// The port the server listens on (useful when configured with port 0).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The id of the event the seed-compatible endpoints sell.
    pub fn default_event(&self) -> uuid::Uuid {
        self.state.default_event
    }

    /// Cancelling this token stops the server, the consumer and the watcher.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// Stops the application gracefully from another task (see [`ShutdownHandle`]).
    pub fn shutdown_handle(&self) -> ShutdownHandle {
        ShutdownHandle {
            state: self.state.clone(),
            token: self.shutdown.clone(),
        }
    }

    /// Serves until the shutdown token is cancelled, then lets in-flight requests and
    /// the consumer's current batch finish.
    pub async fn run_until_stopped(self) -> Result<()> {
        let Self {
            listener,
            limits,
            redis_watch,
            hold_sweep,
            state,
            consumer,
            shutdown,
            ..
        } = self;
        tracing::info!(port = self.port, instance = %state.instance.id, "serving");
        let consumer = consumer.map(|c| tokio::spawn(c.run(shutdown.clone())));
        let watcher = redis_watch.map(|every| {
            let recovery = state.gate.recovery().clone();
            tokio::spawn(recovery.watch_redis(every, shutdown.clone()))
        });
        // Memory is read at the watch interval, or every second without a watcher.
        let memory = tokio::spawn(state.gate.clone().watch_memory(
            redis_watch.unwrap_or(Duration::from_secs(1)),
            shutdown.clone(),
        ));
        let sweeper = hold_sweep.map(|every| {
            let gate = state.gate.clone();
            tokio::spawn(gate.sweep_holds(every, shutdown.clone()))
        });
        let served = server::serve(
            listener,
            api::routes(state),
            limits,
            shutdown.clone(),
            SHUTDOWN_GRACE,
        )
        .await;
        shutdown.cancel();
        if let Some(consumer) = consumer {
            let _ = consumer.await;
        }
        let _ = memory.await;
        for task in [watcher, sweeper].into_iter().flatten() {
            let _ = task.await;
        }
        served.map_err(|e| Error::Startup(format!("HTTP server failed: {e}")))
    }
}

/// Begins a graceful shutdown: readiness turns 503 at once, requests are served for
/// `drain`, then the listener closes, in-flight requests finish and the consumer
/// acknowledges its current batch.
pub struct ShutdownHandle {
    state: Arc<AppState>,
    token: CancellationToken,
}

impl ShutdownHandle {
    pub async fn drain_and_stop(self, drain: Duration) {
        tracing::info!(?drain, "shutting down: not ready, draining");
        self.state.instance.draining.store(true, Ordering::Relaxed);
        tokio::select! {
            _ = tokio::time::sleep(drain) => {}
            _ = self.token.cancelled() => {}
        }
        self.token.cancel();
    }
}

/// Why a process cannot listen on `addr`, naming the `setting` that chose it.
pub fn listen_error(addr: std::net::SocketAddr, setting: &str, e: &std::io::Error) -> Error {
    Error::Startup(if e.kind() == std::io::ErrorKind::AddrInUse {
        format!(
            "cannot listen on {addr}: another process is listening there; stop it or set \
             {setting} to a free address"
        )
    } else {
        format!("cannot listen on {addr} ({e}); set {setting} to an address this host has")
    })
}

/// Binds with an explicit accept backlog: tokio's default (1024) overflows when a
/// flash crowd connects at once, and each dropped SYN costs the client a 1 s retry.
async fn bind(serve: &ServeConfig) -> Result<TcpListener> {
    let addr = serve.listen;
    let fail = |e: std::io::Error| listen_error(addr, "BOXOFFICE_LISTEN", &e);
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()
    } else {
        tokio::net::TcpSocket::new_v6()
    }
    .map_err(fail)?;
    socket.set_reuseaddr(true).map_err(fail)?;
    socket.set_nodelay(true).map_err(fail)?;
    socket.bind(addr).map_err(fail)?;
    socket.listen(serve.listen_backlog).map_err(fail)
}

/// Resolves when the process receives SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("installing a SIGTERM handler");
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

/// The keys and tokens requests are checked against, from the configuration.
fn credentials(serve: &ServeConfig) -> Result<Credentials> {
    Ok(Credentials {
        admin_token: serve.admin_token().map(str::to_owned),
        buyer_tokens: serve
            .buyer_jwt_key()
            .map(BuyerTokens::from_key)
            .transpose()?,
        admissions: serve
            .admission_keys()
            .map(|(key, previous)| AdmissionTokens::new(key, previous))
            .transpose()?,
    })
}

/// The limits a client meets, from the configuration.
fn policy(serve: &ServeConfig) -> Policy {
    Policy {
        max_hold_seconds: serve.max_hold_seconds,
        queue_poll_max_ms: serve.queue_poll_max_ms,
        body_limit: serve.body_limit,
        request_timeout: Duration::from_millis(serve.request_timeout_ms),
        cors_origins: serve.cors_origins(),
        rate_limits: crate::api::rate::RateLimits::new(&serve.rate_limits),
    }
}
