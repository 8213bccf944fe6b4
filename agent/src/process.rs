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
