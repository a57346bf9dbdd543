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
use std::sync::{Arc, RwLock, Weak};
use std::time::{Duration, Instant};

/// How long a proxied request may take.
pub const TIMEOUT: Duration = Duration::from_secs(2);
/// Requests a member has proxied and not had answered (each read at most
/// `PROXIED_READ_LEN_MAX`): what clients can make it hold, and add to the
/// connections it shares with Raft, stays bounded.
pub const IN_FLIGHT_MAX: usize = 64;

/// The members (id, member) by the locator they hold assets under.
type Routes = HashMap<u64, Vec<(u64, Member)>>;

/// What the proxy reads on the workers' threads, kept current by the
/// member's control plane.
pub struct AssetProxy {
    me: u64,
    /// The members by locator (several only when the membership is wrong);
    /// `None` until the control plane first set them.
    routes: RwLock<Option<Routes>>,
    /// The peer thread. A worker sends under the read lock (a queue push),
    /// so the control plane, which swaps it, always drops the last handle
    /// of an old one, never a worker.
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
        // Weak: the port holds this closure.
        let (sender, replies) = (proxy.clone(), Arc::downgrade(port));
        port.set_asset_proxy(Arc::new(move |request| sender.send(request, &replies)));
        proxy
    }

    /// The members now (after a membership change).
    pub fn set_members<'a>(&self, members: impl Iterator<Item = (&'a u64, &'a Member)>) {
        let mut routes = Routes::new();
        for (id, member) in members {
            if let Some(locator) = member.locator {
                routes
                    .entry(locator)
                    .or_default()
                    .push((*id, member.clone()));
            }
        }
        *self.routes.write().unwrap_or_else(|e| e.into_inner()) = Some(routes);
    }

    /// The peer thread now (it is replaced when the node certificate is;
    /// `None` at shutdown). The old one is dropped here, outside the lock:
    /// its thread stops, and what it still held is answered as it goes.
    pub fn set_peers(&self, peers: Option<Arc<Peers>>) {
        let old = std::mem::replace(
            &mut *self.peers.write().unwrap_or_else(|e| e.into_inner()),
            peers,
        );
        drop(old);
    }

    /// Send `request` to the member its locator names; its answer goes
    /// back through `port`.
    fn send(
        self: &Arc<Self>,
        request: ProxiedRequest,
        port: &Weak<ControlPort>,
    ) -> Result<(), (u16, String)> {
        let elsewhere = |message: String| (ErrorCode::AssetElsewhere as u16, message);
        let busy = |message: String| (ErrorCode::Busy as u16, message);
        let locator = request.locator;
        let (id, holder) = {
            let routes = self.routes.read().unwrap_or_else(|e| e.into_inner());
            let Some(routes) = routes.as_ref() else {
                return Err(busy(
                    "this member does not know the others' locators yet: ask again in a moment"
                        .into(),
                ));
            };
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
        if self
            .peers
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .is_none()
        {
            return Err(busy(
                "this member cannot reach the others yet: ask again in a moment".into(),
            ));
        }
        let Ok(remote) = holder.address.parse::<SocketAddr>() else {
            return Err(elsewhere(format!("{holder}'s address does not parse")));
        };
        if self.in_flight.fetch_add(1, Ordering::Relaxed) >= IN_FLIGHT_MAX {
            self.in_flight.fetch_sub(1, Ordering::Relaxed);
            return Err(busy(format!(
                "this member has {IN_FLIGHT_MAX} asset requests out to the others; retry in a moment, or ask {holder}"
            )));
        }
        let mut pending = Pending {
            proxy: self.clone(),
            port: port.clone(),
            worker: request.worker,
            ticket: request.ticket,
            kind: request.kind,
            answer_to: request.answer,
            answered: false,
        };
        let named = holder.to_string();
        let on_reply = Box::new(move |reply: PeerReply| {
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
            pending.answer(result);
        });
        let peers = self.peers.read().unwrap_or_else(|e| e.into_inner());
        let Some(peers) = peers.as_ref() else {
            // `on_reply` goes unused: its drop answers and counts it.
            return Ok(());
        };
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
        // Refused (the queue is full): dropping the request answers the
        // client through its `on_reply`'s drop.
        drop(sent);
        Ok(())
    }
}

/// One proxied request's way back to its worker: answered once, by the
/// peer thread's reply or, if that never comes (the request was refused,
/// or the peer thread stopped holding it), when this is dropped.
struct Pending {
    proxy: Arc<AssetProxy>,
    port: Weak<ControlPort>,
    worker: usize,
    ticket: dataplane::control::Ticket,
    kind: u8,
    /// Takes the answer instead of the worker (a VM thread's request).
    answer_to: Option<dataplane::control::ProxyAnswer>,
    answered: bool,
}

impl Pending {
    fn answer(&mut self, result: Result<Vec<u8>, (u16, String)>) {
        if std::mem::replace(&mut self.answered, true) {
            return;
        }
        self.proxy.in_flight.fetch_sub(1, Ordering::Relaxed);
        if let Some(answer_to) = self.answer_to.take() {
            return answer_to(result);
        }
        let Some(port) = self.port.upgrade() else {
            return;
        };
        // Once: this runs on the peer thread, which carries Raft too; a
        // worker whose queue is full loses this answer (its client's
        // request times out), not the cluster its heartbeats.
        let reply = Reply {
            ticket: self.ticket,
            kind: self.kind,
            result,
        };
        if port.reply(self.worker, reply).is_err() {
            tracing::warn!(
                worker = self.worker,
                "worker reply queue full; a proxied answer was dropped"
            );
        }
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        self.answer(Err((
            ErrorCode::Busy as u16,
            "the member holding the asset gave no answer (this member's connections to the others were full or restarting); it may have done the request: read back, then retry".into(),
        )));
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

#[cfg(test)]
mod tests {
    use super::*;
    use dataplane::control::{Returned, Ticket};

    fn ticket() -> Ticket {
        Ticket {
            handle: 1,
            conn_id: 2,
            stream: quinn_proto::StreamId::new(quinn_proto::Side::Client, quinn_proto::Dir::Bi, 0),
        }
    }

    /// A request the peer thread never answered (refused, or dropped with
    /// it) is answered BUSY once, and no longer counted in flight.
    #[test]
    fn a_request_never_answered_is_answered_once_when_dropped() {
        let port = ControlPort::new(1);
        let proxy = AssetProxy::install(&port, 1);
        let pending = |proxy: &Arc<AssetProxy>| {
            proxy.in_flight.fetch_add(1, Ordering::Relaxed);
            Pending {
                proxy: proxy.clone(),
                port: Arc::downgrade(&port),
                worker: 0,
                ticket: ticket(),
                kind: 0x51,
                answer_to: None,
                answered: false,
            }
        };
        drop(pending(&proxy));
        let Some(Returned::Stoq(reply)) = port.take_reply(0) else {
            panic!("no answer");
        };
        assert_eq!(reply.result.unwrap_err().0, ErrorCode::Busy as u16);
        assert_eq!(proxy.in_flight.load(Ordering::Relaxed), 0);
        // A VM thread's request: its answer goes to the VM thread, not to
        // a worker.
        let (tx, rx) = std::sync::mpsc::channel();
        let mut vm_request = pending(&proxy);
        vm_request.answer_to = Some(Box::new(move |result| {
            let _ = tx.send(result);
        }));
        drop(vm_request);
        assert_eq!(rx.recv().unwrap().unwrap_err().0, ErrorCode::Busy as u16);
        assert!(port.take_reply(0).is_none());
        assert_eq!(proxy.in_flight.load(Ordering::Relaxed), 0);
        // Answered, then dropped: one answer, counted once.
        let mut answered = pending(&proxy);
        answered.answer(Ok(b"abc".to_vec()));
        drop(answered);
        let Some(Returned::Stoq(reply)) = port.take_reply(0) else {
            panic!("no answer");
        };
        assert_eq!(reply.result.unwrap(), b"abc");
        assert!(port.take_reply(0).is_none());
        assert_eq!(proxy.in_flight.load(Ordering::Relaxed), 0);
    }

    /// Before the control plane gave it the members, or the peer thread,
    /// the proxy says to ask again; a locator no member holds is said so.
    #[test]
    fn routes_and_peers_unknown_are_busy_and_a_stranger_locator_elsewhere() {
        let port = ControlPort::new(1);
        let proxy = AssetProxy::install(&port, 1);
        let ask = |locator: u64| {
            port.proxy_asset(ProxiedRequest {
                worker: 0,
                ticket: ticket(),
                kind: 0x51,
                locator: dataplane::assets::address::Locator(locator),
                envelope: bytes::Bytes::new(),
                answer: None,
            })
            .expect("a proxy is plugged in")
            .unwrap_err()
            .0
        };
        assert_eq!(ask(7), ErrorCode::Busy as u16);
        let member = |locator| Member {
            name: "m2".into(),
            address: "[fd71:7e57::2]:4433".into(),
            locator: Some(locator),
        };
        let members = [
            (1u64, member(1)),
            (2, member(7)),
            (3, member(9)),
            (4, member(9)),
        ];
        proxy.set_members(members.iter().map(|(id, m)| (id, m)));
        assert_eq!(ask(8), ErrorCode::AssetElsewhere as u16, "no member");
        assert_eq!(
            ask(1),
            ErrorCode::AssetElsewhere as u16,
            "this member's own"
        );
        assert_eq!(ask(9), ErrorCode::AssetElsewhere as u16, "claimed twice");
        assert_eq!(ask(7), ErrorCode::Busy as u16, "no peer thread yet");
        assert_eq!(proxy.in_flight.load(Ordering::Relaxed), 0);
        assert!(
            port.take_reply(0).is_none(),
            "refusals are answered at once"
        );
    }
}
