//! Congestion controllers of our own for quinn-proto connections.
//!
//! Owns [`Bbr3`], BBRv3 as draft-ietf-ccwg-bbr specifies it, behind quinn-proto's
//! `congestion::Controller` trait; [`Bbr3Config`] is its `ControllerFactory`, for
//! `quinn_proto::TransportConfig::congestion_controller_factory`.
//!
//! Controllers are sans-IO: they learn of sends, acknowledgements and losses only through the
//! calls quinn-proto makes, with the time passed in; they read no clock and own no socket.
//! What they decide leaves through `window()` and `pacing_rate()` (the latter a vendored
//! quinn-proto patch, vendor/README.md), which the connection applies.
//!
//! The tests drive each controller over a simulated path (`sim`, tests only) on a simulated
//! clock, against quinn's own Cubic on the same path.

mod bbr3;
#[cfg(test)]
mod sim;

pub use bbr3::{Bbr3, Bbr3Config, Bbr3State};
