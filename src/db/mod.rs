//! PostgreSQL: connecting (creating the database when missing), migrations, the
//! event's lock that orders the consumer's writes against a recovery, and the few
//! queries the service runs, by table. Runtime-checked queries, so a build needs no
//! database.

use std::time::Duration;

use sqlx::migrate::MigrateDatabase;
use sqlx::postgres::{PgPool, PgPoolOptions};
use sqlx::{PgConnection, Postgres};
use uuid::Uuid;

use crate::error::{Error, Result, redact_url};

mod books;
mod events;
mod holds;
mod movements;
mod sales;

pub use books::*;
pub use events::*;
pub use holds::*;
pub use movements::write_movements;
pub use sales::*;

/// How long startup and requests wait for a PostgreSQL connection.
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(3);

/// Connects to PostgreSQL, creating the database if it does not exist, and migrates it.
pub async fn connect(url: &str, pool_size: u32) -> Result<PgPool> {
    let unreachable = |e: sqlx::Error| connect_error(url, e);
    if !Postgres::database_exists(url).await.map_err(unreachable)? {
        // Another replica may create it between our check and our CREATE.
        if let Err(e) = Postgres::create_database(url).await
            && !Postgres::database_exists(url).await.unwrap_or(false)
        {
            return Err(unreachable(e));
        }
        tracing::info!(url = %redact_url(url), "created database");
    }
    let pool = PgPoolOptions::new()
        .max_connections(pool_size)
        .acquire_timeout(ACQUIRE_TIMEOUT)
        .connect(url)
        .await
        .map_err(unreachable)?;
    sqlx::migrate!().run(&pool).await?;
    Ok(pool)
}

/// Why startup could not use PostgreSQL, with the advice that fits: a server that
/// answered and refused (a wrong role, password or database) needs another
/// DATABASE_URL, not to be started.
fn connect_error(url: &str, e: sqlx::Error) -> Error {
    let url = redact_url(url);
    Error::Startup(match &e {
        sqlx::Error::Database(refusal) => format!(
            "PostgreSQL at {url} refused: {}; check the user, password and database \
             name in DATABASE_URL (to create a missing database, the user needs CREATEDB \
             and access to the postgres database)",
            refusal.message()
        ),
        _ => format!("cannot reach PostgreSQL at {url} ({e}); start it or set DATABASE_URL"),
    })
}

/// The advisory lock that orders the writes of an event's log to PostgreSQL
/// against its recoveries (`persist` takes it shared for each batch, `recovery`
/// exclusively while it reads and rebuilds): a key derived from the event id.
pub fn event_lock(event: Uuid) -> i64 {
    let (high, low) = event.as_u64_pair();
    (high ^ low) as i64
}

/// Takes the shared lock of [`event_lock`] in `tx`, until it ends.
pub async fn lock_event_shared(tx: &mut PgConnection, event: Uuid) -> Result<()> {
    sqlx::query("SELECT pg_advisory_xact_lock_shared($1)")
        .bind(event_lock(event))
        .execute(tx)
        .await?;
    Ok(())
}

/// Takes the shared lock of [`event_lock`] of every one of `events` in `tx`, until
/// it ends, if none has to be waited for; returns whether all were taken. (Those
/// taken when one was not are let go with the transaction, which then rolls back.)
pub async fn try_lock_events_shared(tx: &mut PgConnection, events: &[Uuid]) -> Result<bool> {
    let locks: Vec<i64> = events.iter().map(|event| event_lock(*event)).collect();
    let all: Option<bool> = sqlx::query_scalar(
        "SELECT bool_and(pg_try_advisory_xact_lock_shared(k)) FROM UNNEST($1::int8[]) AS k",
    )
    .bind(&locks)
    .fetch_one(tx)
    .await?;
    Ok(all.unwrap_or(true))
}

/// Whether `e` is PostgreSQL giving up on a lock after `lock_timeout` (SQLSTATE 55P03).
pub fn lock_not_available(e: &Error) -> bool {
    matches!(e, Error::Db(sqlx::Error::Database(e)) if e.code().as_deref() == Some("55P03"))
}

/// Takes the exclusive lock of [`event_lock`] in `tx`, until it ends: it waits for
/// every batch being written for the event, and holds off the next ones.
pub async fn lock_event(tx: &mut PgConnection, event: Uuid) -> Result<()> {
    sqlx::query("SELECT pg_advisory_xact_lock($1)")
        .bind(event_lock(event))
        .execute(tx)
        .await?;
    Ok(())
}

/// SQLSTATE of a row that references one that is not there (a sale of an event
/// PostgreSQL has no row for).
pub const FOREIGN_KEY_VIOLATION: &str = "23503";

/// The SQLSTATE of an error by which PostgreSQL refused a write because of what was
/// written, so that writing it again can never succeed: class 22 (data exception,
/// e.g. a value out of range) or 23 (integrity constraint violation, e.g. a sale of
/// an event it does not have). `None` for anything else (connection lost, server
/// shutting down), which may pass next time.
pub fn refused_for_good(e: &Error) -> Option<String> {
    match e {
        Error::Db(sqlx::Error::Database(e)) => e
            .code()
            .filter(|code| code.starts_with("22") || code.starts_with("23"))
            .map(|code| code.into_owned()),
        _ => None,
    }
}

/// Sets `column` of rows in `table`, each named by its event and id, to its time
/// (Unix µs), where it is not set yet: a row already marked keeps its first time, so the write
/// can be retried freely. Returns how many rows changed.
async fn mark_once<'c>(
    db: impl sqlx::PgExecutor<'c>,
    table: &'static str,
    column: &'static str,
    marks: impl Iterator<Item = (Uuid, Uuid, i64)>,
) -> Result<u64> {
    let (mut events, mut ids, mut at) = (Vec::new(), Vec::new(), Vec::new());
    for (event, id, micros) in marks {
        events.push(event);
        ids.push(id);
        at.push(micros);
    }
    let done = sqlx::query(sqlx::AssertSqlSafe(format!(
        "UPDATE {table} t
         SET {column} = timestamptz 'epoch' + m.micros * interval '1 microsecond'
         FROM UNNEST($1::uuid[], $2::uuid[], $3::int8[]) AS m(event, id, micros)
         WHERE t.event_id = m.event AND t.id = m.id AND t.{column} IS NULL"
    )))
    .bind(&events)
    .bind(&ids)
    .bind(&at)
    .execute(db)
    .await?;
    Ok(done.rows_affected())
}
