//! The admission state across restarts, its bounds, and a client admitted
//! or refused through a snapshot.

use super::*;
use crate::authority::ca::KeyAlgorithm;
use crate::authority::ct::LogKeyAlgorithm;
use crate::authority::logged::AuthorityError;
use crate::consensus::beacon::{verify_chain, verify_tick};
use crate::consensus::space::{Plot, SpaceFailure};
use crate::consensus::stake::StakeFailure;
use crate::consensus::stake::test_client::TestClient;
use crate::consensus::{CLOSE_ADMISSION_SPACE, CLOSE_ADMISSION_STAKE, prove_bundle};
use crate::machine::Machine;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;
use std::time::SystemTime;

const NOW: u64 = 1_700_000_000;
const B: Binding = Binding::from_exporter([0x42; 32]);

/// A directory removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Self {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "i2-admission-{tag}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }

    fn key(&self) -> PathBuf {
        self.0.join("beacon.key")
    }

    /// The state in a state machine opened on the directory (as after a
    /// restart), ticked at `now`.
    fn open(&self, config: AdmissionConfig, now: u64) -> Result<Held, StateError> {
        let mut machine = Machine::open(
            &self.0,
            KeyAlgorithm::EcdsaP256,
            LogKeyAlgorithm::Ed25519,
            None,
            SystemTime::UNIX_EPOCH + Duration::from_secs(now),
        )
        .map_err(admission_error)?;
        let state = AdmissionState::open(&machine.authority().database(), config, &self.key())?;
        machine
            .attach_admission(state, now)
            .map_err(admission_error)?;
        Ok(Held(machine))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn admission_error(e: AuthorityError) -> StateError {
    match e {
        AuthorityError::Admission(e) => e,
        other => panic!("not an admission error: {other}"),
    }
}

/// The admission state as a single node holds it: in the state machine,
/// each change applied as it is proposed.
struct Held(Machine);

impl std::ops::Deref for Held {
    type Target = AdmissionState;

    fn deref(&self) -> &AdmissionState {
        self.0.admission().unwrap()
    }
}

impl std::ops::DerefMut for Held {
    fn deref_mut(&mut self) -> &mut AdmissionState {
        self.0.admission_mut().unwrap()
    }
}

impl Held {
    fn grant(&mut self, identity: Identity, amount: u64) -> Result<u64, StateError> {
        self.0.grant(identity, amount).map_err(admission_error)
    }

    fn revoke(&mut self, identity: &Identity, amount: u64) -> Result<u64, StateError> {
        self.0.withdraw(*identity, amount).map_err(admission_error)
    }

    fn register_plot(
        &mut self,
        identity: Identity,
        commitment: Hash,
        k: u8,
    ) -> Result<(), StateError> {
        self.0
            .register_plot(identity, commitment, k)
            .map_err(admission_error)
    }

    fn tick(&mut self, now_unix_s: u64) -> Result<Option<Tick>, StateError> {
        self.0.tick(now_unix_s).map_err(admission_error)
    }
}

fn config() -> AdmissionConfig {
    AdmissionConfig {
        stake_min: 10,
        space: SpaceParams::new(4, 4).unwrap(),
        difficulty: DifficultyConfig {
            base: Difficulty::new(4).unwrap(),
            max: Difficulty::new(6).unwrap(),
            flood_rate_per_s: 100,
            ..DifficultyConfig::default()
        },
        ..AdmissionConfig::default()
    }
}

struct Client {
    test: TestClient,
    key: ClientKey,
    plot: Plot,
}

impl Client {
    fn new(space: SpaceParams) -> Self {
        let test = TestClient::new(false);
        let key = ClientKey::from_certificate_der(&test.certificate_der).unwrap();
        let plot = Plot::build(&key.identity().0, space, |_, _| {});
        Self { test, key, plot }
    }

    fn identity(&self) -> Identity {
        self.key.identity()
    }

    fn register(&self, state: &mut Held) {
        let p = &self.plot;
        state
            .register_plot(self.identity(), p.commitment(), p.params().k())
            .unwrap();
    }

    /// Prove what `snapshot` asks for and have it checked at `now`.
    fn admit(&self, snapshot: &AdmissionSnapshot, now: u64) -> Result<Admitted, AdmissionError> {
        let params = snapshot.parameters().clone();
        let bundle = prove_bundle(&params, &B, |m| self.test.sign(m), Some(&self.plot));
        let bundle = ProofBundle::decode(&bundle.encode().unwrap()).unwrap();
        snapshot.verify(&params, &self.key, &B, &bundle, now)
    }
}

#[test]
fn ledger_plots_and_beacon_survive_reopen() {
    let dir = TempDir::new("reopen");
    let (a, b) = (Identity([1; 32]), Identity([2; 32]));
    let (before, public_key) = {
        let mut state = dir.open(config(), NOW).unwrap();
        state.grant(a, 5).unwrap();
        state.grant(b, 3).unwrap();
        state.revoke(&b, 3).unwrap();
        state.register_plot(a, [7; 32], 4).unwrap();
        state.register_plot(b, [8; 32], 4).unwrap();
        // Re-registration replaces.
        state.register_plot(b, [9; 32], 4).unwrap();
        state.tick(NOW + 1).unwrap().unwrap();
        (
            state.latest_tick().clone(),
            state.beacon_public_key().to_vec(),
        )
    };
    let key_file = std::fs::read(dir.key()).unwrap();
    let state = dir.open(config(), NOW + 5).unwrap();
    assert_eq!(state.list(), vec![(a, 5)]);
    assert_eq!(
        state.plot(&a),
        Some(PlotCommitment {
            commitment: [7; 32],
            k: 4
        })
    );
    assert_eq!(state.plot(&b).unwrap().commitment, [9; 32]);
    // The chain goes on from the last tick, under the same key.
    let after = state.latest_tick();
    assert_eq!(after.index, before.index + 1);
    assert_eq!(after.unix_s, NOW + 5);
    verify_chain(&before, after).unwrap();
    verify_tick(after, &public_key).unwrap();
    assert_eq!(state.beacon_public_key(), public_key.as_slice());
    assert_eq!(std::fs::read(dir.key()).unwrap(), key_file);
    let mode = std::fs::metadata(dir.key()).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
}

#[test]
fn restart_within_the_same_second_resumes_the_stored_tick() {
    let dir = TempDir::new("same-second");
    let first = dir.open(config(), NOW).unwrap().latest_tick().clone();
    // Same second, then a clock that stepped back: no tick, none reused.
    for now in [NOW, NOW - 3] {
        let mut state = dir.open(config(), now).unwrap();
        assert_eq!(state.latest_tick(), &first);
        assert!(state.tick(now).unwrap().is_none());
    }
    let mut state = dir.open(config(), NOW).unwrap();
    let next = state.tick(NOW + 1).unwrap().unwrap().clone();
    verify_chain(&first, &next).unwrap();
}

#[test]
fn bad_input_changes_nothing() {
    let dir = TempDir::new("bad");
    let a = Identity([1; 32]);
    let mut state = dir.open(config(), NOW).unwrap();
    state.grant(a, 5).unwrap();
    state.register_plot(a, [7; 32], 4).unwrap();
    let generation = state.generation();
    assert!(matches!(
        state.grant(a, 0),
        Err(StateError::Stake(StakeError::Zero))
    ));
    assert!(matches!(
        state.grant(a, u64::MAX),
        Err(StateError::Stake(StakeError::Overflow { held: 5, .. }))
    ));
    assert!(matches!(
        state.register_plot(a, [8; 32], 5),
        Err(StateError::PlotK { got: 5, want: 4 })
    ));
    assert_eq!(state.revoke(&Identity([3; 32]), 10).unwrap(), 0);
    assert_eq!(state.revoke(&a, 0).unwrap(), 5);
    // The same plot again, and a tick in the same second, are no change.
    state.register_plot(a, [7; 32], 4).unwrap();
    assert!(state.tick(NOW).unwrap().is_none());
    assert_eq!(state.generation(), generation);
    drop(state);
    let state = dir.open(config(), NOW).unwrap();
    assert_eq!(state.list(), vec![(a, 5)]);
    assert_eq!(state.plot(&a).unwrap().commitment, [7; 32]);
}

#[test]
fn bad_configuration_and_node_key_are_refused() {
    let dir = TempDir::new("config");
    let inverted = AdmissionConfig {
        difficulty: DifficultyConfig {
            base: Difficulty::new(9).unwrap(),
            max: Difficulty::new(8).unwrap(),
            ..DifficultyConfig::default()
        },
        ..config()
    };
    assert!(matches!(
        dir.open(inverted, NOW),
        Err(StateError::Config(_))
    ));
    let no_dev_stake = AdmissionConfig {
        development_stake: Some(0),
        ..config()
    };
    assert!(matches!(
        dir.open(no_dev_stake, NOW),
        Err(StateError::Config(_))
    ));
    drop(dir.open(config(), NOW).unwrap());
    // Another node's key cannot continue this node's chain.
    let rng = ring::rand::SystemRandom::new();
    let other = Ed25519KeyPair::generate_pkcs8(&rng).unwrap();
    std::fs::write(dir.key(), other.as_ref()).unwrap();
    assert!(matches!(
        dir.open(config(), NOW + 1),
        Err(StateError::NodeKeyMismatch { .. })
    ));
    std::fs::write(dir.key(), b"not a key").unwrap();
    assert!(matches!(
        dir.open(config(), NOW + 1),
        Err(StateError::NodeKeyFormat { .. })
    ));
}

#[test]
fn snapshot_generation_moves_with_every_change() {
    let dir = TempDir::new("generation");
    let a = Identity([1; 32]);
    let mut state = dir.open(config(), NOW).unwrap();
    let mut seen = vec![state.snapshot().generation()];
    let mut changed = |state: &AdmissionState| {
        let g = state.snapshot().generation();
        assert!(!seen.contains(&g), "generation {g} did not move");
        seen.push(g);
    };
    state.grant(a, 5).unwrap();
    changed(&state);
    state.revoke(&a, 1).unwrap();
    changed(&state);
    state.register_plot(a, [7; 32], 4).unwrap();
    changed(&state);
    state.tick(NOW + 1).unwrap().unwrap();
    changed(&state);
    assert_eq!(state.snapshot().parameters().tick.unix_s, NOW + 1);
    let t0 = Instant::now();
    let raised = state.on_handshakes(10_000, t0);
    assert_eq!(raised.bits(), 5);
    changed(&state);
    assert_eq!(state.snapshot().parameters().difficulty, raised);
    // A snapshot is a value: later changes do not reach it.
    let old = state.snapshot();
    state.grant(a, 100).unwrap();
    assert_eq!(old.stake(&a), 4);
    assert_eq!(state.snapshot().stake(&a), 104);
    assert_eq!(state.on_handshakes(10_000, t0), raised, "raise_every holds");
    assert_eq!(
        state
            .on_handshakes(10_000, t0 + Duration::from_secs(1))
            .bits(),
        6
    );
}

#[test]
fn honest_client_is_admitted_through_a_snapshot() {
    let dir = TempDir::new("honest");
    let mut state = dir.open(config(), NOW).unwrap();
    let client = Client::new(state.config().space);
    client.register(&mut state);
    state.grant(client.identity(), 10).unwrap();
    let snapshot = state.snapshot();
    assert_eq!(snapshot.beacon_public_key(), state.beacon_public_key());
    verify_tick(&snapshot.parameters().tick, snapshot.beacon_public_key()).unwrap();
    let admitted = client.admit(&snapshot, NOW + 1).unwrap();
    assert_eq!(admitted.identity(), client.identity());
    assert_eq!(admitted.mode(), AdmissionMode::MANDATORY);
    // The state checks the same way, after a restart too.
    drop(state);
    let state = dir.open(config(), NOW + 2).unwrap();
    client.admit(&state.snapshot(), NOW + 2).unwrap();
}

#[test]
fn development_stake_comes_with_the_plot() {
    let dir = TempDir::new("development");
    let config = AdmissionConfig {
        development_stake: Some(10),
        ..config()
    };
    let mut state = dir.open(config, NOW).unwrap();
    let client = Client::new(config.space);
    client.register(&mut state);
    assert_eq!(state.stake(&client.identity()), 10);
    // Re-registering tops up; it does not add.
    state.revoke(&client.identity(), 4).unwrap();
    client.register(&mut state);
    client.register(&mut state);
    assert_eq!(state.stake(&client.identity()), 10);
    client.admit(&state.snapshot(), NOW).unwrap();
}

#[test]
fn unstaked_or_unregistered_client_is_refused() {
    let dir = TempDir::new("refused");
    let mut state = dir.open(config(), NOW).unwrap();
    let client = Client::new(state.config().space);
    // A plot but no stake.
    client.register(&mut state);
    let err = client.admit(&state.snapshot(), NOW).unwrap_err();
    assert!(matches!(
        err,
        AdmissionError::Stake(StakeFailure::Insufficient {
            held: 0,
            min: 10,
            ..
        })
    ));
    assert_eq!(err.code(), CLOSE_ADMISSION_STAKE);
    // Stake but no plot.
    let stranger = Client::new(state.config().space);
    state.grant(stranger.identity(), 10).unwrap();
    let err = stranger.admit(&state.snapshot(), NOW).unwrap_err();
    assert_eq!(err, AdmissionError::Space(SpaceFailure::Unregistered));
    assert_eq!(err.code(), CLOSE_ADMISSION_SPACE);
    // Revoked stake is refused from the next snapshot on.
    state.grant(client.identity(), 10).unwrap();
    let before = state.snapshot();
    client.admit(&before, NOW).unwrap();
    state.revoke(&client.identity(), 1).unwrap();
    assert_eq!(
        client.admit(&state.snapshot(), NOW).unwrap_err().code(),
        CLOSE_ADMISSION_STAKE
    );
}
