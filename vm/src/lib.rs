//! VM execution: WebAssembly modules run under fuel, memory and time
//! limits, with I/O only through the host ABI (`docs/VM.md`).
//!
//! [`Runtime`] is the engine (wasmtime with Cranelift, the pooling
//! allocator and copy-on-write memory images, no WASI), the host functions
//! and the cache of compiled modules: [`Runtime::compile`] checks a module
//! against the ABI once, [`Runtime::call`] runs one call on a fresh
//! instance. [`VmPool`] is the VM threads: the control plane queues the
//! calls it checked ([`controlplane::vm::VmHost`]), a VM thread runs each
//! and answers the worker that took the request. The dataplane's workers
//! never run guest code.

mod abi;
pub mod budget;

use controlplane::vm::{Header, Outcome, Reason, VmHost, VmJob};
use dataplane::assets::memory::{MemoryAssets, Owner};
use dataplane::control::{ControlPort, Reply};
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::time::{Duration, Instant};
use wasmtime::{Config, Engine, InstancePre, Linker, Module, Store, Trap};

pub use abi::{IMPORTS, error as abi_error};

/// Calls waiting for a VM thread, all threads together.
pub const QUEUE_LEN: usize = 1024;
/// Compiled modules kept; past it, the one called least recently is
/// dropped (and compiled again when called).
pub const MODULES_CACHED_MAX: usize = 256;
/// Modules refused at compile time, remembered by SHA-256 so that calling
/// one again costs no second compile.
pub const MODULES_REFUSED_MAX: usize = 4096;
/// Calls of one owner waiting for a VM thread: past it, its calls are
/// answered `BUSY` while others' still queue.
pub const QUEUED_PER_OWNER_MAX: usize = 64;
/// Module bytes queued calls may carry (modules not compiled yet), all
/// together.
pub const QUEUED_MODULE_BYTES_MAX: usize = 64 << 20;
/// How often the engine's epoch ticks: the deadline's granularity.
pub const EPOCH_TICK: Duration = Duration::from_millis(5);
/// The stack a guest may use: deep recursion traps past it.
pub const WASM_STACK_MAX: usize = 512 * 1024;
/// Table elements an instance may have.
pub const TABLE_ELEMENTS_MAX: usize = 10_000;
/// Bytes of a memory or table slot reset in place between instances;
/// past them, pages go back to the kernel.
pub const KEEP_RESIDENT: usize = 1 << 20;

/// How the VM threads run (`[hypermesh_assets]`, resolved).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VmConfig {
    /// VM threads.
    pub threads: usize,
    /// Cores to pin them to, one each in turn (empty: not pinned).
    pub cores: Vec<usize>,
    /// The largest memory a VM may name, MiB: the pool's slot size.
    pub memory_mib_max: u32,
    /// How long one call may run, wall clock.
    pub deadline: Duration,
}

impl Default for VmConfig {
    fn default() -> Self {
        Self {
            threads: 1,
            cores: Vec::new(),
            memory_mib_max: 64,
            deadline: Duration::from_secs(1),
        }
    }
}

/// Why a module is not run.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ModuleError {
    #[error("not a WebAssembly module this server runs: {0}")]
    Invalid(String),
    #[error(
        "import {module}.{name} is not part of the VM ABI (a module may import only {allowed})"
    )]
    Import {
        module: String,
        name: String,
        allowed: String,
    },
    #[error("the module must export {0}")]
    Export(&'static str),
    #[error("the module's SHA-256 is not the one its VM header names")]
    Digest,
    #[error("the module needs more memory or table than this server gives a VM: {0}")]
    TooLarge(String),
}

/// The limits one call runs under.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    pub fuel: u64,
    pub memory_bytes: u64,
}

impl From<&Header> for Limits {
    fn from(header: &Header) -> Self {
        Self {
            fuel: header.fuel,
            memory_bytes: header.memory_bytes(),
        }
    }
}

/// A module compiled and checked, ready to instantiate.
#[derive(Clone)]
pub struct Compiled(InstancePre<abi::CallState>);

/// The engine, the host functions and the compiled modules.
pub struct Runtime {
    engine: Engine,
    linker: Linker<abi::CallState>,
    modules: Mutex<Cache>,
    deadline_ticks: u64,
    /// Whether calls burn fuel (always, but in the benchmark's baseline).
    metered: bool,
    /// How long a call may run, wall clock.
    deadline: Duration,
    /// Where guests' requests for other members' memory assets go (the
    /// VM threads' port; none in process).
    port: Option<Arc<ControlPort>>,
    /// What the guests' asset calls reach: this node's memory assets.
    memory: Option<Arc<MemoryAssets>>,
    /// The owners' compute budgets on this node.
    budgets: Mutex<budget::Budgets>,
}

#[derive(Default)]
struct Cache {
    /// Each compiled module, with the tick it was last called at.
    compiled: HashMap<[u8; 32], (Compiled, u64)>,
    /// Counts the lookups: a call's tick.
    ticks: u64,
    refused: HashMap<[u8; 32], ModuleError>,
    refused_order: VecDeque<[u8; 32]>,
}

impl Cache {
    /// The compiled module, now the most recently called (a lookup costs
    /// the same however many modules are kept).
    fn get(&mut self, sha256: &[u8; 32]) -> Option<Compiled> {
        self.ticks += 1;
        let (compiled, called) = self.compiled.get_mut(sha256)?;
        *called = self.ticks;
        Some(compiled.clone())
    }

    /// Keep `compiled`; past [`MODULES_CACHED_MAX`], the least recently
    /// called goes (a scan, once per module compiled).
    fn keep(&mut self, sha256: [u8; 32], compiled: Compiled) {
        self.ticks += 1;
        self.compiled.insert(sha256, (compiled, self.ticks));
        while self.compiled.len() > MODULES_CACHED_MAX {
            let oldest = self
                .compiled
                .iter()
                .min_by_key(|(_, (_, called))| *called)
                .map(|(sha256, _)| *sha256);
            if let Some(oldest) = oldest {
                self.compiled.remove(&oldest);
            }
        }
    }

    fn refuse(&mut self, sha256: [u8; 32], why: ModuleError) {
        if self.refused.insert(sha256, why).is_none() {
            self.refused_order.push_back(sha256);
        }
        while self.refused_order.len() > MODULES_REFUSED_MAX {
            if let Some(old) = self.refused_order.pop_front() {
                self.refused.remove(&old);
            }
        }
    }
}

impl Runtime {
    /// An engine for `config`, whose guests reach `memory`'s assets. The
    /// pool holds `instances` instances at once (one per VM thread).
    pub fn new(
        config: &VmConfig,
        instances: u32,
        memory: Option<Arc<MemoryAssets>>,
    ) -> Result<Self, String> {
        Self::metering(config, instances, memory, true)
    }

    /// [`Self::new`], with fuel metered or not (`vm-bench`'s baseline for
    /// what metering costs; a server always meters).
    pub fn metering(
        config: &VmConfig,
        instances: u32,
        memory: Option<Arc<MemoryAssets>>,
        metered: bool,
    ) -> Result<Self, String> {
        let mut pool = wasmtime::PoolingAllocationConfig::new();
        pool.total_core_instances(instances)
            .total_memories(instances)
            .total_tables(instances)
            .max_memories_per_module(1)
            .max_tables_per_module(1)
            .table_elements(TABLE_ELEMENTS_MAX)
            .max_memory_size((config.memory_mib_max as usize) << 20)
            // A slot's first MiB is reset for its next instance in place
            // (only the pages the last one touched, found with PAGEMAP_SCAN
            // from Linux 6.7; all of it before), not by `madvise`, whose TLB
            // shootdowns interrupt every core the process runs on, the
            // workers' included. A guest that grew past it is still
            // madvised beyond that first MiB.
            .linear_memory_keep_resident(KEEP_RESIDENT)
            .table_keep_resident(KEEP_RESIDENT)
            .pagemap_scan(wasmtime::Enabled::Auto);
        let mut wasm = Config::new();
        wasm.consume_fuel(metered)
            .epoch_interruption(true)
            .max_wasm_stack(WASM_STACK_MAX)
            // A trap's reason, not thousands of frames of a deep recursion.
            .wasm_backtrace_max_frames(None)
            .memory_init_cow(true)
            .allocation_strategy(wasmtime::InstanceAllocationStrategy::Pooling(pool));
        let engine = Engine::new(&wasm).map_err(|e| format!("the VM engine: {e}"))?;
        let linker = abi::linker(&engine).map_err(|e| format!("the VM host functions: {e}"))?;
        Ok(Self {
            engine,
            linker,
            modules: Mutex::new(Cache::default()),
            deadline_ticks: (config.deadline.as_micros() / EPOCH_TICK.as_micros()).max(1) as u64
                + 1,
            metered,
            deadline: config.deadline,
            port: None,
            memory,
            budgets: Mutex::default(),
        })
    }

    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// The compiled module with this SHA-256, if cached (now the most
    /// recently called).
    pub fn cached(&self, sha256: &[u8; 32]) -> Option<Compiled> {
        lock(&self.modules).get(sha256)
    }

    /// Compile `bytes` (WebAssembly, or its text format), check it against
    /// the ABI and cache it under `sha256` (checked against the bytes). The
    /// imports and exports are checked before anything compiles, and a
    /// module refused once is refused again without compiling.
    pub fn compile(&self, sha256: &[u8; 32], bytes: &[u8]) -> Result<Compiled, ModuleError> {
        let digest = ring::digest::digest(&ring::digest::SHA256, bytes);
        if digest.as_ref() != sha256 {
            return Err(ModuleError::Digest);
        }
        {
            let mut cache = lock(&self.modules);
            if let Some(compiled) = cache.get(sha256) {
                return Ok(compiled);
            }
            if let Some(why) = cache.refused.get(sha256) {
                return Err(why.clone());
            }
        }
        let compiled = abi::precheck(bytes).and_then(|()| {
            let module = Module::new(&self.engine, bytes)
                .map_err(|e| ModuleError::Invalid(format!("{e:#}")))?;
            abi::check(&module)?;
            self.linker
                .instantiate_pre(&module)
                .map(Compiled)
                .map_err(|e| ModuleError::Invalid(format!("{e:#}")))
        });
        let mut cache = lock(&self.modules);
        match &compiled {
            Ok(compiled) => cache.keep(*sha256, compiled.clone()),
            Err(why) => cache.refuse(*sha256, why.clone()),
        }
        compiled
    }

    /// Run `run` of a fresh instance of `module` for `owner` (whose assets
    /// the guest reaches) with `input`, under `limits` (the fuel only when
    /// the engine meters it).
    pub fn call(&self, module: &Compiled, owner: Owner, limits: Limits, input: &[u8]) -> Outcome {
        let fuel = self.metered;
        let given = if fuel { limits.fuel } else { 0 };
        let state = abi::CallState::new(
            owner,
            limits.memory_bytes,
            input,
            self.memory.clone(),
            self.port.clone(),
            Instant::now() + self.deadline,
        );
        let mut store = Store::new(&self.engine, state);
        store.limiter(|state| state);
        if fuel {
            let _ = store.set_fuel(given);
        }
        store.set_epoch_deadline(self.deadline_ticks);
        store.epoch_deadline_trap();
        let result = module.0.instantiate(&mut store).and_then(|instance| {
            store.data_mut().memory = instance.get_memory(&mut store, "memory");
            let run = instance.get_typed_func::<(), i32>(&mut store, "run")?;
            run.call(&mut store, ())
        });
        let fuel_used = given.saturating_sub(store.get_fuel().unwrap_or(0));
        let state = store.into_data();
        let (reason, status, detail) = match result {
            Ok(status) => (Reason::Finished, status, String::new()),
            Err(_) if state.memory_denied.is_some() => (
                Reason::Memory,
                0,
                state.memory_denied.clone().unwrap_or_default(),
            ),
            Err(e) => match e.downcast_ref::<Trap>() {
                Some(Trap::OutOfFuel) => (Reason::Fuel, 0, Trap::OutOfFuel.to_string()),
                Some(Trap::Interrupt) => (
                    Reason::Deadline,
                    0,
                    "the call ran past its deadline".to_owned(),
                ),
                Some(trap) => (Reason::Trap, 0, format!("wasm trap: {trap}")),
                None => (Reason::Trap, 0, format!("{e:#}")),
            },
        };
        Outcome {
            reason,
            status,
            fuel_used,
            detail,
            output: state.output,
            log: state.log,
        }
    }

    /// Run `job` (compiling its module if needed), charging its owner's
    /// memory quota for the instance's limit while it runs.
    pub fn run_job(&self, job: &VmJob) -> Result<Outcome, (u16, String)> {
        use dataplane::protocols::stoq::ErrorCode;
        let held = job
            .compiled
            .as_ref()
            .and_then(|handle| handle.downcast_ref::<Compiled>());
        let module = match (held, &job.module) {
            (Some(compiled), _) => compiled.clone(),
            (None, Some(bytes)) => self
                .compile(&job.header.sha256, bytes)
                .map_err(|e| (ErrorCode::VmModule as u16, e.to_string()))?,
            (None, None) => {
                return Err((
                    ErrorCode::VmModule as u16,
                    "a call came without its module".into(),
                ));
            }
        };
        if job.check_only {
            return Ok(Outcome {
                reason: Reason::Checked,
                status: 0,
                fuel_used: 0,
                detail: String::new(),
                output: Vec::new(),
                log: Vec::new(),
            });
        }
        let limits = Limits::from(&job.header);
        let _held = match &self.memory {
            Some(memory) => Some(
                memory
                    .ledger()
                    .hold(&job.owner, limits.memory_bytes)
                    .map_err(|e| {
                        (
                            ErrorCode::AssetQuota as u16,
                            format!("the VM's memory: {e}"),
                        )
                    })?,
            ),
            None => None,
        };
        // The owner's compute budget: its fuel quota a second.
        let quota = job.fuel_quota;
        lock(&self.budgets)
            .draw(&job.owner, quota, Instant::now())
            .map_err(|spent| {
                (
                    ErrorCode::AssetQuota as u16,
                    format!(
                        "the VM owner's compute budget is spent: its VMs burn at most {quota} fuel a second on this server (quota set --fuel); retry in {} ms",
                        spent.wait.as_millis() + 1
                    ),
                )
            })?;
        let outcome = self.call(&module, job.owner, limits, &job.input);
        lock(&self.budgets).charge(&job.owner, quota, outcome.fuel_used, Instant::now());
        Ok(outcome)
    }
}

/// The VM threads and their queue.
pub struct VmPool {
    shared: Arc<Shared>,
    threads: Mutex<Vec<std::thread::JoinHandle<()>>>,
}

struct Shared {
    runtime: Runtime,
    queue: Mutex<Queue>,
    ready: Condvar,
    stop: AtomicBool,
    /// Whether the epoch still ticks: until the VM threads are joined, so a
    /// running call always meets its deadline.
    ticking: AtomicBool,
    port: Arc<ControlPort>,
    calls: AtomicU64,
    memory_mib_max: u32,
}

/// The calls waiting, and what bounds them.
#[derive(Default)]
struct Queue {
    jobs: VecDeque<VmJob>,
    /// Calls waiting per owner.
    per_owner: HashMap<Owner, usize>,
    /// Module bytes the waiting calls carry.
    module_bytes: usize,
}

impl Queue {
    /// Whether a call of `owner` carrying `module_bytes` may wait: within
    /// the queue's length and bytes, and the owner's share.
    fn room(&self, owner: &Owner, module_bytes: usize) -> Result<(), String> {
        if self.jobs.len() >= QUEUE_LEN
            || self.module_bytes + module_bytes > QUEUED_MODULE_BYTES_MAX
        {
            return Err("the VM threads are busy; retry in a moment".into());
        }
        if self.per_owner.get(owner).copied().unwrap_or(0) >= QUEUED_PER_OWNER_MAX {
            return Err(format!(
                "{QUEUED_PER_OWNER_MAX} calls of this VM's owner are waiting; retry when one is answered"
            ));
        }
        Ok(())
    }

    fn pop(&mut self) -> Option<VmJob> {
        let job = self.jobs.pop_front()?;
        if let Some(n) = self.per_owner.get_mut(&job.owner) {
            *n -= 1;
            if *n == 0 {
                self.per_owner.remove(&job.owner);
            }
        }
        self.module_bytes -= job.module.as_ref().map_or(0, |m| m.len());
        Some(job)
    }
}

impl VmPool {
    /// Start `config.threads` VM threads (and the epoch's ticker), which
    /// answer on `port` and reach `memory`'s assets.
    pub fn start(
        config: &VmConfig,
        port: Arc<ControlPort>,
        memory: Option<Arc<MemoryAssets>>,
    ) -> Result<Arc<Self>, String> {
        let threads = config.threads.max(1);
        let mut runtime = Runtime::new(config, threads as u32, memory)?;
        runtime.port = Some(port.clone());
        let shared = Arc::new(Shared {
            runtime,
            queue: Mutex::new(Queue::default()),
            ready: Condvar::new(),
            stop: AtomicBool::new(false),
            ticking: AtomicBool::new(true),
            port,
            calls: AtomicU64::new(0),
            memory_mib_max: config.memory_mib_max,
        });
        let mut handles = Vec::new();
        for i in 0..threads {
            let shared = shared.clone();
            let core = (!config.cores.is_empty()).then(|| config.cores[i % config.cores.len()]);
            let handle = std::thread::Builder::new()
                .name(format!("vm-{i}"))
                .spawn(move || {
                    if let Some(core) = core
                        && !core_affinity::set_for_current(core_affinity::CoreId { id: core })
                    {
                        tracing::warn!(core, "could not pin a VM thread");
                    }
                    shared.serve();
                })
                .map_err(|e| format!("a VM thread: {e}"))?;
            handles.push(handle);
        }
        let ticker = shared.clone();
        handles.push(
            std::thread::Builder::new()
                .name("vm-epoch".into())
                .spawn(move || {
                    while ticker.ticking.load(Ordering::Relaxed) {
                        std::thread::sleep(EPOCH_TICK);
                        ticker.runtime.engine.increment_epoch();
                    }
                })
                .map_err(|e| format!("the VM epoch thread: {e}"))?,
        );
        Ok(Arc::new(Self {
            shared,
            threads: Mutex::new(handles),
        }))
    }

    /// Calls run so far.
    pub fn calls(&self) -> u64 {
        self.shared.calls.load(Ordering::Relaxed)
    }

    /// Stop the threads once the calls running now end, by their deadline
    /// at the latest (queued ones are dropped unanswered: their
    /// connections are closing too); the epoch ticks until then.
    pub fn stop(&self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        self.shared.ready.notify_all();
        let mut handles = std::mem::take(&mut *lock(&self.threads));
        let ticker = handles.pop();
        for handle in handles {
            let _ = handle.join();
        }
        self.shared.ticking.store(false, Ordering::Relaxed);
        if let Some(ticker) = ticker {
            let _ = ticker.join();
        }
    }
}

impl Shared {
    fn serve(&self) {
        loop {
            let job = {
                let mut queue = lock(&self.queue);
                loop {
                    if self.stop.load(Ordering::Relaxed) {
                        return;
                    }
                    if let Some(job) = queue.pop() {
                        break job;
                    }
                    queue = self
                        .ready
                        .wait(queue)
                        .unwrap_or_else(PoisonError::into_inner);
                }
            };
            // A panic in a call (a bug of ours, not the guest's: its traps
            // are outcomes) answers the call and keeps the thread serving.
            let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                self.runtime.run_job(&job)
            }));
            let result = match ran {
                Ok(result) => result.map(|outcome| {
                    if !outcome.succeeded() {
                        tracing::debug!(reason = ?outcome.reason, detail = %outcome.detail, "a VM call failed");
                    }
                    outcome.encode()
                }),
                Err(_) => {
                    tracing::error!("a VM call panicked; its caller is answered with an error");
                    Err((
                        dataplane::protocols::stoq::ErrorCode::VmModule as u16,
                        "the call failed inside the server".to_owned(),
                    ))
                }
            };
            self.calls.fetch_add(1, Ordering::Relaxed);
            controlplane::runtime::send_reply(
                &self.port,
                job.worker,
                Reply {
                    ticket: job.ticket,
                    kind: job.kind,
                    result,
                },
            );
        }
    }
}

impl VmHost for VmPool {
    fn compiled(&self, sha256: &[u8; 32]) -> Option<Arc<dyn std::any::Any + Send + Sync>> {
        self.shared
            .runtime
            .cached(sha256)
            .map(|compiled| Arc::new(compiled) as Arc<dyn std::any::Any + Send + Sync>)
    }

    fn room(&self, owner: &Owner, module_bytes: usize) -> Result<(), String> {
        lock(&self.shared.queue).room(owner, module_bytes)
    }

    fn submit(&self, job: VmJob) -> Result<(), String> {
        let module_bytes = job.module.as_ref().map_or(0, |m| m.len());
        let mut queue = lock(&self.shared.queue);
        queue.room(&job.owner, module_bytes)?;
        *queue.per_owner.entry(job.owner).or_default() += 1;
        queue.module_bytes += module_bytes;
        queue.jobs.push_back(job);
        drop(queue);
        self.shared.ready.notify_one();
        Ok(())
    }

    fn memory_mib_max(&self) -> u32 {
        self.shared.memory_mib_max
    }
}

impl Drop for VmPool {
    fn drop(&mut self) {
        self.stop();
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests;
