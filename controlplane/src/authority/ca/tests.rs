use super::*;
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::ServerCertVerifier;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::process::Command;
use std::sync::Arc;

const HOUR: Duration = Duration::from_secs(3600);

/// A temporary directory, removed on drop.
use crate::test_support::TempDir;

fn server_request() -> IssueRequest {
    IssueRequest {
        subject: "edge-1".into(),
        dns_names: vec!["edge-1.example.net".into()],
        ip_addresses: vec!["192.0.2.1".parse().unwrap(), "2001:db8::1".parse().unwrap()],
        ..IssueRequest::default()
    }
}

fn client_request() -> IssueRequest {
    IssueRequest {
        subject: "worker-7".into(),
        usage: Usage::Client,
        lifetime: 2 * HOUR,
        ..IssueRequest::default()
    }
}

fn read_files(dir: &Path) -> Vec<Vec<u8>> {
    [
        ROOT_CERT_FILE,
        ROOT_KEY_FILE,
        INTERMEDIATE_CERT_FILE,
        INTERMEDIATE_KEY_FILE,
    ]
    .iter()
    .map(|f| fs::read(dir.join(f)).unwrap())
    .collect()
}

/// `openssl verify` of `leaf_pem` against the CA files in `dir`; false when
/// there is no openssl binary (the caller then skips).
fn openssl_verify(dir: &Path, leaf_pem: &str, purpose: &str, at: SystemTime) -> bool {
    openssl_check(dir, leaf_pem, purpose, at, true)
}

fn openssl_check(dir: &Path, leaf_pem: &str, purpose: &str, at: SystemTime, ok: bool) -> bool {
    let at = at.duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs();
    let leaf = dir.join("leaf-under-test.pem");
    fs::write(&leaf, leaf_pem).unwrap();
    let output = Command::new("openssl")
        .arg("verify")
        .arg("-purpose")
        .arg(purpose)
        .arg("-attime")
        .arg(at.to_string())
        .arg("-CAfile")
        .arg(dir.join(ROOT_CERT_FILE))
        .arg("-untrusted")
        .arg(dir.join(INTERMEDIATE_CERT_FILE))
        .arg(&leaf)
        .output();
    fs::remove_file(&leaf).unwrap();
    let Ok(output) = output else {
        println!("SKIPPED: no openssl binary");
        return false;
    };
    assert_eq!(
        output.status.success(),
        ok,
        "openssl verify ({purpose}): {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    true
}

fn rustls_verify_server(
    root_der: &[u8],
    issued: &IssuedCertificate,
    intermediate: &[u8],
    name: &str,
    at: SystemTime,
) {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(CertificateDer::from(root_der.to_vec())).unwrap();
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let verifier = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider)
        .build()
        .unwrap();
    let leaf = CertificateDer::from(issued.cert_der.clone());
    let chain = [CertificateDer::from(intermediate.to_vec())];
    verifier
        .verify_server_cert(
            &leaf,
            &chain,
            &ServerName::try_from(name.to_owned()).unwrap(),
            &[],
            UnixTime::since_unix_epoch(at.duration_since(SystemTime::UNIX_EPOCH).unwrap()),
        )
        .unwrap();
}

fn end_to_end(algorithm: KeyAlgorithm) {
    let tmp = TempDir::new("e2e");
    let now = SystemTime::now();
    let first = CertificateAuthority::open_or_create(&tmp.0, algorithm, now).unwrap();
    assert_eq!(first.algorithm(), algorithm);
    for key in [ROOT_KEY_FILE, INTERMEDIATE_KEY_FILE] {
        let mode = fs::metadata(tmp.0.join(key)).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{key} must be private");
    }
    let files = read_files(&tmp.0);
    drop(first);

    // A reopened CA loads the files, never rewrites them, and what it
    // issues chains to the original root.
    let mut ca = CertificateAuthority::open_or_create(&tmp.0, algorithm, now).unwrap();
    assert_eq!(
        read_files(&tmp.0),
        files,
        "reopening must not rewrite the CA"
    );
    assert_eq!(ca.root_pem().as_bytes(), files[0].as_slice());

    let server = ca.issue(server_request(), now).unwrap();
    assert!(server.private_key.is_some());
    assert_eq!(
        server.chain_pem,
        format!("{}{}", server.cert_pem, ca.intermediate_pem())
    );
    // Valid from CLOCK_SLACK before its issuance, for its lifetime after.
    assert_eq!(
        server.not_after.duration_since(server.not_before).unwrap(),
        DEFAULT_LIFETIME + CLOCK_SLACK
    );
    assert_eq!(
        ca.verify_chain(&server.cert_der, Usage::Server, now)
            .unwrap(),
        server.serial
    );
    assert!(matches!(
        ca.verify_chain(&server.cert_der, Usage::Client, now),
        Err(CaError::WrongUsage {
            expected: Usage::Client
        })
    ));

    let client = ca.issue(client_request(), now).unwrap();
    assert_ne!(client.serial, server.serial);
    assert_eq!(
        ca.verify_chain(&client.cert_der, Usage::Client, now)
            .unwrap(),
        client.serial
    );
    assert!(matches!(
        ca.verify_chain(&client.cert_der, Usage::Server, now),
        Err(CaError::WrongUsage { .. })
    ));

    rustls_verify_server(
        ca.root_der(),
        &server,
        ca.intermediate_der(),
        "edge-1.example.net",
        now,
    );
    rustls_verify_server(
        ca.root_der(),
        &server,
        ca.intermediate_der(),
        "192.0.2.1",
        now,
    );

    // The generated key belongs to the certificate.
    let key = KeyPair::from_pem(&server.private_key.as_ref().unwrap().pem).unwrap();
    let (_, parsed) = X509Certificate::from_der(&server.cert_der).unwrap();
    assert_eq!(parsed.public_key().raw, key.public_key_der());

    let renewed = ca.renew(&server.cert_der, now + HOUR).unwrap();
    assert_ne!(renewed.serial, server.serial);
    assert!(renewed.private_key.is_none(), "renewal keeps the key pair");
    let (_, renewed_parsed) = X509Certificate::from_der(&renewed.cert_der).unwrap();
    assert_eq!(renewed_parsed.public_key().raw, parsed.public_key().raw);
    assert_eq!(renewed_parsed.subject().as_raw(), parsed.subject().as_raw());
    assert_eq!(
        renewed_parsed
            .subject_alternative_name()
            .unwrap()
            .unwrap()
            .value,
        parsed.subject_alternative_name().unwrap().unwrap().value
    );
    assert_eq!(
        renewed
            .not_after
            .duration_since(renewed.not_before)
            .unwrap(),
        DEFAULT_LIFETIME + CLOCK_SLACK,
        "a renewal keeps the lifetime"
    );
    assert_eq!(
        ca.verify_chain(&renewed.cert_der, Usage::Server, now + HOUR)
            .unwrap(),
        renewed.serial
    );
    rustls_verify_server(
        ca.root_der(),
        &renewed,
        ca.intermediate_der(),
        "edge-1.example.net",
        now + HOUR,
    );

    let renewed_client = ca.renew(&client.cert_der, now).unwrap();
    assert_eq!(
        ca.verify_chain(&renewed_client.cert_der, Usage::Client, now)
            .unwrap(),
        renewed_client.serial
    );

    if openssl_verify(&tmp.0, &server.cert_pem, "sslserver", now) {
        openssl_verify(&tmp.0, &client.cert_pem, "sslclient", now);
        openssl_verify(&tmp.0, &renewed.cert_pem, "sslserver", now + HOUR);
        openssl_verify(&tmp.0, &renewed_client.cert_pem, "sslclient", now);
        // openssl checks the purpose and the time too.
        openssl_check(&tmp.0, &client.cert_pem, "sslserver", now, false);
        openssl_check(
            &tmp.0,
            &server.cert_pem,
            "sslserver",
            now + 2 * DEFAULT_LIFETIME,
            false,
        );
    }
    assert_eq!(read_files(&tmp.0), files, "issuing must not rewrite the CA");
}

#[test]
fn ecdsa_ca_end_to_end() {
    end_to_end(KeyAlgorithm::EcdsaP256);
}

#[test]
fn ed25519_ca_end_to_end() {
    end_to_end(KeyAlgorithm::Ed25519);
}

#[test]
fn stored_algorithm_wins_over_configured() {
    let tmp = TempDir::new("alg");
    let now = SystemTime::now();
    CertificateAuthority::open_or_create(&tmp.0, KeyAlgorithm::Ed25519, now).unwrap();
    let ca = CertificateAuthority::open_or_create(&tmp.0, KeyAlgorithm::EcdsaP256, now).unwrap();
    assert_eq!(ca.algorithm(), KeyAlgorithm::Ed25519);
}

#[test]
fn incomplete_files_are_refused_not_overwritten() {
    let tmp = TempDir::new("incomplete");
    let now = SystemTime::now();
    CertificateAuthority::open_or_create(&tmp.0, KeyAlgorithm::EcdsaP256, now).unwrap();
    fs::remove_file(tmp.0.join(INTERMEDIATE_KEY_FILE)).unwrap();
    let err =
        CertificateAuthority::open_or_create(&tmp.0, KeyAlgorithm::EcdsaP256, now).unwrap_err();
    assert!(
        matches!(&err, CaError::Incomplete { missing, .. } if missing == &[INTERMEDIATE_KEY_FILE]),
        "{err}"
    );
    assert!(!tmp.0.join(INTERMEDIATE_KEY_FILE).exists());
}

#[test]
fn swapped_key_is_refused() {
    let tmp = TempDir::new("swapped");
    let now = SystemTime::now();
    CertificateAuthority::open_or_create(&tmp.0, KeyAlgorithm::EcdsaP256, now).unwrap();
    fs::copy(tmp.0.join(ROOT_KEY_FILE), tmp.0.join(INTERMEDIATE_KEY_FILE)).unwrap();
    let err =
        CertificateAuthority::open_or_create(&tmp.0, KeyAlgorithm::EcdsaP256, now).unwrap_err();
    assert!(matches!(err, CaError::Inconsistent { .. }), "{err}");
}

#[test]
fn validity_window_is_enforced() {
    let tmp = TempDir::new("validity");
    let now = SystemTime::now();
    let mut ca =
        CertificateAuthority::open_or_create(&tmp.0, KeyAlgorithm::EcdsaP256, now).unwrap();

    let past = ca
        .issue(server_request(), now - 2 * DEFAULT_LIFETIME)
        .unwrap_err();
    // The intermediate itself starts at `now`: issuing in the past is refused.
    assert!(matches!(past, CaError::IssuerNotValid { .. }), "{past}");

    let expired = ca.issue(server_request(), now).unwrap();
    let later = now + DEFAULT_LIFETIME + HOUR;
    assert!(matches!(
        ca.verify_chain(&expired.cert_der, Usage::Server, later),
        Err(CaError::Expired { .. })
    ));
    assert!(matches!(
        ca.renew(&expired.cert_der, later),
        Err(CaError::Expired { .. })
    ));

    let future = ca.issue(server_request(), now + 48 * HOUR).unwrap();
    assert!(matches!(
        ca.verify_chain(&future.cert_der, Usage::Server, now),
        Err(CaError::NotYetValid { .. })
    ));
    assert!(
        ca.verify_chain(&future.cert_der, Usage::Server, now + 49 * HOUR)
            .is_ok()
    );
}

#[test]
fn lifetime_is_cut_at_the_intermediate_expiry() {
    let tmp = TempDir::new("cut");
    let now = SystemTime::now();
    let mut ca =
        CertificateAuthority::open_or_create(&tmp.0, KeyAlgorithm::EcdsaP256, now).unwrap();
    let late = now + INTERMEDIATE_VALIDITY - HOUR;
    let issued = ca
        .issue(
            IssueRequest {
                lifetime: MAX_LIFETIME,
                ..server_request()
            },
            late,
        )
        .unwrap();
    let int_not_after = SystemTime::from(ca.intermediate_not_after);
    assert_eq!(issued.not_after, int_not_after);
    let after = ca.issue(server_request(), now + INTERMEDIATE_VALIDITY + HOUR);
    assert!(matches!(after, Err(CaError::IssuerNotValid { .. })));
}

#[test]
fn another_cas_certificate_is_refused() {
    let (a, b) = (TempDir::new("ca-a"), TempDir::new("ca-b"));
    let now = SystemTime::now();
    let ca_a = CertificateAuthority::open_or_create(&a.0, KeyAlgorithm::EcdsaP256, now).unwrap();
    let mut ca_b =
        CertificateAuthority::open_or_create(&b.0, KeyAlgorithm::EcdsaP256, now).unwrap();
    let foreign = ca_b.issue(server_request(), now).unwrap();
    // Same names, different keys: the signature check must catch it.
    assert!(matches!(
        ca_a.verify_chain(&foreign.cert_der, Usage::Server, now),
        Err(CaError::BadSignature)
    ));
    let mut ca_a = ca_a;
    assert!(matches!(
        ca_a.renew(&foreign.cert_der, now),
        Err(CaError::BadSignature)
    ));
    // The intermediate is not a leaf of itself; a root is from another issuer.
    assert!(matches!(
        ca_a.verify_chain(ca_a.root_der(), Usage::Server, now),
        Err(CaError::UnknownIssuer { .. })
    ));
    assert!(matches!(
        ca_a.verify_chain(b"not a certificate", Usage::Server, now),
        Err(CaError::Parse(_))
    ));
}

#[test]
fn revocation() {
    let tmp = TempDir::new("revoke");
    let now = SystemTime::now();
    let mut ca =
        CertificateAuthority::open_or_create(&tmp.0, KeyAlgorithm::EcdsaP256, now).unwrap();
    let a = ca.issue(client_request(), now).unwrap();
    let b = ca.issue(client_request(), now).unwrap();
    let before = ca.revocations();
    assert_eq!(before.generation(), 0);
    assert!(before.is_empty());

    ca.revoke(&a.serial, now).unwrap();
    let after = ca.revocations();
    assert_eq!(after.generation(), 1);
    assert!(after.is_revoked(a.serial.as_bytes()));
    assert!(!after.is_revoked(b.serial.as_bytes()));
    assert!(
        !before.is_revoked(a.serial.as_bytes()),
        "old snapshots do not change"
    );
    let (_, parsed) = X509Certificate::from_der(&a.cert_der).unwrap();
    assert!(
        after.is_revoked(parsed.raw_serial()),
        "raw certificate serials match"
    );

    assert!(matches!(
        ca.verify_chain(&a.cert_der, Usage::Client, now),
        Err(CaError::Revoked { serial }) if serial == a.serial
    ));
    assert!(matches!(
        ca.renew(&a.cert_der, now),
        Err(CaError::Revoked { .. })
    ));
    assert!(ca.verify_chain(&b.cert_der, Usage::Client, now).is_ok());
    assert!(matches!(
        ca.revoke(&a.serial, now),
        Err(CaError::AlreadyRevoked { .. })
    ));
    assert!(matches!(
        ca.revoke(&Serial([1; 16]), now),
        Err(CaError::UnknownSerial { .. })
    ));
    ca.revoke(&b.serial, now).unwrap();
    let last = ca.revocations();
    assert_eq!(last.generation(), 2);
    assert_eq!(last.len(), 2);
    assert!(last.serials().windows(2).all(|w| w[0] < w[1]));
}

#[test]
fn caller_supplied_public_key() {
    let tmp = TempDir::new("spki");
    let now = SystemTime::now();
    let mut ca =
        CertificateAuthority::open_or_create(&tmp.0, KeyAlgorithm::EcdsaP256, now).unwrap();
    // An Ed25519 subject key under an ECDSA CA.
    let key = KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
    let issued = ca
        .issue(
            IssueRequest {
                public_key: Some(key.public_key_der()),
                ..server_request()
            },
            now,
        )
        .unwrap();
    assert!(issued.private_key.is_none());
    let (_, parsed) = X509Certificate::from_der(&issued.cert_der).unwrap();
    assert_eq!(parsed.public_key().raw, key.public_key_der());
    assert!(
        ca.verify_chain(&issued.cert_der, Usage::Server, now)
            .is_ok()
    );
    let bad = ca.issue(
        IssueRequest {
            public_key: Some(vec![0x30, 0x03, 0x02, 0x01, 0x01]),
            ..server_request()
        },
        now,
    );
    assert!(matches!(bad, Err(CaError::InvalidPublicKey(_))));
}

#[test]
fn bad_requests_get_typed_errors() {
    let tmp = TempDir::new("bad");
    let now = SystemTime::now();
    let mut ca =
        CertificateAuthority::open_or_create(&tmp.0, KeyAlgorithm::EcdsaP256, now).unwrap();
    let mut issue = |request: IssueRequest| ca.issue(request, now).unwrap_err();

    assert!(matches!(
        issue(IssueRequest {
            subject: " ".into(),
            ..server_request()
        }),
        CaError::EmptySubject
    ));
    assert!(matches!(
        issue(IssueRequest {
            subject: "x".repeat(65),
            ..server_request()
        }),
        CaError::SubjectTooLong { len: 65, .. }
    ));
    assert!(matches!(
        issue(IssueRequest {
            subject: "a\nb".into(),
            ..server_request()
        }),
        CaError::SubjectControlCharacters
    ));
    assert!(matches!(
        issue(IssueRequest {
            dns_names: (0..33).map(|i| format!("h{i}.example.net")).collect(),
            ip_addresses: Vec::new(),
            ..server_request()
        }),
        CaError::TooManyNames { count: 33, max: 32 }
    ));
    assert!(matches!(
        issue(IssueRequest {
            dns_names: Vec::new(),
            ip_addresses: Vec::new(),
            ..server_request()
        }),
        CaError::NoNames
    ));
    for name in [
        "",
        "bad_name.example",
        "-lead.example",
        "a..b",
        "trailing.",
        "10.0.0.1",
        "*.com",
        "a.*.example.com",
        "1.2.3",
        "ümlaut.example",
    ] {
        let err = issue(IssueRequest {
            dns_names: vec![name.into()],
            ..server_request()
        });
        assert!(
            matches!(&err, CaError::InvalidDnsName { name: n, .. } if n == name),
            "{name:?}: {err}"
        );
    }
    assert!(matches!(
        issue(IssueRequest {
            lifetime: Duration::ZERO,
            ..server_request()
        }),
        CaError::ZeroLifetime
    ));
    assert!(matches!(
        issue(IssueRequest {
            lifetime: MAX_LIFETIME + Duration::from_secs(1),
            ..server_request()
        }),
        CaError::LifetimeTooLong { .. }
    ));
    // Wildcards and the maximum are fine.
    let ok = IssueRequest {
        dns_names: std::iter::once("*.edge.example.net".to_owned())
            .chain((1..32).map(|i| format!("h{i}.example.net")))
            .collect(),
        ip_addresses: vec!["192.0.2.9".parse().unwrap()],
        lifetime: MAX_LIFETIME,
        ..server_request()
    };
    assert_eq!(ok.dns_names.len() + ok.ip_addresses.len(), 33);
    let ok = IssueRequest {
        dns_names: ok.dns_names[..31].to_vec(),
        ..ok
    };
    ca.issue(ok, now).unwrap();
}

#[test]
fn serials_are_positive_and_distinct() {
    let tmp = TempDir::new("serials");
    let now = SystemTime::now();
    let mut ca = CertificateAuthority::open_or_create(&tmp.0, KeyAlgorithm::Ed25519, now).unwrap();
    let mut seen = std::collections::HashSet::new();
    for _ in 0..20 {
        let issued = ca.issue(client_request(), now).unwrap();
        assert!((1..=0x7f).contains(&issued.serial.0[0]));
        let (_, parsed) = X509Certificate::from_der(&issued.cert_der).unwrap();
        assert_eq!(parsed.raw_serial(), issued.serial.as_bytes());
        assert!(seen.insert(issued.serial));
    }
}

/// A certificate whose signature verified once is still checked for
/// everything else on every call: validity, usage, revocation. Another
/// certificate with one bit of its signature changed is not taken for it.
#[test]
fn a_remembered_signature_skips_nothing_else() {
    let tmp = TempDir::new("remembered");
    let now = SystemTime::now();
    let mut ca =
        CertificateAuthority::open_or_create(&tmp.0, KeyAlgorithm::EcdsaP256, now).unwrap();
    let cert = ca.issue(client_request(), now).unwrap();
    assert!(ca.verify_chain(&cert.cert_der, Usage::Client, now).is_ok());
    assert!(ca.verify_chain(&cert.cert_der, Usage::Client, now).is_ok());
    assert!(matches!(
        ca.verify_chain(&cert.cert_der, Usage::Server, now),
        Err(CaError::WrongUsage { .. })
    ));
    assert!(matches!(
        ca.verify_chain(&cert.cert_der, Usage::Client, now + DEFAULT_LIFETIME + HOUR),
        Err(CaError::Expired { .. })
    ));
    let mut forged = cert.cert_der.clone();
    let last = forged.len() - 1;
    forged[last] ^= 1;
    assert!(matches!(
        ca.verify_chain(&forged, Usage::Client, now),
        Err(CaError::BadSignature)
    ));
    ca.revoke(&cert.serial, now).unwrap();
    assert!(matches!(
        ca.verify_chain(&cert.cert_der, Usage::Client, now),
        Err(CaError::Revoked { .. })
    ));
}
