//! Snapshots of jailed VMs. A jailed vmm can write only inside its jail, so it writes a snapshot
//! at the jail's mirror of the snapshot's store path and the agent moves it out: the store path
//! `/<state>/snapshots/<id>` is `<jail>/<state>/snapshots/<id>` on the host, and to the vmm, whose
//! root is the jail, the very same path. So what the vmm remembers of it (the parent of its next
//! diff snapshot) names the snapshot where it ends up.
//!
//! What the jailed vmm writes is untrusted: the agent moves the directory out of the jail first,
//! then takes it over (root-owned, so the vmm can add nothing through a descriptor it kept), and
//! refuses anything in it but regular files and directories.

use std::fs::Metadata;
use std::os::unix::fs::{lchown, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use crate::error::AgentError;

/// The first components of in-jail paths the jail itself uses (mounts, or directories the jail
/// uid owns), which a mirror must not go through.
const JAIL_OWN: [&str; 6] = ["boot", "drives", "dev", "proc", "run", "log"];

/// A snapshot directory being written inside a jail.
#[derive(Debug)]
pub struct JailStaging {
    jail: PathBuf,
    /// Where the vmm writes it, on the host.
    staged: PathBuf,
    /// Where it goes: the store path, and the path the vmm is asked to write.
    dir: PathBuf,
}

impl JailStaging {
    /// Makes `jail`'s mirror of `dir`'s parent, its last level owned by the jail's `uid` (mode
    /// 0700) so that the vmm can create `dir` in it, the levels above it root's.
    pub fn prepare(jail: &Path, dir: &Path, uid: u32) -> Result<Self, AgentError> {
        let inside = mirror_path(dir)?;
        let staged = jail.join(inside);
        let parent = staged
            .parent()
            .ok_or_else(|| AgentError::Internal(format!("{} has no parent", staged.display())))?;
        let io = |what: &str, path: &Path, e: std::io::Error| {
            AgentError::Internal(format!("{what} {}: {e}", path.display()))
        };
        std::fs::create_dir_all(parent)
            .map_err(|e| io("cannot make the jail's snapshot directory", parent, e))?;
        lchown(parent, Some(uid), Some(uid)).map_err(|e| io("cannot give the jail", parent, e))?;
        std::fs::set_permissions(parent, std::fs::Permissions::from_mode(0o700))
            .map_err(|e| io("cannot restrict", parent, e))?;
        Ok(JailStaging {
            jail: jail.to_path_buf(),
            staged,
            dir: dir.to_path_buf(),
        })
    }

    /// The path to ask the jailed vmm to write (the store path, which it sees in its jail).
    pub fn vmm_path(&self) -> &Path {
        &self.dir
    }

    /// Moves what the vmm wrote to the store and makes it root's; on failure nothing of it is
    /// left in either place. The mirror goes either way.
    pub fn finish(self) -> Result<(), AgentError> {
        let result = self.take_over();
        self.remove_mirror();
        result
    }

    /// Removes what the vmm may have left (a failed snapshot) and the mirror.
    pub fn abandon(self) {
        remove_tree(&self.staged);
        self.remove_mirror();
    }

    fn take_over(&self) -> Result<(), AgentError> {
        // Out of the jail's reach first: what is checked below cannot change under the check.
        std::fs::rename(&self.staged, &self.dir).map_err(|e| {
            remove_tree(&self.staged);
            AgentError::Internal(format!(
                "cannot move the jailed vmm's snapshot {} to {}: {e}",
                self.staged.display(),
                self.dir.display()
            ))
        })?;
        own_tree(&self.dir).inspect_err(|_| remove_tree(&self.dir))
    }

    /// Removes the mirror's directories, from the snapshot's parent up to the jail, as far as
    /// they are empty.
    fn remove_mirror(&self) {
        let mut at = self.staged.parent();
        while let Some(dir) = at.filter(|d| d.starts_with(&self.jail) && *d != self.jail) {
            if std::fs::remove_dir(dir).is_err() {
                break;
            }
            at = dir.parent();
        }
    }
}

/// `dir` (absolute, normalized) without its root, if a jail can mirror it.
fn mirror_path(dir: &Path) -> Result<&Path, AgentError> {
    let normal = dir.is_absolute()
        && dir
            .components()
            .skip(1)
            .all(|c| matches!(c, Component::Normal(_)));
    let first = dir.components().nth(1).and_then(|c| c.as_os_str().to_str());
    if !normal || first.is_none_or(|f| JAIL_OWN.contains(&f)) {
        return Err(AgentError::WrongState(format!(
            "a jailed VM cannot write a snapshot at {}: the state directory must be an absolute \
             path outside /{} for jailed VMs' snapshots",
            dir.display(),
            JAIL_OWN.join(", /")
        )));
    }
    Ok(dir.strip_prefix("/").unwrap_or(dir))
}

/// Makes `dir` and everything in it root's, the directory first; refuses (with an error)
/// anything but regular files and directories.
fn own_tree(dir: &Path) -> Result<(), AgentError> {
    let meta = std::fs::symlink_metadata(dir).map_err(|e| foreign(dir, &e.to_string()))?;
    check_kind(dir, &meta)?;
    lchown(dir, Some(0), Some(0)).map_err(|e| foreign(dir, &e.to_string()))?;
    if meta.is_dir() {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))
            .map_err(|e| foreign(dir, &e.to_string()))?;
        let entries = std::fs::read_dir(dir).map_err(|e| foreign(dir, &e.to_string()))?;
        for entry in entries {
            let entry = entry.map_err(|e| foreign(dir, &e.to_string()))?;
            own_tree(&entry.path())?;
        }
    }
    Ok(())
}

fn check_kind(path: &Path, meta: &Metadata) -> Result<(), AgentError> {
    if meta.is_dir() || meta.is_file() {
        return Ok(());
    }
    Err(foreign(path, "neither a regular file nor a directory"))
}

fn foreign(path: &Path, why: &str) -> AgentError {
    AgentError::Internal(format!(
        "the jailed vmm's snapshot is unusable: {}: {why}",
        path.display()
    ))
}

/// Removes `path` whatever it is (a symbolic link itself, not what it points to).
fn remove_tree(path: &Path) {
    let removed = match std::fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => std::fs::remove_dir_all(path),
        Ok(_) => std::fs::remove_file(path),
        Err(_) => return,
    };
    if let Err(e) = removed {
        tracing::warn!(path = %path.display(), error = %e, "cannot remove a jailed vmm's snapshot");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn mirrors_only_normalized_paths_outside_the_jails_own_directories() {
        let ok = mirror_path(Path::new("/var/lib/vmm-agent/snapshots/s1")).unwrap();
        assert_eq!(ok, Path::new("var/lib/vmm-agent/snapshots/s1"));
        for bad in [
            "relative/s1",
            "/run/agent/snapshots/s1",
            "/dev/x/s1",
            "/a/../b/s1",
            "/",
        ] {
            let err = mirror_path(Path::new(bad)).unwrap_err();
            assert!(matches!(err, AgentError::WrongState(_)), "{bad}: {err:?}");
        }
    }

    #[test]
    fn a_staged_snapshot_moves_to_the_store_as_roots_and_the_mirror_goes() {
        let tmp = harness::TempDir::new("agent-jail-snapshot").unwrap();
        let jail = tmp.path().join("jails/vm1");
        std::fs::create_dir_all(&jail).unwrap();
        let dir = tmp.path().join("state/snapshots/s1");
        std::fs::create_dir_all(dir.parent().unwrap()).unwrap();
        let staging = JailStaging::prepare(&jail, &dir, 4242).unwrap();
        assert_eq!(staging.vmm_path(), dir);
        let parent = staging.staged.parent().unwrap().to_path_buf();
        let meta = std::fs::metadata(&parent).unwrap();
        assert_eq!((meta.uid(), meta.mode() & 0o777), (4242, 0o700));
        // As the vmm would: its directory, files and a subdirectory, all the jail uid's.
        std::fs::create_dir_all(staging.staged.join("sub")).unwrap();
        std::fs::write(staging.staged.join("memory"), b"pages").unwrap();
        std::fs::write(staging.staged.join("sub/f"), b"x").unwrap();
        for p in ["", "memory", "sub", "sub/f"] {
            lchown(staging.staged.join(p), Some(4242), Some(4242)).unwrap();
        }
        staging.finish().unwrap();
        assert_eq!(std::fs::read(dir.join("memory")).unwrap(), b"pages");
        for p in ["", "memory", "sub", "sub/f"] {
            assert_eq!(std::fs::metadata(dir.join(p)).unwrap().uid(), 0, "{p}");
        }
        assert_eq!(std::fs::read_dir(&jail).unwrap().count(), 0, "the mirror is left");
    }

    #[test]
    fn a_symbolic_link_in_a_staged_snapshot_fails_it_and_nothing_is_kept() {
        let tmp = harness::TempDir::new("agent-jail-snapshot").unwrap();
        let jail = tmp.path().join("jail");
        std::fs::create_dir_all(&jail).unwrap();
        let secret = tmp.path().join("secret");
        std::fs::write(&secret, b"s").unwrap();
        let dir = tmp.path().join("store/s1");
        std::fs::create_dir_all(dir.parent().unwrap()).unwrap();
        let staging = JailStaging::prepare(&jail, &dir, 4242).unwrap();
        std::fs::create_dir(&staging.staged).unwrap();
        std::os::unix::fs::symlink(&secret, staging.staged.join("state")).unwrap();
        let err = staging.finish().unwrap_err();
        assert!(err.to_string().contains("neither a regular file"), "{err}");
        assert!(!dir.exists());
        assert_eq!(std::fs::read(&secret).unwrap(), b"s");
        assert_eq!(std::fs::read_dir(&jail).unwrap().count(), 0);
    }

    #[test]
    fn an_abandoned_staging_leaves_nothing_in_the_jail() {
        let tmp = harness::TempDir::new("agent-jail-snapshot").unwrap();
        let jail = tmp.path().join("jail");
        std::fs::create_dir_all(&jail).unwrap();
        let dir = tmp.path().join("store/s1");
        let staging = JailStaging::prepare(&jail, &dir, 4242).unwrap();
        std::fs::create_dir(&staging.staged).unwrap();
        std::fs::write(staging.staged.join("memory"), b"half").unwrap();
        staging.abandon();
        assert_eq!(std::fs::read_dir(&jail).unwrap().count(), 0);
        assert!(!dir.exists());
    }
}
