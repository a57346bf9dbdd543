//! The host ABI: the only imports a guest may have (module `internet2`),
//! the exports it must have, and the per-call state the host functions
//! work on. `docs/VM.md` is the guest's side of this.

use super::ModuleError;
use controlplane::vm::{LOG_LEN_MAX, OUTPUT_LEN_MAX};
use dataplane::assets::address::AssetAddress;
use dataplane::assets::memory::{AssetError, MemoryAssets, Owner};
use std::sync::Arc;
use wasmtime::{Caller, Engine, ExternType, Linker, Module, ResourceLimiter, ValType};

/// The module guests import from.
pub const MODULE: &str = "internet2";

/// The negative results of the host functions.
pub mod error {
    /// A pointer or length outside the guest's memory (or negative).
    pub const BOUNDS: i32 = -1;
    /// The call's output is full ([`controlplane::vm::OUTPUT_LEN_MAX`]).
    pub const OUTPUT_FULL: i32 = -2;
    /// No such asset.
    pub const UNKNOWN: i32 = -3;
    /// The asset was freed, its lease ended, or the node restarted.
    pub const RELEASED: i32 = -4;
    /// The VM's owner may not read (or write) it.
    pub const FORBIDDEN: i32 = -5;
    /// Bytes outside the asset.
    pub const RANGE: i32 = -6;
    /// Not reachable from a VM: another node's asset no member serves or
    /// the proxy could not reach, the control plane too busy for a storage
    /// request, or past the call's requests for storage assets and other
    /// members' (a write may have been done).
    pub const UNREACHABLE: i32 = -7;
}

/// The imports a guest may have: name, parameters, results.
pub const IMPORTS: [(&str, &[ValKind], &[ValKind]); 5] = [
    ("input", &[ValKind::I32, ValKind::I32], &[ValKind::I32]),
    ("output", &[ValKind::I32, ValKind::I32], &[ValKind::I32]),
    (
        "asset_read",
        &[ValKind::I32, ValKind::I64, ValKind::I32, ValKind::I32],
        &[ValKind::I32],
    ),
    (
        "asset_write",
        &[ValKind::I32, ValKind::I64, ValKind::I32, ValKind::I32],
        &[ValKind::I32],
    ),
    ("log", &[ValKind::I32, ValKind::I32], &[]),
];

/// The value types the ABI uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ValKind {
    I32,
    I64,
}

impl ValKind {
    fn is(self, ty: &ValType) -> bool {
        match self {
            ValKind::I32 => matches!(ty, ValType::I32),
            ValKind::I64 => matches!(ty, ValType::I64),
        }
    }
}

/// Check `module` against the ABI: every import one of [`IMPORTS`] with
/// its type, and the exports `memory` and `run: () -> i32`.
pub fn check(module: &Module) -> Result<(), ModuleError> {
    for import in module.imports() {
        let known = IMPORTS
            .iter()
            .find(|(name, _, _)| import.module() == MODULE && import.name() == *name);
        let fits = match (known, import.ty()) {
            (Some((_, params, results)), ExternType::Func(ty)) => {
                ty.params().len() == params.len()
                    && ty.params().zip(params.iter()).all(|(t, k)| k.is(&t))
                    && ty.results().len() == results.len()
                    && ty.results().zip(results.iter()).all(|(t, k)| k.is(&t))
            }
            _ => false,
        };
        if !fits {
            return Err(ModuleError::Import {
                module: import.module().to_owned(),
                name: import.name().to_owned(),
                allowed: allowed(),
            });
        }
    }
    if !matches!(module.get_export("memory"), Some(ExternType::Memory(_))) {
        return Err(ModuleError::Export("a memory named `memory`"));
    }
    let run = match module.get_export("run") {
        Some(ExternType::Func(ty)) => {
            ty.params().len() == 0
                && ty.results().len() == 1
                && ty.results().all(|t| matches!(t, ValType::I32))
        }
        _ => false,
    };
    if !run {
        return Err(ModuleError::Export("a function `run: () -> i32`"));
    }
    Ok(())
}

/// Check a module's imports and exports by name before it compiles, so a
/// module outside the ABI costs no compile: the parse reads the sections'
/// headers and names, not the code.
pub fn precheck(bytes: &[u8]) -> Result<(), ModuleError> {
    use wasmtime::wasmparser::{ExternalKind, Parser, Payload};
    let invalid = |e: wasmtime::wasmparser::BinaryReaderError| ModuleError::Invalid(e.to_string());
    let (mut memory, mut run) = (false, false);
    for payload in Parser::new(0).parse_all(bytes) {
        match payload.map_err(invalid)? {
            Payload::ImportSection(section) => {
                for import in section.into_imports() {
                    let import = import.map_err(invalid)?;
                    let known = import.module == MODULE
                        && IMPORTS.iter().any(|(name, _, _)| *name == import.name);
                    if !known {
                        return Err(ModuleError::Import {
                            module: import.module.to_owned(),
                            name: import.name.to_owned(),
                            allowed: allowed(),
                        });
                    }
                }
            }
            Payload::ExportSection(section) => {
                for export in section {
                    let export = export.map_err(invalid)?;
                    memory |= export.name == "memory" && export.kind == ExternalKind::Memory;
                    run |= export.name == "run" && export.kind == ExternalKind::Func;
                }
            }
            _ => {}
        }
    }
    if !memory {
        return Err(ModuleError::Export("a memory named `memory`"));
    }
    if !run {
        return Err(ModuleError::Export("a function `run: () -> i32`"));
    }
    Ok(())
}

/// The imports a module may have, as errors name them.
fn allowed() -> String {
    IMPORTS
        .iter()
        .map(|(name, _, _)| format!("{MODULE}.{name}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// What one call's host functions work on.
pub struct CallState {
    owner: Owner,
    input: Vec<u8>,
    /// How much of the input `input` handed out already.
    taken: usize,
    pub output: Vec<u8>,
    pub log: Vec<u8>,
    memory_limit: u64,
    /// Why a memory or table growth was refused, when one was.
    pub memory_denied: Option<String>,
    assets: Option<Arc<MemoryAssets>>,
    /// The instance's `memory`, once instantiated (the host calls find it
    /// here rather than by name).
    pub memory: Option<wasmtime::Memory>,
    /// Where requests for other members' assets go (the asset proxy).
    port: Option<Arc<dataplane::control::ControlPort>>,
    /// When the call's deadline passes: no host call waits past it.
    deadline: std::time::Instant,
    /// Requests sent to other members so far.
    remote_requests: std::cell::Cell<u32>,
}

impl CallState {
    /// A call of `owner`'s, reaching `assets` (and other members' through
    /// `port`'s asset proxy) until `deadline`.
    pub fn new(
        owner: Owner,
        memory_limit: u64,
        input: &[u8],
        assets: Option<Arc<MemoryAssets>>,
        port: Option<Arc<dataplane::control::ControlPort>>,
        deadline: std::time::Instant,
    ) -> Self {
        Self {
            owner,
            input: input.to_vec(),
            taken: 0,
            output: Vec::new(),
            log: Vec::new(),
            memory_limit,
            memory_denied: None,
            assets,
            memory: None,
            port,
            deadline,
            remote_requests: std::cell::Cell::new(0),
        }
    }
}

impl ResourceLimiter for CallState {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired as u64 > self.memory_limit {
            let why = format!(
                "the instance asked for {desired} bytes of memory; the VM's limit is {}",
                self.memory_limit
            );
            self.memory_denied = Some(why.clone());
            return Err(wasmtime::format_err!("{why}"));
        }
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired > super::TABLE_ELEMENTS_MAX {
            let why = format!(
                "the instance asked for a table of {desired} elements; the limit is {}",
                super::TABLE_ELEMENTS_MAX
            );
            self.memory_denied = Some(why.clone());
            return Err(wasmtime::format_err!("{why}"));
        }
        Ok(true)
    }
}

/// Fuel a host call costs: one, and one more per 64 bytes it moves, so a
/// guest cannot move unbounded bytes on bounded fuel.
fn charge(caller: &mut Caller<'_, CallState>, bytes: usize) -> wasmtime::Result<()> {
    charge_fuel(caller, 1 + bytes as u64 / 64)
}

/// Take `cost` fuel, or stop the call (out of fuel).
fn charge_fuel(caller: &mut Caller<'_, CallState>, cost: u64) -> wasmtime::Result<()> {
    let Ok(fuel) = caller.get_fuel() else {
        // The benchmark's unmetered baseline.
        return Ok(());
    };
    if fuel < cost {
        caller.set_fuel(0)?;
        return Err(wasmtime::Trap::OutOfFuel.into());
    }
    caller.set_fuel(fuel - cost)
}

/// The guest's memory and the call's state, both at once.
fn parts<'a>(
    caller: &'a mut Caller<'_, CallState>,
) -> wasmtime::Result<(&'a mut [u8], &'a mut CallState)> {
    let memory = match caller.data().memory {
        Some(memory) => memory,
        None => caller
            .get_export("memory")
            .and_then(|export| export.into_memory())
            .ok_or_else(|| wasmtime::format_err!("the module exports no memory"))?,
    };
    Ok(memory.data_and_store_mut(caller))
}

/// `ptr..ptr + len` of a memory of `size` bytes, if it lies inside.
fn span(size: usize, ptr: i32, len: i32) -> Option<std::ops::Range<usize>> {
    let start = usize::try_from(ptr).ok()?;
    let end = start.checked_add(usize::try_from(len).ok()?)?;
    (end <= size).then_some(start..end)
}

fn asset_code(e: &AssetError) -> i32 {
    match e {
        AssetError::Unknown(_) => error::UNKNOWN,
        AssetError::Released(_) => error::RELEASED,
        AssetError::Forbidden(_) => error::FORBIDDEN,
        AssetError::OutOfRange { .. } => error::RANGE,
        AssetError::Elsewhere { .. } => error::UNREACHABLE,
        _ => error::FORBIDDEN,
    }
}

/// The asset address at `addr_ptr`, if it lies inside `memory`.
fn address_at(memory: &[u8], addr_ptr: i32) -> Option<AssetAddress> {
    let range = span(memory.len(), addr_ptr, 16)?;
    let octets: [u8; 16] = memory[range].try_into().ok()?;
    Some(AssetAddress::from_octets(octets))
}

/// Move bytes between a memory asset and the guest's memory, one copy:
/// `write` false reads the asset into `ptr..ptr + len`, true writes it
/// from there.
fn asset_io(
    mut caller: Caller<'_, CallState>,
    (addr_ptr, offset, ptr, len): (i32, i64, i32, i32),
    write: bool,
) -> wasmtime::Result<i32> {
    let bytes = usize::try_from(len).unwrap_or(0);
    charge(&mut caller, bytes)?;
    // A storage asset, or another member's memory asset: each request for
    // it costs its own fuel.
    let remote_requests = {
        let (memory, state) = parts(&mut caller)?;
        match (address_at(memory, addr_ptr), state.assets.as_ref()) {
            (Some(address), Some(assets)) => match Route::of(address, assets) {
                Some(route) => {
                    let piece = route.piece(write);
                    bytes.div_ceil(piece) as u64 + u64::from(bytes > piece)
                }
                None => 0,
            },
            _ => 0,
        }
    };
    charge_fuel(&mut caller, REMOTE_REQUEST_FUEL * remote_requests)?;
    let (memory, state) = parts(&mut caller)?;
    let (Some(address), Some(range), Ok(offset)) = (
        address_at(memory, addr_ptr),
        span(memory.len(), ptr, len),
        u64::try_from(offset),
    ) else {
        return Ok(error::BOUNDS);
    };
    let Some(assets) = state.assets.as_ref() else {
        return Ok(error::UNREACHABLE);
    };
    if let Some(route) = Route::of(address, assets) {
        return remote(state, route, address, offset, &mut memory[range], write);
    }
    let owner = state.owner;
    // A range longer than a piece is checked whole first, then moved a
    // piece at a time: the worker's shard lock is held for one piece's
    // copy, not a whole guest-sized one.
    if range.len() > COPY_PIECE
        && let Err(e) = assets.with(address, |shard| {
            shard.read(&owner, address, offset, range.len() as u64)?;
            Ok(())
        })
    {
        return Ok(asset_code(&e));
    }
    for (i, piece) in memory[range.clone()].chunks_mut(COPY_PIECE).enumerate() {
        let at = offset + (i * COPY_PIECE) as u64;
        let moved = assets.with(address, |shard| {
            if write {
                shard.write(&owner, address, at, piece)
            } else {
                let bytes = shard.read(&owner, address, at, piece.len() as u64)?;
                bytes.copy_to(&mut &mut *piece);
                Ok(())
            }
        });
        if let Err(e) = moved {
            return Ok(asset_code(&e));
        }
    }
    Ok(range.len() as i32)
}

/// The most an asset call copies under one hold of a worker's shard lock.
const COPY_PIECE: usize = 64 * 1024;

/// How a VM thread reaches an asset its own worker shards do not hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Route {
    /// A storage asset: the control plane's store (a write waits for its
    /// group commit, or the cluster's log).
    Store,
    /// Another cluster member's memory asset: the asset proxy.
    Member,
}

impl Route {
    /// None for a memory asset of this node's.
    fn of(address: AssetAddress, assets: &MemoryAssets) -> Option<Self> {
        if address.id.is_storage() {
            Some(Route::Store)
        } else if address.locator != assets.locator() {
            Some(Route::Member)
        } else {
            None
        }
    }

    /// The most one request moves: what a read answers, or a write
    /// carries.
    fn piece(self, write: bool) -> usize {
        match (self, write) {
            (Route::Store, false) => controlplane::assets::STORAGE_READ_LEN_MAX as usize,
            (Route::Store, true) => dataplane::assets::wire::STORAGE_WRITE_LEN_MAX,
            (Route::Member, false) => dataplane::assets::wire::PROXIED_READ_LEN_MAX as usize,
            (Route::Member, true) => dataplane::assets::wire::WRITE_LEN_MAX,
        }
    }
}

/// Move bytes between an asset reached by `route` and `guest`, as the VM's
/// owner, a request at a time ([`Route::piece`]); the VM thread waits for
/// each answer, until the call's deadline at the latest (then the call
/// stops with it).
fn remote(
    state: &CallState,
    route: Route,
    address: AssetAddress,
    offset: u64,
    guest: &mut [u8],
    write: bool,
) -> wasmtime::Result<i32> {
    let reachable = match route {
        Route::Store => true,
        Route::Member => state.assets.as_ref().is_some_and(|a| a.proxies()),
    };
    let (Some(port), true) = (state.port.as_ref(), reachable) else {
        return Ok(error::UNREACHABLE);
    };
    let piece = route.piece(write);
    let len = guest.len();
    // A range of several requests is checked first by reading its last
    // byte, so that a write past the end or a stranger's fails before any
    // piece of it is written.
    if len > piece {
        let mut last = [0u8];
        let end = offset + len as u64 - 1;
        let checked = ask(state, port, route, (address, end), &mut last, false)?;
        if checked < 0 {
            return Ok(checked);
        }
    }
    for (i, part) in guest.chunks_mut(piece).enumerate() {
        let at = offset + (i * piece) as u64;
        let moved = ask(state, port, route, (address, at), part, write)?;
        if moved < 0 {
            return Ok(moved);
        }
    }
    Ok(len as i32)
}

/// One request of a VM call, by `route`: bytes `at..at + part.len()` of
/// `address` read into `part` (or written from it); 0, or a negative
/// result for the guest. It costs [`REMOTE_REQUEST_FUEL`]; past
/// [`REMOTE_REQUESTS_PER_CALL_MAX`], or once the call's deadline has
/// passed, nothing more is sent.
fn ask(
    state: &CallState,
    port: &Arc<dataplane::control::ControlPort>,
    route: Route,
    (address, at): (AssetAddress, u64),
    part: &mut [u8],
    write: bool,
) -> wasmtime::Result<i32> {
    use dataplane::assets::wire::{AssetRequest, encode_proxied};
    use dataplane::control::{Forwarded, ProxiedRequest, Ticket};
    use dataplane::protocols::stoq::ErrorCode;
    if std::time::Instant::now() >= state.deadline {
        return Err(wasmtime::Trap::Interrupt.into());
    }
    let sent_before = state.remote_requests.get();
    if sent_before >= REMOTE_REQUESTS_PER_CALL_MAX {
        return Ok(error::UNREACHABLE);
    }
    state.remote_requests.set(sent_before + 1);
    let request = if write {
        AssetRequest::Write {
            address,
            offset: at,
            data: part,
        }
    } else {
        AssetRequest::Read {
            address,
            offset: at,
            len: part.len() as u32,
        }
    };
    let (kind, payload) = request.encode();
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    let answer: dataplane::control::ProxyAnswer = Box::new(move |answer| {
        let _ = tx.send(answer);
    });
    // Where a reply goes is the answer callback (or, for the control
    // plane, the id `ask` gives): this ticket is never looked at.
    let ticket = Ticket {
        handle: 0,
        conn_id: 0,
        stream: quinn_proto::StreamId::new(quinn_proto::Side::Client, quinn_proto::Dir::Bi, 0),
    };
    let asked = match route {
        Route::Member => {
            let sent = port.proxy_asset(ProxiedRequest {
                worker: 0,
                ticket,
                kind,
                locator: address.locator,
                envelope: encode_proxied(&state.owner, kind, &payload).into(),
                answer: Some(answer),
            });
            match sent {
                Some(Ok(())) => None,
                Some(Err(_)) | None => return Ok(error::UNREACHABLE),
            }
        }
        Route::Store => {
            let sent = port.ask(
                Forwarded {
                    worker: 0,
                    ticket,
                    kind,
                    payload: payload.into(),
                    peer: None,
                    vm_owner: Some(Box::new(state.owner)),
                },
                answer,
            );
            match sent {
                Ok(id) => Some(id),
                Err(_) => return Ok(error::UNREACHABLE),
            }
        }
    };
    let wait = state
        .deadline
        .saturating_duration_since(std::time::Instant::now());
    let answer = match rx.recv_timeout(wait) {
        Ok(answer) => answer,
        Err(_) => {
            if let Some(id) = asked {
                port.forget(id);
            }
            return Err(wasmtime::Trap::Interrupt.into());
        }
    };
    Ok(match answer {
        Ok(bytes) if !write && bytes.len() == part.len() => {
            part.copy_from_slice(&bytes);
            0
        }
        Ok(_) if write => 0,
        Ok(_) => error::UNREACHABLE,
        Err((code, _)) => match ErrorCode::from_u16(code) {
            Some(ErrorCode::AssetUnknown) => error::UNKNOWN,
            Some(ErrorCode::AssetReleased) => error::RELEASED,
            Some(ErrorCode::AssetForbidden) => error::FORBIDDEN,
            Some(ErrorCode::AssetRange) => error::RANGE,
            _ => error::UNREACHABLE,
        },
    })
}

/// Fuel each request for a storage asset or another member's memory asset
/// costs, beside the bytes it moves: a VM call cannot turn its fuel into an
/// unbounded stream of requests.
pub const REMOTE_REQUEST_FUEL: u64 = 10_000;
/// Requests for storage assets and other members' memory assets one VM
/// call may send.
pub const REMOTE_REQUESTS_PER_CALL_MAX: u32 = 1024;

/// The host functions, for every module.
pub fn linker(engine: &Engine) -> wasmtime::Result<Linker<CallState>> {
    let mut linker = Linker::new(engine);
    linker.func_wrap(
        MODULE,
        "input",
        |mut caller: Caller<'_, CallState>, ptr: i32, len: i32| -> wasmtime::Result<i32> {
            charge(&mut caller, usize::try_from(len).unwrap_or(0))?;
            let (memory, state) = parts(&mut caller)?;
            let Some(range) = span(memory.len(), ptr, len) else {
                return Ok(error::BOUNDS);
            };
            let rest = &state.input[state.taken..];
            let n = rest.len().min(range.len());
            memory[range.start..range.start + n].copy_from_slice(&rest[..n]);
            state.taken += n;
            Ok(n as i32)
        },
    )?;
    linker.func_wrap(
        MODULE,
        "output",
        |mut caller: Caller<'_, CallState>, ptr: i32, len: i32| -> wasmtime::Result<i32> {
            charge(&mut caller, usize::try_from(len).unwrap_or(0))?;
            let (memory, state) = parts(&mut caller)?;
            let Some(range) = span(memory.len(), ptr, len) else {
                return Ok(error::BOUNDS);
            };
            if state.output.len() + range.len() > OUTPUT_LEN_MAX {
                return Ok(error::OUTPUT_FULL);
            }
            state.output.extend_from_slice(&memory[range]);
            Ok(0)
        },
    )?;
    linker.func_wrap(
        MODULE,
        "asset_read",
        |caller: Caller<'_, CallState>, addr: i32, offset: i64, ptr: i32, len: i32| {
            asset_io(caller, (addr, offset, ptr, len), false)
        },
    )?;
    linker.func_wrap(
        MODULE,
        "asset_write",
        |caller: Caller<'_, CallState>, addr: i32, offset: i64, ptr: i32, len: i32| {
            asset_io(caller, (addr, offset, ptr, len), true)
        },
    )?;
    linker.func_wrap(
        MODULE,
        "log",
        |mut caller: Caller<'_, CallState>, ptr: i32, len: i32| -> wasmtime::Result<()> {
            charge(&mut caller, usize::try_from(len).unwrap_or(0))?;
            let (memory, state) = parts(&mut caller)?;
            if let Some(range) = span(memory.len(), ptr, len) {
                let room = LOG_LEN_MAX.saturating_sub(state.log.len());
                let bytes = &memory[range];
                state.log.extend_from_slice(&bytes[..bytes.len().min(room)]);
            }
            Ok(())
        },
    )?;
    Ok(linker)
}
