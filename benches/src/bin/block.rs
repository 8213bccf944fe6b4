//! Block I/O benchmark: the in-kernel guest probe's load generator (`blk-load`) against a virtio-blk disk
//! backed by a file on the host, under `vmm` and under QEMU microvm, next to `fio` on the host against the
//! same file. Reports IOPS, MiB/s and host CPU time per I/O.
//!
//! `cargo run --release -p benches --bin block` (see benches/README.md).

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context, Result};
use benches::{cell, ratio, write_json, Summary};
use harness::{try_vmm_binary, workspace_root, Guest, GuestBuilder, GuestImages, Line, LineHook, Stream};
use serde_json::{json, Value};

const USAGE: &str = "\
usage: block [--runs N] [--seconds S] [--file-mib N] [--dir DIR] [--rand-qd N] [--seq-qd N] [--memory-mib N]
             [--boot-timeout-secs S] [--engine uring|sync] [--out PATH] [--kernel PATH]
             [--no-vmm] [--no-qemu] [--no-fio] [--qemu PATH] [--fio PATH]

Creates a file of N MiB (default 1024) filled with data in a temporary directory under DIR (default
$TMPDIR or /tmp), then runs four phases of S seconds (default 10) each: 4 KiB randread and randwrite at
QD --rand-qd (32), 1 MiB seqread and seqwrite at QD --seq-qd (4). With vmm and QEMU the guest probe's
blk-load runs all four in one boot against the file as virtio-blk disk vda; fio runs them on the host.
With --runs N (default 1) this repeats N times (vmm, QEMU, fio, vmm, ...) and reports medians.
Prints Markdown tables; writes JSON to --out (default target/bench/block.json). The file is removed at
the end, also on errors (not when the benchmark is killed).
The vmm binary is $VMM_BIN, else target/release/vmm, else target/debug/vmm.";

/// Guest kernel arguments shared by both VMMs (the kvm_pvm workarounds; vmm adds them itself too).
const CMDLINE_BASE: &str = "console=ttyS0 quiet pci=off noxsave clearcpuid=popcnt,smap";

/// Output meaning the guest is broken and will not finish: stop waiting at once.
const FAILURE_MARKERS: [&str; 3] = ["KVM internal error", "emulation failure", "Kernel panic"];

const BOOT_COMPLETE: &str = "BOOT-COMPLETE";
const LOAD_START: &str = "vmmprobe: blk-load-start ";
const LOAD_END: &str = "vmmprobe: blk-load ";

/// Clock ticks per second of `/proc/PID/stat` times: USER_HZ, 100 on every Linux ABI we run on.
const USER_HZ: f64 = 100.0;

#[derive(Debug, Clone)]
struct Options {
    runs: usize,
    seconds: u32,
    file_mib: u64,
    dir: PathBuf,
    rand_qd: u32,
    seq_qd: u32,
    memory_mib: u32,
    boot_timeout: Duration,
    engine: String,
    out: PathBuf,
    kernel: Option<PathBuf>,
    vmm: bool,
    qemu: Option<String>,
    fio: Option<String>,
}

impl Options {
    fn parse(args: impl IntoIterator<Item = String>) -> Result<Options> {
        let mut opts = Options {
            runs: 1,
            seconds: 10,
            file_mib: 1024,
            dir: std::env::temp_dir(),
            rand_qd: 32,
            seq_qd: 4,
            memory_mib: 256,
            boot_timeout: Duration::from_secs(300),
            engine: "uring".to_string(),
            out: workspace_root().join("target/bench/block.json"),
            kernel: None,
            vmm: true,
            qemu: Some("qemu-system-x86_64".to_string()),
            fio: Some("fio".to_string()),
        };
        let mut args = args.into_iter();
        while let Some(arg) = args.next() {
            let mut value = || args.next().ok_or_else(|| anyhow!("{arg} needs a value\n{USAGE}"));
            match arg.as_str() {
                "--runs" => opts.runs = value()?.parse().context("--runs")?,
                "--seconds" => opts.seconds = value()?.parse().context("--seconds")?,
                "--file-mib" => opts.file_mib = value()?.parse().context("--file-mib")?,
                "--dir" => opts.dir = PathBuf::from(value()?),
                "--rand-qd" => opts.rand_qd = value()?.parse().context("--rand-qd")?,
                "--seq-qd" => opts.seq_qd = value()?.parse().context("--seq-qd")?,
                "--memory-mib" => opts.memory_mib = value()?.parse().context("--memory-mib")?,
                "--boot-timeout-secs" => {
                    opts.boot_timeout = Duration::from_secs(value()?.parse().context("--boot-timeout-secs")?)
                }
                "--engine" => opts.engine = value()?,
                "--out" => opts.out = PathBuf::from(value()?),
                "--kernel" => opts.kernel = Some(PathBuf::from(value()?)),
                "--no-vmm" => opts.vmm = false,
                "--no-qemu" => opts.qemu = None,
                "--no-fio" => opts.fio = None,
                "--qemu" => opts.qemu = Some(value()?),
                "--fio" => opts.fio = Some(value()?),
                "-h" | "--help" => bail!("{USAGE}"),
                other => bail!("unknown argument {other:?}\n{USAGE}"),
            }
        }
        if opts.runs == 0 || opts.seconds == 0 || opts.memory_mib == 0 {
            bail!("--runs, --seconds and --memory-mib must be at least 1");
        }
        // The probe's limits (QD 1..256) and the largest block size (1 MiB).
        for qd in [opts.rand_qd, opts.seq_qd] {
            if !(1..=256).contains(&qd) {
                bail!("queue depths must be 1..=256");
            }
        }
        if opts.file_mib < 1 {
            bail!("--file-mib must be at least 1");
        }
        if !matches!(opts.engine.as_str(), "uring" | "sync") {
            bail!("--engine must be uring or sync");
        }
        if !opts.vmm && opts.qemu.is_none() && opts.fio.is_none() {
            bail!("--no-vmm, --no-qemu and --no-fio leave nothing to run");
        }
        Ok(opts)
    }

    fn phases(&self) -> Vec<Phase> {
        vec![
            Phase::new("randread", 4096, self.rand_qd),
            Phase::new("randwrite", 4096, self.rand_qd),
            Phase::new("seqread", 1 << 20, self.seq_qd),
            Phase::new("seqwrite", 1 << 20, self.seq_qd),
        ]
    }
}

/// One load: the probe's `blk-load` mode (fio's `--rw` differs for the sequential ones).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Phase {
    mode: &'static str,
    bs: u64,
    qd: u32,
}

impl Phase {
    fn new(mode: &'static str, bs: u64, qd: u32) -> Phase {
        Phase { mode, bs, qd }
    }

    fn label(&self) -> String {
        let size = if self.bs >= 1 << 20 {
            format!("{}M", self.bs >> 20)
        } else {
            format!("{}k", self.bs >> 10)
        };
        format!("{} {size} QD{}", self.mode, self.qd)
    }

    fn fio_rw(&self) -> &'static str {
        match self.mode {
            "seqread" => "read",
            "seqwrite" => "write",
            other => other,
        }
    }

    fn is_write(&self) -> bool {
        self.mode.ends_with("write")
    }
}

/// CPU times of a process from `/proc/PID/stat`, in clock ticks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct CpuTicks {
    /// utime of the whole process (all threads, exited ones included).
    user: u64,
    /// stime of the whole process.
    system: u64,
    /// Time spent running a guest (also counted in `user`), where the host kernel accounts it (not on
    /// kvm_pvm hosts, where it is 0 and the guest's time shows up as `system`).
    guest: u64,
    /// utime + stime of the live vCPU threads: threads whose name contains "cpu" in any case (vmm's
    /// `vcpu0`, QEMU's `CPU 0/KVM`).
    vcpu: u64,
}

/// The command name (field 2) of a `/proc/.../stat` text.
fn stat_comm(stat: &str) -> &str {
    match (stat.find('('), stat.rfind(')')) {
        (Some(a), Some(b)) if a < b => &stat[a + 1..b],
        _ => "",
    }
}

impl CpuTicks {
    /// Parses the text of `/proc/PID/stat`: fields 14 (utime), 15 (stime) and 43 (guest_time).
    /// `vcpu` is left 0.
    fn parse(stat: &str) -> Result<CpuTicks> {
        // The command name (field 2) is in parentheses and may contain spaces: count from after it.
        let rest = &stat[stat.rfind(')').ok_or_else(|| anyhow!("no ')' in stat"))? + 1..];
        let fields: Vec<&str> = rest.split_whitespace().collect();
        // `fields[0]` is field 3 (state).
        let field = |n: usize| -> Result<u64> {
            fields
                .get(n - 3)
                .ok_or_else(|| anyhow!("stat has no field {n}"))?
                .parse()
                .with_context(|| format!("stat field {n}"))
        };
        Ok(CpuTicks {
            user: field(14)?,
            system: field(15)?,
            guest: field(43).unwrap_or(0),
            vcpu: 0,
        })
    }

    /// The process's times plus those of its vCPU threads (`/proc/PID/task/*/stat`).
    fn read(pid: u32) -> Result<CpuTicks> {
        let path = format!("/proc/{pid}/stat");
        let text = std::fs::read_to_string(&path).with_context(|| format!("cannot read {path}"))?;
        let mut ticks = Self::parse(&text)?;
        let tasks = format!("/proc/{pid}/task");
        for entry in std::fs::read_dir(&tasks).with_context(|| format!("cannot list {tasks}"))? {
            // A thread may exit between listing and reading: skip it.
            let Ok(text) = std::fs::read_to_string(entry?.path().join("stat")) else {
                continue;
            };
            if stat_comm(&text).to_ascii_lowercase().contains("cpu") {
                let t = Self::parse(&text)?;
                ticks.vcpu += t.user + t.system;
            }
        }
        Ok(ticks)
    }

    /// `self - earlier` as milliseconds.
    fn since(&self, earlier: &CpuTicks) -> CpuMs {
        let ms = |a: u64, b: u64| a.saturating_sub(b) as f64 * 1000.0 / USER_HZ;
        CpuMs {
            user: ms(self.user, earlier.user),
            system: ms(self.system, earlier.system),
            guest: ms(self.guest, earlier.guest),
            vcpu: Some(ms(self.vcpu, earlier.vcpu)),
        }
    }
}

/// CPU time in milliseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
struct CpuMs {
    user: f64,
    system: f64,
    guest: f64,
    /// The vCPU threads' part of `user + system` (VMMs only).
    vcpu: Option<f64>,
}

impl CpuMs {
    fn total(&self) -> f64 {
        self.user + self.system
    }

    /// What the VMM's other threads (device emulation, I/O, main loop) used.
    fn non_vcpu(&self) -> Option<f64> {
        self.vcpu.map(|v| (self.total() - v).max(0.0))
    }

    fn to_json(self) -> Value {
        json!({
            "user_ms": self.user,
            "system_ms": self.system,
            "guest_ms": self.guest,
            "total_ms": self.total(),
            "vcpu_threads_ms": self.vcpu,
            "other_threads_ms": self.non_vcpu(),
        })
    }
}

/// What one phase measured.
#[derive(Debug, Clone, Default)]
struct PhaseResult {
    ios: u64,
    bytes: u64,
    errors: u64,
    /// Duration of the load as measured where it ran (guest `elapsed-us`, fio's runtime), seconds.
    elapsed_s: f64,
    /// Host CPU time of the VMM process (or fio) during the phase.
    cpu: Option<CpuMs>,
    /// Host wall time between the guest's start and result lines, ms (VMMs only).
    host_wall_ms: Option<f64>,
    /// The probe's `result=` (0 on success).
    result: i64,
}

impl PhaseResult {
    fn iops(&self) -> Option<f64> {
        (self.elapsed_s > 0.0).then(|| self.ios as f64 / self.elapsed_s)
    }

    fn mibps(&self) -> Option<f64> {
        (self.elapsed_s > 0.0).then(|| self.bytes as f64 / self.elapsed_s / f64::from(1 << 20))
    }

    /// Host CPU microseconds per successful I/O.
    fn cpu_us_per_io(&self) -> Option<f64> {
        let cpu = self.cpu?;
        (self.ios > 0).then(|| cpu.total() * 1000.0 / self.ios as f64)
    }

    /// Host CPU microseconds of the VMM's threads other than the vCPUs, per successful I/O.
    fn non_vcpu_us_per_io(&self) -> Option<f64> {
        let other = self.cpu?.non_vcpu()?;
        (self.ios > 0).then(|| other * 1000.0 / self.ios as f64)
    }

    fn to_json(&self) -> Value {
        json!({
            "ios": self.ios,
            "bytes": self.bytes,
            "errors": self.errors,
            "result": self.result,
            "elapsed_s": self.elapsed_s,
            "iops": self.iops(),
            "mibps": self.mibps(),
            "cpu": self.cpu.map(CpuMs::to_json),
            "cpu_us_per_io": self.cpu_us_per_io(),
            "other_threads_cpu_us_per_io": self.non_vcpu_us_per_io(),
            "host_wall_ms": self.host_wall_ms,
        })
    }
}

/// One side of the comparison: vmm, qemu or fio.
#[derive(Debug, Clone, Default)]
struct RunResult {
    /// Per phase, in [`Options::phases`] order; `None` if the phase produced no result line.
    phases: Vec<Option<PhaseResult>>,
    /// Process start to `BOOT-COMPLETE`, ms (VMMs only).
    boot_complete_ms: Option<f64>,
    /// CPU time of the whole VMM process (boot included) at the last phase's result line.
    process_cpu: Option<CpuMs>,
    error: Option<String>,
}

impl RunResult {
    fn phase(&self, i: usize) -> Option<&PhaseResult> {
        self.phases.get(i).and_then(Option::as_ref)
    }

    fn to_json(&self, phases: &[Phase]) -> Value {
        let total_ios: u64 = self.phases.iter().flatten().map(|p| p.ios).sum();
        json!({
            "ok": self.error.is_none(),
            "error": self.error,
            "boot_complete_ms": self.boot_complete_ms,
            "process_cpu": self.process_cpu.map(CpuMs::to_json),
            "process_cpu_us_per_io": self.process_cpu.filter(|_| total_ios > 0)
                .map(|c| c.total() * 1000.0 / total_ios as f64),
            "phases": phases.iter().enumerate().map(|(i, p)| {
                let mut v = self.phase(i).map_or(json!({}), PhaseResult::to_json);
                v["mode"] = json!(p.mode);
                v["bs"] = json!(p.bs);
                v["qd"] = json!(p.qd);
                v
            }).collect::<Vec<_>>(),
        })
    }
}

/// The `key=value` words of a probe line.
fn kv<'a>(text: &'a str, key: &str) -> Option<&'a str> {
    text.split_whitespace()
        .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
}

fn kv_num<T: std::str::FromStr>(text: &str, key: &str) -> Result<T> {
    kv(text, key)
        .ok_or_else(|| anyhow!("no {key}= in {text:?}"))?
        .parse()
        .map_err(|_| anyhow!("bad {key}= in {text:?}"))
}

/// Parses a `vmmprobe: blk-load ...` result line into (mode, result).
fn parse_load_line(text: &str) -> Result<(String, PhaseResult)> {
    let mode = kv(text, "mode").ok_or_else(|| anyhow!("no mode= in {text:?}"))?;
    let elapsed_us: f64 = kv_num(text, "elapsed-us")?;
    Ok((
        mode.to_string(),
        PhaseResult {
            ios: kv_num(text, "ios")?,
            bytes: kv_num(text, "bytes")?,
            errors: kv_num(text, "errors")?,
            elapsed_s: elapsed_us / 1e6,
            result: kv_num(text, "result")?,
            ..PhaseResult::default()
        },
    ))
}

/// A probe line seen by the output hook, with the VMM's CPU times read the moment it arrived.
#[derive(Debug, Clone)]
struct Event {
    text: String,
    at: Instant,
    cpu: Result<CpuTicks, String>,
}

/// Which VMM runs the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Vmm {
    Ours,
    Qemu,
}

impl Vmm {
    fn name(self) -> &'static str {
        match self {
            Vmm::Ours => "vmm",
            Vmm::Qemu => "qemu",
        }
    }
}

struct Bench {
    opts: Options,
    phases: Vec<Phase>,
    kernel: PathBuf,
    vmm_bin: Option<PathBuf>,
    file: PathBuf,
}

impl Bench {
    /// `vmmprobe.action=` list: every phase on vda, then power off.
    fn guest_cmdline(&self) -> String {
        let loads: Vec<String> = self
            .phases
            .iter()
            .map(|p| format!("blk-load:vda:{}:{}:{}:{}", p.mode, p.bs, p.qd, self.opts.seconds))
            .collect();
        format!("{CMDLINE_BASE} vmmprobe.action={},poweroff", loads.join(","))
    }

    fn command(&self, vmm: Vmm) -> Result<Command> {
        let cmdline = self.guest_cmdline();
        match vmm {
            Vmm::Ours => {
                let drive = format!(
                    "path={},id=bench,engine={}",
                    self.file.display(),
                    self.opts.engine
                );
                GuestBuilder::new(&self.kernel)
                    .binary(self.vmm_bin.as_deref().ok_or_else(|| anyhow!("vmm disabled"))?)
                    .cmdline(&cmdline)
                    .memory_mib(self.opts.memory_mib)
                    .arg("--drive")
                    .arg(drive)
                    .command()
            }
            Vmm::Qemu => {
                let qemu = self
                    .opts
                    .qemu
                    .as_deref()
                    .ok_or_else(|| anyhow!("QEMU disabled"))?;
                let drive = format!(
                    "id=bench,file={},format=raw,if=none,cache=none,aio=io_uring",
                    self.file.display()
                );
                let mut cmd = Command::new(qemu);
                cmd.args(["-M", "microvm,x-option-roms=off,rtc=on,isa-serial=on"])
                    .args(["-enable-kvm", "-cpu", "host"])
                    .args(["-m", &self.opts.memory_mib.to_string(), "-smp", "1"])
                    .args(["-nodefaults", "-no-user-config", "-nographic", "-serial", "stdio"])
                    // Names the vCPU thread `CPU 0/KVM`, so its CPU time can be told apart.
                    .args(["-name", "block-bench,debug-threads=on"])
                    .arg("-kernel")
                    .arg(&self.kernel)
                    .args(["-append", &cmdline])
                    .args(["-drive", &drive])
                    .args(["-device", "virtio-blk-device,drive=bench"]);
                Ok(cmd)
            }
        }
    }

    /// Boots once and runs every phase; failures end up in `RunResult::error`.
    fn run_vmm(&self, vmm: Vmm) -> RunResult {
        let mut result = RunResult {
            phases: vec![None; self.phases.len()],
            ..RunResult::default()
        };
        if let Err(e) = self.measure_vmm(vmm, &mut result) {
            result.error = Some(format!("{e:#}"));
        }
        result
    }

    fn measure_vmm(&self, vmm: Vmm, result: &mut RunResult) -> Result<()> {
        let cmd = self.command(vmm)?;
        // Read the CPU times from the reader thread the moment a phase starts or ends.
        let events: Arc<Mutex<Vec<Event>>> = Arc::default();
        let sink = Arc::clone(&events);
        let hook: LineHook = Arc::new(move |pid, line: &Line| {
            let t = &line.text;
            if line.stream == Stream::Stdout && (t.contains(LOAD_START) || t.contains(LOAD_END)) {
                let cpu = CpuTicks::read(pid).map_err(|e| format!("{e:#}"));
                let mut events = sink.lock().unwrap_or_else(|p| p.into_inner());
                events.push(Event {
                    text: t.clone(),
                    at: line.at,
                    cpu,
                });
            }
        });
        let mut guest = Guest::spawn_command(cmd, Some(hook))?;
        let outcome = self.wait_guest(&mut guest, result);
        let events = events.lock().unwrap_or_else(|p| p.into_inner()).clone();
        self.collect_phases(&events, result);
        outcome
    }

    fn wait_guest(&self, guest: &mut Guest, result: &mut RunResult) -> Result<()> {
        let mut wanted = vec![BOOT_COMPLETE];
        wanted.extend(FAILURE_MARKERS);
        let line = guest.wait_for_any_line(&wanted, self.opts.boot_timeout)?;
        if !line.text.contains(BOOT_COMPLETE) {
            bail!(
                "boot failed: {:?}; last output:\n{}",
                line.text,
                guest.output_tail()
            );
        }
        result.boot_complete_ms = Some(
            line.at
                .saturating_duration_since(guest.started_at())
                .as_secs_f64()
                * 1000.0,
        );
        // Each phase runs for its duration plus the time the last I/Os take; allow a minute extra each.
        let per_phase = Duration::from_secs(u64::from(self.opts.seconds) + 60);
        let deadline = Instant::now() + per_phase * u32::try_from(self.phases.len()).unwrap_or(u32::MAX);
        // Wait for every phase's result line (the guest powers off right after the last one).
        loop {
            let done = guest
                .lines()
                .iter()
                .filter(|l| l.stream == Stream::Stdout && l.text.contains(LOAD_END))
                .count();
            if done >= self.phases.len() {
                break;
            }
            if let Some(line) = guest.find_line(&FAILURE_MARKERS) {
                bail!(
                    "guest failed: {:?}; last output:\n{}",
                    line.text,
                    guest.output_tail()
                );
            }
            if let Some(status) = guest.try_exit_status()? {
                bail!(
                    "exited with {status} after {done} of {} phases; last output:\n{}",
                    self.phases.len(),
                    guest.output_tail()
                );
            }
            if Instant::now() >= deadline {
                bail!(
                    "only {done} of {} phases done in time; last output:\n{}",
                    self.phases.len(),
                    guest.output_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let status = guest.wait_exit(Duration::from_secs(60))?;
        if !status.success() {
            bail!("exited with {status}; last output:\n{}", guest.output_tail());
        }
        Ok(())
    }

    /// Pairs each phase's start and result lines and takes the CPU time between them.
    fn collect_phases(&self, events: &[Event], result: &mut RunResult) {
        let mut start: Option<&Event> = None;
        for event in events {
            if event.text.contains(LOAD_START) {
                start = Some(event);
            } else if let Some(pos) = event.text.find(LOAD_END) {
                // The whole process so far: boot and the phases up to here (a new process starts at 0).
                result.process_cpu = event.cpu.as_ref().ok().map(|c| c.since(&CpuTicks::default()));
                let text = &event.text[pos..];
                let (mode, mut phase) = match parse_load_line(text) {
                    Ok(parsed) => parsed,
                    Err(e) => {
                        eprintln!("  ignoring line: {e:#}");
                        continue;
                    }
                };
                if let Some(s) = start
                    .take()
                    .filter(|s| kv(&s.text, "mode") == Some(mode.as_str()))
                {
                    if let (Ok(a), Ok(b)) = (&s.cpu, &event.cpu) {
                        phase.cpu = Some(b.since(a));
                    }
                    phase.host_wall_ms =
                        Some(event.at.saturating_duration_since(s.at).as_secs_f64() * 1000.0);
                }
                if phase.result != 0 && result.error.is_none() {
                    result.error = Some(format!("probe reported {text:?}"));
                }
                if let Some(i) = self.phases.iter().position(|p| p.mode == mode) {
                    result.phases[i] = Some(phase);
                }
            }
        }
    }

    /// Runs every phase with fio on the host against the same file.
    fn run_fio(&self) -> RunResult {
        let mut result = RunResult {
            phases: vec![None; self.phases.len()],
            ..RunResult::default()
        };
        for (i, phase) in self.phases.iter().enumerate() {
            match self.fio_phase(phase) {
                Ok(p) => result.phases[i] = Some(p),
                Err(e) => {
                    result.error = Some(format!("{}: {e:#}", phase.label()));
                    break;
                }
            }
        }
        result
    }

    fn fio_phase(&self, phase: &Phase) -> Result<PhaseResult> {
        let fio = self.opts.fio.as_deref().ok_or_else(|| anyhow!("fio disabled"))?;
        let output = Command::new(fio)
            .arg("--name=block")
            .arg(format!("--filename={}", self.file.display()))
            .arg(format!("--rw={}", phase.fio_rw()))
            .arg(format!("--bs={}", phase.bs))
            .arg(format!("--iodepth={}", phase.qd))
            .args([
                "--ioengine=io_uring",
                "--direct=1",
                "--numjobs=1",
                "--time_based=1",
            ])
            .arg(format!("--runtime={}", self.opts.seconds))
            .arg(format!("--size={}", self.opts.file_mib << 20))
            .arg("--output-format=json")
            .output()
            .with_context(|| format!("cannot run {fio} (apt-get install fio, or pass --no-fio)"))?;
        if !output.status.success() {
            bail!(
                "fio exited with {}: {}",
                output.status,
                String::from_utf8_lossy(&output.stderr).trim()
            );
        }
        let text = String::from_utf8_lossy(&output.stdout);
        // fio may print notes before the JSON document.
        let json_text = &text[text.find('{').ok_or_else(|| anyhow!("no JSON in fio output"))?..];
        let report: Value = serde_json::from_str(json_text).context("parsing fio JSON")?;
        parse_fio(&report, phase.is_write())
    }
}

/// Extracts a phase result from fio's JSON report (first job).
fn parse_fio(report: &Value, write: bool) -> Result<PhaseResult> {
    let job = &report["jobs"][0];
    let side = &job[if write { "write" } else { "read" }];
    let num = |v: &Value, what: &str| v.as_f64().ok_or_else(|| anyhow!("fio JSON has no {what}"));
    let runtime_ms = num(&side["runtime"], "runtime")?;
    let job_runtime_ms = num(&job["job_runtime"], "job_runtime")?;
    // usr_cpu and sys_cpu are percentages of one CPU over the job's runtime.
    let pct_ms = |pct: f64| pct / 100.0 * job_runtime_ms;
    Ok(PhaseResult {
        ios: num(&side["total_ios"], "total_ios")? as u64,
        bytes: num(&side["io_bytes"], "io_bytes")? as u64,
        errors: num(&job["error"], "error")? as u64,
        elapsed_s: runtime_ms / 1000.0,
        cpu: Some(CpuMs {
            user: pct_ms(num(&job["usr_cpu"], "usr_cpu")?),
            system: pct_ms(num(&job["sys_cpu"], "sys_cpu")?),
            guest: 0.0,
            vcpu: None,
        }),
        host_wall_ms: None,
        result: 0,
    })
}

/// A temporary directory, removed with everything in it when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new(parent: &Path) -> Result<TempDir> {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let path = parent.join(format!("vmm-bench-block-{}-{nanos}", std::process::id()));
        std::fs::create_dir(&path).with_context(|| format!("cannot create {}", path.display()))?;
        Ok(TempDir(path))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(&self.0) {
            eprintln!("cannot remove {}: {e}", self.0.display());
        }
    }
}

/// Writes `mib` MiB of non-zero, non-repeating data to `path` and syncs it, so that every block is
/// allocated and reads really reach the disk (a sparse or fallocated file reads as zeroes for free).
fn create_backing_file(path: &Path, mib: u64) -> Result<()> {
    let mut file = File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
    let mut chunk = vec![0u8; 1 << 20];
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for word in chunk.chunks_exact_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        word.copy_from_slice(&x.to_le_bytes());
    }
    for i in 0..mib {
        // Make every MiB different.
        chunk[..8].copy_from_slice(&i.to_le_bytes());
        file.write_all(&chunk)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    file.sync_all()
        .with_context(|| format!("syncing {}", path.display()))
}

/// A per-phase metric of a result.
type Metric = fn(&PhaseResult) -> Option<f64>;

/// The median of `metric` for phase `i` over the runs that measured it.
fn median(runs: &[RunResult], i: usize, metric: Metric) -> Option<f64> {
    let values: Vec<f64> = runs
        .iter()
        .filter_map(|r| r.phase(i))
        .filter_map(metric)
        .collect();
    Summary::of(&values).map(|s| s.median)
}

/// One line per side: skipped, or how many runs worked and the first error.
fn status_line(name: &str, runs: &[RunResult]) -> String {
    if runs.is_empty() {
        return format!("{name}: skipped");
    }
    let ok = runs.iter().filter(|r| r.error.is_none()).count();
    let errors: u64 = runs
        .iter()
        .flat_map(|r| r.phases.iter().flatten())
        .map(|p| p.errors)
        .sum();
    let mut line = format!("{name}: {ok}/{} runs ok, {errors} I/O errors", runs.len());
    let boots: Vec<f64> = runs.iter().filter_map(|r| r.boot_complete_ms).collect();
    if let Some(b) = Summary::of(&boots) {
        line.push_str(&format!(", BOOT-COMPLETE after {:.0} ms (median)", b.median));
    }
    if let Some(e) = runs.iter().find_map(|r| r.error.as_deref()) {
        line.push_str(&format!("; FAILED: {}", e.lines().next().unwrap_or("")));
    }
    line
}

/// Writes back and drops `path`'s pages from the host page cache (GNU dd's documented idiom), so that
/// every run starts with the file on disk only: a VMM that does buffered I/O would otherwise read what
/// the previous run (or the file's creation) left in memory.
fn drop_page_cache(path: &Path) {
    let status = Command::new("dd")
        .arg(format!("of={}", path.display()))
        .args([
            "oflag=nocache",
            "conv=notrunc,fdatasync",
            "count=0",
            "status=none",
        ])
        .status();
    match status {
        Ok(s) if s.success() => {}
        Ok(s) => eprintln!(
            "warning: dropping the page cache of {} failed: dd {s}",
            path.display()
        ),
        Err(e) => eprintln!(
            "warning: dropping the page cache of {} failed: dd: {e}",
            path.display()
        ),
    }
}

fn markdown(bench: &Bench, ours: &[RunResult], qemu: &[RunResult], fio: &[RunResult]) -> String {
    let o = &bench.opts;
    let mut t = format!(
        "Block I/O: {} MiB file, {} s per phase, {} run(s), medians; guest: 1 vCPU, {} MiB, virtio-blk \
         (vmm engine={}, QEMU aio=io_uring cache=none); host: fio io_uring direct=1\n\n",
        o.file_mib, o.seconds, o.runs, o.memory_mib, o.engine
    );
    t.push_str("| phase | vmm IOPS | qemu IOPS | host IOPS | vmm MiB/s | qemu MiB/s | host MiB/s | vmm/qemu | vmm/host |\n");
    t.push_str("|---|---:|---:|---:|---:|---:|---:|---:|---:|\n");
    for (i, p) in bench.phases.iter().enumerate() {
        let iops = |r| median(r, i, PhaseResult::iops);
        let mibps = |r| median(r, i, PhaseResult::mibps);
        t.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
            p.label(),
            cell(iops(ours), 0),
            cell(iops(qemu), 0),
            cell(iops(fio), 0),
            cell(mibps(ours), 2),
            cell(mibps(qemu), 2),
            cell(mibps(fio), 2),
            cell(ratio(iops(ours), iops(qemu)), 2),
            cell(ratio(iops(ours), iops(fio)), 4),
        ));
    }
    t.push_str(
        "\nHost CPU time per I/O, µs: whole VMM process (vCPU threads included, so the guest's own time \
         too), its threads other than the vCPUs, and the fio process:\n\n",
    );
    t.push_str("| phase | vmm | vmm non-vCPU | qemu | qemu non-vCPU | host fio | vmm/qemu | vmm/host |\n");
    t.push_str("|---|---:|---:|---:|---:|---:|---:|---:|\n");
    for (i, p) in bench.phases.iter().enumerate() {
        let cpu = |r| median(r, i, PhaseResult::cpu_us_per_io);
        let other = |r| median(r, i, PhaseResult::non_vcpu_us_per_io);
        t.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} |\n",
            p.label(),
            cell(cpu(ours), 1),
            cell(other(ours), 1),
            cell(cpu(qemu), 1),
            cell(other(qemu), 1),
            cell(cpu(fio), 1),
            cell(ratio(cpu(ours), cpu(qemu)), 2),
            cell(ratio(cpu(ours), cpu(fio)), 2),
        ));
    }
    t.push('\n');
    for (name, runs) in [("vmm", ours), ("qemu", qemu), ("host fio", fio)] {
        t.push_str(&status_line(name, runs));
        t.push('\n');
    }
    t
}

/// The metrics summarised in the JSON report: key and accessor.
const JSON_METRICS: [(&str, Metric); 4] = [
    ("iops", PhaseResult::iops),
    ("mibps", PhaseResult::mibps),
    ("cpu_us_per_io", PhaseResult::cpu_us_per_io),
    ("other_threads_cpu_us_per_io", PhaseResult::non_vcpu_us_per_io),
];

fn report_json(bench: &Bench, ours: &[RunResult], qemu: &[RunResult], fio: &[RunResult]) -> Value {
    let o = &bench.opts;
    let per_phase = |f: &dyn Fn(usize, Metric) -> Option<f64>| -> Value {
        bench
            .phases
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let mut v = json!({ "mode": p.mode, "bs": p.bs, "qd": p.qd });
                for (key, metric) in JSON_METRICS {
                    v[key] = json!(f(i, metric));
                }
                v
            })
            .collect()
    };
    let side = |runs: &[RunResult]| -> Value {
        if runs.is_empty() {
            return Value::Null;
        }
        json!({
            "runs": runs.iter().map(|r| r.to_json(&bench.phases)).collect::<Vec<_>>(),
            "failed": runs.iter().filter(|r| r.error.is_some()).count(),
            "median": per_phase(&|i, m| median(runs, i, m)),
        })
    };
    let ratios = |other: &[RunResult]| per_phase(&|i, m| ratio(median(ours, i, m), median(other, i, m)));
    let osrelease = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    json!({
        "bench": "block",
        "unix_time": SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0),
        "host": { "kernel": osrelease.trim(), "cpus": std::thread::available_parallelism().map(|n| n.get()).ok() },
        "config": {
            "runs": o.runs,
            "seconds": o.seconds,
            "file_mib": o.file_mib,
            "memory_mib": o.memory_mib,
            "engine": o.engine,
            "kernel": bench.kernel,
            "vmm_binary": bench.vmm_bin,
            "qemu": o.qemu,
            "fio": o.fio,
            "guest_cmdline": bench.guest_cmdline(),
        },
        "results": { "vmm": side(ours), "qemu": side(qemu), "fio": side(fio) },
        "ratios": { "vmm_over_qemu": ratios(qemu), "vmm_over_host": ratios(fio) },
    })
}

fn describe(name: &str, run: usize, phases: &[Phase], r: &RunResult) -> String {
    let mut text = format!("{name} run {run}:");
    for (i, p) in phases.iter().enumerate() {
        if let Some(ph) = r.phase(i) {
            text.push_str(&format!(
                "\n  {}: {} IOPS, {} MiB/s, {} errors, {} µs CPU/IO ({} non-vCPU)",
                p.label(),
                cell(ph.iops(), 0),
                cell(ph.mibps(), 2),
                ph.errors,
                cell(ph.cpu_us_per_io(), 1),
                cell(ph.non_vcpu_us_per_io(), 1),
            ));
        }
    }
    if let Some(e) = &r.error {
        text.push_str(&format!("\n  FAILED: {e}"));
    }
    text
}

fn main() -> Result<()> {
    let opts = Options::parse(std::env::args().skip(1))?;
    let kernel = match &opts.kernel {
        Some(k) => k.clone(),
        None if opts.vmm || opts.qemu.is_some() => GuestImages::get()?.vmlinux.clone(),
        None => PathBuf::new(),
    };
    let vmm_bin = if opts.vmm { Some(try_vmm_binary()?) } else { None };
    // The path goes into comma-separated `--drive` / `-drive` option lists.
    if opts.dir.to_string_lossy().contains(',') {
        bail!("--dir must not contain ','");
    }
    let dir = TempDir::new(&opts.dir)?;
    let file = dir.0.join("disk.img");
    eprintln!("writing {} MiB to {}", opts.file_mib, file.display());
    create_backing_file(&file, opts.file_mib)?;
    let bench = Bench {
        phases: opts.phases(),
        opts: opts.clone(),
        kernel,
        vmm_bin,
        file,
    };
    eprintln!("guest cmdline: {}", bench.guest_cmdline());

    let (mut ours, mut qemu, mut fio) = (Vec::new(), Vec::new(), Vec::new());
    for run in 0..opts.runs {
        if opts.vmm {
            drop_page_cache(&bench.file);
            let r = bench.run_vmm(Vmm::Ours);
            eprintln!("{}", describe(Vmm::Ours.name(), run, &bench.phases, &r));
            ours.push(r);
        }
        if opts.qemu.is_some() {
            drop_page_cache(&bench.file);
            let r = bench.run_vmm(Vmm::Qemu);
            eprintln!("{}", describe(Vmm::Qemu.name(), run, &bench.phases, &r));
            qemu.push(r);
        }
        if opts.fio.is_some() {
            drop_page_cache(&bench.file);
            let r = bench.run_fio();
            eprintln!("{}", describe("fio", run, &bench.phases, &r));
            fio.push(r);
        }
    }

    println!("{}", markdown(&bench, &ours, &qemu, &fio));
    write_json(&opts.out, &report_json(&bench, &ours, &qemu, &fio))?;
    eprintln!("wrote {}", opts.out.display());
    drop(dir);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &str) -> Vec<String> {
        s.split_whitespace().map(String::from).collect()
    }

    #[test]
    fn parses_options() {
        let o = Options::parse(args("")).unwrap();
        assert_eq!(
            (o.seconds, o.file_mib, o.rand_qd, o.seq_qd, o.memory_mib),
            (10, 1024, 32, 4, 256)
        );
        assert!(o.vmm && o.qemu.is_some() && o.fio.is_some());
        let o = Options::parse(args("--seconds 3 --file-mib 64 --no-vmm --no-fio --seq-qd 8")).unwrap();
        assert_eq!((o.seconds, o.file_mib, o.seq_qd), (3, 64, 8));
        assert!(!o.vmm && o.qemu.is_some() && o.fio.is_none());
        assert_eq!(Options::parse(args("--runs 3")).unwrap().runs, 3);
        assert!(Options::parse(args("--runs 0")).is_err());
        assert!(Options::parse(args("--rand-qd 0")).is_err());
        assert!(Options::parse(args("--rand-qd 300")).is_err());
        assert!(Options::parse(args("--engine aio")).is_err());
        assert!(Options::parse(args("--no-vmm --no-qemu --no-fio")).is_err());
        assert!(Options::parse(args("--bogus")).is_err());
    }

    #[test]
    fn phases_and_cmdline() {
        let opts = Options::parse(args("--seconds 5")).unwrap();
        let bench = Bench {
            phases: opts.phases(),
            opts,
            kernel: "/k".into(),
            vmm_bin: None,
            file: "/tmp/d.img".into(),
        };
        assert_eq!(bench.phases[2].label(), "seqread 1M QD4");
        assert_eq!(bench.phases[0].label(), "randread 4k QD32");
        assert_eq!(bench.phases[3].fio_rw(), "write");
        assert!(bench.guest_cmdline().ends_with(
            "vmmprobe.action=blk-load:vda:randread:4096:32:5,blk-load:vda:randwrite:4096:32:5,\
             blk-load:vda:seqread:1048576:4:5,blk-load:vda:seqwrite:1048576:4:5,poweroff"
        ));
        let cmd = bench.command(Vmm::Qemu).unwrap();
        let args: Vec<_> = cmd.get_args().map(|a| a.to_string_lossy().into_owned()).collect();
        assert!(
            args.contains(&"id=bench,file=/tmp/d.img,format=raw,if=none,cache=none,aio=io_uring".to_string())
        );
        assert!(args.contains(&"block-bench,debug-threads=on".to_string()));
        let bench = Bench {
            vmm_bin: Some("/vmm".into()),
            ..bench
        };
        let cmd = bench.command(Vmm::Ours).unwrap();
        let args: Vec<_> = cmd.get_args().map(|a| a.to_string_lossy().into_owned()).collect();
        assert_eq!(
            args[args.len() - 2..],
            ["--drive", "path=/tmp/d.img,id=bench,engine=uring"]
        );
    }

    #[test]
    fn parses_stat() {
        let mut fields: Vec<String> = (3..=52).map(|n| n.to_string()).collect();
        fields[0] = "S".into();
        let stat = format!("1234 (qemu system) {}", fields.join(" "));
        let t = CpuTicks::parse(&stat).unwrap();
        assert_eq!(
            t,
            CpuTicks {
                user: 14,
                system: 15,
                guest: 43,
                vcpu: 0
            }
        );
        assert_eq!(stat_comm(&stat), "qemu system");
        assert_eq!(stat_comm("1 (CPU 0/KVM) S"), "CPU 0/KVM");
        let later = CpuTicks {
            user: 114,
            system: 65,
            guest: 43,
            vcpu: 100,
        };
        let d = later.since(&t);
        assert_eq!(
            (d.user, d.system, d.guest, d.total()),
            (1000.0, 500.0, 0.0, 1500.0)
        );
        assert_eq!((d.vcpu, d.non_vcpu()), (Some(1000.0), Some(500.0)));
        assert!(CpuTicks::parse("1 (x) S 1 2").is_err());
        // This process: none of its threads is a vCPU.
        let me = CpuTicks::read(std::process::id()).unwrap();
        assert_eq!(me.vcpu, 0);
    }

    #[test]
    fn parses_probe_load_line() {
        let line = "vmmprobe: blk-load dev=vda mode=randread bs=4096 qd=32 seconds=3 ios=928 bytes=3801088 \
                    iops=307 mibps=1.20 errors=0 elapsed-us=3013177 result=0";
        let (mode, p) = parse_load_line(line).unwrap();
        assert_eq!(mode, "randread");
        assert_eq!((p.ios, p.bytes, p.errors, p.result), (928, 3801088, 0, 0));
        assert!((p.iops().unwrap() - 307.98).abs() < 0.01);
        assert!(parse_load_line("vmmprobe: blk-load dev=vda mode=x").is_err());
    }

    fn event(text: &str, secs: u64, user: u64) -> Event {
        Event {
            text: text.into(),
            at: Instant::now() + Duration::from_secs(secs),
            cpu: Ok(CpuTicks {
                user,
                system: 0,
                guest: 0,
                vcpu: user / 2,
            }),
        }
    }

    #[test]
    fn pairs_phase_events() {
        let opts = Options::parse(args("")).unwrap();
        let bench = Bench {
            phases: opts.phases(),
            opts,
            kernel: "/k".into(),
            vmm_bin: None,
            file: "/f".into(),
        };
        let events = [
            event("vmmprobe: blk-load-start dev=vda mode=seqread bs=1048576 qd=4", 0, 100),
            event(
                "vmmprobe: blk-load dev=vda mode=seqread bs=1048576 qd=4 seconds=10 ios=1000 bytes=1048576000 \
                 iops=100 mibps=100.00 errors=0 elapsed-us=10000000 result=0",
                10,
                300,
            ),
        ];
        let mut r = RunResult {
            phases: vec![None; 4],
            ..RunResult::default()
        };
        bench.collect_phases(&events, &mut r);
        assert!(r.phase(0).is_none() && r.error.is_none());
        let p = r.phase(2).unwrap();
        assert_eq!(p.cpu.unwrap().total(), 2000.0);
        assert_eq!(p.cpu_us_per_io(), Some(2000.0));
        assert_eq!(p.non_vcpu_us_per_io(), Some(1000.0));
        assert_eq!(p.mibps(), Some(100.0));
        assert!((p.host_wall_ms.unwrap() - 10000.0).abs() < 1.0);
        assert_eq!(r.process_cpu.unwrap().total(), 3000.0);
        let table = markdown(&bench, std::slice::from_ref(&r), &[], &[]);
        assert!(
            table.contains("| seqread 1M QD4 | 100 | - | - | 100.00 | - | - | - | - |"),
            "{table}"
        );
        assert!(table.contains("vmm: 1/1 runs ok, 0 I/O errors\n"), "{table}");
        assert!(table.contains("qemu: skipped\n"), "{table}");
        let j = report_json(&bench, &[r.clone(), r], &[], &[]);
        assert_eq!(
            j["results"]["vmm"]["runs"][1]["phases"][2]["cpu_us_per_io"],
            json!(2000.0)
        );
        assert_eq!(j["results"]["vmm"]["median"][2]["iops"], json!(100.0));
        assert_eq!(j["results"]["vmm"]["median"][0]["iops"], Value::Null);
        assert_eq!(j["results"]["qemu"], Value::Null);
        assert_eq!(j["ratios"]["vmm_over_qemu"][2]["iops"], Value::Null);
    }

    #[test]
    fn parses_fio_json() {
        let report = json!({"jobs": [{
            "job_runtime": 10000, "usr_cpu": 10.0, "sys_cpu": 30.0, "error": 0,
            "read": {"runtime": 10000, "total_ios": 200000, "io_bytes": 819200000u64},
            "write": {"runtime": 0, "total_ios": 0, "io_bytes": 0}
        }]});
        let p = parse_fio(&report, false).unwrap();
        assert_eq!(p.iops(), Some(20000.0));
        assert_eq!(p.cpu.unwrap().total(), 4000.0);
        assert_eq!(p.cpu_us_per_io(), Some(20.0));
        assert!(parse_fio(&json!({}), true).is_err());
    }

    #[test]
    fn backing_file_and_temp_dir() {
        let parent = std::env::temp_dir();
        let dir = TempDir::new(&parent).unwrap();
        let path = dir.0.join("f");
        create_backing_file(&path, 2).unwrap();
        drop_page_cache(&path);
        let data = std::fs::read(&path).unwrap();
        assert_eq!(data.len(), 2 << 20);
        assert_ne!(data[..1 << 20], data[1 << 20..]);
        assert!(data.iter().filter(|&&b| b == 0).count() < data.len() / 100);
        let kept = dir.0.clone();
        drop(dir);
        assert!(!kept.exists());
    }
}
