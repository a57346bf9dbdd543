//! The AF_XDP frame parser: any bytes parse or give a typed error, and a
//! parsed datagram rebuilt with `write_headers` parses back to the same
//! fields and payload with a valid UDP checksum. A frame that already had a
//! valid checksum and flow label 0 (all `write_headers` sends) is rebuilt
//! byte for byte, up to any Ethernet padding.
#![no_main]

use dataplane::io::xdp::frame::{HEADERS_LEN, checksum_valid, parse_udp6, write_headers};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(parsed) = parse_udp6(data) else {
        assert!(!checksum_valid(data));
        return;
    };
    let payload_len = parsed.payload.len();
    let mut rebuilt = vec![0; HEADERS_LEN + payload_len];
    rebuilt[HEADERS_LEN..].copy_from_slice(parsed.payload);
    assert_eq!(
        write_headers(&mut rebuilt, &parsed.header(), payload_len),
        Some(rebuilt.len())
    );
    let again = parse_udp6(&rebuilt).expect("a rebuilt frame parses");
    assert_eq!(again.header(), parsed.header());
    assert_eq!(again.payload, parsed.payload);
    assert!(checksum_valid(&rebuilt));
    let flow_label_zero = data[15] & 0x0f == 0 && data[16..18] == [0, 0];
    if checksum_valid(data) && flow_label_zero {
        assert_eq!(rebuilt, data[..rebuilt.len()]);
    }
});
