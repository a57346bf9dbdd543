//! The zone model and its store, without the authority service.

use super::*;
use crate::test_support::TempDir;
use redb::Database;
use std::collections::BTreeSet;
use std::sync::Arc;
use zone::RECENT_CHANGES;

const APEX: &str = "internet2.test.";

/// The zone's database in `dir`, which is created if missing, with the
/// zone's tables.
fn open_db(dir: &TempDir) -> Arc<Database> {
    std::fs::create_dir_all(&dir.0).unwrap();
    let db = Database::create(dir.0.join("zone.redb")).unwrap();
    let txn = db.begin_write().unwrap();
    store::init_in(&txn).unwrap();
    txn.commit().unwrap();
    Arc::new(db)
}

/// Write `change` and apply it: what the state machine does with a zone
/// command (`crate::machine`), without the rest of the authority.
fn commit(db: &Database, zone: &mut Zone, change: ZoneChange) {
    let txn = db.begin_write().unwrap();
    change.write(&txn).unwrap();
    txn.commit().unwrap();
    zone.apply(change);
}

fn config() -> ZoneConfig {
    ZoneConfig {
        apex: APEX.into(),
        server_name: "node1".into(),
        server_addresses: vec!["2001:db8::1".parse().unwrap()],
        server_port: 443,
    }
}

fn set(addresses: &[&str], pins: &[(u16, u8)], owner: Option<u8>) -> RecordSet {
    RecordSet::new(
        addresses.iter().map(|a| a.parse().unwrap()).collect(),
        pins.iter()
            .map(|&(port, b)| Tlsa {
                port,
                spki_sha256: [b; 32],
            })
            .collect(),
        owner.map(|b| [b; 32]),
    )
    .unwrap()
}

#[test]
fn names_are_qualified_and_checked() {
    for (input, want) in [
        ("app", "app.internet2.test."),
        ("App.Internet2.Test", "app.internet2.test."),
        ("a.b.internet2.test.", "a.b.internet2.test."),
        ("x-1", "x-1.internet2.test."),
        // Relative unless it ends with the apex.
        ("internet2", "internet2.internet2.test."),
    ] {
        assert_eq!(qualify(APEX, input).as_deref(), Ok(want), "{input}");
    }
    let long_label = "a".repeat(64);
    let long_name = ["abcdefghi"; 25].join(".");
    for input in [
        "",
        ".",
        "-app",
        "app-",
        "a_b",
        "a..b",
        "app.internet2.test..",
        "caf\u{e9}",
        "a b",
        long_label.as_str(),
        long_name.as_str(),
    ] {
        let err = qualify(APEX, input).unwrap_err();
        assert!(
            !matches!(err, NameError::OutsideZone { .. } | NameError::Apex { .. }),
            "{input:?}: {err}"
        );
    }
    assert!(matches!(
        qualify(APEX, "example.com."),
        Err(NameError::OutsideZone { .. })
    ));
    assert!(matches!(
        qualify(APEX, "xinternet2.test."),
        Err(NameError::OutsideZone { .. })
    ));
    for apex in ["internet2.test.", "internet2.test", "INTERNET2.test."] {
        assert!(
            matches!(qualify(APEX, apex), Err(NameError::Apex { .. })),
            "{apex}"
        );
    }
}

#[test]
fn record_sets_are_bounded_and_canonical() {
    let a = set(&["2001:db8::2", "2001:db8::1", "2001:db8::2"], &[], None);
    assert_eq!(
        a.aaaa(),
        [
            "2001:db8::1".parse::<Ipv6Addr>().unwrap(),
            "2001:db8::2".parse().unwrap()
        ]
    );
    let many: Vec<Ipv6Addr> = (0..17u16)
        .map(|i| Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, i + 1))
        .collect();
    assert_eq!(
        RecordSet::new(many, Vec::new(), None),
        Err(RecordError::TooManyAddresses { count: 17 })
    );
    assert_eq!(
        RecordSet::new(Vec::new(), Vec::new(), None),
        Err(RecordError::Empty)
    );
    for bad in ["::", "ff02::1", "::ffff:192.0.2.1"] {
        assert!(
            matches!(
                RecordSet::new(vec![bad.parse().unwrap()], Vec::new(), None),
                Err(RecordError::BadAddress { .. })
            ),
            "{bad}"
        );
    }
    let zero = Tlsa {
        port: 0,
        spki_sha256: [1; 32],
    };
    assert_eq!(
        RecordSet::new(Vec::new(), vec![zero], None),
        Err(RecordError::ZeroPort)
    );
    // The stored form round-trips and nothing else decodes.
    let b = set(&["2001:db8::5"], &[(443, 7), (853, 7)], Some(9));
    for records in [&a, &b] {
        let bytes = store::encode(records);
        assert_eq!(store::decode(&bytes).as_ref(), Some(records));
        assert_eq!(store::decode(&[&bytes[..], &[0]].concat()), None);
        assert_eq!(store::decode(&bytes[..bytes.len() - 1]), None);
    }
    assert_eq!(store::decode(b""), None);
    assert_eq!(store::decode(&[2, 0, 1]), None);
}

#[test]
fn changes_are_durable_and_counted() {
    let tmp = TempDir::new("zone-durable");
    let db = open_db(&tmp);
    let mut zone = Zone::open(&db, &config()).unwrap();
    assert_eq!((zone.generation(), zone.len()), (0, 0));
    let change = zone
        .plan(vec![
            (
                "a.internet2.test.".into(),
                Some(set(&["2001:db8::a"], &[], None)),
            ),
            (
                "b.internet2.test.".into(),
                Some(set(&[], &[(443, 2)], Some(2))),
            ),
        ])
        .unwrap()
        .unwrap();
    commit(&db, &mut zone, change);
    // Setting what is there is no change.
    assert_eq!(
        zone.plan(vec![(
            "a.internet2.test.".into(),
            Some(set(&["2001:db8::a"], &[], None))
        )])
        .unwrap(),
        None
    );
    let change = zone
        .plan(vec![("a.internet2.test.".into(), None)])
        .unwrap()
        .unwrap();
    commit(&db, &mut zone, change);
    let snapshot = zone.snapshot();
    assert_eq!((snapshot.serial, snapshot.generation), (2, 2));
    assert_eq!(
        snapshot.names,
        [NameRecords {
            name: "b.internet2.test.".into(),
            aaaa: vec![],
            tlsa: vec![(443, [2; 32])],
        }]
    );
    drop((zone, db));
    let zone = Zone::open(&open_db(&tmp), &config()).unwrap();
    assert_eq!(zone.snapshot(), snapshot);
    assert_eq!(
        zone.get("b.internet2.test.").unwrap().owner(),
        Some([2; 32])
    );

    // Another apex does not serve the stored names, and keeps the counter.
    let other = ZoneConfig {
        apex: "other.test.".into(),
        ..config()
    };
    drop(zone);
    let zone = Zone::open(&open_db(&tmp), &other).unwrap();
    assert!(zone.is_empty());
    assert_eq!(zone.generation(), 2);
}

#[test]
fn the_zone_pages_and_refuses_more_than_its_names() {
    let tmp = TempDir::new("zone-full");
    let db = open_db(&tmp);
    let mut zone = Zone::open(&db, &config()).unwrap();
    let records = set(&["2001:db8::1"], &[], None);
    let name = |i: usize| format!("n{i:05}.internet2.test.");
    let edits = |range: std::ops::Range<usize>| {
        range
            .map(|i| (name(i), Some(records.clone())))
            .collect::<Vec<_>>()
    };
    let change = zone.plan(edits(0..2500)).unwrap().unwrap();
    commit(&db, &mut zone, change);
    let mut after: Option<String> = None;
    let mut seen = Vec::new();
    loop {
        let (page, more) = zone.page(after.as_deref(), 1000);
        assert!(page.len() <= 1000);
        seen.extend(page.iter().map(|(n, _)| (*n).to_owned()));
        if !more {
            break;
        }
        after = seen.last().cloned();
    }
    assert_eq!(seen, (0..2500).map(name).collect::<Vec<_>>());

    // One name too many is refused, before anything is written.
    assert!(matches!(
        zone.plan(edits(2500..MAX_NAMES + 1)),
        Err(ZoneError::Full)
    ));
    // Exactly full is fine, and removing makes room again.
    assert!(zone.plan(edits(2500..MAX_NAMES)).unwrap().is_some());
    let mut swap = edits(2500..MAX_NAMES + 1);
    swap.push((name(0), None));
    assert!(zone.plan(swap).unwrap().is_some());
}

#[test]
fn bad_configurations_are_refused() {
    let tmp = TempDir::new("zone-config");
    for (what, config) in [
        (
            "apex without dot",
            ZoneConfig {
                apex: "internet2.test".into(),
                ..config()
            },
        ),
        (
            "bad apex",
            ZoneConfig {
                apex: "in ternet2.test.".into(),
                ..config()
            },
        ),
        (
            "relative name with dot",
            ZoneConfig {
                server_name: "node1.".into(),
                ..config()
            },
        ),
        (
            "v4-mapped",
            ZoneConfig {
                server_addresses: vec!["::ffff:10.0.0.1".parse().unwrap()],
                ..config()
            },
        ),
        (
            "port 0",
            ZoneConfig {
                server_port: 0,
                ..config()
            },
        ),
    ] {
        assert!(
            matches!(
                Zone::open(&open_db(&tmp), &config),
                Err(ZoneError::Config(_))
            ),
            "{what}"
        );
    }
}

/// A publisher learns which names changed since it last published, and
/// is told it does not know when its zone was loaded again or when it is
/// further behind than the zone remembers.
#[test]
fn a_publisher_learns_which_names_changed() {
    let tmp = TempDir::new("zone-changed-since");
    let db = open_db(&tmp);
    let mut zone = Zone::open(&db, &config()).unwrap();
    let start = zone.published();
    assert_eq!(zone.changed_since(start), Some(BTreeSet::new()));
    let change = |zone: &Zone, edits: Vec<(&str, Option<RecordSet>)>| {
        zone.plan(edits.into_iter().map(|(n, r)| (n.to_owned(), r)).collect())
            .unwrap()
            .unwrap()
    };
    let c = change(
        &zone,
        vec![
            ("a.internet2.test.", Some(set(&["2001:db8::a"], &[], None))),
            ("b.internet2.test.", Some(set(&[], &[(443, 2)], None))),
        ],
    );
    commit(&db, &mut zone, c);
    let after_first = zone.published();
    let c = change(&zone, vec![("a.internet2.test.", None)]);
    commit(&db, &mut zone, c);
    fn names(set: Option<BTreeSet<&str>>) -> Option<String> {
        set.map(|s| s.into_iter().collect::<Vec<_>>().join(" "))
    }
    assert_eq!(
        names(zone.changed_since(start)),
        Some("a.internet2.test. b.internet2.test.".into())
    );
    assert_eq!(
        names(zone.changed_since(after_first)),
        Some("a.internet2.test.".into())
    );
    // Further behind than the zone remembers.
    for i in 0..RECENT_CHANGES {
        let address = format!("2001:db8::{:x}", i + 1);
        let c = change(
            &zone,
            vec![("c.internet2.test.", Some(set(&[&address], &[], None)))],
        );
        commit(&db, &mut zone, c);
    }
    assert_eq!(zone.changed_since(start), None);
    assert_eq!(zone.changed_since(after_first), None);
    let recent = Published {
        generation: zone.generation() - RECENT_CHANGES as u64,
        ..zone.published()
    };
    assert_eq!(
        names(zone.changed_since(recent)),
        Some("c.internet2.test.".into())
    );
    // The same store loaded again is another zone in memory.
    let now = zone.published();
    drop(zone);
    let zone = Zone::open(&db, &config()).unwrap();
    assert_eq!(zone.generation(), now.generation);
    assert_eq!(zone.changed_since(now), None);
    assert_eq!(zone.changed_since(zone.published()), Some(BTreeSet::new()));
}

/// A pin is answered at `_PORT._udp.NAME`: a name too long for that is
/// refused its pins (with the reason), not its addresses.
#[test]
fn a_name_too_long_for_its_pins_name_is_refused_its_pins() {
    let tmp = TempDir::new("zone-pin-name");
    let db = open_db(&tmp);
    let zone = Zone::open(&db, &config()).unwrap();
    // 15 chars of apex ("internet2.test."), labels of 63: 3 of them and a
    // shorter fourth make a name of 253 characters without its dot.
    let label = "a".repeat(63);
    let name = format!("{label}.{label}.{label}.{}.internet2.test.", "b".repeat(46));
    assert_eq!(name.len() - 1, 253);
    assert_eq!(zone.qualify(&name).unwrap(), name);
    match zone.plan(vec![(name.clone(), Some(set(&[], &[(443, 1)], None)))]) {
        Err(ZoneError::PinNameTooLong {
            name: refused,
            port: 443,
        }) => assert_eq!(refused, name),
        other => panic!(
            "a pin's name of {} characters was planned: {other:?}",
            name.len() + 10
        ),
    }
    assert!(
        zone.plan(vec![(name, Some(set(&["2001:db8::1"], &[], None)))])
            .unwrap()
            .is_some()
    );
}

/// The names the zone remembers for its publisher stay bounded however
/// large its changes are: older changes are forgotten (their publisher
/// then publishes whole) to keep at most `MAX_NAMES` names.
#[test]
fn the_changes_a_zone_remembers_hold_at_most_max_names_names() {
    let tmp = TempDir::new("zone-recent-bound");
    let db = open_db(&tmp);
    let mut zone = Zone::open(&db, &config()).unwrap();
    let mut published = Vec::new();
    let per_change = 8192;
    for round in 0..(MAX_NAMES / per_change + 2) {
        published.push(zone.published());
        let edits = (0..per_change)
            .map(|i| {
                let address = format!("2001:db8:{:x}::{:x}", round + 1, i + 1);
                (
                    format!("n{i}.internet2.test."),
                    Some(set(&[&address], &[], None)),
                )
            })
            .collect();
        let change = zone.plan(edits).unwrap().unwrap();
        commit(&db, &mut zone, change);
    }
    // What fits in MAX_NAMES names is still known; what is older is not.
    let known = MAX_NAMES / per_change;
    let rounds = published.len();
    for (at, p) in published.iter().enumerate() {
        let changed = zone.changed_since(*p);
        if at + known >= rounds {
            assert_eq!(changed.map(|c| c.len()), Some(per_change), "round {at}");
        } else {
            assert_eq!(changed, None, "round {at}");
        }
    }
}
