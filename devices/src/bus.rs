//! An address bus (port I/O or MMIO) that routes guest accesses to devices.
//!
//! The bus is built once before the vCPUs start and is immutable afterwards, so lookups need no lock;
//! each device sits behind its own mutex so that vCPUs touching different devices never contend.

use std::sync::{Arc, Mutex};

/// A device reachable through a [`Bus`]. `offset` is relative to the start of the device's range.
pub trait BusDevice: Send {
    /// Guest read of `data.len()` bytes at `offset`; fill `data`.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// Guest write of `data` at `offset`.
    fn write(&mut self, offset: u64, data: &[u8]);
}

/// Errors building a bus.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    /// The new range overlaps a range already on the bus.
    #[error("bus range {base:#x}+{len:#x} overlaps an existing device")]
    Overlap {
        /// Start of the rejected range.
        base: u64,
        /// Length of the rejected range.
        len: u64,
    },
    /// The range is empty or wraps around the address space.
    #[error("invalid bus range {base:#x}+{len:#x}")]
    InvalidRange {
        /// Start of the rejected range.
        base: u64,
        /// Length of the rejected range.
        len: u64,
    },
}

struct Entry {
    base: u64,
    len: u64,
    device: Arc<Mutex<dyn BusDevice>>,
}

/// Routes accesses by address to the device whose range contains them.
#[derive(Default)]
pub struct Bus {
    /// Sorted by `base`, non-overlapping.
    entries: Vec<Entry>,
}

impl Bus {
    /// An empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    /// Places `device` at `[base, base + len)`.
    pub fn insert(&mut self, device: Arc<Mutex<dyn BusDevice>>, base: u64, len: u64) -> Result<(), BusError> {
        let end = base
            .checked_add(len)
            .filter(|_| len > 0)
            .ok_or(BusError::InvalidRange { base, len })?;
        let idx = self.entries.partition_point(|e| e.base < base);
        let overlaps_prev = idx > 0 && self.entries[idx - 1].base + self.entries[idx - 1].len > base;
        let overlaps_next = idx < self.entries.len() && self.entries[idx].base < end;
        if overlaps_prev || overlaps_next {
            return Err(BusError::Overlap { base, len });
        }
        self.entries.insert(idx, Entry { base, len, device });
        Ok(())
    }

    fn find(&self, addr: u64, size: usize) -> Option<(&Entry, u64)> {
        let idx = self.entries.partition_point(|e| e.base <= addr).checked_sub(1)?;
        let entry = &self.entries[idx];
        let offset = addr - entry.base;
        // The whole access must fall inside the device's range.
        (offset.checked_add(size as u64)? <= entry.len).then_some((entry, offset))
    }

    /// Dispatches a read. Returns false (leaving `data` untouched) when no device claims the address.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.find(addr, data.len()) {
            Some((entry, offset)) => {
                lock(&entry.device).read(offset, data);
                true
            }
            None => false,
        }
    }

    /// Dispatches a write. Returns false when no device claims the address.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.find(addr, data.len()) {
            Some((entry, offset)) => {
                lock(&entry.device).write(offset, data);
                true
            }
            None => false,
        }
    }
}

/// Locks a device, recovering from poisoning: a device whose handler panicked on one access keeps
/// serving the others rather than taking every vCPU down with it.
fn lock<'a>(
    device: &'a Mutex<dyn BusDevice + 'static>,
) -> std::sync::MutexGuard<'a, dyn BusDevice + 'static> {
    device.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Scratch {
        last_write: Option<(u64, Vec<u8>)>,
    }

    impl BusDevice for Scratch {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.last_write = Some((offset, data.to_vec()));
        }
    }

    #[test]
    fn routes_by_range_and_rejects_overlap() {
        let a = Arc::new(Mutex::new(Scratch::default()));
        let b = Arc::new(Mutex::new(Scratch::default()));
        let mut bus = Bus::new();
        bus.insert(a.clone(), 0x60, 1).unwrap();
        bus.insert(b.clone(), 0x3f8, 8).unwrap();
        assert_eq!(
            bus.insert(b.clone(), 0x3fc, 8),
            Err(BusError::Overlap { base: 0x3fc, len: 8 })
        );
        assert_eq!(
            bus.insert(b.clone(), 0x3f0, 9),
            Err(BusError::Overlap { base: 0x3f0, len: 9 })
        );
        assert_eq!(
            bus.insert(b.clone(), 0x10, 0),
            Err(BusError::InvalidRange { base: 0x10, len: 0 })
        );
        assert_eq!(
            bus.insert(b.clone(), u64::MAX, 2),
            Err(BusError::InvalidRange {
                base: u64::MAX,
                len: 2
            })
        );

        let mut byte = [0u8; 1];
        assert!(bus.read(0x3fa, &mut byte));
        assert_eq!(byte, [2]);
        assert!(bus.write(0x60, &[7]));
        assert_eq!(a.lock().unwrap().last_write, Some((0, vec![7])));
        // Unclaimed, and straddling the end of a range.
        assert!(!bus.read(0x61, &mut byte));
        let mut word = [0u8; 2];
        assert!(!bus.read(0x3ff, &mut word));
        assert!(!bus.write(u64::MAX, &[1]));
    }
}
