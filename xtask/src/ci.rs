//! `cargo xtask ci`: the whole test suite, as CI and the README run it.
//!
//! Installs what the tests need (Debian packages when root, the aioquic
//! interop peers), checks formatting and lints, runs every test, and runs the
//! netns bench in short smoke runs: plain, and over the impairment relay
//! (delay, loss and a bottleneck) with two congestion controllers. Where a capability is missing outside
//! CI the step is skipped with the reason; with `CI=true` a skip is a failure.

use anyhow::{Context, bail};
use std::path::Path;
use std::process::Command;
use std::time::Instant;

pub fn run(root: &Path, smoke_seconds: u32) -> anyhow::Result<()> {
    let started = Instant::now();
    let ci = std::env::var("CI").is_ok_and(|v| v == "true" || v == "1");
    let is_root = is_root();
    step("system packages", || ensure_packages(is_root, ci))?;
    step("interop peers (aioquic)", || {
        sh(Command::new("bash")
            .arg(root.join(".ci/setup-interop.sh"))
            .current_dir(root))
    })?;
    step("BPF objects match their sources", || {
        let exe = std::env::current_exe().context("cannot find the xtask binary")?;
        sh(Command::new(exe)
            .args(["build-ebpf", "--check"])
            .current_dir(root))
    })?;
    step("format", || {
        sh(Command::new("cargo")
            .args(["fmt", "--all", "--", "--check"])
            .current_dir(root))
    })?;
    step("clippy", || {
        sh(Command::new("cargo")
            .args([
                "clippy",
                "--workspace",
                "--all-targets",
                "--release",
                "--",
                "-D",
                "warnings",
            ])
            .current_dir(root))
    })?;
    step("tests", || {
        sh(Command::new("cargo")
            .args(["test", "--workspace", "--release"])
            .current_dir(root))
    })?;
    step("vendored crates' own tests (vendor/README.md)", || {
        vendored_tests(root)
    })?;
    step("netns bench smoke", || {
        netns_smoke(root, is_root, ci, smoke_seconds)
    })?;
    println!(
        "ci: all steps passed in {:.0} s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Each vendored crate's library tests, its patch's test among them, in a
/// target directory of their own (they are not workspace members).
fn vendored_tests(root: &Path) -> anyhow::Result<()> {
    let vendor = root.join("vendor");
    let mut crates = std::fs::read_dir(&vendor)
        .with_context(|| format!("cannot list {}", vendor.display()))?
        .filter_map(|entry| entry.ok().map(|entry| entry.path().join("Cargo.toml")))
        .filter(|manifest| manifest.is_file())
        .collect::<Vec<_>>();
    crates.sort();
    for manifest in crates {
        sh(Command::new("cargo")
            .args(["test", "--release", "--lib", "--manifest-path"])
            .arg(&manifest)
            .env("CARGO_TARGET_DIR", root.join("target/vendor"))
            .current_dir(root))?;
    }
    Ok(())
}

fn step(name: &str, f: impl FnOnce() -> anyhow::Result<()>) -> anyhow::Result<()> {
    let started = Instant::now();
    println!("ci: == {name}");
    f().with_context(|| format!("ci step `{name}` failed"))?;
    println!(
        "ci: == {name}: ok ({:.0} s)",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

fn sh(command: &mut Command) -> anyhow::Result<()> {
    let status = command
        .status()
        .with_context(|| format!("cannot run {command:?}"))?;
    if !status.success() {
        bail!("{command:?} exited with {status}");
    }
    Ok(())
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

fn have(command: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {command} >/dev/null")])
        .status()
        .is_ok_and(|s| s.success())
}

/// iproute2 for the netns topology, python3-venv for the interop peers,
/// clang and the libbpf headers for the eBPF objects, faketime for the
/// cluster's clock-skew test.
fn ensure_packages(is_root: bool, ci: bool) -> anyhow::Result<()> {
    let venv_ok = Command::new("python3")
        .args(["-c", "import venv, ensurepip"])
        .status()
        .is_ok_and(|s| s.success());
    let mut missing = Vec::new();
    if !have("ip") {
        missing.push("iproute2");
    }
    if !have("clang-19") && !have("clang") {
        missing.push("clang-19");
    }
    if !Path::new("/usr/include/bpf/bpf_helpers.h").exists() {
        missing.push("libbpf-dev");
    }
    if !venv_ok {
        missing.push("python3-venv");
    }
    // The cluster's clock-skew test runs members under libfaketime.
    if !have("faketime") {
        missing.push("faketime");
    }
    if missing.is_empty() {
        println!("ci: iproute2, python3-venv, clang, libbpf headers and faketime present");
        return Ok(());
    }
    if !is_root {
        let message = format!("missing Debian packages {missing:?} and not root to install them");
        if ci {
            bail!(message);
        }
        println!("ci: SKIPPED install: {message}");
        return Ok(());
    }
    sh(Command::new("apt-get").arg("update"))?;
    sh(Command::new("apt-get")
        .args(["install", "-y", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive"))
}

fn netns_smoke(root: &Path, is_root: bool, ci: bool, seconds: u32) -> anyhow::Result<()> {
    if let Some(reason) = netns_unavailable(is_root) {
        if ci {
            bail!("CI must run the netns bench, but {reason}");
        }
        println!("ci: SKIPPED netns bench smoke: {reason}");
        return Ok(());
    }
    let json = root.join("target/ci-netns-smoke.json");
    let _ = std::fs::remove_file(&json);
    let exe = std::env::current_exe().context("cannot find the xtask binary")?;
    sh(Command::new(&exe)
        .args([
            "bench-40g",
            "--netns",
            "--compare",
            "--duration",
            &seconds.to_string(),
            "--json",
        ])
        .arg(&json)
        .current_dir(root))?;
    let result: serde_json::Value = serde_json::from_slice(
        &std::fs::read(&json).with_context(|| format!("{} was not written", json.display()))?,
    )?;
    let ours = result["goodput_gbps"].as_f64().unwrap_or(0.0);
    let baseline = result["baseline"]["goodput_gbps"].as_f64().unwrap_or(0.0);
    if ours <= 0.0 || baseline <= 0.0 {
        bail!("no bytes flowed in the netns bench: ours {ours} Gbit/s, baseline {baseline} Gbit/s");
    }
    no_namespaces_left()?;
    println!(
        "ci: netns smoke: ours {ours:.2} Gbit/s, baseline {baseline:.2} Gbit/s, namespaces removed"
    );
    impaired_smoke(root, &exe, seconds)
}

/// The impaired path: the relay between client and server with delay,
/// loss and a bottleneck, two controllers alternating. Every transfer must
/// complete through the losses, and the relay must have kept its queue
/// bound.
fn impaired_smoke(root: &Path, exe: &Path, seconds: u32) -> anyhow::Result<()> {
    const QUEUE_MS: f64 = 20.0;
    let json = root.join("target/ci-netns-impaired.json");
    let _ = std::fs::remove_file(&json);
    sh(Command::new(exe)
        .args(["bench-40g", "--netns", "--duration", &seconds.to_string()])
        .args(["--delay-ms", "5", "--loss", "0.02", "--rate-mbit", "100"])
        .args([
            "--queue-ms",
            &QUEUE_MS.to_string(),
            "--congestion",
            "cubic,bbr2",
        ])
        .arg("--json")
        .arg(&json)
        .current_dir(root))?;
    let result: serde_json::Value = serde_json::from_slice(
        &std::fs::read(&json).with_context(|| format!("{} was not written", json.display()))?,
    )?;
    let runs = result["runs"].as_array().map_or(&[][..], Vec::as_slice);
    if runs.len() != 2 {
        bail!(
            "the impaired netns bench has {} runs, expected one per controller",
            runs.len()
        );
    }
    let mut figures = Vec::new();
    for run in runs {
        let side = run["side"].as_str().unwrap_or("?");
        let goodput = run["goodput_gbps"].as_f64().unwrap_or(0.0);
        let errors = run["errors"].as_f64().unwrap_or(0.0);
        let down = &run["relay"]["to_client"];
        let lost = down["dropped_loss"].as_u64().unwrap_or(0);
        let queue_max = down["queue_ms_max"].as_f64().unwrap_or(f64::INFINITY);
        if goodput <= 0.0 || errors > 0.0 {
            bail!("{side} over the impaired path: {goodput} Gbit/s, {errors} client errors");
        }
        if lost == 0 {
            bail!("{side}: the relay lost nothing at 2% loss: {down}");
        }
        if queue_max > QUEUE_MS {
            bail!(
                "{side}: the relay queued a datagram {queue_max} ms, above --queue-ms {QUEUE_MS}"
            );
        }
        figures.push(format!("{side} {:.1} Mbit/s ({lost} lost)", goodput * 1e3));
    }
    no_namespaces_left()?;
    println!(
        "ci: netns impaired smoke: {}, namespaces removed",
        figures.join(", ")
    );
    Ok(())
}

/// Why the netns runs cannot happen here, if they cannot.
fn netns_unavailable(is_root: bool) -> Option<String> {
    if !is_root {
        Some("network namespaces need root (CAP_NET_ADMIN)".to_owned())
    } else if !Command::new("ip")
        .args(["netns", "list"])
        .status()
        .is_ok_and(|s| s.success())
    {
        Some("`ip netns` does not work here".to_owned())
    } else {
        None
    }
}

fn no_namespaces_left() -> anyhow::Result<()> {
    let left = Command::new("ip").args(["netns", "list"]).output()?;
    let left = String::from_utf8_lossy(&left.stdout);
    if left.lines().any(|l| l.starts_with("i2b-")) {
        bail!("the bench left network namespaces behind: {left}");
    }
    Ok(())
}
