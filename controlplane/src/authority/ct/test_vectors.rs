//! Public RFC 6962 known-answer vectors, from
//! google/certificate-transparency `cpp/merkletree/merkle_tree_test.cc` and
//! transparency-dev/merkle `testonly/constants.go`, and small test helpers.

use super::merkle::{Hash, leaf_hash};

/// The eight leaf inputs, hex.
pub const LEAF_INPUTS: [&str; 8] = [
    "",
    "00",
    "10",
    "2021",
    "3031",
    "40414243",
    "5051525354555657",
    "606162636465666768696a6b6c6d6e6f",
];

/// Roots of the trees over the first 0..=8 leaves.
pub const ROOTS: [&str; 9] = [
    "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
    "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
    "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
    "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
    "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
    "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
    "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
    "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
    "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
];

const H1: &str = "96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7";
const H23: &str = "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e";
const H4_7: &str = "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4";
const H4: &str = "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b";
const H67: &str = "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0";
const H45: &str = "0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a";
const H6: &str = "b08693ec2e721597130641e8211e7eedccb4c26413963eee6c1e2ed16ffb1a5f";

/// (0-based leaf index, tree size, audit path).
pub const INCLUSION_PROOFS: &[(u64, u64, &[&str])] = &[
    (0, 8, &[H1, H23, H4_7]),
    (5, 8, &[H4, H67, ROOTS[4]]),
    (2, 3, &[ROOTS[2]]),
    (1, 5, &[ROOTS[1], H23, H4]),
    (0, 1, &[]),
];

/// (old size, new size, consistency proof).
pub const CONSISTENCY_PROOFS: &[(u64, u64, &[&str])] = &[
    (1, 8, &[H1, H23, H4_7]),
    (6, 8, &[H45, H67, ROOTS[4]]),
    (2, 5, &[H23, H4]),
    (6, 7, &[H45, H6, ROOTS[4]]),
];

pub fn hex(s: &str) -> Vec<u8> {
    assert!(s.len().is_multiple_of(2), "odd hex length: {s}");
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex digit"))
        .collect()
}

pub fn h(s: &str) -> Hash {
    hex(s).try_into().expect("32-byte hash")
}

pub fn kat_leaf_hashes() -> Vec<Hash> {
    LEAF_INPUTS.iter().map(|s| leaf_hash(&hex(s))).collect()
}

/// Deterministic pseudo-random leaf hashes, all distinct: leaf `i` hashes
/// `i` (8 bytes) followed by 0..40 splitmix64 bytes.
pub fn pseudo_random_leaf_hashes(count: usize, seed: u64) -> Vec<Hash> {
    let mut state = seed;
    let mut next = move || {
        state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    };
    (0..count as u64)
        .map(|i| {
            let len = (next() % 40) as usize;
            let mut data = i.to_be_bytes().to_vec();
            data.extend((0..len).map(|_| next() as u8));
            leaf_hash(&data)
        })
        .collect()
}
