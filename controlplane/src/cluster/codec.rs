//! The bytes of Raft's own values, as the log store and the store's
//! `cluster_meta` table keep them (integers big-endian; names and
//! addresses UTF-8 after a one-byte length):
//!
//! - log id: term u64 ‖ leader node u64 ‖ index u64;
//! - optional log id: 0, or 1 ‖ log id;
//! - vote: term u64 ‖ node u64 ‖ committed (0 or 1);
//! - membership: 0x80 + configurations u8 ‖ per configuration, voters u16
//!   ‖ node ids u64 … ‖ nodes u16 ‖ per node, id u64 ‖ name ‖ address ‖
//!   optional locator (0, or 1 ‖ u64). A membership written before
//!   locators starts with the bare count (1 or 2) and has no locator
//!   field: it still reads, with none;
//! - stored membership: optional log id ‖ membership;
//! - entry: log id ‖ 0 (blank) | 1 ‖ command (`crate::machine::codec`) |
//!   2 ‖ membership.
//!
//! Each decoder takes exactly what its encoder writes (and a membership
//! also as written before locators); `None` otherwise.

use super::{Member, TypeConfig};
use crate::authority::registry::Reader;
use crate::machine::codec as command_codec;
use openraft::{
    CommittedLeaderId, Entry, EntryPayload, LeaderId, LogId, Membership, StoredMembership, Vote,
};
use std::collections::{BTreeMap, BTreeSet};

pub fn encode_log_id(id: &LogId<u64>, out: &mut Vec<u8>) {
    out.extend_from_slice(&id.leader_id.term.to_be_bytes());
    out.extend_from_slice(&id.leader_id.node_id.to_be_bytes());
    out.extend_from_slice(&id.index.to_be_bytes());
}

pub(crate) fn read_log_id(r: &mut Reader<'_>) -> Option<LogId<u64>> {
    let term = r.u64()?;
    let node = r.u64()?;
    let index = r.u64()?;
    Some(LogId::new(CommittedLeaderId::new(term, node), index))
}

pub fn encode_optional_log_id(id: Option<&LogId<u64>>, out: &mut Vec<u8>) {
    match id {
        None => out.push(0),
        Some(id) => {
            out.push(1);
            encode_log_id(id, out);
        }
    }
}

pub(crate) fn read_optional_log_id(r: &mut Reader<'_>) -> Option<Option<LogId<u64>>> {
    match r.u8()? {
        0 => Some(None),
        1 => Some(Some(read_log_id(r)?)),
        _ => None,
    }
}

/// A whole buffer read by `read`, nothing left over.
fn exactly<T>(bytes: &[u8], read: impl FnOnce(&mut Reader<'_>) -> Option<T>) -> Option<T> {
    let mut r = Reader(bytes);
    let value = read(&mut r)?;
    r.0.is_empty().then_some(value)
}

pub fn decode_optional_log_id(bytes: &[u8]) -> Option<Option<LogId<u64>>> {
    exactly(bytes, read_optional_log_id)
}

pub fn encode_vote(vote: &Vote<u64>) -> Vec<u8> {
    let mut out = Vec::with_capacity(17);
    out.extend_from_slice(&vote.leader_id.term.to_be_bytes());
    out.extend_from_slice(&vote.leader_id.node_id.to_be_bytes());
    out.push(u8::from(vote.committed));
    out
}

pub fn decode_vote(bytes: &[u8]) -> Option<Vote<u64>> {
    exactly(bytes, |r| {
        let leader_id = LeaderId::new(r.u64()?, r.u64()?);
        let committed = match r.u8()? {
            0 => false,
            1 => true,
            _ => return None,
        };
        Some(Vote {
            leader_id,
            committed,
        })
    })
}

fn short_text(text: &str, out: &mut Vec<u8>) {
    // Names and addresses are checked to fit where they are configured.
    let len = u8::try_from(text.len()).expect("member names and addresses are short");
    out.push(len);
    out.extend_from_slice(text.as_bytes());
}

fn read_short_text(r: &mut Reader<'_>) -> Option<String> {
    let len = usize::from(r.u8()?);
    String::from_utf8(r.take(len)?.to_vec()).ok()
}

fn encode_membership(membership: &Membership<u64, Member>, out: &mut Vec<u8>) {
    let configs = membership.get_joint_config();
    let count = u8::try_from(configs.len()).expect("a joint configuration has at most two");
    out.push(LOCATED | count);
    for config in configs {
        out.extend_from_slice(&(config.len() as u16).to_be_bytes());
        for id in config {
            out.extend_from_slice(&id.to_be_bytes());
        }
    }
    let nodes: Vec<_> = membership.nodes().collect();
    out.extend_from_slice(&(nodes.len() as u16).to_be_bytes());
    for (id, member) in nodes {
        out.extend_from_slice(&id.to_be_bytes());
        short_text(&member.name, out);
        short_text(&member.address, out);
        match member.locator {
            None => out.push(0),
            Some(locator) => {
                out.push(1);
                out.extend_from_slice(&locator.to_be_bytes());
            }
        }
    }
}

/// The flag on a membership's first byte saying its nodes carry locators.
const LOCATED: u8 = 0x80;

fn read_membership(r: &mut Reader<'_>) -> Option<Membership<u64, Member>> {
    let first = r.u8()?;
    let located = first & LOCATED != 0;
    let mut configs = Vec::new();
    for _ in 0..first & !LOCATED {
        let mut config = BTreeSet::new();
        for _ in 0..r.u16()? {
            config.insert(r.u64()?);
        }
        configs.push(config);
    }
    let mut nodes = BTreeMap::new();
    for _ in 0..r.u16()? {
        let id = r.u64()?;
        let name = read_short_text(r)?;
        let address = read_short_text(r)?;
        let locator = match located {
            false => None,
            true => match r.u8()? {
                0 => None,
                1 => Some(r.u64()?),
                _ => return None,
            },
        };
        let member = Member {
            name,
            address,
            locator,
        };
        nodes.insert(id, member);
    }
    // One configuration, or two while joint; none empty (an empty voter
    // set would make any vote a quorum); every voter a node (what
    // `Membership::new` would otherwise fill in with a default member).
    let shaped = matches!(configs.len(), 1 | 2) && configs.iter().all(|c| !c.is_empty());
    let voters_known = configs.iter().flatten().all(|id| nodes.contains_key(id));
    (shaped && voters_known).then(|| Membership::new(configs, nodes))
}

pub fn encode_stored_membership(stored: &StoredMembership<u64, Member>) -> Vec<u8> {
    let mut out = Vec::new();
    encode_optional_log_id(stored.log_id().as_ref(), &mut out);
    encode_membership(stored.membership(), &mut out);
    out
}

pub fn decode_stored_membership(bytes: &[u8]) -> Option<StoredMembership<u64, Member>> {
    exactly(bytes, |r| {
        let log_id = read_optional_log_id(r)?;
        Some(StoredMembership::new(log_id, read_membership(r)?))
    })
}

const BLANK: u8 = 0;
const NORMAL: u8 = 1;
const MEMBERSHIP: u8 = 2;

/// An entry as bytes. Fails only for a command its encoding cannot hold.
pub fn encode_entry(
    entry: &Entry<TypeConfig>,
) -> Result<Vec<u8>, crate::machine::codec::EncodeError> {
    let mut out = Vec::new();
    encode_log_id(&entry.log_id, &mut out);
    match &entry.payload {
        EntryPayload::Blank => out.push(BLANK),
        EntryPayload::Normal(command) => {
            out.push(NORMAL);
            out.extend_from_slice(&command_codec::encode(command)?);
        }
        EntryPayload::Membership(membership) => {
            out.push(MEMBERSHIP);
            encode_membership(membership, &mut out);
        }
    }
    Ok(out)
}

pub fn decode_entry(bytes: &[u8]) -> Option<Entry<TypeConfig>> {
    let mut r = Reader(bytes);
    let log_id = read_log_id(&mut r)?;
    let payload = match r.u8()? {
        BLANK => EntryPayload::Blank,
        NORMAL => EntryPayload::Normal(command_codec::decode(r.0)?),
        MEMBERSHIP => EntryPayload::Membership(read_membership(&mut r)?),
        _ => return None,
    };
    if !matches!(payload, EntryPayload::Normal(_)) && !r.0.is_empty() {
        return None;
    }
    Some(Entry { log_id, payload })
}
