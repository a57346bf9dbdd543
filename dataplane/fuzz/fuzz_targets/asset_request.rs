//! The asset requests' payload parser (`dataplane::assets::wire`): the
//! first byte picks one of the seven kinds, the rest is the payload. Any
//! bytes decode or give a typed error, and whatever decodes encodes back
//! to the same kind and payload.
#![no_main]

use dataplane::assets::wire::AssetRequest;
use dataplane::protocols::stoq_registry::ASSET_ALLOC;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&pick, payload)) = data.split_first() else {
        return;
    };
    let kind = ASSET_ALLOC + pick % 7;
    if let Ok(request) = AssetRequest::decode(kind, payload) {
        assert_eq!(request.encode(), (kind, payload.to_vec()));
    }
});
