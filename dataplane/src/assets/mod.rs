//! HyperMesh assets held by the dataplane: their addresses
//! (identifier-locator addressing) and the memory assets each worker holds.
//!
//! Not yet served: no protocol reaches these types, and no command line
//! or configuration mentions them (issue 14 builds the rest: the `stoq/1`
//! requests, quotas set by the operator, durable storage assets through
//! the control plane's command log, leases, and the proxy to other
//! nodes).
#![forbid(unsafe_code)]

pub mod address;
pub mod memory;
