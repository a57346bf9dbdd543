//! VMs end to end, with the real binaries on production defaults (only
//! the deadline is shortened): the modules of vm/modules/ run, deploy, call,
//! hit each limit with its reason, reach a memory asset, are refused for
//! their imports and their owner's quotas; one owner's failing VM leaves
//! another's calls alone; a restart keeps what was deployed.

mod common;

use common::*;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn module(name: &str) -> String {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("vm/modules")
        .join(name)
        .display()
        .to_string()
}

fn vm(server: &Server, identity: Option<&Path>, args: &[&str]) -> Output {
    let mut full = vec!["vm"];
    full.extend_from_slice(args);
    if let Some(identity) = identity {
        full.extend(["--identity", identity.to_str().unwrap()]);
    }
    server.client(&full)
}

fn json(out: &Output) -> serde_json::Value {
    serde_json::from_str(&ok(out)).expect("JSON")
}

/// A call that ran and stopped for `reason`: its JSON (printed before the
/// non-zero exit).
fn stopped(out: &Output, reason: &str) -> serde_json::Value {
    assert!(
        !out.status.success(),
        "succeeded: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|_| {
        panic!(
            "no JSON outcome: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    assert_eq!(doc["reason"], reason, "{doc}");
    doc
}

/// The command failed with server error `code`, its message containing
/// `needle`.
fn refused(out: &Output, code: u16, needle: &str) {
    let why = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "succeeded");
    assert!(
        why.contains(&format!("server error {code}:")) && why.contains(needle),
        "expected error {code} ({needle}): {why}"
    );
}

fn storage_assets(server: &Server, identity: Option<&Path>) -> usize {
    let mut args = vec!["asset", "list", "--json"];
    if let Some(identity) = identity {
        args.extend(["--identity", identity.to_str().unwrap()]);
    }
    let listed = json(&server.client(&args));
    listed
        .as_array()
        .unwrap()
        .iter()
        .filter(|a| a["kind"] == "storage")
        .count()
}

#[test]
fn vms_run_deploy_and_hit_their_limits_on_production_defaults() {
    let mut server = Server::start_production("vm", "vm_deadline_ms = 300\n");
    let dir = server.dir.clone();

    // Run once: input to output, and the upload is freed.
    let echo = json(&vm(
        &server,
        None,
        &["run", &module("echo.wat"), "--input", "hello vm", "--json"],
    ));
    assert_eq!(echo["reason"], "finished");
    assert_eq!(echo["output"], "hello vm");
    assert!(echo["fuel_used"].as_u64().unwrap() > 0);
    assert_eq!(storage_assets(&server, None), 0, "the upload was freed");

    // Deploy, list, call.
    let deployed = json(&vm(
        &server,
        None,
        &["deploy", &module("echo.wat"), "--name", "echo", "--json"],
    ));
    assert_eq!(deployed["name"], "echo");
    let listed = json(&vm(&server, None, &["list", "--json"]));
    assert_eq!(listed[0]["name"], "echo", "{listed}");
    assert_eq!(listed[0]["fuel"], controlplane::vm::FUEL_DEFAULT);
    let input_file = dir.join("input.bin");
    let input: Vec<u8> = (0..20_000u32).map(|i| (i % 251) as u8).collect();
    std::fs::write(&input_file, &input).unwrap();
    let called = json(&vm(
        &server,
        None,
        &[
            "call",
            "echo",
            "--input-file",
            input_file.to_str().unwrap(),
            "--json",
        ],
    ));
    assert_eq!(
        called["output_hex"],
        controlplane::authority::api::hex(&input),
        "20,000 bytes in, the same out"
    );

    // A memory asset, written and read back by the VM.
    let alloc = json(&server.client(&["asset", "alloc", "memory", "4K", "--json"]));
    let address: std::net::Ipv6Addr = alloc["address"].as_str().unwrap().parse().unwrap();
    let round_trip = dir.join("round-trip.bin");
    std::fs::write(
        &round_trip,
        [&address.octets()[..], b"stored by a VM"].concat(),
    )
    .unwrap();
    let trip = json(&vm(
        &server,
        None,
        &[
            "run",
            &module("asset_roundtrip.wat"),
            "--input-file",
            round_trip.to_str().unwrap(),
            "--json",
        ],
    ));
    assert_eq!(trip["output"], "stored by a VM", "{trip}");
    assert_eq!(trip["log"], "round trip done");
    let read = server.client(&["asset", "read", &address.to_string(), "--len", "14"]);
    assert_eq!(ok(&read), "stored by a VM", "the VM's write is the asset's");

    // A storage asset, through the control plane: the write is durable
    // when the call answers.
    let stored = json(&server.client(&["asset", "alloc", "storage", "4K", "--json"]));
    let storage_address = stored["address"].as_str().unwrap().to_owned();
    let storage_octets = storage_address
        .parse::<std::net::Ipv6Addr>()
        .unwrap()
        .octets();
    let kept = dir.join("kept.bin");
    std::fs::write(&kept, [&storage_octets[..], b"kept by a VM"].concat()).unwrap();
    let run_roundtrip = |identity: Option<&Path>, input: &Path| {
        vm(
            &server,
            identity,
            &[
                "run",
                &module("asset_roundtrip.wat"),
                "--input-file",
                input.to_str().unwrap(),
                "--json",
            ],
        )
    };
    let trip = json(&run_roundtrip(None, &kept));
    assert_eq!(trip["output"], "kept by a VM", "{trip}");
    let read = server.client(&["asset", "read", &storage_address, "--len", "12"]);
    assert_eq!(ok(&read), "kept by a VM");
    // A VM writes no VM asset (its callers could steer it to put their
    // module there): FORBIDDEN, and echo still runs.
    let echo_octets = listed[0]["address"]
        .as_str()
        .unwrap()
        .parse::<std::net::Ipv6Addr>()
        .unwrap()
        .octets();
    let over_echo = dir.join("over-echo.bin");
    std::fs::write(&over_echo, [&echo_octets[..], b"overwritten"].concat()).unwrap();
    let refused_write = stopped(&run_roundtrip(None, &over_echo), "finished");
    assert_eq!(refused_write["status"], -5, "{refused_write}");
    let called = json(&vm(
        &server,
        None,
        &["call", "echo", "--input", "ok", "--json"],
    ));
    assert_eq!(called["output"], "ok");

    // Each limit, with its reason and the fuel used.
    let fuel = stopped(
        &vm(
            &server,
            None,
            &["run", &module("spin.wat"), "--fuel", "100000", "--json"],
        ),
        "fuel",
    );
    assert_eq!(fuel["fuel_used"], 100_000, "{fuel}");
    let deadline = stopped(
        &vm(
            &server,
            None,
            &["run", &module("spin.wat"), "--fuel", "1000000000", "--json"],
        ),
        "deadline",
    );
    assert!(deadline["fuel_used"].as_u64().unwrap() < 1_000_000_000);
    stopped(
        &vm(
            &server,
            None,
            &["run", &module("grow.wat"), "--memory-mib", "2", "--json"],
        ),
        "memory",
    );
    let trap = stopped(
        &vm(&server, None, &["run", &module("recurse.wat"), "--json"]),
        "trap",
    );
    assert!(trap["detail"].as_str().unwrap().contains("stack"), "{trap}");
    let failed = stopped(
        &vm(&server, None, &["run", &module("fails.wat"), "--json"]),
        "finished",
    );
    assert_eq!(failed["status"], 7);
    assert_eq!(failed["output"], "failing");

    // Refused modules: nothing stays deployed.
    refused(
        &vm(
            &server,
            None,
            &["deploy", &module("outside_abi.wat"), "--name", "outside"],
        ),
        19,
        "wasi_snapshot_preview1.fd_write is not part of the VM ABI",
    );
    // Bytes that are not WebAssembly, behind a valid header, put there
    // with the asset commands (the client checks its own files).
    let junk = b"not a module at all";
    let header = controlplane::vm::Header::for_module(junk, 1000, 1);
    let junk_file = dir.join("junk.bin");
    std::fs::write(&junk_file, [&header.encode()[..], junk].concat()).unwrap();
    let size = (controlplane::vm::HEADER_LEN + junk.len()).to_string();
    let junk_asset = json(&server.client(&[
        "asset", "alloc", "storage", &size, "--name", "junk", "--json",
    ]));
    let junk_address = junk_asset["address"].as_str().unwrap().to_owned();
    let write_junk = |file: &Path| {
        let file = file.to_str().unwrap();
        ok(&server.client(&["asset", "write", &junk_address, "--in", file]));
    };
    write_junk(&junk_file);
    refused(
        &vm(&server, None, &["call", "junk"]),
        19,
        "not a WebAssembly module",
    );
    // A header naming a module the server has compiled (echo's), over
    // other bytes: it runs nothing.
    let echo_wasm = wat::parse_file(module("echo.wat")).unwrap();
    let borrowed = controlplane::vm::Header::for_module(&echo_wasm, 1000, 1);
    std::fs::write(&junk_file, [&borrowed.encode()[..], junk].concat()).unwrap();
    write_junk(&junk_file);
    refused(
        &vm(&server, None, &["call", "junk"]),
        19,
        "not the one its VM header names",
    );
    ok(&server.client(&["asset", "free", &junk_address]));
    // More memory than this server gives a VM (vm_memory_mib_max, 64).
    refused(
        &vm(
            &server,
            None,
            &["run", &module("echo.wat"), "--memory-mib", "65"],
        ),
        16,
        "vm_memory_mib_max",
    );
    assert_eq!(
        storage_assets(&server, None),
        2,
        "only echo and the storage asset a VM wrote stay"
    );
    refused(
        &vm(&server, None, &["call", "nobody"]),
        10,
        "no VM is named nobody",
    );

    // A second identity: no access to the first's VM without a grant, and
    // its own VMs held to its quotas.
    let (stranger, _, identity) = staked_identity(&server, "stranger");
    let s = Some(stranger.as_path());
    refused(&vm(&server, s, &["call", "echo"]), 13, "neither owned");
    // Its VM reaches none of the first's assets, storage or memory: the
    // host call answers FORBIDDEN (-5) and nothing is written.
    let foreign = stopped(&run_roundtrip(s, &kept), "finished");
    assert_eq!(foreign["status"], -5, "{foreign}");
    let read = server.client(&["asset", "read", &storage_address, "--len", "12"]);
    assert_eq!(ok(&read), "kept by a VM");
    // A reader of the VM may call it (as its owner); one that may write it
    // may not: it could have put its own module there.
    let echo_address = listed[0]["address"].as_str().unwrap().to_owned();
    let grant_read = || {
        ok(&server.client(&["asset", "grant", &echo_address, &identity, "--read"]));
    };
    grant_read();
    // The first call is checked by the control plane, the next ones go
    // from the worker to the VM threads on that check; a grant withdrawn
    // is seen by the very next call.
    for input in ["r", "s", "t"] {
        let as_reader = json(&vm(
            &server,
            s,
            &["call", "echo", "--input", input, "--json"],
        ));
        assert_eq!(as_reader["output"], input);
    }
    let direct = |server: &Server| {
        let stats = json(&server.client(&["stats", "--json"]));
        stats["total"]["vm_direct_calls"].as_u64().unwrap()
    };
    assert!(direct(&server) >= 2, "the reader's later calls went direct");
    ok(&server.client(&["asset", "revoke-grant", &echo_address, &identity]));
    refused(&vm(&server, s, &["call", "echo"]), 13, "neither owned");
    grant_read();
    let as_reader = json(&vm(&server, s, &["call", "echo", "--input", "u", "--json"]));
    assert_eq!(as_reader["output"], "u");
    ok(&server.client(&["asset", "grant", &echo_address, &identity, "--write"]));
    refused(&vm(&server, s, &["call", "echo"]), 13, "others may write");
    ok(&server.client(&["asset", "revoke-grant", &echo_address, &identity]));
    let set = server.admin(&[
        "quota", "set", &identity, "--fuel", "5000", "--memory", "1M",
    ]);
    assert_eq!(json(&set)["fuel"], 5000, "{}", ok(&set));
    let quota_list = json(&server.admin(&["quota", "list"]));
    assert_eq!(quota_list[0]["fuel_set"], true, "{quota_list}");
    refused(
        &vm(
            &server,
            s,
            &["deploy", &module("echo.wat"), "--name", "mine"],
        ),
        15,
        "quota set --fuel",
    );
    refused(
        &vm(
            &server,
            s,
            &[
                "deploy",
                &module("echo.wat"),
                "--name",
                "mine",
                "--fuel",
                "5000",
                "--memory-mib",
                "2",
            ],
        ),
        15,
        "memory quota",
    );
    assert_eq!(
        storage_assets(&server, s),
        0,
        "refused deploys leave nothing"
    );
    ok(&vm(
        &server,
        s,
        &[
            "deploy",
            &module("echo.wat"),
            "--name",
            "mine",
            "--fuel",
            "5000",
            "--memory-mib",
            "1",
        ],
    ));

    // The first owner's VM spins to its deadline, again and again, while
    // the second's calls all succeed.
    let spinner = {
        let ca = server.ca();
        let addr = server.addr();
        std::thread::spawn(move || {
            for _ in 0..3 {
                let out = Command::new(CLIENT)
                    .args(["vm", "run", &module("spin.wat"), "--fuel", "1000000000"])
                    .args(["--connect", &addr, "--ca"])
                    .arg(&ca)
                    .output()
                    .unwrap();
                assert!(!out.status.success());
            }
        })
    };
    for i in 0..5 {
        let text = format!("call {i}");
        let out = json(&vm(
            &server,
            s,
            &["call", "mine", "--input", &text, "--json"],
        ));
        assert_eq!(out["output"], text.as_str());
    }
    spinner.join().unwrap();

    // Deploys as fast as one identity can: each a storage asset, so its
    // storage quota stops them with a typed error, and its VM still runs.
    ok(&server.admin(&["quota", "set", &identity, "--storage", "3K"]));
    let mut deployed = 0;
    let why = loop {
        let name = format!("flood{deployed}");
        let args = [
            "deploy",
            &module("echo.wat"),
            "--name",
            &name,
            "--fuel",
            "5000",
            "--memory-mib",
            "1",
        ];
        let out = vm(&server, s, &args);
        if !out.status.success() {
            break String::from_utf8_lossy(&out.stderr).into_owned();
        }
        deployed += 1;
        assert!(deployed < 20, "the storage quota never stopped the deploys");
    };
    assert!(why.contains("server error 15:"), "{why}");
    assert!(deployed >= 1, "{why}");
    let out = json(&vm(
        &server,
        s,
        &["call", "mine", "--input", "still", "--json"],
    ));
    assert_eq!(out["output"], "still");

    // The fuel quota is also the owner's compute budget on the server:
    // its VMs burn at most that much fuel a second, calls start while some
    // is left, and time gives it back.
    let (spender, _, spender_id) = staked_identity(&server, "spender");
    let sp = Some(spender.as_path());
    ok(&server.admin(&["quota", "set", &spender_id, "--fuel", "300000"]));
    let burn = [
        "deploy",
        &module("spin.wat"),
        "--name",
        "burn",
        "--fuel",
        "300000",
        "--memory-mib",
        "1",
    ];
    ok(&vm(&server, sp, &burn));
    let spent = (0..20)
        .map(|_| vm(&server, sp, &["call", "burn", "--json"]))
        .find(|out| String::from_utf8_lossy(&out.stderr).contains("server error 15:"))
        .expect("the compute budget never ran out");
    refused(&spent, 15, "compute budget is spent");
    let mut back = false;
    for _ in 0..100 {
        let out = vm(&server, sp, &["call", "burn", "--json"]);
        if out.stdout.starts_with(b"{") {
            stopped(&out, "fuel");
            back = true;
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert!(back, "the compute budget never came back");

    // A restart keeps what was deployed (and compiles it again).
    server.kill9_and_restart();
    let called = json(&vm(
        &server,
        None,
        &["call", "echo", "--input", "again", "--json"],
    ));
    assert_eq!(called["output"], "again");
    let removed = json(&vm(&server, None, &["remove", "echo", "--json"]));
    assert_eq!(removed["removed"], true);
    refused(
        &vm(&server, None, &["call", "echo"]),
        10,
        "no VM is named echo",
    );
    assert_eq!(
        json(&vm(&server, None, &["list", "--json"])),
        serde_json::json!([])
    );
}

#[test]
fn vm_requests_are_refused_where_vm_execution_is_off() {
    let server = Server::start_production("vm-off", "enable_vm_execution = false\n");
    let out = vm(&server, None, &["run", &module("echo.wat"), "--input", "x"]);
    refused(&out, 20, "VM execution is off");
    let listed = server.client(&["asset", "list", "--json"]);
    assert_eq!(json(&listed), serde_json::json!([]), "the upload was freed");
}
