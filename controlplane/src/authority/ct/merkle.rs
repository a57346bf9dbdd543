//! RFC 6962 §2.1 Merkle tree hashing and proof generation.
//!
//! The tree is defined over leaf hashes supplied through [`LeafHashes`], so
//! the same code serves an in-memory vector in tests and a storage backend
//! later. Every function takes the tree size it should answer for: the log
//! can prove statements about any historical size up to its current length.
//!
//! The recursive definitions of RFC 6962 are followed literally (split at the
//! largest power of two below `n`). Without help this costs O(n) hashes per
//! root or proof; a source that also answers
//! [`LeafHashes::complete_subtree_hash`] — such as [`SubtreeCache`] — turns
//! that into O(log n), since every left subtree visited is complete and
//! aligned.

use ring::digest::{Context, SHA256};

/// A SHA-256 digest: a leaf hash, node hash or tree root.
pub type Hash = [u8; 32];

/// The Merkle Tree Hash of the empty tree: SHA-256 of the empty string.
pub const EMPTY_ROOT: Hash = [
    0xe3, 0xb0, 0xc4, 0x42, 0x98, 0xfc, 0x1c, 0x14, 0x9a, 0xfb, 0xf4, 0xc8, 0x99, 0x6f, 0xb9, 0x24,
    0x27, 0xae, 0x41, 0xe4, 0x64, 0x9b, 0x93, 0x4c, 0xa4, 0x95, 0x99, 0x1b, 0x78, 0x52, 0xb8, 0x55,
];

const LEAF_PREFIX: u8 = 0x00;
const NODE_PREFIX: u8 = 0x01;

/// The hash of one leaf: SHA-256(0x00 || `leaf_bytes`). `leaf_bytes` is the
/// encoded `MerkleTreeLeaf` (see [`super::leaf`]).
pub fn leaf_hash(leaf_bytes: &[u8]) -> Hash {
    let mut ctx = Context::new(&SHA256);
    ctx.update(&[LEAF_PREFIX]);
    ctx.update(leaf_bytes);
    finish(ctx)
}

/// The hash of an interior node: SHA-256(0x01 || `left` || `right`).
pub fn node_hash(left: &Hash, right: &Hash) -> Hash {
    hash_children(left, right)
}

fn hash_children(left: &[u8], right: &[u8]) -> Hash {
    let mut ctx = Context::new(&SHA256);
    ctx.update(&[NODE_PREFIX]);
    ctx.update(left);
    ctx.update(right);
    finish(ctx)
}

fn finish(ctx: Context) -> Hash {
    let mut out = [0u8; 32];
    out.copy_from_slice(ctx.finish().as_ref());
    out
}

/// Why a root or proof cannot be produced. Every variant names the values
/// the caller asked for, so the message says what to change.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProofError {
    #[error(
        "leaf index {index} is not in a tree of size {size}; ask for an index below the tree size"
    )]
    IndexOutOfRange { index: u64, size: u64 },
    #[error(
        "tree size {size} is larger than the log, which holds {leaves} leaves; ask for a size of at most {leaves}"
    )]
    SizeOutOfRange { size: u64, leaves: u64 },
    #[error(
        "old tree size {old} is larger than new tree size {new}; a consistency proof goes from an older (smaller) tree to a newer one"
    )]
    OldSizeGreater { old: u64, new: u64 },
    #[error(
        "a consistency proof from tree size 0 is not defined; every tree extends the empty tree, so ask from size 1 or more"
    )]
    ZeroOldSize,
}

/// A source of leaf hashes: the log's leaves in order, index 0 first.
///
/// Leaves are append-only: once `leaf_count()` has reported a leaf, its hash
/// never changes.
pub trait LeafHashes {
    /// How many leaves the source holds now.
    fn leaf_count(&self) -> u64;

    /// The hash of leaf `index`. Callers guarantee `index < leaf_count()`.
    fn leaf_hash(&self, index: u64) -> Hash;

    /// An optional accelerator: the hash of the complete subtree of
    /// `2^level` leaves that starts at leaf `index << level`, if the source
    /// knows it. Only asked for subtrees lying wholly below `leaf_count()`.
    /// The default knows none, and everything is computed from leaves.
    fn complete_subtree_hash(&self, level: u32, index: u64) -> Option<Hash> {
        let _ = (level, index);
        None
    }
}

impl LeafHashes for [Hash] {
    fn leaf_count(&self) -> u64 {
        self.len() as u64
    }

    fn leaf_hash(&self, index: u64) -> Hash {
        self[index as usize]
    }
}

impl LeafHashes for Vec<Hash> {
    fn leaf_count(&self) -> u64 {
        self.len() as u64
    }

    fn leaf_hash(&self, index: u64) -> Hash {
        self[index as usize]
    }
}

/// The Merkle Tree Hash (RFC 6962 §2.1) of the first `size` leaves.
pub fn root(leaves: &(impl LeafHashes + ?Sized), size: u64) -> Result<Hash, ProofError> {
    check_size(leaves, size)?;
    if size == 0 {
        return Ok(EMPTY_ROOT);
    }
    Ok(mth(leaves, 0, size))
}

/// The audit path (RFC 6962 §2.1.1 PATH) for leaf `index` in the tree of the
/// first `size` leaves, deepest sibling first.
pub fn inclusion_proof(
    leaves: &(impl LeafHashes + ?Sized),
    index: u64,
    size: u64,
) -> Result<Vec<Hash>, ProofError> {
    check_size(leaves, size)?;
    if index >= size {
        return Err(ProofError::IndexOutOfRange { index, size });
    }
    let mut out = Vec::with_capacity(proof_capacity(size));
    path(leaves, index, 0, size, &mut out);
    Ok(out)
}

/// The consistency proof (RFC 6962 §2.1.2 PROOF) that the tree of the first
/// `old_size` leaves is a prefix of the tree of the first `new_size` leaves.
/// Equal sizes give the empty proof.
pub fn consistency_proof(
    leaves: &(impl LeafHashes + ?Sized),
    old_size: u64,
    new_size: u64,
) -> Result<Vec<Hash>, ProofError> {
    check_size(leaves, new_size)?;
    if old_size > new_size {
        return Err(ProofError::OldSizeGreater {
            old: old_size,
            new: new_size,
        });
    }
    if old_size == 0 {
        return Err(ProofError::ZeroOldSize);
    }
    let mut out = Vec::with_capacity(proof_capacity(new_size) + 1);
    if old_size < new_size {
        subproof(leaves, old_size, 0, new_size, true, &mut out);
    }
    Ok(out)
}

fn check_size(leaves: &(impl LeafHashes + ?Sized), size: u64) -> Result<(), ProofError> {
    let count = leaves.leaf_count();
    if size > count {
        return Err(ProofError::SizeOutOfRange {
            size,
            leaves: count,
        });
    }
    Ok(())
}

fn proof_capacity(size: u64) -> usize {
    if size <= 1 {
        0
    } else {
        (size - 1).ilog2() as usize + 1
    }
}

/// The largest power of two strictly below `n`; `n >= 2`.
fn split(n: u64) -> u64 {
    debug_assert!(n >= 2);
    1 << (n - 1).ilog2()
}

/// MTH(D[start .. start + n]), `n >= 1`. Every range the RFC recursion
/// visits is aligned: a power-of-two `n` always has `start % n == 0`.
fn mth(leaves: &(impl LeafHashes + ?Sized), start: u64, n: u64) -> Hash {
    if n == 1 {
        return leaves.leaf_hash(start);
    }
    if n.is_power_of_two() {
        let level = n.trailing_zeros();
        debug_assert_eq!(start % n, 0);
        if let Some(hash) = leaves.complete_subtree_hash(level, start >> level) {
            return hash;
        }
    }
    let k = split(n);
    node_hash(&mth(leaves, start, k), &mth(leaves, start + k, n - k))
}

/// PATH(m, D[start .. start + n]) appended to `out`.
fn path(leaves: &(impl LeafHashes + ?Sized), m: u64, start: u64, n: u64, out: &mut Vec<Hash>) {
    if n == 1 {
        return;
    }
    let k = split(n);
    if m < k {
        path(leaves, m, start, k, out);
        out.push(mth(leaves, start + k, n - k));
    } else {
        path(leaves, m - k, start + k, n - k, out);
        out.push(mth(leaves, start, k));
    }
}

/// SUBPROOF(m, D[start .. start + n], complete) appended to `out`;
/// `1 <= m <= n`.
fn subproof(
    leaves: &(impl LeafHashes + ?Sized),
    m: u64,
    start: u64,
    n: u64,
    complete: bool,
    out: &mut Vec<Hash>,
) {
    if m == n {
        if !complete {
            out.push(mth(leaves, start, n));
        }
        return;
    }
    let k = split(n);
    if m <= k {
        subproof(leaves, m, start, k, complete, out);
        out.push(mth(leaves, start + k, n - k));
    } else {
        subproof(leaves, m - k, start + k, n - k, false, out);
        out.push(mth(leaves, start, k));
    }
}

/// Memoises the hashes of every complete, aligned subtree over a leaf
/// source, keyed by (level, index), so that roots and proofs cost O(log n)
/// hashes. It is used through [`LeafHashes`] like the source it wraps.
///
/// It holds about one hash per leaf. After the source grows, call
/// [`SubtreeCache::refresh`]; until then the new leaves are still answered
/// correctly, only without the cache's help.
#[derive(Debug, Clone)]
pub struct SubtreeCache<L> {
    leaves: L,
    /// `levels[l - 1][j]`: the hash of leaves `j * 2^l .. (j + 1) * 2^l`.
    levels: Vec<Vec<Hash>>,
    /// How many leaves `levels` accounts for.
    covered: u64,
}

impl<L: LeafHashes> SubtreeCache<L> {
    /// Wrap `leaves`, hashing every complete subtree it holds now.
    pub fn new(leaves: L) -> Self {
        let mut cache = SubtreeCache {
            leaves,
            levels: Vec::new(),
            covered: 0,
        };
        cache.refresh();
        cache
    }

    /// Bring the cache up to the source's current leaf count: one hash per
    /// new complete subtree, each made from two cached halves.
    pub fn refresh(&mut self) {
        let count = self.leaves.leaf_count();
        for i in self.covered..count {
            let mut hash = self.leaves.leaf_hash(i);
            let mut index = i;
            let mut level = 0usize;
            while index & 1 == 1 {
                let left = if level == 0 {
                    self.leaves.leaf_hash(index - 1)
                } else {
                    self.levels[level - 1][(index - 1) as usize]
                };
                hash = node_hash(&left, &hash);
                level += 1;
                index >>= 1;
                if self.levels.len() < level {
                    self.levels.push(Vec::new());
                }
                debug_assert_eq!(self.levels[level - 1].len() as u64, index);
                self.levels[level - 1].push(hash);
            }
        }
        self.covered = count;
    }

    /// The wrapped source.
    pub fn inner(&self) -> &L {
        &self.leaves
    }

    /// Give the wrapped source back.
    pub fn into_inner(self) -> L {
        self.leaves
    }
}

impl SubtreeCache<Vec<Hash>> {
    /// Append one leaf hash and update the cache.
    pub fn push(&mut self, leaf_hash: Hash) {
        self.leaves.push(leaf_hash);
        self.refresh();
    }
}

impl<L: LeafHashes> LeafHashes for SubtreeCache<L> {
    fn leaf_count(&self) -> u64 {
        self.leaves.leaf_count()
    }

    fn leaf_hash(&self, index: u64) -> Hash {
        self.leaves.leaf_hash(index)
    }

    fn complete_subtree_hash(&self, level: u32, index: u64) -> Option<Hash> {
        if level == 0 {
            return (index < self.leaves.leaf_count()).then(|| self.leaves.leaf_hash(index));
        }
        let row = self.levels.get(level as usize - 1)?;
        row.get(usize::try_from(index).ok()?).copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::authority::ct::test_vectors::{
        CONSISTENCY_PROOFS, INCLUSION_PROOFS, ROOTS, h, hex, kat_leaf_hashes,
    };

    #[test]
    fn empty_root_is_sha256_of_nothing() {
        let digest = ring::digest::digest(&SHA256, b"");
        assert_eq!(digest.as_ref(), &EMPTY_ROOT[..]);
        assert_eq!(EMPTY_ROOT, h(ROOTS[0]));
    }

    #[test]
    fn hasher_known_answers() {
        assert_eq!(
            leaf_hash(b"L123456"),
            h("395aa064aa4c29f7010acfe3f25db9485bbd4b91897b6ad7ad547639252b4d56")
        );
        assert_eq!(
            hash_children(b"N123", b"N456"),
            h("aa217fe888e47007fa15edab33c2b492a722cb106c64667fc2b044444de66bbb")
        );
        assert_eq!(
            leaf_hash(&hex("")),
            h("6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d")
        );
    }

    #[test]
    fn roots_known_answers() {
        let leaves = kat_leaf_hashes();
        let cached = SubtreeCache::new(leaves.clone());
        for (size, want) in ROOTS.iter().enumerate() {
            let size = size as u64;
            assert_eq!(root(&leaves, size).unwrap(), h(want), "size {size}");
            assert_eq!(
                root(leaves.as_slice(), size).unwrap(),
                h(want),
                "slice size {size}"
            );
            assert_eq!(root(&cached, size).unwrap(), h(want), "cached size {size}");
        }
        assert_eq!(root(&Vec::<Hash>::new(), 0).unwrap(), EMPTY_ROOT);
    }

    #[test]
    fn inclusion_known_answers() {
        let leaves = kat_leaf_hashes();
        let cached = SubtreeCache::new(leaves.clone());
        for (index, size, want) in INCLUSION_PROOFS {
            let want: Vec<Hash> = want.iter().map(|s| h(s)).collect();
            assert_eq!(inclusion_proof(&leaves, *index, *size).unwrap(), want);
            assert_eq!(inclusion_proof(&cached, *index, *size).unwrap(), want);
        }
    }

    #[test]
    fn consistency_known_answers() {
        let leaves = kat_leaf_hashes();
        let cached = SubtreeCache::new(leaves.clone());
        for (old, new, want) in CONSISTENCY_PROOFS {
            let want: Vec<Hash> = want.iter().map(|s| h(s)).collect();
            assert_eq!(consistency_proof(&leaves, *old, *new).unwrap(), want);
            assert_eq!(consistency_proof(&cached, *old, *new).unwrap(), want);
        }
        for size in 1..=8 {
            assert_eq!(
                consistency_proof(&leaves, size, size).unwrap(),
                Vec::<Hash>::new()
            );
        }
    }

    #[test]
    fn errors() {
        let leaves = kat_leaf_hashes();
        assert_eq!(
            root(&leaves, 9),
            Err(ProofError::SizeOutOfRange { size: 9, leaves: 8 })
        );
        assert_eq!(
            inclusion_proof(&leaves, 0, 9),
            Err(ProofError::SizeOutOfRange { size: 9, leaves: 8 })
        );
        assert_eq!(
            inclusion_proof(&leaves, 5, 5),
            Err(ProofError::IndexOutOfRange { index: 5, size: 5 })
        );
        assert_eq!(
            inclusion_proof(&leaves, 0, 0),
            Err(ProofError::IndexOutOfRange { index: 0, size: 0 })
        );
        assert_eq!(
            consistency_proof(&leaves, 3, 9),
            Err(ProofError::SizeOutOfRange { size: 9, leaves: 8 })
        );
        assert_eq!(
            consistency_proof(&leaves, 5, 3),
            Err(ProofError::OldSizeGreater { old: 5, new: 3 })
        );
        assert_eq!(
            consistency_proof(&leaves, 0, 3),
            Err(ProofError::ZeroOldSize)
        );
        assert_eq!(
            consistency_proof(&leaves, 0, 0),
            Err(ProofError::ZeroOldSize)
        );
        let msg = ProofError::SizeOutOfRange { size: 9, leaves: 8 }.to_string();
        assert!(msg.contains('9') && msg.contains("at most 8"), "{msg}");
    }

    #[test]
    fn cache_grows_and_matches_uncached() {
        let all: Vec<Hash> = (0u32..70).map(|i| leaf_hash(&i.to_be_bytes())).collect();
        let mut cache = SubtreeCache::new(Vec::new());
        assert_eq!(root(&cache, 0).unwrap(), EMPTY_ROOT);
        for (n, leaf) in all.iter().enumerate() {
            cache.push(*leaf);
            let size = n as u64 + 1;
            let plain = &all[..=n];
            assert_eq!(root(&cache, size).unwrap(), root(plain, size).unwrap());
            for index in 0..size {
                assert_eq!(
                    inclusion_proof(&cache, index, size).unwrap(),
                    inclusion_proof(plain, index, size).unwrap()
                );
            }
            for old in 1..=size {
                assert_eq!(
                    consistency_proof(&cache, old, size).unwrap(),
                    consistency_proof(plain, old, size).unwrap()
                );
            }
        }
        // Every cached subtree is the root of the leaves it covers.
        for level in 1..7u32 {
            let width = 1u64 << level;
            for index in 0..(70 / width) {
                let start = (index * width) as usize;
                let slice = &all[start..start + width as usize];
                assert_eq!(
                    cache.complete_subtree_hash(level, index),
                    Some(root(slice, width).unwrap())
                );
            }
            assert_eq!(cache.complete_subtree_hash(level, 70 / width), None);
        }
        assert_eq!(cache.complete_subtree_hash(7, 0), None);
        assert_eq!(cache.complete_subtree_hash(0, 69), Some(all[69]));
        assert_eq!(cache.complete_subtree_hash(0, 70), None);
        assert_eq!(cache.into_inner(), all);
    }

    #[test]
    fn cache_over_a_growing_source_needs_refresh_only_for_speed() {
        let mut cache = SubtreeCache::new(
            (0u32..5)
                .map(|i| leaf_hash(&i.to_le_bytes()))
                .collect::<Vec<_>>(),
        );
        let mut grown = cache.inner().clone();
        grown.extend((5u32..13).map(|i| leaf_hash(&i.to_le_bytes())));
        // A stale cache over a grown source still answers correctly.
        let stale = SubtreeCache {
            leaves: grown.clone(),
            levels: cache.levels.clone(),
            covered: cache.covered,
        };
        assert_eq!(root(&stale, 13).unwrap(), root(&grown, 13).unwrap());
        cache.leaves = grown.clone();
        cache.refresh();
        assert_eq!(
            cache.complete_subtree_hash(3, 0),
            Some(root(&grown, 8).unwrap())
        );
        assert_eq!(root(&cache, 13).unwrap(), root(&grown, 13).unwrap());
    }
}
