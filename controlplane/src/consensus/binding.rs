//! The connection binding every admission proof is made over.
//!
//! RFC 8446 §7.5: both ends of a TLS 1.3 session can export keying material
//! that only they know and that differs for every session. The transport
//! exports [`BINDING_LEN`] bytes with [`EXPORTER_LABEL`] and an empty
//! context and hands them in; a proof made over one connection's binding is
//! worthless on any other, which is what stops replay.

/// The exporter label (RFC 8446 §7.5; RFC 5705 §4 asks for the
/// "EXPORTER-" prefix on labels not registered with IANA).
pub const EXPORTER_LABEL: &[u8] = b"EXPORTER-internet2-admission";

/// The exporter context: empty. RFC 8446 §7.5 makes "no context" and
/// "empty context" the same value in TLS 1.3, so either API spelling works.
pub const EXPORTER_CONTEXT: &[u8] = b"";

/// Bytes exported per connection.
pub const BINDING_LEN: usize = 32;

/// One connection's exporter value. Obtained only from the TLS session; it
/// is not secret from the peer, but no third party can predict or choose it.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct Binding([u8; BINDING_LEN]);

impl Binding {
    /// Wrap the bytes the transport exported with [`EXPORTER_LABEL`] and
    /// [`EXPORTER_CONTEXT`].
    pub const fn from_exporter(bytes: [u8; BINDING_LEN]) -> Self {
        Self(bytes)
    }

    pub const fn as_bytes(&self) -> &[u8; BINDING_LEN] {
        &self.0
    }
}
