//! The linear recipe that turns a [`VmConfig`] into a running VM, and the loop that waits for its end.

use std::fs::File;
use std::path::Path;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

use devices::legacy::SerialOutput;
use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};
use vm_memory::GuestMemoryMmap;
use vmm_api::{SerialConfig, VmConfig};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::arch::host_quirks::{self, KvmFlavor};
use crate::arch::{acpi, boot, layout};
use crate::cli::RunOptions;
use crate::control::{ControlError, ControlServer, VmHandles};
use crate::device_manager::{self, DeviceError};
use crate::exit::{ExitEvents, ExitWatcher, VmExit};
use crate::seccomp::{SeccompError, SeccompFilter, ThreadCategory};
use crate::vstate::memory::{self, MemoryError};
use crate::vstate::vcpu::{ExitContext, ExitCounters, Vcpu, VcpuError, VcpuSetup};
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
    /// The control socket could not be set up.
    #[error(transparent)]
    Control(#[from] ControlError),
    /// A seccomp filter could not be built or installed.
    #[error(transparent)]
    Seccomp(#[from] SeccompError),
    /// The main event loop failed.
    #[error("event loop: {0}")]
    EventLoop(String),
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

/// Builds the VM described by `config`, runs it, and returns how it ended.
pub fn run_vm(config: &VmConfig, options: &RunOptions, process_start: Instant) -> Result<VmExit, BuildError> {
    let flavor = KvmFlavor::detect();
    let mut kernel_file = open("kernel", &config.boot.kernel)?;
    let mut initrd_file = config
        .boot
        .initrd
        .as_deref()
        .map(|p| open("initrd", p))
        .transpose()?;
    let serial = match &config.serial {
        SerialConfig::Stdout => SerialOutput::Stdout,
        SerialConfig::Off => SerialOutput::Sink,
        SerialConfig::File(path) => {
            SerialOutput::File(File::create(path).map_err(|source| BuildError::Open {
                what: "serial output file",
                path: path.display().to_string(),
                source,
            })?)
        }
    };

    let mem = memory::create_guest_memory(config.machine.memory_mib)?;
    // KVM's first memory slot costs milliseconds on some hosts, and loading kernel and initrd costs
    // page faults: split the work over two threads.
    let (kvm_side, kernel) = std::thread::scope(|scope| {
        let kvm_side = scope.spawn(|| -> Result<_, BuildError> {
            let kvm = vm::open_kvm()?;
            let vm = vm::create_vm(&kvm)?;
            memory::register_with_kvm(&vm, &mem)?;
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
    let exits = ExitEvents::new().map_err(DeviceError::EventFd)?;
    let guest_boot = Arc::new(OnceLock::new());
    let boot_event = EventFd::new(EFD_NONBLOCK).map_err(DeviceError::EventFd)?;
    let device_ctx = device_manager::DeviceContext {
        vm: &vm,
        mem: &mem,
        exits: &exits,
        process_start,
        guest_boot: Arc::clone(&guest_boot),
        boot_event: &boot_event,
    };
    let devices = device_manager::create_devices(&device_ctx, serial, &config.drives)?;
    write_boot_data(config, flavor, &mem, &kernel, initrd, &devices)?;
    // Only now: zeroing huge pages while loading the kernel would slow the VMM's start-up, while the
    // guest's own page faults benefit from them.
    memory::request_huge_pages(&mem);

    let setup = VcpuSetup {
        kvm: &kvm,
        mem: &mem,
        entry: kernel.entry,
        count: config.machine.vcpus,
    };
    let vcpus = (0..config.machine.vcpus)
        .map(|i| Vcpu::new(&vm, i, &setup))
        .collect::<Result<Vec<_>, _>>()?;

    let mut event_manager = EventManager::<Arc<Mutex<dyn MutEventSubscriber + Send>>>::new()
        .map_err(|e| BuildError::EventLoop(format!("{e:?}")))?;
    let watcher = Arc::new(Mutex::new(ExitWatcher::new(Arc::clone(&exits))));
    event_manager.add_subscriber(watcher.clone());
    for block in &devices.blocks {
        event_manager.add_subscriber(block.clone());
    }
    let exit_counters = Arc::new(ExitCounters::default());
    let control = match &options.api_sock {
        Some(path) => {
            let handles = VmHandles {
                config: config.clone(),
                process_start,
                blocks: devices.blocks.clone(),
                exits: Arc::clone(&exits),
                guest_boot,
                exit_counters: Arc::clone(&exit_counters),
                boot_event: boot_event.try_clone().map_err(DeviceError::EventFd)?,
            };
            let server = Arc::new(Mutex::new(ControlServer::bind(path, handles)?));
            event_manager.add_subscriber(server.clone());
            Some(server)
        }
        None => None,
    };

    let main_filter = SeccompFilter::build(ThreadCategory::MainLoop, options.seccomp)?;
    let ctx = ExitContext {
        pio: devices.pio,
        mmio: devices.mmio,
        exits,
        process_start,
        guest_memory: mem.clone(),
        exit_counters: Arc::clone(&exit_counters),
        seccomp: SeccompFilter::build(ThreadCategory::Vcpu, options.seccomp)?,
    };
    for vcpu in vcpus {
        // The threads are detached: the process exits once the VM has ended, which stops them.
        vcpu.start(ctx.clone())?;
    }
    // Only now: threads inherit their creator's filter, and the vCPUs have their own.
    main_filter.apply()?;

    loop {
        event_manager
            .run()
            .map_err(|e| BuildError::EventLoop(format!("{e:?}")))?;
        if let Some(exit) = watcher.lock().unwrap_or_else(|p| p.into_inner()).outcome() {
            log_device_counters(&devices.blocks);
            if let Some(server) = &control {
                let mut server = server.lock().unwrap_or_else(|p| p.into_inner());
                server.announce_exit(exit.to_string(), exit.exit_code());
                server.remove_socket();
            }
            return Ok(exit.clone());
        }
    }
}

/// Logs each drive's counters (at `info`): what the VM did, for whoever runs the VMM by hand.
fn log_device_counters(blocks: &[device_manager::BlockHandle]) {
    for block in blocks {
        let transport = block.lock().unwrap_or_else(|p| p.into_inner());
        let m = transport.device().metrics().snapshot();
        log::info!(
            "drive {}: reads={} writes={} flushes={} discards={} get_ids={} read_bytes={} write_bytes={} \
             invalid_requests={} io_errors={} throttled={} queue_events={} interrupts={}",
            transport.device().id(),
            m.reads,
            m.writes,
            m.flushes,
            m.discards,
            m.get_ids,
            m.read_bytes,
            m.write_bytes,
            m.invalid_requests,
            m.io_errors,
            m.throttled,
            m.queue_events,
            m.interrupts
        );
    }
}
