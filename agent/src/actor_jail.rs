//! Jailed launches (`--jail-vms`): the vmm runs `vmm --jail` (docs/jail.md), as a uid of the
//! VM's own, in a root that holds only its kernel, disks and socket, in new namespaces (an
//! empty network namespace among them) and in the cgroup `vmm/<vm id>` with CPU and memory
//! limits. What it cannot open from in there, the agent opens and passes down: every tap (made
//! by the agent, or the operator's attached), inherited as `--fd nic<i>=N`; its console goes to
//! its standard output, the VM's `console.log`.
//!
//! The agent supervises the launcher (what it signals, waits for and finds again after a
//! restart) and talks to the jailed vmm over the socket in the jail's `run/`, checking that the
//! process serving it runs as the VM's uid.

use std::os::fd::OwnedFd;

use vmm_api::config::SerialConfig;

use super::launch::{JailLaunch, VmmLaunch};
use super::{NewVmm, VmActor};
use crate::error::{AgentError, ErrorChain};
use crate::nics::{fd_name, is_agent_made};
use crate::proto::{Vm, VmSpec};
use crate::spec::to_vm_config;
use crate::state::JailUids;

/// Memory a jailed vmm may use beyond its guest's: the vmm itself (a few MiB), and the page
/// cache of its disks, which the kernel charges to its cgroup and reclaims at the limit.
const JAIL_MEMORY_OVERHEAD_MIB: u64 = 64;

impl VmActor {
    /// Launches the VM's vmm jailed. `Some` when the start is over (the VM recorded as failed,
    /// with no vmm and no tap left), `None` when the vmm is on its way to running the VM.
    pub(super) async fn launch_jailed(
        &mut self,
        spec: &VmSpec,
        uids: JailUids,
    ) -> Option<Result<Vm, AgentError>> {
        let id = self.vm.vm_id.clone();
        match self
            .ctx
            .store
            .call(move |s| s.assign_jail_uid(&id, uids.range()))
            .await
        {
            Ok(vm) => self.vm = vm,
            Err(e) => return Some(self.fail_start(format!("cannot give it a jail uid: {e}")).await),
        }
        let fds = match self.jailed_taps(spec).await {
            Ok(fds) => fds,
            Err(why) => return Some(self.fail_start(why).await),
        };
        let mut config = to_vm_config(
            spec,
            &self.ctx.config.console_log(&self.vm.vm_id),
            &self.ctx.config.images_dir(),
        );
        config.serial = SerialConfig::Stdout;
        for (i, net) in config.nets.iter_mut().enumerate() {
            net.tap = None;
            net.fd = Some(fd_name(i));
        }
        let jail = JailLaunch {
            uid: self.vm.jail_uid,
            // The vCPUs, and room for the vmm's device and I/O threads.
            cpu_limit: f64::from(spec.vcpus) + 0.5,
            memory_limit_mib: spec.memory_mib + JAIL_MEMORY_OVERHEAD_MIB + spec.memory_mib / 8,
        };
        let launch = VmmLaunch {
            config: Some(config),
            jail: Some(jail),
            fds,
        };
        if let Err(e) = self.spawn_vmm_with(launch).await {
            return Some(self.fail_start(format!("cannot start the vmm: {e}")).await);
        }
        match self.connect_new_vmm().await {
            NewVmm::Connected => None,
            NewVmm::Exited => {
                self.finish().await;
                Some(Ok(self.vm.clone()))
            }
            NewVmm::Silent => Some(
                self.give_up("the jailed vmm did not open its control socket")
                    .await,
            ),
        }
    }

    /// Every tap of `spec` as a descriptor named for `nets[i].fd`: the agent's made now, the
    /// operator's attached (a jailed vmm can do neither). On failure none is left.
    async fn jailed_taps(&mut self, spec: &VmSpec) -> Result<Vec<(String, OwnedFd)>, String> {
        // Also records every NIC's tap in `Vm.nic_taps` (none made when no NIC asks for one).
        let made = self.make_agent_taps(spec).await?;
        let mut fds: Vec<(String, OwnedFd)> = made.into_iter().map(|t| (t.fd_name, t.fd)).collect();
        for (i, nic) in spec.nics.iter().enumerate().filter(|(_, n)| !is_agent_made(n)) {
            let fd = hostnet::tap::attach_tap(&nic.tap).map_err(|e| {
                format!(
                    "cannot attach NIC '{}' to its tap '{}' for the jailed vmm: {}",
                    nic.id,
                    nic.tap,
                    ErrorChain(&e)
                )
            })?;
            fds.push((fd_name(i), fd));
        }
        Ok(fds)
    }

    /// Removes what a jailed vmm's launcher leaves when it is killed before its own clean-up:
    /// the jail's directory and its empty cgroups.
    pub(super) fn remove_jail_leftovers(&self) {
        if self.ctx.config.jail.is_none() {
            return;
        }
        let dir = self.ctx.config.jail_dir(&self.vm.vm_id);
        if let Err(e) = std::fs::remove_dir_all(&dir) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!(vm = %self.vm.vm_id, error = %e, dir = %dir.display(), "cannot remove the jail");
            }
        }
        crate::cgroups::remove_jail_groups(&self.vm.vm_id);
    }
}
