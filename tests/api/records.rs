//! The formats `lua/purchase.lua` writes, read back with the Rust side of them
//! (`boxoffice::records`), and the script's refusal of arguments it cannot honour.

use boxoffice::cli::ServeArgs;
use boxoffice::records::{Logged, Record};
use clap::Parser;
use redis::AsyncCommands;
use redis::streams::StreamRangeReply;
use reqwest::StatusCode;

use crate::harness::TestEnv;

#[tokio::test]
async fn what_the_script_writes_parses_in_rust() {
    let env = TestEnv::new().await;
    let app = env
        .spawn_app_with(|c| c.serve.default_event_seats = 3)
        .await;
    let event = app.default_event;
    let sold = app.purchase("fmt-sold", 2).await;
    assert_eq!(sold.status, StatusCode::OK);
    assert_eq!(app.purchase("fmt-refused", 2).await.code(), "SOLD_OUT");

    let mut redis = env.redis_now().await;
    let record = |key: &str| format!("{}:{{{event}}}:idem:{key}", env.prefix);
    let stored: String = redis.get(record("fmt-sold")).await.unwrap();
    assert_eq!(
        Record::parse(&stored),
        Some(Record::Sold {
            quantity: 2,
            seats_remaining: 1,
            purchase_id: sold.body["purchaseId"].as_str().unwrap().parse().unwrap(),
        })
    );
    // A refusal is answered (the 409 above is its `X2` parsed) and not stored.
    let kept: bool = redis.exists(record("fmt-refused")).await.unwrap();
    assert!(!kept);

    let entries: StreamRangeReply = redis.xrange_all(env.stream_key(event)).await.unwrap();
    let Some(Logged::Sale(entry)) = Logged::from_stream(&entries.ids[0]) else {
        panic!("not a sale: {:?}", entries.ids[0]);
    };
    assert_eq!(
        (
            entry.id.to_string(),
            entry.idempotency_key.as_str(),
            entry.quantity,
            entry.seats_remaining
        ),
        (
            sold.body["purchaseId"].as_str().unwrap().to_owned(),
            "fmt-sold",
            2,
            Some(1)
        )
    );
}

#[tokio::test]
async fn the_script_refuses_a_ttl_it_cannot_set_before_it_writes_anything() {
    let env = TestEnv::new().await;
    let app = env.spawn_app().await;
    let event = app.default_event;
    assert_eq!(app.purchase("ttl-first", 1).await.status, StatusCode::OK);
    let script = redis::Script::new(concat!(
        include_str!("../../lua/prelude.lua"),
        include_str!("../../lua/purchase.lua")
    ));
    let mut redis = env.redis_now().await;
    for ttl in ["0", "-1", "1.5", "1e13", "soon"] {
        let ran: redis::RedisResult<(String, String)> = script
            .key(format!("{}:{{{event}}}:inv", env.prefix))
            .key(env.stream_key(event))
            .key(format!("{}:{{{event}}}:idem:ttl-{ttl}", env.prefix))
            .arg(ttl)
            .arg(1)
            .arg("0".repeat(32))
            .arg(format!("ttl-{ttl}"))
            .invoke_async(&mut redis)
            .await;
        assert!(ran.is_err(), "TTL {ttl} was taken: {ran:?}");
    }
    // Nothing was sold, recorded or appended.
    assert_eq!(env.redis_sold(event).await, 1);
    let len: usize = redis.xlen(env.stream_key(event)).await.unwrap();
    assert_eq!(len, 1);
    let keys: Vec<String> = redis
        .keys(format!("{}:{{{event}}}:idem:ttl-*", env.prefix))
        .await
        .unwrap();
    assert_eq!(
        keys,
        ["ttl-first"].map(|k| format!("{}:{{{event}}}:idem:{k}", env.prefix))
    );
}

#[test]
fn an_idempotency_ttl_out_of_range_is_refused_at_startup() {
    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: ServeArgs,
    }
    for ttl in ["0", "2592001", "-5", "1d"] {
        let parsed = Cli::try_parse_from(["boxoffice", &format!("--idempotency-ttl={ttl}")]);
        let error = parsed.err().unwrap_or_else(|| panic!("TTL {ttl} accepted"));
        assert!(error.to_string().contains("idempotency-ttl"), "{error}");
    }
    for ttl in ["1", "86400", "2592000"] {
        assert!(Cli::try_parse_from(["boxoffice", &format!("--idempotency-ttl={ttl}")]).is_ok());
    }
}

#[tokio::test]
async fn a_recovery_attempt_another_one_overtook_writes_no_hold() {
    let env = TestEnv::new().await;
    let app = env.spawn_app().await;
    let event = app.create_event("overtaken", 5).await;
    let held = app.hold(event, "overtaken-hold", 2, None).await;
    let id = held.body["holdId"].as_str().unwrap().replace('-', "");
    let confirmed = app.confirm(event, &id).await;
    assert_eq!(confirmed.status, StatusCode::OK);
    let script = redis::Script::new(concat!(
        include_str!("../../lua/prelude.lua"),
        include_str!("../../lua/restore_holds.lua")
    ));
    let mut redis = env.redis_now().await;
    let inventory = format!("{}:{{{event}}}:inv", env.prefix);
    let hold = format!("{}:{{{event}}}:hold:{id}", env.prefix);
    let info: String = redis::cmd("INFO")
        .arg("server")
        .query_async(&mut redis)
        .await
        .unwrap();
    let run_id = boxoffice::store::info_field(&info, "run_id").unwrap();
    // The event is on sale (no token): an attempt that began earlier writes nothing,
    // although it would mark the confirmed hold held again.
    let written: i64 = script
        .key(&inventory)
        .key(&hold)
        .arg("a-token-of-an-attempt-overtaken")
        .arg(run_id)
        .arg(
            &[
                "held",
                "2",
                "",
                "overtaken-hold",
                "1",
                "1",
                "3",
                "",
                "",
                "9999999999999",
            ][..],
        )
        .invoke_async(&mut redis)
        .await
        .unwrap();
    assert_eq!(written, 0);
    let state: String = redis.hget(&hold, "s").await.unwrap();
    assert_eq!(state, "confirmed");
    assert_eq!(app.confirm(event, &id).await.body, confirmed.body);
}
