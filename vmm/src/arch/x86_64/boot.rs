//! Loading the kernel, initrd and command line, and writing the boot information the kernel reads at
//! entry: `hvm_start_info` for PVH, `boot_params` (the zero page) for the 64-bit Linux boot protocol.

use std::fs::File;
use std::io::{Seek, SeekFrom};

use linux_loader::cmdline::Cmdline;
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use linux_loader::loader::bzimage::{BzImage, Error as BzImageError};
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info, XEN_HVM_START_MAGIC_VALUE,
};
use linux_loader::loader::elf::{Elf, Error as ElfError};
use linux_loader::loader::{self, KernelLoader, PvhBootCapability};
use vm_memory::{
    Address, ByteValued, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
};

use super::layout::{self, MemoryMapEntry};

/// Errors loading what the guest boots.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// The kernel is neither an ELF vmlinux nor a bzImage.
    #[error("kernel is neither an x86_64 ELF vmlinux nor a bzImage")]
    UnknownKernelFormat,
    /// The kernel has a recognised format but could not be loaded.
    #[error("cannot load kernel: {0}")]
    LoadKernel(loader::Error),
    /// The command line is invalid or too long.
    #[error("invalid kernel command line: {0}")]
    Cmdline(linux_loader::cmdline::Error),
    /// Reading the initrd failed.
    #[error("cannot read initrd: {0}")]
    ReadInitrd(std::io::Error),
    /// The initrd does not fit in guest memory below the limit the kernel accepts.
    #[error("initrd of {size} bytes does not fit in guest memory")]
    InitrdTooLarge {
        /// Size of the initrd file.
        size: u64,
    },
    /// Writing boot structures into guest memory failed.
    #[error("writing boot information: {0}")]
    Write(#[from] vm_memory::GuestMemoryError),
}

/// How the vCPU enters the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryPoint {
    /// PVH: 32-bit protected mode, paging off, `%ebx` = `hvm_start_info`.
    Pvh(GuestAddress),
    /// 64-bit Linux boot protocol: long mode with identity paging, `%rsi` = `boot_params`.
    Linux64(GuestAddress),
}

impl EntryPoint {
    /// Where execution starts.
    pub fn address(&self) -> GuestAddress {
        match self {
            EntryPoint::Pvh(a) | EntryPoint::Linux64(a) => *a,
        }
    }
}

/// A kernel in guest memory.
#[derive(Clone, Copy)]
pub struct LoadedKernel {
    /// How to enter it.
    pub entry: EntryPoint,
    /// The bzImage setup header, which the zero page must carry.
    setup_header: Option<setup_header>,
    /// First byte past the loaded image.
    end: u64,
}

/// Loads an ELF vmlinux (preferring its PVH entry) or a bzImage.
pub fn load_kernel(mem: &GuestMemoryMmap, kernel: &mut File) -> Result<LoadedKernel, BootError> {
    let high = Some(GuestAddress(layout::HIGH_MEMORY_ADDR));
    match Elf::load(mem, None, kernel, high) {
        Ok(r) => {
            let entry = match r.pvh_boot_cap {
                PvhBootCapability::PvhEntryPresent(addr) => EntryPoint::Pvh(addr),
                _ => EntryPoint::Linux64(r.kernel_load),
            };
            return Ok(LoadedKernel {
                entry,
                setup_header: None,
                end: r.kernel_end,
            });
        }
        // Too short for an ELF header, or no ELF magic: try the other format.
        Err(loader::Error::Elf(ElfError::InvalidElfMagicNumber | ElfError::ReadElfHeader)) => {}
        Err(e) => return Err(BootError::LoadKernel(e)),
    }
    match BzImage::load(mem, None, kernel, high) {
        Ok(r) => Ok(LoadedKernel {
            // The 64-bit entry point sits 0x200 bytes into the protected-mode kernel.
            entry: EntryPoint::Linux64(r.kernel_load.unchecked_add(0x200)),
            setup_header: r.setup_header,
            end: r.kernel_end,
        }),
        Err(loader::Error::Bzimage(
            BzImageError::InvalidBzImage | BzImageError::ReadBzImageHeader | BzImageError::SeekBzImageHeader,
        )) => Err(BootError::UnknownKernelFormat),
        Err(e) => Err(BootError::LoadKernel(e)),
    }
}

/// An initrd in guest memory.
#[derive(Debug, Clone, Copy)]
pub struct InitrdRegion {
    /// Guest physical start.
    pub addr: GuestAddress,
    /// Size in bytes.
    pub size: u64,
}

/// Highest address (exclusive) an initrd may end at: below 2 GiB, which every kernel since boot
/// protocol 2.03 accepts (`initrd_addr_max` = 0x7fffffff), so the initrd can be placed before the
/// kernel's own header has been read. [`check_initrd_placement`] verifies it afterwards.
const INITRD_LIMIT: u64 = 0x8000_0000;

/// Loads the initrd page aligned as high in low memory as any kernel accepts. Independent of the kernel,
/// so the two load in parallel.
pub fn load_initrd(mem: &GuestMemoryMmap, initrd: &mut File) -> Result<InitrdRegion, BootError> {
    let size = initrd.seek(SeekFrom::End(0)).map_err(BootError::ReadInitrd)?;
    initrd.rewind().map_err(BootError::ReadInitrd)?;
    let low_ram_end = mem
        .iter()
        .map(|r| r.start_addr().raw_value() + r.len())
        .filter(|end| *end <= layout::MMIO_HOLE_START)
        .max()
        .unwrap_or(0);
    let limit = low_ram_end.min(INITRD_LIMIT);
    let too_large = || BootError::InitrdTooLarge { size };
    let addr = limit.checked_sub(size).ok_or_else(too_large)? & !0xfff;
    if addr < layout::HIGH_MEMORY_ADDR || size > usize::MAX as u64 {
        return Err(too_large());
    }
    mem.read_exact_volatile_from(GuestAddress(addr), initrd, size as usize)
        .map_err(|e| BootError::ReadInitrd(std::io::Error::other(e)))?;
    Ok(InitrdRegion {
        addr: GuestAddress(addr),
        size,
    })
}

/// Checks that a separately loaded initrd neither overlaps the kernel nor ends beyond what its
/// boot protocol accepts.
pub fn check_initrd_placement(kernel: &LoadedKernel, initrd: &InitrdRegion) -> Result<(), BootError> {
    let end = initrd.addr.0 + initrd.size;
    let max_end = kernel
        .setup_header
        .map_or(u64::MAX, |hdr| u64::from(hdr.initrd_addr_max) + 1);
    if initrd.addr.0 < kernel.end || end > max_end {
        return Err(BootError::InitrdTooLarge { size: initrd.size });
    }
    Ok(())
}

/// Builds and writes the command line; returns its length including the NUL.
pub fn write_cmdline(mem: &GuestMemoryMmap, cmdline: &str) -> Result<usize, BootError> {
    let mut line = Cmdline::new(layout::CMDLINE_MAX_LEN).map_err(BootError::Cmdline)?;
    line.insert_str(cmdline).map_err(BootError::Cmdline)?;
    let c = line.as_cstring().map_err(BootError::Cmdline)?;
    let bytes = c.as_bytes_with_nul();
    mem.write_slice(bytes, GuestAddress(layout::CMDLINE_ADDR))?;
    Ok(bytes.len())
}

/// Everything the boot information describes.
pub struct BootInfo<'a> {
    /// The loaded kernel.
    pub kernel: &'a LoadedKernel,
    /// The loaded initrd, if any.
    pub initrd: Option<InitrdRegion>,
    /// Length of the command line including its NUL.
    pub cmdline_len: usize,
    /// The guest's memory map.
    pub memory_map: &'a [MemoryMapEntry],
    /// Where the ACPI RSDP is.
    pub rsdp: GuestAddress,
}

/// Writes the structure the kernel's entry point expects.
pub fn write_boot_info(mem: &GuestMemoryMmap, info: &BootInfo) -> Result<(), BootError> {
    match info.kernel.entry {
        EntryPoint::Pvh(_) => write_pvh_start_info(mem, info),
        EntryPoint::Linux64(_) => write_zero_page(mem, info),
    }
}

// SAFETY: plain C structs of integers (boot_params is packed) for which every byte pattern is valid.
unsafe impl ByteValued for ZeroPage {}
// SAFETY: as above; hvm_start_info has no padding (its last field is an explicit `reserved`).
unsafe impl ByteValued for StartInfo {}
// SAFETY: as above; two u64s, a u32 and an explicit u32 `reserved`: no padding.
unsafe impl ByteValued for MemmapEntry {}
// SAFETY: as above; four u64s: no padding.
unsafe impl ByteValued for ModlistEntry {}

#[derive(Clone, Copy, Default)]
#[repr(transparent)]
struct ZeroPage(boot_params);
#[derive(Clone, Copy, Default)]
#[repr(transparent)]
struct StartInfo(hvm_start_info);
#[derive(Clone, Copy, Default)]
#[repr(transparent)]
struct MemmapEntry(hvm_memmap_table_entry);
#[derive(Clone, Copy, Default)]
#[repr(transparent)]
struct ModlistEntry(hvm_modlist_entry);

fn write_pvh_start_info(mem: &GuestMemoryMmap, info: &BootInfo) -> Result<(), BootError> {
    let mut start = hvm_start_info {
        magic: XEN_HVM_START_MAGIC_VALUE,
        version: 1,
        cmdline_paddr: layout::CMDLINE_ADDR,
        rsdp_paddr: info.rsdp.0,
        memmap_paddr: layout::PVH_MEMMAP_ADDR,
        memmap_entries: info.memory_map.len() as u32,
        ..Default::default()
    };
    if let Some(initrd) = info.initrd {
        let module = hvm_modlist_entry {
            paddr: initrd.addr.0,
            size: initrd.size,
            ..Default::default()
        };
        mem.write_obj(ModlistEntry(module), GuestAddress(layout::PVH_MODLIST_ADDR))?;
        start.nr_modules = 1;
        start.modlist_paddr = layout::PVH_MODLIST_ADDR;
    }
    for (i, e) in info.memory_map.iter().enumerate() {
        let entry = hvm_memmap_table_entry {
            addr: e.start,
            size: e.len,
            type_: e.kind as u32,
            reserved: 0,
        };
        let addr = layout::PVH_MEMMAP_ADDR + (i * std::mem::size_of::<MemmapEntry>()) as u64;
        mem.write_obj(MemmapEntry(entry), GuestAddress(addr))?;
    }
    mem.write_obj(StartInfo(start), GuestAddress(layout::PVH_INFO_ADDR))?;
    Ok(())
}

const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448; // "HdrS"
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT: u32 = 0x100_0000;

fn write_zero_page(mem: &GuestMemoryMmap, info: &BootInfo) -> Result<(), BootError> {
    let mut params = boot_params::default();
    if let Some(hdr) = info.kernel.setup_header {
        params.hdr = hdr;
    }
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
    params.hdr.header = KERNEL_HDR_MAGIC;
    params.hdr.cmd_line_ptr = layout::CMDLINE_ADDR as u32;
    params.hdr.cmdline_size = info.cmdline_len as u32;
    params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT;
    if let Some(initrd) = info.initrd {
        // load_initrd placed it below 4 GiB.
        params.hdr.ramdisk_image = initrd.addr.0 as u32;
        params.hdr.ramdisk_size = initrd.size as u32;
    }
    params.acpi_rsdp_addr = info.rsdp.0;
    for (i, e) in info.memory_map.iter().take(params.e820_table.len()).enumerate() {
        params.e820_table[i] = boot_e820_entry {
            addr: e.start,
            size: e.len,
            r#type: e.kind as u32,
        };
    }
    params.e820_entries = info.memory_map.len().min(params.e820_table.len()) as u8;
    mem.write_obj(ZeroPage(params), GuestAddress(layout::ZERO_PAGE_ADDR))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    fn temp_file(bytes: &[u8]) -> File {
        let path =
            std::env::temp_dir().join(format!("vmm-initrd-test-{}-{}", std::process::id(), bytes.len()));
        File::create(&path).unwrap().write_all(bytes).unwrap();
        let file = File::open(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        file
    }

    fn kernel_ending_at(end: u64) -> LoadedKernel {
        LoadedKernel {
            entry: EntryPoint::Pvh(GuestAddress(0x100_0000)),
            setup_header: None,
            end,
        }
    }

    #[test]
    fn initrd_goes_to_the_top_of_low_memory_below_2g() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 64 << 20)]).unwrap();
        let initrd = load_initrd(&mem, &mut temp_file(&[7u8; 5000])).unwrap();
        assert_eq!(initrd.addr.0, (64 << 20) - 0x2000);
        assert_eq!(initrd.size, 5000);
        let mut back = [0u8; 5000];
        mem.read_slice(&mut back, initrd.addr).unwrap();
        assert!(back.iter().all(|b| *b == 7));
        check_initrd_placement(&kernel_ending_at(32 << 20), &initrd).unwrap();
        // Overlapping the kernel is refused.
        assert!(check_initrd_placement(&kernel_ending_at(64 << 20), &initrd).is_err());

        let big = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 3 << 30)]).unwrap();
        let initrd = load_initrd(&big, &mut temp_file(&[1u8; 100])).unwrap();
        assert_eq!(initrd.addr.0, INITRD_LIMIT - 0x1000);
    }

    #[test]
    fn initrd_larger_than_memory_is_an_error() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 2 << 20)]).unwrap();
        let err = load_initrd(&mem, &mut temp_file(&[0u8; 3 << 20])).unwrap_err();
        assert!(
            matches!(err, BootError::InitrdTooLarge { size } if size == 3 << 20),
            "{err}"
        );
    }
}
