//! VMs as plain `vmm` processes (`--direct`), driven over their control sockets like
//! `benches/src/bin/snapshot.rs` does: no agent in the way, to tell its cost from the VMM's.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use harness::ControlClient;
use serde_json::json;
use vmm_api::control::{Response, VmState};

use crate::driver::{wait_quiet, Cleanup, Created, Prepared, RpcSeries, VmShape};
use crate::options::Mode;
use crate::procfs;

const SOCKET_TIMEOUT: Duration = Duration::from_secs(60);

fn ms(since: Instant) -> f64 {
    since.elapsed().as_secs_f64() * 1000.0
}

#[derive(Clone)]
pub struct DirectDriver {
    inner: Arc<Inner>,
}

struct Children {
    /// Set by cleanup: a creation still under way must not start another process after it.
    closed: bool,
    list: Vec<(String, Child)>,
}

struct Inner {
    vmm: PathBuf,
    dir: PathBuf,
    shape: VmShape,
    children: Mutex<Children>,
    snapshot: OnceLock<PathBuf>,
}

impl DirectDriver {
    pub fn new(vmm: &Path, dir: &Path, shape: VmShape) -> DirectDriver {
        DirectDriver {
            inner: Arc::new(Inner {
                vmm: vmm.to_path_buf(),
                dir: dir.to_path_buf(),
                shape,
                children: Mutex::new(Children {
                    closed: false,
                    list: Vec::new(),
                }),
                snapshot: OnceLock::new(),
            }),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    fn socket(&self, name: &str) -> PathBuf {
        self.inner.dir.join(format!("{name}.sock"))
    }

    fn log(&self, name: &str) -> PathBuf {
        self.inner.dir.join(format!("{name}.log"))
    }

    /// Spawns `vmm --api-sock <dir>/<name>.sock ARGS` (output to `<name>.log`) and keeps it.
    fn spawn(&self, name: &str, boot: bool) -> Result<u32> {
        let s = &self.inner.shape;
        let log = std::fs::File::create(self.log(name))?;
        let mut cmd = Command::new(&self.inner.vmm);
        if boot {
            cmd.arg("--kernel")
                .arg(&s.kernel)
                .args(["--cmdline", &s.cmdline])
                .args(["--vcpus", &s.vcpus.to_string()])
                .args(["--memory-mib", &s.memory_mib.to_string()]);
            let levers = &s.levers;
            if let Some(b) = &levers.balloon {
                let on_off = |v: bool| if v { "on" } else { "off" };
                cmd.arg("--balloon").arg(format!(
                    "amount_mib={},deflate_on_oom={},stats_interval_s={},free_page_reporting={}",
                    b.amount_mib,
                    on_off(b.deflate_on_oom),
                    b.stats_interval_s,
                    on_off(b.free_page_reporting)
                ));
            }
            if levers.mergeable {
                cmd.args(["--mergeable", "on"]);
            }
            let hugepages = match levers.hugepages {
                vmm_api::HugePages::Auto => "auto",
                vmm_api::HugePages::Off => "off",
                vmm_api::HugePages::Thp => "thp",
            };
            cmd.args(["--hugepages", hugepages]);
        }
        cmd.arg("--api-sock").arg(self.socket(name));
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        cmd.stdin(Stdio::null()).stdout(log.try_clone()?).stderr(log);
        let mut children = self.inner.children.lock().map_err(|_| anyhow!("poisoned"))?;
        if children.closed {
            bail!("cleaning up: not starting {name}");
        }
        let child = cmd
            .spawn()
            .with_context(|| format!("cannot run {}", self.inner.vmm.display()))?;
        let pid = child.id();
        children.list.push((name.to_string(), child));
        Ok(pid)
    }

    /// The last 16 KiB of a VM's output (its serial console goes to its log).
    pub fn console_tail(&self, name: &str) -> String {
        let text = std::fs::read(self.log(name)).unwrap_or_default();
        String::from_utf8_lossy(&text[text.len().saturating_sub(16 << 10)..]).into_owned()
    }

    fn log_tail(&self, name: &str) -> String {
        let text = std::fs::read_to_string(self.log(name)).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    /// Connects once the socket is there (polled every millisecond: it is part of the latency).
    fn connect(&self, name: &str, pid: u32) -> Result<ControlClient> {
        let sock = self.socket(name);
        let deadline = Instant::now() + SOCKET_TIMEOUT;
        while !sock.exists() {
            if Instant::now() > deadline || !procfs::alive(pid) {
                bail!("{name}: no control socket:\n{}", self.log_tail(name));
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        ControlClient::connect(&sock)
    }

    fn wait_log(&self, name: &str, pid: u32, marker: &str, deadline: Instant) -> Result<()> {
        loop {
            let text = std::fs::read_to_string(self.log(name)).unwrap_or_default();
            if text.contains(marker) {
                return Ok(());
            }
            if Instant::now() > deadline || !procfs::alive(pid) {
                bail!("{name}: no '{marker}':\n{}", self.log_tail(name));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Boots `name` to its workload: (pid, spawn to vCPUs running, spawn to the marker).
    fn boot_blocking(&self, name: &str) -> Result<(u32, f64, f64)> {
        let start = Instant::now();
        let deadline = start + self.inner.shape.boot_timeout;
        let pid = self.spawn(name, true)?;
        let mut c = self.connect(name, pid)?;
        let running_ms = loop {
            match c.ok(r#"{"id": 1, "request": "describe"}"#)? {
                Response::Description(d) if d.state == VmState::Running => break ms(start),
                Response::Description(_) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(5))
                }
                other => bail!("{name}: describe: {other:?}"),
            }
        };
        drop(c);
        self.wait_log(name, pid, self.inner.shape.ready_marker, deadline)?;
        Ok((pid, running_ms, ms(start)))
    }

    /// Ends `name` and forgets it.
    fn reap(&self, name: &str) {
        let child = self.inner.children.lock().ok().and_then(|mut g| {
            let at = g.list.iter().position(|(n, _)| n == name)?;
            Some(g.list.remove(at).1)
        });
        if let Some(mut child) = child {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn snapshot_blocking(&self, name: &str, pid: u32) -> Result<Prepared> {
        let mut c = self.connect(name, pid)?;
        c.ok(r#"{"id": 2, "request": "pause"}"#)?;
        let dir = self.inner.dir.join("snap");
        let line = json!({"id": 3, "request": {"snapshot-create": {"dir": dir, "kind": "full"}}});
        let start = Instant::now();
        let info = match c.ok(&line.to_string())? {
            Response::SnapshotCreated(info) => info,
            other => bail!("snapshot-create: {other:?}"),
        };
        let snapshot_ms = ms(start);
        let _ = c.ok(r#"{"id": 4, "request": "stop"}"#);
        drop(c);
        self.reap(name);
        let size = dir_size(&dir);
        let _ = self.inner.snapshot.set(dir.clone());
        Ok(Prepared {
            snapshot_ms,
            snapshot_memory_bytes: info.memory_bytes,
            snapshot_size_bytes: size,
            snapshot_dir: Some(dir),
            ..Default::default()
        })
    }

    fn create_blocking(&self, index: usize) -> Result<Created> {
        let name = format!("d{index}");
        if self.inner.shape.mode == Mode::Boot {
            let (pid, running_ms, ready_ms) = self.boot_blocking(&name)?;
            return Ok(Created {
                vm_id: name,
                pid,
                running_ms,
                ready_ms: Some(ready_ms),
            });
        }
        let snapshot = self
            .inner
            .snapshot
            .get()
            .ok_or_else(|| anyhow!("no snapshot to restore"))?;
        let start = Instant::now();
        let pid = self.spawn(&name, false)?;
        let mut c = self.connect(&name, pid)?;
        // No console: nobody reads a clone's, and the agent's clones write theirs to a file.
        let line = json!({"id": 1, "request": {"snapshot-restore": {
            "dir": snapshot, "resume": !self.inner.shape.paused, "overrides": {"serial": "off"}}}});
        match c.ok(&line.to_string()) {
            Ok(Response::Restored { .. }) => {}
            Ok(other) => bail!("{name}: snapshot-restore: {other:?}"),
            Err(e) => bail!("{name}: snapshot-restore: {e:#}\n{}", self.log_tail(&name)),
        }
        Ok(Created {
            vm_id: name,
            pid,
            running_ms: ms(start),
            ready_ms: None,
        })
    }

    pub async fn prepare(&self) -> Result<Prepared> {
        let name = "source";
        let me = self.clone();
        let (pid, _, source_ready_ms) = tokio::task::spawn_blocking(move || me.boot_blocking(name))
            .await?
            .context("booting the source VM")?;
        let (source_quiet_ms, source_cpu_pct) = wait_quiet(pid, &self.inner.shape).await;
        let me = self.clone();
        let prepared = tokio::task::spawn_blocking(move || me.snapshot_blocking(name, pid)).await??;
        Ok(Prepared {
            source_ready_ms,
            source_quiet_ms,
            source_cpu_pct,
            ..prepared
        })
    }

    pub async fn create(&self, index: usize) -> Result<Created> {
        let me = self.clone();
        tokio::task::spawn_blocking(move || me.create_blocking(index)).await?
    }

    /// Connect + `ping` on the VMs' control sockets, round robin: the direct analogue of an
    /// agent call.
    pub async fn rpc_latency(&self, samples: usize, vms: &[Created]) -> Result<Vec<RpcSeries>> {
        let me = self.clone();
        let names: Vec<String> = vms.iter().map(|v| v.vm_id.clone()).collect();
        tokio::task::spawn_blocking(move || {
            let mut out = Vec::with_capacity(samples);
            for name in names.iter().cycle().take(samples) {
                let t = Instant::now();
                let mut c = ControlClient::connect(&me.socket(name))?;
                match c.ok(r#"{"id": 1, "request": "ping"}"#)? {
                    Response::Pong => out.push(ms(t)),
                    other => bail!("{name}: ping: {other:?}"),
                }
            }
            Ok(vec![RpcSeries {
                name: "control socket connect + ping",
                samples_ms: out,
            }])
        })
        .await?
    }

    /// See [`crate::driver::Driver::set_memory_target`]: `update-balloon`, then `balloon-stats`.
    pub async fn set_memory_target(
        &self,
        vms: &[Created],
        target_mib: u64,
        timeout: Duration,
    ) -> Result<(usize, u64)> {
        let me = self.clone();
        let names: Vec<String> = vms.iter().map(|v| v.vm_id.clone()).collect();
        let want = u64::from(self.inner.shape.memory_mib).saturating_sub(target_mib);
        tokio::task::spawn_blocking(move || {
            let mut clients = Vec::with_capacity(names.len());
            for name in &names {
                let mut c = ControlClient::connect(&me.socket(name))?;
                let line =
                    format!(r#"{{"id": 1, "request": {{"update-balloon": {{"amount_mib": {want}}}}}}}"#);
                match c.ok(&line)? {
                    Response::BalloonUpdated => clients.push(c),
                    other => bail!("{name}: update-balloon: {other:?}"),
                }
            }
            let deadline = Instant::now() + timeout;
            loop {
                let mut reached = 0;
                let mut held = 0;
                for (name, c) in names.iter().zip(clients.iter_mut()) {
                    match c.ok(r#"{"id": 2, "request": "balloon-stats"}"#)? {
                        Response::BalloonStats(info) => {
                            held += info.actual_mib;
                            reached += usize::from(info.actual_mib == want);
                        }
                        other => bail!("{name}: balloon-stats: {other:?}"),
                    }
                }
                if reached == names.len() || Instant::now() > deadline {
                    return Ok((reached, held));
                }
                std::thread::sleep(Duration::from_millis(500));
            }
        })
        .await?
    }

    pub async fn cleanup(&self) -> Cleanup {
        let me = self.clone();
        let joined = tokio::task::spawn_blocking(move || {
            let mut report = Cleanup::default();
            let list = match me.inner.children.lock() {
                Ok(mut g) => {
                    g.closed = true;
                    std::mem::take(&mut g.list)
                }
                Err(_) => {
                    report.errors.push("the process list is poisoned".into());
                    Vec::new()
                }
            };
            for (_, mut child) in list {
                let _ = child.kill();
                match child.wait() {
                    Ok(_) => report.vms_stopped += 1,
                    Err(e) => report.errors.push(format!("wait for {}: {e}", child.id())),
                }
            }
            report
        })
        .await;
        joined.unwrap_or_else(|e| Cleanup {
            errors: vec![format!("cleanup task: {e}")],
            ..Default::default()
        })
    }
}

impl Drop for Inner {
    /// The last resort (a panic): no vmm outlives the benchmark.
    fn drop(&mut self) {
        if let Ok(mut g) = self.children.lock() {
            for (_, mut child) in std::mem::take(&mut g.list) {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}

/// Disk space of the files in `dir` (sparse files count what they hold).
fn dir_size(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.metadata().ok())
        .map(|m| m.blocks() * 512)
        .sum()
}
