//! Re-adoption after an agent restart: the vmm a previous agent started is found by its pid
//! and control socket, and the VM's state settled from what it answers (or from its absence).

use std::time::Duration;

use tokio::time::{sleep, Instant};
use vmm_api::control::{Request, Response, VmState as VmmState};

use super::{migration, observed_state, Proc, VmActor, EXIT_TIMEOUT};
use crate::control::{ControlClientError, ControlConn};
use crate::process::{is_our_vmm, jail_uid_of, kill};
use crate::proto::VmState;
use crate::store::holds_resources;

impl VmActor {
    /// Re-adopts the VM's vmm after an agent restart, or settles what the previous agent left
    /// half done. False when nothing of the VM is left (its record is gone).
    pub(super) async fn adopt(&mut self) -> bool {
        if !holds_resources(self.vm.state()) {
            return true;
        }
        let arriving =
            self.vm.state() == VmState::Starting && self.vm.state_reason == migration::ARRIVING_REASON;
        self.reattach().await;
        if arriving && self.proc.is_none() {
            // An incoming migration cut short before this host had the VM: the source, whose
            // peer went away, keeps it; nothing of it stays here (a retry can come).
            tracing::warn!(vm = %self.vm.vm_id, "the agent restarted during an incoming migration; removing it");
            match self.remove_record_and_files().await {
                Ok(()) => return false,
                Err(e) => {
                    tracing::error!(vm = %self.vm.vm_id, error = %e, "cannot remove an interrupted arrival")
                }
            }
        }
        if !self.vm.migrating_to.is_empty() && self.vm.state() != VmState::Failed {
            self.settle_interrupted_migration().await;
        }
        if self.proc.is_none() && self.ctx.config.restore_on_boot {
            let desired = self.vm.desired_state();
            if matches!(desired, VmState::Running | VmState::Paused) {
                tracing::info!(vm = %self.vm.vm_id, "restoring: booting it again");
                if let Err(e) = self.start().await {
                    tracing::warn!(vm = %self.vm.vm_id, error = %e, "cannot restore");
                    self.record(|vm| vm.state_reason = format!("not restored: {e}"))
                        .await;
                }
            }
        }
        true
    }

    /// Re-adopts the vmm the store names, or records that it is gone (killing it if it does not
    /// answer).
    pub(super) async fn reattach(&mut self) {
        let pid = self.vm.pid;
        if pid == 0 || !is_our_vmm(pid, &self.sock) {
            tracing::info!(vm = %self.vm.vm_id, pid, "vmm gone while the agent was down");
            self.record(|vm| {
                vm.state = VmState::Stopped as i32;
                vm.state_reason = "the vmm process ended while the agent was down".into();
                vm.pid = 0;
            })
            .await;
            return;
        }
        let timeout = self.ctx.config.adopt_timeout;
        let jail_uid = jail_uid_of(pid);
        let probe = tokio::time::timeout(timeout, async {
            let (conn, events) = ControlConn::connect_as(&self.sock, jail_uid).await?;
            let response = conn.request(Request::Describe, timeout).await?;
            Ok::<_, ControlClientError>((conn, events, response))
        })
        .await;
        match probe {
            Ok(Ok((_, _, Response::Description(d)))) if d.state == VmmState::NotConfigured => {
                // An empty vmm waits for the snapshot (or the migration) a previous agent was
                // restoring into it; no one will send it, and its operation was aborted.
                tracing::warn!(vm = %self.vm.vm_id, pid, "the restore was cut short; killing the vmm");
                kill(pid);
                self.wait_gone(pid).await;
                self.record(|vm| {
                    vm.state = VmState::Failed as i32;
                    vm.state_reason =
                        "the agent restarted while this VM was being restored from a snapshot".into();
                    vm.pid = 0;
                })
                .await;
            }
            Ok(Ok((conn, events, Response::Description(d)))) => {
                tracing::info!(vm = %self.vm.vm_id, pid, "re-adopted");
                self.proc = Some(Proc {
                    pid,
                    jail_uid,
                    conn: Some(conn),
                    events: Some(events),
                    child_exit: None,
                    child_code: None,
                    exit_event: None,
                });
                let state = observed_state(d.state);
                if state == VmState::Running && self.vm.boot_ms.is_none() {
                    // Still booting: counted among the boots if a slot is free (never waited for:
                    // it runs already).
                    self.boot_slot = self.ctx.boot_slots.try_take();
                }
                self.record(|vm| vm.state = state as i32).await;
            }
            other => {
                let why = match other {
                    Err(_) => "did not answer in time".to_string(),
                    Ok(Err(e)) => e.to_string(),
                    Ok(Ok(_)) => "answered describe with something else".to_string(),
                };
                tracing::warn!(vm = %self.vm.vm_id, pid, why, "cannot re-adopt; killing the vmm");
                // It is ours but does not answer: a new start would fight it for its disks.
                kill(pid);
                self.wait_gone(pid).await;
                self.record(|vm| {
                    vm.state = VmState::Stopped as i32;
                    vm.state_reason =
                        format!("after the agent restarted, the vmm's control socket {why}; killed it");
                    vm.pid = 0;
                })
                .await;
            }
        }
    }

    /// Waits (a while) for a vmm that is no child of ours to end.
    pub(super) async fn wait_gone(&self, pid: u32) {
        let deadline = Instant::now() + EXIT_TIMEOUT;
        while is_our_vmm(pid, &self.sock) && Instant::now() < deadline {
            sleep(Duration::from_millis(20)).await;
        }
    }
}
