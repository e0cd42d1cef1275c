use super::*;
use crate::db::HoldRow;
use crate::records::{Cancellation, Entry, HoldMade, HoldReleased};

const NOW: i64 = 1_800_000_000_000;
const TTL: &Retention = &Retention::new(86_400, 900);

fn sale(id: Uuid, quantity: i16, buyer: Option<&str>, via_hold: bool) -> Logged {
    Logged::Sale(Entry {
        id,
        idempotency_key: format!("k-{id}"),
        quantity,
        seats_remaining: Some(7),
        sold_at_micros: (NOW - 1_000) * 1000,
        buyer: buyer.map(str::to_owned),
        via_hold,
        hold: None,
    })
}

fn cancel(id: Uuid, quantity: i16, buyer: Option<&str>) -> Logged {
    Logged::Cancel(Cancellation {
        id,
        quantity,
        cancelled_at_micros: (NOW - 500) * 1000,
        buyer: buyer.map(str::to_owned),
    })
}

fn hold(id: Uuid, quantity: i16, buyer: Option<&str>, expires_in_ms: i64) -> Logged {
    Logged::Hold(HoldMade {
        id,
        idempotency_key: format!("h-{id}"),
        quantity,
        seats_remaining: 3,
        held_at_micros: (NOW - 2_000) * 1000,
        expires_at_ms: NOW + expires_in_ms,
        buyer: buyer.map(str::to_owned),
    })
}

fn release(id: Uuid, quantity: i16) -> Logged {
    Logged::Release(HoldReleased {
        id,
        quantity,
        released_at_micros: (NOW - 100) * 1000,
        buyer: None,
        hold: None,
    })
}

#[test]
fn unwritten_sales_and_cancellations_count_once_wherever_they_were_read() {
    let (a, b, c) = (Uuid::now_v7(), Uuid::now_v7(), Uuid::now_v7());
    let log = Log {
        // `b` was parked and is still in the stream until it is trimmed.
        stream: vec![sale(a, 2, Some("ann"), false), sale(b, 3, None, false)],
        parked: vec![sale(b, 3, None, false), sale(c, 1, Some("ann"), false)],
    };
    let books = Books {
        sold: 10,
        buyers: vec![("ann".into(), 4)],
        written: vec![a],
        ..Books::default()
    };
    let durable = durable(&log, &books);
    assert_eq!(
        (durable.persisted, durable.in_stream, durable.parked),
        (10, 0, 4)
    );
    let rebuilt = rebuild(&log, &books, (100, Some(5)), NOW, TTL);
    assert_eq!(rebuilt.sold(), 14);
    assert_eq!(rebuilt.buyers["ann"], 5, "ann: 4 written + c, not a twice");
}

#[test]
fn a_cancellation_postgresql_has_is_not_undone_by_an_older_redis() {
    let id = Uuid::now_v7();
    // The sale and its cancellation are rows; the log still has the sale's entry.
    let books = Books {
        sold: 0,
        written: vec![id],
        cancelled: vec![id],
        ..Books::default()
    };
    let log = Log {
        stream: vec![sale(id, 2, None, false), cancel(id, 2, None)],
        ..Log::default()
    };
    assert_eq!(rebuild(&log, &books, (100, Some(5)), NOW, TTL).sold(), 0);
    // Not yet written: the cancellation in the log takes the seats off.
    let log = Log {
        stream: vec![sale(id, 2, None, false), cancel(id, 2, None)],
        ..Log::default()
    };
    assert_eq!(
        rebuild(&log, &Books::default(), (100, Some(5)), NOW, TTL).sold(),
        0
    );
}

#[test]
fn holds_end_once_and_for_all_and_live_ones_are_held_again() {
    let (live, released, confirmed, expired) = (
        Uuid::now_v7(),
        Uuid::now_v7(),
        Uuid::now_v7(),
        Uuid::now_v7(),
    );
    let log = Log {
        stream: vec![
            hold(live, 2, Some("bo"), 60_000),
            hold(released, 3, None, 60_000),
            release(released, 3),
            hold(confirmed, 1, None, 60_000),
            sale(confirmed, 1, None, true),
            hold(expired, 4, None, -1),
        ],
        ..Log::default()
    };
    let rebuilt = rebuild(&log, &Books::default(), (100, Some(5)), NOW, TTL);
    let end = |id| rebuilt.holds.iter().find(|h| h.id == id).unwrap().end;
    assert_eq!(end(live), HoldEnd::Live);
    assert!(matches!(end(released), HoldEnd::Released { .. }));
    assert!(matches!(
        end(confirmed),
        HoldEnd::Confirmed {
            seats_remaining: 7,
            ..
        }
    ));
    assert_eq!(end(expired), HoldEnd::Expired);
    assert_eq!(rebuilt.held, 2);
    assert_eq!(rebuilt.buyers["bo"], 2);
    assert_eq!(rebuilt.sold(), 1);
    assert_eq!(
        rebuilt.records.len(),
        4,
        "one record per hold request (the confirmed sale's key is its hold's)"
    );
}

#[test]
fn a_release_written_before_its_hold_still_ends_it() {
    let id = Uuid::now_v7();
    let Logged::Hold(made) = hold(id, 2, None, 60_000) else {
        unreachable!()
    };
    // The release reached PostgreSQL first and its hold row came after: the row
    // carries the release because the release wrote the hold.
    let log = Log {
        stream: vec![Logged::Release(HoldReleased {
            id,
            quantity: 2,
            released_at_micros: (NOW - 100) * 1000,
            buyer: None,
            hold: Some(made),
        })],
        ..Log::default()
    };
    let rebuilt = rebuild(&log, &Books::default(), (100, None), NOW, TTL);
    assert!(matches!(rebuilt.holds[0].end, HoldEnd::Released { .. }));
    assert_eq!(rebuilt.records.len(), 1, "its key's record comes back too");
}

#[test]
fn holds_never_push_sold_plus_held_over_the_total() {
    let (older, newer) = (Uuid::now_v7(), Uuid::now_v7());
    let mut newer_hold = hold(newer, 2, Some("bo"), 60_000);
    if let Logged::Hold(h) = &mut newer_hold {
        h.held_at_micros += 1_000;
    }
    let log = Log {
        stream: vec![hold(older, 2, None, 60_000), newer_hold],
        ..Log::default()
    };
    let books = Books {
        sold: 8,
        ..Books::default()
    };
    let rebuilt = rebuild(&log, &books, (10, Some(4)), NOW, TTL);
    assert_eq!(rebuilt.sold() + rebuilt.held, 10);
    let end = |id| rebuilt.holds.iter().find(|h| h.id == id).unwrap().end;
    assert_eq!(end(older), HoldEnd::Live);
    assert!(matches!(end(newer), HoldEnd::Voided { .. }));
    assert!(!rebuilt.buyers.contains_key("bo"));
}

#[test]
fn a_row_says_how_a_hold_ended_even_when_the_log_has_only_its_making() {
    let id = Uuid::now_v7();
    let row = HoldRow {
        made: HoldMade {
            id,
            idempotency_key: "k".into(),
            quantity: 2,
            buyer: None,
            seats_remaining: 5,
            held_at_micros: (NOW - 5_000) * 1000,
            expires_at_ms: NOW + 60_000,
        },
        released_at_micros: Some((NOW - 1_000) * 1000),
        confirmed: false,
        sale_seats_remaining: None,
        sold_at_micros: None,
    };
    let books = Books {
        holds: vec![row],
        ..Books::default()
    };
    let log = Log {
        stream: vec![hold(id, 2, None, 60_000)],
        ..Log::default()
    };
    let rebuilt = rebuild(&log, &books, (100, Some(5)), NOW, TTL);
    assert!(matches!(rebuilt.holds[0].end, HoldEnd::Released { .. }));
    assert_eq!(rebuilt.held, 0);
}
