//! A durable, append-only Certificate Transparency log stored in a `redb`
//! file.
//!
//! Tables:
//! - `leaves`: `u64` index → encoded `MerkleTreeLeaf` bytes;
//! - `leaf_hashes`: `u64` index → the leaf's Merkle hash;
//! - `index_by_hash`: leaf hash → `u64` index (duplicate detection and
//!   proofs by hash);
//! - `sths`: `u64` tree size → a signed tree head in the encoding of
//!   [`encode_sth`];
//! - `meta`: the storage format version and the log's key (algorithm and
//!   raw public key), so a log is never extended under another key.
//!
//! Every [`CtLog::append_batch`] writes its leaves, hashes, index entries and
//! the new signed tree head in one write transaction with
//! [`Durability::Immediate`]: redb fsyncs the file before `commit` returns,
//! so once `append_batch` has returned, the entries and their tree head
//! survive a crash or power loss. A batch that fails writes nothing.
//!
//! On open, the leaf hashes are loaded into memory (a [`SubtreeCache`], so
//! roots and proofs cost O(log n)) and checked: the tables must agree in
//! size, indices must be contiguous, every stored tree head's root must
//! equal the recomputed root at its size, and the latest must cover every
//! leaf and carry a valid signature under the log's key.
//!
//! Time and keys are inputs: nothing here reads a clock.
//!
//! Sharing the database: [`CtLog::open`] makes a file of its own;
//! [`CtLog::load_shared`] keeps the log's tables in a [`Database`] the
//! caller also uses for its own tables (the authority's store, where the
//! certificate registry, the zone and the admission state live too). There
//! the control plane's state machine (`crate::machine`) is the one writer:
//! it writes an append (`CtLog::write_append`) in the transaction that
//! carries the rest of the command, so it commits (or fails) with it. The
//! log reads and checks only the tables above; other tables in the file are
//! the caller's.

use super::leaf::{LeafError, encode_x509_leaf};
use super::merkle::{
    Hash, LeafHashes, ProofError, SubtreeCache, consistency_proof, inclusion_proof, leaf_hash, root,
};
use super::sth::{LogKeyAlgorithm, LogSigner, SignedTreeHead, SignerError, verify_sth};
use crate::store::Store;
use redb::{Database, Durability, ReadableDatabase, ReadableTable, ReadableTableMetadata};
use redb::{ReadTransaction, TableDefinition, WriteTransaction};
use std::collections::HashMap;
use std::fmt;
use std::path::Path;
use std::sync::Arc;

pub(crate) const LEAVES: TableDefinition<u64, &[u8]> = TableDefinition::new("leaves");
pub(crate) const LEAF_HASHES: TableDefinition<u64, [u8; 32]> = TableDefinition::new("leaf_hashes");
pub(crate) const INDEX_BY_HASH: TableDefinition<[u8; 32], u64> =
    TableDefinition::new("index_by_hash");
pub(crate) const STHS: TableDefinition<u64, &[u8]> = TableDefinition::new("sths");
pub(crate) const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");

const META_FORMAT: &str = "format";
const META_ALGORITHM: &str = "algorithm";
const META_PUBLIC_KEY: &str = "public_key";
/// The storage format this code writes and reads.
const FORMAT_VERSION: u8 = 1;

/// The most entries one [`CtLog::entries`] call returns.
pub const MAX_ENTRIES_PER_CALL: u64 = 1000;

/// The version byte of the stored signed tree head encoding.
pub const STH_ENCODING_VERSION: u8 = 1;
const STH_FIXED_LEN: usize = 1 + 1 + 8 + 8 + 32 + 2;

/// Why a log operation failed. A failed append changes nothing.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("log storage failed: {0}")]
    Storage(#[from] redb::Error),
    #[error("the log file is corrupt: {0}")]
    Corrupt(String),
    #[error(
        "the log was created with a {stored} key that differs from the {given} signer given; open it with the log's own key"
    )]
    KeyMismatch {
        stored: String,
        given: LogKeyAlgorithm,
    },
    #[error("an append needs at least one entry")]
    EmptyBatch,
    #[error("entry {position} of the batch cannot be encoded: {source}")]
    Entry { position: usize, source: LeafError },
    #[error(
        "entry {position} of the batch has timestamp {timestamp_ms}, after the tree head time {now_ms}"
    )]
    TimestampAfterNow {
        position: usize,
        timestamp_ms: u64,
        now_ms: u64,
    },
    #[error(
        "the tree head time {now_ms} is before the latest tree head's time {latest_ms}; tree head times never go back"
    )]
    ClockBehind { now_ms: u64, latest_ms: u64 },
    #[error("the log already holds this entry (same leaf hash) at index {index}")]
    Duplicate { index: u64 },
    #[error("entries {first} and {position} of the batch are the same entry (same leaf hash)")]
    DuplicateInBatch { first: usize, position: usize },
    #[error("signing the tree head failed: {0}")]
    Signer(#[from] SignerError),
    #[error(transparent)]
    Proof(#[from] ProofError),
    #[error("the entry range {start}..{end} is empty; ask for start < end")]
    EmptyRange { start: u64, end: u64 },
    #[error("the entry range {start}..{end} reaches past the log, which holds {size} entries")]
    RangeOutOfLog { start: u64, end: u64, size: u64 },
    #[error("the entry range {start}..{end} holds more than {max} entries; ask for fewer")]
    RangeTooLarge { start: u64, end: u64, max: u64 },
    #[error("no entry of the log has this leaf hash")]
    UnknownLeaf,
    #[error(
        "the entry with this leaf hash is at index {index}, not in the tree of size {tree_size}"
    )]
    LeafNotInTree { index: u64, tree_size: u64 },
}

redb_errors_into_storage!(LogError);

/// What an append produced: the index of its first entry and the signed
/// tree head that covers the whole batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppendReceipt {
    pub first_index: u64,
    pub sth: SignedTreeHead,
}

/// An append checked against the tree, not yet written: see
/// [`CtLog::prepare_append`].
pub(crate) struct PreparedAppend {
    first_index: u64,
    leaves: Vec<Vec<u8>>,
    hashes: Vec<Hash>,
    new_root: Hash,
    now_ms: u64,
}

impl PreparedAppend {
    /// The index the batch's first entry gets.
    pub(crate) fn first_index(&self) -> u64 {
        self.first_index
    }
}

/// An audit path for one leaf in the tree of `tree_size` leaves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InclusionProof {
    pub leaf_index: u64,
    pub tree_size: u64,
    pub audit_path: Vec<Hash>,
}

fn algorithm_tag(algorithm: LogKeyAlgorithm) -> u8 {
    match algorithm {
        LogKeyAlgorithm::Ed25519 => 1,
        LogKeyAlgorithm::EcdsaP256Sha256 => 2,
    }
}

fn algorithm_from_tag(tag: u8) -> Option<LogKeyAlgorithm> {
    match tag {
        1 => Some(LogKeyAlgorithm::Ed25519),
        2 => Some(LogKeyAlgorithm::EcdsaP256Sha256),
        _ => None,
    }
}

/// The stored encoding of a signed tree head: version (1 byte, 1),
/// algorithm tag (1 byte: 1 Ed25519, 2 ECDSA P-256), tree size (u64 BE),
/// timestamp in ms (u64 BE), root hash (32 bytes), signature length (u16 BE)
/// and the signature.
pub fn encode_sth(sth: &SignedTreeHead) -> Vec<u8> {
    let mut out = Vec::with_capacity(STH_FIXED_LEN + sth.signature.len());
    out.push(STH_ENCODING_VERSION);
    out.push(algorithm_tag(sth.algorithm));
    out.extend_from_slice(&sth.tree_size.to_be_bytes());
    out.extend_from_slice(&sth.timestamp_ms.to_be_bytes());
    out.extend_from_slice(&sth.root_hash);
    // Ed25519 and P-256 DER signatures are at most 72 bytes.
    out.extend_from_slice(&(sth.signature.len() as u16).to_be_bytes());
    out.extend_from_slice(&sth.signature);
    out
}

/// Decode [`encode_sth`]'s output exactly; `None` for anything else.
pub fn decode_sth(bytes: &[u8]) -> Option<SignedTreeHead> {
    if bytes.len() < STH_FIXED_LEN || bytes[0] != STH_ENCODING_VERSION {
        return None;
    }
    let algorithm = algorithm_from_tag(bytes[1])?;
    let tree_size = u64::from_be_bytes(bytes[2..10].try_into().ok()?);
    let timestamp_ms = u64::from_be_bytes(bytes[10..18].try_into().ok()?);
    let root_hash: Hash = bytes[18..50].try_into().ok()?;
    let sig_len = usize::from(u16::from_be_bytes(bytes[50..52].try_into().ok()?));
    let signature = &bytes[STH_FIXED_LEN..];
    if signature.len() != sig_len {
        return None;
    }
    Some(SignedTreeHead {
        tree_size,
        timestamp_ms,
        root_hash,
        signature: signature.to_vec(),
        algorithm,
    })
}

/// The in-memory tree extended by a batch not yet committed, so the new
/// root can be computed without touching the cache.
struct Extended<'a> {
    base: &'a SubtreeCache<Vec<Hash>>,
    pending: &'a [Hash],
}

impl LeafHashes for Extended<'_> {
    fn leaf_count(&self) -> u64 {
        self.base.leaf_count() + self.pending.len() as u64
    }

    fn leaf_hash(&self, index: u64) -> Hash {
        let base = self.base.leaf_count();
        if index < base {
            self.base.leaf_hash(index)
        } else {
            self.pending[(index - base) as usize]
        }
    }

    fn complete_subtree_hash(&self, level: u32, index: u64) -> Option<Hash> {
        let end = (index + 1) << level;
        if end <= self.base.leaf_count() {
            self.base.complete_subtree_hash(level, index)
        } else {
            None
        }
    }
}

/// The leaf hashes and the latest tree head, as loaded and checked.
type LoadedTree = (SubtreeCache<Vec<Hash>>, Option<SignedTreeHead>);

/// A durable, append-only CT log. See the module documentation.
pub struct CtLog {
    store: Store,
    signer: Arc<LogSigner>,
    tree: SubtreeCache<Vec<Hash>>,
    latest: Option<SignedTreeHead>,
}

impl fmt::Debug for CtLog {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CtLog")
            .field("size", &self.size())
            .field("signer", &self.signer)
            .finish_non_exhaustive()
    }
}

fn corrupt(msg: impl Into<String>) -> LogError {
    LogError::Corrupt(msg.into())
}

impl CtLog {
    /// Open the log at `path`, creating it if the file does not exist. A new
    /// log records `signer`'s key; an existing one must have been made with
    /// the same key, and must pass the integrity checks of the module
    /// documentation, or this fails with [`LogError::KeyMismatch`] or
    /// [`LogError::Corrupt`].
    pub fn open(path: &Path, signer: LogSigner) -> Result<Self, LogError> {
        let db = Arc::new(Database::create(path)?);
        let mut txn = db.begin_write()?;
        txn.set_durability(Durability::Immediate)?;
        if let Err(e) = Self::init_in(&txn, &signer) {
            txn.abort()?;
            return Err(e);
        }
        txn.commit()?;
        Self::load_shared(Store::new(db), signer)
    }

    /// The log in a store the caller shares, whose tables
    /// `Self::init_in` made: loaded and checked as in [`Self::open`].
    pub fn load_shared(store: Store, signer: LogSigner) -> Result<Self, LogError> {
        let (tree, latest) = Self::load_tree(&store.begin_read()?, &signer)?;
        Ok(CtLog {
            store,
            signer: Arc::new(signer),
            tree,
            latest,
        })
    }

    /// The log held in another database's tables (a snapshot restored
    /// into a scratch file), under this log's key, loaded with the checks
    /// of [`Self::open`]: whether those tables would open.
    pub(crate) fn in_other(&self, db: Arc<Database>) -> Result<Self, LogError> {
        let (tree, latest) = Self::load_tree(&db.begin_read()?, &self.signer)?;
        Ok(CtLog {
            store: Store::new(db),
            signer: self.signer.clone(),
            tree,
            latest,
        })
    }

    /// Load the tree again from the tables (after they were replaced
    /// wholesale: a snapshot was installed), with the checks of
    /// [`Self::open`]. On failure the log is as it was.
    pub(crate) fn reload(&mut self) -> Result<(), LogError> {
        let (tree, latest) = Self::load_tree(&self.store.begin_read()?, &self.signer)?;
        self.tree = tree;
        self.latest = latest;
        Ok(())
    }

    fn load_tree(txn: &ReadTransaction, signer: &LogSigner) -> Result<LoadedTree, LogError> {
        let hashes_table = txn.open_table(LEAF_HASHES)?;
        let mut hashes = Vec::with_capacity(usize::try_from(hashes_table.len()?).unwrap_or(0));
        for row in hashes_table.iter()? {
            let (k, v) = row?;
            if k.value() != hashes.len() as u64 {
                return Err(corrupt(format!(
                    "leaf hash row {} found where row {} was expected",
                    k.value(),
                    hashes.len()
                )));
            }
            hashes.push(v.value());
        }
        let size = hashes.len() as u64;
        let leaves = txn.open_table(LEAVES)?.len()?;
        if leaves != size {
            return Err(corrupt(format!(
                "{leaves} leaves stored but {size} leaf hashes"
            )));
        }
        if let Some((k, _)) = txn.open_table(LEAVES)?.last()?
            && k.value() + 1 != size
        {
            return Err(corrupt(format!(
                "the last leaf row is {} in a log of {size} leaves",
                k.value()
            )));
        }
        let indexed = txn.open_table(INDEX_BY_HASH)?.len()?;
        if indexed != size {
            return Err(corrupt(format!(
                "{indexed} leaf hashes indexed but {size} stored"
            )));
        }
        let tree = SubtreeCache::new(hashes);

        let mut latest = None;
        for row in txn.open_table(STHS)?.iter()? {
            let (k, v) = row?;
            let sth = decode_sth(v.value())
                .ok_or_else(|| corrupt(format!("tree head {} cannot be decoded", k.value())))?;
            if sth.tree_size != k.value() || sth.tree_size > size {
                return Err(corrupt(format!(
                    "tree head stored under size {} has size {} in a log of {size} leaves",
                    k.value(),
                    sth.tree_size
                )));
            }
            if root(&tree, sth.tree_size)? != sth.root_hash {
                return Err(corrupt(format!(
                    "the tree head of size {} does not match the stored leaves",
                    sth.tree_size
                )));
            }
            latest = Some(sth);
        }
        match &latest {
            None if size > 0 => {
                return Err(corrupt(format!("{size} leaves but no tree head")));
            }
            Some(sth) if sth.tree_size != size => {
                return Err(corrupt(format!(
                    "the latest tree head has size {} but {size} leaves are stored",
                    sth.tree_size
                )));
            }
            Some(sth) => verify_sth(sth, &signer.public_key(), signer.algorithm())
                .map_err(|e| corrupt(format!("the latest tree head does not verify: {e}")))?,
            None => {}
        }
        Ok((tree, latest))
    }

    /// Create every table in `txn`, record the format and key of a new log,
    /// and check them for an existing one.
    pub(crate) fn init_in(txn: &WriteTransaction, signer: &LogSigner) -> Result<(), LogError> {
        txn.open_table(LEAVES)?;
        txn.open_table(LEAF_HASHES)?;
        txn.open_table(INDEX_BY_HASH)?;
        txn.open_table(STHS)?;
        let mut meta = txn.open_table(META)?;
        let tag = algorithm_tag(signer.algorithm());
        let key = signer.public_key();
        let format = meta.get(META_FORMAT)?.map(|v| v.value().to_vec());
        match format.as_deref() {
            None => {
                if !txn.open_table(LEAF_HASHES)?.is_empty()? {
                    return Err(corrupt("leaves are stored but the format is not recorded"));
                }
                meta.insert(META_FORMAT, [FORMAT_VERSION].as_slice())?;
                meta.insert(META_ALGORITHM, [tag].as_slice())?;
                meta.insert(META_PUBLIC_KEY, key.as_slice())?;
                return Ok(());
            }
            Some([FORMAT_VERSION]) => {}
            Some(other) => {
                return Err(corrupt(format!(
                    "storage format {other:?} is not supported; this code reads format {FORMAT_VERSION}"
                )));
            }
        }
        let stored_tag = meta.get(META_ALGORITHM)?.map(|v| v.value().to_vec());
        let stored_key = meta.get(META_PUBLIC_KEY)?.map(|v| v.value().to_vec());
        let (Some(stored_tag), Some(stored_key)) = (stored_tag, stored_key) else {
            return Err(corrupt("the log key is not recorded"));
        };
        let stored = match stored_tag.as_slice() {
            [t] => algorithm_from_tag(*t),
            _ => None,
        }
        .ok_or_else(|| corrupt(format!("unknown key algorithm tag {stored_tag:?}")))?;
        if stored_tag != [tag] || stored_key != key {
            return Err(LogError::KeyMismatch {
                stored: stored.to_string(),
                given: signer.algorithm(),
            });
        }
        Ok(())
    }

    /// Append `entries` (each a timestamp in ms and a certificate, DER) as
    /// X.509 leaves, sign a tree head of the new size at `now_ms`, and store
    /// all of it durably in one transaction before returning: the form for
    /// a log in a file of its own. In the authority's store the writer is
    /// the state machine (`crate::machine`), which calls
    /// `Self::prepare_append`, `Self::write_append` and
    /// `Self::record_append` around its own transaction.
    ///
    /// Fails, changing nothing, if the batch is empty, an entry cannot be
    /// encoded or is timestamped after `now_ms`, `now_ms` is before the
    /// latest tree head's time, or an entry's leaf hash is already in the
    /// log or twice in the batch.
    pub fn append_batch(
        &mut self,
        entries: &[(u64, Vec<u8>)],
        now_ms: u64,
    ) -> Result<AppendReceipt, LogError> {
        let prepared = self.prepare_append(entries, now_ms)?;
        // Durability::Immediate: the commit is fsynced before this returns.
        let sth = self
            .store
            .transact(Durability::Immediate, |txn| {
                self.write_append(txn, &prepared)
            })
            .map_err(|e| e.flatten(LogError::Storage))?;
        Ok(self.record_append(prepared, sth))
    }

    /// Check `entries` (see [`Self::append_batch`]) and compute the root
    /// they make, without writing anything.
    pub(crate) fn prepare_append(
        &self,
        entries: &[(u64, Vec<u8>)],
        now_ms: u64,
    ) -> Result<PreparedAppend, LogError> {
        if entries.is_empty() {
            return Err(LogError::EmptyBatch);
        }
        if let Some(latest) = &self.latest
            && now_ms < latest.timestamp_ms
        {
            return Err(LogError::ClockBehind {
                now_ms,
                latest_ms: latest.timestamp_ms,
            });
        }
        let mut leaves = Vec::with_capacity(entries.len());
        let mut hashes = Vec::with_capacity(entries.len());
        let mut seen = HashMap::with_capacity(entries.len());
        for (position, (timestamp_ms, cert_der)) in entries.iter().enumerate() {
            if *timestamp_ms > now_ms {
                return Err(LogError::TimestampAfterNow {
                    position,
                    timestamp_ms: *timestamp_ms,
                    now_ms,
                });
            }
            let leaf = encode_x509_leaf(*timestamp_ms, cert_der, &[])
                .map_err(|source| LogError::Entry { position, source })?;
            let hash = leaf_hash(&leaf);
            if let Some(first) = seen.insert(hash, position) {
                return Err(LogError::DuplicateInBatch { first, position });
            }
            leaves.push(leaf);
            hashes.push(hash);
        }
        let first_index = self.size();
        let new_size = first_index + hashes.len() as u64;
        let new_root = root(
            &Extended {
                base: &self.tree,
                pending: &hashes,
            },
            new_size,
        )?;
        Ok(PreparedAppend {
            first_index,
            leaves,
            hashes,
            new_root,
            now_ms,
        })
    }

    /// Write a prepared append and its signed tree head in `txn`, which
    /// the caller commits durably and then hands to
    /// `Self::record_append`. Nothing may append between the prepare and
    /// the record.
    pub(crate) fn write_append(
        &self,
        txn: &WriteTransaction,
        prepared: &PreparedAppend,
    ) -> Result<SignedTreeHead, LogError> {
        let PreparedAppend {
            first_index,
            leaves,
            hashes,
            new_root,
            now_ms,
        } = prepared;
        assert_eq!(
            *first_index,
            self.size(),
            "an append prepared on another tree"
        );
        let mut index = txn.open_table(INDEX_BY_HASH)?;
        for hash in hashes {
            if let Some(existing) = index.get(hash)? {
                return Err(LogError::Duplicate {
                    index: existing.value(),
                });
            }
        }
        let new_size = first_index + hashes.len() as u64;
        // Refusals and the signature before the first write: a group of
        // commands shares `txn` (`crate::store`).
        let sth = self.signer.sign_tree_head(new_size, *now_ms, *new_root)?;
        let mut leaf_table = txn.open_table(LEAVES)?;
        let mut hash_table = txn.open_table(LEAF_HASHES)?;
        for (i, (leaf, hash)) in leaves.iter().zip(hashes).enumerate() {
            let n = first_index + i as u64;
            leaf_table.insert(n, leaf.as_slice())?;
            hash_table.insert(n, hash)?;
            index.insert(hash, n)?;
        }
        txn.open_table(STHS)?
            .insert(new_size, encode_sth(&sth).as_slice())?;
        Ok(sth)
    }

    /// Take in an append whose transaction committed.
    pub(crate) fn record_append(
        &mut self,
        prepared: PreparedAppend,
        sth: SignedTreeHead,
    ) -> AppendReceipt {
        for hash in prepared.hashes {
            self.tree.push(hash);
        }
        self.latest = Some(sth.clone());
        AppendReceipt {
            first_index: prepared.first_index,
            sth,
        }
    }

    /// The Merkle leaf hash of entry `index`, from memory; `None` past the end.
    pub fn leaf_hash(&self, index: u64) -> Option<Hash> {
        (index < self.size()).then(|| self.tree.leaf_hash(index))
    }

    /// How many entries the log holds.
    pub fn size(&self) -> u64 {
        self.tree.leaf_count()
    }

    /// The newest signed tree head; `None` until the first append.
    pub fn latest_sth(&self) -> Option<SignedTreeHead> {
        self.latest.clone()
    }

    /// Every stored signed tree head, oldest (smallest) first: one per
    /// append.
    pub fn stored_sths(&self) -> Result<Vec<SignedTreeHead>, LogError> {
        let txn = self.store.begin_read()?;
        let table = txn.open_table(STHS)?;
        let mut out = Vec::new();
        for row in table.iter()? {
            let (k, v) = row?;
            out.push(
                decode_sth(v.value())
                    .ok_or_else(|| corrupt(format!("tree head {} cannot be decoded", k.value())))?,
            );
        }
        Ok(out)
    }

    /// The encoded `MerkleTreeLeaf`s of entries `start..end` (end
    /// exclusive), at most [`MAX_ENTRIES_PER_CALL`] of them.
    pub fn entries(&self, start: u64, end: u64) -> Result<Vec<Vec<u8>>, LogError> {
        if start >= end {
            return Err(LogError::EmptyRange { start, end });
        }
        let size = self.size();
        if end > size {
            return Err(LogError::RangeOutOfLog { start, end, size });
        }
        if end - start > MAX_ENTRIES_PER_CALL {
            return Err(LogError::RangeTooLarge {
                start,
                end,
                max: MAX_ENTRIES_PER_CALL,
            });
        }
        let txn = self.store.begin_read()?;
        let table = txn.open_table(LEAVES)?;
        let mut out = Vec::with_capacity((end - start) as usize);
        for row in table.range(start..end)? {
            let (k, v) = row?;
            if k.value() != start + out.len() as u64 {
                return Err(corrupt(format!(
                    "leaf {} is missing",
                    start + out.len() as u64
                )));
            }
            out.push(v.value().to_vec());
        }
        if out.len() as u64 != end - start {
            return Err(corrupt(format!(
                "leaf {} is missing",
                start + out.len() as u64
            )));
        }
        Ok(out)
    }

    /// The audit path of the entry whose leaf hash is `leaf_hash` in the
    /// tree of `tree_size` leaves.
    pub fn inclusion_proof_by_hash(
        &self,
        leaf_hash: &Hash,
        tree_size: u64,
    ) -> Result<InclusionProof, LogError> {
        let txn = self.store.begin_read()?;
        let leaf_index = txn
            .open_table(INDEX_BY_HASH)?
            .get(leaf_hash)?
            .map(|v| v.value())
            .ok_or(LogError::UnknownLeaf)?;
        self.inclusion_proof_at(leaf_index, tree_size)
    }

    /// The audit path of entry `leaf_index` in the tree of `tree_size`
    /// leaves, from memory.
    pub fn inclusion_proof_at(
        &self,
        leaf_index: u64,
        tree_size: u64,
    ) -> Result<InclusionProof, LogError> {
        let size = self.size();
        if tree_size > size {
            return Err(ProofError::SizeOutOfRange {
                size: tree_size,
                leaves: size,
            }
            .into());
        }
        if leaf_index >= tree_size {
            return Err(LogError::LeafNotInTree {
                index: leaf_index,
                tree_size,
            });
        }
        Ok(InclusionProof {
            leaf_index,
            tree_size,
            audit_path: inclusion_proof(&self.tree, leaf_index, tree_size)?,
        })
    }

    /// The consistency proof from the tree of `old_size` leaves to the tree
    /// of `new_size` leaves.
    pub fn consistency_proof(&self, old_size: u64, new_size: u64) -> Result<Vec<Hash>, LogError> {
        Ok(consistency_proof(&self.tree, old_size, new_size)?)
    }

    /// The root of the tree of the first `tree_size` leaves.
    pub fn root(&self, tree_size: u64) -> Result<Hash, LogError> {
        Ok(root(&self.tree, tree_size)?)
    }

    /// The log's raw public key, as [`verify_sth`] takes it.
    pub fn public_key(&self) -> Vec<u8> {
        self.signer.public_key()
    }

    /// The log's signature algorithm.
    pub fn algorithm(&self) -> LogKeyAlgorithm {
        self.signer.algorithm()
    }

    /// The log ID (RFC 6962 §3.2).
    pub fn log_id(&self) -> Hash {
        self.signer.log_id()
    }

    /// The log's public key as a DER SubjectPublicKeyInfo (what a log
    /// publishes, and what its log ID hashes).
    pub fn public_key_spki(&self) -> Vec<u8> {
        self.signer.public_key_spki()
    }

    /// The stored signed tree head of the tree of `tree_size` leaves, if an
    /// append ended at that size (every append stores the head it signed).
    pub fn sth_at(&self, tree_size: u64) -> Result<Option<SignedTreeHead>, LogError> {
        let txn = self.store.begin_read()?;
        let table = txn.open_table(STHS)?;
        let Some(v) = table.get(tree_size)? else {
            return Ok(None);
        };
        decode_sth(v.value())
            .map(Some)
            .ok_or_else(|| corrupt(format!("tree head {tree_size} cannot be decoded")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::authority::ct::{decode_leaf, verify_consistency, verify_inclusion};
    use std::path::PathBuf;
    use std::sync::atomic::{AtomicU32, Ordering};

    const ALGORITHMS: [LogKeyAlgorithm; 2] =
        [LogKeyAlgorithm::Ed25519, LogKeyAlgorithm::EcdsaP256Sha256];
    const T0: u64 = 1_700_000_000_000;

    /// A directory removed on drop.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(name: &str) -> Self {
            static N: AtomicU32 = AtomicU32::new(0);
            let dir = std::env::temp_dir().join(format!(
                "ctlog-{}-{name}-{}",
                std::process::id(),
                N.fetch_add(1, Ordering::SeqCst)
            ));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            TempDir(dir)
        }

        fn file(&self) -> PathBuf {
            self.0.join("log.redb")
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// Stand-in certificate bytes: the leaf encoding does not parse DER.
    fn cert(n: u32) -> Vec<u8> {
        format!("certificate {n}").into_bytes()
    }

    /// Entries for certificates `numbers`, timestamped `timestamp_ms` plus
    /// their position in the batch.
    fn batch(numbers: std::ops::Range<u32>, timestamp_ms: u64) -> Vec<(u64, Vec<u8>)> {
        numbers
            .zip(timestamp_ms..)
            .map(|(n, ts)| (ts, cert(n)))
            .collect()
    }

    fn signer(algorithm: LogKeyAlgorithm, pkcs8: &[u8]) -> LogSigner {
        LogSigner::from_pkcs8(algorithm, pkcs8).unwrap()
    }

    /// Everything a client could check: every stored tree head verifies and
    /// matches the tree, every pair is consistent, every entry is included
    /// in every tree head that covers it.
    fn check_log(log: &CtLog) {
        let sths = log.stored_sths().unwrap();
        assert_eq!(sths.last(), log.latest_sth().as_ref());
        let key = log.public_key();
        for sth in &sths {
            verify_sth(sth, &key, log.algorithm()).unwrap();
            assert_eq!(log.root(sth.tree_size).unwrap(), sth.root_hash);
        }
        for (i, old) in sths.iter().enumerate() {
            for new in &sths[i..] {
                let proof = log.consistency_proof(old.tree_size, new.tree_size).unwrap();
                verify_consistency(
                    old.tree_size,
                    new.tree_size,
                    &old.root_hash,
                    &new.root_hash,
                    &proof,
                )
                .unwrap();
            }
        }
        let size = log.size();
        if size == 0 {
            return;
        }
        let leaves = log.entries(0, size).unwrap();
        assert_eq!(leaves.len() as u64, size);
        for (index, leaf) in leaves.iter().enumerate() {
            let index = index as u64;
            decode_leaf(leaf).unwrap();
            let hash = leaf_hash(leaf);
            for sth in sths.iter().filter(|s| s.tree_size > index) {
                let proof = log.inclusion_proof_by_hash(&hash, sth.tree_size).unwrap();
                assert_eq!(proof.leaf_index, index);
                assert_eq!(proof.tree_size, sth.tree_size);
                verify_inclusion(
                    &hash,
                    index,
                    sth.tree_size,
                    &proof.audit_path,
                    &sth.root_hash,
                )
                .unwrap();
            }
        }
    }

    #[test]
    fn append_in_batches_reopen_and_verify() {
        for algorithm in ALGORITHMS {
            let dir = TempDir::new("append");
            let (first, pkcs8) = LogSigner::generate(algorithm).unwrap();
            let key = first.public_key();
            let mut log = CtLog::open(&dir.file(), first).unwrap();
            assert_eq!(log.size(), 0);
            assert_eq!(log.latest_sth(), None);
            assert!(log.stored_sths().unwrap().is_empty());
            check_log(&log);

            let mut next = 0u32;
            let mut now = T0;
            for len in [1u32, 3, 7, 1, 16, 5] {
                now += 1000;
                let entries = batch(next..next + len, now - 500);
                let receipt = log.append_batch(&entries, now).unwrap();
                assert_eq!(receipt.first_index, u64::from(next));
                next += len;
                assert_eq!(receipt.sth.tree_size, u64::from(next));
                assert_eq!(receipt.sth.timestamp_ms, now);
                assert_eq!(log.latest_sth(), Some(receipt.sth.clone()));
                verify_sth(&receipt.sth, &key, algorithm).unwrap();
                let stored = log.entries(receipt.first_index, u64::from(next)).unwrap();
                for (leaf, (ts, der)) in stored.iter().zip(&entries) {
                    let leaf = decode_leaf(leaf).unwrap();
                    assert_eq!((leaf.timestamp_ms, &leaf.cert_der), (*ts, der));
                    assert!(leaf.extensions.is_empty());
                }
            }
            check_log(&log);
            let before = log.stored_sths().unwrap();
            assert_eq!(before.len(), 6);
            drop(log);

            // Reopen with the same key loaded from PKCS#8 and keep going.
            let mut log = CtLog::open(&dir.file(), signer(algorithm, &pkcs8)).unwrap();
            assert_eq!(log.size(), u64::from(next));
            assert_eq!(log.stored_sths().unwrap(), before);
            assert_eq!(log.latest_sth().as_ref(), before.last());
            for len in [2u32, 9] {
                now += 1000;
                log.append_batch(&batch(next..next + len, now - 100), now)
                    .unwrap();
                next += len;
            }
            assert_eq!(log.stored_sths().unwrap().len(), 8);
            // Every head signed after reopening is consistent with those
            // signed before.
            check_log(&log);
            drop(log);
            let log = CtLog::open(&dir.file(), signer(algorithm, &pkcs8)).unwrap();
            assert_eq!(log.size(), u64::from(next));
            check_log(&log);
        }
    }

    #[test]
    fn dropped_log_keeps_every_committed_entry() {
        // `append_batch` commits with `Durability::Immediate`, which makes
        // redb fsync before the commit returns; a crash after it returns
        // loses nothing. Here the log is dropped with no other call (no
        // close, no flush) and reopened.
        let dir = TempDir::new("durable");
        let (log_signer, pkcs8) = LogSigner::generate(LogKeyAlgorithm::Ed25519).unwrap();
        let mut log = CtLog::open(&dir.file(), log_signer).unwrap();
        let entries = batch(0..40, T0);
        let receipt = log.append_batch(&entries, T0 + 100).unwrap();
        drop(log);
        let log = CtLog::open(&dir.file(), signer(LogKeyAlgorithm::Ed25519, &pkcs8)).unwrap();
        assert_eq!(log.size(), 40);
        assert_eq!(log.latest_sth(), Some(receipt.sth));
        let want: Vec<Vec<u8>> = entries
            .iter()
            .map(|(ts, der)| encode_x509_leaf(*ts, der, &[]).unwrap())
            .collect();
        assert_eq!(log.entries(0, 40).unwrap(), want);
    }

    /// A log and the PKCS#8 of its Ed25519 key.
    fn small_log(dir: &TempDir) -> (CtLog, Vec<u8>) {
        let (log_signer, pkcs8) = LogSigner::generate(LogKeyAlgorithm::Ed25519).unwrap();
        let mut log = CtLog::open(&dir.file(), log_signer).unwrap();
        log.append_batch(&batch(0..5, T0), T0 + 10).unwrap();
        log.append_batch(&batch(5..8, T0 + 10), T0 + 20).unwrap();
        (log, pkcs8)
    }

    fn assert_unchanged(log: &CtLog, sths: &[SignedTreeHead], size: u64) {
        assert_eq!(log.size(), size);
        assert_eq!(log.stored_sths().unwrap(), sths);
        assert_eq!(log.latest_sth().as_ref(), sths.last());
        assert!(matches!(
            log.entries(0, size + 1),
            Err(LogError::RangeOutOfLog { .. })
        ));
        check_log(log);
    }

    #[test]
    fn duplicates_are_rejected_and_change_nothing() {
        let dir = TempDir::new("dup");
        let (mut log, pkcs8) = small_log(&dir);
        let sths = log.stored_sths().unwrap();

        // An entry already in the log (entry 3: same cert, same timestamp),
        // behind new ones that must not be written either.
        let mut entries = batch(100..103, T0 + 20);
        entries.push(batch(0..5, T0).remove(3));
        let err = log.append_batch(&entries, T0 + 30).unwrap_err();
        assert!(matches!(err, LogError::Duplicate { index: 3 }), "{err}");
        assert_unchanged(&log, &sths, 8);
        let new_hash = leaf_hash(&encode_x509_leaf(entries[0].0, &entries[0].1, &[]).unwrap());
        assert!(matches!(
            log.inclusion_proof_by_hash(&new_hash, 8),
            Err(LogError::UnknownLeaf)
        ));

        // The same entry twice in one batch.
        let mut twice = batch(200..202, T0 + 20);
        twice.push(twice[0].clone());
        let err = log.append_batch(&twice, T0 + 30).unwrap_err();
        assert!(
            matches!(
                err,
                LogError::DuplicateInBatch {
                    first: 0,
                    position: 2
                }
            ),
            "{err}"
        );
        assert_unchanged(&log, &sths, 8);

        // Nothing is left behind on disk either.
        drop(log);
        let mut log = CtLog::open(&dir.file(), signer(LogKeyAlgorithm::Ed25519, &pkcs8)).unwrap();
        assert_unchanged(&log, &sths, 8);

        // The same certificate with another timestamp is another leaf.
        entries.pop();
        entries.push((T0 + 25, cert(3)));
        let receipt = log.append_batch(&entries, T0 + 30).unwrap();
        assert_eq!(receipt.first_index, 8);
        assert_eq!(log.size(), 12);
        check_log(&log);
    }

    #[test]
    fn invalid_batches_change_nothing() {
        let dir = TempDir::new("invalid");
        let (mut log, _) = small_log(&dir);
        let sths = log.stored_sths().unwrap();
        let latest_ms = T0 + 20;

        assert!(matches!(
            log.append_batch(&[], latest_ms),
            Err(LogError::EmptyBatch)
        ));
        assert!(matches!(
            log.append_batch(&batch(50..52, T0), latest_ms - 1),
            Err(LogError::ClockBehind { now_ms, latest_ms: l })
                if now_ms == latest_ms - 1 && l == latest_ms
        ));
        let mut late = batch(50..52, T0);
        late[1].0 = latest_ms + 6;
        assert!(matches!(
            log.append_batch(&late, latest_ms + 5),
            Err(LogError::TimestampAfterNow { position: 1, .. })
        ));
        let mut empty = batch(50..52, T0);
        empty[1].1.clear();
        assert!(matches!(
            log.append_batch(&empty, latest_ms + 5),
            Err(LogError::Entry {
                position: 1,
                source: LeafError::EmptyCertificate
            })
        ));
        assert_unchanged(&log, &sths, 8);

        // A head at the same time as the latest is fine.
        log.append_batch(&batch(50..52, T0), latest_ms).unwrap();
        assert_eq!(log.size(), 10);
    }

    #[test]
    fn entry_ranges_are_bounded() {
        let dir = TempDir::new("ranges");
        let (log_signer, _) = LogSigner::generate(LogKeyAlgorithm::Ed25519).unwrap();
        let mut log = CtLog::open(&dir.file(), log_signer).unwrap();
        assert!(matches!(
            log.entries(0, 1),
            Err(LogError::RangeOutOfLog {
                start: 0,
                end: 1,
                size: 0
            })
        ));
        log.append_batch(&batch(0..1001, T0), T0 + 2000).unwrap();
        assert_eq!(log.entries(0, 1000).unwrap().len(), 1000);
        assert_eq!(log.entries(1, 1001).unwrap().len(), 1000);
        let last = log.entries(1000, 1001).unwrap();
        assert_eq!(decode_leaf(&last[0]).unwrap().cert_der, cert(1000));
        assert!(matches!(
            log.entries(0, 1001),
            Err(LogError::RangeTooLarge {
                start: 0,
                end: 1001,
                max: MAX_ENTRIES_PER_CALL
            })
        ));
        assert!(matches!(
            log.entries(5, 5),
            Err(LogError::EmptyRange { start: 5, end: 5 })
        ));
        assert!(matches!(
            log.entries(6, 5),
            Err(LogError::EmptyRange { .. })
        ));
        assert!(matches!(
            log.entries(1000, 1002),
            Err(LogError::RangeOutOfLog { size: 1001, .. })
        ));
        assert!(matches!(
            log.entries(u64::MAX - 1, u64::MAX),
            Err(LogError::RangeOutOfLog { .. })
        ));
    }

    #[test]
    fn proof_requests_are_checked() {
        let dir = TempDir::new("proofs");
        let (log, _) = small_log(&dir);
        let leaf = log.entries(6, 7).unwrap().remove(0);
        let hash = leaf_hash(&leaf);
        assert_eq!(log.inclusion_proof_by_hash(&hash, 7).unwrap().leaf_index, 6);
        assert!(matches!(
            log.inclusion_proof_by_hash(&hash, 6),
            Err(LogError::LeafNotInTree {
                index: 6,
                tree_size: 6
            })
        ));
        assert!(matches!(
            log.inclusion_proof_by_hash(&hash, 9),
            Err(LogError::Proof(ProofError::SizeOutOfRange {
                size: 9,
                leaves: 8
            }))
        ));
        assert!(matches!(
            log.inclusion_proof_by_hash(&[0; 32], 8),
            Err(LogError::UnknownLeaf)
        ));
        assert!(matches!(
            log.consistency_proof(0, 8),
            Err(LogError::Proof(ProofError::ZeroOldSize))
        ));
        assert!(matches!(
            log.consistency_proof(3, 9),
            Err(LogError::Proof(ProofError::SizeOutOfRange { .. }))
        ));
        assert!(log.consistency_proof(8, 8).unwrap().is_empty());
    }

    #[test]
    fn another_key_is_refused() {
        let dir = TempDir::new("key");
        let (log, _) = small_log(&dir);
        drop(log);
        for algorithm in ALGORITHMS {
            let (other, _) = LogSigner::generate(algorithm).unwrap();
            let err = CtLog::open(&dir.file(), other).unwrap_err();
            assert!(
                matches!(err, LogError::KeyMismatch { given, .. } if given == algorithm),
                "{err}"
            );
        }
    }

    #[test]
    fn sth_encoding_round_trips_and_is_strict() {
        for algorithm in ALGORITHMS {
            let (s, _) = LogSigner::generate(algorithm).unwrap();
            let sth = s.sign_tree_head(12, T0, [9; 32]).unwrap();
            let bytes = encode_sth(&sth);
            assert_eq!(bytes[0], STH_ENCODING_VERSION);
            assert_eq!(decode_sth(&bytes), Some(sth));
            assert_eq!(decode_sth(&bytes[..bytes.len() - 1]), None);
            assert_eq!(decode_sth(&bytes[..STH_FIXED_LEN - 1]), None);
            let mut longer = bytes.clone();
            longer.push(0);
            assert_eq!(decode_sth(&longer), None);
            let mut t = bytes.clone();
            t[0] = 2;
            assert_eq!(decode_sth(&t), None);
            let mut t = bytes;
            t[1] = 0;
            assert_eq!(decode_sth(&t), None);
        }
    }

    /// Build a small log, change its file with `tamper` through a raw redb
    /// transaction, and expect opening it to report corruption.
    fn assert_tamper_detected(name: &str, tamper: impl FnOnce(&WriteTransaction, &LogSigner)) {
        let dir = TempDir::new(name);
        let (log, pkcs8) = small_log(&dir);
        drop(log);
        {
            let db = Database::create(dir.file()).unwrap();
            let txn = db.begin_write().unwrap();
            tamper(&txn, &signer(LogKeyAlgorithm::Ed25519, &pkcs8));
            txn.commit().unwrap();
        }
        let err = CtLog::open(&dir.file(), signer(LogKeyAlgorithm::Ed25519, &pkcs8)).unwrap_err();
        assert!(matches!(err, LogError::Corrupt(_)), "{name}: {err}");
    }

    #[test]
    fn corrupted_files_are_refused() {
        assert_tamper_detected("leaf-row", |txn, _| {
            txn.open_table(LEAVES).unwrap().remove(3).unwrap();
        });
        assert_tamper_detected("last-leaf-row", |txn, _| {
            let mut t = txn.open_table(LEAVES).unwrap();
            t.remove(7).unwrap();
            t.insert(8, b"x".as_slice()).unwrap();
        });
        assert_tamper_detected("hash-row", |txn, _| {
            txn.open_table(LEAF_HASHES).unwrap().remove(2).unwrap();
        });
        assert_tamper_detected("hash-value", |txn, _| {
            txn.open_table(LEAF_HASHES)
                .unwrap()
                .insert(5, [1u8; 32])
                .unwrap();
        });
        assert_tamper_detected("index-row", |txn, _| {
            let mut t = txn.open_table(INDEX_BY_HASH).unwrap();
            let first = t.first().unwrap().unwrap().0.value();
            t.remove(first).unwrap();
        });
        assert_tamper_detected("latest-sth-removed", |txn, _| {
            txn.open_table(STHS).unwrap().remove(8).unwrap();
        });
        assert_tamper_detected("all-sths-removed", |txn, _| {
            let mut t = txn.open_table(STHS).unwrap();
            t.remove(8).unwrap();
            t.remove(5).unwrap();
        });
        // A correctly signed head over the wrong root.
        assert_tamper_detected("wrong-root", |txn, s| {
            let sth = s.sign_tree_head(5, T0 + 10, [7; 32]).unwrap();
            txn.open_table(STHS)
                .unwrap()
                .insert(5, encode_sth(&sth).as_slice())
                .unwrap();
        });
        // The right root signed by another key.
        assert_tamper_detected("wrong-signature", |txn, _| {
            let stored = decode_sth(
                txn.open_table(STHS)
                    .unwrap()
                    .get(8)
                    .unwrap()
                    .unwrap()
                    .value(),
            )
            .unwrap();
            let (other, _) = LogSigner::generate(LogKeyAlgorithm::Ed25519).unwrap();
            let forged = other
                .sign_tree_head(8, stored.timestamp_ms, stored.root_hash)
                .unwrap();
            txn.open_table(STHS)
                .unwrap()
                .insert(8, encode_sth(&forged).as_slice())
                .unwrap();
        });
        assert_tamper_detected("sth-garbage", |txn, _| {
            txn.open_table(STHS)
                .unwrap()
                .insert(5, b"garbage".as_slice())
                .unwrap();
        });
        assert_tamper_detected("sth-key", |txn, s| {
            let sth = s.sign_tree_head(5, T0 + 10, [7; 32]).unwrap();
            txn.open_table(STHS)
                .unwrap()
                .insert(6, encode_sth(&sth).as_slice())
                .unwrap();
        });
        assert_tamper_detected("format", |txn, _| {
            txn.open_table(META)
                .unwrap()
                .insert(META_FORMAT, [9u8].as_slice())
                .unwrap();
        });
        assert_tamper_detected("meta-removed", |txn, _| {
            txn.delete_table(META).unwrap();
        });
    }
}
