//! The cluster's Raft network between servers: each message is one
//! `stoq/1` request (`RAFT_APPEND`, `RAFT_VOTE`, `RAFT_SNAPSHOT`, bytes of
//! [`super::rpc`]) on the long-lived mutual-TLS connection the peer thread
//! ([`dataplane::client::peers`]) holds to each member, authenticated with
//! this member's node certificate. [`request`] is also how a member sends
//! a peer anything else (a proposal for the leader).

use super::{Member, TypeConfig, rpc};
use bytes::Bytes;
use dataplane::client::peers::{PeerCheck, PeerIdentity, PeerReply, PeerRequest, Peers};
use dataplane::client::rpc::Reply;
use dataplane::protocols::stoq_registry::{RAFT_APPEND, RAFT_SNAPSHOT, RAFT_VOTE};
use openraft::error::{
    InstallSnapshotError, NetworkError, PayloadTooLarge, RPCError, RaftError, Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use std::cell::RefCell;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The largest Raft message sent as one request: under the server's
/// request bound (`stoq::REQUEST_PAYLOAD_MAX`), so an append of more is
/// cut (openraft sends fewer entries) and snapshots go in chunks of it.
pub const MESSAGE_MAX: usize = 60 * 1024;

/// Why a request to a peer got no answer.
#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    /// It never reached the peer (down, partitioned, queue full): the
    /// peer did nothing.
    #[error("{0}")]
    Unreachable(String),
    /// It was sent and no answer came: the peer may have acted on it.
    #[error("{0} (it may have been acted on)")]
    Unknown(String),
    /// It answered with an error.
    #[error("the peer answered {code:#x}: {message}")]
    Refused { code: u16, message: String },
}

/// Send `kind` with `payload` to the member at `address` and wait for the
/// answer, at most `timeout`. With `member`, the request goes only to a
/// peer holding that member's key ([`holds_key_of`]); without, to any
/// member of the cluster at that address.
pub async fn request(
    peers: &Peers,
    address: &str,
    member: Option<u64>,
    kind: u8,
    payload: Vec<u8>,
    timeout: Duration,
) -> Result<Bytes, PeerError> {
    let remote: SocketAddr = address
        .parse()
        .map_err(|_| PeerError::Unreachable(format!("{address:?} is not an [address]:port")))?;
    let (tx, rx) = tokio::sync::oneshot::channel();
    let request = PeerRequest {
        remote,
        // Members' server certificates carry their cluster address.
        server_name: remote.ip().to_string(),
        kind,
        payload: Bytes::from(payload),
        deadline: Instant::now() + timeout,
        check: member.map(|id| holds_key_of(id, address)),
        on_reply: Box::new(move |reply| {
            let _ = tx.send(reply);
        }),
    };
    let started = Instant::now();
    if peers.send(request).is_err() {
        return Err(PeerError::Unreachable(
            "too many requests to peers are queued".into(),
        ));
    }
    // The peer thread answers every request by its deadline; a thread that
    // died answers none.
    let reply = tokio::time::timeout(timeout + Duration::from_secs(1), rx).await;
    let took = started.elapsed();
    if took > Duration::from_millis(100) {
        tracing::debug!(
            kind,
            peer = address,
            took_ms = took.as_millis() as u64,
            "slow peer request"
        );
    }
    match reply {
        Ok(Ok(PeerReply::Answered(Reply::Ok(bytes)))) => Ok(bytes),
        Ok(Ok(PeerReply::Answered(Reply::Error { code, message }))) => {
            Err(PeerError::Refused { code, message })
        }
        Ok(Ok(PeerReply::Answered(Reply::Failed(why)) | PeerReply::Unknown(why))) => {
            Err(PeerError::Unknown(why))
        }
        Ok(Ok(PeerReply::NotSent(why))) => Err(PeerError::Unreachable(why)),
        Ok(Err(_)) | Err(_) => Err(PeerError::Unknown(
            "the cluster's peer connections stopped".into(),
        )),
    }
}

/// The check that the peer at `address` holds the key of member `id`.
/// The handshake proves only that its certificate is a member's, issued by
/// the cluster for that address: a member removed and joined again at the
/// same address holds a new key and is another member.
pub fn holds_key_of(id: u64, address: &str) -> PeerCheck {
    let address = address.to_owned();
    Box::new(move |peer: &PeerIdentity| -> Result<(), String> {
        let holder = super::node::node_id_of_pin(&peer.spki_sha256);
        if holder == id {
            Ok(())
        } else {
            Err(format!(
                "the peer at {address} holds the key of member {holder}, not of member {id}"
            ))
        }
    })
}

/// When each member last took this member's appends as its leader's: the
/// vote those appends carried, and when this member sent the latest one
/// it answered (an answer other than "a higher vote": the member took the
/// vote, and refuses to vote for another for openraft's leader lease from
/// when it got it). What the leader's read lease stands on
/// (`ClusterAuthority::read_index`).
pub type Acks = Rc<RefCell<HashMap<u64, (openraft::Vote<u64>, Instant)>>>;

/// One member's side of the network.
pub struct StoqNetwork {
    pub peers: super::PeerSlot,
    pub acks: Acks,
}

impl RaftNetworkFactory<TypeConfig> for StoqNetwork {
    type Network = StoqConnection;

    async fn new_client(&mut self, target: u64, node: &Member) -> StoqConnection {
        StoqConnection {
            target,
            address: node.address.clone(),
            peers: self.peers.clone(),
            acks: self.acks.clone(),
        }
    }
}

pub struct StoqConnection {
    target: u64,
    address: String,
    peers: super::PeerSlot,
    acks: Acks,
}

type RpcError<E = openraft::error::Infallible> = RPCError<u64, Member, RaftError<u64, E>>;

fn unreachable<E: std::error::Error>(e: PeerError) -> RPCError<u64, Member, E> {
    match e {
        PeerError::Unreachable(why) => {
            RPCError::Unreachable(Unreachable::new(&std::io::Error::other(why)))
        }
        refused => RPCError::Network(NetworkError::new(&refused)),
    }
}

fn undecodable<E: std::error::Error>(what: &str) -> RPCError<u64, Member, E> {
    RPCError::Network(NetworkError::new(&std::io::Error::new(
        std::io::ErrorKind::InvalidData,
        format!("the peer's {what} answer cannot be decoded"),
    )))
}

impl StoqConnection {
    async fn send(
        &self,
        kind: u8,
        payload: Vec<u8>,
        option: &RPCOption,
    ) -> Result<Bytes, PeerError> {
        // Until this member has its node certificate it reaches nobody.
        let peers: Option<Arc<Peers>> = self.peers.borrow().clone();
        let peers = peers.ok_or_else(|| {
            PeerError::Unreachable("this member has no node certificate yet".into())
        })?;
        request(
            &peers,
            &self.address,
            Some(self.target),
            kind,
            payload,
            option.hard_ttl(),
        )
        .await
    }
}

impl RaftNetwork<TypeConfig> for StoqConnection {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<u64>, RpcError> {
        let entries = rpc.entries.len();
        let bytes =
            rpc::encode_append(&rpc).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        if bytes.len() > MESSAGE_MAX && entries > 1 {
            return Err(RPCError::PayloadTooLarge(
                PayloadTooLarge::new_entries_hint((entries / 2) as u64),
            ));
        }
        let (vote, sent) = (rpc.vote, Instant::now());
        let answer = self
            .send(RAFT_APPEND, bytes, &option)
            .await
            .map_err(unreachable)?;
        let response = rpc::decode_append_response(&answer).ok_or_else(|| undecodable("append"))?;
        if !matches!(response, AppendEntriesResponse::HigherVote(_)) {
            let mut acks = self.acks.borrow_mut();
            let ack = acks.entry(self.target).or_insert((vote, sent));
            // A late answer to an older vote's append never replaces a
            // newer one's.
            if vote > ack.0 || (vote == ack.0 && sent > ack.1) {
                *ack = (vote, sent);
            }
        }
        Ok(response)
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<InstallSnapshotResponse<u64>, RpcError<InstallSnapshotError>> {
        let answer = self
            .send(RAFT_SNAPSHOT, rpc::encode_snapshot(&rpc), &option)
            .await
            .map_err(unreachable)?;
        rpc::decode_snapshot_response(&answer).ok_or_else(|| undecodable("snapshot"))
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<u64>,
        option: RPCOption,
    ) -> Result<VoteResponse<u64>, RpcError> {
        let answer = self
            .send(RAFT_VOTE, rpc::encode_vote_request(&rpc), &option)
            .await
            .map_err(unreachable)?;
        rpc::decode_vote_response(&answer).ok_or_else(|| undecodable("vote"))
    }
}

impl std::fmt::Debug for StoqConnection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "member {} at {}", self.target, self.address)
    }
}
