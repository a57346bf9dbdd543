//! The client-side verifier: inclusion and consistency proofs checked with
//! the iterative algorithms of RFC 9162 §2.1.3.2 and §2.1.4.2.
//!
//! This is deliberately a separate code path from the recursive generation
//! in [`super::merkle`]: it shares only the two hash functions with it, so a
//! mistake in one is caught by the other in the cross-check tests.

use super::merkle::{Hash, node_hash};
use super::sth::LogKeyAlgorithm;

/// Why a proof or signed tree head was not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    #[error("leaf index {index} is not in a tree of size {size}")]
    IndexOutOfRange { index: u64, size: u64 },
    #[error(
        "the proof has {len} hashes, more than a tree of size {size} needs; it was made for another index or size"
    )]
    ProofTooLong { len: usize, size: u64 },
    #[error(
        "the proof has {len} hashes, fewer than a tree of size {size} needs; it was made for another index or size"
    )]
    ProofTooShort { len: usize, size: u64 },
    #[error("the proof does not lead to the expected root of the tree of size {size}")]
    RootMismatch { size: u64 },
    #[error(
        "old tree size {old} is larger than new tree size {new}; a log never shrinks, so check which tree head is older"
    )]
    OldSizeGreater { old: u64, new: u64 },
    #[error(
        "a consistency check from tree size 0 is not a valid request; every tree extends the empty tree"
    )]
    ZeroOldSize,
    #[error(
        "trees of sizes {old} and {new} differ, so a consistency proof is needed, but the proof is empty"
    )]
    EmptyProof { old: u64, new: u64 },
    #[error(
        "both tree heads have size {size}, so the proof must be empty, but it has {len} hashes"
    )]
    UnexpectedProof { size: u64, len: usize },
    #[error(
        "both tree heads have size {size} but different roots: the log has shown two different trees"
    )]
    SameSizeRootsDiffer { size: u64 },
    #[error("the proof does not lead to the old root of the tree of size {old}")]
    OldRootMismatch { old: u64 },
    #[error("the proof does not lead to the new root of the tree of size {new}")]
    NewRootMismatch { new: u64 },
    #[error(
        "the tree head is signed with {sth} but the log key is {key}; use the key the log publishes for this algorithm"
    )]
    AlgorithmMismatch {
        sth: LogKeyAlgorithm,
        key: LogKeyAlgorithm,
    },
    #[error("the tree head signature does not verify under the log's public key")]
    BadSignature,
}

fn lsb(x: u64) -> bool {
    x & 1 == 1
}

/// Check that `leaf_hash` is leaf `index` of the tree of size `size` whose
/// root is `root`, given the audit path `proof` (RFC 9162 §2.1.3.2).
pub fn verify_inclusion(
    leaf_hash: &Hash,
    index: u64,
    size: u64,
    proof: &[Hash],
    root: &Hash,
) -> Result<(), VerifyError> {
    // 1. The index must lie in the tree.
    if index >= size {
        return Err(VerifyError::IndexOutOfRange { index, size });
    }
    // 2., 3.
    let mut fn_ = index;
    let mut sn = size - 1;
    let mut r = *leaf_hash;
    // 4.
    for p in proof {
        // a.
        if sn == 0 {
            return Err(VerifyError::ProofTooLong {
                len: proof.len(),
                size,
            });
        }
        // b.
        if lsb(fn_) || fn_ == sn {
            r = node_hash(p, &r);
            while !lsb(fn_) && fn_ != 0 {
                fn_ >>= 1;
                sn >>= 1;
            }
        } else {
            r = node_hash(&r, p);
        }
        // c.
        fn_ >>= 1;
        sn >>= 1;
    }
    // 5.
    if sn != 0 {
        return Err(VerifyError::ProofTooShort {
            len: proof.len(),
            size,
        });
    }
    if r != *root {
        return Err(VerifyError::RootMismatch { size });
    }
    Ok(())
}

/// Check that the tree of size `old_size` with root `old_root` is a prefix
/// of the tree of size `new_size` with root `new_root`, given the
/// consistency proof `proof` (RFC 9162 §2.1.4.2).
///
/// Equal sizes need an empty proof and equal roots. Old size 0 is rejected:
/// there is no tree head of the empty tree worth checking against.
pub fn verify_consistency(
    old_size: u64,
    new_size: u64,
    old_root: &Hash,
    new_root: &Hash,
    proof: &[Hash],
) -> Result<(), VerifyError> {
    if old_size > new_size {
        return Err(VerifyError::OldSizeGreater {
            old: old_size,
            new: new_size,
        });
    }
    if old_size == 0 {
        return Err(VerifyError::ZeroOldSize);
    }
    if old_size == new_size {
        if !proof.is_empty() {
            return Err(VerifyError::UnexpectedProof {
                size: old_size,
                len: proof.len(),
            });
        }
        if old_root != new_root {
            return Err(VerifyError::SameSizeRootsDiffer { size: old_size });
        }
        return Ok(());
    }
    // 1. Now 0 < old_size < new_size.
    let Some((head, tail)) = proof.split_first() else {
        return Err(VerifyError::EmptyProof {
            old: old_size,
            new: new_size,
        });
    };
    // 2. A power-of-two old tree is a complete subtree of the new one; its
    // root is the proof's implicit first element.
    let (first, rest) = if old_size.is_power_of_two() {
        (*old_root, proof)
    } else {
        (*head, tail)
    };
    // 3.
    let mut fn_ = old_size - 1;
    let mut sn = new_size - 1;
    // 4.
    while lsb(fn_) {
        fn_ >>= 1;
        sn >>= 1;
    }
    // 5.
    let mut fr = first;
    let mut sr = first;
    // 6.
    for c in rest {
        // a.
        if sn == 0 {
            return Err(VerifyError::ProofTooLong {
                len: proof.len(),
                size: new_size,
            });
        }
        // b.
        if lsb(fn_) || fn_ == sn {
            fr = node_hash(c, &fr);
            sr = node_hash(c, &sr);
            while !lsb(fn_) && fn_ != 0 {
                fn_ >>= 1;
                sn >>= 1;
            }
        } else {
            sr = node_hash(&sr, c);
        }
        // c.
        fn_ >>= 1;
        sn >>= 1;
    }
    // 7.
    if sn != 0 {
        return Err(VerifyError::ProofTooShort {
            len: proof.len(),
            size: new_size,
        });
    }
    if fr != *old_root {
        return Err(VerifyError::OldRootMismatch { old: old_size });
    }
    if sr != *new_root {
        return Err(VerifyError::NewRootMismatch { new: new_size });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::authority::ct::merkle::leaf_hash;
    use crate::authority::ct::test_vectors::{
        CONSISTENCY_PROOFS, INCLUSION_PROOFS, LEAF_INPUTS, ROOTS, h, hex, kat_leaf_hashes,
    };

    fn hashes(list: &[&str]) -> Vec<Hash> {
        list.iter().map(|s| h(s)).collect()
    }

    #[test]
    fn known_inclusion_proofs_verify() {
        let leaves = kat_leaf_hashes();
        for (index, size, proof) in INCLUSION_PROOFS {
            let proof = hashes(proof);
            let root = h(ROOTS[*size as usize]);
            let leaf = leaf_hash(&hex(LEAF_INPUTS[*index as usize]));
            assert_eq!(leaf, leaves[*index as usize]);
            verify_inclusion(&leaf, *index, *size, &proof, &root).unwrap();
            // Against the wrong root.
            let other = h(ROOTS[*size as usize - 1]);
            assert_eq!(
                verify_inclusion(&leaf, *index, *size, &proof, &other),
                Err(VerifyError::RootMismatch { size: *size })
            );
        }
    }

    #[test]
    fn known_consistency_proofs_verify() {
        for (old, new, proof) in CONSISTENCY_PROOFS {
            let proof = hashes(proof);
            let (old_root, new_root) = (h(ROOTS[*old as usize]), h(ROOTS[*new as usize]));
            verify_consistency(*old, *new, &old_root, &new_root, &proof).unwrap();
            assert!(verify_consistency(*old, *new, &new_root, &old_root, &proof).is_err());
        }
    }

    #[test]
    fn inclusion_edge_cases() {
        let leaf = h(ROOTS[1]);
        // A one-leaf tree: the leaf is the root and the proof is empty.
        verify_inclusion(&leaf, 0, 1, &[], &leaf).unwrap();
        assert_eq!(
            verify_inclusion(&leaf, 0, 1, &[leaf], &leaf),
            Err(VerifyError::ProofTooLong { len: 1, size: 1 })
        );
        assert_eq!(
            verify_inclusion(&leaf, 0, 0, &[], &leaf),
            Err(VerifyError::IndexOutOfRange { index: 0, size: 0 })
        );
        assert_eq!(
            verify_inclusion(&leaf, 8, 8, &[], &leaf),
            Err(VerifyError::IndexOutOfRange { index: 8, size: 8 })
        );
        assert_eq!(
            verify_inclusion(&leaf, 0, 2, &[], &leaf),
            Err(VerifyError::ProofTooShort { len: 0, size: 2 })
        );
        // Large indices and sizes do not overflow.
        let proof = vec![leaf; 64];
        assert!(verify_inclusion(&leaf, u64::MAX - 1, u64::MAX, &proof, &leaf).is_err());
        assert!(verify_inclusion(&leaf, 0, u64::MAX, &proof, &leaf).is_err());
    }

    #[test]
    fn consistency_edge_cases() {
        let (a, b) = (h(ROOTS[3]), h(ROOTS[4]));
        verify_consistency(3, 3, &a, &a, &[]).unwrap();
        assert_eq!(
            verify_consistency(3, 3, &a, &b, &[]),
            Err(VerifyError::SameSizeRootsDiffer { size: 3 })
        );
        assert_eq!(
            verify_consistency(3, 3, &a, &a, &[a]),
            Err(VerifyError::UnexpectedProof { size: 3, len: 1 })
        );
        assert_eq!(
            verify_consistency(0, 3, &a, &b, &[]),
            Err(VerifyError::ZeroOldSize)
        );
        assert_eq!(
            verify_consistency(0, 0, &a, &a, &[]),
            Err(VerifyError::ZeroOldSize)
        );
        assert_eq!(
            verify_consistency(4, 3, &a, &b, &[]),
            Err(VerifyError::OldSizeGreater { old: 4, new: 3 })
        );
        assert_eq!(
            verify_consistency(3, 4, &a, &b, &[]),
            Err(VerifyError::EmptyProof { old: 3, new: 4 })
        );
        // A power-of-two old tree must not repeat its own root in the proof.
        let leaves = kat_leaf_hashes();
        let good = hashes(&[
            "96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
            "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4",
        ]);
        let (r1, r8) = (h(ROOTS[1]), h(ROOTS[8]));
        assert_eq!(r1, leaves[0]);
        verify_consistency(1, 8, &r1, &r8, &good).unwrap();
        let mut padded = vec![r1];
        padded.extend_from_slice(&good);
        assert!(verify_consistency(1, 8, &r1, &r8, &padded).is_err());
        // Large sizes do not overflow.
        let proof = vec![a; 130];
        assert!(verify_consistency(u64::MAX - 1, u64::MAX, &a, &b, &proof).is_err());
        assert!(verify_consistency(1, u64::MAX, &a, &b, &proof).is_err());
    }

    #[test]
    fn error_messages_name_the_values() {
        let msg = VerifyError::UnexpectedProof { size: 7, len: 2 }.to_string();
        assert!(msg.contains('7') && msg.contains('2'), "{msg}");
        let msg = VerifyError::OldSizeGreater { old: 9, new: 4 }.to_string();
        assert!(msg.contains('9') && msg.contains('4'), "{msg}");
    }
}
