//! Test helpers shared by the crate's unit tests.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};

/// A fresh directory path under the system's temp dir (not created),
/// removed with everything in it on drop.
pub(crate) struct TempDir(pub(crate) PathBuf);

impl TempDir {
    pub(crate) fn new(tag: &str) -> Self {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "i2-controlplane-{tag}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        Self(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The keys a cluster's members share, copied from `from` to `to` (a new
/// member's data directory): the CA, the log key and, where there are
/// ones, the beacon key and the enrollment secret (a token is good on any
/// member).
pub(crate) fn copy_cluster_keys(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to.join("ca")).unwrap();
    for entry in std::fs::read_dir(from.join("ca")).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), to.join("ca").join(entry.file_name())).unwrap();
    }
    for file in [
        crate::authority::logged::LOG_KEY_FILE,
        "beacon-node.key",
        crate::authority::enrollment::KEY_FILE,
    ] {
        if from.join(file).exists() {
            std::fs::copy(from.join(file), to.join(file)).unwrap();
        }
    }
}
