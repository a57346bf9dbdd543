//! The stoq/1 message decoder: any bytes decode or give a typed error, and
//! whatever decodes encodes back to the same bytes.
#![no_main]

use dataplane::protocols::stoq;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(message) = stoq::decode(data, stoq::REQUEST_PAYLOAD_MAX) {
        assert_eq!(stoq::encode(message.kind, &message.payload).as_ref(), data);
    }
    let _ = stoq::decode_error_payload(data);
});
