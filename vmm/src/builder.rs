//! The linear recipe that turns a [`VmConfig`] into a VM whose vCPUs wait, paused, to be resumed.

use std::fs::File;
use std::path::Path;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use devices::legacy::SerialOutput;
use devices::virtio::dirty::DirtyPages;
use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};
use vm_memory::GuestMemoryMmap;
use vmm_api::{SerialConfig, VmConfig};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use vmm_sys_util::timerfd::TimerFd;

use crate::arch::host_quirks::{self, KvmFlavor};
use crate::arch::{acpi, boot, layout};
use crate::device_manager::{self, DeviceError, PassedFds};
use crate::exit::ExitEvents;
use crate::machine::{KvmParts, Machine, MachineDevices};
use crate::persist::{self, memory::Backing};
use crate::seccomp::{SeccompError, SeccompFilter, SeccompMode, ThreadCategory};
use crate::vstate::memory::{self, MemoryError};
use crate::vstate::vcpu::{ExitContext, ExitCounters, Vcpu, VcpuError, VcpuSetup};
use crate::vstate::vcpu_control::{Throttle, VcpuSet};
use crate::vstate::vm::{self, VmError};

/// Why a VM could not be built or run.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// A file named in the config could not be opened.
    #[error("cannot open {what} {path}: {source}")]
    Open {
        /// Which file ("kernel", "initrd", "serial output file").
        what: &'static str,
        /// Its path.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// KVM or VM creation failed.
    #[error(transparent)]
    Vm(#[from] VmError),
    /// Guest memory could not be set up.
    #[error(transparent)]
    Memory(#[from] MemoryError),
    /// Kernel, initrd or command line could not be loaded.
    #[error(transparent)]
    Boot(#[from] boot::BootError),
    /// ACPI tables could not be written.
    #[error(transparent)]
    Acpi(#[from] acpi::AcpiError),
    /// Devices could not be set up.
    #[error(transparent)]
    Devices(#[from] DeviceError),
    /// A vCPU could not be created or started.
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    /// A seccomp filter could not be built or installed.
    #[error(transparent)]
    Seccomp(#[from] SeccompError),
    /// The main event loop failed.
    #[error("event loop: {0}")]
    EventLoop(String),
    /// `start` before `configure`.
    #[error("the VM is not configured")]
    NotConfigured,
    /// The built VM's vCPUs did not start.
    #[error("cannot start the vCPUs: {0}")]
    Start(crate::machine::MachineError),
    /// The snapshot could not be restored.
    #[error(transparent)]
    Snapshot(#[from] persist::SnapshotError),
}

impl BuildError {
    /// How the control socket classifies this failure: the request's fault, or the VMM's.
    pub fn kind(&self) -> vmm_api::control::ErrorKind {
        use vmm_api::control::ErrorKind;
        match self {
            BuildError::Open { .. }
            | BuildError::Boot(_)
            | BuildError::Devices(DeviceError::Drive { .. }) => ErrorKind::InvalidArgument,
            BuildError::NotConfigured => ErrorKind::WrongState,
            BuildError::Snapshot(e) => e.kind(),
            BuildError::Seccomp(_) => ErrorKind::Internal,
            _ => ErrorKind::Internal,
        }
    }
}

fn open(what: &'static str, path: &Path) -> Result<File, BuildError> {
    File::open(path).map_err(|source| BuildError::Open {
        what,
        path: path.display().to_string(),
        source,
    })
}

/// Writes the command line, the firmware tables and the boot information that point to the
/// loaded kernel and initrd.
fn write_boot_data(
    config: &VmConfig,
    flavor: KvmFlavor,
    mem: &GuestMemoryMmap,
    kernel: &boot::LoadedKernel,
    initrd: Option<boot::InitrdRegion>,
    devices: &device_manager::Devices,
) -> Result<(), BuildError> {
    if let Some(initrd) = &initrd {
        boot::check_initrd_placement(kernel, initrd)?;
    }
    let extra: Vec<&str> = devices
        .cmdline_args
        .iter()
        .map(String::as_str)
        .chain(flavor.extra_kernel_args().iter().copied())
        .collect();
    let cmdline = host_quirks::with_extra_args(&config.boot.cmdline, &extra);
    let cmdline_len = boot::write_cmdline(mem, &cmdline)?;
    let rsdp = acpi::write_tables(mem, config.machine.vcpus, &devices.virtio)?;
    let memory_map = layout::memory_map(&layout::ram_ranges(config.machine.memory_mib << 20));
    let info = boot::BootInfo {
        kernel,
        initrd,
        cmdline_len,
        memory_map: &memory_map,
        rsdp,
    };
    boot::write_boot_info(mem, &info)?;
    Ok(())
}

/// What outlives any one VM of the process: how the VM's end and the guest's boot are signalled,
/// and the counters the control socket reads.
pub struct ProcessEvents {
    /// When the process started.
    pub process_start: Instant,
    /// How the VM ends.
    pub exits: Arc<ExitEvents>,
    /// Set by the boot timer when the guest signals boot completion.
    pub guest_boot: Arc<OnceLock<Duration>>,
    /// Raised by the boot timer when the guest has booted.
    pub boot_event: EventFd,
    /// vCPU exits by reason.
    pub exit_counters: Arc<ExitCounters>,
    /// Raised by a migration thread that has something for the main loop.
    pub migration_event: Arc<EventFd>,
    /// How much the vCPUs are held back (auto-converge during a migration).
    pub throttle: Arc<Throttle>,
    /// Ticks while the vCPUs are throttled; each tick kicks them so that they sit out their share.
    pub throttle_timer: Mutex<TimerFd>,
}

impl ProcessEvents {
    /// Fresh events for a process that started at `process_start`.
    pub fn new(process_start: Instant) -> std::io::Result<Self> {
        Ok(ProcessEvents {
            process_start,
            exits: ExitEvents::new()?,
            guest_boot: Arc::new(OnceLock::new()),
            boot_event: EventFd::new(EFD_NONBLOCK)?,
            exit_counters: Arc::new(ExitCounters::default()),
            migration_event: Arc::new(EventFd::new(EFD_NONBLOCK)?),
            throttle: Arc::default(),
            throttle_timer: Mutex::new(devices::timer::nonblocking_timer()?),
        })
    }
}

/// The main loop's event manager, whose subscribers are shared with the rest of the VMM.
pub type VmmEventManager = EventManager<Arc<Mutex<dyn MutEventSubscriber + Send>>>;

fn serial_output(config: &SerialConfig) -> Result<SerialOutput, BuildError> {
    Ok(match config {
        SerialConfig::Stdout => SerialOutput::Stdout,
        SerialConfig::Off => SerialOutput::Sink,
        SerialConfig::File(path) => {
            SerialOutput::File(File::create(path).map_err(|source| BuildError::Open {
                what: "serial output file",
                path: path.display().to_string(),
                source,
            })?)
        }
    })
}

/// Builds the VM described by `config`: memory, kernel, firmware tables, devices (watched by
/// `event_manager`) and vCPU threads, which wait paused for [`Machine::resume`]. Drives given by
/// file descriptor take theirs out of `fds`. Each vCPU thread installs its `seccomp` filter before
/// it first enters the guest.
pub fn build_vm(
    config: &VmConfig,
    events: &ProcessEvents,
    event_manager: &mut VmmEventManager,
    fds: &mut PassedFds,
    seccomp: SeccompMode,
) -> Result<Machine, BuildError> {
    let flavor = KvmFlavor::detect();
    let mut kernel_file = open("kernel", &config.boot.kernel)?;
    let mut initrd_file = config
        .boot
        .initrd
        .as_deref()
        .map(|p| open("initrd", p))
        .transpose()?;
    let serial = serial_output(&config.serial)?;

    let mem = memory::create_guest_memory(config.machine.memory_mib, config.machine.hugepages)?;
    memory::apply_advice(&mem, config.machine.mergeable, vmm_api::HugePages::Off)?;
    // KVM's first memory slot costs milliseconds on some hosts, and loading kernel and initrd costs
    // page faults: split the work over two threads.
    let (kvm_side, kernel) = std::thread::scope(|scope| {
        let kvm_side = scope.spawn(|| -> Result<_, BuildError> {
            let kvm = vm::open_kvm()?;
            let vm = vm::create_vm(&kvm)?;
            memory::register_with_kvm(&vm, &mem, config.machine.track_dirty_pages)?;
            let initrd = initrd_file
                .as_mut()
                .map(|f| boot::load_initrd(&mem, f))
                .transpose()?;
            Ok((kvm, vm, initrd))
        });
        let kernel = boot::load_kernel(&mem, &mut kernel_file);
        let kvm_side = kvm_side
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
        (kvm_side, kernel)
    });
    let kernel = kernel?;
    let (kvm, vm, initrd) = kvm_side?;
    let dirty = dirty_pages(config, &mem);
    let device_ctx = device_context(&vm, &mem, events, None, dirty.clone());
    let devices = device_manager::create_devices(
        &device_ctx,
        serial,
        &config.drives,
        &config.nets,
        config.machine.balloon.as_ref(),
        fds,
    )?;
    write_boot_data(config, flavor, &mem, &kernel, initrd, &devices)?;
    // Only now: zeroing huge pages while loading the kernel would slow the VMM's start-up, while the
    // guest's own page faults benefit from them.
    if config.machine.hugepages == vmm_api::HugePages::Auto {
        memory::request_huge_pages(&mem);
    }

    let setup = VcpuSetup {
        kvm: &kvm,
        mem: &mem,
        entry: kernel.entry,
        count: config.machine.vcpus,
        hidden_kvm_features: flavor.hidden_kvm_features(),
    };
    let vcpus = (0..config.machine.vcpus)
        .map(|i| Vcpu::new(&vm, i, &setup))
        .collect::<Result<Vec<_>, _>>()?;
    let parts = Parts {
        config: config.clone(),
        kvm,
        vm,
        mem,
        backing: Backing::Anonymous,
        dirty,
        devices,
        vcpus,
        restored_from: None,
    };
    start_vcpu_threads(parts, events, event_manager, seccomp)
}

/// The bitmap devices mark their writes in, if the VM tracks dirty pages.
fn dirty_pages(config: &VmConfig, mem: &GuestMemoryMmap) -> Option<Arc<DirtyPages>> {
    use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
    config.machine.track_dirty_pages.then(|| {
        let ranges: Vec<(u64, u64)> = mem.iter().map(|r| (r.start_addr().0, r.len())).collect();
        Arc::new(DirtyPages::new(&ranges))
    })
}

fn device_context<'a>(
    vm: &'a kvm_ioctls::VmFd,
    mem: &'a GuestMemoryMmap,
    events: &'a ProcessEvents,
    restore: Option<&'a device_manager::LegacyState>,
    dirty: Option<Arc<DirtyPages>>,
) -> device_manager::DeviceContext<'a> {
    device_manager::DeviceContext {
        dirty,
        vm,
        mem,
        exits: &events.exits,
        process_start: events.process_start,
        guest_boot: Arc::clone(&events.guest_boot),
        boot_event: &events.boot_event,
        restore,
    }
}

/// A VM whose memory, devices and vCPUs are set up, booted or restored.
struct Parts {
    config: VmConfig,
    kvm: kvm_ioctls::Kvm,
    vm: kvm_ioctls::VmFd,
    mem: GuestMemoryMmap,
    backing: Backing,
    dirty: Option<Arc<DirtyPages>>,
    devices: device_manager::Devices,
    vcpus: Vec<Vcpu>,
    restored_from: Option<std::path::PathBuf>,
}

/// Rebuilds the VM of a snapshot read by [`persist::restore::prepare`]: the same recipe as
/// [`build_vm`], with state applied where a boot would load a kernel, in the order KVM requires
/// (VM-level state, then each vCPU's), and devices restored paused. KVM's VM and memory slots are
/// set up on a second thread while this one copies the disks (a slot costs milliseconds on some
/// hosts). Disk files the restore created are removed if it fails. The vCPU threads wait, paused,
/// for [`Machine::resume`].
pub fn restore_vm(
    mut prepared: persist::restore::Prepared,
    request: &vmm_api::snapshot::SnapshotRestore,
    events: &ProcessEvents,
    event_manager: &mut VmmEventManager,
    fds: &mut PassedFds,
    seccomp: SeccompMode,
) -> Result<Machine, BuildError> {
    let (kvm_side, disks) = std::thread::scope(|scope| {
        let persist::restore::Prepared {
            config,
            state,
            mem,
            dir,
            created_disks,
        } = &mut prepared;
        let (mem, state, log_dirty) = (&*mem, &*state, config.machine.track_dirty_pages);
        let kvm_side = scope.spawn(move || -> Result<_, BuildError> {
            let (kvm, vm) = prepare_kvm(mem, log_dirty)?;
            state.vm.restore(&vm)?;
            Ok((kvm, vm))
        });
        let disks = persist::restore::give_disks(dir, config, request, fds, created_disks);
        let kvm_side = kvm_side
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
        (kvm_side, disks)
    });
    let (kvm, vm) = match (kvm_side, disks) {
        (Ok(parts), Ok(())) => parts,
        (Err(e), _) => {
            prepared.remove_created_disks();
            return Err(e);
        }
        (_, Err(e)) => return Err(e.into()),
    };
    let saved = Saved {
        config: prepared.config.clone(),
        state: &prepared.state,
        mem: prepared.mem.clone(),
        backing: Backing::SnapshotFile,
        restored_from: Some(prepared.dir.clone()),
    };
    let result = restore_devices_and_vcpus(saved, kvm, vm, events, event_manager, fds, seccomp);
    if result.is_err() {
        prepared.remove_created_disks();
    }
    result
}

/// Rebuilds the VM a live migration brought: memory as received, the disks where the
/// configuration says (the same images the source used), devices and vCPUs from the state. The
/// vCPU threads wait, paused, for [`Machine::resume`].
pub fn migrated_vm(
    received: &crate::migration::destination::Received,
    prepared: Option<Result<(kvm_ioctls::Kvm, kvm_ioctls::VmFd), String>>,
    events: &ProcessEvents,
    event_manager: &mut VmmEventManager,
    fds: &mut PassedFds,
    seccomp: SeccompMode,
) -> Result<Machine, BuildError> {
    let (kvm, vm) = match prepared {
        Some(Ok(kvm_vm)) => kvm_vm,
        // Set up early and failed: once more now, for the real error.
        Some(Err(_)) | None => prepare_kvm(&received.mem, received.config.machine.track_dirty_pages)?,
    };
    received.state.vm.restore(&vm)?;
    let saved = Saved {
        config: received.config.clone(),
        state: &received.state,
        mem: received.mem.clone(),
        backing: Backing::Anonymous,
        restored_from: None,
    };
    restore_devices_and_vcpus(saved, kvm, vm, events, event_manager, fds, seccomp)
}

/// Opens KVM, checks that its vCPU state fits what snapshots and migrations carry, creates a VM and
/// registers `mem` as its memory (with the dirty log if `log_dirty`): what a restored or migrated
/// VM needs before any state is applied.
pub fn prepare_kvm(
    mem: &GuestMemoryMmap,
    log_dirty: bool,
) -> Result<(kvm_ioctls::Kvm, kvm_ioctls::VmFd), BuildError> {
    let kvm = vm::open_kvm()?;
    crate::vstate::vcpu_state::check_xsave_size(&kvm).map_err(persist::SnapshotError::from)?;
    let vm = vm::create_vm(&kvm)?;
    memory::register_with_kvm(&vm, mem, log_dirty)?;
    Ok((kvm, vm))
}

/// A VM's saved state and the memory it goes with.
struct Saved<'a> {
    config: VmConfig,
    state: &'a persist::SnapshotState,
    mem: GuestMemoryMmap,
    backing: Backing,
    restored_from: Option<std::path::PathBuf>,
}

fn restore_devices_and_vcpus(
    saved: Saved<'_>,
    kvm: kvm_ioctls::Kvm,
    vm: kvm_ioctls::VmFd,
    events: &ProcessEvents,
    event_manager: &mut VmmEventManager,
    fds: &mut PassedFds,
    seccomp: SeccompMode,
) -> Result<Machine, BuildError> {
    let Saved {
        config,
        state,
        mem,
        backing,
        restored_from,
    } = saved;
    let serial = serial_output(&config.serial)?;
    let dirty = dirty_pages(&config, &mem);
    let device_ctx = device_context(&vm, &mem, events, Some(&state.devices.legacy), dirty.clone());
    let devices = device_manager::create_devices(
        &device_ctx,
        serial,
        &config.drives,
        &config.nets,
        config.machine.balloon.as_ref(),
        fds,
    )?;
    memory::apply_advice(&mem, config.machine.mergeable, config.machine.hugepages)?;
    persist::restore::apply_device_states(&devices, &state.devices)?;
    let vcpus = state
        .vcpus
        .iter()
        .enumerate()
        .map(|(i, saved)| Vcpu::restored(&vm, i as u8, saved))
        .collect::<Result<Vec<_>, _>>()?;
    let parts = Parts {
        config,
        kvm,
        vm,
        mem,
        backing,
        dirty,
        devices,
        vcpus,
        restored_from,
    };
    start_vcpu_threads(parts, events, event_manager, seccomp)
}

/// Starts one thread per vCPU (each waits, paused) and hands the VM to a [`Machine`].
fn start_vcpu_threads(
    parts: Parts,
    events: &ProcessEvents,
    event_manager: &mut VmmEventManager,
    seccomp: SeccompMode,
) -> Result<Machine, BuildError> {
    let Parts {
        config,
        kvm,
        vm,
        mem,
        backing,
        dirty,
        devices,
        vcpus,
        restored_from,
    } = parts;
    let msr_indices = crate::vstate::vcpu_state::msr_index_list(&kvm).unwrap_or_else(|e| {
        log::warn!("snapshots will not include MSRs: {e}");
        Vec::new()
    });
    for block in &devices.blocks {
        event_manager.add_subscriber(block.clone());
    }
    for net in &devices.nets {
        event_manager.add_subscriber(net.clone());
    }
    if let Some(balloon) = &devices.balloon {
        event_manager.add_subscriber(balloon.clone());
    }

    let ctx = ExitContext {
        pio: devices.pio,
        mmio: devices.mmio,
        exits: Arc::clone(&events.exits),
        process_start: events.process_start,
        guest_memory: mem.clone(),
        exit_counters: Arc::clone(&events.exit_counters),
        seccomp: SeccompFilter::build(ThreadCategory::Vcpu, seccomp)?,
        msr_indices: msr_indices.into(),
        throttle: Arc::clone(&events.throttle),
    };
    let mut vcpu_set = VcpuSet::new();
    for vcpu in vcpus {
        let index = vcpu.index();
        let channel = vcpu_set.channel(index);
        // The threads are never joined: the process exits once the VM has ended, which stops them.
        let thread = vcpu.start(ctx.clone(), channel)?;
        vcpu_set.started(index, thread);
    }
    // The VM fd must stay open for as long as the vCPUs run; the machine keeps it.
    let handles = MachineDevices {
        blocks: devices.blocks,
        nets: devices.nets,
        balloon: devices.balloon,
        legacy: devices.legacy,
    };
    Ok(Machine::new(
        config,
        KvmParts {
            vm,
            mem,
            backing,
            dirty,
            last_snapshot: restored_from,
        },
        vcpu_set,
        handles,
        Arc::clone(&events.exits),
    ))
}
