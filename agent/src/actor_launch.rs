//! How a start launches the VM's vmm.
//!
//! - Without agent-made taps: the vmm boots from `vm.json` (`--config`).
//! - With NICs on taps the agent makes: the vmm cannot open such a tap by name (it never creates
//!   taps), so it starts empty and gets the taps' descriptors with `add-fds`, then the
//!   configuration (naming them in `nets[].fd`) and `start`. The agent closes its own copies at
//!   once: from then on the vmm alone holds each tap, which the kernel removes when the vmm ends,
//!   however it ends.

use std::os::fd::{AsFd, BorrowedFd};

use vmm_api::control::Request;

use super::{NewVmm, VmActor, REQUEST_TIMEOUT, START_TIMEOUT};
use crate::error::{AgentError, ErrorChain};
use crate::nics::{make_taps, nic_taps, AgentTap};
use crate::proto::{Vm, VmSpec, VmState};
use crate::spec::to_vm_config;

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
        if let Err(why) = self.start_empty_vmm().await {
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
    async fn fail_start(&mut self, why: String) -> Result<Vm, AgentError> {
        tracing::warn!(vm = %self.vm.vm_id, why, "start failed");
        self.record(|vm| {
            vm.state = VmState::Failed as i32;
            vm.state_reason = why;
            vm.pid = 0;
        })
        .await;
        Ok(self.vm.clone())
    }
}
