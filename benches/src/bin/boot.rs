//! Boot benchmark: boots the same kernel and initramfs with `vmm` and with QEMU microvm, alternating,
//! and reports time to `BOOT-COMPLETE`, time to exit, and the VMM's memory overhead.
//!
//! `cargo run --release -p benches --bin boot -- --runs 5` (see benches/README.md).

use std::path::PathBuf;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Result};
use benches::{
    bench_cmdline, cell, host_json, ms_since, qemu_microvm, ratio, sample_memory, unix_time,
    wait_boot_complete, write_json, Args, Summary, Vmm, BOOT_COMPLETE, FAILURE_MARKERS,
};
use harness::{
    try_vmm_binary, workspace_root, Guest, GuestBuilder, GuestImages, Line, LineHook, RssBreakdown, Stream,
};
use serde_json::{json, Value};

const USAGE: &str = "\
usage: boot [--runs N] [--vcpus N] [--memory-mib N] [--timeout-secs S] [--exit-timeout-secs S]
            [--out PATH] [--no-qemu] [--no-vmm] [--qemu PATH] [--kernel PATH --initrd PATH] [--cmdline STR]
            [--paired]

Boots the guest-images VMLINUX + INITRAMFS N times (default 5) with vmm and QEMU microvm, alternating.
Prints a Markdown table; writes JSON (summary and raw samples) to --out (default target/bench/boot.json).
With --paired, each run boots vmm and QEMU at the same time (one per host core), so both see the same
host conditions, and the table adds the median of the per-run ratios.
The vmm binary is $VMM_BIN, else target/release/vmm, else target/debug/vmm.";

#[derive(Debug, Clone)]
struct Options {
    runs: usize,
    vcpus: u32,
    memory_mib: u32,
    timeout: Duration,
    exit_timeout: Duration,
    out: PathBuf,
    qemu: Option<String>,
    vmm: bool,
    kernel: Option<PathBuf>,
    initrd: Option<PathBuf>,
    cmdline: String,
    /// Boot vmm and QEMU at the same time instead of one after the other.
    paired: bool,
}

impl Options {
    fn parse<S: Into<String>>(args: impl IntoIterator<Item = S>) -> Result<Options> {
        let mut opts = Options {
            runs: 5,
            vcpus: 1,
            memory_mib: 128,
            timeout: Duration::from_secs(180),
            exit_timeout: Duration::from_secs(30),
            out: workspace_root().join("target/bench/boot.json"),
            qemu: Some("qemu-system-x86_64".to_string()),
            vmm: true,
            kernel: None,
            initrd: None,
            // The probe only reports BOOT-COMPLETE and powers the guest off.
            cmdline: bench_cmdline("poweroff"),
            paired: false,
        };
        let mut args = Args::new(args, USAGE);
        while let Some(flag) = args.next_flag() {
            match flag.as_str() {
                "--runs" => opts.runs = args.parse(&flag)?,
                "--vcpus" => opts.vcpus = args.parse(&flag)?,
                "--memory-mib" => opts.memory_mib = args.parse(&flag)?,
                "--timeout-secs" => opts.timeout = args.secs(&flag)?,
                "--exit-timeout-secs" => opts.exit_timeout = args.secs(&flag)?,
                "--out" => opts.out = args.path(&flag)?,
                "--qemu" => opts.qemu = Some(args.value(&flag)?),
                "--no-qemu" => opts.qemu = None,
                "--no-vmm" => opts.vmm = false,
                "--kernel" => opts.kernel = Some(args.path(&flag)?),
                "--initrd" => opts.initrd = Some(args.path(&flag)?),
                "--cmdline" => opts.cmdline = args.value(&flag)?,
                "--paired" => opts.paired = true,
                _ => return Err(args.unexpected(&flag)),
            }
        }
        if !opts.vmm && opts.qemu.is_none() {
            bail!("--no-vmm and --no-qemu leave nothing to run");
        }
        if opts.runs == 0 {
            bail!("--runs must be at least 1");
        }
        if opts.vcpus == 0 || opts.memory_mib == 0 {
            bail!("--vcpus and --memory-mib must be at least 1");
        }
        Ok(opts)
    }
}

/// What one boot measured; a metric is `None` when it could not be measured.
#[derive(Debug, Clone, Default)]
struct Sample {
    run: usize,
    /// Process start to the `BOOT-COMPLETE` line, ms.
    boot_complete_ms: Option<f64>,
    /// Process start to process exit, ms.
    exit_ms: Option<f64>,
    /// Memory sampled when `BOOT-COMPLETE` was read.
    rss: Option<RssBreakdown>,
    /// How guest RAM was told apart from the VMM's own memory.
    guest_ram_rule: Option<String>,
    /// vmm only: its own `first KVM_RUN at X ms after process start` log line.
    first_kvm_run_ms: Option<f64>,
    /// vmm only: its own `guest booted in N ms` log line.
    guest_booted_ms: Option<f64>,
    exit_code: Option<i32>,
    error: Option<String>,
}

impl Sample {
    fn to_json(&self) -> Value {
        json!({
            "run": self.run,
            "ok": self.error.is_none(),
            "error": self.error,
            "boot_complete_ms": self.boot_complete_ms,
            "exit_ms": self.exit_ms,
            "rss_total_kib": self.rss.map(|r| r.total_kib),
            "rss_guest_kib": self.rss.map(|r| r.guest_kib),
            "overhead_kib": self.rss.map(|r| r.overhead_kib()),
            "guest_ram_rule": self.guest_ram_rule,
            "first_kvm_run_ms": self.first_kvm_run_ms,
            "guest_booted_ms": self.guest_booted_ms,
            "exit_code": self.exit_code,
        })
    }
}

/// The metrics of the report: JSON key, table label, decimals, and how to get it from a sample.
type Metric = (&'static str, &'static str, usize, fn(&Sample) -> Option<f64>);

const METRICS: [Metric; 5] = [
    ("boot_complete_ms", "start to BOOT-COMPLETE (ms)", 1, |s| {
        s.boot_complete_ms
    }),
    ("exit_ms", "start to exit (ms)", 1, |s| s.exit_ms),
    ("overhead_kib", "VMM RSS overhead (KiB)", 0, |s| {
        s.rss.map(|r| r.overhead_kib() as f64)
    }),
    (
        "first_kvm_run_ms",
        "start to first KVM_RUN, vmm log (ms)",
        1,
        |s| s.first_kvm_run_ms,
    ),
    ("guest_booted_ms", "guest booted, vmm log (ms)", 1, |s| {
        s.guest_booted_ms
    }),
];

/// The number right after `marker` in `text`, e.g. `12.5` in `first KVM_RUN at 12.5 ms`.
fn number_after(text: &str, marker: &str) -> Option<f64> {
    let rest = &text[text.find(marker)? + marker.len()..];
    let end = rest
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(rest.len());
    rest[..end].parse().ok()
}

/// The vmm's timing log lines on stderr: (first KVM_RUN ms, guest booted ms).
fn parse_vmm_timings(lines: &[Line]) -> (Option<f64>, Option<f64>) {
    let stderr = || lines.iter().filter(|l| l.stream == Stream::Stderr);
    let first_run = stderr().find_map(|l| number_after(&l.text, "vmm: first KVM_RUN at "));
    let booted = stderr().find_map(|l| number_after(&l.text, "vmm: guest booted in "));
    (first_run, booted)
}

struct Bench {
    opts: Options,
    vmm_bin: Option<PathBuf>,
    kernel: PathBuf,
    initrd: PathBuf,
}

impl Bench {
    fn command(&self, vmm: Vmm) -> Result<Command> {
        match vmm {
            Vmm::Ours => GuestBuilder::new(&self.kernel)
                .binary(self.vmm_bin.as_deref().ok_or_else(|| anyhow!("vmm disabled"))?)
                .initrd(&self.initrd)
                .cmdline(&self.opts.cmdline)
                .vcpus(self.opts.vcpus)
                .memory_mib(self.opts.memory_mib)
                .command(),
            Vmm::Qemu => {
                let qemu = self
                    .opts
                    .qemu
                    .as_deref()
                    .ok_or_else(|| anyhow!("QEMU disabled"))?;
                let mut cmd = qemu_microvm(qemu, "microvm", self.opts.memory_mib, self.opts.vcpus);
                cmd.arg("-kernel")
                    .arg(&self.kernel)
                    .arg("-initrd")
                    .arg(&self.initrd)
                    .args(["-append", &self.opts.cmdline]);
                Ok(cmd)
            }
        }
    }

    /// Boots once; failures are recorded in the sample, not returned.
    fn run_once(&self, vmm: Vmm, run: usize) -> Sample {
        let mut sample = Sample {
            run,
            ..Sample::default()
        };
        if let Err(e) = self.measure(vmm, &mut sample) {
            sample.error = Some(format!("{e:#}"));
        }
        sample
    }

    fn measure(&self, vmm: Vmm, sample: &mut Sample) -> Result<()> {
        let cmd = self.command(vmm)?;
        // Sample memory from the reader thread the moment BOOT-COMPLETE is read: the guest powers off
        // right after it, so waiting for the main thread to wake up could miss the process.
        type Slot = Option<Result<(RssBreakdown, String), String>>;
        let rss_at_boot: Arc<Mutex<Slot>> = Arc::default();
        let slot = Arc::clone(&rss_at_boot);
        let memory_mib = self.opts.memory_mib;
        let hook: LineHook = Arc::new(move |pid, line| {
            if line.stream == Stream::Stdout && line.text.contains(BOOT_COMPLETE) {
                let mut slot = slot.lock().unwrap_or_else(|p| p.into_inner());
                if slot.is_none() {
                    *slot = Some(sample_memory(vmm, memory_mib, pid).map_err(|e| format!("{e:#}")));
                }
            }
        });
        let mut guest = Guest::spawn_command(cmd, Some(hook))?;
        let deadline = guest.started_at() + self.opts.timeout;
        let result = self.wait_boot(&mut guest, deadline, sample);
        let lines = guest.lines();
        if vmm == Vmm::Ours {
            (sample.first_kvm_run_ms, sample.guest_booted_ms) = parse_vmm_timings(&lines);
        }
        match rss_at_boot.lock().unwrap_or_else(|p| p.into_inner()).take() {
            Some(Ok((rss, rule))) => {
                sample.rss = Some(rss);
                sample.guest_ram_rule = Some(rule);
            }
            Some(Err(e)) => eprintln!("  {} run {}: memory not sampled: {e}", vmm.name(), sample.run),
            None => {}
        }
        result
    }

    fn wait_boot(&self, guest: &mut Guest, deadline: Instant, sample: &mut Sample) -> Result<()> {
        let left = || deadline.saturating_duration_since(Instant::now());
        let line = wait_boot_complete(guest, left())?;
        sample.boot_complete_ms = Some(ms_since(guest.started_at(), line.at));
        // The guest powers off right after BOOT-COMPLETE; a VMM that hits an error on the way stays up
        // (QEMU does), so watch for the failure markers too.
        let exit_deadline = Instant::now() + left().min(self.opts.exit_timeout);
        let mut last_scan = Instant::now();
        let status = loop {
            if let Some(status) = guest.try_exit_status()? {
                break status;
            }
            if last_scan.elapsed() >= Duration::from_millis(50) {
                last_scan = Instant::now();
                if let Some(line) = guest.find_line(&FAILURE_MARKERS) {
                    guest.kill()?;
                    bail!(
                        "failed after BOOT-COMPLETE: {:?}; last output:\n{}",
                        line.text,
                        guest.output_tail()
                    );
                }
            }
            if Instant::now() >= exit_deadline {
                guest.kill()?;
                bail!(
                    "no exit within {:?} after BOOT-COMPLETE (killed); last output:\n{}",
                    self.opts.exit_timeout,
                    guest.output_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(2));
        };
        let exited_at = guest.exited_at().ok_or_else(|| anyhow!("exit time unknown"))?;
        sample.exit_ms = Some(ms_since(guest.started_at(), exited_at));
        sample.exit_code = status.code();
        if !status.success() {
            bail!("exited with {status}; last output:\n{}", guest.output_tail());
        }
        Ok(())
    }
}

fn summarize(samples: &[Sample]) -> Vec<Option<Summary>> {
    METRICS
        .iter()
        .map(|(_, _, _, get)| Summary::of(&samples.iter().filter_map(get).collect::<Vec<_>>()))
        .collect()
}

fn markdown_table(opts: &Options, ours: &[Sample], qemu: &[Sample]) -> String {
    let (s_ours, s_qemu) = (summarize(ours), summarize(qemu));
    let mut t = String::new();
    t.push_str(&format!(
        "Boot: {} run(s) per VMM{}, {} vCPU, {} MiB, cmdline `{}`\n\n",
        opts.runs,
        if opts.paired {
            " (vmm and QEMU booted side by side)"
        } else {
            ", alternating"
        },
        opts.vcpus,
        opts.memory_mib,
        opts.cmdline
    ));
    t.push_str("| metric | vmm median | vmm p90 | qemu median | qemu p90 | vmm/qemu (medians) |\n");
    t.push_str("|---|---:|---:|---:|---:|---:|\n");
    for (i, (_, label, decimals, _)) in METRICS.iter().enumerate() {
        let (a, b) = (s_ours[i], s_qemu[i]);
        let med = |s: Option<Summary>| s.map(|s| s.median);
        let p90 = |s: Option<Summary>| s.map(|s| s.p90);
        t.push_str(&format!(
            "| {label} | {} | {} | {} | {} | {} |\n",
            cell(med(a), *decimals),
            cell(p90(a), *decimals),
            cell(med(b), *decimals),
            cell(p90(b), *decimals),
            cell(ratio(med(a), med(b)), 2),
        ));
    }
    if opts.paired {
        for (i, (_, label, _, get)) in METRICS.iter().enumerate() {
            let ratios: Vec<f64> = ours
                .iter()
                .zip(qemu)
                .filter_map(|(a, b)| ratio(get(a), get(b)))
                .collect();
            if let (Some(summary), true) = (Summary::of(&ratios), s_qemu[i].is_some()) {
                t.push_str(&format!(
                    "| {label}: median of paired vmm/qemu ratios | | | | | {} |\n",
                    cell(Some(summary.median), 2)
                ));
            }
        }
    }
    let ok = |s: &[Sample]| s.iter().filter(|s| s.error.is_none()).count();
    t.push_str(&format!(
        "| successful runs | {} | | {} | | |\n",
        if opts.vmm {
            format!("{}/{}", ok(ours), ours.len())
        } else {
            "skipped".into()
        },
        if opts.qemu.is_some() {
            format!("{}/{}", ok(qemu), qemu.len())
        } else {
            "skipped".into()
        }
    ));
    t
}

fn report_json(opts: &Options, bench: &Bench, ours: &[Sample], qemu: &[Sample]) -> Value {
    let summary_json = |samples: &[Sample]| -> Value {
        let sums = summarize(samples);
        let mut map = serde_json::Map::new();
        for (i, (key, ..)) in METRICS.iter().enumerate() {
            map.insert(key.to_string(), sums[i].map_or(Value::Null, |s| s.to_json()));
        }
        map.insert("runs".into(), json!(samples.len()));
        map.insert(
            "failed".into(),
            json!(samples.iter().filter(|s| s.error.is_some()).count()),
        );
        Value::Object(map)
    };
    let (s_ours, s_qemu) = (summarize(ours), summarize(qemu));
    let mut ratios = serde_json::Map::new();
    for (i, (key, ..)) in METRICS.iter().enumerate() {
        let r = ratio(s_ours[i].map(|s| s.median), s_qemu[i].map(|s| s.median));
        ratios.insert(key.to_string(), json!(r));
    }
    json!({
        "bench": "boot",
        "unix_time": unix_time(),
        "host": host_json(),
        "config": {
            "runs": opts.runs,
            "vcpus": opts.vcpus,
            "memory_mib": opts.memory_mib,
            "timeout_secs": opts.timeout.as_secs(),
            "exit_timeout_secs": opts.exit_timeout.as_secs(),
            "cmdline": opts.cmdline,
            "kernel": bench.kernel,
            "initrd": bench.initrd,
            "vmm_binary": bench.vmm_bin,
            "qemu": opts.qemu,
        },
        "summary": { "vmm": summary_json(ours), "qemu": summary_json(qemu), "ratio_vmm_over_qemu": ratios },
        "samples": {
            "vmm": ours.iter().map(Sample::to_json).collect::<Vec<_>>(),
            "qemu": qemu.iter().map(Sample::to_json).collect::<Vec<_>>(),
        },
    })
}

fn describe(vmm: Vmm, s: &Sample) -> String {
    let f = |v: Option<f64>| cell(v, 1);
    let mut text = format!(
        "{} run {}: BOOT-COMPLETE {} ms, exit {} ms, overhead {} KiB",
        vmm.name(),
        s.run,
        f(s.boot_complete_ms),
        f(s.exit_ms),
        s.rss.map_or("-".to_string(), |r| format!(
            "{} (total {}, guest {} by {})",
            r.overhead_kib(),
            r.total_kib,
            r.guest_kib,
            s.guest_ram_rule.as_deref().unwrap_or("?")
        )),
    );
    if let Some(e) = &s.error {
        text.push_str(&format!("\n  FAILED: {e}"));
    }
    text
}

fn main() -> Result<()> {
    if benches::wants_help() {
        println!("{USAGE}");
        return Ok(());
    }
    let opts = Options::parse(std::env::args().skip(1))?;
    let (kernel, initrd) = match (&opts.kernel, &opts.initrd) {
        (Some(k), Some(i)) => (k.clone(), i.clone()),
        (None, None) => {
            let images = GuestImages::get()?;
            (images.vmlinux.clone(), images.initramfs.clone())
        }
        _ => bail!("--kernel and --initrd go together"),
    };
    let vmm_bin = if opts.vmm { Some(try_vmm_binary()?) } else { None };
    let bench = Bench {
        opts: opts.clone(),
        vmm_bin,
        kernel,
        initrd,
    };
    eprintln!(
        "kernel {}, initrd {}, vmm {}",
        bench.kernel.display(),
        bench.initrd.display(),
        bench
            .vmm_bin
            .as_ref()
            .map_or("skipped".into(), |p| p.display().to_string())
    );

    let (mut ours, mut qemu) = (Vec::new(), Vec::new());
    for run in 0..opts.runs {
        if opts.paired && opts.vmm && opts.qemu.is_some() {
            let (a, b) = std::thread::scope(|scope| {
                let a = scope.spawn(|| bench.run_once(Vmm::Ours, run));
                let b = bench.run_once(Vmm::Qemu, run);
                (a.join().unwrap_or_else(|p| std::panic::resume_unwind(p)), b)
            });
            eprintln!("{}\n{}", describe(Vmm::Ours, &a), describe(Vmm::Qemu, &b));
            ours.push(a);
            qemu.push(b);
            continue;
        }
        if opts.vmm {
            let s = bench.run_once(Vmm::Ours, run);
            eprintln!("{}", describe(Vmm::Ours, &s));
            ours.push(s);
        }
        if opts.qemu.is_some() {
            let s = bench.run_once(Vmm::Qemu, run);
            eprintln!("{}", describe(Vmm::Qemu, &s));
            qemu.push(s);
        }
    }

    println!("{}", markdown_table(&opts, &ours, &qemu));
    write_json(&opts.out, &report_json(&opts, &bench, &ours, &qemu))?;
    eprintln!("wrote {}", opts.out.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_options() {
        let o = Options::parse("".split_whitespace()).unwrap();
        assert_eq!((o.runs, o.vcpus, o.memory_mib), (5, 1, 128));
        assert_eq!(
            o.cmdline,
            "console=ttyS0 quiet pci=off noxsave clearcpuid=popcnt,smap vmmprobe.action=poweroff"
        );
        assert!(o.qemu.is_some());
        let o = Options::parse(
            "--runs 1 --vcpus 2 --memory-mib 256 --no-qemu --out /tmp/x.json".split_whitespace(),
        )
        .unwrap();
        assert_eq!((o.runs, o.vcpus, o.memory_mib), (1, 2, 256));
        assert!(o.qemu.is_none());
        assert_eq!(o.out, PathBuf::from("/tmp/x.json"));
        assert!(Options::parse("--runs 0".split_whitespace()).is_err());
        assert!(Options::parse("--runs".split_whitespace()).is_err());
        assert!(Options::parse("--bogus".split_whitespace()).is_err());
    }

    #[test]
    fn parses_vmm_timing_lines() {
        let t0 = Instant::now();
        let line = |stream, text: &str| Line {
            stream,
            at: t0,
            text: text.to_string(),
        };
        let lines = [
            line(Stream::Stdout, "vmm: first KVM_RUN at 1.0 ms after process start"),
            line(
                Stream::Stderr,
                "[INFO] vmm: first KVM_RUN at 12.5 ms after process start",
            ),
            line(Stream::Stderr, "vmm: guest booted in 840 ms"),
        ];
        assert_eq!(parse_vmm_timings(&lines), (Some(12.5), Some(840.0)));
        assert_eq!(parse_vmm_timings(&lines[..1]), (None, None));
    }

    #[test]
    fn table_and_json_have_all_metrics() {
        let opts = Options::parse("--runs 1".split_whitespace()).unwrap();
        let ours = [Sample {
            boot_complete_ms: Some(100.0),
            exit_ms: Some(120.0),
            rss: Some(RssBreakdown {
                total_kib: 30000,
                guest_kib: 26000,
            }),
            first_kvm_run_ms: Some(5.0),
            ..Sample::default()
        }];
        let qemu = [Sample {
            boot_complete_ms: Some(200.0),
            error: Some("x".into()),
            ..Sample::default()
        }];
        let table = markdown_table(&opts, &ours, &qemu);
        assert!(
            table.contains("| start to BOOT-COMPLETE (ms) | 100.0 | 100.0 | 200.0 | 200.0 | 0.50 |"),
            "{table}"
        );
        assert!(
            table.contains("| VMM RSS overhead (KiB) | 4000 | 4000 | - | - | - |"),
            "{table}"
        );
        assert!(table.contains("| successful runs | 1/1 | | 0/1 | | |"), "{table}");
        let bench = Bench {
            opts: opts.clone(),
            vmm_bin: Some("/vmm".into()),
            kernel: "/k".into(),
            initrd: "/i".into(),
        };
        let j = report_json(&opts, &bench, &ours, &qemu);
        assert_eq!(
            j["summary"]["ratio_vmm_over_qemu"]["boot_complete_ms"],
            json!(0.5)
        );
        assert_eq!(j["summary"]["vmm"]["overhead_kib"]["median"], json!(4000.0));
        assert_eq!(j["summary"]["qemu"]["failed"], json!(1));
        assert_eq!(j["samples"]["vmm"][0]["guest_booted_ms"], Value::Null);
    }
}
