//! The pvpanic device (I/O port variant, ACPI id `QEMU0001`): the guest kernel writes to it when it
//! panics, so the VMM can exit with an error instead of idling forever.

use crate::bus::BusDevice;
use crate::EventSignal;

/// Bit the guest sets when it has panicked.
pub const PVPANIC_PANICKED: u8 = 1 << 0;
/// Bit the guest sets when a crash kernel has been loaded (informational).
const PVPANIC_CRASH_LOADED: u8 = 1 << 1;

/// One-byte device: reads advertise the supported events, writes report them.
pub struct PvPanic {
    panicked: EventSignal,
}

impl PvPanic {
    /// A device raising `panicked` when the guest reports a panic.
    pub fn new(panicked: EventSignal) -> Self {
        PvPanic { panicked }
    }
}

impl BusDevice for PvPanic {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
        if let Some(b) = data.first_mut() {
            *b = PVPANIC_PANICKED | PVPANIC_CRASH_LOADED;
        }
    }

    fn write(&mut self, _offset: u64, data: &[u8]) {
        if data.first().is_some_and(|b| b & PVPANIC_PANICKED != 0) {
            self.panicked.raise();
        }
    }
}
