//! Every `stoq/1` request kind in one table: its number, its name, who may
//! send it, where it is answered, and whether it may be served before the
//! connection is admitted or from replayable 0-RTT data.
//!
//! The worker's request router, the clients and docs/SECURITY.md's table
//! read this table. The authority (`controlplane::authority::api`) and the
//! admission runtime (`src/admission.rs`) keep their own names for the
//! kinds they answer, because the control plane does not depend on the
//! dataplane; `src/wire_agreement.rs` asserts at compile time that every
//! one of those copies equals its entry here.

/// Who may send a request kind.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// Any connection, with or without a client certificate.
    Anyone,
    /// A connection with a valid (unrevoked, unexpired) client certificate
    /// of this CA.
    Certificate,
    /// The operator's certificate only.
    Operator,
}

/// Where a request kind is answered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Answered {
    /// By the worker that owns the connection, from its snapshots.
    Worker,
    /// Forwarded to the control plane's authority.
    Authority,
    /// Forwarded to the control plane's admission runtime.
    Admission,
    /// Forwarded to the control plane's asset runtime (the operator's
    /// quotas; storage requests are the workers' to hand on).
    Assets,
    /// Forwarded to the control plane's cluster (Raft between members,
    /// joining, membership).
    Cluster,
    /// Handed by the worker to the control plane, which finds the VM's
    /// module in its store and runs it on a VM thread; that thread
    /// answers the worker.
    Vm,
}

/// One request kind.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KindSpec {
    pub kind: u8,
    pub name: &'static str,
    pub access: Access,
    pub answered: Answered,
    /// Served while the connection is not admitted yet (the admission
    /// exchange itself, and what a certificate-less connection may do).
    pub before_admission: bool,
    /// Idempotent, so it may be served from 0-RTT data (RFC 9001 §9.2).
    pub early_data: bool,
}

pub const PING: u8 = 0x01;
pub const STATS: u8 = 0x02;
pub const ENROLL: u8 = 0x10;
pub const CERT_ISSUE: u8 = 0x11;
pub const CERT_RENEW: u8 = 0x12;
pub const CERT_REVOKE: u8 = 0x13;
pub const CERT_LIST: u8 = 0x14;
pub const CA_ROOT: u8 = 0x15;
pub const CT_STH: u8 = 0x20;
pub const CT_PROOF: u8 = 0x21;
pub const CT_CONSISTENCY: u8 = 0x22;
pub const CT_ENTRIES: u8 = 0x23;
pub const CT_KEY: u8 = 0x24;
/// A member asks the leader for the log index a read must see applied.
pub const CLUSTER_READ_INDEX: u8 = 0x2f;
pub const ROTATE: u8 = 0x30;
pub const CLUSTER_JOIN: u8 = 0x31;
pub const CLUSTER_STATUS: u8 = 0x32;
pub const CLUSTER_REMOVE: u8 = 0x33;
pub const RAFT_APPEND: u8 = 0x34;
pub const RAFT_VOTE: u8 = 0x35;
pub const RAFT_SNAPSHOT: u8 = 0x36;
pub const CLUSTER_FORWARD: u8 = 0x37;
pub const DNS_SET: u8 = 0x38;
pub const DNS_REMOVE: u8 = 0x39;
pub const DNS_LIST: u8 = 0x3a;
pub const PLOT_REGISTER: u8 = 0x3b;
pub const STAKE: u8 = 0x3c;
pub const BLOCKLIST: u8 = 0x3d;
pub const ASSETS: u8 = 0x3e;
pub const QUOTAS: u8 = 0x3f;
pub const ADMISSION_PARAMS: u8 = 0x40;
pub const ADMISSION_SUBMIT: u8 = 0x41;
pub const ASSET_ALLOC: u8 = 0x50;
pub const ASSET_READ: u8 = 0x51;
pub const ASSET_WRITE: u8 = 0x52;
pub const ASSET_CAS: u8 = 0x53;
pub const ASSET_FREE: u8 = 0x54;
pub const ASSET_LIST: u8 = 0x55;
pub const ASSET_GRANT: u8 = 0x56;
/// An asset request a cluster member proxies to the member holding the
/// asset (`crate::assets::wire::encode_proxied`), answered by its worker.
pub const ASSET_PROXY: u8 = 0x57;
/// Run a VM (`vm run`, `vm call`), or only check its module (`vm deploy`).
pub const VM_CALL: u8 = 0x58;
/// The caller's VMs.
pub const VM_LIST: u8 = 0x59;

const fn entry(
    kind: u8,
    name: &'static str,
    access: Access,
    answered: Answered,
    before_admission: bool,
    early_data: bool,
) -> KindSpec {
    KindSpec {
        kind,
        name,
        access,
        answered,
        before_admission,
        early_data,
    }
}

use Access::{Anyone, Certificate, Operator};
use Answered::{Admission, Assets, Authority, Cluster, Vm, Worker};

/// The table, in kind order.
pub const KINDS: [KindSpec; 42] = [
    entry(PING, "PING", Certificate, Worker, false, true),
    entry(STATS, "STATS", Certificate, Worker, false, true),
    entry(ENROLL, "ENROLL", Anyone, Authority, true, false),
    entry(
        CERT_ISSUE,
        "CERT_ISSUE",
        Certificate,
        Authority,
        false,
        false,
    ),
    entry(
        CERT_RENEW,
        "CERT_RENEW",
        Certificate,
        Authority,
        false,
        false,
    ),
    entry(
        CERT_REVOKE,
        "CERT_REVOKE",
        Certificate,
        Authority,
        false,
        false,
    ),
    entry(CERT_LIST, "CERT_LIST", Certificate, Authority, false, false),
    entry(CA_ROOT, "CA_ROOT", Certificate, Authority, false, false),
    entry(CT_STH, "CT_STH", Certificate, Authority, false, false),
    entry(CT_PROOF, "CT_PROOF", Certificate, Authority, false, false),
    entry(
        CT_CONSISTENCY,
        "CT_CONSISTENCY",
        Certificate,
        Authority,
        false,
        false,
    ),
    entry(
        CT_ENTRIES,
        "CT_ENTRIES",
        Certificate,
        Authority,
        false,
        false,
    ),
    // The enrolling client checks its new certificate's log proof with it,
    // on the enrollment connection (no certificate, no admission yet).
    entry(CT_KEY, "CT_KEY", Anyone, Authority, true, false),
    entry(
        CLUSTER_READ_INDEX,
        "CLUSTER_READ_INDEX",
        Certificate,
        Cluster,
        false,
        false,
    ),
    entry(ROTATE, "ROTATE", Operator, Authority, false, false),
    // A joining node has no certificate yet: its join token is its proof.
    entry(CLUSTER_JOIN, "CLUSTER_JOIN", Anyone, Cluster, true, false),
    entry(
        CLUSTER_STATUS,
        "CLUSTER_STATUS",
        Certificate,
        Cluster,
        false,
        false,
    ),
    entry(
        CLUSTER_REMOVE,
        "CLUSTER_REMOVE",
        Operator,
        Cluster,
        false,
        false,
    ),
    // Between members only: the control plane refuses a certificate that
    // is not a member's (`trust::node_name`).
    entry(
        RAFT_APPEND,
        "RAFT_APPEND",
        Certificate,
        Cluster,
        false,
        false,
    ),
    entry(RAFT_VOTE, "RAFT_VOTE", Certificate, Cluster, false, false),
    entry(
        RAFT_SNAPSHOT,
        "RAFT_SNAPSHOT",
        Certificate,
        Cluster,
        false,
        false,
    ),
    entry(
        CLUSTER_FORWARD,
        "CLUSTER_FORWARD",
        Certificate,
        Cluster,
        false,
        false,
    ),
    entry(DNS_SET, "DNS_SET", Certificate, Authority, false, false),
    entry(
        DNS_REMOVE,
        "DNS_REMOVE",
        Certificate,
        Authority,
        false,
        false,
    ),
    entry(DNS_LIST, "DNS_LIST", Certificate, Authority, false, false),
    entry(
        PLOT_REGISTER,
        "PLOT_REGISTER",
        Certificate,
        Admission,
        true,
        false,
    ),
    entry(STAKE, "STAKE", Operator, Admission, false, false),
    entry(BLOCKLIST, "BLOCKLIST", Operator, Admission, false, false),
    entry(ASSETS, "ASSETS", Operator, Admission, false, false),
    entry(QUOTAS, "QUOTAS", Operator, Assets, false, false),
    entry(
        ADMISSION_PARAMS,
        "ADMISSION_PARAMS",
        Certificate,
        Worker,
        true,
        false,
    ),
    entry(
        ADMISSION_SUBMIT,
        "ADMISSION_SUBMIT",
        Certificate,
        Worker,
        true,
        false,
    ),
    // Assets: memory ones answered by the workers from their shards,
    // storage ones handed on to the control plane's store (access within a
    // kind: the asset's owner, or a grantee for read and write).
    entry(
        ASSET_ALLOC,
        "ASSET_ALLOC",
        Certificate,
        Worker,
        false,
        false,
    ),
    entry(ASSET_READ, "ASSET_READ", Certificate, Worker, false, false),
    entry(
        ASSET_WRITE,
        "ASSET_WRITE",
        Certificate,
        Worker,
        false,
        false,
    ),
    entry(ASSET_CAS, "ASSET_CAS", Certificate, Worker, false, false),
    entry(ASSET_FREE, "ASSET_FREE", Certificate, Worker, false, false),
    entry(ASSET_LIST, "ASSET_LIST", Certificate, Worker, false, false),
    entry(
        ASSET_GRANT,
        "ASSET_GRANT",
        Certificate,
        Worker,
        false,
        false,
    ),
    // Between members only: the worker refuses a certificate that is not
    // a member's (`trust::node_name`).
    entry(
        ASSET_PROXY,
        "ASSET_PROXY",
        Certificate,
        Worker,
        false,
        false,
    ),
    // VMs: their modules are storage assets of the control plane's store.
    entry(VM_CALL, "VM_CALL", Certificate, Vm, false, false),
    entry(VM_LIST, "VM_LIST", Certificate, Vm, false, false),
];

/// The entry of `kind`, if it is a request kind.
pub const fn spec(kind: u8) -> Option<&'static KindSpec> {
    let mut i = 0;
    while i < KINDS.len() {
        if KINDS[i].kind == kind {
            return Some(&KINDS[i]);
        }
        i += 1;
    }
    None
}

// Kinds are in order and unique; none collides with a response kind or the
// error kind; everything the control plane answers lies in the range the
// worker forwards.
const _: () = {
    let mut i = 0;
    while i < KINDS.len() {
        let k = KINDS[i].kind;
        assert!(k < super::stoq::RESPONSE_FLAG);
        assert!(i == 0 || KINDS[i - 1].kind < k);
        let forwarded =
            k >= *super::stoq::AUTHORITY_KINDS.start() && k <= *super::stoq::AUTHORITY_KINDS.end();
        assert!(forwarded == !matches!(KINDS[i].answered, Worker | Vm));
        i += 1;
    }
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_is_found_and_nothing_else() {
        for entry in &KINDS {
            assert_eq!(spec(entry.kind), Some(entry));
        }
        let known = (0..=u8::MAX).filter(|k| spec(*k).is_some()).count();
        assert_eq!(known, KINDS.len());
        assert_eq!(spec(super::super::stoq::KIND_ERROR), None);
    }

    #[test]
    fn only_idempotent_worker_requests_ride_in_early_data() {
        for entry in KINDS.iter().filter(|e| e.early_data) {
            assert_eq!(entry.answered, Answered::Worker, "{}", entry.name);
            assert!(!entry.before_admission, "{}", entry.name);
        }
    }
}
