//! What the benchmarks do the same way with either VMM: the guest command line, QEMU microvm's base
//! command, and waiting for the guest probe to report that the guest booted.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use harness::{read_smaps, Guest, GuestMapping, Line, RssBreakdown};

/// The line the guest probe prints when boot is done (it then runs its actions, e.g. powers off).
pub const BOOT_COMPLETE: &str = "BOOT-COMPLETE";

/// Output that means the guest is broken and will not finish: end the run at once instead of waiting
/// for the timeout (QEMU stops the guest and keeps running on a KVM internal error; a panicked guest
/// hangs).
pub const FAILURE_MARKERS: [&str; 3] = ["KVM internal error", "emulation failure", "Kernel panic"];

/// Guest kernel arguments for both VMMs: `noxsave clearcpuid=popcnt,smap` are needed on kvm_pvm hosts
/// (vmm adds them itself; QEMU gets them here so both guests boot the same way).
pub const GUEST_CMDLINE_BASE: &str = "console=ttyS0 quiet pci=off noxsave clearcpuid=popcnt,smap";

/// The guest command line that runs the probe's `actions` (e.g. `"poweroff"`) under either VMM.
pub fn bench_cmdline(actions: &str) -> String {
    format!("{GUEST_CMDLINE_BASE} vmmprobe.action={actions}")
}

/// Which VMM runs the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Vmm {
    /// This project's `vmm`.
    Ours,
    /// QEMU microvm, the peer.
    Qemu,
}

impl Vmm {
    /// The name in tables, JSON keys and progress lines.
    pub fn name(self) -> &'static str {
        match self {
            Vmm::Ours => "vmm",
            Vmm::Qemu => "qemu",
        }
    }
}

/// `qemu -M machine` with KVM, the host CPU, `memory_mib` MiB, `vcpus` vCPUs, no default devices or
/// user config, and the serial console on stdio; the caller adds the kernel and the rest.
pub fn qemu_microvm(qemu: &str, machine: &str, memory_mib: u32, vcpus: u32) -> Command {
    let mut cmd = Command::new(qemu);
    cmd.args(["-M", machine, "-enable-kvm", "-cpu", qemu_cpu()])
        .args(["-m", &memory_mib.to_string()])
        .args(["-smp", &vcpus.to_string()])
        .args(["-nodefaults", "-no-user-config", "-nographic", "-serial", "stdio"]);
    cmd
}

/// QEMU's `-cpu`: the host CPU, without `IA32_ARCH_CAPABILITIES` on kvm_pvm hosts, whose KVM
/// refuses the value QEMU 7.2 writes there ("failed to set MSR 0x10a", then QEMU aborts; seen on
/// 2026-12-06). Hardware KVM keeps it, as a stock QEMU would.
pub fn qemu_cpu() -> &'static str {
    qemu_cpu_for(Path::new("/sys/module/kvm_pvm").exists())
}

fn qemu_cpu_for(kvm_pvm: bool) -> &'static str {
    if kvm_pvm {
        "host,-arch-capabilities"
    } else {
        "host"
    }
}

/// Waits up to `timeout` for the `BOOT-COMPLETE` line and returns it; fails as soon as a
/// [`FAILURE_MARKERS`] line shows up instead, with the tail of the output.
pub fn wait_boot_complete(guest: &Guest, timeout: Duration) -> Result<Line> {
    let mut wanted = vec![BOOT_COMPLETE];
    wanted.extend(FAILURE_MARKERS);
    let line = guest.wait_for_any_line(&wanted, timeout)?;
    if !line.text.contains(BOOT_COMPLETE) {
        bail!(
            "boot failed: {:?}; last output:\n{}",
            line.text,
            guest.output_tail()
        );
    }
    Ok(line)
}

/// Reads the memory of `pid` and splits off guest RAM: for vmm its `[anon:vmm-guest-ram]` mappings
/// where the host kernel supports naming them; otherwise (and for QEMU) anonymous mappings at least
/// as large as guest memory. Returns the split and the rule used.
pub fn sample_memory(vmm: Vmm, memory_mib: u32, pid: u32) -> Result<(RssBreakdown, String)> {
    let mappings = read_smaps(pid)?;
    let named = GuestMapping::VMM;
    if vmm == Vmm::Ours && mappings.iter().any(|m| m.is_guest(named)) {
        return Ok((
            RssBreakdown::of(&mappings, named),
            "named [anon:vmm-guest-ram]".into(),
        ));
    }
    let bytes = u64::from(memory_mib) << 20;
    let rule = format!("anonymous mappings >= {memory_mib} MiB");
    Ok((
        RssBreakdown::of(&mappings, GuestMapping::LargestAnonAtLeast(bytes)),
        rule,
    ))
}

/// Milliseconds from `start` to `at` (0 if `at` is earlier).
pub fn ms_since(start: Instant, at: Instant) -> f64 {
    at.saturating_duration_since(start).as_secs_f64() * 1000.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cmdline_and_qemu_command() {
        assert_eq!(
            bench_cmdline("poweroff"),
            "console=ttyS0 quiet pci=off noxsave clearcpuid=popcnt,smap vmmprobe.action=poweroff"
        );
        let cmd = qemu_microvm("qemu", "microvm", 128, 2);
        let args: Vec<_> = cmd.get_args().map(|a| a.to_string_lossy().into_owned()).collect();
        assert_eq!(
            args.join(" "),
            format!(
                "-M microvm -enable-kvm -cpu {} -m 128 -smp 2 -nodefaults -no-user-config -nographic \
                 -serial stdio",
                qemu_cpu()
            )
        );
        assert_eq!(
            (qemu_cpu_for(false), qemu_cpu_for(true)),
            ("host", "host,-arch-capabilities")
        );
        assert_eq!((Vmm::Ours.name(), Vmm::Qemu.name()), ("vmm", "qemu"));
    }

    #[test]
    fn ms_since_saturates() {
        let t0 = Instant::now();
        let t1 = t0 + Duration::from_millis(1500);
        assert_eq!(ms_since(t0, t1), 1500.0);
        assert_eq!(ms_since(t1, t0), 0.0);
    }
}
