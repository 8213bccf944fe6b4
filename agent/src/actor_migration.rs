//! The live-migration commands of a VM's actor: sending its running vmm's VM to another host over
//! a TCP connection the destination's agent opened for it, and receiving one into a new, empty
//! vmm. The vmms do the migration (memory rounds, state, mutual TLS, the token); the actors hand
//! them the connection, follow their events and settle the records.

use std::os::fd::{AsFd, OwnedFd};
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::{sleep, timeout, Instant};
use vmm_api::control::{Event, Request, Response};
use vmm_api::migration::{MigrateReceive, MigrateSend, MigrationPhase, MigrationStats};

use super::jail::ArrivingDisks;
use super::{next_event, observed_state, VmActor, EXIT_TIMEOUT};
use crate::control::ConnEvent;
use crate::error::AgentError;
use crate::migrations::with_stats;
use crate::operations::CancelToken;
use crate::proto::{MigrationProgress, Vm, VmState};

/// The name the connection gets in the vmm's descriptor table.
const CONNECTION: &str = "migration";
/// How long connecting to the destination's port may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How often the source's progress is asked for between the vmm's own reports.
const STATUS_INTERVAL: Duration = Duration::from_millis(500);
/// How long the destination waits for the source's vmm to connect.
pub(crate) const ACCEPT_TIMEOUT: Duration = Duration::from_secs(60);
/// The reason a VM stored by `PrepareIncoming` has until its vmm runs it.
pub(crate) const ARRIVING_REASON: &str = "arriving by live migration";
/// How long a restarted agent waits for an interrupted outgoing migration to cancel or end.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(60);

/// What the source's actor needs: where to connect, and what to ask its vmm.
pub(crate) struct Outgoing {
    /// The destination agent, as the caller named it (recorded while the migration runs).
    pub destination: String,
    /// The destination's `HOST:PORT` for the vmm's connection.
    pub data_address: String,
    /// `migrate-send`, with TLS and the token (its connection is set here).
    pub send: MigrateSend,
}

/// What the destination's actor needs.
pub(crate) struct Incoming {
    /// The port the source's vmm connects to (one connection is taken).
    pub listener: tokio::net::TcpListener,
    /// `migrate-receive`, with TLS, the token and this host's taps and console.
    pub receive: MigrateReceive,
    /// How long the migration may take once connected.
    pub wait: Duration,
    /// The files the copied disks go to, created here, empty (none with shared storage).
    pub disk_copies: Vec<std::path::PathBuf>,
}

/// The migration connection, ready for the vmm (blocking, with Nagle off: frames are flushed
/// whole and the switch-over waits on small ones).
fn for_vmm(stream: tokio::net::TcpStream) -> std::io::Result<OwnedFd> {
    let stream = stream.into_std()?;
    stream.set_nonblocking(false)?;
    stream.set_nodelay(true)?;
    Ok(stream.into())
}

impl VmActor {
    /// Hands `conn` to the vmm under [`CONNECTION`].
    async fn give_connection(&self, conn: OwnedFd) -> Result<(), AgentError> {
        let request = Request::AddFds {
            names: vec![CONNECTION.to_string()],
        };
        self.request_fds_within(request, &[conn.as_fd()], super::REQUEST_TIMEOUT)
            .await
            .map(|_| ())
    }

    /// Sends this VM to the destination. On success the vmm has ended, the destination runs the
    /// VM and this agent's record and files are gone (the caller ends the actor); on failure the
    /// VM runs on here.
    pub(super) async fn migrate_out(
        &mut self,
        plan: Outgoing,
        cancel: &CancelToken,
        progress: &watch::Sender<MigrationProgress>,
    ) -> Result<MigrationProgress, AgentError> {
        let state = self.vm.state();
        if self.proc.is_none() || !matches!(state, VmState::Running | VmState::Paused) {
            return Err(self.wrong_state(state, "migrated"));
        }
        if cancel.is_cancelled() {
            return Err(AgentError::Cancelled(
                "cancelled before the migration began; the VM runs on here".into(),
            ));
        }
        let unreachable = |why: String| {
            AgentError::Unavailable(format!(
                "cannot connect to the destination's migration port {}: {why}",
                plan.data_address
            ))
        };
        let stream = match timeout(
            CONNECT_TIMEOUT,
            tokio::net::TcpStream::connect(&plan.data_address),
        )
        .await
        {
            Err(_) => return Err(unreachable(format!("no answer within {CONNECT_TIMEOUT:?}"))),
            Ok(Err(e)) => return Err(unreachable(e.to_string())),
            Ok(Ok(s)) => s,
        };
        let conn = for_vmm(stream).map_err(|e| unreachable(e.to_string()))?;
        self.give_connection(conn).await?;
        // Before the vmm starts: an agent restarted from here on must know the VM may move.
        let destination = plan.destination;
        self.save(|vm| vm.migrating_to = destination).await?;
        let outcome = self.send_and_follow(plan.send, cancel, progress).await;
        if outcome.is_err() {
            if self.proc.is_some() {
                self.record(|vm| vm.migrating_to.clear()).await;
            } else {
                // Whether it ended before or after handing the VM over is not known here.
                self.record_ended_mid_migration("its vmm ended").await;
            }
        }
        if outcome.is_ok() {
            // The destination owns the VM: this vmm ends by itself; then nothing of it is left here.
            self.stopping = true;
            self.pump_until(Instant::now() + EXIT_TIMEOUT, CancelToken::never(), |a| {
                a.proc.is_none()
            })
            .await;
            if self.proc.is_some() {
                self.kill_and_wait().await;
            }
            self.remove_record_and_files().await?;
        }
        outcome.map(|()| progress.borrow().clone())
    }

    async fn send_and_follow(
        &mut self,
        mut send: MigrateSend,
        cancel: &CancelToken,
        progress: &watch::Sender<MigrationProgress>,
    ) -> Result<(), AgentError> {
        send.connection = CONNECTION.to_string();
        match self.request(Request::MigrateSend(send)).await? {
            Response::MigrationStarted(stats) => report(progress, &stats),
            other => {
                return Err(AgentError::Internal(format!(
                    "the vmm answered migrate-send with {other:?}"
                )))
            }
        }
        self.follow_migration(cancel, progress).await
    }

    /// After an agent restart, settles a migration the previous agent was sending: a vmm that
    /// still runs is asked to cancel (before the switch-over the VM then runs on here, as the
    /// aborted operation says); one that is gone, or ends after all, most likely handed the VM
    /// over, so it is recorded as FAILED with the destination named and is not started again
    /// (its desired state becomes STOPPED), never two copies of one VM at once.
    pub(super) async fn settle_interrupted_migration(&mut self) {
        let to = self.vm.migrating_to.clone();
        if self.proc.is_some() {
            if let Err(e) = self.request(Request::MigrateCancel).await {
                tracing::info!(vm = %self.vm.vm_id, error = %e, "migrate-cancel not taken");
            }
            let deadline = Instant::now() + SETTLE_TIMEOUT;
            while Instant::now() < deadline && !self.exited().await {
                if let Ok(Response::MigrationStatus(stats)) = self.request(Request::MigrationStatus).await {
                    if stats.phase == MigrationPhase::Failed {
                        self.record_vmm_state().await;
                        tracing::info!(vm = %self.vm.vm_id, %to, "interrupted migration cancelled; the VM runs on here");
                        self.record(|vm| vm.migrating_to.clear()).await;
                        return;
                    }
                }
                sleep(Duration::from_millis(200)).await;
            }
            if self.proc.is_some() && !self.exited().await {
                // Neither cancelled nor handed over in time: one of the two copies must go, and
                // this one cannot tell whether the other runs.
                tracing::warn!(vm = %self.vm.vm_id, %to, "interrupted migration did not settle; killing the vmm");
                self.kill_and_wait().await;
            }
            self.finish().await;
        }
        tracing::warn!(vm = %self.vm.vm_id, %to, "the vmm ended during an interrupted migration");
        self.record_ended_mid_migration("the agent restarted during the migration and its vmm has ended")
            .await;
    }

    /// Records that the vmm ended while it sent the VM away, before anyone saw the outcome: the
    /// VM may run at the destination, so it must not start here again.
    async fn record_ended_mid_migration(&mut self, what: &str) {
        let to = self.vm.migrating_to.clone();
        self.record(|vm| {
            vm.state = VmState::Failed as i32;
            vm.desired_state = VmState::Stopped as i32;
            vm.pid = 0;
            vm.state_reason = format!(
                "while this VM migrated to {to}, {what}: it most likely runs there now, so it is not \
                 started here; delete this record once the destination has it"
            );
        })
        .await;
    }

    /// Follows the vmm's migration events to the end, asking it to cancel when `cancel` fires.
    async fn follow_migration(
        &mut self,
        cancel: &CancelToken,
        progress: &watch::Sender<MigrationProgress>,
    ) -> Result<(), AgentError> {
        let mut cancelled = cancel.clone();
        let mut cancel_asked = false;
        // The vmm reports at the end of each round; a round on a slow link is long.
        let mut poll = tokio::time::interval(STATUS_INTERVAL);
        loop {
            tokio::select! {
                _ = poll.tick() => {
                    if let Ok(Response::MigrationStatus(stats)) = self.request(Request::MigrationStatus).await {
                        report(progress, &stats);
                    }
                }
                event = next_event(&mut self.proc) => match event {
                    ConnEvent::Event(Event::MigrationProgress(stats)) => report(progress, &stats),
                    ConnEvent::Event(Event::MigrationCompleted(stats)) => {
                        report(progress, &stats);
                        return Ok(());
                    }
                    ConnEvent::Event(Event::MigrationFailed(stats)) => {
                        report(progress, &stats);
                        let why = stats.error.unwrap_or_else(|| "unknown".into());
                        // The vmm has resumed the VM if it ran.
                        self.record_vmm_state().await;
                        return Err(if cancel_asked {
                            AgentError::Cancelled(format!("cancelled ({why}); the VM runs on here"))
                        } else {
                            AgentError::Aborted(format!("the migration failed: {why}; the VM runs on here"))
                        });
                    }
                    other => self.on_conn_event(other).await,
                },
                _ = cancelled.cancelled(), if !cancel_asked => {
                    cancel_asked = true;
                    if let Err(e) = self.request(Request::MigrateCancel).await {
                        // Past the switch-over there is nothing to cancel; the events tell.
                        tracing::info!(vm = %self.vm.vm_id, error = %e, "migrate-cancel not taken");
                    }
                }
                _ = sleep(Duration::from_millis(200)) => {
                    if self.exited().await {
                        self.finish().await;
                        progress.send_modify(|p| {
                            p.phase = crate::proto::MigrationPhase::Failed as i32;
                            p.error = "the vmm ended during the migration".into();
                        });
                        return Err(AgentError::Aborted(format!(
                            "the vmm ended during the migration: {}",
                            self.vm.state_reason
                        )));
                    }
                }
            }
        }
    }

    /// Runs this VM (just stored, STARTING) from a migration into a new, empty vmm. On failure
    /// the vmm is gone and the caller removes the VM.
    pub(super) async fn migrate_in(&mut self, plan: Incoming) -> Result<Vm, AgentError> {
        if self.proc.is_some() || self.vm.state() != VmState::Starting {
            return Err(self.wrong_state(self.vm.state(), "migrated here"));
        }
        let failed = |why: String| AgentError::Unavailable(format!("receiving the VM: {why}"));
        create_empty(&self.dir, &plan.disk_copies)
            .map_err(|e| AgentError::Internal(format!("cannot create the disk copies: {e}")))?;
        let mut receive = plan.receive;
        self.start_for_arrival(
            &mut receive.overrides,
            Vec::new(),
            ArrivingDisks::Existing,
            "receiving the VM",
        )
        .await?;
        let received = async {
            let (stream, peer) = match timeout(ACCEPT_TIMEOUT, plan.listener.accept()).await {
                Err(_) => {
                    return Err(failed(format!(
                        "the source did not connect within {ACCEPT_TIMEOUT:?}"
                    )))
                }
                Ok(Err(e)) => return Err(failed(format!("accepting the source's connection: {e}"))),
                Ok(Ok(accepted)) => accepted,
            };
            // One connection per token: nobody else gets in, whatever they send.
            drop(plan.listener);
            tracing::info!(vm = %self.vm.vm_id, %peer, "migration connection");
            let conn = for_vmm(stream).map_err(|e| failed(e.to_string()))?;
            self.give_connection(conn).await?;
            receive.connection = CONNECTION.to_string();
            self.request_within(Request::MigrateReceive(receive), plan.wait)
                .await
        }
        .await;
        let state = match received {
            Ok(Response::MigrationReceived { state, .. }) => observed_state(state),
            Ok(other) => {
                self.kill_and_wait().await;
                return Err(AgentError::Internal(format!(
                    "the vmm answered migrate-receive with {other:?}"
                )));
            }
            Err(e) => {
                self.kill_and_wait().await;
                return Err(e);
            }
        };
        self.save(|vm| {
            vm.state = state as i32;
            vm.desired_state = state as i32;
            vm.state_reason = String::new();
        })
        .await?;
        Ok(self.vm.clone())
    }
}

/// Creates `files` in `dir`, empty; none may exist already (a copy never lands on something).
fn create_empty(dir: &std::path::Path, files: &[std::path::PathBuf]) -> std::io::Result<()> {
    if files.is_empty() {
        return Ok(());
    }
    std::fs::create_dir_all(dir)?;
    for f in files {
        std::fs::OpenOptions::new().write(true).create_new(true).open(f)?;
    }
    Ok(())
}

fn report(progress: &watch::Sender<MigrationProgress>, stats: &MigrationStats) {
    progress.send_modify(|p| *p = with_stats(p, stats));
}
