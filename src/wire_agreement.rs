//! The control plane keeps its own names for the `stoq/1` kinds, codes and
//! limits it serves (it does not depend on the dataplane). This crate sees
//! both, so it checks at compile time that every copy equals the dataplane's
//! registry (`dataplane::protocols::stoq_registry`): a change to one side
//! that the other lacks does not build.

use controlplane::authority::api;
use dataplane::protocols::stoq::{self, ErrorCode};
use dataplane::protocols::stoq_registry::{self as registry, Access, Answered};

/// Kinds the authority answers, each with its registry entry.
const AUTHORITY: [(u8, u8); 15] = [
    (api::ENROLL, registry::ENROLL),
    (api::CERT_ISSUE, registry::CERT_ISSUE),
    (api::CERT_RENEW, registry::CERT_RENEW),
    (api::CERT_REVOKE, registry::CERT_REVOKE),
    (api::CERT_LIST, registry::CERT_LIST),
    (api::CA_ROOT, registry::CA_ROOT),
    (api::CT_STH, registry::CT_STH),
    (api::CT_PROOF, registry::CT_PROOF),
    (api::CT_CONSISTENCY, registry::CT_CONSISTENCY),
    (api::CT_ENTRIES, registry::CT_ENTRIES),
    (api::CT_KEY, registry::CT_KEY),
    (api::ROTATE, registry::ROTATE),
    (api::DNS_SET, registry::DNS_SET),
    (api::DNS_REMOVE, registry::DNS_REMOVE),
    (api::DNS_LIST, registry::DNS_LIST),
];

const _: () = {
    let mut i = 0;
    while i < AUTHORITY.len() {
        assert!(AUTHORITY[i].0 == AUTHORITY[i].1);
        assert!(AUTHORITY[i].0 == api::KINDS[i]);
        match registry::spec(AUTHORITY[i].0) {
            Some(spec) => assert!(matches!(spec.answered, Answered::Authority)),
            None => panic!("an authority kind is missing from the registry"),
        }
        i += 1;
    }
    assert!(AUTHORITY.len() == api::KINDS.len());
    // Every registry kind answered by the authority is in api::KINDS.
    let mut j = 0;
    let mut authority_kinds = 0;
    while j < registry::KINDS.len() {
        if matches!(registry::KINDS[j].answered, Answered::Authority) {
            authority_kinds += 1;
        }
        j += 1;
    }
    assert!(authority_kinds == api::KINDS.len());

    // What the authority serves without a certificate is exactly what the
    // registry lets a certificate-less connection send to it.
    let mut anonymous = 0;
    let mut k = 0;
    while k < registry::KINDS.len() {
        if matches!(registry::KINDS[k].access, Access::Anyone)
            && matches!(registry::KINDS[k].answered, Answered::Authority)
        {
            anonymous += 1;
        }
        k += 1;
    }
    assert!(anonymous == api::ANONYMOUS_KINDS.len());
    let mut a = 0;
    while a < api::ANONYMOUS_KINDS.len() {
        match registry::spec(api::ANONYMOUS_KINDS[a]) {
            Some(spec) => assert!(matches!(spec.access, Access::Anyone)),
            None => panic!("an anonymous kind is missing from the registry"),
        }
        a += 1;
    }

    assert!(crate::admission::PLOT_REGISTER == registry::PLOT_REGISTER);
    assert!(crate::admission::STAKE == registry::STAKE);
    assert!(crate::admission::BLOCKLIST == registry::BLOCKLIST);
    assert!(crate::admission::ASSETS == registry::ASSETS);
    match registry::spec(registry::ROTATE) {
        Some(spec) => assert!(matches!(spec.access, Access::Operator)),
        None => panic!(),
    }

    assert!(api::RESPONSE_BIT == stoq::RESPONSE_FLAG);
    assert!(api::FORWARDED_KINDS_FIRST == *stoq::AUTHORITY_KINDS.start());
    assert!(api::FORWARDED_KINDS_LAST == *stoq::AUTHORITY_KINDS.end());
    assert!(api::MAX_REQUEST_LEN == stoq::REQUEST_PAYLOAD_MAX);
    assert!(api::UNKNOWN_KIND == ErrorCode::UnknownMessage as u16);
    // The authority's own error codes start past the transport's.
    assert!(api::MALFORMED_REQUEST > ErrorCode::AdmissionOff as u16);
};

const _: () = {
    let a = controlplane::authority::service::OPERATOR.as_bytes();
    let b = dataplane::trust::OPERATOR_COMMON_NAME.as_bytes();
    assert!(a.len() == b.len());
    let mut i = 0;
    while i < a.len() {
        assert!(a[i] == b[i]);
        i += 1;
    }
};
