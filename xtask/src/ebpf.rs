//! `cargo xtask build-ebpf [--check]`: compile the BPF programs in `ebpf/`
//! with clang and commit the objects, so `cargo build` needs no clang; with
//! `--check` (CI), rebuild into a temporary file and fail if the committed
//! object differs from its source.

use anyhow::{Context, bail};
use std::path::{Path, PathBuf};
use std::process::Command;

/// clang flags; `-fdebug-compilation-dir=.` and a relative source path make
/// the object independent of the checkout's location (BTF needs `-g`).
const CFLAGS: &[&str] = &[
    "-O2",
    "-g",
    "-target",
    "bpf",
    "-I/usr/include/x86_64-linux-gnu",
    "-fdebug-compilation-dir=.",
];

pub fn run(root: &Path, check: bool) -> anyhow::Result<()> {
    let clang = find_clang()
        .context("no clang found: install clang-19 and libbpf-dev (apt-get), or set CLANG")?;
    let dir = root.join("ebpf");
    let mut sources: Vec<PathBuf> = std::fs::read_dir(&dir)
        .with_context(|| format!("cannot read {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "c"))
        .collect();
    sources.sort();
    if sources.is_empty() {
        bail!("no BPF sources in {}", dir.display());
    }
    let mut stale = Vec::new();
    for source in &sources {
        let name = source
            .file_name()
            .expect("a file")
            .to_string_lossy()
            .into_owned();
        let object = source.with_extension("o");
        let out = if check {
            std::env::temp_dir().join(format!("xtask-ebpf-{}-{name}.o", std::process::id()))
        } else {
            object.clone()
        };
        let status = Command::new(&clang)
            .args(CFLAGS)
            .arg("-c")
            .arg(Path::new(&name))
            .arg("-o")
            .arg(&out)
            .current_dir(&dir)
            .status()
            .with_context(|| format!("cannot run {}", clang.display()))?;
        if !status.success() {
            bail!("{} failed on ebpf/{name}", clang.display());
        }
        if check {
            let fresh = std::fs::read(&out)?;
            let _ = std::fs::remove_file(&out);
            let committed = std::fs::read(&object).unwrap_or_default();
            if fresh != committed {
                stale.push(format!(
                    "ebpf/{}",
                    object.file_name().expect("a file").to_string_lossy()
                ));
            } else {
                println!("build-ebpf: ebpf/{name} matches its committed object");
            }
        } else {
            println!("build-ebpf: built {}", object.display());
        }
    }
    if !stale.is_empty() {
        bail!(
            "committed BPF objects differ from their sources: {}; run `cargo xtask build-ebpf` and commit",
            stale.join(", ")
        );
    }
    Ok(())
}

fn find_clang() -> Option<PathBuf> {
    if let Some(clang) = std::env::var_os("CLANG") {
        return Some(PathBuf::from(clang));
    }
    ["clang-19", "clang"]
        .into_iter()
        .map(PathBuf::from)
        .find(|c| {
            Command::new(c)
                .arg("--version")
                .output()
                .is_ok_and(|o| o.status.success())
        })
}
