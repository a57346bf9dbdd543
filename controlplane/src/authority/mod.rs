//! The certificate authority.
//!
//! `ca` (root and intermediate on disk, issue, renew, revoke, chain checks),
//! `ct` (the RFC 6962 log: Merkle proofs, signed tree heads, the redb store),
//! `registry` (every issued certificate and revocation, durable in the same
//! redb database as the log) and `logged` (all three as one: a certificate is
//! handed out only once it is in the log and the registry, both written in
//! one transaction), `enrollment` (one-time enrollment tokens, mintable by
//! another process), `service` (the sans-IO `stoq/1` request handlers the
//! control-plane thread calls), `api` (the messages, error codes and the
//! client-side checks shared with the CLI) and `pem` (certificate files and
//! TLSA pins). The server's control-plane thread owns the service; its
//! workers check client certificates against the trust snapshot it
//! publishes.

pub mod api;
pub mod ca;
pub mod ct;
pub mod enrollment;
pub mod import;
pub mod logged;
pub mod pem;
pub mod registry;
pub mod service;
