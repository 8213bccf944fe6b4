//! Guest RAM: anonymous host mappings, laid out around the MMIO hole and registered with KVM.

use std::ffi::CStr;

use kvm_bindings::{kvm_userspace_memory_region, KVM_MEM_LOG_DIRTY_PAGES};
use kvm_ioctls::VmFd;
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{
    Address, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, GuestRegionMmap,
    MemoryRegionAddress,
};

use vmm_api::HugePages;

use crate::arch::layout;

/// The size of an x86_64 transparent huge page (a PMD mapping).
pub const HUGE_PAGE_SIZE: usize = 2 << 20;

/// The name guest RAM mappings carry in `/proc/PID/smaps` (`[anon:vmm-guest-ram]`) on host kernels
/// with `CONFIG_ANON_VMA_NAME`, so tools can tell guest memory from the VMM's own.
pub const GUEST_RAM_NAME: &CStr = c"vmm-guest-ram";

/// Errors creating guest memory.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// More memory than the host has.
    #[error("{requested_mib} MiB of guest memory exceeds the host's {host_mib} MiB")]
    ExceedsHost {
        /// Requested guest memory.
        requested_mib: u64,
        /// Host physical memory.
        host_mib: u64,
    },
    /// Mapping guest memory failed.
    #[error("cannot map guest memory: {0}")]
    Map(vm_memory::mmap::FromRangesError),
    /// A region has no host mapping (cannot happen for mmap-backed memory).
    #[error("guest memory region without host mapping: {0}")]
    HostAddress(vm_memory::GuestMemoryError),
    /// KVM refused a memory slot.
    #[error("KVM_SET_USER_MEMORY_REGION failed: {0}")]
    Register(kvm_ioctls::Error),
    /// KVM could not hand over its dirty log.
    #[error("KVM_GET_DIRTY_LOG failed: {0}")]
    DirtyLog(kvm_ioctls::Error),
    /// A 2 MiB-aligned mapping could not be made.
    #[error("cannot map 2 MiB-aligned guest memory: {0}")]
    MapAligned(std::io::Error),
    /// The host refused advice the configuration asks for (`machine.mergeable`, `hugepages`).
    #[error("{advice} refused for guest memory (does the host kernel support it?): {source}")]
    Advise {
        /// `MADV_MERGEABLE` or `MADV_HUGEPAGE`.
        advice: &'static str,
        /// Why.
        source: std::io::Error,
    },
}

/// Maps `mib` MiB of guest RAM. Fails early, with a clear message, when the host could never back it.
/// With [`HugePages::Thp`] every region starts at a 2 MiB-aligned host address (so guest and host
/// huge pages line up) and is advised `MADV_HUGEPAGE` before anything touches it.
pub fn create_guest_memory(mib: u64, hugepages: HugePages) -> Result<GuestMemoryMmap, MemoryError> {
    if let Some(host_mib) = host_memory_mib() {
        if mib > host_mib {
            return Err(MemoryError::ExceedsHost {
                requested_mib: mib,
                host_mib,
            });
        }
    }
    let ranges: Vec<(GuestAddress, usize)> = layout::ram_ranges(mib << 20)
        .iter()
        .map(|r| (GuestAddress(r.start), r.len as usize))
        .collect();
    let mem = match hugepages {
        HugePages::Thp => aligned_guest_memory(&ranges)?,
        HugePages::Auto | HugePages::Off => {
            GuestMemoryMmap::from_ranges(&ranges).map_err(MemoryError::Map)?
        }
    };
    for region in mem.iter() {
        name_mapping(region);
        if hugepages == HugePages::Thp {
            advise(region, libc::MADV_HUGEPAGE).map_err(|source| MemoryError::Advise {
                advice: "MADV_HUGEPAGE",
                source,
            })?;
        }
    }
    Ok(mem)
}

/// Applies the advice of `machine.mergeable` (and of `hugepages = "thp"`, for memory that was not
/// created by [`create_guest_memory`], e.g. a restored snapshot's).
pub fn apply_advice(mem: &GuestMemoryMmap, mergeable: bool, hugepages: HugePages) -> Result<(), MemoryError> {
    for region in mem.iter() {
        if mergeable {
            advise(region, libc::MADV_MERGEABLE).map_err(|source| MemoryError::Advise {
                advice: "MADV_MERGEABLE",
                source,
            })?;
        }
        if hugepages == HugePages::Thp {
            advise(region, libc::MADV_HUGEPAGE).map_err(|source| MemoryError::Advise {
                advice: "MADV_HUGEPAGE",
                source,
            })?;
        }
    }
    Ok(())
}

/// Guest memory whose regions each start on a 2 MiB boundary of the host's address space.
fn aligned_guest_memory(ranges: &[(GuestAddress, usize)]) -> Result<GuestMemoryMmap, MemoryError> {
    let prot = libc::PROT_READ | libc::PROT_WRITE;
    let flags = libc::MAP_ANONYMOUS | libc::MAP_NORESERVE | libc::MAP_PRIVATE;
    let mut regions = Vec::with_capacity(ranges.len());
    for &(start, len) in ranges {
        let host = map_aligned(len).map_err(MemoryError::MapAligned)?;
        // SAFETY: `host` is a fresh private anonymous mapping of exactly `len` bytes with `prot`
        // and `flags`, made for this region alone and never unmapped (guest memory lives as long
        // as the process), so the region may treat it as its own.
        let builder = unsafe { MmapRegionBuilder::new(len).with_raw_mmap_pointer(host) };
        let mapping = builder
            .with_mmap_prot(prot)
            .with_mmap_flags(flags)
            .build()
            .map_err(|e| MemoryError::MapAligned(std::io::Error::other(e.to_string())))?;
        let region = GuestRegionMmap::new(mapping, start).ok_or_else(|| {
            MemoryError::MapAligned(std::io::Error::other("region overflows the address space"))
        })?;
        regions.push(region);
    }
    GuestMemoryMmap::from_regions(regions)
        .map_err(|e| MemoryError::MapAligned(std::io::Error::other(e.to_string())))
}

/// Maps `len` bytes of private anonymous memory at a 2 MiB-aligned address: reserves 2 MiB more
/// than needed, maps the memory over the aligned part of the reservation, and unmaps the rest.
fn map_aligned(len: usize) -> std::io::Result<*mut u8> {
    let reserve = len
        .checked_add(HUGE_PAGE_SIZE)
        .ok_or_else(|| std::io::Error::other("guest memory too large"))?;
    // SAFETY: a new PROT_NONE reservation chosen by the kernel; it overlaps nothing of ours.
    let base = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            reserve,
            libc::PROT_NONE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    if base == libc::MAP_FAILED {
        return Err(std::io::Error::last_os_error());
    }
    let base_addr = base as usize;
    let aligned = base_addr.next_multiple_of(HUGE_PAGE_SIZE);
    let (head, tail_start) = (aligned - base_addr, aligned + len);
    let tail = base_addr + reserve - tail_start;
    // SAFETY: MAP_FIXED replaces only `[aligned, aligned + len)`, which lies inside the
    // reservation just made (`aligned - base < 2 MiB`), never memory anything else uses.
    let memory = unsafe {
        libc::mmap(
            aligned as *mut libc::c_void,
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE | libc::MAP_FIXED,
            -1,
            0,
        )
    };
    // SAFETY: the head and tail are the unused ends of the reservation, outside the memory kept.
    unsafe {
        if memory == libc::MAP_FAILED {
            let err = std::io::Error::last_os_error();
            libc::munmap(base, reserve);
            return Err(err);
        }
        if head > 0 {
            libc::munmap(base, head);
        }
        if tail > 0 {
            libc::munmap(tail_start as *mut libc::c_void, tail);
        }
    }
    Ok(aligned as *mut u8)
}

/// Registers every region of `mem` as a KVM memory slot (slot N is region N), with KVM's dirty
/// log on if `log_dirty`.
pub fn register_with_kvm(vm: &VmFd, mem: &GuestMemoryMmap, log_dirty: bool) -> Result<(), MemoryError> {
    for (slot, region) in mem.iter().enumerate() {
        let host = region
            .get_host_address(MemoryRegionAddress(0))
            .map_err(MemoryError::HostAddress)?;
        let slot_region = kvm_userspace_memory_region {
            slot: slot as u32,
            flags: if log_dirty { KVM_MEM_LOG_DIRTY_PAGES } else { 0 },
            guest_phys_addr: region.start_addr().raw_value(),
            memory_size: region.len(),
            userspace_addr: host as u64,
        };
        // SAFETY: the host range is a live mapping owned by `mem`, which the VM keeps alive for as long
        // as the VM exists (the VMM process lifetime), and slots never overlap (distinct regions).
        unsafe { vm.set_user_memory_region(slot_region) }.map_err(MemoryError::Register)?;
    }
    Ok(())
}

/// Pages of each region written since the last call, one bit per page: KVM's dirty log (what
/// vCPUs wrote, cleared as it is read) ORed with `devices` (what devices wrote, likewise).
pub fn take_dirty_pages(
    vm: &VmFd,
    mem: &GuestMemoryMmap,
    devices: &devices::virtio::dirty::DirtyPages,
) -> Result<Vec<Vec<u64>>, MemoryError> {
    mem.iter()
        .enumerate()
        .map(|(slot, region)| {
            let mut bits = vm
                .get_dirty_log(slot as u32, region.len() as usize)
                .map_err(MemoryError::DirtyLog)?;
            let written = devices.take(slot);
            for (word, dev) in bits.iter_mut().zip(written) {
                *word |= dev;
            }
            Ok(bits)
        })
        .collect()
}

/// Asks for transparent huge pages (as QEMU does for guest RAM): fewer host page faults and, under
/// shadow-paging hypervisors such as kvm_pvm, larger shadow mappings. Measured on a kvm_pvm host, four
/// pairs of boots side by side: median guest boot 0.76x of the same VMM without it. Best effort: where
/// THP is disabled the advice is ignored.
pub fn request_huge_pages(mem: &GuestMemoryMmap) {
    for region in mem.iter() {
        advise_huge_pages(region);
    }
}

fn advise_huge_pages(region: &GuestRegionMmap) {
    if let Err(e) = advise(region, libc::MADV_HUGEPAGE) {
        log::debug!("MADV_HUGEPAGE refused: {e}");
    }
}

/// `madvise` on a whole region, for advice that changes neither its contents nor its validity.
fn advise(region: &GuestRegionMmap, advice: libc::c_int) -> std::io::Result<()> {
    debug_assert!(matches!(advice, libc::MADV_HUGEPAGE | libc::MADV_MERGEABLE));
    let host = region
        .get_host_address(MemoryRegionAddress(0))
        .map_err(|e| std::io::Error::other(e.to_string()))?;
    // SAFETY: the range is a mapping this process owns and keeps mapped (the region); the advice
    // (MADV_HUGEPAGE, MADV_MERGEABLE) only changes how the kernel backs it, never its contents.
    let ret = unsafe { libc::madvise(host.cast(), region.len() as usize, advice) };
    if ret == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Best effort: kernels without `CONFIG_ANON_VMA_NAME` refuse, and the mapping stays unnamed.
fn name_mapping(region: &vm_memory::GuestRegionMmap) {
    let Ok(host) = region.get_host_address(MemoryRegionAddress(0)) else {
        return;
    };
    const PR_SET_VMA: libc::c_int = 0x5356_4d41;
    const PR_SET_VMA_ANON_NAME: libc::c_ulong = 0;
    // SAFETY: the call only reads the NUL-terminated name (a 'static CStr) and labels VMAs of a range
    // this process mapped; it does not touch the memory itself.
    let _ = unsafe {
        libc::prctl(
            PR_SET_VMA,
            PR_SET_VMA_ANON_NAME,
            host as libc::c_ulong,
            region.len() as libc::c_ulong,
            GUEST_RAM_NAME.as_ptr(),
        )
    };
}

/// Host physical memory in MiB, from `/proc/meminfo`.
fn host_memory_mib() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_more_than_the_host_has() {
        let host = host_memory_mib().unwrap();
        let err = create_guest_memory(host + 1, HugePages::Auto).unwrap_err();
        assert!(matches!(err, MemoryError::ExceedsHost { .. }), "{err}");
    }

    #[test]
    fn splits_around_the_hole() {
        let mem = create_guest_memory(3584, HugePages::Auto).unwrap();
        let regions: Vec<(u64, u64)> = mem
            .iter()
            .map(|r| (r.start_addr().raw_value(), r.len()))
            .collect();
        assert_eq!(regions, vec![(0, 3 << 30), (4 << 30, 512 << 20)]);
    }

    /// The VmFlags of the mapping that holds `addr`, from /proc/self/smaps.
    fn vm_flags(addr: u64) -> Vec<String> {
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let mut lines = smaps.lines();
        while let Some(line) = lines.next() {
            let range = line.split(' ').next().and_then(|r| r.split_once('-'));
            let Some((Ok(start), Ok(end))) =
                range.map(|(a, b)| (u64::from_str_radix(a, 16), u64::from_str_radix(b, 16)))
            else {
                continue;
            };
            if !(start..end).contains(&addr) {
                continue;
            }
            for l in lines.by_ref() {
                if let Some(flags) = l.strip_prefix("VmFlags:") {
                    return flags.split_whitespace().map(String::from).collect();
                }
            }
        }
        panic!("no mapping at {addr:#x}");
    }

    fn host_start(region: &GuestRegionMmap) -> u64 {
        region.get_host_address(MemoryRegionAddress(0)).unwrap() as u64
    }

    #[test]
    fn thp_memory_is_aligned_and_advised() {
        let mem = create_guest_memory(64, HugePages::Thp).unwrap();
        let region = mem.iter().next().unwrap();
        let start = host_start(region);
        assert_eq!(start % HUGE_PAGE_SIZE as u64, 0, "{start:#x}");
        assert!(vm_flags(start).iter().any(|f| f == "hg"), "{:?}", vm_flags(start));
        // Usable memory, of the right size.
        use vm_memory::Bytes;
        mem.write_obj(0x1234_5678u32, GuestAddress((64 << 20) - 4))
            .unwrap();
        assert!(mem.write_obj(0u32, GuestAddress(64 << 20)).is_err());
        assert!(!vm_flags(start).iter().any(|f| f == "mg"));
    }

    #[test]
    fn mergeable_memory_carries_the_ksm_flag() {
        let mem = create_guest_memory(16, HugePages::Off).unwrap();
        let start = host_start(mem.iter().next().unwrap());
        assert!(!vm_flags(start).iter().any(|f| f == "hg" || f == "mg"));
        apply_advice(&mem, true, HugePages::Off).unwrap();
        assert!(vm_flags(start).iter().any(|f| f == "mg"), "{:?}", vm_flags(start));
    }
}
