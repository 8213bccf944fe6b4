//! Guest RAM: anonymous host mappings, laid out around the MMIO hole and registered with KVM.

use std::ffi::CStr;

use kvm_bindings::{kvm_userspace_memory_region, KVM_MEM_LOG_DIRTY_PAGES};
use kvm_ioctls::VmFd;
use vm_memory::{
    Address, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, MemoryRegionAddress,
};

use crate::arch::layout;

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
}

/// Maps `mib` MiB of guest RAM. Fails early, with a clear message, when the host could never back it.
pub fn create_guest_memory(mib: u64) -> Result<GuestMemoryMmap, MemoryError> {
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
    let mem = GuestMemoryMmap::from_ranges(&ranges).map_err(MemoryError::Map)?;
    for region in mem.iter() {
        name_mapping(region);
    }
    Ok(mem)
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

fn advise_huge_pages(region: &vm_memory::GuestRegionMmap) {
    let Ok(host) = region.get_host_address(MemoryRegionAddress(0)) else {
        return;
    };
    // SAFETY: advisory only; the range is a private anonymous mapping this process owns and keeps
    // mapped, and MADV_HUGEPAGE changes neither its contents nor its validity.
    let ret = unsafe { libc::madvise(host.cast(), region.len() as usize, libc::MADV_HUGEPAGE) };
    if ret != 0 {
        log::debug!("MADV_HUGEPAGE refused: {}", std::io::Error::last_os_error());
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
        let err = create_guest_memory(host + 1).unwrap_err();
        assert!(matches!(err, MemoryError::ExceedsHost { .. }), "{err}");
    }

    #[test]
    fn splits_around_the_hole() {
        let mem = create_guest_memory(3584).unwrap();
        let regions: Vec<(u64, u64)> = mem
            .iter()
            .map(|r| (r.start_addr().raw_value(), r.len()))
            .collect();
        assert_eq!(regions, vec![(0, 3 << 30), (4 << 30, 512 << 20)]);
    }
}
