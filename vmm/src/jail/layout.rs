//! What goes where in the per-VM directory, and the configuration rewritten to in-jail paths. Pure:
//! nothing here touches the file system, so every rule is unit-tested.
//!
//! ```text
//! DIR/                 root:root 0755   the VMM's / after pivot_root
//!   boot/kernel        bind mount of the kernel (read-only)
//!   boot/initrd        bind mount of the initrd (read-only)
//!   drives/<id>        bind mount of each drive image (read-only unless the drive is writable)
//!   drives/<id>.base   bind mount of a copy-on-write drive's base image (`backing`), read-only
//!   <host path>        --jail-mirror: a host file or directory at its own path, read-only (what a
//!                      VM that arrives later, by snapshot restore or migration, names by host path)
//!   dev/               a private tmpfs in the jail: kvm, net/tun, owned by the jail uid
//!   proc/              the jail's own procfs (subset=pid: only its own processes)
//!   <dirs>/<socket>    --api-sock: its directory is owned by the jail uid (bind creates the socket)
//!   <dirs>/<log>       --serial file:, created empty and owned by the jail uid
//! ```

use std::ffi::OsStr;
use std::path::{Component, Path, PathBuf};

use vmm_api::{SerialConfig, VmConfig};

use super::JailConfig;

/// Top-level names of the layout that `--api-sock` and the serial log may not use.
pub const RESERVED: [&str; 4] = ["boot", "drives", "dev", "proc"];

/// Why the jail's paths do not work.
#[derive(Debug, thiserror::Error)]
pub enum LayoutError {
    /// The jail directory is unusable.
    #[error("jail directory {path}: {reason}")]
    Dir {
        /// The directory.
        path: String,
        /// What is wrong.
        reason: &'static str,
    },
    /// A path the VMM creates (socket, serial log) is not where the jail can reach it.
    #[error(
        "with --jail, {what} {path} must be an absolute path in a directory under the jail directory {dir} \
         (e.g. {dir}/run/{example}), outside {}",
        RESERVED.join(", ")
    )]
    Outside {
        /// Which path.
        what: &'static str,
        /// The path given.
        path: String,
        /// The jail directory.
        dir: String,
        /// An example file name.
        example: &'static str,
    },
    /// The socket and the serial log are the same file.
    #[error("--api-sock and the serial log file are both {0}")]
    Clash(String),
    /// A `--jail-mirror` path the jail cannot show at its own path.
    #[error("--jail-mirror {path}: {reason}")]
    Mirror {
        /// The path given.
        path: String,
        /// What is wrong.
        reason: String,
    },
}

/// What a bound file may be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourceKind {
    /// A regular file (the kernel, the initrd, a base image, whose size is read from its metadata).
    File,
    /// A regular file or a block device (a drive's image).
    FileOrDevice,
    /// A regular file or a directory (a mirror: a snapshot's directory, say).
    FileOrDir,
}

/// A host file the jail sees through a bind mount.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BoundFile {
    /// What it is, for error messages: "kernel", "initrd", "drive ID", "base of drive ID",
    /// "--jail-mirror".
    pub what: String,
    /// The host path from the configuration.
    pub source: PathBuf,
    /// Where the jail sees it, relative to the jail directory (e.g. `drives/data`).
    pub target: PathBuf,
    /// Whether the VMM opens it for writing; read-only files are mounted read-only. Only writable
    /// files are chowned to the jail uid while it runs: a read-only one (a base image many VMs
    /// share) keeps its owner.
    pub writable: bool,
    /// What it may be.
    pub kind: SourceKind,
}

/// Who owns a directory the launcher creates in the jail.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Owner {
    /// root, mode 0755: the jailed VMM can read but not change it.
    Root,
    /// The jail uid/gid, mode 0750: the VMM creates its control socket there.
    Jail,
}

/// The per-VM directory's contents and the configuration as the jailed VMM sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JailLayout {
    /// The jail directory on the host.
    pub dir: PathBuf,
    /// The VM configuration with every path rewritten to its in-jail path (none in the empty
    /// start mode: the VM comes later, over the control socket).
    pub config: Option<VmConfig>,
    /// The control socket's in-jail path.
    pub api_sock: Option<PathBuf>,
    /// Files bind-mounted into the jail.
    pub files: Vec<BoundFile>,
    /// Directories to create, relative to the jail directory, parents first.
    pub dirs: Vec<(PathBuf, Owner)>,
    /// The serial log to create (relative), owned by the jail uid.
    pub serial_log: Option<PathBuf>,
}

impl JailLayout {
    /// Plans the jail for `config` (none: the empty start mode); `api_sock` is the host path given
    /// with `--api-sock`.
    pub fn plan(
        jail: &JailConfig,
        config: Option<&VmConfig>,
        api_sock: Option<&Path>,
    ) -> Result<Self, LayoutError> {
        check_jail_dir(&jail.dir)?;
        let mut layout = JailLayout {
            dir: jail.dir.clone(),
            config: None,
            api_sock: None,
            files: Vec::new(),
            dirs: vec![
                (PathBuf::from("boot"), Owner::Root),
                (PathBuf::from("dev"), Owner::Root),
                (PathBuf::from("proc"), Owner::Root),
            ],
            serial_log: None,
        };
        if let Some(config) = config {
            layout.config = Some(layout.bind_config(config));
        }
        let sock = api_sock
            .map(|p| inside(&jail.dir, p, "--api-sock", "api.sock"))
            .transpose()?;
        let log = match config.map(|c| &c.serial) {
            Some(SerialConfig::File(p)) => Some(inside(&jail.dir, p, "the serial log file", "serial.log")?),
            _ => None,
        };
        if let (Some(s), Some(l)) = (&sock, &log) {
            if s == l {
                return Err(LayoutError::Clash(jail.dir.join(s).display().to_string()));
            }
        }
        for (file, owner) in [(&log, Owner::Root), (&sock, Owner::Jail)] {
            if let Some(parent) = file.as_deref().and_then(Path::parent) {
                layout.add_dirs(parent, owner);
            }
        }
        let taken: Vec<&Path> = [&sock, &log]
            .into_iter()
            .flatten()
            .map(PathBuf::as_path)
            .collect();
        layout.add_mirrors(&jail.mirrors, &taken)?;
        if let (Some(l), Some(c)) = (&log, &mut layout.config) {
            c.serial = SerialConfig::File(Path::new("/").join(l));
        }
        layout.serial_log = log;
        layout.api_sock = sock.map(|s| Path::new("/").join(s));
        Ok(layout)
    }

    /// Adds a bind mount of `source` at `target` (relative); returns its in-jail path.
    fn bind(
        &mut self,
        what: String,
        source: &Path,
        target: PathBuf,
        writable: bool,
        kind: SourceKind,
    ) -> PathBuf {
        let in_jail = Path::new("/").join(&target);
        self.files.push(BoundFile {
            what,
            source: source.to_path_buf(),
            target,
            writable,
            kind,
        });
        in_jail
    }

    /// Binds the kernel, initrd, drives and base images of `config`; returns it with their
    /// in-jail paths.
    fn bind_config(&mut self, config: &VmConfig) -> VmConfig {
        let mut rewritten = config.clone();
        rewritten.boot.kernel = self.bind(
            "kernel".into(),
            &config.boot.kernel,
            "boot/kernel".into(),
            false,
            SourceKind::File,
        );
        if let Some(initrd) = &config.boot.initrd {
            rewritten.boot.initrd = Some(self.bind(
                "initrd".into(),
                initrd,
                "boot/initrd".into(),
                false,
                SourceKind::File,
            ));
        }
        // A drive given as a descriptor (`fd`, from `--fd`) has no path: the VMM holds its image
        // already, and nothing is bound for it. Its base, if it has one, is a path like any other
        // drive's base, and is bound.
        if config
            .drives
            .iter()
            .any(|d| d.fd.is_none() || d.backing.is_some())
        {
            self.dirs.push((PathBuf::from("drives"), Owner::Root));
        }
        for (drive, out) in config.drives.iter().zip(rewritten.drives.iter_mut()) {
            // Drive ids are validated names (A-Z a-z 0-9 _ -), safe as file names.
            if drive.fd.is_none() {
                out.path = self.bind(
                    format!("drive {}", drive.id),
                    &drive.path,
                    Path::new("drives").join(&drive.id),
                    !drive.read_only,
                    SourceKind::FileOrDevice,
                );
            }
            if let Some(base) = &drive.backing {
                // A drive id cannot hold a '.', so `<id>.base` never names another drive's image.
                // Read-only whatever the drive is: the VMM only reads a base, and other VMs share
                // it, so it is mounted read-only and never chowned to the jail uid.
                out.backing = Some(self.bind(
                    format!("base of drive {}", drive.id),
                    base,
                    Path::new("drives").join(format!("{}.base", drive.id)),
                    false,
                    SourceKind::File,
                ));
            }
        }
        rewritten
    }

    /// Adds `dir` (relative) and the directories above it: `dir` owned by `owner`, the others by
    /// root. The socket's directory wins over the log's: the VMM must create the socket there.
    fn add_dirs(&mut self, dir: &Path, owner: Owner) {
        let mut chain: Vec<&Path> = dir.ancestors().filter(|a| !a.as_os_str().is_empty()).collect();
        chain.reverse();
        let last = chain.len().saturating_sub(1);
        for (i, a) in chain.into_iter().enumerate() {
            let want = if i == last { owner } else { Owner::Root };
            match self.dirs.iter_mut().find(|(d, _)| d == a) {
                Some(entry) if want == Owner::Jail => entry.1 = Owner::Jail,
                Some(_) => {}
                None => self.dirs.push((a.to_path_buf(), want)),
            }
        }
    }

    /// Binds each mirror read-only at its own path. A mirror may not lie under the jail's own
    /// names (`RESERVED`) or share a top directory with the socket or the serial log (`taken`,
    /// relative), which the jail uid may own; nor may one mirror hold another (its mount point
    /// would have to be made inside a read-only bind).
    fn add_mirrors(&mut self, mirrors: &[PathBuf], taken: &[&Path]) -> Result<(), LayoutError> {
        for (i, mirror) in mirrors.iter().enumerate() {
            let refuse = |reason: String| LayoutError::Mirror {
                path: mirror.display().to_string(),
                reason,
            };
            let rel = mirror
                .strip_prefix("/")
                .ok()
                .filter(|r| is_normal(mirror) && !r.as_os_str().is_empty())
                .ok_or_else(|| refuse("must be an absolute, normalized path other than /".into()))?;
            let top = rel.components().next().map(|c| c.as_os_str());
            if RESERVED.iter().any(|r| top == Some(OsStr::new(r))) {
                return Err(refuse(format!(
                    "lies under /{}, which the jail itself uses",
                    top.unwrap_or_default().to_string_lossy()
                )));
            }
            if let Some(t) = taken
                .iter()
                .find(|t| t.components().next().map(|c| c.as_os_str()) == top)
            {
                return Err(refuse(format!(
                    "shares its top directory with {}, which the jail creates",
                    self.dir.join(t).display()
                )));
            }
            if let Some(other) = mirrors[..i]
                .iter()
                .find(|o| o.starts_with(mirror) || mirror.starts_with(o))
            {
                return Err(refuse(format!("overlaps --jail-mirror {}", other.display())));
            }
            if let Some(parent) = rel.parent() {
                self.add_dirs(parent, Owner::Root);
            }
            self.bind(
                "--jail-mirror".into(),
                mirror,
                rel.to_path_buf(),
                false,
                SourceKind::FileOrDir,
            );
        }
        Ok(())
    }
}

/// Checks that `dir` is usable as a jail directory by its name alone: absolute, normalized, not `/`.
pub fn check_jail_dir(dir: &Path) -> Result<(), LayoutError> {
    let err = |reason| LayoutError::Dir {
        path: dir.display().to_string(),
        reason,
    };
    if !dir.is_absolute() {
        return Err(err("must be absolute"));
    }
    if !is_normal(dir) {
        return Err(err(
            "must be a normalized path (no '.', '..', '//' or trailing '/')",
        ));
    }
    if dir.parent().is_none() {
        return Err(err("must not be /"));
    }
    Ok(())
}

/// Whether `path` is written without `.`, `..`, repeated or trailing slashes.
fn is_normal(path: &Path) -> bool {
    let rebuilt: PathBuf = path.components().collect();
    path.components()
        .all(|c| matches!(c, Component::RootDir | Component::Normal(_)))
        && rebuilt.as_os_str() == path.as_os_str()
}

/// A VM id: 1-64 of `A-Z a-z 0-9 _ -` (a file name, a cgroup name and a hostname alike).
pub fn is_safe_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// `path` relative to `dir`, if it is a file in a non-reserved subdirectory of `dir`.
fn inside(
    dir: &Path,
    path: &Path,
    what: &'static str,
    example: &'static str,
) -> Result<PathBuf, LayoutError> {
    let outside = || LayoutError::Outside {
        what,
        path: path.display().to_string(),
        dir: dir.display().to_string(),
        example,
    };
    if !path.is_absolute() || !is_normal(path) {
        return Err(outside());
    }
    let rel = path.strip_prefix(dir).map_err(|_| outside())?;
    let mut components = rel.components();
    let first = components.next().ok_or_else(outside)?;
    if components.next().is_none() || RESERVED.iter().any(|r| first.as_os_str() == OsStr::new(r)) {
        return Err(outside());
    }
    Ok(rel.to_path_buf())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn jail(dir: &str) -> JailConfig {
        JailConfig {
            dir: dir.into(),
            id: "vm".into(),
            uid: 1000,
            gid: 1000,
            netns: None,
            cpu_limit: None,
            memory_limit_mib: None,
            pids_limit: 16,
            nofile: 64,
            mirrors: Vec::new(),
        }
    }

    fn config(serial: &str) -> VmConfig {
        VmConfig::from_json(&format!(
            r#"{{"boot": {{"kernel": "/img/vmlinux", "initrd": "rel/initrd.img"}}, "serial": {serial},
                "drives": [{{"id": "root", "path": "/img/rootfs.ext4", "root": true, "read_only": true}},
                           {{"id": "data", "path": "/var/data.img"}}]}}"#
        ))
        .unwrap()
    }

    #[test]
    fn rewrites_every_path_to_the_jail() {
        let plan = JailLayout::plan(
            &jail("/srv/jail/vm"),
            Some(&config(r#"{"file": "/srv/jail/vm/log/console.log"}"#)),
            Some(Path::new("/srv/jail/vm/run/api.sock")),
        )
        .unwrap();
        let c = plan.config.as_ref().unwrap();
        assert_eq!(c.boot.kernel, PathBuf::from("/boot/kernel"));
        assert_eq!(c.boot.initrd, Some(PathBuf::from("/boot/initrd")));
        assert_eq!(c.drives[0].path, PathBuf::from("/drives/root"));
        assert_eq!(c.drives[1].path, PathBuf::from("/drives/data"));
        assert_eq!(c.serial, SerialConfig::File("/log/console.log".into()));
        assert_eq!(plan.api_sock, Some(PathBuf::from("/run/api.sock")));
        assert_eq!(plan.serial_log, Some(PathBuf::from("log/console.log")));
        let files: Vec<_> = plan
            .files
            .iter()
            .map(|f| (f.source.to_str().unwrap(), f.target.to_str().unwrap(), f.writable))
            .collect();
        assert_eq!(
            files,
            [
                ("/img/vmlinux", "boot/kernel", false),
                ("rel/initrd.img", "boot/initrd", false),
                ("/img/rootfs.ext4", "drives/root", false),
                ("/var/data.img", "drives/data", true),
            ]
        );
        let dirs: Vec<_> = plan.dirs.iter().map(|(d, o)| (d.to_str().unwrap(), *o)).collect();
        assert_eq!(
            dirs,
            [
                ("boot", Owner::Root),
                ("dev", Owner::Root),
                ("proc", Owner::Root),
                ("drives", Owner::Root),
                ("log", Owner::Root),
                ("run", Owner::Jail),
            ]
        );
        // Everything else is kept.
        assert_eq!(c.drives[0].id, "root");
        assert!(c.drives[0].read_only && c.drives[0].root);
        assert_eq!(c.machine, config("\"off\"").machine);
    }

    #[test]
    fn descriptors_are_not_bound() {
        // Taps and images passed as descriptors (`--fd`) are already open: nothing to bind.
        let config = VmConfig::from_json(
            r#"{"boot": {"kernel": "/img/vmlinux"},
                "drives": [{"id": "data", "fd": "disk"}],
                "nets": [{"id": "eth0", "fd": "tap0"}]}"#,
        )
        .unwrap();
        let plan = JailLayout::plan(&jail("/j/vm"), Some(&config), None).unwrap();
        let targets: Vec<_> = plan.files.iter().map(|f| f.target.to_str().unwrap()).collect();
        assert_eq!(targets, ["boot/kernel"]);
        assert!(!plan.dirs.iter().any(|(d, _)| d == Path::new("drives")));
        assert_eq!(plan.config.as_ref().unwrap().drives, config.drives);
        assert_eq!(plan.config.as_ref().unwrap().nets, config.nets);
    }

    #[test]
    fn base_images_are_bound_read_only_beside_their_drive() {
        let config = VmConfig::from_json(
            r#"{"boot": {"kernel": "/img/vmlinux"},
                "drives": [{"id": "root", "path": "/vm/root.img", "backing": "/images/base.img", "root": true},
                           {"id": "ro", "path": "/vm/ro.img", "backing": "/images/base.img", "read_only": true},
                           {"id": "plain", "path": "/vm/plain.img"},
                           {"id": "passed", "fd": "disk", "backing": "/images/other.img"},
                           {"id": "passed2", "fd": "disk2"}]}"#,
        )
        .unwrap();
        let plan = JailLayout::plan(&jail("/j/vm"), Some(&config), None).unwrap();
        let files: Vec<_> = plan
            .files
            .iter()
            .map(|f| {
                (
                    f.what.as_str(),
                    f.source.to_str().unwrap(),
                    f.target.to_str().unwrap(),
                    f.writable,
                    f.kind == SourceKind::FileOrDevice,
                )
            })
            .collect();
        assert_eq!(
            files,
            [
                ("kernel", "/img/vmlinux", "boot/kernel", false, false),
                ("drive root", "/vm/root.img", "drives/root", true, true),
                // The base is read-only even under a writable image, and must be a regular file.
                (
                    "base of drive root",
                    "/images/base.img",
                    "drives/root.base",
                    false,
                    false
                ),
                ("drive ro", "/vm/ro.img", "drives/ro", false, true),
                // Two drives on one base get a mount each.
                (
                    "base of drive ro",
                    "/images/base.img",
                    "drives/ro.base",
                    false,
                    false
                ),
                ("drive plain", "/vm/plain.img", "drives/plain", true, true),
                // A passed image is not bound, but its base is a path the jailed VMM must open.
                (
                    "base of drive passed",
                    "/images/other.img",
                    "drives/passed.base",
                    false,
                    false
                ),
            ]
        );
        let d = &plan.config.as_ref().unwrap().drives;
        let paths: Vec<_> = d
            .iter()
            .map(|d| (d.path.to_str().unwrap(), d.backing.as_deref()))
            .collect();
        assert_eq!(
            paths,
            [
                ("/drives/root", Some(Path::new("/drives/root.base"))),
                ("/drives/ro", Some(Path::new("/drives/ro.base"))),
                ("/drives/plain", None),
                ("", Some(Path::new("/drives/passed.base"))),
                ("", None),
            ]
        );
        assert_eq!(
            (d[3].fd.as_deref(), d[4].fd.as_deref()),
            (Some("disk"), Some("disk2"))
        );
        // The rewritten configuration is still a valid one (absolute base paths).
        plan.config.as_ref().unwrap().validate().unwrap();
        // `<id>.base` never collides with another drive's `<id>`: ids cannot hold a '.'.
        assert!(!vmm_api::drive::is_valid_name("root.base"));

        // Only passed images, one with a base: the drives directory is still needed for the base.
        let config = VmConfig::from_json(
            r#"{"boot": {"kernel": "/img/vmlinux"},
                "drives": [{"id": "data", "fd": "disk", "backing": "/images/base.img"}]}"#,
        )
        .unwrap();
        let plan = JailLayout::plan(&jail("/j/vm"), Some(&config), None).unwrap();
        let targets: Vec<_> = plan.files.iter().map(|f| f.target.to_str().unwrap()).collect();
        assert_eq!(targets, ["boot/kernel", "drives/data.base"]);
        assert!(plan
            .dirs
            .iter()
            .any(|(d, o)| d == Path::new("drives") && *o == Owner::Root));
        assert_eq!(plan.config.as_ref().unwrap().drives[0].path, PathBuf::new());
    }

    #[test]
    fn socket_and_log_may_share_a_nested_directory() {
        let plan = JailLayout::plan(
            &jail("/j/vm"),
            Some(&config(r#"{"file": "/j/vm/var/run/c.log"}"#)),
            Some(Path::new("/j/vm/var/run/s.sock")),
        )
        .unwrap();
        let extra: Vec<_> = plan.dirs[4..]
            .iter()
            .map(|(d, o)| (d.to_str().unwrap(), *o))
            .collect();
        assert_eq!(extra, [("var", Owner::Root), ("var/run", Owner::Jail)]);
        let plan = JailLayout::plan(&jail("/j/vm"), Some(&config("\"stdout\"")), None).unwrap();
        assert_eq!((plan.api_sock, plan.serial_log), (None, None));
        assert_eq!(plan.config.as_ref().unwrap().serial, SerialConfig::Stdout);
    }

    #[test]
    fn refuses_paths_the_jail_cannot_reach() {
        let bad_socks = [
            "/elsewhere/api.sock",
            "/j/vm/api.sock",
            "/j/vm",
            "/j/vm2/run/api.sock",
            "/j/vm/run/../../etc/api.sock",
            "/j/vm/dev/api.sock",
            "/j/vm/boot/api.sock",
            "run/api.sock",
        ];
        for sock in bad_socks {
            let err = JailLayout::plan(&jail("/j/vm"), Some(&config("\"off\"")), Some(Path::new(sock)))
                .unwrap_err();
            assert!(matches!(err, LayoutError::Outside { .. }), "{sock}: {err}");
            assert!(err.to_string().contains("/j/vm/run/api.sock"), "{err}");
        }
        let err =
            JailLayout::plan(&jail("/j/vm"), Some(&config(r#"{"file": "/tmp/c.log"}"#)), None).unwrap_err();
        assert!(
            err.to_string().contains("the serial log file /tmp/c.log"),
            "{err}"
        );
        let err = JailLayout::plan(
            &jail("/j/vm"),
            Some(&config(r#"{"file": "/j/vm/run/x"}"#)),
            Some(Path::new("/j/vm/run/x")),
        )
        .unwrap_err();
        assert!(matches!(err, LayoutError::Clash(_)), "{err}");
        for dir in ["/", "j/vm", "/j/../vm", "/j/./vm", "/j//vm", "/j/vm/"] {
            assert!(check_jail_dir(Path::new(dir)).is_err(), "{dir}");
        }
        check_jail_dir(Path::new("/j/vm")).unwrap();
    }

    #[test]
    fn the_empty_start_mode_binds_only_mirrors_at_their_own_paths() {
        let mut j = jail("/j/vm");
        j.mirrors = vec![
            "/var/lib/agent/snapshots/full".into(),
            "/var/lib/agent/snapshots/diff".into(),
            "/var/lib/agent/images/base/rootfs.img".into(),
        ];
        let plan = JailLayout::plan(&j, None, Some(Path::new("/j/vm/run/api.sock"))).unwrap();
        assert_eq!(plan.config, None);
        assert_eq!(plan.api_sock, Some(PathBuf::from("/run/api.sock")));
        let files: Vec<_> = plan
            .files
            .iter()
            .map(|f| {
                (
                    f.source.to_str().unwrap(),
                    f.target.to_str().unwrap(),
                    f.writable,
                    f.kind,
                )
            })
            .collect();
        assert_eq!(
            files,
            [
                (
                    "/var/lib/agent/snapshots/full",
                    "var/lib/agent/snapshots/full",
                    false,
                    SourceKind::FileOrDir
                ),
                (
                    "/var/lib/agent/snapshots/diff",
                    "var/lib/agent/snapshots/diff",
                    false,
                    SourceKind::FileOrDir
                ),
                (
                    "/var/lib/agent/images/base/rootfs.img",
                    "var/lib/agent/images/base/rootfs.img",
                    false,
                    SourceKind::FileOrDir
                ),
            ]
        );
        // Every directory above a mirror once, root's, parents first.
        let dirs: Vec<_> = plan.dirs.iter().map(|(d, o)| (d.to_str().unwrap(), *o)).collect();
        assert_eq!(
            dirs,
            [
                ("boot", Owner::Root),
                ("dev", Owner::Root),
                ("proc", Owner::Root),
                ("run", Owner::Jail),
                ("var", Owner::Root),
                ("var/lib", Owner::Root),
                ("var/lib/agent", Owner::Root),
                ("var/lib/agent/snapshots", Owner::Root),
                ("var/lib/agent/images", Owner::Root),
                ("var/lib/agent/images/base", Owner::Root),
            ]
        );
    }

    #[test]
    fn mirrors_stay_clear_of_the_jails_own_paths_and_of_each_other() {
        let refused = |mirrors: &[&str], sock: &str| {
            let mut j = jail("/j/vm");
            j.mirrors = mirrors.iter().map(PathBuf::from).collect();
            JailLayout::plan(&j, None, Some(Path::new(sock)))
                .unwrap_err()
                .to_string()
        };
        let sock = "/j/vm/run/api.sock";
        let cases = [
            (refused(&["/"], sock), "absolute, normalized"),
            (refused(&["relative/x"], sock), "absolute, normalized"),
            (refused(&["/a/../b"], sock), "absolute, normalized"),
            (refused(&["/dev/kvm"], sock), "lies under /dev"),
            (refused(&["/drives/x"], sock), "lies under /drives"),
            (
                refused(&["/run/agent/snap"], sock),
                "shares its top directory with /j/vm/run/api.sock",
            ),
            (
                refused(&["/a/b", "/a/b/c"], sock),
                "/a/b/c: overlaps --jail-mirror /a/b",
            ),
            (
                refused(&["/a/b/c", "/a/b"], sock),
                "/a/b: overlaps --jail-mirror /a/b/c",
            ),
            (refused(&["/a/b", "/a/b"], sock), "overlaps"),
        ];
        for (err, expected) in cases {
            assert!(err.contains(expected), "{err} should say {expected}");
        }
        // Siblings are fine, and so is a name that merely starts like another.
        let mut j = jail("/j/vm");
        j.mirrors = vec!["/a/b".into(), "/a/bc".into(), "/a/c".into()];
        JailLayout::plan(&j, None, Some(Path::new(sock))).unwrap();
    }

    #[test]
    fn safe_names() {
        for ok in ["vm", "vm-1_A", &"a".repeat(64)] {
            assert!(is_safe_name(ok), "{ok}");
        }
        for bad in ["", ".", "..", "a/b", "a b", "vm.1", &"a".repeat(65), "é"] {
            assert!(!is_safe_name(bad), "{bad}");
        }
    }
}
