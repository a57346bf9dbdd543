//! Phase0's migration: a certificate chain and key that another CA issued
//! for public names (`[trustchain_authority] import_certificate`,
//! `import_key`), checked before the server presents it to the clients
//! that ask for those names.
//!
//! What is checked: the files parse (PEM; the key PKCS#8, SEC1 or PKCS#1),
//! the leaf is valid now and names at least one DNS name, each certificate
//! of the chain is signed by the next one, the key is the leaf's, and no
//! name is one the server's own certificate carries (those stay with the
//! embedded CA). The chain's root is the other CA's business: clients
//! check it against their own trust store.

use dataplane::trust::{Imported, names_overlap};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

/// Expiry closer than this is warned about at every load.
pub const EXPIRY_WARNING: Duration = Duration::from_secs(14 * 24 * 3600);

#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    #[error("{path}: {detail}")]
    File { path: PathBuf, detail: String },
    #[error("{path}: the certificate is not valid now ({detail})")]
    NotValidNow { path: PathBuf, detail: String },
    #[error("{path}: the certificate names no DNS name to serve it for")]
    NoNames { path: PathBuf },
    #[error("{path}: certificate {index} of the chain is not signed by the next one ({detail})")]
    Chain {
        path: PathBuf,
        index: usize,
        detail: String,
    },
    #[error("{key}: this key does not belong to the certificate in {certificate} ({detail})")]
    KeyMismatch {
        certificate: PathBuf,
        key: PathBuf,
        detail: String,
    },
    #[error(
        "{path}: the certificate names `{name}`, which the server's own certificate carries; import a certificate for other names"
    )]
    OwnName { path: PathBuf, name: String },
}

/// What was imported, for the operator's log.
#[derive(Debug)]
pub struct ImportedCertificate {
    pub imported: Imported,
    pub names: Vec<String>,
    pub issuer: String,
    pub not_after: SystemTime,
}

/// Read and check the chain at `certificate` and the key at `key` at time
/// `now`; `own_names` are the names of the server's own certificate.
pub fn load(
    certificate: &Path,
    key: &Path,
    own_names: &[String],
    now: SystemTime,
) -> Result<ImportedCertificate, ImportError> {
    let file_error = |path: &Path, detail: String| ImportError::File {
        path: path.to_owned(),
        detail,
    };
    let bytes = std::fs::read(certificate).map_err(|e| file_error(certificate, e.to_string()))?;
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<_, _>>()
        .map_err(|e| file_error(certificate, format!("not PEM certificates: {e}")))?;
    if chain.is_empty() {
        return Err(file_error(certificate, "holds no CERTIFICATE block".into()));
    }
    let key_bytes = std::fs::read(key).map_err(|e| file_error(key, e.to_string()))?;
    let private = PrivateKeyDer::from_pem_slice(&key_bytes)
        .map_err(|e| file_error(key, format!("not a PEM private key: {e}")))?;
    let parsed = chain
        .iter()
        .enumerate()
        .map(|(index, der)| {
            x509_parser::parse_x509_certificate(der.as_ref())
                .map(|(_, cert)| cert)
                .map_err(|e| file_error(certificate, format!("certificate {index}: {e}")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let leaf = &parsed[0];
    let unix = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    let validity = leaf.validity();
    if unix < validity.not_before.timestamp() || unix > validity.not_after.timestamp() {
        return Err(ImportError::NotValidNow {
            path: certificate.to_owned(),
            detail: format!(
                "valid from {} until {}",
                validity.not_before, validity.not_after
            ),
        });
    }
    for (index, pair) in parsed.windows(2).enumerate() {
        let [cert, issuer] = pair else { continue };
        if cert.issuer().as_raw() != issuer.subject().as_raw() {
            return Err(ImportError::Chain {
                path: certificate.to_owned(),
                index,
                detail: format!(
                    "issued by `{}`, followed by `{}`",
                    cert.issuer(),
                    issuer.subject()
                ),
            });
        }
        cert.verify_signature(Some(issuer.public_key()))
            .map_err(|e| ImportError::Chain {
                path: certificate.to_owned(),
                index,
                detail: e.to_string(),
            })?;
    }
    let names: Vec<String> = super::ca::certificate_names(leaf)
        .dns_names
        .iter()
        .map(|name| name.to_ascii_lowercase())
        .collect();
    if names.is_empty() {
        return Err(ImportError::NoNames {
            path: certificate.to_owned(),
        });
    }
    if let Some(name) = names
        .iter()
        .find(|name| own_names.iter().any(|own| names_overlap(name, own)))
    {
        return Err(ImportError::OwnName {
            path: certificate.to_owned(),
            name: name.clone(),
        });
    }
    let not_after = SystemTime::UNIX_EPOCH
        + Duration::from_secs(u64::try_from(validity.not_after.timestamp()).unwrap_or(0));
    let issuer = leaf.issuer().to_string();
    let imported = Imported::new(names.clone(), chain, &private, not_after).map_err(|e| {
        ImportError::KeyMismatch {
            certificate: certificate.to_owned(),
            key: key.to_owned(),
            detail: e.to_string(),
        }
    })?;
    Ok(ImportedCertificate {
        imported,
        names,
        issuer,
        not_after,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};

    struct Files {
        dir: PathBuf,
    }

    impl Drop for Files {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    /// A public CA and a leaf it issued for `names`, valid `days` from
    /// `start_days` ago; returns the files (chain leaf first, key).
    fn issued(
        tag: &str,
        names: &[&str],
        start_days: i64,
        days: i64,
    ) -> (Files, PathBuf, PathBuf, KeyPair) {
        let dir = std::env::temp_dir().join(format!("i2-import-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let ca_key = KeyPair::generate().unwrap();
        let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.distinguished_name
            .push(DnType::CommonName, "Public Test CA");
        let ca_cert = ca.self_signed(&ca_key).unwrap();
        let key = KeyPair::generate().unwrap();
        let mut leaf =
            CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .unwrap();
        let start = time::OffsetDateTime::now_utc() - time::Duration::days(start_days);
        leaf.not_before = start;
        leaf.not_after = start + time::Duration::days(days);
        let cert = leaf.signed_by(&key, &ca_cert, &ca_key).unwrap();
        let chain = dir.join("fullchain.pem");
        std::fs::write(&chain, format!("{}{}", cert.pem(), ca_cert.pem())).unwrap();
        let key_path = dir.join("key.pem");
        std::fs::write(&key_path, key.serialize_pem()).unwrap();
        (Files { dir }, chain, key_path, ca_key)
    }

    #[test]
    fn a_good_chain_loads_with_its_names() {
        let (_files, chain, key, _) =
            issued("good", &["www.example.org", "*.pub.example.org"], 1, 90);
        let loaded = load(&chain, &key, &["localhost".into()], SystemTime::now()).unwrap();
        assert_eq!(loaded.names, vec!["www.example.org", "*.pub.example.org"]);
        assert!(loaded.imported.covers("a.pub.example.org"));
        assert!(!loaded.imported.covers("pub.example.org"));
        assert!(loaded.issuer.contains("Public Test CA"));
    }

    #[test]
    fn bad_imports_are_refused_with_the_reason() {
        let (_files, chain, key, _) = issued("bad", &["www.example.org"], 1, 90);
        let own = vec!["localhost".to_string()];
        // Another key.
        let (_other, _, other_key, _) = issued("bad-other", &["www.example.org"], 1, 90);
        let e = load(&chain, &other_key, &own, SystemTime::now()).unwrap_err();
        assert!(matches!(e, ImportError::KeyMismatch { .. }), "{e}");
        // Expired, and not yet valid.
        let (_old, old_chain, old_key, _) = issued("bad-old", &["www.example.org"], 100, 90);
        let e = load(&old_chain, &old_key, &own, SystemTime::now()).unwrap_err();
        assert!(matches!(e, ImportError::NotValidNow { .. }), "{e}");
        let e = load(
            &chain,
            &key,
            &own,
            SystemTime::now() - Duration::from_secs(3 * 86400),
        )
        .unwrap_err();
        assert!(matches!(e, ImportError::NotValidNow { .. }), "{e}");
        // A name the server's own certificate carries, also through a wildcard.
        let e = load(&chain, &key, &["www.example.org".into()], SystemTime::now()).unwrap_err();
        assert!(matches!(e, ImportError::OwnName { .. }), "{e}");
        let (_wild, wild_chain, wild_key, _) = issued("bad-wild", &["*.internet2.test"], 1, 90);
        let e = load(
            &wild_chain,
            &wild_key,
            &["node1.internet2.test".into()],
            SystemTime::now(),
        )
        .unwrap_err();
        assert!(matches!(e, ImportError::OwnName { .. }), "{e}");
        // The server's own wildcard covers the imported name.
        let e = load(&chain, &key, &["*.example.org".into()], SystemTime::now()).unwrap_err();
        assert!(matches!(e, ImportError::OwnName { .. }), "{e}");
        // Not PEM, empty, a chain out of order.
        std::fs::write(&key, "junk").unwrap();
        let e = load(&chain, &key, &own, SystemTime::now()).unwrap_err();
        assert!(matches!(e, ImportError::File { .. }), "{e}");
        let empty = chain.with_file_name("empty.pem");
        std::fs::write(&empty, "").unwrap();
        let e = load(&empty, &key, &own, SystemTime::now()).unwrap_err();
        assert!(e.to_string().contains("no CERTIFICATE"), "{e}");
        let text = std::fs::read_to_string(&chain).unwrap();
        let (leaf, ca) = text.split_at(text.find("-----END CERTIFICATE-----").unwrap() + 26);
        let swapped = chain.with_file_name("swapped.pem");
        std::fs::write(&swapped, format!("{}{}", ca.trim_start(), leaf)).unwrap();
        let e = load(&swapped, &other_key, &own, SystemTime::now()).unwrap_err();
        assert!(
            matches!(e, ImportError::Chain { .. } | ImportError::NoNames { .. }),
            "{e}"
        );
        assert!(
            load(
                Path::new("/nonexistent/chain.pem"),
                &key,
                &own,
                SystemTime::now()
            )
            .is_err()
        );
    }
}
