//! The authority: the CA and the CT log as one. A certificate leaves the
//! authority only as a [`LoggedCertificate`], which only the state machine
//! makes (`crate::machine::Machine::issue` and `renew`), and only after the
//! log committed its entry durably (RFC 6962 §3: logged before it is handed
//! out).
//!
//! Files in the data directory: `ca/` (root and intermediate, see
//! `ca::CertificateAuthority`), `ct-log.key` (the log's PKCS#8 signing key,
//! mode 0600, never rewritten) and `authority.redb`, the one redb database
//! of the control plane's state: the CT log's tables (see `ct::log`), the
//! CA registry's (`ca_certificates`, `ca_children`, `ca_renewals`,
//! `ca_revocations`, `enrollment_tokens_used`, `enrollment_tokens_paid`;
//! see [`super::registry`]), the DNS zone's (`dns_records`, `dns_meta`; see
//! `crate::dns::store`) and the admission state's (see
//! `crate::consensus::state`). `enrollment.key` (see [`super::enrollment`])
//! is opened by the service, not here.
//!
//! This module proposes and reads; it does not write. A proposal
//! (`Authority::propose_issue`, `Authority::propose_renewal`,
//! `Authority::propose_revocation`) signs what needs the CA's key and
//! picks the serial and the time, and returns the command ([`Certify`],
//! [`Revoke`]) the state machine applies: `Authority::write_certify`
//! appends the certificate to the log and writes its registry row (and the
//! token it spends) in the machine's one transaction, so a crash at any
//! moment leaves both or neither: there is never a logged certificate the
//! registry does not know (it could not be revoked) nor a registered one
//! the log cannot prove. A certificate's zone pins commit in the same
//! transaction.
//!
//! On open, after the log's own checks, the registry must match the log
//! exactly: every record's certificate (its DER and log timestamp) is the
//! leaf at its recorded index, its DER carries its serial, no two records
//! claim one entry, and every log entry has a record. Then the CA is handed
//! every issued serial and every revocation, so `revoke`, `revocations` and
//! `verify_chain` answer as they did before the restart.

use super::ca::{
    self, CaError, CertificateAuthority, IssueRequest, IssuedCertificate, KeyAlgorithm,
    RevocationSnapshot, Serial, Usage,
};
use super::ct::log::PreparedAppend;
use super::ct::{
    AppendReceipt, CtLog, LogError, LogKeyAlgorithm, LogSigner, SignedTreeHead, SignerError,
    encode_x509_leaf, leaf_hash,
};
use super::enrollment::{TokenId, VerifiedToken};
use super::registry::{
    self, CertificateFilter, CertificateRecord, RegistryError, Revocation, RevocationReason,
};
use crate::dns::ZoneChange;
use crate::store::Store;
use redb::{Database, ReadTransaction, ReadableDatabase, WriteTransaction};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

pub const CA_DIR: &str = "ca";
pub const LOG_KEY_FILE: &str = "ct-log.key";
/// The redb database of the CT log and the CA registry.
pub const STORE_FILE: &str = "authority.redb";

#[derive(Debug, thiserror::Error)]
pub enum AuthorityError {
    #[error(transparent)]
    Ca(#[from] CaError),
    #[error("{path}: certificate transparency log: {source}")]
    Log { path: PathBuf, source: LogError },
    #[error("{path}: certificate registry: {source}")]
    Registry {
        path: PathBuf,
        source: RegistryError,
    },
    #[error("certificate transparency log key: {0}")]
    Signer(#[from] SignerError),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the clock reads before 1970")]
    Clock,
    #[error("enrollment secret: {0}")]
    Enrollment(#[from] super::enrollment::EnrollmentError),
    #[error("{path}: DNS zone: {source}")]
    Zone {
        path: PathBuf,
        source: crate::dns::ZoneError,
    },
    /// An enrolled issuance: the token was spent before.
    #[error("the enrollment token was already used")]
    TokenUsed,
    /// An enrolled issuance whose name a live certificate with another key
    /// came to hold after it was proposed (two enrollments in flight).
    #[error("{name:?} is held by certificate {holder} with another key")]
    NameTaken { name: String, holder: Serial },
    #[error("{path}: the control plane's store: {source}")]
    Store { path: PathBuf, source: redb::Error },
    #[error("admission state: {0}")]
    Admission(#[from] crate::consensus::state::StateError),
    /// A command planned on a state that changed before it was applied.
    #[error("{0}; the state changed since the request was planned: retry it")]
    Stale(String),
    /// This node lacks what the command changes (a zone, admission): it
    /// cannot apply what the others do, so it must stop, not skip it.
    #[error("{0}; this node cannot apply the cluster's commands")]
    NotConfigured(String),
    /// A cluster member's state changes only through the cluster's log.
    #[error("this node is a cluster member: its state changes only through the cluster's log")]
    Replicated,
    #[error(transparent)]
    Asset(#[from] crate::assets::StorageError),
}

impl AuthorityError {
    /// Whether the store failed (rather than the request being refused):
    /// what was applied in memory may then be ahead of the disk.
    pub fn is_storage_failure(&self) -> bool {
        use crate::consensus::state::StateError;
        match self {
            Self::Store { .. } | Self::Io { .. } | Self::NotConfigured(_) => true,
            // A signing failure (the random source) is this node's alone.
            Self::Log { source, .. } => matches!(
                source,
                LogError::Storage(_) | LogError::Corrupt(_) | LogError::Signer(_)
            ),
            Self::Registry { source, .. } => !matches!(source, RegistryError::Unencodable(_)),
            Self::Zone { source, .. } => matches!(
                source,
                crate::dns::ZoneError::Storage(_) | crate::dns::ZoneError::Corrupt(_)
            ),
            Self::Admission(e) => matches!(e, StateError::Storage(_) | StateError::Corrupt(_)),
            Self::Asset(e) => e.is_storage_failure(),
            _ => false,
        }
    }
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
    /// Shared with `log`; the registry's tables live here too.
    store: Store,
    store_path: PathBuf,
}

/// A certificate the CA signed, as its command carries it: the registry
/// record (the log index is the apply's to assign), the enrollment token
/// it spends, and the zone change that comes with it. It carries no
/// private key: that stays with the proposer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Certify {
    pub record: CertificateRecord,
    pub token: Option<SpentToken>,
    pub zone: Option<ZoneChange>,
}

/// An enrollment token, spent by the certificate it paid for. Made only
/// from a token whose MAC and expiry were checked ([`SpentToken::of`]), or
/// read back from a command the log holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SpentToken {
    pub(crate) id: [u8; 16],
    pub(crate) expires_at_s: u64,
}

impl SpentToken {
    pub fn of(token: &VerifiedToken) -> Self {
        Self {
            id: token.id().0,
            expires_at_s: token.expires_at_s(),
        }
    }
}

/// A revocation as its command carries it: the time is the proposer's,
/// and also decides which of what the certificate brings along has expired.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Revoke {
    pub serial: Serial,
    pub revocation: Revocation,
    pub zone: Option<ZoneChange>,
}

/// A [`Certify`] written, not yet committed.
pub(crate) struct CertifyWritten {
    append: PreparedAppend,
    sth: SignedTreeHead,
    serial: Serial,
    not_after: SystemTime,
}

impl Authority {
    /// Open or create the CA, the log key and the store under `dir`, make
    /// the store's tables, and check that the registry and the log agree
    /// (see the module documentation). Its writer is the state machine
    /// (`crate::machine::Machine::open`).
    pub(crate) fn open(
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
        let mut ca = CertificateAuthority::open_or_create(&dir.join(CA_DIR), ca_algorithm, now)?;
        let key_path = dir.join(LOG_KEY_FILE);
        let signer = if key_path.exists() {
            LogSigner::from_pkcs8(
                log_algorithm,
                &std::fs::read(&key_path).map_err(io(&key_path))?,
            )?
        } else {
            let (signer, pkcs8) = LogSigner::generate(log_algorithm)?;
            ca::store::write_private(&key_path, &pkcs8)?;
            ca::store::sync_dir(dir)?;
            signer
        };
        let store_path = dir.join(STORE_FILE);
        let registry_error = |source: RegistryError| AuthorityError::Registry {
            path: store_path.clone(),
            source,
        };
        let db = Arc::new(
            Database::create(&store_path).map_err(|e| registry_error(RegistryError::from(e)))?,
        );
        let store = Store::new(db);
        crate::machine::init_store(&store, &signer, &store_path)?;
        let log =
            CtLog::load_shared(store.clone(), signer).map_err(|source| AuthorityError::Log {
                path: store_path.clone(),
                source,
            })?;
        let records = store
            .begin_read()
            .map_err(RegistryError::from)
            .and_then(|txn| checked_records(&txn, &log))
            .map_err(registry_error)?;
        let (issued, revoked) = ca_state(&records);
        ca.restore(issued, revoked);
        Ok(Self {
            ca,
            log,
            store,
            store_path,
        })
    }

    /// Load the log, the registry and the CA's issued and revoked serials
    /// again from the store (after its tables were replaced wholesale: a
    /// snapshot was installed), with the checks of [`Self::open`].
    pub(crate) fn reload(&mut self) -> Result<(), AuthorityError> {
        self.log.reload().map_err(|source| AuthorityError::Log {
            path: self.store_path.clone(),
            source,
        })?;
        let records = self
            .read(|txn| checked_records(txn, &self.log))
            .map_err(|e| self.registry_error(e))?;
        let (issued, revoked) = ca_state(&records);
        self.ca.restore(issued, revoked);
        Ok(())
    }

    /// Whether another database's tables (a snapshot restored into a
    /// scratch file) would open as this authority's store: the log's tree
    /// and tree heads under this log's key, and the registry against the
    /// log, as [`Self::reload`] checks them. Nothing of this authority
    /// changes.
    pub(crate) fn check_tables(&self, db: Arc<Database>) -> Result<(), AuthorityError> {
        let log = self
            .log
            .in_other(db.clone())
            .map_err(|source| AuthorityError::Log {
                path: self.store_path.clone(),
                source,
            })?;
        db.begin_read()
            .map_err(RegistryError::from)
            .and_then(|txn| checked_records(&txn, &log))
            .map(drop)
            .map_err(|e| self.registry_error(e))
    }

    /// Sign a certificate for `request`: the certificate (with the private
    /// key when the CA made one) and the command that logs it.
    pub fn propose_issue(
        &self,
        request: IssueRequest,
        now: SystemTime,
    ) -> Result<(IssuedCertificate, Certify), AuthorityError> {
        let certificate = self.ca.sign(request, now, None)?;
        let certify = certify(&certificate, now)?;
        Ok((certificate, certify))
    }

    /// Sign a successor to `current_cert_der`, a certificate of this CA
    /// (see `CertificateAuthority::renew`). It is issued on the authority its
    /// predecessor was, and its record links it to the predecessor
    /// (`ca_renewals`), so that revoking the predecessor revokes it too.
    pub fn propose_renewal(
        &self,
        current_cert_der: &[u8],
        now: SystemTime,
    ) -> Result<(IssuedCertificate, Certify), AuthorityError> {
        let (mut request, current) = self.ca.renewal_request(current_cert_der, now)?;
        request.parent = self.certificate(&current)?.and_then(|r| r.parent);
        let certificate = self.ca.sign(request, now, Some(current))?;
        let certify = certify(&certificate, now)?;
        Ok((certificate, certify))
    }

    /// The revocation of `serial` at `now`. An unknown serial is
    /// [`CaError::UnknownSerial`], a second revocation
    /// [`CaError::AlreadyRevoked`].
    pub fn propose_revocation(
        &self,
        serial: Serial,
        reason: Option<RevocationReason>,
        now: SystemTime,
    ) -> Result<Revoke, AuthorityError> {
        self.ca.check_revocable(&serial)?;
        Ok(Revoke {
            serial,
            revocation: Revocation {
                revoked_at_ms: unix_ms(now)?,
                reason,
            },
            zone: None,
        })
    }

    /// Write `certify` in `txn`: its log entry and tree head, its registry
    /// record, its token. A token spent before is
    /// [`AuthorityError::TokenUsed`]; a certificate already logged or
    /// registered is refused too. It is logged at its proposed time, or
    /// at the latest tree head's when that is later. Every refusal comes
    /// before its first write (`crate::store`: a group shares `txn`).
    /// [`Self::absorb_certify`] it once `txn` committed.
    pub(crate) fn write_certify(
        &self,
        txn: &WriteTransaction,
        certify: &Certify,
    ) -> Result<CertifyWritten, AuthorityError> {
        let record = &certify.record;
        // What it renews or is issued on may have been revoked since it
        // was proposed (by a command applied before it): it would escape
        // that revocation.
        for serial in [record.renewed_from, record.parent].into_iter().flatten() {
            if registry::is_revoked_in(txn, serial).map_err(|e| self.registry_error(e))? {
                return Err(AuthorityError::Ca(CaError::Revoked { serial }));
            }
        }
        // The log's time never goes back: an entry proposed before the
        // latest tree head's time (by a member whose clock is behind the
        // one that proposed that head, or proposed before entries that
        // were applied first) is logged at the head's time. Every member
        // decides this alike from the same state.
        let latest_ms = self.log.latest_sth().map_or(0, |sth| sth.timestamp_ms);
        let at_ms = record.logged_at_ms.max(latest_ms);
        if latest_ms > record.logged_at_ms + CLOCK_BEHIND_WARN_MS {
            warn_clock_behind(record.logged_at_ms, latest_ms);
        }
        let log_error = |source| AuthorityError::Log {
            path: self.store_path.clone(),
            source,
        };
        let append = self
            .log
            .prepare_append(&[(at_ms, record.cert_der.clone())], at_ms)
            .map_err(log_error)?;
        if let Some(token) = &certify.token {
            if registry::token_spent_in(txn, token.id).map_err(|e| self.registry_error(e))? {
                return Err(AuthorityError::TokenUsed);
            }
            // An enrollment (a client certificate the token paid for);
            // a member's node certificate, which a join token pays for,
            // carries the cluster's name like every member's.
            if record.usage == Usage::Client {
                self.check_names_free_in(txn, record)?;
            }
        }
        let record = CertificateRecord {
            leaf_index: append.first_index(),
            logged_at_ms: at_ms,
            ..record.clone()
        };
        let row = registry::encoded(&record).map_err(|e| self.registry_error(e))?;
        // The first write: the log refuses a duplicate entry before it.
        let sth = self.log.write_append(txn, &append).map_err(log_error)?;
        if let Some(token) = &certify.token {
            registry::spend_token(txn, token.id, token.expires_at_s, record.serial)
                .map_err(|e| self.registry_error(e))?;
        }
        registry::insert_certificate(txn, &row).map_err(|e| self.registry_error(e))?;
        Ok(CertifyWritten {
            append,
            sth,
            serial: record.serial,
            not_after: record.not_after,
        })
    }

    /// An enrollment's names are first come, first served (see
    /// `service`): its proposer checked that no live certificate with
    /// another key carries them, and that is checked again here, at the
    /// proposal's time, against the state the command is applied to. Two
    /// enrollments for one name proposed before either applied: the second
    /// is refused on every member alike.
    fn check_names_free_in(
        &self,
        txn: &WriteTransaction,
        record: &CertificateRecord,
    ) -> Result<(), AuthorityError> {
        let at = UNIX_EPOCH + Duration::from_millis(record.logged_at_ms);
        let key = super::ca::public_key_of(&record.cert_der)?;
        let held = registry::sharing_names_in(txn, record).map_err(|e| self.registry_error(e))?;
        for holder in held {
            if holder.revocation.is_some()
                || holder.not_after < at
                || super::ca::public_key_of(&holder.cert_der)? == key
            {
                continue;
            }
            let mine = registry::index_names_of(record);
            let name = registry::index_names_of(&holder)
                .into_iter()
                .find(|n| mine.contains(n))
                .unwrap_or_default();
            return Err(AuthorityError::NameTaken {
                name,
                holder: holder.serial,
            });
        }
        Ok(())
    }

    /// Take in a [`Self::write_certify`] whose transaction committed: the
    /// log's tree grows and the CA counts the certificate as issued.
    pub(crate) fn absorb_certify(&mut self, written: CertifyWritten) -> AppendReceipt {
        let receipt = self.log.record_append(written.append, written.sth);
        self.ca.record_issued(written.serial, written.not_after);
        receipt
    }

    /// Write `revoke` in `txn`, with what renewed the certificate or was
    /// issued on its authority ([`Self::descendants`] at the revocation's
    /// time), revoked in the same transaction. Returns every serial it
    /// revokes, the certificate's first; [`Self::absorb_revocations`] them
    /// once `txn` committed.
    pub(crate) fn write_revocation(
        &self,
        txn: &WriteTransaction,
        revoke: &Revoke,
    ) -> Result<Vec<Serial>, AuthorityError> {
        self.ca.check_revocable(&revoke.serial)?;
        let at = UNIX_EPOCH + Duration::from_millis(revoke.revocation.revoked_at_ms);
        let cascade = registry::write_revocations(txn, revoke.serial, &revoke.revocation, at)
            .map_err(|e| self.registry_error(e))?;
        Ok(std::iter::once(revoke.serial).chain(cascade).collect())
    }

    /// Take in revocations whose transaction committed.
    pub(crate) fn absorb_revocations(&mut self, revoked: &[Serial], revocation: &Revocation) {
        let at = UNIX_EPOCH + Duration::from_millis(revocation.revoked_at_ms);
        self.ca.record_revocations(revoked, at);
    }

    /// Whether the enrollment token `id` was spent.
    pub fn token_spent(&self, id: TokenId) -> Result<bool, AuthorityError> {
        self.read(|txn| registry::token_spent(txn, id.0))
            .map_err(|e| self.registry_error(e))
    }

    /// The certificate the enrollment token `id` paid for (`None`: not
    /// spent, or spent before the registry recorded what for).
    pub fn token_certificate(&self, id: TokenId) -> Result<Option<Serial>, AuthorityError> {
        self.read(|txn| registry::token_certificate(txn, id.0))
            .map_err(|e| self.registry_error(e))
    }

    /// The unrevoked, unexpired certificates a revocation of `serial` at
    /// `now` revokes with it: its renewals and those issued on its
    /// authority (or on that of a certificate it renewed), and theirs, and
    /// so on.
    pub fn descendants(
        &self,
        serial: &Serial,
        now: SystemTime,
    ) -> Result<Vec<CertificateRecord>, AuthorityError> {
        self.read(|txn| registry::descendants(txn, *serial, now))
            .map_err(|e| self.registry_error(e))
    }

    /// The current revocation list, to hand to workers (cheap to clone).
    pub fn revocations(&self) -> RevocationSnapshot {
        self.ca.revocations()
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

    /// Up to [`registry::MAX_RECORDS_PER_CALL`] certificates matching
    /// `filter` with serials after `after`, in serial order, each with its
    /// revocation if any. Fewer than the maximum means there are no more;
    /// otherwise ask again with the last serial returned.
    pub fn certificates(
        &self,
        filter: &CertificateFilter,
        after: Option<Serial>,
    ) -> Result<Vec<CertificateRecord>, AuthorityError> {
        self.read(|txn| registry::list(txn, filter, after))
            .map_err(|e| self.registry_error(e))
    }

    /// The record of the certificate with this serial, if this authority
    /// issued it.
    pub fn certificate(
        &self,
        serial: &Serial,
    ) -> Result<Option<CertificateRecord>, AuthorityError> {
        self.read(|txn| registry::get(txn, *serial))
            .map_err(|e| self.registry_error(e))
    }

    pub fn ca(&self) -> &CertificateAuthority {
        &self.ca
    }

    pub fn log(&self) -> &CtLog {
        &self.log
    }

    /// The one database of the control plane's state, to read whole while
    /// no group is open (see [`Store::database`]). Its writer is the state
    /// machine (`crate::machine`).
    pub fn database(&self) -> Arc<Database> {
        self.store.database()
    }

    /// The store, as the state machine writes it.
    pub(crate) fn store(&self) -> &Store {
        &self.store
    }

    /// Run `read` in a read transaction that sees every command applied.
    fn read<T>(
        &self,
        read: impl FnOnce(&ReadTransaction) -> Result<T, RegistryError>,
    ) -> Result<T, RegistryError> {
        read(&self.store.begin_read()?)
    }

    /// The database file, for error messages.
    pub fn store_path(&self) -> &Path {
        &self.store_path
    }

    pub(crate) fn registry_error(&self, source: RegistryError) -> AuthorityError {
        AuthorityError::Registry {
            path: self.store_path.clone(),
            source,
        }
    }
}

/// How far behind the log's latest tree head a proposal's time may be
/// before applying it says so (a member's clock is off).
const CLOCK_BEHIND_WARN_MS: u64 = 2_000;

/// Say, at most once a minute, that an entry was proposed at `proposed_ms`,
/// before the log's latest tree head (`latest_ms`).
fn warn_clock_behind(proposed_ms: u64, latest_ms: u64) {
    use std::sync::atomic::{AtomicU64, Ordering};
    static LAST_WARNED_MS: AtomicU64 = AtomicU64::new(0);
    let now_ms = unix_ms(SystemTime::now()).unwrap_or(0);
    let last = LAST_WARNED_MS.load(Ordering::Relaxed);
    if now_ms.saturating_sub(last) < 60_000
        || LAST_WARNED_MS
            .compare_exchange(last, now_ms, Ordering::Relaxed, Ordering::Relaxed)
            .is_err()
    {
        return;
    }
    tracing::warn!(
        behind_ms = latest_ms - proposed_ms,
        "a certificate was proposed at a time before the log's latest tree head (a member's clock is behind another's): it is logged at the head's time; check the members' clocks (NTP)"
    );
}

/// The command that logs `certificate`, signed at `now`.
fn certify(certificate: &IssuedCertificate, now: SystemTime) -> Result<Certify, AuthorityError> {
    Ok(Certify {
        record: CertificateRecord {
            serial: certificate.serial,
            cert_der: certificate.cert_der.clone(),
            subject: certificate.subject.clone(),
            dns_names: certificate.dns_names.clone(),
            ip_addresses: certificate.ip_addresses.clone(),
            usage: certificate.usage,
            not_before: certificate.not_before,
            not_after: certificate.not_after,
            renewed_from: certificate.renewed_from,
            parent: certificate.parent,
            leaf_index: 0,
            logged_at_ms: unix_ms(now)?,
            revocation: None,
        },
        token: None,
        zone: None,
    })
}

impl LoggedCertificate {
    /// `certificate`, once the state machine logged it.
    pub(crate) fn logged(certificate: IssuedCertificate, receipt: AppendReceipt) -> Self {
        Self {
            certificate,
            leaf_index: receipt.first_index,
            sth: receipt.sth,
            _logged: (),
        }
    }
}

fn unix_ms(now: SystemTime) -> Result<u64, AuthorityError> {
    let ms = now
        .duration_since(UNIX_EPOCH)
        .map_err(|_| AuthorityError::Clock)?
        .as_millis();
    u64::try_from(ms).map_err(|_| AuthorityError::Clock)
}

/// The registry must describe the log exactly; see the module documentation.
/// Every registry record `txn` reads, checked against `log`
/// ([`check_against_log`]).
fn checked_records(
    txn: &ReadTransaction,
    log: &CtLog,
) -> Result<Vec<CertificateRecord>, RegistryError> {
    let records = registry::load_all(txn)?;
    check_against_log(&records, log)?;
    Ok(records)
}

fn check_against_log(records: &[CertificateRecord], log: &CtLog) -> Result<(), RegistryError> {
    let size = log.size();
    let disagree = |detail: String| {
        RegistryError::Corrupt(format!("the registry and the log disagree: {detail}"))
    };
    // The log holds only certificates, one record each. Its leaf hashes are
    // in memory, so its size fits in a usize.
    let mut owners: Vec<Option<Serial>> = vec![None; size as usize];
    for record in records {
        let (serial, index) = (record.serial, record.leaf_index);
        let in_der = ca::serial_of(&record.cert_der)
            .map_err(|e| disagree(format!("the certificate of record {serial}: {e}")))?;
        if in_der != serial {
            return Err(disagree(format!(
                "the record of {serial} holds certificate {in_der}"
            )));
        }
        let logged = log.leaf_hash(index).ok_or_else(|| {
            disagree(format!(
                "certificate {serial} is recorded at log entry {index}, but the log holds {size} entries"
            ))
        })?;
        let leaf = encode_x509_leaf(record.logged_at_ms, &record.cert_der, &[])
            .map_err(|e| disagree(format!("certificate {serial}: {e}")))?;
        if leaf_hash(&leaf) != logged {
            return Err(disagree(format!(
                "log entry {index} is not certificate {serial}, which is recorded there"
            )));
        }
        // `index < size` was checked by `leaf_hash` above.
        if let Some(other) = owners[index as usize].replace(serial) {
            return Err(disagree(format!(
                "certificates {other} and {serial} are both recorded at log entry {index}"
            )));
        }
    }
    if let Some(index) = owners.iter().position(Option::is_none) {
        return Err(disagree(format!(
            "log entry {index} has no certificate record"
        )));
    }
    Ok(())
}

/// The CA's view of the registry: expiry of every issued serial, time of
/// every revocation.
fn ca_state(
    records: &[CertificateRecord],
) -> (HashMap<Serial, SystemTime>, BTreeMap<Serial, SystemTime>) {
    let issued = records.iter().map(|r| (r.serial, r.not_after)).collect();
    let revoked = records
        .iter()
        .filter_map(|r| {
            let at = UNIX_EPOCH + Duration::from_millis(r.revocation?.revoked_at_ms);
            Some((r.serial, at))
        })
        .collect();
    (issued, revoked)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::authority::ct::{
        decode_sth, encode_sth, verify_consistency, verify_inclusion, verify_sth,
    };
    use crate::authority::registry::tamper;
    use crate::machine::Machine;
    use std::io::BufRead;

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
        let mut authority = open(&dir, now).unwrap();
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
        let authority = open(&dir, now).unwrap();
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

    use crate::test_support::TempDir;

    /// The authority as a single node runs it: each proposal applied at
    /// once by the state machine.
    struct Single(Machine);

    impl std::ops::Deref for Single {
        type Target = Authority;

        fn deref(&self) -> &Authority {
            self.0.authority()
        }
    }

    impl Single {
        fn issue(
            &mut self,
            request: IssueRequest,
            now: SystemTime,
        ) -> Result<LoggedCertificate, AuthorityError> {
            self.0.issue(request, now, None)
        }

        fn renew(
            &mut self,
            der: &[u8],
            now: SystemTime,
        ) -> Result<LoggedCertificate, AuthorityError> {
            self.0.renew(der, now, None)
        }

        fn revoke(&mut self, serial: &Serial, now: SystemTime) -> Result<(), AuthorityError> {
            self.0.revoke(*serial, None, now, None).map(drop)
        }

        fn revoke_with_reason(
            &mut self,
            serial: &Serial,
            reason: Option<RevocationReason>,
            now: SystemTime,
        ) -> Result<(), AuthorityError> {
            self.0.revoke(*serial, reason, now, None).map(drop)
        }
    }

    fn open(dir: &Path, now: SystemTime) -> Result<Single, AuthorityError> {
        Machine::open(
            dir,
            KeyAlgorithm::EcdsaP256,
            LogKeyAlgorithm::Ed25519,
            None,
            now,
        )
        .map(Single)
    }

    fn all(authority: &Authority, filter: CertificateFilter) -> Vec<Serial> {
        let records = authority.certificates(&filter, None).unwrap();
        assert!(records.len() < registry::MAX_RECORDS_PER_CALL);
        records.iter().map(|r| r.serial).collect()
    }

    fn sorted(mut serials: Vec<Serial>) -> Vec<Serial> {
        serials.sort();
        serials
    }

    #[test]
    fn issued_and_revoked_certificates_survive_a_restart() {
        let dir = TempDir::new("registry");
        let now = SystemTime::now();
        let mut authority = open(&dir.0, now).unwrap();
        let a = authority.issue(request("a.example"), now).unwrap();
        let b = authority.issue(request("b.example"), now).unwrap();
        let c = authority
            .issue(
                IssueRequest {
                    subject: "worker-7".into(),
                    usage: Usage::Client,
                    lifetime: Duration::from_secs(3600),
                    ..IssueRequest::default()
                },
                now,
            )
            .unwrap();
        let later = now + Duration::from_secs(10);
        let d = authority.renew(&a.certificate.cert_der, later).unwrap();
        let e = authority.issue(request("e.example"), later).unwrap();
        authority
            .revoke_with_reason(
                &b.certificate.serial,
                Some(RevocationReason::KeyCompromise),
                later,
            )
            .unwrap();
        // Takes its renewal d along.
        authority.revoke(&a.certificate.serial, later).unwrap();
        let snapshot = authority.revocations();
        assert_eq!(snapshot.generation(), 3);
        let records = authority
            .certificates(&CertificateFilter::All, None)
            .unwrap();
        drop(authority);

        let mut authority = open(&dir.0, later).unwrap();
        assert_eq!(
            authority.revocations(),
            snapshot,
            "the same revocation snapshot"
        );
        assert_eq!(
            authority
                .certificates(&CertificateFilter::All, None)
                .unwrap(),
            records
        );
        assert!(matches!(
            authority.verify_chain(&b.certificate.cert_der, Usage::Server, later),
            Err(AuthorityError::Ca(CaError::Revoked { serial })) if serial == b.certificate.serial
        ));
        assert!(matches!(
            authority.verify_chain(&d.certificate.cert_der, Usage::Server, later),
            Err(AuthorityError::Ca(CaError::Revoked { serial })) if serial == d.certificate.serial
        ));
        authority
            .verify_chain(&e.certificate.cert_der, Usage::Server, later)
            .unwrap();
        assert!(matches!(
            authority.revoke(&b.certificate.serial, later),
            Err(AuthorityError::Ca(CaError::AlreadyRevoked { .. }))
        ));
        assert!(matches!(
            authority.revoke(&Serial([1; 16]), later),
            Err(AuthorityError::Ca(CaError::UnknownSerial { .. }))
        ));
        assert!(matches!(
            authority.renew(&a.certificate.cert_der, later),
            Err(AuthorityError::Ca(CaError::Revoked { .. }))
        ));

        // What was issued before the restart can be revoked after it.
        authority.revoke(&c.certificate.serial, later).unwrap();
        assert!(matches!(
            authority.verify_chain(&c.certificate.cert_der, Usage::Client, later),
            Err(AuthorityError::Ca(CaError::Revoked { .. }))
        ));

        let record = authority
            .certificate(&d.certificate.serial)
            .unwrap()
            .unwrap();
        assert_eq!(record.renewed_from, Some(a.certificate.serial));
        assert_eq!(record.leaf_index, d.leaf_index);
        assert_eq!(record.cert_der, d.certificate.cert_der);
        assert_eq!(record.subject, "a.example");
        assert_eq!(record.dns_names, ["a.example"]);
        assert_eq!(record.usage, Usage::Server);
        assert_eq!(record.not_after, d.certificate.not_after);
        assert_eq!(
            record.revocation.map(|r| r.reason),
            Some(Some(registry::CASCADE_REASON))
        );
        let b_record = authority
            .certificate(&b.certificate.serial)
            .unwrap()
            .unwrap();
        assert_eq!(
            b_record.revocation.map(|r| r.reason),
            Some(Some(RevocationReason::KeyCompromise))
        );
        assert_eq!(authority.certificate(&Serial([1; 16])).unwrap(), None);

        let (a, b, c, d, e) = (
            a.certificate.serial,
            b.certificate.serial,
            c.certificate.serial,
            d.certificate.serial,
            e.certificate.serial,
        );
        assert_eq!(
            all(&authority, CertificateFilter::All),
            sorted(vec![a, b, c, d, e])
        );
        assert_eq!(
            all(&authority, CertificateFilter::Name("A.Example".into())),
            sorted(vec![a, d])
        );
        assert_eq!(
            all(&authority, CertificateFilter::Name("worker-7".into())),
            [c]
        );
        assert_eq!(
            all(&authority, CertificateFilter::Revoked),
            sorted(vec![a, b, c, d])
        );
        assert_eq!(all(&authority, CertificateFilter::ValidAt(later)), [e]);
        assert_eq!(
            all(
                &authority,
                CertificateFilter::ValidAt(later + Duration::from_secs(2 * 86400))
            ),
            []
        );
        // Paging: after the first serial, the rest.
        let first = sorted(vec![a, b, c, d, e])[0];
        assert_eq!(
            authority
                .certificates(&CertificateFilter::All, Some(first))
                .unwrap()
                .len(),
            4
        );

        // The revocation made after the restart is durable too.
        let snapshot = authority.revocations();
        assert_eq!(snapshot.generation(), 4);
        drop(authority);
        let authority = open(&dir.0, later).unwrap();
        assert_eq!(authority.revocations(), snapshot);
    }

    const CRASH_DIR_ENV: &str = "I2_AUTHORITY_CRASH_CHILD_DIR";
    const CRASH_CHILD: &str = "authority::logged::tests::crash_child_issues_until_killed";

    /// The child side of [`a_killed_issuer_loses_nothing_it_handed_out`]:
    /// issues certificates into the directory named by the environment
    /// until it is killed, printing each only after `issue` returned, as a
    /// server would hand it out.
    #[test]
    #[ignore = "helper run in a child process by a_killed_issuer_loses_nothing_it_handed_out"]
    fn crash_child_issues_until_killed() {
        use std::io::Write;
        let Some(dir) = std::env::var_os(CRASH_DIR_ENV) else {
            return;
        };
        let mut authority = open(Path::new(&dir), SystemTime::now()).unwrap();
        let mut out = std::io::stdout().lock();
        for i in 0u64.. {
            let logged = authority
                .issue(request(&format!("n{i}.example")), SystemTime::now())
                .unwrap();
            let sth: String = encode_sth(&logged.sth)
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect();
            // One write of less than PIPE_BUF bytes: whole lines or none.
            // Should the parent fail and close the pipe, this write fails
            // (EPIPE) and the child stops.
            let line = format!(
                "issued {} {} {sth}\n",
                logged.certificate.serial, logged.leaf_index
            );
            out.write_all(line.as_bytes()).unwrap();
            out.flush().unwrap();
        }
    }

    /// One "issued SERIAL INDEX STH" line of the child.
    fn parse_issued(line: &str) -> Option<(Serial, u64, SignedTreeHead)> {
        let mut fields = line.strip_prefix("issued ")?.split(' ');
        let hex = |s: &str| -> Option<Vec<u8>> {
            (0..s.len())
                .step_by(2)
                .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
                .collect()
        };
        let serial = Serial(hex(fields.next()?)?.try_into().ok()?);
        let index = fields.next()?.parse().ok()?;
        let sth = decode_sth(&hex(fields.next()?)?)?;
        Some((serial, index, sth))
    }

    fn random_below(rng: &ring::rand::SystemRandom, n: u32) -> u32 {
        let mut b = [0u8; 4];
        ring::rand::SecureRandom::fill(rng, &mut b).unwrap();
        u32::from_le_bytes(b) % n
    }

    /// Issue #4: `kill -9` at any moment loses no certificate that was
    /// handed out, and every tree head signed after a restart is consistent
    /// with every one signed before it.
    #[test]
    fn a_killed_issuer_loses_nothing_it_handed_out() {
        let dir = TempDir::new("crash");
        let rng = ring::rand::SystemRandom::new();
        let mut handed_out: Vec<(Serial, u64, SignedTreeHead)> = Vec::new();
        for round in 0..5 {
            let exe = std::env::current_exe().unwrap();
            let mut child = std::process::Command::new(exe)
                .args([CRASH_CHILD, "--exact", "--ignored", "--nocapture"])
                .env(CRASH_DIR_ENV, &dir.0)
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::null())
                .spawn()
                .unwrap();
            let mut stdout = std::io::BufReader::new(child.stdout.take().unwrap());
            let want = 10 + random_below(&rng, 30) as usize;
            let before = handed_out.len();
            let mut line = String::new();
            while handed_out.len() - before < want {
                line.clear();
                let n = stdout.read_line(&mut line).unwrap();
                assert!(
                    n > 0,
                    "round {round}: the child stopped before it was killed"
                );
                if let Some(issued) = parse_issued(line.trim_end()) {
                    handed_out.push(issued);
                }
            }
            // Kill at a random point of the next issue (signing, the log
            // transaction or its fsync).
            std::thread::sleep(Duration::from_micros(u64::from(random_below(&rng, 3000))));
            child.kill().unwrap(); // SIGKILL
            child.wait().unwrap();
            // Lines written before the kill but not yet read were handed
            // out too; a line cut short was not.
            loop {
                line.clear();
                if stdout.read_line(&mut line).unwrap() == 0 {
                    break;
                }
                if line.ends_with('\n')
                    && let Some(issued) = parse_issued(line.trim_end())
                {
                    handed_out.push(issued);
                }
            }

            let mut authority = open(&dir.0, SystemTime::now()).unwrap();
            let stored_before = authority.log().stored_sths().unwrap();
            // A tree head signed after the restart.
            let after = authority
                .issue(request("after.example"), SystemTime::now())
                .unwrap()
                .sth;
            let log = authority.log();
            let key = log.public_key();
            verify_sth(&after, &key, LogKeyAlgorithm::Ed25519).unwrap();
            for (serial, index, sth) in &handed_out {
                assert!(stored_before.contains(sth), "round {round}: {serial}'s STH");
                let record = authority.certificate(serial).unwrap().unwrap_or_else(|| {
                    panic!("round {round}: {serial} was handed out but is not in the registry")
                });
                assert_eq!(record.leaf_index, *index);
                let leaf = encode_x509_leaf(record.logged_at_ms, &record.cert_der, &[]).unwrap();
                let hash = leaf_hash(&leaf);
                let proof = log.inclusion_proof_by_hash(&hash, after.tree_size).unwrap();
                assert_eq!(proof.leaf_index, *index);
                verify_inclusion(
                    &hash,
                    *index,
                    after.tree_size,
                    &proof.audit_path,
                    &after.root_hash,
                )
                .unwrap();
            }
            for old in &stored_before {
                verify_sth(old, &key, LogKeyAlgorithm::Ed25519).unwrap();
                let proof = log
                    .consistency_proof(old.tree_size, after.tree_size)
                    .unwrap();
                verify_consistency(
                    old.tree_size,
                    after.tree_size,
                    &old.root_hash,
                    &after.root_hash,
                    &proof,
                )
                .unwrap_or_else(|e| {
                    panic!(
                        "round {round}: the head of size {} is not consistent with {}: {e}",
                        old.tree_size, after.tree_size
                    )
                });
            }
        }
        assert!(handed_out.len() >= 5 * 10);
    }

    /// Build a small authority, change its store with `tamper`, and expect
    /// the next open to refuse it with a registry error containing `expect`.
    fn assert_refused(
        name: &str,
        expect: &str,
        tamper: impl FnOnce(&redb::WriteTransaction, &[LoggedCertificate]),
    ) {
        let dir = TempDir::new(name);
        let now = SystemTime::now();
        let mut authority = open(&dir.0, now).unwrap();
        let mut issued: Vec<_> = ["a.example", "b.example", "c.example"]
            .into_iter()
            .map(|n| authority.issue(request(n), now).unwrap())
            .collect();
        authority
            .revoke(&issued[0].certificate.serial, now)
            .unwrap();
        // issued[3] renewed issued[2].
        let renewed = authority
            .renew(&issued[2].certificate.cert_der, now)
            .unwrap();
        issued.push(renewed);
        drop(authority);
        {
            let db = Database::create(dir.0.join(STORE_FILE)).unwrap();
            let txn = db.begin_write().unwrap();
            tamper(&txn, &issued);
            txn.commit().unwrap();
        }
        let err = match open(&dir.0, now) {
            Ok(_) => panic!("{name}: the tampered store was accepted"),
            Err(e) => e,
        };
        assert!(
            matches!(
                &err,
                AuthorityError::Registry { path, source: RegistryError::Corrupt(detail) }
                    if path.ends_with(STORE_FILE) && detail.contains(expect)
            ),
            "{name}: {err}"
        );
    }

    #[test]
    fn a_registry_that_disagrees_with_the_log_is_refused() {
        assert_refused(
            "no-record",
            "log entry 1 has no certificate record",
            |txn, issued| {
                tamper::remove_certificate(txn, issued[1].certificate.serial);
            },
        );
        assert_refused(
            "moved-record",
            "log entry 0 is not certificate",
            |txn, issued| {
                let serial = issued[2].certificate.serial;
                let mut record =
                    registry::decode_record(serial, &tamper::raw_certificate(txn, serial)).unwrap();
                record.leaf_index = 0;
                tamper::put_raw_certificate(
                    txn,
                    serial,
                    &registry::encode_record(&record).unwrap(),
                );
            },
        );
        assert_refused(
            "past-the-log",
            "but the log holds 4 entries",
            |txn, issued| {
                let serial = issued[2].certificate.serial;
                let mut record =
                    registry::decode_record(serial, &tamper::raw_certificate(txn, serial)).unwrap();
                record.leaf_index = 7;
                tamper::put_raw_certificate(
                    txn,
                    serial,
                    &registry::encode_record(&record).unwrap(),
                );
            },
        );
        assert_refused("other-der", "holds certificate", |txn, issued| {
            // Certificate b's row under c's serial.
            let raw = tamper::raw_certificate(txn, issued[1].certificate.serial);
            tamper::put_raw_certificate(txn, issued[2].certificate.serial, &raw);
        });
        assert_refused("garbage-record", "cannot be decoded", |txn, issued| {
            tamper::put_raw_certificate(txn, issued[0].certificate.serial, b"garbage");
        });
        assert_refused("stray-revocation", "names no certificate", |txn, _| {
            let revocation = registry::encode_revocation(&Revocation {
                revoked_at_ms: 1,
                reason: None,
            });
            tamper::put_raw_revocation(txn, Serial([9; 16]), &revocation);
        });
        assert_refused("garbage-revocation", "cannot be decoded", |txn, issued| {
            tamper::put_raw_revocation(txn, issued[1].certificate.serial, b"\x01");
        });
        // A lost renewal link would let revoking issued[2] leave issued[3].
        assert_refused(
            "no-renewal-link",
            "but the renewal index does not say so",
            |txn, issued| {
                let (from, to) = (issued[2].certificate.serial, issued[3].certificate.serial);
                tamper::set_renewal_link(txn, from, to, false);
            },
        );
        assert_refused(
            "stray-renewal-link",
            "the renewal index holds links that no certificate record has",
            |txn, issued| {
                let (from, to) = (issued[0].certificate.serial, issued[1].certificate.serial);
                tamper::set_renewal_link(txn, from, to, true);
            },
        );
        // A lost name row would let a name look free while a live
        // certificate carries it.
        assert_refused(
            "no-name-row",
            "but the name index does not say so",
            |txn, issued| {
                let serial = issued[0].certificate.serial;
                let name = registry::name_key(&issued[0].certificate.dns_names[0]);
                tamper::set_name_row(txn, &name, serial, false);
            },
        );
        assert_refused(
            "stray-name-row",
            "the name index holds names that no certificate record has",
            |txn, issued| {
                tamper::set_name_row(txn, "stray.example", issued[0].certificate.serial, true);
            },
        );
    }

    #[test]
    fn a_store_from_before_the_name_index_gets_one() {
        let dir = TempDir::new("name-index");
        let now = SystemTime::now();
        let mut authority = open(&dir.0, now).unwrap();
        let a = authority.issue(request("a.example"), now).unwrap();
        let b = authority.issue(request("B.Example"), now).unwrap();
        authority.issue(request("o.example"), now).unwrap();
        drop(authority);
        {
            let db = Database::create(dir.0.join(STORE_FILE)).unwrap();
            let txn = db.begin_write().unwrap();
            tamper::drop_name_index(&txn);
            txn.commit().unwrap();
        }
        // Built on open, checked on the next; found without regard to case
        // or a trailing dot.
        drop(open(&dir.0, now).unwrap());
        let authority = open(&dir.0, now).unwrap();
        assert_eq!(
            all(&authority, CertificateFilter::Name("A.example.".into())),
            vec![a.certificate.serial]
        );
        assert_eq!(
            all(&authority, CertificateFilter::Name("b.example".into())),
            vec![b.certificate.serial]
        );
        assert!(all(&authority, CertificateFilter::Name("nobody.example".into())).is_empty());
    }

    #[test]
    fn a_store_from_before_the_renewal_index_gets_one() {
        let dir = TempDir::new("renewal-index");
        let now = SystemTime::now();
        let mut authority = open(&dir.0, now).unwrap();
        let a = authority.issue(request("a.example"), now).unwrap();
        let other = authority.issue(request("o.example"), now).unwrap();
        let b = authority.renew(&a.certificate.cert_der, now).unwrap();
        let c = authority.renew(&b.certificate.cert_der, now).unwrap();
        drop(authority);
        {
            let db = Database::create(dir.0.join(STORE_FILE)).unwrap();
            let txn = db.begin_write().unwrap();
            tamper::drop_renewal_index(&txn);
            txn.commit().unwrap();
        }

        // Built on open, checked on the next.
        drop(open(&dir.0, now).unwrap());
        let mut authority = open(&dir.0, now).unwrap();
        let serials = |records: Vec<CertificateRecord>| -> Vec<Serial> {
            sorted(records.iter().map(|r| r.serial).collect())
        };
        let (a, b, c) = (
            a.certificate.serial,
            b.certificate.serial,
            c.certificate.serial,
        );
        assert_eq!(
            serials(authority.descendants(&a, now).unwrap()),
            sorted(vec![b, c])
        );
        assert_eq!(authority.0.revoke(a, None, now, None).unwrap().len(), 2);
        assert_eq!(
            all(&authority, CertificateFilter::Revoked),
            sorted(vec![a, b, c])
        );
        authority
            .verify_chain(&other.certificate.cert_der, Usage::Server, now)
            .unwrap();
    }

    #[test]
    fn a_log_entry_without_a_record_is_refused() {
        let dir = TempDir::new("stray-leaf");
        let now = SystemTime::now();
        let mut authority = open(&dir.0, now).unwrap();
        let a = authority.issue(request("a.example"), now).unwrap();
        drop(authority);
        // Append a certificate through the log alone, as a writer that
        // skipped the registry would.
        let pkcs8 = std::fs::read(dir.0.join(LOG_KEY_FILE)).unwrap();
        let signer = LogSigner::from_pkcs8(LogKeyAlgorithm::Ed25519, &pkcs8).unwrap();
        let mut log = CtLog::open(&dir.0.join(STORE_FILE), signer).unwrap();
        let now_ms = unix_ms(now).unwrap() + 1;
        log.append_batch(&[(now_ms, a.certificate.cert_der.clone())], now_ms)
            .unwrap();
        drop(log);
        let err = match open(&dir.0, now) {
            Ok(_) => panic!("the stray log entry was accepted"),
            Err(e) => e,
        };
        assert!(
            err.to_string()
                .contains("log entry 1 has no certificate record"),
            "{err}"
        );
        assert!(err.to_string().contains(STORE_FILE), "{err}");
    }
}
