//! The node's asset identifiers across restarts: blocks of identifiers
//! are reserved in `DATA_DIR/assets.blocks` before any is handed out, so
//! a restarted node never hands out an identifier of an earlier run (its
//! memory assets are gone; their addresses answer "released").

use anyhow::Context;
use dataplane::assets::address::STORAGE_BLOCKS_FIRST as MEMORY_BLOCKS_END;
use std::io::Write;
use std::path::Path;

/// The file that holds the first block no run has reserved yet.
pub const BLOCKS_FILE: &str = "assets.blocks";
/// Blocks one run reserves: 2^22 blocks of 65,536 identifiers (about 2.7
/// x 10^11 allocations, three days at a million a second); a node may
/// start 8,192 times before the half of its 36-bit block space that is
/// memory's is spent (storage has the other half).
pub const BLOCKS_PER_RUN: u64 = 1 << 22;

/// Reserve this run's blocks: `(first, end)`, written durably (a new file
/// renamed over the old one, then the directory synced) before it returns;
/// `None` when the node has used up its identifiers (the caller serves no
/// assets then, and says so). A start that fails later has still used its
/// reservation.
pub fn reserve_blocks(data_dir: &Path) -> anyhow::Result<Option<(u64, u64)>> {
    let path = data_dir.join(BLOCKS_FILE);
    let first = match std::fs::read_to_string(&path) {
        Ok(text) => text.trim().parse::<u64>().with_context(|| {
            format!(
                "{} does not hold a block number; it is the node's record of asset identifiers handed out, restore it from a backup",
                path.display()
            )
        })?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
    };
    let end = first.saturating_add(BLOCKS_PER_RUN);
    if end > MEMORY_BLOCKS_END {
        return Ok(None);
    }
    let scratch = data_dir.join(format!("{BLOCKS_FILE}.new"));
    let mut file = std::fs::File::create(&scratch)
        .with_context(|| format!("cannot write {}", scratch.display()))?;
    writeln!(file, "{end}")?;
    file.sync_all()?;
    std::fs::rename(&scratch, &path)
        .with_context(|| format!("cannot replace {}", path.display()))?;
    std::fs::File::open(data_dir)?.sync_all()?;
    Ok(Some((first, end)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_run_reserves_blocks_after_the_last_and_bad_records_stop_the_start_and_a_used_up_node_serves_none()
     {
        let dir = std::env::temp_dir().join(format!("i2-asset-blocks-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        assert_eq!(reserve_blocks(&dir).unwrap(), Some((0, BLOCKS_PER_RUN)));
        assert_eq!(
            reserve_blocks(&dir).unwrap(),
            Some((BLOCKS_PER_RUN, 2 * BLOCKS_PER_RUN))
        );
        std::fs::write(dir.join(BLOCKS_FILE), "twelve\n").unwrap();
        let err = reserve_blocks(&dir).unwrap_err().to_string();
        assert!(err.contains("does not hold a block number"), "{err}");
        std::fs::write(
            dir.join(BLOCKS_FILE),
            format!("{}\n", MEMORY_BLOCKS_END - 1),
        )
        .unwrap();
        assert_eq!(reserve_blocks(&dir).unwrap(), None, "used up");
        assert_eq!(
            std::fs::read_to_string(dir.join(BLOCKS_FILE))
                .unwrap()
                .trim(),
            (MEMORY_BLOCKS_END - 1).to_string(),
            "a refused start changes nothing"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
