//! The Certificate Transparency log (RFC 6962): the pure core and its
//! durable store.
//!
//! What it owns:
//! - [`merkle`]: the Merkle tree hash, and generation of audit
//!   (inclusion) and consistency proofs for any historical tree size, over
//!   leaf hashes supplied through the [`LeafHashes`] trait, with an optional
//!   [`SubtreeCache`] that makes them O(log n);
//! - [`verify`]: the client-side checks of those proofs, written as a
//!   separate, iterative code path (RFC 9162 §2.1.3.2, §2.1.4.2);
//! - [`leaf`]: the `MerkleTreeLeaf` encoding of X.509 entries;
//! - [`sth`]: the `TreeHeadSignature` encoding, the log's signer (Ed25519 or
//!   ECDSA P-256) and signed tree head verification;
//! - [`log`]: the durable, append-only log built on those pieces, stored in
//!   a `redb` file. It is the one part that does I/O (it still reads no
//!   clock: times and keys are inputs).
//!
//! What the other parts must not do: no I/O, no storage, no network, no
//! clocks, no threads. Time (`timestamp_ms`), leaf data and keys (PKCS#8 bytes) are
//! inputs; the caller decides when a leaf is accepted, stores leaves and
//! keys, and serves the results. The one outside resource used is the
//! system random number generator, which ECDSA signing and key generation
//! need. Nothing here panics on untrusted input: decoders and verifiers
//! return typed errors.

pub mod leaf;
pub mod log;
pub mod merkle;
pub mod sth;
pub mod verify;

#[cfg(test)]
mod test_vectors;
#[cfg(test)]
mod tests;

pub use leaf::{LeafError, X509Leaf, decode_leaf, encode_x509_leaf};
pub use log::{
    AppendReceipt, CtLog, InclusionProof, LogError, MAX_ENTRIES_PER_CALL, decode_sth, encode_sth,
};
pub use merkle::{
    EMPTY_ROOT, Hash, LeafHashes, ProofError, SubtreeCache, consistency_proof, inclusion_proof,
    leaf_hash, node_hash, root,
};
pub use sth::{
    LogKeyAlgorithm, LogSigner, SignedTreeHead, SignerError, tree_head_signature_input, verify_sth,
};
pub use verify::{VerifyError, verify_consistency, verify_inclusion};
