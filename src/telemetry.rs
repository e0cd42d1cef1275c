//! Logs: one `tracing` subscriber for the whole process (metrics are in
//! [`crate::metrics`]).

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;

/// Filter used when `RUST_LOG` is unset: our own info lines, only warnings from the
/// libraries (sqlx logs every slow statement at info).
const DEFAULT_FILTER: &str = "info,sqlx=warn,poem=warn";

/// Installs the global subscriber, writing to standard error: standard output is
/// what commands print (`event create` its id, `openapi` the spec), so
/// `EVENT=$(boxoffice event create …)` captures the id alone. A second call (tests
/// start many apps in one process) leaves the first one in place.
pub fn init(format: LogFormat) {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(DEFAULT_FILTER));
    let json = match format {
        LogFormat::Json => true,
        LogFormat::Pretty => false,
        LogFormat::Auto => !std::io::stderr().is_terminal(),
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = if json {
        builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .try_init()
    } else {
        builder.try_init()
    };
}
