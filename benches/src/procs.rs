//! The processes a benchmark started, found through `/proc`, so that an interrupted or failed run
//! can end them (vmms outlive the agent that started them, by design).

use std::path::Path;
use std::time::{Duration, Instant};

/// Whether the process exists and is not a zombie.
pub fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(')')
                .map(|(_, rest)| !rest.trim_start().starts_with('Z'))
        })
        .unwrap_or(false)
}

/// Live processes (other than this one) whose command line names something under `dir`: the vmms
/// and the agent a benchmark started there.
pub fn processes_under(dir: &Path) -> Vec<u32> {
    // With the separator: `/tmp/density-1-0` must not match `/tmp/density-1-01/...`.
    let needle = format!("{}/", dir.display());
    let me = std::process::id();
    let mut pids = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        if pid == me {
            continue;
        }
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        if String::from_utf8_lossy(&cmdline).contains(&needle) && alive(pid) {
            pids.push(pid);
        }
    }
    pids
}

/// Sends signal `sig` (`TERM`, `KILL`) to `pid`, a process this benchmark started, directly or
/// through its agent. kill(1) rather than libc: benches stay free of `unsafe` here.
pub fn signal(pid: u32, sig: &str) {
    let _ = std::process::Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .stderr(std::process::Stdio::null())
        .status();
}

/// SIGKILLs every process naming `dir` and waits (up to 10 s) until they are gone. Returns how
/// many there were. Blocks: from async code, call it on a blocking thread.
pub fn kill_all_under(dir: &Path) -> usize {
    let pids = processes_under(dir);
    for &pid in &pids {
        signal(pid, "KILL");
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while pids.iter().any(|&p| alive(p)) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    pids.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_a_child_naming_the_dir_and_kills_it() {
        let dir = std::env::temp_dir().join(format!("procs-test-{}", std::process::id()));
        // `sh -c CMD NAME`: NAME is the shell's $0, so the command line names the dir. `read` is
        // a builtin: no forked child, for a moment a copy of the shell, is found too.
        let mut child = std::process::Command::new("sh")
            .arg("-c")
            .arg("read line")
            .arg(format!("{}/x", dir.display()))
            .stdin(std::process::Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("sh: {e}"));
        let pid = child.id();
        assert!(alive(pid));
        // Until the child has exec'd `sh`, its command line is still this test's.
        let deadline = Instant::now() + Duration::from_secs(10);
        while processes_under(&dir).is_empty() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(processes_under(&dir), vec![pid]);
        assert_eq!(kill_all_under(&dir), 1);
        let _ = child.wait();
        assert!(processes_under(&dir).is_empty());
        assert!(!alive(u32::MAX));
    }
}
