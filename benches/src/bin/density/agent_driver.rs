//! VMs through a `vmm-agent` of the benchmark's own (temporary state dir, own socket): CreateVm
//! for boots, CreateSnapshot once and RestoreSnapshot per clone, all over gRPC.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use tokio::task::JoinSet;
use tonic::transport::Channel;
use vmm_agent::proto::host_service_client::HostServiceClient;
use vmm_agent::proto::operations_service_client::OperationsServiceClient;
use vmm_agent::proto::snapshot_service_client::SnapshotServiceClient;
use vmm_agent::proto::vm_service_client::VmServiceClient;
use vmm_agent::proto::{
    operation, operation_response, BalloonSpec, CreateSnapshotRequest, CreateVmRequest,
    DeleteSnapshotRequest, DeleteVmRequest, GetBalloonRequest, GetConsoleRequest, GetHostRequest,
    GetVmRequest, HugePages, ListVmsRequest, Operation, RestoreSnapshotRequest, SnapshotKind,
    UpdateVmRequest, Vm, VmSpec, VmState,
};

use crate::driver::{signal, wait_quiet, Cleanup, Created, Prepared, RpcSeries, VmShape};
use crate::options::Mode;

const SNAPSHOT_ID: &str = "density-base";
const SOURCE_ID: &str = "density-source";
/// How many VMs cleanup deletes at once.
const DELETE_PARALLEL: usize = 8;

fn ms(since: Instant) -> f64 {
    since.elapsed().as_secs_f64() * 1000.0
}

fn status(what: &str, s: tonic::Status) -> anyhow::Error {
    anyhow!("{what}: {:?}: {}", s.code(), s.message())
}

#[derive(Clone)]
pub struct AgentDriver {
    inner: Arc<Inner>,
}

struct Inner {
    channel: Channel,
    process: Mutex<Option<Child>>,
    pid: u32,
    state_dir: PathBuf,
    shape: VmShape,
}

impl AgentDriver {
    /// Starts `agent` with its state in `state_dir` and waits until it answers. `extra` goes on
    /// its command line.
    pub async fn start(
        agent: &Path,
        vmm: &Path,
        state_dir: &Path,
        shape: VmShape,
        count: usize,
        extra: &[String],
    ) -> Result<AgentDriver> {
        let socket = state_dir.join("agent.sock");
        let log = std::fs::File::create(state_dir.join("agent.log"))?;
        let mut cmd = Command::new(agent);
        cmd.arg("--state-dir")
            .arg(state_dir)
            .arg("--listen")
            .arg(format!("unix:{}", socket.display()))
            .arg("--vmm-bin")
            .arg(vmm)
            .args(["--log-level", "warn"]);
        if !extra.iter().any(|a| a.starts_with("--vcpu-overcommit")) {
            // The default (4 per CPU) admits 8 one-vCPU VMs on 2 cores; density wants them all.
            let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
            let wanted = (count + 1) * shape.vcpus as usize;
            cmd.arg(format!("--vcpu-overcommit={}", wanted.div_ceil(cpus).max(4)));
        }
        cmd.args(extra);
        // Its own process group: a Ctrl-C on the terminal reaches only us, and we still have an
        // agent to delete the VMs through.
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        let child = cmd
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("cannot run {}", agent.display()))?;
        let pid = child.id();
        let process = Mutex::new(Some(child));
        let deadline = Instant::now() + Duration::from_secs(30);
        while !socket.exists() {
            if Instant::now() > deadline || !crate::procfs::alive(pid) {
                let log = std::fs::read_to_string(state_dir.join("agent.log")).unwrap_or_default();
                if let Ok(mut guard) = process.lock() {
                    if let Some(mut c) = guard.take() {
                        let _ = c.kill();
                        let _ = c.wait();
                    }
                }
                bail!("the agent did not open {}:\n{log}", socket.display());
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let channel = vmm_agent::client::connect_unix(socket).await?;
        let driver = AgentDriver {
            inner: Arc::new(Inner {
                channel,
                process,
                pid,
                state_dir: state_dir.to_path_buf(),
                shape,
            }),
        };
        // UNAVAILABLE while it re-adopts (nothing here, but it says so until done).
        let mut vms = driver.vms();
        while vms.list_vms(ListVmsRequest::default()).await.is_err() {
            if Instant::now() > deadline {
                bail!("the agent did not become ready");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(driver)
    }

    pub fn pid(&self) -> u32 {
        self.inner.pid
    }

    pub fn state_dir(&self) -> &Path {
        &self.inner.state_dir
    }

    fn vms(&self) -> VmServiceClient<Channel> {
        VmServiceClient::new(self.inner.channel.clone()).max_decoding_message_size(64 << 20)
    }

    fn spec(&self) -> VmSpec {
        let s = &self.inner.shape;
        VmSpec {
            vcpus: s.vcpus,
            memory_mib: u64::from(s.memory_mib),
            kernel: s.kernel.display().to_string(),
            cmdline: s.cmdline.clone(),
            balloon: s.levers.balloon.as_ref().map(|b| BalloonSpec {
                amount_mib: b.amount_mib,
                deflate_on_oom: b.deflate_on_oom,
                stats_interval_s: b.stats_interval_s,
                free_page_reporting: b.free_page_reporting,
            }),
            mergeable: s.levers.mergeable,
            hugepages: match s.levers.hugepages {
                vmm_api::HugePages::Auto => HugePages::Auto,
                vmm_api::HugePages::Off => HugePages::Off,
                vmm_api::HugePages::Thp => HugePages::Thp,
            } as i32,
            ..Default::default()
        }
    }

    /// See [`crate::driver::Driver::set_memory_target`]: UpdateVm for each VM, then GetBalloon.
    pub async fn set_memory_target(
        &self,
        vms: &[Created],
        target_mib: u64,
        timeout: Duration,
    ) -> Result<(usize, u64)> {
        let mut client = self.vms();
        for c in vms {
            client
                .update_vm(UpdateVmRequest {
                    vm_id: c.vm_id.clone(),
                    memory_target_mib: Some(target_mib),
                    ..Default::default()
                })
                .await
                .map_err(|s| status("UpdateVm", s))?;
        }
        let want = u64::from(self.inner.shape.memory_mib).saturating_sub(target_mib);
        let deadline = Instant::now() + timeout;
        loop {
            let mut reached = 0;
            let mut held = 0;
            for c in vms {
                let b = client
                    .get_balloon(GetBalloonRequest {
                        vm_id: c.vm_id.clone(),
                    })
                    .await
                    .map_err(|s| status("GetBalloon", s))?
                    .into_inner();
                held += b.actual_mib;
                reached += usize::from(b.actual_mib == want);
            }
            if reached == vms.len() || Instant::now() > deadline {
                return Ok((reached, held));
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    async fn wait_done(&self, op: Operation, timeout: Duration) -> Result<Operation> {
        let mut ops = OperationsServiceClient::new(self.inner.channel.clone());
        let deadline = Instant::now() + timeout;
        let mut op = op;
        while !op.done {
            if Instant::now() > deadline {
                bail!("{} not done after {timeout:?}", op.name);
            }
            op = ops
                .wait_operation(vmm_agent::proto::WaitOperationRequest {
                    name: op.name.clone(),
                    timeout_ms: 60_000,
                })
                .await
                .map_err(|s| status("WaitOperation", s))?
                .into_inner();
        }
        match &op.result {
            Some(operation::Result::Response(_)) => Ok(op),
            Some(operation::Result::Error(e)) => bail!("{} failed: code {}: {}", op.name, e.code, e.message),
            None => bail!("{} is done without a result", op.name),
        }
    }

    /// The last 16 KiB of a VM's console (GetConsole without following).
    pub async fn console_tail(&self, vm_id: &str) -> Result<String> {
        let mut stream = self
            .vms()
            .get_console(GetConsoleRequest {
                vm_id: vm_id.into(),
                tail_bytes: 16 << 10,
                follow: false,
            })
            .await
            .map_err(|s| status("GetConsole", s))?
            .into_inner();
        let mut text = Vec::new();
        while let Some(chunk) = stream.message().await.map_err(|s| status("GetConsole", s))? {
            text.extend_from_slice(&chunk.data);
        }
        Ok(String::from_utf8_lossy(&text).into_owned())
    }

    /// CreateVm, then the state RUNNING, then the workload's marker on the console.
    async fn boot(&self, vm_id: &str) -> Result<Created> {
        let mut vms = self.vms();
        let start = Instant::now();
        vms.create_vm(CreateVmRequest {
            vm_id: vm_id.into(),
            spec: Some(self.spec()),
            request_id: String::new(),
        })
        .await
        .map_err(|s| status(&format!("CreateVm {vm_id}"), s))?;
        let timeout = self.inner.shape.boot_timeout;
        let vm = loop {
            let vm = vms
                .get_vm(GetVmRequest { vm_id: vm_id.into() })
                .await
                .map_err(|s| status("GetVm", s))?
                .into_inner();
            match vm.state() {
                VmState::Running => break vm,
                VmState::Failed | VmState::Stopped => {
                    bail!("{vm_id} is {:?}: {}", vm.state(), vm.state_reason)
                }
                _ if start.elapsed() > timeout => bail!("{vm_id} did not run within {timeout:?}"),
                _ => tokio::time::sleep(Duration::from_millis(10)).await,
            }
        };
        let running_ms = ms(start);
        let marker = self.inner.shape.ready_marker;
        let read = async {
            let mut stream = vms
                .get_console(GetConsoleRequest {
                    vm_id: vm_id.into(),
                    tail_bytes: 1 << 20,
                    follow: true,
                })
                .await
                .map_err(|s| status("GetConsole", s))?
                .into_inner();
            let mut seen = Vec::new();
            while let Some(chunk) = stream.message().await.map_err(|s| status("GetConsole", s))? {
                seen.extend_from_slice(&chunk.data);
                if seen.windows(marker.len()).any(|w| w == marker.as_bytes()) {
                    return Ok(());
                }
            }
            bail!("{vm_id}: the console ended before '{marker}'")
        };
        tokio::time::timeout(timeout.saturating_sub(start.elapsed()), read)
            .await
            .map_err(|_| anyhow!("{vm_id}: no '{marker}' within {timeout:?}"))??;
        Ok(Created {
            vm_id: vm_id.into(),
            pid: vm.pid,
            running_ms,
            ready_ms: Some(ms(start)),
        })
    }

    pub async fn prepare(&self) -> Result<Prepared> {
        let start = Instant::now();
        let source = self.boot(SOURCE_ID).await.context("booting the source VM")?;
        let source_ready_ms = ms(start);
        let (source_quiet_ms, source_cpu_pct) = wait_quiet(source.pid, &self.inner.shape).await;
        let mut snaps = SnapshotServiceClient::new(self.inner.channel.clone());
        let start = Instant::now();
        let op = snaps
            .create_snapshot(CreateSnapshotRequest {
                vm_id: SOURCE_ID.into(),
                snapshot_id: SNAPSHOT_ID.into(),
                kind: SnapshotKind::Full as i32,
                ..Default::default()
            })
            .await
            .map_err(|s| status("CreateSnapshot", s))?
            .into_inner();
        let op = self.wait_done(op, Duration::from_secs(600)).await?;
        let snapshot_ms = ms(start);
        let snapshot = match &op.result {
            Some(operation::Result::Response(r)) => match &r.value {
                Some(operation_response::Value::Snapshot(s)) => s.clone(),
                other => bail!("CreateSnapshot answered {other:?}"),
            },
            other => bail!("CreateSnapshot ended with {other:?}"),
        };
        // The clones alone are counted and measured; the snapshot's files outlive the source.
        self.vms()
            .delete_vm(DeleteVmRequest {
                vm_id: SOURCE_ID.into(),
                request_id: String::new(),
            })
            .await
            .map_err(|s| status("DeleteVm of the source", s))?;
        Ok(Prepared {
            source_ready_ms,
            source_quiet_ms,
            source_cpu_pct,
            snapshot_ms,
            snapshot_memory_bytes: snapshot.memory_bytes,
            snapshot_size_bytes: snapshot.size_bytes,
            snapshot_dir: Some(self.inner.state_dir.join("snapshots")),
        })
    }

    pub async fn create(&self, index: usize) -> Result<Created> {
        let vm_id = format!("d{index}");
        if self.inner.shape.mode == Mode::Boot {
            return self.boot(&vm_id).await;
        }
        let mut snaps = SnapshotServiceClient::new(self.inner.channel.clone());
        let start = Instant::now();
        let op = snaps
            .restore_snapshot(RestoreSnapshotRequest {
                snapshot_id: SNAPSHOT_ID.into(),
                vm_id: vm_id.clone(),
                start_paused: self.inner.shape.paused,
                ..Default::default()
            })
            .await
            .map_err(|s| status(&format!("RestoreSnapshot {vm_id}"), s))?
            .into_inner();
        let op = self.wait_done(op, Duration::from_secs(300)).await?;
        let running_ms = ms(start);
        let vm: Vm = match op.result {
            Some(operation::Result::Response(r)) => match r.value {
                Some(operation_response::Value::Vm(vm)) => vm,
                other => bail!("RestoreSnapshot answered {other:?}"),
            },
            other => bail!("RestoreSnapshot ended with {other:?}"),
        };
        let wanted = match self.inner.shape.paused {
            true => VmState::Paused,
            false => VmState::Running,
        };
        if vm.state() != wanted {
            bail!("{vm_id} restored {:?}: {}", vm.state(), vm.state_reason);
        }
        let pid = match vm.pid {
            0 => {
                self.vms()
                    .get_vm(GetVmRequest { vm_id: vm_id.clone() })
                    .await
                    .map_err(|s| status("GetVm", s))?
                    .into_inner()
                    .pid
            }
            pid => pid,
        };
        Ok(Created {
            vm_id,
            pid,
            running_ms,
            ready_ms: None,
        })
    }

    async fn all_vms(&self) -> Result<Vec<Vm>> {
        let mut vms = self.vms();
        let mut out = Vec::new();
        let mut page_token = String::new();
        loop {
            let page = vms
                .list_vms(ListVmsRequest {
                    page_size: 1000,
                    page_token,
                    ..Default::default()
                })
                .await
                .map_err(|s| status("ListVms", s))?
                .into_inner();
            out.extend(page.vms);
            if page.next_page_token.is_empty() {
                return Ok(out);
            }
            page_token = page.next_page_token;
        }
    }

    pub async fn rpc_latency(&self, samples: usize) -> Result<Vec<RpcSeries>> {
        let mut host = HostServiceClient::new(self.inner.channel.clone());
        let mut get_host = Vec::with_capacity(samples);
        let mut list = Vec::with_capacity(samples);
        for _ in 0..samples {
            let t = Instant::now();
            host.get_host(GetHostRequest {})
                .await
                .map_err(|s| status("GetHost", s))?;
            get_host.push(ms(t));
            let t = Instant::now();
            self.all_vms().await?;
            list.push(ms(t));
        }
        Ok(vec![
            RpcSeries {
                name: "GetHost",
                samples_ms: get_host,
            },
            RpcSeries {
                name: "ListVms (all, one page)",
                samples_ms: list,
            },
        ])
    }

    pub async fn cleanup(&self) -> Cleanup {
        let mut report = Cleanup::default();
        match self.all_vms().await {
            Ok(vms) => {
                let mut set = JoinSet::new();
                for vm in vms {
                    while set.len() >= DELETE_PARALLEL {
                        collect(&mut set, &mut report).await;
                    }
                    let mut client = self.vms();
                    set.spawn(async move {
                        client
                            .delete_vm(DeleteVmRequest {
                                vm_id: vm.vm_id.clone(),
                                request_id: String::new(),
                            })
                            .await
                            .map_err(|s| status(&format!("DeleteVm {}", vm.vm_id), s))
                    });
                }
                while !set.is_empty() {
                    collect(&mut set, &mut report).await;
                }
            }
            Err(e) => report.errors.push(format!("{e:#}")),
        }
        let mut snaps = SnapshotServiceClient::new(self.inner.channel.clone());
        let deleted = snaps
            .delete_snapshot(DeleteSnapshotRequest {
                snapshot_id: SNAPSHOT_ID.into(),
                request_id: String::new(),
            })
            .await;
        if let Err(s) = deleted {
            if s.code() != tonic::Code::NotFound {
                report.errors.push(format!("{:#}", status("DeleteSnapshot", s)));
            }
        }
        self.stop_agent().await;
        report
    }

    /// SIGTERM, then SIGKILL if it has not ended within 10 s.
    async fn stop_agent(&self) {
        let Some(mut child) = self.inner.process.lock().ok().and_then(|mut g| g.take()) else {
            return;
        };
        signal(child.id(), "TERM");
        let deadline = Instant::now() + Duration::from_secs(10);
        while matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let _ = child.kill();
        let _ = child.wait();
    }
}

async fn collect(
    set: &mut JoinSet<Result<tonic::Response<vmm_agent::proto::DeleteVmResponse>>>,
    report: &mut Cleanup,
) {
    match set.join_next().await {
        Some(Ok(Ok(_))) => report.vms_stopped += 1,
        Some(Ok(Err(e))) => report.errors.push(format!("{e:#}")),
        Some(Err(e)) => report.errors.push(format!("delete task: {e}")),
        None => {}
    }
}

impl Drop for Inner {
    /// The last resort (a panic): the agent must not outlive us. Its VMs are then found by
    /// [`crate::driver::kill_strays`] or, failing that, stay running.
    fn drop(&mut self) {
        if let Ok(mut g) = self.process.lock() {
            if let Some(mut c) = g.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
}
