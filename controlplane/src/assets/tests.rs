use super::*;
use crate::machine::tests::rows;
use crate::machine::{Machine, codec};
use crate::test_support::TempDir;
use std::time::SystemTime;

const OWNER: Owner = Owner([1; 32]);
const STRANGER: Owner = Owner([2; 32]);

fn open(dir: &TempDir) -> Machine {
    let mut machine = Machine::open(
        &dir.0,
        crate::authority::ca::KeyAlgorithm::Ed25519,
        crate::authority::ct::LogKeyAlgorithm::Ed25519,
        None,
        SystemTime::now(),
    )
    .unwrap();
    machine.set_asset_limits(StorageLimits {
        default_quota: 300 << 10,
        default_memory_quota: 64 << 20,
        node_max: 1 << 20,
        default_fuel_quota: 1000,
    });
    machine
}

fn node() -> NodeNumber {
    NodeNumber::new(3).unwrap()
}

/// The asset tables' rows (the rest of two stores differs: their keys).
fn asset_rows(machine: &Machine) -> crate::machine::tests::Rows {
    rows(&machine.authority().database())
        .into_iter()
        .filter(|(name, _)| name.starts_with("asset_"))
        .collect()
}

fn alloc(machine: &mut Machine, owner: Owner, size: u64) -> Result<AssetId, AuthorityErrorKind> {
    let id = machine.assets().next_id(node());
    match machine.change_assets(AssetChange::Alloc {
        owner,
        size,
        id,
        name: None,
        zone: None,
        limits: machine.assets().limits().into(),
    }) {
        Ok(AssetApplied::Allocated(id)) => Ok(id),
        Ok(other) => panic!("an allocation answered {other:?}"),
        Err(e) => Err(kind(e)),
    }
}

/// A refusal's kind, for comparing.
#[derive(Debug, PartialEq, Eq)]
enum AuthorityErrorKind {
    Unknown,
    Released,
    Forbidden,
    Range,
    Quota,
    Limit,
    Other(String),
}

fn kind(e: crate::authority::logged::AuthorityError) -> AuthorityErrorKind {
    use AuthorityErrorKind::*;
    match e {
        crate::authority::logged::AuthorityError::Asset(e) => match e {
            StorageError::Unknown(_) => Unknown,
            StorageError::Released(_) => Released,
            StorageError::Forbidden(_) => Forbidden,
            StorageError::OutOfRange { .. } | StorageError::CasLength { .. } => Range,
            StorageError::QuotaExceeded { .. } | StorageError::TooManyAssets => Quota,
            StorageError::NodeFull { .. }
            | StorageError::Size(_)
            | StorageError::TooManyGrants
            | StorageError::IdsExhausted
            | StorageError::NodeAssetsFull
            | StorageError::TooManyNames => Limit,
            StorageError::ReadLen(_) => Range,
            other => Other(other.to_string()),
        },
        other => Other(other.to_string()),
    }
}

#[test]
fn storage_assets_in_a_group_refusals_write_nothing_and_a_replay_and_a_restart_agree() {
    use AuthorityErrorKind::*;
    let dir = TempDir::new("assets-storage");
    let mut machine = open(&dir);
    machine.record_commands();
    machine.defer_durability();
    let a = alloc(&mut machine, OWNER, 200 << 10).unwrap();
    assert!(a.is_storage() && a.node() == 3, "{a:?}");
    // Across a chunk's end: two chunks written, read back in the group.
    let bytes: Vec<u8> = (0..20u8).collect();
    let write = |id, who, offset, data: &[u8]| AssetChange::Write {
        caller: who,
        id,
        offset,
        data: data.to_vec(),
    };
    // The machine's count of changes (what the VM front's checks are held
    // against) moves on for a write to an asset holding a checked module,
    // not for one to plain bytes.
    let changes = machine.changes();
    let count = || changes.load(std::sync::atomic::Ordering::Acquire);
    let before = count();
    machine.assets().set_module_checked(a, [7; 32]);
    machine
        .change_assets(write(a, OWNER, CHUNK_LEN - 7, &bytes))
        .unwrap();
    let after = count();
    assert!(after > before);
    assert_eq!(machine.assets().module_checked(a), None);
    machine
        .change_assets(write(a, OWNER, CHUNK_LEN - 7, &bytes))
        .unwrap();
    assert_eq!(count(), after);
    assert_eq!(
        machine.read_storage(&OWNER, a, CHUNK_LEN - 10, 26).unwrap(),
        [&[0u8; 3][..], &bytes, &[0u8; 3]].concat()
    );
    let cas = |expected: &[u8], new: &[u8]| AssetChange::Cas {
        caller: OWNER,
        id: a,
        offset: CHUNK_LEN - 7,
        expected: expected.to_vec(),
        new: new.to_vec(),
    };
    assert_eq!(
        machine.change_assets(cas(&[9, 9], &[5, 5])).unwrap(),
        AssetApplied::Swapped(false, vec![0, 1])
    );
    assert_eq!(
        machine.change_assets(cas(&[0, 1], &[5, 5])).unwrap(),
        AssetApplied::Swapped(true, vec![0, 1])
    );
    let b = alloc(&mut machine, OWNER, 1).unwrap();
    assert_ne!(a, b);

    let refusals: Vec<(&str, AssetChange, AuthorityErrorKind)> = vec![
        (
            "past the quota",
            AssetChange::Alloc {
                owner: OWNER,
                size: 100 << 10,
                id: machine.assets().next_id(node()),
                name: None,
                zone: None,
                limits: machine.assets().limits().into(),
            },
            Quota,
        ),
        (
            "an empty asset",
            AssetChange::Alloc {
                owner: OWNER,
                size: 0,
                id: machine.assets().next_id(node()),
                name: None,
                zone: None,
                limits: machine.assets().limits().into(),
            },
            Limit,
        ),
        (
            "an identifier not the counter's next",
            AssetChange::Alloc {
                owner: OWNER,
                size: 1,
                id: a,
                name: None,
                zone: None,
                limits: machine.assets().limits().into(),
            },
            Other("another storage asset was allocated since this one was planned; retry".into()),
        ),
        (
            "past the end",
            write(a, OWNER, (200 << 10) - 1, &[1, 2]),
            Range,
        ),
        (
            "an offset that wraps",
            write(a, OWNER, u64::MAX, &[1]),
            Range,
        ),
        ("a stranger's write", write(a, STRANGER, 0, &[1]), Forbidden),
        (
            "a stranger's free",
            AssetChange::Free {
                caller: STRANGER,
                id: a,
                zone: None,
            },
            Forbidden,
        ),
        (
            "a stranger's grant",
            AssetChange::Grant {
                caller: STRANGER,
                id: a,
                grantee: STRANGER,
                access: Some(Access::Write),
                limits: machine.assets().limits().into(),
            },
            Forbidden,
        ),
        (
            "a compare-and-swap of two lengths",
            cas(&[1], &[1, 2]),
            Range,
        ),
        (
            "an identifier never handed out",
            write(storage_id(node(), 1 << 30), OWNER, 0, &[1]),
            Unknown,
        ),
    ];
    for (what, change, expected) in refusals {
        machine.settle().unwrap();
        let before = asset_rows(&machine);
        let refused = machine.change_assets(change).map_err(kind);
        assert_eq!(refused, Err(expected), "{what}");
        machine.settle().unwrap();
        assert_eq!(asset_rows(&machine), before, "{what}: the refusal wrote");
    }
    assert_eq!(
        machine.read_storage(&STRANGER, a, 0, 1).map_err(kind),
        Err(Forbidden)
    );
    assert_eq!(
        machine
            .read_storage(&OWNER, a, 0, STORAGE_READ_LEN_MAX + 1)
            .map_err(kind),
        Err(Range),
        "a read past the bound is refused before anything is built"
    );

    // Grants: read, then write; each costs its owner 64 bytes.
    let limits = machine.assets().limits().into();
    let grant = |access| AssetChange::Grant {
        caller: OWNER,
        id: a,
        grantee: STRANGER,
        access,
        limits,
    };
    assert_eq!(
        machine.change_assets(grant(Some(Access::Read))).unwrap(),
        AssetApplied::Granted(true)
    );
    assert_eq!(
        machine.change_assets(grant(Some(Access::Read))).unwrap(),
        AssetApplied::Granted(false)
    );
    assert_eq!(
        machine
            .read_storage(&STRANGER, a, CHUNK_LEN - 7, 2)
            .unwrap(),
        [5, 5]
    );
    assert_eq!(
        machine
            .change_assets(write(a, STRANGER, 0, &[1]))
            .map_err(kind),
        Err(Forbidden)
    );
    machine.change_assets(grant(Some(Access::Write))).unwrap();
    machine.change_assets(write(a, STRANGER, 0, &[42])).unwrap();
    let charged = (200 << 10) + 1 + 2 * ASSET_OVERHEAD_BYTES + GRANT_OVERHEAD_BYTES;
    assert_eq!(machine.assets().used_by(&OWNER), charged);

    // The operator's quota for the stranger.
    machine
        .change_assets(AssetChange::Quota {
            owner: STRANGER,
            quota: super::Quota {
                memory: Some(8 << 10),
                storage: Some(100),
                fuel: None,
            },
        })
        .unwrap();
    assert_eq!(alloc(&mut machine, STRANGER, 1), Err(Quota));
    assert_eq!(
        machine.assets().memory_limits().get(&STRANGER),
        Some(&(8 << 10))
    );
    assert_eq!(
        machine.make_durable().unwrap(),
        23,
        "each command counts, refused or not"
    );

    // A replay on a fresh store writes the same rows.
    let commands = machine.take_commands();
    let other_dir = TempDir::new("assets-replay");
    let mut other = open(&other_dir);
    for command in &commands {
        let bytes = codec::encode(command).unwrap();
        assert_eq!(codec::decode(&bytes).as_ref(), Some(command));
        for cut in [1, bytes.len() / 2, bytes.len() - 1] {
            assert_eq!(codec::decode(&bytes[..cut]), None, "cut at {cut}");
        }
        other.apply(command.clone()).unwrap();
    }
    assert_eq!(asset_rows(&other), asset_rows(&machine));

    // A restart loads the same state.
    let kept = asset_rows(&machine);
    let totals = machine.assets().totals();
    drop(machine);
    let mut machine = open(&dir);
    assert_eq!(asset_rows(&machine), kept);
    assert_eq!(machine.assets().totals(), totals);
    assert_eq!(machine.assets().used_by(&OWNER), charged);
    assert_eq!(
        alloc(&mut machine, STRANGER, 1),
        Err(Quota),
        "the quota stays"
    );
    assert_eq!(machine.read_storage(&STRANGER, a, 0, 1).unwrap(), [42]);

    // Free: every byte returns and no chunk is left; the identifier
    // answers "released", and is never handed out again.
    assert_eq!(
        machine
            .change_assets(AssetChange::Free {
                caller: OWNER,
                id: a,
                zone: None,
            })
            .unwrap(),
        AssetApplied::Freed(200 << 10)
    );
    assert_eq!(chunk_rows(&machine.authority().database()), 0);
    assert_eq!(
        machine.read_storage(&OWNER, a, 0, 1).map_err(kind),
        Err(Released)
    );
    assert_eq!(machine.assets().used_by(&OWNER), 1 + ASSET_OVERHEAD_BYTES);
    let c = alloc(&mut machine, OWNER, 1).unwrap();
    assert!(c > b, "{c:?} after {b:?}");
    let totals = machine.assets().totals();
    assert_eq!((totals.assets, totals.bytes), (2, 2));
    assert_eq!((totals.freed_assets, totals.freed_bytes), (1, 200 << 10));
}

#[test]
fn storage_identifiers_and_records_round_trip_and_bad_ones_are_refused() {
    for seq in [0, 1, BLOCK_LEN - 1, BLOCK_LEN, SEQUENCE_END - 1] {
        let id = storage_id(node(), seq);
        assert!(id.is_storage());
        assert_eq!(sequence_of(id), Some(seq));
    }
    let memory = AssetId::new(node(), 5, 7);
    assert!(!memory.is_storage());
    assert_eq!(sequence_of(memory), None);
    let record = Record {
        owner: OWNER,
        size: 77,
        grants: vec![(STRANGER, Access::Write), (Owner([3; 32]), Access::Read)],
        name: Some("notes.assets.internet2.test.".into()),
    };
    let bytes = record.encode();
    assert_eq!(Record::decode(&bytes), Some(record));
    assert_eq!(Record::decode(&bytes[..bytes.len() - 1]), None);
    assert_eq!(Record::decode(&[bytes.as_slice(), &[0]].concat()), None);
    let quota = Quota {
        memory: None,
        storage: Some(9),
        fuel: Some(5),
    };
    assert_eq!(decode_quota(&encode_quota(&quota)), Some(quota));
    assert_eq!(decode_quota(&[4; 17]), None);
    assert_eq!(decode_quota(&[8; 25]), None);
    // A row written before VMs had fuel: 17 bytes.
    let old = &encode_quota(&Quota {
        fuel: None,
        ..quota
    })[..17];
    assert_eq!(
        decode_quota(old),
        Some(Quota {
            fuel: None,
            ..quota
        })
    );
}

#[test]
fn an_owner_names_at_most_its_share_of_the_zone_and_a_free_gives_one_back() {
    let dir = TempDir::new("assets-names");
    let mut machine = open(&dir);
    let named = |machine: &mut Machine, n: usize| {
        machine.change_assets(AssetChange::Alloc {
            owner: OWNER,
            size: 1,
            id: machine.assets().next_id(node()),
            name: Some(format!("a{n}.assets.internet2.test.")),
            zone: None,
            limits: machine.assets().limits().into(),
        })
    };
    let mut first = None;
    for n in 0..NAMED_PER_OWNER_MAX {
        let applied = named(&mut machine, n).unwrap();
        first.get_or_insert(applied);
    }
    assert!(matches!(
        named(&mut machine, NAMED_PER_OWNER_MAX),
        Err(crate::authority::logged::AuthorityError::Asset(
            StorageError::TooManyNames
        ))
    ));
    assert_eq!(
        alloc(&mut machine, OWNER, 1).map(|_| ()),
        Ok(()),
        "unnamed ones go on"
    );
    let Some(AssetApplied::Allocated(id)) = first else {
        panic!("no first asset");
    };
    machine
        .change_assets(AssetChange::Free {
            caller: OWNER,
            id,
            zone: None,
        })
        .unwrap();
    named(&mut machine, NAMED_PER_OWNER_MAX).unwrap();
}

/// Proposals in flight take identifiers past the counter; the apply takes
/// any at or past it (the ones skipped are never handed out) and refuses
/// one the counter passed. Limits come from the command, not the replica.
#[test]
fn an_allocation_takes_its_proposed_identifier_and_the_proposers_limits() {
    use AuthorityErrorKind::*;
    let dir = TempDir::new("assets-ahead");
    let mut machine = open(&dir);
    let first = machine.assets().next_sequence();
    let alloc_at = |machine: &mut Machine, seq: u64, limits: AllocLimits| {
        machine.change_assets(AssetChange::Alloc {
            owner: OWNER,
            size: 1,
            id: storage_id(node(), seq),
            name: None,
            zone: None,
            limits,
        })
    };
    let limits: AllocLimits = machine.assets().limits().into();
    // Two ahead of the counter: taken, and the counter moves past it.
    let ahead = alloc_at(&mut machine, first + 2, limits).unwrap();
    assert_eq!(
        ahead,
        AssetApplied::Allocated(storage_id(node(), first + 2))
    );
    assert_eq!(machine.assets().next_sequence(), first + 3);
    // The skipped identifier and the taken one: both behind the counter now.
    for seq in [first, first + 2] {
        assert_eq!(
            kind(alloc_at(&mut machine, seq, limits).unwrap_err()),
            Other("another storage asset was allocated since this one was planned; retry".into())
        );
    }
    assert_eq!(
        kind(
            machine
                .read_storage(&OWNER, storage_id(node(), first), 0, 1)
                .unwrap_err()
        ),
        Released
    );
    // The command's limits decide, whatever this replica's configuration.
    let tight = AllocLimits {
        default_quota: 100,
        node_max: u64::MAX,
    };
    let next = machine.assets().next_sequence();
    assert_eq!(
        kind(alloc_at(&mut machine, next, tight).unwrap_err()),
        Quota
    );
    let roomy = AllocLimits {
        default_quota: 1 << 40,
        node_max: 1 << 40,
    };
    let big = machine.change_assets(AssetChange::Alloc {
        owner: OWNER,
        size: 2 << 20,
        id: storage_id(node(), next),
        name: None,
        zone: None,
        limits: roomy,
    });
    assert!(big.is_ok(), "{big:?}");
    // And the command carries them.
    let change = AssetChange::Alloc {
        owner: OWNER,
        size: 1,
        id: storage_id(node(), 9),
        name: None,
        zone: None,
        limits: tight,
    };
    let command = crate::machine::Command::Asset(change.clone());
    assert_eq!(
        codec::decode(&codec::encode(&command).unwrap()).unwrap(),
        command
    );
}
