//! The life of a `vmm` process: not configured, configured, then one VM that runs (or is paused)
//! until it ends; the requests of the control socket act on it, and the main loop drives it all.

use std::os::fd::OwnedFd;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vmm_api::control::{
    ErrorKind, Event, Request, Response, ShutdownRequest, VmDescription, VmMetrics, VmState,
    DEFAULT_SHUTDOWN_TIMEOUT_MS, MAX_PASSED_FDS, MAX_SHUTDOWN_TIMEOUT_MS,
};
use vmm_api::drive::is_valid_name;
use vmm_api::snapshot::SnapshotRestore;
use vmm_api::VmConfig;

use event_manager::SubscriberOps;

use crate::builder::{self, BuildError, ProcessEvents, VmmEventManager};
use crate::cli::RunOptions;
use crate::control::{ClientId, ControlError, ControlServer};
use crate::device_manager::PassedFds;
use crate::exit::{ExitWatcher, VmExit};
use crate::machine::{Machine, MachineError};
use crate::persist;
use crate::seccomp::{SeccompFilter, SeccompMode, ThreadCategory};
use crate::sync::lock;
use crate::vstate::vcpu_control::install_kick_handler;

/// A request's failure, as the control socket reports it.
pub type Failure = (ErrorKind, String);

/// What handling a request produced.
// One lives for the duration of a request; boxing the common case would only add an allocation.
#[allow(clippy::large_enum_variant)]
pub enum Reply {
    /// The answer, and an event for every client if the request changed something they should hear.
    Now(Result<Response, Failure>, Option<Event>),
    /// `start`: answered by the main loop once the VM is built.
    Later,
}

// One per process, never moved around: boxing the machine would buy nothing.
#[allow(clippy::large_enum_variant)]
enum Lifecycle {
    NotConfigured,
    Configured(VmConfig),
    Live(Machine),
}

/// A `start` or `snapshot-restore` waiting for the main loop.
pub struct PendingStart {
    /// Who asked.
    pub client: ClientId,
    /// The request's id.
    pub id: u64,
    /// What to build.
    pub how: Launch,
}

/// How a VM comes to life.
pub enum Launch {
    /// Booted from its configuration.
    Boot,
    /// Rebuilt from a snapshot (asked for at that instant).
    Restore(Box<SnapshotRestore>, Instant),
    /// Rebuilt from what a live migration brought (answered once the source commits).
    Migrated(Box<crate::migration::destination::Received>),
}

/// The process's VM and everything the control socket may touch.
pub struct Runtime {
    events: Arc<ProcessEvents>,
    seccomp: SeccompMode,
    lifecycle: Lifecycle,
    fds: PassedFds,
    pending_start: Option<PendingStart>,
    /// Carries out outgoing migrations; started with the VM, before the main loop's filter.
    migration_worker: Option<std::sync::mpsc::Sender<crate::migration::source::SourceJob>>,
    outgoing: Option<migration_glue::Outgoing>,
    incoming: Option<migration_glue::Incoming>,
    /// The progress of the last outgoing migration, for `migration-status`.
    last_migration: Option<Arc<crate::migration::Shared>>,
    /// A jailed VMM's configuration with host paths (see [`Machine::recorded_config`]).
    host_config: Option<VmConfig>,
}

#[path = "runtime_migration.rs"]
mod migration_glue;
pub use migration_glue::Notice;

impl Runtime {
    /// A process with no VM yet, whose threads will run under `seccomp` filters once it has one.
    /// `inherited` (`--fd`, already checked against the names and the limit `add-fds` applies)
    /// starts the table of passed descriptors.
    pub fn new(events: Arc<ProcessEvents>, seccomp: SeccompMode, inherited: PassedFds) -> Self {
        Runtime {
            events,
            seccomp,
            lifecycle: Lifecycle::NotConfigured,
            fds: inherited,
            pending_start: None,
            migration_worker: None,
            outgoing: None,
            incoming: None,
            last_migration: None,
            host_config: None,
        }
    }

    fn state(&self) -> VmState {
        match &self.lifecycle {
            Lifecycle::NotConfigured => VmState::NotConfigured,
            Lifecycle::Configured(_) => VmState::Configured,
            Lifecycle::Live(m) => m.state(),
        }
    }

    fn config(&self) -> Option<&VmConfig> {
        match &self.lifecycle {
            Lifecycle::NotConfigured => None,
            Lifecycle::Configured(c) => Some(c),
            Lifecycle::Live(m) => Some(m.config()),
        }
    }

    fn machine(&mut self) -> Result<&mut Machine, Failure> {
        let state = self.state();
        match &mut self.lifecycle {
            Lifecycle::Live(m) => Ok(m),
            _ => Err(wrong_state(state, "the VM has not been started")),
        }
    }

    /// The VM, once built.
    pub fn live_machine(&self) -> Option<&Machine> {
        match &self.lifecycle {
            Lifecycle::Live(m) => Some(m),
            _ => None,
        }
    }

    /// Serves one request; `fds` are the descriptors that came with its line.
    pub fn handle(&mut self, request: Request, fds: Vec<OwnedFd>, client: ClientId, id: u64) -> Reply {
        if !fds.is_empty() && !matches!(request, Request::AddFds { .. }) {
            let n = fds.len();
            return now(Err((
                ErrorKind::BadRequest,
                format!("{n} file descriptor(s) came with a request that takes none; closed"),
            )));
        }
        match request {
            Request::Ping => now(Ok(Response::Pong)),
            Request::Describe => now(Ok(Response::Description(self.describe()))),
            Request::Metrics => now(Ok(Response::Metrics(self.metrics()))),
            Request::Pause => self.change_state(Machine::pause),
            // Past the switch-over the destination may be about to run this VM: only a failed
            // migration gives it back here.
            Request::Resume | Request::Shutdown(_) if self.switched_over() => now(Err(wrong_state(
                self.state(),
                "a migration is handing this VM over; it runs here again only if the migration fails",
            ))),
            Request::Resume => self.change_state(Machine::resume),
            Request::Shutdown(params) => now(self.shutdown(params)),
            Request::Stop => {
                crate::exit::ExitEvents::raise(&self.events.exits.stop);
                now(Ok(Response::Stopping))
            }
            Request::UpdateRateLimiter { drive, rate_limiter } => now(self
                .machine()
                .and_then(|m| m.update_rate_limiter(&drive, &rate_limiter).map_err(failure))
                .map(|()| Response::RateLimiterUpdated)),
            Request::UpdateNetRateLimiters {
                net,
                rx_rate_limiter,
                tx_rate_limiter,
            } => now(self
                .machine()
                .and_then(|m| {
                    m.update_net_rate_limiters(&net, rx_rate_limiter.as_ref(), tx_rate_limiter.as_ref())
                        .map_err(failure)
                })
                .map(|()| Response::RateLimiterUpdated)),
            Request::UpdateBalloon(update) => now(self
                .machine()
                .and_then(|m| m.update_balloon(&update).map_err(failure))
                .map(|()| Response::BalloonUpdated)),
            Request::BalloonStats => now(self.machine().and_then(|m| {
                m.balloon_info()
                    .map(|info| Response::BalloonStats(Box::new(info)))
                    .ok_or_else(|| failure(MachineError::NoBalloon))
            })),
            Request::Configure(config) => now(self.configure(config)),
            Request::Start => match self.admit_start() {
                Ok(()) => {
                    self.pending_start = Some(PendingStart {
                        client,
                        id,
                        how: Launch::Boot,
                    });
                    Reply::Later
                }
                Err(f) => now(Err(f)),
            },
            Request::AddFds { names } => now(self.add_fds(names, fds)),
            Request::SnapshotCreate(_) if self.migrating() => now(Err(wrong_state(
                self.state(),
                "a migration is running (it reads the dirty pages a snapshot would take)",
            ))),
            Request::SnapshotCreate(params) => now(self
                .machine()
                .and_then(|m| {
                    persist::create(m, &params.dir, params.kind).map_err(|e| (e.kind(), error_chain(&e)))
                })
                .map(Response::SnapshotCreated)),
            Request::SnapshotMerge(params) => now(persist::restore::merge(&params.from, &params.to)
                .map(Response::SnapshotMerged)
                .map_err(|e| (e.kind(), error_chain(&e)))),
            Request::MigrateSend(params) => self.migrate_send(params),
            Request::MigrateReceive(params) => self.migrate_receive(params, client, id),
            Request::MigrationStatus => now(self.migration_status()),
            Request::MigrateCancel => now(self.migrate_cancel()),
            Request::SnapshotRestore(params) => {
                let asked = Instant::now();
                match self.admit_restore() {
                    Ok(()) => {
                        self.pending_start = Some(PendingStart {
                            client,
                            id,
                            how: Launch::Restore(Box::new(params), asked),
                        });
                        Reply::Later
                    }
                    Err(f) => now(Err(f)),
                }
            }
        }
    }

    fn describe(&self) -> VmDescription {
        let config = self.config().cloned();
        VmDescription {
            state: self.state(),
            uptime_ms: millis(self.events.process_start.elapsed()),
            vcpus: config.as_ref().map_or(0, |c| c.machine.vcpus),
            memory_mib: config.as_ref().map_or(0, |c| c.machine.memory_mib),
            config,
            vmm_version: env!("CARGO_PKG_VERSION").to_string(),
        }
    }

    fn metrics(&self) -> VmMetrics {
        VmMetrics {
            guest_boot_ms: self.events.guest_boot.get().map(|d| millis(*d)),
            vmm_rss_kib: crate::metrics::rss_kib().unwrap_or(0),
            vcpu_exits: self
                .events
                .exit_counters
                .snapshot()
                .into_iter()
                .map(|(reason, count)| (reason.to_string(), count))
                .collect(),
            drives: self
                .live_machine()
                .map(Machine::drive_metrics)
                .unwrap_or_default(),
            nets: self.live_machine().map(Machine::net_metrics).unwrap_or_default(),
            balloon: self.live_machine().and_then(Machine::balloon_info).map(Box::new),
        }
    }

    fn change_state(&mut self, op: fn(&mut Machine) -> Result<bool, MachineError>) -> Reply {
        let machine = match self.machine() {
            Ok(m) => m,
            Err(f) => return now(Err(f)),
        };
        match op(machine) {
            Ok(changed) => {
                let state = machine.state();
                let event = changed.then_some(Event::StateChanged { state });
                Reply::Now(Ok(Response::StateChange { state, changed }), event)
            }
            Err(e) => now(Err(failure(e))),
        }
    }

    fn shutdown(&mut self, params: ShutdownRequest) -> Result<Response, Failure> {
        let timeout_ms = params.timeout_ms.unwrap_or(DEFAULT_SHUTDOWN_TIMEOUT_MS);
        if timeout_ms > MAX_SHUTDOWN_TIMEOUT_MS {
            return Err((
                ErrorKind::InvalidArgument,
                format!("timeout_ms: at most {MAX_SHUTDOWN_TIMEOUT_MS}, got {timeout_ms}"),
            ));
        }
        let started = self
            .machine()?
            .shutdown(Duration::from_millis(timeout_ms))
            .map_err(failure)?;
        Ok(Response::ShuttingDown {
            timeout_ms,
            keyboard: started.keyboard,
        })
    }

    fn configure(&mut self, config: VmConfig) -> Result<Response, Failure> {
        self.before_start("configure")?;
        config
            .validate()
            .map_err(|e| (ErrorKind::InvalidArgument, e.to_string()))?;
        self.lifecycle = Lifecycle::Configured(config);
        self.host_config = None;
        Ok(Response::Configured)
    }

    fn before_start(&self, what: &str) -> Result<(), Failure> {
        if self.pending_start.is_some() {
            return Err(wrong_state(
                self.state(),
                &format!("cannot {what}: the VM is starting"),
            ));
        }
        match self.lifecycle {
            Lifecycle::Live(_) => Err(wrong_state(
                self.state(),
                &format!("cannot {what}: the VM has been started"),
            )),
            _ => Ok(()),
        }
    }

    fn admit_start(&self) -> Result<(), Failure> {
        self.before_start("start")?;
        match &self.lifecycle {
            Lifecycle::NotConfigured => Err(wrong_state(self.state(), "configure the VM first")),
            _ => Ok(()),
        }
    }

    fn admit_restore(&self) -> Result<(), Failure> {
        self.before_start("restore a snapshot")?;
        match &self.lifecycle {
            Lifecycle::NotConfigured => Ok(()),
            _ => Err(wrong_state(
                self.state(),
                "a snapshot restores into a VMM started without a configuration",
            )),
        }
    }

    fn add_fds(&mut self, names: Vec<String>, fds: Vec<OwnedFd>) -> Result<Response, Failure> {
        if names.len() != fds.len() {
            return Err((
                ErrorKind::InvalidArgument,
                format!(
                    "{} name(s) for {} file descriptor(s) received with the line; all closed",
                    names.len(),
                    fds.len()
                ),
            ));
        }
        if let Some(bad) = names.iter().find(|n| !is_valid_name(n)) {
            return Err((
                ErrorKind::InvalidArgument,
                format!("names: {bad:?} is not 1-64 characters of A-Z a-z 0-9 _ -"),
            ));
        }
        let new = names.iter().filter(|n| !self.fds.contains_key(*n)).count();
        if self.fds.len() + new > MAX_PASSED_FDS {
            return Err((
                ErrorKind::InvalidArgument,
                format!("at most {MAX_PASSED_FDS} passed file descriptors in all"),
            ));
        }
        for (name, fd) in names.iter().zip(fds) {
            self.fds.insert(name.clone(), fd);
        }
        Ok(Response::FdsAdded { names })
    }

    /// The `start` the main loop has to carry out, if one was asked for.
    pub fn take_pending_start(&mut self) -> Option<PendingStart> {
        self.pending_start.take()
    }

    /// Builds the configured VM, resumes its vCPUs, and from then on confines the main thread to
    /// its seccomp allow-list (each vCPU thread installs its own). On failure the VMM stays
    /// configured, unconfined, and can be configured and started again. `None`: the answer
    /// comes later (a migrated VM runs once the source commits).
    pub fn launch(
        &mut self,
        event_manager: &mut VmmEventManager,
        how: Launch,
    ) -> Result<Option<Response>, BuildError> {
        // Built before any thread exists that it must not apply to, applied once the VM runs: filters
        // are inherited by threads created later, and vCPU threads have their own.
        let main_filter = SeccompFilter::build(ThreadCategory::MainLoop, self.seccomp)?;
        let (machine, response) = match how {
            Launch::Boot => {
                let Lifecycle::Configured(config) = &self.lifecycle else {
                    return Err(BuildError::NotConfigured);
                };
                let mut machine =
                    builder::build_vm(config, &self.events, event_manager, &mut self.fds, self.seccomp)?;
                machine.set_host_config(self.host_config.clone());
                machine.resume().map_err(BuildError::Start)?;
                (machine, Some(Response::Started))
            }
            Launch::Restore(params, asked) => {
                let prepared = persist::restore::prepare(&params)?;
                let mut machine = builder::restore_vm(
                    prepared,
                    &params,
                    &self.events,
                    event_manager,
                    &mut self.fds,
                    self.seccomp,
                )?;
                if params.prefault {
                    persist::memory::prefetch(&machine.kvm().mem);
                }
                if params.resume {
                    machine.resume().map_err(BuildError::Start)?;
                }
                let response = Response::Restored {
                    state: machine.state(),
                    duration_us: u64::try_from(asked.elapsed().as_micros()).unwrap_or(u64::MAX),
                };
                (machine, Some(response))
            }
            Launch::Migrated(received) => {
                let prepared = self.take_prepared_kvm();
                match builder::migrated_vm(
                    &received,
                    prepared,
                    &self.events,
                    event_manager,
                    &mut self.fds,
                    self.seccomp,
                ) {
                    Ok(machine) => (machine, None),
                    Err(e) => {
                        // The receiving thread aborts the migration and its failure answers.
                        self.migration_built(Err(error_chain(&e)));
                        return Ok(None);
                    }
                }
            }
        };
        let migrated = response.is_none();
        // Started before the filter: the main loop may not create threads afterwards.
        match crate::migration::source::spawn_worker(self.seccomp) {
            Ok(worker) => self.migration_worker = Some(worker),
            Err(e) => log::warn!("live migration will not be available: {e}"),
        }
        main_filter.apply()?;
        // Descriptors no device took are of no further use.
        self.fds.clear();
        self.lifecycle = Lifecycle::Live(machine);
        if migrated {
            self.migration_built(Ok(()));
        }
        Ok(response)
    }

    fn set_config(&mut self, config: VmConfig, host_config: Option<VmConfig>) {
        self.lifecycle = Lifecycle::Configured(config);
        self.host_config = host_config;
    }
}

fn now(result: Result<Response, Failure>) -> Reply {
    Reply::Now(result, None)
}

fn wrong_state(state: VmState, why: &str) -> Failure {
    (ErrorKind::WrongState, format!("{why} (state: {})", state.name()))
}

fn failure(e: MachineError) -> Failure {
    let kind = match &e {
        MachineError::NoSuchDrive(_) | MachineError::NoSuchNet(_) | MachineError::NoBalloon => {
            ErrorKind::NotFound
        }
        MachineError::RateLimiter { .. } | MachineError::BalloonUpdate(_) => ErrorKind::InvalidArgument,
        MachineError::Vcpus(crate::vstate::vcpu_control::VcpuControlError::Exited(_)) => {
            ErrorKind::WrongState
        }
        MachineError::Vcpus(_) | MachineError::Timer(_) => ErrorKind::Internal,
    };
    (kind, error_chain(&e))
}

/// `e` and its sources, joined with ": ". A source whose message the text already ends with
/// (an error that prints its cause as well as returning it) is not repeated.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let message = s.to_string();
        if !text.ends_with(&message) {
            text.push_str(": ");
            text.push_str(&message);
        }
        source = s.source();
    }
    text
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Why the process could not run at all.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// Building or starting the VM of `--config` failed.
    #[error(transparent)]
    Build(#[from] BuildError),
    /// The control socket could not be set up.
    #[error(transparent)]
    Control(#[from] ControlError),
    /// Process-level setup (eventfds, the kick signal, the event loop) failed.
    #[error("{0}")]
    Setup(String),
}

/// Runs the process: boots `config` at once if given, serves the control socket if asked, and
/// returns how the VM ended. `fds` are the descriptors inherited with `--fd`, which `config` and
/// later requests name as if they had come with `add-fds`.
pub fn run(
    config: Option<VmConfig>,
    options: &RunOptions,
    fds: PassedFds,
    process_start: Instant,
) -> Result<VmExit, RunError> {
    install_kick_handler()
        .map_err(|e| RunError::Setup(format!("cannot install the vCPU kick handler: {e}")))?;
    let events =
        Arc::new(ProcessEvents::new(process_start).map_err(|e| RunError::Setup(format!("eventfd: {e}")))?);
    let mut event_manager =
        VmmEventManager::new().map_err(|e| RunError::Setup(format!("event loop: {e:?}")))?;
    let watcher = Arc::new(Mutex::new(ExitWatcher::new(Arc::clone(&events.exits))));
    event_manager.add_subscriber(watcher.clone());
    let runtime = Arc::new(Mutex::new(Runtime::new(
        Arc::clone(&events),
        options.seccomp,
        fds,
    )));
    let server = match &options.api_sock {
        Some(path) => {
            let server = Arc::new(Mutex::new(ControlServer::bind(
                path,
                Arc::clone(&runtime),
                Arc::clone(&events),
            )?));
            event_manager.add_subscriber(server.clone());
            Some(server)
        }
        None => None,
    };
    if let Some(config) = config {
        let mut rt = lock(&runtime);
        rt.set_config(config, options.host_config.as_deref().cloned());
        if let Err(e) = rt.launch(&mut event_manager, Launch::Boot) {
            drop(rt);
            if let Some(server) = &server {
                lock(server).remove_socket();
            }
            return Err(e.into());
        }
        drop(rt);
        if let Some(server) = &server {
            lock(server).broadcast_now(Event::StateChanged {
                state: VmState::Running,
            });
        }
    }

    loop {
        event_manager
            .run()
            .map_err(|e| RunError::Setup(format!("event loop: {e:?}")))?;
        let pending = lock(&runtime).take_pending_start();
        if let (Some(start), Some(server)) = (pending, &server) {
            let result = lock(&runtime).launch(&mut event_manager, start.how);
            let mut server = lock(server);
            match result {
                Ok(None) => {}
                Ok(Some(response)) => {
                    let state = match &response {
                        Response::Restored { state, .. } => *state,
                        _ => VmState::Running,
                    };
                    server.answer(start.client, start.id, Ok(response));
                    server.broadcast_now(Event::StateChanged { state });
                }
                Err(e) => server.answer(start.client, start.id, Err((e.kind(), error_chain(&e)))),
            }
        }
        let outcome = lock(&watcher).outcome().cloned();
        if let Some(exit) = outcome {
            if let Some(machine) = lock(&runtime).live_machine() {
                machine.log_device_counters();
                machine.log_net_counters();
            }
            if let Some(server) = &server {
                let mut server = lock(server);
                match &exit {
                    VmExit::GuestPanic => server.broadcast_now(Event::GuestPanic),
                    VmExit::VcpuFault(message) => server.broadcast_now(Event::VcpuError {
                        message: message.clone(),
                    }),
                    _ => {}
                }
                server.broadcast_now(Event::Exit {
                    reason: exit.to_string(),
                    code: exit.exit_code(),
                });
                server.remove_socket();
            }
            return Ok(exit);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("tap t0 is busy")]
    struct Busy;

    #[derive(Debug, thiserror::Error)]
    enum Outer {
        #[error("NIC {id}: {source}")]
        Printed { id: String, source: Busy },
        #[error("NIC {id}")]
        Silent { id: String, source: Busy },
    }

    #[test]
    fn error_chain_names_each_cause_once() {
        let printed = Outer::Printed {
            id: "eth0".into(),
            source: Busy,
        };
        assert_eq!(error_chain(&printed), "NIC eth0: tap t0 is busy");
        let silent = Outer::Silent {
            id: "eth0".into(),
            source: Busy,
        };
        assert_eq!(error_chain(&silent), "NIC eth0: tap t0 is busy");
    }
}
