//! The certificate authority.
//!
//! `ca` (root and intermediate on disk, issue, renew, revoke, chain checks),
//! `ct` (the RFC 6962 log: Merkle proofs, signed tree heads, the redb store),
//! `registry` (every issued certificate and revocation, durable in the same
//! redb database as the log) and `logged` (all three as one: a certificate is
//! handed out only once it is in the log and the registry, both written in
//! one transaction), `enrollment` (one-time enrollment tokens, mintable by
//! another process), `service` (the sans-IO `stoq/1` request handlers the
//! control-plane thread calls) and `api` (the messages, error codes and the
//! client-side checks shared with the CLI) are built and tested; they are
//! not yet wired to the workers, mutual TLS or the CLI. Until they are, the
//! server presents a certificate from the development CA (`dev_ca`).

pub mod api;
pub mod ca;
pub mod ct;
pub mod dev_ca;
pub mod enrollment;
pub mod logged;
pub mod registry;
pub mod service;
