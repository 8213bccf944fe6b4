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
//!
//! A guest with more runnable vCPUs than the host has free cores (four vCPUs on two cores, or fewer
//! next to other busy processes) also hangs for good there: its vCPUs spin in the guest kernel, the
//! console stops after an RCU stall warning, and the boot never ends (in one CI run, not within
//! 600 s). KVM's paravirt IPI features are at fault: hiding none or one of them (CPUID 0x4000_0001)
//! left the hang, hiding all three let such boots finish (slowly). They are optimisations: without them
//! the guest flushes remote TLBs and calls other vCPUs with plain IPIs and waits, instead of leaving
//! a flush to a preempted vCPU's next entry (PV_TLB_FLUSH), sending IPIs by hypercall
//! (PV_SEND_IPI) or asking the host to run a preempted vCPU it waits for (PV_SCHED_YIELD).
//! Measured on a 2-core `kvm_pvm` host: a 4-vCPU, 256 MiB guest booting to power-off while two busy
//! loops run, each boot given 240 s:
//!
//! | KVM features hidden                          | boots | booted within 240 s   |
//! |----------------------------------------------|-------|-----------------------|
//! | none (two stopped at ~190 and ~290 s)        | 3     | 0                     |
//! | PV_TLB_FLUSH                                 | 2     | 0                     |
//! | PV_SEND_IPI                                  | 1     | 0                     |
//! | PV_SCHED_YIELD                               | 2     | 1 (114 s)             |
//! | PV_TLB_FLUSH, PV_SEND_IPI, PV_SCHED_YIELD    | 4     | 3 (114-161 s)         |
//!
//! (In a stuck boot one vCPU no longer armed its timer for seconds while all four vCPU threads ran.)
//! The fourth boot with the three hidden ended at 140 s with an emulation failure on the vCPU that
//! another one had just reported stalled: an RCU stall report sends the stalled vCPU an NMI to dump
//! its stack. Stall reports are only noise on such a host, so the VMM also turns them off
//! (`rcupdate.rcu_cpu_stall_suppress=1`). With all of it, 2 of 3 such boots finished within 240 s
//! (147 and 223 s: the spread is that wide), the third had not.

use std::path::Path;

/// The guest may leave a TLB flush to a preempted vCPU's next entry.
const KVM_FEATURE_PV_TLB_FLUSH: u32 = 1 << 9;
/// The guest may send IPIs by hypercall.
const KVM_FEATURE_PV_SEND_IPI: u32 = 1 << 11;
/// The guest may ask KVM to run a preempted vCPU it sent an IPI to.
const KVM_FEATURE_PV_SCHED_YIELD: u32 = 1 << 13;

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

    /// KVM paravirt features (CPUID 0x4000_0001 EAX bits) hidden from guests (see the module docs
    /// for why).
    pub fn hidden_kvm_features(self) -> u32 {
        match self {
            KvmFlavor::Hardware => 0,
            KvmFlavor::Pvm => KVM_FEATURE_PV_TLB_FLUSH | KVM_FEATURE_PV_SEND_IPI | KVM_FEATURE_PV_SCHED_YIELD,
        }
    }

    /// Kernel arguments appended to the user's command line (see the module docs for why).
    pub fn extra_kernel_args(self) -> &'static [&'static str] {
        match self {
            KvmFlavor::Hardware => &[],
            KvmFlavor::Pvm => &[
                "noxsave",
                "clearcpuid=popcnt,smap",
                "rcupdate.rcu_cpu_stall_suppress=1",
            ],
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
