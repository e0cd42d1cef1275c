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

    /// A dependency is unreachable at startup; the message says how to fix it.
    #[error("{0}")]
    Startup(String),
}

impl Error {
    /// The same error again, for each request of a script call that failed. Only
    /// errors a script call returns are reproduced in kind; others by their message.
    pub fn duplicate(&self) -> Error {
        match self {
            Error::Redis(e) => Error::Redis(e.clone()),
            Error::RecoveryPending(m) => Error::RecoveryPending(m.clone()),
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

/// Hides the password of a connection URL so it can be logged or printed.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    match rest.rsplit_once('@') {
        Some((userinfo, host)) => {
            let user = userinfo.split(':').next().unwrap_or_default();
            if userinfo.contains(':') {
                format!("{scheme}://{user}:***@{host}")
            } else {
                format!("{scheme}://{user}@{host}")
            }
        }
        None => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::redact_url;

    #[test]
    fn redacts_passwords_only() {
        assert_eq!(redact_url("redis://:s3cret@r:6379"), "redis://:***@r:6379");
        assert_eq!(
            redact_url("postgres://app:pw@db/boxoffice"),
            "postgres://app:***@db/boxoffice"
        );
        assert_eq!(
            redact_url("postgres://postgres@db/x"),
            "postgres://postgres@db/x"
        );
        assert_eq!(redact_url("redis://127.0.0.1"), "redis://127.0.0.1");
    }
}
