use super::*;

#[test]
fn permute_is_a_bijection_and_not_the_identity() {
    for size in [1u64, 2, 3, 7, 60, 1000, 4097] {
        let mut seen: Vec<u64> = (0..size).map(|x| permute(x, size, 42)).collect();
        let moved = seen
            .iter()
            .enumerate()
            .filter(|(i, v)| *i as u64 != **v)
            .count();
        seen.sort_unstable();
        assert_eq!(seen, (0..size).collect::<Vec<_>>(), "size {size}");
        if size >= 60 {
            assert!(moved as u64 > size * 9 / 10, "size {size}: {moved} moved");
        }
    }
    assert_ne!(
        (0..100).map(|x| permute(x, 100, 1)).collect::<Vec<_>>(),
        (0..100).map(|x| permute(x, 100, 2)).collect::<Vec<_>>()
    );
}

fn room(now_ms: i64) -> Room {
    Room {
        settings: QueueSettings {
            opens_at_ms: 10_000,
            admit_per_second: 4,
            admission_seconds: 60,
            seed: 7,
        },
        early: 8,
        late: 3,
        chain: None,
        now_ms,
    }
}

#[test]
fn admission_follows_the_clock_and_positions_only_go_down() {
    assert!(matches!(
        room(9_000).standing(Ticket::Early(3), None),
        Some(Standing::BeforeOpening {
            in_draw: 8,
            opens_in_ms: 1_000
        })
    ));
    assert_eq!(room(9_000).standing(Ticket::Late(4), None), None);
    // Late tickets come after every early one, in order: places 9, 10, 11.
    let late = Ticket::Late(2);
    assert_eq!(room(10_000).place(late), Some(10));
    let mut last = u64::MAX;
    for now in (10_000..13_000).step_by(50) {
        match room(now).standing(late, None).unwrap() {
            Standing::Waiting { position, .. } => {
                assert!(position <= last);
                last = position;
            }
            Standing::Admitted { admitted_at_ms } => {
                // 4 per second: place 10 at 2.5 s.
                assert_eq!(admitted_at_ms, 12_500);
                assert!(now >= 12_500);
                return;
            }
            other => panic!("{other:?}"),
        }
    }
    panic!("never admitted");
}

#[test]
fn a_late_ticket_waits_for_its_own_moment_and_the_room_counts_what_is_left() {
    // A chain restarted at 20 s by a join after a lull: 3 places at 4 per second.
    let room = |now_ms| Room {
        chain: Some((20_000, 2)),
        ..room(now_ms)
    };
    let (ticket, at) = (Ticket::Late(3), Some(20_500));
    let mut last = u64::MAX;
    for now in (20_000..20_500).step_by(10) {
        let Standing::Waiting { position, wait_ms } = room(now).standing(ticket, at).unwrap()
        else {
            panic!("admitted before its moment at {now}");
        };
        assert!(position <= last && position >= 1);
        assert_eq!(wait_ms, (20_500 - now) as u64);
        last = position;
    }
    assert_eq!(
        room(20_500).standing(ticket, at),
        Some(Standing::Admitted {
            admitted_at_ms: 20_500
        })
    );
    // All 8 early places are in by 12 s; of the chain, 2 places by 20.5 s.
    assert_eq!(room(20_000).admitted(), 8 + 3 - 2);
    assert_eq!(room(20_500).admitted(), 8 + 3);
}

#[test]
fn an_admission_lasts_from_when_the_buyer_could_learn_of_it() {
    assert_eq!(admission_expires_ms(1_000, 900, 30_000, 60), 61_000);
    assert_eq!(admission_expires_ms(1_000, 20_000, 30_000, 60), 80_000);
    // Staying away does not move the window past the longest poll interval.
    assert_eq!(admission_expires_ms(1_000, 500_000, 30_000, 60), 91_000);
    let tokens = AdmissionTokens::new("an-admission-key-of-at-least-32-bytes", None).unwrap();
    let buyer = Buyer::try_from("ann".to_owned()).unwrap();
    assert!(tokens.issue(Uuid::now_v7(), &buyer, -1_000).is_err());
}

#[test]
fn admission_tokens_name_event_and_buyer_and_survive_a_key_rotation() {
    let old = AdmissionTokens::new("the-old-admission-key-of-32-bytes!!", None).unwrap();
    let new = AdmissionTokens::new(
        "the-new-admission-key-of-32-bytes!!",
        Some("the-old-admission-key-of-32-bytes!!"),
    )
    .unwrap();
    let (event, buyer) = (Uuid::now_v7(), Buyer::try_from("ann".to_owned()).unwrap());
    let later = (jsonwebtoken::get_current_timestamp() as i64 + 60) * 1000;
    let token = old.issue(event, &buyer, later).unwrap();
    assert!(
        new.admits(&token, event, &buyer),
        "the previous key is accepted"
    );
    assert!(!new.admits(&token, Uuid::now_v7(), &buyer));
    assert!(!new.admits(&token, event, &Buyer::try_from("bo".to_owned()).unwrap()));
    let expired = new
        .issue(
            event,
            &buyer,
            (jsonwebtoken::get_current_timestamp() as i64 - 1) * 1000,
        )
        .unwrap();
    assert!(!new.admits(&expired, event, &buyer));
    let rotated_out = AdmissionTokens::new("the-new-admission-key-of-32-bytes!!", None).unwrap();
    assert!(!rotated_out.admits(&token, event, &buyer));
}
