//! The control plane's side of the VM requests: it finds the VM asset a
//! `VM_CALL` names, checks the caller's access and the VM owner's quotas,
//! and hands the call to the VM threads ([`VmHost`]), which answer the
//! worker themselves; `VM_LIST` it answers from its store. Nothing here
//! changes the store: a call's answer does not wait for a group commit.

use super::assets::AssetsRuntime;
use crate::authority::api::hex;
use crate::machine::Machine;
use crate::vm::{CallRequest, HEADER_LEN, Header, MODULE_LEN_MAX, Target, VmHost, VmInfo, VmJob};
use dataplane::assets::address::{AssetAddress, AssetId, Locator};
use dataplane::assets::memory::Owner;
use dataplane::control::Forwarded;
use dataplane::protocols::stoq::ErrorCode;
use dataplane::protocols::stoq_registry::{VM_CALL, VM_LIST};
use std::sync::Arc;

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
/// assets this node's store holds. Without `host` (VM execution off) or
/// `assets` (asset addressing off), a VM request is refused.
pub fn handle(
    machine: &Machine,
    assets: Option<&AssetsRuntime>,
    host: Option<&Arc<dyn VmHost>>,
    request: &Forwarded,
    verified: Option<&[u8]>,
    ours: &dyn Fn(Locator) -> bool,
) -> Option<Handled> {
    if request.kind != VM_CALL && request.kind != VM_LIST {
        return None;
    }
    let (Some(host), Some(assets)) = (host, assets) else {
        return Some(Handled::Now(Err((
            ErrorCode::VmOff as u16,
            "VM execution is off on this server ([hypermesh_assets] enable_vm_execution, with nat_addressing)"
                .into(),
        ))));
    };
    let Some(caller) = verified.and_then(dataplane::trust::spki_sha256) else {
        return Some(Handled::Now(Err((
            ErrorCode::CertificateRequired as u16,
            "VM requests need a valid client certificate of this authority (revoked or expired ones are refused)".into(),
        ))));
    };
    let caller = Owner(caller);
    Some(if request.kind == VM_LIST {
        Handled::Now(Ok(list(machine, assets, &caller)))
    } else {
        match call(machine, assets, host.as_ref(), request, &caller, ours) {
            Ok(()) => Handled::Running,
            Err(refused) => Handled::Now(Err(refused)),
        }
    })
}

fn module_error(message: impl Into<String>) -> (u16, String) {
    (ErrorCode::VmModule as u16, message.into())
}

/// Check a `VM_CALL` and queue it for a VM thread.
fn call(
    machine: &Machine,
    assets: &AssetsRuntime,
    host: &dyn VmHost,
    request: &Forwarded,
    caller: &Owner,
    ours: &dyn Fn(Locator) -> bool,
) -> Result<(), (u16, String)> {
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
    let job = VmJob {
        worker: request.worker,
        ticket: request.ticket,
        kind: request.kind,
        owner,
        header,
        compiled,
        module,
        input: call.input,
        check_only: call.check_only,
    };
    host.submit(job).map_err(busy)
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
