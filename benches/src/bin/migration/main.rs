//! Live migration: total time, downtime and bytes sent to move a running guest from one `vmm`
//! process to another over a Unix socket pair (migrate-send / migrate-receive), and QEMU microvm's
//! own live migration (`migrate` to an `-incoming unix:` destination) of the same guest side by side.
//! Both guests sit behind taps on a bridge in a network namespace made here, and a UDP stream from
//! the bridge measures the downtime a client sees (`client_view.rs`).
//!
//! `cargo run --release -p benches --bin migration`

mod client_view;

use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use benches::{cell, host_json, qemu_microvm, ratio, unix_time, write_json, Args, Qmp, Summary};
use client_view::{longest_gap, wait_echoes, EchoStream};
use harness::{try_vmm_binary, ControlClient, Guest, GuestImages, NetNs, TempDir};
use serde_json::json;
use vmm_api::control::{Event, Outcome, Response};
use vmm_api::migration::MigrationStats;

const USAGE: &str = "\
usage: migration [--sizes MIBxVCPUS,...] [--runs N] [--downtime-ms N] [--dirty-mib N]
                 [--probe-interval-ms N] [--out PATH] [--qemu PATH | --no-qemu]

For each guest size (default 128x1,1024x2): boots the guest probe (a counter in memory) once, then
migrates it N times (default 5) to a fresh vmm process, each time from the last destination, and
reports the median total time (migrate-send to migration-completed), the downtime the source
measured (pause to the destination's ready answer), the client-view downtime (the longest gap in
the echoes of a UDP datagram sent to the guest every --probe-interval-ms, default 20, from its
network; the JSON also has the longest gap of 2 s without a migration), the bytes sent and the
rounds. QEMU microvm
migrates the same guest N times the same way (`migrate` to a new -incoming unix: QEMU), with
QEMU's own downtime and total time from query-migrate, and the same client view. Both get the
same downtime budget
(--downtime-ms, default 300). With --dirty-mib N the guest also rewrites an N MiB buffer at full
speed (the probe's mem-dirty; both VMMs then throttle it, auto-converge, to fit the budget). JSON
goes to --out (default target/bench/migration.json).";

const BOOT_TIMEOUT: Duration = Duration::from_secs(900);
const SOCKET_TIMEOUT: Duration = Duration::from_secs(60);
const MIGRATION_TIMEOUT: Duration = Duration::from_secs(600);
/// The guest's network: a bridge in the bench's namespace with two taps, one for the VMM that
/// runs the guest and one for the VMM it moves to (they alternate).
const BRIDGE_CIDR: &str = "10.84.0.1/24";
const GUEST_IP: &str = "10.84.0.2";
const GUEST_MAC: &str = "02:00:00:00:84:02";
const TAPS: [&str; 2] = ["bmig0", "bmig1"];
const ECHO_PORT: u16 = 7777;
/// How long the probe stream runs on after a migration, so that the window holds the echoes
/// from the destination.
const SETTLE: Duration = Duration::from_secs(1);

struct Options {
    sizes: Vec<(u32, u32)>,
    runs: usize,
    downtime_ms: u64,
    dirty_mib: u32,
    probe_interval: Duration,
    qemu: Option<String>,
    out: PathBuf,
}

impl Options {
    fn parse<S: Into<String>>(args: impl IntoIterator<Item = S>) -> Result<Options> {
        let mut opts = Options {
            sizes: vec![(128, 1), (1024, 2)],
            runs: 5,
            downtime_ms: 300,
            dirty_mib: 0,
            probe_interval: Duration::from_millis(20),
            qemu: Some("qemu-system-x86_64".into()),
            out: harness::workspace_root().join("target/bench/migration.json"),
        };
        let mut args = Args::new(args, USAGE);
        while let Some(flag) = args.next_flag() {
            match flag.as_str() {
                "--sizes" => opts.sizes = args.sizes(&flag)?,
                "--runs" => opts.runs = args.parse(&flag)?,
                "--downtime-ms" => opts.downtime_ms = args.parse(&flag)?,
                "--dirty-mib" => opts.dirty_mib = args.parse(&flag)?,
                "--probe-interval-ms" => opts.probe_interval = Duration::from_millis(args.parse(&flag)?),
                "--qemu" => opts.qemu = Some(args.value(&flag)?),
                "--no-qemu" => opts.qemu = None,
                "--out" => opts.out = args.path(&flag)?,
                _ => return Err(args.unexpected(&flag)),
            }
        }
        if opts.runs == 0 || opts.sizes.is_empty() || opts.downtime_ms == 0 || opts.probe_interval.is_zero() {
            bail!("--runs, --sizes, --downtime-ms and --probe-interval-ms need at least one");
        }
        Ok(opts)
    }
}

/// The guest's command line: a UDP echo on its NIC, a counter, and with `--dirty-mib` a buffer
/// rewritten at full speed.
fn guest_cmdline(opts: &Options) -> String {
    let actions = match opts.dirty_mib {
        0 => format!("net-udp-echo:{ECHO_PORT},counter"),
        n => format!("net-udp-echo:{ECHO_PORT},mem-dirty:{n}m,counter"),
    };
    let gateway = BRIDGE_CIDR.split('/').next().unwrap_or_default();
    format!(
        "{} vmmprobe.count=100000000 ip={GUEST_IP}::{gateway}:255.255.255.0::eth0:off",
        benches::bench_cmdline(&actions)
    )
}

fn guest_addr() -> Result<SocketAddr> {
    Ok(format!("{GUEST_IP}:{ECHO_PORT}").parse()?)
}

/// The bench's namespace with the guest's bridge and taps.
fn network(tag: &str) -> Result<NetNs> {
    let ns = NetNs::new(tag)?;
    ns.add_bridge("br0", BRIDGE_CIDR, &TAPS)?;
    Ok(ns)
}

/// A migration's window on the probe stream: from just before it starts until the guest has run
/// a while at the destination.
struct Window {
    from: Instant,
    to: Instant,
}

/// How long the guest has to start echoing.
const ECHO_TIMEOUT: Duration = Duration::from_secs(60);
/// How long the stream runs before the first migration, to see its gaps without one.
const BASELINE: Duration = Duration::from_secs(2);

/// Starts the probe stream to the guest and lets it run [`BASELINE`] with nothing else going on.
/// A guest too busy to echo (a dirtying workload on all its vCPUs) gets no client view (`-`)
/// rather than stopping the bench.
fn start_probing(ns: &NetNs, opts: &Options) -> Result<(EchoStream, Window)> {
    if let Err(e) = wait_echoes(ns, guest_addr()?, 20, ECHO_TIMEOUT) {
        eprintln!("warning: {e:#}; the client view of this guest will be missing");
    }
    let stream = EchoStream::start(ns, guest_addr()?, opts.probe_interval)?;
    let from = Instant::now();
    std::thread::sleep(BASELINE);
    Ok((
        stream,
        Window {
            from,
            to: Instant::now(),
        },
    ))
}

/// The client-view downtime of each window, in ms.
fn client_gaps(arrivals: &[Instant], windows: &[Window]) -> Vec<Option<f64>> {
    windows
        .iter()
        .map(|w| longest_gap(arrivals, w.from, w.to).map(ms))
        .collect()
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// One migration as the source saw it, and the client.
struct Measured {
    total_ms: f64,
    stats: MigrationStats,
    client_gap_ms: Option<f64>,
}

fn empty_vmm(ns: &NetNs, sock: &Path) -> Result<(Guest, ControlClient)> {
    let mut cmd = ns.command(&try_vmm_binary()?);
    cmd.arg("--api-sock").arg(sock);
    let guest = Guest::spawn_command(cmd, None)?;
    ControlClient::wait_for_socket(sock, SOCKET_TIMEOUT)?;
    Ok((guest, ControlClient::connect(sock)?))
}

fn give(c: &mut ControlClient, end: &UnixStream) -> Result<()> {
    let answer = c.call_with_fds(
        r#"{"id": 1, "request": {"add-fds": {"names": ["mig"]}}}"#,
        &[end.as_raw_fd()],
    )?;
    match answer.result {
        Outcome::Ok(Response::FdsAdded { .. }) => Ok(()),
        other => bail!("add-fds: {other:?}"),
    }
}

/// Moves the VM of `(guest, c)` to a new vmm (on the other tap) and returns that one with the
/// measurement (its client view is filled in later, from the whole probe stream).
fn migrate_once(
    ns: &NetNs,
    dir: &Path,
    run: usize,
    downtime_ms: u64,
    mut source: (Guest, ControlClient),
) -> Result<((Guest, ControlClient), Measured)> {
    let (dest_guest, mut d) = empty_vmm(ns, &dir.join(format!("dest{run}.sock")))?;
    let (a, b) = UnixStream::pair()?;
    give(&mut d, &b)?;
    let tap = TAPS[(run + 1) % 2];
    let receive = json!({"id": 2, "request": {"migrate-receive": {"connection": "mig",
        "overrides": {"nets": [{"id": "eth0", "tap": tap}]}}}});
    d.send(&receive.to_string())?;
    give(&mut source.1, &a)?;
    drop((a, b));
    let line =
        json!({"id": 3, "request": {"migrate-send": {"connection": "mig", "max_downtime_ms": downtime_ms}}});
    let started = Instant::now();
    match source.1.ok(&line.to_string())? {
        Response::MigrationStarted(_) => {}
        other => bail!("migrate-send: {other:?}"),
    }
    let stats = loop {
        match source.1.next_event()? {
            Event::MigrationCompleted(stats) => break stats,
            Event::MigrationFailed(stats) => bail!("migration failed: {stats:?}"),
            _ => {}
        }
    };
    let total_ms = ms(started.elapsed());
    match d.wait_answer(MIGRATION_TIMEOUT)?.result {
        Outcome::Ok(Response::MigrationReceived { .. }) => {}
        other => bail!("migrate-receive: {other:?}\n{}", dest_guest.output_tail()),
    }
    let (mut old, _) = source;
    old.wait_exit(Duration::from_secs(60))?;
    let measured = Measured {
        total_ms,
        stats,
        client_gap_ms: None,
    };
    Ok(((dest_guest, d), measured))
}

/// The migrations of one guest size, and the stream's longest gap without a migration (ms).
type Runs<T> = (Vec<T>, Option<f64>);

fn measure_vmm(opts: &Options, kernel: &Path, mib: u32, vcpus: u32) -> Result<Runs<Measured>> {
    let dir = TempDir::new("bench-migration")?;
    let ns = network("bmig-vmm")?;
    let sock = dir.path().join("src.sock");
    let builder = harness::GuestBuilder::new(kernel)
        .binary(&try_vmm_binary()?)
        .cmdline(&guest_cmdline(opts))
        .memory_mib(mib)
        .vcpus(vcpus)
        .arg("--track-dirty-pages")
        .arg("on")
        .arg("--net")
        .arg(format!("tap={},mac={GUEST_MAC},id=eth0", TAPS[0]))
        .arg("--api-sock")
        .arg(&sock)
        .command()?;
    let mut cmd = ns.command(Path::new(builder.get_program()));
    cmd.args(builder.get_args());
    let guest = Guest::spawn_command(cmd, None)?;
    ControlClient::wait_for_socket(&sock, SOCKET_TIMEOUT)?;
    let c = ControlClient::connect(&sock)?;
    guest.wait_for_line("vmmprobe: counter=3", BOOT_TIMEOUT)?;
    let (stream, baseline) = start_probing(&ns, opts)?;
    let mut windows = Vec::new();
    let mut current = (guest, c);
    let mut out = Vec::new();
    for run in 0..opts.runs {
        let from = Instant::now();
        let (next, m) = migrate_once(&ns, dir.path(), run, opts.downtime_ms, current)?;
        // The guest runs on at the destination.
        let seen = next.0.lines().len();
        next.0
            .wait_for_line("vmmprobe: counter=", BOOT_TIMEOUT)
            .with_context(|| {
                format!("run {run}: the guest does not count at the destination ({seen} lines)")
            })?;
        std::thread::sleep(SETTLE);
        windows.push(Window {
            from,
            to: Instant::now(),
        });
        out.push(m);
        current = next;
    }
    let arrivals = stream.finish()?;
    for (m, gap) in out.iter_mut().zip(client_gaps(&arrivals, &windows)) {
        m.client_gap_ms = gap;
    }
    let idle = longest_gap(&arrivals, baseline.from, baseline.to).map(ms);
    let (mut last, mut c) = current;
    let _ = c.ok(r#"{"id": 9, "request": "stop"}"#);
    let _ = last.wait_exit(Duration::from_secs(30));
    Ok((out, idle))
}

#[derive(Default)]
struct QemuRun {
    total_ms: f64,
    downtime_ms: Option<f64>,
    ram_bytes: Option<u64>,
    client_gap_ms: Option<f64>,
}

/// How each QEMU of a run set is started: the same guest, machine and namespace.
struct QemuSetup<'a> {
    ns: &'a NetNs,
    qemu: &'a str,
    kernel: &'a Path,
    cmdline: String,
    mib: u32,
    vcpus: u32,
}

impl QemuSetup<'_> {
    /// A QEMU microvm with the guest's NIC on `tap`; with `incoming`, waiting for a migration.
    fn spawn(&self, tap: &str, qmp: &Path, incoming: Option<&Path>) -> Result<Guest> {
        let inner: Command = qemu_microvm(self.qemu, "microvm", self.mib, self.vcpus);
        let mut cmd = self.ns.command(Path::new(inner.get_program()));
        cmd.args(inner.get_args())
            .arg("-kernel")
            .arg(self.kernel)
            .args(["-append", &self.cmdline])
            .args([
                "-netdev",
                &format!("tap,id=n0,ifname={tap},script=no,downscript=no,vhost=off"),
            ])
            .args(["-device", &format!("virtio-net-device,netdev=n0,mac={GUEST_MAC}")])
            .arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", qmp.display()));
        if let Some(path) = incoming {
            cmd.args(["-incoming", &format!("unix:{}", path.display())]);
        }
        Guest::spawn_command(cmd, None)
    }
}

fn wait_path(path: &Path) -> Result<()> {
    let deadline = Instant::now() + SOCKET_TIMEOUT;
    while !path.exists() {
        if Instant::now() > deadline {
            bail!("{} did not appear", path.display());
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok(())
}

fn measure_qemu(opts: &Options, qemu: &str, kernel: &Path, mib: u32, vcpus: u32) -> Result<Runs<QemuRun>> {
    let dir = TempDir::new("bench-migration-qemu")?;
    let ns = network("bmig-qemu")?;
    let qmp_path = dir.path().join("q0.sock");
    let setup = QemuSetup {
        ns: &ns,
        qemu,
        kernel,
        cmdline: guest_cmdline(opts),
        mib,
        vcpus,
    };
    let mut guest = setup.spawn(TAPS[0], &qmp_path, None)?;
    let result = (|| -> Result<Runs<QemuRun>> {
        guest.wait_for_line("vmmprobe: counter=3", BOOT_TIMEOUT)?;
        let (stream, baseline) = start_probing(&ns, opts)?;
        let mut windows = Vec::new();
        let mut qmp = Qmp::connect(&qmp_path)?;
        let mut out = Vec::new();
        for run in 0..opts.runs {
            let next_qmp = dir.path().join(format!("q{}.sock", run + 1));
            let mig = dir.path().join(format!("mig{run}.sock"));
            let tap = TAPS[(run + 1) % 2];
            let mut next = setup.spawn(tap, &next_qmp, Some(&mig))?;
            wait_path(&mig)?;
            wait_path(&next_qmp)?;
            let mut next_q = Qmp::connect(&next_qmp)?;
            qmp.execute_with(
                "migrate-set-parameters",
                Some(json!({"downtime-limit": opts.downtime_ms})),
            )?;
            // The same lever ours has (QEMU's is off by default).
            qmp.execute_with(
                "migrate-set-capabilities",
                Some(json!({"capabilities": [{"capability": "auto-converge", "state": opts.dirty_mib > 0}]})),
            )?;
            let started = Instant::now();
            let from = started;
            qmp.execute_with("migrate", Some(json!({"uri": format!("unix:{}", mig.display())})))?;
            let status = loop {
                let s = qmp.execute("query-migrate")?;
                match s["status"].as_str() {
                    Some("completed") => break s,
                    Some("failed") | Some("cancelled") => bail!("QEMU migrate: {s}"),
                    _ => std::thread::sleep(Duration::from_millis(1)),
                }
            };
            let total_ms = ms(started.elapsed());
            out.push(QemuRun {
                total_ms,
                downtime_ms: status["downtime"].as_f64(),
                ram_bytes: status["ram"]["transferred"].as_u64(),
                client_gap_ms: None,
            });
            let _ = guest.kill();
            next.wait_for_line("vmmprobe: counter=", BOOT_TIMEOUT)
                .context("the QEMU guest does not count at the destination")?;
            std::thread::sleep(SETTLE);
            windows.push(Window {
                from,
                to: Instant::now(),
            });
            // Pointers move to the destination, which the next run migrates away from.
            std::mem::swap(&mut guest, &mut next);
            std::mem::swap(&mut qmp, &mut next_q);
        }
        let arrivals = stream.finish()?;
        for (r, gap) in out.iter_mut().zip(client_gaps(&arrivals, &windows)) {
            r.client_gap_ms = gap;
        }
        Ok((out, longest_gap(&arrivals, baseline.from, baseline.to).map(ms)))
    })();
    let _ = guest.kill();
    result
}

fn median(v: impl IntoIterator<Item = f64>) -> Option<f64> {
    let v: Vec<f64> = v.into_iter().collect();
    Summary::of(&v).map(|s| s.median)
}

fn main() -> Result<()> {
    if benches::wants_help() {
        println!("{USAGE}");
        return Ok(());
    }
    let opts = Options::parse(std::env::args().skip(1))?;
    benches::clean_up_on_signals()?;
    let kernel = GuestImages::get()?.vmlinux.clone();
    let mut table = String::from(
        "| guest | dirty MiB | vmm total ms | vmm downtime ms | vmm client-view ms | vmm MiB sent | vmm rounds | vmm throttle % | QEMU total ms | QEMU downtime ms | QEMU client-view ms | QEMU MiB sent | QEMU/vmm client-view |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    let mut rows = Vec::new();
    for &(mib, vcpus) in &opts.sizes {
        eprintln!("vmm: {mib} MiB, {vcpus} vCPU(s)");
        let (v, v_idle) = measure_vmm(&opts, &kernel, mib, vcpus)?;
        let (q, q_idle) = match &opts.qemu {
            Some(qemu) => {
                eprintln!("qemu: {mib} MiB, {vcpus} vCPU(s)");
                measure_qemu(&opts, qemu, &kernel, mib, vcpus)?
            }
            None => (Vec::new(), None),
        };
        let mib_of = |b: u64| b as f64 / f64::from(1 << 20);
        let v_down = median(v.iter().filter_map(|m| m.stats.downtime_ms.map(|d| d as f64)));
        let q_down = median(q.iter().filter_map(|r| r.downtime_ms));
        let v_client = median(v.iter().filter_map(|m| m.client_gap_ms));
        let q_client = median(q.iter().filter_map(|r| r.client_gap_ms));
        table.push_str(&format!(
            "| {mib} MiB / {vcpus} vCPU | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
            opts.dirty_mib,
            cell(median(v.iter().map(|m| m.total_ms)), 1),
            cell(v_down, 1),
            cell(v_client, 1),
            cell(
                median(v.iter().map(|m| mib_of(m.stats.memory_transferred_bytes))),
                1
            ),
            cell(median(v.iter().map(|m| f64::from(m.stats.iteration))), 0),
            cell(median(v.iter().map(|m| f64::from(m.stats.throttle_percent))), 0),
            cell(median(q.iter().map(|r| r.total_ms)), 1),
            cell(q_down, 1),
            cell(q_client, 1),
            cell(median(q.iter().filter_map(|r| r.ram_bytes.map(mib_of))), 1),
            cell(ratio(q_client, v_client), 1),
        ));
        rows.push(json!({
            "memory_mib": mib, "vcpus": vcpus,
            "vmm_idle_gap_ms": v_idle, "qemu_idle_gap_ms": q_idle,
            "vmm": v.iter().map(|m| json!({"total_ms": m.total_ms, "client_view_downtime_ms": m.client_gap_ms, "stats": m.stats})).collect::<Vec<_>>(),
            "qemu": q.iter().map(|r| json!({"total_ms": r.total_ms, "downtime_ms": r.downtime_ms, "client_view_downtime_ms": r.client_gap_ms, "ram_transferred_bytes": r.ram_bytes})).collect::<Vec<_>>(),
        }));
    }
    println!("{table}");
    let report = json!({"benchmark": "migration", "unix_time": unix_time(), "host": host_json(),
        "runs": opts.runs, "downtime_budget_ms": opts.downtime_ms, "dirty_mib": opts.dirty_mib,
        "probe_interval_ms": opts.probe_interval.as_millis() as u64, "sizes": rows});
    write_json(&opts.out, &report)?;
    eprintln!("wrote {}", opts.out.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options() {
        let o = Options::parse([
            "--sizes",
            "256x2",
            "--runs",
            "2",
            "--downtime-ms",
            "50",
            "--dirty-mib",
            "16",
            "--probe-interval-ms",
            "5",
            "--no-qemu",
        ])
        .unwrap();
        assert_eq!(o.probe_interval, Duration::from_millis(5));
        assert_eq!(
            (o.sizes, o.runs, o.downtime_ms, o.dirty_mib, o.qemu),
            (vec![(256, 2)], 2, 50, 16, None)
        );
        assert!(Options::parse(["--runs", "0"]).is_err());
        assert!(Options::parse(["--downtime-ms", "0"]).is_err());
        assert!(Options::parse(["--probe-interval-ms", "0"]).is_err());
    }
}
