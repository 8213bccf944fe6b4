//! Create-to-running through vmm-agent: for each count N, N CreateVm calls at once over the agent's
//! Unix socket, each timed from the request to BOOT-COMPLETE on its console (GetConsole, following);
//! median and p99, VMs booted per second, and the agent's RSS idle and with N VMs.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use benches::{cell, host_json, unix_time, write_json, Args, Summary, BOOT_COMPLETE};
use harness::{probe_cmdline, try_vmm_binary, GuestImages, TempDir};
use serde_json::{json, Value};
use tokio::signal::unix::{signal, SignalKind};
use vmm_agent::proto::vm_service_client::VmServiceClient;
use vmm_agent::proto::{CreateVmRequest, DeleteVmRequest, GetConsoleRequest, VmSpec};

const USAGE: &str = "\
usage: agent [--counts N,N,...] [--memory-mib N] [--out PATH] [--agent PATH] [--agent-arg ARG]...

Starts vmm-agent in a temporary state directory and, for each count N, creates N VMs at once
(each booting the test kernel to BOOT-COMPLETE, then idling), timing every VM from its CreateVm
request to BOOT-COMPLETE on its console. Reports median and p99 in milliseconds, VMs per second
(N over the time until the last one booted), and the agent's RSS before and with the N VMs.
The agent admits at most as many boots at once as the host has CPUs (--max-concurrent-boots);
it is started with --vcpu-overcommit 64 (unless an --agent-arg sets it) so that the VMs fit;
the others wait in line, which the latencies include. Each round's VMs, agent and state directory
are removed when the round ends, fails, or is interrupted (SIGINT, SIGTERM).

  --counts N,...    how many VMs at once, one round each (default 1,10,50)
  --memory-mib N    guest memory (default 128)
  --out PATH        JSON report (default target/bench/agent.json)
  --agent PATH      the vmm-agent binary (default: next to this program)
  --agent-arg ARG   one more argument for the agent (repeat for each), e.g.
                    --agent-arg=--max-concurrent-boots=4";

/// How long a round may take per VM: the agent boots a few at a time, so the last VM of a round
/// waits for all the others (a kvm_pvm boot takes ~20-50 s of a core).
const BOOT_TIMEOUT_PER_VM: Duration = Duration::from_secs(90);
/// The least time a round gets.
const BOOT_TIMEOUT_MIN: Duration = Duration::from_secs(900);

struct Round {
    count: usize,
    latencies_ms: Vec<f64>,
    vms_per_s: f64,
    rss_idle_kib: u64,
    rss_loaded_kib: u64,
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// One round's agent in its state directory. Dropped (when the round ends, fails or is
/// interrupted), it kills the agent and every vmm it started (they outlive the agent by design),
/// then removes the directory.
struct RoundAgent {
    child: Child,
    socket: PathBuf,
    dir: TempDir,
}

impl Drop for RoundAgent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let vmms = benches::procs::kill_all_under(self.dir.path());
        if vmms > 0 {
            eprintln!("removed {vmms} vmm processes left by the round");
        }
    }
}

fn start_agent(bin: &Path, extra: &[String]) -> Result<RoundAgent> {
    // The agent allocates 4 vCPUs per host CPU by default: 8 one-vCPU VMs on 2 cores. The rounds
    // want more (idle guests): enough overcommit for 64 per CPU, unless the caller sets it.
    let overcommit: &[&str] = match extra.iter().any(|a| a.starts_with("--vcpu-overcommit")) {
        true => &[],
        false => &["--vcpu-overcommit", "64"],
    };
    // Short: the vmms' socket paths under it must fit in 108 bytes.
    let dir = TempDir::new_in(Path::new("/tmp"), "bench-agent")?;
    let socket = dir.path().join("agent.sock");
    let log = std::fs::File::create(dir.path().join("agent.log"))?;
    let child = Command::new(bin)
        .arg("--state-dir")
        .arg(dir.path())
        .arg("--listen")
        .arg(format!("unix:{}", socket.display()))
        .arg("--vmm-bin")
        .arg(try_vmm_binary()?)
        .args(["--log-level", "warn"])
        .args(overcommit)
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .with_context(|| format!("cannot run {}", bin.display()))?;
    let agent = RoundAgent { child, socket, dir };
    let deadline = Instant::now() + Duration::from_secs(20);
    while !agent.socket.exists() {
        if Instant::now() > deadline {
            let log = std::fs::read_to_string(agent.dir.path().join("agent.log")).unwrap_or_default();
            bail!("the agent did not create its socket:\n{log}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(agent)
}

async fn create_and_boot(
    mut vms: VmServiceClient<tonic::transport::Channel>,
    vm_id: String,
    spec: VmSpec,
) -> Result<f64> {
    let start = Instant::now();
    vms.create_vm(CreateVmRequest {
        vm_id: vm_id.clone(),
        spec: Some(spec),
        request_id: String::new(),
    })
    .await
    .with_context(|| format!("create {vm_id}"))?;
    let mut console = vms
        .get_console(GetConsoleRequest {
            vm_id: vm_id.clone(),
            tail_bytes: 1 << 20,
            follow: true,
        })
        .await?
        .into_inner();
    let mut seen = Vec::new();
    while let Some(chunk) = console.message().await? {
        seen.extend_from_slice(&chunk.data);
        if seen
            .windows(BOOT_COMPLETE.len())
            .any(|w| w == BOOT_COMPLETE.as_bytes())
        {
            return Ok(start.elapsed().as_secs_f64() * 1000.0);
        }
    }
    bail!("{vm_id}: console ended before {BOOT_COMPLETE}")
}

async fn round(agent_bin: &Path, agent_args: &[String], count: usize, spec: &VmSpec) -> Result<Round> {
    let agent = start_agent(agent_bin, agent_args)?;
    let pid = agent.child.id();
    let channel = vmm_agent::client::connect_unix(agent.socket.clone()).await?;
    let vms = VmServiceClient::new(channel);
    // Wait until the agent answers (it has no VMs to re-adopt).
    let mut probe = vms.clone();
    let deadline = Instant::now() + Duration::from_secs(20);
    while probe
        .list_vms(vmm_agent::proto::ListVmsRequest::default())
        .await
        .is_err()
    {
        if Instant::now() > deadline {
            bail!("the agent did not become ready");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let rss_idle_kib = rss_kib(pid);
    let started = Instant::now();
    let tasks: Vec<_> = (0..count)
        .map(|i| tokio::spawn(create_and_boot(vms.clone(), format!("bench-{i}"), spec.clone())))
        .collect();
    let mut latencies_ms = Vec::new();
    let per_vm = BOOT_TIMEOUT_PER_VM.checked_mul(u32::try_from(count).unwrap_or(u32::MAX));
    let limit = per_vm.unwrap_or(Duration::MAX).max(BOOT_TIMEOUT_MIN);
    let deadline = tokio::time::Instant::now() + limit;
    for (i, task) in tasks.into_iter().enumerate() {
        let booted = tokio::time::timeout_at(deadline, task)
            .await
            .with_context(|| format!("bench-{i} did not boot within {limit:?} of the round's start"))???;
        latencies_ms.push(booted);
    }
    let all_booted = started.elapsed().as_secs_f64();
    let rss_loaded_kib = rss_kib(pid);
    let mut vms = vms;
    for i in 0..count {
        vms.delete_vm(DeleteVmRequest {
            vm_id: format!("bench-{i}"),
            request_id: String::new(),
        })
        .await?;
    }
    drop(agent);
    Ok(Round {
        count,
        latencies_ms,
        vms_per_s: count as f64 / all_booted,
        rss_idle_kib,
        rss_loaded_kib,
    })
}

fn markdown(rounds: &[Round]) -> String {
    let mut out = String::from(
        "| VMs at once | create to BOOT-COMPLETE median (ms) | p99 (ms) | VMs/s | agent RSS idle (MiB) | agent RSS with the VMs (MiB) |\n\
         | ---: | ---: | ---: | ---: | ---: | ---: |\n",
    );
    for r in rounds {
        let s = Summary::of(&r.latencies_ms);
        out.push_str(&format!(
            "| {} | {} | {} | {:.2} | {:.1} | {:.1} |\n",
            r.count,
            cell(s.map(|s| s.median), 0),
            cell(s.map(|s| s.p99), 0),
            r.vms_per_s,
            r.rss_idle_kib as f64 / 1024.0,
            r.rss_loaded_kib as f64 / 1024.0
        ));
    }
    out
}

fn main() -> Result<()> {
    if benches::wants_help() {
        println!("{USAGE}");
        return Ok(());
    }
    let mut counts = vec![1, 10, 50];
    let mut memory_mib = 128;
    let mut out = PathBuf::from("target/bench/agent.json");
    let mut agent_bin = std::env::current_exe()?.with_file_name("vmm-agent");
    let mut agent_args = Vec::new();
    let mut args = Args::new(std::env::args().skip(1), USAGE);
    while let Some(flag) = args.next_flag() {
        match flag.as_str() {
            "--counts" => {
                counts = args
                    .value(&flag)?
                    .split(',')
                    .map(|n| n.trim().parse::<usize>().context("--counts"))
                    .collect::<Result<_>>()?
            }
            "--memory-mib" => memory_mib = args.parse(&flag)?,
            "--out" => out = PathBuf::from(args.value(&flag)?),
            "--agent" => agent_bin = args.path(&flag)?,
            "--agent-arg" => agent_args.push(args.value(&flag)?),
            _ => return Err(args.unexpected(&flag)),
        }
    }
    if counts.contains(&0) {
        bail!("--counts must be positive\n{USAGE}");
    }
    let images = GuestImages::get()?;
    let spec = VmSpec {
        vcpus: 1,
        memory_mib,
        kernel: images.vmlinux.display().to_string(),
        initrd: images.initramfs.display().to_string(),
        cmdline: probe_cmdline("idle"),
        ..Default::default()
    };
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let mut rounds = Vec::new();
    for count in counts {
        eprintln!("creating {count} VMs at once");
        // An interrupted round is dropped, and with it its agent, VMs and directory.
        let done = runtime.block_on(async {
            let mut interrupt = signal(SignalKind::interrupt()).context("cannot handle SIGINT")?;
            let mut terminate = signal(SignalKind::terminate()).context("cannot handle SIGTERM")?;
            tokio::select! {
                r = round(&agent_bin, &agent_args, count, &spec) => r,
                _ = interrupt.recv() => Err(anyhow!("interrupted (SIGINT); the round's VMs and agent are removed")),
                _ = terminate.recv() => Err(anyhow!("interrupted (SIGTERM); the round's VMs and agent are removed")),
            }
        });
        rounds.push(done?);
    }
    println!("{}", markdown(&rounds));
    let report: Vec<Value> = rounds
        .iter()
        .map(|r| {
            json!({
                "count": r.count,
                "create_to_boot_complete_ms": Summary::of(&r.latencies_ms).map(|s| s.to_json()),
                "vms_per_s": r.vms_per_s,
                "agent_rss_idle_kib": r.rss_idle_kib,
                "agent_rss_loaded_kib": r.rss_loaded_kib,
            })
        })
        .collect();
    write_json(
        &out,
        &json!({"benchmark": "agent", "time": unix_time(), "host": host_json(),
                "memory_mib": memory_mib, "agent_args": agent_args, "rounds": report}),
    )?;
    eprintln!("wrote {}", out.display());
    Ok(())
}
