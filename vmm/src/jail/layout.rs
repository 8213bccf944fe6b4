//! What goes where in the per-VM directory, and the configuration rewritten to in-jail paths. Pure:
//! nothing here touches the file system, so every rule is unit-tested.
//!
//! ```text
//! DIR/                 root:root 0755   the VMM's / after pivot_root
//!   boot/kernel        bind mount of the kernel (read-only)
//!   boot/initrd        bind mount of the initrd (read-only)
//!   drives/<id>        bind mount of each drive image (read-only unless the drive is writable)
//!   drives/<id>.base   bind mount of a copy-on-write drive's base image (`backing`), read-only
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
}

/// A host file the jail sees through a bind mount.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BoundFile {
    /// What it is, for error messages: "kernel", "initrd", "drive ID", "base of drive ID".
    pub what: String,
    /// The host path from the configuration.
    pub source: PathBuf,
    /// Where the jail sees it, relative to the jail directory (e.g. `drives/data`).
    pub target: PathBuf,
    /// Whether the VMM opens it for writing; read-only files are mounted read-only. Only writable
    /// files are chowned to the jail uid while it runs: a read-only one (a base image many VMs
    /// share) keeps its owner.
    pub writable: bool,
    /// Whether it may be a block device rather than a regular file (a drive's image may; the kernel,
    /// the initrd and a base image, whose size is read from its metadata, may not).
    pub device_ok: bool,
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
    /// The VM configuration with every path rewritten to its in-jail path.
    pub config: VmConfig,
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
    /// Plans the jail for `config`; `api_sock` is the host path given with `--api-sock`.
    pub fn plan(jail: &JailConfig, config: &VmConfig, api_sock: Option<&Path>) -> Result<Self, LayoutError> {
        check_jail_dir(&jail.dir)?;
        let mut files = Vec::new();
        let mut rewritten = config.clone();
        let mut dirs = vec![
            (PathBuf::from("boot"), Owner::Root),
            (PathBuf::from("dev"), Owner::Root),
            (PathBuf::from("proc"), Owner::Root),
        ];
        let mut bind = |what: String, source: &Path, target: PathBuf, writable: bool, device_ok: bool| {
            files.push(BoundFile {
                what,
                source: source.to_path_buf(),
                target: target.clone(),
                writable,
                device_ok,
            });
            Path::new("/").join(target)
        };
        rewritten.boot.kernel = bind(
            "kernel".into(),
            &config.boot.kernel,
            "boot/kernel".into(),
            false,
            false,
        );
        if let Some(initrd) = &config.boot.initrd {
            rewritten.boot.initrd = Some(bind("initrd".into(), initrd, "boot/initrd".into(), false, false));
        }
        // A drive given as a descriptor (`fd`, from `--fd`) has no path: the VMM holds its image
        // already, and nothing is bound for it. Its base, if it has one, is a path like any other
        // drive's base, and is bound.
        if config
            .drives
            .iter()
            .any(|d| d.fd.is_none() || d.backing.is_some())
        {
            dirs.push((PathBuf::from("drives"), Owner::Root));
        }
        for (drive, out) in config.drives.iter().zip(rewritten.drives.iter_mut()) {
            // Drive ids are validated names (A-Z a-z 0-9 _ -), safe as file names.
            if drive.fd.is_none() {
                out.path = bind(
                    format!("drive {}", drive.id),
                    &drive.path,
                    Path::new("drives").join(&drive.id),
                    !drive.read_only,
                    true,
                );
            }
            if let Some(base) = &drive.backing {
                // A drive id cannot hold a '.', so `<id>.base` never names another drive's image.
                // Read-only whatever the drive is: the VMM only reads a base, and other VMs share
                // it, so it is mounted read-only and never chowned to the jail uid.
                out.backing = Some(bind(
                    format!("base of drive {}", drive.id),
                    base,
                    Path::new("drives").join(format!("{}.base", drive.id)),
                    false,
                    false,
                ));
            }
        }

        let sock = api_sock
            .map(|p| inside(&jail.dir, p, "--api-sock", "api.sock"))
            .transpose()?;
        let log = match &config.serial {
            SerialConfig::File(p) => Some(inside(&jail.dir, p, "the serial log file", "serial.log")?),
            _ => None,
        };
        if let (Some(s), Some(l)) = (&sock, &log) {
            if s == l {
                return Err(LayoutError::Clash(jail.dir.join(s).display().to_string()));
            }
        }
        for (file, owner) in [(&log, Owner::Root), (&sock, Owner::Jail)] {
            let Some(file) = file else { continue };
            let mut ancestors: Vec<&Path> = file
                .ancestors()
                .skip(1)
                .filter(|a| !a.as_os_str().is_empty())
                .collect();
            ancestors.reverse();
            let last = ancestors.len().saturating_sub(1);
            for (i, a) in ancestors.into_iter().enumerate() {
                let want = if i == last { owner } else { Owner::Root };
                match dirs.iter_mut().find(|(d, _)| d == a) {
                    // The socket's directory wins over the log's: the VMM must create the socket there.
                    Some(entry) if want == Owner::Jail => entry.1 = Owner::Jail,
                    Some(_) => {}
                    None => dirs.push((a.to_path_buf(), want)),
                }
            }
        }
        if let Some(l) = &log {
            rewritten.serial = SerialConfig::File(Path::new("/").join(l));
        }
        Ok(JailLayout {
            dir: jail.dir.clone(),
            config: rewritten,
            api_sock: sock.map(|s| Path::new("/").join(s)),
            files,
            dirs,
            serial_log: log,
        })
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
            &config(r#"{"file": "/srv/jail/vm/log/console.log"}"#),
            Some(Path::new("/srv/jail/vm/run/api.sock")),
        )
        .unwrap();
        let c = &plan.config;
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
        let plan = JailLayout::plan(&jail("/j/vm"), &config, None).unwrap();
        let targets: Vec<_> = plan.files.iter().map(|f| f.target.to_str().unwrap()).collect();
        assert_eq!(targets, ["boot/kernel"]);
        assert!(!plan.dirs.iter().any(|(d, _)| d == Path::new("drives")));
        assert_eq!(plan.config.drives, config.drives);
        assert_eq!(plan.config.nets, config.nets);
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
        let plan = JailLayout::plan(&jail("/j/vm"), &config, None).unwrap();
        let files: Vec<_> = plan
            .files
            .iter()
            .map(|f| {
                (
                    f.what.as_str(),
                    f.source.to_str().unwrap(),
                    f.target.to_str().unwrap(),
                    f.writable,
                    f.device_ok,
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
        let d = &plan.config.drives;
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
        plan.config.validate().unwrap();
        // `<id>.base` never collides with another drive's `<id>`: ids cannot hold a '.'.
        assert!(!vmm_api::drive::is_valid_name("root.base"));

        // Only passed images, one with a base: the drives directory is still needed for the base.
        let config = VmConfig::from_json(
            r#"{"boot": {"kernel": "/img/vmlinux"},
                "drives": [{"id": "data", "fd": "disk", "backing": "/images/base.img"}]}"#,
        )
        .unwrap();
        let plan = JailLayout::plan(&jail("/j/vm"), &config, None).unwrap();
        let targets: Vec<_> = plan.files.iter().map(|f| f.target.to_str().unwrap()).collect();
        assert_eq!(targets, ["boot/kernel", "drives/data.base"]);
        assert!(plan
            .dirs
            .iter()
            .any(|(d, o)| d == Path::new("drives") && *o == Owner::Root));
        assert_eq!(plan.config.drives[0].path, PathBuf::new());
    }

    #[test]
    fn socket_and_log_may_share_a_nested_directory() {
        let plan = JailLayout::plan(
            &jail("/j/vm"),
            &config(r#"{"file": "/j/vm/var/run/c.log"}"#),
            Some(Path::new("/j/vm/var/run/s.sock")),
        )
        .unwrap();
        let extra: Vec<_> = plan.dirs[4..]
            .iter()
            .map(|(d, o)| (d.to_str().unwrap(), *o))
            .collect();
        assert_eq!(extra, [("var", Owner::Root), ("var/run", Owner::Jail)]);
        let plan = JailLayout::plan(&jail("/j/vm"), &config("\"stdout\""), None).unwrap();
        assert_eq!((plan.api_sock, plan.serial_log), (None, None));
        assert_eq!(plan.config.serial, SerialConfig::Stdout);
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
            let err =
                JailLayout::plan(&jail("/j/vm"), &config("\"off\""), Some(Path::new(sock))).unwrap_err();
            assert!(matches!(err, LayoutError::Outside { .. }), "{sock}: {err}");
            assert!(err.to_string().contains("/j/vm/run/api.sock"), "{err}");
        }
        let err = JailLayout::plan(&jail("/j/vm"), &config(r#"{"file": "/tmp/c.log"}"#), None).unwrap_err();
        assert!(
            err.to_string().contains("the serial log file /tmp/c.log"),
            "{err}"
        );
        let err = JailLayout::plan(
            &jail("/j/vm"),
            &config(r#"{"file": "/j/vm/run/x"}"#),
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
    fn safe_names() {
        for ok in ["vm", "vm-1_A", &"a".repeat(64)] {
            assert!(is_safe_name(ok), "{ok}");
        }
        for bad in ["", ".", "..", "a/b", "a b", "vm.1", &"a".repeat(65), "é"] {
            assert!(!is_safe_name(bad), "{bad}");
        }
    }
}
