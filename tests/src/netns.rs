//! Network namespaces that a test creates, fills with TAP devices, runs a VMM in, and removes
//! again with everything in them. Traffic never leaves them: the only addresses are the ones the
//! test gives its own TAP devices and guests.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::process::Command;
use std::sync::Mutex;
use std::thread::JoinHandle;

use anyhow::{bail, Context, Result};

/// A named network namespace (`ip netns add`), deleted on drop with the processes in it.
pub struct NetNs {
    name: String,
}

/// The namespaces of this process that exist now, for [`NetNs::remove_all`].
static LIVE: Mutex<Vec<String>> = Mutex::new(Vec::new());

fn live() -> std::sync::MutexGuard<'static, Vec<String>> {
    // A list of names is valid whatever panicked while it was held.
    LIVE.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Process ids of the processes in namespace `name`.
fn pids_in(name: &str) -> Result<Vec<u32>> {
    let out = run(Command::new("ip").args(["netns", "pids", name]))?;
    Ok(out.split_whitespace().filter_map(|p| p.parse().ok()).collect())
}

/// Kills the processes in namespace `name` and deletes it.
fn remove(name: &str) {
    if let Ok(pids) = pids_in(name) {
        for pid in pids {
            let _ = Command::new("kill").args(["-9", &pid.to_string()]).output();
        }
    }
    let _ = Command::new("ip").args(["netns", "del", name]).output();
}

fn run(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("run {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

impl NetNs {
    /// Creates `vmmt-<tag>-<pid>` with its loopback up. `tag` keeps parallel tests apart.
    pub fn new(tag: &str) -> Result<NetNs> {
        let name = format!("vmmt-{tag}-{}", std::process::id());
        // A namespace left by a killed earlier run of this very test and pid is stale.
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        run(Command::new("ip").args(["netns", "add", &name]))?;
        live().push(name.clone());
        let ns = NetNs { name };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// Removes every namespace this process made that is not dropped yet, with its processes:
    /// for a program that ends on a signal, when no destructor will run.
    pub fn remove_all() {
        let names = std::mem::take(&mut *live());
        for name in names {
            remove(&name);
        }
    }

    /// Its name.
    /// Pings `addr` from inside the namespace (3 echoes 0.2 s apart, up to `wait_s` seconds each)
    /// until a round is answered, at most `rounds` times (a guest may still be bringing its
    /// interface up). Returns ping's output.
    pub fn ping(&self, addr: &str, wait_s: u32, rounds: u32) -> Result<String> {
        let wait = wait_s.to_string();
        let mut last = String::new();
        for _ in 0..rounds.max(1) {
            let out = Command::new("ip")
                .args([
                    "netns", "exec", &self.name, "ping", "-c", "3", "-i", "0.2", "-W", &wait, addr,
                ])
                .output()
                .context("cannot run ping")?;
            last = format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            if out.status.success() {
                return Ok(last);
            }
        }
        bail!("ping {addr} in {} failed:\n{last}", self.name)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Runs `ip -n NS ARGS...`.
    pub fn ip(&self, args: &[&str]) -> Result<String> {
        run(Command::new("ip").args(["-n", &self.name]).args(args))
    }

    /// Adds a TAP device `tap` with `cidr` (e.g. `10.77.0.1/24`) on the host side, up.
    pub fn add_tap(&self, tap: &str, cidr: &str) -> Result<()> {
        self.ip(&["tuntap", "add", "dev", tap, "mode", "tap"])?;
        self.ip(&["addr", "add", cidr, "dev", tap])?;
        self.ip(&["link", "set", tap, "up"])?;
        Ok(())
    }

    /// Adds bridge `bridge` with `cidr` on it and TAP devices `taps` as its ports, all up: guests
    /// behind any of the taps share one L2 segment with the bridge's address.
    pub fn add_bridge(&self, bridge: &str, cidr: &str, taps: &[&str]) -> Result<()> {
        self.ip(&["link", "add", bridge, "type", "bridge"])?;
        self.ip(&["addr", "add", cidr, "dev", bridge])?;
        self.ip(&["link", "set", bridge, "up"])?;
        for tap in taps {
            self.ip(&["tuntap", "add", "dev", tap, "mode", "tap"])?;
            self.ip(&["link", "set", tap, "master", bridge])?;
            self.ip(&["link", "set", tap, "up"])?;
        }
        Ok(())
    }

    /// `program` run inside the namespace (`ip netns exec`, which keeps the process id).
    pub fn command(&self, program: &std::path::Path) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name]).arg(program);
        cmd
    }

    /// The interface names in the namespace.
    pub fn links(&self) -> Result<Vec<String>> {
        let out = self.ip(&["-o", "link", "show"])?;
        Ok(out
            .lines()
            .filter_map(|l| l.split(": ").nth(1))
            .map(|n| n.split('@').next().unwrap_or(n).to_string())
            .collect())
    }

    /// Process ids of the processes in the namespace.
    pub fn pids(&self) -> Result<Vec<u32>> {
        pids_in(&self.name)
    }

    /// Runs `f` on a new thread that has joined the namespace, so its sockets live there.
    pub fn spawn<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> Result<T> + Send + 'static,
    ) -> Result<JoinHandle<Result<T>>> {
        let path = format!("/var/run/netns/{}", self.name);
        let ns = File::open(&path).with_context(|| format!("open {path}"))?;
        Ok(std::thread::spawn(move || {
            // SAFETY: setns takes a descriptor `ns` keeps open and a flag; it moves only the calling
            // thread (this new one) into the namespace.
            if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                bail!("setns: {}", std::io::Error::last_os_error());
            }
            f()
        }))
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        live().retain(|n| n != &self.name);
        remove(&self.name);
    }
}
