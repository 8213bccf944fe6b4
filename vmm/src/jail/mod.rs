//! The jailed start mode (`vmm --jail DIR --uid N --gid N ...`): the VMM confines itself before it
//! builds the VM.
//!
//! [`enter`] runs early in `main`, while the process is still single-threaded. It lays out the
//! per-VM directory, creates the cgroup, and forks:
//!
//! - the **launcher** (the original process) stays outside, forwards SIGTERM/SIGINT/SIGHUP/SIGQUIT to
//!   the VMM, waits for it, removes what it created (cgroup, mount points, device directory) and
//!   exits with the VMM's exit code;
//! - the **VMM** (the child) is PID 1 of a new PID namespace; it waits until the launcher has put it
//!   in the cgroup, enters new mount, IPC, UTS and network namespaces, bind-mounts the kernel, initrd
//!   and drives into the directory, `pivot_root`s into it, drops to the jail uid/gid with no
//!   capabilities and `no_new_privs`, and returns to `main`, which builds the VM from the rewritten
//!   configuration as usual.
//!
//! No `exec` happens inside the jail: the binary is dynamically linked, and the jail holds no loader
//! or libraries. `docs/jail.md` lists every step and what it stops.
//!
//! Descriptors inherited with `--fd` (already taken and close-on-exec, see
//! [`crate::inherited_fds`]) go to the VMM: the fork copies them, the launcher closes its copies at
//! once, and the child carries them through every step (see `launcher::fork_jailed`). They are how
//! a jailed VMM gets what it must not open itself: a tap in another network namespace, an image
//! that is not bound into the jail.

pub mod cgroup;
mod fs;
mod launcher;
pub mod layout;
mod namespaces;
mod privileges;

use std::path::PathBuf;

use vmm_api::VmConfig;

use crate::cli::{CliError, RunOptions};
use crate::device_manager::PassedFds;

pub use cgroup::{CgroupError, CpuLimit};
pub use layout::{JailLayout, LayoutError};

/// Default `RLIMIT_NOFILE` in the jail: the VMM needs a few fds per device and per control client.
pub const DEFAULT_NOFILE: u64 = 1024;
/// Default `pids.max` of the VM's cgroup: vCPU threads, the main thread and I/O helpers fit well below.
pub const DEFAULT_PIDS_LIMIT: u64 = 128;
/// Least memory, beyond guest RAM, that `--memory-limit-mib` must leave for the VMM itself (its
/// binary, heap, stacks, io_uring rings, page tables, and the page cache its disk I/O is charged;
/// its resident overhead measured about 3 MiB with a 128 MiB guest, see docs/jail.md).
pub const MIN_VMM_OVERHEAD_MIB: u64 = 32;

/// Everything `--jail` asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JailConfig {
    /// The per-VM directory: absolute, absent or empty; it becomes the VMM's root.
    pub dir: PathBuf,
    /// Names the VM's cgroup (`vmm/<id>`) and the jail's hostname.
    pub id: String,
    /// The uid the VMM runs as (never 0).
    pub uid: u32,
    /// The gid the VMM runs as (never 0).
    pub gid: u32,
    /// A network namespace to join (e.g. `/run/netns/vm1`) instead of a new, empty one.
    pub netns: Option<PathBuf>,
    /// CPU bandwidth limit.
    pub cpu_limit: Option<CpuLimit>,
    /// Memory limit of the cgroup, in MiB (guest RAM plus the VMM's own memory).
    pub memory_limit_mib: Option<u64>,
    /// `pids.max` of the cgroup.
    pub pids_limit: u64,
    /// `RLIMIT_NOFILE`.
    pub nofile: u64,
    /// Host files and directories shown read-only at their own paths in the jail
    /// (`--jail-mirror`): what a VM that arrives after the start names by host path (a snapshot's
    /// directory and those it builds on, a base image).
    pub mirrors: Vec<PathBuf>,
}

/// Why the jail could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum JailError {
    /// The jail's paths or the configuration do not fit together.
    #[error(transparent)]
    Layout(#[from] LayoutError),
    /// `--memory-limit-mib` leaves too little room.
    #[error(
        "--memory-limit-mib {limit} is too small for {guest} MiB of guest memory: give at least {min} \
         (guest memory plus {MIN_VMM_OVERHEAD_MIB} MiB for the VMM)"
    )]
    MemoryLimitTooSmall {
        /// The limit asked for.
        limit: u64,
        /// Guest memory.
        guest: u64,
        /// The least acceptable limit.
        min: u64,
    },
    /// A file or directory operation failed.
    #[error("jail: {what} {path}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// On which path.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// A file the VMM needs cannot be used by the jail uid.
    #[error("jail: {what} {path} {reason}")]
    Access {
        /// Which file ("kernel", "drive data").
        what: String,
        /// Its path.
        path: String,
        /// What is wrong.
        reason: String,
    },
    /// The cgroup could not be set up.
    #[error(transparent)]
    Cgroup(#[from] CgroupError),
    /// A system call failed.
    #[error("jail: {what}: {source}")]
    Sys {
        /// Which step.
        what: &'static str,
        /// Why.
        source: std::io::Error,
    },
    /// A check after dropping privileges failed: the process is not as confined as it should be.
    #[error("jail: {0}")]
    NotConfined(String),
}

impl JailError {
    fn sys(what: &'static str) -> Self {
        JailError::Sys {
            what,
            source: std::io::Error::last_os_error(),
        }
    }

    fn io(what: &'static str, path: &std::path::Path, source: std::io::Error) -> Self {
        JailError::Io {
            what,
            path: path.display().to_string(),
            source,
        }
    }
}

/// What [`enter`] leaves `main` to do.
#[derive(Debug)]
pub enum Entered {
    /// This process is the VMM: build and run this VM (paths rewritten to the jail's when jailed),
    /// or, without one, wait for it on the control socket; with these inherited descriptors.
    Vmm(Option<Box<VmConfig>>, RunOptions, PassedFds),
    /// This process was the launcher of a jailed VMM that has ended: exit with this code.
    Launcher(i32),
}

/// Confines the process as `options.jail` asks, or does nothing without `--jail`.
///
/// Without a configuration (the empty start mode) the jail holds only the mirrors: the VM that
/// comes over the control socket (a snapshot restore, an incoming migration, a `configure`) gets
/// its disks and taps as descriptors (`--fd`, `add-fds`) and finds the rest at mirrored host paths,
/// so what it records names host paths as it is.
///
/// Must be called while the process is single-threaded (it forks). In the jailed VMM it returns
/// [`Entered::Vmm`] with the configuration rewritten to in-jail paths and the inherited descriptors
/// `fds`; in the launcher, which closes its copies of `fds` as soon as it has forked, it returns
/// [`Entered::Launcher`] once the VMM has exited and the launcher has cleaned up.
pub fn enter(config: Option<VmConfig>, options: RunOptions, fds: PassedFds) -> Result<Entered, JailError> {
    let Some(jail) = options.jail.clone() else {
        return Ok(Entered::Vmm(config.map(Box::new), options, fds));
    };
    if let Some(config) = &config {
        check_memory_limit(&jail, config)?;
    }
    let layout = JailLayout::plan(&jail, config.as_ref(), options.api_sock.as_deref())?;
    let options = RunOptions {
        host_config: config.map(Box::new),
        ..options
    };
    launcher::launch(&jail, layout, options, fds)
}

fn check_memory_limit(jail: &JailConfig, config: &VmConfig) -> Result<(), JailError> {
    let guest = config.machine.memory_mib;
    let min = guest.saturating_add(MIN_VMM_OVERHEAD_MIB);
    match jail.memory_limit_mib {
        Some(limit) if limit < min => Err(JailError::MemoryLimitTooSmall { limit, guest, min }),
        _ => Ok(()),
    }
}

/// The jail flags as given on the command line, before validation. `cli.rs` offers every flag it
/// does not know to [`JailFlags::slot`].
#[derive(Debug, Default)]
pub struct JailFlags {
    dir: Option<String>,
    id: Option<String>,
    uid: Option<String>,
    gid: Option<String>,
    netns: Option<String>,
    cpu_limit: Option<String>,
    memory_limit_mib: Option<String>,
    pids_limit: Option<String>,
    nofile: Option<String>,
    /// `--jail-mirror`, repeatable: `cli.rs` adds to it.
    pub(crate) mirrors: Vec<String>,
}

impl JailFlags {
    /// The storage for a jail flag, or `None` if `flag` is not one.
    pub fn slot(&mut self, flag: &str) -> Option<&mut Option<String>> {
        Some(match flag {
            "--jail" => &mut self.dir,
            "--jail-id" => &mut self.id,
            "--uid" => &mut self.uid,
            "--gid" => &mut self.gid,
            "--netns" => &mut self.netns,
            "--cpu-limit" => &mut self.cpu_limit,
            "--memory-limit-mib" => &mut self.memory_limit_mib,
            "--pids-limit" => &mut self.pids_limit,
            "--nofile" => &mut self.nofile,
            _ => return None,
        })
    }

    /// Validates the flags: `None` without `--jail` (and then no other jail flag may be given).
    pub fn into_config(self) -> Result<Option<Box<JailConfig>>, CliError> {
        let Some(dir) = self.dir else {
            let others = [
                ("--jail-id", &self.id),
                ("--uid", &self.uid),
                ("--gid", &self.gid),
                ("--netns", &self.netns),
                ("--cpu-limit", &self.cpu_limit),
                ("--memory-limit-mib", &self.memory_limit_mib),
                ("--pids-limit", &self.pids_limit),
                ("--nofile", &self.nofile),
            ];
            let mirror = (!self.mirrors.is_empty()).then_some("--jail-mirror");
            return match others
                .iter()
                .find(|(_, v)| v.is_some())
                .map(|(f, _)| *f)
                .or(mirror)
            {
                Some(flag) => Err(CliError::MissingValue(format!("{flag} (it needs --jail DIR)"))),
                None => Ok(None),
            };
        };
        let bad = |flag: &str, value: &str, reason: String| CliError::BadValue {
            flag: flag.to_string(),
            value: value.to_string(),
            reason,
        };
        let dir_path = PathBuf::from(&dir);
        layout::check_jail_dir(&dir_path).map_err(|e| bad("--jail", &dir, e.to_string()))?;
        let id = match self.id {
            Some(id) => id,
            None => dir_path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
        };
        if !layout::is_safe_name(&id) {
            return Err(bad(
                "--jail-id",
                &id,
                "the VM id must be 1-64 of A-Z a-z 0-9 _ - (it defaults to DIR's last component)".into(),
            ));
        }
        let id_number = |flag: &str, value: Option<String>| -> Result<u32, CliError> {
            let value = value.ok_or_else(|| CliError::MissingValue(format!("{flag} (--jail needs it)")))?;
            match value.parse::<u32>() {
                Ok(0) => Err(bad(
                    flag,
                    &value,
                    "must not be 0: the jailed VMM never runs as root".into(),
                )),
                Ok(u32::MAX) => Err(bad(flag, &value, "-1 is not an id".into())),
                Ok(n) => Ok(n),
                Err(e) => Err(bad(flag, &value, e.to_string())),
            }
        };
        let positive = |flag: &str, value: Option<String>, default: u64| -> Result<u64, CliError> {
            match value {
                None => Ok(default),
                Some(v) => match v.parse::<u64>() {
                    Ok(0) => Err(bad(flag, &v, "must be at least 1".into())),
                    Ok(n) if n > 1 << 40 => Err(bad(flag, &v, "is too large".into())),
                    Ok(n) => Ok(n),
                    Err(e) => Err(bad(flag, &v, e.to_string())),
                },
            }
        };
        let netns = match self.netns {
            Some(p) if !p.starts_with('/') => {
                return Err(bad(
                    "--netns",
                    &p,
                    "must be an absolute path such as /run/netns/NAME".into(),
                ))
            }
            p => p.map(PathBuf::from),
        };
        let cpu_limit = self
            .cpu_limit
            .map(|v| CpuLimit::parse(&v).map_err(|reason| bad("--cpu-limit", &v, reason)))
            .transpose()?;
        let memory_limit_mib = match self.memory_limit_mib {
            Some(v) => Some(positive("--memory-limit-mib", Some(v), 0)?),
            None => None,
        };
        Ok(Some(Box::new(JailConfig {
            dir: dir_path,
            id,
            uid: id_number("--uid", self.uid)?,
            gid: id_number("--gid", self.gid)?,
            netns,
            cpu_limit,
            memory_limit_mib,
            pids_limit: positive("--pids-limit", self.pids_limit, DEFAULT_PIDS_LIMIT)?,
            nofile: positive("--nofile", self.nofile, DEFAULT_NOFILE)?,
            // Checked with the layout, which knows the paths the jail keeps for itself.
            mirrors: self.mirrors.into_iter().map(PathBuf::from).collect(),
        })))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flags(args: &[(&str, &str)]) -> Result<Option<Box<JailConfig>>, CliError> {
        let mut f = JailFlags::default();
        for (k, v) in args {
            *f.slot(k).expect("a jail flag") = Some(v.to_string());
        }
        f.into_config()
    }

    #[test]
    fn jail_flags_parse_with_defaults() {
        let c = flags(&[
            ("--jail", "/srv/jail/vm-1"),
            ("--uid", "123456"),
            ("--gid", "123457"),
        ])
        .unwrap()
        .unwrap();
        assert_eq!(c.dir, PathBuf::from("/srv/jail/vm-1"));
        assert_eq!(c.id, "vm-1");
        assert_eq!((c.uid, c.gid), (123456, 123457));
        assert_eq!((c.pids_limit, c.nofile), (DEFAULT_PIDS_LIMIT, DEFAULT_NOFILE));
        assert_eq!((c.cpu_limit, c.memory_limit_mib, c.netns), (None, None, None));

        let c = flags(&[
            ("--jail", "/j/x"),
            ("--jail-id", "vm_2"),
            ("--uid", "1"),
            ("--gid", "2"),
            ("--netns", "/run/netns/vm2"),
            ("--cpu-limit", "1.5"),
            ("--memory-limit-mib", "300"),
            ("--pids-limit", "64"),
            ("--nofile", "256"),
        ])
        .unwrap()
        .unwrap();
        assert_eq!(c.id, "vm_2");
        assert_eq!(c.cpu_limit, Some(CpuLimit::parse("1.5").unwrap()));
        assert_eq!(c.memory_limit_mib, Some(300));
        assert_eq!((c.pids_limit, c.nofile), (64, 256));
        assert_eq!(c.netns, Some(PathBuf::from("/run/netns/vm2")));
        assert!(flags(&[]).unwrap().is_none());
    }

    #[test]
    fn bad_jail_flags_are_clear_errors() {
        let base = [("--jail", "/j/vm"), ("--uid", "10"), ("--gid", "10")];
        let with = |extra: (&'static str, &'static str)| {
            let mut v: Vec<_> = base.iter().copied().filter(|(k, _)| *k != extra.0).collect();
            v.push(extra);
            flags(&v).unwrap_err().to_string()
        };
        let cases = [
            (with(("--uid", "0")), "must not be 0"),
            (with(("--gid", "0")), "must not be 0"),
            (with(("--uid", "-5")), "invalid value '-5' for --uid"),
            (with(("--jail", "jails/vm")), "must be absolute"),
            (with(("--jail", "/j/../etc")), "'..'"),
            (with(("--jail", "/")), "must not be /"),
            (with(("--jail-id", "a/b")), "the VM id must be"),
            (with(("--jail-id", "..")), "the VM id must be"),
            (with(("--cpu-limit", "0")), "--cpu-limit"),
            (with(("--cpu-limit", "lots")), "--cpu-limit"),
            (with(("--memory-limit-mib", "0")), "must be at least 1"),
            (with(("--netns", "vm1")), "absolute"),
            (flags(&[("--jail", "/j/vm")]).unwrap_err().to_string(), "--uid"),
            (
                flags(&[("--uid", "5")]).unwrap_err().to_string(),
                "--uid (it needs --jail DIR)",
            ),
        ];
        for (err, expected) in cases {
            assert!(err.contains(expected), "{err} should mention {expected}");
        }
    }

    #[test]
    fn the_command_line_carries_the_jail() {
        let args = "--kernel /k --jail=/j/vm --uid 5 --gid 6 --cpu-limit 0.5 --api-sock /j/vm/run/a.sock";
        let parsed = crate::cli::parse(args.split_whitespace().map(String::from)).unwrap();
        let crate::cli::Command::Run(_, options) = parsed else {
            panic!("expected run")
        };
        let jail = options.jail.unwrap();
        assert_eq!((jail.id.as_str(), jail.uid, jail.gid), ("vm", 5, 6));
        assert_eq!(jail.cpu_limit.map(|c| c.quota_us), Some(50_000));
        // The empty start mode, jailed, with mirrors (repeatable, either spelling).
        let args =
            "--api-sock /j/vm/run/a.sock --jail /j/vm --uid 5 --gid 6 --jail-mirror /a --jail-mirror=/b/c";
        let parsed = crate::cli::parse(args.split_whitespace().map(String::from)).unwrap();
        let crate::cli::Command::Run(None, options) = parsed else {
            panic!("expected an empty start")
        };
        let mirrors = options.jail.unwrap().mirrors;
        assert_eq!(mirrors, [PathBuf::from("/a"), PathBuf::from("/b/c")]);
        let err = crate::cli::parse("--kernel /k --uid 5".split_whitespace().map(String::from)).unwrap_err();
        assert!(err.to_string().contains("--uid (it needs --jail DIR)"), "{err}");
        let err = crate::cli::parse(
            "--kernel /k --jail /j --jail /k"
                .split_whitespace()
                .map(String::from),
        )
        .unwrap_err();
        assert!(err.to_string().contains("--jail given more than once"), "{err}");
    }

    #[test]
    fn memory_limit_must_hold_guest_memory_and_overhead() {
        let mut jail = flags(&[("--jail", "/j/vm"), ("--uid", "10"), ("--gid", "10")])
            .unwrap()
            .unwrap();
        let config =
            VmConfig::from_json(r#"{"boot": {"kernel": "/k"}, "machine": {"vcpus": 1, "memory_mib": 256}}"#)
                .unwrap();
        jail.memory_limit_mib = Some(256);
        let err = check_memory_limit(&jail, &config).unwrap_err().to_string();
        assert!(err.contains("give at least 288"), "{err}");
        jail.memory_limit_mib = Some(288);
        check_memory_limit(&jail, &config).unwrap();
        jail.memory_limit_mib = None;
        check_memory_limit(&jail, &config).unwrap();
    }
}
