//! VMs: WebAssembly modules kept as storage assets of their owner and run
//! on the VM threads (the `vm` crate), never on the dataplane's workers.
//!
//! A VM asset is a storage asset whose bytes are a [`Header`] (the limits
//! its calls run under and the module's SHA-256) and the module. The
//! control plane checks a `VM_CALL` (the caller's access, the owner's fuel
//! and memory quotas), reads the header, and hands the call to the VM
//! threads ([`VmHost`]) with the module's bytes when they have not
//! compiled it yet; a VM thread answers the worker that took the request.
//! `docs/VM.md` describes the ABI the guest sees and the wire formats.

use dataplane::assets::address::AssetAddress;
use dataplane::assets::memory::Owner;
use dataplane::control::Ticket;
use std::sync::Arc;

/// The first bytes of a VM asset: the format's name and version.
pub const MAGIC: [u8; 8] = *b"i2vm\0\0\0\x01";
/// A VM asset's header: magic, fuel, memory (MiB), reserved, SHA-256.
pub const HEADER_LEN: usize = 8 + 8 + 4 + 4 + 32;
/// The largest module a VM asset may hold (its compile, once per module,
/// takes up to about a second of a VM thread).
pub const MODULE_LEN_MAX: usize = 1 << 20;
/// The largest input one call takes (it rides in one request with its
/// target).
pub const INPUT_LEN_MAX: usize = 32 * 1024;
/// The most output one call may append.
pub const OUTPUT_LEN_MAX: usize = 1 << 20;
/// The most `log` bytes one call keeps (past it, `log` writes nothing).
pub const LOG_LEN_MAX: usize = 4096;
/// The fuel a VM is given when its deployer names none.
pub const FUEL_DEFAULT: u64 = 100_000_000;
/// The memory a VM is given when its deployer names none, MiB.
pub const MEMORY_MIB_DEFAULT: u32 = 16;
/// The largest memory limit a VM may name, MiB (a wasm32 memory is at
/// most 4 GiB).
pub const MEMORY_MIB_MAX: u32 = 4096;
/// The fuel an identity's calls may be given each when the operator set
/// no quota for it.
pub const FUEL_QUOTA_DEFAULT: u64 = 1_000_000_000;

/// A VM asset's header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    /// The fuel each call is given.
    pub fuel: u64,
    /// The memory each call's instance may grow to, MiB.
    pub memory_mib: u32,
    /// SHA-256 of the module: what the VM threads cache it by.
    pub sha256: [u8; 32],
}

impl Header {
    /// The header for `module` with these limits.
    pub fn for_module(module: &[u8], fuel: u64, memory_mib: u32) -> Self {
        let digest = ring::digest::digest(&ring::digest::SHA256, module);
        Self {
            fuel,
            memory_mib,
            sha256: digest.as_ref().try_into().expect("SHA-256 is 32 bytes"),
        }
    }

    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut out = [0u8; HEADER_LEN];
        out[..8].copy_from_slice(&MAGIC);
        out[8..16].copy_from_slice(&self.fuel.to_be_bytes());
        out[16..20].copy_from_slice(&self.memory_mib.to_be_bytes());
        out[24..].copy_from_slice(&self.sha256);
        out
    }

    /// The header `bytes` start with; why not, when they are no VM asset's.
    pub fn decode(bytes: &[u8]) -> Result<Self, String> {
        let Some(bytes) = bytes.get(..HEADER_LEN) else {
            return Err("too short to be a VM asset".into());
        };
        if bytes[..8] != MAGIC {
            return Err("not a VM asset (its bytes do not start with a VM header)".into());
        }
        let fuel = u64::from_be_bytes(bytes[8..16].try_into().expect("8 bytes"));
        let memory_mib = u32::from_be_bytes(bytes[16..20].try_into().expect("4 bytes"));
        if bytes[20..24] != [0; 4] {
            return Err("the VM header's reserved bytes are not zero".into());
        }
        if memory_mib == 0 || memory_mib > MEMORY_MIB_MAX {
            return Err(format!(
                "the VM header names {memory_mib} MiB of memory; 1 to {MEMORY_MIB_MAX} are allowed"
            ));
        }
        if fuel == 0 {
            return Err("the VM header names no fuel".into());
        }
        Ok(Self {
            fuel,
            memory_mib,
            sha256: bytes[24..].try_into().expect("32 bytes"),
        })
    }

    pub fn memory_bytes(&self) -> u64 {
        u64::from(self.memory_mib) << 20
    }
}

/// Which VM a call runs.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Target {
    /// The VM asset at this address.
    Address(AssetAddress),
    /// The VM asset published as `NAME.assets.APEX`.
    Name(String),
}

/// A `VM_CALL` request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CallRequest {
    /// Compile and check the module only (`vm deploy`): nothing runs.
    pub check_only: bool,
    pub target: Target,
    pub input: Vec<u8>,
}

const CHECK_ONLY: u8 = 1;
const BY_ADDRESS: u8 = 0;
const BY_NAME: u8 = 1;

impl CallRequest {
    /// flags (1 byte), target (0 and 16 address bytes, or 1, a length byte
    /// and the name), input (the rest).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = vec![if self.check_only { CHECK_ONLY } else { 0 }];
        match &self.target {
            Target::Address(address) => {
                out.push(BY_ADDRESS);
                out.extend_from_slice(&address.octets());
            }
            Target::Name(name) => {
                // A label: at most 63 bytes ([`CallRequest::decode`]
                // refuses any other).
                let name = &name.as_bytes()[..name.len().min(255)];
                out.push(BY_NAME);
                out.push(name.len() as u8);
                out.extend_from_slice(name);
            }
        }
        out.extend_from_slice(&self.input);
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, String> {
        let (&flags, rest) = bytes.split_first().ok_or("an empty VM call")?;
        if flags & !CHECK_ONLY != 0 {
            return Err(format!("unknown VM call flags {flags:#04x}"));
        }
        let (&by, rest) = rest.split_first().ok_or("a VM call without a target")?;
        let (target, input) = match by {
            BY_ADDRESS => {
                let (octets, input) = rest
                    .split_first_chunk::<16>()
                    .ok_or("a VM call's address is 16 bytes")?;
                let address = AssetAddress::from(std::net::Ipv6Addr::from(*octets));
                (Target::Address(address), input)
            }
            BY_NAME => {
                let (&len, rest) = rest.split_first().ok_or("a VM call's name is missing")?;
                let (name, input) = rest
                    .split_at_checked(usize::from(len))
                    .ok_or("a VM call's name is cut short")?;
                let name = dataplane::assets::wire::label(name).map_err(|e| e.to_string())?;
                (Target::Name(name.to_owned()), input)
            }
            other => return Err(format!("unknown VM call target kind {other}")),
        };
        if input.len() > INPUT_LEN_MAX {
            return Err(format!(
                "a VM call's input is at most {INPUT_LEN_MAX} bytes, not {}",
                input.len()
            ));
        }
        Ok(Self {
            check_only: flags & CHECK_ONLY != 0,
            target,
            input: input.to_vec(),
        })
    }
}

/// How a call ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
#[repr(u8)]
pub enum Reason {
    /// `run` returned (its status says how it went).
    Finished = 0,
    /// The guest trapped (unreachable, out-of-bounds access, stack
    /// overflow, a bad host call).
    Trap = 1,
    /// The call burned all its fuel.
    Fuel = 2,
    /// The instance asked for more memory (or table) than its limit.
    Memory = 3,
    /// The call ran past the wall-clock deadline.
    Deadline = 4,
    /// Nothing ran: the module compiled and passed the checks (`vm deploy`).
    Checked = 5,
}

impl Reason {
    fn from_u8(byte: u8) -> Option<Self> {
        Some(match byte {
            0 => Reason::Finished,
            1 => Reason::Trap,
            2 => Reason::Fuel,
            3 => Reason::Memory,
            4 => Reason::Deadline,
            5 => Reason::Checked,
            _ => return None,
        })
    }
}

/// What a `VM_CALL` answers when its module ran (or was checked).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outcome {
    pub reason: Reason,
    /// What `run` returned (0 is success); 0 when it did not return.
    pub status: i32,
    pub fuel_used: u64,
    /// What stopped it, in words (a trap's message), or empty.
    pub detail: String,
    pub output: Vec<u8>,
    /// What the guest logged, at most [`LOG_LEN_MAX`] bytes.
    pub log: Vec<u8>,
}

impl Outcome {
    /// Whether the call succeeded: `run` returned 0 (or the check passed).
    pub fn succeeded(&self) -> bool {
        matches!(self.reason, Reason::Finished | Reason::Checked) && self.status == 0
    }

    /// reason (1 byte), status (4), fuel used (8), detail (2-byte length
    /// and the text), output (4-byte length and the bytes), log (the rest).
    pub fn encode(&self) -> Vec<u8> {
        let detail = &self.detail.as_bytes()[..self.detail.len().min(u16::MAX as usize)];
        let mut out = Vec::with_capacity(19 + detail.len() + self.output.len() + self.log.len());
        out.push(self.reason as u8);
        out.extend_from_slice(&self.status.to_be_bytes());
        out.extend_from_slice(&self.fuel_used.to_be_bytes());
        out.extend_from_slice(&(detail.len() as u16).to_be_bytes());
        out.extend_from_slice(detail);
        out.extend_from_slice(&(self.output.len() as u32).to_be_bytes());
        out.extend_from_slice(&self.output);
        out.extend_from_slice(&self.log);
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, String> {
        let bad = || "a malformed VM call answer".to_owned();
        let (&reason, rest) = bytes.split_first().ok_or_else(bad)?;
        let reason = Reason::from_u8(reason).ok_or_else(bad)?;
        let (status, rest) = rest.split_first_chunk::<4>().ok_or_else(bad)?;
        let (fuel, rest) = rest.split_first_chunk::<8>().ok_or_else(bad)?;
        let (len, rest) = rest.split_first_chunk::<2>().ok_or_else(bad)?;
        let (detail, rest) = rest
            .split_at_checked(usize::from(u16::from_be_bytes(*len)))
            .ok_or_else(bad)?;
        let (len, rest) = rest.split_first_chunk::<4>().ok_or_else(bad)?;
        let (output, log) = rest
            .split_at_checked(u32::from_be_bytes(*len) as usize)
            .ok_or_else(bad)?;
        Ok(Self {
            reason,
            status: i32::from_be_bytes(*status),
            fuel_used: u64::from_be_bytes(*fuel),
            detail: String::from_utf8_lossy(detail).into_owned(),
            output: output.to_vec(),
            log: log.to_vec(),
        })
    }
}

/// A call the control plane checked, for a VM thread to run.
pub struct VmJob {
    /// Where the answer goes.
    pub worker: usize,
    pub ticket: Ticket,
    pub kind: u8,
    /// The VM's owner: its memory quota is charged while the call runs,
    /// and the call reaches the assets it may.
    pub owner: Owner,
    pub header: Header,
    /// The owner's fuel quota: the most fuel a call may be given, and its
    /// VMs' compute budget, fuel a second.
    pub fuel_quota: u64,
    /// The compiled module ([`VmHost::compiled`]), held for the call so
    /// that it cannot leave the cache before the call runs.
    pub compiled: Option<Arc<dyn std::any::Any + Send + Sync>>,
    /// The module's bytes, when it was not compiled.
    pub module: Option<Arc<[u8]>>,
    pub input: Vec<u8>,
    pub check_only: bool,
}

impl std::fmt::Debug for VmJob {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmJob")
            .field("worker", &self.worker)
            .field("owner", &self.owner)
            .field("header", &self.header)
            .field("compiled", &self.compiled.is_some())
            .field("module_bytes", &self.module.as_ref().map(|m| m.len()))
            .finish()
    }
}

/// The VM threads, as the control plane sees them.
pub trait VmHost: Send + Sync {
    /// The compiled module with this SHA-256, if cached: a handle that
    /// keeps it for a call ([`VmJob::compiled`]).
    fn compiled(&self, sha256: &[u8; 32]) -> Option<Arc<dyn std::any::Any + Send + Sync>>;
    /// Whether a call of `owner` carrying `module_bytes` of module may
    /// queue now; why not (the caller is answered `BUSY`).
    fn room(&self, owner: &Owner, module_bytes: usize) -> Result<(), String>;
    /// Queue `job`, or say why not (as [`Self::room`]).
    fn submit(&self, job: VmJob) -> Result<(), String>;
    /// The most memory a VM may name, MiB (`vm_memory_mib_max`).
    fn memory_mib_max(&self) -> u32;
}

/// One VM as `vm list` shows it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct VmInfo {
    /// The label it was deployed under (`NAME` of `NAME.assets.APEX`).
    pub name: Option<String>,
    pub address: String,
    pub fuel: u64,
    pub memory_mib: u32,
    pub module_bytes: u64,
    pub sha256: String,
}

#[cfg(test)]
mod tests {
    use super::*;
    use dataplane::assets::address::{AssetId, Locator};

    #[test]
    fn headers_requests_and_outcomes_round_trip_and_bad_bytes_are_refused() {
        let header = Header::for_module(b"\0asm", 5, 16);
        assert_eq!(Header::decode(&header.encode()), Ok(header));
        let mut bad = header.encode();
        bad[0] ^= 1;
        assert!(Header::decode(&bad).is_err());
        assert!(Header::decode(&header.encode()[..HEADER_LEN - 1]).is_err());
        let zero_memory = Header {
            memory_mib: 0,
            ..header
        };
        assert!(Header::decode(&zero_memory.encode()).is_err());

        let address = AssetAddress {
            locator: Locator(0xfd00_0000_0000_0001),
            id: AssetId(7),
        };
        for request in [
            CallRequest {
                check_only: true,
                target: Target::Address(address),
                input: b"in".to_vec(),
            },
            CallRequest {
                check_only: false,
                target: Target::Name("echo".into()),
                input: Vec::new(),
            },
        ] {
            let bytes = request.encode();
            assert_eq!(CallRequest::decode(&bytes), Ok(request));
            for cut in 0..bytes.len().min(3) {
                assert!(CallRequest::decode(&bytes[..cut]).is_err(), "{cut}");
            }
        }
        assert!(CallRequest::decode(&[2, 0]).is_err());
        assert!(CallRequest::decode(&[0, 1, 0]).is_err());

        let outcome = Outcome {
            reason: Reason::Fuel,
            status: -1,
            fuel_used: 99,
            detail: "all fuel consumed".into(),
            output: b"out".to_vec(),
            log: b"log".to_vec(),
        };
        let bytes = outcome.encode();
        assert_eq!(Outcome::decode(&bytes), Ok(outcome));
        assert!(Outcome::decode(&bytes[..10]).is_err());
        assert!(Outcome::decode(&[9]).is_err());
    }
}
