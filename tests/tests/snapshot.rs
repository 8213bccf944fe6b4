//! Snapshots on real guests: a running guest (a counter in memory, data on its disk, a file in the
//! page cache of an ext4 file system on a second disk, a TCP echo server on its NIC) is paused,
//! snapshotted and stopped; a new VMM restores it into another network namespace and tap, and the
//! guest carries on: the counter continues, the disk holds the data, a new TCP connection is
//! echoed, and after a clean shutdown `e2fsck` finds the file system consistent with the file in
//! it; ten clones of the snapshot run side by side. Damaged or
//! mismatched snapshots are refused, the VMM stays unconfigured, and the snapshot is left as it was.
//! A 4-vCPU guest under block I/O gives a chain of diffs that merges into exactly the full snapshot
//! taken at the same instant, and restores.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use harness::{
    crc32, probe_cmdline, require_kvm, vmm_binary, ControlClient, Guest, GuestImages, NetNs, ProbePattern,
    TempDir,
};
use vmm_api::control::{ErrorKind, Event, Response, VmState};

const BOOT_TIMEOUT: Duration = Duration::from_secs(600);
const SOCKET_TIMEOUT: Duration = Duration::from_secs(60);
const GUEST_IP: &str = "10.79.0.2";
const ECHO_PORT: u16 = 7100;
const MAC: &str = "02:00:00:00:79:02";
/// Bytes the guest writes to its disk (seed 11) before it starts counting.
const WRITTEN: usize = 64 << 10;
/// Bytes of the file the guest writes into the ext4 file system of its second disk (seed 21).
const FILE_BYTES: usize = 256 << 10;

/// Every file of a directory with its CRC-32 and length, to show it did not change.
fn fingerprint(dir: &Path) -> Vec<(String, u64, u32)> {
    let mut out: Vec<_> = std::fs::read_dir(dir)
        .expect("test setup")
        .map(|e| {
            let e = e.expect("test setup");
            let bytes = std::fs::read(e.path()).expect("test setup");
            (
                e.file_name().to_string_lossy().into_owned(),
                bytes.len() as u64,
                crc32(&bytes),
            )
        })
        .collect();
    out.sort();
    out
}

/// Starts an empty VMM (socket only) inside `ns` and connects to it.
fn empty_vmm(ns: &NetNs, sock: &Path) -> (Guest, ControlClient) {
    empty_vmm_from(ns.command(&vmm_binary()), sock)
}

/// Runs `cmd` (the vmm binary) as an empty VMM serving `sock` and connects to it.
fn empty_vmm_from(mut cmd: std::process::Command, sock: &Path) -> (Guest, ControlClient) {
    cmd.arg("--api-sock").arg(sock);
    let guest = Guest::spawn_command(cmd, None).expect("test setup");
    ControlClient::wait_for_socket(sock, SOCKET_TIMEOUT).expect("test setup");
    let c = ControlClient::connect(sock).expect("test setup");
    (guest, c)
}

fn restore_line(dir: &Path, disk: &Path, fs: &Path, tap: &str) -> String {
    serde_json::json!({
        "id": 9,
        "request": {"snapshot-restore": {
            "dir": dir,
            "overrides": {
                "drives": [{"id": "data", "path": disk}, {"id": "fs", "path": fs}],
                "nets": [{"id": "eth0", "tap": tap}],
            },
            "resume": true,
        }}
    })
    .to_string()
}

fn echo(ns: &NetNs, message: Vec<u8>) -> Vec<u8> {
    ns.spawn(move || -> anyhow::Result<Vec<u8>> {
        let addr: SocketAddr = format!("{GUEST_IP}:{ECHO_PORT}").parse()?;
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(60))?;
        s.set_read_timeout(Some(Duration::from_secs(60)))?;
        s.write_all(&message)?;
        let mut back = vec![0u8; message.len()];
        s.read_exact(&mut back)?;
        Ok(back)
    })
    .expect("test setup")
    .join()
    .expect("test setup")
    .expect("test setup")
}

/// A fresh ext4 image of 16 MiB (inode tables written now, so the guest does no lazy init).
fn make_ext4(path: &Path) {
    std::fs::File::create(path)
        .and_then(|f| f.set_len(16 << 20))
        .expect("test setup");
    run_tool(
        Command::new("mkfs.ext4")
            .args(["-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0"])
            .arg(path),
    );
}

/// Runs a host tool and returns its standard output; panics with its output if it fails.
fn run_tool(cmd: &mut Command) -> Vec<u8> {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// Copies a snapshot directory, to damage the copy.
fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir(to).expect("test setup");
    for e in std::fs::read_dir(from).expect("test setup") {
        let e = e.expect("test setup");
        std::fs::copy(e.path(), to.join(e.file_name())).expect("test setup");
    }
}

#[test]
fn a_restored_guest_continues_in_another_namespace_and_bad_snapshots_are_refused() {
    require_kvm();
    let images = GuestImages::get().unwrap();
    let dir = TempDir::new("vmm-snapshot").unwrap();
    let disk = dir.path().join("disk.img");
    std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    let fs = dir.path().join("fs.img");
    make_ext4(&fs);

    // The original VM, in its own namespace on tap vsnap0.
    let ns1 = NetNs::new("snap1").unwrap();
    ns1.add_tap("vsnap0", "10.79.0.1/24").unwrap();
    let sock1 = dir.path().join("api1.sock");
    // The file stays in the guest's page cache: the snapshot holds part of the file system.
    let actions = format!(
        "blk-write:vda:0:64k:11,blk-flush:vda,fs-write:vdb:data.bin:{FILE_BYTES}:21,net-echo:{ECHO_PORT},counter"
    );
    let cmdline = format!(
        "{} vmmprobe.count=1000000 ip={GUEST_IP}::10.79.0.1:255.255.255.0::eth0:off",
        probe_cmdline(&actions)
    );
    let mut cmd = ns1.command(&vmm_binary());
    cmd.arg("--kernel")
        .arg(&images.vmlinux)
        .args(["--cmdline", &cmdline, "--memory-mib", "128", "--vcpus", "2"])
        .args(["--net", &format!("tap=vsnap0,mac={MAC},id=eth0")])
        .arg("--drive")
        .arg(format!("path={},id=data", disk.display()))
        .arg("--drive")
        .arg(format!("path={},id=fs", fs.display()))
        .arg("--api-sock")
        .arg(&sock1);
    let mut original = Guest::spawn_booting(cmd, 2, None).unwrap();
    ControlClient::wait_for_socket(&sock1, SOCKET_TIMEOUT).unwrap();
    let mut c = ControlClient::connect(&sock1).unwrap();
    original
        .wait_for_line("vmmprobe: counter=3", BOOT_TIMEOUT)
        .unwrap_or_else(|e| panic!("{e}\n{}", original.output_tail()));
    assert!(
        original
            .find_line(&["vmmprobe: fs-write dev=vdb", "result=0"])
            .is_some(),
        "{}",
        original.output_tail()
    );
    assert_eq!(echo(&ns1, b"before".to_vec()), b"before");

    // Snapshotting a running VM is refused; paused, it works.
    let snap = dir.path().join("snap");
    let create = serde_json::json!({"id": 3, "request": {"snapshot-create": {"dir": snap}}}).to_string();
    assert_eq!(c.error(&create).unwrap().0, ErrorKind::WrongState);
    assert!(!snap.exists());
    assert!(matches!(
        c.ok(r#"{"id": 4, "request": "pause"}"#).unwrap(),
        Response::StateChange {
            state: VmState::Paused,
            ..
        }
    ));
    let Response::SnapshotCreated(info) = c.ok(&create).unwrap() else {
        panic!("snapshot-create")
    };
    assert_eq!(info.memory_size, 128 << 20);
    assert!(
        info.memory_bytes > 0 && info.memory_bytes < info.memory_size,
        "{info:?}"
    );
    assert!(info.disk_bytes >= WRITTEN as u64, "{info:?}");
    // The memory file is sparse: its blocks are about the data written, not the guest's size.
    let blocks = std::os::unix::fs::MetadataExt::blocks(&std::fs::metadata(snap.join("memory")).unwrap());
    assert!(
        blocks * 512 < info.memory_size,
        "memory file not sparse: {blocks} blocks"
    );
    // A second snapshot into the same directory is refused, and the first is kept.
    assert_eq!(c.error(&create).unwrap().0, ErrorKind::InvalidArgument);
    let pristine = fingerprint(&snap);
    assert_eq!(
        c.ok(r#"{"id": 5, "request": "stop"}"#).unwrap(),
        Response::Stopping
    );
    let status = original.wait_exit(Duration::from_secs(60)).unwrap();
    assert!(status.success(), "{status:?}\n{}", original.output_tail());
    std::thread::sleep(Duration::from_millis(300));
    let last_before = *harness::probe_counters(&original).last().expect("counter lines");

    // The restoring VMM lives in another namespace, behind another tap.
    let ns2 = NetNs::new("snap2").unwrap();
    ns2.add_tap("vsnap1", "10.79.0.1/24").unwrap();
    let sock2 = dir.path().join("api2.sock");
    let (mut restored, mut c2) = empty_vmm(&ns2, &sock2);
    let restored_disk = dir.path().join("restored.img");
    let restored_fs = dir.path().join("restored-fs.img");

    // Damaged and mismatched snapshots: each refused clearly, nothing started, nothing changed.
    let mut bad = |name: &str, damage: &dyn Fn(&Path)| -> (ErrorKind, String) {
        let copy = dir.path().join(name);
        copy_dir(&snap, &copy);
        damage(&copy);
        let answer = c2
            .error(&restore_line(&copy, &restored_disk, &restored_fs, "vsnap1"))
            .unwrap();
        assert!(
            !restored_disk.exists() && !restored_fs.exists(),
            "{name}: a disk was written"
        );
        answer
    };
    let flip = |p: &Path| {
        let path = p.join("state");
        let mut bytes = std::fs::read(&path).unwrap();
        let mid = bytes.len() / 2;
        bytes[mid] ^= 1;
        std::fs::write(&path, bytes).unwrap();
    };
    let (kind, msg) = bad("flipped", &flip);
    assert_eq!(kind, ErrorKind::InvalidArgument);
    assert!(msg.contains("checksum"), "{msg}");
    let truncate = |p: &Path| {
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(p.join("memory"))
            .unwrap();
        f.set_len(64 << 20).unwrap();
    };
    let (kind, msg) = bad("truncated", &truncate);
    assert_eq!(kind, ErrorKind::InvalidArgument);
    assert!(msg.contains("memory file"), "{msg}");
    let newer = |p: &Path| {
        let path = p.join("state");
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[8] = 99;
        std::fs::write(&path, bytes).unwrap();
    };
    let (kind, msg) = bad("newer", &newer);
    assert_eq!(kind, ErrorKind::InvalidArgument);
    assert!(msg.contains("version 99"), "{msg}");
    let no_disk = |p: &Path| std::fs::remove_file(p.join("disk-data")).unwrap();
    let (kind, msg) = bad("nodisk", &no_disk);
    assert_eq!(kind, ErrorKind::NotFound);
    assert!(msg.contains("disk-data"), "{msg}");
    let unknown_tap = c2
        .error(&restore_line(&snap, &restored_disk, &restored_fs, "nosuchtap0"))
        .unwrap();
    assert!(unknown_tap.1.contains("nosuchtap0"), "{unknown_tap:?}");
    let Response::Description(d) = c2.ok(r#"{"id": 6, "request": "describe"}"#).unwrap() else {
        panic!("describe")
    };
    assert_eq!(d.state, VmState::NotConfigured);
    assert_eq!(
        fingerprint(&snap),
        pristine,
        "a refused restore changed the snapshot"
    );
    // The attempt with the unknown tap got as far as copying the disk, and removed the copy.
    assert!(
        !restored_disk.exists(),
        "a failed restore left its disk copy behind"
    );

    // The real restore: the guest continues where it stopped.
    let Response::Restored { state, .. } = c2
        .ok(&restore_line(&snap, &restored_disk, &restored_fs, "vsnap1"))
        .unwrap()
    else {
        panic!("snapshot-restore")
    };
    assert_eq!(state, VmState::Running);
    let next = format!("vmmprobe: counter={}", last_before + 3);
    restored
        .wait_for_line(&next, BOOT_TIMEOUT)
        .unwrap_or_else(|e| panic!("{e}\n{}", restored.output_tail()));
    let first_after = harness::probe_counters(&restored)[0];
    assert!(
        first_after == last_before + 1 || first_after == last_before + 2,
        "counter went from {last_before} to {first_after}"
    );
    assert!(
        restored.find_line(&["BOOT-COMPLETE"]).is_none(),
        "the guest booted again"
    );
    // A new TCP connection to the guest's echo server, over the new tap.
    let message = ProbePattern::bytes(3, 50_000);
    assert_eq!(echo(&ns2, message.clone()), message);
    assert_eq!(fingerprint(&snap), pristine, "restoring changed the snapshot");
    // A clean shutdown: the restored guest writes out the file system the snapshot caught mid-use.
    assert!(matches!(
        c2.ok(r#"{"id": 7, "request": {"shutdown": {"timeout_ms": 300000}}}"#)
            .unwrap(),
        Response::ShuttingDown { .. }
    ));
    let _ = c2.wait_event(|e| matches!(e, Event::Exit { .. }));
    let status = restored.wait_exit(Duration::from_secs(60)).unwrap();
    assert!(status.success(), "{status:?}\n{}", restored.output_tail());
    assert!(
        restored
            .find_line(&["vmmprobe: fs-umount dev=vdb result=0"])
            .is_some(),
        "{}",
        restored.output_tail()
    );
    // Consistent (e2fsck finds nothing to fix: exit 0) and holding the file the original wrote.
    run_tool(Command::new("e2fsck").arg("-fn").arg(&restored_fs));
    let file = run_tool(
        Command::new("debugfs")
            .args(["-R", "cat /data.bin"])
            .arg(&restored_fs),
    );
    assert!(
        file == ProbePattern::bytes(21, FILE_BYTES),
        "data.bin: {} bytes, not the {FILE_BYTES} written",
        file.len()
    );

    // Ten clones of the same snapshot at once, each in its own namespace behind its own tap, with
    // its own disk: all alive and answering.
    const CLONES: usize = 10;
    let mut clones = Vec::new();
    for i in 0..CLONES {
        let ns = NetNs::new(&format!("clone{i}")).expect("clone namespace");
        let tap = format!("vclone{i}");
        ns.add_tap(&tap, "10.79.0.1/24").expect("clone tap");
        let sock = dir.path().join(format!("clone{i}.sock"));
        let (guest, mut c) = empty_vmm(&ns, &sock);
        let disk = dir.path().join(format!("clone{i}.img"));
        let fs = dir.path().join(format!("clone{i}-fs.img"));
        let line = restore_line(&snap, &disk, &fs, &tap);
        assert!(
            matches!(c.ok(&line).expect("clone restore"), Response::Restored { .. }),
            "clone {i}"
        );
        clones.push((ns, guest, c));
    }
    for (i, (ns, guest, _)) in clones.iter().enumerate() {
        let message = format!("clone {i} answers").into_bytes();
        assert_eq!(echo(ns, message.clone()), message, "{}", guest.output_tail());
    }
    for (i, (_, mut guest, mut c)) in clones.into_iter().enumerate() {
        assert_eq!(
            c.ok(r#"{"id": 8, "request": "stop"}"#).unwrap(),
            Response::Stopping
        );
        let status = guest.wait_exit(Duration::from_secs(60)).unwrap();
        assert!(status.success(), "clone {i}: {status:?}\n{}", guest.output_tail());
    }
    assert_eq!(fingerprint(&snap), pristine, "the clones changed the snapshot");

    // The disk the restored guest ran on holds what the original wrote before the snapshot.
    let data = std::fs::read(&restored_disk).unwrap();
    assert_eq!(&data[..WRITTEN], ProbePattern::bytes(11, WRITTEN).as_slice());
    assert_eq!(std::fs::read(&disk).unwrap()[..WRITTEN], data[..WRITTEN]);
}

/// The guest memory a snapshot's memory file holds (holes read as zeros).
fn memory_of(dir: &Path) -> Vec<u8> {
    std::fs::read(dir.join("memory")).expect("memory file")
}

/// The first page at which two memory images differ.
fn first_difference(a: &[u8], b: &[u8]) -> Option<usize> {
    if a.len() != b.len() {
        return Some(a.len().min(b.len()));
    }
    a.chunks(4096)
        .zip(b.chunks(4096))
        .position(|(x, y)| x != y)
        .map(|p| p * 4096)
}

#[test]
fn a_chain_of_diffs_taken_under_block_io_equals_a_full_snapshot_and_restores() {
    require_kvm();
    let images = GuestImages::get().unwrap();
    let dir = TempDir::new("vmm-snapshot-diff").unwrap();
    let disk = dir.path().join("disk.img");
    std::fs::write(&disk, ProbePattern::bytes(5, 4 << 20)).unwrap();
    let sock = dir.path().join("api.sock");
    // Random reads for a while (devices write guest memory the whole time), then a counter.
    let actions = "blk-load:vda:randread:4096:8:30,counter";
    let mut original = harness::GuestBuilder::new(&images.vmlinux)
        .cmdline(&format!("{} vmmprobe.count=1000000", probe_cmdline(actions)))
        .vcpus(4)
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
    original
        .wait_for_line("vmmprobe: initrd none", BOOT_TIMEOUT)
        .unwrap_or_else(|e| panic!("{e}\n{}", original.output_tail()));
    std::thread::sleep(Duration::from_secs(1));

    let snapshot = |c: &mut ControlClient, name: &str, kind: &str| {
        let path = dir.path().join(name);
        let line = serde_json::json!({"id": 1, "request": {"snapshot-create": {"dir": path, "kind": kind}}});
        match c.ok(&line.to_string()).unwrap() {
            Response::SnapshotCreated(info) => info,
            other => panic!("{other:?}"),
        }
    };
    let pause = |c: &mut ControlClient| {
        assert!(matches!(
            c.ok(r#"{"id": 2, "request": "pause"}"#).unwrap(),
            Response::StateChange { .. }
        ))
    };
    let resume = |c: &mut ControlClient| {
        assert!(matches!(
            c.ok(r#"{"id": 3, "request": "resume"}"#).unwrap(),
            Response::StateChange { .. }
        ))
    };

    pause(&mut c);
    // No diff before there is a base.
    let early = serde_json::json!({"id": 1, "request": {"snapshot-create": {"dir": dir.path().join("early"), "kind": "diff"}}});
    assert_eq!(c.error(&early.to_string()).unwrap().0, ErrorKind::WrongState);
    let base = snapshot(&mut c, "s0", "full");
    resume(&mut c);
    std::thread::sleep(Duration::from_secs(1));
    pause(&mut c);
    let d1 = snapshot(&mut c, "d1", "diff");
    resume(&mut c);
    std::thread::sleep(Duration::from_secs(1));
    pause(&mut c);
    let d2 = snapshot(&mut c, "d2", "diff");
    // At the very same instant, a full one.
    let full = snapshot(&mut c, "f2", "full");
    assert_eq!(d1.parent.as_deref(), Some(base.dir.as_path()));
    assert_eq!(d2.parent.as_deref(), Some(d1.dir.as_path()));
    for d in [&d1, &d2] {
        assert!(
            d.memory_bytes < base.memory_bytes,
            "a diff as large as a full snapshot: {d:?} vs {base:?}"
        );
    }
    assert_eq!(
        c.ok(r#"{"id": 5, "request": "stop"}"#).unwrap(),
        Response::Stopping
    );
    let status = original.wait_exit(Duration::from_secs(60)).unwrap();
    assert!(status.success(), "{status:?}\n{}", original.output_tail());

    // Merging the chain gives exactly the memory of the full snapshot taken with the last diff.
    let merged = dir.path().join("merged");
    let line = serde_json::json!({"id": 6, "request": {"snapshot-merge": {"from": d2.dir, "to": merged}}});
    let (empty, mut e) = empty_vmm_from(
        std::process::Command::new(vmm_binary()),
        &dir.path().join("empty.sock"),
    );
    let Response::SnapshotMerged(m) = e.ok(&line.to_string()).unwrap() else {
        panic!("merge")
    };
    assert_eq!(m.memory_size, full.memory_size);
    let (a, b) = (memory_of(&merged), memory_of(&full.dir));
    assert_eq!(
        first_difference(&a, &b),
        None,
        "merged chain differs from the full snapshot"
    );
    drop(a);
    drop(b);
    drop(e);
    drop(empty);

    // The chain restores: the guest finishes its disk load without errors and counts on.
    let (mut restored, mut c2) = empty_vmm_from(
        std::process::Command::new(vmm_binary()),
        &dir.path().join("api2.sock"),
    );
    let restored_disk = dir.path().join("restored.img");
    let line = serde_json::json!({"id": 7, "request": {"snapshot-restore": {
        "dir": d2.dir, "resume": true, "prefault": true,
        "overrides": {"drives": [{"id": "data", "path": restored_disk}]}}}});
    assert!(matches!(
        c2.ok(&line.to_string()).unwrap(),
        Response::Restored { .. }
    ));
    restored
        .wait_for_line("vmmprobe: counter=2", BOOT_TIMEOUT)
        .unwrap_or_else(|e| panic!("{e}\n{}", restored.output_tail()));
    let stdout = restored.stdout_text();
    let load = harness::probe_fields(&stdout, "blk-load dev=vda");
    assert_eq!(load["result"], "0", "{stdout}");
    assert_eq!(
        c2.ok(r#"{"id": 8, "request": "stop"}"#).unwrap(),
        Response::Stopping
    );
    let status = restored.wait_exit(Duration::from_secs(60)).unwrap();
    assert!(status.success(), "{status:?}\n{}", restored.output_tail());
}
