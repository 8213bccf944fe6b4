//! Each VM's usage, read at scrape time for metering: CPU time and resident memory of its vmm
//! process (from `/proc`), and its drives' and NICs' counters (from the vmm's `metrics` control
//! request, on a connection of its own so that a scrape never waits behind the VM's actor).
//!
//! VMs are read in parallel, each within [`VM_TIMEOUT`]: a stuck vmm costs a scrape that long at
//! most, and only its own figures.

use std::path::{Path, PathBuf};
use std::time::Duration;

use vmm_api::control::{Request, Response, VmMetrics};

use crate::control::{ControlClientError, ControlConn};
use crate::process::is_our_vmm;
use crate::proto::{Vm, VmState};
use crate::state::AgentConfig;
use crate::store::holds_resources;

/// How long one VM's figures may take to read.
pub const VM_TIMEOUT: Duration = Duration::from_secs(2);

/// One VM's usage.
#[derive(Debug, Clone, PartialEq)]
pub struct VmUsage {
    /// The VM.
    pub vm_id: String,
    /// User and system CPU time of its vmm process, all threads (the vCPUs included).
    pub cpu_seconds: f64,
    /// Resident memory of its vmm process (`VmRSS`).
    pub resident_bytes: u64,
    /// Its drives' and NICs' counters; `None` when the vmm did not give them (the VM is not
    /// running or paused, or the request failed).
    pub devices: Option<VmMetrics>,
}

/// Why (part of) a VM's figures are missing from a scrape.
#[derive(Debug, thiserror::Error)]
pub enum UsageError {
    /// Its process's `/proc` files cannot be read or parsed.
    #[error("VM '{0}': /proc of its vmm")]
    Process(String, #[source] std::io::Error),
    /// The vmm did not answer the `metrics` request.
    #[error("VM '{0}': metrics from the vmm")]
    Control(String, #[source] ControlClientError),
    /// The vmm answered the `metrics` request with something else.
    #[error("VM '{0}': the vmm answered metrics with something else")]
    UnexpectedAnswer(String),
    /// Reading took longer than [`VM_TIMEOUT`].
    #[error("VM '{0}': no figures within {VM_TIMEOUT:?}")]
    Timeout(String),
    /// The reading task failed.
    #[error("usage task: {0}")]
    Task(String),
}

impl UsageError {
    /// Every value [`UsageError::reason`] gives, and `store` (the VM list itself was not read).
    pub const REASONS: [&'static str; 4] = ["store", "process", "control", "timeout"];

    /// The `reason` label of `vmmagent_scrape_errors_total`.
    pub fn reason(&self) -> &'static str {
        match self {
            UsageError::Process(..) | UsageError::Task(_) => "process",
            UsageError::Control(..) | UsageError::UnexpectedAnswer(_) => "control",
            UsageError::Timeout(_) => "timeout",
        }
    }
}

/// Reads the usage of every VM of `vms` that has a vmm process, in parallel. Returns the figures
/// read (sorted by VM id) and what could not be read; a VM whose devices did not answer keeps its
/// CPU and memory figures.
pub async fn collect(config: &AgentConfig, vms: &[Vm]) -> (Vec<VmUsage>, Vec<UsageError>) {
    let mut tasks = tokio::task::JoinSet::new();
    for vm in vms {
        if vm.pid == 0 || !holds_resources(vm.state()) {
            continue;
        }
        let vm_id = vm.vm_id.clone();
        let sock = config.api_sock(&vm.vm_id);
        let pid = vm.pid;
        // Starting and stopping vmms may have no VM to describe yet or any more.
        let ask_devices = matches!(vm.state(), VmState::Running | VmState::Paused);
        tasks.spawn(async move {
            let read = read_vm(vm_id.clone(), pid, sock, ask_devices);
            match tokio::time::timeout(VM_TIMEOUT, read).await {
                Ok(result) => result,
                Err(_) => Err(UsageError::Timeout(vm_id)),
            }
        });
    }
    let mut usages = Vec::new();
    let mut errors = Vec::new();
    while let Some(done) = tasks.join_next().await {
        match done {
            Ok(Ok((Some(usage), device_error))) => {
                usages.push(usage);
                errors.extend(device_error);
            }
            // The vmm ended since the store was read: it has no figures, and that is no error.
            Ok(Ok((None, _))) => {}
            Ok(Err(e)) => errors.push(e),
            Err(e) => errors.push(UsageError::Task(e.to_string())),
        }
    }
    usages.sort_by(|a, b| a.vm_id.cmp(&b.vm_id));
    (usages, errors)
}

/// One VM's figures: `None` if `pid` is no longer its vmm; with the error of its devices' figures
/// if only those failed.
async fn read_vm(
    vm_id: String,
    pid: u32,
    sock: PathBuf,
    ask_devices: bool,
) -> Result<(Option<VmUsage>, Option<UsageError>), UsageError> {
    let check_sock = sock.clone();
    let process = tokio::task::spawn_blocking(move || {
        // Before reading: a pid the store still names may already belong to another process.
        if !is_our_vmm(pid, &check_sock) {
            return Ok(None);
        }
        // A jailed vmm's VM runs in the launcher's child.
        read_process(crate::process::vm_process(pid)).map(Some)
    })
    .await
    .map_err(|e| UsageError::Task(e.to_string()))?
    .map_err(|e| UsageError::Process(vm_id.clone(), e))?;
    let Some((cpu_seconds, resident_bytes)) = process else {
        return Ok((None, None));
    };
    let (devices, device_error) = if ask_devices {
        match vmm_metrics(&vm_id, &sock).await {
            Ok(m) => (Some(m), None),
            Err(e) => (None, Some(e)),
        }
    } else {
        (None, None)
    };
    let usage = VmUsage {
        vm_id,
        cpu_seconds,
        resident_bytes,
        devices,
    };
    Ok((Some(usage), device_error))
}

/// The vmm's own counters, over a new connection to its control socket (the vmm serves several
/// clients; this one closes when it is dropped).
async fn vmm_metrics(vm_id: &str, sock: &Path) -> Result<VmMetrics, UsageError> {
    let control = |e| UsageError::Control(vm_id.to_string(), e);
    // Well within the caller's timeout, so that a slow vmm leaves its /proc figures standing.
    let timeout = VM_TIMEOUT / 2;
    let answer = tokio::time::timeout(timeout, async {
        let (conn, _events) = ControlConn::connect(sock).await?;
        conn.request(Request::Metrics, timeout).await
    })
    .await
    .map_err(|_| control(ControlClientError::Timeout(timeout)))?
    .map_err(control)?;
    match answer {
        Response::Metrics(m) => Ok(m),
        _ => Err(UsageError::UnexpectedAnswer(vm_id.to_string())),
    }
}

/// CPU seconds (user + system, all threads) of process `pid`, if it can be read.
pub(crate) fn cpu_seconds(pid: u32) -> Option<f64> {
    read_process(pid).ok().map(|(cpu, _)| cpu)
}

/// Seconds the threads of process `pid` have run or waited to run (`/proc/PID/task/*/schedstat`:
/// time on a CPU plus time runnable on a run queue), if the kernel keeps these figures. Unlike
/// CPU time, its rate does not fall when the host is short of CPU: a vCPU that is always
/// runnable counts one core however little of one it gets. `None` on a kernel without them
/// (`CONFIG_SCHED_INFO`), which a caller tells from a process that is gone by its CPU time.
pub(crate) fn demand_seconds(pid: u32) -> Option<f64> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).ok()?;
    let mut nanos: Option<u64> = None;
    for task in tasks.flatten() {
        // A thread that ended since the listing counts nothing.
        if let Ok(text) = std::fs::read_to_string(task.path().join("schedstat")) {
            let own = demand_nanos_of_schedstat(&text)?;
            nanos = Some(nanos.unwrap_or(0).saturating_add(own));
        }
    }
    nanos.map(|n| n as f64 / 1e9)
}

/// On-CPU plus run-queue nanoseconds from the text of a `schedstat` file.
fn demand_nanos_of_schedstat(text: &str) -> Option<u64> {
    let mut fields = text.split_whitespace().map(|f| f.parse::<u64>().ok());
    let running = fields.next()??;
    let waiting = fields.next()??;
    Some(running.saturating_add(waiting))
}

/// CPU seconds and resident bytes of process `pid`.
fn read_process(pid: u32) -> std::io::Result<(f64, u64)> {
    let invalid = |what: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, what.to_string());
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let ticks = cpu_ticks_of_stat(&stat).ok_or_else(|| invalid("unexpected /proc/PID/stat"))?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let resident =
        resident_bytes_of_status(&status).ok_or_else(|| invalid("no VmRSS in /proc/PID/status"))?;
    let per_second = rustix::param::clock_ticks_per_second().max(1);
    Ok((ticks as f64 / per_second as f64, resident))
}

/// utime + stime (clock ticks) from the text of `/proc/PID/stat`. The command name in parentheses
/// may hold spaces and parentheses, so fields are counted after its last `)`.
fn cpu_ticks_of_stat(stat: &str) -> Option<u64> {
    let (_, rest) = stat.rsplit_once(')')?;
    let mut fields = rest.split_whitespace();
    // `rest` starts at field 3 (state); utime and stime are fields 14 and 15.
    let utime: u64 = fields.nth(11)?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    utime.checked_add(stime)
}

/// `VmRSS` in bytes from the text of `/proc/PID/status` (absent for a zombie).
fn resident_bytes_of_status(status: &str) -> Option<u64> {
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .trim()
        .strip_suffix("kB")?
        .trim()
        .parse()
        .ok()?;
    kib.checked_mul(1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn demand_is_time_running_plus_time_waiting_to_run() {
        assert_eq!(
            demand_nanos_of_schedstat("115341886828 497671354592 33173\n"),
            Some(613013241420)
        );
        assert_eq!(demand_nanos_of_schedstat("12"), None);
        assert_eq!(demand_nanos_of_schedstat("x 1 2"), None);
        let own = demand_seconds(std::process::id()).expect("this process's schedstat");
        assert!(own > 0.0, "{own}");
    }

    #[test]
    fn cpu_ticks_are_read_after_the_command_name() {
        let stat = "4242 (vmm (x) y) S 1 4242 4242 0 -1 4194560 100 0 0 0 350 25 0 0 20 0 3 0 12 \
                    1000 200 18446744073709551615";
        assert_eq!(cpu_ticks_of_stat(stat), Some(375));
        assert_eq!(cpu_ticks_of_stat("4242 (vmm) S 1 2"), None);
        assert_eq!(cpu_ticks_of_stat("garbage"), None);
    }

    #[test]
    fn resident_memory_comes_from_vmrss() {
        let status = "Name:\tvmm\nVmPeak:\t  9000 kB\nVmRSS:\t    1234 kB\nThreads:\t3\n";
        assert_eq!(resident_bytes_of_status(status), Some(1234 * 1024));
        assert_eq!(resident_bytes_of_status("Name:\tvmm\nState:\tZ (zombie)\n"), None);
    }

    #[test]
    fn this_process_has_cpu_time_and_memory() {
        // Burn a little CPU so that at least one tick is counted.
        let mut x = 0u64;
        let start = std::time::Instant::now();
        while start.elapsed() < Duration::from_millis(30) {
            x = x.wrapping_mul(31).wrapping_add(7);
        }
        std::hint::black_box(x);
        let (cpu, rss) = read_process(std::process::id()).unwrap();
        assert!(cpu > 0.0, "{cpu}");
        assert!(rss > 0);
    }

    #[tokio::test]
    async fn a_dead_or_foreign_pid_is_skipped_and_a_silent_vmm_times_out() {
        let dir = std::env::temp_dir().join(format!("usage-test-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("vms/quiet")).unwrap();
        let config = AgentConfig {
            state_dir: dir.clone(),
            vmm_bin: PathBuf::from("/nonexistent"),
            allocatable: crate::store::Capacity {
                vcpus: 1,
                memory_mib: 1,
            },
            host_labels: Default::default(),
            adopt_timeout: Duration::from_secs(1),
            console_log_max_bytes: 1 << 20,
            restore_on_boot: false,
            metrics_listen: None,
            vm_cgroup: None,
            vms_cpu_max: None,
            bridge: None,
            nic_mtu: None,
            image_max_bytes: 1 << 30,
            max_concurrent_boots: 1,
            boot_slot_timeout: Duration::from_secs(1),
            jail: None,
        };
        // A process whose command line names the VM's socket, where something accepts and never
        // answers: a stuck vmm.
        let sock = config.api_sock("quiet");
        let listener = tokio::net::UnixListener::bind(&sock).unwrap();
        let accept = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((s, _)) = listener.accept().await {
                held.push(s);
            }
        });
        // `sh -c SCRIPT ARG0`: the socket path is an argument of a process that lives a while.
        let mut sleeper = std::process::Command::new("sh")
            .args(["-c", "sleep 10; true"])
            .arg(&sock)
            .spawn()
            .unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while !is_our_vmm(sleeper.id(), &sock) {
            assert!(std::time::Instant::now() < deadline);
            std::thread::sleep(Duration::from_millis(5));
        }
        let vm = |id: &str, pid: u32| Vm {
            vm_id: id.into(),
            pid,
            state: VmState::Running as i32,
            ..Default::default()
        };
        // "gone" names this test's own pid, which is not its vmm: skipped, no error.
        let vms = [vm("quiet", sleeper.id()), vm("gone", std::process::id())];
        let (usages, errors) = collect(&config, &vms).await;
        let _ = sleeper.kill();
        let _ = sleeper.wait();
        accept.abort();
        let _ = std::fs::remove_dir_all(&dir);
        assert_eq!(usages.len(), 1, "{usages:?}");
        assert_eq!(usages[0].vm_id, "quiet");
        assert!(usages[0].resident_bytes > 0);
        assert!(usages[0].devices.is_none());
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert_eq!(errors[0].reason(), "control");
    }
}
