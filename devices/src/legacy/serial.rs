//! 16550A UART (COM1) whose output goes to stdout, a file, or nowhere.

use std::fs::File;
use std::io::{self, Write};

use serde::{Deserialize, Serialize};
use vm_superio::serial::{NoEvents, SerialState};
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

/// The UART's registers and receive buffer, for snapshots.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SerialConsoleState {
    baud_divisor_low: u8,
    baud_divisor_high: u8,
    interrupt_enable: u8,
    interrupt_identification: u8,
    line_control: u8,
    line_status: u8,
    modem_control: u8,
    modem_status: u8,
    scratch: u8,
    in_buffer: Vec<u8>,
}

impl SerialConsole {
    /// A UART raising `irq` and writing to `output`.
    pub fn new(irq: IrqLine, output: SerialOutput) -> Self {
        SerialConsole {
            uart: Serial::new(irq, ConsoleWriter(output)),
        }
    }

    /// A UART in a saved state. The state file is input: vm-superio checks the buffer's size.
    pub fn from_state(
        irq: IrqLine,
        output: SerialOutput,
        state: &SerialConsoleState,
    ) -> Result<Self, String> {
        let s = SerialState {
            baud_divisor_low: state.baud_divisor_low,
            baud_divisor_high: state.baud_divisor_high,
            interrupt_enable: state.interrupt_enable,
            interrupt_identification: state.interrupt_identification,
            line_control: state.line_control,
            line_status: state.line_status,
            modem_control: state.modem_control,
            modem_status: state.modem_status,
            scratch: state.scratch,
            in_buffer: state.in_buffer.clone(),
        };
        let uart = Serial::from_state(&s, irq, NoEvents, ConsoleWriter(output))
            .map_err(|e| format!("serial state: {e:?}"))?;
        Ok(SerialConsole { uart })
    }

    /// The registers and receive buffer.
    pub fn save_state(&self) -> SerialConsoleState {
        let s = self.uart.state();
        SerialConsoleState {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
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
