//! The `internet2 vm` commands: WebAssembly modules deployed as storage
//! assets and run on the server's VM threads (`controlplane::vm`,
//! docs/VM.md). A module file is WebAssembly or its text format (`.wat`);
//! the client turns text into WebAssembly before it uploads.

use crate::cli_assets::{is_code, many, print, request};
use crate::cli_authority::Connect;
use anyhow::{Context, bail};
use controlplane::vm::{
    CallRequest, FUEL_DEFAULT, HEADER_LEN, Header, MEMORY_MIB_DEFAULT, MEMORY_MIB_MAX,
    MODULE_LEN_MAX, Outcome, Reason, Target, VmInfo,
};
use dataplane::assets::address::AssetAddress;
use dataplane::assets::wire::{AllocKind, AssetRequest, STORAGE_WRITE_LEN_MAX};
use dataplane::client::rpc::Request;
use dataplane::protocols::stoq::{ErrorCode, encode};
use dataplane::protocols::stoq_registry::{VM_CALL, VM_LIST};
use std::io::Write;
use std::path::{Path, PathBuf};

/// A call's input: text, a file's bytes, or none.
#[derive(Debug, clap::Args)]
pub struct InputArgs {
    /// The call's input, as text.
    #[arg(long, conflicts_with = "input_file")]
    input: Option<String>,
    /// The call's input: this file's bytes.
    #[arg(long, value_name = "FILE")]
    input_file: Option<PathBuf>,
}

impl InputArgs {
    fn bytes(&self) -> anyhow::Result<Vec<u8>> {
        let bytes = match (&self.input, &self.input_file) {
            (Some(text), _) => text.as_bytes().to_vec(),
            (None, Some(file)) => {
                std::fs::read(file).with_context(|| format!("cannot read {}", file.display()))?
            }
            (None, None) => Vec::new(),
        };
        if bytes.len() > controlplane::vm::INPUT_LEN_MAX {
            bail!(
                "a call's input is at most {} bytes, not {}",
                controlplane::vm::INPUT_LEN_MAX,
                bytes.len()
            );
        }
        Ok(bytes)
    }
}

/// A VM's limits as its deployer gives them.
#[derive(Debug, clap::Args)]
pub struct LimitArgs {
    /// Fuel each call is given (about one per WebAssembly instruction).
    #[arg(long, default_value_t = FUEL_DEFAULT)]
    pub fuel: u64,
    /// Memory each call's instance may grow to, MiB.
    #[arg(long, default_value_t = MEMORY_MIB_DEFAULT)]
    pub memory_mib: u32,
}

#[derive(Debug, clap::Subcommand)]
pub enum VmCommand<T: Connect> {
    /// Upload a module (.wasm or .wat), call `run` once on a fresh
    /// instance, print its output, and free the upload. A trap, fuel
    /// exhaustion, the memory limit, the deadline or a non-zero status
    /// exits non-zero with the reason and the fuel used.
    Run {
        #[command(flatten)]
        target: T,
        file: PathBuf,
        #[command(flatten)]
        limits: LimitArgs,
        #[command(flatten)]
        input: InputArgs,
        #[arg(long)]
        json: bool,
    },
    /// Keep a module resident as NAME (a storage asset of yours, published
    /// as NAME.assets.APEX); the server compiles and checks it now.
    Deploy {
        #[command(flatten)]
        target: T,
        file: PathBuf,
        #[arg(long)]
        name: String,
        #[command(flatten)]
        limits: LimitArgs,
        #[arg(long)]
        json: bool,
    },
    /// Run one call of the VM NAME on a fresh instance.
    Call {
        #[command(flatten)]
        target: T,
        name: String,
        #[command(flatten)]
        input: InputArgs,
        #[arg(long)]
        json: bool,
    },
    /// Your VMs.
    List {
        #[command(flatten)]
        target: T,
        #[arg(long)]
        json: bool,
    },
    /// Remove the VM NAME (frees its asset).
    Remove {
        #[command(flatten)]
        target: T,
        name: String,
        #[arg(long)]
        json: bool,
    },
}

pub fn vm<T: Connect>(command: &VmCommand<T>) -> anyhow::Result<()> {
    match command {
        VmCommand::Run {
            target,
            file,
            limits,
            input,
            json,
        } => {
            let input = input.bytes()?;
            let address = upload(target, &module_bytes(file)?, limits, None)?;
            let answered = call(target, Target::Address(address), false, input);
            let freed = many(target, vec![request(&AssetRequest::Free { address })]);
            let outcome = answered?;
            if let Err(e) = freed {
                eprintln!("warning: the upload at {address} could not be freed: {e:#}");
            }
            report(&outcome, *json)
        }
        VmCommand::Deploy {
            target,
            file,
            name,
            limits,
            json,
        } => {
            let address = deploy(target, &module_bytes(file)?, limits, name)?;
            print(
                *json,
                &serde_json::json!({"name": name, "address": address.to_string(), "fuel": limits.fuel, "memory_mib": limits.memory_mib}),
                || format!("deployed {name} at {address}"),
            )
        }
        VmCommand::Call {
            target,
            name,
            input,
            json,
        } => {
            let outcome = call(target, Target::Name(name.clone()), false, input.bytes()?)?;
            report(&outcome, *json)
        }
        VmCommand::List { target, json } => {
            let vms = list(target)?;
            if *json {
                println!("{}", serde_json::to_string(&vms)?);
                return Ok(());
            }
            println!(
                "{:<24} {:<40} {:>12} {:>6} {:>10}",
                "name", "address", "fuel", "MiB", "bytes"
            );
            for vm in &vms {
                println!(
                    "{:<24} {:<40} {:>12} {:>6} {:>10}",
                    vm.name.as_deref().unwrap_or("-"),
                    vm.address,
                    vm.fuel,
                    vm.memory_mib,
                    vm.module_bytes
                );
            }
            Ok(())
        }
        VmCommand::Remove { target, name, json } => {
            let vms = list(target)?;
            let Some(vm) = vms.iter().find(|vm| vm.name.as_deref() == Some(name)) else {
                bail!("you have no VM named {name}");
            };
            let address: AssetAddress = vm
                .address
                .parse()
                .map_err(|_| anyhow::anyhow!("the server listed a bad address"))?;
            many(target, vec![request(&AssetRequest::Free { address })])?;
            print(
                *json,
                &serde_json::json!({"name": name, "address": vm.address, "removed": true}),
                || format!("removed {name} ({address})"),
            )
        }
    }
}

/// A module file's WebAssembly: its bytes, or its text format compiled.
pub fn module_bytes(file: &Path) -> anyhow::Result<Vec<u8>> {
    wat::parse_file(file).map_err(|e| anyhow::anyhow!("{}: not WebAssembly: {e}", file.display()))
}

/// Deploy `module` as `name` with `limits`, and have the server compile
/// and check it: its address. A module the server refuses is freed.
pub fn deploy<T: Connect>(
    target: &T,
    module: &[u8],
    limits: &LimitArgs,
    name: &str,
) -> anyhow::Result<AssetAddress> {
    dataplane::assets::wire::label(name.as_bytes())?;
    let address = upload(target, module, limits, Some(name))?;
    if let Err(e) = call(target, Target::Address(address), true, Vec::new()) {
        // Not a module this server runs: nothing stays deployed.
        let _ = many(target, vec![request(&AssetRequest::Free { address })]);
        return Err(e);
    }
    Ok(address)
}

/// Store `module` with its header as a storage asset (named `name`): its
/// address. A failed write frees it.
fn upload<T: Connect>(
    target: &T,
    module: &[u8],
    limits: &LimitArgs,
    name: Option<&str>,
) -> anyhow::Result<AssetAddress> {
    if !(1..=MEMORY_MIB_MAX).contains(&limits.memory_mib) {
        bail!("--memory-mib is 1 to {MEMORY_MIB_MAX}");
    }
    if limits.fuel == 0 {
        bail!("--fuel is at least 1");
    }
    if module.len() > MODULE_LEN_MAX {
        bail!(
            "a module is at most {MODULE_LEN_MAX} bytes, not {}",
            module.len()
        );
    }
    let header = Header::for_module(module, limits.fuel, limits.memory_mib);
    let mut bytes = Vec::with_capacity(HEADER_LEN + module.len());
    bytes.extend_from_slice(&header.encode());
    bytes.extend_from_slice(module);
    let alloc = AssetRequest::Alloc {
        kind: AllocKind::Storage,
        size: bytes.len() as u64,
        name,
    };
    let body = many(target, vec![request(&alloc)])?.remove(0);
    let octets: [u8; 16] = body
        .as_slice()
        .try_into()
        .context("the server's answer is not an address")?;
    let address = AssetAddress::from_octets(octets);
    let writes: Vec<Request> = bytes
        .chunks(STORAGE_WRITE_LEN_MAX)
        .enumerate()
        .map(|(i, chunk)| {
            request(&AssetRequest::Write {
                address,
                offset: (i * STORAGE_WRITE_LEN_MAX) as u64,
                data: chunk,
            })
        })
        .collect();
    if let Err(e) = many(target, writes) {
        let _ = many(target, vec![request(&AssetRequest::Free { address })]);
        return Err(e.context("uploading the module"));
    }
    Ok(address)
}

/// Send a `VM_CALL`: how the call ended.
fn call<T: Connect>(
    target: &T,
    vm: Target,
    check_only: bool,
    input: Vec<u8>,
) -> anyhow::Result<Outcome> {
    let payload = CallRequest {
        check_only,
        target: vm,
        input,
    }
    .encode();
    let answer = many(
        target,
        vec![Request {
            message: encode(VM_CALL, &payload),
            idempotent: false,
        }],
    );
    let body = match answer {
        Ok(mut bodies) => bodies.remove(0),
        Err(e) if is_code(&e, ErrorCode::VmModule) => {
            return Err(e.context("the server refused the module"));
        }
        Err(e) => return Err(e),
    };
    Outcome::decode(&body).map_err(anyhow::Error::msg)
}

fn list<T: Connect>(target: &T) -> anyhow::Result<Vec<VmInfo>> {
    let body = many(
        target,
        vec![Request {
            message: encode(VM_LIST, &[]),
            idempotent: false,
        }],
    )?
    .remove(0);
    serde_json::from_slice(&body).context("the server's VM list is not JSON")
}

/// Print a call's outcome: the output on standard output (or all of it as
/// JSON); a failed call is an error naming its reason and the fuel used.
fn report(outcome: &Outcome, json: bool) -> anyhow::Result<()> {
    if json {
        let doc = serde_json::json!({
            "reason": outcome.reason,
            "status": outcome.status,
            "fuel_used": outcome.fuel_used,
            "detail": outcome.detail,
            "output": String::from_utf8_lossy(&outcome.output),
            "output_hex": controlplane::authority::api::hex(&outcome.output),
            "log": String::from_utf8_lossy(&outcome.log),
        });
        println!("{doc}");
    } else {
        std::io::stdout().write_all(&outcome.output)?;
        std::io::stdout().flush()?;
        if !outcome.log.is_empty() {
            eprintln!("log: {}", String::from_utf8_lossy(&outcome.log));
        }
    }
    if outcome.succeeded() {
        return Ok(());
    }
    let fuel = outcome.fuel_used;
    match outcome.reason {
        Reason::Finished => bail!("run returned {} (fuel used {fuel})", outcome.status),
        reason => bail!(
            "the call stopped: {} ({}; fuel used {fuel})",
            reason_name(reason),
            outcome.detail
        ),
    }
}

/// A reason as the CLI and docs/VM.md name it.
pub fn reason_name(reason: Reason) -> &'static str {
    match reason {
        Reason::Finished => "finished",
        Reason::Trap => "trap",
        Reason::Fuel => "fuel exhausted",
        Reason::Memory => "memory limit",
        Reason::Deadline => "deadline",
        Reason::Checked => "checked",
    }
}
