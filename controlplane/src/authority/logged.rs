//! The authority: the CA and the CT log as one. A certificate leaves the
//! authority only as a [`LoggedCertificate`], which only [`Authority::issue`]
//! and [`Authority::renew`] can make, and only after the log committed its
//! entry durably (RFC 6962 §3: logged before it is handed out).
//!
//! Files in the data directory: `ca/` (root and intermediate, see
//! `ca::CertificateAuthority`), `ct-log.key` (the log's PKCS#8 signing key,
//! mode 0600, never rewritten) and `ct.redb` (the log).

use super::ca::{
    CaError, CertificateAuthority, IssueRequest, IssuedCertificate, KeyAlgorithm, Serial, Usage,
};
use super::ct::{CtLog, LogError, LogKeyAlgorithm, LogSigner, SignedTreeHead, SignerError};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

pub const CA_DIR: &str = "ca";
pub const LOG_KEY_FILE: &str = "ct-log.key";
pub const LOG_FILE: &str = "ct.redb";

#[derive(Debug, thiserror::Error)]
pub enum AuthorityError {
    #[error(transparent)]
    Ca(#[from] CaError),
    #[error("certificate transparency log: {0}")]
    Log(#[from] LogError),
    #[error("certificate transparency log key: {0}")]
    Signer(#[from] SignerError),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the clock reads before 1970")]
    Clock,
}

/// A certificate that is in the log: the only form in which the authority
/// hands one out.
// The private field (not #[non_exhaustive]) keeps construction inside this
// module, not just inside the crate: nothing else can skip the log.
#[allow(clippy::manual_non_exhaustive)]
#[derive(Debug, Clone)]
pub struct LoggedCertificate {
    pub certificate: IssuedCertificate,
    /// Its entry in the log.
    pub leaf_index: u64,
    /// The signed tree head that covers it.
    pub sth: SignedTreeHead,
    _logged: (),
}

pub struct Authority {
    ca: CertificateAuthority,
    log: CtLog,
}

impl Authority {
    /// Open or create the CA, the log key and the log under `dir`.
    pub fn open(
        dir: &Path,
        ca_algorithm: KeyAlgorithm,
        log_algorithm: LogKeyAlgorithm,
        now: SystemTime,
    ) -> Result<Self, AuthorityError> {
        let io = |path: &Path| {
            let path = path.to_owned();
            move |source| AuthorityError::Io { path, source }
        };
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let ca = CertificateAuthority::open_or_create(&dir.join(CA_DIR), ca_algorithm, now)?;
        let key_path = dir.join(LOG_KEY_FILE);
        let signer = if key_path.exists() {
            LogSigner::from_pkcs8(
                log_algorithm,
                &std::fs::read(&key_path).map_err(io(&key_path))?,
            )?
        } else {
            let (signer, pkcs8) = LogSigner::generate(log_algorithm)?;
            super::ca::store::write_private(&key_path, &pkcs8)?;
            super::ca::store::sync_dir(dir)?;
            signer
        };
        let log = CtLog::open(&dir.join(LOG_FILE), signer)?;
        Ok(Self { ca, log })
    }

    /// Issue a certificate and log it; returns once the log entry is durable.
    pub fn issue(
        &mut self,
        request: IssueRequest,
        now: SystemTime,
    ) -> Result<LoggedCertificate, AuthorityError> {
        let certificate = self.ca.issue(request, now)?;
        self.log_certificate(certificate, now)
    }

    /// Renew a certificate of this CA and log the successor.
    pub fn renew(
        &mut self,
        current_cert_der: &[u8],
        now: SystemTime,
    ) -> Result<LoggedCertificate, AuthorityError> {
        let certificate = self.ca.renew(current_cert_der, now)?;
        self.log_certificate(certificate, now)
    }

    pub fn revoke(&mut self, serial: &Serial, now: SystemTime) -> Result<(), AuthorityError> {
        Ok(self.ca.revoke(serial, now)?)
    }

    /// Chain, validity, usage and revocation checks for a presented certificate.
    pub fn verify_chain(
        &self,
        cert_der: &[u8],
        usage: Usage,
        now: SystemTime,
    ) -> Result<Serial, AuthorityError> {
        Ok(self.ca.verify_chain(cert_der, usage, now)?)
    }

    pub fn ca(&self) -> &CertificateAuthority {
        &self.ca
    }

    pub fn log(&self) -> &CtLog {
        &self.log
    }

    fn log_certificate(
        &mut self,
        certificate: IssuedCertificate,
        now: SystemTime,
    ) -> Result<LoggedCertificate, AuthorityError> {
        let now_ms = now
            .duration_since(UNIX_EPOCH)
            .map_err(|_| AuthorityError::Clock)?
            .as_millis() as u64;
        let receipt = self
            .log
            .append_batch(&[(now_ms, certificate.cert_der.clone())], now_ms)?;
        Ok(LoggedCertificate {
            certificate,
            leaf_index: receipt.first_index,
            sth: receipt.sth,
            _logged: (),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::authority::ct::{encode_x509_leaf, leaf_hash, verify_inclusion, verify_sth};
    use std::time::Duration;

    fn request(name: &str) -> IssueRequest {
        IssueRequest {
            subject: name.into(),
            dns_names: vec![name.into()],
            ..IssueRequest::default()
        }
    }

    #[test]
    fn every_issued_certificate_is_in_the_log_and_survives_a_restart() {
        let dir = std::env::temp_dir().join(format!("i2-authority-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let now = SystemTime::now();
        let mut authority =
            Authority::open(&dir, KeyAlgorithm::EcdsaP256, LogKeyAlgorithm::Ed25519, now).unwrap();
        let mut issued = Vec::new();
        for (i, name) in ["a.example", "b.example", "c.example"]
            .into_iter()
            .enumerate()
        {
            let logged = authority
                .issue(request(name), now + Duration::from_millis(i as u64))
                .unwrap();
            assert_eq!(logged.leaf_index, i as u64);
            issued.push(logged);
        }
        let renewed = authority
            .renew(
                &issued[0].certificate.cert_der,
                now + Duration::from_secs(1),
            )
            .unwrap();
        assert_eq!(renewed.leaf_index, 3);
        let public_key = authority.log().public_key();
        drop(authority);

        // Reopen: same CA, same log key, every certificate provable.
        let authority =
            Authority::open(&dir, KeyAlgorithm::EcdsaP256, LogKeyAlgorithm::Ed25519, now).unwrap();
        assert_eq!(
            authority.log().public_key(),
            public_key,
            "the log key is never rewritten"
        );
        let sth = authority.log().latest_sth().unwrap();
        assert_eq!(sth.tree_size, 4);
        verify_sth(&sth, &public_key, LogKeyAlgorithm::Ed25519).unwrap();
        for logged in issued.iter().chain([&renewed]) {
            let timestamp_ms = logged.sth.timestamp_ms;
            let leaf = encode_x509_leaf(timestamp_ms, &logged.certificate.cert_der, &[]).unwrap();
            let hash = leaf_hash(&leaf);
            let proof = authority
                .log()
                .inclusion_proof_by_hash(&hash, sth.tree_size)
                .unwrap();
            assert_eq!(proof.leaf_index, logged.leaf_index);
            verify_inclusion(
                &hash,
                proof.leaf_index,
                sth.tree_size,
                &proof.audit_path,
                &sth.root_hash,
            )
            .unwrap();
            authority
                .verify_chain(
                    &logged.certificate.cert_der,
                    Usage::Server,
                    now + Duration::from_secs(2),
                )
                .unwrap();
        }
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(dir.join(LOG_KEY_FILE))
                .unwrap()
                .permissions(),
        );
        assert_eq!(mode & 0o777, 0o600);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
