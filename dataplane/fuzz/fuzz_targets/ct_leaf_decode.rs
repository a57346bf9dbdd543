//! The RFC 6962 MerkleTreeLeaf decoder: any bytes decode or give a typed
//! error, and whatever decodes encodes back to the same bytes.
#![no_main]

use controlplane::authority::ct::decode_leaf;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(leaf) = decode_leaf(data) {
        assert_eq!(leaf.encode().expect("a decoded leaf re-encodes"), data);
    }
});
