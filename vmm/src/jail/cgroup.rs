//! The VM's cgroup, `vmm/<id>`: CPU bandwidth, memory and process-count limits.
//!
//! cgroup v2 is used when `/sys/fs/cgroup` is a cgroup2 mount offering the `cpu` and `memory`
//! controllers (a production host with the unified hierarchy); otherwise cgroup v1, with one group
//! per controller (`/sys/fs/cgroup/{cpu,memory,pids}/vmm/<id>`). A hybrid host's extra cgroup2 at
//! `/sys/fs/cgroup/unified` has no controllers and is not used.
//!
//! The groups live at the top of each hierarchy, not under the launcher's own group: in cgroup v2 a
//! group whose children have controllers enabled may hold no processes itself, so the agent's own
//! service group cannot be their parent.

use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The standard mount point of the cgroup file systems.
pub const CGROUP_ROOT: &str = "/sys/fs/cgroup";
/// The group under which every VM's group is created.
pub const PARENT_GROUP: &str = "vmm";
/// The CFS period used for CPU limits, in microseconds (the kernel's default).
pub const CPU_PERIOD_US: u64 = 100_000;

/// Why the cgroup could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    /// Neither a cgroup v2 with cpu and memory nor the v1 controllers are mounted.
    #[error("cgroup: no usable cgroup hierarchy: {0}")]
    NoHierarchy(String),
    /// The group exists and holds processes: a VM with this id is running.
    #[error("cgroup {0} exists and is in use: is a VM with this id already running?")]
    InUse(String),
    /// A cgroup file could not be written or a group created.
    #[error("cgroup: {what} {path}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The file or directory.
        path: String,
        /// Why.
        source: std::io::Error,
    },
}

/// A CPU bandwidth limit: `quota_us` of CPU time per [`CPU_PERIOD_US`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CpuLimit {
    /// CPU time per period, in microseconds (1.5 cores = 150000).
    pub quota_us: u64,
}

impl CpuLimit {
    /// Parses a number of cores such as `1`, `0.5` or `1.25` (0.01 to 1024, at most 3 decimals).
    pub fn parse(cores: &str) -> Result<Self, String> {
        let expected = "expected a number of cores such as 1, 0.5 or 1.25 (0.01 to 1024)";
        let (whole, frac) = cores.split_once('.').unwrap_or((cores, ""));
        let digits = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
        if whole.is_empty()
            || cores.ends_with('.')
            || whole.len() > 4
            || !digits(whole)
            || frac.len() > 3
            || !digits(frac)
        {
            return Err(expected.into());
        }
        let whole: u64 = whole.parse().map_err(|_| expected.to_string())?;
        let frac_us: u64 = format!("{frac:0<3}")
            .parse::<u64>()
            .map_err(|_| expected.to_string())?
            * 100;
        let quota_us = whole * CPU_PERIOD_US + frac_us;
        if !(CPU_PERIOD_US / 100..=1024 * CPU_PERIOD_US).contains(&quota_us) {
            return Err(expected.into());
        }
        Ok(CpuLimit { quota_us })
    }
}

/// The limits of one VM's group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// CPU bandwidth; unlimited when `None`.
    pub cpu: Option<CpuLimit>,
    /// Memory (RAM the group may charge: guest memory plus the VMM's own) in bytes; unlimited when
    /// `None`.
    pub memory_bytes: Option<u64>,
    /// Most tasks (processes and threads).
    pub pids: u64,
}

/// Which cgroup version, and where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Hierarchy {
    /// The unified hierarchy mounted here.
    V2(PathBuf),
    /// Per-controller v1 hierarchies under this directory (`cpu/`, `memory/`, `pids/`).
    V1(PathBuf),
}

/// The controllers the VM's group uses.
const CONTROLLERS: [&str; 3] = ["cpu", "memory", "pids"];

impl Hierarchy {
    /// Finds the hierarchy to use under [`CGROUP_ROOT`].
    pub fn detect() -> Result<Self, CgroupError> {
        Self::detect_in(Path::new(CGROUP_ROOT))
    }

    fn detect_in(root: &Path) -> Result<Self, CgroupError> {
        if let Ok(controllers) = std::fs::read_to_string(root.join("cgroup.controllers")) {
            let offered: Vec<&str> = controllers.split_whitespace().collect();
            if ["cpu", "memory"].iter().all(|c| offered.contains(c)) {
                return Ok(Hierarchy::V2(root.to_path_buf()));
            }
        }
        let missing: Vec<&str> = CONTROLLERS
            .iter()
            .copied()
            .filter(|c| !root.join(c).join("cgroup.procs").exists())
            .collect();
        if missing.is_empty() {
            Ok(Hierarchy::V1(root.to_path_buf()))
        } else {
            Err(CgroupError::NoHierarchy(format!(
                "{} has no cgroup2 with cpu and memory, nor the v1 controllers {}",
                root.display(),
                missing.join(", ")
            )))
        }
    }
}

/// The files to write in a new group and their contents, in order. A (controller, file, value)
/// triple; the controller names the v1 hierarchy and is ignored for v2.
pub fn limit_files(hierarchy: &Hierarchy, limits: &Limits) -> Vec<(&'static str, &'static str, String)> {
    let mut files = Vec::new();
    match hierarchy {
        Hierarchy::V2(_) => {
            let cpu = match limits.cpu {
                Some(c) => format!("{} {CPU_PERIOD_US}", c.quota_us),
                None => format!("max {CPU_PERIOD_US}"),
            };
            files.push(("cpu", "cpu.max", cpu));
            let memory = limits.memory_bytes.map_or("max".to_string(), |b| b.to_string());
            files.push(("memory", "memory.max", memory));
        }
        Hierarchy::V1(_) => {
            files.push(("cpu", "cpu.cfs_period_us", CPU_PERIOD_US.to_string()));
            let quota = limits.cpu.map_or("-1".to_string(), |c| c.quota_us.to_string());
            files.push(("cpu", "cpu.cfs_quota_us", quota));
            let memory = limits.memory_bytes.map_or("-1".to_string(), |b| b.to_string());
            files.push(("memory", "memory.limit_in_bytes", memory));
        }
    }
    files.push(("pids", "pids.max", limits.pids.to_string()));
    files
}

/// One VM's group (one directory per controller in v1), removed by [`Cgroup::remove`].
#[derive(Debug)]
pub struct Cgroup {
    hierarchy: Hierarchy,
    /// The group's directory per controller (v1), or one directory (v2).
    dirs: Vec<(&'static str, PathBuf)>,
}

fn io<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> CgroupError + 'a {
    move |source| CgroupError::Io {
        what,
        path: path.display().to_string(),
        source,
    }
}

fn write(path: &Path, value: &str) -> Result<(), CgroupError> {
    std::fs::write(path, value).map_err(io("cannot write", path))
}

impl Cgroup {
    /// Creates `vmm/<id>` with `limits`. A leftover empty group of that name (from a launcher that
    /// was killed) is replaced; one that holds processes is refused.
    pub fn create(hierarchy: Hierarchy, id: &str, limits: &Limits) -> Result<Self, CgroupError> {
        let dirs: Vec<(&'static str, PathBuf)> = match &hierarchy {
            Hierarchy::V2(root) => {
                let parent = root.join(PARENT_GROUP);
                enable_v2_controllers(root, &parent)?;
                vec![("", parent.join(id))]
            }
            Hierarchy::V1(root) => CONTROLLERS
                .iter()
                .map(|c| (*c, root.join(c).join(PARENT_GROUP).join(id)))
                .collect(),
        };
        let mut group = Cgroup {
            hierarchy,
            dirs: Vec::new(),
        };
        for (controller, dir) in dirs {
            if dir.exists() {
                let procs = std::fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default();
                if !procs.trim().is_empty() {
                    return Err(CgroupError::InUse(dir.display().to_string()));
                }
                remove_dir(&dir)?;
            }
            if let Some(parent) = dir.parent() {
                std::fs::create_dir_all(parent).map_err(io("cannot create", parent))?;
            }
            std::fs::create_dir(&dir).map_err(io("cannot create", &dir))?;
            group.dirs.push((controller, dir));
        }
        for (controller, file, value) in limit_files(&group.hierarchy, limits) {
            let dir = group.dir_of(controller);
            write(&dir.join(file), &value)?;
        }
        Ok(group)
    }

    fn dir_of(&self, controller: &str) -> &Path {
        match self.hierarchy {
            Hierarchy::V2(_) => &self.dirs[0].1,
            Hierarchy::V1(_) => self
                .dirs
                .iter()
                .find(|(c, _)| *c == controller)
                .map_or(&self.dirs[0].1, |(_, d)| d),
        }
    }

    /// The group's directories (one per controller in v1).
    pub fn dirs(&self) -> impl Iterator<Item = &Path> {
        self.dirs.iter().map(|(_, d)| d.as_path())
    }

    /// Moves process `pid` (all its threads) into the group.
    pub fn add(&self, pid: libc::pid_t) -> Result<(), CgroupError> {
        for (_, dir) in &self.dirs {
            write(&dir.join("cgroup.procs"), &pid.to_string())?;
        }
        Ok(())
    }

    /// Removes the group; its processes must have exited.
    pub fn remove(self) -> Result<(), CgroupError> {
        let mut result = Ok(());
        for (_, dir) in &self.dirs {
            if let Err(e) = remove_dir(dir) {
                result = result.and(Err(e));
            }
        }
        result
    }
}

/// Removes an empty group, retrying briefly: a group is busy until its last task has been fully
/// released, which can lag behind the parent reaping it.
fn remove_dir(dir: &Path) -> Result<(), CgroupError> {
    let mut tries = 0;
    loop {
        match std::fs::remove_dir(dir) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) && tries < 100 => {
                tries += 1;
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => return Err(io("cannot remove", dir)(e)),
        }
    }
}

/// Makes cpu, memory (and pids, where offered) available to the VM groups: enabled in the root's
/// and in `vmm/`'s `cgroup.subtree_control`.
/// Only controllers not enabled yet are written: a host whose init system already enabled them may
/// not let the root's `cgroup.subtree_control` be written at all.
fn enable_v2_controllers(root: &Path, parent: &Path) -> Result<(), CgroupError> {
    let offered = std::fs::read_to_string(root.join("cgroup.controllers")).unwrap_or_default();
    let offered: Vec<&str> = offered.split_whitespace().collect();
    let wanted: Vec<&str> = CONTROLLERS
        .iter()
        .copied()
        .filter(|c| offered.contains(c))
        .collect();
    enable_missing(root, &wanted)?;
    match std::fs::create_dir(parent) {
        Ok(()) => {}
        Err(e) if e.kind() == ErrorKind::AlreadyExists => {}
        Err(e) => return Err(io("cannot create", parent)(e)),
    }
    enable_missing(parent, &wanted)
}

fn enable_missing(group: &Path, wanted: &[&str]) -> Result<(), CgroupError> {
    let file = group.join("cgroup.subtree_control");
    let enabled = std::fs::read_to_string(&file).unwrap_or_default();
    let missing: Vec<String> = wanted
        .iter()
        .filter(|c| !enabled.split_whitespace().any(|e| e == **c))
        .map(|c| format!("+{c}"))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    write(&file, &missing.join(" "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_limits_parse_exactly() {
        let quota = |s| CpuLimit::parse(s).map(|c| c.quota_us);
        assert_eq!(quota("1"), Ok(100_000));
        assert_eq!(quota("1.5"), Ok(150_000));
        assert_eq!(quota("0.25"), Ok(25_000));
        assert_eq!(quota("0.01"), Ok(1_000));
        assert_eq!(quota("2.125"), Ok(212_500));
        assert_eq!(quota("1024"), Ok(102_400_000));
        for bad in [
            "0", "0.001", "0.009", "1025", "-1", "1.", ".5", "1.2345", "1e3", "", "one", "1,5", "+1",
        ] {
            assert!(quota(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn limit_files_for_both_versions() {
        let limits = Limits {
            cpu: Some(CpuLimit::parse("1.5").unwrap()),
            memory_bytes: Some(300 << 20),
            pids: 64,
        };
        let v2 = limit_files(&Hierarchy::V2("/sys/fs/cgroup".into()), &limits);
        let v2: Vec<_> = v2.iter().map(|(_, f, v)| (*f, v.as_str())).collect();
        assert_eq!(
            v2,
            [
                ("cpu.max", "150000 100000"),
                ("memory.max", "314572800"),
                ("pids.max", "64")
            ]
        );
        let v1 = limit_files(&Hierarchy::V1("/sys/fs/cgroup".into()), &limits);
        let v1: Vec<_> = v1.iter().map(|(c, f, v)| (*c, *f, v.as_str())).collect();
        assert_eq!(
            v1,
            [
                ("cpu", "cpu.cfs_period_us", "100000"),
                ("cpu", "cpu.cfs_quota_us", "150000"),
                ("memory", "memory.limit_in_bytes", "314572800"),
                ("pids", "pids.max", "64"),
            ]
        );
        let none = Limits {
            cpu: None,
            memory_bytes: None,
            pids: 8,
        };
        let v2 = limit_files(&Hierarchy::V2("/x".into()), &none);
        assert_eq!((v2[0].2.as_str(), v2[1].2.as_str()), ("max 100000", "max"));
        let v1 = limit_files(&Hierarchy::V1("/x".into()), &none);
        assert_eq!((v1[1].2.as_str(), v1[2].2.as_str()), ("-1", "-1"));
    }

    /// Creates groups in a plain directory standing in for the cgroup file system: the files a real
    /// cgroupfs would offer are not there, so this checks the paths and what is written.
    #[test]
    fn creates_groups_and_writes_limits_in_both_layouts() {
        let base = std::env::temp_dir().join(format!("vmm-cgroup-create-{}", std::process::id()));
        let limits = Limits {
            cpu: Some(CpuLimit::parse("2").unwrap()),
            memory_bytes: Some(1 << 30),
            pids: 32,
        };
        let v2 = base.join("v2");
        std::fs::create_dir_all(&v2).unwrap();
        std::fs::write(v2.join("cgroup.controllers"), "cpu io memory pids").unwrap();
        std::fs::write(v2.join("cgroup.subtree_control"), "memory").unwrap();
        let group = Cgroup::create(Hierarchy::V2(v2.clone()), "vm1", &limits).unwrap();
        let read = |p: PathBuf| std::fs::read_to_string(p).unwrap();
        // Only what was missing is enabled.
        assert_eq!(read(v2.join("cgroup.subtree_control")), "+cpu +pids");
        assert_eq!(read(v2.join("vmm/cgroup.subtree_control")), "+cpu +memory +pids");
        let dir = v2.join("vmm/vm1");
        assert_eq!(group.dirs().collect::<Vec<_>>(), [dir.as_path()]);
        assert_eq!(read(dir.join("cpu.max")), "200000 100000");
        assert_eq!(read(dir.join("memory.max")), "1073741824");
        assert_eq!(read(dir.join("pids.max")), "32");
        group.add(4242).unwrap();
        assert_eq!(read(dir.join("cgroup.procs")), "4242");
        // A group holding a process is in use.
        let err = Cgroup::create(Hierarchy::V2(v2.clone()), "vm1", &limits).unwrap_err();
        assert!(matches!(err, CgroupError::InUse(_)), "{err}");

        let v1 = base.join("v1");
        let group = Cgroup::create(Hierarchy::V1(v1.clone()), "vm1", &limits).unwrap();
        let dirs: Vec<PathBuf> = group.dirs().map(Path::to_path_buf).collect();
        assert_eq!(
            dirs,
            ["cpu", "memory", "pids"].map(|c| v1.join(c).join("vmm/vm1"))
        );
        assert_eq!(read(v1.join("cpu/vmm/vm1/cpu.cfs_quota_us")), "200000");
        assert_eq!(
            read(v1.join("memory/vmm/vm1/memory.limit_in_bytes")),
            "1073741824"
        );
        assert_eq!(read(v1.join("pids/vmm/vm1/pids.max")), "32");
        group.add(7).unwrap();
        for c in ["cpu", "memory", "pids"] {
            assert_eq!(read(v1.join(c).join("vmm/vm1/cgroup.procs")), "7");
        }
        std::fs::remove_dir_all(&base).unwrap();
    }

    #[test]
    fn detects_the_hierarchy_from_its_files() {
        let base = std::env::temp_dir().join(format!("vmm-cgroup-detect-{}", std::process::id()));
        let v2 = base.join("v2");
        std::fs::create_dir_all(&v2).unwrap();
        std::fs::write(v2.join("cgroup.controllers"), "cpuset cpu io memory pids\n").unwrap();
        assert_eq!(Hierarchy::detect_in(&v2).unwrap(), Hierarchy::V2(v2.clone()));

        // A cgroup2 without cpu and memory (the hybrid layout's "unified") falls back to v1.
        let v1 = base.join("v1");
        std::fs::create_dir_all(&v1).unwrap();
        std::fs::write(v1.join("cgroup.controllers"), "").unwrap();
        for c in CONTROLLERS {
            std::fs::create_dir_all(v1.join(c)).unwrap();
            std::fs::write(v1.join(c).join("cgroup.procs"), "").unwrap();
        }
        assert_eq!(Hierarchy::detect_in(&v1).unwrap(), Hierarchy::V1(v1.clone()));
        std::fs::remove_dir_all(v1.join("pids")).unwrap();
        let err = Hierarchy::detect_in(&v1).unwrap_err().to_string();
        assert!(err.contains("v1 controllers pids"), "{err}");
        std::fs::remove_dir_all(&base).unwrap();
    }
}
