//! `density --count 5` in clone mode (one guest boot, five restored clones) through its own
//! vmm-agent: the report is written with the right counts and nothing is left behind. No timing
//! is asserted: the numbers are for people.

use std::path::Path;
use std::process::Command;

use harness::{require_kvm, TempDir};
use serde_json::Value;

/// Live processes whose command line names `dir`.
fn processes_naming(dir: &str) -> Vec<String> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.parse::<u32>().is_err() {
            continue;
        }
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        let zombie = std::fs::read_to_string(entry.path().join("stat"))
            .map(|s| {
                s.rsplit_once(')')
                    .is_some_and(|(_, r)| r.trim_start().starts_with('Z'))
            })
            .unwrap_or(true);
        if cmdline.contains(dir) && !zombie {
            found.push(format!("{name}: {cmdline}"));
        }
    }
    found
}

#[test]
fn density_clone_count_5_reports_and_leaves_nothing_behind() {
    require_kvm();
    let out = TempDir::new("density-smoke").unwrap();
    let json_path = out.path().join("density.json");
    let output = Command::new(env!("CARGO_BIN_EXE_density"))
        .args(["--mode", "clone", "--count", "5", "--concurrency", "5"])
        .args(["--window-secs", "1", "--settle-secs", "0", "--rpc-samples", "10"])
        .arg("--out")
        .arg(&json_path)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "density failed: {}\n{stderr}",
        output.status
    );

    let report: Value = serde_json::from_str(&std::fs::read_to_string(&json_path).unwrap()).unwrap();
    assert_eq!(report["count_reached"], 5, "{report:#}");
    assert_eq!(report["stop"]["reason"], "target");
    assert_eq!(report["config"]["mode"], "clone");
    assert_eq!(report["config"]["driver"], "agent");
    let waves = report["waves"].as_array().unwrap();
    let started: u64 = waves
        .iter()
        .map(|w| w["vms"].as_array().unwrap().len() as u64)
        .sum();
    assert_eq!(started, 5);
    assert!(waves.iter().all(|w| w["failures"].as_array().unwrap().is_empty()));
    let full = &report["full"];
    assert_eq!(full["vms"].as_array().unwrap().len(), 5);
    assert_eq!(full["alive_after_window"], 5);
    for vm in full["vms"].as_array().unwrap() {
        assert!(vm["memory"]["pss_kib"].as_u64().unwrap() > 0, "{vm}");
    }
    let rpc = full["rpc"].as_array().unwrap();
    assert_eq!(rpc.len(), 2);
    assert!(rpc
        .iter()
        .all(|r| r["samples_ms"].as_array().unwrap().len() == 10));
    assert!(report["source"]["snapshot_memory_bytes"].as_u64().unwrap() > 0);

    for name in ["density.md", "density-latency.svg", "density-memory.svg"] {
        let text = std::fs::read_to_string(out.path().join(name)).unwrap();
        assert!(!text.is_empty(), "{name}");
    }
    let svg = std::fs::read_to_string(out.path().join("density-memory.svg")).unwrap();
    assert!(svg.starts_with("<svg") && svg.contains("<polyline"));

    // Nothing left behind: the VMs, the agent, the snapshot and the state dir are gone.
    let cleanup = &report["cleanup"];
    assert_eq!(cleanup["vms_stopped"], 5, "{cleanup}");
    assert!(cleanup["errors"].as_array().unwrap().is_empty(), "{cleanup}");
    assert!(
        cleanup["leftover_pids"].as_array().unwrap().is_empty(),
        "{cleanup}"
    );
    let work_dir = report["config"]["work_dir"].as_str().unwrap();
    assert!(work_dir.starts_with("/tmp/density-"), "{work_dir}");
    assert!(!Path::new(work_dir).exists(), "{work_dir} is still there");
    let left = processes_naming(work_dir);
    assert!(left.is_empty(), "processes left: {left:?}");
}
