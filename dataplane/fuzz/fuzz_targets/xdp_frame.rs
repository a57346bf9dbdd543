//! The AF_XDP frame parser: see `frame::assert_round_trip` for the
//! property (parse or typed error; rebuilt frames parse back the same with
//! a valid checksum; our own frames rebuild byte for byte).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    dataplane::io::xdp::frame::assert_round_trip(data);
});
