//! The snapshot commands of a VM's actor: writing a snapshot of its running vmm, and running a new
//! VM from one in an empty vmm.

use std::path::{Path, PathBuf};
use std::time::Duration;

use vmm_api::control::{Request, Response};
use vmm_api::snapshot::{SnapshotCreate, SnapshotInfo, SnapshotKind, SnapshotRestore};

use super::jail::ArrivingDisks;
use super::{observed_state, VmActor};
use crate::error::AgentError;
use crate::jail_snapshot::JailStaging;
use crate::operations::CancelToken;
use crate::proto::{Vm, VmState};

/// How long writing a snapshot may take (memory and disk copies; GiBs on slow disks).
const SNAPSHOT_TIMEOUT: Duration = Duration::from_secs(30 * 60);
/// How long a restore may take (it copies the writable disks).
const RESTORE_TIMEOUT: Duration = Duration::from_secs(30 * 60);

impl VmActor {
    /// Pauses the VM if it runs, writes a snapshot to `dir`, and resumes it unless `leave_paused`.
    /// A failed snapshot leaves the VM as it was.
    pub(super) async fn snapshot(
        &mut self,
        dir: &Path,
        kind: SnapshotKind,
        leave_paused: bool,
        cancel: &CancelToken,
    ) -> Result<SnapshotInfo, AgentError> {
        let state = self.vm.state();
        if self.proc.is_none() || !matches!(state, VmState::Running | VmState::Paused) {
            return Err(self.wrong_state(state, "snapshotted"));
        }
        if cancel.is_cancelled() {
            return Err(AgentError::Cancelled(
                "cancelled before the snapshot began; the VM is unchanged".into(),
            ));
        }
        let staging = match self.proc.as_ref().and_then(|p| p.jail_uid) {
            Some(uid) => {
                let jail = self.ctx.config.jail_dir(&self.vm.vm_id);
                Some(JailStaging::prepare(&jail, dir, uid)?)
            }
            None => None,
        };
        let was_running = state == VmState::Running;
        if was_running {
            if let Err(e) = self.pause_resume(true).await {
                if let Some(staging) = staging {
                    staging.abandon();
                }
                return Err(e);
            }
        }
        // The vmm writes it in one go: past this point, a cancel request changes nothing.
        let request = Request::SnapshotCreate(SnapshotCreate {
            dir: staging.as_ref().map_or(dir, |s| s.vmm_path()).to_path_buf(),
            kind,
        });
        let written = match self.request_within(request, SNAPSHOT_TIMEOUT).await {
            Ok(Response::SnapshotCreated(info)) => Ok(info),
            Ok(other) => Err(AgentError::Internal(format!(
                "the vmm answered snapshot-create with {other:?}"
            ))),
            Err(e) => Err(e),
        };
        let written = match (written, staging) {
            (Ok(info), Some(staging)) => staging.finish().map(|()| info),
            (Err(e), Some(staging)) => {
                staging.abandon();
                Err(e)
            }
            (written, None) => written,
        };
        if was_running && (written.is_err() || !leave_paused) {
            if let Err(e) = self.pause_resume(false).await {
                tracing::error!(vm = %self.vm.vm_id, error = %e, "cannot resume after a snapshot");
                self.record(|vm| vm.state_reason = format!("not resumed after a snapshot: {e}"))
                    .await;
            }
        }
        written
    }

    /// Runs this VM (just stored, STARTING) from a snapshot in a new, empty vmm. On failure the
    /// vmm is gone and the caller removes the VM.
    /// `chain` holds the directories of the snapshot and of those it builds on, which a jailed
    /// vmm is shown.
    pub(super) async fn restore(
        &mut self,
        mut request: SnapshotRestore,
        chain: Vec<PathBuf>,
        cancel: &CancelToken,
    ) -> Result<Vm, AgentError> {
        if self.proc.is_some() || self.vm.state() != VmState::Starting {
            return Err(self.wrong_state(self.vm.state(), "restored"));
        }
        self.start_for_arrival(
            &mut request.overrides,
            chain,
            ArrivingDisks::Create,
            "restoring VM",
        )
        .await?;
        let resume = request.resume;
        let mut cancelled = cancel.clone();
        let answer = tokio::select! {
            answer = self.request_within(Request::SnapshotRestore(request), RESTORE_TIMEOUT) => answer,
            _ = cancelled.cancelled() => Err(AgentError::Cancelled(
                "cancelled: the restore was stopped and the new VM removed".into(),
            )),
        };
        let state = match answer {
            Ok(Response::Restored { state, .. }) => observed_state(state),
            Ok(other) => {
                self.kill_and_wait().await;
                return Err(AgentError::Internal(format!(
                    "the vmm answered snapshot-restore with {other:?}"
                )));
            }
            Err(e) => {
                self.kill_and_wait().await;
                return Err(e);
            }
        };
        let desired = if resume { VmState::Running } else { VmState::Paused };
        self.save(|vm| {
            vm.state = state as i32;
            vm.desired_state = desired as i32;
        })
        .await?;
        Ok(self.vm.clone())
    }
}
