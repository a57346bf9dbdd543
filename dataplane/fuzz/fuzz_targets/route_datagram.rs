//! The datagram router (the userspace mirror of the reuseport program):
//! any bytes route to a worker in range or are classified, never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let workers = u16::from(data.first().copied().unwrap_or(1)).max(1);
    if let Ok(owner) = dataplane::cid::owner_of(data.get(1..).unwrap_or_default(), workers) {
        assert!(owner.0 < workers);
    }
});
