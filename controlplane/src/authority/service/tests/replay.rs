//! The state machine's promise: the commands a node applied, applied in
//! order to a fresh store that holds the same keys, give the same store,
//! table by table and row by row (what every replica of a cluster holds).

use super::zone_kinds::{dns_set, zone_service_config};
use super::*;
use crate::assets::{AssetApplied, AssetChange};
use crate::consensus::stake::Identity as StakeIdentity;
use crate::consensus::state::{AdmissionConfig, AdmissionState};
use crate::machine::{Command, Machine, codec};

const BEACON_KEY: &str = "beacon-node.key";

fn replica(dir: &Path, config: &ServiceConfig, now: SystemTime) -> Machine {
    let mut machine = Machine::open(
        dir,
        config.ca_algorithm,
        config.log_algorithm,
        config.zone.as_ref(),
        now,
    )
    .unwrap();
    let state = AdmissionState::open(
        &machine.authority().database(),
        AdmissionConfig::default(),
        &dir.join(BEACON_KEY),
    )
    .unwrap();
    machine.adopt_admission(state);
    machine
}

#[test]
fn commands_replayed_on_a_fresh_store_give_the_same_store() {
    let config = zone_service_config();
    let dir = TempDir::new("replay-origin");
    let now = SystemTime::now();
    let mut service = AuthorityService::open(&dir.0, config.clone(), now).unwrap();
    service.machine_mut().record_commands();
    let path = dir.0.join("operator.pem");
    service.ensure_operator_identity(&path, now).unwrap();
    let operator = Caller {
        cert_der: Some(first_cert(&std::fs::read_to_string(&path).unwrap())),
    };
    let mut f = Fixture {
        dir,
        service,
        operator: operator.clone(),
        now,
    };

    // The zone: the server's own records.
    let pin = f.service.server_spki_sha256().unwrap();
    f.service
        .register_server(config.zone.as_ref().unwrap(), pin, now)
        .unwrap();
    // Admission: the tick at start, stake, a plot, a withdrawal, a tick.
    let state = AdmissionState::open(
        &f.service.authority().database(),
        AdmissionConfig::default(),
        &f.dir.0.join(BEACON_KEY),
    )
    .unwrap();
    let now_s = unix_s(now);
    let machine = f.service.machine_mut();
    machine.attach_admission(state, now_s).unwrap();
    let staker = StakeIdentity([5; 32]);
    machine.grant(staker, 40).unwrap();
    let k = AdmissionConfig::default().space.k();
    machine.register_plot(staker, [6; 32], k).unwrap();
    assert_eq!(machine.withdraw(staker, 15).unwrap(), 25);
    machine.tick(now_s + 1).unwrap().unwrap();
    // Assets: a storage asset written past its first chunk and granted,
    // and an identity's quotas.
    let owner = dataplane::assets::memory::Owner([5; 32]);
    let node = dataplane::assets::address::NodeNumber::new(0).unwrap();
    let asset = match machine
        .change_assets(AssetChange::Alloc {
            owner,
            size: 100_000,
            id: machine.assets().next_id(node),
            name: None,
            zone: None,
            limits: machine.assets().limits().into(),
        })
        .unwrap()
    {
        AssetApplied::Allocated(id) => id,
        other => panic!("an allocation answered {other:?}"),
    };
    machine
        .change_assets(AssetChange::Write {
            caller: owner,
            id: asset,
            offset: 70_000,
            data: vec![7; 10],
        })
        .unwrap();
    machine
        .change_assets(AssetChange::Grant {
            caller: owner,
            id: asset,
            grantee: dataplane::assets::memory::Owner([6; 32]),
            access: Some(dataplane::assets::memory::Access::Read),
            limits: machine.assets().limits().into(),
        })
        .unwrap();
    machine
        .change_assets(AssetChange::Quota {
            owner: dataplane::assets::memory::Owner([6; 32]),
            quota: crate::assets::Quota {
                memory: Some(4096),
                storage: None,
                fuel: Some(77),
            },
        })
        .unwrap();
    // The CA: an enrolled client; a server certificate it has issued on
    // its authority for its name (pinned in the zone); its records; a
    // renewal; the operator revoking the client, which takes what was
    // issued on its authority along and unpins it.
    let (_, client, key) = f.enroll(&["app.internet2.test"]);
    let server_csr = csr_with(&key, &["app.internet2.test"]);
    let server = f.issue(&client, &server_csr, CertUsage::Server);
    dns_set(&mut f, &client, "app", &["2001:db8::a"], &[]);
    let renewed: Issued = f
        .call(
            &client,
            CERT_RENEW,
            json!({ "certificate_pem": server.certificate_pem }),
        )
        .unwrap();
    let client_serial = ca::serial_of(client.cert_der.as_ref().unwrap()).unwrap();
    f.call::<Revoked>(
        &operator,
        CERT_REVOKE,
        json!({ "serial": client_serial.to_string() }),
    )
    .unwrap();
    let revoked = f.service.authority().revocations();
    let renewed_serial = parse_serial("serial", &renewed.serial).unwrap();
    assert!(revoked.is_revoked(renewed_serial.as_bytes()));

    let commands = f.service.machine_mut().take_commands();
    let count = |kind: fn(&Command) -> bool| commands.iter().filter(|c| kind(c)).count();
    assert_eq!(count(|c| matches!(c, Command::Certify(_))), 4);
    assert_eq!(count(|c| matches!(c, Command::Revoke(_))), 1);
    assert_eq!(count(|c| matches!(c, Command::Zone(_))), 2);
    assert_eq!(count(|c| matches!(c, Command::Admission(_))), 5);
    assert_eq!(count(|c| matches!(c, Command::Asset(_))), 4);

    // What a replica receives is the commands' bytes: each reads back as
    // itself, and nothing but those exact bytes reads back at all.
    let encoded: Vec<Vec<u8>> = commands.iter().map(|c| codec::encode(c).unwrap()).collect();
    for (command, bytes) in commands.iter().zip(&encoded) {
        assert_eq!(codec::decode(bytes).as_ref(), Some(command));
        for cut in 0..bytes.len() {
            assert_eq!(
                codec::decode(&bytes[..cut]),
                None,
                "{cut} bytes of {command:?}"
            );
        }
        let longer = [bytes.as_slice(), &[0]].concat();
        assert_eq!(codec::decode(&longer), None);
        let mut other_version = bytes.clone();
        other_version[0] = 2;
        assert_eq!(codec::decode(&other_version), None);
    }

    let replica_dir = TempDir::new("replay-replica");
    crate::test_support::copy_cluster_keys(&f.dir.0, &replica_dir.0);
    let mut replica = replica(&replica_dir.0, &config, now);
    for bytes in &encoded {
        replica.apply(codec::decode(bytes).unwrap()).unwrap();
    }

    let expected = crate::machine::tests::rows(&f.service.authority().database());
    let replayed = crate::machine::tests::rows(&replica.authority().database());
    assert_eq!(
        expected.keys().collect::<Vec<_>>(),
        replayed.keys().collect::<Vec<_>>()
    );
    for (table, rows) in &expected {
        assert!(!rows.is_empty(), "the scenario leaves {table} empty");
        assert_eq!(rows, &replayed[table], "table {table} differs");
    }
    // And what the replica holds in memory.
    assert_eq!(replica.authority().revocations(), revoked);
    assert_eq!(
        replica.assets().totals(),
        f.service.machine().assets().totals()
    );
    assert_eq!(
        replica.assets().memory_limits(),
        f.service.machine().assets().memory_limits()
    );
    assert_eq!(replica.zone().unwrap().snapshot(), f.service.zone());
    let origin = f.service.machine_mut();
    let (ours, theirs) = (origin.admission().unwrap(), replica.admission().unwrap());
    assert_eq!(ours.list(), theirs.list());
    assert_eq!(ours.plot(&staker), theirs.plot(&staker));
    assert_eq!(ours.latest_tick(), theirs.latest_tick());
    assert_eq!(
        origin.authority().log().latest_sth(),
        replica.authority().log().latest_sth()
    );
}
