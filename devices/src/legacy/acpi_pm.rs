//! HW-reduced ACPI power management: the sleep control register (power off through S5) and the reset
//! register, both advertised in the FADT.

use crate::bus::BusDevice;
use crate::EventSignal;

/// `SLP_TYP` the DSDT's `\_S5` package tells the guest to use for soft-off.
pub const ACPI_SLEEP_TYPE_S5: u8 = 5;
/// The value the FADT tells the guest to write to the reset register.
pub const ACPI_RESET_VALUE: u8 = 1;

const SLEEP_ENABLE: u8 = 1 << 5;
const SLEEP_TYPE_SHIFT: u8 = 2;
const SLEEP_TYPE_MASK: u8 = 0b111;

/// Two byte-wide registers: offset 0 is the sleep control register, offset 1 the reset register.
pub struct AcpiPowerManagement {
    power_off: EventSignal,
    reset: EventSignal,
}

impl AcpiPowerManagement {
    /// Offset of the sleep control (and status) register.
    pub const SLEEP_CONTROL_OFFSET: u64 = 0;
    /// Offset of the reset register.
    pub const RESET_OFFSET: u64 = 1;
    /// Number of ports the device spans.
    pub const LEN: u64 = 2;

    /// A device raising `power_off` on an S5 request and `reset` on a reset write.
    pub fn new(power_off: EventSignal, reset: EventSignal) -> Self {
        AcpiPowerManagement { power_off, reset }
    }
}

impl BusDevice for AcpiPowerManagement {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Some(&value) = data.first() else { return };
        match offset {
            Self::SLEEP_CONTROL_OFFSET => {
                let sleep_type = (value >> SLEEP_TYPE_SHIFT) & SLEEP_TYPE_MASK;
                if value & SLEEP_ENABLE != 0 && sleep_type == ACPI_SLEEP_TYPE_S5 {
                    self.power_off.raise();
                }
            }
            Self::RESET_OFFSET if value == ACPI_RESET_VALUE => self.reset.raise(),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

    use super::*;

    #[test]
    fn s5_and_reset_raise_their_events_only() {
        let off = EventFd::new(EFD_NONBLOCK).unwrap();
        let reset = EventFd::new(EFD_NONBLOCK).unwrap();
        let mut pm = AcpiPowerManagement::new(
            EventSignal::new(off.try_clone().unwrap()),
            EventSignal::new(reset.try_clone().unwrap()),
        );
        // S3 request and a bare SLP_TYP without SLP_EN do nothing.
        pm.write(0, &[(3 << 2) | SLEEP_ENABLE]);
        pm.write(0, &[ACPI_SLEEP_TYPE_S5 << 2]);
        pm.write(1, &[0x42]);
        pm.write(0, &[]);
        assert!(off.read().is_err());
        assert!(reset.read().is_err());
        pm.write(0, &[(ACPI_SLEEP_TYPE_S5 << 2) | SLEEP_ENABLE]);
        assert_eq!(off.read().unwrap(), 1);
        pm.write(1, &[ACPI_RESET_VALUE]);
        assert_eq!(reset.read().unwrap(), 1);
    }
}
