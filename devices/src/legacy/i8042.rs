//! The i8042 keyboard controller, present so that the guest can reset the machine through it
//! (`reboot=k`, the CPU-reset command 0xfe on port 0x64).

use vm_superio::I8042Device;

use super::single_byte;
use crate::bus::BusDevice;
use crate::EventSignal;

/// i8042 spanning ports 0x60..=0x64 (offset 0 is the data port, offset 4 the command/status port).
pub struct I8042 {
    inner: I8042Device<EventSignal>,
}

impl I8042 {
    /// A controller that raises `reset` when the guest pulses the CPU reset line.
    pub fn new(reset: EventSignal) -> Self {
        I8042 {
            inner: I8042Device::new(reset),
        }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match data {
            [b] => *b = self.inner.read(offset as u8),
            _ => data.fill(0xff),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let Some(value) = single_byte(data) {
            if let Err(e) = self.inner.write(offset as u8, value) {
                log::warn!("i8042 reset signal failed: {e:?}");
            }
        }
    }
}
