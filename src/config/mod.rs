//! Runtime configuration: one clap struct per concern, every flag with an
//! environment fallback so containers and Kubernetes configure it with env vars.

use std::net::SocketAddr;
use std::time::Duration;

use clap::{Args, ValueEnum};

use crate::domain::{MAX_HOLD_SECONDS, MAX_IDEMPOTENCY_TTL, MAX_SEATS};

mod rate;
pub use rate::RateLimitConfig;

/// Where the service finds Redis and PostgreSQL and how it names its keys.
#[derive(Debug, Clone, Args)]
pub struct StoreConfig {
    /// Redis URL: the gate that sells seats and the stream of sales. With
    /// `BOXOFFICE_REDIS_CLUSTER`, one or more nodes of the cluster separated by commas.
    #[arg(
        long,
        env = "REDIS_URL",
        default_value = "redis://127.0.0.1:6379",
        hide_env_values = true
    )]
    pub redis_url: String,

    /// Redis behind `REDIS_URL` is a Redis Cluster: keys are spread over its masters
    /// by event, and the client follows the cluster's redirections and failovers.
    #[arg(
        long,
        env = "BOXOFFICE_REDIS_CLUSTER",
        default_value_t = false,
        action = clap::ArgAction::Set,
        value_parser = clap::builder::BoolishValueParser::new()
    )]
    pub redis_cluster: bool,

    /// Replicas of Redis that must have a seat movement before it is answered
    /// (`WAIT`, up to half `BOXOFFICE_REDIS_TIMEOUT_MS`; fewer: 503, and the retry replays
    /// it). With 1, a failover to a replica keeps every answered sale; 0: a failover
    /// may lose the last ones (docs/operations.md, "Redis Cluster").
    #[arg(long, env = "BOXOFFICE_REDIS_REPLICA_ACKS", default_value_t = 0)]
    pub redis_replica_acks: u8,

    /// PostgreSQL URL: the record of every sale. The database is created when missing.
    #[arg(
        long,
        env = "DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/boxoffice",
        hide_env_values = true
    )]
    pub database_url: String,

    /// Prefix of every Redis key, so several deployments (or test runs) can share one Redis.
    #[arg(long, env = "BOXOFFICE_KEY_PREFIX", default_value = "tix", value_parser = crate::keys::valid_prefix)]
    pub key_prefix: String,

    /// Connections in the PostgreSQL pool of one process. Keep
    /// `replicas × this` below the server's `max_connections`.
    #[arg(long, env = "BOXOFFICE_DB_POOL_SIZE", default_value_t = 8)]
    pub db_pool_size: u32,

    /// Connections in the Redis pool for blocking stream reads and other non-hot work.
    #[arg(long, env = "BOXOFFICE_REDIS_POOL_SIZE", default_value_t = 8)]
    pub redis_pool_size: usize,

    /// Milliseconds a Redis command may take before the request fails with 503.
    #[arg(long, env = "BOXOFFICE_REDIS_TIMEOUT_MS", default_value_t = 2000)]
    pub redis_timeout_ms: u64,

    /// Seconds an Idempotency-Key and its outcome are remembered (1 to 2592000, 30
    /// days). Every command that restores records from PostgreSQL needs the same
    /// value as the servers, so it is a store setting.
    #[arg(
        long,
        env = "BOXOFFICE_IDEMPOTENCY_TTL",
        default_value_t = 86_400,
        value_parser = clap::value_parser!(u32).range(1..=i64::from(MAX_IDEMPOTENCY_TTL))
    )]
    pub idempotency_ttl: u32,

    /// Seconds a hold released or expired without a sale keeps what a retry of it
    /// needs (at most the idempotency TTL); a confirmed hold is kept like a sale.
    #[arg(
        long,
        env = "BOXOFFICE_ENDED_HOLD_TTL",
        default_value_t = 900,
        value_parser = clap::value_parser!(u32).range(1..=i64::from(MAX_IDEMPOTENCY_TTL))
    )]
    pub ended_hold_ttl: u32,

    /// Most purchases of one event one script call decides. Purchases that arrive
    /// while the event's previous call is in flight wait for the next one, which
    /// carries them all up to this many; an idle server sends at once. 1: every
    /// purchase sends its own call.
    #[arg(
        long,
        env = "BOXOFFICE_PURCHASE_BATCH",
        default_value_t = 128,
        value_parser = clap::value_parser!(u16).range(1..=1024)
    )]
    pub purchase_batch: u16,

    /// Percent of Redis' `maxmemory` above which new purchases and holds without a
    /// buyer token get 503 (buyers with tokens, confirmations, releases and
    /// cancellations go on), so that a flood cannot fill Redis and stop every sale.
    /// 100: off (Redis' own refusal, at maxmemory, is answered 503 too).
    #[arg(
        long,
        env = "BOXOFFICE_REDIS_MEMORY_SHARE",
        default_value_t = 90,
        value_parser = clap::value_parser!(u8).range(1..=100)
    )]
    pub redis_memory_share: u8,
}

impl StoreConfig {
    pub fn redis_timeout(&self) -> Duration {
        Duration::from_millis(self.redis_timeout_ms)
    }
}

/// How the stream consumer batches and reclaims sales on their way to PostgreSQL.
#[derive(Debug, Clone, Args)]
pub struct ConsumerConfig {
    /// Largest number of sales written to PostgreSQL in one statement (and in one
    /// transaction, which may hold the batches of several events).
    #[arg(long, env = "BOXOFFICE_CONSUMER_BATCH", default_value_t = 1000)]
    pub consumer_batch: usize,

    /// Milliseconds one XREADGROUP waits for new sales before checking for new events.
    #[arg(long, env = "BOXOFFICE_CONSUMER_BLOCK_MS", default_value_t = 1000)]
    pub consumer_block_ms: u64,

    /// Milliseconds to wait after a short batch before reading again, so that under
    /// load each statement carries many rows (adds at most this to persistence lag).
    #[arg(long, env = "BOXOFFICE_CONSUMER_LINGER_MS", default_value_t = 10)]
    pub consumer_linger_ms: u64,

    /// Milliseconds a sale may stay unacknowledged by another consumer before this one
    /// takes it over (the other consumer is presumed dead).
    #[arg(long, env = "BOXOFFICE_CLAIM_IDLE_MS", default_value_t = 30_000)]
    pub claim_idle_ms: u64,
}

/// Settings of the HTTP server (`serve`).
#[derive(Debug, Clone, Args)]
pub struct ServeConfig {
    /// Address to listen on.
    #[arg(long, env = "BOXOFFICE_LISTEN", default_value = "0.0.0.0:3000")]
    pub listen: SocketAddr,

    /// Length of the kernel's accept queue. A flash crowd opens thousands of connections
    /// at once; a short queue drops SYNs, which clients retry only after a second.
    #[arg(long, env = "BOXOFFICE_LISTEN_BACKLOG", default_value_t = 4096)]
    pub listen_backlog: u32,

    /// Bearer token for the admin endpoints (creating events). Unset: they answer 403.
    #[arg(long, env = "ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,

    /// Key that verifies buyer tokens (JWT in `Authorization: Bearer`): an HS256
    /// secret of at least 32 bytes, or a PEM public key (EC P-256 for ES256, RSA for
    /// RS256). Tokens need `sub` and `exp`. Unset: events cannot have `maxPerBuyer`.
    #[arg(long, env = "BOXOFFICE_BUYER_JWT_KEY", hide_env_values = true)]
    pub buyer_jwt_key: Option<String>,

    /// Key that signs admission tokens of queued events (HS256, at least 32 bytes).
    /// Unset: events cannot be queued.
    #[arg(long, env = "BOXOFFICE_ADMISSION_KEY", hide_env_values = true)]
    pub admission_key: Option<String>,

    /// The admission key before the current one, still accepted (not used to sign):
    /// set it to the old key when rotating, for one admission lifetime.
    #[arg(long, env = "BOXOFFICE_ADMISSION_KEY_PREVIOUS", hide_env_values = true)]
    pub admission_key_previous: Option<String>,

    /// Longest a buyer in a waiting room is told to wait between polls, in ms (at
    /// least 1000). Buyers far from the front poll this often: it bounds the poll
    /// rate of a long queue at about (buyers waiting) / this.
    #[arg(long, env = "BOXOFFICE_QUEUE_POLL_MAX_MS", default_value_t = 30_000)]
    pub queue_poll_max_ms: u64,

    /// Longest hold an event may set (`holdSeconds`), in seconds (1 to 86400).
    #[arg(
        long,
        env = "BOXOFFICE_MAX_HOLD_SECONDS",
        default_value_t = 3600,
        value_parser = clap::value_parser!(u32).range(1..=i64::from(MAX_HOLD_SECONDS))
    )]
    pub max_hold_seconds: u32,

    /// Milliseconds between sweeps that return expired holds of events no request
    /// comes for (requests return them first anyway). 0: no sweeper.
    #[arg(long, env = "BOXOFFICE_HOLD_SWEEP_MS", default_value_t = 250)]
    pub hold_sweep_ms: u64,

    /// Largest request body accepted, in bytes; larger ones get 413.
    #[arg(long, env = "BOXOFFICE_BODY_LIMIT", default_value_t = 16 * 1024)]
    pub body_limit: usize,

    /// Largest request line plus headers, in bytes (at least 8192); larger get 431.
    #[arg(
        long,
        env = "BOXOFFICE_MAX_HEADER_BYTES",
        default_value_t = 16 * 1024,
        value_parser = clap::value_parser!(u32).range(crate::server::MIN_HEADER_BYTES as i64..)
    )]
    pub max_header_bytes: u32,

    /// Milliseconds a client has to send a request's headers (and to start the next
    /// request on a kept-alive connection); slower connections are closed.
    #[arg(long, env = "BOXOFFICE_HEADER_TIMEOUT_MS", default_value_t = 10_000)]
    pub header_timeout_ms: u64,

    /// Milliseconds from the headers of a request with a body to its response, the
    /// upload included; slower requests get 408.
    #[arg(long, env = "BOXOFFICE_REQUEST_TIMEOUT_MS", default_value_t = 10_000)]
    pub request_timeout_ms: u64,

    /// Open connections at most; further ones wait in the accept queue.
    #[arg(long, env = "BOXOFFICE_MAX_CONNECTIONS", default_value_t = 10_000)]
    pub max_connections: usize,

    /// Milliseconds an answer may wait for the client to take any of it (a client
    /// that sends requests and never reads the answers); then the connection is
    /// closed.
    #[arg(long, env = "BOXOFFICE_WRITE_TIMEOUT_MS", default_value_t = 10_000)]
    pub write_timeout_ms: u64,

    #[command(flatten)]
    pub rate_limits: RateLimitConfig,

    /// Origins allowed to call the API from a browser (comma-separated, e.g.
    /// `https://shop.example`). Unset: no CORS headers, browsers refuse other origins.
    #[arg(long, env = "BOXOFFICE_CORS_ORIGINS", value_delimiter = ',')]
    pub cors_origins: Vec<String>,

    /// Milliseconds between SIGTERM and closing the listener. Readiness reports 503
    /// at once and requests keep being served, so load balancers stop sending new
    /// requests before connections are refused.
    #[arg(long, env = "BOXOFFICE_SHUTDOWN_DRAIN_MS", default_value_t = 2000)]
    pub shutdown_drain_ms: u64,

    /// Run the stream consumer inside this process (`false` when a separate
    /// `boxoffice worker` does it).
    #[arg(long, env = "BOXOFFICE_CONSUMER", default_value_t = true, action = clap::ArgAction::Set)]
    pub consumer: bool,

    /// Name of the event created when the database has none.
    #[arg(
        long,
        env = "BOXOFFICE_DEFAULT_EVENT_NAME",
        default_value = "Default event"
    )]
    pub default_event_name: String,

    /// Seats of the event created when the database has none.
    #[arg(
        long,
        env = "BOXOFFICE_DEFAULT_EVENT_SEATS",
        default_value_t = 5000,
        value_parser = clap::value_parser!(i32).range(1..=i64::from(MAX_SEATS))
    )]
    pub default_event_seats: i32,

    /// Milliseconds between checks of which Redis server answers. A new one (restart,
    /// restore, failover) has every event checked against PostgreSQL at once rather
    /// than at each event's next request. 0: only at the next request, and not at
    /// startup either.
    #[arg(long, env = "BOXOFFICE_REDIS_WATCH_MS", default_value_t = 1000)]
    pub redis_watch_ms: u64,

    /// Accept an `ADMIN_TOKEN` shorter than 32 bytes and the example secrets of the
    /// shipped files, with a warning at every start. For a laptop, never for a
    /// deployment.
    #[arg(
        long,
        env = "BOXOFFICE_INSECURE_DEV",
        default_value_t = false,
        action = clap::ArgAction::Set,
        value_parser = clap::builder::BoolishValueParser::new()
    )]
    pub insecure_dev: bool,
}

/// The shortest admin token accepted (as the HS256 keys: 32 bytes).
pub const MIN_SECRET_BYTES: usize = 32;

/// Secrets everyone can read: the example values of `k8s/secret.yaml` (a unit test
/// keeps this list and that file together) and of the docs' examples (which start
/// the server with `BOXOFFICE_INSECURE_DEV=1`), and anything that still says to
/// change it.
const EXAMPLE_SECRETS: &[&str] = &[
    "change-me-too",
    "change-me-to-a-secret-of-32-bytes-or-more",
    "change-me-to-another-secret-of-32-bytes",
    "dev-admin-token-for-this-laptop-only",
    "a-buyer-key-of-at-least-32-bytes!!",
    "an-admission-key-of-at-least-32-bytes",
];

/// Why `value`, the secret of `setting`, must not be used; `None` when it may.
fn weak_secret(setting: &str, value: &str, min_bytes: usize) -> Option<String> {
    if EXAMPLE_SECRETS.contains(&value) || value.to_ascii_lowercase().contains("change-me") {
        return Some(format!(
            "{setting} is an example value from the documentation or the shipped files: \
             anyone can read it; set a secret of your own (e.g. `openssl rand -hex 32`)"
        ));
    }
    (value.len() < min_bytes).then(|| {
        format!(
            "{setting} is {} bytes: use at least {min_bytes} (e.g. `openssl rand -hex 32`)",
            value.len()
        )
    })
}

/// A secret as configured; set but empty (`ADMIN_TOKEN=`) means unset.
fn secret(value: &Option<String>) -> Option<&str> {
    value.as_deref().filter(|v| !v.is_empty())
}

impl ServeConfig {
    /// Refuses an admin token shorter than [`MIN_SECRET_BYTES`] and the known example
    /// secrets (the keys' own length rules are checked where they are read), unless
    /// `BOXOFFICE_INSECURE_DEV` is set, which logs a warning instead.
    pub fn check_secrets(&self) -> crate::Result<()> {
        let keys = [
            ("BOXOFFICE_BUYER_JWT_KEY", self.buyer_jwt_key()),
            ("BOXOFFICE_ADMISSION_KEY", secret(&self.admission_key)),
            (
                "BOXOFFICE_ADMISSION_KEY_PREVIOUS",
                secret(&self.admission_key_previous),
            ),
        ];
        let admin = self
            .admin_token()
            .and_then(|token| weak_secret("ADMIN_TOKEN", token, MIN_SECRET_BYTES));
        let weak: Vec<String> = admin
            .into_iter()
            .chain(keys.into_iter().filter_map(|(setting, value)| {
                // A PEM public key is not a secret; its length says nothing.
                weak_secret(setting, value?, 0)
            }))
            .collect();
        if weak.is_empty() {
            return Ok(());
        }
        if self.insecure_dev {
            for why in &weak {
                tracing::warn!("BOXOFFICE_INSECURE_DEV is set, so this is accepted: {why}");
            }
            return Ok(());
        }
        Err(crate::Error::Startup(format!(
            "{} (BOXOFFICE_INSECURE_DEV=1 accepts it on a laptop)",
            weak.join("; ")
        )))
    }

    /// The admin token, if one is set.
    pub fn admin_token(&self) -> Option<&str> {
        secret(&self.admin_token)
    }

    /// The key that verifies buyer tokens, if one is set.
    pub fn buyer_jwt_key(&self) -> Option<&str> {
        secret(&self.buyer_jwt_key)
    }

    /// The admission key and the one before it, if set.
    pub fn admission_keys(&self) -> Option<(&str, Option<&str>)> {
        Some((
            secret(&self.admission_key)?,
            secret(&self.admission_key_previous),
        ))
    }

    /// The browser origins allowed by CORS; `BOXOFFICE_CORS_ORIGINS=` (empty) is
    /// off, like unset.
    pub fn cors_origins(&self) -> Vec<String> {
        self.cors_origins
            .iter()
            .map(|o| o.trim().to_owned())
            .filter(|o| !o.is_empty())
            .collect()
    }

    /// How often the Redis server is checked; `None` when the watcher is off.
    pub fn redis_watch(&self) -> Option<Duration> {
        (self.redis_watch_ms > 0).then(|| Duration::from_millis(self.redis_watch_ms))
    }

    /// How often expired holds are swept; `None` when the sweeper is off.
    pub fn hold_sweep(&self) -> Option<Duration> {
        (self.hold_sweep_ms > 0).then(|| Duration::from_millis(self.hold_sweep_ms))
    }

    pub fn limits(&self) -> crate::server::Limits {
        crate::server::Limits {
            max_connections: self.max_connections.max(1),
            header_timeout: Duration::from_millis(self.header_timeout_ms),
            max_header_bytes: self.max_header_bytes as usize,
            write_timeout: Duration::from_millis(self.write_timeout_ms.max(1)),
        }
    }
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// JSON when stdout is not a terminal, pretty otherwise.
    Auto,
    Json,
    Pretty,
}

/// Settings every subcommand shares.
#[derive(Debug, Clone, Args)]
pub struct CommonConfig {
    #[command(flatten)]
    pub store: StoreConfig,

    /// Name of this process in the consumer group, stats and logs. Must be unique per
    /// replica; in Kubernetes, set it to the pod name.
    #[arg(long, env = "BOXOFFICE_INSTANCE_ID")]
    pub instance_id: Option<String>,

    /// Log format.
    #[arg(long, env = "BOXOFFICE_LOG_FORMAT", value_enum, default_value_t = LogFormat::Auto)]
    pub log_format: LogFormat,
}

impl CommonConfig {
    /// The configured instance id, or the host name with a random suffix (several
    /// processes on one host must not share a consumer name).
    pub fn instance_id(&self) -> String {
        self.instance_id.clone().unwrap_or_else(|| {
            let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "boxoffice".into());
            let suffix = uuid::Uuid::new_v4().simple().to_string();
            format!("{host}-{}", &suffix[..8])
        })
    }
}

#[cfg(test)]
mod tests;
