//! One actor per VM: a tokio task that owns the VM's `vmm` process and control connection, takes
//! lifecycle commands one at a time from an mpsc queue, and writes every state change to the store
//! (which publishes it to `WatchVms`).
//!
//! A vmm runs in its own process group with its output in files, so it neither gets the agent's
//! terminal signals nor dies with it. After an agent restart the vmm is no child of ours: the actor
//! watches it through its control connection (which closes when the vmm exits) and its pid.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::{sleep, Instant};
use vmm_api::control::{Event, Request, Response, ShutdownRequest, VmState as VmmState};
use vmm_api::snapshot::{SnapshotInfo, SnapshotKind, SnapshotRestore};

use crate::boot_slots::BootSlot;
use crate::console;
use crate::control::{ConnEvent, ControlClientError, ControlConn};
use crate::error::AgentError;
use crate::operations::CancelToken;
use crate::process::{is_our_vmm, kill};
use crate::proto::{BalloonStatus, MigrationProgress, UpdateVmRequest, Vm, VmState};
use crate::state::Context;

/// How long a control request may take (pause waits up to 2 s per vCPU inside the vmm).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a new vmm may take to open its control socket.
const SOCKET_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a new vmm may take to report its vCPUs running.
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a vmm may take to end after `stop` or SIGKILL.
const EXIT_TIMEOUT: Duration = Duration::from_secs(5);
/// How often the actor checks the process and the console log size.
const TICK: Duration = Duration::from_secs(1);

pub(crate) type Reply<T> = oneshot::Sender<Result<T, AgentError>>;

/// A lifecycle request to a VM's actor.
pub(crate) enum Command {
    Start(Reply<Vm>),
    Stop {
        timeout: Duration,
        force: bool,
        cancel: CancelToken,
        reply: Reply<Vm>,
    },
    Pause(Reply<Vm>),
    Resume(Reply<Vm>),
    Reboot {
        timeout: Duration,
        cancel: CancelToken,
        reply: Reply<Vm>,
    },
    Delete(Reply<()>),
    /// Sets a new memory target (balloon) and stores it in the spec.
    Update {
        request: Box<UpdateVmRequest>,
        reply: Reply<Vm>,
    },
    /// The balloon's report.
    Balloon(Reply<BalloonStatus>),
    /// Writes a snapshot to `dir` (pausing the VM meanwhile).
    Snapshot {
        dir: PathBuf,
        kind: SnapshotKind,
        leave_paused: bool,
        cancel: CancelToken,
        reply: Reply<SnapshotInfo>,
    },
    /// Runs this new VM from a snapshot; if that fails, the VM is deleted and the actor ends.
    Restore {
        request: Box<SnapshotRestore>,
        /// The directories of the snapshot and of those it builds on.
        chain: Vec<PathBuf>,
        cancel: CancelToken,
        reply: Reply<Vm>,
    },
    /// Live-migrates the VM away; once the destination owns it, it is deleted here and the actor
    /// ends.
    MigrateOut {
        plan: Box<migration::Outgoing>,
        cancel: CancelToken,
        progress: watch::Sender<MigrationProgress>,
        reply: Reply<MigrationProgress>,
    },
    /// Runs this new VM from an incoming migration; if that fails, the VM is deleted and the
    /// actor ends.
    MigrateIn {
        plan: Box<migration::Incoming>,
        reply: Reply<Vm>,
    },
}

/// The running vmm of a VM.
struct Proc {
    pid: u32,
    /// The uid of a jailed vmm, which must be the one serving its control socket.
    jail_uid: Option<u32>,
    conn: Option<ControlConn>,
    events: Option<mpsc::Receiver<ConnEvent>>,
    /// The exit code (None: killed by a signal), when the vmm is our child.
    child_exit: Option<oneshot::Receiver<Option<i32>>>,
    /// What `child_exit` delivered: the child was reaped, with this code.
    child_code: Option<Option<i32>>,
    /// The `exit` event, if the vmm sent one.
    exit_event: Option<(String, i32)>,
}

/// The actor of one VM.
pub(crate) struct VmActor {
    ctx: Arc<Context>,
    vm: Vm,
    sock: PathBuf,
    dir: PathBuf,
    proc: Option<Proc>,
    commands: mpsc::Receiver<Command>,
    /// We asked the vmm to end: its exit is a stop, not a failure.
    stopping: bool,
    /// When the current start began, until the guest reports its boot complete (for the
    /// start-to-running and start-to-boot-complete metrics).
    start_began: Option<Instant>,
    /// Held from the start's admission until the guest reports its boot complete.
    boot_slot: Option<BootSlot>,
    /// A command that ended a start's wait for a boot slot, to run once the start returned.
    deferred: Option<Command>,
}

fn state_name(state: VmState) -> &'static str {
    match state {
        VmState::Unspecified => "in an unknown state",
        VmState::Starting => "starting",
        VmState::Running => "running",
        VmState::Paused => "paused",
        VmState::Stopping => "stopping",
        VmState::Stopped => "stopped",
        VmState::Failed => "failed",
    }
}

impl VmActor {
    /// An actor for `vm`, taking commands from `commands`; nothing runs until [`VmActor::run`].
    pub(crate) fn new(ctx: Arc<Context>, vm: Vm, commands: mpsc::Receiver<Command>) -> Self {
        VmActor {
            sock: ctx.config.api_sock(&vm.vm_id),
            dir: ctx.config.vm_dir(&vm.vm_id),
            ctx,
            vm,
            proc: None,
            commands,
            stopping: false,
            start_began: None,
            boot_slot: None,
            deferred: None,
        }
    }

    /// Runs until the VM is deleted or every sender is gone. With `adopted`, first re-adopts the
    /// VM's vmm (or settles its state) and says so on it.
    pub(crate) async fn run(mut self, adopted: Option<oneshot::Sender<bool>>) {
        if let Some(done) = adopted {
            let kept = self.adopt().await;
            let _ = done.send(kept);
            if !kept {
                return;
            }
        }
        let mut tick = tokio::time::interval(TICK);
        loop {
            if let Some(cmd) = self.deferred.take() {
                if self.handle(cmd).await {
                    return;
                }
                continue;
            }
            tokio::select! {
                cmd = self.commands.recv() => {
                    let Some(cmd) = cmd else { return };
                    if self.handle(cmd).await {
                        return;
                    }
                }
                event = next_event(&mut self.proc) => self.on_conn_event(event).await,
                _ = tick.tick() => self.on_tick().await,
            }
        }
    }

    /// Handles one command; true when the actor should end (the VM was deleted).
    async fn handle(&mut self, cmd: Command) -> bool {
        match cmd {
            Command::Start(reply) => {
                let _ = reply.send(self.start().await);
            }
            Command::Stop {
                timeout,
                force,
                cancel,
                reply,
            } => {
                let _ = reply.send(self.stop(timeout, force, &cancel).await);
            }
            Command::Pause(reply) => {
                let _ = reply.send(self.pause_resume(true).await);
            }
            Command::Resume(reply) => {
                let _ = reply.send(self.pause_resume(false).await);
            }
            Command::Reboot {
                timeout,
                cancel,
                reply,
            } => {
                let result = match self.vm.state() {
                    VmState::Running | VmState::Paused => match self.stop(timeout, false, &cancel).await {
                        Ok(_) if cancel.is_cancelled() => Err(AgentError::Cancelled(
                            "cancelled: the VM was stopped and not started again".into(),
                        )),
                        Ok(_) => self.start().await,
                        Err(e) => Err(e),
                    },
                    s => Err(self.wrong_state(s, "rebooted")),
                };
                let _ = reply.send(result);
            }
            Command::Delete(reply) => {
                let result = self.delete().await;
                let ok = result.is_ok();
                let _ = reply.send(result);
                return ok;
            }
            Command::Update { request, reply } => {
                let _ = reply.send(self.update(&request).await);
            }
            Command::Balloon(reply) => {
                let _ = reply.send(self.balloon().await);
            }
            Command::Snapshot {
                dir,
                kind,
                leave_paused,
                cancel,
                reply,
            } => {
                let _ = reply.send(self.snapshot(&dir, kind, leave_paused, &cancel).await);
            }
            Command::Restore {
                request,
                chain,
                cancel,
                reply,
            } => {
                let result = self.restore(*request, chain, &cancel).await;
                return self.keep_or_remove(result, reply, "restore").await;
            }
            Command::MigrateOut {
                plan,
                cancel,
                progress,
                reply,
            } => {
                let result = self.migrate_out(*plan, &cancel, &progress).await;
                let gone = result.is_ok();
                let _ = reply.send(result);
                return gone;
            }
            Command::MigrateIn { plan, reply } => {
                let result = self.migrate_in(*plan).await;
                return self.keep_or_remove(result, reply, "incoming migration").await;
            }
        }
        false
    }

    /// Answers a command that made this VM; if it failed, nothing of the VM is kept (no record,
    /// no files) and the actor ends (true).
    async fn keep_or_remove(&mut self, result: Result<Vm, AgentError>, reply: Reply<Vm>, what: &str) -> bool {
        let failed = result.is_err();
        if failed {
            if let Err(e) = self.delete().await {
                tracing::error!(vm = %self.vm.vm_id, error = %e, "cannot remove a failed {what}");
            }
        }
        let _ = reply.send(result);
        failed
    }

    fn wrong_state(&self, state: VmState, verb: &str) -> AgentError {
        AgentError::WrongState(format!(
            "VM '{}' is {} and cannot be {verb}",
            self.vm.vm_id,
            state_name(state)
        ))
    }

    /// Records the state the vmm reports (what it says is the truth); nothing if it does not
    /// answer.
    async fn record_vmm_state(&mut self) {
        if let Ok(Response::Description(d)) = self.request(Request::Describe).await {
            let state = observed_state(d.state);
            self.record(|vm| vm.state = state as i32).await;
        }
    }

    /// Writes the VM's record after `change`, if it changed anything.
    async fn save(&mut self, change: impl FnOnce(&mut Vm)) -> Result<(), AgentError> {
        let mut vm = self.vm.clone();
        change(&mut vm);
        if vm == self.vm {
            return Ok(());
        }
        self.vm = self.ctx.store.call(move |s| s.update_vm(vm, None)).await?;
        Ok(())
    }

    /// Like `save`, logging instead of failing: used where the vmm's state changed whatever the
    /// database says (the next change writes the whole record again).
    async fn record(&mut self, change: impl FnOnce(&mut Vm)) {
        if let Err(e) = self.save(change).await {
            tracing::error!(vm = %self.vm.vm_id, error = %e, "cannot record a state change");
        }
    }

    async fn on_conn_event(&mut self, event: ConnEvent) {
        match event {
            ConnEvent::Event(Event::StateChanged { state }) => {
                if !self.stopping {
                    let state = observed_state(state);
                    self.record(|vm| vm.state = state as i32).await;
                }
            }
            ConnEvent::Event(Event::GuestBootComplete { boot_ms }) => {
                if let Some(began) = self.start_began.take() {
                    self.ctx.metrics.observe_start_to_boot_complete(began.elapsed());
                }
                self.release_boot_slot("boot complete");
                self.record(|vm| vm.boot_ms = Some(boot_ms)).await;
            }
            ConnEvent::Event(Event::Exit { reason, code }) => {
                if let Some(p) = self.proc.as_mut() {
                    p.exit_event = Some((reason, code));
                }
            }
            ConnEvent::Event(Event::GuestPanic) => {
                tracing::warn!(vm = %self.vm.vm_id, "guest panicked");
            }
            ConnEvent::Event(Event::VcpuError { message }) => {
                tracing::warn!(vm = %self.vm.vm_id, message, "vCPU error");
            }
            // Followed by `migrate_out` while it runs; stray ones say nothing new.
            ConnEvent::Event(
                Event::MigrationProgress(_) | Event::MigrationCompleted(_) | Event::MigrationFailed(_),
            ) => {}
            ConnEvent::Closed => {
                if let Some(p) = self.proc.as_mut() {
                    p.conn = None;
                    p.events = None;
                }
                self.on_tick().await;
            }
        }
    }

    /// Checks that the vmm lives (reconnecting if the connection was lost) and caps its console log.
    async fn on_tick(&mut self) {
        self.expire_boot_slot();
        let Some(p) = self.proc.as_mut() else {
            return;
        };
        let max = self.ctx.config.console_log_max_bytes;
        for log in [
            self.ctx.config.console_log(&self.vm.vm_id),
            self.dir.join("vmm.log"),
        ] {
            if let Err(e) = console::cap(&log, max) {
                tracing::warn!(vm = %self.vm.vm_id, error = %e, log = %log.display(), "cannot cap a log");
            }
        }
        if p.conn.is_some() {
            return;
        }
        // The connection is gone: the vmm is exiting, or dropped us. Give it a moment to exit.
        let (pid, jail_uid) = (p.pid, p.jail_uid);
        let deadline = Instant::now() + Duration::from_secs(2);
        while Instant::now() < deadline {
            if self.exited().await {
                return self.finish().await;
            }
            if let Ok((conn, events)) = ControlConn::connect_as(&self.sock, jail_uid).await {
                tracing::info!(vm = %self.vm.vm_id, pid, "reconnected to the control socket");
                if let Some(p) = self.proc.as_mut() {
                    p.conn = Some(conn);
                    p.events = Some(events);
                }
                // Events sent while we were away are lost: ask for the state instead.
                if let Ok(Response::Description(d)) = self.request(Request::Describe).await {
                    if !self.stopping {
                        let state = observed_state(d.state);
                        self.record(|vm| vm.state = state as i32).await;
                    }
                }
                return;
            }
            sleep(Duration::from_millis(50)).await;
        }
    }

    /// Whether the vmm has ended (our child reaped, or the pid no longer ours).
    async fn exited(&mut self) -> bool {
        let Some(p) = self.proc.as_mut() else {
            return true;
        };
        if p.child_code.is_some() {
            return true;
        }
        if let Some(rx) = p.child_exit.as_mut() {
            return match rx.try_recv() {
                Ok(code) => {
                    p.child_code = Some(code);
                    true
                }
                Err(oneshot::error::TryRecvError::Empty) => false,
                Err(oneshot::error::TryRecvError::Closed) => {
                    p.child_code = Some(None);
                    true
                }
            };
        }
        !is_our_vmm(p.pid, &self.sock)
    }

    /// The vmm has ended: records why, as STOPPED (clean exit, or one we asked for) or FAILED.
    async fn finish(&mut self) {
        let Some(mut p) = self.proc.take() else {
            return;
        };
        self.start_began = None;
        self.release_boot_slot("the vmm ended");
        let child_code = match (p.child_code, p.child_exit.as_mut()) {
            (Some(code), _) => Some(code),
            // Our child: its status comes once it is reaped, which is at once after an exit.
            (None, Some(rx)) => tokio::time::timeout(EXIT_TIMEOUT, rx)
                .await
                .ok()
                .map(|r| r.ok().flatten()),
            (None, None) => None,
        };
        let code = match (child_code, &p.exit_event) {
            (Some(code), _) => code,
            (None, Some((_, code))) => Some(*code),
            (None, None) => None,
        };
        let reason = match (&p.exit_event, code) {
            (Some((reason, _)), _) => reason.clone(),
            (None, Some(code)) => format!("the vmm exited with code {code}{}", self.log_hint()),
            (None, None) if child_code.is_some() => {
                format!("the vmm was killed by a signal{}", self.log_hint())
            }
            (None, None) => "the vmm process vanished".to_string(),
        };
        let reason = if self.stopping {
            format!("stopped on request ({reason})")
        } else {
            reason
        };
        let state = if self.stopping || code == Some(0) {
            VmState::Stopped
        } else {
            VmState::Failed
        };
        tracing::info!(vm = %self.vm.vm_id, pid = p.pid, ?code, reason, "vmm ended");
        // The vmm removes its socket on a clean exit; not when it was killed.
        let _ = std::fs::remove_file(&self.sock);
        self.remove_jail_leftovers();
        if let Some(cgroups) = &self.ctx.cgroups {
            cgroups.remove(&self.vm.vm_id);
        }
        let ended_by_itself = !self.stopping;
        self.record(|vm| {
            vm.state = state as i32;
            vm.state_reason = reason;
            vm.pid = 0;
            vm.exit_code = code;
            if ended_by_itself {
                // The guest powered off or crashed: nothing asks for it to run any more.
                vm.desired_state = VmState::Stopped as i32;
            }
        })
        .await;
    }

    /// The last line the vmm logged, as `: <line>`, to explain a failure.
    fn log_hint(&self) -> String {
        let text = std::fs::read(self.dir.join("vmm.log")).unwrap_or_default();
        let text = String::from_utf8_lossy(&text[text.len().saturating_sub(4096)..]).into_owned();
        match text.lines().rev().find(|l| !l.trim().is_empty()) {
            Some(line) => format!(": {}", line.trim()),
            None => String::new(),
        }
    }

    /// Processes events until `done` holds, the vmm ends, `deadline` passes or `cancel` fires.
    async fn pump_until(&mut self, deadline: Instant, mut cancel: CancelToken, done: impl Fn(&Self) -> bool) {
        while !done(self) && self.proc.is_some() {
            tokio::select! {
                _ = cancel.cancelled() => return,
                event = next_event(&mut self.proc) => self.on_conn_event(event).await,
                _ = sleep(Duration::from_millis(200)) => {
                    if self.exited().await {
                        self.finish().await;
                    }
                }
                _ = tokio::time::sleep_until(deadline) => return,
            }
        }
    }

    /// Kills a vmm that misbehaves while starting and records it as failed.
    async fn give_up(&mut self, why: &str) -> Result<Vm, AgentError> {
        tracing::warn!(vm = %self.vm.vm_id, why, "killing the vmm");
        self.kill_and_wait().await;
        self.record(|vm| {
            vm.state = VmState::Failed as i32;
            vm.state_reason = why.to_string();
        })
        .await;
        Ok(self.vm.clone())
    }

    async fn kill_and_wait(&mut self) {
        if let Some(p) = &self.proc {
            kill(p.pid);
        }
        self.pump_until(Instant::now() + EXIT_TIMEOUT, CancelToken::never(), |a| {
            a.proc.is_none()
        })
        .await;
        // Still there (unkillable?): forget it rather than block the actor forever.
        self.finish().await;
    }

    async fn request(&mut self, request: Request) -> Result<Response, AgentError> {
        self.request_within(request, REQUEST_TIMEOUT).await
    }

    /// Sends a control request and waits up to `timeout` for its answer; a refusal is
    /// FAILED_PRECONDITION with the vmm's message.
    async fn request_within(&self, request: Request, timeout: Duration) -> Result<Response, AgentError> {
        self.request_fds_within(request, &[], timeout).await
    }

    /// Like `request_within`, with descriptors attached (SCM_RIGHTS).
    async fn request_fds_within(
        &self,
        request: Request,
        fds: &[std::os::fd::BorrowedFd<'_>],
        timeout: Duration,
    ) -> Result<Response, AgentError> {
        let conn = self.proc.as_ref().and_then(|p| p.conn.as_ref()).ok_or_else(|| {
            AgentError::Unavailable(format!(
                "the control connection of VM '{}' is down; try again",
                self.vm.vm_id
            ))
        })?;
        conn.request_with_fds(request, fds, timeout)
            .await
            .map_err(|e| match e {
                ControlClientError::Refused(c) => {
                    AgentError::WrongState(format!("the vmm refused: {}", c.message))
                }
                e => AgentError::Unavailable(format!("VM '{}': {e}", self.vm.vm_id)),
            })
    }

    async fn pause_resume(&mut self, pause: bool) -> Result<Vm, AgentError> {
        let state = self.vm.state();
        let (from, to) = if pause {
            (VmState::Running, VmState::Paused)
        } else {
            (VmState::Paused, VmState::Running)
        };
        if state == to {
            return Ok(self.vm.clone());
        }
        if state != from || self.proc.is_none() {
            return Err(self.wrong_state(state, if pause { "paused" } else { "resumed" }));
        }
        let request = if pause { Request::Pause } else { Request::Resume };
        if let Response::StateChange { state, .. } = self.request(request).await? {
            let state = observed_state(state);
            self.save(|vm| {
                vm.state = state as i32;
                vm.desired_state = to as i32;
            })
            .await?;
        }
        if pause {
            // A paused guest uses no CPU; its boot, if it resumes, goes on outside the limit.
            self.release_boot_slot("paused");
        }
        Ok(self.vm.clone())
    }

    /// Stops the VM. With `cancel` fired while the guest is given time to shut down, the VM is
    /// stopped hard at once and the result is CANCELLED.
    async fn stop(&mut self, timeout: Duration, force: bool, cancel: &CancelToken) -> Result<Vm, AgentError> {
        if cancel.is_cancelled() {
            // Queued behind another command and cancelled meanwhile: nothing was done.
            return Err(AgentError::Cancelled(
                "cancelled before the stop began; the VM is unchanged".into(),
            ));
        }
        self.save(|vm| vm.desired_state = VmState::Stopped as i32).await?;
        if self.proc.is_none() {
            return match self.vm.state() {
                VmState::Stopped | VmState::Failed => Ok(self.vm.clone()),
                // Stored as running but no process (cannot normally happen): settle it.
                _ => {
                    self.save(|vm| {
                        vm.state = VmState::Stopped as i32;
                        vm.pid = 0;
                    })
                    .await?;
                    Ok(self.vm.clone())
                }
            };
        }
        self.stopping = true;
        self.record(|vm| vm.state = VmState::Stopping as i32).await;
        if !force {
            let timeout_ms = timeout.as_millis() as u64;
            let asked = self
                .request(Request::Shutdown(ShutdownRequest {
                    timeout_ms: Some(timeout_ms),
                }))
                .await;
            if asked.is_ok() {
                // The vmm itself stops the VM hard after the timeout; allow it a little longer.
                self.pump_until(Instant::now() + timeout + EXIT_TIMEOUT, cancel.clone(), |a| {
                    a.proc.is_none()
                })
                .await;
            }
        }
        let cut_short = self.proc.is_some() && cancel.is_cancelled();
        if self.proc.is_some() {
            let _ = self.request(Request::Stop).await;
            self.pump_until(Instant::now() + EXIT_TIMEOUT, CancelToken::never(), |a| {
                a.proc.is_none()
            })
            .await;
        }
        if self.proc.is_some() {
            self.kill_and_wait().await;
        }
        self.stopping = false;
        if cut_short {
            return Err(AgentError::Cancelled(
                "cancelled: the VM was stopped hard without waiting longer for the guest".into(),
            ));
        }
        Ok(self.vm.clone())
    }

    async fn delete(&mut self) -> Result<(), AgentError> {
        if self.proc.is_some() {
            self.stopping = true;
            if self.request(Request::Stop).await.is_ok() {
                self.pump_until(Instant::now() + EXIT_TIMEOUT, CancelToken::never(), |a| {
                    a.proc.is_none()
                })
                .await;
            }
            if self.proc.is_some() {
                self.kill_and_wait().await;
            }
            self.stopping = false;
        }
        self.remove_record_and_files().await
    }

    /// Forgets the VM: its record, then its directory.
    async fn remove_record_and_files(&mut self) -> Result<(), AgentError> {
        let id = self.vm.vm_id.clone();
        self.ctx.store.call(move |s| s.delete_vm(&id)).await?;
        self.remove_jail_leftovers();
        if let Err(e) = std::fs::remove_dir_all(&self.dir) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!(vm = %self.vm.vm_id, error = %e, "cannot remove the VM's files");
            }
        }
        Ok(())
    }
}

#[path = "actor_snapshot.rs"]
mod snapshot;

#[path = "actor_memory.rs"]
mod memory;

#[path = "actor_migration.rs"]
pub(crate) mod migration;

#[path = "actor_launch.rs"]
mod launch;

#[path = "actor_jail.rs"]
mod jail;

#[path = "actor_adopt.rs"]
mod adopt;

#[path = "actor_admission.rs"]
mod admission;

/// How connecting to a new vmm went.
enum NewVmm {
    Connected,
    /// It ended first.
    Exited,
    /// It did not open its socket in time.
    Silent,
}

/// The agent's view of a vmm state.
fn observed_state(state: VmmState) -> VmState {
    match state {
        VmmState::Running => VmState::Running,
        VmmState::Paused => VmState::Paused,
        VmmState::NotConfigured | VmmState::Configured => VmState::Starting,
    }
}

/// The next event of the vmm's connection; never resolves while there is none.
async fn next_event(proc: &mut Option<Proc>) -> ConnEvent {
    match proc.as_mut().and_then(|p| p.events.as_mut()) {
        Some(rx) => rx.recv().await.unwrap_or(ConnEvent::Closed),
        None => std::future::pending().await,
    }
}
