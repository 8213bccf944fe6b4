//! The parts of the JSON reports that every benchmark writes the same way.

use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};

/// Writes `value` as pretty JSON to `path`, creating parent directories.
pub fn write_json(path: &Path, value: &serde_json::Value) -> Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    let text = serde_json::to_string_pretty(value).context("serialising JSON")?;
    std::fs::write(path, text + "\n").with_context(|| format!("cannot write {}", path.display()))
}

/// Seconds since the Unix epoch (0 if the clock is before it), to date a report.
pub fn unix_time() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The report's `host` section: kernel release and CPU count, which the numbers depend on.
pub fn host_json() -> serde_json::Value {
    let osrelease = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    serde_json::json!({
        "kernel": osrelease.trim(),
        "cpus": std::thread::available_parallelism().map(|n| n.get()).ok(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_and_time() {
        let host = host_json();
        assert!(host["cpus"].as_u64().unwrap() >= 1);
        assert!(!host["kernel"].as_str().unwrap().is_empty());
        assert!(unix_time() > 1_600_000_000);
    }

    #[test]
    fn writes_json_with_parent_dirs() {
        let dir = std::env::temp_dir().join(format!("benches-write-json-{}", std::process::id()));
        let path = dir.join("a/b.json");
        write_json(&path, &serde_json::json!({"x": 1})).unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "{\n  \"x\": 1\n}\n");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
