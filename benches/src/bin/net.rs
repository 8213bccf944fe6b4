//! Network throughput and latency: TCP bulk transfers between the guest probe and a host endpoint in
//! a test namespace (guest to host and host to guest, 1 and 4 streams) and ping round trips, for vmm
//! and for QEMU microvm's userspace virtio-net-device on a tap, side by side, with a veth pair
//! between two namespaces as the physical reference.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use benches::{
    bench_cmdline, cell, host_json, qemu_microvm, ratio, unix_time, wait_boot_complete, write_json, Args,
    CpuTicks, Summary,
};
use harness::{
    try_vmm_binary, ControlClient, Guest, GuestBuilder, GuestImages, NetNs, ProbePattern, TempDir,
};
use serde_json::{json, Value};
use vmm_api::control::{NetMetrics, Response};

const USAGE: &str = "\
usage: net [--mib-per-stream N] [--pings N] [--memory-mib N] [--host-cc NAME]
           [--guest-sysctl NAME=VALUE]... [--out PATH] [--no-qemu] [--qemu PATH]

Boots one guest per VMM with a virtio-net NIC on a tap in a private network namespace and moves
N MiB per TCP stream each way (1 stream, then 4), measured on the host from the first byte to the
last byte read or, towards the guest, to the guest's close, with the VMM process's CPU time over
the same span; then pings the guest. A veth pair between two namespaces is measured the same way
as the reference. Prints a Markdown table (Gbit/s, host CPU seconds per Gbit, ping RTT median and
p90) with vmm/QEMU ratios; JSON goes to --out.

  --mib-per-stream N  MiB each stream carries (default 256)
  --pings N           ping round trips (default 50)
  --memory-mib N      guest memory (default 256)
  --host-cc NAME      congestion control of the host's end of every stream (default cubic, Linux's
                      default; a host may default to another, such as bbr, which paces)
  --guest-sysctl NAME=VALUE
                      a sysctl for both VMMs' guest kernel (sysctl.NAME=VALUE on its command line),
                      such as net.ipv4.tcp_min_tso_segs=44: the 64 KiB TSO frames a guest on
                      hardware builds by itself; a kvm_pvm guest's pacing rate is too low for them
  --out PATH          JSON report (default target/bench/net.json)
  --qemu PATH         QEMU binary (default qemu-system-x86_64); --no-qemu skips it";

const BOOT_TIMEOUT: Duration = Duration::from_secs(600);
const HOST_IP: &str = "10.99.0.1";
const GUEST_IP: &str = "10.99.0.2";
const GUEST_MAC: &str = "02:00:00:00:99:02";
/// (direction, streams, host port) of every transfer, in the order the guest runs them.
const TRANSFERS: [(Direction, u32, u16); 4] = [
    (Direction::GuestToHost, 1, 9100),
    (Direction::HostToGuest, 1, 9101),
    (Direction::GuestToHost, 4, 9102),
    (Direction::HostToGuest, 4, 9103),
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Direction {
    GuestToHost,
    HostToGuest,
}

impl Direction {
    fn label(self) -> &'static str {
        match self {
            Direction::GuestToHost => "guest->host",
            Direction::HostToGuest => "host->guest",
        }
    }
}

struct Options {
    mib: u64,
    pings: u32,
    memory_mib: u32,
    host_cc: String,
    guest_sysctls: Vec<String>,
    out: PathBuf,
    qemu: Option<String>,
}

impl Options {
    fn parse(args: impl IntoIterator<Item = String>) -> Result<Options> {
        let mut o = Options {
            mib: 256,
            pings: 50,
            memory_mib: 256,
            host_cc: "cubic".into(),
            guest_sysctls: Vec::new(),
            out: PathBuf::from("target/bench/net.json"),
            qemu: Some("qemu-system-x86_64".into()),
        };
        let mut args = Args::new(args, USAGE);
        while let Some(flag) = args.next_flag() {
            match flag.as_str() {
                "--mib-per-stream" => o.mib = args.parse(&flag)?,
                "--pings" => o.pings = args.parse(&flag)?,
                "--memory-mib" => o.memory_mib = args.parse(&flag)?,
                "--host-cc" => o.host_cc = args.value(&flag)?,
                "--guest-sysctl" => o.guest_sysctls.push(guest_sysctl(&args.value(&flag)?)?),
                "--out" => o.out = PathBuf::from(args.value(&flag)?),
                "--qemu" => o.qemu = Some(args.value(&flag)?),
                "--no-qemu" => o.qemu = None,
                _ => return Err(args.unexpected(&flag)),
            }
        }
        if o.mib == 0 || o.pings == 0 {
            bail!("--mib-per-stream and --pings must be positive\n{USAGE}");
        }
        Ok(o)
    }
}

/// `NAME=VALUE` as one kernel command-line word: `sysctl.NAME=VALUE`.
fn guest_sysctl(setting: &str) -> Result<String> {
    match setting.split_once('=') {
        Some((name, value))
            if !name.is_empty()
                && !value.is_empty()
                && !setting.contains(char::is_whitespace)
                && !setting.contains('"') =>
        {
            Ok(format!("sysctl.{setting}"))
        }
        _ => bail!("--guest-sysctl wants NAME=VALUE without spaces or quotes, got {setting:?}"),
    }
}

/// One transfer's result.
#[derive(Debug, Clone)]
struct Transfer {
    direction: Direction,
    streams: u32,
    bytes: u64,
    seconds: f64,
    /// VMM process CPU seconds over the transfer (none for the veth reference).
    cpu_seconds: Option<f64>,
    /// What the NIC counted over the transfer (vmm only: the others have no such counters).
    nic: Option<NicDelta>,
}

/// The change in vmm's NIC counters over one transfer.
#[derive(Debug, Clone, Copy)]
struct NicDelta {
    /// Frames delivered to the guest.
    rx_frames: u64,
    /// Tap frames merged into those (TCP segment coalescing).
    rx_coalesced: u64,
    tx_frames: u64,
    interrupts: u64,
}

impl NicDelta {
    fn between(before: &NetMetrics, after: &NetMetrics) -> NicDelta {
        NicDelta {
            rx_frames: after.rx_frames - before.rx_frames,
            rx_coalesced: after.rx_coalesced - before.rx_coalesced,
            tx_frames: after.tx_frames - before.tx_frames,
            interrupts: after.interrupts - before.interrupts,
        }
    }
}

/// eth0's counters, read over the vmm's control socket.
fn nic_metrics(control: &mut ControlClient) -> Result<NetMetrics> {
    let Response::Metrics(m) = control.ok(r#"{"id": 1, "request": "metrics"}"#)? else {
        bail!("metrics: unexpected answer");
    };
    m.nets
        .into_iter()
        .find(|n| n.id == "eth0")
        .context("metrics: no eth0")
}

impl Transfer {
    fn gbit_per_s(&self) -> f64 {
        self.bytes as f64 * 8.0 / self.seconds / 1e9
    }

    fn cpu_per_gbit(&self) -> Option<f64> {
        self.cpu_seconds.map(|c| c / (self.bytes as f64 * 8.0 / 1e9))
    }
}

struct Measured {
    name: String,
    transfers: Vec<Transfer>,
    /// Round-trip times of the ping replies, in milliseconds.
    ping_ms: Option<Summary>,
}

/// Where the host side of each stream starts and ends, to time the whole transfer, and the VMM's
/// CPU time when the first byte moved, so that CPU and bytes are counted over the same span.
#[derive(Default)]
struct Span {
    first: Option<Instant>,
    last: Option<Instant>,
    bytes: u64,
    vmm_pid: Option<u32>,
    cpu_at_first: Option<CpuTicks>,
}

fn note(span: &Mutex<Span>, bytes: u64) {
    let mut s = span.lock().unwrap_or_else(|p| p.into_inner());
    let now = Instant::now();
    if s.first.is_none() {
        s.first = Some(now);
        s.cpu_at_first = s.vmm_pid.and_then(|pid| CpuTicks::read(pid).ok());
    }
    s.last = Some(now);
    s.bytes += bytes;
}

/// What the host side saw of one transfer.
struct HostSide {
    bytes: u64,
    seconds: f64,
    /// The VMM's CPU seconds from the first byte to the end (none for the veth reference).
    cpu_seconds: Option<f64>,
}

/// Serves `streams` connections on `HOST_IP:port` in the namespace: reads them to the end
/// (guest to host) or writes `bytes` to each and waits for the peer to close (host to guest).
/// The span runs from the first byte to the last byte read or the peer's close; `vmm_pid`'s CPU
/// time is read at both ends of it.
fn host_side(
    ns: &NetNs,
    direction: Direction,
    streams: u32,
    port: u16,
    bytes: u64,
    cc: &str,
    vmm_pid: Option<u32>,
) -> Result<std::thread::JoinHandle<Result<HostSide>>> {
    let cc = cc.to_string();
    ns.spawn(move || -> Result<HostSide> {
        let listener = TcpListener::bind((HOST_IP, port))?;
        let span = Arc::new(Mutex::new(Span {
            vmm_pid,
            ..Span::default()
        }));
        let workers: Vec<_> = (0..streams)
            .map(|i| -> Result<_> {
                let (conn, _) = listener.accept()?;
                set_congestion_control(&conn, &cc)?;
                let span = Arc::clone(&span);
                Ok(std::thread::spawn(move || {
                    stream(conn, direction, bytes, i + 100, &span)
                }))
            })
            .collect::<Result<_>>()?;
        for w in workers {
            w.join()
                .map_err(|_| anyhow::anyhow!("stream thread panicked"))??;
        }
        let cpu_at_end = vmm_pid.map(CpuTicks::read).transpose()?;
        let s = span.lock().unwrap_or_else(|p| p.into_inner());
        let seconds = match (s.first, s.last) {
            (Some(a), Some(b)) if b > a => (b - a).as_secs_f64(),
            _ => bail!("no data moved"),
        };
        let cpu_seconds = match (s.cpu_at_first, cpu_at_end) {
            (Some(a), Some(b)) => Some(b.since(&a).total() / 1000.0),
            _ => None,
        };
        Ok(HostSide {
            bytes: s.bytes,
            seconds,
            cpu_seconds,
        })
    })
}

/// Sets `conn`'s congestion control (`TCP_CONGESTION`), so that the run does not depend on the
/// host's default.
fn set_congestion_control(conn: &TcpStream, name: &str) -> Result<()> {
    use std::os::fd::AsRawFd;
    let len = libc::socklen_t::try_from(name.len())?;
    // SAFETY: the option value is `name`'s bytes, valid for `len` bytes for the call; the
    // descriptor belongs to `conn`, which outlives it.
    let ret = unsafe {
        libc::setsockopt(
            conn.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_CONGESTION,
            name.as_ptr().cast(),
            len,
        )
    };
    if ret != 0 {
        bail!(
            "TCP congestion control {name}: {}",
            std::io::Error::last_os_error()
        );
    }
    Ok(())
}

fn stream(
    mut conn: TcpStream,
    direction: Direction,
    bytes: u64,
    seed: u32,
    span: &Mutex<Span>,
) -> Result<()> {
    conn.set_read_timeout(Some(Duration::from_secs(120)))?;
    conn.set_write_timeout(Some(Duration::from_secs(120)))?;
    let mut buf = vec![0u8; 1 << 17];
    match direction {
        Direction::GuestToHost => loop {
            let n = conn.read(&mut buf)?;
            if n == 0 {
                return Ok(());
            }
            note(span, n as u64);
        },
        Direction::HostToGuest => {
            ProbePattern::new(seed).fill(&mut buf);
            let mut left = bytes;
            while left > 0 {
                let n = left.min(buf.len() as u64) as usize;
                conn.write_all(&buf[..n])?;
                note(span, n as u64);
                left -= n as u64;
            }
            conn.shutdown(Shutdown::Write)?;
            // The last write only filled the socket buffer: the transfer ends when the peer has read
            // everything and closes.
            let _ = conn.read(&mut [0u8; 1]);
            note(span, 0);
            Ok(())
        }
    }
}

/// Pings `addr` `count` times, 50 ms apart; the replies' round-trip times.
fn ping_ms(ns: &NetNs, addr: &str, count: u32) -> Option<Summary> {
    let out = Command::new("ip")
        .args([
            "netns",
            "exec",
            ns.name(),
            "ping",
            "-n",
            "-c",
            &count.to_string(),
            "-i",
            "0.05",
            addr,
        ])
        .output()
        .ok()?;
    Summary::of(&reply_times_ms(&String::from_utf8_lossy(&out.stdout)))
}

/// The `time=` of every reply line ("64 bytes from 10.99.0.2: icmp_seq=1 ttl=64 time=8.81 ms").
fn reply_times_ms(ping_output: &str) -> Vec<f64> {
    ping_output
        .lines()
        .filter_map(|l| l.split("time=").nth(1)?.split_whitespace().next()?.parse().ok())
        .collect()
}

fn guest_actions(mib: u64) -> String {
    let mut actions: Vec<String> = TRANSFERS
        .iter()
        .map(|(dir, streams, port)| match dir {
            Direction::GuestToHost => format!("net-send:{HOST_IP}:{port}:{mib}m:{streams}"),
            Direction::HostToGuest => format!("net-recv:{HOST_IP}:{port}:{streams}"),
        })
        .collect();
    actions.push("idle".into());
    actions.join(",")
}

/// The guest does not checksum what it receives (`net_sum=off`): under kvm_pvm's instruction
/// emulation that alone would cap throughput far below what the VMMs can carry.
fn guest_cmdline(opts: &Options) -> String {
    let mut cmdline = format!(
        "{} vmmprobe.net_sum=off ip={GUEST_IP}::{HOST_IP}:255.255.255.0::eth0:off",
        bench_cmdline(&guest_actions(opts.mib))
    );
    for setting in &opts.guest_sysctls {
        cmdline.push(' ');
        cmdline.push_str(setting);
    }
    cmdline
}

/// Runs every transfer against the guest whose VMM is `pid`, then pings it.
fn measure(
    ns: &NetNs,
    name: &str,
    guest: &Guest,
    mut control: Option<&mut ControlClient>,
    opts: &Options,
) -> Result<Measured> {
    let bytes = opts.mib << 20;
    let mut transfers = Vec::new();
    for (direction, streams, port) in TRANSFERS {
        let host = host_side(
            ns,
            direction,
            streams,
            port,
            bytes,
            &opts.host_cc,
            Some(guest.pid()),
        )?;
        let nic_before = control.as_deref_mut().map(nic_metrics).transpose()?;
        let host = host.join().map_err(|_| anyhow::anyhow!("host side panicked"))??;
        let nic = match (control.as_deref_mut(), nic_before) {
            (Some(c), Some(before)) => Some(NicDelta::between(&before, &nic_metrics(c)?)),
            _ => None,
        };
        let t = Transfer {
            direction,
            streams,
            bytes: host.bytes,
            seconds: host.seconds,
            cpu_seconds: host.cpu_seconds,
            nic,
        };
        eprintln!(
            "{name}: {} x{streams}: {} Gbit/s{}",
            direction.label(),
            significant(t.gbit_per_s()),
            nic.map_or_else(String::new, |n| format!(
                " (frames to the guest {} with {} merged into them, from the guest {}, interrupts {})",
                n.rx_frames, n.rx_coalesced, n.tx_frames, n.interrupts
            ))
        );
        transfers.push(t);
    }
    guest.wait_for_line("vmmprobe: idle", BOOT_TIMEOUT)?;
    Ok(Measured {
        name: name.into(),
        transfers,
        ping_ms: ping_ms(ns, GUEST_IP, opts.pings),
    })
}

fn vmm_command(ns: &NetNs, kernel: &Path, tap: &str, api_sock: &Path, opts: &Options) -> Result<Command> {
    let inner = GuestBuilder::new(kernel)
        .binary(&try_vmm_binary()?)
        .cmdline(&guest_cmdline(opts))
        .memory_mib(opts.memory_mib)
        .arg("--net")
        .arg(format!("tap={tap},mac={GUEST_MAC},id=eth0"))
        .arg("--api-sock")
        .arg(api_sock)
        .command()?;
    let mut cmd = ns.command(Path::new(inner.get_program()));
    cmd.args(inner.get_args());
    Ok(cmd)
}

fn qemu_command(ns: &NetNs, qemu: &str, kernel: &Path, tap: &str, opts: &Options) -> Command {
    let inner = qemu_microvm(qemu, "microvm", opts.memory_mib, 1);
    let mut cmd = ns.command(Path::new(inner.get_program()));
    cmd.args(inner.get_args())
        .arg("-kernel")
        .arg(kernel)
        .args(["-append", &guest_cmdline(opts)])
        .args([
            "-netdev",
            &format!("tap,id=n0,ifname={tap},script=no,downscript=no,vhost=off"),
        ])
        .args(["-device", &format!("virtio-net-device,netdev=n0,mac={GUEST_MAC}")]);
    cmd
}

fn run_vmm(name: &str, opts: &Options, kernel: &Path, qemu: Option<&str>) -> Result<Measured> {
    let ns = NetNs::new(&format!("b{name}"))?;
    let tap = "btap0";
    ns.add_tap(tap, &format!("{HOST_IP}/24"))?;
    let dir = TempDir::new("net-bench")?;
    let api_sock = dir.path().join("api.sock");
    let cmd = match qemu {
        Some(q) => qemu_command(&ns, q, kernel, tap, opts),
        None => vmm_command(&ns, kernel, tap, &api_sock, opts)?,
    };
    let mut guest = Guest::spawn_command(cmd, None)?;
    let result = wait_boot_complete(&guest, BOOT_TIMEOUT).and_then(|_| {
        let mut control = match qemu {
            Some(_) => None,
            None => Some(ControlClient::connect(&api_sock)?),
        };
        measure(&ns, name, &guest, control.as_mut(), opts)
    });
    let _ = guest.kill();
    result.with_context(|| format!("{name}; last output:\n{}", guest.output_tail()))
}

/// The same transfers between two namespaces joined by a veth pair: what the host's own stack does.
fn run_veth(opts: &Options) -> Result<Measured> {
    let a = NetNs::new("bva")?;
    let b = NetNs::new("bvb")?;
    a.ip(&[
        "link",
        "add",
        "bveth0",
        "type",
        "veth",
        "peer",
        "name",
        "bveth1",
        "netns",
        b.name(),
    ])?;
    a.ip(&["addr", "add", &format!("{HOST_IP}/24"), "dev", "bveth0"])?;
    a.ip(&["link", "set", "bveth0", "up"])?;
    b.ip(&["addr", "add", &format!("{GUEST_IP}/24"), "dev", "bveth1"])?;
    b.ip(&["link", "set", "bveth1", "up"])?;
    let bytes = opts.mib << 20;
    let mut transfers = Vec::new();
    for (direction, streams, port) in TRANSFERS {
        let host = host_side(&a, direction, streams, port, bytes, &opts.host_cc, None)?;
        // The other end plays the guest probe's part.
        let peer = b.spawn(move || -> Result<()> {
            let deadline = Instant::now() + Duration::from_secs(30);
            let conns: Vec<TcpStream> = (0..streams)
                .map(|_| loop {
                    match TcpStream::connect((HOST_IP, port)) {
                        Ok(c) => break Ok(c),
                        Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
                        Err(e) => break Err(e),
                    }
                })
                .collect::<std::io::Result<_>>()?;
            let span = Arc::new(Mutex::new(Span::default()));
            let peer_dir = match direction {
                Direction::GuestToHost => Direction::HostToGuest,
                Direction::HostToGuest => Direction::GuestToHost,
            };
            let workers: Vec<_> = conns
                .into_iter()
                .enumerate()
                .map(|(i, c)| {
                    let span = Arc::clone(&span);
                    std::thread::spawn(move || stream(c, peer_dir, bytes, i as u32 + 1, &span))
                })
                .collect();
            for w in workers {
                w.join().map_err(|_| anyhow::anyhow!("peer stream panicked"))??;
            }
            Ok(())
        })?;
        let host = host.join().map_err(|_| anyhow::anyhow!("host side panicked"))??;
        peer.join().map_err(|_| anyhow::anyhow!("peer panicked"))??;
        transfers.push(Transfer {
            direction,
            streams,
            bytes: host.bytes,
            seconds: host.seconds,
            cpu_seconds: None,
            nic: None,
        });
    }
    Ok(Measured {
        name: "veth".into(),
        transfers,
        ping_ms: ping_ms(&a, GUEST_IP, opts.pings),
    })
}

/// Three significant digits: a guest moving 0.6 Mbit/s and a veth moving 30 Gbit/s fit one column.
fn significant(v: f64) -> String {
    if v <= 0.0 || !v.is_finite() {
        return format!("{v}");
    }
    let decimals = (2 - v.log10().floor() as i32).max(0) as usize;
    format!("{v:.decimals$}")
}

fn markdown(results: &[Measured]) -> String {
    let find = |name: &str| results.iter().find(|m| m.name == name);
    let (ours, qemu) = (find("vmm"), find("qemu"));
    let mut t = String::from(
        "| transfer | streams | VMM | Gbit/s | host CPU s per Gbit | vmm/QEMU throughput |\n|---|---:|---|---:|---:|---:|\n",
    );
    for (i, (direction, streams, _)) in TRANSFERS.iter().enumerate() {
        let ours_gbit = ours.and_then(|m| m.transfers.get(i)).map(Transfer::gbit_per_s);
        let qemu_gbit = qemu.and_then(|m| m.transfers.get(i)).map(Transfer::gbit_per_s);
        for m in results {
            let Some(tr) = m.transfers.get(i) else { continue };
            let r = if m.name == "vmm" {
                ratio(ours_gbit, qemu_gbit)
            } else {
                None
            };
            t.push_str(&format!(
                "| {} | {streams} | {} | {} | {} | {} |\n",
                direction.label(),
                m.name,
                significant(tr.gbit_per_s()),
                cell(tr.cpu_per_gbit(), 2),
                cell(r, 2)
            ));
        }
    }
    t.push_str(
        "\n| VMM | ping RTT median, ms | p90, ms | replies | vmm/QEMU median |\n|---|---:|---:|---:|---:|\n",
    );
    let median = |m: Option<&Measured>| m.and_then(|m| m.ping_ms).map(|p| p.median);
    for m in results {
        let r = if m.name == "vmm" {
            ratio(median(ours), median(qemu))
        } else {
            None
        };
        t.push_str(&format!(
            "| {} | {} | {} | {} | {} |\n",
            m.name,
            cell(m.ping_ms.map(|p| p.median), 3),
            cell(m.ping_ms.map(|p| p.p90), 3),
            m.ping_ms.map_or(0, |p| p.n),
            cell(r, 2)
        ));
    }
    t
}

fn report(opts: &Options, results: &[Measured]) -> Value {
    let runs: Vec<Value> = results
        .iter()
        .map(|m| {
            let transfers: Vec<Value> = m
                .transfers
                .iter()
                .map(|t| {
                    json!({"direction": t.direction.label(), "streams": t.streams, "bytes": t.bytes,
                           "seconds": t.seconds, "gbit_per_s": t.gbit_per_s(), "cpu_seconds": t.cpu_seconds,
                           "cpu_seconds_per_gbit": t.cpu_per_gbit(),
                           "nic": t.nic.map(|n| json!({"rx_frames": n.rx_frames, "rx_coalesced": n.rx_coalesced,
                                                       "tx_frames": n.tx_frames, "interrupts": n.interrupts}))})
                })
                .collect();
            json!({"name": m.name, "transfers": transfers, "ping_ms": m.ping_ms.map(|p| p.to_json())})
        })
        .collect();
    json!({"bench": "net", "time": unix_time(), "host": host_json(), "mib_per_stream": opts.mib,
           "host_cc": opts.host_cc, "guest_sysctls": opts.guest_sysctls,
           "memory_mib": opts.memory_mib, "results": runs})
}

fn main() -> Result<()> {
    if benches::wants_help() {
        println!("{USAGE}");
        return Ok(());
    }
    let opts = Options::parse(std::env::args().skip(1))?;
    benches::clean_up_on_signals()?;
    let kernel = GuestImages::get()?.vmlinux.clone();
    let mut results = vec![run_vmm("vmm", &opts, &kernel, None)?];
    if let Some(qemu) = &opts.qemu {
        results.push(run_vmm("qemu", &opts, &kernel, Some(qemu))?);
    }
    results.push(run_veth(&opts)?);
    println!("{}", markdown(&results));
    write_json(&opts.out, &report(&opts, &results))?;
    eprintln!("wrote {}", opts.out.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_and_actions() {
        assert_eq!(
            [0.000619454, 0.0123, 1.0, 12.311, 32.1527].map(significant),
            ["0.000619", "0.0123", "1.00", "12.3", "32.2"]
        );
        let o = Options::parse(["--mib-per-stream", "8", "--no-qemu"].map(String::from)).unwrap();
        assert_eq!((o.mib, o.qemu.is_none()), (8, true));
        assert!(Options::parse(["--pings", "0"].map(String::from)).is_err());
        let o = Options::parse(
            [
                "--guest-sysctl",
                "net.ipv4.tcp_min_tso_segs=44",
                "--mib-per-stream",
                "1",
            ]
            .map(String::from),
        )
        .unwrap();
        let cmdline = guest_cmdline(&o);
        assert!(
            cmdline.ends_with("::eth0:off sysctl.net.ipv4.tcp_min_tso_segs=44"),
            "{cmdline}"
        );
        for bad in ["net.ipv4.tcp_min_tso_segs", "=1", "a=", "a=1 b=2", "a=\"1\""] {
            assert!(
                Options::parse(["--guest-sysctl", bad].map(String::from)).is_err(),
                "{bad}"
            );
        }
        assert_eq!(
            guest_actions(8),
            "net-send:10.99.0.1:9100:8m:1,net-recv:10.99.0.1:9101:1,net-send:10.99.0.1:9102:8m:4,\
             net-recv:10.99.0.1:9103:4,idle"
        );
        let t = Transfer {
            direction: Direction::GuestToHost,
            streams: 1,
            bytes: 125_000_000,
            seconds: 1.0,
            cpu_seconds: Some(0.5),
            nic: None,
        };
        assert!((t.gbit_per_s() - 1.0).abs() < 1e-9);
        assert_eq!(t.cpu_per_gbit(), Some(0.5));
    }

    #[test]
    fn ping_reply_times() {
        let out = "PING 10.99.0.2 (10.99.0.2) 56(84) bytes of data.\n\
                   64 bytes from 10.99.0.2: icmp_seq=1 ttl=64 time=8.81 ms\n\
                   64 bytes from 10.99.0.2: icmp_seq=2 ttl=64 time=12 ms\n\n\
                   --- 10.99.0.2 ping statistics ---\n\
                   rtt min/avg/max/mdev = 8.810/10.405/12.000/1.595 ms\n";
        assert_eq!(reply_times_ms(out), [8.81, 12.0]);
    }
}
