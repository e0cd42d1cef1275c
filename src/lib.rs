//! boxoffice sells seats to a flash crowd without overselling, without selling twice
//! for one retried request, and without losing a confirmed sale.
//!
//! # Layout
//!
//! * [`api`]: the HTTP surface (poem-openapi): operations, error mapping, middleware.
//! * [`gate`]: the seat engine. One Lua script in Redis (`lua/purchase.lua`) decides
//!   each seat movement (purchase, hold, confirm, release, expiry, cancellation)
//!   atomically and appends it to the event's stream; the gate runs it, batches
//!   purchases of one event into one call, sweeps expired holds, and recovers an
//!   event whose Redis state is gone or unchecked ([`gate::recovery`]: why a retried
//!   request is never sold twice whatever Redis lost).
//! * [`buyer`]: buyer identity, from a verified JWT.
//! * [`queue`]: the waiting room of queued events: fair order, admission at a rate,
//!   admission tokens.
//! * [`persist`]: the stream consumer that writes sales to PostgreSQL.
//! * [`db`]: PostgreSQL connection, migrations and queries.
//! * [`reconcile`]: checks Redis' counters and records against PostgreSQL and the streams.
//! * [`records`]: the idempotency record and stream entry formats the scripts write.
//! * [`keys`]: Redis key names.
//! * [`store`]: the connection to Redis, one server or a cluster.
//! * [`domain`]: validated values (`IdempotencyKey`, `Quantity`, `Seats`) and limits.
//! * [`metrics`]: every Prometheus series.
//! * [`config`], [`telemetry`], [`startup`], [`server`], [`cli`]: configuration,
//!   logging, wiring, the HTTP server and the command line.

/// The code of a script of `lua/` with `lua/prelude.lua`, the helpers scripts share,
/// in front.
macro_rules! lua_code {
    ($file:literal) => {
        concat!(
            include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/lua/prelude.lua")),
            include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/lua/", $file))
        )
    };
}
pub(crate) use lua_code;

/// [`lua_code!`] as a `redis::Script`.
macro_rules! lua_script {
    ($file:literal) => {
        ::redis::Script::new(crate::lua_code!($file))
    };
}
pub(crate) use lua_script;

pub mod api;
pub mod buyer;
pub mod cli;
pub mod config;
pub mod db;
pub mod domain;
pub mod error;
pub mod gate;
pub mod keys;
pub mod metrics;
pub mod persist;
pub mod queue;
pub mod reconcile;
pub mod records;
pub mod server;
pub mod startup;
pub mod store;
pub mod telemetry;

pub use error::{Error, Result};
