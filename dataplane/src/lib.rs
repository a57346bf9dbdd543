//! The STOQ dataplane: thread-per-core QUIC over IPv6.
//!
//! Owns the packet path: worker threads (`worker`), each with one I/O
//! backend (`io`: io_uring or plain sockets) and one `quinn_proto::Endpoint`;
//! the connection-ID layout that tells which worker owns a datagram (`cid`);
//! the stream handlers per ALPN (`protocols`); and clients built on the same
//! machinery (`client`). Datagrams enter through a backend, are routed by
//! their destination CID (handed to the owning worker over a bounded queue
//! when they land on another), and leave through the owner's socket.
//!
//! It must not block anywhere but the backend's wait, take locks on the hot
//! path, or touch control-plane state other than immutable snapshots.

pub mod admission;
pub mod assets;
pub mod blocklist;
pub mod capacity;
pub mod cid;
pub mod client;
pub mod congestion;
pub mod control;
pub mod front_door;
#[cfg(any(test, feature = "harness"))]
pub mod harness;
pub mod io;
pub mod protocols;
pub mod server;
pub mod server_tls;
pub mod session_store;
pub mod stats;
pub mod steering;
#[cfg(test)]
mod test_support;
pub mod transport;
pub mod trust;
pub mod worker;

pub use cid::WorkerId;
pub use io::BackendKind;
pub use server::{ServeError, ServerHandle, ServerSettings, serve};
pub use stats::{Counters, StatsRegistry, StatsSnapshot};
pub use transport::{
    ClientIdentity, CongestionControl, Resumption, ServerIdentity, ServerTrust, TransportSettings,
};
