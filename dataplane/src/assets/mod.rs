//! HyperMesh assets held by the dataplane: their addresses
//! (identifier-locator addressing, `address`), the memory assets each
//! worker holds (`memory`), the `stoq/1` requests that reach them (`wire`)
//! and a connection's side of serving them (`serve`).
//!
//! Memory assets are the first kind served. Storage, compute and VM assets,
//! operator-set quotas, and the proxy to other nodes are still to come
//! (issue 14); until then an allocation of another kind is refused by
//! name.
#![forbid(unsafe_code)]

pub mod address;
pub mod memory;
pub mod serve;
pub mod wire;
