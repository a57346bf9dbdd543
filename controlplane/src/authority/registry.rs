//! The durable registry of the CA: every certificate it handed out and
//! every revocation, in two tables of the authority's redb database (the
//! same database that holds the CT log, see [`super::logged`]).
//!
//! Tables (keys are the 16 serial bytes):
//! - `ca_certificates`: serial → a certificate record ([`encode_record`]):
//!   where the certificate is in the log (leaf index and the leaf's
//!   timestamp, which together with the DER give the leaf hash), validity,
//!   usage, names, the serial it renewed, the serial it was issued on the
//!   authority of (its parent), and the DER;
//! - `ca_children`: parent serial ‖ child serial → nothing: the index of
//!   parent links, so a revocation finds what was issued on the revoked
//!   certificate's authority without a scan (see `write_revocations`);
//! - `ca_renewals`: renewed serial ‖ successor serial → nothing: the index
//!   of renewal links, so a revocation finds the renewals of the revoked
//!   certificate without a scan. Stores written before it have no such
//!   table; `init_in` builds it from the records, once;
//! - `ca_names`: name ‖ 0 ‖ serial → nothing: every name a certificate carries
//!   (lowercase, no trailing dot), so the certificates for a name are one
//!   key range, not a scan (enrollment and name checks ask on every
//!   request). Stores written before it get it from `init_in`, once;
//! - `ca_revocations`: serial → revocation time and reason
//!   ([`encode_revocation`]);
//! - `enrollment_tokens_used`: enrollment token id → its expiry (Unix
//!   seconds), written in the append transaction of the certificate the
//!   token paid for;
//! - `enrollment_tokens_paid`: enrollment token id → the serial of that
//!   certificate, written beside it (tokens spent before this table
//!   existed have no row), so a client that lost the answer can ask again.
//!
//! The writer is the control plane's state machine (`crate::machine`): a
//! certificate row (and its `ca_children` and `ca_renewals` rows) is
//! written only in the transaction that appends that certificate to the
//! CT log, so the registry and the log commit together; a revocation, with
//! those it brings, is the transaction of its own command. Rows are
//! written once and never changed or removed.
//!
//! Every value starts with a format version byte; integers are
//! big-endian; times are whole seconds (validity, as certificates hold
//! them) or milliseconds (log and revocation times) since the Unix epoch.
//! Decoders take bytes read from disk and return `None` for anything that
//! is not exactly what the encoder writes; callers report that as
//! corruption, naming the serial.

use super::ca::{Serial, Usage, same_name};
use redb::TableDefinition;
use redb::{ReadOnlyTable, ReadTransaction, WriteTransaction};
use redb::{ReadableTable, ReadableTableMetadata, TableHandle};
use std::collections::BTreeSet;
use std::net::IpAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

pub(crate) const CERTIFICATES: TableDefinition<[u8; 16], &[u8]> =
    TableDefinition::new("ca_certificates");
pub(crate) const REVOCATIONS: TableDefinition<[u8; 16], &[u8]> =
    TableDefinition::new("ca_revocations");
/// Parent serial ‖ child serial: see [`CertificateRecord::parent`]. Keys
/// sort by parent, so a parent's children are one range.
pub(crate) const CHILDREN: TableDefinition<[u8; 32], ()> = TableDefinition::new("ca_children");
/// Renewed serial ‖ successor serial: see
/// [`CertificateRecord::renewed_from`]. Keys sort by the renewed serial, so
/// a certificate's renewals are one range.
pub(crate) const RENEWALS: TableDefinition<[u8; 32], ()> = TableDefinition::new("ca_renewals");
/// Name (as [`name_key`] writes it) ‖ 0 ‖ serial ([`name_row`]): every
/// name a certificate carries (subject common name, DNS names, IP
/// addresses), so finding the certificates for a name is one key range,
/// whatever the registry holds. Plain bytes: any row a snapshot brings
/// decodes (a malformed one is caught by the open-time check).
pub(crate) const NAMES: TableDefinition<&[u8], ()> = TableDefinition::new("ca_names");
/// Enrollment token id → the token's expiry (Unix seconds): the one-time
/// tokens already spent (see `authority::enrollment`). A row is written in
/// the log's append transaction of the certificate the token paid for.
/// Rows whose expiry has passed could be pruned (an expired token is refused
/// before this table is read); they are kept, being 24 bytes each.
pub(crate) const ENROLLMENT_TOKENS: TableDefinition<[u8; 16], u64> =
    TableDefinition::new("enrollment_tokens_used");
/// Enrollment token id → the serial of the certificate it paid for.
pub(crate) const ENROLLMENT_PAID: TableDefinition<[u8; 16], [u8; 16]> =
    TableDefinition::new("enrollment_tokens_paid");

/// The format version byte of both value encodings.
const FORMAT_VERSION: u8 = 1;
/// The version of a certificate record with a parent (the field version 1
/// lacks). Records without one are still written as version 1, so a store
/// without parent links stays readable by the releases before them; one
/// with them is refused there as undecodable, not read without its links.
const FORMAT_VERSION_PARENT: u8 = 2;
/// The reason recorded for a certificate revoked because its parent was:
/// the privilege it was issued under is withdrawn (RFC 5280 §5.3.1).
pub const CASCADE_REASON: RevocationReason = RevocationReason::PrivilegeWithdrawn;
/// Stored in place of a reason code when the revocation gave none.
const NO_REASON: u8 = 0xff;

/// The most records one listing call returns.
pub const MAX_RECORDS_PER_CALL: usize = 1000;

/// Why a registry operation failed.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("storage failed: {0}")]
    Storage(#[from] redb::Error),
    #[error("{0}; restore the data directory from a backup")]
    Corrupt(String),
    /// A record the encoding cannot hold; the CA's request checks keep
    /// issued certificates far inside these limits.
    #[error("cannot store the certificate record: {0}")]
    Unencodable(&'static str),
}

redb_errors_into_storage!(RegistryError);

fn corrupt(detail: impl Into<String>) -> RegistryError {
    RegistryError::Corrupt(detail.into())
}

/// Why a certificate was revoked: the RFC 5280 §5.3.1 CRLReason codes that
/// apply to end-entity certificates of this CA.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RevocationReason {
    Unspecified = 0,
    KeyCompromise = 1,
    CaCompromise = 2,
    AffiliationChanged = 3,
    Superseded = 4,
    CessationOfOperation = 5,
    PrivilegeWithdrawn = 9,
}

impl RevocationReason {
    fn from_code(code: u8) -> Option<Self> {
        [
            Self::Unspecified,
            Self::KeyCompromise,
            Self::CaCompromise,
            Self::AffiliationChanged,
            Self::Superseded,
            Self::CessationOfOperation,
            Self::PrivilegeWithdrawn,
        ]
        .into_iter()
        .find(|r| *r as u8 == code)
    }
}

/// When and why a certificate was revoked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Revocation {
    /// Milliseconds since the Unix epoch.
    pub revoked_at_ms: u64,
    pub reason: Option<RevocationReason>,
}

/// A certificate the authority handed out, as the registry holds it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CertificateRecord {
    pub serial: Serial,
    pub cert_der: Vec<u8>,
    pub subject: String,
    pub dns_names: Vec<String>,
    pub ip_addresses: Vec<IpAddr>,
    pub usage: Usage,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
    /// The certificate this one renewed; revoking that one revokes this
    /// one (see `write_revocations`): a renewal is no way around a
    /// revocation.
    pub renewed_from: Option<Serial>,
    /// The certificate on whose authority this one was issued (a
    /// non-operator's `CERT_ISSUE`: the caller's), kept by renewals;
    /// revoking the parent revokes this one (see `write_revocations`).
    pub parent: Option<Serial>,
    /// Its entry in the CT log.
    pub leaf_index: u64,
    /// The timestamp of its log entry (ms since the Unix epoch).
    pub logged_at_ms: u64,
    /// Joined from `ca_revocations` when read; not part of the stored row.
    pub revocation: Option<Revocation>,
}

/// Which certificates a listing returns.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CertificateFilter {
    All,
    /// Those whose subject common name or a DNS name is this name (as
    /// [`same_name`] compares: case and a trailing dot do not matter), or
    /// an IP address in its usual text form. Read through the name index
    /// ([`NAMES`]): its cost does not grow with the registry.
    Name(String),
    /// Those within their validity period at this time and not revoked.
    ValidAt(SystemTime),
    Revoked,
}

impl CertificateFilter {
    pub fn matches(&self, record: &CertificateRecord) -> bool {
        match self {
            Self::All => true,
            Self::Name(name) => {
                same_name(&record.subject, name)
                    || record.dns_names.iter().any(|d| same_name(d, name))
                    || record
                        .ip_addresses
                        .iter()
                        .any(|ip| name_key(&ip.to_string()) == name_key(name))
            }
            Self::ValidAt(at) => {
                record.revocation.is_none() && record.not_before <= *at && *at <= record.not_after
            }
            Self::Revoked => record.revocation.is_some(),
        }
    }
}

/// A link a certificate record holds to an earlier certificate, each kept
/// in an index table (earlier serial ‖ later serial) so that a revocation
/// finds what follows the revoked certificate without a scan.
#[derive(Clone, Copy)]
enum Link {
    /// [`CertificateRecord::parent`], in `ca_children`.
    Parent,
    /// [`CertificateRecord::renewed_from`], in `ca_renewals`.
    Renewal,
}

impl Link {
    const ALL: [Self; 2] = [Self::Parent, Self::Renewal];

    fn index(self) -> TableDefinition<'static, [u8; 32], ()> {
        match self {
            Self::Parent => CHILDREN,
            Self::Renewal => RENEWALS,
        }
    }

    /// The earlier certificate `record` links to.
    fn target(self, record: &CertificateRecord) -> Option<Serial> {
        match self {
            Self::Parent => record.parent,
            Self::Renewal => record.renewed_from,
        }
    }

    /// Why `record` links to `target`, for messages.
    fn describe(self, record: &CertificateRecord, target: Serial) -> String {
        match self {
            Self::Parent => format!(
                "certificate {} was issued on the authority of {target}, but the parent index \
                 does not say so",
                record.serial
            ),
            Self::Renewal => format!(
                "certificate {} renewed {target}, but the renewal index does not say so",
                record.serial
            ),
        }
    }

    fn index_name(self) -> &'static str {
        match self {
            Self::Parent => "parent",
            Self::Renewal => "renewal",
        }
    }
}

/// `record`, encoded as [`insert_certificate`] writes it: what a command
/// checks before it writes anything (an unencodable record is a refusal).
pub(crate) struct EncodedRecord<'a> {
    record: &'a CertificateRecord,
    bytes: Vec<u8>,
}

pub(crate) fn encoded(record: &CertificateRecord) -> Result<EncodedRecord<'_>, RegistryError> {
    Ok(EncodedRecord {
        bytes: encode_record(record)?,
        record,
    })
}

/// Write `record`'s row in `txn` (the CT log's append transaction).
pub(crate) fn insert_certificate(
    txn: &WriteTransaction,
    encoded: &EncodedRecord,
) -> Result<(), RegistryError> {
    let record = encoded.record;
    let mut table = txn.open_table(CERTIFICATES)?;
    if table.get(record.serial.0)?.is_some() {
        // The CA draws serials it has not issued; a row already there means
        // the registry and the CA's memory disagree.
        return Err(corrupt(format!(
            "certificate {} is already in the registry",
            record.serial
        )));
    }
    table.insert(record.serial.0, encoded.bytes.as_slice())?;
    let mut names = txn.open_table(NAMES)?;
    for name in index_names_of(record) {
        names.insert(name_row(&name, record.serial).as_slice(), ())?;
    }
    for link in Link::ALL {
        if let Some(target) = link.target(record) {
            txn.open_table(link.index())?
                .insert(link_key(target, record.serial), ())?;
        }
    }
    Ok(())
}

/// How a name is written in [`NAMES`]: lowercase, without a trailing dot
/// (what [`same_name`] ignores).
pub(crate) fn name_key(name: &str) -> String {
    name.strip_suffix('.').unwrap_or(name).to_ascii_lowercase()
}

/// The [`NAMES`] row of `name` (a [`name_key`]) for `serial`. Names hold
/// no 0 byte, so one name's rows are one range that no other name's meet.
fn name_row(name: &str, serial: Serial) -> Vec<u8> {
    let mut row = Vec::with_capacity(name.len() + 17);
    row.extend_from_slice(name.as_bytes());
    row.push(0);
    row.extend_from_slice(&serial.0);
    row
}

/// The [`NAMES`] keys of `record`'s names, each once.
pub(crate) fn index_names_of(record: &CertificateRecord) -> BTreeSet<String> {
    std::iter::once(name_key(&record.subject))
        .chain(record.dns_names.iter().map(|d| name_key(d)))
        .chain(
            record
                .ip_addresses
                .iter()
                .map(|ip| name_key(&ip.to_string())),
        )
        .filter(|name| !name.is_empty())
        .collect()
}

/// The key of a [`Link`] index row: `from`, then `to`.
fn link_key(from: Serial, to: Serial) -> [u8; 32] {
    let mut key = [0u8; 32];
    key[..16].copy_from_slice(&from.0);
    key[16..].copy_from_slice(&to.0);
    key
}

/// The certificates `index` links to `from` (one key range).
fn linked(
    index: &impl ReadableTable<[u8; 32], ()>,
    from: Serial,
) -> Result<Vec<Serial>, RegistryError> {
    let first = link_key(from, Serial([0; 16]));
    let last = link_key(from, Serial([0xff; 16]));
    let mut out = Vec::new();
    for row in index.range::<[u8; 32]>(first..=last)? {
        let key = row?.0.value();
        let mut to = Serial([0; 16]);
        to.0.copy_from_slice(&key[16..]);
        out.push(to);
    }
    Ok(out)
}

/// Record enrollment token `id` (valid until `expires_at_s`) as spent on
/// certificate `serial`, in `txn` (the log's append transaction of that
/// certificate). The caller checked it was not ([`token_spent_in`]).
pub(crate) fn spend_token(
    txn: &WriteTransaction,
    id: [u8; 16],
    expires_at_s: u64,
    serial: Serial,
) -> Result<(), RegistryError> {
    txn.open_table(ENROLLMENT_TOKENS)?
        .insert(id, expires_at_s)?;
    txn.open_table(ENROLLMENT_PAID)?.insert(id, serial.0)?;
    Ok(())
}

/// Whether enrollment token `id` was spent, as `txn` sees it.
pub(crate) fn token_spent_in(txn: &WriteTransaction, id: [u8; 16]) -> Result<bool, RegistryError> {
    Ok(txn.open_table(ENROLLMENT_TOKENS)?.get(id)?.is_some())
}

/// Whether `serial` is revoked, as `txn` sees it.
pub(crate) fn is_revoked_in(txn: &WriteTransaction, serial: Serial) -> Result<bool, RegistryError> {
    Ok(txn.open_table(REVOCATIONS)?.get(serial.0)?.is_some())
}

/// Whether enrollment token `id` was spent.
pub(crate) fn token_spent(txn: &ReadTransaction, id: [u8; 16]) -> Result<bool, RegistryError> {
    Ok(txn.open_table(ENROLLMENT_TOKENS)?.get(id)?.is_some())
}

/// The certificate enrollment token `id` paid for; `None` when it was not
/// spent, or was spent before the registry kept that.
pub(crate) fn token_certificate(
    txn: &ReadTransaction,
    id: [u8; 16],
) -> Result<Option<Serial>, RegistryError> {
    let serial = txn
        .open_table(ENROLLMENT_PAID)?
        .get(id)?
        .map(|s| Serial(s.value()));
    Ok(serial)
}

/// Write a revocation of `serial` in `txn`, with the revocations it
/// brings: every certificate [`descendants`] returns, at the same time,
/// reason [`CASCADE_REASON`]. The certificate must be in the registry and
/// not yet revoked (the caller checked both). Returns the serials revoked
/// with it.
pub(crate) fn write_revocations(
    txn: &WriteTransaction,
    serial: Serial,
    revocation: &Revocation,
    now: SystemTime,
) -> Result<Vec<Serial>, RegistryError> {
    let certificates = txn.open_table(CERTIFICATES)?;
    let children = txn.open_table(CHILDREN)?;
    let renewals = txn.open_table(RENEWALS)?;
    let mut revocations = txn.open_table(REVOCATIONS)?;
    if certificates.get(serial.0)?.is_none() {
        return Err(corrupt(format!(
            "certificate {serial} is known to the CA but not in the registry"
        )));
    }
    if revocations.get(serial.0)?.is_some() {
        return Err(corrupt(format!(
            "certificate {serial} is revoked in the registry but not in the CA"
        )));
    }
    let links = Links {
        certificates: &certificates,
        children: &children,
        renewals: &renewals,
        revocations: &revocations,
    };
    let cascade: Vec<Serial> = links
        .descendants(serial, now)?
        .iter()
        .map(|r| r.serial)
        .collect();
    revocations.insert(serial.0, encode_revocation(revocation).as_slice())?;
    let withdrawn = encode_revocation(&Revocation {
        revoked_at_ms: revocation.revoked_at_ms,
        reason: Some(CASCADE_REASON),
    });
    for child in &cascade {
        revocations.insert(child.0, withdrawn.as_slice())?;
    }
    Ok(cascade)
}

/// What a revocation of `serial` at `now` revokes with it: every
/// certificate that renewed it, every certificate issued on its authority
/// or on that of a certificate it renewed (a renewal carries its
/// predecessor's authority), and so on down the renewal and parent links,
/// that is neither revoked nor expired. Revoked and expired ones are passed
/// through, not revoked again: what follows them still goes. The
/// certificates `serial` renewed are not revoked, only what was issued on
/// their authority.
pub(crate) fn descendants(
    txn: &ReadTransaction,
    serial: Serial,
    now: SystemTime,
) -> Result<Vec<CertificateRecord>, RegistryError> {
    Links {
        certificates: &txn.open_table(CERTIFICATES)?,
        children: &txn.open_table(CHILDREN)?,
        renewals: &txn.open_table(RENEWALS)?,
        revocations: &txn.open_table(REVOCATIONS)?,
    }
    .descendants(serial, now)
}

/// The tables [`descendants`] walks, in a read or a write transaction.
struct Links<'a, C, L, R> {
    certificates: &'a C,
    children: &'a L,
    renewals: &'a L,
    revocations: &'a R,
}

impl<C, L, R> Links<'_, C, L, R>
where
    C: ReadableTable<[u8; 16], &'static [u8]>,
    L: ReadableTable<[u8; 32], ()>,
    R: ReadableTable<[u8; 16], &'static [u8]>,
{
    /// [`descendants`]. Cost: one record read and one `ca_children` range
    /// lookup per renewal behind `serial`, then two range lookups (children
    /// and renewals) and one record read per certificate after it: O((r +
    /// d) log n) for r renewals behind and d certificates after, among n,
    /// whatever else the registry holds. Each certificate is visited once.
    fn descendants(
        &self,
        serial: Serial,
        now: SystemTime,
    ) -> Result<Vec<CertificateRecord>, RegistryError> {
        let mut seen = BTreeSet::from([serial]);
        let mut predecessors = Vec::new();
        let mut renewed_from = self.record(serial)?.renewed_from;
        while let Some(predecessor) = renewed_from.filter(|p| seen.insert(*p)) {
            predecessors.push(predecessor);
            renewed_from = self.record(predecessor)?.renewed_from;
        }
        // Of a predecessor, only what was issued on its authority: it and
        // its other renewals stay.
        let mut pending = Vec::new();
        for predecessor in predecessors {
            pending.extend(linked(self.children, predecessor)?);
        }
        // Of `serial` and all that goes with it: what was issued on it and
        // what renewed it.
        pending.extend(linked(self.children, serial)?);
        pending.extend(linked(self.renewals, serial)?);
        let mut out = Vec::new();
        while let Some(next) = pending.pop() {
            if !seen.insert(next) {
                continue;
            }
            pending.extend(linked(self.children, next)?);
            pending.extend(linked(self.renewals, next)?);
            let record = self.record(next)?;
            if self.revocations.get(next.0)?.is_none() && record.not_after >= now {
                out.push(record);
            }
        }
        Ok(out)
    }

    fn record(&self, serial: Serial) -> Result<CertificateRecord, RegistryError> {
        let value = self.certificates.get(serial.0)?.ok_or_else(|| {
            corrupt(format!(
                "certificate {serial} is linked in the registry but has no record"
            ))
        })?;
        decode_record(serial, value.value()).ok_or_else(|| {
            corrupt(format!(
                "the record of certificate {serial} cannot be decoded"
            ))
        })
    }
}

/// Create the tables in `txn` if missing, so readers can open them; in a
/// store written before the renewal index, build it from the records.
pub(crate) fn init_in(txn: &WriteTransaction) -> Result<(), RegistryError> {
    let renewals_indexed = txn.list_tables()?.any(|t| t.name() == RENEWALS.name());
    let names_indexed = txn.list_tables()?.any(|t| t.name() == NAMES.name());
    txn.open_table(CERTIFICATES)?;
    txn.open_table(NAMES)?;
    txn.open_table(REVOCATIONS)?;
    txn.open_table(CHILDREN)?;
    txn.open_table(RENEWALS)?;
    txn.open_table(ENROLLMENT_TOKENS)?;
    txn.open_table(ENROLLMENT_PAID)?;
    if !renewals_indexed {
        index_renewals(txn)?;
    }
    if !names_indexed {
        index_all_names(txn)?;
    }
    Ok(())
}

/// Write the [`NAMES`] rows of every record: once, in the transaction that
/// creates the table (a store written before the name index).
fn index_all_names(txn: &WriteTransaction) -> Result<(), RegistryError> {
    let mut names = txn.open_table(NAMES)?;
    each_record(txn, |record| {
        for name in index_names_of(record) {
            names.insert(name_row(&name, record.serial).as_slice(), ())?;
        }
        Ok(())
    })
}

/// Write the `ca_renewals` row of every record that renewed another: once,
/// in the transaction that creates the table. One pass over the records,
/// as [`load_all`] makes on every open.
fn index_renewals(txn: &WriteTransaction) -> Result<(), RegistryError> {
    let mut renewals = txn.open_table(RENEWALS)?;
    each_record(txn, |record| {
        if let Some(renewed) = record.renewed_from {
            renewals.insert(link_key(renewed, record.serial), ())?;
        }
        Ok(())
    })
}

/// Call `visit` with every certificate record in `txn` (an index being
/// built from them).
fn each_record(
    txn: &WriteTransaction,
    mut visit: impl FnMut(&CertificateRecord) -> Result<(), RegistryError>,
) -> Result<(), RegistryError> {
    let certificates = txn.open_table(CERTIFICATES)?;
    for row in certificates.iter()? {
        let (serial, value) = row?;
        let serial = Serial(serial.value());
        let record = decode_record(serial, value.value()).ok_or_else(|| {
            corrupt(format!(
                "the record of certificate {serial} cannot be decoded"
            ))
        })?;
        visit(&record)?;
    }
    Ok(())
}

/// Every certificate record (with its revocation joined), in serial order.
pub(crate) fn load_all(txn: &ReadTransaction) -> Result<Vec<CertificateRecord>, RegistryError> {
    let certificates = txn.open_table(CERTIFICATES)?;
    let revocations = txn.open_table(REVOCATIONS)?;
    let mut out = Vec::new();
    for row in certificates.iter()? {
        let (serial, value) = row?;
        out.push(decode_row(
            Serial(serial.value()),
            value.value(),
            &revocations,
        )?);
    }
    // Every revocation names a certificate: revoked rows were joined above.
    let revoked = out.iter().filter(|r| r.revocation.is_some()).count() as u64;
    let stored = revocations.len()?;
    if stored != revoked {
        for row in revocations.iter()? {
            let (serial, _) = row?;
            if certificates.get(serial.value())?.is_none() {
                return Err(corrupt(format!(
                    "revocation of {} names no certificate in the registry",
                    Serial(serial.value())
                )));
            }
        }
    }
    for link in Link::ALL {
        check_links(link, &txn.open_table(link.index())?, &out)?;
    }
    check_names(&txn.open_table(NAMES)?, &out)?;
    Ok(out)
}

/// The name index holds exactly the records' names: a missing row would
/// let a name look free while a live certificate carries it.
fn check_names(
    index: &ReadOnlyTable<&[u8], ()>,
    records: &[CertificateRecord],
) -> Result<(), RegistryError> {
    let mut rows = 0u64;
    for record in records {
        for name in index_names_of(record) {
            rows += 1;
            if index
                .get(name_row(&name, record.serial).as_slice())?
                .is_none()
            {
                return Err(corrupt(format!(
                    "certificate {} carries {name:?}, but the name index does not say so",
                    record.serial
                )));
            }
        }
    }
    if index.len()? != rows {
        return Err(corrupt(
            "the name index holds names that no certificate record has".to_string(),
        ));
    }
    Ok(())
}

/// The index of `link` holds exactly the records' links: a missing row
/// would let a revocation miss what was issued on the revoked
/// certificate's authority, or what renewed it.
fn check_links(
    link: Link,
    index: &ReadOnlyTable<[u8; 32], ()>,
    records: &[CertificateRecord],
) -> Result<(), RegistryError> {
    let mut linked = 0u64;
    for record in records {
        let Some(target) = link.target(record) else {
            continue;
        };
        linked += 1;
        if index.get(link_key(target, record.serial))?.is_none() {
            return Err(corrupt(link.describe(record, target)));
        }
    }
    if index.len()? != linked {
        return Err(corrupt(format!(
            "the {} index holds links that no certificate record has",
            link.index_name()
        )));
    }
    Ok(())
}

/// The record of `serial`, if it was issued.
pub(crate) fn get(
    txn: &ReadTransaction,
    serial: Serial,
) -> Result<Option<CertificateRecord>, RegistryError> {
    let certificates = txn.open_table(CERTIFICATES)?;
    let revocations = txn.open_table(REVOCATIONS)?;
    let Some(value) = certificates.get(serial.0)? else {
        return Ok(None);
    };
    decode_row(serial, value.value(), &revocations).map(Some)
}

/// Up to [`MAX_RECORDS_PER_CALL`] records matching `filter` with serials
/// after `after`, in serial order. Fewer than the maximum means there are
/// no more; otherwise ask again after the last serial returned.
pub(crate) fn list(
    txn: &ReadTransaction,
    filter: &CertificateFilter,
    after: Option<Serial>,
) -> Result<Vec<CertificateRecord>, RegistryError> {
    let certificates = txn.open_table(CERTIFICATES)?;
    let revocations = txn.open_table(REVOCATIONS)?;
    let range = match after {
        Some(after) => (
            std::ops::Bound::Excluded(after.0),
            std::ops::Bound::Unbounded,
        ),
        None => (std::ops::Bound::Unbounded, std::ops::Bound::Unbounded),
    };
    let mut out = Vec::new();
    if let CertificateFilter::Name(name) = filter {
        let names = txn.open_table(NAMES)?;
        for serial in named(&names, &name_key(name), after, MAX_RECORDS_PER_CALL)? {
            let record = indexed_record(&certificates, &revocations, serial)?;
            if filter.matches(&record) {
                out.push(record);
            }
        }
        return Ok(out);
    }
    // Revocations are few: list those from their own table.
    let keys = if *filter == CertificateFilter::Revoked {
        &revocations
    } else {
        &certificates
    };
    for row in keys.range::<[u8; 16]>(range)? {
        if out.len() == MAX_RECORDS_PER_CALL {
            break;
        }
        let serial = Serial(row?.0.value());
        let value = certificates.get(serial.0)?.ok_or_else(|| {
            corrupt(format!(
                "revocation of {serial} names no certificate in the registry"
            ))
        })?;
        let record = decode_row(serial, value.value(), &revocations)?;
        if filter.matches(&record) {
            out.push(record);
        }
    }
    Ok(out)
}

/// Up to `most` serials of the certificates carrying `key` (a
/// [`name_key`]) in [`NAMES`], after `after`, in serial order.
fn named(
    names: &impl ReadableTable<&'static [u8], ()>,
    key: &str,
    after: Option<Serial>,
    most: usize,
) -> Result<Vec<Serial>, RegistryError> {
    let first = match after {
        Some(after) => std::ops::Bound::Excluded(name_row(key, after)),
        None => std::ops::Bound::Included(name_row(key, Serial([0; 16]))),
    };
    let last = std::ops::Bound::Included(name_row(key, Serial([0xff; 16])));
    let (first, last) = (
        first.as_ref().map(Vec::as_slice),
        last.as_ref().map(Vec::as_slice),
    );
    let mut out = Vec::new();
    for row in names.range::<&[u8]>((first, last))? {
        if out.len() == most {
            break;
        }
        let row = row?.0;
        let Some(serial) = row
            .value()
            .strip_prefix(key.as_bytes())
            .and_then(|rest| rest.strip_prefix(&[0]))
            .and_then(|rest| <[u8; 16]>::try_from(rest).ok())
        else {
            return Err(corrupt(format!("a malformed name index row for {key:?}")));
        };
        out.push(Serial(serial));
    }
    Ok(out)
}

/// The record of `serial`, which the name index names.
fn indexed_record(
    certificates: &impl ReadableTable<[u8; 16], &'static [u8]>,
    revocations: &impl ReadableTable<[u8; 16], &'static [u8]>,
    serial: Serial,
) -> Result<CertificateRecord, RegistryError> {
    let value = certificates.get(serial.0)?.ok_or_else(|| {
        corrupt(format!(
            "the name index names certificate {serial}, which is not in the registry"
        ))
    })?;
    decode_row(serial, value.value(), revocations)
}

/// The certificates carrying any of `record`'s names (as the name index
/// writes them), revocations joined, as `txn` sees them: what a command
/// is checked against when it is applied. Each certificate once.
pub(crate) fn sharing_names_in(
    txn: &WriteTransaction,
    record: &CertificateRecord,
) -> Result<Vec<CertificateRecord>, RegistryError> {
    let names = txn.open_table(NAMES)?;
    let certificates = txn.open_table(CERTIFICATES)?;
    let revocations = txn.open_table(REVOCATIONS)?;
    let mut seen = BTreeSet::new();
    let mut out = Vec::new();
    for key in index_names_of(record) {
        for serial in named(&names, &key, None, usize::MAX)? {
            if seen.insert(serial.0) {
                out.push(indexed_record(&certificates, &revocations, serial)?);
            }
        }
    }
    Ok(out)
}

fn decode_row(
    serial: Serial,
    value: &[u8],
    revocations: &impl ReadableTable<[u8; 16], &'static [u8]>,
) -> Result<CertificateRecord, RegistryError> {
    let mut record = decode_record(serial, value).ok_or_else(|| {
        corrupt(format!(
            "the record of certificate {serial} cannot be decoded"
        ))
    })?;
    if let Some(v) = revocations.get(serial.0)? {
        record.revocation = Some(decode_revocation(v.value()).ok_or_else(|| {
            corrupt(format!(
                "the revocation of certificate {serial} cannot be decoded"
            ))
        })?);
    }
    Ok(record)
}

fn unix_s(t: SystemTime, what: &'static str) -> Result<u64, RegistryError> {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .map_err(|_| RegistryError::Unencodable(what))
}

fn usage_tag(usage: Usage) -> u8 {
    match usage {
        Usage::Server => 1,
        Usage::Client => 2,
        Usage::Node => 3,
    }
}

fn put_str(out: &mut Vec<u8>, s: &str) -> Result<(), RegistryError> {
    let len = u16::try_from(s.len())
        .map_err(|_| RegistryError::Unencodable("a name is longer than 65535 bytes"))?;
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(s.as_bytes());
    Ok(())
}

/// The stored encoding of a certificate record: version (1, or 2 with a
/// parent), leaf index (u64), log timestamp ms (u64), not_before s (u64),
/// not_after s (u64), usage (1 server, 2 client), renewed-from flag (0 or
/// 1, then 16 serial bytes if 1), in version 2 the parent's 16 serial
/// bytes, subject (u16 length + UTF-8), DNS names (u16 count, each u16
/// length + UTF-8), IP addresses (u16 count, each a length byte of 4 or
/// 16 and the address), DER (u32 length + bytes). The revocation is not
/// part of it.
pub fn encode_record(record: &CertificateRecord) -> Result<Vec<u8>, RegistryError> {
    let mut out = Vec::with_capacity(144 + record.cert_der.len());
    out.push(match record.parent {
        Some(_) => FORMAT_VERSION_PARENT,
        None => FORMAT_VERSION,
    });
    out.extend_from_slice(&record.leaf_index.to_be_bytes());
    out.extend_from_slice(&record.logged_at_ms.to_be_bytes());
    out.extend_from_slice(&unix_s(record.not_before, "not_before is before 1970")?.to_be_bytes());
    out.extend_from_slice(&unix_s(record.not_after, "not_after is before 1970")?.to_be_bytes());
    out.push(usage_tag(record.usage));
    match record.renewed_from {
        Some(serial) => {
            out.push(1);
            out.extend_from_slice(&serial.0);
        }
        None => out.push(0),
    }
    if let Some(parent) = record.parent {
        out.extend_from_slice(&parent.0);
    }
    put_str(&mut out, &record.subject)?;
    let count = |n: usize| {
        u16::try_from(n).map_err(|_| RegistryError::Unencodable("more than 65535 names"))
    };
    out.extend_from_slice(&count(record.dns_names.len())?.to_be_bytes());
    for name in &record.dns_names {
        put_str(&mut out, name)?;
    }
    out.extend_from_slice(&count(record.ip_addresses.len())?.to_be_bytes());
    for ip in &record.ip_addresses {
        match ip {
            IpAddr::V4(v4) => {
                out.push(4);
                out.extend_from_slice(&v4.octets());
            }
            IpAddr::V6(v6) => {
                out.push(16);
                out.extend_from_slice(&v6.octets());
            }
        }
    }
    let der_len = u32::try_from(record.cert_der.len())
        .map_err(|_| RegistryError::Unencodable("the certificate is longer than 4 GiB"))?;
    out.extend_from_slice(&der_len.to_be_bytes());
    out.extend_from_slice(&record.cert_der);
    Ok(out)
}

/// A cursor over stored bytes; every read checks the length.
/// A cursor over bytes read back: each read takes its bytes or fails.
pub(crate) struct Reader<'a>(pub(crate) &'a [u8]);

impl<'a> Reader<'a> {
    pub(crate) fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Some(head)
    }

    pub(crate) fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }

    pub(crate) fn u16(&mut self) -> Option<u16> {
        self.take(2)?.try_into().ok().map(u16::from_be_bytes)
    }

    pub(crate) fn u32(&mut self) -> Option<u32> {
        self.take(4)?.try_into().ok().map(u32::from_be_bytes)
    }

    pub(crate) fn u64(&mut self) -> Option<u64> {
        self.take(8)?.try_into().ok().map(u64::from_be_bytes)
    }

    pub(crate) fn serial(&mut self) -> Option<Serial> {
        self.take(16)?.try_into().ok().map(Serial)
    }

    pub(crate) fn string(&mut self) -> Option<String> {
        let len = usize::from(self.u16()?);
        String::from_utf8(self.take(len)?.to_vec()).ok()
    }

    pub(crate) fn time_s(&mut self) -> Option<SystemTime> {
        UNIX_EPOCH.checked_add(Duration::from_secs(self.u64()?))
    }
}

/// Decode [`encode_record`]'s output exactly; `None` for anything else.
pub fn decode_record(serial: Serial, bytes: &[u8]) -> Option<CertificateRecord> {
    let mut r = Reader(bytes);
    let version = r.u8()?;
    if version != FORMAT_VERSION && version != FORMAT_VERSION_PARENT {
        return None;
    }
    let leaf_index = r.u64()?;
    let logged_at_ms = r.u64()?;
    let not_before = r.time_s()?;
    let not_after = r.time_s()?;
    let usage = match r.u8()? {
        1 => Usage::Server,
        2 => Usage::Client,
        3 => Usage::Node,
        _ => return None,
    };
    let renewed_from = match r.u8()? {
        0 => None,
        1 => Some(r.serial()?),
        _ => return None,
    };
    let parent = match version {
        FORMAT_VERSION_PARENT => Some(r.serial()?),
        _ => None,
    };
    let subject = r.string()?;
    let dns_names = (0..r.u16()?)
        .map(|_| r.string())
        .collect::<Option<Vec<_>>>()?;
    let ip_addresses = (0..r.u16()?)
        .map(|_| match r.u8()? {
            4 => <[u8; 4]>::try_from(r.take(4)?).ok().map(IpAddr::from),
            16 => <[u8; 16]>::try_from(r.take(16)?).ok().map(IpAddr::from),
            _ => None,
        })
        .collect::<Option<Vec<_>>>()?;
    let der_len = usize::try_from(r.u32()?).ok()?;
    let cert_der = r.take(der_len)?.to_vec();
    if !r.0.is_empty() {
        return None;
    }
    Some(CertificateRecord {
        serial,
        cert_der,
        subject,
        dns_names,
        ip_addresses,
        usage,
        not_before,
        not_after,
        renewed_from,
        parent,
        leaf_index,
        logged_at_ms,
        revocation: None,
    })
}

/// The stored encoding of a revocation: version (1), time ms (u64), reason
/// (the RFC 5280 code, or 0xff for none).
pub fn encode_revocation(revocation: &Revocation) -> Vec<u8> {
    let mut out = Vec::with_capacity(10);
    out.push(FORMAT_VERSION);
    out.extend_from_slice(&revocation.revoked_at_ms.to_be_bytes());
    out.push(revocation.reason.map_or(NO_REASON, |r| r as u8));
    out
}

/// Decode [`encode_revocation`]'s output exactly; `None` for anything else.
pub fn decode_revocation(bytes: &[u8]) -> Option<Revocation> {
    let mut r = Reader(bytes);
    if r.u8()? != FORMAT_VERSION {
        return None;
    }
    let revoked_at_ms = r.u64()?;
    let reason = match r.u8()? {
        NO_REASON => None,
        code => Some(RevocationReason::from_code(code)?),
    };
    if !r.0.is_empty() {
        return None;
    }
    Some(Revocation {
        revoked_at_ms,
        reason,
    })
}

#[cfg(test)]
pub(crate) mod tamper {
    //! Raw access for tests that damage the registry on purpose.
    use super::*;

    /// Remove a certificate's row and its name index rows (the registry
    /// stays consistent with itself, not with the log).
    pub(crate) fn remove_certificate(txn: &WriteTransaction, serial: Serial) {
        let raw = txn
            .open_table(CERTIFICATES)
            .unwrap()
            .remove(serial.0)
            .unwrap()
            .unwrap()
            .value()
            .to_vec();
        let record = decode_record(serial, &raw).unwrap();
        let mut names = txn.open_table(NAMES).unwrap();
        for name in index_names_of(&record) {
            names.remove(name_row(&name, serial).as_slice()).unwrap();
        }
    }

    /// Put `value` as `serial`'s row, the name index following it where
    /// the rows decode (the registry stays consistent with itself).
    pub(crate) fn put_raw_certificate(txn: &WriteTransaction, serial: Serial, value: &[u8]) {
        let old = txn
            .open_table(CERTIFICATES)
            .unwrap()
            .insert(serial.0, value)
            .unwrap()
            .map(|old| old.value().to_vec());
        let mut names = txn.open_table(NAMES).unwrap();
        if let Some(old) = old.and_then(|old| decode_record(serial, &old)) {
            for name in index_names_of(&old) {
                names.remove(name_row(&name, serial).as_slice()).unwrap();
            }
        }
        if let Some(new) = decode_record(serial, value) {
            for name in index_names_of(&new) {
                names
                    .insert(name_row(&name, serial).as_slice(), ())
                    .unwrap();
            }
        }
    }

    pub(crate) fn raw_certificate(txn: &WriteTransaction, serial: Serial) -> Vec<u8> {
        txn.open_table(CERTIFICATES)
            .unwrap()
            .get(serial.0)
            .unwrap()
            .unwrap()
            .value()
            .to_vec()
    }

    pub(crate) fn put_raw_revocation(txn: &WriteTransaction, serial: Serial, value: &[u8]) {
        txn.open_table(REVOCATIONS)
            .unwrap()
            .insert(serial.0, value)
            .unwrap();
    }

    /// Add (`true`) or remove the `ca_renewals` row "`to` renewed `from`".
    pub(crate) fn set_renewal_link(txn: &WriteTransaction, from: Serial, to: Serial, on: bool) {
        let mut table = txn.open_table(RENEWALS).unwrap();
        if on {
            table.insert(link_key(from, to), ()).unwrap();
        } else {
            assert!(table.remove(link_key(from, to)).unwrap().is_some());
        }
    }

    /// As a store written before the renewal index.
    pub(crate) fn drop_renewal_index(txn: &WriteTransaction) {
        assert!(txn.delete_table(RENEWALS).unwrap());
    }

    /// As a store written before the name index.
    pub(crate) fn drop_name_index(txn: &WriteTransaction) {
        assert!(txn.delete_table(NAMES).unwrap());
    }

    /// Add (`true`) or remove the name index row of `name` for `serial`.
    pub(crate) fn set_name_row(txn: &WriteTransaction, name: &str, serial: Serial, on: bool) {
        let mut table = txn.open_table(NAMES).unwrap();
        if on {
            table.insert(name_row(name, serial).as_slice(), ()).unwrap();
        } else {
            assert!(
                table
                    .remove(name_row(name, serial).as_slice())
                    .unwrap()
                    .is_some()
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> CertificateRecord {
        CertificateRecord {
            serial: Serial([7; 16]),
            cert_der: vec![0x30, 3, 1, 2, 3],
            subject: "edge-1".into(),
            dns_names: vec!["edge-1.example.net".into(), "b.example".into()],
            ip_addresses: vec!["192.0.2.1".parse().unwrap(), "2001:db8::1".parse().unwrap()],
            usage: Usage::Client,
            not_before: UNIX_EPOCH + Duration::from_secs(1_700_000_000),
            not_after: UNIX_EPOCH + Duration::from_secs(1_700_086_400),
            renewed_from: Some(Serial([3; 16])),
            parent: None,
            leaf_index: 42,
            logged_at_ms: 1_700_000_000_123,
            revocation: None,
        }
    }

    #[test]
    fn record_encoding_round_trips_and_is_strict() {
        let mut plain = record();
        plain.renewed_from = None;
        plain.ip_addresses.clear();
        let mut child = record();
        child.parent = Some(Serial([5; 16]));
        for r in [record(), plain, child] {
            let bytes = encode_record(&r).unwrap();
            // Without a parent, the bytes the releases before parents read.
            let version = if r.parent.is_some() { 2 } else { 1 };
            assert_eq!(bytes[0], version);
            assert_eq!(decode_record(r.serial, &bytes), Some(r.clone()));
            for cut in 0..bytes.len() {
                assert_eq!(decode_record(r.serial, &bytes[..cut]), None, "cut at {cut}");
            }
            let mut longer = bytes.clone();
            longer.push(0);
            assert_eq!(decode_record(r.serial, &longer), None);
            for unknown in [0, 3] {
                let mut version = bytes.clone();
                version[0] = unknown;
                assert_eq!(decode_record(r.serial, &version), None);
            }
        }
    }

    /// A name filter finds a certificate by any name its index holds, as
    /// the index writes them: an IP address in another case or with a
    /// trailing dot too (the proposer's check and the apply's agree).
    #[test]
    fn a_name_filter_matches_what_the_index_holds() {
        let r = record();
        for name in [
            "EDGE-1",
            "b.example.",
            "2001:DB8::1",
            "2001:db8::1.",
            "192.0.2.1",
        ] {
            assert!(CertificateFilter::Name(name.into()).matches(&r), "{name}");
            assert!(index_names_of(&r).contains(&name_key(name)), "{name}");
        }
        assert!(!CertificateFilter::Name("2001:db8::2".into()).matches(&r));
    }

    #[test]
    fn revocation_encoding_round_trips_and_is_strict() {
        for reason in [None, Some(RevocationReason::KeyCompromise)] {
            let r = Revocation {
                revoked_at_ms: 1_700_000_000_999,
                reason,
            };
            let bytes = encode_revocation(&r);
            assert_eq!(decode_revocation(&bytes), Some(r));
            assert_eq!(decode_revocation(&bytes[..bytes.len() - 1]), None);
        }
        let mut unknown_reason = encode_revocation(&Revocation {
            revoked_at_ms: 1,
            reason: None,
        });
        unknown_reason[9] = 7;
        assert_eq!(decode_revocation(&unknown_reason), None);
    }
}
