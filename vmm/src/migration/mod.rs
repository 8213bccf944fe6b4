//! Live migration: pre-copy of guest memory to another VMM over a connection the caller set up,
//! then, with the guest paused, the last dirty pages and the vCPU, VM and device state; the
//! destination builds the VM and the source commits and ends. Protocol in [`wire`]; the source's
//! thread in [`source`], the destination's in [`destination`].
//!
//! Threads: the main loop owns the VM, so a migration thread asks it, through a channel and the
//! `migration_event` doorbell, for what only it may do (read the dirty log, pause and capture the
//! state, resume after a failure, end the process after the commit). The source's thread is
//! started with the VM, before the main loop confines itself (its filter has no `clone`), and
//! waits for a job; both threads run under the [`ThreadCategory::Migration`] filter.

pub mod conn;
pub mod destination;
pub mod source;
pub mod wire;

use std::sync::atomic::AtomicBool;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};

use vmm_api::migration::MigrationStats;
use vmm_sys_util::eventfd::EventFd;

use crate::seccomp::{SeccompError, SeccompFilter, SeccompMode, ThreadCategory};

/// Why a migration failed.
#[derive(Debug, thiserror::Error)]
pub enum MigrationError {
    /// The stream failed or the peer misbehaved.
    #[error(transparent)]
    Wire(#[from] wire::WireError),
    /// The connection could not be set up (TLS).
    #[error(transparent)]
    Conn(#[from] conn::ConnError),
    /// The destination cannot run this VM.
    #[error("incompatible: {0}")]
    Incompatible(String),
    /// The source did not prove it may send this VM (its token).
    #[error("refused: {0}")]
    Refused(String),
    /// The main loop could not do its part.
    #[error("{0}")]
    Vm(String),
    /// Cancelled on request.
    #[error("cancelled")]
    Cancelled,
    /// Pre-copy did not converge in time (policy: cancel).
    #[error("did not converge within {0} ms")]
    Timeout(u64),
    /// The migration thread could not be set up.
    #[error("migration thread: {0}")]
    Thread(String),
}

/// What the source and the main loop share: the progress for `migration-status`, and the
/// cancel request.
#[derive(Debug, Default)]
pub struct Shared {
    /// Updated by the migration thread.
    pub stats: Mutex<MigrationStats>,
    /// Set by `migrate-cancel`; the thread looks at it between steps.
    pub cancel: AtomicBool,
}

impl Shared {
    /// The progress as it is now.
    pub fn snapshot(&self) -> MigrationStats {
        crate::sync::lock(&self.stats).clone()
    }
}

/// What a migration thread asks of the main loop.
pub enum ToMain {
    /// Source: a round is done (broadcast the progress).
    Progress,
    /// Source: the pages written since the last ask (the dirty log, ORed with device writes).
    DirtyLog,
    /// Source: hold the vCPUs back this much (percent; 0 lets them run freely).
    Throttle(u32),
    /// Source: pause the VM, give up the disk locks, capture its state and the last dirty pages.
    SwitchOver,
    /// Source: the migration ended; `Ok` after the commit.
    SourceDone(Result<(), String>),
    /// Destination: guest memory exists; set up KVM's VM and memory slots now, while pages arrive,
    /// so that the switch-over does not wait for them.
    PrepareKvm(vm_memory::GuestMemoryMmap, bool),
    /// Destination: memory and state are in; build the VM, paused.
    Build(Box<destination::Received>),
    /// Destination: the source committed; run the VM (if it ran there).
    Commit {
        /// Whether to resume it.
        resume: bool,
    },
    /// Destination: the migration failed.
    ReceiveFailed(String),
}

/// The main loop's answers to a source thread.
#[derive(Debug)]
pub enum FromMain {
    /// Per region, the pages written (bit `n` of word `n / 64` is page `n`).
    Dirty(Result<Vec<Vec<u64>>, String>),
    /// The VM is paused and captured.
    Switched(Result<SwitchedOver, String>),
    /// Destination: whether the VM was built.
    Built(Result<(), String>),
}

/// What the source sends last, taken with the VM paused.
#[derive(Debug)]
pub struct SwitchedOver {
    /// The framed, checksummed vCPU, VM and device state.
    pub state: Vec<u8>,
    /// The pages written since the last dirty-log read.
    pub dirty: Vec<Vec<u64>>,
    /// Whether the VM ran before the pause (the destination resumes it only then).
    pub was_running: bool,
}

/// One end of the link between a migration thread and the main loop.
pub struct MainLink {
    to_main: mpsc::Sender<ToMain>,
    from_main: mpsc::Receiver<FromMain>,
    doorbell: Arc<EventFd>,
}

impl MainLink {
    /// Asks the main loop `msg` and rings its doorbell.
    pub fn tell(&self, msg: ToMain) -> Result<(), MigrationError> {
        self.to_main
            .send(msg)
            .map_err(|_| MigrationError::Vm("the main loop is gone".into()))?;
        self.doorbell
            .write(1)
            .map_err(|e| MigrationError::Vm(format!("cannot wake the main loop: {e}")))
    }

    /// Asks and waits for the answer.
    pub fn ask(&self, msg: ToMain) -> Result<FromMain, MigrationError> {
        self.tell(msg)?;
        self.from_main
            .recv()
            .map_err(|_| MigrationError::Vm("the main loop is gone".into()))
    }
}

/// The main loop's end of the link.
pub struct LoopLink {
    /// What the thread asks.
    pub from_thread: mpsc::Receiver<ToMain>,
    /// Where the answers go.
    pub to_thread: mpsc::Sender<FromMain>,
}

/// A linked pair: the thread's end and the main loop's.
pub fn link(doorbell: Arc<EventFd>) -> (MainLink, LoopLink) {
    let (to_main, from_thread) = mpsc::channel();
    let (to_thread, from_main) = mpsc::channel();
    (
        MainLink {
            to_main,
            from_main,
            doorbell,
        },
        LoopLink {
            from_thread,
            to_thread,
        },
    )
}

/// Spawns a thread named `name` that installs the migration filter and runs `body`.
pub fn spawn_confined(
    name: &str,
    seccomp: SeccompMode,
    body: impl FnOnce() + Send + 'static,
) -> Result<(), MigrationError> {
    let filter = SeccompFilter::build(ThreadCategory::Migration, seccomp)
        .map_err(|e: SeccompError| MigrationError::Thread(e.to_string()))?;
    std::thread::Builder::new()
        .name(name.into())
        .stack_size(256 << 10)
        .spawn(move || {
            if let Err(e) = filter.apply() {
                log::error!("migration thread: {e}");
                return;
            }
            body();
        })
        .map(|_| ())
        .map_err(|e| MigrationError::Thread(e.to_string()))
}
