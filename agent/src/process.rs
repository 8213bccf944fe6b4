//! Looking at and ending `vmm` processes by pid, for processes that are not (or no longer) the
//! agent's children.

use std::path::Path;

use rustix::process::{Pid, Signal};

/// Whether `pid` is alive and is the vmm serving `api_sock`: its command line has that path as an
/// argument. This guards against pid reuse after the vmm died (a zombie has an empty command line).
pub fn is_our_vmm(pid: u32, api_sock: &Path) -> bool {
    let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    let sock = api_sock.as_os_str().as_encoded_bytes();
    cmdline.split(|b| *b == 0).any(|arg| arg == sock)
}

/// The uid a jailed vmm runs its VM as (its `--uid`), from the launcher's command line; `None`
/// for a vmm that is not jailed (or gone).
pub fn jail_uid_of(pid: u32) -> Option<u32> {
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
    if !args.iter().any(|a| *a == b"--jail") {
        return None;
    }
    let at = args.iter().position(|a| *a == b"--uid")?;
    std::str::from_utf8(args.get(at + 1)?).ok()?.parse().ok()
}

/// The process that runs the VM of the vmm `pid`: a jailed vmm (`vmm --jail`) stays as the
/// launcher and runs the VM in a child it forked (same command line, no exec); an unjailed one
/// runs it itself.
pub fn vm_process(pid: u32) -> u32 {
    let children = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap_or_default();
    let mut children = children.split_whitespace().filter_map(|c| c.parse::<u32>().ok());
    match (children.next(), children.next()) {
        (Some(child), None) => {
            let cmdline = |p: u32| std::fs::read(format!("/proc/{p}/cmdline")).ok();
            match (cmdline(pid), cmdline(child)) {
                (Some(a), Some(b)) if a == b => child,
                _ => pid,
            }
        }
        _ => pid,
    }
}

/// Makes `fds` (open, close-on-exec in the agent) stay open, under the same numbers, in the
/// process `command` spawns, and only there: other processes the agent spawns meanwhile do not
/// get them.
// The agent's one unsafe block: `pre_exec` is how a descriptor reaches one child only.
#[allow(unsafe_code)]
pub fn inherit_fds(command: &mut tokio::process::Command, fds: Vec<std::os::fd::RawFd>) {
    // SAFETY: the closure runs in the forked child before exec, where only async-signal-safe
    // calls are allowed: it makes fcntl system calls alone (rustix: no allocation, no lock) on
    // descriptor numbers it owns by value. The descriptors are open in the parent when it forks
    // (the caller holds them until spawn returns), so they are open in the child, and borrowing
    // them for the call is sound.
    unsafe {
        command.pre_exec(move || {
            for &fd in &fds {
                let fd = std::os::fd::BorrowedFd::borrow_raw(fd);
                rustix::io::fcntl_setfd(fd, rustix::io::FdFlags::empty())?;
            }
            Ok(())
        });
    }
}

/// Sends SIGKILL to `pid`. Errors (already gone) are ignored: the caller watches the process anyway.
pub fn kill(pid: u32) {
    if let Some(pid) = i32::try_from(pid).ok().and_then(Pid::from_raw) {
        let _ = rustix::process::kill_process(pid, Signal::KILL);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recognises_a_process_by_its_arguments() {
        let mut child = std::process::Command::new("sleep").arg("30").spawn().unwrap();
        let pid = child.id();
        // Until the child has exec'd, /proc shows the parent's command line.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while !is_our_vmm(pid, Path::new("30")) {
            assert!(
                std::time::Instant::now() < deadline,
                "never saw sleep's arguments"
            );
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert!(!is_our_vmm(pid, Path::new("/other/api.sock")));
        kill(pid);
        let _ = child.wait();
        assert!(!is_our_vmm(pid, Path::new("30")));
    }
}
