//! What the benchmark asks of whatever starts the VMs: the agent (default) or plain vmm processes
//! (`--direct`). Both are cheap handles that many creations use at once.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Result;

use crate::agent_driver::AgentDriver;
use crate::direct_driver::DirectDriver;
use crate::options::{Levers, Mode, Options};
use crate::procfs;

/// One VM that runs.
#[derive(Debug, Clone)]
pub struct Created {
    pub vm_id: String,
    pub pid: u32,
    /// From the request (agent) or the process spawn (direct) to its vCPUs running (or, for
    /// clones restored paused, ready to).
    pub running_ms: f64,
    /// To the guest's workload running (its probe's marker on the console); boot mode only.
    pub ready_ms: Option<f64>,
}

/// The clone mode's source: booted once and snapshotted.
#[derive(Debug, Clone, Default)]
pub struct Prepared {
    pub source_ready_ms: f64,
    /// How long the source was left to settle after it was ready, and its CPU use (% of one
    /// core) over the last interval before the snapshot.
    pub source_quiet_ms: f64,
    pub source_cpu_pct: f64,
    pub snapshot_ms: f64,
    pub snapshot_memory_bytes: u64,
    pub snapshot_size_bytes: u64,
    /// Where the snapshot's files are (the clones map its memory file).
    pub snapshot_dir: Option<PathBuf>,
}

/// The latency samples of one kind of call.
#[derive(Debug, Clone)]
pub struct RpcSeries {
    pub name: &'static str,
    pub samples_ms: Vec<f64>,
}

/// What cleaning up found and did.
#[derive(Debug, Clone, Default)]
pub struct Cleanup {
    pub vms_stopped: usize,
    /// vmm processes still alive after the orderly part, killed by pid.
    pub strays_killed: usize,
    pub errors: Vec<String>,
}

/// What every VM is made of.
#[derive(Debug, Clone)]
pub struct VmShape {
    pub mode: Mode,
    pub memory_mib: u32,
    pub vcpus: u32,
    pub kernel: PathBuf,
    pub cmdline: String,
    pub ready_marker: &'static str,
    pub boot_timeout: Duration,
    pub source_quiet: Duration,
    pub quiet_percent: f64,
    /// Clones are restored paused.
    pub paused: bool,
    pub levers: Levers,
}

impl VmShape {
    /// No initrd: the probe runs from a late initcall and never returns, so nothing would use
    /// one, and unpacking it (asynchronously, after the probe reports) costs an emulated guest
    /// tens of seconds of CPU that every clone of an early snapshot would inherit.
    pub fn of(opts: &Options, kernel: &Path) -> VmShape {
        VmShape {
            mode: opts.mode,
            memory_mib: opts.memory_mib,
            vcpus: opts.vcpus,
            kernel: kernel.to_path_buf(),
            cmdline: opts.workload.cmdline(),
            ready_marker: opts.workload.ready_marker(),
            boot_timeout: opts.boot_timeout,
            source_quiet: opts.source_quiet,
            quiet_percent: opts.workload.quiet_percent(),
            paused: opts.paused,
            levers: opts.levers.clone(),
        }
    }
}

#[derive(Clone)]
pub enum Driver {
    Agent(AgentDriver),
    Direct(DirectDriver),
}

impl Driver {
    pub fn name(&self) -> &'static str {
        match self {
            Driver::Agent(_) => "agent",
            Driver::Direct(_) => "direct",
        }
    }

    /// Clone mode: boots the source VM, snapshots it and removes it.
    pub async fn prepare(&self) -> Result<Prepared> {
        match self {
            Driver::Agent(d) => d.prepare().await,
            Driver::Direct(d) => d.prepare().await,
        }
    }

    /// Starts VM number `index` (a clone or a boot, by mode) and waits until it runs.
    pub async fn create(&self, index: usize) -> Result<Created> {
        match self {
            Driver::Agent(d) => d.create(index).await,
            Driver::Direct(d) => d.create(index).await,
        }
    }

    /// Sets every VM's memory target (its balloon takes the rest) and waits until each balloon
    /// holds what it was asked to, or `timeout` passes: (VMs that got there, the balloons' sizes
    /// in MiB as last seen).
    pub async fn set_memory_target(
        &self,
        vms: &[Created],
        target_mib: u64,
        timeout: Duration,
    ) -> Result<(usize, u64)> {
        match self {
            Driver::Agent(d) => d.set_memory_target(vms, target_mib, timeout).await,
            Driver::Direct(d) => d.set_memory_target(vms, target_mib, timeout).await,
        }
    }

    /// The last bytes of a VM's serial console.
    pub async fn console_tail(&self, vm: &Created) -> Result<String> {
        match self {
            Driver::Agent(d) => d.console_tail(&vm.vm_id).await,
            Driver::Direct(d) => Ok(d.console_tail(&vm.vm_id)),
        }
    }

    /// The agent's pid, if there is one.
    pub fn agent_pid(&self) -> Option<u32> {
        match self {
            Driver::Agent(d) => Some(d.pid()),
            Driver::Direct(_) => None,
        }
    }

    /// Latency of the management calls while the VMs are resident.
    pub async fn rpc_latency(&self, samples: usize, vms: &[Created]) -> Result<Vec<RpcSeries>> {
        match self {
            Driver::Agent(d) => d.rpc_latency(samples).await,
            Driver::Direct(d) => d.rpc_latency(samples, vms).await,
        }
    }

    /// Stops and removes everything it started.
    pub async fn cleanup(&self) -> Cleanup {
        let (mut report, dir) = match self {
            Driver::Agent(d) => (d.cleanup().await, d.state_dir().to_path_buf()),
            Driver::Direct(d) => (d.cleanup().await, d.dir().to_path_buf()),
        };
        report.strays_killed += kill_strays(&dir).await;
        report
    }
}

const QUIET_INTERVAL: Duration = Duration::from_secs(2);

/// Waits (at most `shape.source_quiet`) until `pid` uses less than `shape.quiet_percent` of a
/// core over an interval: a guest that has printed its ready marker may still be busy finishing
/// its boot, and every clone of a snapshot taken then would redo that work. Returns (ms waited,
/// last %).
pub async fn wait_quiet(pid: u32, shape: &VmShape) -> (f64, f64) {
    let (max, quiet_percent) = (shape.source_quiet, shape.quiet_percent);
    let start = tokio::time::Instant::now();
    let mut percent = f64::NAN;
    while start.elapsed() < max {
        let Some(before) = procfs::cpu_ticks(pid) else {
            break;
        };
        let t = tokio::time::Instant::now();
        tokio::time::sleep(QUIET_INTERVAL).await;
        let Some(after) = procfs::cpu_ticks(pid) else {
            break;
        };
        let used_ms = after.saturating_sub(before) as f64 * 1000.0 / procfs::USER_HZ;
        percent = used_ms / (t.elapsed().as_secs_f64() * 1000.0) * 100.0;
        if percent < quiet_percent {
            break;
        }
    }
    (start.elapsed().as_secs_f64() * 1000.0, percent)
}

/// SIGKILLs every process still naming `dir` (what an interrupted creation may have left) and
/// waits until they are gone. Returns how many there were.
pub async fn kill_strays(dir: &Path) -> usize {
    let dir = dir.to_path_buf();
    tokio::task::spawn_blocking(move || benches::procs::kill_all_under(&dir))
        .await
        .unwrap_or(0)
}

pub use benches::procs::signal;
