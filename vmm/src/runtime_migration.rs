//! The main loop's side of live migration: starting the source's job and the destination's
//! receiver, and doing what their threads ask (dirty log, switch-over, build, commit, undo).

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
use vmm_api::control::{ErrorKind, Event, Response, VmState};
use vmm_api::migration::{MigrateReceive, MigrateSend, MigrationStats, MAX_MIGRATION_TIMEOUT_MS};

use super::{now, wrong_state, Failure, Launch, PendingStart, Reply, Runtime};
use crate::control::ClientId;
use crate::machine::Machine;
use crate::migration::wire::{DiskCopy, Hello, MAGIC, PROTOCOL_VERSION};
use crate::migration::{self, destination, source, FromMain, LoopLink, Shared, SwitchedOver, ToMain};
use crate::persist;
use crate::sync::lock;

/// Longest downtime budget a request may set.
const MAX_DOWNTIME_MS: u64 = 60_000;

/// The migration this VMM sends.
pub(super) struct Outgoing {
    shared: Arc<Shared>,
    link: LoopLink,
    /// Set at the switch-over: whether the VM ran before it was paused.
    was_running: Option<bool>,
}

/// The migration this VMM receives.
pub(super) struct Incoming {
    link: LoopLink,
    client: ClientId,
    id: u64,
    asked: Instant,
    memory_bytes: u64,
    /// KVM's VM with guest memory registered, set up while pages arrive.
    kvm: Option<Result<(kvm_ioctls::Kvm, kvm_ioctls::VmFd), String>>,
}

/// What the control server must pass on after a migration step.
pub enum Notice {
    /// To every client.
    Event(Event),
    /// The deferred answer to a request.
    Answer(ClientId, u64, Result<Response, Failure>),
}

/// The drives of `machine` as the source thread copies them: a descriptor of each image of its
/// own (the thread may not open files) and what the guest writes to it.
fn source_disks(machine: &Machine) -> Result<Vec<source::SourceDisk>, Failure> {
    machine
        .blocks()
        .iter()
        .map(|handle| {
            let transport = lock(handle);
            let block = transport.device();
            if block.has_backing() {
                // Holes in a copy-on-write image stand for its base, not zeros: copied as a raw
                // image, they would hide the base on the destination.
                return Err((
                    ErrorKind::InvalidArgument,
                    format!(
                        "drive {} is copy-on-write over a base image, which a migration cannot copy \
                         yet: migrate with shared storage",
                        block.id()
                    ),
                ));
            }
            let file = block.disk_file().try_clone().map_err(|e| {
                (
                    ErrorKind::Internal,
                    format!(
                        "drive {}: cannot share its image with the migration: {e}",
                        block.id()
                    ),
                )
            })?;
            Ok(source::SourceDisk {
                id: block.id().to_string(),
                file,
                written: Arc::clone(block.written()),
            })
        })
        .collect()
}

impl Runtime {
    pub(super) fn migrate_send(&mut self, params: MigrateSend) -> Reply {
        now(self.start_send(params))
    }

    fn start_send(&mut self, params: MigrateSend) -> Result<Response, Failure> {
        if self.outgoing.is_some() {
            return Err(wrong_state(self.state(), "a migration is already running"));
        }
        if params.max_downtime_ms == 0 || params.max_downtime_ms > MAX_DOWNTIME_MS {
            return Err((
                ErrorKind::InvalidArgument,
                format!(
                    "max_downtime_ms: 1 to {MAX_DOWNTIME_MS}, got {}",
                    params.max_downtime_ms
                ),
            ));
        }
        if params.timeout_ms == 0 || params.timeout_ms > MAX_MIGRATION_TIMEOUT_MS {
            return Err((
                ErrorKind::InvalidArgument,
                format!(
                    "timeout_ms: 1 to {MAX_MIGRATION_TIMEOUT_MS}, got {}",
                    params.timeout_ms
                ),
            ));
        }
        let doorbell = Arc::clone(&self.events.migration_event);
        let state = self.state();
        let machine = self.machine()?;
        if machine.kvm().dirty.is_none() {
            return Err(wrong_state(
                state,
                "live migration needs machine.track_dirty_pages (--track-dirty-pages on)",
            ));
        }
        let mem = machine.kvm().mem.clone();
        let disks = if params.copy_disks {
            source_disks(machine)?
        } else {
            Vec::new()
        };
        let touched = persist::memory::touched_pages(&mem, machine.kvm().backing);
        let hello = Hello {
            magic: MAGIC,
            version: PROTOCOL_VERSION,
            config_json: serde_json::to_string(machine.recorded_config())
                .map_err(|e| (ErrorKind::Internal, format!("the configuration: {e}")))?,
            memory_ranges: mem.iter().map(|r| (r.start_addr().0, r.len())).collect(),
            cpu_model: persist::host_cpu_model(),
            vmm_version: env!("CARGO_PKG_VERSION").to_string(),
            token: params.token.clone(),
            disks: disks
                .iter()
                .map(|d| DiskCopy {
                    id: d.id.clone(),
                    bytes: d.bytes(),
                })
                .collect(),
        };
        let worker = self
            .migration_worker
            .clone()
            .ok_or_else(|| (ErrorKind::Internal, "no migration thread".to_string()))?;
        let conn = self.take_connection(&params.connection)?;
        let shared = Arc::new(Shared::default());
        {
            let mut stats = lock(&shared.stats);
            stats.memory_total_bytes = mem.iter().map(|r| r.len()).sum();
            stats.disk_total_bytes = disks.iter().map(source::SourceDisk::bytes).sum();
        }
        let stats = shared.snapshot();
        let (thread_link, loop_link) = migration::link(doorbell);
        let job = source::SourceJob {
            conn: Some(std::os::unix::net::UnixStream::from(conn)),
            params,
            mem,
            hello,
            touched,
            disks,
            link: thread_link,
            shared: Arc::clone(&shared),
        };
        worker
            .send(job)
            .map_err(|_| (ErrorKind::Internal, "the migration thread is gone".to_string()))?;
        self.outgoing = Some(Outgoing {
            shared: Arc::clone(&shared),
            link: loop_link,
            was_running: None,
        });
        self.last_migration = Some(shared);
        Ok(Response::MigrationStarted(stats))
    }

    pub(super) fn migrate_receive(&mut self, params: MigrateReceive, client: ClientId, id: u64) -> Reply {
        match self.start_receive(params, client, id) {
            Ok(()) => Reply::Later,
            Err(f) => now(Err(f)),
        }
    }

    fn start_receive(&mut self, params: MigrateReceive, client: ClientId, id: u64) -> Result<(), Failure> {
        self.before_start("receive a migration")?;
        if self.incoming.is_some() || self.config().is_some() {
            return Err(wrong_state(
                self.state(),
                "a migration is received by a VMM started without a configuration",
            ));
        }
        let drive_fds = self.drive_fds(&params)?;
        let conn = self.take_connection(&params.connection)?;
        let (thread_link, loop_link) = migration::link(Arc::clone(&self.events.migration_event));
        destination::spawn_receiver(conn, params, drive_fds, thread_link, self.seccomp)
            .map_err(|e| (ErrorKind::Internal, e.to_string()))?;
        self.incoming = Some(Incoming {
            link: loop_link,
            client,
            id,
            asked: Instant::now(),
            memory_bytes: 0,
            kvm: None,
        });
        Ok(())
    }

    /// Copies of the descriptors the drive overrides name, for the receiving thread to write a
    /// copied disk into (a jailed VMM cannot open a path on the host); the VM uses the originals.
    fn drive_fds(&self, params: &MigrateReceive) -> Result<Vec<(String, std::fs::File)>, Failure> {
        params
            .overrides
            .drives
            .iter()
            .filter_map(|o| o.fd.as_ref())
            .map(|name| {
                let fd = self.fds.get(name).ok_or_else(|| {
                    (
                        ErrorKind::NotFound,
                        format!("overrides.drives: no descriptor named {name:?} (send it with add-fds)"),
                    )
                })?;
                let copy = fd
                    .try_clone()
                    .map_err(|e| (ErrorKind::Internal, format!("descriptor {name:?}: {e}")))?;
                Ok((name.clone(), std::fs::File::from(copy)))
            })
            .collect()
    }

    fn take_connection(&mut self, name: &str) -> Result<std::os::fd::OwnedFd, Failure> {
        self.fds.remove(name).ok_or_else(|| {
            (
                ErrorKind::NotFound,
                format!("connection: no descriptor named {name:?} (send it with add-fds)"),
            )
        })
    }

    pub(super) fn migration_status(&self) -> Result<Response, Failure> {
        match &self.last_migration {
            Some(shared) => Ok(Response::MigrationStatus(shared.snapshot())),
            None => Err((ErrorKind::NotFound, "no migration was started".into())),
        }
    }

    pub(super) fn migrate_cancel(&self) -> Result<Response, Failure> {
        match &self.outgoing {
            Some(o) => {
                o.shared.cancel.store(true, Ordering::Release);
                Ok(Response::MigrationCancelling)
            }
            None => Err(wrong_state(self.state(), "no migration is running")),
        }
    }

    /// Whether an outgoing migration has paused the VM for its switch-over.
    pub(super) fn switched_over(&self) -> bool {
        self.outgoing.as_ref().is_some_and(|o| o.was_running.is_some())
    }

    /// Whether a migration reads the dirty log now (snapshots must not take it from under it).
    pub(super) fn migrating(&self) -> bool {
        self.outgoing.is_some()
    }

    /// Does what the migration threads asked since the last call.
    pub fn migration_tick(&mut self) -> Vec<Notice> {
        let mut notices = Vec::new();
        loop {
            let msg = match &self.outgoing {
                Some(o) => o.link.from_thread.try_recv().ok(),
                None => None,
            };
            let Some(msg) = msg else { break };
            self.on_source_message(msg, &mut notices);
        }
        loop {
            let msg = match &self.incoming {
                Some(i) => i.link.from_thread.try_recv().ok(),
                None => None,
            };
            let Some(msg) = msg else { break };
            self.on_destination_message(msg, &mut notices);
        }
        notices
    }

    fn stats(&self) -> MigrationStats {
        self.last_migration
            .as_ref()
            .map(|s| s.snapshot())
            .unwrap_or_default()
    }

    fn reply_to_source(&self, answer: FromMain) {
        if let Some(o) = &self.outgoing {
            // The thread may have given up already; then nobody waits for this.
            let _ = o.link.to_thread.send(answer);
        }
    }

    fn on_source_message(&mut self, msg: ToMain, notices: &mut Vec<Notice>) {
        match msg {
            ToMain::Progress => notices.push(Notice::Event(Event::MigrationProgress(self.stats()))),
            ToMain::DirtyLog => {
                let dirty = self.dirty_log();
                self.reply_to_source(FromMain::Dirty(dirty));
            }
            ToMain::Throttle(percent) => self.set_throttle(percent),
            ToMain::SwitchOver => {
                let switched = self.switch_over();
                if let Ok(s) = &switched {
                    if let Some(o) = self.outgoing.as_mut() {
                        o.was_running = Some(s.was_running);
                    }
                }
                self.reply_to_source(FromMain::Switched(switched));
            }
            ToMain::SourceDone(outcome) => {
                self.set_throttle(0);
                self.source_done(outcome, notices);
            }
            _ => log::warn!("migration: unexpected message from the source thread"),
        }
    }

    /// Holds the vCPUs back by `percent` (0: not at all), with the timer that kicks them.
    fn set_throttle(&mut self, percent: u32) {
        self.events.throttle.set(percent);
        let mut timer = lock(&self.events.throttle_timer);
        let period = crate::vstate::vcpu_control::Throttle::PERIOD;
        let armed = if percent > 0 {
            timer.reset(period, Some(period))
        } else {
            timer.clear()
        };
        if let Err(e) = armed {
            log::warn!("migration: cannot set the vCPU throttle timer: {e}");
        }
    }

    /// A throttle tick: the running vCPUs sit out their share.
    pub fn throttle_tick(&mut self) {
        if let Ok(machine) = self.machine() {
            machine.kick_vcpus();
        }
    }

    fn source_done(&mut self, outcome: Result<(), String>, notices: &mut Vec<Notice>) {
        match outcome {
            Ok(()) => {
                notices.push(Notice::Event(Event::MigrationCompleted(self.stats())));
                crate::exit::ExitEvents::raise(&self.events.exits.migrated);
            }
            Err(why) => {
                log::warn!("migration failed: {why}");
                let was_running = self.outgoing.take().and_then(|o| o.was_running);
                if let Some(ran) = was_running {
                    if let Some(event) = self.undo_switch_over(ran) {
                        notices.push(Notice::Event(event));
                    }
                }
                notices.push(Notice::Event(Event::MigrationFailed(self.stats())));
            }
        }
    }

    fn dirty_log(&mut self) -> Result<Vec<Vec<u64>>, String> {
        let machine = self.machine().map_err(|(_, m)| m)?;
        let kvm = machine.kvm();
        let dirty = kvm.dirty.as_ref().ok_or("dirty pages are not tracked")?;
        crate::vstate::memory::take_dirty_pages(&kvm.vm, &kvm.mem, dirty).map_err(|e| e.to_string())
    }

    /// Pauses the VM, captures its state and the last dirty pages, and hands the disks over.
    fn switch_over(&mut self) -> Result<SwitchedOver, String> {
        // Paused now, for as long as the hand-over takes: nothing left to hold back.
        self.set_throttle(0);
        let machine = self.machine().map_err(|(_, m)| m)?;
        let was_running = machine.state() == VmState::Running;
        machine.pause().map_err(|e| format!("cannot pause the VM: {e}"))?;
        let captured = persist::capture(machine).and_then(|(state, dirty)| {
            let bytes = persist::format::encode(&state, "migration state")?;
            Ok((bytes, dirty.unwrap_or_default()))
        });
        let (state, dirty) = match captured {
            Ok(c) => c,
            Err(e) => {
                self.undo_switch_over(was_running);
                return Err(format!("cannot capture the VM's state: {e}"));
            }
        };
        // The destination opens the same images and must get their locks.
        for handle in machine.blocks() {
            let transport = lock(handle);
            let block = transport.device();
            if !block.read_only() {
                if let Err(e) = devices::virtio::block::disk::unlock(block.locked_file()) {
                    log::warn!("cannot unlock drive {}: {e}", block.id());
                }
            }
        }
        Ok(SwitchedOver {
            state,
            dirty,
            was_running,
        })
    }

    /// The migration failed after the switch-over: the VM takes its disks back and runs on.
    fn undo_switch_over(&mut self, was_running: bool) -> Option<Event> {
        let machine = self.machine().ok()?;
        for handle in machine.blocks() {
            let transport = lock(handle);
            let block = transport.device();
            if !block.read_only() {
                if let Err(e) = devices::virtio::block::disk::lock_exclusive(block.locked_file()) {
                    log::error!(
                        "drive {}: cannot take its lock back after a failed migration: {e}",
                        block.id()
                    );
                }
            }
        }
        if !was_running {
            return None;
        }
        match machine.resume() {
            Ok(_) => Some(Event::StateChanged {
                state: machine.state(),
            }),
            Err(e) => {
                log::error!("cannot resume the VM after a failed migration: {e}");
                None
            }
        }
    }

    fn on_destination_message(&mut self, msg: ToMain, notices: &mut Vec<Notice>) {
        match msg {
            ToMain::PrepareKvm(mem, log_dirty) => {
                let prepared = crate::builder::prepare_kvm(&mem, log_dirty).map_err(|e| e.to_string());
                if let Some(i) = self.incoming.as_mut() {
                    i.kvm = Some(prepared);
                }
            }
            ToMain::Build(received) => {
                let (client, id) = match self.incoming.as_mut() {
                    Some(i) => {
                        i.memory_bytes = received.memory_bytes;
                        (i.client, i.id)
                    }
                    None => return,
                };
                self.pending_start = Some(PendingStart {
                    client,
                    id,
                    how: Launch::Migrated(received),
                });
            }
            ToMain::Commit { resume } => {
                let Some(incoming) = self.incoming.take() else {
                    return;
                };
                let resumed = match self.machine() {
                    Ok(m) => {
                        m.announce_nics();
                        if resume {
                            m.resume().map(|_| m.state()).map_err(|e| e.to_string())
                        } else {
                            Ok(m.state())
                        }
                    }
                    Err((_, why)) => Err(why),
                };
                let answer = resumed.map(|state| Response::MigrationReceived {
                    state,
                    memory_bytes: incoming.memory_bytes,
                    duration_us: u64::try_from(incoming.asked.elapsed().as_micros()).unwrap_or(u64::MAX),
                });
                if let Ok(Response::MigrationReceived { state, .. }) = &answer {
                    notices.push(Notice::Event(Event::StateChanged { state: *state }));
                }
                let answer = answer.map_err(|e| (ErrorKind::Internal, format!("cannot resume the VM: {e}")));
                notices.push(Notice::Answer(incoming.client, incoming.id, answer));
            }
            ToMain::ReceiveFailed(why) => {
                let Some(incoming) = self.incoming.take() else {
                    return;
                };
                if self.live_machine().is_some() {
                    // Built but never run: this VMM has no VM to offer any more.
                    self.events.exits.vcpu_fault(format!(
                        "the incoming migration failed after the VM was built: {why}"
                    ));
                }
                notices.push(Notice::Answer(
                    incoming.client,
                    incoming.id,
                    Err((ErrorKind::Internal, format!("migration failed: {why}"))),
                ));
            }
            _ => log::warn!("migration: unexpected message from the receiving thread"),
        }
    }

    /// The KVM VM set up for the incoming migration, if it was.
    pub(super) fn take_prepared_kvm(
        &mut self,
    ) -> Option<Result<(kvm_ioctls::Kvm, kvm_ioctls::VmFd), String>> {
        self.incoming.as_mut().and_then(|i| i.kvm.take())
    }

    /// After the main loop tried to build a migrated VM: tells the receiving thread.
    pub(super) fn migration_built(&mut self, result: Result<(), String>) {
        if let Some(i) = &self.incoming {
            let _ = i.link.to_thread.send(FromMain::Built(result));
        }
    }
}
