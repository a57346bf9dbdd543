//! The store read back table by table, row by row, as raw bytes: what two
//! replicas that applied the same commands must agree on.

use super::{CLUSTER_META, snapshot};
use redb::{Database, ReadableDatabase, TableHandle};
use std::collections::BTreeMap;

/// Every row of every replicated table, by table name.
pub(crate) type Rows = BTreeMap<String, snapshot::Rows>;

/// The whole store. Fails when the file holds a table neither replicated
/// nor the cluster's metadata, so a table added later cannot escape the
/// comparison.
pub(crate) fn rows(db: &Database) -> Rows {
    let out: Rows = snapshot::tables(db).unwrap().into_iter().collect();
    let txn = db.begin_read().unwrap();
    for table in txn.list_tables().unwrap() {
        assert!(
            out.contains_key(table.name()) || table.name() == CLUSTER_META.name(),
            "table {} is not compared",
            table.name()
        );
    }
    out
}

mod group {
    use super::group_support::{open, request};
    use crate::test_support::TempDir;
    use std::time::SystemTime;

    #[test]
    fn a_group_is_seen_as_it_goes_and_kept_once_made_durable() {
        let dir = TempDir::new("group");
        let now = SystemTime::now();
        let mut machine = open(&dir, now);
        machine.defer_durability();
        let a = machine.issue(request("a.example"), now, None).unwrap();
        // Committed, not yet fsynced: reads and the next command see it.
        let record = machine
            .authority()
            .certificate(&a.certificate.serial)
            .unwrap()
            .expect("the registry reads the group's first certificate");
        assert_eq!(record.leaf_index, 0);
        let b = machine.issue(request("b.example"), now, None).unwrap();
        assert_eq!(b.leaf_index, 1);
        // A refusal in the group changes nothing and the group goes on.
        assert!(
            machine
                .revoke(crate::authority::ca::Serial([9; 16]), None, now, None)
                .is_err()
        );
        machine
            .revoke(a.certificate.serial, None, now, None)
            .unwrap();
        assert_eq!(machine.make_durable().unwrap(), 3);
        assert_eq!(machine.make_durable().unwrap(), 0, "the group is over");
        let sth = machine.authority().log().latest_sth();
        let rows = super::rows(&machine.authority().database());
        drop(machine);

        let machine = open(&dir, now);
        assert_eq!(machine.authority().log().latest_sth(), sth);
        assert_eq!(super::rows(&machine.authority().database()), rows);
        assert!(
            machine
                .authority()
                .revocations()
                .is_revoked(&a.certificate.serial.0)
        );
    }
}

mod clock {
    use super::group_support::{open, request};
    use crate::test_support::TempDir;
    use std::time::{Duration, SystemTime};

    /// A certificate proposed at a time before the log's latest tree head
    /// (its proposer's clock is behind the one before) is logged at the
    /// head's time, not refused, and the store opens again consistent.
    #[test]
    fn a_proposal_from_behind_the_latest_head_is_logged_at_the_heads_time() {
        let dir = TempDir::new("clock-behind");
        let now = SystemTime::now();
        let mut machine = open(&dir, now);
        let ahead = now + Duration::from_secs(600);
        let first = machine
            .issue(request("ahead.example"), ahead, None)
            .unwrap();
        let second = machine.issue(request("behind.example"), now, None).unwrap();
        assert_eq!(second.leaf_index, 1);
        assert_eq!(second.sth.timestamp_ms, first.sth.timestamp_ms);
        let record = machine
            .authority()
            .certificate(&second.certificate.serial)
            .unwrap()
            .unwrap();
        assert_eq!(record.logged_at_ms, first.sth.timestamp_ms);
        let later = machine
            .issue(
                request("later.example"),
                ahead + Duration::from_secs(1),
                None,
            )
            .unwrap();
        assert_eq!(later.sth.timestamp_ms, first.sth.timestamp_ms + 1000);
        drop(machine);
        let machine = open(&dir, now);
        assert_eq!(machine.authority().log().size(), 3);
    }
}

mod names {
    use super::group_support::{open, request};
    use crate::authority::ca::{IssueRequest, Usage, public_key_of};
    use crate::authority::logged::{AuthorityError, SpentToken};
    use crate::machine::Command;
    use crate::test_support::TempDir;
    use std::time::{Duration, SystemTime};

    /// Two enrollments for one name with different keys, both proposed
    /// before either is applied (as a cluster leader may): the second is
    /// refused when applied and changes nothing. The same key may enroll
    /// again; a revoked holder, an operator's issuance (no token) or a
    /// joining member's node certificate does not block.
    #[test]
    fn an_enrollment_for_a_name_taken_since_its_proposal_is_refused_at_apply() {
        let dir = TempDir::new("names-at-apply");
        let now = SystemTime::now();
        let mut machine = open(&dir, now);
        let mut token = 0u8;
        let mut enrollment = |machine: &crate::machine::Machine, request: IssueRequest| {
            token += 1;
            let request = IssueRequest {
                usage: Usage::Client,
                ..request
            };
            let (certificate, mut certify) =
                machine.authority().propose_issue(request, now).unwrap();
            certify.token = Some(SpentToken {
                id: [token; 16],
                expires_at_s: 0,
            });
            (certificate, Command::Certify(certify))
        };
        let (first, first_command) = enrollment(&machine, request("dev.example"));
        let (_, rival) = enrollment(&machine, request("DEV.example"));
        machine.apply(first_command).unwrap();
        let before = super::rows(&machine.authority().database());
        match machine.apply(rival) {
            Err(AuthorityError::NameTaken { name, holder }) => {
                assert_eq!(name, "dev.example");
                assert_eq!(holder, first.serial);
            }
            other => panic!("the rival enrollment was not refused: {other:?}"),
        }
        assert_eq!(super::rows(&machine.authority().database()), before);

        let same_key = IssueRequest {
            public_key: Some(public_key_of(&first.cert_der).unwrap()),
            ..request("dev.example")
        };
        let (_, again) = enrollment(&machine, same_key);
        machine
            .apply(again)
            .expect("the holder's own key enrolls again");

        let (_, operator) = machine
            .authority()
            .propose_issue(request("dev.example"), now)
            .unwrap();
        machine
            .apply(Command::Certify(operator))
            .expect("an issuance without a token is not first come, first served");

        // A member's node certificate (a join token pays for it) carries
        // the cluster's name, as every member's does.
        let (_, mut member) = machine
            .authority()
            .propose_issue(
                IssueRequest {
                    usage: Usage::Node,
                    ..request("dev.example")
                },
                now,
            )
            .unwrap();
        member.token = Some(SpentToken {
            id: [0xee; 16],
            expires_at_s: 0,
        });
        machine
            .apply(Command::Certify(member))
            .expect("a joining member shares the cluster's name");

        let (other, other_command) = enrollment(&machine, request("other.example"));
        machine.apply(other_command).unwrap();
        machine
            .revoke(other.serial, None, now + Duration::from_secs(1), None)
            .unwrap();
        let (_, after_revocation) = enrollment(&machine, request("other.example"));
        machine
            .apply(after_revocation)
            .expect("a revoked holder does not hold its name");
    }
}

mod snapshots {
    use super::group_support::{open, request};
    use crate::machine::snapshot;
    use crate::test_support::{TempDir, copy_cluster_keys};
    use std::io::Cursor;
    use std::time::SystemTime;

    #[test]
    fn a_snapshot_installs_whole_or_not_at_all() {
        let (from, to) = (TempDir::new("snap-from"), TempDir::new("snap-to"));
        let now = SystemTime::now();
        let mut source = open(&from, now);
        let mut serials = Vec::new();
        for name in ["a.example", "b.example", "c.example"] {
            serials.push(
                source
                    .issue(request(name), now, None)
                    .unwrap()
                    .certificate
                    .serial,
            );
        }
        source.revoke(serials[1], None, now, None).unwrap();
        let bytes = snapshot::dump(&source.authority().database()).unwrap();

        copy_cluster_keys(&from.0, &to.0);
        let mut target = open(&to, now);
        let before = super::rows(&target.authority().database());
        // Cut short, with a byte more, or with a key of the wrong width:
        // refused, and nothing changed.
        let mut wrong_width = bytes.clone();
        // The first table's first row: its key length (a u64 index).
        let first_key_len = 6 + 1 + 1 + 1 + "leaves".len() + 8;
        wrong_width[first_key_len + 3] = 9;
        // Another format, and bytes without the snapshot's magic.
        let mut other_format = bytes.clone();
        other_format[6] = snapshot::FORMAT + 1;
        let refusal = |bad: &[u8]| {
            let db = redb::Database::builder()
                .create_with_backend(redb::backends::InMemoryBackend::new())
                .unwrap();
            let txn = db.begin_write().unwrap();
            snapshot::restore(&txn, bad, bad.len() as u64)
                .unwrap_err()
                .to_string()
        };
        assert!(
            refusal(&other_format).contains(&format!(
                "format {}; this release reads format {}",
                snapshot::FORMAT + 1,
                snapshot::FORMAT
            )),
            "{}",
            refusal(&other_format)
        );
        assert!(refusal(&bytes[6..]).contains("not an internet2 snapshot"));
        // A key claiming 4 GiB: refused before anything is allocated.
        let mut huge = bytes.clone();
        huge[first_key_len..first_key_len + 4].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(
            refusal(&huge).contains("a key or value of 4294967295 bytes"),
            "{}",
            refusal(&huge)
        );
        for bad in [
            &bytes[..bytes.len() - 1],
            &[&bytes[..], &[0]].concat()[..],
            &wrong_width[..],
            &huge[..],
            &other_format[..],
            &bytes[6..],
        ] {
            assert!(target.install(&mut Cursor::new(bad), |_| Ok(())).is_err());
            assert_eq!(super::rows(&target.authority().database()), before);
            assert_eq!(target.authority().log().size(), 0);
        }
        target
            .install(&mut Cursor::new(&bytes), |_| Ok(()))
            .unwrap();
        assert_eq!(
            super::rows(&target.authority().database()),
            super::rows(&source.authority().database())
        );
        // And in memory: the log, the CA's issued and revoked serials.
        assert_eq!(
            target.authority().log().latest_sth(),
            source.authority().log().latest_sth()
        );
        assert_eq!(
            target.authority().revocations(),
            source.authority().revocations()
        );
        target.revoke(serials[0], None, now, None).unwrap();
    }
}

mod snapshot_contents {
    use super::group_support::{open, request};
    use crate::authority::registry::tamper;
    use crate::machine::snapshot;
    use crate::test_support::{TempDir, copy_cluster_keys};
    use std::io::Cursor;
    use std::time::SystemTime;

    /// A snapshot well formed table by table whose registry lacks a
    /// certificate its log holds (a member's store gone bad, or a hostile
    /// member's): refused before anything is written; the target keeps its
    /// rows, reopens, and takes a good snapshot afterwards.
    #[test]
    fn a_snapshot_whose_registry_disagrees_with_its_log_is_refused_whole() {
        let (from, to) = (TempDir::new("snap-bad-from"), TempDir::new("snap-bad-to"));
        let now = SystemTime::now();
        let mut source = open(&from, now);
        let first = source.issue(request("a.example"), now, None).unwrap();
        source.issue(request("b.example"), now, None).unwrap();
        let good = snapshot::dump(&source.authority().database()).unwrap();
        let db = source.authority().database();
        let txn = db.begin_write().unwrap();
        tamper::remove_certificate(&txn, first.certificate.serial);
        txn.commit().unwrap();
        let bad = snapshot::dump(&db).unwrap();

        copy_cluster_keys(&from.0, &to.0);
        let mut target = open(&to, now);
        target.issue(request("local.example"), now, None).unwrap();
        let before = super::rows(&target.authority().database());
        let refused = target.install(&mut Cursor::new(&bad), |_| Ok(()));
        assert!(
            matches!(
                refused,
                Err(crate::authority::logged::AuthorityError::Stale(_))
            ),
            "{refused:?}"
        );
        assert_eq!(super::rows(&target.authority().database()), before);
        assert_eq!(target.authority().log().size(), 1);
        drop(target);
        let mut target = open(&to, now);
        assert_eq!(super::rows(&target.authority().database()), before);
        target.install(&mut Cursor::new(&good), |_| Ok(())).unwrap();
        assert_eq!(target.authority().log().size(), 2);
    }
}

mod group_support {
    use crate::authority::ca::{IssueRequest, KeyAlgorithm};
    use crate::authority::ct::LogKeyAlgorithm;
    use crate::machine::Machine;
    use crate::test_support::TempDir;
    use std::time::SystemTime;

    pub(super) fn request(name: &str) -> IssueRequest {
        IssueRequest {
            subject: name.into(),
            dns_names: vec![name.into()],
            ..IssueRequest::default()
        }
    }

    /// [`open`], with a zone (`internet2.test.`).
    pub(super) fn open_zoned(dir: &TempDir, now: SystemTime) -> Machine {
        let config = crate::dns::ZoneConfig {
            apex: "internet2.test.".into(),
            server_name: "node1".into(),
            server_addresses: Vec::new(),
            server_port: 443,
        };
        Machine::open(
            &dir.0,
            KeyAlgorithm::Ed25519,
            LogKeyAlgorithm::Ed25519,
            Some(&config),
            now,
        )
        .unwrap()
    }

    pub(super) fn open(dir: &TempDir, now: SystemTime) -> Machine {
        Machine::open(
            &dir.0,
            KeyAlgorithm::Ed25519,
            LogKeyAlgorithm::Ed25519,
            None,
            now,
        )
        .unwrap()
    }
}

/// A zone change read back from the cluster's log is checked as one
/// planned on this node: a name that is not one of the zone's (as
/// `qualify` writes it), a pin name that collides with a name's
/// `_PORT._udp` answers, or a name edited twice is refused, and nothing
/// of it is applied.
#[test]
fn a_zone_change_from_the_log_is_checked_as_a_planned_one() {
    use crate::dns::{RecordSet, ZoneChange, ZoneError};
    use crate::machine::AuthorityError;
    use crate::machine::Command;
    let dir = crate::test_support::TempDir::new("machine-zone-check");
    let now = std::time::SystemTime::now();
    let mut machine = group_support::open_zoned(&dir, now);
    let records =
        || Some(RecordSet::new(vec!["fd71:7e57::1".parse().unwrap()], Vec::new(), None).unwrap());
    let next = machine.zone().unwrap().generation() + 1;
    let before = rows(&machine.authority().database());
    for edits in [
        vec![("_443._udp.a.internet2.test.".to_owned(), records())],
        vec![("A.internet2.test.".to_owned(), records())],
        vec![("a.example.".to_owned(), records())],
        vec![("internet2.test.".to_owned(), records())],
        vec![
            ("a.internet2.test.".to_owned(), records()),
            ("a.internet2.test.".to_owned(), None),
        ],
    ] {
        let shown = format!("{edits:?}");
        match machine.apply(Command::Zone(ZoneChange::from_parts(edits, next))) {
            Err(AuthorityError::Zone {
                source: ZoneError::NotAName(_),
                ..
            }) => {}
            other => panic!("{shown} was not refused as not a name: {other:?}"),
        }
    }
    assert_eq!(machine.zone().unwrap().generation(), next - 1);
    assert_eq!(rows(&machine.authority().database()), before);
    let good = vec![("a.internet2.test.".to_owned(), records())];
    machine
        .apply(Command::Zone(ZoneChange::from_parts(good, next)))
        .unwrap();
    assert!(machine.zone().unwrap().get("a.internet2.test.").is_some());
}

/// In a group every command shares one transaction (`crate::store`), so a
/// refused command must be refused before it writes anything: each kind of
/// refusal an apply can meet (a spent token, a name taken, what it is
/// issued on revoked, an entry the log holds, a zone change planned on an
/// older zone, a second revocation, a tick out of order, a grant past the
/// ledger's bound), some carrying a zone change that alone would apply,
/// leaves the store as it was, and the group goes on and is kept.
#[test]
fn a_command_refused_in_a_group_writes_nothing() {
    use crate::authority::ca::{IssueRequest, Usage};
    use crate::authority::logged::SpentToken;
    use crate::consensus::stake::Identity;
    use crate::consensus::state::{AdmissionChange, AdmissionConfig, AdmissionState};
    use crate::dns::{RecordSet, ZoneChange};
    use crate::machine::{Command, Machine};
    use group_support::request;
    let dir = crate::test_support::TempDir::new("machine-group-refusals");
    let now = std::time::SystemTime::now();
    let now_s = now.duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    let open = || {
        let mut machine = group_support::open_zoned(&dir, now);
        let state = AdmissionState::open(
            &machine.authority().database(),
            AdmissionConfig::default(),
            &dir.0.join("beacon.key"),
        )
        .unwrap();
        machine.attach_admission(state, now_s).unwrap();
        machine
    };
    let mut machine = open();
    let zone_change = |machine: &Machine, name: &str| -> ZoneChange {
        let records = RecordSet::new(vec!["fd71:7e57::1".parse().unwrap()], Vec::new(), None);
        machine
            .zone()
            .unwrap()
            .plan(vec![(
                format!("{name}.internet2.test."),
                Some(records.unwrap()),
            )])
            .unwrap()
            .unwrap()
    };
    let enrollment = |machine: &Machine, name: &str, token: u8| {
        let request = IssueRequest {
            usage: Usage::Client,
            ..request(name)
        };
        let (_, mut certify) = machine.authority().propose_issue(request, now).unwrap();
        certify.token = Some(SpentToken {
            id: [token; 16],
            expires_at_s: 0,
        });
        certify
    };

    machine.defer_durability();
    // Accepted in the group, before the refusals.
    let parent = machine.issue(request("parent.example"), now, None).unwrap();
    let on_parent = {
        let (_, certify) = machine
            .authority()
            .propose_issue(
                IssueRequest {
                    parent: Some(parent.certificate.serial),
                    ..request("child.example")
                },
                now,
            )
            .unwrap();
        certify
    };
    machine
        .revoke(parent.certificate.serial, None, now, None)
        .unwrap();
    let first = enrollment(&machine, "taken.example", 1);
    machine.apply(Command::Certify(first.clone())).unwrap();
    let stale_zone = zone_change(&machine, "stale");
    machine.change_zone(zone_change(&machine, "moved")).unwrap();
    let tick = machine.tick(now_s + 1).unwrap().unwrap();
    machine.grant(Identity([7; 32]), 10).unwrap();

    let with_zone = |machine: &Machine, mut certify: crate::authority::logged::Certify| {
        certify.zone = Some(zone_change(machine, "would-apply"));
        Command::Certify(certify)
    };
    type Propose<'a> = Box<dyn Fn(&Machine) -> Command + 'a>;
    let refusals: Vec<(&str, Propose)> = vec![
        (
            "a spent token, with a zone change",
            Box::new(|m| with_zone(m, enrollment(m, "again.example", 1))),
        ),
        (
            "a name taken, with a zone change",
            Box::new(|m| with_zone(m, enrollment(m, "taken.example", 2))),
        ),
        (
            "issued on a revoked certificate, with a zone change",
            Box::new(|m| with_zone(m, on_parent.clone())),
        ),
        (
            "an entry the log holds",
            Box::new(|_| {
                Command::Certify(crate::authority::logged::Certify {
                    token: None,
                    ..first.clone()
                })
            }),
        ),
        (
            "a zone change planned on an older zone",
            Box::new(|_| Command::Zone(stale_zone.clone())),
        ),
        (
            "a certificate with a zone change planned on an older zone",
            Box::new(|m| {
                let (_, mut certify) = m
                    .authority()
                    .propose_issue(request("fresh.example"), now)
                    .unwrap();
                certify.zone = Some(stale_zone.clone());
                Command::Certify(certify)
            }),
        ),
        (
            "a second revocation, with a zone change",
            Box::new(|m| {
                let mut revoke = m
                    .authority()
                    .propose_revocation(first.record.serial, None, now)
                    .unwrap();
                revoke.serial = parent.certificate.serial;
                revoke.zone = Some(zone_change(m, "would-apply"));
                Command::Revoke(revoke)
            }),
        ),
        (
            "a tick out of order",
            Box::new(|_| Command::Admission(AdmissionChange::BeaconTick(tick.clone()))),
        ),
        (
            "a grant past the ledger's bound",
            Box::new(|_| {
                Command::Admission(AdmissionChange::StakeGrant {
                    identity: Identity([7; 32]),
                    amount: u64::MAX,
                })
            }),
        ),
    ];
    for (what, command) in &refusals {
        let command = command(&machine);
        machine.settle().unwrap();
        let before = rows(&machine.authority().database());
        let refused = machine.apply(command);
        assert!(
            matches!(&refused, Err(e) if !e.is_storage_failure()),
            "{what}: not refused: {refused:?}"
        );
        machine.settle().unwrap();
        assert_eq!(
            rows(&machine.authority().database()),
            before,
            "{what}: the refused command wrote"
        );
    }
    // The group goes on after its refusals, and all of it is kept.
    let last = machine.issue(request("last.example"), now, None).unwrap();
    assert_eq!(machine.make_durable().unwrap(), 7 + refusals.len());
    let kept = rows(&machine.authority().database());
    drop(machine);
    let machine = open();
    assert_eq!(rows(&machine.authority().database()), kept);
    assert!(
        machine
            .authority()
            .certificate(&last.certificate.serial)
            .unwrap()
            .is_some()
    );
}
