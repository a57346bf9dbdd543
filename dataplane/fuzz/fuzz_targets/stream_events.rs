//! Arbitrary stream events against a real server worker: any bytes decode
//! into a sequence of connection, stream, link and clock operations
//! (`dataplane::harness::Sequence`), which run over an in-memory link on a
//! simulated clock. Afterwards no panic may have been contained, an honest
//! client must still be served on every ALPN, and every connection must
//! drain once the clients close.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Err(violation) = dataplane::harness::run(data) {
        panic!("{violation}");
    }
});
