//! The guest physical address map.
//!
//! ```text
//! 0x0000_0500  GDT                    0x0000_9000  PML4 / PDPT / PD (64-bit boot only)
//! 0x0000_0520  IDT                    0x0002_0000  kernel command line
//! 0x0000_6000  PVH start info         0x0009_fc00  EBDA (reserved)
//! 0x0000_6040  PVH module list        0x000e_0000  ACPI tables (reserved)
//! 0x0000_6100  PVH memory map         0x0010_0000  high memory: kernel, then RAM
//! 0x0000_7000  zero page (boot_params)
//! 0x0000_8ff0  boot stack
//! RAM below MMIO_HOLE_START; the hole [3 GiB, 4 GiB) holds device MMIO, the IOAPIC and the LAPIC;
//! RAM beyond 3 GiB continues at 4 GiB.
//! ```

/// Global descriptor table used at entry.
pub const GDT_ADDR: u64 = 0x500;
/// Interrupt descriptor table (empty) used at entry.
pub const IDT_ADDR: u64 = 0x520;
/// PVH `hvm_start_info`.
pub const PVH_INFO_ADDR: u64 = 0x6000;
/// PVH module list (the initrd).
pub const PVH_MODLIST_ADDR: u64 = 0x6040;
/// PVH memory map.
pub const PVH_MEMMAP_ADDR: u64 = 0x6100;
/// Linux `boot_params` ("zero page").
pub const ZERO_PAGE_ADDR: u64 = 0x7000;
/// Initial stack pointer for the 64-bit boot protocol.
pub const BOOT_STACK_ADDR: u64 = 0x8ff0;
/// Identity-mapping page tables for the 64-bit boot protocol.
pub const PML4_ADDR: u64 = 0x9000;
/// Page-directory-pointer table.
pub const PDPT_ADDR: u64 = 0xa000;
/// Page directory (512 x 2 MiB pages = the first 1 GiB).
pub const PD_ADDR: u64 = 0xb000;
/// Kernel command line.
pub const CMDLINE_ADDR: u64 = 0x20000;
/// Longest command line, including the NUL (x86 `COMMAND_LINE_SIZE`).
pub const CMDLINE_MAX_LEN: usize = 2048;
/// Extended BIOS data area; reserved in the memory map.
pub const EBDA_ADDR: u64 = 0x9fc00;
/// ACPI tables; reserved in the memory map. The RSDP sits at its start, where a legacy scan finds it.
pub const ACPI_TABLES_ADDR: u64 = 0xe0000;
/// End of the ACPI tables region.
pub const ACPI_TABLES_END: u64 = 0x10_0000;
/// Start of high memory, where kernels load.
pub const HIGH_MEMORY_ADDR: u64 = 0x10_0000;
/// Start of the 32-bit MMIO hole.
pub const MMIO_HOLE_START: u64 = 0xc000_0000;
/// End of the 32-bit MMIO hole; RAM above the hole resumes here.
pub const MMIO_HOLE_END: u64 = 0x1_0000_0000;
/// IOAPIC registers.
pub const IOAPIC_ADDR: u64 = 0xfec0_0000;
/// Local APIC registers.
pub const LAPIC_ADDR: u64 = 0xfee0_0000;
/// KVM's three-page TSS region, inside the MMIO hole where no RAM or device sits.
pub const KVM_TSS_ADDR: u64 = 0xfffb_d000;

/// Legacy I/O ports.
pub mod ports {
    /// i8042 keyboard controller (0x60..=0x64).
    pub const I8042: u64 = 0x60;
    /// CMOS RTC index and data (0x70, 0x71).
    pub const RTC: u64 = 0x70;
    /// The boot-timer port (Firecracker's).
    pub const BOOT_TIMER: u64 = 0x3f0;
    /// COM1.
    pub const COM1: u64 = 0x3f8;
    /// pvpanic (QEMU's default port).
    pub const PVPANIC: u64 = 0x505;
    /// ACPI sleep control/status and reset registers.
    pub const ACPI_PM: u64 = 0x600;
}

/// Legacy interrupt lines (GSIs on the IOAPIC).
pub mod irqs {
    /// The i8042's keyboard.
    pub const KEYBOARD: u32 = 1;
    /// COM1.
    pub const COM1: u32 = 4;
    /// Interrupt lines for virtio-mmio devices, in allocation order: the free ISA lines, then the
    /// IOAPIC's other pins. (1, 3, 4, 8 and 13 belong to the keyboard, COM2, COM1, the RTC and the
    /// FPU.) Lines above 15 work because the devices are described in the DSDT: Linux maps a GSI to
    /// an interrupt only for a device that ACPI names.
    pub const VIRTIO: [u32; 17] = [5, 6, 7, 9, 10, 11, 12, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23];
}

/// Start of the virtio-mmio register windows (one 4 KiB page per device), inside the MMIO hole.
pub const VIRTIO_MMIO_BASE: u64 = 0xd000_0000;

/// One contiguous range of guest RAM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RamRange {
    /// Guest physical start.
    pub start: u64,
    /// Length in bytes.
    pub len: u64,
}

/// Splits `mem_bytes` of RAM around the MMIO hole: up to 3 GiB at 0, the rest from 4 GiB.
pub fn ram_ranges(mem_bytes: u64) -> Vec<RamRange> {
    let low = mem_bytes.min(MMIO_HOLE_START);
    let mut ranges = vec![RamRange { start: 0, len: low }];
    if mem_bytes > low {
        ranges.push(RamRange {
            start: MMIO_HOLE_END,
            len: mem_bytes - low,
        });
    }
    ranges
}

/// Kind of a memory-map entry, with the values of the E820 / PVH memory map.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum MemoryKind {
    /// Usable RAM.
    Ram = 1,
    /// Reserved: the guest must not use it as RAM.
    Reserved = 2,
}

/// One entry of the memory map the guest is given.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryMapEntry {
    /// Guest physical start.
    pub start: u64,
    /// Length in bytes.
    pub len: u64,
    /// What the range is.
    pub kind: MemoryKind,
}

/// The guest's memory map: RAM with the legacy BIOS areas carved out as the guest expects.
pub fn memory_map(ram: &[RamRange]) -> Vec<MemoryMapEntry> {
    let mut map = vec![
        MemoryMapEntry {
            start: 0,
            len: EBDA_ADDR,
            kind: MemoryKind::Ram,
        },
        MemoryMapEntry {
            start: EBDA_ADDR,
            len: 0xa0000 - EBDA_ADDR,
            kind: MemoryKind::Reserved,
        },
        MemoryMapEntry {
            start: ACPI_TABLES_ADDR,
            len: ACPI_TABLES_END - ACPI_TABLES_ADDR,
            kind: MemoryKind::Reserved,
        },
    ];
    for range in ram {
        let start = range.start.max(HIGH_MEMORY_ADDR);
        let end = range.start + range.len;
        if end > start {
            map.push(MemoryMapEntry {
                start,
                len: end - start,
                kind: MemoryKind::Ram,
            });
        }
    }
    map
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    #[test]
    fn ram_below_the_hole_is_one_range() {
        assert_eq!(
            ram_ranges(128 * MIB),
            vec![RamRange {
                start: 0,
                len: 128 * MIB
            }]
        );
        assert_eq!(
            ram_ranges(3072 * MIB),
            vec![RamRange {
                start: 0,
                len: 3072 * MIB
            }]
        );
    }

    #[test]
    fn ram_crossing_the_hole_resumes_at_4g() {
        assert_eq!(
            ram_ranges(3584 * MIB),
            vec![
                RamRange {
                    start: 0,
                    len: 3072 * MIB
                },
                RamRange {
                    start: 4096 * MIB,
                    len: 512 * MIB
                }
            ]
        );
        let map = memory_map(&ram_ranges(3584 * MIB));
        let ram: u64 = map
            .iter()
            .filter(|e| e.kind == MemoryKind::Ram)
            .map(|e| e.len)
            .sum();
        // All RAM except the 384 KiB between the EBDA and 1 MiB.
        assert_eq!(ram, 3584 * MIB - (HIGH_MEMORY_ADDR - EBDA_ADDR));
        assert_eq!(map.last().unwrap().start, 4096 * MIB);
    }
}
