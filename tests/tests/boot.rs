//! End-to-end boot tests: real guest kernels under /dev/kvm, driven through the in-kernel guest probe.
//!
//! Each boot costs tens of seconds of CPU on a `kvm_pvm` host, so every guest serves several checks.

use std::process::ExitStatus;
use std::time::Duration;

use harness::{parse_probe_facts, probe_cmdline, require_kvm, Guest, GuestBuilder, GuestImages};

/// Generous: a cold boot takes 20-40 s of CPU on a kvm_pvm host and tests share two cores.
const BOOT_TIMEOUT: Duration = Duration::from_secs(600);
const EXIT_TIMEOUT: Duration = Duration::from_secs(60);

/// How a guest that boots and then ends itself went.
struct Run {
    status: ExitStatus,
    stdout: String,
    stderr: String,
}

/// Waits for the guest to boot and then to end by itself.
fn boot_until_exit(mut guest: Guest) -> Run {
    if let Err(e) = guest.wait_for_line("BOOT-COMPLETE", BOOT_TIMEOUT) {
        panic!("guest did not boot: {e:#}");
    }
    let status = match guest.wait_exit(EXIT_TIMEOUT) {
        Ok(status) => status,
        Err(e) => panic!("guest did not exit by itself: {e:#}"),
    };
    Run {
        status,
        stdout: guest.stdout_text(),
        stderr: guest.stderr_text(),
    }
}

#[test]
fn elf_kernel_with_initrd_and_four_vcpus_powers_off() {
    require_kvm();
    let images = GuestImages::get().unwrap();
    let guest = GuestBuilder::new(&images.vmlinux)
        .initrd(&images.initramfs)
        .vcpus(4)
        .memory_mib(256)
        .cmdline(&format!("{} vmmprobe.initrd_crc=1", probe_cmdline("poweroff")))
        .spawn()
        .unwrap();
    let Run {
        status,
        stdout,
        stderr,
    } = boot_until_exit(guest);
    assert!(
        status.success(),
        "guest poweroff must exit 0, got {status:?}\n{stdout}"
    );

    let facts = parse_probe_facts(&stdout);
    assert_eq!(facts.online_cpus, Some(4), "{stdout}");
    let initrd = std::fs::read(&images.initramfs).unwrap();
    assert_eq!(facts.initrd_size, Some(initrd.len() as u64), "{stdout}");
    assert_eq!(facts.initrd_crc32, Some(harness::crc32(&initrd)), "{stdout}");
    assert!(stderr.contains("vmm: first KVM_RUN at "), "{stderr}");
    assert!(stderr.contains("vmm: guest booted in "), "{stderr}");
    assert!(stderr.contains("vmm: guest powered off"), "{stderr}");
}

/// Memory beyond 3 GiB continues above the MMIO hole at 4 GiB; the guest must find all of it. The same
/// guest then panics, which must end the VMM with an error (pvpanic).
#[test]
fn memory_above_the_pci_hole_is_all_seen_and_guest_panic_exits_nonzero() {
    require_kvm();
    let images = GuestImages::get().unwrap();
    let memory_mib = 3584;
    let guest = GuestBuilder::new(&images.vmlinux)
        .memory_mib(memory_mib)
        .cmdline(&probe_cmdline("panic"))
        .spawn()
        .unwrap();
    let Run {
        status,
        stdout,
        stderr,
    } = boot_until_exit(guest);
    assert_eq!(status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("vmm: error: guest kernel panicked"), "{stderr}");

    let phys_kib = parse_probe_facts(&stdout).memory_phys_kib.expect("memory line");
    // All RAM the memory map gives: everything but the legacy area between the EBDA and 1 MiB, less
    // the few KiB the kernel trims to page boundaries and reserves.
    let expected_kib = u64::from(memory_mib) * 1024 - 384;
    assert!((expected_kib - 16..=expected_kib).contains(&phys_kib), "{stdout}");
}

#[test]
fn bzimage_boots_and_guest_reboot_exits_cleanly() {
    require_kvm();
    let images = GuestImages::get().unwrap();
    let guest = GuestBuilder::new(&images.bzimage)
        .cmdline(&probe_cmdline("reboot"))
        .spawn()
        .unwrap();
    let Run {
        status,
        stdout,
        stderr,
    } = boot_until_exit(guest);
    assert!(
        status.success(),
        "guest reboot must exit 0, got {status:?}\n{stdout}"
    );
    let facts = parse_probe_facts(&stdout);
    assert_eq!(facts.online_cpus, Some(1), "{stdout}");
    assert_eq!(facts.initrd_size, None, "{stdout}");
    assert!(stderr.contains("vmm: guest requested a reset"), "{stderr}");
}

#[test]
fn idle_guest_stays_up_until_stopped() {
    require_kvm();
    let images = GuestImages::get().unwrap();
    let mut guest = GuestBuilder::new(&images.vmlinux)
        .cmdline(&format!("{} vmmprobe.count=3", probe_cmdline("counter,idle")))
        .spawn()
        .unwrap();
    guest.wait_for_line("vmmprobe: idle", BOOT_TIMEOUT).unwrap();
    let stdout = guest.stdout_text();
    let counters: Vec<&str> = stdout
        .lines()
        .filter(|l| l.starts_with("vmmprobe: counter="))
        .collect();
    assert_eq!(
        counters,
        [
            "vmmprobe: counter=1",
            "vmmprobe: counter=2",
            "vmmprobe: counter=3"
        ]
    );
    // Nothing ends an idle guest: it is still running after a while, and only stops when killed.
    assert!(
        guest.wait_exit(Duration::from_secs(3)).is_err(),
        "idle guest exited on its own"
    );
    guest.kill().unwrap();
}
