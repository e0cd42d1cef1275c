//! boxoffice sells seats to a flash crowd without overselling, without selling twice
//! for one retried request, and without losing a confirmed sale.
//!
//! # Layout
//!
//! * [`api`]: the HTTP surface (poem-openapi): operations, error mapping, middleware.
//! * [`purchase`]: the gate. One Lua script in Redis (`lua/purchase.lua`) decides each
//!   sale atomically and appends it to the event's stream.
//! * [`persist`]: the stream consumer that writes sales to PostgreSQL.
//! * [`db`]: PostgreSQL connection, migrations and queries.
//! * [`reconcile`]: checks Redis' counters against PostgreSQL and the streams.
//! * [`keys`]: Redis key names.
//! * [`domain`]: validated values (`IdempotencyKey`, `Quantity`).
//! * [`config`], [`telemetry`], [`startup`], [`cli`]: configuration, logging, wiring and
//!   the command line.

pub mod api;
pub mod cli;
pub mod config;
pub mod db;
pub mod domain;
pub mod error;
pub mod keys;
pub mod persist;
pub mod purchase;
pub mod reconcile;
pub mod server;
pub mod startup;
pub mod telemetry;

pub use error::{Error, Result};
