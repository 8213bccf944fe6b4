//! The VMs' actors (`actor.rs`), one per VM, and the calls that reach them: each call becomes a
//! command on the actor's queue, answered when the actor has done it.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, watch};
use vmm_api::snapshot::{SnapshotInfo, SnapshotKind, SnapshotRestore};

use crate::actor::migration::{Incoming, Outgoing};
use crate::actor::{Command, Reply, VmActor};
use crate::error::AgentError;
use crate::operations::CancelToken;
use crate::proto::{BalloonStatus, MigrationProgress, UpdateVmRequest, Vm};
use crate::state::Context;

/// Default time a guest gets to shut down.
pub const DEFAULT_STOP_TIMEOUT: Duration = Duration::from_secs(30);

/// The VM actors of this agent.
pub struct Supervisor {
    ctx: Arc<Context>,
    actors: Mutex<HashMap<String, mpsc::Sender<Command>>>,
}

impl Supervisor {
    /// A supervisor with no actors yet.
    pub fn new(ctx: Arc<Context>) -> Arc<Self> {
        Arc::new(Supervisor {
            ctx,
            actors: Mutex::default(),
        })
    }

    fn actors(&self) -> std::sync::MutexGuard<'_, HashMap<String, mpsc::Sender<Command>>> {
        self.actors.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Starts one actor per stored VM; those the store says run are re-adopted, all in parallel,
    /// each within the adoption timeout. Returns once every VM is settled.
    pub async fn adopt_all(self: &Arc<Self>) -> Result<(), AgentError> {
        let vms = self.ctx.store.call(|s| s.list_vms()).await?;
        let mut done = Vec::new();
        for vm in vms {
            let (tx, rx) = oneshot::channel();
            let vm_id = vm.vm_id.clone();
            let actor = self.spawn_actor(vm, Some(tx));
            done.push((actor, vm_id, rx));
        }
        for (actor, vm_id, rx) in done {
            // False: the actor removed what a previous agent left half made, and ended.
            if let Ok(false) = rx.await {
                self.forget(&vm_id, Some(actor));
            }
        }
        Ok(())
    }

    /// Starts the VM's actor and returns its command channel (also kept in the map).
    fn spawn_actor(&self, vm: Vm, adopted: Option<oneshot::Sender<bool>>) -> mpsc::Sender<Command> {
        let (tx, rx) = mpsc::channel(16);
        self.actors().insert(vm.vm_id.clone(), tx.clone());
        tokio::spawn(VmActor::new(self.ctx.clone(), vm, rx).run(adopted));
        tx
    }

    /// Starts the actor of a VM just stored (in state STARTING); `start` then has it run the vmm.
    pub fn add(&self, vm: Vm) {
        self.spawn_actor(vm, None);
    }

    /// Like `ask`, refused (FAILED_PRECONDITION) while the VM migrates: for calls that change it.
    async fn change<T>(&self, vm_id: &str, make: impl FnOnce(Reply<T>) -> Command) -> Result<T, AgentError> {
        self.ctx.migrations.check_idle(vm_id)?;
        self.ask(vm_id, make).await
    }

    async fn ask<T>(&self, vm_id: &str, make: impl FnOnce(Reply<T>) -> Command) -> Result<T, AgentError> {
        let tx = self
            .actors()
            .get(vm_id)
            .cloned()
            .ok_or_else(|| AgentError::VmNotFound(vm_id.to_string()))?;
        let (reply, rx) = oneshot::channel();
        tx.send(make(reply))
            .await
            .map_err(|_| AgentError::VmNotFound(vm_id.to_string()))?;
        rx.await.map_err(|_| AgentError::VmNotFound(vm_id.to_string()))?
    }

    /// Starts a stopped VM.
    pub async fn start(&self, vm_id: &str) -> Result<Vm, AgentError> {
        self.change(vm_id, Command::Start).await
    }

    /// Whether this agent has a VM with this id.
    pub fn has(&self, vm_id: &str) -> bool {
        self.actors().contains_key(vm_id)
    }

    /// Stops a VM: asks the guest, then stops it hard after `timeout` (at once with `force`, or
    /// when `cancel` fires: the result is then CANCELLED).
    pub async fn stop(
        &self,
        vm_id: &str,
        timeout: Duration,
        force: bool,
        cancel: CancelToken,
    ) -> Result<Vm, AgentError> {
        self.change(vm_id, |reply| Command::Stop {
            timeout,
            force,
            cancel,
            reply,
        })
        .await
    }

    /// Pauses a running VM.
    pub async fn pause(&self, vm_id: &str) -> Result<Vm, AgentError> {
        self.change(vm_id, Command::Pause).await
    }

    /// Resumes a paused VM.
    pub async fn resume(&self, vm_id: &str) -> Result<Vm, AgentError> {
        self.change(vm_id, Command::Resume).await
    }

    /// Stops (gracefully) and starts a VM; when `cancel` fires during the stop, the VM is stopped
    /// hard and not started again (the result is then CANCELLED).
    pub async fn reboot(
        &self,
        vm_id: &str,
        timeout: Duration,
        cancel: CancelToken,
    ) -> Result<Vm, AgentError> {
        self.change(vm_id, |reply| Command::Reboot {
            timeout,
            cancel,
            reply,
        })
        .await
    }

    /// Changes a VM's memory target (see `UpdateVm`).
    pub async fn update(&self, vm_id: &str, request: UpdateVmRequest) -> Result<Vm, AgentError> {
        self.change(vm_id, |reply| Command::Update {
            request: Box::new(request),
            reply,
        })
        .await
    }

    /// The balloon of a running or paused VM.
    pub async fn balloon(&self, vm_id: &str) -> Result<BalloonStatus, AgentError> {
        self.ask(vm_id, Command::Balloon).await
    }

    /// Writes a snapshot of a running or paused VM to `dir` (which must not exist), pausing it
    /// meanwhile and resuming it afterwards unless `leave_paused`.
    pub async fn snapshot(
        &self,
        vm_id: &str,
        dir: PathBuf,
        kind: SnapshotKind,
        leave_paused: bool,
        cancel: CancelToken,
    ) -> Result<SnapshotInfo, AgentError> {
        self.change(vm_id, |reply| Command::Snapshot {
            dir,
            kind,
            leave_paused,
            cancel,
            reply,
        })
        .await
    }

    /// Runs a VM just stored and added (STARTING) from a snapshot. If that fails, the VM is
    /// removed (record and files) and the error returned.
    pub async fn restore(
        &self,
        vm_id: &str,
        request: SnapshotRestore,
        chain: Vec<PathBuf>,
        cancel: CancelToken,
    ) -> Result<Vm, AgentError> {
        let actor = self.actors().get(vm_id).cloned();
        let result = self
            .ask(vm_id, |reply| Command::Restore {
                request: Box::new(request),
                chain,
                cancel,
                reply,
            })
            .await;
        if result.is_err() {
            self.forget(vm_id, actor);
        }
        result
    }

    /// Drops the actor entry of a VM that is gone, unless a new VM with its id has one by now.
    fn forget(&self, vm_id: &str, actor: Option<mpsc::Sender<Command>>) {
        let mut actors = self.actors();
        if let (Some(old), Some(current)) = (actor, actors.get(vm_id)) {
            if old.same_channel(current) {
                actors.remove(vm_id);
            }
        }
    }

    /// Stops a VM hard and forgets it.
    pub async fn delete(&self, vm_id: &str) -> Result<(), AgentError> {
        let actor = self.actors().get(vm_id).cloned();
        self.change(vm_id, Command::Delete).await?;
        self.forget(vm_id, actor);
        Ok(())
    }

    /// Live-migrates a VM away (see [`Command::MigrateOut`]); once it succeeded the VM is gone
    /// from here.
    pub(crate) async fn migrate_out(
        &self,
        vm_id: &str,
        plan: Outgoing,
        cancel: CancelToken,
        progress: watch::Sender<MigrationProgress>,
    ) -> Result<MigrationProgress, AgentError> {
        let actor = self.actors().get(vm_id).cloned();
        let result = self
            .ask(vm_id, |reply| Command::MigrateOut {
                plan: Box::new(plan),
                cancel,
                progress,
                reply,
            })
            .await;
        if result.is_ok() {
            self.forget(vm_id, actor);
        }
        result
    }

    /// Runs a VM just stored and added (STARTING) from an incoming migration. If that fails, the
    /// VM is removed (record and files) and the error returned.
    pub(crate) async fn migrate_in(&self, vm_id: &str, plan: Incoming) -> Result<Vm, AgentError> {
        let actor = self.actors().get(vm_id).cloned();
        let result = self
            .ask(vm_id, |reply| Command::MigrateIn {
                plan: Box::new(plan),
                reply,
            })
            .await;
        if result.is_err() {
            self.forget(vm_id, actor);
        }
        result
    }
}
