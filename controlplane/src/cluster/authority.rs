//! The authority on a cluster member: requests answered through the Raft
//! log. A request that changes the state is proposed here, committed by a
//! majority, applied on every member, and answered from what applying it
//! did on this one; one that does not is answered from this member's
//! applied state. A member that is not the leader answers a change with
//! `NOT_LEADER`, naming the leader where it knows it, and the client asks
//! another member.

use super::{Member, Outcome, Raft, Recent};
use crate::authority::api::{self, ServiceError};
use crate::authority::logged::AuthorityError;
use crate::authority::service::{Answer, AuthorityService, Caller, Handled, Pending};
use crate::machine::Command;
use dataplane::client::peers::Peers;
use std::cell::RefCell;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

/// The largest command one log entry holds: one entry with an append's
/// framing fits one Raft message ([`super::network::MESSAGE_MAX`]).
pub const ENTRY_MAX: usize = super::network::MESSAGE_MAX - 1024;

/// How long a member waits for the leader to commit what it forwarded,
/// and then to apply it itself.
const FORWARD_TIMEOUT: Duration = Duration::from_secs(10);

/// How long after sending an append a majority took the leader still
/// answers reads from its lease: half of openraft's leader lease on the
/// followers (500 ms), well under the 400 ms a follower waits without
/// appends before it stands for election.
const READ_LEASE: Duration = Duration::from_millis(250);

/// How long a read waits to learn what the leader committed, and then to
/// apply it here.
const READ_FENCE_TIMEOUT: Duration = Duration::from_secs(2);

/// Where a member's connections to the others are, once it has its node
/// certificate.
pub type PeerSlot = Rc<RefCell<Option<Arc<Peers>>>>;

/// The last member this one took appends from, and when.
pub type Heard = Rc<std::cell::Cell<Option<(u64, std::time::Instant)>>>;

/// Whether any leader was heard from lately (in the last four
/// heartbeats).
pub fn heard_lately(heard: &Heard) -> bool {
    heard
        .get()
        .is_some_and(|(_, at)| at.elapsed() < LEADER_SILENT)
}

/// A leader not heard from this long is taken for gone: a follower answers
/// `NOT_LEADER` at once rather than hand it a change that waits for it
/// (four heartbeats).
const LEADER_SILENT: Duration = Duration::from_millis(4 * super::HEARTBEAT_MS);

/// One member's authority: its service (sharing its machine with the Raft
/// state machine) and its Raft handle.
pub struct ClusterAuthority {
    service: Rc<RefCell<AuthorityService>>,
    raft: Raft,
    /// How a follower hands its proposals to the leader: the peers, and
    /// the outcomes of what this member applied.
    forwarding: Option<(PeerSlot, Recent)>,
    /// When this member last heard from its leader (set by whoever takes
    /// its appends).
    heard: Heard,
    /// The members' acknowledgements of this member's appends, for the
    /// leader's read lease ([`Self::read_index`]); none: no lease.
    acks: Option<super::network::Acks>,
}

impl ClusterAuthority {
    /// `service` must be the one whose machine `raft`'s state machine
    /// applies to. Without [`Self::forwarding`], a follower answers a
    /// change `NOT_LEADER`.
    pub fn new(service: Rc<RefCell<AuthorityService>>, raft: Raft) -> Self {
        Self {
            service,
            raft,
            forwarding: None,
            heard: Heard::default(),
            acks: None,
        }
    }

    /// The leader answers reads from its lease while a majority took its
    /// appends lately ([`Self::read_index`]); `acks` is what its network
    /// records of that.
    pub fn leasing(mut self, acks: super::network::Acks) -> Self {
        self.acks = Some(acks);
        self
    }

    /// What the member's Raft transport sets when it takes an append.
    pub fn heard(&self) -> Heard {
        self.heard.clone()
    }

    /// A follower forwards what it proposes to the leader over `peers`
    /// (`CLUSTER_FORWARD`) and answers from `recent`, what applying it
    /// did here.
    pub fn forwarding(mut self, peers: PeerSlot, recent: Recent) -> Self {
        self.forwarding = Some((peers, recent));
        self
    }

    /// The leader, as this member knows it.
    pub fn leader(&self) -> Option<(u64, Member)> {
        let metrics = self.raft.metrics().borrow().clone();
        let id = metrics.current_leader?;
        let member = metrics
            .membership_config
            .membership()
            .get_node(&id)?
            .clone();
        Some((id, member))
    }

    /// Commit `command` through the log from any member: the leader
    /// appends it; a follower forwards it to the leader and waits until it
    /// applied it itself. The outcome is this member's apply of it.
    pub async fn submit(&self, command: Command) -> Result<Outcome, ServiceError> {
        // One entry travels in one Raft message: a larger one could never
        // be replicated.
        let bytes = crate::machine::codec::encode(&command).map_err(|e| {
            ServiceError::new(api::STORAGE, format!("the command cannot be encoded: {e}"))
        })?;
        if bytes.len() > ENTRY_MAX {
            return Err(ServiceError::new(
                api::OUT_OF_RANGE,
                format!(
                    "a change of {} bytes is more than one log entry holds ({ENTRY_MAX})",
                    bytes.len()
                ),
            ));
        }
        let me = self.raft.metrics().borrow().id;
        let leader = self.leader();
        if leader.as_ref().is_some_and(|(id, _)| *id == me) || self.forwarding.is_none() {
            return match self.raft.client_write(command).await {
                Ok(written) => {
                    // The copy this member kept of its own apply goes, so
                    // a refusal is the caller's alone to take apart.
                    if let Some((_, recent)) = &self.forwarding {
                        recent.take(written.log_id.index);
                    }
                    Ok(written.data)
                }
                Err(e) => Err(self.not_committed(&e)),
            };
        }
        let index = self
            .leader_index(
                leader,
                dataplane::protocols::stoq_registry::CLUSTER_FORWARD,
                bytes,
                FORWARD_TIMEOUT,
                "did not take the change",
            )
            .await?;
        self.raft
            .wait(Some(FORWARD_TIMEOUT))
            .applied_index_at_least(Some(index), "a forwarded change")
            .await
            .map_err(|e| {
                ServiceError::new(
                    api::STORAGE,
                    format!("the change was committed at {index} but not applied here yet: {e}"),
                )
            })?;
        let (_, recent) = self.forwarding.as_ref().expect("leader_index checked it");
        recent.take(index).ok_or_else(|| {
            ServiceError::new(
                api::STORAGE,
                format!("the change was committed at {index}; this member took a snapshot past it: read the result back"),
            )
        })
    }

    /// As a follower, send `kind` with `payload` to the leader (heard
    /// from lately) and take the log index it answers; `failed` says what
    /// went wrong when no answer came.
    async fn leader_index(
        &self,
        leader: Option<(u64, Member)>,
        kind: u8,
        payload: Vec<u8>,
        timeout: Duration,
        failed: &str,
    ) -> Result<u64, ServiceError> {
        let Some((leader_id, member)) = leader else {
            return Err(ServiceError::new(
                api::NOT_LEADER,
                "no leader is known yet (an election is under way): ask again in a moment",
            ));
        };
        let fresh = self
            .heard
            .get()
            .is_some_and(|(id, at)| id == leader_id && at.elapsed() < LEADER_SILENT);
        if !fresh {
            return Err(ServiceError::new(
                api::NOT_LEADER,
                format!(
                    "the leader {member} has not been heard from lately (an election may be under way): ask again in a moment"
                ),
            ));
        }
        let Some((peers, _)) = self.forwarding.as_ref() else {
            return Err(ServiceError::new(
                api::NOT_LEADER,
                "this member is not the cluster's leader and does not forward: ask the leader",
            ));
        };
        let Some(peers) = peers.borrow().clone() else {
            return Err(ServiceError::new(
                api::NOT_LEADER,
                "this member cannot reach the others yet: ask another member",
            ));
        };
        let answer = super::network::request(
            &peers,
            &member.address,
            Some(leader_id),
            kind,
            payload,
            timeout,
        )
        .await
        .map_err(|e| match e {
            super::network::PeerError::Refused { code, message } => {
                ServiceError::new(code, message)
            }
            unreachable => ServiceError::new(
                api::NOT_LEADER,
                format!("the leader {member} {failed} ({unreachable}); ask again"),
            ),
        })?;
        <[u8; 8]>::try_from(answer.as_ref())
            .map(u64::from_be_bytes)
            .map_err(|_| ServiceError::new(api::STORAGE, "the leader's answer is not a log index"))
    }

    /// Wait until this member has applied everything the cluster had
    /// committed when it was called: a read answered after it sees every
    /// change any member answered before the read arrived, and a member
    /// cut off from the majority answers an error, never old bytes. The
    /// leader has a majority confirm that it still leads
    /// ([`Self::read_index`]); a follower asks the leader for that index
    /// (`CLUSTER_READ_INDEX`) and waits until it applied up to it.
    pub async fn read_fence(&self) -> Result<u64, ServiceError> {
        let me = self.raft.metrics().borrow().id;
        let leader = self.leader();
        let index = if leader.as_ref().is_some_and(|(id, _)| *id == me) {
            self.read_index().await?
        } else {
            self.leader_index(
                leader,
                dataplane::protocols::stoq_registry::CLUSTER_READ_INDEX,
                Vec::new(),
                READ_FENCE_TIMEOUT,
                "did not say what it committed, so this member cannot tell whether it is up to date",
            )
            .await?
        };
        self.raft
            .wait(Some(READ_FENCE_TIMEOUT))
            .applied_index_at_least(Some(index), "a read")
            .await
            .map(|_| index)
            .map_err(|e| {
                ServiceError::new(
                    api::NOT_LEADER,
                    format!(
                        "the cluster committed up to {index}, which this member has not applied yet ({e}): ask again, or another member"
                    ),
                )
            })
    }

    /// On the leader, once a majority confirmed that it still leads: the
    /// log index a read must see applied (`CLUSTER_READ_INDEX`). openraft
    /// waits one heartbeat interval for the majority's answers; a round
    /// that misses it (a busy member) is tried again within
    /// [`READ_FENCE_TIMEOUT`].
    pub async fn read_index(&self) -> Result<u64, ServiceError> {
        let not_leader = |why: String| {
            ServiceError::new(
                api::NOT_LEADER,
                format!(
                    "this member cannot confirm it leads the cluster ({why}): ask another member"
                ),
            )
        };
        if let Some(index) = self.leased_index() {
            return Ok(index);
        }
        let deadline = tokio::time::Instant::now() + READ_FENCE_TIMEOUT;
        loop {
            let round = tokio::time::timeout_at(deadline, self.raft.get_read_log_id()).await;
            match round {
                Ok(Ok((read, _))) => return Ok(read.map_or(0, |log_id| log_id.index)),
                Ok(Err(openraft::error::RaftError::APIError(
                    openraft::error::CheckIsLeaderError::QuorumNotEnough(_),
                ))) if tokio::time::Instant::now() < deadline => continue,
                Ok(Err(e)) => return Err(not_leader(e.to_string())),
                Err(_) => {
                    return Err(not_leader(format!(
                        "no majority answered within {READ_FENCE_TIMEOUT:?}"
                    )));
                }
            }
        }
    }

    /// The read index without a confirmation round, while this leader's
    /// lease holds: a majority of the voters (this member among them) took
    /// an append of its current vote that it sent less than [`READ_LEASE`]
    /// ago. Each of them refuses to vote for anyone else for openraft's
    /// leader lease (`election_timeout_max`, 500 ms) from when it took it,
    /// and stands for election itself only after 400 ms without an append,
    /// so no other leader can be elected before the lease ends. The index
    /// is the last one this leader appended, once it applied an entry of
    /// its own term (before that, what earlier leaders committed is not
    /// known to be in what it applied). None: a confirmation round it is.
    pub(crate) fn leased_index(&self) -> Option<u64> {
        let acks = self.acks.as_ref()?;
        let metrics = self.raft.metrics().borrow().clone();
        let me = metrics.id;
        if metrics.current_leader != Some(me)
            || !metrics.vote.is_committed()
            || metrics.last_applied?.leader_id.term != metrics.vote.leader_id().term
        {
            return None;
        }
        let membership = metrics.membership_config.membership();
        // A joint configuration needs a majority of each: not leased.
        if membership.get_joint_config().len() != 1 {
            return None;
        }
        let voters: Vec<u64> = membership.voter_ids().collect();
        // A leader removed as a voter (still leading as a learner) is not
        // one of the majority that elects the next.
        if !voters.contains(&me) {
            return None;
        }
        let majority = voters.len() / 2 + 1;
        let acks = acks.borrow();
        let mut sent: Vec<Instant> = voters
            .iter()
            .filter(|id| **id != me)
            .filter_map(|id| acks.get(id))
            .filter(|(vote, _)| *vote == metrics.vote)
            .map(|(_, sent)| *sent)
            .collect();
        // This member is one of the majority; the rest are the latest.
        sent.sort_unstable_by(|a, b| b.cmp(a));
        let oldest_needed = match majority - 1 {
            0 => return metrics.last_log_index,
            others => *sent.get(others - 1)?,
        };
        (oldest_needed.elapsed() < READ_LEASE).then_some(metrics.last_log_index?)
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
        let applied = match self.submit(command).await? {
            Outcome::Applied(applied) => Ok(applied),
            Outcome::Refused(refused) => Err(Rc::try_unwrap(refused)
                .unwrap_or_else(|shared| AuthorityError::Stale(shared.to_string()))),
            Outcome::Nothing => {
                return Err(ServiceError::new(
                    api::STORAGE,
                    "the command was applied as none",
                ));
            }
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
                    // `name ([address]:port)`: clients read the address.
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
