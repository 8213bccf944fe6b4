//! The VM lifecycle through the control socket, on real guests: pause and resume (the guest's
//! counter stops and continues), graceful shutdown (the guest runs its reboot path), a guest that
//! ignores Ctrl-Alt-Del and is stopped, and the empty start mode with descriptors passed in.

use std::os::fd::AsRawFd;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use harness::{
    crc32, probe_cmdline, require_kvm, vmm_binary, ControlClient, Guest, GuestBuilder, GuestImages, TempDir,
};
use vmm_api::control::{ErrorKind, Event, Response, VmState};

const BOOT_TIMEOUT: Duration = Duration::from_secs(600);
const SOCKET_TIMEOUT: Duration = Duration::from_secs(60);

/// How many `vmmprobe: counter=` lines the guest has printed.
fn counter_lines(guest: &Guest) -> usize {
    guest
        .lines()
        .iter()
        .filter(|l| l.text.contains("vmmprobe: counter="))
        .count()
}

fn state_change(c: &mut ControlClient, request: &str) -> (VmState, bool) {
    let line = format!(r#"{{"id": 1, "request": "{request}"}}"#);
    match c.ok(&line).expect(request) {
        Response::StateChange { state, changed } => (state, changed),
        other => panic!("{request}: {other:?}"),
    }
}

fn describe_state(c: &mut ControlClient) -> VmState {
    match c.ok(r#"{"id": 2, "request": "describe"}"#).expect("describe") {
        Response::Description(d) => d.state,
        other => panic!("describe: {other:?}"),
    }
}

fn image(path: &Path, len: usize) {
    let data: Vec<u8> = (0..len).map(|i| (i % 253) as u8 | 1).collect();
    std::fs::write(path, data).expect("write image");
}

#[test]
fn pause_stops_the_guest_resume_continues_it_and_shutdown_runs_its_reboot_path() {
    require_kvm();
    let images = GuestImages::get().unwrap();
    let dir = TempDir::new("vmm-lifecycle-pause").unwrap();
    let sock = dir.path().join("api.sock");
    let disk = dir.path().join("disk.img");
    image(&disk, 1 << 20);
    let actions = "blk-write:vda:0:64k:7,blk-read:vda:0:64k,counter";
    let mut guest = GuestBuilder::new(&images.vmlinux)
        .cmdline(&format!("{} vmmprobe.count=1000000", probe_cmdline(actions)))
        .arg("--api-sock")
        .arg(&sock)
        .arg("--drive")
        .arg(format!("path={},id=data", disk.display()))
        .spawn()
        .unwrap();
    ControlClient::wait_for_socket(&sock, SOCKET_TIMEOUT).unwrap();
    let mut c = ControlClient::connect(&sock).unwrap();

    // The guest's block I/O moves the drive's counters.
    guest.wait_for_line("vmmprobe: blk-read", BOOT_TIMEOUT).unwrap();
    let Response::Metrics(m) = c.ok(r#"{"id": 3, "request": "metrics"}"#).unwrap() else {
        panic!("metrics")
    };
    let drive = &m.drives[0];
    assert!(drive.writes >= 1 && drive.reads >= 1, "{drive:?}");
    assert!(
        drive.write_bytes >= 64 << 10 && drive.read_bytes >= 64 << 10,
        "{drive:?}"
    );
    assert!(drive.flushes >= 1 && drive.interrupts >= 1, "{drive:?}");

    guest.wait_for_line("vmmprobe: counter=3", BOOT_TIMEOUT).unwrap();
    guest
        .wait_for_line("vmmprobe: keyboard name=", BOOT_TIMEOUT)
        .unwrap();
    assert_eq!(state_change(&mut c, "pause"), (VmState::Paused, true));
    c.wait_event(|e| {
        *e == Event::StateChanged {
            state: VmState::Paused,
        }
    });
    assert_eq!(describe_state(&mut c), VmState::Paused);
    // Lines already written may still be in the pipe; after that, nothing moves.
    std::thread::sleep(Duration::from_millis(500));
    let paused_at = counter_lines(&guest);
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(
        counter_lines(&guest),
        paused_at,
        "the counter advanced while paused"
    );
    // Pausing a paused VM is a no-op that says so.
    assert_eq!(state_change(&mut c, "pause"), (VmState::Paused, false));

    assert_eq!(state_change(&mut c, "resume"), (VmState::Running, true));
    c.wait_event(|e| {
        *e == Event::StateChanged {
            state: VmState::Running,
        }
    });
    let deadline = Instant::now() + BOOT_TIMEOUT;
    while counter_lines(&guest) <= paused_at + 2 {
        assert!(
            Instant::now() < deadline,
            "the counter did not continue after resume"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(state_change(&mut c, "resume"), (VmState::Running, false));

    let answer = c
        .ok(r#"{"id": 4, "request": {"shutdown": {"timeout_ms": 300000}}}"#)
        .unwrap();
    assert_eq!(
        answer,
        Response::ShuttingDown {
            timeout_ms: 300_000,
            keyboard: true
        }
    );
    guest
        .wait_for_line("vmmprobe: ctrl-alt-del", BOOT_TIMEOUT)
        .unwrap();
    guest
        .wait_for_line("vmmprobe: reboot-notifier event=restart", BOOT_TIMEOUT)
        .unwrap();
    let exit = c.wait_event(|e| matches!(e, Event::Exit { .. }));
    assert_eq!(
        exit,
        Event::Exit {
            reason: "guest requested a reset".into(),
            code: 0
        }
    );
    let status = guest.wait_exit(Duration::from_secs(120)).unwrap();
    assert!(status.success(), "{}", guest.stderr_text());
}

#[test]
fn a_guest_that_ignores_ctrl_alt_del_is_stopped() {
    require_kvm();
    let images = GuestImages::get().unwrap();
    let dir = TempDir::new("vmm-lifecycle-ignore").unwrap();
    let sock = dir.path().join("api.sock");
    let mut guest = GuestBuilder::new(&images.vmlinux)
        .cmdline(&format!("{} vmmprobe.cad=ignore", probe_cmdline("idle")))
        .arg("--api-sock")
        .arg(&sock)
        .spawn()
        .unwrap();
    ControlClient::wait_for_socket(&sock, SOCKET_TIMEOUT).unwrap();
    let mut c = ControlClient::connect(&sock).unwrap();
    guest.wait_for_line("vmmprobe: idle", BOOT_TIMEOUT).unwrap();
    guest
        .wait_for_line("vmmprobe: keyboard name=", BOOT_TIMEOUT)
        .unwrap();

    // A paused guest is resumed for its shutdown, so that it can react.
    assert_eq!(state_change(&mut c, "pause"), (VmState::Paused, true));
    let Response::ShuttingDown { keyboard, .. } = c
        .ok(r#"{"id": 5, "request": {"shutdown": {"timeout_ms": 600000}}}"#)
        .unwrap()
    else {
        panic!("shutdown")
    };
    assert!(keyboard);
    assert_eq!(describe_state(&mut c), VmState::Running);
    guest
        .wait_for_line("vmmprobe: ctrl-alt-del ignored", BOOT_TIMEOUT)
        .unwrap();
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        guest.try_exit_status().unwrap().is_none(),
        "the guest ignored it; the VM must still run"
    );
    assert!(guest.find_line(&["reboot-notifier"]).is_none());

    assert_eq!(
        c.ok(r#"{"id": 6, "request": "stop"}"#).unwrap(),
        Response::Stopping
    );
    let exit = c.wait_event(|e| matches!(e, Event::Exit { .. }));
    assert_eq!(
        exit,
        Event::Exit {
            reason: "stopped by a control request".into(),
            code: 0
        }
    );
    let status = guest.wait_exit(Duration::from_secs(60)).unwrap();
    assert!(status.success(), "{}", guest.stderr_text());
}

#[test]
fn an_empty_vmm_is_configured_given_descriptors_and_started_over_its_socket() {
    require_kvm();
    let images = GuestImages::get().unwrap();
    let dir = TempDir::new("vmm-lifecycle-empty").unwrap();
    let sock = dir.path().join("api.sock");
    let disk = dir.path().join("disk.img");
    image(&disk, 1 << 20);
    let before = std::fs::read(&disk).unwrap();
    let mut cmd = Command::new(vmm_binary());
    cmd.arg("--api-sock").arg(&sock);
    let mut guest = Guest::spawn_booting(cmd, 1, None).unwrap();
    ControlClient::wait_for_socket(&sock, SOCKET_TIMEOUT).unwrap();
    let mut c = ControlClient::connect(&sock).unwrap();

    let Response::Description(d) = c.ok(r#"{"id": 1, "request": "describe"}"#).unwrap() else {
        panic!("describe")
    };
    assert_eq!((d.state, d.config, d.vcpus), (VmState::NotConfigured, None, 0));
    let kind = |c: &mut ControlClient, line: &str| c.error(line).unwrap().0;
    assert_eq!(
        kind(&mut c, r#"{"id": 2, "request": "start"}"#),
        ErrorKind::WrongState
    );
    assert_eq!(
        kind(&mut c, r#"{"id": 3, "request": "pause"}"#),
        ErrorKind::WrongState
    );
    assert_eq!(
        kind(&mut c, r#"{"id": 3, "request": "resume"}"#),
        ErrorKind::WrongState
    );

    // The disk arrives as a descriptor: the VMM never opens its path.
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&disk)
        .unwrap();
    let fd = file.as_raw_fd();
    let mismatch = c
        .call_with_fds(
            r#"{"id": 4, "request": {"add-fds": {"names": ["a", "b"]}}}"#,
            &[fd],
        )
        .unwrap();
    assert!(
        format!("{mismatch:?}").contains("InvalidArgument"),
        "{mismatch:?}"
    );
    let added = c
        .call_with_fds(r#"{"id": 5, "request": {"add-fds": {"names": ["data"]}}}"#, &[fd])
        .unwrap();
    assert!(format!("{added:?}").contains("FdsAdded"), "{added:?}");
    drop(file);

    let config = |kernel: &Path, actions: &str, vcpus: u32| {
        serde_json::json!({"id": 6, "request": {"configure": {
            "boot": {"kernel": kernel, "cmdline": probe_cmdline(actions)},
            "machine": {"vcpus": vcpus, "memory_mib": 128},
            "drives": [{"id": "data", "fd": "data"}],
        }}})
        .to_string()
    };
    let actions = "blk-read:vda:0:64k,blk-write:vda:64k:64k:9,blk-flush:vda,idle";
    assert_eq!(
        kind(&mut c, &config(&images.vmlinux, actions, 0)),
        ErrorKind::InvalidArgument
    );
    // A start that fails (no such kernel) leaves the VMM configured and serving.
    let missing = dir.path().join("no-such-kernel");
    assert_eq!(c.ok(&config(&missing, actions, 1)).unwrap(), Response::Configured);
    let (kind_of_failure, message) = c.error(r#"{"id": 7, "request": "start"}"#).unwrap();
    assert_eq!(kind_of_failure, ErrorKind::InvalidArgument, "{message}");
    assert!(message.contains("no-such-kernel"), "{message}");
    assert_eq!(
        c.ok(&config(&images.vmlinux, actions, 1)).unwrap(),
        Response::Configured
    );
    assert_eq!(describe_state(&mut c), VmState::Configured);
    assert_eq!(
        c.ok(r#"{"id": 8, "request": "start"}"#).unwrap(),
        Response::Started
    );
    c.wait_event(|e| {
        *e == Event::StateChanged {
            state: VmState::Running,
        }
    });
    assert_eq!(
        kind(&mut c, &config(&images.vmlinux, actions, 1)),
        ErrorKind::WrongState
    );

    let read = guest
        .wait_for_line("vmmprobe: blk-read dev=vda", BOOT_TIMEOUT)
        .unwrap();
    let want = format!("crc32={:08x}", crc32(&before[..64 << 10]));
    assert!(read.text.contains(&want), "{} (want {want})", read.text);
    guest
        .wait_for_line("vmmprobe: blk-flush dev=vda", BOOT_TIMEOUT)
        .unwrap();
    let after = std::fs::read(&disk).unwrap();
    assert_eq!(after[..64 << 10], before[..64 << 10]);
    assert_ne!(
        after[64 << 10..128 << 10],
        before[64 << 10..128 << 10],
        "the guest's write is not in the file"
    );

    guest
        .wait_for_line("vmmprobe: keyboard name=", BOOT_TIMEOUT)
        .unwrap();
    c.ok(r#"{"id": 9, "request": {"shutdown": {}}}"#).unwrap();
    let status = guest.wait_exit(Duration::from_secs(300)).unwrap();
    assert!(status.success(), "{}", guest.stderr_text());
    assert!(!sock.exists());
}

#[test]
fn a_guest_panic_is_announced_to_clients_before_the_exit() {
    require_kvm();
    let images = GuestImages::get().unwrap();
    let dir = TempDir::new("vmm-lifecycle-panic").unwrap();
    let sock = dir.path().join("api.sock");
    let mut cmd = Command::new(vmm_binary());
    cmd.arg("--api-sock").arg(&sock);
    let mut guest = Guest::spawn_booting(cmd, 1, None).unwrap();
    ControlClient::wait_for_socket(&sock, SOCKET_TIMEOUT).unwrap();
    let mut c = ControlClient::connect(&sock).unwrap();
    // Started over the socket so that the client is there before anything happens.
    let configure = serde_json::json!({"id": 1, "request": {"configure": {
        "boot": {"kernel": images.vmlinux, "cmdline": probe_cmdline("panic")},
    }}})
    .to_string();
    assert_eq!(c.ok(&configure).unwrap(), Response::Configured);
    assert_eq!(
        c.ok(r#"{"id": 2, "request": "start"}"#).unwrap(),
        Response::Started
    );
    let mut seen = Vec::new();
    loop {
        let event = c.next_event().unwrap();
        let last = matches!(event, Event::Exit { .. });
        seen.push(event);
        if last {
            break;
        }
    }
    let panic_at = seen.iter().position(|e| *e == Event::GuestPanic);
    assert!(panic_at.is_some(), "{seen:?}");
    assert_eq!(
        seen.last(),
        Some(&Event::Exit {
            reason: "guest kernel panicked".into(),
            code: 2
        })
    );
    assert!(seen.contains(&Event::StateChanged {
        state: VmState::Running
    }));
    let status = guest.wait_exit(Duration::from_secs(120)).unwrap();
    assert_eq!(status.code(), Some(2), "{}", guest.stderr_text());
}
