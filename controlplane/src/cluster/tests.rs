//! Three nodes in one process over an in-memory network, on one
//! current-thread runtime: what the cluster promises, without sockets.
//! Every message crosses as the bytes `super::rpc` makes of it.

use super::local::Routes;
use super::*;
use crate::authority::ca::{IssueRequest, KeyAlgorithm};
use crate::authority::ct::LogKeyAlgorithm;
use crate::machine::tests::rows;
use crate::machine::{Applied, Command, Machine};
use crate::test_support::{TempDir, copy_cluster_keys};
use openraft::{Config, SnapshotPolicy};
use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

struct Node {
    _dir: TempDir,
    machine: Rc<RefCell<Machine>>,
    raft: Raft,
}

fn open_machine(dir: &TempDir) -> Machine {
    Machine::open(
        &dir.0,
        KeyAlgorithm::Ed25519,
        LogKeyAlgorithm::Ed25519,
        None,
        SystemTime::now(),
    )
    .unwrap()
}

/// Three nodes sharing one CA and log key, not yet initialized.
async fn cluster(tag: &str, routes: &Routes, config: Config) -> Vec<Node> {
    let config = Arc::new(config.validate().unwrap());
    // The cluster's keys, made once and given to every node.
    let keys = TempDir::new(&format!("{tag}-keys"));
    drop(open_machine(&keys));
    let mut nodes = Vec::new();
    for id in 1..=3u64 {
        let dir = TempDir::new(&format!("{tag}-{id}"));
        copy_cluster_keys(&keys.0, &dir.0);
        let machine = Rc::new(RefCell::new(open_machine(&dir)));
        let raft = super::local::start(id, routes, config.clone(), &dir.0, machine.clone())
            .await
            .unwrap();
        nodes.push(Node {
            _dir: dir,
            machine,
            raft,
        });
    }
    let members = members();
    nodes[0].raft.initialize(members).await.unwrap();
    nodes
}

/// Nodes 1 to 3, on the test prefix.
fn members() -> BTreeMap<u64, Member> {
    (1..=3)
        .map(|id| {
            let member = Member {
                name: format!("node{id}"),
                address: format!("[fd71:7e57::{id}]:443"),
                locator: None,
            };
            (id, member)
        })
        .collect()
}

/// Elections only when a leader is silent for a second or more: a test
/// machine busy with other tests must not depose a leader that is fine.
fn config() -> Config {
    Config {
        heartbeat_interval: 100,
        election_timeout_min: 1000,
        election_timeout_max: 2000,
        ..Config::default()
    }
}

fn run(test: impl std::future::Future<Output = ()>) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    tokio::task::LocalSet::new().block_on(&runtime, test);
}

const WAIT: Option<Duration> = Some(Duration::from_secs(10));

async fn leader(nodes: &[Node]) -> &Node {
    let metrics = nodes[0]
        .raft
        .wait(WAIT)
        .metrics(|m| m.current_leader.is_some(), "a leader")
        .await
        .unwrap();
    let id = metrics.current_leader.unwrap();
    &nodes[(id - 1) as usize]
}

fn request(name: &str) -> IssueRequest {
    IssueRequest {
        subject: name.into(),
        dns_names: vec![name.into()],
        ..IssueRequest::default()
    }
}

/// Propose an issuance on `leader` and commit it; the serial.
async fn issue(leader: &Node, name: &str) -> crate::authority::ca::Serial {
    let (certificate, certify) = leader
        .machine
        .borrow()
        .authority()
        .propose_issue(request(name), SystemTime::now())
        .unwrap();
    let written = leader
        .raft
        .client_write(Command::Certify(certify))
        .await
        .unwrap();
    assert!(
        matches!(written.data, Outcome::Applied(Applied::Certified(_))),
        "{:?}",
        written.data
    );
    certificate.serial
}

/// Every node applied up to `index` and holds the same store.
async fn same_everywhere(nodes: &[Node], index: u64) {
    for node in nodes {
        node.raft
            .wait(WAIT)
            .applied_index_at_least(Some(index), "applied")
            .await
            .unwrap();
    }
    let first = rows(&nodes[0].machine.borrow().authority().database());
    for node in &nodes[1..] {
        let machine = node.machine.borrow();
        assert_eq!(rows(&machine.authority().database()), first);
        assert_eq!(
            machine.authority().revocations(),
            nodes[0].machine.borrow().authority().revocations()
        );
        assert_eq!(
            machine.authority().log().latest_sth(),
            nodes[0].machine.borrow().authority().log().latest_sth()
        );
    }
}

#[test]
fn three_nodes_apply_the_same_commands_and_refuse_alike() {
    run(async {
        let routes = Routes::default();
        let nodes = cluster("raft-three", &routes, config()).await;
        let leader = leader(&nodes).await;
        let mut serials = Vec::new();
        for i in 0..5 {
            serials.push(issue(leader, &format!("n{i}.example")).await);
        }
        // Two revocations of one certificate, both proposed before either
        // applies: the first revokes, the second is refused on every node.
        let propose = || {
            leader
                .machine
                .borrow()
                .authority()
                .propose_revocation(serials[0], None, SystemTime::now())
                .unwrap()
        };
        let (first, second) = (propose(), propose());
        let revoked = leader
            .raft
            .client_write(Command::Revoke(first))
            .await
            .unwrap();
        assert!(
            matches!(&revoked.data, Outcome::Applied(Applied::Revoked(s)) if s == &[serials[0]]),
            "{:?}",
            revoked.data
        );
        let refused = leader
            .raft
            .client_write(Command::Revoke(second))
            .await
            .unwrap();
        assert!(
            matches!(refused.data, Outcome::Refused(_)),
            "{:?}",
            refused.data
        );
        same_everywhere(&nodes, refused.log_id.index).await;
        let log_size = nodes[2].machine.borrow().authority().log().size();
        assert_eq!(log_size, 5);
        for node in &nodes {
            node.raft.shutdown().await.unwrap();
        }
    });
}

#[test]
fn a_node_cut_off_catches_up_from_a_snapshot() {
    run(async {
        let routes = Routes::default();
        let config = Config {
            // Snapshots only when asked, and nothing kept behind them: the
            // node that was away cannot be sent the entries it missed.
            snapshot_policy: SnapshotPolicy::Never,
            max_in_snapshot_log_to_keep: 0,
            // In many chunks, each read from the leader's file and written
            // into the node's.
            snapshot_max_chunk_size: 1024,
            ..config()
        };
        let nodes = cluster("raft-snapshot", &routes, config).await;
        let leader = leader(&nodes).await;
        issue(leader, "before.example").await;
        let away = nodes
            .iter()
            .find(|n| n.raft.metrics().borrow().id != leader.raft.metrics().borrow().id)
            .unwrap();
        let away_id = away.raft.metrics().borrow().id;
        routes.down.borrow_mut().insert(away_id);
        let mut last = None;
        for i in 0..20 {
            let serial = issue(leader, &format!("while-away-{i}.example")).await;
            last = Some(serial);
        }
        let applied = leader.raft.metrics().borrow().last_applied.unwrap();
        leader.raft.trigger().snapshot().await.unwrap();
        leader
            .raft
            .wait(WAIT)
            .snapshot(applied, "snapshot built")
            .await
            .unwrap();
        leader
            .raft
            .trigger()
            .purge_log(applied.index)
            .await
            .unwrap();
        leader
            .raft
            .wait(WAIT)
            .metrics(|m| m.purged == Some(applied), "log purged")
            .await
            .unwrap();

        routes.down.borrow_mut().remove(&away_id);
        same_everywhere(&nodes, applied.index).await;
        let metrics = away.raft.metrics().borrow().clone();
        assert_eq!(
            metrics.snapshot,
            Some(applied),
            "it caught up from the snapshot"
        );
        {
            let away_machine = away.machine.borrow();
            assert!(
                away_machine
                    .authority()
                    .certificate(&last.unwrap())
                    .unwrap()
                    .is_some(),
                "what it missed is in its registry"
            );
            assert_eq!(away_machine.authority().log().size(), 21);
            let leader_machine = leader.machine.borrow();
            let files = |machine: &Machine| {
                snapshot_file::SnapshotPaths::beside(machine.authority().store_path())
            };
            let sent = std::fs::read(files(&leader_machine).current).unwrap();
            assert!(sent.len() > 10 * 1024, "{} bytes", sent.len());
            assert_eq!(
                std::fs::read(files(&away_machine).current).unwrap(),
                sent,
                "the node holds the file it was sent"
            );
            assert!(!files(&away_machine).receiving.exists());
        }
        for node in &nodes {
            node.raft.shutdown().await.unwrap();
        }
    });
}

#[test]
fn raft_values_read_back_as_written_and_nothing_else() {
    use super::codec::*;
    use openraft::{
        CommittedLeaderId, Entry, EntryPayload, LogId, Membership, StoredMembership, Vote,
    };
    let log_id = LogId::new(CommittedLeaderId::new(7, 2), 41);
    let members = members();
    let membership = Membership::new(vec![BTreeSet::from([1, 2, 3])], members);
    let stored = StoredMembership::new(Some(log_id), membership.clone());
    let bytes = encode_stored_membership(&stored);
    assert_eq!(decode_stored_membership(&bytes), Some(stored));
    for cut in 0..bytes.len() {
        assert_eq!(decode_stored_membership(&bytes[..cut]), None);
    }
    // No configuration, or an empty one, is refused: an empty voter set
    // would make any vote a quorum.
    for configs in [vec![], vec![BTreeSet::<u64>::new()]] {
        let mut bytes = Vec::new();
        encode_optional_log_id(None, &mut bytes);
        bytes.push(configs.len() as u8);
        for _ in &configs {
            bytes.extend_from_slice(&0u16.to_be_bytes());
        }
        bytes.extend_from_slice(&0u16.to_be_bytes());
        assert_eq!(decode_stored_membership(&bytes), None);
    }
    let vote = Vote::new_committed(7, 2);
    assert_eq!(decode_vote(&encode_vote(&vote)), Some(vote));
    assert_eq!(decode_vote(&[&encode_vote(&vote)[..], &[0]].concat()), None);
    for payload in [EntryPayload::Blank, EntryPayload::Membership(membership)] {
        let entry: Entry<TypeConfig> = Entry { log_id, payload };
        let bytes = encode_entry(&entry).unwrap();
        assert_eq!(decode_entry(&bytes), Some(entry));
        for cut in 0..bytes.len() {
            assert_eq!(decode_entry(&bytes[..cut]), None, "{cut}");
        }
        assert_eq!(decode_entry(&[&bytes[..], &[0]].concat()), None);
    }
}

#[test]
fn a_cut_off_leader_commits_nothing_and_the_log_never_forks() {
    use crate::authority::ct::{verify_consistency, verify_sth};
    run(async {
        let routes = Routes::default();
        let nodes = cluster("raft-failover", &routes, config()).await;
        let first = leader(&nodes).await;
        let first_id = first.raft.metrics().borrow().id;
        let mut acknowledged = Vec::new();
        for i in 0..5 {
            acknowledged.push(issue(first, &format!("first-{i}.example")).await);
        }
        // The leader is cut off (as if killed, or on the minority side of
        // a partition). What it is asked now is never acknowledged.
        routes.down.borrow_mut().insert(first_id);
        let (_, stranded) = first
            .machine
            .borrow()
            .authority()
            .propose_issue(request("stranded.example"), SystemTime::now())
            .unwrap();
        let write = first.raft.client_write(Command::Certify(stranded.clone()));
        assert!(
            tokio::time::timeout(Duration::from_secs(2), write)
                .await
                .map_or(true, |written| written.is_err()),
            "a leader without a majority acknowledged a write"
        );
        // The other two elect a leader and go on.
        let others: Vec<&Node> = nodes
            .iter()
            .filter(|n| n.raft.metrics().borrow().id != first_id)
            .collect();
        let metrics = others[0]
            .raft
            .wait(WAIT)
            .metrics(
                |m| m.current_leader.is_some_and(|l| l != first_id),
                "a new leader",
            )
            .await
            .unwrap();
        let second = &nodes[(metrics.current_leader.unwrap() - 1) as usize];
        for i in 0..5 {
            acknowledged.push(issue(second, &format!("second-{i}.example")).await);
        }
        let last = second.raft.metrics().borrow().last_applied.unwrap();

        // The old leader comes back, follows, and drops what it alone had.
        routes.down.borrow_mut().remove(&first_id);
        same_everywhere(&nodes, last.index).await;
        let public_key = second.machine.borrow().authority().log().public_key();
        for node in &nodes {
            let machine = node.machine.borrow();
            let authority = machine.authority();
            for serial in &acknowledged {
                assert!(authority.certificate(serial).unwrap().is_some());
            }
            assert!(
                authority
                    .certificate(&stranded.record.serial)
                    .unwrap()
                    .is_none(),
                "the cut-off leader's write was never committed"
            );
            // Every tree head any node signed is consistent with the
            // latest, checked with the independent verifier.
            let log = authority.log();
            let latest = log.latest_sth().unwrap();
            for sth in log.stored_sths().unwrap() {
                verify_sth(&sth, &public_key, LogKeyAlgorithm::Ed25519).unwrap();
                let proof = log
                    .consistency_proof(sth.tree_size, latest.tree_size)
                    .unwrap();
                verify_consistency(
                    sth.tree_size,
                    latest.tree_size,
                    &sth.root_hash,
                    &latest.root_hash,
                    &proof,
                )
                .unwrap();
            }
        }
        for node in &nodes {
            node.raft.shutdown().await.unwrap();
        }
    });
}

mod authority {
    //! The authority's requests answered through the log: three members,
    //! each with its service, the in-memory network between them.

    use super::*;
    use crate::authority::api::{self, CtKey, Issued, LogPublicKey, Revoked};
    use crate::authority::enrollment::{DEFAULT_TTL, mint};
    use crate::authority::service::{AuthorityService, Caller, ServiceConfig};

    struct Member {
        dir: TempDir,
        authority: ClusterAuthority,
    }

    fn service_config() -> ServiceConfig {
        ServiceConfig {
            server_names: vec!["node.internet2.test".into()],
            ca_algorithm: KeyAlgorithm::Ed25519,
            log_algorithm: LogKeyAlgorithm::Ed25519,
            ..ServiceConfig::default()
        }
    }

    async fn members(routes: &Routes) -> Vec<Member> {
        let config = Arc::new(config().validate().unwrap());
        let keys = TempDir::new("raft-authority-keys");
        drop(AuthorityService::open(&keys.0, service_config(), SystemTime::now()).unwrap());
        mint(&keys.0, DEFAULT_TTL, SystemTime::now()).unwrap();
        let mut out = Vec::new();
        for id in 1..=3u64 {
            let dir = TempDir::new(&format!("raft-authority-{id}"));
            copy_cluster_keys(&keys.0, &dir.0);
            let service = Rc::new(RefCell::new(
                AuthorityService::open(&dir.0, service_config(), SystemTime::now()).unwrap(),
            ));
            let raft =
                super::super::local::start(id, routes, config.clone(), &dir.0, service.clone())
                    .await
                    .unwrap();
            out.push(Member {
                dir,
                authority: ClusterAuthority::new(service, raft),
            });
        }
        out[0]
            .authority
            .raft()
            .initialize(super::members())
            .await
            .unwrap();
        out
    }

    /// The leader, once member 1 knows one: its id and its member.
    async fn leader_of(members: &[Member]) -> (u64, &Member) {
        let id = members[0]
            .authority
            .raft()
            .wait(WAIT)
            .metrics(|m| m.current_leader.is_some(), "a leader")
            .await
            .unwrap()
            .current_leader
            .unwrap();
        (id, &members[(id - 1) as usize])
    }

    fn enroll_payload(dir: &TempDir, name: &str) -> Vec<u8> {
        let key = rcgen::KeyPair::generate().unwrap();
        let csr = rcgen::CertificateParams::new(vec![name.to_owned()])
            .unwrap()
            .serialize_request(&key)
            .unwrap()
            .pem()
            .unwrap();
        let token = mint(&dir.0, DEFAULT_TTL, SystemTime::now()).unwrap();
        serde_json::to_vec(&serde_json::json!({ "token": token, "csr_pem": csr })).unwrap()
    }

    #[test]
    fn the_leaders_read_lease_holds_only_while_a_majority_took_its_appends_lately() {
        run(async {
            let routes = Routes::default();
            let members = members(&routes).await;
            // A leader that applied an entry of its own term.
            let (_, leader) = leader_of(&members).await;
            let metrics = leader
                .authority
                .raft()
                .wait(WAIT)
                .metrics(
                    |m| {
                        m.last_applied.is_some_and(|applied| {
                            applied.leader_id.term == m.vote.leader_id().term
                        })
                    },
                    "the leader applied its own entry",
                )
                .await
                .unwrap();
            let acks = network::Acks::default();
            let leasing = ClusterAuthority::new(
                leader.authority.service().clone(),
                leader.authority.raft().clone(),
            )
            .leasing(acks.clone());
            let follower = (1..=3u64).find(|id| *id != metrics.id).unwrap();
            let vote = metrics.vote;
            // No member took an append lately: a confirmation round.
            assert_eq!(leasing.leased_index(), None);
            // One follower took one sent just now: with the leader, a
            // majority of three. The lease gives the last index appended.
            acks.borrow_mut()
                .insert(follower, (vote, std::time::Instant::now()));
            assert_eq!(leasing.leased_index(), metrics.last_log_index);
            // Sent 300 ms ago: past the lease (followers stand for
            // election after 400 ms without an append).
            let long_ago = std::time::Instant::now() - Duration::from_millis(300);
            acks.borrow_mut().insert(follower, (vote, long_ago));
            assert_eq!(leasing.leased_index(), None);
            // Taken as another term's leader's: not this leader's lease.
            let other = openraft::Vote::new_committed(vote.leader_id().term + 1, metrics.id);
            acks.borrow_mut()
                .insert(follower, (other, std::time::Instant::now()));
            assert_eq!(leasing.leased_index(), None);
            // A follower has no lease, whatever its acks say.
            let follower_authority = ClusterAuthority::new(
                members[(follower - 1) as usize].authority.service().clone(),
                members[(follower - 1) as usize].authority.raft().clone(),
            )
            .leasing(acks.clone());
            for id in 1..=3u64 {
                acks.borrow_mut()
                    .insert(id, (vote, std::time::Instant::now()));
            }
            assert_eq!(follower_authority.leased_index(), None);
            for member in &members {
                member.authority.raft().shutdown().await.unwrap();
            }
        });
    }

    #[test]
    fn changes_go_through_the_log_and_followers_point_at_the_leader() {
        run(async {
            let routes = Routes::default();
            let members = members(&routes).await;
            let (leader_id, leader) = leader_of(&members).await;
            let follower = members
                .iter()
                .find(|m| m.authority.raft().metrics().borrow().id != leader_id)
                .unwrap();
            let now = SystemTime::now();
            let anonymous = Caller::default();

            // A follower answers reads itself and points changes at the
            // leader.
            let key: CtKey = serde_json::from_slice(
                &follower
                    .authority
                    .handle(&anonymous, api::CT_KEY, b"{}", now)
                    .await
                    .unwrap(),
            )
            .unwrap();
            let log_key = LogPublicKey::from_ct_key(&key).unwrap();
            let payload = enroll_payload(&follower.dir, "one.internet2.test");
            let refused = follower
                .authority
                .handle(&anonymous, api::ENROLL, &payload, now)
                .await
                .unwrap_err();
            assert_eq!(refused.code, api::NOT_LEADER, "{refused:?}");
            assert!(
                refused.message.contains(&format!("node{leader_id}")),
                "{refused:?}"
            );

            // The same token, at the leader: committed, applied, answered
            // with a certificate whose log proof checks out.
            let issued: Issued = serde_json::from_slice(
                &leader
                    .authority
                    .handle(&anonymous, api::ENROLL, &payload, now)
                    .await
                    .unwrap(),
            )
            .unwrap();
            let root = leader.authority.service().borrow().trust().root_der;
            api::verify_issued(&issued, &log_key, &root).unwrap();

            // Its holder revokes it through the leader.
            let der = {
                use rustls::pki_types::CertificateDer;
                use rustls::pki_types::pem::PemObject;
                CertificateDer::from_pem_slice(issued.certificate_pem.as_bytes())
                    .unwrap()
                    .to_vec()
            };
            let holder = Caller {
                cert_der: Some(der),
            };
            let revoke =
                serde_json::to_vec(&serde_json::json!({ "serial": issued.serial })).unwrap();
            let revoked: Revoked = serde_json::from_slice(
                &leader
                    .authority
                    .handle(&holder, api::CERT_REVOKE, &revoke, now)
                    .await
                    .unwrap(),
            )
            .unwrap();
            assert_eq!(revoked.serial, issued.serial);

            // The service's own writes go through the log too: the operator
            // identity (its file written where it was proposed, its key
            // never in the log) and a server certificate rotation.
            let on_follower = follower.dir.0.join("operator.pem");
            let proposal = follower
                .authority
                .service()
                .borrow()
                .propose_operator_identity(&on_follower, now)
                .unwrap()
                .expect("no identity yet");
            let refused = follower.authority.commit(proposal).await.unwrap_err();
            assert_eq!(refused.code, api::NOT_LEADER);
            assert!(
                !on_follower.exists(),
                "nothing written where nothing committed"
            );
            let path = leader.dir.0.join("operator.pem");
            let proposal = leader
                .authority
                .service()
                .borrow()
                .propose_operator_identity(&path, now)
                .unwrap()
                .expect("no identity yet");
            leader.authority.commit(proposal).await.unwrap();
            let operator = {
                use rustls::pki_types::CertificateDer;
                use rustls::pki_types::pem::PemObject;
                CertificateDer::from_pem_file(&path).unwrap().to_vec()
            };
            let proposal = leader
                .authority
                .service()
                .borrow()
                .propose_server_certificate_rotation(now)
                .unwrap();
            leader.authority.commit(proposal).await.unwrap();
            let rotated = leader.authority.service().borrow_mut().take_rotated();
            assert!(rotated.is_some(), "the rotated certificate is handed out");

            let last = leader
                .authority
                .raft()
                .metrics()
                .borrow()
                .last_applied
                .unwrap();
            for member in &members {
                member
                    .authority
                    .raft()
                    .wait(WAIT)
                    .applied_index_at_least(Some(last.index), "applied")
                    .await
                    .unwrap();
            }
            let expected = rows(&leader.authority.service().borrow().authority().database());
            for member in &members {
                let service = member.authority.service().borrow();
                assert_eq!(rows(&service.authority().database()), expected);
                assert_eq!(service.trust().revoked.len(), 1, "revoked on every member");
                service
                    .authority()
                    .verify_chain(&operator, crate::authority::ca::Usage::Client, now)
                    .expect("the operator's certificate is every member's");
            }
            for member in &members {
                member.authority.raft().shutdown().await.unwrap();
            }
        });
    }
}

#[test]
fn the_beacon_and_the_ledger_are_replicated_like_certificates() {
    use crate::consensus::beacon::verify_tick;
    use crate::consensus::stake::Identity;
    use crate::consensus::state::{AdmissionChange, AdmissionConfig, AdmissionState};
    run(async {
        let routes = Routes::default();
        let nodes = cluster("raft-admission", &routes, config()).await;
        // One beacon key for the cluster: the first node's, given to all.
        let key = nodes[0]._dir.0.join("beacon-node.key");
        for node in &nodes {
            let mut machine = node.machine.borrow_mut();
            let own = node._dir.0.join("beacon-node.key");
            if own != key {
                std::fs::copy(&key, &own).unwrap();
            }
            let state = AdmissionState::open(
                &machine.authority().database(),
                AdmissionConfig::default(),
                &own,
            )
            .unwrap();
            // Replicas tick only from the log.
            machine.adopt_admission(state);
        }
        let leader = leader(&nodes).await;
        let now_s = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let staker = Identity([3; 32]);
        let mut changes = Vec::new();
        for second in 0..3 {
            let tick = leader
                .machine
                .borrow()
                .admission()
                .unwrap()
                .propose_tick(now_s + second)
                .expect("a new second");
            let written = leader
                .raft
                .client_write(Command::Admission(tick))
                .await
                .unwrap();
            assert!(
                matches!(written.data, Outcome::Applied(_)),
                "{:?}",
                written.data
            );
        }
        changes.push(AdmissionChange::StakeGrant {
            identity: staker,
            amount: 7,
        });
        // A tick proposed for a second already ticked is refused alike.
        let stale = AdmissionChange::BeaconTick(
            leader
                .machine
                .borrow()
                .admission()
                .unwrap()
                .latest_tick()
                .clone(),
        );
        changes.push(stale);
        let mut last = None;
        for change in changes {
            last = Some(
                leader
                    .raft
                    .client_write(Command::Admission(change))
                    .await
                    .unwrap(),
            );
        }
        let last = last.unwrap();
        assert!(matches!(last.data, Outcome::Refused(_)), "{:?}", last.data);
        same_everywhere(&nodes, last.log_id.index).await;
        let public_key = leader
            .machine
            .borrow()
            .admission()
            .unwrap()
            .beacon_public_key()
            .to_vec();
        let expected = leader
            .machine
            .borrow()
            .admission()
            .unwrap()
            .latest_tick()
            .clone();
        assert_eq!(expected.index, 2, "three ticks from the genesis");
        for node in &nodes {
            let machine = node.machine.borrow();
            let state = machine.admission().unwrap();
            assert_eq!(state.latest_tick(), &expected);
            verify_tick(state.latest_tick(), &public_key).unwrap();
            assert_eq!(state.stake(&staker), 7);
        }
        for node in &nodes {
            node.raft.shutdown().await.unwrap();
        }
    });
}

/// A member's outgoing requests are pinned to the key of the member meant:
/// a certificate of another member's key, at the same address, is refused.
#[test]
fn a_request_is_pinned_to_the_key_of_the_member_meant() {
    let cert = |name: &str| {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec![name.to_string()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let leaf = cert.der().to_vec();
        let peer = dataplane::client::peers::PeerIdentity {
            spki_sha256: dataplane::trust::spki_sha256(&leaf).unwrap(),
            leaf,
        };
        (node::node_id(&key.public_key_der()), peer)
    };
    let (meant, its_cert) = cert("fd71:7e57:0:3::2");
    let (other, others_cert) = cert("fd71:7e57:0:3::2");
    assert_ne!(meant, other);
    let address = "[fd71:7e57:0:3::2]:4433";
    assert_eq!(network::holds_key_of(meant, address)(&its_cert), Ok(()));
    let refused = network::holds_key_of(meant, address)(&others_cert).unwrap_err();
    assert_eq!(
        refused,
        format!("the peer at {address} holds the key of member {other}, not of member {meant}")
    );
    // A certificate that does not parse has no pin: the peer thread then
    // refuses every pinned request ("no certificate that can be read").
    assert_eq!(dataplane::trust::spki_sha256(b"not a certificate"), None);
}

/// Entries `from..` of term 1 issuing a certificate for each of `names`,
/// proposed by `machine`.
fn issuances(machine: &Machine, from: u64, names: &[&str]) -> Vec<openraft::Entry<TypeConfig>> {
    use openraft::{CommittedLeaderId, Entry, EntryPayload, LogId};
    names
        .iter()
        .zip(from..)
        .map(|(name, index)| {
            let (_, certify) = machine
                .authority()
                .propose_issue(
                    IssueRequest {
                        subject: (*name).into(),
                        dns_names: vec![(*name).into()],
                        ..IssueRequest::default()
                    },
                    SystemTime::now(),
                )
                .unwrap();
            Entry {
                log_id: LogId::new(CommittedLeaderId::new(1, 1), index),
                payload: EntryPayload::Normal(Command::Certify(certify)),
            }
        })
        .collect()
}

/// A snapshot is of the store as it was when its builder was made (its
/// dump runs on a thread of its own, after later entries may have been
/// applied): entries applied after that are left out, its bytes are the
/// store's at that point, and its last entry the one applied last before.
#[test]
fn a_snapshot_is_of_the_store_when_its_builder_was_made() {
    use crate::machine::snapshot;
    use openraft::storage::{RaftSnapshotBuilder, RaftStateMachine};
    run(async {
        let dir = TempDir::new("snapshot-view");
        let machine = Rc::new(RefCell::new(open_machine(&dir)));
        let mut state = StateMachine::new(machine.clone());
        let first = issuances(&machine.borrow(), 1, &["a.example", "b.example"]);
        state.apply(first).await.unwrap();
        let mut builder = state.get_snapshot_builder().await;
        let expected = snapshot::dump(&machine.borrow().authority().database()).unwrap();
        let later = issuances(&machine.borrow(), 3, &["c.example", "d.example"]);
        state.apply(later).await.unwrap();
        let mut built = builder.build_snapshot().await.unwrap();
        assert_eq!(built.meta.last_log_id.map(|id| id.index), Some(2));
        assert_eq!(built.snapshot.bytes().unwrap(), expected);
        assert_eq!(machine.borrow().authority().log().size(), 4);
    });
}

/// Two machines holding one cluster's keys, as two members do, each in a
/// directory of its own (kept while the machine is used).
fn two_machines(tag: &str) -> [(TempDir, Rc<RefCell<Machine>>); 2] {
    let keys = TempDir::new(&format!("{tag}-keys"));
    drop(open_machine(&keys));
    ["a", "b"].map(|side| {
        let dir = TempDir::new(&format!("{tag}-{side}"));
        copy_cluster_keys(&keys.0, &dir.0);
        let machine = Rc::new(RefCell::new(open_machine(&dir)));
        (dir, machine)
    })
}

/// A newer snapshot installed while an older view is being dumped stays
/// the one the member hands out: the older build finishing after it does
/// not replace it.
#[test]
fn a_snapshot_built_from_an_older_view_does_not_replace_a_newer_one() {
    use openraft::storage::{RaftSnapshotBuilder, RaftStateMachine};
    run(async {
        let [(_behind_dir, behind), (_ahead_dir, ahead)] = two_machines("snapshot-order");
        let mut behind_state = StateMachine::new(behind.clone());
        let mut ahead_state = StateMachine::new(ahead.clone());
        let entries = issuances(&ahead.borrow(), 1, &["a.example", "b.example", "c.example"]);
        behind_state.apply(entries[..1].to_vec()).await.unwrap();
        ahead_state.apply(entries).await.unwrap();
        let mut older = behind_state.get_snapshot_builder().await;
        let newer = ahead_state
            .get_snapshot_builder()
            .await
            .build_snapshot()
            .await
            .unwrap();
        behind_state
            .install_snapshot(&newer.meta, newer.snapshot)
            .await
            .unwrap();
        older.build_snapshot().await.unwrap();
        let current = behind_state.get_current_snapshot().await.unwrap().unwrap();
        assert_eq!(current.meta.last_log_id.map(|id| id.index), Some(3));
        assert_eq!(behind.borrow().authority().log().size(), 3);
    });
}

/// Read up to `len` bytes where `file` stands, as openraft's sender does.
async fn read_chunk(file: &mut snapshot_file::SnapshotFile, len: usize) -> Vec<u8> {
    use tokio::io::AsyncReadExt;
    let mut chunk = Vec::with_capacity(len);
    while chunk.len() < len {
        if file.read_buf(&mut chunk).await.unwrap() == 0 {
            break;
        }
    }
    chunk
}

/// A snapshot travels through files: two streams of the held snapshot
/// read it from handles of their own (interleaved, neither moves the
/// other's offset), the receiver takes the chunks at their offsets (a
/// chunk sent again included, none past what it received), installs the
/// sender's store from its file, and then hands out that file. Snapshot
/// files an earlier run left are removed at start.
#[test]
fn a_snapshot_streams_from_a_file_and_is_installed_from_one() {
    use crate::machine::snapshot;
    use openraft::storage::{RaftSnapshotBuilder, RaftStateMachine};
    use snapshot_file::SnapshotPaths;
    use tokio::io::{AsyncSeekExt, AsyncWriteExt};
    run(async {
        let [(_from_dir, from), (_to_dir, to)] = two_machines("snapshot-stream");
        let to_paths = SnapshotPaths::beside(to.borrow().authority().store_path());
        std::fs::write(&to_paths.receiving, b"left by an earlier run").unwrap();
        std::fs::write(&to_paths.current, b"left by an earlier run").unwrap();
        let mut sender = StateMachine::new(from.clone());
        let mut receiver = StateMachine::new(to.clone());
        assert!(!to_paths.receiving.exists() && !to_paths.current.exists());
        assert!(receiver.get_current_snapshot().await.unwrap().is_none());

        let names: Vec<String> = (0..20).map(|i| format!("n{i}.example")).collect();
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        let entries = issuances(&from.borrow(), 1, &names);
        sender.apply(entries).await.unwrap();
        let built = sender
            .get_snapshot_builder()
            .await
            .build_snapshot()
            .await
            .unwrap();
        let expected = snapshot::dump(&from.borrow().authority().database()).unwrap();
        const CHUNK: usize = 1000;
        assert!(expected.len() > 8 * CHUNK, "{} bytes", expected.len());

        let mut one = sender.get_current_snapshot().await.unwrap().unwrap();
        let mut two = sender.get_current_snapshot().await.unwrap().unwrap();
        let mut chunks = Vec::new();
        for offset in (0..expected.len()).step_by(CHUNK) {
            let a = read_chunk(&mut one.snapshot, CHUNK).await;
            let b = read_chunk(&mut two.snapshot, CHUNK).await;
            let end = (offset + CHUNK).min(expected.len());
            assert_eq!(a, expected[offset..end], "stream one at {offset}");
            assert_eq!(b, a, "stream two at {offset}");
            chunks.push((offset as u64, a));
        }
        assert!(read_chunk(&mut one.snapshot, CHUNK).await.is_empty());

        // In order, with one chunk sent again (the receiver goes back to
        // it); a chunk past what was received is refused.
        let mut receiving = receiver.begin_receiving_snapshot().await.unwrap();
        for (i, (offset, chunk)) in chunks.iter().enumerate() {
            let again = if i == 5 { 2..=3 } else { 1..=1 };
            for _ in again {
                receiving
                    .seek(std::io::SeekFrom::Start(*offset))
                    .await
                    .unwrap();
                receiving.write_all(chunk).await.unwrap();
            }
            if i == 3 {
                let past = receiving
                    .seek(std::io::SeekFrom::Start(*offset + 2 * CHUNK as u64))
                    .await;
                assert!(past.is_err(), "{past:?}");
            }
        }
        receiver
            .install_snapshot(&built.meta, receiving)
            .await
            .unwrap();
        assert_eq!(
            rows(&to.borrow().authority().database()),
            rows(&from.borrow().authority().database())
        );
        assert_eq!(to.borrow().authority().log().size(), 20);
        assert!(!to_paths.receiving.exists());
        let mut held = receiver.get_current_snapshot().await.unwrap().unwrap();
        assert_eq!(held.meta.last_log_id, built.meta.last_log_id);
        assert_eq!(held.snapshot.bytes().unwrap(), expected);
    });
}
