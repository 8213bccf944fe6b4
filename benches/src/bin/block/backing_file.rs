//! The file the benchmark's disk lives in: its contents, and keeping it out of the host page cache
//! between runs.

use std::fs::File;
use std::io::Write;
use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result};

/// Writes `mib` MiB of non-zero, non-repeating data to `path` and syncs it, so that every block is
/// allocated and reads really reach the disk (a sparse or fallocated file reads as zeroes for free).
pub(crate) fn create_backing_file(path: &Path, mib: u64) -> Result<()> {
    let mut file = File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
    let mut chunk = vec![0u8; 1 << 20];
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for word in chunk.chunks_exact_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        word.copy_from_slice(&x.to_le_bytes());
    }
    for i in 0..mib {
        // Make every MiB different.
        chunk[..8].copy_from_slice(&i.to_le_bytes());
        file.write_all(&chunk)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    file.sync_all()
        .with_context(|| format!("syncing {}", path.display()))
}

/// Writes back and drops `path`'s pages from the host page cache (GNU dd's documented idiom), so that
/// every run starts with the file on disk only: a VMM that does buffered I/O would otherwise read what
/// the previous run (or the file's creation) left in memory.
pub(crate) fn drop_page_cache(path: &Path) {
    let status = Command::new("dd")
        .arg(format!("of={}", path.display()))
        .args([
            "oflag=nocache",
            "conv=notrunc,fdatasync",
            "count=0",
            "status=none",
        ])
        .status();
    match status {
        Ok(s) if s.success() => {}
        Ok(s) => eprintln!(
            "warning: dropping the page cache of {} failed: dd {s}",
            path.display()
        ),
        Err(e) => eprintln!(
            "warning: dropping the page cache of {} failed: dd: {e}",
            path.display()
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use harness::TempDir;

    #[test]
    fn backing_file_and_temp_dir() {
        let parent = std::env::temp_dir();
        let dir = TempDir::new_in(&parent, "vmm-bench-block").unwrap();
        let path = dir.path().join("f");
        create_backing_file(&path, 2).unwrap();
        drop_page_cache(&path);
        let data = std::fs::read(&path).unwrap();
        assert_eq!(data.len(), 2 << 20);
        assert_ne!(data[..1 << 20], data[1 << 20..]);
        assert!(data.iter().filter(|&&b| b == 0).count() < data.len() / 100);
        let kept = dir.path().to_path_buf();
        drop(dir);
        assert!(!kept.exists());
    }
}
