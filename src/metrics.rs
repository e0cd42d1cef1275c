//! Every Prometheus series the service exports, named once here, and the recorder
//! that renders them at `/metrics`. Labels are `&'static str`: building them as
//! `String`s on every request cost measurable throughput.

use std::time::Duration;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

const HTTP_REQUESTS: &str = "boxoffice_http_requests_total";
const HTTP_DURATION: &str = "boxoffice_http_request_duration_seconds";
const PURCHASES: &str = "boxoffice_purchases_total";
const PURCHASES_REPLAYED: &str = "boxoffice_purchases_replayed_total";
const SEATS_SOLD: &str = "boxoffice_seats_sold_total";
const SCRIPT_DURATION: &str = "boxoffice_redis_script_duration_seconds";
const SCRIPT_BATCH: &str = "boxoffice_redis_script_batch_size";
const RECOVERIES: &str = "boxoffice_recoveries_total";
const RECORDS_RESTORED: &str = "boxoffice_records_restored_total";
const STREAM_BACKLOG: &str = "boxoffice_stream_backlog";
const CONSUMER_BATCH: &str = "boxoffice_consumer_batch_size";
const ROWS_WRITTEN: &str = "boxoffice_consumer_rows_written_total";
const CONSUMER_ERRORS: &str = "boxoffice_consumer_errors_total";
const PARKED: &str = "boxoffice_consumer_parked_total";
const ENTRIES_LOST: &str = "boxoffice_consumer_entries_lost_total";
const POSTGRES_UP: &str = "boxoffice_postgres_up";
const REDIS_MEMORY: &str = "boxoffice_redis_memory_used_ratio";
const CONSUMER_BATCHES_NOT_PENDING: &str = "boxoffice_consumer_batches_not_pending_total";
const HOLDS: &str = "boxoffice_holds_total";
const HOLDS_EXPIRED_BY_SWEEP: &str = "boxoffice_holds_swept_total";
const CANCELLATIONS: &str = "boxoffice_cancellations_total";
const QUEUE_JOINS: &str = "boxoffice_queue_joins_total";
const QUEUE_WAITING: &str = "boxoffice_queue_waiting";
const QUEUE_ADMITTED: &str = "boxoffice_queue_admitted";
const QUEUE_ADMISSIONS: &str = "boxoffice_queue_admissions_served_total";
const QUEUE_LAG: &str = "boxoffice_queue_admission_lag_seconds";
const QUEUE_WAIT: &str = "boxoffice_queue_wait_seconds";

/// Buckets of the time buyers wait in a waiting room, in seconds.
const WAIT_BUCKETS: &[f64] = &[
    1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0,
];

/// Buckets of every latency histogram, in seconds.
const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
];
/// Buckets of the consumer's batch sizes, in sales.
const BATCH_BUCKETS: &[f64] = &[1.0, 10.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0];
/// Buckets of the requests one script call decides (`BOXOFFICE_PURCHASE_BATCH` ≤ 1024).
const SCRIPT_BATCH_BUCKETS: &[f64] = &[
    1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0,
];

/// Gauges not set for this long are dropped from `/metrics`: the waiting-room gauges
/// of an event nobody joins or polls any more (its sale is over) would otherwise be
/// exported for the life of the process.
const GAUGE_IDLE: Duration = Duration::from_secs(600);

/// How often histogram samples are folded into their buckets.
const UPKEEP_EVERY: Duration = Duration::from_secs(5);

static HANDLE: std::sync::OnceLock<PrometheusHandle> = std::sync::OnceLock::new();

/// Installs the process-wide Prometheus recorder on first use and returns the handle
/// that renders `/metrics`. Every app in one process (tests) shares it.
///
/// The recorder keeps every histogram sample until upkeep folds it into buckets; a
/// scrape does that, but nobody may scrape, and at 18k requests/s the samples grew
/// the process by 30 MB a minute. Hence the upkeep thread.
pub fn install() -> PrometheusHandle {
    HANDLE
        .get_or_init(|| {
            let handle = PrometheusBuilder::new()
                .set_buckets(LATENCY_BUCKETS)
                .and_then(|b| {
                    b.set_buckets_for_metric(Matcher::Full(CONSUMER_BATCH.into()), BATCH_BUCKETS)
                })
                .and_then(|b| {
                    b.set_buckets_for_metric(
                        Matcher::Full(SCRIPT_BATCH.into()),
                        SCRIPT_BATCH_BUCKETS,
                    )
                })
                .and_then(|b| {
                    b.set_buckets_for_metric(Matcher::Full(QUEUE_WAIT.into()), WAIT_BUCKETS)
                })
                .expect("bucket lists are not empty")
                .idle_timeout(metrics_util::MetricKindMask::GAUGE, Some(GAUGE_IDLE))
                .install_recorder()
                .expect("no other metrics recorder is installed");
            let upkeep = handle.clone();
            std::thread::Builder::new()
                .name("metrics-upkeep".into())
                .spawn(move || {
                    loop {
                        std::thread::sleep(UPKEEP_EVERY);
                        upkeep.run_upkeep();
                    }
                })
                .expect("spawning the metrics upkeep thread");
            handle
        })
        .clone()
}

/// One HTTP request answered.
pub fn http_request(route: &'static str, method: &'static str, status: u16, took: Duration) {
    ::metrics::counter!(HTTP_REQUESTS, "route" => route, "method" => method, "status" => status_label(status))
        .increment(1);
    ::metrics::histogram!(HTTP_DURATION, "route" => route, "method" => method)
        .record(took.as_secs_f64());
}

/// One purchase decided: `outcome` is `sold`, `sold_out` or `key_reused`; `seats` are
/// the seats newly sold (0 for a replay).
pub fn purchase(outcome: &'static str, replayed: bool, seats: u8) {
    ::metrics::counter!(PURCHASES, "outcome" => outcome).increment(1);
    if replayed {
        ::metrics::counter!(PURCHASES_REPLAYED, "outcome" => outcome).increment(1);
    } else if seats > 0 {
        ::metrics::counter!(SEATS_SOLD).increment(u64::from(seats));
    }
}

/// One run of the purchase script, whatever the number of purchases it decided.
pub fn script_run(took: Duration) {
    ::metrics::histogram!(SCRIPT_DURATION).record(took.as_secs_f64());
}

/// A hold request answered: `outcome` is `held`, `sold_out`, `buyer_limit`, …, or
/// what happened to an existing hold (`confirmed`, `released`, `expired`).
pub fn hold(outcome: &'static str) {
    ::metrics::counter!(HOLDS, "outcome" => outcome).increment(1);
}

/// Expired holds the sweeper returned to stock (requests return others themselves).
pub fn holds_expired(holds: usize) {
    ::metrics::counter!(HOLDS_EXPIRED_BY_SWEEP).increment(holds as u64);
}

/// A buyer joined a waiting room (or asked again for their ticket).
pub fn queue_joined() {
    ::metrics::counter!(QUEUE_JOINS).increment(1);
}

/// A waiting room as a join or poll just saw it: buyers still waiting, and places
/// admitted so far (of those who joined).
pub fn queue_room(event: uuid::Uuid, waiting: u64, admitted: u64) {
    let event = event.to_string();
    ::metrics::gauge!(QUEUE_WAITING, "event" => event.clone()).set(waiting as f64);
    ::metrics::gauge!(QUEUE_ADMITTED, "event" => event).set(admitted as f64);
}

/// A buyer learned of their admission for the first time (across replicas): how long
/// after the moment of admission (polling lag), and how long after joining.
pub fn queue_admission(lag: Duration, waited: Duration) {
    ::metrics::counter!(QUEUE_ADMISSIONS).increment(1);
    ::metrics::histogram!(QUEUE_LAG).record(lag.as_secs_f64());
    ::metrics::histogram!(QUEUE_WAIT).record(waited.as_secs_f64());
}

/// A sale cancelled by an admin (repeats not counted).
pub fn cancellation() {
    ::metrics::counter!(CANCELLATIONS).increment(1);
}

/// One call of a batched script sent with `requests` requests (see `batch`).
pub fn script_batch(script: &'static str, requests: usize) {
    ::metrics::histogram!(SCRIPT_BATCH, "script" => script).record(requests as f64);
}

/// One event brought (back) on sale after a check against PostgreSQL, with how many
/// idempotency records were written back.
pub fn recovery(records: usize) {
    ::metrics::counter!(RECOVERIES).increment(1);
    ::metrics::counter!(RECORDS_RESTORED).increment(records as u64);
}

/// Sales in the streams not yet in PostgreSQL.
pub fn stream_backlog(sales: i64) {
    ::metrics::gauge!(STREAM_BACKLOG).set(sales as f64);
}

/// One write of the consumer (one event's batch, or a group of events' in one
/// transaction): entries read, rows that were new.
pub fn consumer_batch(read: usize, written: u64) {
    ::metrics::histogram!(CONSUMER_BATCH).record(read as f64);
    ::metrics::counter!(ROWS_WRITTEN).increment(written);
}

pub fn consumer_error() {
    ::metrics::counter!(CONSUMER_ERRORS).increment(1);
}

/// A batch not written because its entries were no longer pending for this consumer.
pub fn consumer_batch_dropped() {
    ::metrics::counter!(CONSUMER_BATCHES_NOT_PENDING).increment(1);
}

/// A sale set aside because PostgreSQL refused it for good.
pub fn parked() {
    ::metrics::counter!(PARKED).increment(1);
}

/// Stream entries gone before their rows were written (removed from the stream
/// behind the service's back while pending): `how` is `claimed` (XAUTOCLAIM found
/// them deleted) or `parking` (gone when it was to be parked).
pub fn entries_lost(how: &'static str, entries: usize) {
    ::metrics::counter!(ENTRIES_LOST, "how" => how).increment(entries as u64);
}

/// Whether PostgreSQL answered this process' last readiness check (1) or not (0).
pub fn postgres_up(up: bool) {
    ::metrics::gauge!(POSTGRES_UP).set(if up { 1.0 } else { 0.0 });
}

/// Redis' `used_memory / maxmemory` as last read; not exported without a limit.
pub fn redis_memory(share: Option<f64>) {
    if let Some(share) = share {
        ::metrics::gauge!(REDIS_MEMORY).set(share);
    }
}

fn status_label(status: u16) -> &'static str {
    static LABELS: std::sync::LazyLock<Vec<String>> =
        std::sync::LazyLock::new(|| (0..1000).map(|code| code.to_string()).collect());
    LABELS
        .get(usize::from(status))
        .map_or("other", String::as_str)
}
