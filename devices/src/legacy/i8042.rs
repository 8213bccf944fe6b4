//! The i8042 keyboard controller with an AT keyboard behind it and no AUX (mouse) port.
//!
//! It exists for two things: the guest resets the machine through it (`reboot=k`, the CPU-reset
//! command 0xfe on port 0x64), and the VMM asks the guest to shut down gracefully by typing
//! Ctrl-Alt-Del on its keyboard ([`I8042::ctrl_alt_del`]), as a person at the console would.
//!
//! The model answers every probe of Linux's i8042 and atkbd drivers at once, so that a guest spends
//! no time in their timeouts: controller self-test and interface test pass, the AUX loopback and
//! AUX interface test report a broken mouse port (so the driver gives up on it immediately), and
//! the keyboard acknowledges every command byte. Keyboard bytes raise IRQ 1 when the guest has
//! enabled the keyboard interrupt; replies to controller commands are polled by drivers and raise
//! nothing. The guest controls nothing here beyond a few bits of state and a bounded queue.

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};

use super::single_byte;
use crate::bus::BusDevice;
use crate::{EventSignal, IrqLine};

/// Offset of the data port (0x60) in the device's port range.
const DATA: u64 = 0;
/// Offset of the status (read) / command (write) port (0x64).
const COMMAND: u64 = 4;

// Status register bits.
const STATUS_OUTPUT_FULL: u8 = 0x01;
const STATUS_SYSTEM_FLAG: u8 = 0x04;
const STATUS_LAST_WAS_COMMAND: u8 = 0x08;
const STATUS_KEYLOCK_OFF: u8 = 0x10;

// Controller configuration byte ("command byte") bits.
const CTR_KBD_INT: u8 = 0x01;
const CTR_SYSTEM_FLAG: u8 = 0x04;
const CTR_KBD_DISABLED: u8 = 0x10;
const CTR_AUX_DISABLED: u8 = 0x20;
const CTR_TRANSLATE: u8 = 0x40;
/// After reset: keyboard interrupt on, POST passed, no translation (Linux then uses scan code set 2
/// directly), AUX disabled.
const CTR_DEFAULT: u8 = CTR_KBD_INT | CTR_SYSTEM_FLAG | CTR_AUX_DISABLED;

// Controller commands.
const CMD_READ_CTR: u8 = 0x20;
const CMD_WRITE_CTR: u8 = 0x60;
const CMD_AUX_DISABLE: u8 = 0xa7;
const CMD_AUX_ENABLE: u8 = 0xa8;
const CMD_AUX_TEST: u8 = 0xa9;
const CMD_SELF_TEST: u8 = 0xaa;
const CMD_KBD_TEST: u8 = 0xab;
const CMD_KBD_DISABLE: u8 = 0xad;
const CMD_KBD_ENABLE: u8 = 0xae;
const CMD_READ_OUTPUT_PORT: u8 = 0xd0;
const CMD_WRITE_OUTPUT_PORT: u8 = 0xd1;
const CMD_WRITE_KBD_BUFFER: u8 = 0xd2;
const CMD_WRITE_AUX_BUFFER: u8 = 0xd3;
const CMD_WRITE_AUX: u8 = 0xd4;
/// 0xf0-0xff pulse the output port lines whose bits are clear in the low nibble; bit 0 is reset.
const CMD_PULSE_FIRST: u8 = 0xf0;

const SELF_TEST_OK: u8 = 0x55;
const KBD_TEST_OK: u8 = 0x00;
/// AUX interface test result "clock line stuck low": there is no mouse port.
const AUX_TEST_NO_PORT: u8 = 0x01;
/// Output port: reset line high (not asserted) and A20 enabled.
const OUTPUT_PORT_DEFAULT: u8 = 0x03;
const OUTPUT_PORT_RESET_HIGH: u8 = 0x01;

// Keyboard commands and replies.
const KBD_SET_LEDS: u8 = 0xed;
const KBD_ECHO: u8 = 0xee;
const KBD_SCAN_CODE_SET: u8 = 0xf0;
const KBD_IDENTIFY: u8 = 0xf2;
const KBD_TYPEMATIC: u8 = 0xf3;
const KBD_ENABLE: u8 = 0xf4;
const KBD_DISABLE: u8 = 0xf5;
const KBD_DEFAULTS: u8 = 0xf6;
const KBD_RESET: u8 = 0xff;
const KBD_ACK: u8 = 0xfa;
const KBD_SELF_TEST_PASSED: u8 = 0xaa;
const KBD_ID: [u8; 2] = [0xab, 0x83];
const KBD_SCAN_CODE_SET_2: u8 = 0x02;

/// Ctrl, Alt and Delete pressed, then released: scan code set 2, as the keyboard sends them.
const CTRL_ALT_DEL_SET2: [u8; 11] = [0x14, 0x11, 0xe0, 0x71, 0xe0, 0xf0, 0x71, 0xf0, 0x11, 0xf0, 0x14];
/// The same keys in scan code set 1, what the controller delivers when the guest enabled translation.
const CTRL_ALT_DEL_SET1: [u8; 8] = [0x1d, 0x38, 0xe0, 0x53, 0xe0, 0xd3, 0xb8, 0x9d];

/// Bytes waiting for the guest; more than any reply or key sequence needs, so the guest cannot grow
/// it by writing commands without reading (the oldest bytes are kept, later ones dropped).
const QUEUE_LIMIT: usize = 16;
const _: () = assert!(CTRL_ALT_DEL_SET2.len() <= QUEUE_LIMIT);

/// Where a byte in the output queue came from: keyboard bytes interrupt, controller replies do not.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Source {
    Controller,
    Keyboard,
}

/// What the next byte written to the data port is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum DataTarget {
    Keyboard,
    ControllerConfig,
    OutputPort,
    KeyboardBuffer,
    AuxBuffer,
    Aux,
    /// The parameter of a keyboard command (LEDs, typematic rate, scan code set).
    KeyboardParameter(u8),
}

/// i8042 spanning ports 0x60..=0x64 (offset 0 is the data port, offset 4 the command/status port).
pub struct I8042 {
    reset: EventSignal,
    irq: IrqLine,
    ctr: u8,
    output_port: u8,
    last_was_command: bool,
    next_data: DataTarget,
    queue: VecDeque<(u8, Source)>,
    scanning: bool,
}

/// The controller's and keyboard's registers, for snapshots.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct I8042State {
    ctr: u8,
    output_port: u8,
    last_was_command: bool,
    next_data: DataTarget,
    queue: Vec<(u8, Source)>,
    scanning: bool,
}

impl I8042 {
    /// The registers and queued bytes.
    pub fn save_state(&self) -> I8042State {
        I8042State {
            ctr: self.ctr,
            output_port: self.output_port,
            last_was_command: self.last_was_command,
            next_data: self.next_data,
            queue: self.queue.iter().copied().collect(),
            scanning: self.scanning,
        }
    }

    /// Takes the saved registers; a saved queue longer than the controller's is cut to its size
    /// (the state file is input).
    pub fn restore_state(&mut self, state: &I8042State) {
        self.ctr = state.ctr;
        self.output_port = state.output_port;
        self.last_was_command = state.last_was_command;
        self.next_data = state.next_data;
        self.queue = state.queue.iter().copied().take(QUEUE_LIMIT).collect();
        self.scanning = state.scanning;
    }

    /// A controller that raises `reset` when the guest pulses the CPU reset line and `irq` (IRQ 1)
    /// for keyboard bytes.
    pub fn new(reset: EventSignal, irq: IrqLine) -> Self {
        I8042 {
            reset,
            irq,
            ctr: CTR_DEFAULT,
            output_port: OUTPUT_PORT_DEFAULT,
            last_was_command: false,
            next_data: DataTarget::Keyboard,
            queue: VecDeque::new(),
            scanning: true,
        }
    }

    /// Types Ctrl-Alt-Del on the keyboard. False if the guest has disabled the keyboard (its
    /// interface or its scanning), in which case nothing is sent: a real keyboard would be ignored too.
    pub fn ctrl_alt_del(&mut self) -> bool {
        if !self.keyboard_enabled() {
            return false;
        }
        if self.ctr & CTR_TRANSLATE != 0 {
            self.keyboard_bytes(&CTRL_ALT_DEL_SET1);
        } else {
            self.keyboard_bytes(&CTRL_ALT_DEL_SET2);
        }
        true
    }

    fn keyboard_enabled(&self) -> bool {
        self.scanning && self.ctr & CTR_KBD_DISABLED == 0
    }

    fn status(&self) -> u8 {
        let mut status = STATUS_KEYLOCK_OFF;
        if !self.queue.is_empty() {
            status |= STATUS_OUTPUT_FULL;
        }
        if self.ctr & CTR_SYSTEM_FLAG != 0 {
            status |= STATUS_SYSTEM_FLAG;
        }
        if self.last_was_command {
            status |= STATUS_LAST_WAS_COMMAND;
        }
        status
    }

    fn push(&mut self, byte: u8, source: Source) {
        if self.queue.len() >= QUEUE_LIMIT {
            return;
        }
        let was_empty = self.queue.is_empty();
        self.queue.push_back((byte, source));
        if was_empty {
            self.interrupt_for_head();
        }
    }

    fn keyboard_bytes(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.push(b, Source::Keyboard);
        }
    }

    /// Raises IRQ 1 if the byte now at the head of the queue came from the keyboard.
    fn interrupt_for_head(&self) {
        let keyboard = matches!(self.queue.front(), Some((_, Source::Keyboard)));
        if keyboard && self.ctr & CTR_KBD_INT != 0 {
            if let Err(e) = vm_superio::Trigger::trigger(&self.irq) {
                log::warn!("i8042: keyboard interrupt: {e}");
            }
        }
    }

    fn read_data(&mut self) -> u8 {
        let byte = self.queue.pop_front().map_or(0, |(b, _)| b);
        self.interrupt_for_head();
        byte
    }

    fn command(&mut self, cmd: u8) {
        self.last_was_command = true;
        self.next_data = DataTarget::Keyboard;
        match cmd {
            CMD_READ_CTR => self.reply(self.ctr),
            CMD_WRITE_CTR => self.next_data = DataTarget::ControllerConfig,
            CMD_AUX_DISABLE => self.ctr |= CTR_AUX_DISABLED,
            CMD_AUX_ENABLE => self.ctr &= !CTR_AUX_DISABLED,
            CMD_AUX_TEST => self.reply(AUX_TEST_NO_PORT),
            CMD_SELF_TEST => {
                self.queue.clear();
                self.reply(SELF_TEST_OK);
            }
            CMD_KBD_TEST => self.reply(KBD_TEST_OK),
            CMD_KBD_DISABLE => self.ctr |= CTR_KBD_DISABLED,
            CMD_KBD_ENABLE => self.ctr &= !CTR_KBD_DISABLED,
            CMD_READ_OUTPUT_PORT => self.reply(self.output_port),
            CMD_WRITE_OUTPUT_PORT => self.next_data = DataTarget::OutputPort,
            CMD_WRITE_KBD_BUFFER => self.next_data = DataTarget::KeyboardBuffer,
            CMD_WRITE_AUX_BUFFER => self.next_data = DataTarget::AuxBuffer,
            CMD_WRITE_AUX => self.next_data = DataTarget::Aux,
            CMD_PULSE_FIRST..=0xff => {
                if cmd & OUTPUT_PORT_RESET_HIGH == 0 {
                    self.reset.raise();
                }
            }
            _ => log::debug!("i8042: unknown controller command {cmd:#04x}"),
        }
    }

    fn reply(&mut self, byte: u8) {
        self.push(byte, Source::Controller);
    }

    fn write_data(&mut self, value: u8) {
        self.last_was_command = false;
        let target = std::mem::replace(&mut self.next_data, DataTarget::Keyboard);
        match target {
            DataTarget::Keyboard => self.keyboard_command(value),
            DataTarget::ControllerConfig => self.ctr = value,
            DataTarget::OutputPort => {
                self.output_port = value;
                if value & OUTPUT_PORT_RESET_HIGH == 0 {
                    self.reset.raise();
                }
            }
            DataTarget::KeyboardBuffer => self.push(value, Source::Keyboard),
            // No mouse port: the loopback does not come back as mouse data, which tells drivers
            // the port is broken (they then run the AUX test, which fails at once).
            DataTarget::AuxBuffer => self.reply(!value),
            DataTarget::Aux => {}
            DataTarget::KeyboardParameter(cmd) => {
                self.keyboard_bytes(&[KBD_ACK]);
                if cmd == KBD_SCAN_CODE_SET && value == 0 {
                    self.keyboard_bytes(&[KBD_SCAN_CODE_SET_2]);
                }
            }
        }
    }

    /// A byte sent to the keyboard itself; every command is acknowledged.
    fn keyboard_command(&mut self, cmd: u8) {
        match cmd {
            KBD_SET_LEDS | KBD_TYPEMATIC | KBD_SCAN_CODE_SET => {
                self.next_data = DataTarget::KeyboardParameter(cmd);
                self.keyboard_bytes(&[KBD_ACK]);
            }
            KBD_ECHO => self.keyboard_bytes(&[KBD_ECHO]),
            KBD_IDENTIFY => {
                self.keyboard_bytes(&[KBD_ACK]);
                self.keyboard_bytes(&KBD_ID);
            }
            KBD_ENABLE => {
                self.scanning = true;
                self.keyboard_bytes(&[KBD_ACK]);
            }
            KBD_DISABLE | KBD_DEFAULTS => {
                self.scanning = cmd == KBD_DEFAULTS;
                self.keyboard_bytes(&[KBD_ACK]);
            }
            KBD_RESET => {
                self.scanning = true;
                self.keyboard_bytes(&[KBD_ACK, KBD_SELF_TEST_PASSED]);
            }
            _ => self.keyboard_bytes(&[KBD_ACK]),
        }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let value = match (offset, data.len()) {
            (DATA, 1) => self.read_data(),
            (COMMAND, 1) => self.status(),
            _ => 0xff,
        };
        data.fill(value);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Some(value) = single_byte(data) else {
            return;
        };
        match offset {
            DATA => self.write_data(value),
            COMMAND => self.command(value),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

    struct Rig {
        dev: I8042,
        reset: EventFd,
        irq: EventFd,
    }

    fn rig() -> Rig {
        let reset = EventFd::new(EFD_NONBLOCK).unwrap();
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        let dev = I8042::new(
            EventSignal::new(reset.try_clone().unwrap()),
            IrqLine::new(irq.try_clone().unwrap()),
        );
        Rig { dev, reset, irq }
    }

    impl Rig {
        fn out(&mut self, offset: u64, value: u8) {
            self.dev.write(offset, &[value]);
        }

        fn inb(&mut self, offset: u64) -> u8 {
            let mut b = [0u8];
            self.dev.read(offset, &mut b);
            b[0]
        }

        /// Reads every pending byte the way Linux's driver does: status first, data while full.
        fn drain(&mut self) -> Vec<u8> {
            let mut bytes = Vec::new();
            while self.inb(COMMAND) & STATUS_OUTPUT_FULL != 0 {
                bytes.push(self.inb(DATA));
            }
            bytes
        }

        fn interrupts(&self) -> u64 {
            self.irq.read().unwrap_or(0)
        }
    }

    #[test]
    fn linux_controller_probe_sequence_is_answered() {
        let mut r = rig();
        assert_eq!(r.drain(), Vec::<u8>::new());
        r.out(COMMAND, CMD_SELF_TEST);
        assert_eq!(r.drain(), [SELF_TEST_OK]);
        r.out(COMMAND, CMD_READ_CTR);
        assert_eq!(r.drain(), [CTR_DEFAULT]);
        r.out(COMMAND, CMD_WRITE_CTR);
        r.out(DATA, CTR_DEFAULT & !CTR_KBD_INT);
        r.out(COMMAND, CMD_READ_CTR);
        assert_eq!(r.drain(), [CTR_DEFAULT & !CTR_KBD_INT]);
        // A20 through the output port (Linux does this at init): no reset.
        r.out(COMMAND, CMD_WRITE_OUTPUT_PORT);
        r.out(DATA, 0xdf);
        r.out(COMMAND, 0xff);
        assert!(r.reset.read().is_err(), "no reset expected");
        // AUX loopback comes back wrong and the AUX test fails: no mouse port.
        r.out(COMMAND, CMD_WRITE_AUX_BUFFER);
        r.out(DATA, 0x5a);
        assert_ne!(r.drain(), [0x5a]);
        r.out(COMMAND, CMD_AUX_TEST);
        assert_eq!(r.drain(), [AUX_TEST_NO_PORT]);
        r.out(COMMAND, CMD_KBD_TEST);
        assert_eq!(r.drain(), [KBD_TEST_OK]);
        // Controller replies are polled, not interrupts.
        assert_eq!(r.interrupts(), 0);
    }

    #[test]
    fn keyboard_commands_are_acknowledged_with_interrupts() {
        let mut r = rig();
        r.out(DATA, KBD_IDENTIFY);
        assert_eq!(r.drain(), [KBD_ACK, KBD_ID[0], KBD_ID[1]]);
        assert!(r.interrupts() >= 1);
        r.out(DATA, KBD_SET_LEDS);
        assert_eq!(r.drain(), [KBD_ACK]);
        r.out(DATA, 0x07);
        assert_eq!(r.drain(), [KBD_ACK]);
        r.out(DATA, KBD_SCAN_CODE_SET);
        r.out(DATA, 0);
        assert_eq!(r.drain(), [KBD_ACK, KBD_ACK, KBD_SCAN_CODE_SET_2]);
        r.out(DATA, KBD_RESET);
        assert_eq!(r.drain(), [KBD_ACK, KBD_SELF_TEST_PASSED]);
        r.out(DATA, KBD_ECHO);
        assert_eq!(r.drain(), [KBD_ECHO]);
    }

    #[test]
    fn ctrl_alt_del_in_both_scan_code_sets() {
        let mut r = rig();
        assert!(r.dev.ctrl_alt_del());
        assert_eq!(r.drain(), CTRL_ALT_DEL_SET2);
        assert!(r.interrupts() >= 1);

        r.out(COMMAND, CMD_WRITE_CTR);
        r.out(DATA, CTR_DEFAULT | CTR_TRANSLATE);
        assert!(r.dev.ctrl_alt_del());
        assert_eq!(r.drain(), CTRL_ALT_DEL_SET1);
    }

    #[test]
    fn a_disabled_keyboard_types_nothing() {
        let mut r = rig();
        r.out(COMMAND, CMD_KBD_DISABLE);
        assert!(!r.dev.ctrl_alt_del());
        r.out(COMMAND, CMD_KBD_ENABLE);
        r.out(DATA, KBD_DISABLE);
        assert_eq!(r.drain(), [KBD_ACK]);
        assert!(!r.dev.ctrl_alt_del());
        r.out(DATA, KBD_ENABLE);
        assert_eq!(r.drain(), [KBD_ACK]);
        assert!(r.dev.ctrl_alt_del());
    }

    #[test]
    fn no_interrupts_while_the_guest_masks_them() {
        let mut r = rig();
        r.out(COMMAND, CMD_WRITE_CTR);
        r.out(DATA, CTR_DEFAULT & !CTR_KBD_INT);
        assert!(r.dev.ctrl_alt_del());
        assert_eq!(r.interrupts(), 0);
        assert_eq!(r.drain().len(), CTRL_ALT_DEL_SET2.len());
    }

    #[test]
    fn reset_line() {
        let mut r = rig();
        r.out(COMMAND, 0xfe);
        assert_eq!(r.reset.read().unwrap(), 1);
        r.out(COMMAND, CMD_WRITE_OUTPUT_PORT);
        r.out(DATA, 0x02);
        assert_eq!(r.reset.read().unwrap(), 1);
    }

    #[test]
    fn a_guest_that_never_reads_cannot_grow_the_queue() {
        let mut r = rig();
        for _ in 0..10_000 {
            r.out(DATA, KBD_IDENTIFY);
            r.out(COMMAND, CMD_READ_CTR);
        }
        assert_eq!(r.drain().len(), QUEUE_LIMIT);
        // Wide accesses and unknown offsets are harmless.
        r.dev.write(DATA, &[1, 2]);
        let mut wide = [0u8; 2];
        r.dev.read(COMMAND, &mut wide);
        assert_eq!(wide, [0xff, 0xff]);
        for cmd in 0..=0xffu8 {
            if cmd & 0xf0 != 0xf0 {
                r.out(COMMAND, cmd);
                r.out(DATA, 0);
            }
        }
        r.drain();
    }
}
