//! Admission of `stoq/1` connections (docs/ADMISSION.md): the worker's side.
//!
//! A `stoq/1` connection with a client certificate starts *unadmitted*. It
//! may fetch its admission parameters, register its plot and submit one
//! proof bundle; everything else is refused with `NOT_ADMITTED` until the
//! bundle verifies. A bundle that fails closes the connection with the code
//! of the failed proof; a connection with no valid bundle by the deadline is
//! closed with `DEADLINE`.
//!
//! The proofs themselves are the control plane's (`controlplane::consensus`);
//! the dataplane only sees the [`AdmissionGate`] it is given. The gate
//! verifies on the worker against an immutable snapshot (no control-plane
//! round trip per bundle) and reports outcomes to the control plane, which
//! scores failures and records admitted connections as assets.

use bytes::Bytes;
use rustls::pki_types::CertificateDer;
use std::net::SocketAddr;
use std::time::Duration;

/// Request kind: the admission parameters of this connection.
pub const KIND_ADMISSION_PARAMS: u8 = crate::protocols::stoq_registry::ADMISSION_PARAMS;
/// Request kind: the proof bundle.
pub const KIND_ADMISSION_SUBMIT: u8 = crate::protocols::stoq_registry::ADMISSION_SUBMIT;
/// TLS exporter label of the binding every proof covers (RFC 8446 §7.5).
pub const BINDING_LABEL: &[u8] = b"EXPORTER-internet2-admission";
/// Request kind (forwarded to the control plane): register this client's
/// plot commitment. Allowed before admission.
pub const KIND_PLOT_REGISTER: u8 = crate::protocols::stoq_registry::PLOT_REGISTER;
/// Application close code: the bundle does not decode.
pub const CLOSE_ADMISSION_MALFORMED: u32 = 0x205;
/// Application close code: no valid bundle before the deadline.
pub const CLOSE_ADMISSION_DEADLINE: u32 = 0x207;
/// Application close code: the identity is suspended (isolation).
pub const CLOSE_ADMISSION_SUSPENDED: u32 = 0x208;
/// Application close code: this server cannot admit anyone now (its beacon
/// is behind: a cluster member that has not caught up). Not the client's
/// fault: never counted toward isolation; another member may admit it.
pub const CLOSE_ADMISSION_UNAVAILABLE: u32 = 0x209;
/// Longest close reason sent (it must fit one packet).
pub const REASON_LEN_MAX: usize = 256;

/// A refused admission: the application close code naming the failed proof
/// and a reason for the peer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    pub code: u32,
    pub reason: String,
}

/// A verified bundle.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Admitted {
    /// The owner: SHA-256 of the client certificate's public key.
    pub identity: [u8; 32],
    /// The answer to send the client.
    pub reply: Bytes,
}

/// What the workers report to the control plane.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AdmissionEvent {
    /// A bundle was refused, or the deadline passed.
    Failed {
        source: SocketAddr,
        identity: Option<[u8; 32]>,
        code: u32,
    },
    /// The connection is admitted: an asset of `owner` from now on.
    Admitted {
        worker: usize,
        conn_id: u64,
        source: SocketAddr,
        owner: [u8; 32],
    },
    /// An admitted connection ended.
    Closed { worker: usize, conn_id: u64 },
}

/// The admission the workers apply, provided by the control plane.
pub trait AdmissionGate: Send + Sync + std::fmt::Debug {
    /// Whether `stoq/1` connections must be admitted (false: they are
    /// admitted when the handshake completes).
    fn required(&self) -> bool;
    /// How long after the handshake a connection has to be admitted.
    fn deadline(&self) -> Duration;
    /// Fix the parameters of a new connection whose verified client
    /// certificate is `leaf`. A refusal closes the connection at once (for
    /// instance a suspended identity).
    fn offer(&self, leaf: &CertificateDer<'static>) -> Result<Box<dyn PendingAdmission>, Refusal>;
    /// Tell the control plane (never blocks; dropped and counted when its
    /// queue is full).
    fn report(&self, event: AdmissionEvent);
    /// What `stats` shows: the mode in force, the current difficulty, the
    /// isolation lists.
    fn status(&self) -> serde_json::Value;
}

/// One unadmitted connection's parameters.
pub trait PendingAdmission: Send {
    /// The parameters payload (answer to `KIND_ADMISSION_PARAMS`).
    fn parameters(&self) -> Bytes;
    /// The identity the certificate names (for failure scoring).
    fn identity(&self) -> [u8; 32];
    /// Check a bundle made on the connection whose exporter value is
    /// `binding`.
    fn verify(&self, binding: &[u8; 32], bundle: &[u8]) -> Result<Admitted, Refusal>;
}

/// Where one `stoq/1` connection stands.
#[derive(Default)]
pub enum AdmissionStage {
    /// Handshake not complete.
    #[default]
    Handshaking,
    /// No certificate: it may only enroll, then the deadline closes it.
    Anonymous,
    /// Waiting for a bundle.
    Pending(Box<dyn PendingAdmission>),
    /// Admitted (or admission is off); the owner when known.
    Admitted(Option<[u8; 32]>),
    /// Refused and closed.
    Refused,
}

impl std::fmt::Debug for AdmissionStage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            AdmissionStage::Handshaking => "Handshaking",
            AdmissionStage::Anonymous => "Anonymous",
            AdmissionStage::Pending(_) => "Pending",
            AdmissionStage::Admitted(_) => "Admitted",
            AdmissionStage::Refused => "Refused",
        })
    }
}

impl AdmissionStage {
    pub fn is_admitted(&self) -> bool {
        matches!(self, AdmissionStage::Admitted(_))
    }
}

/// The connection's binding: its TLS exporter value.
pub fn binding_of(conn: &quinn_proto::Connection) -> Option<[u8; 32]> {
    let mut out = [0u8; 32];
    conn.crypto_session()
        .export_keying_material(&mut out, BINDING_LABEL, b"")
        .ok()?;
    Some(out)
}

/// The client side: what makes a bundle (implemented with the control
/// plane's proof code, outside the dataplane).
pub trait Admitter: Send + Sync + std::fmt::Debug {
    /// Given the server's parameters: the plot registration to send first,
    /// when the server lacks this client's plot.
    fn registration(&self, parameters: &[u8]) -> Result<Option<Vec<u8>>, String>;
    /// The bundle for the connection whose exporter value is `binding`.
    fn bundle(&self, parameters: &[u8], binding: &[u8; 32]) -> Result<Vec<u8>, String>;
}
