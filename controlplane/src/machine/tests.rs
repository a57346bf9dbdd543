//! The store read back table by table, row by row, as raw bytes: what two
//! replicas that applied the same commands must agree on.

use crate::authority::ct::log;
use crate::authority::registry;
use crate::consensus::state;
use crate::dns::store;
use redb::{Database, Key, ReadTransaction, ReadableDatabase, TableDefinition, TableHandle, Value};
use std::collections::BTreeMap;

/// Every row of every table, by table name.
pub(crate) type Rows = BTreeMap<String, Vec<(Vec<u8>, Vec<u8>)>>;

fn read<K: Key + 'static, V: Value + 'static>(
    txn: &ReadTransaction,
    table: TableDefinition<K, V>,
    out: &mut Rows,
) {
    let name = table.name().to_owned();
    let table = txn.open_table(table).unwrap();
    let rows = redb::ReadableTable::iter(&table)
        .unwrap()
        .map(|row| {
            let (k, v) = row.unwrap();
            (
                K::as_bytes(&k.value()).as_ref().to_vec(),
                V::as_bytes(&v.value()).as_ref().to_vec(),
            )
        })
        .collect();
    out.insert(name, rows);
}

/// The whole store. Fails when the file holds a table this does not read,
/// so a table added later cannot escape the comparison.
pub(crate) fn rows(db: &Database) -> Rows {
    let txn = db.begin_read().unwrap();
    let mut out = Rows::new();
    read(&txn, log::LEAVES, &mut out);
    read(&txn, log::LEAF_HASHES, &mut out);
    read(&txn, log::INDEX_BY_HASH, &mut out);
    read(&txn, log::STHS, &mut out);
    read(&txn, log::META, &mut out);
    read(&txn, registry::CERTIFICATES, &mut out);
    read(&txn, registry::REVOCATIONS, &mut out);
    read(&txn, registry::CHILDREN, &mut out);
    read(&txn, registry::RENEWALS, &mut out);
    read(&txn, registry::ENROLLMENT_TOKENS, &mut out);
    read(&txn, registry::ENROLLMENT_PAID, &mut out);
    read(&txn, store::RECORDS, &mut out);
    read(&txn, store::META, &mut out);
    read(&txn, state::STAKE, &mut out);
    read(&txn, state::PLOTS, &mut out);
    read(&txn, state::BEACON, &mut out);
    for table in txn.list_tables().unwrap() {
        assert!(
            out.contains_key(table.name()),
            "table {} is not compared",
            table.name()
        );
    }
    out
}

mod group {
    use crate::authority::ca::{IssueRequest, KeyAlgorithm};
    use crate::authority::ct::LogKeyAlgorithm;
    use crate::machine::Machine;
    use crate::test_support::TempDir;
    use std::time::SystemTime;

    fn request(name: &str) -> IssueRequest {
        IssueRequest {
            subject: name.into(),
            dns_names: vec![name.into()],
            ..IssueRequest::default()
        }
    }

    fn open(dir: &TempDir, now: SystemTime) -> Machine {
        Machine::open(
            &dir.0,
            KeyAlgorithm::Ed25519,
            LogKeyAlgorithm::Ed25519,
            None,
            now,
        )
        .unwrap()
    }

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
