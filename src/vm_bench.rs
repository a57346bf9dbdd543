//! `internet2 vm-bench`: what a VM call costs over the network, against a
//! running server, each phase on one established connection
//! (`dataplane::client::run_load`: handshakes are not in the figures):
//!
//! 1. `vm call` of a small module (vm/modules/echo.wat, 64 bytes in and
//!    out), one at a time: p50/p99, a fresh instance each;
//! 2. what the call's path costs without the call, one at a time each: a
//!    `PING` of 1 KiB (the worker answers: the transport's floor), a read
//!    of the VM asset's 56-byte header (after the control plane checked
//!    the first, the worker reads the store), and a check-only `VM_CALL`
//!    (after the first, the worker hands it to a VM thread, which answers
//!    without running anything);
//! 3. the same calls with many in flight: calls per second (the server's
//!    VM threads are the bound).
//!
//! The module is deployed under a name of this run and removed at the
//! end. Each phase reports its window (milliseconds since the Unix epoch),
//! so a caller sampling the server's CPU meanwhile can charge each phase
//! its share (`cargo xtask bench-vm`). `vm-micro` (benches/) measures the
//! same call in process, fuel's cost and `asset_read`'s.

use crate::asset_bench::{checked, phase, plan_of, timed};
use crate::cli_assets::{many, request};
use crate::cli_authority::Connect;
use crate::cli_vm::{LimitArgs, deploy};
use bytes::Bytes;
use controlplane::vm::{CallRequest, Target};
use dataplane::assets::wire::AssetRequest;
use dataplane::protocols::stoq_registry::{PING, VM_CALL};
use serde_json::json;

/// The module the calls run.
pub const ECHO_WAT: &str = include_str!("../vm/modules/echo.wat");

#[derive(Clone, Debug)]
pub struct VmBenchPlan {
    /// Calls (and pings) one at a time.
    pub calls: u64,
    /// Calls of the throughput phase, and how many in flight.
    pub loaded_calls: u64,
    pub concurrency: usize,
}

pub fn run<T: Connect>(target: &T, plan: &VmBenchPlan) -> anyhow::Result<serde_json::Value> {
    let client = target.target()?;
    let config = client.client_config(dataplane::protocols::ALPN_STOQ)?;
    let module = wat::parse_str(ECHO_WAT)?;
    let name = format!("vm-bench-{}", std::process::id());
    let limits = LimitArgs {
        fuel: 100_000,
        memory_mib: 1,
    };
    eprintln!("vm-bench: deploying {name}");
    let address = deploy(target, &module, &limits, &name)?;
    let call = |check_only| {
        CallRequest {
            check_only,
            target: Target::Name(name.clone()),
            input: vec![7; 64],
        }
        .encode()
    };
    let (call, check) = (call(false), call(true));
    let (header_kind, header_read) = AssetRequest::Read {
        address,
        offset: 0,
        len: controlplane::vm::HEADER_LEN as u32,
    }
    .encode();
    let load = |kind: u8, payload: &[u8], total: u64, concurrency: usize| {
        let plan = plan_of(kind, Bytes::copy_from_slice(payload), total, concurrency);
        let ran = timed(|| checked(dataplane::client::run_load(&client, &config, plan)?))?;
        Ok::<_, anyhow::Error>(phase(&ran))
    };
    let phases = (|| {
        eprintln!("vm-bench: {} calls, one at a time", plan.calls);
        let one = load(VM_CALL, &call, plan.calls, 1)?;
        eprintln!(
            "vm-bench: {} pings of 1 KiB, header reads, check-only calls, one at a time",
            plan.calls
        );
        let ping = load(PING, &[7; 1024], plan.calls, 1)?;
        let header = load(header_kind, &header_read, plan.calls, 1)?;
        let checked = load(VM_CALL, &check, plan.calls, 1)?;
        eprintln!(
            "vm-bench: {} calls, {} in flight",
            plan.loaded_calls, plan.concurrency
        );
        let loaded = load(VM_CALL, &call, plan.loaded_calls, plan.concurrency)?;
        Ok::<_, anyhow::Error>((one, ping, header, checked, loaded))
    })();
    // Whatever happened, the VM goes.
    let removed = many(target, vec![request(&AssetRequest::Free { address })]);
    let (one, ping, header, checked, loaded) = phases?;
    removed?;
    Ok(json!({
        "call": one,
        "ping_1k": ping,
        "storage_header_read": header,
        "check_only_call": checked,
        "call_loaded": loaded,
        "concurrency": plan.concurrency,
        "input_bytes": 64,
    }))
}
