//! Snapshot and restore: how long `snapshot-create` takes and what it writes (full and diff), how
//! fast a new `vmm` process has the guest running again and answering on its NIC, what cloning
//! one snapshot many times costs per clone, and QEMU's own save/restore (`migrate` to a file,
//! `-incoming`) of the same guest side by side.
//!
//! `cargo run --release -p benches --bin snapshot` (root: it creates a network namespace and taps).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use benches::{cell, host_json, qemu_microvm, ratio, unix_time, write_json, Args, Qmp, Summary};
use harness::{try_vmm_binary, ControlClient, Guest, GuestImages, NetNs, TempDir};
use serde_json::{json, Value};
use vmm_api::control::Response;
use vmm_api::snapshot::SnapshotInfo;

const USAGE: &str = "\
usage: snapshot [--sizes MIBxVCPUS,...] [--runs N] [--clones N,...] [--out PATH]
                [--qemu PATH | --no-qemu]

For each guest size (default 128x1,2048x2): boots the guest probe (TCP echo, then idle) in a test
network namespace, takes a full and a diff snapshot, then N times (default 5) restores it into a
new vmm process and times request -> vCPUs running and request -> the guest answering a new TCP
connection. For the first size it also restores each --clones count (default 10,50) of clones at
once and reports the total time and the PSS per clone. QEMU microvm saves the same guest with
`migrate exec:` to a file and restores it with -incoming, timed from process start to running.
JSON goes to --out (default target/bench/snapshot.json).";

const BOOT_TIMEOUT: Duration = Duration::from_secs(900);
const SOCKET_TIMEOUT: Duration = Duration::from_secs(60);
const GUEST_IP: &str = "10.81.0.2";
const HOST_CIDR: &str = "10.81.0.1/24";
const PORT: u16 = 7300;
const TAP: &str = "vbsnap0";

struct Options {
    sizes: Vec<(u32, u32)>,
    runs: usize,
    clones: Vec<usize>,
    qemu: Option<String>,
    out: PathBuf,
}

impl Options {
    fn parse<S: Into<String>>(args: impl IntoIterator<Item = S>) -> Result<Options> {
        let mut opts = Options {
            sizes: vec![(128, 1), (2048, 2)],
            runs: 5,
            clones: vec![10, 50],
            qemu: Some("qemu-system-x86_64".into()),
            out: harness::workspace_root().join("target/bench/snapshot.json"),
        };
        let mut args = Args::new(args, USAGE);
        while let Some(flag) = args.next_flag() {
            match flag.as_str() {
                "--sizes" => opts.sizes = args.sizes(&flag)?,
                "--runs" => opts.runs = args.parse(&flag)?,
                "--clones" => {
                    opts.clones = args
                        .value(&flag)?
                        .split(',')
                        .filter(|s| !s.is_empty())
                        .map(|s| s.parse().map_err(|e| anyhow!("--clones: {s}: {e}")))
                        .collect::<Result<_>>()?
                }
                "--qemu" => opts.qemu = Some(args.value(&flag)?),
                "--no-qemu" => opts.qemu = None,
                "--out" => opts.out = args.path(&flag)?,
                _ => return Err(args.unexpected(&flag)),
            }
        }
        if opts.runs == 0 || opts.sizes.is_empty() {
            bail!("--runs and --sizes need at least one");
        }
        Ok(opts)
    }
}

fn cmdline(actions: &str) -> String {
    format!(
        "{} ip={GUEST_IP}::10.81.0.1:255.255.255.0::eth0:off",
        benches::bench_cmdline(actions)
    )
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// An empty vmm in `ns`, connected.
fn empty_vmm(ns: &NetNs, sock: &Path) -> Result<(Guest, ControlClient)> {
    let mut cmd = ns.command(&try_vmm_binary()?);
    cmd.arg("--api-sock").arg(sock);
    let guest = Guest::spawn_command(cmd, None)?;
    // Polled every millisecond (not the harness's 20): the time to the socket is part of what is
    // measured. The path appears only once the socket accepts.
    let deadline = Instant::now() + SOCKET_TIMEOUT;
    while !sock.exists() {
        if Instant::now() > deadline {
            bail!(
                "no control socket at {}:\n{}",
                sock.display(),
                guest.output_tail()
            );
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    Ok((guest, ControlClient::connect(sock)?))
}

fn restore_request(dir: &Path, disk: &Path, tap: &str) -> String {
    json!({"id": 1, "request": {"snapshot-restore": {
        "dir": dir, "resume": true,
        "overrides": {"drives": [{"id": "data", "path": disk}], "nets": [{"id": "eth0", "tap": tap}], "serial": "off"}
    }}})
    .to_string()
}

fn echo_once(ns: &NetNs) -> Result<()> {
    ns.spawn(|| -> Result<()> {
        let addr: SocketAddr = format!("{GUEST_IP}:{PORT}").parse()?;
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(30))?;
        s.set_read_timeout(Some(Duration::from_secs(30)))?;
        s.write_all(b"ping")?;
        let mut back = [0u8; 4];
        s.read_exact(&mut back)?;
        anyhow::ensure!(&back == b"ping", "echo differs");
        Ok(())
    })?
    .join()
    .map_err(|_| anyhow!("echo thread panicked"))?
}

fn pss_kib(pid: u32) -> Option<f64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?;
    let line = text.lines().find(|l| l.starts_with("Pss:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

fn snapshot(c: &mut ControlClient, dir: &Path, kind: &str) -> Result<(SnapshotInfo, f64)> {
    let line = json!({"id": 2, "request": {"snapshot-create": {"dir": dir, "kind": kind}}}).to_string();
    let start = Instant::now();
    match c.ok(&line)? {
        Response::SnapshotCreated(info) => Ok((info, ms(start.elapsed()))),
        other => bail!("snapshot-create: {other:?}"),
    }
}

#[derive(Default)]
struct VmmResult {
    full: Option<(SnapshotInfo, f64)>,
    diff: Option<(SnapshotInfo, f64)>,
    spawn_to_running_ms: Vec<f64>,
    request_to_running_ms: Vec<f64>,
    request_to_echo_ms: Vec<f64>,
    clones: Vec<(usize, f64, Option<f64>)>,
}

fn measure_vmm(opts: &Options, kernel: &Path, mib: u32, vcpus: u32, with_clones: bool) -> Result<VmmResult> {
    let dir = TempDir::new("bench-snapshot")?;
    let ns = NetNs::new("bsnap")?;
    ns.add_tap(TAP, HOST_CIDR)?;
    let disk = dir.path().join("disk.img");
    std::fs::write(&disk, vec![0u8; 1 << 20])?;
    let sock = dir.path().join("api.sock");
    let mut cmd = ns.command(&try_vmm_binary()?);
    cmd.arg("--kernel")
        .arg(kernel)
        .args(["--cmdline", &cmdline(&format!("net-echo:{PORT},idle"))])
        .args(["--memory-mib", &mib.to_string(), "--vcpus", &vcpus.to_string()])
        .args(["--track-dirty-pages", "on", "--serial", "stdout"])
        .args(["--net", &format!("tap={TAP},mac=02:00:00:00:81:02,id=eth0")])
        .arg("--drive")
        .arg(format!("path={},id=data", disk.display()))
        .arg("--api-sock")
        .arg(&sock);
    let mut original = Guest::spawn_command(cmd, None)?;
    original.wait_for_line("vmmprobe: idle", BOOT_TIMEOUT)?;
    let mut c = ControlClient::connect(&sock)?;
    let mut out = VmmResult::default();
    c.ok(r#"{"id": 3, "request": "pause"}"#)?;
    let snap = dir.path().join("full");
    out.full = Some(snapshot(&mut c, &snap, "full")?);
    c.ok(r#"{"id": 4, "request": "resume"}"#)?;
    std::thread::sleep(Duration::from_secs(1));
    c.ok(r#"{"id": 5, "request": "pause"}"#)?;
    out.diff = Some(snapshot(&mut c, &dir.path().join("diff"), "diff")?);
    c.ok(r#"{"id": 6, "request": "stop"}"#)?;
    original.wait_exit(Duration::from_secs(60))?;

    for run in 0..opts.runs {
        let sock = dir.path().join(format!("r{run}.sock"));
        let target = dir.path().join(format!("r{run}.img"));
        let spawned = Instant::now();
        let (mut guest, mut c) = empty_vmm(&ns, &sock)?;
        let asked = Instant::now();
        match c.ok(&restore_request(&snap, &target, TAP))? {
            Response::Restored { .. } => {}
            other => bail!("restore: {other:?}"),
        }
        let running = Instant::now();
        echo_once(&ns).with_context(|| guest.output_tail())?;
        let answered = Instant::now();
        out.spawn_to_running_ms.push(ms(running - spawned));
        out.request_to_running_ms.push(ms(running - asked));
        out.request_to_echo_ms.push(ms(answered - asked));
        c.ok(r#"{"id": 7, "request": "stop"}"#)?;
        guest.wait_exit(Duration::from_secs(60))?;
        std::fs::remove_file(&target)?;
    }

    if with_clones {
        for &count in &opts.clones {
            let cns = NetNs::new("bclone")?;
            let start = Instant::now();
            let mut clones = Vec::new();
            for i in 0..count {
                let tap = format!("vbcl{i}");
                cns.ip(&["tuntap", "add", "dev", &tap, "mode", "tap"])?;
                cns.ip(&["link", "set", &tap, "up"])?;
                let sock = dir.path().join(format!("c{i}.sock"));
                let (guest, mut c) = empty_vmm(&cns, &sock)?;
                match c.ok(&restore_request(
                    &snap,
                    &dir.path().join(format!("c{i}.img")),
                    &tap,
                ))? {
                    Response::Restored { .. } => {}
                    other => bail!("clone {i}: {other:?}"),
                }
                clones.push((guest, c));
            }
            let total = ms(start.elapsed());
            // Let the clones settle (they run their idle loop), then read what each costs.
            std::thread::sleep(Duration::from_secs(2));
            let pss: Vec<f64> = clones.iter().filter_map(|(g, _)| pss_kib(g.pid())).collect();
            out.clones
                .push((count, total, Summary::of(&pss).map(|s| s.median)));
            for (mut guest, mut c) in clones {
                let _ = c.ok(r#"{"id": 8, "request": "stop"}"#);
                let _ = guest.wait_exit(Duration::from_secs(60));
            }
            for i in 0..count {
                let _ = std::fs::remove_file(dir.path().join(format!("c{i}.img")));
            }
        }
    }
    Ok(out)
}

#[derive(Default)]
struct QemuResult {
    save_ms: Option<f64>,
    file_bytes: Option<u64>,
    spawn_to_running_ms: Vec<f64>,
}

fn wait_status(qmp: &mut Qmp, wanted: &[&str], timeout: Duration) -> Result<String> {
    let deadline = Instant::now() + timeout;
    loop {
        let status = qmp.execute("query-status")?;
        let s = status["status"].as_str().unwrap_or_default().to_string();
        if wanted.contains(&s.as_str()) {
            return Ok(s);
        }
        if Instant::now() > deadline {
            bail!("QEMU status stayed {s}");
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn measure_qemu(opts: &Options, qemu: &str, kernel: &Path, mib: u32, vcpus: u32) -> Result<QemuResult> {
    let dir = TempDir::new("bench-snapshot-qemu")?;
    let qmp_path = dir.path().join("qmp.sock");
    let mut cmd: Command = qemu_microvm(qemu, "microvm", mib, vcpus);
    cmd.arg("-kernel")
        .arg(kernel)
        .args(["-append", &benches::bench_cmdline("idle")])
        .arg("-qmp")
        .arg(format!("unix:{},server=on,wait=off", qmp_path.display()));
    let mut guest = Guest::spawn_command(cmd, None)?;
    let mut out = QemuResult::default();
    let file = dir.path().join("state.bin");
    let result = (|| -> Result<()> {
        guest.wait_for_line("vmmprobe: idle", BOOT_TIMEOUT)?;
        let mut qmp = Qmp::connect(&qmp_path)?;
        qmp.execute("stop")?;
        let start = Instant::now();
        qmp.execute_with(
            "migrate",
            Some(json!({"uri": format!("exec:cat > {}", file.display())})),
        )?;
        loop {
            let status = qmp.execute("query-migrate")?;
            match status["status"].as_str() {
                Some("completed") => break,
                Some("failed") | Some("cancelled") => bail!("QEMU migrate: {status}"),
                _ => std::thread::sleep(Duration::from_millis(1)),
            }
        }
        out.save_ms = Some(ms(start.elapsed()));
        out.file_bytes = Some(std::fs::metadata(&file)?.len());
        Ok(())
    })();
    let _ = guest.kill();
    result?;
    for run in 0..opts.runs {
        let qmp_path = dir.path().join(format!("r{run}.sock"));
        let mut cmd: Command = qemu_microvm(qemu, "microvm", mib, vcpus);
        cmd.arg("-kernel")
            .arg(kernel)
            .args(["-append", &benches::bench_cmdline("idle")])
            .arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", qmp_path.display()))
            .args(["-incoming", &format!("exec:cat {}", file.display())]);
        let spawned = Instant::now();
        let mut guest = Guest::spawn_command(cmd, None)?;
        let result = (|| -> Result<f64> {
            let deadline = Instant::now() + SOCKET_TIMEOUT;
            while !qmp_path.exists() {
                if Instant::now() > deadline {
                    bail!("no QMP socket");
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            let mut qmp = Qmp::connect(&qmp_path)?;
            // The saved VM was stopped: once loaded, QEMU waits paused for `cont`.
            let s = wait_status(&mut qmp, &["paused", "running", "postmigrate"], BOOT_TIMEOUT)?;
            if s != "running" {
                let migrate = qmp.execute("query-migrate")?;
                if migrate["status"].as_str() != Some("completed") {
                    // Still loading: wait for the load to finish first.
                    loop {
                        let m = qmp.execute("query-migrate")?;
                        if m["status"].as_str() == Some("completed") {
                            break;
                        }
                        std::thread::sleep(Duration::from_millis(1));
                    }
                }
                qmp.execute("cont")?;
                wait_status(&mut qmp, &["running"], BOOT_TIMEOUT)?;
            }
            Ok(ms(spawned.elapsed()))
        })();
        let _ = guest.kill();
        out.spawn_to_running_ms.push(result?);
    }
    Ok(out)
}

fn median(v: &[f64]) -> Option<f64> {
    Summary::of(v).map(|s| s.median)
}

fn main() -> Result<()> {
    if benches::wants_help() {
        println!("{USAGE}");
        return Ok(());
    }
    let opts = Options::parse(std::env::args().skip(1))?;
    let kernel = GuestImages::get()?.vmlinux.clone();
    let mut table = String::from(
        "| guest | full snapshot ms | full MiB written | diff ms | diff MiB | vmm spawn->running ms | request->running ms | request->echo ms | QEMU save ms | QEMU file MiB | QEMU spawn->running ms | QEMU/vmm restore |\n|---|---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    let mut rows = Vec::new();
    let mut clone_rows = String::new();
    for (i, &(mib, vcpus)) in opts.sizes.iter().enumerate() {
        eprintln!("vmm: {mib} MiB, {vcpus} vCPU(s)");
        let v = measure_vmm(&opts, &kernel, mib, vcpus, i == 0)?;
        let q = match &opts.qemu {
            Some(qemu) => {
                eprintln!("qemu: {mib} MiB, {vcpus} vCPU(s)");
                measure_qemu(&opts, qemu, &kernel, mib, vcpus)?
            }
            None => QemuResult::default(),
        };
        let mib_of = |b: u64| b as f64 / f64::from(1 << 20);
        let full = v.full.as_ref();
        let diff = v.diff.as_ref();
        let vmm_restore = median(&v.spawn_to_running_ms);
        let qemu_restore = median(&q.spawn_to_running_ms);
        table.push_str(&format!(
            "| {mib} MiB / {vcpus} vCPU | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
            cell(full.map(|f| f.1), 1),
            cell(full.map(|f| mib_of(f.0.memory_bytes)), 1),
            cell(diff.map(|d| d.1), 1),
            cell(diff.map(|d| mib_of(d.0.memory_bytes)), 2),
            cell(vmm_restore, 1),
            cell(median(&v.request_to_running_ms), 1),
            cell(median(&v.request_to_echo_ms), 1),
            cell(q.save_ms, 1),
            cell(q.file_bytes.map(mib_of), 1),
            cell(qemu_restore, 1),
            cell(ratio(qemu_restore, vmm_restore), 1),
        ));
        for (count, total, pss) in &v.clones {
            clone_rows.push_str(&format!(
                "| {count} clones of {mib} MiB | {total:.0} | {:.1} | {} |\n",
                total / *count as f64,
                cell(pss.map(|p| p / 1024.0), 1)
            ));
        }
        rows.push(json!({
            "memory_mib": mib, "vcpus": vcpus,
            "vmm": {
                "full": full.map(|f| json!({"ms": f.1, "info": f.0})),
                "diff": diff.map(|d| json!({"ms": d.1, "info": d.0})),
                "spawn_to_running_ms": Summary::of(&v.spawn_to_running_ms).map(|s| s.to_json()),
                "request_to_running_ms": Summary::of(&v.request_to_running_ms).map(|s| s.to_json()),
                "request_to_echo_ms": Summary::of(&v.request_to_echo_ms).map(|s| s.to_json()),
                "clones": v.clones.iter().map(|(n, t, p)| json!({"count": n, "total_ms": t, "pss_kib_median": p})).collect::<Vec<Value>>(),
            },
            "qemu": {
                "save_ms": q.save_ms, "file_bytes": q.file_bytes,
                "spawn_to_running_ms": Summary::of(&q.spawn_to_running_ms).map(|s| s.to_json()),
            },
        }));
    }
    println!("{table}");
    if !clone_rows.is_empty() {
        println!("| clones | total ms | ms per clone | PSS per clone MiB (median) |\n|---|---|---|---|\n{clone_rows}");
    }
    let report = json!({"benchmark": "snapshot", "unix_time": unix_time(), "host": host_json(), "runs": opts.runs, "sizes": rows});
    write_json(&opts.out, &report)?;
    eprintln!("wrote {}", opts.out.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options() {
        let o = Options::parse(["--sizes", "256x2", "--runs", "2", "--clones", "3", "--no-qemu"]).unwrap();
        assert_eq!(
            (o.sizes, o.runs, o.clones, o.qemu),
            (vec![(256, 2)], 2, vec![3], None)
        );
        assert!(Options::parse(["--sizes", "256"]).is_err());
        assert!(Options::parse(["--runs", "0"]).is_err());
    }
}
