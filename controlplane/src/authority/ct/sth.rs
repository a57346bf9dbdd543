//! RFC 6962 §3.5 signed tree heads: the `TreeHeadSignature` input, the log's
//! signer, and verification of a signed tree head.
//!
//! ```text
//! digitally-signed struct {
//!     Version version;                   // v1(0), 1 byte
//!     SignatureType signature_type;      // tree_hash(1), 1 byte
//!     uint64 timestamp;
//!     uint64 tree_size;
//!     opaque sha256_root_hash[32];
//! } TreeHeadSignature;
//! ```
//!
//! The log key is ECDSA P-256 with SHA-256 (RFC 6962 §2.1.4), signatures
//! ASN.1 DER, or Ed25519 (as RFC 9162 permits), signatures raw. Public keys
//! are the raw form `ring` uses: the 65-byte uncompressed P-256 point or the
//! 32-byte Ed25519 key; [`LogSigner::public_key_spki`] gives the
//! SubjectPublicKeyInfo a log publishes.

use super::merkle::Hash;
use super::verify::VerifyError;
use ring::digest::{SHA256, digest};
use ring::rand::SystemRandom;
use ring::signature::{
    self, ECDSA_P256_SHA256_ASN1, ECDSA_P256_SHA256_ASN1_SIGNING, EcdsaKeyPair, Ed25519KeyPair,
    KeyPair, UnparsedPublicKey,
};
use std::fmt;

/// `Version.v1`.
pub const VERSION_V1: u8 = 0;
/// `SignatureType.tree_hash`.
pub const SIGNATURE_TYPE_TREE_HASH: u8 = 1;
/// The length of the `TreeHeadSignature` input.
pub const TREE_HEAD_SIGNATURE_LEN: usize = 1 + 1 + 8 + 8 + 32;

/// The log's signature algorithm.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LogKeyAlgorithm {
    /// Ed25519; raw 64-byte signatures.
    Ed25519,
    /// ECDSA over P-256 with SHA-256; ASN.1 DER signatures.
    EcdsaP256Sha256,
}

impl LogKeyAlgorithm {
    /// The TLS `SignatureScheme` code used in a `DigitallySigned` struct:
    /// `ecdsa_secp256r1_sha256` (hash sha256(4), signature ecdsa(3)) or
    /// `ed25519` (0x0807).
    pub fn tls_signature_scheme(self) -> u16 {
        match self {
            LogKeyAlgorithm::Ed25519 => 0x0807,
            LogKeyAlgorithm::EcdsaP256Sha256 => 0x0403,
        }
    }
}

impl fmt::Display for LogKeyAlgorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            LogKeyAlgorithm::Ed25519 => "Ed25519",
            LogKeyAlgorithm::EcdsaP256Sha256 => "ECDSA P-256 SHA-256",
        })
    }
}

/// The bytes a tree head signature covers.
pub fn tree_head_signature_input(
    tree_size: u64,
    timestamp_ms: u64,
    root_hash: &Hash,
) -> [u8; TREE_HEAD_SIGNATURE_LEN] {
    let mut out = [0u8; TREE_HEAD_SIGNATURE_LEN];
    out[0] = VERSION_V1;
    out[1] = SIGNATURE_TYPE_TREE_HASH;
    out[2..10].copy_from_slice(&timestamp_ms.to_be_bytes());
    out[10..18].copy_from_slice(&tree_size.to_be_bytes());
    out[18..50].copy_from_slice(root_hash);
    out
}

/// A signed tree head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignedTreeHead {
    pub tree_size: u64,
    /// Milliseconds since the Unix epoch.
    pub timestamp_ms: u64,
    pub root_hash: Hash,
    /// DER for ECDSA, raw for Ed25519.
    pub signature: Vec<u8>,
    pub algorithm: LogKeyAlgorithm,
}

impl SignedTreeHead {
    /// The bytes the signature covers.
    pub fn signature_input(&self) -> [u8; TREE_HEAD_SIGNATURE_LEN] {
        tree_head_signature_input(self.tree_size, self.timestamp_ms, &self.root_hash)
    }

    /// The TLS `DigitallySigned` encoding of the signature (as in the
    /// `tree_head_signature` of RFC 6962 §4.3): the 2-byte signature
    /// scheme, then the signature as `opaque<0..2^16-1>`.
    pub fn digitally_signed(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(4 + self.signature.len());
        out.extend_from_slice(&self.algorithm.tls_signature_scheme().to_be_bytes());
        // Ed25519 and P-256 DER signatures are at most 72 bytes.
        out.extend_from_slice(&(self.signature.len() as u16).to_be_bytes());
        out.extend_from_slice(&self.signature);
        out
    }
}

/// Why a log key cannot be made, loaded or used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignerError {
    #[error("the PKCS#8 bytes are not a usable {algorithm} private key: {reason}")]
    KeyRejected {
        algorithm: LogKeyAlgorithm,
        reason: String,
    },
    #[error("the system random number generator failed while {0}")]
    Random(&'static str),
}

enum SignerKey {
    Ed25519(Ed25519KeyPair),
    EcdsaP256(EcdsaKeyPair),
}

/// The log's signing key. Keys come in as PKCS#8; nothing here stores them.
pub struct LogSigner {
    key: SignerKey,
    rng: SystemRandom,
}

impl fmt::Debug for LogSigner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LogSigner")
            .field("algorithm", &self.algorithm())
            .field("log_id", &LogId(self.log_id()))
            .finish_non_exhaustive()
    }
}

struct LogId(Hash);

impl fmt::Debug for LogId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.iter().try_for_each(|b| write!(f, "{b:02x}"))
    }
}

/// DER prefix of an Ed25519 SubjectPublicKeyInfo (RFC 8410), before the
/// 32-byte key.
pub(crate) const ED25519_SPKI_PREFIX: &[u8] = &[
    0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00,
];
/// DER prefix of a P-256 SubjectPublicKeyInfo (RFC 5480), before the
/// 65-byte uncompressed point.
pub(crate) const P256_SPKI_PREFIX: &[u8] = &[
    0x30, 0x59, 0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06, 0x08, 0x2a,
    0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07, 0x03, 0x42, 0x00,
];

impl LogSigner {
    /// Load a key from PKCS#8 DER (v1 or v2 for Ed25519).
    pub fn from_pkcs8(algorithm: LogKeyAlgorithm, pkcs8: &[u8]) -> Result<Self, SignerError> {
        let rng = SystemRandom::new();
        let rejected = |e: ring::error::KeyRejected| SignerError::KeyRejected {
            algorithm,
            reason: e.to_string(),
        };
        let key = match algorithm {
            LogKeyAlgorithm::Ed25519 => SignerKey::Ed25519(
                Ed25519KeyPair::from_pkcs8_maybe_unchecked(pkcs8).map_err(rejected)?,
            ),
            LogKeyAlgorithm::EcdsaP256Sha256 => SignerKey::EcdsaP256(
                EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, pkcs8, &rng)
                    .map_err(rejected)?,
            ),
        };
        Ok(LogSigner { key, rng })
    }

    /// Make a new key; returns the signer and its PKCS#8 DER for the caller
    /// to keep.
    pub fn generate(algorithm: LogKeyAlgorithm) -> Result<(Self, Vec<u8>), SignerError> {
        let rng = SystemRandom::new();
        let pkcs8 = match algorithm {
            LogKeyAlgorithm::Ed25519 => Ed25519KeyPair::generate_pkcs8(&rng),
            LogKeyAlgorithm::EcdsaP256Sha256 => {
                EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, &rng)
            }
        }
        .map_err(|_| SignerError::Random("generating a key"))?;
        let pkcs8 = pkcs8.as_ref().to_vec();
        Ok((Self::from_pkcs8(algorithm, &pkcs8)?, pkcs8))
    }

    pub fn algorithm(&self) -> LogKeyAlgorithm {
        match self.key {
            SignerKey::Ed25519(_) => LogKeyAlgorithm::Ed25519,
            SignerKey::EcdsaP256(_) => LogKeyAlgorithm::EcdsaP256Sha256,
        }
    }

    /// The raw public key, as [`verify_sth`] takes it.
    pub fn public_key(&self) -> Vec<u8> {
        match &self.key {
            SignerKey::Ed25519(k) => k.public_key().as_ref().to_vec(),
            SignerKey::EcdsaP256(k) => k.public_key().as_ref().to_vec(),
        }
    }

    /// The public key as a DER SubjectPublicKeyInfo.
    pub fn public_key_spki(&self) -> Vec<u8> {
        let prefix = match self.key {
            SignerKey::Ed25519(_) => ED25519_SPKI_PREFIX,
            SignerKey::EcdsaP256(_) => P256_SPKI_PREFIX,
        };
        let mut out = prefix.to_vec();
        out.extend_from_slice(&self.public_key());
        out
    }

    /// The log ID: SHA-256 of the SubjectPublicKeyInfo (RFC 6962 §3.2).
    pub fn log_id(&self) -> Hash {
        let mut out = [0u8; 32];
        out.copy_from_slice(digest(&SHA256, &self.public_key_spki()).as_ref());
        out
    }

    /// Sign the head of the tree of `tree_size` leaves with root `root_hash`
    /// at `timestamp_ms`.
    pub fn sign_tree_head(
        &self,
        tree_size: u64,
        timestamp_ms: u64,
        root_hash: Hash,
    ) -> Result<SignedTreeHead, SignerError> {
        let input = tree_head_signature_input(tree_size, timestamp_ms, &root_hash);
        let signature = match &self.key {
            SignerKey::Ed25519(k) => k.sign(&input).as_ref().to_vec(),
            SignerKey::EcdsaP256(k) => k
                .sign(&self.rng, &input)
                .map_err(|_| SignerError::Random("signing a tree head"))?
                .as_ref()
                .to_vec(),
        };
        Ok(SignedTreeHead {
            tree_size,
            timestamp_ms,
            root_hash,
            signature,
            algorithm: self.algorithm(),
        })
    }
}

/// Check `sth`'s signature under the log's raw `public_key` of `algorithm`.
pub fn verify_sth(
    sth: &SignedTreeHead,
    public_key: &[u8],
    algorithm: LogKeyAlgorithm,
) -> Result<(), VerifyError> {
    if sth.algorithm != algorithm {
        return Err(VerifyError::AlgorithmMismatch {
            sth: sth.algorithm,
            key: algorithm,
        });
    }
    let alg: &dyn signature::VerificationAlgorithm = match algorithm {
        LogKeyAlgorithm::Ed25519 => &signature::ED25519,
        LogKeyAlgorithm::EcdsaP256Sha256 => &ECDSA_P256_SHA256_ASN1,
    };
    UnparsedPublicKey::new(alg, public_key)
        .verify(&sth.signature_input(), &sth.signature)
        .map_err(|_| VerifyError::BadSignature)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::authority::ct::test_vectors::{h, hex};

    const ALGORITHMS: [LogKeyAlgorithm; 2] =
        [LogKeyAlgorithm::Ed25519, LogKeyAlgorithm::EcdsaP256Sha256];

    #[test]
    fn signature_input_is_byte_exact() {
        let root = h("5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328");
        let input = tree_head_signature_input(8, 0x0000_018b_cfe5_6800, &root);
        let mut want = hex("00010000018bcfe56800");
        want.extend(hex("0000000000000008"));
        want.extend_from_slice(&root);
        assert_eq!(input.to_vec(), want);
    }

    #[test]
    fn round_trip_and_tampering() {
        let root = h("ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c");
        for algorithm in ALGORITHMS {
            let (signer, pkcs8) = LogSigner::generate(algorithm).unwrap();
            assert_eq!(signer.algorithm(), algorithm);
            let sth = signer.sign_tree_head(7, 1_700_000_000_123, root).unwrap();
            assert_eq!(sth.algorithm, algorithm);
            let key = signer.public_key();
            verify_sth(&sth, &key, algorithm).unwrap();

            // The same key reloaded from its PKCS#8 verifies and is verified.
            let again = LogSigner::from_pkcs8(algorithm, &pkcs8).unwrap();
            assert_eq!(again.public_key(), key);
            verify_sth(&again.sign_tree_head(7, 1, root).unwrap(), &key, algorithm).unwrap();

            let mut t = sth.clone();
            t.tree_size += 1;
            assert_eq!(
                verify_sth(&t, &key, algorithm),
                Err(VerifyError::BadSignature)
            );
            let mut t = sth.clone();
            t.timestamp_ms -= 1;
            assert_eq!(
                verify_sth(&t, &key, algorithm),
                Err(VerifyError::BadSignature)
            );
            let mut t = sth.clone();
            t.root_hash[31] ^= 1;
            assert_eq!(
                verify_sth(&t, &key, algorithm),
                Err(VerifyError::BadSignature)
            );
            let mut t = sth.clone();
            let last = t.signature.len() - 1;
            t.signature[last] ^= 0x40;
            assert_eq!(
                verify_sth(&t, &key, algorithm),
                Err(VerifyError::BadSignature)
            );
            let mut t = sth.clone();
            t.signature.clear();
            assert_eq!(
                verify_sth(&t, &key, algorithm),
                Err(VerifyError::BadSignature)
            );

            // Another key of the same kind.
            let (other, _) = LogSigner::generate(algorithm).unwrap();
            assert_eq!(
                verify_sth(&sth, &other.public_key(), algorithm),
                Err(VerifyError::BadSignature)
            );
            // The wrong algorithm named.
            let wrong = ALGORITHMS.into_iter().find(|a| *a != algorithm).unwrap();
            assert_eq!(
                verify_sth(&sth, &key, wrong),
                Err(VerifyError::AlgorithmMismatch {
                    sth: algorithm,
                    key: wrong
                })
            );
            let mut t = sth.clone();
            t.algorithm = wrong;
            assert_eq!(verify_sth(&t, &key, wrong), Err(VerifyError::BadSignature));

            let ds = sth.digitally_signed();
            assert_eq!(ds[..2], algorithm.tls_signature_scheme().to_be_bytes());
            assert_eq!(
                usize::from(u16::from_be_bytes([ds[2], ds[3]])),
                sth.signature.len()
            );
            assert_eq!(&ds[4..], &sth.signature[..]);
        }
    }

    #[test]
    fn key_shapes_and_spki_match_rcgen() {
        for algorithm in ALGORITHMS {
            let (signer, pkcs8) = LogSigner::generate(algorithm).unwrap();
            let key_len = match algorithm {
                LogKeyAlgorithm::Ed25519 => 32,
                LogKeyAlgorithm::EcdsaP256Sha256 => 65,
            };
            assert_eq!(signer.public_key().len(), key_len);
            let rcgen_key = rcgen::KeyPair::try_from(pkcs8.as_slice()).unwrap();
            assert_eq!(signer.public_key_spki(), rcgen_key.public_key_der());
            let want: Hash = digest(&SHA256, &rcgen_key.public_key_der())
                .as_ref()
                .try_into()
                .unwrap();
            assert_eq!(signer.log_id(), want);
            let debug = format!("{signer:?}");
            assert!(debug.contains("log_id"), "{debug}");
        }
    }

    #[test]
    fn ed25519_pkcs8_v1_loads_rfc8032_key() {
        // RFC 8032 §7.1 test 1: secret key and its public key.
        let mut pkcs8 = hex("302e020100300506032b657004220420");
        pkcs8.extend(hex(
            "9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60",
        ));
        let signer = LogSigner::from_pkcs8(LogKeyAlgorithm::Ed25519, &pkcs8).unwrap();
        assert_eq!(
            signer.public_key(),
            hex("d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a")
        );
        // Ed25519 is deterministic: the same head, the same signature.
        let root = [7u8; 32];
        assert_eq!(
            signer.sign_tree_head(1, 2, root).unwrap(),
            signer.sign_tree_head(1, 2, root).unwrap()
        );
    }

    #[test]
    fn bad_keys_are_rejected() {
        for algorithm in ALGORITHMS {
            let err = LogSigner::from_pkcs8(algorithm, b"not a key").unwrap_err();
            assert!(matches!(err, SignerError::KeyRejected { algorithm: a, .. } if a == algorithm));
            assert!(err.to_string().contains(&algorithm.to_string()), "{err}");
        }
        // A key of the other kind.
        let (_, ed) = LogSigner::generate(LogKeyAlgorithm::Ed25519).unwrap();
        assert!(LogSigner::from_pkcs8(LogKeyAlgorithm::EcdsaP256Sha256, &ed).is_err());
        let (_, ec) = LogSigner::generate(LogKeyAlgorithm::EcdsaP256Sha256).unwrap();
        assert!(LogSigner::from_pkcs8(LogKeyAlgorithm::Ed25519, &ec).is_err());
    }
}
