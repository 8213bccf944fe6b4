//! The host's same-page merging (KSM) for `--mergeable` runs: turned on for the run with a scan
//! rate that keeps up with a host full of VMs, waited on before measuring, and put back as it was.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

const KSM: &str = "/sys/kernel/mm/ksm";
/// Pages scanned per wake-up and the pause between: 100,000 pages (~390 MiB) a second, so that a
/// host full of small VMs is covered in seconds rather than the default's minutes.
const PAGES_TO_SCAN: &str = "2000";
const SLEEP_MILLISECS: &str = "20";

fn read(name: &str) -> Result<String> {
    let path = Path::new(KSM).join(name);
    Ok(std::fs::read_to_string(&path)
        .with_context(|| format!("cannot read {}", path.display()))?
        .trim()
        .to_string())
}

fn write(name: &str, value: &str) -> Result<()> {
    let path = Path::new(KSM).join(name);
    std::fs::write(&path, value).with_context(|| format!("cannot write {value} to {}", path.display()))
}

fn number(name: &str) -> u64 {
    read(name).ok().and_then(|v| v.parse().ok()).unwrap_or(0)
}

/// What KSM did by the time the VMs were measured.
#[derive(Debug, Clone, Default)]
pub struct KsmStats {
    /// Shared pages in use (each stands for several).
    pub pages_shared: u64,
    /// Page mappings sharing them: the memory saved is about `pages_sharing` pages.
    pub pages_sharing: u64,
    /// Full scans completed during the wait.
    pub full_scans: u64,
    pub wait_secs: f64,
}

/// KSM turned on for the run; `restore` puts the settings back.
pub struct Ksm {
    before: Vec<(&'static str, String)>,
}

impl Ksm {
    /// Remembers the current settings, then runs KSM at the benchmark's scan rate.
    pub fn enable() -> Result<Ksm> {
        let mut before = Vec::new();
        for name in ["run", "pages_to_scan", "sleep_millisecs"] {
            before.push((name, read(name).context("the host has no KSM (CONFIG_KSM)")?));
        }
        write("pages_to_scan", PAGES_TO_SCAN)?;
        write("sleep_millisecs", SLEEP_MILLISECS)?;
        write("run", "1")?;
        Ok(Ksm { before })
    }

    /// Waits until KSM has completed two more full scans (everything madvised is then merged as
    /// far as it will be), or `timeout`.
    pub async fn settle(&self, timeout: Duration) -> KsmStats {
        let start = Instant::now();
        let first = number("full_scans");
        while number("full_scans") < first + 2 && start.elapsed() < timeout {
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        KsmStats {
            pages_shared: number("pages_shared"),
            pages_sharing: number("pages_sharing"),
            full_scans: number("full_scans").saturating_sub(first),
            wait_secs: start.elapsed().as_secs_f64(),
        }
    }

    /// Puts the settings back (`run` last, so that a host that had KSM off stops scanning; with
    /// run=0 merged pages stay merged until they are written).
    pub fn restore(self) {
        for (name, value) in self.before.iter().rev() {
            if let Err(e) = write(name, value) {
                eprintln!("ksm: {e:#}");
            }
        }
    }
}
