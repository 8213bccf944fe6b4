//! Publishing a listening Unix socket so that its path appearing means it accepts connections.
//!
//! `bind(2)` creates the socket file before `listen(2)` makes it accept, so a client that waits
//! for the path and connects in between gets ECONNREFUSED (a CI run of ours failed on exactly
//! that). Binding under a temporary name in the same directory and renaming it into place once it
//! listens (and has its final mode) closes the window for every client, ours or an operator's.
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};

/// sun_path holds 108 bytes with the terminating NUL.
pub const MAX_SOCKET_PATH: usize = 107;

/// Listens on `path` (which must not exist), with file mode `mode` when given. The path appears
/// only once the socket accepts; if the temporary name would not fit in sun_path, `path` is bound
/// directly (the window stays open then, but nothing else changes).
pub fn bind_published(path: &Path, mode: Option<u32>) -> io::Result<UnixListener> {
    let staged = staging_path(path).filter(|p| p.as_os_str().len() <= MAX_SOCKET_PATH);
    let bind_at = staged.as_deref().unwrap_or(path);
    // A staging file left by a process that died at this point is ours to replace.
    if staged.is_some() {
        let _ = std::fs::remove_file(bind_at);
    }
    let listener = UnixListener::bind(bind_at)?;
    let publish = || -> io::Result<()> {
        if let Some(mode) = mode {
            std::fs::set_permissions(bind_at, std::fs::Permissions::from_mode(mode))?;
        }
        if staged.is_some() {
            // rename(2) would silently replace a file created at `path` meanwhile; link(2) refuses.
            std::fs::hard_link(bind_at, path)?;
            std::fs::remove_file(bind_at)?;
        }
        Ok(())
    };
    if let Err(e) = publish() {
        let _ = std::fs::remove_file(bind_at);
        return Err(e);
    }
    Ok(listener)
}

fn staging_path(path: &Path) -> Option<PathBuf> {
    let name = path.file_name()?.to_str()?;
    Some(path.with_file_name(format!(".{name}.{}", std::process::id())))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixStream;

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("api-socket-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn the_published_path_accepts_and_the_staging_name_is_gone() {
        let dir = scratch("publish");
        let path = dir.join("api.sock");
        let listener = bind_published(&path, Some(0o600)).unwrap();
        let _client = UnixStream::connect(&path).unwrap();
        assert!(listener.accept().is_ok());
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let names: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("api.sock")]);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn an_existing_path_is_refused_and_left_alone() {
        let dir = scratch("exists");
        let path = dir.join("api.sock");
        std::fs::write(&path, b"keep").unwrap();
        let err = bind_published(&path, None).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::AlreadyExists);
        assert_eq!(std::fs::read(&path).unwrap(), b"keep");
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 1);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_path_too_long_to_stage_is_bound_directly() {
        let dir = scratch("long");
        let room = MAX_SOCKET_PATH - dir.as_os_str().len() - 1;
        let path = dir.join("s".repeat(room));
        let _listener = bind_published(&path, None).unwrap();
        assert!(UnixStream::connect(&path).is_ok());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
