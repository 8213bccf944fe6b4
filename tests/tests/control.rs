//! The control socket end to end: a real guest, real clients on the Unix socket, hostile ones too.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use harness::{probe_cmdline, require_kvm, vmm_binary, GuestBuilder, GuestImages, TempDir};
use vmm_api::control::{ErrorKind, Event, EventLine, Outcome, Response, ResponseLine, VmState};

const BOOT_TIMEOUT: Duration = Duration::from_secs(600);

struct Client {
    writer: UnixStream,
    reader: BufReader<UnixStream>,
    /// Event lines received so far.
    events: Vec<Event>,
}

impl Client {
    fn connect(path: &Path) -> Client {
        let stream = UnixStream::connect(path).expect("connect to the control socket");
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .expect("socket timeout");
        Client {
            reader: BufReader::new(stream.try_clone().expect("clone stream")),
            writer: stream,
            events: Vec::new(),
        }
    }

    /// Sends one raw line and reads one answer, keeping event lines that come before it.
    fn call(&mut self, line: &str) -> ResponseLine {
        self.writer.write_all(line.as_bytes()).expect("send");
        self.writer.write_all(b"\n").expect("send");
        loop {
            let text = self.read_line();
            if let Ok(event) = serde_json::from_str::<EventLine>(&text) {
                self.events.push(event.event);
                continue;
            }
            return serde_json::from_str(&text).unwrap_or_else(|e| panic!("bad answer {text:?}: {e}"));
        }
    }

    fn read_line(&mut self) -> String {
        let mut text = String::new();
        let n = self
            .reader
            .read_line(&mut text)
            .expect("read from the control socket");
        assert!(n > 0, "the VMM closed the connection");
        text
    }

    /// Reads lines until an event line arrives (or returns one received earlier).
    fn next_event(&mut self) -> Event {
        if !self.events.is_empty() {
            return self.events.remove(0);
        }
        let text = self.read_line();
        serde_json::from_str::<EventLine>(&text)
            .unwrap_or_else(|e| panic!("expected an event, got {text:?}: {e}"))
            .event
    }

    fn ok(&mut self, line: &str) -> Response {
        match self.call(line).result {
            Outcome::Ok(r) => r,
            Outcome::Error(e) => panic!("{line}: {e:?}"),
        }
    }

    fn error(&mut self, line: &str) -> ErrorKind {
        match self.call(line).result {
            Outcome::Error(e) => e.kind,
            Outcome::Ok(r) => panic!("{line}: expected an error, got {r:?}"),
        }
    }
}

fn wait_for_path(path: &Path) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !path.exists() {
        assert!(
            Instant::now() < deadline,
            "control socket {} never appeared",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
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
    wait_for_path(&sock);
    let mut c = Client::connect(&sock);
    assert_eq!(c.ok(r#"{"id": 1, "request": "ping"}"#), Response::Pong);
    let echoed = c.call(r#"{"id": 77, "request": "ping"}"#);
    assert_eq!(echoed.id, 77);

    let Response::Description(d) = c.ok(r#"{"id": 2, "request": "describe"}"#) else {
        panic!("describe")
    };
    assert_eq!((d.state, d.vcpus, d.memory_mib), (VmState::Running, 1, 128));
    assert_eq!(d.config.expect("configured").drives[0].id, "data");

    // Malformed input gets an error and the connection keeps working.
    assert_eq!(c.error("this is not json"), ErrorKind::BadRequest);
    assert_eq!(
        c.error(r#"{"id": 3, "request": "reboot"}"#),
        ErrorKind::BadRequest
    );
    assert_eq!(
        c.error(r#"{"id": 3, "request": "ping", "x": 1}"#),
        ErrorKind::BadRequest
    );
    let nobody = r#"{"id": 4, "request": {"update-rate-limiter": {"drive": "nope", "rate_limiter": {}}}}"#;
    assert_eq!(c.error(nobody), ErrorKind::NotFound);
    let invalid = r#"{"id": 5, "request": {"update-rate-limiter": {"drive": "data",
        "rate_limiter": {"ops": {"size": 0, "refill_time_ms": 100}}}}}"#
        .replace('\n', " ");
    assert_eq!(c.error(&invalid), ErrorKind::InvalidArgument);
    let valid = r#"{"id": 6, "request": {"update-rate-limiter": {"drive": "data",
        "rate_limiter": {"ops": {"size": 1000, "refill_time_ms": 1000}}}}}"#
        .replace('\n', " ");
    assert_eq!(c.ok(&valid), Response::RateLimiterUpdated);

    // A client that leaves mid-request, and one that sends an endless line, harm nobody else.
    {
        let mut quitter = UnixStream::connect(&sock).unwrap();
        quitter.write_all(br#"{"id": 9, "request": "des"#).unwrap();
    }
    {
        let mut flooder = Client::connect(&sock);
        let long = "x".repeat(70 * 1024);
        assert_eq!(flooder.error(&long), ErrorKind::BadRequest);
    }
    assert_eq!(c.ok(r#"{"id": 10, "request": "ping"}"#), Response::Pong);

    guest.wait_for_line("BOOT-COMPLETE", BOOT_TIMEOUT).unwrap();
    // The boot event reaches the client (the probe signals the boot timer right before that line).
    let Event::GuestBootComplete { boot_ms } = c.next_event() else {
        panic!("expected the boot event")
    };
    assert!(boot_ms > 0);
    let Response::Metrics(m) = c.ok(r#"{"id": 11, "request": "metrics"}"#) else {
        panic!("metrics")
    };
    assert!(m.guest_boot_ms.is_some(), "{m:?}");
    assert!(m.vmm_rss_kib > 0);
    assert_eq!(m.drives.len(), 1);
    assert_eq!(m.drives[0].id, "data");
    // The serial console writes ports; the virtio driver reads the device's MMIO registers.
    assert!(m.vcpu_exits["io_out"] > 0, "{m:?}");
    assert!(m.vcpu_exits["mmio_read"] > 0, "{m:?}");

    assert_eq!(c.ok(r#"{"id": 12, "request": "stop"}"#), Response::Stopping);
    assert_eq!(
        c.next_event(),
        Event::Exit {
            reason: "stopped by a control request".into(),
            code: 0
        }
    );
    let status = guest.wait_exit(Duration::from_secs(60)).unwrap();
    assert!(status.success(), "{}", guest.stderr_text());
    assert!(guest.stderr_text().contains("stopped by a control request"));
    assert!(!sock.exists(), "the socket file must be removed on exit");
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
