//! The control socket end to end: a real guest, real clients on the Unix socket, hostile ones too.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use harness::{probe_cmdline, require_kvm, vmm_binary, ControlClient, GuestBuilder, GuestImages, TempDir};
use vmm_api::control::{ErrorKind, Event, Outcome, Response, ResponseLine, VmState};

const BOOT_TIMEOUT: Duration = Duration::from_secs(600);

/// A deterministic stream of pseudo-random bytes (xorshift64), so a failure can be replayed.
struct Noise(u64);

impl Noise {
    fn byte(&mut self) -> u8 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 >> 24) as u8
    }

    /// A line of 1-200 random bytes, none of them a newline.
    fn line(&mut self) -> Vec<u8> {
        let len = 1 + usize::from(self.byte()) % 200;
        (0..len)
            .map(|_| match self.byte() {
                b'\n' => b' ',
                b => b,
            })
            .collect()
    }
}

/// Sends 10,000 random lines in one go and expects exactly one `bad-request` answer per line.
fn random_lines_get_one_error_each(sock: &Path) -> anyhow::Result<()> {
    let mut c = ControlClient::connect(sock)?;
    let mut noise = Noise(0x2545_f491_4f6c_dd1d);
    let lines = 10_000;
    let mut writer = c.stream().try_clone()?;
    let sender = std::thread::spawn(move || -> std::io::Result<()> {
        for _ in 0..lines {
            let mut line = noise.line();
            line.push(b'\n');
            writer.write_all(&line)?;
        }
        Ok(())
    });
    for i in 0..lines {
        let text = c.read_line()?;
        let answer: ResponseLine =
            serde_json::from_str(&text).map_err(|e| anyhow::anyhow!("line {i}: bad answer {text:?}: {e}"))?;
        match answer.result {
            Outcome::Error(e) if e.kind == ErrorKind::BadRequest => {}
            other => anyhow::bail!("line {i}: expected bad-request, got {other:?}"),
        }
    }
    sender.join().map_err(|_| anyhow::anyhow!("sender panicked"))??;
    anyhow::ensure!(c.ok(r#"{"id": 1, "request": "ping"}"#)? == Response::Pong);
    Ok(())
}

#[test]
fn control_socket_serves_clients_and_stops_the_vm() {
    require_kvm();
    let images = GuestImages::get().unwrap();
    let dir = TempDir::new("vmm-control-serve").unwrap();
    let sock = dir.path().join("api.sock");
    let disk = dir.path().join("disk.img");
    std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    let mut guest = GuestBuilder::new(&images.vmlinux)
        .cmdline(&probe_cmdline("idle"))
        .arg("--api-sock")
        .arg(&sock)
        .arg("--drive")
        .arg(format!("path={},id=data", disk.display()))
        .spawn()
        .unwrap();
    ControlClient::wait_for_socket(&sock, Duration::from_secs(60)).unwrap();
    let mut c = ControlClient::connect(&sock).unwrap();
    assert_eq!(c.ok(r#"{"id": 1, "request": "ping"}"#).unwrap(), Response::Pong);
    let echoed = c.call(r#"{"id": 77, "request": "ping"}"#).unwrap();
    assert_eq!(echoed.id, 77);

    let Response::Description(d) = c.ok(r#"{"id": 2, "request": "describe"}"#).unwrap() else {
        panic!("describe")
    };
    assert_eq!((d.state, d.vcpus, d.memory_mib), (VmState::Running, 1, 128));
    assert_eq!(d.config.expect("configured").drives[0].id, "data");

    // Malformed input gets an error and the connection keeps working.
    let kind = |c: &mut ControlClient, line: &str| c.error(line).unwrap().0;
    assert_eq!(kind(&mut c, "this is not json"), ErrorKind::BadRequest);
    assert_eq!(
        kind(&mut c, r#"{"id": 3, "request": "reboot"}"#),
        ErrorKind::BadRequest
    );
    assert_eq!(
        kind(&mut c, r#"{"id": 3, "request": "ping", "x": 1}"#),
        ErrorKind::BadRequest
    );
    let nobody = r#"{"id": 4, "request": {"update-rate-limiter": {"drive": "nope", "rate_limiter": {}}}}"#;
    assert_eq!(kind(&mut c, nobody), ErrorKind::NotFound);
    let invalid = r#"{"id": 5, "request": {"update-rate-limiter": {"drive": "data",
        "rate_limiter": {"ops": {"size": 0, "refill_time_ms": 100}}}}}"#
        .replace('\n', " ");
    assert_eq!(kind(&mut c, &invalid), ErrorKind::InvalidArgument);
    let valid = r#"{"id": 6, "request": {"update-rate-limiter": {"drive": "data",
        "rate_limiter": {"ops": {"size": 1000, "refill_time_ms": 1000}}}}}"#
        .replace('\n', " ");
    assert_eq!(c.ok(&valid).unwrap(), Response::RateLimiterUpdated);
    // Requests that only make sense before `start`, or that take no descriptors, are refused;
    // `add-fds` is served at any time (a migration takes its connection that way), but its names
    // must match the descriptors that came with it.
    assert_eq!(
        kind(&mut c, r#"{"id": 7, "request": "start"}"#),
        ErrorKind::WrongState
    );
    let names = r#"{"id": 8, "request": {"add-fds": {"names": ["x"]}}}"#;
    assert_eq!(kind(&mut c, names), ErrorKind::InvalidArgument);
    let file = std::fs::File::open(&disk).unwrap();
    let with_fd = c
        .call_with_fds(
            r#"{"id": 9, "request": "ping"}"#,
            &[std::os::fd::AsRawFd::as_raw_fd(&file)],
        )
        .unwrap();
    assert!(
        matches!(with_fd.result, Outcome::Error(ref e) if e.kind == ErrorKind::BadRequest),
        "{with_fd:?}"
    );
    let too_long = r#"{"id": 10, "request": {"shutdown": {"timeout_ms": 99999999999}}}"#;
    assert_eq!(kind(&mut c, too_long), ErrorKind::InvalidArgument);

    // A client that leaves mid-request, one that sends an endless line, and one that sends random
    // bytes harm nobody else.
    {
        let mut quitter = UnixStream::connect(&sock).unwrap();
        quitter.write_all(br#"{"id": 9, "request": "des"#).unwrap();
    }
    {
        let mut flooder = ControlClient::connect(&sock).unwrap();
        let long = "x".repeat(70 * 1024);
        // The VMM may answer and hang up before it has read everything: the rest of the write
        // then fails, and the answer is still there to read.
        let _ = flooder.stream().write_all(long.as_bytes());
        let answer: ResponseLine = serde_json::from_str(&flooder.read_line().unwrap()).unwrap();
        assert!(
            matches!(answer.result, Outcome::Error(ref e) if e.kind == ErrorKind::BadRequest),
            "{answer:?}"
        );
    }
    random_lines_get_one_error_each(&sock).unwrap();
    assert_eq!(c.ok(r#"{"id": 10, "request": "ping"}"#).unwrap(), Response::Pong);

    guest.wait_for_line("BOOT-COMPLETE", BOOT_TIMEOUT).unwrap();
    // The boot event reaches the client (the probe signals the boot timer right before that line).
    let Event::GuestBootComplete { boot_ms } = c.next_event().unwrap() else {
        panic!("expected the boot event")
    };
    assert!(boot_ms > 0);
    let Response::Metrics(m) = c.ok(r#"{"id": 11, "request": "metrics"}"#).unwrap() else {
        panic!("metrics")
    };
    assert!(m.guest_boot_ms.is_some(), "{m:?}");
    assert!(m.vmm_rss_kib > 0);
    assert_eq!(m.drives.len(), 1);
    assert_eq!(m.drives[0].id, "data");
    // The serial console writes ports; the virtio driver reads the device's MMIO registers.
    assert!(m.vcpu_exits["io_out"] > 0, "{m:?}");
    assert!(m.vcpu_exits["mmio_read"] > 0, "{m:?}");

    assert_eq!(
        c.ok(r#"{"id": 12, "request": "stop"}"#).unwrap(),
        Response::Stopping
    );
    assert_eq!(
        c.next_event().unwrap(),
        Event::Exit {
            reason: "stopped by a control request".into(),
            code: 0
        }
    );
    let status = guest.wait_exit(Duration::from_secs(60)).unwrap();
    assert!(status.success(), "{}", guest.stderr_text());
    assert!(guest.stderr_text().contains("stopped by a control request"));
    assert!(!sock.exists(), "the socket file must be removed on exit");
    // A request on the dead VM's connection gets the connection's end, not a hang.
    let mut rest = Vec::new();
    let _ = c.stream().write_all(b"{\"id\": 13, \"request\": \"ping\"}\n");
    let mut stream = c.stream().try_clone().unwrap();
    assert_eq!(stream.read_to_end(&mut rest).unwrap_or(0), 0, "{rest:?}");
    assert!(UnixStream::connect(&sock).is_err());
}

#[test]
fn an_existing_socket_path_is_refused() {
    let images = GuestImages::get().unwrap();
    let dir = TempDir::new("vmm-control-exists").unwrap();
    let sock = dir.path().join("api.sock");
    std::fs::write(&sock, b"").unwrap();
    let out = Command::new(vmm_binary())
        .arg("--kernel")
        .arg(&images.vmlinux)
        .arg("--api-sock")
        .arg(&sock)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("already exists"), "{stderr}");
}
