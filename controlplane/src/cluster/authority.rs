//! The authority on a cluster member: requests answered through the Raft
//! log. A request that changes the state is proposed here, committed by a
//! majority, applied on every member, and answered from what applying it
//! did on this one; one that does not is answered from this member's
//! applied state. A member that is not the leader answers a change with
//! `NOT_LEADER`, naming the leader where it knows it, and the client asks
//! another member.

use super::{Outcome, Raft};
use crate::authority::api::{self, ServiceError};
use crate::authority::logged::AuthorityError;
use crate::authority::service::{Answer, AuthorityService, Caller, Handled, Pending};
use std::cell::RefCell;
use std::rc::Rc;
use std::time::SystemTime;

/// One member's authority: its service (sharing its machine with the Raft
/// state machine) and its Raft handle.
pub struct ClusterAuthority {
    service: Rc<RefCell<AuthorityService>>,
    raft: Raft,
}

impl ClusterAuthority {
    /// `service` must be the one whose machine `raft`'s state machine
    /// applies to.
    pub fn new(service: Rc<RefCell<AuthorityService>>, raft: Raft) -> Self {
        Self { service, raft }
    }

    pub fn service(&self) -> &Rc<RefCell<AuthorityService>> {
        &self.service
    }

    pub fn raft(&self) -> &Raft {
        &self.raft
    }

    /// One `stoq/1` request (see `AuthorityService::handle`), its change
    /// committed through the log.
    pub async fn handle(
        &self,
        caller: &Caller,
        kind: u8,
        payload: &[u8],
        now: SystemTime,
    ) -> Answer {
        let handled = self
            .service
            .borrow_mut()
            .handle_request(caller, kind, payload, now);
        match handled {
            Handled::Answer(answer) => answer,
            Handled::Commit(pending) => self.commit(*pending).await,
        }
    }

    /// Commit a proposal (a request's, or one of the service's own: the
    /// server's records, its certificate, the operator identity) through
    /// the log, and answer from what applying it did here.
    pub async fn commit(&self, pending: Pending) -> Answer {
        let Pending { command, finish } = pending;
        let applied = match self.raft.client_write(command).await {
            Ok(written) => match written.data {
                Outcome::Applied(applied) => Ok(applied),
                Outcome::Refused(refused) => Err(Rc::try_unwrap(refused)
                    .unwrap_or_else(|shared| AuthorityError::Stale(shared.to_string()))),
                Outcome::Nothing => {
                    return Err(ServiceError::new(
                        api::STORAGE,
                        "the command was applied as none",
                    ));
                }
            },
            Err(e) => return Err(self.not_committed(&e)),
        };
        finish(&mut self.service.borrow_mut(), applied)
    }

    /// The answer to a change this member could not commit.
    fn not_committed(
        &self,
        e: &openraft::error::RaftError<u64, openraft::error::ClientWriteError<u64, super::Member>>,
    ) -> ServiceError {
        match e.forward_to_leader() {
            Some(forward) => {
                let leader = match &forward.leader_node {
                    Some(member) => format!("the leader is {member}"),
                    None => "no leader is known yet".to_owned(),
                };
                ServiceError::new(
                    api::NOT_LEADER,
                    format!(
                        "this member is not the cluster's leader; {leader}: ask it, or another member"
                    ),
                )
            }
            None => ServiceError::new(
                api::STORAGE,
                format!("the cluster could not commit the change: {e}"),
            ),
        }
    }
}
