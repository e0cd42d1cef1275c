//! The crate's error type. HTTP status codes are assigned to these in one place,
//! `api::error`.

use uuid::Uuid;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),

    #[error("redis pool: {0}")]
    RedisPool(#[from] deadpool_redis::PoolError),

    #[error("postgres: {0}")]
    Db(#[from] sqlx::Error),

    #[error("postgres migration: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),

    #[error("event {0} does not exist")]
    EventNotFound(Uuid),

    /// The purchase script answered something this build does not understand: a script
    /// and binary from different versions, or a key written by something else.
    #[error("unexpected reply from Redis: {0}")]
    UnexpectedReply(String),

    /// The gate refused a seat movement that would break one of its invariants
    /// (`sold + held <= total`): counters that recovery should have set right. Nothing
    /// was done; a bug to report.
    #[error("the gate refused to break an invariant of event {0}")]
    InvariantBroken(Uuid),

    /// `reconcile` found events whose counters disagree.
    #[error("{0} event(s) drifted; see the table above")]
    Drift(usize),

    /// Redis lost its purchase script and could not be checked against PostgreSQL a
    /// moment ago; no sale is made until it can be (see `Gate::recover`).
    #[error("Redis awaits recovery, which just failed: {0}")]
    RecoveryPending(String),

    /// Redis is fuller than `BOXOFFICE_REDIS_MEMORY_SHARE` of its `maxmemory`: new
    /// purchases and holds without a buyer token wait, and past halfway to the limit
    /// those with one too (see `gate::memory`).
    #[error("Redis is nearly full ({used} of {max} bytes of maxmemory)")]
    RedisNearlyFull { used: u64, max: u64 },

    /// Fewer replicas of Redis than `BOXOFFICE_REDIS_REPLICA_ACKS` had a seat movement
    /// in time: it was made, and a retry replays it once they have it.
    #[error("only {acked} of {wanted} Redis replicas acknowledged the write in time")]
    ReplicasBehind { acked: i64, wanted: u8 },

    /// A dependency is unreachable at startup; the message says how to fix it.
    #[error("{0}")]
    Startup(String),
}

/// A reply of another shape than the command has: a server of another version, or a
/// key written by something else.
impl From<redis::ParsingError> for Error {
    fn from(e: redis::ParsingError) -> Self {
        Error::UnexpectedReply(e.to_string())
    }
}

impl Error {
    /// The same error again, for each request of a script call that failed. Only
    /// errors a script call returns are reproduced in kind; others by their message.
    pub fn duplicate(&self) -> Error {
        match self {
            Error::Redis(e) => Error::Redis(e.clone()),
            Error::RecoveryPending(m) => Error::RecoveryPending(m.clone()),
            Error::ReplicasBehind { acked, wanted } => Error::ReplicasBehind {
                acked: *acked,
                wanted: *wanted,
            },
            other => Error::UnexpectedReply(other.to_string()),
        }
    }

    /// Whether the error means a dependency is down or overloaded (worth retrying),
    /// as opposed to a bug.
    pub fn is_unavailable(&self) -> bool {
        match self {
            Error::Redis(_)
            | Error::RedisPool(_)
            | Error::RecoveryPending(_)
            | Error::RedisNearlyFull { .. }
            | Error::ReplicasBehind { .. }
            | Error::Startup(_) => true,
            Error::Db(sqlx::Error::Database(e)) => {
                // SQLSTATE classes 08 (connection exception) and 57 (operator
                // intervention: shutting down, starting up, terminated connection).
                e.code()
                    .is_some_and(|code| code.starts_with("08") || code.starts_with("57"))
            }
            Error::Db(e) => matches!(
                e,
                sqlx::Error::Io(_)
                    | sqlx::Error::PoolTimedOut
                    | sqlx::Error::PoolClosed
                    | sqlx::Error::Tls(_)
            ),
            _ => false,
        }
    }
}

/// Hides the passwords of a connection URL so it can be logged or printed: the one
/// in the userinfo (`user:pw@`) and query parameters that carry one (PostgreSQL's
/// `password` and `sslpassword`, redis-rs' `pass` and `password` of unix sockets),
/// their names percent-decoded as the drivers read them. What cannot be parsed is
/// not shown at all (a password may be what breaks it); libpq's `key=value` form
/// has its `password` hidden.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, _)) = url.split_once("://") else {
        return redact_keywords(url);
    };
    let Ok(mut parsed) = url::Url::parse(url) else {
        return format!("{scheme}://(a URL that does not parse; not shown)");
    };
    if parsed.password().is_some() {
        let _ = parsed.set_password(Some("***"));
    }
    if let Some(query) = parsed.query() {
        let redacted = query
            .split('&')
            .map(|param| match param.split_once('=') {
                Some((name, _)) if secret_parameter(name) => format!("{name}=***"),
                _ => param.to_owned(),
            })
            .collect::<Vec<_>>()
            .join("&");
        parsed.set_query(Some(&redacted));
    }
    parsed.to_string()
}

/// Whether a query parameter (or libpq keyword) carries a password.
fn secret_parameter(name: &str) -> bool {
    let name: String = url::form_urlencoded::parse(name.as_bytes())
        .map(|(decoded, _)| decoded.into_owned())
        .collect();
    let name = name.to_ascii_lowercase();
    name.contains("pass") && name != "passfile"
}

/// libpq's `host=db user=app password=secret` form.
fn redact_keywords(conninfo: &str) -> String {
    conninfo
        .split_whitespace()
        .map(|pair| match pair.split_once('=') {
            Some((name, _)) if secret_parameter(name) => format!("{name}=***"),
            _ => pair.to_owned(),
        })
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::redact_url;

    #[test]
    fn a_password_in_the_userinfo_is_hidden() {
        assert_eq!(redact_url("redis://:s3cret@r:6379"), "redis://:***@r:6379");
        assert_eq!(
            redact_url("rediss://default:s3cret@r:6380/2"),
            "rediss://default:***@r:6380/2"
        );
        assert_eq!(
            redact_url("postgres://app:pw@db/boxoffice"),
            "postgres://app:***@db/boxoffice"
        );
        // An `@` in the password, unencoded: everything before the last one is hidden.
        assert_eq!(
            redact_url("postgresql://app:p@ss@db:5432/x?sslmode=require"),
            "postgresql://app:***@db:5432/x?sslmode=require"
        );
    }

    #[test]
    fn a_password_in_the_query_is_hidden() {
        assert_eq!(
            redact_url("postgres://app@db/boxoffice?password=s3cret"),
            "postgres://app@db/boxoffice?password=***"
        );
        assert_eq!(
            redact_url(
                "postgres:///boxoffice?host=/run/pg&user=app&password=s3cret&sslmode=disable"
            ),
            "postgres:///boxoffice?host=/run/pg&user=app&password=***&sslmode=disable"
        );
        assert_eq!(
            redact_url("postgres://db/x?sslcert=c.pem&sslpassword=k3y"),
            "postgres://db/x?sslcert=c.pem&sslpassword=***"
        );
        assert_eq!(
            redact_url("redis+unix:///run/redis.sock?db=1&user=app&pass=s3cret"),
            "redis+unix:///run/redis.sock?db=1&user=app&pass=***"
        );
        assert_eq!(
            redact_url("unix:///run/redis.sock?PASSWORD=s3cret"),
            "unix:///run/redis.sock?PASSWORD=***"
        );
        assert_eq!(
            redact_url("postgres://db/x?%70assword=s3cret"),
            "postgres://db/x?%70assword=***"
        );
        // Both forms at once.
        assert_eq!(
            redact_url("postgres://app:a@db/x?password=b"),
            "postgres://app:***@db/x?password=***"
        );
    }

    #[test]
    fn urls_without_a_password_are_kept() {
        assert_eq!(
            redact_url("postgres://postgres@db/x"),
            "postgres://postgres@db/x"
        );
        assert_eq!(redact_url("redis://127.0.0.1"), "redis://127.0.0.1");
        assert_eq!(
            redact_url("postgres://db/x?passfile=/etc/pgpass&sslmode=verify-full"),
            "postgres://db/x?passfile=/etc/pgpass&sslmode=verify-full"
        );
        assert_eq!(redact_url("not a url"), "not a url");
    }

    #[test]
    fn what_does_not_parse_is_not_shown() {
        // A `?` in an unencoded password ends the authority early: no port parses.
        assert_eq!(
            redact_url("postgres://app:se?cret@db/x"),
            "postgres://(a URL that does not parse; not shown)"
        );
        assert_eq!(
            redact_url("host=db user=app password=hunter2 dbname=x"),
            "host=db user=app password=*** dbname=x"
        );
    }
}
