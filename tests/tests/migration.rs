//! Live migration between two VMM processes over a socket pair, on a real guest that keeps a
//! counter in memory and wrote data to its disk (shared: both VMMs see the same image). A
//! destination that cannot take the VM refuses at the handshake and the source runs on; a
//! destination that can receives the memory rounds and the state, the source commits and exits
//! with 0, and the guest continues counting at the destination without booting again.

use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use harness::{
    probe_cmdline, require_kvm, vmm_binary, ControlClient, Guest, GuestImages, ProbePattern, TempDir,
};
use vmm_api::control::{Event, Outcome, Response, VmState};
use vmm_api::migration::MigrationPhase;

const BOOT_TIMEOUT: Duration = Duration::from_secs(600);
const SOCKET_TIMEOUT: Duration = Duration::from_secs(60);
const MIGRATION_TIMEOUT: Duration = Duration::from_secs(300);

fn counters(guest: &Guest) -> Vec<u64> {
    guest
        .lines()
        .iter()
        .filter_map(|l| {
            l.text
                .split_once("vmmprobe: counter=")
                .map(|(_, n)| n.trim().parse().ok())
        })
        .flatten()
        .collect()
}

/// An empty VMM serving `sock`, connected.
fn empty_vmm(sock: &Path) -> (Guest, ControlClient) {
    let mut cmd = std::process::Command::new(vmm_binary());
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

#[test]
fn a_running_guest_moves_to_another_vmm_and_a_refusing_destination_changes_nothing() {
    require_kvm();
    let images = GuestImages::get().unwrap();
    let dir = TempDir::new("vmm-migration").unwrap();
    let disk = dir.path().join("disk.img");
    std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    let sock = dir.path().join("src.sock");
    let mut source = harness::GuestBuilder::new(&images.vmlinux)
        .cmdline(&format!(
            "{} vmmprobe.count=1000000",
            probe_cmdline("blk-write:vda:0:64k:13,blk-flush:vda,counter")
        ))
        .vcpus(2)
        .arg("--track-dirty-pages")
        .arg("on")
        .arg("--drive")
        .arg(format!("path={},id=data", disk.display()))
        .arg("--api-sock")
        .arg(&sock)
        .spawn()
        .unwrap();
    ControlClient::wait_for_socket(&sock, SOCKET_TIMEOUT).unwrap();
    let mut c = ControlClient::connect(&sock).unwrap();
    source
        .wait_for_line("vmmprobe: counter=3", BOOT_TIMEOUT)
        .unwrap_or_else(|e| panic!("{e}\n{}", source.output_tail()));

    // A destination that cannot take it (an override names a NIC the VM does not have): refused
    // at the handshake; the source keeps running and counting.
    let (mut refusing, mut r) = empty_vmm(&dir.path().join("refusing.sock"));
    let (a, b) = UnixStream::pair().unwrap();
    give_connection(&mut r, &b);
    r.send(r#"{"id": 2, "request": {"migrate-receive": {"connection": "mig", "overrides": {"nets": [{"id": "eth9", "tap": "x"}]}}}}"#)
        .unwrap();
    give_connection(&mut c, &a);
    drop((a, b));
    let started = c
        .ok(r#"{"id": 3, "request": {"migrate-send": {"connection": "mig"}}}"#)
        .unwrap();
    assert!(matches!(started, Response::MigrationStarted(_)), "{started:?}");
    let failed = c.wait_event(|e| matches!(e, Event::MigrationFailed(_)));
    let Event::MigrationFailed(stats) = failed else {
        unreachable!()
    };
    assert_eq!(stats.phase, MigrationPhase::Failed);
    assert!(
        stats.error.as_deref().is_some_and(|e| e.contains("eth9")),
        "{stats:?}"
    );
    let answer = r.wait_answer(Duration::from_secs(30)).unwrap();
    assert!(matches!(answer.result, Outcome::Error(_)), "{answer:?}");
    let Response::Description(d) = c.ok(r#"{"id": 4, "request": "describe"}"#).unwrap() else {
        panic!("describe")
    };
    assert_eq!(d.state, VmState::Running);
    let seen = counters(&source).last().copied().unwrap_or(0);
    source
        .wait_for_line(&format!("vmmprobe: counter={}", seen + 3), BOOT_TIMEOUT)
        .unwrap_or_else(|e| panic!("the source stopped counting: {e}\n{}", source.output_tail()));
    let Response::MigrationStatus(status) = c.ok(r#"{"id": 5, "request": "migration-status"}"#).unwrap()
    else {
        panic!("migration-status")
    };
    assert_eq!(status.phase, MigrationPhase::Failed);
    drop(r);
    let _ = refusing.kill();

    // The real destination.
    let (mut dest, mut d) = empty_vmm(&dir.path().join("dest.sock"));
    let (a, b) = UnixStream::pair().unwrap();
    give_connection(&mut d, &b);
    d.send(r#"{"id": 2, "request": {"migrate-receive": {"connection": "mig"}}}"#)
        .unwrap();
    give_connection(&mut c, &a);
    drop((a, b));
    let before = counters(&source).last().copied().unwrap_or(0);
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
    let after = counters(&dest);
    assert!(
        after.first().is_some_and(|n| *n > before),
        "counted {before} at the source, then {after:?} at the destination"
    );
    assert!(
        dest.find_line(&["BOOT-COMPLETE"]).is_none(),
        "the guest booted again"
    );
    let data = std::fs::read(&disk).unwrap();
    assert_eq!(&data[..64 << 10], ProbePattern::bytes(13, 64 << 10).as_slice());
    assert_eq!(
        d.ok(r#"{"id": 7, "request": "stop"}"#).unwrap(),
        Response::Stopping
    );
    let status = dest.wait_exit(Duration::from_secs(60)).unwrap();
    assert!(status.success(), "{status:?}\n{}", dest.output_tail());
}
