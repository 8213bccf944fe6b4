//! Creates the devices and places them on the buses.

use std::collections::HashMap;
use std::fs::File;
use std::os::fd::OwnedFd;
use std::sync::OnceLock;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use devices::bus::{Bus, BusDevice, BusError};
use devices::legacy::{
    AcpiPowerManagement, BootTimer, CmosRtc, CmosState, I8042State, PvPanic, SerialConsole,
    SerialConsoleState, SerialOutput, I8042,
};
use devices::rate_limiter::{RateLimiter, RateLimiterError};
use devices::virtio::balloon::{Balloon, BalloonError, BalloonSpec};
use devices::virtio::block::{Block, BlockError, BlockSpec, DiskImage, EngineKind};
use devices::virtio::dirty::DirtyPages;
use devices::virtio::mmio::{MmioTransport, MMIO_WINDOW_SIZE, QUEUE_NOTIFY_OFFSET};
use devices::virtio::net::{Net, NetError, NetSpec, Tap, TapError};
use devices::virtio::{Interrupt, VirtioDevice};
use devices::{EventSignal, IrqLine};
use kvm_ioctls::{IoEventAddress, VmFd};
use vm_memory::GuestMemoryMmap;
use vmm_api::{BalloonConfig, CacheMode, DriveConfig, IoEngine, NetConfig, RateLimiterConfig};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::arch::acpi::VirtioMmioDevice;
use crate::arch::layout::{irqs, ports, VIRTIO_MMIO_BASE};
use crate::exit::ExitEvents;
use crate::sync::lock;

/// Errors setting up devices.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// Creating or cloning an eventfd failed.
    #[error("eventfd: {0}")]
    EventFd(std::io::Error),
    /// KVM refused an irqfd.
    #[error("KVM_IRQFD for GSI {0} failed: {1}")]
    Irqfd(u32, kvm_ioctls::Error),
    /// KVM refused an ioeventfd.
    #[error("KVM_IOEVENTFD at {0:#x} failed: {1}")]
    Ioeventfd(u64, kvm_ioctls::Error),
    /// Two devices claim the same addresses.
    #[error("device layout: {0}")]
    Bus(#[from] BusError),
    /// A NIC could not be set up.
    #[error("NIC {id}: {source}")]
    Net {
        /// The NIC.
        id: String,
        /// Why.
        source: NicError,
    },
    /// More virtio devices than interrupt lines.
    #[error("too many virtio devices: at most {0}")]
    TooManyVirtioDevices(usize),
    /// A saved device state is unusable.
    #[error("saved device state: {0}")]
    State(String),
    /// The balloon could not be set up.
    #[error("balloon: {0}")]
    Balloon(#[from] BalloonError),
    /// A drive could not be set up.
    #[error("drive {id}: {source}")]
    Drive {
        /// The drive.
        id: String,
        /// Why.
        source: DriveError,
    },
}

/// Why one drive could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum DriveError {
    /// Image or device creation failed.
    #[error(transparent)]
    Block(#[from] BlockError),
    /// The drive names a file descriptor nobody passed.
    #[error(transparent)]
    MissingFd(#[from] MissingFd),
    /// The rate limiter could not be created.
    #[error("rate limiter: {0}")]
    RateLimiter(#[from] RateLimiterError),
}

/// Why one NIC could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum NicError {
    /// The tap could not be opened or is not usable.
    #[error(transparent)]
    Tap(#[from] TapError),
    /// The device refused its configuration.
    #[error(transparent)]
    Device(#[from] NetError),
    /// A rate limiter could not be created.
    #[error("rate limiter: {0}")]
    RateLimiter(#[from] RateLimiterError),
    /// The NIC names a file descriptor nobody passed.
    #[error(transparent)]
    MissingFd(#[from] MissingFd),
}

/// A virtio-net NIC as the rest of the VMM holds it.
pub type NetHandle = Arc<Mutex<MmioTransport<Net>>>;

/// A virtio-blk drive as the rest of the VMM holds it.
pub type BlockHandle = Arc<Mutex<MmioTransport<Block>>>;

/// The virtio-balloon as the rest of the VMM holds it.
pub type BalloonHandle = Arc<Mutex<MmioTransport<Balloon>>>;

/// The i8042 as the VMM holds it (to type Ctrl-Alt-Del).
pub type KeyboardHandle = Arc<Mutex<I8042>>;

/// The legacy devices with state worth a snapshot.
#[derive(Clone)]
pub struct LegacyHandles {
    /// COM1.
    pub serial: Arc<Mutex<SerialConsole>>,
    /// The keyboard controller.
    pub keyboard: KeyboardHandle,
    /// The CMOS RTC.
    pub rtc: Arc<Mutex<CmosRtc>>,
}

/// File descriptors passed over the control socket (`add-fds`) or inherited at launch (`--fd`), by
/// name, until a device takes them.
pub type PassedFds = HashMap<String, OwnedFd>;

/// A configuration names a file descriptor nobody passed.
#[derive(Debug, thiserror::Error)]
#[error("no file descriptor named {0:?} was passed (add-fds or --fd)")]
pub struct MissingFd(pub String);

/// Takes the descriptor passed as `name`.
pub fn take_fd(fds: &mut PassedFds, name: &str) -> Result<OwnedFd, MissingFd> {
    fds.remove(name).ok_or_else(|| MissingFd(name.to_string()))
}

/// The buses with every device of the VM attached.
pub struct Devices {
    /// Port I/O bus.
    pub pio: Arc<Bus>,
    /// MMIO bus (virtio devices).
    pub mmio: Arc<Bus>,
    /// The drives, in guest order (`/dev/vda` first).
    pub blocks: Vec<BlockHandle>,
    /// The NICs, in guest order (`eth0` first).
    pub nets: Vec<NetHandle>,
    /// The balloon, if configured.
    pub balloon: Option<BalloonHandle>,
    /// The serial console, keyboard controller and RTC.
    pub legacy: LegacyHandles,
    /// The virtio-mmio devices, for the ACPI tables.
    pub virtio: Vec<VirtioMmioDevice>,
    /// Kernel command line words the devices need (the root drive).
    pub cmdline_args: Vec<String>,
}

/// Builds the legacy PC devices: COM1, i8042, CMOS RTC, boot timer, pvpanic and ACPI PM registers.
fn legacy_devices(ctx: &DeviceContext, serial: SerialOutput) -> Result<(Bus, LegacyHandles), DeviceError> {
    let (vm, exits) = (ctx.vm, ctx.exits);
    let signal = |evt: &EventFd| {
        evt.try_clone()
            .map(EventSignal::new)
            .map_err(DeviceError::EventFd)
    };

    let irq_line = |gsi: u32| -> Result<IrqLine, DeviceError> {
        let evt = EventFd::new(EFD_NONBLOCK).map_err(DeviceError::EventFd)?;
        vm.register_irqfd(&evt, gsi)
            .map_err(|e| DeviceError::Irqfd(gsi, e))?;
        Ok(IrqLine::new(evt))
    };

    let guest_boot = Arc::clone(&ctx.guest_boot);
    let boot_event = ctx.boot_event.try_clone().map_err(DeviceError::EventFd)?;
    let boot_timer = BootTimer::new(
        ctx.process_start,
        Box::new(move |elapsed| {
            eprintln!("vmm: guest booted in {} ms", elapsed.as_millis());
            // The boot timer calls this once, so the cell is always empty here.
            let _ = guest_boot.set(elapsed);
            if let Err(e) = boot_event.write(1) {
                log::warn!("cannot signal guest boot: {e}");
            }
        }),
    );

    let mut pio = Bus::new();
    let mut add = |device: Arc<Mutex<dyn BusDevice>>, base: u64, len: u64| pio.insert(device, base, len);
    let com1 = irq_line(irqs::COM1)?;
    let serial = Arc::new(Mutex::new(match ctx.restore.map(|r| &r.serial) {
        Some(state) => SerialConsole::from_state(com1, serial, state).map_err(DeviceError::State)?,
        None => SerialConsole::new(com1, serial),
    }));
    add(serial.clone(), ports::COM1, 8)?;
    let mut i8042 = I8042::new(signal(&exits.reset)?, irq_line(irqs::KEYBOARD)?);
    let mut cmos = CmosRtc::new();
    if let Some(state) = ctx.restore {
        i8042.restore_state(&state.keyboard);
        cmos.restore_state(&state.rtc).map_err(DeviceError::State)?;
    }
    let keyboard = Arc::new(Mutex::new(i8042));
    add(keyboard.clone(), ports::I8042, 5)?;
    let rtc = Arc::new(Mutex::new(cmos));
    add(rtc.clone(), ports::RTC, 2)?;
    add(shared(boot_timer), ports::BOOT_TIMER, 1)?;
    add(shared(PvPanic::new(signal(&exits.panic)?)), ports::PVPANIC, 1)?;
    let pm = AcpiPowerManagement::new(signal(&exits.power_off)?, signal(&exits.reset)?);
    add(shared(pm), ports::ACPI_PM, AcpiPowerManagement::LEN)?;
    Ok((
        pio,
        LegacyHandles {
            serial,
            keyboard,
            rtc,
        },
    ))
}

/// Everything the devices need from the VM being built.
pub struct DeviceContext<'a> {
    /// The KVM VM (irqfds, ioeventfds).
    pub vm: &'a VmFd,
    /// Guest memory, for virtio queues.
    pub mem: &'a GuestMemoryMmap,
    /// Events that end the VM.
    pub exits: &'a ExitEvents,
    /// When the VMM started (boot timer).
    pub process_start: Instant,
    /// Where the boot timer records the guest's boot time.
    pub guest_boot: Arc<OnceLock<Duration>>,
    /// Raised by the boot timer once the guest has booted.
    pub boot_event: &'a EventFd,
    /// The saved legacy device state, when restoring a snapshot.
    pub restore: Option<&'a LegacyState>,
    /// Where virtio devices mark the guest pages they write, if the VM tracks them.
    pub dirty: Option<Arc<DirtyPages>>,
}

/// The legacy devices' saved state.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct LegacyState {
    /// COM1.
    pub serial: SerialConsoleState,
    /// The keyboard controller.
    pub keyboard: I8042State,
    /// The CMOS RTC.
    pub rtc: CmosState,
}

impl LegacyHandles {
    /// The devices' state (the VM must be paused).
    pub fn save(&self) -> LegacyState {
        LegacyState {
            serial: lock(&self.serial).save_state(),
            keyboard: lock(&self.keyboard).save_state(),
            rtc: lock(&self.rtc).save_state(),
        }
    }
}

/// Creates every device of the VM.
pub fn create_devices(
    ctx: &DeviceContext,
    serial: SerialOutput,
    drives: &[DriveConfig],
    nets: &[NetConfig],
    balloon: Option<&BalloonConfig>,
    fds: &mut PassedFds,
) -> Result<Devices, DeviceError> {
    let (pio, legacy) = legacy_devices(ctx, serial)?;
    let mut virtio = VirtioSlots::new();
    let mut blocks = Vec::with_capacity(drives.len());
    // The root drive goes first so that it is /dev/vda.
    let ordered = drives
        .iter()
        .filter(|d| d.root)
        .chain(drives.iter().filter(|d| !d.root));
    for drive in ordered {
        let block = create_block(drive, fds).map_err(|source| DeviceError::Drive {
            id: drive.id.clone(),
            source,
        })?;
        blocks.push(virtio.attach(ctx, block)?);
    }
    let mut nics = Vec::with_capacity(nets.len());
    for net in nets {
        let nic = create_net(net, fds).map_err(|source| DeviceError::Net {
            id: net.id.clone(),
            source,
        })?;
        nics.push(virtio.attach(ctx, nic)?);
    }
    // After drives and NICs, so that their windows and interrupts stay where they always were.
    let balloon = balloon
        .map(|b| {
            let device = Balloon::new(BalloonSpec {
                target_pages: b.target_pages(),
                deflate_on_oom: b.deflate_on_oom,
                stats_interval_s: b.stats_interval_s,
                free_page_reporting: b.free_page_reporting,
            })?;
            virtio.attach(ctx, device)
        })
        .transpose()?;
    let mut cmdline_args = Vec::new();
    if let Some(root) = drives.iter().find(|d| d.root) {
        cmdline_args.push("root=/dev/vda".into());
        cmdline_args.push(if root.read_only { "ro" } else { "rw" }.into());
    }
    Ok(Devices {
        pio: Arc::new(pio),
        mmio: Arc::new(virtio.bus),
        blocks,
        nets: nics,
        balloon,
        legacy,
        virtio: virtio.described,
        cmdline_args,
    })
}

fn create_block(drive: &DriveConfig, fds: &mut PassedFds) -> Result<Block, DriveError> {
    let direct = drive.cache == CacheMode::None;
    let disk = match &drive.fd {
        Some(name) => {
            let fd = take_fd(fds, name)?;
            DiskImage::from_file(File::from(fd), name, drive.read_only)
        }
        None => DiskImage::open(&drive.path, drive.read_only, direct),
    }
    .and_then(|disk| match &drive.backing {
        Some(base) => disk.with_backing(base),
        None => Ok(disk),
    })
    .map_err(BlockError::from)?;
    let rate_limiter = match &drive.rate_limiter {
        Some(limits) => RateLimiter::new(limits)?,
        None => RateLimiter::unlimited()?,
    };
    let block = Block::new(BlockSpec {
        id: drive.id.clone(),
        disk,
        serial: drive.serial().to_string(),
        engine: match drive.engine {
            IoEngine::Uring => EngineKind::Uring,
            IoEngine::Sync => EngineKind::Sync,
        },
        rate_limiter,
    })?;
    Ok(block)
}

fn create_net(net: &NetConfig, fds: &mut PassedFds) -> Result<Net, NicError> {
    let tap = match (&net.fd, &net.tap) {
        (Some(name), _) => {
            let fd = take_fd(fds, name)?;
            Tap::from_fd(fd)?
        }
        // Validation guarantees one of the two.
        (None, tap) => Tap::open(tap.as_deref().unwrap_or_default())?,
    };
    let limiter = |limits: &Option<RateLimiterConfig>| match limits {
        Some(limits) => RateLimiter::new(limits),
        None => RateLimiter::unlimited(),
    };
    Ok(Net::new(NetSpec {
        id: net.id.clone(),
        tap: Box::new(tap),
        mac: net.mac().0,
        rx_rate_limiter: limiter(&net.rx_rate_limiter)?,
        tx_rate_limiter: limiter(&net.tx_rate_limiter)?,
    })?)
}

/// Hands out MMIO windows and interrupt lines to virtio devices.
struct VirtioSlots {
    bus: Bus,
    next: usize,
    described: Vec<VirtioMmioDevice>,
}

impl VirtioSlots {
    fn new() -> Self {
        VirtioSlots {
            bus: Bus::new(),
            next: 0,
            described: Vec::new(),
        }
    }

    /// Wires `device` to its own window and interrupt line: an irqfd for its interrupt and an
    /// ioeventfd per queue on the QueueNotify register; records it for the DSDT.
    fn attach<D: VirtioDevice + 'static>(
        &mut self,
        ctx: &DeviceContext,
        device: D,
    ) -> Result<Arc<Mutex<MmioTransport<D>>>, DeviceError> {
        let gsi = *irqs::VIRTIO
            .get(self.next)
            .ok_or(DeviceError::TooManyVirtioDevices(irqs::VIRTIO.len()))?;
        let base = VIRTIO_MMIO_BASE + self.next as u64 * MMIO_WINDOW_SIZE;
        let irqfd = EventFd::new(EFD_NONBLOCK).map_err(DeviceError::EventFd)?;
        ctx.vm
            .register_irqfd(&irqfd, gsi)
            .map_err(|e| DeviceError::Irqfd(gsi, e))?;
        let notify = base + QUEUE_NOTIFY_OFFSET;
        for (index, evt) in device.queue_events().iter().enumerate() {
            ctx.vm
                .register_ioevent(evt, &IoEventAddress::Mmio(notify), index as u32)
                .map_err(|e| DeviceError::Ioeventfd(notify, e))?;
        }
        self.described.push(VirtioMmioDevice {
            base,
            len: MMIO_WINDOW_SIZE,
            gsi,
        });
        let mut transport = MmioTransport::new(device, ctx.mem.clone(), Arc::new(Interrupt::new(irqfd)));
        if let Some(dirty) = &ctx.dirty {
            transport.track_dirty_pages(Arc::clone(dirty));
        }
        let handle = Arc::new(Mutex::new(transport));
        self.bus.insert(handle.clone(), base, MMIO_WINDOW_SIZE)?;
        self.next += 1;
        Ok(handle)
    }
}

fn shared<D: BusDevice + 'static>(device: D) -> Arc<Mutex<dyn BusDevice>> {
    Arc::new(Mutex::new(device))
}
