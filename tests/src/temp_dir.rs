//! Temporary directories for tests and benchmarks.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

use anyhow::{Context, Result};

/// A fresh directory, removed with everything in it when dropped (also when a test panics).
#[derive(Debug)]
pub struct TempDir(PathBuf);

impl TempDir {
    /// Creates `<system temp dir>/<tag>-<pid>-<n>`.
    pub fn new(tag: &str) -> Result<Self> {
        Self::new_in(&std::env::temp_dir(), tag)
    }

    /// Creates `<parent>/<tag>-<pid>-<n>`, `n` counting the directories this process made, so
    /// parallel tests never share one; a leftover of a dead process with the same pid is emptied.
    pub fn new_in(parent: &Path, tag: &str) -> Result<Self> {
        static COUNT: AtomicU32 = AtomicU32::new(0);
        let n = COUNT.fetch_add(1, Ordering::Relaxed);
        let path = parent.join(format!("{tag}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).with_context(|| format!("cannot create {}", path.display()))?;
        Ok(TempDir(path))
    }

    /// Where it is.
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(&self.0) {
            eprintln!("cannot remove {}: {e}", self.0.display());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn distinct_and_removed() {
        let a = TempDir::new("harness-temp").unwrap();
        let b = TempDir::new("harness-temp").unwrap();
        assert_ne!(a.path(), b.path());
        std::fs::write(a.path().join("f"), b"x").unwrap();
        let kept = a.path().to_path_buf();
        drop(a);
        assert!(!kept.exists());
    }
}
