//! The memory levers end to end on a real guest: the virtio-balloon (inflate, deflate, statistics,
//! free page reporting, snapshot and restore), KSM and transparent huge pages.
//!
//! The guest's own virtio-balloon driver does the work; the probe only holds and frees memory and
//! waits for the balloon to reach a size (`balloon-wait`), so host and guest take turns without
//! any timing assumption. Host memory is the vmm process's RSS as `metrics` reports it.

use std::path::Path;
use std::time::{Duration, Instant};

use harness::{
    probe_cmdline, probe_fields, require_kvm, ControlClient, Guest, GuestBuilder, GuestImages, TempDir,
};
use vmm_api::balloon::BalloonInfo;
use vmm_api::control::{ErrorKind, Response};

/// Booting takes minutes on a loaded kvm_pvm host; waits are bounds, never measurements.
const BOOT_TIMEOUT: Duration = Duration::from_secs(600);
const STEP_TIMEOUT: Duration = Duration::from_secs(300);
const MIB: u64 = 1 << 20;

fn balloon_info(c: &mut ControlClient) -> BalloonInfo {
    match c
        .ok(r#"{"id": 1, "request": "balloon-stats"}"#)
        .expect("balloon-stats")
    {
        Response::BalloonStats(info) => *info,
        other => panic!("balloon-stats answered {other:?}"),
    }
}

fn rss_kib(c: &mut ControlClient) -> u64 {
    match c.ok(r#"{"id": 2, "request": "metrics"}"#).expect("metrics") {
        Response::Metrics(m) => m.vmm_rss_kib,
        other => panic!("metrics answered {other:?}"),
    }
}

fn set_target(c: &mut ControlClient, mib: u64) {
    let line = format!(r#"{{"id": 3, "request": {{"update-balloon": {{"amount_mib": {mib}}}}}}}"#);
    assert_eq!(c.ok(&line).expect("update-balloon"), Response::BalloonUpdated);
}

/// Polls `check` every 200 ms until it gives a value, for at most `timeout`.
fn poll<T>(what: &str, timeout: Duration, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn wait_probe(guest: &Guest, prefix: &str) -> std::collections::HashMap<String, String> {
    let line = guest
        .wait_for_line(&format!("vmmprobe: {prefix}"), STEP_TIMEOUT)
        .expect("probe line");
    probe_fields(&line.text, prefix)
}

/// The `VmFlags` and `AnonHugePages` of the mapping of `pid` that is `size` bytes long.
fn mapping_of_size(pid: u32, size: u64) -> Option<(u64, Vec<String>, u64)> {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).ok()?;
    let mut found: Option<(u64, Vec<String>, u64)> = None;
    for line in smaps.lines() {
        let header = line
            .split(' ')
            .next()
            .and_then(|r| r.split_once('-'))
            .and_then(|(a, b)| Some((u64::from_str_radix(a, 16).ok()?, u64::from_str_radix(b, 16).ok()?)));
        if let Some((start, end)) = header {
            if found.is_some() {
                break;
            }
            if end - start == size {
                found = Some((start, Vec::new(), 0));
            }
            continue;
        }
        let Some((_, flags, huge)) = found.as_mut() else {
            continue;
        };
        if let Some(v) = line.strip_prefix("AnonHugePages:") {
            *huge = v.trim().trim_end_matches("kB").trim().parse().unwrap_or(0);
        }
        if let Some(v) = line.strip_prefix("VmFlags:") {
            *flags = v.split_whitespace().map(String::from).collect();
        }
    }
    found
}

#[test]
fn balloon_inflates_deflates_reports_free_pages_and_survives_a_snapshot() {
    require_kvm();
    let images = GuestImages::get().expect("guest images");
    let dir = TempDir::new("vmm-balloon").expect("temp dir");
    let sock = dir.path().join("api.sock");
    // 160 MiB touched, then every odd page freed (80 MiB the host still backs that cannot merge
    // into the blocks free page reporting hands back: what the balloon takes first), then a wait
    // for the host to inflate and deflate, then everything freed (reported, released again).
    // Free page reporting in 2 MiB blocks (the default is the guest's 4 MiB pageblock).
    let actions =
        "mem-alloc:160m,mem-free:odd,balloon-wait:64m,mem-info,balloon-wait:0,mem-free,mem-info,idle";
    let cmdline = format!("{} page_reporting.page_reporting_order=9", probe_cmdline(actions));
    let guest = GuestBuilder::new(&images.vmlinux)
        .cmdline(&cmdline)
        .memory_mib(256)
        // No huge pages: khugepaged would fill the holes the balloon makes in them.
        .arg("--hugepages")
        .arg("off")
        .arg("--mergeable")
        .arg("on")
        .arg("--balloon")
        .arg("amount_mib=0,deflate_on_oom=on,stats_interval_s=1,free_page_reporting=on")
        .arg("--api-sock")
        .arg(&sock)
        .spawn()
        .expect("vmm");
    ControlClient::wait_for_socket(&sock, Duration::from_secs(60)).expect("socket");
    let mut c = ControlClient::connect(&sock).expect("connect");

    guest.wait_for_line("BOOT-COMPLETE", BOOT_TIMEOUT).expect("boot");
    // KSM: guest RAM (one 256 MiB mapping below the PCI hole) is offered to it.
    let (_, flags, _) = mapping_of_size(guest.pid(), 256 * MIB).expect("guest RAM mapping");
    assert!(flags.iter().any(|f| f == "mg"), "VmFlags {flags:?}");
    let alloc = wait_probe(&guest, "mem-alloc");
    assert_eq!(alloc["result"], "0", "{alloc:?}");
    let freed = wait_probe(&guest, "mem-free which=odd");
    let odd_pages: u64 = freed["pages"].parse().expect("pages");
    assert!(odd_pages * 4096 >= 64 * MIB, "{freed:?}");

    // Statistics arrive on their own.
    let stats = poll("guest memory statistics", STEP_TIMEOUT, || {
        balloon_info(&mut c).stats
    });
    assert!(stats.total_memory.unwrap_or(0) > 128 * MIB, "{stats:?}");
    assert!(
        stats.free_memory.is_some() && stats.available_memory.is_some(),
        "{stats:?}"
    );

    // Inflate: the balloon takes the freed, still backed pages; the host releases them.
    let before = rss_kib(&mut c);
    set_target(&mut c, 64);
    let waited = wait_probe(&guest, "balloon-wait bytes=67108864");
    assert_eq!(waited["result"], "0", "{waited:?}");
    let info = poll("actual = 64 MiB", STEP_TIMEOUT, || {
        Some(balloon_info(&mut c)).filter(|i| i.actual_mib == 64)
    });
    assert_eq!((info.target_mib, info.target_pages), (64, 64 * 256));
    assert_eq!(info.counters.inflated_pages, 64 * 256);
    assert_eq!(
        info.counters.invalid_pages + info.counters.invalid_requests,
        0,
        "{info:?}"
    );
    let inflated = rss_kib(&mut c);
    assert!(
        before.saturating_sub(inflated) >= 32 * 1024,
        "RSS {before} KiB before inflating 64 MiB, {inflated} KiB after"
    );

    // Deflate: the guest takes its pages back.
    set_target(&mut c, 0);
    let waited = wait_probe(&guest, "balloon-wait bytes=0 ");
    assert_eq!(waited["result"], "0", "{waited:?}");
    let info = poll("actual = 0", STEP_TIMEOUT, || {
        Some(balloon_info(&mut c)).filter(|i| i.actual_pages == 0)
    });
    assert_eq!(info.counters.deflated_pages, 64 * 256);

    // Free page reporting: freeing the rest makes large free blocks, which the guest reports and
    // the host releases.
    let all = wait_probe(&guest, "mem-free which=all");
    assert_eq!(all["held-pages"], "0", "{all:?}");
    let after_free = poll("RSS to fall after free page reporting", STEP_TIMEOUT, || {
        let rss = rss_kib(&mut c);
        (inflated.saturating_sub(rss) >= 48 * 1024).then_some(rss)
    });
    let info = balloon_info(&mut c);
    assert!(
        info.counters.reports > 0 && info.counters.reported_bytes >= 48 * MIB,
        "{info:?}"
    );
    eprintln!(
        "balloon e2e: RSS {before} KiB -> {inflated} KiB (inflated 64 MiB) -> {after_free} KiB (reported); {:?}",
        info.counters
    );

    // Requests a balloon refuses.
    let too_big = r#"{"id": 4, "request": {"update-balloon": {"amount_mib": 257}}}"#;
    assert_eq!(c.error(too_big).expect("answer").0, ErrorKind::InvalidArgument);
    let empty = r#"{"id": 5, "request": {"update-balloon": {}}}"#;
    assert_eq!(c.error(empty).expect("answer").0, ErrorKind::InvalidArgument);

    snapshot_and_restore(&mut c, guest, dir.path());
}

/// Snapshots the VM with a 16 MiB balloon and checks that a restored copy keeps its balloon
/// (target, size) and that the restored guest's driver still follows a new target.
fn snapshot_and_restore(c: &mut ControlClient, mut guest: Guest, dir: &Path) {
    set_target(c, 16);
    poll("actual = 16 MiB", STEP_TIMEOUT, || {
        Some(balloon_info(c)).filter(|i| i.actual_mib == 16)
    });
    c.ok(r#"{"id": 6, "request": "pause"}"#).expect("pause");
    let snap = dir.join("snap");
    let line = serde_json::json!({"id": 7, "request": {"snapshot-create": {"dir": snap}}}).to_string();
    c.ok(&line).expect("snapshot-create");
    c.ok(r#"{"id": 8, "request": "stop"}"#).expect("stop");
    guest.wait_exit(Duration::from_secs(60)).expect("first vmm exits");

    let sock = dir.join("restored.sock");
    let mut cmd = std::process::Command::new(harness::vmm_binary());
    cmd.arg("--api-sock").arg(&sock);
    let _restored = Guest::spawn_command(cmd, None).expect("empty vmm");
    ControlClient::wait_for_socket(&sock, Duration::from_secs(60)).expect("socket");
    let mut r = ControlClient::connect(&sock).expect("connect");
    let line = serde_json::json!({"id": 9, "request": {"snapshot-restore": {"dir": snap, "resume": true}}})
        .to_string();
    r.ok(&line).expect("snapshot-restore");
    let info = balloon_info(&mut r);
    assert_eq!((info.target_mib, info.actual_mib), (16, 16), "{info:?}");
    set_target(&mut r, 32);
    let info = poll("restored guest inflating to 32 MiB", STEP_TIMEOUT, || {
        Some(balloon_info(&mut r)).filter(|i| i.actual_mib == 32)
    });
    assert_eq!(info.counters.inflated_pages, 16 * 256);
    // Statistics keep coming: the buffer the device held at the snapshot came back with it.
    let updates = info.counters.stats_updates;
    poll("statistics after the restore", STEP_TIMEOUT, || {
        (balloon_info(&mut r).counters.stats_updates > updates).then_some(())
    });
    r.ok(r#"{"id": 10, "request": "stop"}"#).expect("stop");
}

#[test]
fn thp_guest_memory_is_aligned_and_backed_by_huge_pages() {
    require_kvm();
    let images = GuestImages::get().expect("guest images");
    let guest = GuestBuilder::new(&images.vmlinux)
        .cmdline(&probe_cmdline("mem-alloc:64m,idle"))
        .memory_mib(128)
        .arg("--hugepages")
        .arg("thp")
        .spawn()
        .expect("vmm");
    guest.wait_for_line("BOOT-COMPLETE", BOOT_TIMEOUT).expect("boot");
    let alloc = wait_probe(&guest, "mem-alloc");
    assert_eq!(alloc["result"], "0", "{alloc:?}");
    let (start, flags, huge_kib) = mapping_of_size(guest.pid(), 128 * MIB).expect("guest RAM mapping");
    assert_eq!(start % (2 * MIB), 0, "guest RAM at {start:#x}");
    assert!(flags.iter().any(|f| f == "hg"), "VmFlags {flags:?}");
    let thp = std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled").unwrap_or_default();
    if !thp.contains("[never]") {
        assert!(huge_kib >= 2048, "AnonHugePages {huge_kib} kB with THP {thp:?}");
    }
    eprintln!("thp e2e: guest RAM at {start:#x}, AnonHugePages {huge_kib} kB");
}
