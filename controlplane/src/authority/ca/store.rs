//! The CA's files: atomic writes, private keys 0600.

use super::CaError;
use rcgen::KeyPair;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use std::fs;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::Path;

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> CaError + '_ {
    move |source| CaError::Io {
        path: path.to_owned(),
        source,
    }
}

pub(super) fn create_dir(dir: &Path) -> Result<(), CaError> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(io(dir))
}

pub(super) fn read(path: &Path) -> Result<String, CaError> {
    fs::read_to_string(path).map_err(io(path))
}

pub(super) fn pem_to_der(path: &Path, pem: &str) -> Result<Vec<u8>, CaError> {
    CertificateDer::from_pem_slice(pem.as_bytes())
        .map(|der| der.to_vec())
        .map_err(|e| CaError::Pem {
            path: path.to_owned(),
            detail: e.to_string(),
        })
}

pub(super) fn load_key(path: &Path) -> Result<KeyPair, CaError> {
    KeyPair::from_pem(&read(path)?).map_err(|e| CaError::Pem {
        path: path.to_owned(),
        detail: e.to_string(),
    })
}

pub(crate) fn write_private(path: &Path, bytes: &[u8]) -> Result<(), CaError> {
    write_mode(path, bytes, 0o600)
}

pub(super) fn write_public(path: &Path, bytes: &[u8]) -> Result<(), CaError> {
    write_mode(path, bytes, 0o644)
}

/// Make the renames durable.
pub(crate) fn sync_dir(dir: &Path) -> Result<(), CaError> {
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io(dir))
}

/// Write via a temporary file and rename, so a crash never leaves half a file.
fn write_mode(path: &Path, bytes: &[u8], mode: u32) -> Result<(), CaError> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = Path::new(&tmp);
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(tmp)
        .map_err(io(path))?;
    file.write_all(bytes).map_err(io(path))?;
    file.sync_all().map_err(io(path))?;
    fs::rename(tmp, path).map_err(io(path))
}
