//! RFC 6962 §3.4 `MerkleTreeLeaf` for X.509 entries: the bytes whose
//! [`leaf_hash`](super::merkle::leaf_hash) goes into the tree.
//!
//! ```text
//! struct {
//!     Version version;                    // v1(0), 1 byte
//!     MerkleLeafType leaf_type;           // timestamped_entry(0), 1 byte
//!     struct {
//!         uint64 timestamp;               // ms since the epoch
//!         LogEntryType entry_type;        // x509_entry(0), 2 bytes
//!         ASN.1Cert signed_entry;         // opaque<1..2^24-1>
//!         CtExtensions extensions;        // opaque<0..2^16-1>
//!     } timestamped_entry;
//! } MerkleTreeLeaf;
//! ```
//!
//! Precertificate entries (`precert_entry`) are not supported.

/// `Version.v1`.
pub const VERSION_V1: u8 = 0;
/// `MerkleLeafType.timestamped_entry`.
pub const LEAF_TYPE_TIMESTAMPED_ENTRY: u8 = 0;
/// `LogEntryType.x509_entry`.
pub const ENTRY_TYPE_X509: u16 = 0;
/// `LogEntryType.precert_entry`.
pub const ENTRY_TYPE_PRECERT: u16 = 1;
/// The longest certificate an `ASN.1Cert` can carry.
pub const MAX_CERT_LEN: usize = (1 << 24) - 1;
/// The longest `CtExtensions` value.
pub const MAX_EXTENSIONS_LEN: usize = (1 << 16) - 1;

/// A decoded X.509 `MerkleTreeLeaf`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct X509Leaf {
    /// When the log accepted the entry, milliseconds since the Unix epoch.
    pub timestamp_ms: u64,
    /// The certificate, DER.
    pub cert_der: Vec<u8>,
    /// The `CtExtensions` bytes (empty in RFC 6962 v1).
    pub extensions: Vec<u8>,
}

impl X509Leaf {
    /// The encoded `MerkleTreeLeaf`.
    pub fn encode(&self) -> Result<Vec<u8>, LeafError> {
        encode_x509_leaf(self.timestamp_ms, &self.cert_der, &self.extensions)
    }
}

/// Why a leaf cannot be encoded or decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LeafError {
    #[error("the certificate is empty; an ASN.1Cert holds at least one byte")]
    EmptyCertificate,
    #[error("the certificate is {len} bytes; an ASN.1Cert holds at most {MAX_CERT_LEN}")]
    CertificateTooLong { len: usize },
    #[error("the extensions are {len} bytes; CtExtensions hold at most {MAX_EXTENSIONS_LEN}")]
    ExtensionsTooLong { len: usize },
    #[error(
        "the leaf ends inside its {field}: {needed} more bytes needed at offset {offset}, {available} left"
    )]
    Truncated {
        field: &'static str,
        offset: usize,
        needed: usize,
        available: usize,
    },
    #[error("leaf version {0} is not supported; only v1 (0) is")]
    UnsupportedVersion(u8),
    #[error("leaf type {0} is not supported; only timestamped_entry (0) is")]
    UnsupportedLeafType(u8),
    #[error(
        "entry type {0} is not supported; only x509_entry (0) is (precert_entry is 1, unknown types are larger)"
    )]
    UnsupportedEntryType(u16),
    #[error("{count} bytes follow the end of the leaf")]
    TrailingBytes { count: usize },
}

/// Encode the `MerkleTreeLeaf` of an X.509 entry.
pub fn encode_x509_leaf(
    timestamp_ms: u64,
    cert_der: &[u8],
    extensions: &[u8],
) -> Result<Vec<u8>, LeafError> {
    if cert_der.is_empty() {
        return Err(LeafError::EmptyCertificate);
    }
    if cert_der.len() > MAX_CERT_LEN {
        return Err(LeafError::CertificateTooLong {
            len: cert_der.len(),
        });
    }
    if extensions.len() > MAX_EXTENSIONS_LEN {
        return Err(LeafError::ExtensionsTooLong {
            len: extensions.len(),
        });
    }
    let mut out = Vec::with_capacity(1 + 1 + 8 + 2 + 3 + cert_der.len() + 2 + extensions.len());
    out.push(VERSION_V1);
    out.push(LEAF_TYPE_TIMESTAMPED_ENTRY);
    out.extend_from_slice(&timestamp_ms.to_be_bytes());
    out.extend_from_slice(&ENTRY_TYPE_X509.to_be_bytes());
    // Lengths were checked above, so these fit in 3 and 2 bytes.
    out.extend_from_slice(&(cert_der.len() as u32).to_be_bytes()[1..]);
    out.extend_from_slice(cert_der);
    out.extend_from_slice(&(extensions.len() as u16).to_be_bytes());
    out.extend_from_slice(extensions);
    Ok(out)
}

/// Decode an X.509 `MerkleTreeLeaf`, accepting nothing but the exact
/// encoding [`encode_x509_leaf`] produces.
pub fn decode_leaf(bytes: &[u8]) -> Result<X509Leaf, LeafError> {
    let mut r = Reader { bytes, offset: 0 };
    let version = r.take(1, "version")?[0];
    if version != VERSION_V1 {
        return Err(LeafError::UnsupportedVersion(version));
    }
    let leaf_type = r.take(1, "leaf_type")?[0];
    if leaf_type != LEAF_TYPE_TIMESTAMPED_ENTRY {
        return Err(LeafError::UnsupportedLeafType(leaf_type));
    }
    let timestamp_ms = r.uint(8, "timestamp")?;
    let entry_type = r.uint(2, "entry_type")? as u16;
    if entry_type != ENTRY_TYPE_X509 {
        return Err(LeafError::UnsupportedEntryType(entry_type));
    }
    let cert_len = r.uint(3, "certificate length")? as usize;
    if cert_len == 0 {
        return Err(LeafError::EmptyCertificate);
    }
    let cert_der = r.take(cert_len, "certificate")?.to_vec();
    let ext_len = r.uint(2, "extensions length")? as usize;
    let extensions = r.take(ext_len, "extensions")?.to_vec();
    let count = bytes.len() - r.offset;
    if count != 0 {
        return Err(LeafError::TrailingBytes { count });
    }
    Ok(X509Leaf {
        timestamp_ms,
        cert_der,
        extensions,
    })
}

struct Reader<'a> {
    bytes: &'a [u8],
    offset: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, field: &'static str) -> Result<&'a [u8], LeafError> {
        let available = self.bytes.len() - self.offset;
        if n > available {
            return Err(LeafError::Truncated {
                field,
                offset: self.offset,
                needed: n,
                available,
            });
        }
        let out = &self.bytes[self.offset..self.offset + n];
        self.offset += n;
        Ok(out)
    }

    /// A big-endian unsigned integer of `n <= 8` bytes.
    fn uint(&mut self, n: usize, field: &'static str) -> Result<u64, LeafError> {
        Ok(self
            .take(n, field)?
            .iter()
            .fold(0u64, |acc, b| (acc << 8) | u64::from(*b)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CERT: &[u8] = &[0x30, 0x03, 0x02, 0x01, 0x05];

    #[test]
    fn encoding_is_byte_exact() {
        let bytes = encode_x509_leaf(0x0102_0304_0506_0708, CERT, &[0xaa, 0xbb]).unwrap();
        let want = [
            0x00, 0x00, // v1, timestamped_entry
            0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07, 0x08, // timestamp
            0x00, 0x00, // x509_entry
            0x00, 0x00, 0x05, // certificate length
            0x30, 0x03, 0x02, 0x01, 0x05, // certificate
            0x00, 0x02, 0xaa, 0xbb, // extensions
        ];
        assert_eq!(bytes, want);
    }

    #[test]
    fn round_trip() {
        for (ts, cert, ext) in [
            (0u64, CERT.to_vec(), vec![]),
            (1_700_000_000_000, vec![0x42; 70_000], vec![1, 2, 3]),
            (u64::MAX, vec![7], vec![9; MAX_EXTENSIONS_LEN]),
        ] {
            let leaf = X509Leaf {
                timestamp_ms: ts,
                cert_der: cert,
                extensions: ext,
            };
            let bytes = leaf.encode().unwrap();
            assert_eq!(decode_leaf(&bytes).unwrap(), leaf);
        }
    }

    #[test]
    fn large_certificate_lengths() {
        let max = vec![0u8; MAX_CERT_LEN];
        let bytes = encode_x509_leaf(1, &max, &[]).unwrap();
        assert_eq!(&bytes[12..15], &[0xff, 0xff, 0xff]);
        assert_eq!(decode_leaf(&bytes).unwrap().cert_der.len(), MAX_CERT_LEN);
        let over = vec![0u8; MAX_CERT_LEN + 1];
        assert_eq!(
            encode_x509_leaf(1, &over, &[]),
            Err(LeafError::CertificateTooLong {
                len: MAX_CERT_LEN + 1
            })
        );
    }

    #[test]
    fn encode_errors() {
        assert_eq!(
            encode_x509_leaf(1, &[], &[]),
            Err(LeafError::EmptyCertificate)
        );
        assert_eq!(
            encode_x509_leaf(1, CERT, &vec![0; MAX_EXTENSIONS_LEN + 1]),
            Err(LeafError::ExtensionsTooLong {
                len: MAX_EXTENSIONS_LEN + 1
            })
        );
    }

    #[test]
    fn decode_errors() {
        let good = encode_x509_leaf(5, CERT, &[1]).unwrap();
        assert_eq!(
            decode_leaf(&[]),
            Err(LeafError::Truncated {
                field: "version",
                offset: 0,
                needed: 1,
                available: 0
            })
        );
        let mut bad = good.clone();
        bad[0] = 1;
        assert_eq!(decode_leaf(&bad), Err(LeafError::UnsupportedVersion(1)));
        let mut bad = good.clone();
        bad[1] = 3;
        assert_eq!(decode_leaf(&bad), Err(LeafError::UnsupportedLeafType(3)));
        let mut bad = good.clone();
        bad[11] = 1;
        assert_eq!(
            decode_leaf(&bad),
            Err(LeafError::UnsupportedEntryType(ENTRY_TYPE_PRECERT))
        );
        let mut bad = good.clone();
        bad[10] = 1;
        assert_eq!(decode_leaf(&bad), Err(LeafError::UnsupportedEntryType(256)));
        // A zero-length certificate.
        let empty = [0, 0, 0, 0, 0, 0, 0, 0, 0, 5, 0, 0, 0, 0, 0, 0, 0];
        assert_eq!(decode_leaf(&empty), Err(LeafError::EmptyCertificate));
        let mut long = good.clone();
        long.push(0);
        long.push(0);
        assert_eq!(
            decode_leaf(&long),
            Err(LeafError::TrailingBytes { count: 2 })
        );
        // Every strict prefix is truncated, in the field where it stops.
        let fields = [
            (0, "version"),
            (1, "leaf_type"),
            (2, "timestamp"),
            (10, "entry_type"),
            (12, "certificate length"),
            (15, "certificate"),
            (20, "extensions length"),
            (22, "extensions"),
        ];
        for len in 0..good.len() {
            let err = decode_leaf(&good[..len]).unwrap_err();
            let field = fields
                .iter()
                .rev()
                .find(|(start, _)| *start <= len)
                .unwrap()
                .1;
            match err {
                LeafError::Truncated {
                    field: got,
                    offset,
                    available,
                    ..
                } => {
                    assert_eq!(got, field, "prefix {len}");
                    assert_eq!(offset + available, len);
                }
                other => panic!("prefix {len}: {other:?}"),
            }
        }
        // A certificate length pointing past the end.
        let mut bad = good.clone();
        bad[14] = 0xff;
        assert!(matches!(
            decode_leaf(&bad),
            Err(LeafError::Truncated {
                field: "certificate",
                needed: 0xff,
                ..
            })
        ));
    }
}
