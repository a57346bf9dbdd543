//! Replays the committed fuzz corpora (dataplane/fuzz/corpus) through the
//! same checks as the fuzz targets, on stable, in every test run: inputs the
//! fuzzer once found interesting stay covered.

use std::path::PathBuf;

fn corpus(target: &str) -> Vec<Vec<u8>> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("dataplane/fuzz/corpus")
        .join(target);
    let inputs: Vec<Vec<u8>> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| std::fs::read(entry.unwrap().path()).unwrap())
        .collect();
    assert!(!inputs.is_empty(), "{} has no seeds", dir.display());
    inputs
}

#[test]
fn route_datagram_corpus() {
    for data in corpus("route_datagram") {
        let workers = u16::from(data.first().copied().unwrap_or(1)).max(1);
        if let Ok(owner) = dataplane::cid::owner_of(data.get(1..).unwrap_or_default(), workers) {
            assert!(owner.0 < workers);
        }
    }
}

#[test]
fn stoq_decode_corpus() {
    use dataplane::protocols::stoq;
    let mut decoded = 0;
    for data in corpus("stoq_decode") {
        if let Ok(message) = stoq::decode(&data, stoq::REQUEST_PAYLOAD_MAX) {
            assert_eq!(
                stoq::encode(message.kind, &message.payload).as_ref(),
                &data[..]
            );
            decoded += 1;
        }
    }
    assert!(decoded > 0, "the corpus keeps valid messages too");
}

#[test]
fn ct_leaf_decode_corpus() {
    use controlplane::authority::ct::decode_leaf;
    let mut decoded = 0;
    for data in corpus("ct_leaf_decode") {
        if let Ok(leaf) = decode_leaf(&data) {
            assert_eq!(leaf.encode().unwrap(), data);
            decoded += 1;
        }
    }
    assert!(decoded > 0, "the corpus keeps valid leaves too");
}

#[test]
fn xdp_frame_corpus() {
    let parsed_frames = corpus("xdp_frame")
        .iter()
        .filter(|data| dataplane::io::xdp::frame::assert_round_trip(data))
        .count();
    assert!(parsed_frames > 0, "the corpus keeps valid frames too");
}

#[test]
fn proof_bundle_decode_corpus() {
    use controlplane::consensus::ProofBundle;
    let mut decoded = 0;
    for data in corpus("proof_bundle_decode") {
        if let Ok(bundle) = ProofBundle::decode(&data) {
            assert_eq!(bundle.encode().unwrap(), data, "one encoding per bundle");
            decoded += 1;
        }
    }
    assert!(decoded > 0, "the corpus keeps valid bundles too");
}

#[test]
fn stream_events_corpus() {
    // Each seed runs a server worker and a hostile client over an
    // in-memory link, then the honest-client and drain checks.
    for data in corpus("stream_events") {
        if let Err(violation) = dataplane::harness::run(&data) {
            panic!(
                "{violation}\nsequence: {:#?}",
                dataplane::harness::Sequence::decode(&data)
            );
        }
    }
}

#[test]
fn asset_request_corpus() {
    use dataplane::assets::wire::AssetRequest;
    use dataplane::protocols::stoq_registry::ASSET_ALLOC;
    let mut decoded = 0;
    for data in corpus("asset_request") {
        let Some((&pick, payload)) = data.split_first() else {
            continue;
        };
        let kind = ASSET_ALLOC + pick % 7;
        if let Ok(request) = AssetRequest::decode(kind, payload) {
            assert_eq!(request.encode(), (kind, payload.to_vec()));
            decoded += 1;
        }
    }
    assert!(decoded > 0, "the corpus keeps valid requests too");
}
