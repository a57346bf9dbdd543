//! The members' asset proxy: a worker asked for a memory asset under
//! another member's locator sends the request (`ASSET_PROXY`) to that
//! member itself, from its own thread, over the peer thread's mutual-TLS
//! connection ([`dataplane::client::peers`]); the answer comes back to the
//! worker as a control-plane reply would. The control plane keeps the
//! routes (each member's locator, from the Raft membership) and the peers
//! current; it is not on the request's path.

use super::Member;
use super::network::holds_key_of;
use dataplane::client::peers::{PeerReply, PeerRequest, Peers};
use dataplane::client::rpc::Reply as PeerAnswer;
use dataplane::control::{ControlPort, ProxiedRequest, Reply};
use dataplane::protocols::stoq::ErrorCode;
use dataplane::protocols::stoq_registry::ASSET_PROXY;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

/// How long a proxied request may take.
pub const TIMEOUT: Duration = Duration::from_secs(2);
/// Requests a member has proxied and not had answered (each read at most
/// `PROXIED_READ_LEN_MAX`): what clients can make it hold, and add to the
/// connections it shares with Raft, stays bounded.
pub const IN_FLIGHT_MAX: usize = 64;

/// What the proxy reads on the workers' threads, kept current by the
/// member's control plane.
pub struct AssetProxy {
    me: u64,
    /// The members by locator (several only when the membership is wrong).
    routes: RwLock<HashMap<u64, Vec<(u64, Member)>>>,
    peers: RwLock<Option<Arc<Peers>>>,
    in_flight: AtomicUsize,
}

impl AssetProxy {
    /// Plug a proxy for member `me` into `port`.
    pub fn install(port: &Arc<ControlPort>, me: u64) -> Arc<Self> {
        let proxy = Arc::new(Self {
            me,
            routes: RwLock::default(),
            peers: RwLock::default(),
            in_flight: AtomicUsize::new(0),
        });
        let (sender, replies) = (proxy.clone(), port.clone());
        port.set_asset_proxy(Arc::new(move |request| sender.send(request, &replies)));
        proxy
    }

    /// The members now (after a membership change).
    pub fn set_members<'a>(&self, members: impl Iterator<Item = (&'a u64, &'a Member)>) {
        let mut routes: HashMap<u64, Vec<(u64, Member)>> = HashMap::new();
        for (id, member) in members {
            if let Some(locator) = member.locator {
                routes
                    .entry(locator)
                    .or_default()
                    .push((*id, member.clone()));
            }
        }
        *self.routes.write().unwrap_or_else(|e| e.into_inner()) = routes;
    }

    /// The peer thread now (it is replaced when the node certificate is).
    pub fn set_peers(&self, peers: Option<Arc<Peers>>) {
        *self.peers.write().unwrap_or_else(|e| e.into_inner()) = peers;
    }

    /// Send `request` to the member its locator names; its answer goes
    /// back through `port`.
    fn send(
        self: &Arc<Self>,
        request: ProxiedRequest,
        port: &Arc<ControlPort>,
    ) -> Result<(), (u16, String)> {
        let elsewhere = |message: String| (ErrorCode::AssetElsewhere as u16, message);
        let locator = request.locator;
        let (id, holder) = {
            let routes = self.routes.read().unwrap_or_else(|e| e.into_inner());
            match routes.get(&locator.0).map(Vec::as_slice) {
                None | Some([]) => {
                    return Err(elsewhere(format!(
                        "no member of this cluster holds the locator {locator}"
                    )));
                }
                Some([(id, _)]) if *id == self.me => {
                    return Err(elsewhere(format!(
                        "the cluster knows this member by the locator {locator}, which its configuration no longer gives it (remove it and join again)"
                    )));
                }
                Some([(id, holder)]) => (*id, holder.clone()),
                Some(_) => {
                    return Err(elsewhere(format!(
                        "several members claim the locator {locator}; the operator must remove all but one"
                    )));
                }
            }
        };
        let busy = |message: String| (ErrorCode::Busy as u16, message);
        let Some(peers) = self.peers.read().unwrap_or_else(|e| e.into_inner()).clone() else {
            return Err(busy(
                "this member cannot reach the others yet: ask again in a moment".into(),
            ));
        };
        let Ok(remote) = holder.address.parse::<SocketAddr>() else {
            return Err(elsewhere(format!("{holder}'s address does not parse")));
        };
        if self.in_flight.fetch_add(1, Ordering::Relaxed) >= IN_FLIGHT_MAX {
            self.in_flight.fetch_sub(1, Ordering::Relaxed);
            return Err(busy(format!(
                "this member has {IN_FLIGHT_MAX} asset requests out to the others; retry in a moment, or ask {holder}"
            )));
        }
        let (worker, ticket, kind) = (request.worker, request.ticket, request.kind);
        let (proxy, port, named) = (self.clone(), port.clone(), holder.to_string());
        let on_reply = Box::new(move |reply: PeerReply| {
            proxy.in_flight.fetch_sub(1, Ordering::Relaxed);
            let result = match reply {
                PeerReply::Answered(PeerAnswer::Ok(bytes)) => Ok(bytes.to_vec()),
                PeerReply::Answered(PeerAnswer::Error { code, message }) => Err((code, message)),
                PeerReply::NotSent(why) => Err(elsewhere(format!(
                    "the asset is held by member {named}, which this member cannot reach ({why}): ask it directly"
                ))),
                PeerReply::Answered(PeerAnswer::Failed(why)) | PeerReply::Unknown(why) => {
                    Err(busy(format!(
                        "the asset is held by member {named}, which did not answer ({why}); it may have done the request: read back, then retry"
                    )))
                }
            };
            let reply = Reply {
                ticket,
                kind,
                result,
            };
            crate::runtime::send_reply(&port, worker, reply);
        });
        let sent = peers.send(PeerRequest {
            remote,
            // Members' server certificates carry their cluster address.
            server_name: remote.ip().to_string(),
            kind: ASSET_PROXY,
            payload: request.envelope,
            deadline: Instant::now() + TIMEOUT,
            check: Some(holds_key_of(id, &holder.address)),
            on_reply,
        });
        if sent.is_err() {
            self.in_flight.fetch_sub(1, Ordering::Relaxed);
            return Err(busy(
                "too many requests to the other members are queued: retry in a moment".into(),
            ));
        }
        Ok(())
    }
}

impl std::fmt::Debug for AssetProxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AssetProxy")
            .field("me", &self.me)
            .field("in_flight", &self.in_flight.load(Ordering::Relaxed))
            .finish()
    }
}
