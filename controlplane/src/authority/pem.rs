//! Certificate files and pins, for the server's wiring and the client.

use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
#[error("{path}: not a usable certificate: {detail}")]
pub struct CertificateFileError {
    pub path: PathBuf,
    pub detail: String,
}

/// SHA-256 of a certificate's SubjectPublicKeyInfo: the TLSA `3 1 1` pin.
pub fn spki_sha256(cert: &CertificateDer<'_>) -> Result<[u8; 32], CertificateFileError> {
    dataplane::trust::spki_sha256(cert.as_ref()).ok_or_else(|| CertificateFileError {
        path: PathBuf::from("<certificate>"),
        detail: "the certificate does not parse".into(),
    })
}

/// Read the (first) certificate of a PEM file, e.g. the root a client trusts.
pub fn load_cert(path: &Path) -> Result<CertificateDer<'static>, CertificateFileError> {
    CertificateDer::from_pem_file(path).map_err(|e| CertificateFileError {
        path: path.to_owned(),
        detail: e.to_string(),
    })
}
