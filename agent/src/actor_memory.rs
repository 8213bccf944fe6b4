//! The memory commands of a VM's actor: a new memory target for its balloon, and the balloon's
//! report.

use vmm_api::control::{Request, Response};

use super::VmActor;
use crate::error::AgentError;
use crate::memory::{balloon_status, plan_update};
use crate::proto::{BalloonStatus, UpdateVmRequest, Vm, VmState};

impl VmActor {
    /// Applies an `UpdateVm`: a running or paused VM's vmm is told first (its refusal changes
    /// nothing), then the spec is stored, so that the next start keeps the target.
    pub(super) async fn update(&mut self, req: &UpdateVmRequest) -> Result<Vm, AgentError> {
        let spec = self.vm.spec.clone().unwrap_or_default();
        let (update, new_spec) = plan_update(&self.vm.vm_id, &spec, req)?;
        match self.vm.state() {
            VmState::Running | VmState::Paused if self.proc.is_some() => {
                match self.request(Request::UpdateBalloon(update)).await? {
                    Response::BalloonUpdated => {}
                    other => {
                        return Err(AgentError::Internal(format!(
                            "the vmm answered update-balloon with {other:?}"
                        )))
                    }
                }
            }
            VmState::Stopped | VmState::Failed => {}
            state => return Err(self.wrong_state(state, "updated now; try again")),
        }
        self.save(|vm| vm.spec = Some(new_spec)).await?;
        Ok(self.vm.clone())
    }

    /// The balloon of a running or paused VM, as its vmm reports it.
    pub(super) async fn balloon(&mut self) -> Result<BalloonStatus, AgentError> {
        let memory_mib = self.vm.spec.as_ref().map_or(0, |s| s.memory_mib);
        if self.vm.spec.as_ref().is_none_or(|s| s.balloon.is_none()) {
            return Err(AgentError::WrongState(format!(
                "VM '{}' has no balloon (spec.balloon)",
                self.vm.vm_id
            )));
        }
        let state = self.vm.state();
        if self.proc.is_none() || !matches!(state, VmState::Running | VmState::Paused) {
            return Err(self.wrong_state(state, "asked about its balloon"));
        }
        match self.request(Request::BalloonStats).await? {
            Response::BalloonStats(info) => Ok(balloon_status(&info, memory_mib)),
            other => Err(AgentError::Internal(format!(
                "the vmm answered balloon-stats with {other:?}"
            ))),
        }
    }
}
