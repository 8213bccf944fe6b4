//! The CPUID each vCPU sees: what KVM supports, with a consistent topology (one package, one thread
//! per core, APIC id = vCPU index), the hypervisor bit set, invariant TSC hidden and, where the host
//! needs it, some KVM paravirt features hidden (see [`super::host_quirks`]).

use kvm_bindings::{kvm_cpuid_entry2, CpuId};

const LEAF1_ECX_HYPERVISOR: u32 = 1 << 31;
/// Invariant TSC. Hidden, as QEMU does by default: a VM's TSC is only invariant until it is migrated or
/// restored on another host, and with it hidden the guest keeps kvmclock as its clocksource.
const LEAF_8000_0007_EDX_INVARIANT_TSC: u32 = 1 << 8;
const LEAF1_EDX_HTT: u32 = 1 << 28;
const LEVEL_TYPE_SMT: u32 = 1;
const LEVEL_TYPE_CORE: u32 = 2;

/// KVM's paravirt feature bits (EAX of this leaf).
const LEAF_KVM_FEATURES: u32 = 0x4000_0001;

/// Adjusts `cpuid` (as KVM reports it supported) for vCPU `index` of `count`, without the KVM
/// paravirt features in `hidden_kvm_features`.
pub fn configure(cpuid: &mut CpuId, index: u8, count: u8, hidden_kvm_features: u32) {
    let apic_id = u32::from(index);
    let count = u32::from(count);
    // Bits of the APIC id that select the core within the package.
    let core_bits = u32::BITS - (count.max(1) - 1).leading_zeros();
    for entry in cpuid.as_mut_slice() {
        match entry.function {
            0x1 => {
                // EBX: [31:24] initial APIC id, [23:16] logical processors per package.
                entry.ebx = (entry.ebx & 0x0000_ffff) | (apic_id << 24) | ((count & 0xff) << 16);
                entry.ecx |= LEAF1_ECX_HYPERVISOR;
                if count > 1 {
                    entry.edx |= LEAF1_EDX_HTT;
                } else {
                    entry.edx &= !LEAF1_EDX_HTT;
                }
            }
            0x4 => {
                // EAX[31:26]: cores per package - 1; [25:14]: threads sharing this cache - 1.
                let cache_level = (entry.eax >> 5) & 0x7;
                let sharing = if cache_level >= 3 { count - 1 } else { 0 };
                entry.eax = (entry.eax & 0x3fff) | ((sharing & 0xfff) << 14) | (((count - 1) & 0x3f) << 26);
            }
            0xb | 0x1f => extended_topology(entry, apic_id, count, core_bits),
            0x8000_0007 => entry.edx &= !LEAF_8000_0007_EDX_INVARIANT_TSC,
            LEAF_KVM_FEATURES => entry.eax &= !hidden_kvm_features,
            _ => {}
        }
    }
}

fn extended_topology(entry: &mut kvm_cpuid_entry2, apic_id: u32, count: u32, core_bits: u32) {
    entry.edx = apic_id;
    match entry.index {
        // SMT level: one thread per core.
        0 => {
            entry.eax = 0;
            entry.ebx = 1;
            entry.ecx = (LEVEL_TYPE_SMT << 8) | entry.index;
        }
        // Core level: every vCPU is a core of the one package.
        1 => {
            entry.eax = core_bits;
            entry.ebx = count;
            entry.ecx = (LEVEL_TYPE_CORE << 8) | entry.index;
        }
        _ => {
            entry.eax = 0;
            entry.ebx = 0;
            entry.ecx = entry.index;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(function: u32, index: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            eax: 0,
            ebx: 0xffff_ffff,
            ecx: 0xffff_ffff,
            edx: 0,
            ..Default::default()
        }
    }

    fn find(cpuid: &CpuId, function: u32, index: u32) -> kvm_cpuid_entry2 {
        *cpuid
            .as_slice()
            .iter()
            .find(|e| e.function == function && e.index == index)
            .unwrap()
    }

    #[test]
    fn topology() {
        let mut invtsc = entry(0x8000_0007, 0);
        invtsc.edx = LEAF_8000_0007_EDX_INVARIANT_TSC | 1;
        let mut cpuid =
            CpuId::from_entries(&[entry(1, 0), entry(0xb, 0), entry(0xb, 1), entry(0xb, 2), invtsc]).unwrap();
        configure(&mut cpuid, 3, 5, 0);
        let leaf1 = find(&cpuid, 1, 0);
        assert_eq!(leaf1.ebx >> 24, 3);
        assert_eq!((leaf1.ebx >> 16) & 0xff, 5);
        assert_ne!(leaf1.ecx & LEAF1_ECX_HYPERVISOR, 0);
        assert_ne!(leaf1.edx & LEAF1_EDX_HTT, 0);
        let core = find(&cpuid, 0xb, 1);
        assert_eq!(
            (core.eax, core.ebx, core.ecx >> 8, core.edx),
            (3, 5, LEVEL_TYPE_CORE, 3)
        );
        assert_eq!(find(&cpuid, 0xb, 2).ebx, 0);
        assert_eq!(
            find(&cpuid, 0x8000_0007, 0).edx,
            1,
            "invariant TSC hidden, other bits kept"
        );
    }

    #[test]
    fn hidden_kvm_features_are_cleared_and_the_rest_kept() {
        let mut features = entry(LEAF_KVM_FEATURES, 0);
        features.eax = 0b1111;
        let mut cpuid = CpuId::from_entries(&[features]).unwrap();
        configure(&mut cpuid, 0, 1, 0b0110);
        assert_eq!(find(&cpuid, LEAF_KVM_FEATURES, 0).eax, 0b1001);
    }
}
