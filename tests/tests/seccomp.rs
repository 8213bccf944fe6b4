//! Seccomp end to end: a real guest under the default (kill) filters does everything a VM does —
//! SMP boot, virtio-blk I/O on both engines, control-socket requests, power off — so the
//! allow-lists are complete, and every VMM thread really runs filtered.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use harness::{probe_cmdline, require_kvm, vmm_binary, GuestBuilder, GuestImages, TempDir};
use vmm_api::control::{Event, EventLine, Outcome, Response, ResponseLine, VmState};

const BOOT_TIMEOUT: Duration = Duration::from_secs(600);

/// A control-socket client that keeps the event lines it reads past.
struct Client {
    writer: UnixStream,
    reader: BufReader<UnixStream>,
    events: Vec<Event>,
}

impl Client {
    fn connect(path: &Path) -> Client {
        let stream = UnixStream::connect(path).expect("connect to the control socket");
        stream
            .set_read_timeout(Some(Duration::from_secs(120)))
            .expect("socket timeout");
        Client {
            reader: BufReader::new(stream.try_clone().expect("clone stream")),
            writer: stream,
            events: Vec::new(),
        }
    }

    fn read_line(&mut self) -> String {
        let mut text = String::new();
        let n = self
            .reader
            .read_line(&mut text)
            .expect("read from the control socket");
        assert!(
            n > 0,
            "the VMM closed the connection (killed by its seccomp filter?)"
        );
        text
    }

    fn ok(&mut self, request: &str) -> Response {
        self.writer.write_all(request.as_bytes()).expect("send");
        self.writer.write_all(b"\n").expect("send");
        loop {
            let text = self.read_line();
            if let Ok(event) = serde_json::from_str::<EventLine>(&text) {
                self.events.push(event.event);
                continue;
            }
            let answer: ResponseLine =
                serde_json::from_str(&text).unwrap_or_else(|e| panic!("bad answer {text:?}: {e}"));
            match answer.result {
                Outcome::Ok(r) => return r,
                Outcome::Error(e) => panic!("{request}: {e:?}"),
            }
        }
    }

    fn next_event(&mut self) -> Event {
        if !self.events.is_empty() {
            return self.events.remove(0);
        }
        let text = self.read_line();
        serde_json::from_str::<EventLine>(&text)
            .unwrap_or_else(|e| panic!("expected an event, got {text:?}: {e}"))
            .event
    }
}

/// Each thread of `pid`: its name and its `Seccomp:` and `Seccomp_filters:` values.
fn thread_seccomp(pid: u32) -> BTreeMap<u32, (String, Option<String>, Option<String>)> {
    let mut threads = BTreeMap::new();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return threads;
    };
    for task in tasks.flatten() {
        let Ok(status) = std::fs::read_to_string(task.path().join("status")) else {
            continue;
        };
        let field = |key: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(key))
                .map(|v| v.trim().to_string())
        };
        let Some(tid) = task.file_name().to_str().and_then(|t| t.parse().ok()) else {
            continue;
        };
        threads.insert(
            tid,
            (
                field("Name:").unwrap_or_default(),
                field("Seccomp:"),
                field("Seccomp_filters:"),
            ),
        );
    }
    threads
}

/// Threads the kernel adds to a process for its own work (KVM, io_uring), by name.
fn kernel_worker(name: &str) -> bool {
    name.starts_with("kvm-") || name.starts_with("iou-")
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
fn a_guest_runs_to_power_off_under_the_default_kill_filters() {
    require_kvm();
    let images = GuestImages::get().expect("guest images");
    let dir = TempDir::new("vmm-seccomp").expect("temp dir");
    let sock = dir.path().join("api.sock");
    let uring = dir.path().join("uring.img");
    let sync = dir.path().join("sync.img");
    std::fs::write(&uring, vec![0u8; 4 << 20]).expect("image");
    std::fs::write(&sync, vec![0u8; 4 << 20]).expect("image");
    let mut actions = Vec::new();
    for dev in ["vda", "vdb"] {
        actions.push(format!(
            "blk-write:{dev}:0:128k:7,blk-read:{dev}:0:128k,blk-flush:{dev}"
        ));
        actions.push(format!("blk-discard:{dev}:1m:1m,blk-zero:{dev}:2m:64k:nounmap"));
    }
    actions.push("poweroff".to_string());
    let mut guest = GuestBuilder::new(&images.vmlinux)
        .vcpus(2)
        .cmdline(&probe_cmdline(&actions.join(",")))
        .arg("--api-sock")
        .arg(&sock)
        .arg("--drive")
        .arg(format!("path={},id=uring,engine=uring", uring.display()))
        .arg("--drive")
        .arg(format!("path={},id=sync,engine=sync", sync.display()))
        .spawn()
        .expect("spawn vmm");

    // The socket exists before the vCPUs start; the filters follow within moments.
    wait_for_path(&sock);
    let deadline = Instant::now() + Duration::from_secs(60);
    let threads = loop {
        let threads = thread_seccomp(guest.pid());
        let names: Vec<&str> = threads.values().map(|(name, _, _)| name.as_str()).collect();
        let all_filtered = threads.values().all(|(_, mode, _)| mode.as_deref() == Some("2"));
        if all_filtered && names.contains(&"vcpu0") && names.contains(&"vcpu1") {
            break threads;
        }
        assert!(
            Instant::now() < deadline,
            "not every thread is filtered: {threads:?}\n{}",
            guest.output_tail()
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    // The main thread (tid = pid), two vCPUs and the idle migration sender, each under exactly one
    // filter of its own: they were created before the main thread installed its filter, so they did
    // not inherit it.
    // KVM and io_uring may add kernel workers to the process (`kvm-nx-lpage-recovery`, `iou-wrk-N`),
    // which never run user code; they are filtered too, having been forked from a filtered thread.
    assert!(threads.contains_key(&guest.pid()), "{threads:?}");
    let mut others: Vec<&str> = threads
        .iter()
        .filter(|(tid, (name, _, _))| **tid != guest.pid() && !kernel_worker(name))
        .map(|(_, (name, _, _))| name.as_str())
        .collect();
    others.sort_unstable();
    assert_eq!(others, ["vcpu0", "vcpu1", "vmm-migrate"], "{threads:?}");
    for (tid, (name, _, filters)) in &threads {
        if let (Some(filters), false) = (filters, kernel_worker(name)) {
            // The migration thread's second filter only turns file opens into EACCES.
            let expected = if name == "vmm-migrate" { "2" } else { "1" };
            assert_eq!(
                filters, expected,
                "thread {tid} ({name}) runs under {filters} filters"
            );
        }
    }

    let mut c = Client::connect(&sock);
    assert_eq!(c.ok(r#"{"id": 1, "request": "ping"}"#), Response::Pong);
    let Response::Description(d) = c.ok(r#"{"id": 2, "request": "describe"}"#) else {
        panic!("describe")
    };
    assert_eq!((d.state, d.vcpus), (VmState::Running, 2));
    let Response::Metrics(m) = c.ok(r#"{"id": 3, "request": "metrics"}"#) else {
        panic!("metrics")
    };
    // Read through the statm file opened before the filter (no openat at run time).
    assert!(m.vmm_rss_kib > 0, "{m:?}");
    assert_eq!(m.drives.len(), 2);

    guest
        .wait_for_line("BOOT-COMPLETE", BOOT_TIMEOUT)
        .unwrap_or_else(|e| panic!("{e}\n{}", guest.output_tail()));
    let status = guest.wait_exit(BOOT_TIMEOUT).expect("vmm exits");
    let stdout = guest.stdout_text();
    assert!(
        status.success(),
        "vmm exited with {status:?} (SIGSYS = 31: a syscall outside its list)\n{}",
        guest.output_tail()
    );
    assert!(
        guest.stderr_text().contains("guest powered off"),
        "{}",
        guest.output_tail()
    );
    for dev in ["vda", "vdb"] {
        for op in ["blk-write", "blk-read", "blk-flush", "blk-discard", "blk-zero"] {
            let ok = stdout
                .lines()
                .any(|l| l.contains(&format!("{op} dev={dev}")) && l.contains("result=0"));
            assert!(ok, "{op} on {dev} did not succeed:\n{stdout}");
        }
    }
    // The boot event, then the exit event (other events may come between).
    let exit_code = (0..8).find_map(|_| match c.next_event() {
        Event::Exit { code, .. } => Some(code),
        _ => None,
    });
    assert_eq!(exit_code, Some(0));
}

#[test]
fn an_unknown_seccomp_mode_is_a_setup_error() {
    let out = Command::new(vmm_binary())
        .args(["--kernel", "/nonexistent", "--seccomp=allow-all"])
        .output()
        .expect("run vmm");
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("invalid value 'allow-all' for --seccomp"),
        "{stderr}"
    );
}
