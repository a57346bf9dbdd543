//! The development CA: on first start it makes a root and a server
//! certificate (ECDSA P-256, rcgen) and keeps them in the data directory,
//! keys with mode 0600. Later starts reuse them; the server certificate is
//! reissued by the same root when its names change or it nears expiry.

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, KeyPair, KeyUsagePurpose,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use std::fs;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

pub const CA_CERT_FILE: &str = "ca.pem";
pub const CA_KEY_FILE: &str = "ca.key";
pub const SERVER_CERT_FILE: &str = "server.pem";
pub const SERVER_KEY_FILE: &str = "server.key";
const SERVER_NAMES_FILE: &str = "server.names";
const CA_NAME: &str = "internet2 development CA";

/// How long a development server certificate is valid.
pub const SERVER_CERT_VALIDITY: Duration = Duration::from_secs(30 * 24 * 3600);
/// Reissue the server certificate once it is this old.
pub const SERVER_CERT_REISSUE_AGE: Duration = Duration::from_secs(20 * 24 * 3600);
const CA_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

#[derive(Debug, thiserror::Error)]
pub enum DevCaError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: not a usable PEM file: {detail}")]
    Pem { path: PathBuf, detail: String },
    #[error("cannot make a certificate: {0}")]
    Rcgen(#[from] rcgen::Error),
}

/// The server's certificate chain and key, and the root clients trust.
#[derive(Debug)]
pub struct DevIdentity {
    pub cert_chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
    pub ca_cert: CertificateDer<'static>,
    pub ca_path: PathBuf,
}

/// Load the development CA and server certificate from `dir`, making what
/// is missing. `names` are the DNS names or IP addresses the server answers to.
pub fn load_or_create(dir: &Path, names: &[String]) -> Result<DevIdentity, DevCaError> {
    fs::create_dir_all(dir).map_err(|source| DevCaError::Io {
        path: dir.to_owned(),
        source,
    })?;
    let ca_key_path = dir.join(CA_KEY_FILE);
    let ca_key = if ca_key_path.exists() {
        KeyPair::from_pem(&read(&ca_key_path)?).map_err(|e| DevCaError::Pem {
            path: ca_key_path.clone(),
            detail: e.to_string(),
        })?
    } else {
        let key = KeyPair::generate()?;
        write_private(&ca_key_path, key.serialize_pem().as_bytes())?;
        tracing::info!(path = %ca_key_path.display(), "created development CA key");
        key
    };
    // The issuer is rebuilt from the stored key with the same name; its key
    // identifier derives from the key, so stored and rebuilt roots agree.
    let ca = ca_params()?.self_signed(&ca_key)?;
    let ca_path = dir.join(CA_CERT_FILE);
    if !ca_path.exists() {
        write_public(&ca_path, ca.pem().as_bytes())?;
    }

    let cert_path = dir.join(SERVER_CERT_FILE);
    let key_path = dir.join(SERVER_KEY_FILE);
    let names_path = dir.join(SERVER_NAMES_FILE);
    let wanted_names = names.join("\n");
    let current = cert_path.exists()
        && key_path.exists()
        && fs::read_to_string(&names_path).is_ok_and(|n| n == wanted_names)
        && age(&cert_path).is_some_and(|a| a < SERVER_CERT_REISSUE_AGE);
    if !current {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(names.to_vec())?;
        params.distinguished_name = name("internet2-server");
        params.not_before = rcgen::date_time_ymd(1975, 1, 1).max(now_offset(Duration::ZERO, true));
        params.not_after = now_offset(SERVER_CERT_VALIDITY, false);
        let cert = params.signed_by(&key, &ca, &ca_key)?;
        write_private(&key_path, key.serialize_pem().as_bytes())?;
        write_public(&cert_path, cert.pem().as_bytes())?;
        write_public(&names_path, wanted_names.as_bytes())?;
        tracing::info!(path = %cert_path.display(), ?names, "issued development server certificate");
    }

    let ca_cert = load_cert(&ca_path)?;
    let server_cert = load_cert(&cert_path)?;
    let key = PrivateKeyDer::from_pem_file(&key_path).map_err(|e| DevCaError::Pem {
        path: key_path.clone(),
        detail: e.to_string(),
    })?;
    // Clients hold the root already: sending only the leaf keeps the first
    // flight small (RFC 9000 §8.1 limits it to 3x the client's Initial).
    Ok(DevIdentity {
        cert_chain: vec![server_cert],
        key,
        ca_cert,
        ca_path,
    })
}

/// SHA-256 of a certificate's SubjectPublicKeyInfo: the TLSA `3 1 1` pin.
pub fn spki_sha256(cert: &CertificateDer<'_>) -> Result<[u8; 32], DevCaError> {
    let (_, parsed) =
        x509_parser::parse_x509_certificate(cert.as_ref()).map_err(|e| DevCaError::Pem {
            path: PathBuf::from("<server certificate>"),
            detail: e.to_string(),
        })?;
    let digest = ring::digest::digest(&ring::digest::SHA256, parsed.public_key().raw);
    let mut out = [0u8; 32];
    out.copy_from_slice(digest.as_ref());
    Ok(out)
}

/// Read the root certificate a client should trust.
pub fn load_cert(path: &Path) -> Result<CertificateDer<'static>, DevCaError> {
    CertificateDer::from_pem_file(path).map_err(|e| DevCaError::Pem {
        path: path.to_owned(),
        detail: e.to_string(),
    })
}

fn ca_params() -> Result<CertificateParams, DevCaError> {
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.distinguished_name = name(CA_NAME);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.not_before = rcgen::date_time_ymd(2025, 1, 1);
    params.not_after = now_offset(CA_VALIDITY, false).max(rcgen::date_time_ymd(2036, 1, 1));
    Ok(params)
}

fn name(common_name: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common_name);
    dn
}

fn now_offset(offset: Duration, backwards: bool) -> time::OffsetDateTime {
    let now = SystemTime::now();
    let at = if backwards {
        now - offset - Duration::from_secs(3600)
    } else {
        now + offset
    };
    at.into()
}

fn age(path: &Path) -> Option<Duration> {
    fs::metadata(path).ok()?.modified().ok()?.elapsed().ok()
}

fn read(path: &Path) -> Result<String, DevCaError> {
    fs::read_to_string(path).map_err(|source| DevCaError::Io {
        path: path.to_owned(),
        source,
    })
}

fn write_private(path: &Path, bytes: &[u8]) -> Result<(), DevCaError> {
    write_mode(path, bytes, 0o600)
}

fn write_public(path: &Path, bytes: &[u8]) -> Result<(), DevCaError> {
    write_mode(path, bytes, 0o644)
}

/// Write via a temporary file and rename, so a crash never leaves half a key.
fn write_mode(path: &Path, bytes: &[u8], mode: u32) -> Result<(), DevCaError> {
    let tmp = path.with_extension("tmp");
    let io = |source| DevCaError::Io {
        path: path.to_owned(),
        source,
    };
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)
        .map_err(io)?;
    file.write_all(bytes).map_err(io)?;
    file.sync_all().map_err(io)?;
    fs::rename(&tmp, path).map_err(io)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn creates_then_reuses_with_private_keys() {
        let dir = std::env::temp_dir().join(format!("i2-devca-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let names = vec!["localhost".to_owned(), "::1".to_owned()];
        let first = load_or_create(&dir, &names).unwrap();
        for key in [CA_KEY_FILE, SERVER_KEY_FILE] {
            let mode = fs::metadata(dir.join(key)).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{key} must be private");
        }
        let second = load_or_create(&dir, &names).unwrap();
        assert_eq!(
            first.cert_chain[0], second.cert_chain[0],
            "the server certificate is reused"
        );
        let third = load_or_create(&dir, &["other.example".to_owned()]).unwrap();
        assert_ne!(
            first.cert_chain[0], third.cert_chain[0],
            "new names reissue the certificate"
        );
        assert_eq!(first.ca_cert, third.ca_cert, "the root stays");
        fs::remove_dir_all(&dir).unwrap();
    }
}
