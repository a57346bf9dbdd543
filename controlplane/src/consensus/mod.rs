//! Four-proof admission, sans IO: work, time, stake and space, each bound to
//! the connection by its TLS exporter value (see `docs/ADMISSION.md`).
//!
//! Owns the proof constructions, the bundle encoding, the difficulty
//! controller, the beacon chain and the in-memory stake ledger, and (in
//! [`state`]) their durable form in the authority's database. It never
//! reads a clock or a socket: the transport passes the binding, the bundle
//! bytes and `now`, and closes the connection with
//! [`AdmissionError::code`] when [`verify_bundle`] refuses.

pub mod beacon;
pub mod binding;
pub mod isolation;
pub mod space;
pub mod stake;
pub mod state;
pub mod wire;
pub mod work;

use crate::authority::ct::Hash;
use beacon::{Freshness, Tick, WINDOW_S_DEFAULT, freshness};
use binding::Binding;
use ring::digest::{Context, SHA256};
use space::{CHALLENGES_MAX, PLOT_K_MAX, SpaceFailure, SpaceParams, SpaceProof, verify_space};
use stake::{ClientKey, Identity, STAKE_SIGNATURE_LEN_MAX, StakeFailure, StakeLedger};
use work::Difficulty;

pub(crate) fn sha256(parts: &[&[u8]]) -> Hash {
    let mut ctx = Context::new(&SHA256);
    for part in parts {
        ctx.update(part);
    }
    let mut out = [0u8; 32];
    out.copy_from_slice(ctx.finish().as_ref());
    out
}

/// Application close codes, one per refused proof. Stable: clients and
/// operators match on them (`docs/ADMISSION.md`).
pub const CLOSE_ADMISSION_WORK: u32 = 0x201;
pub const CLOSE_ADMISSION_TIME: u32 = 0x202;
pub const CLOSE_ADMISSION_STAKE: u32 = 0x203;
pub const CLOSE_ADMISSION_SPACE: u32 = 0x204;
pub const CLOSE_ADMISSION_MALFORMED: u32 = 0x205;
pub const CLOSE_ADMISSION_STALE: u32 = 0x206;
/// No bundle before the admission deadline (the transport's timer).
pub const CLOSE_ADMISSION_DEADLINE: u32 = 0x207;

/// Default admission deadline from connection start, in milliseconds.
pub const DEADLINE_MS_DEFAULT: u64 = 2_000;

/// Largest encoded bundle accepted.
pub const BUNDLE_LEN_MAX: usize = 8 * 1024;

/// Bundle encoding version.
pub const BUNDLE_VERSION: u8 = 1;

// version, nonce, tick index, tick hash, signature length.
const HEADER_LEN: usize = 1 + 8 + 8 + 32 + 1;

/// Longest encoding of a bundle with `challenges` answers on a plot of
/// `2^k` leaves: header, longest signature, k and count, answers.
pub const fn bundle_len(k: u8, challenges: u8) -> usize {
    HEADER_LEN + STAKE_SIGNATURE_LEN_MAX + 2 + challenges as usize * (1 + k as usize) * 32
}

const _: () = assert!(bundle_len(space::PLOT_K_DEFAULT, space::CHALLENGES_DEFAULT) <= 4 * 1024);
const _: () = assert!(STAKE_SIGNATURE_LEN_MAX <= u8::MAX as usize);

/// Which proofs a connection must present.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct AdmissionMode {
    pub work: bool,
    pub time: bool,
    pub stake: bool,
    pub space: bool,
}

impl AdmissionMode {
    /// All four: the production default.
    pub const MANDATORY: Self = Self {
        work: true,
        time: true,
        stake: true,
        space: true,
    };

    /// `"mandatory"`, or a comma-separated subset of `work`, `time`,
    /// `stake`, `space` (development). The error names the bad word.
    pub fn parse(text: &str) -> Result<Self, String> {
        if text.trim() == "mandatory" {
            return Ok(Self::MANDATORY);
        }
        let mut mode = Self {
            work: false,
            time: false,
            stake: false,
            space: false,
        };
        for word in text.split(',').map(str::trim).filter(|w| !w.is_empty()) {
            let flag = match word {
                "work" => &mut mode.work,
                "time" => &mut mode.time,
                "stake" => &mut mode.stake,
                "space" => &mut mode.space,
                other => {
                    return Err(format!(
                        "unknown proof {other:?}; allowed: \"mandatory\" or a comma-separated subset of work, time, stake, space"
                    ));
                }
            };
            *flag = true;
        }
        Ok(mode)
    }
}

/// Server-side admission settings, from the configuration.
#[derive(Clone, Copy, Debug)]
pub struct AdmissionPolicy {
    pub mode: AdmissionMode,
    /// Oldest tick accepted, in seconds before now.
    pub window_s: u64,
    /// Least stake an identity must hold.
    pub stake_min: u64,
    pub space: SpaceParams,
}

impl Default for AdmissionPolicy {
    fn default() -> Self {
        Self {
            mode: AdmissionMode::MANDATORY,
            window_s: WINDOW_S_DEFAULT,
            stake_min: 1,
            space: SpaceParams::default(),
        }
    }
}

impl AdmissionPolicy {
    /// What an unadmitted connection is told, fixed for that connection:
    /// its bundle is checked against exactly these values.
    pub fn parameters(&self, difficulty: Difficulty, tick: Tick) -> AdmissionParameters {
        AdmissionParameters {
            mode: self.mode,
            difficulty,
            tick,
            space: self.space,
        }
    }
}

/// The parameters handed to one connection. No separate challenge seed: the
/// binding already is a per-connection value neither side chooses alone.
#[derive(Clone, Debug)]
pub struct AdmissionParameters {
    pub mode: AdmissionMode,
    pub difficulty: Difficulty,
    /// The beacon tick the proofs must name.
    pub tick: Tick,
    pub space: SpaceParams,
}

/// The proofs a client submits.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct ProofBundle {
    pub work_nonce: u64,
    pub tick_index: u64,
    pub tick_hash: Hash,
    /// Signature over [`stake::stake_message`]; empty when stake is not
    /// required.
    pub stake_signature: Vec<u8>,
    /// One answer per challenge; empty when space is not required.
    pub space_proofs: Vec<SpaceProof>,
}

/// Why bundle bytes did not decode.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MalformedBundle {
    #[error("bundle of {len} bytes exceeds the limit of {BUNDLE_LEN_MAX}")]
    TooLong { len: usize },
    #[error("bundle ends early: {len} bytes")]
    Truncated { len: usize },
    #[error("bundle version {0}; this server speaks version {BUNDLE_VERSION}")]
    Version(u8),
    #[error("stake signature of {0} bytes; at most {STAKE_SIGNATURE_LEN_MAX}")]
    SignatureLen(usize),
    #[error("space path length {0}; at most {PLOT_K_MAX}")]
    PathLen(u8),
    #[error("{0} space answers; at most {CHALLENGES_MAX}")]
    Count(u8),
    #[error("{0} bytes after the end of the bundle")]
    Trailing(usize),
    #[error("space answers of unequal path lengths")]
    UnevenPaths,
}

impl ProofBundle {
    /// Wire form (all integers big endian):
    /// `version u8 ‖ work_nonce u64 ‖ tick_index u64 ‖ tick_hash [32] ‖
    /// sig_len u8 ‖ sig ‖ k u8 ‖ count u8 ‖ count × (leaf [32] ‖ k × [32])`.
    pub fn encode(&self) -> Result<Vec<u8>, MalformedBundle> {
        let k = self.space_proofs.first().map_or(0, |p| p.path.len());
        if self.space_proofs.iter().any(|p| p.path.len() != k) {
            return Err(MalformedBundle::UnevenPaths);
        }
        let k = u8::try_from(k)
            .ok()
            .filter(|k| *k <= PLOT_K_MAX)
            .ok_or(MalformedBundle::PathLen(u8::MAX))?;
        let count = u8::try_from(self.space_proofs.len())
            .ok()
            .filter(|c| *c <= CHALLENGES_MAX)
            .ok_or(MalformedBundle::Count(u8::MAX))?;
        if self.stake_signature.len() > STAKE_SIGNATURE_LEN_MAX {
            return Err(MalformedBundle::SignatureLen(self.stake_signature.len()));
        }
        let mut out = Vec::with_capacity(bundle_len(k, count));
        out.push(BUNDLE_VERSION);
        out.extend_from_slice(&self.work_nonce.to_be_bytes());
        out.extend_from_slice(&self.tick_index.to_be_bytes());
        out.extend_from_slice(&self.tick_hash);
        out.push(self.stake_signature.len() as u8);
        out.extend_from_slice(&self.stake_signature);
        out.extend_from_slice(&[k, count]);
        for proof in &self.space_proofs {
            out.extend_from_slice(&proof.leaf);
            proof.path.iter().for_each(|h| out.extend_from_slice(h));
        }
        if out.len() > BUNDLE_LEN_MAX {
            return Err(MalformedBundle::TooLong { len: out.len() });
        }
        Ok(out)
    }

    /// Parse untrusted bytes; the length is checked before anything else.
    pub fn decode(bytes: &[u8]) -> Result<Self, MalformedBundle> {
        if bytes.len() > BUNDLE_LEN_MAX {
            return Err(MalformedBundle::TooLong { len: bytes.len() });
        }
        let mut r = Reader { bytes, at: 0 };
        let version = r.u8()?;
        if version != BUNDLE_VERSION {
            return Err(MalformedBundle::Version(version));
        }
        let work_nonce = r.u64()?;
        let tick_index = r.u64()?;
        let tick_hash = r.hash()?;
        let sig_len = usize::from(r.u8()?);
        if sig_len > STAKE_SIGNATURE_LEN_MAX {
            return Err(MalformedBundle::SignatureLen(sig_len));
        }
        let stake_signature = r.take(sig_len)?.to_vec();
        let k = r.u8()?;
        if k > PLOT_K_MAX {
            return Err(MalformedBundle::PathLen(k));
        }
        let count = r.u8()?;
        if count > CHALLENGES_MAX {
            return Err(MalformedBundle::Count(count));
        }
        // One encoding per bundle: without proofs there is no path length.
        if count == 0 && k != 0 {
            return Err(MalformedBundle::PathLen(k));
        }
        let mut space_proofs = Vec::with_capacity(usize::from(count));
        for _ in 0..count {
            let leaf = r.hash()?;
            let path = (0..k).map(|_| r.hash()).collect::<Result<_, _>>()?;
            space_proofs.push(SpaceProof { leaf, path });
        }
        if r.at != bytes.len() {
            return Err(MalformedBundle::Trailing(bytes.len() - r.at));
        }
        Ok(Self {
            work_nonce,
            tick_index,
            tick_hash,
            stake_signature,
            space_proofs,
        })
    }
}

/// Client side: produce the bundle `params` ask for on the connection with
/// `binding`. `sign` signs with the certificate key; `plot` must be the
/// plot registered for that key when space is required.
pub fn prove_bundle(
    params: &AdmissionParameters,
    binding: &Binding,
    sign: impl FnOnce(&[u8]) -> Vec<u8>,
    plot: Option<&space::Plot>,
) -> ProofBundle {
    let mode = params.mode;
    let work_nonce = if mode.work {
        work::solve(binding, params.difficulty).0
    } else {
        0
    };
    let stake_signature = if mode.stake {
        sign(&stake::stake_message(binding, &params.tick.hash))
    } else {
        Vec::new()
    };
    let space_proofs = match plot {
        Some(plot) if mode.space => plot.prove(binding),
        _ => Vec::new(),
    };
    ProofBundle {
        work_nonce,
        tick_index: params.tick.index,
        tick_hash: params.tick.hash,
        stake_signature,
        space_proofs,
    }
}

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], MalformedBundle> {
        let end = self.at + n;
        let out = self
            .bytes
            .get(self.at..end)
            .ok_or(MalformedBundle::Truncated {
                len: self.bytes.len(),
            })?;
        self.at = end;
        Ok(out)
    }

    fn u8(&mut self) -> Result<u8, MalformedBundle> {
        Ok(self.take(1)?[0])
    }

    fn u64(&mut self) -> Result<u64, MalformedBundle> {
        let mut b = [0u8; 8];
        b.copy_from_slice(self.take(8)?);
        Ok(u64::from_be_bytes(b))
    }

    fn hash(&mut self) -> Result<Hash, MalformedBundle> {
        let mut b = [0u8; 32];
        b.copy_from_slice(self.take(32)?);
        Ok(b)
    }
}

/// Why a bundle's tick was refused (other than being too old).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TimeFailure {
    #[error(
        "the bundle names tick {named}, but this connection was given tick {given}; name the tick from the admission parameters"
    )]
    NotGiven { named: u64, given: u64 },
    #[error("tick {index} is from {tick_unix_s}, after now ({now_unix_s})")]
    Future {
        index: u64,
        tick_unix_s: u64,
        now_unix_s: u64,
    },
}

/// A refused admission: which proof failed, and why. [`Self::code`] is the
/// connection close code.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AdmissionError {
    #[error("proof of work: nonce {nonce} does not reach difficulty {bits}")]
    Work { nonce: u64, bits: u8 },
    #[error("proof of time: {0}")]
    Time(TimeFailure),
    #[error("proof of stake: {0}")]
    Stake(StakeFailure),
    #[error("proof of space: {0}")]
    Space(SpaceFailure),
    #[error("malformed bundle: {0}")]
    Malformed(MalformedBundle),
    #[error("proof of time: tick from {tick_unix_s} is older than {window_s} s at {now_unix_s}")]
    Stale {
        tick_unix_s: u64,
        now_unix_s: u64,
        window_s: u64,
    },
}

impl AdmissionError {
    /// The application close code for this refusal.
    pub fn code(&self) -> u32 {
        match self {
            Self::Work { .. } => CLOSE_ADMISSION_WORK,
            Self::Time(_) => CLOSE_ADMISSION_TIME,
            Self::Stake(_) => CLOSE_ADMISSION_STAKE,
            Self::Space(_) => CLOSE_ADMISSION_SPACE,
            Self::Malformed(_) => CLOSE_ADMISSION_MALFORMED,
            Self::Stale { .. } => CLOSE_ADMISSION_STALE,
        }
    }
}

impl From<MalformedBundle> for AdmissionError {
    fn from(e: MalformedBundle) -> Self {
        Self::Malformed(e)
    }
}

/// What the verifier knows about the connection: its binding, the key in
/// its certificate and the plot commitment registered for that identity.
#[derive(Clone, Copy, Debug)]
pub struct Connection<'a> {
    pub binding: Binding,
    pub client: &'a ClientKey,
    pub plot_commitment: Option<&'a Hash>,
}

/// Proof that [`verify_bundle`] accepted a connection; only it makes one,
/// so recording the connection as an asset can require it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Admitted {
    identity: Identity,
    mode: AdmissionMode,
}

impl Admitted {
    pub fn identity(&self) -> Identity {
        self.identity
    }

    /// The proofs that were required (and checked).
    pub fn mode(&self) -> AdmissionMode {
        self.mode
    }
}

/// Check `bundle` for `connection` against the parameters it was given.
/// Proofs are checked cheapest first (time, work, stake, space), so a bad
/// bundle costs the server as little as possible.
pub fn verify_bundle(
    params: &AdmissionParameters,
    policy: &AdmissionPolicy,
    ledger: &StakeLedger,
    connection: &Connection<'_>,
    bundle: &ProofBundle,
    now_unix_s: u64,
) -> Result<Admitted, AdmissionError> {
    let mode = params.mode;
    if mode.time {
        verify_time(&params.tick, bundle, policy.window_s, now_unix_s)?;
    }
    if mode.work && !work::verify(&connection.binding, params.difficulty, bundle.work_nonce) {
        return Err(AdmissionError::Work {
            nonce: bundle.work_nonce,
            bits: params.difficulty.bits(),
        });
    }
    if mode.stake {
        ledger
            .verify(
                connection.client,
                policy.stake_min,
                &connection.binding,
                &bundle.tick_hash,
                &bundle.stake_signature,
            )
            .map_err(AdmissionError::Stake)?;
    }
    if mode.space {
        let commitment = connection
            .plot_commitment
            .ok_or(AdmissionError::Space(SpaceFailure::Unregistered))?;
        let identity = connection.client.identity();
        verify_space(
            commitment,
            &identity.0,
            params.space,
            &connection.binding,
            &bundle.space_proofs,
        )
        .map_err(AdmissionError::Space)?;
    }
    Ok(Admitted {
        identity: connection.client.identity(),
        mode,
    })
}

fn verify_time(
    given: &Tick,
    bundle: &ProofBundle,
    window_s: u64,
    now_unix_s: u64,
) -> Result<(), AdmissionError> {
    if bundle.tick_index != given.index || bundle.tick_hash != given.hash {
        return Err(AdmissionError::Time(TimeFailure::NotGiven {
            named: bundle.tick_index,
            given: given.index,
        }));
    }
    match freshness(given.unix_s, now_unix_s, window_s) {
        Freshness::Fresh => Ok(()),
        Freshness::Stale => Err(AdmissionError::Stale {
            tick_unix_s: given.unix_s,
            now_unix_s,
            window_s,
        }),
        Freshness::Future => Err(AdmissionError::Time(TimeFailure::Future {
            index: given.index,
            tick_unix_s: given.unix_s,
            now_unix_s,
        })),
    }
}

#[cfg(test)]
mod tests;
