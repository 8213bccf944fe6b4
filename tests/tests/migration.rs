//! Live migration between two VMM processes over a socket pair, on a real guest that keeps a
//! counter in memory, wrote data to its disk (shared: both VMMs see the same image) and answers
//! pings on its NIC. Both VMMs sit in a network namespace the test makes, each behind its own tap
//! on one bridge. A destination that cannot take the VM (a NIC it lacks, a wrong or missing
//! token, a source speaking an older protocol) refuses at the handshake, a migration
//! cancelled mid-way and one whose destination is killed mid-way fail, and each time the source
//! runs on; a destination that can receives the memory rounds and the state, the source commits
//! and exits with 0, the guest continues counting at the destination without booting again, the
//! bridge learns the guest's MAC on the destination's tap (the VMM's announcement), and the guest
//! answers pings there without any reconfiguration.
//!
//! With local disks the source copies the image too, while the guest keeps rewriting part of it
//! (the probe's `blk-dirty`): the destination's first pass over that part finds every block as
//! the source's last pass left it.

use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use harness::{
    probe_cmdline, require_kvm, vmm_binary, ControlClient, Guest, GuestImages, NetNs, ProbePattern, TempDir,
};
use vmm_api::control::{Event, Outcome, Response, VmState};
use vmm_api::migration::MigrationPhase;

const BOOT_TIMEOUT: Duration = Duration::from_secs(600);
const SOCKET_TIMEOUT: Duration = Duration::from_secs(60);
const MIGRATION_TIMEOUT: Duration = Duration::from_secs(300);
const GUEST_IP: &str = "10.82.0.2";
const MAC: &str = "02:00:00:00:82:02";

/// A namespace with bridge `br0` (10.82.0.1/24) and taps `msrc0` and `mdst0` on it.
fn bridged_namespace() -> NetNs {
    let ns = NetNs::new("mig").expect("test setup");
    ns.add_bridge("br0", "10.82.0.1/24", &["msrc0", "mdst0"])
        .expect("test setup");
    ns
}

/// Waits on `tap` (inside `ns`) for the first RARP frame (ethertype 0x8035) and returns it. Only a
/// VMM announcing a guest sends those: the guest's own traffic does not count. Gives up (an error)
/// after two minutes without a frame.
fn catch_rarp(ns: &NetNs, tap: &str) -> std::thread::JoinHandle<anyhow::Result<Vec<u8>>> {
    let tap = std::ffi::CString::new(tap).expect("test setup");
    ns.spawn(move || {
        // All protocols: frames on a bridge port reach protocol-specific sockets only after the
        // bridge has taken them, so filter here instead.
        let proto = (libc::ETH_P_ALL as u16).to_be();
        // SAFETY: plain socket creation; the fd is owned (and closed) by `fd` below.
        let raw = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, i32::from(proto)) };
        anyhow::ensure!(raw >= 0, "AF_PACKET socket: {}", std::io::Error::last_os_error());
        // SAFETY: `raw` is a descriptor just returned to us and not owned elsewhere.
        let fd = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(raw) };
        // SAFETY: `tap` is a NUL-terminated string that outlives the call.
        let index = unsafe { libc::if_nametoindex(tap.as_ptr()) };
        anyhow::ensure!(index != 0, "no interface {tap:?}");
        // SAFETY: sockaddr_ll is plain data; all-zero is a valid starting value.
        let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_protocol = proto;
        addr.sll_ifindex = index as i32;
        // SAFETY: `addr` is a valid sockaddr_ll of the size passed.
        let bound = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&addr as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        anyhow::ensure!(bound == 0, "bind: {}", std::io::Error::last_os_error());
        let socket = std::fs::File::from(fd);
        let mut buf = vec![0u8; 2048];
        let tv = libc::timeval {
            tv_sec: 120,
            tv_usec: 0,
        };
        // SAFETY: `tv` is a valid timeval of the size passed; the fd is open.
        unsafe {
            libc::setsockopt(
                socket.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&tv as *const libc::timeval).cast(),
                std::mem::size_of::<libc::timeval>() as u32,
            )
        };
        let deadline = std::time::Instant::now() + Duration::from_secs(120);
        loop {
            anyhow::ensure!(std::time::Instant::now() < deadline, "no RARP frame in time");
            let n = std::io::Read::read(&mut &socket, &mut buf)?;
            if n >= 14 && buf[12..14] == [0x80, 0x35] {
                buf.truncate(n);
                return Ok(buf);
            }
        }
    })
    .expect("test setup")
}

fn ping(ns: &NetNs) -> bool {
    ns.command(Path::new("ping"))
        .args(["-c", "1", "-W", "5", GUEST_IP])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// The bridge port the guest's MAC was learned on, if any.
fn learned_on(ns: &NetNs) -> Option<String> {
    let out = ns
        .command(Path::new("bridge"))
        .args(["fdb", "show", "br", "br0"])
        .output()
        .ok()?;
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find(|l| l.starts_with(MAC) && !l.contains("permanent"))
        .and_then(|l| {
            l.split_whitespace()
                .skip_while(|w| *w != "dev")
                .nth(1)
                .map(str::to_string)
        })
}

/// An empty VMM serving `sock` inside `ns`, connected.
fn empty_vmm(ns: &NetNs, sock: &Path) -> (Guest, ControlClient) {
    let mut cmd = ns.command(&vmm_binary());
    cmd.arg("--api-sock").arg(sock);
    let guest = Guest::spawn_command(cmd, None).expect("test setup");
    ControlClient::wait_for_socket(sock, SOCKET_TIMEOUT).expect("test setup");
    let c = ControlClient::connect(sock).expect("test setup");
    (guest, c)
}

/// Hands `end` to a VMM under the name `mig`.
fn give_connection(c: &mut ControlClient, end: &UnixStream) {
    let answer = c
        .call_with_fds(
            r#"{"id": 1, "request": {"add-fds": {"names": ["mig"]}}}"#,
            &[end.as_raw_fd()],
        )
        .expect("add-fds");
    assert!(
        matches!(answer.result, Outcome::Ok(Response::FdsAdded { .. })),
        "{answer:?}"
    );
}

/// A source that speaks migration protocol version 2 (its hello: the magic, then the version,
/// then what version 2 had): the destination names the version, answers Abort, builds nothing.
fn older_protocol_is_refused(ns: &NetNs, dir: &Path) {
    let (mut dest, mut d) = empty_vmm(ns, &dir.join("older.sock"));
    let (mut a, b) = UnixStream::pair().expect("socket pair");
    give_connection(&mut d, &b);
    drop(b);
    d.send(r#"{"id": 2, "request": {"migrate-receive": {"connection": "mig"}}}"#)
        .expect("migrate-receive");
    let mut body = b"VMMMIGR\0".to_vec();
    body.extend_from_slice(&2u32.to_le_bytes());
    body.extend_from_slice(&[0u8; 64]);
    let mut frame = vec![1u8];
    frame.extend_from_slice(&(8 + body.len() as u32).to_le_bytes());
    frame.extend_from_slice(&[0u8; 8]);
    frame.extend_from_slice(&body);
    a.write_all(&frame).expect("the hello");
    a.set_read_timeout(Some(Duration::from_secs(30)))
        .expect("read timeout");
    let mut header = [0u8; 5];
    a.read_exact(&mut header).expect("the destination's reply");
    assert_eq!(header[0], 8, "not an Abort frame: {header:?}");
    let len = u32::from_le_bytes([header[1], header[2], header[3], header[4]]) as usize;
    assert!((8..4096).contains(&len), "{header:?}");
    let mut rest = vec![0u8; len];
    a.read_exact(&mut rest).expect("the Abort frame's body");
    let why = String::from_utf8_lossy(&rest[8..]).into_owned();
    assert!(why.contains("version 2"), "{why:?}");
    let answer = d
        .wait_answer(Duration::from_secs(30))
        .expect("the receive answer");
    let Outcome::Error(e) = &answer.result else {
        panic!("{answer:?}")
    };
    assert!(e.message.contains("version 2"), "{answer:?}");
    let Response::Description(desc) = d.ok(r#"{"id": 3, "request": "describe"}"#).expect("describe") else {
        panic!("describe")
    };
    assert_ne!(desc.state, VmState::Running, "{desc:?}");
    let _ = dest.kill();
}

#[test]
fn a_running_guest_moves_to_another_vmm_and_a_refusing_destination_changes_nothing() {
    require_kvm();
    let images = GuestImages::get().unwrap();
    let dir = TempDir::new("vmm-migration").unwrap();
    let disk = dir.path().join("disk.img");
    std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    let sock = dir.path().join("src.sock");
    let ns = bridged_namespace();
    let cmdline = format!(
        "{} vmmprobe.count=1000000 ip={GUEST_IP}::10.82.0.1:255.255.255.0::eth0:off",
        probe_cmdline("blk-write:vda:0:64k:13,blk-flush:vda,counter")
    );
    let mut cmd = ns.command(&vmm_binary());
    cmd.arg("--kernel")
        .arg(&images.vmlinux)
        .args(["--cmdline", &cmdline, "--memory-mib", "128", "--vcpus", "2"])
        .args(["--track-dirty-pages", "on"])
        .args(["--net", &format!("tap=msrc0,mac={MAC},id=eth0")])
        .arg("--drive")
        .arg(format!("path={},id=data", disk.display()))
        .arg("--api-sock")
        .arg(&sock);
    let mut source = Guest::spawn_booting(cmd, 2, None).unwrap();
    ControlClient::wait_for_socket(&sock, SOCKET_TIMEOUT).unwrap();
    let mut c = ControlClient::connect(&sock).unwrap();
    source
        .wait_for_line("vmmprobe: counter=3", BOOT_TIMEOUT)
        .unwrap_or_else(|e| panic!("{e}\n{}", source.output_tail()));
    assert!(ping(&ns), "no ping answer before the migration");
    assert_eq!(learned_on(&ns).as_deref(), Some("msrc0"));

    // Destinations that refuse at the handshake: an override names a NIC the VM does not have; the
    // destination's agent issued a token and the source sends another one, or none. Each time
    // the source keeps running, and nothing is built at the destination.
    let refusals = [
        (
            r#""overrides": {"nets": [{"id": "eth9", "tap": "x"}]}"#,
            "",
            "eth9",
        ),
        (
            r#""token": "s3cret""#,
            r#", "token": "guess""#,
            "wrong migration token",
        ),
        (r#""token": "s3cret""#, "", "the source sent no migration token"),
    ];
    for (n, (receive, send, why)) in refusals.into_iter().enumerate() {
        let (mut refusing, mut r) = empty_vmm(&ns, &dir.path().join(format!("refusing{n}.sock")));
        let (a, b) = UnixStream::pair().unwrap();
        give_connection(&mut r, &b);
        r.send(&format!(
            r#"{{"id": 2, "request": {{"migrate-receive": {{"connection": "mig", {receive}}}}}}}"#
        ))
        .unwrap();
        give_connection(&mut c, &a);
        drop((a, b));
        let started = c
            .ok(&format!(
                r#"{{"id": 3, "request": {{"migrate-send": {{"connection": "mig"{send}}}}}}}"#
            ))
            .unwrap();
        assert!(matches!(started, Response::MigrationStarted(_)), "{started:?}");
        let failed = c.wait_event(|e| matches!(e, Event::MigrationFailed(_)));
        let Event::MigrationFailed(stats) = failed else {
            unreachable!()
        };
        assert_eq!(stats.phase, MigrationPhase::Failed);
        assert!(
            stats.error.as_deref().is_some_and(|e| e.contains(why)),
            "{stats:?}"
        );
        assert_eq!(stats.memory_transferred_bytes, 0, "{stats:?}");
        let answer = r.wait_answer(Duration::from_secs(30)).unwrap();
        let Outcome::Error(e) = &answer.result else {
            panic!("{answer:?}")
        };
        assert!(e.message.contains(why), "{answer:?}");
        let Response::Description(d) = c.ok(r#"{"id": 4, "request": "describe"}"#).unwrap() else {
            panic!("describe")
        };
        assert_eq!(d.state, VmState::Running);
        let Response::MigrationStatus(status) = c.ok(r#"{"id": 5, "request": "migration-status"}"#).unwrap()
        else {
            panic!("migration-status")
        };
        assert_eq!(status.phase, MigrationPhase::Failed);
        drop(r);
        let _ = refusing.kill();
    }
    let seen = harness::probe_counters(&source).last().copied().unwrap_or(0);
    source
        .wait_for_line(&format!("vmmprobe: counter={}", seen + 3), BOOT_TIMEOUT)
        .unwrap_or_else(|e| panic!("the source stopped counting: {e}\n{}", source.output_tail()));
    older_protocol_is_refused(&ns, dir.path());

    // Slowed to 1 MiB/s, round 0 (about 11 MiB) takes seconds: a migration cancelled, or whose
    // destination is killed, right after it started is still in it. Each time the source runs on.
    for (round, how) in ["cancel", "kill"].into_iter().enumerate() {
        let (mut victim, mut v) = empty_vmm(&ns, &dir.path().join(format!("{how}.sock")));
        let (a, b) = UnixStream::pair().unwrap();
        give_connection(&mut v, &b);
        v.send(r#"{"id": 2, "request": {"migrate-receive": {"connection": "mig", "overrides": {"nets": [{"id": "eth0", "tap": "mdst0"}]}}}}"#)
            .unwrap();
        give_connection(&mut c, &a);
        drop((a, b));
        let line = r#"{"id": 10, "request": {"migrate-send": {"connection": "mig", "bandwidth_bytes_per_s": 1048576}}}"#;
        assert!(matches!(c.ok(line).unwrap(), Response::MigrationStarted(_)));
        if how == "cancel" {
            assert_eq!(
                c.ok(r#"{"id": 11, "request": "migrate-cancel"}"#).unwrap(),
                Response::MigrationCancelling
            );
        } else {
            victim.kill().unwrap();
        }
        let Event::MigrationFailed(stats) = c.wait_event(|e| matches!(e, Event::MigrationFailed(_))) else {
            unreachable!()
        };
        assert!(stats.error.is_some(), "{how}: {stats:?}");
        let Response::Description(desc) = c.ok(r#"{"id": 12, "request": "describe"}"#).unwrap() else {
            panic!("describe")
        };
        assert_eq!(desc.state, VmState::Running, "{how}");
        let seen = harness::probe_counters(&source).last().copied().unwrap_or(0);
        source
            .wait_for_line(&format!("vmmprobe: counter={}", seen + 2), BOOT_TIMEOUT)
            .unwrap_or_else(|e| panic!("{how}: the source stopped counting: {e}"));
        if how == "cancel" {
            // The destination learns it from the closed stream and stays without a VM.
            let answer = v.wait_answer(Duration::from_secs(150)).unwrap();
            assert!(matches!(answer.result, Outcome::Error(_)), "{answer:?}");
            let _ = victim.kill();
        }
        eprintln!("{how} (round {round}): {stats:?}");
    }

    // The real destination.
    let (mut dest, mut d) = empty_vmm(&ns, &dir.path().join("dest.sock"));
    let (a, b) = UnixStream::pair().unwrap();
    give_connection(&mut d, &b);
    d.send(r#"{"id": 2, "request": {"migrate-receive": {"connection": "mig", "overrides": {"nets": [{"id": "eth0", "tap": "mdst0"}]}}}}"#)
        .unwrap();
    give_connection(&mut c, &a);
    drop((a, b));
    let before = harness::probe_counters(&source).last().copied().unwrap_or(0);
    let announcement = catch_rarp(&ns, "mdst0");
    let started = c
        .ok(r#"{"id": 6, "request": {"migrate-send": {"connection": "mig", "max_downtime_ms": 300}}}"#)
        .unwrap();
    assert!(matches!(started, Response::MigrationStarted(_)), "{started:?}");
    let done = c.wait_event(|e| matches!(e, Event::MigrationCompleted(_) | Event::MigrationFailed(_)));
    let Event::MigrationCompleted(stats) = done else {
        panic!("{done:?}\n{}", source.output_tail())
    };
    assert_eq!(stats.phase, MigrationPhase::Completed);
    assert_eq!(stats.memory_total_bytes, 128 << 20);
    assert!(stats.memory_transferred_bytes > 0, "{stats:?}");
    assert!(stats.downtime_ms.is_some(), "{stats:?}");
    eprintln!("migration: {stats:?}");
    let status = source.wait_exit(Duration::from_secs(60)).unwrap();
    assert!(status.success(), "{status:?}\n{}", source.output_tail());

    let answer = d.wait_answer(MIGRATION_TIMEOUT).unwrap();
    let Outcome::Ok(Response::MigrationReceived {
        state, memory_bytes, ..
    }) = answer.result
    else {
        panic!("{answer:?}\n{}", dest.output_tail())
    };
    assert_eq!(state, VmState::Running);
    assert!(memory_bytes > 0);
    // The guest counts on where it was, without booting.
    dest.wait_for_line("vmmprobe: counter=", BOOT_TIMEOUT)
        .unwrap_or_else(|e| panic!("{e}\n{}", dest.output_tail()));
    let after = harness::probe_counters(&dest);
    assert!(
        after.first().is_some_and(|n| *n > before),
        "counted {before} at the source, then {after:?} at the destination"
    );
    assert!(
        dest.find_line(&["BOOT-COMPLETE"]).is_none(),
        "the guest booted again"
    );
    // The network followed: the destination announced the guest's MAC on its tap, the bridge
    // learned the MAC behind the new tap, and the guest answers there.
    let frame = announcement
        .join()
        .expect("sniffer")
        .expect("a RARP announcement on mdst0");
    let mac: Vec<u8> = MAC
        .split(':')
        .map(|b| u8::from_str_radix(b, 16).expect("MAC"))
        .collect();
    assert_eq!(
        (&frame[..6], &frame[6..12]),
        (&[0xffu8; 6][..], &mac[..]),
        "{frame:02x?}"
    );
    assert_eq!(&frame[12..14], &[0x80, 0x35]);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while learned_on(&ns).as_deref() != Some("mdst0") {
        assert!(
            std::time::Instant::now() < deadline,
            "the bridge has the guest's MAC on {:?}",
            learned_on(&ns)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(ping(&ns), "no ping answer after the migration");
    let data = std::fs::read(&disk).unwrap();
    assert_eq!(&data[..64 << 10], ProbePattern::bytes(13, 64 << 10).as_slice());
    assert_eq!(
        d.ok(r#"{"id": 7, "request": "stop"}"#).unwrap(),
        Response::Stopping
    );
    let status = dest.wait_exit(Duration::from_secs(60)).unwrap();
    assert!(status.success(), "{status:?}\n{}", dest.output_tail());
}

/// The last line of `guest` that contains `marker` and carries `passes=P ... errors=E`:
/// (passes, errors). The probe's mem-dirty and blk-dirty report alike.
fn pass_progress(guest: &Guest, marker: &str) -> Option<(u64, u64)> {
    let line = guest
        .lines()
        .into_iter()
        .rev()
        .find(|l| l.text.contains(marker))?;
    let field = |name: &str| {
        line.text
            .split_whitespace()
            .find_map(|w| w.strip_prefix(name))
            .and_then(|v| v.parse::<u64>().ok())
    };
    Some((field("passes=")?, field("errors=")?))
}

/// The last `vmmprobe: mem-dirty passes=P bytes=B errors=E` line of `guest`: (passes, errors).
fn dirty_progress(guest: &Guest) -> Option<(u64, u64)> {
    pass_progress(guest, "vmmprobe: mem-dirty passes=")
}

/// A migration from `c` to a fresh empty VMM over a socket pair, with `params` added to
/// `migrate-send`; returns the outcome event and the destination.
fn migrate_with(c: &mut ControlClient, dir: &Path, tag: &str, params: &str) -> (Event, Guest, ControlClient) {
    let (dest, mut d) = empty_vmm_here(&dir.join(format!("{tag}.sock")));
    let (a, b) = UnixStream::pair().expect("socket pair");
    give_connection(&mut d, &b);
    d.send(r#"{"id": 2, "request": {"migrate-receive": {"connection": "mig"}}}"#)
        .expect("migrate-receive");
    give_connection(c, &a);
    drop((a, b));
    let line = format!(r#"{{"id": 20, "request": {{"migrate-send": {{"connection": "mig", {params}}}}}}}"#);
    assert!(matches!(
        c.ok(&line).expect("migrate-send"),
        Response::MigrationStarted(_)
    ));
    let done = c.wait_event(|e| matches!(e, Event::MigrationCompleted(_) | Event::MigrationFailed(_)));
    (done, dest, d)
}

/// An empty VMM serving `sock` in this namespace, connected.
fn empty_vmm_here(sock: &Path) -> (Guest, ControlClient) {
    let mut cmd = std::process::Command::new(vmm_binary());
    cmd.arg("--api-sock").arg(sock);
    let guest = Guest::spawn_command(cmd, None).expect("test setup");
    ControlClient::wait_for_socket(sock, SOCKET_TIMEOUT).expect("test setup");
    let c = ControlClient::connect(sock).expect("test setup");
    (guest, c)
}

/// A guest that rewrites a 16 MiB buffer at full speed never fits a 300 ms budget on a link
/// slower than it dirties: without auto-converge the migration times out and is cancelled per
/// policy (the guest runs on); with it, the vCPU is slowed step by step until the rest fits, and
/// the guest's buffer checks out at the destination (no page stale or damaged).
#[test]
fn a_guest_dirtying_faster_than_the_link_converges_by_throttling_or_is_cancelled_per_policy() {
    require_kvm();
    let images = GuestImages::get().unwrap();
    let dir = TempDir::new("vmm-converge").unwrap();
    let sock = dir.path().join("src.sock");
    let mut cmd = std::process::Command::new(vmm_binary());
    cmd.arg("--kernel")
        .arg(&images.vmlinux)
        .args(["--cmdline", &probe_cmdline("mem-dirty:16m,idle")])
        .args(["--memory-mib", "128", "--vcpus", "1", "--track-dirty-pages", "on"])
        .arg("--api-sock")
        .arg(&sock);
    let source = Guest::spawn_booting(cmd, 1, None).unwrap();
    ControlClient::wait_for_socket(&sock, SOCKET_TIMEOUT).unwrap();
    let mut c = ControlClient::connect(&sock).unwrap();
    source
        .wait_for_line("vmmprobe: mem-dirty passes=", BOOT_TIMEOUT)
        .unwrap_or_else(|e| panic!("{e}\n{}", source.output_tail()));

    // 8 MiB/s, no throttling, 5 s: it cannot converge, and the policy cancels it.
    let (done, mut refused, _) = migrate_with(
        &mut c,
        dir.path(),
        "timeout",
        r#""bandwidth_bytes_per_s": 8388608, "auto_converge": false, "timeout_ms": 5000"#,
    );
    let Event::MigrationFailed(stats) = done else {
        panic!("{done:?}")
    };
    assert!(
        stats.error.as_deref().is_some_and(|e| e.contains("converge")),
        "{stats:?}"
    );
    assert_eq!(stats.throttle_percent, 0, "{stats:?}");
    let _ = refused.kill();
    let (before, errors) = dirty_progress(&source).expect("mem-dirty progress");
    assert_eq!(errors, 0);
    // It goes on at the source (a report a second; passes may leap between reports).
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    while dirty_progress(&source).is_none_or(|(passes, _)| passes <= before) {
        assert!(
            std::time::Instant::now() < deadline,
            "the source stopped after the cancel\n{}",
            source.output_tail()
        );
        std::thread::sleep(Duration::from_millis(200));
    }

    // The same link with auto-converge: it completes, throttled.
    let (done, dest, mut d) = migrate_with(
        &mut c,
        dir.path(),
        "converge",
        r#""bandwidth_bytes_per_s": 8388608, "timeout_ms": 240000"#,
    );
    let Event::MigrationCompleted(stats) = done else {
        panic!("{done:?}\n{}", source.output_tail())
    };
    eprintln!("converged: {stats:?}");
    assert!(stats.throttle_percent > 0, "{stats:?}");
    let answer = d.wait_answer(MIGRATION_TIMEOUT).unwrap();
    assert!(
        matches!(answer.result, Outcome::Ok(Response::MigrationReceived { .. })),
        "{answer:?}"
    );
    // At full speed again at the destination, and every page holds what the last pass wrote.
    let (at_source, _) = dirty_progress(&source).unwrap_or((0, 0));
    dest.wait_for_line("vmmprobe: mem-dirty passes=", BOOT_TIMEOUT)
        .unwrap_or_else(|e| panic!("{e}\n{}", dest.output_tail()));
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let (passes, errors) = dirty_progress(&dest).unwrap_or((0, 0));
        assert_eq!(
            errors,
            0,
            "stale or damaged pages at the destination\n{}",
            dest.output_tail()
        );
        if passes > at_source + 2 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{passes} passes\n{}",
            dest.output_tail()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(
        d.ok(r#"{"id": 7, "request": "stop"}"#).unwrap(),
        Response::Stopping
    );
}

/// The last `vmmprobe: blk-dirty dev=... passes=P bytes=B errors=E` line of `guest`: (passes,
/// errors).
fn disk_dirty_progress(guest: &Guest) -> Option<(u64, u64)> {
    pass_progress(guest, "vmmprobe: blk-dirty dev=")
}

/// A migration with `copy_disks` into a fresh empty VMM whose drive `data` goes to `target`
/// (`None`: no override, the source's own path).
fn migrate_copying(
    c: &mut ControlClient,
    dir: &Path,
    tag: &str,
    target: Option<&Path>,
) -> (Event, Guest, ControlClient) {
    let (dest, mut d) = empty_vmm_here(&dir.join(format!("{tag}.sock")));
    let (a, b) = UnixStream::pair().expect("socket pair");
    give_connection(&mut d, &b);
    let overrides = match target {
        Some(p) => format!(
            r#", "overrides": {{"drives": [{{"id": "data", "path": "{}"}}]}}"#,
            p.display()
        ),
        None => String::new(),
    };
    d.send(&format!(
        r#"{{"id": 2, "request": {{"migrate-receive": {{"connection": "mig"{overrides}}}}}}}"#
    ))
    .expect("migrate-receive");
    give_connection(c, &a);
    drop((a, b));
    // 16 MiB/s: pre-copy takes seconds while the guest rewrites its disk, and a second round
    // (what it rewrote meanwhile) fits a budget of a second.
    let line = r#"{"id": 30, "request": {"migrate-send": {"connection": "mig", "copy_disks": true, "bandwidth_bytes_per_s": 16777216, "max_downtime_ms": 1000}}}"#;
    assert!(matches!(
        c.ok(line).expect("migrate-send"),
        Response::MigrationStarted(_)
    ));
    let done = c.wait_event(|e| matches!(e, Event::MigrationCompleted(_) | Event::MigrationFailed(_)));
    (done, dest, d)
}

/// Local disks: the source copies the image while the guest rewrites its first 8 MiB pass after
/// pass; a target of the wrong size, and the source's own (locked) image, are refused and the
/// guest runs on; into an empty file the copy completes, data the guest never touched (and the
/// holes) arrive as they were, and the destination's passes find every block the source's last
/// pass wrote.
#[test]
fn a_guest_rewriting_its_local_disk_moves_with_an_identical_copy() {
    require_kvm();
    let images = GuestImages::get().unwrap();
    let dir = TempDir::new("vmm-disk-copy").unwrap();
    let disk = dir.path().join("disk.img");
    // 64 MiB, sparse, with known data at 32 MiB that the guest never touches.
    let untouched = ProbePattern::bytes(21, 1 << 20);
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::File::create(&disk).unwrap();
        f.set_len(64 << 20).unwrap();
        f.write_all_at(&untouched, 32 << 20).unwrap();
    }
    let sock = dir.path().join("src.sock");
    let mut cmd = std::process::Command::new(vmm_binary());
    cmd.arg("--kernel")
        .arg(&images.vmlinux)
        .args(["--cmdline", &probe_cmdline("blk-dirty:vda:8m,mem-dirty:4m,idle")])
        .args(["--memory-mib", "128", "--vcpus", "2", "--track-dirty-pages", "on"])
        .arg("--drive")
        .arg(format!("path={},id=data", disk.display()))
        .arg("--api-sock")
        .arg(&sock);
    let source = Guest::spawn_booting(cmd, 2, None).unwrap();
    ControlClient::wait_for_socket(&sock, SOCKET_TIMEOUT).unwrap();
    let mut c = ControlClient::connect(&sock).unwrap();
    source
        .wait_for_line("vmmprobe: blk-dirty dev=vda passes=", BOOT_TIMEOUT)
        .unwrap_or_else(|e| panic!("{e}\n{}", source.output_tail()));

    // Refused before any copy: a file of another size, and the source's own image.
    let wrong = dir.path().join("wrong.img");
    std::fs::write(&wrong, vec![1u8; 1 << 20]).unwrap();
    for (tag, target, why) in [("wrong", Some(wrong.as_path()), "bytes"), ("own", None, "lock")] {
        let (done, mut refusing, _) = migrate_copying(&mut c, dir.path(), tag, target);
        let Event::MigrationFailed(stats) = done else {
            panic!("{tag}: {done:?}")
        };
        assert!(
            stats.error.as_deref().is_some_and(|e| e.contains(why)),
            "{tag}: {stats:?}"
        );
        assert_eq!(stats.disk_transferred_bytes, 0, "{tag}: {stats:?}");
        let _ = refusing.kill();
    }
    assert_eq!(std::fs::read(&wrong).unwrap(), vec![1u8; 1 << 20]);
    let (before, errors) = disk_dirty_progress(&source).expect("blk-dirty progress");
    assert_eq!(errors, 0, "{}", source.output_tail());
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    while disk_dirty_progress(&source).is_none_or(|(passes, _)| passes <= before) {
        assert!(
            std::time::Instant::now() < deadline,
            "the source stopped writing after the refusals\n{}",
            source.output_tail()
        );
        std::thread::sleep(Duration::from_millis(200));
    }

    let copy = dir.path().join("copy.img");
    std::fs::File::create(&copy).unwrap();
    let (done, dest, mut d) = migrate_copying(&mut c, dir.path(), "copy", Some(&copy));
    let Event::MigrationCompleted(stats) = done else {
        panic!("{done:?}\n{}", source.output_tail())
    };
    eprintln!("copied: {stats:?}");
    assert_eq!(stats.disk_total_bytes, 64 << 20);
    // Round 0 sent the data (the 8 MiB rewritten, the 1 MiB untouched), not the holes; later
    // rounds what the guest rewrote meanwhile (it never stops).
    assert!(
        stats.disk_transferred_bytes > 9 << 20 && stats.iteration >= 1,
        "{stats:?}"
    );
    let answer = d.wait_answer(MIGRATION_TIMEOUT).unwrap();
    assert!(
        matches!(answer.result, Outcome::Ok(Response::MigrationReceived { .. })),
        "{answer:?}"
    );
    assert_eq!(std::fs::metadata(&copy).unwrap().len(), 64 << 20);
    {
        use std::os::unix::fs::{FileExt, MetadataExt};
        let f = std::fs::File::open(&copy).unwrap();
        let mut got = vec![0u8; untouched.len()];
        f.read_exact_at(&mut got, 32 << 20).unwrap();
        assert!(got == untouched, "the untouched data differs in the copy");
        let mut hole = vec![1u8; 1 << 20];
        f.read_exact_at(&mut hole, 48 << 20).unwrap();
        assert!(hole.iter().all(|b| *b == 0));
        // The holes stayed holes.
        let allocated = std::fs::metadata(&copy).unwrap().blocks() * 512;
        assert!(allocated < 32 << 20, "{allocated} bytes allocated");
    }
    // The destination goes on rewriting, and its first pass checks the source's last.
    let (at_source, _) = disk_dirty_progress(&source).unwrap_or((0, 0));
    dest.wait_for_line("vmmprobe: blk-dirty dev=vda passes=", BOOT_TIMEOUT)
        .unwrap_or_else(|e| panic!("{e}\n{}", dest.output_tail()));
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    loop {
        let (passes, errors) = disk_dirty_progress(&dest).unwrap_or((0, 0));
        assert_eq!(
            errors,
            0,
            "stale or missing disk blocks at the destination\n{}",
            dest.output_tail()
        );
        let memory_errors = dirty_progress(&dest).map_or(0, |(_, e)| e);
        assert_eq!(memory_errors, 0, "{}", dest.output_tail());
        if passes > at_source + 2 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{passes} passes\n{}",
            dest.output_tail()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(
        d.ok(r#"{"id": 7, "request": "stop"}"#).unwrap(),
        Response::Stopping
    );
}
