//! Messages of the admission exchange other than the bundle (which is
//! [`ProofBundle`](super::ProofBundle)'s own encoding): the [`Offer`] a
//! server makes one connection (the answer to `ADMISSION_PARAMS`), the
//! [`PlotRegistration`] a client sends, and the admitted answer (the reply
//! to `ADMISSION_SUBMIT`).
//!
//! Sans IO: bytes in, typed values out. Each message opens with a version
//! byte ([`WIRE_VERSION`]), integers are big endian, and each value has
//! exactly one encoding of a fixed length, so the decoders refuse short
//! input, trailing bytes and every field outside its range. They never
//! panic, whatever the bytes.

use super::beacon::{TICK_SIGNATURE_LEN, Tick, TickError, verify_tick};
use super::space::{CHALLENGES_MAX, PLOT_K_MAX, SpaceParams};
use super::stake::Identity;
use super::state::PlotCommitment;
use super::work::{DIFFICULTY_BITS_MAX, Difficulty};
use super::{AdmissionMode, AdmissionParameters};
use crate::authority::ct::Hash;

/// Version byte of every message in this module.
pub const WIRE_VERSION: u8 = 1;

/// Mode bits of an [`Offer`]; the other four bits must be clear.
pub const MODE_WORK: u8 = 1;
pub const MODE_TIME: u8 = 2;
pub const MODE_STAKE: u8 = 4;
pub const MODE_SPACE: u8 = 8;
const MODE_ALL: u8 = MODE_WORK | MODE_TIME | MODE_STAKE | MODE_SPACE;

/// Raw Ed25519 public key length.
pub const BEACON_PUBLIC_KEY_LEN: usize = 32;

// version, mode, difficulty, k, challenges, tick (index, unix_s, prev, hash,
// signature), beacon key, has_plot, stake, stake_min, deadline_ms.
const OFFER_HEAD_LEN: usize = 5 + 8 + 8 + 32 + 32 + TICK_SIGNATURE_LEN + BEACON_PUBLIC_KEY_LEN + 1;
const OFFER_TAIL_LEN: usize = 8 + 8 + 8;
// Plot k, commitment.
const OFFER_PLOT_LEN: usize = 1 + 32;

/// Length of an [`Offer`] without a registered plot.
pub const OFFER_LEN_MIN: usize = OFFER_HEAD_LEN + OFFER_TAIL_LEN;
/// Length of an [`Offer`] with a registered plot.
pub const OFFER_LEN_MAX: usize = OFFER_LEN_MIN + OFFER_PLOT_LEN;
/// Length of a [`PlotRegistration`].
pub const PLOT_REGISTRATION_LEN: usize = 1 + 1 + 32;
/// Length of the admitted answer.
pub const ADMITTED_LEN: usize = 1 + 32 + 8;

// An offer is one request's answer: it must fit one small stream frame.
const _: () = assert!(OFFER_LEN_MAX <= 256);
const _: () = assert!(TICK_SIGNATURE_LEN == 64);

/// Which message a [`WireError`] is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Message {
    Offer,
    PlotRegistration,
    Admitted,
}

impl std::fmt::Display for Message {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Offer => "admission offer",
            Self::PlotRegistration => "plot registration",
            Self::Admitted => "admitted answer",
        })
    }
}

/// Why bytes did not decode as an admission message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("{message} ends early: {len} bytes, at least {need} needed")]
    Truncated {
        message: Message,
        len: usize,
        need: usize,
    },
    #[error("{message} has {extra} bytes after its end")]
    Trailing { message: Message, extra: usize },
    #[error("{message} version {version}; this side speaks version {WIRE_VERSION}")]
    Version { message: Message, version: u8 },
    #[error("admission mode bits {0:#04x}: only work (1), time (2), stake (4) and space (8) exist")]
    ModeBits(u8),
    #[error("work difficulty of {0} bits is above the ceiling of {DIFFICULTY_BITS_MAX}")]
    Difficulty(u8),
    #[error(
        "space parameters k = {k}, challenges = {challenges}: need 1 <= k <= {PLOT_K_MAX}, 1 <= challenges <= {CHALLENGES_MAX} and proofs that fit a bundle"
    )]
    SpaceParams { k: u8, challenges: u8 },
    #[error("{message}: plot k = {k}; allowed 1..={PLOT_K_MAX}")]
    PlotK { message: Message, k: u8 },
    #[error("{message}: flag {field} is {value}; allowed 0 or 1")]
    Flag {
        message: Message,
        field: &'static str,
        value: u8,
    },
}

/// What a server offers one unadmitted connection: the parameters its
/// bundle is checked against, and what the client needs to make and check
/// that bundle before spending work on it.
#[derive(Clone, Debug)]
pub struct Offer {
    pub params: AdmissionParameters,
    /// The node's raw Ed25519 key: the client checks the tick with
    /// [`Offer::verify_tick`] before it signs over the tick's hash.
    pub beacon_public_key: [u8; BEACON_PUBLIC_KEY_LEN],
    /// The plot registered for this client's identity, if any. Its `k` may
    /// differ from `params.space`: then the client must register a new plot.
    pub registered_plot: Option<PlotCommitment>,
    /// The stake this client's identity holds in the ledger.
    pub stake: u64,
    /// Least stake the server admits.
    pub stake_min: u64,
    /// How long after the connection started the bundle must arrive.
    pub deadline_ms: u64,
}

impl Offer {
    /// Client side: check that the offered tick is well formed and signed
    /// by [`Self::beacon_public_key`]. The key itself is trusted only as far
    /// as the connection that carried it (the server's certificate).
    pub fn verify_tick(&self) -> Result<(), TickError> {
        verify_tick(&self.params.tick, &self.beacon_public_key)
    }
}

fn mode_bits(mode: AdmissionMode) -> u8 {
    [
        (mode.work, MODE_WORK),
        (mode.time, MODE_TIME),
        (mode.stake, MODE_STAKE),
        (mode.space, MODE_SPACE),
    ]
    .into_iter()
    .filter(|(on, _)| *on)
    .fold(0, |bits, (_, bit)| bits | bit)
}

fn mode_from_bits(bits: u8) -> Result<AdmissionMode, WireError> {
    if bits & !MODE_ALL != 0 {
        return Err(WireError::ModeBits(bits));
    }
    Ok(AdmissionMode {
        work: bits & MODE_WORK != 0,
        time: bits & MODE_TIME != 0,
        stake: bits & MODE_STAKE != 0,
        space: bits & MODE_SPACE != 0,
    })
}

/// Wire form: `version u8 ‖ mode bits u8 ‖ difficulty u8 ‖ k u8 ‖
/// challenges u8 ‖ tick index u64 ‖ tick unix_s u64 ‖ tick prev [32] ‖
/// tick hash [32] ‖ tick signature [64] ‖ beacon key [32] ‖ has_plot u8 ‖
/// (plot k u8 ‖ commitment [32], when has_plot is 1) ‖ stake u64 ‖
/// stake_min u64 ‖ deadline_ms u64`.
pub fn encode_offer(offer: &Offer) -> Vec<u8> {
    let p = &offer.params;
    let mut out = Vec::with_capacity(OFFER_LEN_MAX);
    out.extend_from_slice(&[
        WIRE_VERSION,
        mode_bits(p.mode),
        p.difficulty.bits(),
        p.space.k(),
        p.space.challenges(),
    ]);
    out.extend_from_slice(&p.tick.index.to_be_bytes());
    out.extend_from_slice(&p.tick.unix_s.to_be_bytes());
    out.extend_from_slice(&p.tick.prev);
    out.extend_from_slice(&p.tick.hash);
    out.extend_from_slice(&p.tick.signature);
    out.extend_from_slice(&offer.beacon_public_key);
    match &offer.registered_plot {
        Some(plot) => {
            out.extend_from_slice(&[1, plot.k]);
            out.extend_from_slice(&plot.commitment);
        }
        None => out.push(0),
    }
    out.extend_from_slice(&offer.stake.to_be_bytes());
    out.extend_from_slice(&offer.stake_min.to_be_bytes());
    out.extend_from_slice(&offer.deadline_ms.to_be_bytes());
    out
}

/// Parse an offer from untrusted bytes (the client side of
/// `ADMISSION_PARAMS`).
pub fn decode_offer(bytes: &[u8]) -> Result<Offer, WireError> {
    let mut r = Reader::new(Message::Offer, bytes);
    r.version()?;
    let mode = mode_from_bits(r.u8()?)?;
    let bits = r.u8()?;
    let difficulty = Difficulty::new(bits).ok_or(WireError::Difficulty(bits))?;
    let (k, challenges) = (r.u8()?, r.u8()?);
    let space = SpaceParams::new(k, challenges).ok_or(WireError::SpaceParams { k, challenges })?;
    let tick = Tick {
        index: r.u64()?,
        unix_s: r.u64()?,
        prev: r.array()?,
        hash: r.array()?,
        signature: r.array()?,
    };
    let beacon_public_key = r.array()?;
    let registered_plot = if r.flag("has_plot")? {
        Some(PlotCommitment {
            k: r.plot_k()?,
            commitment: r.array()?,
        })
    } else {
        None
    };
    let offer = Offer {
        params: AdmissionParameters {
            mode,
            difficulty,
            tick,
            space,
        },
        beacon_public_key,
        registered_plot,
        stake: r.u64()?,
        stake_min: r.u64()?,
        deadline_ms: r.u64()?,
    };
    r.end()?;
    Ok(offer)
}

/// A client's plot registration: the commitment of the plot it built for
/// its identity (the identity is the connection's certificate key).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct PlotRegistration {
    pub k: u8,
    pub commitment: Hash,
}

impl PlotRegistration {
    /// Wire form: `version u8 ‖ k u8 ‖ commitment [32]`.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(PLOT_REGISTRATION_LEN);
        out.extend_from_slice(&[WIRE_VERSION, self.k]);
        out.extend_from_slice(&self.commitment);
        out
    }

    /// Parse untrusted bytes; `k` must be in `1..=PLOT_K_MAX`.
    pub fn decode(bytes: &[u8]) -> Result<Self, WireError> {
        let mut r = Reader::new(Message::PlotRegistration, bytes);
        r.version()?;
        let registration = Self {
            k: r.plot_k()?,
            commitment: r.array()?,
        };
        r.end()?;
        Ok(registration)
    }
}

/// The admitted answer. Wire form: `version u8 ‖ identity [32] ‖ stake
/// u64`: the identity the connection is now an asset of, and its stake.
pub fn encode_admitted(identity: &Identity, stake: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(ADMITTED_LEN);
    out.push(WIRE_VERSION);
    out.extend_from_slice(&identity.0);
    out.extend_from_slice(&stake.to_be_bytes());
    out
}

/// Parse the admitted answer from untrusted bytes.
pub fn decode_admitted(bytes: &[u8]) -> Result<(Identity, u64), WireError> {
    let mut r = Reader::new(Message::Admitted, bytes);
    r.version()?;
    let identity = Identity(r.array()?);
    let stake = r.u64()?;
    r.end()?;
    Ok((identity, stake))
}

/// A cursor over untrusted bytes whose errors name the message.
struct Reader<'a> {
    message: Message,
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn new(message: Message, bytes: &'a [u8]) -> Self {
        Self {
            message,
            bytes,
            at: 0,
        }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], WireError> {
        let out = self
            .bytes
            .get(self.at..)
            .and_then(|rest| rest.get(..n))
            .ok_or(WireError::Truncated {
                message: self.message,
                len: self.bytes.len(),
                need: self.at.saturating_add(n),
            })?;
        self.at += n;
        Ok(out)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], WireError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }

    fn u8(&mut self) -> Result<u8, WireError> {
        Ok(self.take(1)?[0])
    }

    fn u64(&mut self) -> Result<u64, WireError> {
        Ok(u64::from_be_bytes(self.array()?))
    }

    fn version(&mut self) -> Result<(), WireError> {
        match self.u8()? {
            WIRE_VERSION => Ok(()),
            version => Err(WireError::Version {
                message: self.message,
                version,
            }),
        }
    }

    fn flag(&mut self, field: &'static str) -> Result<bool, WireError> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            value => Err(WireError::Flag {
                message: self.message,
                field,
                value,
            }),
        }
    }

    fn plot_k(&mut self) -> Result<u8, WireError> {
        match self.u8()? {
            k @ 1..=PLOT_K_MAX => Ok(k),
            k => Err(WireError::PlotK {
                message: self.message,
                k,
            }),
        }
    }

    fn end(&self) -> Result<(), WireError> {
        match self.bytes.len() - self.at {
            0 => Ok(()),
            extra => Err(WireError::Trailing {
                message: self.message,
                extra,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::consensus::beacon::test_beacon;

    const NOW: u64 = 1_700_000_000;

    fn mode(bits: u8) -> AdmissionMode {
        mode_from_bits(bits).unwrap()
    }

    fn offer(mode_bits: u8, plot: Option<PlotCommitment>) -> Offer {
        let mut beacon = test_beacon();
        let tick = beacon.tick(NOW).unwrap().clone();
        let mut beacon_public_key = [0u8; BEACON_PUBLIC_KEY_LEN];
        beacon_public_key.copy_from_slice(beacon.public_key());
        Offer {
            params: AdmissionParameters {
                mode: mode(mode_bits),
                difficulty: Difficulty::new(13).unwrap(),
                tick,
                space: SpaceParams::new(9, 5).unwrap(),
            },
            beacon_public_key,
            registered_plot: plot,
            stake: 0x0102_0304_0506_0708,
            stake_min: 10,
            deadline_ms: 2_000,
        }
    }

    const PLOT: PlotCommitment = PlotCommitment {
        commitment: [0xc3; 32],
        k: 9,
    };

    /// Field by field, so a field added to either struct fails to compile
    /// here until the encoding carries it.
    fn assert_same(a: &Offer, b: &Offer) {
        let Offer {
            params:
                AdmissionParameters {
                    mode,
                    difficulty,
                    tick,
                    space,
                },
            beacon_public_key,
            registered_plot,
            stake,
            stake_min,
            deadline_ms,
        } = a;
        assert_eq!(*mode, b.params.mode);
        assert_eq!(*difficulty, b.params.difficulty);
        assert_eq!(*tick, b.params.tick);
        assert_eq!(*space, b.params.space);
        assert_eq!(*beacon_public_key, b.beacon_public_key);
        assert_eq!(*registered_plot, b.registered_plot);
        assert_eq!(
            (*stake, *stake_min, *deadline_ms),
            (b.stake, b.stake_min, b.deadline_ms)
        );
    }

    #[test]
    fn offer_round_trips_in_every_mode_with_and_without_plot() {
        for bits in 0..=MODE_ALL {
            for plot in [None, Some(PLOT)] {
                let sent = offer(bits, plot);
                let bytes = encode_offer(&sent);
                let want = if plot.is_some() {
                    OFFER_LEN_MAX
                } else {
                    OFFER_LEN_MIN
                };
                assert_eq!(bytes.len(), want);
                let got = decode_offer(&bytes).unwrap();
                assert_same(&got, &sent);
                assert_eq!(mode_bits(got.params.mode), bits);
                got.verify_tick().unwrap();
            }
        }
    }

    #[test]
    fn offer_tick_under_another_key_is_refused() {
        let mut sent = offer(MODE_ALL, None);
        sent.beacon_public_key[0] ^= 1;
        let got = decode_offer(&encode_offer(&sent)).unwrap();
        assert!(matches!(
            got.verify_tick(),
            Err(TickError::Signature { .. })
        ));
    }

    #[test]
    fn other_messages_round_trip() {
        let registration = PlotRegistration {
            k: PLOT_K_MAX,
            commitment: [7; 32],
        };
        let bytes = registration.encode();
        assert_eq!(bytes.len(), PLOT_REGISTRATION_LEN);
        assert_eq!(PlotRegistration::decode(&bytes), Ok(registration));

        let identity = Identity([9; 32]);
        let bytes = encode_admitted(&identity, u64::MAX - 1);
        assert_eq!(bytes.len(), ADMITTED_LEN);
        assert_eq!(decode_admitted(&bytes), Ok((identity, u64::MAX - 1)));
    }

    /// Valid encodings of every message, each with its decoder.
    fn valid() -> Vec<(Message, Vec<u8>)> {
        vec![
            (Message::Offer, encode_offer(&offer(MODE_ALL, None))),
            (Message::Offer, encode_offer(&offer(MODE_WORK, Some(PLOT)))),
            (
                Message::PlotRegistration,
                PlotRegistration {
                    k: 1,
                    commitment: [1; 32],
                }
                .encode(),
            ),
            (Message::Admitted, encode_admitted(&Identity([2; 32]), 3)),
        ]
    }

    /// Decode `bytes` as `message`; on success, the canonical re-encoding.
    fn decode(message: Message, bytes: &[u8]) -> Result<Vec<u8>, WireError> {
        match message {
            Message::Offer => decode_offer(bytes).map(|o| encode_offer(&o)),
            Message::PlotRegistration => PlotRegistration::decode(bytes).map(|r| r.encode()),
            Message::Admitted => decode_admitted(bytes).map(|(i, s)| encode_admitted(&i, s)),
        }
    }

    #[test]
    fn every_truncation_and_any_trailing_byte_is_refused() {
        for (message, bytes) in valid() {
            for len in 0..bytes.len() {
                assert!(
                    matches!(
                        decode(message, &bytes[..len]),
                        Err(WireError::Truncated { len: l, need, .. }) if l == len && need > len
                    ),
                    "{message} cut to {len} bytes"
                );
            }
            let mut long = bytes.clone();
            long.push(0);
            assert_eq!(
                decode(message, &long),
                Err(WireError::Trailing { message, extra: 1 })
            );
        }
    }

    // Offsets in an offer.
    const AT_MODE: usize = 1;
    const AT_DIFFICULTY: usize = 2;
    const AT_K: usize = 3;
    const AT_CHALLENGES: usize = 4;
    const AT_HAS_PLOT: usize = OFFER_HEAD_LEN - 1;
    const AT_PLOT_K: usize = OFFER_HEAD_LEN;

    #[test]
    fn bad_fields_are_refused() {
        let plain = encode_offer(&offer(MODE_ALL, None));
        let with_plot = encode_offer(&offer(MODE_ALL, Some(PLOT)));
        let registration = PlotRegistration {
            k: 4,
            commitment: [0; 32],
        }
        .encode();
        let admitted = encode_admitted(&Identity([0; 32]), 0);
        let set = |bytes: &[u8], at: usize, value: u8| {
            let mut bytes = bytes.to_vec();
            bytes[at] = value;
            bytes
        };
        use Message as M;
        let cases: Vec<(&str, Message, Vec<u8>, WireError)> = vec![
            (
                "offer version 0",
                M::Offer,
                set(&plain, 0, 0),
                WireError::Version {
                    message: M::Offer,
                    version: 0,
                },
            ),
            (
                "offer version 2",
                M::Offer,
                set(&plain, 0, 2),
                WireError::Version {
                    message: M::Offer,
                    version: 2,
                },
            ),
            (
                "unknown mode bit",
                M::Offer,
                set(&plain, AT_MODE, 0x10),
                WireError::ModeBits(0x10),
            ),
            (
                "known and unknown mode bits",
                M::Offer,
                set(&plain, AT_MODE, 0x8f),
                WireError::ModeBits(0x8f),
            ),
            (
                "difficulty above the ceiling",
                M::Offer,
                set(&plain, AT_DIFFICULTY, 33),
                WireError::Difficulty(33),
            ),
            (
                "k of 0",
                M::Offer,
                set(&plain, AT_K, 0),
                WireError::SpaceParams {
                    k: 0,
                    challenges: 5,
                },
            ),
            (
                "k above the maximum",
                M::Offer,
                set(&plain, AT_K, PLOT_K_MAX + 1),
                WireError::SpaceParams {
                    k: PLOT_K_MAX + 1,
                    challenges: 5,
                },
            ),
            (
                "no challenges",
                M::Offer,
                set(&plain, AT_CHALLENGES, 0),
                WireError::SpaceParams {
                    k: 9,
                    challenges: 0,
                },
            ),
            (
                "proofs that do not fit a bundle",
                M::Offer,
                set(&set(&plain, AT_K, PLOT_K_MAX), AT_CHALLENGES, 16),
                WireError::SpaceParams {
                    k: PLOT_K_MAX,
                    challenges: 16,
                },
            ),
            (
                "has_plot of 2",
                M::Offer,
                set(&plain, AT_HAS_PLOT, 2),
                WireError::Flag {
                    message: M::Offer,
                    field: "has_plot",
                    value: 2,
                },
            ),
            (
                "plot k of 0",
                M::Offer,
                set(&with_plot, AT_PLOT_K, 0),
                WireError::PlotK {
                    message: M::Offer,
                    k: 0,
                },
            ),
            (
                "plot claimed but absent",
                M::Offer,
                set(&plain, AT_HAS_PLOT, 1),
                WireError::Truncated {
                    message: M::Offer,
                    len: OFFER_LEN_MIN,
                    need: OFFER_HEAD_LEN + OFFER_PLOT_LEN,
                },
            ),
            (
                "plot present but not claimed",
                M::Offer,
                set(&with_plot, AT_HAS_PLOT, 0),
                WireError::Trailing {
                    message: M::Offer,
                    extra: OFFER_PLOT_LEN,
                },
            ),
            (
                "registration version",
                M::PlotRegistration,
                set(&registration, 0, 9),
                WireError::Version {
                    message: M::PlotRegistration,
                    version: 9,
                },
            ),
            (
                "registration k of 0",
                M::PlotRegistration,
                set(&registration, 1, 0),
                WireError::PlotK {
                    message: M::PlotRegistration,
                    k: 0,
                },
            ),
            (
                "registration k above the maximum",
                M::PlotRegistration,
                set(&registration, 1, PLOT_K_MAX + 1),
                WireError::PlotK {
                    message: M::PlotRegistration,
                    k: PLOT_K_MAX + 1,
                },
            ),
            (
                "admitted version",
                M::Admitted,
                set(&admitted, 0, 0xff),
                WireError::Version {
                    message: M::Admitted,
                    version: 0xff,
                },
            ),
        ];
        for (name, message, bytes, want) in cases {
            assert_eq!(decode(message, &bytes), Err(want), "{name}");
        }
    }

    #[test]
    fn errors_name_the_message_and_the_allowed_values() {
        let e = decode_offer(&[WIRE_VERSION]).unwrap_err();
        assert_eq!(
            e.to_string(),
            "admission offer ends early: 1 bytes, at least 2 needed"
        );
        let e = PlotRegistration::decode(&[WIRE_VERSION, 30]).unwrap_err();
        assert_eq!(
            e.to_string(),
            "plot registration: plot k = 30; allowed 1..=24"
        );
    }

    /// xorshift64: deterministic, no dependency.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }

        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
    }

    /// Mutated valid messages never panic a decoder, and whatever decodes
    /// re-encodes to the same bytes (one encoding per value).
    #[test]
    fn mutated_input_never_panics_and_decodes_canonically() {
        let seeds = valid();
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let mut accepted = 0;
        for _ in 0..20_000 {
            let (_, seed) = &seeds[rng.below(seeds.len())];
            let mut bytes = seed.clone();
            for _ in 0..=rng.below(4) {
                match rng.below(4) {
                    0 if !bytes.is_empty() => {
                        let at = rng.below(bytes.len());
                        bytes[at] = rng.next() as u8;
                    }
                    1 if !bytes.is_empty() => {
                        let at = rng.below(bytes.len());
                        bytes[at] ^= 1 << rng.below(8);
                    }
                    2 => bytes.truncate(rng.below(bytes.len() + 1)),
                    _ => bytes.push(rng.next() as u8),
                }
            }
            // Every decoder sees every input: a message of one kind must not
            // panic another's decoder either.
            for message in [Message::Offer, Message::PlotRegistration, Message::Admitted] {
                if let Ok(again) = decode(message, &bytes) {
                    assert_eq!(again, bytes, "{message} has a second encoding");
                    accepted += 1;
                }
            }
        }
        // The loop exercised the success path too, not only refusals.
        assert!(accepted > 100, "only {accepted} mutated inputs decoded");
    }
}
