//! Proof of stake: the ledger of stake per identity, and the client's
//! signature over the binding and the tick with its certificate key.
//!
//! An identity is SHA-256 of the DER SubjectPublicKeyInfo in the client
//! certificate, so it names the key, not a certificate: renewing a
//! certificate for the same key keeps the stake.

use super::binding::Binding;
use super::sha256;
use crate::authority::ct::Hash;
use ring::signature::{ECDSA_P256_SHA256_ASN1, ED25519, UnparsedPublicKey};
use std::collections::BTreeMap;

const DOMAIN: &[u8] = b"i2-stake";

/// Longest stake signature accepted: Ed25519 is 64 bytes, a DER ECDSA P-256
/// signature at most 72.
pub const STAKE_SIGNATURE_LEN_MAX: usize = 72;

/// Identities the in-memory ledger holds at most.
pub const LEDGER_LEN_MAX: usize = 1 << 20;

const OID_ED25519: &str = "1.3.101.112";
const OID_EC_PUBLIC_KEY: &str = "1.2.840.10045.2.1";
const OID_P256: &str = "1.2.840.10045.3.1.7";

/// SHA-256 of a DER SubjectPublicKeyInfo. Shown as 64 lowercase hex
/// digits, as operators type it (`internet2-server stake grant`).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Identity(pub Hash);

impl std::fmt::Display for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&crate::authority::api::hex(&self.0))
    }
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Identity({self})")
    }
}

impl Identity {
    pub fn of_spki(spki_der: &[u8]) -> Self {
        Self(sha256(&[spki_der]))
    }
}

/// Signature schemes a client key may use.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum KeyAlgorithm {
    Ed25519,
    /// ECDSA P-256 with SHA-256, signature DER encoded.
    EcdsaP256Sha256,
}

/// A client certificate's key, parsed once where the certificate arrives.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct ClientKey {
    identity: Identity,
    algorithm: KeyAlgorithm,
    /// The subjectPublicKey bits: the raw Ed25519 key or the uncompressed
    /// P-256 point.
    public_key: Vec<u8>,
}

/// Why a certificate's key cannot serve as a stake key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClientKeyError {
    #[error("the client certificate is not valid DER X.509: {0}")]
    Certificate(String),
    #[error(
        "the client certificate key has algorithm {0}; admission accepts Ed25519 (1.3.101.112) or ECDSA P-256 (1.2.840.10045.2.1 on 1.2.840.10045.3.1.7)"
    )]
    Algorithm(String),
}

impl ClientKey {
    /// Take the key out of a DER certificate (the TLS layer has already
    /// checked the chain; this reads only the key).
    pub fn from_certificate_der(der: &[u8]) -> Result<Self, ClientKeyError> {
        let (_, cert) = x509_parser::parse_x509_certificate(der)
            .map_err(|e| ClientKeyError::Certificate(e.to_string()))?;
        let spki = cert.public_key();
        let oid = spki.algorithm.algorithm.to_id_string();
        let curve = spki
            .algorithm
            .parameters
            .as_ref()
            .and_then(|p| p.as_oid().ok())
            .map(|o| o.to_id_string());
        let algorithm = match (oid.as_str(), curve.as_deref()) {
            (OID_ED25519, _) => KeyAlgorithm::Ed25519,
            (OID_EC_PUBLIC_KEY, Some(OID_P256)) => KeyAlgorithm::EcdsaP256Sha256,
            (other, curve) => {
                return Err(ClientKeyError::Algorithm(match curve {
                    Some(c) => format!("{other} on {c}"),
                    None => other.to_owned(),
                }));
            }
        };
        Ok(Self {
            identity: Identity::of_spki(spki.raw),
            algorithm,
            public_key: spki.subject_public_key.data.to_vec(),
        })
    }

    pub fn identity(&self) -> Identity {
        self.identity
    }

    pub fn algorithm(&self) -> KeyAlgorithm {
        self.algorithm
    }

    /// Check `signature` over [`stake_message`].
    pub fn verify(&self, message: &[u8], signature: &[u8]) -> bool {
        let alg: &dyn ring::signature::VerificationAlgorithm = match self.algorithm {
            KeyAlgorithm::Ed25519 => &ED25519,
            KeyAlgorithm::EcdsaP256Sha256 => &ECDSA_P256_SHA256_ASN1,
        };
        UnparsedPublicKey::new(alg, &self.public_key)
            .verify(message, signature)
            .is_ok()
    }
}

/// What the client signs: `"i2-stake" ‖ binding ‖ tick hash`.
pub fn stake_message(binding: &Binding, tick_hash: &Hash) -> [u8; 8 + 32 + 32] {
    let mut message = [0u8; 72];
    message[..8].copy_from_slice(DOMAIN);
    message[8..40].copy_from_slice(binding.as_bytes());
    message[40..].copy_from_slice(tick_hash);
    message
}

/// Why a ledger change was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StakeError {
    #[error("granting {amount} to {identity} would overflow its stake of {held}")]
    Overflow {
        identity: Identity,
        held: u64,
        amount: u64,
    },
    #[error("the ledger holds its maximum of {max} identities; revoke one first")]
    Full { max: usize },
    #[error("a grant of 0 changes nothing; grant at least 1")]
    Zero,
}

/// Why a stake proof was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StakeFailure {
    #[error("identity {identity} holds stake {held}, below the minimum {min}")]
    Insufficient {
        identity: Identity,
        held: u64,
        min: u64,
    },
    #[error("the stake signature does not verify under the client certificate key")]
    Signature,
}

/// Stake per identity, in memory; [`super::state::AdmissionState`] makes
/// it durable.
#[derive(Debug, Default, Clone)]
pub struct StakeLedger {
    stakes: BTreeMap<Identity, u64>,
}

impl StakeLedger {
    /// Add `amount` to `identity`'s stake; returns the new total.
    pub fn grant(&mut self, identity: Identity, amount: u64) -> Result<u64, StakeError> {
        let total = self.check_grant(&identity, amount)?;
        self.stakes.insert(identity, total);
        Ok(total)
    }

    /// The total [`Self::grant`] would leave, or why it would refuse;
    /// changes nothing (a durable ledger checks before it writes).
    pub fn check_grant(&self, identity: &Identity, amount: u64) -> Result<u64, StakeError> {
        if amount == 0 {
            return Err(StakeError::Zero);
        }
        if !self.stakes.contains_key(identity) && self.stakes.len() >= LEDGER_LEN_MAX {
            return Err(StakeError::Full {
                max: LEDGER_LEN_MAX,
            });
        }
        let held = self.get(identity);
        held.checked_add(amount).ok_or(StakeError::Overflow {
            identity: *identity,
            held,
            amount,
        })
    }

    /// Withdraw up to `amount`; returns what is left. An identity left with
    /// nothing leaves the ledger.
    pub fn revoke(&mut self, identity: &Identity, amount: u64) -> u64 {
        let left = self.get(identity).saturating_sub(amount);
        if left == 0 {
            self.stakes.remove(identity);
        } else {
            self.stakes.insert(*identity, left);
        }
        left
    }

    pub fn len(&self) -> usize {
        self.stakes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.stakes.is_empty()
    }

    pub fn get(&self, identity: &Identity) -> u64 {
        self.stakes.get(identity).copied().unwrap_or(0)
    }

    /// Every identity with stake, in identity order.
    pub fn list(&self) -> impl Iterator<Item = (Identity, u64)> + '_ {
        self.stakes.iter().map(|(i, s)| (*i, *s))
    }

    /// Check the stake proof of `key`: enough stake, then the signature
    /// (the cheap lookup first, so the unstaked cost one map probe).
    pub fn verify(
        &self,
        key: &ClientKey,
        min: u64,
        binding: &Binding,
        tick_hash: &Hash,
        signature: &[u8],
    ) -> Result<(), StakeFailure> {
        let held = self.get(&key.identity);
        if held < min {
            return Err(StakeFailure::Insufficient {
                identity: key.identity,
                held,
                min,
            });
        }
        if key.verify(&stake_message(binding, tick_hash), signature) {
            Ok(())
        } else {
            Err(StakeFailure::Signature)
        }
    }
}

#[cfg(test)]
pub(crate) mod test_client {
    //! A client certificate and its signing key, for tests.
    use ring::rand::SystemRandom;
    use ring::signature::{ECDSA_P256_SHA256_ASN1_SIGNING, EcdsaKeyPair, Ed25519KeyPair};

    pub enum Signer {
        Ed25519(Ed25519KeyPair),
        Ecdsa(EcdsaKeyPair),
    }

    pub struct TestClient {
        pub certificate_der: Vec<u8>,
        pub signer: Signer,
    }

    impl TestClient {
        pub fn new(ecdsa: bool) -> Self {
            let rng = SystemRandom::new();
            let (pkcs8, signer) = if ecdsa {
                let doc =
                    EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, &rng).unwrap();
                let pair =
                    EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, doc.as_ref(), &rng)
                        .unwrap();
                (doc.as_ref().to_vec(), Signer::Ecdsa(pair))
            } else {
                let doc = Ed25519KeyPair::generate_pkcs8(&rng).unwrap();
                let pair = Ed25519KeyPair::from_pkcs8(doc.as_ref()).unwrap();
                (doc.as_ref().to_vec(), Signer::Ed25519(pair))
            };
            let key = rcgen::KeyPair::try_from(pkcs8.as_slice()).unwrap();
            let cert = rcgen::CertificateParams::new(vec!["client.test".into()])
                .unwrap()
                .self_signed(&key)
                .unwrap();
            Self {
                certificate_der: cert.der().to_vec(),
                signer,
            }
        }

        pub fn sign(&self, message: &[u8]) -> Vec<u8> {
            match &self.signer {
                Signer::Ed25519(k) => k.sign(message).as_ref().to_vec(),
                Signer::Ecdsa(k) => k
                    .sign(&SystemRandom::new(), message)
                    .unwrap()
                    .as_ref()
                    .to_vec(),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::test_client::TestClient;
    use super::*;

    const B: Binding = Binding::from_exporter([1; 32]);
    const TICK: Hash = [2; 32];

    fn staked(client: &TestClient, stake: u64) -> (ClientKey, StakeLedger) {
        let key = ClientKey::from_certificate_der(&client.certificate_der).unwrap();
        let mut ledger = StakeLedger::default();
        if stake > 0 {
            ledger.grant(key.identity(), stake).unwrap();
        }
        (key, ledger)
    }

    #[test]
    fn staked_client_signature_verifies_for_both_key_types() {
        for ecdsa in [false, true] {
            let client = TestClient::new(ecdsa);
            let (key, ledger) = staked(&client, 10);
            let expected = if ecdsa {
                KeyAlgorithm::EcdsaP256Sha256
            } else {
                KeyAlgorithm::Ed25519
            };
            assert_eq!(key.algorithm(), expected);
            let sig = client.sign(&stake_message(&B, &TICK));
            assert!(sig.len() <= STAKE_SIGNATURE_LEN_MAX);
            ledger.verify(&key, 10, &B, &TICK, &sig).unwrap();
        }
    }

    #[test]
    fn under_staked_identity_is_refused() {
        let client = TestClient::new(false);
        let (key, ledger) = staked(&client, 9);
        let sig = client.sign(&stake_message(&B, &TICK));
        assert!(matches!(
            ledger.verify(&key, 10, &B, &TICK, &sig),
            Err(StakeFailure::Insufficient {
                held: 9,
                min: 10,
                ..
            })
        ));
    }

    #[test]
    fn signature_by_another_key_or_binding_is_refused() {
        let client = TestClient::new(true);
        let liar = TestClient::new(true);
        let (key, ledger) = staked(&client, 1);
        let forged = liar.sign(&stake_message(&B, &TICK));
        assert_eq!(
            ledger.verify(&key, 1, &B, &TICK, &forged),
            Err(StakeFailure::Signature)
        );
        let other_connection = Binding::from_exporter([9; 32]);
        let replayed = client.sign(&stake_message(&other_connection, &TICK));
        assert_eq!(
            ledger.verify(&key, 1, &B, &TICK, &replayed),
            Err(StakeFailure::Signature)
        );
    }

    #[test]
    fn ledger_grant_revoke_list() {
        let mut ledger = StakeLedger::default();
        let a = Identity([1; 32]);
        let b = Identity([2; 32]);
        assert_eq!(ledger.grant(b, 5).unwrap(), 5);
        assert_eq!(ledger.grant(a, 3).unwrap(), 3);
        assert_eq!(ledger.grant(a, 4).unwrap(), 7);
        assert!(matches!(
            ledger.grant(a, u64::MAX),
            Err(StakeError::Overflow { held: 7, .. })
        ));
        assert_eq!(ledger.list().collect::<Vec<_>>(), vec![(a, 7), (b, 5)]);
        assert_eq!(ledger.revoke(&a, 2), 5);
        assert_eq!(ledger.revoke(&b, 100), 0);
        assert_eq!(ledger.list().collect::<Vec<_>>(), vec![(a, 5)]);
        assert_eq!(ledger.get(&b), 0);
    }

    #[test]
    fn garbage_certificate_is_refused() {
        assert!(matches!(
            ClientKey::from_certificate_der(&[0x30, 0x03, 0x02, 0x01, 0x05]),
            Err(ClientKeyError::Certificate(_))
        ));
    }
}
