//! The control plane's side of the VM requests: it finds the VM asset a
//! `VM_CALL` names, checks the caller's access and the VM owner's quotas,
//! and hands the call to the VM threads ([`VmHost`]), which answer the
//! worker themselves; `VM_LIST` it answers from its store. Nothing here
//! changes the store: a call's answer does not wait for a group commit.
//!
//! A call that passed the checks leaves what they found with the [`Front`]
//! (the VM's owner, header and module), keyed by the caller's certificate
//! and the call's target ([`super::checked`]). The next call of that
//! caller to that target goes from the worker to the VM threads directly,
//! while the machine's count of changes ([`Machine::changes`]) is the one
//! the checks were made at and the certificate has not expired: every
//! grant, quota, zone change, revocation and write of a VM asset moves the
//! count on, and the call after it is checked here again.

use super::assets::AssetsRuntime;
use super::checked::Checked;
use crate::authority::api::hex;
use crate::machine::Machine;
use crate::vm::{CallRequest, HEADER_LEN, Header, MODULE_LEN_MAX, Target, VmHost, VmInfo, VmJob};
use dataplane::assets::address::{AssetAddress, AssetId, Locator};
use dataplane::assets::memory::Owner;
use dataplane::control::{ControlPort, Forwarded};
use dataplane::protocols::stoq::ErrorCode;
use dataplane::protocols::stoq_registry::{VM_CALL, VM_LIST};
use std::sync::Arc;
use std::sync::atomic::AtomicU64;

/// The VM threads as the control plane and the workers reach them: the
/// host, and the checks that let a worker skip the control plane.
pub struct Front {
    host: Arc<dyn VmHost>,
    checked: Checked<Target, Verdict>,
}

/// What the checks of a call found: the VM's owner and header, and the
/// owner's fuel quota.
#[derive(Clone, Copy, Debug)]
struct Verdict {
    owner: Owner,
    header: Header,
    fuel_quota: u64,
}

impl Verdict {
    /// The job that runs `request` (its `input`, or only its module's
    /// check) on what the checks found.
    fn job(
        self,
        request: &Forwarded,
        (input, check_only): (Vec<u8>, bool),
        compiled: Option<Arc<dyn std::any::Any + Send + Sync>>,
        module: Option<Arc<[u8]>>,
    ) -> VmJob {
        VmJob {
            worker: request.worker,
            ticket: request.ticket,
            kind: request.kind,
            owner: self.owner,
            header: self.header,
            fuel_quota: self.fuel_quota,
            compiled,
            module,
            input,
            check_only,
        }
    }
}

impl Front {
    /// The front of `host`, whose checks hold while `changes` stays.
    pub fn new(host: Arc<dyn VmHost>, changes: Arc<AtomicU64>) -> Arc<Self> {
        Arc::new(Self {
            host,
            checked: Checked::new(changes),
        })
    }

    /// Let `port`'s workers call through this front (while it lives: the
    /// VM threads hold the port).
    pub fn plug(self: &Arc<Self>, port: &ControlPort) {
        let front = Arc::downgrade(self);
        port.set_vm_front(Arc::new(move |request| match front.upgrade() {
            Some(front) => front.take(request),
            None => Err(request),
        }));
    }

    pub fn host(&self) -> &dyn VmHost {
        self.host.as_ref()
    }

    /// A worker's `VM_CALL`: to a VM thread if the same caller's call of
    /// the same target passed the checks and nothing changed since; else
    /// handed back for the control plane.
    fn take(&self, request: Forwarded) -> Result<(), Forwarded> {
        let Some(certificate) = request.peer.as_ref() else {
            return Err(request);
        };
        let Ok(call) = CallRequest::decode(&request.payload) else {
            return Err(request);
        };
        let Some(verdict) = self.checked.get(certificate.as_ref(), &call.target) else {
            return Err(request);
        };
        // Out of the VM threads' cache: the control plane sends its bytes.
        let Some(compiled) = self.host.compiled(&verdict.header.sha256) else {
            return Err(request);
        };
        let job = verdict.job(
            &request,
            (call.input, call.check_only),
            Some(compiled),
            None,
        );
        // Busy: the control plane answers it (busy, or queued later);
        // the worker counts what went direct (`vm_direct_calls`).
        self.host.submit(job).map_err(|_| request)
    }

    /// Remember that `certificate`'s call passed the checks made at
    /// `changes`.
    fn remember(&self, certificate: &[u8], passed: Passed, changes: u64) {
        self.checked
            .remember(certificate, passed.target, changes, passed.verdict);
    }
}

/// What a request answers: its payload, or an error code and message.
type Answer = Result<Vec<u8>, (u16, String)>;

/// How the control plane took a VM request.
#[derive(Debug)]
pub enum Handled {
    /// Its answer, now.
    Now(Answer),
    /// A VM thread runs it and answers.
    Running,
}

/// Take VM request `request` (None if it is none); `verified` is the
/// caller's certificate, checked again; `ours` says which locators' storage
/// assets this node's store holds. Without `front` (VM execution off) or
/// `assets` (asset addressing off), a VM request is refused.
pub fn handle(
    machine: &Machine,
    assets: Option<&AssetsRuntime>,
    front: Option<&Arc<Front>>,
    request: &Forwarded,
    verified: Option<&[u8]>,
    ours: &dyn Fn(Locator) -> bool,
) -> Option<Handled> {
    if request.kind != VM_CALL && request.kind != VM_LIST {
        return None;
    }
    let (Some(front), Some(assets)) = (front, assets) else {
        return Some(Handled::Now(Err((
            ErrorCode::VmOff as u16,
            "VM execution is off on this server ([hypermesh_assets] enable_vm_execution, with nat_addressing)"
                .into(),
        ))));
    };
    let Some((certificate, caller)) =
        verified.and_then(|der| Some((der, dataplane::trust::spki_sha256(der)?)))
    else {
        return Some(Handled::Now(Err((
            ErrorCode::CertificateRequired as u16,
            "VM requests need a valid client certificate of this authority (revoked or expired ones are refused)".into(),
        ))));
    };
    let caller = Owner(caller);
    Some(if request.kind == VM_LIST {
        Handled::Now(Ok(list(machine, assets, &caller)))
    } else {
        let changes = front.checked.count();
        match call(machine, assets, front.host(), request, &caller, ours) {
            Ok(checked) => {
                if let Some(passed) = checked {
                    front.remember(certificate, passed, changes);
                }
                Handled::Running
            }
            Err(refused) => Handled::Now(Err(refused)),
        }
    })
}

fn module_error(message: impl Into<String>) -> (u16, String) {
    (ErrorCode::VmModule as u16, message.into())
}

/// A call that passed the checks: the VM it names, and what they found.
struct Passed {
    target: Target,
    verdict: Verdict,
}

/// Check a `VM_CALL` and queue it for a VM thread; what the checks found
/// when its module was compiled already.
fn call(
    machine: &Machine,
    assets: &AssetsRuntime,
    host: &dyn VmHost,
    request: &Forwarded,
    caller: &Owner,
    ours: &dyn Fn(Locator) -> bool,
) -> Result<Option<Passed>, (u16, String)> {
    let call =
        CallRequest::decode(&request.payload).map_err(|e| (ErrorCode::Malformed as u16, e))?;
    let id = match &call.target {
        Target::Address(address) if !ours(address.locator) => {
            return Err((
                ErrorCode::AssetElsewhere as u16,
                format!(
                    "{address}: held by the node of locator {}, not this one",
                    address.locator
                ),
            ));
        }
        Target::Address(address) if !address.id.is_storage() => {
            return Err(module_error(format!(
                "{address} is a memory asset; a VM is a storage asset"
            )));
        }
        Target::Address(address) => address.id,
        Target::Name(label) => named(machine, label)?,
    };
    let read = |offset: u64, len: u64| {
        machine
            .read_storage(caller, id, offset, len)
            .map_err(|e| assets.refusal(&e))
    };
    let Some((owner, size)) = machine.assets().owner_and_size(id) else {
        // Unknown or released, as a read says.
        read(0, 0)?;
        return Err((
            ErrorCode::AssetUnknown as u16,
            format!("{id:?}: no such asset"),
        ));
    };
    // The caller's access first: a stranger learns nothing of the asset.
    let header = read(0, (HEADER_LEN as u64).min(size))?;
    // A call runs as the VM's owner: another identity may run it only if
    // no one but the owner could have written it.
    if owner != *caller && machine.assets().writable_by_others(id) {
        return Err((
            ErrorCode::AssetForbidden as u16,
            "only its owner may call a VM that others may write".into(),
        ));
    }
    let header = Header::decode(&header).map_err(module_error)?;
    let module_len = size - HEADER_LEN as u64;
    if module_len == 0 || module_len > MODULE_LEN_MAX as u64 {
        return Err(module_error(format!(
            "a VM's module is 1 to {MODULE_LEN_MAX} bytes, not {module_len}"
        )));
    }
    let memory_max = host.memory_mib_max();
    if header.memory_mib > memory_max {
        return Err((
            ErrorCode::AssetLimit as u16,
            format!(
                "the VM's instances may grow to {} MiB; this server gives a VM at most {memory_max} MiB (vm_memory_mib_max)",
                header.memory_mib
            ),
        ));
    }
    let fuel_quota = machine.assets().fuel_quota(&owner);
    if header.fuel > fuel_quota {
        return Err((
            ErrorCode::AssetQuota as u16,
            format!(
                "the VM gives each call {} fuel; its owner's quota allows at most {fuel_quota} (quota set --fuel)",
                header.fuel
            ),
        ));
    }
    let (memory_quota, _) = machine.assets().effective(&owner);
    if header.memory_bytes() > memory_quota {
        return Err((
            ErrorCode::AssetQuota as u16,
            format!(
                "the VM's instances may grow to {} MiB; its owner's memory quota is {} MiB",
                header.memory_mib,
                memory_quota >> 20
            ),
        ));
    }
    let busy = |why: String| (ErrorCode::Busy as u16, why);
    // The module's bytes are read (and hashed) only when they changed
    // since they were last hashed, or the VM threads need them to compile:
    // a header naming another module's digest runs nothing but its own.
    let checked = machine.assets().module_checked(id) == Some(header.sha256);
    let mut compiled = if checked {
        host.compiled(&header.sha256)
    } else {
        None
    };
    let module = match compiled {
        Some(_) => None,
        None => {
            host.room(&owner, module_len as usize).map_err(busy)?;
            let mut bytes = Vec::with_capacity(module_len as usize);
            let step = crate::assets::STORAGE_READ_LEN_MAX;
            while (bytes.len() as u64) < module_len {
                let offset = bytes.len() as u64;
                bytes.extend(read(
                    HEADER_LEN as u64 + offset,
                    step.min(module_len - offset),
                )?);
            }
            let digest = ring::digest::digest(&ring::digest::SHA256, &bytes);
            if digest.as_ref() != header.sha256 {
                return Err(module_error(
                    "the module's SHA-256 is not the one its VM header names",
                ));
            }
            machine.assets().set_module_checked(id, header.sha256);
            // Compiled for another asset of the same module: no bytes.
            compiled = host.compiled(&header.sha256);
            match compiled {
                Some(_) => None,
                None => Some(Arc::<[u8]>::from(bytes)),
            }
        }
    };
    let verdict = Verdict {
        owner,
        header,
        fuel_quota,
    };
    let remembered = compiled.is_some();
    let job = verdict.job(request, (call.input, call.check_only), compiled, module);
    host.submit(job).map_err(busy)?;
    Ok(remembered.then_some(Passed {
        target: call.target,
        verdict,
    }))
}

/// Whether writing `data` at `offset` of storage asset `id` writes a VM
/// asset: one whose bytes start with the VM magic before the write, or
/// would after it. A VM writes no VM asset: callers its owner granted read
/// access run its VMs, and a VM they steered could otherwise put a module
/// of theirs where the owner's was.
pub(super) fn writes_a_vm(machine: &Machine, id: AssetId, offset: u64, data: &[u8]) -> bool {
    let magic = crate::vm::MAGIC.len() as u64;
    let Some((owner, size)) = machine.assets().owner_and_size(id) else {
        return false;
    };
    if size < magic {
        return false;
    }
    let Ok(before) = machine.read_storage(&owner, id, 0, magic) else {
        return false;
    };
    if before == crate::vm::MAGIC {
        return true;
    }
    let mut after = before;
    for (i, byte) in data.iter().enumerate() {
        match offset.checked_add(i as u64) {
            Some(at) if at < magic => after[at as usize] = *byte,
            _ => break,
        }
    }
    after == crate::vm::MAGIC
}

/// The storage asset published as `LABEL.assets.APEX`.
fn named(machine: &Machine, label: &str) -> Result<AssetId, (u16, String)> {
    let unknown = || {
        (
            ErrorCode::AssetUnknown as u16,
            format!("no VM is named {label}"),
        )
    };
    let zone = machine.zone().ok_or_else(unknown)?;
    let name = zone
        .qualify(&format!("{label}.{}", super::assets::ASSET_NAMES))
        .map_err(|e| (ErrorCode::Malformed as u16, e.to_string()))?;
    match zone.get(&name).map(|records| records.aaaa()) {
        Some([one]) => {
            let address = AssetAddress::from(*one);
            if address.id.is_storage() {
                Ok(address.id)
            } else {
                Err(unknown())
            }
        }
        _ => Err(unknown()),
    }
}

/// The caller's VM assets (JSON: [`VmInfo`]s).
fn list(machine: &Machine, assets: &AssetsRuntime, caller: &Owner) -> Vec<u8> {
    let vms: Vec<VmInfo> = machine
        .assets()
        .list(caller)
        .into_iter()
        .filter(|info| info.size > HEADER_LEN as u64)
        .filter_map(|info| {
            let bytes = machine
                .read_storage(caller, info.id, 0, HEADER_LEN as u64)
                .ok()?;
            let header = Header::decode(&bytes).ok()?;
            Some(VmInfo {
                name: info
                    .name
                    .as_deref()
                    .and_then(|name| name.split('.').next())
                    .map(str::to_owned),
                address: assets.address(info.id).to_string(),
                fuel: header.fuel,
                memory_mib: header.memory_mib,
                module_bytes: info.size - HEADER_LEN as u64,
                sha256: hex(&header.sha256),
            })
        })
        .collect();
    serde_json::to_vec(&vms).expect("a VM list serializes")
}

#[cfg(test)]
mod tests {
    use super::*;
    use dataplane::control::Ticket;
    use std::sync::Mutex;
    use std::sync::atomic::Ordering;

    /// VM threads that keep what they are given.
    #[derive(Default)]
    struct Threads {
        compiled: Mutex<Vec<[u8; 32]>>,
        jobs: Mutex<Vec<VmJob>>,
        full: std::sync::atomic::AtomicBool,
    }

    impl VmHost for Threads {
        fn compiled(&self, sha256: &[u8; 32]) -> Option<Arc<dyn std::any::Any + Send + Sync>> {
            let compiled = self.compiled.lock().unwrap();
            compiled
                .contains(sha256)
                .then(|| Arc::new(()) as Arc<dyn std::any::Any + Send + Sync>)
        }
        fn room(&self, _: &Owner, _: usize) -> Result<(), String> {
            Ok(())
        }
        fn submit(&self, job: VmJob) -> Result<(), String> {
            if self.full.load(Ordering::Relaxed) {
                return Err("busy".into());
            }
            self.jobs.lock().unwrap().push(job);
            Ok(())
        }
        fn memory_mib_max(&self) -> u32 {
            64
        }
    }

    fn certificate(not_after_year: i32) -> Vec<u8> {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(vec!["caller".into()]).unwrap();
        params.not_after = rcgen::date_time_ymd(not_after_year, 1, 1);
        params.self_signed(&key).unwrap().der().to_vec()
    }

    fn request(certificate: &[u8], target: &Target, input: &[u8]) -> Forwarded {
        let call = CallRequest {
            check_only: false,
            target: target.clone(),
            input: input.to_vec(),
        };
        Forwarded {
            worker: 0,
            ticket: Ticket {
                handle: 1,
                conn_id: 2,
                stream: quinn_proto::StreamId::new(
                    quinn_proto::Side::Client,
                    quinn_proto::Dir::Bi,
                    0,
                ),
            },
            kind: VM_CALL,
            payload: call.encode().into(),
            peer: Some(certificate.to_vec().into()),
            vm_owner: None,
        }
    }

    fn passed(target: &Target, owner: Owner, header: Header) -> Passed {
        Passed {
            target: target.clone(),
            verdict: Verdict {
                owner,
                header,
                fuel_quota: 5000,
            },
        }
    }

    #[test]
    fn a_checked_call_goes_straight_to_the_vm_threads_until_anything_changes() {
        let threads = Arc::new(Threads::default());
        let header = Header::for_module(b"module", 1000, 1);
        threads.compiled.lock().unwrap().push(header.sha256);
        let changes = Arc::new(AtomicU64::new(7));
        let front = Front::new(threads.clone(), changes.clone());
        let caller = certificate(2099);
        let echo = Target::Name("echo".into());
        let owner = Owner([3; 32]);

        // Nothing checked yet: the control plane takes it.
        assert!(front.take(request(&caller, &echo, b"a")).is_err());
        front.remember(&caller, passed(&echo, owner, header), 7);
        front.take(request(&caller, &echo, b"b")).unwrap();
        {
            let jobs = threads.jobs.lock().unwrap();
            let job = jobs.last().unwrap();
            assert_eq!(
                (job.owner, job.header, &job.input[..]),
                (owner, header, &b"b"[..])
            );
            assert!(job.compiled.is_some() && job.module.is_none());
        }
        assert_eq!(threads.jobs.lock().unwrap().len(), 1);

        // Another caller, another target, no certificate, bytes that are no
        // call: each checked by the control plane.
        assert!(front.take(request(&certificate(2099), &echo, b"")).is_err());
        let other = Target::Name("other".into());
        assert!(front.take(request(&caller, &other, b"")).is_err());
        let mut anonymous = request(&caller, &echo, b"");
        anonymous.peer = None;
        assert!(front.take(anonymous).is_err());
        let mut garbage = request(&caller, &echo, b"");
        garbage.payload = bytes::Bytes::from_static(&[9, 9]);
        assert!(front.take(garbage).is_err());

        // VM threads busy, or the module out of their cache: the control
        // plane again.
        threads.full.store(true, Ordering::Relaxed);
        assert!(front.take(request(&caller, &echo, b"")).is_err());
        threads.full.store(false, Ordering::Relaxed);
        threads.compiled.lock().unwrap().clear();
        assert!(front.take(request(&caller, &echo, b"")).is_err());
        threads.compiled.lock().unwrap().push(header.sha256);
        front.take(request(&caller, &echo, b"")).unwrap();

        // Any change to the machine (a write, a grant, a quota, a
        // revocation): checked again.
        changes.fetch_add(1, Ordering::Release);
        assert!(front.take(request(&caller, &echo, b"")).is_err());
        assert_eq!(threads.jobs.lock().unwrap().len(), 2);
    }

    #[test]
    fn an_expired_certificate_is_checked_by_the_control_plane() {
        let threads = Arc::new(Threads::default());
        let header = Header::for_module(b"module", 1000, 1);
        threads.compiled.lock().unwrap().push(header.sha256);
        let front = Front::new(threads, Arc::new(AtomicU64::new(0)));
        let expired = certificate(2001);
        let echo = Target::Name("echo".into());
        front.remember(&expired, passed(&echo, Owner([1; 32]), header), 0);
        assert!(front.take(request(&expired, &echo, b"")).is_err());
    }

    #[test]
    fn the_front_forgets_past_its_bound() {
        let threads = Arc::new(Threads::default());
        let front = Front::new(threads, Arc::new(AtomicU64::new(0)));
        let caller = certificate(2099);
        let header = Header::for_module(b"module", 1000, 1);
        for i in 0..super::super::checked::CHECKED_MAX + 10 {
            let target = Target::Name(format!("vm{i}"));
            front.remember(&caller, passed(&target, Owner([1; 32]), header), 0);
            assert!(front.checked.len() <= super::super::checked::CHECKED_MAX);
        }
    }
}
