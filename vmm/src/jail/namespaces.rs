//! The namespaces the VMM runs in: PID (unshared by the launcher, so that its child is PID 1 of
//! the new namespace), then mount, IPC, UTS and network (or a given network namespace) in the child.

use std::ffi::CString;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::Path;

use super::JailError;

/// Makes the next child of this process PID 1 of a new PID namespace. The caller itself stays in
/// its own namespace.
pub fn unshare_pid() -> Result<(), JailError> {
    // SAFETY: unshare takes flags only; CLONE_NEWPID changes what the next fork creates.
    if unsafe { libc::unshare(libc::CLONE_NEWPID) } != 0 {
        return Err(JailError::sys("unshare(CLONE_NEWPID)"));
    }
    Ok(())
}

/// Opens a network namespace file such as `/run/netns/NAME` (before the launcher forks, so that a
/// missing one is a clear error in the launcher).
pub fn open_netns(path: &Path) -> Result<File, JailError> {
    File::open(path).map_err(|e| JailError::io("cannot open network namespace", path, e))
}

/// Moves the calling (child) process into new mount, IPC and UTS namespaces, and into `netns` or a
/// new, empty network namespace.
pub fn unshare_rest(netns: Option<&File>) -> Result<(), JailError> {
    let mut flags = libc::CLONE_NEWNS | libc::CLONE_NEWIPC | libc::CLONE_NEWUTS;
    match netns {
        Some(file) => {
            // SAFETY: the fd is an open namespace file owned by `file`; setns only reads it.
            if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(JailError::sys("setns(network namespace)"));
            }
        }
        None => flags |= libc::CLONE_NEWNET,
    }
    // SAFETY: unshare takes flags only and affects only the calling process.
    if unsafe { libc::unshare(flags) } != 0 {
        return Err(JailError::sys("unshare(mount, IPC, UTS, network)"));
    }
    Ok(())
}

/// Names the jail's UTS namespace after the VM.
pub fn set_hostname(name: &str) -> Result<(), JailError> {
    let name = CString::new(name).map_err(|_| JailError::NotConfined("hostname contains NUL".into()))?;
    // SAFETY: the pointer and length describe the CString's bytes, which outlive the call.
    if unsafe { libc::sethostname(name.as_ptr(), name.as_bytes().len()) } != 0 {
        return Err(JailError::sys("sethostname"));
    }
    Ok(())
}
