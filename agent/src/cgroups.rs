//! One CPU cgroup per VM, under one parent for all the agent's VMs: each vmm's CPU use is its
//! own to account and the parent can cap what all guests together take (`--vms-cpu-max`), so
//! that a host full of busy or merely idle-but-emulated guests leaves CPU for the agent and for
//! the vmms it is starting.
//!
//! cgroup v2 when `/sys/fs/cgroup` is a unified hierarchy offering `cpu`: `<root>/<parent>/<vm>`
//! with `cpu.max` on the parent. Otherwise cgroup v1's `cpu` hierarchy:
//! `<root>/cpu/<parent>/<vm>` with `cpu.cfs_quota_us` on the parent. The parent is left in place
//! (with its cap) when the agent stops; a VM's group is removed once its vmm has ended.

use std::io::ErrorKind;
use std::path::{Path, PathBuf};

/// The CFS period both versions are given: 100 ms, the kernel's default.
const PERIOD_US: u64 = 100_000;

/// Why the VMs' cgroups cannot be set up or used.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    /// Neither a cgroup v2 hierarchy with `cpu` nor a v1 `cpu` hierarchy is mounted there.
    #[error("no cgroup v2 with the cpu controller and no cgroup v1 cpu hierarchy under {0}")]
    NoCpuController(PathBuf),
    /// A cgroup file or directory cannot be written.
    #[error("{0}")]
    Io(PathBuf, #[source] std::io::Error),
    /// A CPU cap outside what the host can mean.
    #[error("--vms-cpu-max must be more than 0 and at most 1024 cores, got {0}")]
    BadCap(f64),
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Version {
    V2,
    V1,
}

/// Removes the cgroups `vmm/<vm_id>` a jailed vmm's launcher makes (`vmm --jail`; docs/jail.md),
/// when a launcher killed before its clean-up left them. Only empty groups can go: one that
/// still holds processes (another VM of that id, say another agent's) stays.
pub fn remove_jail_groups(vm_id: &str) {
    let root = Path::new("/sys/fs/cgroup");
    for group in [
        root.join("vmm"),
        root.join("cpu/vmm"),
        root.join("memory/vmm"),
        root.join("pids/vmm"),
    ] {
        let _ = std::fs::remove_dir(group.join(vm_id));
    }
}

/// The parent cgroup of the agent's VMs.
#[derive(Debug, Clone)]
pub struct VmCgroups {
    parent: PathBuf,
}

fn write(path: &Path, value: &str) -> Result<(), CgroupError> {
    std::fs::write(path, value).map_err(|e| CgroupError::Io(path.to_path_buf(), e))
}

fn mkdir(path: &Path) -> Result<(), CgroupError> {
    match std::fs::create_dir(path) {
        Err(e) if e.kind() != ErrorKind::AlreadyExists => Err(CgroupError::Io(path.to_path_buf(), e)),
        _ => Ok(()),
    }
}

/// `cpu.max` (v2) or `cpu.cfs_quota_us` (v1) for a cap of `cores` (None: no cap).
fn quota(version: &Version, cores: Option<f64>) -> String {
    let us = cores.map(|c| ((c * PERIOD_US as f64).round() as u64).max(1000));
    match (version, us) {
        (Version::V2, Some(us)) => format!("{us} {PERIOD_US}"),
        (Version::V2, None) => format!("max {PERIOD_US}"),
        (Version::V1, Some(us)) => us.to_string(),
        (Version::V1, None) => "-1".into(),
    }
}

impl VmCgroups {
    /// Finds the CPU hierarchy under `root` (normally `/sys/fs/cgroup`), creates the parent group
    /// `name` and sets its cap (`cores`; None lifts a cap an earlier run set).
    pub fn setup(root: &Path, name: &str, cores: Option<f64>) -> Result<VmCgroups, CgroupError> {
        if let Some(c) = cores {
            if !(c > 0.0 && c <= 1024.0) {
                return Err(CgroupError::BadCap(c));
            }
        }
        let controllers = std::fs::read_to_string(root.join("cgroup.controllers")).unwrap_or_default();
        let (version, base) = if controllers.split_whitespace().any(|c| c == "cpu") {
            (Version::V2, root.to_path_buf())
        } else if root.join("cpu").join("cpu.cfs_quota_us").exists() {
            (Version::V1, root.join("cpu"))
        } else {
            return Err(CgroupError::NoCpuController(root.to_path_buf()));
        };
        let parent = base.join(name);
        if version == Version::V2 {
            // The children of the root, and the VMs under the parent, get the cpu controller.
            write(&root.join("cgroup.subtree_control"), "+cpu")?;
        }
        mkdir(&parent)?;
        match version {
            Version::V2 => {
                write(&parent.join("cgroup.subtree_control"), "+cpu")?;
                write(&parent.join("cpu.max"), &quota(&version, cores))?;
            }
            Version::V1 => {
                write(&parent.join("cpu.cfs_period_us"), &PERIOD_US.to_string())?;
                write(&parent.join("cpu.cfs_quota_us"), &quota(&version, cores))?;
            }
        }
        Ok(VmCgroups { parent })
    }

    /// The group of one VM.
    pub fn vm_dir(&self, vm_id: &str) -> PathBuf {
        self.parent.join(vm_id)
    }

    /// Moves process `pid` (all its threads) into the VM's group, creating it.
    pub fn place(&self, vm_id: &str, pid: u32) -> Result<(), CgroupError> {
        let dir = self.vm_dir(vm_id);
        mkdir(&dir)?;
        write(&dir.join("cgroup.procs"), &pid.to_string())
    }

    /// Removes the VM's group once nothing runs in it; a group that still has a process (a vmm
    /// re-adopted by a later agent, say) stays, which the kernel enforces anyway.
    pub fn remove(&self, vm_id: &str) {
        let dir = self.vm_dir(vm_id);
        if let Err(e) = std::fs::remove_dir(&dir) {
            if e.kind() != ErrorKind::NotFound {
                tracing::warn!(vm = vm_id, error = %e, "cannot remove the VM's cgroup {}", dir.display());
            }
        }
    }

    /// The parent group's directory.
    pub fn parent(&self) -> &Path {
        &self.parent
    }
}

/// The default parent group of an agent whose state directory is `state_dir`: one per state
/// directory, so that two agents on a host (tests, say) never share VM groups.
pub fn default_name(state_dir: &Path) -> String {
    let path = std::path::absolute(state_dir).unwrap_or_else(|_| state_dir.to_path_buf());
    // FNV-1a: stable across builds and platforms, unlike std's hasher.
    let hash = path
        .as_os_str()
        .as_encoded_bytes()
        .iter()
        .fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3)
        });
    format!("vmm-agent-{:08x}", hash as u32)
}

/// Removes the parent group `name` under `root` and its VM groups, where nothing runs in them any
/// more: for tidying up after an agent whose VMs are all gone.
pub fn remove_tree(root: &Path, name: &str) {
    for base in [root.to_path_buf(), root.join("cpu")] {
        let parent = base.join(name);
        if let Ok(entries) = std::fs::read_dir(&parent) {
            for entry in entries.flatten() {
                if entry.file_type().is_ok_and(|t| t.is_dir()) {
                    let _ = std::fs::remove_dir(entry.path());
                }
            }
            let _ = std::fs::remove_dir(&parent);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use harness::TempDir;

    #[test]
    fn default_names_differ_per_state_dir_and_stay_short() {
        let a = default_name(Path::new("/var/lib/vmm-agent"));
        assert_eq!(a, default_name(Path::new("/var/lib/vmm-agent")));
        assert_ne!(a, default_name(Path::new("/tmp/agent-x")));
        assert!(a.starts_with("vmm-agent-") && a.len() == 18, "{a}");
    }

    #[test]
    fn quotas_for_both_versions() {
        assert_eq!(quota(&Version::V2, Some(1.5)), "150000 100000");
        assert_eq!(quota(&Version::V2, None), "max 100000");
        assert_eq!(quota(&Version::V1, Some(0.25)), "25000");
        assert_eq!(quota(&Version::V1, None), "-1");
        // Below 1 ms per period the kernel refuses the value: round up.
        assert_eq!(quota(&Version::V1, Some(0.001)), "1000");
    }

    /// A v1 layout in a temporary directory (cgroupfs semantics aside: plain files).
    #[test]
    fn a_v1_hierarchy_gets_the_parent_cap_and_a_group_per_vm() {
        let dir = TempDir::new("agent-cgroup").unwrap();
        let cpu = dir.path().join("cpu");
        std::fs::create_dir(&cpu).unwrap();
        std::fs::write(cpu.join("cpu.cfs_quota_us"), "-1").unwrap();
        let cg = VmCgroups::setup(dir.path(), "vmm-agent", Some(1.5)).unwrap();
        let parent = cpu.join("vmm-agent");
        assert_eq!(cg.parent(), parent);
        assert_eq!(
            std::fs::read_to_string(parent.join("cpu.cfs_quota_us")).unwrap(),
            "150000"
        );
        assert_eq!(
            std::fs::read_to_string(parent.join("cpu.cfs_period_us")).unwrap(),
            "100000"
        );
        cg.place("vm1", 42).unwrap();
        assert_eq!(
            std::fs::read_to_string(parent.join("vm1/cgroup.procs")).unwrap(),
            "42"
        );
        // A real cgroup directory is empty once its process is gone; here, empty it by hand.
        std::fs::remove_file(parent.join("vm1/cgroup.procs")).unwrap();
        cg.remove("vm1");
        assert!(!parent.join("vm1").exists());
        cg.remove("never-made");
    }

    #[test]
    fn a_v2_hierarchy_enables_cpu_for_the_parent_and_the_vms() {
        let dir = TempDir::new("agent-cgroup").unwrap();
        std::fs::write(dir.path().join("cgroup.controllers"), "cpuset cpu io memory pids").unwrap();
        let cg = VmCgroups::setup(dir.path(), "vmm-agent", None).unwrap();
        let parent = dir.path().join("vmm-agent");
        assert_eq!(
            std::fs::read_to_string(parent.join("cpu.max")).unwrap(),
            "max 100000"
        );
        assert_eq!(
            std::fs::read_to_string(dir.path().join("cgroup.subtree_control")).unwrap(),
            "+cpu"
        );
        assert_eq!(cg.vm_dir("a"), parent.join("a"));
    }

    #[test]
    fn no_cpu_controller_and_bad_caps_are_errors() {
        let dir = TempDir::new("agent-cgroup").unwrap();
        assert!(matches!(
            VmCgroups::setup(dir.path(), "x", None),
            Err(CgroupError::NoCpuController(_))
        ));
        for bad in [0.0, -1.0, f64::NAN, 2000.0] {
            assert!(matches!(
                VmCgroups::setup(dir.path(), "x", Some(bad)),
                Err(CgroupError::BadCap(_))
            ));
        }
    }
}
