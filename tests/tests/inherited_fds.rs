//! `vmm --fd NAME=N`: descriptors inherited at launch land in the table `add-fds` fills. No guest
//! boots here (a descriptor that is not a tap stops the build at its NIC); the jail test
//! (`jail.rs`) runs a guest whose NIC is an inherited tap.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::process::{Command, Output};
use std::time::Duration;

use harness::{inherit_fd, require_kvm, vmm_binary, ControlClient, Guest, GuestImages, TempDir};
use vmm_api::control::{ErrorKind, Outcome, Response};

fn assert_refused(out: &Output, expected: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.starts_with("vmm: error: ") && stderr.lines().count() == 1,
        "want one error line: {stderr}"
    );
    assert!(stderr.contains(expected), "want '{expected}' in: {stderr}");
}

#[test]
fn unopened_repeated_and_standard_descriptors_are_refused() {
    let tmp = TempDir::new("vmm-fd-bad").unwrap();
    let sock = tmp.path().join("api.sock");
    let vmm = |fds: &[&str]| {
        let mut cmd = Command::new(vmm_binary());
        cmd.arg("--api-sock").arg(&sock);
        for fd in fds {
            cmd.args(["--fd", fd]);
        }
        cmd.output().expect("run vmm")
    };
    // Nothing in this process is inherited by its children unless asked: 99 is not open there.
    assert_refused(
        &vmm(&["x=99"]),
        "--fd x=99: descriptor 99 is not open (the parent must leave it open across exec",
    );
    assert_refused(
        &vmm(&["a=3", "a=4"]),
        "--fd a=4: the name 'a' is given more than once",
    );
    assert_refused(
        &vmm(&["a=7", "b=7"]),
        "--fd b=7: descriptor 7 is given more than once (also as 'a')",
    );
    assert_refused(&vmm(&["a=2"]), "invalid value 'a=2' for --fd");
    assert_refused(&vmm(&["bad name=5"]), "invalid value 'bad name=5' for --fd");
    // Refused before anything was created.
    assert!(!sock.exists());
}

#[test]
fn inherited_descriptors_are_named_like_passed_ones() {
    require_kvm();
    let images = GuestImages::get().unwrap();
    let tmp = TempDir::new("vmm-fd").unwrap();
    let sock = tmp.path().join("api.sock");
    // Not a tap: the NIC that names it fails to build, which shows the VMM looked it up by name
    // without booting a guest.
    let not_a_tap = File::open("/dev/null").unwrap();

    // An empty VMM: the descriptor waits in the table for a `configure` that names it.
    let mut cmd = Command::new(vmm_binary());
    let n = inherit_fd(&mut cmd, &not_a_tap);
    cmd.arg("--api-sock")
        .arg(&sock)
        .args(["--fd", &format!("tap0={n}")]);
    let mut vmm = Guest::spawn_command(cmd, None).unwrap();
    ControlClient::wait_for_socket(&sock, Duration::from_secs(60)).unwrap();
    let mut c = ControlClient::connect(&sock).unwrap();
    let configure = serde_json::json!({"id": 1, "request": {"configure": {
        "boot": {"kernel": images.vmlinux},
        "nets": [{"id": "eth0", "fd": "tap0"}]}}})
    .to_string();
    assert_eq!(c.ok(&configure).unwrap(), Response::Configured);
    // The inherited one counts against the limit `add-fds` applies to the whole table (64).
    let add = |c: &mut ControlClient, id: u64, count: usize| {
        let names: Vec<String> = (0..count).map(|i| format!("f{i}")).collect();
        let line = serde_json::json!({"id": id, "request": {"add-fds": {"names": names}}}).to_string();
        let fds = vec![not_a_tap.as_raw_fd(); count];
        c.call_with_fds(&line, &fds).unwrap().result
    };
    match add(&mut c, 2, 64) {
        Outcome::Error(e) => {
            assert_eq!(e.kind, ErrorKind::InvalidArgument, "{e:?}");
            assert!(e.message.contains("at most 64"), "{e:?}");
        }
        other => panic!("64 more descriptors were taken: {other:?}"),
    }
    assert!(matches!(
        add(&mut c, 3, 63),
        Outcome::Ok(Response::FdsAdded { .. })
    ));
    let (kind, message) = c.error(r#"{"id": 4, "request": "start"}"#).unwrap();
    assert!(
        message.contains("NIC eth0: passed descriptor is not an attached tap"),
        "{kind:?}: {message}"
    );
    // The NIC took it out of the table (and closed it): now the name is unknown.
    let (_, message) = c.error(r#"{"id": 5, "request": "start"}"#).unwrap();
    assert!(
        message.contains("no file descriptor named \"tap0\" was passed (add-fds or --fd)"),
        "{message}"
    );
    assert_eq!(
        c.ok(r#"{"id": 6, "request": "stop"}"#).unwrap(),
        Response::Stopping
    );
    let status = vmm.wait_exit(Duration::from_secs(60)).unwrap();
    assert!(status.success(), "{}", vmm.stderr_text());

    // Flags: the NIC names the inherited descriptor with fd=.
    let mut cmd = Command::new(vmm_binary());
    let n = inherit_fd(&mut cmd, &not_a_tap);
    cmd.arg("--kernel")
        .arg(&images.vmlinux)
        .args(["--fd", &format!("t={n}"), "--net", "fd=t,id=eth0"]);
    assert_refused(
        &cmd.output().unwrap(),
        "NIC eth0: passed descriptor is not an attached tap",
    );
    // And a name nobody passed is the same clear error as without --fd.
    let mut cmd = Command::new(vmm_binary());
    let n = inherit_fd(&mut cmd, &not_a_tap);
    cmd.arg("--kernel")
        .arg(&images.vmlinux)
        .args(["--fd", &format!("t={n}"), "--net", "fd=other"]);
    assert_refused(
        &cmd.output().unwrap(),
        "no file descriptor named \"other\" was passed (add-fds or --fd)",
    );
}
