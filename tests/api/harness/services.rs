//! Where the tests find Redis and PostgreSQL: the variables, the local defaults, or
//! containers.

use std::time::Duration;

use sqlx::{Connection, PgConnection};
use tokio::sync::OnceCell;

use super::*;

/// Where the test services are: a Redis URL and a PostgreSQL server URL (no database).
pub(super) struct Services {
    pub(super) redis_url: String,
    pub(super) postgres_url: String,
}

pub(super) static SERVICES: OnceCell<Services> = OnceCell::const_new();

pub(super) async fn services() -> &'static Services {
    SERVICES.get_or_init(find_services).await
}

pub(super) async fn find_services() -> Services {
    if let (Ok(redis_url), Ok(postgres_url)) = (
        std::env::var("BOXOFFICE_TEST_REDIS_URL"),
        std::env::var("BOXOFFICE_TEST_DATABASE_URL"),
    ) {
        return Services {
            redis_url,
            postgres_url: postgres_url.trim_end_matches('/').to_owned(),
        };
    }
    let forced =
        std::env::var("BOXOFFICE_TEST_CONTAINERS").is_ok_and(|v| !v.is_empty() && v != "0");
    if !forced && redis_answers(LOCAL_REDIS).await && postgres_answers(LOCAL_POSTGRES).await {
        return Services {
            redis_url: LOCAL_REDIS.into(),
            postgres_url: LOCAL_POSTGRES.into(),
        };
    }
    containers::start().await
}

/// Whether a Redis answers PING at `url` within 2 s.
pub async fn redis_answers(url: &str) -> bool {
    let ping = async {
        let client = redis::Client::open(url).ok()?;
        let mut conn = client.get_multiplexed_async_connection().await.ok()?;
        redis::cmd("PING")
            .query_async::<String>(&mut conn)
            .await
            .ok()
    };
    matches!(
        tokio::time::timeout(Duration::from_secs(2), ping).await,
        Ok(Some(_))
    )
}

pub(super) async fn postgres_answers(server: &str) -> bool {
    let url = format!("{server}/postgres");
    matches!(
        tokio::time::timeout(Duration::from_secs(2), PgConnection::connect(&url)).await,
        Ok(Ok(_))
    )
}

pub(super) mod containers {
    use std::any::Any;
    use std::sync::Mutex;

    use testcontainers_modules::postgres::Postgres;
    use testcontainers_modules::redis::Redis;
    use testcontainers_modules::testcontainers::ImageExt;
    use testcontainers_modules::testcontainers::runners::AsyncRunner;

    use super::Services;

    /// The images docker-compose.yml runs, so the tests meet the same servers (the
    /// modules' defaults, Redis 5 and PostgreSQL 11, lack commands the service uses).
    const REDIS_TAG: &str = "7.2-alpine";
    const POSTGRES_TAG: &str = "16-alpine";

    /// The containers, kept until the test binary exits (see [`remove_at_exit`]).
    static RUNNING: Mutex<Vec<Box<dyn Any + Send>>> = Mutex::new(Vec::new());

    /// Starts one Redis and one PostgreSQL container for the whole test binary.
    pub async fn start() -> Services {
        let redis = Redis::default()
            .with_tag(REDIS_TAG)
            .start()
            .await
            .expect("no Redis at 127.0.0.1:6379 and Docker could not start one");
        let postgres = Postgres::default()
            .with_tag(POSTGRES_TAG)
            .start()
            .await
            .expect("no PostgreSQL at 127.0.0.1:5432 and Docker could not start one");
        let services = Services {
            redis_url: format!(
                "redis://{}:{}",
                redis.get_host().await.unwrap(),
                redis.get_host_port_ipv4(6379).await.unwrap()
            ),
            postgres_url: format!(
                "postgres://postgres:postgres@{}:{}",
                postgres.get_host().await.unwrap(),
                postgres.get_host_port_ipv4(5432).await.unwrap()
            ),
        };
        let mut running = RUNNING.lock().unwrap();
        running.push(Box::new(redis));
        running.push(Box::new(postgres));
        remove_at_exit();
        services
    }

    unsafe extern "C" {
        fn atexit(callback: extern "C" fn()) -> std::ffi::c_int;
    }

    /// Every test shares the containers, so none of them can own them, and statics
    /// are never dropped: the containers are removed when the process exits, by
    /// dropping them (testcontainers removes a container on drop) in a runtime of
    /// their own.
    fn remove_at_exit() {
        extern "C" fn remove() {
            let containers =
                std::mem::take(&mut *RUNNING.lock().unwrap_or_else(|e| e.into_inner()));
            if let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                runtime.block_on(async move { drop(containers) });
            }
        }
        static REGISTERED: std::sync::Once = std::sync::Once::new();
        // SAFETY: `remove` is a plain function that stays valid for the whole process.
        REGISTERED.call_once(|| unsafe {
            atexit(remove);
        });
    }
}
