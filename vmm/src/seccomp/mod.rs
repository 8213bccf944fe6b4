//! Per-thread seccomp filters: each thread category of the VMM runs under its own allow-list.
//!
//! A guest that finds a bug in device emulation or KVM's exit handling gets code execution in one
//! VMM thread. The filters limit what that thread can then ask of the host kernel: a vCPU thread
//! can run its vCPU, touch the fds it already has and little else (no `openat`, no `socket`, no
//! `execve`); the main loop can also accept control-socket clients and drive the block engines.
//!
//! Filters are per thread (no `TSYNC`) and stack: a thread created after its creator installed a
//! filter inherits it, and the kernel then applies the most restrictive verdict of all. So the main
//! thread spawns the vCPU threads first, each of which installs the [`ThreadCategory::Vcpu`]
//! filter as its first act, and installs its own [`ThreadCategory::MainLoop`] filter only then,
//! right before its event loop. A future I/O worker spawned by the main loop after that inherits
//! the main-loop filter below its own, so its list must be a subset of the main loop's (and the
//! main loop would need `clone3`, which it is not allowed today: spawn workers before the filter).
//!
//! Programs are compiled by [`SeccompFilter::build`] ahead of time, so that installing one
//! ([`SeccompFilter::apply`]) is two system calls and no allocation.

mod io_worker;
mod main_loop;
mod migration;
mod vcpu;

#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use seccompiler::{
    BackendError, BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompRule,
    TargetArch,
};

/// The kinds of thread in the VMM, each with its own allow-list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ThreadCategory {
    /// The main thread's event loop: control socket, devices' queue and completion events, exits.
    MainLoop,
    /// A vCPU thread: `KVM_RUN` and the port and MMIO exits it serves.
    Vcpu,
    /// A (future) worker doing file or tap I/O on fds it was handed, woken by eventfds.
    IoWorker,
    /// A live migration's sender or receiver: bytes over the connection it was handed.
    Migration,
}

impl ThreadCategory {
    /// Every category, for tests and documentation.
    pub const ALL: [ThreadCategory; 4] = [
        ThreadCategory::MainLoop,
        ThreadCategory::Vcpu,
        ThreadCategory::IoWorker,
        ThreadCategory::Migration,
    ];
}

impl fmt::Display for ThreadCategory {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ThreadCategory::MainLoop => "main loop",
            ThreadCategory::Vcpu => "vCPU",
            ThreadCategory::IoWorker => "I/O worker",
            ThreadCategory::Migration => "migration",
        })
    }
}

/// What a filter does with a system call outside its thread's list (`--seccomp`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum SeccompMode {
    /// Kill the whole process (`SECCOMP_RET_KILL_PROCESS`, seen as `SIGSYS`). The default.
    #[default]
    Kill,
    /// Let the call proceed and have the kernel log it (`SECCOMP_RET_LOG`, audit `type=1326`).
    Log,
    /// Install no filter at all.
    Off,
}

impl FromStr for SeccompMode {
    type Err = SeccompError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "kill" => Ok(SeccompMode::Kill),
            "log" => Ok(SeccompMode::Log),
            "off" => Ok(SeccompMode::Off),
            other => Err(SeccompError::Mode(other.to_string())),
        }
    }
}

impl fmt::Display for SeccompMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            SeccompMode::Kill => "kill",
            SeccompMode::Log => "log",
            SeccompMode::Off => "off",
        })
    }
}

/// Why a filter could not be built or installed.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    /// Not `kill`, `log` or `off`.
    #[error("unknown seccomp mode '{0}' (expected kill, log or off)")]
    Mode(String),
    /// The allow-list did not compile to BPF.
    #[error("cannot build the {category} seccomp filter: {source}")]
    Build {
        /// Whose filter.
        category: ThreadCategory,
        /// Why.
        source: BackendError,
    },
    /// The kernel refused the filter (`prctl(PR_SET_NO_NEW_PRIVS)` or `seccomp(2)` failed).
    #[error("cannot install the {category} seccomp filter: {source}")]
    Install {
        /// Whose filter.
        category: ThreadCategory,
        /// Why.
        source: seccompiler::Error,
    },
}

/// A compiled filter for one thread category, ready to be installed by the thread it is for.
/// Cheap to clone (the program is shared).
#[derive(Debug, Clone)]
pub struct SeccompFilter {
    category: ThreadCategory,
    /// `None` for [`SeccompMode::Off`].
    program: Option<Arc<BpfProgram>>,
    /// A second program, stacked on the first, that makes the calls of [`refused`] fail with
    /// `EACCES` (the kernel applies the stricter verdict of the two); `None` when there are none.
    refusals: Option<Arc<BpfProgram>>,
}

/// Calls a category's allow-list admits only so that a second filter can make them fail with
/// `EACCES` instead of killing the process: glibc's allocator opens
/// `/proc/sys/vm/overcommit_memory` the first time a thread's own arena shrinks (TLS buffers
/// freed by the migration thread), and copes with that failing.
fn refused(category: ThreadCategory) -> &'static [i64] {
    match category {
        ThreadCategory::Migration => &[libc::SYS_open, libc::SYS_openat],
        _ => &[],
    }
}

fn build_refusals(category: ThreadCategory, mode: SeccompMode) -> Result<Option<BpfProgram>, SeccompError> {
    let calls = refused(category);
    if mode == SeccompMode::Off || calls.is_empty() {
        return Ok(None);
    }
    let build_err = |source| SeccompError::Build { category, source };
    let rules = calls.iter().map(|nr| (*nr, Vec::new())).collect();
    let filter = seccompiler::SeccompFilter::new(
        rules,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::EACCES as u32),
        target_arch(),
    )
    .map_err(build_err)?;
    Ok(Some(filter.try_into().map_err(build_err)?))
}

impl SeccompFilter {
    /// Compiles the allow-list of `category`; a call outside it is handled as `mode` says.
    pub fn build(category: ThreadCategory, mode: SeccompMode) -> Result<Self, SeccompError> {
        let program = build_program(category, mode)?.map(Arc::new);
        let refusals = build_refusals(category, mode)?.map(Arc::new);
        Ok(SeccompFilter {
            category,
            program,
            refusals,
        })
    }

    /// Whose filter this is.
    pub fn category(&self) -> ThreadCategory {
        self.category
    }

    /// The BPF program, `None` when filtering is off.
    pub fn program(&self) -> Option<&BpfProgram> {
        self.program.as_deref()
    }

    /// Installs the filter on the calling thread (and, through inheritance, on the threads it
    /// creates from now on). Sets `no_new_privs` first, as the kernel requires of unprivileged
    /// callers. Allocates nothing and takes no lock, so it may run in a freshly forked child.
    pub fn apply(&self) -> Result<(), SeccompError> {
        for program in [&self.refusals, &self.program].into_iter().flatten() {
            seccompiler::apply_filter(program).map_err(|source| SeccompError::Install {
                category: self.category,
                source,
            })?;
        }
        Ok(())
    }
}

/// Builds the BPF program of `category`: its allow-list, with mismatches killing the process
/// ([`SeccompMode::Kill`]) or being logged ([`SeccompMode::Log`]); `None` for [`SeccompMode::Off`].
pub fn build_program(
    category: ThreadCategory,
    mode: SeccompMode,
) -> Result<Option<BpfProgram>, SeccompError> {
    let mismatch = match mode {
        SeccompMode::Kill => SeccompAction::KillProcess,
        SeccompMode::Log => SeccompAction::Log,
        SeccompMode::Off => return Ok(None),
    };
    let build_err = |source| SeccompError::Build { category, source };
    let rules = match category {
        ThreadCategory::MainLoop => main_loop::rules(),
        ThreadCategory::Vcpu => vcpu::rules(),
        ThreadCategory::IoWorker => io_worker::rules(),
        ThreadCategory::Migration => migration::rules(),
    }
    .map_err(build_err)?;
    let filter = seccompiler::SeccompFilter::new(rules.0, mismatch, SeccompAction::Allow, target_arch())
        .map_err(build_err)?;
    let program: BpfProgram = filter.try_into().map_err(build_err)?;
    Ok(Some(program))
}

/// Builds `category`'s filter and installs it on the calling thread.
pub fn install(category: ThreadCategory, mode: SeccompMode) -> Result<(), SeccompError> {
    SeccompFilter::build(category, mode)?.apply()
}

#[cfg(target_arch = "x86_64")]
fn target_arch() -> TargetArch {
    TargetArch::x86_64
}

#[cfg(target_arch = "aarch64")]
fn target_arch() -> TargetArch {
    TargetArch::aarch64
}

/// An allow-list under construction: syscall number to the argument rules it must match (an
/// empty list allows it with any arguments; several rules are alternatives).
#[derive(Default)]
pub(crate) struct Rules(BTreeMap<i64, Vec<SeccompRule>>);

impl Rules {
    /// Allows `nr` with any arguments.
    pub(crate) fn allow(&mut self, nr: i64) -> &mut Self {
        self.0.entry(nr).or_default();
        self
    }

    /// Allows `nr` only when one of `rules` matches its arguments.
    pub(crate) fn allow_if(&mut self, nr: i64, rules: Vec<SeccompRule>) -> &mut Self {
        self.0.entry(nr).or_default().extend(rules);
        self
    }

    /// Whether `nr` is in the list (in any form).
    #[cfg(test)]
    pub(crate) fn contains(&self, nr: i64) -> bool {
        self.0.contains_key(&nr)
    }
}

/// A rule: all `conditions` hold.
pub(crate) fn rule(
    conditions: Vec<Result<SeccompCondition, BackendError>>,
) -> Result<SeccompRule, BackendError> {
    SeccompRule::new(conditions.into_iter().collect::<Result<_, _>>()?)
}

/// Argument `arg` (32-bit) equals `value`.
pub(crate) fn arg_eq(arg: u8, value: u64) -> Result<SeccompCondition, BackendError> {
    SeccompCondition::new(arg, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, value)
}

/// Argument `arg` (32-bit) has none of the bits of `mask` set.
pub(crate) fn arg_without(arg: u8, mask: u64) -> Result<SeccompCondition, BackendError> {
    SeccompCondition::new(arg, SeccompCmpArgLen::Dword, SeccompCmpOp::MaskedEq(mask), 0)
}

/// One rule per value: argument `arg` is one of `values`.
pub(crate) fn arg_in(arg: u8, values: &[u64]) -> Result<Vec<SeccompRule>, BackendError> {
    values.iter().map(|&v| rule(vec![arg_eq(arg, v)])).collect()
}

/// `ioctl` request numbers (`_IO`/`_IOR`/`_IOW` of `<asm-generic/ioctl.h>`) that the lists use.
pub(crate) mod ioctl {
    const KVMIO: u64 = 0xAE;

    /// `_IO(KVMIO, 0x80)`: enter the guest.
    pub const KVM_RUN: u64 = (KVMIO << 8) | 0x80;
    /// Set or clear `O_NONBLOCK` (what std's `set_nonblocking` uses on sockets).
    pub const FIONBIO: u64 = libc::FIONBIO;
    /// Set close-on-exec.
    pub const FIOCLEX: u64 = libc::FIOCLEX;
    /// A tap's offloads, set when the guest's virtio-net driver starts (or resets) the device.
    pub const TUNSETOFFLOAD: u64 = libc::TUNSETOFFLOAD;

    /// `_IOC(dir, KVMIO, nr, sizeof(T))`.
    const fn kvm_ioc<T>(dir: u64, nr: u64) -> u64 {
        (dir << 30) | ((std::mem::size_of::<T>() as u64) << 16) | (KVMIO << 8) | nr
    }
    const fn iow<T>(nr: u64) -> u64 {
        kvm_ioc::<T>(1, nr)
    }
    const fn ior<T>(nr: u64) -> u64 {
        kvm_ioc::<T>(2, nr)
    }
    const fn iowr<T>(nr: u64) -> u64 {
        kvm_ioc::<T>(3, nr)
    }
    use kvm_bindings as kb;

    /// What a vCPU thread reads when asked for its state (snapshots).
    pub const VCPU_STATE_GETTERS: [u64; 11] = [
        ior::<kb::kvm_regs>(0x81),
        ior::<kb::kvm_sregs>(0x83),
        iowr::<kb::kvm_msrs>(0x88),
        ior::<kb::kvm_lapic_state>(0x8e),
        iowr::<kb::kvm_cpuid2>(0x91),
        ior::<kb::kvm_mp_state>(0x98),
        ior::<kb::kvm_vcpu_events>(0x9f),
        ior::<kb::kvm_debugregs>(0xa1),
        (KVMIO << 8) | 0xa3, // KVM_GET_TSC_KHZ
        ior::<kb::kvm_xsave>(0xa4),
        ior::<kb::kvm_xcrs>(0xa6),
    ];
    /// What the main thread reads of the VM for a snapshot: the dirty log, irqchips, PIT, clock.
    pub const VM_STATE_GETTERS: [u64; 4] = [
        iow::<kb::kvm_dirty_log>(0x42),
        iowr::<kb::kvm_irqchip>(0x62),
        ior::<kb::kvm_clock_data>(0x7c),
        ior::<kb::kvm_pit_state2>(0x9f),
    ];
    /// FICLONE: snapshot disk copies share extents where the filesystem can.
    pub const FICLONE: u64 = 0x4004_9409;
}

/// What every thread category needs, whatever its work: memory for the allocator (never
/// executable), locks, signals that interrupt it, its clock, its own end, and a clean abort.
pub(crate) fn base_rules() -> Result<Rules, BackendError> {
    let mut r = Rules::default();
    // Mutex/Condvar waits and wakes (device locks, the vCPU pause state, the logger).
    r.allow(libc::SYS_futex);
    // The allocator's heap.
    r.allow(libc::SYS_brk);
    // The allocator's large blocks and per-thread arenas: never executable memory.
    r.allow_if(
        libc::SYS_mmap,
        vec![rule(vec![arg_without(2, libc::PROT_EXEC as u64)])?],
    );
    // Arena growth and thread stack guards: never making memory executable.
    r.allow_if(
        libc::SYS_mprotect,
        vec![rule(vec![arg_without(2, libc::PROT_EXEC as u64)])?],
    );
    // Freeing large blocks, a finished thread's stack and signal stack.
    r.allow(libc::SYS_munmap);
    // realloc of large blocks.
    r.allow(libc::SYS_mremap);
    // The allocator returning memory, glibc releasing a finished thread's stack.
    // Also the balloon (main loop): MADV_DONTNEED on guest pages the guest gave up or reported
    // free, after checking each range lies inside guest RAM (devices/src/virtio/balloon/pages.rs).
    r.allow(libc::SYS_madvise);
    // Returning from a signal handler (the vCPU kick signal).
    r.allow(libc::SYS_rt_sigreturn);
    // Blocking and unblocking signals (the vCPU kick, abort).
    r.allow(libc::SYS_rt_sigprocmask);
    // Rust tears down a thread's alternate signal stack when the thread ends.
    r.allow(libc::SYS_sigaltstack);
    // Instant::now when the vDSO cannot serve it (some clock sources).
    r.allow(libc::SYS_clock_gettime);
    // A thread ending.
    r.allow(libc::SYS_exit);
    // abort() after a panic (panic = "abort"): it finds its own ids and raises SIGABRT.
    r.allow(libc::SYS_getpid);
    // abort(), as above.
    r.allow(libc::SYS_gettid);
    // abort() raising SIGABRT on itself; other signals are the main loop's business.
    r.allow_if(
        libc::SYS_tgkill,
        vec![rule(vec![arg_eq(2, libc::SIGABRT as u64)])?],
    );
    Ok(r)
}
