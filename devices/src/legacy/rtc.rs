//! The MC146818 CMOS real-time clock at ports 0x70 (index) and 0x71 (data), enough for a guest to read
//! the wall-clock time at boot. The clock reads the host's UTC time; guest writes to the clock
//! registers are ignored (the host owns the time), other CMOS bytes behave as plain RAM.

use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use super::single_byte;
use crate::bus::BusDevice;

const CMOS_SIZE: usize = 128;
const INDEX_MASK: u8 = 0x7f; // bit 7 of the index port is the NMI-disable bit

const REG_SECONDS: u8 = 0x00;
const REG_MINUTES: u8 = 0x02;
const REG_HOURS: u8 = 0x04;
const REG_WEEKDAY: u8 = 0x06;
const REG_DAY: u8 = 0x07;
const REG_MONTH: u8 = 0x08;
const REG_YEAR: u8 = 0x09;
const REG_STATUS_A: u8 = 0x0a;
const REG_STATUS_B: u8 = 0x0b;
const REG_STATUS_C: u8 = 0x0c;
const REG_STATUS_D: u8 = 0x0d;
const REG_CENTURY: u8 = 0x32;

/// Divider bits of status A: the 32.768 kHz time base, update-in-progress always clear.
const STATUS_A_DEFAULT: u8 = 0x26;
/// Status B: 24-hour mode, BCD values, no interrupts.
const STATUS_B_24H: u8 = 0x02;
/// Status D: the battery is good (the CMOS contents are valid).
const STATUS_D_VALID_RAM: u8 = 0x80;

/// The CMOS RTC, spanning two ports.
pub struct CmosRtc {
    index: u8,
    ram: [u8; CMOS_SIZE],
    now: fn() -> u64,
}

impl Default for CmosRtc {
    fn default() -> Self {
        Self::with_clock(host_unix_seconds)
    }
}

/// The RTC's index register and CMOS RAM, for snapshots (the time registers follow the host's
/// clock and are not part of it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CmosState {
    index: u8,
    ram: Vec<u8>,
}

impl CmosRtc {
    /// The index register and CMOS RAM.
    pub fn save_state(&self) -> CmosState {
        CmosState {
            index: self.index,
            ram: self.ram.to_vec(),
        }
    }

    /// Takes saved registers; a RAM image of the wrong size is refused (the state file is input).
    pub fn restore_state(&mut self, state: &CmosState) -> Result<(), String> {
        self.ram = <[u8; CMOS_SIZE]>::try_from(state.ram.as_slice())
            .map_err(|_| format!("CMOS RAM of {} bytes, expected {CMOS_SIZE}", state.ram.len()))?;
        self.index = state.index & INDEX_MASK;
        Ok(())
    }

    /// An RTC reading the host's wall clock.
    pub fn new() -> Self {
        Self::default()
    }

    fn with_clock(now: fn() -> u64) -> Self {
        let mut ram = [0u8; CMOS_SIZE];
        ram[REG_STATUS_A as usize] = STATUS_A_DEFAULT;
        ram[REG_STATUS_B as usize] = STATUS_B_24H;
        ram[REG_STATUS_D as usize] = STATUS_D_VALID_RAM;
        CmosRtc { index: 0, ram, now }
    }

    fn read_register(&self, reg: u8) -> u8 {
        let time = CivilTime::from_unix((self.now)());
        match reg {
            REG_SECONDS => bcd(time.second),
            REG_MINUTES => bcd(time.minute),
            REG_HOURS => bcd(time.hour),
            REG_WEEKDAY => bcd(time.weekday + 1),
            REG_DAY => bcd(time.day),
            REG_MONTH => bcd(time.month),
            REG_YEAR => bcd((time.year % 100) as u8),
            REG_CENTURY => bcd((time.year / 100 % 100) as u8),
            // Reading status C acknowledges interrupts; none are ever pending.
            REG_STATUS_C => 0,
            _ => self.ram[usize::from(reg & INDEX_MASK)],
        }
    }
}

impl BusDevice for CmosRtc {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let value = match (offset, data.len()) {
            (0, 1) => self.index,
            (1, 1) => self.read_register(self.index),
            _ => 0xff,
        };
        data.fill(value);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Some(value) = single_byte(data) else { return };
        match offset {
            0 => self.index = value & INDEX_MASK,
            1 => match self.index {
                REG_SECONDS..=REG_YEAR | REG_CENTURY | REG_STATUS_C | REG_STATUS_D => {}
                // Keep 24-hour BCD mode whatever the guest asks, since reads always answer in it.
                REG_STATUS_B => self.ram[REG_STATUS_B as usize] = (value & !0x06) | STATUS_B_24H,
                reg => self.ram[usize::from(reg)] = value,
            },
            _ => {}
        }
    }
}

fn host_unix_seconds() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn bcd(value: u8) -> u8 {
    ((value / 10) << 4) | (value % 10)
}

/// A UTC calendar time.
#[derive(Debug, PartialEq, Eq)]
struct CivilTime {
    year: u32,
    month: u8,
    day: u8,
    hour: u8,
    minute: u8,
    second: u8,
    /// 0 = Sunday.
    weekday: u8,
}

impl CivilTime {
    /// Converts seconds since the Unix epoch (Howard Hinnant's days-to-civil algorithm).
    fn from_unix(secs: u64) -> Self {
        let days = secs / 86_400;
        let rem = secs % 86_400;
        let z = days + 719_468;
        let era = z / 146_097;
        let doe = z - era * 146_097;
        let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
        let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
        let mp = (5 * doy + 2) / 153;
        let day = (doy - (153 * mp + 2) / 5 + 1) as u8;
        let month = if mp < 10 { mp + 3 } else { mp - 9 } as u8;
        let year = (yoe + era * 400 + u64::from(month <= 2)) as u32;
        CivilTime {
            year,
            month,
            day,
            hour: (rem / 3600) as u8,
            minute: (rem % 3600 / 60) as u8,
            second: (rem % 60) as u8,
            weekday: ((days + 4) % 7) as u8, // 1970-01-01 was a Thursday
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn civil_time_conversion() {
        assert_eq!(
            CivilTime::from_unix(0),
            CivilTime {
                year: 1970,
                month: 1,
                day: 1,
                hour: 0,
                minute: 0,
                second: 0,
                weekday: 4
            }
        );
        // 2024-02-29T23:59:58Z, a Thursday in a leap year.
        assert_eq!(
            CivilTime::from_unix(1_709_251_198),
            CivilTime {
                year: 2024,
                month: 2,
                day: 29,
                hour: 23,
                minute: 59,
                second: 58,
                weekday: 4
            }
        );
    }

    #[test]
    fn reads_bcd_time_through_index_port() {
        let mut rtc = CmosRtc::with_clock(|| 1_709_251_198);
        let mut read = |reg: u8| {
            rtc.write(0, &[reg | 0x80]);
            let mut b = [0u8];
            rtc.read(1, &mut b);
            b[0]
        };
        assert_eq!(read(REG_SECONDS), 0x58);
        assert_eq!(read(REG_HOURS), 0x23);
        assert_eq!(read(REG_DAY), 0x29);
        assert_eq!(read(REG_MONTH), 0x02);
        assert_eq!(read(REG_YEAR), 0x24);
        assert_eq!(read(REG_CENTURY), 0x20);
        assert_eq!(read(REG_STATUS_B), STATUS_B_24H);
        assert_eq!(read(REG_STATUS_D), STATUS_D_VALID_RAM);
    }

    #[test]
    fn clock_registers_ignore_writes_and_ram_keeps_them() {
        let mut rtc = CmosRtc::with_clock(|| 0);
        rtc.write(0, &[REG_YEAR]);
        rtc.write(1, &[0x99]);
        rtc.write(0, &[0x40]);
        rtc.write(1, &[0xab]);
        let mut b = [0u8];
        rtc.write(0, &[REG_YEAR]);
        rtc.read(1, &mut b);
        assert_eq!(b[0], 0x70);
        rtc.write(0, &[0x40]);
        rtc.read(1, &mut b);
        assert_eq!(b[0], 0xab);
        let mut wide = [0u8; 2];
        rtc.read(1, &mut wide);
        assert_eq!(wide, [0xff, 0xff]);
    }
}
