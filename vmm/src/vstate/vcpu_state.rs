//! A vCPU's architectural state (x86_64), saved from and restored into KVM for snapshots.
//!
//! Restore order follows what KVM requires (see design.md): CPUID first (it decides which MSRs and
//! xsave features exist), MP state, registers, special registers, xsave, xcrs, debug registers, the
//! LAPIC, MSRs, and the pending events last, since setting the others may change them.

use kvm_bindings::{
    kvm_cpuid_entry2, kvm_debugregs, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_regs, kvm_sregs,
    kvm_vcpu_events, kvm_xcrs, kvm_xsave, CpuId, Msrs, KVM_MAX_CPUID_ENTRIES,
};
use kvm_ioctls::{Kvm, VcpuFd};
use serde::{Deserialize, Serialize};

/// Why a vCPU's state could not be saved or restored.
#[derive(Debug, thiserror::Error)]
pub enum VcpuStateError {
    /// A KVM ioctl failed.
    #[error("{0} failed: {1}")]
    Kvm(&'static str, kvm_ioctls::Error),
    /// KVM set fewer MSRs than it was given.
    #[error("KVM_SET_MSRS set {set} of {total} MSRs (first refused: {refused:#x})")]
    Msrs {
        /// MSRs set.
        set: usize,
        /// MSRs given.
        total: usize,
        /// The index KVM stopped at.
        refused: u32,
    },
    /// More entries than KVM's structures hold.
    #[error("saved {0} has too many entries")]
    TooMany(&'static str),
    /// The host's xsave area does not fit the 4 KiB `kvm_xsave` (AMX state).
    #[error("this host's xsave area is {0} bytes; snapshots support 4096")]
    XsaveSize(usize),
}

/// Everything KVM holds for one vCPU that the guest can observe.
#[derive(Serialize, Deserialize)]
pub struct VcpuState {
    /// CPUID as the guest sees it.
    pub cpuid: Vec<kvm_cpuid_entry2>,
    /// Running, halted, waiting for SIPI...
    pub mp_state: kvm_mp_state,
    /// General-purpose registers.
    pub regs: kvm_regs,
    /// Segment, control and descriptor-table registers.
    pub sregs: kvm_sregs,
    /// FPU, SSE and AVX state.
    pub xsave: kvm_xsave,
    /// Extended control registers (XCR0).
    pub xcrs: kvm_xcrs,
    /// Debug registers.
    pub debug_regs: kvm_debugregs,
    /// The local APIC's registers.
    pub lapic: kvm_lapic_state,
    /// Every MSR KVM reports that this vCPU would read.
    pub msrs: Vec<kvm_msr_entry>,
    /// Pending exceptions, interrupts and NMIs.
    pub vcpu_events: kvm_vcpu_events,
    /// The TSC frequency, where KVM tells it.
    pub tsc_khz: Option<u32>,
}

/// MSRs read per KVM_GET_MSRS call (KVM's own limit is far higher; this keeps the buffer small).
const MSR_CHUNK: usize = 64;

/// The MSRs this host's KVM reports, to be read from each vCPU.
pub fn msr_index_list(kvm: &Kvm) -> Result<Vec<u32>, VcpuStateError> {
    let list = kvm
        .get_msr_index_list()
        .map_err(|e| VcpuStateError::Kvm("KVM_GET_MSR_INDEX_LIST", e))?;
    Ok(list.as_slice().to_vec())
}

/// Fails early, on the host, if the vCPU's xsave state cannot be carried in `kvm_xsave`.
pub fn check_xsave_size(kvm: &Kvm) -> Result<(), VcpuStateError> {
    let size = kvm.check_extension_int(kvm_ioctls::Cap::Xsave2);
    let size = usize::try_from(size).unwrap_or(0);
    if size > std::mem::size_of::<kvm_xsave>() {
        return Err(VcpuStateError::XsaveSize(size));
    }
    Ok(())
}

impl VcpuState {
    /// Reads the state of a vCPU that is not running. `msr_indices` is
    /// [`msr_index_list`]; those the vCPU refuses to read (features its CPUID hides) are left out.
    pub fn save(fd: &VcpuFd, msr_indices: &[u32]) -> Result<Self, VcpuStateError> {
        let kvm = |op| move |e| VcpuStateError::Kvm(op, e);
        // MP state first: reading it makes KVM settle pending APIC events into it.
        let mp_state = fd.get_mp_state().map_err(kvm("KVM_GET_MP_STATE"))?;
        let cpuid = fd
            .get_cpuid2(KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm("KVM_GET_CPUID2"))?;
        let state = VcpuState {
            cpuid: cpuid.as_slice().to_vec(),
            mp_state,
            regs: fd.get_regs().map_err(kvm("KVM_GET_REGS"))?,
            sregs: fd.get_sregs().map_err(kvm("KVM_GET_SREGS"))?,
            xsave: fd.get_xsave().map_err(kvm("KVM_GET_XSAVE"))?,
            xcrs: fd.get_xcrs().map_err(kvm("KVM_GET_XCRS"))?,
            debug_regs: fd.get_debug_regs().map_err(kvm("KVM_GET_DEBUGREGS"))?,
            lapic: fd.get_lapic().map_err(kvm("KVM_GET_LAPIC"))?,
            msrs: read_msrs(fd, msr_indices)?,
            tsc_khz: fd.get_tsc_khz().ok(),
            // Last, with everything else read: events pending now are the ones to carry over.
            vcpu_events: fd.get_vcpu_events().map_err(kvm("KVM_GET_VCPU_EVENTS"))?,
        };
        Ok(state)
    }

    /// Writes the state into a freshly created vCPU, in KVM's order.
    pub fn restore(&self, fd: &VcpuFd) -> Result<(), VcpuStateError> {
        let kvm = |op| move |e| VcpuStateError::Kvm(op, e);
        let cpuid = CpuId::from_entries(&self.cpuid).map_err(|_| VcpuStateError::TooMany("CPUID"))?;
        fd.set_cpuid2(&cpuid).map_err(kvm("KVM_SET_CPUID2"))?;
        if let Some(khz) = self.tsc_khz {
            // Best effort: a host that cannot scale the TSC runs the guest at its own rate, as a
            // cold boot there would.
            if let Err(e) = fd.set_tsc_khz(khz) {
                log::warn!("cannot set the TSC to the snapshot's {khz} kHz: {e}");
            }
        }
        fd.set_mp_state(self.mp_state).map_err(kvm("KVM_SET_MP_STATE"))?;
        fd.set_regs(&self.regs).map_err(kvm("KVM_SET_REGS"))?;
        fd.set_sregs(&self.sregs).map_err(kvm("KVM_SET_SREGS"))?;
        // SAFETY: `kvm_xsave` is the legacy 4 KiB area, and snapshots are only taken and restored
        // where KVM's xsave size fits it (`check_xsave_size`), so KVM reads no byte past it.
        unsafe { fd.set_xsave(&self.xsave) }.map_err(kvm("KVM_SET_XSAVE"))?;
        fd.set_xcrs(&self.xcrs).map_err(kvm("KVM_SET_XCRS"))?;
        fd.set_debug_regs(&self.debug_regs)
            .map_err(kvm("KVM_SET_DEBUGREGS"))?;
        fd.set_lapic(&self.lapic).map_err(kvm("KVM_SET_LAPIC"))?;
        for chunk in self.msrs.chunks(MSR_CHUNK) {
            let msrs = Msrs::from_entries(chunk).map_err(|_| VcpuStateError::TooMany("MSRs"))?;
            let set = fd.set_msrs(&msrs).map_err(kvm("KVM_SET_MSRS"))?;
            if set != chunk.len() {
                return Err(VcpuStateError::Msrs {
                    set,
                    total: chunk.len(),
                    refused: chunk[set].index,
                });
            }
        }
        fd.set_vcpu_events(&self.vcpu_events)
            .map_err(kvm("KVM_SET_VCPU_EVENTS"))?;
        Ok(())
    }
}

/// Reads `indices` in chunks; KVM stops a chunk at the first MSR it refuses, which is skipped.
fn read_msrs(fd: &VcpuFd, indices: &[u32]) -> Result<Vec<kvm_msr_entry>, VcpuStateError> {
    let mut out = Vec::with_capacity(indices.len());
    let mut rest = indices;
    while !rest.is_empty() {
        let chunk = &rest[..rest.len().min(MSR_CHUNK)];
        let entries: Vec<kvm_msr_entry> = chunk
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs = Msrs::from_entries(&entries).map_err(|_| VcpuStateError::TooMany("MSRs"))?;
        let read = fd
            .get_msrs(&mut msrs)
            .map_err(|e| VcpuStateError::Kvm("KVM_GET_MSRS", e))?;
        out.extend_from_slice(&msrs.as_slice()[..read.min(chunk.len())]);
        // Skip the MSR KVM refused, if it stopped early.
        let consumed = if read < chunk.len() { read + 1 } else { read };
        rest = &rest[consumed..];
    }
    Ok(out)
}
