//! Cross-checks of proof generation (`merkle`, recursive) against proof
//! verification (`verify`, iterative) over every size, index and old size of
//! a 300-leaf tree, with corrupted proofs that must all fail.

use super::merkle::{Hash, SubtreeCache, consistency_proof, inclusion_proof, root};
use super::test_vectors::pseudo_random_leaf_hashes;
use super::verify::{VerifyError, verify_consistency, verify_inclusion};
use super::{EMPTY_ROOT, leaf_hash};

const N: u64 = 300;

struct Fixture {
    leaves: Vec<Hash>,
    tree: SubtreeCache<Vec<Hash>>,
    /// `roots[s]`: the root of the first `s` leaves.
    roots: Vec<Hash>,
}

fn fixture() -> Fixture {
    let leaves = pseudo_random_leaf_hashes(N as usize, 0x6962);
    let tree = SubtreeCache::new(leaves.clone());
    let roots = (0..=N).map(|s| root(&tree, s).unwrap()).collect();
    Fixture {
        leaves,
        tree,
        roots,
    }
}

/// Each element with one bit flipped (a different bit per element).
fn bit_flips(proof: &[Hash], salt: u64) -> impl Iterator<Item = Vec<Hash>> + '_ {
    (0..proof.len()).map(move |i| {
        let mut p = proof.to_vec();
        let bit = (salt as usize).wrapping_mul(31).wrapping_add(i * 97) % 256;
        p[i][bit / 8] ^= 1 << (bit % 8);
        p
    })
}

/// The proof with an element dropped or added.
fn length_changes(proof: &[Hash], extra: Hash) -> Vec<Vec<Hash>> {
    let mut out = Vec::new();
    if !proof.is_empty() {
        out.push(proof[1..].to_vec());
        out.push(proof[..proof.len() - 1].to_vec());
    }
    let mut longer = proof.to_vec();
    longer.push(extra);
    out.push(longer);
    let mut longer = vec![extra];
    longer.extend_from_slice(proof);
    out.push(longer);
    out
}

#[test]
fn cached_and_uncached_roots_agree() {
    let f = fixture();
    assert_eq!(f.roots[0], EMPTY_ROOT);
    for size in 0..=N {
        assert_eq!(root(&f.leaves, size).unwrap(), f.roots[size as usize]);
    }
}

#[test]
fn every_inclusion_proof_verifies_and_every_corruption_fails() {
    let f = fixture();
    let mut checked = 0u64;
    for size in 1..=N {
        let root_at = |s: u64| &f.roots[s as usize];
        for index in 0..size {
            let leaf = &f.leaves[index as usize];
            let proof = inclusion_proof(&f.tree, index, size).unwrap();
            verify_inclusion(leaf, index, size, &proof, root_at(size))
                .unwrap_or_else(|e| panic!("index {index} size {size}: {e}"));
            checked += 1;

            let fails = |leaf: &Hash, index: u64, s: u64, p: &[Hash], what: &str| {
                assert!(
                    verify_inclusion(leaf, index, s, p, root_at(s)).is_err(),
                    "{what} accepted: index {index} size {s} (proof for size {size})"
                );
            };
            for p in bit_flips(&proof, index ^ size) {
                fails(leaf, index, size, &p, "flipped bit");
            }
            for p in length_changes(&proof, *leaf) {
                fails(leaf, index, size, &p, "changed length");
            }
            let mut bad_root = *root_at(size);
            bad_root[(index % 32) as usize] ^= 0x10;
            assert!(
                verify_inclusion(leaf, index, size, &proof, &bad_root).is_err(),
                "wrong root accepted: index {index} size {size}"
            );
            // The RFC 9162 length checks fire on their own, before any root
            // comparison.
            let mut longer = proof.clone();
            longer.push(*leaf);
            assert_eq!(
                verify_inclusion(leaf, index, size, &longer, root_at(size)),
                Err(VerifyError::ProofTooLong {
                    len: longer.len(),
                    size
                })
            );
            if let Some((_, shorter)) = proof.split_last() {
                assert_eq!(
                    verify_inclusion(leaf, index, size, shorter, root_at(size)),
                    Err(VerifyError::ProofTooShort {
                        len: shorter.len(),
                        size
                    })
                );
            }
            if size > 1 {
                let other = (index + 1) % size;
                fails(leaf, other, size, &proof, "wrong index");
                if index ^ 1 < size {
                    fails(leaf, index ^ 1, size, &proof, "sibling index");
                }
                fails(&f.leaves[other as usize], index, size, &proof, "wrong leaf");
            }
            if size < N {
                fails(leaf, index, size + 1, &proof, "larger size");
            }
            if index + 1 < size {
                fails(leaf, index, size - 1, &proof, "smaller size");
            }
            assert!(
                verify_inclusion(&leaf_hash(b"x"), index, size, &proof, root_at(size)).is_err()
            );
        }
    }
    assert_eq!(checked, N * (N + 1) / 2);
}

#[test]
fn every_consistency_proof_verifies_and_every_corruption_fails() {
    let f = fixture();
    let mut checked = 0u64;
    for new in 1..=N {
        let root_at = |s: u64| &f.roots[s as usize];
        for old in 1..=new {
            let proof = consistency_proof(&f.tree, old, new).unwrap();
            verify_consistency(old, new, root_at(old), root_at(new), &proof)
                .unwrap_or_else(|e| panic!("{old} -> {new}: {e}"));
            checked += 1;

            let fails = |o: u64, n: u64, p: &[Hash], what: &str| {
                assert!(
                    verify_consistency(o, n, root_at(o), root_at(n), p).is_err(),
                    "{what} accepted: {o} -> {n} (proof for {old} -> {new})"
                );
            };
            for p in bit_flips(&proof, old ^ new) {
                fails(old, new, &p, "flipped bit");
            }
            for p in length_changes(&proof, *root_at(old)) {
                fails(old, new, &p, "changed length");
            }
            if old < new {
                let mut longer = proof.clone();
                longer.push(*root_at(old));
                assert_eq!(
                    verify_consistency(old, new, root_at(old), root_at(new), &longer),
                    Err(VerifyError::ProofTooLong {
                        len: longer.len(),
                        size: new
                    }),
                    "{old} -> {new}"
                );
                let shorter = &proof[..proof.len() - 1];
                let got = verify_consistency(old, new, root_at(old), root_at(new), shorter);
                let want = if shorter.is_empty() {
                    VerifyError::EmptyProof { old, new }
                } else {
                    VerifyError::ProofTooShort {
                        len: shorter.len(),
                        size: new,
                    }
                };
                assert_eq!(got, Err(want), "{old} -> {new}");
            }
            // The right proof against a claimed root that is not the tree's.
            let mut bad_old = *root_at(old);
            bad_old[(old % 32) as usize] ^= 0x80;
            let mut bad_new = *root_at(new);
            bad_new[(new % 32) as usize] ^= 0x01;
            assert!(
                verify_consistency(old, new, &bad_old, root_at(new), &proof).is_err(),
                "wrong old root accepted: {old} -> {new}"
            );
            assert!(
                verify_consistency(old, new, root_at(old), &bad_new, &proof).is_err(),
                "wrong new root accepted: {old} -> {new}"
            );
            if old < new {
                fails(old + 1, new, &proof, "larger old size");
                assert!(
                    verify_consistency(old, new, root_at(new), root_at(old), &proof).is_err(),
                    "swapped roots accepted: {old} -> {new}"
                );
            }
            if old > 1 {
                fails(old - 1, new, &proof, "smaller old size");
            }
            if new < N {
                fails(old, new + 1, &proof, "larger new size");
            }
            if new > old {
                fails(old, new - 1, &proof, "smaller new size");
            }
        }
    }
    assert_eq!(checked, N * (N + 1) / 2);
}

#[test]
fn inclusion_then_consistency_chain() {
    // A leaf proved in an old tree stays provable after the tree grows, and
    // the old and new heads are consistent.
    let f = fixture();
    for (index, old, new) in [(0, 1, N), (17, 18, 255), (127, 128, 129), (200, 250, N)] {
        let old_proof = inclusion_proof(&f.tree, index, old).unwrap();
        verify_inclusion(
            &f.leaves[index as usize],
            index,
            old,
            &old_proof,
            &f.roots[old as usize],
        )
        .unwrap();
        let new_proof = inclusion_proof(&f.tree, index, new).unwrap();
        verify_inclusion(
            &f.leaves[index as usize],
            index,
            new,
            &new_proof,
            &f.roots[new as usize],
        )
        .unwrap();
        let c = consistency_proof(&f.tree, old, new).unwrap();
        verify_consistency(old, new, &f.roots[old as usize], &f.roots[new as usize], &c).unwrap();
    }
}
