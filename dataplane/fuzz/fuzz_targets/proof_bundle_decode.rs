//! The admission proof-bundle decoder: any bytes decode or give a typed
//! error, and whatever decodes encodes back to the same bytes.
#![no_main]

use controlplane::consensus::ProofBundle;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(bundle) = ProofBundle::decode(data) {
        assert_eq!(bundle.encode().expect("a decoded bundle re-encodes"), data);
    }
});
