//! A `stoq/1` connection's asset requests: memory assets are answered by
//! its worker from the shared [`MemoryAssets`]; storage assets are the
//! control plane's (durable, in its store), so their requests go there
//! ([`Answer::ControlPlane`]); on a cluster member, a memory request for
//! another member's locator goes to that member ([`Answer::Proxy`],
//! answered there by [`answer_proxied`]). The connection's client certificate names
//! the owner (SHA-256 of its key, as admission's ledger does); the first
//! memory request takes a lease for that owner, which the connection holds
//! until it closes.

use super::memory::AssetError as Error;
use super::memory::{AssetError, MemoryAssets, Owner, Span};
use super::wire::{AllocKind, AssetRequest};
use crate::protocols::stoq::{
    ErrorCode, HEADER_LEN, RESPONSE_FLAG, encode, encode_error, put_header,
};
use bytes::{Bytes, BytesMut};
use std::sync::Arc;
use std::time::Instant;

/// A connection's side of the asset registry.
#[derive(Debug, Default)]
pub struct AssetSession {
    lease: Option<Lease>,
    /// The caller's key, read from its certificate once.
    owner: Option<Owner>,
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
    /// Bytes of this connection's answers its peer has not taken yet.
    pub queued_response_bytes: usize,
}

/// The answer bytes a connection may have waiting for its peer before a
/// read is refused `BUSY`: one read's worth, so a peer that never reads
/// holds at most that much of the server's memory beyond its flow-control
/// windows.
pub const QUEUED_RESPONSE_BYTES_MAX: usize = super::wire::READ_LEN_MAX as usize;

/// A read of at least this many bytes is answered with pieces that share
/// the region's chunks (one chunk's worth): the transport encrypts straight
/// from the region, and the only copy is into the packet. A shorter read is
/// copied into its answer, so that a write soon after it does not have to
/// copy a whole chunk the answer still holds.
pub const SHARED_READ_MIN: usize = super::region::CHUNK_BYTES;

/// Who answers an asset request.
#[derive(Debug, PartialEq, Eq)]
pub enum Answer {
    /// The worker did: this response.
    Now(Bytes),
    /// The worker did, for a bulk read: this response's header, then
    /// pieces that share the region's bytes ([`SHARED_READ_MIN`]).
    Shared(Vec<Bytes>),
    /// A storage request, well formed and for this node: the control
    /// plane's to answer.
    ControlPlane,
    /// A memory asset request for another cluster member's locator: to
    /// send it as `envelope` (`ASSET_PROXY`, for the caller's identity).
    Proxy {
        locator: super::address::Locator,
        envelope: Vec<u8>,
    },
}

impl AssetSession {
    /// The response to asset request `kind` with `payload`.
    pub fn answer(&mut self, kind: u8, payload: &[u8], caller: &Caller<'_>) -> Answer {
        let Some(assets) = caller.assets else {
            return Answer::Now(encode_error(
                ErrorCode::AssetsOff,
                "asset addressing is off on this server ([hypermesh_assets] nat_addressing = false)",
            ));
        };
        let request = match AssetRequest::decode(kind, payload) {
            Ok(request) => request,
            Err(e) => return Answer::Now(encode_error(ErrorCode::Malformed, &e.to_string())),
        };
        // Another member's asset: proxied to it where this node is a
        // cluster member ([`Answer::Proxy`]), else the client's to find.
        let elsewhere = request
            .address()
            .filter(|address| address.locator != assets.locator());
        if let Some(address) = elsewhere
            && !assets.proxies()
        {
            let e = Error::Elsewhere {
                address,
                locator: address.locator,
            };
            return Answer::Now(encode_error(code(&e), &e.to_string()));
        }
        let queued = caller.queued_response_bytes;
        if let AssetRequest::Read { len, .. } = request
            && queued > 0
            && queued + len as usize > QUEUED_RESPONSE_BYTES_MAX
        {
            return Answer::Now(encode_error(
                ErrorCode::Busy,
                &format!(
                    "this connection has {queued} bytes of answers not yet read; read them, then ask again"
                ),
            ));
        }
        if request.asset_kind() == AllocKind::Storage {
            if !assets.serves_storage() {
                return Answer::Now(encode_error(
                    ErrorCode::AssetsOff,
                    "this server's control plane serves no storage assets",
                ));
            }
            return Answer::ControlPlane;
        }
        if let Some(address) = elsewhere {
            if let Err(e) = super::wire::check_proxied(kind, &request) {
                let code = match e {
                    super::wire::WireError::ProxiedReadLen(_) => ErrorCode::AssetRange,
                    _ => ErrorCode::Malformed,
                };
                return Answer::Now(encode_error(code, &e.to_string()));
            }
            let owner = match self.owner(caller) {
                Ok(owner) => owner,
                Err(refused) => return Answer::Now(refused),
            };
            return Answer::Proxy {
                locator: address.locator,
                envelope: super::wire::encode_proxied(&owner, kind, payload),
            };
        }
        self.answer_memory(kind, request, assets, caller)
    }

    /// The caller: its certificate's key (SHA-256 of it, as admission's
    /// ledger names it), read once per connection.
    fn owner(&mut self, caller: &Caller<'_>) -> Result<Owner, Bytes> {
        if let Some(owner) = self.owner {
            return Ok(owner);
        }
        let key = crate::trust::spki_sha256(caller.certificate).ok_or_else(|| {
            encode_error(
                ErrorCode::Malformed,
                "the client certificate's key could not be read",
            )
        })?;
        Ok(*self.owner.insert(Owner(key)))
    }

    fn answer_memory(
        &mut self,
        kind: u8,
        request: AssetRequest<'_>,
        assets: &Arc<MemoryAssets>,
        caller: &Caller<'_>,
    ) -> Answer {
        let owner = match &self.lease {
            Some(lease) => lease.owner,
            None => {
                let owner = match self.owner(caller) {
                    Ok(owner) => owner,
                    Err(refused) => return Answer::Now(refused),
                };
                assets.connected(&owner);
                self.lease = Some(Lease {
                    assets: assets.clone(),
                    owner,
                });
                owner
            }
        };
        let kind = kind | RESPONSE_FLAG;
        let ok = |body: &[u8]| Answer::Now(encode(kind, body));
        let read = |span: Span<'_>| {
            if span.len() < SHARED_READ_MIN {
                return Answer::Now(copied(kind, &span));
            }
            let mut head = BytesMut::with_capacity(HEADER_LEN);
            put_header(&mut head, kind, span.len());
            let mut pieces = Vec::with_capacity(2 + span.len() / super::region::CHUNK_BYTES);
            pieces.push(head.freeze());
            span.share(&mut pieces);
            Answer::Shared(pieces)
        };
        serve(assets, &owner, request, caller.worker, ok, read)
            .unwrap_or_else(|e| Answer::Now(encode_error(code(&e), &e.to_string())))
    }
}

/// A read's answer with the bytes copied into it.
fn copied(kind: u8, span: &Span<'_>) -> Bytes {
    let mut out = BytesMut::with_capacity(HEADER_LEN + span.len());
    put_header(&mut out, kind, span.len());
    span.copy_to(&mut out);
    out.freeze()
}

/// The response to an `ASSET_PROXY` request (`payload`), which another
/// member of the cluster (the worker checked its node certificate) sends
/// for a client of its own whose certificate it verified: served by this
/// member's worker as that owner's own request would be, for an asset
/// this node holds (a proxied request is never proxied on). Each renews
/// the caller's lease, as a connection of its own would hold it.
/// `queued_response_bytes` bounds reads as on any connection.
pub fn answer_proxied(
    assets: &MemoryAssets,
    payload: &[u8],
    queued_response_bytes: usize,
) -> Bytes {
    let kind = crate::protocols::stoq_registry::ASSET_PROXY;
    let (owner, request) = match super::wire::decode_proxied(payload) {
        Ok(decoded) => decoded,
        Err(e) => return encode_error(ErrorCode::Malformed, &e.to_string()),
    };
    if request.asset_kind() == AllocKind::Storage {
        return encode_error(
            ErrorCode::Malformed,
            "storage requests are not proxied: every member serves them from its own store",
        );
    }
    if let AssetRequest::Read { len, .. } = request
        && queued_response_bytes > 0
        && queued_response_bytes + len as usize > QUEUED_RESPONSE_BYTES_MAX
    {
        return encode_error(
            ErrorCode::Busy,
            "the member's connection has answers not yet read; retry in a moment",
        );
    }
    assets.connected(&owner);
    let kind = kind | RESPONSE_FLAG;
    // At most [`super::wire::PROXIED_READ_LEN_MAX`], and copied again by
    // the member that proxies it: a copy here costs little.
    let answer = serve(
        assets,
        &owner,
        request,
        0,
        |body| encode(kind, body),
        |span| copied(kind, &span),
    );
    assets.disconnected(&owner, Instant::now());
    answer.unwrap_or_else(|e| encode_error(code(&e), &e.to_string()))
}

/// The answer to `request`: its payload made into `T` by `ok`, or for a
/// read, the region's bytes by `read` (while the shard is held).
fn serve<T>(
    assets: &MemoryAssets,
    owner: &Owner,
    request: AssetRequest<'_>,
    worker: usize,
    ok: impl Fn(&[u8]) -> T,
    read: impl FnOnce(Span<'_>) -> T,
) -> Result<T, AssetError> {
    Ok(match request {
        AssetRequest::Alloc { size, .. } => ok(&assets.alloc(worker, owner, size)?.octets()),
        AssetRequest::Read {
            address,
            offset,
            len,
        } => assets.with(address, |s| {
            s.read(owner, address, offset, u64::from(len)).map(read)
        })?,
        AssetRequest::Write {
            address,
            offset,
            data,
        } => {
            assets.with(address, |s| s.write(owner, address, offset, data))?;
            ok(&[])
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
            ok(&[&[u8::from(swapped)][..], &was].concat())
        }
        AssetRequest::Free { address } => ok(&assets
            .with(address, |s| s.free(owner, address))?
            .to_be_bytes()),
        AssetRequest::List { .. } => {
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
            ok(&serde_json::to_vec(&listed).expect("a list serializes"))
        }
        AssetRequest::Grant {
            address,
            grantee,
            access,
        } => {
            let changed = assets.with(address, |s| match access {
                Some(access) => s.grant(owner, address, grantee, access),
                None => s.revoke_grant(owner, address, &grantee),
            })?;
            ok(&[u8::from(changed)])
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
        AssetError::Size(_)
        | AssetError::TooManyGrants
        | AssetError::IdsExhausted
        | AssetError::NodeFull { .. } => ErrorCode::AssetLimit,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::assets::address::{AssetAddress, Locator, NodeNumber};
    use crate::protocols::stoq::{KIND_ERROR, decode, decode_error_payload};

    fn answer(
        session: &mut AssetSession,
        caller: &Caller<'_>,
        request: &AssetRequest<'_>,
    ) -> (u8, Vec<u8>) {
        let (kind, payload) = request.encode();
        let bytes = match session.answer(kind, &payload, caller) {
            Answer::Now(bytes) => bytes.to_vec(),
            Answer::Shared(pieces) => pieces.concat(),
            _ => panic!("a memory request was handed on"),
        };
        let message = decode(&bytes, usize::MAX).unwrap();
        (message.kind, message.payload.to_vec())
    }

    /// Node `node`'s memory assets (one shard, `quota` bytes per owner),
    /// and an owner's certificate.
    fn node_and_owner(node: u16, quota: u64) -> (Arc<MemoryAssets>, rcgen::Certificate) {
        let node = NodeNumber::new(node).unwrap();
        let locator = Locator::in_ula("fd71:7e57::".parse().unwrap(), node);
        let assets = Arc::new(MemoryAssets::new(
            node,
            locator,
            1,
            (0, 16),
            (quota, u64::MAX),
        ));
        let key = rcgen::KeyPair::generate().unwrap();
        let certificate = rcgen::CertificateParams::new(vec!["owner".into()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        (assets, certificate)
    }

    /// A caller on worker 0 with nothing queued.
    fn first_worker<'a>(
        assets: &'a Arc<MemoryAssets>,
        certificate: &'a rcgen::Certificate,
    ) -> Caller<'a> {
        Caller {
            assets: Some(assets),
            certificate: certificate.der(),
            worker: 0,
            queued_response_bytes: 0,
        }
    }

    /// A memory asset of `size` bytes, allocated through `session`.
    fn alloc_memory(session: &mut AssetSession, caller: &Caller<'_>, size: u64) -> AssetAddress {
        let alloc = AssetRequest::Alloc {
            kind: AllocKind::Memory,
            size,
            name: None,
        };
        let (kind, address) = answer(session, caller, &alloc);
        assert_eq!(
            kind,
            crate::protocols::stoq_registry::ASSET_ALLOC | RESPONSE_FLAG
        );
        AssetAddress::from_octets(address.try_into().unwrap())
    }

    #[test]
    fn a_read_waits_while_unread_answers_would_pass_the_bound() {
        let (assets, certificate) = node_and_owner(0, 64 << 20);
        let mut caller = first_worker(&assets, &certificate);
        let mut session = AssetSession::default();
        let address = alloc_memory(&mut session, &caller, 1 << 20);
        let read = AssetRequest::Read {
            address,
            offset: 0,
            len: 1 << 20,
        };
        // Nothing waiting, or room for it: answered.
        for queued in [0, QUEUED_RESPONSE_BYTES_MAX - (1 << 20)] {
            caller.queued_response_bytes = queued;
            let (kind, bytes) = answer(&mut session, &caller, &read);
            assert_ne!(kind, KIND_ERROR);
            assert_eq!(bytes.len(), 1 << 20);
        }
        // Past the bound: BUSY, and nothing built.
        caller.queued_response_bytes = QUEUED_RESPONSE_BYTES_MAX - (1 << 20) + 1;
        let (kind, payload) = answer(&mut session, &caller, &read);
        assert_eq!(kind, KIND_ERROR);
        assert_eq!(decode_error_payload(&payload).0, ErrorCode::Busy as u16);
    }

    #[test]
    fn a_bulk_read_shares_the_region_and_keeps_its_bytes_through_a_later_write() {
        let (assets, certificate) = node_and_owner(0, 64 << 20);
        let caller = first_worker(&assets, &certificate);
        let mut session = AssetSession::default();
        let address = alloc_memory(&mut session, &caller, 1 << 20);
        let old: Vec<u8> = (0..1u32 << 20).map(|i| (i % 253) as u8).collect();
        for (at, part) in old.chunks(60_000).enumerate() {
            let write = AssetRequest::Write {
                address,
                offset: at as u64 * 60_000,
                data: part,
            };
            assert_eq!(answer(&mut session, &caller, &write).1, b"");
        }
        let ask = |session: &mut AssetSession, offset: u64, len: u32| {
            let (kind, payload) = AssetRequest::Read {
                address,
                offset,
                len,
            }
            .encode();
            session.answer(kind, &payload, &caller)
        };
        // Shorter than a chunk: one copied answer.
        let short = SHARED_READ_MIN as u32 - 1;
        assert!(matches!(ask(&mut session, 5, short), Answer::Now(_)));
        // A chunk or more: the header, then the region's pieces.
        let Answer::Shared(pieces) = ask(&mut session, 5, (1 << 20) - 5) else {
            panic!("a bulk read was copied");
        };
        assert!(pieces.len() > 2, "{} pieces", pieces.len());
        assert_eq!(pieces[0].len(), HEADER_LEN);
        // The owner overwrites everything before the answer is sent: the
        // answer still carries what was there when it was made.
        let new = vec![0xee; 60_000];
        for at in 0..(1u64 << 20).div_ceil(60_000) {
            let len = (60_000).min((1 << 20) - at as usize * 60_000);
            let write = AssetRequest::Write {
                address,
                offset: at * 60_000,
                data: &new[..len],
            };
            assert_eq!(answer(&mut session, &caller, &write).1, b"");
        }
        let message = pieces.concat();
        let message = decode(&message, usize::MAX).unwrap();
        assert_eq!(
            message.kind,
            crate::protocols::stoq_registry::ASSET_READ | RESPONSE_FLAG
        );
        assert_eq!(message.payload, &old[5..]);
        let (_, now) = answer(
            &mut session,
            &caller,
            &AssetRequest::Read {
                address,
                offset: 0,
                len: 1 << 20,
            },
        );
        assert!(now.iter().all(|b| *b == 0xee));
    }

    #[test]
    fn another_locator_is_proxied_only_by_a_member_and_the_holder_serves_the_caller_named() {
        let (assets, certificate) = node_and_owner(1, 1 << 20);
        let locator = assets.locator();
        let caller = Caller {
            assets: Some(&assets),
            certificate: certificate.der(),
            worker: 0,
            queued_response_bytes: 0,
        };
        let owner = Owner(crate::trust::spki_sha256(certificate.der()).unwrap());
        let mut session = AssetSession::default();
        let alloc = AssetRequest::Alloc {
            kind: AllocKind::Memory,
            size: 4096,
            name: None,
        };
        let (_, address) = answer(&mut session, &caller, &alloc);
        let address = AssetAddress::from_octets(address.try_into().unwrap());
        let write = AssetRequest::Write {
            address,
            offset: 0,
            data: b"abc",
        };
        answer(&mut session, &caller, &write);

        // Another node's asset: the client's to find on a single node, the
        // control plane's to proxy on a member.
        let elsewhere = AssetAddress {
            locator: Locator(locator.0 + 1),
            ..address
        };
        let (kind, payload) = AssetRequest::Read {
            address: elsewhere,
            offset: 0,
            len: 3,
        }
        .encode();
        let Answer::Now(bytes) = session.answer(kind, &payload, &caller) else {
            panic!("handed on without a proxy");
        };
        let refused = decode(&bytes, usize::MAX).unwrap();
        assert_eq!(
            decode_error_payload(&refused.payload).0,
            ErrorCode::AssetElsewhere as u16
        );
        assets.set_proxies();
        let Answer::Proxy {
            locator: to,
            envelope,
        } = session.answer(kind, &payload, &caller)
        else {
            panic!("not proxied");
        };
        assert_eq!(to, elsewhere.locator);
        let (named, _) = super::super::wire::decode_proxied(&envelope).unwrap();
        assert_eq!(named, owner, "the caller's own key");

        // At the holder: the owner named in the envelope is who is served.
        // The holder's response: its payload, or its error code.
        let raw = |payload: &[u8]| {
            let message = decode(&answer_proxied(&assets, payload, 0), usize::MAX).unwrap();
            match message.kind {
                KIND_ERROR => Err(decode_error_payload(&message.payload)),
                kind => {
                    assert_eq!(
                        kind,
                        crate::protocols::stoq_registry::ASSET_PROXY | RESPONSE_FLAG
                    );
                    Ok(message.payload.to_vec())
                }
            }
        };
        let proxied = |owner: &Owner, request: &AssetRequest<'_>| {
            let (kind, payload) = request.encode();
            raw(&super::super::wire::encode_proxied(owner, kind, &payload))
        };
        let read = AssetRequest::Read {
            address,
            offset: 0,
            len: 3,
        };
        assert_eq!(proxied(&owner, &read).unwrap(), b"abc");
        let stranger = Owner([7; 32]);
        assert_eq!(
            proxied(&stranger, &read).unwrap_err().0,
            ErrorCode::AssetForbidden as u16
        );
        // Never proxied on, never an allocation or a list.
        let onward = AssetRequest::Read {
            address: elsewhere,
            offset: 0,
            len: 3,
        };
        assert_eq!(
            proxied(&owner, &onward).unwrap_err().0,
            ErrorCode::AssetElsewhere as u16
        );
        for local in [
            alloc,
            AssetRequest::List {
                kind: AllocKind::Memory,
            },
        ] {
            assert_eq!(
                proxied(&owner, &local).unwrap_err().0,
                ErrorCode::Malformed as u16
            );
        }
        assert_eq!(
            raw(&owner.0[..20]).unwrap_err().0,
            ErrorCode::Malformed as u16
        );
        let written = AssetRequest::Write {
            address,
            offset: 1,
            data: b"xy",
        };
        assert_eq!(proxied(&owner, &written).unwrap(), b"");
        assert_eq!(proxied(&owner, &read).unwrap(), b"axy");
    }
}
