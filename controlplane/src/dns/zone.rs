//! The zone in memory, mirrored from its tables: changes are planned
//! against it, written durably, and only then applied to it.

use super::name::{NameError, check_apex, check_relative, qualify};
use super::{
    MAX_ADDRESSES_PER_NAME, MAX_NAME_LEN, MAX_NAMES, MAX_PINS_PER_NAME, NameRecords, ZoneConfig,
    ZoneError, ZoneSnapshot, store,
};
use redb::{Database, WriteTransaction};
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::net::Ipv6Addr;
use std::sync::atomic::{AtomicU64, Ordering};

/// A TLSA `3 1 1` record of a name: `_PORT._udp.NAME` pins this key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Tlsa {
    pub port: u16,
    /// SHA-256 of the SubjectPublicKeyInfo DER.
    pub spki_sha256: [u8; 32],
}

/// Why a set of records is not one a name may have.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    #[error("no addresses and no pins: remove the name instead")]
    Empty,
    #[error("{count} addresses; a name has at most {MAX_ADDRESSES_PER_NAME}")]
    TooManyAddresses { count: usize },
    #[error("{count} pins; a name has at most {MAX_PINS_PER_NAME}")]
    TooManyPins { count: usize },
    #[error("address {address} is {why}; give global, unique-local or loopback IPv6 addresses")]
    BadAddress {
        address: Ipv6Addr,
        why: &'static str,
    },
    #[error("port 0 is not a port a service listens on")]
    ZeroPort,
}

/// The records of one name: AAAA addresses, TLSA pins, and the key that
/// set them. Only [`RecordSet::new`] makes one, so every set in the zone is
/// within its bounds, sorted and without duplicates.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordSet {
    aaaa: Vec<Ipv6Addr>,
    tlsa: Vec<Tlsa>,
    owner: Option<[u8; 32]>,
}

impl RecordSet {
    /// Check, sort and deduplicate. `owner`: SHA-256 of the SPKI of the
    /// certificate that sets the name; `None` for the operator and the
    /// server.
    pub fn new(
        mut aaaa: Vec<Ipv6Addr>,
        mut tlsa: Vec<Tlsa>,
        owner: Option<[u8; 32]>,
    ) -> Result<Self, RecordError> {
        if aaaa.len() > MAX_ADDRESSES_PER_NAME {
            return Err(RecordError::TooManyAddresses { count: aaaa.len() });
        }
        if tlsa.len() > MAX_PINS_PER_NAME {
            return Err(RecordError::TooManyPins { count: tlsa.len() });
        }
        if aaaa.is_empty() && tlsa.is_empty() {
            return Err(RecordError::Empty);
        }
        for address in &aaaa {
            check_address(*address)?;
        }
        if tlsa.iter().any(|t| t.port == 0) {
            return Err(RecordError::ZeroPort);
        }
        aaaa.sort_unstable();
        aaaa.dedup();
        tlsa.sort_unstable();
        tlsa.dedup();
        Ok(Self { aaaa, tlsa, owner })
    }

    pub fn aaaa(&self) -> &[Ipv6Addr] {
        &self.aaaa
    }

    pub fn tlsa(&self) -> &[Tlsa] {
        &self.tlsa
    }

    pub fn owner(&self) -> Option<[u8; 32]> {
        self.owner
    }

    /// Every pin replaced by `pin` (ports kept); an owner becomes `pin`'s
    /// key, no owner stays none. `None` when the set has no pins.
    pub fn repinned(&self, pin: [u8; 32]) -> Option<Self> {
        if self.tlsa.is_empty() {
            return None;
        }
        let tlsa = self
            .tlsa
            .iter()
            .map(|t| Tlsa {
                port: t.port,
                spki_sha256: pin,
            })
            .collect();
        let owner = self.owner.map(|_| pin);
        // Fewer or as many pins and the same addresses: still in bounds.
        Self::new(self.aaaa.clone(), tlsa, owner).ok()
    }

    /// The set without the pins of `pin`: `Some(None)` when nothing is left
    /// (remove the name), `None` when it has no such pin.
    pub fn unpinned(&self, pin: [u8; 32]) -> Option<Option<Self>> {
        if !self.tlsa.iter().any(|t| t.spki_sha256 == pin) {
            return None;
        }
        let tlsa = self
            .tlsa
            .iter()
            .copied()
            .filter(|t| t.spki_sha256 != pin)
            .collect();
        Some(Self::new(self.aaaa.clone(), tlsa, self.owner).ok())
    }
}

/// Addresses that cannot reach a service: the unspecified address,
/// multicast, and IPv4 in disguise (the zone is IPv6-only).
fn check_address(address: Ipv6Addr) -> Result<(), RecordError> {
    let why = if address.is_unspecified() {
        "the unspecified address"
    } else if address.is_multicast() {
        "multicast"
    } else if address.to_ipv4_mapped().is_some() {
        "an IPv4-mapped address (the zone is IPv6-only)"
    } else {
        return Ok(());
    };
    Err(RecordError::BadAddress { address, why })
}

/// One name's new records (`None`: the name is removed).
type Edit = (String, Option<RecordSet>);

/// A change checked against the zone it was planned on: the state machine
/// (`crate::machine`) writes it ([`Self::write`]) in its transaction and
/// applies it to that zone once the write is durable ([`Zone::apply`]),
/// if nothing changed the zone in between ([`Zone::follows`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ZoneChange {
    edits: Vec<Edit>,
    /// The zone's change counter once this change is in.
    changes: u64,
}

impl ZoneChange {
    /// Write the change in `txn`, which the caller commits durably.
    pub fn write(&self, txn: &WriteTransaction) -> Result<(), redb::Error> {
        store::write(txn, &self.edits, self.changes)
    }

    /// The names it changes.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.edits.iter().map(|(n, _)| n.as_str())
    }

    /// Its edits, in the order they are written.
    pub(crate) fn edits(&self) -> &[Edit] {
        &self.edits
    }

    /// The zone's change counter once it is in.
    pub(crate) fn counter(&self) -> u64 {
        self.changes
    }

    /// A change read back from its encoding (`crate::machine::codec`); the
    /// state machine checks it against the zone before it applies it.
    pub(crate) fn from_parts(edits: Vec<Edit>, changes: u64) -> Self {
        Self { edits, changes }
    }
}

/// The zone: its records in memory, durable in the authority's database.
pub struct Zone {
    apex: String,
    /// The server's own name, absolute.
    server_name: String,
    records: BTreeMap<String, RecordSet>,
    /// How many changes the zone has seen, durable (`dns_meta`).
    changes: u64,
    /// Which zone in memory this is: a zone loaded again (a restored
    /// snapshot) has another, so what was published from the one before
    /// is not taken for its past.
    instance: u64,
    /// The names each of the latest changes edited (the change counter
    /// after it, the names), oldest first, at most [`RECENT_CHANGES`]
    /// changes and [`MAX_NAMES`] names: what
    /// a publisher that is a few changes behind redoes
    /// ([`Self::changed_since`]).
    recent: VecDeque<(u64, Vec<String>)>,
    /// The names `recent` holds, at most [`MAX_NAMES`].
    recent_names: usize,
}

/// How many changes [`Zone::changed_since`] can look back over; a
/// publisher further behind rebuilds the whole zone.
pub(crate) const RECENT_CHANGES: usize = 256;

/// Where a zone's publisher stands: the zone in memory it published
/// ([`Zone::instance`]) and that zone's change counter then.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Published {
    pub instance: u64,
    pub generation: u64,
}

impl std::fmt::Debug for Zone {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Zone")
            .field("apex", &self.apex)
            .field("names", &self.records.len())
            .field("changes", &self.changes)
            .finish_non_exhaustive()
    }
}

impl Zone {
    /// Check `config` and load the zone from `db`, whose tables
    /// `store::init_in` made. Names stored under another apex (the configuration
    /// changed) stay on disk but are not part of this zone.
    pub fn open(db: &Database, config: &ZoneConfig) -> Result<Self, ZoneError> {
        let bad = |what: &str, e: String| ZoneError::Config(format!("{what}: {e}"));
        check_apex(&config.apex).map_err(|e| bad("apex", e.to_string()))?;
        check_relative(&config.server_name).map_err(|e| bad("server name", e.to_string()))?;
        let server_name = qualify(&config.apex, &config.server_name)
            .map_err(|e| bad("server name", e.to_string()))?;
        // The server may have no addresses (it registers its pin only).
        if !config.server_addresses.is_empty() {
            RecordSet::new(config.server_addresses.clone(), Vec::new(), None)
                .map_err(|e| bad("server addresses", e.to_string()))?;
        }
        if config.server_port == 0 {
            return Err(bad("server port", "0 is not a port".into()));
        }
        let (records, changes) = store::load(db, &config.apex)?;
        static INSTANCES: AtomicU64 = AtomicU64::new(1);
        Ok(Self {
            apex: config.apex.clone(),
            server_name,
            records,
            changes,
            instance: INSTANCES.fetch_add(1, Ordering::Relaxed),
            recent: VecDeque::new(),
            recent_names: 0,
        })
    }

    /// Where a publisher of this zone as it is now stands.
    pub fn published(&self) -> Published {
        Published {
            instance: self.instance,
            generation: self.changes,
        }
    }

    /// The names changed since `published` (each once): added, replaced
    /// or removed. `None` when they are not known: `published` is of
    /// another zone in memory, or more than [`RECENT_CHANGES`] changes
    /// old; the publisher then publishes the whole zone.
    pub fn changed_since(&self, published: Published) -> Option<BTreeSet<&str>> {
        if published.instance != self.instance || published.generation > self.changes {
            return None;
        }
        if published.generation == self.changes {
            return Some(BTreeSet::new());
        }
        // The change right after `published` must still be held.
        let (oldest, _) = self.recent.front()?;
        if *oldest > published.generation + 1 {
            return None;
        }
        Some(
            self.recent
                .iter()
                .filter(|(after, _)| *after > published.generation)
                .flat_map(|(_, names)| names.iter().map(String::as_str))
                .collect(),
        )
    }

    pub fn apex(&self) -> &str {
        &self.apex
    }

    /// The server's own name, absolute.
    pub fn server_name(&self) -> &str {
        &self.server_name
    }

    /// `input` as a name of this zone (see [`qualify`]).
    pub fn qualify(&self, input: &str) -> Result<String, NameError> {
        qualify(&self.apex, input)
    }

    /// The records of `name` (absolute, lowercase).
    pub fn get(&self, name: &str) -> Option<&RecordSet> {
        self.records.get(name)
    }

    pub fn len(&self) -> usize {
        self.records.len()
    }

    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    /// Changes with every change; durable, so equal across restarts.
    pub fn generation(&self) -> u64 {
        self.changes
    }

    /// The SOA serial: the change counter modulo 2^32 (RFC 1982 serial
    /// arithmetic makes the wrap harmless).
    pub fn serial(&self) -> u32 {
        self.changes as u32
    }

    /// Up to `max` names after `after` (absolute), in name order, and
    /// whether more follow.
    pub fn page(&self, after: Option<&str>, max: usize) -> (Vec<(&str, &RecordSet)>, bool) {
        use std::ops::Bound;
        let start = after.map_or(Bound::Unbounded, Bound::Excluded);
        let mut rows = self
            .records
            .range::<str, _>((start, Bound::Unbounded))
            .map(|(n, r)| (n.as_str(), r));
        let page: Vec<_> = rows.by_ref().take(max).collect();
        let more = rows.next().is_some();
        (page, more)
    }

    /// Check `edits` (names from [`Self::qualify`]) against the zone. Edits
    /// that change nothing are dropped; `None` when none is left.
    pub fn plan(&self, edits: Vec<Edit>) -> Result<Option<ZoneChange>, ZoneError> {
        let mut seen = std::collections::BTreeSet::new();
        let edits: Vec<Edit> = edits
            .into_iter()
            .filter(|(name, records)| self.records.get(name) != records.as_ref())
            .filter(|(name, _)| seen.insert(name.clone()))
            .collect();
        if edits.is_empty() {
            return Ok(None);
        }
        let change = ZoneChange {
            edits,
            changes: self.changes + 1,
        };
        self.check(&change)?;
        Ok(Some(change))
    }

    /// Check `change` as [`Self::plan`] makes changes, for one that was
    /// not planned here (read back from the cluster's log): each name is a
    /// name of this zone as [`Self::qualify`] writes it, and edited once;
    /// each pin's name (`_PORT._udp.NAME`) is a name too; the zone stays
    /// within [`MAX_NAMES`].
    pub fn check(&self, change: &ZoneChange) -> Result<(), ZoneError> {
        let mut seen = BTreeSet::new();
        for (name, records) in &change.edits {
            if self.qualify(name).ok().as_deref() != Some(name.as_str()) {
                return Err(ZoneError::NotAName(format!(
                    "{name:?} is not a name of the zone {}",
                    self.apex
                )));
            }
            if !seen.insert(name.as_str()) {
                return Err(ZoneError::NotAName(format!("{name} is edited twice")));
            }
            // A pin is answered at `_PORT._udp.NAME`, which must be a name
            // too.
            for tlsa in records.iter().flat_map(RecordSet::tlsa) {
                let bare = name.strip_suffix('.').unwrap_or(name);
                if format!("_{}._udp.{bare}", tlsa.port).len() > MAX_NAME_LEN {
                    return Err(ZoneError::PinNameTooLong {
                        name: name.clone(),
                        port: tlsa.port,
                    });
                }
            }
        }
        let added = change
            .edits
            .iter()
            .filter(|(n, r)| r.is_some() && !self.records.contains_key(n))
            .count();
        let removed = change
            .edits
            .iter()
            .filter(|(n, r)| r.is_none() && self.records.contains_key(n))
            .count();
        if self.records.len() + added - removed > MAX_NAMES {
            return Err(ZoneError::Full);
        }
        Ok(())
    }

    /// Whether `change` was planned on the zone as it is now (nothing was
    /// applied since): only then may it be written and applied.
    pub fn follows(&self, change: &ZoneChange) -> bool {
        change.changes == self.changes + 1
    }

    /// Apply a change whose write committed. It must be the next change
    /// planned on this zone.
    pub fn apply(&mut self, change: ZoneChange) {
        assert_eq!(
            change.changes,
            self.changes + 1,
            "a zone change applied out of order"
        );
        let mut names = Vec::with_capacity(change.edits.len());
        for (name, records) in change.edits {
            match records {
                Some(records) => self.records.insert(name.clone(), records),
                None => self.records.remove(&name),
            };
            names.push(name);
        }
        self.changes = change.changes;
        // At most RECENT_CHANGES changes and MAX_NAMES names: a change
        // larger than that is not remembered (nor what came before it), so
        // its publication is whole.
        if names.len() > MAX_NAMES {
            self.recent.clear();
            self.recent_names = 0;
            return;
        }
        while self.recent.len() == RECENT_CHANGES || self.recent_names + names.len() > MAX_NAMES {
            let Some((_, dropped)) = self.recent.pop_front() else {
                break;
            };
            self.recent_names -= dropped.len();
        }
        self.recent_names += names.len();
        self.recent.push_back((self.changes, names));
    }

    /// Edits that replace the pins of the names in `cert_names` (a
    /// certificate's CN and DNS names, as it carries them) that have pins,
    /// with `pin`. The server's own name is left alone: its pin follows the
    /// server's key.
    pub fn repin_edits<'a>(
        &self,
        cert_names: impl Iterator<Item = &'a str>,
        pin: [u8; 32],
    ) -> Vec<Edit> {
        self.carried_edits(cert_names, |records| records.repinned(pin).map(Some))
    }

    /// Edits that remove `pin` from the names in `cert_names`.
    pub fn unpin_edits<'a>(
        &self,
        cert_names: impl Iterator<Item = &'a str>,
        pin: [u8; 32],
    ) -> Vec<Edit> {
        self.carried_edits(cert_names, |records| records.unpinned(pin))
    }

    /// `edit`'s new records for each of the zone's names (other than the
    /// server's) among a certificate's names, which are absolute names
    /// without their trailing dot; names it returns `None` for are left
    /// out.
    fn carried_edits<'a>(
        &self,
        cert_names: impl Iterator<Item = &'a str>,
        edit: impl Fn(&RecordSet) -> Option<Option<RecordSet>>,
    ) -> Vec<Edit> {
        cert_names
            .filter_map(|n| {
                let name = format!("{}.", n.to_ascii_lowercase());
                if name == self.server_name {
                    return None;
                }
                let records = edit(self.records.get(&name)?)?;
                Some((name, records))
            })
            .collect()
    }

    /// The whole zone, for the workers.
    pub fn snapshot(&self) -> ZoneSnapshot {
        ZoneSnapshot {
            apex: self.apex.clone(),
            serial: self.serial(),
            generation: self.generation(),
            names: self
                .records
                .iter()
                .map(|(name, r)| published_records(name, r))
                .collect(),
        }
    }

    /// `name`'s records as the workers answer them; `None` for a name the
    /// zone does not hold.
    pub fn published_name(&self, name: &str) -> Option<NameRecords> {
        self.records.get(name).map(|r| published_records(name, r))
    }
}

fn published_records(name: &str, records: &RecordSet) -> NameRecords {
    NameRecords {
        name: name.to_owned(),
        aaaa: records.aaaa.clone(),
        tlsa: records
            .tlsa
            .iter()
            .map(|t| (t.port, t.spki_sha256))
            .collect(),
    }
}
