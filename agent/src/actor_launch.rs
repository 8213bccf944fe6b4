//! How a start launches the VM's vmm.
//!
//! - Without agent-made taps: the vmm boots from `vm.json` (`--config`).
//! - With NICs on taps the agent makes: the vmm cannot open such a tap by name (it never creates
//!   taps), so it starts empty and gets the taps' descriptors with `add-fds`, then the
//!   configuration (naming them in `nets[].fd`) and `start`. The agent closes its own copies at
//!   once: from then on the vmm alone holds each tap, which the kernel removes when the vmm ends,
//!   however it ends.
//!
//! - Jailed (`--jail-vms`, `actor_jail.rs`): the vmm boots from `vm.json` in its jail, with every
//!   tap (made or attached by the agent) inherited as a descriptor (`--fd`).
//!
//! Every way, a start first waits for a boot slot (`actor_admission.rs`).

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::sync::oneshot;
use tokio::time::{sleep, Instant};
use vmm_api::control::Request;
use vmm_api::snapshot::RestoreOverrides;

use super::admission::Admission;
use super::jail::ArrivingDisks;
use super::{NewVmm, Proc, VmActor, REQUEST_TIMEOUT, SOCKET_TIMEOUT, START_TIMEOUT};
use crate::control::ControlConn;
use crate::error::{AgentError, ErrorChain};
use crate::nics::{make_taps, nic_taps, AgentTap};
use crate::operations::CancelToken;
use crate::proto::{Vm, VmSpec, VmState};
use crate::spec::to_vm_config;
use vmm_api::VmConfig;

impl VmActor {
    /// Spawns a vmm that boots from `vm.json` and connects to it. `Some` when the start is over
    /// (the VM recorded as failed or ended), `None` when the vmm is on its way to running.
    pub(super) async fn launch_from_config_file(&mut self) -> Option<Result<Vm, AgentError>> {
        if let Err(e) = self.spawn_vmm(true).await {
            tracing::error!(vm = %self.vm.vm_id, error = %e, "cannot start the vmm");
            self.record(|vm| {
                vm.state = VmState::Failed as i32;
                vm.state_reason = format!("cannot start the vmm: {e}");
            })
            .await;
            return Some(Ok(self.vm.clone()));
        }
        match self.connect_new_vmm().await {
            NewVmm::Connected => None,
            NewVmm::Exited => {
                self.finish().await;
                Some(Ok(self.vm.clone()))
            }
            NewVmm::Silent => Some(self.give_up("the vmm did not open its control socket").await),
        }
    }

    /// Makes the taps of `spec` (this VM's), starts an empty vmm and hands it the taps, the
    /// configuration and `start`. `Some` when the start is over (the VM recorded as failed, with
    /// no vmm and no tap left), `None` when the vmm runs the VM's vCPUs.
    pub(super) async fn launch_on_agent_taps(&mut self, spec: &VmSpec) -> Option<Result<Vm, AgentError>> {
        let taps = match self.make_agent_taps(spec).await {
            Ok(taps) => taps,
            Err(why) => return Some(self.fail_start(why).await),
        };
        let config = to_vm_config(
            spec,
            &self.ctx.config.console_log(&self.vm.vm_id),
            &self.ctx.config.images_dir(),
        );
        // Not read by the vmm (it gets the configuration over its socket): kept for operators,
        // as for VMs started from it.
        let written = std::fs::create_dir_all(&self.dir).and_then(|()| {
            let json = serde_json::to_vec_pretty(&config)?;
            std::fs::write(self.dir.join("vm.json"), json)
        });
        if let Err(e) = written {
            tracing::warn!(vm = %self.vm.vm_id, error = %e, "cannot write vm.json");
        }
        if let Err(why) = self.start_empty_vmm(VmmLaunch::plain(None)).await {
            // Our copies of the taps go with `taps` here: nothing of them is left.
            return Some(self.fail_start(format!("cannot start the vmm: {why}")).await);
        }
        if let Err(e) = self.give_taps(taps).await {
            return Some(self.abandon_start(e.to_string()).await);
        }
        if let Err(e) = self.request(Request::Configure(config)).await {
            return Some(self.abandon_start(format!("cannot configure the vmm: {e}")).await);
        }
        // Answered once the vCPUs run (or the build failed: an unbootable kernel, say).
        if let Err(e) = self.request_within(Request::Start, START_TIMEOUT).await {
            return Some(self.abandon_start(format!("cannot start: {e}")).await);
        }
        None
    }

    /// Makes the taps of `spec`'s NICs that the agent makes (this VM's) and records them. Err: why,
    /// with no tap left.
    pub(super) async fn make_agent_taps(&mut self, spec: &VmSpec) -> Result<Vec<AgentTap>, String> {
        let (vm_id, for_taps) = (self.vm.vm_id.clone(), spec.clone());
        // A few blocking syscalls (and the RTNL lock, which the host may hold a while).
        let made = tokio::task::spawn_blocking(move || make_taps(&vm_id, &for_taps)).await;
        let taps = match made {
            Ok(Ok(taps)) => taps,
            Ok(Err(e)) => return Err(format!("cannot make its taps: {}", ErrorChain(&e))),
            Err(e) => return Err(format!("cannot make its taps: {e}")),
        };
        let shown = nic_taps(spec, &taps);
        self.record(|vm| vm.nic_taps = shown).await;
        Ok(taps)
    }

    /// Hands `taps` to the vmm (`add-fds`, under the names its configuration or restore overrides
    /// use) and closes the agent's copies: from then on the vmm alone holds them (or, if it did not
    /// take them, nobody: they vanish).
    pub(super) async fn give_taps(&self, taps: Vec<AgentTap>) -> Result<(), AgentError> {
        if taps.is_empty() {
            return Ok(());
        }
        let names = taps.iter().map(|t| t.fd_name.clone()).collect();
        let fds: Vec<BorrowedFd<'_>> = taps.iter().map(|t| t.fd.as_fd()).collect();
        let handed = self
            .request_fds_within(Request::AddFds { names }, &fds, REQUEST_TIMEOUT)
            .await;
        drop(fds);
        drop(taps);
        handed
            .map(|_| ())
            .map_err(|e| AgentError::Unavailable(format!("cannot hand the taps to the vmm: {e}")))
    }

    /// Kills the vmm of a start that cannot go on and records the VM as failed with `why`.
    async fn abandon_start(&mut self, why: String) -> Result<Vm, AgentError> {
        self.kill_and_wait().await;
        self.fail_start(why).await
    }

    /// Records a start that ended before the VM ran (no vmm left) as failed with `why`.
    pub(super) async fn fail_start(&mut self, why: String) -> Result<Vm, AgentError> {
        tracing::warn!(vm = %self.vm.vm_id, why, "start failed");
        self.record(|vm| {
            vm.state = VmState::Failed as i32;
            vm.state_reason = why;
            vm.pid = 0;
        })
        .await;
        Ok(self.vm.clone())
    }

    pub(super) async fn start(&mut self) -> Result<Vm, AgentError> {
        let state = self.vm.state();
        match state {
            VmState::Running | VmState::Paused | VmState::Starting if self.proc.is_some() => {
                return Ok(self.vm.clone())
            }
            VmState::Stopping => return Err(self.wrong_state(state, "started")),
            _ => {}
        }
        if !self.vm.migrating_to.is_empty() && self.proc.is_none() {
            return Err(AgentError::WrongState(format!(
                "VM '{}' may run at {} (its migration there was interrupted): it is not started \
                 here; delete this record once the destination has it",
                self.vm.vm_id, self.vm.migrating_to
            )));
        }
        let began = Instant::now();
        // Set before the vmm runs: its boot-complete event may come while we wait for RUNNING.
        self.start_began = Some(began);
        if state != VmState::Starting {
            // Reserves the VM's resources, or refuses with RESOURCE_EXHAUSTED.
            let mut vm = self.vm.clone();
            vm.state = VmState::Starting as i32;
            vm.desired_state = VmState::Running as i32;
            vm.state_reason = String::new();
            vm.pid = 0;
            vm.exit_code = None;
            vm.boot_ms = None;
            let limit = self.ctx.config.allocatable;
            self.vm = self.ctx.store.call(move |s| s.update_vm(vm, Some(limit))).await?;
        }
        match self.take_boot_slot().await {
            Admission::Admitted => {}
            other => return self.end_unadmitted_start(other).await,
        }
        let result = self.launch(began).await;
        if self.proc.is_none() {
            self.release_boot_slot("the start failed");
        }
        result
    }

    /// Spawns the vmm of an admitted start and waits for it to run the VM.
    pub(super) async fn launch(&mut self, began: Instant) -> Result<Vm, AgentError> {
        let spec = self.vm.spec.clone().unwrap_or_default();
        if let Some(uids) = self.ctx.config.jail {
            if let Some(ended) = self.launch_jailed(&spec, uids).await {
                return ended;
            }
        } else if spec.nics.iter().any(crate::nics::is_agent_made) {
            // The vmm gets the agent's taps as descriptors, so it starts empty (see above).
            if let Some(ended) = self.launch_on_agent_taps(&spec).await {
                return ended;
            }
        } else {
            let nic_taps = crate::nics::nic_taps(&spec, &[]);
            self.record(|vm| vm.nic_taps = nic_taps).await;
            if let Some(ended) = self.launch_from_config_file().await {
                return ended;
            }
        }
        self.record_vmm_state().await;
        self.pump_until(Instant::now() + START_TIMEOUT, CancelToken::never(), |a| {
            a.vm.state() != VmState::Starting
        })
        .await;
        if self.vm.state() == VmState::Starting {
            return self.give_up("the vmm did not start the VM in time").await;
        }
        if self.vm.state() == VmState::Running {
            self.ctx.metrics.observe_start_to_running(began.elapsed());
        }
        Ok(self.vm.clone())
    }

    /// Connects to the control socket of the vmm just spawned, as soon as it is there.
    pub(super) async fn connect_new_vmm(&mut self) -> NewVmm {
        let deadline = Instant::now() + SOCKET_TIMEOUT;
        let jail_uid = self.proc.as_ref().and_then(|p| p.jail_uid);
        loop {
            if self.exited().await {
                return NewVmm::Exited;
            }
            if let Ok((conn, events)) = ControlConn::connect_as(&self.sock, jail_uid).await {
                if let Some(p) = self.proc.as_mut() {
                    p.conn = Some(conn);
                    p.events = Some(events);
                }
                return NewVmm::Connected;
            }
            if Instant::now() > deadline {
                return NewVmm::Silent;
            }
            sleep(Duration::from_millis(20)).await;
        }
    }

    /// Starts a vmm for this VM: configured from the spec (`vm.json`), or with no configuration
    /// (waiting on its socket for a snapshot to restore).
    pub(super) async fn spawn_vmm(&mut self, configured: bool) -> Result<(), std::io::Error> {
        let config = configured.then(|| {
            let spec = self.vm.spec.clone().unwrap_or_default();
            to_vm_config(
                &spec,
                &self.ctx.config.console_log(&self.vm.vm_id),
                &self.ctx.config.images_dir(),
            )
        });
        self.spawn_vmm_with(VmmLaunch::plain(config)).await
    }

    /// Spawns a vmm as `launch` says and records its pid (the launcher's, when jailed: that is
    /// the process to signal and wait for).
    pub(super) async fn spawn_vmm_with(&mut self, launch: VmmLaunch) -> Result<(), std::io::Error> {
        std::fs::create_dir_all(&self.dir)?;
        let mut command = tokio::process::Command::new(&self.ctx.config.vmm_bin);
        if let Some(config) = &launch.config {
            let config_path = self.dir.join("vm.json");
            std::fs::write(&config_path, serde_json::to_vec_pretty(config)?)?;
            command.arg("--config").arg(&config_path);
        }
        // The vmm refuses an existing socket path; one left by a killed vmm is stale.
        let _ = std::fs::remove_file(&self.sock);
        let log = std::fs::File::options()
            .create(true)
            .append(true)
            .open(self.dir.join("vmm.log"))?;
        let mut stdout = log.try_clone()?;
        match &launch.jail {
            Some(jail) => {
                // The jail's directory must be new or empty (a killed launcher leaves its files).
                let dir = self.ctx.config.jail_dir(&self.vm.vm_id);
                match std::fs::remove_dir_all(&dir) {
                    Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
                    _ => {}
                }
                command.args(jail.args(&self.vm.vm_id, &dir));
                // The console goes to the vmm's standard output (a path would have to be inside
                // the jail, which is removed when the vmm ends): emptied first, as a console
                // file is by an unjailed vmm.
                let console = self.ctx.config.console_log(&self.vm.vm_id);
                stdout = std::fs::File::options()
                    .create(true)
                    .append(true)
                    .open(&console)?;
                stdout.set_len(0)?;
            }
            None => {
                if let Some(parent) = self.sock.parent() {
                    std::fs::create_dir_all(parent)?;
                }
            }
        }
        for (name, fd) in &launch.fds {
            command.arg("--fd").arg(format!("{name}={}", fd.as_raw_fd()));
        }
        if !launch.fds.is_empty() {
            // Only then: a pre-exec hook makes the spawn a fork, not a posix_spawn.
            let raw = launch.fds.iter().map(|(_, fd)| fd.as_raw_fd()).collect();
            crate::process::inherit_fds(&mut command, raw);
        }
        command
            .arg("--api-sock")
            .arg(&self.sock)
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(log)
            // Its own process group: a Ctrl-C meant for the agent does not reach the VMs.
            .process_group(0)
            // The vmm must outlive the agent; dropping the handle must not kill it.
            .kill_on_drop(false);
        let spawned = command.spawn();
        // The child has its copies (or there is none): ours go now, so that the vmm alone holds
        // each tap and the kernel removes it when the vmm ends, however it ends.
        drop(launch.fds);
        let mut child = spawned?;
        let pid = child.id().unwrap_or(0);
        match (&self.ctx.cgroups, &launch.jail) {
            // A jailed vmm moves itself into `vmm/<id>` with its own limits.
            (Some(_), Some(_)) | (None, _) => {}
            (Some(cgroups), None) => {
                // Before the vmm has done much: its vCPU threads are created in the group (a
                // failure is logged; the VM runs, in the agent's group).
                if let Err(e) = cgroups.place(&self.vm.vm_id, pid) {
                    tracing::warn!(vm = %self.vm.vm_id, pid, error = %crate::error::ErrorChain(&e), "cannot move the vmm into its cgroup");
                }
            }
        }
        let (tx, rx) = oneshot::channel();
        tokio::spawn(async move {
            let code = child.wait().await.ok().and_then(|s| s.code());
            let _ = tx.send(code);
        });
        tracing::info!(vm = %self.vm.vm_id, pid, jailed = launch.jail.is_some(), "vmm started");
        self.proc = Some(Proc {
            pid,
            jail_uid: launch.jail.map(|j| j.uid),
            conn: None,
            events: None,
            child_exit: Some(rx),
            child_code: None,
            exit_event: None,
        });
        self.record(|vm| vm.pid = pid).await;
        Ok(())
    }

    /// Starts the vmm of a VM that arrives from a snapshot or by live migration: jailed with
    /// `--jail-vms` (see `start_empty_jailed`), else plain, with the agent's taps handed to it.
    /// On failure it is gone and the error says why, after `what` ("restoring VM").
    pub(super) async fn start_for_arrival(
        &mut self,
        overrides: &mut RestoreOverrides,
        chain: Vec<PathBuf>,
        disks: ArrivingDisks,
        what: &str,
    ) -> Result<(), AgentError> {
        let failed = |why: String| AgentError::Unavailable(format!("{what}: {why}"));
        if let Some(uids) = self.ctx.config.jail {
            return self
                .start_empty_jailed(uids, overrides, chain, disks)
                .await
                .map_err(failed);
        }
        let spec = self.vm.spec.clone().unwrap_or_default();
        let taps = self.make_agent_taps(&spec).await.map_err(failed)?;
        self.start_empty_vmm(VmmLaunch::plain(None))
            .await
            .map_err(failed)?;
        if let Err(e) = self.give_taps(taps).await {
            self.kill_and_wait().await;
            return Err(e);
        }
        Ok(())
    }

    /// Starts a vmm without a configuration, as `launch` says, and connects to it; on failure it
    /// is gone and the error says why.
    pub(super) async fn start_empty_vmm(&mut self, launch: VmmLaunch) -> Result<(), String> {
        self.spawn_vmm_with(launch)
            .await
            .map_err(|e| format!("cannot start the vmm: {e}"))?;
        match self.connect_new_vmm().await {
            NewVmm::Connected => Ok(()),
            NewVmm::Exited => {
                self.finish().await;
                Err(self.vm.state_reason.clone())
            }
            NewVmm::Silent => {
                self.kill_and_wait().await;
                Err("the vmm did not open its control socket".into())
            }
        }
    }
}

/// How to spawn a vmm.
pub(super) struct VmmLaunch {
    /// Its configuration (`--config`); `None`: it starts empty.
    pub config: Option<VmConfig>,
    /// Jailed, with these settings.
    pub jail: Option<JailLaunch>,
    /// Descriptors it inherits (`--fd NAME=N`), closed here once it is spawned.
    pub fds: Vec<(String, OwnedFd)>,
}

impl VmmLaunch {
    /// An unjailed vmm with no inherited descriptors.
    fn plain(config: Option<VmConfig>) -> Self {
        VmmLaunch {
            config,
            jail: None,
            fds: Vec::new(),
        }
    }
}

/// The settings of a jailed vmm.
pub(super) struct JailLaunch {
    /// Its uid and gid.
    pub uid: u32,
    /// Its CPU limit, in cores.
    pub cpu_limit: f64,
    /// Its memory limit.
    pub memory_limit_mib: u64,
    /// Host files and directories shown read-only at their own paths (`--jail-mirror`).
    pub mirrors: Vec<PathBuf>,
}

impl JailLaunch {
    /// The jail flags for VM `vm_id` in `dir`. Without `--netns` the vmm gets a new, empty
    /// network namespace: its taps come as descriptors.
    fn args(&self, vm_id: &str, dir: &Path) -> Vec<std::ffi::OsString> {
        let mut args: Vec<std::ffi::OsString> =
            vec!["--jail".into(), dir.into(), "--jail-id".into(), vm_id.into()];
        for (flag, value) in [
            ("--uid", self.uid.to_string()),
            ("--gid", self.uid.to_string()),
            ("--cpu-limit", format!("{:.2}", self.cpu_limit)),
            ("--memory-limit-mib", self.memory_limit_mib.to_string()),
        ] {
            args.push(flag.into());
            args.push(value.into());
        }
        for mirror in &self.mirrors {
            args.push("--jail-mirror".into());
            args.push(mirror.into());
        }
        args
    }
}
