//! Pages of guest memory that devices wrote, for incremental snapshots and migration.
//!
//! KVM's dirty log sees only what vCPUs write; a device writing a received frame or a disk read
//! into guest memory goes around it. Devices mark what they write here, and the VMM ORs this with
//! KVM's log. Marking is conservative: a buffer handed to the device for writing counts as written.

use std::sync::atomic::{AtomicU64, Ordering};

use vm_memory::GuestAddress;

/// Page size the bitmaps count in (KVM's dirty log granularity on x86_64).
pub const PAGE_SIZE: u64 = 4096;

struct Region {
    start: u64,
    len: u64,
    bits: Vec<AtomicU64>,
}

/// One bit per guest page, per memory region, set by devices.
pub struct DirtyPages {
    regions: Vec<Region>,
}

impl DirtyPages {
    /// Clean bitmaps for the regions `(start, len)` of guest memory.
    pub fn new(ranges: &[(u64, u64)]) -> Self {
        let regions = ranges
            .iter()
            .map(|&(start, len)| Region {
                start,
                len,
                bits: (0..len.div_ceil(PAGE_SIZE).div_ceil(64))
                    .map(|_| AtomicU64::new(0))
                    .collect(),
            })
            .collect();
        DirtyPages { regions }
    }

    /// Marks the pages of `[addr, addr + len)`; bytes outside guest memory are ignored (the
    /// access that wrote them would have failed).
    pub fn mark(&self, addr: GuestAddress, len: usize) {
        if len == 0 {
            return;
        }
        let first = addr.0;
        let Some(last) = first.checked_add(len as u64 - 1) else {
            return;
        };
        for r in &self.regions {
            let end = r.start + r.len;
            if last < r.start || first >= end {
                continue;
            }
            let from = (first.max(r.start) - r.start) / PAGE_SIZE;
            let to = (last.min(end - 1) - r.start) / PAGE_SIZE;
            for page in from..=to {
                if let Some(word) = r.bits.get((page / 64) as usize) {
                    word.fetch_or(1 << (page % 64), Ordering::Relaxed);
                }
            }
        }
    }

    /// Region `index`'s bitmap (bit `n` of word `n / 64` is page `n`), cleared as it is read.
    pub fn take(&self, index: usize) -> Vec<u64> {
        self.regions.get(index).map_or_else(Vec::new, |r| {
            r.bits.iter().map(|w| w.swap(0, Ordering::Relaxed)).collect()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_pages_per_region_and_clears_on_take() {
        let d = DirtyPages::new(&[(0, 1 << 20), (4 << 20, 64 << 10)]);
        d.mark(GuestAddress(4095), 2);
        d.mark(GuestAddress((4 << 20) + 3 * 4096), 1);
        d.mark(GuestAddress(2 << 20), 4096); // in the hole: ignored
        d.mark(GuestAddress(u64::MAX - 1), 100); // overflow: ignored
        let r0 = d.take(0);
        assert_eq!(r0[0], 0b11);
        assert!(r0[1..].iter().all(|&w| w == 0));
        assert_eq!(d.take(1), vec![0b1000]);
        assert!(d.take(0).iter().all(|&w| w == 0));
        assert!(d.take(7).is_empty());
    }
}
