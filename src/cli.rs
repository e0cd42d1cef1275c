//! The command line: `boxoffice [serve]`, `worker`, `migrate`, `event create`, `openapi`.

use clap::{Args, Parser, Subcommand};
use tokio_util::sync::CancellationToken;

use crate::config::{CommonConfig, ConsumerConfig, ServeConfig};
use crate::db;
use crate::error::{Error, Result};
use crate::purchase::Gate;
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
    Serve(ServeArgs),
    /// Run only the stream consumer that writes sales to PostgreSQL.
    Worker(WorkerArgs),
    /// Create the database if needed, apply migrations and exit.
    Migrate(CommonConfig),
    /// Manage events.
    #[command(subcommand)]
    Event(EventCommand),
    /// Print the OpenAPI document.
    Openapi,
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
        #[arg(long, value_parser = clap::value_parser!(i32).range(1..=1_000_000))]
        seats: i32,
    },
}

impl Cli {
    pub async fn run(self) -> Result<()> {
        match self.command.unwrap_or(Command::Serve(self.serve)) {
            Command::Serve(args) => {
                telemetry::init(args.common.log_format);
                let app = Application::build(&args.common, &args.serve, &args.consumer).await?;
                let shutdown = app.shutdown_token();
                tokio::spawn(async move {
                    shutdown_signal().await;
                    tracing::info!("shutting down");
                    shutdown.cancel();
                });
                app.run_until_stopped().await
            }
            Command::Worker(args) => {
                telemetry::init(args.common.log_format);
                let block = std::time::Duration::from_millis(args.consumer.consumer_block_ms);
                let stores = Stores::connect(&args.common.store, block).await?;
                let shutdown = CancellationToken::new();
                let consumer = stores.consumer(args.common.instance_id(), &args.consumer);
                let running = tokio::spawn(consumer.run(shutdown.clone()));
                shutdown_signal().await;
                shutdown.cancel();
                running
                    .await
                    .map_err(|e| Error::Startup(format!("consumer task failed: {e}")))
            }
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
            }) => {
                telemetry::init(common.log_format);
                let stores = Stores::connect(&common.store, common.store.redis_timeout()).await?;
                let gate = Gate::connect(
                    &common.store.redis_url,
                    common.store.redis_timeout(),
                    stores.db.clone(),
                    stores.keys.clone(),
                    0,
                )
                .await?;
                let event = db::create_event(&stores.db, &name, seats).await?;
                gate.load(&event).await?;
                println!("{}", event.id);
                Ok(())
            }
            Command::Openapi => {
                println!("{}", crate::api::openapi_json());
                Ok(())
            }
        }
    }
}
