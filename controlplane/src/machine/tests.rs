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
