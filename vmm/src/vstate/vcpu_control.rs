//! Driving vCPU threads from the main thread: the Paused / Running / Exited state machine.
//!
//! Each vCPU thread owns a command channel; the main thread sends a command, kicks the thread out
//! of `KVM_RUN` with [`KICK_SIGNAL`] if it is running, and waits (bounded) for an acknowledgement
//! on a channel shared by all vCPUs. The kick cannot be lost: its handler sets the thread's
//! `kvm_run.immediate_exit`, so a signal that lands between two `KVM_RUN`s makes the next one
//! return at once. Nothing busy-waits: paused vCPU threads block on their channel.

use std::cell::Cell;
use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_bindings::kvm_run;

use crate::sync::lock;
use crate::vstate::vcpu_state::VcpuState;
use vmm_sys_util::signal::{register_signal_handler, Killable};

/// How long the main thread waits for every vCPU to acknowledge a command.
pub const ACK_TIMEOUT: Duration = Duration::from_secs(2);

/// What a vCPU thread is told to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VcpuCommand {
    /// Leave KVM_RUN and wait.
    Pause,
    /// Run the guest.
    Resume,
    /// Save the vCPU's state (only sent to paused vCPUs, which stay paused).
    Save,
}

/// Where a vCPU thread leaves its saved state for the main thread.
pub type SavedState = std::sync::Arc<std::sync::Mutex<Option<Result<VcpuState, String>>>>;

/// Where a vCPU thread is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VcpuRunState {
    /// Waiting for a command, not in KVM_RUN.
    Paused,
    /// In (or about to enter) KVM_RUN.
    Running,
    /// The thread has ended (the VM ended, or the vCPU failed).
    Exited,
}

/// A numbered command, so that a late acknowledgement of an earlier one is not mistaken for this.
#[derive(Debug, Clone, Copy)]
pub struct Order {
    seq: u64,
    /// What to do.
    pub command: VcpuCommand,
}

/// A vCPU's answer to an [`Order`], or its notice that it has exited.
#[derive(Debug, Clone, Copy)]
pub struct Ack {
    vcpu: u8,
    /// The order answered; [`EXITED_SEQ`] for the exit notice.
    seq: u64,
    state: VcpuRunState,
}

/// Sequence number of the notice a vCPU thread sends when it ends, whatever it was asked.
const EXITED_SEQ: u64 = 0;

/// Why vCPUs did not do what they were told.
#[derive(Debug, thiserror::Error)]
pub enum VcpuControlError {
    /// Some vCPUs did not acknowledge in time.
    #[error("vCPU(s) {0:?} did not acknowledge within {ACK_TIMEOUT:?}")]
    Timeout(Vec<u8>),
    /// A vCPU thread has ended: the VM is ending.
    #[error("vCPU {0} has exited")]
    Exited(u8),
    /// The kick signal could not be sent.
    #[error("cannot signal vCPU {0}: {1}")]
    Kick(u8, vmm_sys_util::errno::Error),
    /// A vCPU could not save its state.
    #[error("vCPU {0}: {1}")]
    Save(u8, String),
}

/// The vCPU thread's end of its channels.
pub struct VcpuChannel {
    index: u8,
    orders: Receiver<Order>,
    acks: Sender<Ack>,
    saved: SavedState,
}

impl VcpuChannel {
    /// Hands the main thread the result of a [`VcpuCommand::Save`] (before acknowledging it).
    pub fn store_saved(&self, result: Result<VcpuState, String>) {
        *lock(&self.saved) = Some(result);
    }

    /// Blocks until the next order; `None` once the main thread is gone.
    pub fn wait(&self) -> Option<Order> {
        self.orders.recv().ok()
    }

    /// An order that is already waiting, if any.
    pub fn poll(&self) -> Option<Order> {
        self.orders.try_recv().ok()
    }

    /// Acknowledges `order`, now in `state`.
    pub fn ack(&self, order: Order, state: VcpuRunState) {
        self.send(order.seq, state);
    }

    /// Tells the main thread this vCPU thread is ending.
    pub fn exited(&self) {
        self.send(EXITED_SEQ, VcpuRunState::Exited);
    }

    fn send(&self, seq: u64, state: VcpuRunState) {
        // The main thread holds the receiver for the life of the VM; if it is gone, so is the VM.
        let _ = self.acks.send(Ack {
            vcpu: self.index,
            seq,
            state,
        });
    }
}

struct VcpuThread {
    index: u8,
    orders: Sender<Order>,
    thread: Option<JoinHandle<()>>,
    state: VcpuRunState,
    saved: SavedState,
}

/// The main thread's handle on all vCPU threads of a VM.
pub struct VcpuSet {
    vcpus: Vec<VcpuThread>,
    acks_tx: Sender<Ack>,
    acks: Receiver<Ack>,
    next_seq: u64,
}

impl Default for VcpuSet {
    fn default() -> Self {
        Self::new()
    }
}

impl VcpuSet {
    /// No vCPUs yet.
    pub fn new() -> Self {
        let (acks_tx, acks) = mpsc::channel();
        VcpuSet {
            vcpus: Vec::new(),
            acks_tx,
            acks,
            next_seq: EXITED_SEQ + 1,
        }
    }

    /// Channels for vCPU `index`, whose thread starts paused; [`VcpuSet::started`] records it.
    pub fn channel(&mut self, index: u8) -> VcpuChannel {
        let (orders_tx, orders) = mpsc::channel();
        let saved = SavedState::default();
        self.vcpus.push(VcpuThread {
            index,
            orders: orders_tx,
            thread: None,
            state: VcpuRunState::Paused,
            saved: saved.clone(),
        });
        VcpuChannel {
            index,
            orders,
            acks: self.acks_tx.clone(),
            saved,
        }
    }

    /// The state of every vCPU, in index order, saved by their threads. The vCPUs must be
    /// paused; they stay paused.
    pub fn save_states(&mut self) -> Result<Vec<VcpuState>, VcpuControlError> {
        for v in &self.vcpus {
            lock(&v.saved).take();
        }
        self.command(VcpuCommand::Save)?;
        self.vcpus
            .iter()
            .map(|v| match lock(&v.saved).take() {
                Some(Ok(state)) => Ok(state),
                Some(Err(e)) => Err(VcpuControlError::Save(v.index, e)),
                None => Err(VcpuControlError::Save(v.index, "no state was saved".into())),
            })
            .collect()
    }

    /// Records the thread that serves vCPU `index`, for kicks.
    pub fn started(&mut self, index: u8, thread: JoinHandle<()>) {
        if let Some(v) = self.vcpus.iter_mut().find(|v| v.index == index) {
            v.thread = Some(thread);
        }
    }

    /// Number of vCPUs.
    pub fn len(&self) -> usize {
        self.vcpus.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.vcpus.is_empty()
    }

    /// Tells every vCPU to pause or resume and waits until all have (bounded by [`ACK_TIMEOUT`]).
    pub fn command(&mut self, command: VcpuCommand) -> Result<(), VcpuControlError> {
        self.absorb_exit_notices();
        let seq = self.next_seq;
        self.next_seq += 1;
        let mut waiting = BTreeSet::new();
        for v in &self.vcpus {
            if v.state == VcpuRunState::Exited {
                return Err(VcpuControlError::Exited(v.index));
            }
            if v.orders.send(Order { seq, command }).is_err() {
                return Err(VcpuControlError::Exited(v.index));
            }
            // A paused thread is blocked on its channel, not in KVM_RUN: no kick needed.
            if command == VcpuCommand::Pause {
                if let Some(thread) = &v.thread {
                    thread
                        .kill(kick_signal())
                        .map_err(|e| VcpuControlError::Kick(v.index, e))?;
                }
            }
            waiting.insert(v.index);
        }
        let deadline = Instant::now() + ACK_TIMEOUT;
        while !waiting.is_empty() {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.acks.recv_timeout(left) {
                Ok(ack) => {
                    self.record(ack);
                    if ack.state == VcpuRunState::Exited {
                        return Err(VcpuControlError::Exited(ack.vcpu));
                    }
                    if ack.seq == seq {
                        waiting.remove(&ack.vcpu);
                    }
                }
                // Cannot happen (the set holds a sender itself); treated like silence.
                Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => {
                    return Err(VcpuControlError::Timeout(waiting.into_iter().collect()))
                }
            }
        }
        Ok(())
    }

    /// Kicks the running vCPUs out of KVM_RUN (for the throttle); they ask nothing of the set.
    pub fn kick_running(&mut self) {
        self.absorb_exit_notices();
        for v in &self.vcpus {
            if let (VcpuRunState::Running, Some(thread)) = (v.state, &v.thread) {
                if let Err(e) = thread.kill(kick_signal()) {
                    log::warn!("cannot kick vCPU {}: {e}", v.index);
                }
            }
        }
    }

    fn absorb_exit_notices(&mut self) {
        while let Ok(ack) = self.acks.try_recv() {
            self.record(ack);
        }
    }

    fn record(&mut self, ack: Ack) {
        if let Some(v) = self.vcpus.iter_mut().find(|v| v.index == ack.vcpu) {
            v.state = ack.state;
        }
    }
}

/// How much of the time the vCPUs are kept out of the guest, in percent: auto-converge slows a
/// guest that dirties memory faster than a migration sends it. Every [`Throttle::PERIOD`] the
/// main loop kicks the running vCPUs, and each sits out its share of the period before it runs
/// the guest again.
#[derive(Debug, Default)]
pub struct Throttle(AtomicU32);

impl Throttle {
    /// The throttle's time slice.
    pub const PERIOD: Duration = Duration::from_millis(20);
    /// The most it holds back.
    pub const MAX_PERCENT: u32 = 99;

    /// Sets the share (capped at [`Throttle::MAX_PERCENT`]); 0 stops it.
    pub fn set(&self, percent: u32) {
        self.0.store(percent.min(Self::MAX_PERCENT), Ordering::Relaxed);
    }

    /// The share now.
    pub fn percent(&self) -> u32 {
        self.0.load(Ordering::Relaxed)
    }

    /// How long a kicked vCPU sits out now, if at all.
    pub fn pause(&self) -> Option<Duration> {
        let percent = self.percent();
        (percent > 0).then(|| Self::PERIOD * percent / 100)
    }
}

/// The signal that kicks a vCPU thread out of KVM_RUN (the first real-time signal).
pub fn kick_signal() -> i32 {
    vmm_sys_util::signal::SIGRTMIN()
}

thread_local! {
    /// This thread's vCPU `kvm_run` area, for the kick handler; null on other threads.
    static KVM_RUN: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

extern "C" fn handle_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    let run = KVM_RUN.with(Cell::get);
    if !run.is_null() {
        // SAFETY: the pointer is set only by `KickTarget::new` on this very thread, to the vCPU's
        // kvm_run mapping, and cleared by its drop before the mapping can go away; a signal handler
        // runs on the thread it interrupts, so the mapping is alive. The thread itself is stopped
        // while its handler runs, and the kernel reads immediate_exit only at the next KVM_RUN, so
        // this single volatile byte store races with nothing (the same technique as Firecracker's).
        unsafe { std::ptr::addr_of_mut!((*run).immediate_exit).write_volatile(1) };
    }
}

/// Installs the kick handler for the process (once, before any vCPU thread starts).
pub fn install_kick_handler() -> Result<(), vmm_sys_util::errno::Error> {
    register_signal_handler(kick_signal(), handle_kick)
}

/// While alive, kicks delivered to this thread set `immediate_exit` in `run`.
pub struct KickTarget {
    _not_send: std::marker::PhantomData<*mut kvm_run>,
}

impl KickTarget {
    /// Points the kick handler of the calling thread at `run`, which must outlive the target.
    pub fn new(run: &mut kvm_run) -> Self {
        KVM_RUN.with(|cell| cell.set(run));
        KickTarget {
            _not_send: std::marker::PhantomData,
        }
    }
}

impl Drop for KickTarget {
    fn drop(&mut self) {
        KVM_RUN.with(|cell| cell.set(std::ptr::null_mut()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fake vCPU thread following the protocol: waits when paused, polls when running.
    fn fake_vcpu(channel: VcpuChannel, ignore_pause: bool) -> JoinHandle<()> {
        std::thread::spawn(move || {
            let mut running = false;
            loop {
                let order = if running {
                    std::thread::sleep(Duration::from_millis(1));
                    match channel.poll() {
                        Some(o) => o,
                        None => continue,
                    }
                } else {
                    match channel.wait() {
                        Some(o) => o,
                        None => return,
                    }
                };
                if ignore_pause && order.command == VcpuCommand::Pause {
                    continue;
                }
                running = order.command == VcpuCommand::Resume;
                let state = if running {
                    VcpuRunState::Running
                } else {
                    VcpuRunState::Paused
                };
                channel.ack(order, state);
            }
        })
    }

    fn set_with(n: u8, ignore_pause_on: Option<u8>) -> VcpuSet {
        install_kick_handler().unwrap();
        let mut set = VcpuSet::new();
        for i in 0..n {
            let ch = set.channel(i);
            let t = fake_vcpu(ch, ignore_pause_on == Some(i));
            set.started(i, t);
        }
        set
    }

    #[test]
    fn pause_and_resume_are_acknowledged_by_every_vcpu() {
        let mut set = set_with(4, None);
        set.command(VcpuCommand::Resume).unwrap();
        set.command(VcpuCommand::Pause).unwrap();
        set.command(VcpuCommand::Pause).unwrap();
        set.command(VcpuCommand::Resume).unwrap();
        assert_eq!(set.len(), 4);
    }

    #[test]
    fn a_vcpu_that_never_answers_times_out_and_a_late_answer_is_not_taken_for_the_next() {
        let mut set = set_with(2, Some(1));
        set.command(VcpuCommand::Resume).unwrap();
        match set.command(VcpuCommand::Pause) {
            Err(VcpuControlError::Timeout(v)) => assert_eq!(v, vec![1]),
            other => panic!("expected a timeout, got {other:?}"),
        }
        // vCPU 1 answers the resume; vCPU 0 the resume too: both are acknowledgements of *this* order.
        set.command(VcpuCommand::Resume).unwrap();
    }

    #[test]
    fn an_exited_vcpu_is_reported() {
        install_kick_handler().unwrap();
        let mut set = VcpuSet::new();
        let ch = set.channel(0);
        let t = std::thread::spawn(move || ch.exited());
        t.join().unwrap();
        match set.command(VcpuCommand::Resume) {
            Err(VcpuControlError::Exited(0)) => {}
            other => panic!("expected exited, got {other:?}"),
        }
    }

    #[test]
    fn the_kick_sets_immediate_exit_on_the_target_thread_only() {
        install_kick_handler().unwrap();
        // SAFETY: kvm_run is plain data (integers and unions of them); all zeroes is valid.
        let mut run: kvm_run = unsafe { std::mem::zeroed() };
        let target = KickTarget::new(&mut run);
        // SAFETY: raising a signal on this thread; its handler (above) only writes `run`.
        assert_eq!(unsafe { libc::raise(kick_signal()) }, 0);
        drop(target);
        assert_eq!(run.immediate_exit, 1);
        // With no target the handler does nothing (and must not crash).
        // SAFETY: as above.
        assert_eq!(unsafe { libc::raise(kick_signal()) }, 0);
    }
}
