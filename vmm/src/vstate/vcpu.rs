//! vCPUs: creation, boot-state setup, and the thread that runs each one.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;

use devices::bus::Bus;
use kvm_bindings::{
    KVM_MAX_CPUID_ENTRIES, KVM_SYSTEM_EVENT_CRASH, KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN,
};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};
use vm_memory::GuestMemoryMmap;

use crate::arch::boot::EntryPoint;
use crate::arch::cpuid;
use crate::arch::regs::{self, RegsError};
use crate::exit::ExitEvents;
use crate::seccomp::{SeccompError, SeccompFilter};
use crate::vstate::vcpu_control::{KickTarget, Order, VcpuChannel, VcpuCommand, VcpuRunState};
use crate::vstate::vcpu_state::VcpuState;

/// Errors creating or configuring a vCPU.
#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    /// A KVM ioctl failed.
    #[error("vCPU {0}: {1} failed: {2}")]
    Kvm(u8, &'static str, kvm_ioctls::Error),
    /// Register setup failed.
    #[error("vCPU {0}: {1}")]
    Regs(u8, RegsError),
    /// The thread could not be started.
    #[error("vCPU {0}: cannot start thread: {1}")]
    Spawn(u8, std::io::Error),
    /// The thread could not install its seccomp filter.
    #[error("vCPU {0}: {1}")]
    Seccomp(u8, SeccompError),
    /// A saved state could not be restored.
    #[error("vCPU {0}: {1}")]
    Restore(u8, crate::vstate::vcpu_state::VcpuStateError),
}

/// What a vCPU thread needs to serve guest exits.
#[derive(Clone)]
pub struct ExitContext {
    /// Port I/O bus.
    pub pio: Arc<Bus>,
    /// MMIO bus.
    pub mmio: Arc<Bus>,
    /// Where the VM's end is signalled.
    pub exits: Arc<ExitEvents>,
    /// Process start, for the time-to-first-KVM_RUN log line.
    pub process_start: Instant,
    /// Keeps guest memory mapped for as long as any vCPU thread exists, whatever the builder's
    /// thread does with its own handle.
    pub guest_memory: GuestMemoryMmap,
    /// Exits to user space, by reason, summed over all vCPUs.
    pub exit_counters: Arc<ExitCounters>,
    /// The vCPU threads' seccomp filter, built once; each thread installs it before KVM_RUN.
    pub seccomp: SeccompFilter,
    /// The MSRs a snapshot saves (what KVM reports).
    pub msr_indices: Arc<[u32]>,
    /// How much a kicked vCPU holds back (auto-converge).
    pub throttle: Arc<crate::vstate::vcpu_control::Throttle>,
}

/// vCPU exits that reached the VMM, by reason (relaxed atomics: statistics, not synchronisation).
#[derive(Debug, Default)]
pub struct ExitCounters {
    /// Port reads.
    pub io_in: AtomicU64,
    /// Port writes.
    pub io_out: AtomicU64,
    /// MMIO reads (e.g. virtio interrupt status).
    pub mmio_read: AtomicU64,
    /// MMIO writes not absorbed by an ioeventfd.
    pub mmio_write: AtomicU64,
    /// KVM_RUN interrupted by a signal.
    pub interrupted: AtomicU64,
    /// Everything else (system events, failures).
    pub other: AtomicU64,
}

impl ExitCounters {
    fn count(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// `(reason, count)` pairs, for metrics.
    pub fn snapshot(&self) -> [(&'static str, u64); 6] {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        [
            ("io_in", get(&self.io_in)),
            ("io_out", get(&self.io_out)),
            ("mmio_read", get(&self.mmio_read)),
            ("mmio_write", get(&self.mmio_write)),
            ("interrupted", get(&self.interrupted)),
            ("other", get(&self.other)),
        ]
    }
}

/// Asynchronous signals vCPU threads leave to the main thread.
const PROCESS_SIGNALS: [i32; 7] = [
    libc::SIGTERM,
    libc::SIGINT,
    libc::SIGHUP,
    libc::SIGQUIT,
    libc::SIGUSR1,
    libc::SIGUSR2,
    libc::SIGCHLD,
];

/// What one trip into the guest ended with.
enum Step {
    /// An exit the VMM served; enter the guest again.
    Continue,
    /// KVM_RUN was interrupted by the kick signal: look for orders.
    Kicked,
    /// The guest powered off, reset or panicked.
    VmEnded,
}

/// A configured vCPU, not yet running.
pub struct Vcpu {
    index: u8,
    fd: VcpuFd,
}

/// Shared parameters for configuring every vCPU of a VM.
pub struct VcpuSetup<'a> {
    /// KVM, for the supported CPUID.
    pub kvm: &'a Kvm,
    /// Guest memory, for the boot CPU's descriptor tables.
    pub mem: &'a GuestMemoryMmap,
    /// Kernel entry point (boot CPU only).
    pub entry: EntryPoint,
    /// Number of vCPUs.
    pub count: u8,
    /// KVM paravirt features (CPUID 0x4000_0001 EAX bits) the guest must not see.
    pub hidden_kvm_features: u32,
}

impl Vcpu {
    /// Creates vCPU `index` and sets its CPUID, MSRs, FPU and LAPIC; the boot CPU (index 0) also
    /// gets the registers for entering the kernel. The others wait for the guest's INIT/SIPI.
    pub fn new(vm: &VmFd, index: u8, setup: &VcpuSetup) -> Result<Self, VcpuError> {
        let kvm_err = |op| move |e| VcpuError::Kvm(index, op, e);
        let regs_err = |e| VcpuError::Regs(index, e);
        let fd = vm
            .create_vcpu(u64::from(index))
            .map_err(kvm_err("KVM_CREATE_VCPU"))?;
        let mut cpuid = setup
            .kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm_err("KVM_GET_SUPPORTED_CPUID"))?;
        cpuid::configure(&mut cpuid, index, setup.count, setup.hidden_kvm_features);
        fd.set_cpuid2(&cpuid).map_err(kvm_err("KVM_SET_CPUID2"))?;
        regs::setup_msrs(&fd).map_err(regs_err)?;
        regs::setup_fpu(&fd).map_err(regs_err)?;
        regs::setup_lapic(&fd).map_err(regs_err)?;
        if index == 0 {
            regs::setup_regs(&fd, setup.entry).map_err(regs_err)?;
            regs::setup_sregs(setup.mem, &fd, setup.entry).map_err(regs_err)?;
        }
        Ok(Vcpu { index, fd })
    }

    /// Creates vCPU `index` in a saved state.
    pub fn restored(vm: &VmFd, index: u8, state: &VcpuState) -> Result<Self, VcpuError> {
        let fd = vm
            .create_vcpu(u64::from(index))
            .map_err(|e| VcpuError::Kvm(index, "KVM_CREATE_VCPU", e))?;
        state.restore(&fd).map_err(|e| VcpuError::Restore(index, e))?;
        Ok(Vcpu { index, fd })
    }

    /// Its index (the APIC ID).
    pub fn index(&self) -> u8 {
        self.index
    }

    /// Starts the vCPU on its own thread, named `vcpuN`, once that thread has installed its seccomp
    /// filter. It starts paused: it enters the guest on the first [`VcpuCommand::Resume`] it gets
    /// through `channel`.
    pub fn start(mut self, ctx: ExitContext, channel: VcpuChannel) -> Result<JoinHandle<()>, VcpuError> {
        let index = self.index;
        let (filtered_tx, filtered) = std::sync::mpsc::sync_channel(1);
        let thread = std::thread::Builder::new()
            .name(format!("vcpu{index}"))
            .spawn(move || {
                // Signals meant for the process (SIGTERM from a supervisor or the jail's launcher) are
                // handled by the main thread, whose filter allows what their handlers do.
                for signo in PROCESS_SIGNALS {
                    match vmm_sys_util::signal::block_signal(signo) {
                        Ok(()) | Err(vmm_sys_util::signal::Error::SignalAlreadyBlocked(_)) => {}
                        Err(e) => log::warn!("vCPU {index}: cannot block signal {signo}: {e}"),
                    }
                }
                // First, before any guest-facing work: the thread's own seccomp filter.
                let installed = ctx.seccomp.apply();
                let ok = installed.is_ok();
                let _ = filtered_tx.send(installed);
                if ok {
                    self.run(&ctx, &channel);
                }
                channel.exited();
                // The VM has ended and the process is on its way out. Ending the thread would drop
                // the vCPU fd and maybe the last handles on devices, closing fds, which this
                // thread's filter forbids (close is not on its list): wait for the exit instead.
                loop {
                    std::thread::park();
                }
            })
            .map_err(|e| VcpuError::Spawn(index, e))?;
        match filtered.recv() {
            Ok(Ok(())) => Ok(thread),
            Ok(Err(e)) => Err(VcpuError::Seccomp(index, e)),
            Err(_) => Err(VcpuError::Spawn(
                index,
                std::io::Error::other("thread ended at start"),
            )),
        }
    }

    /// The thread body: the Paused / Running state machine around KVM_RUN.
    fn run(&mut self, ctx: &ExitContext, channel: &VcpuChannel) {
        let _kick = KickTarget::new(self.fd.get_kvm_run());
        let mut running = false;
        let mut first_run = self.index == 0;
        loop {
            if !running {
                // Paused: block until told otherwise (no spinning, no KVM_RUN).
                let Some(order) = channel.wait() else {
                    return;
                };
                running = self.obey(order, channel, ctx, running);
                continue;
            }
            if first_run {
                first_run = false;
                let ms = ctx.process_start.elapsed().as_secs_f64() * 1000.0;
                eprintln!("vmm: first KVM_RUN at {ms:.3} ms after process start");
            }
            match self.run_once(ctx) {
                Ok(Step::Continue) => {}
                Ok(Step::Kicked) => {
                    self.fd.set_kvm_immediate_exit(0);
                    while let Some(order) = channel.poll() {
                        running = self.obey(order, channel, ctx, running);
                    }
                    if let (true, Some(pause)) = (running, ctx.throttle.pause()) {
                        std::thread::sleep(pause);
                    }
                }
                Ok(Step::VmEnded) => return,
                Err(reason) => {
                    ctx.exits.vcpu_fault(format!("vCPU {}: {reason}", self.index));
                    return;
                }
            }
        }
    }

    /// Carries out and acknowledges `order`; true if the vCPU should now run.
    fn obey(&self, order: Order, channel: &VcpuChannel, ctx: &ExitContext, running: bool) -> bool {
        let running = match order.command {
            VcpuCommand::Resume => true,
            VcpuCommand::Pause => false,
            VcpuCommand::Save if running => {
                channel.store_saved(Err("cannot save a running vCPU".into()));
                true
            }
            VcpuCommand::Save => {
                let saved = VcpuState::save(&self.fd, &ctx.msr_indices).map_err(|e| e.to_string());
                channel.store_saved(saved);
                false
            }
        };
        let state = if running {
            VcpuRunState::Running
        } else {
            VcpuRunState::Paused
        };
        channel.ack(order, state);
        running
    }

    /// Runs the guest until its next exit and serves it.
    fn run_once(&mut self, ctx: &ExitContext) -> Result<Step, String> {
        let exit = self.fd.run();
        let n = &ctx.exit_counters;
        ExitCounters::count(match &exit {
            Ok(VcpuExit::IoIn(..)) => &n.io_in,
            Ok(VcpuExit::IoOut(..)) => &n.io_out,
            Ok(VcpuExit::MmioRead(..)) => &n.mmio_read,
            Ok(VcpuExit::MmioWrite(..)) => &n.mmio_write,
            Err(_) => &n.interrupted,
            Ok(_) => &n.other,
        });
        match exit {
            Ok(VcpuExit::IoIn(port, data)) => {
                if !ctx.pio.read(u64::from(port), data) {
                    data.fill(0xff);
                }
            }
            Ok(VcpuExit::IoOut(port, data)) => {
                ctx.pio.write(u64::from(port), data);
            }
            Ok(VcpuExit::MmioRead(addr, data)) => {
                if !ctx.mmio.read(addr, data) {
                    data.fill(0);
                }
            }
            Ok(VcpuExit::MmioWrite(addr, data)) => {
                ctx.mmio.write(addr, data);
            }
            Ok(VcpuExit::SystemEvent(kind, _)) => {
                let evt = match kind {
                    KVM_SYSTEM_EVENT_SHUTDOWN => &ctx.exits.power_off,
                    KVM_SYSTEM_EVENT_RESET => &ctx.exits.reset,
                    KVM_SYSTEM_EVENT_CRASH => &ctx.exits.panic,
                    other => return Err(format!("unknown system event {other}")),
                };
                ExitEvents::raise(evt);
                return Ok(Step::VmEnded);
            }
            Ok(VcpuExit::Shutdown) => return Err("triple fault (KVM_EXIT_SHUTDOWN)".into()),
            Ok(VcpuExit::Hlt) => return Err("halted with interrupts off (KVM_EXIT_HLT)".into()),
            Ok(VcpuExit::FailEntry(reason, cpu)) => {
                return Err(format!(
                    "VM entry failed: hardware reason {reason:#x} on host CPU {cpu}"
                ))
            }
            Ok(VcpuExit::InternalError) => return Err("KVM internal error (emulation failure)".into()),
            Ok(other) => return Err(format!("unexpected exit {other:?}")),
            Err(e) if e.errno() == libc::EINTR => return Ok(Step::Kicked),
            Err(e) if e.errno() == libc::EAGAIN => {}
            Err(e) => return Err(format!("KVM_RUN failed: {e}")),
        }
        Ok(Step::Continue)
    }
}
