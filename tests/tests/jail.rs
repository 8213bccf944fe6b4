//! The jailed start mode end to end (`vmm --jail DIR --uid N --gid N ...`, docs/jail.md): a real
//! guest boots while the VMM runs as a non-root uid in its own namespaces, cgroup and root directory;
//! the test looks at it from outside through /proc.

use std::ffi::OsString;
use std::io::{BufRead, BufReader, Write};
use std::os::fd::RawFd;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use harness::{
    crc32, inherit_fd, probe_cmdline, probe_fields, require_kvm, vmm_binary, workspace_root, Guest,
    GuestBuilder, GuestImages, NetNs, TempDir,
};

/// `GuestBuilder::arg`, several at a time.
trait Args {
    fn args<S: Into<OsString>>(self, args: impl IntoIterator<Item = S>) -> Self;
}

impl Args for GuestBuilder {
    fn args<S: Into<OsString>>(mut self, args: impl IntoIterator<Item = S>) -> Self {
        for arg in args {
            self = self.arg(arg);
        }
        self
    }
}

const BOOT_TIMEOUT: Duration = Duration::from_secs(600);
const EXIT_TIMEOUT: Duration = Duration::from_secs(60);
const UID: u32 = 123456;
const GID: u32 = 123457;
/// The copy-on-write drive of the first test: its base's size and the disk's.
const COW_BASE_BYTES: usize = 1 << 20;
const COW_BYTES: usize = 2 << 20;

/// The jailed VMM: the launcher's only child (PID 1 of its own PID namespace).
fn jailed_child(launcher: u32) -> u32 {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let children: Vec<u32> = std::fs::read_dir("/proc")
            .expect("read /proc")
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
            .filter(|pid| {
                let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
                // pid (comm) state ppid ...: comm may hold spaces, so split after the last ')'.
                let after = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
                after.split_whitespace().nth(1) == Some(&launcher.to_string())
            })
            .collect();
        match children.as_slice() {
            [child] => return *child,
            [] if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(50)),
            other => panic!("launcher {launcher} has children {other:?}, want exactly one"),
        }
    }
}

/// `Key:\tvalue` from /proc/PID/status.
fn status_field(pid: u32, key: &str) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read status");
    status
        .lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .unwrap_or_else(|| panic!("no {key} in /proc/{pid}/status"))
        .trim()
        .to_string()
}

fn namespace(pid: &str, kind: &str) -> PathBuf {
    std::fs::read_link(format!("/proc/{pid}/ns/{kind}")).expect("read namespace link")
}

/// The VM's cgroup directories that hold `file` (v2: one; v1: the controller's).
fn cgroup_file(id: &str, controller: &str, file: &str) -> PathBuf {
    let v2 = Path::new("/sys/fs/cgroup/cgroup.controllers");
    let v2_usable = std::fs::read_to_string(v2)
        .map(|c| c.split_whitespace().any(|x| x == "memory"))
        .unwrap_or(false);
    if v2_usable {
        Path::new("/sys/fs/cgroup/vmm").join(id).join(file)
    } else {
        Path::new("/sys/fs/cgroup")
            .join(controller)
            .join("vmm")
            .join(id)
            .join(file)
    }
}

fn read_trimmed(path: &Path) -> String {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
        .trim()
        .to_string()
}

fn sigterm(pid: u32) {
    let status = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .expect("run kill");
    assert!(status.success());
}

/// Sends one request line on a new connection and returns the answer line (events skipped).
fn request(socket: &Path, request: &str) -> String {
    let stream = UnixStream::connect(socket).expect("connect to the jailed control socket");
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    let mut writer = stream.try_clone().expect("clone");
    let line = format!("{{\"id\": 1, \"request\": {request}}}\n");
    writer.write_all(line.as_bytes()).expect("send");
    let mut reader = BufReader::new(stream);
    loop {
        let mut line = String::new();
        assert!(reader.read_line(&mut line).expect("read") > 0, "socket closed");
        if line.contains("\"id\":1") {
            return line;
        }
    }
}

fn probe_value<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
}

#[test]
fn jailed_guest_runs_confined_and_the_launcher_cleans_up() {
    require_kvm();
    let images = GuestImages::get().unwrap();
    let tmp = TempDir::new("jail").unwrap();
    let data = tmp.path().join("data.img");
    std::fs::write(&data, vec![0u8; 8 << 20]).unwrap();
    // A copy-on-write drive: a 1 MiB base of non-zero bytes under an empty, sparse 2 MiB image
    // (on the test's temp directory, which must be a file system that reports holes). The jail
    // binds the base in read-only and must leave it exactly as it was: contents, owner, mode,
    // and ctime (which any chown or chmod, even one undone later, would move).
    let base = tmp.path().join("base.img");
    let base_bytes: Vec<u8> = (0..COW_BASE_BYTES).map(|i| (i % 251) as u8 | 1).collect();
    std::fs::write(&base, &base_bytes).unwrap();
    // Readable by the jail uid whatever the umask: it reads the base, and owns nothing of it.
    std::fs::set_permissions(&base, std::fs::Permissions::from_mode(0o644)).unwrap();
    let cow = tmp.path().join("cow.img");
    std::fs::File::create(&cow)
        .and_then(|f| f.set_len(COW_BYTES as u64))
        .unwrap();
    let base_meta = |m: std::fs::Metadata| (m.uid(), m.gid(), m.mode(), m.ctime(), m.ctime_nsec());
    let base_before = base_meta(std::fs::metadata(&base).unwrap());
    let dir = tmp.path().join("vm");
    let id = format!("jailtest-{}", std::process::id());
    let socket = dir.join("run/api.sock");
    // vda: root, vdb: data, vdc: the copy-on-write drive, read whole (base, then zeros past it).
    let actions = "blk-info,blk-write:vda:0:4k:3,blk-write:vdb:0:64k:7,blk-read:vdc:0:2m,idle";
    let mut guest = GuestBuilder::new(&images.vmlinux)
        .initrd(&images.initramfs)
        .memory_mib(128)
        .cmdline(&probe_cmdline(actions))
        .arg("--drive")
        .arg(format!("path={},id=root,ro=on,root=on", images.rootfs.display()))
        .arg("--drive")
        .arg(format!("path={},id=data", data.display()))
        .arg("--drive")
        .arg(format!(
            "path={},backing={},id=cow",
            cow.display(),
            base.display()
        ))
        .args(["--jail".into(), dir.clone().into_os_string()])
        .args([
            "--jail-id",
            &id,
            "--uid",
            &UID.to_string(),
            "--gid",
            &GID.to_string(),
        ])
        .args([
            "--memory-limit-mib",
            "256",
            "--cpu-limit",
            "0.5",
            "--pids-limit",
            "64",
        ])
        .args(["--api-sock".into(), socket.clone().into_os_string()])
        .spawn()
        .unwrap();
    if let Err(e) = guest.wait_for_line("vmmprobe: idle", BOOT_TIMEOUT) {
        panic!("jailed guest did not boot: {e:#}");
    }
    let stdout = guest.stdout_text();
    assert!(stdout.contains("BOOT-COMPLETE"), "{stdout}");
    let launcher = guest.pid();
    let vmm = jailed_child(launcher);

    // Credentials: the jail ids, no capabilities at all, no_new_privs.
    assert_eq!(status_field(vmm, "Uid"), format!("{UID}\t{UID}\t{UID}\t{UID}"));
    assert_eq!(status_field(vmm, "Gid"), format!("{GID}\t{GID}\t{GID}\t{GID}"));
    assert_eq!(status_field(vmm, "Groups"), "");
    for caps in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
        assert_eq!(status_field(vmm, caps), "0000000000000000", "{caps}");
    }
    assert_eq!(status_field(vmm, "NoNewPrivs"), "1");
    // PID 1 of its own PID namespace.
    assert_eq!(status_field(vmm, "NSpid"), format!("{vmm}\t1"));

    // Namespaces: all new, unlike the launcher's, which are the test's own.
    for kind in ["mnt", "pid", "ipc", "uts", "net"] {
        let own = namespace("self", kind);
        assert_ne!(namespace(&vmm.to_string(), kind), own, "{kind} namespace");
        if kind != "pid" {
            assert_eq!(namespace(&launcher.to_string(), kind), own, "launcher {kind}");
        }
    }

    // The cgroup and its limits.
    let cgroups = std::fs::read_to_string(format!("/proc/{vmm}/cgroup")).unwrap();
    let group = format!("/vmm/{id}");
    for controller in ["memory", "pids"] {
        assert!(
            cgroups
                .lines()
                .any(|l| l.ends_with(&group) && (l.starts_with("0::") || l.contains(controller))),
            "{controller} group {group} in:\n{cgroups}"
        );
    }
    let v2 = cgroup_file(&id, "cpu", "cpu.max");
    let cgroup_dirs: Vec<PathBuf> = if v2.starts_with("/sys/fs/cgroup/vmm") {
        assert_eq!(read_trimmed(&v2), "50000 100000");
        assert_eq!(
            read_trimmed(&cgroup_file(&id, "", "memory.max")),
            (256u64 << 20).to_string()
        );
        vec![v2.parent().unwrap().to_path_buf()]
    } else {
        assert_eq!(
            read_trimmed(&cgroup_file(&id, "cpu", "cpu.cfs_quota_us")),
            "50000"
        );
        assert_eq!(
            read_trimmed(&cgroup_file(&id, "cpu", "cpu.cfs_period_us")),
            "100000"
        );
        let limit = cgroup_file(&id, "memory", "memory.limit_in_bytes");
        assert_eq!(read_trimmed(&limit), (256u64 << 20).to_string());
        ["cpu", "memory", "pids"]
            .iter()
            .map(|c| cgroup_file(&id, c, "x").parent().unwrap().to_path_buf())
            .collect()
    };
    assert_eq!(read_trimmed(&cgroup_file(&id, "pids", "pids.max")), "64");
    let procs = read_trimmed(&cgroup_file(&id, "memory", "cgroup.procs"));
    assert_eq!(
        procs,
        vmm.to_string(),
        "only the VMM is in the group, not the launcher"
    );

    // The jail's file system: its kernel, disks, devices and socket, nothing of the host.
    let root = PathBuf::from(format!("/proc/{vmm}/root"));
    for inside in [
        "boot/kernel",
        "boot/initrd",
        "drives/root",
        "drives/data",
        "drives/cow",
        "drives/cow.base",
        "dev/kvm",
        "dev/net/tun",
    ] {
        assert!(root.join(inside).exists(), "{inside} missing in the jail");
    }
    assert_eq!(
        std::fs::metadata(root.join("drives/data")).unwrap().len(),
        8 << 20
    );
    assert_eq!(
        std::fs::metadata(root.join("drives/cow.base")).unwrap().len(),
        COW_BASE_BYTES as u64
    );
    // The base is mounted read-only in the jail, the writable images read-write.
    let mounts = std::fs::read_to_string(format!("/proc/{vmm}/mountinfo")).unwrap();
    let mount_options = |point: &str| -> String {
        mounts
            .lines()
            .map(|l| l.split(' ').collect::<Vec<_>>())
            .find(|f| f.get(4) == Some(&point))
            .and_then(|f| f.get(5).map(|o| o.to_string()))
            .unwrap_or_else(|| panic!("no mount on {point} in:\n{mounts}"))
    };
    for (point, mode) in [
        ("/drives/cow.base", "ro"),
        ("/drives/cow", "rw"),
        ("/drives/data", "rw"),
        ("/drives/root", "ro"),
    ] {
        let options = mount_options(point);
        assert!(options.split(',').any(|o| o == mode), "{point}: {options}");
    }
    assert_eq!(
        std::fs::metadata(root.join("boot/kernel")).unwrap().len(),
        std::fs::metadata(&images.vmlinux).unwrap().len()
    );
    let kvm = std::fs::metadata(root.join("dev/kvm")).unwrap();
    assert_eq!((kvm.uid(), kvm.gid(), kvm.mode() & 0o777), (UID, GID, 0o600));
    let host_paths = [
        PathBuf::from("etc/passwd"),
        PathBuf::from("usr"),
        PathBuf::from("root"),
        PathBuf::from("bin"),
        PathBuf::from("sys"),
        workspace_root().strip_prefix("/").unwrap().to_path_buf(),
        tmp.path().strip_prefix("/").unwrap().to_path_buf(),
        images.vmlinux.strip_prefix("/").unwrap().to_path_buf(),
    ];
    for host in &host_paths {
        assert!(
            !root.join(host).exists(),
            "host path /{} is visible in the jail",
            host.display()
        );
    }
    let proc_entries: Vec<String> = std::fs::read_dir(root.join("proc"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(proc_entries.contains(&"1".to_string()), "{proc_entries:?}");
    assert!(!proc_entries.contains(&"sys".to_string()), "{proc_entries:?}");
    assert!(!proc_entries.contains(&launcher.to_string()), "{proc_entries:?}");

    // The writable images belong to the jail uid while the VM runs, the base does not change
    // hands; the host reaches the socket.
    assert_eq!(std::fs::metadata(&data).unwrap().uid(), UID);
    assert_eq!(std::fs::metadata(&cow).unwrap().uid(), UID);
    assert_eq!(base_meta(std::fs::metadata(&base).unwrap()), base_before);
    assert!(request(&socket, "\"ping\"").contains("pong"));
    // The VMM's metrics read /proc/self/statm from the jail's own procfs: its own figure, not
    // the launcher's (a file opened before the fork would name the launcher). The guest has
    // booted, so the vmm holds megabytes of guest memory; the launcher never touches any.
    let metrics = request(&socket, "\"metrics\"");
    let value: serde_json::Value = serde_json::from_str(&metrics).expect("metrics JSON");
    let rss = value["ok"]["metrics"]["vmm_rss_kib"].as_u64().unwrap_or(0);
    let status_rss = |pid: u32| -> u64 {
        std::fs::read_to_string(format!("/proc/{pid}/status"))
            .unwrap_or_default()
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    };
    let (vmm_rss, launcher_rss) = (status_rss(vmm), status_rss(launcher));
    assert!(
        rss > launcher_rss * 2 && rss >= vmm_rss / 2,
        "vmm_rss_kib {rss}: the vmm has {vmm_rss} KiB, the launcher {launcher_rss} KiB ({metrics})"
    );

    // The guest wrote its data drive and could not write its read-only root drive.
    let stdout = guest.stdout_text();
    let line = |dev: &str| {
        stdout
            .lines()
            .find(|l| l.contains("vmmprobe: blk-write") && l.contains(&format!("dev={dev}")))
            .unwrap_or_else(|| panic!("no blk-write line for {dev}:\n{stdout}"))
            .to_string()
    };
    let written = line("vdb");
    assert_eq!(probe_value(&written, "result"), Some("0"), "{written}");
    assert_ne!(
        probe_value(&line("vda"), "result"),
        Some("0"),
        "the read-only root drive was written"
    );
    // The guest read its copy-on-write drive through the base bound into the jail.
    let read = probe_fields(&stdout, "blk-read dev=vdc");
    let mut expected = base_bytes.clone();
    expected.resize(COW_BYTES, 0);
    assert_eq!(
        (read["result"].as_str(), read["len"].as_str()),
        ("0", COW_BYTES.to_string().as_str()),
        "{stdout}"
    );
    assert_eq!(read["crc32"], format!("{:08x}", crc32(&expected)), "{stdout}");

    // SIGTERM to the launcher reaches the VMM (PID 1, which would ignore it without a handler).
    sigterm(launcher);
    let status = guest.wait_exit(EXIT_TIMEOUT).unwrap();
    assert_eq!(status.code(), Some(128 + 15), "{}", guest.output_tail());
    for dir in &cgroup_dirs {
        assert!(!dir.exists(), "cgroup {} left behind", dir.display());
    }
    assert!(
        !dir.exists(),
        "the jail directory (created by the launcher) is left behind"
    );
    assert_eq!(
        std::fs::metadata(&data).unwrap().uid(),
        0,
        "the data image is given back to root"
    );
    assert_eq!(
        std::fs::metadata(&cow).unwrap().uid(),
        0,
        "the copy-on-write image is given back to root"
    );
    assert!(
        std::fs::read(&base).unwrap() == base_bytes,
        "the base image changed"
    );
    assert_eq!(
        base_meta(std::fs::metadata(&base).unwrap()),
        base_before,
        "the base image's owner, mode or ctime changed"
    );
    let image = std::fs::read(&data).unwrap();
    let crc = format!("{:08x}", crc32(&image[..64 << 10]));
    assert_eq!(probe_value(&written, "crc32"), Some(crc.as_str()), "{written}");
}

/// The descriptor numbers of `pid` that refer to `target` (a `/proc/PID/fd` link text).
fn fds_to(pid: u32, target: &str) -> Vec<RawFd> {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("read the fd directory")
        .filter_map(|e| {
            let e = e.ok()?;
            if std::fs::read_link(e.path()).ok()? != Path::new(target) {
                return None;
            }
            e.file_name().to_str()?.parse().ok()
        })
        .collect()
}

/// The `flags:` of `/proc/PID/fdinfo/FD` (octal, as the kernel prints them).
fn fd_status_flags(pid: u32, fd: RawFd) -> u32 {
    let info = std::fs::read_to_string(format!("/proc/{pid}/fdinfo/{fd}")).expect("read fdinfo");
    let flags = info
        .lines()
        .find_map(|l| l.strip_prefix("flags:"))
        .expect("flags in fdinfo");
    u32::from_str_radix(flags.trim(), 8).expect("octal flags")
}

/// The agent's set-up (docs/jail.md, "How the agent uses it"): the jailed VMM runs in a given
/// network namespace, with a tap the test made there passed down with `--fd` and named by the NIC
/// in `--config`: it could neither create nor open a tap itself.
#[test]
fn jailed_guest_in_a_given_netns_with_an_inherited_tap_logs_inside_the_jail_and_powers_off() {
    require_kvm();
    let images = GuestImages::get().unwrap();
    let tmp = TempDir::new("jail-netns").unwrap();
    let dir = tmp.path().join("vm2");
    std::fs::create_dir(&dir).unwrap();
    let ns = NetNs::new("jail").unwrap();
    let netns_path = PathBuf::from("/run/netns").join(ns.name());
    // Made as the agent makes it: non-persistent, so it lives as long as a descriptor of it does.
    let tap = ns
        .spawn(|| Ok(hostnet::tap::create_tap("vtapj0")?))
        .unwrap()
        .join()
        .unwrap()
        .unwrap();
    ns.ip(&["addr", "add", "10.79.0.1/24", "dev", "vtapj0"]).unwrap();
    ns.ip(&["link", "set", "vtapj0", "up"]).unwrap();
    let log = dir.join("log/console.log");
    // 20 s of counting after the NIC is up: time for the pings before the guest powers off.
    let cmdline = format!(
        "{} vmmprobe.count=200 ip=10.79.0.2::10.79.0.1:255.255.255.0::eth0:off",
        probe_cmdline("net-info,counter,poweroff")
    );
    let config = serde_json::json!({
        "boot": {"kernel": images.vmlinux, "cmdline": cmdline},
        "serial": {"file": log},
        "nets": [{"id": "eth0", "fd": "tap0", "mac": "02:00:00:00:79:02"}],
    });
    let config_path = tmp.path().join("vm.json");
    std::fs::write(&config_path, config.to_string()).unwrap();
    let mut cmd = Command::new(vmm_binary());
    cmd.arg("--config").arg(&config_path);
    let passed = inherit_fd(&mut cmd, &tap);
    cmd.arg("--fd").arg(format!("tap0={passed}"));
    cmd.arg("--jail").arg(&dir).arg("--netns").arg(&netns_path);
    cmd.args(["--uid", &UID.to_string(), "--gid", &GID.to_string()]);
    let mut guest = Guest::spawn_booting(cmd, 1, None).unwrap();
    // From now on only the VMM holds the tap.
    drop(tap);
    // The console goes to the file: poll it for the boot and the NIC, then look at the VMM while
    // the guest counts (20 s) before it powers off.
    let deadline = Instant::now() + BOOT_TIMEOUT;
    let console = || std::fs::read_to_string(&log).unwrap_or_default();
    while !console().contains("vmmprobe: net-info dev=eth0") {
        assert!(Instant::now() < deadline, "no net-info line in {}", log.display());
        assert!(
            guest.try_exit_status().unwrap().is_none(),
            "{}\n{}",
            guest.output_tail(),
            console()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(console().contains("BOOT-COMPLETE"), "{}", console());
    let launcher = guest.pid();
    let vmm = jailed_child(launcher);
    let ns_inode = std::fs::metadata(&netns_path).unwrap().ino();
    assert_eq!(
        namespace(&vmm.to_string(), "net"),
        PathBuf::from(format!("net:[{ns_inode}]")),
        "the VMM is in the given network namespace"
    );
    assert_eq!(status_field(vmm, "Uid"), format!("{UID}\t{UID}\t{UID}\t{UID}"));

    // The inherited tap is in the jailed VMM, under the number passed, close-on-exec; the launcher
    // closed its copy when it forked.
    assert_eq!(fds_to(vmm, "/dev/net/tun"), [passed]);
    assert_ne!(fd_status_flags(vmm, passed) & libc::O_CLOEXEC as u32, 0);
    assert_eq!(fds_to(launcher, "/dev/net/tun"), Vec::<RawFd>::new());
    // The guest's NIC works over it: it saw the link, and answers from the namespace's side.
    let eth0 = probe_fields(&console(), "net-info dev=eth0");
    assert_eq!(eth0["mac"], "02:00:00:00:79:02");
    assert_eq!(eth0["ip"], "10.79.0.2");
    assert_eq!(eth0["carrier"], "1");
    ns.ping("10.79.0.2", 10, 1).expect("ping over the inherited tap");

    let status = guest.wait_exit(EXIT_TIMEOUT).unwrap();
    assert_eq!(status.code(), Some(0), "{}", guest.output_tail());
    let console = console();
    assert!(console.contains("vmmprobe: counter=200"), "{console}");
    let meta = std::fs::metadata(&log).unwrap();
    assert_eq!((meta.uid(), meta.gid()), (UID, GID));
    // The given directory stays, holding only the log; everything else the launcher made is gone.
    assert_eq!(
        walk(&dir),
        std::slice::from_ref(&log),
        "left in the jail directory"
    );
    // The tap went with the last descriptor of it, the VMM's: nobody else held one.
    assert_eq!(ns.links().unwrap(), ["lo"]);
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).expect("read dir") {
        let path = entry.expect("dir entry").path();
        if path.is_dir() {
            out.extend(walk(&path));
        } else {
            out.push(path);
        }
    }
    out
}

fn vmm(args: &[&str]) -> Output {
    Command::new(vmm_binary()).args(args).output().expect("run vmm")
}

fn assert_refused(out: &Output, expected: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.starts_with("vmm: error: ") && stderr.lines().count() == 1,
        "{stderr}"
    );
    assert!(stderr.contains(expected), "want '{expected}' in: {stderr}");
}

#[test]
fn jail_refuses_bad_input_clearly() {
    let images = GuestImages::get().unwrap();
    let tmp = TempDir::new("jail-bad").unwrap();
    let kernel = images.vmlinux.to_str().unwrap();
    let dir = tmp.path().join("vm");
    let dir = dir.to_str().unwrap();
    let jail = |extra: &[&str]| {
        let mut args = vec![
            "--kernel", kernel, "--jail", dir, "--uid", "1234", "--gid", "1234",
        ];
        args.extend_from_slice(extra);
        vmm(&args)
    };
    assert_refused(
        &vmm(&["--kernel", kernel, "--jail", dir, "--uid", "0", "--gid", "5"]),
        "invalid value '0' for --uid: must not be 0",
    );
    assert_refused(
        &vmm(&["--kernel", kernel, "--jail", dir, "--uid", "5", "--gid", "0"]),
        "invalid value '0' for --gid: must not be 0",
    );
    assert_refused(
        &vmm(&[
            "--kernel", kernel, "--jail", "jails/vm", "--uid", "5", "--gid", "5",
        ]),
        "jail directory jails/vm: must be absolute",
    );
    assert_refused(
        &vmm(&[
            "--kernel",
            "/nonexistent/vmlinux",
            "--jail",
            dir,
            "--uid",
            "5",
            "--gid",
            "5",
        ]),
        "jail: kernel /nonexistent/vmlinux cannot be used: No such file or directory",
    );
    assert_refused(
        &jail(&["--memory-mib", "256", "--memory-limit-mib", "200"]),
        "--memory-limit-mib 200 is too small for 256 MiB of guest memory: give at least 288",
    );
    assert_refused(
        &jail(&["--api-sock", "/tmp/elsewhere.sock"]),
        "must be an absolute path in a directory under",
    );
    assert_refused(&jail(&["--cpu-limit", "0"]), "invalid value '0' for --cpu-limit");
    assert_refused(
        &jail(&["--netns", "/run/netns/vmm-no-such-netns"]),
        "cannot open network namespace",
    );
    // The empty start mode: only mirrors in the jail, each checked before anything is made.
    let sock = format!("{dir}/run/api.sock");
    let empty = |mirror: &str| {
        vmm(&[
            "--api-sock",
            &sock,
            "--jail",
            dir,
            "--uid",
            "1234",
            "--gid",
            "1234",
            "--jail-mirror",
            mirror,
        ])
    };
    assert_refused(&empty("/dev/shm"), "--jail-mirror /dev/shm: lies under /dev");
    assert_refused(
        &empty("/run/agent"),
        "--jail-mirror /run/agent: shares its top directory with",
    );
    assert_refused(
        &empty("/nonexistent/snapshot"),
        "jail: --jail-mirror /nonexistent/snapshot cannot be used: No such file",
    );
    let private = tmp.path().join("private");
    std::fs::create_dir(&private).unwrap();
    std::fs::set_permissions(&private, std::fs::Permissions::from_mode(0o700)).unwrap();
    assert_refused(
        &empty(private.to_str().unwrap()),
        "is not readable by the jail's uid 1234 / gid 1234 (mode 700",
    );
    assert_refused(
        &vmm(&["--kernel", kernel, "--jail-mirror", "/srv/x"]),
        "--jail-mirror (it needs --jail DIR)",
    );
    // None of these left anything behind.
    assert!(!Path::new(dir).exists());
    // A directory that is not empty is refused and left as it was.
    std::fs::create_dir(dir).unwrap();
    std::fs::write(Path::new(dir).join("stale"), b"x").unwrap();
    assert_refused(&jail(&[]), "is not empty");
    assert!(Path::new(dir).join("stale").exists());
}
