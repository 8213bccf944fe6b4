//! Minimal HW-reduced ACPI tables: RSDP, XSDT, FADT, MADT and a DSDT.
//!
//! They give the guest what it needs and no more: the CPUs and the IOAPIC (MADT), power off through
//! the FADT sleep control register and `\_S5`, reset through the FADT reset register, and the pvpanic
//! device so a guest panic reaches the VMM. HW-reduced mode also tells Linux there is no PIC, PIT
//! timer setup or PM timer to probe, which saves boot time.

use acpi_tables::aml;
use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::madt::{EnabledStatus, IoApic, LocalInterruptController, ProcessorLocalApic, MADT};
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::Aml;
use devices::legacy::{AcpiPowerManagement, ACPI_RESET_VALUE, ACPI_SLEEP_TYPE_S5};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::layout::{self, irqs, ports};

const OEM_ID: [u8; 6] = *b"VMMRS ";
const OEM_REVISION: u32 = 1;
/// FADT boot flags: legacy devices present, an i8042 (bit 1; without it, and without a PNP0303
/// device in the DSDT, Linux leaves the keyboard alone and Ctrl-Alt-Del cannot reach the guest), no
/// VGA. The i8042 answers every probe at once, so the guest's keyboard driver costs it no timeouts.
const IAPC_BOOT_ARCH: u16 = (1 << 0) | (1 << 1) | (1 << 2);

/// Errors writing the tables.
#[derive(Debug, thiserror::Error)]
pub enum AcpiError {
    /// The tables do not fit the reserved region.
    #[error("ACPI tables need {0} bytes, more than the reserved region")]
    TooLarge(u64),
    /// Guest memory rejected the write.
    #[error("writing ACPI tables: {0}")]
    Write(#[from] vm_memory::GuestMemoryError),
}

/// A virtio-mmio device as the DSDT describes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VirtioMmioDevice {
    /// Guest physical address of its register window.
    pub base: u64,
    /// Size of the window.
    pub len: u64,
    /// Its interrupt line (an IOAPIC pin).
    pub gsi: u32,
}

/// Writes the tables for `vcpus` CPUs and the given virtio devices into the reserved region; returns
/// the RSDP address.
pub fn write_tables(
    mem: &GuestMemoryMmap,
    vcpus: u8,
    virtio: &[VirtioMmioDevice],
) -> Result<GuestAddress, AcpiError> {
    let mut writer = TableWriter {
        mem,
        next: layout::ACPI_TABLES_ADDR,
    };
    // The RSDP goes first so that a legacy scan of 0xe0000..0x100000 finds it as well.
    let rsdp_addr = writer.reserve(Rsdp::len() as u64)?;

    let dsdt_addr = writer.write(&dsdt(virtio))?;
    let fadt_addr = writer.write(&fadt(dsdt_addr))?;
    let madt_addr = writer.write(&madt(vcpus))?;
    let mut xsdt = XSDT::new(OEM_ID, *b"VMMXSDT ", OEM_REVISION);
    xsdt.add_entry(fadt_addr.0);
    xsdt.add_entry(madt_addr.0);
    let xsdt_addr = writer.write(&xsdt)?;

    mem.write_slice(&to_bytes(&Rsdp::new(OEM_ID, xsdt_addr.0)), rsdp_addr)?;
    Ok(rsdp_addr)
}

struct TableWriter<'a> {
    mem: &'a GuestMemoryMmap,
    next: u64,
}

impl TableWriter<'_> {
    fn reserve(&mut self, len: u64) -> Result<GuestAddress, AcpiError> {
        let start = self.next;
        let end = start + len;
        if end > layout::ACPI_TABLES_END {
            return Err(AcpiError::TooLarge(end - layout::ACPI_TABLES_ADDR));
        }
        self.next = end.next_multiple_of(8);
        Ok(GuestAddress(start))
    }

    fn write(&mut self, table: &dyn Aml) -> Result<GuestAddress, AcpiError> {
        let bytes = to_bytes(table);
        let addr = self.reserve(bytes.len() as u64)?;
        self.mem.write_slice(&bytes, addr)?;
        Ok(addr)
    }
}

fn to_bytes(table: &dyn Aml) -> Vec<u8> {
    let mut bytes = Vec::new();
    table.to_aml_bytes(&mut bytes);
    bytes
}

fn io_register(port: u64) -> GAS {
    GAS::new(AddressSpace::SystemIo, 8, 0, AccessSize::ByteAccess, port)
}

fn fadt(dsdt: GuestAddress) -> acpi_tables::fadt::FADT {
    let mut fadt = FADTBuilder::new(OEM_ID, *b"VMMFACP ", OEM_REVISION)
        .flag(Flags::HwReducedAcpi)
        .flag(Flags::ResetRegSup)
        .flag(Flags::PwrButton)
        .flag(Flags::SlpButton)
        .dsdt_64(dsdt.0);
    let sleep = io_register(ports::ACPI_PM + AcpiPowerManagement::SLEEP_CONTROL_OFFSET);
    fadt.sleep_control_reg = sleep;
    fadt.sleep_status_reg = sleep;
    fadt.reset_reg = io_register(ports::ACPI_PM + AcpiPowerManagement::RESET_OFFSET);
    fadt.reset_value = ACPI_RESET_VALUE;
    fadt.iapc_boot_arch = IAPC_BOOT_ARCH.into();
    fadt.finalize()
}

fn madt(vcpus: u8) -> MADT {
    let mut madt = MADT::new(
        OEM_ID,
        *b"VMMMADT ",
        OEM_REVISION,
        LocalInterruptController::Address(layout::LAPIC_ADDR as u32),
    );
    for id in 0..vcpus {
        madt.add_structure(ProcessorLocalApic::new(id, id, EnabledStatus::Enabled));
    }
    madt.add_structure(IoApic::new(0, layout::IOAPIC_ADDR as u32, 0));
    madt
}

/// Virtio-mmio devices are described here rather than with `virtio_mmio.device=` on the command line:
/// with hardware-reduced ACPI there is no legacy PIC, so Linux routes an interrupt line only for a
/// device that ACPI names (`LNRO0005` is virtio-mmio's ACPI ID).
fn dsdt(virtio: &[VirtioMmioDevice]) -> Sdt {
    let mut dsdt = Sdt::new(*b"DSDT", 36, 6, OEM_ID, *b"VMMDSDT ", OEM_REVISION);
    let s5_type = ACPI_SLEEP_TYPE_S5;
    // \_S5: the SLP_TYP values for soft-off (PM1a, PM1b, two reserved).
    aml::Name::new(
        "_S5_".into(),
        &aml::Package::new(vec![&s5_type, &s5_type, &0u8, &0u8]),
    )
    .to_aml_bytes(&mut dsdt);
    let pvpanic_port = ports::PVPANIC as u16;
    let hid = aml::Name::new("_HID".into(), &"QEMU0001");
    let io = aml::IO::new(pvpanic_port, pvpanic_port, 1, 1);
    let crs = aml::Name::new("_CRS".into(), &aml::ResourceTemplate::new(vec![&io]));
    let pvpanic = aml::Device::new("PEVT".into(), vec![&hid, &crs]);
    aml::Scope::new("\\_SB_".into(), vec![&pvpanic]).to_aml_bytes(&mut dsdt);
    write_keyboard_device(&mut dsdt);
    for (i, dev) in virtio.iter().enumerate() {
        write_virtio_device(i, dev, &mut dsdt);
    }
    dsdt.update_checksum();
    dsdt
}

/// Emits `\_SB.PS2K`: the i8042 with its keyboard (PNP0303) on IRQ 1. Without it Linux has no
/// interrupt for the keyboard (no legacy PIC under hardware-reduced ACPI: the driver's `request_irq`
/// fails with EINVAL), so Ctrl-Alt-Del could not reach the guest.
fn write_keyboard_device(sink: &mut Sdt) {
    let hid = aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0303"));
    let data = ports::I8042 as u16;
    let command = data + 4;
    let data_io = aml::IO::new(data, data, 1, 1);
    let command_io = aml::IO::new(command, command, 1, 1);
    let irq = aml::Interrupt::new(true, true, false, false, irqs::KEYBOARD);
    let crs = aml::Name::new(
        "_CRS".into(),
        &aml::ResourceTemplate::new(vec![&data_io, &command_io, &irq]),
    );
    let device = aml::Device::new("PS2K".into(), vec![&hid, &crs]);
    aml::Scope::new("\\_SB_".into(), vec![&device]).to_aml_bytes(sink);
}

/// Emits `\_SB.Vnnn`: one virtio-mmio device with its window and edge-triggered interrupt.
fn write_virtio_device(index: usize, dev: &VirtioMmioDevice, sink: &mut Sdt) {
    let hid = aml::Name::new("_HID".into(), &"LNRO0005");
    let uid = aml::Name::new("_UID".into(), &(index as u32));
    // The window is below 4 GiB and 4 KiB long (the layout puts it there), so the casts are exact.
    let window = aml::Memory32Fixed::new(true, dev.base as u32, dev.len as u32);
    let irq = aml::Interrupt::new(true, true, false, false, dev.gsi);
    let resources = aml::ResourceTemplate::new(vec![&window, &irq]);
    let crs = aml::Name::new("_CRS".into(), &resources);
    let name = format!("V{index:03}");
    let device = aml::Device::new(name.as_str().into(), vec![&hid, &uid, &crs]);
    aml::Scope::new("\\_SB_".into(), vec![&device]).to_aml_bytes(sink);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn checksum_ok(bytes: &[u8]) -> bool {
        bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b)) == 0
    }

    #[test]
    fn tables_are_linked_and_checksummed() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 2 << 20)]).unwrap();
        let virtio = [VirtioMmioDevice {
            base: 0xd000_0000,
            len: 0x1000,
            gsi: 5,
        }];
        let rsdp = write_tables(&mem, 4, &virtio).unwrap();
        assert_eq!(rsdp, GuestAddress(layout::ACPI_TABLES_ADDR));

        let mut rsdp_bytes = [0u8; 36];
        mem.read_slice(&mut rsdp_bytes, rsdp).unwrap();
        assert_eq!(&rsdp_bytes[..8], b"RSD PTR ");
        assert!(checksum_ok(&rsdp_bytes[..20]));
        assert!(checksum_ok(&rsdp_bytes));
        let xsdt_addr = u64::from_le_bytes(rsdp_bytes[24..32].try_into().unwrap());

        let read_table = |addr: u64| {
            let mut header = [0u8; 36];
            mem.read_slice(&mut header, GuestAddress(addr)).unwrap();
            let len = u32::from_le_bytes(header[4..8].try_into().unwrap()) as usize;
            let mut table = vec![0u8; len];
            mem.read_slice(&mut table, GuestAddress(addr)).unwrap();
            assert!(checksum_ok(&table), "bad checksum in {:?}", &table[..4]);
            table
        };
        let xsdt = read_table(xsdt_addr);
        assert_eq!(&xsdt[..4], b"XSDT");
        let entries: Vec<u64> = xsdt[36..]
            .chunks(8)
            .map(|c| u64::from_le_bytes(c.try_into().unwrap()))
            .collect();
        let fadt = read_table(entries[0]);
        assert_eq!(&fadt[..4], b"FACP");
        let madt = read_table(entries[1]);
        assert_eq!(&madt[..4], b"APIC");
        // Header + LAPIC address + flags, 4 local APICs of 8 bytes, one 12-byte IOAPIC.
        assert_eq!(madt.len(), 44 + 4 * 8 + 12);
        let dsdt_addr = u64::from_le_bytes(fadt[140..148].try_into().unwrap());
        let dsdt = read_table(dsdt_addr);
        assert_eq!(&dsdt[..4], b"DSDT");
        assert!(dsdt.windows(4).any(|w| w == b"_S5_"));
        assert!(dsdt.windows(8).any(|w| w == b"QEMU0001"));
        assert!(dsdt.windows(8).any(|w| w == b"LNRO0005"));
        assert!(dsdt.windows(4).any(|w| w == b"V000"));
        assert!(dsdt.windows(4).any(|w| w == b"PS2K"));
    }
}
