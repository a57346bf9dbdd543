//! Proof of space: a plot derived from the client's identity, committed to
//! by a Merkle root, and challenged at indices derived from the binding.
//!
//! `leaf[i] = SHA-256("i2-plot" ‖ identity ‖ i_be)` for `i` in `0..2^k`; the
//! commitment is the RFC 6962 §2.1 Merkle Tree Hash over the leaves (leaf
//! hash `SHA-256(0x00 ‖ leaf)`, node hash `SHA-256(0x01 ‖ left ‖ right)`,
//! shared with the CT log). Challenge `j` is
//! `SHA-256("i2-space" ‖ binding ‖ j_be) mod 2^k` (first 8 bytes, big
//! endian), for `j` in `0..c`; each answer is the leaf and its audit path.

use super::binding::Binding;
use super::sha256;
use crate::authority::ct::{Hash, leaf_hash, node_hash, verify_inclusion};

const PLOT_DOMAIN: &[u8] = b"i2-plot";
const CHALLENGE_DOMAIN: &[u8] = b"i2-space";

/// Largest plot exponent: the in-memory tree of 2^24 leaves takes 1 GiB.
/// Larger plots need a disk-backed plot.
pub const PLOT_K_MAX: u8 = 24;
/// Most challenges per proof.
pub const CHALLENGES_MAX: u8 = 16;
/// Development default plot exponent (4096 leaves, 256 KiB of tree).
pub const PLOT_K_DEFAULT: u8 = 12;
/// Default challenges per proof.
pub const CHALLENGES_DEFAULT: u8 = 8;
/// Leaves between two progress reports while a plot is built.
pub const PROGRESS_EVERY: u64 = 1 << 16;

/// Plot size and challenge count, checked against the bundle bound.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct SpaceParams {
    k: u8,
    challenges: u8,
}

impl SpaceParams {
    /// `None` unless `1 <= k <= PLOT_K_MAX`, `1 <= challenges <=
    /// CHALLENGES_MAX` and the proofs fit in a bundle.
    pub const fn new(k: u8, challenges: u8) -> Option<Self> {
        let fits = super::bundle_len(k, challenges) <= super::BUNDLE_LEN_MAX;
        if k >= 1 && k <= PLOT_K_MAX && challenges >= 1 && challenges <= CHALLENGES_MAX && fits {
            Some(Self { k, challenges })
        } else {
            None
        }
    }

    pub const fn k(self) -> u8 {
        self.k
    }

    pub const fn challenges(self) -> u8 {
        self.challenges
    }

    pub const fn leaves(self) -> u64 {
        1 << self.k
    }
}

impl Default for SpaceParams {
    fn default() -> Self {
        DEFAULT_SPACE
    }
}

const DEFAULT_SPACE: SpaceParams = match SpaceParams::new(PLOT_K_DEFAULT, CHALLENGES_DEFAULT) {
    Some(p) => p,
    None => panic!("the default plot does not fit a bundle"),
};

/// One challenge's answer.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct SpaceProof {
    pub leaf: Hash,
    /// Sibling hashes from the leaf up; exactly `k` of them.
    pub path: Vec<Hash>,
}

pub fn leaf_value(identity: &Hash, index: u64) -> Hash {
    sha256(&[PLOT_DOMAIN, identity, &index.to_be_bytes()])
}

pub fn challenge_index(binding: &Binding, j: u64, k: u8) -> u64 {
    let h = sha256(&[CHALLENGE_DOMAIN, binding.as_bytes(), &j.to_be_bytes()]);
    let mut first = [0u8; 8];
    first.copy_from_slice(&h[..8]);
    u64::from_be_bytes(first) & ((1u64 << k) - 1)
}

/// The client's plot: every level of the tree, leaves first.
#[derive(Clone, Debug)]
pub struct Plot {
    identity: Hash,
    params: SpaceParams,
    /// `levels[0]` holds the 2^k leaf hashes; the last level the root.
    levels: Vec<Vec<Hash>>,
}

impl Plot {
    /// Build the plot of `identity` (SHA-256 of the SPKI). `progress(done,
    /// total)` is called every [`PROGRESS_EVERY`] leaves and at the end.
    pub fn build(identity: &Hash, params: SpaceParams, mut progress: impl FnMut(u64, u64)) -> Self {
        let total = params.leaves();
        let mut leaves = Vec::with_capacity(total as usize);
        for i in 0..total {
            leaves.push(leaf_hash(&leaf_value(identity, i)));
            if (i + 1).is_multiple_of(PROGRESS_EVERY) {
                progress(i + 1, total);
            }
        }
        if !total.is_multiple_of(PROGRESS_EVERY) {
            progress(total, total);
        }
        Self::from_leaf_hashes(identity, params, leaves).expect("2^k leaves were made")
    }

    /// Rebuild a plot from its leaf hashes (a cache the client keeps):
    /// `None` unless there are exactly `2^k` of them.
    pub fn from_leaf_hashes(
        identity: &Hash,
        params: SpaceParams,
        leaves: Vec<Hash>,
    ) -> Option<Self> {
        if leaves.len() as u64 != params.leaves() {
            return None;
        }
        let mut levels = vec![leaves];
        while let Some(below) = levels.last().filter(|l| l.len() > 1) {
            let above = below
                .chunks_exact(2)
                .map(|pair| node_hash(&pair[0], &pair[1]))
                .collect();
            levels.push(above);
        }
        Some(Self {
            identity: *identity,
            params,
            levels,
        })
    }

    /// The leaf hashes (what a cache stores; the tree above them is a
    /// third of the cost of building the plot).
    pub fn leaf_hashes(&self) -> &[Hash] {
        &self.levels[0]
    }

    /// The identity the plot belongs to.
    pub fn identity(&self) -> &Hash {
        &self.identity
    }

    /// The commitment the client registers.
    pub fn commitment(&self) -> Hash {
        self.levels[self.levels.len() - 1][0]
    }

    pub fn params(&self) -> SpaceParams {
        self.params
    }

    /// Answer this connection's challenges.
    pub fn prove(&self, binding: &Binding) -> Vec<SpaceProof> {
        (0..u64::from(self.params.challenges))
            .map(|j| self.prove_index(challenge_index(binding, j, self.params.k)))
            .collect()
    }

    fn prove_index(&self, index: u64) -> SpaceProof {
        let mut path = Vec::with_capacity(usize::from(self.params.k));
        let mut at = index as usize;
        for level in &self.levels[..self.levels.len() - 1] {
            path.push(level[at ^ 1]);
            at >>= 1;
        }
        SpaceProof {
            leaf: leaf_value(&self.identity, index),
            path,
        }
    }
}

/// Why a space proof was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpaceFailure {
    #[error("{got} space answers, {want} challenges were asked")]
    Count { got: usize, want: u8 },
    #[error("challenge {j}: the leaf is not the plot leaf of this identity at index {index}")]
    Leaf { j: u64, index: u64 },
    #[error("challenge {j}: the audit path does not lead to the registered commitment")]
    Path { j: u64 },
    #[error("no plot commitment is registered for this identity")]
    Unregistered,
}

/// Check `proofs` against the registered `commitment` of `identity`.
pub fn verify_space(
    commitment: &Hash,
    identity: &Hash,
    params: SpaceParams,
    binding: &Binding,
    proofs: &[SpaceProof],
) -> Result<(), SpaceFailure> {
    if proofs.len() != usize::from(params.challenges) {
        return Err(SpaceFailure::Count {
            got: proofs.len(),
            want: params.challenges,
        });
    }
    for (j, proof) in (0u64..).zip(proofs) {
        let index = challenge_index(binding, j, params.k);
        if proof.leaf != leaf_value(identity, index) {
            return Err(SpaceFailure::Leaf { j, index });
        }
        // A wrong path length fails here too (RFC 9162 §2.1.3.2 steps 4a, 5).
        verify_inclusion(
            &leaf_hash(&proof.leaf),
            index,
            params.leaves(),
            &proof.path,
            commitment,
        )
        .map_err(|_| SpaceFailure::Path { j })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::authority::ct::{inclusion_proof, root};

    const ID: Hash = [3; 32];
    const B: Binding = Binding::from_exporter([4; 32]);

    fn small() -> SpaceParams {
        SpaceParams::new(6, 8).unwrap()
    }

    #[test]
    fn plot_matches_rfc6962_tree_and_reports_progress() {
        let params = small();
        let mut reports = Vec::new();
        let plot = Plot::build(&ID, params, |done, total| reports.push((done, total)));
        assert_eq!(reports, vec![(64, 64)]);
        let leaves: Vec<Hash> = (0..64).map(|i| leaf_hash(&leaf_value(&ID, i))).collect();
        assert_eq!(plot.commitment(), root(&leaves, 64).unwrap());
        assert_eq!(
            plot.prove_index(13).path,
            inclusion_proof(&leaves, 13, 64).unwrap()
        );
    }

    #[test]
    fn honest_proofs_verify() {
        let plot = Plot::build(&ID, small(), |_, _| {});
        let proofs = plot.prove(&B);
        verify_space(&plot.commitment(), &ID, small(), &B, &proofs).unwrap();
    }

    #[test]
    fn refusals() {
        let plot = Plot::build(&ID, small(), |_, _| {});
        let c = plot.commitment();
        let good = plot.prove(&B);

        let mut wrong_leaf = good.clone();
        wrong_leaf[2].leaf[0] ^= 1;
        assert!(matches!(
            verify_space(&c, &ID, small(), &B, &wrong_leaf),
            Err(SpaceFailure::Leaf { j: 2, .. })
        ));

        let mut wrong_path = good.clone();
        wrong_path[3].path[1][0] ^= 1;
        assert_eq!(
            verify_space(&c, &ID, small(), &B, &wrong_path),
            Err(SpaceFailure::Path { j: 3 })
        );

        let mut short_path = good.clone();
        short_path[0].path.pop();
        assert_eq!(
            verify_space(&c, &ID, small(), &B, &short_path),
            Err(SpaceFailure::Path { j: 0 })
        );

        assert_eq!(
            verify_space(&[0; 32], &ID, small(), &B, &good),
            Err(SpaceFailure::Path { j: 0 })
        );

        // Another connection's answers name other indices.
        let replayed = plot.prove(&Binding::from_exporter([5; 32]));
        assert!(matches!(
            verify_space(&c, &ID, small(), &B, &replayed),
            Err(SpaceFailure::Leaf { .. })
        ));

        // Another identity's plot does not answer for this one.
        let other = Plot::build(&[6; 32], small(), |_, _| {});
        assert!(matches!(
            verify_space(&c, &ID, small(), &B, &other.prove(&B)),
            Err(SpaceFailure::Leaf { .. })
        ));

        assert_eq!(
            verify_space(&c, &ID, small(), &B, &good[..7]),
            Err(SpaceFailure::Count { got: 7, want: 8 })
        );
    }

    #[test]
    fn params_are_bounded() {
        assert!(SpaceParams::new(0, 8).is_none());
        assert!(SpaceParams::new(PLOT_K_MAX + 1, 1).is_none());
        assert!(SpaceParams::new(12, CHALLENGES_MAX + 1).is_none());
        assert!(SpaceParams::new(12, 0).is_none());
        // Too many proofs for one bundle.
        assert!(SpaceParams::new(PLOT_K_MAX, CHALLENGES_MAX).is_none());
    }
}
