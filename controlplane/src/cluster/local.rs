//! Members in one process: a Raft network that hands each message to the
//! target's handle directly, as the bytes the cluster's `stoq/1` requests
//! carry (`super::rpc`), so the encoding is exercised as on the wire.
//! Members can be cut off and brought back. For tests, simulations and
//! the `cluster-micro` benchmark; servers talk over `stoq/1`.

use super::{Host, LogStore, Member, Raft, StateMachine, TypeConfig, rpc};
use openraft::error::{InstallSnapshotError, RPCError, RaftError, RemoteError, Unreachable};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};
use std::rc::Rc;

/// The nodes that can be reached, and those cut off.
#[derive(Clone, Default)]
pub struct Routes {
    pub rafts: Rc<RefCell<BTreeMap<u64, Raft>>>,
    pub down: Rc<RefCell<BTreeSet<u64>>>,
}

impl Routes {
    /// The target's handle, unless the sender or the target is cut off.
    fn reach(&self, from: u64, to: u64) -> Result<Raft, Unreachable> {
        let down = self.down.borrow();
        let raft = self.rafts.borrow().get(&to).cloned();
        match raft {
            Some(raft) if !down.contains(&from) && !down.contains(&to) => Ok(raft),
            _ => Err(Unreachable::new(&std::io::Error::other(format!(
                "node {to} is cut off from node {from}"
            )))),
        }
    }
}

/// One member's side of the network.
pub struct Network {
    pub from: u64,
    pub routes: Routes,
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = Connection;

    async fn new_client(&mut self, target: u64, _node: &Member) -> Connection {
        Connection {
            from: self.from,
            to: target,
            routes: self.routes.clone(),
        }
    }
}

pub struct Connection {
    from: u64,
    to: u64,
    routes: Routes,
}

type RpcError<E = openraft::error::Infallible> = RPCError<u64, Member, RaftError<u64, E>>;

impl RaftNetwork<TypeConfig> for Connection {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        _option: RPCOption,
    ) -> Result<AppendEntriesResponse<u64>, RpcError> {
        let raft = self.routes.reach(self.from, self.to)?;
        // Through the bytes the cluster's `stoq/1` requests carry.
        let rpc = rpc::decode_append(&rpc::encode_append(&rpc).unwrap()).unwrap();
        let response = raft
            .append_entries(rpc)
            .await
            .map_err(|e| RemoteError::new(self.to, e))?;
        Ok(rpc::decode_append_response(&rpc::encode_append_response(&response)).unwrap())
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        _option: RPCOption,
    ) -> Result<InstallSnapshotResponse<u64>, RpcError<InstallSnapshotError>> {
        let raft = self.routes.reach(self.from, self.to)?;
        let rpc = rpc::decode_snapshot(&rpc::encode_snapshot(&rpc)).unwrap();
        let response = raft
            .install_snapshot(rpc)
            .await
            .map_err(|e| RemoteError::new(self.to, e))?;
        Ok(rpc::decode_snapshot_response(&rpc::encode_snapshot_response(&response)).unwrap())
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<u64>,
        _option: RPCOption,
    ) -> Result<VoteResponse<u64>, RpcError> {
        let raft = self.routes.reach(self.from, self.to)?;
        let rpc = rpc::decode_vote_request(&rpc::encode_vote_request(&rpc)).unwrap();
        let response = raft
            .vote(rpc)
            .await
            .map_err(|e| RemoteError::new(self.to, e))?;
        Ok(rpc::decode_vote_response(&rpc::encode_vote_response(&response)).unwrap())
    }
}

/// Start member `id` on this network: its Raft log in `dir`
/// (`raft-log.redb`), its state machine applying to `host`'s machine.
pub async fn start(
    id: u64,
    routes: &Routes,
    config: std::sync::Arc<openraft::Config>,
    dir: &std::path::Path,
    host: Host,
) -> Result<Raft, String> {
    let log = LogStore::open(&dir.join("raft-log.redb")).map_err(|e| e.to_string())?;
    let network = Network {
        from: id,
        routes: routes.clone(),
    };
    let raft = Raft::new(id, config, network, log, StateMachine::new(host))
        .await
        .map_err(|e| e.to_string())?;
    routes.rafts.borrow_mut().insert(id, raft.clone());
    Ok(raft)
}
