//! A `stoq/1` connection's asset requests, answered by its worker from the
//! shared [`MemoryAssets`]. The connection's client certificate names the
//! owner (SHA-256 of its key, as admission's ledger does); the first asset
//! request takes a lease for that owner, which the connection holds until
//! it closes.

use super::memory::{AssetError, MemoryAssets, Owner};
use super::wire::{AllocKind, AssetRequest};
use crate::protocols::stoq::{ErrorCode, RESPONSE_FLAG, encode, encode_error};
use bytes::Bytes;
use std::sync::Arc;
use std::time::Instant;

/// A connection's side of the asset registry.
#[derive(Debug, Default)]
pub struct AssetSession {
    lease: Option<Lease>,
}

/// One open connection of an owner: its assets outlive it by the grace.
struct Lease {
    assets: Arc<MemoryAssets>,
    owner: Owner,
}

impl std::fmt::Debug for Lease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lease").field("owner", &self.owner).finish()
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.assets.disconnected(&self.owner, Instant::now());
    }
}

/// Where a request came from.
pub struct Caller<'a> {
    pub assets: Option<&'a Arc<MemoryAssets>>,
    /// The client certificate the handshake verified (leaf, DER).
    pub certificate: &'a [u8],
    pub worker: usize,
    pub now: Instant,
}

impl AssetSession {
    /// The response to asset request `kind` with `payload`.
    pub fn answer(&mut self, kind: u8, payload: &[u8], caller: &Caller<'_>) -> Bytes {
        let Some(assets) = caller.assets else {
            return encode_error(
                ErrorCode::AssetsOff,
                "asset addressing is off on this server ([hypermesh_assets] nat_addressing = false)",
            );
        };
        let request = match AssetRequest::decode(kind, payload) {
            Ok(request) => request,
            Err(e) => return encode_error(ErrorCode::Malformed, &e.to_string()),
        };
        let owner = match &self.lease {
            Some(lease) => lease.owner,
            None => {
                let Some(key) = crate::trust::spki_sha256(caller.certificate) else {
                    return encode_error(
                        ErrorCode::Malformed,
                        "the client certificate's key could not be read",
                    );
                };
                let owner = Owner(key);
                assets.connected(&owner);
                self.lease = Some(Lease {
                    assets: assets.clone(),
                    owner,
                });
                owner
            }
        };
        if let AssetRequest::Read {
            address,
            offset,
            len,
        } = request
        {
            // Straight from the region into the response: one copy.
            let response = assets.with(address, |s| {
                s.read(&owner, address, offset, u64::from(len))
                    .map(|bytes| encode(kind | RESPONSE_FLAG, bytes))
            });
            return response.unwrap_or_else(|e| encode_error(code(&e), &e.to_string()));
        }
        match serve(assets, &owner, request, caller) {
            Ok(body) => encode(kind | RESPONSE_FLAG, &body),
            Err(e) => encode_error(code(&e), &e.to_string()),
        }
    }
}

fn serve(
    assets: &MemoryAssets,
    owner: &Owner,
    request: AssetRequest<'_>,
    caller: &Caller<'_>,
) -> Result<Vec<u8>, AssetError> {
    Ok(match request {
        AssetRequest::Alloc {
            kind: AllocKind::Memory,
            size,
        } => assets
            .alloc(caller.worker, owner, size, caller.now)?
            .octets()
            .to_vec(),
        AssetRequest::Read { .. } => unreachable!("answered above, without a copy"),
        AssetRequest::Write {
            address,
            offset,
            data,
        } => {
            assets.with(address, |s| s.write(owner, address, offset, data))?;
            Vec::new()
        }
        AssetRequest::Cas {
            address,
            offset,
            expected,
            new,
        } => {
            let (swapped, was) = assets.with(address, |s| {
                s.compare_and_swap(owner, address, offset, expected, new)
            })?;
            let mut out = vec![u8::from(swapped)];
            out.extend_from_slice(&was);
            out
        }
        AssetRequest::Free { address } => assets
            .with(address, |s| s.free(owner, address))?
            .to_be_bytes()
            .to_vec(),
        AssetRequest::List => {
            let listed: Vec<serde_json::Value> = assets
                .list(owner)
                .iter()
                .map(|a| {
                    serde_json::json!({
                        "address": a.address.to_string(),
                        "kind": "memory",
                        "size": a.size,
                        "grants": a.grants,
                    })
                })
                .collect();
            serde_json::to_vec(&listed).expect("a list serializes")
        }
        AssetRequest::Grant {
            address,
            grantee,
            access,
        } => {
            let changed = assets.with(address, |s| match access {
                Some(access) => s.grant(owner, address, grantee, access).map(|()| true),
                None => s.revoke_grant(owner, address, &grantee),
            })?;
            vec![u8::from(changed)]
        }
    })
}

/// The error code a client sees for `e` (docs/PROTOCOL.md).
pub fn code(e: &AssetError) -> ErrorCode {
    match e {
        AssetError::Unknown(_) => ErrorCode::AssetUnknown,
        AssetError::Released(_) => ErrorCode::AssetReleased,
        AssetError::Elsewhere { .. } => ErrorCode::AssetElsewhere,
        AssetError::Forbidden(_) => ErrorCode::AssetForbidden,
        AssetError::OutOfRange { .. } | AssetError::CasLength { .. } => ErrorCode::AssetRange,
        AssetError::QuotaExceeded { .. } | AssetError::TooManyAssets => ErrorCode::AssetQuota,
        AssetError::Size(_) | AssetError::TooManyGrants | AssetError::IdsExhausted => {
            ErrorCode::AssetLimit
        }
    }
}
