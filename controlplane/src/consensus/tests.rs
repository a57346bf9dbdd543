//! The four proofs together: an honest client is admitted, and each bad
//! proof is refused with its own close code.

use super::beacon::{Beacon, test_beacon};
use super::space::Plot;
use super::stake::test_client::TestClient;
use super::*;

const NOW: u64 = 1_700_000_000;

struct Setup {
    beacon: Beacon,
    policy: AdmissionPolicy,
    ledger: StakeLedger,
    client: TestClient,
    key: ClientKey,
    plot: Plot,
}

fn setup() -> Setup {
    let mut beacon = test_beacon();
    beacon.tick(NOW);
    let policy = AdmissionPolicy {
        stake_min: 10,
        space: SpaceParams::new(8, 8).unwrap(),
        ..AdmissionPolicy::default()
    };
    let client = TestClient::new(false);
    let key = ClientKey::from_certificate_der(&client.certificate_der).unwrap();
    let mut ledger = StakeLedger::default();
    ledger.grant(key.identity(), 10).unwrap();
    let plot = Plot::build(&key.identity().0, policy.space, |_, _| {});
    Setup {
        beacon,
        policy,
        ledger,
        client,
        key,
        plot,
    }
}

impl Setup {
    fn params(&self) -> AdmissionParameters {
        let tick = self.beacon.latest().unwrap().clone();
        self.policy.parameters(Difficulty::new(8).unwrap(), tick)
    }

    fn bundle(&self, params: &AdmissionParameters, binding: &Binding) -> ProofBundle {
        prove_bundle(params, binding, |m| self.client.sign(m), Some(&self.plot))
    }

    fn verify(
        &self,
        params: &AdmissionParameters,
        binding: &Binding,
        bundle: &ProofBundle,
        now: u64,
    ) -> Result<Admitted, AdmissionError> {
        let commitment = self.plot.commitment();
        let connection = Connection {
            binding: *binding,
            client: &self.key,
            plot_commitment: Some(&commitment),
        };
        verify_bundle(params, &self.policy, &self.ledger, &connection, bundle, now)
    }
}

const B: Binding = Binding::from_exporter([0x42; 32]);

#[test]
fn honest_bundle_is_admitted_through_the_wire_encoding() {
    let s = setup();
    let params = s.params();
    let bytes = s.bundle(&params, &B).encode().unwrap();
    assert!(bytes.len() <= BUNDLE_LEN_MAX);
    let bundle = ProofBundle::decode(&bytes).unwrap();
    let admitted = s.verify(&params, &B, &bundle, NOW + 1).unwrap();
    assert_eq!(admitted.identity(), s.key.identity());
    assert_eq!(admitted.mode(), AdmissionMode::MANDATORY);
}

#[test]
fn bundle_replayed_on_another_connection_is_refused() {
    let s = setup();
    let params = s.params();
    let bundle = s.bundle(&params, &B);
    let other = Binding::from_exporter([0x43; 32]);
    let err = s.verify(&params, &other, &bundle, NOW).unwrap_err();
    // The first binding-dependent proof checked is work.
    assert_eq!(err.code(), CLOSE_ADMISSION_WORK);
    // Without work, stake (signed over the binding) catches it.
    let mut no_work = params.clone();
    no_work.mode.work = false;
    let err = s.verify(&no_work, &other, &bundle, NOW).unwrap_err();
    assert_eq!(err.code(), CLOSE_ADMISSION_STAKE);
    // Without work and stake, the space challenges catch it.
    no_work.mode.stake = false;
    let err = s.verify(&no_work, &other, &bundle, NOW).unwrap_err();
    assert_eq!(err.code(), CLOSE_ADMISSION_SPACE);
}

#[test]
fn each_bad_proof_has_its_own_code() {
    let s = setup();
    let params = s.params();
    let good = s.bundle(&params, &B);
    let refuse = |bundle: &ProofBundle, now: u64| s.verify(&params, &B, bundle, now).unwrap_err();

    // Work: a nonce that does not reach the difficulty.
    let mut bad = good.clone();
    bad.work_nonce = (0..)
        .find(|n| !work::verify(&B, params.difficulty, *n))
        .unwrap();
    assert!(matches!(
        refuse(&bad, NOW),
        AdmissionError::Work { bits: 8, .. }
    ));

    // Time: a tick that was not given (wrong hash, or wrong index).
    let mut bad = good.clone();
    bad.tick_hash[0] ^= 1;
    assert_eq!(refuse(&bad, NOW).code(), CLOSE_ADMISSION_TIME);
    let mut bad = good.clone();
    bad.tick_index += 1;
    assert_eq!(refuse(&bad, NOW).code(), CLOSE_ADMISSION_TIME);

    // Stale and future ticks.
    let window = s.policy.window_s;
    assert!(s.verify(&params, &B, &good, NOW + window).is_ok());
    assert_eq!(
        refuse(&good, NOW + window + 1).code(),
        CLOSE_ADMISSION_STALE
    );
    assert!(matches!(
        refuse(&good, NOW - 1),
        AdmissionError::Time(TimeFailure::Future { .. })
    ));

    // Stake: signature by another key.
    let liar = TestClient::new(false);
    let mut bad = good.clone();
    bad.stake_signature = liar.sign(&stake::stake_message(&B, &good.tick_hash));
    assert_eq!(
        refuse(&bad, NOW),
        AdmissionError::Stake(StakeFailure::Signature)
    );

    // Space: a wrong leaf, and a missing answer.
    let mut bad = good.clone();
    bad.space_proofs[0].leaf[5] ^= 1;
    assert_eq!(refuse(&bad, NOW).code(), CLOSE_ADMISSION_SPACE);
    let mut bad = good.clone();
    bad.space_proofs.pop();
    assert_eq!(refuse(&bad, NOW).code(), CLOSE_ADMISSION_SPACE);
}

#[test]
fn under_staked_and_unregistered_clients_are_refused() {
    let mut s = setup();
    let params = s.params();
    let bundle = s.bundle(&params, &B);
    s.ledger.revoke(&s.key.identity(), 1);
    assert!(matches!(
        s.verify(&params, &B, &bundle, NOW),
        Err(AdmissionError::Stake(StakeFailure::Insufficient {
            held: 9,
            min: 10,
            ..
        }))
    ));
    s.ledger.grant(s.key.identity(), 1).unwrap();
    let connection = Connection {
        binding: B,
        client: &s.key,
        plot_commitment: None,
    };
    assert_eq!(
        verify_bundle(&params, &s.policy, &s.ledger, &connection, &bundle, NOW),
        Err(AdmissionError::Space(SpaceFailure::Unregistered))
    );
    // A commitment registered for another plot.
    let wrong = [7u8; 32];
    let connection = Connection {
        plot_commitment: Some(&wrong),
        ..connection
    };
    assert!(matches!(
        verify_bundle(&params, &s.policy, &s.ledger, &connection, &bundle, NOW),
        Err(AdmissionError::Space(SpaceFailure::Path { j: 0 }))
    ));
}

#[test]
fn development_subset_checks_only_what_it_names() {
    let s = setup();
    let mut params = s.params();
    params.mode = AdmissionMode::parse("work, time").unwrap();
    let bundle = prove_bundle(&params, &B, |_| unreachable!("stake not asked"), None);
    assert!(bundle.stake_signature.is_empty() && bundle.space_proofs.is_empty());
    let admitted = s.verify(&params, &B, &bundle, NOW).unwrap();
    assert!(!admitted.mode().stake && !admitted.mode().space);
    assert_eq!(
        AdmissionMode::parse("mandatory").unwrap(),
        AdmissionMode::MANDATORY
    );
    assert!(
        AdmissionMode::parse("work,luck")
            .unwrap_err()
            .contains("luck")
    );
}

#[test]
fn oversized_and_malformed_bundles_are_refused() {
    let s = setup();
    let params = s.params();
    let good = s.bundle(&params, &B).encode().unwrap();
    let decode = |b: &[u8]| AdmissionError::from(ProofBundle::decode(b).unwrap_err());

    let oversized = vec![BUNDLE_VERSION; BUNDLE_LEN_MAX + 1];
    assert_eq!(
        decode(&oversized),
        AdmissionError::Malformed(MalformedBundle::TooLong {
            len: BUNDLE_LEN_MAX + 1
        })
    );
    assert_eq!(decode(&oversized).code(), CLOSE_ADMISSION_MALFORMED);
    assert!(matches!(
        decode(&good[..good.len() - 1]),
        AdmissionError::Malformed(MalformedBundle::Truncated { .. })
    ));
    assert!(matches!(
        decode(&[]),
        AdmissionError::Malformed(MalformedBundle::Truncated { .. })
    ));
    let mut trailing = good.clone();
    trailing.push(0);
    assert_eq!(
        decode(&trailing),
        AdmissionError::Malformed(MalformedBundle::Trailing(1))
    );
    let mut version = good.clone();
    version[0] = 2;
    assert_eq!(
        decode(&version),
        AdmissionError::Malformed(MalformedBundle::Version(2))
    );
    let mut sig_len = good.clone();
    sig_len[HEADER_LEN - 1] = 200;
    assert_eq!(
        decode(&sig_len),
        AdmissionError::Malformed(MalformedBundle::SignatureLen(200))
    );
    // k and count sit right after the 64-byte Ed25519 signature.
    let k_at = HEADER_LEN + 64;
    let mut k = good.clone();
    k[k_at] = PLOT_K_MAX + 1;
    assert_eq!(
        decode(&k),
        AdmissionError::Malformed(MalformedBundle::PathLen(PLOT_K_MAX + 1))
    );
    let mut count = good.clone();
    count[k_at + 1] = CHALLENGES_MAX + 1;
    assert_eq!(
        decode(&count),
        AdmissionError::Malformed(MalformedBundle::Count(CHALLENGES_MAX + 1))
    );
    // Every prefix is refused, never a panic.
    for len in 0..good.len() {
        assert!(ProofBundle::decode(&good[..len]).is_err());
    }
}

#[test]
fn close_codes_are_distinct_and_stable() {
    let codes = [
        CLOSE_ADMISSION_WORK,
        CLOSE_ADMISSION_TIME,
        CLOSE_ADMISSION_STAKE,
        CLOSE_ADMISSION_SPACE,
        CLOSE_ADMISSION_MALFORMED,
        CLOSE_ADMISSION_STALE,
        CLOSE_ADMISSION_DEADLINE,
    ];
    assert_eq!(codes, [0x201, 0x202, 0x203, 0x204, 0x205, 0x206, 0x207]);
}

#[test]
fn a_path_length_without_proofs_is_not_a_second_encoding() {
    // Found by the proof_bundle_decode fuzz target: k = 10 with no proofs
    // decoded, and re-encoded with k = 0.
    let mut bytes = vec![1u8];
    bytes.extend_from_slice(&[0; 16]);
    bytes.extend_from_slice(&[0; 32]);
    bytes.extend_from_slice(&[0, 10, 0]);
    assert!(ProofBundle::decode(&bytes).is_err());
    let last = bytes.len() - 2;
    bytes[last] = 0;
    assert!(ProofBundle::decode(&bytes).is_ok());
}
