//! Adjustments for hosts whose KVM is not hardware virtualisation.
//!
//! `kvm_pvm` (a page-table-based hypervisor, used where nested VMX is unavailable, e.g. inside cloud
//! VMs) emulates guest kernel code and cannot handle every instruction a stock kernel uses at boot.
//! The VMM detects it and makes a stock guest kernel boot there; on hardware KVM nothing changes.
//! Each adjustment says why it is needed; see README.md ("Running on kvm_pvm hosts").

use std::path::Path;

use super::cpuid::{self, HiddenFeatures};

/// What the host's KVM is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KvmFlavor {
    /// Hardware-assisted KVM (VMX or SVM).
    Hardware,
    /// `kvm_pvm`.
    Pvm,
}

impl KvmFlavor {
    /// Detects the flavor from the loaded KVM vendor module.
    pub fn detect() -> Self {
        if Path::new("/sys/module/kvm_pvm").exists() {
            KvmFlavor::Pvm
        } else {
            KvmFlavor::Hardware
        }
    }

    /// CPUID features the guest must not see.
    pub fn hidden_cpuid_features(self) -> HiddenFeatures {
        match self {
            KvmFlavor::Hardware => HiddenFeatures::default(),
            // XSAVE: the guest's XSAVE/XRSTOR-based FPU state handling is not emulated; the AVX
            // families depend on XSAVE-managed state, so they go with it.
            // POPCNT and SMAP: instructions the emulator cannot handle (stac/clac, popcnt).
            KvmFlavor::Pvm => HiddenFeatures {
                leaf1_ecx: cpuid::LEAF1_ECX_XSAVE
                    | cpuid::LEAF1_ECX_OSXSAVE
                    | cpuid::LEAF1_ECX_AVX
                    | cpuid::LEAF1_ECX_POPCNT,
                leaf7_ebx: cpuid::LEAF7_EBX_SMAP | cpuid::LEAF7_EBX_AVX2 | cpuid::LEAF7_EBX_AVX512,
            },
        }
    }

    /// Kernel arguments appended to the user's command line.
    pub fn extra_kernel_args(self) -> &'static [&'static str] {
        match self {
            KvmFlavor::Hardware => &[],
            KvmFlavor::Pvm => &["noxsave", "clearcpuid=popcnt,smap"],
        }
    }
}

/// Appends `extra` arguments to `cmdline`, skipping any the user already gave.
pub fn with_extra_args(cmdline: &str, extra: &[&str]) -> String {
    let mut out = cmdline.trim().to_string();
    for arg in extra {
        if !cmdline.split_whitespace().any(|a| a == *arg) {
            if !out.is_empty() {
                out.push(' ');
            }
            out.push_str(arg);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extra_args_are_appended_once() {
        assert_eq!(
            with_extra_args("console=ttyS0", &["noxsave"]),
            "console=ttyS0 noxsave"
        );
        assert_eq!(
            with_extra_args("noxsave quiet", &["noxsave", "a=b"]),
            "noxsave quiet a=b"
        );
        assert_eq!(with_extra_args("", &["noxsave"]), "noxsave");
    }

    #[test]
    fn hardware_kvm_is_left_alone() {
        assert_eq!(
            KvmFlavor::Hardware.hidden_cpuid_features(),
            HiddenFeatures::default()
        );
        assert!(KvmFlavor::Hardware.extra_kernel_args().is_empty());
    }
}
