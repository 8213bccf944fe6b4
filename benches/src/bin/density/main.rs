//! Density (issue 9): how many VMs this host holds, how fast it takes them, and what each costs.
//!
//! Fills the host in waves of VMs (restored clones of one snapshot, or full boots), through a
//! vmm-agent of its own or (`--direct`) as plain vmm processes, until a target count, a host
//! memory floor or a failure; then, with all of them resident, reads each vmm's PSS, the idle
//! VMs' host CPU over a window and the agent's RPC latency. Writes JSON, a Markdown summary and
//! two SVG charts, and removes everything it started, also on Ctrl-C / SIGTERM.

mod agent_driver;
mod direct_driver;
mod driver;
mod ksm;
mod options;
mod procfs;
mod report;
mod svg;

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context, Result};
use benches::CpuTicks;
use harness::{try_vmm_binary, GuestImages, TempDir};
use tokio::signal::unix::{signal, SignalKind};
use tokio::task::JoinSet;

use crate::agent_driver::AgentDriver;
use crate::direct_driver::DirectDriver;
use crate::driver::{Cleanup, Created, Driver, Prepared, RpcSeries, VmShape};
use crate::options::{Mode, Options, Workload, USAGE};
use crate::procfs::{GuestRam, PssSplit, Rollup};

/// One wave of VMs started at once.
pub struct Wave {
    pub created: Vec<Created>,
    pub failures: Vec<String>,
    pub wall_ms: f64,
    /// VMs resident once the wave is done.
    pub count_after: usize,
    pub mem_available_kib: u64,
    /// Sum of the resident vmms' PSS (smaps_rollup) after the wave.
    pub vmm_pss_kib: u64,
    pub agent_pss_kib: Option<u64>,
}

pub enum Stop {
    Target,
    MemoryFloor { available_kib: u64 },
    Failure(String),
}

impl Stop {
    pub fn describe(&self) -> String {
        match self {
            Stop::Target => "target count reached".into(),
            Stop::MemoryFloor { available_kib } => {
                format!("MemAvailable {} MiB below the floor", available_kib / 1024)
            }
            Stop::Failure(e) => format!("a VM failed to start: {e}"),
        }
    }

    pub fn key(&self) -> &'static str {
        match self {
            Stop::Target => "target",
            Stop::MemoryFloor { .. } => "memory-floor",
            Stop::Failure(_) => "failure",
        }
    }
}

/// Host CPU used over the window with every VM resident, in ms.
pub struct CpuWindow {
    pub secs: f64,
    pub vms_measured: usize,
    pub vmm_ms: f64,
    /// The vmms' vCPU threads' part of `vmm_ms` (on kvm_pvm the guest's own work shows there).
    pub vcpu_ms: f64,
    /// User-space part of `vmm_ms` (the rest is the host kernel: KVM, and on kvm_pvm the
    /// emulation of the guest's privileged instructions).
    pub user_ms: f64,
    pub agent_ms: Option<f64>,
    pub host_busy_ms: f64,
    pub host_total_ms: f64,
}

/// Measured with the host full.
/// What the memory levers did once the host was full.
#[derive(Debug, Clone, Default)]
pub struct LeverOutcome {
    /// With `--memory-target-mib`: VMs whose balloon got to its size, the MiB all balloons held,
    /// and how long setting and waiting took.
    pub balloons_reached: Option<usize>,
    pub balloon_held_mib: u64,
    pub balloon_secs: f64,
    pub ksm: Option<ksm::KsmStats>,
    /// With the `dirty` workload: each VM's guest-side rewrite rate over the CPU window, MiB/s
    /// (the probe reports the bytes it wrote once a second).
    pub dirty_mib_per_s: Vec<f64>,
}

/// The bytes the probe's `mem-dirty` thread has written, from the last report on a console.
fn dirty_bytes(console: &str) -> Option<u64> {
    console
        .lines()
        .rev()
        .find_map(|l| l.split("vmmprobe: mem-dirty passes=").nth(1))
        .and_then(|rest| rest.split_whitespace().find_map(|w| w.strip_prefix("bytes=")))
        .and_then(|b| b.parse().ok())
}

/// The `dirty_bytes` of every VM now (None where there is no report yet).
async fn dirty_sample(driver: &Driver, vms: &[Created]) -> Vec<Option<(Instant, u64)>> {
    let mut out = Vec::with_capacity(vms.len());
    for c in vms {
        let console = driver.console_tail(c).await.unwrap_or_default();
        out.push(dirty_bytes(&console).map(|b| (Instant::now(), b)));
    }
    out
}

pub struct Full {
    pub vms: Vec<(Created, Option<PssSplit>)>,
    pub levers: LeverOutcome,
    pub agent: Option<Rollup>,
    pub mem_available_kib: u64,
    pub cpu: CpuWindow,
    pub rpc: Vec<RpcSeries>,
    pub alive_after: usize,
}

pub struct Run {
    pub driver: &'static str,
    pub started_unix: u64,
    pub mem_total_kib: u64,
    /// MemAvailable when the benchmark started, and right before the first wave (after the
    /// clone mode's source VM is gone): the memory curve starts from the latter.
    pub start_mem_available_kib: u64,
    pub baseline_mem_available_kib: u64,
    pub prepared: Option<Prepared>,
    pub waves: Vec<Wave>,
    pub stop: Stop,
    pub full: Option<Full>,
    pub cleanup: Cleanup,
    pub work_dir: PathBuf,
    pub leftover_pids: Vec<u32>,
    pub work_dir_left: bool,
}

/// How long the balloons of a full host may take to reach a new memory target.
const BALLOON_TIMEOUT: Duration = Duration::from_secs(300);
/// How long KSM may take for its two full scans.
const KSM_TIMEOUT: Duration = Duration::from_secs(600);

pub fn host_cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// The `\r[####....] n/N` line on stderr.
struct Progress {
    target: usize,
}

impl Progress {
    fn draw(&self, done: usize, wave: usize, available_kib: u64) {
        const WIDTH: usize = 40;
        let filled = (done * WIDTH).checked_div(self.target).unwrap_or(0).min(WIDTH);
        eprint!(
            "\r[{}{}] {done}/{} VMs, wave {wave}, MemAvailable {} MiB   ",
            "#".repeat(filled),
            ".".repeat(WIDTH - filled),
            self.target,
            available_kib / 1024
        );
        let _ = std::io::stderr().flush();
    }

    fn note(&self, text: &str) {
        eprintln!("{text}");
    }
}

async fn fill(opts: &Options, driver: &Driver, progress: &Progress) -> (Vec<Wave>, Vec<Created>, Stop) {
    let floor_kib = opts.min_free_mib * 1024;
    let mut waves: Vec<Wave> = Vec::new();
    let mut resident: Vec<Created> = Vec::new();
    let mut next = 0;
    progress.draw(0, 0, procfs::mem_available_kib());
    let stop = loop {
        if resident.len() >= opts.count {
            break Stop::Target;
        }
        let available_kib = procfs::mem_available_kib();
        if available_kib < floor_kib {
            break Stop::MemoryFloor { available_kib };
        }
        let n = opts.concurrency.min(opts.count - resident.len());
        let start = Instant::now();
        let mut set = JoinSet::new();
        for _ in 0..n {
            let d = driver.clone();
            let index = next;
            next += 1;
            set.spawn(async move { d.create(index).await });
        }
        let mut created = Vec::new();
        let mut failures = Vec::new();
        while let Some(joined) = set.join_next().await {
            match joined {
                Ok(Ok(c)) => created.push(c),
                Ok(Err(e)) => failures.push(format!("{e:#}")),
                Err(e) => failures.push(format!("creation task: {e}")),
            }
        }
        let wall_ms = start.elapsed().as_secs_f64() * 1000.0;
        resident.extend(created.iter().cloned());
        let mem_available_kib = procfs::mem_available_kib();
        let vmm_pss_kib = resident
            .iter()
            .filter_map(|c| procfs::rollup(c.pid))
            .map(|r| r.pss)
            .sum();
        waves.push(Wave {
            created,
            failures: failures.clone(),
            wall_ms,
            count_after: resident.len(),
            mem_available_kib,
            vmm_pss_kib,
            agent_pss_kib: driver.agent_pid().and_then(procfs::rollup).map(|r| r.pss),
        });
        progress.draw(resident.len(), waves.len(), mem_available_kib);
        if let Some(first) = failures.into_iter().next() {
            break Stop::Failure(first);
        }
    };
    eprintln!();
    (waves, resident, stop)
}

async fn cpu_window(window: Duration, vms: &[Created], agent: Option<u32>) -> CpuWindow {
    let before: Vec<Option<CpuTicks>> = vms.iter().map(|c| CpuTicks::read(c.pid).ok()).collect();
    let agent_before = agent.and_then(procfs::cpu_ticks);
    let host_before = procfs::host_ticks();
    let start = Instant::now();
    tokio::time::sleep(window).await;
    let secs = start.elapsed().as_secs_f64();
    let host_after = procfs::host_ticks();
    let agent_after = agent.and_then(procfs::cpu_ticks);
    let mut vmm_ms = 0.0;
    let mut vcpu_ms = 0.0;
    let mut user_ms = 0.0;
    let mut vms_measured = 0;
    for (c, b) in vms.iter().zip(before) {
        if let (Some(b), Ok(a)) = (b, CpuTicks::read(c.pid)) {
            let used = a.since(&b);
            vmm_ms += used.total();
            vcpu_ms += used.vcpu.unwrap_or(0.0);
            user_ms += used.user;
            vms_measured += 1;
        }
    }
    let to_ms = |ticks: u64| ticks as f64 * 1000.0 / procfs::USER_HZ;
    let (host_busy_ms, host_total_ms) = match (host_before, host_after) {
        (Some((b0, t0)), Some((b1, t1))) => (to_ms(b1.saturating_sub(b0)), to_ms(t1.saturating_sub(t0))),
        _ => (0.0, 0.0),
    };
    CpuWindow {
        secs,
        vms_measured,
        vmm_ms,
        vcpu_ms,
        user_ms,
        agent_ms: match (agent_before, agent_after) {
            (Some(b), Some(a)) => Some(to_ms(a.saturating_sub(b))),
            _ => None,
        },
        host_busy_ms,
        host_total_ms,
    }
}

async fn measure_full(
    opts: &Options,
    driver: &Driver,
    prepared: Option<&Prepared>,
    vms: &[Created],
    ksm: Option<&ksm::Ksm>,
    progress: &Progress,
) -> Result<Full> {
    progress.note(&format!(
        "{} VMs resident; settling {} s",
        vms.len(),
        opts.settle.as_secs()
    ));
    tokio::time::sleep(opts.settle).await;
    let mut levers = LeverOutcome::default();
    if let Some(target) = opts.levers.memory_target_mib {
        progress.note(&format!("setting every VM's memory target to {target} MiB"));
        let start = Instant::now();
        let (reached, held) = driver.set_memory_target(vms, target, BALLOON_TIMEOUT).await?;
        levers.balloons_reached = Some(reached);
        levers.balloon_held_mib = held;
        levers.balloon_secs = start.elapsed().as_secs_f64();
        progress.note(&format!(
            "{reached} of {} balloons at their size after {:.1} s ({held} MiB held)",
            vms.len(),
            levers.balloon_secs
        ));
    }
    if let Some(k) = ksm {
        progress.note("waiting for KSM to complete two full scans");
        let stats = k.settle(KSM_TIMEOUT).await;
        progress.note(&format!(
            "KSM: {} pages shared by {} mappings after {} scans in {:.1} s",
            stats.pages_shared, stats.pages_sharing, stats.full_scans, stats.wait_secs
        ));
        levers.ksm = Some(stats);
    }
    let guest = GuestRam {
        memory_bytes: u64::from(opts.memory_mib) << 20,
        snapshot_dir: prepared
            .and_then(|p| p.snapshot_dir.as_ref())
            .map(|d| format!("{}/", d.display())),
    };
    let per_vm: Vec<(Created, Option<PssSplit>)> =
        vms.iter().map(|c| (c.clone(), guest.split(c.pid))).collect();
    let agent = driver.agent_pid().and_then(procfs::rollup);
    let mem_available_kib = procfs::mem_available_kib();
    if let (Some(nice), Some(pid)) = (opts.agent_nice, driver.agent_pid()) {
        // This process too: it is the RPC client, and its wait in the run queue would otherwise
        // be counted as the agent's latency.
        renice_threads(pid, nice)?;
        renice_threads(std::process::id(), nice)?;
    }
    progress.note(&format!("measuring host CPU for {} s", opts.window.as_secs()));
    let dirty = matches!(opts.workload, Workload::Dirty(_));
    let dirty_before = match dirty {
        true => dirty_sample(driver, vms).await,
        false => Vec::new(),
    };
    let cpu = cpu_window(opts.window, vms, driver.agent_pid()).await;
    if dirty {
        let after = dirty_sample(driver, vms).await;
        levers.dirty_mib_per_s = dirty_before
            .iter()
            .zip(after)
            .filter_map(|(b, a)| {
                let ((t0, b0), (t1, b1)) = ((*b)?, a?);
                let secs = t1.duration_since(t0).as_secs_f64();
                (secs > 0.0).then(|| b1.saturating_sub(b0) as f64 / secs / 1048576.0)
            })
            .collect();
    }
    let alive_after = vms.iter().filter(|c| procfs::alive(c.pid)).count();
    progress.note(&format!("{} calls of each RPC", opts.rpc_samples));
    let rpc = driver.rpc_latency(opts.rpc_samples, vms).await?;
    Ok(Full {
        vms: per_vm,
        levers,
        agent,
        mem_available_kib,
        cpu,
        rpc,
        alive_after,
    })
}

/// Renices every thread of `pid` (setpriority applies to one thread on Linux, and threads made
/// later inherit from their creator: done once the VMs are all there, so no vmm inherits it).
fn renice_threads(pid: u32, nice: i32) -> Result<()> {
    let tids: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/task"))
        .with_context(|| format!("cannot list the agent's threads ({pid})"))?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    let status = std::process::Command::new("renice")
        .args(["-n", &nice.to_string(), "-p"])
        .args(&tids)
        .stdout(std::process::Stdio::null())
        .status()
        .context("cannot run renice")?;
    anyhow::ensure!(
        status.success(),
        "renice -n {nice} of the agent's threads: {status}"
    );
    Ok(())
}

/// Everything up to the cleanup: the source (clone mode), the waves, the measurements.
async fn bench(opts: &Options, driver: &Driver, ksm: Option<&ksm::Ksm>, progress: &Progress) -> Result<Run> {
    let start_mem_available_kib = procfs::mem_available_kib();
    let started_unix = benches::unix_time();
    let prepared = match opts.mode {
        Mode::Clone => {
            progress.note("booting the source VM and taking its snapshot (one guest boot)");
            let p = driver.prepare().await?;
            progress.note(&format!(
                "source ready after {:.1} s, quiet ({:.1}% of a core) {:.1} s later, snapshot in {:.0} ms",
                p.source_ready_ms / 1000.0,
                p.source_cpu_pct,
                p.source_quiet_ms / 1000.0,
                p.snapshot_ms
            ));
            Some(p)
        }
        Mode::Boot => None,
    };
    let baseline_mem_available_kib = procfs::mem_available_kib();
    let (waves, resident, stop) = fill(opts, driver, progress).await;
    let full = match resident.is_empty() {
        true => None,
        false => Some(measure_full(opts, driver, prepared.as_ref(), &resident, ksm, progress).await?),
    };
    Ok(Run {
        driver: driver.name(),
        started_unix,
        mem_total_kib: procfs::meminfo_kib("MemTotal").unwrap_or(0),
        start_mem_available_kib,
        baseline_mem_available_kib,
        prepared,
        waves,
        stop,
        full,
        cleanup: Cleanup::default(),
        work_dir: PathBuf::new(),
        leftover_pids: Vec::new(),
        work_dir_left: false,
    })
}

fn agent_binary(opts: &Options, vmm: &Path) -> Result<PathBuf> {
    let candidates = [
        opts.agent.clone(),
        std::env::var_os("VMM_AGENT_BIN").map(PathBuf::from),
        Some(vmm.with_file_name("vmm-agent")),
        std::env::current_exe()
            .ok()
            .map(|p| p.with_file_name("vmm-agent")),
    ];
    candidates
        .into_iter()
        .flatten()
        .find(|p| p.exists())
        .ok_or_else(|| {
            anyhow!("no vmm-agent binary (--agent, $VMM_AGENT_BIN, next to the vmm or to density): run `cargo build --release -p vmm-agent`")
        })
}

async fn run(opts: Options) -> Result<()> {
    let mut interrupt = signal(SignalKind::interrupt()).context("cannot handle SIGINT")?;
    let mut terminate = signal(SignalKind::terminate()).context("cannot handle SIGTERM")?;
    let images = GuestImages::get()?;
    let vmm = match &opts.vmm {
        Some(p) => p.clone(),
        None => try_vmm_binary()?,
    };
    // Short: the agent's and the vmms' socket paths under it must fit in 108 bytes.
    let work = TempDir::new_in(Path::new("/tmp"), "density")?;
    let work_dir = work.path().to_path_buf();
    let shape = VmShape::of(&opts, &images.vmlinux);
    let progress = Progress { target: opts.count };
    let driver = if opts.direct {
        Driver::Direct(DirectDriver::new(&vmm, &work_dir, shape))
    } else {
        let agent = agent_binary(&opts, &vmm)?;
        Driver::Agent(AgentDriver::start(&agent, &vmm, &work_dir, shape, opts.count, &opts.agent_args).await?)
    };
    let ksm = match opts.levers.mergeable {
        true => Some(ksm::Ksm::enable()?),
        false => None,
    };
    let outcome = tokio::select! {
        r = bench(&opts, &driver, ksm.as_ref(), &progress) => r,
        _ = interrupt.recv() => Err(anyhow!("interrupted (SIGINT)")),
        _ = terminate.recv() => Err(anyhow!("interrupted (SIGTERM)")),
    };
    if outcome.is_err() {
        eprintln!();
    }
    // Further signals are caught by the handlers above and ignored: cleanup runs to its end.
    progress.note("cleaning up: stopping every VM, the agent, removing the snapshot and temp dir");
    let cleanup = driver.cleanup().await;
    if let Some(k) = ksm {
        k.restore();
    }
    drop(driver);
    drop(work);
    let leftover_pids = procfs::processes_under(&work_dir);
    let work_dir_left = work_dir.exists();
    for e in &cleanup.errors {
        eprintln!("cleanup: {e}");
    }
    if !leftover_pids.is_empty() || work_dir_left {
        eprintln!(
            "cleanup incomplete: processes {leftover_pids:?} and/or {} remain",
            work_dir.display()
        );
    }
    let mut run = outcome?;
    run.cleanup = cleanup;
    run.work_dir = work_dir;
    run.leftover_pids = leftover_pids;
    run.work_dir_left = work_dir_left;
    let markdown = report::write_all(&opts, &run)?;
    println!("{markdown}");
    eprintln!(
        "wrote {} (and .md, -latency.svg, -memory.svg)",
        opts.out.display()
    );
    Ok(())
}

fn main() -> Result<()> {
    if benches::wants_help() {
        println!("{USAGE}");
        return Ok(());
    }
    let opts = Options::parse(std::env::args().skip(1))?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(run(opts))
}

#[cfg(test)]
mod tests {
    #[test]
    fn dirty_reports_are_read_from_the_last_line() {
        let console = "vmmprobe: mem-dirty started bytes=1 result=0\nvmmprobe: mem-dirty passes=3 bytes=100 errors=0\nnoise\nvmmprobe: mem-dirty passes=9 bytes=900 errors=0\n";
        assert_eq!(super::dirty_bytes(console), Some(900));
        assert_eq!(super::dirty_bytes("vmmprobe: idle"), None);
    }
}
