//! internet2-server: the binary's configuration and wiring, shared by the
//! server (`src/main.rs`) and the client CLI (`src/bin/internet2.rs`).

#![forbid(unsafe_code)]

pub mod admission;
pub mod admission_bench;
pub mod asset_bench;
pub mod assets;
pub mod authority;
pub mod authority_load;
pub mod cli_assets;
pub mod cli_authority;
pub mod cli_vm;
pub mod config;
pub mod dns_bench;
pub mod vm_bench;
mod wire_agreement;

use std::path::PathBuf;

/// Where the server keeps keys and state unless told otherwise:
/// `$XDG_DATA_HOME/internet2-server` or `~/.local/share/internet2-server`.
pub fn default_data_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("XDG_DATA_HOME").filter(|d| !d.is_empty()) {
        return PathBuf::from(dir).join("internet2-server");
    }
    let home = std::env::var_os("HOME").map_or_else(|| PathBuf::from("/var/lib"), PathBuf::from);
    home.join(".local/share/internet2-server")
}
