//! The KVM VM: in-kernel interrupt controllers and timer, and the capabilities the VMM relies on.

use kvm_bindings::{
    kvm_clock_data, kvm_irqchip, kvm_pit_config, kvm_pit_state2, KVM_CLOCK_REALTIME, KVM_IRQCHIP_IOAPIC,
    KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Cap, Kvm, VmFd};

use crate::arch::layout;

/// Errors creating the VM.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// `/dev/kvm` could not be opened.
    #[error("cannot open /dev/kvm: {0} (is KVM available and accessible to this user?)")]
    OpenKvm(kvm_ioctls::Error),
    /// The host's KVM lacks a capability the VMM needs.
    #[error("host KVM lacks the required capability {0:?}")]
    MissingCap(Cap),
    /// A KVM ioctl failed.
    #[error("{0} failed: {1}")]
    Kvm(&'static str, kvm_ioctls::Error),
}

const REQUIRED_CAPS: [Cap; 6] = [
    Cap::Irqchip,
    Cap::Irqfd,
    Cap::Ioeventfd,
    Cap::Pit2,
    Cap::UserMemory,
    Cap::ExtCpuid,
];

/// Opens `/dev/kvm` and checks it offers what the VMM needs.
pub fn open_kvm() -> Result<Kvm, VmError> {
    let kvm = Kvm::new().map_err(VmError::OpenKvm)?;
    if let Some(cap) = REQUIRED_CAPS.into_iter().find(|c| !kvm.check_extension(*c)) {
        return Err(VmError::MissingCap(cap));
    }
    Ok(kvm)
}

/// Creates a VM with an in-kernel IOAPIC/PIC/LAPIC and PIT.
pub fn create_vm(kvm: &Kvm) -> Result<VmFd, VmError> {
    let vm = kvm.create_vm().map_err(|e| VmError::Kvm("KVM_CREATE_VM", e))?;
    vm.set_tss_address(layout::KVM_TSS_ADDR as usize)
        .map_err(|e| VmError::Kvm("KVM_SET_TSS_ADDR", e))?;
    vm.create_irq_chip()
        .map_err(|e| VmError::Kvm("KVM_CREATE_IRQCHIP", e))?;
    let pit = kvm_pit_config {
        flags: KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    };
    vm.create_pit2(pit)
        .map_err(|e| VmError::Kvm("KVM_CREATE_PIT2", e))?;
    Ok(vm)
}

/// The in-kernel devices' state: both PICs, the IOAPIC, the PIT and the guest clock.
#[derive(Clone, serde::Serialize, serde::Deserialize)]
pub struct VmState {
    /// The master PIC.
    pub pic_master: kvm_irqchip,
    /// The slave PIC.
    pub pic_slave: kvm_irqchip,
    /// The IOAPIC.
    pub ioapic: kvm_irqchip,
    /// The PIT.
    pub pit: kvm_pit_state2,
    /// kvmclock, with the host's wall-clock time it was read at.
    pub clock: kvm_clock_data,
}

const IRQCHIPS: [u32; 3] = [KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, KVM_IRQCHIP_IOAPIC];

impl VmState {
    /// Reads the state of a VM whose vCPUs are stopped.
    pub fn save(vm: &VmFd) -> Result<Self, VmError> {
        let mut chips = IRQCHIPS.map(|chip_id| kvm_irqchip {
            chip_id,
            ..Default::default()
        });
        for chip in &mut chips {
            vm.get_irqchip(chip)
                .map_err(|e| VmError::Kvm("KVM_GET_IRQCHIP", e))?;
        }
        let [pic_master, pic_slave, ioapic] = chips;
        Ok(VmState {
            pic_master,
            pic_slave,
            ioapic,
            pit: vm.get_pit2().map_err(|e| VmError::Kvm("KVM_GET_PIT2", e))?,
            clock: vm.get_clock().map_err(|e| VmError::Kvm("KVM_GET_CLOCK", e))?,
        })
    }

    /// Writes the state into a VM created by [`create_vm`], before its vCPUs are restored.
    pub fn restore(&self, vm: &VmFd) -> Result<(), VmError> {
        vm.set_pit2(&self.pit)
            .map_err(|e| VmError::Kvm("KVM_SET_PIT2", e))?;
        let mut clock = self.clock;
        // With KVM_CLOCK_REALTIME KVM moves the clock on by the wall-clock time since it was
        // read, so the guest's time never runs backwards (and catches up with the host's).
        // Only that flag is meaningful to KVM_SET_CLOCK.
        clock.flags &= KVM_CLOCK_REALTIME;
        vm.set_clock(&clock)
            .map_err(|e| VmError::Kvm("KVM_SET_CLOCK", e))?;
        for (chip, id) in [&self.pic_master, &self.pic_slave, &self.ioapic]
            .into_iter()
            .zip(IRQCHIPS)
        {
            if chip.chip_id != id {
                return Err(VmError::Kvm(
                    "KVM_SET_IRQCHIP",
                    kvm_ioctls::Error::new(libc::EINVAL),
                ));
            }
            vm.set_irqchip(chip)
                .map_err(|e| VmError::Kvm("KVM_SET_IRQCHIP", e))?;
        }
        Ok(())
    }
}
