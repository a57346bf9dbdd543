//! The cluster: the control plane's state machine ([`crate::machine`])
//! replicated with Raft (openraft 0.9, storage-v2).
//!
//! Every node holds the same store: a leader proposes a [`Command`] (its
//! keys, signatures and time decided once, there), Raft commits it to a
//! majority's logs, and every node applies the committed entries in log
//! order with the one apply path a single node uses. The Raft log is a
//! redb file of its own beside the store ([`LogStore`]); the store records
//! the last entry it applied, and the membership, in the transaction of
//! that entry ([`StateMachine`]), so a restart neither skips nor repeats
//! one. A snapshot is the whole store, row by row
//! ([`crate::machine::snapshot`]), in a file streamed in chunks
//! ([`snapshot_file`]).
//!
//! Single-threaded: the control plane is one thread, and openraft runs on
//! its current-thread runtime (`singlethreaded`), sharing the state machine
//! with the service in the same thread.

pub mod asset_proxy;
mod authority;
pub mod codec;
pub mod local;
pub mod network;
pub mod node;
// openraft's storage traits return its `StorageError` (over 200 bytes);
// the helpers behind them return the same, rather than a box to unwrap at
// every call.
#[allow(clippy::result_large_err)]
mod log_store;
pub mod rpc;
pub mod snapshot_file;
#[allow(clippy::result_large_err)]
mod state_machine;
#[cfg(test)]
mod tests;

pub use authority::{ClusterAuthority, Heard, PeerSlot, heard_lately};
pub use log_store::LogStore;
pub use state_machine::{HoldsMachine, Host, Recent, SNAPSHOT_EVERY, StateMachine};

use crate::machine::{Applied, Command};
use std::fmt;

/// How often a leader sends its followers a heartbeat, in milliseconds.
pub const HEARTBEAT_MS: u64 = 100;

/// A node of the cluster: its name, the `[address]:port` it serves on,
/// and the /64 locator of the memory assets it holds (`None` when it
/// serves none), which the others proxy asset requests by.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Member {
    pub name: String,
    pub address: String,
    pub locator: Option<u64>,
}

impl fmt::Display for Member {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.name, self.address)
    }
}

/// What a committed entry did on the node that applied it: every node
/// reaches the same outcome, a refusal included.
#[derive(Clone, Debug)]
pub enum Outcome {
    Applied(Applied),
    /// The command no longer fitted the state (every replica refuses it
    /// alike; nothing changed). Shared: the answer is made from it on the
    /// node that proposed it, in the same thread.
    Refused(std::rc::Rc<crate::authority::logged::AuthorityError>),
    /// A Raft entry of its own (blank, membership): no command.
    Nothing,
}

openraft::declare_raft_types!(
    /// The Raft types of the control plane's cluster.
    pub TypeConfig:
        D = Command,
        R = Outcome,
        NodeId = u64,
        Node = Member,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = snapshot_file::SnapshotFile,
        AsyncRuntime = openraft::TokioRuntime
);

/// A node's Raft handle.
pub type Raft = openraft::Raft<TypeConfig>;

/// The files every member holds the same copy of, in its data directory:
/// the CA (`ca/`), the CT log's key, the beacon's key and the enrollment
/// secret (a token is good on any member).
pub const SHARED_KEY_FILES: [&str; 3] = [
    crate::authority::logged::LOG_KEY_FILE,
    crate::runtime::NODE_KEY_FILE,
    crate::authority::enrollment::KEY_FILE,
];

/// Copy the keys a cluster's members share ([`SHARED_KEY_FILES`] and the
/// CA's directory) from one data directory to another; a key file the
/// first does not hold is skipped.
pub fn copy_shared_keys(from: &std::path::Path, to: &std::path::Path) -> std::io::Result<()> {
    let ca = crate::authority::logged::CA_DIR;
    std::fs::create_dir_all(to.join(ca))?;
    for entry in std::fs::read_dir(from.join(ca))? {
        let entry = entry?;
        std::fs::copy(entry.path(), to.join(ca).join(entry.file_name()))?;
    }
    for file in SHARED_KEY_FILES {
        if from.join(file).exists() {
            std::fs::copy(from.join(file), to.join(file))?;
        }
    }
    Ok(())
}
