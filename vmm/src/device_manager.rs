//! Creates the legacy devices and places them on the buses.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use devices::bus::{Bus, BusDevice, BusError};
use devices::legacy::{AcpiPowerManagement, BootTimer, CmosRtc, PvPanic, SerialConsole, SerialOutput, I8042};
use devices::{EventSignal, IrqLine};
use kvm_ioctls::VmFd;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::arch::layout::{irqs, ports};
use crate::exit::ExitEvents;

/// Errors setting up devices.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// Creating or cloning an eventfd failed.
    #[error("eventfd: {0}")]
    EventFd(std::io::Error),
    /// KVM refused an irqfd.
    #[error("KVM_IRQFD for GSI {0} failed: {1}")]
    Irqfd(u32, kvm_ioctls::Error),
    /// Two devices claim the same addresses.
    #[error("device layout: {0}")]
    Bus(#[from] BusError),
}

/// The buses with every device of the VM attached.
pub struct Devices {
    /// Port I/O bus.
    pub pio: Arc<Bus>,
    /// MMIO bus (virtio devices attach here).
    pub mmio: Arc<Bus>,
}

/// Builds the legacy PC devices: COM1, i8042, CMOS RTC, boot timer, pvpanic and ACPI PM registers.
pub fn create_devices(
    vm: &VmFd,
    exits: &ExitEvents,
    serial: SerialOutput,
    process_start: Instant,
) -> Result<Devices, DeviceError> {
    let signal = |evt: &EventFd| {
        evt.try_clone()
            .map(EventSignal::new)
            .map_err(DeviceError::EventFd)
    };

    let serial_irq = EventFd::new(EFD_NONBLOCK).map_err(DeviceError::EventFd)?;
    vm.register_irqfd(&serial_irq, irqs::COM1)
        .map_err(|e| DeviceError::Irqfd(irqs::COM1, e))?;

    let boot_timer = BootTimer::new(
        process_start,
        Box::new(|elapsed| eprintln!("vmm: guest booted in {} ms", elapsed.as_millis())),
    );

    let mut pio = Bus::new();
    let mut add = |device: Arc<Mutex<dyn BusDevice>>, base: u64, len: u64| pio.insert(device, base, len);
    add(
        shared(SerialConsole::new(IrqLine::new(serial_irq), serial)),
        ports::COM1,
        8,
    )?;
    add(shared(I8042::new(signal(&exits.reset)?)), ports::I8042, 5)?;
    add(shared(CmosRtc::new()), ports::RTC, 2)?;
    add(shared(boot_timer), ports::BOOT_TIMER, 1)?;
    add(shared(PvPanic::new(signal(&exits.panic)?)), ports::PVPANIC, 1)?;
    let pm = AcpiPowerManagement::new(signal(&exits.power_off)?, signal(&exits.reset)?);
    add(shared(pm), ports::ACPI_PM, AcpiPowerManagement::LEN)?;

    Ok(Devices {
        pio: Arc::new(pio),
        mmio: Arc::new(Bus::new()),
    })
}

fn shared<D: BusDevice + 'static>(device: D) -> Arc<Mutex<dyn BusDevice>> {
    Arc::new(Mutex::new(device))
}
