//! Memory assets end to end, with the real binaries on production
//! defaults (mandatory admission; only the lease grace is shortened):
//! allocate, write, read back, free; refusals that change nothing; a
//! second identity with and without a grant; a lease that ends after its
//! owner leaves; a restart.

mod common;

use common::*;
use std::path::Path;
use std::process::Output;
use std::time::Duration;

fn asset(server: &Server, identity: Option<&Path>, args: &[&str]) -> Output {
    let mut full = vec!["asset"];
    full.extend_from_slice(args);
    if let Some(identity) = identity {
        full.extend(["--identity", identity.to_str().unwrap()]);
    }
    server.client(&full)
}

/// The command failed with `code` and its message contains `needle`.
fn refused(out: &Output, code: u16, needle: &str) {
    let why = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "succeeded: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(
        why.contains(&format!("server error {code}:")) && why.contains(needle),
        "expected error {code} ({needle}): {why}"
    );
}

/// Write `file` into the asset at `address` from offset 1000.
fn write_at_1000(server: &Server, address: &str, file: &Path) {
    let file = file.to_str().unwrap();
    ok(&asset(
        server,
        None,
        &["write", address, "--offset", "1000", "--in", file],
    ));
}

/// The 150,001 bytes from offset 1000 of `address`, read into `back`.
fn read_written(server: &Server, address: &str, back: &Path) -> Vec<u8> {
    let back_path = back.to_str().unwrap();
    let args = [
        "read", address, "--offset", "1000", "--len", "150001", "--out", back_path,
    ];
    ok(&asset(server, None, &args));
    std::fs::read(back).unwrap()
}

fn json(out: &Output) -> serde_json::Value {
    serde_json::from_str(&ok(out)).expect("JSON")
}

#[test]
fn memory_assets_on_production_defaults() {
    let mut server = Server::start_production("assets", "");
    let dir = server.dir.clone();
    let file = dir.join("in.bin");
    // Two write requests' worth, not a multiple of either chunk.
    let data: Vec<u8> = (0..150_001u32).map(|i| (i * 7 % 251) as u8).collect();
    std::fs::write(&file, &data).unwrap();

    let alloc = json(&asset(
        &server,
        None,
        &["alloc", "memory", "256K", "--json"],
    ));
    let address = alloc["address"].as_str().unwrap().to_owned();
    let a = address.as_str();
    write_at_1000(&server, a, &file);
    let back = dir.join("out.bin");
    let read_back = || read_written(&server, a, &back);
    assert_eq!(read_back(), data);
    let head = asset(&server, None, &["read", a, "--len", "1000"]);
    assert_eq!(
        head.stdout,
        vec![0; 1000],
        "never written bytes read as zeros"
    );
    let listed = json(&asset(&server, None, &["list", "--json"]));
    assert_eq!(listed[0]["address"], address.as_str());
    assert_eq!(listed[0]["size"], 256 * 1024);
    assert_eq!(server.stats()["assets"]["bytes"], 256 * 1024);

    // Refusals: each a typed error, and nothing changes.
    refused(
        &asset(
            &server,
            None,
            &["read", a, "--offset", "262140", "--len", "5"],
        ),
        14,
        "outside",
    );
    refused(
        &asset(&server, None, &["alloc", "memory", "65M"]),
        15,
        "quota",
    );
    refused(&asset(&server, None, &["alloc", "memory", "0"]), 16, "1 to");
    // The same locator, an identifier no node handed out.
    let mut segments = a.parse::<std::net::Ipv6Addr>().unwrap().segments();
    segments[4..].copy_from_slice(&[0xffff; 4]);
    let forged = std::net::Ipv6Addr::from(segments).to_string();
    refused(
        &asset(&server, None, &["read", &forged, "--len", "1"]),
        10,
        "no such asset",
    );
    let other_locator = "fd00:1:2:3::1";
    refused(
        &asset(&server, None, &["read", other_locator, "--len", "1"]),
        12,
        "not this one",
    );
    let bad = asset(&server, None, &["read", "not-an-address", "--len", "1"]);
    assert!(String::from_utf8_lossy(&bad.stderr).contains("not an asset address"));
    assert_eq!(read_back(), data, "refusals changed nothing");

    // A second identity, with the stake production asks for.
    let (stranger, _, identity) = staked_identity(&server, "stranger");
    let s = Some(stranger.as_path());
    refused(
        &asset(&server, s, &["read", a, "--len", "1"]),
        13,
        "neither owned",
    );
    refused(&asset(&server, s, &["free", a]), 13, "neither owned");
    assert_eq!(
        json(&asset(&server, s, &["list", "--json"])),
        serde_json::json!([])
    );
    ok(&asset(&server, None, &["grant", a, &identity, "--read"]));
    let read = asset(&server, s, &["read", a, "--offset", "1000", "--len", "3"]);
    assert_eq!(ok(&read).as_bytes(), &data[..3]);
    refused(
        &asset(&server, s, &["write", a, "--in", file.to_str().unwrap()]),
        13,
        "neither owned",
    );
    ok(&asset(&server, None, &["revoke-grant", a, &identity]));
    refused(
        &asset(&server, s, &["read", a, "--len", "1"]),
        13,
        "neither owned",
    );

    // Free: the bytes return to the quota, the address answers "released".
    let freed = json(&asset(&server, None, &["free", a, "--json"]));
    assert_eq!(freed["freed_bytes"], 256 * 1024);
    refused(
        &asset(&server, None, &["read", a, "--len", "1"]),
        11,
        "released",
    );
    assert_eq!(server.stats()["assets"]["bytes"], 0);

    // A restart: memory does not survive, and no identifier is handed out
    // again (the new run reserves blocks past the old one's).
    let before = json(&asset(&server, None, &["alloc", "memory", "4K", "--json"]));
    let before = before["address"].as_str().unwrap().to_owned();
    server.kill9_and_restart();
    refused(
        &asset(&server, None, &["read", &before, "--len", "1"]),
        11,
        "released",
    );
    let after = json(&asset(&server, None, &["alloc", "memory", "4K", "--json"]));
    assert_ne!(after["address"].as_str().unwrap(), before);
}

#[test]
fn an_owners_memory_assets_go_a_grace_after_its_last_connection() {
    let server = Server::start_production("assets-lease", "asset_lease_grace_s = 2\n");
    // Each command is a connection of its own: after this one the grace
    // starts.
    let kept = json(&asset(&server, None, &["alloc", "memory", "4K", "--json"]));
    let kept = kept["address"].as_str().unwrap().to_owned();
    wait_until(Duration::from_secs(15), Duration::from_millis(200), || {
        let assets = &server.stats()["assets"];
        if assets["lease_released_assets"] == 1 && assets["bytes"] == 0 {
            Ok(())
        } else {
            Err(format!("not released yet: {assets}"))
        }
    });
    refused(
        &asset(&server, None, &["read", &kept, "--len", "1"]),
        11,
        "released",
    );
    assert_eq!(server.stats()["assets"]["lease_released_bytes"], 4096);
}

#[test]
fn storage_assets_and_operator_quotas_survive_a_restart_on_production_defaults() {
    let mut server = Server::start_production("assets-storage", "");
    let dir = server.dir.clone();
    let file = dir.join("in.bin");
    // More than one request and more than one stored chunk (64 KiB).
    let data: Vec<u8> = (0..150_001u32).map(|i| (i * 13 % 251) as u8).collect();
    std::fs::write(&file, &data).unwrap();
    let alloc = json(&asset(
        &server,
        None,
        &["alloc", "storage", "200K", "--json"],
    ));
    assert_eq!(alloc["kind"], "storage");
    let address = alloc["address"].as_str().unwrap().to_owned();
    let a = address.as_str();
    write_at_1000(&server, a, &file);
    let back = dir.join("out.bin");
    let read_back = |server: &Server| read_written(server, a, &back);
    assert_eq!(read_back(&server), data);
    let head = asset(&server, None, &["read", a, "--len", "1000"]);
    assert_eq!(
        head.stdout,
        vec![0; 1000],
        "never written bytes read as zeros"
    );
    let memory = json(&asset(&server, None, &["alloc", "memory", "4K", "--json"]));
    let memory = memory["address"].as_str().unwrap().to_owned();
    let listed = json(&asset(&server, None, &["list", "--json"]));
    let kinds: Vec<&str> = listed
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["kind"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, ["memory", "storage"], "{listed}");
    assert_eq!(listed[1]["address"], a);
    assert_eq!(listed[1]["size"], 200 * 1024);
    assert_eq!(server.stats()["assets"]["storage"]["bytes"], 200 * 1024);

    // Refusals: typed, and nothing changes.
    refused(
        &asset(
            &server,
            None,
            &["read", a, "--offset", "204799", "--len", "2"],
        ),
        14,
        "outside",
    );
    refused(
        &asset(&server, None, &["alloc", "storage", "2G"]),
        15,
        "storage quota",
    );
    // The same locator, a storage identifier never handed out.
    let mut segments = a.parse::<std::net::Ipv6Addr>().unwrap().segments();
    segments[6..].copy_from_slice(&[0xfff0, 0]);
    let forged = std::net::Ipv6Addr::from(segments).to_string();
    refused(
        &asset(&server, None, &["read", &forged, "--len", "1"]),
        10,
        "no such asset",
    );

    // The operator's quotas: a second identity held to 100 KiB of storage
    // and 8 KiB of memory (the workers take the memory limit).
    let (stranger, stranger_serial, identity) = staked_identity(&server, "stranger");
    let set = server.admin(&[
        "quota",
        "set",
        &identity,
        "--storage",
        "100K",
        "--memory",
        "8K",
    ]);
    assert_eq!(json(&set)["storage"], 100 * 1024, "{}", ok(&set));
    let s = Some(stranger.as_path());
    let quota_holds = |server: &Server| {
        refused(
            &asset(server, s, &["alloc", "storage", "100K"]),
            15,
            "storage quota",
        );
        refused(
            &asset(server, s, &["alloc", "memory", "16K"]),
            15,
            "memory quota",
        );
    };
    quota_holds(&server);
    let small = json(&asset(&server, s, &["alloc", "storage", "50K", "--json"]));
    let small = small["address"].as_str().unwrap().to_owned();
    // Access: the owner's, and a grant's.
    refused(
        &asset(&server, s, &["read", a, "--len", "1"]),
        13,
        "neither owned",
    );
    refused(&asset(&server, s, &["free", a]), 13, "neither owned");
    let grant_read = || ok(&asset(&server, None, &["grant", a, &identity, "--read"]));
    grant_read();
    let read_3 = || asset(&server, s, &["read", a, "--offset", "1000", "--len", "3"]);
    assert_eq!(ok(&read_3()).as_bytes(), &data[..3]);
    // The control plane checked that read; the next ones are the worker's,
    // from what the store committed: they see every write answered before
    // them, and a grant withdrawn on the very next read.
    let direct = |server: &Server| server.stats()["total"]["storage_direct_reads"].as_u64();
    let before = direct(&server).unwrap();
    assert_eq!(ok(&read_3()).as_bytes(), &data[..3]);
    let three = dir.join("three.bin");
    std::fs::write(&three, b"xyz").unwrap();
    write_at_1000(&server, a, &three);
    assert_eq!(ok(&read_3()), "xyz");
    assert!(direct(&server).unwrap() >= before + 2, "the worker read");
    std::fs::write(&three, &data[..3]).unwrap();
    write_at_1000(&server, a, &three);
    ok(&asset(&server, None, &["revoke-grant", a, &identity]));
    refused(&read_3(), 13, "neither owned");
    grant_read();
    assert_eq!(ok(&read_3()).as_bytes(), &data[..3]);
    refused(
        &asset(&server, s, &["write", a, "--in", file.to_str().unwrap()]),
        13,
        "neither owned",
    );

    // A restart: storage keeps its addresses, bytes, grants and quotas;
    // memory answers "released".
    server.kill9_and_restart();
    assert_eq!(read_back(&server), data);
    let read = asset(&server, s, &["read", a, "--offset", "1000", "--len", "3"]);
    assert_eq!(ok(&read).as_bytes(), &data[..3], "the grant survived");
    refused(
        &asset(&server, None, &["read", &memory, "--len", "1"]),
        11,
        "released",
    );
    quota_holds(&server);
    let quotas = json(&server.admin(&["quota", "list"]));
    assert_eq!(quotas[0]["identity"], identity.as_str(), "{quotas}");
    assert_eq!(quotas[0]["storage_used"], 50 * 1024 + 256, "{quotas}");
    assert_eq!(server.stats()["assets"]["storage"]["assets"], 2);

    // Free: the bytes return, the address answers "released" (to the
    // stranger too, whose reads of it the workers were answering), and a
    // reset quota is the default again.
    let stranger_read = || asset(&server, s, &["read", a, "--offset", "1000", "--len", "3"]);
    assert_eq!(ok(&stranger_read()).as_bytes(), &data[..3]);
    let freed = json(&asset(&server, None, &["free", a, "--json"]));
    assert_eq!(freed["freed_bytes"], 200 * 1024);
    refused(
        &asset(&server, None, &["read", a, "--len", "1"]),
        11,
        "released",
    );
    refused(&stranger_read(), 11, "released");
    ok(&asset(&server, s, &["free", &small]));
    let storage = &server.stats()["assets"]["storage"];
    assert_eq!(
        (&storage["assets"], &storage["bytes"]),
        (&0.into(), &0.into())
    );
    assert_eq!(storage["freed_bytes"], 250 * 1024);
    ok(&server.admin(&["quota", "reset", &identity]));
    ok(&asset(&server, s, &["alloc", "storage", "100K"]));
    assert_eq!(
        json(&server.admin(&["quota", "list"])),
        serde_json::json!([])
    );
    let stranger_quota = server.admin(&["quota", "set", &identity]);
    assert!(!stranger_quota.status.success(), "a set without a limit");

    // A named storage asset: its address in the zone while it lives, the
    // name nobody else's, and gone with the asset.
    let named = json(&asset(
        &server,
        None,
        &["alloc", "storage", "4K", "--name", "notes", "--json"],
    ));
    let named = named["address"].as_str().unwrap().to_owned();
    let resolve =
        |server: &Server| server.client(&["resolve", "notes.assets.internet2.test", "--json"]);
    let resolved: serde_json::Value = serde_json::from_str(ok(&resolve(&server)).trim()).unwrap();
    assert_eq!(
        resolved["addresses"],
        serde_json::json!([format!("[{named}]:{}", server.port)]),
        "{resolved}"
    );
    refused(
        &asset(&server, s, &["alloc", "storage", "4K", "--name", "notes"]),
        18,
        "taken",
    );
    // Nor through DNS: names under assets.APEX are the assets' (and the
    // operator's).
    let squat = server.client(&[
        "dns",
        "add",
        "notes.assets",
        "--address",
        "fd71:7e57::66",
        "--identity",
        stranger.to_str().unwrap(),
    ]);
    let why = String::from_utf8_lossy(&squat.stderr);
    assert!(
        !squat.status.success() && why.contains("is an asset's name"),
        "{why}"
    );
    let memory_named = asset(&server, None, &["alloc", "memory", "4K", "--name", "x"]);
    assert!(
        String::from_utf8_lossy(&memory_named.stderr).contains("only storage assets take a name")
    );
    let listed = json(&asset(&server, None, &["list", "--json"]));
    let entry = listed
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["address"] == named.as_str())
        .unwrap();
    assert_eq!(entry["name"], "notes.assets.internet2.test.");
    server.kill9_and_restart();
    ok(&resolve(&server));
    ok(&asset(&server, None, &["free", &named]));
    let gone = resolve(&server);
    assert!(
        String::from_utf8_lossy(&gone.stderr).contains("NXDomain"),
        "{}",
        String::from_utf8_lossy(&gone.stderr)
    );

    // A revoked owner reaches its storage assets no more; the operator's
    // own are served as before.
    let kept = json(&asset(&server, s, &["alloc", "storage", "4K", "--json"]));
    let kept = kept["address"].as_str().unwrap().to_owned();
    ok(&server.client(&["cert", "revoke", &stranger_serial]));
    let after = asset(&server, s, &["read", &kept, "--len", "1"]);
    assert!(
        !after.status.success(),
        "a revoked owner read its asset: {}",
        String::from_utf8_lossy(&after.stdout)
    );
    let storage = &server.stats()["assets"]["storage"];
    assert_eq!(
        storage["assets"], 2,
        "the revoked owner's assets stay, held: {storage}"
    );
    ok(&asset(&server, None, &["list"]));
}
