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
    let (_, parsed) =
        x509_parser::parse_x509_certificate(cert.as_ref()).map_err(|e| CertificateFileError {
            path: PathBuf::from("<certificate>"),
            detail: e.to_string(),
        })?;
    let digest = ring::digest::digest(&ring::digest::SHA256, parsed.public_key().raw);
    let mut out = [0u8; 32];
    out.copy_from_slice(digest.as_ref());
    Ok(out)
}

/// Read the (first) certificate of a PEM file, e.g. the root a client trusts.
pub fn load_cert(path: &Path) -> Result<CertificateDer<'static>, CertificateFileError> {
    CertificateDer::from_pem_file(path).map_err(|e| CertificateFileError {
        path: path.to_owned(),
        detail: e.to_string(),
    })
}
