//! The jail's file system: the per-VM directory on the host (prepared and cleaned up by the
//! launcher), and the mounts and `pivot_root` that make it the VMM's whole world (done by the child
//! in its own mount namespace).

use std::ffi::CString;
use std::fs::{DirBuilder, File, Metadata, OpenOptions};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{chown, DirBuilderExt, FileTypeExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use super::layout::{JailLayout, Owner, SourceKind};
use super::{JailConfig, JailError};

/// What the launcher created or changed on the host, to undo at the end.
#[derive(Debug, Default)]
pub struct HostFiles {
    dir: PathBuf,
    created_dir: bool,
    /// Directories created in the jail directory, parents first.
    dirs: Vec<PathBuf>,
    /// Empty files created as bind-mount targets.
    mount_points: Vec<PathBuf>,
    /// Empty directories created as bind-mount targets (of mirrored directories).
    mount_dirs: Vec<PathBuf>,
    /// The control socket's host path (the VMM removes it, unless it was killed).
    socket: Option<PathBuf>,
    /// Writable images chowned to the jail uid, with their original owners.
    chowned: Vec<(PathBuf, u32, u32)>,
    /// Each bound file's resolved host path and its mount point, and whether it is writable.
    pub binds: Vec<(PathBuf, PathBuf, bool)>,
}

fn io<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> JailError + 'a {
    move |source| JailError::io(what, path, source)
}

fn access(what: &str, path: &Path, reason: String) -> JailError {
    JailError::Access {
        what: what.to_string(),
        path: path.display().to_string(),
        reason,
    }
}

/// Whether the mode bits give `uid`/`gid` (not root) every permission bit of `want` (r=4 w=2 x=1).
fn mode_grants(mode: u32, owner: (u32, u32), uid: u32, gid: u32, want: u32) -> bool {
    let bits = if owner.0 == uid {
        mode >> 6
    } else if owner.1 == gid {
        mode >> 3
    } else {
        mode
    };
    bits & want == want
}

/// Creates the jail directory's contents on the host: directories, empty bind-mount targets, the
/// serial log; chowns writable images to the jail uid. Undoes its own work if it fails.
pub fn prepare_host(jail: &JailConfig, layout: &JailLayout) -> Result<HostFiles, JailError> {
    let mut host = HostFiles {
        dir: jail.dir.clone(),
        ..HostFiles::default()
    };
    match prepare(jail, layout, &mut host) {
        Ok(()) => Ok(host),
        Err(e) => {
            cleanup(host);
            Err(e)
        }
    }
}

/// Resolves every file to bind (symbolic links followed here, once) and checks that the jail can use
/// it: a regular file (a drive image may also be a block device, a mirror a directory); a read-only
/// one (kernel, initrd, read-only drive, base image, mirror) readable by the jail uid/gid by its
/// mode bits, since it keeps its owner (a directory also searchable; what is in it is checked when
/// the VMM opens it); a writable one readable and writable by its owner, which the jail uid
/// becomes.
fn check_sources(jail: &JailConfig, layout: &JailLayout) -> Result<Vec<(PathBuf, Metadata)>, JailError> {
    let mut sources = Vec::new();
    for file in &layout.files {
        let what = file.what.as_str();
        let path = std::fs::canonicalize(&file.source)
            .map_err(|e| access(what, &file.source, format!("cannot be used: {e}")))?;
        let meta =
            std::fs::metadata(&path).map_err(|e| access(what, &path, format!("cannot be used: {e}")))?;
        let kind = meta.file_type();
        let allowed = kind.is_file()
            || (kind.is_block_device() && file.kind == SourceKind::FileOrDevice)
            || (kind.is_dir() && file.kind == SourceKind::FileOrDir);
        if !allowed {
            return Err(access(
                what,
                &path,
                match file.kind {
                    SourceKind::FileOrDir => "is neither a regular file nor a directory".into(),
                    _ => "is not a regular file".into(),
                },
            ));
        }
        let want = if kind.is_dir() { 0o5 } else { 0o4 };
        if !file.writable && !mode_grants(meta.mode(), (meta.uid(), meta.gid()), jail.uid, jail.gid, want) {
            return Err(access(
                what,
                &path,
                format!(
                    "is not readable by the jail's uid {} / gid {} (mode {:o}, owner {}:{})",
                    jail.uid,
                    jail.gid,
                    meta.mode() & 0o7777,
                    meta.uid(),
                    meta.gid()
                ),
            ));
        }
        if file.writable && meta.mode() & 0o600 != 0o600 {
            return Err(access(
                what,
                &path,
                format!(
                    "is writable but its owner may not read and write it (mode {:o})",
                    meta.mode() & 0o7777
                ),
            ));
        }
        sources.push((path, meta));
    }
    Ok(sources)
}

fn prepare(jail: &JailConfig, layout: &JailLayout, host: &mut HostFiles) -> Result<(), JailError> {
    // Resolve and check every source first: a missing kernel or an unreadable disk is an error
    // before anything is created.
    let sources = check_sources(jail, layout)?;

    let dir = &jail.dir;
    if let Some(parent) = dir.parent() {
        // Missing parents (e.g. /srv/jail) are created and stay: other VMs' jails share them.
        DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(parent)
            .map_err(io("cannot create", parent))?;
    }
    match std::fs::create_dir(dir) {
        Ok(()) => host.created_dir = true,
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            let mut entries = std::fs::read_dir(dir).map_err(io("cannot read", dir))?;
            if entries.next().is_some() {
                return Err(access(
                    "jail directory",
                    dir,
                    "is not empty (a jail left behind? remove it or use another directory)".into(),
                ));
            }
        }
        Err(e) => return Err(io("cannot create", dir)(e)),
    }
    let real = std::fs::canonicalize(dir).map_err(io("cannot resolve", dir))?;
    if &real != dir {
        return Err(access(
            "jail directory",
            dir,
            format!("resolves to {} (no symbolic links, please)", real.display()),
        ));
    }
    // The VMM's "/": root-owned and not writable by the jail.
    chown(dir, Some(0), Some(0)).map_err(io("cannot chown", dir))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).map_err(io("cannot chmod", dir))?;

    for (rel, owner) in &layout.dirs {
        let path = dir.join(rel);
        let mode = match owner {
            Owner::Root => 0o755,
            Owner::Jail => 0o750,
        };
        DirBuilder::new()
            .mode(mode)
            .create(&path)
            .map_err(io("cannot create", &path))?;
        host.dirs.push(path.clone());
        if *owner == Owner::Jail {
            chown(&path, Some(jail.uid), Some(jail.gid)).map_err(io("cannot chown", &path))?;
        }
    }
    for (file, (source, meta)) in layout.files.iter().zip(sources) {
        let target = dir.join(&file.target);
        if meta.is_dir() {
            DirBuilder::new()
                .mode(0o755)
                .create(&target)
                .map_err(io("cannot create", &target))?;
            host.mount_dirs.push(target.clone());
        } else {
            OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o400)
                .open(&target)
                .map_err(io("cannot create", &target))?;
            host.mount_points.push(target.clone());
        }
        // Only writable images change owner; read-only files, base images that other VMs share
        // among them, stay exactly as they are.
        if file.writable && (meta.uid(), meta.gid()) != (jail.uid, jail.gid) {
            chown(&source, Some(jail.uid), Some(jail.gid)).map_err(io("cannot chown", &source))?;
            host.chowned.push((source.clone(), meta.uid(), meta.gid()));
        }
        host.binds.push((source, target, file.writable));
    }
    if let Some(log) = &layout.serial_log {
        let path = dir.join(log);
        File::create(&path).map_err(io("cannot create", &path))?;
        chown(&path, Some(jail.uid), Some(jail.gid)).map_err(io("cannot chown", &path))?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640))
            .map_err(io("cannot chmod", &path))?;
    }
    host.socket = layout
        .api_sock
        .as_ref()
        .and_then(|s| s.strip_prefix("/").ok())
        .map(|s| dir.join(s));
    Ok(())
}

/// Undoes [`prepare_host`]: removes the mount points, a leftover socket, the directories (those
/// still holding a serial log stay, with the log), the jail directory if the launcher created it and
/// it is empty; gives chowned images back to their owners. Best effort: failures are logged.
pub fn cleanup(host: HostFiles) {
    let warn = |what: &str, path: &Path, e: std::io::Error| {
        if e.kind() != std::io::ErrorKind::NotFound {
            log::warn!("jail cleanup: cannot {what} {}: {e}", path.display());
        }
    };
    for path in host.mount_points.iter().chain(host.socket.iter()) {
        if let Err(e) = std::fs::remove_file(path) {
            warn("remove", path, e);
        }
    }
    for (path, uid, gid) in &host.chowned {
        if let Err(e) = chown(path, Some(*uid), Some(*gid)) {
            warn("chown back", path, e);
        }
    }
    for path in host.mount_dirs.iter().chain(host.dirs.iter().rev()) {
        match std::fs::remove_dir(path) {
            Err(e) if e.raw_os_error() != Some(libc::ENOTEMPTY) => warn("remove", path, e),
            _ => {}
        }
    }
    if host.created_dir {
        match std::fs::remove_dir(&host.dir) {
            Err(e) if e.raw_os_error() != Some(libc::ENOTEMPTY) => warn("remove", &host.dir, e),
            _ => {}
        }
    }
}

fn cstr(path: &Path) -> Result<CString, JailError> {
    CString::new(path.as_os_str().as_bytes())
        .map_err(|_| JailError::NotConfined(format!("path {} contains NUL", path.display())))
}

fn mount(
    source: Option<&Path>,
    target: &Path,
    fstype: Option<&str>,
    flags: libc::c_ulong,
    data: Option<&str>,
    what: &'static str,
) -> Result<(), JailError> {
    let source = source.map(cstr).transpose()?;
    let target = cstr(target)?;
    let fstype = fstype.map(|t| CString::new(t).unwrap_or_default());
    let data = data.map(|d| CString::new(d).unwrap_or_default());
    let ptr = |c: &Option<CString>| c.as_ref().map_or(std::ptr::null(), |c| c.as_ptr());
    // SAFETY: every pointer is null or a NUL-terminated string that outlives the call.
    let ret = unsafe {
        libc::mount(
            ptr(&source),
            target.as_ptr(),
            ptr(&fstype),
            flags,
            ptr(&data).cast::<libc::c_void>(),
        )
    };
    if ret != 0 {
        return Err(JailError::sys(what));
    }
    Ok(())
}

/// Device nodes the VMM needs: (path under /dev, major, minor).
const DEVICES: [(&str, u32, u32); 2] = [("kvm", 10, 232), ("net/tun", 10, 200)];

/// In the child's new mount namespace: builds the jail's mounts and `pivot_root`s into the jail
/// directory, leaving nothing of the host's tree reachable.
pub fn enter_root(jail: &JailConfig, host: &HostFiles) -> Result<(), JailError> {
    let dir = &jail.dir;
    // Nothing done from here on propagates back to the host's mount namespace.
    mount(
        None,
        Path::new("/"),
        None,
        libc::MS_REC | libc::MS_PRIVATE,
        None,
        "make / private",
    )?;
    // The jail directory becomes a mount point (pivot_root needs one), without the host's mounts
    // below it (not MS_REC), and without set-uid programs or device nodes.
    mount(
        Some(dir),
        dir,
        None,
        libc::MS_BIND,
        None,
        "bind the jail directory",
    )?;
    let base = libc::MS_BIND | libc::MS_REMOUNT | libc::MS_NOSUID;
    mount(
        None,
        dir,
        None,
        base | libc::MS_NODEV,
        None,
        "remount the jail directory nosuid,nodev",
    )?;
    for (source, target, writable) in &host.binds {
        mount(
            Some(source),
            target,
            None,
            libc::MS_BIND,
            None,
            "bind a file into the jail",
        )?;
        let mut flags = base | libc::MS_NOEXEC;
        if !writable {
            flags |= libc::MS_RDONLY;
        }
        let is_device = std::fs::metadata(source).is_ok_and(|m| m.file_type().is_block_device());
        if !is_device {
            flags |= libc::MS_NODEV;
        }
        mount(None, target, None, flags, None, "remount a bound file")?;
    }
    let dev = dir.join("dev");
    let dev_opts = "mode=0755,size=64k,nr_inodes=16";
    let dev_flags = libc::MS_NOSUID | libc::MS_NOEXEC;
    mount(
        Some(Path::new("tmpfs")),
        &dev,
        Some("tmpfs"),
        dev_flags,
        Some(dev_opts),
        "mount /dev",
    )?;
    DirBuilder::new()
        .mode(0o755)
        .create(dev.join("net"))
        .map_err(io("cannot create", &dev))?;
    for (name, major, minor) in DEVICES {
        let path = dev.join(name);
        let c = cstr(&path)?;
        // SAFETY: a NUL-terminated path that outlives the call; mknod only creates the node.
        if unsafe { libc::mknod(c.as_ptr(), libc::S_IFCHR | 0o600, libc::makedev(major, minor)) } != 0 {
            return Err(JailError::sys("mknod"));
        }
        chown(&path, Some(jail.uid), Some(jail.gid)).map_err(io("cannot chown", &path))?;
    }
    mount(
        None,
        &dev,
        None,
        libc::MS_REMOUNT | libc::MS_RDONLY | dev_flags,
        Some(dev_opts),
        "remount /dev read-only",
    )?;
    // The jail's own procfs: only the processes of its PID namespace, and (subset=pid) none of the
    // system-wide files (/proc/sys, /proc/kcore, ...). The VMM reads /proc/self/statm for metrics.
    let proc_flags = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
    if let Err(e) = mount(
        Some(Path::new("proc")),
        &dir.join("proc"),
        Some("proc"),
        proc_flags,
        Some("subset=pid"),
        "mount /proc",
    ) {
        log::warn!("jail: no /proc in the jail ({e}); the VMM's memory metrics will be missing");
    }

    // pivot_root(".", "."): the old root ends up stacked on the new one, and is detached at once.
    let c = cstr(dir)?;
    // SAFETY: a NUL-terminated path that outlives the call.
    if unsafe { libc::chdir(c.as_ptr()) } != 0 {
        return Err(JailError::sys("chdir to the jail directory"));
    }
    let dot = c".";
    // SAFETY: both arguments are the NUL-terminated string ".".
    if unsafe { libc::syscall(libc::SYS_pivot_root, dot.as_ptr(), dot.as_ptr()) } != 0 {
        return Err(JailError::sys("pivot_root"));
    }
    // SAFETY: "." is NUL-terminated; MNT_DETACH unmounts the old root lazily.
    if unsafe { libc::umount2(dot.as_ptr(), libc::MNT_DETACH) } != 0 {
        return Err(JailError::sys("detach the old root"));
    }
    let root = c"/";
    // SAFETY: "/" is NUL-terminated.
    if unsafe { libc::chdir(root.as_ptr()) } != 0 {
        return Err(JailError::sys("chdir /"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A scratch directory for one test, removed when dropped.
    struct Scratch(PathBuf);

    impl Scratch {
        fn new(tag: &str) -> Scratch {
            let dir = std::env::temp_dir().join(format!("vmm-jailfs-{tag}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            Scratch(dir)
        }

        fn file(&self, name: &str, mode: u32) -> PathBuf {
            let path = self.0.join(name);
            std::fs::write(&path, vec![1u8; 4096]).unwrap();
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
            path
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// A jail for a uid/gid other than the owner of the test's files (so their "other" mode bits
    /// decide, whoever runs the test) over a VM with a copy-on-write drive on `base`.
    fn cow_vm(scratch: &Scratch, base: &Path) -> (JailConfig, JailLayout) {
        let owner = std::fs::metadata(&scratch.0).unwrap();
        let jail = JailConfig {
            dir: scratch.0.join("jail"),
            id: "vm".into(),
            uid: owner.uid() + 1,
            gid: owner.gid() + 1,
            netns: None,
            cpu_limit: None,
            memory_limit_mib: None,
            pids_limit: 16,
            nofile: 64,
            mirrors: Vec::new(),
        };
        let config = vmm_api::VmConfig::from_json(
            &serde_json::json!({
                "boot": {"kernel": scratch.file("vmlinux", 0o644)},
                "drives": [{"id": "cow", "path": scratch.file("cow.img", 0o600), "backing": base}],
            })
            .to_string(),
        )
        .unwrap();
        let layout = JailLayout::plan(&jail, Some(&config), None).unwrap();
        (jail, layout)
    }

    #[test]
    fn a_base_image_must_be_readable_by_the_jail_uid() {
        let scratch = Scratch::new("base");
        // Readable by everyone: fine, and listed after the image it serves.
        let (jail, layout) = cow_vm(&scratch, &scratch.file("base.img", 0o644));
        let sources = check_sources(&jail, &layout).unwrap();
        let names: Vec<_> = sources
            .iter()
            .map(|(p, _)| p.file_name().unwrap().to_str().unwrap())
            .collect();
        assert_eq!(names, ["vmlinux", "cow.img", "base.img"]);

        // Readable by its owner only: the jail uid, which the base is never chowned to, cannot.
        let base = scratch.file("private.img", 0o600);
        let (jail, layout) = cow_vm(&scratch, &base);
        let err = check_sources(&jail, &layout).unwrap_err().to_string();
        assert!(
            err.starts_with(&format!(
                "jail: base of drive cow {} is not readable by the jail's uid {} / gid {} (mode 600",
                base.display(),
                jail.uid,
                jail.gid
            )),
            "{err}"
        );
        // Nothing was created: the check comes before the jail directory.
        assert!(!jail.dir.exists());

        // A directory (or anything but a regular file) is refused too.
        let (jail, layout) = cow_vm(&scratch, &scratch.0);
        let err = check_sources(&jail, &layout).unwrap_err().to_string();
        assert!(
            err.contains("base of drive cow") && err.ends_with("is not a regular file"),
            "{err}"
        );
    }

    #[test]
    fn mode_bits_decide_access_for_the_jail_uid() {
        let (uid, gid) = (1000, 2000);
        assert!(mode_grants(0o644, (0, 0), uid, gid, 0o4));
        assert!(!mode_grants(0o640, (0, 0), uid, gid, 0o4));
        assert!(mode_grants(0o640, (0, gid), uid, gid, 0o4));
        assert!(mode_grants(0o600, (uid, 0), uid, gid, 0o6));
        assert!(!mode_grants(0o400, (uid, 0), uid, gid, 0o6));
        // A directory must also be searchable.
        assert!(mode_grants(0o755, (0, 0), uid, gid, 0o5));
        assert!(!mode_grants(0o744, (0, 0), uid, gid, 0o5));
        // The owner class decides alone, as in the kernel: an owner without bits gets nothing.
        assert!(!mode_grants(0o044, (uid, gid), uid, gid, 0o4));
    }
}
