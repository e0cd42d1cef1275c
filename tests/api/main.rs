//! Integration tests: real HTTP against app instances backed by real Redis and
//! PostgreSQL (see `harness` for how they are found and isolated).

mod batch;
mod buyers;
mod cancel;
mod cluster;
mod concurrency;
mod errors;
mod events;
mod faults;
mod flood;
mod harness;
mod holds;
mod idempotency;
mod limits;
mod logs;
mod memory;
mod model;
mod openapi;
mod ops;
mod persist;
mod processes;
mod purchase;
mod queue;
mod rate_limits;
mod reconcile;
mod records;
mod recovery;
mod redis_cluster;
