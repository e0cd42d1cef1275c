//! Test harness: finds Redis and PostgreSQL, gives every test its own database and
//! Redis key prefix, and starts app instances on random ports.
//!
//! Services, in order: `BOXOFFICE_TEST_REDIS_URL` / `BOXOFFICE_TEST_DATABASE_URL`; the
//! local defaults when they answer; containers started with testcontainers, which
//! `BOXOFFICE_TEST_CONTAINERS=1` chooses even where local services answer.

mod app;
mod crowd;
mod env;
mod services;

pub use app::*;
pub use crowd::*;
pub use env::*;
pub use services::*;

use serde_json::json;

const LOCAL_REDIS: &str = "redis://127.0.0.1:6379";

const LOCAL_POSTGRES: &str = "postgres://postgres@127.0.0.1:5432";

pub const ADMIN_TOKEN: &str = "test-admin-token-of-32-bytes-or-more";

/// The key every test app verifies buyer tokens with (HS256).
pub const BUYER_JWT_KEY: &str = "test-buyer-key-of-at-least-32-bytes!";

/// A buyer token for `sub`, valid for a minute.
pub fn buyer_token(sub: &str) -> String {
    buyer_token_signed(sub, BUYER_JWT_KEY, 60)
}

/// A buyer token for `sub` signed with `key`, expiring `ttl` seconds from now
/// (negative: already expired).
pub fn buyer_token_signed(sub: &str, key: &str, ttl: i64) -> String {
    let exp = jsonwebtoken::get_current_timestamp() as i64 + ttl;
    jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &json!({ "sub": sub, "exp": exp }),
        &jsonwebtoken::EncodingKey::from_secret(key.as_bytes()).unwrap(),
    )
    .unwrap()
}
