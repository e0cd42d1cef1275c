//! The command line: `boxoffice [serve]`, `worker`, `migrate`, `event create`, `openapi`.

use clap::{Args, Parser, Subcommand};
use tokio_util::sync::CancellationToken;

use crate::config::{CommonConfig, ConsumerConfig, ServeConfig};
use crate::db;
use crate::domain::Seats;
use crate::error::{Error, Result};
use crate::gate::Gate;
use crate::startup::{Application, Stores, shutdown_signal};
use crate::telemetry;

#[derive(Debug, Parser)]
#[command(
    name = "boxoffice",
    version,
    about,
    args_conflicts_with_subcommands = true
)]
pub struct Cli {
    #[command(subcommand)]
    command: Option<Command>,

    /// With no subcommand: `serve`.
    #[command(flatten)]
    serve: ServeArgs,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve the HTTP API (and, unless disabled, run the stream consumer). The default.
    Serve(Box<ServeArgs>),
    /// Run only the stream consumer that writes sales to PostgreSQL.
    Worker(WorkerArgs),
    /// Create the database if needed, apply migrations and exit.
    Migrate(CommonConfig),
    /// Manage events.
    #[command(subcommand)]
    Event(EventCommand),
    /// Compare each event in Redis with PostgreSQL and the streams (seats sold,
    /// idempotency records, parked sales); exit 1 on drift.
    Reconcile {
        #[command(flatten)]
        common: CommonConfig,
        /// Repair what drifted: send parked sales back to the stream, and bring an
        /// event that is behind or lacks records back through the recovery, which sets
        /// its state to what PostgreSQL and the streams hold. An event whose Redis
        /// counts more than they hold (rows missing) is reported, not changed.
        #[arg(long)]
        fix: bool,
    },
    /// Print the OpenAPI document.
    Openapi,
    /// Exit 0 if the local server answers `GET /health/live` (for container HEALTHCHECKs,
    /// which have no curl in the image).
    Healthcheck {
        /// Address of the server to check.
        #[arg(long, env = "BOXOFFICE_LISTEN", default_value = "127.0.0.1:3000")]
        listen: std::net::SocketAddr,
    },
}

#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub common: CommonConfig,
    #[command(flatten)]
    pub serve: ServeConfig,
    #[command(flatten)]
    pub consumer: ConsumerConfig,
}

#[derive(Debug, Args)]
struct WorkerArgs {
    #[command(flatten)]
    common: CommonConfig,
    /// Address of the worker's `/metrics` and `/health/*` endpoints.
    #[arg(long, env = "BOXOFFICE_WORKER_LISTEN", default_value = "0.0.0.0:3001")]
    listen: std::net::SocketAddr,
    #[command(flatten)]
    consumer: ConsumerConfig,
}

#[derive(Debug, Subcommand)]
enum EventCommand {
    /// Create an event and print its id.
    Create {
        #[command(flatten)]
        common: CommonConfig,
        /// Name of the event.
        #[arg(long)]
        name: String,
        /// Number of seats.
        #[arg(long)]
        seats: Seats,
        /// How long a hold of this event lasts, in seconds.
        #[arg(long, default_value_t = crate::domain::DEFAULT_HOLD_SECONDS,
              value_parser = clap::value_parser!(u32).range(1..=i64::from(crate::domain::MAX_HOLD_SECONDS)))]
        hold_seconds: u32,
        /// Most seats one buyer may have (needs buyer tokens on the servers). Unset:
        /// no limit.
        #[arg(long, value_parser = clap::value_parser!(u32).range(1..=i64::from(crate::domain::MAX_SEATS)))]
        max_per_buyer: Option<u32>,
    },
}

impl Cli {
    pub async fn run(self) -> Result<()> {
        match self.command.unwrap_or(Command::Serve(Box::new(self.serve))) {
            Command::Serve(args) => serve(*args).await,
            Command::Worker(args) => worker(args).await,
            Command::Migrate(common) => {
                telemetry::init(common.log_format);
                db::connect(&common.store.database_url, 1).await?;
                tracing::info!("database is migrated");
                Ok(())
            }
            Command::Event(EventCommand::Create {
                common,
                name,
                seats,
                hold_seconds,
                max_per_buyer,
            }) => {
                let settings = db::EventSettings {
                    seats,
                    hold_seconds,
                    max_per_buyer,
                    queue: None,
                };
                create_event(&common, &name, settings).await
            }
            Command::Reconcile { common, fix } => reconcile(&common, fix).await,
            Command::Openapi => {
                println!("{}", crate::api::openapi_json());
                Ok(())
            }
            Command::Healthcheck { listen } => healthcheck(listen).await,
        }
    }
}

/// `boxoffice serve`: the API and, unless disabled, the consumer, until SIGTERM
/// (then drained, see `startup`).
async fn serve(args: ServeArgs) -> Result<()> {
    telemetry::init(args.common.log_format);
    let app = Application::build(&args.common, &args.serve, &args.consumer).await?;
    let shutdown = app.shutdown_handle();
    let drain = std::time::Duration::from_millis(args.serve.shutdown_drain_ms);
    tokio::spawn(async move {
        shutdown_signal().await;
        shutdown.drain_and_stop(drain).await;
    });
    app.run_until_stopped().await
}

/// `boxoffice worker`: the consumer alone, with its metrics and probes.
async fn worker(args: WorkerArgs) -> Result<()> {
    telemetry::init(args.common.log_format);
    let block = std::time::Duration::from_millis(args.consumer.consumer_block_ms);
    let stores = Stores::connect(&args.common.store, block).await?;
    let shutdown = CancellationToken::new();
    let instance_id = args.common.instance_id();
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .map_err(|e| crate::startup::listen_error(args.listen, "BOXOFFICE_WORKER_LISTEN", &e))?;
    tracing::info!(listen = %args.listen, "worker metrics and health probes");
    let probes = crate::api::worker::routes(crate::api::worker::WorkerState {
        redis: stores.redis.clone(),
        db: stores.db.clone(),
        instance_id: instance_id.clone(),
        started: std::time::Instant::now(),
        metrics: crate::metrics::install(),
    });
    let serving = tokio::spawn(crate::server::serve(
        listener,
        probes,
        crate::server::Limits {
            max_connections: 64,
            header_timeout: std::time::Duration::from_secs(5),
            max_header_bytes: crate::server::MIN_HEADER_BYTES,
            write_timeout: std::time::Duration::from_secs(5),
        },
        shutdown.clone(),
        std::time::Duration::from_secs(1),
    ));
    let consumer = stores.consumer(instance_id, &args.consumer);
    let running = tokio::spawn(consumer.run(shutdown.clone()));
    shutdown_signal().await;
    shutdown.cancel();
    let _ = serving.await;
    running
        .await
        .map_err(|e| Error::Startup(format!("consumer task failed: {e}")))
}

/// `boxoffice event create`: the id on standard output, alone (logs go to standard
/// error), so that `EVENT=$(boxoffice event create …)` captures it.
async fn create_event(
    common: &CommonConfig,
    name: &str,
    settings: db::EventSettings,
) -> Result<()> {
    telemetry::init(common.log_format);
    let (stores, gate) = connect(common).await?;
    let event = gate.create_event(&stores.db, name, settings).await?;
    println!("{}", event.id);
    Ok(())
}

/// `boxoffice reconcile`: prints the table; drift is an error (exit 1).
async fn reconcile(common: &CommonConfig, fix: bool) -> Result<()> {
    telemetry::init(common.log_format);
    let (stores, gate) = connect(common).await?;
    let rows = crate::reconcile::run(&stores, gate.recovery(), fix).await?;
    print!("{}", crate::reconcile::table(&rows));
    match rows.iter().filter(|r| r.status().is_drift()).count() {
        0 => Ok(()),
        n => Err(Error::Drift(n)),
    }
}

/// Both stores and the gate, for one-shot commands.
async fn connect(common: &CommonConfig) -> Result<(Stores, Gate)> {
    let timeout = common.store.redis_timeout();
    let stores = Stores::connect(&common.store, timeout).await?;
    let gate = Gate::connect(&common.store, stores.db.clone()).await?;
    Ok((stores, gate))
}

/// `GET /health/live` on the local server; any answer but 200 within 2 s is a failure.
async fn healthcheck(listen: std::net::SocketAddr) -> Result<()> {
    use http_body_util::Empty;
    use hyper_util::rt::TokioIo;

    let addr = if listen.ip().is_unspecified() {
        std::net::SocketAddr::from(([127, 0, 0, 1], listen.port()))
    } else {
        listen
    };
    let fail = |e: String| Error::Startup(format!("healthcheck of {addr} failed: {e}"));
    let check = async {
        let stream = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| e.to_string())?;
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| e.to_string())?;
        tokio::spawn(connection);
        let request = hyper::Request::get("/health/live")
            .header("host", addr.to_string())
            .body(Empty::<bytes::Bytes>::new())
            .map_err(|e| e.to_string())?;
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| e.to_string())?;
        match response.status() {
            hyper::StatusCode::OK => Ok(()),
            status => Err(format!("status {status}")),
        }
    };
    tokio::time::timeout(std::time::Duration::from_secs(2), check)
        .await
        .map_err(|_| fail("no answer within 2 s".into()))?
        .map_err(fail)
}
