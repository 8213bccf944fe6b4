//! Legacy PC devices on the port I/O bus.

mod acpi_pm;
mod boot_timer;
mod i8042;
mod pvpanic;
mod rtc;
mod serial;

pub use acpi_pm::{AcpiPowerManagement, ACPI_RESET_VALUE, ACPI_SLEEP_TYPE_S5};
pub use boot_timer::{BootTimer, BOOT_TIMER_MAGIC};
pub use i8042::{I8042State, I8042};
pub use pvpanic::{PvPanic, PVPANIC_PANICKED};
pub use rtc::{CmosRtc, CmosState};
pub use serial::{SerialConsole, SerialConsoleState, SerialOutput};

/// Serves byte-wide registers only: wider accesses to legacy devices read as all ones and writes are
/// dropped, as on real hardware with no device decoding them.
fn single_byte(data: &[u8]) -> Option<u8> {
    match data {
        [b] => Some(*b),
        _ => None,
    }
}
