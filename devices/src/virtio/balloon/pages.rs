//! Guest page numbers and ranges from the balloon's queues: checked against guest RAM, then
//! released on the host.
//!
//! Nothing the guest sends is trusted: a range is released only if it lies wholly inside one
//! region of guest RAM, so `madvise` never sees an address of the VMM's own memory.

use vm_memory::{
    Address, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, MemoryRegionAddress,
};

use super::{BALLOON_PAGE_SIZE, BALLOON_PFN_SHIFT};

/// Why a guest range was not released.
#[derive(Debug, thiserror::Error)]
pub enum ReleaseError {
    /// Some of the range lies outside guest RAM (or spans two regions).
    #[error("guest range {start:#x}+{len:#x} is not inside guest RAM")]
    OutsideGuestRam {
        /// Guest physical start.
        start: u64,
        /// Length in bytes.
        len: u64,
    },
    /// The host refused.
    #[error("madvise(MADV_DONTNEED): {0}")]
    Madvise(std::io::Error),
}

/// The host mapping behind guest `[start, start + len)`, if all of it lies inside one region.
fn host_range(mem: &GuestMemoryMmap, start: GuestAddress, len: u64) -> Option<(*mut u8, usize)> {
    if len == 0 {
        return None;
    }
    let region = mem.find_region(start)?;
    let offset = start.checked_offset_from(region.start_addr())?;
    if offset.checked_add(len)? > region.len() {
        return None;
    }
    let host = region.get_host_address(MemoryRegionAddress(offset)).ok()?;
    Some((host, usize::try_from(len).ok()?))
}

/// Whether the 4 KiB page `pfn` is guest RAM.
pub fn page_in_ram(mem: &GuestMemoryMmap, pfn: u32) -> bool {
    host_range(mem, pfn_address(pfn), BALLOON_PAGE_SIZE).is_some()
}

/// The guest physical address of balloon page `pfn`.
pub fn pfn_address(pfn: u32) -> GuestAddress {
    GuestAddress(u64::from(pfn) << BALLOON_PFN_SHIFT)
}

/// Releases the host memory behind guest `[start, start + len)`, which must be page aligned and
/// inside one region of guest RAM.
pub fn release(mem: &GuestMemoryMmap, start: GuestAddress, len: u64) -> Result<(), ReleaseError> {
    let outside = ReleaseError::OutsideGuestRam {
        start: start.raw_value(),
        len,
    };
    if !start.raw_value().is_multiple_of(BALLOON_PAGE_SIZE) || !len.is_multiple_of(BALLOON_PAGE_SIZE) {
        return Err(outside);
    }
    let (host, bytes) = host_range(mem, start, len).ok_or(outside)?;
    discard(host, bytes).map_err(ReleaseError::Madvise)
}

/// `MADV_DONTNEED` on `len` bytes at `host`, which [`host_range`] found inside a guest RAM mapping.
fn discard(host: *mut u8, len: usize) -> std::io::Result<()> {
    // SAFETY: `host..host + len` lies inside a live guest RAM mapping that `mem` owns (checked by
    // `host_range` against the region's bounds), so no memory of the VMM itself is affected, and
    // the caller checked page alignment. MADV_DONTNEED keeps the mapping valid: later accesses
    // read zeroes (anonymous memory) or the backing file's data; the guest has given these pages
    // up and expects no particular contents.
    let ret = unsafe { libc::madvise(host.cast(), len, libc::MADV_DONTNEED) };
    if ret == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// The page-aligned part of guest `[addr, addr + len)` (a free page report is released whole
/// pages only), or `None` if it holds no whole page or overflows.
pub fn aligned_inward(addr: u64, len: u64) -> Option<(GuestAddress, u64)> {
    let end = addr.checked_add(len)?;
    let start = addr.checked_next_multiple_of(BALLOON_PAGE_SIZE)?;
    let end = end - end % BALLOON_PAGE_SIZE;
    (end > start).then(|| (GuestAddress(start), end - start))
}

/// Consecutive page numbers gathered into runs, so that contiguous pages cost one `madvise`.
#[derive(Debug, Default)]
pub struct PfnRuns {
    run: Option<(u32, u32)>,
}

impl PfnRuns {
    /// Adds `pfn`; returns the run it ends, `(first pfn, pages)`, if it does not continue it.
    pub fn push(&mut self, pfn: u32) -> Option<(u32, u32)> {
        match &mut self.run {
            Some((first, count)) if first.checked_add(*count) == Some(pfn) => {
                *count += 1;
                None
            }
            run => run.replace((pfn, 1)),
        }
    }

    /// The run in progress, ending it.
    pub fn finish(&mut self) -> Option<(u32, u32)> {
        self.run.take()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_gather_consecutive_pages() {
        let mut runs = PfnRuns::default();
        let mut out = Vec::new();
        for pfn in [5, 6, 7, 9, 3, 4, u32::MAX] {
            out.extend(runs.push(pfn));
        }
        out.extend(runs.finish());
        assert_eq!(out, vec![(5, 3), (9, 1), (3, 2), (u32::MAX, 1)]);
    }

    #[test]
    fn inward_alignment_keeps_whole_pages_only() {
        assert_eq!(aligned_inward(0, 8192), Some((GuestAddress(0), 8192)));
        assert_eq!(aligned_inward(1, 8192), Some((GuestAddress(4096), 4096)));
        assert_eq!(aligned_inward(1, 4096), None);
        assert_eq!(aligned_inward(u64::MAX - 10, 100), None);
    }

    #[test]
    fn only_ranges_inside_one_region_are_released() {
        let mem =
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20), (GuestAddress(2 << 20), 1 << 20)])
                .unwrap();
        assert!(release(&mem, GuestAddress(4096), 8192).is_ok());
        assert!(page_in_ram(&mem, 0));
        assert!(!page_in_ram(&mem, 256)); // the hole
        assert!(page_in_ram(&mem, 512));
        assert!(!page_in_ram(&mem, u32::MAX));
        for (start, len) in [
            (1 << 20, 4096),          // the hole
            ((1 << 20) - 4096, 8192), // across the end of region 0
            ((3 << 20) - 4096, 8192), // past the end of memory
            (4095, 4096),             // unaligned
            (0, 0),
        ] {
            assert!(
                matches!(
                    release(&mem, GuestAddress(start), len),
                    Err(ReleaseError::OutsideGuestRam { .. })
                ),
                "{start:#x}+{len:#x}"
            );
        }
    }
}
