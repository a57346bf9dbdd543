//! The bytes of Raft's messages between nodes (carried by `stoq/1`
//! requests of the cluster's kinds): each request, and each answer as
//! `0 ‖ response` or `1 ‖ why` (the remote node could not take it: its
//! Raft stopped, or a snapshot segment was not the one it expected).
//!
//! - append: vote ‖ previous log id (optional) ‖ leader's commit
//!   (optional) ‖ entries u32 ‖ (length u32 ‖ entry)*; its response: 0
//!   success | 1 partial success ‖ optional log id | 2 conflict | 3 higher
//!   vote ‖ vote;
//! - vote: vote ‖ last log id (optional); its response: vote ‖ granted
//!   (0 or 1) ‖ last log id (optional);
//! - snapshot segment: vote ‖ last log id (optional) ‖ membership length
//!   u32 ‖ stored membership ‖ id length u16 ‖ id ‖ offset u64 ‖ done (0
//!   or 1) ‖ data length u32 ‖ data; its response: vote.
//!
//! Values inside are in `super::codec`'s encodings. Each decoder takes
//! exactly what its encoder writes and refuses anything else.

use super::codec::{
    decode_entry, decode_stored_membership, decode_vote, encode_entry, encode_optional_log_id,
    encode_stored_membership, encode_vote, read_optional_log_id,
};
use super::{Member, TypeConfig};
use crate::authority::registry::Reader;
use crate::machine::codec::EncodeError;
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::{SnapshotMeta, Vote};

const VOTE_LEN: usize = 17;

fn put_vote(vote: &Vote<u64>, out: &mut Vec<u8>) {
    out.extend_from_slice(&encode_vote(vote));
}

fn read_vote(r: &mut Reader<'_>) -> Option<Vote<u64>> {
    decode_vote(r.take(VOTE_LEN)?)
}

fn finished<T>(r: Reader<'_>, value: T) -> Option<T> {
    r.0.is_empty().then_some(value)
}

pub fn encode_append(rpc: &AppendEntriesRequest<TypeConfig>) -> Result<Vec<u8>, EncodeError> {
    let mut out = Vec::new();
    put_vote(&rpc.vote, &mut out);
    encode_optional_log_id(rpc.prev_log_id.as_ref(), &mut out);
    encode_optional_log_id(rpc.leader_commit.as_ref(), &mut out);
    out.extend_from_slice(&(rpc.entries.len() as u32).to_be_bytes());
    for entry in &rpc.entries {
        let bytes = encode_entry(entry)?;
        out.extend_from_slice(&(bytes.len() as u32).to_be_bytes());
        out.extend_from_slice(&bytes);
    }
    Ok(out)
}

pub fn decode_append(bytes: &[u8]) -> Option<AppendEntriesRequest<TypeConfig>> {
    let mut r = Reader(bytes);
    let vote = read_vote(&mut r)?;
    let prev_log_id = read_optional_log_id(&mut r)?;
    let leader_commit = read_optional_log_id(&mut r)?;
    let count = r.u32()?;
    let mut entries = Vec::new();
    // Entries follow the previous one, index by index.
    let first = prev_log_id.map_or(Some(0), |id| id.index.checked_add(1))?;
    for offset in 0..u64::from(count) {
        let index = first.checked_add(offset)?;
        let len = usize::try_from(r.u32()?).ok()?;
        let entry = decode_entry(r.take(len)?)?;
        if entry.log_id.index != index {
            return None;
        }
        entries.push(entry);
    }
    finished(
        r,
        AppendEntriesRequest {
            vote,
            prev_log_id,
            entries,
            leader_commit,
        },
    )
}

pub fn encode_append_response(response: &AppendEntriesResponse<u64>) -> Vec<u8> {
    let mut out = Vec::new();
    match response {
        AppendEntriesResponse::Success => out.push(0),
        AppendEntriesResponse::PartialSuccess(matched) => {
            out.push(1);
            encode_optional_log_id(matched.as_ref(), &mut out);
        }
        AppendEntriesResponse::Conflict => out.push(2),
        AppendEntriesResponse::HigherVote(vote) => {
            out.push(3);
            put_vote(vote, &mut out);
        }
    }
    out
}

pub fn decode_append_response(bytes: &[u8]) -> Option<AppendEntriesResponse<u64>> {
    let mut r = Reader(bytes);
    let response = match r.u8()? {
        0 => AppendEntriesResponse::Success,
        1 => AppendEntriesResponse::PartialSuccess(read_optional_log_id(&mut r)?),
        2 => AppendEntriesResponse::Conflict,
        3 => AppendEntriesResponse::HigherVote(read_vote(&mut r)?),
        _ => return None,
    };
    finished(r, response)
}

pub fn encode_vote_request(rpc: &VoteRequest<u64>) -> Vec<u8> {
    let mut out = Vec::new();
    put_vote(&rpc.vote, &mut out);
    encode_optional_log_id(rpc.last_log_id.as_ref(), &mut out);
    out
}

pub fn decode_vote_request(bytes: &[u8]) -> Option<VoteRequest<u64>> {
    let mut r = Reader(bytes);
    let vote = read_vote(&mut r)?;
    let last_log_id = read_optional_log_id(&mut r)?;
    finished(r, VoteRequest { vote, last_log_id })
}

pub fn encode_vote_response(response: &VoteResponse<u64>) -> Vec<u8> {
    let mut out = Vec::new();
    put_vote(&response.vote, &mut out);
    out.push(u8::from(response.vote_granted));
    encode_optional_log_id(response.last_log_id.as_ref(), &mut out);
    out
}

pub fn decode_vote_response(bytes: &[u8]) -> Option<VoteResponse<u64>> {
    let mut r = Reader(bytes);
    let vote = read_vote(&mut r)?;
    let vote_granted = match r.u8()? {
        0 => false,
        1 => true,
        _ => return None,
    };
    let last_log_id = read_optional_log_id(&mut r)?;
    finished(
        r,
        VoteResponse {
            vote,
            vote_granted,
            last_log_id,
        },
    )
}

pub fn encode_snapshot(rpc: &InstallSnapshotRequest<TypeConfig>) -> Vec<u8> {
    let mut out = Vec::new();
    put_vote(&rpc.vote, &mut out);
    encode_optional_log_id(rpc.meta.last_log_id.as_ref(), &mut out);
    let membership = encode_stored_membership(&rpc.meta.last_membership);
    out.extend_from_slice(&(membership.len() as u32).to_be_bytes());
    out.extend_from_slice(&membership);
    // Snapshot ids are made here (`term-node-index`): short.
    out.extend_from_slice(&(rpc.meta.snapshot_id.len() as u16).to_be_bytes());
    out.extend_from_slice(rpc.meta.snapshot_id.as_bytes());
    out.extend_from_slice(&rpc.offset.to_be_bytes());
    out.push(u8::from(rpc.done));
    out.extend_from_slice(&(rpc.data.len() as u32).to_be_bytes());
    out.extend_from_slice(&rpc.data);
    out
}

pub fn decode_snapshot(bytes: &[u8]) -> Option<InstallSnapshotRequest<TypeConfig>> {
    let mut r = Reader(bytes);
    let vote = read_vote(&mut r)?;
    let last_log_id = read_optional_log_id(&mut r)?;
    let len = usize::try_from(r.u32()?).ok()?;
    let last_membership = decode_stored_membership(r.take(len)?)?;
    let snapshot_id = r.string()?;
    let offset = r.u64()?;
    let done = match r.u8()? {
        0 => false,
        1 => true,
        _ => return None,
    };
    let len = usize::try_from(r.u32()?).ok()?;
    let data = r.take(len)?.to_vec();
    let meta: SnapshotMeta<u64, Member> = SnapshotMeta {
        last_log_id,
        last_membership,
        snapshot_id,
    };
    finished(
        r,
        InstallSnapshotRequest {
            vote,
            meta,
            offset,
            data,
            done,
        },
    )
}

pub fn encode_snapshot_response(response: &InstallSnapshotResponse<u64>) -> Vec<u8> {
    encode_vote(&response.vote)
}

pub fn decode_snapshot_response(bytes: &[u8]) -> Option<InstallSnapshotResponse<u64>> {
    Some(InstallSnapshotResponse {
        vote: decode_vote(bytes)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::machine::Command;
    use crate::machine::codec::decode as decode_command;
    use openraft::{CommittedLeaderId, Entry, EntryPayload, LogId, Membership, StoredMembership};
    use std::collections::{BTreeMap, BTreeSet};

    /// `bytes` reads back as itself through `decode`, and no strict prefix
    /// or longer buffer reads back at all.
    fn exact<T>(bytes: &[u8], decode: impl Fn(&[u8]) -> Option<T>) -> T {
        let value = decode(bytes).expect("reads back");
        for cut in 0..bytes.len() {
            assert!(
                decode(&bytes[..cut]).is_none(),
                "{cut} of {} bytes",
                bytes.len()
            );
        }
        assert!(decode(&[bytes, &[0]].concat()).is_none());
        value
    }

    fn log_id(index: u64) -> LogId<u64> {
        LogId::new(CommittedLeaderId::new(3, 1), index)
    }

    fn membership() -> StoredMembership<u64, Member> {
        let nodes: BTreeMap<u64, Member> = (1..=3)
            .map(|id| {
                (
                    id,
                    Member {
                        name: format!("n{id}"),
                        address: format!("[::1]:{}", 4000 + id),
                        // One member serves no memory assets.
                        locator: (id != 2).then_some(0xfd71_7e57_0000_0000 | id),
                    },
                )
            })
            .collect();
        StoredMembership::new(
            Some(log_id(1)),
            Membership::new(vec![BTreeSet::from([1, 2, 3])], nodes),
        )
    }

    #[test]
    fn raft_messages_read_back_exactly() {
        let vote = Vote::new_committed(3, 1);
        // A command as the state machine's tests make them would do; a
        // membership and a blank entry are Raft's own.
        let command: Command = decode_command(
            &crate::machine::codec::encode(&Command::Admission(
                crate::consensus::state::AdmissionChange::StakeGrant {
                    identity: crate::consensus::stake::Identity([4; 32]),
                    amount: 9,
                },
            ))
            .unwrap(),
        )
        .unwrap();
        let append = AppendEntriesRequest::<TypeConfig> {
            vote,
            prev_log_id: Some(log_id(4)),
            entries: vec![
                Entry {
                    log_id: log_id(5),
                    payload: EntryPayload::Blank,
                },
                Entry {
                    log_id: log_id(6),
                    payload: EntryPayload::Normal(command),
                },
                Entry {
                    log_id: log_id(7),
                    payload: EntryPayload::Membership(membership().membership().clone()),
                },
            ],
            leader_commit: Some(log_id(4)),
        };
        let back = exact(&encode_append(&append).unwrap(), decode_append);
        // Entries that do not follow the previous one, index by index.
        let mut gap = AppendEntriesRequest::<TypeConfig> {
            vote,
            prev_log_id: Some(log_id(3)),
            entries: back.entries.clone(),
            leader_commit: None,
        };
        assert!(decode_append(&encode_append(&gap).unwrap()).is_none());
        gap.prev_log_id = Some(log_id(4));
        gap.entries.swap(0, 1);
        assert!(decode_append(&encode_append(&gap).unwrap()).is_none());
        assert_eq!(back.entries, append.entries);
        assert_eq!(
            (back.vote, back.prev_log_id, back.leader_commit),
            (vote, append.prev_log_id, append.leader_commit)
        );
        for response in [
            AppendEntriesResponse::Success,
            AppendEntriesResponse::PartialSuccess(Some(log_id(5))),
            AppendEntriesResponse::PartialSuccess(None),
            AppendEntriesResponse::Conflict,
            AppendEntriesResponse::HigherVote(Vote::new(4, 2)),
        ] {
            assert_eq!(
                exact(&encode_append_response(&response), decode_append_response),
                response
            );
        }
        let request = VoteRequest {
            vote: Vote::new(4, 2),
            last_log_id: Some(log_id(7)),
        };
        assert_eq!(
            exact(&encode_vote_request(&request), decode_vote_request),
            request
        );
        let response = VoteResponse {
            vote: Vote::new(4, 2),
            vote_granted: true,
            last_log_id: None,
        };
        assert_eq!(
            exact(&encode_vote_response(&response), decode_vote_response),
            response
        );
        let segment = InstallSnapshotRequest::<TypeConfig> {
            vote,
            meta: SnapshotMeta {
                last_log_id: Some(log_id(7)),
                last_membership: membership(),
                snapshot_id: "3-1-7".into(),
            },
            offset: 65536,
            data: vec![7; 300],
            done: true,
        };
        let back = exact(&encode_snapshot(&segment), decode_snapshot);
        assert_eq!(
            (back.meta, back.offset, back.data, back.done),
            (segment.meta, segment.offset, segment.data, segment.done)
        );
        let response = InstallSnapshotResponse { vote };
        assert_eq!(
            exact(
                &encode_snapshot_response(&response),
                decode_snapshot_response
            ),
            response
        );
    }

    #[test]
    fn a_membership_written_before_locators_reads_with_none() {
        let address = "[::1]:4001";
        let mut old = vec![0, 1, 0, 1];
        old.extend_from_slice(&1u64.to_be_bytes());
        old.extend_from_slice(&[0, 1]);
        old.extend_from_slice(&1u64.to_be_bytes());
        old.extend_from_slice(&[2, b'n', b'1', address.len() as u8]);
        old.extend_from_slice(address.as_bytes());
        let read = exact(&old, decode_stored_membership);
        let member = read.membership().get_node(&1).unwrap();
        assert_eq!(
            (member.name.as_str(), member.address.as_str()),
            ("n1", address)
        );
        assert_eq!(member.locator, None);
        // Written again, it carries the flag and an absent locator.
        let again = encode_stored_membership(&read);
        assert_eq!(again.len(), old.len() + 1);
        assert_eq!(again[1], 0x81);
        assert_eq!(exact(&again, decode_stored_membership), read);
    }
}
