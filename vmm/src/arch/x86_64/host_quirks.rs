//! Adjustments for hosts whose KVM is not hardware virtualisation.
//!
//! `kvm_pvm` (a page-table-based hypervisor, used where nested VMX is unavailable, e.g. inside cloud
//! VMs) runs guest kernel code under an instruction emulator that cannot handle everything a stock
//! kernel executes at boot. The VMM detects it and makes a stock guest kernel boot there; on hardware
//! KVM nothing changes.
//!
//! What was measured on a `kvm_pvm` host (Debian linux-source-6.12 guest, one boot per row):
//!
//! | kernel arguments added            | result                                                  |
//! |-----------------------------------|---------------------------------------------------------|
//! | none (XSAVE etc. hidden in CPUID)  | emulation failure right after XSAVE feature detection   |
//! | `clearcpuid=popcnt,smap`          | emulation failure right after XSAVE feature detection   |
//! | `noxsave`                         | emulation failure early in CPU setup (POPCNT in use)     |
//! | `noxsave clearcpuid=smap`         | emulation failure early in CPU setup (POPCNT in use)     |
//! | `noxsave clearcpuid=popcnt`       | emulation failure at the first user-access (STAC/CLAC)   |
//! | `noxsave clearcpuid=popcnt,smap`  | boots                                                    |
//!
//! Hiding XSAVE, POPCNT and SMAP through `KVM_SET_CPUID2` does not help there: the guest still
//! detected and used XSAVE with those bits cleared (other leaves the VMM sets, such as invariant TSC,
//! do reach it). So the VMM appends the arguments instead; the kernel parses them before it uses any of
//! the three features (`noxsave` is read directly from the boot command line, which is why the kernel
//! also logs it as an "unknown parameter" it hands to init).

use std::path::Path;

/// What the host's KVM is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KvmFlavor {
    /// Hardware-assisted KVM (VMX or SVM).
    Hardware,
    /// `kvm_pvm`.
    Pvm,
}

impl KvmFlavor {
    /// Detects the flavor from the loaded KVM vendor module. Remembered after the first call: a
    /// jailed VMM (no /sys) asks before it enters the jail.
    pub fn detect() -> Self {
        static FLAVOR: std::sync::OnceLock<KvmFlavor> = std::sync::OnceLock::new();
        *FLAVOR.get_or_init(|| {
            if Path::new("/sys/module/kvm_pvm").exists() {
                KvmFlavor::Pvm
            } else {
                KvmFlavor::Hardware
            }
        })
    }

    /// Kernel arguments appended to the user's command line (see the module docs for why).
    pub fn extra_kernel_args(self) -> &'static [&'static str] {
        match self {
            KvmFlavor::Hardware => &[],
            KvmFlavor::Pvm => &["noxsave", "clearcpuid=popcnt,smap"],
        }
    }
}

/// Appends `extra` arguments to `cmdline`, skipping any the user already gave. Arguments after a `--`
/// belong to init, so kernel arguments go before it.
pub fn with_extra_args(cmdline: &str, extra: &[&str]) -> String {
    let words: Vec<&str> = cmdline.split_whitespace().collect();
    let (kernel_args, init_args) =
        words.split_at(words.iter().position(|w| *w == "--").unwrap_or(words.len()));
    let missing = extra.iter().filter(|arg| !kernel_args.contains(arg));
    kernel_args
        .iter()
        .chain(missing)
        .chain(init_args)
        .copied()
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extra_args_are_appended_once_and_before_init_args() {
        assert_eq!(
            with_extra_args("console=ttyS0", &["noxsave"]),
            "console=ttyS0 noxsave"
        );
        assert_eq!(
            with_extra_args("noxsave quiet", &["noxsave", "a=b"]),
            "noxsave quiet a=b"
        );
        assert_eq!(with_extra_args("", &["noxsave"]), "noxsave");
        assert_eq!(
            with_extra_args("quiet -- echo hi", &["noxsave"]),
            "quiet noxsave -- echo hi"
        );
        assert_eq!(
            with_extra_args("-- echo noxsave", &["noxsave"]),
            "noxsave -- echo noxsave"
        );
    }

    #[test]
    fn hardware_kvm_is_left_alone() {
        assert!(KvmFlavor::Hardware.extra_kernel_args().is_empty());
    }
}
