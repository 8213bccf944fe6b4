//! 16550A UART (COM1) whose output goes to stdout, a file, or nowhere.

use std::fs::File;
use std::io::{self, Write};

use vm_superio::serial::NoEvents;
use vm_superio::Serial;

use super::single_byte;
use crate::bus::BusDevice;
use crate::IrqLine;

/// Where the guest's serial output goes.
pub enum SerialOutput {
    /// The VMM's standard output.
    Stdout,
    /// A file, created or truncated at start.
    File(File),
    /// Discarded.
    Sink,
}

/// The writer behind the UART. Errors writing (a closed stdout, a full disk) drop output rather than
/// stall or stop the guest.
struct ConsoleWriter(SerialOutput);

impl Write for ConsoleWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let _ = match &mut self.0 {
            SerialOutput::Stdout => io::stdout().lock().write_all(buf),
            SerialOutput::File(f) => f.write_all(buf),
            SerialOutput::Sink => Ok(()),
        };
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        let _ = match &mut self.0 {
            SerialOutput::Stdout => io::stdout().lock().flush(),
            SerialOutput::File(f) => f.flush(),
            SerialOutput::Sink => Ok(()),
        };
        Ok(())
    }
}

/// The guest's serial console, a [`BusDevice`] spanning the UART's 8 registers.
pub struct SerialConsole {
    uart: Serial<IrqLine, NoEvents, ConsoleWriter>,
}

impl SerialConsole {
    /// A UART raising `irq` and writing to `output`.
    pub fn new(irq: IrqLine, output: SerialOutput) -> Self {
        SerialConsole {
            uart: Serial::new(irq, ConsoleWriter(output)),
        }
    }
}

impl BusDevice for SerialConsole {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match data {
            [b] => *b = self.uart.read(offset as u8),
            _ => data.fill(0xff),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let Some(value) = single_byte(data) {
            if let Err(e) = self.uart.write(offset as u8, value) {
                log::debug!("serial write failed: {e:?}");
            }
        }
    }
}
