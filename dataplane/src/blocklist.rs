//! The blocklist the workers enforce at the first packet: IPv6 prefixes
//! whose datagrams are dropped before any QUIC processing. The same list
//! goes to the XDP front door where one is attached (it drops them in the
//! driver); the workers' check is what holds without eBPF.
//!
//! Lookup costs one hash probe per distinct prefix length in the list, so
//! it stays cheap per datagram however many prefixes there are.

use crate::front_door::Ipv6Prefix;
use std::collections::{BTreeSet, HashSet};
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::sync::Arc;

/// An immutable set of prefixes, grouped by length.
#[derive(Debug, Default)]
pub struct Blocklist {
    /// (prefix length, masked addresses of that length), longest first.
    by_len: Vec<(u8, HashSet<u128>)>,
    len: usize,
}

fn mask(len: u8) -> u128 {
    if len == 0 {
        0
    } else {
        u128::MAX << (128 - u32::from(len))
    }
}

impl Blocklist {
    pub fn new(prefixes: &BTreeSet<Ipv6Prefix>) -> Self {
        let mut by_len: Vec<(u8, HashSet<u128>)> = Vec::new();
        for prefix in prefixes {
            let key = u128::from(prefix.addr) & mask(prefix.len);
            match by_len.iter_mut().find(|(len, _)| *len == prefix.len) {
                Some((_, set)) => {
                    set.insert(key);
                }
                None => by_len.push((prefix.len, HashSet::from([key]))),
            }
        }
        by_len.sort_by_key(|(len, _)| std::cmp::Reverse(*len));
        Self {
            by_len,
            len: prefixes.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn contains(&self, ip: &Ipv6Addr) -> bool {
        let bits = u128::from(*ip);
        self.by_len
            .iter()
            .any(|(len, set)| set.contains(&(bits & mask(*len))))
    }

    /// Whether a datagram from `remote` is to be dropped.
    pub fn blocks(&self, remote: &SocketAddr) -> bool {
        match remote.ip() {
            IpAddr::V6(ip) => !self.is_empty() && self.contains(&ip),
            IpAddr::V4(_) => false,
        }
    }
}

/// The current blocklist, swapped whole on reload (and, with admission, by
/// the control plane when it isolates a peer).
pub struct BlocklistStore {
    current: arc_swap::ArcSwap<Blocklist>,
}

impl BlocklistStore {
    pub fn new(prefixes: &BTreeSet<Ipv6Prefix>) -> Arc<Self> {
        Arc::new(Self {
            current: arc_swap::ArcSwap::from_pointee(Blocklist::new(prefixes)),
        })
    }

    pub fn load(&self) -> Arc<Blocklist> {
        self.current.load_full()
    }

    pub fn set(&self, prefixes: &BTreeSet<Ipv6Prefix>) {
        self.current.store(Arc::new(Blocklist::new(prefixes)));
    }
}

impl std::fmt::Debug for BlocklistStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlocklistStore")
            .field("prefixes", &self.current.load().len())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn list(prefixes: &[&str]) -> Blocklist {
        Blocklist::new(&prefixes.iter().map(|p| p.parse().unwrap()).collect())
    }

    #[test]
    fn prefixes_of_every_length_match_what_they_cover() {
        let b = list(&["2001:db8:bad::/48", "fd71:7e57::2/128", "fe80::/10"]);
        assert!(b.contains(&"2001:db8:bad:1::5".parse().unwrap()));
        assert!(!b.contains(&"2001:db8:bae::5".parse().unwrap()));
        assert!(b.contains(&"fd71:7e57::2".parse().unwrap()));
        assert!(!b.contains(&"fd71:7e57::3".parse().unwrap()));
        assert!(b.contains(&"fe80::1".parse().unwrap()));
        assert!(list(&["::/0"]).contains(&"2001:db8::1".parse().unwrap()));
        assert!(!list(&[]).blocks(&"[::1]:1".parse().unwrap()));
        assert!(!b.blocks(&"127.0.0.1:1".parse().unwrap()));
        assert_eq!(b.len(), 3);
    }
}
