//! The XDP front door (`ebpf/xdp_front_door.c`) on the server's NIC: drops
//! IPv4 to our port and blocklisted IPv6 sources before they cost a socket
//! wake-up, passes everything else to the kernel, counts every decision.
//!
//! The program is attached through a bpf_link owned by this value: dropping
//! it (or the process dying) detaches it, so a restarted server attaches
//! afresh instead of stacking programs.

use aya::maps::lpm_trie::{Key, LpmTrie};
use aya::maps::{MapData, PerCpuArray, XskMap};
use aya::programs::{Xdp, XdpMode};
use aya::{Ebpf, EbpfLoader};
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;
use std::net::Ipv6Addr;
use std::sync::Mutex;

static PROGRAM: &[u8] = aya::include_bytes_aligned!("../../ebpf/xdp_front_door.o");

/// Blocklist entries the map holds (must match `max_entries` in the C source).
pub const BLOCKLIST_MAX: usize = 65536;

/// An IPv6 prefix, e.g. `2001:db8::/32`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Ipv6Prefix {
    pub addr: Ipv6Addr,
    pub len: u8,
}

impl std::str::FromStr for Ipv6Prefix {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (addr, len) = s.split_once('/').unwrap_or((s, "128"));
        let addr: Ipv6Addr = addr
            .parse()
            .map_err(|_| format!("`{s}` is not an IPv6 prefix like 2001:db8::/32"))?;
        let len: u8 = len
            .parse()
            .ok()
            .filter(|l| *l <= 128)
            .ok_or_else(|| format!("`{s}`: prefix length must be 0..=128"))?;
        // Keep the map canonical: bits past the prefix are zero.
        let mask = if len == 0 {
            0
        } else {
            u128::MAX << (128 - u32::from(len))
        };
        Ok(Self {
            addr: Ipv6Addr::from(u128::from(addr) & mask),
            len,
        })
    }
}

impl std::fmt::Display for Ipv6Prefix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

/// How the program is attached (`[dataplane] xdp_mode`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum XdpAttachMode {
    /// In the driver (veth and most server NICs support it).
    Native,
    /// In the kernel's generic path, for drivers without native XDP.
    Generic,
}

#[derive(Debug, thiserror::Error)]
pub enum FrontDoorError {
    #[error("loading the XDP program failed (needs CAP_BPF and CAP_NET_ADMIN, or root): {0}")]
    Load(#[from] aya::EbpfError),
    #[error("attaching the XDP program to {interface} failed: {source}")]
    Attach {
        interface: String,
        source: aya::programs::ProgramError,
    },
    #[error("the XDP program is unusable: {0}")]
    Program(#[from] aya::programs::ProgramError),
    #[error("an XDP map is unusable: {0}")]
    Map(#[from] aya::maps::MapError),
    #[error("the object lacks {0}")]
    Missing(&'static str),
    #[error("the blocklist holds at most {BLOCKLIST_MAX} prefixes, {0} were given")]
    BlocklistFull(usize),
}

/// Per-reason counts (summed over CPUs), in the order of the C enum.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct FrontDoorCounters {
    /// IPv6 UDP to our port, passed.
    pub pass_ours: u64,
    /// Not ours (other protocols and ports, NDP, ICMPv6), passed.
    pub pass_other: u64,
    /// IPv4 to our port, dropped.
    pub drop_ipv4: u64,
    /// Blocklisted sources to our port, dropped.
    pub drop_blocked: u64,
    /// Truncated headers, passed to the kernel (which drops them).
    pub pass_malformed: u64,
    /// Ours, redirected to the receiving queue's AF_XDP socket (`xdp` backend).
    pub redirect_xsk: u64,
}

/// The kernel map and the set it holds (so updates can be diffs).
type Blocklist = (LpmTrie<MapData, [u8; 16], u8>, BTreeSet<Ipv6Prefix>);

pub struct FrontDoor {
    counters: Mutex<PerCpuArray<MapData, u64>>,
    sockets: Mutex<XskMap<MapData>>,
    blocklist: Mutex<Blocklist>,
    // Owns the program and its link: dropping it detaches.
    _ebpf: Ebpf,
}

impl FrontDoor {
    /// Load the program for UDP `port` and attach it to `interface`.
    pub fn attach(interface: &str, port: u16, mode: XdpAttachMode) -> Result<Self, FrontDoorError> {
        let mut ebpf = EbpfLoader::new()
            .override_global("server_port", &port, true)
            .load(PROGRAM)?;
        let blocklist: LpmTrie<MapData, [u8; 16], u8> = ebpf
            .take_map("blocklist")
            .ok_or(FrontDoorError::Missing("map `blocklist`"))?
            .try_into()?;
        let counters: PerCpuArray<MapData, u64> = ebpf
            .take_map("counters")
            .ok_or(FrontDoorError::Missing("map `counters`"))?
            .try_into()?;
        let sockets: XskMap<MapData> = ebpf
            .take_map("xsks")
            .ok_or(FrontDoorError::Missing("map `xsks`"))?
            .try_into()?;
        let program: &mut Xdp = ebpf
            .program_mut("front_door")
            .ok_or(FrontDoorError::Missing("program `front_door`"))?
            .try_into()?;
        program.load()?;
        let xdp_mode = match mode {
            XdpAttachMode::Native => XdpMode::Driver,
            XdpAttachMode::Generic => XdpMode::Skb,
        };
        program
            .attach(interface, xdp_mode)
            .map_err(|source| FrontDoorError::Attach {
                interface: interface.to_owned(),
                source,
            })?;
        Ok(Self {
            counters: Mutex::new(counters),
            sockets: Mutex::new(sockets),
            blocklist: Mutex::new((blocklist, BTreeSet::new())),
            _ebpf: ebpf,
        })
    }

    /// Make the blocklist exactly `prefixes` (adds the new, removes the gone).
    /// Takes a lock: for the control plane and reloads, never the hot path.
    pub fn set_blocklist(&self, prefixes: &BTreeSet<Ipv6Prefix>) -> Result<(), FrontDoorError> {
        if prefixes.len() > BLOCKLIST_MAX {
            return Err(FrontDoorError::BlocklistFull(prefixes.len()));
        }
        let mut guard = self.blocklist.lock().unwrap_or_else(|e| e.into_inner());
        let (map, current) = &mut *guard;
        for gone in current.difference(prefixes) {
            map.remove(&key(gone))?;
        }
        for new in prefixes.difference(current) {
            map.insert(&key(new), 1u8, 0)?;
        }
        *current = prefixes.clone();
        Ok(())
    }

    /// Redirect our port's traffic arriving on NIC queue `queue` to the
    /// AF_XDP socket `fd`. The kernel drops the entry by itself when the
    /// socket closes, so a dead worker never leaves a dangling redirect.
    pub fn register_socket(&self, queue: u32, fd: i32) -> Result<(), FrontDoorError> {
        let fd = RawFdRef(fd);
        let mut sockets = self.sockets.lock().unwrap_or_else(|e| e.into_inner());
        sockets.set(queue, fd, 0)?;
        Ok(())
    }

    pub fn blocklist_len(&self) -> usize {
        self.blocklist
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .1
            .len()
    }

    pub fn counters(&self) -> FrontDoorCounters {
        let counters = self.counters.lock().unwrap_or_else(|e| e.into_inner());
        let [
            pass_ours,
            pass_other,
            drop_ipv4,
            drop_blocked,
            pass_malformed,
            redirect_xsk,
        ] = crate::steering::per_cpu_sums(&counters);
        FrontDoorCounters {
            pass_ours,
            pass_other,
            drop_ipv4,
            drop_blocked,
            pass_malformed,
            redirect_xsk,
        }
    }
}

/// A borrowed descriptor for aya's `AsRawFd` parameter.
struct RawFdRef(i32);

impl std::os::fd::AsRawFd for RawFdRef {
    fn as_raw_fd(&self) -> i32 {
        self.0
    }
}

fn key(prefix: &Ipv6Prefix) -> Key<[u8; 16]> {
    Key::new(u32::from(prefix.len), prefix.addr.octets())
}

impl std::fmt::Debug for FrontDoor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FrontDoor").finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_parse_canonically_and_refuse_garbage() {
        let p: Ipv6Prefix = "2001:db8::ff/32".parse().unwrap();
        assert_eq!(p.to_string(), "2001:db8::/32");
        let host: Ipv6Prefix = "fd71:7e57::2".parse().unwrap();
        assert_eq!(host.len, 128);
        assert!("10.0.0.0/8".parse::<Ipv6Prefix>().is_err());
        assert!("2001:db8::/129".parse::<Ipv6Prefix>().is_err());
        assert!("nonsense".parse::<Ipv6Prefix>().is_err());
    }
}
