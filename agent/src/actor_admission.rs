//! A start waits for a boot slot (see `boot_slots`) before its vmm is spawned. The wait can be
//! long (behind other boots), so the actor keeps answering meanwhile: a stop or a delete ends
//! the wait (the VM never boots) and then runs; anything else is refused, as for any VM that is
//! still starting.

use super::{Command, VmActor};
use crate::error::AgentError;
use crate::proto::VmState;

/// How a wait for a boot slot ended.
pub(super) enum Admission {
    /// The slot is held (`VmActor::boot_slot`).
    Admitted,
    /// A stop or delete came first; it runs once the start has returned.
    Withdrawn,
    /// The agent is shutting down.
    Closed,
}

impl VmActor {
    /// Waits for a boot slot, answering commands meanwhile.
    pub(super) async fn take_boot_slot(&mut self) -> Admission {
        let slots = &self.ctx.boot_slots;
        if let Some(slot) = slots.try_take() {
            self.boot_slot = Some(slot);
            return Admission::Admitted;
        }
        // Written once, so only what stays true: the line moves without rewriting every waiting
        // VM's record (the gauges give the live counts).
        let reason = format!(
            "waiting for a boot slot: at most {} guests boot at once; number {} in line when it began to wait",
            slots.limit().unwrap_or(0),
            slots.waiting() + 1
        );
        tracing::info!(vm = %self.vm.vm_id, "{reason}");
        self.record(|vm| vm.state_reason = reason).await;
        let ctx = self.ctx.clone();
        let wait = ctx.boot_slots.take();
        tokio::pin!(wait);
        loop {
            tokio::select! {
                slot = &mut wait => {
                    self.boot_slot = Some(slot);
                    self.record(|vm| vm.state_reason.clear()).await;
                    return Admission::Admitted;
                }
                cmd = self.commands.recv() => match cmd {
                    None => return Admission::Closed,
                    Some(cmd @ (Command::Stop { .. } | Command::Delete(_))) => {
                        self.deferred = Some(cmd);
                        return Admission::Withdrawn;
                    }
                    Some(Command::Start(reply)) => {
                        let _ = reply.send(Ok(self.vm.clone()));
                    }
                    Some(other) => other.refuse(AgentError::WrongState(format!(
                        "VM '{}' is starting (waiting for a boot slot)",
                        self.vm.vm_id
                    ))),
                },
            }
        }
    }

    /// Ends a start whose wait for a boot slot did not end with one: nothing was spawned.
    pub(super) async fn end_unadmitted_start(
        &mut self,
        admission: Admission,
    ) -> Result<crate::proto::Vm, AgentError> {
        let why = match admission {
            Admission::Admitted => return Ok(self.vm.clone()),
            Admission::Withdrawn => "stopped while waiting for a boot slot",
            Admission::Closed => "the agent shut down while the VM waited for a boot slot",
        };
        self.record(|vm| {
            vm.state = VmState::Stopped as i32;
            vm.state_reason = why.to_string();
            vm.pid = 0;
        })
        .await;
        Err(AgentError::Aborted(format!(
            "VM '{}' was not started: {why}",
            self.vm.vm_id
        )))
    }

    /// Gives the boot slot back once the guest no longer needs it: it reported its boot
    /// complete, or has held the slot too long (a guest without the boot-complete signal).
    pub(super) fn release_boot_slot(&mut self, why: &str) {
        if let Some(slot) = self.boot_slot.take() {
            tracing::debug!(vm = %self.vm.vm_id, held_ms = slot.held_for().as_millis() as u64, why, "boot slot released");
        }
    }

    /// Samples the booting guest's CPU demand (every tick, so that a rate is known when the
    /// timeout comes) and releases its slot once it is held past the agent's timeout by a guest
    /// that is not busy booting (see `boot_slots::should_release`).
    pub(super) fn expire_boot_slot(&mut self) {
        let max = self.ctx.boot_slots.hold_max();
        let pid = self.proc.as_ref().map(|p| p.pid);
        let Some(slot) = self.boot_slot.as_mut() else {
            return;
        };
        // The process that runs the VM (a jailed vmm's launcher's child).
        let demand = pid.and_then(|p| {
            let vm = crate::process::vm_process(p);
            crate::usage::demand_seconds(vm).or_else(|| crate::usage::cpu_seconds(vm))
        });
        if slot.check(demand, max) {
            tracing::info!(
                vm = %self.vm.vm_id,
                held_s = slot.held_for().as_secs(),
                "no boot-complete signal; releasing its boot slot"
            );
            self.release_boot_slot("timed out");
        }
    }
}

impl Command {
    /// Answers the command with `error` without doing it (one arm per reply type).
    pub(super) fn refuse(self, error: AgentError) {
        match self {
            Command::Start(reply)
            | Command::Pause(reply)
            | Command::Resume(reply)
            | Command::Stop { reply, .. }
            | Command::Reboot { reply, .. }
            | Command::Update { reply, .. }
            | Command::Restore { reply, .. }
            | Command::MigrateIn { reply, .. } => {
                let _ = reply.send(Err(error));
            }
            Command::Delete(reply) => {
                let _ = reply.send(Err(error));
            }
            Command::Balloon(reply) => {
                let _ = reply.send(Err(error));
            }
            Command::Snapshot { reply, .. } => {
                let _ = reply.send(Err(error));
            }
            Command::MigrateOut { reply, .. } => {
                let _ = reply.send(Err(error));
            }
        }
    }
}
